//! The network namespace holding the multi-queue tap for `net_mq`.
//!
//! The suite creates `vdpalab-<pid>`, a multi-queue tap with an address in
//! it, and runs QEMU inside it (`ip netns exec`, which execs, so QEMU keeps
//! the pid the harness spawned). Dropping [`Netns`] deletes the tap and the
//! namespace, also when the run failed.

use std::process::Command;

use anyhow::{ensure, Context as _};

use super::devices::{TAP_ADDR, TAP_NAME};

/// A network namespace this process created.
#[derive(Debug)]
pub struct Netns {
    /// Its name, `vdpalab-<pid>`.
    pub name: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (install iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Netns {
    /// Create the namespace and its multi-queue tap, addressed and up.
    ///
    /// # Errors
    /// Any `ip` step fails (e.g. no `CAP_NET_ADMIN`); what was created is
    /// removed again.
    pub fn create() -> anyhow::Result<Self> {
        let name = format!("vdpalab-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            n,
            "tuntap",
            "add",
            "dev",
            TAP_NAME,
            "mode",
            "tap",
            "multi_queue",
        ])?;
        ip(&["-n", n, "addr", "add", TAP_ADDR, "dev", TAP_NAME])?;
        ip(&["-n", n, "link", "set", TAP_NAME, "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A persistent tap is not guaranteed to die with its namespace.
        let _ = ip(&["-n", &self.name, "link", "del", TAP_NAME]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("lab: cleanup: {e:#}");
        }
    }
}
