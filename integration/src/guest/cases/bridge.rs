//! The bridge on QEMU's real virtio-pci devices: `VfioFunction` +
//! `VpVdpa` + the driver harness (and the CLI), in the guest.
//!
//! Data written to a blk image is `pattern::written(image, offset, len)`
//! and declared to the host, which checks after the VM exits that the
//! image holds exactly those bytes there and the original pattern
//! everywhere else.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use vdpa_bridge::types::{features, status};
use vdpa_bridge::vfio::VfioFunction;
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_bridge::VdpaOps;
use vdpa_bridge_cli::info::ConfigInfo;
use vdpa_testkit::driver::{net, Driver, DriverOptions, KickMode};

use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::{Device, Kind, Variant};
use crate::pattern;

/// The suite.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |v: Variant, what: &str, run: fn(&Ctx) -> CaseResult| {
        out.push(Case {
            name: format!("bridge_{}_{what}", v.name()),
            needs: Some(v),
            run,
        })
    };
    for v in [
        Variant::Blk0,
        Variant::BlkMq,
        Variant::BlkPpv,
        Variant::NetUser,
        Variant::NetMq,
    ] {
        add(v, "info_matches_qemu", info_matches_qemu);
        add(v, "cli_info_json", cli_info_json);
    }
    for v in [Variant::Blk0, Variant::BlkMq, Variant::BlkPpv] {
        add(v, "io_every_queue_doorbell_kick", io_doorbell);
        add(v, "io_every_queue_eventfd_kick", io_eventfd);
    }
    add(Variant::BlkMq, "shares_two_vectors", shares_vectors);
    add(Variant::BlkPpv, "doorbell_pages_exclusive", ppv_exclusive);
    add(
        Variant::Blk0,
        "doorbell_pages_shared",
        default_not_exclusive,
    );
    add(Variant::NetUser, "arp_reply_from_slirp", net_user_arp);
    add(Variant::NetMq, "arp_on_every_queue_pair", net_mq_every_pair);
    add(Variant::Blk0, "reset_cycles_no_leak", reset_cycles_no_leak);
    add(Variant::Legacy, "legacy_refused", legacy_refused);
    add(Variant::Legacy, "cli_legacy_refused", cli_legacy_refused);
    add(Variant::Legacy, "cli_bind_moves_it_to_vfio_pci", cli_bind);
    add(
        Variant::Blk0,
        "cli_selftest_through_the_plugin",
        cli_selftest,
    );
    add(
        Variant::BlkMq,
        "cli_selftest_through_the_plugin",
        cli_selftest,
    );
    add(
        Variant::NetUser,
        "cli_selftest_through_the_plugin",
        cli_selftest,
    );
    add(
        Variant::BlkMq,
        "cli_quiet_by_default_rust_log_still_works",
        cli_log_level,
    );
    out.push(Case {
        name: "bridge_cli_list_json".to_string(),
        needs: None,
        run: cli_list,
    });
    out
}

fn open(dev: &Device) -> anyhow::Result<(Arc<VfioFunction>, VpVdpa<VfioFunction>)> {
    let f = Arc::new(VfioFunction::open(&dev.bdf).context("claim through VFIO")?);
    let d = VpVdpa::open(f.clone(), OpenOptions::default()).context("open as vDPA device")?;
    Ok((f, d))
}

fn mac_of(dev: &Device) -> Option<&str> {
    dev.qemu_device
        .split(',')
        .find_map(|p| p.strip_prefix("mac="))
}

fn image_sectors(dev: &Device) -> anyhow::Result<u64> {
    let img = dev.image.as_ref().context("blk device without an image")?;
    Ok(std::fs::metadata(img)
        .with_context(|| format!("stat {}", img.display()))?
        .len()
        / 512)
}

/// Queues QEMU gives the device: blk num-queues, net 2 per pair + ctrl,
/// the other kinds their virtqueues.
pub(crate) fn expected_queues(dev: &Device) -> u16 {
    match dev.kind {
        Kind::Net if dev.num_queues > 1 => 2 * dev.num_queues as u16 + 1,
        // QEMU's virtio-net without mq: rx, tx and the control queue.
        Kind::Net => 3,
        _ => dev.num_queues as u16,
    }
}

