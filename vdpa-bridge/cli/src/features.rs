//! Names of virtio feature bits, for `info`: derived from virtio-bindings'
//! constants where it has them (a name can only be attached to the bit the
//! crate says it is), from the virtio 1.3 spec otherwise (each such table
//! says so); generic bits first, then the device type's own.
//!
//! Device types with a table: net, block, console, entropy (none defined),
//! balloon, SCSI, GPU, input (none defined), vsock, crypto, IOMMU, memory,
//! sound, file system, PMEM and 9P. Other types show their device-specific
//! bits as `bitN`.

use vdpa_bridge::types::DeviceType;
use virtio_bindings::virtio_ring as ring;
use virtio_bindings::{
    virtio_blk as blk, virtio_config as cfg, virtio_gpu as gpu, virtio_net as net,
    virtio_scsi as scsi,
};

/// Feature bits every device type shares (virtio 1.3 §6, and 1.4's SUSPEND).
const GENERIC: &[(u32, &str)] = &[
    (cfg::VIRTIO_F_NOTIFY_ON_EMPTY, "NOTIFY_ON_EMPTY"),
    (cfg::VIRTIO_F_ANY_LAYOUT, "ANY_LAYOUT"),
    (ring::VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
    (ring::VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
    (cfg::VIRTIO_F_VERSION_1, "VERSION_1"),
    (cfg::VIRTIO_F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
    (cfg::VIRTIO_F_RING_PACKED, "RING_PACKED"),
    (cfg::VIRTIO_F_IN_ORDER, "IN_ORDER"),
    (cfg::VIRTIO_F_ORDER_PLATFORM, "ORDER_PLATFORM"),
    (cfg::VIRTIO_F_SR_IOV, "SR_IOV"),
    (cfg::VIRTIO_F_NOTIFICATION_DATA, "NOTIFICATION_DATA"),
    (cfg::VIRTIO_F_NOTIF_CONFIG_DATA, "NOTIF_CONFIG_DATA"),
    (cfg::VIRTIO_F_RING_RESET, "RING_RESET"),
    (cfg::VIRTIO_F_ADMIN_VQ, "ADMIN_VQ"),
    // Virtio 1.4; not in virtio-bindings 0.2.7.
    (vdpa_bridge::types::features::SUSPEND, "SUSPEND"),
];

/// virtio-blk (virtio 1.3 §5.2.3, legacy bits from §5.2.3.1).
const BLOCK: &[(u32, &str)] = &[
    (blk::VIRTIO_BLK_F_BARRIER, "BARRIER"),
    (blk::VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
    (blk::VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
    (blk::VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
    (blk::VIRTIO_BLK_F_RO, "RO"),
    (blk::VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
    (blk::VIRTIO_BLK_F_SCSI, "SCSI"),
    (blk::VIRTIO_BLK_F_FLUSH, "FLUSH"),
    (blk::VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
    (blk::VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
    (blk::VIRTIO_BLK_F_MQ, "MQ"),
    (blk::VIRTIO_BLK_F_DISCARD, "DISCARD"),
    (blk::VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
    // VIRTIO_BLK_F_LIFETIME (virtio 1.2) is not in virtio-bindings 0.2.7.
    (15, "LIFETIME"),
    (blk::VIRTIO_BLK_F_SECURE_ERASE, "SECURE_ERASE"),
    (blk::VIRTIO_BLK_F_ZONED, "ZONED"),
];

/// virtio-net (virtio 1.3 §5.1.3, legacy GSO from §5.1.3.2).
const NET: &[(u32, &str)] = &[
    (net::VIRTIO_NET_F_CSUM, "CSUM"),
    (net::VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
    (net::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"),
    (net::VIRTIO_NET_F_MTU, "MTU"),
    (net::VIRTIO_NET_F_MAC, "MAC"),
    (net::VIRTIO_NET_F_GSO, "GSO"),
    (net::VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
    (net::VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
    (net::VIRTIO_NET_F_GUEST_ECN, "GUEST_ECN"),
    (net::VIRTIO_NET_F_GUEST_UFO, "GUEST_UFO"),
    (net::VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
    (net::VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
    (net::VIRTIO_NET_F_HOST_ECN, "HOST_ECN"),
    (net::VIRTIO_NET_F_HOST_UFO, "HOST_UFO"),
    (net::VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
    (net::VIRTIO_NET_F_STATUS, "STATUS"),
    (net::VIRTIO_NET_F_CTRL_VQ, "CTRL_VQ"),
    (net::VIRTIO_NET_F_CTRL_RX, "CTRL_RX"),
    (net::VIRTIO_NET_F_CTRL_VLAN, "CTRL_VLAN"),
    (net::VIRTIO_NET_F_CTRL_RX_EXTRA, "CTRL_RX_EXTRA"),
    (net::VIRTIO_NET_F_GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
    (net::VIRTIO_NET_F_MQ, "MQ"),
    (net::VIRTIO_NET_F_CTRL_MAC_ADDR, "CTRL_MAC_ADDR"),
    (net::VIRTIO_NET_F_DEVICE_STATS, "DEVICE_STATS"),
    (net::VIRTIO_NET_F_VQ_NOTF_COAL, "VQ_NOTF_COAL"),
    (net::VIRTIO_NET_F_NOTF_COAL, "NOTF_COAL"),
    (net::VIRTIO_NET_F_GUEST_USO4, "GUEST_USO4"),
    (net::VIRTIO_NET_F_GUEST_USO6, "GUEST_USO6"),
    (net::VIRTIO_NET_F_HOST_USO, "HOST_USO"),
    (net::VIRTIO_NET_F_HASH_REPORT, "HASH_REPORT"),
    (net::VIRTIO_NET_F_GUEST_HDRLEN, "GUEST_HDRLEN"),
    (net::VIRTIO_NET_F_RSS, "RSS"),
    (net::VIRTIO_NET_F_RSC_EXT, "RSC_EXT"),
    (net::VIRTIO_NET_F_STANDBY, "STANDBY"),
    (net::VIRTIO_NET_F_SPEED_DUPLEX, "SPEED_DUPLEX"),
];

/// virtio-console (virtio 1.3 §5.3.3). virtio-bindings 0.2.7 has no
/// `virtio_console`: the bits are the spec's.
const CONSOLE: &[(u32, &str)] = &[(0, "SIZE"), (1, "MULTIPORT"), (2, "EMERG_WRITE")];

/// Traditional memory balloon (virtio 1.3 §5.5.3). virtio-bindings 0.2.7
/// has no `virtio_balloon`: the bits are the spec's.
const BALLOON: &[(u32, &str)] = &[
    (0, "MUST_TELL_HOST"),
    (1, "STATS_VQ"),
    (2, "DEFLATE_ON_OOM"),
    (3, "FREE_PAGE_HINT"),
    (4, "PAGE_POISON"),
    (5, "PAGE_REPORTING"),
];

/// SCSI host (virtio 1.3 §5.6.3).
const SCSI: &[(u32, &str)] = &[
    (scsi::VIRTIO_SCSI_F_INOUT, "INOUT"),
    (scsi::VIRTIO_SCSI_F_HOTPLUG, "HOTPLUG"),
    (scsi::VIRTIO_SCSI_F_CHANGE, "CHANGE"),
    (scsi::VIRTIO_SCSI_F_T10_PI, "T10_PI"),
];

/// GPU (virtio 1.3 §5.7.3).
const GPU: &[(u32, &str)] = &[
    (gpu::VIRTIO_GPU_F_VIRGL, "VIRGL"),
    (gpu::VIRTIO_GPU_F_EDID, "EDID"),
    (gpu::VIRTIO_GPU_F_RESOURCE_UUID, "RESOURCE_UUID"),
    (gpu::VIRTIO_GPU_F_RESOURCE_BLOB, "RESOURCE_BLOB"),
    (gpu::VIRTIO_GPU_F_CONTEXT_INIT, "CONTEXT_INIT"),
];

/// Crypto (virtio 1.3 §5.9.3). Not in virtio-bindings 0.2.7: the spec's.
const CRYPTO: &[(u32, &str)] = &[
    (0, "REVISION_1"),
    (1, "CIPHER_STATELESS_MODE"),
    (2, "HASH_STATELESS_MODE"),
    (3, "MAC_STATELESS_MODE"),
    (4, "AEAD_STATELESS_MODE"),
    (5, "AKCIPHER_STATELESS_MODE"),
];

/// Socket (virtio 1.3 §5.10.3). Not in virtio-bindings 0.2.7: the spec's.
const VSOCK: &[(u32, &str)] = &[(0, "STREAM"), (1, "SEQPACKET")];

/// File system (virtio 1.3 §5.11.3). Not in virtio-bindings 0.2.7: the
/// spec's.
const FS: &[(u32, &str)] = &[(0, "NOTIFICATION")];

/// IOMMU (virtio 1.3 §5.13.3). Not in virtio-bindings 0.2.7: the spec's.
const IOMMU: &[(u32, &str)] = &[
    (0, "INPUT_RANGE"),
    (1, "DOMAIN_RANGE"),
    (2, "MAP_UNMAP"),
    (3, "BYPASS"),
    (4, "PROBE"),
    (5, "MMIO"),
    (6, "BYPASS_CONFIG"),
];

/// Sound (virtio 1.3 §5.14.3). Not in virtio-bindings 0.2.7: the spec's.
const SOUND: &[(u32, &str)] = &[(0, "CTLS")];

/// Memory device (virtio 1.3 §5.15.3). Not in virtio-bindings 0.2.7: the
/// spec's.
const MEM: &[(u32, &str)] = &[
    (0, "ACPI_PXM"),
    (1, "UNPLUGGED_INACCESSIBLE"),
    (2, "PERSISTENT_SUSPEND"),
];

/// PMEM (virtio 1.3 §5.19.3). Not in virtio-bindings 0.2.7: the spec's.
const PMEM: &[(u32, &str)] = &[(0, "SHMEM_REGION")];

/// 9P transport: `VIRTIO_9P_MOUNT_TAG` (Linux's `virtio_9p.h`; the spec
/// has no 9P section). Not in virtio-bindings 0.2.7.
const NINE_P: &[(u32, &str)] = &[(0, "MOUNT_TAG")];

/// The device-specific bits of `device`. Entropy and input devices define
/// none (virtio 1.3 §5.4.3, §5.8.3).
fn device_bits(device: DeviceType) -> &'static [(u32, &'static str)] {
    match device {
        DeviceType::Net => NET,
        DeviceType::Block => BLOCK,
        DeviceType::Console => CONSOLE,
        DeviceType::Balloon => BALLOON,
        DeviceType::Scsi => SCSI,
        DeviceType::NineP => NINE_P,
        DeviceType::Gpu => GPU,
        DeviceType::Vsock => VSOCK,
        DeviceType::Crypto => CRYPTO,
        DeviceType::Iommu => IOMMU,
        DeviceType::Mem => MEM,
        DeviceType::Sound => SOUND,
        DeviceType::Fs => FS,
        DeviceType::Pmem => PMEM,
        _ => &[],
    }
}

/// Every device-specific table, with its type (for the tests).
#[cfg(test)]
const TABLES: &[(DeviceType, &[(u32, &str)])] = &[
    (DeviceType::Net, NET),
    (DeviceType::Block, BLOCK),
    (DeviceType::Console, CONSOLE),
    (DeviceType::Balloon, BALLOON),
    (DeviceType::Scsi, SCSI),
    (DeviceType::NineP, NINE_P),
    (DeviceType::Gpu, GPU),
    (DeviceType::Vsock, VSOCK),
    (DeviceType::Crypto, CRYPTO),
    (DeviceType::Iommu, IOMMU),
    (DeviceType::Mem, MEM),
    (DeviceType::Sound, SOUND),
    (DeviceType::Fs, FS),
    (DeviceType::Pmem, PMEM),
];

/// Name of one feature bit, device-specific bits (0..24) included.
pub fn feature_name(device: DeviceType, bit: u32) -> Option<&'static str> {
    let find = |t: &[(u32, &'static str)]| t.iter().find(|(b, _)| *b == bit).map(|(_, n)| *n);
    find(GENERIC).or_else(|| find(device_bits(device)))
}

/// Names of the set bits of a feature word (`bitN` for unnamed bits).
pub fn feature_names(device: DeviceType, bits: u64) -> Vec<String> {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| feature_name(device, b).map_or_else(|| format!("bit{b}"), str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names_use_device_specific_bits() {
        let names = feature_names(DeviceType::Net, (1 << 5) | (1 << 32) | (1 << 51));
        assert_eq!(names, vec!["MAC", "VERSION_1", "bit51"]);
        assert_eq!(feature_name(DeviceType::Block, 9), Some("FLUSH"));
        assert_eq!(feature_name(DeviceType::Rng, 5), None);
    }

    /// What QEMU's devices offer, by name (the lab checks the same on the
    /// real devices).
    #[test]
    fn common_types_name_their_bits() {
        assert_eq!(
            feature_names(DeviceType::Console, 0b110),
            ["MULTIPORT", "EMERG_WRITE"]
        );
        assert_eq!(
            feature_names(DeviceType::Balloon, (1 << 1) | (1 << 2) | (1 << 5)),
            ["STATS_VQ", "DEFLATE_ON_OOM", "PAGE_REPORTING"]
        );
        assert_eq!(
            feature_names(DeviceType::Crypto, 1 << 24),
            ["NOTIFY_ON_EMPTY"]
        );
        assert_eq!(feature_name(DeviceType::Net, 60), Some("RSS"));
        assert_eq!(feature_name(DeviceType::Iommu, 6), Some("BYPASS_CONFIG"));
        assert_eq!(feature_name(DeviceType::Gpu, 1), Some("EDID"));
        assert_eq!(feature_name(DeviceType::Vsock, 1), Some("SEQPACKET"));
        assert_eq!(feature_name(DeviceType::Input, 0), None);
        assert_eq!(feature_name(DeviceType::Other(99), 0), None);
    }

    #[test]
    fn no_two_names_share_a_bit() {
        for (t, table) in TABLES {
            let mut bits: Vec<u32> = GENERIC.iter().chain(*table).map(|(b, _)| *b).collect();
            bits.sort_unstable();
            let n = bits.len();
            bits.dedup();
            assert_eq!(bits.len(), n, "{t:?}");
        }
    }

    /// Device-specific bits live in 0..=23 and 50..=63 (virtio 1.3 §6);
    /// generic ones in between.
    #[test]
    fn bits_lie_in_their_ranges() {
        for (t, table) in TABLES {
            assert!(
                table.iter().all(|(b, _)| *b <= 23 || (50..=63).contains(b)),
                "{t:?}"
            );
            assert_eq!(device_bits(*t).len(), table.len(), "{t:?}");
        }
        assert!(GENERIC.iter().all(|(b, _)| (24..=49).contains(b)));
    }
}
