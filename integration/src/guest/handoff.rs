//! Starting a process the way an orchestrator starts an unprivileged VMM:
//! it runs as `nobody` (uid and gid 65534) with the descriptors the
//! orchestrator opened for it inherited, a locked-memory limit raised for
//! the pinning of guest RAM, and, optionally, supplementary groups (the
//! `kvm` group grants `/dev/kvm`) and paths it must not see, covered in a
//! mount namespace of its own (a tmpfs over `/sys` and `/dev/vfio` shows
//! it opens nothing there).
//!
//! The setup runs between `fork` and `exec` (`CommandExt::pre_exec`), so
//! it only makes system calls, on values prepared before.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::Context as _;

/// The uid and gid of `nobody`.
pub const NOBODY: u32 = 65534;

/// How the child is started.
#[derive(Clone, Debug)]
pub struct Handoff {
    /// Descriptors the child inherits (their close-on-exec flag cleared).
    pub fds: Vec<RawFd>,
    /// RLIMIT_MEMLOCK (soft and hard) in bytes.
    pub memlock: u64,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Directories covered with an empty tmpfs in the child's own mount
    /// namespace.
    pub hide: Vec<String>,
}

/// The gid of group `name` in `/etc/group`.
///
/// # Errors
///
/// No such group.
pub fn group_id(name: &str) -> anyhow::Result<u32> {
    let groups = std::fs::read_to_string("/etc/group")?;
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name))
                .then(|| f.nth(1).and_then(|g| g.parse().ok()))
                .flatten()
        })
        .with_context(|| format!("no group {name} in /etc/group"))
}

/// A copy of this process's executable that `nobody` can run (the one in
/// the host's tree may sit under directories it cannot enter), on the lab
/// VM's tmpfs.
///
/// # Errors
///
/// The copy failed.
pub fn runnable_self_copy(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::path::Path::new("/tmp/handoff");
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let to = dir.join(name);
    std::fs::copy("/proc/self/exe", &to).context("copy /proc/self/exe")?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
    Ok(to)
}

impl Handoff {
    /// Make `cmd` start its process this way.
    ///
    /// # Errors
    ///
    /// A path to hide holds a NUL byte.
    pub fn apply(&self, cmd: &mut Command) -> anyhow::Result<()> {
        let hide: Vec<CString> = self
            .hide
            .iter()
            .map(|p| CString::new(p.as_str()))
            .collect::<Result<_, _>>()?;
        let root = CString::new("/")?;
        let tmpfs = CString::new("tmpfs")?;
        let fds = self.fds.clone();
        let groups: Vec<libc::gid_t> = self.groups.clone();
        let memlock = self.memlock;
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: the closure runs in the child between fork and exec; it
        // only makes system calls (unshare, mount, setrlimit, setgroups,
        // setgid, setuid, fcntl) on values prepared above, allocates
        // nothing, and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                if !hide.is_empty() {
                    check(libc::unshare(libc::CLONE_NEWNS))?;
                    check(libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ))?;
                    for p in &hide {
                        check(libc::mount(
                            tmpfs.as_ptr(),
                            p.as_ptr(),
                            tmpfs.as_ptr(),
                            0,
                            std::ptr::null(),
                        ))?;
                    }
                }
                let lim = libc::rlimit {
                    rlim_cur: memlock,
                    rlim_max: memlock,
                };
                check(libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim))?;
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setgid(NOBODY))?;
                check(libc::setuid(NOBODY))?;
                for &fd in &fds {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    check(flags)?;
                    check(libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// Wait for `child` and collect its output, for at most `limit`; past it
/// the child (started by us, not reaped yet) is killed and this fails.
///
/// # Errors
///
/// The wait failed, or the child outlived `limit`.
pub fn wait_output(
    mut child: std::process::Child,
    limit: std::time::Duration,
) -> anyhow::Result<std::process::Output> {
    use std::io::Read as _;
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let end = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("pid {} still ran after {limit:?}: killed", child.id());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}
