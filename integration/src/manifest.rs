//! The manifest: what the host orchestrator tells the guest runner.
//!
//! Written by `lab` to `<target>/lab/manifest.json` before QEMU starts and
//! read by `lab-guest` inside the VM (through the read-only 9p root share, so
//! the path is the same on both sides). Every path in it is a host path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change, so a stale runner fails loudly.
pub const MANIFEST_VERSION: u32 = 1;

/// The whole manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`] of the writer.
    pub version: u32,
    /// Host directory holding the manifest, disk images and console log.
    pub lab_dir: PathBuf,
    /// Case name filters (substring match); empty runs every case.
    pub filter: Vec<String>,
    /// Treat `skip` outcomes as failures (`VDPA_LAB_NO_SKIP=1`).
    pub skip_is_failure: bool,
    /// The test devices, in PCI address order.
    pub devices: Vec<Device>,
    /// The multi-queue tap's network namespace.
    pub net: NetInfo,
    /// Host environment carried into the guest (`CLOUD_HYPERVISOR`, `CH_REMOTE`).
    pub env: BTreeMap<String, String>,
}

/// Kind of virtio device.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// virtio-blk
    Blk,
    /// virtio-net
    Net,
}

impl Kind {
    /// PCI device id of a modern (virtio 1.0, `disable-legacy=on`) device.
    pub fn modern_device_id(self) -> u16 {
        match self {
            Kind::Net => 0x1041,
            Kind::Blk => 0x1042,
        }
    }

    /// PCI device id of a transitional or legacy-only device.
    pub fn transitional_device_id(self) -> u16 {
        match self {
            Kind::Net => 0x1000,
            Kind::Blk => 0x1001,
        }
    }
}

/// One QEMU virtio-pci device under test.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Device {
    /// Stable name used by cases (`blk0`, `netmq`, ...).
    pub name: String,
    /// Guest PCI address, `0000:00:03.0`.
    pub bdf: String,
    /// blk or net.
    pub kind: Kind,
    /// Driver the guest's init binds the device to (`vfio-pci`), or `None`
    /// to leave it with the kernel's virtio-pci.
    pub bind: Option<String>,
    /// Backing image (blk only), a host path.
    pub image: Option<PathBuf>,
    /// MAC address (net only).
    pub mac: Option<String>,
    /// blk: request queues; net: queue pairs.
    pub num_queues: u32,
    /// MSI-X table size QEMU was given.
    pub vectors: u32,
    /// `page-per-vq=on`.
    pub page_per_vq: bool,
    /// Legacy-only (`disable-modern=on`).
    pub legacy: bool,
    /// blk: expected `capacity` in 512-byte sectors.
    pub capacity_sectors: Option<u64>,
    /// The QEMU `-device` string, for diagnostics.
    pub qemu_device: String,
}

impl Device {
    /// Expected PCI device id.
    pub fn pci_device_id(&self) -> u16 {
        if self.legacy {
            self.kind.transitional_device_id()
        } else {
            self.kind.modern_device_id()
        }
    }

    /// Image file name, the key `LAB-CHECK-IMAGE` uses.
    pub fn image_name(&self) -> Option<&str> {
        self.image.as_deref()?.file_name()?.to_str()
    }

    /// The device's sysfs directory.
    pub fn sysfs(&self) -> PathBuf {
        Path::new("/sys/bus/pci/devices").join(&self.bdf)
    }
}

/// The tap that backs the multi-queue virtio-net device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetInfo {
    /// Network namespace QEMU runs in.
    pub netns: String,
    /// Multi-queue tap inside it.
    pub tap: String,
    /// The tap's (far end, host side) address, e.g. `10.99.0.1`.
    pub tap_addr: String,
    /// Prefix length of `tap_addr`.
    pub prefix_len: u8,
    /// An address the guest side may use on that subnet, e.g. `10.99.0.2`.
    pub guest_addr: String,
}

impl Manifest {
    /// Read and version-check a manifest.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let m: Manifest =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        anyhow::ensure!(
            m.version == MANIFEST_VERSION,
            "manifest version {} but this runner speaks {MANIFEST_VERSION}: rebuild",
            m.version
        );
        Ok(m)
    }

    /// Write the manifest as pretty JSON.
    pub fn store(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
    }

    /// The device called `name`.
    pub fn device(&self, name: &str) -> anyhow::Result<&Device> {
        self.devices
            .iter()
            .find(|d| d.name == name)
            .with_context(|| format!("no device {name:?} in the manifest"))
    }

    /// The device whose image file is called `image_name`.
    pub fn device_by_image(&self, image_name: &str) -> Option<&Device> {
        self.devices
            .iter()
            .find(|d| d.image_name() == Some(image_name))
    }
}
