//! Shadow virtqueues, pause/resume, dirty logging and device state against
//! the emulated virtio-blk device: requests held in flight across mode
//! switches, ring indices wrapping at 65535, indirect chains, EVENT_IDX on
//! and off, and the dirty log compared with the device's own DMA-write log.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdpa_bridge::types::features;
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_plugin::{
    BridgeDevice, DataPath, DeviceOptions, DeviceState, Error, ShadowPolicy, DIRTY_PAGE,
};
use vdpa_testkit::driver::blk::{T_IN, T_OUT};
use vdpa_testkit::driver::ring::Buf;
use vdpa_testkit::emu::{EmuConfig, EmulatedFunction};
use vdpa_testkit::harness::{Guest, Mem, TestInterrupt};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

type Dev = BridgeDevice<VpVdpa<EmulatedFunction>, Mem>;

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;
const RING_SIZE: u16 = 64;
/// Per-request buffer slots in a queue's 256 KiB buffer area.
const SLOT: u64 = 8192;
const SLOTS: u64 = 32;
const SECTORS_PER_SLOT: u64 = 8;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn open(
    cfg: EmuConfig,
    mask: Option<u64>,
    opts: DeviceOptions,
    g: &Guest,
) -> (Arc<EmulatedFunction>, Dev) {
    let f = Arc::new(EmulatedFunction::new(cfg));
    let vp = VpVdpa::open(
        f.clone(),
        OpenOptions {
            features_mask: mask,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let dev = BridgeDevice::new(vp, g.mem.clone(), opts).unwrap();
    (f, dev)
}

fn shadowed() -> DeviceOptions {
    DeviceOptions {
        shadow: ShadowPolicy::Always,
        ..DeviceOptions::default()
    }
}

fn cfg(queues: u16) -> EmuConfig {
    EmuConfig {
        num_queues: queues,
        extra_features: features::bit(features::RING_INDIRECT_DESC),
        ..EmuConfig::default()
    }
}

/// Ack VERSION_1 (+ ACCESS_PLATFORM) and the ring features in `ring`.
fn ack(dev: &mut Dev, ring: u64) {
    let want = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM) | ring;
    dev.ack_features(dev.features() & want).unwrap();
}

fn activate(g: &mut Guest, dev: &mut Dev, n: u16) -> Arc<TestInterrupt> {
    let irq = TestInterrupt::new(usize::from(n), true).unwrap();
    let queues = g.queues(n, dev.queue_max_sizes()[0]).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    irq
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31) ^ seed.wrapping_mul(0x9e37)) as u8)
        .collect()
}

/// A request the test's guest submitted and has not seen completed.
struct Io {
    q: u16,
    slot: u64,
    write: bool,
    sector: u64,
    data: Vec<u8>,
}

/// The test's guest: submits blk requests without waiting, one per
/// buffer slot, and checks them as they complete.
struct Driver {
    inflight: BTreeMap<(u16, u16), Io>,
    /// The disk as the guest last wrote it, by sector.
    model: BTreeMap<u64, Vec<u8>>,
    indirect: bool,
}

impl Driver {
    fn new(indirect: bool) -> Self {
        Driver {
            inflight: BTreeMap::new(),
            model: BTreeMap::new(),
            indirect,
        }
    }

    fn free_slot(&self, q: u16) -> Option<u64> {
        (0..SLOTS).find(|s| !self.inflight.values().any(|io| io.q == q && io.slot == *s))
    }

    /// Submit one 4 KiB request in slot `slot` of queue `q` (its sectors
    /// are the slot's own, so no two requests in flight overlap).
    fn submit(&mut self, g: &mut Guest, q: u16, write: bool, seed: u64, kick: bool) -> u16 {
        let slot = self.free_slot(q).expect("a free slot");
        let base = Guest::buffer(q) + slot * SLOT;
        let sector = (u64::from(q) * SLOTS + slot) * SECTORS_PER_SLOT;
        let mem = g.mem.memory();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(base + 16)).unwrap();
        let data = if write {
            pattern(seed, 4096)
        } else {
            vec![0u8; 4096]
        };
        mem.write_slice(&data, GuestAddress(base + 4096)).unwrap();
        let bufs = [
            Buf {
                addr: base,
                len: 16,
                write: false,
            },
            Buf {
                addr: base + 4096,
                len: 4096,
                write: !write,
            },
            Buf {
                addr: base + 16,
                len: 1,
                write: true,
            },
        ];
        let ring = &mut g.rings[usize::from(q)];
        let head = if self.indirect {
            // The table in the slot's unused bytes.
            ring.post_indirect(&mem, base + 64, &bufs).unwrap()
        } else {
            ring.post(&mem, &bufs).unwrap()
        };
        self.inflight.insert(
            (q, head),
            Io {
                q,
                slot,
                write,
                sector,
                data,
            },
        );
        if kick {
            g.kicks[usize::from(q)].write(1).unwrap();
        }
        head
    }

    /// Take completions of queue `q`; each is checked (status OK, read
    /// data equal to the model).
    fn reap(&mut self, g: &mut Guest, q: u16) -> usize {
        let mem = g.mem.memory();
        let mut n = 0;
        while let Some((head, len)) = g.rings[usize::from(q)].pop_used(&mem).unwrap() {
            let io = self.inflight.remove(&(q, head)).unwrap_or_else(|| {
                panic!("queue {q}: head {head} completed twice or never posted")
            });
            let base = Guest::buffer(q) + io.slot * SLOT;
            let status: u8 = mem.read_obj(GuestAddress(base + 16)).unwrap();
            assert_eq!(status, 0, "queue {q} head {head}: status");
            if io.write {
                assert_eq!(len, 1, "a write returns its status byte");
                self.model.insert(io.sector, io.data);
            } else {
                assert_eq!(len, 4097, "a read returns data and status");
                let mut got = vec![0u8; 4096];
                mem.read_slice(&mut got, GuestAddress(base + 4096)).unwrap();
                if let Some(want) = self.model.get(&io.sector) {
                    assert_eq!(&got, want, "queue {q}: read of sector {}", io.sector);
                }
            }
            n += 1;
        }
        n
    }

    /// Wait until nothing is in flight on `queues`.
    fn settle(&mut self, g: &mut Guest, queues: u16) {
        let end = Instant::now() + Duration::from_secs(10);
        while !self.inflight.is_empty() {
            for q in 0..queues {
                self.reap(g, q);
            }
            assert!(
                Instant::now() < end,
                "requests never completed: {:?}",
                self.inflight.keys().collect::<Vec<_>>()
            );
            std::thread::yield_now();
        }
    }

    /// The emulated disk equals the model.
    fn check_disk(&self, emu: &EmulatedFunction) {
        for (sector, data) in &self.model {
            assert_eq!(&emu.disk_read(sector * 512, 4096), data, "sector {sector}");
        }
    }
}

