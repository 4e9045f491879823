//! Console line protocol between the guest (init script and runner) and the
//! host orchestrator. One event per line on the serial console:
//!
//! | line | from | meaning |
//! | --- | --- | --- |
//! | `LAB-INIT <text>` | init | progress / diagnostics |
//! | `LAB-PLAN <n>` | runner | n cases selected |
//! | `LAB-START <name>` | runner | case begins |
//! | `LAB-RESULT ok <name>` | runner | case passed |
//! | `LAB-RESULT FAIL <name> <reason>` | runner | case failed |
//! | `LAB-RESULT skip <name> <reason>` | runner | case skipped |
//! | `LAB-CHECK-IMAGE <image> <offset> <len> <sha256> <test>` | runner | host must verify image bytes after the VM exits; recorded as `host:<test>` |
//! | `LAB-DONE` | runner | every selected case reported |
//! | `LAB-RUNNER-EXIT <rc>` | init | the runner's exit code |
//!
//! Names never contain whitespace; reasons are flattened to one line. The
//! parser finds the marker anywhere in the line, so kernel messages that
//! interleave at the start of a console line do not hide an event.

use std::fmt;

/// Outcome reported for a case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Passed.
    Ok,
    /// Failed with a reason.
    Fail(String),
    /// Not run, with a reason.
    Skip(String),
}

/// A host-side check the guest asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageCheck {
    /// Image file name as in the manifest (`blk0.img`).
    pub image: String,
    /// Byte offset.
    pub offset: u64,
    /// Byte count.
    pub len: u64,
    /// Expected lower-case hex SHA-256 of those bytes.
    pub sha256: String,
    /// Test name; the host records it as `host:<test>`.
    pub test: String,
}

/// One parsed console event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `LAB-INIT`
    Init(String),
    /// `LAB-PLAN`
    Plan(usize),
    /// `LAB-START`
    Start(String),
    /// `LAB-RESULT`
    Result {
        /// Case name.
        name: String,
        /// What happened.
        status: Status,
    },
    /// `LAB-CHECK-IMAGE`
    CheckImage(ImageCheck),
    /// `LAB-DONE`
    Done,
    /// `LAB-RUNNER-EXIT`
    RunnerExit(i32),
}

/// Make `s` safe to put on one console line.
pub fn one_line(s: &str) -> String {
    let flat: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if flat.is_empty() {
        "(no reason given)".to_string()
    } else {
        flat.join(" | ")
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Init(t) => write!(f, "LAB-INIT {}", one_line(t)),
            Event::Plan(n) => write!(f, "LAB-PLAN {n}"),
            Event::Start(n) => write!(f, "LAB-START {n}"),
            Event::Result { name, status } => match status {
                Status::Ok => write!(f, "LAB-RESULT ok {name}"),
                Status::Fail(r) => write!(f, "LAB-RESULT FAIL {name} {}", one_line(r)),
                Status::Skip(r) => write!(f, "LAB-RESULT skip {name} {}", one_line(r)),
            },
            Event::CheckImage(c) => write!(
                f,
                "LAB-CHECK-IMAGE {} {} {} {} {}",
                c.image, c.offset, c.len, c.sha256, c.test
            ),
            Event::Done => write!(f, "LAB-DONE"),
            Event::RunnerExit(rc) => write!(f, "LAB-RUNNER-EXIT {rc}"),
        }
    }
}

/// Splits off the first whitespace-separated word.
fn word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    Some(match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    })
}

/// Parse one console line. `Ok(None)` for ordinary console output,
/// `Err` for a line that carries a marker but is malformed.
pub fn parse(line: &str) -> Result<Option<Event>, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    let Some(at) = line.find("LAB-") else {
        return Ok(None);
    };
    let (tag, rest) = word(&line[at..]).ok_or("empty")?;
    let bad = |what: &str| format!("malformed {tag}: {what}: {line:?}");
    let ev = match tag {
        "LAB-INIT" => Event::Init(rest.to_string()),
        "LAB-PLAN" => Event::Plan(rest.trim().parse().map_err(|_| bad("count"))?),
        "LAB-START" => Event::Start(word(rest).ok_or_else(|| bad("name"))?.0.to_string()),
        "LAB-DONE" => Event::Done,
        "LAB-RUNNER-EXIT" => Event::RunnerExit(rest.trim().parse().map_err(|_| bad("rc"))?),
        "LAB-RESULT" => {
            let (st, rest) = word(rest).ok_or_else(|| bad("status"))?;
            let (name, reason) = word(rest).ok_or_else(|| bad("name"))?;
            let status = match st {
                "ok" => Status::Ok,
                "FAIL" => Status::Fail(reason.to_string()),
                "skip" => Status::Skip(reason.to_string()),
                _ => return Err(bad("status")),
            };
            Event::Result {
                name: name.to_string(),
                status,
            }
        }
        "LAB-CHECK-IMAGE" => {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let [image, offset, len, sha, test] = f[..] else {
                return Err(bad("want 5 fields"));
            };
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("sha256"));
            }
            Event::CheckImage(ImageCheck {
                image: image.to_string(),
                offset: offset.parse().map_err(|_| bad("offset"))?,
                len: len.parse().map_err(|_| bad("len"))?,
                sha256: sha.to_ascii_lowercase(),
                test: test.to_string(),
            })
        }
        // Some other LAB- text (e.g. inside a kernel message): not ours.
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
        roundtrip(Event::Plan(3));
        roundtrip(Event::Start("a_case".into()));
        roundtrip(Event::Result {
            name: "a".into(),
            status: Status::Ok,
        });
        roundtrip(Event::Result {
            name: "a".into(),
            status: Status::Fail("it broke".into()),
        });
        roundtrip(Event::Result {
            name: "a".into(),
            status: Status::Skip("no kvm".into()),
        });
        roundtrip(Event::CheckImage(ImageCheck {
            image: "blk0.img".into(),
            offset: 4096,
            len: 512,
            sha256: "ab".repeat(32),
            test: "t".into(),
        }));
        roundtrip(Event::Done);
        roundtrip(Event::RunnerExit(101));
    }

    #[test]
    fn multi_line_reason_is_flattened() {
        let ev = Event::Result {
            name: "a".into(),
            status: Status::Fail("first\n\n  second\n".into()),
        };

        assert_eq!(ev.to_string(), "LAB-RESULT FAIL a first | second");
    }

    #[test]
    fn marker_after_interleaved_kernel_text_is_found() {
        let got = parse("[    3.1] random: crng initLAB-RESULT ok blk0_reads\r");

        assert_eq!(
            got,
            Ok(Some(Event::Result {
                name: "blk0_reads".into(),
                status: Status::Ok
            }))
        );
    }

    #[test]
    fn check_image_with_bad_sha_is_rejected() {
        assert!(parse("LAB-CHECK-IMAGE blk0.img 0 512 xyz t").is_err());
    }

    #[test]
    fn plain_console_output_is_not_an_event() {
        assert_eq!(parse("Run /init as init process"), Ok(None));
    }
}
