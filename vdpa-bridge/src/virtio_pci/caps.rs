//! The bounded walk of a virtio-pci function's capability list
//! (virtio 1.2 §4.1.4): every value here comes from the device and is
//! checked before use.

use crate::pci::{cfg, BarKind, ConfigSpace, PciError, PciFunction};

use super::regs::{cfg_type, common, VirtioPciCap};

/// Most capabilities the walk follows before giving up (a looping list):
/// 256 bytes of config space hold at most 48 after the header.
pub const MAX_CAPS: usize = 48;

#[doc(inline)]
pub use crate::pci::ConfigImage;

/// Errors found in a device's capabilities.
#[derive(Debug, thiserror::Error)]
pub enum CapError {
    /// Reading config space failed.
    #[error("config space read failed")]
    Config(#[source] PciError),
    /// The status register says there is no capability list.
    #[error("device has no capability list")]
    NoCapabilityList,
    /// A capability pointer outside the standard config header area.
    #[error("capability pointer {0:#x} is out of range")]
    BadPointer(u8),
    /// The list is longer than [`MAX_CAPS`] or loops.
    #[error("capability list loops or has more than {MAX_CAPS} entries")]
    TooManyCaps,
    /// A virtio capability shorter than its structure.
    #[error("virtio capability at {pos:#x} (type {cfg_type}) has length {len}")]
    ShortCap {
        /// Position in config space.
        pos: u8,
        /// `cfg_type`.
        cfg_type: u8,
        /// `cap_len` the device reported.
        len: u8,
    },
    /// A required structure has no capability.
    #[error("required virtio capability {0} is missing")]
    Missing(&'static str),
    /// A structure in a BAR that does not exist.
    #[error("{what} capability names BAR {bar}, which does not exist")]
    NoSuchBar {
        /// Which structure.
        what: &'static str,
        /// The BAR index.
        bar: u8,
    },
    /// A structure in an I/O-port BAR; this driver needs memory BARs.
    #[error("{what} capability is in BAR {bar}, an I/O-port BAR")]
    BarNotMemory {
        /// Which structure.
        what: &'static str,
        /// The BAR index.
        bar: u8,
    },
    /// A structure that extends past its BAR.
    #[error(
        "{what} capability at {offset:#x} (+{length:#x}) is past BAR {bar} of size {bar_size:#x}"
    )]
    PastBar {
        /// Which structure.
        what: &'static str,
        /// BAR index.
        bar: u8,
        /// Offset in the BAR.
        offset: u32,
        /// Length of the structure.
        length: u32,
        /// Size of the BAR.
        bar_size: u64,
    },
    /// A structure smaller than the driver needs.
    #[error("{what} capability length {length:#x} is below the minimum {min:#x}")]
    TooSmall {
        /// Which structure.
        what: &'static str,
        /// Reported length.
        length: u32,
        /// Required length.
        min: u64,
    },
    /// Two structures overlapping in the same BAR.
    #[error("{a} and {b} capabilities overlap in BAR {bar}")]
    Overlap {
        /// First structure.
        a: &'static str,
        /// Second structure.
        b: &'static str,
        /// BAR index.
        bar: u8,
    },
    /// The notify multiplier is not usable.
    #[error("notify_off_multiplier {0} is invalid")]
    InvalidNotifyOffMultiplier(u32),
}

/// A structure's place: which BAR, where, how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapRegion {
    /// BAR index (0..6).
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl CapRegion {
    fn end(&self) -> u64 {
        // Cannot overflow: both come from u32 fields.
        self.offset + self.length
    }
}

/// The notify structure: region plus multiplier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyRegion {
    /// Where the doorbells are.
    pub region: CapRegion,
    /// `notify_off_multiplier`.
    pub multiplier: u32,
}

