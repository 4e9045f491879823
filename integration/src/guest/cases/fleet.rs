//! Many bridged devices in one VMM: the fleet (`host::devices::fleet`,
//! 16 of QEMU's virtio-blk devices with two queues each, every one behind
//! a `pcie-root-port` of its own, each in its own IOMMU group).
//!
//! * `fleet_functions_share_one_vfio_container`: the plugin opens every
//!   disk into one [`SharedContainer`] over one guest memory, as Cloud
//!   Hypervisor does for one VM. Guest RAM is mapped once (one kernel
//!   mapping, the process's VmLck grows by guest RAM once), where two
//!   private containers charge it twice (measured side by side in the same
//!   case, so the case fails if sharing stops working). Every disk reads
//!   its own pattern and writes on both queues; the writes are read back
//!   through the device and from the image file as the host holds it. A
//!   second open of a disk already open in the container is refused.
//!   Closing disks one by one (the first opened first) leaves the others'
//!   mapping and I/O alone; the last close unmaps it and VmLck returns to
//!   where it was. The same container then takes two disks on shadow rings
//!   from the start: one window each above guest RAM, I/O on both.
//! * `fleet_startup_cost_against_the_kernels_virtio_pci_probe`: where the
//!   time goes from open to DRIVER_OK on one fleet disk (VFIO open, the
//!   virtio transport's bring-up, DMA mapping of guest RAM, activation),
//!   median of 10, against the kernel's own virtio-pci probe of the same
//!   device (bound to virtio-pci 10 times, with virtio_blk not loaded, so
//!   the probe is the transport's alone); and what a second reset on open
//!   (the bridge's own FLR after vfio-pci's) would cost.
//! * `ch_fleet_16_bridged_disks_guest_ram_pinned_once` (needs
//!   `CLOUD_HYPERVISOR`): Cloud Hypervisor, default seccomp and
//!   `--landlock`, with all 16 bridged (`--vdpa path=<bdf>,num_queues=2`);
//!   the inner guest reads each disk's pattern and writes its sector 8,
//!   which the lab then finds in each image file; Cloud Hypervisor's VmLck
//!   is the inner guest's RAM once.
//! * benchmark `fleet_bench_bridged_vs_passthrough` (`VDPA_LAB_BENCH=1`):
//!   1, 4 and 16 disks, bridged and through Cloud Hypervisor's own
//!   `--device` passthrough, boots alternating (`VDPA_FLEET_BOOTS`, 5 by
//!   default, for 16 disks; at most 3 for 1 and 4), both without `--landlock` (passthrough fails under it in
//!   this lab): time from the VMM's start to the inner guest's /init, one
//!   hot-plug add (the last disk removed, then added again: the VMM's part,
//!   from its log line of the request to the reply, and the whole
//!   `ch-remote` command), VmLck, fds and threads of the VMM; medians,
//!   min-max and the bridged/passthrough ratios (`VDPA_FLEET_SIZES=16`:
//!   only that row).

use std::os::unix::fs::FileExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use vdpa_bridge::types::features;
use vdpa_bridge::vfio::{SharedContainer, VfioFunction, VfioOptions};
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_plugin::{BridgeDevice, DeviceOptions, ShadowPolicy};
use vdpa_testkit::harness::{Guest, Mem, TestInterrupt};
use vm_memory::GuestMemoryAtomic;

use crate::guest::cases::bridge::proc_status;
use crate::guest::cases::plugin::blk_queue_roundtrip;
use crate::guest::ch::{not_configured, passthrough_arg, Ch, Vdpa, BOOT_TIMEOUT};
use crate::guest::{sys, Case, CaseResult, Ctx, Outcome};
use crate::manifest::{ChRun, FleetEntry};
use crate::pattern;

/// The suite.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "fleet_functions_share_one_vfio_container".to_string(),
            needs: None,
            run: shared_container,
        },
        Case {
            name: "fleet_startup_cost_against_the_kernels_virtio_pci_probe".to_string(),
            needs: None,
            run: startup_cost,
        },
        Case {
            name: "ch_fleet_16_bridged_disks_guest_ram_pinned_once".to_string(),
            needs: None,
            run: ch_fleet,
        },
    ]
}

