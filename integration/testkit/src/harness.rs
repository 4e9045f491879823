//! A VMM-side harness: what the VMM and the guest's virtio driver do
//! around a [`BridgeDevice`](vdpa_plugin::BridgeDevice), in userspace.
//!
//! It owns guest memory, lays out split rings in it as a guest driver
//! would (`crate::driver::ring`), hands CH-shaped queues
//! (`virtio_queue::Queue`, kick `EventFd`s) to `activate`, and provides an
//! interrupt source with one eventfd per queue (the irqfds). The plugin's
//! tests, the lab suite and the benchmark use it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::driver::blk::{self, ReadLoad, ReadStats};
use crate::driver::ring::{Buf, SplitRing};
use crate::driver::{wait_eventfd, DriverError, EventWaiter};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vdpa_plugin::{InterruptType, VirtioInterrupt};

/// Guest memory type of the harness.
pub type Mem = GuestMemoryMmap<()>;

/// The VMM's interrupt controller: one eventfd per queue plus config
/// (standing in for irqfds), or none, in which case `trigger` counts.
pub struct TestInterrupt {
    /// Per-queue guest interrupt eventfds.
    pub queues: Vec<EventFd>,
    /// Config interrupt eventfd.
    pub config: EventFd,
    give_notifiers: bool,
    /// Calls of `trigger`.
    pub triggered: AtomicU32,
}

