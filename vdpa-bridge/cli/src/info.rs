//! Device facts as `vdpa-bridge info` prints them (keys are a stable
//! interface for scripts and tests).

use serde::Serialize;

use crate::features::feature_names;
use vdpa_bridge::ops::VdpaOps;
use vdpa_bridge::types::{features, DeviceType, QueueIndex};
use virtio_bindings::{virtio_blk as blk, virtio_net as net};

/// A feature word with names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FeatureSet {
    /// Hex value, `0x...`.
    pub hex: String,
    /// Bit names (`VERSION_1`, `bit50` for unnamed bits).
    pub names: Vec<String>,
}

impl FeatureSet {
    /// Describe `bits` for a device of type `t`.
    pub fn new(t: DeviceType, bits: u64) -> Self {
        FeatureSet {
            hex: format!("{bits:#x}"),
            names: feature_names(t, bits),
        }
    }
}

/// Device and provisioned features.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Features {
    /// What the device offers.
    pub device: FeatureSet,
    /// What the bridge offers to a driver (after the provisioning mask).
    pub provisioned: FeatureSet,
}

/// One queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct QueueInfo {
    /// Queue index.
    pub index: u16,
    /// Largest ring size.
    pub max_size: u16,
}

/// Notify structure of a PCI device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NotifyInfo {
    /// BAR.
    pub bar: u8,
    /// Offset of the notify structure in the BAR.
    pub offset: u64,
    /// `notify_off_multiplier`.
    pub multiplier: u32,
}

/// Decoded device-specific configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ConfigInfo {
    /// virtio-blk (virtio 1.2 §5.2.4).
    Block {
        /// Capacity in 512-byte sectors.
        capacity_sectors: u64,
        /// Block size (512 unless VIRTIO_BLK_F_BLK_SIZE says otherwise).
        blk_size: u32,
        /// Number of request queues.
        num_queues: u16,
    },
    /// virtio-net (virtio 1.2 §5.1.4).
    Net {
        /// MAC address, `aa:bb:cc:dd:ee:ff` (when VIRTIO_NET_F_MAC).
        mac: Option<String>,
        /// MTU (when VIRTIO_NET_F_MTU).
        mtu: Option<u16>,
        /// Queue pairs (1 unless VIRTIO_NET_F_MQ).
        max_queue_pairs: u16,
        /// Link status (when VIRTIO_NET_F_STATUS).
        status: Option<u16>,
    },
    /// Other device types: raw size only.
    Other {
        /// Size of the config space.
        size: usize,
    },
}

/// Everything `info` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// What was opened (`emulated`, a PCI address or a node).
    pub device: String,
    /// Whether it is the built-in emulated device.
    pub emulated: bool,
    /// Backend kind: `vfio`, `emulated`, `vhost-vdpa`.
    pub backend: String,
    /// Device type name.
    pub device_type: &'static str,
    /// Virtio device id.
    pub device_id: u32,
    /// Vendor id.
    pub vendor_id: u32,
    /// Features.
    pub features: Features,
    /// Queues.
    pub queues: Vec<QueueInfo>,
    /// MSI-X vectors (PCI backends).
    pub msix_vectors: Option<u32>,
    /// Whether the MSI-X vectors are shared between queues.
    pub vectors_shared: bool,
    /// Notify structure (PCI backends).
    pub notify: Option<NotifyInfo>,
    /// Decoded config space.
    pub config: ConfigInfo,
}

/// Read one config field of `N` bytes at `off`, or `None` past the config
/// size. Fields are read one by one at their own width, as drivers do:
/// devices (QEMU) answer an access that runs past the end of their config
/// with all-ones, so a wide read across fields is not safe.
fn field<const N: usize, B: VdpaOps + ?Sized>(
    ops: &mut B,
    off: u32,
    size: usize,
) -> Result<Option<[u8; N]>, B::Error> {
    if off as usize + N > size {
        return Ok(None);
    }
    let mut b = [0u8; N];
    ops.get_config(off, &mut b)?;
    Ok(Some(b))
}

/// Offset of a field of virtio-bindings' `virtio_blk_config` /
/// `virtio_net_config` (the config layouts, virtio 1.2 §5.2.4 and §5.1.4).
macro_rules! at {
    (blk_config, $f:ident) => {
        std::mem::offset_of!(blk::virtio_blk_config, $f) as u32
    };
    (net_config, $f:ident) => {
        std::mem::offset_of!(net::virtio_net_config, $f) as u32
    };
}

