//! Target `caps`: capability parsing, [`VpVdpa::open`] and the
//! doorbell-page decision on a raw function built from the bytes (config
//! space, BAR sizes and kinds, common config contents, the host's page
//! size).
//!
//! Invariants checked:
//!
//! * nothing panics, whatever the bytes;
//! * the capability list of the config-space image is bounded
//!   ([`MAX_CAPS`]), its positions distinct and inside the 256-byte space;
//! * after a successful open, every structure in use (common, notify,
//!   ISR, device) lies inside its BAR, which exists and is a memory BAR,
//!   meets its minimum size, and overlaps no other one; the notify
//!   multiplier is 0 or an even power of two;
//! * doorbell pages offered to a guest ([`VdpaOps::notification_pages`])
//!   are whole host pages of a BAR mapping, inside the notify structure,
//!   cover every doorbell, and overlap no other structure any capability
//!   names (duplicates and shared memory included), nor the MSI-X table or
//!   PBA; with a capability whose BAR use cannot be known, none is
//!   offered. The structures are found by a walk of the bytes written
//!   here, independent of the parser under test;
//! * a per-queue notification area marked page-exclusive
//!   ([`VdpaOps::notification_area`]) is a page holding that queue's
//!   doorbell and nothing else (no other queue's doorbell, no structure).

use std::sync::Arc;
use std::time::Duration;

use vdpa_bridge::fake::RawFunction;
use vdpa_bridge::pci::{BarKind, ConfigImage, PciFunction};
use vdpa_bridge::virtio_pci::caps::{self, CapRegion, MAX_CAPS};
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_bridge::{QueueIndex, VdpaOps};

use crate::Reader;

/// Common config register offsets (virtio 1.2 §4.1.4.3).
const DEVICE_FEATURE: usize = 0x04;
const NUM_QUEUES: usize = 0x12;
const DEVICE_STATUS: usize = 0x14;
const QUEUE_SIZE: usize = 0x18;
const QUEUE_NOTIFY_OFF: usize = 0x1e;

/// A decoded input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapsInput {
    /// Keep the first bytes of the header as given (else vendor 0x1af4,
    /// device 0x1042 and the capability-list bit are forced, so most
    /// inputs reach the capability walk).
    pub raw_header: bool,
    /// Page size selector (see [`page_size`]).
    pub page: u8,
    /// Per BAR: bits 6..8 kind (0 absent, 1 memory, 2 memory mapped into
    /// the host, 3 I/O), bits 0..4 size as a power of two from 16 bytes.
    pub bars: [u8; 6],
    /// `device_feature` (both halves read the same: raw bytes ignore the
    /// select register).
    pub device_feature: u32,
    /// `num_queues`.
    pub num_queues: u16,
    /// `queue_size` (every queue: raw bytes ignore `queue_select`).
    pub queue_size: u16,
    /// `queue_notify_off`.
    pub queue_notify_off: u16,
    /// `device_status` before the driver touches it.
    pub status: u8,
    /// Config space (up to 256 bytes; zero-padded).
    pub config: Vec<u8>,
}

impl CapsInput {
    /// Decode `data`.
    pub fn decode(data: &[u8]) -> Self {
        let mut r = Reader::new(data);
        let raw_header = r.bool();
        let page = r.u8();
        let mut bars = [0u8; 6];
        for b in &mut bars {
            *b = r.u8();
        }
        CapsInput {
            raw_header,
            page,
            bars,
            device_feature: r.u32(),
            num_queues: r.u16(),
            queue_size: r.u16(),
            queue_notify_off: r.u16(),
            status: r.u8(),
            config: r.bytes(256).to_vec(),
        }
    }

    /// The bytes [`CapsInput::decode`] reads back as `self` (for seeds).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![u8::from(self.raw_header), self.page];
        v.extend_from_slice(&self.bars);
        v.extend_from_slice(&self.device_feature.to_le_bytes());
        v.extend_from_slice(&self.num_queues.to_le_bytes());
        v.extend_from_slice(&self.queue_size.to_le_bytes());
        v.extend_from_slice(&self.queue_notify_off.to_le_bytes());
        v.push(self.status);
        v.extend_from_slice(&self.config[..self.config.len().min(256)]);
        v
    }

    /// The 256-byte config space the function shows.
    pub fn config_space(&self) -> [u8; 256] {
        let mut c = [0u8; 256];
        c[..self.config.len().min(256)].copy_from_slice(&self.config[..self.config.len().min(256)]);
        if !self.raw_header {
            c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
            c[2..4].copy_from_slice(&0x1042u16.to_le_bytes());
            c[6] |= 0x10;
        }
        c
    }
}

