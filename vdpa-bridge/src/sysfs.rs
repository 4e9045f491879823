//! PCI functions as sysfs shows them: address resolution, the virtio
//! function list of `vdpa-bridge list`, and the driverctl-style rebinding to
//! vfio-pci of `vdpa-bridge bind`.
//!
//! Every path derives from one root ([`SysfsPci`], `/sys/bus/pci` on a real
//! system), so the tests run against a fake tree in a temporary directory.
//!
//! Reading a function's `config` file past its first 64 bytes needs root;
//! without it [`PciFunctionInfo::modern`] falls back to the device id alone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::pci::cfg;
use crate::types::DeviceType;

/// The driver name vfio-pci registers on the PCI bus.
pub const VFIO_PCI: &str = "vfio-pci";

/// How long [`SysfsPci::bind_vfio`] waits for the probe to attach vfio-pci.
const BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Capability walk bound (a config space of 256 bytes holds at most 48
/// capabilities after the header).
const MAX_CAPS: usize = 48;

/// Virtio PCI capability `cfg_type` of the common configuration structure.
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;

/// Errors of sysfs resolution and binding.
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
    /// The vfio-pci driver is not registered.
    #[error("vfio-pci driver not found; load the vfio-pci module first (modprobe vfio-pci)")]
    VfioPciNotLoaded,
    /// The device did not end up bound to vfio-pci.
    #[error("device {bdf} is bound to {}, not vfio-pci, after probing", driver_name(.driver))]
    BindFailed {
        /// PCI address.
        bdf: String,
        /// The driver bound after the probe.
        driver: Option<String>,
    },
    /// Reading or writing a sysfs file failed.
    #[error("cannot access {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How a driver name reads in messages (`None` is "no driver").
pub(crate) fn driver_name(driver: &Option<String>) -> &str {
    driver.as_deref().unwrap_or("no driver")
}

/// One PCI function of vendor 0x1af4 (virtio), as `vdpa-bridge list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PciFunctionInfo {
    /// PCI address, `dddd:bb:dd.f`.
    pub address: String,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Subsystem device id.
    pub subsystem_device: u16,
    /// Virtio device type: device id 0x1040 + N (modern) or, for a
    /// transitional id 0x1000..=0x103f, the subsystem device id.
    pub virtio_type: Option<DeviceType>,
    /// Whether the function offers the modern (virtio 1.x) interface: a
    /// modern-only device id, or a virtio common-config capability.
    pub modern: bool,
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// The IOMMU group, if the function is behind an IOMMU.
    pub iommu_group: Option<u32>,
}

/// The PCI bus directory of sysfs (`/sys/bus/pci` by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysfsPci {
    root: PathBuf,
}

impl Default for SysfsPci {
    fn default() -> Self {
        Self::new("/sys/bus/pci")
    }
}

impl SysfsPci {
    /// A bus directory at `root` (a fake tree in tests).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The bus directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/devices`.
    pub fn devices(&self) -> PathBuf {
        self.root.join("devices")
    }

    /// `<root>/drivers`.
    pub fn drivers(&self) -> PathBuf {
        self.root.join("drivers")
    }

    /// `<root>/drivers_probe`.
    pub fn drivers_probe(&self) -> PathBuf {
        self.root.join("drivers_probe")
    }

    /// The device directory of `bdf`.
    pub fn device(&self, bdf: &str) -> PathBuf {
        self.devices().join(bdf)
    }

    /// Resolve a user's device argument to a canonical `dddd:bb:dd.f`.
    ///
    /// # Errors
    ///
    /// See [`resolve_in`].
    pub fn resolve(&self, arg: &str) -> Result<String, SysfsError> {
        resolve_in(&self.devices(), arg)
    }

