//! What both backends need from the host and no dependency offers safely:
//! the page size (`sysconf`; vm-memory and vmm-sys-util keep theirs
//! private), and a duplicate of a descriptor owned by a wrapper that only
//! implements `AsRawFd` (vhost's `VhostKernVdpa`), so it can back a `File`
//! or a `vm_memory::FileOffset`, or given only by its number (a descriptor
//! an orchestrator handed in).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The host's page size (4096 when `sysconf` cannot tell).
pub fn page_size() -> u64 {
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// A duplicate of the descriptor of `owner` as a [`File`] of its own.
///
/// # Errors
///
/// `dup` failed (no descriptors left).
pub fn dup_file(owner: &impl AsRawFd) -> io::Result<File> {
    // SAFETY: `owner` is borrowed for this call and owns its descriptor,
    // so the descriptor stays open while the borrowed handle lives; the
    // handle does not outlive this function.
    let borrowed = unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) };
    Ok(File::from(borrowed.try_clone_to_owned()?))
}

/// A close-on-exec duplicate of descriptor number `fd` of this process
/// (one handed in by whoever started it), owned by the caller; the
/// original stays open.
///
/// # Errors
///
/// `EBADF` when `fd` is not open (or negative), `EMFILE` when no
/// descriptor is left.
pub fn dup_raw(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_DUPFD_CLOEXEC reads no memory; on a number that is not an
    // open descriptor it fails with EBADF, and it never touches the
    // original, whoever owns it.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_is_a_power_of_two() {
        assert!(page_size().is_power_of_two());
    }

    #[test]
    fn a_duplicate_reads_the_same_file() {
        use std::io::Read as _;
        let f = File::open("/proc/self/stat").unwrap();
        let mut d = dup_file(&f).unwrap();
        let mut s = String::new();
        d.read_to_string(&mut s).unwrap();
        assert_ne!(d.as_raw_fd(), f.as_raw_fd());
        assert!(!s.is_empty());
    }

    #[test]
    fn a_descriptor_given_by_number_is_duplicated_and_a_closed_one_refused() {
        use std::io::Read as _;
        let f = File::open("/proc/self/stat").unwrap();
        let mut d = File::from(dup_raw(f.as_raw_fd()).unwrap());
        let mut s = String::new();
        d.read_to_string(&mut s).unwrap();
        let closed = dup_raw(d.as_raw_fd() + 1000).unwrap_err();

        assert_ne!(d.as_raw_fd(), f.as_raw_fd());
        assert!(!s.is_empty());
        assert_eq!(closed.raw_os_error(), Some(libc::EBADF));
        assert_eq!(dup_raw(-1).unwrap_err().raw_os_error(), Some(libc::EBADF));
    }
}
