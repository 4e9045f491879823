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

    /// The highest `align`-aligned start (a power of two) at or above
    /// `floor` where `size` bytes fit in the range, below 2^63 (the top a
    /// 64-bit IOVA space can hand out without overflow arithmetic).
    pub fn top_window(&self, size: u64, align: u64, floor: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let top = self.last.saturating_add(1).min(1 << 63);
        let start = top.checked_sub(size)? & !(align - 1);
        (start >= floor && self.contains(start, size)).then_some(start)
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
    /// With VIRTIO_F_SUSPEND negotiated: the driver asks the device to
    /// suspend, the device shows it is (virtio 1.4 §2.1 "SUSPEND (16)",
    /// §3.4 "Device Suspend"). Not in virtio-bindings 0.2.7, whose headers
    /// predate it.
    pub const SUSPEND: u8 = 0x10;
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
    /// The driver can suspend the device with the SUSPEND status bit
    /// (virtio 1.4 §6, "VIRTIO_F_SUSPEND(43)"). Not in virtio-bindings
    /// 0.2.7; Linux's uapi headers do not have it either.
    pub const SUSPEND: u32 = 43;

    /// Mask with one bit set.
    pub const fn bit(n: u32) -> u64 {
        1u64 << n
    }
}

/// Virtio device types: every device id of the virtio 1.3 spec's table
/// (§5, "Device Types"), by device id, plus `Other` for any other id.
///
/// The ids are virtio-bindings' `VIRTIO_ID_*` (Linux's `virtio_ids.h`),
/// which has all but RDMA. Names ([`DeviceType::name`]) are those
/// constants' suffixes in lower case with `-` for `_`: `net`, `block`,
/// `9p`, `mac80211-wlan`. They are what `vdpa-bridge list`/`info` print
/// and what the type serializes as (a string; `Other(n)` as
/// `{"other": n}`).
///
/// Non-exhaustive: the spec keeps assigning ids, and a new one becomes a
/// variant here instead of `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeviceType {
    /// Network card (1).
    Net,
    /// Block device (2).
    Block,
    /// Console (3).
    Console,
    /// Entropy source (4).
    Rng,
    /// Memory ballooning, traditional (5).
    Balloon,
    /// ioMemory (6).
    IoMem,
    /// rpmsg (7).
    Rpmsg,
    /// SCSI host (8).
    Scsi,
    /// 9P transport (9).
    NineP,
    /// mac80211 wlan (10).
    Mac80211Wlan,
    /// rproc serial (11).
    RprocSerial,
    /// virtio CAIF (12).
    Caif,
    /// Memory balloon (13).
    MemoryBalloon,
    /// GPU device (16).
    Gpu,
    /// Timer/clock device (17).
    Clock,
    /// Input device (18).
    Input,
    /// Socket device (19).
    Vsock,
    /// Crypto device (20).
    Crypto,
    /// Signal distribution module (21).
    SignalDist,
    /// pstore device (22).
    Pstore,
    /// IOMMU device (23).
    Iommu,
    /// Memory device (24).
    Mem,
    /// Sound device (25).
    Sound,
    /// File system device (26).
    Fs,
    /// PMEM device (27).
    Pmem,
    /// RPMB device (28).
    Rpmb,
    /// mac80211 hwsim wireless simulation device (29).
    Mac80211Hwsim,
    /// Video encoder device (30).
    VideoEncoder,
    /// Video decoder device (31).
    VideoDecoder,
    /// SCMI device (32).
    Scmi,
    /// Nitro secure module (33).
    NitroSecMod,
    /// I2C adapter (34).
    I2cAdapter,
    /// Watchdog (35).
    Watchdog,
    /// CAN device (36).
    Can,
    /// dmabuf device (37): in Linux's `virtio_ids.h`, not in the spec's
    /// table.
    Dmabuf,
    /// Parameter server (38).
    ParamServ,
    /// Audio policy device (39).
    AudioPolicy,
    /// Bluetooth device (40).
    Bt,
    /// GPIO device (41).
    Gpio,
    /// RDMA device (42).
    Rdma,
    /// Any other id.
    Other(u32),
}

/// VIRTIO_ID_RDMA (virtio 1.3 §5): not in virtio-bindings 0.2.7.
const VIRTIO_ID_RDMA: u32 = 42;

