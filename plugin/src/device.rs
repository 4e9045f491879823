//! [`BridgeDevice`]: the device Cloud Hypervisor's device manager holds,
//! with the shape of CH v53.0's `VirtioDevice` (`virtio-devices/src/device.rs`).

use std::sync::Arc;

use vdpa_bridge::types::features;
use vdpa_bridge::{ConfigRange, DmaMapper, DriverFeatures, NotifyArea, QueueIndex, VdpaOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace as _, GuestMemory, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

use crate::activate::{self, AddressTranslation, QueueArg};
use crate::dirty::{DirtyLog, DirtyRange};
use crate::dma::DmaHandle;
use crate::error::{backend_err, Error, Result};
use crate::interrupt::{InterruptType, ThreadHook, VirtioInterrupt};
use crate::net_ctrl::{self, ControlWatch, NetControlState, SharedControl};
use crate::relay::{Relay, RelayPlan};
use crate::release::{self, Orphan, OrphanQueue, ReleaseReport};
use crate::shadow::{self, QueuePosition, Shadow, ShadowPlan, ShadowQueueArg};
use crate::slot::Slot;
use crate::state::{DeviceState, QueueState, STATE_VERSION};

/// How guest kicks reach the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KickPolicy {
    /// Hand each kick eventfd to the backend (in-kernel doorbell write),
    /// falling back to the relay thread only where that cannot serve.
    #[default]
    Auto,
    /// Always relay kicks through the relay thread (for comparison and for
    /// backends whose in-kernel path misbehaves).
    Relay,
}

/// Whether the device works on the guest's rings or on shadow rings (see
/// the `shadow` module).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShadowPolicy {
    /// Direct (zero-hop) until dirty logging, a pause or a restore needs
    /// shadow rings; shadowed from then until the guest resets the device.
    #[default]
    Auto,
    /// Shadow rings from every activation (tests, measurements, devices
    /// whose direct path misbehaves).
    Always,
}

/// How an active device's data path runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// The device works on the guest's rings.
    Direct,
    /// The device works on shadow rings, relayed by the bridge.
    Shadow,
    /// Stopped: the device does nothing until [`BridgeDevice::resume`].
    Paused,
}

/// What a pause did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PauseReport {
    /// From the call to a stopped device.
    pub took: std::time::Duration,
    /// Queues with requests the device held when it was stopped (offered
    /// again at resume), with their number.
    pub held: Vec<(u16, usize)>,
}

/// What the VMM tells the device about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceOptions {
    /// The VMM's virtqueue code handles packed rings (else RING_PACKED is
    /// not offered).
    pub packed_ring: bool,
    /// The VMM drives DMA mappings itself (a vIOMMU is in front of the
    /// device); otherwise guest RAM is mapped with IOVA = GPA.
    pub iommu: bool,
    /// Expose at most this many queues.
    pub num_queues: Option<u16>,
    /// Kick path.
    pub kick: KickPolicy,
    /// The VMM's transport passes VIRTIO_F_NOTIFICATION_DATA kicks on (the
    /// relay then reads the avail index); otherwise the bit is not offered.
    /// Never offered together with packed rings.
    pub notification_data: bool,
    /// Direct or shadow rings.
    pub shadow: ShadowPolicy,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            packed_ring: false,
            iommu: false,
            num_queues: None,
            kick: KickPolicy::Auto,
            notification_data: false,
            shadow: ShadowPolicy::Auto,
        }
    }
}

/// Transport features that live in the VMM's virtio-pci transport, not in
/// the device: a guest that negotiated them would drive registers the
/// VMM's transport does not have (Linux refuses a device offering
/// VIRTIO_F_RING_RESET on a 56-byte common config, seen with QEMU's
/// virtio-blk under Cloud Hypervisor). Never offered. VIRTIO_F_SUSPEND is
/// among them: the VMM's transport has no SUSPEND status bit, and the
/// bridge negotiates it with the device for itself ([`BRIDGE_FEATURES`]).
pub const TRANSPORT_ONLY_FEATURES: u64 = features::bit(features::SR_IOV)
    | features::bit(features::NOTIF_CONFIG_DATA)
    | features::bit(features::RING_RESET)
    | features::bit(features::ADMIN_VQ)
    | features::bit(features::SUSPEND);

/// Features the bridge negotiates with the device for its own use,
/// whatever the guest acked, when the device offers them: VIRTIO_F_SUSPEND
/// (pause without a reset, an exact stop before one).
pub const BRIDGE_FEATURES: u64 = features::bit(features::SUSPEND);

/// How an activated device's data path is wired (for tests, logs and the
/// CLI's report).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wiring {
    /// Queues whose kicks the backend takes in-kernel.
    pub direct_kicks: Vec<u16>,
    /// Queues whose kicks go through the relay thread.
    pub relayed_kicks: Vec<u16>,
    /// Interrupt sources routed straight to the guest's eventfd.
    pub direct_irqs: Vec<InterruptType>,
    /// Interrupt sources fanned out by the relay thread.
    pub relayed_irqs: Vec<InterruptType>,
}

impl Wiring {
    /// Whether a relay thread is needed.
    pub fn needs_relay(&self) -> bool {
        !self.relayed_kicks.is_empty() || !self.relayed_irqs.is_empty()
    }
}

/// A host mapping of the device's doorbells that a VMM can map over its
/// own virtio-pci notification area, so the guest's kicks reach the
/// device without a VM exit (see [`BridgeDevice::guest_notify_mapping`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestNotifyMapping {
    /// Host address (page-aligned) to map at the start of the VMM's
    /// notification area.
    pub host_addr: usize,
    /// Bytes to map (whole pages).
    pub len: u64,
}

/// Why the doorbells cannot be mapped into the guest (kicks are then
/// trapped by the VMM and forwarded, which always works).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoNotifyMapping {
    /// Kicks must go through the relay thread (`KickPolicy::Relay`).
    #[error("kicks are relayed by policy")]
    Relayed,
    /// The device always runs on shadow rings (`ShadowPolicy::Always`),
    /// whose relay must see every kick. (With `ShadowPolicy::Auto` a VMM
    /// that maps the doorbells must remove the mapping before
    /// [`BridgeDevice::start_dirty_log`] or [`BridgeDevice::pause`].)
    #[error("the device runs on shadow rings")]
    Shadowed,
    /// A virtio-net device with a control queue: the bridge records every
    /// control command (replayed after a reset it does), so that queue's
    /// kicks must reach the relay.
    #[error("the net control queue's kicks must reach the bridge")]
    ControlQueue,
    /// The backend has no host mapping of its doorbells that holds
    /// nothing else (the pages also hold config structures or the MSI-X
    /// table, the BAR is not mmap-able, or the backend is not PCI).
    #[error("the backend has no exclusive host mapping of its doorbells")]
    Backend,
    /// The device's doorbell layout differs from the VMM's.
    #[error("queue {queue}: doorbell at {device:#x} in the device's pages, the guest expects {guest:#x}")]
    Layout {
        /// Queue index.
        queue: u16,
        /// Offset in the device's doorbell pages.
        device: u64,
        /// Offset the guest writes to.
        guest: u64,
    },
    /// The doorbells the guest uses do not fit in the VMM's area.
    #[error("the device's doorbells need {need:#x} bytes, the guest's area has {have:#x}")]
    TooLarge {
        /// Bytes needed.
        need: u64,
        /// Size of the VMM's notification area.
        have: u64,
    },
}

/// How an active device runs.
enum Run<B: VdpaOps + DmaMapper, M: GuestMemory> {
    /// On the guest's rings, with the relay thread if one is needed.
    Direct(Option<Relay>),
    /// On shadow rings.
    Shadow(Shadow<B, M>),
    /// Stopped, with where each queue stands.
    Paused(Vec<(u16, QueuePosition)>),
    /// Suspended on the guest's rings (VIRTIO_F_SUSPEND or vhost-vdpa's
    /// suspend): a resume runs it on them again; where each queue stands
    /// (for a state, or a restart on shadow rings) unless the device could
    /// not run shadowed (`None`).
    Suspended(Option<Vec<(u16, QueuePosition)>>),
}

