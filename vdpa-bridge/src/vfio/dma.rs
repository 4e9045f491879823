//! Book-keeping of the DMA mappings of one container: usable IOVA ranges,
//! overlap checks and which mappings an unmap covers; and, for a container
//! several functions share ([`super::SharedContainer`]), the reference
//! counts of its mappings and where a function's own memory may go. No
//! system calls.

use std::collections::BTreeMap;

use crate::types::IovaRange;

/// The IOVA ranges the IOMMU accepts, sorted and disjoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IovaRanges(Vec<IovaRange>);

impl IovaRanges {
    /// Fallback when the kernel does not report ranges: 39 address bits,
    /// the smallest width of Intel VT-d (and of QEMU's intel-iommu default).
    pub const FALLBACK: IovaRange = IovaRange {
        first: 0,
        last: (1 << 39) - 1,
    };

    /// Ranges as the kernel reported them (sorted by start).
    pub fn new(ranges: Vec<IovaRange>) -> Self {
        if ranges.is_empty() {
            Self(vec![Self::FALLBACK])
        } else {
            Self(ranges)
        }
    }

    /// The smallest single range covering every usable IOVA. The holes in
    /// it (such as the x86 MSI window) are refused by [`Self::contains`].
    /// Sorted by start only: a range may end past the next one's end (a
    /// malformed reply's nested ranges), so the last ends are compared too.
    pub fn envelope(&self) -> IovaRange {
        match (self.0.first(), self.0.iter().map(|r| r.last).max()) {
            (Some(f), Some(last)) => IovaRange {
                first: f.first,
                last,
            },
            _ => Self::FALLBACK,
        }
    }

    /// Whether `[iova, iova + size)` lies inside one usable range.
    pub fn contains(&self, iova: u64, size: u64) -> bool {
        self.0.iter().any(|r| r.contains(iova, size))
    }
}

/// Live mappings, by IOVA → size.
#[derive(Debug, Default)]
pub struct DmaTracker {
    maps: BTreeMap<u64, u64>,
}

impl DmaTracker {
    /// Whether a new mapping may be added: inside `ranges`, no overlap.
    pub fn may_map(&self, ranges: &IovaRanges, iova: u64, size: u64) -> bool {
        if !ranges.contains(iova, size) {
            return false;
        }
        // contains() ruled out size 0 and wrap-around.
        let end = iova + (size - 1);
        match self.maps.range(..=end).next_back() {
            Some((&start, &len)) => start + (len - 1) < iova,
            None => true,
        }
    }

    /// Record a mapping (after the kernel accepted it).
    pub fn insert(&mut self, iova: u64, size: u64) {
        self.maps.insert(iova, size);
    }

    /// Forget a mapping (after the kernel removed it).
    pub fn remove(&mut self, iova: u64) {
        self.maps.remove(&iova);
    }

    /// The mappings that `[iova, iova + size)` removes. `None` when it
    /// covers none, wraps, or cuts a mapping in two (type1v2 cannot split
    /// mappings).
    pub fn unmap_plan(&self, iova: u64, size: u64) -> Option<Vec<(u64, u64)>> {
        if size == 0 {
            return None;
        }
        let end = iova.checked_add(size - 1)?;
        // A mapping starting before `iova` that reaches into the range.
        if let Some((&s, &l)) = self.maps.range(..iova).next_back() {
            if s + (l - 1) >= iova {
                return None;
            }
        }
        let mut plan = Vec::new();
        for (&s, &l) in self.maps.range(iova..=end) {
            if s + (l - 1) > end {
                return None;
            }
            plan.push((s, l));
        }
        (!plan.is_empty()).then_some(plan)
    }

    /// Every live mapping.
    pub fn all(&self) -> Vec<(u64, u64)> {
        self.maps.iter().map(|(&s, &l)| (s, l)).collect()
    }
}

/// A mapping of a shared container: what it maps and how many functions
/// hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    size: u64,
    host: usize,
    refs: u32,
}

/// What [`SharedMaps::acquire`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// Nothing there: the kernel must map it, then [`SharedMaps::insert`].
    New,
    /// The same mapping (IOVA, size and host address) is there already;
    /// its count was raised.
    Shared,
    /// Outside the usable ranges, or overlapping a different mapping.
    Refused,
}

