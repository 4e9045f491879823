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
//! * reboot of the inner guest: the bridged device is built anew;
//! * hot-plug and unplug of the blk and net devices through `ch-remote`;
//! * throughput: sequential and 4 KiB random reads in the inner guest
//!   (`l3-blkperf`, O_DIRECT), Cloud Hypervisor's own VFIO passthrough vs
//!   the bridge, same device, alternating boots.
//!
//! Every case starts Cloud Hypervisor through [`crate::guest::ch`].

use std::time::Duration;

use anyhow::{ensure, Context as _};

use crate::guest::ch::{
    not_configured, Ch, ChVm, Vdpa, BOOT_TIMEOUT, DOORBELLS_MAPPED, VIRTIO_ID_BLOCK,
};
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::Variant;

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

/// Alternating rounds (boots per configuration) of the throughput case.
const ROUNDS: usize = 4;
/// Measurements per boot (`l3-blkperf` repetitions; the first is a warm-up).
const PERF_REPS: usize = 6;

/// The inner guest reads sector 0 (the host's pattern) and writes sector 8
/// (declared: the host checks the image after the VM exits) of a bridged
/// disk whose FLUSH bit is masked off, and never negotiates that bit.
fn ch_blk(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    ctx.declare_write(8 * 512, 512)?;
    let masked = lab.masked_bit;
    let disk = Vdpa::new(&dev.bdf, 1).features_mask(!(1u64 << masked));
    let mut vm = Ch::new(lab, "blk").vdpa(&disk).start()?;
    vm.wait_done()?;
    vm.expect("L3-READ-OK", "inner guest read wrong data")?;
    vm.expect("L3-WRITE-OK", "inner guest write failed")?;
    let bits = vm.features(VIRTIO_ID_BLOCK)?;
    ensure!(!bits.bit(masked), "masked bit {masked} negotiated: {bits}");
    ensure!(
        bits.bit(32) && bits.bit(33),
        "VERSION_1/ACCESS_PLATFORM not negotiated: {bits}"
    );
    vm.expect(DOORBELLS_MAPPED, "doorbells not mapped into the guest")?;
    Ok(Outcome::PassWith(format!(
        "inner guest blk features {bits}"
    )))
}

/// The inner guest reads its disk and reboots; Cloud Hypervisor tears the
/// VM down and builds it again, so the bridged device is dropped and the
/// same VFIO group opened anew: the second boot must read the disk too.
fn ch_reboot(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let mut vm = Ch::new(lab, "reboot")
        .vdpa(&Vdpa::new(&dev.bdf, 1))
        .start()?;
    for boot in 1..=2 {
        vm.wait("L3-REBOOTING", BOOT_TIMEOUT)
            .with_context(|| format!("boot {boot}"))?;
    }
    vm.kill();
    vm.expect_count("L3-READ-OK", 2)
        .context("a good read in each of two boots")?;
    // The bridged device is built (and its doorbells mapped) once per boot.
    vm.expect_count(DOORBELLS_MAPPED, 2)
        .context("doorbells mapped once in each of two boots")?;
    Ok(Outcome::Pass)
}

/// A DHCP lease from QEMU's user-mode network and ping replies from
/// 10.0.2.2, through the bridged virtio-net device (three queues).
fn ch_net(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let mut vm = Ch::new(lab, "net").vdpa(&Vdpa::new(&dev.bdf, 3)).start()?;
    vm.wait_done()?;
    vm.expect("L3-DHCP-OK", "no DHCP lease")?;
    vm.expect("L3-PING-OK", "no ping reply from 10.0.2.2")?;
    vm.expect(DOORBELLS_MAPPED, "doorbells of the three queues not mapped")?;
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
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    if lab.remote.is_none() {
        return Ok(Outcome::Skip("CH_REMOTE is not set".into()));
    }
    let dev = ctx.dev()?;
    let mut vm = Ch::new(lab, mode).hotplug_of(&dev.bdf).start()?;
    vm.wait("L3-READY", BOOT_TIMEOUT)?;
    vm.remote(&["add-vdpa", &Vdpa::new(&dev.bdf, queues).id("hotvdpa").arg()])?;
    vm.wait("L3-PLUGGED", Duration::from_secs(90))?;
    vm.wait(io_done, Duration::from_secs(60))?;
    vm.expect(io_ok, "no I/O on the hot-plugged device")?;
    vm.expect(
        DOORBELLS_MAPPED,
        "hot-plugged device's doorbells not mapped",
    )?;
    vm.remote(&["remove-device", "hotvdpa"])?;
    vm.wait("L3-DONE", Duration::from_secs(90))?;
    vm.expect("L3-UNPLUGGED", "device still present after remove-device")?;
    Ok(Outcome::Pass)
}

fn ch_perf(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    // Without Landlock: Cloud Hypervisor's own VFIO passthrough does not
    // get its group node allowed under it (seen: EACCES on /dev/vfio/N),
    // and both sides must run alike.
    let boot = || Ch::new(lab, "perf").without_landlock().reps(PERF_REPS);
    let configs = [
        ("passthrough", boot().passthrough(&dev.bdf)),
        ("bridge", boot().vdpa(&Vdpa::new(&dev.bdf, 1))),
    ];
    // Alternate a, b, a, b: drift hits both alike. Each boot measures
    // PERF_REPS times; the first repetition of a boot is a warm-up.
    // samples[config][round] = (MiB/s, IOPS) of each repetition.
    let mut samples: [Vec<Vec<(f64, f64)>>; 2] = Default::default();
    let mut doorbells = "unknown";
    for _round in 0..ROUNDS {
        for (i, (label, ch)) in configs.iter().enumerate() {
            let mut run = ch.clone().start()?;
            run.wait_done().with_context(|| label.to_string())?;
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
fn rates(run: &ChVm, tag: &str, unit: f64) -> Vec<Sample> {
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
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
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
    for boot in 0..PAIR_BOOTS {
        let o = boot % 2;
        let (bridged, passed) = (disks[o], disks[1 - o]);
        let label = format!(
            "boot {boot}: {} passthrough, {} bridged",
            passed.variant.name(),
            bridged.variant.name()
        );
        // Without Landlock, as in ch_perf: Cloud Hypervisor's own
        // passthrough is refused its group node under it.
        let mut run = Ch::new(lab, "perfpair")
            .without_landlock()
            .reps(PAIR_REPS)
            .passthrough(&passed.bdf)
            .vdpa(&Vdpa::new(&bridged.bdf, 1))
            .start()?;
        run.wait_done().context(label.clone())?;
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
