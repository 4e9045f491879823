//! The emulated device's view of DMA: the driver's mappings, as guest
//! memory `virtio-queue` can walk.

use std::collections::BTreeMap;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use vdpa_bridge::pci::{PciError, PciResult};
use vdpa_bridge::types::IovaRange;

/// IOVA → (size, host address), and the memory built from it.
#[derive(Default)]
pub(super) struct DmaTable {
    maps: BTreeMap<u64, (u64, usize)>,
    mem: Option<GuestMemoryMmap>,
}

impl DmaTable {
    pub(super) fn len(&self) -> usize {
        self.maps.len()
    }

    pub(super) fn memory(&self) -> Option<GuestMemoryMmap> {
        self.mem.clone()
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
        self.mem = Some(GuestMemoryMmap::from_regions(regions).map_err(|_| ())?);
        Ok(())
    }
}
