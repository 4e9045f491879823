//! Target `ops`: operation sequences on the VMM device ([`BridgeDevice`])
//! over the emulated virtio-blk device, with random misbehaviour knobs.
//!
//! The bytes give the device's shape and misbehaviour ([`EmuConfig`]:
//! queues, maximum sizes, MSI-X vectors, notify multiplier, features, a
//! reset that never finishes, a function-level reset that helps or not,
//! VIRTIO_F_SUSPEND and how the device answers a suspend,
//! DRIVER_OK refused, an ioeventfd limit, the IOVA range), the VMM's
//! options ([`DeviceOptions`]), a provisioning mask, then up to
//! [`MAX_OPS`] operations: feature acks, config reads and writes,
//! activations with random queue sets, sizes and ring addresses, resets,
//! surprise removal, refused DMA unmaps, resets that stop finishing,
//! config changes, config generations that keep moving, guest kicks with
//! requests, memory hotplug, vIOMMU maps and unmaps, notification queries.
//!
//! Invariants checked:
//!
//! * nothing panics, in this thread or any other (the relay, the emulated
//!   device's worker): a panic hook counts them;
//! * after every failed activation (other than "already active") the
//!   device is inactive, left reset (status 0) unless it can no longer
//!   DMA (bus mastering off) or is gone, and no relay thread is left;
//! * after every reset, no relay thread is left and the device is reset
//!   in the same sense; after a successful activation it runs (DRIVER_OK);
//! * dropping the device resets it and removes its DMA mappings (unless
//!   the device refuses the unmap);
//! * at the end of the input, the process has as many file descriptors
//!   and as many of the bridge's and the device's named threads
//!   (`vdpa-relay-*`, `emu-*`) as before it.
//!
//! Descriptor and thread counts are process-wide: the replay test runs
//! this target from one test at a time (see `tests/ops.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use vdpa_bridge::types::{features, status};
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_bridge::IovaRange;
use vdpa_plugin::{BridgeDevice, DeviceOptions, Error, KickPolicy, ShadowPolicy};
use vdpa_testkit::driver::blk::T_IN;
use vdpa_testkit::driver::ring::Buf;
use vdpa_testkit::emu::{EmuConfig, EmulatedFunction, SuspendBehaviour};
use vdpa_testkit::harness::{Guest, Mem, TestInterrupt};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestRegionMmap, MmapRegion};

use crate::Reader;

/// Most operations one input runs.
pub const MAX_OPS: usize = 32;
const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;

type Dev = BridgeDevice<VpVdpa<EmulatedFunction>, Mem>;

/// Feature bits worth flipping (transport features the plugin filters,
/// ring layouts, notification data).
const FEATURE_BITS: [u32; 12] = [
    features::RING_PACKED,
    features::NOTIFICATION_DATA,
    features::RING_RESET,
    features::SR_IOV,
    features::NOTIF_CONFIG_DATA,
    features::ADMIN_VQ,
    features::IN_ORDER,
    features::ORDER_PLATFORM,
    features::RING_EVENT_IDX,
    features::RING_INDIRECT_DESC,
    features::ACCESS_PLATFORM,
    features::VERSION_1,
];

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Count every panic, in any thread, then do what the hook before did
/// (print, or abort under libFuzzer).
fn count_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Open file descriptors of the process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Threads of the bridge (relay) and of the emulated device, by name.
pub fn named_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|c| c.starts_with("vdpa-relay") || c.starts_with("emu-"))
                .count()
        })
        .unwrap_or(0)
}