/// A capability whose use of the BARs cannot be known: a vendor-data
/// capability (its data lives wherever the vendor put it), a virtio
/// capability of a type this driver does not know, one too short to say
/// where its region is, or a second MSI-X capability. With one present no
/// page of the device can be proven to hold nothing but doorbells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpaqueCap {
    /// Position in config space.
    pub pos: u8,
    /// Capability id (0x09 vendor, 0x11 MSI-X).
    pub id: u8,
    /// `cfg_type` of a vendor capability (0 otherwise).
    pub cfg_type: u8,
}

/// What the walk found: one usable instance of each structure, and
/// everything any capability says about the BARs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration.
    pub common: CapRegion,
    /// Notifications.
    pub notify: NotifyRegion,
    /// ISR status.
    pub isr: CapRegion,
    /// Device configuration (absent for devices without one).
    pub device: Option<CapRegion>,
    /// Position of the PCI-configuration-access capability, if any.
    pub pci_cfg: Option<u8>,
    /// Position of the (first) MSI-X capability and its table size, if
    /// any: the one the PCI core and VFIO use.
    pub msix: Option<(u8, u16)>,
    /// Every BAR range a virtio capability names, whichever instance was
    /// picked: all instances of the common, notify, ISR and device
    /// structures (duplicates included) and the shared-memory regions.
    pub described: Vec<CapRegion>,
    /// Capabilities whose BAR use cannot be known (see [`OpaqueCap`]).
    pub opaque: Vec<OpaqueCap>,
}

/// One raw virtio capability as found in the list.
#[derive(Clone, Copy, Debug)]
struct RawCap {
    pos: u8,
    cap: VirtioPciCap,
    multiplier: Option<u32>,
    /// `offset_hi`, `length_hi` of a 64-bit capability (shared memory).
    hi: Option<(u32, u32)>,
}

fn what(t: u8) -> &'static str {
    match t {
        cfg_type::COMMON => "common",
        cfg_type::NOTIFY => "notify",
        cfg_type::ISR => "ISR",
        cfg_type::DEVICE => "device",
        cfg_type::PCI => "PCI config access",
        _ => "other",
    }
}

/// Whether the function has any virtio vendor capability at all (a
/// legacy-only device has none).
///
/// # Errors
///
/// As [`capability_list`].
pub fn has_virtio_caps<C: ConfigSpace + ?Sized>(f: &C) -> Result<bool, CapError> {
    let w = walk(f)?;
    Ok(!w.caps.is_empty() || w.opaque.iter().any(|o| o.id == cfg::CAP_ID_VENDOR))
}

/// Whether the function has a virtio vendor capability of `cfg_type`
/// (e.g. [`cfg_type::COMMON`]: the function offers the modern interface).
///
/// # Errors
///
/// As [`capability_list`]; a malformed vendor capability too.
pub fn has_virtio_cap<C: ConfigSpace + ?Sized>(f: &C, t: u8) -> Result<bool, CapError> {
    let w = walk(f)?;
    Ok(w.caps.iter().any(|c| c.cap.cfg_type == t) || w.opaque.iter().any(|o| o.cfg_type == t))
}

/// The standard capability list of a config space, as `(position, id)`
/// pairs in list order: the one walker of the crate, for a PCI function
/// and for a config-space image alike ([`ConfigImage`]).
///
/// Every pointer comes from the device: it must lie after the 64-byte
/// header with room for the id/next pair, the walk stops after
/// [`MAX_CAPS`] entries, and a pointer seen before (a loop) ends it with
/// an error.
///
/// # Errors
///
/// [`CapError::NoCapabilityList`], [`CapError::BadPointer`],
/// [`CapError::TooManyCaps`], or a read that failed ([`CapError::Config`]:
/// an image too short for the pointer it holds).
pub fn capability_list<C: ConfigSpace + ?Sized>(f: &C) -> Result<Vec<(u8, u8)>, CapError> {
    let status = read_u16(f, cfg::STATUS)?;
    if status & cfg::STATUS_CAP_LIST == 0 {
        return Err(CapError::NoCapabilityList);
    }
    let mut ptr = read_u8(f, cfg::CAPABILITIES_POINTER)? & !3;
    let mut seen = [false; 256];
    let mut out = Vec::new();
    while ptr != 0 {
        // Standard capabilities live after the 64-byte header and need at
        // least the 2-byte id/next pair inside the 256-byte space.
        if !(0x40..=0xfe).contains(&ptr) {
            return Err(CapError::BadPointer(ptr));
        }
        if out.len() >= MAX_CAPS || seen[usize::from(ptr)] {
            return Err(CapError::TooManyCaps);
        }
        seen[usize::from(ptr)] = true;
        let pos = u64::from(ptr);
        let id = read_u8(f, pos)?;
        out.push((ptr, id));
        ptr = read_u8(f, pos + 1)? & !3;
    }
    Ok(out)
}

