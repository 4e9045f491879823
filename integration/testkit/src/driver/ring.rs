//! A driver-side split virtqueue (virtio 1.2 §2.7) laid out in DMA memory.
//!
//! The layout inside one ring area starting at `base`:
//! descriptor table at `base`, available ring right after it, used ring at
//! the next 4 KiB boundary. Every access goes through `vm-memory`'s
//! `Bytes` accessors (volatile, or atomic for the indices), never through a
//! Rust reference, because the device writes the used ring concurrently.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{DriverError, Result};
use vdpa_bridge::types::VringAddrs;

/// Descriptor flag: the chain continues at `next` (virtio-bindings'
/// `VRING_DESC_F_NEXT`, typed as the 16-bit field it sets).
pub const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// Bytes of the ring area [`SplitRing`] needs for `size` entries.
pub fn ring_bytes(size: u16) -> u64 {
    let n = u64::from(size);
    let used = align_up(16 * n + 6 + 2 * n, 4096);
    used + 6 + 8 * n
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// One buffer of a chain: IOVA, length, and whether the device writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// IOVA of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A split virtqueue driven from the driver side.
#[derive(Debug)]
pub struct SplitRing {
    queue: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Free descriptor ids.
    free: Vec<u16>,
    /// Chain length per head id (0 when not in flight).
    chain_len: Vec<u16>,
    /// Each in-flight descriptor's successor in its chain, kept here: the
    /// copy in the table is in memory the device can write.
    next: Vec<u16>,
    next_avail: u16,
    last_used: u16,
}

impl SplitRing {
    /// A ring of `size` entries (a power of two) for queue `queue` at IOVA
    /// `base`.
    pub fn new(queue: u16, size: u16, base: u64) -> SplitRing {
        let n = u64::from(size);
        let desc = base;
        let avail = base + 16 * n;
        let used = base + align_up(16 * n + 6 + 2 * n, 4096);
        SplitRing {
            queue,
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chain_len: vec![0; usize::from(size)],
            next: vec![0; usize::from(size)],
            next_avail: 0,
            last_used: 0,
        }
    }

    /// Zero the ring's memory.
    pub fn init(&self, mem: &GuestMemoryMmap) -> Result<()> {
        let len = ring_bytes(self.size);
        let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
        mem.write_slice(&zeros, GuestAddress(self.desc))
            .map_err(|_| DriverError::Memory { addr: self.desc })
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Addresses to program into the device.
    pub fn addrs(&self) -> VringAddrs {
        VringAddrs {
            desc: self.desc,
            driver: self.avail,
            device: self.used,
        }
    }

    /// The driver's next available index (the value a kick with
    /// VIRTIO_F_NOTIFICATION_DATA carries).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Descriptors not in flight.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Post a chain of buffers and publish it in the available ring.
    /// Returns the head descriptor id.
    pub fn post(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> Result<u16> {
        self.post_flagged(mem, bufs, 0)
    }

    /// [`SplitRing::post`] with `head_flags` added to the first
    /// descriptor's flags.
    fn post_flagged(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &[Buf],
        head_flags: u16,
    ) -> Result<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return Err(DriverError::RingFull(self.queue));
        }
        let ids: Vec<u16> = (0..bufs.len())
            .map(|_| self.free.pop().unwrap_or_default())
            .collect();
        for (i, (b, &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if i == 0 {
                flags |= head_flags;
            }
            let next = match ids.get(i + 1) {
                Some(&n) => {
                    flags |= VRING_DESC_F_NEXT;
                    n
                }
                None => 0,
            };
            self.next[usize::from(id)] = next;
            let at = self.desc + 16 * u64::from(id);
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(at))
                .map_err(|_| DriverError::Memory { addr: at })?;
        }
        let head = ids[0];
        self.chain_len[usize::from(head)] = ids.len() as u16;
        let slot = self.avail + 4 + 2 * u64::from(self.next_avail % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))
            .map_err(|_| DriverError::Memory { addr: slot })?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Descriptors and the ring slot must be visible before the index.
        fence(Ordering::Release);
        mem.store(
            self.next_avail.to_le(),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .map_err(|_| DriverError::Memory {
            addr: self.avail + 2,
        })?;
        // The device reads its notification suppression after our index
        // store (virtio 1.2 §2.7.13.4: a full barrier).
        fence(Ordering::SeqCst);
        Ok(head)
    }

    /// Post `bufs` through an indirect table written at `table` (guest
    /// memory the caller reserves, 16 bytes per buffer): one descriptor
    /// of the ring. Returns the head descriptor id.
    pub fn post_indirect(
        &mut self,
        mem: &GuestMemoryMmap,
        table: u64,
        bufs: &[Buf],
    ) -> Result<u16> {
        if bufs.is_empty() {
            return Err(DriverError::RingFull(self.queue));
        }
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
                (i + 1) as u16
            } else {
                0
            };
            let at = table + 16 * i as u64;
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(at))
                .map_err(|_| DriverError::Memory { addr: at })?;
        }
        let indirect = Buf {
            addr: table,
            len: 16 * bufs.len() as u32,
            write: false,
        };
        let flags = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        self.post_flagged(mem, &[indirect], flags)
    }

    /// Start both ring indices at `idx` (as a guest whose queue has run
    /// for a while, to test wrap-around): the ring must be empty.
    pub fn set_indices(&mut self, mem: &GuestMemoryMmap, idx: u16) -> Result<()> {
        for at in [self.avail + 2, self.used + 2] {
            mem.write_obj(idx.to_le(), GuestAddress(at))
                .map_err(|_| DriverError::Memory { addr: at })?;
        }
        self.next_avail = idx;
        self.last_used = idx;
        Ok(())
    }

    /// Whether the device asked not to be notified (VIRTQ_USED_F_NO_NOTIFY).
    pub fn device_suppresses_kicks(&self, mem: &GuestMemoryMmap) -> Result<bool> {
        let flags: u16 = mem
            .load(GuestAddress(self.used), Ordering::Acquire)
            .map_err(|_| DriverError::Memory { addr: self.used })?;
        Ok(u16::from_le(flags) & 1 != 0)
    }

    /// Take the next used element, if the device published one: `(id, len)`.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<(u16, u32)>> {
        let idx: u16 = mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .map_err(|_| DriverError::Memory {
                addr: self.used + 2,
            })?;
        let idx = u16::from_le(idx);
        if idx == self.last_used {
            return Ok(None);
        }
        if idx.wrapping_sub(self.last_used) > self.size {
            return Err(DriverError::BadUsedIndex {
                queue: self.queue,
                idx,
                last: self.last_used,
            });
        }
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let mut e = [0u8; 8];
        mem.read_slice(&mut e, GuestAddress(at))
            .map_err(|_| DriverError::Memory { addr: at })?;
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size && self.chain_len[usize::from(h)] != 0)
            .ok_or(DriverError::BadUsedId {
                queue: self.queue,
                id,
            })?;
        self.last_used = self.last_used.wrapping_add(1);
        self.release_chain(head);
        Ok(Some((head, len)))
    }

    fn release_chain(&mut self, head: u16) {
        let n = std::mem::take(&mut self.chain_len[usize::from(head)]);
        let mut id = head;
        for _ in 0..n {
            self.free.push(id);
            id = self.next[usize::from(id)];
        }
    }

    /// Check that the ring's memory is inside `mem`.
    pub fn fits(&self, mem: &GuestMemoryMmap) -> bool {
        mem.check_range(GuestAddress(self.desc), ring_bytes(self.size) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x10000)]).unwrap()
    }

    /// Play the device: complete avail slot `slot` with `len`.
    fn complete(m: &GuestMemoryMmap, r: &SplitRing, used_idx: u16, slot: u16, len: u32) {
        let head: u16 = m
            .read_obj(GuestAddress(r.avail + 4 + 2 * u64::from(slot)))
            .unwrap();
        let at = r.used + 4 + 8 * u64::from(used_idx % r.size);
        m.write_obj(u32::from(head), GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 4)).unwrap();
        m.write_obj(used_idx.wrapping_add(1), GuestAddress(r.used + 2))
            .unwrap();
    }

    #[test]
    fn layout_and_post_write_descriptors_and_avail_index() {
        let m = mem();
        let mut r = SplitRing::new(0, 8, 0x1000);
        assert!(r.fits(&m));
        r.init(&m).unwrap();
        assert_eq!(r.addrs().driver, 0x1000 + 128);
        assert_eq!(r.addrs().device, 0x2000);
        let head = r
            .post(
                &m,
                &[
                    Buf {
                        addr: 0x9000,
                        len: 16,
                        write: false,
                    },
                    Buf {
                        addr: 0x9100,
                        len: 512,
                        write: true,
                    },
                ],
            )
            .unwrap();
        let d_addr: u64 = m
            .read_obj(GuestAddress(0x1000 + 16 * u64::from(head)))
            .unwrap();
        let d_flags: u16 = m
            .read_obj(GuestAddress(0x1000 + 16 * u64::from(head) + 12))
            .unwrap();
        assert_eq!(d_addr, 0x9000);
        assert_eq!(d_flags, VRING_DESC_F_NEXT);
        let avail_idx: u16 = m.read_obj(GuestAddress(r.avail + 2)).unwrap();
        assert_eq!(avail_idx, 1);
        assert_eq!(r.free_descriptors(), 6);
        assert_eq!(r.pop_used(&m).unwrap(), None);
        complete(&m, &r, 0, 0, 512);
        assert_eq!(r.pop_used(&m).unwrap(), Some((head, 512)));
        assert_eq!(r.free_descriptors(), 8);
    }

    #[test]
    fn device_rewriting_next_fields_cannot_corrupt_the_free_list() {
        let m = mem();
        let mut r = SplitRing::new(0, 4, 0x1000);
        r.init(&m).unwrap();
        let buf = |addr| Buf {
            addr,
            len: 16,
            write: false,
        };
        let head = r.post(&m, &[buf(0x8000), buf(0x8100)]).unwrap();
        // The device scribbles over the descriptors' next fields.
        for id in 0..4u64 {
            m.write_obj(0x7fffu16, GuestAddress(r.desc + 16 * id + 14))
                .unwrap();
        }
        complete(&m, &r, 0, 0, 0);
        assert_eq!(r.pop_used(&m).unwrap(), Some((head, 0)));
        let mut free = r.free.clone();
        free.sort_unstable();
        assert_eq!(free, [0, 1, 2, 3]);
        // Every descriptor can be posted again.
        r.post(&m, &[buf(0x8000), buf(0x8100), buf(0x8200), buf(0x8300)])
            .unwrap();
    }

    #[test]
    fn device_returning_unknown_id_or_wild_index_is_an_error() {
        let m = mem();
        let mut r = SplitRing::new(1, 4, 0x1000);
        r.init(&m).unwrap();
        // Used index jumps past the ring size.
        m.write_obj(9u16, GuestAddress(r.used + 2)).unwrap();
        assert!(matches!(
            r.pop_used(&m),
            Err(DriverError::BadUsedIndex { queue: 1, .. })
        ));
        // An id that was never posted.
        m.write_obj(1u16, GuestAddress(r.used + 2)).unwrap();
        m.write_obj(3u32, GuestAddress(r.used + 4)).unwrap();
        assert!(matches!(
            r.pop_used(&m),
            Err(DriverError::BadUsedId { queue: 1, id: 3 })
        ));
    }

    #[test]
    fn ring_full_is_reported() {
        let m = mem();
        let mut r = SplitRing::new(0, 2, 0x1000);
        r.init(&m).unwrap();
        let b = Buf {
            addr: 0x9000,
            len: 1,
            write: false,
        };
        r.post(&m, &[b, b]).unwrap();
        assert!(matches!(r.post(&m, &[b]), Err(DriverError::RingFull(0))));
    }
}
