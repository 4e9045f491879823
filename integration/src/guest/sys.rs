//! Small guest-side helpers over sysfs and VFIO, shared by cases.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vfio_ioctls::{VfioContainer, VfioDevice};

use crate::manifest::Device;

/// Name of the driver `dev` is bound to, if any.
pub fn driver(dev: &Device) -> Option<String> {
    let link = std::fs::read_link(dev.sysfs().join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// IOMMU group number of `dev`.
pub fn iommu_group(dev: &Device) -> anyhow::Result<u32> {
    let link = std::fs::read_link(dev.sysfs().join("iommu_group"))
        .with_context(|| format!("{} has no iommu_group (is the vIOMMU on?)", dev.bdf))?;
    let name = link
        .file_name()
        .context("empty iommu_group link")?
        .to_string_lossy();
    name.parse()
        .with_context(|| format!("iommu group name {name:?}"))
}

/// `/dev/vfio/<group>` of `dev`.
pub fn vfio_group_node(dev: &Device) -> anyhow::Result<PathBuf> {
    Ok(Path::new("/dev/vfio").join(iommu_group(dev)?.to_string()))
}

/// A hex sysfs attribute such as `vendor` or `device`.
pub fn sysfs_hex(dev: &Device, attr: &str) -> anyhow::Result<u32> {
    let p = dev.sysfs().join(attr);
    let s = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
    let s = s.trim();
    u32::from_str_radix(s.trim_start_matches("0x"), 16)
        .with_context(|| format!("{}: not hex: {s:?}", p.display()))
}

/// A device opened through VFIO (type1v2 container, one group).
pub struct VfioHandle {
    /// The container the device's group is attached to.
    pub container: Arc<VfioContainer>,
    /// The device.
    pub device: VfioDevice,
}

impl VfioHandle {
    /// Open `dev`, which must be bound to vfio-pci.
    pub fn open(dev: &Device) -> anyhow::Result<Self> {
        match driver(dev).as_deref() {
            Some("vfio-pci") => {}
            other => bail!("{} ({}) is bound to {other:?}, not vfio-pci", dev.name, dev.bdf),
        }
        let container = Arc::new(VfioContainer::new(None).context("open /dev/vfio/vfio")?);
        let device = VfioDevice::new(&dev.sysfs(), container.clone())
            .with_context(|| format!("open VFIO device {}", dev.bdf))?;
        Ok(Self { container, device })
    }

    /// Read `buf.len()` bytes of PCI config space at `offset`.
    ///
    /// vfio-ioctls' `region_read` only logs its errors, so the buffer is
    /// pre-filled with 0xff: a failed read looks like an absent device.
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) {
        buf.fill(0xff);
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, buf, offset);
    }

    /// A little-endian 16-bit config space register.
    pub fn config_u16(&self, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b);
        u16::from_le_bytes(b)
    }
}
