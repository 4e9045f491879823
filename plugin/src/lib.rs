//! # vdpa-plugin: the VMM side of the bridge
//!
//! What Cloud Hypervisor's device manager links: [`BridgeDevice`], what a
//! VMM holds for a claimed device, with the shape of Cloud Hypervisor
//! v53.0's `VirtioDevice` (`device_type`, `queue_max_sizes`, `features`,
//! `ack_features`, `read_config`, `write_config`, `activate`, `reset`) and
//! the rust-vmm types CH passes (`virtio_queue::Queue`,
//! `GuestMemoryAtomic`, `EventFd`); [`DmaHandle`] (guest memory mappings
//! for CH's `ExternalDmaMapping`); the interrupt trait CH's
//! `VirtioInterrupt` is adapted to; and [`VdpaDeviceConfig`], what
//! `--vdpa path=...` carries, which opens the right backend (VFIO for a PCI
//! function, vhost-vdpa for a node).
//!
//! ## Data path
//!
//! On activation every guest kick eventfd is handed to the backend, which
//! (with VFIO) makes the kernel write the doorbell itself; every device
//! MSI-X vector that serves exactly one guest interrupt is routed to the
//! guest's irqfd. No userspace thread sits on either path. A relay thread
//! exists only for what cannot be direct (see the `relay` module): kicks
//! with VIRTIO_F_NOTIFICATION_DATA, backends without in-kernel kicks,
//! shared vectors, interrupts with no eventfd.
//!
//! ## DMA
//!
//! Without a vIOMMU, guest RAM is mapped with IOVA = GPA (each region as
//! it appears); with one, or when the VMM maps guest memory itself (Cloud
//! Hypervisor's `ExternalDmaMapping`), the VMM maps and unmaps through
//! [`DmaHandle`]. The PCI functions of one VM not behind a vIOMMU share
//! one VFIO container ([`SharedContainer`], in
//! [`VdpaDeviceConfig::container`]), in which a mapping several devices
//! make is made (and pinned) once.
#![warn(missing_docs)]

mod activate;
pub mod config;
mod device;
mod dirty;
mod dma;
mod error;
mod interrupt;
mod net_ctrl;
mod relay;
mod release;
mod shadow;
mod slot;
mod state;
mod thread;

pub use activate::AddressTranslation;
pub use config::{
    open_container, open_container_from, DevicePath, SharedContainer, VdpaDeviceConfig,
};
pub use device::{
    BridgeDevice, DataPath, DeviceOptions, GuestNotifyMapping, KickPolicy, NoNotifyMapping,
    PauseReport, ShadowPolicy, Wiring, BRIDGE_FEATURES, TRANSPORT_ONLY_FEATURES,
};
pub use dirty::{DirtyRange, DIRTY_PAGE};
pub use dma::{DmaHandle, DmaStats};
pub use error::{Error, Result};
pub use interrupt::{InterruptType, ThreadHook, ThreadRole, VirtioInterrupt};
pub use net_ctrl::{ControlCommand, NetControlState};
pub use release::{ReleaseReport, RemovalWatch, DRAIN};
pub use shadow::{QueuePosition, PAUSE_DRAIN};
pub use state::{DeviceState, QueueState, STATE_VERSION};
/// Every backend behind one type (what [`VdpaDeviceConfig::open`] returns).
pub use vdpa_bridge::backend::AnyDevice;
