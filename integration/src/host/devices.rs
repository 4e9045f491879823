//! The device table: every QEMU virtio-pci device under test, at a fixed
//! guest PCI address. Later suites add rows here; the QEMU arguments, the
//! disk images, the guest's vfio-pci binding and the manifest all follow.
//!
//! # Address plan (all on the q35 root bus `pcie.0`, function 0)
//! | slot | device |
//! | --- | --- |
//! | 00.0 | q35 host bridge (fixed by QEMU) |
//! | 01.0 | free (`-vga none`) |
//! | 02.0 | virtio-9p-pci `hostroot` (the guest's view of the host root) |
//! | 03.0 - 0f.0 | virtio-blk devices under test |
//! | 10.0 - 1b.0 | virtio-net devices under test |
//! | 1c.0 - 1e.0 | spare (e.g. root ports for later suites) |
//! | 1f.x | q35 ICH9 LPC / SATA / SMBus (fixed by QEMU) |
//!
//! Devices on the root bus are integrated endpoints; with the vIOMMU each
//! one lands in an IOMMU group of its own.

use std::path::Path;

use crate::manifest::{Device, Kind, NetInfo};

/// What backs a device.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// A raw image `<name>.img` of this many MiB in the lab dir, filled
    /// with [`crate::pattern`].
    Image {
        /// Size in MiB.
        mib: u64,
    },
    /// QEMU user-mode networking (single queue pair).
    UserNet,
    /// The harness's multi-queue tap, with this many queue pairs.
    Tap {
        /// Queue pairs.
        queues: u32,
    },
}

/// One row of the device table.
#[derive(Clone, Copy, Debug)]
pub struct DeviceSpec {
    /// Stable name; also the image's stem and the blk serial.
    pub name: &'static str,
    /// blk or net.
    pub kind: Kind,
    /// Slot on `pcie.0`.
    pub slot: u8,
    /// blk `num-queues` / net queue pairs (must match the backend).
    pub num_queues: u32,
    /// MSI-X table size, passed as `vectors=` (explicit, so the manifest
    /// states the truth rather than QEMU's default formula).
    pub vectors: u32,
    /// `page-per-vq=on`.
    pub page_per_vq: bool,
    /// Legacy-only device (`disable-modern=on`); otherwise modern-only with
    /// `disable-legacy=on,iommu_platform=on`.
    pub legacy: bool,
    /// Backend.
    pub backend: Backend,
    /// MAC address (net).
    pub mac: Option<&'static str>,
    /// Any further `-device` properties, comma separated (e.g. `packed=on`).
    pub extra: &'static str,
    /// Driver the guest's init binds it to; `None` leaves it on virtio-pci.
    pub bind: Option<&'static str>,
}

const BLK: DeviceSpec = DeviceSpec {
    name: "",
    kind: Kind::Blk,
    slot: 0,
    num_queues: 1,
    vectors: 2,
    page_per_vq: false,
    legacy: false,
    backend: Backend::Image { mib: 64 },
    mac: None,
    extra: "",
    bind: Some("vfio-pci"),
};

/// The devices every lab run creates.
pub const DEVICES: &[DeviceSpec] = &[
    DeviceSpec {
        name: "blk0",
        slot: 0x03,
        ..BLK
    },
    DeviceSpec {
        name: "blkmq",
        slot: 0x04,
        num_queues: 4,
        vectors: 2,
        ..BLK
    },
    DeviceSpec {
        name: "blkppv",
        slot: 0x05,
        page_per_vq: true,
        ..BLK
    },
    DeviceSpec {
        name: "legacy",
        slot: 0x06,
        legacy: true,
        ..BLK
    },
    DeviceSpec {
        name: "net0",
        kind: Kind::Net,
        slot: 0x10,
        num_queues: 1,
        vectors: 4,
        backend: Backend::UserNet,
        mac: Some("52:54:00:12:34:56"),
        ..BLK
    },
    DeviceSpec {
        name: "netmq",
        kind: Kind::Net,
        slot: 0x11,
        num_queues: 4,
        vectors: 10,
        backend: Backend::Tap { queues: 4 },
        mac: Some("52:54:00:12:34:57"),
        extra: "mq=on",
        ..BLK
    },
];