/// The BAR byte for a BAR of `kind` (0 absent, 1 memory, 2 mapped memory,
/// 3 I/O) and `16 << exp` bytes.
pub fn bar_byte(kind: u8, exp: u8) -> u8 {
    (kind << 6) | (exp & 0x0f)
}

/// Host page sizes the target tries: 4 KiB mostly, 16 and 64 KiB, and
/// sizes that are not a power of two (which `open` must refuse).
pub fn page_size(selector: u8) -> u64 {
    [0x1000, 0x1000, 0x1_0000, 0x4000, 0x1800, 0][usize::from(selector % 6)]
}

/// A BAR-named range: `(bar, start, end)`.
type Range = (u8, u64, u64);

/// Every range the capabilities of `c` name in the BARs, found by a walk
/// of the bytes independent of the parser under test: all virtio
/// structures (types 1 to 4, every instance), shared-memory regions, the
/// MSI-X table and PBA. `None` when some capability's use of the BARs
/// cannot be known (vendor data, unknown types, short capabilities, a
/// second MSI-X capability, one at the end of the space) or the list is
/// malformed.
fn named_ranges(c: &[u8; 256]) -> Option<Vec<Range>> {
    if c[6] & 0x10 == 0 {
        return None;
    }
    let u32_at = |p: usize| u32::from_le_bytes([c[p], c[p + 1], c[p + 2], c[p + 3]]);
    let mut ptr = usize::from(c[0x34] & !3);
    let mut seen = [false; 256];
    let mut hops = 0;
    let mut msix = false;
    let mut out = Vec::new();
    while ptr != 0 {
        if !(0x40..=0xfe).contains(&ptr) || seen[ptr] || hops >= MAX_CAPS {
            return None;
        }
        seen[ptr] = true;
        hops += 1;
        let id = c[ptr];
        match id {
            0x11 => {
                if msix || ptr + 12 > 256 {
                    return None;
                }
                msix = true;
                let vectors = u64::from(u16::from_le_bytes([c[ptr + 2], c[ptr + 3]]) & 0x7ff) + 1;
                let table = u32_at(ptr + 4);
                let pba = u32_at(ptr + 8);
                let (t_off, p_off) = (u64::from(table & !7), u64::from(pba & !7));
                out.push(((table & 7) as u8, t_off, t_off + vectors * 16));
                out.push(((pba & 7) as u8, p_off, p_off + vectors.div_ceil(64) * 8));
            }
            0x09 => {
                let len = usize::from(c[ptr + 2]);
                let ty = c[ptr + 3];
                let bar = c[ptr + 4];
                let min = match ty {
                    2 => 20,
                    8 => 24,
                    _ => 16,
                };
                let whole = len >= min && ptr + len <= 256;
                match ty {
                    5 if whole => {}
                    1..=4 | 8 if whole => {
                        let (mut off, mut length) =
                            (u64::from(u32_at(ptr + 8)), u64::from(u32_at(ptr + 12)));
                        if ty == 8 {
                            off |= u64::from(u32_at(ptr + 16)) << 32;
                            length |= u64::from(u32_at(ptr + 20)) << 32;
                        }
                        // Reserved BAR values name nothing (virtio 1.2 §4.1.4).
                        if bar <= 5 {
                            out.push((bar, off, off.saturating_add(length)));
                        }
                    }
                    _ => return None,
                }
            }
            _ => {}
        }
        ptr = usize::from(c[ptr + 1] & !3);
    }
    Some(out)
}

fn overlaps(ranges: &[Range], bar: u8, start: u64, end: u64) -> Option<Range> {
    ranges
        .iter()
        .copied()
        .find(|&(b, s, e)| b == bar && s < end && start < e && s < e)
}

