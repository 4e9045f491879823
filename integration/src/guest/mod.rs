//! Guest side of the lab: the runner behind `lab-guest` and the case
//! registry it runs.
//!
//! `lab-guest` runs inside the QEMU guest, chrooted into the host's root
//! (shared read-only over 9p). It reads the manifest, binds every device to
//! vfio-pci, runs the registered cases one by one and prints a
//! [`crate::protocol`] line per event on the serial console.
//!
//! # Adding a case
//! Write `fn my_case(ctx: &Ctx) -> CaseResult` in a file under `cases/`
//! (one file per suite) and list it in that file's `cases()` with the
//! device variant it needs. Return `Ok(Outcome::Pass)`,
//! `Ok(Outcome::Skip(reason))` when a precondition is missing, or an error
//! (a panic counts as a failure too). The runner reports a case whose
//! variant is absent from the run as skipped, with the host's reason, and a
//! case whose device failed to bind as failed, without calling it.
//!
//! # Tests and benchmarks
//! A [`Suite`] holds tests and benchmarks, both plain [`Case`]s; where a
//! case is registered decides what it is (`cases::cases`). A test's
//! verdict counts. A benchmark only reports: `Ok(Outcome::PassWith(figures))`
//! is printed as its measurement, an error or panic as a benchmark error
//! (visible on the console and in the host's report, but never a failure),
//! a skip as a skip. The runner's failure count and exit code come from the
//! tests alone.

pub mod cases;
pub mod ch;
pub mod handoff;
pub mod stats;
pub mod sys;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use anyhow::Context as _;

use crate::manifest::{Device, Manifest, Variant};
use crate::protocol::{
    BenchRecord, BenchResult, CaseRecord, Event, SentRecord, Verdict, WriteRecord,
};

/// What a case returns when it did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every assertion held.
    Pass,
    /// Passed, with a note for the report (measurements).
    PassWith(String),
    /// A precondition is missing; the reason is reported.
    Skip(String),
}

/// What a case returns: an error is a failure.
pub type CaseResult = anyhow::Result<Outcome>;

/// A registered case.
#[derive(Clone, Debug)]
pub struct Case {
    /// Unique name without whitespace.
    pub name: String,
    /// The device variant the case runs against, if any.
    pub needs: Option<Variant>,
    /// Entry point.
    pub run: fn(&Ctx) -> CaseResult,
}

/// The cases of a run: tests first, then benchmarks.
#[derive(Clone, Debug, Default)]
pub struct Suite {
    /// Cases whose verdict counts.
    pub tests: Vec<Case>,
    /// Cases that only report measurements; never a pass or a failure.
    pub benchmarks: Vec<Case>,
}

impl Suite {
    /// Keep only the cases whose name contains `text`; how many were left
    /// out.
    pub fn retain_named(&mut self, text: &str) -> usize {
        let before = self.len();
        self.tests.retain(|c| c.name.contains(text));
        self.benchmarks.retain(|c| c.name.contains(text));
        before - self.len()
    }

    /// Tests and benchmarks together.
    pub fn len(&self) -> usize {
        self.tests.len() + self.benchmarks.len()
    }

    /// No case at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a case gets.
pub struct Ctx<'a> {
    /// The manifest the host wrote.
    pub manifest: &'a Manifest,
    /// The device of [`Case::needs`], present and bound to vfio-pci.
    pub device: Option<&'a Device>,
}

impl Ctx<'_> {
    /// The device the case declared it needs.
    ///
    /// # Errors
    /// The case was registered without `needs`.
    pub fn dev(&self) -> anyhow::Result<&Device> {
        self.device
            .context("case registered without a device variant in `needs`")
    }

    /// Declare that the case wrote `len` bytes at `offset` of its blk
    /// device's image, so the host's after-exit check expects the written
    /// pattern there (and the image's own pattern everywhere else).
    ///
    /// Declare a write once it can have happened: right after the request
    /// was handed to the device (whatever its result), or after the inner
    /// guest reached the point where it writes. A write declared before
    /// that, when the case then fails first, makes the host's image check
    /// fail as well, for a write that never happened.
    ///
    /// # Errors
    /// The case has no device.
    pub fn declare_write(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        declare_write_to(self.dev()?.variant.name(), offset, len);
        Ok(())
    }

    /// [`declare_stream_to`] for the case's device.
    ///
    /// # Errors
    /// The case has no device.
    pub fn declare_stream(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        declare_stream_to(self.dev()?.variant.name(), offset, len);
        Ok(())
    }

    /// Declare that the case sent `text` to its console device, which the
    /// host then expects in the device's chardev file (see
    /// [`Ctx::declare_write`] for when to declare).
    ///
    /// # Errors
    /// The case has no device.
    pub fn declare_sent(&self, text: &str) -> anyhow::Result<()> {
        emit(&Event::Sent(SentRecord {
            device: self.dev()?.variant.name().to_string(),
            text: text.to_string(),
        }));
        Ok(())
    }
}

