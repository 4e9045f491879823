//! Cloud Hypervisor throughput benchmarks (`VDPA_LAB_BENCH=1` with
//! `CLOUD_HYPERVISOR`): sequential 1 MiB and 4 KiB random reads in the
//! inner guest (`l3-blkperf`, O_DIRECT, every request checked against the
//! image's pattern), Cloud Hypervisor's own VFIO passthrough (a) vs the
//! bridge (b). They report figures and never pass or fail a run.
//!
//! Each reports, per workload, one headline figure: **b/a**, bridge rate
//! over passthrough rate (above 1: the bridge is faster), as the median of
//! the ratios the benchmark is built from, with their count, quartiles and
//! range ([`Spread`]). The ratios themselves are listed (in the report or
//! on the console, `ch-bench:` lines) so the headline can be recomputed.
//! Absolute rates follow as medians; under nested KVM on TCG they move a
//! lot from run to run, the ratios much less.
//!
//! A benchmark that cannot measure (Cloud Hypervisor does not boot,
//! `l3-blkperf` reports `L3-PERF-ERROR`, e.g. a request whose data does
//! not match the pattern, or measurements are missing) returns the error,
//! which the runner reports as a benchmark error: printed with its
//! message, never counted as a failure, no figures.

use anyhow::{bail, ensure, Context as _};

use crate::guest::ch::{not_configured, Ch, ChVm, Vdpa, DOORBELLS_MAPPED};
use crate::guest::stats::{
    list, paired_ratios, parse_rates, rates_of, ratios_of_medians, Sample, Spread,
};
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
        Case {
            name: "ch_blk0_blk1_throughput_shadow_vs_direct_side_by_side".to_string(),
            needs: Some(Variant::Blk0),
            run: ch_perf_shadow,
        },
        Case {
            name: "ch_blk0_migration_downtime_bridge_vs_emulated".to_string(),
            needs: Some(Variant::Blk0),
            run: ch_downtime,
        },
    ]
}

/// Migrations per configuration of the downtime benchmark.
const MIGRATIONS: usize = 5;

/// Milliseconds of a duration as Rust's `Debug` prints it (`110.3ms`,
/// `1.2s`, `850µs`), after `after` in the first line holding it.
fn logged_ms(vm: &ChVm, after: &str) -> Option<f64> {
    let rest = vm.line(after)?.split(after).nth(1)?;
    let word = rest.split_whitespace().next()?;
    parse_debug_ms(word.trim_end_matches([';', ',']))
}

