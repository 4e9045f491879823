//! Book-keeping of the DMA mappings of one container: usable IOVA ranges,
//! overlap checks and which mappings an unmap covers. No system calls.

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
}
