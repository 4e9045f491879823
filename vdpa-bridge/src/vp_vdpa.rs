//! [`VpVdpa`]: the userspace equivalent of Linux's `drivers/vdpa/virtio_pci`.
//!
//! It implements [`VdpaOps`] and [`DmaMapper`] on top of the modern
//! virtio-pci transport, for any [`PciFunction`]: a VFIO-claimed device in
//! production, the emulated device in unit tests.
//!
//! Differences from the kernel's vp_vdpa, on purpose:
//! * a device with fewer MSI-X vectors than queues + 1 still works; vectors
//!   are shared the way Linux's virtio_pci shares them ([`IrqPlan`]);
//! * kick eventfds are handed to the function (`VFIO_DEVICE_IOEVENTFD`), so
//!   the kernel rings the doorbell without a userspace thread;
//! * the device's features can be masked at open ("provisioning"), like
//!   `vdpa dev add ... device_features`.

use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::ops::{
    provision, BackendCaps, ConfigRange, DmaMapper, Doorbell, DriverFeatures, IrqPlan, NotifyArea,
    NotifyPages, OpsError, RingDoorbell, VdpaOps,
};
use crate::pci::{IoWidth, PciError, PciFunction, PciFunctionExt};
use crate::types::{features, status, Iova, IovaRange, QueueIndex, VringAddrs};
use crate::virtio_pci::bar::BarWindow;
use crate::virtio_pci::regs::NO_VECTOR;
use crate::virtio_pci::{has_version_1, ModernTransport, TransportError};

/// Errors of [`VpVdpa`]: the refusals every backend shares, and what the
/// transport and the PCI function report.
#[derive(Debug, thiserror::Error)]
pub enum VpVdpaError {
    /// A refusal every backend makes (bad queue, features, range...).
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// The virtio-pci transport rejected the device or an operation.
    #[error("virtio-pci transport error")]
    Transport(#[from] TransportError),
    /// Access to the PCI function failed.
    #[error("PCI function access failed")]
    Pci(#[from] PciError),
    /// The device did not finish a reset, not even after the escalation:
    /// its bus mastering is off (it can no longer DMA), and it stays
    /// unusable until a later reset finds its status at 0.
    #[error(
        "device did not finish reset within {waited:?}; bus mastering is off, {function_reset}"
    )]
    ResetFailed {
        /// How long the virtio reset was waited for.
        waited: Duration,
        /// What the function-level reset did.
        function_reset: FunctionReset,
    },
}

/// The function-level reset of a failed reset's escalation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FunctionReset {
    /// Tried, and the device still did not read status 0.
    DidNotHelp,
    /// The function has none.
    Unavailable,
    /// Not tried here: a reset may run on a thread that must not block or
    /// issue it; it is tried when the device is next started.
    Deferred,
}

impl std::fmt::Display for FunctionReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FunctionReset::DidNotHelp => "a function-level reset did not help",
            FunctionReset::Unavailable => "no function-level reset is available",
            FunctionReset::Deferred => "a function-level reset is tried when it next starts",
        })
    }
}

/// How long the status may take to read 0 after a function-level reset
/// (the kernel has already waited for the function to come back).
const AFTER_FLR: Duration = Duration::from_millis(100);

/// Reset `t`, escalating when the device does not finish in time: bus
/// mastering off first (no more DMA into guest memory, whatever else
/// happens), then a function-level reset where the function has one. The
/// device is back only if that brings its status to 0; bus mastering is
/// then on again. `timeout` bounds the virtio reset's wait; `flr: false`
/// stops after bus mastering (the function-level reset is deferred).
fn reset_escalating<P: PciFunction + ?Sized>(
    t: &ModernTransport<P>,
    timeout: Duration,
    flr: bool,
) -> Result<()> {
    match t.reset_within(timeout) {
        Err(TransportError::ResetTimeout(waited)) if !flr => {
            if let Err(e) = t.disable_bus_master() {
                log::error!(
                    "{}: clearing bus mastering failed: {e}",
                    t.function().describe()
                );
            }
            Err(VpVdpaError::ResetFailed {
                waited,
                function_reset: FunctionReset::Deferred,
            })
        }
        Err(TransportError::ResetTimeout(waited)) => {
            let who = t.function().describe();
            log::warn!("{who}: no reset within {waited:?}; bus mastering off, trying a function-level reset");
            if let Err(e) = t.disable_bus_master() {
                log::error!("{who}: clearing bus mastering failed: {e}");
            }
            let flr = match t.function().function_reset() {
                Ok(done) => done,
                Err(e) => {
                    log::error!("{who}: function-level reset failed: {e}");
                    false
                }
            };
            if flr && t.reset_within(AFTER_FLR).is_ok() {
                t.enable_bus_master()?;
                log::warn!("{who}: recovered by a function-level reset");
                return Ok(());
            }
            // The function reset may have turned bus mastering back on.
            if let Err(e) = t.disable_bus_master() {
                log::error!("{who}: clearing bus mastering failed: {e}");
            }
            Err(VpVdpaError::ResetFailed {
                waited,
                function_reset: if flr {
                    FunctionReset::DidNotHelp
                } else {
                    FunctionReset::Unavailable
                },
            })
        }
        r => Ok(r?),
    }
}

/// Result of [`VpVdpa`] operations.
pub type Result<T> = std::result::Result<T, VpVdpaError>;

