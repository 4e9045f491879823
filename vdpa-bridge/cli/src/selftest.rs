//! `vdpa-bridge selftest`: bring a device up through the plugin exactly as
//! a VMM does (guest memory, the guest driver's rings, kick eventfds in,
//! irqfd-like eventfds out), then do real I/O through the guest rings where
//! the device type has a check:
//!
//! | type | I/O |
//! | --- | --- |
//! | block | a read on every queue, GET_ID, a sector written, read back and restored (`allow_write`) |
//! | net | ARP for `arp_target` |
//! | rng | [`RNG_BYTES`] bytes read, which must not all be the same value |
//! | console | port 0 (no MULTIPORT): a text sent on its transmitq, whatever the other side sends read from its receiveq |
//!
//! Any other type is brought up to DRIVER_OK and reset: the outcome is
//! [`Outcome::BringUpOnly`], not a failure. Every queue is sized by its own
//! maximum ([`Guest::queues_sized`]).
//!
//! With [`Options::duration`] (a soak) the round (activation, I/O, reset)
//! repeats until that much time has passed, and the process's file
//! descriptors, threads, locked and pinned memory and the device's DMA
//! mappings are sampled after the first round and at the end: they must
//! not grow. Between rounds the device's removal request is checked: when
//! the host asks for the device back (an ordered removal), the device is
//! released at once and the run ends with [`HostWantsDevice`].

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde::Serialize;

use vdpa_bridge::types::{features, DeviceType};
use vdpa_bridge::{DmaMapper, VdpaOps};
use vdpa_plugin::{BridgeDevice, DeviceOptions, KickPolicy};
use vdpa_testkit::driver::blk::{T_GET_ID, T_IN, T_OUT};
use vdpa_testkit::driver::net;
use vdpa_testkit::harness::{Guest, Mem, TestInterrupt};

/// Bytes the entropy check reads.
pub const RNG_BYTES: usize = 64;

/// Ring size the harness asks for; each queue gets this or its own
/// maximum if smaller.
const RING_SIZE: u16 = 128;

/// Queues a bring-up lays out at most (the harness's 32 MiB of guest
/// memory holds 64 queues' rings and buffers).
pub const MAX_QUEUES: u16 = 64;

/// What `selftest` does besides bringing the device up.
#[derive(Clone, Debug)]
pub struct Options {
    /// Write (and restore) a sector of a block device.
    pub allow_write: bool,
    /// Address a net device ARPs for.
    pub arp_target: Ipv4Addr,
    /// Our address in the ARP request.
    pub arp_source: Ipv4Addr,
    /// Relay kicks through the plugin's relay thread.
    pub relay_kicks: bool,
    /// What a console device is sent on port 0.
    pub console_text: String,
    /// How long to wait for data from a console's other side.
    pub console_wait: Duration,
    /// Repeat the round until this much time has passed (a soak).
    pub duration: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_write: false,
            arp_target: Ipv4Addr::new(10, 0, 2, 2),
            arp_source: Ipv4Addr::new(10, 0, 2, 15),
            relay_kicks: false,
            console_text: "vdpa-bridge selftest\n".into(),
            console_wait: Duration::from_secs(1),
            duration: None,
        }
    }
}

/// How a self test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Bring-up and every I/O check passed.
    #[serde(rename = "passed")]
    Passed,
    /// Bring-up to DRIVER_OK worked; there is no I/O check for the type.
    #[serde(rename = "bring-up only")]
    BringUpOnly,
    /// A check failed.
    #[serde(rename = "failed")]
    Failed,
}

impl Outcome {
    /// As printed and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::BringUpOnly => "bring-up only",
            Outcome::Failed => "failed",
        }
    }

    /// Whether the command exits 0.
    pub fn is_success(self) -> bool {
        self != Outcome::Failed
    }
}

/// One check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked (`blk read queue 0`, `rng read`).
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What happened.
    pub detail: String,
    /// Data the check sent or received, where that is the point (console
    /// text, as UTF-8 with replacement characters; entropy, in hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// What `selftest` reports (`--json` prints it; keys are stable).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What was opened.
    pub device: String,
    /// Backend kind.
    pub backend: &'static str,
    /// Device type name.
    pub device_type: &'static str,
    /// Negotiated feature bits, hex.
    pub negotiated_features: String,
    /// Queues brought up.
    pub queues: usize,
    /// Their ring sizes, by queue (each at most the queue's own maximum).
    pub queue_sizes: Vec<u16>,
    /// How the plugin wired kicks and interrupts.
    pub wiring: String,
    /// The checks, bring-up first.
    pub checks: Vec<Check>,
    /// Checks passed.
    pub passed: usize,
    /// Checks failed.
    pub failed: usize,
    /// The outcome.
    pub outcome: Outcome,
    /// What a soak ([`Options::duration`]) did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<Soak>,
}