fn info_matches_qemu(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let (_f, mut d) = open(dev)?;
    let info = vdpa_bridge_cli::info::gather_pci(&mut d, &dev.bdf, "vfio")?;
    ensure!(
        info.vendor_id == 0x1af4,
        "subsystem vendor {:#x}",
        info.vendor_id
    );
    ensure!(
        info.msix_vectors == Some(dev.msix_vectors),
        "msix {:?}, QEMU configured {}",
        info.msix_vectors,
        dev.msix_vectors
    );
    ensure!(
        info.features.names_contain("ACCESS_PLATFORM"),
        "no ACCESS_PLATFORM offered: {:?}",
        info.features.device.names
    );
    ensure!(
        info.queues.len() == usize::from(expected_queues(dev)),
        "{} queues, want {}",
        info.queues.len(),
        expected_queues(dev)
    );
    // QEMU's data queues are 256 entries; virtio-net's control queue 64.
    let data_queues = match dev.kind {
        Kind::Net => info.queues.len() - 1,
        _ => info.queues.len(),
    };
    ensure!(
        info.queues[..data_queues].iter().all(|q| q.max_size == 256)
            && info.queues.iter().all(|q| q.max_size > 0),
        "max sizes {:?}",
        info.queues
    );
    match (&info.config, dev.kind) {
        (
            ConfigInfo::Block {
                capacity_sectors,
                num_queues,
                ..
            },
            Kind::Blk,
        ) => {
            ensure!(
                *capacity_sectors == image_sectors(dev)?,
                "capacity {capacity_sectors} sectors, image has {}",
                image_sectors(dev)?
            );
            ensure!(
                u32::from(*num_queues) == dev.num_queues,
                "num_queues {num_queues}"
            );
        }
        (
            ConfigInfo::Net {
                mac,
                max_queue_pairs,
                ..
            },
            Kind::Net,
        ) => {
            ensure!(
                mac.as_deref() == mac_of(dev),
                "mac {mac:?}, QEMU has {:?}",
                mac_of(dev)
            );
            ensure!(
                u32::from(*max_queue_pairs) == dev.num_queues.max(1),
                "max_queue_pairs {max_queue_pairs}"
            );
        }
        (c, k) => bail!("{k:?} device decoded as {c:?}"),
    }
    Ok(Outcome::Pass)
}

/// The `vdpa-bridge` binary next to this runner (same target dir).
pub(crate) fn cli() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("vdpa-bridge");
    ensure!(p.exists(), "{} not built", p.display());
    Ok(p)
}

fn cli_info_json(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let out = std::process::Command::new(cli()?)
        .args(["info", "--json", &dev.bdf])
        .output()?;
    ensure!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    for key in [
        "device_type",
        "device_id",
        "features",
        "queues",
        "msix_vectors",
        "notify",
        "config",
    ] {
        ensure!(v.get(key).is_some(), "key {key} missing: {v}");
    }
    let want = dev.kind.type_name();
    ensure!(v["device_type"] == want, "device_type {}", v["device_type"]);
    ensure!(v["emulated"] == false, "claims to be emulated");
    ensure!(
        v["msix_vectors"] == dev.msix_vectors,
        "msix {}",
        v["msix_vectors"]
    );
    ensure!(v["notify"]["multiplier"].is_u64(), "notify {}", v["notify"]);
    if dev.kind == Kind::Blk {
        ensure!(
            v["config"]["capacity_sectors"] == image_sectors(dev)?,
            "config {}",
            v["config"]
        );
    }
    Ok(Outcome::Pass)
}

/// Read the image's pattern on every queue, write new data at distinct
/// sectors per queue, read it back; the host checks the image afterwards.
/// Backend-independent: the VFIO cases and the vhost-vdpa (VDUSE) case
/// run this same code.
pub fn blk_io_on<B: VdpaOps + vdpa_bridge::DmaMapper>(
    d: &mut B,
    image: &str,
    kick: KickMode,
    first_sector: u64,
    expect_queues: u16,
) -> anyhow::Result<()> {
    let mut drv = Driver::bring_up(
        d,
        DriverOptions {
            kick,
            ..DriverOptions::default()
        },
    )?;
    let st = d.status()?;
    ensure!(
        st == status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        "status {st:#x}"
    );
    ensure!(
        drv.features & features::bit(features::ACCESS_PLATFORM) != 0,
        "ACCESS_PLATFORM not negotiated ({:#x})",
        drv.features
    );
    let nq = drv.queues.len() as u16;
    ensure!(nq == expect_queues, "{nq} queues, want {expect_queues}");
    for q in 0..nq {
        let lba = 3 + 5 * u64::from(q);
        let got = drv.blk_read(q, lba, 1024)?;
        ensure!(
            got == pattern::region(image, lba * 512, 1024),
            "queue {q}: sectors {lba}.. do not hold the image's pattern"
        );
        let sector = first_sector + 4 * u64::from(q);
        let data = pattern::written(image, sector * 512, 2048);
        let written = drv.blk_write(q, sector, &data);
        crate::guest::declare_write_to(image, sector * 512, 2048);
        written?;
        let back = drv.blk_read(q, sector, 2048)?;
        ensure!(
            back == data,
            "queue {q}: read back differs from what was written"
        );
    }
    drv.blk_flush(0)?;
    drv.release(d)?;
    Ok(())
}

