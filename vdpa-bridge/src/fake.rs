//! Test doubles (feature `test-utils`, never enabled by Cloud Hypervisor):
//! [`RawFunction`], a PCI function whose config space and BARs are plain
//! bytes, and [`ConfigBuilder`], for building odd capability layouts;
//! [`sysfs::FakeSysfs`], a fake `/sys/bus/pci` tree. The `vdpa-testkit`
//! package has a device with real virtio semantics.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::pci::{BarInfo, BarKind, BarMapping, IoWidth, PciError, PciFunction, PciResult};
use crate::types::{Iova, IovaRange};
use vm_memory::{MmapRegion, VolatileMemory as _};

/// A PCI function made of bytes: config space and BARs read back what was
/// written, nothing more. Writes are logged for assertions.
pub struct RawFunction {
    config: Mutex<Vec<u8>>,
    bars: [Option<(BarInfo, Mutex<Vec<u8>>)>; 6],
    /// BARs backed by anonymous host memory and reported as mapped.
    mapped: [Option<MappedBar>; 6],
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
            mapped: Default::default(),
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

    /// Give the function a memory BAR `index` of `size` bytes backed by
    /// page-aligned anonymous memory that [`PciFunction::bar_mappings`]
    /// reports, as VFIO reports an mmap-able BAR. Accesses through the
    /// mapping are not logged in [`RawFunction::writes`].
    ///
    /// # Panics
    ///
    /// When the memory cannot be allocated (test setup).
    pub fn with_mapped_bar(mut self, index: u8, size: u64) -> Self {
        let i = usize::from(index);
        if i < 6 {
            // Twice the size, so a start aligned to the BAR's size fits:
            // a BAR is naturally aligned, and tests of page sizes above the
            // host's (64 KiB) need a host address aligned that much.
            let size = size as usize;
            let region = MmapRegion::new(2 * size).expect("anonymous BAR memory");
            let addr = region.as_ptr() as usize;
            let base = addr.next_multiple_of(size.next_power_of_two()) - addr;
            self.mapped[i] = Some(MappedBar { region, base, size });
            self = self.with_bar(index, BarKind::Memory, size as u64);
        }
        self
    }

    /// Read `buf.len()` bytes at `offset` of BAR `index`, through its
    /// mapping when it has one.
    pub fn peek(&self, index: u8, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        self.bar_read(index, offset, buf)
    }