/// The inner guest streaming writes migrates to a second VMM in the lab
/// VM: (a) blk0 through the bridge, (b) Cloud Hypervisor's own emulated
/// virtio-blk on a copy of blk0's image in the lab VM, alternating,
/// [`MIGRATIONS`] each. Reports Cloud Hypervisor's logged downtime and the
/// longest gap between the guest's progress lines seen from outside, and
/// for (a) the bridge's steps: quiesce (pause), release (hand-over),
/// open and restore, DMA map of guest RAM, and the resume on shadow rings.
fn ch_downtime(ctx: &Ctx) -> CaseResult {
    use crate::guest::cases::ch_migrate::{migrate, DIR, ID};
    use std::time::Duration;
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let image = std::path::Path::new(DIR).join("emulated-blk0.img");
    std::fs::create_dir_all(DIR)?;
    std::fs::write(&image, crate::pattern::region("blk0", 0, 16 << 20))?;
    let mut down: [Vec<f64>; 2] = Default::default();
    let mut gaps: [Vec<f64>; 2] = Default::default();
    let steps = [
        "paused in",
        "handed over in",
        "opened and restored in",
        "DMA map of",
        "resumed on shadow rings in",
    ];
    let mut split: Vec<Vec<f64>> = vec![Vec::new(); steps.len()];
    for round in 0..MIGRATIONS {
        for c in 0..2 {
            let label = format!("migration {round}, {}", ["bridge", "emulated"][c]);
            let ch = Ch::new(lab, "stream")
                .cmdline("l3.secs=50")
                .api()
                .landlock_rule(&format!("path={DIR},access=rw"));
            let ch = if c == 0 {
                ch.vdpa(&Vdpa::new(&dev.bdf, 1).id(ID))
            } else {
                ch.disk(&image)
            };
            let mut src = ch.start()?;
            src.wait("L3-STREAM-START", crate::guest::ch::BOOT_TIMEOUT)
                .context(label.clone())?;
            if c == 0 {
                ctx.declare_stream(crate::stream::REGION, crate::stream::REGION_LEN)?;
            }
            src.wait("L3-SEQ", Duration::from_secs(30))?;
            std::thread::sleep(Duration::from_secs(3));
            let mut dst = Ch::empty(lab, "dst.sock", None)?;
            let (sent, status) = migrate(&src, &dst, "")?;
            sent.context(label.clone())?;
            ensure!(
                src.exited(Duration::from_secs(180)),
                "{label}: the source did not exit"
            );
            dst.wait("L3-STREAM-", Duration::from_secs(300))
                .context(label.clone())?;
            let _ = dst.wait_done();
            ensure!(status.success(), "{label}: receive-migration {status}");
            ensure!(dst.has("L3-STREAM-OK"), "{label}: {}", dst.tail());
            let ms = src
                .line("downtime of ")
                .and_then(|l| l.split("downtime of ").nth(1))
                .and_then(|r| r.split("ms").next())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .with_context(|| format!("{label}: no downtime line"))?;
            down[c].push(ms);
            let mut at: Vec<std::time::Instant> = [&src, &dst]
                .iter()
                .flat_map(|v| v.stamped("L3-SEQ").into_iter().map(|(t, _)| t))
                .collect();
            at.sort();
            let gap = at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
            gaps[c].push(gap.as_secs_f64() * 1000.0);
            if c == 0 {
                for (k, step) in steps.iter().enumerate() {
                    let vm = if k < 2 { &src } else { &dst };
                    let v = if *step == "DMA map of" {
                        vm.line("DMA map of")
                            .and_then(|l| l.rsplit(" in ").next())
                            .map(str::to_owned)
                            .and_then(|d| parse_debug_ms(&d))
                    } else {
                        logged_ms(vm, step)
                    };
                    if let Some(v) = v {
                        split[k].push(v);
                    }
                }
            }
            println!(
                "ch-bench: {label}: downtime {ms} ms, longest gap {} ms",
                gap.as_millis()
            );
        }
    }
    let (a, b) = (
        spread(&down[0], "bridge downtimes")?,
        spread(&down[1], "emulated downtimes")?,
    );
    let (ga, gb) = (
        spread(&gaps[0], "bridge gaps")?,
        spread(&gaps[1], "emulated gaps")?,
    );
    let mut report = vec![format!(
        "{MIGRATIONS} migrations each, alternating; Cloud Hypervisor's downtime (ms): bridge {a}, \
         emulated {b}, median ratio {:.2} (target <= 1.5); longest gap between progress lines \
         (ms): bridge {ga}, emulated {gb}; downtimes bridge {} emulated {}",
        a.median / b.median,
        list(&down[0], 0),
        list(&down[1], 0)
    )];
    for (k, step) in steps.iter().enumerate() {
        if let Some(sp) = Spread::of(&split[k]) {
            report.push(format!("bridge step \"{step}\" (ms): {sp}"));
        }
    }
    Ok(Outcome::PassWith(report.join("; ")))
}

/// Milliseconds of a `Debug`-printed duration (`12.5ms`, `1.2s`).
fn parse_debug_ms(d: &str) -> Option<f64> {
    let d = d.trim();
    let (num, unit) = d.split_at(d.find(|c: char| !(c.is_ascii_digit() || c == '.'))?);
    let v: f64 = num.parse().ok()?;
    Some(match unit.trim() {
        "s" => v * 1000.0,
        "ms" => v,
        "µs" | "us" => v / 1000.0,
        "ns" => v / 1e6,
        _ => return None,
    })
}

/// Alternating rounds (one boot per configuration each) of
/// `ch_blk0_throughput_passthrough_vs_bridge`.
const ROUNDS: usize = 4;
/// Measurements per boot of that benchmark (the first is a warm-up).
const PERF_REPS: usize = 6;
/// Boots of the side-by-side benchmark (the roles of the two disks swap
/// from one boot to the next).
const PAIR_BOOTS: usize = 4;
/// Measurements per boot of the side-by-side benchmark (the first is a
/// warm-up).
const PAIR_REPS: usize = 9;

