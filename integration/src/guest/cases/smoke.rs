//! Smoke cases: prove the lab itself, without the bridge. For every modern
//! device variant: its VFIO group is viable and holds only that device,
//! config space read through the VFIO device fd shows virtio's ids and the
//! four virtio capabilities, and VFIO reports the MSI-X vector count QEMU
//! was configured with. For the legacy device: legacy ids and no modern
//! common-cfg capability, which is what the bridge must refuse on.

use std::path::Path;

use anyhow::{ensure, Context as _};
use vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;

use crate::guest::sys::{self, config, VfioDevice};
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::{Variant, VIRTIO_VENDOR_ID};

/// virtio `cfg_type`s a modern device must offer: common, notify, ISR,
/// device-specific (virtio 1.2 section 4.1.4).
const MODERN_CFG_TYPES: [u8; 4] = [1, 2, 3, 4];

/// The smoke suite.
pub fn cases() -> Vec<Case> {
    let modern = [
        Variant::Blk0,
        Variant::BlkMq,
        Variant::BlkPpv,
        Variant::Blk1,
        Variant::NetUser,
        Variant::NetMq,
        Variant::Rng,
        Variant::Console,
        Variant::Balloon,
        Variant::Crypto,
    ];
    let mut out = Vec::new();
    for v in modern {
        let named = |what: &str, run: fn(&Ctx) -> CaseResult| Case {
            name: format!("{}_{what}", v.name()),
            needs: Some(v),
            run,
        };
        out.push(named("vfio_group_viable", vfio_group_viable));
        out.push(named(
            "config_ids_and_virtio_caps",
            config_ids_and_virtio_caps,
        ));
        out.push(named("msix_vectors", msix_vectors));
    }
    out.push(Case {
        name: "legacy_has_no_modern_common_cfg".to_string(),
        needs: Some(Variant::Legacy),
        run: legacy_has_no_modern_common_cfg,
    });
    out
}

/// `/dev/vfio/<group>` exists, the group holds only this device and is
/// viable, and the device fd opens through a type1v2 container.
fn vfio_group_viable(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let sysfs = dev.sysfs();
    let node = sys::vfio_group_node(&sysfs)?;
    ensure!(node.exists(), "{} missing", node.display());
    let group = sys::iommu_group(&sysfs)?;
    let members = std::fs::read_dir(
        Path::new("/sys/kernel/iommu_groups")
            .join(group.to_string())
            .join("devices"),
    )
    .context("list the IOMMU group's devices")?
    .filter_map(Result::ok)
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .collect::<Vec<_>>();
    ensure!(
        members == [dev.bdf.clone()],
        "IOMMU group {group} holds {members:?}, want only {}",
        dev.bdf
    );
    // Opening fails unless the group is viable.
    VfioDevice::open(&dev.bdf)?;
    Ok(Outcome::Pass)
}

/// Vendor/device id and the virtio capabilities, read through VFIO.
fn config_ids_and_virtio_caps(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let cfg = VfioDevice::open(&dev.bdf)?.config_space()?;
    let vendor = config::u16_at(&cfg, 0).context("short config space")?;
    let device = config::u16_at(&cfg, 2).context("short config space")?;
    ensure!(
        (vendor, device) == (VIRTIO_VENDOR_ID, dev.pci_device_id()),
        "ids {vendor:04x}:{device:04x}, want {VIRTIO_VENDOR_ID:04x}:{:04x}",
        dev.pci_device_id()
    );
    let types = config::virtio_cfg_types(&cfg);
    ensure!(
        MODERN_CFG_TYPES.iter().all(|t| types.contains(t)),
        "virtio cfg_types {types:?}, want all of {MODERN_CFG_TYPES:?}"
    );
    Ok(Outcome::Pass)
}

/// VFIO's MSI-X count and the MSI-X capability's table size both equal
/// the vectors QEMU was given.
fn msix_vectors(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let vfio = VfioDevice::open(&dev.bdf)?;
    let count = vfio.irq_info(VFIO_PCI_MSIX_IRQ_INDEX)?.count;
    let table = config::msix_table_size(&vfio.config_space()?).context("no MSI-X capability")?;
    ensure!(
        count == dev.msix_vectors && table == dev.msix_vectors,
        "VFIO MSI-X count {count}, capability table size {table}, want {} ({} queues)",
        dev.msix_vectors,
        dev.num_queues
    );
    Ok(Outcome::Pass)
}

/// The legacy-only device has the transitional id and no common-cfg
/// capability.
fn legacy_has_no_modern_common_cfg(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let cfg = VfioDevice::open(&dev.bdf)?.config_space()?;
    let device = config::u16_at(&cfg, 2).context("short config space")?;
    ensure!(
        device == dev.pci_device_id(),
        "device id {device:04x}, want {:04x}",
        dev.pci_device_id()
    );
    let types = config::virtio_cfg_types(&cfg);
    ensure!(
        !types.contains(&config::VIRTIO_PCI_CAP_COMMON_CFG),
        "legacy device offers virtio cfg_types {types:?}"
    );
    Ok(Outcome::Pass)
}
