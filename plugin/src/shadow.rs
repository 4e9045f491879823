//! Shadow virtqueues: the device works on rings the bridge owns, and a
//! relay thread moves requests between them and the guest's rings.
//!
//! Direct mode (the default) gives the device the guest's own rings: no
//! userspace hop, but the bridge cannot tell which guest pages the device
//! wrote, and a plain virtio-pci device cannot be stopped and restarted at
//! a ring index other than 0. Shadow mode is what migration, pause and
//! snapshot need:
//!
//! * The device's rings (descriptor table, available and used ring of
//!   each queue) live in anonymous memory of the bridge, DMA-mapped at the
//!   top of the device's IOVA range, above guest RAM (IOVA = GPA there).
//! * A guest request is walked (through indirect tables too), each buffer
//!   checked to lie in guest RAM, and written as a plain chain into the
//!   shadow table: the device never reads a guest descriptor, so a guest
//!   cannot make it write to the shadow rings, or anywhere else, by
//!   changing a descriptor in flight. A chain that does not fit in the
//!   free shadow descriptors waits for completions.
//! * A completion is copied to the guest's used ring (its length capped
//!   at the request's writable bytes), every device-writable buffer of
//!   the request and the guest's used ring are marked in the [`DirtyLog`],
//!   and the guest is interrupted when its suppression (EVENT_IDX's
//!   used_event or NO_INTERRUPT) asks for it.
//! * The bridge knows at every moment which guest requests the device
//!   holds ([`QueuePosition`]), so the device can be reset (a pause) and
//!   the requests offered again on fresh rings (a resume, or another
//!   device after a migration).
//!
//! Interrupts: every device vector that serves a queue signals an eventfd
//! of the relay; a vector that carries only config changes stays routed
//! straight to the guest's eventfd.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdpa_bridge::types::features;
use vdpa_bridge::{DmaMapper, Doorbell, Iova, QueueIndex, VdpaOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dirty::DirtyLog;
use crate::error::{backend_err, io, Error, Result};
use crate::interrupt::{InterruptType, ThreadHook, ThreadRole, VirtioInterrupt};
use crate::net_ctrl::{self, ControlCommand, SharedControl};
use crate::slot::Slot;
use crate::thread::{wait_loop, Stopper};

const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const VRING_DESC_F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// Where one guest queue stands while the device does not run it: what a
/// pause leaves, a snapshot saves and a resume (or restore) starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    /// The guest's next available index the bridge has not taken.
    pub next_avail: u16,
    /// The guest's used index.
    pub next_used: u16,
    /// Heads of the guest's requests taken but not completed, oldest
    /// first: offered to the device again when it runs.
    pub in_flight: Vec<u16>,
}

/// One buffer of a guest request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

fn read_desc<M: GuestMemory>(mem: &M, at: u64) -> Option<(u64, u32, u16, u16)> {
    let mut d = [0u8; 16];
    mem.read_slice(&mut d, GuestAddress(at)).ok()?;
    let addr = u64::from_le_bytes(d[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(d[8..12].try_into().ok()?);
    let flags = u16::from_le_bytes([d[12], d[13]]);
    let next = u16::from_le_bytes([d[14], d[15]]);
    Some((addr, len, flags, next))
}

/// Walk guest request `head` of the split ring whose descriptor table is
/// at `table` with `size` entries, into `out`: every buffer, through an
/// indirect table too, each checked to lie in guest memory. At most
/// `max` buffers.
pub(crate) fn walk<M: GuestMemory>(
    mem: &M,
    table: u64,
    size: u16,
    head: u16,
    max: usize,
    out: &mut Vec<Seg>,
) -> std::result::Result<(), &'static str> {
    out.clear();
    let (mut tbl, mut n, mut idx) = (table, size, head);
    let mut indirect = false;
    // Each descriptor once at most: a longer walk is a loop.
    let mut budget = usize::from(size);
    loop {
        if idx >= n {
            return Err("descriptor index out of range");
        }
        if budget == 0 {
            return Err("descriptor chain loops");
        }
        budget -= 1;
        let at = tbl + 16 * u64::from(idx);
        let (addr, len, flags, next) = read_desc(mem, at).ok_or("descriptor unreadable")?;
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if indirect {
                return Err("indirect descriptor inside an indirect table");
            }
            if flags & VRING_DESC_F_NEXT != 0 || !out.is_empty() {
                return Err("indirect descriptor chained");
            }
            if len == 0 || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                return Err("indirect table length");
            }
            let entries = (len / 16) as u16;
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Err("indirect table outside guest memory");
            }
            indirect = true;
            tbl = addr;
            n = entries;
            idx = 0;
            budget = usize::from(entries);
            continue;
        }
        if len > 0 && !mem.check_range(GuestAddress(addr), len as usize) {
            return Err("buffer outside guest memory");
        }
        if out.len() == max {
            return Err("chain longer than the queue");
        }
        out.push(Seg {
            addr,
            len,
            write: flags & VRING_DESC_F_WRITE != 0,
        });
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        idx = next;
    }
}

/// The device-side layout of one shadow queue, at IOVAs.
#[derive(Clone, Copy, Debug)]
struct Layout {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Layout {
    fn at(base: u64, size: u16) -> (Layout, u64) {
        let n = u64::from(size);
        let avail = base + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4096);
        let end = used + 6 + 8 * n;
        (
            Layout {
                size,
                desc: base,
                avail,
                used,
            },
            end - base,
        )
    }
}

/// Anonymous memory for the shadow rings, DMA-mapped for the device;
/// unmapped on drop, and kept with the backend (freed after it) if the
/// backend refuses the unmap, since the device could still write it.
pub(crate) struct ShadowMemory<B: DmaMapper> {
    backend: Arc<Slot<B>>,
    mem: Option<GuestMemoryMmap>,
    iova: u64,
    len: u64,
}

