//! The VMM's interrupt source, shaped like Cloud Hypervisor's
//! `VirtioInterrupt` (`virtio-devices/src/transport/mod.rs` at v53.0), so
//! CH's adapter implements it by delegation.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// What an interrupt is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptType {
    /// The device's configuration changed.
    Config,
    /// Queue `n` has used buffers.
    Queue(u16),
}

/// Delivers interrupts to the guest.
pub trait VirtioInterrupt: Send + Sync {
    /// Inject an interrupt (the slow path, used when no eventfd is given or
    /// a device vector serves several guest interrupts).
    fn trigger(&self, int_type: InterruptType) -> io::Result<()>;
    /// The eventfd whose signal injects the interrupt (an irqfd), if any.
    /// The device's interrupt is routed straight to it: no userspace hop.
    fn notifier(&self, int_type: InterruptType) -> Option<EventFd>;
}
