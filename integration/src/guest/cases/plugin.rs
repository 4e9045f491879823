//! The plugin (`vdpa-plugin::BridgeDevice`) on QEMU's real devices: what a
//! VMM does with it, driven by the VMM-side harness (guest memory, the
//! guest driver's rings, kick eventfds in, irqfd stand-ins out).

use std::sync::Arc;

use anyhow::{ensure, Context as _};
use vdpa_bridge::types::features;
use vdpa_bridge::vfio::VfioFunction;
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_bridge::VdpaOps as _;
use vdpa_plugin::{BridgeDevice, DeviceOptions, InterruptType, KickPolicy, NoNotifyMapping};
use vdpa_testkit::driver::blk::{T_IN, T_OUT};
use vdpa_testkit::harness::{Guest, Mem, TestInterrupt};
use virtio_queue::QueueT as _;

use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::{Device, Variant};
use crate::pattern;

type Dev = BridgeDevice<VpVdpa<VfioFunction>, Mem>;

const GUEST_RAM: u64 = 32 << 20;

/// The suite.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |v: Variant, what: &str, run: fn(&Ctx) -> CaseResult| {
        out.push(Case {
            name: format!("plugin_{}_{what}", v.name()),
            needs: Some(v),
            run,
        })
    };
    add(Variant::Blk0, "io_in_kernel_kicks_direct_irqs", io_direct);
    add(Variant::Blk0, "io_relayed_kicks", io_relay);
    add(Variant::BlkMq, "io_shared_vectors_fan_out", io_fan_out);
    add(
        Variant::Blk0,
        "reset_reactivate_100_under_traffic",
        reset_cycles,
    );
    add(Variant::BlkPpv, "notification_area_offered", ppv_area);
    add(Variant::Blk0, "notification_area_withheld", default_area);
    add(Variant::NetUser, "arp_through_guest_rings", net_arp);
    add(
        Variant::Blk0,
        "doorbell_page_kicks_reach_the_device",
        doorbell_page_io,
    );
    add(
        Variant::BlkPpv,
        "doorbell_page_kicks_reach_the_device",
        doorbell_page_io,
    );
    add(
        Variant::NetMq,
        "doorbell_page_covers_every_queue",
        net_doorbell_page,
    );
    add(
        Variant::Blk0,
        "misbehaving_guest_is_refused_and_io_still_works",
        misbehaving_guest,
    );
    add(
        Variant::NetMq,
        "control_state_replayed_after_the_bridges_resets",
        net_control_replayed,
    );
    out
}

/// Send one control command on queue `ctrl` (see `Guest::net_control`)
/// and return the device's ack.
fn net_command(g: &mut Guest, ctrl: u16, class: u32, cmd: u32, data: &[u8]) -> anyhow::Result<u8> {
    g.net_control(ctrl, class as u8, cmd as u8, data, true)?
        .context("no ack")
}

