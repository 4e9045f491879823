//! # vdpa-bridge: a userspace vp_vdpa
//!
//! Linux's `vp_vdpa` driver turns a modern virtio-pci device into a vDPA
//! device. This crate does the same in userspace: it claims the PCI function
//! through VFIO ([`vfio`]), drives the virtio 1.x PCI transport itself
//! ([`virtio_pci`]) and exposes the control path through [`VdpaOps`], the
//! shape of the kernel's `vdpa_config_ops`. A kernel vDPA device opened
//! through `/dev/vhost-vdpa-N` ([`vhost_vdpa`]) sits behind the same trait.
//!
//! ## Data path
//!
//! The data path never passes through this crate once a device runs:
//!
//! * **Kicks**: the VMM's per-queue kick eventfd is handed to the backend
//!   ([`VdpaOps::set_vring_kick`]). With VFIO the kernel then writes the
//!   queue's doorbell itself (`VFIO_DEVICE_IOEVENTFD`), so a guest kick
//!   reaches the device without any userspace thread. Where that cannot
//!   serve (VIRTIO_F_NOTIFICATION_DATA), [`VdpaOps::doorbell`] gives a
//!   lock-free handle a relay thread can ring.
//! * **Interrupts**: each MSI-X vector of the device is bound to the eventfd
//!   given with [`VdpaOps::set_vring_call`] (`VFIO_DEVICE_SET_IRQS`); when
//!   that eventfd is the guest's irqfd, the interrupt reaches the guest with
//!   no extra hop. [`IrqPlan`] says which queues share a vector when the
//!   device has too few.
//! * **DMA**: the device reads and writes rings and buffers at IOVAs mapped
//!   with [`DmaMapper::dma_map`].
//!
//! ## Trust
//!
//! The device is untrusted: capability offsets, lengths, queue sizes,
//! vector counts and status values it reports are checked before use, and a
//! device that stops answering (all-ones reads) or never finishes a reset
//! yields an error, never a panic or a hang.
#![warn(missing_docs)]

pub mod backend;
pub mod device_path;
pub mod error;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod host;
pub mod ops;
pub mod pci;
pub mod sysfs;
pub mod types;
pub mod vfio;
pub mod vhost_vdpa;
pub mod virtio_pci;
pub mod vp_vdpa;

pub use device_path::DevicePath;
pub use error::{Error, Result};
pub use ops::{
    BackendCaps, ConfigRange, DmaMapper, Doorbell, DriverFeatures, IrqGroup, IrqPlan, NotifyArea,
    NotifyPages, OpsError, RingDoorbell, VdpaOps,
};
pub use pci::{PciError, PciFunction};
pub use types::{DeviceType, Iova, IovaRange, QueueIndex, VringAddrs};
pub use vfio::VfioError;
pub use vhost_vdpa::VhostVdpaError;
pub use virtio_pci::TransportError;
pub use vp_vdpa::VpVdpaError;
