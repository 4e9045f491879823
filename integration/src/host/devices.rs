//! The device table: every QEMU virtio-pci device variant, at a fixed guest
//! PCI address. QEMU arguments, disk images and the manifest all follow
//! from it; a later suite that needs another knob adds a row.
//!
//! # Address plan (slots of the q35 root bus `pcie.0`, function 0)
//! | slot | device |
//! | --- | --- |
//! | 00.0 | q35 host bridge (fixed by QEMU) |
//! | 02.0 | virtio-9p-pci `hostroot` (the guest's view of the host root) |
//! | 03.0 - 0f.0 | virtio-blk variants |
//! | 10.0 - 17.0 | virtio-net variants |
//! | 18.0 - 1b.0 | other device types (rng, console, balloon, crypto) |
//! | 1c.0 - 1d.7 | the fleet: 16 `pcie-root-port`s (multifunction), one virtio-blk behind each |
//! | 1f.x | q35 ICH9 LPC / SATA / SMBus (fixed by QEMU) |
//!
//! Devices on the root bus are integrated endpoints: no FLR, no hot-plug
//! slot. Rows with `root_port` put the device behind a `pcie-root-port` in
//! its slot instead, as real VFs sit behind ports: a PCIe endpoint with
//! FLR in a hot-plug slot, on the bus the firmware gives that port (one
//! per port, in slot order, from 1: see [`DeviceSpec::bdf`]). With the
//! vIOMMU each device lands in an IOMMU group of its own.

use std::path::Path;

use crate::manifest::{ConsoleFiles, Device, Kind, Variant};

/// vCPUs the lab VM gets; QEMU's default virtio-blk queue count follows it.
pub const SMP: u32 = 2;

/// PCI slot of the 9p share.
pub const HOSTROOT_SLOT: u8 = 0x02;
/// PCI slot of the read-write 9p share of the lab directory.
pub const LABRW_SLOT: u8 = 0x07;

/// What backs a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A raw image `<variant>.img` of this many MiB in the lab dir, filled
    /// with [`crate::pattern`].
    Image {
        /// Size in MiB.
        mib: u64,
    },
    /// QEMU user-mode networking (single queue pair).
    UserNet,
    /// The suite's multi-queue tap in its network namespace.
    Tap {
        /// Queue pairs (`queues=` of the tap netdev).
        queues: u32,
    },
    /// virtio-rng on an `rng-builtin` object.
    Rng,
    /// virtio-serial with a `virtconsole` on port 0, backed by a `file`
    /// chardev: QEMU feeds [`CONSOLE_INPUT`] from `<variant>.in` and
    /// writes what the guest sends to `<variant>.out`.
    ConsoleFile,
    /// virtio-crypto on a `cryptodev-backend-builtin` object.
    CryptoBuiltin,
    /// Nothing behind the device (virtio-balloon works on guest RAM).
    BalloonOnly,
    /// The image of another variant, shared (`share-rw=on` on both
    /// devices): no image of its own, none checked for it.
    SharedImage {
        /// Whose image.
        of: Variant,
    },
}

/// What QEMU feeds a console device's guest side.
pub const CONSOLE_INPUT: &str = "vdpa-lab: hello from the host side\n";

/// One row of the device table.
#[derive(Clone, Copy, Debug)]
pub struct DeviceSpec {
    /// The variant.
    pub variant: Variant,
    /// Slot on `pcie.0`.
    pub slot: u8,
    /// `num-queues=` (blk) or queue pairs (net); `None` leaves QEMU's default.
    pub num_queues: Option<u32>,
    /// `vectors=`; `None` leaves QEMU's default.
    pub vectors: Option<u32>,
    /// Legacy-only (`disable-modern=on`).
    pub legacy: bool,
    /// Backend.
    pub backend: Backend,
    /// Further `-device` properties, comma separated (`page-per-vq=on`).
    pub extra: &'static str,
    /// Behind a `pcie-root-port` in `slot` (PCIe FLR, a hot-plug slot)
    /// instead of on `pcie.0`.
    pub root_port: bool,
}