/// What [`SharedMaps::release`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// That was the last holder: the kernel must unmap it, then
    /// [`SharedMaps::remove`].
    Last,
    /// Others still hold it; the count was lowered.
    Shared,
    /// No such mapping.
    Unknown,
}

/// The mappings of a container several functions share, counted: guest
/// RAM that N functions map at the same IOVA with the same host address is
/// mapped (and pinned) once.
#[derive(Debug, Default)]
pub struct SharedMaps {
    maps: BTreeMap<u64, Held>,
}

impl SharedMaps {
    /// Take a reference to `[iova, iova + size)` → `host`.
    pub fn acquire(&mut self, ranges: &IovaRanges, iova: u64, size: u64, host: usize) -> Acquire {
        if !ranges.contains(iova, size) {
            return Acquire::Refused;
        }
        if let Some(h) = self.maps.get_mut(&iova) {
            if h.size == size && h.host == host {
                return match h.refs.checked_add(1) {
                    Some(r) => {
                        h.refs = r;
                        Acquire::Shared
                    }
                    None => Acquire::Refused,
                };
            }
            return Acquire::Refused;
        }
        // contains() ruled out size 0 and wrap-around.
        let end = iova + (size - 1);
        match self.maps.range(..=end).next_back() {
            Some((&s, h)) if s + (h.size - 1) >= iova => Acquire::Refused,
            _ => Acquire::New,
        }
    }

    /// Record a new mapping the kernel accepted, held once.
    pub fn insert(&mut self, iova: u64, size: u64, host: usize) {
        self.maps.insert(
            iova,
            Held {
                size,
                host,
                refs: 1,
            },
        );
    }

    /// Drop a reference to the mapping at `iova` of `size` bytes.
    pub fn release(&mut self, iova: u64, size: u64) -> Release {
        match self.maps.get_mut(&iova) {
            Some(h) if h.size == size => {
                if h.refs > 1 {
                    h.refs -= 1;
                    Release::Shared
                } else {
                    Release::Last
                }
            }
            _ => Release::Unknown,
        }
    }

    /// Forget a mapping (after the kernel removed it).
    pub fn remove(&mut self, iova: u64) {
        self.maps.remove(&iova);
    }

    /// Mappings in the container, and the bytes they map (each once).
    pub fn totals(&self) -> (usize, u64) {
        (self.maps.len(), self.maps.values().map(|h| h.size).sum())
    }

