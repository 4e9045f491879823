//! A virtio-net device's control-queue state: what the guest's driver set
//! through the control queue (MAC address and filters, receive modes,
//! VLAN filters, active queue pairs and RSS, guest offloads, interrupt
//! coalescing) lives only in the device and is lost when the bridge resets
//! it (a switch to shadow rings, a pause without suspend, a restore on
//! another device). The bridge therefore sees every command: in direct
//! mode the control queue's kicks go through the relay thread, which
//! reads the commands the guest published before ringing the device
//! (`ControlWatch::catch_up`); on shadow rings the relay reads each one it
//! offers, and records it once the device answered it, with its ack: a
//! refused command is dropped, an accepted one replaces the earlier ones
//! of its kind. In direct mode the ack cannot be read reliably (the guest
//! reuses the ack buffer as soon as it sees the answer), so the last few
//! commands of each kind are kept in order and all replayed: one the
//! device refused is refused again, leaving the same state.
//!
//! After such a reset the commands are replayed on the shadow control
//! queue before any guest request (see `shadow.rs`), in the order QEMU's
//! vhost-vdpa restores them (MAC, queue pairs, offloads, receive filters,
//! VLANs). [`NetControlState`] travels in the device state.
//!
//! virtio-bindings 0.2.7 has the `VIRTIO_NET_CTRL_*` classes and commands;
//! its `virtio_net` module is used for them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net as n;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::shadow::{walk, Seg};

/// Most bytes of one command's data that are recorded (a MAC table of
/// about 10,000 addresses); a longer command is not replayed (logged).
pub const MAX_COMMAND: usize = 64 << 10;
/// Most commands kept (VLAN filters apart).
const MAX_KEPT: usize = 512;
/// Most bytes of command data kept in all (a state stays small enough to
/// replay and to save).
pub const MAX_TOTAL: usize = 1 << 20;
/// Most commands of one kind kept while their acks are unknown.
const UNVERIFIED_PER_KIND: usize = 4;

/// One control command: class, command and its data (virtio 1.3 §5.1.6.5).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlCommand {
    /// `VIRTIO_NET_CTRL_*` class.
    pub class: u8,
    /// Command within the class.
    pub command: u8,
    /// The command's data (what follows class and command in the
    /// driver-readable buffers).
    pub data: Vec<u8>,
}

/// What the guest's driver set through the control queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetControlState {
    /// The commands that set state, oldest first: of each kind (class and
    /// command, and the queue of per-queue coalescing) the last one the
    /// device accepted, or the last few sent when their acks are unknown.
    /// A list, not a map: JSON has no tuple keys.
    pub commands: Vec<ControlCommand>,
    /// VLAN ids the filter passes (`VIRTIO_NET_CTRL_VLAN_ADD` minus `_DEL`).
    pub vlans: BTreeSet<u16>,
}

const CLASS_RX: u8 = n::VIRTIO_NET_CTRL_RX as u8;
const CLASS_MAC: u8 = n::VIRTIO_NET_CTRL_MAC as u8;
const CLASS_VLAN: u8 = n::VIRTIO_NET_CTRL_VLAN as u8;
const CLASS_MQ: u8 = n::VIRTIO_NET_CTRL_MQ as u8;
const CLASS_OFFLOADS: u8 = n::VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8;
const CLASS_COAL: u8 = n::VIRTIO_NET_CTRL_NOTF_COAL as u8;
const MAC_ADDR_SET: u8 = n::VIRTIO_NET_CTRL_MAC_ADDR_SET as u8;
const VLAN_ADD: u8 = n::VIRTIO_NET_CTRL_VLAN_ADD as u8;
const VLAN_DEL: u8 = n::VIRTIO_NET_CTRL_VLAN_DEL as u8;
const MQ_VQ_PAIRS_SET: u8 = n::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
const MQ_RSS_CONFIG: u8 = n::VIRTIO_NET_CTRL_MQ_RSS_CONFIG as u8;
const MQ_HASH_CONFIG: u8 = n::VIRTIO_NET_CTRL_MQ_HASH_CONFIG as u8;
const COAL_VQ_SET: u8 = n::VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET as u8;
const COAL_VQ_GET: u8 = n::VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET as u8;