/// The benchmarks.
pub fn benchmarks() -> Vec<Case> {
    vec![Case {
        name: "fleet_bench_bridged_vs_passthrough".to_string(),
        needs: None,
        run: bench,
    }]
}

/// Bind `bdf` to virtio-pci (no virtio driver loaded for its type: the
/// probe stops after the transport), time it, and unbind it again.
fn kernel_probe(bdf: &str) -> anyhow::Result<Duration> {
    let dev = std::path::Path::new("/sys/bus/pci/devices").join(bdf);
    if let Some(d) = sys::driver(&dev) {
        std::fs::write(dev.join("driver/unbind"), bdf)
            .with_context(|| format!("unbind from {d}"))?;
    }
    std::fs::write(dev.join("driver_override"), "virtio-pci")?;
    let t = Instant::now();
    std::fs::write("/sys/bus/pci/drivers/virtio-pci/bind", bdf).context("bind to virtio-pci")?;
    let took = t.elapsed();
    ensure!(
        sys::driver(&dev).as_deref() == Some("virtio-pci"),
        "{bdf} is bound to {:?} after the bind",
        sys::driver(&dev)
    );
    std::fs::write(dev.join("driver/unbind"), bdf)?;
    Ok(took)
}

/// Phases of one bring-up through the bridge, in order.
const PHASES: [&str; 5] = ["VFIO open", "transport", "DMA map", "activation", "total"];

/// One bring-up of `entry` with `reset_on_open`: the time of each of
/// [`PHASES`].
fn bridge_bringup(
    entry: &FleetEntry,
    mem: &GuestMemoryAtomic<Mem>,
    reset_on_open: bool,
) -> anyhow::Result<[Duration; 5]> {
    let t0 = Instant::now();
    let f = VfioFunction::open_with(
        &entry.bdf,
        &VfioOptions {
            reset_on_open,
            ..VfioOptions::default()
        },
    )?;
    let t1 = Instant::now();
    let vp = VpVdpa::open(Arc::new(f), OpenOptions::default())?;
    let t2 = Instant::now();
    let mut dev = BridgeDevice::new(vp, mem.clone(), DeviceOptions::default())?;
    let t3 = Instant::now();
    let want = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM);
    dev.ack_features(want)?;
    let mut guest = Guest::sharing(mem.clone(), 64, 0);
    let irq = TestInterrupt::new(dev.queue_max_sizes().len(), true)?;
    let queues = guest.queues_sized(dev.queue_max_sizes())?;
    dev.activate(mem.clone(), irq.clone(), queues)?;
    let t4 = Instant::now();
    drop(dev);
    Ok([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0])
}