/// The bridge's log line when kicks go through VFIO ioeventfds instead of
/// a doorbell page mapped into the guest.
const KICKS_TRAPPED: &str = "kicks trapped and forwarded";

/// A workload `l3-blkperf` measures.
struct Workload {
    /// What it is, for the report.
    name: &'static str,
    /// Its console tag (`<tag> <rep> <dev> <count> <ns>`).
    tag: &'static str,
    /// `count` per unit.
    unit: f64,
    /// The unit's name.
    unit_name: &'static str,
    /// Decimals of its rates.
    precision: usize,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "sequential 1 MiB O_DIRECT reads",
        tag: "L3-PERF-SEQ ",
        unit: (1 << 20) as f64,
        unit_name: "MiB/s",
        precision: 1,
    },
    Workload {
        name: "4 KiB random reads (QD1)",
        tag: "L3-PERF-RAND4K ",
        unit: 1.0,
        unit_name: "IOPS",
        precision: 0,
    },
];

/// The measurements of one boot, per workload (in [`WORKLOADS`] order).
///
/// # Errors
/// `l3-blkperf` reported an error (the error is its line).
fn measurements(vm: &ChVm) -> anyhow::Result<[Vec<Sample>; 2]> {
    if let Some(e) = vm.line("L3-PERF-ERROR") {
        bail!("{e}");
    }
    Ok(WORKLOADS.map(|w| parse_rates(&vm.samples(w.tag), w.unit)))
}

/// How the bridge's doorbells were wired over `boots` boots.
fn doorbells(mapped: usize, trapped: usize, boots: usize) -> String {
    format!(
        "bridge doorbells mapped into the guest in {mapped} of {boots} boots, trapped \
         (VFIO ioeventfd) in {trapped}"
    )
}

/// The spread of `values` or an error naming them.
fn spread(values: &[f64], what: &str) -> anyhow::Result<Spread> {
    Spread::of(values).with_context(|| format!("no finite {what}: {values:?}"))
}

/// The same QEMU disk (blk0) through Cloud Hypervisor's passthrough and
/// through the bridge, in alternating boots (a, b, a, b, ...: drift hits
/// both alike). Each round's ratio divides the medians of its two boots;
/// the headline is the median of the rounds' ratios. Boot-to-boot noise of
/// the nested lab stays in these ratios (see the side-by-side benchmark).
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
    // rates[workload][config][round]: the rates of one boot, warm-up
    // left out.
    let mut rates: [[Vec<Vec<f64>>; 2]; 2] = Default::default();
    let (mut mapped, mut trapped) = (0, 0);
    for round in 0..ROUNDS {
        for (c, (label, ch)) in configs.iter().enumerate() {
            let label = format!("round {round}, {label}");
            let mut vm = ch.clone().start()?;
            vm.wait_done().context(label.clone())?;
            let m = measurements(&vm).context(label.clone())?;
            for (w, samples) in m.iter().enumerate() {
                let r = rates_of(samples, 0);
                ensure!(
                    r.len() == PERF_REPS - 1,
                    "{label}: {} {} measurements, want {}: {}",
                    r.len(),
                    WORKLOADS[w].name,
                    PERF_REPS - 1,
                    vm.tail()
                );
                rates[w][c].push(r);
            }
            if c == 1 {
                mapped += usize::from(vm.has(DOORBELLS_MAPPED));
                trapped += usize::from(vm.has(KICKS_TRAPPED));
            }
        }
    }
    let mut report = vec![format!(
        "b/a = bridge rate / passthrough rate; {ROUNDS} rounds of alternating boots, {} \
         measurements per boot after a warm-up; {}",
        PERF_REPS - 1,
        doorbells(mapped, trapped, ROUNDS)
    )];
    for (w, [a, b]) in WORKLOADS.iter().zip(&rates) {
        let per_round = ratios_of_medians(a, b).context("a boot without finite rates")?;
        let headline = spread(&per_round, "per-round ratios")?;
        let all = |boots: &[Vec<f64>]| boots.concat();
        let (pa, pb) = (
            spread(&all(a), "passthrough rates")?,
            spread(&all(b), "bridge rates")?,
        );
        let p = w.precision;
        report.push(format!(
            "{}: b/a {headline} of the per-round ratios {}; medians passthrough {:.p$} {u}, \
             bridge {:.p$} {u}",
            w.name,
            list(&per_round, 3),
            pa.median,
            pb.median,
            u = w.unit_name,
        ));
        println!(
            "ch-bench: {}: passthrough {pa:.p$} {u}, bridge {pb:.p$} {u}",
            w.name,
            u = w.unit_name
        );
    }
    Ok(Outcome::PassWith(report.join("; ")))
}

