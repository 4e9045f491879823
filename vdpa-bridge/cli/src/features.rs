//! Names of virtio feature bits, for `info`: derived from virtio-bindings'
//! constants (a name can only be attached to the bit the crate says it is),
//! generic bits first, then the device type's own.

use vdpa_bridge::types::DeviceType;
use virtio_bindings::virtio_ring as ring;
use virtio_bindings::{virtio_blk as blk, virtio_config as cfg, virtio_net as net};

/// Feature bits every device type shares (virtio 1.2 §6).
const GENERIC: &[(u32, &str)] = &[
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
];

/// virtio-blk (virtio 1.2 §5.2.3).
const BLOCK: &[(u32, &str)] = &[
    (blk::VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
    (blk::VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
    (blk::VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
    (blk::VIRTIO_BLK_F_RO, "RO"),
    (blk::VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
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

/// virtio-net (virtio 1.2 §5.1.3).
const NET: &[(u32, &str)] = &[
    (net::VIRTIO_NET_F_CSUM, "CSUM"),
    (net::VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
    (net::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"),
    (net::VIRTIO_NET_F_MTU, "MTU"),
    (net::VIRTIO_NET_F_MAC, "MAC"),
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
];

fn device_bits(device: DeviceType) -> &'static [(u32, &'static str)] {
    match device {
        DeviceType::Block => BLOCK,
        DeviceType::Net => NET,
        _ => &[],
    }
}

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
        let names = feature_names(DeviceType::Net, (1 << 5) | (1 << 32) | (1 << 50));
        assert_eq!(names, vec!["MAC", "VERSION_1", "bit50"]);
        assert_eq!(feature_name(DeviceType::Block, 9), Some("FLUSH"));
        assert_eq!(feature_name(DeviceType::Rng, 5), None);
    }

    #[test]
    fn no_two_names_share_a_bit() {
        for t in [BLOCK, NET] {
            let mut bits: Vec<u32> = GENERIC.iter().chain(t).map(|(b, _)| *b).collect();
            bits.sort_unstable();
            let n = bits.len();
            bits.dedup();
            assert_eq!(bits.len(), n);
        }
    }
}
