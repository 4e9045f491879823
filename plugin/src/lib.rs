//! # vdpa-plugin: the VMM side of the bridge
//!
//! What Cloud Hypervisor's device manager links: [`BridgeDevice`] (the
//! device, with the shape of CH v53.0's `VirtioDevice`), [`DmaHandle`]
//! (guest memory mappings for CH's `ExternalDmaMapping`), the interrupt
//! trait CH's `VirtioInterrupt` is adapted to, and
//! [`VdpaDeviceConfig`], what `--vdpa path=...` carries, which opens the
//! right backend (VFIO for a PCI function, vhost-vdpa for a node).
//!
//! The device itself is implemented in `vdpa_bridge::vmm` (so the
//! `vdpa-bridge selftest` command runs devices through the same code) and
//! re-exported here; see its documentation for the data path and DMA.
#![warn(missing_docs)]

pub mod config;

pub use config::{DevicePath, VdpaDeviceConfig};
/// Every backend behind one type (what [`VdpaDeviceConfig::open`] returns).
pub use vdpa_bridge::backend::AnyDevice;
pub use vdpa_bridge::vmm::{
    harness, BridgeDevice, DeviceOptions, DmaHandle, Error, GuestNotifyMapping, InterruptType,
    KickPolicy, NoNotifyMapping, Result, VirtioInterrupt, Wiring, TRANSPORT_ONLY_FEATURES,
};