fn startup_cost(ctx: &Ctx) -> CaseResult {
    let Some(fleet) = bind_fleet(ctx)? else {
        return Ok(Outcome::Skip("the manifest has no fleet".into()));
    };
    let entry = &fleet[0];
    const RUNS: usize = 10;
    let mut kernel = Vec::new();
    for _ in 0..RUNS {
        kernel.push(kernel_probe(&entry.bdf)?);
    }
    sys::bind_vfio_pci(&entry.bdf)?;
    let mem = Guest::new(Guest::span(2).next_multiple_of(1 << 20), 64)?.mem;
    let mut ours: [Vec<Duration>; 5] = Default::default();
    let mut double_reset = Vec::new();
    for _ in 0..RUNS {
        let p = bridge_bringup(entry, &mem, false)?;
        for (v, d) in ours.iter_mut().zip(p) {
            v.push(d);
        }
        double_reset.push(bridge_bringup(entry, &mem, true)?[0]);
    }
    let med = |v: &Vec<Duration>| median_min_max(v.clone()).map(|m| m.0).unwrap_or_default();
    let kernel_med = med(&kernel);
    let phases: Vec<String> = PHASES
        .iter()
        .zip(&ours)
        .map(|(name, v)| format!("{name} {:?}", med(v)))
        .collect();
    let bring_up = med(&ours[4]).saturating_sub(med(&ours[2]));
    let ratio = bring_up.as_secs_f64() / kernel_med.as_secs_f64().max(1e-9);
    eprintln!(
        "FLEET-STARTUP kernel_probe_us {} bridge_us {} (without DMA map {}) vfio_open_us {} \
         vfio_open_with_second_reset_us {}",
        kernel_med.as_micros(),
        med(&ours[4]).as_micros(),
        bring_up.as_micros(),
        med(&ours[0]).as_micros(),
        med(&double_reset).as_micros()
    );
    // What the bridge itself does (the virtio transport and the
    // activation), apart from vfio-pci's open (with its function reset,
    // which Cloud Hypervisor's passthrough pays too) and the DMA map.
    let own = med(&ours[1]) + med(&ours[3]);
    Ok(Outcome::PassWith(format!(
        "{} (medians of {RUNS}): {}; without the DMA map {bring_up:?}, {ratio:.2}x the kernel's \
         virtio-pci probe ({kernel_med:?}, min-max {:?}-{:?}); the bridge's own part (transport \
         and activation) {own:?}, {:.2}x the probe; a second reset on open would make the VFIO \
         open {:?}",
        entry.name,
        phases.join(", "),
        median_min_max(kernel.clone())
            .map(|m| m.1)
            .unwrap_or_default(),
        median_min_max(kernel).map(|m| m.2).unwrap_or_default(),
        own.as_secs_f64() / kernel_med.as_secs_f64().max(1e-9),
        med(&double_reset)
    )))
}

/// The inner guest's RAM (`Ch`'s `--memory size=512M`), in KiB.
pub(crate) const INNER_RAM_KIB: u64 = 512 << 10;

/// What one boot of Cloud Hypervisor with fleet disks gave.
#[derive(Clone, Debug)]
struct FleetBoot {
    /// From the VMM's start to the inner guest's /init (`L3-UP`).
    init: Duration,
    /// Disks the inner guest read and wrote correctly, of those it saw.
    ok: (usize, usize),
    vmlck_kib: u64,
    fds: usize,
    /// The VMM's fds by what they are (`anon_inode:[eventfd]`,
    /// `/dev/vfio/<n>`, ...), for the per-device cost.
    fd_kinds: std::collections::BTreeMap<String, usize>,
    threads: u64,
    /// One `ch-remote add-*` of the last disk (after removing it): the
    /// whole command, and the VMM's part (its log line of the request to
    /// the reply).
    hotplug: Option<(Duration, Duration)>,
}