/// Declare a write of `len` bytes at `offset` of the image named
/// `image` (a device variant name, or `vduse`); see [`Ctx::declare_write`].
pub fn declare_write_to(image: &str, offset: u64, len: u64) {
    emit(&Event::Write(WriteRecord {
        device: image.to_string(),
        offset,
        len,
        stream: false,
    }));
}

/// Declare that `l3-stream` may write `[offset, offset + len)` of
/// `image`: the host checks each block holds the pattern or one whole
/// stream write (`crate::stream`).
pub fn declare_stream_to(image: &str, offset: u64, len: u64) {
    emit(&Event::Write(WriteRecord {
        device: image.to_string(),
        offset,
        len,
        stream: true,
    }));
}

/// Print one protocol line on the console and flush it right away.
pub fn emit(ev: &Event) {
    let mut out = std::io::stdout().lock();
    // The console is the only channel: nothing sensible to do on error.
    let _ = writeln!(out, "{ev}");
    let _ = out.flush();
}

/// Text of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Result of binding each device to vfio-pci: `Err(reason)` on failure.
pub type Bindings = BTreeMap<Variant, Result<(), String>>;

/// Bind every manifest device to vfio-pci.
pub fn bind_all(manifest: &Manifest) -> Bindings {
    manifest
        .devices
        .iter()
        .map(|d| {
            let r = sys::bind_vfio_pci(&d.bdf)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"));
            (d.variant, r)
        })
        .collect()
}

/// Run one case, deciding skip/fail from the manifest and bindings first,
/// catching errors and panics.
pub fn run_one(manifest: &Manifest, bindings: &Bindings, case: &Case) -> (Verdict, String) {
    let device = match case.needs {
        None => None,
        Some(v) => {
            let dev = match manifest.device_or_reason(v) {
                Ok(dev) => dev,
                Err(why) => return (Verdict::Skip, format!("{}: {why}", v.name())),
            };
            if let Some(Err(e)) = bindings.get(&v) {
                return (Verdict::Fail, format!("binding to vfio-pci failed: {e}"));
            }
            Some(dev)
        }
    };
    let ctx = Ctx { manifest, device };
    match catch_unwind(AssertUnwindSafe(|| (case.run)(&ctx))) {
        Ok(Ok(Outcome::Pass)) => (Verdict::Pass, String::new()),
        Ok(Ok(Outcome::PassWith(note))) => (Verdict::Pass, note),
        Ok(Ok(Outcome::Skip(why))) => (Verdict::Skip, why),
        Ok(Err(e)) => (Verdict::Fail, format!("{e:#}")),
        Err(p) => (
            Verdict::Fail,
            format!("panicked: {}", panic_text(p.as_ref())),
        ),
    }
}

/// What a benchmark's run amounts to: its figures, its error or its skip.
fn bench_result(verdict: Verdict) -> BenchResult {
    match verdict {
        Verdict::Pass => BenchResult::Measured,
        Verdict::Fail => BenchResult::Error,
        Verdict::Skip => BenchResult::Skip,
    }
}

/// Run the tests, then the benchmarks, printing the protocol. Returns the
/// number of failed tests (benchmarks never count).
pub fn run(manifest: &Manifest, bindings: &Bindings, suite: &Suite) -> u64 {
    run_with(manifest, bindings, suite, &mut |ev| emit(ev))
}

