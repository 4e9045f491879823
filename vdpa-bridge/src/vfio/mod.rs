//! The VFIO backend: a PCI function claimed through vfio-pci, seen through
//! [`PciFunction`].
//!
//! [`VfioFunction::open`] resolves the device in sysfs, checks that it has
//! an IOMMU group and is bound to vfio-pci, then opens a type1v2 container
//! (`/dev/vfio/vfio`), the group (`/dev/vfio/N`) and the device (from the
//! group). [`VfioFunction::open_handed`] does the same from a group
//! descriptor (and maybe a container) an orchestrator opened and handed
//! in, so that an unprivileged VMM opens nothing under `/dev/vfio` and
//! reads no sysfs; `sys.rs` says why that is not vfio-ioctls. vfio-pci resets the
//! function when it is opened (`vfio_pci_core_enable`; whether that reset
//! worked is what `VFIO_DEVICE_FLAGS_RESET` reports), so the bridge does
//! not reset it again unless asked to ([`VfioOptions::reset_on_open`]: a
//! PCIe FLR waits 100 ms). It enables memory decoding and bus
//! mastering, and mmaps every BAR area VFIO allows (sparse-mmap areas
//! honoured, so the MSI-X table stays out on kernels that protect it).
//! Everything not mapped goes through `pread`/`pwrite` on the device fd.
//!
//! Kicks use `VFIO_DEVICE_IOEVENTFD` and interrupts `VFIO_DEVICE_SET_IRQS`
//! with one eventfd per MSI-X vector, so neither needs a userspace thread.
//!
//! [`VfioFunction::open_in`] opens a function into a [`SharedContainer`]
//! that other functions of the VM use too (guest RAM mapped and pinned
//! once for all of them); [`VfioFunction::open`] gives the function a
//! container of its own (what a function behind a vIOMMU needs). Either
//! way the function must be alone in its IOMMU group.
//!
//! # Testing
//!
//! Argument layouts, range checks, sparse-mmap and IOVA-capability parsing,
//! DMA book-keeping and the sysfs checks of `open` are unit-tested here.
//! Everything that needs `/dev/vfio` (open, reset, region I/O, mmap,
//! MSI-X routing, ioeventfds, DMA map/unmap, teardown) is proven only by
//! the VM lab (the integration suite, inside a QEMU guest).

mod container;
mod dma;
mod group;
mod layout;
mod sys;

/// The backend's pure parts, for other packages' tests and fuzz targets
/// (feature `test-utils`, which Cloud Hypervisor never enables): the
/// parsers of what the kernel reports (IOVA ranges, sparse mmap areas),
/// the argument layouts and the DMA book-keeping. Without the feature they
/// stay private to this module.
#[cfg(any(test, feature = "test-utils"))]
pub mod testing {
    pub use super::dma::{Acquire, DmaTracker, IovaRanges, Release, SharedMaps};
    pub use super::layout::{
        bar_kind, io_width_bytes, ioeventfd_arg, irq_set_words, mmap_areas, msix_request,
        parse_iova_ranges, region_info, window_pos, RegionInfo,
    };
}

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vm_memory::mmap::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

use crate::pci::{
    cfg, BarInfo, BarMapping, IoWidth, PciError, PciFunction, PciFunctionExt, PciResult,
};
use crate::sysfs::{self, SysfsError, VFIO_PCI};
use crate::types::{Iova, IovaRange};
use container::Membership;
pub use container::{ContainerStats, SharedContainer};
use dma::DmaTracker;
use group::Group;
use layout::RegionInfo;

/// Size of PCI Express extended config space.
const CONFIG_SPACE_MAX: u64 = 4096;

/// Number of BARs of a type-0 header.
const NUM_BARS: u8 = 6;

