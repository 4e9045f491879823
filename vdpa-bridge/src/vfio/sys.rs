//! The VFIO ioctls of the legacy container/group interface, on any
//! descriptor (opened here or handed in), plus the mapping of BAR areas
//! (vm-memory's `MmapRegion`). Every `unsafe` block of the VFIO backend is
//! in this file.
//!
//! vfio-ioctls 0.7.0 has wrappers for most of these, but only on the
//! container and group files it opens itself (`/dev/vfio/vfio`,
//! `/dev/vfio/N` found through sysfs): it cannot adopt a group or
//! container fd that an orchestrator opened and handed to an unprivileged
//! VMM (its `new_from_fd` takes a cdev fd and needs iommufd). Hence these
//! few wrappers, which serve both the opened and the handed-in case.
//!
//! Argument buffers are built by the safe, unit-tested functions of
//! [`super::layout`]; the wrappers here only hand them to the kernel.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_device_ioeventfd, vfio_group_status, vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap, vfio_iommu_type1_info, vfio_irq_info, vfio_region_info,
    VFIO_TYPE1v2_IOMMU, VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_TYPE,
};
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::FileOffset;
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};

// Request numbers, as <linux/vfio.h> defines them (_IO(VFIO_TYPE, VFIO_BASE + n)).
vmm_sys_util::ioctl_io_nr!(VFIO_GET_API_VERSION, u32::from(VFIO_TYPE), VFIO_BASE);
vmm_sys_util::ioctl_io_nr!(VFIO_CHECK_EXTENSION, u32::from(VFIO_TYPE), VFIO_BASE + 1);
vmm_sys_util::ioctl_io_nr!(VFIO_SET_IOMMU, u32::from(VFIO_TYPE), VFIO_BASE + 2);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_STATUS, u32::from(VFIO_TYPE), VFIO_BASE + 3);
vmm_sys_util::ioctl_io_nr!(
    VFIO_GROUP_SET_CONTAINER,
    u32::from(VFIO_TYPE),
    VFIO_BASE + 4
);
vmm_sys_util::ioctl_io_nr!(
    VFIO_GROUP_UNSET_CONTAINER,
    u32::from(VFIO_TYPE),
    VFIO_BASE + 5
);
vmm_sys_util::ioctl_io_nr!(
    VFIO_GROUP_GET_DEVICE_FD,
    u32::from(VFIO_TYPE),
    VFIO_BASE + 6
);
vmm_sys_util::ioctl_io_nr!(
    VFIO_DEVICE_GET_REGION_INFO,
    u32::from(VFIO_TYPE),
    VFIO_BASE + 8
);
vmm_sys_util::ioctl_io_nr!(
    VFIO_DEVICE_GET_IRQ_INFO,
    u32::from(VFIO_TYPE),
    VFIO_BASE + 9
);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, u32::from(VFIO_TYPE), VFIO_BASE + 13);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, u32::from(VFIO_TYPE), VFIO_BASE + 14);
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

/// The return value of an ioctl that answers with a number.
fn value(ret: i32) -> io::Result<u32> {
    check(ret)?;
    Ok(ret as u32)
}

/// `VFIO_GET_API_VERSION` on a container fd.
pub(crate) fn api_version(container: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: VFIO_GET_API_VERSION takes no argument and touches no user memory.
    value(unsafe { ioctl(container, VFIO_GET_API_VERSION()) })
}

/// `VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU)` on a container fd: 1 when
/// the container can be (or is) a type1v2 one.
pub(crate) fn has_type1v2(container: &impl AsRawFd) -> io::Result<bool> {
    // SAFETY: VFIO_CHECK_EXTENSION takes its argument by value and touches
    // no user memory.
    let r = unsafe {
        ioctl_with_val(
            container,
            VFIO_CHECK_EXTENSION(),
            libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
        )
    };
    Ok(value(r)? == 1)
}

