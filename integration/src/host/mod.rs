//! Host side of the lab: prepare the kernel, initramfs, disk images, the
//! network namespace and the manifest; boot QEMU; collect the guest's
//! results and check the disk images after the VM exits.
//!
//! Everything the guest needs lives under the cargo target directory
//! (`<target>/lab/`, `<target>/lab-cache/`): the guest sees the host's root
//! read-only over 9p, with a tmpfs over `/tmp`.

pub mod devices;
pub mod initramfs;
pub mod kernel;
pub mod netns;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};

use crate::manifest::{Manifest, Skipped, MANIFEST_VERSION};
use crate::pattern;
use crate::protocol::{BenchResult, Event, Verdict};
use devices::{Backend, DeviceSpec, DEVICES, HOSTROOT_SLOT, LABRW_SLOT, SMP};
use netns::Netns;

/// Knobs of a lab run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The cargo target directory (holds `lab/` and `lab-cache/`).
    pub target_dir: PathBuf,
    /// The `lab-guest` binary, run inside the guest by this host path.
    pub guest_bin: PathBuf,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Limit for one boot, from spawn to QEMU's exit.
    pub boot_timeout: Duration,
    /// Limit for all boots together.
    pub overall_timeout: Duration,
    /// Run the benchmark instead of the test cases.
    pub bench: bool,
    /// Run only the soak, for this many seconds.
    pub soak: Option<u64>,
    /// Run only the guest cases whose name contains this.
    pub only: Option<String>,
}

/// One reported outcome, from the guest or a host-side check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Case name (host-side checks start with `host_`).
    pub name: String,
    /// Pass, fail or skip.
    pub verdict: Verdict,
    /// Reason for fail/skip.
    pub detail: String,
}

/// One benchmark's report: its figures, or why it has none. Never part
/// of the verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchOutcome {
    /// Benchmark name.
    pub name: String,
    /// Measured, error or skip.
    pub result: BenchResult,
    /// The figures, or the error or skip reason.
    pub detail: String,
}

/// Everything a run produced.
#[derive(Debug, Default)]
pub struct Summary {
    /// Outcomes of the tests and host checks, in report order: the verdict.
    pub outcomes: Vec<Outcome>,
    /// Benchmark reports, in report order: not part of the verdict.
    pub benchmarks: Vec<BenchOutcome>,
    /// Kernel package version booted.
    pub kernel: String,
    /// Spawn to `/init`'s first line.
    pub init_after: Option<Duration>,
    /// Spawn to QEMU's exit.
    pub vm_elapsed: Duration,
}

impl Summary {
    fn push(&mut self, name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) {
        self.outcomes.push(Outcome {
            name: name.into(),
            verdict,
            detail: detail.into(),
        });
    }

    /// How many outcomes have `verdict`.
    pub fn count(&self, verdict: Verdict) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.verdict == verdict)
            .count()
    }

    /// How many benchmarks ended with `result`.
    pub fn count_benchmarks(&self, result: BenchResult) -> usize {
        self.benchmarks
            .iter()
            .filter(|b| b.result == result)
            .count()
    }
}

/// Feature bit the Cloud Hypervisor case masks off (VIRTIO_BLK_F_FLUSH,
/// which QEMU's virtio-blk offers).
pub const CH_MASKED_BIT: u32 = 9;

/// The Cloud Hypervisor binaries `CLOUD_HYPERVISOR` and `CH_REMOTE`
/// name, as absolute paths the guest can open, or `None` when
/// `CLOUD_HYPERVISOR` is unset.
///
/// # Errors
/// A variable is set but names no file the guest can see: the run stops
/// before booting, with that message (a skip would hide the mistake).
fn ch_binaries() -> anyhow::Result<Option<(PathBuf, Option<PathBuf>)>> {
    let Some(binary) = std::env::var_os("CLOUD_HYPERVISOR") else {
        return Ok(None);
    };
    let binary = guest_visible_file("CLOUD_HYPERVISOR", Path::new(&binary))?;
    let remote = std::env::var_os("CH_REMOTE")
        .map(|r| guest_visible_file("CH_REMOTE", Path::new(&r)))
        .transpose()?;
    Ok(Some((binary, remote)))
}

