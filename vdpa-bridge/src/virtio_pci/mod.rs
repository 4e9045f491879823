//! The modern virtio-pci transport (virtio 1.2 §4.1), driver side.
//!
//! [`ModernTransport`] finds the virtio structures through the capability
//! list ([`caps`]), accesses them through typed windows ([`bar`]) whose
//! layout is declared once in [`regs`], and offers the transport verbs the
//! vDPA backend ([`crate::vp_vdpa`]) builds on. It is generic over
//! [`PciFunction`], so the same code drives a VFIO-claimed device and the
//! in-process emulated one.

pub mod bar;
pub mod caps;
pub mod regs;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ops::ConfigRange;
use crate::pci::{cfg, PciError, PciFunction, PciFunctionExt};
use crate::types::{features, status, QueueIndex, VringAddrs};

use bar::{BarError, BarWindow};
use caps::{CapError, CapRegion, VirtioCaps};
use regs::common;

/// How long [`ModernTransport::reset`] waits by default for status 0.
/// Devices reset in microseconds to milliseconds; one that takes longer is
/// escalated (bus mastering off, function-level reset) by the backend
/// rather than waited for, since the wait runs on a VMM's vCPU thread.
pub const DEFAULT_RESET_TIMEOUT: Duration = Duration::from_millis(500);

/// How often a device-config read is retried while `config_generation`
/// keeps changing.
pub const CONFIG_READ_RETRIES: usize = 64;

/// Errors of the virtio-pci transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Config-space access failed.
    #[error("PCI config space access failed")]
    Pci(#[source] PciError),
    /// The function is not a virtio device.
    #[error("vendor {vendor:#06x} device {device:#06x} is not a virtio device")]
    NotVirtio {
        /// PCI vendor id.
        vendor: u16,
        /// PCI device id.
        device: u16,
    },
    /// The function reads all-ones: it is gone (surprise removal) or dead.
    #[error("device reads all-ones: removed or not responding")]
    DeviceRemoved,
    /// The device reports more queues than any virtio transport allows.
    #[error("device reports {0} queues (at most {MAX_QUEUES} are accepted)")]
    TooManyQueues(u16),
    /// A legacy-only (virtio 0.9.5) device, which this driver does not drive.
    #[error("device {device:#06x} is legacy-only (no virtio 1.x capabilities); a modern device is required")]
    LegacyOnly {
        /// PCI device id.
        device: u16,
    },
    /// The capability list is unusable.
    #[error("invalid virtio capabilities")]
    Caps(#[from] CapError),
    /// A register access failed.
    #[error("register access failed")]
    Register(#[from] BarError),
    /// The device did not reach status 0 after a reset.
    #[error("device did not finish reset within {0:?}")]
    ResetTimeout(Duration),
    /// The device did not show a status change asked of it (suspend or
    /// resume) in time.
    #[error("device did not {what} within {waited:?} (status {status:#x})")]
    StatusTimeout {
        /// What was asked.
        what: &'static str,
        /// How long it was given.
        waited: Duration,
        /// The status it last showed.
        status: u8,
    },
    /// The device set DEVICE_NEEDS_RESET instead of doing what was asked.
    #[error("device could not {what}: it set DEVICE_NEEDS_RESET (status {status:#x})")]
    NeedsReset {
        /// What was asked.
        what: &'static str,
        /// The status it showed.
        status: u8,
    },
    /// The device cleared FEATURES_OK: it refused the driver's features.
    #[error("device refused features {0:#x} (FEATURES_OK not kept)")]
    FeaturesRefused(u64),
    /// `config_generation` kept changing.
    #[error("device config did not stabilise after {CONFIG_READ_RETRIES} reads")]
    ConfigUnstable,
    /// A queue index the device does not have.
    #[error("queue {0} does not exist")]
    NoSuchQueue(QueueIndex),
    /// A queue whose doorbell lies outside the notify structure.
    #[error("queue {queue}: notify offset {notify_off} * {multiplier} is outside the notify region of {len:#x} bytes")]
    NotifyOutOfRange {
        /// Queue.
        queue: QueueIndex,
        /// `queue_notify_off`.
        notify_off: u16,
        /// `notify_off_multiplier`.
        multiplier: u32,
        /// Length of the notify region.
        len: u64,
    },
    /// The device did not accept an MSI-X vector.
    #[error("device refused MSI-X vector {vector} for {what}")]
    VectorRefused {
        /// What the vector was for.
        what: &'static str,
        /// The vector.
        vector: u16,
    },
}

/// Result alias of the transport.
pub type Result<T> = std::result::Result<T, TransportError>;

/// Facts read once at probe time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeInfo {
    /// PCI vendor id.
    pub vendor_id: u16,
    /// PCI device id.
    pub pci_device_id: u16,
    /// PCI subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Virtio device id (1 = net, 2 = block, ...).
    pub virtio_id: u32,
}

/// A queue's doorbell: where to write and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueNotify {
    /// Offset in the notify window.
    pub window_offset: u64,
    /// BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub bar_offset: u64,
}