/// The tap device's name inside the suite's network namespace.
pub const TAP_NAME: &str = "vlab0";
/// The tap's address (host side of the guest's multi-queue NIC).
pub const TAP_ADDR: &str = "10.99.0.1/24";

/// Every variant, in slot order.
pub const DEVICES: &[DeviceSpec] = &[
    DeviceSpec {
        variant: Variant::Blk0,
        slot: 0x03,
        num_queues: None,
        vectors: None,
        legacy: false,
        backend: Backend::Image { mib: 16 },
        // Blk0Twin and Blk0NoEventIdx use its image too.
        extra: "share-rw=on",
        root_port: true,
    },
    DeviceSpec {
        variant: Variant::BlkMq,
        slot: 0x04,
        num_queues: Some(4),
        vectors: Some(2),
        legacy: false,
        backend: Backend::Image { mib: 1 },
        extra: "",
        root_port: false,
    },
    DeviceSpec {
        variant: Variant::BlkPpv,
        slot: 0x05,
        num_queues: Some(1),
        vectors: None,
        legacy: false,
        backend: Backend::Image { mib: 1 },
        extra: "page-per-vq=on",
        root_port: false,
    },
    DeviceSpec {
        variant: Variant::Legacy,
        slot: 0x06,
        num_queues: Some(1),
        vectors: None,
        legacy: true,
        backend: Backend::Image { mib: 1 },
        extra: "",
        root_port: false,
    },
    DeviceSpec {
        variant: Variant::Blk1,
        slot: 0x08,
        num_queues: None,
        vectors: None,
        legacy: false,
        backend: Backend::Image { mib: 16 },
        extra: "",
        root_port: true,
    },
    // On the root bus, not behind ports: a port here would renumber the
    // buses of the ports after it.
    DeviceSpec {
        variant: Variant::Blk0Twin,
        slot: 0x09,
        num_queues: None,
        vectors: None,
        legacy: false,
        backend: Backend::SharedImage { of: Variant::Blk0 },
        extra: "share-rw=on",
        root_port: false,
    },
    DeviceSpec {
        variant: Variant::Blk0NoEventIdx,
        slot: 0x0a,
        num_queues: None,
        vectors: None,
        legacy: false,
        backend: Backend::SharedImage { of: Variant::Blk0 },
        extra: "share-rw=on,event_idx=off",
        root_port: false,
    },
    DeviceSpec {
        variant: Variant::NetUser,
        slot: 0x10,
        num_queues: None,
        vectors: None,
        legacy: false,
        backend: Backend::UserNet,
        extra: "mac=52:54:00:12:34:56",
        root_port: true,
    },
    DeviceSpec {
        variant: Variant::NetMq,
        slot: 0x11,
        num_queues: Some(4),
        vectors: Some(10),
        legacy: false,
        backend: Backend::Tap { queues: 4 },
        extra: "mq=on,mac=52:54:00:12:34:57",
        root_port: false,
    },
    DeviceSpec {
        variant: Variant::Rng,
        slot: 0x18,
        num_queues: None,
        vectors: Some(2),
        legacy: false,
        backend: Backend::Rng,
        extra: "",
        root_port: false,
    },
    DeviceSpec {
        variant: Variant::Console,
        slot: 0x19,
        num_queues: None,
        vectors: Some(3),
        legacy: false,
        backend: Backend::ConsoleFile,
        // One port: no MULTIPORT, port 0 on queues 0 and 1.
        extra: "max_ports=1",
        root_port: false,
    },
    DeviceSpec {
        variant: Variant::Balloon,
        slot: 0x1a,
        num_queues: None,
        vectors: Some(5),
        legacy: false,
        backend: Backend::BalloonOnly,
        // The reporting queue (32 entries) next to the others (128).
        extra: "free-page-reporting=on,deflate-on-oom=on",
        root_port: false,
    },
    DeviceSpec {
        variant: Variant::Crypto,
        slot: 0x1b,
        num_queues: None,
        vectors: Some(3),
        legacy: false,
        backend: Backend::CryptoBuiltin,
        extra: "",
        root_port: false,
    },
];