struct Active<B: VdpaOps + DmaMapper, M: GuestMemory> {
    run: Run<B, M>,
    wiring: Wiring,
    /// What activation was given, kept for a release (see
    /// [`BridgeDevice::release`]).
    queues: Vec<QueueArg>,
    mem: GuestMemoryAtomic<M>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl<B: VdpaOps + DmaMapper, M: GuestMemory> Active<B, M> {
    /// The activated queues' indices (checked to fit 16 bits at
    /// activation).
    fn indices(&self) -> Vec<u16> {
        self.queues
            .iter()
            .map(|(i, _, _)| u16::try_from(*i).unwrap_or(u16::MAX))
            .collect()
    }
}

/// A vDPA device bridged into a VMM.
///
/// Generic over the backend (`B`: a [`VdpaOps`] + [`DmaMapper`], e.g.
/// `VpVdpa<VfioFunction>`) and the VMM's guest memory type (`M`; CH uses
/// `GuestMemoryMmap<AtomicBitmap>`).
pub struct BridgeDevice<B: VdpaOps + DmaMapper, M: GuestMemory> {
    backend: Arc<Slot<B>>,
    dma: DmaHandle<B, M>,
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    offered: u64,
    acked: u64,
    config_size: usize,
    opts: DeviceOptions,
    active: Option<Active<B, M>>,
    /// After a release: the thread answering the guest's queues.
    orphan: Option<Orphan>,
    name: String,
    thread_hook: Option<ThreadHook>,
    /// Guest-physical ring addresses to what the device is given.
    translation: Option<AddressTranslation>,
    /// The guest driver's device config writes, replayed after a reset the
    /// guest did not ask for.
    config_writes: Vec<(u64, Vec<u8>)>,
    /// Pages the device may have written while shadowed.
    log: Arc<DirtyLog>,
    /// A VMM's dirty logging is on.
    logging: bool,
    /// Queue positions of a restored state, for the next activation,
    /// which then stays paused until `resume`.
    restored: Option<Vec<QueueState>>,
    /// After a hand-over: the DMA mappings to make again when the device
    /// is taken back.
    handed_over: Option<Vec<(u64, u64, u64)>>,
    /// A net device's control queue and what its driver set through it
    /// (see `net_ctrl`), from activation to the guest's next reset.
    control: Option<(u16, SharedControl)>,
    /// The control state of a restored state, for the next activation.
    restored_control: Option<NetControlState>,
}

impl<B, M> BridgeDevice<B, M>
where
    B: VdpaOps + DmaMapper + Send + 'static,
    M: GuestMemory + Clone + Send + Sync + 'static,
{
    /// Wrap an opened backend. Resets it; unless `opts.iommu`, maps all of
    /// guest memory for DMA (IOVA = GPA).
    pub fn new(mut backend: B, mem: GuestMemoryAtomic<M>, opts: DeviceOptions) -> Result<Self> {
        backend.reset().map_err(backend_err("reset"))?;
        let device_type = backend.device_id();
        let mut n = backend.num_queues();
        if let Some(limit) = opts.num_queues {
            if limit == 0 || limit > n {
                return Err(Error::Config(format!(
                    "num_queues={limit}: the device has {n} queues"
                )));
            }
            n = limit;
        }
        let mut queue_max_sizes = Vec::with_capacity(usize::from(n));
        for q in 0..n {
            let max = backend
                .vring_max_size(QueueIndex(q))
                .map_err(backend_err("vring_max_size"))?;
            if max == 0 {
                return Err(Error::BadQueue {
                    index: usize::from(q),
                    reason: "the device reports a maximum size of 0",
                });
            }
            queue_max_sizes.push(max);
        }
        let mut offered = backend.device_features() & !TRANSPORT_ONLY_FEATURES;
        if !opts.packed_ring {
            offered &= !features::bit(features::RING_PACKED);
        }
        if !opts.notification_data {
            offered &= !features::bit(features::NOTIFICATION_DATA);
        }
        if offered & features::bit(features::RING_PACKED) != 0
            && offered & features::bit(features::NOTIFICATION_DATA) != 0
        {
            // The relay derives notification data from a split ring's avail
            // index; a packed ring's next_off/next_wrap live elsewhere.
            log::warn!("not offering VIRTIO_F_NOTIFICATION_DATA together with packed rings");
            offered &= !features::bit(features::NOTIFICATION_DATA);
        }
        let config_size = backend.config_size();
        let name = format!("vdpa-relay-{device_type}");
        let backend = Arc::new(Slot::new(backend));
        let log = Arc::new(DirtyLog::for_memory(&*mem.memory()));
        let dma = DmaHandle::new(backend.clone(), mem);
        if !opts.iommu {
            dma.map_guest_memory()?;
        }
        Ok(BridgeDevice {
            backend,
            dma,
            device_type,
            queue_max_sizes,
            offered,
            acked: 0,
            config_size,
            opts,
            active: None,
            orphan: None,
            name,
            thread_hook: None,
            translation: None,
            config_writes: Vec::new(),
            log,
            logging: false,
            restored: None,
            handed_over: None,
            control: None,
            restored_control: None,
        })
    }

    /// Virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Maximum size of each queue.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    /// Features offered to the guest: the backend's (already masked by the
    /// provisioning mask it was opened with) minus what the VMM cannot do
    /// and minus [`TRANSPORT_ONLY_FEATURES`].
    pub fn features(&self) -> u64 {
        self.offered
    }

    /// Features the guest acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Acknowledge driver features. Bits not offered are refused (nothing
    /// is acked then).
    pub fn ack_features(&mut self, value: u64) -> Result<()> {
        self.acked |= DriverFeatures::new(value, self.offered)?.bits();
        Ok(())
    }

    /// Size of the device's config space.
    pub fn config_size(&self) -> usize {
        self.config_size
    }

    /// Read the device's config space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<()> {
        let range = ConfigRange::new(offset, data.len(), self.config_size)?;
        self.backend
            .with(|b| b.read_device_config(range, data))?
            .map_err(backend_err("read config"))
    }