/// One inner guest, two QEMU virtio-blk-pci disks configured alike (blk0,
/// blk1): one through Cloud Hypervisor's own VFIO passthrough, the other
/// through the bridge, measured back to back (order alternating) in the
/// same boot, so boot-to-boot noise of the nested TCG lab cancels out of
/// each pair's ratio. The roles swap on every boot, so both disks are
/// bridged in as many pairs: a difference between the disks themselves
/// widens the spread instead of moving the headline, and shows as the
/// medians by bridged disk.
fn ch_perf_pair(ctx: &Ctx) -> CaseResult {
    pair_bench(ctx, &PASSTHROUGH_VS_BRIDGE)
}

/// The same with both disks bridged, one on shadow rings (`shadow=on`:
/// every request and completion through the bridge's relay) and one
/// direct: s/d, the cost of shadow mode (what a device pays while a VM
/// migrates, and after until the guest resets it).
fn ch_perf_shadow(ctx: &Ctx) -> CaseResult {
    pair_bench(ctx, &SHADOW_VS_DIRECT)
}

/// What a side-by-side benchmark compares: the disk of the numerator and
/// the other, in one boot.
struct Pair {
    /// `b/a`, `s/d`.
    ratio: &'static str,
    /// The two paths' names, denominator first.
    names: [&'static str; 2],
    /// The boot, the numerator's disk at `num`, the other at `den`.
    boot: for<'a> fn(Ch<'a>, num: &str, den: &str) -> Ch<'a>,
    /// Whether the bridge's doorbell wiring is worth reporting.
    doorbells: bool,
    /// Boots, measurements per boot (the first a warm-up), and how long
    /// one boot may take.
    boots: usize,
    reps: usize,
    within: std::time::Duration,
}

const PASSTHROUGH_VS_BRIDGE: Pair = Pair {
    ratio: "b/a",
    names: ["passthrough", "bridge"],
    // Without Landlock, as in ch_perf: Cloud Hypervisor's own passthrough
    // is refused its group node under it.
    boot: |ch, num, den| {
        ch.without_landlock()
            .passthrough(den)
            .vdpa(&Vdpa::new(num, 1))
    },
    doorbells: true,
    boots: PAIR_BOOTS,
    reps: PAIR_REPS,
    within: crate::guest::ch::BOOT_TIMEOUT,
};

const SHADOW_VS_DIRECT: Pair = Pair {
    ratio: "s/d",
    names: ["direct", "shadow"],
    boot: |ch, num, den| {
        ch.vdpa(&Vdpa::new(den, 1))
            .vdpa(&Vdpa::new(num, 1).shadow())
    },
    doorbells: false,
    // A shadowed request costs two more thread wake-ups in the lab VM,
    // slow under TCG: fewer, longer boots.
    boots: 2,
    reps: 4,
    within: std::time::Duration::from_secs(600),
};