fn read_u8<C: ConfigSpace + ?Sized>(f: &C, off: u64) -> Result<u8, CapError> {
    let mut b = [0u8; 1];
    f.read_config_space(off, &mut b).map_err(CapError::Config)?;
    Ok(b[0])
}

fn read_u16<C: ConfigSpace + ?Sized>(f: &C, off: u64) -> Result<u16, CapError> {
    let mut b = [0u8; 2];
    f.read_config_space(off, &mut b).map_err(CapError::Config)?;
    Ok(u16::from_le_bytes(b))
}

fn read_u32<C: ConfigSpace + ?Sized>(f: &C, off: u64) -> Result<u32, CapError> {
    let mut b = [0u8; 4];
    f.read_config_space(off, &mut b).map_err(CapError::Config)?;
    Ok(u32::from_le_bytes(b))
}

/// What [`walk`] finds.
struct Walk {
    /// Virtio capabilities with a BAR region (types 1 to 5 and 8).
    caps: Vec<RawCap>,
    /// The first MSI-X capability (offset, table size).
    msix: Option<(u8, u16)>,
    /// Capabilities whose BAR use cannot be known.
    opaque: Vec<OpaqueCap>,
}

/// The virtio vendor capabilities and the MSI-X capability of the list.
///
/// The structures a driver needs (common, notify, ISR, device, PCI access)
/// must be whole: a short one is an error. Anything else that cannot be
/// read completely is recorded as opaque, not refused: a vendor-data
/// capability is a handful of bytes, and an MSI-X capability whose table
/// words do not fit in the 256-byte space (at 0xf8 or above) still tells
/// the vector count.
fn walk<C: ConfigSpace + ?Sized>(f: &C) -> Result<Walk, CapError> {
    let mut w = Walk {
        caps: Vec::new(),
        msix: None,
        opaque: Vec::new(),
    };
    for (ptr, id) in capability_list(f)? {
        let pos = u64::from(ptr);
        let opaque = |t| OpaqueCap {
            pos: ptr,
            id,
            cfg_type: t,
        };
        if id == cfg::CAP_ID_MSIX {
            if w.msix.is_some() {
                w.opaque.push(opaque(0));
                continue;
            }
            let ctrl = read_u16(f, pos + 2)?;
            w.msix = Some((ptr, (ctrl & 0x7ff) + 1));
        } else if id == cfg::CAP_ID_VENDOR {
            let len = read_u8(f, pos + 2)?;
            let t = read_u8(f, pos + 3)?;
            let fits = |min: u64| u64::from(len) >= min && u64::from(len) + pos <= 0x100;
            let needed = matches!(
                t,
                cfg_type::COMMON
                    | cfg_type::NOTIFY
                    | cfg_type::ISR
                    | cfg_type::DEVICE
                    | cfg_type::PCI
            );
            let min = match t {
                cfg_type::NOTIFY => 20,
                cfg_type::SHARED_MEMORY => 24,
                _ => 16,
            };
            if needed && !fits(min) {
                return Err(CapError::ShortCap {
                    pos: ptr,
                    cfg_type: t,
                    len,
                });
            }
            if !needed && (t != cfg_type::SHARED_MEMORY || !fits(min)) {
                // Vendor data, unknown types, a short shared-memory cap.
                w.opaque.push(opaque(t));
                continue;
            }
            let mut b = [0u8; 16];
            f.read_config_space(pos, &mut b).map_err(CapError::Config)?;
            let cap = VirtioPciCap::from_bytes(&b);
            let multiplier = if t == cfg_type::NOTIFY {
                Some(read_u32(f, pos + 16)?)
            } else {
                None
            };
            let hi = if t == cfg_type::SHARED_MEMORY {
                Some((read_u32(f, pos + 16)?, read_u32(f, pos + 20)?))
            } else {
                None
            };
            w.caps.push(RawCap {
                pos: ptr,
                cap,
                multiplier,
                hi,
            });
        }
    }
    Ok(w)
}

