//! vhost-vdpa nodes for `vdpa-bridge list`: the kernel vDPA devices on the
//! vdpa bus that have a `/dev/vhost-vdpa-N` node, with their virtio type
//! probed without taking them over.

use std::path::Path;

use vdpa_bridge::device_path::is_vhost_vdpa_path;
use vdpa_bridge::types::DeviceType;
use vdpa_bridge::vhost_vdpa::probe_device_id;

/// A vhost-vdpa node as `vdpa-bridge list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VhostVdpaNode {
    /// The character device (`/dev/vhost-vdpa-0`).
    pub node: String,
    /// The vDPA device on the vdpa bus (`vduse0`).
    pub vdpa_device: String,
    /// The device's parent in sysfs (the management device's side).
    pub parent: Option<String>,
    /// Virtio type, when the node could be probed.
    pub device_type: Option<&'static str>,
    /// Why the type is unknown (e.g. the node is in use).
    pub probe_error: Option<String>,
}

/// The vhost-vdpa nodes of the vDPA devices under `bus_devices`
/// (`/sys/bus/vdpa/devices`), sorted by node. A missing bus (no vdpa
/// module) is an empty list.
pub fn list(bus_devices: &Path, dev_dir: &Path) -> Vec<VhostVdpaNode> {
    let Ok(rd) = std::fs::read_dir(bus_devices) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dir = e.path();
        let Ok(children) = std::fs::read_dir(&dir) else {
            continue;
        };
        for c in children.flatten() {
            let n = c.file_name().to_string_lossy().into_owned();
            if !is_vhost_vdpa_path(Path::new(&n)) {
                continue;
            }
            let node = dev_dir.join(&n);
            let (device_type, probe_error) = match probe_device_id(&node) {
                Ok(id) => (Some(DeviceType::from_id(id).name()), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let parent = std::fs::canonicalize(&dir)
                .ok()
                .and_then(|p| p.parent().map(|p| p.display().to_string()));
            out.push(VhostVdpaNode {
                node: node.display().to_string(),
                vdpa_device: name.clone(),
                parent,
                device_type,
                probe_error,
            });
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}