/// The modern virtio-pci transport over one PCI function.
pub struct ModernTransport<P: PciFunction + ?Sized> {
    func: Arc<P>,
    info: ProbeInfo,
    caps: VirtioCaps,
    common: BarWindow<P>,
    notify: BarWindow<P>,
    isr: BarWindow<P>,
    device: Option<BarWindow<P>>,
    num_queues: u16,
    reset_timeout: Duration,
}

impl<P: PciFunction + ?Sized> std::fmt::Debug for ModernTransport<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModernTransport")
            .field("device", &self.func.describe())
            .field("info", &self.info)
            .field("caps", &self.caps)
            .field("num_queues", &self.num_queues)
            .finish()
    }
}

/// Check identity registers: a virtio vendor/device, not all-ones.
pub fn probe_identity<P: PciFunction + ?Sized>(func: &P) -> Result<ProbeInfo> {
    let vendor = func
        .config_read_u16(cfg::VENDOR_ID)
        .map_err(TransportError::Pci)?;
    let device = func
        .config_read_u16(cfg::DEVICE_ID)
        .map_err(TransportError::Pci)?;
    if vendor == 0xffff && device == 0xffff {
        return Err(TransportError::DeviceRemoved);
    }
    if vendor != cfg::VIRTIO_VENDOR_ID || !(0x1000..=0x107f).contains(&device) {
        return Err(TransportError::NotVirtio { vendor, device });
    }
    let subsys_vendor = func.config_read_u16(0x2c).map_err(TransportError::Pci)?;
    let virtio_id = if device >= 0x1040 {
        u32::from(device - 0x1040)
    } else {
        // Transitional devices carry the virtio id in the subsystem id.
        u32::from(
            func.config_read_u16(cfg::SUBSYSTEM_ID)
                .map_err(TransportError::Pci)?,
        )
    };
    Ok(ProbeInfo {
        vendor_id: vendor,
        pci_device_id: device,
        subsystem_vendor_id: subsys_vendor,
        virtio_id,
    })
}

