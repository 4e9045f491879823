//! DMA mappings of guest memory for the device.
//!
//! Without a vIOMMU the guest's drivers program guest-physical addresses,
//! so guest RAM is mapped with IOVA = GPA, one mapping per memory region,
//! as the VMM adds regions (boot RAM, hotplug). With a vIOMMU the VMM calls
//! [`DmaHandle::map`] / [`DmaHandle::unmap`] with the guest's IOVAs.
//!
//! Only guest memory is ever mapped: a request is resolved to host
//! addresses through the guest memory map and refused when any part of it
//! is not guest RAM. Each mapping keeps a clone of the guest memory map it
//! was resolved in (reference-counted regions), so the host pages stay
//! mapped until the device's mapping is gone, even when the VMM removes
//! the region from its own map first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vdpa_bridge::{DmaMapper, Iova, IovaRange};
use vm_memory::{
    Address, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryRegion,
};

use crate::error::{backend_err, Error, Result};
use crate::slot::Slot;

struct Mapping<M> {
    size: u64,
    gpa: u64,
    /// Keeps the host pages alive while the device may access them.
    _keep: M,
}

/// The device's mappings, keyed by IOVA.
pub(crate) struct DmaTable<M> {
    maps: BTreeMap<u64, Mapping<M>>,
}

impl<M> Default for DmaTable<M> {
    fn default() -> Self {
        DmaTable {
            maps: BTreeMap::new(),
        }
    }
}

impl<M> DmaTable<M> {
    /// Check `[iova, iova + size)` is non-empty, does not overflow, lies in
    /// `range` and overlaps no mapping.
    fn check(&self, iova: u64, size: u64, range: IovaRange) -> Result<()> {
        let err = |reason| Error::Dma { iova, size, reason };
        if size == 0 {
            return Err(err("empty mapping"));
        }
        let last = iova.checked_add(size - 1).ok_or(err("range overflows"))?;
        range.check(iova, size)?;
        if let Some((&s, m)) = self.maps.range(..=last).next_back() {
            if s + (m.size - 1) >= iova {
                return Err(err("overlaps an existing mapping"));
            }
        }
        Ok(())
    }
}

/// Maps guest memory for one device. Cloneable; all clones share the
/// table (CH calls it from its device manager and its virtio-iommu).
pub struct DmaHandle<B, M: GuestMemory> {
    backend: Arc<Slot<B>>,
    table: Arc<Mutex<DmaTable<M>>>,
    mem: GuestMemoryAtomic<M>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    maps: AtomicU64,
    unmaps: AtomicU64,
}

/// What a [`DmaHandle`] has done (behind a vIOMMU: the guest's map and
/// unmap requests that reached the device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// Mappings made on the backend.
    pub maps: u64,
    /// Mappings removed from the backend.
    pub unmaps: u64,
    /// Mappings in the table now.
    pub live: usize,
}

