//! [`AnyDevice`]: every way of claiming a device, behind one type.
//!
//! The CLI and Cloud Hypervisor's adapter open devices by path; this enum
//! dispatches statically (no trait objects on the control path) to the
//! VFIO-claimed PCI function or a kernel vDPA device. Test doubles (the
//! emulated device of `vdpa-testkit`, the `fake` module) are not variants:
//! code that runs them is generic over [`VdpaOps`].

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::device_path::DevicePath;
use crate::ops::{
    BackendCaps, ConfigRange, DmaMapper, Doorbell, DriverFeatures, IrqPlan, NotifyArea,
    NotifyPages, VdpaOps,
};
use crate::pci::PciFunction;
use crate::types::{Iova, IovaRange, QueueIndex, VringAddrs};
use crate::vfio::{SharedContainer, VfioFunction, VfioOptions};
use crate::vhost_vdpa::VhostVdpaDevice;
use crate::vp_vdpa::{OpenOptions, VpVdpa};
use crate::Result;

/// A descriptor an orchestrator opened for a device and handed in, so
/// that the process opening the device needs no access to `/dev/vfio` or
/// `/dev/vhost-vdpa-*` (nor sysfs).
#[derive(Debug)]
pub enum Handed {
    /// The VFIO group (`/dev/vfio/N`) of a PCI function bound to vfio-pci,
    /// not attached to a container.
    VfioGroup {
        /// The descriptor.
        fd: OwnedFd,
        /// What to call it in messages (how the user gave it, e.g.
        /// `group_fd=5`).
        name: String,
    },
    /// A `/dev/vhost-vdpa-N` node, opened and not used yet.
    VhostVdpa(OwnedFd),
}

/// A device opened by any backend.
// One value per device, created once and never moved on a hot path: the
// size difference between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum AnyDevice {
    /// A PCI function claimed through VFIO, driven by our transport.
    Vfio(VpVdpa<VfioFunction>),
    /// A kernel vDPA device through its `/dev/vhost-vdpa-N` node.
    VhostVdpa(VhostVdpaDevice),
}

impl std::fmt::Debug for AnyDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl AnyDevice {
    /// Open `path`, as [`DevicePath::parse`] reads it: a `/dev/vhost-vdpa-N`
    /// node, or a PCI address / sysfs path of a function bound to vfio-pci.
    ///
    /// # Errors
    ///
    /// [`Error::BadPath`](crate::Error::BadPath) when `path` names neither;
    /// the backend's error when opening fails.
    pub fn open(path: &str, opts: OpenOptions) -> Result<AnyDevice> {
        Self::open_in(path, opts, None)
    }

    /// Open `path` as [`AnyDevice::open`] does; a PCI function goes into
    /// `container` when one is given (shared with the VM's other bridged
    /// functions), into a container of its own otherwise. A vhost-vdpa
    /// node has its own address space in the kernel and ignores it.
    ///
    /// # Errors
    ///
    /// As [`AnyDevice::open`].
    pub fn open_in(
        path: &str,
        opts: OpenOptions,
        container: Option<&SharedContainer>,
    ) -> Result<AnyDevice> {
        match DevicePath::parse(path)? {
            DevicePath::VhostVdpa(node) => Ok(AnyDevice::VhostVdpa(VhostVdpaDevice::open(
                Path::new(&node),
                opts.features_mask,
            )?)),
            // The path as given: a sysfs path is resolved through its links.
            DevicePath::Pci(_) => {
                let f = match container {
                    Some(c) => VfioFunction::open_in(path, c, &VfioOptions::default())?,
                    None => VfioFunction::open(path)?,
                };
                Ok(AnyDevice::Vfio(VpVdpa::open(Arc::new(f), opts)?))
            }
        }
    }

