//! The benchmark (`VDPA_LAB_BENCH=1`): blk 4 KiB random reads on blk0 at
//! queue depth 1 (latency) and 32 (IOPS), in one run, side by side:
//!
//! * (a) the driver harness on the device directly (doorbell MMIO write,
//!   MSI-X eventfd), and (a') the same with the kick through an eventfd the
//!   kernel turns into the doorbell write (what a VMM's kick always is),
//! * (b) through the plugin with in-kernel kicks (kick eventfd →
//!   `VFIO_DEVICE_IOEVENTFD`) and MSI-X straight to the "irqfd",
//! * (c) through the plugin with the relay thread ringing the doorbell.
//!
//! Rounds alternate a, b, c so drift hits all three alike; the median of
//! the rounds is reported, with the ratios b/a, c/a and b/a' (IOPS ratios,
//! and latency ratios a/b so that higher is better for both). b/a' is the
//! plugin's own cost; b/a adds the cost of an eventfd kick over an MMIO
//! write from the same process.

use std::sync::Arc;

use anyhow::Context as _;
use vdpa_bridge::types::features;
use vdpa_bridge::vfio::VfioFunction;
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_plugin::{BridgeDevice, DeviceOptions, KickPolicy};
use vdpa_testkit::driver::blk::{ReadLoad, ReadStats};
use vdpa_testkit::driver::{Driver, DriverOptions, KickMode};
use vdpa_testkit::harness::{Guest, TestInterrupt};

use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::Variant;

const ROUNDS: usize = 5;

/// The benchmark cases.
pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "bench_blk0_4k_random_read".to_string(),
        needs: Some(Variant::Blk0),
        run: bench,
    }]
}

fn load(depth: u16, ops: u64) -> ReadLoad {
    ReadLoad {
        depth,
        block: 4096,
        ops,
        span_sectors: 16 * 2048,
    }
}

fn direct(bdf: &str, kick: KickMode, l: &ReadLoad) -> anyhow::Result<ReadStats> {
    let f = Arc::new(VfioFunction::open(bdf)?);
    let mut d = VpVdpa::open(f, OpenOptions::default())?;
    let mut drv = Driver::bring_up(
        &mut d,
        DriverOptions {
            queues: Some(1),
            ring_size: 128,
            kick,
            ..DriverOptions::default()
        },
    )?;
    let s = drv.blk_read_load(0, l)?;
    drv.release(&mut d)?;
    Ok(s)
}

fn plugin(bdf: &str, kick: KickPolicy, l: &ReadLoad) -> anyhow::Result<ReadStats> {
    let mut g = Guest::new(32 << 20, 128)?;
    let f = Arc::new(VfioFunction::open(bdf)?);
    let vp = VpVdpa::open(f, OpenOptions::default())?;
    let mut d = BridgeDevice::new(
        vp,
        g.mem.clone(),
        DeviceOptions {
            kick,
            ..DeviceOptions::default()
        },
    )?;
    d.ack_features(features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM))?;
    let irq = TestInterrupt::new(1, true)?;
    let queues = g.queues_sized(&d.queue_max_sizes()[..1])?;
    d.activate(g.mem.clone(), irq.clone(), queues)?;
    let s = g.blk_read_load(0, &irq.queues[0], l)?;
    d.reset()?;
    Ok(s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(ctx: &Ctx) -> CaseResult {
    let bdf = ctx.dev()?.bdf.clone();
    let mut report = Vec::new();
    for (label, l) in [("qd1", load(1, 1000)), ("qd32", load(32, 6000))] {
        let mut runs: [Vec<ReadStats>; 4] = Default::default();
        for _ in 0..ROUNDS {
            runs[0].push(direct(&bdf, KickMode::Doorbell, &l).context("a: direct")?);
            runs[1].push(plugin(&bdf, KickPolicy::Auto, &l).context("b: plugin")?);
            runs[2].push(plugin(&bdf, KickPolicy::Relay, &l).context("c: relay")?);
            runs[3].push(direct(&bdf, KickMode::EventFd, &l).context("a': direct, eventfd kick")?);
        }
        let iops: Vec<f64> = runs
            .iter()
            .map(|r| median(r.iter().map(|s| s.iops).collect()))
            .collect();
        let p50: Vec<f64> = runs
            .iter()
            .map(|r| median(r.iter().map(|s| s.p50_ns as f64).collect()))
            .collect();
        report.push(format!(
            "{label}: iops a={:.0} a'={:.0} b={:.0} c={:.0} b/a={:.3} c/a={:.3} b/a'={:.3}; p50 us a={:.1} b={:.1} c={:.1} a/b={:.3} a/c={:.3}",
            iops[0],
            iops[3],
            iops[1],
            iops[2],
            iops[1] / iops[0],
            iops[2] / iops[0],
            iops[1] / iops[3],
            p50[0] / 1e3,
            p50[1] / 1e3,
            p50[2] / 1e3,
            p50[0] / p50[1],
            p50[0] / p50[2],
        ));
    }
    let line = report.join(" | ");
    println!("@@BENCH {line}");
    Ok(Outcome::PassWith(line))
}
