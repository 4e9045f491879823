//! Console line protocol between the guest and the host orchestrator.
//!
//! The serial console is the only channel out of the guest, and the kernel
//! writes to it too. So every event is one line: a tag, a space and a JSON
//! object. The host finds the tag anywhere in a line, so kernel text that
//! interleaves at the start of a console line does not hide an event.
//!
//! | line | from | meaning |
//! | --- | --- | --- |
//! | `@@LAB-START {"case":..}` | `lab-guest` | a case begins (names the culprit of a hang) |
//! | `@@LAB {"case":..,"result":"pass"\|"fail"\|"skip","detail":..,"ms":N}` | `lab-guest` | a case ended |
//! | `@@LAB-BENCH-START {"case":..}` | `lab-guest` | a benchmark begins |
//! | `@@LAB-BENCH {"case":..,"result":"measured"\|"error"\|"skip","detail":..,"ms":N}` | `lab-guest` | a benchmark ended: its figures, or why it has none |
//! | `@@LAB-WRITE {"device":..,"offset":N,"len":N}` | `lab-guest` | a case wrote that byte range of a blk device's image |
//! | `@@LAB-SENT {"device":..,"text":..}` | `lab-guest` | a case sent that text to a console device's host side |
//! | `@@LAB-DONE {"failed":N}` | `lab-guest` | every case reported; `N` counts failed cases, never benchmarks |
//! | `@@LAB-EXIT {"rc":N}` | `/init` | `lab-guest`'s exit code; the VM powers off next |
//!
//! A case is a test: its verdict counts. A benchmark only reports: what it
//! measured, or the error that left it without figures. Its own line
//! (`@@LAB-BENCH`) keeps it out of every pass/fail count by construction.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a case ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every assertion held.
    Pass,
    /// An assertion failed, an error was returned or the case panicked.
    Fail,
    /// A precondition was missing; `detail` says which.
    Skip,
}

/// A case's result line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaseRecord {
    /// Case name.
    pub case: String,
    /// Outcome.
    pub result: Verdict,
    /// Failure or skip reason; empty on pass.
    pub detail: String,
    /// Wall time the case took, in milliseconds.
    pub ms: u64,
}

/// How a benchmark ended. None of these is a verdict: a benchmark never
/// passes or fails a run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BenchResult {
    /// It measured; `detail` holds the figures.
    Measured,
    /// It could not measure (an error, a panic, data that did not match
    /// the pattern); `detail` says why. Reported, never counted as failed.
    Error,
    /// A precondition was missing; `detail` says which.
    Skip,
}

/// A benchmark's result line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BenchRecord {
    /// Benchmark name.
    pub case: String,
    /// Outcome.
    pub result: BenchResult,
    /// The figures, or the error or skip reason.
    pub detail: String,
    /// Wall time it took, in milliseconds.
    pub ms: u64,
}

/// A byte range a case wrote to a blk device's image. The host excludes it
/// when it checks the image against [`crate::pattern`] after the VM exits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WriteRecord {
    /// Device variant name (`blk0`).
    pub device: String,
    /// Byte offset into the image.
    pub offset: u64,
    /// Byte count.
    pub len: u64,
    /// Written by `l3-stream` (`crate::stream`'s blocks), not with the
    /// written pattern.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// Text a case sent to a console device, which QEMU writes to the
/// device's chardev file. The host checks after the VM exits that the file
/// holds exactly the texts declared, in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SentRecord {
    /// Device variant name (`console`).
    pub device: String,
    /// The text.
    pub text: String,
}

/// One console event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `@@LAB-START`: the named case begins.
    Start(String),
    /// `@@LAB`: a case ended.
    Result(CaseRecord),
    /// `@@LAB-BENCH-START`: the named benchmark begins.
    BenchStart(String),
    /// `@@LAB-BENCH`: a benchmark ended.
    Bench(BenchRecord),
    /// `@@LAB-WRITE`: a case wrote to an image.
    Write(WriteRecord),
    /// `@@LAB-SENT`: a case sent text to a console device.
    Sent(SentRecord),
    /// `@@LAB-DONE`: the runner finished, with this many failures.
    Done {
        /// Failed cases (benchmarks never count).
        failed: u64,
    },
    /// `@@LAB-EXIT`: the runner's exit code, printed by `/init`.
    Exit {
        /// Exit code (negative when the runner could not be started).
        rc: i64,
    },
}

#[derive(Serialize, Deserialize)]
struct StartBody {
    case: String,
}

#[derive(Serialize, Deserialize)]
struct DoneBody {
    failed: u64,
}

#[derive(Serialize, Deserialize)]
struct ExitBody {
    rc: i64,
}

/// The common prefix of every tag.
pub const PREFIX: &str = "@@LAB";

