//! PCI functions for `vdpa-bridge list` and `vdpa-bridge bind`: the virtio
//! functions sysfs shows, and the driverctl-style rebinding to vfio-pci.
//!
//! Every path derives from one root ([`SysfsPci`], `/sys/bus/pci` on a real
//! system), so the tests run against a fake tree in a temporary directory.
//! Resolving an argument, the bound driver and the IOMMU group come from
//! the library (`vdpa_bridge::sysfs`), which opening a device needs too.
//!
//! Reading a function's `config` file past its first 64 bytes needs root;
//! without it [`PciFunctionInfo::modern`] falls back to the device id alone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use vdpa_bridge::pci::{cfg, ConfigImage};
use vdpa_bridge::sysfs::{driver_name, driver_of, iommu_group_of, resolve_in, VFIO_PCI};
use vdpa_bridge::types::DeviceType;
use vdpa_bridge::virtio_pci::caps::has_virtio_cap;
use vdpa_bridge::virtio_pci::regs::cfg_type;

/// How long [`SysfsPci::bind_vfio`] waits for the probe to attach vfio-pci.
const BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of listing and binding.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// The argument does not name a PCI function in sysfs.
    #[error(transparent)]
    Resolve(#[from] vdpa_bridge::sysfs::SysfsError),
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
    /// See [`vdpa_bridge::sysfs::resolve_in`].
    pub fn resolve(&self, arg: &str) -> Result<String, SysfsError> {
        Ok(resolve_in(&self.devices(), arg)?)
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
            return Err(vdpa_bridge::sysfs::SysfsError::NotFound { path: dev }.into());
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

/// Bind a device to vfio-pci under the bus directory `root`.
///
/// # Errors
///
/// See [`SysfsPci::bind_vfio`].
pub fn bind_vfio(root: &Path, bdf: &str) -> Result<(), SysfsError> {
    SysfsPci::new(root).bind_vfio(bdf)
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
/// capability: the library's capability walker over the image; a list
/// that leaves the image (a non-root reader sees only 64 bytes) or is
/// malformed says no.
pub fn has_common_cfg(config: &[u8]) -> bool {
    has_virtio_cap(&ConfigImage(config), cfg_type::COMMON).unwrap_or(false)
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

#[cfg(test)]
mod tests {
    use super::*;
    use vdpa_bridge::fake::{config_with_vendor_caps, FakeSysfs};

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
        // What QEMU's balloon, crypto and 9p devices are (modern, modern,
        // transitional).
        assert_eq!(
            virtio_type(0x1045, 0).map(DeviceType::name),
            Some("balloon")
        );
        assert_eq!(virtio_type(0x1054, 0).map(DeviceType::name), Some("crypto"));
        assert_eq!(virtio_type(0x1009, 9).map(DeviceType::name), Some("9p"));
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
