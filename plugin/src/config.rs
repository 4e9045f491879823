//! What the VMM passes for a bridged device (`--vdpa path=...,...`).

use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use vdpa_bridge::backend::AnyDevice;
use vdpa_bridge::vp_vdpa::OpenOptions;

use crate::Error;
use crate::{DeviceOptions, KickPolicy};

/// A bridged device's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
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
}

/// What `path=` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevicePath {
    /// A PCI function, by its canonical address.
    Pci(String),
    /// A kernel vDPA device's vhost-vdpa node.
    VhostVdpa(String),
}

/// Normalise a PCI address: `00:04.0` gets domain `0000`; hex digits are
/// lower-cased; anything else is refused.
pub fn parse_pci_address(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let full = match s.matches(':').count() {
        1 => format!("0000:{s}"),
        2 => s,
        _ => return None,
    };
    let (dom, rest) = full.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let hex = |t: &str, n: usize| t.len() == n && t.chars().all(|c| c.is_ascii_hexdigit());
    let ok = hex(dom, 4)
        && hex(bus, 2)
        && hex(dev, 2)
        && u8::from_str_radix(dev, 16).is_ok_and(|d| d < 32)
        && func.len() == 1
        && func.chars().all(|c| ('0'..='7').contains(&c));
    ok.then_some(full)
}

impl VdpaDeviceConfig {
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
        AnyDevice::open(&target, opts).map_err(crate::error::backend_err("open"))
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
        }
    }
}

/// Classify a device path without touching the filesystem beyond the
/// final component of a sysfs path.
pub fn classify_path(path: &str) -> Result<DevicePath, Error> {
    let name = Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path);
    if name.starts_with("vhost-vdpa-") && name["vhost-vdpa-".len()..].parse::<u32>().is_ok() {
        return Ok(DevicePath::VhostVdpa(path.to_owned()));
    }
    if let Some(bdf) = parse_pci_address(name) {
        return Ok(DevicePath::Pci(bdf));
    }
    Err(Error::Config(format!(
        "path={path}: neither a PCI address or sysfs device path nor a /dev/vhost-vdpa-N node"
    )))
}

fn parse_u64(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

impl FromStr for VdpaDeviceConfig {
    type Err = Error;

    /// Parse CH-style options: `path=0000:00:04.0,num_queues=2,
    /// features_mask=0x...,kick=auto|relay,iommu=on|off`.
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
    fn pci_addresses_are_normalised_or_refused() {
        assert_eq!(
            parse_pci_address("00:04.0").as_deref(),
            Some("0000:00:04.0")
        );
        assert_eq!(
            parse_pci_address("0000:AF:1f.7").as_deref(),
            Some("0000:af:1f.7")
        );
        for bad in [
            "",
            "04.0",
            "0000:00:20.0",
            "0000:00:04.8",
            "x0:00:04.0",
            "1:2:3:4",
        ] {
            assert_eq!(parse_pci_address(bad), None, "{bad}");
        }
    }

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
        assert!(classify_path("/dev/sda").is_err());
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