fn blk_io(ctx: &Ctx, kick: KickMode, first_sector: u64) -> CaseResult {
    let dev = ctx.dev()?;
    let (_f, mut d) = open(dev)?;
    blk_io_on(
        &mut d,
        dev.variant.name(),
        kick,
        first_sector,
        dev.num_queues as u16,
    )?;
    Ok(Outcome::Pass)
}

fn io_doorbell(ctx: &Ctx) -> CaseResult {
    blk_io(ctx, KickMode::Doorbell, 100)
}

fn io_eventfd(ctx: &Ctx) -> CaseResult {
    blk_io(ctx, KickMode::EventFd, 200)
}

fn shares_vectors(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let (_f, d) = open(dev)?;
    let plan = d.irq_plan();
    ensure!(plan.is_shared(), "plan not shared: {plan:?}");
    ensure!(plan.groups.len() == 2, "{} vectors used", plan.groups.len());
    let q = plan
        .groups
        .iter()
        .find(|g| !g.config)
        .context("no queue vector")?;
    ensure!(q.queues.len() == 4, "queue vector serves {:?}", q.queues);
    // The I/O cases on this device ran with this plan; completions on all
    // four queues came through the one shared vector.
    Ok(Outcome::Pass)
}

fn notify_exclusive(ctx: &Ctx) -> anyhow::Result<Vec<bool>> {
    let (_f, d) = open(ctx.dev()?)?;
    (0..d.num_queues())
        .map(|q| {
            d.notification_area(vdpa_bridge::QueueIndex(q))
                .map(|a| a.page_exclusive && a.host_addr.is_some())
                .map_err(Into::into)
        })
        .collect()
}

fn ppv_exclusive(ctx: &Ctx) -> CaseResult {
    let ex = notify_exclusive(ctx)?;
    ensure!(
        ex.iter().all(|&e| e),
        "page-per-vq doorbells not exclusive: {ex:?}"
    );
    Ok(Outcome::Pass)
}

fn default_not_exclusive(ctx: &Ctx) -> CaseResult {
    let ex = notify_exclusive(ctx)?;
    ensure!(
        ex.iter().all(|&e| !e),
        "default layout shares the notify page, yet reported exclusive: {ex:?}"
    );
    Ok(Outcome::Pass)
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| anyhow::anyhow!("bad mac {s}"))
}

fn arp_exchange(
    drv: &mut Driver,
    pair: u16,
    pairs: u16,
    mac: [u8; 6],
    me: [u8; 4],
    peer: [u8; 4],
) -> anyhow::Result<[u8; 6]> {
    let req = net::arp_request(mac, me, peer);
    for _ in 0..10 {
        drv.net_send(pair, &req)?;
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while std::time::Instant::now() < deadline {
            if let Some((_, f)) = drv.net_recv(pairs, Duration::from_millis(100))? {
                if let Some(m) = net::parse_arp_reply(&f, peer) {
                    return Ok(m);
                }
            }
        }
    }
    bail!("pair {pair}: no ARP reply from {peer:?}")
}

fn net_user_arp(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let mac = parse_mac(mac_of(dev).context("no mac")?)?;
    let (_f, mut d) = open(dev)?;
    let mut drv = Driver::bring_up(
        &mut d,
        DriverOptions {
            queues: Some(2),
            extra_features: features::bit(net::F_MAC),
            ..DriverOptions::default()
        },
    )?;
    drv.net_fill_rx(0)?;
    let peer = arp_exchange(&mut drv, 0, 1, mac, [10, 0, 2, 15], [10, 0, 2, 2])?;
    ensure!(
        peer != [0; 6] && peer != [0xff; 6],
        "reply names MAC {peer:02x?}"
    );
    drv.release(&mut d)?;
    Ok(Outcome::Pass)
}