/// What a soak did.
#[derive(Clone, Debug, Serialize)]
pub struct Soak {
    /// Rounds run (activation, I/O, reset).
    pub rounds: u64,
    /// Rounds with a failed check.
    pub failed_rounds: u64,
    /// How long it ran, in seconds.
    pub seconds: f64,
    /// Resources after the first round.
    pub first: Resources,
    /// Resources after the last round.
    pub last: Resources,
}

/// What the process and the device hold (a soak compares these).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Locked memory (`VmLck`, where VFIO accounts pinned DMA pages), KiB.
    pub locked_kib: u64,
    /// Pinned memory (`VmPin`), KiB.
    pub pinned_kib: u64,
    /// The device's DMA mappings.
    pub dma_mappings: usize,
}

impl Resources {
    fn sample(dma_mappings: usize) -> Resources {
        let count = |dir: &str| std::fs::read_dir(dir).map_or(0, Iterator::count);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Resources {
            fds: count("/proc/self/fd"),
            threads: count("/proc/self/task"),
            locked_kib: kib("VmLck:"),
            pinned_kib: kib("VmPin:"),
            dma_mappings,
        }
    }
}

/// The host asked for the device back (an ordered removal) during a run;
/// the device was released.
#[derive(Debug, thiserror::Error)]
#[error("{device}: the host asked for the device back (an ordered removal such as `echo 1 > /sys/bus/pci/devices/<address>/remove`); released it {released_in:?} after the request was seen, after {rounds} round(s)")]
pub struct HostWantsDevice {
    /// The device.
    pub device: String,
    /// Rounds completed.
    pub rounds: u64,
    /// How long the release took.
    pub released_in: Duration,
}

/// Whether `selftest` does I/O on devices of type `t` (otherwise it
/// brings them up only).
pub fn has_io_check(t: DeviceType) -> bool {
    matches!(
        t,
        DeviceType::Block | DeviceType::Net | DeviceType::Rng | DeviceType::Console
    )
}

/// Queues the self test brings up on a device of type `t` with `n`
/// queues: the ones its I/O uses (net: rx/tx of pair 0; console: port 0's
/// receiveq/transmitq without MULTIPORT; rng: the requestq), every queue
/// otherwise, at most [`MAX_QUEUES`].
///
/// # Errors
/// The device has fewer queues than its type's I/O needs.
pub fn queues_for(t: DeviceType, n: u16) -> Result<u16> {
    let need = match t {
        DeviceType::Net | DeviceType::Console => 2,
        DeviceType::Rng => 1,
        _ => return Ok(n.clamp(1, MAX_QUEUES)),
    };
    ensure!(
        n >= need,
        "the device has {n} queues; a {} device's I/O needs {need}",
        t.name()
    );
    Ok(need)
}

/// The outcome of `checks` on a device of type `t`.
pub fn outcome(t: DeviceType, checks: &[Check]) -> Outcome {
    if checks.iter().any(|c| !c.ok) {
        Outcome::Failed
    } else if has_io_check(t) {
        Outcome::Passed
    } else {
        Outcome::BringUpOnly
    }
}

