//! An emulated modern virtio-pci **virtio-blk** device on a RAM disk, behind
//! the same [`PciFunction`] seam VFIO uses.
//!
//! It behaves like QEMU's `virtio-blk-pci,disable-legacy=on,iommu_platform=on`:
//! a config space with the virtio vendor capabilities and MSI-X, one memory
//! BAR with common config, ISR, device config and notify regions, and real
//! split virtqueues processed with `virtio-queue` in the driver's DMA
//! memory (resolved through the mappings made with `dma_map`). Every BAR
//! access traps (no BAR is mapped), so register semantics are emulated
//! exactly.
//!
//! It serves fast unit tests (with knobs for misbehaving devices) and the
//! CLI's no-hardware default. It is never a substitute for the lab's tests
//! on QEMU's devices.

mod blk;
mod dma;
mod net;

pub use net::{NetState, DEFAULT_MAC};

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vdpa_bridge::pci::{
    cfg, BarInfo, BarKind, BarMapping, IoWidth, PciError, PciFunction, PciResult,
};
use vdpa_bridge::types::{features, status, Iova, IovaRange};
use vdpa_bridge::virtio_pci::regs::{cfg_type as cap_type, common, NO_VECTOR};

/// BAR 0 layout.
const BAR_SIZE: u64 = 0x8000;
const COMMON_OFF: u64 = 0x0000;
const ISR_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x2000;
const NOTIFY_OFF: u64 = 0x3000;
const NOTIFY_MAX: u64 = 0x1000;
const MSIX_TABLE_OFF: u64 = 0x4000;
const MSIX_PBA_OFF: u64 = 0x6000;

// The virtio-blk feature bits the device offers.
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE as BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH as BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ as BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX as BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX as BLK_F_SIZE_MAX,
};

/// What the emulated device looks like and how it misbehaves.
#[derive(Clone, Debug)]
pub struct EmuConfig {
    /// Request queues.
    pub num_queues: u16,
    /// Maximum size of each queue (0 simulates a broken device).
    pub queue_max_size: u16,
    /// The last queue's maximum when it differs from the others' (a
    /// device whose queues differ, as virtio-balloon's reporting queue
    /// or virtio-net's control queue do).
    pub last_queue_max_size: Option<u16>,
    /// MSI-X vectors (`None`: one per queue plus config).
    pub msix_vectors: Option<u32>,
    /// `notify_off_multiplier` of the notify capability.
    pub notify_off_multiplier: u32,
    /// A device whose status never reads 0 after a reset (see also
    /// [`EmulatedFunction::set_reset_stuck`]).
    pub never_finish_reset: bool,
    /// A function-level reset does complete a reset that is stuck.
    pub flr_recovers: bool,
    /// The function has no function-level reset.
    pub no_function_reset: bool,
    /// Offer VIRTIO_F_VERSION_1 (false: a device a modern driver must refuse).
    pub offer_version_1: bool,
    /// A legacy-only device: id 0x1001, no virtio capabilities.
    pub legacy_only: bool,
    /// Further feature bits to offer (e.g. NOTIFICATION_DATA, RING_PACKED).
    pub extra_features: u64,
    /// RAM disk size in bytes (a multiple of 512).
    pub disk_size: u64,
    /// IOVAs the device accepts.
    pub iova_range: IovaRange,
    /// A device that fails to start: DRIVER_OK makes it report
    /// DEVICE_NEEDS_RESET.
    pub fail_driver_ok: bool,
    /// Refuse ioeventfd registrations beyond this many (like the kernel's
    /// per-device limit of VFIO ioeventfds).
    pub max_ioeventfds: Option<usize>,
    /// A virtio-net device instead of virtio-blk: `num_queues` must then
    /// be 2 × queue pairs + 1 (the control queue last). See `net.rs`.
    pub net: bool,
}

impl Default for EmuConfig {
    fn default() -> Self {
        EmuConfig {
            num_queues: 1,
            queue_max_size: 256,
            last_queue_max_size: None,
            msix_vectors: None,
            notify_off_multiplier: 4,
            never_finish_reset: false,
            flr_recovers: false,
            no_function_reset: false,
            offer_version_1: true,
            legacy_only: false,
            extra_features: 0,
            max_ioeventfds: None,
            disk_size: 8 << 20,
            iova_range: IovaRange {
                first: 0,
                last: (1 << 48) - 1,
            },
            fail_driver_ok: false,
            net: false,
        }
    }
}

impl EmuConfig {
    /// Maximum size of queue `q`.
    fn max_size_of(&self, q: usize) -> u16 {
        match self.last_queue_max_size {
            Some(last) if q + 1 == usize::from(self.num_queues) => last,
            _ => self.queue_max_size,
        }
    }

    fn vectors(&self) -> u32 {
        self.msix_vectors
            .unwrap_or(u32::from(self.num_queues) + 1)
            .min(2048)
    }

    /// Queue pairs of a net device.
    fn pairs(&self) -> u16 {
        (self.num_queues.max(1) - 1) / 2
    }

    fn config_len(&self) -> usize {
        if self.net {
            net::CONFIG_LEN
        } else {
            blk::CONFIG_LEN
        }
    }