/// The Cloud Hypervisor run: its binaries (from [`ch_binaries`]) and the
/// innermost guest's boot files.
fn cloud_hypervisor(
    (binary, remote): (PathBuf, Option<PathBuf>),
    kernel: &kernel::Kernel,
    lab_dir: &Path,
    perf_tool: &Path,
) -> anyhow::Result<crate::manifest::ChRun> {
    // virtio_iommu after the transport (it is a virtio-pci device itself)
    // and before the devices it translates for.
    let modules = kernel.resolve(&["virtio_pci", "virtio_iommu", "virtio_blk", "virtio_net"])?;
    let initramfs = lab_dir.join("l3.cpio.gz");
    // Sector 0 and the sector-8 write of every disk image, by the name the
    // disk carries as its serial (`serial=<variant>`).
    let mut files = Vec::new();
    let fleet: Vec<String> = devices::fleet().into_iter().map(|d| d.name).collect();
    for image in devices::DEVICES
        .iter()
        .filter(|d| d.image_name().is_some())
        .map(|d| d.variant.name())
        .chain(fleet.iter().map(String::as_str))
    {
        files.push((
            format!("expect0-{image}.bin"),
            pattern::sector(image, 0).to_vec(),
        ));
        files.push((
            format!("write8-{image}.bin"),
            pattern::written(image, 8 * 512, 512),
        ));
    }
    files.extend(initramfs::program_with_libraries(
        perf_tool,
        "bin/l3-blkperf",
    )?);
    files.extend(initramfs::program_with_libraries(
        &perf_tool.with_file_name("l3-stream"),
        "bin/l3-stream",
    )?);
    initramfs::build_with(
        kernel,
        &modules,
        &lab_dir.join("l3.d"),
        &initramfs,
        initramfs::L3_INIT,
        &files,
    )?;
    Ok(crate::manifest::ChRun {
        binary,
        remote,
        kernel: kernel.vmlinuz.clone(),
        initramfs,
        masked_bit: CH_MASKED_BIT,
    })
}

/// The absolute path of the file `path` names (relative to the current
/// directory), as the lab guest will open it: the guest runs chrooted at
/// the host's root, from another directory, with a tmpfs over `/tmp`. So a
/// relative path is resolved here, and a file the guest cannot see is
/// refused, naming `var`.
///
/// # Errors
/// `path` names no file, or one under `/tmp`.
fn guest_visible_file(var: &str, path: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::fs::canonicalize(path).with_context(|| {
        format!(
            "{var}={}: no such file (relative paths are taken from {})",
            path.display(),
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "the current directory".into())
        )
    })?;
    ensure!(abs.is_file(), "{var}={}: not a file", path.display());
    ensure!(
        !abs.starts_with("/tmp"),
        "{var}={} is under /tmp, which the lab guest covers with a tmpfs: put it elsewhere",
        abs.display()
    );
    Ok(abs)
}

/// Name (pattern seed) of the image the guest exports through VDUSE.
pub const VDUSE_IMAGE: &str = "vduse";
/// Its size in MiB.
const VDUSE_MIB: usize = 8;

/// Write the pattern image of `spec` into `lab_dir`.
fn make_image(spec: &DeviceSpec, lab_dir: &Path) -> anyhow::Result<()> {
    let (Backend::Image { mib }, Some(name)) = (spec.backend, spec.image_name()) else {
        return Ok(());
    };
    let data = pattern::region(spec.variant.name(), 0, (mib * 1024 * 1024) as usize);
    let path = lab_dir.join(name);
    std::fs::write(&path, data).with_context(|| format!("write {}", path.display()))
}

