//! The emulated device's view of DMA: the driver's mappings, as guest
//! memory `virtio-queue` can walk.

use std::collections::{BTreeMap, BTreeSet};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

/// The device's view of memory: every write it makes is recorded in the
/// regions' bitmaps (host-page granular), for tests that compare it with
/// what a bridge logged as dirty.
pub(super) type DevMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

use vdpa_bridge::pci::{PciError, PciResult};
use vdpa_bridge::types::IovaRange;

/// IOVA → (size, host address), and the memory built from it.
#[derive(Default)]
pub(super) struct DmaTable {
    maps: BTreeMap<u64, (u64, usize)>,
    mem: Option<DevMem>,
    /// IOVAs of the pages written, harvested from the bitmaps.
    written: BTreeSet<u64>,
}

impl DmaTable {
    pub(super) fn len(&self) -> usize {
        self.maps.len()
    }

    pub(super) fn memory(&self) -> Option<DevMem> {
        self.mem.clone()
    }

    /// Move the bitmaps' bits into `written`.
    fn harvest(&mut self) {
        let Some(mem) = &self.mem else { return };
        let page = vdpa_bridge::host::page_size();
        for r in mem.iter() {
            for (w, word) in std::ops::Deref::deref(r)
                .bitmap()
                .get_and_reset()
                .into_iter()
                .enumerate()
            {
                for b in 0..64u64 {
                    if word & (1 << b) != 0 {
                        self.written
                            .insert(r.start_addr().0 + (w as u64 * 64 + b) * page);
                    }
                }
            }
        }
    }

    /// The pages (host-page aligned IOVAs) the device wrote since the
    /// last call.
    pub(super) fn take_written(&mut self) -> BTreeSet<u64> {
        self.harvest();
        std::mem::take(&mut self.written)
    }

    /// # Safety
    ///
    /// [`crate::PciFunction::dma_map`]'s contract: the host range stays
    /// mapped until it is unmapped here.
    pub(super) unsafe fn map(
        &mut self,
        iova: u64,
        size: u64,
        host: usize,
        range: IovaRange,
    ) -> PciResult<()> {
        let bad = PciError::DmaRange { iova, size };
        // Page-granular, as an IOMMU is (and as MmapRegion::build_raw
        // needs the host address): the host's page size.
        let page = vdpa_bridge::host::page_size();
        let aligned = iova.is_multiple_of(page)
            && size.is_multiple_of(page)
            && (host as u64).is_multiple_of(page);
        if size == 0 || !aligned || !range.contains(iova, size) {
            return Err(bad);
        }
        let last = iova + (size - 1);
        if let Some((&s, &(l, _))) = self.maps.range(..=last).next_back() {
            if s + (l - 1) >= iova {
                return Err(bad);
            }
        }
        self.maps.insert(iova, (size, host));
        if self.rebuild().is_err() {
            self.maps.remove(&iova);
            let _ = self.rebuild();
            return Err(PciError::DmaRange { iova, size });
        }
        Ok(())
    }

    pub(super) fn unmap(&mut self, iova: u64, size: u64) -> PciResult<()> {
        match self.maps.get(&iova) {
            Some(&(l, _)) if l == size => {
                self.maps.remove(&iova);
                let _ = self.rebuild();
                Ok(())
            }
            _ => Err(PciError::DmaRange { iova, size }),
        }
    }

    fn rebuild(&mut self) -> Result<(), ()> {
        self.harvest();
        if self.maps.is_empty() {
            self.mem = None;
            return Ok(());
        }
        let mut regions = Vec::with_capacity(self.maps.len());
        for (&iova, &(size, host)) in &self.maps {
            let len = usize::try_from(size).map_err(|_| ())?;
            // SAFETY: `map`'s contract keeps `[host, host + size)` mapped
            // until `unmap` removes it, which rebuilds this memory without
            // it; the region does not own (or unmap) the pages.
            let region = unsafe {
                MmapRegion::build_raw(
                    host as *mut u8,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(|_| ())?;
            regions.push(GuestRegionMmap::new(region, GuestAddress(iova)).ok_or(())?);
        }
        self.mem = Some(DevMem::from_regions(regions).map_err(|_| ())?);
        Ok(())
    }
}
