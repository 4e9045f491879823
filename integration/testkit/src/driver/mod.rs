//! A driver-side harness: what a guest's virtio driver does, in userspace.
//!
//! It allocates memory, maps it for device DMA ([`DmaMapper`]), lays out
//! split virtqueues in it ([`SplitRing`]), brings a device up through
//! [`VdpaOps`] and does real I/O (blk sectors, net frames). The CLI's
//! `selftest`, the benchmarks, the unit tests against the emulated device
//! and the in-guest lab suite against QEMU's devices all use it, so every
//! backend is exercised by the same code.
//!
//! All accesses to DMA memory go through `vm-memory`'s volatile accessors:
//! no Rust reference to device-visible memory is ever created.

pub mod blk;
pub mod net;
pub mod ring;

use std::os::fd::AsRawFd;
use std::time::Duration;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vdpa_bridge::ops::{DmaMapper, Doorbell, VdpaOps};
use vdpa_bridge::types::{features, status, Iova, QueueIndex};
use vdpa_bridge::OpsError;

pub use ring::SplitRing;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A backend operation failed.
    #[error("{op} failed")]
    Ops {
        /// The operation.
        op: &'static str,
        /// The cause (the backend's own error type).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Allocating DMA memory failed.
    #[error("cannot allocate {size:#x} bytes of DMA memory")]
    Alloc {
        /// Size asked for.
        size: u64,
    },
    /// Accessing DMA memory failed.
    #[error("DMA memory access at {addr:#x} failed")]
    Memory {
        /// Address.
        addr: u64,
    },
    /// Creating or waiting on an eventfd failed.
    #[error("eventfd {op} failed")]
    EventFd {
        /// What was done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The device did not complete a request in time.
    #[error("queue {queue}: no completion within {timeout:?}")]
    Timeout {
        /// Queue.
        queue: u16,
        /// Time waited.
        timeout: Duration,
    },
    /// The ring has no room.
    #[error("queue {0}: ring full")]
    RingFull(u16),
    /// The device returned a used element the driver never posted.
    #[error("queue {queue}: device returned unknown descriptor id {id}")]
    BadUsedId {
        /// Queue.
        queue: u16,
        /// Id returned.
        id: u32,
    },
    /// A blk request completed with a non-OK status.
    #[error("blk request failed with status {0}")]
    BlkStatus(u8),
    /// The device published a used index more than a ring ahead.
    #[error("queue {queue}: device published used index {idx} (driver at {last})")]
    BadUsedIndex {
        /// Queue.
        queue: u16,
        /// Index the device wrote.
        idx: u16,
        /// Driver's last seen index.
        last: u16,
    },
    /// A request does not fit the queue's buffer area.
    #[error("request of {len} bytes exceeds the buffer area ({max} bytes)")]
    TooLarge {
        /// Bytes asked for.
        len: u64,
        /// Bytes available.
        max: u64,
    },
    /// A net control command was refused.
    #[error("net control command refused (ack {0})")]
    CtrlNack(u8),
    /// A device of the wrong type for the operation.
    #[error("device type {0} does not support this operation")]
    WrongDevice(u32),
}

/// Result of the harness.
pub type Result<T> = std::result::Result<T, DriverError>;

fn ops<E>(op: &'static str) -> impl FnOnce(E) -> DriverError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |source| DriverError::Ops {
        op,
        source: Box::new(source),
    }
}

/// A block of memory mapped for device DMA at a fixed IOVA.
pub struct DmaMemory {
    mem: GuestMemoryMmap,
    iova: u64,
    size: u64,
}

impl DmaMemory {
    /// Allocate `size` bytes (anonymous, page-aligned) and map them at
    /// `iova` through `mapper`.
    pub fn new<M: DmaMapper + ?Sized>(mapper: &M, iova: u64, size: u64) -> Result<Self> {
        let mem = shared_memory(&[(iova, size)])?;
        let host = mem
            .get_host_address(GuestAddress(iova))
            .map_err(|_| DriverError::Memory { addr: iova })? as usize;
        // SAFETY: `host` is an anonymous mapping of `size` bytes owned by
        // `mem`, which lives in `self` and is unmapped from the device in
        // `release` before `mem` is dropped; the harness only accesses it
        // through vm-memory's volatile accessors.
        unsafe { mapper.dma_map(Iova(iova), size, host) }.map_err(ops("dma_map"))?;
        Ok(DmaMemory { mem, iova, size })
    }

