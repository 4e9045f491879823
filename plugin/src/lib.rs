//! # vdpa-plugin: the VMM side of the bridge
//!
//! [`BridgeDevice`] is what a VMM's device manager holds for a vDPA device
//! claimed by `vdpa-bridge`. Its methods mirror Cloud Hypervisor v53.0's
//! `VirtioDevice` (`device_type`, `queue_max_sizes`, `features`,
//! `ack_features`, `read_config`, `write_config`, `activate`, `reset`) and
//! take the rust-vmm types CH passes (`virtio_queue::Queue`,
//! `GuestMemoryAtomic`, `EventFd`), so CH's adapter is a thin delegation.
//!
//! ## Data path
//!
//! On activation every guest kick eventfd is handed to the backend, which
//! (with VFIO) makes the kernel write the doorbell itself; every device
//! MSI-X vector that serves exactly one guest interrupt is routed to the
//! guest's irqfd. No userspace thread sits on either path. A relay thread
//! exists only for what cannot be direct (see the `relay` module):
//! kicks with VIRTIO_F_NOTIFICATION_DATA, backends without in-kernel kicks,
//! shared vectors, interrupts with no eventfd.
//!
//! ## DMA
//!
//! Without a vIOMMU, guest RAM is mapped with IOVA = GPA (each region as
//! it appears); with one, the VMM maps and unmaps the guest's IOVAs through
//! [`DmaHandle`].
#![warn(missing_docs)]

pub mod config;
mod device;
mod dma;
mod error;
pub mod harness;
mod interrupt;
mod relay;

pub use config::{DevicePath, VdpaDeviceConfig};
pub use device::{BridgeDevice, DeviceOptions, KickPolicy, Wiring, TRANSPORT_ONLY_FEATURES};
pub use dma::DmaHandle;
pub use error::{Error, Result};
pub use interrupt::{InterruptType, VirtioInterrupt};
