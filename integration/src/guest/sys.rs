//! Guest-side access to sysfs and VFIO for the smoke cases: binding a
//! device to vfio-pci and a few raw VFIO ioctls on the group, container and
//! device fds. The only `unsafe` code of the crate lives here.
//!
//! vdpa-bridge's own VFIO backend is deliberately not used: these cases
//! prove the lab (the vIOMMU, the kernel modules, QEMU's devices) on its
//! own, so a failure here points at the lab and not at the bridge.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use vfio_bindings::bindings::vfio::{
    vfio_group_status, vfio_irq_info, vfio_region_info, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION,
    VFIO_BASE, VFIO_GROUP_FLAGS_VIABLE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_TYPE,
};

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

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`, the encoding of every VFIO ioctl
/// (linux/vfio.h: they pass `argsz` inside the struct, not in the number).
const fn vfio_io(n: u32) -> libc::c_ulong {
    ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE + n) as libc::c_ulong
}

const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const VFIO_DEVICE_GET_IRQ_INFO: libc::c_ulong = vfio_io(9);

/// Turn an ioctl return value into a result naming the ioctl.
fn check(op: &'static str, ret: libc::c_int) -> anyhow::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error()).with_context(|| format!("ioctl {op}"))
    } else {
        Ok(ret)
    }
}

/// A device opened through VFIO: a type1v2 container, the device's group
/// attached to it, and the device fd. Dropping it closes all three.
pub struct VfioDevice {
    /// `/dev/vfio/vfio`.
    _container: File,
    /// `/dev/vfio/<group>`.
    _group: File,
    /// The device fd from `VFIO_GROUP_GET_DEVICE_FD`.
    device: OwnedFd,
    /// Whether the group was viable before it was attached.
    pub group_viable: bool,
}

impl VfioDevice {
    /// Open the device at `bdf` (bound to vfio-pci) through its group.
    ///
    /// # Errors
    /// An open or ioctl fails; the error names the ioctl. A non-viable group
    /// is an error too (the kernel refuses `VFIO_GROUP_SET_CONTAINER`).
    pub fn open(bdf: &str) -> anyhow::Result<Self> {
        let sysfs = Path::new("/sys/bus/pci/devices").join(bdf);
        let rw = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .with_context(|| format!("open {}", p.display()))
        };
        let container = rw(Path::new("/dev/vfio/vfio"))?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns an int.
        let api = check("VFIO_GET_API_VERSION", unsafe {
            libc::ioctl(container.as_raw_fd(), VFIO_GET_API_VERSION)
        })?;
        ensure!(
            api == VFIO_API_VERSION as libc::c_int,
            "VFIO API version {api}, want {VFIO_API_VERSION}"
        );
        // SAFETY: VFIO_CHECK_EXTENSION takes the extension number by value and
        // returns an int; no memory is passed.
        let type1v2 = check("VFIO_CHECK_EXTENSION", unsafe {
            libc::ioctl(
                container.as_raw_fd(),
                VFIO_CHECK_EXTENSION,
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        })?;
        ensure!(type1v2 == 1, "container lacks the type1v2 IOMMU");

        let group = rw(&vfio_group_node(&sysfs)?)?;
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: VFIO_GROUP_GET_STATUS writes a `vfio_group_status` (8 bytes,
        // size given in argsz) into `status`, which is a live, exclusive
        // borrow of exactly that type.
        check("VFIO_GROUP_GET_STATUS", unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                VFIO_GROUP_GET_STATUS,
                &mut status as *mut vfio_group_status,
            )
        })?;
        let group_viable = status.flags & VFIO_GROUP_FLAGS_VIABLE != 0;
        ensure!(
            group_viable,
            "group of {bdf} not viable (flags {:#x})",
            status.flags
        );
        let container_fd: libc::c_int = container.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one `int` (the container fd)
        // from the pointer, which points at a live local of that type.
        check("VFIO_GROUP_SET_CONTAINER", unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                VFIO_GROUP_SET_CONTAINER,
                &container_fd as *const libc::c_int,
            )
        })?;
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value; no memory is passed.
        check("VFIO_SET_IOMMU", unsafe {
            libc::ioctl(
                container.as_raw_fd(),
                VFIO_SET_IOMMU,
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        })?;
        let name = CString::new(bdf).context("BDF with a NUL byte")?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated string from
        // the pointer; `name` is one and outlives the call. It returns a new fd.
        let fd = check("VFIO_GROUP_GET_DEVICE_FD", unsafe {
            libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD, name.as_ptr())
        })?;
        // SAFETY: `fd` was just returned by the kernel as a new descriptor that
        // nothing else owns.
        let device = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            _container: container,
            _group: group,
            device,
            group_viable,
        })
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`.
    ///
    /// # Errors
    /// The ioctl fails.
    pub fn region_info(&self, index: u32) -> anyhow::Result<vfio_region_info> {
        let mut info = vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_REGION_INFO reads `argsz`/`index` and writes
        // at most `argsz` (32) bytes of `vfio_region_info` into `info`, a live,
        // exclusive borrow of that type.
        check("VFIO_DEVICE_GET_REGION_INFO", unsafe {
            libc::ioctl(
                self.device.as_raw_fd(),
                VFIO_DEVICE_GET_REGION_INFO,
                &mut info as *mut vfio_region_info,
            )
        })?;
        Ok(info)
    }

    /// `VFIO_DEVICE_GET_IRQ_INFO` for IRQ index `index` (e.g. MSI-X).
    ///
    /// # Errors
    /// The ioctl fails.
    pub fn irq_info(&self, index: u32) -> anyhow::Result<vfio_irq_info> {
        let mut info = vfio_irq_info {
            argsz: std::mem::size_of::<vfio_irq_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_IRQ_INFO reads `argsz`/`index` and writes at
        // most `argsz` (16) bytes of `vfio_irq_info` into `info`, a live,
        // exclusive borrow of that type.
        check("VFIO_DEVICE_GET_IRQ_INFO", unsafe {
            libc::ioctl(
                self.device.as_raw_fd(),
                VFIO_DEVICE_GET_IRQ_INFO,
                &mut info as *mut vfio_irq_info,
            )
        })?;
        Ok(info)
    }

    /// The whole PCI config space, read through the VFIO config region.
    ///
    /// # Errors
    /// The region info ioctl or the read fails, or the region is smaller
    /// than a PCI header.
    pub fn config_space(&self) -> anyhow::Result<Vec<u8>> {
        let info = self.region_info(VFIO_PCI_CONFIG_REGION_INDEX)?;
        ensure!(
            (64..=4096).contains(&info.size),
            "config region size {}",
            info.size
        );
        let mut buf = vec![0u8; info.size as usize];
        let file = File::from(self.device.try_clone().context("dup device fd")?);
        file.read_exact_at(&mut buf, info.offset)
            .with_context(|| format!("read config region at {:#x}", info.offset))?;
        Ok(buf)
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
