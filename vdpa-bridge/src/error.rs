//! The crate's top-level error: what [`crate::backend::AnyDevice`]
//! returns, opening a device by path or driving it. It sits above every
//! backend and is the only error that names them all; the trait layer has
//! its own ([`crate::OpsError`]), and each backend one of its own.

use crate::ops::OpsError;
use crate::vhost_vdpa::VhostVdpaError;
use crate::vp_vdpa::VpVdpaError;

/// Errors of a device opened by path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A refusal every backend makes (bad queue, features, range...).
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// The path names no device we can open.
    #[error(transparent)]
    BadPath(#[from] crate::device_path::BadDevicePath),
    /// Claiming the PCI function through VFIO failed.
    #[error("VFIO backend error")]
    Vfio(#[from] crate::vfio::VfioError),
    /// Driving the PCI function's virtio transport failed.
    #[error("virtio-pci backend error")]
    VpVdpa(#[source] VpVdpaError),
    /// The vhost-vdpa backend failed.
    #[error("vhost-vdpa backend error")]
    VhostVdpa(#[source] VhostVdpaError),
}

// A backend's trait-level refusal stays one: `Error::Ops` whatever the
// backend, so callers match it in one place.
impl From<VpVdpaError> for Error {
    fn from(e: VpVdpaError) -> Self {
        match e {
            VpVdpaError::Ops(o) => Error::Ops(o),
            e => Error::VpVdpa(e),
        }
    }
}

impl From<VhostVdpaError> for Error {
    fn from(e: VhostVdpaError) -> Self {
        match e {
            VhostVdpaError::Ops(o) => Error::Ops(o),
            e => Error::VhostVdpa(e),
        }
    }
}

/// Result alias for the crate's top-level operations.
pub type Result<T> = std::result::Result<T, Error>;
