//! The manifest: what the host orchestrator tells the guest runner.
//!
//! `lab` writes it to `<target>/lab/manifest.json` before QEMU starts and
//! passes its path on the kernel command line; `lab-guest` reads it inside
//! the VM through the read-only 9p share of the host's root, so the path is
//! the same on both sides.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change, so a stale runner fails loudly.
pub const MANIFEST_VERSION: u32 = 5;

/// PCI vendor id of every virtio device.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;

/// The device variants a lab run can create. Cases name the one they need.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// virtio-blk on a pattern-filled raw image, QEMU's default queues and vectors.
    Blk0,
    /// virtio-blk, 4 queues sharing 2 MSI-X vectors.
    BlkMq,
    /// virtio-blk with `page-per-vq=on` (one notify page per queue).
    BlkPpv,
    /// virtio-net on QEMU user-mode networking (one queue pair).
    NetUser,
    /// virtio-net with 4 queue pairs on a multi-queue tap in a netns.
    NetMq,
    /// Legacy-only virtio-blk (`disable-modern=on`); the bridge must refuse it.
    Legacy,
    /// A second virtio-blk configured like `Blk0`, so one inner guest can
    /// compare two paths side by side.
    Blk1,
    /// virtio-rng on QEMU's builtin entropy source.
    Rng,
    /// virtio-serial with one port (no MULTIPORT): a virtconsole on a file
    /// chardev the host fills and reads.
    Console,
    /// virtio-balloon with free page reporting: queues of different
    /// maximum sizes (128 and 32).
    Balloon,
    /// virtio-crypto on QEMU's builtin crypto backend.
    Crypto,
    /// A second virtio-blk on Blk0's image (`share-rw=on`): a migration's
    /// destination device on the same storage, and a reader from outside
    /// the inner guest.
    Blk0Twin,
    /// Another virtio-blk on Blk0's image without VIRTIO_RING_F_EVENT_IDX
    /// (`event_idx=off`): a destination that lacks a negotiated feature.
    Blk0NoEventIdx,
}

impl Variant {
    /// Every variant, in PCI slot order.
    pub const ALL: [Variant; 13] = [
        Variant::Blk0,
        Variant::BlkMq,
        Variant::BlkPpv,
        Variant::Legacy,
        Variant::Blk1,
        Variant::Blk0Twin,
        Variant::Blk0NoEventIdx,
        Variant::NetUser,
        Variant::NetMq,
        Variant::Rng,
        Variant::Console,
        Variant::Balloon,
        Variant::Crypto,
    ];

    /// Stable name, as in JSON and case names.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Blk0 => "blk0",
            Variant::BlkMq => "blk_mq",
            Variant::BlkPpv => "blk_ppv",
            Variant::NetUser => "net_user",
            Variant::NetMq => "net_mq",
            Variant::Legacy => "legacy",
            Variant::Blk1 => "blk1",
            Variant::Rng => "rng",
            Variant::Console => "console",
            Variant::Balloon => "balloon",
            Variant::Crypto => "crypto",
            Variant::Blk0Twin => "blk0_twin",
            Variant::Blk0NoEventIdx => "blk0_no_event_idx",
        }
    }
}

/// Kind of virtio device.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// virtio-blk
    Blk,
    /// virtio-net
    Net,
    /// virtio-rng (entropy)
    Rng,
    /// virtio-serial (console)
    Console,
    /// virtio-balloon (traditional)
    Balloon,
    /// virtio-crypto
    Crypto,
}

impl Kind {
    /// Virtio device id (virtio 1.3 §5).
    pub fn virtio_id(self) -> u16 {
        match self {
            Kind::Net => 1,
            Kind::Blk => 2,
            Kind::Console => 3,
            Kind::Rng => 4,
            Kind::Balloon => 5,
            Kind::Crypto => 20,
        }
    }

    /// PCI device id of a modern device (virtio 1.0 section 4.1.2.1:
    /// 0x1040 + virtio device id).
    pub fn modern_device_id(self) -> u16 {
        0x1040 + self.virtio_id()
    }

    /// PCI device id of a transitional or legacy-only device (virtio 1.0
    /// section 4.1.2.1's table; crypto came after it and has none).
    pub fn transitional_device_id(self) -> Option<u16> {
        match self {
            Kind::Net => Some(0x1000),
            Kind::Blk => Some(0x1001),
            Kind::Balloon => Some(0x1002),
            Kind::Console => Some(0x1003),
            Kind::Rng => Some(0x1005),
            Kind::Crypto => None,
        }
    }