impl NetControlState {
    /// The kind of a state-setting command (`None`: it sets nothing the
    /// bridge replays, or is a VLAN filter, kept as a set).
    fn kind(class: u8, command: u8, data: &[u8]) -> Option<(u8, u8, u16)> {
        // Commands of a fixed size (virtio 1.3 §5.1.6.5) must have it.
        let fixed = match (class, command) {
            (CLASS_RX, _) => Some(1),
            (CLASS_MAC, MAC_ADDR_SET) => Some(6),
            (CLASS_MQ, MQ_VQ_PAIRS_SET) => Some(2),
            (CLASS_OFFLOADS, _) => Some(8),
            (CLASS_COAL, COAL_VQ_SET) => Some(12),
            (CLASS_COAL, _) => Some(8),
            _ => None,
        };
        if fixed.is_some_and(|n| data.len() != n) {
            return None;
        }
        match (class, command) {
            (CLASS_RX, 0..=5) | (CLASS_MAC, 0..=1) | (CLASS_OFFLOADS, 0) => {
                Some((class, command, 0))
            }
            // Queue pairs and RSS both set the active pairs: the last wins.
            (CLASS_MQ, MQ_VQ_PAIRS_SET | MQ_RSS_CONFIG) => Some((class, MQ_VQ_PAIRS_SET, 0)),
            (CLASS_MQ, MQ_HASH_CONFIG) => Some((class, command, 0)),
            (CLASS_COAL, COAL_VQ_SET) => {
                let vq = data
                    .get(..2)
                    .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
                Some((class, command, vq))
            }
            (CLASS_COAL, c) if c < COAL_VQ_GET => Some((class, command, 0)),
            _ => None,
        }
    }

    /// Note a command the guest sent and whether the device accepted it
    /// (`None`: not known). Commands that set nothing (queries,
    /// announcement acks, unknown classes) and refused ones are not kept.
    pub fn record(&mut self, class: u8, command: u8, data: &[u8], accepted: Option<bool>) {
        if accepted == Some(false) {
            return;
        }
        if data.len() > MAX_COMMAND {
            log::error!(
                "net control command {class}.{command}: {} bytes of data, more than the \
                 {MAX_COMMAND} recorded; it will not be replayed",
                data.len()
            );
            return;
        }
        if let (CLASS_VLAN, VLAN_ADD | VLAN_DEL) = (class, command) {
            // A VLAN id is 12 bits: a larger one is refused by a device
            // (and not kept).
            if let Some(vid) = (data.len() == 2)
                .then(|| u16::from_le_bytes([data[0], data[1]]))
                .filter(|v| *v < 4096)
            {
                if command == VLAN_ADD {
                    self.vlans.insert(vid);
                } else {
                    self.vlans.remove(&vid);
                }
            }
            return;
        }
        let Some(key) = Self::kind(class, command, data) else {
            return;
        };
        let same = |k: &ControlCommand| Self::kind(k.class, k.command, &k.data) == Some(key);
        if accepted == Some(true) {
            self.commands.retain(|k| !same(k));
        } else if self.commands.iter().filter(|k| same(k)).count() >= UNVERIFIED_PER_KIND {
            if let Some(i) = self.commands.iter().position(same) {
                self.commands.remove(i);
            }
        }
        let total: usize = self.commands.iter().map(|k| k.data.len()).sum();
        if self.commands.len() >= MAX_KEPT || total + data.len() > MAX_TOTAL {
            log::error!("net control command {class}.{command}: too many kept; not recorded");
            return;
        }
        self.commands.push(ControlCommand {
            class,
            command,
            data: data.to_vec(),
        });
    }

