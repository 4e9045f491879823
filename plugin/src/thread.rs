//! The bridge's threads (relay, removal watch, orphan): each waits on
//! eventfds with epoll until told to stop, after a hook the VMM gives has
//! confined it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{io, Error, Result};
use crate::interrupt::{ThreadHook, ThreadRole};

const TOKEN_STOP: u64 = u64::MAX;

/// How often a waiting thread looks at its stop flag when nothing wakes
/// it (the stop eventfd normally does at once).
const STOP_POLL_MS: i32 = 250;

/// A thread that waits on eventfds with epoll until told to stop, as the
/// relay does.
pub(crate) struct Stopper {
    fd: EventFd,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Stopper {
    /// An epoll set holding `fds` (tokens 0..) and a stop eventfd.
    pub fn epoll(fds: &[&EventFd]) -> Result<(Epoll, Stopper)> {
        let epoll = Epoll::new().map_err(io("epoll_create"))?;
        let fd = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        let add = |raw: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    raw,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io("epoll_ctl"))
        };
        add(fd.as_raw_fd(), TOKEN_STOP)?;
        for (i, f) in fds.iter().enumerate() {
            add(f.as_raw_fd(), i as u64)?;
        }
        Ok((
            epoll,
            Stopper {
                fd,
                stopping: Arc::new(AtomicBool::new(false)),
                thread: None,
            },
        ))
    }

    /// Start `body` in a thread named `name`, after `hook` (role `role`)
    /// accepted it; the hook's refusal is returned here, and no thread is
    /// left then.
    pub fn spawn<F>(
        mut self,
        name: String,
        role: ThreadRole,
        hook: Option<ThreadHook>,
        body: F,
        epoll: Epoll,
    ) -> Result<Stopper>
    where
        F: FnOnce(Epoll, &AtomicBool) + Send + 'static,
    {
        let flag = Arc::clone(&self.stopping);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let ready = hook.map_or(Ok(()), |h| h(role));
                let go = ready.is_ok();
                // The receiver waits for this; it cannot be gone.
                let _ = ready_tx.send(ready);
                if go {
                    body(epoll, &flag);
                }
            })
            .map_err(io("spawn thread"))?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err("the thread ended before it was ready".into()));
        if let Err(reason) = ready {
            if thread.join().is_err() {
                log::error!("{role:?} thread panicked");
            }
            return Err(Error::ThreadSetup { role, reason });
        }
        self.thread = Some(thread);
        Ok(self)
    }

    /// Stop and join the thread. The stop flag ends it within
    /// `STOP_POLL_MS` even when the wake-up write fails, so no thread is
    /// ever left behind.
    pub fn stop(&mut self) {
        self.request_stop(true);
    }

    /// Whether the thread was stopped (or never started).
    #[cfg(test)]
    pub fn is_stopped(&self) -> bool {
        self.thread.is_none()
    }

    /// [`Stopper::stop`], with the wake-up write left out when `!wake` (as
    /// if it failed: tests).
    pub(crate) fn request_stop(&mut self, wake: bool) {
        if let Some(t) = self.thread.take() {
            self.stopping.store(true, Ordering::Release);
            if wake {
                if let Err(e) = self.fd.write(1) {
                    log::warn!("cannot wake a thread ({e}); it stops at its next poll");
                }
            }
            if t.join().is_err() {
                log::error!("a bridge thread panicked");
            }
        }
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait on `epoll` until the stop token or flag; call `on(i)` for event
/// token `i`.
pub(crate) fn wait_loop(epoll: &Epoll, stopping: &AtomicBool, mut on: impl FnMut(usize)) {
    let mut events = [EpollEvent::default(); 16];
    loop {
        if stopping.load(Ordering::Acquire) {
            return;
        }
        let n = match epoll.wait(STOP_POLL_MS, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("epoll_wait failed, thread stops: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return,
                i => on(usize::try_from(i).unwrap_or(usize::MAX)),
            }
        }
    }
}
