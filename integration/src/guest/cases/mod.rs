//! The case registry. One file per suite, each with a `cases()` list;
//! [`cases`] concatenates them in run order.
//!
//! To add a suite: create `cases/<suite>.rs` with
//! `pub fn cases() -> Vec<Case>`, declare it below and append it in
//! [`cases`]. Case names must be unique (a unit test checks that).

use super::Case;
use crate::manifest::Manifest;

pub mod bench;
pub mod bridge;
pub mod ch;
pub mod plugin;
pub mod smoke;
pub mod vhost_vdpa;

/// The cases of this run, in run order: the benchmark alone when the
/// manifest asks for it, else every test case.
pub fn cases(manifest: &Manifest) -> Vec<Case> {
    if manifest.bench {
        return bench::cases();
    }
    all()
}

/// Every test case, in run order.
pub fn all() -> Vec<Case> {
    let mut all = smoke::cases();
    all.extend(bridge::cases());
    all.extend(plugin::cases());
    all.extend(vhost_vdpa::cases());
    all.extend(ch::cases());
    all
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn case_names_are_unique_and_have_no_whitespace() {
        let all = super::all();
        let names: HashSet<&str> = all.iter().map(|c| c.name.as_str()).collect();

        assert_eq!(names.len(), all.len());
        assert!(names
            .iter()
            .all(|n| !n.is_empty() && !n.contains(char::is_whitespace)));
    }
}