/// The BAR range a capability names, if it names one (types 1 to 4 and
/// shared memory, in a BAR 0..=5).
fn named_range(c: &RawCap) -> Option<CapRegion> {
    let t = c.cap.cfg_type;
    if t == cfg_type::PCI || c.cap.bar > 5 {
        return None;
    }
    let (off_hi, len_hi) = c.hi.unwrap_or((0, 0));
    let offset = u64::from(c.cap.offset) | (u64::from(off_hi) << 32);
    let length = u64::from(c.cap.length) | (u64::from(len_hi) << 32);
    Some(CapRegion {
        bar: c.cap.bar,
        offset,
        // A range past the end of the address space still covers its end.
        length: length.min(u64::MAX - offset),
    })
}

/// Check one capability's region against its BAR.
fn check_region<P: PciFunction + ?Sized>(
    f: &P,
    cap: &VirtioPciCap,
    min: u64,
) -> Result<CapRegion, CapError> {
    let what = what(cap.cfg_type);
    let info = f
        .bar_info(cap.bar)
        .ok_or(CapError::NoSuchBar { what, bar: cap.bar })?;
    if info.kind != BarKind::Memory {
        return Err(CapError::BarNotMemory { what, bar: cap.bar });
    }
    if u64::from(cap.length) < min {
        return Err(CapError::TooSmall {
            what,
            length: cap.length,
            min,
        });
    }
    let end = u64::from(cap.offset) + u64::from(cap.length);
    if end > info.size {
        return Err(CapError::PastBar {
            what,
            bar: cap.bar,
            offset: cap.offset,
            length: cap.length,
            bar_size: info.size,
        });
    }
    Ok(CapRegion {
        bar: cap.bar,
        offset: u64::from(cap.offset),
        length: u64::from(cap.length),
    })
}