    /// A state from outside (a restore): within the bounds recording
    /// keeps.
    ///
    /// # Errors
    ///
    /// What exceeds them.
    pub fn check(&self) -> Result<(), String> {
        let total: usize = self.commands.iter().map(|k| k.data.len()).sum();
        if self.commands.len() > MAX_KEPT
            || total > MAX_TOTAL
            || self.commands.iter().any(|k| k.data.len() > MAX_COMMAND)
        {
            return Err(format!(
                "net control state of {} command(s), {total} bytes: more than kept \
                 ({MAX_KEPT} commands, {MAX_TOTAL} bytes, {MAX_COMMAND} each)",
                self.commands.len()
            ));
        }
        if let Some(v) = self.vlans.iter().find(|v| **v >= 4096) {
            return Err(format!("net control state: VLAN id {v} out of range"));
        }
        Ok(())
    }

    /// Whether nothing was set.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty() && self.vlans.is_empty()
    }

    /// The commands that set this state again on a reset device, in
    /// QEMU's order: MAC address, queue pairs (and RSS, hash), offloads,
    /// MAC filter tables and receive modes, VLAN filters, coalescing.
    pub fn replay(&self) -> Vec<ControlCommand> {
        let rank = |c: &ControlCommand| match (c.class, c.command) {
            (CLASS_MAC, MAC_ADDR_SET) => 0,
            (CLASS_MQ, _) => 1,
            (CLASS_OFFLOADS, _) => 2,
            (CLASS_MAC, _) => 3,
            (CLASS_RX, _) => 4,
            _ => 6,
        };
        let mut out: Vec<ControlCommand> = self.commands.clone();
        out.extend(self.vlans.iter().map(|v| ControlCommand {
            class: CLASS_VLAN,
            command: VLAN_ADD,
            data: v.to_le_bytes().to_vec(),
        }));
        out.sort_by_key(|c| if c.class == CLASS_VLAN { 5 } else { rank(c) });
        out
    }
}

/// The driver-readable bytes of a control request (`segs`, from a walk),
/// as class, command and data; `None` for a request too short to be one.
pub(crate) fn parse<M: GuestMemory>(mem: &M, segs: &[Seg]) -> Option<(u8, u8, Vec<u8>)> {
    let mut bytes = Vec::new();
    for s in segs.iter().take_while(|s| !s.write) {
        let room = (MAX_COMMAND + 3).saturating_sub(bytes.len());
        let take = (s.len as usize).min(room);
        let start = bytes.len();
        bytes.resize(start + take, 0);
        mem.read_slice(&mut bytes[start..], GuestAddress(s.addr))
            .ok()?;
        if take < s.len as usize {
            break;
        }
    }
    if bytes.len() < 2 {
        return None;
    }
    let data = bytes.split_off(2);
    Some((bytes[0], bytes[1], data))
}

/// The control state and, in direct mode, how far the guest's control
/// ring was read.
#[derive(Debug, Default)]
pub(crate) struct ControlWatch {
    pub state: NetControlState,
    /// The guest's next available index not read yet (direct mode).
    pub seen: u16,
}

/// Shared between the device and the relay thread (control path only).
pub(crate) type SharedControl = Arc<Mutex<ControlWatch>>;

pub(crate) fn lock(w: &SharedControl) -> std::sync::MutexGuard<'_, ControlWatch> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl ControlWatch {
    /// Read every request the guest published on its control queue `q`
    /// since the last call, recording each command (direct mode: before
    /// the device is kicked, so before the guest can reuse the buffers).
    pub fn catch_up<M: GuestMemory>(&mut self, q: &Queue, mem: &M) {
        let avail = match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
            Ok(a) => a.0,
            Err(e) => {
                log::warn!("net control queue: avail index unreadable: {e}");
                return;
            }
        };
        let size = q.size();
        let n = avail.wrapping_sub(self.seen);
        if size == 0 || n > size {
            // A guest index out of reach: nothing can be read reliably.
            log::warn!(
                "net control queue: avail index {avail} is {n} ahead of {}; commands not recorded",
                self.seen
            );
            self.seen = avail;
            return;
        }
        let mut segs = Vec::new();
        for i in 0..n {
            let p = self.seen.wrapping_add(i) % size;
            let head =
                match mem.read_obj::<u16>(GuestAddress(q.avail_ring() + 4 + 2 * u64::from(p))) {
                    Ok(h) => u16::from_le(h),
                    Err(_) => continue,
                };
            if walk(
                mem,
                q.desc_table(),
                size,
                head,
                usize::from(size),
                &mut segs,
            )
            .is_err()
            {
                continue;
            }
            if let Some((class, command, data)) = parse(mem, &segs) {
                self.state.record(class, command, &data, None);
            }
        }
        self.seen = avail;
    }
}