impl TestInterrupt {
    /// An interrupt source for `n` queues; `give_notifiers = false` makes
    /// the device fall back to `trigger`.
    pub fn new(n: usize, give_notifiers: bool) -> std::io::Result<Arc<Self>> {
        let queues = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Arc::new(TestInterrupt {
            queues,
            config: EventFd::new(EFD_NONBLOCK)?,
            give_notifiers,
            triggered: AtomicU32::new(0),
        }))
    }

    /// Calls of `trigger` so far.
    pub fn triggered(&self) -> u32 {
        self.triggered.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for TestInterrupt {
    fn trigger(&self, _t: InterruptType) -> std::io::Result<()> {
        self.triggered.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn notifier(&self, t: InterruptType) -> Option<EventFd> {
        if !self.give_notifiers {
            return None;
        }
        match t {
            InterruptType::Config => self.config.try_clone().ok(),
            InterruptType::Queue(q) => self.queues.get(usize::from(q))?.try_clone().ok(),
        }
    }
}

/// Guest memory and the guest driver's rings.
pub struct Guest {
    /// Guest memory as the VMM holds it.
    pub mem: GuestMemoryAtomic<Mem>,
    /// Driver-side rings, by queue.
    pub rings: Vec<SplitRing>,
    /// The guest's kick eventfds (what the VMM signals on a notify write).
    pub kicks: Vec<EventFd>,
    ring_size: u16,
    /// Device-writable buffers in flight, per queue.
    rx: Vec<Posted>,
    /// Added to every address of the layout (see [`Guest::sharing`]).
    base: u64,
}

/// Guest-physical layout: rings from 1 MiB, 64 KiB apart; buffers from
/// 8 MiB, 256 KiB per queue.
const RING_BASE: u64 = 0x10_0000;
const RING_STRIDE: u64 = 0x1_0000;
const BUF_BASE: u64 = 0x80_0000;
const BUF_STRIDE: u64 = 0x4_0000;

/// Errors of the harness.
pub type Result<T> = std::result::Result<T, DriverError>;

/// The size of a queue whose maximum is `max` when the harness wants
/// `wanted`: the smaller, rounded down to a power of two (a split ring's
/// size must be one; a device's maximum need not be, for packed rings).
fn ring_size_for(wanted: u16, max: u16) -> u16 {
    let n = wanted.min(max);
    if n == 0 {
        0
    } else {
        1 << (15 - n.leading_zeros())
    }
}

impl Guest {
    /// Guest RAM of `size` bytes at GPA 0 (at least 16 MiB is sensible).
    pub fn new(size: u64, ring_size: u16) -> Result<Guest> {
        // Shared memory, as VMMs give vDPA guests (see `shared_memory`).
        let m = crate::driver::shared_memory(&[(0, size)])?;
        Ok(Guest {
            mem: GuestMemoryAtomic::new(m),
            rings: Vec::new(),
            kicks: Vec::new(),
            ring_size,
            rx: Vec::new(),
            base: 0,
        })
    }

    /// A driver for another device in the same guest memory `mem`: its
    /// rings and buffers are laid out from `base` (the layout of
    /// [`Guest::new`] moved up), so several devices, as in one VM, use the
    /// same guest RAM without touching each other's. `mem` must reach
    /// `base + Guest::span(queues)`.
    pub fn sharing(mem: GuestMemoryAtomic<Mem>, ring_size: u16, base: u64) -> Guest {
        Guest {
            mem,
            rings: Vec::new(),
            kicks: Vec::new(),
            ring_size,
            rx: Vec::new(),
            base,
        }
    }

    /// Bytes of guest memory the layout of `queues` queues takes from its
    /// base.
    pub fn span(queues: u16) -> u64 {
        BUF_BASE + u64::from(queues) * BUF_STRIDE
    }

    /// GPA of queue `q`'s buffer area (256 KiB) for a guest laid out from
    /// 0 ([`Guest::new`]).
    pub fn buffer(q: u16) -> u64 {
        BUF_BASE + u64::from(q) * BUF_STRIDE
    }

    /// GPA of queue `q`'s buffer area in this guest's layout.
    fn buf(&self, q: u16) -> u64 {
        self.base + Self::buffer(q)
    }

    /// Lay out `n` queues as a guest driver would and return them as CH's
    /// transport passes them to `activate`, every one with the same
    /// maximum `max`. For a device's own maxima (which may differ per
    /// queue) use [`Guest::queues_sized`].
    pub fn queues(&mut self, n: u16, max: u16) -> Result<Vec<(usize, Queue, EventFd)>> {
        self.queues_sized(&vec![max; usize::from(n)])
    }

    /// Lay out one queue per entry of `max_sizes` (queue `q`'s maximum,
    /// e.g. `BridgeDevice::queue_max_sizes()`), each sized by its own
    /// maximum: the harness's ring size, or the maximum if smaller.
    pub fn queues_sized(&mut self, max_sizes: &[u16]) -> Result<Vec<(usize, Queue, EventFd)>> {
        self.rings.clear();
        self.kicks.clear();
        self.rx.clear();
        let mem = self.mem.memory();
        let mut out = Vec::new();
        for (q, &max) in (0u16..).zip(max_sizes) {
            let size = ring_size_for(self.ring_size, max);
            let ring = SplitRing::new(q, size, self.base + RING_BASE + u64::from(q) * RING_STRIDE);
            ring.init(&mem)?;
            let a = ring.addrs();
            let mut queue = Queue::new(max).map_err(|_| DriverError::RingFull(q))?;
            queue.set_size(size);
            queue.set_desc_table_address(Some(a.desc as u32), Some((a.desc >> 32) as u32));
            queue.set_avail_ring_address(Some(a.driver as u32), Some((a.driver >> 32) as u32));
            queue.set_used_ring_address(Some(a.device as u32), Some((a.device >> 32) as u32));
            queue.set_ready(true);
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|source| DriverError::EventFd {
                op: "create",
                source,
            })?;
            self.kicks.push(
                kick.try_clone()
                    .map_err(|source| DriverError::EventFd { op: "dup", source })?,
            );
            self.rings.push(ring);
            out.push((usize::from(q), queue, kick));
        }
        Ok(out)
    }

    /// The ring sizes of the queues laid out last, by queue.
    pub fn ring_sizes(&self) -> Vec<u16> {
        self.rings.iter().map(SplitRing::size).collect()
    }

    fn kick(&self, q: u16) -> Result<()> {
        self.kicks[usize::from(q)]
            .write(1)
            .map_err(|source| DriverError::EventFd {
                op: "write",
                source,
            })
    }

    /// One blk request on queue `q`: `data` is sent for writes (`ty` =
    /// T_OUT) and filled for reads (T_IN). Waits on `irq` (or polls when it
    /// never fires) and returns the status byte.
    pub fn blk(
        &mut self,
        q: u16,
        ty: u32,
        sector: u64,
        data: &mut [u8],
        irq: &EventFd,
    ) -> Result<u8> {
        // A duplicate of the kick eventfd, so the ring can be borrowed
        // mutably while kicking (functional requests, not a load loop).
        let kick = self
            .kicks
            .get(usize::from(q))
            .ok_or(DriverError::RingFull(q))?
            .try_clone()
            .map_err(|source| DriverError::EventFd { op: "dup", source })?;
        self.blk_with(q, ty, sector, data, irq, || kick.write(1))
    }

    /// [`Guest::blk`] with the doorbell rung by `kick` instead of the
    /// queue's kick eventfd (e.g. a store to a doorbell page mapped the
    /// way a VMM maps it into its guest).
    pub fn blk_with(
        &mut self,
        q: u16,
        ty: u32,
        sector: u64,
        data: &mut [u8],
        irq: &EventFd,
        kick: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<u8> {
        let mem = self.mem.memory();
        let base = self.buf(q);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        let werr = |addr| DriverError::Memory { addr };
        mem.write_slice(&hdr, GuestAddress(base))
            .map_err(|_| werr(base))?;
        mem.write_obj(0xffu8, GuestAddress(base + 16))
            .map_err(|_| werr(base + 16))?;
        let device_writes = ty == blk::T_IN || ty == blk::T_GET_ID;
        if !device_writes {
            mem.write_slice(data, GuestAddress(base + 512))
                .map_err(|_| werr(base + 512))?;
        }
        let mut bufs = vec![Buf {
            addr: base,
            len: 16,
            write: false,
        }];
        if !data.is_empty() {
            bufs.push(Buf {
                addr: base + 512,
                len: data.len() as u32,
                write: device_writes,
            });
        }
        bufs.push(Buf {
            addr: base + 16,
            len: 1,
            write: true,
        });
        let ring = self
            .rings
            .get_mut(usize::from(q))
            .ok_or(DriverError::RingFull(q))?;
        ring.post(&mem, &bufs)?;
        kick().map_err(|source| DriverError::EventFd {
            op: "write",
            source,
        })?;
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        loop {
            if ring.pop_used(&mem)?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                return Err(DriverError::Timeout { queue: q, timeout });
            }
            wait_eventfd(irq, Duration::from_millis(20))?;
        }
        if device_writes {
            mem.read_slice(data, GuestAddress(base + 512))
                .map_err(|_| werr(base + 512))?;
        }
        mem.read_obj(GuestAddress(base + 16))
            .map_err(|_| werr(base + 16))
    }

    /// Run a read load on queue `q` (kicks through the kick eventfd,
    /// completions through `irq`) with the same loop as the direct harness.
    pub fn blk_read_load(&mut self, q: u16, irq: &EventFd, load: &ReadLoad) -> Result<ReadStats> {
        let mem = self.mem.memory();
        let kick_fd = &self.kicks[usize::from(q)];
        let mut kick = || {
            kick_fd.write(1).map_err(|source| DriverError::EventFd {
                op: "write",
                source,
            })
        };
        let timeout = Duration::from_secs(10);
        let waiter = EventWaiter::new(irq)?;
        let mut wait = || -> Result<()> {
            if !waiter.wait(timeout)? {
                return Err(DriverError::Timeout { queue: q, timeout });
            }
            Ok(())
        };
        let buf = self.buf(q);
        blk::blk_read_load(
            &mem,
            &mut self.rings[usize::from(q)],
            buf,
            &mut kick,
            &mut wait,
            load,
        )
    }
}

use crate::driver::net::{NET_HDR, RX_BUF};

/// Device-writable buffers in flight on one queue: `(address, length)`
/// per head id.
type Posted = Vec<Option<(u64, u32)>>;

impl Guest {
    /// Post one device-writable buffer of `len` bytes on queue `q`, from
    /// the queue's buffer area (a slot of `len` bytes no buffer in flight
    /// uses; post one length per queue), and kick the queue.
    ///
    /// # Errors
    /// `len` is 0 or above the area, no slot or descriptor is free, or
    /// the kick fails.
    pub fn post_receive(&mut self, q: u16, len: u32) -> Result<()> {
        self.post_receive_no_kick(q, len)?;
        self.kick(q)
    }

    fn post_receive_no_kick(&mut self, q: u16, len: u32) -> Result<()> {
        if len == 0 || u64::from(len) > BUF_STRIDE {
            return Err(DriverError::TooLarge {
                len: u64::from(len),
                max: BUF_STRIDE,
            });
        }
        let mem = self.mem.memory();
        let qi = usize::from(q);
        let buf = self.buf(q);
        let ring = self.rings.get_mut(qi).ok_or(DriverError::RingFull(q))?;
        if self.rx.len() <= qi {
            self.rx.resize(qi + 1, Vec::new());
        }
        let posted = &mut self.rx[qi];
        posted.resize(usize::from(ring.size()), None);
        let addr = (0..BUF_STRIDE / u64::from(len))
            .map(|slot| buf + slot * u64::from(len))
            .find(|a| !posted.iter().flatten().any(|(p, _)| p == a))
            .ok_or(DriverError::RingFull(q))?;
        let head = ring.post(
            &mem,
            &[Buf {
                addr,
                len,
                write: true,
            }],
        )?;
        posted[usize::from(head)] = Some((addr, len));
        Ok(())
    }

    /// The data of the first buffer posted with [`Guest::post_receive`]
    /// that the device returns on queue `q` within `timeout` (as many
    /// bytes as it says it wrote, at most the buffer's length), or `None`.
    /// Waits on `irq`.
    ///
    /// # Errors
    /// The device returns a buffer that was not posted for receiving, or
    /// memory or the eventfd fail.
    pub fn wait_receive(
        &mut self,
        q: u16,
        irq: &EventFd,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let qi = usize::from(q);
        loop {
            let mem = self.mem.memory();
            let ring = self.rings.get_mut(qi).ok_or(DriverError::RingFull(q))?;
            if let Some((head, len)) = ring.pop_used(&mem)? {
                let (addr, posted_len) = self
                    .rx
                    .get_mut(qi)
                    .and_then(|r| r.get_mut(usize::from(head)))
                    .and_then(Option::take)
                    .ok_or(DriverError::BadUsedId {
                        queue: q,
                        id: u32::from(head),
                    })?;
                let mut buf = vec![0u8; len.min(posted_len) as usize];
                mem.read_slice(&mut buf, GuestAddress(addr))
                    .map_err(|_| DriverError::Memory { addr })?;
                return Ok(Some(buf));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            wait_eventfd(irq, Duration::from_millis(20))?;
        }
    }

    /// Send `data` as one device-readable buffer on queue `q` (from the
    /// queue's buffer area) and wait on `irq` until the device has used
    /// it.
    ///
    /// # Errors
    /// `data` does not fit the area, the ring is full, or the device does
    /// not use the buffer within 10 s.
    pub fn send(&mut self, q: u16, data: &[u8], irq: &EventFd) -> Result<()> {
        let too_large = || DriverError::TooLarge {
            len: data.len() as u64,
            max: BUF_STRIDE,
        };
        let len = u32::try_from(data.len()).map_err(|_| too_large())?;
        if data.is_empty() || u64::from(len) > BUF_STRIDE {
            return Err(too_large());
        }
        let mem = self.mem.memory();
        let base = self.buf(q);
        mem.write_slice(data, GuestAddress(base))
            .map_err(|_| DriverError::Memory { addr: base })?;
        let ring = self
            .rings
            .get_mut(usize::from(q))
            .ok_or(DriverError::RingFull(q))?;
        ring.post(
            &mem,
            &[Buf {
                addr: base,
                len,
                write: false,
            }],
        )?;
        self.kick(q)?;
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        while self.rings[usize::from(q)].pop_used(&mem)?.is_none() {
            if Instant::now() > deadline {
                return Err(DriverError::Timeout { queue: q, timeout });
            }
            wait_eventfd(irq, Duration::from_millis(20))?;
        }
        Ok(())
    }

    /// Post one virtio-net control command on control queue `ctrl` as
    /// Linux's driver does (class and command, its data, a device-writable
    /// ack byte, from the queue's buffer area). With `kick`, kick and wait
    /// (polling: control queues are not answered by interrupt) for the
    /// device's answer and return its ack; without, leave it published.
    ///
    /// # Errors
    /// `data` does not fit the area, the ring is full, or the device does
    /// not answer within 10 s.
    pub fn net_control(
        &mut self,
        ctrl: u16,
        class: u8,
        command: u8,
        data: &[u8],
        kick: bool,
    ) -> Result<Option<u8>> {
        const ACK: u64 = 4096;
        let len = u32::try_from(data.len())
            .ok()
            .filter(|n| 2 + u64::from(*n) <= ACK)
            .ok_or(DriverError::TooLarge {
                len: data.len() as u64,
                max: ACK - 2,
            })?;
        let mem = self.mem.memory();
        let base = self.buf(ctrl);
        let mut bytes = vec![class, command];
        bytes.extend_from_slice(data);
        mem.write_slice(&bytes, GuestAddress(base))
            .map_err(|_| DriverError::Memory { addr: base })?;
        mem.write_obj(0xffu8, GuestAddress(base + ACK))
            .map_err(|_| DriverError::Memory { addr: base + ACK })?;
        let bufs = [
            Buf {
                addr: base,
                len: 2,
                write: false,
            },
            Buf {
                addr: base + 2,
                len,
                write: false,
            },
            Buf {
                addr: base + ACK,
                len: 1,
                write: true,
            },
        ];
        let bufs: Vec<Buf> = bufs.into_iter().filter(|b| b.len > 0).collect();
        let ring = self
            .rings
            .get_mut(usize::from(ctrl))
            .ok_or(DriverError::RingFull(ctrl))?;
        ring.post(&mem, &bufs)?;
        if !kick {
            return Ok(None);
        }
        self.kick(ctrl)?;
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        while self.rings[usize::from(ctrl)].pop_used(&mem)?.is_none() {
            if Instant::now() > deadline {
                return Err(DriverError::Timeout {
                    queue: ctrl,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let ack = mem
            .read_obj(GuestAddress(base + ACK))
            .map_err(|_| DriverError::Memory { addr: base + ACK })?;
        Ok(Some(ack))
    }

    /// Post receive buffers (2 KiB each) on receive queue `q`, as many as
    /// fit its buffer area and ring, and kick it; how many were posted.
    pub fn net_fill_rx(&mut self, q: u16) -> Result<usize> {
        let mut posted = 0;
        loop {
            match self.post_receive_no_kick(q, RX_BUF as u32) {
                Ok(()) => posted += 1,
                Err(DriverError::RingFull(_)) => break,
                Err(e) => return Err(e),
            }
        }
        self.kick(q)?;
        Ok(posted)
    }

    /// Send `frame` (behind a zeroed virtio-net header) on transmit queue
    /// `q`; waits on `irq` until consumed.
    pub fn net_send(&mut self, q: u16, frame: &[u8], irq: &EventFd) -> Result<()> {
        let mut data = vec![0u8; NET_HDR];
        data.extend_from_slice(frame);
        self.send(q, &data, irq)
    }

    /// A frame from receive queue `q` within `timeout` (the receive
    /// buffers are topped up again), or `None`.
    pub fn net_recv(
        &mut self,
        q: u16,
        irq: &EventFd,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>> {
        let Some(buf) = self.wait_receive(q, irq, timeout)? else {
            return Ok(None);
        };
        self.net_fill_rx(q)?;
        Ok(Some(buf.get(NET_HDR..).unwrap_or_default().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_sized_gives_each_queue_its_own_maximum() {
        let mut g = Guest::new(16 << 20, 128).unwrap();

        let q = g.queues_sized(&[256, 32, 8]).unwrap();

        let got: Vec<(u16, u16)> = q.iter().map(|(_, q, _)| (q.max_size(), q.size())).collect();
        assert_eq!(got, [(256, 128), (32, 32), (8, 8)]);
        assert_eq!(g.ring_sizes(), [128, 32, 8]);
    }

    #[test]
    fn receive_buffers_must_fit_and_nothing_returned_is_none() {
        let mut g = Guest::new(16 << 20, 128).unwrap();
        let _q = g.queues_sized(&[8]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();

        assert!(matches!(
            g.post_receive(0, 0),
            Err(DriverError::TooLarge { .. })
        ));
        assert!(g.post_receive(0, BUF_STRIDE as u32 + 1).is_err());
        g.post_receive(0, 64).unwrap();
        assert_eq!(
            g.wait_receive(0, &irq, Duration::from_millis(10)).unwrap(),
            None
        );
        assert!(g.post_receive(5, 64).is_err());
    }

    #[test]
    fn each_queue_gets_the_wanted_size_capped_by_its_own_maximum() {
        assert_eq!(ring_size_for(128, 256), 128);
        assert_eq!(ring_size_for(128, 32), 32);
        assert_eq!(ring_size_for(128, 8), 8);
    }

    #[test]
    fn sizes_round_down_to_a_power_of_two() {
        assert_eq!(ring_size_for(128, 100), 64);
        assert_eq!(ring_size_for(128, 1), 1);
        assert_eq!(ring_size_for(128, 0), 0);
        assert_eq!(ring_size_for(u16::MAX, u16::MAX), 0x8000);
    }
}