/// [`run`], handing each event to `emit`.
fn run_with(
    manifest: &Manifest,
    bindings: &Bindings,
    suite: &Suite,
    emit: &mut dyn FnMut(&Event),
) -> u64 {
    let mut failed = 0;
    for case in &suite.tests {
        emit(&Event::Start(case.name.clone()));
        let t0 = Instant::now();
        let (result, detail) = run_one(manifest, bindings, case);
        if result == Verdict::Fail {
            failed += 1;
        }
        emit(&Event::Result(CaseRecord {
            case: case.name.clone(),
            result,
            detail,
            ms: t0.elapsed().as_millis() as u64,
        }));
    }
    for case in &suite.benchmarks {
        emit(&Event::BenchStart(case.name.clone()));
        let t0 = Instant::now();
        let (verdict, detail) = run_one(manifest, bindings, case);
        emit(&Event::Bench(BenchRecord {
            case: case.name.clone(),
            result: bench_result(verdict),
            detail,
            ms: t0.elapsed().as_millis() as u64,
        }));
    }
    emit(&Event::Done { failed });
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Kind, Skipped, MANIFEST_VERSION};

    fn manifest() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            devices: vec![Device {
                variant: Variant::Blk0,
                bdf: "0000:00:03.0".into(),
                kind: Kind::Blk,
                legacy: false,
                image: None,
                num_queues: 2,
                msix_vectors: 3,
                qemu_device: String::new(),
                console: None,
                root_port: None,
            }],
            skipped: vec![Skipped {
                variant: Variant::NetMq,
                reason: "cannot create netns".into(),
            }],
            bench: false,
            soak: None,
            only: None,
            vduse_image: None,
            fleet: Vec::new(),
            fleet_bench: Default::default(),
            ch: None,
            ch_skip: None,
        }
    }

    fn case(needs: Option<Variant>, run: fn(&Ctx) -> CaseResult) -> Case {
        Case {
            name: "c".into(),
            needs,
            run,
        }
    }

    fn panics(_: &Ctx) -> CaseResult {
        panic!("boom")
    }

    fn fails(_: &Ctx) -> CaseResult {
        anyhow::bail!("L3-PERF-ERROR blk0: sector 3 read back zeros")
    }

    fn passes(ctx: &Ctx) -> CaseResult {
        ctx.dev()?;
        Ok(Outcome::Pass)
    }

    #[test]
    fn panicking_case_is_reported_as_failure_with_message() {
        let got = run_one(&manifest(), &Bindings::new(), &case(None, panics));

        assert_eq!(got, (Verdict::Fail, "panicked: boom".into()));
    }

    #[test]
    fn case_on_a_skipped_variant_is_skipped_with_the_host_reason() {
        let got = run_one(
            &manifest(),
            &Bindings::new(),
            &case(Some(Variant::NetMq), panics),
        );

        assert_eq!(got, (Verdict::Skip, "net_mq: cannot create netns".into()));
    }

    #[test]
    fn case_on_a_device_that_failed_to_bind_fails_without_running() {
        let bindings = Bindings::from([(Variant::Blk0, Err("EBUSY".to_string()))]);

        let got = run_one(&manifest(), &bindings, &case(Some(Variant::Blk0), panics));

        assert_eq!(
            got,
            (Verdict::Fail, "binding to vfio-pci failed: EBUSY".into())
        );
    }

    #[test]
    fn failing_benchmark_is_an_error_not_a_failure() {
        let suite = Suite {
            tests: vec![case(None, |_| Ok(Outcome::Pass))],
            benchmarks: vec![case(None, fails), case(None, panics)],
        };

        let mut events = Vec::new();

        let failed = run_with(&manifest(), &Bindings::new(), &suite, &mut |e| {
            events.push(e.clone())
        });

        assert_eq!(failed, 0);
        let benches: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Bench(r) => Some((r.result, r.detail.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            benches,
            [
                (
                    BenchResult::Error,
                    "L3-PERF-ERROR blk0: sector 3 read back zeros"
                ),
                (BenchResult::Error, "panicked: boom"),
            ]
        );
        assert_eq!(events.last(), Some(&Event::Done { failed: 0 }));
    }

    #[test]
    fn failing_test_counts() {
        let suite = Suite {
            tests: vec![case(None, fails)],
            benchmarks: vec![case(None, |_| Ok(Outcome::PassWith("1.0".into())))],
        };

        assert_eq!(run(&manifest(), &Bindings::new(), &suite), 1);
    }

    #[test]
    fn name_filter_applies_to_tests_and_benchmarks() {
        let named = |n: &str| Case {
            name: n.into(),
            needs: None,
            run: passes,
        };
        let mut suite = Suite {
            tests: vec![named("ch_blk0_io"), named("bridge_blk0_info")],
            benchmarks: vec![named("ch_blk0_throughput"), named("qd1_random_read")],
        };

        let left_out = suite.retain_named("ch_");

        assert_eq!(left_out, 2);
        assert_eq!(suite.tests[0].name, "ch_blk0_io");
        assert_eq!(suite.benchmarks[0].name, "ch_blk0_throughput");
    }

    #[test]
    fn case_gets_its_device() {
        let bindings = Bindings::from([(Variant::Blk0, Ok(()))]);

        let got = run_one(&manifest(), &bindings, &case(Some(Variant::Blk0), passes));

        assert_eq!(got, (Verdict::Pass, String::new()));
    }
}