impl<B: DmaMapper> ShadowMemory<B> {
    /// Memory for rings of `sizes` and `extra` bytes after them (the
    /// bridge's own control commands), at the top of the device's IOVA
    /// range, which must lie above every region of `guest`.
    fn new<M: GuestMemory>(
        backend: Arc<Slot<B>>,
        guest: &M,
        sizes: &[u16],
        extra: u64,
    ) -> Result<Self> {
        let page = vdpa_bridge::host::page_size();
        let len: u64 = (sizes
            .iter()
            .map(|&s| Layout::at(0, s).1.next_multiple_of(page))
            .sum::<u64>()
            + extra.next_multiple_of(page))
        .max(page);
        let guest_end = guest
            .iter()
            .map(|r| r.start_addr().0.saturating_add(r.len()))
            .max()
            .unwrap_or(0);
        let region = shared_memory(len)?;
        let host = region.as_ptr() as usize;
        let iova = backend
            .with(|b| {
                // SAFETY: the mapping stays alive while the device may use
                // it: the memory is owned here, unmapped on drop before it
                // is freed, and kept with the backend (freed after its
                // close) when the unmap fails. It is only accessed through
                // vm-memory's volatile and atomic accessors.
                unsafe { b.dma_map_top(len, host, page, guest_end) }
            })?
            .map_err(|e| {
                Error::Shadow(format!(
                    "no IOVA above guest memory (ends at {guest_end:#x}) for {len:#x} bytes \
                     of shadow rings: {e}"
                ))
            })?
            .0;
        if iova.checked_add(len).is_none() {
            // dma_map_top places below 2^63, so this is not reached; undone
            // all the same, and the memory leaked rather than freed if the
            // device keeps its mapping.
            let undone = backend.with(|b| b.dma_unmap(Iova(iova), len).is_ok());
            if !matches!(undone, Ok(true)) {
                std::mem::forget(region);
            }
            return Err(Error::Shadow(format!(
                "shadow rings at {iova:#x} (+{len:#x}) pass the end of the address space"
            )));
        }
        let mem = GuestRegionMmap::new(region, GuestAddress(iova))
            .ok_or_else(|| Error::Shadow("shadow rings past the end of the address space".into()))
            .and_then(|r| {
                GuestMemoryMmap::from_regions(vec![r]).map_err(|e| Error::Shadow(e.to_string()))
            })?;
        Ok(ShadowMemory {
            backend,
            mem: Some(mem),
            iova,
            len,
        })
    }

    fn memory(&self) -> &GuestMemoryMmap {
        // Only taken in drop.
        self.mem.as_ref().expect("shadow memory present until drop")
    }
}

/// `len` bytes of shared memory, backed by a memfd: a backend that gives
/// the device the pages by file (VDUSE behind vhost-vdpa maps them into
/// its daemon) cannot use anonymous private memory. vm-memory maps a file
/// but does not create one, hence this wrapper.
fn shared_memory(len: u64) -> Result<MmapRegion> {
    use std::os::fd::FromRawFd;
    use vm_memory::FileOffset;
    let err = |what: String| Error::Shadow(format!("cannot allocate the shadow rings: {what}"));
    let size = usize::try_from(len).map_err(|_| err(format!("{len:#x} bytes")))?;
    // SAFETY: memfd_create with a NUL-terminated name and no pointer kept;
    // the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"vdpa-shadow-rings".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len)
        .map_err(|e| err(format!("ftruncate: {e}")))?;
    MmapRegion::from_file(FileOffset::new(file, 0), size).map_err(|e| err(format!("mmap: {e}")))
}

impl<B: DmaMapper> Drop for ShadowMemory<B> {
    fn drop(&mut self) {
        match self
            .backend
            .with(|b| b.dma_unmap(Iova(self.iova), self.len))
        {
            // Released: the backend is closed, its mappings went with it.
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(e)) => {
                log::error!(
                    "shadow rings at {:#x}: unmap refused ({e}); their memory is kept until the device is closed",
                    self.iova
                );
                if let Some(m) = self.mem.take() {
                    self.backend.keep(self.iova, self.len, Box::new(m));
                }
            }
        }
    }
}

/// A request the device holds: where its guest request is and what the
/// device may write.
#[derive(Default)]
struct Pending {
    in_use: bool,
    /// The bridge's own request (a replayed control command): never
    /// completed to the guest, never offered again.
    own: bool,
    /// A guest's net control command (class, command, data) and the guest
    /// address of its ack, recorded with the ack when it completes.
    control: Option<(u8, u8, Vec<u8>, u64)>,
    guest_head: u16,
    ndesc: u16,
    seq: u64,
    writable: Vec<(u64, u32)>,
    writable_bytes: u64,
}

/// One queue in shadow mode.
pub(crate) struct ShadowQueue {
    pub index: u16,
    guest: Queue,
    kick: EventFd,
    notifier: Option<EventFd>,
    doorbell: Doorbell,
    layout: Layout,
    device_event_idx: bool,
    free: Vec<u16>,
    next: Vec<u16>,
    pending: Vec<Pending>,
    avail_idx: u16,
    last_used: u16,
    seq: u64,
    /// Guest requests to offer before any new one (a resume's in-flight).
    replay: VecDeque<u16>,
    /// A request taken from the guest that did not fit yet.
    stash: Option<u16>,
    scratch: Vec<Seg>,
    broken: bool,
    /// A net device's control queue: every command offered is recorded.
    control: Option<SharedControl>,
}

/// What a shadow queue needs from activation.
pub(crate) struct ShadowQueueArg {
    pub index: u16,
    pub guest: Queue,
    pub kick: EventFd,
    pub position: QueuePosition,
}

impl ShadowQueue {
    fn new(
        arg: ShadowQueueArg,
        layout: Layout,
        doorbell: Doorbell,
        notifier: Option<EventFd>,
        acked: u64,
    ) -> ShadowQueue {
        let mut guest = arg.guest;
        let event_idx = acked & features::bit(features::RING_EVENT_IDX) != 0;
        guest.set_event_idx(event_idx);
        guest.set_next_avail(arg.position.next_avail);
        guest.set_next_used(arg.position.next_used);
        let n = usize::from(layout.size);
        ShadowQueue {
            index: arg.index,
            guest,
            kick: arg.kick,
            notifier,
            doorbell,
            layout,
            device_event_idx: event_idx,
            free: (0..layout.size).rev().collect(),
            next: vec![0; n],
            pending: (0..n).map(|_| Pending::default()).collect(),
            avail_idx: 0,
            last_used: 0,
            seq: 0,
            replay: arg.position.in_flight.into_iter().collect(),
            stash: None,
            scratch: Vec::with_capacity(n),
            broken: false,
            control: None,
        }
    }

    /// Requests of the guest the device holds now.
    pub fn in_flight(&self) -> usize {
        self.pending.iter().filter(|p| p.in_use && !p.own).count()
    }

