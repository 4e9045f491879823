//! Test doubles (feature `test-utils`): [`RawFunction`], a PCI function
//! whose config space and BARs are plain bytes, for building odd capability
//! layouts; see `emu` for a device with real virtio semantics.

use std::os::fd::RawFd;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::pci::{BarInfo, BarKind, BarMapping, IoWidth, PciError, PciFunction, PciResult};
use crate::types::{Iova, IovaRange};

/// A PCI function made of bytes: config space and BARs read back what was
/// written, nothing more. Writes are logged for assertions.
pub struct RawFunction {
    config: Mutex<Vec<u8>>,
    bars: [Option<(BarInfo, Mutex<Vec<u8>>)>; 6],
    /// `(bar, offset, bytes)` of every BAR write, in order.
    pub writes: Mutex<Vec<(u8, u64, Vec<u8>)>>,
}

impl RawFunction {
    /// A function with 4 KiB of config space copied from `config` (padded
    /// with zeros) and no BARs.
    pub fn new(config: &[u8]) -> Self {
        let mut c = vec![0u8; 4096];
        let n = config.len().min(4096);
        c[..n].copy_from_slice(&config[..n]);
        RawFunction {
            config: Mutex::new(c),
            bars: Default::default(),
            writes: Mutex::new(Vec::new()),
        }
    }

    /// Give the function BAR `index` of `size` bytes and `kind`.
    pub fn with_bar(mut self, index: u8, kind: BarKind, size: u64) -> Self {
        if let Some(slot) = self.bars.get_mut(usize::from(index)) {
            *slot = Some((BarInfo { kind, size }, Mutex::new(vec![0u8; size as usize])));
        }
        self
    }

