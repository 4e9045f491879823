//! The crate's top-level error: what [`crate::VdpaOps`] and
//! [`crate::DmaMapper`] return. Module errors are kept as `#[source]`.

use crate::types::QueueIndex;

/// Errors of the vDPA operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Access to the PCI function failed.
    #[error("PCI function access failed")]
    Pci(#[from] crate::pci::PciError),
    /// The virtio-pci transport rejected the device or an operation.
    #[error("virtio-pci transport error")]
    Transport(#[from] crate::virtio_pci::TransportError),
    /// The VFIO backend failed.
    #[error("VFIO backend error")]
    Vfio(#[from] crate::vfio::VfioError),
    /// The vhost-vdpa backend failed.
    #[error("vhost-vdpa backend error")]
    VhostVdpa(#[from] crate::vhost_vdpa::VhostVdpaError),
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
        offset: u32,
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
        addrs: crate::types::VringAddrs,
    },
    /// A provisioning mask that removes a feature the bridge requires.
    #[error("feature mask {mask:#x} removes required feature bit {bit}")]
    MaskRemovesRequired {
        /// The mask.
        mask: u64,
        /// The required bit.
        bit: u32,
    },
    /// The backend cannot do this.
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
}

/// Result alias for the crate.
pub type Result<T> = std::result::Result<T, Error>;
