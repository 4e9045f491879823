//! Cloud Hypervisor end to end (needs `CLOUD_HYPERVISOR`, a build with
//! `patches/`, and `CH_REMOTE` for hot-plug): inside the lab VM (nested
//! KVM, TCG outside), Cloud Hypervisor with its default seccomp filters and
//! `--landlock` boots a small guest (`host::initramfs::L3_INIT`) whose
//! device is one of QEMU's virtio-pci devices claimed through
//! `--vdpa path=<PCI address>`:
//!
//! * blk: the inner guest checks sector 0 against the host's pattern,
//!   writes sector 8 (declared; the host checks the image afterwards) and
//!   its negotiated features lack the bit masked with `features_mask=`;
//! * net: DHCP lease from QEMU's user-mode network, ping 10.0.2.2;
//! * hot-plug and unplug of the blk device through `ch-remote`;
//! * throughput: sequential and 4 KiB random reads in the inner guest
//!   (`l3-blkperf`, O_DIRECT), Cloud Hypervisor's own VFIO passthrough vs
//!   the bridge, same device, alternating boots.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::{ChRun, Variant};

/// The suite.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |name: &str, v: Variant, run: fn(&Ctx) -> CaseResult| {
        out.push(Case {
            name: name.to_string(),
            needs: Some(v),
            run,
        })
    };
    add(
        "ch_blk0_inner_guest_io_and_masked_feature",
        Variant::Blk0,
        ch_blk,
    );
    add(
        "ch_net_user_inner_guest_dhcp_and_ping",
        Variant::NetUser,
        ch_net,
    );
    add(
        "ch_blk0_guest_reboot_reopens_the_bridged_device",
        Variant::Blk0,
        ch_reboot,
    );
    add(
        "ch_blk0_hotplug_and_unplug_through_the_api",
        Variant::Blk0,
        ch_hotplug,
    );
    add(
        "ch_net_user_hotplug_and_unplug_through_the_api",
        Variant::NetUser,
        ch_hotplug_net,
    );
    add(
        "ch_blk0_throughput_passthrough_vs_bridge",
        Variant::Blk0,
        ch_perf,
    );
    add(
        "ch_blk0_blk1_throughput_side_by_side_in_one_guest",
        Variant::Blk0,
        ch_perf_pair,
    );
    out
}