/// `VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU)` on a container with a group.
pub(crate) fn set_iommu_type1v2(container: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: VFIO_SET_IOMMU takes its argument by value and touches no user
    // memory.
    check(unsafe {
        ioctl_with_val(
            container,
            VFIO_SET_IOMMU(),
            libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
        )
    })
}

/// `VFIO_GROUP_GET_STATUS`: the group's flags (`VFIO_GROUP_FLAGS_*`).
pub(crate) fn group_status(group: &impl AsRawFd) -> io::Result<u32> {
    let mut st = vfio_group_status {
        argsz: size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: the kernel writes at most argsz bytes into `st`, an
    // exclusively borrowed vfio_group_status of exactly that size.
    check(unsafe { ioctl_with_mut_ref(group, VFIO_GROUP_GET_STATUS(), &mut st) })?;
    Ok(st.flags)
}

/// `VFIO_GROUP_SET_CONTAINER`: attach `group` to `container`.
pub(crate) fn group_set_container(
    group: &impl AsRawFd,
    container: &impl AsRawFd,
) -> io::Result<()> {
    let fd: i32 = container.as_raw_fd();
    // SAFETY: the kernel reads one int (the container fd) from a live
    // reference and writes nothing back.
    check(unsafe { ioctl_with_ref(group, VFIO_GROUP_SET_CONTAINER(), &fd) })
}

/// `VFIO_GROUP_UNSET_CONTAINER`: detach `group` from its container (EBUSY
/// while a device fd of the group is open).
pub(crate) fn group_unset_container(group: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: VFIO_GROUP_UNSET_CONTAINER takes no argument.
    check(unsafe { ioctl(group, VFIO_GROUP_UNSET_CONTAINER()) })
}

/// `VFIO_GROUP_GET_DEVICE_FD` for the device named `name` (its PCI
/// address): a new descriptor, close-on-exec.
pub(crate) fn group_device_fd(group: &impl AsRawFd, name: &str) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the kernel reads a NUL-terminated string from `name`, which
    // lives across the call, and writes nothing back.
    let fd = unsafe { ioctl_with_ptr(group, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
    check(fd)?;
    // SAFETY: on success the ioctl returned a new descriptor that nothing
    // else owns (vfio opens it O_CLOEXEC).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `VFIO_DEVICE_GET_REGION_INFO` for `index`, capability chain included:
/// the raw reply (a `vfio_region_info` then its capabilities), for
/// [`super::layout::region_info`].
pub(crate) fn region_info(device: &impl AsRawFd, index: u32) -> io::Result<Vec<u8>> {
    let header = size_of::<vfio_region_info>();
    let mut info = vfio_region_info {
        argsz: header as u32,
        index,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most argsz bytes into `info`, an
    // exclusively borrowed vfio_region_info of exactly that size.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_REGION_INFO(), &mut info) })?;
    if (info.argsz as usize) <= header {
        let mut out = Vec::with_capacity(header);
        out.extend_from_slice(&info.argsz.to_ne_bytes());
        out.extend_from_slice(&info.flags.to_ne_bytes());
        out.extend_from_slice(&info.index.to_ne_bytes());
        out.extend_from_slice(&info.cap_offset.to_ne_bytes());
        out.extend_from_slice(&info.size.to_ne_bytes());
        out.extend_from_slice(&info.offset.to_ne_bytes());
        return Ok(out);
    }
    // The capabilities need more room: ask again with the size the kernel
    // gave (bounded: a region's chain is a few areas, not megabytes).
    let need = (info.argsz as usize).min(1 << 20);
    let mut buf = vec![0u64; need.div_ceil(8)];
    let len = buf.len() * 8;
    let head = vfio_region_info {
        argsz: len as u32,
        index,
        ..Default::default()
    };
    // SAFETY: `buf` is 8-byte aligned (vfio_region_info's alignment) and
    // at least `header` bytes long; the header is written as one plain
    // struct into its start.
    unsafe { std::ptr::write(buf.as_mut_ptr().cast::<vfio_region_info>(), head) };
    // SAFETY: `buf` is exclusively borrowed and `len` bytes long; argsz
    // (set to `len` above) bounds what the kernel writes.
    check(unsafe { ioctl_with_mut_ptr(device, VFIO_DEVICE_GET_REGION_INFO(), buf.as_mut_ptr()) })?;
    Ok(buf.iter().flat_map(|w| w.to_ne_bytes()).collect())
}

/// `VFIO_DEVICE_GET_IRQ_INFO` for `index`: its number of vectors.
pub(crate) fn irq_count(device: &impl AsRawFd, index: u32) -> io::Result<u32> {
    let mut info = vfio_irq_info {
        argsz: size_of::<vfio_irq_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most argsz bytes into `info`, an
    // exclusively borrowed vfio_irq_info of exactly that size.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_IRQ_INFO(), &mut info) })?;
    Ok(info.count)
}

/// `VFIO_IOMMU_MAP_DMA`: map `size` bytes at `vaddr` to `iova`, read-write.
///
/// # Safety
///
/// The contract of [`crate::PciFunction::dma_map`]: the memory stays
/// mapped and is used only through raw pointers until it is unmapped.
pub(crate) unsafe fn map_dma(
    container: &impl AsRawFd,
    iova: u64,
    size: u64,
    vaddr: u64,
) -> io::Result<()> {
    let arg = vfio_iommu_type1_dma_map {
        argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr,
        iova,
        size,
    };
    // SAFETY: the kernel reads one vfio_iommu_type1_dma_map from a live
    // reference; what it maps is the caller's contract.
    check(unsafe { ioctl_with_ref(container, VFIO_IOMMU_MAP_DMA(), &arg) })
}

/// `VFIO_IOMMU_UNMAP_DMA` of exactly `[iova, iova + size)`.
pub(crate) fn unmap_dma(container: &impl AsRawFd, iova: u64, size: u64) -> io::Result<()> {
    let mut arg = vfio_iommu_type1_dma_unmap {
        argsz: size_of::<vfio_iommu_type1_dma_unmap>() as u32,
        flags: 0,
        iova,
        size,
        data: Default::default(),
    };
    // SAFETY: the kernel reads the struct and writes back `size` (the
    // bytes unmapped) into the exclusively borrowed `arg`, no further
    // than argsz (no flags ask for a bitmap).
    check(unsafe { ioctl_with_mut_ref(container, VFIO_IOMMU_UNMAP_DMA(), &mut arg) })
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
        assert_eq!(VFIO_GET_API_VERSION(), 0x3b64);
        assert_eq!(VFIO_CHECK_EXTENSION(), 0x3b65);
        assert_eq!(VFIO_SET_IOMMU(), 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS(), 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER(), 0x3b68);
        assert_eq!(VFIO_GROUP_UNSET_CONTAINER(), 0x3b69);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD(), 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO(), 0x3b6c);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO(), 0x3b6d);
        assert_eq!(VFIO_IOMMU_MAP_DMA(), 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA(), 0x3b72);
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
        for e in [
            api_version(&f).unwrap_err(),
            has_type1v2(&f).unwrap_err(),
            set_iommu_type1v2(&f).unwrap_err(),
            group_status(&f).unwrap_err(),
            group_set_container(&f, &f).unwrap_err(),
            group_unset_container(&f).unwrap_err(),
            group_device_fd(&f, "0000:00:04.0").unwrap_err(),
            region_info(&f, 0).unwrap_err(),
            irq_count(&f, 0).unwrap_err(),
            unmap_dma(&f, 0, 4096).unwrap_err(),
        ] {
            assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
        }
        let nul = group_device_fd(&f, "0000:00\0:04.0").unwrap_err();
        assert_eq!(nul.raw_os_error(), Some(libc::EINVAL));
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