/// Escape a value for a QEMU `-device`/`-drive` option string.
pub fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl DeviceSpec {
    /// Guest PCI address.
    pub fn bdf(&self) -> String {
        format!("0000:00:{:02x}.0", self.slot)
    }

    /// Image file name, if backed by one.
    pub fn image_name(&self) -> Option<String> {
        matches!(self.backend, Backend::Image { .. }).then(|| format!("{}.img", self.name))
    }

    /// The `-device` string.
    pub fn qemu_device(&self) -> String {
        let model = match self.kind {
            Kind::Blk => "virtio-blk-pci",
            Kind::Net => "virtio-net-pci",
        };
        let mut p = vec![
            model.to_string(),
            format!("id={}", self.name),
            format!("bus=pcie.0,addr={:#x}", self.slot),
        ];
        match self.backend {
            Backend::Image { .. } => {
                p.push(format!("drive=drive-{}", self.name));
                p.push(format!("serial={}", self.name));
                p.push(format!("num-queues={}", self.num_queues));
            }
            Backend::UserNet | Backend::Tap { .. } => {
                p.push(format!("netdev=netdev-{}", self.name));
                // No option ROM: the lab boots with -kernel, and this avoids
                // needing the ipxe-qemu package.
                p.push("romfile=".to_string());
            }
        }
        if let Some(mac) = self.mac {
            p.push(format!("mac={mac}"));
        }
        p.push(format!("vectors={}", self.vectors));
        if self.legacy {
            p.push("disable-modern=on,disable-legacy=off".to_string());
        } else {
            p.push("disable-legacy=on,iommu_platform=on".to_string());
        }
        if self.page_per_vq {
            p.push("page-per-vq=on".to_string());
        }
        if !self.extra.is_empty() {
            p.push(self.extra.to_string());
        }
        p.join(",")
    }

    /// All QEMU arguments for this device (backend + device).
    pub fn qemu_args(&self, lab_dir: &Path, net: &NetInfo) -> Vec<String> {
        let backend = match self.backend {
            Backend::Image { .. } => {
                let img = lab_dir.join(self.image_name().unwrap_or_default());
                vec![
                    "-drive".to_string(),
                    format!(
                        "if=none,id=drive-{},format=raw,file={}",
                        self.name,
                        qemu_escape(&img.to_string_lossy())
                    ),
                ]
            }
            Backend::UserNet => vec![
                "-netdev".to_string(),
                format!("user,id=netdev-{}", self.name),
            ],
            Backend::Tap { queues } => vec![
                "-netdev".to_string(),
                format!(
                    "tap,id=netdev-{},ifname={},queues={queues},script=no,downscript=no",
                    self.name, net.tap
                ),
            ],
        };
        let mut args = backend;
        args.push("-device".to_string());
        args.push(self.qemu_device());
        args
    }

    /// This device's manifest entry.
    pub fn manifest_entry(&self, lab_dir: &Path) -> Device {
        let capacity_sectors = match self.backend {
            Backend::Image { mib } => Some(mib * 1024 * 1024 / 512),
            _ => None,
        };
        Device {
            name: self.name.to_string(),
            bdf: self.bdf(),
            kind: self.kind,
            bind: self.bind.map(str::to_string),
            image: self.image_name().map(|n| lab_dir.join(n)),
            mac: self.mac.map(str::to_string),
            num_queues: self.num_queues,
            vectors: self.vectors,
            page_per_vq: self.page_per_vq,
            legacy: self.legacy,
            capacity_sectors,
            qemu_device: self.qemu_device(),
        }
    }
}

/// Whether `net` uses the tap at all (so the harness creates it only then).
pub fn needs_tap(devices: &[DeviceSpec]) -> bool {
    devices
        .iter()
        .any(|d| matches!(d.backend, Backend::Tap { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn device_names_and_slots_are_unique_and_in_plan() {
        let names: HashSet<_> = DEVICES.iter().map(|d| d.name).collect();
        let slots: HashSet<_> = DEVICES.iter().map(|d| d.slot).collect();

        assert_eq!(names.len(), DEVICES.len());
        assert_eq!(slots.len(), DEVICES.len());
        assert!(DEVICES.iter().all(|d| (0x03..=0x1e).contains(&d.slot)));
    }

    #[test]
    fn modern_device_string_carries_iommu_platform() {
        let blk0 = DEVICES.iter().find(|d| d.name == "blk0").unwrap();

        assert_eq!(
            blk0.qemu_device(),
            "virtio-blk-pci,id=blk0,bus=pcie.0,addr=0x3,drive=drive-blk0,serial=blk0,\
             num-queues=1,vectors=2,disable-legacy=on,iommu_platform=on"
        );
    }

    #[test]
    fn comma_in_image_path_is_escaped() {
        assert_eq!(qemu_escape("/a,b/c.img"), "/a,,b/c.img");
    }
}