    /// Unmap from the device. Must be called before dropping when the
    /// mapper still lives (the device must not keep DMA access).
    pub fn release<M: DmaMapper + ?Sized>(self, mapper: &M) -> Result<()> {
        mapper
            .dma_unmap(Iova(self.iova), self.size)
            .map_err(ops("dma_unmap"))
    }

    /// The memory, addressed by IOVA.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// First IOVA.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Size.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Memory for `ranges` (`(address, size)`), each range a shared mapping of
/// its own memfd. Shared, file-backed memory is what every backend can
/// map: VFIO pins any memory, but vhost-vdpa on VDUSE hands the daemon the
/// *file* behind each mapping and silently skips private anonymous memory
/// (which is why VMMs run vDPA guests with shared memory).
pub fn shared_memory(ranges: &[(u64, u64)]) -> Result<GuestMemoryMmap> {
    use std::os::fd::FromRawFd;
    use vm_memory::{FileOffset, GuestRegionMmap, MmapRegion};
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, size) in ranges {
        let alloc = || DriverError::Alloc { size };
        let len = usize::try_from(size).map_err(|_| alloc())?;
        // SAFETY: memfd_create with a NUL-terminated name; the result is
        // checked before use.
        let fd = unsafe { libc::memfd_create(c"vdpa-bridge-dma".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(alloc());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(size).map_err(|_| alloc())?;
        let region = MmapRegion::from_file(FileOffset::new(file, 0), len).map_err(|_| alloc())?;
        regions.push(GuestRegionMmap::new(region, GuestAddress(addr)).ok_or_else(alloc)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| DriverError::Alloc {
        size: ranges.iter().map(|r| r.1).sum(),
    })
}

/// How the harness kicks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KickMode {
    /// Write the doorbell directly (MMIO).
    Doorbell,
    /// Signal an eventfd handed to the backend (VFIO_DEVICE_IOEVENTFD).
    EventFd,
}

/// How the harness learns of completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionMode {
    /// Wait on the MSI-X eventfd.
    Interrupt,
    /// Poll the used ring.
    Poll,
}

/// One queue's driver state.
pub struct DriverQueue {
    /// The ring.
    pub ring: SplitRing,
    /// Kick eventfd (EventFd kick mode).
    pub kick: Option<EventFd>,
    /// Call eventfd (the one the backend signals for this queue's group).
    pub call: Option<EventFd>,
    /// Doorbell handle (doorbell kick mode).
    pub doorbell: Option<Doorbell>,
}

/// Options for [`Driver::bring_up`].
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Queues to set up (default: all).
    pub queues: Option<u16>,
    /// Ring size (clamped to each queue's max).
    pub ring_size: u16,
    /// Kick mode.
    pub kick: KickMode,
    /// Completion mode.
    pub completion: CompletionMode,
    /// Features to accept beyond VERSION_1/ACCESS_PLATFORM (masked by
    /// what the device offers).
    pub extra_features: u64,
    /// First IOVA of the harness's memory.
    pub iova_base: u64,
    /// Bytes of data buffer per queue.
    pub buffer_size: u64,
    /// How long to wait for a completion.
    pub timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            queues: None,
            ring_size: 64,
            kick: KickMode::Doorbell,
            completion: CompletionMode::Interrupt,
            extra_features: 0,
            iova_base: 0x10_0000,
            buffer_size: 256 * 1024,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A device brought up to DRIVER_OK by the harness.
pub struct Driver {
    /// DMA memory (rings and buffers).
    pub memory: DmaMemory,
    /// Queues in index order.
    pub queues: Vec<DriverQueue>,
    /// Negotiated features.
    pub features: u64,
    /// Virtio device id.
    pub device_id: u32,
    /// Options used.
    pub opts: DriverOptions,
    /// Per-queue buffer area (IOVA) start.
    buffers: Vec<u64>,
    /// Receive buffers posted per queue (net).
    rx_posted: Vec<Vec<u64>>,
    /// Buffer address per head id of posted receive chains (net).
    rx_head_addr: Vec<Vec<u64>>,
}

/// Bytes reserved per queue for its ring structures (up to 1024 entries).
const RING_AREA: u64 = 32 * 1024;

impl Driver {
    /// Reset the device and bring it up: features (VERSION_1, and
    /// ACCESS_PLATFORM when offered, plus `extra_features`), queues, call and
    /// kick eventfds, DRIVER_OK.
    pub fn bring_up<B: VdpaOps + DmaMapper + ?Sized>(
        dev: &mut B,
        opts: DriverOptions,
    ) -> Result<Driver> {
        dev.reset().map_err(ops("reset"))?;
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER)
            .map_err(ops("set_status(DRIVER)"))?;
        let offered = dev.device_features();
        let want = features::bit(features::VERSION_1)
            | features::bit(features::ACCESS_PLATFORM)
            | opts.extra_features;
        let feats = offered & want;
        dev.set_driver_features(feats)
            .map_err(ops("set_driver_features"))?;
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)
            .map_err(ops("set_status(FEATURES_OK)"))?;

