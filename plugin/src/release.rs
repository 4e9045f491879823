//! Giving a device back to the host.
//!
//! An ordered removal (`echo 1 > /sys/bus/pci/devices/.../remove`, a
//! hot-unplug of the host's slot, unbinding vfio-pci) waits until the
//! device's user closes it; vfio-pci signals its request interrupt, which
//! the backend exposes as [`VdpaOps::removal_request`]. [`RemovalWatch`]
//! waits for that signal; the VMM then calls
//! [`BridgeDevice::release`](crate::BridgeDevice::release), which stops
//! the device and drops the backend while the VMM keeps the device object
//! until the guest ejects it.
//!
//! The guest knows nothing yet when the device goes, and a guest driver
//! may wait for every request it submitted before it lets the device be
//! ejected (Linux's virtio-blk does, in `del_gendisk`). So the release
//! first lets the device finish what it was given (kicks are no longer
//! forwarded; bounded by [`DRAIN`]), and afterwards an [`Orphan`] thread
//! answers the guest's new requests with an error where the device type
//! defines one: virtio-blk requests and virtio-net control commands get
//! status 1 (VIRTIO_BLK_S_IOERR, VIRTIO_NET_ERR), virtio-net transmit
//! buffers are returned unsent. Receive buffers and other device types'
//! requests stay pending: their drivers free them at removal without
//! waiting. A queue the device did not finish in time is left alone:
//! completing the wrong request twice would corrupt the guest's driver,
//! while a lost request only makes it wait. Behind a vIOMMU nothing is
//! answered: the descriptors hold the guest's IOVAs, which `virtio_queue`
//! would read as guest-physical.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemory, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::interrupt::{InterruptType, ThreadHook, ThreadRole, VirtioInterrupt};
use crate::thread::{wait_loop, Stopper};

/// How long a release waits for the device to finish the requests it was
/// given. vfio-pci's removal waits for the device without a deadline,
/// but a host operator expects seconds, not more.
pub const DRAIN: Duration = Duration::from_millis(1000);

/// How often the drain looks at the rings.
const DRAIN_POLL: Duration = Duration::from_millis(2);

/// What a release did (for logs and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Queues whose new requests the bridge answers from now on.
    pub answered: Vec<u16>,
    /// Queues the device had not finished when it was stopped, with the
    /// number of requests left unanswered.
    pub unfinished: Vec<(u16, u16)>,
    /// How long the device took to finish what it was given.
    pub drained_in: Duration,
}

/// How the bridge answers a queue's requests once the device is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Status byte 1 in the last device-writable byte of the request
    /// (virtio-blk's VIRTIO_BLK_S_IOERR, virtio-net's VIRTIO_NET_ERR).
    StatusError,
    /// Returned with nothing written (a transmit buffer, not sent).
    Unused,
}

const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_NET_F_CTRL_VQ: u32 = 17;

