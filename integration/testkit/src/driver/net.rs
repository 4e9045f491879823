//! virtio-net frames (virtio 1.2 §5.1.6) on top of [`Driver`], and the ARP
//! frames the lab uses to get an answer from a real network peer.
//!
//! Queue pair `p` is receive queue `2p` and transmit queue `2p + 1`. With
//! VIRTIO_F_VERSION_1 every frame is preceded by a 12-byte
//! `virtio_net_hdr`. Receive buffers are [`RX_BUF`] bytes each, carved
//! from the receive queue's buffer area.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::ring::Buf;
use super::{Driver, DriverError, Result};
use vdpa_bridge::types::DeviceType;

use virtio_bindings::virtio_net as vn;

/// `virtio_net_hdr_v1` size (VERSION_1: num_buffers included).
pub const NET_HDR: usize = size_of::<vn::virtio_net_hdr_v1>();
/// Size of each receive buffer.
pub const RX_BUF: u64 = 2048;
/// Feature bit: control virtqueue.
pub const F_CTRL_VQ: u32 = vn::VIRTIO_NET_F_CTRL_VQ;
/// Feature bit: multiqueue.
pub const F_MQ: u32 = vn::VIRTIO_NET_F_MQ;
/// Feature bit: device has a MAC address.
pub const F_MAC: u32 = vn::VIRTIO_NET_F_MAC;
/// Feature bit: link status in config.
pub const F_STATUS: u32 = vn::VIRTIO_NET_F_STATUS;

const CTRL_MQ: u8 = vn::VIRTIO_NET_CTRL_MQ as u8;
const CTRL_MQ_VQ_PAIRS_SET: u8 = vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
const _: () = assert!(NET_HDR == 12);

impl Driver {
    fn net_check(&self) -> Result<()> {
        if self.device_id != DeviceType::Net.id() {
            return Err(DriverError::WrongDevice(self.device_id));
        }
        Ok(())
    }

    /// Post receive buffers on pair `pair`'s receive queue until the ring
    /// or the buffer area is full. Returns how many were posted.
    pub fn net_fill_rx(&mut self, pair: u16) -> Result<usize> {
        self.net_check()?;
        let q = 2 * pair;
        let slots = (self.opts.buffer_size / RX_BUF) as usize;
        let base = self.buffer(q);
        let mut posted = 0;
        for slot in 0..slots {
            let addr = base + slot as u64 * RX_BUF;
            if self.rx_posted[usize::from(q)].contains(&addr) {
                continue;
            }
            let ring = &mut self.queues[usize::from(q)].ring;
            if ring.free_descriptors() == 0 {
                break;
            }
            let head = ring.post(
                self.memory.mem(),
                &[Buf {
                    addr,
                    len: RX_BUF as u32,
                    write: true,
                }],
            )?;
            self.rx_posted[usize::from(q)].push(addr);
            self.rx_head_addr[usize::from(q)].resize(usize::from(ring.size()), 0);
            self.rx_head_addr[usize::from(q)][usize::from(head)] = addr;
            posted += 1;
        }
        if posted > 0 {
            self.kick(q)?;
        }
        Ok(posted)
    }

    /// Send one Ethernet frame on pair `pair` and wait until the device
    /// has consumed it.
    pub fn net_send(&mut self, pair: u16, frame: &[u8]) -> Result<()> {
        self.net_check()?;
        let q = 2 * pair + 1;
        let base = self.buffer(q);
        let len = NET_HDR + frame.len();
        if len as u64 > self.opts.buffer_size {
            return Err(DriverError::TooLarge {
                len: len as u64,
                max: self.opts.buffer_size,
            });
        }
        let mem = self.memory.mem();
        mem.write_slice(&[0u8; NET_HDR], GuestAddress(base))
            .map_err(|_| DriverError::Memory { addr: base })?;
        let at = base + NET_HDR as u64;
        mem.write_slice(frame, GuestAddress(at))
            .map_err(|_| DriverError::Memory { addr: at })?;
        self.queues[usize::from(q)].ring.post(
            mem,
            &[Buf {
                addr: base,
                len: len as u32,
                write: false,
            }],
        )?;
        self.kick(q)?;
        self.wait_used(q)?;
        Ok(())
    }

