//! Backend over a kernel vDPA device's `/dev/vhost-vdpa-N` node (vp_vdpa, a
//! vendor vDPA driver, VDUSE), through the `vhost` crate's vhost-vdpa
//! wrappers.
//!
//! The kernel owns the data path here: kick eventfds and call eventfds are
//! handed to it and it forwards kicks and signals the consumer's eventfd
//! itself. Ring addresses and DMA mappings are IOVAs in the device's IOTLB.
//!
//! The `vhost` crate's wrappers are used where they are right; the few
//! calls it lacks or gets wrong are issued here in `sys`: detaching a kick
//! or call eventfd (fd -1), `VHOST_VDPA_RESUME`, and the notification-area
//! mmap. (Its `set_group_asid` issues the GET ioctl; we do not use it.)

mod sys;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::VhostKernFeatures;
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device_path::is_vhost_vdpa_path;
use crate::ops::{
    provision, BackendCaps, ConfigRange, DmaMapper, Doorbell, DriverFeatures, IrqPlan, NotifyArea,
    OpsError, RingDoorbell, VdpaOps,
};
use crate::types::{features, status, Iova, IovaRange, QueueIndex, VringAddrs};

use sys::NotifyPage;

/// Errors of the vhost-vdpa backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostVdpaError {
    /// A refusal every backend makes (bad queue, features, range...).
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// Opening the device node failed.
    #[error("cannot open {path}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// The path is not a vhost-vdpa character device.
    #[error("{0} is not a /dev/vhost-vdpa-N node")]
    NotVhostVdpa(PathBuf),
    /// A vhost-vdpa ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// A raw system call failed.
    #[error("{op} failed")]
    Sys {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The device reported something unusable.
    #[error("device reports {0}")]
    BadDevice(String),
    /// A descriptor handed in is owned by a process already (vhost lets
    /// one process own a device file, until the file is closed).
    #[error("the vhost-vdpa descriptor handed in for {0} is in use (owned by a process already); hand in a descriptor that nothing has used")]
    Owned(PathBuf),
}

/// Result of the vhost-vdpa backend.
pub type Result<T> = std::result::Result<T, VhostVdpaError>;

fn ioctl(op: &'static str) -> impl FnOnce(vhost::Error) -> VhostVdpaError {
    move |source| VhostVdpaError::Ioctl { op, source }
}

/// vhost backend feature bits (`VHOST_BACKEND_F_*`).
pub mod backend_features {
    /// IOTLB messages in the v2 format.
    pub const IOTLB_MSG_V2: u64 = 1 << 1;
    /// Batched IOTLB updates.
    pub const IOTLB_BATCH: u64 = 1 << 2;
    /// Address-space ids in IOTLB messages.
    pub const IOTLB_ASID: u64 = 1 << 3;
    /// `VHOST_VDPA_SUSPEND` / `VHOST_VDPA_RESUME`.
    pub const SUSPEND: u64 = 1 << 4;
    /// Resume is supported.
    pub const RESUME: u64 = 1 << 5;
}

type NoMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// A kernel vDPA device opened through its vhost-vdpa node.
pub struct VhostVdpaDevice {
    vdpa: VhostKernVdpa<NoMem>,
    path: PathBuf,
    device_id: u32,
    raw_features: u64,
    offered: u64,
    driver_features: u64,
    backend_features: u64,
    num_queues: u16,
    max_size: u16,
    sizes: Vec<u16>,
    config_size: usize,
    iova_range: IovaRange,
    notify: Vec<Option<Arc<NotifyPage>>>,
}

impl std::fmt::Debug for VhostVdpaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostVdpaDevice")
            .field("path", &self.path)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// The virtio device id behind the vhost-vdpa node `node`, without taking
/// the device over (open, `VHOST_VDPA_GET_DEVICE_ID`, close). A node in use
/// answers EBUSY.
///
/// # Errors
///
/// Opening the node or the ioctl failed.
pub fn probe_device_id(node: &Path) -> std::io::Result<u32> {
    sys::probe_device_id(node)
}

