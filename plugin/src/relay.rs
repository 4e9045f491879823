//! The relay thread: the only userspace hop, used only where the direct
//! paths cannot serve.
//!
//! * **Kick relay**: a guest kick eventfd whose queue the backend cannot
//!   kick in-kernel (VIRTIO_F_NOTIFICATION_DATA negotiated, or a backend
//!   without [`BackendCaps::kick_eventfd`](vdpa_bridge::BackendCaps)) is
//!   watched here and each signal rings the queue's [`Doorbell`], with the
//!   avail index read from guest memory when notification data is on.
//! * **Interrupt fan-out**: a device vector that serves several guest
//!   interrupts (shared MSI-X vectors), or one whose guest interrupt has no
//!   eventfd, signals an eventfd of ours; each signal is forwarded to every
//!   guest interrupt of its group, through the guest's eventfd or
//!   [`VirtioInterrupt::trigger`].
//!
//! * **Net control queue**: a virtio-net control queue's kicks always come
//!   here, and the commands the guest published are recorded (see
//!   `net_ctrl`) before the device is rung.
//!
//! Everything the loop touches is built before the thread starts: the loop
//! itself does no allocation and takes no lock (guest memory is read
//! through `GuestMemoryAtomic`, an `ArcSwap` load), except on a net
//! control-queue kick (control path: it records the command).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vdpa_bridge::Doorbell;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

use crate::error::Result;
use crate::interrupt::{InterruptType, VirtioInterrupt};
use crate::interrupt::{ThreadHook, ThreadRole};
use crate::net_ctrl::{self, SharedControl};
use crate::thread::{wait_loop, Stopper};

/// One relayed kick.
pub(crate) struct KickRelay {
    /// The guest's kick eventfd (a duplicate).
    pub fd: EventFd,
    /// The queue's doorbell.
    pub doorbell: Doorbell,
    /// With notification data: the guest address of the avail ring's
    /// `idx` field, read on every kick.
    pub avail_idx_addr: Option<GuestAddress>,
    /// A net control queue: the guest's queue and where its commands are
    /// recorded.
    pub control: Option<(Queue, SharedControl)>,
}

/// Where one fanned-out interrupt goes.
pub(crate) struct IrqTarget {
    /// The guest's eventfd, if the VMM gave one.
    pub notifier: Option<EventFd>,
    /// What to `trigger` otherwise.
    pub kind: InterruptType,
}

/// One device vector whose signal is fanned out.
pub(crate) struct IrqRelay {
    /// The eventfd the backend signals for this vector.
    pub fd: EventFd,
    /// Guest interrupts to raise.
    pub targets: Vec<IrqTarget>,
}

/// What the relay serves.
pub(crate) struct RelayPlan<M: GuestMemory> {
    pub kicks: Vec<KickRelay>,
    pub irqs: Vec<IrqRelay>,
    pub mem: GuestMemoryAtomic<M>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl<M: GuestMemory> RelayPlan<M> {
    pub fn is_empty(&self) -> bool {
        self.kicks.is_empty() && self.irqs.is_empty()
    }
}

/// A running relay thread; stopped and joined on drop.
pub(crate) struct Relay {
    stop: Stopper,
}

impl Relay {
    /// Start a relay thread for `plan`.
    ///
    /// `hook` runs first in the new thread (a VMM confines the thread
    /// there); its error stops the thread and is returned here.
    pub fn start<M>(plan: RelayPlan<M>, name: String, hook: Option<ThreadHook>) -> Result<Relay>
    where
        M: GuestMemory + Send + Sync + 'static,
    {
        // Tokens: the kicks first, then the interrupt vectors.
        let fds: Vec<&EventFd> = plan
            .kicks
            .iter()
            .map(|k| &k.fd)
            .chain(plan.irqs.iter().map(|r| &r.fd))
            .collect();
        let (epoll, stop) = Stopper::epoll(&fds)?;
        let kicks = plan.kicks.len();
        let stop = stop.spawn(
            name,
            ThreadRole::Relay,
            hook,
            move |epoll, stopping| {
                wait_loop(&epoll, stopping, |i| {
                    if let Some(k) = plan.kicks.get(i) {
                        relay_kick(k, &plan.mem);
                    } else if let Some(r) = i.checked_sub(kicks).and_then(|j| plan.irqs.get(j)) {
                        relay_irq(r, plan.interrupt.as_ref());
                    }
                });
            },
            epoll,
        )?;
        Ok(Relay { stop })
    }