    /// Where the guest's queue stands (the device must be stopped for
    /// this to stay true).
    pub fn position(&self) -> QueuePosition {
        let mut held: Vec<&Pending> = self.pending.iter().filter(|p| p.in_use && !p.own).collect();
        held.sort_by_key(|p| p.seq);
        let mut in_flight: Vec<u16> = held.iter().map(|p| p.guest_head).collect();
        // The stash is older than what is left to replay.
        in_flight.extend(self.stash);
        in_flight.extend(self.replay.iter().copied());
        QueuePosition {
            next_avail: self.guest.next_avail(),
            next_used: self.guest.next_used(),
            in_flight,
        }
    }

    /// The next guest request to offer: the one that waited for room,
    /// then those to offer again, then new ones.
    fn next_guest_head<M: GuestMemory>(&mut self, mem: &M) -> Option<u16> {
        if let Some(h) = self.stash.take() {
            return Some(h);
        }
        if let Some(h) = self.replay.pop_front() {
            return Some(h);
        }
        self.guest.pop_descriptor_chain(mem).map(|c| c.head_index())
    }

    /// The guest's avail index is more than a ring ahead of what was taken
    /// (virtio-queue then pops nothing, while its notification check keeps
    /// reporting more): the queue is broken.
    fn avail_too_far<M: GuestMemory>(&mut self, mem: &M) -> bool {
        let next = self.guest.next_avail();
        match self.guest.avail_idx(mem, Ordering::Acquire) {
            Ok(a) if a.0.wrapping_sub(next) > self.guest.size() => {
                self.fail(format!(
                    "the guest's avail index {} is more than {} ahead of {next}",
                    a.0,
                    self.guest.size()
                ));
                true
            }
            Ok(_) => false,
            Err(e) => {
                self.fail(format!("the guest's avail index is unreadable: {e}"));
                true
            }
        }
    }

    /// Offer the guest's available requests to the device; returns whether
    /// the guest must be interrupted (a request refused and completed).
    fn offer<M: GuestMemory>(
        &mut self,
        mem: &M,
        smem: &GuestMemoryMmap,
        log: &DirtyLog,
        kicked: bool,
    ) -> bool {
        if self.broken {
            return false;
        }
        let mut irq = false;
        // A guest kick reaches the device even with nothing new, as it
        // would on the guest's rings.
        let mut ring = kicked;
        loop {
            let taken = self.guest.next_avail();
            let added = self.fill(mem, smem, log, &mut irq);
            if added > 0 || std::mem::take(&mut ring) {
                // The shadow ring's index store before the doorbell write.
                fence(Ordering::SeqCst);
                if let Err(e) = self.doorbell.ring(u32::from(self.avail_idx)) {
                    log::warn!("shadow queue {}: doorbell write failed: {e}", self.index);
                }
            }
            if self.stash.is_some() || self.broken {
                break;
            }
            // EVENT_IDX: tell the guest to kick for what comes next; a
            // request published meanwhile is taken now.
            match self.guest.enable_notification(mem) {
                // Nothing taken although more is reported: an index the
                // ring cannot hold (the queue breaks), never a reason to
                // spin.
                Ok(true) if self.guest.next_avail() == taken && added == 0 => {
                    if !self.avail_too_far(mem) {
                        log::warn!(
                            "shadow queue {}: the guest's ring cannot be read",
                            self.index
                        );
                    }
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("shadow queue {}: guest ring unreadable: {e}", self.index);
                    break;
                }
            }
        }
        irq
    }

    fn fill<M: GuestMemory>(
        &mut self,
        mem: &M,
        smem: &GuestMemoryMmap,
        log: &DirtyLog,
        irq: &mut bool,
    ) -> u16 {
        let mut added = 0u16;
        let table = self.guest.desc_table();
        let gsize = self.guest.size();
        let max = usize::from(self.layout.size);
        while let Some(head) = self.next_guest_head(mem) {
            let mut segs = std::mem::take(&mut self.scratch);
            let walked = walk(mem, table, gsize, head, max, &mut segs);
            if let Err(reason) = walked {
                log::warn!(
                    "shadow queue {}: guest request {head} refused: {reason}",
                    self.index
                );
                self.scratch = segs;
                self.complete_guest(mem, log, head, 0);
                *irq = true;
                continue;
            }
            if segs.is_empty() {
                self.scratch = segs;
                self.complete_guest(mem, log, head, 0);
                *irq = true;
                continue;
            }
            if segs.len() > self.free.len() {
                self.scratch = segs;
                self.stash = Some(head);
                break;
            }
            let control = self.control.as_ref().and_then(|_| {
                // The ack is the request's last byte the device writes.
                let last = segs.iter().rev().find(|s| s.write && s.len > 0)?;
                let ack = last.addr + u64::from(last.len) - 1;
                let (class, command, data) = net_ctrl::parse(mem, &segs)?;
                Some((class, command, data, ack))
            });
            let id = self.post(smem, head, &segs, false);
            self.pending[usize::from(id)].control = control;
            self.scratch = segs;
            added += 1;
        }
        added
    }

