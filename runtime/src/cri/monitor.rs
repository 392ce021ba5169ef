//! The sandbox monitor: a pod turns NOTREADY the moment its sandbox's
//! processes die (the host agent; QEMU or the VMM and its vsock backend),
//! not at the next status call.
//!
//! Each ready sandbox gets one task waiting on pidfds of those processes,
//! which become readable when the process exits, whoever its parent is.
//! Pidfds name one process, so a reused PID cannot fool the watch: the
//! recorded start time is checked after the pidfd is opened.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Weak};

use tokio::io::unix::AsyncFd;

use super::store::SandboxState;
use super::{Cri, Sandbox, lock};
use crate::process::Proc;

/// A pidfd for `p`, registered with the reactor, if it is still that
/// process.
fn watch(p: &Proc) -> Option<AsyncFd<OwnedFd>> {
    let fd = p.pidfd()?;
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
        let vital = rec.backend.as_ref().map(|b| b.vital()).unwrap_or_default();
        let mut fds = Vec::new();
        for p in vital {
            match watch(&p) {
                Some(fd) => fds.push((p.pid, fd)),
                None => {
                    // Already gone: the next status call sees it too, but
                    // say it now.
                    self.mark_dead(&sandbox, p.pid);
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