/// How to open a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// Features the device may offer (`None`: all). VERSION_1 and, where the
    /// device offers it, ACCESS_PLATFORM cannot be masked off.
    pub features_mask: Option<u64>,
    /// Upper bound on a reset's duration.
    pub reset_timeout: Duration,
    /// The host's page size (the unit of mappings a VMM can hand a guest);
    /// [`crate::host::page_size`] unless a test injects another.
    pub page_size: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            features_mask: None,
            reset_timeout: crate::virtio_pci::DEFAULT_RESET_TIMEOUT,
            page_size: crate::host::page_size(),
        }
    }
}

#[derive(Default)]
struct QueueState {
    max_size: u16,
    size: u16,
    enabled: bool,
    call: Option<EventFd>,
    /// Doorbell offset (in the BAR) registered for this queue's kick fd.
    kick: Option<(EventFd, u64)>,
}

/// A modern virtio-pci device driven as a vDPA device.
pub struct VpVdpa<P: PciFunction + ?Sized> {
    transport: ModernTransport<P>,
    raw_features: u64,
    offered: u64,
    driver_features: u64,
    queues: Vec<QueueState>,
    config_call: Option<EventFd>,
    plan: IrqPlan,
    msix_enabled: bool,
    status: u8,
    /// Doorbell offset of each queue in the notify window (`None`: the
    /// device put it outside the notify region).
    notify: Vec<Option<u64>>,
    /// Whether each queue's doorbell page holds nothing else.
    page_exclusive: Vec<bool>,
    /// All doorbells as one mappable range of pages, where possible.
    pages: Option<NotifyPages>,
    /// The last reset failed even after escalation (bus mastering off).
    reset_failed: bool,
}