/// Write a console's input file ([`devices::CONSOLE_INPUT`]) and empty
/// its output file.
fn make_console_files(spec: &DeviceSpec, lab_dir: &Path) -> anyhow::Result<()> {
    let Some(f) = spec.console_files(lab_dir) else {
        return Ok(());
    };
    for (path, text) in [(&f.input, devices::CONSOLE_INPUT), (&f.output, "")] {
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Why a console's output file does not hold exactly the texts the guest
/// declared it sent, in order; `None` when it does.
fn console_mismatch(got: &[u8], sent: &[&str]) -> Option<String> {
    let want = sent.concat();
    if got == want.as_bytes() {
        return None;
    }
    let at = got
        .iter()
        .zip(want.as_bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Some(format!(
        "holds {} bytes, the {} declared texts make {}; first difference at byte {at}: {:?}",
        got.len(),
        sent.len(),
        want.len(),
        String::from_utf8_lossy(&got[at.min(got.len())..got.len().min(at + 40)])
    ))
}

/// How QEMU runs its vCPUs. Multi-threaded TCG (one host thread per vCPU)
/// sometimes aborts in QEMU 10.0 (`iotlb_to_section: Assertion
/// 'section_index < d->map.sections_nb' failed`, a race between a vCPU
/// and a memory-map change; seen once in six plain runs on 2026-11-29,
/// with one unexplained hang besides), so single-threaded TCG is used,
/// which costs the plain run 10% here. Nested Cloud Hypervisor guests
/// need both vCPUs running at once (under one thread their boot did not
/// finish in 150 s), so a run with Cloud Hypervisor keeps multi-threaded
/// TCG.
fn accel(with_cloud_hypervisor: bool) -> &'static str {
    if with_cloud_hypervisor {
        "tcg"
    } else {
        "tcg,thread=single"
    }
}

/// The QEMU command line (without the netns wrapper).
fn qemu_args(
    accel: &str,
    kernel: &kernel::Kernel,
    initrd: &Path,
    cmdline: &str,
    specs: &[&DeviceSpec],
    lab_dir: &Path,
    target_dir: &Path,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "-machine",
        "q35",
        "-accel",
        accel,
        "-cpu",
        "max",
        "-smp",
        &SMP.to_string(),
        "-m",
        "2G",
        "-nographic",
        "-nodefaults",
        "-serial",
        "stdio",
        "-no-reboot",
        // The vIOMMU comes before the devices it translates for.
        "-device",
        "intel-iommu,intremap=on,caching-mode=on",
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on",
        "-device",
        &format!(
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,bus=pcie.0,addr={HOSTROOT_SLOT:#04x}"
        ),
        // The target directory read-write: images the guest itself serves
        // (VDUSE) land in the host's file, and a checkout under /tmp (which
        // the guest covers with a tmpfs) still reaches the guest.
        "-fsdev",
        &format!(
            "local,id=labrw,path={},security_model=none",
            devices::qemu_escape(&target_dir.to_string_lossy())
        ),
        "-device",
        &format!("virtio-9p-pci,fsdev=labrw,mount_tag=labrw,bus=pcie.0,addr={LABRW_SLOT:#04x}"),
        "-kernel",
        &kernel.vmlinuz.to_string_lossy(),
        "-initrd",
        &initrd.to_string_lossy(),
        "-append",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for spec in specs {
        a.extend(spec.qemu_args(lab_dir));
    }
    for disk in devices::fleet() {
        a.extend(disk.qemu_args(lab_dir));
    }
    a
}

/// Take an exclusive `flock` on `path`, waiting for another lab run on the
/// same target directory to finish (they share images and the manifest).
/// Released when the returned file is dropped.
fn lock(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    // SAFETY: flock takes a file descriptor, owned by `file` and open for
    // the duration of the call, and an operation flag; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("lab: another lab run holds {}; waiting", path.display());
        // SAFETY: as above.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        ensure!(
            rc == 0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(file)
}

/// Print the console tail.
fn dump_tail(report: &vm::BootReport, log: &Path) {
    eprintln!(
        "lab: ---- last {} console lines (full log: {}) ----",
        report.tail.len(),
        log.display()
    );
    for l in &report.tail {
        eprintln!("  | {l}");
    }
    eprintln!("lab: ---- end of console ----");
}

/// Prepare and boot the lab once, running every registered guest case.
///
/// # Errors
/// Preparation fails (kernel, initramfs, images, manifest) or QEMU cannot
/// be spawned. A VM that boots but misbehaves is reported as failed
/// outcomes, not as an error.
pub fn run(opts: &Options) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let lab_dir = opts.target_dir.join("lab");
    let cache = opts.target_dir.join("lab-cache");
    for p in [&lab_dir, &opts.guest_bin] {
        let s = p.to_string_lossy();
        ensure!(
            !s.contains(char::is_whitespace),
            "{s}: the kernel cmdline cannot carry it; use another cargo target dir"
        );
    }
    ensure!(
        opts.guest_bin.exists(),
        "{} missing: cargo build --release -p vdpa-integration --bins",
        opts.guest_bin.display()
    );
    let ch_bins = ch_binaries()?;
    std::fs::create_dir_all(&lab_dir)?;
    std::fs::create_dir_all(&cache)?;
    let _lock = lock(&opts.target_dir.join("lab.lock"))?;

    let t = Instant::now();
    let kernel = kernel::fetch(&cache)?;
    let modules = kernel.resolve(kernel::GUEST_MODULES)?;
    if !modules.missing.is_empty() {
        eprintln!(
            "lab: kernel {} lacks modules {:?}",
            kernel.release, modules.missing
        );
    }
    let initrd = lab_dir.join("initramfs.cpio.gz");
    initramfs::build(&kernel, &modules, &lab_dir.join("initramfs.d"), &initrd)?;
    summary.kernel = format!("{} ({})", kernel.version, kernel.release);
    eprintln!(
        "lab: kernel {}, {} modules, initramfs ready in {:.1} s",
        summary.kernel,
        modules.load.len(),
        t.elapsed().as_secs_f64()
    );

    let mut skipped = Vec::new();
    let needs_tap = DEVICES
        .iter()
        .any(|d| matches!(d.backend, Backend::Tap { .. }));
    let netns = if needs_tap {
        match Netns::create() {
            Ok(ns) => Some(ns),
            Err(e) => {
                for d in DEVICES
                    .iter()
                    .filter(|d| matches!(d.backend, Backend::Tap { .. }))
                {
                    let reason = format!("cannot create the network namespace/tap: {e:#}");
                    eprintln!("lab: skipping device {}: {reason}", d.variant.name());
                    skipped.push(Skipped {
                        variant: d.variant,
                        reason,
                    });
                }
                None
            }
        }
    } else {
        None
    };
    let specs: Vec<&DeviceSpec> = DEVICES
        .iter()
        .filter(|d| !skipped.iter().any(|s| s.variant == d.variant))
        .collect();
    for spec in &specs {
        make_image(spec, &lab_dir)?;
        make_console_files(spec, &lab_dir)?;
    }
    let mut fleet = Vec::new();
    for disk in devices::fleet() {
        let image = lab_dir.join(format!("{}.img", disk.name));
        let data = pattern::region(&disk.name, 0, (devices::FLEET_MIB << 20) as usize);
        std::fs::write(&image, data).with_context(|| format!("write {}", image.display()))?;
        fleet.push(crate::manifest::FleetEntry {
            name: disk.name,
            bdf: disk.bdf,
            image,
        });
    }
    let vduse_image = lab_dir.join("vduse.img");
    std::fs::write(
        &vduse_image,
        pattern::region(VDUSE_IMAGE, 0, VDUSE_MIB << 20),
    )
    .with_context(|| format!("write {}", vduse_image.display()))?;
    let perf_tool = opts.guest_bin.with_file_name("l3-blkperf");
    let (ch, ch_skip) = match ch_bins.map(|b| cloud_hypervisor(b, &kernel, &lab_dir, &perf_tool)) {
        Some(Ok(run)) => (Some(run), None),
        None => (
            None,
            Some(
                "CLOUD_HYPERVISOR is not set: set it (and CH_REMOTE) to a Cloud Hypervisor \
                 built with patches/ to run the end-to-end cases"
                    .to_string(),
            ),
        ),
        Some(Err(e)) => (
            None,
            Some(format!("cannot prepare the Cloud Hypervisor run: {e:#}")),
        ),
    };
    let manifest = Manifest {
        ch,
        ch_skip,
        version: MANIFEST_VERSION,
        devices: specs.iter().map(|s| s.manifest_entry(&lab_dir)).collect(),
        skipped,
        bench: opts.bench,
        soak: opts.soak,
        only: opts.only.clone(),
        vduse_image: Some(vduse_image.clone()),
        fleet,
        fleet_bench: crate::manifest::FleetBench::from_env(),
    };
    let manifest_path = lab_dir.join("manifest.json");
    manifest.store(&manifest_path)?;

    // Debian's kernel has virtio_console built in: at boot it would drive
    // the console device to DRIVER_OK and swallow what QEMU feeds it
    // before the case binds the device to vfio-pci. Its init is kept from
    // running (the lab's own console is ttyS0).
    let cmdline = format!(
        "console=ttyS0 intel_iommu=on iommu=pt panic=-1 quiet \
         initcall_blacklist=virtio_console_init \
         lab.guest={} lab.manifest={} lab.rw={}",
        opts.guest_bin.display(),
        manifest_path.display(),
        opts.target_dir.display()
    );
    let args = qemu_args(
        accel(manifest.ch.is_some()),
        &kernel,
        &initrd,
        &cmdline,
        &specs,
        &lab_dir,
        &opts.target_dir,
    );
    let mut cmd = match &netns {
        // `ip netns exec` execs, so the spawned pid is QEMU's own.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(&opts.qemu);
            c
        }
        None => Command::new(&opts.qemu),
    };
    cmd.args(&args);
    std::fs::write(lab_dir.join("qemu-cmdline.txt"), format!("{cmd:?}\n"))?;

    let console_log = lab_dir.join("console.log");
    let timeout = opts.boot_timeout.min(opts.overall_timeout);
    eprintln!(
        "lab: booting {} devices (timeout {} s)",
        specs.len(),
        timeout.as_secs()
    );
    let report = vm::boot(cmd, &console_log, timeout, |ev| match ev {
        Event::Result(r) => {
            let tag = match r.result {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "SKIP",
            };
            let sep = if r.detail.is_empty() { "" } else { ": " };
            eprintln!("lab: {tag} {} ({} ms){sep}{}", r.case, r.ms, r.detail);
        }
        Event::Bench(r) => eprintln!(
            "lab: {} {} ({} ms): {}",
            bench_tag(r.result),
            r.case,
            r.ms,
            r.detail
        ),
        Event::Exit { rc } => eprintln!("lab: guest runner exited with {rc}"),
        _ => {}
    })?;
    drop(netns);
    summary.init_after = report.init_after;
    summary.vm_elapsed = report.elapsed;
    collect(&mut summary, &report);

    // Host-side checks of the images, after QEMU closed them.
    let images = manifest
        .devices
        .iter()
        .filter_map(|d| Some((d.variant.name(), d.image.clone()?)))
        .chain(manifest.vduse_image.clone().map(|i| (VDUSE_IMAGE, i)));
    for (image_name, image) in images {
        let image = &image;
        let name = format!("host_{image_name}_image_holds_writes_and_pattern");
        let written: Vec<_> = report
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Write(w) if w.device == image_name && !w.stream => {
                    Some(w.offset..w.offset.saturating_add(w.len))
                }
                _ => None,
            })
            .collect();
        let streamed: Vec<_> = report
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Write(w) if w.device == image_name && w.stream => {
                    Some(w.offset..w.offset.saturating_add(w.len))
                }
                _ => None,
            })
            .collect();
        // Streamed blocks hold the pattern or one whole write each; once
        // checked they compare as the pattern.
        let read = std::fs::read(image).map(|mut data| {
            let mut bad = None;
            for r in &streamed {
                bad = bad.or_else(|| crate::stream::first_bad(image_name, &data, r.clone()));
                let (s, e) = (
                    (r.start as usize).min(data.len()),
                    (r.end as usize).min(data.len()),
                );
                if s < e {
                    data[s..e].copy_from_slice(&pattern::region(image_name, s as u64, e - s));
                }
            }
            (data, bad)
        });
        match read {
            Ok((_, Some(off))) => summary.push(
                name,
                Verdict::Fail,
                format!("byte {off:#x} of the streamed region holds neither the pattern nor a whole stream write"),
            ),
            Ok((data, None)) => match pattern::first_mismatch(image_name, &data, &written) {
                None => summary.push(name, Verdict::Pass, ""),
                Some(off) => summary.push(
                    name,
                    Verdict::Fail,
                    format!(
                        "byte {off:#x} differs from what it must hold (the pattern, or the written pattern inside the {} declared writes)",
                        written.len()
                    ),
                ),
            },
            Err(e) => summary.push(
                name,
                Verdict::Fail,
                format!("read {}: {e}", image.display()),
            ),
        }
    }

    // Host-side checks of the consoles' chardev files: exactly what the
    // guest declared it sent, in order.
    for d in &manifest.devices {
        let Some(files) = &d.console else { continue };
        let device = d.variant.name();
        let name = format!("host_{device}_chardev_holds_what_the_guest_sent");
        let sent: Vec<&str> = report
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Sent(t) if t.device == device => Some(t.text.as_str()),
                _ => None,
            })
            .collect();
        match std::fs::read(&files.output) {
            Ok(data) => match console_mismatch(&data, &sent) {
                None => summary.push(name, Verdict::Pass, ""),
                Some(why) => summary.push(name, Verdict::Fail, why),
            },
            Err(e) => summary.push(
                name,
                Verdict::Fail,
                format!("read {}: {e}", files.output.display()),
            ),
        }
    }

    // A benchmark error gets the console tail too: it is reported, not
    // counted, so it must be as easy to see as a failure.
    if summary.count(Verdict::Fail) > 0
        || summary.count_benchmarks(BenchResult::Error) > 0
        || report.runner_exit().is_none()
    {
        dump_tail(&report, &console_log);
    }
    Ok(summary)
}

