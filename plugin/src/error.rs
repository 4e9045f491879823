//! Errors of the plugin.

use vdpa_bridge::QueueIndex;

/// Errors of [`crate::BridgeDevice`] and its helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A backend operation failed.
    #[error("backend: {op} failed")]
    Backend {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: vdpa_bridge::Error,
    },
    /// The driver acknowledged features the device did not offer.
    #[error("driver acked features {acked:#x} not offered ({offered:#x})")]
    FeaturesNotOffered {
        /// What was acked.
        acked: u64,
        /// What was offered.
        offered: u64,
    },
    /// Activation was given an unusable queue.
    #[error("queue {index}: {reason}")]
    BadQueue {
        /// Queue index as given by the VMM.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Activation while already active.
    #[error("device is already active")]
    AlreadyActive,
    /// A configuration-space access outside the device's config.
    #[error("config access at {offset:#x} (+{len}) is outside the {size}-byte config space")]
    ConfigOutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Config space size.
        size: usize,
    },
    /// A DMA mapping request the plugin refuses.
    #[error("DMA map of iova {iova:#x} (+{size:#x}): {reason}")]
    Dma {
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: &'static str,
    },
    /// Guest memory does not hold the given guest-physical range.
    #[error("guest memory has no region holding {gpa:#x} (+{size:#x})")]
    NotGuestMemory {
        /// Guest-physical address.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// Creating an eventfd, epoll set or thread failed.
    #[error("{op} failed")]
    Io {
        /// What was done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The requested operation is not supported by this device.
    #[error("{0}")]
    Unsupported(&'static str),
    /// Queue not known to the device.
    #[error("queue {0} does not exist")]
    NoSuchQueue(QueueIndex),
    /// A bad option in the device configuration.
    #[error("invalid vdpa option: {0}")]
    Config(String),
}

/// Result of the plugin.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn backend(op: &'static str) -> impl FnOnce(vdpa_bridge::Error) -> Error {
    move |source| Error::Backend { op, source }
}

pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, source }
}
