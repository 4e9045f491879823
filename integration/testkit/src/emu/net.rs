//! virtio-net personality of the emulated device (virtio 1.3 §5.1): the
//! control queue (receive modes, MAC address and filter table, VLAN
//! filters, queue pairs, guest offloads) with the state a real device
//! keeps and forgets at reset, as QEMU's virtio-net does (promiscuous by
//! default). Transmit buffers are completed unsent; receive buffers are
//! kept (no packets arrive).

use std::collections::BTreeSet;

use virtio_bindings::virtio_net as n;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use super::blk::Broken;
use super::dma::DevMem as GuestMemoryMmap;

/// Length of the device config: mac, status, max_virtqueue_pairs, mtu.
pub(super) const CONFIG_LEN: usize = 12;
/// The MAC address at reset.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The net features the device offers (with a control queue and all it
/// carries).
pub(super) fn features(pairs: u16) -> u64 {
    let mut f = [
        n::VIRTIO_NET_F_MAC,
        n::VIRTIO_NET_F_STATUS,
        n::VIRTIO_NET_F_CTRL_VQ,
        n::VIRTIO_NET_F_CTRL_RX,
        n::VIRTIO_NET_F_CTRL_VLAN,
        n::VIRTIO_NET_F_CTRL_MAC_ADDR,
        n::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    ]
    .iter()
    .fold(0u64, |f, b| f | 1 << b);
    if pairs > 1 {
        f |= 1 << n::VIRTIO_NET_F_MQ;
    }
    f
}

/// What the control queue set (and a reset forgets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    /// `VIRTIO_NET_CTRL_RX_*` flags by command (promisc, allmulti, alluni,
    /// nomulti, nouni, nobcast).
    pub rx: [bool; 6],
    /// The MAC address.
    pub mac: [u8; 6],
    /// The last `VIRTIO_NET_CTRL_MAC_TABLE_SET` data.
    pub mac_table: Vec<u8>,
    /// VLAN ids let through.
    pub vlans: BTreeSet<u16>,
    /// Active queue pairs.
    pub pairs: u16,
    /// Guest offloads.
    pub offloads: u64,
    /// Control commands handled since the reset.
    pub commands: u64,
}

impl Default for NetState {
    fn default() -> Self {
        NetState {
            rx: [true, false, false, false, false, false],
            mac: DEFAULT_MAC,
            mac_table: Vec::new(),
            vlans: BTreeSet::new(),
            pairs: 1,
            offloads: 0,
            commands: 0,
        }
    }
}

/// The device config.
pub(super) fn config(st: &NetState, pairs: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[..6].copy_from_slice(&st.mac);
    c[6..8].copy_from_slice(&1u16.to_le_bytes()); // link up
    c[8..10].copy_from_slice(&pairs.to_le_bytes());
    c[10..12].copy_from_slice(&1500u16.to_le_bytes());
    c
}

/// Handle one control request: apply it and write its ack.
pub(super) fn control(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    st: &mut NetState,
    max_pairs: u16,
) -> Result<u32, Broken> {
    let descs: Vec<Descriptor> = chain.collect();
    let (ack, body) = match descs.split_last() {
        Some((a, b)) if a.is_write_only() && a.len() >= 1 && !b.is_empty() => (a, b),
        _ => return Err(Broken),
    };
    let mut bytes = Vec::new();
    for d in body.iter().take_while(|d| !d.is_write_only()) {
        let start = bytes.len();
        bytes.resize(start + d.len() as usize, 0);
        mem.read_slice(&mut bytes[start..], d.addr())
            .map_err(|_| Broken)?;
    }
    let ok = bytes.len() >= 2 && apply(st, bytes[0], bytes[1], &bytes[2..], max_pairs);
    if ok {
        st.commands += 1;
    }
    let v = if ok {
        n::VIRTIO_NET_OK
    } else {
        n::VIRTIO_NET_ERR
    } as u8;
    mem.write_obj(v, ack.addr()).map_err(|_| Broken)?;
    Ok(1)
}

fn apply(st: &mut NetState, class: u8, cmd: u8, data: &[u8], max_pairs: u16) -> bool {
    let u16_at = |d: &[u8]| d.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    match (u32::from(class), u32::from(cmd)) {
        (n::VIRTIO_NET_CTRL_RX, c) if c < 6 && data.len() == 1 => {
            st.rx[c as usize] = data[0] != 0;
            true
        }
        (n::VIRTIO_NET_CTRL_MAC, n::VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
            st.mac_table = data.to_vec();
            true
        }
        (n::VIRTIO_NET_CTRL_MAC, n::VIRTIO_NET_CTRL_MAC_ADDR_SET) if data.len() == 6 => {
            st.mac.copy_from_slice(data);
            true
        }
        (n::VIRTIO_NET_CTRL_VLAN, c) => match u16_at(data) {
            Some(v) if v < 4096 && c == n::VIRTIO_NET_CTRL_VLAN_ADD => {
                st.vlans.insert(v);
                true
            }
            Some(v) if v < 4096 && c == n::VIRTIO_NET_CTRL_VLAN_DEL => {
                st.vlans.remove(&v);
                true
            }
            _ => false,
        },
        (n::VIRTIO_NET_CTRL_MQ, n::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => match u16_at(data) {
            Some(p) if p >= 1 && p <= max_pairs => {
                st.pairs = p;
                true
            }
            _ => false,
        },
        (n::VIRTIO_NET_CTRL_GUEST_OFFLOADS, n::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET) => {
            match data.get(..8) {
                Some(b) => {
                    st.offloads = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}
