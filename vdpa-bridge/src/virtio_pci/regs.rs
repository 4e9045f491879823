//! Register layouts of the modern virtio-pci transport, declared once as
//! types (virtio 1.2 §4.1.4). virtio-bindings ships no `virtio_pci.h`, so
//! this crate owns them; offsets are checked at compile time.

use std::mem::{offset_of, size_of};

/// `cfg_type` values of virtio vendor capabilities (virtio 1.2 §4.1.4).
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access.
    pub const PCI: u8 = 5;
    /// Shared memory region.
    pub const SHARED_MEMORY: u8 = 8;
    /// Vendor-specific data.
    pub const VENDOR: u8 = 9;
}

/// `struct virtio_pci_cap` (virtio 1.2 §4.1.4): the generic part of every
/// virtio vendor capability, at its offset in PCI config space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioPciCap {
    /// PCI capability id (0x09, vendor-specific).
    pub cap_vndr: u8,
    /// Offset of the next capability.
    pub cap_next: u8,
    /// Length of this capability structure.
    pub cap_len: u8,
    /// Which structure this capability describes.
    pub cfg_type: u8,
    /// BAR holding the structure.
    pub bar: u8,
    /// Identifies multiple capabilities of the same type.
    pub id: u8,
    /// Padding.
    pub padding: [u8; 2],
    /// Offset of the structure in the BAR (little-endian).
    pub offset: u32,
    /// Length of the structure (little-endian).
    pub length: u32,
}

/// `struct virtio_pci_notify_cap` (virtio 1.2 §4.1.4.4): the notify
/// capability carries the multiplier right after the generic part.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioPciNotifyCap {
    /// Generic part.
    pub cap: VirtioPciCap,
    /// Multiplier for `queue_notify_off` (little-endian).
    pub notify_off_multiplier: u32,
}

const _: () = assert!(size_of::<VirtioPciCap>() == 16);
const _: () = assert!(offset_of!(VirtioPciCap, cfg_type) == 3);
const _: () = assert!(offset_of!(VirtioPciCap, bar) == 4);
const _: () = assert!(offset_of!(VirtioPciCap, offset) == 8);
const _: () = assert!(offset_of!(VirtioPciCap, length) == 12);
const _: () = assert!(offset_of!(VirtioPciNotifyCap, notify_off_multiplier) == 16);

impl VirtioPciCap {
    /// Decode from the capability's bytes in config space (little-endian).
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        VirtioPciCap {
            cap_vndr: b[0],
            cap_next: b[1],
            cap_len: b[2],
            cfg_type: b[3],
            bar: b[4],
            id: b[5],
            padding: [b[6], b[7]],
            offset: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            length: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// `struct virtio_pci_common_cfg` (virtio 1.2 §4.1.4.3). Fields are
/// little-endian device registers; the transport accesses them by offset
/// with the width of the field, never as a whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CommonCfg {
    /// read-write: selects which 32 feature bits `device_feature` shows.
    pub device_feature_select: u32,
    /// read-only: 32 bits of device features.
    pub device_feature: u32,
    /// read-write: selects which 32 bits `driver_feature` sets.
    pub driver_feature_select: u32,
    /// read-write: 32 bits of driver features.
    pub driver_feature: u32,
    /// read-write: MSI-X vector for configuration changes.
    pub config_msix_vector: u16,
    /// read-only: number of queues.
    pub num_queues: u16,
    /// read-write: device status.
    pub device_status: u8,
    /// read-only: configuration atomicity value.
    pub config_generation: u8,
    /// read-write: queue the following fields refer to.
    pub queue_select: u16,
    /// read-write: queue size (max on reset, 0 = unavailable).
    pub queue_size: u16,
    /// read-write: MSI-X vector for this queue.
    pub queue_msix_vector: u16,
    /// read-write: queue enabled.
    pub queue_enable: u16,
    /// read-only: notify offset of this queue, in multiplier units.
    pub queue_notify_off: u16,
    /// read-write: descriptor area.
    pub queue_desc: u64,
    /// read-write: driver area.
    pub queue_driver: u64,
    /// read-write: device area.
    pub queue_device: u64,
}

const _: () = assert!(size_of::<CommonCfg>() == 0x38);
const _: () = assert!(offset_of!(CommonCfg, device_feature) == 0x04);
const _: () = assert!(offset_of!(CommonCfg, driver_feature_select) == 0x08);
const _: () = assert!(offset_of!(CommonCfg, driver_feature) == 0x0c);
const _: () = assert!(offset_of!(CommonCfg, config_msix_vector) == 0x10);
const _: () = assert!(offset_of!(CommonCfg, num_queues) == 0x12);
const _: () = assert!(offset_of!(CommonCfg, device_status) == 0x14);
const _: () = assert!(offset_of!(CommonCfg, config_generation) == 0x15);
const _: () = assert!(offset_of!(CommonCfg, queue_select) == 0x16);
const _: () = assert!(offset_of!(CommonCfg, queue_size) == 0x18);
const _: () = assert!(offset_of!(CommonCfg, queue_msix_vector) == 0x1a);
const _: () = assert!(offset_of!(CommonCfg, queue_enable) == 0x1c);
const _: () = assert!(offset_of!(CommonCfg, queue_notify_off) == 0x1e);
const _: () = assert!(offset_of!(CommonCfg, queue_desc) == 0x20);
const _: () = assert!(offset_of!(CommonCfg, queue_driver) == 0x28);
const _: () = assert!(offset_of!(CommonCfg, queue_device) == 0x30);

/// Register offsets in [`CommonCfg`], derived from the type.
pub mod common {
    use super::CommonCfg;
    use std::mem::offset_of;