    /// Open the device `path` names from the descriptor `handed` (nothing
    /// is opened by path, and sysfs is not read): `path` is a PCI address
    /// for [`Handed::VfioGroup`], the node's path (for messages) for
    /// [`Handed::VhostVdpa`]. A PCI function goes into `container` when
    /// one is given (it may itself have been handed in,
    /// [`SharedContainer::from_fd`]), into a new container of its own
    /// otherwise: the one thing then opened, `/dev/vfio/vfio`, which is
    /// world-accessible on common distributions.
    ///
    /// # Errors
    ///
    /// [`Error::BadPath`](crate::Error::BadPath) when `path` does not name
    /// the kind of device `handed` is; the backend's error when opening
    /// fails.
    pub fn open_handed(
        path: &str,
        handed: Handed,
        opts: OpenOptions,
        container: Option<&SharedContainer>,
    ) -> Result<AnyDevice> {
        match (DevicePath::parse(path)?, handed) {
            (DevicePath::VhostVdpa(node), Handed::VhostVdpa(fd)) => Ok(AnyDevice::VhostVdpa(
                VhostVdpaDevice::from_fd(fd, Path::new(&node), opts.features_mask)?,
            )),
            (DevicePath::Pci(bdf), Handed::VfioGroup { fd, name }) => {
                let own;
                let container = match container {
                    Some(c) => c,
                    None => {
                        own = SharedContainer::new()?;
                        &own
                    }
                };
                let f =
                    VfioFunction::open_handed(&bdf, fd, &name, container, &VfioOptions::default())?;
                Ok(AnyDevice::Vfio(VpVdpa::open(Arc::new(f), opts)?))
            }
            _ => Err(crate::device_path::BadDevicePath(format!(
                "{path} (not the kind of device the descriptor handed in is for)"
            ))
            .into()),
        }
    }

    /// Backend name: `vfio` or `vhost-vdpa`.
    pub fn backend_name(&self) -> &'static str {
        match self {
            AnyDevice::Vfio(_) => "vfio",
            AnyDevice::VhostVdpa(_) => "vhost-vdpa",
        }
    }

    /// A description for logs.
    pub fn describe(&self) -> String {
        match self {
            AnyDevice::Vfio(d) => d.transport().function().describe(),
            AnyDevice::VhostVdpa(d) => format!("vhost-vdpa {}", d.path().display()),
        }
    }
}

macro_rules! each {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            AnyDevice::Vfio($d) => $e,
            AnyDevice::VhostVdpa($d) => $e,
        }
    };
}

impl VdpaOps for AnyDevice {
    type Error = crate::Error;

