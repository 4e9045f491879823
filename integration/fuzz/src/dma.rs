//! Target `dma`: the plugin's DMA table ([`DmaHandle`]) against a model,
//! and the VFIO backend's parsers of what the kernel reports.
//!
//! The bytes give an IOVA-range reply of `VFIO_IOMMU_GET_INFO` (well
//! formed or raw), sparse-mmap areas of a BAR region, a guest memory
//! layout with holes, and a sequence of map, unmap, map-all-of-guest-
//! memory, unmap-all, hotplug, unplug and fault-injection operations. The
//! backend is a VFIO-like function: the VFIO backend's own book-keeping
//! (`vfio::testing::{IovaRanges, DmaTracker}`, fed with the parsed
//! ranges) behind `VpVdpa`, with map failures and refused unmaps
//! injected where the real one would issue its ioctl.
//!
//! Invariants checked:
//!
//! * nothing panics;
//! * parsed IOVA ranges are non-empty, sorted and each `first <= last`; a
//!   well-formed reply parses to exactly its ranges; the envelope covers
//!   every range;
//! * sparse-mmap areas kept are exactly the given ones that are non-empty,
//!   page-aligned and inside the region; without the MMAP flag none;
//! * after every operation: the plugin's table equals the model's, the
//!   backend's mappings equal the model's, the table equals the backend's
//!   view (same IOVAs and sizes), no two mappings overlap, every mapping
//!   lies in one usable IOVA range, and every host range handed to the
//!   backend is guest RAM at exactly the GPA the table records (only
//!   guest RAM is ever mapped, unplugged regions included while mapped);
//! * the plugin's and the model's answers agree (success or refusal);
//! * dropping the device removes every mapping but those whose unmap the
//!   backend refuses;
//! * the counted mappings of a shared container (`SharedMaps`) against a
//!   model: the same answers (new, shared, refused; last, shared, unknown),
//!   the same holds and counts, never two held mappings overlapping, and a
//!   window `highest_free` gives is aligned, at or above its floor, in one
//!   usable range and free.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use vdpa_bridge::fake::{ConfigBuilder, RawFunction};
use vdpa_bridge::pci::{BarInfo, BarMapping, IoWidth, PciError, PciFunction, PciResult};
use vdpa_bridge::vfio::testing::{
    self as vfio, Acquire, DmaTracker, IovaRanges, Release, SharedMaps,
};
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_bridge::{Iova, IovaRange};
use vdpa_plugin::{BridgeDevice, DeviceOptions};
use vm_memory::{
    Address, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

use crate::Reader;

const PAGE: u64 = 0x1000;
/// `VFIO_IOMMU_INFO_CAPS`, `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`,
/// `VFIO_REGION_INFO_FLAG_MMAP` (the uapi values, written out here so the
/// encoder below is independent of the parser).
const INFO_CAPS: u32 = 1 << 1;
const CAP_IOVA_RANGE: u16 = 1;
const FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_REGION_INFO_FLAG_CAPS`, `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
const REGION_CAPS: u32 = 1 << 3;
const CAP_SPARSE_MMAP: u16 = 1;
const MAX_OPS: usize = 48;

type Mem = GuestMemoryMmap<()>;

/// The target.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let list = iova_info(&mut r);
    shared_maps(&mut r, &list);
    sparse_mmap(&mut r);
    layout_helpers(&mut r);
    table(&mut r, list);
}