/// Disks of the fleet: virtio-blk devices with 2 queues, each behind a
/// `pcie-root-port` of its own, as a host with SmartNIC VFs gives a VM
/// many volumes (cases of one VMM with many bridged devices).
pub const FLEET: usize = 16;
/// Slots of the fleet's root ports on `pcie.0`, 8 functions each.
const FLEET_SLOTS: [u8; 2] = [0x1c, 0x1d];
/// Queues of each fleet disk.
pub const FLEET_QUEUES: u32 = 2;
/// Size of each fleet disk's image.
pub const FLEET_MIB: u64 = 1;

/// One disk of the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetDisk {
    /// Its name: QEMU id, image name and virtio-blk serial (`fleet00`).
    pub name: String,
    /// Guest PCI address.
    pub bdf: String,
    /// Slot and function of its root port on `pcie.0`.
    pub port: (u8, u8),
}

/// The fleet, in bus order. Its ports come after every port of
/// [`DEVICES`] in slot order, so they get the buses after theirs.
pub fn fleet() -> Vec<FleetDisk> {
    let ports_before = DEVICES.iter().filter(|d| d.root_port).count();
    (0..FLEET)
        .map(|i| {
            let slot = FLEET_SLOTS[i / 8];
            FleetDisk {
                name: format!("fleet{i:02}"),
                bdf: format!("0000:{:02x}:00.0", 1 + ports_before + i),
                port: (slot, (i % 8) as u8),
            }
        })
        .collect()
}

impl FleetDisk {
    /// QEMU arguments: image, root port, device.
    pub fn qemu_args(&self, lab_dir: &Path) -> Vec<String> {
        let name = &self.name;
        let img = lab_dir.join(format!("{name}.img"));
        let (slot, func) = self.port;
        let chassis = 0x40 + u32::from(slot - FLEET_SLOTS[0]) * 8 + u32::from(func);
        vec![
            "-drive".into(),
            format!(
                "if=none,id=drive-{name},format=raw,file={}",
                qemu_escape(&img.to_string_lossy())
            ),
            "-device".into(),
            format!(
                "pcie-root-port,id=rp-{name},bus=pcie.0,addr={slot:#04x}.{func}{},chassis={chassis},slot={chassis}",
                if func == 0 { ",multifunction=on" } else { "" }
            ),
            "-device".into(),
            format!(
                "virtio-blk-pci,id={name},bus=rp-{name},addr=0x0,drive=drive-{name},serial={name},\
                 num-queues={FLEET_QUEUES},disable-legacy=on,iommu_platform=on"
            ),
        ]
    }
}

