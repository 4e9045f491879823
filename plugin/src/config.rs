//! What the VMM passes for a bridged device (`--vdpa path=...,...`).

use std::os::fd::RawFd;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use vdpa_bridge::backend::{AnyDevice, Handed};
pub use vdpa_bridge::device_path::DevicePath;
use vdpa_bridge::host::dup_raw;
use vdpa_bridge::types::parse_u64;
pub use vdpa_bridge::vfio::SharedContainer;
use vdpa_bridge::vp_vdpa::OpenOptions;

use crate::Error;
use crate::{DeviceOptions, KickPolicy, ShadowPolicy};

/// A bridged device's configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VdpaDeviceConfig {
    /// A PCI address (`0000:00:04.0`, `00:04.0`), a sysfs device path, or a
    /// `/dev/vhost-vdpa-N` node.
    pub path: String,
    /// Expose at most this many queues.
    #[serde(default)]
    pub num_queues: Option<u16>,
    /// Feature bits the device may offer (provisioning, like `vdpa dev add
    /// ... device_features`). VERSION_1 and ACCESS_PLATFORM stay.
    #[serde(default)]
    pub features_mask: Option<u64>,
    /// Kick path.
    #[serde(default)]
    pub kick: KickPolicy,
    /// A vIOMMU is in front of the device.
    #[serde(default)]
    pub iommu: bool,
    /// `shadow=on`: shadow rings from every activation (see
    /// [`ShadowPolicy::Always`]); default `auto`.
    #[serde(default)]
    pub shadow: ShadowPolicy,
    /// The VM's VFIO container for bridged PCI functions not behind a
    /// vIOMMU (the VMM creates one per VM and hands each such device a
    /// clone): guest RAM is then mapped and pinned once for all of them.
    /// `None`, or a vIOMMU in front of the device: a container of its own.
    /// Not part of the serialized configuration.
    #[serde(skip)]
    pub container: Option<SharedContainer>,
    /// `group_fd=`: the PCI function's VFIO group (`/dev/vfio/N`), opened
    /// by whoever started the VMM and inherited by it, not attached to a
    /// container; `path` is then the function's PCI address. Nothing is
    /// opened under `/dev/vfio/N` nor read in sysfs. The descriptor is
    /// duplicated on each open and stays open (a reboot reopens the
    /// device from it). Not serialized: descriptors mean nothing to
    /// another process.
    #[serde(skip)]
    pub group_fd: Option<RawFd>,
    /// `container_fd=`: an open `/dev/vfio/vfio` with no group yet, for
    /// the device's container (with `group_fd=` only). For a device of the
    /// VM's shared container it is not used here: the VMM adopts the VM's
    /// container from the first one its devices name
    /// ([`open_container_from`]), or opens `/dev/vfio/vfio` itself. A
    /// device behind a vIOMMU takes it as a container of its own. Not
    /// serialized.
    #[serde(skip)]
    pub container_fd: Option<RawFd>,
    /// `fd=`: a `/dev/vhost-vdpa-N` node opened by whoever started the
    /// VMM and not used by anyone yet; `path` is then the node's path (for
    /// messages, and to tell the kind of device). Not serialized.
    #[serde(skip)]
    pub fd: Option<RawFd>,
}

/// Equal configurations ask for the same device the same way; the
/// container they would open it into is not compared (a configuration
/// that went through serde has none).
impl PartialEq for VdpaDeviceConfig {
    fn eq(&self, o: &Self) -> bool {
        self.path == o.path
            && self.num_queues == o.num_queues
            && self.features_mask == o.features_mask
            && self.kick == o.kick
            && self.iommu == o.iommu
            && self.shadow == o.shadow
            && self.group_fd == o.group_fd
            && self.container_fd == o.container_fd
            && self.fd == o.fd
    }
}

impl Eq for VdpaDeviceConfig {}

/// Open the VM's VFIO container for its bridged PCI functions (what
/// [`VdpaDeviceConfig::container`] takes): once per VM, before its first
/// such device.
///
/// # Errors
///
/// [`Error::Backend`] when `/dev/vfio/vfio` cannot be opened or lacks
/// type1v2.
pub fn open_container() -> Result<SharedContainer, Error> {
    SharedContainer::new().map_err(crate::error::backend_err("open the VM's VFIO container"))
}

