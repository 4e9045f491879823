//! The control-path traits, shaped like the kernel's `vdpa_config_ops` and
//! named after the vhost-vdpa UAPI verbs so they can be grepped against
//! vhost-vdpa and Cloud Hypervisor.
//!
//! * [`VdpaOps`]: features, status, vrings, eventfds, config space.
//! * [`DmaMapper`]: IOVA mappings, an `unsafe` contract of its own.
//! * [`Doorbell`]: a lock-free handle for the kick path, usable from any thread.

use std::sync::Arc;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::types::{Iova, IovaRange, QueueIndex, VringAddrs};
use crate::Error;

/// What a backend can do beyond the mandatory operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackendCaps {
    /// Kicks signalled on an eventfd reach the device without a userspace
    /// thread (VFIO_DEVICE_IOEVENTFD, vhost-vdpa's kick fd).
    pub kick_eventfd: bool,
    /// Device interrupts are delivered straight to an eventfd.
    pub call_eventfd: bool,
    /// The device can be suspended and resumed.
    pub suspend: bool,
    /// Per-queue notification areas can be mapped.
    pub notification_area: bool,
}

/// Where a queue's doorbell lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NotifyArea {
    /// BAR holding the doorbell (for PCI backends).
    pub bar: u8,
    /// Offset of the doorbell in that BAR.
    pub offset: u64,
    /// Size of the doorbell register (2, or 4 with notification data).
    pub size: u64,
    /// Host virtual address of the doorbell when the BAR is mapped.
    pub host_addr: Option<usize>,
    /// Whether the doorbell's page holds nothing but this queue's doorbell,
    /// so that page can be handed to a guest (virtio-pci `page-per-vq`).
    pub page_exclusive: bool,
}

/// Every queue's doorbell in one host mapping of whole pages that hold
/// nothing but doorbells (no other virtio structure, no MSI-X table or
/// PBA), so a VMM can map them into its guest and the guest's kicks reach
/// the device without a VM exit.
///
/// The mapping stays valid for as long as the backend that reported it
/// lives; a VMM must remove it from its guest before dropping the backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NotifyPages {
    /// Host address of the first page (page-aligned).
    pub host_addr: usize,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// Offset of each queue's doorbell from `host_addr`, by queue index.
    pub doorbells: Vec<u64>,
}

/// Who raises an interrupt for what, as the backend programs MSI-X.
///
/// With enough vectors every queue and the config change get their own
/// vector, and each is routed straight to the eventfd given for it. With
/// fewer vectors, groups share one: the device then signals the eventfd of
/// the group's *first* member, and the consumer must treat that signal as
/// "any member of the group may have work" (see [`IrqPlan::groups`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IrqPlan {
    /// One entry per vector in use.
    pub groups: Vec<IrqGroup>,
}

/// One interrupt vector and what it signals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IrqGroup {
    /// MSI-X vector number.
    pub vector: u16,
    /// Whether configuration changes are signalled on this vector.
    pub config: bool,
    /// Queues signalled on this vector.
    pub queues: Vec<QueueIndex>,
}

impl IrqPlan {
    /// Whether any vector serves more than one source.
    pub fn is_shared(&self) -> bool {
        self.groups
            .iter()
            .any(|g| g.queues.len() + usize::from(g.config) > 1)
    }

    /// The group that signals queue `q`.
    pub fn group_of_queue(&self, q: QueueIndex) -> Option<&IrqGroup> {
        self.groups.iter().find(|g| g.queues.contains(&q))
    }

    /// The group that signals configuration changes.
    pub fn config_group(&self) -> Option<&IrqGroup> {
        self.groups.iter().find(|g| g.config)
    }

    /// Plan for `num_queues` queues on a device with `vectors` MSI-X
    /// vectors, the way Linux's virtio_pci falls back: one vector per queue
    /// plus config; else config alone and one vector shared by all queues;
    /// else everything on one vector; no vectors, no plan.
    pub fn for_vectors(num_queues: u16, vectors: u32) -> IrqPlan {
        let all: Vec<QueueIndex> = (0..num_queues).map(QueueIndex).collect();
        let groups = if vectors == 0 {
            Vec::new()
        } else if vectors > u32::from(num_queues) {
            let mut g = vec![IrqGroup {
                vector: 0,
                config: true,
                queues: Vec::new(),
            }];
            g.extend(all.iter().map(|&q| IrqGroup {
                vector: q.0 + 1,
                config: false,
                queues: vec![q],
            }));
            g
        } else if vectors >= 2 {
            vec![
                IrqGroup {
                    vector: 0,
                    config: true,
                    queues: Vec::new(),
                },
                IrqGroup {
                    vector: 1,
                    config: false,
                    queues: all,
                },
            ]
        } else {
            vec![IrqGroup {
                vector: 0,
                config: true,
                queues: all,
            }]
        };
        IrqPlan { groups }
    }
}

