//! Device types beyond blk and net, through the `vdpa-bridge` command, as
//! a new user meets them: `info` names the type and every feature bit
//! QEMU offers; `selftest` does real I/O on an entropy source (bytes that
//! are not all one value) and on a console's port 0 (a text the host finds
//! in the chardev file after the VM exits, and the text QEMU feeds from the
//! host side), and brings up a balloon (whose queues have different
//! maximum sizes, each sized by its own) and a crypto device with the
//! outcome "bring-up only", exit status 0. No command prints vfio-ioctls'
//! IRQ-info warning.

use std::process::{Command, ExitStatus};

use anyhow::{ensure, Context as _};
use serde_json::Value;

use crate::guest::cases::bridge::{cli, expected_queues};
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::host::devices::CONSOLE_INPUT;
use crate::manifest::{Kind, Variant};

/// Ring size `selftest` asks for (each queue gets it or its own maximum).
const SELFTEST_RING: u64 = 128;

/// The suite.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |v: Variant, what: &str, run: fn(&Ctx) -> CaseResult| {
        out.push(Case {
            name: format!("types_{}_{what}", v.name()),
            needs: Some(v),
            run,
        })
    };
    for v in [
        Variant::Rng,
        Variant::Console,
        Variant::Balloon,
        Variant::Crypto,
    ] {
        add(v, "cli_info_names_type_and_features", info_names);
    }
    add(Variant::Rng, "cli_selftest_reads_entropy", rng_selftest);
    add(
        Variant::Console,
        "cli_selftest_sends_and_receives_on_port_0",
        console_selftest,
    );
    add(
        Variant::Balloon,
        "cli_selftest_sizes_each_queue_by_its_own_maximum",
        balloon_selftest,
    );
    add(
        Variant::Crypto,
        "cli_selftest_bring_up_only_exits_0",
        crypto_selftest,
    );
    out
}

