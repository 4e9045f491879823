//! PCI functions as sysfs shows them, for opening one through VFIO:
//! resolving a device argument to its canonical address, the bound driver,
//! the IOMMU group and its members. (Listing virtio functions and binding
//! them to vfio-pci are the CLI's, in `vdpa-bridge-cli`.)
//!
//! Every function takes the sysfs directory it works in, so tests run
//! against a fake tree (`fake::FakeSysfs`, feature `test-utils`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::device_path::parse_pci_address;

/// The driver name vfio-pci registers on the PCI bus.
pub const VFIO_PCI: &str = "vfio-pci";

/// Errors of resolving a device argument in sysfs.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// The argument is neither a PCI address nor a PCI device path.
    #[error(
        "`{0}` is not a PCI address (expected 0000:00:04.0, 00:04.0 or a /sys/bus/pci/devices path)"
    )]
    BadAddress(String),
    /// No such device (or path) in sysfs.
    #[error("no PCI device at {}", path.display())]
    NotFound {
        /// The path that does not exist.
        path: PathBuf,
    },
}

/// How a driver name reads in messages (`None` is "no driver").
pub fn driver_name(driver: &Option<String>) -> &str {
    driver.as_deref().unwrap_or("no driver")
}

/// Resolve `arg` against a devices directory (`/sys/bus/pci/devices`).
///
/// `arg` is a full address (`0000:00:04.0`), a short one (`00:04.0`) or a
/// path (anything with a `/`) whose canonical last component is an address,
/// such as `/sys/bus/pci/devices/0000:00:04.0`. Addresses are parsed by
/// [`parse_pci_address`], as everywhere else.
///
/// # Errors
///
/// [`SysfsError::BadAddress`] for an argument that is not an address,
/// [`SysfsError::NotFound`] when the path or `<devices>/<bdf>` is missing.
pub fn resolve_in(devices: &Path, arg: &str) -> Result<String, SysfsError> {
    let bdf = if arg.contains('/') {
        let path = Path::new(arg);
        let canon = fs::canonicalize(path).map_err(|_| SysfsError::NotFound {
            path: path.to_owned(),
        })?;
        canon
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_pci_address)
            .ok_or_else(|| SysfsError::BadAddress(arg.to_owned()))?
    } else {
        parse_pci_address(arg).ok_or_else(|| SysfsError::BadAddress(arg.to_owned()))?
    };
    let dev = devices.join(&bdf);
    if !dev.exists() {
        return Err(SysfsError::NotFound { path: dev });
    }
    Ok(bdf)
}

/// The driver bound to the device directory `dev` (last component of its
/// `driver` link).
pub fn driver_of(dev: &Path) -> Option<String> {
    link_name(&dev.join("driver"))
}

/// The IOMMU group of the device directory `dev` (last component of its
/// `iommu_group` link).
pub fn iommu_group_of(dev: &Path) -> Option<u32> {
    link_name(&dev.join("iommu_group"))?.parse().ok()
}

/// The other functions in the IOMMU group of the device directory `dev`
/// whose address is `bdf`.
///
/// # Errors
///
/// The group's member list cannot be read: whether the device is alone
/// in its group is then unknown, which is not the same as "alone".
pub fn iommu_group_peers(dev: &Path, bdf: &str) -> std::io::Result<Vec<String>> {
    let mut others = Vec::new();
    for e in fs::read_dir(dev.join("iommu_group/devices"))? {
        let n = e?.file_name().to_string_lossy().into_owned();
        if n != bdf {
            others.push(n);
        }
    }
    others.sort();
    Ok(others)
}

fn link_name(link: &Path) -> Option<String> {
    let target = fs::read_link(link).ok()?;
    target.file_name()?.to_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeSysfs;

    #[test]
    fn resolve_accepts_the_three_address_forms() {
        let fs = FakeSysfs::new("resolve");
        fs.add_device("0000:00:04.0", (0x1af4, 0x1042, 2), &[], None, Some(4));
        let sysfs_path = fs.devices().join("0000:00:04.0");

        assert_eq!(
            resolve_in(&fs.devices(), "0000:00:04.0").unwrap(),
            "0000:00:04.0"
        );
        assert_eq!(
            resolve_in(&fs.devices(), "00:04.0").unwrap(),
            "0000:00:04.0"
        );
        assert_eq!(
            resolve_in(&fs.devices(), sysfs_path.to_str().unwrap()).unwrap(),
            "0000:00:04.0"
        );
    }

    #[test]
    fn resolve_reports_missing_device_and_bad_path() {
        let fs = FakeSysfs::new("resolve-missing");

        let missing = resolve_in(&fs.devices(), "0000:00:05.0").unwrap_err();
        let bad_path = resolve_in(&fs.devices(), fs.bus().to_str().unwrap()).unwrap_err();
        let gone = resolve_in(&fs.devices(), "/nonexistent/0000:00:04.0").unwrap_err();

        assert!(matches!(missing, SysfsError::NotFound { .. }), "{missing}");
        assert!(matches!(bad_path, SysfsError::BadAddress(_)), "{bad_path}");
        assert!(matches!(gone, SysfsError::NotFound { .. }), "{gone}");
    }

    #[test]
    fn driver_group_and_group_peers_come_from_the_links() {
        let fs = FakeSysfs::new("links");
        let dev = fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some(VFIO_PCI),
            Some(7),
        );
        fs.add_device("0000:00:04.1", (0x1af4, 0x1042, 2), &[], None, Some(7));
        let alone = fs.add_device("0000:00:05.0", (0x1af4, 0x1041, 1), &[], None, None);

        assert_eq!(driver_of(&dev).as_deref(), Some(VFIO_PCI));
        assert_eq!(iommu_group_of(&dev), Some(7));
        assert_eq!(
            iommu_group_peers(&dev, "0000:00:04.0").unwrap(),
            vec!["0000:00:04.1"]
        );
        assert_eq!(driver_of(&alone), None);
        assert_eq!(iommu_group_of(&alone), None);
        assert!(iommu_group_peers(&alone, "0000:00:05.0").is_err());
    }
}
