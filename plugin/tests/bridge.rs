//! The plugin against the emulated virtio-blk device, with a VMM-side
//! harness: guest memory, driver-side split rings in it (what the guest's
//! virtio driver would write), `virtio_queue::Queue` values as CH's
//! transport hands them over, kick eventfds and irqfd-like notifiers.

use std::sync::Arc;
use std::time::Duration;

use vdpa_bridge::types::{features, status};
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_bridge::{OpsError, VdpaOps};
use vdpa_plugin::{BridgeDevice, DeviceOptions, Error, InterruptType, KickPolicy, NoNotifyMapping};
use vdpa_testkit::emu::{EmuConfig, EmulatedFunction};
use vdpa_testkit::harness::{Guest, Mem, TestInterrupt};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Dev = BridgeDevice<VpVdpa<EmulatedFunction>, Mem>;

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;
const RING_SIZE: u16 = 64;

/// Tests run one at a time: some count fds and threads.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn guest() -> Guest {
    Guest::new(RAM, RING_SIZE).unwrap()
}

fn device(cfg: EmuConfig, opts: DeviceOptions, g: &Guest) -> (Arc<EmulatedFunction>, Dev) {
    let f = Arc::new(EmulatedFunction::new(cfg));
    let vp = VpVdpa::open(f.clone(), OpenOptions::default()).unwrap();
    let dev = BridgeDevice::new(vp, g.mem.clone(), opts).unwrap();
    (f, dev)
}

fn ack_default(dev: &mut Dev) {
    let want = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM);
    dev.ack_features(dev.features() & want).unwrap();
}