/// Whether `bytes` look like entropy for the check: enough of them, not
/// all the same value.
///
/// # Errors
/// Too few bytes, or all equal.
pub fn check_entropy(bytes: &[u8]) -> Result<()> {
    ensure!(
        bytes.len() >= RNG_BYTES,
        "{} of {RNG_BYTES} bytes read",
        bytes.len()
    );
    if let Some(&first) = bytes.first() {
        ensure!(
            bytes.iter().any(|&b| b != first),
            "{} bytes all {first:#04x}: not entropy",
            bytes.len()
        );
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bring `dev` up through the plugin and do the I/O of its type.
///
/// # Errors
/// The plugin cannot open the device, or activation (DRIVER_OK) or the
/// final reset fails. A failed I/O check is a failed check in the report,
/// not an error.
pub fn run<B: VdpaOps + DmaMapper + Send + 'static>(
    name: String,
    backend: &'static str,
    dev: B,
    opts: &Options,
) -> Result<Report> {
    let t = DeviceType::from_id(dev.device_id());
    // Exactly what a VMM does: guest memory (shared, 32 MiB), the device
    // through the plugin's BridgeDevice, guest rings, kick eventfds in and
    // irqfd-like eventfds out.
    let mut g = Guest::new(32 << 20, RING_SIZE)?;
    let dopts = DeviceOptions {
        kick: if opts.relay_kicks {
            KickPolicy::Relay
        } else {
            KickPolicy::Auto
        },
        ..DeviceOptions::default()
    };
    let mut d = BridgeDevice::new(dev, g.mem.clone(), dopts).context("open through the plugin")?;
    let mut want = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM);
    if t == DeviceType::Net {
        want |= features::bit(net::F_MAC);
    }
    d.ack_features(d.features() & want)?;
    let negotiated = d.acked_features();
    let all = u16::try_from(d.queue_max_sizes().len()).unwrap_or(u16::MAX);
    let nq = queues_for(t, all)?;
    let irq = TestInterrupt::new(usize::from(nq), true)?;
    let removal = d.removal_request();
    let start = Instant::now();
    let mut rounds = 0u64;
    let mut failed_rounds = 0u64;
    let mut checks = Vec::new();
    let mut queue_sizes = Vec::new();
    let mut wiring = String::new();
    let mut first = None;
    loop {
        if rounds > 0 {
            d.ack_features(negotiated)?;
        }
        let round = round(&mut g, &mut d, &irq, t, nq, all, opts)?;
        rounds += 1;
        if rounds == 1 {
            queue_sizes = round.queue_sizes;
            wiring = round.wiring;
            checks = round.checks;
            first = Some(Resources::sample(d.dma().mappings().len()));
        } else if round.checks.iter().any(|c| !c.ok) {
            failed_rounds += 1;
            // The first few failures are kept; the count says the rest.
            if failed_rounds <= 10 {
                checks.extend(round.checks.into_iter().filter(|c| !c.ok).map(|c| Check {
                    name: format!("round {rounds}: {}", c.name),
                    ..c
                }));
            }
        }
        if let Some(fd) = &removal {
            if fd.read().is_ok() {
                let seen = Instant::now();
                let report = d.release();
                log::info!("released: {report:?}");
                return Err(HostWantsDevice {
                    device: name,
                    rounds,
                    released_in: seen.elapsed(),
                }
                .into());
            }
        }
        if opts.duration.is_none_or(|limit| start.elapsed() >= limit) {
            break;
        }
    }
    let soak = opts.duration.map(|_| {
        let first = first.unwrap_or_default();
        let last = Resources::sample(d.dma().mappings().len());
        let stable = last.fds <= first.fds
            && last.threads <= first.threads
            && last.locked_kib <= first.locked_kib
            && last.pinned_kib <= first.pinned_kib
            && last.dma_mappings <= first.dma_mappings;
        checks.push(Check {
            name: "resources after the first and the last round".into(),
            ok: stable,
            detail: format!("{first:?} -> {last:?}"),
            data: None,
        });
        Soak {
            rounds,
            failed_rounds,
            seconds: start.elapsed().as_secs_f64(),
            first,
            last,
        }
    });
    let failed = checks.iter().filter(|c| !c.ok).count();
    Ok(Report {
        device: name,
        backend,
        device_type: t.name(),
        negotiated_features: format!("{negotiated:#x}"),
        queues: usize::from(nq),
        queue_sizes,
        wiring,
        passed: checks.len() - failed,
        failed,
        outcome: outcome(t, &checks),
        checks,
        soak,
    })
}

/// What one round (activation, I/O, reset) gave.
struct Round {
    queue_sizes: Vec<u16>,
    wiring: String,
    checks: Vec<Check>,
}