fn used_idx(g: &Guest, q: u16) -> u16 {
    let used = g.rings[usize::from(q)].addrs().device;
    u16::from_le(g.mem.memory().read_obj(GuestAddress(used + 2)).unwrap())
}

#[test]
fn forced_shadow_mode_does_blk_io_with_and_without_event_idx_and_indirect_chains() {
    let _s = serial();
    for (ring, indirect) in [
        (0, false),
        (features::bit(features::RING_EVENT_IDX), false),
        (features::bit(features::RING_INDIRECT_DESC), true),
        (
            features::bit(features::RING_EVENT_IDX) | features::bit(features::RING_INDIRECT_DESC),
            true,
        ),
    ] {
        let mut g = Guest::new(RAM, RING_SIZE).unwrap();
        let (emu, mut dev) = open(cfg(2), None, shadowed(), &g);
        ack(&mut dev, ring);
        let _irq = activate(&mut g, &mut dev, 2);
        assert_eq!(dev.data_path(), Some(DataPath::Shadow));
        let mut d = Driver::new(indirect);
        for round in 0..4u64 {
            for q in 0..2 {
                for k in 0..8 {
                    d.submit(&mut g, q, true, round * 100 + u64::from(q) * 10 + k, k == 7);
                }
            }
            d.settle(&mut g, 2);
            for q in 0..2 {
                for _ in 0..8 {
                    d.submit(&mut g, q, false, 0, true);
                }
            }
            d.settle(&mut g, 2);
        }
        d.check_disk(&emu);
        assert!(emu.stats().requests >= 128);
        dev.reset().unwrap();
        assert_eq!(emu.dma_mapping_count(), 1, "shadow rings unmapped at reset");
    }
}

/// The pages the device wrote into guest RAM, by its own DMA log.
fn device_wrote(emu: &EmulatedFunction) -> BTreeSet<u64> {
    emu.take_dma_writes()
        .into_iter()
        .filter(|&p| p < RAM)
        .collect()
}

fn logged(dev: &Dev) -> BTreeSet<u64> {
    dev.dirty_log()
        .iter()
        .flat_map(|r| (r.gpa..r.gpa + r.len).step_by(DIRTY_PAGE as usize))
        .collect()
}

