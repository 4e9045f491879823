//! The control-path traits, shaped like the kernel's `vdpa_config_ops` and
//! named after the vhost-vdpa UAPI verbs so they can be grepped against
//! vhost-vdpa and Cloud Hypervisor.
//!
//! * [`VdpaOps`]: features, status, vrings, eventfds, config space.
//! * [`DmaMapper`]: IOVA mappings, an `unsafe` contract of its own.
//! * [`Doorbell`]: a lock-free handle for the kick path, usable from any thread.
//!
//! This is the bottom of the crate's layering: it names no backend. Each
//! backend has an error type of its own ([`VdpaOps::Error`]) into which
//! the refusals every backend shares ([`OpsError`]) convert. Those shared
//! checks are made once, here: a config access is checked against
//! [`VdpaOps::config_size`] by [`VdpaOps::get_config`] /
//! [`VdpaOps::set_config`] (backends implement the access with a checked
//! [`ConfigRange`]), driver features against
//! [`VdpaOps::device_features`] by [`VdpaOps::set_driver_features`]
//! (backends get a checked [`DriverFeatures`]), and a provisioning mask by
//! [`provision`].

use std::sync::Arc;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::types::{features, Iova, IovaRange, QueueIndex, VringAddrs};

/// What any backend refuses, whatever it is: the trait-level half of every
/// backend's error type.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A queue index past the device's queues.
    #[error("queue {0} does not exist")]
    InvalidQueue(QueueIndex),
    /// A ring size of 0, above the maximum or (split rings) not a power of two.
    #[error("queue {queue}: size {size} is invalid (max {max})")]
    InvalidQueueSize {
        /// Queue.
        queue: QueueIndex,
        /// Size asked for.
        size: u16,
        /// Device maximum.
        max: u16,
    },
    /// Driver features that the device does not offer.
    #[error("driver features {requested:#x} are not a subset of device features {offered:#x}")]
    FeaturesNotOffered {
        /// Requested features.
        requested: u64,
        /// Offered features.
        offered: u64,
    },
    /// The device cleared FEATURES_OK: it refused the driver's features.
    #[error("device refused features {0:#x} (FEATURES_OK not kept)")]
    FeaturesRefused(u64),
    /// The device does not offer VIRTIO_F_VERSION_1.
    #[error("device does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// A provisioning mask that removes a feature the bridge requires.
    #[error("feature mask {mask:#x} removes required feature bit {bit}")]
    MaskRemovesRequired {
        /// The mask.
        mask: u64,
        /// The required bit.
        bit: u32,
    },
    /// An IOVA range outside what the device can address.
    #[error("IOVA range {iova:#x} (+{size:#x}) is outside {first:#x}..={last:#x}")]
    IovaOutOfRange {
        /// Start of the requested mapping.
        iova: u64,
        /// Size of the requested mapping.
        size: u64,
        /// First usable IOVA.
        first: u64,
        /// Last usable IOVA.
        last: u64,
    },
    /// A config access outside the device-specific config space.
    #[error("config access at {offset:#x} (+{len}) is past config size {size:#x}")]
    ConfigOutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Config space size.
        size: usize,
    },
    /// An operation that needs a state the device is not in.
    #[error("{op} is not allowed in device status {status:#x}")]
    BadState {
        /// The operation.
        op: &'static str,
        /// Current status.
        status: u8,
    },
    /// Ring addresses not aligned as the ring layout requires.
    #[error("queue {queue}: ring addresses {addrs:x?} are misaligned")]
    MisalignedRing {
        /// Queue.
        queue: QueueIndex,
        /// The addresses.
        addrs: VringAddrs,
    },
    /// The backend cannot do this.
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
}

/// A device-config access checked against the device's config size: the
/// only way to reach [`VdpaOps::read_device_config`] and
/// [`VdpaOps::write_device_config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigRange {
    offset: u32,
    len: usize,
}