/// Activate `d` with fresh guest rings, do the I/O of its type, reset it.
fn round<B: VdpaOps + DmaMapper + Send + 'static>(
    g: &mut Guest,
    d: &mut BridgeDevice<B, Mem>,
    irq: &Arc<TestInterrupt>,
    t: DeviceType,
    nq: u16,
    all: u16,
    opts: &Options,
) -> Result<Round> {
    let queues = g.queues_sized(&d.queue_max_sizes()[..usize::from(nq)])?;
    d.activate(g.mem.clone(), irq.clone(), queues)
        .context("activation (DRIVER_OK) failed")?;
    let queue_sizes = g.ring_sizes();
    let wiring = d.wiring().map(|w| format!("{w:?}")).unwrap_or_default();
    let mut checks = vec![Check {
        name: "bring-up".into(),
        ok: true,
        detail: format!(
            "DRIVER_OK with {nq} of {all} queues, sizes {queue_sizes:?}{}",
            if has_io_check(t) {
                String::new()
            } else {
                format!("; no I/O check for {} devices", t.name())
            }
        ),
        data: None,
    }];
    let mut io = Io {
        g,
        d,
        irq,
        checks: &mut checks,
    };
    match t {
        DeviceType::Block => io.block(nq, opts.allow_write),
        DeviceType::Net => io.net(opts.arp_target, opts.arp_source),
        DeviceType::Rng => io.rng(),
        DeviceType::Console => io.console(&opts.console_text, opts.console_wait),
        _ => {}
    }
    d.reset().context("reset")?;
    Ok(Round {
        queue_sizes,
        wiring,
        checks,
    })
}

/// The I/O checks, on an active device.
struct Io<'a, B: VdpaOps + DmaMapper + Send + 'static> {
    g: &'a mut Guest,
    d: &'a mut BridgeDevice<B, Mem>,
    irq: &'a TestInterrupt,
    checks: &'a mut Vec<Check>,
}

impl<B: VdpaOps + DmaMapper + Send + 'static> Io<'_, B> {
    fn check(&mut self, name: &str, r: Result<String>) {
        self.check_with(name, r.map(|d| (d, None)));
    }

    fn check_with(&mut self, name: &str, r: Result<(String, Option<String>)>) {
        let (ok, detail, data) = match r {
            Ok((d, data)) => (true, d, data),
            Err(e) => (false, format!("{e:#}"), None),
        };
        self.checks.push(Check {
            name: name.to_owned(),
            ok,
            detail,
            data,
        });
    }

    fn block(&mut self, nq: u16, allow_write: bool) {
        for q in 0..nq {
            let start = Instant::now();
            let mut buf = vec![0u8; 4096];
            let r = self
                .g
                .blk(q, T_IN, 0, &mut buf, &self.irq.queues[usize::from(q)])
                .map_err(anyhow::Error::from)
                .and_then(|st| match st {
                    0 => Ok(format!(
                        "4 KiB at sector 0 in {:?}, first bytes {:02x?}",
                        start.elapsed(),
                        &buf[..8]
                    )),
                    s => Err(anyhow::anyhow!("status {s}")),
                });
            self.check(&format!("blk read queue {q}"), r);
        }
        let mut id = vec![0u8; 20];
        let r = match self.g.blk(0, T_GET_ID, 0, &mut id, &self.irq.queues[0]) {
            Ok(0) => {
                let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
                Ok(String::from_utf8_lossy(&id[..end]).into_owned())
            }
            Ok(2) => Ok("unsupported by the device".into()),
            Ok(s) => Err(anyhow::anyhow!("status {s}")),
            Err(e) => Err(e.into()),
        };
        self.check("blk get id", r);
        if !allow_write {
            self.check(
                "blk write/read",
                Ok("skipped: read-only without --allow-write".into()),
            );
            return;
        }
        let g = &mut *self.g;
        let fd = &self.irq.queues[0];
        let r = (|| -> Result<String> {
            let sector = 8;
            let mut orig = vec![0u8; 512];
            ensure_ok(g.blk(0, T_IN, sector, &mut orig, fd)?)?;
            let mut pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
            ensure_ok(g.blk(0, T_OUT, sector, &mut pattern, fd)?)?;
            let mut back = vec![0u8; 512];
            ensure_ok(g.blk(0, T_IN, sector, &mut back, fd)?)?;
            ensure_ok(g.blk(0, T_OUT, sector, &mut orig, fd)?)?;
            if back != pattern {
                bail!("read back differs from what was written");
            }
            Ok(format!("sector {sector} written, read back, restored"))
        })();
        self.check("blk write/read", r);
    }