/// The VM's VFIO container from descriptor `fd` (a device's
/// `container_fd=`), which stays open; or, without one, a container the
/// VMM opens ([`open_container`]).
///
/// # Errors
///
/// [`Error::Backend`] when `fd` is not open or not a VFIO container that
/// can be type1v2.
pub fn open_container_from(fd: Option<RawFd>) -> Result<SharedContainer, Error> {
    match fd {
        None => open_container(),
        Some(fd) => adopt_container(fd),
    }
}

fn adopt_container(fd: RawFd) -> Result<SharedContainer, Error> {
    let what = "adopt the VFIO container handed in (container_fd=)";
    let dup = dup_raw(fd)
        .map_err(|e| Error::Config(format!("container_fd={fd}: not an open descriptor: {e}")))?;
    SharedContainer::from_fd(dup).map_err(crate::error::backend_err(what))
}

fn dup_of(fd: RawFd, key: &str) -> Result<std::os::fd::OwnedFd, Error> {
    dup_raw(fd).map_err(|e| Error::Config(format!("{key}={fd}: not an open descriptor: {e}")))
}

impl VdpaDeviceConfig {
    /// Whether this device would go into the VM's shared VFIO container: a
    /// PCI function not behind a vIOMMU.
    pub fn wants_shared_container(&self) -> bool {
        !self.iommu && matches!(self.device_path(), Ok(DevicePath::Pci(_)))
    }

    /// Whether the device comes as descriptors handed in (`group_fd=` or
    /// `fd=`): a VM with such a device cannot be migrated by its
    /// configuration alone (the destination needs descriptors of its own).
    pub fn handed_in(&self) -> bool {
        self.group_fd.is_some() || self.fd.is_some()
    }

    /// Classify `path`.
    pub fn device_path(&self) -> Result<DevicePath, Error> {
        classify_path(&self.path)
    }

    /// Open the backend `path` names: VFIO for a PCI function, vhost-vdpa
    /// for a `/dev/vhost-vdpa-N` node, with the feature mask applied.
    pub fn open(&self) -> Result<AnyDevice, Error> {
        let opts = OpenOptions {
            features_mask: self.features_mask,
            ..OpenOptions::default()
        };
        let target = match self.device_path()? {
            DevicePath::Pci(bdf) => bdf,
            DevicePath::VhostVdpa(node) => node,
        };
        // Behind a vIOMMU the guest programs this device's own address
        // space, which a shared container cannot give it.
        let shared = self.container.as_ref().filter(|_| !self.iommu);
        let open_err = crate::error::backend_err("open");
        let handed_in = match (self.group_fd, self.fd) {
            (Some(g), _) => Some(Handed::VfioGroup {
                fd: dup_of(g, "group_fd")?,
                name: format!("group_fd={g}"),
            }),
            (None, Some(f)) => Some(Handed::VhostVdpa(dup_of(f, "fd")?)),
            (None, None) => None,
        };
        let Some(handed_in) = handed_in else {
            return AnyDevice::open_in(&target, opts, shared).map_err(open_err);
        };
        // A device of the VM's shared container uses it (which the VMM
        // adopted from this container_fd, or opened); one behind a vIOMMU
        // gets a container of its own, the one handed in if any.
        let own = match (shared, self.container_fd) {
            (None, Some(fd)) => Some(adopt_container(fd)?),
            _ => None,
        };
        AnyDevice::open_handed(&target, handed_in, opts, shared.or(own.as_ref())).map_err(open_err)
    }

