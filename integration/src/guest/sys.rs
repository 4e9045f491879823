//! Guest-side access to sysfs and VFIO for the smoke cases: binding a
//! device to vfio-pci, and opening it through rust-vmm's `vfio-ioctls`
//! (a type1v2 container, the device's group attached to it, the device
//! fd, its region and IRQ infos).
//!
//! vdpa-bridge's own VFIO backend is deliberately not used: these cases
//! prove the lab (the vIOMMU, the kernel modules, QEMU's devices) on its
//! own, so a failure here points at the lab and not at the bridge. The
//! bridge uses `vfio-ioctls` too, for its container and group; what it
//! adds on top (its own ioctls, BAR mappings, the transport) is not used
//! here.
//!
//! # Own code where `vfio-ioctls` cannot serve
//! - Binding to vfio-pci: sysfs writes ([`bind_vfio_pci`]); the crate only
//!   opens devices that are bound already.
//! - Reading config space: `VfioDevice::region_read` returns `()`; a failed
//!   or out-of-range read is only logged and leaves the buffer as it was,
//!   so a case could not tell a read that failed from a device with wrong
//!   ids. [`VfioDevice::config_space`] takes the region's offset and size
//!   from the crate and reads them with `pread` on a duplicate of the
//!   device fd, with the error. The crate exposes the fd only through
//!   `AsRawFd`, so borrowing it to duplicate it is the one `unsafe` block
//!   of this module.
//! - Group viability: the crate keeps the group's status flags to itself
//!   and refuses a group that is not viable with `VfioError::GroupViable`;
//!   [`VfioDevice::open`] names the group in that error.

use std::fs::File;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_READ};
use vfio_ioctls::{VfioContainer, VfioError, VfioIrq, VfioOps};