impl<P: PciFunction + ?Sized> ModernTransport<P> {
    /// Probe `func`: identity, capabilities, windows. Does not touch the
    /// device's state (no reset); see [`ModernTransport::reset`].
    ///
    /// # Errors
    ///
    /// [`TransportError::LegacyOnly`] for a device without virtio 1.x
    /// capabilities, [`TransportError::DeviceRemoved`] for a device reading
    /// all-ones, [`TransportError::Caps`] for malformed capabilities.
    pub fn new(func: Arc<P>) -> Result<Self> {
        let info = probe_identity(&*func)?;
        let caps = match caps::parse(&*func) {
            Ok(c) => c,
            Err(CapError::Missing(_)) | Err(CapError::NoCapabilityList)
                if info.pci_device_id < 0x1040
                    && !caps::has_virtio_caps(&*func).unwrap_or(false) =>
            {
                return Err(TransportError::LegacyOnly {
                    device: info.pci_device_id,
                })
            }
            Err(e) => return Err(e.into()),
        };
        let common = BarWindow::new(Arc::clone(&func), caps.common);
        let notify = BarWindow::new(Arc::clone(&func), caps.notify.region);
        let isr = BarWindow::new(Arc::clone(&func), caps.isr);
        let device = caps.device.map(|r| BarWindow::new(Arc::clone(&func), r));
        let num_queues = common.read16(common::NUM_QUEUES)?;
        let status = common.read8(common::DEVICE_STATUS)?;
        if num_queues == 0xffff && status == 0xff {
            return Err(TransportError::DeviceRemoved);
        }
        if num_queues > MAX_QUEUES {
            return Err(TransportError::TooManyQueues(num_queues));
        }
        log::debug!(
            "{}: virtio id {}, {} queues, caps {:?}, common mapped: {}",
            func.describe(),
            info.virtio_id,
            num_queues,
            caps,
            common.is_mapped()
        );
        Ok(ModernTransport {
            func,
            info,
            caps,
            common,
            notify,
            isr,
            device,
            num_queues,
            reset_timeout: DEFAULT_RESET_TIMEOUT,
        })
    }

    /// Set how long [`reset`](Self::reset) waits.
    pub fn set_reset_timeout(&mut self, t: Duration) {
        self.reset_timeout = t;
    }

    /// How long [`reset`](Self::reset) waits.
    pub fn reset_timeout(&self) -> Duration {
        self.reset_timeout
    }

    /// The PCI function.
    pub fn function(&self) -> &Arc<P> {
        &self.func
    }

    /// Identity facts.
    pub fn info(&self) -> &ProbeInfo {
        &self.info
    }

    /// The parsed capabilities.
    pub fn caps(&self) -> &VirtioCaps {
        &self.caps
    }

    /// Number of queues (`num_queues` at probe time).
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Re-read `num_queues`. Some devices change it with the negotiated
    /// features (QEMU's virtio-net instantiates its multiqueue pairs only
    /// once VIRTIO_NET_F_MQ is negotiated). Values above
    /// [`MAX_QUEUES`] are refused.
    pub fn refresh_num_queues(&mut self) -> Result<u16> {
        let n = self.common.read16(common::NUM_QUEUES)?;
        if n > MAX_QUEUES {
            return Err(TransportError::TooManyQueues(n));
        }
        self.num_queues = n;
        Ok(n)
    }

    /// Enable memory decoding and bus mastering, disable INTx.
    pub fn enable_bus_master(&self) -> Result<()> {
        let cmd = self
            .func
            .config_read_u16(cfg::COMMAND)
            .map_err(TransportError::Pci)?;
        let want = cmd | cfg::COMMAND_MEMORY | cfg::COMMAND_BUS_MASTER | cfg::COMMAND_INTX_DISABLE;
        if want != cmd {
            self.func
                .config_write_u16(cfg::COMMAND, want)
                .map_err(TransportError::Pci)?;
        }
        Ok(())
    }

    /// Clear bus mastering in PCI_COMMAND: the function can no longer
    /// start DMA (what a driver does to a device it cannot stop otherwise).
    ///
    /// # Errors
    ///
    /// Config space access failed.
    pub fn disable_bus_master(&self) -> Result<()> {
        let cmd = self
            .func
            .config_read_u16(cfg::COMMAND)
            .map_err(TransportError::Pci)?;
        if cmd & cfg::COMMAND_BUS_MASTER != 0 {
            self.func
                .config_write_u16(cfg::COMMAND, cmd & !cfg::COMMAND_BUS_MASTER)
                .map_err(TransportError::Pci)?;
        }
        Ok(())
    }

    /// Current device status; all-ones means the device is gone.
    pub fn status(&self) -> Result<u8> {
        let s = self.common.read8(common::DEVICE_STATUS)?;
        if s == 0xff {
            return Err(TransportError::DeviceRemoved);
        }
        Ok(s)
    }

