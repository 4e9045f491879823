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
//!   through the device and from the image file as the host holds it.
//!   Closing disks one by one leaves the others' mapping and I/O alone;
//!   the last close unmaps it and VmLck returns to where it was.

use std::os::unix::fs::FileExt as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use vdpa_bridge::types::features;
use vdpa_bridge::vfio::{SharedContainer, VfioFunction, VfioOptions};
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_plugin::{BridgeDevice, DeviceOptions};
use vdpa_testkit::driver::blk::{T_IN, T_OUT};
use vdpa_testkit::harness::{Guest, Mem, TestInterrupt};
use vm_memory::GuestMemoryAtomic;

use crate::guest::{sys, Case, CaseResult, Ctx, Outcome};
use crate::manifest::FleetEntry;
use crate::pattern;

/// The suite.
pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "fleet_functions_share_one_vfio_container".to_string(),
        needs: None,
        run: shared_container,
    }]
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
pub(crate) fn vmlck_kib(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmLck in /proc/<pid>/status")
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
    let f = match container {
        Some(c) => VfioFunction::open_in(&entry.bdf, c, &VfioOptions::default()),
        None => VfioFunction::open(&entry.bdf),
    }
    .with_context(|| format!("claim {} ({})", entry.name, entry.bdf))?;
    let vp = VpVdpa::open(Arc::new(f), OpenOptions::default())?;
    let mut dev = BridgeDevice::new(vp, mem.clone(), DeviceOptions::default())?;
    let want = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM);
    ensure!(dev.features() & want == want, "{}: lacks {want:#x}", entry.name);
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
        let lba = 1 + u64::from(q);
        let mut buf = vec![0u8; 512];
        ensure!(
            disk.guest.blk(q, T_IN, lba, &mut buf, fd)? == 0,
            "{name} queue {q}: read failed"
        );
        ensure!(
            buf == pattern::sector(name, lba),
            "{name} queue {q}: wrong data at {lba}"
        );
        let at = sector + 8 * u64::from(q);
        let mut data = pattern::written(name, at * 512, 4096);
        ensure!(
            disk.guest.blk(q, T_OUT, at, &mut data, fd)? == 0,
            "{name} queue {q}: write failed"
        );
        let mut back = vec![0u8; 4096];
        ensure!(
            disk.guest.blk(q, T_IN, at, &mut back, fd)? == 0,
            "{name} queue {q}: read back failed"
        );
        ensure!(back == data, "{name} queue {q}: read back differs");
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
    for d in &mut disks {
        io(d, 128)?;
    }
    // Close all but the first, one by one: its mapping and I/O stay.
    while disks.len() > 1 {
        drop(disks.pop());
        let s = container.stats();
        ensure!(
            s.members == disks.len() && s.mappings == 1,
            "after closing down to {} function(s): {s:?}",
            disks.len()
        );
    }
    io(&mut disks[0], 192)?;
    drop(disks);
    let s = container.stats();
    let after = vmlck_kib("self")?;
    ensure!(
        s.members == 0 && s.mappings == 0,
        "after the last close: {s:?}"
    );
    ensure!(
        after == before,
        "VmLck {after} KiB after the last close, {before} KiB before"
    );
    Ok(Outcome::PassWith(format!(
        "{} functions: 1 mapping of {} MiB, VmLck +{shared_kib} KiB (two private containers: \
         +{private_kib} KiB); opened and activated in {:?} ({:?} each); 2 queues each read and \
         written, checked in the image files",
        fleet.len(),
        ram >> 20,
        opened,
        opened / fleet.len() as u32
    )))
}