    /// `device_feature_select`.
    pub const DEVICE_FEATURE_SELECT: u64 = offset_of!(CommonCfg, device_feature_select) as u64;
    /// `device_feature`.
    pub const DEVICE_FEATURE: u64 = offset_of!(CommonCfg, device_feature) as u64;
    /// `driver_feature_select`.
    pub const DRIVER_FEATURE_SELECT: u64 = offset_of!(CommonCfg, driver_feature_select) as u64;
    /// `driver_feature`.
    pub const DRIVER_FEATURE: u64 = offset_of!(CommonCfg, driver_feature) as u64;
    /// `config_msix_vector`.
    pub const CONFIG_MSIX_VECTOR: u64 = offset_of!(CommonCfg, config_msix_vector) as u64;
    /// `num_queues`.
    pub const NUM_QUEUES: u64 = offset_of!(CommonCfg, num_queues) as u64;
    /// `device_status`.
    pub const DEVICE_STATUS: u64 = offset_of!(CommonCfg, device_status) as u64;
    /// `config_generation`.
    pub const CONFIG_GENERATION: u64 = offset_of!(CommonCfg, config_generation) as u64;
    /// `queue_select`.
    pub const QUEUE_SELECT: u64 = offset_of!(CommonCfg, queue_select) as u64;
    /// `queue_size`.
    pub const QUEUE_SIZE: u64 = offset_of!(CommonCfg, queue_size) as u64;
    /// `queue_msix_vector`.
    pub const QUEUE_MSIX_VECTOR: u64 = offset_of!(CommonCfg, queue_msix_vector) as u64;
    /// `queue_enable`.
    pub const QUEUE_ENABLE: u64 = offset_of!(CommonCfg, queue_enable) as u64;
    /// `queue_notify_off`.
    pub const QUEUE_NOTIFY_OFF: u64 = offset_of!(CommonCfg, queue_notify_off) as u64;
    /// `queue_desc` (low 32 bits; high at +4).
    pub const QUEUE_DESC: u64 = offset_of!(CommonCfg, queue_desc) as u64;
    /// `queue_driver` (low 32 bits; high at +4).
    pub const QUEUE_DRIVER: u64 = offset_of!(CommonCfg, queue_driver) as u64;
    /// `queue_device` (low 32 bits; high at +4).
    pub const QUEUE_DEVICE: u64 = offset_of!(CommonCfg, queue_device) as u64;
    /// Size of the structure up to and including `queue_device`.
    pub const LEN: u64 = size_of::<CommonCfg>() as u64;
    use std::mem::size_of;
}

/// MSI-X "no vector" value (virtio 1.2 §4.1.4.3).
pub const NO_VECTOR: u16 = 0xffff;

/// ISR status bits (virtio 1.2 §4.1.4.5).
pub mod isr {
    /// A queue interrupt.
    pub const QUEUE: u8 = 1;
    /// A configuration change.
    pub const CONFIG: u8 = 2;
}