#[test]
fn dirty_pages_logged_are_exactly_the_pages_the_device_wrote_plus_the_used_rings() {
    let _s = serial();
    if vdpa_bridge::host::page_size() != DIRTY_PAGE {
        eprintln!("SKIP: the emulated device logs host pages, not {DIRTY_PAGE}-byte pages");
        return;
    }
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(2), None, DeviceOptions::default(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let _irq = activate(&mut g, &mut dev, 2);
    assert_eq!(dev.data_path(), Some(DataPath::Direct));
    let mut d = Driver::new(false);
    for k in 0..6 {
        d.submit(&mut g, 0, true, k, true);
    }
    d.settle(&mut g, 2);
    dev.start_dirty_log().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    device_wrote(&emu);
    assert!(logged(&dev).is_empty(), "the log starts clean");
    // Reads on both queues write their data and status pages.
    for q in 0..2 {
        for _ in 0..5 {
            d.submit(&mut g, q, false, 0, true);
        }
    }
    d.settle(&mut g, 2);
    let wrote = device_wrote(&emu);
    let used_rings: BTreeSet<u64> = (0..2)
        .map(|q| g.rings[q].addrs().device / DIRTY_PAGE * DIRTY_PAGE)
        .collect();
    let want: BTreeSet<u64> = wrote.union(&used_rings).copied().collect();
    assert!(!wrote.is_empty());
    assert_eq!(logged(&dev), want);
    // Writes: the device writes only the status bytes.
    for _ in 0..3 {
        d.submit(&mut g, 1, true, 7, true);
    }
    d.settle(&mut g, 2);
    let wrote = device_wrote(&emu);
    let want: BTreeSet<u64> = wrote
        .union(&[g.rings[1].addrs().device / DIRTY_PAGE * DIRTY_PAGE].into())
        .copied()
        .collect();
    assert_eq!(logged(&dev), want);
    d.check_disk(&emu);
}

#[test]
fn dirty_logging_moves_a_running_device_with_requests_in_flight_and_loses_none() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, DeviceOptions::default(), &g);
    ack(&mut dev, 0);
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    for k in 0..4 {
        d.submit(&mut g, 0, true, k, true);
    }
    d.settle(&mut g, 1);
    // The device holds five requests when logging starts.
    emu.hold_requests(true);
    for k in 10..15 {
        d.submit(&mut g, 0, true, k, true);
    }
    let before = used_idx(&g, 0);
    let t = Instant::now();
    dev.start_dirty_log().unwrap();
    // A device that never finishes is stopped after the drain, its
    // requests offered again.
    assert!(t.elapsed() >= vdpa_plugin::DRAIN, "{:?}", t.elapsed());
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    assert_eq!(used_idx(&g, 0), before);
    emu.hold_requests(false);
    g.kicks[0].write(1).unwrap();
    d.settle(&mut g, 1);
    d.check_disk(&emu);
    // The written pages' status bytes are logged.
    let status_pages: BTreeSet<u64> = (0..5)
        .map(|s| (Guest::buffer(0) + s * SLOT + 16) / DIRTY_PAGE * DIRTY_PAGE)
        .collect();
    assert!(logged(&dev).is_superset(&status_pages));
    // And a reset of the guest brings the device back to direct mode once
    // logging stops.
    dev.stop_dirty_log();
    dev.reset().unwrap();
    ack(&mut dev, 0);
    let _irq = activate(&mut g, &mut dev, 1);
    assert_eq!(dev.data_path(), Some(DataPath::Direct));
}

#[test]
fn pause_stops_all_dma_and_resume_offers_the_held_requests_again() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(2), None, shadowed(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let _irq = activate(&mut g, &mut dev, 2);
    let mut d = Driver::new(false);
    for k in 0..3 {
        d.submit(&mut g, 0, true, k, true);
    }
    d.settle(&mut g, 2);
    emu.hold_requests(true);
    for k in 20..23 {
        d.submit(&mut g, 1, true, k, true);
    }
    let r = dev.pause().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Paused));
    assert_eq!(r.held, vec![(1, 3)]);
    assert!(r.took >= vdpa_plugin::PAUSE_DRAIN && r.took < Duration::from_secs(5));
    // Paused: kicks, new requests and a device finishing what it held
    // change nothing in guest memory.
    device_wrote(&emu);
    let used = (used_idx(&g, 0), used_idx(&g, 1));
    d.submit(&mut g, 0, false, 0, true);
    g.kicks[1].write(1).unwrap();
    emu.finish_held();
    std::thread::sleep(Duration::from_millis(200));
    assert!(device_wrote(&emu).is_empty(), "DMA while paused");
    assert_eq!((used_idx(&g, 0), used_idx(&g, 1)), used);
    // The state names the held requests.
    let st = dev.state().unwrap();
    assert_eq!(st.queues[1].position.in_flight.len(), 3);
    dev.resume().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    d.settle(&mut g, 2);
    d.check_disk(&emu);
    // Pausing twice and resuming twice are harmless.
    dev.pause().unwrap();
    dev.pause().unwrap();
    dev.resume().unwrap();
    dev.resume().unwrap();
    d.submit(&mut g, 1, false, 0, true);
    d.settle(&mut g, 2);
}

#[test]
fn a_direct_device_paused_resumes_on_shadow_rings() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, DeviceOptions::default(), &g);
    ack(&mut dev, 0);
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    for k in 0..5 {
        d.submit(&mut g, 0, true, k, true);
    }
    d.settle(&mut g, 1);
    let r = dev.pause().unwrap();
    assert!(r.held.is_empty() && r.took < vdpa_plugin::DRAIN, "{r:?}");
    assert_eq!(dev.data_path(), Some(DataPath::Paused));
    dev.resume().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    for _ in 0..5 {
        d.submit(&mut g, 0, false, 0, true);
    }
    d.settle(&mut g, 1);
    d.check_disk(&emu);
}

