//! The vhost-vdpa calls the `vhost` crate's wrappers lack, issued with the
//! crate's own ioctl numbers and argument types
//! (`vhost::vhost_kern::vhost_binding`):
//!
//! * detaching a kick, call or config eventfd (fd -1, `VHOST_FILE_UNBIND`):
//!   the wrappers take an `&EventFd` only;
//! * `VHOST_VDPA_RESUME`: neither wrapped nor numbered by the crate, so its
//!   number is defined here;
//! * reading the device id of a node without taking it over (the wrappers
//!   need an owned `VhostKernVdpa`);
//! * the notification-area page, mapped with `vm-memory`'s `MmapRegion`
//!   and written with its volatile accessors.

use std::os::fd::AsRawFd;

use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::vhost_binding::{
    vhost_vring_file, VHOST, VHOST_SET_VRING_CALL, VHOST_SET_VRING_KICK, VHOST_VDPA_GET_DEVICE_ID,
    VHOST_VDPA_SET_CONFIG_CALL,
};
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::volatile_memory::VolatileMemory;
use vm_memory::{FileOffset, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::ioctl_io_nr;

use super::{Result, VhostVdpaError};

// <linux/vhost.h>: _IO(VHOST_VIRTIO, 0x7E); not in vhost_binding.
ioctl_io_nr!(VHOST_VDPA_RESUME, VHOST, 0x7e);

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
    let f = vhost_vring_file {
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
    region: MmapRegion<()>,
}

impl NotifyPage {
    pub(super) fn map<AS: GuestAddressSpace>(dev: &VhostKernVdpa<AS>, queue: u16) -> Result<Self> {
        let sys_err = |op, source| VhostVdpaError::Sys { op, source };
        let page = crate::host::page_size();
        // The region keeps its own descriptor of the node (a duplicate).
        let fd = crate::host::dup_file(dev).map_err(|e| sys_err("dup of the vhost-vdpa fd", e))?;
        let len = usize::try_from(page).map_err(|_| {
            sys_err(
                "notify page size",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )
        })?;
        // vhost-vdpa refuses readable mappings of the notification area
        // (VM_READ): write-only, shared.
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(fd, u64::from(queue) * page))
            .with_mmap_prot(libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| sys_err("mmap(notification area)", std::io::Error::other(e)))?;
        Ok(NotifyPage { region })
    }

    pub(super) fn addr(&self) -> usize {
        self.region.as_ptr() as usize
    }

    pub(super) fn len(&self) -> usize {
        self.region.size()
    }

    /// Write the queue index to the doorbell at the start of the page (a
    /// single volatile 16-bit store).
    pub(super) fn write16(&self, v: u16) {
        if let Ok(r) = self.region.get_ref::<u16>(0) {
            r.store(v);
        }
    }

    /// Write a 32-bit notification (queue index and notification data) to
    /// the doorbell at the start of the page (a single volatile store).
    pub(super) fn write32(&self, v: u32) {
        if let Ok(r) = self.region.get_ref::<u32>(0) {
            r.store(v);
        }
    }
}