impl ConfigRange {
    /// Check that `[offset, offset + len)` lies inside a config space of
    /// `size` bytes.
    ///
    /// # Errors
    ///
    /// [`OpsError::ConfigOutOfRange`] otherwise (overflow included).
    pub fn new(offset: u64, len: usize, size: usize) -> Result<Self, OpsError> {
        let err = || OpsError::ConfigOutOfRange { offset, len, size };
        let end = offset.checked_add(len as u64).ok_or_else(err)?;
        if end > size as u64 {
            return Err(err());
        }
        let offset = u32::try_from(offset).map_err(|_| err())?;
        Ok(ConfigRange { offset, len })
    }

    /// Offset of the access in the device config.
    pub fn offset(&self) -> u32 {
        self.offset
    }

    /// Length of the access.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the access is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Driver features checked to be a subset of what the device offers: what
/// [`VdpaOps::write_driver_features`] is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverFeatures(u64);

impl DriverFeatures {
    /// Check that `requested` is a subset of `offered`.
    ///
    /// # Errors
    ///
    /// [`OpsError::FeaturesNotOffered`] otherwise.
    pub fn new(requested: u64, offered: u64) -> Result<Self, OpsError> {
        if requested & !offered != 0 {
            return Err(OpsError::FeaturesNotOffered { requested, offered });
        }
        Ok(DriverFeatures(requested))
    }

    /// The feature bits.
    pub fn bits(self) -> u64 {
        self.0
    }
}

impl IovaRange {
    /// Check that `[iova, iova + size)` is non-empty and lies inside the
    /// range.
    ///
    /// # Errors
    ///
    /// [`OpsError::IovaOutOfRange`] otherwise.
    pub fn check(&self, iova: u64, size: u64) -> Result<(), OpsError> {
        if self.contains(iova, size) {
            return Ok(());
        }
        Err(OpsError::IovaOutOfRange {
            iova,
            size,
            first: self.first,
            last: self.last,
        })
    }
}

/// Apply a provisioning mask to the features a device offers (`raw`), the
/// way `vdpa dev add ... device_features` does: VERSION_1 must be offered
/// and, like ACCESS_PLATFORM where the device offers it, cannot be masked
/// off. Returns the features a driver may be offered.
///
/// # Errors
///
/// [`OpsError::NoVersion1`], [`OpsError::MaskRemovesRequired`].
pub fn provision(raw: u64, mask: Option<u64>) -> Result<u64, OpsError> {
    if raw & features::bit(features::VERSION_1) == 0 {
        return Err(OpsError::NoVersion1);
    }
    let mask = mask.unwrap_or(u64::MAX);
    for bit in [features::VERSION_1, features::ACCESS_PLATFORM] {
        if raw & features::bit(bit) != 0 && mask & features::bit(bit) == 0 {
            return Err(OpsError::MaskRemovesRequired { mask, bit });
        }
    }
    Ok(raw & mask)
}

/// What a backend can do beyond the mandatory operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackendCaps {
    /// Kicks signalled on an eventfd reach the device without a userspace
    /// thread (VFIO_DEVICE_IOEVENTFD, vhost-vdpa's kick fd).
    pub kick_eventfd: bool,
    /// Device interrupts are delivered straight to an eventfd.
    pub call_eventfd: bool,
    /// The device can be suspended and resumed ([`VdpaOps::suspend`]):
    /// VIRTIO_F_SUSPEND offered (virtio-pci) or `VHOST_BACKEND_F_SUSPEND`
    /// and `_RESUME` acked (vhost-vdpa).
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
    /// The page size `host_addr` and `len` are multiples of (the host's).
    pub page_size: u64,
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
    ///
    /// # Errors
    ///
    /// A doorbell that is not mapped is written with a system call, which
    /// can fail.
    pub fn ring(&self, next: u32) -> std::io::Result<()> {
        self.inner.ring(next)
    }
}

/// Implementation side of [`Doorbell`].
pub trait RingDoorbell: Send + Sync {
    /// Write the doorbell.
    ///
    /// # Errors
    ///
    /// The write failed (only possible on a slow path through a system
    /// call).
    fn ring(&self, next: u32) -> std::io::Result<()>;
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
    /// The backend's error. Every trait-level refusal ([`OpsError`])
    /// converts into it; backend-specific causes keep their own types.
    type Error: std::error::Error + From<OpsError> + Send + Sync + 'static;