/// Build the function `input` describes.
fn function(input: &CapsInput) -> Arc<RawFunction> {
    let config = input.config_space();
    let mut f = RawFunction::new(&config);
    for (i, &b) in input.bars.iter().enumerate() {
        let size = 16u64 << (b & 0x0f);
        let i = i as u8;
        f = match b >> 6 {
            0 => f,
            1 => f.with_bar(i, BarKind::Memory, size),
            2 => f.with_mapped_bar(i, size),
            _ => f.with_bar(i, BarKind::Io, size),
        };
    }
    // The common config contents, wherever a common capability puts them
    // (every instance: which one the parser picks is its business).
    let regs = [
        (DEVICE_FEATURE, input.device_feature.to_le_bytes().to_vec()),
        (NUM_QUEUES, input.num_queues.to_le_bytes().to_vec()),
        (DEVICE_STATUS, vec![input.status]),
        (QUEUE_SIZE, input.queue_size.to_le_bytes().to_vec()),
        (
            QUEUE_NOTIFY_OFF,
            input.queue_notify_off.to_le_bytes().to_vec(),
        ),
    ];
    for (bar, off, end) in common_instances(&config) {
        let Some(info) = f.bar_info(bar) else {
            continue;
        };
        if end - off < 0x38 || end > info.size {
            continue;
        }
        for (reg, bytes) in &regs {
            f.poke(bar, off as usize + reg, bytes);
        }
    }
    Arc::new(f)
}

/// `(bar, offset, end)` of every common capability in the list.
fn common_instances(c: &[u8; 256]) -> Vec<Range> {
    let mut out = Vec::new();
    let mut ptr = usize::from(c[0x34] & !3);
    let mut seen = [false; 256];
    while (0x40..=0xfc).contains(&ptr) && !seen[ptr] {
        seen[ptr] = true;
        if c[ptr] == 0x09 && c[ptr + 3] == 1 && ptr + 16 <= 256 && c[ptr + 4] <= 5 {
            let at = |p: usize| u64::from(u32::from_le_bytes([c[p], c[p + 1], c[p + 2], c[p + 3]]));
            let (off, len) = (at(ptr + 8), at(ptr + 12));
            out.push((c[ptr + 4], off, off + len));
        }
        ptr = usize::from(c[ptr + 1] & !3);
    }
    out
}

/// The target.
pub fn run(data: &[u8]) {
    let input = CapsInput::decode(data);
    let config = input.config_space();

    // The one walker on a config-space image (the CLI's `list`).
    if let Ok(list) = caps::capability_list(&ConfigImage(&config)) {
        assert!(list.len() <= MAX_CAPS, "{} capabilities", list.len());
        let mut seen = [false; 256];
        for &(pos, _) in &list {
            assert!(pos >= 0x40, "capability at {pos:#x} in the header");
            assert!(!seen[usize::from(pos)], "capability {pos:#x} listed twice");
            seen[usize::from(pos)] = true;
        }
    }
    let _ = caps::has_virtio_caps(&ConfigImage(&config));

    let f = function(&input);
    let opts = OpenOptions {
        features_mask: None,
        // Raw bytes read back what was written: a reset finishes at once.
        reset_timeout: Duration::from_millis(5),
        page_size: page_size(input.page),
    };
    let Ok(d) = VpVdpa::open(Arc::clone(&f), opts) else {
        return;
    };
    check_structures(&f, &d);
    check_doorbell_pages(&f, &d, &config, opts.page_size);
}

fn check_structures(f: &RawFunction, d: &VpVdpa<RawFunction>) {
    let c = d.transport().caps();
    let m = c.notify.multiplier;
    assert!(
        m == 0 || (m.is_power_of_two() && m >= 2),
        "notify_off_multiplier {m} accepted"
    );
    let used: [(&str, Option<CapRegion>, u64); 4] = [
        ("common", Some(c.common), 0x38),
        ("notify", Some(c.notify.region), 2),
        ("ISR", Some(c.isr), 1),
        ("device", c.device, 0),
    ];
    for (i, (what, r, min)) in used.iter().enumerate() {
        let Some(r) = r else { continue };
        let info = f
            .bar_info(r.bar)
            .unwrap_or_else(|| panic!("{what} in BAR {} that does not exist", r.bar));
        assert_eq!(info.kind, BarKind::Memory, "{what} in an I/O BAR");
        assert!(r.length >= *min, "{what} of {:#x} bytes", r.length);
        let end = r
            .offset
            .checked_add(r.length)
            .expect("region end overflows");
        assert!(
            end <= info.size,
            "{what} {:#x}+{:#x} past BAR {} of {:#x}",
            r.offset,
            r.length,
            r.bar,
            info.size
        );
        for (other, o, _) in &used[i + 1..] {
            let Some(o) = o else { continue };
            let disjoint = o.bar != r.bar
                || r.length == 0
                || o.length == 0
                || o.offset >= end
                || r.offset >= o.offset + o.length;
            assert!(disjoint, "{what} {r:?} overlaps {other} {o:?}");
        }
    }
    assert!(d.config_size() as u64 == c.device.map_or(0, |r| r.length));
}