#[test]
fn ring_indices_wrap_at_65535_in_shadow_mode_and_across_a_switch() {
    let _s = serial();
    // Shadow rings from the start, the guest's queue at 65530 (a restored
    // guest's may be anywhere).
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, shadowed(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let irq = TestInterrupt::new(1, true).unwrap();
    let mut queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();
    let start = 65530u16;
    {
        let mem = g.mem.memory();
        g.rings[0].set_indices(&mem, start).unwrap();
    }
    use virtio_queue::QueueT;
    queues[0].1.set_next_avail(start);
    queues[0].1.set_next_used(start);
    dev.activate(g.mem.clone(), irq, queues).unwrap();
    let mut d = Driver::new(false);
    for k in 0..20u64 {
        d.submit(&mut g, 0, k % 2 == 0, k, true);
        if k % 3 == 0 {
            d.settle(&mut g, 1);
        }
    }
    d.settle(&mut g, 1);
    assert_eq!(used_idx(&g, 0), start.wrapping_add(20));
    d.check_disk(&emu);

    // Directly up to just before the wrap (a plain device starts at 0),
    // then moved to shadow rings with requests held, across the wrap.
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, DeviceOptions::default(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    let mut n = 0u64;
    while n < 65_520 {
        for _ in 0..16 {
            d.submit(&mut g, 0, n.is_multiple_of(512), n, false);
            n += 1;
        }
        g.kicks[0].write(1).unwrap();
        d.settle(&mut g, 1);
    }
    emu.hold_requests(true);
    for k in 0..8 {
        d.submit(&mut g, 0, true, 70_000 + k, true);
        n += 1;
    }
    dev.start_dirty_log().unwrap();
    emu.hold_requests(false);
    g.kicks[0].write(1).unwrap();
    d.settle(&mut g, 1);
    for round in 0..2 {
        for k in 0..12 {
            d.submit(&mut g, 0, true, 80_000 + round * 100 + k, true);
            n += 1;
        }
        d.settle(&mut g, 1);
    }
    assert_eq!(used_idx(&g, 0), n as u16);
    assert!(n > 65_536);
    d.check_disk(&emu);
}

#[test]
fn the_shadow_rings_own_indices_wrap_at_65535_too() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, shadowed(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    let t = Instant::now();
    let mut n = 0u64;
    // The shadow ring starts at 0 whatever the guest's index: 65,536 and
    // more requests wrap it.
    while n < 66_000 {
        // 16 chains of 3 fill 48 of the 64 descriptors.
        for _ in 0..16 {
            d.submit(&mut g, 0, n.is_multiple_of(64), n, false);
            n += 1;
        }
        g.kicks[0].write(1).unwrap();
        d.settle(&mut g, 1);
    }
    assert_eq!(used_idx(&g, 0), n as u16);
    assert_eq!(emu.stats().requests, n);
    d.check_disk(&emu);
    eprintln!("{n} requests through the shadow rings in {:?}", t.elapsed());
}

/// A small deterministic generator (tests must be repeatable).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn random_workloads_with_mode_switches_at_random_points_lose_and_duplicate_nothing() {
    let _s = serial();
    for seed in 1..=6u64 {
        let mut rng = Lcg(seed);
        let indirect = seed % 2 == 0;
        let ring = if seed % 3 == 0 {
            features::bit(features::RING_EVENT_IDX)
        } else {
            0
        } | if indirect {
            features::bit(features::RING_INDIRECT_DESC)
        } else {
            0
        };
        let mut g = Guest::new(RAM, RING_SIZE).unwrap();
        let (emu, mut dev) = open(cfg(2), None, DeviceOptions::default(), &g);
        ack(&mut dev, ring);
        let _irq = activate(&mut g, &mut dev, 2);
        let mut d = Driver::new(indirect);
        for step in 0..40 {
            let hold = rng.next().is_multiple_of(3);
            emu.hold_requests(hold);
            for _ in 0..rng.next() % 6 {
                let q = (rng.next() % 2) as u16;
                if d.free_slot(q).is_some() && d.inflight.len() < 24 {
                    let write = rng.next().is_multiple_of(2);
                    d.submit(&mut g, q, write, rng.next(), true);
                }
            }
            match rng.next() % 5 {
                0 => dev.start_dirty_log().unwrap(),
                1 => {
                    dev.pause().unwrap();
                    emu.hold_requests(false);
                    dev.resume().unwrap();
                }
                2 => {
                    let _ = dev.dirty_log();
                }
                _ => {}
            }
            emu.hold_requests(false);
            for q in 0..2 {
                g.kicks[q].write(1).unwrap();
                d.reap(&mut g, q as u16);
            }
            if step % 8 == 7 {
                d.settle(&mut g, 2);
                d.check_disk(&emu);
            }
        }
        d.settle(&mut g, 2);
        d.check_disk(&emu);
    }
}

#[test]
fn a_guest_buffer_outside_guest_ram_is_refused_and_the_queue_goes_on() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, shadowed(), &g);
    ack(&mut dev, 0);
    let _irq = activate(&mut g, &mut dev, 1);
    // A read into the shadow rings' IOVAs (the top of the device's range)
    // and one past guest RAM.
    for addr in [(1u64 << 48) - 0x10000, RAM - 512] {
        let base = Guest::buffer(0);
        let mem = g.mem.memory();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&T_IN.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(base + 16)).unwrap();
        let bufs = [
            Buf {
                addr: base,
                len: 16,
                write: false,
            },
            Buf {
                addr,
                len: 4096,
                write: true,
            },
            Buf {
                addr: base + 16,
                len: 1,
                write: true,
            },
        ];
        g.rings[0].post(&mem, &bufs).unwrap();
        g.kicks[0].write(1).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        let done = loop {
            if let Some(u) = g.rings[0].pop_used(&mem).unwrap() {
                break u;
            }
            assert!(Instant::now() < end, "refused request never returned");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(done.1, 0, "returned with nothing written");
        let status: u8 = mem.read_obj(GuestAddress(base + 16)).unwrap();
        assert_eq!(status, 0xff, "the device never saw it");
    }
    assert_eq!(emu.stats().requests, 0);
    let mut d = Driver::new(false);
    for k in 0..4 {
        d.submit(&mut g, 0, true, k, true);
    }
    d.settle(&mut g, 1);
    d.check_disk(&emu);
}