impl VhostVdpaDevice {
    /// Open `path`, take ownership, negotiate backend features, read the
    /// device's identity and reset it. `features_mask` works as for
    /// [`crate::vp_vdpa::OpenOptions`].
    pub fn open(path: &Path, features_mask: Option<u64>) -> Result<Self> {
        if !is_vhost_vdpa_path(path) {
            return Err(VhostVdpaError::NotVhostVdpa(path.to_owned()));
        }
        let s = path.to_string_lossy();
        let vdpa = VhostKernVdpa::new(&s, GuestMemoryAtomic::new(GuestMemoryMmap::new())).map_err(
            |source| VhostVdpaError::Open {
                path: path.to_owned(),
                source,
            },
        )?;
        vdpa.set_owner().map_err(ioctl("VHOST_SET_OWNER"))?;
        Self::set_up(vdpa, path, features_mask)
    }

    /// Take over a vhost-vdpa device from a descriptor an orchestrator
    /// opened and handed in (the device takes `fd`; pass a duplicate to
    /// keep the original). `name` is for messages (the node it was opened
    /// from); nothing is opened. Otherwise as [`Self::open`]. The device
    /// may be opened again from (a duplicate of) the same descriptor once
    /// it is dropped, in this process: a reboot of the VM.
    ///
    /// # Errors
    ///
    /// [`VhostVdpaError::Owned`] when a process owns the descriptor's
    /// device already; then as [`Self::open`].
    pub fn from_fd(fd: OwnedFd, name: &Path, features_mask: Option<u64>) -> Result<Self> {
        let vdpa = VhostKernVdpa::with(
            std::fs::File::from(fd),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            0,
        );
        match vdpa.set_owner() {
            Ok(()) => {}
            Err(vhost::Error::IoctlError(e)) if e.raw_os_error() == Some(libc::EBUSY) => {
                // Owned already: by this process when a device was opened
                // from the same descriptor before (a reboot of the VM; the
                // kernel gives ownership up only when the file is closed,
                // and vhost-vdpa has no VHOST_RESET_OWNER before Linux
                // 6.13), or by another. Vring ioctls pass the kernel's
                // owner check only for the owner (EPERM otherwise), so a
                // harmless one tells which.
                // (Only EPERM says "not the owner": past the owner check
                // a parent without get_vq_state answers EOPNOTSUPP.)
                if let Err(vhost::Error::IoctlError(e)) = vdpa.get_vring_base(0) {
                    if e.raw_os_error() == Some(libc::EPERM) {
                        return Err(VhostVdpaError::Owned(name.to_owned()));
                    }
                }
                log::info!(
                    "{}: the descriptor handed in is this process's already (opened before): used again",
                    name.display()
                );
            }
            Err(vhost::Error::IoctlError(e)) if e.raw_os_error() == Some(libc::ENOTTY) => {
                return Err(VhostVdpaError::NotVhostVdpa(name.to_owned()));
            }
            Err(e) => return Err(ioctl("VHOST_SET_OWNER")(e)),
        }
        Self::set_up(vdpa, name, features_mask)
    }

