//! Activation, step by step, in the order vhost-vdpa and Cloud Hypervisor
//! use: check the queues the VMM hands over, negotiate features
//! (DRIVER, features, FEATURES_OK), program each queue (size, addresses,
//! base), wire interrupts, wire kicks, enable the queues, start the relay
//! (if anything needs it), DRIVER_OK and read the status back.
//!
//! Each step is a function of its own; [`crate::BridgeDevice::activate`]
//! runs them and resets the device if any fails, so a failed activation
//! leaves no thread, eventfd or wiring behind.

use std::sync::Arc;

use vdpa_bridge::types::{features, status};
use vdpa_bridge::{BackendCaps, QueueIndex, VdpaOps, VringAddrs};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{KickPolicy, Wiring, BRIDGE_FEATURES};
use crate::error::{backend_err, io, Error, Result};
use crate::interrupt::{InterruptType, VirtioInterrupt};
use crate::net_ctrl::SharedControl;
use crate::relay::{IrqRelay, IrqTarget, KickRelay};

/// What the VMM hands over for one queue: its index, the queue as the
/// guest set it up, and the guest's kick eventfd.
pub(crate) type QueueArg = (usize, Queue, EventFd);

/// Turns a guest-physical range (address, length) into the address the
/// device must be given for it: behind a vIOMMU, the guest's IOVA (Cloud
/// Hypervisor: `AccessPlatform::translate_gpa`). An error when the range
/// is not mapped whole.
pub type AddressTranslation = Arc<dyn Fn(u64, u64) -> std::io::Result<u64> + Send + Sync>;

/// Check every queue against the device's maximum sizes and the acked
/// ring layout; returns the queue indices, in the order given.
pub(crate) fn check_queues(queues: &[QueueArg], max_sizes: &[u16], acked: u64) -> Result<Vec<u16>> {
    let packed = acked & features::bit(features::RING_PACKED) != 0;
    let mut out = Vec::with_capacity(queues.len());
    for (index, q, _) in queues {
        let index = *index;
        let bad = |reason| Error::BadQueue { index, reason };
        let qi = u16::try_from(index).map_err(|_| bad("index out of range"))?;
        let max = *max_sizes
            .get(index)
            .ok_or(bad("the device has no such queue"))?;
        let size = q.size();
        if !q.ready() {
            return Err(bad("not ready"));
        }
        if size == 0 || size > max {
            return Err(bad("size is 0 or above the device's maximum"));
        }
        if !packed && !size.is_power_of_two() {
            return Err(bad("split ring size is not a power of two"));
        }
        if out.contains(&qi) {
            return Err(bad("given twice"));
        }
        out.push(qi);
    }
    Ok(out)
}

/// Check that every ring of every queue lies, whole and aligned, in guest
/// RAM: with IOVA = GPA the device is handed these addresses as they are,
/// and a ring the guest put over MMIO or a hole would have the device DMA
/// to whatever the IOMMU maps there (nothing, or another device's window).
///
/// Sizes and alignments are the virtio 1.x ones (split: descriptors 16-byte
/// aligned, available ring 2-byte with `used_event`, used ring 4-byte with
/// `avail_event`; packed: descriptors 16-byte, both event suppression
/// structures 4 bytes, 4-byte aligned). `virtio_queue::QueueT::is_valid`
/// checks only each ring's end address, and logs at error level for what a
/// guest controls, so it is not used here.
pub(crate) fn check_rings<M: GuestMemory>(queues: &[QueueArg], mem: &M, acked: u64) -> Result<()> {
    for (index, q, _) in queues {
        for (what, addr, len, align) in ring_spans(q, acked) {
            let addr = GuestAddress(addr);
            let reason = if !addr.0.is_multiple_of(align) {
                Some("is misaligned")
            } else if !usize::try_from(len).is_ok_and(|l| mem.check_range(addr, l)) {
                Some("is not inside guest RAM")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(Error::BadRing {
                    index: *index,
                    ring: what,
                    addr: addr.0,
                    reason,
                });
            }
        }
    }
    Ok(())
}

