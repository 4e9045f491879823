//! What the VMM passes for a bridged device (`--vdpa path=...,...`).

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use vdpa_bridge::backend::AnyDevice;
pub use vdpa_bridge::device_path::DevicePath;
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

impl VdpaDeviceConfig {
    /// Whether this device would go into the VM's shared VFIO container: a
    /// PCI function not behind a vIOMMU.
    pub fn wants_shared_container(&self) -> bool {
        !self.iommu && matches!(self.device_path(), Ok(DevicePath::Pci(_)))
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
        let container = self.container.as_ref().filter(|_| !self.iommu);
        AnyDevice::open_in(&target, opts, container).map_err(crate::error::backend_err("open"))
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
        classify_path(&cfg.path)?;
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
}