    /// Write the device's config space.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let range = ConfigRange::new(offset, data.len(), self.config_size)?;
        self.backend
            .with(|b| b.write_device_config(range, data))?
            .map_err(backend_err("write config"))?;
        match self
            .config_writes
            .iter_mut()
            .find(|(o, d)| *o == offset && d.len() == data.len())
        {
            Some((_, d)) => d.copy_from_slice(data),
            None => self.config_writes.push((offset, data.to_vec())),
        }
        Ok(())
    }

    /// Whether the device is active.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// How the data path is wired (when active).
    pub fn wiring(&self) -> Option<&Wiring> {
        self.active.as_ref().map(|a| &a.wiring)
    }

    /// The DMA handle (for the VMM's external DMA mapping / vIOMMU).
    pub fn dma(&self) -> &DmaHandle<B, M> {
        &self.dma
    }

    /// Map guest memory the VMM added (hotplug). No-op with a vIOMMU, where
    /// the VMM maps what the guest asks for.
    pub fn add_memory_region(&mut self) -> Result<()> {
        if self.opts.iommu || self.backend.is_released() {
            return Ok(());
        }
        self.log.cover(&*self.dma.guest_memory().memory());
        self.dma.map_guest_memory()
    }

    /// Run `hook` first in every thread the device starts (the relay):
    /// where the VMM confines it (see [`ThreadHook`]).
    pub fn set_thread_hook(&mut self, hook: ThreadHook) {
        self.thread_hook = Some(hook);
    }

    /// Behind a vIOMMU: the queues the VMM hands to [`activate`] hold
    /// guest-physical ring addresses (the VMM's transport translated the
    /// guest's IOVAs, as Cloud Hypervisor's does for a device with an
    /// access platform, so it can read the rings), while the device's DMA
    /// mappings are keyed by the guest's IOVAs: `translate` gives the
    /// device those back. The rings are then also checked against guest
    /// RAM, since their addresses are guest-physical.
    ///
    /// [`activate`]: BridgeDevice::activate
    pub fn set_address_translation(&mut self, translate: AddressTranslation) {
        self.translation = Some(translate);
    }

    /// Run `f` on the backend (control path only).
    ///
    /// # Errors
    ///
    /// [`Error::Released`] once the device was released.
    pub fn with_backend<R>(&self, f: impl FnOnce(&mut B) -> R) -> Result<R> {
        self.backend.with(f)
    }

    /// Start the device: program the queues, wire kicks and interrupts,
    /// enable the queues, DRIVER_OK. On failure the device is reset and no
    /// thread or wiring is left behind.
    pub fn activate(
        &mut self,
        mem: GuestMemoryAtomic<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(usize, Queue, EventFd)>,
    ) -> Result<()> {
        if self.active.is_some() {
            return Err(Error::AlreadyActive);
        }
        let indices: Vec<u16> = queues
            .iter()
            .filter_map(|(i, _, _)| u16::try_from(*i).ok())
            .collect();
        // Split rings at guest-physical addresses only: a packed ring or a
        // vIOMMU's IOVAs cannot be read as the watch reads them (neither
        // device can run shadowed either).
        let watchable =
            self.acked & features::bit(features::RING_PACKED) == 0 && self.translation.is_none();
        self.control = net_ctrl::control_queue(self.device_type, self.acked, &indices)
            .filter(|_| watchable)
            .map(|ci| {
                let seen = queues
                    .iter()
                    .find(|(i, _, _)| *i == usize::from(ci))
                    .map_or(0, |(_, q, _)| q.next_avail());
                let watch = ControlWatch {
                    state: self.restored_control.take().unwrap_or_default(),
                    seen,
                };
                (ci, Arc::new(std::sync::Mutex::new(watch)))
            });
        let shadowed =
            self.opts.shadow == ShadowPolicy::Always || self.logging || self.restored.is_some();
        if shadowed {
            return self.activate_shadowed(mem, interrupt, queues);
        }
        let activated = self
            .backend
            .with(|b| self.try_activate(b, mem.clone(), interrupt.clone(), &queues))?;
        match activated {
            Ok((relay, wiring)) => {
                self.active = Some(Active {
                    run: Run::Direct(relay),
                    wiring,
                    queues,
                    mem,
                    interrupt,
                });
                Ok(())
            }
            Err(e) => {
                if let Err(r) = self.backend.with(|b| b.reset())? {
                    log::error!("reset after failed activation failed: {r}");
                }
                Err(e)
            }
        }
    }

    /// Activation on shadow rings (forced, during dirty logging, or after a
    /// restore, which stays paused until [`BridgeDevice::resume`]).
    fn activate_shadowed(
        &mut self,
        mem: GuestMemoryAtomic<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueArg>,
    ) -> Result<()> {
        self.shadow_possible()?;
        let qidx = activate::check_queues(&queues, &self.queue_max_sizes, self.acked)?;
        activate::check_rings(&queues, &*mem.memory(), self.acked)?;
        let restored = self.restored.is_some();
        let positions: Vec<(u16, QueuePosition)> = match &self.restored {
            Some(saved) => queues
                .iter()
                .zip(&qidx)
                .map(|((_, q, _), &i)| {
                    let s = saved.iter().find(|s| s.index == i).ok_or_else(|| {
                        Error::Restore(format!(
                            "queue {i} is activated but was not in the saved state"
                        ))
                    })?;
                    let rings = [q.desc_table(), q.avail_ring(), q.used_ring()];
                    if s.size != q.size() || s.rings != rings {
                        return Err(Error::Restore(format!(
                            "queue {i}: size {} and rings {rings:x?} differ from the saved \
                             size {} and rings {:x?}",
                            q.size(),
                            s.size,
                            s.rings
                        )));
                    }
                    Ok((i, s.position.clone()))
                })
                .collect::<Result<_>>()?,
            None => queues
                .iter()
                .zip(&qidx)
                .map(|((_, q, _), &i)| {
                    (
                        i,
                        QueuePosition {
                            next_avail: q.next_avail(),
                            next_used: q.next_used(),
                            in_flight: Vec::new(),
                        },
                    )
                })
                .collect(),
        };
        let wiring = Wiring {
            relayed_kicks: qidx.clone(),
            relayed_irqs: qidx.iter().map(|&q| InterruptType::Queue(q)).collect(),
            ..Wiring::default()
        };
        let mut a = Active {
            run: Run::Paused(positions),
            wiring,
            queues,
            mem,
            interrupt,
        };
        if !restored {
            if let Run::Paused(p) = std::mem::replace(&mut a.run, Run::Direct(None)) {
                match self.start_shadow(&a, p) {
                    Ok(s) => a.run = Run::Shadow(s),
                    Err(e) => {
                        if let Err(r) = self.backend.with(|b| b.reset())? {
                            log::error!("reset after failed activation failed: {r}");
                        }
                        return Err(e);
                    }
                }
            }
        } else {
            self.restored = None;
            log::info!(
                "{}: activated from a saved state, paused until resumed",
                self.name
            );
        }
        self.active = Some(a);
        Ok(())
    }

    /// Shadow rings need IOVAs the guest never uses: behind a vIOMMU the
    /// guest owns the device's whole IOVA space.
    fn shadow_possible(&self) -> Result<()> {
        // Guest buffers are given to the device at their guest-physical
        // addresses: every mapping must be IOVA = GPA.
        let identity = self
            .dma
            .mappings()
            .iter()
            .all(|&(iova, gpa, _)| iova == gpa);
        if self.translation.is_some() || !identity {
            return Err(Error::Unsupported(
                "shadow virtqueues (pause, snapshot, migration) are not supported behind a \
                 vIOMMU: the guest owns the device's whole IOVA space, leaving no address \
                 for the shadow rings",
            ));
        }
        if self.acked & features::bit(features::RING_PACKED) != 0 {
            return Err(Error::Unsupported(
                "shadow virtqueues need split rings (the guest negotiated packed rings)",
            ));
        }
        Ok(())
    }

    /// Start shadow mode on the reset device from `positions`.
    fn start_shadow(
        &self,
        a: &Active<B, M>,
        positions: Vec<(u16, QueuePosition)>,
    ) -> Result<Shadow<B, M>> {
        self.shadow_possible()?;
        let mut queues = Vec::with_capacity(a.queues.len());
        for (index, q, kick) in &a.queues {
            let index = u16::try_from(*index).map_err(|_| Error::BadQueue {
                index: *index,
                reason: "index above 65535",
            })?;
            let position = positions
                .iter()
                .find(|(i, _)| *i == index)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| {
                    Error::Shadow(format!(
                        "queue {index}: where the guest's ring stands is not known \
                         (the device could not be stopped cleanly); reset the device"
                    ))
                })?;
            queues.push(ShadowQueueArg {
                index,
                guest: shadow::copy_queue(q)?,
                kick: kick
                    .try_clone()
                    .map_err(crate::error::io("dup kick eventfd"))?,
                position,
            });
        }
        let held: usize = positions.iter().map(|(_, p)| p.in_flight.len()).sum();
        let s = Shadow::start(
            &self.backend,
            ShadowPlan {
                queues,
                mem: a.mem.clone(),
                interrupt: a.interrupt.clone(),
                log: self.log.clone(),
                acked: self.acked,
                config_writes: self.config_writes.clone(),
                control: self.control.clone(),
            },
            format!("{}-shadow", self.name),
            self.thread_hook.clone(),
        )?;
        log::info!(
            "{}: running on shadow rings ({} queues, {held} request(s) offered again); \
             the device stays shadowed until the guest resets it",
            self.name,
            a.queues.len()
        );
        Ok(s)
    }

    /// Stop a device running on the guest's rings and tell where each
    /// queue stands. Kicks stop reaching the device. A device that can be
    /// suspended ([`VdpaOps::suspend`]) is suspended, which finishes what
    /// it holds; any other is given at most [`release::DRAIN`] to finish
    /// what it holds on the queues a stop waits for (all but a network
    /// device's receive queues); a receive queue completed in order so far
    /// hands its buffers back unused. Then the device is reset. If a queue
    /// is still busy and was completed out of order, the device is left
    /// running on the guest's rings and the error says which.
    fn stop_direct(
        &self,
        a: &mut Active<B, M>,
        try_suspend: bool,
    ) -> Result<Vec<(u16, QueuePosition)>> {
        let idx = self.detach_direct(a)?;
        let mut suspended = try_suspend && self.suspendable() && {
            match self.backend.with(|b| b.suspend())? {
                Ok(()) => true,
                Err(e) => {
                    log::warn!(
                        "{}: suspend failed ({e}); waiting for the device instead",
                        self.name
                    );
                    false
                }
            }
        };
        if !suspended {
            self.backend.with(|b| {
                for &q in &idx {
                    // Whatever the guest published before: the device sees it.
                    let _ = b.kick(QueueIndex(q));
                }
            })?;
        }
        // Per queue, the used index up to which the device completed in
        // an order the rings can tell (all it was given, or in order), or
        // the queue still busy. Past the drain (at once when suspended) a
        // waited queue completed in order is stopped with its requests
        // (offered again).
        let start = std::time::Instant::now();
        let mut state = self.stop_marks(a, suspended);
        if suspended && matches!(state, Ok(Err(_))) {
            // Suspended with requests outstanding out of order (virtio's
            // "finish what it holds" is a should; vhost-vdpa promises
            // nothing): run it again and wait as for any device.
            log::warn!(
                "{}: suspended with requests outstanding; waiting for it instead",
                self.name
            );
            if let Err(e) = self.backend.with(|b| b.resume())? {
                log::warn!("{}: resume after the suspend failed: {e}", self.name);
            }
            suspended = false;
        }
        if !suspended {
            while matches!(state, Ok(Err(_))) && start.elapsed() < release::DRAIN {
                std::thread::sleep(std::time::Duration::from_millis(1));
                state = self.stop_marks(a, false);
            }
            if matches!(state, Ok(Err(_))) {
                state = self.stop_marks(a, true);
            }
        }
        let marks = match state {
            Ok(Ok(m)) => m,
            other => {
                let why = match other {
                    Ok(Err((q, n))) => format!(
                        "queue {q}: the device still holds {n} request(s) after {:?}, \
                         completed out of order",
                        release::DRAIN
                    ),
                    Err(e) => e.to_string(),
                    Ok(Ok(_)) => unreachable!(),
                };
                // Back to running directly.
                self.rewire_direct(a)?;
                return Err(Error::Shadow(format!("cannot stop the device: {why}")));
            }
        };
        let reset = self.backend.with(|b| b.reset())?;
        // Completions on a vector the relay fanned out raised nothing since
        // the relay stopped: one interrupt per queue lets the guest see
        // them (a spurious one costs it a look at its used ring).
        for &q in &idx {
            if let Err(e) = a.interrupt.trigger(InterruptType::Queue(q)) {
                log::warn!(
                    "{}: queue {q}: interrupt after the stop failed: {e}",
                    self.name
                );
            }
        }
        // Stopped (or not even resettable): the guest's rings can no longer
        // be driven directly. Without positions a resume refuses to run.
        a.run = Run::Paused(Vec::new());
        if let Err(e) = reset {
            return Err(backend_err("reset")(e));
        }
        self.positions_from(a, &marks)
    }

    /// Stop the direct relay (if any) and detach the guest's kicks from
    /// the device (they collect in their eventfds); the queue indices.
    fn detach_direct(&self, a: &mut Active<B, M>) -> Result<Vec<u16>> {
        if let Run::Direct(Some(r)) = &mut a.run {
            r.stop();
        }
        a.run = Run::Direct(None);
        let idx = a.indices();
        self.backend.with(|b| {
            for &q in &idx {
                if let Err(e) = b.set_vring_kick(QueueIndex(q), None) {
                    log::debug!("{}: detaching queue {q}'s kick: {e}", self.name);
                }
            }
        })?;
        // Control commands published without a kick yet.
        if let Some((ci, w)) = &self.control {
            if let Some((_, q, _)) = a.queues.iter().find(|(i, _, _)| *i == usize::from(*ci)) {
                net_ctrl::lock(w).catch_up(q, &*a.mem.memory());
            }
        }
        Ok(idx)
    }

    /// Per queue of a device stopped taking requests, the used index up
    /// to which it completed what it was given in available order, or
    /// `Err((queue, outstanding))` for the first queue still busy: one
    /// with outstanding requests among the queues a stop waits for
    /// (unless `late`), or completed out of order with some outstanding.
    #[allow(clippy::type_complexity)]
    fn stop_marks(
        &self,
        a: &Active<B, M>,
        late: bool,
    ) -> Result<std::result::Result<Vec<u16>, (u16, usize)>> {
        let (acked, dt, nq) = (self.acked, self.device_type, a.queues.len());
        let m = a.mem.memory();
        let mut marks = Vec::with_capacity(nq);
        for (i, q, _) in &a.queues {
            let i = u16::try_from(*i).unwrap_or(u16::MAX);
            let (avail, used, held) = shadow::guest_in_flight(q, &*m)
                .map_err(|e| Error::Shadow(format!("queue {i}: {e}")))?;
            let busy = if shadow::waited(dt, i, nq, acked) && !late {
                avail != used
            } else {
                held.is_none()
            };
            if busy {
                return Ok(Err((i, usize::from(avail.wrapping_sub(used)))));
            }
            marks.push(used);
        }
        Ok(Ok(marks))
    }

    /// Where each queue stands once the device stopped, from the marks of
    /// [`stop_marks`](Self::stop_marks).
    fn positions_from(&self, a: &Active<B, M>, marks: &[u16]) -> Result<Vec<(u16, QueuePosition)>> {
        let m = a.mem.memory();
        let mut positions = Vec::with_capacity(marks.len());
        for ((i, q, _), &mark) in a.queues.iter().zip(marks) {
            let i = u16::try_from(*i).unwrap_or(u16::MAX);
            let p = shadow::held_since(q, &*m, mark).map_err(|e| {
                Error::Shadow(format!("queue {i}: which requests the device held: {e}"))
            })?;
            positions.push((i, p));
        }
        Ok(positions)
    }

    /// Whether the backend can suspend the device (and the bridge
    /// negotiated what that takes).
    fn suspendable(&self) -> bool {
        self.backend
            .with(|b| b.backend_caps().suspend)
            .unwrap_or(false)
    }

    /// Pause a device running on the guest's rings by suspending it: its
    /// kicks are detached, it finishes what it holds and stops, and stays
    /// on the guest's rings. Where each queue stands is computed for a
    /// state (when the device could run shadowed). On an error the device
    /// runs directly again (or stays stopped if it cannot be resumed) and
    /// the caller falls back to a stop with a reset.
    fn suspend_direct(&self, a: &mut Active<B, M>) -> Result<Option<Vec<(u16, QueuePosition)>>> {
        let idx = self.detach_direct(a)?;
        if let Err(e) = self.backend.with(|b| b.suspend())? {
            // A device that set DEVICE_NEEDS_RESET or never suspended is
            // wired again; the fallback stops it with a reset.
            self.rewire_direct(a)?;
            return Err(backend_err("suspend")(e));
        }
        // What it finished while suspending raised nothing on a vector
        // the stopped relay fanned out: one interrupt per queue.
        for &q in &idx {
            if let Err(e) = a.interrupt.trigger(InterruptType::Queue(q)) {
                log::warn!(
                    "{}: queue {q}: interrupt after the suspend failed: {e}",
                    self.name
                );
            }
        }
        if self.shadow_possible().is_err() {
            return Ok(None);
        }
        match self.stop_marks(a, true) {
            Ok(Ok(marks)) => Ok(Some(self.positions_from(a, &marks)?)),
            other => {
                let why = match other {
                    Ok(Err((q, n))) => format!(
                        "queue {q}: suspended with {n} request(s) outstanding, completed out of order"
                    ),
                    Err(e) => e.to_string(),
                    Ok(Ok(_)) => unreachable!(),
                };
                if let Err(e) = self.backend.with(|b| b.resume())? {
                    log::error!(
                        "{}: resume after an unusable suspend failed: {e}",
                        self.name
                    );
                }
                self.rewire_direct(a)?;
                Err(Error::Shadow(format!("suspended device: {why}")))
            }
        }
    }

    /// Wire kicks and interrupts for the guest's rings again (a stop that
    /// could not be done).
    fn rewire_direct(&self, a: &mut Active<B, M>) -> Result<()> {
        let qidx = a.indices();
        let mut wiring = Wiring::default();
        let relay = self.backend.with(|b| -> Result<Option<Relay>> {
            let irqs = activate::wire_interrupts(b, &a.interrupt, &qidx, &mut wiring)?;
            let kicks = activate::wire_kicks(
                b,
                &a.queues,
                &qidx,
                self.opts.kick,
                self.acked,
                self.control.as_ref(),
                &mut wiring,
            )?;
            let plan = RelayPlan {
                kicks,
                irqs,
                mem: a.mem.clone(),
                interrupt: a.interrupt.clone(),
            };
            if plan.is_empty() {
                return Ok(None);
            }
            Ok(Some(Relay::start(
                plan,
                self.name.clone(),
                self.thread_hook.clone(),
            )?))
        })??;
        // Kicks that came while they were detached.
        for (_, _, kick) in &a.queues {
            let _ = kick.write(1);
        }
        a.wiring = wiring;
        a.run = Run::Direct(relay);
        Ok(())
    }

    /// How the active device's data path runs (`None` when not active).
    pub fn data_path(&self) -> Option<DataPath> {
        self.active.as_ref().map(|a| match a.run {
            Run::Direct(_) => DataPath::Direct,
            Run::Shadow(_) => DataPath::Shadow,
            Run::Paused(_) | Run::Suspended(_) => DataPath::Paused,
        })
    }

    /// Stop the device: after this returns it does no DMA into guest
    /// memory and raises no interrupt until [`BridgeDevice::resume`].
    ///
    /// A device that can be suspended (VIRTIO_F_SUSPEND, which the bridge
    /// negotiates itself and never offers to the guest, or vhost-vdpa's
    /// suspend) is suspended: it finishes what it holds and stops, and a
    /// device on the guest's rings stays on them (it resumes there, at
    /// full speed). Any other device is given at most [`release::DRAIN`]
    /// to finish what it holds, then reset; requests it still held are
    /// offered again at resume (a virtio-blk request may then run twice:
    /// see docs/migration.md for why that is safe). A device on the
    /// guest's rings then resumes on shadow rings (a plain virtio-pci
    /// device cannot restart at a ring index other than 0) until the
    /// guest resets it.
    ///
    /// A device that could not run again on shadow rings (behind a
    /// vIOMMU, packed rings) and cannot be suspended is not stopped: it keeps running with a
    /// warning, as a VMM leaves a passthrough device, and
    /// [`BridgeDevice::state`] says why it has no state. A VMM that
    /// mapped the doorbells into its guest must remove that mapping
    /// first.
    ///
    /// # Errors
    ///
    /// The device could not be stopped: it kept requests completed out of
    /// order past the drain (it then keeps running), or its reset failed.
    pub fn pause(&mut self) -> Result<PauseReport> {
        let start = std::time::Instant::now();
        let direct = matches!(self.active.as_ref().map(|a| &a.run), Some(Run::Direct(_)));
        let suspendable = direct && self.suspendable();
        if direct && !suspendable {
            if let Err(e) = self.shadow_possible() {
                // It could not be run again: leave it running, as a VMM
                // leaves a passthrough device, and say so.
                log::warn!(
                    "{}: not stopped while the VM is paused (it keeps its DMA): {e}",
                    self.name
                );
                return Ok(PauseReport::default());
            }
        }
        let Some(mut a) = self.active.take() else {
            return Ok(PauseReport::default());
        };
        if suspendable {
            match self.suspend_direct(&mut a) {
                Ok(p) => {
                    a.run = Run::Suspended(p);
                    self.active = Some(a);
                    let r = PauseReport {
                        took: start.elapsed(),
                        held: Vec::new(),
                    };
                    log::info!(
                        "{}: suspended in {:?} on the guest's rings",
                        self.name,
                        r.took
                    );
                    return Ok(r);
                }
                Err(e) => {
                    if let Err(why) = self.shadow_possible() {
                        log::warn!(
                            "{}: not stopped while the VM is paused (suspend failed: {e}; \
                             it keeps its DMA): {why}",
                            self.name
                        );
                        self.active = Some(a);
                        return Ok(PauseReport::default());
                    }
                    log::warn!("{}: {e}; stopping it with a reset instead", self.name);
                }
            }
        }
        let result = match std::mem::replace(&mut a.run, Run::Direct(None)) {
            Run::Paused(p) => Ok(p),
            Run::Suspended(p) => {
                a.run = Run::Suspended(p);
                self.active = Some(a);
                return Ok(PauseReport::default());
            }
            Run::Direct(relay) => {
                a.run = Run::Direct(relay);
                // Not suspended again when that just failed.
                self.stop_direct(&mut a, !suspendable)
            }
            Run::Shadow(s) => {
                let mut stopped = s.stop();
                // A suspended device finished what it took; the rest of
                // what the relay offered it stays for the resume.
                let suspended = self.suspendable()
                    && match self.backend.with(|b| b.suspend()) {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => {
                            log::warn!("{}: suspend failed ({e}); draining instead", self.name);
                            false
                        }
                        Err(_) => false,
                    };
                let (dt, nq, acked) = (self.device_type, a.queues.len(), self.acked);
                let limit = if suspended {
                    std::time::Duration::ZERO
                } else {
                    shadow::PAUSE_DRAIN
                };
                stopped.drain(|q| shadow::waited(dt, q, nq, acked), limit);
                let reset = self.backend.with(|b| b.reset());
                // The rings are unmapped (or kept) here: a device that
                // could not be reset loses access to them.
                let p = stopped.finish();
                match reset {
                    Ok(Ok(())) => Ok(p),
                    Ok(Err(e)) => {
                        a.run = Run::Paused(p);
                        Err(backend_err("reset")(e))
                    }
                    Err(e) => {
                        a.run = Run::Paused(p);
                        Err(e)
                    }
                }
            }
        };
        let out = match result {
            Ok(p) => {
                let held = p
                    .iter()
                    .filter(|(_, p)| !p.in_flight.is_empty())
                    .map(|(q, p)| (*q, p.in_flight.len()))
                    .collect();
                a.run = Run::Paused(p);
                let r = PauseReport {
                    took: start.elapsed(),
                    held,
                };
                log::info!(
                    "{}: paused in {:?}; held for resume {:?}",
                    self.name,
                    r.took,
                    r.held
                );
                Ok(r)
            }
            Err(e) => Err(e),
        };
        self.active = Some(a);
        out
    }

    /// Run a paused device again: a suspended one on the guest's rings
    /// (unless dirty logging needs it shadowed), any other on shadow
    /// rings, offering first what it held. Does nothing when not paused.
    ///
    /// # Errors
    ///
    /// Programming the device failed; it stays paused (reset) and a later
    /// call tries again.
    pub fn resume(&mut self) -> Result<()> {
        let Some(mut a) = self.active.take() else {
            return Ok(());
        };
        let r = match std::mem::replace(&mut a.run, Run::Direct(None)) {
            Run::Suspended(p) if !self.logging => match self.resume_direct(&mut a) {
                Ok(()) => Ok(()),
                Err(e) => {
                    log::warn!("{}: resuming on the guest's rings failed: {e}", self.name);
                    self.restart_shadowed(&mut a, p, true)
                }
            },
            Run::Suspended(p) => self.restart_shadowed(&mut a, p, true),
            Run::Paused(p) => self.restart_shadowed(&mut a, Some(p), false),
            other => {
                a.run = other;
                Ok(())
            }
        };
        self.active = Some(a);
        r
    }

    /// A suspended device runs on the guest's rings again: resumed, its
    /// kicks and interrupts wired (kicks that came meanwhile delivered).
    fn resume_direct(&self, a: &mut Active<B, M>) -> Result<()> {
        let t = std::time::Instant::now();
        self.backend
            .with(|b| b.resume())?
            .map_err(backend_err("resume"))?;
        self.rewire_direct(a)?;
        log::info!(
            "{}: resumed on the guest's rings in {:?}",
            self.name,
            t.elapsed()
        );
        Ok(())
    }

    /// Run the device on shadow rings from `positions`, reset first if
    /// `suspended` (none: it cannot be; it stays paused and the error says
    /// why).
    fn restart_shadowed(
        &self,
        a: &mut Active<B, M>,
        positions: Option<Vec<(u16, QueuePosition)>>,
        suspended: bool,
    ) -> Result<()> {
        let Some(p) = positions else {
            if let Ok(Err(r)) = self.backend.with(|b| b.reset()) {
                log::error!("{}: reset of a device that cannot resume: {r}", self.name);
            }
            a.run = Run::Paused(Vec::new());
            return match self.shadow_possible() {
                Err(e) => Err(e),
                Ok(()) => Err(Error::Shadow("where the queues stand is not known".into())),
            };
        };
        let reset = if suspended {
            self.backend
                .with(|b| b.reset())?
                .map_err(backend_err("reset"))
        } else {
            Ok(())
        };
        let started = reset.and_then(|()| self.start_shadow(a, p.clone()));
        match started {
            Ok(s) => {
                a.run = Run::Shadow(s);
                Ok(())
            }
            Err(e) => {
                if let Ok(Err(r)) = self.backend.with(|b| b.reset()) {
                    log::error!(
                        "{}: reset after a failed start on shadow rings: {r}",
                        self.name
                    );
                }
                a.run = Run::Paused(p);
                Err(e)
            }
        }
    }

    /// Start recording the guest pages the device writes: a running
    /// device moves to shadow rings now (it is stopped and its held
    /// requests offered again there), a later activation starts on them.
    /// The log starts clean.
    ///
    /// # Errors
    ///
    /// Behind a vIOMMU, with packed rings, or when the device cannot be
    /// stopped (it then keeps running directly and nothing is logged).
    pub fn start_dirty_log(&mut self) -> Result<()> {
        self.shadow_possible()?;
        // Memory the VMM added since (it may map guest memory itself).
        self.log.cover(&*self.dma.guest_memory().memory());
        self.log.take();
        self.logging = true;
        let Some(mut a) = self.active.take() else {
            return Ok(());
        };
        let r = match std::mem::replace(&mut a.run, Run::Direct(None)) {
            Run::Direct(relay) => {
                a.run = Run::Direct(relay);
                match self.stop_direct(&mut a, true) {
                    // On an error it stays stopped: a resume tries again.
                    Ok(p) => self.restart_shadowed(&mut a, Some(p), false),
                    Err(e) => Err(e),
                }
            }
            other => {
                a.run = other;
                Ok(())
            }
        };
        if r.is_err() {
            self.logging = false;
        }
        self.active = Some(a);
        r
    }

    /// Stop recording (the device stays on shadow rings).
    pub fn stop_dirty_log(&mut self) {
        self.logging = false;
    }

    /// The guest pages the device may have written since the last call
    /// (or since [`BridgeDevice::start_dirty_log`]), 4 KiB-granular,
    /// merged and ascending; the log is cleared. Answers after a pause
    /// and a snapshot too.
    pub fn dirty_log(&self) -> Vec<DirtyRange> {
        let outside = self.log.outside();
        if outside > 0 {
            log::warn!(
                "{}: {outside} device write(s) outside guest memory were not logged",
                self.name
            );
        }
        self.log.take()
    }

    /// The device's state, for a snapshot or a migration: only while
    /// paused (or not active).
    ///
    /// # Errors
    ///
    /// [`Error::NotPaused`] while the device runs.
    pub fn state(&self) -> Result<DeviceState> {
        let queues = match &self.active {
            None => Vec::new(),
            Some(Active {
                run: Run::Paused(p) | Run::Suspended(Some(p)),
                queues,
                ..
            }) if !p.is_empty() || queues.is_empty() => queues
                .iter()
                .filter_map(|(i, q, _)| {
                    let index = u16::try_from(*i).ok()?;
                    let position = p.iter().find(|(k, _)| *k == index)?.1.clone();
                    Some(QueueState {
                        index,
                        size: q.size(),
                        rings: [q.desc_table(), q.avail_ring(), q.used_ring()],
                        position,
                    })
                })
                .collect(),
            Some(Active {
                run: Run::Paused(_),
                ..
            }) => {
                return Err(Error::Shadow(
                    "the device was stopped without knowing where its queues stand \
                     (its stop or resume failed); it has no state"
                        .into(),
                ))
            }
            Some(_) => {
                // A device that cannot be stopped says why.
                self.shadow_possible()?;
                return Err(Error::NotPaused);
            }
        };
        let net_control = self
            .control
            .as_ref()
            .map(|(_, w)| net_ctrl::lock(w).state.clone());
        Ok(DeviceState {
            // Version 1 when there is nothing version 2 added: an older
            // bridge takes it.
            version: if net_control.is_some() {
                STATE_VERSION
            } else {
                1
            },
            device_type: self.device_type,
            acked_features: self.acked,
            config_writes: self.config_writes.clone(),
            queues,
            net_control,
        })
    }

    /// Take a saved state before activation: the device must be of the
    /// same type, offer every negotiated feature and have the queues the
    /// state names, each at least as large. The guest's config writes are
    /// replayed when the device starts; the next activation stays paused
    /// until [`BridgeDevice::resume`], which runs the device on shadow
    /// rings and offers first what the device held.
    ///
    /// # Errors
    ///
    /// [`Error::Restore`] naming what does not match; nothing changes
    /// then.
    pub fn restore(&mut self, state: &DeviceState) -> Result<()> {
        if state.version != STATE_VERSION && state.version != 1 {
            return Err(Error::Restore(format!(
                "state version {}, this bridge reads versions 1 to {STATE_VERSION}",
                state.version
            )));
        }
        if self.active.is_some() {
            return Err(Error::AlreadyActive);
        }
        if state.device_type != self.device_type {
            return Err(Error::Restore(format!(
                "the state is of a virtio device of type {}, this device is of type {}",
                state.device_type, self.device_type
            )));
        }
        let missing = state.acked_features & !self.offered;
        if missing != 0 {
            let bits: Vec<String> = (0..64)
                .filter(|b| missing & (1u64 << b) != 0)
                .map(|b| b.to_string())
                .collect();
            return Err(Error::Restore(format!(
                "this device does not offer the negotiated feature bit(s) {} ({missing:#x})",
                bits.join(", ")
            )));
        }
        for q in &state.queues {
            let Some(&max) = self.queue_max_sizes.get(usize::from(q.index)) else {
                return Err(Error::Restore(format!(
                    "queue {}: this device has {} queue(s)",
                    q.index,
                    self.queue_max_sizes.len()
                )));
            };
            if q.size > max {
                return Err(Error::Restore(format!(
                    "queue {}: size {} above this device's maximum {max}",
                    q.index, q.size
                )));
            }
            if q.position.in_flight.len() > usize::from(q.size) {
                return Err(Error::Restore(format!(
                    "queue {}: {} requests in flight in a queue of {}",
                    q.index,
                    q.position.in_flight.len(),
                    q.size
                )));
            }
        }
        if !state.queues.is_empty() {
            self.shadow_possible_for(state.acked_features)?;
        }
        if let Some(nc) = &state.net_control {
            nc.check().map_err(Error::Restore)?;
        }
        self.acked = state.acked_features;
        self.config_writes = state.config_writes.clone();
        self.restored_control = state.net_control.clone();
        self.restored = (!state.queues.is_empty()).then(|| state.queues.clone());
        Ok(())
    }

    /// Let another process open the device (a migration on the same host,
    /// where the destination takes the very device this one used): only
    /// while paused or not active. The DMA mappings are removed (and kept
    /// in mind) and the backend dropped, which closes the device; the
    /// paused state stays. [`BridgeDevice::reacquire`] takes it back (a
    /// failed migration); otherwise everything but [`BridgeDevice::state`],
    /// `reset` and DMA unmaps fails with [`Error::Released`].
    ///
    /// # Errors
    ///
    /// [`Error::NotPaused`] while the device runs.
    pub fn hand_over(&mut self) -> Result<()> {
        if let Some(a) = self.active.as_mut() {
            match std::mem::replace(&mut a.run, Run::Paused(Vec::new())) {
                Run::Suspended(Some(p)) => a.run = Run::Paused(p),
                Run::Suspended(None) => {
                    a.run = Run::Suspended(None);
                    self.shadow_possible()?;
                    return Err(Error::NotPaused);
                }
                other @ (Run::Direct(_) | Run::Shadow(_)) => {
                    a.run = other;
                    return Err(Error::NotPaused);
                }
                other => a.run = other,
            }
        }
        if self.backend.is_released() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let maps = self.dma.mappings();
        self.dma.unmap_all();
        drop(self.backend.take());
        self.dma.forget_all();
        log::info!(
            "{}: handed over in {:?} ({} DMA mapping(s) to restore if taken back)",
            self.name,
            t.elapsed(),
            maps.len()
        );
        self.handed_over = Some(maps);
        Ok(())
    }

    /// Whether the device was handed over and not taken back.
    pub fn is_handed_over(&self) -> bool {
        self.handed_over.is_some()
    }

    /// Take the device back after [`BridgeDevice::hand_over`]: `backend`
    /// (opened again) must be a device of the same type offering every
    /// feature offered before, with the same queues. It is reset, the DMA
    /// mappings are made again, and the device stays paused:
    /// [`BridgeDevice::resume`] runs it.
    ///
    /// # Errors
    ///
    /// Not handed over, another device, or a mapping failed (the backend
    /// is then dropped again and a later call may retry).
    pub fn reacquire(&mut self, mut backend: B) -> Result<()> {
        let Some(maps) = self.handed_over.clone() else {
            return Err(Error::Restore("the device was not handed over".into()));
        };
        if backend.device_id() != self.device_type {
            return Err(Error::Restore(format!(
                "the device taken back is of type {}, not {}",
                backend.device_id(),
                self.device_type
            )));
        }
        let missing = self.offered & !backend.device_features();
        if missing != 0 || usize::from(backend.num_queues()) < self.queue_max_sizes.len() {
            return Err(Error::Restore(format!(
                "the device taken back lacks features {missing:#x} or queues ({} < {})",
                backend.num_queues(),
                self.queue_max_sizes.len()
            )));
        }
        backend.reset().map_err(backend_err("reset"))?;
        self.backend.put(backend);
        for &(iova, gpa, size) in &maps {
            if let Err(e) = self.dma.map(iova, gpa, size) {
                self.dma.unmap_all();
                drop(self.backend.take());
                self.dma.forget_all();
                return Err(e);
            }
        }
        self.handed_over = None;
        log::info!("{}: taken back ({} DMA mapping(s))", self.name, maps.len());
        Ok(())
    }

    fn shadow_possible_for(&self, acked: u64) -> Result<()> {
        if acked & features::bit(features::RING_PACKED) != 0 {
            return Err(Error::Restore(
                "the state has packed rings; shadow virtqueues need split rings".into(),
            ));
        }
        if self.translation.is_some() {
            return Err(Error::Restore(
                "shadow virtqueues are not supported behind a vIOMMU".into(),
            ));
        }
        Ok(())
    }

    /// The steps of activation (see the `activate` module), with the
    /// backend locked throughout.
    fn try_activate(
        &self,
        b: &mut B,
        mem: GuestMemoryAtomic<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: &[QueueArg],
    ) -> Result<(Option<Relay>, Wiring)> {
        let acked = self.acked;
        let qidx = activate::check_queues(queues, &self.queue_max_sizes, acked)?;
        // Guest-physical ring addresses: without a vIOMMU, or translated.
        if !self.opts.iommu || self.translation.is_some() {
            activate::check_rings(queues, &*mem.memory(), acked)?;
        }
        activate::negotiate(b, acked)?;
        activate::program_queues(b, queues, &qidx, acked, self.translation.as_ref())?;
        let mut wiring = Wiring::default();
        // Everything detached first: what the wiring below attaches stays
        // (a relayed queue's own kick eventfd on vhost-vdpa included).
        activate::detach_unused(b, &qidx, &Wiring::default())?;
        let irqs = activate::wire_interrupts(b, &interrupt, &qidx, &mut wiring)?;
        let kicks = activate::wire_kicks(
            b,
            queues,
            &qidx,
            self.opts.kick,
            acked,
            self.control.as_ref(),
            &mut wiring,
        )?;
        activate::enable_queues(b, &qidx)?;
        let relay_plan = RelayPlan {
            kicks,
            irqs,
            mem,
            interrupt,
        };
        let relay = if relay_plan.is_empty() {
            None
        } else {
            Some(Relay::start(
                relay_plan,
                self.name.clone(),
                self.thread_hook.clone(),
            )?)
        };
        activate::driver_ok(b)?;
        log::info!(
            "activated: {} queues, kicks direct {:?} relayed {:?}, irqs direct {} relayed {}",
            qidx.len(),
            wiring.direct_kicks,
            wiring.relayed_kicks,
            wiring.direct_irqs.len(),
            wiring.relayed_irqs.len()
        );
        Ok((relay, wiring))
    }

    /// Virtio reset (status 0): stop the relay, reset the device, forget
    /// acked features. The device can be activated again afterwards.
    pub fn reset(&mut self) -> Result<()> {
        let shadow = self.active.take().and_then(|mut a| match a.run {
            Run::Direct(Some(ref mut r)) => {
                r.stop();
                None
            }
            Run::Shadow(s) => Some(s.stop()),
            _ => None,
        });
        if let Some(mut o) = self.orphan.take() {
            o.stop();
        }
        self.acked = 0;
        self.config_writes.clear();
        self.restored = None;
        // The guest's driver starts over: the device forgets what the
        // control queue set, and so does the bridge.
        self.control = None;
        self.restored_control = None;
        let r = match self.backend.with(|b| b.reset()) {
            // A released device has nothing left to reset: the guest's
            // driver resets it on its way out, which must not fail.
            Err(Error::Released) => Ok(()),
            r => r?.map_err(backend_err("reset")),
        };
        // The shadow rings go once the device cannot use them.
        drop(shadow);
        self.backend.retry_kept();
        r
    }

    /// Whether the device was released to the host.
    pub fn is_released(&self) -> bool {
        self.backend.is_released()
    }

    /// A duplicate of the eventfd the host signals when it wants the
    /// device back (see [`VdpaOps::removal_request`]); watch it with
    /// [`crate::RemovalWatch`] and then call [`BridgeDevice::release`].
    /// `None` when the backend has no such signal or was released.
    pub fn removal_request(&self) -> Option<EventFd> {
        self.backend
            .with(|b| b.removal_request().map(EventFd::try_clone))
            .ok()
            .flatten()
            .and_then(|r| {
                r.map_err(|e| log::warn!("cannot duplicate the removal request eventfd: {e}"))
                    .ok()
            })
    }

    /// Give the device back to the host, now (an ordered removal asked for
    /// it: see the `release` module). Kicks stop reaching the device; the
    /// device gets at most [`release::DRAIN`] to finish the requests it
    /// was given; it is reset, its DMA mappings removed and the backend
    /// dropped, which closes it (for VFIO: the host's removal goes on).
    /// From then on the guest's new requests are answered with an error
    /// where the device type defines one, and everything else of this
    /// device fails with [`Error::Released`], except [`reset`], which
    /// succeeds. Releasing twice does nothing.
    ///
    /// A VMM that mapped the device's doorbells into its guest
    /// ([`BridgeDevice::guest_notify_mapping`]) must remove that mapping
    /// first: it points into the device's BAR, which goes away here.
    ///
    /// [`reset`]: BridgeDevice::reset
    pub fn release(&mut self) -> ReleaseReport {
        let mut report = ReleaseReport::default();
        if self.backend.is_released() {
            return report;
        }
        let who = self.name.clone();
        let mut orphans = Vec::new();
        let mut answering = None;
        if let Some(mut a) = self.active.take() {
            // On shadow rings or paused the bridge knows which requests
            // the device holds: stop it, let it finish (bounded), and
            // answer from where each queue then stands.
            let positions = match std::mem::replace(&mut a.run, Run::Direct(None)) {
                Run::Direct(Some(mut r)) => {
                    r.stop();
                    None
                }
                Run::Direct(None) => None,
                Run::Shadow(s) => {
                    let mut stopped = s.stop();
                    let (dt, nq, acked) = (self.device_type, a.queues.len(), self.acked);
                    report.drained_in = stopped.drain(
                        |q| release::answer_for(dt, q, nq, acked).is_some(),
                        release::DRAIN,
                    );
                    if let Ok(Err(e)) = self.backend.with(|b| b.reset()) {
                        log::error!("{who}: reset at release failed: {e}");
                    }
                    Some(stopped.finish())
                }
                Run::Paused(p) | Run::Suspended(Some(p)) => Some(p),
                Run::Suspended(None) => None,
            };
            if let Some(p) = positions {
                self.release_positions(&mut report, a, p, &mut orphans, &mut answering);
                return self.finish_release(report, orphans, answering);
            }
            // No guest kick reaches the device any more.
            let _ = self.backend.with(|b| {
                for (i, _, _) in &a.queues {
                    if let Ok(q) = u16::try_from(*i) {
                        if let Err(e) = b.set_vring_kick(QueueIndex(q), None) {
                            log::debug!("{who}: detaching queue {q}'s kick: {e}");
                        }
                    }
                }
            });
            let nq = a.queues.len();
            let acked = self.acked;
            let answers: Vec<_> = a
                .queues
                .iter()
                .map(|(i, _, _)| {
                    u16::try_from(*i).ok().and_then(|q| {
                        release::answer_for(self.device_type, q, nq, acked).map(|x| (q, x))
                    })
                })
                .collect();
            let watched: Vec<(u16, &Queue)> = a
                .queues
                .iter()
                .zip(&answers)
                .filter_map(|((_, q, _), ans)| ans.map(|(i, _)| (i, q)))
                .collect();
            let (unfinished, waited) = release::drain(&watched, &a.mem);
            report.unfinished = unfinished;
            report.drained_in = waited;
            if let Ok(Err(e)) = self.backend.with(|b| b.reset()) {
                log::error!("{who}: reset at release failed: {e}");
            }
            // Completions during the drain on a vector the relay fanned
            // out reached the used ring but raised nothing (the relay was
            // stopped first): one interrupt per queue lets the guest see
            // them, or its driver waits for them forever. A spurious one
            // costs the guest a look at its used ring.
            for (i, _, _) in &a.queues {
                if let Ok(q) = u16::try_from(*i) {
                    if let Err(e) = a.interrupt.trigger(InterruptType::Queue(q)) {
                        log::warn!("{who}: queue {q}: interrupt after the drain failed: {e}");
                    }
                }
            }
            let event_idx = acked & features::bit(features::RING_EVENT_IDX) != 0;
            let mem = a.mem.memory();
            for ((_, mut queue, kick), ans) in a.queues.drain(..).zip(answers) {
                let Some((index, answer)) = ans else { continue };
                // Behind a vIOMMU the descriptors hold the guest's IOVAs
                // (indirect tables too), which virtio-queue would read as
                // guest-physical: answering could write into the wrong
                // page, so the requests stay pending there.
                if self.translation.is_some() {
                    continue;
                }
                if report.unfinished.iter().any(|&(u, _)| u == index) {
                    continue;
                }
                match release::continue_after_device(&mut queue, &*mem, event_idx) {
                    Ok(()) => orphans.push(OrphanQueue {
                        index,
                        queue,
                        kick,
                        answer,
                    }),
                    Err(e) => log::warn!("{who}: queue {index} left pending: {e}"),
                }
            }
            drop(mem);
            answering = Some((a.mem, a.interrupt));
        }
        self.finish_release(report, orphans, answering)
    }

    /// The orphan queues of a device stopped on shadow rings or paused:
    /// a queue whose device held requests is left alone.
    fn release_positions(
        &self,
        report: &mut ReleaseReport,
        mut a: Active<B, M>,
        positions: Vec<(u16, QueuePosition)>,
        orphans: &mut Vec<OrphanQueue>,
        answering: &mut Option<(GuestMemoryAtomic<M>, Arc<dyn VirtioInterrupt>)>,
    ) {
        let nq = a.queues.len();
        let event_idx = self.acked & features::bit(features::RING_EVENT_IDX) != 0;
        for (i, mut queue, kick) in a.queues.drain(..) {
            let Ok(index) = u16::try_from(i) else {
                continue;
            };
            let Some(answer) = release::answer_for(self.device_type, index, nq, self.acked) else {
                continue;
            };
            let Some((_, p)) = positions.iter().find(|(q, _)| *q == index) else {
                continue;
            };
            if !p.in_flight.is_empty() {
                report.unfinished.push((index, p.in_flight.len() as u16));
                continue;
            }
            queue.set_next_avail(p.next_avail);
            queue.set_next_used(p.next_used);
            queue.set_event_idx(event_idx);
            orphans.push(OrphanQueue {
                index,
                queue,
                kick,
                answer,
            });
        }
        // Completions the stop delivered raised their interrupts already.
        *answering = Some((a.mem, a.interrupt));
    }

    fn finish_release(
        &mut self,
        mut report: ReleaseReport,
        orphans: Vec<OrphanQueue>,
        answering: Option<(GuestMemoryAtomic<M>, Arc<dyn VirtioInterrupt>)>,
    ) -> ReleaseReport {
        let who = self.name.clone();
        self.dma.unmap_all();
        // Dropping the backend closes the device.
        drop(self.backend.take());
        self.dma.forget_all();
        if let (false, Some((mem, interrupt))) = (orphans.is_empty(), answering) {
            let indices: Vec<u16> = orphans.iter().map(|o| o.index).collect();
            match Orphan::start(
                orphans,
                mem,
                interrupt,
                format!("{who}-orphan"),
                self.thread_hook.clone(),
            ) {
                Ok(o) => {
                    self.orphan = Some(o);
                    report.answered = indices;
                }
                Err(e) => log::error!("{who}: the guest's requests stay unanswered: {e}"),
            }
        }
        for &(q, n) in &report.unfinished {
            log::error!(
                "{who}: queue {q}: {n} request(s) unfinished after {:?}, left unanswered",
                release::DRAIN
            );
        }
        log::info!(
            "{who}: released to the host (device finished its requests in {:?}; answering queues {:?})",
            report.drained_in,
            report.answered
        );
        report
    }

    /// Where queue `q`'s doorbell can be mapped into the guest: only when
    /// the backend has a host mapping of it and its page holds nothing
    /// else, else `None` (the VMM then traps and forwards kicks).
    pub fn notification_area(&self, q: u16) -> Option<NotifyArea> {
        if usize::from(q) >= self.queue_max_sizes.len() {
            return None;
        }
        self.backend
            .with(|b| {
                if !b.backend_caps().notification_area {
                    return None;
                }
                let area = b.notification_area(QueueIndex(q)).ok()?;
                (area.page_exclusive && area.host_addr.is_some()).then_some(area)
            })
            .ok()
            .flatten()
    }
}