/// A running Cloud Hypervisor whose console lines arrive on a channel;
/// killed by pid on drop.
struct Ch {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Ch {
    fn drop(&mut self) {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
    }
}

impl Ch {
    fn start(ch: &ChRun, mode: &str, extra: &[String], landlock: bool) -> anyhow::Result<Ch> {
        ensure!(
            std::path::Path::new("/dev/kvm").exists(),
            "no /dev/kvm (nested KVM) in the lab VM"
        );
        // Boot files on the guest's tmpfs: Landlock rules do not hold on
        // the 9p share, whose inodes are not stable.
        let dir = PathBuf::from("/tmp/ch-l3");
        std::fs::create_dir_all(&dir)?;
        let kernel = dir.join("vmlinuz");
        let initramfs = dir.join("initramfs.cpio.gz");
        std::fs::copy(&ch.kernel, &kernel).context("copy the inner kernel")?;
        std::fs::copy(&ch.initramfs, &initramfs).context("copy the inner initramfs")?;
        // `-v`: the bridge logs how its doorbells are wired (info level).
        let mut args: Vec<String> = [
            "-v",
            "--kernel",
            &kernel.display().to_string(),
            "--initramfs",
            &initramfs.display().to_string(),
            "--cmdline",
            &format!("console=ttyS0 quiet panic=-1 l3={mode}"),
            "--serial",
            "tty",
            "--console",
            "off",
            "--cpus",
            "boot=1",
            "--memory",
            "size=512M,shared=on",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if landlock {
            args.push("--landlock".into());
        }
        args.extend(extra.iter().cloned());
        let mut child = Command::new(&ch.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", ch.binary.display()))?;
        let (tx, rx) = mpsc::channel::<String>();
        let out = child.stdout.take().context("no stdout")?;
        let err = child.stderr.take().context("no stderr")?;
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("ch-stderr: {l}"));
            }
        });
        Ok(Ch {
            child,
            lines: rx,
            seen: Vec::new(),
        })
    }

    /// Stop Cloud Hypervisor now (SIGKILL by pid) and reap it.
    fn kill(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            // SAFETY: kill(2) of the child we spawned, by its pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }

    /// Wait for a console line containing `what`.
    fn wait(&mut self, what: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    println!("  | {l}");
                    let hit = l.contains(what);
                    self.seen.push(l);
                    if hit {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        bail!(
                            "Cloud Hypervisor exited ({st}) before {what}: {}",
                            self.tail()
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        bail!("no {what} within {timeout:?}: {}", self.tail())
    }

    fn tail(&self) -> String {
        let n = self.seen.len().saturating_sub(12);
        self.seen[n..].join(" / ")
    }

    fn has(&self, what: &str) -> bool {
        self.seen.iter().any(|l| l.contains(what))
    }

    /// Feature bits of the inner guest's virtio device of type `id`.
    fn features(&self, id: &str) -> anyhow::Result<String> {
        self.seen
            .iter()
            .filter_map(|l| l.split("L3-FEATURES ").nth(1))
            .find_map(|f| f.strip_prefix(&format!("{id} ")))
            .map(|s| s.trim().to_string())
            .with_context(|| format!("no features line of a device {id}"))
    }

    /// The numbers of every console line carrying `tag`
    /// (`<tag> <n> <n> ...`).
    fn samples(&self, tag: &str) -> Vec<Vec<u64>> {
        self.seen
            .iter()
            .filter_map(|l| l.split(tag).nth(1))
            .map(|r| {
                r.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .collect()
    }
}

/// The bridge's log line when Cloud Hypervisor maps the device's doorbell
/// page over its notification area (patch 0005).
const DOORBELLS_MAPPED: &str = "doorbells mapped into the guest";

fn ch_or_skip<'a>(ctx: &Ctx<'a>) -> Result<&'a ChRun, Outcome> {
    ctx.manifest.ch.as_ref().ok_or_else(|| {
        Outcome::Skip(
            ctx.manifest
                .ch_skip
                .clone()
                .unwrap_or_else(|| "no Cloud Hypervisor configured".into()),
        )
    })
}

const TIMEOUT: Duration = Duration::from_secs(150);
/// Alternating rounds (boots per configuration) of the throughput case.
const ROUNDS: usize = 4;
/// Measurements per boot (`l3-blkperf` repetitions; the first is a warm-up).
const PERF_REPS: usize = 6;

fn ch_blk(ctx: &Ctx) -> CaseResult {
    let ch = match ch_or_skip(ctx) {
        Ok(c) => c,
        Err(skip) => return Ok(skip),
    };
    let dev = ctx.dev()?;
    let mask = !(1u64 << ch.masked_bit);
    ctx.declare_write(8 * 512, 512)?;
    let mut run = Ch::start(
        ch,
        "blk",
        &[
            "--vdpa".into(),
            format!("path={},num_queues=1,features_mask={mask:#x}", dev.bdf),
        ],
        true,
    )?;
    run.wait("L3-DONE", TIMEOUT)?;
    ensure!(
        run.has("L3-READ-OK"),
        "inner guest read wrong data: {}",
        run.tail()
    );
    ensure!(
        run.has("L3-WRITE-OK"),
        "inner guest write failed: {}",
        run.tail()
    );
    let bits = run.features("0x0002")?;
    let bit = |n: u32| bits.as_bytes().get(n as usize).copied() == Some(b'1');
    ensure!(
        !bit(ch.masked_bit),
        "masked bit {} negotiated: {bits}",
        ch.masked_bit
    );
    ensure!(
        bit(32) && bit(33),
        "VERSION_1/ACCESS_PLATFORM not negotiated: {bits}"
    );
    ensure!(
        run.has(DOORBELLS_MAPPED),
        "doorbells not mapped into the guest: {}",
        run.tail()
    );
    Ok(Outcome::PassWith(format!(
        "inner guest blk features {bits}"
    )))
}

/// The inner guest reads its disk and reboots; Cloud Hypervisor tears the
/// VM down and builds it again, so the bridged device is dropped and the
/// same VFIO group opened anew: the second boot must read the disk too.
fn ch_reboot(ctx: &Ctx) -> CaseResult {
    let ch = match ch_or_skip(ctx) {
        Ok(c) => c,
        Err(skip) => return Ok(skip),
    };
    let dev = ctx.dev()?;
    let mut run = Ch::start(
        ch,
        "reboot",
        &["--vdpa".into(), format!("path={},num_queues=1", dev.bdf)],
        true,
    )?;
    for boot in 1..=2 {
        run.wait("L3-REBOOTING", TIMEOUT)
            .with_context(|| format!("boot {boot}"))?;
    }
    let count = |what: &str| run.seen.iter().filter(|l| l.contains(what)).count();
    let (reads, mapped) = (count("L3-READ-OK"), count(DOORBELLS_MAPPED));
    ensure!(
        reads == 2,
        "{reads} good reads over two boots: {}",
        run.tail()
    );
    // The bridged device is built (and its doorbells mapped) once per boot.
    ensure!(
        mapped == 2,
        "doorbells mapped {mapped} times over two boots: {}",
        run.tail()
    );
    run.kill();
    Ok(Outcome::Pass)
}

fn ch_net(ctx: &Ctx) -> CaseResult {
    let ch = match ch_or_skip(ctx) {
        Ok(c) => c,
        Err(skip) => return Ok(skip),
    };
    let dev = ctx.dev()?;
    let mut run = Ch::start(
        ch,
        "net",
        &["--vdpa".into(), format!("path={},num_queues=3", dev.bdf)],
        true,
    )?;
    run.wait("L3-DONE", TIMEOUT)?;
    ensure!(run.has("L3-DHCP-OK"), "no DHCP lease: {}", run.tail());
    ensure!(
        run.has("L3-PING-OK"),
        "no ping reply from 10.0.2.2: {}",
        run.tail()
    );
    ensure!(
        run.has(DOORBELLS_MAPPED),
        "doorbells of the three queues not mapped: {}",
        run.tail()
    );
    Ok(Outcome::Pass)
}

fn ch_hotplug(ctx: &Ctx) -> CaseResult {
    hotplug(ctx, "hotplug", 1, "L3-READ", "L3-READ-OK")
}

fn ch_hotplug_net(ctx: &Ctx) -> CaseResult {
    hotplug(ctx, "hotplugnet", 3, "L3-IO-DONE", "L3-PING-OK")
}

/// Start the inner guest with no device, hot-plug the bridged device
/// through the API, check I/O in the guest, unplug it, check it is gone.
fn hotplug(ctx: &Ctx, mode: &str, queues: u16, io_done: &str, io_ok: &str) -> CaseResult {
    let ch = match ch_or_skip(ctx) {
        Ok(c) => c,
        Err(skip) => return Ok(skip),
    };
    let Some(remote) = &ch.remote else {
        return Ok(Outcome::Skip("CH_REMOTE is not set".into()));
    };
    let dev = ctx.dev()?;
    let sock = "/tmp/ch-l3/api.sock";
    let _ = std::fs::remove_file(sock);
    let mut run = Ch::start(
        ch,
        mode,
        &[
            "--api-socket".into(),
            format!("path={sock}"),
            // Landlock rules for what the hot-plugged bridged device will
            // open, given up front as Cloud Hypervisor asks for any
            // hot-plugged device.
            "--landlock-rules".into(),
            "path=/dev/vfio,access=rw".into(),
            format!("path=/sys/bus/pci/devices/{},access=r", dev.bdf),
            "path=/sys/kernel/iommu_groups,access=r".into(),
        ],
        true,
    )?;
    run.wait("L3-READY", TIMEOUT)?;
    let api = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(remote)
            .arg("--api-socket")
            .arg(sock)
            .args(args)
            .output()
            .context("run ch-remote")?;
        ensure!(
            out.status.success(),
            "ch-remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    api(&[
        "add-vdpa",
        &format!("path={},num_queues={queues},id=hotvdpa", dev.bdf),
    ])?;
    run.wait("L3-PLUGGED", Duration::from_secs(90))?;
    run.wait(io_done, Duration::from_secs(60))?;
    ensure!(
        run.has(io_ok),
        "no I/O on the hot-plugged device: {}",
        run.tail()
    );
    ensure!(
        run.has(DOORBELLS_MAPPED),
        "hot-plugged device's doorbells not mapped: {}",
        run.tail()
    );
    api(&["remove-device", "hotvdpa"])?;
    run.wait("L3-DONE", Duration::from_secs(90))?;
    ensure!(
        run.has("L3-UNPLUGGED"),
        "device still present after remove-device: {}",
        run.tail()
    );
    Ok(Outcome::Pass)
}

fn ch_perf(ctx: &Ctx) -> CaseResult {
    let ch = match ch_or_skip(ctx) {
        Ok(c) => c,
        Err(skip) => return Ok(skip),
    };
    let dev = ctx.dev()?;
    let configs = [
        (
            "passthrough",
            vec![
                "--device".to_string(),
                format!("path=/sys/bus/pci/devices/{}", dev.bdf),
            ],
        ),
        (
            "bridge",
            vec![
                "--vdpa".to_string(),
                format!("path={},num_queues=1", dev.bdf),
            ],
        ),
    ];
    // Alternate a, b, a, b: drift hits both alike. Each boot measures
    // PERF_REPS times; the first repetition of a boot is a warm-up.
    // samples[config][round] = (MiB/s, IOPS) of each repetition.
    let mut samples: [Vec<Vec<(f64, f64)>>; 2] = Default::default();
    let mut doorbells = "unknown";
    let mode = format!("perf l3.reps={PERF_REPS}");
    for _round in 0..ROUNDS {
        for (i, (label, extra)) in configs.iter().enumerate() {
            // Without Landlock: Cloud Hypervisor's own VFIO passthrough does
            // not get its group node allowed under it (seen: EACCES on
            // /dev/vfio/N), and both sides must run alike.
            let mut run = Ch::start(ch, &mode, extra, false)?;
            run.wait("L3-DONE", TIMEOUT)
                .with_context(|| label.to_string())?;
            ensure!(!run.has("L3-PERF-ERROR"), "{label}: {}", run.tail());
            // The first repetition of a boot is a warm-up.
            let rate = |tag: &str, unit: f64| -> Vec<f64> {
                rates(&run, tag, unit)
                    .into_iter()
                    .filter(|s| s.rep > 0)
                    .map(|s| s.rate)
                    .collect()
            };
            let seq = rate(SEQ, MIB);
            let rand = rate(RAND, 1.0);
            ensure!(
                seq.len() == PERF_REPS - 1 && rand.len() == PERF_REPS - 1,
                "{label}: {} sequential and {} random samples: {}",
                seq.len(),
                rand.len(),
                run.tail()
            );
            samples[i].push(seq.into_iter().zip(rand).collect());
            if i == 1 {
                doorbells = if run.has(DOORBELLS_MAPPED) {
                    "mapped into the guest"
                } else if run.has("kicks trapped and forwarded") {
                    "trapped (VFIO ioeventfd)"
                } else {
                    doorbells
                };
            }
        }
    }
    let all = |i: usize, pick: fn(&(f64, f64)) -> f64| -> Vec<f64> {
        samples[i].iter().flatten().map(pick).collect()
    };
    // b/a of each round (medians within the pair of adjacent boots).
    let per_round = |pick: fn(&(f64, f64)) -> f64| -> Vec<f64> {
        (0..ROUNDS)
            .map(|r| {
                let a = med(samples[0][r].iter().map(pick).collect());
                let b = med(samples[1][r].iter().map(pick).collect());
                b / a
            })
            .collect()
    };
    let seq = |s: &(f64, f64)| s.0;
    let rand = |s: &(f64, f64)| s.1;
    let (seq_a, seq_b) = (med(all(0, seq)), med(all(1, seq)));
    let (rand_a, rand_b) = (med(all(0, rand)), med(all(1, rand)));
    let n = ROUNDS * (PERF_REPS - 1);
    Ok(Outcome::PassWith(format!(
        "medians of {n} repetitions over {ROUNDS} alternating boots each, bridge doorbells \
         {doorbells}: sequential 1 MiB O_DIRECT reads: passthrough {seq_a:.1} MiB/s, bridge \
         {seq_b:.1} MiB/s, b/a {:.2} (per round {}); 4 KiB random reads (QD1): passthrough \
         {rand_a:.0} IOPS, bridge {rand_b:.0} IOPS, b/a {:.2} (per round {})",
        seq_b / seq_a,
        fmt(&per_round(seq)),
        rand_b / rand_a,
        fmt(&per_round(rand)),
    )))
}

/// Console tags of `l3-blkperf`.
const SEQ: &str = "L3-PERF-SEQ ";
const RAND: &str = "L3-PERF-RAND4K ";
const MIB: f64 = (1 << 20) as f64;

/// One `l3-blkperf` measurement: `rate` is units per second.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    rep: u64,
    dev: u64,
    rate: f64,
}