    /// Every vendor-0x1af4 function, sorted by address.
    ///
    /// # Errors
    ///
    /// Fails when the devices directory cannot be read; an unreadable
    /// function is skipped with a warning.
    pub fn list_virtio(&self) -> io::Result<Vec<PciFunctionInfo>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.devices())? {
            let entry = entry?;
            let Some(bdf) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            match function_info(&entry.path(), &bdf) {
                Ok(Some(info)) => out.push(info),
                Ok(None) => {}
                Err(e) => log::warn!("skipping PCI function {bdf}: {e}"),
            }
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }

    /// Bind `bdf` to vfio-pci the way driverctl does: set `driver_override`,
    /// unbind from the current driver, ask the bus to probe, then check that
    /// vfio-pci took the device. Already bound to vfio-pci is success.
    ///
    /// # Errors
    ///
    /// [`SysfsError::VfioPciNotLoaded`] when the driver is not registered,
    /// [`SysfsError::BindFailed`] when another (or no) driver holds the
    /// device after probing, [`SysfsError::Io`] for a failed sysfs write.
    pub fn bind_vfio(&self, bdf: &str) -> Result<(), SysfsError> {
        self.bind_vfio_within(bdf, BIND_TIMEOUT)
    }

    fn bind_vfio_within(&self, bdf: &str, timeout: Duration) -> Result<(), SysfsError> {
        if !self.request_vfio(bdf)? {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let driver = driver_of(&self.device(bdf));
            if driver.as_deref() == Some(VFIO_PCI) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SysfsError::BindFailed {
                    bdf: bdf.to_owned(),
                    driver,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The writes of [`SysfsPci::bind_vfio`], in order, without the final
    /// check. Returns `false` (and writes nothing) when `bdf` is already
    /// bound to vfio-pci.
    ///
    /// # Errors
    ///
    /// As [`SysfsPci::bind_vfio`], except [`SysfsError::BindFailed`].
    pub fn request_vfio(&self, bdf: &str) -> Result<bool, SysfsError> {
        let dev = self.device(bdf);
        if !dev.exists() {
            return Err(SysfsError::NotFound { path: dev });
        }
        if !self.drivers().join(VFIO_PCI).is_dir() {
            return Err(SysfsError::VfioPciNotLoaded);
        }
        let current = driver_of(&dev);
        if current.as_deref() == Some(VFIO_PCI) {
            return Ok(false);
        }
        for (path, value) in self.bind_plan(bdf, current.is_some()) {
            write_existing(&path, &value)?;
        }
        Ok(true)
    }

    /// The sysfs writes that move `bdf` to vfio-pci, in order.
    fn bind_plan(&self, bdf: &str, bound: bool) -> Vec<(PathBuf, String)> {
        let dev = self.device(bdf);
        let mut plan = vec![(dev.join("driver_override"), VFIO_PCI.to_owned())];
        if bound {
            plan.push((dev.join("driver").join("unbind"), bdf.to_owned()));
        }
        plan.push((self.drivers_probe(), bdf.to_owned()));
        plan
    }
}

/// Every vendor-0x1af4 function under the bus directory `root`
/// (`/sys/bus/pci`), sorted by address.
///
/// # Errors
///
/// See [`SysfsPci::list_virtio`].
pub fn list_virtio(root: &Path) -> io::Result<Vec<PciFunctionInfo>> {
    SysfsPci::new(root).list_virtio()
}

/// Resolve a device argument against the bus directory `root`.
///
/// # Errors
///
/// See [`resolve_in`].
pub fn resolve(root: &Path, arg: &str) -> Result<String, SysfsError> {
    SysfsPci::new(root).resolve(arg)
}

/// Bind a device to vfio-pci under the bus directory `root`.
///
/// # Errors
///
/// See [`SysfsPci::bind_vfio`].
pub fn bind_vfio(root: &Path, bdf: &str) -> Result<(), SysfsError> {
    SysfsPci::new(root).bind_vfio(bdf)
}

/// Parse a PCI address: `dddd:bb:dd.f` or `bb:dd.f` (domain 0000), hex,
/// any case. Returns the canonical lowercase `dddd:bb:dd.f`.
pub fn parse_bdf(s: &str) -> Option<String> {
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

/// Resolve `arg` against a devices directory (`/sys/bus/pci/devices`).
///
/// `arg` is a full address (`0000:00:04.0`), a short one (`00:04.0`) or a
/// path (anything with a `/`) whose canonical last component is an address,
/// such as `/sys/bus/pci/devices/0000:00:04.0`.
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
            .and_then(parse_bdf)
            .ok_or_else(|| SysfsError::BadAddress(arg.to_owned()))?
    } else {
        parse_bdf(arg).ok_or_else(|| SysfsError::BadAddress(arg.to_owned()))?
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

fn link_name(link: &Path) -> Option<String> {
    let target = fs::read_link(link).ok()?;
    target.file_name()?.to_str().map(str::to_owned)
}

/// Write `value` to an existing sysfs attribute (never creates a file: a
/// missing attribute is an error, as it is in sysfs).
fn write_existing(path: &Path, value: &str) -> Result<(), SysfsError> {
    use std::io::Write;
    let io_err = |source| SysfsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err)?;
    f.write_all(value.as_bytes()).map_err(io_err)
}

/// Read a sysfs id attribute such as `vendor` (`0x1af4\n`).
fn read_id(dev: &Path, name: &str) -> io::Result<u16> {
    let path = dev.join(name);
    let text = fs::read_to_string(&path)?;
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u16::from_str_radix(digits, 16).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: `{t}` is not a 16-bit hex id", path.display()),
        )
    })
}

