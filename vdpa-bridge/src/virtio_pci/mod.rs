//! The modern virtio-pci transport (virtio 1.2 §4.1), driver side.

/// Errors of the virtio-pci transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Placeholder until the transport lands.
    #[error("device is not a modern virtio-pci device")]
    NotVirtio,
}