fn pair_bench(ctx: &Ctx, pair: &Pair) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let blk0 = ctx.dev()?;
    let blk1 = match ctx.manifest.device_or_reason(Variant::Blk1) {
        Ok(dev) => dev,
        Err(why) => return Ok(Outcome::Skip(format!("blk1: {why}"))),
    };
    let disks = [blk0, blk1];
    // ratios[workload][o]: the pairs' ratios of the boots where disk o was
    // bridged; rates[workload][0 passthrough | 1 bridge]: every rate.
    let mut ratios: [[Vec<f64>; 2]; 2] = Default::default();
    let mut rates: [[Vec<f64>; 2]; 2] = Default::default();
    let mut mapped = 0;
    let mut trapped = 0;
    for boot in 0..pair.boots {
        let o = boot % 2;
        let (bridged, passed) = (disks[o], disks[1 - o]);
        let label = format!(
            "boot {boot}: {} {}, {} {}",
            passed.variant.name(),
            pair.names[0],
            bridged.variant.name(),
            pair.names[1]
        );
        let ch = Ch::new(lab, "perfpair").reps(pair.reps);
        let mut vm = (pair.boot)(ch, &bridged.bdf, &passed.bdf).start()?;
        vm.wait("L3-DONE", pair.within).context(label.clone())?;
        mapped += usize::from(vm.has(DOORBELLS_MAPPED));
        trapped += usize::from(vm.has(KICKS_TRAPPED));
        // l3-blkperf numbers the disks by their serial: blk0 is 0.
        let m = measurements(&vm).context(label.clone())?;
        let mut line = Vec::new();
        for (w, samples) in m.iter().enumerate() {
            let r = paired_ratios(samples, o as u64);
            ensure!(
                r.len() == pair.reps - 1,
                "{label}: {} {} pairs, want {}: {}",
                r.len(),
                WORKLOADS[w].name,
                pair.reps - 1,
                vm.tail()
            );
            line.push(format!(
                "{} {} {}",
                WORKLOADS[w].name,
                pair.ratio,
                list(&r, 3)
            ));
            ratios[w][o].extend(r);
            rates[w][0].extend(rates_of(samples, 1 - o as u64));
            rates[w][1].extend(rates_of(samples, o as u64));
        }
        println!("ch-bench: {label}: {}", line.join("; "));
    }
    let pairs = pair.reps - 1;
    let wiring = if pair.doorbells {
        format!("; {}", doorbells(mapped, trapped, pair.boots))
    } else {
        String::new()
    };
    let mut report = vec![format!(
        "{} = {} rate / {} rate, the two measured back to back in one boot; \
         {} boots, disk roles swapped each boot, {pairs} pairs per boot after a \
         warm-up (each pair's ratio on the console, ch-bench lines){wiring}",
        pair.ratio, pair.names[1], pair.names[0], pair.boots
    )];
    for (w, (by_disk, [a, b])) in WORKLOADS.iter().zip(ratios.iter().zip(&rates)) {
        let headline = spread(&by_disk.concat(), "pair ratios")?;
        let (m0, m1) = (
            spread(&by_disk[0], "blk0-bridged ratios")?.median,
            spread(&by_disk[1], "blk1-bridged ratios")?.median,
        );
        let (pa, pb) = (spread(a, "passthrough rates")?, spread(b, "bridge rates")?);
        let p = w.precision;
        report.push(format!(
            "{}: {} {headline} of all pairs; by {} disk blk0 {m0:.3}, blk1 {m1:.3}; \
             medians {} {:.p$} {u}, {} {:.p$} {u}",
            w.name,
            pair.ratio,
            pair.names[1],
            pair.names[0],
            pa.median,
            pair.names[1],
            pb.median,
            u = w.unit_name,
        ));
    }
    Ok(Outcome::PassWith(report.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_read_their_own_tags_in_their_units() {
        let seq = parse_rates(&[vec![1, 0, 256 << 20, 1_000_000_000]], WORKLOADS[0].unit);
        let rand = parse_rates(&[vec![1, 0, 2000, 500_000_000]], WORKLOADS[1].unit);

        assert_eq!(seq[0].rate, 256.0);
        assert_eq!(rand[0].rate, 4000.0);
        assert_eq!(
            WORKLOADS.map(|w| w.tag),
            ["L3-PERF-SEQ ", "L3-PERF-RAND4K "]
        );
    }

    #[test]
    fn logged_durations_read_in_milliseconds() {
        assert_eq!(parse_debug_ms("110.5ms"), Some(110.5));
        assert_eq!(parse_debug_ms("1.5s"), Some(1500.0));
        assert_eq!(parse_debug_ms("250µs"), Some(0.25));
        assert_eq!(parse_debug_ms("12"), None);
        assert_eq!(parse_debug_ms("ms"), None);
    }

    #[test]
    fn doorbell_wiring_is_counted_over_the_boots() {
        assert_eq!(
            doorbells(3, 1, 4),
            "bridge doorbells mapped into the guest in 3 of 4 boots, trapped (VFIO ioeventfd) in 1"
        );
    }
}