/// A queue's three rings: name, guest address, length and alignment, by
/// the acked ring layout (see [`check_rings`]).
fn ring_spans(q: &Queue, acked: u64) -> [(&'static str, u64, u64, u64); 3] {
    let n = u64::from(q.size());
    if acked & features::bit(features::RING_PACKED) != 0 {
        [
            ("descriptor ring", q.desc_table(), 16 * n, 16),
            ("driver event area", q.avail_ring(), 4, 4),
            ("device event area", q.used_ring(), 4, 4),
        ]
    } else {
        [
            ("descriptor table", q.desc_table(), 16 * n, 16),
            ("available ring", q.avail_ring(), 6 + 2 * n, 2),
            ("used ring", q.used_ring(), 6 + 8 * n, 4),
        ]
    }
}

/// Where the device must be told each ring of `q` is: the guest-physical
/// addresses the VMM holds, or what `translate` makes of them (the
/// guest's IOVAs behind a vIOMMU, which the device's DMA mappings are
/// keyed by). A ring the translation does not cover whole is refused.
pub(crate) fn device_addrs(
    index: usize,
    q: &Queue,
    acked: u64,
    translate: Option<&AddressTranslation>,
) -> Result<VringAddrs> {
    let [desc, driver, device] = ring_spans(q, acked).map(|(ring, addr, len, _)| match translate {
        None => Ok(addr),
        Some(t) => t(addr, len).map_err(|source| Error::Untranslated {
            index,
            ring,
            addr,
            source,
        }),
    });
    Ok(VringAddrs {
        desc: desc?,
        driver: driver?,
        device: device?,
    })
}

/// ACKNOWLEDGE | DRIVER, the acked features plus the bridge's own that
/// the device offers ([`BRIDGE_FEATURES`]), FEATURES_OK (read back by the
/// backend).
pub(crate) fn negotiate<B: VdpaOps>(b: &mut B, acked: u64) -> Result<()> {
    b.set_status(status::ACKNOWLEDGE | status::DRIVER)
        .map_err(backend_err("set_status(DRIVER)"))?;
    let own = if b.backend_caps().suspend {
        b.device_features() & BRIDGE_FEATURES
    } else {
        0
    };
    b.set_driver_features(acked | own)
        .map_err(backend_err("set_driver_features"))?;
    b.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)
        .map_err(backend_err("set_status(FEATURES_OK)"))
}

/// Size, ring addresses and base of every queue.
pub(crate) fn program_queues<B: VdpaOps>(
    b: &mut B,
    queues: &[QueueArg],
    qidx: &[u16],
    acked: u64,
    translate: Option<&AddressTranslation>,
) -> Result<()> {
    for ((index, q, _), &qi) in queues.iter().zip(qidx) {
        let addrs = device_addrs(*index, q, acked, translate)?;
        let qi = QueueIndex(qi);
        b.set_vring_num(qi, q.size())
            .map_err(backend_err("set_vring_num"))?;
        b.set_vring_addr(qi, addrs)
            .map_err(backend_err("set_vring_addr"))?;
        b.set_vring_base(qi, q.next_avail())
            .map_err(backend_err("set_vring_base"))?;
    }
    Ok(())
}

/// Interrupts: a device vector serving exactly one guest interrupt that has
/// an eventfd (an irqfd) is routed straight to it; any other vector gets an
/// eventfd of ours that the relay fans out to each guest interrupt of its
/// group.
pub(crate) fn wire_interrupts<B: VdpaOps>(
    b: &mut B,
    interrupt: &Arc<dyn VirtioInterrupt>,
    qidx: &[u16],
    wiring: &mut Wiring,
) -> Result<Vec<IrqRelay>> {
    let plan = b.irq_plan();
    if plan.groups.is_empty() {
        return Err(Error::Unsupported(
            "the device has no MSI-X vectors: interrupts cannot be delivered",
        ));
    }
    let mut relays = Vec::new();
    for g in &plan.groups {
        let mut sources: Vec<InterruptType> = Vec::new();
        if g.config {
            sources.push(InterruptType::Config);
        }
        let active_queues: Vec<QueueIndex> = g
            .queues
            .iter()
            .copied()
            .filter(|q| qidx.contains(&q.0))
            .collect();
        sources.extend(active_queues.iter().map(|q| InterruptType::Queue(q.0)));
        let single = match sources.as_slice() {
            [one] => interrupt.notifier(*one).map(|fd| (*one, fd)),
            _ => None,
        };
        if let Some((src, fd)) = single {
            match src {
                InterruptType::Config => b.set_config_call(Some(&fd)),
                InterruptType::Queue(q) => b.set_vring_call(QueueIndex(q), Some(&fd)),
            }
            .map_err(backend_err("set call eventfd"))?;
            wiring.direct_irqs.push(src);
            continue;
        }
        if sources.is_empty() {
            continue;
        }
        let fd = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        // The backend signals the group's first queue's eventfd; the
        // config source gets the same eventfd, or the device is never told
        // to raise config changes on the group's vector.
        if let Some(&q) = active_queues.first() {
            b.set_vring_call(q, Some(&fd))
                .map_err(backend_err("set call eventfd"))?;
        }
        if g.config {
            b.set_config_call(Some(&fd))
                .map_err(backend_err("set config eventfd"))?;
        }
        let targets = sources
            .iter()
            .map(|&kind| IrqTarget {
                notifier: interrupt.notifier(kind),
                kind,
            })
            .collect();
        wiring.relayed_irqs.extend(sources.iter().copied());
        relays.push(IrqRelay { fd, targets });
    }
    Ok(relays)
}

