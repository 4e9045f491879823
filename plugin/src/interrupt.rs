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

/// A thread the device starts (see [`ThreadHook`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// The relay thread: kicks and interrupts that cannot be direct. It
    /// waits on eventfds (epoll), reads and writes them, reads guest memory
    /// and writes doorbells (a store to the mapped BAR, or a `pwrite` to
    /// the VFIO device on the slow path).
    Relay,
    /// Waits for the host to ask for the device back
    /// ([`crate::RemovalWatch`]): epoll on two eventfds, reads one, then
    /// runs the VMM's callback.
    RemovalWatch,
    /// Answers a released device's queues (see
    /// [`crate::BridgeDevice::release`]): waits on the guest's kick
    /// eventfds (epoll), reads and writes guest memory, raises guest
    /// interrupts like the relay.
    Orphan,
}

/// Runs first in every thread the device starts, before it touches
/// anything: where a VMM confines the thread (Cloud Hypervisor applies a
/// seccomp filter of its own for it). An error stops the thread and fails
/// what started it.
pub type ThreadHook = std::sync::Arc<dyn Fn(ThreadRole) -> Result<(), String> + Send + Sync>;
