//! Faults the lab makes on QEMU's devices: ordered removal.
//!
//! `echo 1 > /sys/bus/pci/devices/<bdf>/remove` on a function bound to
//! vfio-pci is an *ordered* removal: vfio-pci's remove waits until every
//! user has closed the device, signalling its request interrupt
//! (`VFIO_PCI_REQ_IRQ_INDEX`) meanwhile. A user that registered no
//! request eventfd is never told, and the removal hangs until it closes
//! the device by itself. The cases here show both, on blk0 (behind a
//! `pcie-root-port`, as a VF would be), and put the device back afterwards
//! (`/sys/bus/pci/rescan`, then vfio-pci again).
//!
//! The Cloud Hypervisor case (the VMM releases the device, then unplugs it
//! from its guest) is in `cases/ch.rs`; it uses [`remove_timed`] and
//! [`restore`] from here.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

use crate::guest::cases::bridge::cli;
use crate::guest::sys;
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::{Device, Variant};

/// What the issue asks of a user that is told: the device let go within
/// this long.
pub const RELEASE_WITHIN: Duration = Duration::from_secs(2);

/// How long a removal may take before the case gives up waiting (and
/// ends what holds the device, so the removal can finish).
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the control holds the device without a request eventfd.
const HELD: Duration = Duration::from_secs(3);

/// The suite.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "faults_blk0_removal_waits_for_a_user_without_a_request_eventfd".into(),
            needs: Some(Variant::Blk0),
            run: removal_blocks_without_request,
        },
        Case {
            name: "faults_blk0_removal_releases_the_cli_within_2s".into(),
            needs: Some(Variant::Blk0),
            run: removal_under_the_cli,
        },
    ]
}

/// A removal started in a thread: [`Removal::wait`] says how long it took.
pub struct Removal {
    started: Instant,
    done: mpsc::Receiver<std::io::Result<()>>,
}

/// Start removing `dev` (`echo 1 > .../remove`) in a thread: the write
/// blocks until vfio-pci lets the device go.
pub fn remove_timed(dev: &Device) -> Removal {
    let path = dev.sysfs().join("remove");
    let (tx, done) = mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        // The receiver may have given up; nothing to tell then.
        let _ = tx.send(std::fs::write(path, "1"));
    });
    Removal { started, done }
}

impl Removal {
    /// Wait up to `timeout` for the removal; `Ok(None)` if it is still
    /// blocked, else how long it took.
    pub fn wait(&self, timeout: Duration) -> anyhow::Result<Option<Duration>> {
        match self.done.recv_timeout(timeout) {
            Ok(r) => {
                r.context("writing 1 to the device's remove attribute")?;
                Ok(Some(self.started.elapsed()))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the removal thread died"),
        }
    }
}

/// Bring a removed device back: rescan the bus, wait for the function to
/// reappear and bind it to vfio-pci again.
pub fn restore(dev: &Device) -> anyhow::Result<()> {
    std::fs::write("/sys/bus/pci/rescan", "1").context("rescan")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dev.sysfs().exists() {
        ensure!(
            Instant::now() < deadline,
            "{} did not come back after a rescan",
            dev.bdf
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sys::bind_vfio_pci(&dev.bdf).context("binding the restored device to vfio-pci")?;
    Ok(())
}

/// The control: a user that holds the device through VFIO without a
/// request eventfd (the lab's own minimal opener) blocks the removal until
/// it closes the device, however long that is.
fn removal_blocks_without_request(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let held = sys::VfioDevice::open(&dev.bdf)?;
    let removal = remove_timed(dev);
    let early = removal.wait(HELD)?;
    drop(held);
    let took = removal.wait(REMOVAL_TIMEOUT)?;
    restore(dev)?;
    ensure!(
        early.is_none(),
        "the removal finished in {early:?} while the device was held"
    );
    let took = took.context("the removal did not finish after the device was closed")?;
    Ok(Outcome::PassWith(format!(
        "removal blocked while held, finished {:?} after the close",
        took.saturating_sub(HELD)
    )))
}

/// Read `child`'s stderr lines into a channel.
fn lines_of(child: &mut Child) -> anyhow::Result<mpsc::Receiver<String>> {
    let err = child.stderr.take().context("no stderr pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Wait for a line containing `what`; every line seen goes to `seen`.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    what: &str,
    timeout: Duration,
    seen: &mut Vec<String>,
) -> bool {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(what);
                seen.push(l);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// `vdpa-bridge selftest --duration 120` (reads, resets, reads...) holds
/// blk0; the removal's request reaches it, it releases the device and
/// exits with a clear error, and the removal finishes, all within
/// [`RELEASE_WITHIN`]. The device, rescanned and bound again, works.
fn removal_under_the_cli(ctx: &Ctx) -> CaseResult {
    let dev = ctx.dev()?;
    let mut child = Command::new(cli()?)
        .args(["selftest", "--duration", "120", &dev.bdf])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let rx = lines_of(&mut child)?;
    let mut seen = Vec::new();
    // The transport logs the function's opening; rounds start right after.
    if !wait_line(&rx, "opened", Duration::from_secs(60), &mut seen) {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the CLI did not open {}: {}", dev.bdf, seen.join(" | "));
    }
    std::thread::sleep(Duration::from_millis(500));
    let removal = remove_timed(dev);
    let took = removal.wait(REMOVAL_TIMEOUT)?;
    if took.is_none() {
        // Unblock the removal before failing: end the CLI (ours).
        let _ = child.kill();
    }
    let status = child.wait()?;
    let exited = removal.started.elapsed();
    // The rest of what it said (its stderr closes as it exits).
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
        seen.push(l);
    }
    restore(dev)?;
    let took = took.with_context(|| {
        format!(
            "the removal was still blocked after {REMOVAL_TIMEOUT:?}: {}",
            seen.join(" | ")
        )
    })?;
    ensure!(!status.success(), "the CLI exited 0 after the removal");
    let told = seen.iter().any(|l| l.contains("asked for the device back"));
    ensure!(told, "no clear error from the CLI: {}", seen.join(" | "));
    ensure!(
        took < RELEASE_WITHIN,
        "the removal took {took:?} (CLI exited after {exited:?})"
    );
    // The device works again.
    let out = Command::new(cli()?).args(["selftest", &dev.bdf]).output()?;
    ensure!(
        out.status.success(),
        "selftest after the restore: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Outcome::PassWith(format!(
        "removal finished in {} ms; the CLI exited {} ms after it started",
        took.as_millis(),
        exited.as_millis()
    )))
}