impl DeviceType {
    /// Device type for a virtio device id. Derived from the one table, so
    /// the forward and reverse maps cannot disagree.
    pub fn from_id(id: u32) -> Self {
        Self::ALL
            .iter()
            .find(|(_, n, _)| *n == id)
            .map(|(t, _, _)| *t)
            .unwrap_or(DeviceType::Other(id))
    }

    /// Virtio device id.
    pub fn id(self) -> u32 {
        match self {
            DeviceType::Other(id) => id,
            t => Self::entry(t).map_or(0, |(_, n, _)| n),
        }
    }

    /// Short name (see the type's docs); `unknown` for [`DeviceType::Other`].
    pub fn name(self) -> &'static str {
        Self::entry(self).map_or("unknown", |(_, _, name)| name)
    }

    /// Every named type with its id and name, in id order.
    pub fn all() -> impl Iterator<Item = (DeviceType, u32, &'static str)> {
        Self::ALL.iter().copied()
    }

    fn entry(t: DeviceType) -> Option<(DeviceType, u32, &'static str)> {
        Self::ALL.iter().copied().find(|(k, _, _)| *k == t)
    }

    const ALL: [(DeviceType, u32, &'static str); 40] = {
        use virtio_bindings::virtio_ids as id;
        use DeviceType as T;
        [
            (T::Net, id::VIRTIO_ID_NET, "net"),
            (T::Block, id::VIRTIO_ID_BLOCK, "block"),
            (T::Console, id::VIRTIO_ID_CONSOLE, "console"),
            (T::Rng, id::VIRTIO_ID_RNG, "rng"),
            (T::Balloon, id::VIRTIO_ID_BALLOON, "balloon"),
            (T::IoMem, id::VIRTIO_ID_IOMEM, "iomem"),
            (T::Rpmsg, id::VIRTIO_ID_RPMSG, "rpmsg"),
            (T::Scsi, id::VIRTIO_ID_SCSI, "scsi"),
            (T::NineP, id::VIRTIO_ID_9P, "9p"),
            (
                T::Mac80211Wlan,
                id::VIRTIO_ID_MAC80211_WLAN,
                "mac80211-wlan",
            ),
            (T::RprocSerial, id::VIRTIO_ID_RPROC_SERIAL, "rproc-serial"),
            (T::Caif, id::VIRTIO_ID_CAIF, "caif"),
            (
                T::MemoryBalloon,
                id::VIRTIO_ID_MEMORY_BALLOON,
                "memory-balloon",
            ),
            (T::Gpu, id::VIRTIO_ID_GPU, "gpu"),
            (T::Clock, id::VIRTIO_ID_CLOCK, "clock"),
            (T::Input, id::VIRTIO_ID_INPUT, "input"),
            (T::Vsock, id::VIRTIO_ID_VSOCK, "vsock"),
            (T::Crypto, id::VIRTIO_ID_CRYPTO, "crypto"),
            (T::SignalDist, id::VIRTIO_ID_SIGNAL_DIST, "signal-dist"),
            (T::Pstore, id::VIRTIO_ID_PSTORE, "pstore"),
            (T::Iommu, id::VIRTIO_ID_IOMMU, "iommu"),
            (T::Mem, id::VIRTIO_ID_MEM, "mem"),
            (T::Sound, id::VIRTIO_ID_SOUND, "sound"),
            (T::Fs, id::VIRTIO_ID_FS, "fs"),
            (T::Pmem, id::VIRTIO_ID_PMEM, "pmem"),
            (T::Rpmb, id::VIRTIO_ID_RPMB, "rpmb"),
            (
                T::Mac80211Hwsim,
                id::VIRTIO_ID_MAC80211_HWSIM,
                "mac80211-hwsim",
            ),
            (
                T::VideoEncoder,
                id::VIRTIO_ID_VIDEO_ENCODER,
                "video-encoder",
            ),
            (
                T::VideoDecoder,
                id::VIRTIO_ID_VIDEO_DECODER,
                "video-decoder",
            ),
            (T::Scmi, id::VIRTIO_ID_SCMI, "scmi"),
            (T::NitroSecMod, id::VIRTIO_ID_NITRO_SEC_MOD, "nitro-sec-mod"),
            (T::I2cAdapter, id::VIRTIO_ID_I2C_ADAPTER, "i2c-adapter"),
            (T::Watchdog, id::VIRTIO_ID_WATCHDOG, "watchdog"),
            (T::Can, id::VIRTIO_ID_CAN, "can"),
            (T::Dmabuf, id::VIRTIO_ID_DMABUF, "dmabuf"),
            (T::ParamServ, id::VIRTIO_ID_PARAM_SERV, "param-serv"),
            (T::AudioPolicy, id::VIRTIO_ID_AUDIO_POLICY, "audio-policy"),
            (T::Bt, id::VIRTIO_ID_BT, "bt"),
            (T::Gpio, id::VIRTIO_ID_GPIO, "gpio"),
            (T::Rdma, VIRTIO_ID_RDMA, "rdma"),
        ]
    };
}