/// The measurements of `tag` (`<tag> <rep> <dev> <count> <ns>`), `count`
/// divided by `unit`.
fn rates(run: &Ch, tag: &str, unit: f64) -> Vec<Sample> {
    parse_rates(&run.samples(tag), unit)
}

fn parse_rates(lines: &[Vec<u64>], unit: f64) -> Vec<Sample> {
    lines
        .iter()
        .filter_map(|s| match s[..] {
            [rep, dev, n, ns] if ns > 0 => Some(Sample {
                rep,
                dev,
                rate: n as f64 / unit / (ns as f64 / 1e9),
            }),
            _ => None,
        })
        .collect()
}

fn med(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn fmt(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bridge over passthrough of each repetition (the two measurements of a
/// repetition ran back to back in one guest), skipping warm-up `rep` 0.
/// `bridged` is the index of the bridged disk in the sample lines.
fn paired_ratios(samples: &[Sample], bridged: u64) -> Vec<f64> {
    let reps = samples.iter().map(|s| s.rep).filter(|&r| r > 0);
    let mut reps: Vec<u64> = reps.collect();
    reps.sort_unstable();
    reps.dedup();
    reps.into_iter()
        .filter_map(|r| {
            let of = |bridge: bool| {
                samples
                    .iter()
                    .find(|s| s.rep == r && (s.dev == bridged) == bridge)
                    .map(|s| s.rate)
            };
            Some(of(true)? / of(false)?)
        })
        .collect()
}

/// Boots of the side-by-side case (the roles of the two disks swap from
/// one boot to the next).
const PAIR_BOOTS: usize = 4;
/// Repetitions per boot of the side-by-side case (the first is a warm-up).
const PAIR_REPS: usize = 9;

/// One inner guest, two identical QEMU virtio-blk-pci disks (blk0, blk1):
/// one through Cloud Hypervisor's own VFIO passthrough, the other through
/// the bridge, measured back to back (order alternating) in the same boot,
/// so boot-to-boot noise of the nested TCG lab cancels out of each ratio.
/// The roles swap on every boot, so a difference between the two disks
/// cancels out of the geometric mean of the two orientations.
fn ch_perf_pair(ctx: &Ctx) -> CaseResult {
    let ch = match ch_or_skip(ctx) {
        Ok(c) => c,
        Err(skip) => return Ok(skip),
    };
    let blk0 = ctx.dev()?;
    let blk1 = match ctx.manifest.device_or_reason(Variant::Blk1) {
        Ok(dev) => dev,
        Err(why) => return Ok(Outcome::Skip(format!("blk1: {why}"))),
    };
    let disks = [blk0, blk1];
    // seq_ratios[o], rand_ratios[o]: ratios of every repetition in
    // orientation o, where disk o is bridged.
    let mut seq_ratios: [Vec<f64>; 2] = Default::default();
    let mut rand_ratios: [Vec<f64>; 2] = Default::default();
    let mut per_boot = Vec::new();
    let mut abs: [(Vec<f64>, Vec<f64>); 2] = Default::default(); // [passthrough, bridge]
    let mut mapped = 0;
    let mode = format!("perfpair l3.reps={PAIR_REPS}");
    for boot in 0..PAIR_BOOTS {
        let o = boot % 2;
        let (bridged, passed) = (disks[o], disks[1 - o]);
        let extra = [
            "--device".to_string(),
            format!("path=/sys/bus/pci/devices/{}", passed.bdf),
            "--vdpa".to_string(),
            format!("path={},num_queues=1", bridged.bdf),
        ];
        let label = format!(
            "boot {boot}: {} passthrough, {} bridged",
            passed.variant.name(),
            bridged.variant.name()
        );
        // Without Landlock, as in ch_perf: Cloud Hypervisor's own
        // passthrough is refused its group node under it.
        let mut run = Ch::start(ch, &mode, &extra, false)?;
        run.wait("L3-DONE", TIMEOUT).context(label.clone())?;
        ensure!(!run.has("L3-PERF-ERROR"), "{label}: {}", run.tail());
        if run.has(DOORBELLS_MAPPED) {
            mapped += 1;
        }
        let seq = rates(&run, SEQ, MIB);
        let rand = rates(&run, RAND, 1.0);
        let (rs, rr) = (
            paired_ratios(&seq, o as u64),
            paired_ratios(&rand, o as u64),
        );
        ensure!(
            rs.len() == PAIR_REPS - 1 && rr.len() == PAIR_REPS - 1,
            "{label}: {} sequential and {} random pairs: {}",
            rs.len(),
            rr.len(),
            run.tail()
        );
        for (i, bridge) in [(0, false), (1, true)] {
            let pick = |v: &[Sample]| {
                v.iter()
                    .filter(|s| s.rep > 0 && (s.dev == o as u64) == bridge)
                    .map(|s| s.rate)
                    .collect::<Vec<_>>()
            };
            abs[i].0.extend(pick(&seq));
            abs[i].1.extend(pick(&rand));
        }
        per_boot.push((med(rs.clone()), med(rr.clone())));
        seq_ratios[o].extend(rs);
        rand_ratios[o].extend(rr);
    }
    // The geometric mean of the two orientations' medians: a speed
    // difference between the disks themselves divides out.
    // Their quotient gives the disks' own difference (blk0 over blk1).
    let balanced = |r: &[Vec<f64>; 2]| (med(r[0].clone()) * med(r[1].clone())).sqrt();
    let disks = |r: &[Vec<f64>; 2]| (med(r[0].clone()) / med(r[1].clone())).sqrt();
    let seq_b = balanced(&seq_ratios);
    let rand_b = balanced(&rand_ratios);
    let (seq_d, rand_d) = (disks(&seq_ratios), disks(&rand_ratios));
    let (seq_boots, rand_boots): (Vec<f64>, Vec<f64>) = per_boot.into_iter().unzip();
    let n = PAIR_BOOTS * (PAIR_REPS - 1);
    Ok(Outcome::PassWith(format!(
        "{n} back-to-back pairs over {PAIR_BOOTS} boots, disk roles swapped each boot, bridge \
         doorbells mapped in {mapped} of {PAIR_BOOTS} boots: sequential 1 MiB O_DIRECT reads \
         b/a {seq_b:.3} (median per boot {}; passthrough {:.1} MiB/s, bridge {:.1} MiB/s; \
         blk0/blk1 {seq_d:.3}); 4 KiB random reads (QD1) b/a {rand_b:.3} (median per boot \
         {}; passthrough {:.0} IOPS, bridge {:.0} IOPS; blk0/blk1 {rand_d:.3})",
        fmt(&seq_boots),
        med(abs[0].0.clone()),
        med(abs[1].0.clone()),
        fmt(&rand_boots),
        med(abs[0].1.clone()),
        med(abs[1].1.clone()),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_rep_dev_count_and_time() {
        let lines = vec![
            vec![1, 0, 2000, 1_000_000_000],
            vec![1, 1, 2000],
            vec![2, 1, 5, 0],
        ];

        let got = parse_rates(&lines, 1.0);

        assert_eq!(
            got,
            [Sample {
                rep: 1,
                dev: 0,
                rate: 2000.0
            }]
        );
    }

    #[test]
    fn pairs_divide_bridge_by_passthrough_per_repetition() {
        let s = |rep, dev, rate| Sample { rep, dev, rate };
        // rep 0 is a warm-up; rep 2 lacks its bridged half.
        let samples = [
            s(0, 0, 1.0),
            s(0, 1, 9.0),
            s(1, 0, 100.0),
            s(1, 1, 90.0),
            s(2, 0, 50.0),
            s(3, 1, 120.0),
            s(3, 0, 100.0),
        ];

        assert_eq!(paired_ratios(&samples, 1), [0.9, 1.2]);
        assert_eq!(paired_ratios(&samples, 0), [100.0 / 90.0, 100.0 / 120.0]);
        assert!(med(Vec::new()).is_nan());
    }
}