    /// The type name `vdpa-bridge list`/`info` print for it.
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Blk => "block",
            Kind::Net => "net",
            Kind::Rng => "rng",
            Kind::Console => "console",
            Kind::Balloon => "balloon",
            Kind::Crypto => "crypto",
        }
    }
}

/// The host-side files of a console's chardev.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsoleFiles {
    /// What QEMU feeds the guest (`input-path=`), written by the host
    /// before boot.
    pub input: PathBuf,
    /// What the guest sent (`path=`), checked by the host after the VM
    /// exits.
    pub output: PathBuf,
}

/// One QEMU virtio-pci device in the VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Device {
    /// Which variant this is.
    pub variant: Variant,
    /// Guest PCI address, `0000:00:03.0`.
    pub bdf: String,
    /// blk or net.
    pub kind: Kind,
    /// Legacy-only (`disable-modern=on`); otherwise modern-only with
    /// `disable-legacy=on,iommu_platform=on`.
    pub legacy: bool,
    /// Backing image (blk only), a host path.
    pub image: Option<PathBuf>,
    /// blk: request queues; net: queue pairs; other kinds: virtqueues
    /// (what QEMU will offer).
    pub num_queues: u32,
    /// MSI-X table size QEMU gives the device (explicit `vectors=` or
    /// QEMU's default formula).
    pub msix_vectors: u32,
    /// The QEMU `-device` string, for diagnostics.
    pub qemu_device: String,
    /// A console's chardev files.
    #[serde(default)]
    pub console: Option<ConsoleFiles>,
    /// The `pcie-root-port` the device sits behind (its guest PCI
    /// address), or `None` for an integrated endpoint on `pcie.0`.
    #[serde(default)]
    pub root_port: Option<String>,
}

impl Device {
    /// Expected PCI device id.
    pub fn pci_device_id(&self) -> u16 {
        match (self.legacy, self.kind.transitional_device_id()) {
            (true, Some(id)) => id,
            _ => self.kind.modern_device_id(),
        }
    }

    /// The device's sysfs directory in the guest.
    pub fn sysfs(&self) -> PathBuf {
        Path::new("/sys/bus/pci/devices").join(&self.bdf)
    }
}

/// A variant the host could not create, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Skipped {
    /// The variant.
    pub variant: Variant,
    /// Why it is absent; cases that need it report this as their skip reason.
    pub reason: String,
}

/// The whole manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`] of the writer.
    pub version: u32,
    /// The devices in the VM, in PCI slot order.
    pub devices: Vec<Device>,
    /// Variants left out of this run.
    pub skipped: Vec<Skipped>,
    /// Run the benchmark instead of the test cases.
    #[serde(default)]
    pub bench: bool,
    /// Run only the soak (`cases/soak.rs`), for this many seconds.
    #[serde(default)]
    pub soak: Option<u64>,
    /// Run only the cases whose name contains this.
    #[serde(default)]
    pub only: Option<String>,
    /// A pattern image (name `vduse`) the guest exports as a VDUSE block
    /// device; the lab directory is shared read-write so writes land in it.
    #[serde(default)]
    pub vduse_image: Option<PathBuf>,
    /// A patched Cloud Hypervisor to run inside the VM, or why not.
    #[serde(default)]
    pub ch: Option<ChRun>,
    /// Why the Cloud Hypervisor cases cannot run (printed as their skip).
    #[serde(default)]
    pub ch_skip: Option<String>,
    /// The fleet: many virtio-blk devices, each behind its own root port
    /// (`host::devices::fleet`), for the cases of one VMM with many
    /// bridged devices.
    #[serde(default)]
    pub fleet: Vec<FleetEntry>,
    /// The fleet benchmark's knobs, from the host's environment
    /// (`VDPA_FLEET_BOOTS`, `VDPA_FLEET_SIZES`): the guest sees none of it.
    #[serde(default)]
    pub fleet_bench: FleetBench,
}

/// How the fleet benchmark runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetBench {
    /// Boots of each mode for the whole fleet (`None`: 5).
    pub boots: Option<usize>,
    /// Rows of the table, disks (`None`: 1, 4 and the whole fleet).
    pub sizes: Option<Vec<usize>>,
}