    /// Virtio device id (1 = net, 2 = block, ...).
    fn device_id(&self) -> u32;
    /// Vendor id (PCI subsystem vendor for PCI devices).
    fn vendor_id(&self) -> u32;
    /// Features the device offers, after the provisioning mask.
    fn device_features(&self) -> u64;
    /// Features the device itself offers, before any provisioning mask.
    fn raw_device_features(&self) -> u64;
    /// Set the driver's features: checked here to be a subset of
    /// [`device_features`](Self::device_features), then handed to
    /// [`write_driver_features`](Self::write_driver_features).
    ///
    /// # Errors
    ///
    /// [`OpsError::FeaturesNotOffered`], or the backend's error.
    fn set_driver_features(&mut self, features: u64) -> Result<(), Self::Error> {
        let f = DriverFeatures::new(features, self.device_features())?;
        self.write_driver_features(f)
    }
    /// Backend part of [`set_driver_features`](Self::set_driver_features).
    fn write_driver_features(&mut self, features: DriverFeatures) -> Result<(), Self::Error>;
    /// The features last set with `set_driver_features`.
    fn driver_features(&self) -> u64;
    /// What this backend can do.
    fn backend_caps(&self) -> BackendCaps;
    /// Current device status.
    fn status(&mut self) -> Result<u8, Self::Error>;
    /// Set device status. Setting FEATURES_OK reads it back and fails if the
    /// device refused the features; setting DRIVER_OK wires interrupts.
    /// Status 0 is a reset.
    fn set_status(&mut self, status: u8) -> Result<(), Self::Error>;
    /// Reset the device (status 0) and wait, bounded, for it to finish.
    fn reset(&mut self) -> Result<(), Self::Error>;
    /// Number of virtqueues the device has.
    fn num_queues(&self) -> u16;
    /// Largest ring size queue `q` accepts.
    fn vring_max_size(&mut self, q: QueueIndex) -> Result<u16, Self::Error>;
    /// Set the ring size of queue `q` (1..=max, a power of two for split rings).
    fn set_vring_num(&mut self, q: QueueIndex, num: u16) -> Result<(), Self::Error>;
    /// Set the ring addresses (IOVAs) of queue `q`.
    fn set_vring_addr(&mut self, q: QueueIndex, addrs: VringAddrs) -> Result<(), Self::Error>;
    /// Set the initial available index. Virtio-pci can only start at 0.
    fn set_vring_base(&mut self, q: QueueIndex, base: u16) -> Result<(), Self::Error>;
    /// Read the device's available index, where the transport offers it.
    fn vring_base(&mut self, q: QueueIndex) -> Result<u16, Self::Error>;
    /// Enable or disable queue `q`. Virtio-pci cannot disable a queue once
    /// enabled except by a reset (or RING_RESET).
    fn set_vring_enable(&mut self, q: QueueIndex, enable: bool) -> Result<(), Self::Error>;
    /// Whether queue `q` is enabled.
    fn vring_enabled(&mut self, q: QueueIndex) -> Result<bool, Self::Error>;
    /// Attach (or detach with `None`) an eventfd whose signals kick queue
    /// `q` without a userspace hop. Fails with [`OpsError::Unsupported`]
    /// when the backend cannot do that (see [`BackendCaps::kick_eventfd`]).
    fn set_vring_kick(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<(), Self::Error>;
    /// Attach (or detach) the eventfd signalled when queue `q` has used
    /// buffers. Takes effect at DRIVER_OK.
    fn set_vring_call(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<(), Self::Error>;
    /// Attach (or detach) the eventfd signalled on configuration changes.
    fn set_config_call(&mut self, fd: Option<&EventFd>) -> Result<(), Self::Error>;
    /// How interrupt vectors map to queues (see [`IrqPlan`]).
    fn irq_plan(&self) -> IrqPlan;
    /// Kick queue `q` now (a direct doorbell write).
    fn kick(&self, q: QueueIndex) -> Result<(), Self::Error>;
    /// A thread-safe handle for kicking queue `q` from a relay thread.
    fn doorbell(&self, q: QueueIndex) -> Result<Doorbell, Self::Error>;
    /// Where queue `q`'s doorbell is.
    fn notification_area(&self, q: QueueIndex) -> Result<NotifyArea, Self::Error>;
    /// Every queue's doorbell as one mappable range of pages, when the
    /// backend has such a host mapping and those pages hold nothing else.
    fn notification_pages(&self) -> Option<NotifyPages> {
        None
    }
    /// Size of the device-specific configuration space.
    fn config_size(&self) -> usize;
    /// Read device config at `offset`: checked here against
    /// [`config_size`](Self::config_size), then read by
    /// [`read_device_config`](Self::read_device_config).
    ///
    /// # Errors
    ///
    /// [`OpsError::ConfigOutOfRange`], or the backend's error.
    fn get_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error> {
        let range = ConfigRange::new(u64::from(offset), buf.len(), self.config_size())?;
        self.read_device_config(range, buf)
    }
    /// Write device config at `offset`, checked as for
    /// [`get_config`](Self::get_config).
    ///
    /// # Errors
    ///
    /// [`OpsError::ConfigOutOfRange`], or the backend's error.
    fn set_config(&mut self, offset: u32, buf: &[u8]) -> Result<(), Self::Error> {
        let range = ConfigRange::new(u64::from(offset), buf.len(), self.config_size())?;
        self.write_device_config(range, buf)
    }
    /// Backend part of [`get_config`](Self::get_config): read `range`
    /// consistently (generation-checked where the transport has a
    /// generation). `buf` is `range.len()` bytes.
    fn read_device_config(&mut self, range: ConfigRange, buf: &mut [u8])
        -> Result<(), Self::Error>;
    /// Backend part of [`set_config`](Self::set_config). `buf` is
    /// `range.len()` bytes.
    fn write_device_config(&mut self, range: ConfigRange, buf: &[u8]) -> Result<(), Self::Error>;
    /// Current configuration generation.
    fn config_generation(&mut self) -> Result<u32, Self::Error>;
    /// An eventfd the host signals when it wants the device back (an
    /// ordered removal: `echo 1 > .../remove`, a hot-unplug of the host's
    /// slot, unbinding the driver). The host's removal waits until every
    /// user lets go, so the owner must then stop using the device and drop
    /// it promptly (a VMM first removes any guest mapping of its BARs).
    /// `None` when the backend has no such signal (vhost-vdpa: the kernel
    /// waits for the node to be closed without telling anyone).
    fn removal_request(&self) -> Option<&EventFd> {
        None
    }

    /// Suspend the running device (virtio 1.4 VIRTIO_F_SUSPEND, which the
    /// driver must have negotiated; vhost-vdpa's `VHOST_VDPA_SUSPEND`): it
    /// takes no more requests, and (virtio: should) finishes those it
    /// holds and raises their interrupts first; its queues keep their
    /// positions. Bounded: a device that does not suspend in time is an
    /// error, and the device must then be reset. Only when
    /// [`BackendCaps::suspend`].
    fn suspend(&mut self) -> Result<(), Self::Error> {
        Err(OpsError::Unsupported("suspend").into())
    }

    /// Run a suspended device again from where its queues stand (virtio:
    /// DRIVER_OK set again; vhost-vdpa: `VHOST_VDPA_RESUME`). Bounded like
    /// [`suspend`](Self::suspend).
    fn resume(&mut self) -> Result<(), Self::Error> {
        Err(OpsError::Unsupported("resume").into())
    }
}

/// IOVA mappings for device DMA.
pub trait DmaMapper {
    /// The mapper's error; [`OpsError::IovaOutOfRange`] converts into it.
    type Error: std::error::Error + From<OpsError> + Send + Sync + 'static;

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
    /// [`OpsError::IovaOutOfRange`] when the range does not lie in
    /// [`iova_range`](Self::iova_range) (see [`IovaRange::check`]); a
    /// backend error otherwise.
    unsafe fn dma_map(&self, iova: Iova, size: u64, host_addr: usize) -> Result<(), Self::Error>;

    /// Map `size` bytes of the caller's own memory (not guest memory:
    /// shadow rings) at the highest free `align`-aligned IOVA (a power of
    /// two) at or above `floor`, and return it. A backend whose address
    /// space other devices share (one VFIO container per VM) picks a window
    /// none of them holds; the default takes the top of
    /// [`iova_range`](Self::iova_range).
    ///
    /// # Safety
    ///
    /// As [`DmaMapper::dma_map`].
    ///
    /// # Errors
    ///
    /// [`OpsError::IovaOutOfRange`] when no window fits; the backend's
    /// error otherwise.
    unsafe fn dma_map_top(
        &self,
        size: u64,
        host_addr: usize,
        align: u64,
        floor: u64,
    ) -> Result<Iova, Self::Error> {
        let range = self.iova_range();
        let iova = range
            .top_window(size, align, floor)
            .ok_or(OpsError::IovaOutOfRange {
                iova: floor,
                size,
                first: range.first,
                last: range.last,
            })?;
        // SAFETY: the caller upholds dma_map's contract.
        unsafe { self.dma_map(Iova(iova), size, host_addr) }?;
        Ok(Iova(iova))
    }

    /// Remove the mapping at `iova`.
    fn dma_unmap(&self, iova: Iova, size: u64) -> Result<(), Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_range_accepts_accesses_up_to_the_end_and_refuses_past_it() {
        let r = ConfigRange::new(4, 4, 8).unwrap();
        assert_eq!((r.offset(), r.len()), (4, 4));
        assert!(ConfigRange::new(8, 0, 8).unwrap().is_empty());
        for (offset, len) in [(5, 4), (9, 0), (u64::MAX, 2), (1 << 32, 0)] {
            assert!(
                matches!(
                    ConfigRange::new(offset, len, 8),
                    Err(OpsError::ConfigOutOfRange { size: 8, .. })
                ),
                "{offset:#x}+{len}"
            );
        }
        // Offsets past u32 are refused even in a (bogus) huge config.
        assert!(ConfigRange::new(1 << 32, 1, usize::MAX).is_err());
    }

    #[test]
    fn driver_features_must_be_offered() {
        assert_eq!(DriverFeatures::new(0b101, 0b111).unwrap().bits(), 0b101);
        assert!(matches!(
            DriverFeatures::new(0b1000, 0b111),
            Err(OpsError::FeaturesNotOffered {
                requested: 0b1000,
                offered: 0b111
            })
        ));
    }

    #[test]
    fn provisioning_keeps_version_1_and_access_platform() {
        let v1 = features::bit(features::VERSION_1);
        let ap = features::bit(features::ACCESS_PLATFORM);
        assert_eq!(
            provision(v1 | ap | 0b11, Some(v1 | ap | 1)).unwrap(),
            v1 | ap | 1
        );
        assert_eq!(provision(v1 | 0b11, None).unwrap(), v1 | 0b11);
        assert!(matches!(provision(0b11, None), Err(OpsError::NoVersion1)));
        assert!(matches!(
            provision(v1 | ap, Some(v1)),
            Err(OpsError::MaskRemovesRequired { bit: 33, .. })
        ));
        // ACCESS_PLATFORM may be masked where the device does not offer it.
        assert_eq!(provision(v1, Some(v1)).unwrap(), v1);
    }

    #[test]
    fn iova_range_check_names_the_range() {
        let r = IovaRange {
            first: 0x1000,
            last: 0x1fff,
        };
        assert!(r.check(0x1000, 0x1000).is_ok());
        assert!(matches!(
            r.check(0x1800, 0x1000),
            Err(OpsError::IovaOutOfRange {
                iova: 0x1800,
                first: 0x1000,
                last: 0x1fff,
                ..
            })
        ));
    }

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
