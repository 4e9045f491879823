//! Guest side of the lab: the case registry and the runner `lab-guest` uses.
//!
//! `lab-guest` runs inside the QEMU guest (chrooted into the host's root,
//! shared read-only over 9p), reads the manifest and runs the selected cases
//! one by one, printing the [`crate::protocol`] lines on the console.
//!
//! # Adding a case
//! Write `fn my_case(ctx: &Ctx) -> anyhow::Result<Outcome>` in a file under
//! `cases/` (a new file per suite), list it in that file's
//! `pub const CASES: &[Case]`, and add the file to [`cases::all`]. Return
//! `Ok(Outcome::Pass)`, `Ok(Outcome::Skip(reason))` when a precondition is
//! missing, or an error (a panic counts as a failure too). Devices come from
//! `ctx.device("blk0")`; ask the host to verify image bytes after the VM exits
//! with [`Ctx::expect_image`].

pub mod cases;
pub mod sys;

use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use crate::manifest::{Device, Manifest};
use crate::pattern;
use crate::protocol::{Event, ImageCheck, Status};

/// What a case returns when it did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything checked out.
    Pass,
    /// A precondition is missing; the reason is reported.
    Skip(String),
}

/// A case's entry point.
pub type CaseFn = fn(&Ctx) -> anyhow::Result<Outcome>;

/// A named case.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// Unique name, no whitespace; filters match substrings of it.
    pub name: &'static str,
    /// Entry point.
    pub run: CaseFn,
}

/// What every case gets.
pub struct Ctx {
    /// The manifest the host wrote.
    pub manifest: Manifest,
}

/// Print one protocol line on the console and flush it right away.
pub fn emit(ev: &Event) {
    let mut out = std::io::stdout().lock();
    // The console is the only channel: nothing sensible to do on error.
    let _ = writeln!(out, "{ev}");
    let _ = out.flush();
}

impl Ctx {
    /// The device called `name`.
    pub fn device(&self, name: &str) -> anyhow::Result<&Device> {
        self.manifest.device(name)
    }

    /// All test devices.
    pub fn devices(&self) -> &[Device] {
        &self.manifest.devices
    }

    /// Ask the host to check, after the VM exits, that `image` holds bytes
    /// with SHA-256 `sha256` at `offset..offset+len`; the result is recorded
    /// as `host:<test>`.
    pub fn check_image(&self, image: &str, offset: u64, len: u64, sha256: &str, test: &str) {
        emit(&Event::CheckImage(ImageCheck {
            image: image.to_string(),
            offset,
            len,
            sha256: sha256.to_string(),
            test: test.to_string(),
        }));
    }

    /// Ask the host to check that `image` holds exactly `expected` at
    /// `offset` after the VM exits (recorded as `host:<test>`).
    pub fn expect_image(&self, image: &str, offset: u64, expected: &[u8], test: &str) {
        let sha = pattern::sha256_hex(expected);
        self.check_image(image, offset, expected.len() as u64, &sha, test);
    }
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

/// Cases whose name contains any of `filter` (all when empty).
pub fn select<'a>(all: &'a [Case], filter: &[String]) -> Vec<&'a Case> {
    all.iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.name.contains(f.as_str())))
        .collect()
}

/// Run one case, catching errors and panics.
pub fn run_one(ctx: &Ctx, case: &Case) -> Status {
    match catch_unwind(AssertUnwindSafe(|| (case.run)(ctx))) {
        Ok(Ok(Outcome::Pass)) => Status::Ok,
        Ok(Ok(Outcome::Skip(why))) if ctx.manifest.skip_is_failure => {
            Status::Fail(format!("skipped but VDPA_LAB_NO_SKIP=1: {why}"))
        }
        Ok(Ok(Outcome::Skip(why))) => Status::Skip(why),
        Ok(Err(e)) => Status::Fail(format!("{e:#}")),
        Err(p) => Status::Fail(format!("panicked: {}", panic_text(p.as_ref()))),
    }
}

/// Run the selected cases, printing the protocol. Returns the failure count.
pub fn run(ctx: &Ctx, all: &[Case], filter: &[String]) -> usize {
    let selected = select(all, filter);
    emit(&Event::Plan(selected.len()));
    let mut failed = 0;
    for case in selected {
        emit(&Event::Start(case.name.to_string()));
        let t0 = Instant::now();
        let status = run_one(ctx, case);
        if matches!(status, Status::Fail(_)) {
            failed += 1;
        }
        emit(&Event::Init(format!(
            "case {} took {:.2}s",
            case.name,
            t0.elapsed().as_secs_f64()
        )));
        emit(&Event::Result {
            name: case.name.to_string(),
            status,
        });
    }
    emit(&Event::Done);
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::NetInfo;

    fn ctx(skip_is_failure: bool) -> Ctx {
        Ctx {
            manifest: Manifest {
                version: crate::manifest::MANIFEST_VERSION,
                lab_dir: "lab".into(),
                filter: vec![],
                skip_is_failure,
                devices: vec![],
                net: NetInfo {
                    netns: "ns".into(),
                    tap: "tap".into(),
                    tap_addr: "10.99.0.1".into(),
                    prefix_len: 24,
                    guest_addr: "10.99.0.2".into(),
                },
                env: Default::default(),
            },
        }
    }

    fn panics(_: &Ctx) -> anyhow::Result<Outcome> {
        panic!("boom")
    }

    fn skips(_: &Ctx) -> anyhow::Result<Outcome> {
        Ok(Outcome::Skip("no kvm".into()))
    }

    #[test]
    fn panicking_case_is_reported_as_failure_with_message() {
        let case = Case {
            name: "p",
            run: panics,
        };

        let status = run_one(&ctx(false), &case);

        assert_eq!(status, Status::Fail("panicked: boom".into()));
    }

    #[test]
    fn skip_becomes_failure_when_skips_are_forbidden() {
        let case = Case {
            name: "s",
            run: skips,
        };

        let status = run_one(&ctx(true), &case);

        assert!(matches!(status, Status::Fail(r) if r.contains("no kvm")));
    }

    #[test]
    fn filter_selects_by_substring() {
        let all = [
            Case {
                name: "vfio_a",
                run: skips,
            },
            Case {
                name: "net_b",
                run: skips,
            },
        ];

        let picked = select(&all, &["net".to_string()]);

        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].name, "net_b");
    }
}