    /// Poke bytes into BAR `index`.
    pub fn poke(&self, index: u8, offset: usize, bytes: &[u8]) {
        if let Some(Some(m)) = self.mapped.get(usize::from(index)) {
            if let Some(s) = m.slice(offset as u64, bytes.len()) {
                s.copy_from(bytes);
            }
            return;
        }
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

/// A mapped BAR: `size` bytes at `base` in `region`.
struct MappedBar {
    region: MmapRegion,
    base: usize,
    size: usize,
}

impl MappedBar {
    fn slice(&self, offset: u64, len: usize) -> Option<vm_memory::VolatileSlice<'_>> {
        let r = range(offset, len, self.size as u64)?;
        self.region.get_slice(self.base + r.start, len).ok()
    }

    fn host_addr(&self) -> usize {
        self.region.as_ptr() as usize + self.base
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

// SAFETY: `bar_mappings` reports only ranges inside the `MmapRegion`s of
// `mapped` (`size` bytes from `base`, inside a region of twice that), which
// live (mapped, readable and writable) as long as the function.
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

    fn bar_mappings(&self, index: u8) -> Vec<BarMapping> {
        match self.mapped.get(usize::from(index)) {
            Some(Some(m)) => vec![BarMapping {
                offset: 0,
                len: m.size as u64,
                host_addr: m.host_addr(),
            }],
            _ => Vec::new(),
        }
    }

    fn bar_read(&self, index: u8, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        let (info, bytes) = self.bar(index)?;
        if let Some(Some(m)) = self.mapped.get(usize::from(index)) {
            let s = m.slice(offset, buf.len()).ok_or(PciError::BarOutOfRange {
                bar: index,
                offset,
                len: buf.len(),
                size: info.size,
            })?;
            s.copy_to(buf);
            return Ok(());
        }
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
        if let Some(Some(m)) = self.mapped.get(usize::from(index)) {
            let s = m.slice(offset, buf.len()).ok_or(PciError::BarOutOfRange {
                bar: index,
                offset,
                len: buf.len(),
                size: info.size,
            })?;
            s.copy_from(buf);
            lock(&self.writes).push((index, offset, buf.to_vec()));
            return Ok(());
        }
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
        _fd: Option<&EventFd>,
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

    /// Append an MSI-X capability: `vectors` entries, table at
    /// `table_off` of BAR `table_bar`, PBA at `pba_off` of BAR `pba_bar`.
    pub fn msix_cap(
        mut self,
        vectors: u16,
        table_bar: u8,
        table_off: u32,
        pba_bar: u8,
        pba_off: u32,
    ) -> Self {
        let pos = self.next_pos;
        self.link(pos);
        let b = &mut self.bytes;
        b[pos] = 0x11;
        b[pos + 2..pos + 4].copy_from_slice(&(vectors.saturating_sub(1) & 0x7ff).to_le_bytes());
        b[pos + 4..pos + 8].copy_from_slice(&(table_off | u32::from(table_bar & 7)).to_le_bytes());
        b[pos + 8..pos + 12].copy_from_slice(&(pba_off | u32::from(pba_bar & 7)).to_le_bytes());
        self.next_pos += 12;
        self
    }

    /// Append a shared-memory capability (`cfg_type` 8, the 24-byte
    /// `virtio_pci_cap64` form) naming `[offset, offset + length)` of `bar`.
    pub fn shm_cap(mut self, bar: u8, offset: u64, length: u64) -> Self {
        let pos = self.next_pos;
        self.link(pos);
        let b = &mut self.bytes;
        b[pos] = 0x09;
        b[pos + 2] = 24;
        b[pos + 3] = 8;
        b[pos + 4] = bar;
        b[pos + 8..pos + 12].copy_from_slice(&(offset as u32).to_le_bytes());
        b[pos + 12..pos + 16].copy_from_slice(&(length as u32).to_le_bytes());
        b[pos + 16..pos + 20].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
        b[pos + 20..pos + 24].copy_from_slice(&((length >> 32) as u32).to_le_bytes());
        self.next_pos += 24;
        self
    }

    /// Append a vendor-data capability (`cfg_type` 9: a vendor id and
    /// vendor-defined bytes, `len` bytes in all, at least 6).
    pub fn vendor_data_cap(mut self, len: u8) -> Self {
        let pos = self.next_pos;
        self.link(pos);
        let b = &mut self.bytes;
        b[pos] = 0x09;
        b[pos + 2] = len;
        b[pos + 3] = 9;
        b[pos + 4..pos + 6].copy_from_slice(&0x1af4u16.to_le_bytes());
        self.next_pos += usize::from(len.max(6)).next_multiple_of(4);
        self
    }

    /// Link a capability of raw `bytes` (id first) at `pos`, anywhere in
    /// the 256-byte space (for capabilities at odd places).
    pub fn cap_at(mut self, pos: usize, bytes: &[u8]) -> Self {
        self.link(pos);
        self.bytes[pos..pos + bytes.len()].copy_from_slice(bytes);
        self
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

pub use sysfs::{config_with_vendor_caps, FakeSysfs};

/// A fake `/sys/bus/pci` in a unique temporary directory, removed on drop,
/// for tests of code that reads sysfs.
pub mod sysfs {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake sysfs PCI bus tree.
    pub struct FakeSysfs {
        /// The directory standing for `/sys`.
        pub base: PathBuf,
    }

    impl FakeSysfs {
        /// An empty tree in a fresh temporary directory (`tag` names it).
        ///
        /// # Panics
        ///
        /// When the directories cannot be created (test setup).
        pub fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let base = std::env::temp_dir().join(format!(
                "vdpa-bridge-sysfs-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&base);
            fs::create_dir_all(base.join("bus/pci/devices")).unwrap();
            fs::create_dir_all(base.join("bus/pci/drivers")).unwrap();
            fs::create_dir_all(base.join("devices/pci0000:00")).unwrap();
            fs::create_dir_all(base.join("kernel/iommu_groups")).unwrap();
            fs::write(base.join("bus/pci/drivers_probe"), "").unwrap();
            Self { base }
        }

        /// The bus directory (`/sys/bus/pci`).
        pub fn bus(&self) -> PathBuf {
            self.base.join("bus/pci")
        }

        /// The devices directory (`/sys/bus/pci/devices`).
        pub fn devices(&self) -> PathBuf {
            self.bus().join("devices")
        }

        /// Register a driver directory with `bind`/`unbind` files.
        pub fn add_driver(&self, name: &str) {
            let d = self.bus().join("drivers").join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("bind"), "").unwrap();
            fs::write(d.join("unbind"), "").unwrap();
        }

        /// Add a device: real directory under `devices/pci0000:00`, linked
        /// from `bus/pci/devices`, as sysfs does.
        pub fn add_device(
            &self,
            bdf: &str,
            ids: (u16, u16, u16),
            config: &[u8],
            driver: Option<&str>,
            group: Option<u32>,
        ) -> PathBuf {
            let real = self.base.join("devices/pci0000:00").join(bdf);
            fs::create_dir_all(&real).unwrap();
            fs::write(real.join("vendor"), format!("0x{:04x}\n", ids.0)).unwrap();
            fs::write(real.join("device"), format!("0x{:04x}\n", ids.1)).unwrap();
            fs::write(real.join("subsystem_device"), format!("0x{:04x}\n", ids.2)).unwrap();
            fs::write(real.join("config"), config).unwrap();
            fs::write(real.join("driver_override"), "(null)\n").unwrap();
            if let Some(d) = driver {
                self.set_driver(&real, d);
            }
            if let Some(g) = group {
                let gdir = self.base.join("kernel/iommu_groups").join(g.to_string());
                fs::create_dir_all(gdir.join("devices")).unwrap();
                symlink(&real, gdir.join("devices").join(bdf)).unwrap();
                symlink(&gdir, real.join("iommu_group")).unwrap();
            }
            symlink(&real, self.devices().join(bdf)).unwrap();
            real
        }

        /// Point `dev/driver` at driver `name`.
        pub fn set_driver(&self, dev: &Path, name: &str) {
            self.add_driver(name);
            let link = dev.join("driver");
            let _ = fs::remove_file(&link);
            symlink(self.bus().join("drivers").join(name), link).unwrap();
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.base);
        }
    }

    /// A config space with the given vendor capabilities (`cfg_type`s),
    /// chained from 0x40.
    pub fn config_with_vendor_caps(len: usize, cfg_types: &[u8]) -> Vec<u8> {
        let mut c = vec![0u8; len];
        c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        if cfg_types.is_empty() {
            return c;
        }
        c[6] = 0x10; // status: capability list
        c[0x34] = 0x40;
        for (i, t) in cfg_types.iter().enumerate() {
            let p = 0x40 + i * 0x10;
            c[p] = 0x09;
            c[p + 1] = if i + 1 < cfg_types.len() {
                (p + 0x10) as u8
            } else {
                0
            };
            c[p + 2] = 0x10;
            c[p + 3] = *t;
        }
        c
    }
}