/// What one `vdpa-bridge` run gave.
pub(crate) struct CliRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Run `vdpa-bridge <args>` with `RUST_LOG` unset (the default log
/// level) or set to `rust_log`.
pub(crate) fn run_cli(args: &[&str], rust_log: Option<&str>) -> anyhow::Result<CliRun> {
    let mut cmd = Command::new(cli()?);
    cmd.args(args).env_remove("RUST_LOG");
    if let Some(l) = rust_log {
        cmd.env("RUST_LOG", l);
    }
    let out = cmd.output().context("run vdpa-bridge")?;
    Ok(CliRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `vdpa-bridge <args>` at the default log level, its JSON output; its
/// stderr must not carry vfio-ioctls' noise.
fn cli_json(args: &[&str]) -> anyhow::Result<(ExitStatus, Value)> {
    let r = run_cli(args, None)?;
    ensure!(
        !r.stderr.contains("vfio_ioctls"),
        "vfio-ioctls warning at the default log level: {}",
        r.stderr
    );
    let v: Value = serde_json::from_str(&r.stdout)
        .with_context(|| format!("no JSON ({}): {}", r.status, r.stderr))?;
    Ok((r.status, v))
}

fn check<'a>(report: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no check {name:?}: {report}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Feature names QEMU's device of `kind` (as the lab configures it) must
/// show, and ones it must not.
fn expected_names(kind: Kind) -> (&'static [&'static str], &'static [&'static str]) {
    match kind {
        // emergency-write=on is QEMU's default; max_ports=1: no MULTIPORT.
        Kind::Console => (&["EMERG_WRITE"], &["MULTIPORT"]),
        Kind::Balloon => (&["DEFLATE_ON_OOM", "PAGE_REPORTING"], &[]),
        _ => (&[], &[]),
    }
}

/// `info --json`: the type's name and id, every offered feature bit named
/// (none left as `bitN`), the queues and vectors QEMU was given.
fn info_names(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let (status, v) = cli_json(&["info", "--json", &dev.bdf])?;
    ensure!(status.success(), "exit {status}: {v}");
    ensure!(
        v["device_type"] == dev.kind.type_name(),
        "device_type {}, want {}",
        v["device_type"],
        dev.kind.type_name()
    );
    ensure!(
        v["device_id"] == dev.kind.virtio_id(),
        "device_id {}",
        v["device_id"]
    );
    let names = strings(&v["features"]["device"]["names"]);
    let unnamed: Vec<&&str> = names.iter().filter(|n| n.starts_with("bit")).collect();
    ensure!(unnamed.is_empty(), "unnamed bits {unnamed:?} in {names:?}");
    let (want, not) = expected_names(dev.kind);
    for n in ["VERSION_1", "ACCESS_PLATFORM"].iter().chain(want) {
        ensure!(names.contains(n), "{n} missing from {names:?}");
    }
    for n in not {
        ensure!(!names.contains(n), "{n} offered: {names:?}");
    }
    let queues = v["queues"].as_array().map_or(0, Vec::len);
    ensure!(
        queues == usize::from(expected_queues(dev)),
        "{queues} queues, want {}",
        expected_queues(dev)
    );
    ensure!(
        v["msix_vectors"] == dev.msix_vectors,
        "msix {}, QEMU configured {}",
        v["msix_vectors"],
        dev.msix_vectors
    );
    Ok(Outcome::PassWith(names.join(" ")))
}

/// `selftest` on virtio-rng: 64 bytes read through the guest ring, not all
/// one value (the CLI checks that; here: it said so, and gave them).
fn rng_selftest(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let (status, v) = cli_json(&["selftest", "--json", &dev.bdf])?;
    ensure!(
        status.success() && v["outcome"] == "passed",
        "exit {status}: {v}"
    );
    let c = check(&v, "rng read")?;
    ensure!(c["ok"] == true, "{c}");
    let hex = c["data"].as_str().unwrap_or_default();
    ensure!(hex.len() == 128, "64 bytes in hex, got {hex:?}");
    ensure!(
        hex.as_bytes().chunks(2).any(|b| b != &hex.as_bytes()[..2]),
        "all bytes equal: {hex}"
    );
    Ok(Outcome::PassWith(format!("{}: {hex}", c["detail"])))
}

/// `selftest` on the console: a text unique to this run sent on port 0
/// (declared once the device took it: the host then expects exactly that
/// in the chardev file), and the text QEMU feeds from the chardev's input
/// file received.
fn console_selftest(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let files = dev.console.as_ref().context("no console files")?;
    let text = format!(
        "vdpa-lab console selftest, run {}\n",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let (status, v) = cli_json(&[
        "selftest",
        "--json",
        "--console-text",
        &text,
        "--console-wait-ms",
        "5000",
        &dev.bdf,
    ])?;
    let write = check(&v, "console write")?;
    if write["ok"] == true {
        ctx.declare_sent(&text)?;
    }
    ensure!(
        status.success() && v["outcome"] == "passed",
        "exit {status}: {v}"
    );
    ensure!(write["data"] == text.as_str(), "{write}");
    let read = check(&v, "console read")?;
    let fed = std::fs::read_to_string(&files.input)
        .with_context(|| format!("read {}", files.input.display()))?;
    ensure!(fed == CONSOLE_INPUT, "input file holds {fed:?}");
    ensure!(
        read["data"] == fed.as_str(),
        "received {} ({}), QEMU was to feed {fed:?}",
        read["data"],
        read["detail"]
    );
    Ok(Outcome::PassWith(format!(
        "sent {text:?}, received {}",
        read["data"]
    )))
}

/// `selftest` on the balloon: its queues' maxima differ (128 and 32 on
/// QEMU with free-page-reporting=on), every queue is brought up at
/// min(128, its own maximum), and the outcome is "bring-up only" with exit
/// status 0.
fn balloon_selftest(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let (_, info) = cli_json(&["info", "--json", &dev.bdf])?;
    let maxima: Vec<u64> = info["queues"]
        .as_array()
        .context("no queues")?
        .iter()
        .filter_map(|q| q["max_size"].as_u64())
        .collect();
    ensure!(
        maxima.iter().any(|&m| m != maxima[0]),
        "the queues' maxima are all alike ({maxima:?}): this case would prove nothing"
    );
    let (status, v) = cli_json(&["selftest", "--json", &dev.bdf])?;
    ensure!(status.success(), "exit {status}: {v}");
    ensure!(v["outcome"] == "bring-up only", "outcome {}", v["outcome"]);
    ensure!(v["failed"] == 0, "{v}");
    let sizes: Vec<u64> = v["queue_sizes"]
        .as_array()
        .context("no queue_sizes")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let want: Vec<u64> = maxima.iter().map(|&m| m.min(SELFTEST_RING)).collect();
    ensure!(
        sizes == want,
        "queue sizes {sizes:?}, want {want:?} (maxima {maxima:?})"
    );
    Ok(Outcome::PassWith(format!(
        "maxima {maxima:?}, sizes {sizes:?}"
    )))
}

/// `selftest` on the crypto device, as a user reads it: exit status 0 and
/// the last line names the outcome.
fn crypto_selftest(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let r = run_cli(&["selftest", &dev.bdf], None)?;
    ensure!(
        r.status.success(),
        "exit {}: {}{}",
        r.status,
        r.stdout,
        r.stderr
    );
    ensure!(
        !r.stderr.contains("vfio_ioctls"),
        "vfio-ioctls warning at the default log level: {}",
        r.stderr
    );
    let last = r.stdout.lines().last().unwrap_or_default();
    ensure!(
        last == "bring-up only: 1 passed, 0 failed",
        "last line {last:?}: {}",
        r.stdout
    );
    ensure!(
        r.stdout.contains("no I/O check for crypto devices"),
        "{}",
        r.stdout
    );
    Ok(Outcome::Pass)
}
