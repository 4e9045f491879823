//! The device-access seam: what a driver of a PCI function needs from
//! whatever gives it the function.
//!
//! [`PciFunction`] is implemented by the VFIO backend ([`crate::vfio::VfioFunction`])
//! for real devices and by the in-process emulated device of the
//! `vdpa-testkit` package. The modern virtio-pci transport
//! ([`crate::virtio_pci`]) is written only against this trait, so the code
//! path that drives QEMU's devices in the lab is the code path the unit
//! tests drive against the emulated device.

use vmm_sys_util::eventfd::EventFd;

use crate::types::{Iova, IovaRange};

/// Errors from a [`PciFunction`] implementation.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A config-space access outside the 4 KiB extended config space.
    #[error("config space access at {offset:#x} (+{len}) is out of range")]
    ConfigOutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
    },
    /// A BAR index outside 0..6 or a BAR that is not implemented.
    #[error("BAR {0} does not exist")]
    NoSuchBar(u8),
    /// A BAR access past the end of the BAR.
    #[error("access to BAR {bar} at {offset:#x} (+{len}) is past its size {size:#x}")]
    BarOutOfRange {
        /// BAR index.
        bar: u8,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Size of the BAR.
        size: u64,
    },
    /// A DMA mapping outside the usable IOVA range or overlapping another.
    #[error("DMA mapping {iova:#x} (+{size:#x}) is not allowed")]
    DmaRange {
        /// Start of the mapping.
        iova: u64,
        /// Size of the mapping.
        size: u64,
    },
    /// The function has fewer MSI-X vectors than asked for.
    #[error("device has {available} MSI-X vectors, {requested} requested")]
    MsixVectors {
        /// Vectors the function has.
        available: u32,
        /// Vectors requested.
        requested: u32,
    },
    /// An ioeventfd cannot be attached at this place.
    #[error("cannot attach an ioeventfd to BAR {bar} at {offset:#x}")]
    IoeventfdUnsupported {
        /// BAR index.
        bar: u8,
        /// Offset in the BAR.
        offset: u64,
    },
    /// The operation is not supported by this function.
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    /// An I/O error from the kernel, naming the operation.
    #[error("{op} failed")]
    Io {
        /// The operation (an ioctl name or a syscall).
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result of [`PciFunction`] operations.
pub type PciResult<T> = std::result::Result<T, PciError>;

/// What kind of resource a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Memory space.
    Memory,
    /// I/O port space.
    Io,
}

/// A host mapping of a BAR (or part of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMapping {
    /// Offset in the BAR where the mapping starts.
    pub offset: u64,
    /// Length of the mapping.
    pub len: u64,
    /// Host virtual address of BAR offset `offset`.
    pub host_addr: usize,
}

/// One BAR as the function reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// Memory or I/O.
    pub kind: BarKind,
    /// Size in bytes.
    pub size: u64,
}

/// Width of an ioeventfd's doorbell write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoWidth {
    /// 16-bit write (virtio queue index).
    U16,
    /// 32-bit write (notification data).
    U32,
}

/// Access to one PCI function: config space, BARs, MSI-X, DMA, reset.
///
/// Methods that touch the device return errors instead of logging them.
/// Implementations must not panic on any argument: offsets and lengths come
/// from capability structures the (untrusted) device supplied.
///
/// # Implementation safety
///
/// Every [`BarMapping`] returned by [`PciFunction::bar_mappings`] must stay
/// a valid, readable and writable mapping of `len` bytes at `host_addr` for
/// as long as the implementing value lives: the transport performs volatile
/// loads and stores there (see `virtio_pci::bar`).
pub unsafe trait PciFunction: Send + Sync {
    /// Read `buf.len()` bytes of PCI config space at `offset`.
    fn config_read(&self, offset: u64, buf: &mut [u8]) -> PciResult<()>;
    /// Write `buf` to PCI config space at `offset`.
    fn config_write(&self, offset: u64, buf: &[u8]) -> PciResult<()>;
    /// BAR `index` (0..6), or `None` when it is not implemented.
    fn bar_info(&self, index: u8) -> Option<BarInfo>;
    /// Host mappings of BAR `index` (empty when it cannot be mmap-ed).
    fn bar_mappings(&self, index: u8) -> Vec<BarMapping>;
    /// Read from BAR `index` at `offset` through the slow path (a syscall
    /// for VFIO). Used where the BAR is not mapped.
    fn bar_read(&self, index: u8, offset: u64, buf: &mut [u8]) -> PciResult<()>;
    /// Write to BAR `index` at `offset` through the slow path.
    fn bar_write(&self, index: u8, offset: u64, buf: &[u8]) -> PciResult<()>;
    /// Number of MSI-X vectors the function supports (0 if none).
    fn msix_vectors(&self) -> u32;
    /// Route MSI-X vector `i` to `fds[i]` (`None` leaves it unrouted) and
    /// enable MSI-X. Replaces any earlier routing.
    fn enable_msix(&self, fds: &[Option<&EventFd>]) -> PciResult<()>;
    /// Disable MSI-X and drop all routing.
    fn disable_msix(&self) -> PciResult<()>;
    /// Make the kernel (or the emulation) write `data` of `width` to BAR
    /// `bar` at `offset` whenever `fd` is signalled. `fd = None` removes a
    /// registration made with the same `bar`, `offset`, `width` and `data`.
    /// An implementation that keeps the eventfd beyond the call clones it
    /// (`EventFd::try_clone`); no raw descriptor crosses this seam.
    fn set_ioeventfd(
        &self,
        bar: u8,
        offset: u64,
        width: IoWidth,
        data: u64,
        fd: Option<&EventFd>,
    ) -> PciResult<()>;
    /// Function-level reset, if the function supports one. Returns whether a
    /// reset happened.
    fn function_reset(&self) -> PciResult<bool>;
    /// The IOVA range DMA mappings must lie in.
    fn iova_range(&self) -> IovaRange;
    /// Map `[host_addr, host_addr + size)` at `iova` for device DMA.
    ///
    /// # Safety
    ///
    /// Until [`PciFunction::dma_unmap`] is called with the same `iova` and
    /// `size`, or the function is dropped, the host range must stay mapped
    /// and must only be accessed through raw pointers (volatile or atomic
    /// operations) or handed to system calls, because the device may read
    /// and write it at any time (see `vfio_ioctls::VfioOps::vfio_dma_map`).
    unsafe fn dma_map(&self, iova: Iova, size: u64, host_addr: usize) -> PciResult<()>;
    /// Map `size` bytes of the caller's own memory (not guest memory:
    /// shadow rings) at the highest free `align`-aligned IOVA at or above
    /// `floor`, and return it. A function whose address space other
    /// functions share picks a window none of them holds; the default takes
    /// the top of [`PciFunction::iova_range`].
    ///
    /// # Safety
    ///
    /// As [`PciFunction::dma_map`].
    unsafe fn dma_map_top(
        &self,
        size: u64,
        host_addr: usize,
        align: u64,
        floor: u64,
    ) -> PciResult<Iova> {
        let iova = self
            .iova_range()
            .top_window(size, align, floor)
            .ok_or(PciError::DmaRange { iova: floor, size })?;
        // SAFETY: the caller upholds dma_map's contract.
        unsafe { self.dma_map(Iova(iova), size, host_addr) }?;
        Ok(Iova(iova))
    }
    /// Remove the mapping at `iova` of `size` bytes.
    fn dma_unmap(&self, iova: Iova, size: u64) -> PciResult<()>;
    /// A short description for logs ("vfio 0000:00:04.0", "emulated blk").
    fn describe(&self) -> String;
    /// An eventfd the host signals when it wants the function back (VFIO's
    /// request interrupt, `VFIO_PCI_REQ_IRQ_INDEX`): see
    /// [`VdpaOps::removal_request`](crate::VdpaOps::removal_request).
    fn removal_request(&self) -> Option<&EventFd> {
        None
    }
}