/// Name of the driver the PCI device at `sysfs` is bound to, if any.
pub fn driver(sysfs: &Path) -> Option<String> {
    let link = std::fs::read_link(sysfs.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// IOMMU group number of the PCI device at `sysfs`.
///
/// # Errors
/// The device has no `iommu_group` link (no vIOMMU) or its name is odd.
pub fn iommu_group(sysfs: &Path) -> anyhow::Result<u32> {
    let link = std::fs::read_link(sysfs.join("iommu_group"))
        .with_context(|| format!("{} has no iommu_group (is the vIOMMU on?)", sysfs.display()))?;
    let name = link
        .file_name()
        .context("empty iommu_group link")?
        .to_string_lossy();
    name.parse()
        .with_context(|| format!("iommu group name {name:?}"))
}

/// `/dev/vfio/<group>` of the PCI device at `sysfs`.
///
/// # Errors
/// As [`iommu_group`].
pub fn vfio_group_node(sysfs: &Path) -> anyhow::Result<PathBuf> {
    Ok(Path::new("/dev/vfio").join(iommu_group(sysfs)?.to_string()))
}

fn write_attr(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("write {value:?} to {}", path.display()))
}

/// Bind the PCI device `bdf` to vfio-pci: unbind it from its driver, set
/// `driver_override`, ask the PCI core to probe it, then wait (up to 10 s)
/// until the driver link and `/dev/vfio/<group>` exist.
///
/// # Errors
/// A sysfs write fails or the device does not show up bound in time.
pub fn bind_vfio_pci(bdf: &str) -> anyhow::Result<PathBuf> {
    let sysfs = Path::new("/sys/bus/pci/devices").join(bdf);
    ensure!(sysfs.exists(), "no PCI device at {bdf}");
    if driver(&sysfs).as_deref() != Some("vfio-pci") {
        if driver(&sysfs).is_some() {
            write_attr(&sysfs.join("driver/unbind"), bdf)?;
        }
        write_attr(&sysfs.join("driver_override"), "vfio-pci")?;
        write_attr(Path::new("/sys/bus/pci/drivers_probe"), bdf)?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let bound = driver(&sysfs);
        let node = vfio_group_node(&sysfs)?;
        if bound.as_deref() == Some("vfio-pci") && node.exists() {
            return Ok(node);
        }
        if Instant::now() > deadline {
            bail!(
                "{bdf}: after binding, driver is {bound:?} and {} exists: {}",
                node.display(),
                node.exists()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A device opened through VFIO: a type1v2 container (API version and
/// extension checked by `vfio-ioctls`), the device's group attached to it
/// (viable, or the open fails) and the device fd. Dropping it closes all
/// three.
pub struct VfioDevice {
    device: vfio_ioctls::VfioDevice,
}

impl VfioDevice {
    /// Open the device at `bdf` (bound to vfio-pci) through its group.
    ///
    /// # Errors
    /// The container, the group or the device cannot be opened; the error
    /// is `vfio-ioctls`' (it names the step), and names the group when it
    /// is not viable.
    pub fn open(bdf: &str) -> anyhow::Result<Self> {
        let sysfs = Path::new("/sys/bus/pci/devices").join(bdf);
        let container = VfioContainer::new(None).context("open a VFIO type1v2 container")?;
        let ops: Arc<dyn VfioOps> = Arc::new(container);
        let device = vfio_ioctls::VfioDevice::new(&sysfs, ops).map_err(|e| match e {
            VfioError::GroupViable => {
                let group = iommu_group(&sysfs).map_or("?".into(), |g| g.to_string());
                // vfio-ioctls wants the status flags to be VIABLE alone.
                anyhow::anyhow!(
                    "IOMMU group {group} of {bdf} is not viable (or already in a container)"
                )
            }
            e => anyhow::Error::new(e).context(format!("open {bdf} through VFIO")),
        })?;
        Ok(Self { device })
    }

    /// VFIO's info of IRQ index `index` (e.g. MSI-X), as read at open.
    ///
    /// # Errors
    /// VFIO reported no such index.
    pub fn irq_info(&self, index: u32) -> anyhow::Result<VfioIrq> {
        self.device
            .get_irq_info(index)
            .copied()
            .with_context(|| format!("VFIO reports no IRQ index {index}"))
    }

    /// The whole PCI config space, read through the VFIO config region.
    ///
    /// `vfio-ioctls` lists regions by position, skipping only those whose
    /// info fails; vfio-pci answers for every BAR, the ROM and config
    /// space, so the config region's index is its position. The size and
    /// flag checks below catch a shift.
    ///
    /// # Errors
    /// The region is not a readable 64..=4096 bytes, or the read fails.
    pub fn config_space(&self) -> anyhow::Result<Vec<u8>> {
        let index = VFIO_PCI_CONFIG_REGION_INDEX;
        let size = self.device.get_region_size(index);
        let flags = self.device.get_region_flags(index);
        let offset = self.device.get_region_offset(index);
        ensure!(
            (64..=4096).contains(&size) && flags & VFIO_REGION_INFO_FLAG_READ != 0,
            "config region (index {index}): {size} bytes, flags {flags:#x}"
        );
        let mut buf = vec![0u8; size as usize];
        self.dup_device_fd()?
            .read_exact_at(&mut buf, offset)
            .with_context(|| format!("read the config region at {offset:#x}"))?;
        Ok(buf)
    }

    /// A new descriptor of the device fd, as a file.
    fn dup_device_fd(&self) -> anyhow::Result<File> {
        // SAFETY: `self.device` owns the descriptor and keeps it open for
        // as long as `self` lives; this borrow ends inside this function,
        // which holds `&self`, and the duplicate is a new descriptor.
        let fd = unsafe { BorrowedFd::borrow_raw(self.device.as_raw_fd()) };
        Ok(File::from(
            fd.try_clone_to_owned().context("dup the device fd")?,
        ))
    }
}

/// PCI config space, parsed just enough for the smoke cases.
pub mod config {
    /// Capability ID of a vendor-specific capability (virtio's).
    pub const CAP_ID_VNDR: u8 = 0x09;
    /// Capability ID of MSI-X.
    pub const CAP_ID_MSIX: u8 = 0x11;
    /// virtio `cfg_type` of the common configuration (virtio 1.2 section 4.1.4).
    pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;

    /// A little-endian u16 at `off`, or `None` past the end.
    pub fn u16_at(cfg: &[u8], off: usize) -> Option<u16> {
        Some(u16::from_le_bytes(
            cfg.get(off..off.checked_add(2)?)?.try_into().ok()?,
        ))
    }

    /// `(offset, cap id)` of every capability in the standard list, walking
    /// at most 48 hops (the device is untrusted input).
    pub fn capabilities(cfg: &[u8]) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let has_list = u16_at(cfg, 0x06).is_some_and(|s| s & 0x10 != 0);
        let mut ptr = if has_list {
            cfg.get(0x34).copied().unwrap_or(0)
        } else {
            0
        };
        for _ in 0..48 {
            let off = usize::from(ptr & !3);
            if off < 0x40 {
                break;
            }
            let (Some(&id), Some(&next)) = (cfg.get(off), cfg.get(off + 1)) else {
                break;
            };
            out.push((off, id));
            ptr = next;
        }
        out
    }

    /// The `cfg_type` of every virtio vendor capability.
    pub fn virtio_cfg_types(cfg: &[u8]) -> Vec<u8> {
        capabilities(cfg)
            .into_iter()
            .filter(|&(_, id)| id == CAP_ID_VNDR)
            .filter_map(|(off, _)| cfg.get(off + 3).copied())
            .collect()
    }

    /// MSI-X table size from the MSI-X capability's message control.
    pub fn msix_table_size(cfg: &[u8]) -> Option<u32> {
        let (off, _) = capabilities(cfg)
            .into_iter()
            .find(|&(_, id)| id == CAP_ID_MSIX)?;
        Some(u32::from(u16_at(cfg, off + 2)? & 0x7ff) + 1)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A config space with caps at 0x40 (vendor, common cfg) -> 0x50 (MSI-X, 4).
        fn sample() -> Vec<u8> {
            let mut c = vec![0u8; 256];
            c[0x06] = 0x10;
            c[0x34] = 0x40;
            c[0x40..0x44].copy_from_slice(&[CAP_ID_VNDR, 0x50, 16, VIRTIO_PCI_CAP_COMMON_CFG]);
            c[0x50..0x54].copy_from_slice(&[CAP_ID_MSIX, 0x00, 0x03, 0x00]);
            c
        }

        #[test]
        fn walk_finds_virtio_and_msix_caps() {
            let c = sample();

            assert_eq!(virtio_cfg_types(&c), [VIRTIO_PCI_CAP_COMMON_CFG]);
            assert_eq!(msix_table_size(&c), Some(4));
        }

        #[test]
        fn looping_capability_list_stops_after_48_hops() {
            let mut c = sample();
            c[0x51] = 0x40;

            assert_eq!(capabilities(&c).len(), 48);
        }

        #[test]
        fn no_capability_list_bit_means_no_caps() {
            let mut c = sample();
            c[0x06] = 0;

            assert!(capabilities(&c).is_empty());
        }
    }
}
