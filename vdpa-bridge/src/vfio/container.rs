//! [`SharedContainer`]: one VFIO type1v2 container for every bridged
//! function of a VM.
//!
//! A type1 container pins what is mapped into it and charges the pinned
//! pages to the process's locked memory (VmLck), per container: guest RAM
//! mapped into one container per function is walked, pinned and charged
//! once per function, and a hot-plug maps all of it again. Functions in one
//! container (each still in its own IOMMU group) share one IO page table,
//! so guest RAM is mapped once whatever their number.
//!
//! The container is opened here (`/dev/vfio/vfio`) or handed in by an
//! orchestrator ([`SharedContainer::from_fd`]); groups are attached to it
//! one function each (which this type
//! enforces) and taken out when the function closes. vfio-ioctls'
//! `VfioContainer` could not serve: it opens the node itself, cannot adopt
//! a descriptor, and does not count mappings: two functions mapping the
//! same guest RAM would collide (`EEXIST`), and the first to unmap would
//! take the mapping from the other. This type holds each mapping once per
//! function that asked for it and lets the kernel see the first map and
//! the last unmap only. It also places a function's own memory
//! (shadow rings) where no other function's is
//! ([`SharedContainer::map_top`]).
//!
//! A function behind a vIOMMU needs an address space of its own (the
//! guest programs each device's); it gets a private container, which is a
//! `SharedContainer` with one member.
//!
//! A group is attached once: a second open of a function of an attached
//! group (the same device named twice) is refused, since two drivers of one
//! device would undo each other and the first close would detach the group
//! under the second. When the last group leaves, type1 drops every mapping
//! of the container (and its IOMMU: the next group sets it up again), so the counts are cleared
//! with it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE,
};

use super::dma::{Acquire, IovaRanges, Release, SharedMaps};
use super::group::Group;
use super::{layout, sys, VfioError};
use crate::pci::PciError;
use crate::types::Iova;

/// One VFIO type1v2 container shared by the functions opened into it
/// ([`super::VfioFunction::open_in`]), with counted DMA mappings. Cheap to
/// clone: clones are the same container.
#[derive(Clone)]
pub struct SharedContainer {
    inner: Arc<Inner>,
}

struct Inner {
    file: File,
    /// Whether the container was handed in (for logs).
    handed_in: bool,
    state: Mutex<State>,
}

struct State {
    /// What the kernel reported after the last group attach: type1 narrows
    /// the usable ranges to those of every attached group.
    iova: IovaRanges,
    /// Whether `iova` came from the kernel (not the fallback).
    reported: bool,
    maps: SharedMaps,
    /// The IOMMU groups attached (by the device number of their node), one
    /// function each, with the group's name for messages.
    groups: BTreeMap<u64, String>,
}

/// What a [`SharedContainer`] holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// Functions opened into it and not yet closed.
    pub members: usize,
    /// Mappings the kernel holds (each once, however many functions use it).
    pub mappings: usize,
    /// Bytes those mappings cover: what the container pins.
    pub mapped_bytes: u64,
}

impl std::fmt::Debug for SharedContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedContainer")
            .field("fd", &self.inner.file.as_raw_fd())
            .field("handed_in", &self.inner.handed_in)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Clones are equal: they are the same container.
impl PartialEq for SharedContainer {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for SharedContainer {}

fn dma_err(op: &'static str) -> impl FnOnce(io::Error) -> PciError {
    move |source| PciError::Io { op, source }
}

/// A group attached to a container, for as long as a function of it is
/// open: dropping it (after the function's device fd is closed) takes the
/// group out of the container again, so a group fd that was handed in can
/// be used again (a reboot of the VM reopens its devices).
pub(crate) struct Membership {
    group: Group,
    container: SharedContainer,
}

impl Membership {
    pub(crate) fn group(&self) -> &Group {
        &self.group
    }

    pub(crate) fn container(&self) -> &SharedContainer {
        &self.container
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.container.detach(&self.group);
    }
}

impl SharedContainer {
    /// Open `/dev/vfio/vfio` as a type1v2 container with no group yet.
    ///
    /// # Errors
    ///
    /// [`VfioError::Container`] when the node cannot be opened or lacks
    /// type1v2.
    pub fn new() -> Result<Self, VfioError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")
            .map_err(|source| VfioError::Container {
                what: "cannot open /dev/vfio/vfio",
                source,
            })?;
        Self::with_file(file, false)
    }