    /// The highest `align`-aligned IOVA at or above `floor` where `size`
    /// bytes fit in one usable range without touching any mapping: where a
    /// function puts memory of its own (shadow rings), so that functions
    /// sharing the container do not collide. `align` must be a power of two.
    pub fn highest_free(
        &self,
        ranges: &IovaRanges,
        size: u64,
        align: u64,
        floor: u64,
    ) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        // The highest start in the gap [lo, hi) between held mappings, in
        // any usable range (a gap may cross a hole such as the MSI window).
        let in_gap = |lo: u64, hi: u64| -> Option<u64> {
            ranges
                .0
                .iter()
                .filter_map(|r| {
                    let rlo = r.first.max(lo).max(floor);
                    let rhi = r.last.saturating_add(1).min(hi);
                    let start = rhi.checked_sub(size)? & !(align - 1);
                    (rhi > rlo && start >= rlo).then_some(start)
                })
                .max()
        };
        let mut limit: u64 = 1 << 63;
        for (&s, h) in self.maps.iter().rev() {
            let end = s.saturating_add(h.size);
            if end < limit {
                if let Some(at) = in_gap(end, limit) {
                    return Some(at);
                }
            }
            limit = limit.min(s);
            if limit <= floor {
                return None;
            }
        }
        in_gap(0, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intel_ranges() -> IovaRanges {
        IovaRanges::new(vec![
            IovaRange {
                first: 0,
                last: 0xfedf_ffff,
            },
            IovaRange {
                first: 0xfef0_0000,
                last: (1 << 39) - 1,
            },
        ])
    }

    fn tracker(maps: &[(u64, u64)]) -> DmaTracker {
        let mut t = DmaTracker::default();
        for &(s, l) in maps {
            t.insert(s, l);
        }
        t
    }

    #[test]
    fn envelope_spans_all_ranges_and_fallback_is_39_bits() {
        assert_eq!(
            intel_ranges().envelope(),
            IovaRange {
                first: 0,
                last: (1 << 39) - 1
            }
        );
        assert_eq!(IovaRanges::new(vec![]).envelope().last, (1 << 39) - 1);
    }

    #[test]
    fn envelope_covers_a_range_nested_in_an_earlier_one() {
        // Found by the `dma` fuzz target (corpus: regress-envelope-nested):
        // the envelope ended at the last range's end, 0x1fff.
        let r = IovaRanges::new(vec![
            IovaRange {
                first: 0,
                last: 0xffff_ffff,
            },
            IovaRange {
                first: 0x1000,
                last: 0x1fff,
            },
        ]);

        let env = r.envelope();

        assert_eq!(
            env,
            IovaRange {
                first: 0,
                last: 0xffff_ffff
            }
        );
    }

    #[test]
    fn mapping_across_the_msi_hole_is_refused() {
        let t = DmaTracker::default();

        assert!(t.may_map(&intel_ranges(), 0, 0x8000_0000));
        assert!(!t.may_map(&intel_ranges(), 0xfed0_0000, 0x20_0000));
        assert!(t.may_map(&intel_ranges(), 0x1_0000_0000, 0x1000));
        assert!(!t.may_map(&intel_ranges(), 1 << 39, 0x1000));
    }

    #[test]
    fn overlapping_mappings_are_refused_and_adjacent_ones_allowed() {
        let r = intel_ranges();
        let t = tracker(&[(0x10_0000, 0x10_0000)]);

        assert!(!t.may_map(&r, 0x10_0000, 0x1000));
        assert!(!t.may_map(&r, 0x1f_f000, 0x2000));
        assert!(!t.may_map(&r, 0xf_f000, 0x2000));
        assert!(!t.may_map(&r, 0, 0x100_0000));
        assert!(t.may_map(&r, 0xf_f000, 0x1000));
        assert!(t.may_map(&r, 0x20_0000, 0x1000));
    }

    #[test]
    fn zero_size_and_wrapping_mappings_are_refused() {
        let t = DmaTracker::default();
        let full = IovaRanges::new(vec![IovaRange::FULL]);

        assert!(!t.may_map(&full, 0x1000, 0));
        assert!(!t.may_map(&full, u64::MAX, 2));
    }

    #[test]
    fn unmap_plan_covers_whole_mappings_only() {
        let t = tracker(&[(0x1000, 0x1000), (0x3000, 0x2000)]);

        assert_eq!(t.unmap_plan(0x1000, 0x1000), Some(vec![(0x1000, 0x1000)]));
        assert_eq!(
            t.unmap_plan(0, 0x10000),
            Some(vec![(0x1000, 0x1000), (0x3000, 0x2000)])
        );
        assert_eq!(t.unmap_plan(0x3000, 0x1000), None);
        assert_eq!(t.unmap_plan(0x4000, 0x1000), None);
        assert_eq!(t.unmap_plan(0x6000, 0x1000), None);
        assert_eq!(t.unmap_plan(0x1000, 0), None);
        assert_eq!(t.unmap_plan(u64::MAX, 2), None);
    }

    #[test]
    fn removed_mappings_free_their_range() {
        let r = intel_ranges();
        let mut t = tracker(&[(0x1000, 0x1000)]);

        t.remove(0x1000);

        assert!(t.may_map(&r, 0x1000, 0x1000));
        assert!(t.all().is_empty());
    }

    #[test]
    fn the_same_mapping_is_held_once_and_unmapped_by_its_last_holder() {
        let r = intel_ranges();
        let mut m = SharedMaps::default();

        assert_eq!(
            m.acquire(&r, 0, 0x8000_0000, 0x7f00_0000_0000),
            Acquire::New
        );
        m.insert(0, 0x8000_0000, 0x7f00_0000_0000);
        assert_eq!(
            m.acquire(&r, 0, 0x8000_0000, 0x7f00_0000_0000),
            Acquire::Shared
        );
        assert_eq!(
            m.acquire(&r, 0, 0x8000_0000, 0x7f00_0000_0000),
            Acquire::Shared
        );

        assert_eq!(m.totals(), (1, 0x8000_0000));
        assert_eq!(m.release(0, 0x8000_0000), Release::Shared);
        assert_eq!(m.release(0, 0x8000_0000), Release::Shared);
        assert_eq!(m.release(0, 0x8000_0000), Release::Last);
        m.remove(0);
        assert_eq!(m.totals(), (0, 0));
        assert_eq!(m.release(0, 0x8000_0000), Release::Unknown);
    }

    #[test]
    fn a_different_mapping_over_a_held_one_is_refused() {
        let r = intel_ranges();
        let mut m = SharedMaps::default();
        m.insert(0x10_0000, 0x10_0000, 0x1000_0000);

        // Same IOVA, other host memory or other size.
        assert_eq!(
            m.acquire(&r, 0x10_0000, 0x10_0000, 0x2000_0000),
            Acquire::Refused
        );
        assert_eq!(
            m.acquire(&r, 0x10_0000, 0x1000, 0x1000_0000),
            Acquire::Refused
        );
        // Overlaps from below and inside.
        assert_eq!(
            m.acquire(&r, 0xf_f000, 0x2000, 0x3000_0000),
            Acquire::Refused
        );
        assert_eq!(
            m.acquire(&r, 0x18_0000, 0x1000, 0x3000_0000),
            Acquire::Refused
        );
        // Across the MSI hole, or empty.
        assert_eq!(
            m.acquire(&r, 0xfed0_0000, 0x20_0000, 0x3000_0000),
            Acquire::Refused
        );
        assert_eq!(m.acquire(&r, 0x30_0000, 0, 0x3000_0000), Acquire::Refused);
        // A release of a size that was not mapped.
        assert_eq!(m.release(0x10_0000, 0x1000), Release::Unknown);
        assert_eq!(m.acquire(&r, 0x20_0000, 0x1000, 0x3000_0000), Acquire::New);
    }

    #[test]
    fn own_memory_goes_below_the_top_and_below_other_functions_own() {
        let r = intel_ranges();
        let mut m = SharedMaps::default();
        let top = 1u64 << 39;
        m.insert(0, 0x8000_0000, 0x1000);

        let a = m.highest_free(&r, 0x4000, 0x1000, 0x8000_0000).unwrap();
        assert_eq!(a, top - 0x4000);
        m.insert(a, 0x4000, 0x2000);
        let b = m.highest_free(&r, 0x3000, 0x1000, 0x8000_0000).unwrap();
        assert_eq!(b, top - 0x7000);
        m.insert(b, 0x3000, 0x3000);
        // A gap left by a removed one is reused.
        m.remove(a);
        assert_eq!(
            m.highest_free(&r, 0x2000, 0x1000, 0x8000_0000),
            Some(top - 0x2000)
        );
        // Alignment is kept.
        assert_eq!(
            m.highest_free(&r, 0x1000, 0x10_0000, 0x8000_0000),
            Some(top - 0x10_0000)
        );
    }

    #[test]
    fn own_memory_that_cannot_fit_above_the_floor_gets_no_place() {
        let r = IovaRanges::new(vec![IovaRange {
            first: 0,
            last: 0xffff,
        }]);
        let mut m = SharedMaps::default();
        m.insert(0x8000, 0x8000, 0x1000);

        assert_eq!(m.highest_free(&r, 0x1000, 0x1000, 0x8000), None);
        assert_eq!(m.highest_free(&r, 0x1000, 0x1000, 0), Some(0x7000));
        assert_eq!(m.highest_free(&r, 0x9000, 0x1000, 0), None);
        assert_eq!(m.highest_free(&r, 0, 0x1000, 0), None);
        assert_eq!(m.highest_free(&r, 0x1000, 3, 0), None);
    }

    #[test]
    fn own_memory_finds_room_below_a_hole_at_the_top_of_a_gap() {
        // The top of the only gap is a hole: the window goes below it.
        let r = IovaRanges::new(vec![
            IovaRange {
                first: 0,
                last: 0xfedf_ffff,
            },
            IovaRange {
                first: 0xfef0_0000,
                last: 0xfef0_0fff,
            },
        ]);
        let m = SharedMaps::default();

        assert_eq!(
            m.highest_free(&r, 0x10_0000, 0x1000, 0x8000_0000),
            Some(0xfed0_0000)
        );
        assert_eq!(m.highest_free(&r, 0x1000, 0x1000, 0), Some(0xfef0_0000));
    }
}