/// Read and decode a device's configuration space.
pub fn decode_config<B: VdpaOps + ?Sized>(ops: &mut B) -> Result<ConfigInfo, B::Error> {
    let t = DeviceType::from_id(ops.device_id());
    let f = ops.device_features();
    let has = |bit: u32| f & features::bit(bit) != 0;
    let size = ops.config_size();
    match t {
        DeviceType::Block => {
            let capacity_sectors =
                field::<8, B>(ops, at!(blk_config, capacity), size)?.map_or(0, u64::from_le_bytes);
            let blk_size = if has(blk::VIRTIO_BLK_F_BLK_SIZE) {
                field::<4, B>(ops, at!(blk_config, blk_size), size)?.map_or(512, u32::from_le_bytes)
            } else {
                512
            };
            let num_queues = if has(blk::VIRTIO_BLK_F_MQ) {
                field::<2, B>(ops, at!(blk_config, num_queues), size)?.map_or(1, u16::from_le_bytes)
            } else {
                1
            };
            Ok(ConfigInfo::Block {
                capacity_sectors,
                blk_size,
                num_queues,
            })
        }
        DeviceType::Net => {
            let mac = if has(net::VIRTIO_NET_F_MAC) {
                field::<6, B>(ops, at!(net_config, mac), size)?.map(|m| {
                    m.iter()
                        .map(|x| format!("{x:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                })
            } else {
                None
            };
            let status = if has(net::VIRTIO_NET_F_STATUS) {
                field::<2, B>(ops, at!(net_config, status), size)?.map(u16::from_le_bytes)
            } else {
                None
            };
            let max_queue_pairs = if has(net::VIRTIO_NET_F_MQ) {
                field::<2, B>(ops, at!(net_config, max_virtqueue_pairs), size)?
                    .map_or(1, u16::from_le_bytes)
            } else {
                1
            };
            let mtu = if has(net::VIRTIO_NET_F_MTU) {
                field::<2, B>(ops, at!(net_config, mtu), size)?.map(u16::from_le_bytes)
            } else {
                None
            };
            Ok(ConfigInfo::Net {
                mac,
                mtu,
                max_queue_pairs,
                status,
            })
        }
        _ => Ok(ConfigInfo::Other { size }),
    }
}

/// Gather the generic facts; PCI-specific ones (`msix_vectors`, `notify`)
/// are filled in by the caller that knows the transport.
pub fn gather<B: VdpaOps + ?Sized>(
    ops: &mut B,
    device: &str,
    backend: &str,
) -> Result<DeviceInfo, B::Error> {
    let t = DeviceType::from_id(ops.device_id());
    let mut queues = Vec::new();
    for q in 0..ops.num_queues() {
        queues.push(QueueInfo {
            index: q,
            max_size: ops.vring_max_size(QueueIndex(q))?,
        });
    }
    let config = decode_config(ops)?;
    Ok(DeviceInfo {
        device: device.to_owned(),
        emulated: backend == "emulated",
        backend: backend.to_owned(),
        device_type: t.name(),
        device_id: ops.device_id(),
        vendor_id: ops.vendor_id(),
        features: Features {
            device: FeatureSet::new(t, ops.raw_device_features()),
            provisioned: FeatureSet::new(t, ops.device_features()),
        },
        queues,
        msix_vectors: None,
        vectors_shared: ops.irq_plan().is_shared(),
        notify: None,
        config,
    })
}

/// [`gather`] plus the PCI facts (`msix_vectors`, `notify`) of a device
/// driven by our virtio-pci transport.
pub fn gather_pci<P: vdpa_bridge::pci::PciFunction + ?Sized + 'static>(
    d: &mut vdpa_bridge::vp_vdpa::VpVdpa<P>,
    device: &str,
    backend: &str,
) -> Result<DeviceInfo, vdpa_bridge::VpVdpaError> {
    let mut i = gather(d, device, backend)?;
    let region = d.transport().notify_region();
    i.msix_vectors = Some(d.msix_vectors());
    i.notify = Some(NotifyInfo {
        bar: region.bar,
        offset: region.offset,
        multiplier: d.transport().caps().notify.multiplier,
    });
    Ok(i)
}

impl Features {
    /// Whether the provisioned features include the one named `name`.
    pub fn names_contain(&self, name: &str) -> bool {
        self.provisioned.names.iter().any(|n| n == name)
    }
}

/// [`gather`] for any real backend, with the PCI facts where there are.
pub fn gather_any(
    d: &mut vdpa_bridge::backend::AnyDevice,
    device: &str,
) -> Result<DeviceInfo, vdpa_bridge::Error> {
    use vdpa_bridge::backend::AnyDevice;
    let backend = d.backend_name();
    match d {
        AnyDevice::Vfio(d) => Ok(gather_pci(d, device, backend)?),
        AnyDevice::VhostVdpa(d) => Ok(gather(d, device, backend)?),
    }
}

#[cfg(test)]
mod tests {
    /// The offsets `decode_config` reads, from virtio-bindings' layouts,
    /// are the spec's (virtio 1.2 §5.2.4, §5.1.4).
    #[test]
    fn config_field_offsets_are_the_spec_s() {
        use virtio_bindings::{virtio_blk as blk, virtio_net as net};
        assert_eq!(
            [
                at!(blk_config, capacity),
                at!(blk_config, blk_size),
                at!(blk_config, num_queues)
            ],
            [0, 20, 34]
        );
        assert_eq!(
            [
                at!(net_config, mac),
                at!(net_config, status),
                at!(net_config, max_virtqueue_pairs),
                at!(net_config, mtu)
            ],
            [0, 6, 8, 10]
        );
    }
}