/// [`named_threads`] once it equals `want`, or after two seconds whatever
/// it is: a new thread names itself a moment after it starts, and a
/// joined one leaves `/proc/self/task` a moment after the join.
pub fn threads_settled(want: usize) -> usize {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let n = named_threads();
        if n == want || Instant::now() >= end {
            return n;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The target.
pub fn run(data: &[u8]) {
    count_panics();
    let panics = PANICS.load(Ordering::SeqCst);
    let threads = threads_settled(0);
    let fds = open_fds();

    scenario(&mut Reader::new(data));

    assert_eq!(
        threads_settled(threads),
        threads,
        "named threads left behind"
    );
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics,
        "a thread panicked (see above)"
    );
}

fn emu_config(r: &mut Reader) -> EmuConfig {
    let bits = r.u16();
    let extra_features = FEATURE_BITS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .fold(0, |f, (_, &b)| f | features::bit(b))
        // Bit 12, unused before: virtio 1.4's SUSPEND (older corpus inputs
        // decode as before).
        | if bits & (1 << 12) != 0 {
            features::bit(features::SUSPEND)
        } else {
            0
        };
    EmuConfig {
        num_queues: u16::from(r.u8() % 5),
        queue_max_size: r.choose(&[256, 256, 64, 2, 1, 0, 3, 1024]),
        // From the 4 bits of `bits` FEATURE_BITS leaves unused, so the
        // checked-in corpus decodes as before.
        last_queue_max_size: [None, None, None, None, Some(32), Some(1), Some(0), Some(3)]
            [usize::from(bits >> 13)],
        msix_vectors: r.choose(&[None, None, Some(0), Some(1), Some(2), Some(3)]),
        notify_off_multiplier: r.choose(&[4, 4, 0, 2, 8, 3, 0x1000]),
        never_finish_reset: r.one_in(8),
        flr_recovers: r.bool(),
        no_function_reset: r.one_in(4),
        offer_version_1: !r.one_in(16),
        legacy_only: r.one_in(32),
        extra_features,
        disk_size: 64 << 10,
        iova_range: r.choose(&[
            IovaRange {
                first: 0,
                last: (1 << 48) - 1,
            },
            IovaRange {
                first: 0,
                last: 0x0fff_ffff,
            },
            // Guest RAM (the first 16 MiB) outside: mapping it fails.
            IovaRange {
                first: RAM,
                last: u64::MAX,
            },
        ]),
        fail_driver_ok: r.one_in(8),
        max_ioeventfds: r.choose(&[None, None, Some(0), Some(1), Some(2)]),
        net: false,
    }
}

fn device_options(r: &mut Reader) -> DeviceOptions {
    DeviceOptions {
        packed_ring: r.bool(),
        iommu: r.one_in(4),
        num_queues: r.choose(&[None, None, Some(0), Some(1), Some(2), Some(3)]),
        kick: r.choose(&[KickPolicy::Auto, KickPolicy::Auto, KickPolicy::Relay]),
        notification_data: r.bool(),
        shadow: r.choose(&[ShadowPolicy::Auto, ShadowPolicy::Auto, ShadowPolicy::Always]),
    }
}

/// What the harness knows of the device's state.
struct World {
    emu: Arc<EmulatedFunction>,
    guest: Guest,
    dev: Dev,
    /// Named threads with the device inactive (its worker).
    idle_threads: usize,
    removed: bool,
    refuse_unmap: bool,
    hotplugged: u64,
}

impl World {
    /// The device is reset, or cannot DMA any more, or is gone.
    fn assert_quiesced(&self, after: &str) {
        let st = self.emu.device_status();
        assert!(
            self.removed || st == 0 || !self.emu.bus_master(),
            "device left running (status {st:#x}, bus master on) after {after}"
        );
    }

    /// Stopped: reset as [`World::assert_quiesced`] says, or suspended
    /// (SUSPEND shown, DRIVER_OK clear).
    fn assert_stopped(&self, after: &str) {
        let st = self.emu.device_status();
        if st & (status::SUSPEND | status::DRIVER_OK) != status::SUSPEND {
            self.assert_quiesced(after);
        }
    }

    fn assert_no_relay(&self, after: &str) {
        assert_eq!(
            threads_settled(self.idle_threads),
            self.idle_threads,
            "relay thread left after {after}"
        );
    }
}

fn scenario(r: &mut Reader) {
    let cfg = emu_config(r);
    let opts = device_options(r);
    let open = OpenOptions {
        features_mask: if r.one_in(4) { Some(r.u64()) } else { None },
        reset_timeout: Duration::from_millis(2),
        ..OpenOptions::default()
    };
    let ring_size = r.choose(&[64, 64, 2, 256]);
    let emu = Arc::new(EmulatedFunction::new(cfg));
    let Ok(vp) = VpVdpa::open(Arc::clone(&emu), open) else {
        return;
    };
    let guest = Guest::new(RAM, ring_size).expect("guest memory");
    let Ok(dev) = BridgeDevice::new(vp, guest.mem.clone(), opts) else {
        return;
    };
    let mut w = World {
        idle_threads: threads_settled(1),
        emu,
        guest,
        dev,
        removed: false,
        refuse_unmap: false,
        hotplugged: 0,
    };
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        step(r, &mut w);
    }
    let World {
        emu,
        dev,
        removed,
        refuse_unmap,
        idle_threads,
        ..
    } = w;
    drop(dev);
    assert_eq!(
        threads_settled(idle_threads),
        idle_threads,
        "relay thread left after the device was dropped"
    );
    let st = emu.device_status();
    assert!(
        removed || st == 0 || !emu.bus_master(),
        "device left running (status {st:#x}) after it was dropped"
    );
    if !refuse_unmap {
        assert_eq!(emu.dma_mapping_count(), 0, "DMA mappings left after drop");
    }
}