    fn features(&self) -> u64 {
        if self.net {
            let mut f = features::bit(features::ACCESS_PLATFORM)
                | features::bit(features::RING_EVENT_IDX)
                | net::features(self.pairs())
                | self.extra_features;
            if self.offer_version_1 {
                f |= features::bit(features::VERSION_1);
            }
            return f;
        }
        let mut f = features::bit(features::ACCESS_PLATFORM)
            | features::bit(features::RING_EVENT_IDX)
            | features::bit(BLK_F_SIZE_MAX)
            | features::bit(BLK_F_SEG_MAX)
            | features::bit(BLK_F_BLK_SIZE)
            | features::bit(BLK_F_FLUSH)
            | self.extra_features;
        if self.offer_version_1 {
            f |= features::bit(features::VERSION_1);
        }
        if self.num_queues > 1 {
            f |= features::bit(BLK_F_MQ);
        }
        f
    }

    fn notify_len(&self) -> u64 {
        (u64::from(self.num_queues) * u64::from(self.notify_off_multiplier)).clamp(4, NOTIFY_MAX)
    }
}

/// Counters for assertions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmuStats {
    /// Doorbell writes (direct or through an ioeventfd).
    pub notifies: u64,
    /// blk requests completed.
    pub requests: u64,
    /// MSI-X eventfd signals.
    pub interrupts: u64,
    /// Function-level resets.
    pub function_resets: u64,
    /// Requests not processed because bus mastering was off (the device
    /// cannot DMA).
    pub dma_refused: u64,
    /// ioeventfd registrations made or removed (`set_ioeventfd` calls).
    pub ioeventfd_changes: u64,
    /// Virtio resets (status 0) honoured.
    pub resets: u64,
    /// Suspends done (VIRTIO_F_SUSPEND).
    pub suspends: u64,
    /// Resumes from a suspend.
    pub resumes: u64,
}

/// What the emulated device does when its driver sets SUSPEND (with
/// VIRTIO_F_SUSPEND offered through [`EmuConfig::extra_features`] and
/// negotiated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SuspendBehaviour {
    /// Finish every request available to it (those
    /// [`EmulatedFunction::hold_requests`] kept count as taken, as a
    /// device that polls its rings may take them), raise their
    /// interrupts, then show SUSPEND and clear DRIVER_OK (virtio 1.4 §3.4).
    #[default]
    Finish,
    /// Suspend at once, taking nothing more: the requests it held stay
    /// available (not taken) for after the resume.
    Stop,
    /// Never show SUSPEND (a device stuck on its way to suspending).
    Never,
    /// Fail to suspend: set DEVICE_NEEDS_RESET, as the spec allows.
    NeedsReset,
}

#[derive(Default)]
struct VqState {
    size: u16,
    msix: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
    vq: Option<Queue>,
    last_notify: Option<u32>,
}

struct Ioeventfd {
    offset: u64,
    width: IoWidth,
    data: u64,
    fd: Arc<EventFd>,
}

struct State {
    config: Vec<u8>,
    common_shadow: [u8; common::LEN as usize],
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_msix: u16,
    queue_select: u16,
    generation: u8,
    isr: u8,
    queues: Vec<VqState>,
    msix_table: Vec<u8>,
    irq: Vec<Option<EventFd>>,
    ioeventfds: Vec<Ioeventfd>,
    ioeventfd_gen: u64,
    /// The registration generation the worker last picked up.
    worker_gen: u64,
    dma: dma::DmaTable,
    disk: Vec<u8>,
    capacity: u64,
    bump_reads: u32,
    stats: EmuStats,
    /// Resets (status 0) are ignored.
    reset_stuck: bool,
    /// Requests are not processed (they stay in flight).
    hold_requests: bool,
    /// Complete each batch of requests in reverse order.
    reverse: bool,
    suspend: SuspendBehaviour,
    /// A net device's control state.
    net: Option<NetState>,
}

struct Shared {
    cfg: EmuConfig,
    state: Mutex<State>,
    removed: AtomicBool,
    /// DMA unmaps fail (EIO) while set.
    refuse_unmap: AtomicBool,
    stop: AtomicBool,
    /// Wakes the ioeventfd worker; `None` when no eventfd could be made
    /// (no file descriptors left), and the worker then notices changes at
    /// its 200 ms poll timeout.
    wake: Option<EventFd>,
}

impl Shared {
    fn wake_worker(&self) {
        if let Some(w) = &self.wake {
            let _ = w.write(1);
        }
    }
}

/// The emulated device. See the module documentation.
pub struct EmulatedFunction {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    /// What [`EmulatedFunction::request_removal`] signals (VFIO's request
    /// interrupt); `None` only without file descriptors left.
    removal: Option<EventFd>,
}