    /// A container an orchestrator opened (`/dev/vfio/vfio`) and handed
    /// in, with no group attached yet; the container takes `fd` (pass a
    /// duplicate to keep the original).
    ///
    /// # Errors
    ///
    /// [`VfioError::Container`] when `fd` is not a VFIO container of this
    /// API version or cannot be type1v2.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, VfioError> {
        Self::with_file(File::from(fd), true)
    }

    fn with_file(file: File, handed_in: bool) -> Result<Self, VfioError> {
        let err = |what| move |source| VfioError::Container { what, source };
        let version =
            sys::api_version(&file).map_err(err("VFIO_GET_API_VERSION (not a VFIO container?)"))?;
        if version != VFIO_API_VERSION {
            return Err(VfioError::Container {
                what: "unknown VFIO API version",
                source: io::Error::other(format!("version {version}")),
            });
        }
        if !sys::has_type1v2(&file).map_err(err("VFIO_CHECK_EXTENSION"))? {
            return Err(VfioError::Container {
                what: "no type1v2 IOMMU",
                source: io::Error::from_raw_os_error(libc::ENODEV),
            });
        }
        Ok(SharedContainer {
            inner: Arc::new(Inner {
                file,
                handed_in,
                state: Mutex::new(State {
                    iova: IovaRanges::new(Vec::new()),
                    reported: false,
                    maps: SharedMaps::default(),
                    groups: BTreeMap::new(),
                }),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Attach `group` for the function `bdf` about to be opened: refused
    /// when a function of it is open in the container already
    /// ([`VfioError::GroupBusy`]), when it is not viable (a device of it is
    /// bound to another driver), or when it comes attached to a container
    /// already. The first group sets the container's IOMMU up.
    pub(crate) fn attach(&self, group: Group, bdf: &str) -> Result<Membership, VfioError> {
        let mut st = self.state();
        if st.groups.contains_key(&group.key()) {
            return Err(VfioError::GroupBusy {
                bdf: bdf.to_owned(),
                group: group.name().to_owned(),
            });
        }
        let gerr = |source| VfioError::Group {
            group: group.name().to_owned(),
            source,
        };
        let status = sys::group_status(group.file()).map_err(gerr)?;
        if status & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::GroupNotViable {
                group: group.name().to_owned(),
            });
        }
        if status & VFIO_GROUP_FLAGS_CONTAINER_SET != 0 {
            return Err(VfioError::GroupAttached {
                group: group.name().to_owned(),
            });
        }
        sys::group_set_container(group.file(), &self.inner.file).map_err(gerr)?;
        if st.groups.is_empty() {
            if let Err(source) = sys::set_iommu_type1v2(&self.inner.file) {
                let _ = sys::group_unset_container(group.file());
                return Err(VfioError::Container {
                    what: "VFIO_SET_IOMMU (a container handed in must have no group yet)",
                    source,
                });
            }
        }
        st.groups.insert(group.key(), group.name().to_owned());
        drop(st);
        self.read_iova(bdf);
        Ok(Membership {
            group,
            container: self.clone(),
        })
    }

    /// Whether the group of that key ([`Group::key`]) is attached.
    pub(crate) fn holds_group(&self, key: u64) -> bool {
        self.state().groups.contains_key(&key)
    }

    /// A group was attached: read the usable IOVA ranges again (the new
    /// group may have narrowed them).
    fn read_iova(&self, bdf: &str) {
        let reported = match sys::iommu_info(&self.inner.file) {
            Ok(bytes) => layout::parse_iova_ranges(&bytes),
            Err(e) => {
                log::warn!("{bdf}: VFIO_IOMMU_GET_INFO failed: {e}");
                None
            }
        };
        let mut st = self.state();
        match reported {
            Some(r) => {
                st.iova = IovaRanges::new(r);
                st.reported = true;
            }
            None if !st.reported => log::warn!(
                "{bdf}: IOMMU reports no IOVA ranges; assuming {:#x}..={:#x}",
                IovaRanges::FALLBACK.first,
                IovaRanges::FALLBACK.last
            ),
            None => {}
        }
    }

    /// The function of `group` was closed (its device fd first): take the
    /// group out. With the last group gone the kernel has dropped every
    /// mapping, so the counts go too.
    fn detach(&self, group: &Group) {
        let mut st = self.state();
        if let Err(e) = sys::group_unset_container(group.file()) {
            log::warn!(
                "VFIO group {}: VFIO_GROUP_UNSET_CONTAINER failed: {e}; it stays in the container \
                 until every descriptor of it is closed (a group handed in cannot be used again \
                 before)",
                group.name()
            );
        }
        st.groups.remove(&group.key());
        if st.groups.is_empty() {
            let (n, bytes) = st.maps.totals();
            if n > 0 {
                log::warn!(
                    "VFIO container: {n} mapping(s) ({bytes:#x} bytes) left when its last group \
                     went (unmaps the kernel refused); type1 dropped them with the group"
                );
            }
            st.maps = SharedMaps::default();
            st.reported = false;
            st.iova = IovaRanges::new(Vec::new());
        }
    }

    /// The IOVA ranges every mapping must lie in.
    pub(crate) fn iova(&self) -> IovaRanges {
        self.state().iova.clone()
    }

    /// Take a reference to the mapping `[iova, iova + size)` → `host`:
    /// mapped by the kernel if no function holds it yet, shared if one
    /// holds exactly that.
    ///
    /// # Safety
    ///
    /// [`crate::PciFunction::dma_map`]'s contract, until the matching
    /// [`Self::unmap`].
    pub(crate) unsafe fn map(&self, iova: u64, size: u64, host: usize) -> Result<(), PciError> {
        let mut st = self.state();
        let st = &mut *st;
        match st.maps.acquire(&st.iova, iova, size, host) {
            Acquire::Shared => Ok(()),
            Acquire::Refused => Err(PciError::DmaRange { iova, size }),
            Acquire::New => {
                // SAFETY: the caller upholds the mapping contract.
                unsafe { sys::map_dma(&self.inner.file, iova, size, host as u64) }
                    .map_err(dma_err("VFIO_IOMMU_MAP_DMA"))?;
                st.maps.insert(iova, size, host);
                Ok(())
            }
        }
    }

    /// Map `size` bytes at `host` at the highest free IOVA at or above
    /// `floor`, aligned to `align`, and hold it once.
    ///
    /// # Safety
    ///
    /// As [`Self::map`].
    pub(crate) unsafe fn map_top(
        &self,
        size: u64,
        host: usize,
        align: u64,
        floor: u64,
    ) -> Result<Iova, PciError> {
        let mut st = self.state();
        let st = &mut *st;
        let iova = st
            .maps
            .highest_free(&st.iova, size, align, floor)
            .ok_or(PciError::DmaRange { iova: floor, size })?;
        // SAFETY: the caller upholds the mapping contract; the window is
        // free (checked under the same lock).
        unsafe { sys::map_dma(&self.inner.file, iova, size, host as u64) }
            .map_err(dma_err("VFIO_IOMMU_MAP_DMA"))?;
        st.maps.insert(iova, size, host);
        Ok(Iova(iova))
    }

    /// Drop a reference taken by [`Self::map`] or [`Self::map_top`]; the
    /// kernel unmaps with the last one.
    pub(crate) fn unmap(&self, iova: u64, size: u64) -> Result<(), PciError> {
        let mut st = self.state();
        match st.maps.release(iova, size) {
            Release::Shared => Ok(()),
            Release::Unknown => Err(PciError::DmaRange { iova, size }),
            Release::Last => {
                sys::unmap_dma(&self.inner.file, iova, size)
                    .map_err(dma_err("VFIO_IOMMU_UNMAP_DMA"))?;
                st.maps.remove(iova);
                Ok(())
            }
        }
    }

    /// Members, mappings and mapped bytes now.
    pub fn stats(&self) -> ContainerStats {
        let st = self.state();
        let (mappings, mapped_bytes) = st.maps.totals();
        ContainerStats {
            members: st.groups.len(),
            mappings,
            mapped_bytes,
        }
    }
}