/// Why a queue's kicks go through the relay thread rather than in-kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RelayReason {
    /// `KickPolicy::Relay`.
    Policy,
    /// The backend has no in-kernel kick (`BackendCaps::kick_eventfd`).
    Backend,
    /// VIRTIO_F_NOTIFICATION_DATA: each kick carries the avail index,
    /// which an in-kernel eventfd write cannot.
    NotificationData,
}

/// The one decision, before asking the backend, of how guest kicks reach
/// the device: `None` is in-kernel (the backend takes the kick eventfd).
/// A queue whose in-kernel kick the backend then refuses is relayed too,
/// under `KickPolicy::Auto` (see [`wire_kicks`]).
pub(crate) fn relay_reason(
    policy: KickPolicy,
    caps: BackendCaps,
    acked: u64,
) -> Option<RelayReason> {
    if policy == KickPolicy::Relay {
        Some(RelayReason::Policy)
    } else if !caps.kick_eventfd {
        Some(RelayReason::Backend)
    } else if acked & features::bit(features::NOTIFICATION_DATA) != 0 {
        Some(RelayReason::NotificationData)
    } else {
        None
    }
}

/// Kicks: each queue's eventfd is handed to the backend, or watched by the
/// relay, which rings the queue's doorbell (with the avail index read
/// from guest memory when notification data is on).
pub(crate) fn wire_kicks<B: VdpaOps>(
    b: &mut B,
    queues: &[QueueArg],
    qidx: &[u16],
    policy: KickPolicy,
    acked: u64,
    control: Option<&(u16, SharedControl)>,
    wiring: &mut Wiring,
) -> Result<Vec<KickRelay>> {
    let reason = relay_reason(policy, b.backend_caps(), acked);
    let notif_data = reason == Some(RelayReason::NotificationData);
    let mut relays = Vec::new();
    for ((_, q, kick), &qi) in queues.iter().zip(qidx) {
        // A net control queue's commands are recorded on their way: its
        // kicks always go through the relay.
        let watch = control.filter(|(c, _)| *c == qi).map(|(_, w)| w.clone());
        if watch.is_some() {
            b.set_vring_kick(QueueIndex(qi), None)
                .map_err(backend_err("detach kick eventfd"))?;
        }
        if reason.is_none() && watch.is_none() {
            match b.set_vring_kick(QueueIndex(qi), Some(kick)) {
                Ok(()) => {
                    wiring.direct_kicks.push(qi);
                    continue;
                }
                // The in-kernel path can refuse one queue (VFIO's ioeventfd
                // limit, an unsupported doorbell width): that queue's kicks
                // go through the relay instead.
                Err(e) => {
                    log::warn!("queue {qi}: in-kernel kick refused ({e}); relaying its kicks")
                }
            }
        }
        let avail_idx_addr = if notif_data {
            // The split ring's avail idx, after its flags.
            let a = q.avail_ring().checked_add(2).ok_or(Error::BadQueue {
                index: usize::from(qi),
                reason: "avail ring address overflows",
            })?;
            Some(GuestAddress(a))
        } else {
            None
        };
        let doorbell = match b.doorbell(QueueIndex(qi)) {
            Ok(d) => d,
            // No doorbell to write (vhost-vdpa): the relay kicks through an
            // eventfd of its own.
            Err(_) if watch.is_some() && b.backend_caps().kick_eventfd => {
                let fd = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
                b.set_vring_kick(QueueIndex(qi), Some(&fd))
                    .map_err(backend_err("set kick eventfd"))?;
                vdpa_bridge::Doorbell::new(Arc::new(crate::shadow::EventFdKick(fd)))
            }
            Err(e) => return Err(backend_err("doorbell")(e)),
        };
        relays.push(KickRelay {
            fd: kick.try_clone().map_err(io("dup kick eventfd"))?,
            doorbell,
            avail_idx_addr,
            control: match watch {
                Some(w) => Some((crate::shadow::copy_queue(q)?, w)),
                None => None,
            },
        });
        wiring.relayed_kicks.push(qi);
    }
    Ok(relays)
}