impl std::fmt::Debug for EmulatedFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedFunction")
            .field("cfg", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// Build the PCI config space.
fn config_space(c: &EmuConfig) -> Vec<u8> {
    let mut s = vec![0u8; 4096];
    let modern = !c.legacy_only;
    put(&mut s, 0x00, &cfg::VIRTIO_VENDOR_ID.to_le_bytes());
    let virtio_id: u16 = if c.net { 1 } else { 2 };
    let dev_id: u16 = if modern { 0x1040 + virtio_id } else { 0x1001 };
    put(&mut s, 0x02, &dev_id.to_le_bytes());
    put(&mut s, 0x06, &cfg::STATUS_CAP_LIST.to_le_bytes());
    s[0x08] = u8::from(modern); // revision
    put(&mut s, 0x09, &[0x00, 0x80, 0x01]); // class 0x018000
                                            // BAR0: 64-bit memory, BAR1 its upper half.
    put(&mut s, 0x10, &(0xfe00_0000u32 | 0x4).to_le_bytes());
    put(&mut s, 0x2c, &cfg::VIRTIO_VENDOR_ID.to_le_bytes());
    put(&mut s, 0x2e, &virtio_id.to_le_bytes()); // subsystem id: virtio type
    s[cfg::CAPABILITIES_POINTER as usize] = 0x40;
    let mut at = 0x40usize;
    let mut caps: Vec<Vec<u8>> = Vec::new();
    if modern {
        let vcap = |ty: u8, off: u64, len: u64, extra: &[u8]| {
            let mut v = vec![
                cfg::CAP_ID_VENDOR,
                0,
                (16 + extra.len()) as u8,
                ty,
                0,
                0,
                0,
                0,
            ];
            v.extend_from_slice(&(off as u32).to_le_bytes());
            v.extend_from_slice(&(len as u32).to_le_bytes());
            v.extend_from_slice(extra);
            v
        };
        caps.push(vcap(cap_type::COMMON, COMMON_OFF, common::LEN, &[]));
        caps.push(vcap(cap_type::ISR, ISR_OFF, 4, &[]));
        caps.push(vcap(
            cap_type::DEVICE,
            DEVICE_OFF,
            c.config_len() as u64,
            &[],
        ));
        caps.push(vcap(
            cap_type::NOTIFY,
            NOTIFY_OFF,
            c.notify_len(),
            &c.notify_off_multiplier.to_le_bytes(),
        ));
        caps.push(vcap(cap_type::PCI, 0, 0, &[0; 4]));
    }
    let n = c.vectors();
    if n > 0 {
        let mut m = vec![cfg::CAP_ID_MSIX, 0];
        m.extend_from_slice(&((n - 1) as u16).to_le_bytes());
        m.extend_from_slice(&(MSIX_TABLE_OFF as u32).to_le_bytes());
        m.extend_from_slice(&(MSIX_PBA_OFF as u32).to_le_bytes());
        caps.push(m);
    }
    let count = caps.len();
    for (i, cap) in caps.into_iter().enumerate() {
        let next = if i + 1 == count {
            0
        } else {
            (at + cap.len() + 3) & !3
        };
        put(&mut s, at, &cap);
        s[at + 1] = next as u8;
        at = next;
    }
    s
}

impl EmulatedFunction {
    /// A device built from `cfg`, with a zeroed RAM disk.
    pub fn new(cfg: EmuConfig) -> Self {
        let nq = usize::from(cfg.num_queues);
        let disk_size = cfg.disk_size - cfg.disk_size % 512;
        let state = State {
            config: config_space(&cfg),
            common_shadow: [0; common::LEN as usize],
            // A device that never resets also never read 0 to begin with
            // (as if a previous driver left it running).
            status: if cfg.never_finish_reset {
                status::ACKNOWLEDGE
            } else {
                0
            },
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix: NO_VECTOR,
            queue_select: 0,
            generation: 0,
            isr: 0,
            queues: (0..nq)
                .map(|q| VqState {
                    size: cfg.max_size_of(q),
                    msix: NO_VECTOR,
                    ..VqState::default()
                })
                .collect(),
            msix_table: vec![0; cfg.vectors() as usize * 16],
            irq: Vec::new(),
            ioeventfds: Vec::new(),
            ioeventfd_gen: 0,
            worker_gen: 0,
            dma: dma::DmaTable::default(),
            disk: vec![0; disk_size as usize],
            capacity: disk_size / 512,
            bump_reads: 0,
            stats: EmuStats::default(),
            reset_stuck: cfg.never_finish_reset,
            hold_requests: false,
            reverse: false,
            suspend: SuspendBehaviour::default(),
            net: cfg.net.then(NetState::default),
        };
        // An eventfd only fails without file descriptors left.
        let wake = EventFd::new(EFD_NONBLOCK).ok();
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(state),
            removed: AtomicBool::new(false),
            refuse_unmap: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake,
        });
        let s2 = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("emu-ioeventfd".into())
            .spawn(move || ioeventfd_worker(&s2))
            .map_err(|e| log::error!("emulated device: no ioeventfd thread: {e}"))
            .ok();
        EmulatedFunction {
            shared,
            worker,
            removal: EventFd::new(EFD_NONBLOCK).ok(),
        }
    }

    /// Ask for the device back, as vfio-pci's request interrupt does on an
    /// ordered removal: signals [`PciFunction::removal_request`]. The
    /// device keeps working until its user lets go.
    pub fn request_removal(&self) {
        if let Some(fd) = &self.removal {
            if let Err(e) = fd.write(1) {
                log::error!("emulated device: removal request not signalled: {e}");
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// Bytes of the RAM disk.
    pub fn disk_read(&self, offset: u64, len: usize) -> Vec<u8> {
        let st = self.state();
        let start = (offset as usize).min(st.disk.len());
        let end = start.saturating_add(len).min(st.disk.len());
        st.disk[start..end].to_vec()
    }

    /// Write to the RAM disk (test setup).
    pub fn disk_write(&self, offset: u64, data: &[u8]) {
        let mut st = self.state();
        let start = (offset as usize).min(st.disk.len());
        let end = start.saturating_add(data.len()).min(st.disk.len());
        let n = end - start;
        st.disk[start..end].copy_from_slice(&data[..n]);
    }

    /// From now on every access reads all-ones and writes are dropped.
    pub fn surprise_remove(&self) {
        self.shared.removed.store(true, Ordering::SeqCst);
    }

    /// Stop holding requests and finish, without a doorbell, every
    /// request the enabled queues hold: a device completing its in-flight
    /// work on its own time (a reset queue holds nothing).
    pub fn finish_held(&self) {
        let mut st = self.state();
        st.hold_requests = false;
        for q in 0..st.queues.len() {
            st.process(q as u16);
        }
    }

    /// While `on`, the requests found at each doorbell complete in reverse
    /// order (as a device with several requests in flight may).
    pub fn reverse_completions(&self, on: bool) {
        self.state().reverse = on;
    }

    /// The pages (host-page aligned IOVAs) the device wrote by DMA since
    /// the last call: buffers, status bytes and used rings.
    pub fn take_dma_writes(&self) -> std::collections::BTreeSet<u64> {
        self.state().dma.take_written()
    }

    /// While `on`, kicks are noted but requests are not processed: they
    /// stay in flight (available, not used) until `on` is cleared and the
    /// queue is kicked again.
    pub fn hold_requests(&self, on: bool) {
        self.state().hold_requests = on;
    }

    /// How the device answers a SUSPEND from now on.
    pub fn suspend_behaviour(&self, b: SuspendBehaviour) {
        self.state().suspend = b;
    }

    /// While `on`, every DMA unmap fails with EIO and leaves the mapping
    /// in place, as an IOMMU that refuses the unmap would.
    pub fn refuse_dma_unmap(&self, on: bool) {
        self.shared.refuse_unmap.store(on, Ordering::SeqCst);
    }

    /// The next `n` reads of the device config region each bump
    /// `config_generation`, as a config change racing a reader would.
    pub fn bump_config_generation_during_reads(&self, n: u32) {
        self.state().bump_reads = n;
    }

    /// Change the config (capacity grows by 8 sectors), bump the
    /// generation and raise the config interrupt.
    pub fn trigger_config_change(&self) {
        let mut st = self.state();
        st.capacity += 8;
        st.generation = st.generation.wrapping_add(1);
        st.isr |= 2;
        let v = st.config_msix;
        signal(&mut st, v);
    }

    /// Counters.
    pub fn stats(&self) -> EmuStats {
        self.state().stats
    }

    /// The last doorbell value written for queue `q`.
    pub fn last_notify_data(&self, q: u16) -> Option<u32> {
        self.state()
            .queues
            .get(usize::from(q))
            .and_then(|v| v.last_notify)
    }

    /// Live DMA mappings.
    pub fn dma_mapping_count(&self) -> usize {
        self.state().dma.len()
    }

    /// From now on, ignore virtio resets (`stuck`) or honour them again: a
    /// device that stops answering resets while running.
    pub fn set_reset_stuck(&self, stuck: bool) {
        self.state().reset_stuck = stuck;
    }

    /// Whether bus mastering is on in PCI_COMMAND (the device may DMA).
    pub fn bus_master(&self) -> bool {
        let st = self.state();
        u16::from_le_bytes([st.config[4], st.config[5]]) & cfg::COMMAND_BUS_MASTER != 0
    }

    /// Device status as the device sees it.
    pub fn device_status(&self) -> u8 {
        self.state().status
    }

    /// A net device's control state (`None` for blk).
    pub fn net_state(&self) -> Option<NetState> {
        self.state().net.clone()
    }

    /// The features its driver negotiated, as the device sees them.
    pub fn driver_features(&self) -> u64 {
        self.state().driver_features
    }
}

impl Drop for EmulatedFunction {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake_worker();
        if let Some(t) = self.worker.take() {
            let _ = t.join();
        }
    }
}

/// Raise MSI-X vector `v` if it is routed.
fn signal(st: &mut State, v: u16) {
    if v == NO_VECTOR {
        return;
    }
    if let Some(Some(fd)) = st.irq.get(usize::from(v)) {
        if fd.write(1).is_ok() {
            st.stats.interrupts += 1;
        }
    }
}

impl State {
    fn offered(&self, c: &EmuConfig) -> u64 {
        c.features()
    }

    /// A virtio reset (status 0), which a stuck device ignores.
    fn reset(&mut self, c: &EmuConfig) {
        if self.reset_stuck {
            return;
        }
        self.stats.resets += 1;
        self.reset_now(c);
    }

    fn reset_now(&mut self, c: &EmuConfig) {
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_msix = NO_VECTOR;
        self.queue_select = 0;
        self.isr = 0;
        if let Some(n) = &mut self.net {
            *n = NetState::default();
        }
        for (i, q) in self.queues.iter_mut().enumerate() {
            *q = VqState {
                size: c.max_size_of(i),
                msix: NO_VECTOR,
                ..VqState::default()
            };
        }
    }

    fn selected(&mut self) -> Option<&mut VqState> {
        let i = usize::from(self.queue_select);
        self.queues.get_mut(i)
    }

    /// Refresh the common-config shadow from the live state.
    fn common_refresh(&mut self, c: &EmuConfig) {
        let off = self.offered(c);
        let dfs = self.device_feature_select;
        let df: u32 = match dfs {
            0 => off as u32,
            1 => (off >> 32) as u32,
            _ => 0,
        };
        let gfs = self.driver_feature_select;
        let gf: u32 = match gfs {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        let nq = self.queues.len() as u16;
        let (status, gen, cmsix, sel) = (
            self.status,
            self.generation,
            self.config_msix,
            self.queue_select,
        );
        let q = self.queues.get(usize::from(sel));
        let (size, msix, en, noff, d, a, u) = match q {
            Some(q) => (
                q.size,
                q.msix,
                u16::from(q.enabled),
                sel,
                q.desc,
                q.driver,
                q.device,
            ),
            None => (0, NO_VECTOR, 0, 0, 0, 0, 0),
        };
        let s = &mut self.common_shadow;
        put(
            s,
            common::DEVICE_FEATURE_SELECT as usize,
            &dfs.to_le_bytes(),
        );
        put(s, common::DEVICE_FEATURE as usize, &df.to_le_bytes());
        put(
            s,
            common::DRIVER_FEATURE_SELECT as usize,
            &gfs.to_le_bytes(),
        );
        put(s, common::DRIVER_FEATURE as usize, &gf.to_le_bytes());
        put(s, common::CONFIG_MSIX_VECTOR as usize, &cmsix.to_le_bytes());
        put(s, common::NUM_QUEUES as usize, &nq.to_le_bytes());
        s[common::DEVICE_STATUS as usize] = status;
        s[common::CONFIG_GENERATION as usize] = gen;
        put(s, common::QUEUE_SELECT as usize, &sel.to_le_bytes());
        put(s, common::QUEUE_SIZE as usize, &size.to_le_bytes());
        put(s, common::QUEUE_MSIX_VECTOR as usize, &msix.to_le_bytes());
        put(s, common::QUEUE_ENABLE as usize, &en.to_le_bytes());
        put(s, common::QUEUE_NOTIFY_OFF as usize, &noff.to_le_bytes());
        put(s, common::QUEUE_DESC as usize, &d.to_le_bytes());
        put(s, common::QUEUE_DRIVER as usize, &a.to_le_bytes());
        put(s, common::QUEUE_DEVICE as usize, &u.to_le_bytes());
    }

    fn shadow16(&self, off: u64) -> u16 {
        let o = off as usize;
        u16::from_le_bytes([self.common_shadow[o], self.common_shadow[o + 1]])
    }

    fn shadow32(&self, off: u64) -> u32 {
        let o = off as usize;
        let b = &self.common_shadow[o..o + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn shadow64(&self, off: u64) -> u64 {
        u64::from(self.shadow32(off)) | (u64::from(self.shadow32(off + 4)) << 32)
    }

    fn common_write(&mut self, c: &EmuConfig, off: u64, data: &[u8]) {
        self.common_refresh(c);
        let o = off as usize;
        put(&mut self.common_shadow, o, data);
        let end = off + data.len() as u64;
        let touched = |field: u64, len: u64| off < field + len && end > field;
        let nvec = c.vectors();
        if touched(common::DEVICE_FEATURE_SELECT, 4) {
            self.device_feature_select = self.shadow32(common::DEVICE_FEATURE_SELECT);
        }
        if touched(common::DRIVER_FEATURE_SELECT, 4) {
            self.driver_feature_select = self.shadow32(common::DRIVER_FEATURE_SELECT);
        }
        if touched(common::DRIVER_FEATURE, 4) && self.status & status::FEATURES_OK == 0 {
            let v = u64::from(self.shadow32(common::DRIVER_FEATURE));
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            }
        }
        if touched(common::CONFIG_MSIX_VECTOR, 2) {
            let v = self.shadow16(common::CONFIG_MSIX_VECTOR);
            self.config_msix = if u32::from(v) < nvec { v } else { NO_VECTOR };
        }
        if touched(common::DEVICE_STATUS, 1) {
            let v = self.common_shadow[common::DEVICE_STATUS as usize];
            self.write_status(c, v);
        }
        if touched(common::QUEUE_SELECT, 2) {
            self.queue_select = self.shadow16(common::QUEUE_SELECT);
        }
        let max = c.max_size_of(usize::from(self.queue_select));
        let (size, msix) = (
            self.shadow16(common::QUEUE_SIZE),
            self.shadow16(common::QUEUE_MSIX_VECTOR),
        );
        let (d, a, u) = (
            self.shadow64(common::QUEUE_DESC),
            self.shadow64(common::QUEUE_DRIVER),
            self.shadow64(common::QUEUE_DEVICE),
        );
        let enable = self.shadow16(common::QUEUE_ENABLE);
        let event_idx = self.driver_features & features::bit(features::RING_EVENT_IDX) != 0;
        let Some(q) = self.selected() else { return };
        if touched(common::QUEUE_SIZE, 2) && size != 0 && size <= max && size.is_power_of_two() {
            q.size = size;
        }
        if touched(common::QUEUE_MSIX_VECTOR, 2) {
            q.msix = if u32::from(msix) < nvec {
                msix
            } else {
                NO_VECTOR
            };
        }
        if touched(common::QUEUE_DESC, 8) {
            q.desc = d;
        }
        if touched(common::QUEUE_DRIVER, 8) {
            q.driver = a;
        }
        if touched(common::QUEUE_DEVICE, 8) {
            q.device = u;
        }
        if touched(common::QUEUE_ENABLE, 2) && enable == 1 && !q.enabled && max > 0 {
            if let Ok(mut vq) = Queue::new(max) {
                vq.set_size(q.size);
                vq.set_desc_table_address(Some(q.desc as u32), Some((q.desc >> 32) as u32));
                vq.set_avail_ring_address(Some(q.driver as u32), Some((q.driver >> 32) as u32));
                vq.set_used_ring_address(Some(q.device as u32), Some((q.device >> 32) as u32));
                vq.set_event_idx(event_idx);
                vq.set_ready(true);
                q.vq = Some(vq);
                q.enabled = true;
            }
        }
    }

    fn write_status(&mut self, c: &EmuConfig, v: u8) {
        if v == 0 {
            self.reset(c);
            return;
        }
        let suspend_on = self.driver_features & features::bit(features::SUSPEND) != 0;
        if suspend_on && self.status & status::SUSPEND != 0 {
            // Suspended: DRIVER_OK resumes (virtio 1.4 §3.4); the queues
            // go on from where they stand.
            if v & status::DRIVER_OK != 0 {
                self.status = (self.status | status::DRIVER_OK) & !status::SUSPEND;
                self.stats.resumes += 1;
            }
            return;
        }
        if suspend_on
            && v & status::SUSPEND != 0
            && self.status & status::DRIVER_OK != 0
            && self.status & status::DEVICE_NEEDS_RESET == 0
        {
            match self.suspend {
                SuspendBehaviour::Finish => {
                    // What it holds counts as taken: finished first.
                    let hold = std::mem::replace(&mut self.hold_requests, false);
                    for q in 0..self.queues.len() {
                        self.process(q as u16);
                    }
                    self.hold_requests = hold;
                    self.status = (self.status | status::SUSPEND) & !status::DRIVER_OK;
                    self.stats.suspends += 1;
                }
                SuspendBehaviour::Stop => {
                    self.status = (self.status | status::SUSPEND) & !status::DRIVER_OK;
                    self.stats.suspends += 1;
                }
                SuspendBehaviour::Never => {}
                SuspendBehaviour::NeedsReset => self.status |= status::DEVICE_NEEDS_RESET,
            }
            return;
        }
        // SUSPEND means nothing without the feature or before DRIVER_OK.
        let mut v = v & !status::SUSPEND;
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let ok = self.driver_features & !self.offered(c) == 0
                && self.driver_features & features::bit(features::VERSION_1) != 0;
            if !ok {
                v &= !status::FEATURES_OK;
            }
        }
        if newly & status::DRIVER_OK != 0 && c.fail_driver_ok {
            v |= status::DEVICE_NEEDS_RESET;
        }
        self.status = v;
    }

    /// A doorbell write of `value` at notify-region offset `off`.
    fn notify(&mut self, c: &EmuConfig, off: u64, value: u32) {
        self.stats.notifies += 1;
        let by_data = self.driver_features & features::bit(features::NOTIFICATION_DATA) != 0;
        let q = if by_data || c.notify_off_multiplier == 0 {
            (value & 0xffff) as u16
        } else {
            (off / u64::from(c.notify_off_multiplier)) as u16
        };
        let Some(vq) = self.queues.get_mut(usize::from(q)) else {
            log::debug!("emulated device: notify for missing queue {q}");
            return;
        };
        vq.last_notify = Some(value);
        self.process(q);
    }

    /// Process queue `q`'s available requests.
    fn process(&mut self, q: u16) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        if self.hold_requests {
            return;
        }
        let command = u16::from_le_bytes([self.config[4], self.config[5]]);
        if command & cfg::COMMAND_BUS_MASTER == 0 {
            self.stats.dma_refused += 1;
            return;
        }
        let Some(mem) = self.dma.memory() else {
            return;
        };
        let qi = usize::from(q);
        let Some(mut vq) = self.queues.get_mut(qi).and_then(|v| v.vq.take()) else {
            return;
        };
        let mut completed = 0u64;
        let mut broken = false;
        let mut done = Vec::new();
        let nq = self.queues.len();
        // A net device keeps its receive buffers (no packet comes).
        let net_rx = self.net.is_some() && qi + 1 < nq && qi % 2 == 0;
        while let Some(chain) = (!net_rx).then(|| vq.pop_descriptor_chain(&mem)).flatten() {
            let head = chain.head_index();
            let handled = match &mut self.net {
                Some(st) if qi + 1 == nq => {
                    let pairs = ((nq - 1) / 2) as u16;
                    net::control(&mem, chain, st, pairs)
                }
                // Transmitted into the void.
                Some(_) => Ok(0),
                None => blk::handle(&mem, chain, &mut self.disk, self.capacity),
            };
            match handled {
                Ok(len) => done.push((head, len)),
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if self.reverse {
            done.reverse();
        }
        for (head, len) in done {
            if vq.add_used(&mem, head, len).is_err() {
                broken = true;
                break;
            }
            completed += 1;
        }
        // A ring in unmapped memory shows as "nothing available": check
        // the avail ring is readable to tell the two apart.
        if vq
            .avail_idx(&mem, std::sync::atomic::Ordering::Acquire)
            .is_err()
        {
            broken = true;
        }
        self.stats.requests += completed;
        let notify = completed > 0 && vq.needs_notification(&mem).unwrap_or(true);
        let msix = self.queues[qi].msix;
        self.queues[qi].vq = Some(vq);
        if notify {
            self.isr |= 1;
            signal(self, msix);
        }
        if broken {
            log::debug!("emulated device: queue {q} is broken, DEVICE_NEEDS_RESET");
            self.status |= status::DEVICE_NEEDS_RESET;
            self.isr |= 2;
            let v = self.config_msix;
            signal(self, v);
        }
    }

    fn device_cfg_read(&mut self, off: u64, buf: &mut [u8]) {
        if self.bump_reads > 0 {
            self.bump_reads -= 1;
            self.generation = self.generation.wrapping_add(1);
        }
        let cfg: Vec<u8> = match &self.net {
            Some(st) => net::config(st, ((self.queues.len().max(1) - 1) / 2) as u16).to_vec(),
            None => blk::config(self.capacity, self.queues.len() as u16).to_vec(),
        };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = cfg.get(off as usize + i).copied().unwrap_or(0);
        }
    }
}

fn bar_range(index: u8, offset: u64, len: usize) -> PciResult<()> {
    if index != 0 {
        return Err(PciError::NoSuchBar(index));
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= BAR_SIZE && len <= 8 => Ok(()),
        _ => Err(PciError::BarOutOfRange {
            bar: index,
            offset,
            len,
            size: BAR_SIZE,
        }),
    }
}

fn value_of(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl EmulatedFunction {
    fn do_bar_write(&self, offset: u64, data: &[u8]) {
        let c = &self.shared.cfg;
        let mut st = self.state();
        if (COMMON_OFF..COMMON_OFF + common::LEN).contains(&offset) {
            let end = (offset + data.len() as u64).min(COMMON_OFF + common::LEN);
            let n = (end - offset) as usize;
            st.common_write(c, offset - COMMON_OFF, &data[..n]);
        } else if (NOTIFY_OFF..NOTIFY_OFF + c.notify_len()).contains(&offset) {
            st.notify(c, offset - NOTIFY_OFF, value_of(data));
        } else if (MSIX_TABLE_OFF..MSIX_TABLE_OFF + st.msix_table.len() as u64).contains(&offset) {
            let o = (offset - MSIX_TABLE_OFF) as usize;
            let n = data.len().min(st.msix_table.len() - o);
            st.msix_table[o..o + n].copy_from_slice(&data[..n]);
        }
    }
}

/// Token of the worker's wake eventfd in its epoll set; registrations
/// use their index.
const WAKE_TOKEN: u64 = u64::MAX;

/// An epoll set over the registered eventfds (token: index) and the wake
/// eventfd. Rebuilt whenever the registrations change, so a removed
/// eventfd leaves the set together with the worker's last reference.
fn ioeventfd_epoll(regs: &[(Arc<EventFd>, u64, u64)], wake: Option<&EventFd>) -> Option<Epoll> {
    let epoll = Epoll::new()
        .map_err(|e| log::error!("emulated device: epoll_create failed: {e}"))
        .ok()?;
    let add = |fd: &EventFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )
    };
    for (i, (fd, _, _)) in regs.iter().enumerate() {
        if let Err(e) = add(fd, i as u64) {
            log::error!("emulated device: cannot watch an ioeventfd: {e}");
        }
    }
    if let Some(w) = wake {
        if let Err(e) = add(w, WAKE_TOKEN) {
            log::error!("emulated device: cannot watch the wake eventfd: {e}");
        }
    }
    Some(epoll)
}

fn ioeventfd_worker(shared: &Shared) {
    let mut gen = u64::MAX;
    let mut regs: Vec<(Arc<EventFd>, u64, u64)> = Vec::new();
    let mut epoll = None;
    let mut events = [EpollEvent::default(); 16];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut st = lock(&shared.state);
            if st.ioeventfd_gen != gen {
                gen = st.ioeventfd_gen;
                regs = st
                    .ioeventfds
                    .iter()
                    .map(|r| (Arc::clone(&r.fd), r.offset, r.data))
                    .collect();
                epoll = ioeventfd_epoll(&regs, shared.wake.as_ref());
                st.worker_gen = gen;
            }
        }
        let Some(ep) = &epoll else {
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        };
        // The 200 ms timeout bounds how late a change is noticed when there
        // is no wake eventfd.
        let n = match ep.wait(200, &mut events) {
            Ok(n) => n,
            Err(_) => continue,
        };
        for ev in &events[..n] {
            if ev.data() == WAKE_TOKEN {
                if let Some(w) = &shared.wake {
                    let _ = w.read();
                }
                continue;
            }
            let Some((fd, off, data)) = usize::try_from(ev.data()).ok().and_then(|i| regs.get(i))
            else {
                continue;
            };
            // A spurious wakeup (EAGAIN) rings nothing.
            if fd.read().is_err() || shared.removed.load(Ordering::SeqCst) {
                continue;
            }
            let mut st = lock(&shared.state);
            st.notify(&shared.cfg, *off - NOTIFY_OFF, *data as u32);
        }
    }
}