    /// Check that the descriptors given fit the device `path` names:
    /// `group_fd=` (and `container_fd=`, only with it) for a PCI address,
    /// `fd=` for a vhost-vdpa node; descriptors are not negative.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] saying which option does not fit.
    pub fn check_fds(&self) -> Result<(), Error> {
        let kind = self.device_path()?;
        for (key, fd) in [
            ("group_fd", self.group_fd),
            ("container_fd", self.container_fd),
            ("fd", self.fd),
        ] {
            if fd.is_some_and(|f| f < 0) {
                return Err(Error::Config(format!(
                    "{key}= must be a descriptor (0 or more)"
                )));
            }
        }
        let pci = matches!(kind, DevicePath::Pci(_));
        if self.group_fd.is_some() && !pci {
            return Err(Error::Config(format!(
                "group_fd= needs path= to be the PCI address of the group's function, not {}",
                self.path
            )));
        }
        if self.container_fd.is_some() && self.group_fd.is_none() {
            return Err(Error::Config(
                "container_fd= goes with group_fd= (a container for a group handed in)".into(),
            ));
        }
        if self.fd.is_some() && pci {
            return Err(Error::Config(format!(
                "fd= is a /dev/vhost-vdpa-N node's descriptor; for the PCI function {} hand in its VFIO group with group_fd=",
                self.path
            )));
        }
        Ok(())
    }

    /// The plugin options this configuration asks for (`packed_ring` is
    /// the VMM's to say).
    pub fn device_options(&self, packed_ring: bool) -> DeviceOptions {
        DeviceOptions {
            packed_ring,
            iommu: self.iommu,
            num_queues: self.num_queues,
            kick: self.kick,
            notification_data: false,
            shadow: self.shadow,
        }
    }
}

/// Classify a device path by its text (no filesystem access): the
/// library's one parser, [`DevicePath::parse`], with the plugin's error.
///
/// # Errors
///
/// [`Error::Config`] naming the path.
pub fn classify_path(path: &str) -> Result<DevicePath, Error> {
    DevicePath::parse(path).map_err(|e| Error::Config(format!("path={path}: {e}")))
}

impl FromStr for VdpaDeviceConfig {
    type Err = Error;

