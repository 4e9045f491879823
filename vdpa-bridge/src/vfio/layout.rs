//! Argument layouts and the arithmetic on kernel-reported values: pure
//! functions, unit-tested without `/dev/vfio`.

use vfio_bindings::bindings::vfio::{
    vfio_device_ioeventfd, vfio_iommu_type1_info, vfio_irq_set, vfio_region_info,
    VFIO_DEVICE_IOEVENTFD_16, VFIO_DEVICE_IOEVENTFD_32, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};

use crate::pci::{BarKind, IoWidth, PciError};
use crate::types::IovaRange;

// vfio_irq_set is five u32 followed by its data: irq_set_words relies on it.
const _: () = assert!(size_of::<vfio_irq_set>() == 20);
const _: () = assert!(std::mem::offset_of!(vfio_irq_set, data) == 20);
const _: () = assert!(align_of::<vfio_irq_set>() == 4);
const _: () = assert!(size_of::<vfio_iommu_type1_info>() == 24);
const _: () = assert!(size_of::<vfio_region_info>() == 32);

/// Most capability hops followed in a kernel info chain.
const MAX_CAP_HOPS: usize = 64;

/// A `vfio_irq_set` with `fds` as its eventfd data, as u32 words
/// (argsz, flags, index, start, count, fds...). `fds` empty gives a
/// header-only set (`count` 0, for `DATA_NONE` disabling).
pub fn irq_set_words(flags: u32, index: u32, start: u32, fds: &[i32]) -> Vec<u32> {
    let count = fds.len() as u32;
    let mut w = Vec::with_capacity(5 + fds.len());
    w.push(((5 + fds.len()) * size_of::<u32>()) as u32);
    w.extend_from_slice(&[flags, index, start, count]);
    // The kernel reads the data as s32 fds; -1 leaves a vector unrouted.
    w.extend(fds.iter().map(|&fd| fd as u32));
    w
}

/// The `VFIO_DEVICE_IOEVENTFD` argument for a doorbell at `bar_offset` of a
/// BAR whose region starts at `region_offset` on the device fd. `None` when
/// the offset overflows.
pub fn ioeventfd_arg(
    region_offset: u64,
    bar_offset: u64,
    width: IoWidth,
    data: u64,
    fd: i32,
) -> Option<vfio_device_ioeventfd> {
    Some(vfio_device_ioeventfd {
        argsz: size_of::<vfio_device_ioeventfd>() as u32,
        flags: match width {
            IoWidth::U16 => VFIO_DEVICE_IOEVENTFD_16,
            IoWidth::U32 => VFIO_DEVICE_IOEVENTFD_32,
        },
        offset: region_offset.checked_add(bar_offset)?,
        data,
        fd,
    })
}

/// The device-fd position of `[offset, offset + len)` in a window of
/// `size` bytes at `base`, or `None` when it leaves the window.
pub fn window_pos(base: u64, size: u64, offset: u64, len: usize) -> Option<u64> {
    let end = offset.checked_add(u64::try_from(len).ok()?)?;
    if end > size {
        return None;
    }
    base.checked_add(offset)
}

/// Validate an MSI-X routing request of `requested` vectors.
pub fn msix_request(available: u32, requested: usize) -> Result<u32, PciError> {
    let requested = u32::try_from(requested).unwrap_or(u32::MAX);
    if requested > available {
        return Err(PciError::MsixVectors {
            available,
            requested,
        });
    }
    Ok(requested)
}

/// The [`PciError`] for a failed `VFIO_DEVICE_IOEVENTFD`: ENOTTY (no
/// support) and EINVAL (offset refused, e.g. inside the MSI-X table) mean
/// no ioeventfd can serve here.
pub fn ioeventfd_error(bar: u8, offset: u64, e: std::io::Error) -> PciError {
    match e.raw_os_error() {
        Some(libc::ENOTTY) | Some(libc::EINVAL) => PciError::IoeventfdUnsupported { bar, offset },
        _ => PciError::Io {
            op: "VFIO_DEVICE_IOEVENTFD",
            source: e,
        },
    }
}

/// Byte width of an [`IoWidth`].
pub fn io_width_bytes(width: IoWidth) -> u64 {
    match width {
        IoWidth::U16 => 2,
        IoWidth::U32 => 4,
    }
}