/// QEMU's virtio-net (four pairs, control queue): the guest sets a MAC
/// address, three queue pairs, a VLAN filter and receive modes through the
/// control queue in direct mode. The bridge's switch to shadow rings
/// resets the device; the MAC in its config (which QEMU's reset sets back
/// to `mac=`) shows the replay set it again. A pause resets it (the MAC
/// reads back as `mac=`), the resume replays it.
fn net_control_replayed(ctx: &Ctx) -> CaseResult {
    use virtio_bindings::virtio_net as n;
    let mut g = Guest::new(GUEST_RAM, 64)?;
    let (_f, mut d) = open(ctx.dev()?, &g, DeviceOptions::default())?;
    let want = features::bit(features::VERSION_1)
        | features::bit(features::ACCESS_PLATFORM)
        | [
            n::VIRTIO_NET_F_MAC,
            n::VIRTIO_NET_F_CTRL_VQ,
            n::VIRTIO_NET_F_CTRL_RX,
            n::VIRTIO_NET_F_CTRL_VLAN,
            n::VIRTIO_NET_F_CTRL_MAC_ADDR,
            n::VIRTIO_NET_F_MQ,
        ]
        .iter()
        .fold(0u64, |f, b| f | 1 << b);
    ensure!(
        d.features() & want == want,
        "device lacks {:#x}",
        want & !d.features()
    );
    d.ack_features(want)?;
    let _irq = activate(&mut d, &mut g)?;
    let ctrl = u16::try_from(d.queue_max_sizes().len() - 1)?;
    let mac = |d: &Dev| -> anyhow::Result<[u8; 6]> {
        let mut m = [0u8; 6];
        d.read_config(0, &mut m)?;
        Ok(m)
    };
    let original = mac(&d)?;
    let set = [0x02, 0x00, 0x00, 0x00, 0xbe, 0xef];
    let ok = n::VIRTIO_NET_OK as u8;
    for (class, cmd, data) in [
        (
            n::VIRTIO_NET_CTRL_MAC,
            n::VIRTIO_NET_CTRL_MAC_ADDR_SET,
            set.to_vec(),
        ),
        (
            n::VIRTIO_NET_CTRL_MQ,
            n::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            3u16.to_le_bytes().to_vec(),
        ),
        (
            n::VIRTIO_NET_CTRL_VLAN,
            n::VIRTIO_NET_CTRL_VLAN_ADD,
            5u16.to_le_bytes().to_vec(),
        ),
        (
            n::VIRTIO_NET_CTRL_RX,
            n::VIRTIO_NET_CTRL_RX_PROMISC,
            vec![0],
        ),
    ] {
        let ack = net_command(&mut g, ctrl, class, cmd, &data)?;
        ensure!(ack == ok, "command {class}.{cmd}: ack {ack}");
    }
    ensure!(
        mac(&d)? == set,
        "MAC_ADDR_SET did not change the config's MAC"
    );
    d.start_dirty_log()?;
    ensure!(
        d.data_path() == Some(vdpa_plugin::DataPath::Shadow),
        "not on shadow rings"
    );
    let after_switch = mac(&d)?;
    ensure!(
        after_switch == set,
        "after the switch (a reset) the MAC is {after_switch:02x?}, not the one set"
    );
    d.pause()?;
    let paused = mac(&d)?;
    ensure!(
        paused == original,
        "the paused (reset) device's MAC is {paused:02x?}, not mac= {original:02x?}"
    );
    d.resume()?;
    ensure!(mac(&d)? == set, "the MAC was not set again at the resume");
    // Commands on shadow rings keep working and are kept.
    let ack = net_command(
        &mut g,
        ctrl,
        n::VIRTIO_NET_CTRL_VLAN,
        n::VIRTIO_NET_CTRL_VLAN_ADD,
        &7u16.to_le_bytes(),
    )?;
    ensure!(ack == ok, "VLAN_ADD on shadow rings: ack {ack}");
    d.pause()?;
    let st = d.state()?;
    let nc = st.net_control.context("no control state")?;
    ensure!(
        nc.vlans.iter().copied().collect::<Vec<_>>() == [5, 7],
        "VLANs kept {:?}",
        nc.vlans
    );
    d.reset()?;
    Ok(Outcome::PassWith(format!(
        "MAC {set:02x?} set through the control queue, {original:02x?} after each reset, \
         {set:02x?} again after the replay ({} command(s) kept)",
        nc.commands.len() + nc.vlans.len()
    )))
}

/// virtio-net through the plugin: the guest's rx/tx rings in guest
/// memory, kicks and interrupts through eventfds, an ARP exchange with
/// QEMU's user-mode network.
fn net_arp(ctx: &Ctx) -> CaseResult {
    use vdpa_testkit::driver::net;
    let dev = ctx.dev()?;
    let mac: Vec<u8> = dev
        .qemu_device
        .split(',')
        .find_map(|p| p.strip_prefix("mac="))
        .context("no mac")?
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    let mac: [u8; 6] = mac.try_into().map_err(|_| anyhow::anyhow!("bad mac"))?;
    let mut g = Guest::new(GUEST_RAM, 128)?;
    let (_f, mut d) = open(dev, &g, DeviceOptions::default())?;
    let want = features::bit(features::VERSION_1)
        | features::bit(features::ACCESS_PLATFORM)
        | features::bit(net::F_MAC);
    d.ack_features(d.features() & want)?;
    // The guest enables rx and tx only (no control queue).
    let irq = TestInterrupt::new(2, true)?;
    let queues = g.queues_sized(&d.queue_max_sizes()[..2])?;
    d.activate(g.mem.clone(), irq.clone(), queues)?;
    g.net_fill_rx(0)?;
    let peer = [10, 0, 2, 2];
    let req = net::arp_request(mac, [10, 0, 2, 15], peer);
    for _ in 0..10 {
        g.net_send(1, &req, &irq.queues[1])?;
        let end = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while std::time::Instant::now() < end {
            if let Some(f) = g.net_recv(0, &irq.queues[0], std::time::Duration::from_millis(100))? {
                if net::parse_arp_reply(&f, peer).is_some() {
                    d.reset()?;
                    return Ok(Outcome::Pass);
                }
            }
        }
    }
    anyhow::bail!("no ARP reply from 10.0.2.2 through the plugin")
}

