//! The agent's children: one SIGCHLD reaper for every child and orphan
//! (containers end up as the agent's children, see `container::helper`),
//! whose exit statuses reach waiters through a table keyed by PID; and
//! async reads and writes on the pipes and terminals of their stdio.
//!
//! Nothing else in the agent may wait for children: std's and tokio's
//! process handles would race this reaper for the statuses.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal when killed.
    pub code: i32,
    /// The signal that killed it; 0 when it exited.
    pub signal: u32,
    /// Unix nanoseconds.
    pub at: i64,
}

/// Exits of PIDs nobody registered yet (a process may exit before its
/// creator registers it). Bounded: the oldest are forgotten.
const MAX_UNCLAIMED: usize = 4096;

/// Exit statuses by PID.
#[derive(Default)]
pub struct ProcessTable {
    inner: Mutex<TableInner>,
}

#[derive(Default)]
struct TableInner {
    watchers: HashMap<i32, watch::Sender<Option<ExitInfo>>>,
    unclaimed: VecDeque<(i32, ExitInfo)>,
}

impl ProcessTable {
    /// Registers a freshly started child. Replaces any earlier entry for a
    /// reused PID; picks up the exit if the child already ended.
    pub fn register(&self, pid: i32) -> watch::Receiver<Option<ExitInfo>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let early = inner
            .unclaimed
            .iter()
            .position(|(p, _)| *p == pid)
            .and_then(|i| inner.unclaimed.remove(i))
            .map(|(_, info)| info);
        let (tx, rx) = watch::channel(early);
        inner.watchers.insert(pid, tx);
        rx
    }

    /// Drops the entry of a process nobody waits for any more.
    pub fn forget(&self, pid: i32) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .watchers
            .remove(&pid);
    }

    fn record(&self, pid: i32, info: ExitInfo) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.watchers.get(&pid) {
            Some(tx) if tx.borrow().is_none() => {
                tx.send_replace(Some(info));
            }
            _ => {
                if inner.unclaimed.len() >= MAX_UNCLAIMED {
                    inner.unclaimed.pop_front();
                }
                inner.unclaimed.push_back((pid, info));
            }
        }
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Reaps every child on SIGCHLD and records its exit. Runs for the agent's
/// lifetime; costs nothing while no child changes state.
pub async fn reap(table: std::sync::Arc<ProcessTable>) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGCHLD, children will not be reaped: {e}");
            return;
        }
    };
    loop {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(pid, code)) => table.record(
                    pid.as_raw(),
                    ExitInfo {
                        code,
                        signal: 0,
                        at: now_nanos(),
                    },
                ),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    let signal = sig as i32 as u32;
                    table.record(
                        pid.as_raw(),
                        ExitInfo {
                            code: 128 + signal as i32,
                            signal,
                            at: now_nanos(),
                        },
                    );
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

/// Waits for a registered process to exit.
pub async fn wait(mut rx: watch::Receiver<Option<ExitInfo>>) -> Option<ExitInfo> {
    rx.wait_for(Option::is_some).await.ok().and_then(|v| *v)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags =
        OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays open, and
    // keeps returning the same number, until the AsyncFd that owns it drops.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Async reads from a pipe or a terminal master.
pub struct FdReader(AsyncFd<OwnedFd>);

impl FdReader {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(FdReader(register(fd)?))
    }

    /// Reads some bytes; 0 at end of stream. A terminal whose other side
    /// closed (EIO) is the end of the stream too.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref().as_fd(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Async writes to a pipe or a terminal master.
pub struct FdWriter(AsyncFd<OwnedFd>);

impl FdWriter {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(FdWriter(register(fd)?))
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_before_registration_are_not_lost() {
        let table = ProcessTable::default();
        let info = ExitInfo {
            code: 3,
            signal: 0,
            at: 1,
        };
        table.record(42, info);
        let rx = table.register(42);
        assert_eq!(*rx.borrow(), Some(info));
    }

    #[test]
    fn a_reused_pid_starts_fresh() {
        let table = ProcessTable::default();
        let old = table.register(7);
        table.record(
            7,
            ExitInfo {
                code: 1,
                signal: 0,
                at: 1,
            },
        );
        assert!(old.borrow().is_some());
        let new = table.register(7);
        assert_eq!(
            *new.borrow(),
            None,
            "a new process with a reused PID has not exited"
        );
        table.record(
            7,
            ExitInfo {
                code: 0,
                signal: 0,
                at: 2,
            },
        );
        assert_eq!(new.borrow().map(|i| i.code), Some(0));
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let table = ProcessTable::default();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            table.record(
                pid,
                ExitInfo {
                    code: 0,
                    signal: 0,
                    at: 0,
                },
            );
        }
        assert_eq!(table.inner.lock().unwrap().unclaimed.len(), MAX_UNCLAIMED);
        assert!(
            table.register(0).borrow().is_none(),
            "the oldest was forgotten"
        );
    }

    #[tokio::test]
    async fn pipes_read_and_write_asynchronously() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let reader = FdReader::new(r).unwrap();
        let writer = FdWriter::new(w).unwrap();
        writer.write_all(b"hello").await.unwrap();
        drop(writer);
        let mut buf = [0u8; 16];
        let n = reader.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(reader.read(&mut buf).await.unwrap(), 0);
    }
}