    /// Write `segs` as a chain of free shadow descriptors and publish it
    /// (`own`: a request of the bridge, not of the guest).
    fn post(&mut self, smem: &GuestMemoryMmap, guest_head: u16, segs: &[Seg], own: bool) -> u16 {
        let ids_start = self.free.len() - segs.len();
        let ids: &[u16] = &self.free[ids_start..];
        let head = ids[ids.len() - 1];
        let p = &mut self.pending[usize::from(head)];
        p.writable.clear();
        p.writable_bytes = 0;
        // Chain in the order of the segments: the last free id first.
        for (k, s) in segs.iter().enumerate() {
            let id = ids[ids.len() - 1 - k];
            let mut flags = if s.write { VRING_DESC_F_WRITE } else { 0 };
            let next = if k + 1 < segs.len() {
                flags |= VRING_DESC_F_NEXT;
                ids[ids.len() - 2 - k]
            } else {
                0
            };
            self.next[usize::from(id)] = next;
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&s.addr.to_le_bytes());
            d[8..12].copy_from_slice(&s.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            let at = GuestAddress(self.layout.desc + 16 * u64::from(id));
            if smem.write_slice(&d, at).is_err() {
                // The layout lies inside the shadow memory by construction.
                log::error!("shadow queue {}: descriptor write failed", self.index);
            }
            if s.write {
                p.writable.push((s.addr, s.len));
                p.writable_bytes += u64::from(s.len);
            }
        }
        p.in_use = true;
        p.own = own;
        p.control = None;
        p.guest_head = guest_head;
        p.ndesc = segs.len() as u16;
        p.seq = self.seq;
        self.seq += 1;
        self.free.truncate(ids_start);
        let size = self.layout.size;
        let slot = self.layout.avail + 4 + 2 * u64::from(self.avail_idx % size);
        let _ = smem.write_obj(head.to_le(), GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        let _ = smem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.layout.avail + 2),
            Ordering::Release,
        );
        head
    }

    fn complete_guest<M: GuestMemory>(&mut self, mem: &M, log: &DirtyLog, head: u16, len: u32) {
        if let Err(e) = self.guest.add_used(mem, head, len) {
            log::warn!(
                "shadow queue {}: cannot return request {head}: {e}",
                self.index
            );
        }
        let n = u64::from(self.guest.size());
        log.mark(self.guest.used_ring(), 6 + 8 * n);
    }

    /// Take the device's completions; returns whether the guest wants an
    /// interrupt.
    fn reap<M: GuestMemory>(&mut self, mem: &M, smem: &GuestMemoryMmap, log: &DirtyLog) -> bool {
        if self.broken {
            return false;
        }
        let size = self.layout.size;
        let mut done = false;
        loop {
            let idx = match smem.load::<u16>(GuestAddress(self.layout.used + 2), Ordering::Acquire)
            {
                Ok(v) => u16::from_le(v),
                Err(_) => return done,
            };
            if idx == self.last_used {
                if !self.device_event_idx {
                    break;
                }
                // Ask for an interrupt at the next completion, then look
                // again for one that came before the device saw it.
                let ue = GuestAddress(self.layout.avail + 4 + 2 * u64::from(size));
                let _ = smem.store(self.last_used.to_le(), ue, Ordering::Release);
                fence(Ordering::SeqCst);
                let again = smem
                    .load::<u16>(GuestAddress(self.layout.used + 2), Ordering::Acquire)
                    .map(u16::from_le)
                    .unwrap_or(idx);
                if again == self.last_used {
                    break;
                }
                continue;
            }
            if idx.wrapping_sub(self.last_used) > size {
                self.fail(format!(
                    "used index {idx} is more than {size} ahead of {}",
                    self.last_used
                ));
                return done;
            }
            while self.last_used != idx {
                let at = self.layout.used + 4 + 8 * u64::from(self.last_used % size);
                let (id, len) = match (
                    smem.read_obj::<u32>(GuestAddress(at)),
                    smem.read_obj::<u32>(GuestAddress(at + 4)),
                ) {
                    (Ok(i), Ok(l)) => (u32::from_le(i), u32::from_le(l)),
                    _ => return done,
                };
                let Some(p) = usize::try_from(id)
                    .ok()
                    .and_then(|i| self.pending.get_mut(i))
                    .filter(|p| p.in_use)
                else {
                    self.fail(format!(
                        "completion of descriptor {id}, which it does not hold"
                    ));
                    return done;
                };
                p.in_use = false;
                let own = p.own;
                // The ack is read before the guest can see the answer.
                if let (Some((class, command, data, ack)), Some(w)) =
                    (p.control.take(), &self.control)
                {
                    let accepted = mem
                        .read_obj::<u8>(GuestAddress(ack))
                        .map(|a| a == VIRTIO_NET_OK)
                        .unwrap_or(false);
                    net_ctrl::lock(w)
                        .state
                        .record(class, command, &data, Some(accepted));
                }
                if !own {
                    for &(addr, l) in &p.writable {
                        log.mark(addr, u64::from(l));
                    }
                }
                // A device cannot have written more than it was given.
                let len = u64::from(len).min(p.writable_bytes) as u32;
                let (guest_head, ndesc) = (p.guest_head, p.ndesc);
                self.free_chain(id as u16, ndesc);
                self.last_used = self.last_used.wrapping_add(1);
                if !own {
                    self.complete_guest(mem, log, guest_head, len);
                    done = true;
                }
            }
        }
        done
    }

    fn free_chain(&mut self, head: u16, ndesc: u16) {
        let mut d = head;
        for _ in 0..ndesc {
            self.free.push(d);
            d = self.next[usize::from(d)];
        }
    }

    /// Send the bridge's own control commands (a net device's state,
    /// replayed after a reset) one at a time on this queue, before any
    /// guest request: each is written to `scratch` (bridge memory the
    /// device can read, `scratch_len` bytes), offered, and waited for
    /// until `deadline`. Returns how many the device refused; a command
    /// not finished by the deadline ends the replay with an error (it
    /// stays with the device and is dropped when it completes).
    fn inject(
        &mut self,
        smem: &GuestMemoryMmap,
        scratch: u64,
        scratch_len: u64,
        cmds: &[ControlCommand],
        deadline: Instant,
    ) -> std::result::Result<usize, String> {
        let mut refused = 0;
        for c in cmds {
            let n = 2 + c.data.len() as u64;
            if n + 1 > scratch_len {
                log::error!(
                    "shadow queue {}: control command {}.{} ({n} bytes) too large to replay",
                    self.index,
                    c.class,
                    c.command
                );
                refused += 1;
                continue;
            }
            if self.free.len() < 2 {
                return Err("no free descriptors".into());
            }
            let mut bytes = Vec::with_capacity(n as usize + 1);
            bytes.extend_from_slice(&[c.class, c.command]);
            bytes.extend_from_slice(&c.data);
            bytes.push(VIRTIO_NET_ERR);
            smem.write_slice(&bytes, GuestAddress(scratch))
                .map_err(|e| format!("scratch write: {e}"))?;
            let segs = [
                Seg {
                    addr: scratch,
                    len: n as u32,
                    write: false,
                },
                Seg {
                    addr: scratch + n,
                    len: 1,
                    write: true,
                },
            ];
            self.post(smem, 0, &segs, true);
            fence(Ordering::SeqCst);
            self.doorbell
                .ring(u32::from(self.avail_idx))
                .map_err(|e| format!("doorbell: {e}"))?;
            let mut polls = 0u32;
            loop {
                let idx = smem
                    .load::<u16>(GuestAddress(self.layout.used + 2), Ordering::Acquire)
                    .map(u16::from_le)
                    .map_err(|e| e.to_string())?;
                if idx != self.last_used {
                    let at =
                        self.layout.used + 4 + 8 * u64::from(self.last_used % self.layout.size);
                    let id = smem
                        .read_obj::<u32>(GuestAddress(at))
                        .map(u32::from_le)
                        .map_err(|e| e.to_string())?;
                    let p = usize::try_from(id)
                        .ok()
                        .and_then(|i| self.pending.get_mut(i))
                        .filter(|p| p.in_use && p.own)
                        .ok_or_else(|| format!("the device completed descriptor {id}"))?;
                    p.in_use = false;
                    let ndesc = p.ndesc;
                    self.free_chain(id as u16, ndesc);
                    self.last_used = self.last_used.wrapping_add(1);
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "command {}.{} not finished in time",
                        c.class, c.command
                    ));
                }
                // A device answers a control command in microseconds:
                // spin briefly, then sleep.
                polls += 1;
                if polls < 200 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            let ack: u8 = smem
                .read_obj(GuestAddress(scratch + n))
                .map_err(|e| e.to_string())?;
            if ack != VIRTIO_NET_OK {
                log::warn!(
                    "shadow queue {}: the device refused replayed control command {}.{} ({} bytes)",
                    self.index,
                    c.class,
                    c.command,
                    c.data.len()
                );
                refused += 1;
            }
        }
        Ok(refused)
    }

    fn fail(&mut self, what: String) {
        log::error!(
            "shadow queue {}: the device misbehaves ({what}); the queue stops",
            self.index
        );
        self.broken = true;
    }

    fn wants_interrupt<M: GuestMemory>(&mut self, mem: &M) -> bool {
        self.guest.needs_notification(mem).unwrap_or(true)
    }

    fn interrupt(&self, interrupt: &dyn VirtioInterrupt) {
        let r = match &self.notifier {
            Some(fd) => fd.write(1),
            None => interrupt.trigger(InterruptType::Queue(self.index)),
        };
        if let Err(e) = r {
            log::warn!("shadow queue {}: guest interrupt failed: {e}", self.index);
        }
    }
}

