//! The vhost-vdpa calls the `vhost` crate lacks, as small wrappers.

use std::os::fd::AsRawFd;

use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr};

use super::{Result, VhostVdpaError};

const VHOST: u32 = 0xaf;

/// `struct vhost_vring_file` (linux/vhost_types.h).
#[repr(C)]
struct VringFile {
    index: u32,
    fd: i32,
}

ioctl_iow_nr!(VHOST_SET_VRING_KICK, VHOST, 0x20, VringFile);
ioctl_iow_nr!(VHOST_SET_VRING_CALL, VHOST, 0x21, VringFile);
ioctl_iow_nr!(VHOST_VDPA_SET_CONFIG_CALL, VHOST, 0x77, i32);
ioctl_io_nr!(VHOST_VDPA_RESUME, VHOST, 0x7e);
vmm_sys_util::ioctl_ior_nr!(VHOST_VDPA_GET_DEVICE_ID, VHOST, 0x70, u32);

/// The virtio device id behind a vhost-vdpa node, without taking it over
/// (open, one ioctl, close). A node in use answers EBUSY.
pub(super) fn probe_device_id(node: &std::path::Path) -> std::io::Result<u32> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(node)?;
    let mut id: u32 = 0;
    // SAFETY: `f` is an open vhost-vdpa fd; the kernel writes one u32
    // into `id`, which lives across the call; the result is checked.
    let r =
        unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&f, VHOST_VDPA_GET_DEVICE_ID(), &mut id) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(id)
}

/// Which per-vring eventfd.
#[derive(Clone, Copy)]
pub(super) enum VringFd {
    Kick,
    Call,
}

fn sys(op: &'static str) -> VhostVdpaError {
    VhostVdpaError::Sys {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Attach `fd` as queue `q`'s kick or call eventfd, or detach with `None`
/// (fd -1, `VHOST_FILE_UNBIND`), which the `vhost` crate cannot express.
pub(super) fn set_vring_fd<AS: GuestAddressSpace>(
    dev: &VhostKernVdpa<AS>,
    which: VringFd,
    q: u16,
    fd: Option<&EventFd>,
) -> Result<()> {
    let f = VringFile {
        index: u32::from(q),
        fd: fd.map_or(-1, |e| e.as_raw_fd()),
    };
    let (req, op) = match which {
        VringFd::Kick => (VHOST_SET_VRING_KICK(), "VHOST_SET_VRING_KICK"),
        VringFd::Call => (VHOST_SET_VRING_CALL(), "VHOST_SET_VRING_CALL"),
    };
    // SAFETY: `dev` is an open vhost-vdpa fd, `f` is a valid
    // vhost_vring_file the kernel only reads, and the result is checked.
    let r = unsafe { ioctl_with_ref(dev, req, &f) };
    if r < 0 {
        return Err(sys(op));
    }
    Ok(())
}

/// Attach or detach (`None`) the config-change eventfd.
pub(super) fn set_config_call<AS: GuestAddressSpace>(
    dev: &VhostKernVdpa<AS>,
    fd: Option<&EventFd>,
) -> Result<()> {
    let raw: i32 = fd.map_or(-1, |e| e.as_raw_fd());
    // SAFETY: `dev` is an open vhost-vdpa fd, `raw` is an int the kernel
    // only reads, and the result is checked.
    let r = unsafe { ioctl_with_ref(dev, VHOST_VDPA_SET_CONFIG_CALL(), &raw) };
    if r < 0 {
        return Err(sys("VHOST_VDPA_SET_CONFIG_CALL"));
    }
    Ok(())
}

/// `VHOST_VDPA_RESUME` (not wrapped by the `vhost` crate).
pub(super) fn resume<AS: GuestAddressSpace>(dev: &VhostKernVdpa<AS>) -> Result<()> {
    // SAFETY: `dev` is an open vhost-vdpa fd; the ioctl takes no argument
    // and its result is checked.
    let r = unsafe { ioctl(dev, VHOST_VDPA_RESUME()) };
    if r < 0 {
        return Err(sys("VHOST_VDPA_RESUME"));
    }
    Ok(())
}

/// One queue's doorbell page, mmap-ed from the vhost-vdpa fd at page
/// `queue` (the kernel maps the device's notify page for that queue).
pub(super) struct NotifyPage {
    addr: usize,
    len: usize,
}

impl NotifyPage {
    pub(super) fn map<AS: GuestAddressSpace>(dev: &VhostKernVdpa<AS>, queue: u16) -> Result<Self> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let len = usize::try_from(page).map_err(|_| sys("sysconf(PAGESIZE)"))?;
        let off = libc::off_t::try_from(u64::from(queue) * len as u64)
            .map_err(|_| sys("notify page offset"))?;
        // SAFETY: a fresh shared mapping of one page of the device fd; the
        // kernel validates the offset (queue index) and refuses devices
        // without a notification area. The result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_WRITE,
                libc::MAP_SHARED,
                dev.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys("mmap(notification area)"));
        }
        Ok(NotifyPage {
            addr: p as usize,
            len,
        })
    }

    pub(super) fn addr(&self) -> usize {
        self.addr
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Write the queue index to the doorbell at the start of the page.
    pub(super) fn write16(&self, v: u16) {
        // SAFETY: `addr` is a live, writable, page-aligned mapping of `len`
        // (>= 2) bytes owned by `self`; a volatile store is how MMIO is
        // written.
        unsafe { std::ptr::write_volatile(self.addr as *mut u16, v) };
    }

    /// Write a 32-bit notification (queue index and notification data) to
    /// the doorbell at the start of the page.
    pub(super) fn write32(&self, v: u32) {
        // SAFETY: `addr` is a live, writable, page-aligned (so 4-byte
        // aligned) mapping of `len` (>= 4) bytes owned by `self`; a volatile
        // store is how MMIO is written.
        unsafe { std::ptr::write_volatile(self.addr as *mut u32, v) };
    }
}

impl Drop for NotifyPage {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `map`, once.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