    /// Parse CH-style options: `path=0000:00:04.0,num_queues=2,
    /// features_mask=0x...,kick=auto|relay,iommu=on|off,shadow=auto|on`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut cfg = VdpaDeviceConfig::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("`{part}` is not key=value")))?;
            let bad = || Error::Config(format!("{k}={v}: invalid value"));
            match k {
                "path" => cfg.path = v.to_owned(),
                "num_queues" => cfg.num_queues = Some(v.parse().map_err(|_| bad())?),
                "features_mask" => cfg.features_mask = Some(parse_u64(v).ok_or_else(bad)?),
                "kick" => {
                    cfg.kick = match v {
                        "auto" => KickPolicy::Auto,
                        "relay" => KickPolicy::Relay,
                        _ => return Err(bad()),
                    }
                }
                "iommu" => {
                    cfg.iommu = match v {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => return Err(bad()),
                    }
                }
                "group_fd" => cfg.group_fd = Some(v.parse().map_err(|_| bad())?),
                "container_fd" => cfg.container_fd = Some(v.parse().map_err(|_| bad())?),
                "fd" => cfg.fd = Some(v.parse().map_err(|_| bad())?),
                "shadow" => {
                    cfg.shadow = match v {
                        "on" | "always" => ShadowPolicy::Always,
                        "auto" | "off" => ShadowPolicy::Auto,
                        _ => return Err(bad()),
                    }
                }
                _ => return Err(Error::Config(format!("unknown option `{k}`"))),
            }
        }
        if cfg.path.is_empty() {
            return Err(Error::Config("path= is required".into()));
        }
        cfg.check_fds()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified() {
        assert_eq!(
            classify_path("/sys/bus/pci/devices/0000:00:05.0").unwrap(),
            DevicePath::Pci("0000:00:05.0".into())
        );
        assert_eq!(
            classify_path("/dev/vhost-vdpa-3").unwrap(),
            DevicePath::VhostVdpa("/dev/vhost-vdpa-3".into())
        );
        let e = classify_path("/dev/sda").unwrap_err();
        assert!(e.to_string().contains("path=/dev/sda"), "{e}");
        assert!(classify_path("/dev/vhost-vdpa-x").is_err());
    }

    #[test]
    fn options_parse_like_cloud_hypervisor() {
        let c: VdpaDeviceConfig =
            "path=00:04.0,num_queues=2,features_mask=0x300000000,kick=relay,iommu=on"
                .parse()
                .unwrap();
        assert_eq!(c.path, "00:04.0");
        assert_eq!(c.num_queues, Some(2));
        assert_eq!(c.features_mask, Some(0x3_0000_0000));
        assert_eq!(c.kick, KickPolicy::Relay);
        assert!(c.iommu);
        for bad in [
            "num_queues=2",
            "path=00:04.0,num_queues=x",
            "path=00:04.0,bogus=1",
            "path=00:04.0,kick=fast",
            "path=/dev/null",
        ] {
            assert!(bad.parse::<VdpaDeviceConfig>().is_err(), "{bad}");
        }
        let j: VdpaDeviceConfig =
            serde_json::from_str(r#"{"path":"/dev/vhost-vdpa-0","num_queues":1}"#).unwrap();
        assert_eq!(j.num_queues, Some(1));
    }

    #[test]
    fn handed_in_descriptors_parse_and_must_fit_the_device() {
        let c: VdpaDeviceConfig = "path=0000:00:04.0,group_fd=7,container_fd=8"
            .parse()
            .unwrap();
        let v: VdpaDeviceConfig = "path=/dev/vhost-vdpa-0,fd=9".parse().unwrap();

        assert_eq!((c.group_fd, c.container_fd, c.fd), (Some(7), Some(8), None));
        assert_eq!((v.group_fd, v.container_fd, v.fd), (None, None, Some(9)));
        assert!(c.handed_in() && v.handed_in());
        assert!(!"path=00:04.0"
            .parse::<VdpaDeviceConfig>()
            .unwrap()
            .handed_in());
        for (bad, says) in [
            ("path=/dev/vhost-vdpa-0,group_fd=7", "PCI address"),
            ("path=00:04.0,fd=7", "group_fd="),
            ("path=00:04.0,container_fd=7", "goes with group_fd="),
            ("path=00:04.0,group_fd=-1", "0 or more"),
            ("path=00:04.0,group_fd=x", "invalid value"),
        ] {
            let e = bad.parse::<VdpaDeviceConfig>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_descriptor_that_is_not_open_is_a_config_error_naming_it() {
        let c = VdpaDeviceConfig {
            path: "0000:00:04.0".into(),
            group_fd: Some(1_000_000),
            ..Default::default()
        };
        let v = VdpaDeviceConfig {
            path: "/dev/vhost-vdpa-0".into(),
            fd: Some(1_000_000),
            ..Default::default()
        };

        let e = c.open().unwrap_err().to_string();
        let f = v.open().unwrap_err().to_string();
        let k = open_container_from(Some(1_000_000))
            .unwrap_err()
            .to_string();

        assert!(
            e.contains("group_fd=1000000: not an open descriptor"),
            "{e}"
        );
        assert!(f.contains("fd=1000000: not an open descriptor"), "{f}");
        assert!(k.contains("container_fd=1000000"), "{k}");
    }

    #[test]
    fn a_handed_in_group_that_is_not_a_vfio_group_is_refused() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let c = VdpaDeviceConfig {
            path: "0000:00:04.0".into(),
            group_fd: Some(std::os::fd::AsRawFd::as_raw_fd(&null)),
            ..Default::default()
        };
        let k = open_container_from(Some(std::os::fd::AsRawFd::as_raw_fd(&null)));

        // Without a container given the VMM opens /dev/vfio/vfio first
        // (absent here without VFIO); with VFIO the group check refuses.
        let chain = |e: &dyn std::error::Error| {
            let mut s = e.to_string();
            let mut cur = e.source();
            while let Some(c) = cur {
                s += &format!(": {c}");
                cur = c.source();
            }
            s
        };
        let e = chain(&c.open().unwrap_err());
        assert!(
            e.contains("not a VFIO group") || e.contains("/dev/vfio/vfio"),
            "{e}"
        );
        let k = chain(&k.unwrap_err());
        assert!(k.contains("not a VFIO container"), "{k}");
    }
}