impl<P: PciFunction + ?Sized> std::fmt::Debug for VpVdpa<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VpVdpa")
            .field("transport", &self.transport)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl<P: PciFunction + ?Sized> VpVdpa<P> {
    /// Probe and claim `func`: parse capabilities, enable bus mastering,
    /// reset the device (bounded), read features and queue sizes.
    ///
    /// # Errors
    ///
    /// Legacy-only devices, devices without VERSION_1, malformed
    /// capabilities, a device that never finishes reset or reads all-ones,
    /// and masks that remove a required feature.
    pub fn open(func: Arc<P>, opts: OpenOptions) -> Result<Self> {
        let mut transport = ModernTransport::new(func)?;
        transport.set_reset_timeout(opts.reset_timeout);
        transport.enable_bus_master()?;
        reset_escalating(&transport, opts.reset_timeout, true)?;
        let raw = transport.device_features()?;
        let offered = provision(raw, opts.features_mask)?;
        // Probe with every offered feature: some devices instantiate queues
        // only for negotiated features (QEMU's virtio-net adds its
        // multiqueue pairs when VIRTIO_NET_F_MQ is set), and consumers need
        // the full count up front. A device refusing the probe is read as
        // it is. The reset below undoes the probe.
        let base = status::ACKNOWLEDGE | status::DRIVER;
        transport.set_status(base)?;
        transport.set_driver_features(offered)?;
        if let Err(e) = transport.features_ok(base, offered) {
            log::debug!("feature probe refused: {e}");
        }
        let n = transport.refresh_num_queues()?;
        let mut queues = Vec::with_capacity(usize::from(n));
        for q in 0..n {
            let max_size = transport.queue_max_size(QueueIndex(q))?;
            queues.push(QueueState {
                max_size,
                ..Default::default()
            });
        }
        let mut notify = Vec::with_capacity(usize::from(n));
        for q in 0..n {
            match transport.queue_notify(QueueIndex(q), 2) {
                Ok(qn) => notify.push(Some(qn.window_offset)),
                Err(TransportError::NotifyOutOfRange { .. }) => {
                    log::warn!("queue {q}: doorbell outside the notify region; queue unusable");
                    notify.push(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
        let page_size = opts.page_size;
        if !page_size.is_power_of_two() {
            return Err(OpsError::Unsupported("a page size that is not a power of two").into());
        }
        let page_exclusive = page_exclusivity(&transport, &notify, page_size);
        let pages = doorbell_pages(&transport, &notify, page_size);
        reset_escalating(&transport, opts.reset_timeout, true)?;
        let plan = IrqPlan::for_vectors(n, transport.function().msix_vectors());
        Ok(VpVdpa {
            notify,
            page_exclusive,
            pages,
            transport,
            raw_features: raw,
            offered,
            driver_features: 0,
            queues,
            config_call: None,
            plan,
            msix_enabled: false,
            status: 0,
            reset_failed: false,
        })
    }

    /// The transport (for facts such as capabilities and identity).
    pub fn transport(&self) -> &ModernTransport<P> {
        &self.transport
    }

    /// Number of MSI-X vectors of the function.
    pub fn msix_vectors(&self) -> u32 {
        self.transport.function().msix_vectors()
    }

    fn queue(&mut self, q: QueueIndex) -> Result<&mut QueueState> {
        self.queues
            .get_mut(usize::from(q.0))
            .ok_or(OpsError::InvalidQueue(q).into())
    }

    fn negotiated(&self, bit: u32) -> bool {
        self.driver_features & features::bit(bit) != 0
    }

    fn notify_width(&self) -> u64 {
        if self.negotiated(features::NOTIFICATION_DATA) {
            4
        } else {
            2
        }
    }

    /// Reset: stop the device first so nothing fires while we unwire. A
    /// device that does not finish in time loses bus mastering
    /// ([`reset_escalating`] without its function-level reset: a reset runs
    /// where the guest asks for it, on a VMM's vCPU thread, which may
    /// neither block for long nor issue `VFIO_DEVICE_RESET` under Cloud
    /// Hypervisor's seccomp filter); the function-level reset is tried at
    /// the next start ([`VpVdpa::recover`], from `set_status`). A device
    /// that already failed is asked once more without waiting: a VMM resets
    /// on guest reset, on unplug and at shutdown, and each would otherwise
    /// wait again.
    fn reset_device(&mut self) -> Result<()> {
        let timeout = if self.reset_failed {
            Duration::ZERO
        } else {
            self.transport.reset_timeout()
        };
        let r = reset_escalating(&self.transport, timeout, false);
        self.reset_failed = r.is_err();
        self.teardown();
        self.status = 0;
        r
    }

    /// A device whose last reset failed, before it starts again: a virtio
    /// reset, else a function-level reset ([`reset_escalating`]). Runs
    /// where a VMM starts the device (its VMM thread, which may issue
    /// `VFIO_DEVICE_RESET`).
    fn recover(&mut self) -> Result<()> {
        reset_escalating(&self.transport, Duration::ZERO, true)?;
        log::info!(
            "{}: usable again after a failed reset",
            self.transport.function().describe()
        );
        self.reset_failed = false;
        self.status = 0;
        Ok(())
    }

    /// Undo interrupt wiring and forget the queues' setup; keeps DMA
    /// mappings (like vhost-vdpa, whose IOTLB survives a reset) and the
    /// in-kernel kicks: a reset runs where the guest asks for it (a VMM's
    /// vCPU thread, whose seccomp filter in Cloud Hypervisor does not
    /// allow `VFIO_DEVICE_IOEVENTFD`), and a kick reaching a reset device
    /// is ignored by it. The next activation replaces or removes them
    /// (`set_vring_kick`), closing the function releases them.
    fn teardown(&mut self) {
        if self.msix_enabled {
            if let Err(e) = self.transport.function().disable_msix() {
                log::warn!("disabling MSI-X failed: {e}");
            }
            self.msix_enabled = false;
        }
        for i in 0..self.queues.len() {
            self.queues[i].call = None;
            self.queues[i].size = 0;
            self.queues[i].enabled = false;
        }
        self.config_call = None;
        self.driver_features = 0;
    }

    /// Remove queue `q`'s kick registration (made by `set_vring_kick`,
    /// always 16 bits wide: in-kernel kicks carry no notification data).
    fn unregister_kick(&self, q: u16, bar_offset: u64) {
        let bar = self.transport.notify_region().bar;
        if let Err(e) = self.transport.function().set_ioeventfd(
            bar,
            bar_offset,
            IoWidth::U16,
            u64::from(q),
            None,
        ) {
            log::warn!("removing kick eventfd of queue {q} failed: {e}");
        }
    }

    /// Route MSI-X vectors to the call eventfds and tell the device which
    /// vector serves what (done at DRIVER_OK, like vp_vdpa_request_irq).
    fn wire_interrupts(&mut self) -> Result<()> {
        let nvec = self.msix_vectors();
        if nvec == 0 || self.plan.groups.is_empty() {
            log::info!("device has no MSI-X: interrupts are not delivered");
            return Ok(());
        }
        let mut routing: Vec<Option<EventFd>> = Vec::new();
        for g in &self.plan.groups {
            let fd = g
                .queues
                .iter()
                .find_map(|q| self.queues[usize::from(q.0)].call.as_ref())
                .or(if g.config {
                    self.config_call.as_ref()
                } else {
                    None
                })
                .map(EventFd::try_clone)
                .transpose()
                .map_err(|source| PciError::Io {
                    op: "dup call eventfd",
                    source,
                })?;
            let idx = usize::from(g.vector);
            if routing.len() <= idx {
                routing.resize_with(idx + 1, || None);
            }
            routing[idx] = fd;
        }
        let plan = self.plan.clone();
        for g in &plan.groups {
            if g.config {
                let v = if self.config_call.is_some() {
                    g.vector
                } else {
                    NO_VECTOR
                };
                self.transport.set_config_vector(v)?;
            }
            for &q in &g.queues {
                let v = if self.queues[usize::from(q.0)].size != 0 {
                    g.vector
                } else {
                    NO_VECTOR
                };
                self.transport.set_queue_vector(q, v)?;
            }
        }
        let refs: Vec<Option<&EventFd>> = routing.iter().map(Option::as_ref).collect();
        self.transport.function().enable_msix(&refs)?;
        self.msix_enabled = true;
        Ok(())
    }

    /// Doorbell offset of `q` in the notify window, checked for the
    /// negotiated doorbell width.
    fn doorbell_offset(&self, q: QueueIndex) -> Result<u64> {
        let off = self
            .notify
            .get(usize::from(q.0))
            .ok_or(OpsError::InvalidQueue(q))?;
        let region = self.transport.notify_region();
        match off {
            Some(o) if o + self.notify_width() <= region.length => Ok(*o),
            _ => Err(TransportError::NotifyOutOfRange {
                queue: q,
                notify_off: 0,
                multiplier: self.transport.caps().notify.multiplier,
                len: region.length,
            }
            .into()),
        }
    }

    fn ring_window(&self) -> BarWindow<P> {
        self.transport.notify_window().clone()
    }
}

/// Everything in the BARs other than the doorbells: every range a
/// capability names except the notify structure in use (duplicate
/// structures and shared-memory regions included), and the MSI-X table and
/// PBA. `None` when that cannot be known: an opaque capability (vendor
/// data, an unknown type, a second MSI-X capability) or MSI-X table words
/// that cannot be read. Doorbell pages are offered to a guest only when
/// this is known, as Linux's vhost-vdpa maps a notification area only when
/// it can prove the page is the doorbell's alone.
struct OtherStructures {
    ranges: Vec<(u8, u64, u64)>,
}

impl OtherStructures {
    fn of<P: PciFunction + ?Sized>(t: &ModernTransport<P>) -> Option<Self> {
        let caps = t.caps();
        if let Some(o) = caps.opaque.first() {
            log::info!(
                "{}: capability {:#04x} (type {}) at {:#x} may describe BAR contents; no doorbell page is offered to a guest",
                t.function().describe(),
                o.id,
                o.cfg_type,
                o.pos
            );
            return None;
        }
        let notify = caps.notify.region;
        let mut ranges: Vec<(u8, u64, u64)> = caps
            .described
            .iter()
            .filter(|r| **r != notify)
            .map(|r| (r.bar, r.offset, r.offset.saturating_add(r.length)))
            .collect();
        if let Some((pos, vectors)) = caps.msix {
            // MSI-X table and PBA: offset/BIR words at cap + 4 and + 8;
            // 16 bytes per entry, one bit per vector (in 8-byte words).
            let sizes = [u64::from(vectors) * 16, u64::from(vectors).div_ceil(64) * 8];
            for (w, size) in [4u64, 8].into_iter().zip(sizes) {
                let at = u64::from(pos) + w;
                // The capability must lie in the 256-byte space (one at 0xf8
                // or above does not): unreadable table words prove nothing.
                if at + 4 > 0x100 {
                    return None;
                }
                let v = t.function().config_read_u32(at).ok()?;
                let off = u64::from(v & !7);
                ranges.push(((v & 7) as u8, off, off.saturating_add(size)));
            }
        }
        Some(OtherStructures { ranges })
    }

    /// Whether `[start, end)` of `bar` overlaps any of them.
    fn overlap(&self, bar: u8, start: u64, end: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(b, s, e)| b == bar && s < end && start < e)
    }
}

/// Whether the BAR pages `[start, end)` hold doorbells only: they lie
/// inside the notify structure (the device's promise that this range is
/// doorbells) and overlap nothing else a capability names.
fn only_doorbells<P: PciFunction + ?Sized>(
    t: &ModernTransport<P>,
    others: Option<&OtherStructures>,
    start: u64,
    end: u64,
) -> bool {
    let region = t.notify_region();
    let inside = start >= region.offset
        && region
            .offset
            .checked_add(region.length)
            .is_some_and(|e| end <= e);
    inside && others.is_some_and(|o| !o.overlap(region.bar, start, end))
}

/// For each queue, whether its doorbell's page holds no other queue's
/// doorbell and nothing but doorbells ([`only_doorbells`]), so the page
/// can be mapped into a guest (QEMU's `page-per-vq=on`).
fn page_exclusivity<P: PciFunction + ?Sized>(
    t: &ModernTransport<P>,
    notify: &[Option<u64>],
    page_size: u64,
) -> Vec<bool> {
    let region = t.notify_region();
    let others = OtherStructures::of(t);
    let page_of = |off: u64| region.offset.saturating_add(off) & !(page_size - 1);
    notify
        .iter()
        .enumerate()
        .map(|(i, off)| {
            let Some(off) = off else { return false };
            let page = page_of(*off);
            let page_end = page.saturating_add(page_size);
            let clash_queue = notify
                .iter()
                .enumerate()
                .any(|(j, o)| j != i && o.is_some_and(|o| page_of(o) == page));
            !clash_queue && only_doorbells(t, others.as_ref(), page, page_end)
        })
        .collect()
}

/// The pages holding every queue's doorbell, when every queue has one,
/// those pages hold nothing but doorbells ([`only_doorbells`]) and the
/// function maps all of them at a page-aligned host address (QEMU's
/// default layout with 4 KiB pages: one page, queue `q` at `4 * q`).
fn doorbell_pages<P: PciFunction + ?Sized>(
    t: &ModernTransport<P>,
    notify: &[Option<u64>],
    page_size: u64,
) -> Option<NotifyPages> {
    let region = t.notify_region();
    // Every doorbell's BAR offset; 4 bytes wide at most (notification data).
    let offsets = notify
        .iter()
        .map(|o| o.and_then(|o| region.offset.checked_add(o)))
        .collect::<Option<Vec<u64>>>()?;
    let (lo, hi) = (*offsets.iter().min()?, *offsets.iter().max()?);
    let start = lo & !(page_size - 1);
    let end = hi
        .checked_add(4)
        .and_then(|e| e.checked_next_multiple_of(page_size))?;
    if !only_doorbells(t, OtherStructures::of(t).as_ref(), start, end) {
        return None;
    }
    let host = t.function().bar_mappings(region.bar).iter().find_map(|m| {
        let inside = start >= m.offset && m.offset.checked_add(m.len).is_some_and(|me| end <= me);
        inside
            .then(|| usize::try_from(start - m.offset).ok())
            .flatten()
            .and_then(|d| m.host_addr.checked_add(d))
    });
    let host_addr = host.filter(|h| (*h as u64).is_multiple_of(page_size))?;
    Some(NotifyPages {
        host_addr,
        len: end - start,
        page_size,
        doorbells: offsets.iter().map(|o| o - start).collect(),
    })
}

struct PciDoorbell<P: PciFunction + ?Sized> {
    window: BarWindow<P>,
    offset: u64,
    queue: u16,
    data: bool,
}

impl<P: PciFunction + ?Sized> RingDoorbell for PciDoorbell<P> {
    fn ring(&self, next: u32) -> std::io::Result<()> {
        let r = if self.data {
            // virtio 1.2 §4.1.5.2: vqn in bits 0..16, next_off/next_wrap above.
            let v = u32::from(self.queue) | (next << 16);
            self.window.write32(self.offset, v)
        } else {
            self.window.write16(self.offset, self.queue)
        };
        r.map_err(std::io::Error::other)
    }
}

impl<P: PciFunction + ?Sized + 'static> VdpaOps for VpVdpa<P> {
    type Error = VpVdpaError;

    fn device_id(&self) -> u32 {
        self.transport.info().virtio_id
    }

    fn vendor_id(&self) -> u32 {
        u32::from(self.transport.info().subsystem_vendor_id)
    }

    fn device_features(&self) -> u64 {
        self.offered
    }

    fn raw_device_features(&self) -> u64 {
        self.raw_features
    }

    fn write_driver_features(&mut self, f: DriverFeatures) -> Result<()> {
        if self.status & status::FEATURES_OK != 0 {
            return Err(OpsError::BadState {
                op: "set_driver_features",
                status: self.status,
            }
            .into());
        }
        let f = f.bits();
        self.transport.set_driver_features(f)?;
        self.driver_features = f;
        Ok(())
    }

    fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn backend_caps(&self) -> BackendCaps {
        BackendCaps {
            kick_eventfd: true,
            call_eventfd: self.msix_vectors() > 0,
            suspend: self.offered & features::bit(features::SUSPEND) != 0,
            notification_area: self.transport.notify_window().is_mapped(),
        }
    }

    fn status(&mut self) -> Result<u8> {
        let s = self.transport.status()?;
        Ok(s)
    }

    fn set_status(&mut self, s: u8) -> Result<()> {
        if s == 0 {
            return self.reset();
        }
        if self.reset_failed {
            self.recover()?;
        }
        let old = self.status;
        if s & old != old {
            // Bits can only be cleared by a reset (virtio 1.2 §2.1.2).
            return Err(OpsError::BadState {
                op: "clearing status bits without reset",
                status: old,
            }
            .into());
        }
        let new = s & !old;
        if new & status::FEATURES_OK != 0 {
            if !has_version_1(self.driver_features) {
                return Err(OpsError::BadState {
                    op: "FEATURES_OK without VIRTIO_F_VERSION_1",
                    status: old,
                }
                .into());
            }
            let base = (old | s) & !(status::FEATURES_OK | status::DRIVER_OK);
            self.transport.set_status(base)?;
            self.transport
                .features_ok(base, self.driver_features)
                .map_err(|e| match e {
                    TransportError::FeaturesRefused(f) => OpsError::FeaturesRefused(f).into(),
                    e => VpVdpaError::from(e),
                })?;
            self.status = base | status::FEATURES_OK;
        }
        if new & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 {
                return Err(OpsError::BadState {
                    op: "DRIVER_OK before FEATURES_OK",
                    status: self.status,
                }
                .into());
            }
            self.wire_interrupts()?;
        }
        self.transport.set_status(s)?;
        self.status = s;
        if s & status::FAILED != 0 {
            self.teardown();
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        self.reset_device()
    }

    /// Virtio 1.4 Device Suspend: SUSPEND written on top of the running
    /// status, then the device must show SUSPEND set and DRIVER_OK clear
    /// within the reset timeout.
    fn suspend(&mut self) -> Result<()> {
        if !self.negotiated(features::SUSPEND) {
            return Err(OpsError::Unsupported("suspend: VIRTIO_F_SUSPEND not negotiated").into());
        }
        if self.status & status::DRIVER_OK == 0 {
            return Err(OpsError::BadState {
                op: "suspend",
                status: self.status,
            }
            .into());
        }
        let shown = match self.transport.set_status_and_wait(
            "suspend",
            self.status | status::SUSPEND,
            status::SUSPEND,
            status::DRIVER_OK,
        ) {
            Ok(s) => s,
            Err(e @ TransportError::StatusTimeout { .. }) => {
                // Not suspended in time: DRIVER_OK written again (how a
                // suspended device is resumed), so a device that suspends
                // late runs on rather than stopping unseen.
                if let Err(w) = self.transport.set_status(self.status) {
                    log::warn!("taking back a late suspend failed: {w}");
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        self.status = shown;
        Ok(())
    }

    /// DRIVER_OK written again; the device must show it set and SUSPEND
    /// clear within the reset timeout.
    fn resume(&mut self) -> Result<()> {
        if self.status & status::SUSPEND == 0 {
            return Err(OpsError::BadState {
                op: "resume",
                status: self.status,
            }
            .into());
        }
        let running = (self.status & !status::SUSPEND) | status::DRIVER_OK;
        let shown = self.transport.set_status_and_wait(
            "resume",
            running,
            status::DRIVER_OK,
            status::SUSPEND,
        )?;
        self.status = shown;
        Ok(())
    }

    fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    fn vring_max_size(&mut self, q: QueueIndex) -> Result<u16> {
        Ok(self.queue(q)?.max_size)
    }

    fn set_vring_num(&mut self, q: QueueIndex, num: u16) -> Result<()> {
        let packed = self.negotiated(features::RING_PACKED);
        let qs = self.queue(q)?;
        let max = qs.max_size;
        if num == 0 || num > max || (!packed && !num.is_power_of_two()) {
            return Err(OpsError::InvalidQueueSize {
                queue: q,
                size: num,
                max,
            }
            .into());
        }
        self.transport.set_queue_size(q, num)?;
        self.queue(q)?.size = num;
        Ok(())
    }

    fn set_vring_addr(&mut self, q: QueueIndex, a: VringAddrs) -> Result<()> {
        self.queue(q)?;
        let (d, r, u) = if self.negotiated(features::RING_PACKED) {
            (16, 4, 4)
        } else {
            (16, 2, 4)
        };
        if !a.desc.is_multiple_of(d) || !a.driver.is_multiple_of(r) || !a.device.is_multiple_of(u) {
            return Err(OpsError::MisalignedRing { queue: q, addrs: a }.into());
        }
        self.transport.set_queue_addrs(q, a)?;
        Ok(())
    }

    fn set_vring_base(&mut self, q: QueueIndex, base: u16) -> Result<()> {
        self.queue(q)?;
        // virtio-pci has no register for it: only a fresh ring (0) works,
        // as in the kernel's vp_vdpa_set_vq_state_split.
        if base != 0 {
            return Err(OpsError::Unsupported("a non-zero vring base on virtio-pci").into());
        }
        Ok(())
    }

    fn vring_base(&mut self, q: QueueIndex) -> Result<u16> {
        self.queue(q)?;
        Err(OpsError::Unsupported("reading the vring base on virtio-pci").into())
    }

    fn set_vring_enable(&mut self, q: QueueIndex, enable: bool) -> Result<()> {
        let qs = self.queue(q)?;
        if !enable {
            if qs.enabled {
                return Err(OpsError::Unsupported(
                    "disabling an enabled virtio-pci queue without reset",
                )
                .into());
            }
            return Ok(());
        }
        if qs.size == 0 {
            return Err(OpsError::BadState {
                op: "enabling a queue without a size",
                status: self.status,
            }
            .into());
        }
        self.transport.enable_queue(q)?;
        self.queue(q)?.enabled = true;
        Ok(())
    }

    fn vring_enabled(&mut self, q: QueueIndex) -> Result<bool> {
        self.queue(q)?;
        Ok(self.transport.queue_enabled(q)?)
    }

    fn set_vring_kick(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<()> {
        if let Some((_old, off)) = self.queue(q)?.kick.take() {
            self.unregister_kick(q.0, off);
        }
        if self.negotiated(features::NOTIFICATION_DATA) && fd.is_some() {
            return Err(OpsError::Unsupported(
                "in-kernel kicks with VIRTIO_F_NOTIFICATION_DATA (no per-kick data)",
            )
            .into());
        }
        let Some(fd) = fd else { return Ok(()) };
        let n = self.transport.queue_notify(q, 2)?;
        let dup = fd.try_clone().map_err(|source| PciError::Io {
            op: "dup kick eventfd",
            source,
        })?;
        self.transport.function().set_ioeventfd(
            n.bar,
            n.bar_offset,
            IoWidth::U16,
            u64::from(q.0),
            Some(&dup),
        )?;
        self.queue(q)?.kick = Some((dup, n.bar_offset));
        Ok(())
    }

    fn set_vring_call(&mut self, q: QueueIndex, fd: Option<&EventFd>) -> Result<()> {
        let dup = fd
            .map(EventFd::try_clone)
            .transpose()
            .map_err(|source| PciError::Io {
                op: "dup call eventfd",
                source,
            })?;
        self.queue(q)?.call = dup;
        Ok(())
    }

    fn set_config_call(&mut self, fd: Option<&EventFd>) -> Result<()> {
        self.config_call =
            fd.map(EventFd::try_clone)
                .transpose()
                .map_err(|source| PciError::Io {
                    op: "dup config eventfd",
                    source,
                })?;
        Ok(())
    }

    fn irq_plan(&self) -> IrqPlan {
        self.plan.clone()
    }

    fn kick(&self, q: QueueIndex) -> Result<()> {
        if usize::from(q.0) >= self.queues.len() {
            return Err(OpsError::InvalidQueue(q).into());
        }
        if self.negotiated(features::NOTIFICATION_DATA) {
            return Err(OpsError::Unsupported(
                "kick without data when VIRTIO_F_NOTIFICATION_DATA is negotiated; use doorbell()",
            )
            .into());
        }
        // `queue_notify` needs `&mut` for the select; the offset cached at
        // open serves instead.
        let offset = self.doorbell_offset(q)?;
        self.transport
            .notify_window()
            .write16(offset, q.0)
            .map_err(TransportError::from)?;
        Ok(())
    }

    fn doorbell(&self, q: QueueIndex) -> Result<Doorbell> {
        if usize::from(q.0) >= self.queues.len() {
            return Err(OpsError::InvalidQueue(q).into());
        }
        let offset = self.doorbell_offset(q)?;
        Ok(Doorbell::new(Arc::new(PciDoorbell {
            window: self.ring_window(),
            offset,
            queue: q.0,
            data: self.negotiated(features::NOTIFICATION_DATA),
        })))
    }

    fn notification_area(&self, q: QueueIndex) -> Result<NotifyArea> {
        let offset = self.doorbell_offset(q)?;
        let region = self.transport.notify_region();
        Ok(NotifyArea {
            bar: region.bar,
            offset: region.offset + offset,
            size: self.notify_width(),
            host_addr: self.transport.notify_window().host_addr(offset),
            page_exclusive: self
                .page_exclusive
                .get(usize::from(q.0))
                .copied()
                .unwrap_or(false),
        })
    }

    fn notification_pages(&self) -> Option<NotifyPages> {
        self.pages.clone()
    }

    fn config_size(&self) -> usize {
        self.transport.device_config_len() as usize
    }

    fn read_device_config(&mut self, range: ConfigRange, buf: &mut [u8]) -> Result<()> {
        Ok(self.transport.read_config(range, buf)?)
    }

    fn write_device_config(&mut self, range: ConfigRange, buf: &[u8]) -> Result<()> {
        Ok(self.transport.write_config(range, buf)?)
    }

    fn config_generation(&mut self) -> Result<u32> {
        Ok(u32::from(self.transport.config_generation()?))
    }

    fn removal_request(&self) -> Option<&EventFd> {
        self.transport.function().removal_request()
    }
}

impl<P: PciFunction + ?Sized> DmaMapper for VpVdpa<P> {
    type Error = VpVdpaError;

    fn iova_range(&self) -> IovaRange {
        self.transport.function().iova_range()
    }

    unsafe fn dma_map(&self, iova: Iova, size: u64, host_addr: usize) -> Result<()> {
        self.iova_range().check(iova.0, size)?;
        // SAFETY: the caller upholds DmaMapper::dma_map's contract, which is
        // PciFunction::dma_map's.
        unsafe { self.transport.function().dma_map(iova, size, host_addr) }?;
        Ok(())
    }

    unsafe fn dma_map_top(
        &self,
        size: u64,
        host_addr: usize,
        align: u64,
        floor: u64,
    ) -> Result<Iova> {
        // SAFETY: the caller upholds DmaMapper::dma_map_top's contract,
        // which is PciFunction::dma_map_top's.
        let iova = unsafe {
            self.transport
                .function()
                .dma_map_top(size, host_addr, align, floor)
        }?;
        Ok(iova)
    }

    fn dma_unmap(&self, iova: Iova, size: u64) -> Result<()> {
        self.transport.function().dma_unmap(iova, size)?;
        Ok(())
    }
}

impl<P: PciFunction + ?Sized> Drop for VpVdpa<P> {
    fn drop(&mut self) {
        if let Err(e) = self.reset_device() {
            log::warn!("reset on release failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{ConfigBuilder, RawFunction};

    /// Common config offsets (virtio 1.2 §4.1.4.3).
    const DEVICE_FEATURE: usize = 4;
    const NUM_QUEUES: usize = 0x12;
    const QUEUE_SIZE: usize = 0x18;

    /// A function that opens: VERSION_1 offered, `queues` queues of 256,
    /// every `queue_notify_off` 0 (the raw bytes ignore queue_select).
    fn function(config: ConfigBuilder, mapped: bool, queues: u16) -> Arc<RawFunction> {
        let f = RawFunction::new(&config.build());
        let f = if mapped {
            f.with_mapped_bar(4, 0x4000)
        } else {
            f.with_bar(4, crate::pci::BarKind::Memory, 0x4000)
        };
        f.poke(4, DEVICE_FEATURE, &1u32.to_le_bytes());
        f.poke(4, NUM_QUEUES, &queues.to_le_bytes());
        f.poke(4, QUEUE_SIZE, &256u16.to_le_bytes());
        Arc::new(f)
    }

    fn open(f: &Arc<RawFunction>) -> VpVdpa<RawFunction> {
        VpVdpa::open(Arc::clone(f), OpenOptions::default()).expect("open")
    }

    #[test]
    fn qemu_layout_doorbells_form_one_mappable_page() {
        let f = function(ConfigBuilder::qemu_like(0x1042), true, 3);
        let d = open(&f);
        let pages = d.notification_pages().expect("doorbell pages");
        let base = f.bar_mappings(4)[0].host_addr;
        assert_eq!(pages.host_addr, base + 0x3000);
        assert_eq!(pages.len, 0x1000);
        // queue_notify_off reads 0 for every queue here.
        assert_eq!(pages.doorbells, vec![0, 0, 0]);
    }

    #[test]
    fn unmapped_bar_has_no_doorbell_pages() {
        let f = function(ConfigBuilder::qemu_like(0x1042), false, 1);
        assert_eq!(open(&f).notification_pages(), None);
    }

    #[test]
    fn doorbell_page_shared_with_device_config_is_not_offered() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x1000)
            .virtio_cap(4, 4, 0x2000, 0x800)
            .notify_cap(4, 0x2800, 0x800, 4);
        let f = function(cfg, true, 2);
        let d = open(&f);
        assert_eq!(d.notification_pages(), None);
        // The doorbell itself still works through the host mapping.
        d.kick(QueueIndex(1)).expect("kick");
        let mut b = [0u8; 2];
        f.peek(4, 0x2800, &mut b).expect("peek");
        assert_eq!(u16::from_le_bytes(b), 1);
    }

    #[test]
    fn msix_table_in_the_doorbell_page_is_not_offered() {
        let in_page = ConfigBuilder::qemu_like(0x1042).msix_cap(4, 4, 0x3800, 4, 0x3c00);
        let f = function(in_page, true, 1);
        assert_eq!(open(&f).notification_pages(), None);
        // Elsewhere (its own BAR, as QEMU puts it) it does not matter.
        let elsewhere = ConfigBuilder::qemu_like(0x1042).msix_cap(4, 1, 0, 1, 0x800);
        let f = function(elsewhere, true, 1);
        assert!(open(&f).notification_pages().is_some());
    }

    #[test]
    fn a_short_doorbell_region_still_needs_its_whole_page_free() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x1000)
            .virtio_cap(4, 4, 0x2000, 0x1000)
            .notify_cap(4, 0x3000, 0x800, 4)
            .msix_cap(2, 4, 0x3800, 4, 0x3c00);
        let f = function(cfg, true, 1);
        // The table at 0x3800 is in the doorbells' page: refused, though
        // the notify region itself ends at 0x3800.
        assert_eq!(open(&f).notification_pages(), None);
    }

    #[test]
    fn a_duplicate_structure_in_the_doorbell_page_is_not_offered() {
        // A second ISR capability (not the one in use) inside the page.
        let cfg = ConfigBuilder::qemu_like(0x1042).virtio_cap(3, 4, 0x3800, 0x10);
        let f = function(cfg, true, 1);
        let d = open(&f);
        assert_eq!(d.notification_pages(), None);
        assert!(!d.notification_area(QueueIndex(0)).unwrap().page_exclusive);
    }

    #[test]
    fn a_shared_memory_region_is_a_structure_too() {
        let inside = ConfigBuilder::qemu_like(0x1042).shm_cap(4, 0x3c00, 0x400);
        assert_eq!(open(&function(inside, true, 1)).notification_pages(), None);
        // Elsewhere (another BAR, or above 4 GiB in this one) it does not
        // matter.
        let elsewhere = ConfigBuilder::qemu_like(0x1042)
            .shm_cap(2, 0, 0x1000)
            .shm_cap(4, 1 << 32, 0x1000);
        assert!(open(&function(elsewhere, true, 1))
            .notification_pages()
            .is_some());
    }

    #[test]
    fn a_vendor_data_capability_opens_but_proves_nothing_about_the_page() {
        // 8 bytes: shorter than a virtio_pci_cap, which used to fail open.
        let cfg = ConfigBuilder::qemu_like(0x1042).vendor_data_cap(8);
        let f = function(cfg, true, 1);
        let d = open(&f);
        assert_eq!(d.notification_pages(), None);
        assert!(!d.notification_area(QueueIndex(0)).unwrap().page_exclusive);
    }

    #[test]
    fn a_second_msix_capability_proves_nothing_about_the_page() {
        let cfg = ConfigBuilder::qemu_like(0x1042)
            .msix_cap(2, 1, 0, 1, 0x800)
            .msix_cap(4, 4, 0x3800, 4, 0x3c00);
        let f = function(cfg, true, 1);
        let d = open(&f);
        // The first MSI-X capability is the one in use (2 vectors), as for
        // the PCI core and VFIO.
        assert_eq!(d.transport().caps().msix.map(|m| m.1), Some(2));
        assert_eq!(d.notification_pages(), None);
    }

    #[test]
    fn an_msix_capability_at_the_end_of_config_space_opens_without_doorbell_pages() {
        // MSI-X at 0xf8: its PBA word (0x100) is past the 256-byte space.
        let msix = [0x11, 0, 3, 0, 0x01, 0, 0, 0];
        let cfg = ConfigBuilder::qemu_like(0x1042).cap_at(0xf8, &msix);
        let f = function(cfg, true, 1);
        let d = open(&f);
        assert_eq!(d.transport().caps().msix, Some((0xf8, 4)));
        assert_eq!(d.notification_pages(), None);
    }

    #[test]
    fn with_64_kib_pages_a_4_kib_doorbell_region_is_not_offered() {
        let f = function(ConfigBuilder::qemu_like(0x1042), true, 2);
        let opts = OpenOptions {
            page_size: 0x1_0000,
            ..OpenOptions::default()
        };
        let d = VpVdpa::open(Arc::clone(&f), opts).expect("open");
        assert_eq!(d.notification_pages(), None);
        assert!(!d.notification_area(QueueIndex(1)).unwrap().page_exclusive);
        // Kicks still work (through the host mapping or a trap).
        d.kick(QueueIndex(1)).expect("kick");
    }

    #[test]
    fn with_64_kib_pages_a_64_kib_doorbell_region_is_offered_in_64_kib_units() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x1000)
            .virtio_cap(4, 4, 0x2000, 0x1000)
            .notify_cap(4, 0x1_0000, 0x1_0000, 4)
            .msix_cap(2, 1, 0, 1, 0x800);
        let f = RawFunction::new(&cfg.build()).with_mapped_bar(4, 0x2_0000);
        f.poke(4, DEVICE_FEATURE, &1u32.to_le_bytes());
        f.poke(4, NUM_QUEUES, &2u16.to_le_bytes());
        f.poke(4, QUEUE_SIZE, &256u16.to_le_bytes());
        let f = Arc::new(f);
        let opts = OpenOptions {
            page_size: 0x1_0000,
            ..OpenOptions::default()
        };
        let pages = VpVdpa::open(Arc::clone(&f), opts)
            .expect("open")
            .notification_pages()
            .expect("pages");
        let base = f.bar_mappings(4)[0].host_addr;
        assert_eq!((pages.len, pages.page_size), (0x1_0000, 0x1_0000));
        // The fake maps the BAR at an address aligned to its size.
        assert_eq!(pages.host_addr, base + 0x1_0000);
        assert_eq!(pages.host_addr % 0x1_0000, 0);
    }
}