    /// Wait up to `timeout` for a frame on any receive queue of the first
    /// `pairs` pairs. Returns `(pair, frame)`; the buffer is re-posted.
    pub fn net_recv(&mut self, pairs: u16, timeout: Duration) -> Result<Option<(u16, Vec<u8>)>> {
        self.net_check()?;
        let start = Instant::now();
        loop {
            for p in 0..pairs {
                let q = 2 * p;
                let Some((head, len)) = self.queues[usize::from(q)]
                    .ring
                    .pop_used(self.memory.mem())?
                else {
                    continue;
                };
                let addr = self.rx_head_addr[usize::from(q)]
                    .get(usize::from(head))
                    .copied()
                    .unwrap_or(0);
                self.rx_posted[usize::from(q)].retain(|&a| a != addr);
                let len = u64::from(len).min(RX_BUF);
                let mut buf = vec![0u8; len as usize];
                self.memory
                    .mem()
                    .read_slice(&mut buf, GuestAddress(addr))
                    .map_err(|_| DriverError::Memory { addr })?;
                self.net_fill_rx(p)?;
                let frame = buf.get(NET_HDR..).unwrap_or_default().to_vec();
                return Ok(Some((p, frame)));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            // Interrupts of shared vectors land on one eventfd: poll.
            let q0 = &self.queues[0];
            match &q0.call {
                Some(fd) => {
                    super::wait_eventfd(fd, Duration::from_millis(5))?;
                }
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    /// Tell a multiqueue device to use `pairs` queue pairs through the
    /// control queue (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`). `ctrl` is the
    /// control queue's index (`2 * max_queue_pairs`).
    pub fn net_set_pairs(&mut self, ctrl: u16, pairs: u16) -> Result<()> {
        self.net_check()?;
        let base = self.buffer(ctrl);
        let mem = self.memory.mem();
        mem.write_slice(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET], GuestAddress(base))
            .map_err(|_| DriverError::Memory { addr: base })?;
        mem.write_slice(&pairs.to_le_bytes(), GuestAddress(base + 2))
            .map_err(|_| DriverError::Memory { addr: base + 2 })?;
        mem.write_obj(0xffu8, GuestAddress(base + 4))
            .map_err(|_| DriverError::Memory { addr: base + 4 })?;
        self.queues[usize::from(ctrl)].ring.post(
            mem,
            &[
                Buf {
                    addr: base,
                    len: 2,
                    write: false,
                },
                Buf {
                    addr: base + 2,
                    len: 2,
                    write: false,
                },
                Buf {
                    addr: base + 4,
                    len: 1,
                    write: true,
                },
            ],
        )?;
        self.kick(ctrl)?;
        self.wait_used(ctrl)?;
        let ack: u8 = self
            .memory
            .mem()
            .read_obj(GuestAddress(base + 4))
            .map_err(|_| DriverError::Memory { addr: base + 4 })?;
        if ack != 0 {
            return Err(DriverError::CtrlNack(ack));
        }
        Ok(())
    }
}

/// An ARP request (who-has `target_ip` tell `src_ip`) from `src_mac`.
pub fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src_ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target_ip);
    f.resize(60, 0); // minimum Ethernet frame without FCS
    f
}

/// If `frame` is an ARP reply telling where `ip` is, the MAC it names.
pub fn parse_arp_reply(frame: &[u8], ip: [u8; 4]) -> Option<[u8; 6]> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x06] || frame[20..22] != [0, 2] {
        return None;
    }
    if frame[28..32] != ip {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[22..28]);
    Some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_request_round_trips_through_a_hand_made_reply() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let req = arp_request(mac, [10, 0, 2, 15], [10, 0, 2, 2]);
        assert_eq!(req.len(), 60);
        assert_eq!(&req[38..42], &[10, 0, 2, 2]);
        // Turn it into the reply a peer would send.
        let peer = [0x52, 0x55, 10, 0, 2, 2];
        let mut rep = req.clone();
        rep[0..6].copy_from_slice(&mac);
        rep[6..12].copy_from_slice(&peer);
        rep[20..22].copy_from_slice(&[0, 2]);
        rep[22..28].copy_from_slice(&peer);
        rep[28..32].copy_from_slice(&[10, 0, 2, 2]);
        assert_eq!(parse_arp_reply(&rep, [10, 0, 2, 2]), Some(peer));
        assert_eq!(parse_arp_reply(&rep, [10, 0, 2, 3]), None);
        assert_eq!(parse_arp_reply(&req, [10, 0, 2, 2]), None);
        assert_eq!(parse_arp_reply(&req[..20], [10, 0, 2, 2]), None);
    }
}