/// Walk the capability list and pick one usable instance of each virtio
/// structure, the first in list order that checks out (virtio 1.2
/// §4.1.4: "the driver SHOULD use the first instance it can use"). An
/// instance in an I/O BAR (QEMU's `modern-pio-notify`) is passed over
/// when a memory one exists.
pub fn parse<P: PciFunction + ?Sized>(f: &P) -> Result<VirtioCaps, CapError> {
    let Walk {
        caps: raw,
        msix,
        opaque,
    } = walk(f)?;
    let pick = |t: u8, min: u64| -> Result<Option<(CapRegion, RawCap)>, CapError> {
        let mut first_err = None;
        // Reserved BAR values (> 5) must be ignored (virtio 1.2 §4.1.4).
        for rc in raw.iter().filter(|c| c.cap.cfg_type == t && c.cap.bar <= 5) {
            match check_region(f, &rc.cap, min) {
                Ok(r) => return Ok(Some((r, *rc))),
                Err(e) => {
                    log::debug!("skipping {} capability at {:#x}: {e}", what(t), rc.pos);
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(None),
        }
    };
    let common = pick(cfg_type::COMMON, common::LEN)?
        .ok_or(CapError::Missing("common"))?
        .0;
    let (notify_region, notify_raw) =
        pick(cfg_type::NOTIFY, 2)?.ok_or(CapError::Missing("notify"))?;
    let isr = pick(cfg_type::ISR, 1)?.ok_or(CapError::Missing("ISR"))?.0;
    let device = pick(cfg_type::DEVICE, 0)?.map(|(r, _)| r);
    let pci_cfg = raw
        .iter()
        .find(|c| c.cap.cfg_type == cfg_type::PCI)
        .map(|c| c.pos);

    let multiplier = notify_raw.multiplier.unwrap_or(0);
    // virtio 1.2 §4.1.4.4: "an even power of 2, or 0" (0: one doorbell
    // shared by all queues). Per-queue addresses are range-checked later.
    if multiplier != 0 && !(multiplier.is_power_of_two() && multiplier >= 2) {
        return Err(CapError::InvalidNotifyOffMultiplier(multiplier));
    }

    let regions = [
        ("common", Some(common)),
        ("notify", Some(notify_region)),
        ("ISR", Some(isr)),
        ("device", device),
    ];
    for (i, (a, ra)) in regions.iter().enumerate() {
        for (b, rb) in regions.iter().skip(i + 1) {
            if let (Some(ra), Some(rb)) = (ra, rb) {
                if ra.bar == rb.bar
                    && ra.length > 0
                    && rb.length > 0
                    && ra.offset < rb.end()
                    && rb.offset < ra.end()
                {
                    return Err(CapError::Overlap { a, b, bar: ra.bar });
                }
            }
        }
    }

    Ok(VirtioCaps {
        common,
        notify: NotifyRegion {
            region: notify_region,
            multiplier,
        },
        isr,
        device,
        pci_cfg,
        msix,
        described: raw.iter().filter_map(named_range).collect(),
        opaque,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{ConfigBuilder, RawFunction};
    use crate::pci::BarKind;

    fn func(cfg: ConfigBuilder) -> RawFunction {
        RawFunction::new(&cfg.build()).with_bar(4, BarKind::Memory, 0x4000)
    }

    #[test]
    fn parses_qemu_layout() {
        let f = func(ConfigBuilder::qemu_like(0x1042));
        let caps = parse(&f).unwrap();
        assert_eq!(
            caps.common,
            CapRegion {
                bar: 4,
                offset: 0,
                length: 0x1000
            }
        );
        assert_eq!(caps.isr.offset, 0x1000);
        assert_eq!(caps.device.unwrap().offset, 0x2000);
        assert_eq!(caps.notify.region.offset, 0x3000);
        assert_eq!(caps.notify.multiplier, 4);
    }

    #[test]
    fn cap_past_bar_end_is_rejected() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0x3800, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x10)
            .notify_cap(4, 0x3000, 0x100, 4);
        let err = parse(&func(cfg)).unwrap_err();
        assert!(
            matches!(
                err,
                CapError::PastBar {
                    what: "common",
                    bar: 4,
                    offset: 0x3800,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn offset_plus_length_overflowing_u32_is_rejected_not_wrapped() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0xffff_f000, 0x2000)
            .virtio_cap(3, 4, 0x1000, 0x10)
            .notify_cap(4, 0x3000, 0x100, 4);
        assert!(matches!(
            parse(&func(cfg)).unwrap_err(),
            CapError::PastBar { .. }
        ));
    }

    #[test]
    fn overlapping_structures_are_rejected() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x800, 0x10)
            .notify_cap(4, 0x3000, 0x100, 4);
        assert!(matches!(
            parse(&func(cfg)).unwrap_err(),
            CapError::Overlap {
                a: "common",
                b: "ISR",
                bar: 4
            }
        ));
    }

    #[test]
    fn missing_notify_cap_is_reported() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x10);
        assert!(matches!(
            parse(&func(cfg)).unwrap_err(),
            CapError::Missing("notify")
        ));
    }

    #[test]
    fn io_port_only_bar_is_rejected() {
        let cfg = ConfigBuilder::qemu_like(0x1042);
        let f = RawFunction::new(&cfg.build()).with_bar(4, BarKind::Io, 0x4000);
        assert!(matches!(
            parse(&f).unwrap_err(),
            CapError::BarNotMemory { bar: 4, .. }
        ));
    }

    #[test]
    fn io_notify_cap_is_skipped_when_memory_one_follows() {
        // QEMU's modern-pio-notify: an extra notify cap in an I/O BAR first.
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x1000)
            .notify_cap(2, 0, 4, 0)
            .notify_cap(4, 0x3000, 0x1000, 4);
        let f = RawFunction::new(&cfg.build())
            .with_bar(2, BarKind::Io, 0x20)
            .with_bar(4, BarKind::Memory, 0x4000);
        let caps = parse(&f).unwrap();
        assert_eq!(caps.notify.region.bar, 4);
    }

    #[test]
    fn cap_naming_missing_bar_is_rejected() {
        let cfg = ConfigBuilder::qemu_like(0x1042);
        let f = RawFunction::new(&cfg.build()).with_bar(0, BarKind::Memory, 0x4000);
        assert!(matches!(
            parse(&f).unwrap_err(),
            CapError::NoSuchBar { bar: 4, .. }
        ));
    }

    #[test]
    fn reserved_bar_values_are_ignored() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 7, 0, 0x1000)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x10)
            .notify_cap(4, 0x3000, 0x100, 4);
        assert_eq!(parse(&func(cfg)).unwrap().common.bar, 4);
    }

    #[test]
    fn looping_capability_list_is_bounded() {
        let cfg = ConfigBuilder::qemu_like(0x1042);
        let last = cfg.next_pos() - 20;
        // Point the last cap back at the first.
        let cfg = cfg.poke(last + 1, 0x40);
        assert!(matches!(
            parse(&func(cfg)).unwrap_err(),
            CapError::TooManyCaps
        ));
    }

    #[test]
    fn pointer_into_header_is_rejected() {
        let cfg = ConfigBuilder::qemu_like(0x1042).poke(0x34, 0x10);
        assert!(matches!(
            parse(&func(cfg)).unwrap_err(),
            CapError::BadPointer(0x10)
        ));
    }

    #[test]
    fn short_virtio_cap_is_rejected() {
        let cfg = ConfigBuilder::qemu_like(0x1042).poke(0x42, 8);
        assert!(matches!(
            parse(&func(cfg)).unwrap_err(),
            CapError::ShortCap {
                pos: 0x40,
                len: 8,
                ..
            }
        ));
    }

    #[test]
    fn common_cfg_smaller_than_its_registers_is_rejected() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0, 0x20)
            .virtio_cap(3, 4, 0x1000, 0x10)
            .notify_cap(4, 0x3000, 0x100, 4);
        assert!(matches!(
            parse(&func(cfg)).unwrap_err(),
            CapError::TooSmall {
                what: "common",
                length: 0x20,
                min: 0x38
            }
        ));
    }

    #[test]
    fn odd_notify_multiplier_is_rejected() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x10)
            .notify_cap(4, 0x3000, 0x100, 3);
        assert!(matches!(
            parse(&func(cfg)).unwrap_err(),
            CapError::InvalidNotifyOffMultiplier(3)
        ));
    }

    #[test]
    fn zero_notify_multiplier_is_accepted() {
        let cfg = ConfigBuilder::virtio(0x1042)
            .virtio_cap(1, 4, 0, 0x1000)
            .virtio_cap(3, 4, 0x1000, 0x10)
            .notify_cap(4, 0x3000, 0x2, 0);
        assert_eq!(parse(&func(cfg)).unwrap().notify.multiplier, 0);
    }

    #[test]
    fn no_capability_list_is_reported() {
        let cfg = ConfigBuilder::virtio(0x1001).poke(6, 0);
        assert!(matches!(
            parse(&func(cfg)).unwrap_err(),
            CapError::NoCapabilityList
        ));
    }
}