fn step(r: &mut Reader, w: &mut World) {
    match r.u8() % 18 {
        0..=2 => activate(r, w),
        3 => {
            let v = r.u64();
            let v = if r.bool() { v & w.dev.features() } else { v };
            let before = w.dev.acked_features();
            if w.dev.ack_features(v).is_err() {
                assert_eq!(
                    w.dev.acked_features(),
                    before,
                    "a refused ack changed the acks"
                );
            }
            assert_eq!(
                w.dev.acked_features() & !w.dev.features(),
                0,
                "acked beyond the offer"
            );
        }
        4 => {
            let off = if r.bool() { u64::from(r.u8()) } else { r.u64() };
            let mut buf = vec![0u8; usize::from(r.u8() % 17)];
            let _ = w.dev.read_config(off, &mut buf);
        }
        5 => {
            let off = if r.bool() { u64::from(r.u8()) } else { r.u64() };
            let n = usize::from(r.u8() % 9);
            let data = r.bytes(n).to_vec();
            let _ = w.dev.write_config(off, &data);
        }
        6 => {
            let _ = w.dev.reset();
            assert!(!w.dev.is_active());
            w.assert_no_relay("a reset");
            w.assert_quiesced("a reset");
        }
        7 => {
            w.emu.surprise_remove();
            w.removed = true;
        }
        8 => {
            w.refuse_unmap = r.bool();
            w.emu.refuse_dma_unmap(w.refuse_unmap);
        }
        9 => w.emu.set_reset_stuck(r.one_in(4)),
        10 => w.emu.trigger_config_change(),
        11 => w
            .emu
            .bump_config_generation_during_reads(u32::from(r.u8() % 80)),
        12 => kick(r, w),
        13 => hotplug(r, w),
        14 => {
            let (iova, gpa, size) = (
                r.u64() % (1 << 30),
                r.u64() % (2 * RAM),
                r.u64() % (2 * MIB),
            );
            if r.bool() {
                let _ = w.dev.dma().map(iova, gpa, size);
            } else {
                let _ = w.dev.dma().unmap(iova, size);
            }
        }
        16 => migrate(r, w),
        17 => hostile_chain(r, w),
        _ => {
            let q = u16::from(r.u8() % 6);
            let _ = w.dev.notification_area(q);
            let _ = w
                .dev
                .guest_notify_mapping(r.choose(&[4, 0, 2, 0x1000]), 0x1000);
            let _ = w.dev.wiring();
        }
    }
}

fn activate(r: &mut Reader, w: &mut World) {
    let n = u16::from(r.u8() % 5);
    let max = w.dev.queue_max_sizes().first().copied().unwrap_or(256);
    let Ok(mut queues) = w.guest.queues(n, max) else {
        return;
    };
    if !queues.is_empty() && r.bool() {
        let i = usize::from(r.u8()) % queues.len();
        let q = &mut queues[i].1;
        match r.u8() % 6 {
            0 => queues[i].0 = usize::from(r.u8() % 8),
            1 => q.set_size(r.u16()),
            2 => q.set_ready(false),
            3 => {
                let a = r.u64();
                q.set_desc_table_address(Some(a as u32), Some((a >> 32) as u32));
            }
            4 => {
                let a = r.u64();
                q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
            }
            _ => {
                let a = r.u64();
                q.set_used_ring_address(Some(a as u32), Some((a >> 32) as u32));
            }
        }
    }
    let Ok(irq) = TestInterrupt::new(8, !r.one_in(4)) else {
        return;
    };
    let was_active = w.dev.is_active();
    match w.dev.activate(w.guest.mem.clone(), irq, queues) {
        Ok(()) => {
            assert!(!was_active);
            assert!(w.dev.is_active());
            let st = w.emu.device_status();
            assert!(
                w.removed || st & status::DRIVER_OK != 0,
                "activated, yet the device's status is {st:#x}"
            );
        }
        Err(Error::AlreadyActive) => assert!(was_active && w.dev.is_active()),
        Err(e) => {
            assert!(!w.dev.is_active(), "failed activation ({e}) left it active");
            w.assert_quiesced(&format!("a failed activation ({e})"));
            w.assert_no_relay(&format!("a failed activation ({e})"));
        }
    }
}

/// The guest posts a read on queue `q` and kicks (no wait: the device
/// may never answer).
fn kick(r: &mut Reader, w: &mut World) {
    let q = usize::from(r.u8() % 4);
    if r.bool() {
        let mem = w.guest.mem.memory();
        let base = Guest::buffer(q as u16);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&T_IN.to_le_bytes());
        hdr[8..16].copy_from_slice(&u64::from(r.u8()).to_le_bytes());
        use vm_memory::Bytes;
        let _ = mem.write_slice(&hdr, GuestAddress(base));
        if let Some(ring) = w.guest.rings.get_mut(q) {
            let bufs = [
                Buf {
                    addr: base,
                    len: 16,
                    write: false,
                },
                Buf {
                    addr: base + 512,
                    len: 512,
                    write: true,
                },
                Buf {
                    addr: base + 16,
                    len: 1,
                    write: true,
                },
            ];
            let _ = ring.post(&mem, &bufs);
        }
    }
    if let Some(k) = w.guest.kicks.get(q) {
        let _ = k.write(1);
    }
}