/// Standard PCI config-space offsets and bits used by the transport.
pub mod cfg {
    /// Vendor id (16 bits).
    pub const VENDOR_ID: u64 = 0x00;
    /// Device id (16 bits).
    pub const DEVICE_ID: u64 = 0x02;
    /// Command register (16 bits).
    pub const COMMAND: u64 = 0x04;
    /// Status register (16 bits).
    pub const STATUS: u64 = 0x06;
    /// Revision id (8 bits).
    pub const REVISION_ID: u64 = 0x08;
    /// Subsystem device id (16 bits).
    pub const SUBSYSTEM_ID: u64 = 0x2e;
    /// First BAR (32 bits each).
    pub const BAR0: u64 = 0x10;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES_POINTER: u64 = 0x34;
    /// Status bit: the function has a capability list.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Command bit: memory space decoding.
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    /// Command bit: bus master.
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
    /// Command bit: INTx disabled.
    pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
    /// Capability id of vendor-specific capabilities (virtio uses these).
    pub const CAP_ID_VENDOR: u8 = 0x09;
    /// Capability id of MSI-X.
    pub const CAP_ID_MSIX: u8 = 0x11;
    /// Virtio's PCI vendor id.
    pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;
}

/// Read access to a PCI config space: a [`PciFunction`], or an image of
/// its bytes ([`ConfigImage`]), so one capability walker
/// ([`crate::virtio_pci::caps::capability_list`]) serves both.
pub trait ConfigSpace {
    /// Read `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    ///
    /// An access outside the space, or a failed read.
    fn read_config_space(&self, offset: u64, buf: &mut [u8]) -> PciResult<()>;
}

impl<P: PciFunction + ?Sized> ConfigSpace for P {
    fn read_config_space(&self, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        self.config_read(offset, buf)
    }
}

/// A config-space image, such as a function's sysfs `config` file (which
/// shows only the first 64 bytes to a reader without root).
#[derive(Clone, Copy, Debug)]
pub struct ConfigImage<'a>(pub &'a [u8]);

impl ConfigSpace for ConfigImage<'_> {
    fn read_config_space(&self, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        let out = || PciError::ConfigOutOfRange {
            offset,
            len: buf.len(),
        };
        let start = usize::try_from(offset).map_err(|_| out())?;
        let end = start.checked_add(buf.len()).ok_or_else(out)?;
        let src = self.0.get(start..end).ok_or_else(out)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Helpers for typed config-space reads on any [`PciFunction`].
pub trait PciFunctionExt: PciFunction {
    /// Read an 8-bit config register.
    fn config_read_u8(&self, offset: u64) -> PciResult<u8> {
        let mut b = [0u8; 1];
        self.config_read(offset, &mut b)?;
        Ok(b[0])
    }
    /// Read a 16-bit little-endian config register.
    fn config_read_u16(&self, offset: u64) -> PciResult<u16> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    /// Read a 32-bit little-endian config register.
    fn config_read_u32(&self, offset: u64) -> PciResult<u32> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    /// Write a 16-bit little-endian config register.
    fn config_write_u16(&self, offset: u64, v: u16) -> PciResult<()> {
        self.config_write(offset, &v.to_le_bytes())
    }
}

impl<T: PciFunction + ?Sized> PciFunctionExt for T {}
