//! Backend over a kernel vDPA device's `/dev/vhost-vdpa-N` node.

/// Errors of the vhost-vdpa backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostVdpaError {
    /// Opening the device node failed.
    #[error("cannot open {path}")]
    Open {
        /// The node.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
