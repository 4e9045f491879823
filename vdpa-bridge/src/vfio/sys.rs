//! The VFIO ioctls vfio-ioctls 0.7.0 does not offer (or offers only with
//! errors swallowed), plus the mapping of BAR areas (vm-memory's
//! `MmapRegion`). Every `unsafe` block of the VFIO backend is in this
//! file.
//!
//! Argument buffers are built by the safe, unit-tested functions of
//! [`super::layout`]; the wrappers here only hand them to the kernel.

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_device_ioeventfd, vfio_iommu_type1_info, VFIO_BASE, VFIO_TYPE,
};
use vfio_ioctls::VfioDevice;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::FileOffset;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ref};

// Request numbers, as <linux/vfio.h> defines them (_IO(VFIO_TYPE, VFIO_BASE + n)).
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, u32::from(VFIO_TYPE), VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, u32::from(VFIO_TYPE), VFIO_BASE + 10);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, u32::from(VFIO_TYPE), VFIO_BASE + 11);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, u32::from(VFIO_TYPE), VFIO_BASE + 12);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_IOEVENTFD, u32::from(VFIO_TYPE), VFIO_BASE + 16);

fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `VFIO_DEVICE_GET_INFO` on a device fd.
pub(crate) fn device_info(device: &impl AsRawFd) -> io::Result<vfio_device_info> {
    let mut info = vfio_device_info {
        argsz: size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: VFIO_DEVICE_GET_INFO reads `argsz` and writes at most `argsz`
    // bytes into the argument; `info` is a live, exclusively borrowed
    // vfio_device_info of exactly that size.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) })?;
    Ok(info)
}

/// `VFIO_DEVICE_RESET` on a device fd.
pub(crate) fn device_reset(device: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument and touches no user memory.
    check(unsafe { ioctl(device, VFIO_DEVICE_RESET()) })
}

/// `VFIO_DEVICE_SET_IRQS` with a buffer from [`super::layout::irq_set_words`].
pub(crate) fn set_irqs(device: &impl AsRawFd, words: &mut [u32]) -> io::Result<()> {
    let header_ok = words.len() >= 5 && words[0] as usize == size_of_val(words);
    if !header_ok {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `words` is a vfio_irq_set header (5 u32, the struct's size and
    // alignment, checked in layout.rs) followed by its data; the check above
    // makes argsz equal to the buffer length, and the kernel reads at most
    // argsz bytes (it never writes this argument).
    check(unsafe { ioctl_with_mut_ptr(device, VFIO_DEVICE_SET_IRQS(), words.as_mut_ptr()) })
}

/// `VFIO_DEVICE_IOEVENTFD` on a device fd.
pub(crate) fn device_ioeventfd(
    device: &impl AsRawFd,
    arg: &vfio_device_ioeventfd,
) -> io::Result<()> {
    if arg.argsz as usize != size_of::<vfio_device_ioeventfd>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the kernel reads one vfio_device_ioeventfd (argsz checked above
    // equal to its size) from a live reference and writes nothing back.
    check(unsafe { ioctl_with_ref(device, VFIO_DEVICE_IOEVENTFD(), arg) })
}

/// `VFIO_IOMMU_GET_INFO` on a container fd, capability chain included.
/// Returns the raw bytes (header then capabilities).
pub(crate) fn iommu_info(container: &impl AsRawFd) -> io::Result<Vec<u8>> {
    let header = size_of::<vfio_iommu_type1_info>();
    let mut info = vfio_iommu_type1_info {
        argsz: header as u32,
        ..Default::default()
    };
    // SAFETY: VFIO_IOMMU_GET_INFO writes at most `argsz` bytes into the
    // argument; `info` is an exclusively borrowed struct of exactly that size.
    check(unsafe { ioctl_with_mut_ref(container, VFIO_IOMMU_GET_INFO(), &mut info) })?;
    let need = (info.argsz as usize).max(header);
    // A u64 buffer keeps the 8-byte alignment of vfio_iommu_type1_info.
    let mut buf = vec![0u64; need.div_ceil(8)];
    let len = buf.len() * 8;
    // argsz is the first u32 of the struct: in the first u64, native endian.
    buf[0] = if cfg!(target_endian = "little") {
        len as u64
    } else {
        (len as u64) << 32
    };
    // SAFETY: `buf` is 8-byte aligned, `len` bytes long and exclusively
    // borrowed; argsz (its first u32) is `len`, so the kernel writes at most
    // that many bytes. Zeroed u64s are a valid vfio_iommu_type1_info prefix.
    check(unsafe { ioctl_with_mut_ptr(container, VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr()) })?;
    Ok(buf.iter().flat_map(|w| w.to_ne_bytes()).collect())
}

/// vfio-ioctls' `VfioDevice`, dropped safely.
///
/// `VfioDevice`'s drop looks up the device's `iommu_group` link in sysfs
/// and unwraps the result: if the host removed the device first, releasing
/// it panics inside the VMM. This wrapper drops it under `catch_unwind`;
/// the group it could not put back is released with the container, which
/// the caller drops next.
pub(crate) struct Device(ManuallyDrop<VfioDevice>);

impl Device {
    pub(crate) fn new(device: VfioDevice) -> Self {
        Device(ManuallyDrop::new(device))
    }
}

impl std::ops::Deref for Device {
    type Target = VfioDevice;

    fn deref(&self) -> &VfioDevice {
        &self.0
    }
}

impl AsRawFd for Device {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once, and `self.0` is not used after the take.
        let device = unsafe { ManuallyDrop::take(&mut self.0) };
        let released = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(device)));
        if released.is_err() {
            log::warn!(
                "releasing the VFIO device panicked in vfio-ioctls (its sysfs entry is gone?); \
                 its group is released with the container"
            );
        }
    }
}

/// A shared read-write mapping of `len` bytes of a device fd at `offset`
/// (page-aligned, checked by the caller through
/// [`super::layout::mmap_areas`]), made with vm-memory's `MmapRegion`
/// (unmapped on drop). The region holds its own duplicate of the fd.
pub(crate) fn map_region(file: &File, offset: u64, len: usize) -> io::Result<MmapRegion<()>> {
    let fd = file.try_clone()?;
    MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(fd, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .map_err(|e| match e {
            vm_memory::mmap::MmapRegionError::Mmap(io) => io,
            e => io::Error::other(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values of <linux/vfio.h> computed by hand: _IO(';', 100 + n) = 0x3b00 | (100 + n).
    #[test]
    fn request_numbers_match_linux_vfio_h() {
        assert_eq!(VFIO_DEVICE_GET_INFO(), 0x3b6b);
        assert_eq!(VFIO_DEVICE_SET_IRQS(), 0x3b6e);
        assert_eq!(VFIO_DEVICE_RESET(), 0x3b6f);
        assert_eq!(VFIO_IOMMU_GET_INFO(), 0x3b70);
        assert_eq!(VFIO_DEVICE_IOEVENTFD(), 0x3b74);
    }

    #[test]
    fn ioctls_on_a_non_vfio_fd_fail_with_enotty() {
        let f = File::open("/dev/null").unwrap();

        let info = device_info(&f).unwrap_err();
        let reset = device_reset(&f).unwrap_err();
        let iommu = iommu_info(&f).unwrap_err();

        assert_eq!(info.raw_os_error(), Some(libc::ENOTTY));
        assert_eq!(reset.raw_os_error(), Some(libc::ENOTTY));
        assert_eq!(iommu.raw_os_error(), Some(libc::ENOTTY));
    }

    #[test]
    fn set_irqs_and_ioeventfd_reach_the_kernel_only_with_a_consistent_argsz() {
        let f = File::open("/dev/null").unwrap();
        let mut good = super::super::layout::irq_set_words(1 | 32, 2, 0, &[]);
        let mut bad_argsz = good.clone();
        bad_argsz[0] = 4096;
        let arg =
            super::super::layout::ioeventfd_arg(0, 0, crate::pci::IoWidth::U16, 0, -1).unwrap();
        let bad_arg = vfio_device_ioeventfd { argsz: 8, ..arg };

        let sent = set_irqs(&f, &mut good).unwrap_err();
        let refused = set_irqs(&f, &mut bad_argsz).unwrap_err();
        let ioev = device_ioeventfd(&f, &arg).unwrap_err();
        let ioev_refused = device_ioeventfd(&f, &bad_arg).unwrap_err();

        assert_eq!(sent.raw_os_error(), Some(libc::ENOTTY));
        assert_eq!(refused.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(ioev.raw_os_error(), Some(libc::ENOTTY));
        assert_eq!(ioev_refused.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn mmap_of_a_regular_file_round_trips_through_drop() {
        let path = std::env::temp_dir().join(format!("vdpa-bridge-mmap-{}", std::process::id()));
        std::fs::write(&path, vec![0xa5u8; 4096]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();

        let m = map_region(&f, 0, 4096).unwrap();
        let zero = map_region(&f, 0, 0);

        assert!(!m.as_ptr().is_null());
        assert_eq!(m.size(), 4096);
        assert!(zero.is_err());
        drop(m);
        std::fs::remove_file(&path).unwrap();
    }
}