/// Boot Cloud Hypervisor with `disks` bridged (or passed through), let
/// the inner guest check every disk, read the VMM's VmLck, fds and
/// threads while it holds, and (with `hotplug`) remove the last disk and
/// time adding it again.
fn boot_fleet(
    lab: &ChRun,
    disks: &[FleetEntry],
    bridged: bool,
    landlock: bool,
    hotplug: bool,
) -> anyhow::Result<FleetBoot> {
    let mut ch = Ch::new(lab, "fleet")
        .cmdline(&format!("l3.disks={}", disks.len()))
        .cmdline(if hotplug { "l3.secs=15" } else { "l3.secs=2" })
        .possible_cpus(2);
    if !landlock {
        ch = ch.without_landlock();
    }
    if hotplug {
        ch = ch.api();
    }
    for e in disks {
        ch = if bridged {
            ch.vdpa(&Vdpa::new(&e.bdf, 2).id(&e.name))
        } else {
            ch.passthrough_named(&e.bdf, &e.name)
        };
    }
    let mut vm = ch.start()?;
    vm.wait("L3-FLEET-HOLD", BOOT_TIMEOUT)
        .with_context(|| format!("the inner guest did not finish its disks: {}", vm.tail()))?;
    let pid = vm.pid().to_string();
    let vmlck_kib = vmlck_kib(&pid)?;
    let mut fd_kinds = std::collections::BTreeMap::new();
    let mut fds = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        fds += 1;
        let target = std::fs::read_link(e?.path())
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        // Group by kind: every /dev/vfio/<group> as one, sockets, pipes.
        let kind = match target.split_once(':') {
            Some((k, _)) if k == "socket" || k == "pipe" => k.to_string(),
            _ if target.starts_with("/dev/vfio/") && target != "/dev/vfio/vfio" => {
                "/dev/vfio/<group>".to_string()
            }
            _ => target,
        };
        *fd_kinds.entry(kind).or_insert(0) += 1;
    }
    let threads = proc_status(&pid, "Threads:")?;
    let hotplug = match (hotplug, disks.last()) {
        (true, Some(last)) => {
            vm.remote(&["remove-device", &last.name])?;
            // The guest acknowledges the eject; the VMM then closes the
            // device (vfio-pci resets it on the last close).
            std::thread::sleep(Duration::from_secs(3));
            let arg = if bridged {
                Vdpa::new(&last.bdf, 2).id(&last.name).arg()
            } else {
                passthrough_arg(&last.bdf, Some(&last.name))
            };
            let t = Instant::now();
            vm.remote(&[if bridged { "add-vdpa" } else { "add-device" }, &arg])?;
            let done = Instant::now();
            // The VMM's own part: from its log line of the API request to
            // the reply (without ch-remote's start and connect).
            std::thread::sleep(Duration::from_millis(200));
            vm.pump();
            let asked = vm
                .stamped(if bridged { "VmAddVdpa" } else { "VmAddDevice" })
                .last()
                .map(|(at, _)| *at)
                .context("no API request line for the add")?;
            Some((done - t, done.saturating_duration_since(asked)))
        }
        _ => None,
    };
    vm.wait_done()?;
    let line = vm
        .line("L3-FLEET-DONE")
        .context("no L3-FLEET-DONE line")?
        .to_string();
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let ok = match nums[..] {
        [.., ok, n] => (ok, n),
        _ => anyhow::bail!("cannot read {line:?}"),
    };
    let init = vm.after_start("L3-UP").context("no L3-UP line")?;
    Ok(FleetBoot {
        init,
        ok,
        vmlck_kib,
        fds,
        fd_kinds,
        threads,
        hotplug,
    })
}

/// Each disk's image holds the inner guest's sector-8 write.
pub(crate) fn images_hold_the_writes(disks: &[FleetEntry]) -> anyhow::Result<()> {
    for e in disks {
        let f = std::fs::File::open(&e.image)?;
        let mut got = vec![0u8; 512];
        f.read_exact_at(&mut got, 8 * 512)?;
        ensure!(
            got == pattern::written(&e.name, 8 * 512, 512),
            "{}: the image does not hold the inner guest's sector-8 write",
            e.name
        );
    }
    Ok(())
}

fn ch_fleet(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let Some(fleet) = bind_fleet(ctx)? else {
        return Ok(Outcome::Skip("the manifest has no fleet".into()));
    };
    let b = boot_fleet(lab, fleet, true, true, false)?;
    ensure!(
        b.ok == (fleet.len(), fleet.len()),
        "the inner guest checked {} of {} disks correctly ({} expected)",
        b.ok.0,
        b.ok.1,
        fleet.len()
    );
    images_hold_the_writes(fleet)?;
    ensure!(
        (INNER_RAM_KIB..INNER_RAM_KIB + (16 << 10)).contains(&b.vmlck_kib),
        "Cloud Hypervisor's VmLck is {} KiB with {} bridged disks; the inner guest's RAM is {INNER_RAM_KIB} KiB",
        b.vmlck_kib,
        fleet.len()
    );
    Ok(Outcome::PassWith(format!(
        "{} disks read and written (images checked); VmLck {} KiB (guest RAM {INNER_RAM_KIB} KiB); \
         /init {:?} after the start; {} fds ({:?}), {} threads",
        fleet.len(),
        b.vmlck_kib,
        b.init,
        b.fds,
        b.fd_kinds,
        b.threads
    )))
}

/// One number of a boot.
type Measure = dyn Fn(&FleetBoot) -> u64;

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn median_min_max<T: Copy + Ord>(mut v: Vec<T>) -> Option<(T, T, T)> {
    v.sort();
    Some((*v.get(v.len() / 2)?, *v.first()?, *v.last()?))
}

