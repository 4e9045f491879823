//! PCI functions and vhost-vdpa nodes as sysfs shows them.