    /// Poke bytes into BAR `index`.
    pub fn poke(&self, index: u8, offset: usize, bytes: &[u8]) {
        if let Some(Some((_, b))) = self.bars.get(usize::from(index)) {
            let mut b = lock(b);
            b[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
    }

    fn bar(&self, index: u8) -> PciResult<&(BarInfo, Mutex<Vec<u8>>)> {
        self.bars
            .get(usize::from(index))
            .and_then(Option::as_ref)
            .ok_or(PciError::NoSuchBar(index))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn range(offset: u64, len: usize, size: u64) -> Option<std::ops::Range<usize>> {
    let end = offset.checked_add(len as u64)?;
    if end > size {
        return None;
    }
    Some(offset as usize..end as usize)
}

// SAFETY: `bar_mappings` returns no mappings, so there is nothing to keep
// valid.
unsafe impl PciFunction for RawFunction {
    fn config_read(&self, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        let c = lock(&self.config);
        let r = range(offset, buf.len(), 4096).ok_or(PciError::ConfigOutOfRange {
            offset,
            len: buf.len(),
        })?;
        buf.copy_from_slice(&c[r]);
        Ok(())
    }

    fn config_write(&self, offset: u64, buf: &[u8]) -> PciResult<()> {
        let mut c = lock(&self.config);
        let r = range(offset, buf.len(), 4096).ok_or(PciError::ConfigOutOfRange {
            offset,
            len: buf.len(),
        })?;
        c[r].copy_from_slice(buf);
        Ok(())
    }

    fn bar_info(&self, index: u8) -> Option<BarInfo> {
        self.bar(index).ok().map(|(i, _)| *i)
    }

    fn bar_mappings(&self, _index: u8) -> Vec<BarMapping> {
        Vec::new()
    }

    fn bar_read(&self, index: u8, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        let (info, bytes) = self.bar(index)?;
        let r = range(offset, buf.len(), info.size).ok_or(PciError::BarOutOfRange {
            bar: index,
            offset,
            len: buf.len(),
            size: info.size,
        })?;
        buf.copy_from_slice(&lock(bytes)[r]);
        Ok(())
    }

    fn bar_write(&self, index: u8, offset: u64, buf: &[u8]) -> PciResult<()> {
        let (info, bytes) = self.bar(index)?;
        let r = range(offset, buf.len(), info.size).ok_or(PciError::BarOutOfRange {
            bar: index,
            offset,
            len: buf.len(),
            size: info.size,
        })?;
        lock(bytes)[r].copy_from_slice(buf);
        lock(&self.writes).push((index, offset, buf.to_vec()));
        Ok(())
    }

    fn msix_vectors(&self) -> u32 {
        0
    }

    fn enable_msix(&self, _fds: &[Option<&EventFd>]) -> PciResult<()> {
        Err(PciError::Unsupported("MSI-X"))
    }

    fn disable_msix(&self) -> PciResult<()> {
        Ok(())
    }

    fn set_ioeventfd(
        &self,
        bar: u8,
        offset: u64,
        _width: IoWidth,
        _data: u64,
        _fd: Option<RawFd>,
    ) -> PciResult<()> {
        Err(PciError::IoeventfdUnsupported { bar, offset })
    }

    fn function_reset(&self) -> PciResult<bool> {
        Ok(false)
    }

    fn iova_range(&self) -> IovaRange {
        IovaRange::FULL
    }

    unsafe fn dma_map(&self, iova: Iova, size: u64, _host_addr: usize) -> PciResult<()> {
        Err(PciError::DmaRange { iova: iova.0, size })
    }

    fn dma_unmap(&self, iova: Iova, size: u64) -> PciResult<()> {
        Err(PciError::DmaRange { iova: iova.0, size })
    }

    fn describe(&self) -> String {
        "raw test function".into()
    }
}

/// Builds config-space images with a capability list, for tests.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    bytes: Vec<u8>,
    next_pos: usize,
    last_next_ptr: Option<usize>,
}

impl ConfigBuilder {
    /// A virtio device header: vendor 0x1af4, `device_id`, capability list
    /// flag set, no capabilities yet.
    pub fn virtio(device_id: u16) -> Self {
        let mut bytes = vec![0u8; 256];
        bytes[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        bytes[2..4].copy_from_slice(&device_id.to_le_bytes());
        bytes[6..8].copy_from_slice(&0x10u16.to_le_bytes());
        bytes[0x2c..0x2e].copy_from_slice(&0x1af4u16.to_le_bytes());
        bytes[0x2e..0x30].copy_from_slice(&(device_id.wrapping_sub(0x1040)).to_le_bytes());
        ConfigBuilder {
            bytes,
            next_pos: 0x40,
            last_next_ptr: None,
        }
    }

    fn link(&mut self, pos: usize) {
        match self.last_next_ptr {
            None => self.bytes[0x34] = pos as u8,
            Some(p) => self.bytes[p] = pos as u8,
        }
        self.last_next_ptr = Some(pos + 1);
    }

    /// Append a virtio vendor capability.
    pub fn virtio_cap(mut self, cfg_type: u8, bar: u8, offset: u32, length: u32) -> Self {
        let pos = self.next_pos;
        let len = if cfg_type == 2 { 20 } else { 16 };
        self.link(pos);
        let b = &mut self.bytes;
        b[pos] = 0x09;
        b[pos + 2] = len;
        b[pos + 3] = cfg_type;
        b[pos + 4] = bar;
        b[pos + 8..pos + 12].copy_from_slice(&offset.to_le_bytes());
        b[pos + 12..pos + 16].copy_from_slice(&length.to_le_bytes());
        self.next_pos += usize::from(len);
        self
    }

    /// Append a notify capability with `multiplier`.
    pub fn notify_cap(self, bar: u8, offset: u32, length: u32, multiplier: u32) -> Self {
        let pos = self.next_pos;
        let mut s = self.virtio_cap(2, bar, offset, length);
        s.bytes[pos + 16..pos + 20].copy_from_slice(&multiplier.to_le_bytes());
        s
    }

    /// Overwrite a byte (for malformed layouts).
    pub fn poke(mut self, pos: usize, v: u8) -> Self {
        self.bytes[pos] = v;
        self
    }

    /// Position the next capability will take.
    pub fn next_pos(&self) -> usize {
        self.next_pos
    }

    /// The finished bytes.
    pub fn build(self) -> Vec<u8> {
        self.bytes
    }

    /// QEMU's layout: common @BAR4+0, ISR +0x1000, device +0x2000, notify
    /// +0x3000 (multiplier 4), each 0x1000 long.
    pub fn qemu_like(device_id: u16) -> Self {
        ConfigBuilder::virtio(device_id)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x1000)
            .virtio_cap(4, 4, 0x2000, 0x1000)
            .notify_cap(4, 0x3000, 0x1000, 4)
    }
}