    /// Write device status (non-zero; use [`reset`](Self::reset) for 0).
    pub fn set_status(&self, s: u8) -> Result<()> {
        if s == 0 {
            return self.reset();
        }
        self.common.write8(common::DEVICE_STATUS, s)?;
        Ok(())
    }

    /// Reset: write 0 and wait for the device to read back 0, bounded by the
    /// reset timeout (virtio 1.2 §4.1.4.3.2).
    pub fn reset(&self) -> Result<()> {
        self.reset_within(self.reset_timeout)
    }

    /// [`reset`](Self::reset) with a time limit of its own (zero: write 0
    /// and read the status once).
    pub fn reset_within(&self, timeout: Duration) -> Result<()> {
        self.common.write8(common::DEVICE_STATUS, 0)?;
        let start = Instant::now();
        let mut sleep = Duration::from_micros(10);
        loop {
            let s = self.common.read8(common::DEVICE_STATUS)?;
            if s == 0 {
                return Ok(());
            }
            if s == 0xff {
                return Err(TransportError::DeviceRemoved);
            }
            if start.elapsed() >= timeout {
                return Err(TransportError::ResetTimeout(timeout));
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(10));
        }
    }

    /// Write `write` to device status, then wait (bounded by the reset
    /// timeout) until the status has every bit of `set` and none of
    /// `clear`: how virtio 1.4's Device Suspend reports both suspending
    /// (SUSPEND set, DRIVER_OK clear) and resuming (the reverse).
    ///
    /// # Errors
    ///
    /// [`TransportError::NeedsReset`] when the device sets
    /// DEVICE_NEEDS_RESET instead, [`TransportError::StatusTimeout`],
    /// [`TransportError::DeviceRemoved`].
    pub fn set_status_and_wait(
        &self,
        what: &'static str,
        write: u8,
        set: u8,
        clear: u8,
    ) -> Result<u8> {
        self.common.write8(common::DEVICE_STATUS, write)?;
        let start = Instant::now();
        let mut sleep = Duration::from_micros(10);
        loop {
            let s = self.status()?;
            if s & status::DEVICE_NEEDS_RESET != 0 {
                return Err(TransportError::NeedsReset { what, status: s });
            }
            if s & set == set && s & clear == 0 {
                return Ok(s);
            }
            if start.elapsed() >= self.reset_timeout {
                return Err(TransportError::StatusTimeout {
                    what,
                    waited: self.reset_timeout,
                    status: s,
                });
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(10));
        }
    }

    /// All 64 device feature bits.
    pub fn device_features(&mut self) -> Result<u64> {
        self.common.write32(common::DEVICE_FEATURE_SELECT, 0)?;
        let lo = self.common.read32(common::DEVICE_FEATURE)?;
        self.common.write32(common::DEVICE_FEATURE_SELECT, 1)?;
        let hi = self.common.read32(common::DEVICE_FEATURE)?;
        if lo == u32::MAX && hi == u32::MAX {
            return Err(TransportError::DeviceRemoved);
        }
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }

    /// Write the driver's 64 feature bits.
    pub fn set_driver_features(&mut self, f: u64) -> Result<()> {
        self.common.write32(common::DRIVER_FEATURE_SELECT, 0)?;
        self.common.write32(common::DRIVER_FEATURE, f as u32)?;
        self.common.write32(common::DRIVER_FEATURE_SELECT, 1)?;
        self.common
            .write32(common::DRIVER_FEATURE, (f >> 32) as u32)?;
        Ok(())
    }

    /// Set FEATURES_OK on top of `status` and read it back.
    ///
    /// # Errors
    ///
    /// [`TransportError::FeaturesRefused`] when the device clears it.
    pub fn features_ok(&mut self, current_status: u8, driver_features: u64) -> Result<()> {
        let s = current_status | status::FEATURES_OK;
        self.common.write8(common::DEVICE_STATUS, s)?;
        let back = self.status()?;
        if back & status::FEATURES_OK == 0 {
            return Err(TransportError::FeaturesRefused(driver_features));
        }
        Ok(())
    }