#[test]
fn a_paused_state_restores_on_a_second_device_which_finishes_the_held_requests() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu_a, mut a) = open(cfg(1), None, DeviceOptions::default(), &g);
    ack(&mut a, features::bit(features::RING_EVENT_IDX));
    a.write_config(0x14, &[1]).unwrap(); // writeback, as a guest may set
    let _irq = activate(&mut g, &mut a, 1);
    let mut d = Driver::new(false);
    for k in 0..3 {
        d.submit(&mut g, 0, true, k, true);
    }
    d.settle(&mut g, 1);
    emu_a.hold_requests(true);
    for k in 30..33 {
        d.submit(&mut g, 0, true, k, true);
    }
    assert!(matches!(a.state(), Err(Error::NotPaused)));
    a.pause().unwrap();
    let st = a.state().unwrap();
    assert_eq!(st.queues[0].position.in_flight.len(), 3);
    assert_eq!(st.config_writes, vec![(0x14, vec![1])]);
    let json = serde_json::to_string(&st).unwrap();
    drop(a);

    // The destination: the saved state, then activation with the guest's
    // queues as the VMM restores them, paused until resumed.
    let back: DeviceState = serde_json::from_str(&json).unwrap();
    let (emu_b, mut b) = open(cfg(1), None, DeviceOptions::default(), &g);
    // The first three writes went to A's disk; copy them as shared storage
    // would hold them.
    for (sector, data) in &d.model {
        emu_b.disk_write(sector * 512, data);
    }
    b.restore(&back).unwrap();
    assert_eq!(b.acked_features(), st.acked_features);
    let irq = TestInterrupt::new(1, true).unwrap();
    let queues = requeue(&g, &b);
    b.activate(g.mem.clone(), irq, queues).unwrap();
    assert_eq!(b.data_path(), Some(DataPath::Paused));
    assert_eq!(emu_b.stats().requests, 0, "nothing runs before resume");
    b.resume().unwrap();
    d.settle(&mut g, 1);
    d.check_disk(&emu_b);
    assert_eq!(emu_b.stats().requests, 3);
}

/// The guest's queues as a VMM hands them over after a restore: the same
/// rings, the memory untouched.
fn requeue(
    g: &Guest,
    dev: &Dev,
) -> Vec<(usize, virtio_queue::Queue, vmm_sys_util::eventfd::EventFd)> {
    use virtio_queue::QueueT;
    g.rings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let a = r.addrs();
            let mut q = virtio_queue::Queue::new(dev.queue_max_sizes()[i]).unwrap();
            q.set_size(r.size());
            q.set_desc_table_address(Some(a.desc as u32), Some((a.desc >> 32) as u32));
            q.set_avail_ring_address(Some(a.driver as u32), Some((a.driver >> 32) as u32));
            q.set_used_ring_address(Some(a.device as u32), Some((a.device >> 32) as u32));
            q.set_ready(true);
            (i, q, g.kicks[i].try_clone().unwrap())
        })
        .collect()
}

#[test]
fn a_restore_names_what_the_destination_device_lacks_and_changes_nothing() {
    let _s = serial();
    let g = Guest::new(RAM, RING_SIZE).unwrap();
    let (_e, mut a) = open(cfg(2), None, DeviceOptions::default(), &g);
    ack(&mut a, features::bit(features::RING_EVENT_IDX));
    let mut st = a.state().unwrap();
    st.queues.push(vdpa_plugin::QueueState {
        index: 1,
        size: 64,
        rings: [0x10_0000, 0x10_0400, 0x10_1000],
        position: Default::default(),
    });
    // No EVENT_IDX at the destination.
    let mask = !features::bit(features::RING_EVENT_IDX);
    let (_e2, mut b) = open(cfg(2), Some(mask), DeviceOptions::default(), &g);
    let e = b.restore(&st).unwrap_err().to_string();
    assert!(e.contains("feature bit(s) 29"), "{e}");
    assert_eq!(b.acked_features(), 0);
    // One queue at the destination.
    let (_e3, mut c) = open(cfg(1), None, DeviceOptions::default(), &g);
    let e = c.restore(&st).unwrap_err().to_string();
    assert!(e.contains("queue 1: this device has 1 queue(s)"), "{e}");
    // Too large a queue.
    let small = EmuConfig {
        queue_max_size: 32,
        ..cfg(2)
    };
    let (_e4, mut s) = open(small, None, DeviceOptions::default(), &g);
    let e = s.restore(&st).unwrap_err().to_string();
    assert!(e.contains("size 64 above this device's maximum 32"), "{e}");
    // A blk state is written as version 1 (nothing of 2 in it); a
    // version this bridge does not know is refused.
    assert_eq!(st.version, 1);
    st.version = vdpa_plugin::STATE_VERSION + 1;
    let e = a.restore(&st).unwrap_err().to_string();
    assert!(e.contains("version"), "{e}");
}

#[test]
fn behind_a_viommu_shadow_mode_is_refused_with_the_reason() {
    let _s = serial();
    let g = Guest::new(RAM, RING_SIZE).unwrap();
    let opts = DeviceOptions {
        iommu: true,
        ..DeviceOptions::default()
    };
    // The VMM maps guest RAM itself, identity: shadow rings are possible.
    let (_e, mut dev) = open(cfg(1), None, opts, &g);
    dev.dma().map(0, 0, RAM).unwrap();
    dev.start_dirty_log().unwrap();
    dev.stop_dirty_log();
    // The guest's IOVAs are not its physical addresses: refused.
    dev.dma().map(1 << 32, 0, 2 * MIB).unwrap();
    let e = dev.start_dirty_log().unwrap_err().to_string();
    assert!(e.contains("vIOMMU"), "{e}");
    // A translation (the VMM's vIOMMU) refuses too.
    let (_e, mut dev) = open(cfg(1), None, opts, &g);
    dev.set_address_translation(Arc::new(|gpa, _| Ok(gpa)));
    let e = dev.start_dirty_log().unwrap_err().to_string();
    assert!(e.contains("vIOMMU"), "{e}");
}