/// The control queue of a net device whose guest negotiated one: the last
/// of an odd number of activated queues (virtio 1.3 §5.1.2).
pub(crate) fn control_queue(device_type: u32, acked: u64, activated: &[u16]) -> Option<u16> {
    const VIRTIO_ID_NET: u32 = 1;
    let ctrl = device_type == VIRTIO_ID_NET
        && acked & (1 << n::VIRTIO_NET_F_CTRL_VQ) != 0
        && activated.len() % 2 == 1;
    ctrl.then(|| activated.iter().copied().max()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A class the bridge does not know: never kept.
    const CLASS_UNKNOWN: u8 = 77;

    /// `VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET` data for queue `vq`.
    fn coal(vq: u16) -> Vec<u8> {
        let mut d = vq.to_le_bytes().to_vec();
        d.extend_from_slice(&[0, 0, 9, 0, 0, 0, 9, 0, 0, 0]);
        d
    }

    fn cmd(class: u8, command: u8, data: &[u8]) -> ControlCommand {
        ControlCommand {
            class,
            command,
            data: data.to_vec(),
        }
    }

    #[test]
    fn the_last_command_of_each_kind_and_the_vlan_set_are_kept_in_replay_order() {
        let mut s = NetControlState::default();
        s.record(CLASS_VLAN, VLAN_ADD, &5u16.to_le_bytes(), None);
        s.record(CLASS_RX, 0, &[1], Some(true));
        s.record(CLASS_RX, 0, &[0], Some(true));
        s.record(CLASS_VLAN, VLAN_ADD, &7u16.to_le_bytes(), Some(true));
        s.record(CLASS_VLAN, VLAN_DEL, &5u16.to_le_bytes(), Some(true));
        s.record(CLASS_MQ, MQ_VQ_PAIRS_SET, &2u16.to_le_bytes(), Some(true));
        s.record(CLASS_MAC, MAC_ADDR_SET, &[2, 0, 0, 0, 0, 1], Some(true));
        s.record(CLASS_OFFLOADS, 0, &3u64.to_le_bytes(), Some(true));
        // Queries and announcement acks set nothing.
        s.record(3, 0, &[], Some(true));
        s.record(CLASS_COAL, COAL_VQ_GET, &[0, 0], Some(true));
        s.record(CLASS_COAL, COAL_VQ_SET, &coal(1), Some(true));
        s.record(CLASS_COAL, COAL_VQ_SET, &coal(2), Some(true));
        // Wrong sizes for fixed-size commands, a VLAN id past 12 bits.
        s.record(CLASS_RX, 2, &[1, 1], Some(true));
        s.record(CLASS_COAL, COAL_VQ_SET, &[3, 0], Some(true));
        s.record(CLASS_VLAN, VLAN_ADD, &4101u16.to_le_bytes(), None);
        s.record(99, 1, &[1], Some(true));
        assert_eq!(
            s.replay(),
            vec![
                cmd(CLASS_MAC, MAC_ADDR_SET, &[2, 0, 0, 0, 0, 1]),
                cmd(CLASS_MQ, MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()),
                cmd(CLASS_OFFLOADS, 0, &3u64.to_le_bytes()),
                cmd(CLASS_RX, 0, &[0]),
                cmd(CLASS_VLAN, VLAN_ADD, &7u16.to_le_bytes()),
                cmd(CLASS_COAL, COAL_VQ_SET, &coal(1)),
                cmd(CLASS_COAL, COAL_VQ_SET, &coal(2)),
            ]
        );
        // Refused: dropped. Unknown acks: the last few kept, in order.
        s.record(CLASS_RX, 1, &[1], Some(false));
        assert!(!s
            .replay()
            .iter()
            .any(|c| c.class == CLASS_RX && c.command == 1));
        for p in 1..=6u16 {
            s.record(CLASS_MQ, MQ_VQ_PAIRS_SET, &p.to_le_bytes(), None);
        }
        let mq: Vec<_> = s
            .replay()
            .into_iter()
            .filter(|c| c.class == CLASS_MQ)
            .collect();
        assert_eq!(mq.len(), UNVERIFIED_PER_KIND);
        assert_eq!(mq[3].data, 6u16.to_le_bytes());
        assert_eq!(mq[0].data, 3u16.to_le_bytes());
        // RSS replaces the pair count, and the reverse.
        s.record(CLASS_MQ, MQ_RSS_CONFIG, &[1, 2, 3], Some(true));
        let mq: Vec<_> = s
            .replay()
            .into_iter()
            .filter(|c| c.class == CLASS_MQ)
            .collect();
        assert_eq!(mq, vec![cmd(CLASS_MQ, MQ_RSS_CONFIG, &[1, 2, 3])]);
    }

    #[test]
    fn a_hostile_guest_cannot_grow_the_state_without_bound() {
        let mut s = NetControlState::default();
        for vq in 0..2000u16 {
            s.record(CLASS_COAL, COAL_VQ_SET, &coal(vq), Some(true));
        }
        assert_eq!(s.commands.len(), MAX_KEPT);
        assert!(s.check().is_ok());
        // Large tables: at most a few of each kind, the total bounded.
        let mut s = NetControlState::default();
        for k in 0..40u8 {
            s.record(CLASS_UNKNOWN, k, &[k; 1], Some(true));
            s.record(CLASS_MQ, MQ_HASH_CONFIG, &vec![k; MAX_COMMAND], None);
            s.record(CLASS_MAC, 0, &vec![k; MAX_COMMAND], None);
        }
        assert_eq!(s.commands.len(), 2 * UNVERIFIED_PER_KIND);
        assert!(s.commands.iter().map(|c| c.data.len()).sum::<usize>() <= MAX_TOTAL);
        let mut big = s.clone();
        big.commands
            .push(cmd(CLASS_MAC, 0, &vec![0; MAX_COMMAND + 1]));
        assert!(big.check().is_err());
        // Unknown acks of one kind: the last few only.
        let mut s = NetControlState::default();
        for p in 0..2000u16 {
            s.record(CLASS_MQ, MQ_VQ_PAIRS_SET, &p.to_le_bytes(), None);
        }
        assert_eq!(s.commands.len(), UNVERIFIED_PER_KIND);
        s.record(CLASS_MAC, 0, &vec![0; MAX_COMMAND + 1], None);
        assert!(!s.commands.iter().any(|c| c.class == CLASS_MAC));
        for v in 0..10_000u16 {
            s.record(CLASS_VLAN, VLAN_ADD, &v.to_le_bytes(), Some(true));
        }
        assert_eq!(s.vlans.len(), 4096);
    }

    #[test]
    fn the_control_queue_is_the_last_of_an_odd_count_with_ctrl_vq() {
        let ctrl = 1u64 << n::VIRTIO_NET_F_CTRL_VQ;
        assert_eq!(control_queue(1, ctrl, &[0, 1, 2]), Some(2));
        assert_eq!(control_queue(1, ctrl, &[0, 1, 2, 3, 4]), Some(4));
        assert_eq!(control_queue(1, 0, &[0, 1, 2]), None);
        assert_eq!(control_queue(1, ctrl, &[0, 1]), None);
        assert_eq!(control_queue(2, ctrl, &[0, 1, 2]), None);
    }
}