    fn select(&mut self, q: QueueIndex) -> Result<()> {
        if q.0 >= self.num_queues {
            return Err(TransportError::NoSuchQueue(q));
        }
        self.common.write16(common::QUEUE_SELECT, q.0)?;
        Ok(())
    }

    /// Maximum (current, before any write) size of queue `q`; 0 means the
    /// queue is unavailable.
    pub fn queue_max_size(&mut self, q: QueueIndex) -> Result<u16> {
        self.select(q)?;
        Ok(self.common.read16(common::QUEUE_SIZE)?)
    }

    /// Set the size of queue `q`.
    pub fn set_queue_size(&mut self, q: QueueIndex, n: u16) -> Result<()> {
        self.select(q)?;
        self.common.write16(common::QUEUE_SIZE, n)?;
        Ok(())
    }

    /// Program the ring addresses of queue `q`.
    pub fn set_queue_addrs(&mut self, q: QueueIndex, a: VringAddrs) -> Result<()> {
        self.select(q)?;
        self.common.write64(common::QUEUE_DESC, a.desc)?;
        self.common.write64(common::QUEUE_DRIVER, a.driver)?;
        self.common.write64(common::QUEUE_DEVICE, a.device)?;
        Ok(())
    }

    /// Read back the ring addresses of queue `q`.
    pub fn queue_addrs(&mut self, q: QueueIndex) -> Result<VringAddrs> {
        self.select(q)?;
        Ok(VringAddrs {
            desc: self.common.read64(common::QUEUE_DESC)?,
            driver: self.common.read64(common::QUEUE_DRIVER)?,
            device: self.common.read64(common::QUEUE_DEVICE)?,
        })
    }

    /// Enable queue `q` (a virtio-pci queue cannot be disabled but by reset).
    pub fn enable_queue(&mut self, q: QueueIndex) -> Result<()> {
        self.select(q)?;
        self.common.write16(common::QUEUE_ENABLE, 1)?;
        Ok(())
    }

    /// Whether queue `q` is enabled.
    pub fn queue_enabled(&mut self, q: QueueIndex) -> Result<bool> {
        self.select(q)?;
        Ok(self.common.read16(common::QUEUE_ENABLE)? == 1)
    }

    /// Assign MSI-X `vector` to queue `q` and check the device kept it.
    pub fn set_queue_vector(&mut self, q: QueueIndex, vector: u16) -> Result<()> {
        self.select(q)?;
        self.common.write16(common::QUEUE_MSIX_VECTOR, vector)?;
        let back = self.common.read16(common::QUEUE_MSIX_VECTOR)?;
        if back != vector {
            return Err(TransportError::VectorRefused {
                what: "a queue",
                vector,
            });
        }
        Ok(())
    }

    /// Assign MSI-X `vector` to configuration changes and check it stuck.
    pub fn set_config_vector(&mut self, vector: u16) -> Result<()> {
        self.common.write16(common::CONFIG_MSIX_VECTOR, vector)?;
        let back = self.common.read16(common::CONFIG_MSIX_VECTOR)?;
        if back != vector {
            return Err(TransportError::VectorRefused {
                what: "config changes",
                vector,
            });
        }
        Ok(())
    }

    /// Where queue `q`'s doorbell is, checked against the notify region.
    /// `width` is 2, or 4 when notification data was negotiated.
    pub fn queue_notify(&mut self, q: QueueIndex, width: u64) -> Result<QueueNotify> {
        self.select(q)?;
        let notify_off = self.common.read16(common::QUEUE_NOTIFY_OFF)?;
        let mult = self.caps.notify.multiplier;
        let len = self.caps.notify.region.length;
        let off = u64::from(notify_off) * u64::from(mult);
        if off.checked_add(width).is_none_or(|end| end > len) {
            return Err(TransportError::NotifyOutOfRange {
                queue: q,
                notify_off,
                multiplier: mult,
                len,
            });
        }
        Ok(QueueNotify {
            window_offset: off,
            bar: self.caps.notify.region.bar,
            bar_offset: self.caps.notify.region.offset + off,
        })
    }