fn open(dev: &Device, g: &Guest, opts: DeviceOptions) -> anyhow::Result<(Arc<VfioFunction>, Dev)> {
    let f = Arc::new(VfioFunction::open(&dev.bdf).context("claim through VFIO")?);
    let vp = VpVdpa::open(f.clone(), OpenOptions::default())?;
    let d = BridgeDevice::new(vp, g.mem.clone(), opts)?;
    Ok((f, d))
}

fn ack(d: &mut Dev) -> anyhow::Result<()> {
    let want = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM);
    ensure!(d.features() & want == want, "device lacks {want:#x}");
    d.ack_features(want)?;
    Ok(())
}

/// Activate with every queue of the device and return the interrupts.
fn activate(d: &mut Dev, g: &mut Guest) -> anyhow::Result<Arc<TestInterrupt>> {
    let n = d.queue_max_sizes().len();
    let irq = TestInterrupt::new(n, true)?;
    let queues = g.queues_sized(d.queue_max_sizes())?;
    d.activate(g.mem.clone(), irq.clone(), queues)?;
    Ok(irq)
}

/// A guest that misbehaves towards QEMU's device: rings outside its RAM,
/// sizes that are not powers of two or above the maximum, config writes
/// past the end, a doorbell rung while the device is not started. Each is
/// refused (or ignored by the device) and leaves it reset; the same
/// device then does verified I/O.
fn misbehaving_guest(ctx: &Ctx) -> CaseResult {
    use vdpa_plugin::Error;
    let mut g = Guest::new(GUEST_RAM, 128)?;
    let (_f, mut d) = open(ctx.dev()?, &g, DeviceOptions::default())?;
    let max = d.queue_max_sizes()[0];
    let irq = TestInterrupt::new(1, true)?;
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let mut refusals = Vec::new();
    for (what, addr) in [
        ("past the end", GUEST_RAM + 0x1000),
        ("above 4 GiB", 0x1_0000_0000),
        ("straddling the end", GUEST_RAM - 16),
    ] {
        ack(&mut d)?;
        let mut queues = g.queues(1, max)?;
        let (lo, hi) = split(addr);
        queues[0].1.set_desc_table_address(lo, hi);
        match d.activate(g.mem.clone(), irq.clone(), queues) {
            Err(Error::BadRing { .. }) => {}
            other => anyhow::bail!("descriptor table {what}: {other:?}"),
        }
        refusals.push(what);
    }
    for (what, size) in [
        ("not a power of two", 96u16),
        ("above the maximum", max * 2),
    ] {
        ack(&mut d)?;
        let mut queues = g.queues(1, max)?;
        queues[0].1.set_size(size);
        if queues[0].1.size() != size {
            // virtio-queue itself refused it (size above the VMM's maximum).
            continue;
        }
        match d.activate(g.mem.clone(), irq.clone(), queues) {
            Err(Error::BadQueue { .. }) => {}
            other => anyhow::bail!("queue size {size} ({what}): {other:?}"),
        }
        refusals.push(what);
    }
    let status = d.with_backend(|b| b.status())??;
    ensure!(status == 0, "device left with status {status:#x}");
    // A doorbell rung before DRIVER_OK (a guest with the doorbell page
    // mapped can do that at any time): the reset device has no ring.
    d.with_backend(|b| b.kick(vdpa_bridge::QueueIndex(0)))??;
    let size = d.config_size() as u64;
    let mut before = vec![0u8; size as usize];
    d.read_config(0, &mut before)?;
    for (offset, len) in [(size, 1usize), (size - 1, 2), (u64::MAX, 4)] {
        ensure!(
            d.write_config(offset, &vec![0xa5; len]).is_err(),
            "config write at {offset:#x} (+{len}) accepted"
        );
    }
    let mut after = vec![0u8; size as usize];
    d.read_config(0, &mut after)?;
    ensure!(after == before, "config changed by refused writes");
    ack(&mut d)?;
    let irq = activate(&mut d, &mut g)?;
    blk_io_every_queue(ctx, &mut g, &irq, 1, 1000)?;
    d.reset()?;
    Ok(Outcome::PassWith(format!(
        "refused: {}",
        refusals.join(", ")
    )))
}

