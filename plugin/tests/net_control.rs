//! A virtio-net device's control-queue state across the bridge's own
//! resets: what the guest set (receive modes, MAC address and table, VLAN
//! filters, queue pairs, offloads) is recorded in direct mode and on
//! shadow rings, replayed after the switch to shadow rings, a pause and
//! on the device a saved state is restored on, and forgotten at the
//! guest's reset. Against the emulated virtio-net device, which forgets
//! that state at every reset as a real one does.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdpa_bridge::types::features;
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_plugin::{BridgeDevice, DataPath, DeviceOptions, NoNotifyMapping, ShadowPolicy};
use vdpa_testkit::emu::{EmuConfig, EmulatedFunction, NetState, DEFAULT_MAC};
use vdpa_testkit::harness::{Guest, Mem, TestInterrupt};
use virtio_bindings::virtio_net as n;

type Dev = BridgeDevice<VpVdpa<EmulatedFunction>, Mem>;

const RAM: u64 = 16 << 20;
const RING_SIZE: u16 = 64;
const PAIRS: u16 = 2;
const NQ: u16 = 2 * PAIRS + 1;
const CTRL: u16 = NQ - 1;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn net_cfg(extra: u64) -> EmuConfig {
    EmuConfig {
        net: true,
        num_queues: NQ,
        extra_features: extra,
        ..EmuConfig::default()
    }
}

fn open(cfg: EmuConfig, opts: DeviceOptions, g: &Guest) -> (Arc<EmulatedFunction>, Dev) {
    let f = Arc::new(EmulatedFunction::new(cfg));
    let vp = VpVdpa::open(f.clone(), OpenOptions::default()).unwrap();
    (
        f.clone(),
        BridgeDevice::new(vp, g.mem.clone(), opts).unwrap(),
    )
}

fn ack(dev: &mut Dev) {
    let want = features::bit(features::VERSION_1)
        | features::bit(features::ACCESS_PLATFORM)
        | features::bit(features::RING_EVENT_IDX)
        | [
            n::VIRTIO_NET_F_MAC,
            n::VIRTIO_NET_F_CTRL_VQ,
            n::VIRTIO_NET_F_CTRL_RX,
            n::VIRTIO_NET_F_CTRL_VLAN,
            n::VIRTIO_NET_F_CTRL_MAC_ADDR,
            n::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
            n::VIRTIO_NET_F_MQ,
        ]
        .iter()
        .fold(0u64, |f, b| f | 1 << b);
    assert_eq!(dev.features() & want, want, "offered");
    dev.ack_features(want).unwrap();
}

fn activate(g: &mut Guest, dev: &mut Dev) -> Arc<TestInterrupt> {
    let irq = TestInterrupt::new(usize::from(NQ), true).unwrap();
    let queues = g.queues_sized(dev.queue_max_sizes()).unwrap();
    dev.activate(g.mem.clone(), irq.clone(), queues).unwrap();
    irq
}

/// Send one control command (see `Guest::net_control`); with `kick`,
/// the device's ack.
fn command(g: &mut Guest, class: u32, cmd: u32, data: &[u8], kick: bool) -> Option<u8> {
    g.net_control(CTRL, class as u8, cmd as u8, data, kick)
        .unwrap_or_else(|e| panic!("control command {class}.{cmd}: {e}"))
}

const OK: u8 = n::VIRTIO_NET_OK as u8;

