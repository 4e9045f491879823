//! The VFIO backend: a PCI function claimed through vfio-pci.

/// Errors of the VFIO backend.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The device address or path could not be resolved.
    #[error("cannot resolve PCI device {0}")]
    Resolve(String),
}
