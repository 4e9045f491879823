//! The soak (`VDPA_LAB_SOAK=<seconds>`, never in the default run): mixed
//! blk and net I/O with resets in between, on QEMU's devices, for that
//! long, with resources checked.
//!
//! Three `vdpa-bridge selftest --duration <seconds> --json` run side by
//! side, each repeating activation, its I/O and a reset:
//!
//! * blk0 (behind a root port): a read, GET_ID, sector 8 written, read
//!   back and restored, per round;
//! * blk_mq (four queues on two MSI-X vectors: the relay thread fans them
//!   out): a read on every queue, per round;
//! * net_user: an ARP request to QEMU's user-mode network, its reply, per
//!   round.
//!
//! Each reports its rounds and the file descriptors, threads, locked
//! memory (`VmLck`, where VFIO accounts the pages it pins for DMA), pinned
//! memory and DMA mappings after its first and its last round; none may
//! grow, and no round may fail.

use std::process::{Command, Stdio};

use anyhow::{ensure, Context as _};

use crate::guest::cases::bridge::cli;
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::Variant;

/// The suite.
pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "soak_blk0_blk_mq_net_user_io_with_resets".into(),
        needs: None,
        run: soak,
    }]
}

fn soak(ctx: &Ctx) -> CaseResult {
    let secs = ctx.manifest.soak.unwrap_or(60).to_string();
    let mut runs = Vec::new();
    for (v, extra) in [
        (Variant::Blk0, &["--allow-write"][..]),
        (Variant::BlkMq, &[][..]),
        (Variant::NetUser, &[][..]),
    ] {
        let dev = ctx
            .manifest
            .device(v)
            .with_context(|| format!("no {} device in this run", v.name()))?;
        let child = Command::new(cli()?)
            .args(["selftest", "--json", "--duration", &secs])
            .args(extra)
            .arg(&dev.bdf)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        runs.push((v, child));
    }
    let mut summary = Vec::new();
    let mut failures = Vec::new();
    for (v, child) in runs {
        let out = child.wait_with_output()?;
        let report: serde_json::Value = match serde_json::from_slice(&out.stdout) {
            Ok(r) => r,
            Err(_) => {
                failures.push(format!(
                    "{}: no report: {}",
                    v.name(),
                    String::from_utf8_lossy(&out.stderr)
                ));
                continue;
            }
        };
        let s = &report["soak"];
        summary.push(format!(
            "{}: {} rounds ({} failed) in {:.0} s, first {} last {}",
            v.name(),
            s["rounds"],
            s["failed_rounds"],
            s["seconds"].as_f64().unwrap_or(0.0),
            s["first"],
            s["last"]
        ));
        println!("soak: {}", summary.last().map_or("", String::as_str));
        if !out.status.success() || report["failed"] != 0 {
            let failed: Vec<String> = report["checks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["ok"] == false)
                .map(|c| format!("{}: {}", c["name"], c["detail"]))
                .collect();
            failures.push(format!("{}: {}", v.name(), failed.join("; ")));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join(" | "));
    Ok(Outcome::PassWith(summary.join(" | ")))
}
