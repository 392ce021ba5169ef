//! Host processes the daemon starts and ends: VMMs, QEMU and its helpers,
//! host agents, log pumps. Each runs in its own session (it outlives a
//! daemon restart) and is named by its PID *and* start time, so a PID the
//! kernel reused is never taken for, or signalled as, ours.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    mut cmd: std::process::Command,
    netns: Option<&Path>,
    log: &Path,
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
    let in_child = move || -> std::io::Result<()> {
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
    // (setns, setsid) and allocates nothing.
    unsafe { cmd.pre_exec(in_child) };
    let child = cmd.spawn().map_err(err)?;
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