/// Virtio device type from PCI ids (virtio 1.2 §4.1.2.1).
pub fn virtio_type(device: u16, subsystem_device: u16) -> Option<DeviceType> {
    match device {
        0x1040..=0x107f => Some(DeviceType::from_id(u32::from(device - 0x1040))),
        0x1000..=0x103f => Some(DeviceType::from_id(u32::from(subsystem_device))),
        _ => None,
    }
}

/// Whether a config-space image holds a virtio common-config vendor
/// capability. The walk is bounded and stops at any pointer that leaves
/// `config` (a non-root reader sees only 64 bytes).
pub fn has_common_cfg(config: &[u8]) -> bool {
    let byte = |off: usize| config.get(off).copied();
    let status = match (byte(cfg::STATUS as usize), byte(cfg::STATUS as usize + 1)) {
        (Some(lo), Some(hi)) => u16::from_le_bytes([lo, hi]),
        _ => return false,
    };
    if status & cfg::STATUS_CAP_LIST == 0 {
        return false;
    }
    let Some(mut ptr) = byte(cfg::CAPABILITIES_POINTER as usize) else {
        return false;
    };
    for _ in 0..MAX_CAPS {
        let p = usize::from(ptr & 0xfc);
        if p < 0x40 {
            return false;
        }
        let (Some(id), Some(next), Some(cfg_type)) = (byte(p), byte(p + 1), byte(p + 3)) else {
            return false;
        };
        if id == cfg::CAP_ID_VENDOR && cfg_type == VIRTIO_PCI_CAP_COMMON_CFG {
            return true;
        }
        ptr = next;
    }
    false
}

/// Info of one function, or `None` when its vendor is not virtio's.
fn function_info(dev: &Path, bdf: &str) -> io::Result<Option<PciFunctionInfo>> {
    let vendor = read_id(dev, "vendor")?;
    if vendor != cfg::VIRTIO_VENDOR_ID {
        return Ok(None);
    }
    let device = read_id(dev, "device")?;
    let subsystem_device = read_id(dev, "subsystem_device").unwrap_or(0);
    let config = fs::read(dev.join("config")).unwrap_or_default();
    Ok(Some(PciFunctionInfo {
        address: bdf.to_owned(),
        vendor,
        device,
        subsystem_device,
        virtio_type: virtio_type(device, subsystem_device),
        modern: device >= 0x1040 || has_common_cfg(&config),
        driver: driver_of(dev),
        iommu_group: iommu_group_of(dev),
    }))
}

/// A fake `/sys/bus/pci` in a unique temporary directory, removed on drop.
#[cfg(test)]
pub(crate) mod fake {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake sysfs PCI bus tree.
    pub(crate) struct FakeSysfs {
        pub(crate) base: PathBuf,
    }

