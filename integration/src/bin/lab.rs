//! `lab`: boots the VM lab and runs every guest case (see the crate docs).
//! Needs root (netns, tap). `integration/run` builds and runs it.
//!
//! Environment:
//! - `VDPA_LAB_BOOT_TIMEOUT` seconds for one boot (default 180),
//! - `VDPA_LAB_TIMEOUT` seconds for all boots (default 300),
//! - `VDPA_LAB_QEMU` QEMU binary (default `qemu-system-x86_64`),
//! - `VDPA_LAB_BENCH=1` runs the benchmarks instead of the tests (with
//!   `CLOUD_HYPERVISOR` set, the Cloud Hypervisor throughput ones too),
//! - `VDPA_LAB_CASES=<text>` runs only the guest cases whose name
//!   contains `<text>` (for working on a few cases; the runner prints how
//!   many it left out),
//! - `VDPA_LAB_NO_SKIP=1` counts every skipped case as failed (for CI
//!   machines that are known to have everything),
//! - `VDPA_LAB_SOAK=<seconds>` runs only the soak (`cases/soak.rs`: mixed
//!   blk and net I/O with resets, resources checked) for that long; both
//!   timeouts grow by that much,
//! - `VDPA_FLEET_BOOTS=<n>` and `VDPA_FLEET_SIZES=<n,...>`: boots per mode
//!   and rows of the fleet benchmark (`cases/fleet.rs`).
//!
//! Prints `lab: N passed, N failed, N skipped` last; exits 1 on any failure.
//! Benchmarks are reported before that line, one
//! `lab: BENCH|BENCH-ERROR|BENCH-SKIP <name>: <figures or reason>` each and
//! `lab: benchmarks: N measured, N errors, N skipped`; they never change the
//! counts or the exit code (the host's image checks still count).

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use vdpa_integration::host::{self, vm::INTERRUPTED, Options};
use vdpa_integration::protocol::{BenchResult, Verdict};

fn secs(var: &str, default: u64) -> anyhow::Result<Duration> {
    match std::env::var(var) {
        Ok(v) => Ok(Duration::from_secs(
            v.parse().with_context(|| format!("{var}={v:?}"))?,
        )),
        Err(_) => Ok(Duration::from_secs(default)),
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn options() -> anyhow::Result<Options> {
    let exe = std::env::current_exe().context("locate the lab binary")?;
    let bin_dir = exe.parent().context("lab binary has no directory")?;
    let target_dir = bin_dir
        .parent()
        .context("lab binary is not in <target>/<profile>/")?
        .to_path_buf();
    let soak = match std::env::var("VDPA_LAB_SOAK") {
        Ok(v) if !v.is_empty() => Some(
            v.parse::<u64>()
                .with_context(|| format!("VDPA_LAB_SOAK={v:?}"))?,
        ),
        _ => None,
    };
    let longer = Duration::from_secs(soak.unwrap_or(0));
    Ok(Options {
        target_dir,
        guest_bin: bin_dir.join("lab-guest"),
        qemu: std::env::var_os("VDPA_LAB_QEMU")
            .unwrap_or_else(|| "qemu-system-x86_64".into())
            .into(),
        boot_timeout: secs("VDPA_LAB_BOOT_TIMEOUT", 180)? + longer,
        overall_timeout: secs("VDPA_LAB_TIMEOUT", 300)? + longer,
        bench: std::env::var("VDPA_LAB_BENCH").as_deref() == Ok("1"),
        soak,
        only: std::env::var("VDPA_LAB_CASES")
            .ok()
            .filter(|s| !s.is_empty()),
    })
}

fn main() -> ExitCode {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` only stores to an atomic, which is
        // async-signal-safe; the handler stays valid for the whole process.
        unsafe { libc::signal(sig, handler) };
    }
    let t0 = Instant::now();
    let mut summary = match options().and_then(|o| host::run(&o)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lab: error: {e:#}");
            println!("lab: 0 passed, 1 failed, 0 skipped");
            return ExitCode::FAILURE;
        }
    };
    if std::env::var("VDPA_LAB_NO_SKIP").as_deref() == Ok("1") {
        for o in &mut summary.outcomes {
            if o.verdict == Verdict::Skip {
                o.verdict = Verdict::Fail;
                o.detail = format!("skipped but VDPA_LAB_NO_SKIP=1: {}", o.detail);
            }
        }
    }
    let (passed, failed, skipped) = (
        summary.count(Verdict::Pass),
        summary.count(Verdict::Fail),
        summary.count(Verdict::Skip),
    );
    for o in &summary.outcomes {
        match o.verdict {
            Verdict::Fail => eprintln!("lab: FAILED {}: {}", o.name, o.detail),
            Verdict::Skip => eprintln!("lab: SKIPPED {}: {}", o.name, o.detail),
            Verdict::Pass => {}
        }
    }
    for b in &summary.benchmarks {
        println!(
            "lab: {} {}: {}",
            host::bench_tag(b.result),
            b.name,
            b.detail
        );
    }
    if !summary.benchmarks.is_empty() {
        println!(
            "lab: benchmarks: {} measured, {} errors, {} skipped (reported only, not part of the verdict)",
            summary.count_benchmarks(BenchResult::Measured),
            summary.count_benchmarks(BenchResult::Error),
            summary.count_benchmarks(BenchResult::Skip),
        );
    }
    let boot = summary
        .init_after
        .map_or("never".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
    eprintln!(
        "lab: kernel {}; /init after {boot}; VM ran {:.1} s; lab total {:.1} s",
        summary.kernel,
        summary.vm_elapsed.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!("lab: {passed} passed, {failed} failed, {skipped} skipped");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
