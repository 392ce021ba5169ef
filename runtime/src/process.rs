//! Host processes the daemon starts and ends: VMMs, QEMU and its helpers,
//! host agents, log pumps. Each runs in its own session (it outlives a
//! daemon restart) and is named by its PID *and* start time, so a PID the
//! kernel reused is never taken for, or signalled as, ours.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A process could not be started.
#[derive(Debug, thiserror::Error)]
#[error("starting {binary}")]
pub struct SpawnError {
    pub binary: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Spawns `cmd` in its own session with stdout and stderr appended to
/// `log`, optionally inside a network namespace, and returns its PID. A
/// thread reaps it while this daemon runs; after a restart init does.
pub fn spawn_detached(
    cmd: std::process::Command,
    netns: Option<&Path>,
    log: &Path,
) -> Result<i32, SpawnError> {
    spawn_detached_in(cmd, netns, log, &[])
}

/// [`spawn_detached`], the child joining the cgroups whose `cgroup.procs`
/// files are `cgroups` before it runs `cmd` (so whatever it forks at once
/// starts there too).
pub fn spawn_detached_in(
    mut cmd: std::process::Command,
    netns: Option<&Path>,
    log: &Path,
    cgroups: &[PathBuf],
) -> Result<i32, SpawnError> {
    let binary = PathBuf::from(cmd.get_program());
    let err = |source| SpawnError {
        binary: binary.clone(),
        source,
    };
    let netns = match netns {
        Some(p) => Some(std::fs::File::open(p).map_err(err)?),
        None => None,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(err)?;
    let log2 = log.try_clone().map_err(err)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let procs: Vec<std::fs::File> = cgroups
        .iter()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let procs_fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let in_child = move || -> std::io::Result<()> {
        for fd in &procs_fds {
            // "0": the writing process itself.
            // SAFETY: write(2) of one byte from a static buffer to an fd
            // the parent keeps open until spawn returns.
            if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(fd) = netns_fd {
            // SAFETY: setns takes an fd that stays open until spawn returns
            // (the parent holds `netns`) and a constant flag.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: setsid takes no arguments.
        if unsafe { libc::setsid() } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls
    // (write, setns, setsid) and allocates nothing.
    unsafe { cmd.pre_exec(in_child) };
    let child = cmd.spawn().map_err(err)?;
    drop(procs);
    let pid = child.id() as i32;
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(pid)
}

/// Whether a process with this PID exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A process's start time (clock ticks since boot, /proc/PID/stat field
/// 22): with the PID it names one process, even after the PID is reused.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at field 3.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether `pid` is still the process that started at `start`.
pub fn same_process(pid: i32, start: u64) -> bool {
    alive(pid) && start_time(pid) == Some(start)
}

/// Waits up to `timeout` for `pid` to end; SIGKILLs it if it does not.
pub async fn end_process(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if alive(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One process: its PID and its start time, so a PID the kernel reused for
/// another process is never taken for this one. Signals go through a pidfd
/// opened and then checked against the start time, so even a PID reused
/// between the check and the signal is never hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: i32,
    /// Clock ticks since boot (/proc/PID/stat field 22).
    pub start: u64,
}

impl Proc {
    /// The process `pid` is now; None if there is none.
    pub fn of(pid: i32) -> Option<Proc> {
        Some(Proc {
            pid,
            start: start_time(pid)?,
        })
    }

    /// Whether it still runs (not a zombie, not a reused PID).
    pub fn alive(&self) -> bool {
        same_process(self.pid, self.start)
    }

    /// A pidfd for it, if it is still this process.
    pub fn pidfd(&self) -> Option<OwnedFd> {
        // SAFETY: pidfd_open takes a PID and flags and returns a new fd or
        // -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: the syscall just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Checked after opening: a PID reused before the open is not ours.
        self.alive().then_some(fd)
    }

    /// Sends `signal` through a pidfd; false when it is gone (or never was).
    pub fn signal(&self, signal: libc::c_int) -> bool {
        let Some(fd) = self.pidfd() else {
            return false;
        };
        // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }

    /// SIGKILL, without waiting.
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Gives it `grace` to end on its own, then SIGKILLs it, and waits (up
    /// to 5 s) until it is gone.
    pub async fn end(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while self.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.signal(libc::SIGKILL) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A process's resident set (VmRSS), in bytes.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_is_ours_only_with_its_start_time() {
        let me = std::process::id() as i32;
        let start = start_time(me).expect("our own start time");
        assert!(same_process(me, start));
        // The same PID with another start time is a reused PID.
        assert!(!same_process(me, start + 1));
        assert!(!alive(i32::MAX));
    }
}