/// A named type serializes as its name (`"block"`), as the derived
/// `rename_all = "lowercase"` did for the first six; `Other(n)` as
/// `{"other": n}`, as before.
impl Serialize for DeviceType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            DeviceType::Other(id) => {
                s.serialize_newtype_variant("DeviceType", Self::ALL.len() as u32, "other", &id)
            }
            t => {
                let index = Self::ALL.iter().position(|(k, _, _)| *k == t).unwrap_or(0);
                s.serialize_unit_variant("DeviceType", index as u32, t.name())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_window_is_the_highest_aligned_start_above_the_floor() {
        let r = IovaRange {
            first: 0x1000,
            last: 0xff_ffff,
        };

        assert_eq!(r.top_window(0x3000, 0x1000, 0), Some(0xff_d000));
        assert_eq!(r.top_window(0x3000, 0x10_0000, 0), Some(0xf0_0000));
        assert_eq!(r.top_window(0x3000, 0x1000, 0xff_e000), None);
        assert_eq!(r.top_window(0x100_0000, 0x1000, 0), None);
        assert_eq!(r.top_window(0, 0x1000, 0), None);
        assert_eq!(r.top_window(0x1000, 0x3000, 0), None);
        // A 64-bit range hands out windows below 2^63.
        assert_eq!(
            IovaRange::FULL.top_window(0x1000, 0x1000, 0),
            Some((1 << 63) - 0x1000)
        );
    }

    #[test]
    fn device_type_maps_round_trip() {
        for id in 0..64 {
            assert_eq!(DeviceType::from_id(id).id(), id);
        }
        assert_eq!(DeviceType::from_id(2), DeviceType::Block);
        assert_eq!(DeviceType::from_id(5), DeviceType::Balloon);
        assert_eq!(DeviceType::from_id(14), DeviceType::Other(14));
    }

    /// Ids 1..=42 of the virtio 1.3 table are named, except the two the
    /// spec leaves out (14, 15); ids the table does not have are not.
    #[test]
    fn every_id_of_the_spec_table_is_named() {
        let unnamed: Vec<u32> = (0..64)
            .filter(|&id| matches!(DeviceType::from_id(id), DeviceType::Other(_)))
            .collect();
        let mut want = vec![0, 14, 15];
        want.extend(43..64);

        assert_eq!(unnamed, want);
    }

    #[test]
    fn names_are_unique_and_other_ids_are_unknown() {
        let mut names: Vec<&str> = DeviceType::all().map(|(_, _, n)| n).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();

        assert_eq!(names.len(), n);
        assert_eq!(DeviceType::from_id(9).name(), "9p");
        assert_eq!(DeviceType::from_id(20).name(), "crypto");
        assert_eq!(DeviceType::from_id(42).name(), "rdma");
        assert_eq!(DeviceType::Other(99).name(), "unknown");
    }

    /// The six names serialized before the table grew keep their form, and
    /// every named type serializes as its name.
    #[test]
    fn serialization_is_the_name_and_other_keeps_its_shape() {
        let json = |t: DeviceType| serde_json::to_string(&t).unwrap();

        for (t, name) in [
            (DeviceType::Net, "net"),
            (DeviceType::Block, "block"),
            (DeviceType::Console, "console"),
            (DeviceType::Rng, "rng"),
            (DeviceType::Scsi, "scsi"),
            (DeviceType::Fs, "fs"),
        ] {
            assert_eq!(json(t), format!("\"{name}\""));
        }
        for (t, _, name) in DeviceType::all() {
            assert_eq!(json(t), format!("\"{name}\""));
        }
        assert_eq!(json(DeviceType::Other(14)), r#"{"other":14}"#);
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