// SAFETY: `bar_mappings` returns no mappings, so there is nothing whose
// validity we must guarantee; every BAR access goes through `bar_read` /
// `bar_write`.
unsafe impl PciFunction for EmulatedFunction {
    fn config_read(&self, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        let end = offset.checked_add(buf.len() as u64);
        if !matches!(end, Some(e) if e <= 4096) {
            return Err(PciError::ConfigOutOfRange {
                offset,
                len: buf.len(),
            });
        }
        if self.shared.removed.load(Ordering::SeqCst) {
            buf.fill(0xff);
            return Ok(());
        }
        let st = self.state();
        buf.copy_from_slice(&st.config[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn config_write(&self, offset: u64, buf: &[u8]) -> PciResult<()> {
        let end = offset.checked_add(buf.len() as u64);
        if !matches!(end, Some(e) if e <= 4096) {
            return Err(PciError::ConfigOutOfRange {
                offset,
                len: buf.len(),
            });
        }
        if self.shared.removed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut st = self.state();
        for (i, &b) in buf.iter().enumerate() {
            let o = offset as usize + i;
            // Command register and the MSI-X control word are writable;
            // BAR writes keep the size bits (size probing).
            match o {
                0x04 | 0x05 => st.config[o] = b,
                0x10..=0x13 => {
                    let mask = (!(BAR_SIZE - 1) as u32).to_le_bytes()[o - 0x10];
                    let flags = if o == 0x10 { 0x4 } else { 0 };
                    st.config[o] = (b & mask) | flags;
                }
                0x14..=0x17 => st.config[o] = b,
                _ => {}
            }
        }
        Ok(())
    }

    fn bar_info(&self, index: u8) -> Option<BarInfo> {
        (index == 0).then_some(BarInfo {
            kind: BarKind::Memory,
            size: BAR_SIZE,
        })
    }

    fn bar_mappings(&self, _index: u8) -> Vec<BarMapping> {
        Vec::new()
    }

    fn bar_read(&self, index: u8, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        bar_range(index, offset, buf.len())?;
        if self.shared.removed.load(Ordering::SeqCst) {
            buf.fill(0xff);
            return Ok(());
        }
        let c = &self.shared.cfg;
        let mut st = self.state();
        buf.fill(0);
        if (COMMON_OFF..COMMON_OFF + common::LEN).contains(&offset) {
            st.common_refresh(c);
            let o = (offset - COMMON_OFF) as usize;
            let n = buf.len().min(common::LEN as usize - o);
            buf[..n].copy_from_slice(&st.common_shadow[o..o + n]);
        } else if (ISR_OFF..ISR_OFF + 4).contains(&offset) {
            // Reading the ISR clears it.
            buf[0] = std::mem::take(&mut st.isr);
        } else if (DEVICE_OFF..DEVICE_OFF + c.config_len() as u64).contains(&offset) {
            st.device_cfg_read(offset - DEVICE_OFF, buf);
        } else if (MSIX_TABLE_OFF..MSIX_TABLE_OFF + st.msix_table.len() as u64).contains(&offset) {
            let o = (offset - MSIX_TABLE_OFF) as usize;
            let n = buf.len().min(st.msix_table.len() - o);
            buf[..n].copy_from_slice(&st.msix_table[o..o + n]);
        }
        Ok(())
    }

    fn bar_write(&self, index: u8, offset: u64, buf: &[u8]) -> PciResult<()> {
        bar_range(index, offset, buf.len())?;
        if self.shared.removed.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.do_bar_write(offset, buf);
        Ok(())
    }

    fn msix_vectors(&self) -> u32 {
        self.shared.cfg.vectors()
    }

    fn enable_msix(&self, fds: &[Option<&EventFd>]) -> PciResult<()> {
        let n = self.msix_vectors();
        if fds.len() > n as usize {
            return Err(PciError::MsixVectors {
                available: n,
                requested: fds.len() as u32,
            });
        }
        let mut v = Vec::with_capacity(fds.len());
        for fd in fds {
            v.push(
                fd.map(EventFd::try_clone)
                    .transpose()
                    .map_err(|source| PciError::Io {
                        op: "dup eventfd",
                        source,
                    })?,
            );
        }
        self.state().irq = v;
        Ok(())
    }

    fn disable_msix(&self) -> PciResult<()> {
        self.state().irq.clear();
        Ok(())
    }

    fn set_ioeventfd(
        &self,
        bar: u8,
        offset: u64,
        width: IoWidth,
        data: u64,
        fd: Option<&EventFd>,
    ) -> PciResult<()> {
        let c = &self.shared.cfg;
        let w = match width {
            IoWidth::U16 => 2,
            IoWidth::U32 => 4,
        };
        let in_notify = offset >= NOTIFY_OFF
            && offset + w <= NOTIFY_OFF + c.notify_len()
            && offset.is_multiple_of(w);
        if bar != 0 || !in_notify {
            return Err(PciError::IoeventfdUnsupported { bar, offset });
        }
        let mut st = self.state();
        st.stats.ioeventfd_changes += 1;
        st.ioeventfds
            .retain(|r| !(r.offset == offset && r.width == width && r.data == data));
        if let Some(fd) = fd {
            if c.max_ioeventfds
                .is_some_and(|max| st.ioeventfds.len() >= max)
            {
                return Err(PciError::Io {
                    op: "register ioeventfd",
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                });
            }
            let fd = fd.try_clone().map_err(|source| PciError::Io {
                op: "dup ioeventfd",
                source,
            })?;
            st.ioeventfds.push(Ioeventfd {
                offset,
                width,
                data,
                fd: Arc::new(fd),
            });
        }
        st.ioeventfd_gen += 1;
        let want = st.ioeventfd_gen;
        drop(st);
        self.shared.wake_worker();
        // Wait (briefly) until the worker dropped its copies of removed
        // descriptors, so unregistering is synchronous like VFIO's.
        if self.worker.is_some() {
            let end = std::time::Instant::now() + std::time::Duration::from_millis(500);
            while self.state().worker_gen < want && std::time::Instant::now() < end {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
        Ok(())
    }

    fn function_reset(&self) -> PciResult<bool> {
        let c = &self.shared.cfg;
        if c.no_function_reset {
            return Ok(false);
        }
        let mut st = self.state();
        st.stats.function_resets += 1;
        if st.reset_stuck && !c.flr_recovers {
            return Ok(true);
        }
        st.reset_stuck = false;
        st.reset_now(c);
        st.irq.clear();
        Ok(true)
    }

    fn iova_range(&self) -> IovaRange {
        self.shared.cfg.iova_range
    }

    unsafe fn dma_map(&self, iova: Iova, size: u64, host_addr: usize) -> PciResult<()> {
        let range = self.shared.cfg.iova_range;
        // SAFETY: forwarded under this function's own contract.
        unsafe { self.state().dma.map(iova.0, size, host_addr, range) }
    }

    fn dma_unmap(&self, iova: Iova, size: u64) -> PciResult<()> {
        if self.shared.refuse_unmap.load(Ordering::SeqCst) {
            return Err(PciError::Io {
                op: "dma unmap",
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.state().dma.unmap(iova.0, size)
    }

    fn describe(&self) -> String {
        "emulated virtio-blk".into()
    }

    fn removal_request(&self) -> Option<&EventFd> {
        self.removal.as_ref()
    }
}
