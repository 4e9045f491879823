//! A VFIO group: `/dev/vfio/N` opened here, or a descriptor of it handed
//! in by an orchestrator ([`Group::adopt`]), and the device fds it gives.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;

use super::{sys, VfioError};

/// An open VFIO group.
#[derive(Debug)]
pub(crate) struct Group {
    file: File,
    /// The device number of its node: the same group, however it was
    /// opened or handed in, has the same one.
    key: u64,
    /// For messages: the group's number, or the descriptor it came as.
    name: String,
}

impl Group {
    fn node(id: u32) -> String {
        format!("/dev/vfio/{id}")
    }

    /// The key ([`Group::key`]) of group `id`, from its node without
    /// opening it; `None` when the node cannot be read.
    pub(crate) fn node_key(id: u32) -> Option<u64> {
        std::fs::metadata(Self::node(id)).ok().map(|m| m.rdev())
    }

    /// Open `/dev/vfio/{id}`.
    pub(crate) fn open(id: u32) -> Result<Group, VfioError> {
        let name = id.to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(Self::node(id))
            .map_err(|source| VfioError::Group {
                group: name.clone(),
                source,
            })?;
        Self::with_file(file, name)
    }

    /// A group descriptor handed in (the group takes `fd`; pass a
    /// duplicate to keep the original), called `name` in messages.
    /// Checked to be a VFIO group by asking its status.
    pub(crate) fn adopt(fd: OwnedFd, name: &str) -> Result<Group, VfioError> {
        let name = name.to_owned();
        let file = File::from(fd);
        sys::group_status(&file).map_err(|source| VfioError::Group {
            group: name.clone(),
            source: if source.raw_os_error() == Some(libc::ENOTTY) {
                io::Error::other("not a VFIO group (/dev/vfio/N)")
            } else {
                source
            },
        })?;
        Self::with_file(file, name)
    }

    fn with_file(file: File, name: String) -> Result<Group, VfioError> {
        let key = file
            .metadata()
            .map_err(|source| VfioError::Group {
                group: name.clone(),
                source,
            })?
            .rdev();
        Ok(Group { file, key, name })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn key(&self) -> u64 {
        self.key
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The device fd of `bdf` (a canonical PCI address): the group must be
    /// in a container with its IOMMU set.
    pub(crate) fn device(&self, bdf: &str) -> Result<File, VfioError> {
        sys::group_device_fd(&self.file, bdf)
            .map(File::from)
            .map_err(|source| VfioError::Device {
                bdf: bdf.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_that_is_not_a_vfio_group_is_refused_clearly() {
        let f = File::open("/dev/null").unwrap();

        let err = Group::adopt(OwnedFd::from(f), "group_fd=5").unwrap_err();

        assert!(
            matches!(&err, VfioError::Group { group, source }
                if group == "group_fd=5" && source.to_string().contains("not a VFIO group")),
            "{err:?}"
        );
    }

    #[test]
    fn a_missing_group_node_names_the_group() {
        let err = Group::open(u32::MAX).unwrap_err();

        assert!(
            matches!(&err, VfioError::Group { group, source }
                if group == &u32::MAX.to_string() && source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
    }
}
