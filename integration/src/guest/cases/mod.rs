//! The case registry. One file per suite, each with a `cases()` list;
//! [`cases`] concatenates them in run order.
//!
//! To add a suite: create `cases/<suite>.rs` with
//! `pub fn cases() -> Vec<Case>`, declare it below and append it in
//! [`cases`]. Case names must be unique (a unit test checks that).

use super::Case;

pub mod bridge;
pub mod plugin;
pub mod smoke;

/// Every registered case, in run order.
pub fn cases() -> Vec<Case> {
    let mut all = smoke::cases();
    all.extend(bridge::cases());
    all.extend(plugin::cases());
    all
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn case_names_are_unique_and_have_no_whitespace() {
        let all = super::cases();
        let names: HashSet<&str> = all.iter().map(|c| c.name.as_str()).collect();

        assert_eq!(names.len(), all.len());
        assert!(names
            .iter()
            .all(|n| !n.is_empty() && !n.contains(char::is_whitespace)));
    }
}