    impl FakeSysfs {
        pub(crate) fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let base = std::env::temp_dir().join(format!(
                "vdpa-bridge-sysfs-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&base);
            fs::create_dir_all(base.join("bus/pci/devices")).unwrap();
            fs::create_dir_all(base.join("bus/pci/drivers")).unwrap();
            fs::create_dir_all(base.join("devices/pci0000:00")).unwrap();
            fs::create_dir_all(base.join("kernel/iommu_groups")).unwrap();
            fs::write(base.join("bus/pci/drivers_probe"), "").unwrap();
            Self { base }
        }

        /// The bus directory (`/sys/bus/pci`).
        pub(crate) fn bus(&self) -> PathBuf {
            self.base.join("bus/pci")
        }

        /// The devices directory (`/sys/bus/pci/devices`).
        pub(crate) fn devices(&self) -> PathBuf {
            self.bus().join("devices")
        }

        /// Register a driver directory with `bind`/`unbind` files.
        pub(crate) fn add_driver(&self, name: &str) {
            let d = self.bus().join("drivers").join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("bind"), "").unwrap();
            fs::write(d.join("unbind"), "").unwrap();
        }

        /// Add a device: real directory under `devices/pci0000:00`, linked
        /// from `bus/pci/devices`, as sysfs does.
        pub(crate) fn add_device(
            &self,
            bdf: &str,
            ids: (u16, u16, u16),
            config: &[u8],
            driver: Option<&str>,
            group: Option<u32>,
        ) -> PathBuf {
            let real = self.base.join("devices/pci0000:00").join(bdf);
            fs::create_dir_all(&real).unwrap();
            fs::write(real.join("vendor"), format!("0x{:04x}\n", ids.0)).unwrap();
            fs::write(real.join("device"), format!("0x{:04x}\n", ids.1)).unwrap();
            fs::write(real.join("subsystem_device"), format!("0x{:04x}\n", ids.2)).unwrap();
            fs::write(real.join("config"), config).unwrap();
            fs::write(real.join("driver_override"), "(null)\n").unwrap();
            if let Some(d) = driver {
                self.set_driver(&real, d);
            }
            if let Some(g) = group {
                let gdir = self.base.join("kernel/iommu_groups").join(g.to_string());
                fs::create_dir_all(gdir.join("devices")).unwrap();
                symlink(&real, gdir.join("devices").join(bdf)).unwrap();
                symlink(&gdir, real.join("iommu_group")).unwrap();
            }
            symlink(&real, self.devices().join(bdf)).unwrap();
            real
        }