/// Read the image's pattern and write+read the written pattern on every
/// queue; writes are declared to the host.
fn blk_io_every_queue(
    ctx: &Ctx,
    g: &mut Guest,
    irq: &TestInterrupt,
    nq: u16,
    first_sector: u64,
) -> anyhow::Result<()> {
    let image = ctx.dev()?.variant.name();
    for q in 0..nq {
        let fd = &irq.queues[usize::from(q)];
        let sector = first_sector + 8 * u64::from(q);
        blk_queue_roundtrip(g, fd, q, image, 7 + u64::from(q), sector, |at, len| {
            ctx.declare_write(at, len)
        })?;
    }
    Ok(())
}

/// On blk queue `q` (completions on `fd`) of a disk on the pattern image
/// `image`: read sector `lba` and check it against the pattern, write
/// 4 KiB of the written pattern at `sector` and read it back. `declare`
/// is told the write (byte offset and length) once it was handed to the
/// device, before its result is checked. Returns the bytes written.
pub(crate) fn blk_queue_roundtrip(
    g: &mut Guest,
    fd: &vmm_sys_util::eventfd::EventFd,
    q: u16,
    image: &str,
    lba: u64,
    sector: u64,
    declare: impl FnOnce(u64, u64) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; 512];
    ensure!(
        g.blk(q, T_IN, lba, &mut buf, fd)? == 0,
        "queue {q}: read failed"
    );
    ensure!(
        buf == pattern::sector(image, lba),
        "queue {q}: wrong data at {lba}"
    );
    let mut data = pattern::written(image, sector * 512, 4096);
    let written = g.blk(q, T_OUT, sector, &mut data, fd);
    declare(sector * 512, 4096)?;
    ensure!(written? == 0, "queue {q}: write failed");
    let mut back = vec![0u8; 4096];
    ensure!(
        g.blk(q, T_IN, sector, &mut back, fd)? == 0,
        "queue {q}: read back failed"
    );
    ensure!(back == data, "queue {q}: read back differs");
    Ok(data)
}

fn io_direct(ctx: &Ctx) -> CaseResult {
    let mut g = Guest::new(GUEST_RAM, 128)?;
    let (_f, mut d) = open(ctx.dev()?, &g, DeviceOptions::default())?;
    ack(&mut d)?;
    let irq = activate(&mut d, &mut g)?;
    let w = d.wiring().context("not active")?.clone();
    let nq = d.queue_max_sizes().len() as u16;
    ensure!(w.direct_kicks.len() == usize::from(nq), "kicks {w:?}");
    ensure!(!w.needs_relay(), "a relay thread runs: {w:?}");
    blk_io_every_queue(ctx, &mut g, &irq, nq, 300)?;
    ensure!(irq.triggered() == 0, "slow-path triggers used");
    d.reset()?;
    Ok(Outcome::Pass)
}

fn io_relay(ctx: &Ctx) -> CaseResult {
    let mut g = Guest::new(GUEST_RAM, 128)?;
    let opts = DeviceOptions {
        kick: KickPolicy::Relay,
        ..DeviceOptions::default()
    };
    let (_f, mut d) = open(ctx.dev()?, &g, opts)?;
    ack(&mut d)?;
    let irq = activate(&mut d, &mut g)?;
    let nq = d.queue_max_sizes().len() as u16;
    let w = d.wiring().context("not active")?.clone();
    ensure!(w.relayed_kicks.len() == usize::from(nq), "kicks {w:?}");
    blk_io_every_queue(ctx, &mut g, &irq, nq, 400)?;
    d.reset()?;
    Ok(Outcome::Pass)
}