/// A `VFIO_IOMMU_GET_INFO` reply with an IOVA-range capability holding
/// `ranges`, after a capability of another id when `other_first`.
pub fn iova_info_bytes(ranges: &[(u64, u64)], other_first: bool) -> Vec<u8> {
    let mut b = vec![0u8; 24];
    b[4..8].copy_from_slice(&(INFO_CAPS | 1).to_ne_bytes());
    b[16..20].copy_from_slice(&24u32.to_ne_bytes());
    if other_first {
        // id 2 (migration), version 1, next after its 24 bytes.
        b.extend_from_slice(&2u16.to_ne_bytes());
        b.extend_from_slice(&1u16.to_ne_bytes());
        b.extend_from_slice(&48u32.to_ne_bytes());
        b.extend_from_slice(&[0u8; 16]);
    }
    b.extend_from_slice(&CAP_IOVA_RANGE.to_ne_bytes());
    b.extend_from_slice(&1u16.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    for &(first, last) in ranges {
        b.extend_from_slice(&first.to_ne_bytes());
        b.extend_from_slice(&last.to_ne_bytes());
    }
    b
}

/// An address the target likes: mostly small page multiples (where guest
/// memory is), sometimes anything.
fn addr(r: &mut Reader) -> u64 {
    match r.u8() % 8 {
        0 => r.u64(),
        1 => u64::from(r.u16()),
        _ => u64::from(r.u8() % 64) * PAGE,
    }
}

/// A size the target likes: mostly whole pages, sometimes not.
fn size(r: &mut Reader) -> u64 {
    match r.u8() % 8 {
        0 => r.u64(),
        1 => u64::from(r.u16()),
        _ => u64::from(r.u8() % 16) * PAGE,
    }
}

/// A shared container's counted mappings against a model: a list of
/// (iova, size, host, holders).
fn shared_maps(r: &mut Reader, list: &[IovaRange]) {
    let ranges = IovaRanges::new(list.to_vec());
    let mut maps = SharedMaps::default();
    let mut model: Vec<(u64, u64, usize, u32)> = Vec::new();
    let overlaps = |m: &[(u64, u64, usize, u32)], iova: u64, size: u64| {
        m.iter().any(|&(s, l, _, _)| {
            iova <= s.saturating_add(l - 1) && s <= iova.saturating_add(size - 1)
        })
    };
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        let iova = addr(r);
        let sz = size(r);
        let host = usize::from(r.u8() % 4) * 0x10_0000;
        match r.u8() % 4 {
            0 | 1 => {
                let got = maps.acquire(&ranges, iova, sz, host);
                let same = model
                    .iter()
                    .position(|&(s, l, h, _)| s == iova && l == sz && h == host);
                let want = if !ranges.contains(iova, sz) {
                    Acquire::Refused
                } else if let Some(i) = same {
                    model[i].3 += 1;
                    Acquire::Shared
                } else if overlaps(&model, iova, sz) {
                    Acquire::Refused
                } else {
                    Acquire::New
                };
                assert_eq!(got, want, "acquire {iova:#x} +{sz:#x} at {host:#x}");
                if got == Acquire::New && r.bool() {
                    maps.insert(iova, sz, host);
                    model.push((iova, sz, host, 1));
                }
            }
            2 => {
                let (iova, sz) = match model.get(usize::from(r.u8()) % model.len().max(1)) {
                    Some(&(s, l, _, _)) if r.bool() => (s, l),
                    _ => (iova, sz),
                };
                let got = maps.release(iova, sz);
                let at = model.iter().position(|&(s, l, _, _)| s == iova && l == sz);
                let want = match at {
                    None => Release::Unknown,
                    Some(i) if model[i].3 > 1 => {
                        model[i].3 -= 1;
                        Release::Shared
                    }
                    Some(_) => Release::Last,
                };
                assert_eq!(got, want, "release {iova:#x} +{sz:#x}");
                if let (Release::Last, Some(i)) = (got, at) {
                    maps.remove(iova);
                    model.remove(i);
                }
            }
            _ => {
                let align = 1u64 << (r.u8() % 24);
                let floor = addr(r);
                if let Some(at) = maps.highest_free(&ranges, sz, align, floor) {
                    assert_eq!(at % align, 0, "window {at:#x} not aligned to {align:#x}");
                    assert!(at >= floor, "window {at:#x} below the floor {floor:#x}");
                    assert!(
                        ranges.contains(at, sz),
                        "window {at:#x} +{sz:#x} not usable"
                    );
                    assert!(!overlaps(&model, at, sz), "window {at:#x} +{sz:#x} is held");
                }
            }
        }
        let (n, bytes) = maps.totals();
        assert_eq!(n, model.len());
        assert_eq!(bytes, model.iter().map(|m| m.1).sum::<u64>());
        for (i, a) in model.iter().enumerate() {
            assert!(
                !overlaps(&model[i + 1..], a.0, a.1),
                "held mappings overlap: {model:x?}"
            );
        }
    }
}

