//! An emulated modern virtio-pci device, in process.