    fn net(&mut self, target: Ipv4Addr, source: Ipv4Addr) {
        let (g, d, irq) = (&mut *self.g, &*self.d, self.irq);
        let r = (|| -> Result<String> {
            let mut mac = [0u8; 6];
            d.read_config(0, &mut mac)?;
            g.net_fill_rx(0)?;
            let req = net::arp_request(mac, source.octets(), target.octets());
            for _ in 0..10 {
                g.net_send(1, &req, &irq.queues[1])?;
                if let Some(f) = g.net_recv(0, &irq.queues[0], Duration::from_millis(500))? {
                    if let Some(peer) = net::parse_arp_reply(&f, target.octets()) {
                        return Ok(format!("{target} is at {peer:02x?}"));
                    }
                }
            }
            bail!("no ARP reply from {target} within 5 s")
        })();
        self.check("net arp", r);
    }

    /// Read [`RNG_BYTES`] bytes from the requestq (a device may return
    /// fewer per buffer than asked for).
    fn rng(&mut self) {
        let (g, irq) = (&mut *self.g, self.irq);
        let r = (|| -> Result<(String, Option<String>)> {
            let start = Instant::now();
            let mut got = Vec::new();
            while got.len() < RNG_BYTES && start.elapsed() < Duration::from_secs(5) {
                g.post_receive(0, RNG_BYTES as u32)?;
                match g.wait_receive(0, &irq.queues[0], Duration::from_secs(5))? {
                    Some(b) => got.extend_from_slice(&b),
                    None => break,
                }
            }
            got.truncate(RNG_BYTES);
            check_entropy(&got)?;
            Ok((
                format!("{} bytes in {:?}", got.len(), start.elapsed()),
                Some(hex(&got)),
            ))
        })();
        self.check_with("rng read", r);
    }

    /// Port 0 of a console without MULTIPORT: receiveq 0, transmitq 1.
    /// Receive buffers go up first, so what the other side sends while we
    /// transmit has somewhere to land.
    fn console(&mut self, text: &str, wait: Duration) {
        const RX_LEN: u32 = 4096;
        let (g, irq) = (&mut *self.g, self.irq);
        let posted = g
            .post_receive(0, RX_LEN)
            .and_then(|()| g.post_receive(0, RX_LEN));
        let r = (|| -> Result<(String, Option<String>)> {
            ensure!(!text.is_empty(), "nothing to send");
            g.send(1, text.as_bytes(), &irq.queues[1])?;
            Ok((
                format!("{} bytes sent on port 0, taken by the device", text.len()),
                Some(text.to_owned()),
            ))
        })();
        let read = (|| -> Result<(String, Option<String>)> {
            posted?;
            let mut got = Vec::new();
            // Data may arrive in pieces: after the first, wait briefly for more.
            let mut window = wait;
            while let Some(b) = g.wait_receive(0, &irq.queues[0], window)? {
                got.extend_from_slice(&b);
                g.post_receive(0, RX_LEN)?;
                window = Duration::from_millis(200);
            }
            if got.is_empty() {
                return Ok((
                    format!("nothing received within {wait:?} (the other side sent nothing)"),
                    None,
                ));
            }
            let s = String::from_utf8_lossy(&got).into_owned();
            Ok((format!("{} bytes received on port 0", got.len()), Some(s)))
        })();
        self.check_with("console write", r);
        self.check_with("console read", read);
    }
}