    fn device_id(&self) -> u32 {
        each!(self, d => d.device_id())
    }
    fn vendor_id(&self) -> u32 {
        each!(self, d => d.vendor_id())
    }
    fn device_features(&self) -> u64 {
        each!(self, d => d.device_features())
    }
    fn raw_device_features(&self) -> u64 {
        each!(self, d => d.raw_device_features())
    }
    fn write_driver_features(&mut self, features: DriverFeatures) -> Result<()> {
        each!(self, d => Ok(d.write_driver_features(features)?))
    }
    fn driver_features(&self) -> u64 {
        each!(self, d => d.driver_features())
    }
    fn backend_caps(&self) -> BackendCaps {
        each!(self, d => d.backend_caps())
    }
    fn status(&mut self) -> Result<u8> {
        each!(self, d => Ok(d.status()?))
    }
    fn set_status(&mut self, status: u8) -> Result<()> {
        each!(self, d => Ok(d.set_status(status)?))
    }
    fn reset(&mut self) -> Result<()> {
        each!(self, d => Ok(d.reset()?))
    }
    fn suspend(&mut self) -> Result<()> {
        each!(self, d => Ok(d.suspend()?))
    }
    fn resume(&mut self) -> Result<()> {
        each!(self, d => Ok(d.resume()?))
    }
    fn num_queues(&self) -> u16 {
        each!(self, d => d.num_queues())
    }
    fn vring_max_size(&mut self, q: QueueIndex) -> Result<u16> {
        each!(self, d => Ok(d.vring_max_size(q)?))
    }
    fn set_vring_num(&mut self, q: QueueIndex, num: u16) -> Result<()> {
        each!(self, d => Ok(d.set_vring_num(q, num)?))
    }
    fn set_vring_addr(&mut self, q: QueueIndex, addrs: VringAddrs) -> Result<()> {
        each!(self, d => Ok(d.set_vring_addr(q, addrs)?))
    }
    fn set_vring_base(&mut self, q: QueueIndex, base: u16) -> Result<()> {
        each!(self, d => Ok(d.set_vring_base(q, base)?))
    }
    fn vring_base(&mut self, q: QueueIndex) -> Result<u16> {
        each!(self, d => Ok(d.vring_base(q)?))
    }
    fn set_vring_enable(&mut self, q: QueueIndex, enable: bool) -> Result<()> {
        each!(self, d => Ok(d.set_vring_enable(q, enable)?))
    }
    fn vring_enabled(&mut self, q: QueueIndex) -> Result<bool> {
        each!(self, d => Ok(d.vring_enabled(q)?))
    }
    fn set_vring_kick(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<()> {
        each!(self, d => Ok(d.set_vring_kick(q, fd)?))
    }
    fn set_vring_call(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<()> {
        each!(self, d => Ok(d.set_vring_call(q, fd)?))
    }
    fn set_config_call(&mut self, fd: Option<&EventFd>) -> Result<()> {
        each!(self, d => Ok(d.set_config_call(fd)?))
    }
    fn irq_plan(&self) -> IrqPlan {
        each!(self, d => d.irq_plan())
    }
    fn kick(&self, q: QueueIndex) -> Result<()> {
        each!(self, d => Ok(d.kick(q)?))
    }
    fn doorbell(&self, q: QueueIndex) -> Result<Doorbell> {
        each!(self, d => Ok(d.doorbell(q)?))
    }
    fn notification_area(&self, q: QueueIndex) -> Result<NotifyArea> {
        each!(self, d => Ok(d.notification_area(q)?))
    }
    fn notification_pages(&self) -> Option<NotifyPages> {
        each!(self, d => d.notification_pages())
    }
    fn config_size(&self) -> usize {
        each!(self, d => d.config_size())
    }
    fn read_device_config(&mut self, range: ConfigRange, buf: &mut [u8]) -> Result<()> {
        each!(self, d => Ok(d.read_device_config(range, buf)?))
    }
    fn write_device_config(&mut self, range: ConfigRange, buf: &[u8]) -> Result<()> {
        each!(self, d => Ok(d.write_device_config(range, buf)?))
    }
    fn config_generation(&mut self) -> Result<u32> {
        each!(self, d => Ok(d.config_generation()?))
    }
    fn removal_request(&self) -> Option<&EventFd> {
        each!(self, d => d.removal_request())
    }
}

impl DmaMapper for AnyDevice {
    type Error = crate::Error;

    fn iova_range(&self) -> IovaRange {
        each!(self, d => d.iova_range())
    }
    unsafe fn dma_map(&self, iova: Iova, size: u64, host_addr: usize) -> Result<()> {
        // SAFETY: the caller upholds `DmaMapper::dma_map`'s contract, which
        // is the same for every variant.
        each!(self, d => Ok(unsafe { d.dma_map(iova, size, host_addr) }?))
    }
    unsafe fn dma_map_top(
        &self,
        size: u64,
        host_addr: usize,
        align: u64,
        floor: u64,
    ) -> Result<Iova> {
        // SAFETY: as in dma_map.
        each!(self, d => Ok(unsafe { d.dma_map_top(size, host_addr, align, floor) }?))
    }
    fn dma_unmap(&self, iova: Iova, size: u64) -> Result<()> {
        each!(self, d => Ok(d.dma_unmap(iova, size)?))
    }
}