/// What the guest sets in every test, and the state the device then has.
fn configure(g: &mut Guest) -> NetState {
    let mac = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];
    let table = [1u8, 0, 0, 0, 0x02, 1, 2, 3, 4, 5, 0, 0, 0, 0];
    let sent: [(u32, u32, Vec<u8>); 9] = [
        (
            n::VIRTIO_NET_CTRL_RX,
            n::VIRTIO_NET_CTRL_RX_PROMISC,
            vec![0],
        ),
        (
            n::VIRTIO_NET_CTRL_RX,
            n::VIRTIO_NET_CTRL_RX_ALLMULTI,
            vec![1],
        ),
        (
            n::VIRTIO_NET_CTRL_MAC,
            n::VIRTIO_NET_CTRL_MAC_ADDR_SET,
            mac.to_vec(),
        ),
        (
            n::VIRTIO_NET_CTRL_MAC,
            n::VIRTIO_NET_CTRL_MAC_TABLE_SET,
            table.to_vec(),
        ),
        (
            n::VIRTIO_NET_CTRL_VLAN,
            n::VIRTIO_NET_CTRL_VLAN_ADD,
            5u16.to_le_bytes().to_vec(),
        ),
        (
            n::VIRTIO_NET_CTRL_VLAN,
            n::VIRTIO_NET_CTRL_VLAN_ADD,
            7u16.to_le_bytes().to_vec(),
        ),
        (
            n::VIRTIO_NET_CTRL_VLAN,
            n::VIRTIO_NET_CTRL_VLAN_DEL,
            5u16.to_le_bytes().to_vec(),
        ),
        (
            n::VIRTIO_NET_CTRL_MQ,
            n::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            PAIRS.to_le_bytes().to_vec(),
        ),
        (
            n::VIRTIO_NET_CTRL_GUEST_OFFLOADS,
            n::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
            3u64.to_le_bytes().to_vec(),
        ),
    ];
    for (class, cmd, data) in &sent {
        assert_eq!(
            command(g, *class, *cmd, data, true),
            Some(OK),
            "{class}.{cmd}"
        );
    }
    // A command the device refuses changes nothing, here or replayed.
    assert_eq!(
        command(
            g,
            n::VIRTIO_NET_CTRL_MQ,
            n::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &9u16.to_le_bytes(),
            true
        ),
        Some(n::VIRTIO_NET_ERR as u8)
    );
    NetState {
        rx: [false, true, false, false, false, false],
        mac,
        mac_table: table.to_vec(),
        vlans: BTreeSet::from([7]),
        pairs: PAIRS,
        offloads: 3,
        commands: 0,
    }
}

/// The device's control state, the command count aside.
fn device_state(emu: &EmulatedFunction) -> NetState {
    let mut s = emu.net_state().expect("a net device");
    s.commands = 0;
    s
}

#[test]
fn the_state_set_in_direct_mode_is_replayed_after_the_switch_to_shadow_rings() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(net_cfg(0), DeviceOptions::default(), &g);
    // The control queue's kicks must reach the bridge: no doorbell
    // mapping for a net device with a control queue.
    assert_eq!(
        dev.guest_notify_mapping(4, 4096).unwrap_err(),
        NoNotifyMapping::ControlQueue
    );
    ack(&mut dev);
    let _irq = activate(&mut g, &mut dev);
    assert_eq!(dev.wiring().unwrap().relayed_kicks, vec![CTRL]);
    let want = configure(&mut g);
    assert_eq!(device_state(&emu), want);
    let resets = emu.stats().resets;
    dev.start_dirty_log().unwrap();
    assert_eq!(dev.data_path(), Some(DataPath::Shadow));
    assert!(emu.stats().resets > resets, "the switch resets the device");
    // The reset forgot it; the bridge set it again.
    assert_eq!(device_state(&emu), want);
    // Commands on shadow rings are recorded too, and go on working.
    assert_eq!(
        command(
            &mut g,
            n::VIRTIO_NET_CTRL_VLAN,
            n::VIRTIO_NET_CTRL_VLAN_ADD,
            &9u16.to_le_bytes(),
            true
        ),
        Some(OK)
    );
    let mut want = want;
    want.vlans.insert(9);
    assert_eq!(device_state(&emu), want);
    // A pause (reset) and resume replays everything again.
    dev.pause().unwrap();
    assert_eq!(device_state(&emu), NetState::default(), "paused: reset");
    dev.resume().unwrap();
    assert_eq!(device_state(&emu), want);
    // The state carries it.
    dev.pause().unwrap();
    let st = dev.state().unwrap();
    let nc = st.net_control.as_ref().expect("net control state");
    assert_eq!(nc.vlans, BTreeSet::from([7, 9]));
    assert_eq!(st.version, vdpa_plugin::STATE_VERSION);
}

