//! The case registry. One file per suite, each with a `cases()` list;
//! [`all`] concatenates the test suites in run order, [`benchmarks`] the
//! benchmark suites.
//!
//! To add a suite: create `cases/<suite>.rs` with
//! `pub fn cases() -> Vec<Case>`, declare it below and append it in
//! [`all`] (tests: their verdict counts) or [`benchmarks`] (measurements:
//! reported, never a pass or a failure; they run only with
//! `VDPA_LAB_BENCH=1`). Case names must be unique (a unit test checks
//! that).

use super::{Case, Suite};
use crate::manifest::Manifest;

pub mod bench;
pub mod bridge;
pub mod ch;
pub mod ch_bench;
pub mod ch_migrate;
pub mod faults;
pub mod fleet;
pub mod handed;
pub mod plugin;
pub mod smoke;
pub mod soak;
pub mod types;
pub mod vhost_vdpa;

/// The cases of this run: the benchmarks alone when the manifest asks for
/// them, else every test case.
pub fn cases(manifest: &Manifest) -> Suite {
    if manifest.soak.is_some() {
        Suite {
            tests: soak::cases(),
            benchmarks: Vec::new(),
        }
    } else if manifest.bench {
        Suite {
            tests: Vec::new(),
            benchmarks: benchmarks(),
        }
    } else {
        Suite {
            tests: all(),
            benchmarks: Vec::new(),
        }
    }
}

/// Every benchmark, in run order.
pub fn benchmarks() -> Vec<Case> {
    let mut all = bench::cases();
    all.extend(ch_bench::cases());
    all.extend(fleet::benchmarks());
    all
}

/// Every test case, in run order.
pub fn all() -> Vec<Case> {
    let mut all = smoke::cases();
    all.extend(bridge::cases());
    all.extend(types::cases());
    all.extend(plugin::cases());
    all.extend(fleet::cases());
    all.extend(vhost_vdpa::cases());
    all.extend(handed::cases());
    all.extend(ch::cases());
    all.extend(ch_migrate::cases());
    all.extend(faults::cases());
    all
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn case_names_are_unique_and_have_no_whitespace() {
        let mut all = super::all();
        all.extend(super::benchmarks());
        all.extend(super::soak::cases());
        let names: HashSet<&str> = all.iter().map(|c| c.name.as_str()).collect();

        assert_eq!(names.len(), all.len());
        assert!(names
            .iter()
            .all(|n| !n.is_empty() && !n.contains(char::is_whitespace)));
    }
}