    /// What [`Self::open`] and [`Self::from_fd`] share once the device is
    /// owned: backend features, identity, queues, doorbells, reset.
    fn set_up(
        mut vdpa: VhostKernVdpa<NoMem>,
        path: &Path,
        features_mask: Option<u64>,
    ) -> Result<Self> {
        let offered_backend = vdpa
            .get_backend_features()
            .map_err(ioctl("VHOST_GET_BACKEND_FEATURES"))?;
        let want = backend_features::IOTLB_MSG_V2
            | backend_features::IOTLB_BATCH
            | backend_features::SUSPEND
            | backend_features::RESUME;
        let backend = offered_backend & want;
        vdpa.set_backend_features(backend)
            .map_err(ioctl("VHOST_SET_BACKEND_FEATURES"))?;
        vdpa.set_backend_features_acked(backend);
        let device_id = vdpa
            .get_device_id()
            .map_err(ioctl("VHOST_VDPA_GET_DEVICE_ID"))?;
        let raw = vdpa.get_features().map_err(ioctl("VHOST_GET_FEATURES"))?;
        let offered = provision(raw, features_mask)?;
        let nq = vdpa
            .get_vqs_count()
            .map_err(ioctl("VHOST_VDPA_GET_VQS_COUNT"))?;
        let num_queues = u16::try_from(nq)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| VhostVdpaError::BadDevice(format!("{nq} virtqueues")))?;
        let max_size = vdpa
            .get_vring_num()
            .map_err(ioctl("VHOST_VDPA_GET_VRING_NUM"))?;
        if max_size == 0 {
            return Err(VhostVdpaError::BadDevice(
                "a maximum queue size of 0".into(),
            ));
        }
        let config_size = vdpa
            .get_config_size()
            .map_err(ioctl("VHOST_VDPA_GET_CONFIG_SIZE"))? as usize;
        let r = vdpa
            .get_iova_range()
            .map_err(ioctl("VHOST_VDPA_GET_IOVA_RANGE"))?;
        if r.last < r.first {
            return Err(VhostVdpaError::BadDevice(format!(
                "an empty IOVA range {:#x}..{:#x}",
                r.first, r.last
            )));
        }
        let mut notify = Vec::with_capacity(usize::from(num_queues));
        for q in 0..num_queues {
            notify.push(NotifyPage::map(&vdpa, q).ok().map(Arc::new));
        }
        let mut dev = VhostVdpaDevice {
            vdpa,
            path: path.to_owned(),
            device_id,
            raw_features: raw,
            offered,
            driver_features: 0,
            backend_features: backend,
            num_queues,
            max_size,
            sizes: vec![0; usize::from(num_queues)],
            config_size,
            iova_range: IovaRange {
                first: r.first,
                last: r.last,
            },
            notify,
        };
        dev.reset()?;
        Ok(dev)
    }

    /// The node's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Backend features acked with the kernel.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    fn check_queue(&self, q: QueueIndex) -> Result<usize> {
        if q.0 < self.num_queues {
            Ok(usize::from(q.0))
        } else {
            Err(OpsError::InvalidQueue(q).into())
        }
    }
}

struct PageDoorbell {
    page: Arc<NotifyPage>,
    queue: u16,
    /// VIRTIO_F_NOTIFICATION_DATA was negotiated: each notification is a
    /// 32-bit write carrying the driver's next position.
    data: bool,
}

impl RingDoorbell for PageDoorbell {
    fn ring(&self, next: u32) -> std::io::Result<()> {
        if self.data {
            // virtio 1.2 section 4.1.5.2: vqn in bits 0..16, next_off and
            // next_wrap above.
            self.page.write32(u32::from(self.queue) | (next << 16));
        } else {
            self.page.write16(self.queue);
        }
        Ok(())
    }
}

impl VdpaOps for VhostVdpaDevice {
    type Error = VhostVdpaError;

    fn device_id(&self) -> u32 {
        self.device_id
    }

    fn vendor_id(&self) -> u32 {
        // vhost-vdpa has no vendor id ioctl (the kernel's get_vendor_id is
        // not exported); 0 says "unknown".
        0
    }

    fn device_features(&self) -> u64 {
        self.offered
    }

    fn raw_device_features(&self) -> u64 {
        self.raw_features
    }

    fn write_driver_features(&mut self, f: DriverFeatures) -> Result<()> {
        let f = f.bits();
        self.vdpa
            .set_features(f)
            .map_err(ioctl("VHOST_SET_FEATURES"))?;
        self.driver_features = f;
        Ok(())
    }

    fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn backend_caps(&self) -> BackendCaps {
        BackendCaps {
            kick_eventfd: true,
            call_eventfd: true,
            suspend: self.backend_features & (backend_features::SUSPEND | backend_features::RESUME)
                == backend_features::SUSPEND | backend_features::RESUME,
            notification_area: self.notify.iter().any(Option::is_some),
        }
    }

    fn suspend(&mut self) -> Result<()> {
        if self.backend_features & backend_features::SUSPEND == 0 {
            return Err(OpsError::Unsupported("suspend").into());
        }
        self.vdpa.suspend().map_err(ioctl("VHOST_VDPA_SUSPEND"))
    }

    fn resume(&mut self) -> Result<()> {
        if self.backend_features & backend_features::RESUME == 0 {
            return Err(OpsError::Unsupported("resume").into());
        }
        sys::resume(&self.vdpa)
    }

    fn status(&mut self) -> Result<u8> {
        self.vdpa
            .get_status()
            .map_err(ioctl("VHOST_VDPA_GET_STATUS"))
    }