#[test]
fn a_paused_device_handed_over_and_taken_back_finishes_its_requests() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, DeviceOptions::default(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    emu.hold_requests(true);
    for k in 0..3 {
        d.submit(&mut g, 0, true, k, true);
    }
    assert!(matches!(dev.hand_over(), Err(Error::NotPaused)));
    dev.pause().unwrap();
    dev.hand_over().unwrap();
    assert!(dev.is_handed_over() && dev.is_released());
    assert_eq!(
        emu.dma_mapping_count(),
        0,
        "nothing mapped once handed over"
    );
    // The state is still there for the destination.
    assert_eq!(dev.state().unwrap().queues[0].position.in_flight.len(), 3);
    // The migration failed: take it back (another open of the same
    // function) and run on.
    emu.hold_requests(false);
    let again = VpVdpa::open(emu.clone(), OpenOptions::default()).unwrap();
    dev.reacquire(again).unwrap();
    assert!(!dev.is_handed_over() && !dev.is_released());
    assert_eq!(dev.dma().mappings(), vec![(0, 0, RAM)]);
    dev.resume().unwrap();
    d.settle(&mut g, 1);
    d.check_disk(&emu);
    // A device lacking a feature offered before is refused, and the
    // device stays handed over.
    dev.pause().unwrap();
    dev.hand_over().unwrap();
    let lacking = VpVdpa::open(
        emu.clone(),
        OpenOptions {
            features_mask: Some(!features::bit(features::RING_EVENT_IDX)),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let e = dev.reacquire(lacking).unwrap_err().to_string();
    assert!(e.contains("lacks features 0x20000000"), "{e}");
    assert!(dev.is_handed_over());
}

/// Queue 0 of a device that completes out of order: six writes completed
/// in reverse batches, then four more the device holds (not finished).
fn out_of_order_then_holding(emu: &EmulatedFunction, g: &mut Guest, d: &mut Driver) {
    emu.reverse_completions(true);
    emu.hold_requests(true);
    for k in 0..6 {
        d.submit(g, 0, true, k, true);
    }
    emu.hold_requests(false);
    g.kicks[0].write(1).unwrap();
    d.settle(g, 1);
    emu.hold_requests(true);
    for k in 10..14 {
        d.submit(g, 0, true, k, true);
    }
}

#[test]
fn a_device_completing_out_of_order_is_moved_only_once_it_drained() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, DeviceOptions::default(), &g);
    ack(&mut dev, 0);
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    // Now it holds requests it never finishes, completed out of order
    // before: which it holds cannot be told from the rings, so it is not
    // stopped and keeps running directly.
    out_of_order_then_holding(&emu, &mut g, &mut d);
    let e = dev.start_dirty_log().unwrap_err().to_string();
    assert!(e.contains("completed out of order"), "{e}");
    assert_eq!(dev.data_path(), Some(DataPath::Direct));
    emu.hold_requests(false);
    g.kicks[0].write(1).unwrap();
    d.settle(&mut g, 1);
    // A device that drains in time is moved though it completes out of
    // order.
    for k in 20..26 {
        d.submit(&mut g, 0, true, k, true);
    }
    dev.start_dirty_log().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    for k in 30..40 {
        d.submit(&mut g, 0, k % 2 == 0, k, true);
    }
    d.settle(&mut g, 1);
    d.check_disk(&emu);
}

#[test]
fn more_indirect_requests_than_shadow_descriptors_wait_their_turn_across_a_pause() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, shadowed(), &g);
    ack(&mut dev, features::bit(features::RING_INDIRECT_DESC));
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(true);
    // 30 guest descriptors, 90 once flattened: 21 fit in the 64 of the
    // shadow ring, the rest wait.
    emu.hold_requests(true);
    for k in 0..30 {
        d.submit(&mut g, 0, true, k, true);
    }
    let r = dev.pause().unwrap();
    // 21 on the shadow ring and the one taken that did not fit; the other
    // 8 are still available in the guest's ring.
    assert_eq!(r.held, vec![(0, 22)]);
    assert_eq!(dev.state().unwrap().queues[0].position.next_avail, 22);
    emu.hold_requests(false);
    dev.resume().unwrap();
    d.settle(&mut g, 1);
    assert_eq!(emu.stats().requests, 30);
    d.check_disk(&emu);
}

