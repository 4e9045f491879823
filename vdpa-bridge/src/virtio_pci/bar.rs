//! Typed access to the register windows of a virtio-pci function.
//!
//! This is the only module of the transport that touches raw pointers. Its
//! rules, modelled on vm-memory's `volatile_memory.rs`:
//!
//! * A [`BarWindow`] covers `[offset, offset + len)` of one BAR. Every
//!   access is bounds- and alignment-checked against that window before it
//!   happens, and the `// SAFETY:` comment of each `unsafe` block cites the
//!   check right above it.
//! * A window is *mapped* only when the [`PciFunction`] reports a host
//!   mapping covering the whole window; the window then holds an `Arc` of the
//!   function, which keeps the mapping alive. Otherwise every access goes
//!   through [`PciFunction::bar_read`]/[`PciFunction::bar_write`].
//! * Mapped accesses are single volatile loads/stores of the register's
//!   width, as PCI requires for device registers.

use std::sync::Arc;

use crate::pci::{PciError, PciFunction};

use super::caps::CapRegion;

/// Errors of register access.
#[derive(Debug, thiserror::Error)]
pub enum BarError {
    /// An access outside the window or misaligned for its width.
    #[error("register access at {offset:#x} (width {width}) is outside window of {len:#x} bytes or misaligned")]
    OutOfWindow {
        /// Offset in the window.
        offset: u64,
        /// Access width.
        width: usize,
        /// Window length.
        len: u64,
    },
    /// The slow path failed.
    #[error("BAR access through the function failed")]
    Pci(#[source] PciError),
}

/// A window of one BAR: common config, ISR, device config or notify.
pub struct BarWindow<P: PciFunction + ?Sized> {
    func: Arc<P>,
    bar: u8,
    offset: u64,
    len: u64,
    /// Host address of the window's first byte when mapped.
    host: Option<usize>,
}

impl<P: PciFunction + ?Sized> Clone for BarWindow<P> {
    fn clone(&self) -> Self {
        BarWindow {
            func: Arc::clone(&self.func),
            bar: self.bar,
            offset: self.offset,
            len: self.len,
            host: self.host,
        }
    }
}

impl<P: PciFunction + ?Sized> std::fmt::Debug for BarWindow<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarWindow")
            .field("bar", &self.bar)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("mapped", &self.host.is_some())
            .finish()
    }
}

impl<P: PciFunction + ?Sized> BarWindow<P> {
    /// A window over `region`, mapped when the function maps all of it.
    ///
    /// The caller has checked `region` against the BAR's size (the
    /// capability parser does); mappings reported by the function are
    /// trusted to be valid for as long as the function lives, which is the
    /// [`PciFunction::bar_mappings`] contract.
    pub fn new(func: Arc<P>, region: CapRegion) -> Self {
        let host =
            func.bar_mappings(region.bar)
                .iter()
                .find(|m| {
                    region.offset >= m.offset
                        && region.offset.checked_add(region.length).is_some_and(|end| {
                            m.offset.checked_add(m.len).is_some_and(|me| end <= me)
                        })
                })
                .and_then(|m| {
                    usize::try_from(region.offset - m.offset)
                        .ok()
                        .and_then(|d| m.host_addr.checked_add(d))
                })
                // Registers are accessed with aligned loads; a window whose host
                // address is not 8-aligned goes through the slow path instead.
                .filter(|h| h % 8 == 0);
        BarWindow {
            func,
            bar: region.bar,
            offset: region.offset,
            len: region.length,
            host,
        }
    }

    /// Whether accesses go straight to a host mapping.
    pub fn is_mapped(&self) -> bool {
        self.host.is_some()
    }

    /// Host address of window offset `off`, when mapped and in range.
    pub fn host_addr(&self, off: u64) -> Option<usize> {
        if off >= self.len {
            return None;
        }
        self.host
            .and_then(|h| usize::try_from(off).ok().and_then(|o| h.checked_add(o)))
    }

    /// BAR index.
    pub fn bar(&self) -> u8 {
        self.bar
    }