impl FleetBench {
    /// From `VDPA_FLEET_BOOTS` and `VDPA_FLEET_SIZES` (comma separated).
    pub fn from_env() -> Self {
        FleetBench {
            boots: std::env::var("VDPA_FLEET_BOOTS")
                .ok()
                .and_then(|v| v.parse().ok()),
            sizes: std::env::var("VDPA_FLEET_SIZES")
                .ok()
                .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect()),
        }
    }
}

/// One disk of the fleet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetEntry {
    /// QEMU id, image name (pattern seed) and virtio-blk serial.
    pub name: String,
    /// Guest PCI address.
    pub bdf: String,
    /// The image, a host path.
    pub image: PathBuf,
}

/// What the Cloud Hypervisor end-to-end cases need.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChRun {
    /// The `cloud-hypervisor` binary (`CLOUD_HYPERVISOR`).
    pub binary: PathBuf,
    /// `ch-remote` (`CH_REMOTE`), for the hot-plug case.
    pub remote: Option<PathBuf>,
    /// Kernel for the innermost guest.
    pub kernel: PathBuf,
    /// Its initramfs (see `host::initramfs::L3_INIT`).
    pub initramfs: PathBuf,
    /// Feature bit the run masks off (`features_mask=`).
    pub masked_bit: u32,
}

impl Manifest {
    /// Read and version-check a manifest.
    ///
    /// # Errors
    /// The file cannot be read or parsed, or was written by another version.
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
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn store(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
    }

    /// The device of `variant`, if this run has it.
    pub fn device(&self, variant: Variant) -> Option<&Device> {
        self.devices.iter().find(|d| d.variant == variant)
    }

    /// The device of `variant`, or why this run has none (the host's
    /// reason, else a generic one).
    pub fn device_or_reason(&self, variant: Variant) -> Result<&Device, &str> {
        self.device(variant).ok_or_else(|| {
            self.skip_reason(variant)
                .unwrap_or("variant not created in this run")
        })
    }

    /// Why `variant` is absent, if the host said.
    pub fn skip_reason(&self, variant: Variant) -> Option<&str> {
        self.skipped
            .iter()
            .find(|s| s.variant == variant)
            .map(|s| s.reason.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_serializes_as_its_name() {
        for v in Variant::ALL {
            assert_eq!(
                serde_json::to_string(&v).unwrap(),
                format!("\"{}\"", v.name())
            );
        }
    }

    #[test]
    fn modern_device_ids_are_0x1040_plus_the_virtio_id() {
        assert_eq!(Kind::Net.modern_device_id(), 0x1041);
        assert_eq!(Kind::Blk.modern_device_id(), 0x1042);
        assert_eq!(Kind::Console.modern_device_id(), 0x1043);
        assert_eq!(Kind::Rng.modern_device_id(), 0x1044);
        assert_eq!(Kind::Balloon.modern_device_id(), 0x1045);
        assert_eq!(Kind::Crypto.modern_device_id(), 0x1054);
        assert_eq!(Kind::Crypto.transitional_device_id(), None);
    }

    /// The names the CLI prints are the library's names for the ids.
    #[test]
    fn type_names_are_the_library_s() {
        for k in [
            Kind::Blk,
            Kind::Net,
            Kind::Rng,
            Kind::Console,
            Kind::Balloon,
            Kind::Crypto,
        ] {
            assert_eq!(
                vdpa_bridge::types::DeviceType::from_id(u32::from(k.virtio_id())).name(),
                k.type_name()
            );
        }
    }

    #[test]
    fn manifest_roundtrips_through_a_file() {
        let m = Manifest {
            version: MANIFEST_VERSION,
            devices: vec![],
            skipped: vec![Skipped {
                variant: Variant::NetMq,
                reason: "no netns".into(),
            }],
            bench: true,
            soak: None,
            only: Some("ch_".into()),
            vduse_image: None,
            fleet: Vec::new(),
            fleet_bench: Default::default(),
            ch: None,
            ch_skip: Some("no CLOUD_HYPERVISOR".into()),
        };
        let path = std::env::temp_dir().join(format!("lab-manifest-{}.json", std::process::id()));

        m.store(&path).unwrap();
        let back = Manifest::load(&path);
        let _ = std::fs::remove_file(&path);

        assert_eq!(back.unwrap(), m);
        assert_eq!(m.skip_reason(Variant::NetMq), Some("no netns"));
    }
}