fn bench(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    if lab.remote.is_none() {
        return Ok(Outcome::Skip("CH_REMOTE is not set".into()));
    }
    let Some(fleet) = bind_fleet(ctx)? else {
        return Ok(Outcome::Skip("the manifest has no fleet".into()));
    };
    let boots = ctx.manifest.fleet_bench.boots.unwrap_or(5).max(1);
    let mut report = Vec::new();
    // VDPA_FLEET_SIZES=16 (say): only those rows of the table.
    let sizes: Vec<usize> = match &ctx.manifest.fleet_bench.sizes {
        Some(v) => v
            .iter()
            .copied()
            .filter(|&n| (1..=fleet.len()).contains(&n))
            .collect(),
        None => vec![1, 4, fleet.len()],
    };
    for n in sizes {
        let disks = &fleet[..n];
        let mut runs: [Vec<FleetBoot>; 2] = [Vec::new(), Vec::new()];
        // The full fleet gets every boot; the smaller rows of the table
        // at most 3 each (the lab's time).
        let boots = if n == fleet.len() {
            boots
        } else {
            boots.min(3)
        };
        for round in 0..boots {
            // Alternating, and which goes first alternates too.
            let order = if round % 2 == 0 {
                [(0, true), (1, false)]
            } else {
                [(1, false), (0, true)]
            };
            for (i, bridged) in order {
                let b = boot_fleet(lab, disks, bridged, false, true)?;
                ensure!(
                    b.ok == (n, n),
                    "{n} disks {}: the inner guest checked {:?}",
                    if bridged { "bridged" } else { "passed through" },
                    b.ok
                );
                runs[i].push(b);
            }
        }
        images_hold_the_writes(disks)?;
        let stat = |i: usize, f: &Measure| {
            median_min_max(runs[i].iter().map(f).collect()).unwrap_or_default()
        };
        let rows: [(&str, &Measure); 6] = [
            ("init_ms", &|b| ms(b.init)),
            ("hotplug_vmm_ms", &|b| b.hotplug.map_or(0, |h| ms(h.1))),
            ("hotplug_cmd_ms", &|b| b.hotplug.map_or(0, |h| ms(h.0))),
            ("vmlck_kib", &|b| b.vmlck_kib),
            ("fds", &|b| b.fds as u64),
            ("threads", &|b| b.threads),
        ];
        for (what, f) in rows {
            let (bm, blo, bhi) = stat(0, f);
            let (pm, plo, phi) = stat(1, f);
            let ratio = if pm == 0 { 0.0 } else { bm as f64 / pm as f64 };
            let line = format!(
                "{n} disks {what}: bridged {bm} ({blo}-{bhi}), passthrough {pm} ({plo}-{phi}), ratio {ratio:.2}"
            );
            eprintln!("FLEET-BENCH {line}");
            report.push(line);
        }
        let kinds = |i: usize| {
            runs[i]
                .last()
                .map(|b| b.fd_kinds.clone())
                .unwrap_or_default()
        };
        let line = format!(
            "{n} disks fd kinds: bridged {:?}, passthrough {:?}",
            kinds(0),
            kinds(1)
        );
        eprintln!("FLEET-BENCH {line}");
        report.push(line);
    }
    Ok(Outcome::PassWith(report.join("; ")))
}

type Dev = BridgeDevice<VpVdpa<VfioFunction>, Mem>;

/// One bridged disk of the fleet, as the case drives it.
struct Disk<'a> {
    entry: &'a FleetEntry,
    dev: Dev,
    guest: Guest,
    irq: Arc<TestInterrupt>,
}

/// The process's locked memory (`VmLck`, KiB): what VFIO type1 charges
/// for pinned pages.
fn vmlck_kib(pid: &str) -> anyhow::Result<u64> {
    proc_status(pid, "VmLck:")
}