fn net_mq_every_pair(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let mac = parse_mac(mac_of(dev).context("no mac")?)?;
    let pairs = dev.num_queues as u16;
    let (_f, mut d) = open(dev)?;
    let mut drv = Driver::bring_up(
        &mut d,
        DriverOptions {
            extra_features: features::bit(net::F_MAC)
                | features::bit(net::F_CTRL_VQ)
                | features::bit(net::F_MQ),
            ..DriverOptions::default()
        },
    )?;
    ensure!(
        drv.features & features::bit(net::F_MQ) != 0,
        "MQ not negotiated ({:#x})",
        drv.features
    );
    drv.net_set_pairs(2 * pairs, pairs)?;
    for p in 0..pairs {
        drv.net_fill_rx(p)?;
    }
    for p in 0..pairs {
        // Each pair's transmit queue carries its own request; the tap
        // answers on whichever receive queue its flow hash picks.
        let me = [10, 99, 0, 10 + p as u8];
        arp_exchange(&mut drv, p, pairs, mac, me, [10, 99, 0, 1])
            .with_context(|| format!("queue pair {p}"))?;
    }
    drv.release(&mut d)?;
    Ok(Outcome::Pass)
}

/// A number of `/proc/<pid>/status` (`pid` may be `self`), by its key
/// (`VmLck:`, `Threads:`): KiB for the memory lines.
pub(crate) fn proc_status(pid: &str, key: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("{key} not in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

fn count_dir(p: &str) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(p)?.count())
}

/// MSI-X interrupt lines vfio-pci registered for `bdf`.
fn vfio_irqs(bdf: &str) -> anyhow::Result<usize> {
    let s = std::fs::read_to_string("/proc/interrupts")?;
    Ok(s.lines()
        .filter(|l| l.contains("vfio-msix") && l.contains(bdf))
        .count())
}

#[derive(Debug, PartialEq, Eq)]
struct Resources {
    fds: usize,
    threads: usize,
    vm_pin_kb: u64,
    vm_lck_kb: u64,
    irqs: usize,
}

fn resources(bdf: &str) -> anyhow::Result<Resources> {
    Ok(Resources {
        fds: count_dir("/proc/self/fd")?,
        threads: count_dir("/proc/self/task")?,
        vm_pin_kb: proc_status("self", "VmPin:")?,
        vm_lck_kb: proc_status("self", "VmLck:")?,
        irqs: vfio_irqs(bdf)?,
    })
}

fn reset_cycles_no_leak(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let image = dev.variant.name();
    let (f, mut d) = open(dev)?;
    let mut first = None;
    for i in 0..100u64 {
        let mut drv = Driver::bring_up(
            &mut d,
            DriverOptions {
                kick: if i % 2 == 0 {
                    KickMode::EventFd
                } else {
                    KickMode::Doorbell
                },
                ..DriverOptions::default()
            },
        )
        .with_context(|| format!("cycle {i}"))?;
        let lba = 1000 + (i % 50);
        let got = drv.blk_read(0, lba, 512)?;
        ensure!(got == pattern::sector(image, lba), "cycle {i}: wrong data");
        drv.release(&mut d)?;
        ensure!(
            f.dma_mappings() == 0,
            "cycle {i}: {} DMA mappings left",
            f.dma_mappings()
        );
        let r = resources(&dev.bdf)?;
        match &first {
            None => first = Some(r),
            Some(b) => ensure!(&r == b, "cycle {i}: {r:?}, after the first {b:?}"),
        }
    }
    drop(d);
    drop(f);
    let after = resources(&dev.bdf)?;
    ensure!(
        after.irqs == 0,
        "{} MSI-X lines still registered after close",
        after.irqs
    );
    ensure!(
        after.vm_pin_kb == 0 && after.vm_lck_kb == 0,
        "pinned memory left: {after:?}"
    );
    Ok(Outcome::Pass)
}

fn legacy_refused(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let f = Arc::new(VfioFunction::open(&dev.bdf)?);
    match VpVdpa::open(f, OpenOptions::default()) {
        Ok(_) => bail!("a legacy-only device was accepted"),
        Err(e) => {
            let msg = format!("{e:#}").to_lowercase() + &format!("{e:?}").to_lowercase();
            ensure!(msg.contains("legacy"), "unclear error: {e:#}");
        }
    }
    Ok(Outcome::Pass)
}

fn cli_legacy_refused(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let out = std::process::Command::new(cli()?)
        .args(["info", &dev.bdf])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "exit status 0 for a legacy device");
    ensure!(err.to_lowercase().contains("legacy"), "stderr: {err}");
    Ok(Outcome::Pass)
}

