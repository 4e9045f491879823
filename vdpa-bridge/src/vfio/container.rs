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
//! vfio-ioctls' `VfioContainer` opens the container and attaches groups
//! (and detaches a group when a device of it is dropped: one function per
//! group, which this wrapper enforces); it does not count mappings: two functions mapping the same
//! guest RAM would collide (`EEXIST`), and the first to unmap would take
//! the mapping from the other. Hence this wrapper, which holds each mapping
//! once per function that asked for it and lets the kernel see the first
//! map and the last unmap only. It also places a function's own memory
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
//! of the container (and vfio-ioctls sets the IOMMU up again with the next
//! group), so the counts are cleared with it.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vfio_ioctls::{VfioContainer, VfioOps};

use super::dma::{Acquire, IovaRanges, Release, SharedMaps};
use super::{layout, sys, vfio_io, VfioError};
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
    container: Arc<VfioContainer>,
    state: Mutex<State>,
}

struct State {
    /// What the kernel reported after the last group attach: type1 narrows
    /// the usable ranges to those of every attached group.
    iova: IovaRanges,
    /// Whether `iova` came from the kernel (not the fallback).
    reported: bool,
    maps: SharedMaps,
    /// The IOMMU groups attached, one function each.
    groups: std::collections::BTreeSet<u32>,
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
            .field("fd", &self.inner.container.as_raw_fd())
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

fn dma_err(op: &'static str) -> impl FnOnce(vfio_ioctls::VfioError) -> PciError {
    move |e| PciError::Io {
        op,
        source: vfio_io(e),
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
        let container =
            VfioContainer::new(None).map_err(|source| VfioError::Container { source })?;
        Ok(SharedContainer {
            inner: Arc::new(Inner {
                container: Arc::new(container),
                state: Mutex::new(State {
                    iova: IovaRanges::new(Vec::new()),
                    reported: false,
                    maps: SharedMaps::default(),
                    groups: std::collections::BTreeSet::new(),
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

    /// The container as vfio-ioctls' device constructor takes it.
    pub(crate) fn ops(&self) -> Arc<dyn VfioOps> {
        self.inner.container.clone()
    }

    /// Reserve `group` for a function about to be opened: `false` when a
    /// function of it is open in the container already.
    pub(crate) fn reserve(&self, group: u32) -> bool {
        self.state().groups.insert(group)
    }

    /// A function's group was attached: read the usable IOVA ranges again
    /// (the new group may have narrowed them).
    pub(crate) fn attached(&self, bdf: &str) {
        let reported = match sys::iommu_info(&*self.inner.container) {
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

    /// The function of `group` was closed (or its open failed): the group
    /// is free again. With the last group gone the kernel has dropped
    /// every mapping, so the counts go too.
    pub(crate) fn detached(&self, group: u32) {
        let mut st = self.state();
        st.groups.remove(&group);
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
        let range = PciError::DmaRange { iova, size };
        let len = usize::try_from(size).map_err(|_| range)?;
        let mut st = self.state();
        let st = &mut *st;
        match st.maps.acquire(&st.iova, iova, size, host) {
            Acquire::Shared => Ok(()),
            Acquire::Refused => Err(PciError::DmaRange { iova, size }),
            Acquire::New => {
                // SAFETY: the caller upholds the mapping contract.
                unsafe {
                    self.inner
                        .container
                        .vfio_dma_map(iova, len, host as *mut u8)
                }
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
        let len = usize::try_from(size).map_err(|_| PciError::DmaRange { iova, size })?;
        // SAFETY: the caller upholds the mapping contract; the window is
        // free (checked under the same lock).
        unsafe {
            self.inner
                .container
                .vfio_dma_map(iova, len, host as *mut u8)
        }
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
                let len = usize::try_from(size).map_err(|_| PciError::DmaRange { iova, size })?;
                self.inner
                    .container
                    .vfio_dma_unmap(iova, len)
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
