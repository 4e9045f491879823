//! The `vdpa-bridge` command's library: what `info` reports ([`info`]),
//! what `list` shows and how `bind` rebinds ([`sysfs`], [`vhost`]), and
//! its logger ([`logging`]), what `selftest` does ([`selftest`]). The
//! binary (`src/main.rs`) adds the command line and the output.
//!
//! This package sits on top of the others: it opens devices with
//! `vdpa-bridge`, brings them up through `vdpa-plugin` exactly as a VMM
//! does, and falls back to the emulated device of `vdpa-testkit` when no
//! device is given.
#![warn(missing_docs)]

pub mod features;
pub mod info;
pub mod logging;
pub mod selftest;
pub mod sysfs;
pub mod vhost;