        /// Point `dev/driver` at driver `name`.
        pub(crate) fn set_driver(&self, dev: &Path, name: &str) {
            self.add_driver(name);
            let link = dev.join("driver");
            let _ = fs::remove_file(&link);
            symlink(self.bus().join("drivers").join(name), link).unwrap();
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.base);
        }
    }

    /// A config space with the given vendor capabilities (`cfg_type`s),
    /// chained from 0x40.
    pub(crate) fn config_with_vendor_caps(len: usize, cfg_types: &[u8]) -> Vec<u8> {
        let mut c = vec![0u8; len];
        c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        if cfg_types.is_empty() {
            return c;
        }
        c[6] = 0x10; // status: capability list
        c[0x34] = 0x40;
        for (i, t) in cfg_types.iter().enumerate() {
            let p = 0x40 + i * 0x10;
            c[p] = 0x09;
            c[p + 1] = if i + 1 < cfg_types.len() {
                (p + 0x10) as u8
            } else {
                0
            };
            c[p + 2] = 0x10;
            c[p + 3] = *t;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{config_with_vendor_caps, FakeSysfs};
    use super::*;

    #[test]
    fn parse_bdf_accepts_full_short_and_uppercase_forms() {
        assert_eq!(parse_bdf("0000:00:04.0").as_deref(), Some("0000:00:04.0"));
        assert_eq!(parse_bdf("00:04.0").as_deref(), Some("0000:00:04.0"));
        assert_eq!(parse_bdf("0000:0A:1F.7").as_deref(), Some("0000:0a:1f.7"));
        assert_eq!(parse_bdf("10000:00:00.0").as_deref(), Some("10000:00:00.0"));
    }

    #[test]
    fn parse_bdf_rejects_malformed_addresses() {
        for bad in [
            "",
            "04.0",
            "0000:00:04",
            "0000:00:20.0",
            "0000:00:04.8",
            "0000:000:04.0",
            "zz:04.0",
            "0000:00:04.0:1",
            "0000:00:+4.0",
        ] {
            assert_eq!(parse_bdf(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolve_accepts_the_three_address_forms() {
        let fs = FakeSysfs::new("resolve");
        fs.add_device("0000:00:04.0", (0x1af4, 0x1042, 2), &[], None, Some(4));
        let s = SysfsPci::new(fs.bus());
        let sysfs_path = fs.devices().join("0000:00:04.0");

        assert_eq!(s.resolve("0000:00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(s.resolve("00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(
            s.resolve(sysfs_path.to_str().unwrap()).unwrap(),
            "0000:00:04.0"
        );
    }

    #[test]
    fn resolve_reports_missing_device_and_bad_path() {
        let fs = FakeSysfs::new("resolve-missing");
        let s = SysfsPci::new(fs.bus());

        let missing = s.resolve("0000:00:05.0").unwrap_err();
        let bad_path = s.resolve(fs.bus().to_str().unwrap()).unwrap_err();
        let gone = s.resolve("/nonexistent/0000:00:04.0").unwrap_err();

        assert!(matches!(missing, SysfsError::NotFound { .. }), "{missing}");
        assert!(matches!(bad_path, SysfsError::BadAddress(_)), "{bad_path}");
        assert!(matches!(gone, SysfsError::NotFound { .. }), "{gone}");
    }

    #[test]
    fn list_virtio_parses_modern_transitional_and_filters_other_vendors() {
        let fs = FakeSysfs::new("list");
        let modern_only = config_with_vendor_caps(256, &[1, 3, 4, 2, 5]);
        let legacy_only = config_with_vendor_caps(256, &[]);
        fs.add_device(
            "0000:00:05.0",
            (0x1af4, 0x1000, 1),
            &legacy_only,
            Some("virtio-pci"),
            Some(5),
        );
        fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 0x1100),
            &modern_only,
            Some("vfio-pci"),
            Some(4),
        );
        fs.add_device(
            "0000:00:02.0",
            (0x8086, 0x10d3, 0),
            &[],
            Some("e1000e"),
            None,
        );

        let list = list_virtio(&fs.bus()).unwrap();

        assert_eq!(
            list,
            vec![
                PciFunctionInfo {
                    address: "0000:00:04.0".into(),
                    vendor: 0x1af4,
                    device: 0x1042,
                    subsystem_device: 0x1100,
                    virtio_type: Some(DeviceType::Block),
                    modern: true,
                    driver: Some("vfio-pci".into()),
                    iommu_group: Some(4),
                },
                PciFunctionInfo {
                    address: "0000:00:05.0".into(),
                    vendor: 0x1af4,
                    device: 0x1000,
                    subsystem_device: 1,
                    virtio_type: Some(DeviceType::Net),
                    modern: false,
                    driver: Some("virtio-pci".into()),
                    iommu_group: Some(5),
                },
            ]
        );
    }

    #[test]
    fn transitional_device_with_common_cfg_cap_is_modern() {
        let config = config_with_vendor_caps(256, &[3, 1]);

        assert!(has_common_cfg(&config));
    }

    #[test]
    fn capability_walk_stops_on_loops_and_truncation() {
        let mut looped = config_with_vendor_caps(256, &[3]);
        looped[0x41] = 0x40;
        let truncated = &config_with_vendor_caps(256, &[1])[..64];

        assert!(!has_common_cfg(&looped));
        assert!(!has_common_cfg(truncated));
        assert!(!has_common_cfg(&[]));
    }

    #[test]
    fn virtio_type_maps_modern_and_transitional_ids() {
        assert_eq!(virtio_type(0x1041, 0), Some(DeviceType::Net));
        assert_eq!(virtio_type(0x1001, 2), Some(DeviceType::Block));
        assert_eq!(virtio_type(0x105a, 0), Some(DeviceType::Fs));
        assert_eq!(virtio_type(0x10d3, 0), None);
    }

    #[test]
    fn request_vfio_writes_override_unbind_and_probe() {
        let fs = FakeSysfs::new("bind");
        fs.add_driver(VFIO_PCI);
        let dev = fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some("virtio-pci"),
            Some(4),
        );
        let s = SysfsPci::new(fs.bus());
        let link = fs.devices().join("0000:00:04.0");

        let plan = s.bind_plan("0000:00:04.0", true);
        let wrote = s.request_vfio("0000:00:04.0").unwrap();

        assert!(wrote);
        assert_eq!(
            plan,
            vec![
                (link.join("driver_override"), "vfio-pci".to_owned()),
                (link.join("driver/unbind"), "0000:00:04.0".to_owned()),
                (fs.bus().join("drivers_probe"), "0000:00:04.0".to_owned()),
            ]
        );
        assert_eq!(
            fs::read_to_string(dev.join("driver_override")).unwrap(),
            "vfio-pci"
        );
        assert_eq!(
            fs::read_to_string(fs.bus().join("drivers/virtio-pci/unbind")).unwrap(),
            "0000:00:04.0"
        );
        assert_eq!(
            fs::read_to_string(fs.bus().join("drivers_probe")).unwrap(),
            "0000:00:04.0"
        );
    }

    #[test]
    fn bind_plan_skips_unbind_for_an_unbound_device() {
        let s = SysfsPci::new("/sys/bus/pci");

        let plan = s.bind_plan("0000:00:04.0", false);

        assert_eq!(
            plan.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
            vec![
                PathBuf::from("/sys/bus/pci/devices/0000:00:04.0/driver_override"),
                PathBuf::from("/sys/bus/pci/drivers_probe"),
            ]
        );
    }

    #[test]
    fn bind_vfio_reports_driver_that_kept_the_device() {
        let fs = FakeSysfs::new("bind-fail");
        fs.add_driver(VFIO_PCI);
        fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some("virtio-pci"),
            Some(4),
        );
        let s = SysfsPci::new(fs.bus());

        let err = s
            .bind_vfio_within("0000:00:04.0", Duration::ZERO)
            .unwrap_err();

        assert!(
            matches!(&err, SysfsError::BindFailed { driver: Some(d), .. } if d == "virtio-pci"),
            "{err}"
        );
    }

    #[test]
    fn bind_vfio_is_a_no_op_when_already_bound() {
        let fs = FakeSysfs::new("bind-noop");
        let dev = fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some(VFIO_PCI),
            Some(4),
        );
        let s = SysfsPci::new(fs.bus());

        s.bind_vfio("0000:00:04.0").unwrap();

        assert_eq!(
            fs::read_to_string(dev.join("driver_override")).unwrap(),
            "(null)\n"
        );
    }

    #[test]
    fn bind_vfio_succeeds_once_the_probe_attached_vfio_pci() {
        let fs = FakeSysfs::new("bind-ok");
        fs.add_driver(VFIO_PCI);
        let dev = fs.add_device("0000:00:04.0", (0x1af4, 0x1042, 2), &[], None, Some(4));
        let s = SysfsPci::new(fs.bus());
        s.request_vfio("0000:00:04.0").unwrap();
        fs.set_driver(&dev, VFIO_PCI);

        let r = s.bind_vfio_within("0000:00:04.0", Duration::ZERO);

        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn bind_vfio_without_vfio_pci_module_says_to_load_it() {
        let fs = FakeSysfs::new("bind-nomod");
        fs.add_device(
            "0000:00:04.0",
            (0x1af4, 0x1042, 2),
            &[],
            Some("virtio-pci"),
            Some(4),
        );

        let err = bind_vfio(&fs.bus(), "0000:00:04.0").unwrap_err();

        assert!(matches!(err, SysfsError::VfioPciNotLoaded));
        assert!(err.to_string().contains("modprobe vfio-pci"));
    }
}
