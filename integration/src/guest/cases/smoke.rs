//! Smoke cases: prove the harness end to end (devices at their addresses,
//! bound to vfio-pci, openable through VFIO, the host check channel works)
//! without depending on the bridge crate.

use anyhow::{bail, ensure, Context as _};

use crate::guest::sys::{self, VfioHandle};
use crate::guest::{Case, Ctx, Outcome};
use crate::pattern;

/// The smoke suite.
pub const CASES: &[Case] = &[
    Case {
        name: "manifest_devices_enumerated",
        run: manifest_devices_enumerated,
    },
    Case {
        name: "vfio_devices_bound",
        run: vfio_devices_bound,
    },
    Case {
        name: "vfio_config_space_reads_virtio_vendor",
        run: vfio_config_space_reads_virtio_vendor,
    },
    Case {
        name: "host_image_check_roundtrip",
        run: host_image_check_roundtrip,
    },
    Case {
        name: "nested_kvm_device_present",
        run: nested_kvm_device_present,
    },
];

const VIRTIO_VENDOR: u32 = 0x1af4;
const PCI_VENDOR_ID: u64 = 0x0;
const PCI_DEVICE_ID: u64 = 0x2;

/// Every manifest device sits at its address with the expected ids.
fn manifest_devices_enumerated(ctx: &Ctx) -> anyhow::Result<Outcome> {
    ensure!(!ctx.devices().is_empty(), "manifest lists no devices");
    for dev in ctx.devices() {
        ensure!(
            dev.sysfs().exists(),
            "{} not found at {}",
            dev.name,
            dev.bdf
        );
        let vendor = sys::sysfs_hex(dev, "vendor")?;
        let device = sys::sysfs_hex(dev, "device")?;
        ensure!(
            vendor == VIRTIO_VENDOR && device == u32::from(dev.pci_device_id()),
            "{} at {}: id {vendor:04x}:{device:04x}, want {VIRTIO_VENDOR:04x}:{:04x}",
            dev.name,
            dev.bdf,
            dev.pci_device_id()
        );
    }
    Ok(Outcome::Pass)
}

/// Each modern device is bound to vfio-pci and has its group node.
fn vfio_devices_bound(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut modern = 0;
    for dev in ctx.devices().iter().filter(|d| !d.legacy) {
        modern += 1;
        let drv = sys::driver(dev);
        ensure!(
            drv.as_deref() == Some("vfio-pci"),
            "{} ({}) bound to {drv:?}, want vfio-pci",
            dev.name,
            dev.bdf
        );
        let node = sys::vfio_group_node(dev)?;
        ensure!(node.exists(), "{} missing for {}", node.display(), dev.name);
    }
    ensure!(modern > 0, "manifest lists no modern device");
    Ok(Outcome::Pass)
}

/// Through VFIO, config space of each modern device reads virtio's ids.
fn vfio_config_space_reads_virtio_vendor(ctx: &Ctx) -> anyhow::Result<Outcome> {
    ctx.device("blk0")?;
    for dev in ctx.devices().iter().filter(|d| !d.legacy) {
        let h = VfioHandle::open(dev)?;
        let vendor = h.config_u16(PCI_VENDOR_ID);
        let device = h.config_u16(PCI_DEVICE_ID);
        if u32::from(vendor) != VIRTIO_VENDOR || device != dev.pci_device_id() {
            bail!(
                "{}: VFIO config space says {vendor:04x}:{device:04x}, want {VIRTIO_VENDOR:04x}:{:04x}",
                dev.name,
                dev.pci_device_id()
            );
        }
    }
    Ok(Outcome::Pass)
}

/// The host verifies, after the VM exits, a region of blk0.img that it
/// wrote with the known pattern (proves the LAB-CHECK-IMAGE channel).
fn host_image_check_roundtrip(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let dev = ctx.device("blk0")?;
    let image = dev.image_name().context("blk0 has no image")?;
    let offset = 1024 * 1024 + 100;
    let expected = pattern::region(image, offset, 3 * pattern::SECTOR);
    ctx.expect_image(image, offset, &expected, "blk0_pattern_intact");
    Ok(Outcome::Pass)
}

/// /dev/kvm inside the lab (kvm + kvm-amd on TCG's svm), needed by the
/// nested Cloud Hypervisor suites.
fn nested_kvm_device_present(_ctx: &Ctx) -> anyhow::Result<Outcome> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Ok(Outcome::Skip("no /dev/kvm in the guest".into()));
    }
    Ok(Outcome::Pass)
}
