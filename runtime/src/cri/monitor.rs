//! The sandbox monitor: a pod turns NOTREADY the moment its sandbox's
//! processes die (the host agent; QEMU or the VMM and its vsock backend),
//! not at the next status call.
//!
//! Each ready sandbox gets one task waiting on pidfds of those processes,
//! which become readable when the process exits, whoever its parent is.
//! Pidfds name one process, so a reused PID cannot fool the watch: the
//! recorded start time is checked after the pidfd is opened.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Weak};

use tokio::io::unix::AsyncFd;

use super::store::SandboxState;
use super::{Cri, Sandbox, lock};

/// A pidfd for `pid` if it is still the process the record names.
fn pidfd(pid: i32, owned: impl Fn(i32) -> bool) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the syscall just returned this fd; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Checked after opening: if the PID was reused before, this is not ours.
    if !owned(pid) {
        return None;
    }
    // SAFETY: `OwnedFd` holds an open pidfd, moves into the AsyncFd and is
    // closed only when the AsyncFd drops; its raw fd never changes.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

impl Cri {
    /// Watches a ready sandbox until one of its processes ends, then marks
    /// it NOTREADY and drops its agent connection (its containers' exit
    /// watches then report them EXITED with reason Unknown).
    pub(super) fn monitor(self: &Arc<Self>, sandbox: Arc<Sandbox>) {
        let rec = sandbox.rec();
        let pids: Vec<i32> = [rec.agent_pid, rec.vmm_pid, rec.vsock_pid]
            .into_iter()
            .flatten()
            .collect();
        let mut fds = Vec::new();
        for pid in pids {
            match pidfd(pid, |p| rec.owns(p)) {
                Some(fd) => fds.push((pid, fd)),
                None => {
                    // Already gone: the next status call sees it too, but
                    // say it now.
                    self.mark_dead(&sandbox, pid);
                    return;
                }
            }
        }
        if fds.is_empty() {
            return;
        }
        let cri: Weak<Cri> = Arc::downgrade(self);
        tokio::spawn(async move {
            let waits = fds.iter().map(|(pid, fd)| {
                Box::pin(async move {
                    let _ = fd.readable().await;
                    *pid
                })
            });
            let (pid, _, _) = futures_util::future::select_all(waits).await;
            // Stop and remove take this lock and end the processes on
            // purpose; once they are done the state is no longer READY.
            let _op = sandbox.op.lock().await;
            if let Some(cri) = cri.upgrade() {
                cri.mark_dead(&sandbox, pid);
            }
        });
    }

    fn mark_dead(&self, sandbox: &Sandbox, pid: i32) {
        let rec = {
            let mut r = lock(&sandbox.rec);
            if r.state != SandboxState::Ready {
                return;
            }
            r.state = SandboxState::NotReady;
            r.clone()
        };
        lock(&sandbox.agent).take();
        if let Err(e) = self.state.save_sandbox(&rec) {
            tracing::warn!(sandbox = %rec.id, error = %super::error_chain(&e), "saving NOTREADY");
        }
        tracing::warn!(sandbox = %rec.id, pid, "a sandbox process ended: the pod is NOTREADY");
    }
}
