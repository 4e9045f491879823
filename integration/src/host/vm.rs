//! One QEMU boot: spawn, stream the serial console, enforce the timeout,
//! always kill QEMU by its pid.
//!
//! The console is read line by line on a thread; every line goes to the
//! console log and a ring of the last [`TAIL_LINES`], and each protocol
//! event is handed to the caller while the VM still runs.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::protocol::{self, Event};

/// Console lines kept for the dump on failure.
pub const TAIL_LINES: usize = 200;

/// Set by the SIGINT/SIGTERM handler; the event loop then stops the VM.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A spawned QEMU that is killed (by pid) and reaped when dropped, so no
/// exit path of the harness leaves it running.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            eprintln!("lab: killing QEMU (pid {})", self.0.id());
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// How a boot ended.
#[derive(Debug)]
pub struct BootReport {
    /// Every protocol event, in order.
    pub events: Vec<Event>,
    /// Malformed protocol lines.
    pub protocol_errors: Vec<String>,
    /// The last console lines.
    pub tail: VecDeque<String>,
    /// QEMU's exit status, `None` when it was killed on timeout/interrupt.
    pub status: Option<ExitStatus>,
    /// Why the harness killed QEMU, if it did.
    pub killed: Option<String>,
    /// From spawn to `/init`'s first line.
    pub init_after: Option<Duration>,
    /// From spawn to QEMU's exit.
    pub elapsed: Duration,
}

impl BootReport {
    /// `lab-guest`'s exit code, when `/init` printed its sentinel.
    pub fn runner_exit(&self) -> Option<i64> {
        self.events.iter().find_map(|e| match e {
            Event::Exit { rc } => Some(*rc),
            _ => None,
        })
    }
}

/// Boot `cmd` (a fully built QEMU command line, stdio untouched) and stream
/// its console until QEMU exits or `timeout` passes. `on_event` sees each
/// protocol event as it arrives.
///
/// # Errors
/// QEMU cannot be spawned or the console log cannot be written.
pub fn boot(
    mut cmd: Command,
    console_log: &PathBuf,
    timeout: Duration,
    mut on_event: impl FnMut(&Event),
) -> anyhow::Result<BootReport> {
    let mut log = std::fs::File::create(console_log)
        .with_context(|| format!("create {}", console_log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let stdout = child.stdout.take().context("QEMU stdout")?;
    let stderr = child.stderr.take().context("QEMU stderr")?;
    let mut qemu = Qemu(child);
    eprintln!("lab: QEMU started, pid {}", qemu.0.id());

    let (tx, rx) = mpsc::channel::<String>();
    let tx_err = tx.clone();
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx_err.send(format!("qemu stderr: {line}")).is_err() {
                break;
            }
        }
    });

    let deadline = t0 + timeout;
    let mut report = BootReport {
        events: Vec::new(),
        protocol_errors: Vec::new(),
        tail: VecDeque::with_capacity(TAIL_LINES),
        status: None,
        killed: None,
        init_after: None,
        elapsed: Duration::ZERO,
    };
    loop {
        if INTERRUPTED.load(Ordering::Relaxed) {
            report.killed = Some("interrupted".into());
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            report.killed = Some(format!("timed out after {} s", timeout.as_secs()));
            break;
        }
        let wait = (deadline - now).min(Duration::from_millis(500));
        match rx.recv_timeout(wait) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                writeln!(log, "{line}")?;
                if report.init_after.is_none() && line.contains("lab-init: up") {
                    report.init_after = Some(t0.elapsed());
                }
                match protocol::parse(&line) {
                    Ok(Some(ev)) => {
                        on_event(&ev);
                        report.events.push(ev);
                    }
                    Ok(None) => {}
                    Err(e) => report.protocol_errors.push(e),
                }
                if report.tail.len() == TAIL_LINES {
                    report.tail.pop_front();
                }
                report.tail.push_back(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both pipes closed: QEMU exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if report.killed.is_some() {
        eprintln!(
            "lab: killing QEMU (pid {}): {}",
            qemu.0.id(),
            report.killed.as_deref().unwrap_or_default()
        );
        let _ = qemu.0.kill();
        let _ = qemu.0.wait();
    } else {
        report.status = Some(qemu.0.wait().context("wait for QEMU")?);
    }
    drop(qemu);
    // The pipes close when QEMU dies, so these return.
    let _ = out_thread.join();
    let _ = err_thread.join();
    report.elapsed = t0.elapsed();
    Ok(report)
}
