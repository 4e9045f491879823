//! The VM lab: vdpa-bridge tested against devices we did not write.
//!
//! The host side ([`host`], binary `lab`) boots a QEMU TCG guest (q35,
//! intel-iommu, Debian's 6.12 kernel from bookworm-backports, a busybox
//! initramfs) with a set of real QEMU virtio-pci device variants at fixed
//! PCI addresses, described to the guest by a [`manifest`]. The guest side
//! ([`guest`], binary `lab-guest`) runs chrooted into the host's root over
//! 9p, binds the devices to vfio-pci, runs the registered cases and streams
//! results over the serial console in the [`protocol`]. After the VM exits
//! the host checks the blk images against the [`pattern`] it wrote.
//!
//! Run it all with `integration/run` (as root).

pub mod guest;
pub mod host;
pub mod manifest;
pub mod pattern;
pub mod protocol;
pub mod stream;