#[test]
fn commands_published_without_a_kick_are_recorded_at_the_stop() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (emu, mut dev) = open(net_cfg(0), DeviceOptions::default(), &g);
    ack(&mut dev);
    let _irq = activate(&mut g, &mut dev);
    // Published, not kicked: the device never saw it; the bridge reads it
    // when it stops the device and the shadow relay offers it after the
    // replay.
    command(
        &mut g,
        n::VIRTIO_NET_CTRL_VLAN,
        n::VIRTIO_NET_CTRL_VLAN_ADD,
        &33u16.to_le_bytes(),
        false,
    );
    dev.pause().unwrap();
    let st = dev.state().unwrap();
    assert_eq!(st.net_control.unwrap().vlans, BTreeSet::from([33]));
    dev.resume().unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !emu.net_state().unwrap().vlans.contains(&33) {
        assert!(
            Instant::now() < end,
            "VLAN 33 not set on the device after the resume"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_restored_state_sets_the_destination_device_before_the_guest_runs() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let (_emu, mut dev) = open(net_cfg(0), DeviceOptions::default(), &g);
    ack(&mut dev);
    let _irq = activate(&mut g, &mut dev);
    let want = configure(&mut g);
    dev.pause().unwrap();
    let st = dev.state().unwrap();
    // Through JSON, as Cloud Hypervisor's snapshot stores it.
    let json = serde_json::to_string(&st).unwrap();
    let st: vdpa_plugin::DeviceState = serde_json::from_str(&json).unwrap();
    drop(dev);
    // The destination: another device, the same guest rings.
    let (emu2, mut dev2) = open(net_cfg(0), DeviceOptions::default(), &g);
    dev2.restore(&st).unwrap();
    let irq = TestInterrupt::new(usize::from(NQ), true).unwrap();
    let queues = g
        .rings
        .iter()
        .zip(&g.kicks)
        .enumerate()
        .map(|(i, (r, k))| {
            let a = r.addrs();
            let mut q = virtio_queue::Queue::new(dev2.queue_max_sizes()[i]).unwrap();
            use virtio_queue::QueueT;
            q.set_size(r.size());
            q.set_desc_table_address(Some(a.desc as u32), Some((a.desc >> 32) as u32));
            q.set_avail_ring_address(Some(a.driver as u32), Some((a.driver >> 32) as u32));
            q.set_used_ring_address(Some(a.device as u32), Some((a.device >> 32) as u32));
            q.set_next_avail(st.queues[i].position.next_avail);
            q.set_next_used(st.queues[i].position.next_used);
            q.set_ready(true);
            (i, q, k.try_clone().unwrap())
        })
        .collect();
    dev2.activate(g.mem.clone(), irq, queues).unwrap();
    assert_eq!(
        device_state(&emu2),
        NetState::default(),
        "paused until resumed"
    );
    dev2.resume().unwrap();
    assert_eq!(device_state(&emu2), want);
    // A version 1 state (no control state) is still read.
    let mut old = st.clone();
    old.version = 1;
    old.net_control = None;
    let (_e3, mut dev3) = open(net_cfg(0), DeviceOptions::default(), &g);
    dev3.restore(&old).unwrap();
}

#[test]
fn the_guests_reset_forgets_the_state_and_a_forced_shadow_device_records_from_the_start() {
    let _s = serial();
    let mut g = Guest::new(RAM, RING_SIZE).unwrap();
    let opts = DeviceOptions {
        shadow: ShadowPolicy::Always,
        ..DeviceOptions::default()
    };
    let (emu, mut dev) = open(net_cfg(0), opts, &g);
    ack(&mut dev);
    let _irq = activate(&mut g, &mut dev);
    let want = configure(&mut g);
    dev.pause().unwrap();
    dev.resume().unwrap();
    assert_eq!(device_state(&emu), want);
    // The guest's driver resets the device: nothing to replay after it.
    dev.reset().unwrap();
    ack(&mut dev);
    let _irq = activate(&mut g, &mut dev);
    dev.pause().unwrap();
    assert!(dev.state().unwrap().net_control.unwrap().is_empty());
    dev.resume().unwrap();
    assert_eq!(device_state(&emu), NetState::default());
    assert_eq!(emu.net_state().unwrap().mac, DEFAULT_MAC);
}