/// A queue's doorbell rung through a kick eventfd the backend watches.
pub(crate) struct EventFdKick(pub EventFd);

impl vdpa_bridge::RingDoorbell for EventFdKick {
    fn ring(&self, _next: u32) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// One device vector the relay listens to.
struct VectorFd {
    fd: EventFd,
    /// Positions in `Run::queues` of the queues it serves.
    queues: Vec<usize>,
    /// It also carries config changes: forward them to the guest.
    config: Option<Option<EventFd>>,
}

/// What the shadow relay thread owns; handed back when it stops.
pub(crate) struct Run<M: GuestMemory> {
    pub queues: Vec<ShadowQueue>,
    vectors: Vec<VectorFd>,
    smem: GuestMemoryMmap,
    mem: GuestMemoryAtomic<M>,
    log: Arc<DirtyLog>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl<M: GuestMemory> Run<M> {
    fn on_kick(&mut self, i: usize) {
        let m = self.mem.memory();
        if let Some(q) = self.queues.get_mut(i) {
            let _ = q.kick.read();
            if q.offer(&*m, &self.smem, &self.log, true) && q.wants_interrupt(&*m) {
                q.interrupt(self.interrupt.as_ref());
            }
        }
    }

    fn on_vector(&mut self, v: usize) {
        let Some(vec) = self.vectors.get(v) else {
            return;
        };
        if vec.fd.read().is_err() {
            return;
        }
        let m = self.mem.memory();
        for &i in &vec.queues {
            let Some(q) = self.queues.get_mut(i) else {
                continue;
            };
            let mut irq = q.reap(&*m, &self.smem, &self.log);
            // Room for a request that waited.
            if q.stash.is_some() || !q.replay.is_empty() {
                irq |= q.offer(&*m, &self.smem, &self.log, false);
            }
            if irq && q.wants_interrupt(&*m) {
                q.interrupt(self.interrupt.as_ref());
            }
        }
        if let Some(cfg) = &vec.config {
            let r = match cfg {
                Some(fd) => fd.write(1),
                None => self.interrupt.trigger(InterruptType::Config),
            };
            if let Err(e) = r {
                log::warn!("shadow relay: config interrupt failed: {e}");
            }
        }
    }

    /// Take every completion and interrupt the guest as it asks.
    pub fn reap_all(&mut self) -> bool {
        let m = self.mem.memory();
        let mut any = false;
        for q in self.queues.iter_mut() {
            if q.reap(&*m, &self.smem, &self.log) {
                any = true;
                if q.wants_interrupt(&*m) {
                    q.interrupt(self.interrupt.as_ref());
                }
            }
        }
        any
    }
}

/// Shadow mode of an active device: the relay thread and the rings.
pub(crate) struct Shadow<B: DmaMapper, M: GuestMemory> {
    stop: Stopper,
    back: Receiver<Run<M>>,
    /// Dropped after the device was reset (see [`Shadow::stop`]).
    memory: ShadowMemory<B>,
}

/// How long a pause lets the device finish what it holds before it is
/// reset (the rest is offered again at resume).
pub const PAUSE_DRAIN: Duration = Duration::from_millis(1000);

/// Bridge memory for one replayed control command and its ack.
const CONTROL_SCRATCH: u64 = net_ctrl::MAX_COMMAND as u64 + 4096;
/// How long replaying a net device's control state may take in all.
const REPLAY_LIMIT: Duration = Duration::from_millis(2000);
const VIRTIO_NET_OK: u8 = virtio_bindings::virtio_net::VIRTIO_NET_OK as u8;
const VIRTIO_NET_ERR: u8 = virtio_bindings::virtio_net::VIRTIO_NET_ERR as u8;

/// What starting shadow mode needs besides the backend.
pub(crate) struct ShadowPlan<M: GuestMemory> {
    pub queues: Vec<ShadowQueueArg>,
    pub mem: GuestMemoryAtomic<M>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub log: Arc<DirtyLog>,
    pub acked: u64,
    pub config_writes: Vec<(u64, Vec<u8>)>,
    /// A net device's control queue and its state, replayed first.
    pub control: Option<(u16, SharedControl)>,
}

impl<B, M> Shadow<B, M>
where
    B: VdpaOps + DmaMapper + Send + 'static,
    M: GuestMemory + Send + Sync + 'static,
{
    /// Program the (reset) device on shadow rings, offer the guest's
    /// requests from `plan`'s positions and start the relay. On error the
    /// caller resets the device.
    pub fn start(
        backend: &Arc<Slot<B>>,
        plan: ShadowPlan<M>,
        name: String,
        hook: Option<ThreadHook>,
    ) -> Result<Shadow<B, M>> {
        if plan.acked & features::bit(features::RING_PACKED) != 0 {
            return Err(Error::Unsupported(
                "shadow virtqueues need split rings (the guest negotiated packed rings)",
            ));
        }
        let sizes: Vec<u16> = plan.queues.iter().map(|q| q.guest.size()).collect();
        let control = plan
            .control
            .clone()
            .filter(|(i, _)| plan.queues.iter().any(|q| q.index == *i));
        let scratch_len = if control.is_some() {
            CONTROL_SCRATCH
        } else {
            0
        };
        let memory = ShadowMemory::new(backend.clone(), &*plan.mem.memory(), &sizes, scratch_len)?;
        let smem = memory.memory().clone();
        // Zeroed rings.
        let mut base = memory.iova;
        let page = vdpa_bridge::host::page_size();
        let mut layouts = Vec::with_capacity(sizes.len());
        for &s in &sizes {
            let (l, len) = Layout::at(base, s);
            layouts.push(l);
            base += len.next_multiple_of(page);
        }
        let scratch = base;
        let acked = plan.acked;
        // From here on the device may use the shadow rings: on an error it
        // is reset before their memory goes.
        let launched = (|| -> Result<(Stopper, Receiver<Run<M>>)> {
            let (queues, vectors) = backend.with(|b| -> Result<_> {
                crate::activate::negotiate(b, acked)?;
                for (off, data) in &plan.config_writes {
                    let range = vdpa_bridge::ConfigRange::new(*off, data.len(), b.config_size())?;
                    b.write_device_config(range, data)
                        .map_err(backend_err("write config (replay)"))?;
                }
                let mut queues = Vec::with_capacity(plan.queues.len());
                for (arg, l) in plan.queues.into_iter().zip(&layouts) {
                    let qi = QueueIndex(arg.index);
                    b.set_vring_num(qi, l.size)
                        .map_err(backend_err("set_vring_num"))?;
                    b.set_vring_addr(
                        qi,
                        vdpa_bridge::types::VringAddrs {
                            desc: l.desc,
                            driver: l.avail,
                            device: l.used,
                        },
                    )
                    .map_err(backend_err("set_vring_addr"))?;
                    b.set_vring_base(qi, 0)
                        .map_err(backend_err("set_vring_base"))?;
                    let doorbell = match b.doorbell(qi) {
                        Ok(d) => {
                            b.set_vring_kick(qi, None)
                                .map_err(backend_err("detach kick eventfd"))?;
                            d
                        }
                        // No doorbell to write (vhost-vdpa): kick through
                        // an eventfd of the relay's own.
                        Err(_) if b.backend_caps().kick_eventfd => {
                            let fd = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
                            b.set_vring_kick(qi, Some(&fd))
                                .map_err(backend_err("set kick eventfd"))?;
                            Doorbell::new(Arc::new(EventFdKick(fd)))
                        }
                        Err(e) => return Err(backend_err("doorbell")(e)),
                    };
                    let notifier = plan.interrupt.notifier(InterruptType::Queue(arg.index));
                    let index = arg.index;
                    let mut q = ShadowQueue::new(arg, *l, doorbell, notifier, acked);
                    q.control = control
                        .as_ref()
                        .filter(|(c, _)| *c == index)
                        .map(|(_, w)| w.clone());
                    queues.push(q);
                }
                let vectors = wire_vectors(b, &plan.interrupt, &queues)?;
                for q in 0..b.num_queues() {
                    if !queues.iter().any(|s| s.index == q) {
                        b.set_vring_call(QueueIndex(q), None)
                            .map_err(backend_err("detach call eventfd"))?;
                    }
                }
                for q in &queues {
                    b.set_vring_enable(QueueIndex(q.index), true)
                        .map_err(backend_err("set_vring_enable"))?;
                }
                crate::activate::driver_ok(b)?;
                Ok((queues, vectors))
            })??;
            let mut queues = queues;
            if let Some((ci, watch)) = &control {
                let cmds = net_ctrl::lock(watch).state.replay();
                if let Some(q) = queues.iter_mut().find(|q| q.index == *ci) {
                    if !cmds.is_empty() {
                        let t = Instant::now();
                        match q.inject(&smem, scratch, scratch_len, &cmds, t + REPLAY_LIMIT) {
                            Ok(refused) => log::info!(
                                "net control state replayed: {} command(s), {refused} refused, in {:?}",
                                cmds.len(),
                                t.elapsed()
                            ),
                            Err(e) => log::error!(
                                "net control state not fully replayed ({} command(s)): {e}; \
                                 the device may filter or spread traffic unlike the guest asked",
                                cmds.len()
                            ),
                        }
                    }
                }
            }
            let run = Run {
                queues,
                vectors,
                smem,
                mem: plan.mem,
                log: plan.log,
                interrupt: plan.interrupt,
            };
            let fds: Vec<&EventFd> = run
                .queues
                .iter()
                .map(|q| &q.kick)
                .chain(run.vectors.iter().map(|v| &v.fd))
                .collect();
            let (epoll, stop) = Stopper::epoll(&fds)?;
            let (tx, back) = sync_channel(1);
            let nq = run.queues.len();
            let stop = stop.spawn(
                name,
                ThreadRole::Relay,
                hook,
                move |epoll, stopping| {
                    let mut run = run;
                    // What the guest made available before the device ran:
                    // the requests it held (offered again) and new ones.
                    for i in 0..nq {
                        run.on_kick(i);
                    }
                    run.reap_all();
                    wait_loop(&epoll, stopping, |t| {
                        if t < nq {
                            run.on_kick(t);
                        } else {
                            run.on_vector(t - nq);
                        }
                    });
                    let _ = tx.send(run);
                },
                epoll,
            )?;
            Ok((stop, back))
        })();
        match launched {
            Ok((stop, back)) => Ok(Shadow { stop, back, memory }),
            Err(e) => {
                if let Ok(Err(r)) = backend.with(|b| b.reset()) {
                    log::error!("reset after a failed start on shadow rings failed: {r}");
                }
                drop(memory);
                Err(e)
            }
        }
    }
}

impl<B: DmaMapper, M: GuestMemory> Shadow<B, M> {
    /// Stop the relay and hand back its state; the device keeps running
    /// until the caller resets it, and the shadow memory stays mapped
    /// until [`ShadowRun::finish`] drops it.
    pub fn stop(mut self) -> ShadowRun<B, M> {
        self.stop.stop();
        ShadowRun {
            run: self.back.try_recv().ok(),
            _memory: self.memory,
        }
    }
}

/// A second `Queue` with the same configuration and indices (virtio-queue's
/// `Queue` is not `Clone`).
pub(crate) fn copy_queue(q: &Queue) -> Result<Queue> {
    let bad = |reason| Error::Shadow(format!("cannot copy the guest's queue: {reason}"));
    let mut c = Queue::new(q.max_size()).map_err(|_| bad("maximum size"))?;
    c.try_set_size(q.size()).map_err(|_| bad("size"))?;
    c.try_set_desc_table_address(GuestAddress(q.desc_table()))
        .map_err(|_| bad("descriptor table address"))?;
    c.try_set_avail_ring_address(GuestAddress(q.avail_ring()))
        .map_err(|_| bad("available ring address"))?;
    c.try_set_used_ring_address(GuestAddress(q.used_ring()))
        .map_err(|_| bad("used ring address"))?;
    c.set_next_avail(q.next_avail());
    c.set_next_used(q.next_used());
    c.set_event_idx(q.event_idx_enabled());
    c.set_ready(q.ready());
    Ok(c)
}

/// A stopped shadow relay whose device may still run.
pub(crate) struct ShadowRun<B: DmaMapper, M: GuestMemory> {
    pub run: Option<Run<M>>,
    _memory: ShadowMemory<B>,
}

impl<B: DmaMapper, M: GuestMemory> ShadowRun<B, M> {
    /// Let the device finish what it holds on `waited` queues (by index),
    /// at most `limit`, delivering completions to the guest.
    pub fn drain(&mut self, waited: impl Fn(u16) -> bool, limit: Duration) -> Duration {
        let start = Instant::now();
        let Some(run) = self.run.as_mut() else {
            return Duration::ZERO;
        };
        loop {
            run.reap_all();
            let busy = run
                .queues
                .iter()
                .any(|q| !q.broken && waited(q.index) && q.in_flight() > 0);
            if !busy || start.elapsed() >= limit {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// After the device was reset: take its last completions and give the
    /// queues' positions; the shadow rings are unmapped and freed.
    pub fn finish(mut self) -> Vec<(u16, QueuePosition)> {
        let Some(mut run) = self.run.take() else {
            return Vec::new();
        };
        run.reap_all();
        run.queues.iter().map(|q| (q.index, q.position())).collect()
    }
}

/// Every device vector serving a queue signals an eventfd of the relay;
/// one that only carries config changes goes straight to the guest.
fn wire_vectors<B: VdpaOps>(
    b: &mut B,
    interrupt: &Arc<dyn VirtioInterrupt>,
    queues: &[ShadowQueue],
) -> Result<Vec<VectorFd>> {
    let plan = b.irq_plan();
    if plan.groups.is_empty() {
        return Err(Error::Unsupported(
            "the device has no MSI-X vectors: interrupts cannot be delivered",
        ));
    }
    let mut out = Vec::new();
    for g in &plan.groups {
        let served: Vec<(usize, QueueIndex)> = g
            .queues
            .iter()
            .filter_map(|q| queues.iter().position(|s| s.index == q.0).map(|p| (p, *q)))
            .collect();
        let config_fd = if g.config {
            Some(interrupt.notifier(InterruptType::Config))
        } else {
            None
        };
        if served.is_empty() {
            match config_fd {
                Some(Some(fd)) => b
                    .set_config_call(Some(&fd))
                    .map_err(backend_err("set config eventfd"))?,
                Some(None) => {
                    let fd = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
                    b.set_config_call(Some(&fd))
                        .map_err(backend_err("set config eventfd"))?;
                    out.push(VectorFd {
                        fd,
                        queues: Vec::new(),
                        config: Some(None),
                    });
                }
                None => {}
            }
            continue;
        }
        let fd = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        // The backend signals the group's first queue's eventfd.
        b.set_vring_call(served[0].1, Some(&fd))
            .map_err(backend_err("set call eventfd"))?;
        if g.config {
            b.set_config_call(Some(&fd))
                .map_err(backend_err("set config eventfd"))?;
        }
        out.push(VectorFd {
            fd,
            queues: served.iter().map(|&(p, _)| p).collect(),
            config: config_fd,
        });
    }
    Ok(out)
}

/// The guest's avail and used index of `q`.
fn ring_indices<M: GuestMemory>(q: &Queue, mem: &M) -> std::result::Result<(u16, u16), String> {
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| format!("avail index unreadable: {e}"))?
        .0;
    let used = q
        .used_idx(mem, Ordering::Acquire)
        .map_err(|e| format!("used index unreadable: {e}"))?
        .0;
    Ok((avail, used))
}

/// The guest's avail and used index and, when the device completed the
/// queue's requests in order so far, the heads it still holds (available
/// positions `used..avail`); `None` when it completed out of order and
/// still holds some, so the heads it holds cannot be told from the rings.
pub(crate) fn guest_in_flight<M: GuestMemory>(
    q: &Queue,
    mem: &M,
) -> std::result::Result<(u16, u16, Option<Vec<u16>>), String> {
    let (avail, used) = ring_indices(q, mem)?;
    let size = q.size();
    let n = avail.wrapping_sub(used);
    if n > size {
        return Err(format!(
            "{n} requests between used index {used} and avail index {avail}, queue size {size}"
        ));
    }
    if n == 0 {
        return Ok((avail, used, Some(Vec::new())));
    }
    let slot = |ring: u64, p: u16, width: u64| ring + 4 + width * u64::from(p % size);
    let read16 = |a: u64| mem.read_obj::<u16>(GuestAddress(a)).map(u16::from_le);
    let read32 = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).map(u32::from_le);
    // The completed positions whose available slots are not overwritten:
    // the slot of `avail - size` is the one the guest fills next, maybe
    // being written now, so it is not compared.
    let k = (size - n).saturating_sub(1);
    for back in 1..=k {
        let p = used.wrapping_sub(back);
        let a = read16(slot(q.avail_ring(), p, 2)).map_err(|e| e.to_string())?;
        let u = read32(slot(q.used_ring(), p, 8)).map_err(|e| e.to_string())?;
        if u32::from(a) != u {
            return Ok((avail, used, None));
        }
    }
    let mut heads = Vec::with_capacity(usize::from(n));
    for i in 0..n {
        let p = used.wrapping_add(i);
        heads.push(read16(slot(q.avail_ring(), p, 2)).map_err(|e| e.to_string())?);
    }
    Ok((avail, used, Some(heads)))
}

/// Where queue `q` stands once its device was stopped, given that up to
/// used index `mark` the device completed exactly what it was given in
/// available order (all of it, or in order): it holds the requests
/// available from `mark` on that it has not completed since.
pub(crate) fn held_since<M: GuestMemory>(
    q: &Queue,
    mem: &M,
    mark: u16,
) -> std::result::Result<QueuePosition, String> {
    let (avail, used) = ring_indices(q, mem)?;
    let size = q.size();
    let (given, done) = (avail.wrapping_sub(mark), used.wrapping_sub(mark));
    if given > size || done > given {
        return Err(format!(
            "avail index {avail} and used index {used} from {mark} on do not fit a queue of {size}"
        ));
    }
    let read16 = |a: u64| mem.read_obj::<u16>(GuestAddress(a)).map(u16::from_le);
    let read32 = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).map(u32::from_le);
    let mut held = Vec::with_capacity(usize::from(given));
    for i in 0..given {
        let p = mark.wrapping_add(i) % size;
        held.push(read16(q.avail_ring() + 4 + 2 * u64::from(p)).map_err(|e| e.to_string())?);
    }
    for j in 0..done {
        let p = mark.wrapping_add(j) % size;
        let id = read32(q.used_ring() + 4 + 8 * u64::from(p)).map_err(|e| e.to_string())?;
        match held.iter().position(|&h| u32::from(h) == id) {
            Some(k) => {
                held.remove(k);
            }
            None => {
                return Err(format!(
                    "the device completed request {id}, which it was not given"
                ))
            }
        }
    }
    Ok(QueuePosition {
        next_avail: avail,
        next_used: used,
        in_flight: held,
    })
}

/// Whether a queue is waited for when the device is stopped: a network
/// device's receive queues hold buffers until packets come, so they are
/// not (their buffers are offered again), everything else is.
pub(crate) fn waited(device_type: u32, q: u16, nq: usize, acked: u64) -> bool {
    const VIRTIO_ID_NET: u32 = 1;
    !(device_type == VIRTIO_ID_NET
        && crate::release::answer_for(device_type, q, nq, acked).is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(m: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    #[test]
    fn walk_follows_chains_and_indirect_tables_and_refuses_bad_ones() {
        let m = mem();
        let mut out = Vec::new();
        desc(&m, 0x1000, 0, 0x8000, 16, VRING_DESC_F_NEXT, 3);
        desc(&m, 0x1000, 3, 0x9000, 512, VRING_DESC_F_WRITE, 0);
        walk(&m, 0x1000, 8, 0, 8, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Seg {
                    addr: 0x8000,
                    len: 16,
                    write: false
                },
                Seg {
                    addr: 0x9000,
                    len: 512,
                    write: true
                }
            ]
        );
        // An indirect table of three.
        desc(&m, 0x1000, 1, 0x2000, 48, VRING_DESC_F_INDIRECT, 0);
        desc(&m, 0x2000, 0, 0xa000, 16, VRING_DESC_F_NEXT, 1);
        desc(
            &m,
            0x2000,
            1,
            0xb000,
            4096,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            2,
        );
        desc(&m, 0x2000, 2, 0xc000, 1, VRING_DESC_F_WRITE, 0);
        walk(&m, 0x1000, 8, 1, 8, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[1].write && out[1].addr == 0xb000);
        // Refused: a loop, a buffer outside memory, out-of-range next,
        // nested indirect, too long.
        desc(&m, 0x1000, 4, 0x8000, 16, VRING_DESC_F_NEXT, 4);
        assert_eq!(
            walk(&m, 0x1000, 8, 4, 8, &mut out),
            Err("descriptor chain loops")
        );
        desc(&m, 0x1000, 5, 0x10_0000 - 8, 16, 0, 0);
        assert_eq!(
            walk(&m, 0x1000, 8, 5, 8, &mut out),
            Err("buffer outside guest memory")
        );
        desc(&m, 0x1000, 6, 0x8000, 16, VRING_DESC_F_NEXT, 9);
        assert_eq!(
            walk(&m, 0x1000, 8, 6, 8, &mut out),
            Err("descriptor index out of range")
        );
        desc(&m, 0x2000, 2, 0x2000, 16, VRING_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk(&m, 0x1000, 8, 1, 8, &mut out),
            Err("indirect descriptor inside an indirect table")
        );
        assert_eq!(
            walk(&m, 0x1000, 8, 0, 1, &mut out),
            Err("chain longer than the queue")
        );
        // A descriptor the device would be handed at the shadow rings'
        // IOVA is not guest memory.
        desc(&m, 0x1000, 7, 1 << 47, 16, 0, 0);
        assert_eq!(
            walk(&m, 0x1000, 8, 7, 8, &mut out),
            Err("buffer outside guest memory")
        );
    }

    #[test]
    fn in_flight_is_read_from_rings_completed_in_order_only() {
        let m = mem();
        let mut q = Queue::new(8).unwrap();
        q.set_size(8);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        // Avail positions 0..5 hold heads 10..15; the device used 0..3
        // in order.
        for p in 0u16..5 {
            m.write_obj((10 + p).to_le(), GuestAddress(0x2004 + 2 * u64::from(p)))
                .unwrap();
        }
        m.write_obj(5u16.to_le(), GuestAddress(0x2002)).unwrap();
        for p in 0u16..3 {
            m.write_obj(
                u32::from(10 + p).to_le(),
                GuestAddress(0x3004 + 8 * u64::from(p)),
            )
            .unwrap();
        }
        m.write_obj(3u16.to_le(), GuestAddress(0x3002)).unwrap();
        assert_eq!(guest_in_flight(&q, &m).unwrap(), (5, 3, Some(vec![13, 14])));
        // Out of order: position 1 completed head 14.
        m.write_obj(14u32.to_le(), GuestAddress(0x3004 + 8))
            .unwrap();
        assert_eq!(guest_in_flight(&q, &m).unwrap(), (5, 3, None));
        // Nothing held: no question.
        m.write_obj(5u16.to_le(), GuestAddress(0x3002)).unwrap();
        assert_eq!(guest_in_flight(&q, &m).unwrap(), (5, 5, Some(vec![])));
        // A used index past the avail index is an error.
        m.write_obj(7u16.to_le(), GuestAddress(0x3002)).unwrap();
        m.write_obj(5u16.to_le(), GuestAddress(0x2002)).unwrap();
        assert!(guest_in_flight(&q, &m).is_err());
    }
}