/// Decode and parse an IOVA-range reply; check the parser; return the
/// ranges parsed (none: the backend falls back).
fn iova_info(r: &mut Reader) -> Vec<IovaRange> {
    let mode = r.u8();
    let (bytes, expect) = if mode & 1 == 0 {
        let n = usize::from(r.u8() % 5);
        let ranges: Vec<(u64, u64)> = (0..n)
            .map(|_| {
                let first = addr(r);
                (first, first.wrapping_add(size(r)).wrapping_sub(1))
            })
            .collect();
        let mut want: Vec<IovaRange> = ranges
            .iter()
            .filter(|(f, l)| f <= l)
            .map(|&(first, last)| IovaRange { first, last })
            .collect();
        want.sort_by_key(|r| r.first);
        (iova_info_bytes(&ranges, mode & 2 != 0), Some(want))
    } else {
        let len = usize::from(r.u8());
        (r.bytes(len).to_vec(), None)
    };
    let parsed = vfio::parse_iova_ranges(&bytes);
    if let Some(v) = &parsed {
        assert!(!v.is_empty(), "Some(empty) ranges");
        assert!(
            v.windows(2).all(|w| w[0].first <= w[1].first),
            "unsorted {v:?}"
        );
        assert!(
            v.iter().all(|r| r.first <= r.last),
            "inverted range in {v:?}"
        );
    }
    if let Some(want) = expect {
        let got = parsed.clone().unwrap_or_default();
        assert_eq!(got, want, "well-formed reply parsed wrong");
    }
    let list = parsed.unwrap_or_default();
    let ranges = IovaRanges::new(list.clone());
    let env = ranges.envelope();
    for r in &list {
        assert!(
            env.first <= r.first && r.last <= env.last,
            "envelope {env:?} does not cover {r:?} of {list:?}"
        );
    }
    list
}

