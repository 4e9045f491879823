//! Small value types shared by the ops traits, the transports and the plugin.
//!
//! Newtypes keep index and address widths from drifting between layers (vhost
//! uses `usize`, `u32` and `u16` for the same queue index in different calls).

use serde::Serialize;

/// Index of a virtqueue on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct QueueIndex(pub u16);

impl std::fmt::Display for QueueIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An I/O virtual address: what the device uses for DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Iova(pub u64);

/// An inclusive range of usable IOVAs, as `VHOST_VDPA_GET_IOVA_RANGE` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IovaRange {
    /// First usable IOVA.
    pub first: u64,
    /// Last usable IOVA (inclusive).
    pub last: u64,
}

impl IovaRange {
    /// The whole 64-bit space.
    pub const FULL: IovaRange = IovaRange {
        first: 0,
        last: u64::MAX,
    };

    /// Whether `[iova, iova + size)` lies inside the range. A zero size or a
    /// range that wraps around the address space is never contained.
    pub fn contains(&self, iova: u64, size: u64) -> bool {
        if size == 0 {
            return false;
        }
        match iova.checked_add(size - 1) {
            Some(end) => iova >= self.first && end <= self.last,
            None => false,
        }
    }
}

/// Ring addresses of a split virtqueue (IOVAs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VringAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Driver area (available ring).
    pub driver: u64,
    /// Device area (used ring).
    pub device: u64,
}

/// Parse a number as feature masks are written on command lines: hex with
/// `0x` (or `0X`), or decimal. The one parser of `features_mask=` and
/// `--features-mask`.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Virtio device status bits (virtio 1.2 §2.1): virtio-bindings'
/// `VIRTIO_CONFIG_S_*`, typed as the 8-bit register they live in (bindgen
/// types them `u32`).
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// Guest OS has found the device.
    pub const ACKNOWLEDGE: u8 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    /// Guest OS knows how to drive the device.
    pub const DRIVER: u8 = c::VIRTIO_CONFIG_S_DRIVER as u8;
    /// Driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = c::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    /// Driver has acknowledged the features it understands.
    pub const FEATURES_OK: u8 = c::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    /// Device experienced an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = c::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    /// Something went wrong in the guest; it has given up on the device.
    pub const FAILED: u8 = c::VIRTIO_CONFIG_S_FAILED as u8;
}

/// The transport and ring feature bits (virtio 1.2 §6) the bridge acts on,
/// by short name: virtio-bindings' `VIRTIO_F_*` and `VIRTIO_RING_F_*`.
pub mod features {
    use virtio_bindings::{virtio_config as c, virtio_ring as r};

    /// Descriptors may refer to indirect tables.
    pub const RING_INDIRECT_DESC: u32 = r::VIRTIO_RING_F_INDIRECT_DESC;
    /// `used_event`/`avail_event` fields.
    pub const RING_EVENT_IDX: u32 = r::VIRTIO_RING_F_EVENT_IDX;
    /// Virtio 1.x compliance (the modern interface).
    pub const VERSION_1: u32 = c::VIRTIO_F_VERSION_1;
    /// The device sits behind an IOMMU / uses platform DMA translation.
    pub const ACCESS_PLATFORM: u32 = c::VIRTIO_F_ACCESS_PLATFORM;
    /// Packed virtqueue layout.
    pub const RING_PACKED: u32 = c::VIRTIO_F_RING_PACKED;
    /// Buffers are used in the order they were made available.
    pub const IN_ORDER: u32 = c::VIRTIO_F_IN_ORDER;
    /// Platform memory ordering is required.
    pub const ORDER_PLATFORM: u32 = c::VIRTIO_F_ORDER_PLATFORM;
    /// Single-root I/O virtualization.
    pub const SR_IOV: u32 = c::VIRTIO_F_SR_IOV;
    /// The driver passes extra data in its notifications.
    pub const NOTIFICATION_DATA: u32 = c::VIRTIO_F_NOTIFICATION_DATA;
    /// Notification configuration data.
    pub const NOTIF_CONFIG_DATA: u32 = c::VIRTIO_F_NOTIF_CONFIG_DATA;
    /// Individual queue reset.
    pub const RING_RESET: u32 = c::VIRTIO_F_RING_RESET;
    /// Administration virtqueue.
    pub const ADMIN_VQ: u32 = c::VIRTIO_F_ADMIN_VQ;

    /// Mask with one bit set.
    pub const fn bit(n: u32) -> u64 {
        1u64 << n
    }
}

/// Virtio device types (virtio 1.2 §5), by device id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// Network card (1).
    Net,
    /// Block device (2).
    Block,
    /// Console (3).
    Console,
    /// Entropy source (4).
    Rng,
    /// SCSI host (8).
    Scsi,
    /// File system (26).
    Fs,
    /// Any other id.
    Other(u32),
}

impl DeviceType {
    /// Device type for a virtio device id. Derived in one place so the
    /// forward and reverse maps cannot disagree.
    pub fn from_id(id: u32) -> Self {
        Self::ALL
            .iter()
            .find(|(_, n)| *n == id)
            .map(|(t, _)| *t)
            .unwrap_or(DeviceType::Other(id))
    }

    /// Virtio device id.
    pub fn id(self) -> u32 {
        match self {
            DeviceType::Other(id) => id,
            t => Self::ALL
                .iter()
                .find(|(k, _)| *k == t)
                .map(|(_, n)| *n)
                .unwrap_or(0),
        }
    }

    /// Short name, as iproute2's `vdpa` prints it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Net => "net",
            DeviceType::Block => "block",
            DeviceType::Console => "console",
            DeviceType::Rng => "rng",
            DeviceType::Scsi => "scsi",
            DeviceType::Fs => "fs",
            DeviceType::Other(_) => "unknown",
        }
    }

    const ALL: [(DeviceType, u32); 6] = {
        use virtio_bindings::virtio_ids as id;
        [
            (DeviceType::Net, id::VIRTIO_ID_NET),
            (DeviceType::Block, id::VIRTIO_ID_BLOCK),
            (DeviceType::Console, id::VIRTIO_ID_CONSOLE),
            (DeviceType::Rng, id::VIRTIO_ID_RNG),
            (DeviceType::Scsi, id::VIRTIO_ID_SCSI),
            (DeviceType::Fs, id::VIRTIO_ID_FS),
        ]
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_type_maps_round_trip() {
        for id in 0..64 {
            assert_eq!(DeviceType::from_id(id).id(), id);
        }
        assert_eq!(DeviceType::from_id(2), DeviceType::Block);
        assert_eq!(DeviceType::from_id(5), DeviceType::Other(5));
    }

    #[test]
    fn iova_range_rejects_wrap_and_empty() {
        let r = IovaRange {
            first: 0x1000,
            last: 0xffff,
        };
        assert!(r.contains(0x1000, 0xf000));
        assert!(!r.contains(0x1000, 0xf001));
        assert!(!r.contains(0xfff, 1));
        assert!(!r.contains(0x2000, 0));
        assert!(!IovaRange::FULL.contains(u64::MAX, 2));
        assert!(IovaRange::FULL.contains(u64::MAX, 1));
    }

    #[test]
    fn numbers_parse_as_hex_with_0x_or_decimal() {
        assert_eq!(parse_u64("0x300000000"), Some(0x3_0000_0000));
        assert_eq!(parse_u64("0XfF"), Some(255));
        assert_eq!(parse_u64("4096"), Some(4096));
        for bad in ["", "0x", "ff", "-1", "0x1_0", "18446744073709551616"] {
            assert_eq!(parse_u64(bad), None, "{bad}");
        }
    }
}