    fn set_status(&mut self, s: u8) -> Result<()> {
        if s == 0 {
            return self.reset();
        }
        self.vdpa
            .set_status(s)
            .map_err(ioctl("VHOST_VDPA_SET_STATUS"))?;
        // The kernel refuses silently in some drivers: read back.
        let now = self.status()?;
        if s & status::FEATURES_OK != 0 && now & status::FEATURES_OK == 0 {
            return Err(OpsError::FeaturesRefused(self.driver_features).into());
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        // Status 0 only. The kernel keeps the kick and call eventfds across
        // a reset, and so do we: a reset runs where the guest asks for it
        // (a VMM's vCPU thread, whose filter in Cloud Hypervisor allows
        // VHOST_VDPA_SET_STATUS but not the vring fd ioctls); a reset
        // device neither takes kicks nor signals, the next activation
        // replaces or detaches them (`set_vring_kick`/`_call(None)`), and
        // closing the node releases them.
        self.vdpa
            .set_status(0)
            .map_err(ioctl("VHOST_VDPA_SET_STATUS(0)"))?;
        self.driver_features = 0;
        self.sizes.iter_mut().for_each(|s| *s = 0);
        Ok(())
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn vring_max_size(&mut self, q: QueueIndex) -> Result<u16> {
        self.check_queue(q)?;
        Ok(self.max_size)
    }

    fn set_vring_num(&mut self, q: QueueIndex, num: u16) -> Result<()> {
        let i = self.check_queue(q)?;
        let packed = self.driver_features & features::bit(features::RING_PACKED) != 0;
        if num == 0 || num > self.max_size || (!packed && !num.is_power_of_two()) {
            return Err(OpsError::InvalidQueueSize {
                queue: q,
                size: num,
                max: self.max_size,
            }
            .into());
        }
        self.vdpa
            .set_vring_num(i, num)
            .map_err(ioctl("VHOST_SET_VRING_NUM"))?;
        self.sizes[i] = num;
        Ok(())
    }

    fn set_vring_addr(&mut self, q: QueueIndex, a: VringAddrs) -> Result<()> {
        let i = self.check_queue(q)?;
        let size = self.sizes[i];
        if size == 0 {
            return Err(OpsError::BadState {
                op: "set_vring_addr before set_vring_num",
                status: 0,
            }
            .into());
        }
        let cfg = VringConfigData {
            queue_max_size: self.max_size,
            queue_size: size,
            flags: 0,
            desc_table_addr: a.desc,
            used_ring_addr: a.device,
            avail_ring_addr: a.driver,
            log_addr: None,
        };
        // The inherent method: addresses are IOVAs, not translated.
        self.vdpa
            .set_vring_addr(i, &cfg)
            .map_err(ioctl("VHOST_SET_VRING_ADDR"))
    }

    fn set_vring_base(&mut self, q: QueueIndex, base: u16) -> Result<()> {
        let i = self.check_queue(q)?;
        self.vdpa
            .set_vring_base(i, base)
            .map_err(ioctl("VHOST_SET_VRING_BASE"))
    }

    fn vring_base(&mut self, q: QueueIndex) -> Result<u16> {
        let i = self.check_queue(q)?;
        let b = self
            .vdpa
            .get_vring_base(i)
            .map_err(ioctl("VHOST_GET_VRING_BASE"))?;
        Ok(b as u16)
    }

    fn set_vring_enable(&mut self, q: QueueIndex, enable: bool) -> Result<()> {
        let i = self.check_queue(q)?;
        self.vdpa
            .set_vring_enable(i, enable)
            .map_err(ioctl("VHOST_VDPA_SET_VRING_ENABLE"))
    }

    fn vring_enabled(&mut self, q: QueueIndex) -> Result<bool> {
        self.check_queue(q)?;
        Err(
            OpsError::Unsupported("reading a vring's enable state (vhost-vdpa has no such ioctl)")
                .into(),
        )
    }

    fn set_vring_kick(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<()> {
        self.check_queue(q)?;
        sys::set_vring_fd(&self.vdpa, sys::VringFd::Kick, q.0, fd)
    }

    fn set_vring_call(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<()> {
        self.check_queue(q)?;
        sys::set_vring_fd(&self.vdpa, sys::VringFd::Call, q.0, fd)
    }

    fn set_config_call(&mut self, fd: Option<&EventFd>) -> Result<()> {
        sys::set_config_call(&self.vdpa, fd)
    }

    fn irq_plan(&self) -> IrqPlan {
        // The kernel signals each queue's and the config's eventfd itself.
        IrqPlan::for_vectors(self.num_queues, u32::from(self.num_queues) + 1)
    }

    fn kick(&self, q: QueueIndex) -> Result<()> {
        if self.driver_features & features::bit(features::NOTIFICATION_DATA) != 0 {
            return Err(OpsError::Unsupported(
                "kick without data when VIRTIO_F_NOTIFICATION_DATA is negotiated; use doorbell()",
            )
            .into());
        }
        let i = self.check_queue(q)?;
        match &self.notify[i] {
            Some(page) => {
                page.write16(q.0);
                Ok(())
            }
            None => Err(OpsError::Unsupported(
                "direct doorbell writes (the vDPA device exposes no notification area)",
            )
            .into()),
        }
    }

    fn doorbell(&self, q: QueueIndex) -> Result<Doorbell> {
        let i = self.check_queue(q)?;
        match &self.notify[i] {
            Some(page) => Ok(Doorbell::new(Arc::new(PageDoorbell {
                page: page.clone(),
                queue: q.0,
                data: self.driver_features & features::bit(features::NOTIFICATION_DATA) != 0,
            }))),
            None => Err(OpsError::Unsupported("direct doorbell writes (the vDPA device exposes no notification area; use a kick eventfd)").into()),
        }
    }

    fn notification_area(&self, q: QueueIndex) -> Result<NotifyArea> {
        let i = self.check_queue(q)?;
        match &self.notify[i] {
            Some(page) => Ok(NotifyArea {
                bar: 0,
                offset: 0,
                size: page.len() as u64,
                host_addr: Some(page.addr()),
                // The kernel maps exactly this queue's doorbell page.
                page_exclusive: true,
            }),
            None => Err(OpsError::Unsupported("notification area").into()),
        }
    }

    fn config_size(&self) -> usize {
        self.config_size
    }

    fn read_device_config(&mut self, range: ConfigRange, buf: &mut [u8]) -> Result<()> {
        self.vdpa
            .get_config(range.offset(), buf)
            .map_err(ioctl("VHOST_VDPA_GET_CONFIG"))
    }

    fn write_device_config(&mut self, range: ConfigRange, buf: &[u8]) -> Result<()> {
        self.vdpa
            .set_config(range.offset(), buf)
            .map_err(ioctl("VHOST_VDPA_SET_CONFIG"))
    }

    fn config_generation(&mut self) -> Result<u32> {
        Err(OpsError::Unsupported(
            "config generation (vhost-vdpa reads config atomically in the kernel)",
        )
        .into())
    }
}

impl DmaMapper for VhostVdpaDevice {
    type Error = VhostVdpaError;

    fn iova_range(&self) -> IovaRange {
        self.iova_range
    }

    unsafe fn dma_map(&self, iova: Iova, size: u64, host_addr: usize) -> Result<()> {
        self.iova_range.check(iova.0, size)?;
        self.vdpa
            .dma_map(iova.0, size, host_addr as *const u8, false)
            .map_err(ioctl("IOTLB update"))
    }

    fn dma_unmap(&self, iova: Iova, size: u64) -> Result<()> {
        self.vdpa
            .dma_unmap(iova.0, size)
            .map_err(ioctl("IOTLB invalidate"))
    }
}

impl Drop for VhostVdpaDevice {
    fn drop(&mut self) {
        if let Err(e) = self.reset() {
            log::warn!("{}: reset on close failed: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_node_or_a_wrong_path_is_a_clear_error() {
        let e = VhostVdpaDevice::open(Path::new("/dev/null"), None).unwrap_err();
        assert!(matches!(e, VhostVdpaError::NotVhostVdpa(_)));
        let e = VhostVdpaDevice::open(Path::new("/nonexistent/vhost-vdpa-9"), None).unwrap_err();
        assert!(matches!(e, VhostVdpaError::Open { .. }), "{e:?}");
    }
}