/// A `VFIO_DEVICE_GET_REGION_INFO` reply, encoded here independently of
/// the parser: header, then an optional foreign capability and an optional
/// sparse-mmap capability; then maybe broken (truncated or a byte
/// flipped). A well-formed reply must parse to exactly what was encoded
/// and give the model's mmap areas; any reply must give areas that are
/// page-aligned, non-empty and inside the region.
fn sparse_mmap(r: &mut Reader) {
    let region = match r.u8() % 4 {
        0 => r.u64(),
        1 => 0x100,
        _ => u64::from(r.u8() % 17) * PAGE,
    };
    let flags = r.u32() & !REGION_CAPS;
    let offset = r.u64();
    let page = r.choose(&[PAGE, PAGE, 0x1_0000, 0, 3]);
    let foreign = r.bool();
    let sparse = r.bool();
    let areas: Vec<(u64, u64)> = (0..r.u8() % 6).map(|_| (addr(r), size(r))).collect();
    let mut caps: Vec<(u16, Vec<u8>)> = Vec::new();
    if foreign {
        caps.push((3, vec![0u8; 8]));
    }
    if sparse {
        let mut body = Vec::new();
        body.extend_from_slice(&(areas.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for (o, s) in &areas {
            body.extend_from_slice(&o.to_ne_bytes());
            body.extend_from_slice(&s.to_ne_bytes());
        }
        caps.push((CAP_SPARSE_MMAP, body));
    }
    let mut reply = vec![0u8; 32];
    let all_flags = flags | if caps.is_empty() { 0 } else { REGION_CAPS };
    reply[4..8].copy_from_slice(&all_flags.to_ne_bytes());
    reply[12..16].copy_from_slice(&(if caps.is_empty() { 0u32 } else { 32 }).to_ne_bytes());
    reply[16..24].copy_from_slice(&region.to_ne_bytes());
    reply[24..32].copy_from_slice(&offset.to_ne_bytes());
    for (i, (id, body)) in caps.iter().enumerate() {
        let next = if i + 1 < caps.len() {
            reply.len() + 8 + body.len()
        } else {
            0
        };
        reply.extend_from_slice(&id.to_ne_bytes());
        reply.extend_from_slice(&1u16.to_ne_bytes());
        reply.extend_from_slice(&(next as u32).to_ne_bytes());
        reply.extend_from_slice(body);
    }
    let broken = match r.u8() % 4 {
        0 => {
            let at = usize::from(r.u16()) % (reply.len() + 1);
            reply.truncate(at);
            true
        }
        1 if !reply.is_empty() => {
            let at = usize::from(r.u16()) % reply.len();
            reply[at] ^= r.u8() | 1;
            true
        }
        _ => false,
    };
    let Some(info) = vfio::region_info(&reply) else {
        assert!(
            reply.len() < 32,
            "a {}-byte reply did not parse",
            reply.len()
        );
        return;
    };
    let got = vfio::mmap_areas(info.size, info.flags, info.sparse.as_deref(), page);
    for &(o, s) in &got {
        assert!(
            s != 0
                && page != 0
                && o.is_multiple_of(page)
                && o.checked_add(s).is_some_and(|e| e <= info.size),
            "area {o:#x}+{s:#x} of a {:#x} region, page {page:#x}",
            info.size
        );
    }
    if broken {
        return;
    }
    assert_eq!(
        (info.flags, info.size, info.offset),
        (all_flags, region, offset)
    );
    assert_eq!(
        info.sparse,
        sparse.then(|| areas.clone()),
        "sparse areas parsed wrong"
    );
    let aligned = |v: u64| page != 0 && v.is_multiple_of(page);
    let want: Vec<(u64, u64)> = if flags & FLAG_MMAP == 0 || region == 0 {
        Vec::new()
    } else if sparse {
        areas
            .iter()
            .copied()
            .filter(|&(o, s)| s != 0 && aligned(o) && o.checked_add(s).is_some_and(|e| e <= region))
            .collect()
    } else if aligned(region) {
        vec![(0, region)]
    } else {
        Vec::new()
    };
    assert_eq!(
        got, want,
        "mmap areas of a {region:#x} region, flags {flags:#x}"
    );
}

fn layout_helpers(r: &mut Reader) {
    let (base, size, offset, len) = (addr(r), size(r), addr(r), usize::from(r.u16()));
    match vfio::window_pos(base, size, offset, len) {
        Some(p) => {
            assert!(offset + len as u64 <= size, "window_pos past the window");
            assert_eq!(p, base + offset);
        }
        None => assert!(
            offset.checked_add(len as u64).is_none_or(|e| e > size)
                || base.checked_add(offset).is_none(),
            "window_pos refused an access inside the window"
        ),
    }
    let (available, requested) = (u32::from(r.u8()), usize::from(r.u8()));
    assert_eq!(
        vfio::msix_request(available, requested).is_ok(),
        requested as u32 <= available
    );
    let fds: Vec<i32> = (0..r.u8() % 4).map(|_| r.u32() as i32).collect();
    let words = vfio::irq_set_words(r.u32(), r.u32(), 0, &fds);
    assert_eq!(words.len(), 5 + fds.len());
    assert_eq!(words[0] as usize, words.len() * 4);
    let (region, bar_off) = (r.u64(), r.u64());
    let arg = vfio::ioeventfd_arg(region, bar_off, IoWidth::U16, 0, -1);
    assert_eq!(arg.map(|a| a.offset), region.checked_add(bar_off));
}

/// A VFIO-like function: QEMU's virtio-pci layout in raw bytes, and the
/// VFIO backend's DMA book-keeping with injected failures where the real
/// function issues `VFIO_IOMMU_MAP_DMA` / `VFIO_IOMMU_UNMAP_DMA`.
pub struct DmaFunction {
    raw: RawFunction,
    ranges: IovaRanges,
    state: Mutex<DmaState>,
}

#[derive(Default)]
struct DmaState {
    tracker: DmaTracker,
    /// IOVA → (size, host address) of every live mapping.
    hosts: BTreeMap<u64, (u64, usize)>,
    /// Fail this many of the next maps (after the range checks).
    fail_maps: u32,
    /// Refuse every unmap.
    refuse_unmap: bool,
}

impl DmaFunction {
    fn new(ranges: IovaRanges) -> Self {
        let raw = RawFunction::new(&ConfigBuilder::qemu_like(0x1042).build()).with_bar(
            4,
            vdpa_bridge::pci::BarKind::Memory,
            0x4000,
        );
        raw.poke(4, 4, &1u32.to_le_bytes()); // device_feature: VERSION_1
        raw.poke(4, 0x12, &1u16.to_le_bytes()); // num_queues
        raw.poke(4, 0x18, &256u16.to_le_bytes()); // queue_size
        DmaFunction {
            raw,
            ranges,
            state: Mutex::new(DmaState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DmaState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backend's view: `(iova, size, host)` of every mapping.
    fn view(&self) -> Vec<(u64, u64, usize)> {
        let st = self.state();
        let tracked = st.tracker.all();
        let hosts: Vec<(u64, u64)> = st.hosts.iter().map(|(&i, &(s, _))| (i, s)).collect();
        assert_eq!(tracked, hosts, "tracker and host records disagree");
        st.hosts.iter().map(|(&i, &(s, h))| (i, s, h)).collect()
    }
}

fn eio(op: &'static str) -> PciError {
    PciError::Io {
        op,
        source: std::io::Error::from_raw_os_error(5),
    }
}

// SAFETY: `bar_mappings` is the inner `RawFunction`'s, whose mappings live
// as long as it does, and it lives as long as `self`.
unsafe impl PciFunction for DmaFunction {
    fn config_read(&self, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        self.raw.config_read(offset, buf)
    }
    fn config_write(&self, offset: u64, buf: &[u8]) -> PciResult<()> {
        self.raw.config_write(offset, buf)
    }
    fn bar_info(&self, index: u8) -> Option<BarInfo> {
        self.raw.bar_info(index)
    }
    fn bar_mappings(&self, index: u8) -> Vec<BarMapping> {
        self.raw.bar_mappings(index)
    }
    fn bar_read(&self, index: u8, offset: u64, buf: &mut [u8]) -> PciResult<()> {
        self.raw.bar_read(index, offset, buf)
    }
    fn bar_write(&self, index: u8, offset: u64, buf: &[u8]) -> PciResult<()> {
        self.raw.bar_write(index, offset, buf)
    }
    fn msix_vectors(&self) -> u32 {
        0
    }
    fn enable_msix(&self, fds: &[Option<&EventFd>]) -> PciResult<()> {
        self.raw.enable_msix(fds)
    }
    fn disable_msix(&self) -> PciResult<()> {
        Ok(())
    }
    fn set_ioeventfd(
        &self,
        bar: u8,
        offset: u64,
        width: IoWidth,
        data: u64,
        fd: Option<&EventFd>,
    ) -> PciResult<()> {
        self.raw.set_ioeventfd(bar, offset, width, data, fd)
    }
    fn function_reset(&self) -> PciResult<bool> {
        Ok(false)
    }
    fn iova_range(&self) -> IovaRange {
        self.ranges.envelope()
    }
    /// `VfioFunction::dma_map`'s checks, then the injected failure where
    /// it issues the ioctl.
    unsafe fn dma_map(&self, iova: Iova, size: u64, host_addr: usize) -> PciResult<()> {
        let mut st = self.state();
        if !st.tracker.may_map(&self.ranges, iova.0, size) {
            return Err(PciError::DmaRange { iova: iova.0, size });
        }
        if st.fail_maps > 0 {
            st.fail_maps -= 1;
            return Err(eio("VFIO_IOMMU_MAP_DMA"));
        }
        st.tracker.insert(iova.0, size);
        st.hosts.insert(iova.0, (size, host_addr));
        Ok(())
    }
    /// `VfioFunction::dma_unmap`'s plan, with the ioctl refused while
    /// `refuse_unmap` is set.
    fn dma_unmap(&self, iova: Iova, size: u64) -> PciResult<()> {
        let mut st = self.state();
        let plan = st
            .tracker
            .unmap_plan(iova.0, size)
            .ok_or(PciError::DmaRange { iova: iova.0, size })?;
        for (start, _) in plan {
            if st.refuse_unmap {
                return Err(eio("VFIO_IOMMU_UNMAP_DMA"));
            }
            st.tracker.remove(start);
            st.hosts.remove(&start);
        }
        Ok(())
    }
    fn describe(&self) -> String {
        "fuzz DMA function".into()
    }
}

/// One guest memory region as the model knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Region {
    gpa: u64,
    len: u64,
    host: usize,
}

/// The model: what the plugin's table and the backend should hold.
struct Model {
    /// IOVA → (gpa, size): the plugin's table.
    table: BTreeMap<u64, (u64, u64)>,
    /// IOVA → (size, host): the backend's mappings.
    backend: BTreeMap<u64, (u64, usize)>,
    /// Usable IOVA ranges; what the backend accepts.
    usable: Vec<IovaRange>,
    envelope: IovaRange,
    /// Guest memory as the VMM currently has it.
    memory: Vec<Region>,
    fail_maps: u32,
    refuse_unmap: bool,
}

fn overlap(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    // Both non-empty and not wrapping (checked by the callers).
    a <= b + (b_len - 1) && b <= a + (a_len - 1)
}

impl Model {
    fn backend_map(&mut self, iova: u64, size: u64, host: usize) -> bool {
        if !self.envelope.contains(iova, size)
            || !self.usable.iter().any(|r| r.contains(iova, size))
            || self
                .backend
                .iter()
                .any(|(&s, &(l, _))| overlap(s, l, iova, size))
        {
            return false;
        }
        if self.fail_maps > 0 {
            self.fail_maps -= 1;
            return false;
        }
        self.backend.insert(iova, (size, host));
        true
    }

    /// The backend removing exactly the mapping at `iova` of `size`.
    fn backend_unmap(&mut self, iova: u64, size: u64) -> bool {
        if self.refuse_unmap || self.backend.get(&iova).map(|m| m.0) != Some(size) {
            return false;
        }
        self.backend.remove(&iova);
        true
    }

    fn map(&mut self, iova: u64, gpa: u64, size: u64) -> bool {
        if size == 0 || iova.checked_add(size - 1).is_none() || !self.envelope.contains(iova, size)
        {
            return false;
        }
        if self
            .table
            .iter()
            .any(|(&s, &(_, l))| overlap(s, l, iova, size))
        {
            return false;
        }
        if gpa.checked_add(size).is_none() {
            return false;
        }
        // Resolve every byte through guest memory first.
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < size {
            let at = gpa + done;
            let Some(r) = self
                .memory
                .iter()
                .find(|r| at >= r.gpa && at - r.gpa < r.len)
            else {
                return false;
            };
            let len = (r.len - (at - r.gpa)).min(size - done);
            pieces.push((iova + done, at, len, r.host + (at - r.gpa) as usize));
            done += len;
        }
        for (i, &(piova, pgpa, len, host)) in pieces.iter().enumerate() {
            if !self.backend_map(piova, len, host) {
                for &(u, _, l, _) in &pieces[..i] {
                    if self.backend_unmap(u, l) {
                        self.table.remove(&u);
                    }
                }
                return false;
            }
            self.table.insert(piova, (pgpa, len));
        }
        true
    }

    fn unmap(&mut self, iova: u64, size: u64) -> bool {
        if size == 0 {
            return false;
        }
        let Some(last) = iova.checked_add(size - 1) else {
            return false;
        };
        let hit: Vec<(u64, u64)> = self
            .table
            .iter()
            .filter(|(&s, _)| s >= iova && s <= last)
            .map(|(&s, &(_, l))| (s, l))
            .collect();
        let splits = hit.iter().any(|&(s, l)| s + (l - 1) > last)
            || self
                .table
                .iter()
                .any(|(&s, &(_, l))| s < iova && s + (l - 1) >= iova);
        if splits {
            return false;
        }
        for (s, l) in hit {
            if !self.backend_unmap(s, l) {
                return false;
            }
            self.table.remove(&s);
        }
        true
    }

    fn unmap_all(&mut self) {
        let all: Vec<(u64, u64)> = self.table.iter().map(|(&s, &(_, l))| (s, l)).collect();
        for (s, l) in all {
            if self.backend_unmap(s, l) {
                self.table.remove(&s);
            }
        }
    }

    fn map_guest_memory(&mut self) -> bool {
        let mut regions = self.memory.clone();
        regions.sort_by_key(|r| r.gpa);
        for r in regions {
            let mapped = self.table.get(&r.gpa) == Some(&(r.gpa, r.len));
            if !mapped && !self.map(r.gpa, r.gpa, r.len) {
                return false;
            }
        }
        true
    }
}

fn region(gpa: u64, len: u64) -> Option<(Arc<GuestRegionMmap<()>>, Region)> {
    let mm = MmapRegion::new(len as usize).ok()?;
    let r = GuestRegionMmap::new(mm, GuestAddress(gpa))?;
    let host = r.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
    Some((Arc::new(r), Region { gpa, len, host }))
}

fn memory_regions(m: &Mem) -> Vec<Region> {
    m.iter()
        .map(|r| Region {
            gpa: r.start_addr().raw_value(),
            len: r.len(),
            host: r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize,
        })
        .collect()
}

fn table(r: &mut Reader, list: Vec<IovaRange>) {
    let ranges = IovaRanges::new(list.clone());
    // Guest memory: 1 to 4 regions of 1 to 8 pages, 0 to 3 pages apart
    // (0: adjacent, so one request can span two regions).
    let mut all: Vec<Arc<GuestRegionMmap<()>>> = Vec::new();
    let mut at = u64::from(r.u8() % 4) * PAGE;
    for _ in 0..1 + r.u8() % 4 {
        let len = u64::from(1 + r.u8() % 8) * PAGE;
        let (reg, _) = region(at, len).expect("guest memory");
        all.push(reg);
        at += len + u64::from(r.u8() % 4) * PAGE;
    }
    let mem = GuestMemoryAtomic::new(Mem::from_arc_regions(all.clone()).expect("guest memory"));

    // What the backend accepts: the parsed ranges, or the VFIO backend's
    // fallback when the kernel reports none.
    let usable = if list.is_empty() {
        vec![IovaRanges::FALLBACK]
    } else {
        list
    };
    let f = Arc::new(DmaFunction::new(ranges.clone()));
    let mut model = Model {
        table: BTreeMap::new(),
        backend: BTreeMap::new(),
        envelope: ranges.envelope(),
        usable,
        memory: memory_regions(&mem.memory()),
        fail_maps: 0,
        refuse_unmap: false,
    };
    let iommu = !r.one_in(4);
    let vp = VpVdpa::open(Arc::clone(&f), OpenOptions::default()).expect("open the DMA function");
    let opts = DeviceOptions {
        iommu,
        ..DeviceOptions::default()
    };
    let dev = BridgeDevice::new(vp, mem.clone(), opts);
    let expect_new = iommu || model.map_guest_memory();
    let dev = match dev {
        Ok(d) => {
            assert!(expect_new, "device made though mapping guest memory fails");
            d
        }
        Err(e) => {
            assert!(!expect_new, "device refused: {e}");
            // The backend, dropped with the device, kept its mappings
            // (a VFIO function removes them when it is closed).
            assert_eq!(view(&f), model_view(&model));
            return;
        }
    };
    check(&dev, &f, &model, &all, "construction");

    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        let op = r.u8() % 9;
        let what = match op {
            0 | 1 => {
                let gpa = addr(r);
                let iova = if r.bool() { gpa } else { addr(r) };
                let size = size(r);
                let got = dev.dma().map(iova, gpa, size);
                let want = model.map(iova, gpa, size);
                assert_eq!(
                    got.is_ok(),
                    want,
                    "map {iova:#x} gpa {gpa:#x} +{size:#x}: {got:?}"
                );
                "map"
            }
            2 => {
                let (iova, size) = (addr(r), size(r));
                let got = dev.dma().unmap(iova, size);
                let want = model.unmap(iova, size);
                assert_eq!(got.is_ok(), want, "unmap {iova:#x} +{size:#x}: {got:?}");
                "unmap"
            }
            3 => {
                let got = dev.dma().map_guest_memory();
                assert_eq!(
                    got.is_ok(),
                    model.map_guest_memory(),
                    "map_guest_memory: {got:?}"
                );
                "map_guest_memory"
            }
            4 => {
                dev.dma().unmap_all();
                model.unmap_all();
                "unmap_all"
            }
            5 => {
                let gpa = u64::from(r.u8() % 64) * PAGE;
                let len = u64::from(1 + r.u8() % 8) * PAGE;
                if let Some((reg, _)) = region(gpa, len) {
                    if let Ok(m) = mem.memory().insert_region(Arc::clone(&reg)) {
                        mem.lock().unwrap().replace(m);
                        all.push(reg);
                        model.memory = memory_regions(&mem.memory());
                    }
                }
                "hotplug"
            }
            6 => {
                let regions = memory_regions(&mem.memory());
                if regions.len() > 1 {
                    let v = regions[usize::from(r.u8()) % regions.len()];
                    if let Ok((m, _)) = mem.memory().remove_region(GuestAddress(v.gpa), v.len) {
                        mem.lock().unwrap().replace(m);
                        model.memory = memory_regions(&mem.memory());
                    }
                }
                "unplug"
            }
            7 => {
                let n = u32::from(r.u8() % 3);
                f.state().fail_maps = n;
                model.fail_maps = n;
                "fail maps"
            }
            _ => {
                let on = r.bool();
                f.state().refuse_unmap = on;
                model.refuse_unmap = on;
                "refuse unmaps"
            }
        };
        check(&dev, &f, &model, &all, what);
    }

    drop(dev);
    model.unmap_all();
    assert_eq!(view(&f), model_view(&model), "after the device was dropped");
    if !model.refuse_unmap {
        assert!(
            view(&f).is_empty(),
            "mappings left after the device was dropped"
        );
    }
}

fn view(f: &DmaFunction) -> Vec<(u64, u64, usize)> {
    f.view()
}

fn model_view(m: &Model) -> Vec<(u64, u64, usize)> {
    m.backend.iter().map(|(&i, &(s, h))| (i, s, h)).collect()
}

fn check(
    dev: &BridgeDevice<VpVdpa<DmaFunction>, Mem>,
    f: &DmaFunction,
    model: &Model,
    all: &[Arc<GuestRegionMmap<()>>],
    after: &str,
) {
    let table = dev.dma().mappings();
    let want: Vec<(u64, u64, u64)> = model.table.iter().map(|(&i, &(g, s))| (i, g, s)).collect();
    assert_eq!(table, want, "plugin table after {after}");
    let backend = view(f);
    assert_eq!(backend, model_view(model), "backend after {after}");
    let t: Vec<(u64, u64)> = table.iter().map(|&(i, _, s)| (i, s)).collect();
    let b: Vec<(u64, u64)> = backend.iter().map(|&(i, s, _)| (i, s)).collect();
    assert_eq!(t, b, "table differs from the backend's view after {after}");
    for w in table.windows(2) {
        assert!(w[0].0 + (w[0].2 - 1) < w[1].0, "overlapping mappings {w:?}");
    }
    for (&(iova, gpa, size), &(_, _, host)) in table.iter().zip(&backend) {
        assert!(
            model.usable.iter().any(|r| r.contains(iova, size)),
            "mapping {iova:#x}+{size:#x} outside every usable range"
        );
        // Guest RAM, at the recorded GPA, in a region that still lives
        // (the harness keeps every region it ever made).
        let ram = all.iter().any(|r| {
            let (start, len) = (r.start_addr().raw_value(), r.len());
            let h = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            gpa >= start && gpa - start + size <= len && host == h + (gpa - start) as usize
        });
        assert!(
            ram,
            "mapping {iova:#x}+{size:#x} at host {host:#x} is not guest RAM at {gpa:#x}"
        );
    }
}