/// What a VMM's migration does: pause, resume, dirty logging, state.
fn migrate(r: &mut Reader, w: &mut World) {
    match r.u8() % 6 {
        0 => {
            let active = w.dev.is_active();
            if w.dev.pause().is_ok() && active {
                match w.dev.data_path() {
                    Some(vdpa_plugin::DataPath::Paused) => {
                        w.assert_no_relay("a pause");
                        w.assert_stopped("a pause");
                    }
                    // A device that could not run again on shadow rings
                    // (vIOMMU, packed rings) is left running; its state
                    // says why there is none.
                    Some(vdpa_plugin::DataPath::Direct) => {
                        assert!(w.dev.state().is_err(), "a running device has a state");
                    }
                    other => panic!("after a pause: {other:?}"),
                }
            }
        }
        1 => {
            let _ = w.dev.resume();
        }
        2 => {
            let _ = w.dev.start_dirty_log();
            // A device that suspends, never does, or fails to (virtio 1.4
            // allows DEVICE_NEEDS_RESET) from now on. Only read when it
            // negotiated SUSPEND, so older corpus inputs decode as before.
            if w.emu.driver_features() & features::bit(features::SUSPEND) != 0 {
                w.emu.suspend_behaviour(r.choose(&[
                    SuspendBehaviour::Finish,
                    SuspendBehaviour::Never,
                    SuspendBehaviour::NeedsReset,
                ]));
            }
        }
        3 => w.dev.stop_dirty_log(),
        4 => {
            for d in w.dev.dirty_log() {
                assert!(d.len > 0 && d.gpa % 4096 == 0, "dirty range {d:?}");
                assert!(
                    d.gpa + d.len <= RAM + 64 * MIB + 16 * MIB,
                    "dirty range {d:?}"
                );
            }
        }
        _ => {
            if let Ok(st) = w.dev.state() {
                let mut st = st;
                if r.bool() {
                    st.acked_features ^= 1 << (r.u8() % 64);
                }
                if let Some(q) = st.queues.first_mut() {
                    if r.bool() {
                        q.position.in_flight = (0..r.u16() % 300).map(|_| r.u16()).collect();
                    }
                }
                // Only an inactive device takes a state.
                let _ = w.dev.restore(&st);
            }
        }
    }
}

/// The guest posts a chain of random descriptors on queue `q`
/// (addresses anywhere, lengths, flags including INDIRECT and NEXT,
/// loops) and kicks.
fn hostile_chain(r: &mut Reader, w: &mut World) {
    let q = usize::from(r.u8() % 4);
    let n = 1 + usize::from(r.u8() % 4);
    let bufs: Vec<Buf> = (0..n)
        .map(|_| Buf {
            addr: if r.bool() {
                r.u64()
            } else {
                Guest::buffer(q as u16) + u64::from(r.u16())
            },
            len: if r.bool() {
                r.u32()
            } else {
                u32::from(r.u16())
            },
            write: r.bool(),
        })
        .collect();
    let mem = w.guest.mem.memory();
    if let Some(ring) = w.guest.rings.get_mut(q) {
        if let Ok(head) = ring.post(&mem, &bufs) {
            if r.bool() {
                // Rewrite the head's flags and next: indirect, loops.
                use vm_memory::Bytes;
                let at = ring.addrs().desc + 16 * u64::from(head) + 12;
                let _ = mem.write_obj(r.u16(), GuestAddress(at));
                let _ = mem.write_obj(r.u16() % 8, GuestAddress(at + 2));
            }
        }
    }
    if let Some(k) = w.guest.kicks.get(q) {
        let _ = k.write(1);
    }
}

/// The VMM adds 2 MiB of guest RAM above what it has, then tells the
/// device.
fn hotplug(r: &mut Reader, w: &mut World) {
    if w.hotplugged >= 4 {
        return;
    }
    let gpa = 64 * MIB + (w.hotplugged + u64::from(r.u8() % 2)) * 2 * MIB;
    let Ok(m) = MmapRegion::new(2 * MIB as usize) else {
        return;
    };
    let Some(region) = GuestRegionMmap::new(m, GuestAddress(gpa)) else {
        return;
    };
    if let Ok(map) = w.guest.mem.memory().insert_region(Arc::new(region)) {
        w.guest.mem.lock().unwrap().replace(map);
        w.hotplugged += 1;
        let _ = w.dev.add_memory_region();
    }
}