#[test]
fn a_guest_avail_index_far_ahead_breaks_its_queue_without_hanging_the_bridge() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(cfg(1), None, shadowed(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    d.submit(&mut g, 0, true, 1, true);
    d.settle(&mut g, 1);
    let avail = g.rings[0].addrs().driver;
    g.mem
        .memory()
        .write_obj(500u16.to_le(), GuestAddress(avail + 2))
        .unwrap();
    g.kicks[0].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    dev.pause().unwrap();
    dev.reset().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(emu.stats().requests, 1);
}

/// The emulated device offering virtio 1.4's VIRTIO_F_SUSPEND.
fn suspendable(queues: u16) -> EmuConfig {
    let mut c = cfg(queues);
    c.extra_features |= features::bit(features::SUSPEND);
    c
}

#[test]
fn virtio_f_suspend_is_negotiated_by_the_bridge_and_never_offered_to_the_guest() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(suspendable(1), None, DeviceOptions::default(), &g);
    let bit = features::bit(features::SUSPEND);
    assert_eq!(dev.features() & bit, 0, "offered to the guest");
    assert!(
        dev.ack_features(bit).is_err(),
        "a guest acking it is refused"
    );
    ack(&mut dev, 0);
    assert_eq!(dev.acked_features() & bit, 0);
    let _irq = activate(&mut g, &mut dev, 1);
    assert_ne!(
        emu.driver_features() & bit,
        0,
        "not negotiated with the device"
    );
    // A device without it is not asked for it.
    let mut g2 = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu2, mut dev2) = open(cfg(1), None, DeviceOptions::default(), &g2);
    ack(&mut dev2, 0);
    let _irq2 = activate(&mut g2, &mut dev2, 1);
    assert_eq!(emu2.driver_features() & bit, 0);
}

#[test]
fn a_suspendable_device_pauses_without_a_reset_finishing_what_it_holds_and_resumes_directly() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(suspendable(2), None, DeviceOptions::default(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let _irq = activate(&mut g, &mut dev, 2);
    let mut d = Driver::new(false);
    for k in 0..4 {
        d.submit(&mut g, 0, true, k, true);
    }
    d.settle(&mut g, 2);
    // Requests the device holds when the pause comes.
    emu.hold_requests(true);
    for k in 10..13 {
        d.submit(&mut g, 1, true, k, true);
    }
    let resets = emu.stats().resets;
    let r = dev.pause().unwrap();
    assert!(r.held.is_empty(), "{r:?}");
    assert!(r.took < vdpa_plugin::DRAIN, "{r:?}");
    assert_eq!(dev.data_path(), Some(DataPath::Paused));
    let st = emu.stats();
    assert_eq!(
        (st.suspends, st.resets),
        (1, resets),
        "suspended, not reset"
    );
    let status = emu.device_status();
    assert_eq!(
        status & (vdpa_bridge::types::status::SUSPEND | vdpa_bridge::types::status::DRIVER_OK),
        vdpa_bridge::types::status::SUSPEND,
        "status {status:#x}"
    );
    // The suspend finished the held requests before it returned.
    assert_eq!(d.reap(&mut g, 1), 3);
    // Suspended: a kick and a new request change nothing in guest memory.
    device_wrote(&emu);
    let used = (used_idx(&g, 0), used_idx(&g, 1));
    emu.hold_requests(false);
    d.submit(&mut g, 0, false, 0, true);
    std::thread::sleep(Duration::from_millis(200));
    assert!(device_wrote(&emu).is_empty(), "DMA while suspended");
    assert_eq!((used_idx(&g, 0), used_idx(&g, 1)), used);
    // Its state holds nothing in flight.
    let state = dev.state().unwrap();
    assert!(state.queues.iter().all(|q| q.position.in_flight.is_empty()));
    assert_eq!(state.queues[1].position.next_used, used.1);
    // Resumed on the guest's rings, the kick that came meanwhile served.
    dev.resume().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Direct));
    assert_eq!(emu.stats().resumes, 1);
    assert_eq!(emu.stats().resets, resets, "never reset");
    d.settle(&mut g, 2);
    for k in 20..30 {
        d.submit(&mut g, (k % 2) as u16, k % 3 == 0, k, true);
    }
    d.settle(&mut g, 2);
    d.check_disk(&emu);
    // Twice is harmless.
    dev.pause().unwrap();
    dev.pause().unwrap();
    dev.resume().unwrap();
    dev.resume().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Direct));
    assert_eq!(emu.stats().resets, resets);
}

#[test]
fn a_suspend_drains_exactly_before_the_switch_to_shadow_rings_and_before_a_shadowed_pause() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(suspendable(1), None, DeviceOptions::default(), &g);
    ack(&mut dev, 0);
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    // Without a suspend the switch would be refused (see
    // a_device_completing_out_of_order_is_moved_only_once_it_drained).
    out_of_order_then_holding(&emu, &mut g, &mut d);
    let t = Instant::now();
    dev.start_dirty_log().unwrap();
    assert!(t.elapsed() < vdpa_plugin::DRAIN, "{:?}", t.elapsed());
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    assert_eq!(emu.stats().suspends, 1);
    emu.hold_requests(false);
    d.settle(&mut g, 1);
    // Shadowed: the pause suspends too, and what the relay offered but
    // the device did not take is held for the resume.
    emu.reverse_completions(false);
    d.submit(&mut g, 0, true, 40, true);
    d.settle(&mut g, 1);
    emu.hold_requests(true);
    for k in 50..53 {
        d.submit(&mut g, 0, true, k, true);
    }
    let r = dev.pause().unwrap();
    assert_eq!(emu.stats().suspends, 2);
    assert!(r.took < vdpa_plugin::PAUSE_DRAIN, "{r:?}");
    assert!(r.held.is_empty(), "the suspend finished them: {r:?}");
    emu.hold_requests(false);
    dev.resume().unwrap();
    for k in 60..70 {
        d.submit(&mut g, 0, k % 2 == 0, k, true);
    }
    d.settle(&mut g, 1);
    d.check_disk(&emu);
}