/// What `VFIO_DEVICE_GET_REGION_INFO` says of a region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Where the region starts on the device fd.
    pub offset: u64,
    /// The sparse-mmap capability's areas as `(offset, size)`, when the
    /// reply has one (an empty list then maps nothing); `None` without.
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// Parse a `VFIO_DEVICE_GET_REGION_INFO` reply (a `vfio_region_info`
/// then its capability chain). `None` when it is shorter than the header.
/// A sparse-mmap capability that is truncated, or a chain that loops or
/// points outside the reply, gives `sparse: Some(vec![])`: mapping nothing
/// is always safe (every access then takes the slow path), mapping the
/// whole region might expose what the kernel meant to hide.
pub fn region_info(reply: &[u8]) -> Option<RegionInfo> {
    let header = size_of::<vfio_region_info>();
    let flags = u32_at(reply, 4)?;
    let mut info = RegionInfo {
        flags,
        size: u64_at(reply, 16)?,
        offset: u64_at(reply, 24)?,
        sparse: None,
    };
    if flags & VFIO_REGION_INFO_FLAG_CAPS == 0 {
        return Some(info);
    }
    let first = u32_at(reply, 12)? as usize;
    // Capabilities announced but not delivered (cap_offset 0: the kernel
    // wanted a bigger buffer) count as a broken chain: no sparse areas
    // known, so none mapped.
    let found = match first {
        0 => Err(BrokenChain),
        _ => find_cap(reply, header, first, VFIO_REGION_INFO_CAP_SPARSE_MMAP),
    };
    info.sparse = match found {
        Ok(None) => None,
        Ok(Some(cap)) => Some(u64_pairs(reply, cap).unwrap_or_default()),
        Err(BrokenChain) => Some(Vec::new()),
    };
    Some(info)
}

/// The parts of a BAR region that may be mmap-ed, as `(offset, len)` in
/// the BAR. Without the MMAP flag none; with a sparse-mmap capability
/// (`sparse`) its areas (the kernel leaves the MSI-X table out of them),
/// kept only when page-aligned, non-empty and inside the region; otherwise
/// the whole region (page-aligned size only).
pub fn mmap_areas(
    region_size: u64,
    flags: u32,
    sparse: Option<&[(u64, u64)]>,
    page_size: u64,
) -> Vec<(u64, u64)> {
    if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || region_size == 0 {
        return Vec::new();
    }
    let aligned = |v: u64| page_size != 0 && v.is_multiple_of(page_size);
    match sparse {
        Some(areas) => areas
            .iter()
            .filter(|&&(offset, size)| {
                let fits = offset.checked_add(size).is_some_and(|e| e <= region_size);
                let ok = size != 0 && fits && aligned(offset);
                if !ok {
                    log::warn!(
                        "ignoring sparse mmap area {offset:#x}+{size:#x} of a {region_size:#x} region"
                    );
                }
                ok
            })
            .copied()
            .collect(),
        // The kernel rounds BAR regions up to a page for mmap; a smaller
        // region goes through the slow path.
        None if aligned(region_size) => vec![(0, region_size)],
        None => Vec::new(),
    }
}

