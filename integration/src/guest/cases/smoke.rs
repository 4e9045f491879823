//! Smoke cases: prove the lab itself, without the bridge. For every modern
//! device variant: its VFIO group is viable and holds only that device,
//! config space read through the VFIO device fd shows virtio's ids and the
//! four virtio capabilities, and VFIO reports the MSI-X vector count QEMU
//! was configured with, and the PCIe topology is the table's (behind a
//! root port: an endpoint with FLR; on pcie.0: no FLR). For the legacy device: legacy ids and no modern
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
        out.push(named("pcie_topology_as_the_table_says", pcie_topology));
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

/// PCI Express capability id.
const CAP_ID_EXP: u8 = 0x10;
/// Device/port type (Express capability flags, bits 7:4) of a PCIe endpoint.
const EXP_TYPE_ENDPOINT: u16 = 0x0;
/// Device capabilities: function-level reset.
const EXP_DEVCAP_FLR: u32 = 1 << 28;

/// A device the table puts behind a root port is a PCIe endpoint on that
/// port's secondary bus with FLR, and the kernel would reset it by FLR;
/// a device on `pcie.0` has no FLR (what real VFs have and integrated
/// endpoints lack: the reset path the bridge must take safely).
fn pcie_topology(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let cfg = VfioDevice::open(&dev.bdf)?.config_space()?;
    let exp = config::capabilities(&cfg)
        .into_iter()
        .find(|&(_, id)| id == CAP_ID_EXP)
        .map(|(off, _)| off);
    let flr = exp
        .and_then(|off| cfg.get(off + 4..off + 8))
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & EXP_DEVCAP_FLR != 0)
        .unwrap_or(false);
    let Some(port) = &dev.root_port else {
        ensure!(!flr, "an integrated endpoint on pcie.0 reports FLR");
        return Ok(Outcome::PassWith("integrated endpoint, no FLR".into()));
    };
    let real = std::fs::canonicalize(dev.sysfs()).context("resolve the sysfs path")?;
    let parent = real
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    ensure!(
        parent.as_deref() == Some(port.as_str()),
        "{} sits under {parent:?}, want the root port {port}",
        dev.bdf
    );
    let off = exp.context("no PCI Express capability behind a root port")?;
    let flags = config::u16_at(&cfg, off + 2).context("short Express capability")?;
    ensure!(
        (flags >> 4) & 0xf == EXP_TYPE_ENDPOINT,
        "device/port type {:#x}, want an endpoint",
        (flags >> 4) & 0xf
    );
    ensure!(flr, "no FLR in the device capabilities");
    let methods = std::fs::read_to_string(dev.sysfs().join("reset_method")).unwrap_or_default();
    ensure!(
        methods.split_whitespace().any(|m| m == "flr"),
        "the kernel's reset methods are {methods:?}, want flr among them"
    );
    Ok(Outcome::PassWith(format!(
        "behind {port}, FLR, reset methods: {}",
        methods.trim()
    )))
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