fn io_fan_out(ctx: &Ctx) -> CaseResult {
    let mut g = Guest::new(GUEST_RAM, 128)?;
    let (_f, mut d) = open(ctx.dev()?, &g, DeviceOptions::default())?;
    ack(&mut d)?;
    let irq = activate(&mut d, &mut g)?;
    let nq = d.queue_max_sizes().len() as u16;
    let w = d.wiring().context("not active")?.clone();
    for q in 0..nq {
        ensure!(
            w.relayed_irqs.contains(&InterruptType::Queue(q)),
            "queue {q} not fanned out: {w:?}"
        );
    }
    // Each request waits on its own queue's guest eventfd, which only the
    // relay's fan-out of the shared vector raises.
    blk_io_every_queue(ctx, &mut g, &irq, nq, 100)?;
    d.reset()?;
    Ok(Outcome::Pass)
}

fn count(p: &str) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(p)?.count())
}

fn reset_cycles(ctx: &Ctx) -> CaseResult {
    let image = ctx.dev()?.variant.name();
    let mut g = Guest::new(GUEST_RAM, 64)?;
    let (f, mut d) = open(ctx.dev()?, &g, DeviceOptions::default())?;
    let maps = f.dma_mappings();
    let mut first = None;
    for i in 0..100u64 {
        ack(&mut d)?;
        let irq = activate(&mut d, &mut g).with_context(|| format!("cycle {i}"))?;
        let lba = 2000 + i;
        let mut buf = vec![0u8; 512];
        ensure!(
            g.blk(0, T_IN, lba, &mut buf, &irq.queues[0])? == 0,
            "cycle {i}"
        );
        ensure!(buf == pattern::sector(image, lba), "cycle {i}: wrong data");
        // Leave requests in flight: reset must cope with a busy device.
        let mem = g.mem.clone();
        let m = vm_memory::GuestAddressSpace::memory(&mem);
        let base = Guest::buffer(0);
        for k in 0..4u64 {
            let hdr = base + 0x1000 * (k + 1);
            let mut h = [0u8; 16];
            h[8..16].copy_from_slice(&(lba + k).to_le_bytes());
            vm_memory::Bytes::write_slice(&*m, &h, vm_memory::GuestAddress(hdr))?;
            g.rings[0].post(
                &m,
                &[
                    vdpa_testkit::driver::ring::Buf {
                        addr: hdr,
                        len: 16,
                        write: false,
                    },
                    vdpa_testkit::driver::ring::Buf {
                        addr: hdr + 512,
                        len: 512,
                        write: true,
                    },
                    vdpa_testkit::driver::ring::Buf {
                        addr: hdr + 16,
                        len: 1,
                        write: true,
                    },
                ],
            )?;
        }
        g.kicks[0].write(1)?;
        d.reset()?;
        ensure!(!d.is_active(), "cycle {i}: still active");
        let now = (
            count("/proc/self/fd")?,
            count("/proc/self/task")?,
            f.dma_mappings(),
        );
        match first {
            None => first = Some(now),
            Some(b) => ensure!(
                now == b,
                "cycle {i}: (fds, threads, maps) {now:?}, first {b:?}"
            ),
        }
    }
    ensure!(
        f.dma_mappings() == maps,
        "DMA mappings changed across cycles"
    );
    Ok(Outcome::Pass)
}

fn ppv_area(ctx: &Ctx) -> CaseResult {
    let g = Guest::new(GUEST_RAM, 64)?;
    let (_f, d) = open(ctx.dev()?, &g, DeviceOptions::default())?;
    for q in 0..d.queue_max_sizes().len() as u16 {
        let a = d
            .notification_area(q)
            .with_context(|| format!("queue {q}: none offered"))?;
        ensure!(
            a.host_addr.is_some_and(|h| h % 4096 == 0),
            "queue {q}: {a:?}"
        );
    }
    Ok(Outcome::Pass)
}

fn default_area(ctx: &Ctx) -> CaseResult {
    let g = Guest::new(GUEST_RAM, 64)?;
    let (_f, d) = open(ctx.dev()?, &g, DeviceOptions::default())?;
    for q in 0..d.queue_max_sizes().len() as u16 {
        ensure!(
            d.notification_area(q).is_none(),
            "queue {q}: a shared doorbell page offered"
        );
    }
    Ok(Outcome::Pass)
}