/// Errors of the VFIO backend.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The argument is neither a PCI address nor a PCI device path.
    #[error(
        "`{0}` is not a PCI address (expected 0000:00:04.0, 00:04.0 or a /sys/bus/pci/devices path)"
    )]
    BadAddress(String),
    /// No such device (or path).
    #[error("no PCI device at {}", path.display())]
    NotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// The device has no IOMMU group: the IOMMU is off or absent.
    #[error(
        "device {bdf} has no IOMMU group; VFIO needs an enabled IOMMU (e.g. boot with intel_iommu=on)"
    )]
    NoIommuGroup {
        /// PCI address.
        bdf: String,
    },
    /// The device is not bound to vfio-pci.
    #[error(
        "device {bdf} is bound to {}, not vfio-pci; run `vdpa-bridge bind {bdf}`",
        sysfs::driver_name(.driver)
    )]
    WrongDriver {
        /// PCI address.
        bdf: String,
        /// The bound driver (`None`: no driver).
        driver: Option<String>,
    },
    /// The device's IOMMU group holds other devices too. A group is
    /// attached to a container as a whole, and the other devices could be
    /// opened by someone else, so a bridged device must be alone in its
    /// group.
    #[error(
        "device {bdf} shares IOMMU group {group} with {others:?}; a bridged device must be alone in its group"
    )]
    GroupShared {
        /// PCI address.
        bdf: String,
        /// Group number.
        group: u32,
        /// The other devices of the group.
        others: Vec<String>,
    },
    /// The members of the device's IOMMU group cannot be listed, so it is
    /// unknown whether the device is alone in its group.
    #[error("cannot list the devices of IOMMU group {group}; a bridged device must be alone in its group")]
    GroupUnreadable {
        /// Group number.
        group: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The container (`/dev/vfio/vfio`, or the descriptor handed in)
    /// cannot be used as a type1v2 container.
    #[error("VFIO container: {what}")]
    Container {
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The IOMMU group could not be opened or attached to the container.
    #[error("cannot use VFIO group {group} (opened from /dev/vfio/<group>, which must be accessible, or handed in as a descriptor of it)")]
    Group {
        /// The group number, or the descriptor it was handed in as.
        group: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A device of the group is bound to a driver other than vfio-pci (or
    /// pci-stub), so the group cannot be used.
    #[error("VFIO group {group} is not viable: every device of the group must be bound to vfio-pci or to no driver")]
    GroupNotViable {
        /// The group number, or the descriptor it was handed in as.
        group: String,
    },
    /// A group handed in is attached to a container already.
    #[error("VFIO group {group} is attached to a container already; hand the group in unattached (the VMM attaches it to the VM's container)")]
    GroupAttached {
        /// The descriptor it was handed in as.
        group: String,
    },
    /// The device fd could not be obtained from its group.
    #[error(
        "cannot get VFIO device {bdf} from its group (is it in that group, and bound to vfio-pci?)"
    )]
    Device {
        /// PCI address.
        bdf: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The VFIO device is not a PCI device.
    #[error("VFIO device {bdf} is not a PCI device")]
    NotPci {
        /// PCI address.
        bdf: String,
    },
    /// A VFIO region does not look as vfio-pci describes it.
    #[error("VFIO region {index} is unusable: {reason}")]
    Region {
        /// Region index.
        index: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// A function of this IOMMU group is open in the container already
    /// (the same device named twice).
    #[error("device {bdf}: a function of IOMMU group {group} is already open in this VM's VFIO container (the same device given twice?)")]
    GroupBusy {
        /// PCI address.
        bdf: String,
        /// The group number, or the descriptor it was handed in as.
        group: String,
    },
    /// An ioctl or system call during open failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl or system call.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Enabling memory decoding and bus mastering failed.
    #[error("cannot enable memory decoding and bus mastering")]
    Command(#[source] PciError),
}

impl From<SysfsError> for VfioError {
    fn from(e: SysfsError) -> Self {
        match e {
            SysfsError::BadAddress(a) => VfioError::BadAddress(a),
            SysfsError::NotFound { path } => VfioError::NotFound { path },
        }
    }
}

/// Where [`VfioFunction::open_with`] looks and what it does on open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioOptions {
    /// The sysfs PCI devices directory (`/sys/bus/pci/devices`).
    pub sysfs_root: PathBuf,
    /// Reset the function once more after opening it, when VFIO reports
    /// it can (default false). vfio-pci already reset it in the open
    /// itself when it reports it can (`VFIO_DEVICE_FLAGS_RESET` is that
    /// reset's success), so a second one only costs time: 100 ms and more
    /// for a PCIe FLR, per device, measured by the lab's
    /// `fleet_startup_cost_against_the_kernels_virtio_pci_probe`.
    pub reset_on_open: bool,
}

impl Default for VfioOptions {
    fn default() -> Self {
        Self {
            sysfs_root: PathBuf::from("/sys/bus/pci/devices"),
            reset_on_open: false,
        }
    }
}

/// Where a VFIO region sits on the device fd.
#[derive(Clone, Copy, Debug)]
struct Region {
    offset: u64,
    size: u64,
}

#[derive(Debug)]
struct Bar {
    info: BarInfo,
    region: Region,
    mappings: Vec<BarMapping>,
}

/// An ioevent registration: what the kernel writes where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IoeventKey {
    bar: u8,
    offset: u64,
    width: IoWidth,
    data: u64,
}

/// A PCI function claimed through vfio-pci.
///
/// Dropping it disables MSI-X, clears bus mastering, removes its DMA
/// mappings, unmaps its BARs and closes it (the kernel then removes the
/// ioeventfds and resets the function); failures there are logged, never
/// raised.
pub struct VfioFunction {
    bdf: String,
    bars: [Option<Bar>; NUM_BARS as usize],
    config: Region,
    msix_count: u32,
    reset_supported: bool,
    reset_on_open: bool,
    /// MSI-X vectors currently enabled through VFIO (0: disabled).
    msix_enabled: Mutex<u32>,
    ioevents: Mutex<Vec<IoeventKey>>,
    /// The mappings this function holds in its container.
    dma: Mutex<DmaTracker>,
    // Drop order matters: BAR mappings, then the device fd, then the
    // group's membership of the container (the kernel refuses to take a
    // group out while a device fd of it is open), whose container clone
    // goes last.
    mmaps: Vec<MmapRegion<()>>,
    /// Signalled by vfio-pci when the host wants the function back (its
    /// request interrupt); `None` when the kernel has none for it.
    removal: Option<EventFd>,
    /// The device fd: ioctls, and `pread`/`pwrite` of what is not mapped.
    file: File,
    membership: Membership,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> PciError {
    move |source| PciError::Io { op, source }
}

impl VfioFunction {
    /// Open `device` (`0000:00:04.0`, `00:04.0` or a sysfs device path)
    /// with default [`VfioOptions`].
    ///
    /// # Errors
    ///
    /// See [`VfioFunction::open_with`].
    pub fn open(device: &str) -> Result<VfioFunction, VfioError> {
        Self::open_with(device, &VfioOptions::default())
    }

    /// Open `device` with explicit options.
    ///
    /// # Errors
    ///
    /// [`VfioError::BadAddress`]/[`VfioError::NotFound`] when the device
    /// cannot be resolved, [`VfioError::NoIommuGroup`] without an IOMMU,
    /// [`VfioError::WrongDriver`] when it is not bound to vfio-pci, then
    /// container, group, device and region errors from VFIO itself.
    pub fn open_with(device: &str, opts: &VfioOptions) -> Result<VfioFunction, VfioError> {
        Self::open_into(device, None, opts)
    }

    /// Open `device` into `container`, which other functions may share:
    /// a mapping another function holds already (the same IOVA, size and
    /// host memory) is not mapped again.
    ///
    /// # Errors
    ///
    /// As [`VfioFunction::open_with`].
    pub fn open_in(
        device: &str,
        container: &SharedContainer,
        opts: &VfioOptions,
    ) -> Result<VfioFunction, VfioError> {
        Self::open_into(device, Some(container), opts)
    }

    /// Open the function `bdf` (a PCI address) from a VFIO group
    /// descriptor that an orchestrator opened and handed in, into
    /// `container` (the VM's, or one of the function's own; it may itself
    /// have been handed in, [`SharedContainer::from_fd`]). Nothing is
    /// opened under `/dev/vfio` and sysfs is not read: the group's
    /// viability comes from the kernel, and whether the function is alone
    /// in its group is the orchestrator's to ensure (with the group's
    /// other devices). `name` says in messages how the group came (e.g.
    /// `group_fd=5`). The function takes `group` (pass a duplicate to
    /// keep the original: it can be used again once the function is
    /// closed).
    ///
    /// # Errors
    ///
    /// [`VfioError::BadAddress`] for a malformed address, then group,
    /// device and region errors from VFIO ([`VfioError::GroupAttached`]
    /// when the group comes attached to a container already).
    pub fn open_handed(
        bdf: &str,
        group: OwnedFd,
        name: &str,
        container: &SharedContainer,
        opts: &VfioOptions,
    ) -> Result<VfioFunction, VfioError> {
        let bdf = crate::device_path::parse_pci_address(bdf)
            .ok_or_else(|| VfioError::BadAddress(bdf.to_owned()))?;
        let group = Group::adopt(group, name)?;
        let membership = container.attach(group, &bdf)?;
        Self::open_member(bdf, membership, opts)
    }

    /// The sysfs checks, then the container (`None`: a new one of the
    /// function's own), group and device.
    fn open_into(
        device: &str,
        container: Option<&SharedContainer>,
        opts: &VfioOptions,
    ) -> Result<VfioFunction, VfioError> {
        let bdf = sysfs::resolve_in(&opts.sysfs_root, device)?;
        let dev_path = opts.sysfs_root.join(&bdf);
        let group = sysfs::iommu_group_of(&dev_path)
            .ok_or_else(|| VfioError::NoIommuGroup { bdf: bdf.clone() })?;
        let driver = sysfs::driver_of(&dev_path);
        if driver.as_deref() != Some(VFIO_PCI) {
            return Err(VfioError::WrongDriver { bdf, driver });
        }
        let others = sysfs::iommu_group_peers(&dev_path, &bdf)
            .map_err(|source| VfioError::GroupUnreadable { group, source })?;
        if !others.is_empty() {
            return Err(VfioError::GroupShared { bdf, group, others });
        }

        let container = match container {
            Some(c) => c.clone(),
            None => SharedContainer::new()?,
        };
        // The kernel lets a group be opened once, so a group this
        // container holds already (the same device named twice, by path or
        // handed in) would fail the open with EBUSY: say so as the
        // container would.
        if Group::node_key(group).is_some_and(|k| container.holds_group(k)) {
            return Err(VfioError::GroupBusy {
                bdf,
                group: group.to_string(),
            });
        }
        let group = Group::open(group)?;
        let membership = container.attach(group, &bdf)?;
        Self::open_member(bdf, membership, opts)
    }

    /// Get the device fd of `bdf` from its attached group and set the
    /// function up: config region, BARs, the removal request.
    fn open_member(
        bdf: String,
        membership: Membership,
        opts: &VfioOptions,
    ) -> Result<VfioFunction, VfioError> {
        let file = membership.group().device(&bdf)?;
        let ioctl_err = |op| move |source| VfioError::Ioctl { op, source };
        let info = sys::device_info(&file).map_err(ioctl_err("VFIO_DEVICE_GET_INFO"))?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(VfioError::NotPci { bdf });
        }
        let ci = VFIO_PCI_CONFIG_REGION_INDEX;
        let cinfo = Self::region(&file, ci)?;
        let config = Region {
            offset: cinfo.offset,
            size: cinfo.size,
        };
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        if !(64..=CONFIG_SPACE_MAX).contains(&config.size) || cinfo.flags & rw != rw {
            return Err(VfioError::Region {
                index: ci,
                reason: "config region is not 64..=4096 bytes and read-write",
            });
        }

        let mut f = VfioFunction {
            msix_count: sys::irq_count(&file, VFIO_PCI_MSIX_IRQ_INDEX).unwrap_or(0),
            bdf,
            bars: Default::default(),
            config,
            reset_supported: info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
            reset_on_open: false,
            msix_enabled: Mutex::new(0),
            ioevents: Mutex::new(Vec::new()),
            dma: Mutex::new(DmaTracker::default()),
            mmaps: Vec::new(),
            removal: None,
            file,
            membership,
        };
        // From here on, failures drop `f`, whose Drop undoes what was done.
        // vfio-pci's own reset at open is what the flag reports.
        f.reset_on_open = f.reset_supported;
        if opts.reset_on_open && f.reset_supported {
            if let Err(e) = sys::device_reset(&f.file) {
                log::warn!("{}: the second reset on open failed: {e}", f.bdf);
            }
        }
        f.enable_decoding().map_err(VfioError::Command)?;
        f.setup_bars()?;
        f.removal = f.register_removal_request();
        let env = f.container().iova().envelope();
        let stats = f.container().stats();
        log::info!(
            "{}: opened (group {}, reset {}, {} MSI-X vectors, IOVA {:#x}..={:#x}, container of {} function(s))",
            f.bdf,
            f.membership.group().name(),
            if f.reset_on_open {
                "done by vfio-pci"
            } else {
                "not possible"
            },
            f.msix_count,
            env.first,
            env.last,
            stats.members
        );
        Ok(f)
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` of `index`, parsed.
    fn region(file: &File, index: u32) -> Result<RegionInfo, VfioError> {
        let reply = sys::region_info(file, index).map_err(|source| VfioError::Ioctl {
            op: "VFIO_DEVICE_GET_REGION_INFO",
            source,
        })?;
        layout::region_info(&reply).ok_or(VfioError::Region {
            index,
            reason: "the kernel's region info is shorter than its header",
        })
    }

    /// The canonical PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// Whether the function was reset when it was opened (by vfio-pci's
    /// open, and again if [`VfioOptions::reset_on_open`] asked).
    pub fn was_reset_on_open(&self) -> bool {
        self.reset_on_open
    }

    /// Whether VFIO can reset the function.
    pub fn reset_supported(&self) -> bool {
        self.reset_supported
    }

    /// Number of live DMA mappings this function holds (for leak checks).
    pub fn dma_mappings(&self) -> usize {
        lock(&self.dma).all().len()
    }

    /// The container the function was opened into.
    pub fn container(&self) -> &SharedContainer {
        self.membership.container()
    }

    /// Set memory-space decoding and bus mastering in PCI_COMMAND.
    fn enable_decoding(&self) -> PciResult<()> {
        let cmd = self.config_read_u16(cfg::COMMAND)?;
        let want = cmd | cfg::COMMAND_MEMORY | cfg::COMMAND_BUS_MASTER;
        if want != cmd {
            self.config_write_u16(cfg::COMMAND, want)?;
        }
        Ok(())
    }

    /// Read BAR region info and mmap what VFIO allows.
    fn setup_bars(&mut self) -> Result<(), VfioError> {
        let page = crate::host::page_size();
        for i in 0..NUM_BARS {
            let idx = u32::from(i);
            let info = match Self::region(&self.file, idx) {
                Ok(info) => info,
                Err(e) => {
                    log::warn!("{}: BAR {i} left out: {e}", self.bdf);
                    continue;
                }
            };
            let size = info.size;
            if size == 0 {
                continue;
            }
            let region = Region {
                offset: info.offset,
                size,
            };
            let reg = self
                .config_read_u32(cfg::BAR0 + 4 * u64::from(i))
                .map_err(VfioError::Command)?;
            let mut mappings = Vec::new();
            for (off, len) in layout::mmap_areas(size, info.flags, info.sparse.as_deref(), page) {
                let mapped = region
                    .offset
                    .checked_add(off)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))
                    .and_then(|at| {
                        let len = usize::try_from(len)
                            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
                        sys::map_region(&self.file, at, len)
                    });
                match mapped {
                    Ok(m) => {
                        mappings.push(BarMapping {
                            offset: off,
                            len,
                            host_addr: m.as_ptr() as usize,
                        });
                        self.mmaps.push(m);
                    }
                    Err(e) => log::warn!(
                        "{}: mmap of BAR {i} at {off:#x} (+{len:#x}) failed, using slow path: {e}",
                        self.bdf
                    ),
                }
            }
            self.bars[usize::from(i)] = Some(Bar {
                info: BarInfo {
                    kind: layout::bar_kind(reg),
                    size,
                },
                region,
                mappings,
            });
        }
        Ok(())
    }

    fn bar(&self, index: u8) -> PciResult<&Bar> {
        self.bars
            .get(usize::from(index))
            .and_then(Option::as_ref)
            .ok_or(PciError::NoSuchBar(index))
    }

    /// Device-fd position of `[offset, offset + len)` in BAR `index`.
    fn bar_pos(&self, index: u8, offset: u64, len: usize) -> PciResult<u64> {
        let bar = self.bar(index)?;
        layout::window_pos(bar.region.offset, bar.info.size, offset, len).ok_or(
            PciError::BarOutOfRange {
                bar: index,
                offset,
                len,
                size: bar.info.size,
            },
        )
    }

    fn config_pos(&self, offset: u64, len: usize) -> PciResult<u64> {
        let limit = self.config.size.min(CONFIG_SPACE_MAX);
        layout::window_pos(self.config.offset, limit, offset, len)
            .ok_or(PciError::ConfigOutOfRange { offset, len })
    }

    fn ioeventfd(&self, key: IoeventKey, fd: RawFd) -> PciResult<()> {
        let bar = self.bar(key.bar)?;
        let arg = layout::ioeventfd_arg(bar.region.offset, key.offset, key.width, key.data, fd)
            .ok_or(PciError::IoeventfdUnsupported {
                bar: key.bar,
                offset: key.offset,
            })?;
        sys::device_ioeventfd(&self.file, &arg)
            .map_err(|e| layout::ioeventfd_error(key.bar, key.offset, e))
    }

    /// Ask vfio-pci to signal an eventfd when the host wants the function
    /// back (request interrupt). Without it, an ordered removal blocks
    /// until the function is closed, and nobody is told. A failure only
    /// costs that notice, so it is logged.
    fn register_removal_request(&self) -> Option<EventFd> {
        let count = sys::irq_count(&self.file, VFIO_PCI_REQ_IRQ_INDEX).unwrap_or(0);
        if count == 0 {
            log::info!("{}: VFIO has no request interrupt for it: an ordered removal of the device waits until it is closed", self.bdf);
            return None;
        }
        let registered = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).and_then(|fd| {
            let mut words = layout::irq_set_words(
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                VFIO_PCI_REQ_IRQ_INDEX,
                0,
                &[fd.as_raw_fd()],
            );
            sys::set_irqs(&self.file, &mut words)?;
            Ok(fd)
        });
        match registered {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!("{}: cannot register for removal requests: {e}; an ordered removal of the device waits until it is closed", self.bdf);
                None
            }
        }
    }

    fn set_msix_irqs(&self, flags: u32, fds: &[i32]) -> PciResult<()> {
        let mut words = layout::irq_set_words(flags, VFIO_PCI_MSIX_IRQ_INDEX, 0, fds);
        sys::set_irqs(&self.file, &mut words).map_err(io_err("VFIO_DEVICE_SET_IRQS"))
    }

    fn disable_msix_locked(&self, enabled: &mut u32) -> PciResult<()> {
        if *enabled == 0 {
            return Ok(());
        }
        self.set_msix_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, &[])?;
        *enabled = 0;
        Ok(())
    }
}

// SAFETY: every BarMapping handed out describes a region in `self.mmaps`:
// a MAP_SHARED, PROT_READ|PROT_WRITE mapping of exactly `len` bytes created
// in `setup_bars`. `mmaps` is private, never shrunk, and its regions are
// unmapped only when the VfioFunction is dropped, so the mappings stay valid
// for as long as the value lives. (VFIO may zap them during a reset; the
// kernel then faults them back in, the addresses stay valid.)
unsafe impl PciFunction for VfioFunction {
    fn config_read(&self, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        let pos = self.config_pos(offset, buf.len())?;
        self.file
            .read_exact_at(buf, pos)
            .map_err(io_err("config space read"))
    }

    fn config_write(&self, offset: u64, buf: &[u8]) -> PciResult<()> {
        let pos = self.config_pos(offset, buf.len())?;
        self.file
            .write_all_at(buf, pos)
            .map_err(io_err("config space write"))
    }

    fn bar_info(&self, index: u8) -> Option<BarInfo> {
        self.bar(index).ok().map(|b| b.info)
    }

    fn bar_mappings(&self, index: u8) -> Vec<BarMapping> {
        self.bar(index)
            .map(|b| b.mappings.clone())
            .unwrap_or_default()
    }

    fn bar_read(&self, index: u8, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        let pos = self.bar_pos(index, offset, buf.len())?;
        self.file
            .read_exact_at(buf, pos)
            .map_err(io_err("BAR read (pread on the VFIO device)"))
    }

    fn bar_write(&self, index: u8, offset: u64, buf: &[u8]) -> PciResult<()> {
        let pos = self.bar_pos(index, offset, buf.len())?;
        self.file
            .write_all_at(buf, pos)
            .map_err(io_err("BAR write (pwrite on the VFIO device)"))
    }

    fn msix_vectors(&self) -> u32 {
        self.msix_count
    }

    fn enable_msix(&self, fds: &[Option<&EventFd>]) -> PciResult<()> {
        let requested = layout::msix_request(self.msix_count, fds.len())?;
        let mut enabled = lock(&self.msix_enabled);
        if requested == 0 {
            return self.disable_msix_locked(&mut enabled);
        }
        // Re-routing keeps MSI-X on when the vector count is unchanged; a
        // different count needs a fresh enable (the kernel sizes the
        // allocation at enable time).
        if *enabled != requested {
            self.disable_msix_locked(&mut enabled)?;
        }
        let raw: Vec<i32> = fds
            .iter()
            .map(|f| f.map_or(-1, |e| e.as_raw_fd()))
            .collect();
        self.set_msix_irqs(
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            &raw,
        )?;
        *enabled = requested;
        Ok(())
    }

    fn disable_msix(&self) -> PciResult<()> {
        self.disable_msix_locked(&mut lock(&self.msix_enabled))
    }

    fn set_ioeventfd(
        &self,
        bar: u8,
        offset: u64,
        width: IoWidth,
        data: u64,
        fd: Option<&EventFd>,
    ) -> PciResult<()> {
        let len = layout::io_width_bytes(width) as usize;
        self.bar_pos(bar, offset, len)?;
        let key = IoeventKey {
            bar,
            offset,
            width,
            data,
        };
        let mut list = lock(&self.ioevents);
        let registered = list.iter().position(|k| *k == key);
        // The kernel refuses a second registration of the same doorbell
        // (EEXIST): replace means remove, then add.
        if let Some(i) = registered {
            self.ioeventfd(key, -1)?;
            list.swap_remove(i);
        }
        if let Some(fd) = fd {
            // The kernel takes its own reference to the eventfd.
            self.ioeventfd(key, fd.as_raw_fd())?;
            list.push(key);
        }
        Ok(())
    }

    fn function_reset(&self) -> PciResult<bool> {
        if !self.reset_supported {
            return Ok(false);
        }
        sys::device_reset(&self.file).map_err(io_err("VFIO_DEVICE_RESET"))?;
        self.enable_decoding()?;
        Ok(true)
    }

    fn iova_range(&self) -> IovaRange {
        self.container().iova().envelope()
    }

    unsafe fn dma_map(&self, iova: Iova, size: u64, host_addr: usize) -> PciResult<()> {
        let mut dma = lock(&self.dma);
        if !dma.may_map(&self.container().iova(), iova.0, size) {
            return Err(PciError::DmaRange { iova: iova.0, size });
        }
        // SAFETY: the caller upholds PciFunction::dma_map's contract.
        unsafe { self.container().map(iova.0, size, host_addr) }?;
        dma.insert(iova.0, size);
        Ok(())
    }

    unsafe fn dma_map_top(
        &self,
        size: u64,
        host_addr: usize,
        align: u64,
        floor: u64,
    ) -> PciResult<Iova> {
        let mut dma = lock(&self.dma);
        // SAFETY: the caller upholds PciFunction::dma_map's contract.
        let iova = unsafe { self.container().map_top(size, host_addr, align, floor) }?;
        dma.insert(iova.0, size);
        Ok(iova)
    }

    fn dma_unmap(&self, iova: Iova, size: u64) -> PciResult<()> {
        let mut dma = lock(&self.dma);
        let plan = dma
            .unmap_plan(iova.0, size)
            .ok_or(PciError::DmaRange { iova: iova.0, size })?;
        for (start, len) in plan {
            self.container().unmap(start, len)?;
            dma.remove(start);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("vfio {}", self.bdf)
    }

    fn removal_request(&self) -> Option<&EventFd> {
        self.removal.as_ref()
    }
}

impl Drop for VfioFunction {
    /// Release the function: MSI-X off, bus mastering off (no more DMA),
    /// DMA mappings removed, then every descriptor closed. Only ioctls a
    /// VMM's vCPU thread may issue run here (Cloud Hypervisor's filter
    /// allows `VFIO_DEVICE_SET_IRQS` and `VFIO_IOMMU_UNMAP_DMA` there, for
    /// its own devices' unplug, which an ACPI eject runs on a vCPU): the
    /// ioeventfds and the function-level reset are left to the kernel,
    /// whose vfio-pci removes the ioeventfds, disables interrupts and
    /// resets the function when its last user closes it
    /// (`vfio_pci_core_disable`).
    fn drop(&mut self) {
        let bdf = self.bdf.clone();
        if let Err(e) = self.disable_msix() {
            log::warn!("{bdf}: disabling MSI-X failed: {e}");
        }
        let stop = self
            .config_read_u16(cfg::COMMAND)
            .and_then(|c| self.config_write_u16(cfg::COMMAND, c & !cfg::COMMAND_BUS_MASTER));
        if let Err(e) = stop {
            log::warn!("{bdf}: clearing bus master failed: {e}");
        }
        let maps = lock(&self.dma).all();
        for (iova, size) in maps {
            // Only this function's references: a mapping another function
            // of the container holds stays.
            if let Err(e) = self.container().unmap(iova, size) {
                log::warn!("{bdf}: DMA unmap of {iova:#x} (+{size:#x}) failed: {e}");
            }
        }
        // BAR mappings, the device fd and the group's membership are
        // released by their own Drop, in field order: the last close of
        // the device makes the kernel reset the function, then the group
        // leaves the container.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeSysfs;

    fn opts(fs: &FakeSysfs) -> VfioOptions {
        VfioOptions {
            sysfs_root: fs.devices(),
            reset_on_open: true,
        }
    }

    #[test]
    fn default_options_use_sys_and_leave_the_reset_to_vfio_pci() {
        let o = VfioOptions::default();

        assert_eq!(o.sysfs_root, PathBuf::from("/sys/bus/pci/devices"));
        assert!(!o.reset_on_open);
    }

    #[test]
    fn open_rejects_a_malformed_address() {
        let fs = FakeSysfs::new("vfio-bad");

        let err = VfioFunction::open_with("00:04", &opts(&fs)).err().unwrap();

        assert!(
            matches!(err, VfioError::BadAddress(ref a) if a == "00:04"),
            "{err}"
        );
    }

    #[test]
    fn open_of_a_missing_device_names_its_path() {
        let fs = FakeSysfs::new("vfio-missing");

        let err = VfioFunction::open_with("00:09.0", &opts(&fs))
            .err()
            .unwrap();

        assert!(
            matches!(&err, VfioError::NotFound { path } if path.ends_with("0000:00:09.0")),
            "{err}"
        );
    }

    #[test]
    fn open_of_a_device_sharing_its_iommu_group_is_refused() {
        let fs = FakeSysfs::new("vfio-shared-group");
        fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some("vfio-pci"),
            Some(7),
        );
        fs.add_device(
            "0000:00:04.1",
            (0x1af4, 0x1042, 2),
            &[],
            Some("vfio-pci"),
            Some(7),
        );

        let err = VfioFunction::open_with("0000:00:04.0", &opts(&fs))
            .err()
            .unwrap();

        assert!(
            matches!(&err, VfioError::GroupShared { group: 7, others, .. } if others == &["0000:00:04.1"]),
            "{err}"
        );
        assert!(err.to_string().contains("alone in its group"));
    }

    #[test]
    fn open_refuses_a_device_whose_group_members_cannot_be_read() {
        let fs = FakeSysfs::new("vfio-group-unreadable");
        fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some("vfio-pci"),
            Some(8),
        );
        std::fs::remove_dir_all(fs.base.join("kernel/iommu_groups/8/devices")).unwrap();

        let err = VfioFunction::open_with("0000:00:04.0", &opts(&fs))
            .err()
            .unwrap();

        assert!(
            matches!(err, VfioError::GroupUnreadable { group: 8, .. }),
            "{err}"
        );
    }

    #[test]
    fn open_without_iommu_group_explains_the_iommu_is_needed() {
        let fs = FakeSysfs::new("vfio-nogroup");
        fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some("vfio-pci"),
            None,
        );

        let err = VfioFunction::open_with("0000:00:04.0", &opts(&fs))
            .err()
            .unwrap();

        assert!(matches!(err, VfioError::NoIommuGroup { .. }), "{err}");
        assert!(err.to_string().contains("intel_iommu=on"));
    }

    #[test]
    fn open_of_a_device_on_virtio_pci_suggests_the_bind_command() {
        let fs = FakeSysfs::new("vfio-wrongdrv");
        fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some("virtio-pci"),
            Some(4),
        );

        let err = VfioFunction::open_with("00:04.0", &opts(&fs))
            .err()
            .unwrap();

        assert_eq!(
            err.to_string(),
            "device 0000:00:04.0 is bound to virtio-pci, not vfio-pci; \
             run `vdpa-bridge bind 0000:00:04.0`"
        );
    }

    #[test]
    fn open_of_an_unbound_device_says_no_driver() {
        let fs = FakeSysfs::new("vfio-nodrv");
        fs.add_device("0000:00:04.0", (0x1af4, 0x1042, 2), &[], None, Some(4));

        let err = VfioFunction::open_with("0000:00:04.0", &opts(&fs))
            .err()
            .unwrap();

        assert!(err.to_string().contains("bound to no driver"), "{err}");
    }

    #[test]
    fn open_of_a_vfio_bound_device_gets_past_sysfs_checks() {
        // Past the sysfs checks the real /dev/vfio is needed: here (no VFIO)
        // the container fails; with VFIO the fake group number fails.
        let fs = FakeSysfs::new("vfio-pastsysfs");
        let dev = fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some("vfio-pci"),
            Some(999_999),
        );

        let err = VfioFunction::open_with(dev.to_str().unwrap(), &opts(&fs))
            .err()
            .unwrap();

        assert!(
            matches!(err, VfioError::Container { .. } | VfioError::Group { .. }),
            "{err}"
        );
    }

    #[test]
    fn sysfs_errors_convert_to_matching_variants() {
        let bad: VfioError = SysfsError::BadAddress("x".into()).into();
        let missing: VfioError = SysfsError::NotFound {
            path: PathBuf::from("/x"),
        }
        .into();

        assert!(matches!(bad, VfioError::BadAddress(_)));
        assert!(matches!(missing, VfioError::NotFound { .. }));
    }

    #[test]
    fn a_container_fd_that_is_not_a_vfio_container_is_refused_clearly() {
        let f = File::open("/dev/null").unwrap();

        let err = SharedContainer::from_fd(OwnedFd::from(f)).unwrap_err();

        assert!(
            matches!(&err, VfioError::Container { what, source }
                if what.contains("not a VFIO container") && source.raw_os_error() == Some(libc::ENOTTY)),
            "{err:?}"
        );
    }
}
