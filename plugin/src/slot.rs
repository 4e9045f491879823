//! [`Slot`]: the backend, shared by the device and its DMA handle until it
//! is released.
//!
//! When the host asks for a device back (an ordered removal), the bridge
//! must let go of it while the VMM still holds the device object (Cloud
//! Hypervisor drops it only when the guest ejects it, which an untrusted
//! guest may never do). Releasing takes the backend out of its slot and
//! drops it, which closes the VFIO device; every later use of the slot
//! gets [`Error::Released`].

use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// The backend, and memory the device may still reach though the bridge
/// is done with it (a DMA unmap the backend refused): freed only after the
/// backend, whose close removes the device's mappings (fields drop in
/// order). In a VFIO container shared with other devices the close drops
/// the device's holds and tries the unmap once more; a mapping the kernel
/// still refuses to remove stays in the container, on pages the kernel
/// keeps pinned (the host stays safe, the pages leak until the VM's last
/// device leaves the container).
pub(crate) struct Slot<B>(Mutex<Option<B>>, Mutex<Vec<Kept>>);

/// Memory whose DMA mapping at `iova` (`len` bytes) the backend refused
/// to remove.
struct Kept {
    iova: u64,
    len: u64,
    _memory: Box<dyn Send>,
}

impl<B> Slot<B> {
    pub fn new(backend: B) -> Self {
        Slot(Mutex::new(Some(backend)), Mutex::new(Vec::new()))
    }

    fn guard(&self) -> MutexGuard<'_, Option<B>> {
        // A panic elsewhere must not wedge the control path.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep `memory`, mapped for the device at `iova` (`len` bytes),
    /// until its unmap succeeds ([`Slot::retry_kept`]) or the slot (and the
    /// backend in it) is dropped.
    pub fn keep(&self, iova: u64, len: u64, memory: Box<dyn Send>) {
        self.1.lock().unwrap_or_else(|p| p.into_inner()).push(Kept {
            iova,
            len,
            _memory: memory,
        });
    }

    /// Run `f` on the backend, unless it was released.
    pub fn with<R>(&self, f: impl FnOnce(&mut B) -> R) -> Result<R> {
        match self.guard().as_mut() {
            Some(b) => Ok(f(b)),
            None => Err(Error::Released),
        }
    }

    /// Take the backend out; every later use fails with
    /// [`Error::Released`].
    pub fn take(&self) -> Option<B> {
        self.guard().take()
    }

    /// Put a backend back (a device taken back after a hand-over).
    pub fn put(&self, backend: B) {
        *self.guard() = Some(backend);
    }

    /// Try the refused unmaps again; memory whose unmap succeeds is freed.
    /// Once the backend is gone its mappings went with it: all is freed.
    pub fn retry_kept(&self)
    where
        B: vdpa_bridge::DmaMapper,
    {
        let backend = self.guard();
        let mut kept = self.1.lock().unwrap_or_else(|p| p.into_inner());
        match backend.as_ref() {
            None => kept.clear(),
            Some(b) => kept.retain(|k| b.dma_unmap(vdpa_bridge::Iova(k.iova), k.len).is_err()),
        }
    }

    pub fn is_released(&self) -> bool {
        self.guard().is_none()
    }
}