/// Bind every fleet disk to vfio-pci; `None` (a skip) without a fleet.
pub(crate) fn bind_fleet<'m>(ctx: &Ctx<'m>) -> anyhow::Result<Option<&'m [FleetEntry]>> {
    let fleet = &ctx.manifest.fleet;
    if fleet.is_empty() {
        return Ok(None);
    }
    for d in fleet {
        sys::bind_vfio_pci(&d.bdf).with_context(|| format!("bind {}", d.name))?;
    }
    Ok(Some(fleet))
}

fn open<'e>(
    entry: &'e FleetEntry,
    container: Option<&SharedContainer>,
    mem: &GuestMemoryAtomic<Mem>,
    base: u64,
) -> anyhow::Result<Disk<'e>> {
    open_with(entry, container, mem, base, DeviceOptions::default())
}

fn open_with<'e>(
    entry: &'e FleetEntry,
    container: Option<&SharedContainer>,
    mem: &GuestMemoryAtomic<Mem>,
    base: u64,
    opts: DeviceOptions,
) -> anyhow::Result<Disk<'e>> {
    let f = match container {
        Some(c) => VfioFunction::open_in(&entry.bdf, c, &VfioOptions::default()),
        None => VfioFunction::open(&entry.bdf),
    }
    .with_context(|| format!("claim {} ({})", entry.name, entry.bdf))?;
    let vp = VpVdpa::open(Arc::new(f), OpenOptions::default())?;
    let mut dev = BridgeDevice::new(vp, mem.clone(), opts)?;
    let want = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM);
    ensure!(
        dev.features() & want == want,
        "{}: lacks {want:#x}",
        entry.name
    );
    dev.ack_features(want)?;
    let mut guest = Guest::sharing(mem.clone(), 64, base);
    let n = dev.queue_max_sizes().len();
    let irq = TestInterrupt::new(n, true)?;
    let queues = guest.queues_sized(dev.queue_max_sizes())?;
    dev.activate(mem.clone(), irq.clone(), queues)?;
    Ok(Disk {
        entry,
        dev,
        guest,
        irq,
    })
}

/// Read the disk's pattern and write (then read back) a block on every
/// queue, at `sector + 8 * q`; the writes are checked in the image file
/// too (QEMU writes through to it; the lab guest sees the host's file).
fn io(disk: &mut Disk<'_>, sector: u64) -> anyhow::Result<()> {
    let name = &disk.entry.name;
    let nq = disk.dev.queue_max_sizes().len() as u16;
    ensure!(nq == 2, "{name}: {nq} queues, QEMU was given 2");
    let image = std::fs::File::open(&disk.entry.image)
        .with_context(|| format!("open {}", disk.entry.image.display()))?;
    for q in 0..nq {
        let fd = &disk.irq.queues[usize::from(q)];
        let at = sector + 8 * u64::from(q);
        let data = blk_queue_roundtrip(
            &mut disk.guest,
            fd,
            q,
            name,
            1 + u64::from(q),
            at,
            |_, _| Ok(()),
        )
        .with_context(|| name.clone())?;
        let mut file = vec![0u8; 4096];
        image.read_exact_at(&mut file, at * 512)?;
        ensure!(
            file == data,
            "{name} queue {q}: the image file does not hold the write at sector {at}"
        );
    }
    Ok(())
}