/// Detach what earlier activations left: a reset keeps in-kernel kicks and
/// (vhost-vdpa) call eventfds, because it runs on a VMM's vCPU thread that
/// may not issue those ioctls; activation runs on the VMM thread, which
/// may. Every queue of the device whose kick is not in-kernel now loses
/// its kick eventfd, every queue not activated its call eventfd.
pub(crate) fn detach_unused<B: VdpaOps>(b: &mut B, qidx: &[u16], wiring: &Wiring) -> Result<()> {
    for q in 0..b.num_queues() {
        if !wiring.direct_kicks.contains(&q) {
            b.set_vring_kick(QueueIndex(q), None)
                .map_err(backend_err("detach kick eventfd"))?;
        }
        if !qidx.contains(&q) {
            b.set_vring_call(QueueIndex(q), None)
                .map_err(backend_err("detach call eventfd"))?;
        }
    }
    Ok(())
}

/// Enable every queue.
pub(crate) fn enable_queues<B: VdpaOps>(b: &mut B, qidx: &[u16]) -> Result<()> {
    for &qi in qidx {
        b.set_vring_enable(QueueIndex(qi), true)
            .map_err(backend_err("set_vring_enable"))?;
    }
    Ok(())
}

/// DRIVER_OK, then the status read back: a device that failed to start
/// says so there (FAILED, DEVICE_NEEDS_RESET, or DRIVER_OK not kept).
pub(crate) fn driver_ok<B: VdpaOps>(b: &mut B) -> Result<()> {
    b.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK)
        .map_err(backend_err("set_status(DRIVER_OK)"))?;
    let st = b.status().map_err(backend_err("status"))?;
    if st & (status::FAILED | status::DEVICE_NEEDS_RESET) != 0 || st & status::DRIVER_OK == 0 {
        return Err(Error::DriverOkRefused { status: st });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(kick_eventfd: bool) -> BackendCaps {
        BackendCaps {
            kick_eventfd,
            ..BackendCaps::default()
        }
    }

    #[test]
    fn kicks_are_in_kernel_unless_policy_backend_or_notification_data_say_relay() {
        let nd = features::bit(features::NOTIFICATION_DATA);
        assert_eq!(relay_reason(KickPolicy::Auto, caps(true), 0), None);
        assert_eq!(
            relay_reason(KickPolicy::Relay, caps(true), 0),
            Some(RelayReason::Policy)
        );
        assert_eq!(
            relay_reason(KickPolicy::Auto, caps(false), nd),
            Some(RelayReason::Backend)
        );
        assert_eq!(
            relay_reason(KickPolicy::Auto, caps(true), nd),
            Some(RelayReason::NotificationData)
        );
    }

    fn queue(size: u16, ready: bool) -> QueueArg {
        let mut q = Queue::new(256).unwrap();
        q.set_size(size);
        q.set_ready(ready);
        (0, q, EventFd::new(EFD_NONBLOCK).unwrap())
    }

    fn at(index: usize, (_, q, e): QueueArg) -> QueueArg {
        (index, q, e)
    }

    #[test]
    fn queues_are_checked_against_the_device_and_the_ring_layout() {
        let max = [256, 64];
        let ok = [at(1, queue(64, true)), at(0, queue(128, true))];
        assert_eq!(check_queues(&ok, &max, 0).unwrap(), vec![1, 0]);

        let reason = |qs: &[QueueArg], acked| match check_queues(qs, &max, acked) {
            Err(Error::BadQueue { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(&[at(2, queue(64, true))], 0),
            "the device has no such queue"
        );
        assert_eq!(
            reason(&[at(1, queue(128, true))], 0),
            "size is 0 or above the device's maximum"
        );
        assert_eq!(reason(&[queue(64, false)], 0), "not ready");
        assert_eq!(
            reason(&[queue(64, true), queue(64, true)], 0),
            "given twice"
        );
        // virtio-queue's Queue itself refuses sizes that are 0 or not a
        // power of two (set_size keeps the old size), so those checks here
        // guard against a VMM passing some other queue type's values.
    }
}