fn ensure_ok(status: u8) -> Result<()> {
    match status {
        0 => Ok(()),
        s => bail!("blk request failed with status {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
    use vdpa_testkit::emu::{EmuConfig, EmulatedFunction};

    fn emulated(cfg: EmuConfig) -> VpVdpa<EmulatedFunction> {
        VpVdpa::open(Arc::new(EmulatedFunction::new(cfg)), OpenOptions::default()).unwrap()
    }

    fn check(name: &str, ok: bool) -> Check {
        Check {
            name: name.into(),
            ok,
            detail: String::new(),
            data: None,
        }
    }

    #[test]
    fn type_without_io_check_is_bring_up_only_not_a_failure() {
        let checks = [check("bring-up", true)];

        let o = outcome(DeviceType::Balloon, &checks);

        assert_eq!(o, Outcome::BringUpOnly);
        assert!(o.is_success());
        assert_eq!(serde_json::to_string(&o).unwrap(), "\"bring-up only\"");
    }

    #[test]
    fn any_failed_check_fails_and_io_types_pass() {
        let good = [check("bring-up", true), check("rng read", true)];
        let bad = [check("bring-up", true), check("rng read", false)];

        assert_eq!(outcome(DeviceType::Rng, &good), Outcome::Passed);
        assert_eq!(outcome(DeviceType::Rng, &bad), Outcome::Failed);
        assert_eq!(outcome(DeviceType::Crypto, &bad), Outcome::Failed);
        assert!(!Outcome::Failed.is_success());
    }

    #[test]
    fn queues_follow_what_the_type_uses() {
        assert_eq!(queues_for(DeviceType::Net, 3).unwrap(), 2);
        assert_eq!(queues_for(DeviceType::Console, 4).unwrap(), 2);
        assert_eq!(queues_for(DeviceType::Rng, 1).unwrap(), 1);
        assert_eq!(queues_for(DeviceType::Balloon, 4).unwrap(), 4);
        assert_eq!(queues_for(DeviceType::Block, 200).unwrap(), MAX_QUEUES);
        assert!(queues_for(DeviceType::Console, 1).is_err());
    }

    #[test]
    fn entropy_must_not_be_one_value_repeated() {
        let mut bytes = vec![0x5a; RNG_BYTES];

        assert!(check_entropy(&bytes).is_err());
        bytes[17] = 0x5b;
        assert!(check_entropy(&bytes).is_ok());
        assert!(check_entropy(&bytes[..RNG_BYTES - 1]).is_err());
    }

    /// The failure the issue names: a device whose last queue's maximum is
    /// below the ring size the harness wants. Sized after queue 0, the
    /// last queue would exceed its maximum and activation would fail.
    #[test]
    fn each_queue_is_sized_by_its_own_maximum() {
        let dev = emulated(EmuConfig {
            num_queues: 3,
            last_queue_max_size: Some(32),
            ..EmuConfig::default()
        });

        let r = run("emulated".into(), "emulated", dev, &Options::default()).unwrap();

        assert_eq!(r.queue_sizes, [128, 128, 32]);
        assert_eq!(r.outcome, Outcome::Passed, "{:?}", r.checks);
        assert_eq!(r.failed, 0);
        assert!(r
            .checks
            .iter()
            .any(|c| c.name == "blk read queue 2" && c.ok));
    }

    #[test]
    fn a_soak_repeats_rounds_and_finds_resources_stable() {
        let opts = Options {
            allow_write: true,
            duration: Some(Duration::from_millis(300)),
            ..Options::default()
        };
        let r = run(
            "emu".into(),
            "emulated",
            emulated(EmuConfig::default()),
            &opts,
        )
        .unwrap();
        let soak = r.soak.as_ref().unwrap();
        assert!(soak.rounds > 1, "{soak:?}");
        assert_eq!(soak.failed_rounds, 0);
        assert_eq!(soak.first.dma_mappings, 1);
        assert_eq!(soak.last.dma_mappings, 1);
        // The process's fds and threads also count the other tests running
        // beside this one: only the device's checks are asserted here.
        let (resources, io): (Vec<&Check>, Vec<&Check>) = r
            .checks
            .iter()
            .partition(|c| c.name.starts_with("resources"));
        assert_eq!(resources.len(), 1);
        assert!(io.iter().all(|c| c.ok), "{io:?}");
        assert_eq!(io.len(), 4, "{io:?}");
    }

    #[test]
    fn a_removal_request_ends_a_soak_with_the_device_released() {
        let f = Arc::new(EmulatedFunction::new(EmuConfig::default()));
        let dev = VpVdpa::open(Arc::clone(&f), OpenOptions::default()).unwrap();
        let asker = Arc::clone(&f);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            asker.request_removal();
            Instant::now()
        });
        let opts = Options {
            duration: Some(Duration::from_secs(30)),
            ..Options::default()
        };
        let e = run("emu".into(), "emulated", dev, &opts).unwrap_err();
        let asked = t.join().unwrap();
        let took = asked.elapsed();
        let wanted = e
            .downcast_ref::<HostWantsDevice>()
            .expect("HostWantsDevice");
        assert!(wanted.rounds >= 1);
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(e.to_string().contains("asked for the device back"), "{e}");
        // Released: nothing holds the function any more.
        assert_eq!(Arc::strong_count(&f), 1);
    }
}