    /// Offset of the window in its BAR.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the window.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: u64, width: usize) -> Result<(), BarError> {
        let w = width as u64;
        let ok = off.is_multiple_of(w) && off.checked_add(w).is_some_and(|end| end <= self.len);
        if ok {
            Ok(())
        } else {
            Err(BarError::OutOfWindow {
                offset: off,
                width,
                len: self.len,
            })
        }
    }

    fn slow_read(&self, off: u64, buf: &mut [u8]) -> Result<(), BarError> {
        self.func
            .bar_read(self.bar, self.offset + off, buf)
            .map_err(BarError::Pci)
    }

    fn slow_write(&self, off: u64, buf: &[u8]) -> Result<(), BarError> {
        self.func
            .bar_write(self.bar, self.offset + off, buf)
            .map_err(BarError::Pci)
    }

    /// Read an 8-bit register.
    pub fn read8(&self, off: u64) -> Result<u8, BarError> {
        self.check(off, 1)?;
        match self.host {
            Some(h) => {
                // SAFETY: `check` put `off` (+1) inside the window; the window
                // lies inside a live mapping of the function (see `new`), held
                // alive by `self.func`. Device memory is only accessed
                // volatilely.
                Ok(unsafe { std::ptr::read_volatile((h + off as usize) as *const u8) })
            }
            None => {
                let mut b = [0u8; 1];
                self.slow_read(off, &mut b)?;
                Ok(b[0])
            }
        }
    }

    /// Read a 16-bit little-endian register.
    pub fn read16(&self, off: u64) -> Result<u16, BarError> {
        self.check(off, 2)?;
        match self.host {
            Some(h) => {
                // SAFETY: `check` put `off` (+2) inside the window and made it
                // 2-aligned relative to the window; the window lies in a live
                // mapping held by `self.func`. Volatile, single access.
                let v = unsafe { std::ptr::read_volatile((h + off as usize) as *const u16) };
                Ok(u16::from_le(v))
            }
            None => {
                let mut b = [0u8; 2];
                self.slow_read(off, &mut b)?;
                Ok(u16::from_le_bytes(b))
            }
        }
    }

    /// Read a 32-bit little-endian register.
    pub fn read32(&self, off: u64) -> Result<u32, BarError> {
        self.check(off, 4)?;
        match self.host {
            Some(h) => {
                // SAFETY: `check` put `off` (+4) inside the window, 4-aligned
                // relative to it; the mapping is held by `self.func`.
                let v = unsafe { std::ptr::read_volatile((h + off as usize) as *const u32) };
                Ok(u32::from_le(v))
            }
            None => {
                let mut b = [0u8; 4];
                self.slow_read(off, &mut b)?;
                Ok(u32::from_le_bytes(b))
            }
        }
    }

    /// Write an 8-bit register.
    pub fn write8(&self, off: u64, v: u8) -> Result<(), BarError> {
        self.check(off, 1)?;
        match self.host {
            Some(h) => {
                // SAFETY: as in `read8`: bounds checked by `check`, mapping
                // held by `self.func`.
                unsafe { std::ptr::write_volatile((h + off as usize) as *mut u8, v) };
                Ok(())
            }
            None => self.slow_write(off, &[v]),
        }
    }

    /// Write a 16-bit little-endian register.
    pub fn write16(&self, off: u64, v: u16) -> Result<(), BarError> {
        self.check(off, 2)?;
        match self.host {
            Some(h) => {
                // SAFETY: as in `read16`: bounds and alignment checked by
                // `check`, mapping held by `self.func`.
                unsafe { std::ptr::write_volatile((h + off as usize) as *mut u16, v.to_le()) };
                Ok(())
            }
            None => self.slow_write(off, &v.to_le_bytes()),
        }
    }

    /// Write a 32-bit little-endian register.
    pub fn write32(&self, off: u64, v: u32) -> Result<(), BarError> {
        self.check(off, 4)?;
        match self.host {
            Some(h) => {
                // SAFETY: as in `read32`: bounds and alignment checked by
                // `check`, mapping held by `self.func`.
                unsafe { std::ptr::write_volatile((h + off as usize) as *mut u32, v.to_le()) };
                Ok(())
            }
            None => self.slow_write(off, &v.to_le_bytes()),
        }
    }

    /// Write a 64-bit register as two 32-bit halves, low first (virtio 1.2
    /// §4.1.3.1: 64-bit fields may be accessed as two 32-bit halves).
    pub fn write64(&self, off: u64, v: u64) -> Result<(), BarError> {
        self.write32(off, v as u32)?;
        self.write32(off + 4, (v >> 32) as u32)
    }

    /// Read a 64-bit register as two 32-bit halves.
    pub fn read64(&self, off: u64) -> Result<u64, BarError> {
        let lo = self.read32(off)?;
        let hi = self.read32(off + 4)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }
}