        let nq = opts
            .queues
            .unwrap_or(dev.num_queues())
            .min(dev.num_queues());
        let size = RING_AREA * u64::from(nq) + opts.buffer_size * u64::from(nq);
        let memory = DmaMemory::new(dev, opts.iova_base, size.max(4096))?;
        let plan = dev.irq_plan();
        let mut queues = Vec::new();
        let mut buffers = Vec::new();
        for q in 0..nq {
            let qi = QueueIndex(q);
            let max = dev.vring_max_size(qi).map_err(ops("vring_max_size"))?;
            let n = opts.ring_size.min(max);
            let base = opts.iova_base + RING_AREA * u64::from(q);
            let ring = SplitRing::new(q, n, base);
            ring.init(memory.mem())?;
            dev.set_vring_num(qi, n).map_err(ops("set_vring_num"))?;
            dev.set_vring_addr(qi, ring.addrs())
                .map_err(ops("set_vring_addr"))?;
            dev.set_vring_base(qi, 0).map_err(ops("set_vring_base"))?;
            // With shared vectors the device signals the eventfd of the
            // group's first queue: the others of the group get a duplicate
            // of it, so waiting on any queue's `call` sees the interrupt.
            let call = if opts.completion == CompletionMode::Interrupt {
                let leader = leader_of(&plan, qi);
                match queues
                    .get(usize::from(leader.0))
                    .and_then(|l: &DriverQueue| l.call.as_ref())
                {
                    Some(fd) if leader != qi => Some(
                        fd.try_clone()
                            .map_err(|source| DriverError::EventFd { op: "dup", source })?,
                    ),
                    _ => Some(new_eventfd()?),
                }
            } else {
                None
            };
            dev.set_vring_call(qi, call.as_ref())
                .map_err(ops("set_vring_call"))?;
            let kick = if opts.kick == KickMode::EventFd {
                let k = new_eventfd()?;
                dev.set_vring_kick(qi, Some(&k))
                    .map_err(ops("set_vring_kick"))?;
                Some(k)
            } else {
                None
            };
            let doorbell = match opts.kick {
                KickMode::Doorbell => Some(dev.doorbell(qi).map_err(ops("doorbell"))?),
                KickMode::EventFd => None,
            };
            buffers
                .push(opts.iova_base + RING_AREA * u64::from(nq) + opts.buffer_size * u64::from(q));
            queues.push(DriverQueue {
                ring,
                kick,
                call,
                doorbell,
            });
        }
        for q in 0..nq {
            dev.set_vring_enable(QueueIndex(q), true)
                .map_err(ops("set_vring_enable"))?;
        }
        dev.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        )
        .map_err(ops("set_status(DRIVER_OK)"))?;
        Ok(Driver {
            memory,
            queues,
            features: feats,
            device_id: dev.device_id(),
            opts,
            buffers,
            rx_posted: vec![Vec::new(); usize::from(nq)],
            rx_head_addr: vec![Vec::new(); usize::from(nq)],
        })
    }

    /// IOVA of queue `q`'s data buffer area.
    pub fn buffer(&self, q: u16) -> u64 {
        self.buffers[usize::from(q)]
    }

    /// Notify the device about queue `q`.
    pub fn kick(&self, q: u16) -> Result<()> {
        let dq = &self.queues[usize::from(q)];
        match (&dq.kick, &dq.doorbell) {
            (Some(k), _) => k.write(1).map_err(|source| DriverError::EventFd {
                op: "write",
                source,
            }),
            (None, Some(d)) => d
                .ring(u32::from(dq.ring.next_avail()))
                .map_err(ops("doorbell")),
            (None, None) => Err(ops("kick")(OpsError::Unsupported(
                "kick without an eventfd or doorbell",
            ))),
        }
    }

    /// Wait until queue `q` has a used element and return `(id, len)`.
    pub fn wait_used(&mut self, q: u16) -> Result<(u16, u32)> {
        let timeout = self.opts.timeout;
        let start = std::time::Instant::now();
        loop {
            let dq = &mut self.queues[usize::from(q)];
            if let Some(u) = dq.ring.pop_used(self.memory.mem())? {
                return Ok(u);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(DriverError::Timeout { queue: q, timeout });
            }
            match &dq.call {
                Some(fd) => {
                    wait_eventfd(fd, left.min(Duration::from_millis(100)))?;
                }
                None => std::thread::sleep(Duration::from_micros(50)),
            }
        }
    }

    /// Undo DMA mappings; the caller resets the device first.
    pub fn release<B: VdpaOps + DmaMapper + ?Sized>(self, dev: &mut B) -> Result<()> {
        dev.reset().map_err(ops("reset"))?;
        self.memory.release(dev)
    }
}