/// What a BAR decodes, from its config-space register (bit 0 set = I/O).
pub fn bar_kind(bar_register: u32) -> BarKind {
    if bar_register & 1 != 0 {
        BarKind::Io
    } else {
        BarKind::Memory
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The usable IOVA ranges in a `VFIO_IOMMU_GET_INFO` reply (header plus
/// capability chain). `None` when the reply has no IOVA-range capability
/// or it is malformed.
pub fn parse_iova_ranges(info: &[u8]) -> Option<Vec<IovaRange>> {
    let header = size_of::<vfio_iommu_type1_info>();
    let flags = u32_at(info, 4)?;
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return None;
    }
    let first = u32_at(info, 16)? as usize;
    let cap = find_cap(info, header, first, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE).ok()??;
    let mut ranges: Vec<IovaRange> = u64_pairs(info, cap)?
        .into_iter()
        .filter(|&(first, last)| first <= last)
        .map(|(first, last)| IovaRange { first, last })
        .collect();
    ranges.sort_by_key(|r| r.first);
    (!ranges.is_empty()).then_some(ranges)
}

/// A capability chain that points into its reply's header or past its
/// end, or loops.
#[derive(Debug)]
struct BrokenChain;

/// Where capability `id` starts in a VFIO info reply (a `header`-byte
/// struct, then a chain of `{id: u16, version: u16, next: u32}` headed
/// capabilities from offset `first`; `next` 0 ends it): `Ok(None)` when
/// the chain ends without it.
fn find_cap(
    reply: &[u8],
    header: usize,
    first: usize,
    id: u32,
) -> Result<Option<usize>, BrokenChain> {
    let mut off = first;
    for _ in 0..MAX_CAP_HOPS {
        if off < header {
            return Err(BrokenChain);
        }
        let this = u16_at(reply, off).ok_or(BrokenChain)?;
        let next = u32_at(reply, off + 4).ok_or(BrokenChain)? as usize;
        if u32::from(this) == id {
            return Ok(Some(off));
        }
        if next == 0 {
            return Ok(None);
        }
        off = next;
    }
    Err(BrokenChain)
}

/// The `{u64, u64}` pairs of the capability at `cap` whose body is a
/// count (u32), a reserved u32, then the pairs (the IOVA-range and
/// sparse-mmap capabilities). `None` when they run past the reply.
fn u64_pairs(reply: &[u8], cap: usize) -> Option<Vec<(u64, u64)>> {
    let n = u32_at(reply, cap.checked_add(8)?)? as usize;
    (0..n)
        .map(|i| {
            let at = cap.checked_add(16)?.checked_add(i.checked_mul(16)?)?;
            Some((u64_at(reply, at)?, u64_at(reply, at.checked_add(8)?)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio::{
        VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_MSIX_IRQ_INDEX,
    };

    const PAGE: u64 = 4096;
    const MMAP: u32 = VFIO_REGION_INFO_FLAG_MMAP;

    fn sparse(areas: &[(u64, u64)]) -> Option<&[(u64, u64)]> {
        Some(areas)
    }

    #[test]
    fn irq_set_words_encode_unrouted_vectors_as_minus_one() {
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

        let w = irq_set_words(flags, VFIO_PCI_MSIX_IRQ_INDEX, 0, &[7, -1, 9]);

        assert_eq!(w, vec![32, flags, 2, 0, 3, 7, u32::MAX, 9]);
    }

    #[test]
    fn irq_set_words_without_fds_is_a_bare_header() {
        let w = irq_set_words(1 | 32, 2, 0, &[]);

        assert_eq!(w, vec![20, 33, 2, 0, 0]);
    }

    #[test]
    fn ioeventfd_arg_adds_region_offset_and_sets_size_flag() {
        let a = ioeventfd_arg(4 << 40, 0x3000, IoWidth::U16, 1, 5).unwrap();

        assert_eq!(a.argsz, 32);
        assert_eq!(a.flags, 2);
        assert_eq!(a.offset, (4 << 40) + 0x3000);
        assert_eq!((a.data, a.fd), (1, 5));
    }

    #[test]
    fn ioeventfd_arg_rejects_overflowing_offset() {
        assert!(ioeventfd_arg(u64::MAX, 1, IoWidth::U32, 0, -1).is_none());
    }

    #[test]
    fn whole_region_is_mapped_without_sparse_cap() {
        assert_eq!(mmap_areas(0x4000, MMAP, None, PAGE), vec![(0, 0x4000)]);
    }

    #[test]
    fn nothing_is_mapped_without_mmap_flag_or_for_sub_page_regions() {
        assert!(mmap_areas(0x4000, 0, None, PAGE).is_empty());
        assert!(mmap_areas(0x100, MMAP, None, PAGE).is_empty());
        assert!(mmap_areas(0, MMAP, None, PAGE).is_empty());
    }

    #[test]
    fn sparse_areas_around_msix_table_are_used_as_given() {
        // A 16 KiB BAR whose MSI-X table sits in its second page.
        let caps = sparse(&[(0, 0x1000), (0x2000, 0x2000)]);

        let areas = mmap_areas(0x4000, MMAP, caps, PAGE);

        assert_eq!(areas, vec![(0, 0x1000), (0x2000, 0x2000)]);
    }

    #[test]
    fn sparse_areas_outside_region_empty_or_unaligned_are_dropped() {
        let caps = sparse(&[
            (0, 0),
            (0x800, 0x800),
            (0x3000, 0x2000),
            (u64::MAX - 0xfff, 0x1000),
            (0x1000, 0x1000),
        ]);

        let areas = mmap_areas(0x4000, MMAP, caps, PAGE);

        assert_eq!(areas, vec![(0x1000, 0x1000)]);
    }

    #[test]
    fn empty_sparse_cap_maps_nothing() {
        assert!(mmap_areas(0x4000, MMAP, sparse(&[]), PAGE).is_empty());
    }

    #[test]
    fn window_pos_accepts_accesses_ending_at_the_window_end() {
        assert_eq!(
            window_pos(1 << 40, 0x4000, 0x3ffe, 2),
            Some((1 << 40) + 0x3ffe)
        );
        assert_eq!(window_pos(0, 4096, 0, 4096), Some(0));
    }

    #[test]
    fn window_pos_rejects_past_end_and_overflowing_accesses() {
        assert_eq!(window_pos(0, 0x4000, 0x3fff, 2), None);
        assert_eq!(window_pos(0, 4096, 4096, 1), None);
        assert_eq!(window_pos(0, u64::MAX, u64::MAX, 2), None);
        assert_eq!(window_pos(u64::MAX, 0x10, 1, 1), None);
    }

    #[test]
    fn msix_request_refuses_more_vectors_than_the_device_has() {
        assert_eq!(msix_request(3, 3).unwrap(), 3);
        assert_eq!(msix_request(3, 0).unwrap(), 0);
        assert!(matches!(
            msix_request(3, 4),
            Err(PciError::MsixVectors {
                available: 3,
                requested: 4
            })
        ));
    }

    #[test]
    fn ioeventfd_enotty_and_einval_mean_unsupported_other_errnos_are_io() {
        let e = |n| std::io::Error::from_raw_os_error(n);

        let enotty = ioeventfd_error(4, 0x3000, e(libc::ENOTTY));
        let einval = ioeventfd_error(4, 0x3000, e(libc::EINVAL));
        let eexist = ioeventfd_error(4, 0x3000, e(libc::EEXIST));

        assert!(matches!(
            enotty,
            PciError::IoeventfdUnsupported {
                bar: 4,
                offset: 0x3000
            }
        ));
        assert!(matches!(einval, PciError::IoeventfdUnsupported { .. }));
        assert!(matches!(
            eexist,
            PciError::Io {
                op: "VFIO_DEVICE_IOEVENTFD",
                ..
            }
        ));
    }

    #[test]
    fn bar_kind_follows_bit_zero() {
        assert_eq!(bar_kind(0xfebf_0000), BarKind::Memory);
        assert_eq!(bar_kind(0x0000_c041), BarKind::Io);
        assert_eq!(bar_kind(0xfe00_000c), BarKind::Memory);
    }

    /// An info reply with the given capability chain entries appended.
    fn info_with(caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; 24];
        b[4..8].copy_from_slice(&(VFIO_IOMMU_INFO_CAPS | 1).to_ne_bytes());
        b[16..20].copy_from_slice(&(if caps.is_empty() { 0u32 } else { 24 }).to_ne_bytes());
        append_chain(&mut b, caps);
        b
    }

    /// Append `caps` to `b` as a capability chain starting at its end.
    fn append_chain(b: &mut Vec<u8>, caps: &[(u16, Vec<u8>)]) {
        for (i, (id, body)) in caps.iter().enumerate() {
            let start = b.len();
            let next = if i + 1 < caps.len() {
                start + 8 + body.len()
            } else {
                0
            };
            b.extend_from_slice(&id.to_ne_bytes());
            b.extend_from_slice(&1u16.to_ne_bytes());
            b.extend_from_slice(&(next as u32).to_ne_bytes());
            b.extend_from_slice(body);
        }
    }

    /// A capability `id` whose body is a count, a reserved u32, then
    /// `pairs` (IOVA ranges, sparse-mmap areas).
    fn pairs_cap(id: u32, pairs: &[(u64, u64)]) -> (u16, Vec<u8>) {
        let mut body = Vec::new();
        body.extend_from_slice(&(pairs.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for (a, b) in pairs {
            body.extend_from_slice(&a.to_ne_bytes());
            body.extend_from_slice(&b.to_ne_bytes());
        }
        (id as u16, body)
    }

    fn iova_cap(ranges: &[(u64, u64)]) -> (u16, Vec<u8>) {
        pairs_cap(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, ranges)
    }

    #[test]
    fn iova_ranges_are_found_after_another_capability_and_sorted() {
        // intel-iommu, 39-bit: the MSI window 0xfee00000..=0xfeefffff is a hole.
        let migration = (2u16, vec![0u8; 24]);
        let info = info_with(&[
            migration,
            iova_cap(&[(0xfef0_0000, (1 << 39) - 1), (0, 0xfedf_ffff)]),
        ]);

        let ranges = parse_iova_ranges(&info).unwrap();

        assert_eq!(
            ranges,
            vec![
                IovaRange {
                    first: 0,
                    last: 0xfedf_ffff
                },
                IovaRange {
                    first: 0xfef0_0000,
                    last: (1 << 39) - 1
                },
            ]
        );
    }

    #[test]
    fn iova_ranges_absent_truncated_or_looping_give_none() {
        let no_caps = info_with(&[]);
        let mut truncated = info_with(&[iova_cap(&[(0, 0xffff)])]);
        truncated.truncate(truncated.len() - 4);
        let mut looping = info_with(&[(2, vec![0u8; 8])]);
        looping[28..32].copy_from_slice(&24u32.to_ne_bytes());

        assert_eq!(parse_iova_ranges(&no_caps), None);
        assert_eq!(parse_iova_ranges(&truncated), None);
        assert_eq!(parse_iova_ranges(&looping), None);
        assert_eq!(parse_iova_ranges(&[]), None);
    }

    /// A region info reply: header, then the given chain (`cap_offset` 32).
    fn region_reply(flags: u32, size: u64, offset: u64, caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; 32];
        let caps_flag = if caps.is_empty() {
            0
        } else {
            VFIO_REGION_INFO_FLAG_CAPS
        };
        b[4..8].copy_from_slice(&(flags | caps_flag).to_ne_bytes());
        b[12..16].copy_from_slice(&(if caps.is_empty() { 0u32 } else { 32 }).to_ne_bytes());
        b[16..24].copy_from_slice(&size.to_ne_bytes());
        b[24..32].copy_from_slice(&offset.to_ne_bytes());
        append_chain(&mut b, caps);
        let argsz = b.len() as u32;
        b[0..4].copy_from_slice(&argsz.to_ne_bytes());
        b
    }

    fn sparse_cap(areas: &[(u64, u64)]) -> (u16, Vec<u8>) {
        pairs_cap(VFIO_REGION_INFO_CAP_SPARSE_MMAP, areas)
    }

    #[test]
    fn region_info_without_caps_gives_flags_size_and_offset() {
        let reply = region_reply(MMAP | 3, 0x4000, 0x1_0000_0000, &[]);

        let info = region_info(&reply).unwrap();

        assert_eq!(info.flags, MMAP | 3);
        assert_eq!(info.size, 0x4000);
        assert_eq!(info.offset, 0x1_0000_0000);
        assert_eq!(info.sparse, None);
        assert_eq!(region_info(&reply[..31]), None);
    }

    #[test]
    fn region_info_finds_sparse_areas_after_another_capability() {
        // The MSI-X table at 0x1000..0x2000 is left out, as vfio-pci does.
        let reply = region_reply(
            MMAP,
            0x4000,
            0,
            &[
                (2, vec![0u8; 8]),
                sparse_cap(&[(0, 0x1000), (0x2000, 0x2000)]),
            ],
        );

        let info = region_info(&reply).unwrap();

        assert_eq!(info.sparse, Some(vec![(0, 0x1000), (0x2000, 0x2000)]));
        assert_eq!(
            mmap_areas(info.size, info.flags, info.sparse.as_deref(), PAGE),
            vec![(0, 0x1000), (0x2000, 0x2000)]
        );
    }

    #[test]
    fn a_broken_capability_chain_maps_nothing_rather_than_everything() {
        let mut truncated = region_reply(MMAP, 0x4000, 0, &[sparse_cap(&[(0, 0x1000)])]);
        truncated.truncate(truncated.len() - 4);
        let mut looping = region_reply(MMAP, 0x4000, 0, &[(2, vec![0u8; 8])]);
        looping[36..40].copy_from_slice(&32u32.to_ne_bytes());
        let mut inside_header = region_reply(MMAP, 0x4000, 0, &[(2, vec![0u8; 8])]);
        inside_header[12..16].copy_from_slice(&8u32.to_ne_bytes());
        let mut past_end = region_reply(MMAP, 0x4000, 0, &[(2, vec![0u8; 8])]);
        past_end[12..16].copy_from_slice(&4096u32.to_ne_bytes());
        // What the kernel answers when the buffer was too small.
        let mut undelivered = region_reply(MMAP, 0x4000, 0, &[sparse_cap(&[(0, 0x1000)])]);
        undelivered[12..16].copy_from_slice(&0u32.to_ne_bytes());
        undelivered.truncate(32);

        for reply in [truncated, looping, inside_header, past_end, undelivered] {
            let info = region_info(&reply).unwrap();
            assert_eq!(info.sparse, Some(vec![]));
            assert!(mmap_areas(info.size, info.flags, info.sparse.as_deref(), PAGE).is_empty());
        }
    }
}