/// Escape a value for a QEMU option string (`,` doubles).
pub fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl DeviceSpec {
    /// The kind of device, from what backs it.
    pub fn kind(&self) -> Kind {
        match self.backend {
            Backend::Image { .. } | Backend::SharedImage { .. } => Kind::Blk,
            Backend::UserNet | Backend::Tap { .. } => Kind::Net,
            Backend::Rng => Kind::Rng,
            Backend::ConsoleFile => Kind::Console,
            Backend::CryptoBuiltin => Kind::Crypto,
            Backend::BalloonOnly => Kind::Balloon,
        }
    }

    /// Guest PCI address. Behind a root port, the device is function 0 of
    /// the port's secondary bus, which the firmware (SeaBIOS) numbers depth
    /// first in slot order: the n-th port of the table gets bus n (the
    /// smoke cases read each device's ids at this address, so a different
    /// numbering fails there, loudly).
    pub fn bdf(&self) -> String {
        if self.root_port {
            let bus = 1 + DEVICES
                .iter()
                .filter(|d| d.root_port && d.slot < self.slot)
                .count();
            format!("0000:{bus:02x}:00.0")
        } else {
            format!("0000:00:{:02x}.0", self.slot)
        }
    }

    /// The `pcie-root-port` the device sits behind, if any: its id and
    /// `-device` string (chassis and slot numbers from the slot, unique).
    pub fn root_port_device(&self) -> Option<(String, String)> {
        self.root_port.then(|| {
            let id = format!("rp-{}", self.variant.name());
            let dev = format!(
                "pcie-root-port,id={id},bus=pcie.0,addr={:#04x},chassis={},slot={}",
                self.slot, self.slot, self.slot
            );
            (id, dev)
        })
    }

    /// Image file name, if backed by one.
    pub fn image_name(&self) -> Option<String> {
        matches!(self.backend, Backend::Image { .. })
            .then(|| format!("{}.img", self.variant.name()))
    }

    /// The console's chardev files (input, output) in `lab_dir`, if it is
    /// one.
    pub fn console_files(&self, lab_dir: &Path) -> Option<ConsoleFiles> {
        let name = self.variant.name();
        (self.backend == Backend::ConsoleFile).then(|| ConsoleFiles {
            input: lab_dir.join(format!("{name}.in")),
            output: lab_dir.join(format!("{name}.out")),
        })
    }

    /// Queues (blk), queue pairs (net) or virtqueues (other kinds) QEMU
    /// offers.
    pub fn effective_queues(&self) -> u32 {
        match (self.num_queues, self.backend) {
            (Some(n), _) => n,
            (None, Backend::Tap { queues }) => queues,
            (None, Backend::UserNet) => 1,
            // hw/block/virtio-blk.c: num-queues=auto is
            // virtio_pci_optimal_num_queues(), one per vCPU.
            (None, Backend::Image { .. } | Backend::SharedImage { .. }) => SMP,
            // hw/virtio/virtio-rng.c: one requestq.
            (None, Backend::Rng) => 1,
            // hw/char/virtio-serial-bus.c: port 0's two queues and the two
            // control queues, whatever max_ports is.
            (None, Backend::ConsoleFile) => 4,
            // hw/virtio/virtio-crypto.c: one data queue (queues=1) and the
            // control queue.
            (None, Backend::CryptoBuiltin) => 2,
            // hw/virtio/virtio-balloon.c: inflate, deflate, stats, and the
            // reporting queue with free-page-reporting=on.
            (None, Backend::BalloonOnly) => 4,
        }
    }

    /// MSI-X table size: `vectors=`, or QEMU's default (hw/virtio/virtio-blk-pci.c:
    /// queues + 1 config vector; hw/virtio/virtio-net-pci.c: 2 per queue pair
    /// + control queue + config). The other kinds set `vectors=` in their row.
    pub fn msix_vectors(&self) -> u32 {
        if let Some(v) = self.vectors {
            return v;
        }
        match self.kind() {
            Kind::Net => 2 * self.effective_queues() + 2,
            _ => self.effective_queues() + 1,
        }
    }

    /// The `-device` string.
    pub fn qemu_device(&self) -> String {
        let name = self.variant.name();
        let model = match self.kind() {
            Kind::Blk => "virtio-blk-pci",
            Kind::Net => "virtio-net-pci",
            Kind::Rng => "virtio-rng-pci",
            Kind::Console => "virtio-serial-pci",
            Kind::Balloon => "virtio-balloon-pci",
            Kind::Crypto => "virtio-crypto-pci",
        };
        let mut p = vec![
            model.to_string(),
            format!("id={name}"),
            match self.root_port_device() {
                Some((port, _)) => format!("bus={port},addr=0x0"),
                None => format!("bus=pcie.0,addr={:#04x}", self.slot),
            },
        ];
        match self.kind() {
            Kind::Blk => {
                p.push(format!("drive=drive-{name},serial={name}"));
            }
            // No option ROM: the lab boots with -kernel, and this avoids
            // needing the ipxe-qemu package.
            Kind::Net => p.push(format!("netdev=netdev-{name},romfile=")),
            Kind::Rng => p.push(format!("rng=rng-{name}")),
            Kind::Crypto => p.push(format!("cryptodev=cryptodev-{name}")),
            Kind::Console | Kind::Balloon => {}
        }
        if let (Some(n), Kind::Blk) = (self.num_queues, self.kind()) {
            p.push(format!("num-queues={n}"));
        }
        if let Some(v) = self.vectors {
            p.push(format!("vectors={v}"));
        }
        if self.legacy {
            p.push("disable-modern=on,disable-legacy=off".to_string());
        } else {
            p.push("disable-legacy=on,iommu_platform=on".to_string());
        }
        if !self.extra.is_empty() {
            p.push(self.extra.to_string());
        }
        p.join(",")
    }

    /// All QEMU arguments for this device (backend and device).
    pub fn qemu_args(&self, lab_dir: &Path) -> Vec<String> {
        let name = self.variant.name();
        let mut args: Vec<String> = match self.backend {
            Backend::Image { .. } => {
                let img = lab_dir.join(self.image_name().unwrap_or_default());
                vec![
                    "-drive".to_string(),
                    format!(
                        "if=none,id=drive-{name},format=raw,file={}",
                        qemu_escape(&img.to_string_lossy())
                    ),
                ]
            }
            Backend::UserNet => vec!["-netdev".to_string(), format!("user,id=netdev-{name}")],
            Backend::Tap { queues } => vec![
                "-netdev".to_string(),
                format!(
                    "tap,id=netdev-{name},ifname={TAP_NAME},queues={queues},\
                     script=no,downscript=no,vhost=off"
                ),
            ],
            Backend::Rng => vec!["-object".to_string(), format!("rng-builtin,id=rng-{name}")],
            Backend::CryptoBuiltin => vec![
                "-object".to_string(),
                format!("cryptodev-backend-builtin,id=cryptodev-{name}"),
            ],
            Backend::ConsoleFile => {
                let f = self.console_files(lab_dir).unwrap_or_else(|| ConsoleFiles {
                    input: lab_dir.join("console.in"),
                    output: lab_dir.join("console.out"),
                });
                vec![
                    "-chardev".to_string(),
                    format!(
                        "file,id=chr-{name},path={},input-path={}",
                        qemu_escape(&f.output.to_string_lossy()),
                        qemu_escape(&f.input.to_string_lossy())
                    ),
                ]
            }
            Backend::BalloonOnly => Vec::new(),
            Backend::SharedImage { of } => {
                let img = lab_dir.join(format!("{}.img", of.name()));
                vec![
                    "-drive".to_string(),
                    format!(
                        "if=none,id=drive-{name},format=raw,file={}",
                        qemu_escape(&img.to_string_lossy())
                    ),
                ]
            }
        };
        if let Some((_, port)) = self.root_port_device() {
            args.push("-device".to_string());
            args.push(port);
        }
        args.push("-device".to_string());
        args.push(self.qemu_device());
        if self.backend == Backend::ConsoleFile {
            // The console on port 0 of the device's bus.
            args.push("-device".to_string());
            args.push(format!("virtconsole,chardev=chr-{name},bus={name}.0"));
        }
        args
    }

    /// This device's manifest entry.
    pub fn manifest_entry(&self, lab_dir: &Path) -> Device {
        Device {
            variant: self.variant,
            bdf: self.bdf(),
            kind: self.kind(),
            legacy: self.legacy,
            image: self.image_name().map(|n| lab_dir.join(n)),
            num_queues: self.effective_queues(),
            msix_vectors: self.msix_vectors(),
            qemu_device: self.qemu_device(),
            console: self.console_files(lab_dir),
            root_port: self
                .root_port
                .then(|| format!("0000:00:{:02x}.0", self.slot)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_variant_has_one_row_in_a_unique_slot() {
        let variants: HashSet<_> = DEVICES.iter().map(|d| d.variant).collect();
        let slots: HashSet<_> = DEVICES.iter().map(|d| d.slot).collect();

        assert_eq!(variants.len(), Variant::ALL.len());
        assert_eq!(slots.len(), DEVICES.len());
        assert!(!slots.contains(&HOSTROOT_SLOT) && !slots.contains(&LABRW_SLOT));
        assert!(DEVICES.iter().all(|d| (0x03..=0x1e).contains(&d.slot)));
    }

    #[test]
    fn modern_device_string_carries_iommu_platform() {
        let mq = DEVICES
            .iter()
            .find(|d| d.variant == Variant::BlkMq)
            .unwrap();

        assert_eq!(
            mq.qemu_device(),
            "virtio-blk-pci,id=blk_mq,bus=pcie.0,addr=0x04,drive=drive-blk_mq,serial=blk_mq,\
             num-queues=4,vectors=2,disable-legacy=on,iommu_platform=on"
        );
    }

    /// blk0, blk1 and net_user sit behind root ports (as VFs do), one port per
    /// device, each on the bus the firmware numbers in slot order; the rest
    /// stay integrated endpoints on pcie.0.
    #[test]
    fn root_port_devices_sit_on_their_ports_secondary_bus() {
        let by = |v| DEVICES.iter().find(|d| d.variant == v).unwrap();
        let blk0 = by(Variant::Blk0);

        assert_eq!(
            blk0.qemu_args(Path::new("/lab"))[2..],
            [
                "-device",
                "pcie-root-port,id=rp-blk0,bus=pcie.0,addr=0x03,chassis=3,slot=3",
                "-device",
                "virtio-blk-pci,id=blk0,bus=rp-blk0,addr=0x0,drive=drive-blk0,serial=blk0,\
                 disable-legacy=on,iommu_platform=on,share-rw=on",
            ]
        );
        assert_eq!(blk0.bdf(), "0000:01:00.0");
        assert_eq!(by(Variant::Blk1).bdf(), "0000:02:00.0");
        assert_eq!(by(Variant::NetUser).bdf(), "0000:03:00.0");
        assert_eq!(by(Variant::BlkMq).bdf(), "0000:00:04.0");
        let bdfs: HashSet<_> = DEVICES.iter().map(|d| d.bdf()).collect();
        assert_eq!(bdfs.len(), DEVICES.len());
    }

    /// Every kind the lab has is modern-only behind the vIOMMU, but the
    /// one legacy variant.
    #[test]
    fn every_modern_device_is_modern_only_with_iommu_platform() {
        for d in DEVICES.iter().filter(|d| !d.legacy) {
            assert!(
                d.qemu_device()
                    .contains("disable-legacy=on,iommu_platform=on"),
                "{}",
                d.variant.name()
            );
        }
    }

    #[test]
    fn console_is_a_virtconsole_on_a_file_chardev_with_one_port() {
        let c = DEVICES
            .iter()
            .find(|d| d.variant == Variant::Console)
            .unwrap();

        let a = c.qemu_args(Path::new("/lab"));

        assert_eq!(
            a,
            [
                "-chardev",
                "file,id=chr-console,path=/lab/console.out,input-path=/lab/console.in",
                "-device",
                "virtio-serial-pci,id=console,bus=pcie.0,addr=0x19,vectors=3,\
                 disable-legacy=on,iommu_platform=on,max_ports=1",
                "-device",
                "virtconsole,chardev=chr-console,bus=console.0",
            ]
        );
    }

    #[test]
    fn default_vectors_follow_qemu_formulas() {
        let by = |v| DEVICES.iter().find(|d| d.variant == v).unwrap();

        assert_eq!(by(Variant::Blk0).msix_vectors(), SMP + 1);
        assert_eq!(by(Variant::BlkMq).msix_vectors(), 2);
        assert_eq!(by(Variant::NetUser).msix_vectors(), 4);
        assert_eq!(by(Variant::NetMq).msix_vectors(), 10);
    }

    #[test]
    fn fleet_ports_follow_the_tables_ports_on_their_own_buses() {
        let f = fleet();

        assert_eq!(f.len(), FLEET);
        assert_eq!(f[0].bdf, "0000:04:00.0");
        assert_eq!(f[15].bdf, "0000:13:00.0");
        assert_eq!((f[7].port, f[8].port), ((0x1c, 7), (0x1d, 0)));
        assert!(DEVICES.iter().all(|d| d.slot < 0x1c));
        let a = f[8].qemu_args(Path::new("/lab"));
        assert_eq!(
            a[3],
            "pcie-root-port,id=rp-fleet08,bus=pcie.0,addr=0x1d.0,multifunction=on,chassis=72,slot=72"
        );
        assert!(a[5].contains("serial=fleet08,num-queues=2,"), "{}", a[5]);
    }

    #[test]
    fn comma_in_image_path_is_escaped() {
        assert_eq!(qemu_escape("/a,b/c.img"), "/a,,b/c.img");
    }
}