/// Compact JSON of a plain record. These structs hold only strings and
/// integers, so serialization cannot fail; a failure would still show up
/// as a malformed line on the host rather than a panic in the guest.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Start(case) => {
                let body = json(&StartBody { case: case.clone() });
                write!(f, "{PREFIX}-START {body}")
            }
            Event::Result(r) => write!(f, "{PREFIX} {}", json(r)),
            Event::BenchStart(case) => {
                let body = json(&StartBody { case: case.clone() });
                write!(f, "{PREFIX}-BENCH-START {body}")
            }
            Event::Bench(r) => write!(f, "{PREFIX}-BENCH {}", json(r)),
            Event::Write(w) => write!(f, "{PREFIX}-WRITE {}", json(w)),
            Event::Sent(t) => write!(f, "{PREFIX}-SENT {}", json(t)),
            Event::Done { failed } => {
                write!(f, "{PREFIX}-DONE {}", json(&DoneBody { failed: *failed }))
            }
            Event::Exit { rc } => write!(f, "{PREFIX}-EXIT {}", json(&ExitBody { rc: *rc })),
        }
    }
}

/// Parse one console line. `Ok(None)` for ordinary console output, `Err`
/// for a line that carries a tag but a malformed body (a harness bug the
/// host reports as a failure rather than ignores).
pub fn parse(line: &str) -> Result<Option<Event>, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    let Some(at) = line.find(PREFIX) else {
        return Ok(None);
    };
    let rest = &line[at..];
    let (tag, body) = rest.split_once(' ').unwrap_or((rest, ""));
    let bad = |e: serde_json::Error| format!("malformed {tag} line ({e}): {line:?}");
    let ev = match tag {
        "@@LAB" => Event::Result(serde_json::from_str(body).map_err(bad)?),
        "@@LAB-START" => Event::Start(serde_json::from_str::<StartBody>(body).map_err(bad)?.case),
        "@@LAB-BENCH-START" => {
            Event::BenchStart(serde_json::from_str::<StartBody>(body).map_err(bad)?.case)
        }
        "@@LAB-BENCH" => Event::Bench(serde_json::from_str(body).map_err(bad)?),
        "@@LAB-WRITE" => Event::Write(serde_json::from_str(body).map_err(bad)?),
        "@@LAB-SENT" => Event::Sent(serde_json::from_str(body).map_err(bad)?),
        "@@LAB-DONE" => Event::Done {
            failed: serde_json::from_str::<DoneBody>(body).map_err(bad)?.failed,
        },
        "@@LAB-EXIT" => Event::Exit {
            rc: serde_json::from_str::<ExitBody>(body).map_err(bad)?.rc,
        },
        // Some other text that happens to contain the prefix: not ours.
        _ => return Ok(None),
    };
    Ok(Some(ev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(ev: Event) {
        assert_eq!(parse(&ev.to_string()), Ok(Some(ev)));
    }

    #[test]
    fn every_event_roundtrips_through_its_line() {
        roundtrip(Event::Start("blk0_vfio_group_viable".into()));
        roundtrip(Event::Result(CaseRecord {
            case: "a".into(),
            result: Verdict::Fail,
            detail: "line one\nline \"two\"".into(),
            ms: 12,
        }));
        roundtrip(Event::BenchStart("bench_blk0_4k_random_read".into()));
        roundtrip(Event::Bench(BenchRecord {
            case: "b".into(),
            result: BenchResult::Error,
            detail: "L3-PERF-ERROR blk0: sector 3".into(),
            ms: 7,
        }));
        roundtrip(Event::Write(WriteRecord {
            stream: false,
            device: "blk0".into(),
            offset: 4096,
            len: 512,
        }));
        roundtrip(Event::Sent(SentRecord {
            device: "console".into(),
            text: "lab 1\n\"x\"".into(),
        }));
        roundtrip(Event::Done { failed: 0 });
        roundtrip(Event::Exit { rc: -1 });
    }

    #[test]
    fn result_line_has_the_documented_shape() {
        let ev = Event::Result(CaseRecord {
            case: "a".into(),
            result: Verdict::Pass,
            detail: String::new(),
            ms: 3,
        });

        assert_eq!(
            ev.to_string(),
            r#"@@LAB {"case":"a","result":"pass","detail":"","ms":3}"#
        );
    }

    #[test]
    fn bench_line_has_its_own_tag_and_result_names() {
        let ev = Event::Bench(BenchRecord {
            case: "b".into(),
            result: BenchResult::Measured,
            detail: "b/a 0.98".into(),
            ms: 3,
        });

        assert_eq!(
            ev.to_string(),
            r#"@@LAB-BENCH {"case":"b","result":"measured","detail":"b/a 0.98","ms":3}"#
        );
        assert!(parse(r#"@@LAB-BENCH {"case":"b","result":"pass","detail":"","ms":3}"#).is_err());
    }

    #[test]
    fn init_line_from_the_shell_script_parses() {
        assert_eq!(
            parse("@@LAB-EXIT {\"rc\":0}\r\n"),
            Ok(Some(Event::Exit { rc: 0 }))
        );
    }

    #[test]
    fn tag_after_interleaved_kernel_text_is_found() {
        let got = parse(r#"[    3.1] random: crng init@@LAB-DONE {"failed":2}"#);

        assert_eq!(got, Ok(Some(Event::Done { failed: 2 })));
    }

    #[test]
    fn tagged_line_with_broken_json_is_an_error() {
        assert!(parse(r#"@@LAB {"case":"a","result":"maybe"}"#).is_err());
    }

    #[test]
    fn plain_console_output_is_not_an_event() {
        assert_eq!(parse("Run /init as init process"), Ok(None));
    }
}
