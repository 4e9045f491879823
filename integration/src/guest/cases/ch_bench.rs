//! Cloud Hypervisor throughput benchmarks (`VDPA_LAB_BENCH=1` with
//! `CLOUD_HYPERVISOR`): sequential and 4 KiB random reads in the inner
//! guest (`l3-blkperf`, O_DIRECT), Cloud Hypervisor's own VFIO passthrough
//! vs the bridge. They report figures and never pass or fail a run.

use anyhow::{ensure, Context as _};

use crate::guest::ch::{not_configured, Ch, ChVm, Vdpa, DOORBELLS_MAPPED};
use crate::guest::stats::{fmt, med, paired_ratios, parse_rates, Sample};
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::Variant;

/// The benchmarks.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "ch_blk0_throughput_passthrough_vs_bridge".to_string(),
            needs: Some(Variant::Blk0),
            run: ch_perf,
        },
        Case {
            name: "ch_blk0_blk1_throughput_side_by_side_in_one_guest".to_string(),
            needs: Some(Variant::Blk0),
            run: ch_perf_pair,
        },
    ]
}

/// Alternating rounds (boots per configuration) of the throughput case.
const ROUNDS: usize = 4;
/// Measurements per boot (`l3-blkperf` repetitions; the first is a warm-up).
const PERF_REPS: usize = 6;

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

/// The measurements of `tag` (`<tag> <rep> <dev> <count> <ns>`), `count`
/// divided by `unit`.
fn rates(run: &ChVm, tag: &str, unit: f64) -> Vec<Sample> {
    parse_rates(&run.samples(tag), unit)
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