fn leader_of(plan: &vdpa_bridge::ops::IrqPlan, q: QueueIndex) -> QueueIndex {
    plan.group_of_queue(q)
        .and_then(|g| g.queues.first().copied())
        .unwrap_or(q)
}

/// A non-blocking eventfd.
pub fn new_eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| DriverError::EventFd {
        op: "create",
        source,
    })
}

/// Waits for one eventfd (an interrupt) with vmm-sys-util's epoll
/// wrapper. A load loop builds one and waits on it per request; one-off
/// waits use [`wait_eventfd`].
pub struct EventWaiter<'a> {
    epoll: Epoll,
    fd: &'a EventFd,
}

impl<'a> EventWaiter<'a> {
    /// A waiter for `fd`.
    ///
    /// # Errors
    ///
    /// Creating the epoll set or adding `fd` failed.
    pub fn new(fd: &'a EventFd) -> Result<Self> {
        let err = |op| move |source| DriverError::EventFd { op, source };
        let epoll = Epoll::new().map_err(err("epoll_create"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(err("epoll_ctl"))?;
        Ok(EventWaiter { epoll, fd })
    }

    /// Wait up to `timeout` for the eventfd to be signalled; consume the
    /// count. Returns whether it fired.
    ///
    /// # Errors
    ///
    /// Waiting or reading failed (not a timeout).
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let mut ev = [EpollEvent::default(); 1];
        let n = loop {
            match self.epoll.wait(ms, &mut ev) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(DriverError::EventFd {
                        op: "epoll_wait",
                        source,
                    })
                }
            }
        };
        if n == 0 {
            return Ok(false);
        }
        match self.fd.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(source) => Err(DriverError::EventFd { op: "read", source }),
        }
    }
}

/// Wait up to `timeout` for `fd` to be signalled; consume the count.
/// Returns whether it fired. (One-off waits; see [`EventWaiter`].)
///
/// # Errors
///
/// As [`EventWaiter::new`] and [`EventWaiter::wait`].
pub fn wait_eventfd(fd: &EventFd, timeout: Duration) -> Result<bool> {
    EventWaiter::new(fd)?.wait(timeout)
}