    /// The notify window (for doorbell handles).
    pub fn notify_window(&self) -> &BarWindow<P> {
        &self.notify
    }

    /// Read and clear the ISR.
    pub fn read_isr(&self) -> Result<u8> {
        Ok(self.isr.read8(0)?)
    }

    /// Current `config_generation`.
    pub fn config_generation(&self) -> Result<u8> {
        Ok(self.common.read8(common::CONFIG_GENERATION)?)
    }

    /// Size of the device config structure (0 when absent).
    pub fn device_config_len(&self) -> u64 {
        self.device.as_ref().map_or(0, |d| d.len())
    }

    /// The device config window, for a non-empty access at `offset`.
    fn device_window(&self, offset: u64, len: usize) -> Result<&BarWindow<P>> {
        self.device.as_ref().ok_or_else(|| {
            BarError::OutOfWindow {
                offset,
                width: len,
                len: 0,
            }
            .into()
        })
    }

    fn read_config_once(&self, d: &BarWindow<P>, offset: u64, buf: &mut [u8]) -> Result<()> {
        // Access with the widest naturally aligned width, as drivers do: some
        // devices only latch multi-byte fields on aligned accesses.
        let mut i = 0usize;
        while i < buf.len() {
            let off = offset + i as u64;
            let left = buf.len() - i;
            if off.is_multiple_of(4) && left >= 4 {
                buf[i..i + 4].copy_from_slice(&d.read32(off)?.to_le_bytes());
                i += 4;
            } else if off.is_multiple_of(2) && left >= 2 {
                buf[i..i + 2].copy_from_slice(&d.read16(off)?.to_le_bytes());
                i += 2;
            } else {
                buf[i] = d.read8(off)?;
                i += 1;
            }
        }
        Ok(())
    }

    /// Read device config at `range`, retrying until `config_generation`
    /// is the same before and after (virtio 1.2 §4.1.4.3.1).
    ///
    /// `range` was checked against [`device_config_len`](Self::device_config_len)
    /// ([`ConfigRange::new`]); every register access is bounds-checked
    /// against the window again.
    pub fn read_config(&self, range: ConfigRange, buf: &mut [u8]) -> Result<()> {
        let offset = u64::from(range.offset());
        if buf.is_empty() {
            return Ok(());
        }
        let d = self.device_window(offset, buf.len())?;
        for _ in 0..CONFIG_READ_RETRIES {
            let before = self.config_generation()?;
            self.read_config_once(d, offset, buf)?;
            let after = self.config_generation()?;
            if before == after {
                // All-ones everywhere may be a device that is gone: the
                // status register tells (it is never 0xff on a live device).
                if after == 0xff {
                    self.status()?;
                }
                return Ok(());
            }
        }
        Err(TransportError::ConfigUnstable)
    }

    /// Write device config at `range`.
    pub fn write_config(&self, range: ConfigRange, buf: &[u8]) -> Result<()> {
        let offset = u64::from(range.offset());
        if buf.is_empty() {
            return Ok(());
        }
        let d = self.device_window(offset, buf.len())?;
        let mut i = 0usize;
        while i < buf.len() {
            let off = offset + i as u64;
            let left = buf.len() - i;
            if off.is_multiple_of(4) && left >= 4 {
                let v = u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
                d.write32(off, v)?;
                i += 4;
            } else if off.is_multiple_of(2) && left >= 2 {
                d.write16(off, u16::from_le_bytes([buf[i], buf[i + 1]]))?;
                i += 2;
            } else {
                d.write8(off, buf[i])?;
                i += 1;
            }
        }
        Ok(())
    }

    /// Region of the notify structure.
    pub fn notify_region(&self) -> CapRegion {
        self.caps.notify.region
    }
}

/// Upper bound on `num_queues` (QEMU's VIRTIO_QUEUE_MAX).
pub const MAX_QUEUES: u16 = 1024;

/// Whether `f` has VIRTIO_F_VERSION_1.
pub fn has_version_1(f: u64) -> bool {
    f & features::bit(features::VERSION_1) != 0
}