/// A handle that rings one queue's doorbell, usable from any thread without
/// locks, allocation or (when the BAR is mapped) system calls.
#[derive(Clone)]
pub struct Doorbell {
    inner: Arc<dyn RingDoorbell>,
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbell").finish_non_exhaustive()
    }
}

impl Doorbell {
    /// Wrap a doorbell implementation.
    pub fn new(inner: Arc<dyn RingDoorbell>) -> Self {
        Doorbell { inner }
    }

    /// Notify the device. `next` is the driver's next available index (and
    /// wrap counter for packed rings), used only when the device negotiated
    /// VIRTIO_F_NOTIFICATION_DATA.
    pub fn ring(&self, next: u32) -> Result<(), Error> {
        self.inner.ring(next)
    }
}

/// Implementation side of [`Doorbell`].
pub trait RingDoorbell: Send + Sync {
    /// Write the doorbell.
    fn ring(&self, next: u32) -> Result<(), Error>;
}

/// The vDPA control path.
///
/// Order of use, as vhost-vdpa and Cloud Hypervisor do it: read
/// [`device_features`](Self::device_features), `set_status(ACKNOWLEDGE |
/// DRIVER)`, [`set_driver_features`](Self::set_driver_features),
/// `set_status(.. | FEATURES_OK)`, per queue `set_vring_num`,
/// `set_vring_addr`, `set_vring_base`, `set_vring_kick`, `set_vring_call`,
/// `set_vring_enable`, then `set_status(.. | DRIVER_OK)`. `reset` goes back
/// to the beginning.
pub trait VdpaOps: Send {
    /// Virtio device id (1 = net, 2 = block, ...).
    fn device_id(&self) -> u32;
    /// Vendor id (PCI subsystem vendor for PCI devices).
    fn vendor_id(&self) -> u32;
    /// Features the device offers, after the provisioning mask.
    fn device_features(&self) -> u64;
    /// Features the device itself offers, before any provisioning mask.
    fn raw_device_features(&self) -> u64;
    /// Set the driver's features. Must be a subset of
    /// [`device_features`](Self::device_features) and include VERSION_1.
    fn set_driver_features(&mut self, features: u64) -> Result<(), Error>;
    /// The features last set with `set_driver_features`.
    fn driver_features(&self) -> u64;
    /// What this backend can do.
    fn backend_caps(&self) -> BackendCaps;
    /// Current device status.
    fn status(&mut self) -> Result<u8, Error>;
    /// Set device status. Setting FEATURES_OK reads it back and fails if the
    /// device refused the features; setting DRIVER_OK wires interrupts.
    /// Status 0 is a reset.
    fn set_status(&mut self, status: u8) -> Result<(), Error>;
    /// Reset the device (status 0) and wait, bounded, for it to finish.
    fn reset(&mut self) -> Result<(), Error>;
    /// Number of virtqueues the device has.
    fn num_queues(&self) -> u16;
    /// Largest ring size queue `q` accepts.
    fn vring_max_size(&mut self, q: QueueIndex) -> Result<u16, Error>;
    /// Set the ring size of queue `q` (1..=max, a power of two for split rings).
    fn set_vring_num(&mut self, q: QueueIndex, num: u16) -> Result<(), Error>;
    /// Set the ring addresses (IOVAs) of queue `q`.
    fn set_vring_addr(&mut self, q: QueueIndex, addrs: VringAddrs) -> Result<(), Error>;
    /// Set the initial available index. Virtio-pci can only start at 0.
    fn set_vring_base(&mut self, q: QueueIndex, base: u16) -> Result<(), Error>;
    /// Read the device's available index, where the transport offers it.
    fn vring_base(&mut self, q: QueueIndex) -> Result<u16, Error>;
    /// Enable or disable queue `q`. Virtio-pci cannot disable a queue once
    /// enabled except by a reset (or RING_RESET).
    fn set_vring_enable(&mut self, q: QueueIndex, enable: bool) -> Result<(), Error>;
    /// Whether queue `q` is enabled.
    fn vring_enabled(&mut self, q: QueueIndex) -> Result<bool, Error>;
    /// Attach (or detach with `None`) an eventfd whose signals kick queue
    /// `q` without a userspace hop. Fails with [`Error::Unsupported`] when
    /// the backend cannot do that (see [`BackendCaps::kick_eventfd`]).
    fn set_vring_kick(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<(), Error>;
    /// Attach (or detach) the eventfd signalled when queue `q` has used
    /// buffers. Takes effect at DRIVER_OK.
    fn set_vring_call(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<(), Error>;
    /// Attach (or detach) the eventfd signalled on configuration changes.
    fn set_config_call(&mut self, fd: Option<&EventFd>) -> Result<(), Error>;
    /// How interrupt vectors map to queues (see [`IrqPlan`]).
    fn irq_plan(&self) -> IrqPlan;
    /// Kick queue `q` now (a direct doorbell write).
    fn kick(&self, q: QueueIndex) -> Result<(), Error>;
    /// A thread-safe handle for kicking queue `q` from a relay thread.
    fn doorbell(&self, q: QueueIndex) -> Result<Doorbell, Error>;
    /// Where queue `q`'s doorbell is.
    fn notification_area(&self, q: QueueIndex) -> Result<NotifyArea, Error>;
    /// Every queue's doorbell as one mappable range of pages, when the
    /// backend has such a host mapping and those pages hold nothing else.
    fn notification_pages(&self) -> Option<NotifyPages> {
        None
    }
    /// Size of the device-specific configuration space.
    fn config_size(&self) -> usize;
    /// Read device config at `offset`, consistently (generation-checked).
    fn get_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Error>;
    /// Write device config at `offset`.
    fn set_config(&mut self, offset: u32, buf: &[u8]) -> Result<(), Error>;
    /// Current configuration generation.
    fn config_generation(&mut self) -> Result<u32, Error>;
}

/// IOVA mappings for device DMA.
pub trait DmaMapper {
    /// The range every mapping must lie in.
    fn iova_range(&self) -> IovaRange;

    /// Map `[host_addr, host_addr + size)` at `iova`.
    ///
    /// # Safety
    ///
    /// Until [`DmaMapper::dma_unmap`] succeeds for the same `iova` and
    /// `size`, or the mapper is dropped, the host range must stay mapped and
    /// must only be accessed through raw pointers (volatile or atomic
    /// operations) or handed to system calls, never through Rust references:
    /// the device may read and write it at any time. This is the contract of
    /// `vfio_ioctls::VfioOps::vfio_dma_map`.
    ///
    /// # Errors
    ///
    /// [`Error::IovaOutOfRange`] when the range does not lie in
    /// [`iova_range`](Self::iova_range); a backend error otherwise.
    unsafe fn dma_map(&self, iova: Iova, size: u64, host_addr: usize) -> Result<(), Error>;

    /// Remove the mapping at `iova`.
    fn dma_unmap(&self, iova: Iova, size: u64) -> Result<(), Error>;
}

/// Optional: suspend and resume the device (vhost-vdpa `VHOST_VDPA_SUSPEND`).
pub trait Suspend {
    /// Stop the device processing queues, keeping its state.
    fn suspend(&mut self) -> Result<(), Error>;
    /// Resume after [`Suspend::suspend`].
    fn resume(&mut self) -> Result<(), Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_plan_gives_each_queue_a_vector_when_enough() {
        let plan = IrqPlan::for_vectors(4, 5);
        assert!(!plan.is_shared());
        assert_eq!(plan.groups.len(), 5);
        assert_eq!(plan.group_of_queue(QueueIndex(3)).unwrap().vector, 4);
        assert_eq!(plan.config_group().unwrap().vector, 0);
    }

    #[test]
    fn irq_plan_shares_one_vector_for_queues_with_two_vectors() {
        let plan = IrqPlan::for_vectors(4, 2);
        assert!(plan.is_shared());
        let g = plan.group_of_queue(QueueIndex(2)).unwrap();
        assert_eq!(g.vector, 1);
        assert_eq!(g.queues.len(), 4);
        assert!(!g.config);
        assert_eq!(plan.config_group().unwrap().vector, 0);
    }

    #[test]
    fn irq_plan_puts_everything_on_one_vector_when_only_one() {
        let plan = IrqPlan::for_vectors(3, 1);
        assert_eq!(plan.groups.len(), 1);
        assert!(plan.groups[0].config);
        assert_eq!(plan.groups[0].queues.len(), 3);
        assert!(IrqPlan::for_vectors(3, 0).groups.is_empty());
    }
}
