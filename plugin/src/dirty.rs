//! The pages of guest memory the device may have written, for a VMM's
//! migration (see [`crate::BridgeDevice::start_dirty_log`]).
//!
//! One bit per 4 KiB page of each guest memory region, set with atomic
//! `fetch_or` by the shadow relay and taken with `swap(0)` by the VMM's
//! migration thread; the region list sits behind a read-write lock that
//! only memory hotplug takes for writing (the relay's read lock is never
//! contended otherwise). 4 KiB is the granularity of Cloud Hypervisor's
//! own dirty log whatever the host's page size.
//!
//! vm-memory's `AtomicBitmap` tracks writes made *through* a
//! `GuestMemoryMmap`; the device's DMA bypasses it, so the bridge keeps
//! its own log of what it let the device write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use vm_memory::{GuestMemory, GuestMemoryRegion};

/// Granularity of the log.
pub const DIRTY_PAGE: u64 = 4096;

/// A guest-physical range whose pages may have changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirtyRange {
    /// First guest-physical address (a multiple of [`DIRTY_PAGE`]).
    pub gpa: u64,
    /// Length in bytes (a multiple of [`DIRTY_PAGE`]).
    pub len: u64,
}

struct Region {
    start: u64,
    len: u64,
    bits: Vec<AtomicU64>,
}

/// Dirty bits over guest memory.
pub(crate) struct DirtyLog {
    regions: RwLock<Vec<Region>>,
    /// Marks that fell outside every region (a buffer the relay refused
    /// does not reach here; this counts what should never happen).
    outside: AtomicU64,
}

impl DirtyLog {
    /// A clean log covering every region of `mem`.
    pub fn for_memory<M: GuestMemory>(mem: &M) -> DirtyLog {
        let log = DirtyLog {
            regions: RwLock::new(Vec::new()),
            outside: AtomicU64::new(0),
        };
        log.cover(mem);
        log
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<Region>> {
        self.regions.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Cover every region of `mem` too (memory added since), keeping the
    /// bits of the regions covered already.
    pub fn cover<M: GuestMemory>(&self, mem: &M) {
        let mut regions = self.regions.write().unwrap_or_else(|p| p.into_inner());
        for r in mem.iter() {
            let (start, len) = (r.start_addr().0, r.len());
            if regions.iter().any(|k| k.start == start && k.len == len) {
                continue;
            }
            let pages = len.div_ceil(DIRTY_PAGE);
            let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
            regions.push(Region {
                start,
                len,
                bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        regions.sort_by_key(|r| r.start);
    }

    /// Mark `[gpa, gpa + len)` dirty (nothing for `len` 0).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Some(last) = gpa.checked_add(len - 1) else {
            self.outside.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let regions = self.read();
        let mut at = gpa;
        // A range may span adjacent regions.
        while at <= last {
            let i = regions.partition_point(|r| r.start <= at);
            let Some(r) = i.checked_sub(1).and_then(|i| regions.get(i)) else {
                self.outside.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let off = at - r.start;
            if off >= r.len {
                self.outside.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let end = (last - r.start).min(r.len - 1);
            for page in off / DIRTY_PAGE..=end / DIRTY_PAGE {
                let (w, b) = ((page / 64) as usize, page % 64);
                if let Some(word) = r.bits.get(w) {
                    word.fetch_or(1 << b, Ordering::Relaxed);
                }
            }
            match (r.start + end).checked_add(1) {
                Some(n) => at = n,
                None => return,
            }
        }
    }

    /// Take the dirty ranges (merged, ascending) and clear them.
    pub fn take(&self) -> Vec<DirtyRange> {
        let mut out: Vec<DirtyRange> = Vec::new();
        for r in self.read().iter() {
            for (w, word) in r.bits.iter().enumerate() {
                let mut v = word.swap(0, Ordering::AcqRel);
                while v != 0 {
                    let b = u64::from(v.trailing_zeros());
                    v &= v - 1;
                    let gpa = r.start + (w as u64 * 64 + b) * DIRTY_PAGE;
                    let len = DIRTY_PAGE.min(r.start + r.len - gpa);
                    match out.last_mut() {
                        Some(l) if l.gpa + l.len == gpa => l.len += len,
                        _ => out.push(DirtyRange { gpa, len }),
                    }
                }
            }
        }
        out
    }

    /// Marks outside guest memory so far.
    pub fn outside(&self) -> u64 {
        self.outside.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn log() -> DirtyLog {
        let m: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
            (GuestAddress(0x100000), 0x3000),
        ])
        .unwrap();
        DirtyLog::for_memory(&m)
    }

    #[test]
    fn marks_merge_across_adjacent_regions_and_take_clears() {
        let l = log();
        l.mark(0xfff0, 0x20); // last page of region 0, first of region 1
        l.mark(0x100fff, 2); // two pages of region 2
        l.mark(0x5000, 1);
        assert_eq!(
            l.take(),
            vec![
                DirtyRange {
                    gpa: 0x5000,
                    len: 0x1000
                },
                DirtyRange {
                    gpa: 0xf000,
                    len: 0x2000
                },
                DirtyRange {
                    gpa: 0x100000,
                    len: 0x2000
                },
            ]
        );
        assert!(l.take().is_empty());
        assert_eq!(l.outside(), 0);
    }

    #[test]
    fn memory_added_later_is_covered_and_earlier_bits_kept() {
        let l = log();
        l.mark(0x5000, 1);
        l.mark(0x200000, 1);
        assert_eq!(l.outside(), 1);
        let more: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x200000), 0x1000),
        ])
        .unwrap();
        l.cover(&more);
        l.mark(0x200000, 1);
        assert_eq!(
            l.take(),
            vec![
                DirtyRange {
                    gpa: 0x5000,
                    len: 0x1000
                },
                DirtyRange {
                    gpa: 0x200000,
                    len: 0x1000
                },
            ]
        );
    }

    #[test]
    fn marks_outside_memory_are_counted_not_recorded() {
        let l = log();
        l.mark(0x50000, 4);
        l.mark(u64::MAX, 2);
        l.mark(0x102fff, 2); // last byte of region 2 and one past
        assert_eq!(
            l.take(),
            vec![DirtyRange {
                gpa: 0x102000,
                len: 0x1000
            }]
        );
        assert_eq!(l.outside(), 3);
    }
}