/// How queue `q` of `nq` activated queues of a device of type
/// `device_type` is answered, or `None` when it is left pending.
pub(crate) fn answer_for(device_type: u32, q: u16, nq: usize, acked: u64) -> Option<Answer> {
    match device_type {
        VIRTIO_ID_BLOCK => Some(Answer::StatusError),
        VIRTIO_ID_NET => {
            let ctrl =
                acked & (1 << VIRTIO_NET_F_CTRL_VQ) != 0 && nq % 2 == 1 && usize::from(q) + 1 == nq;
            if ctrl {
                Some(Answer::StatusError)
            } else if q % 2 == 1 {
                Some(Answer::Unused)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// One guest queue answered after the release.
pub(crate) struct OrphanQueue {
    pub index: u16,
    pub queue: Queue,
    pub kick: EventFd,
    pub answer: Answer,
}

/// Wait, at most [`DRAIN`], until the device has used everything the guest
/// made available on each of `queues` (its kicks are no longer forwarded,
/// so it gets nothing new). Returns the queues still unfinished with how
/// many requests they hold, and the time waited.
pub(crate) fn drain<M: GuestMemory>(
    queues: &[(u16, &Queue)],
    mem: &GuestMemoryAtomic<M>,
) -> (Vec<(u16, u16)>, Duration) {
    let start = Instant::now();
    loop {
        let m = mem.memory();
        let pending: Vec<(u16, u16)> = queues
            .iter()
            .filter_map(|&(i, q)| {
                let avail = q.avail_idx(&*m, Ordering::Acquire).ok()?;
                let used = q.used_idx(&*m, Ordering::Acquire).ok()?;
                let n = (avail - used).0;
                (n != 0).then_some((i, n))
            })
            .collect();
        if pending.is_empty() || start.elapsed() >= DRAIN {
            return (pending, start.elapsed());
        }
        std::thread::sleep(DRAIN_POLL);
    }
}

/// Set `queue` to continue after the last request the device used, so
/// the next available request is the first the device never saw.
pub(crate) fn continue_after_device<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    event_idx: bool,
) -> Result<()> {
    let used = queue
        .used_idx(mem, Ordering::Acquire)
        .map_err(|e| Error::Orphan(format!("used index unreadable: {e}")))?;
    queue.set_next_avail(used.0);
    queue.set_next_used(used.0);
    queue.set_event_idx(event_idx);
    Ok(())
}

/// Answer every request available on `q`; returns whether the guest wants
/// an interrupt.
pub(crate) fn answer_queue<M: GuestMemory>(q: &mut OrphanQueue, mem: &M) -> bool {
    let mut answered = false;
    while let Some(chain) = q.queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = match q.answer {
            Answer::Unused => 0,
            Answer::StatusError => match chain.writable().last() {
                Some(d) if d.len() > 0 => {
                    let at = d.addr().checked_add(u64::from(d.len()) - 1);
                    match at.map(|at| mem.write_obj(1u8, at)) {
                        Some(Ok(())) => 1,
                        _ => 0,
                    }
                }
                _ => 0,
            },
        };
        if let Err(e) = q.queue.add_used(mem, head, len) {
            log::warn!("queue {}: cannot return request {head}: {e}", q.index);
            break;
        }
        answered = true;
    }
    answered
        && q.queue.needs_notification(mem).unwrap_or_else(|e| {
            log::warn!("queue {}: notification check failed: {e}", q.index);
            true
        })
}

/// A thread that answers a released device's queues (see the module
/// documentation); stopped and joined on drop.
pub(crate) struct Orphan {
    stop: Stopper,
}

impl Orphan {
    pub fn start<M>(
        mut queues: Vec<OrphanQueue>,
        mem: GuestMemoryAtomic<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        name: String,
        hook: Option<ThreadHook>,
    ) -> Result<Orphan>
    where
        M: GuestMemory + Send + Sync + 'static,
    {
        let fds: Vec<&EventFd> = queues.iter().map(|q| &q.kick).collect();
        let (epoll, stop) = Stopper::epoll(&fds)?;
        let stop = stop.spawn(
            name,
            ThreadRole::Orphan,
            hook,
            move |epoll, stopping| {
                // Requests made available between the release and now.
                for q in queues.iter_mut() {
                    serve(q, &mem, interrupt.as_ref());
                }
                wait_loop(&epoll, stopping, |i| {
                    if let Some(q) = queues.get_mut(i) {
                        let _ = q.kick.read();
                        serve(q, &mem, interrupt.as_ref());
                    }
                });
            },
            epoll,
        )?;
        Ok(Orphan { stop })
    }

    /// Stop and join the thread.
    pub fn stop(&mut self) {
        self.stop.stop();
    }
}

fn serve<M: GuestMemory>(
    q: &mut OrphanQueue,
    mem: &GuestMemoryAtomic<M>,
    interrupt: &dyn VirtioInterrupt,
) {
    if answer_queue(q, &*mem.memory()) {
        if let Err(e) = interrupt.trigger(InterruptType::Queue(q.index)) {
            log::warn!("queue {}: interrupt failed: {e}", q.index);
        }
    }
}

/// Waits for the host's removal request and then calls back, once.
pub struct RemovalWatch {
    stop: Stopper,
}

impl RemovalWatch {
    /// Watch `request` (a device's [`removal_request`], duplicated) in a
    /// thread named `name`; `on_request` runs in that thread each time the
    /// host asks for the device back (vfio-pci asks again every ten
    /// seconds until the device is closed, so a release that could not be
    /// done is tried again). `hook` runs first in the thread, where a
    /// VMM confines it (role [`ThreadRole::RemovalWatch`]: it waits on two
    /// eventfds with epoll, reads one, and runs `on_request`).
    ///
    /// [`removal_request`]: crate::BridgeDevice::removal_request
    ///
    /// # Errors
    ///
    /// Creating the epoll set or the thread failed, or `hook` refused.
    pub fn start(
        request: EventFd,
        name: String,
        hook: Option<ThreadHook>,
        mut on_request: Box<dyn FnMut() + Send>,
    ) -> Result<RemovalWatch> {
        let (epoll, stop) = Stopper::epoll(&[&request])?;
        let stop = stop.spawn(
            name,
            ThreadRole::RemovalWatch,
            hook,
            move |epoll, stopping| {
                wait_loop(&epoll, stopping, |_| {
                    if request.read().is_ok() {
                        on_request();
                    }
                });
            },
            epoll,
        )?;
        Ok(RemovalWatch { stop })
    }

    /// Stop and join the thread.
    pub fn stop(&mut self) {
        self.stop.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_queues_fail_net_transmit_returns_and_receive_waits() {
        let ctrl = 1u64 << VIRTIO_NET_F_CTRL_VQ;
        for q in 0..4 {
            assert_eq!(
                answer_for(VIRTIO_ID_BLOCK, q, 4, 0),
                Some(Answer::StatusError)
            );
        }
        // Two queue pairs and a control queue.
        let net: Vec<_> = (0..5)
            .map(|q| answer_for(VIRTIO_ID_NET, q, 5, ctrl))
            .collect();
        assert_eq!(
            net,
            [
                None,
                Some(Answer::Unused),
                None,
                Some(Answer::Unused),
                Some(Answer::StatusError)
            ]
        );
        // Without CTRL_VQ an odd last queue is not a control queue.
        assert_eq!(answer_for(VIRTIO_ID_NET, 2, 3, 0), None);
        // Other device types are left pending (rng = 4, console = 3).
        assert_eq!(answer_for(4, 0, 1, 0), None);
        assert_eq!(answer_for(3, 1, 2, 0), None);
    }
}