/// The report tag of a benchmark's result (`lab: <tag> <name> ...`).
pub fn bench_tag(result: BenchResult) -> &'static str {
    match result {
        BenchResult::Measured => "BENCH",
        BenchResult::Error => "BENCH-ERROR",
        BenchResult::Skip => "BENCH-SKIP",
    }
}

/// Turn the boot's events into outcomes and benchmark reports, adding
/// failures for everything that went wrong around the cases (hang, crash,
/// missing sentinel). A benchmark that never reported is a benchmark
/// error; the run still fails through the `vm` outcome, since the runner
/// did not finish.
fn collect(summary: &mut Summary, report: &vm::BootReport) {
    // The case or benchmark (`true`) that started and has not reported.
    let mut open: Option<(&str, bool)> = None;
    let mut done = false;
    for ev in &report.events {
        match ev {
            Event::Start(c) => open = Some((c, false)),
            Event::BenchStart(c) => open = Some((c, true)),
            Event::Result(r) => {
                open = None;
                summary.push(r.case.clone(), r.result, r.detail.clone());
            }
            Event::Bench(r) => {
                open = None;
                summary.benchmarks.push(BenchOutcome {
                    name: r.case.clone(),
                    result: r.result,
                    detail: r.detail.clone(),
                });
            }
            Event::Done { .. } => done = true,
            Event::Write(_) | Event::Sent(_) | Event::Exit { .. } => {}
        }
    }
    const HUNG: &str = "started but never reported: hung or crashed the VM";
    match open {
        Some((c, false)) => summary.push(c, Verdict::Fail, HUNG),
        Some((c, true)) => summary.benchmarks.push(BenchOutcome {
            name: c.to_string(),
            result: BenchResult::Error,
            detail: HUNG.to_string(),
        }),
        None => {}
    }
    for e in &report.protocol_errors {
        summary.push("protocol", Verdict::Fail, e.clone());
    }
    let vm_problem = match (&report.killed, report.runner_exit()) {
        (Some(why), _) => Some(format!("QEMU killed: {why}")),
        (None, None) => Some(format!(
            "QEMU exited ({:?}) without the /init sentinel: the VM did not boot or /init failed",
            report.status
        )),
        (None, Some(rc)) if !done => Some(format!("lab-guest exited with {rc} before finishing")),
        (None, Some(rc)) if rc != 0 && summary.count(Verdict::Fail) == 0 => Some(format!(
            "lab-guest exited with {rc} but reported no failure"
        )),
        _ => None,
    };
    if let Some(why) = vm_problem {
        summary.push("vm", Verdict::Fail, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{BenchRecord, CaseRecord};
    use std::collections::VecDeque;

    fn report(events: Vec<Event>, killed: Option<&str>) -> vm::BootReport {
        vm::BootReport {
            events,
            protocol_errors: vec![],
            tail: VecDeque::new(),
            status: None,
            killed: killed.map(str::to_string),
            init_after: None,
            elapsed: Duration::ZERO,
        }
    }

    fn pass(case: &str) -> Event {
        Event::Result(CaseRecord {
            case: case.into(),
            result: Verdict::Pass,
            detail: String::new(),
            ms: 1,
        })
    }

    #[test]
    fn clean_run_adds_no_outcome_beyond_the_cases() {
        let mut s = Summary::default();

        collect(
            &mut s,
            &report(
                vec![
                    Event::Start("a".into()),
                    pass("a"),
                    Event::Done { failed: 0 },
                    Event::Exit { rc: 0 },
                ],
                None,
            ),
        );

        assert_eq!((s.count(Verdict::Pass), s.count(Verdict::Fail)), (1, 0));
    }

    #[test]
    fn case_started_when_qemu_was_killed_fails_as_hung() {
        let mut s = Summary::default();

        collect(
            &mut s,
            &report(
                vec![Event::Start("a".into())],
                Some("timed out after 180 s"),
            ),
        );

        let names: Vec<_> = s.outcomes.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["a", "vm"]);
        assert_eq!(s.count(Verdict::Fail), 2);
    }

    #[test]
    fn benchmark_errors_are_reported_apart_from_the_verdict() {
        let mut s = Summary::default();
        let bench = |case: &str, result| {
            Event::Bench(BenchRecord {
                case: case.into(),
                result,
                detail: "L3-PERF-ERROR blk0: sector 3".into(),
                ms: 1,
            })
        };

        collect(
            &mut s,
            &report(
                vec![
                    pass("a"),
                    Event::BenchStart("b".into()),
                    bench("b", BenchResult::Error),
                    Event::BenchStart("c".into()),
                    bench("c", BenchResult::Measured),
                    Event::Done { failed: 0 },
                    Event::Exit { rc: 0 },
                ],
                None,
            ),
        );

        assert_eq!((s.count(Verdict::Pass), s.count(Verdict::Fail)), (1, 0));
        assert_eq!(s.outcomes.len(), 1);
        assert_eq!(s.count_benchmarks(BenchResult::Error), 1);
        assert_eq!(s.count_benchmarks(BenchResult::Measured), 1);
        assert_eq!(s.benchmarks[0].detail, "L3-PERF-ERROR blk0: sector 3");
    }

    #[test]
    fn benchmark_running_when_qemu_was_killed_is_a_benchmark_error_and_the_vm_fails() {
        let mut s = Summary::default();

        collect(
            &mut s,
            &report(
                vec![Event::BenchStart("b".into())],
                Some("timed out after 180 s"),
            ),
        );

        let names: Vec<_> = s.outcomes.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["vm"]);
        assert_eq!(s.benchmarks.len(), 1);
        assert_eq!(s.benchmarks[0].result, BenchResult::Error);
    }

    #[test]
    fn relative_binary_path_is_made_absolute_for_the_guest() {
        // Unit tests run in the package directory.
        let got = guest_visible_file("CLOUD_HYPERVISOR", Path::new("../integration/Cargo.toml"));

        let got = got.unwrap();
        assert!(got.is_absolute(), "{}", got.display());
        assert!(got.ends_with("integration/Cargo.toml"), "{}", got.display());
    }

    #[test]
    fn missing_or_tmp_binary_is_refused_naming_the_variable() {
        let in_tmp = std::env::temp_dir().join(format!("lab-ch-{}", std::process::id()));
        std::fs::write(&in_tmp, "").unwrap();

        let missing = guest_visible_file("CH_REMOTE", Path::new("../no/such/ch-remote"));
        let tmp = guest_visible_file("CLOUD_HYPERVISOR", &in_tmp);
        let _ = std::fs::remove_file(&in_tmp);

        let missing = format!("{:#}", missing.unwrap_err());
        assert!(
            missing.starts_with("CH_REMOTE=../no/such/ch-remote: no such file"),
            "{missing}"
        );
        assert!(format!("{:#}", tmp.unwrap_err()).contains("under /tmp"));
    }

    #[test]
    fn console_output_must_be_exactly_the_declared_texts() {
        assert_eq!(console_mismatch(b"", &[]), None);
        assert_eq!(console_mismatch(b"ab\ncd", &["ab\n", "cd"]), None);

        let undeclared = console_mismatch(b"ab\n", &[]).unwrap();
        let missing = console_mismatch(b"", &["ab\n"]).unwrap();
        let garbled = console_mismatch(b"aX\n", &["ab\n"]).unwrap();

        assert!(undeclared.contains("holds 3 bytes"), "{undeclared}");
        assert!(missing.contains("holds 0 bytes"), "{missing}");
        assert!(garbled.contains("at byte 1"), "{garbled}");
    }

    #[test]
    fn exit_without_sentinel_is_a_boot_failure() {
        let mut s = Summary::default();

        collect(&mut s, &report(vec![], None));

        assert_eq!(s.outcomes.len(), 1);
        assert!(s.outcomes[0].detail.contains("without the /init sentinel"));
    }

    #[test]
    fn runner_that_exits_before_done_fails() {
        let mut s = Summary::default();

        collect(
            &mut s,
            &report(vec![pass("a"), Event::Exit { rc: 101 }], None),
        );

        assert_eq!(s.count(Verdict::Fail), 1);
    }
}