fn check_doorbell_pages(f: &RawFunction, d: &VpVdpa<RawFunction>, config: &[u8; 256], page: u64) {
    let notify = d.transport().caps().notify.region;
    let notify_end = notify.offset + notify.length;
    let others: Option<Vec<Range>> = named_ranges(config).map(|v| {
        v.into_iter()
            .filter(|&r| r != (notify.bar, notify.offset, notify_end))
            .collect()
    });
    let n = d.num_queues();

    if let Some(p) = d.notification_pages() {
        let others = others
            .as_ref()
            .expect("doorbell pages offered though a capability's BAR use is unknown");
        assert_eq!(p.page_size, page);
        assert!(
            p.len > 0 && p.len.is_multiple_of(page),
            "length {:#x}",
            p.len
        );
        assert!(
            (p.host_addr as u64).is_multiple_of(page),
            "host address unaligned"
        );
        // Where the pages are in the BAR, from the function's own mapping.
        let m = f
            .bar_mappings(notify.bar)
            .into_iter()
            .find(|m| {
                p.host_addr >= m.host_addr && (p.host_addr - m.host_addr) as u64 + p.len <= m.len
            })
            .expect("doorbell pages outside every mapping of the notify BAR");
        let start = m.offset + (p.host_addr - m.host_addr) as u64;
        let end = start + p.len;
        assert!(
            start >= notify.offset && end <= notify_end,
            "pages {start:#x}..{end:#x} outside the notify structure {notify:?}"
        );
        if let Some(o) = overlaps(others, notify.bar, start, end) {
            panic!(
                "pages {start:#x}..{end:#x} of BAR {} overlap {o:?}",
                notify.bar
            );
        }
        assert_eq!(p.doorbells.len(), usize::from(n), "a doorbell per queue");
        for (q, &db) in p.doorbells.iter().enumerate() {
            assert!(
                db + 4 <= p.len,
                "queue {q}'s doorbell {db:#x} past the pages"
            );
        }
    }

    let doorbells: Vec<Option<u64>> = (0..n)
        .map(|q| d.notification_area(QueueIndex(q)).ok().map(|a| a.offset))
        .collect();
    for q in 0..n {
        let Ok(a) = d.notification_area(QueueIndex(q)) else {
            continue;
        };
        assert!(
            a.offset >= notify.offset && a.offset + a.size <= notify_end,
            "queue {q}'s doorbell {:#x} outside the notify structure",
            a.offset
        );
        if !a.page_exclusive {
            continue;
        }
        let others = others
            .as_ref()
            .expect("an exclusive doorbell page though a capability's BAR use is unknown");
        let start = a.offset & !(page - 1);
        let end = start + page;
        assert!(
            start >= notify.offset && end <= notify_end,
            "queue {q}'s exclusive page {start:#x} outside the notify structure"
        );
        if let Some(o) = overlaps(others, notify.bar, start, end) {
            panic!("queue {q}'s exclusive page {start:#x} overlaps {o:?}");
        }
        for (j, o) in doorbells.iter().enumerate() {
            if j != usize::from(q) && o.is_some_and(|o| o >= start && o < end) {
                panic!("queue {q}'s exclusive page {start:#x} holds queue {j}'s doorbell");
            }
        }
    }
    // Kicks and doorbells must not panic either.
    for q in 0..n.min(4) {
        let _ = d.kick(QueueIndex(q));
        if let Ok(db) = d.doorbell(QueueIndex(q)) {
            let _ = db.ring(1);
        }
    }
}