/// Cloud Hypervisor's notification area: queue `q` at `4 * q`, 4 KiB.
const CH_NOTIFY_MULTIPLIER: u32 = 4;
const CH_NOTIFY_LEN: u64 = 0x1000;

/// The doorbell page a VMM would map over its notification area, used the
/// way a guest vCPU uses it: each queue's request is kicked by a 16-bit
/// store of the queue index at `4 * q` in the page, never through the
/// kick eventfd; the device completes it and raises the direct irqfd.
fn doorbell_page_io(ctx: &Ctx) -> CaseResult {
    let image = ctx.dev()?.variant.name();
    let mut g = Guest::new(GUEST_RAM, 64)?;
    let (_f, mut d) = open(ctx.dev()?, &g, DeviceOptions::default())?;
    let m = d
        .guest_notify_mapping(CH_NOTIFY_MULTIPLIER, CH_NOTIFY_LEN)
        .context("doorbell page")?;
    ensure!(m.len == 0x1000 && m.host_addr % 4096 == 0, "{m:?}");
    ack(&mut d)?;
    let irq = activate(&mut d, &mut g)?;
    let nq = d.queue_max_sizes().len() as u16;
    for q in 0..nq {
        let lba = 40 + u64::from(q);
        let mut buf = vec![0u8; 512];
        let status = g.blk_with(q, T_IN, lba, &mut buf, &irq.queues[usize::from(q)], || {
            let at = m.host_addr + usize::from(q) * 4;
            // SAFETY: `m` covers `[host_addr, host_addr + 4096)` of the
            // function's BAR mapping, which lives as long as `d`; `at` is
            // 2-aligned and inside it; device memory is only accessed by
            // volatile stores, as a guest vCPU would.
            unsafe { std::ptr::write_volatile(at as *mut u16, q) };
            Ok(())
        })?;
        ensure!(status == 0, "queue {q}: status {status}");
        ensure!(
            buf == pattern::sector(image, lba),
            "queue {q}: wrong data at {lba}"
        );
    }
    d.reset()?;
    Ok(Outcome::PassWith(format!(
        "{nq} queue(s) kicked through the page"
    )))
}

/// QEMU's virtio-net with four pairs and a control queue: nine doorbells,
/// all in one page at `4 * q`. Offering its control queue, it gets no
/// mapping (the bridge records control commands, so their kicks must
/// reach it); provisioned without one, the page maps.
fn net_doorbell_page(ctx: &Ctx) -> CaseResult {
    let g = Guest::new(GUEST_RAM, 64)?;
    let (f, d) = open(ctx.dev()?, &g, DeviceOptions::default())?;
    let nq = d.queue_max_sizes().len();
    ensure!(nq == 9, "{nq} queues");
    ensure!(
        matches!(
            d.guest_notify_mapping(CH_NOTIFY_MULTIPLIER, CH_NOTIFY_LEN),
            Err(NoNotifyMapping::ControlQueue)
        ),
        "a net device with a control queue got its doorbells mapped"
    );
    // Closed (the group too) before it is opened again.
    drop(d);
    drop(f);
    const CTRL_VQ: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
    let f = Arc::new(VfioFunction::open(&ctx.dev()?.bdf).context("claim through VFIO")?);
    let vp = VpVdpa::open(
        f,
        OpenOptions {
            features_mask: Some(!CTRL_VQ),
            ..OpenOptions::default()
        },
    )?;
    let d = BridgeDevice::new(vp, g.mem.clone(), DeviceOptions::default())?;
    let m = d
        .guest_notify_mapping(CH_NOTIFY_MULTIPLIER, CH_NOTIFY_LEN)
        .context("doorbell page")?;
    ensure!(m.len == 0x1000, "{m:?}");
    // The guest of a VMM with page-per-queue doorbells would not match.
    ensure!(
        matches!(
            d.guest_notify_mapping(4096, 0x10000),
            Err(NoNotifyMapping::Layout { queue: 1, .. })
        ),
        "a page-per-queue guest layout was accepted"
    );
    Ok(Outcome::Pass)
}