fn shared_container(ctx: &Ctx) -> CaseResult {
    let Some(fleet) = bind_fleet(ctx)? else {
        return Ok(Outcome::Skip("the manifest has no fleet".into()));
    };
    ensure!(fleet.len() >= 2, "a fleet of {}", fleet.len());
    let span = Guest::span(2).next_multiple_of(1 << 20);
    let ram = span * fleet.len() as u64;
    let mem = Guest::new(ram, 64)?.mem;
    let before = vmlck_kib("self")?;

    // Side by side: two disks, each in a container of its own.
    let private_kib = {
        let mut a = open(&fleet[0], None, &mem, 0)?;
        let mut b = open(&fleet[1], None, &mem, span)?;
        io(&mut a, 64)?;
        io(&mut b, 64)?;
        vmlck_kib("self")? - before
    };
    ensure!(
        vmlck_kib("self")? == before,
        "VmLck {} KiB after closing the private containers, {before} KiB before",
        vmlck_kib("self")?
    );

    // All of them in one container.
    let container = SharedContainer::new()?;
    let t = Instant::now();
    let mut disks = Vec::new();
    for (i, e) in fleet.iter().enumerate() {
        disks.push(open(e, Some(&container), &mem, i as u64 * span)?);
    }
    let opened = t.elapsed();
    let stats = container.stats();
    let shared_kib = vmlck_kib("self")? - before;
    ensure!(
        stats.members == fleet.len() && stats.mappings == 1 && stats.mapped_bytes == ram,
        "{} functions in the container: {stats:?} (one mapping of {ram:#x} bytes expected)",
        fleet.len()
    );
    let ram_kib = ram / 1024;
    ensure!(
        private_kib >= 2 * ram_kib,
        "two private containers charged {private_kib} KiB, {} KiB expected (per-container accounting)",
        2 * ram_kib
    );
    ensure!(
        (ram_kib..ram_kib + 1024).contains(&shared_kib),
        "{} functions in one container charged {shared_kib} KiB of VmLck; guest RAM is {ram_kib} KiB",
        fleet.len()
    );
    // The same device named twice: refused, the open one untouched.
    match VfioFunction::open_in(&fleet[0].bdf, &container, &VfioOptions::default()) {
        Err(vdpa_bridge::VfioError::GroupBusy { .. }) => {}
        Err(e) => anyhow::bail!("a second open of {}: {e}", fleet[0].name),
        Ok(_) => anyhow::bail!("a second open of {} was allowed", fleet[0].name),
    }
    ensure!(
        container.stats().members == fleet.len(),
        "after the refused second open: {:?}",
        container.stats()
    );
    for d in &mut disks {
        io(d, 128)?;
    }
    // Close the one whose map reached the kernel first, then all but the
    // last, one by one: the mapping and the others' I/O stay.
    drop(disks.remove(0));
    while disks.len() > 1 {
        let s = container.stats();
        ensure!(
            s.members == disks.len() && s.mappings == 1,
            "with {} function(s) left: {s:?}",
            disks.len()
        );
        io(&mut disks[0], 192)?;
        drop(disks.pop());
    }
    io(&mut disks[0], 256)?;
    drop(disks);
    let s = container.stats();
    ensure!(
        s.members == 0 && s.mappings == 0,
        "after the last close: {s:?}"
    );
    ensure!(
        vmlck_kib("self")? == before,
        "VmLck {} KiB after the last close, {before} KiB before",
        vmlck_kib("self")?
    );
    // The same container again, two disks on shadow rings from the start:
    // each one's rings get a window of their own above guest RAM.
    let shadowed = DeviceOptions {
        shadow: ShadowPolicy::Always,
        ..DeviceOptions::default()
    };
    let mut a = open_with(&fleet[0], Some(&container), &mem, 0, shadowed)?;
    let mut b = open_with(&fleet[1], Some(&container), &mem, span, shadowed)?;
    let s = container.stats();
    ensure!(
        s.members == 2 && s.mappings == 3,
        "two shadowed functions: {s:?} (guest RAM and one shadow window each expected)"
    );
    io(&mut a, 320)?;
    io(&mut b, 320)?;
    drop(a);
    ensure!(
        container.stats().mappings == 2,
        "after closing one shadowed function: {:?}",
        container.stats()
    );
    io(&mut b, 384)?;
    drop(b);
    let after = vmlck_kib("self")?;
    ensure!(
        container.stats() == Default::default(),
        "after the last close: {:?}",
        container.stats()
    );
    ensure!(
        after == before,
        "VmLck {after} KiB after the last close, {before} KiB before"
    );
    Ok(Outcome::PassWith(format!(
        "{} functions: 1 mapping of {} MiB, VmLck +{shared_kib} KiB (two private containers: \
         +{private_kib} KiB); opened and activated in {:?} ({:?} each); 2 queues each read and \
         written, checked in the image files; a second open of one refused; closed first-opened first; the container again with \
         two shadowed functions: 3 mappings, I/O on both",
        fleet.len(),
        ram >> 20,
        opened,
        opened / fleet.len() as u32
    )))
}