fn cli_list(ctx: &Ctx) -> CaseResult {
    let out = std::process::Command::new(cli()?)
        .args(["list", "--json"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pci = v["pci"].as_array().context("no pci list")?;
    for dev in &ctx.manifest.devices {
        let e = pci
            .iter()
            .find(|e| e["address"] == dev.bdf.as_str())
            .with_context(|| format!("{} not listed", dev.bdf))?;
        ensure!(e["driver"] == "vfio-pci", "{}: {e}", dev.bdf);
        ensure!(e["modern"] == !dev.legacy, "{}: {e}", dev.bdf);
        ensure!(e["iommu_group"].is_u64(), "{}: {e}", dev.bdf);
        ensure!(e["device"] == dev.pci_device_id(), "{}: {e}", dev.bdf);
        ensure!(
            e["virtio_type"] == dev.kind.type_name(),
            "{}: type {}, want {}",
            dev.bdf,
            e["virtio_type"],
            dev.kind.type_name()
        );
    }
    // The 9p share of the host's root: a transitional virtio-9p-pci, named
    // from its subsystem id.
    let share = format!("0000:00:{:02x}.0", crate::host::devices::HOSTROOT_SLOT);
    let e = pci
        .iter()
        .find(|e| e["address"] == share.as_str())
        .with_context(|| format!("{share} (9p share) not listed"))?;
    ensure!(e["virtio_type"] == "9p", "{share}: {e}");
    Ok(Outcome::Pass)
}

/// At the default log level (and at `RUST_LOG=warn`) opening a device
/// prints no warning at all: the bridge asks VFIO only for the IRQ indices
/// it uses (vfio-ioctls, which it used to open devices with, warned about
/// the error-reporting index an integrated endpoint on pcie.0 lacks). With
/// `RUST_LOG=info` the same command logs the open, naming the group and
/// the container: so `RUST_LOG` rules, and the quiet runs prove something.
fn cli_log_level(ctx: &Ctx) -> CaseResult {
    use crate::guest::cases::types::run_cli;
    let dev = ctx.dev()?;
    let quiet = run_cli(&["info", &dev.bdf], None)?;
    let warn = run_cli(&["info", &dev.bdf], Some("warn"))?;
    let loud = run_cli(&["info", &dev.bdf], Some("info"))?;
    ensure!(
        quiet.status.success() && warn.status.success() && loud.status.success(),
        "exit {} / {} / {}: {}{}{}",
        quiet.status,
        warn.status,
        loud.status,
        quiet.stderr,
        warn.stderr,
        loud.stderr
    );
    for (level, r) in [("default", &quiet), ("warn", &warn)] {
        ensure!(
            !r.stderr.contains("WARN") && !r.stderr.contains("vfio_ioctls"),
            "{level} level printed a warning: {}",
            r.stderr
        );
    }
    let opened = format!("{}: opened (group ", dev.bdf);
    ensure!(
        loud.stderr.contains(&opened) && loud.stderr.contains("container of 1 function(s)"),
        "RUST_LOG=info shows no {opened:?} line: {}",
        loud.stderr
    );
    Ok(Outcome::Pass)
}

/// Take the device off vfio-pci (no driver then: the guest has no
/// virtio-pci module), and let `vdpa-bridge bind` put it back.
fn cli_bind(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let sys = dev.sysfs();
    std::fs::write(sys.join("driver/unbind"), &dev.bdf)?;
    std::fs::write(sys.join("driver_override"), "\n")?;
    ensure!(!sys.join("driver").exists(), "still bound after unbind");
    let out = std::process::Command::new(cli()?)
        .args(["bind", &dev.bdf])
        .output()?;
    ensure!(
        out.status.success(),
        "bind: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drv = std::fs::read_link(sys.join("driver"))?;
    ensure!(drv.ends_with("vfio-pci"), "bound to {}", drv.display());
    Ok(Outcome::Pass)
}

/// `vdpa-bridge selftest <device> --json`: bring-up through the plugin and
/// real I/O (blk: every queue read, a sector written and restored; net:
/// ARP for 10.0.2.2), with kicks handed to the kernel.
fn cli_selftest(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let out = std::process::Command::new(cli()?)
        .args(["selftest", "--json", "--allow-write", &dev.bdf])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("no JSON report: {}", String::from_utf8_lossy(&out.stderr)))?;
    ensure!(out.status.success(), "selftest failed: {v}");
    ensure!(
        v["failed"] == 0 && v["passed"].as_u64().unwrap_or(0) >= 1,
        "{v}"
    );
    let w = v["wiring"].as_str().unwrap_or_default();
    ensure!(w.contains("relayed_kicks: []"), "kicks relayed: {w}");
    Ok(Outcome::PassWith(format!("{} checks passed", v["passed"])))
}
