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

/// Virtio device status bits (virtio 1.2 §2.1).
pub mod status {
    /// Guest OS has found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// Guest OS knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// Driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// Driver has acknowledged the features it understands.
    pub const FEATURES_OK: u8 = 8;
    /// Device experienced an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// Something went wrong in the guest; it has given up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Virtio feature bits this crate cares about by name (virtio 1.2 §6).
pub mod features {
    /// Descriptors may refer to indirect tables.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `used_event`/`avail_event` fields.
    pub const RING_EVENT_IDX: u32 = 29;
    /// Virtio 1.x compliance (the modern interface).
    pub const VERSION_1: u32 = 32;
    /// The device sits behind an IOMMU / uses platform DMA translation.
    pub const ACCESS_PLATFORM: u32 = 33;
    /// Packed virtqueue layout.
    pub const RING_PACKED: u32 = 34;
    /// Buffers are used in the order they were made available.
    pub const IN_ORDER: u32 = 35;
    /// Platform memory ordering is required.
    pub const ORDER_PLATFORM: u32 = 36;
    /// Single-root I/O virtualization.
    pub const SR_IOV: u32 = 37;
    /// The driver passes extra data in its notifications.
    pub const NOTIFICATION_DATA: u32 = 38;
    /// Notification configuration data.
    pub const NOTIF_CONFIG_DATA: u32 = 39;
    /// Individual queue reset.
    pub const RING_RESET: u32 = 40;

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

    const ALL: [(DeviceType, u32); 6] = [
        (DeviceType::Net, 1),
        (DeviceType::Block, 2),
        (DeviceType::Console, 3),
        (DeviceType::Rng, 4),
        (DeviceType::Scsi, 8),
        (DeviceType::Fs, 26),
    ];
}

/// Human-readable names of the set bits of a feature word.
pub fn feature_names(device: DeviceType, bits: u64) -> Vec<String> {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| feature_name(device, b).map_or_else(|| format!("bit{b}"), str::to_owned))
        .collect()
}

/// Name of one feature bit, device-specific bits (0..24) included.
pub fn feature_name(device: DeviceType, bit: u32) -> Option<&'static str> {
    let generic = match bit {
        27 => Some("ANY_LAYOUT"),
        28 => Some("RING_INDIRECT_DESC"),
        29 => Some("RING_EVENT_IDX"),
        32 => Some("VERSION_1"),
        33 => Some("ACCESS_PLATFORM"),
        34 => Some("RING_PACKED"),
        35 => Some("IN_ORDER"),
        36 => Some("ORDER_PLATFORM"),
        37 => Some("SR_IOV"),
        38 => Some("NOTIFICATION_DATA"),
        39 => Some("NOTIF_CONFIG_DATA"),
        40 => Some("RING_RESET"),
        _ => None,
    };
    if generic.is_some() {
        return generic;
    }
    match device {
        DeviceType::Block => match bit {
            1 => Some("SIZE_MAX"),
            2 => Some("SEG_MAX"),
            4 => Some("GEOMETRY"),
            5 => Some("RO"),
            6 => Some("BLK_SIZE"),
            9 => Some("FLUSH"),
            10 => Some("TOPOLOGY"),
            11 => Some("CONFIG_WCE"),
            12 => Some("MQ"),
            13 => Some("DISCARD"),
            14 => Some("WRITE_ZEROES"),
            15 => Some("LIFETIME"),
            16 => Some("SECURE_ERASE"),
            17 => Some("ZONED"),
            _ => None,
        },
        DeviceType::Net => match bit {
            0 => Some("CSUM"),
            1 => Some("GUEST_CSUM"),
            2 => Some("CTRL_GUEST_OFFLOADS"),
            3 => Some("MTU"),
            5 => Some("MAC"),
            7 => Some("GUEST_TSO4"),
            8 => Some("GUEST_TSO6"),
            9 => Some("GUEST_ECN"),
            10 => Some("GUEST_UFO"),
            11 => Some("HOST_TSO4"),
            12 => Some("HOST_TSO6"),
            13 => Some("HOST_ECN"),
            14 => Some("HOST_UFO"),
            15 => Some("MRG_RXBUF"),
            16 => Some("STATUS"),
            17 => Some("CTRL_VQ"),
            18 => Some("CTRL_RX"),
            19 => Some("CTRL_VLAN"),
            20 => Some("CTRL_RX_EXTRA"),
            21 => Some("GUEST_ANNOUNCE"),
            22 => Some("MQ"),
            23 => Some("CTRL_MAC_ADDR"),
            _ => None,
        },
        _ => None,
    }
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

    #[test]
    fn feature_names_use_device_specific_bits() {
        let names = feature_names(DeviceType::Net, (1 << 5) | (1 << 32) | (1 << 50));
        assert_eq!(names, vec!["MAC", "VERSION_1", "bit50"]);
    }
}