impl<B, M: GuestMemory> Clone for DmaHandle<B, M> {
    fn clone(&self) -> Self {
        DmaHandle {
            backend: self.backend.clone(),
            table: self.table.clone(),
            mem: self.mem.clone(),
            counts: self.counts.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge the control path.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B: DmaMapper, M: GuestMemory> DmaHandle<B, M> {
    /// Remove every mapping (teardown). A mapping the backend fails to
    /// remove stays in the table, so the guest memory it points into stays
    /// mapped in this process for as long as the device may reach it.
    pub fn unmap_all(&self) {
        let mut table = lock(&self.table);
        let released = self.backend.with(|backend| {
            table
                .maps
                .retain(|&s, m| match backend.dma_unmap(Iova(s), m.size) {
                    Ok(()) => {
                        self.counts.unmaps.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    Err(e) => {
                        log::warn!("DMA unmap of {s:#x} (+{:#x}) failed, kept: {e}", m.size);
                        true
                    }
                });
        });
        if released.is_err() {
            // The device is gone, and its mappings with it.
            table.maps.clear();
        }
    }

    /// Forget every mapping: the backend was released, and closing it
    /// removed them (see [`crate::BridgeDevice::release`]).
    pub(crate) fn forget_all(&self) {
        lock(&self.table).maps.clear();
    }

    /// Maps and unmaps done so far, and the mappings in the table.
    pub fn stats(&self) -> DmaStats {
        DmaStats {
            maps: self.counts.maps.load(Ordering::Relaxed),
            unmaps: self.counts.unmaps.load(Ordering::Relaxed),
            live: lock(&self.table).maps.len(),
        }
    }

    /// Current mappings as `(iova, gpa, size)`, sorted by IOVA.
    pub fn mappings(&self) -> Vec<(u64, u64, u64)> {
        lock(&self.table)
            .maps
            .iter()
            .map(|(&s, m)| (s, m.gpa, m.size))
            .collect()
    }
}

impl<B, M> DmaHandle<B, M>
where
    B: DmaMapper,
    M: GuestMemory + Clone,
{
    /// The guest memory the handle resolves addresses in.
    pub(crate) fn guest_memory(&self) -> &GuestMemoryAtomic<M> {
        &self.mem
    }

    pub(crate) fn new(backend: Arc<Slot<B>>, mem: GuestMemoryAtomic<M>) -> Self {
        DmaHandle {
            backend,
            table: Arc::new(Mutex::new(DmaTable::default())),
            mem,
            counts: Arc::default(),
        }
    }

    /// The IOVA range the device accepts (`None` once it was released).
    pub fn iova_range(&self) -> Option<IovaRange> {
        self.backend.with(|b| b.iova_range()).ok()
    }

    /// Map guest-physical `[gpa, gpa + size)` at `iova`. The range may
    /// span adjacent regions; every byte must be guest RAM.
    ///
    /// # Errors
    ///
    /// A bad range, memory that is not guest RAM, the backend's refusal,
    /// or [`Error::Released`] once the device was released.
    pub fn map(&self, iova: u64, gpa: u64, size: u64) -> Result<()> {
        let range = self.iova_range().ok_or(Error::Released)?;
        let mut table = lock(&self.table);
        table.check(iova, size, range)?;
        gpa.checked_add(size)
            .ok_or(Error::NotGuestMemory { gpa, size })?;
        let snapshot: M = (*self.mem.memory()).clone();
        // Resolve every piece first: nothing is mapped if any part fails.
        let mut pieces = Vec::new();
        let mut done = 0u64;
        while done < size {
            let at = GuestAddress(gpa + done);
            let region = snapshot
                .find_region(at)
                .ok_or(Error::NotGuestMemory { gpa, size })?;
            let off = at
                .checked_offset_from(region.start_addr())
                .ok_or(Error::NotGuestMemory { gpa, size })?;
            let len = (region.len() - off).min(size - done);
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(off))
                .map_err(|_| Error::NotGuestMemory { gpa, size })? as usize;
            pieces.push((iova + done, gpa + done, len, host));
            done += len;
        }
        self.backend
            .with(|backend| map_pieces(backend, &mut table, &pieces, &snapshot))??;
        self.counts
            .maps
            .fetch_add(pieces.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Remove the mappings in `[iova, iova + size)`. The range must cover
    /// whole mappings (as the vIOMMU's unmap of a mapped range does).
    pub fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        let err = |reason| Error::Dma { iova, size, reason };
        if size == 0 {
            return Err(err("empty unmap"));
        }
        let last = iova.checked_add(size - 1).ok_or(err("range overflows"))?;
        let mut table = lock(&self.table);
        let hit: Vec<(u64, u64)> = table
            .maps
            .range(iova..=last)
            .map(|(&s, m)| (s, m.size))
            .collect();
        if hit.iter().any(|&(s, l)| s + (l - 1) > last)
            || table
                .maps
                .range(..iova)
                .next_back()
                .is_some_and(|(&s, m)| s + (m.size - 1) >= iova)
        {
            return Err(err("splits an existing mapping"));
        }
        if hit.is_empty() {
            return Ok(());
        }
        let unmapped = self.backend.with(|backend| {
            for (s, l) in hit {
                backend
                    .dma_unmap(Iova(s), l)
                    .map_err(backend_err("dma_unmap"))?;
                table.maps.remove(&s);
                self.counts.unmaps.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        match unmapped {
            // Nothing is mapped any more once the device was released: its
            // mappings went with it (a VMM unmaps guest RAM at unplug).
            Err(Error::Released) => {
                table.maps.clear();
                Ok(())
            }
            r => r?,
        }
    }

    /// Map every region of guest memory with IOVA = GPA (no vIOMMU).
    /// Regions already mapped are skipped, so this also serves hotplug.
    pub fn map_guest_memory(&self) -> Result<()> {
        let regions: Vec<(u64, u64)> = self
            .mem
            .memory()
            .iter()
            .map(|r| (r.start_addr().raw_value(), r.len()))
            .collect();
        for (gpa, len) in regions {
            let mapped = lock(&self.table)
                .maps
                .get(&gpa)
                .is_some_and(|m| m.gpa == gpa && m.size == len);
            if !mapped {
                self.map(gpa, gpa, len)?;
            }
        }
        Ok(())
    }
}

/// Map resolved `(iova, gpa, len, host)` pieces on `backend`, recording
/// each in `table`; on a failure, undo the pieces already mapped.
fn map_pieces<B: DmaMapper, M: Clone>(
    backend: &B,
    table: &mut DmaTable<M>,
    pieces: &[(u64, u64, u64, usize)],
    snapshot: &M,
) -> Result<()> {
    for (i, &(piova, pgpa, len, host)) in pieces.iter().enumerate() {
        // SAFETY: `host` points into a guest memory region of `snapshot`
        // with at least `len` bytes from it (resolved by `DmaHandle::map`);
        // the clone of the memory map stored with the mapping keeps the
        // region mapped until the mapping is removed (below or in
        // `unmap`/`unmap_all`). Guest memory is only accessed through
        // volatile accessors by the VMM.
        let r = unsafe { backend.dma_map(Iova(piova), len, host) };
        if let Err(source) = r {
            for &(u, _, l, _) in &pieces[..i] {
                // A piece the backend cannot remove stays recorded (and
                // its memory kept mapped), as in `unmap_all`.
                match backend.dma_unmap(Iova(u), l) {
                    Ok(()) => {
                        table.maps.remove(&u);
                    }
                    Err(e) => log::warn!("DMA unmap of {u:#x} (+{l:#x}) failed, kept: {e}"),
                }
            }
            return Err(backend_err("dma_map")(source));
        }
        table.maps.insert(
            piova,
            Mapping {
                size: len,
                gpa: pgpa,
                _keep: snapshot.clone(),
            },
        );
    }
    Ok(())
}