impl<B, M> BridgeDevice<B, M>
where
    B: VdpaOps + DmaMapper,
    M: GuestMemory,
{
    /// The device's doorbells as pages a VMM can map over its own
    /// virtio-pci notification area: that area is `area_len` bytes and the
    /// guest writes queue `q`'s doorbell at `q * multiplier` in it
    /// (Cloud Hypervisor: `notify_off_multiplier` 4, `queue_notify_off` =
    /// queue index, one 4 KiB area). The device's doorbell pages must hold
    /// nothing else and put every guest-visible queue's doorbell at that
    /// same offset (QEMU's virtio-pci devices do by default).
    ///
    /// Kicks written there reach the device directly: the guest writes the
    /// queue index (or, with VIRTIO_F_NOTIFICATION_DATA, the full
    /// notification) exactly as the device expects it, so no translation
    /// is lost. The mapping lives as long as this device; the VMM must
    /// remove it from the guest before dropping the device.
    ///
    /// # Errors
    ///
    /// [`NoNotifyMapping`] says why not; the VMM then keeps trapping
    /// kicks, which always works.
    pub fn guest_notify_mapping(
        &self,
        multiplier: u32,
        area_len: u64,
    ) -> std::result::Result<GuestNotifyMapping, NoNotifyMapping> {
        if self.opts.kick == KickPolicy::Relay {
            return Err(NoNotifyMapping::Relayed);
        }
        if self.opts.shadow == ShadowPolicy::Always {
            return Err(NoNotifyMapping::Shadowed);
        }
        const VIRTIO_ID_NET: u32 = 1;
        const CTRL_VQ: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
        if self.device_type == VIRTIO_ID_NET && self.offered & CTRL_VQ != 0 {
            return Err(NoNotifyMapping::ControlQueue);
        }
        let pages = self
            .backend
            .with(|b| b.notification_pages())
            .ok()
            .flatten()
            .ok_or(NoNotifyMapping::Backend)?;
        let mut need = 0;
        for q in 0..self.queue_max_sizes.len() {
            let queue = u16::try_from(q).unwrap_or(u16::MAX);
            let guest = u64::from(queue) * u64::from(multiplier);
            let device = pages
                .doorbells
                .get(q)
                .copied()
                .ok_or(NoNotifyMapping::Backend)?;
            if device != guest {
                return Err(NoNotifyMapping::Layout {
                    queue,
                    device,
                    guest,
                });
            }
            // Notification data doorbells are 4 bytes wide.
            need = need.max(guest + 4);
        }
        // Whole host pages: a VMM maps them into its guest with a memory
        // slot, which the host's page size aligns (64 KiB on some hosts,
        // more than Cloud Hypervisor's 4 KiB area: then no mapping).
        let page = pages.page_size.max(1);
        let len = need.next_multiple_of(page);
        if len == 0 {
            return Err(NoNotifyMapping::Backend);
        }
        if len > area_len || len > pages.len {
            return Err(NoNotifyMapping::TooLarge {
                need,
                have: area_len.min(pages.len),
            });
        }
        Ok(GuestNotifyMapping {
            host_addr: pages.host_addr,
            len,
        })
    }
}

impl<B: VdpaOps + DmaMapper, M: GuestMemory> Drop for BridgeDevice<B, M> {
    fn drop(&mut self) {
        // Stop the relay, quiesce the device, then take its DMA access away
        // while guest memory still exists (the shadow rings last).
        let shadow = self.active.take().and_then(|a| match a.run {
            Run::Shadow(s) => Some(s.stop()),
            _ => None,
        });
        self.orphan = None;
        if let Ok(Err(e)) = self.backend.with(|b| b.reset()) {
            log::warn!("reset on drop failed: {e}");
        }
        drop(shadow);
        self.backend.retry_kept();
        self.dma.unmap_all();
    }
}