/// Ack the default features and activate queue 0 as a VMM would, with
/// irqfd-like notifiers.
fn activate_one(g: &mut Guest, dev: &mut Dev) -> Arc<TestInterrupt> {
    ack_default(dev);
    let irq = TestInterrupt::new(1, true).unwrap();
    let queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    irq
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Threads of the bridge and the emulated device (relay, ioeventfd
/// workers), by name: the test harness's own threads come and go as tests
/// start and end.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|c| c.starts_with("vdpa-relay") || c.starts_with("emu-"))
        .count()
}

/// [`threads`] once it equals `want`, or after two seconds whatever it
/// is: a new thread names itself a moment after it starts, and a joined
/// thread leaves `/proc/self/task` a moment after the join returns.
fn threads_settled(want: usize) -> usize {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let n = threads();
        if n == want || std::time::Instant::now() >= end {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn activation_wires_kicks_and_interrupts_directly_and_blk_io_round_trips() {
    let _serial = serial();
    let mut g = guest();
    let (emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.dma().mappings(), vec![(0, 0, RAM)]);
    let irq = activate_one(&mut g, &mut dev);
    let w = dev.wiring().unwrap().clone();
    assert_eq!(w.direct_kicks, vec![0]);
    assert!(w.relayed_kicks.is_empty());
    assert!(w.direct_irqs.contains(&InterruptType::Queue(0)));
    assert!(!w.needs_relay(), "{w:?}");

    let mut data = pattern(1, 4096);
    assert_eq!(g.blk(0, 1, 16, &mut data, &irq.queues[0]).unwrap(), 0);
    assert_eq!(emu.disk_read(16 * 512, 4096), data);
    let mut back = vec![0u8; 4096];
    assert_eq!(g.blk(0, 0, 16, &mut back, &irq.queues[0]).unwrap(), 0);
    assert_eq!(back, data);
    assert_eq!(irq.triggered(), 0);
}

#[test]
fn relay_policy_relays_kicks_and_io_still_works() {
    let _serial = serial();
    let mut g = guest();
    let opts = DeviceOptions {
        kick: KickPolicy::Relay,
        ..DeviceOptions::default()
    };
    let (emu, mut dev) = device(EmuConfig::default(), opts, &g);
    let irq = activate_one(&mut g, &mut dev);
    assert_eq!(dev.wiring().unwrap().relayed_kicks, vec![0]);
    let mut data = pattern(2, 512);
    assert_eq!(g.blk(0, 1, 3, &mut data, &irq.queues[0]).unwrap(), 0);
    assert_eq!(emu.disk_read(3 * 512, 512), data);
}

#[test]
fn notification_data_is_not_offered_with_packed_rings() {
    let _serial = serial();
    let g = guest();
    let both = features::bit(features::NOTIFICATION_DATA) | features::bit(features::RING_PACKED);
    let cfg = EmuConfig {
        extra_features: both,
        ..EmuConfig::default()
    };
    let opts = DeviceOptions {
        packed_ring: true,
        notification_data: true,
        ..DeviceOptions::default()
    };
    let dev = device(cfg.clone(), opts, &g).1;
    assert_eq!(dev.features() & both, features::bit(features::RING_PACKED));
    drop(dev);
    // Either alone is still offered.
    let split = DeviceOptions {
        packed_ring: false,
        ..opts
    };
    let dev = device(cfg, split, &g).1;
    assert_eq!(
        dev.features() & both,
        features::bit(features::NOTIFICATION_DATA)
    );
}

#[test]
fn notification_data_kicks_carry_the_avail_index() {
    let _serial = serial();
    let mut g = guest();
    let cfg = EmuConfig {
        extra_features: features::bit(features::NOTIFICATION_DATA),
        ..EmuConfig::default()
    };
    let plain = device(cfg.clone(), DeviceOptions::default(), &g).1;
    assert_eq!(
        plain.features() & features::bit(features::NOTIFICATION_DATA),
        0,
        "offered although the VMM did not say it passes notification data on"
    );
    drop(plain);
    let opts = DeviceOptions {
        notification_data: true,
        ..DeviceOptions::default()
    };
    let (emu, mut dev) = device(cfg, opts, &g);
    let want = features::bit(features::VERSION_1)
        | features::bit(features::ACCESS_PLATFORM)
        | features::bit(features::NOTIFICATION_DATA);
    dev.ack_features(dev.features() & want).unwrap();
    assert_ne!(
        dev.acked_features() & features::bit(features::NOTIFICATION_DATA),
        0
    );
    let irq = TestInterrupt::new(1, true).unwrap();
    let queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    assert_eq!(
        dev.wiring().unwrap().relayed_kicks,
        vec![0],
        "in-kernel kicks cannot carry data"
    );
    let mut data = pattern(3, 512);
    for i in 1..=3u32 {
        assert_eq!(g.blk(0, 1, 1, &mut data, &irq.queues[0]).unwrap(), 0);
        // vqn 0 in the low half, the avail index after the post above.
        assert_eq!(emu.last_notify_data(0), Some(i << 16));
    }
}

#[test]
fn shared_vectors_fan_out_to_every_queue_of_the_group() {
    let _serial = serial();
    let mut g = guest();
    let cfg = EmuConfig {
        num_queues: 4,
        msix_vectors: Some(2),
        ..EmuConfig::default()
    };
    let (emu, mut dev) = device(cfg, DeviceOptions::default(), &g);
    ack_default(&mut dev);
    let irq = TestInterrupt::new(4, true).unwrap();
    let max = dev.queue_max_sizes()[0];
    let queues = g.queues(4, max).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    let w = dev.wiring().unwrap().clone();
    for q in 0..4 {
        assert!(w.relayed_irqs.contains(&InterruptType::Queue(q)), "{w:?}");
    }
    assert_eq!(w.direct_kicks, vec![0, 1, 2, 3]);
    for q in 0..4u16 {
        let mut data = pattern(q as u8, 512);
        // Wait on this queue's own guest eventfd: the relay must raise it.
        assert_eq!(
            g.blk(
                q,
                1,
                100 + u64::from(q),
                &mut data,
                &irq.queues[usize::from(q)]
            )
            .unwrap(),
            0
        );
        assert_eq!(emu.disk_read((100 + u64::from(q)) * 512, 512), data);
    }
}

/// Wait up to two seconds for `fd` to be signalled.
fn signalled(fd: &EventFd) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if fd.read().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn one_vector_carries_queue_and_config_interrupts() {
    let _serial = serial();
    let mut g = guest();
    let cfg = EmuConfig {
        msix_vectors: Some(1),
        ..EmuConfig::default()
    };
    let (emu, mut dev) = device(cfg, DeviceOptions::default(), &g);
    let irq = activate_one(&mut g, &mut dev);
    let w = dev.wiring().unwrap().clone();
    assert!(w.relayed_irqs.contains(&InterruptType::Config), "{w:?}");
    assert!(w.relayed_irqs.contains(&InterruptType::Queue(0)), "{w:?}");
    let mut data = pattern(9, 512);
    assert_eq!(g.blk(0, 1, 5, &mut data, &irq.queues[0]).unwrap(), 0);
    assert_eq!(emu.disk_read(5 * 512, 512), data);
    // Drain what the request raised on the shared vector (the relay fans
    // it out to config too), then a config change alone must arrive.
    std::thread::sleep(Duration::from_millis(50));
    let _ = irq.config.read();
    emu.trigger_config_change();
    assert!(
        signalled(&irq.config),
        "config change on the shared vector never reached the guest"
    );
}

#[test]
fn a_device_without_msix_is_refused_at_activation_and_left_reset() {
    let _serial = serial();
    let mut g = guest();
    let cfg = EmuConfig {
        msix_vectors: Some(0),
        ..EmuConfig::default()
    };
    let (emu, mut dev) = device(cfg, DeviceOptions::default(), &g);
    ack_default(&mut dev);
    let irq = TestInterrupt::new(1, true).unwrap();
    let queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();
    let e = dev
        .activate(g.mem.clone(), irq.clone(), queues)
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert!(!dev.is_active());
    assert_eq!(emu.device_status(), 0, "device left un-reset");
}

#[test]
fn a_queue_whose_in_kernel_kick_is_refused_is_relayed() {
    let _serial = serial();
    let mut g = guest();
    let cfg = EmuConfig {
        num_queues: 2,
        max_ioeventfds: Some(1),
        ..EmuConfig::default()
    };
    let (emu, mut dev) = device(cfg, DeviceOptions::default(), &g);
    ack_default(&mut dev);
    let irq = TestInterrupt::new(2, true).unwrap();
    let queues = g.queues(2, dev.queue_max_sizes()[0]).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    let w = dev.wiring().unwrap().clone();
    assert_eq!(w.direct_kicks, [0], "{w:?}");
    assert_eq!(w.relayed_kicks, [1], "{w:?}");
    for q in 0..2u16 {
        let mut data = pattern(40 + q as u8, 512);
        let lba = 200 + u64::from(q);
        assert_eq!(
            g.blk(q, 1, lba, &mut data, &irq.queues[usize::from(q)])
                .unwrap(),
            0
        );
        assert_eq!(emu.disk_read(lba * 512, 512), data);
    }
    // With the relay forced, nothing is refused.
    dev.reset().unwrap();
    let strict = DeviceOptions {
        kick: KickPolicy::Relay,
        ..DeviceOptions::default()
    };
    drop(dev);
    let (_emu, mut dev) = device(
        EmuConfig {
            num_queues: 2,
            max_ioeventfds: Some(1),
            ..EmuConfig::default()
        },
        strict,
        &g,
    );
    ack_default(&mut dev);
    let queues = g.queues(2, dev.queue_max_sizes()[0]).unwrap();
    dev.activate(g.mem.clone(), irq, queues).unwrap();
    assert_eq!(dev.wiring().unwrap().relayed_kicks, [0, 1]);
}

#[test]
fn a_dma_mapping_the_backend_cannot_remove_stays_recorded() {
    let _serial = serial();
    let g = guest();
    let (emu, dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    let before = dev.dma().mappings();
    assert_eq!(before.len(), 1);
    assert_eq!(emu.dma_mapping_count(), 1);
    emu.refuse_dma_unmap(true);
    dev.dma().unmap_all();
    // Still mapped in the device, so still recorded (with its memory).
    assert_eq!(dev.dma().mappings(), before);
    assert_eq!(emu.dma_mapping_count(), 1);
    let (iova, _, size) = before[0];
    assert!(matches!(
        dev.dma().unmap(iova, size),
        Err(Error::Backend {
            op: "dma_unmap",
            ..
        })
    ));
    assert_eq!(dev.dma().mappings(), before);
    emu.refuse_dma_unmap(false);
    dev.dma().unmap_all();
    assert!(dev.dma().mappings().is_empty());
    assert_eq!(emu.dma_mapping_count(), 0);
}

#[test]
fn interrupts_without_eventfds_use_trigger() {
    let _serial = serial();
    let mut g = guest();
    let (_emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    ack_default(&mut dev);
    let irq = TestInterrupt::new(1, false).unwrap();
    let queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    assert!(dev
        .wiring()
        .unwrap()
        .relayed_irqs
        .contains(&InterruptType::Queue(0)));
    // Nothing to wait on: poll the used ring through a never-signalled fd.
    let idle = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut data = pattern(4, 512);
    assert_eq!(g.blk(0, 1, 0, &mut data, &idle).unwrap(), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while irq.triggered() == 0 {
        assert!(std::time::Instant::now() < deadline, "trigger never called");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn reset_and_reactivate_many_times_without_leaking() {
    let _serial = serial();
    let mut g = guest();
    let opts = DeviceOptions {
        kick: KickPolicy::Relay,
        ..DeviceOptions::default()
    };
    let (emu, mut dev) = device(EmuConfig::default(), opts, &g);
    let irq = TestInterrupt::new(1, true).unwrap();
    let idle = threads_settled(1);
    assert_eq!(idle, 1, "the emulated device's ioeventfd thread");
    let mut baseline = None;
    for i in 0..50u32 {
        ack_default(&mut dev);
        let queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();
        dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
        assert_eq!(threads_settled(idle + 1), idle + 1, "no relay thread");
        let mut data = pattern(i as u8, 512);
        assert_eq!(
            g.blk(0, 1, u64::from(i), &mut data, &irq.queues[0])
                .unwrap(),
            0
        );
        assert_eq!(emu.disk_read(u64::from(i) * 512, 512), data);
        dev.reset().unwrap();
        assert!(!dev.is_active());
        assert_eq!(dev.acked_features(), 0);
        assert_eq!(dev.with_backend(|b| b.status()).unwrap().unwrap(), 0);
        let now = (open_fds(), threads_settled(idle));
        match baseline {
            None => baseline = Some(now),
            Some(b) => assert_eq!(now, b, "fds/threads grew at cycle {i}"),
        }
    }
    assert_eq!(dev.dma().mappings().len(), 1);
}

/// A guest that puts a ring outside its RAM (past the end, straddling
/// the end, above 4 GiB) is refused before the device is touched: the
/// device stays reset, no doorbell or ioeventfd is wired, and a correct
/// activation afterwards works.
#[test]
fn rings_outside_guest_ram_are_refused_before_the_device_sees_them() {
    let _serial = serial();
    let mut g = guest();
    let (emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    let irq = TestInterrupt::new(1, true).unwrap();
    let max = dev.queue_max_sizes()[0];
    let before = emu.stats();
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    type Move = fn(&mut virtio_queue::Queue, (Option<u32>, Option<u32>));
    let desc: Move = |q, (lo, hi)| q.set_desc_table_address(lo, hi);
    let avail: Move = |q, (lo, hi)| q.set_avail_ring_address(lo, hi);
    let used: Move = |q, (lo, hi)| q.set_used_ring_address(lo, hi);
    let n = u64::from(RING_SIZE.min(max));
    let cases: [(&str, Move, u64); 4] = [
        ("descriptor table", desc, RAM + 0x1000),
        ("descriptor table", desc, RAM - 16 * n + 16),
        ("available ring", avail, 0x1_0000_0000),
        ("used ring", used, RAM - 8),
    ];
    for (ring, set, addr) in cases {
        ack_default(&mut dev);
        let mut queues = g.queues(1, max).unwrap();
        set(&mut queues[0].1, split(addr));
        let e = dev
            .activate(g.mem.clone(), irq.clone(), queues)
            .unwrap_err();
        match &e {
            Error::BadRing {
                index: 0,
                ring: r,
                addr: a,
                ..
            } => {
                assert_eq!((*r, *a), (ring, addr), "{e}");
            }
            other => panic!("{ring} at {addr:#x}: {other}"),
        }
        assert!(!dev.is_active());
        assert_eq!(emu.device_status(), 0);
        let now = emu.stats();
        assert_eq!(now.ioeventfd_changes, before.ioeventfd_changes);
        assert_eq!(now.notifies, before.notifies);
        assert_eq!(now.dma_refused, before.dma_refused);
    }
    // The last valid byte of RAM may end a ring.
    ack_default(&mut dev);
    let mut queues = g.queues(1, max).unwrap();
    used(&mut queues[0].1, split(RAM - (6 + 8 * n)));
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    dev.reset().unwrap();
    // And the plain layout round-trips I/O.
    ack_default(&mut dev);
    let queues = g.queues(1, max).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    let mut data = pattern(7, 4096);
    assert_eq!(g.blk(0, 1, 8, &mut data, &irq.queues[0]).unwrap(), 0);
    assert_eq!(emu.disk_read(8 * 512, 4096), pattern(7, 4096));
}

#[test]
fn failed_activation_rolls_back_and_a_later_one_succeeds() {
    let _serial = serial();
    let mut g = guest();
    let (emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    let irq = TestInterrupt::new(1, true).unwrap();
    let max = dev.queue_max_sizes()[0];

    // Rejected before touching the device: a size above the device's
    // maximum (the VMM's queue allowed it).
    ack_default(&mut dev);
    let mut queues = g.queues(1, 1024).unwrap();
    queues[0].1.set_size(512);
    assert_eq!(queues[0].1.size(), 512);
    assert!(matches!(
        dev.activate(g.mem.clone(), irq.clone(), queues),
        Err(Error::BadQueue { index: 0, .. })
    ));

    // A device that fails to start after everything is wired (calls,
    // kicks, the relay thread): all of it is undone.
    {
        // The emulated device of `dev` has its ioeventfd thread; `dev`
        // kicks in the kernel, so it has no relay thread.
        let threads_before = threads_settled(1);
        assert_eq!(threads_before, 1);
        let fds_before = open_fds();
        let (bad_emu, mut bad) = device(
            EmuConfig {
                fail_driver_ok: true,
                ..EmuConfig::default()
            },
            DeviceOptions {
                kick: KickPolicy::Relay,
                ..DeviceOptions::default()
            },
            &g,
        );
        ack_default(&mut bad);
        let threads_with_device = threads_settled(threads_before + 1);
        assert_eq!(threads_with_device, threads_before + 1);
        let queues = g.queues(1, max).unwrap();
        let e = bad
            .activate(g.mem.clone(), irq.clone(), queues)
            .unwrap_err();
        assert!(
            matches!(e, Error::DriverOkRefused { status } if status & status::DEVICE_NEEDS_RESET != 0),
            "{e}"
        );
        assert!(!bad.is_active());
        assert_eq!(bad_emu.device_status(), 0, "device left un-reset");
        assert_eq!(
            threads_settled(threads_with_device),
            threads_with_device,
            "relay thread left running"
        );
        drop(bad);
        drop(bad_emu);
        assert_eq!(
            open_fds(),
            fds_before,
            "eventfds leaked by the failed activation"
        );
        assert_eq!(
            threads_settled(threads_before),
            threads_before,
            "emulated device thread left"
        );
    }

    // A queue the device does not have.
    let mut queues = g.queues(1, max).unwrap();
    queues[0].0 = 7;
    assert!(matches!(
        dev.activate(g.mem.clone(), irq.clone(), queues),
        Err(Error::BadQueue { index: 7, .. })
    ));

    let queues = g.queues(1, max).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    let mut data = pattern(9, 512);
    assert_eq!(g.blk(0, 1, 5, &mut data, &irq.queues[0]).unwrap(), 0);
    assert_eq!(emu.disk_read(5 * 512, 512), data);
    assert!(matches!(
        dev.activate(g.mem.clone(), irq.clone(), g.queues(1, max).unwrap()),
        Err(Error::AlreadyActive)
    ));
}

#[test]
fn features_offered_are_the_intersection_and_acks_are_checked() {
    let _serial = serial();
    let g = guest();
    let cfg = EmuConfig {
        extra_features: features::bit(features::RING_PACKED) | features::bit(features::RING_RESET),
        ..EmuConfig::default()
    };
    let (_emu, mut dev) = device(cfg.clone(), DeviceOptions::default(), &g);
    let raw = dev.with_backend(|b| b.raw_device_features()).unwrap();
    assert_ne!(raw & features::bit(features::RING_PACKED), 0);
    assert_eq!(
        dev.features() & features::bit(features::RING_PACKED),
        0,
        "VMM cannot do packed"
    );
    assert_ne!(dev.features() & features::bit(features::ACCESS_PLATFORM), 0);
    assert_ne!(raw & features::bit(features::RING_RESET), 0);
    assert_eq!(
        dev.features() & features::bit(features::RING_RESET),
        0,
        "transport-only feature offered"
    );
    assert!(matches!(
        dev.ack_features(features::bit(features::RING_PACKED)),
        Err(Error::Invalid(OpsError::FeaturesNotOffered { .. }))
    ));
    assert_eq!(dev.acked_features(), 0);
    let (_emu, dev) = device(
        cfg,
        DeviceOptions {
            packed_ring: true,
            ..DeviceOptions::default()
        },
        &g,
    );
    assert_ne!(dev.features() & features::bit(features::RING_PACKED), 0);
}

#[test]
fn config_reads_come_from_the_device_and_out_of_range_is_an_error() {
    let _serial = serial();
    let g = guest();
    let cfg = EmuConfig::default();
    let sectors = cfg.disk_size / 512;
    let (_emu, mut dev) = device(cfg, DeviceOptions::default(), &g);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap).unwrap();
    assert_eq!(u64::from_le_bytes(cap), sectors);
    let size = dev.config_size() as u64;
    let mut b = [0u8; 4];
    assert!(matches!(
        dev.read_config(size - 2, &mut b),
        Err(Error::Invalid(OpsError::ConfigOutOfRange { .. }))
    ));
    assert!(matches!(
        dev.read_config(u64::MAX, &mut b),
        Err(Error::Invalid(OpsError::ConfigOutOfRange { .. }))
    ));
    // Writes past the end, straddling it or wrapping are refused and
    // change nothing.
    let mut before = vec![0u8; size as usize];
    dev.read_config(0, &mut before).unwrap();
    for (offset, len) in [
        (size, 1),
        (size - 1, 2),
        (u64::MAX, 4),
        (0, size as usize + 1),
    ] {
        assert!(
            matches!(
                dev.write_config(offset, &vec![0xa5; len]),
                Err(Error::Invalid(OpsError::ConfigOutOfRange { .. }))
            ),
            "write at {offset:#x} (+{len}) accepted"
        );
    }
    let mut after = vec![0u8; size as usize];
    dev.read_config(0, &mut after).unwrap();
    assert_eq!(after, before);
}

#[test]
fn dma_maps_only_guest_memory_follows_hotplug_and_vimmu_requests() {
    let _serial = serial();
    let g = guest();
    let (_emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    assert_eq!(dev.dma().mappings(), vec![(0, 0, RAM)]);
    // Hotplug: the VMM adds a region to its map, then tells the device.
    let hot = vm_memory::GuestRegionMmap::new(
        vm_memory::MmapRegion::new(2 * MIB as usize).unwrap(),
        GuestAddress(64 * MIB),
    )
    .unwrap();
    let newmap = g.mem.memory().insert_region(Arc::new(hot)).unwrap();
    g.mem.lock().unwrap().replace(newmap);
    dev.add_memory_region().unwrap();
    assert_eq!(
        dev.dma().mappings(),
        vec![(0, 0, RAM), (64 * MIB, 64 * MIB, 2 * MIB)]
    );
    // Overlaps and non-memory are refused.
    assert!(matches!(
        dev.dma().map(0x1000, 0x1000, 0x1000),
        Err(Error::Dma { .. })
    ));
    assert!(matches!(
        dev.dma().map(1 << 40, 32 * MIB, 0x1000),
        Err(Error::NotGuestMemory { .. })
    ));
    assert!(matches!(
        dev.dma().map(1 << 40, 0, 0),
        Err(Error::Dma { .. })
    ));
    assert!(matches!(
        dev.dma().map(u64::MAX - 0xfff, 0, 0x2000),
        Err(Error::Dma { .. })
    ));

    // With a vIOMMU nothing is mapped up front; the VMM maps guest IOVAs.
    let (_emu, dev) = device(
        EmuConfig::default(),
        DeviceOptions {
            iommu: true,
            ..DeviceOptions::default()
        },
        &g,
    );
    assert!(dev.dma().mappings().is_empty());
    dev.dma().map(0x4000_0000, 0x20_0000, 0x2000).unwrap();
    // A range straddling the end of guest RAM is refused as a whole.
    assert!(dev.dma().map(0x5000_0000, RAM - 0x1000, 0x2000).is_err());
    assert!(matches!(
        dev.dma().unmap(0x4000_0000, 0x1000),
        Err(Error::Dma { .. })
    ));
    dev.dma().unmap(0x4000_0000, 0x2000).unwrap();
    assert!(dev.dma().mappings().is_empty());
}

#[test]
fn notification_area_is_withheld_when_the_bar_is_not_mappable() {
    let _serial = serial();
    let g = guest();
    let (_emu, dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    assert_eq!(dev.notification_area(0), None);
    assert_eq!(dev.notification_area(99), None);
}

#[test]
fn dropping_the_device_resets_it_and_removes_dma_mappings() {
    let _serial = serial();
    let mut g = guest();
    let (emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    ack_default(&mut dev);
    let irq = TestInterrupt::new(1, true).unwrap();
    let queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();
    dev.activate(g.mem.clone(), irq, queues).unwrap();
    drop(dev);
    assert_eq!(emu.dma_mapping_count(), 0);
    let _ = status::DRIVER_OK;
}

/// A raw function with QEMU's virtio-pci layout (notify page at BAR4
/// 0x3000, multiplier 4) whose every `queue_notify_off` reads 0.
fn raw_function(mapped: bool, queues: u16) -> Arc<vdpa_bridge::fake::RawFunction> {
    use vdpa_bridge::fake::{ConfigBuilder, RawFunction};
    let f = RawFunction::new(&ConfigBuilder::qemu_like(0x1042).build());
    let f = if mapped {
        f.with_mapped_bar(4, 0x4000)
    } else {
        f.with_bar(4, vdpa_bridge::pci::BarKind::Memory, 0x4000)
    };
    f.poke(4, 4, &1u32.to_le_bytes()); // device_feature: VERSION_1
    f.poke(4, 0x12, &queues.to_le_bytes()); // num_queues
    f.poke(4, 0x18, &256u16.to_le_bytes()); // queue_size
    Arc::new(f)
}

type RawDev = BridgeDevice<VpVdpa<vdpa_bridge::fake::RawFunction>, Mem>;

fn raw_device(f: &Arc<vdpa_bridge::fake::RawFunction>, opts: DeviceOptions, g: &Guest) -> RawDev {
    let vp = VpVdpa::open(f.clone(), OpenOptions::default()).unwrap();
    // The VMM maps DMA itself: the raw function has no IOMMU.
    let opts = DeviceOptions {
        iommu: true,
        ..opts
    };
    BridgeDevice::new(vp, g.mem.clone(), opts).unwrap()
}

#[test]
fn doorbell_page_maps_over_a_guest_notify_area_of_the_same_layout() {
    let _serial = serial();
    let g = guest();
    let f = raw_function(true, 1);
    let dev = raw_device(&f, DeviceOptions::default(), &g);
    let m = dev.guest_notify_mapping(4, 0x1000).unwrap();
    use vdpa_bridge::PciFunction as _;
    assert_eq!(m.host_addr, f.bar_mappings(4)[0].host_addr + 0x3000);
    assert_eq!(m.len, 0x1000);
    // An area smaller than a page cannot take it.
    assert_eq!(
        dev.guest_notify_mapping(4, 0x800),
        Err(NoNotifyMapping::TooLarge {
            need: 4,
            have: 0x800
        })
    );
}

#[test]
fn doorbell_page_is_not_mapped_when_queue_offsets_differ() {
    let _serial = serial();
    let g = guest();
    // Every queue_notify_off is 0: queue 1's doorbell is at 0, the guest
    // would write it at 4.
    let f = raw_function(true, 3);
    let dev = raw_device(&f, DeviceOptions::default(), &g);
    assert_eq!(
        dev.guest_notify_mapping(4, 0x1000),
        Err(NoNotifyMapping::Layout {
            queue: 1,
            device: 0,
            guest: 4
        })
    );
    // Exposing only queue 0 makes the layouts agree.
    let one = DeviceOptions {
        num_queues: Some(1),
        ..DeviceOptions::default()
    };
    drop(dev);
    let dev = raw_device(&f, one, &g);
    assert!(dev.guest_notify_mapping(4, 0x1000).is_ok());
}

#[test]
fn doorbell_page_is_not_mapped_for_relayed_kicks_or_unmappable_bars() {
    let _serial = serial();
    let g = guest();
    let relay = DeviceOptions {
        kick: KickPolicy::Relay,
        ..DeviceOptions::default()
    };
    let dev = raw_device(&raw_function(true, 1), relay, &g);
    assert_eq!(
        dev.guest_notify_mapping(4, 0x1000),
        Err(NoNotifyMapping::Relayed)
    );
    let dev = raw_device(&raw_function(false, 1), DeviceOptions::default(), &g);
    assert_eq!(
        dev.guest_notify_mapping(4, 0x1000),
        Err(NoNotifyMapping::Backend)
    );
    // The emulated device traps its BAR: nothing to map either.
    let (_emu, dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    assert_eq!(
        dev.guest_notify_mapping(4, 0x1000),
        Err(NoNotifyMapping::Backend)
    );
}

#[test]
fn with_64_kib_host_pages_the_doorbells_are_not_mapped_over_a_4_kib_area() {
    let _serial = serial();
    let g = guest();
    // QEMU's layout: a 4 KiB doorbell region cannot be a 64 KiB page.
    let f = raw_function(true, 1);
    let opts = OpenOptions {
        page_size: 0x1_0000,
        ..OpenOptions::default()
    };
    let vp = VpVdpa::open(f.clone(), opts).unwrap();
    let iommu = DeviceOptions {
        iommu: true,
        ..DeviceOptions::default()
    };
    let dev = BridgeDevice::new(vp, g.mem.clone(), iommu).unwrap();
    assert_eq!(
        dev.guest_notify_mapping(4, 0x1000),
        Err(NoNotifyMapping::Backend)
    );
}

#[test]
fn with_64_kib_host_pages_a_64_kib_doorbell_page_is_too_large_for_a_4_kib_area() {
    use vdpa_bridge::fake::{ConfigBuilder, RawFunction};
    let _serial = serial();
    let g = guest();
    let cfg = ConfigBuilder::virtio(0x1042)
        .virtio_cap(1, 4, 0, 0x1000)
        .virtio_cap(3, 4, 0x1000, 0x1000)
        .virtio_cap(4, 4, 0x2000, 0x1000)
        .notify_cap(4, 0x1_0000, 0x1_0000, 4)
        .msix_cap(2, 1, 0, 1, 0x800);
    let f = RawFunction::new(&cfg.build()).with_mapped_bar(4, 0x2_0000);
    f.poke(4, 4, &1u32.to_le_bytes()); // device_feature: VERSION_1
    f.poke(4, 0x12, &1u16.to_le_bytes()); // num_queues
    f.poke(4, 0x18, &256u16.to_le_bytes()); // queue_size
    let opts = OpenOptions {
        page_size: 0x1_0000,
        ..OpenOptions::default()
    };
    let vp = VpVdpa::open(Arc::new(f), opts).unwrap();
    let iommu = DeviceOptions {
        iommu: true,
        ..DeviceOptions::default()
    };
    let dev = BridgeDevice::new(vp, g.mem.clone(), iommu).unwrap();
    // Cloud Hypervisor's notification area is one 4 KiB page; the host
    // can only map 64 KiB: kicks stay trapped.
    assert_eq!(
        dev.guest_notify_mapping(4, 0x1000),
        Err(NoNotifyMapping::TooLarge {
            need: 4,
            have: 0x1000
        })
    );
    assert!(dev.guest_notify_mapping(4, 0x1_0000).is_ok());
}

/// What a guest reset and an unplug (the device dropped) do runs on a
/// VMM's vCPU thread: Cloud Hypervisor's filter there allows neither
/// VFIO_DEVICE_IOEVENTFD nor VFIO_DEVICE_RESET.
#[test]
fn a_guest_reset_and_a_drop_change_no_ioeventfd_and_reset_no_function() {
    let _serial = serial();
    let mut g = guest();
    let (emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    let _irq = activate_one(&mut g, &mut dev);
    assert_eq!(dev.wiring().unwrap().direct_kicks, vec![0]);
    let before = emu.stats();

    dev.reset().unwrap();
    let after_reset = emu.stats();
    drop(dev);
    let after_drop = emu.stats();

    assert_eq!(after_reset.ioeventfd_changes, before.ioeventfd_changes);
    assert_eq!(after_drop.ioeventfd_changes, before.ioeventfd_changes);
    assert_eq!(after_drop.function_resets, before.function_resets);
    assert_eq!(emu.device_status(), 0);
}

#[test]
fn a_device_stuck_in_reset_is_recovered_by_a_function_reset_at_the_next_activation() {
    let _serial = serial();
    let mut g = guest();
    let cfg = EmuConfig {
        flr_recovers: true,
        ..EmuConfig::default()
    };
    let (emu, mut dev) = device(cfg, DeviceOptions::default(), &g);
    let irq = activate_one(&mut g, &mut dev);
    emu.set_reset_stuck(true);
    let flrs = emu.stats().function_resets;

    // The guest's reset (a vCPU thread): bus mastering off, no FLR there.
    let e = dev.reset().unwrap_err();
    let cause = std::error::Error::source(&e).map(ToString::to_string);
    assert!(
        cause
            .as_deref()
            .is_some_and(|c| c.contains("tried when it next starts")),
        "{e}: {cause:?}"
    );
    assert!(!emu.bus_master());
    assert_eq!(emu.stats().function_resets, flrs);

    // The next activation (the VMM thread) resets the function and runs.
    ack_default(&mut dev);
    let queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    assert_eq!(emu.stats().function_resets, flrs + 1);
    assert!(emu.bus_master());
    let mut data = pattern(9, 512);
    assert_eq!(g.blk(0, 1, 3, &mut data, &irq.queues[0]).unwrap(), 0);
    assert_eq!(emu.disk_read(3 * 512, 512), data);
}

/// An error and its sources, joined.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Post a 4 KiB read of sector 0 on queue 0 and kick it, without waiting.
fn post_read(g: &mut Guest) {
    use vdpa_testkit::driver::ring::Buf;
    let mem = g.mem.memory();
    let base = Guest::buffer(0);
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&vdpa_testkit::driver::blk::T_IN.to_le_bytes());
    vm_memory::Bytes::write_slice(&*mem, &hdr, GuestAddress(base)).unwrap();
    let bufs = [
        Buf {
            addr: base,
            len: 16,
            write: false,
        },
        Buf {
            addr: base + 512,
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
}

#[test]
fn a_device_removed_with_requests_in_flight_resets_and_drops_at_once() {
    let _serial = serial();
    let idle = threads_settled(0);
    let fds = open_fds();
    let mut g = guest();
    let (emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    let irq = activate_one(&mut g, &mut dev);
    emu.hold_requests(true);
    post_read(&mut g);
    let requests = emu.stats().requests;

    emu.surprise_remove();
    let t = std::time::Instant::now();
    let e = dev.reset().unwrap_err();
    let reset_took = t.elapsed();
    let mut buf = [0u8; 8];
    let config = dev.read_config(0, &mut buf);
    drop(dev);
    drop(emu);
    drop(irq);
    drop(g);

    let chain = error_chain(&e);
    assert!(chain.contains("all-ones"), "{chain}");
    assert!(reset_took < Duration::from_millis(100), "{reset_took:?}");
    assert!(config.is_err(), "config read from a removed device");
    assert_eq!(requests, 0, "the held request was completed");
    assert_eq!(threads_settled(idle), idle);
    assert_eq!(open_fds(), fds);
}

#[test]
fn a_device_removed_before_activation_refuses_it_and_leaves_nothing() {
    let _serial = serial();
    let idle = threads_settled(0);
    let mut g = guest();
    let (emu, mut dev) = device(
        EmuConfig::default(),
        DeviceOptions {
            kick: KickPolicy::Relay,
            ..DeviceOptions::default()
        },
        &g,
    );
    ack_default(&mut dev);
    let irq = TestInterrupt::new(1, true).unwrap();
    let queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();

    emu.surprise_remove();
    let t = std::time::Instant::now();
    let e = dev
        .activate(g.mem.clone(), irq.clone(), queues)
        .unwrap_err();

    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert!(!dev.is_active());
    assert!(matches!(e, Error::Backend { .. }), "{e}");
    assert_eq!(
        threads_settled(idle + 1),
        idle + 1,
        "only the emulator's worker"
    );
    drop(dev);
}

/// Threads the release starts (named after the relay).
fn orphan_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|c| c.contains("orphan") || c.starts_with("removal-"))
        .count()
}

#[test]
fn a_removal_request_releases_the_device_and_later_requests_fail_cleanly() {
    let _serial = serial();
    let idle = threads_settled(0);
    let fds = open_fds();
    let mut g = guest();
    let (emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    let irq = activate_one(&mut g, &mut dev);
    let mut data = pattern(7, 4096);
    assert_eq!(g.blk(0, 1, 8, &mut data, &irq.queues[0]).unwrap(), 0);

    // The host asks for the device back: the watch calls back.
    let (tx, rx) = std::sync::mpsc::channel();
    let request = dev.removal_request().expect("the emulated device has one");
    let mut watch = vdpa_plugin::RemovalWatch::start(
        request,
        "removal-watch".into(),
        None,
        Box::new(move || tx.send(()).unwrap()),
    )
    .unwrap();
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    emu.request_removal();
    rx.recv_timeout(Duration::from_secs(2)).unwrap();
    // vfio-pci asks again while the device is held: called back again.
    emu.request_removal();
    rx.recv_timeout(Duration::from_secs(2)).unwrap();
    watch.stop();
    drop(watch);

    assert_eq!(irq.triggered(), 0);
    let report = dev.release();
    assert_eq!(report.answered, vec![0]);
    assert!(report.unfinished.is_empty(), "{report:?}");
    // One interrupt per queue after the drain (completions the stopped
    // relay did not raise).
    assert_eq!(irq.triggered(), 1);
    assert!(dev.is_released());
    // Every reference to the function is gone: a VFIO device is closed.
    assert_eq!(Arc::strong_count(&emu), 1);
    assert!(dev.dma().mappings().is_empty());
    assert!(matches!(dev.dma().map(0, 0, 4096), Err(Error::Released)));
    dev.dma().unmap(0, RAM).unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(dev.read_config(0, &mut buf), Err(Error::Released)));
    assert!(dev.removal_request().is_none());
    assert_eq!(dev.release(), vdpa_plugin::ReleaseReport::default());

    // The guest's next requests are answered with VIRTIO_BLK_S_IOERR and
    // an interrupt; the disk is not touched.
    let before = emu.stats().requests;
    for sector in [0, 8, 1 << 20] {
        let mut back = vec![0u8; 4096];
        assert_eq!(g.blk(0, 0, sector, &mut back, &irq.queues[0]).unwrap(), 1);
    }
    assert_eq!(emu.stats().requests, before);
    assert_eq!(emu.disk_read(8 * 512, 4096), data);
    // The guest's driver resets the device on its way out: no error.
    dev.reset().unwrap();
    drop(dev);
    drop(irq);
    drop(g);
    drop(emu);
    assert_eq!(orphan_threads(), 0);
    assert_eq!(threads_settled(idle), idle);
    assert_eq!(open_fds(), fds);
}

#[test]
fn a_request_the_device_never_finishes_is_left_alone_not_answered_twice() {
    let _serial = serial();
    let mut g = guest();
    let (emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    let _irq = activate_one(&mut g, &mut dev);
    emu.hold_requests(true);
    post_read(&mut g);
    let t = std::time::Instant::now();
    let report = dev.release();
    let took = t.elapsed();
    assert_eq!(report.unfinished, vec![(0, 1)]);
    assert!(report.answered.is_empty(), "{report:?}");
    assert!(report.drained_in >= vdpa_plugin::DRAIN, "{report:?}");
    assert!(
        took < vdpa_plugin::DRAIN + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(Arc::strong_count(&emu), 1);
    // Nothing answers the queue: no used entry appears.
    std::thread::sleep(Duration::from_millis(100));
    let mem = g.mem.memory();
    assert_eq!(g.rings[0].pop_used(&mem).unwrap(), None);
}

#[test]
fn a_device_that_was_never_activated_is_released_at_once() {
    let _serial = serial();
    let g = guest();
    let (emu, mut dev) = device(EmuConfig::default(), DeviceOptions::default(), &g);
    assert_eq!(dev.dma().mappings().len(), 1);
    let report = dev.release();
    assert_eq!(report, vdpa_plugin::ReleaseReport::default());
    assert_eq!(Arc::strong_count(&emu), 1);
    assert!(dev.dma().mappings().is_empty());
    assert_eq!(emu.dma_mapping_count(), 0);
    // Memory hotplug after the release maps nothing and does not fail.
    dev.add_memory_region().unwrap();
    assert!(matches!(dev.write_config(0, &[0]), Err(Error::Released)));
}

/// Behind a vIOMMU, as Cloud Hypervisor's transport hands them over: the
/// queues hold guest-physical ring addresses, the device's DMA mappings
/// are keyed by the guest's IOVAs. Here the rings (1-2 MiB) are mapped
/// at IOVA `gpa + OFF` only and the buffers (8-16 MiB) at IOVA = GPA, so
/// the device finds its rings only where the translation says.
const OFF: u64 = 0x4000_0000;

fn viommu_translation() -> vdpa_plugin::AddressTranslation {
    Arc::new(|gpa: u64, len: u64| {
        if gpa >= MIB && gpa.checked_add(len).is_some_and(|e| e <= 2 * MIB) {
            Ok(gpa + OFF)
        } else {
            Err(std::io::Error::other(format!(
                "{gpa:#x} (+{len:#x}) is not mapped"
            )))
        }
    })
}

fn viommu_device(g: &Guest) -> (Arc<EmulatedFunction>, Dev) {
    let opts = DeviceOptions {
        iommu: true,
        ..DeviceOptions::default()
    };
    let (emu, mut dev) = device(EmuConfig::default(), opts, g);
    assert!(dev.dma().mappings().is_empty());
    dev.dma().map(MIB + OFF, MIB, MIB).unwrap();
    dev.dma().map(8 * MIB, 8 * MIB, 8 * MIB).unwrap();
    dev.set_address_translation(viommu_translation());
    (emu, dev)
}

#[test]
fn behind_a_viommu_the_device_is_given_the_guests_iovas_for_its_rings() {
    let _serial = serial();
    let mut g = guest();
    let (emu, mut dev) = viommu_device(&g);
    let irq = activate_one(&mut g, &mut dev);
    let mut data = pattern(3, 4096);
    assert_eq!(g.blk(0, 1, 24, &mut data, &irq.queues[0]).unwrap(), 0);
    assert_eq!(emu.disk_read(24 * 512, 4096), data);
    let mut back = vec![0u8; 4096];
    assert_eq!(g.blk(0, 0, 24, &mut back, &irq.queues[0]).unwrap(), 0);
    assert_eq!(back, data);
    // The guest's vIOMMU unmaps the buffers: the device's table follows.
    let stats = dev.dma().stats();
    assert_eq!((stats.maps, stats.unmaps, stats.live), (2, 0, 2));
    dev.dma().unmap(8 * MIB, 8 * MIB).unwrap();
    let stats = dev.dma().stats();
    assert_eq!((stats.maps, stats.unmaps, stats.live), (2, 1, 1));
    assert_eq!(emu.dma_mapping_count(), 1);
}

#[test]
fn behind_a_viommu_a_pause_leaves_the_device_running_and_state_says_why() {
    let _serial = serial();
    let mut g = guest();
    let (emu, mut dev) = viommu_device(&g);
    let irq = activate_one(&mut g, &mut dev);
    dev.pause().unwrap();
    assert_eq!(dev.data_path(), Some(vdpa_plugin::DataPath::Direct));
    let e = dev.state().unwrap_err().to_string();
    assert!(e.contains("vIOMMU"), "{e}");
    let mut data = pattern(4, 4096);
    assert_eq!(g.blk(0, 1, 32, &mut data, &irq.queues[0]).unwrap(), 0);
    assert_eq!(emu.disk_read(32 * 512, 4096), data);
}

#[test]
fn behind_a_viommu_a_ring_the_guest_did_not_map_is_refused_before_the_device_sees_it() {
    let _serial = serial();
    let mut g = guest();
    let (emu, mut dev) = viommu_device(&g);
    ack_default(&mut dev);
    let irq = TestInterrupt::new(1, true).unwrap();
    let mut queues = g.queues(1, dev.queue_max_sizes()[0]).unwrap();
    // The used ring moved into guest RAM the vIOMMU does not map for the
    // device (4 MiB: guest RAM, so the transport accepts it).
    queues[0]
        .1
        .set_used_ring_address(Some(4 * MIB as u32), Some(0));
    let e = dev
        .activate(g.mem.clone(), irq.clone(), queues)
        .unwrap_err();
    assert!(
        matches!(&e, Error::Untranslated { index: 0, ring: "used ring", addr, .. } if *addr == 4 * MIB),
        "{e}"
    );
    assert_eq!(emu.device_status(), 0);
    assert_eq!(emu.stats().notifies, 0);
    assert!(!dev.is_active());
}
