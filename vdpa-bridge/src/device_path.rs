//! What a device argument names: the one parser of PCI addresses, sysfs
//! device paths and vhost-vdpa nodes, used by the backends, the VMM's
//! `--vdpa path=` and the CLI alike.
//!
//! [`DevicePath::parse`] looks only at the text (the last component of a
//! path), so a VMM can classify a path before any device exists; opening a
//! PCI function then resolves it in sysfs ([`crate::sysfs::resolve_in`]), which
//! follows symlinks and checks that the function is there.

use std::path::Path;

/// What a device path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevicePath {
    /// A PCI function, by its canonical address (`0000:00:04.0`): given as
    /// an address (`0000:00:04.0`, `00:04.0`) or a sysfs device path
    /// (`/sys/bus/pci/devices/0000:00:04.0`).
    Pci(String),
    /// A kernel vDPA device's vhost-vdpa node (`/dev/vhost-vdpa-N`), as
    /// given.
    VhostVdpa(String),
}

/// Why a device path names nothing we can open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is neither a PCI address (0000:00:04.0, 00:04.0) or sysfs device path nor a /dev/vhost-vdpa-N node"
)]
pub struct BadDevicePath(pub String);

impl DevicePath {
    /// Classify `path` by its text (the last path component).
    ///
    /// # Errors
    ///
    /// [`BadDevicePath`] for anything else.
    pub fn parse(path: &str) -> Result<DevicePath, BadDevicePath> {
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(path);
        if is_vhost_vdpa_name(name) {
            return Ok(DevicePath::VhostVdpa(path.to_owned()));
        }
        match parse_pci_address(name) {
            Some(bdf) => Ok(DevicePath::Pci(bdf)),
            None => Err(BadDevicePath(path.to_owned())),
        }
    }
}

/// Whether `path` names a vhost-vdpa node (by its last component:
/// `vhost-vdpa-N`).
pub fn is_vhost_vdpa_path(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(is_vhost_vdpa_name)
}

fn is_vhost_vdpa_name(name: &str) -> bool {
    name.strip_prefix("vhost-vdpa-").is_some_and(|n| {
        !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) && n.parse::<u32>().is_ok()
    })
}

/// Parse a PCI address: `dddd:bb:dd.f` or `bb:dd.f` (domain 0000), hex,
/// any case; the domain has up to 8 digits (Linux prints at least 4; VMD
/// and Hyper-V domains have more). Returns the canonical lowercase form
/// sysfs uses (`{domain:04x}:{bus:02x}:{dev:02x}.{fn}`), or `None`.
pub fn parse_pci_address(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [d, b, df] => (*d, *b, *df),
        [b, df] => ("0000", *b, *df),
        _ => return None,
    };
    let (dev, func) = devfn.split_once('.')?;
    let hex = |t: &str, max_len: usize| -> Option<u32> {
        if t.is_empty() || t.len() > max_len || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(t, 16).ok()
    };
    let domain = hex(domain, 8)?;
    let bus = hex(bus, 2)?;
    let dev = hex(dev, 2).filter(|d| *d < 32)?;
    let func = hex(func, 1).filter(|f| *f < 8)?;
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_canonical_in_full_short_and_uppercase_forms() {
        assert_eq!(
            parse_pci_address("0000:00:04.0").as_deref(),
            Some("0000:00:04.0")
        );
        assert_eq!(
            parse_pci_address("00:04.0").as_deref(),
            Some("0000:00:04.0")
        );
        assert_eq!(
            parse_pci_address("0000:0A:1F.7").as_deref(),
            Some("0000:0a:1f.7")
        );
        assert_eq!(
            parse_pci_address("10000:00:00.0").as_deref(),
            Some("10000:00:00.0")
        );
    }

    #[test]
    fn malformed_pci_addresses_are_refused() {
        for bad in [
            "",
            "04.0",
            "0000:00:04",
            "0000:00:20.0",
            "0000:00:04.8",
            "0000:000:04.0",
            "zz:04.0",
            "x0:00:04.0",
            "0000:00:04.0:1",
            "1:2:3:4",
            "0000:00:+4.0",
            "123456789:00:04.0",
        ] {
            assert_eq!(parse_pci_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_are_classified_by_their_last_component() {
        assert_eq!(
            DevicePath::parse("/sys/bus/pci/devices/0000:00:05.0"),
            Ok(DevicePath::Pci("0000:00:05.0".into()))
        );
        assert_eq!(
            DevicePath::parse("00:05.0"),
            Ok(DevicePath::Pci("0000:00:05.0".into()))
        );
        assert_eq!(
            DevicePath::parse("/dev/vhost-vdpa-3"),
            Ok(DevicePath::VhostVdpa("/dev/vhost-vdpa-3".into()))
        );
        for bad in [
            "/dev/sda",
            "/dev/vhost-vdpa-x",
            "/dev/vhost-vdpa-",
            "vhost-net",
        ] {
            assert_eq!(DevicePath::parse(bad), Err(BadDevicePath(bad.into())));
        }
    }

    #[test]
    fn vhost_vdpa_nodes_are_recognised_by_name() {
        assert!(is_vhost_vdpa_path(Path::new("/dev/vhost-vdpa-0")));
        assert!(is_vhost_vdpa_path(Path::new("/dev/vhost-vdpa-12")));
        assert!(!is_vhost_vdpa_path(Path::new("/dev/vhost-net")));
        assert!(!is_vhost_vdpa_path(Path::new("/dev/vhost-vdpa-")));
        assert!(!is_vhost_vdpa_path(Path::new("/dev/vhost-vdpa-x")));
        assert!(!is_vhost_vdpa_path(Path::new("/dev/vhost-vdpa-+1")));
    }
}