#[test]
fn a_device_that_does_not_suspend_is_paused_with_a_reset_within_the_bound() {
    use vdpa_testkit::emu::SuspendBehaviour;
    let _s = serial();
    for behaviour in [SuspendBehaviour::Never, SuspendBehaviour::NeedsReset] {
        let mut g = Guest::new(RAM, RING_SIZE).unwrap();
        let (emu, mut dev) = open(suspendable(1), None, DeviceOptions::default(), &g);
        ack(&mut dev, 0);
        let _irq = activate(&mut g, &mut dev, 1);
        let mut d = Driver::new(false);
        emu.suspend_behaviour(behaviour);
        emu.hold_requests(true);
        for k in 0..3 {
            d.submit(&mut g, 0, true, k, true);
        }
        let resets = emu.stats().resets;
        let r = dev.pause().unwrap();
        // The suspend's bound (the reset timeout, 500 ms) plus the drain.
        assert!(
            r.took < vdpa_plugin::DRAIN + Duration::from_secs(2),
            "{behaviour:?}: {r:?}"
        );
        assert_eq!(r.held, vec![(0, 3)], "{behaviour:?}");
        assert_eq!(emu.stats().suspends, 0);
        assert!(emu.stats().resets > resets, "{behaviour:?}: not reset");
        emu.suspend_behaviour(SuspendBehaviour::Finish);
        emu.hold_requests(false);
        dev.resume().unwrap();
        assert_eq!(dev.data_path(), Some(DataPath::Shadow));
        d.settle(&mut g, 1);
        d.check_disk(&emu);
    }
}

#[test]
fn a_suspended_device_is_handed_over_and_runs_shadowed_when_taken_back() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(suspendable(1), None, DeviceOptions::default(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    for k in 0..3 {
        d.submit(&mut g, 0, true, k, true);
    }
    d.settle(&mut g, 1);
    dev.pause().unwrap();
    // Published while suspended (not taken): offered after the move.
    d.submit(&mut g, 0, true, 9, false);
    dev.hand_over().unwrap();
    assert_eq!(emu.dma_mapping_count(), 0);
    let again = VpVdpa::open(emu.clone(), OpenOptions::default()).unwrap();
    dev.reacquire(again).unwrap();
    dev.resume().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    g.kicks[0].write(1).unwrap();
    d.settle(&mut g, 1);
    d.check_disk(&emu);
    // Dirty logging asked for while suspended: the resume goes shadowed.
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(suspendable(1), None, DeviceOptions::default(), &g);
    ack(&mut dev, 0);
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    dev.pause().unwrap();
    dev.start_dirty_log().unwrap();
    dev.resume().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    d.submit(&mut g, 0, false, 0, true);
    d.submit(&mut g, 0, true, 1, true);
    d.settle(&mut g, 1);
    d.check_disk(&emu);
    assert!(!dev.dirty_log().is_empty());
}

#[test]
fn a_suspendable_device_behind_a_viommu_is_paused_and_resumed_but_has_no_state() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let opts = DeviceOptions {
        iommu: true,
        ..DeviceOptions::default()
    };
    let (emu, mut dev) = open(suspendable(1), None, opts, &g);
    dev.dma().map(0, 0, RAM).unwrap();
    dev.set_address_translation(Arc::new(|gpa, _| Ok(gpa)));
    ack(&mut dev, 0);
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    d.submit(&mut g, 0, true, 1, true);
    d.settle(&mut g, 1);
    // It could not run shadowed, but a suspend stops it all the same.
    dev.pause().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Paused));
    assert_eq!(emu.stats().suspends, 1);
    let e = dev.state().unwrap_err().to_string();
    assert!(e.contains("vIOMMU"), "{e}");
    assert!(dev.hand_over().is_err());
    dev.resume().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Direct));
    d.submit(&mut g, 0, false, 0, true);
    d.settle(&mut g, 1);
    d.check_disk(&emu);
}

#[test]
fn requests_a_suspended_device_did_not_take_run_after_the_resume_directly_or_shadowed() {
    use vdpa_testkit::emu::SuspendBehaviour;
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(suspendable(1), None, DeviceOptions::default(), &g);
    ack(&mut dev, features::bit(features::RING_EVENT_IDX));
    let _irq = activate(&mut g, &mut dev, 1);
    let mut d = Driver::new(false);
    emu.suspend_behaviour(SuspendBehaviour::Stop);
    emu.hold_requests(true);
    for k in 0..3 {
        d.submit(&mut g, 0, true, k, true);
    }
    dev.pause().unwrap();
    assert_eq!(emu.stats().suspends, 1);
    // Not taken: the state offers them again.
    assert_eq!(dev.state().unwrap().queues[0].position.in_flight.len(), 3);
    assert_eq!(d.reap(&mut g, 0), 0);
    emu.hold_requests(false);
    dev.resume().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Direct));
    d.settle(&mut g, 1);
    // The same through the switch to shadow rings.
    emu.hold_requests(true);
    for k in 10..13 {
        d.submit(&mut g, 0, true, k, true);
    }
    let resets = emu.stats().resets;
    dev.start_dirty_log().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    assert!(emu.stats().resets > resets);
    emu.hold_requests(false);
    g.kicks[0].write(1).unwrap();
    d.settle(&mut g, 1);
    d.check_disk(&emu);
}
