//! The case registry. One file per suite; each exports `CASES`.
//!
//! To add a suite: create `cases/<suite>.rs` with
//! `pub const CASES: &[Case] = &[Case { name: "...", run: my_case }, ...];`,
//! declare it below and append it in [`all`]. Case names must be unique
//! (a unit test checks that).

use super::Case;

pub mod smoke;

/// Every registered case, in run order.
pub fn all() -> Vec<Case> {
    [smoke::CASES].concat()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn case_names_are_unique_and_have_no_whitespace() {
        let all = super::all();
        let names: HashSet<&str> = all.iter().map(|c| c.name).collect();

        assert_eq!(names.len(), all.len());
        assert!(names.iter().all(|n| !n.is_empty() && !n.contains(char::is_whitespace)));
    }
}
