//! Errors of the plugin.

use vdpa_bridge::OpsError;

/// A backend's error, whichever backend (each has its own type).
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
        source: BackendError,
    },
    /// A request refused before it reached the backend (features not
    /// offered, a config access out of range, an IOVA outside the
    /// device's range), by the same checks the backends make.
    #[error(transparent)]
    Invalid(#[from] OpsError),
    /// The device did not take DRIVER_OK: it failed to start.
    #[error("device did not accept DRIVER_OK (status {status:#x})")]
    DriverOkRefused {
        /// The status read back.
        status: u8,
    },
    /// Activation was given an unusable queue.
    #[error("queue {index}: {reason}")]
    BadQueue {
        /// Queue index as given by the VMM.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Activation was given a ring the device must not be pointed at.
    #[error("queue {index}: {ring} at {addr:#x} {reason}")]
    BadRing {
        /// Queue index as given by the VMM.
        index: usize,
        /// Which ring.
        ring: &'static str,
        /// Its guest address.
        addr: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A ring the VMM's address translation (a vIOMMU) does not map whole:
    /// the device cannot be told where it is.
    #[error("queue {index}: {ring} at {addr:#x} is not mapped for the device")]
    Untranslated {
        /// Queue index as given by the VMM.
        index: usize,
        /// Which ring.
        ring: &'static str,
        /// Its guest-physical address.
        addr: u64,
        /// The translation's error.
        #[source]
        source: std::io::Error,
    },
    /// Activation while already active.
    #[error("device is already active")]
    AlreadyActive,
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
    /// A thread's setup hook refused it (see [`crate::ThreadHook`]).
    #[error("the {role:?} thread could not be set up: {reason}")]
    ThreadSetup {
        /// Which thread.
        role: crate::ThreadRole,
        /// The hook's reason.
        reason: String,
    },
    /// The requested operation is not supported by this device.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A bad option in the device configuration.
    #[error("invalid vdpa option: {0}")]
    Config(String),
    /// The device was given back to the host
    /// ([`crate::BridgeDevice::release`]).
    #[error("the device was released to the host")]
    Released,
    /// Shadow virtqueues could not be set up, or the device could not be
    /// moved to them.
    #[error("shadow virtqueues: {0}")]
    Shadow(String),
    /// A saved device state that this device cannot take.
    #[error("cannot restore the device state: {0}")]
    Restore(String),
    /// The operation needs a paused device ([`crate::BridgeDevice::pause`]).
    #[error("the device is running: pause it first")]
    NotPaused,
    /// Answering a released device's queues failed to start.
    #[error("cannot answer the released device's queues: {0}")]
    Orphan(String),
}

/// Result of the plugin.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn backend_err<E>(op: &'static str) -> impl FnOnce(E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |source| Error::Backend {
        op,
        source: Box::new(source),
    }
}

pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, source }
}
