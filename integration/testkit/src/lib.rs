//! # vdpa-testkit: what the bridge's tests, the lab and the CLI's
//! `selftest` drive devices with
//!
//! Test and demo code, kept out of the crates Cloud Hypervisor links:
//!
//! * [`emu`]: an in-process modern virtio-blk PCI device on a RAM disk,
//!   behind the same `PciFunction` seam VFIO uses, with knobs for
//!   misbehaving devices;
//! * [`driver`]: a driver-side harness (what a guest's virtio driver does:
//!   split rings in DMA-mapped memory, blk requests, net frames) over any
//!   `VdpaOps` backend;
//! * [`harness`]: a VMM-side harness around `vdpa_plugin::BridgeDevice`
//!   (guest memory, guest rings, kick eventfds, irqfd-like notifiers).
#![warn(missing_docs)]

pub mod driver;
pub mod emu;
pub mod harness;