    /// Stop and join the thread. The stop flag ends it within a poll
    /// interval even when the wake-up write fails, so no thread is ever
    /// left behind ringing doorbells.
    pub fn stop(&mut self) {
        self.stop.stop();
    }
}

fn relay_kick<M: GuestMemory>(k: &KickRelay, mem: &GuestMemoryAtomic<M>) {
    // Consume the count; a spurious wakeup (EAGAIN) needs no kick.
    if k.fd.read().is_err() {
        return;
    }
    if let Some((q, watch)) = &k.control {
        net_ctrl::lock(watch).catch_up(q, &*mem.memory());
    }
    let next = match k.avail_idx_addr {
        Some(addr) => match mem.memory().load::<u16>(addr, Ordering::Acquire) {
            Ok(v) => u32::from(u16::from_le(v)),
            Err(e) => {
                log::warn!("relay: cannot read avail idx at {:#x}: {e}", addr.0);
                return;
            }
        },
        None => 0,
    };
    if let Err(e) = k.doorbell.ring(next) {
        log::warn!("relay: doorbell write failed: {e}");
    }
}

fn relay_irq(r: &IrqRelay, interrupt: &dyn VirtioInterrupt) {
    if r.fd.read().is_err() {
        return;
    }
    for t in &r.targets {
        let res = match &t.notifier {
            Some(fd) => fd.write(1),
            None => interrupt.trigger(t.kind),
        };
        if let Err(e) = res {
            log::warn!("relay: raising {:?} failed: {e}", t.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::time::{Duration, Instant};
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct NoInterrupt;

    impl VirtioInterrupt for NoInterrupt {
        fn trigger(&self, _: InterruptType) -> std::io::Result<()> {
            Ok(())
        }
        fn notifier(&self, _: InterruptType) -> Option<EventFd> {
            None
        }
    }

    fn relay() -> Relay {
        let irq = IrqRelay {
            fd: EventFd::new(EFD_NONBLOCK).unwrap(),
            targets: Vec::new(),
        };
        let plan = RelayPlan::<GuestMemoryMmap<()>> {
            kicks: Vec::new(),
            irqs: vec![irq],
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            interrupt: Arc::new(NoInterrupt),
        };
        Relay::start(plan, "relay-test".into(), None).unwrap()
    }

    fn plan() -> RelayPlan<GuestMemoryMmap<()>> {
        RelayPlan {
            kicks: Vec::new(),
            irqs: Vec::new(),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            interrupt: Arc::new(NoInterrupt),
        }
    }

    #[test]
    fn the_hook_runs_in_the_relay_thread_before_it_starts() {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let s2 = Arc::clone(&seen);
        let hook: ThreadHook = Arc::new(move |role| {
            *s2.lock().unwrap() = Some((role, std::thread::current().name().map(str::to_owned)));
            Ok(())
        });
        let mut r = Relay::start(plan(), "relay-hooked".into(), Some(hook)).unwrap();
        r.stop();
        assert_eq!(
            *seen.lock().unwrap(),
            Some((ThreadRole::Relay, Some("relay-hooked".to_owned())))
        );
    }

    #[test]
    fn a_failing_hook_fails_the_start_and_leaves_no_thread() {
        let hook: ThreadHook = Arc::new(|_| Err("no filter".into()));
        let e = Relay::start(plan(), "relay-refused".into(), Some(hook))
            .err()
            .unwrap();
        assert!(
            matches!(&e, Error::ThreadSetup { role: ThreadRole::Relay, reason } if reason == "no filter"),
            "{e}"
        );
    }

    #[test]
    fn the_relay_stops_without_its_wake_up() {
        let mut r = relay();
        let t = Instant::now();
        // As if writing the stop eventfd had failed.
        r.stop.request_stop(false);
        assert!(r.stop.is_stopped());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn the_relay_stops_at_once_when_woken() {
        let mut r = relay();
        let t = Instant::now();
        r.stop();
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }
}
