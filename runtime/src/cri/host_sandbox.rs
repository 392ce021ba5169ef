//! The host sandbox backend's host-side pieces: a pod network namespace kept
//! alive by a bind mount (as `ip netns` does, so a restarted daemon finds it
//! again), the agent as a host process inside it, and the teardown of both.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors from the host side of a host sandbox.
#[derive(Debug, thiserror::Error)]
pub enum HostSandboxError {
    #[error("creating the network namespace at {path}: {what}")]
    Netns {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("joining the pod's cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {binary}")]
    SpawnAgent {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates a network namespace with loopback up, bind-mounted on `path`.
pub fn create_netns(path: &Path) -> Result<(), HostSandboxError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |source| HostSandboxError::Netns {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err("creating its directory"))?;
    }
    std::fs::File::create(path).map_err(err("creating the mount point"))?;
    let target = path.to_path_buf();
    // unshare(CLONE_NEWNET) changes only the calling thread: a fresh thread
    // that ends afterwards keeps every other thread in the node's network.
    let result = std::thread::spawn(move || -> Result<(), (&'static str, std::io::Error)> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| ("unshare(CLONE_NEWNET)", e.into()))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| ("bind-mounting the namespace", e.into()))?;
        loopback_up().map_err(|e| ("bringing lo up", e))
    })
    .join()
    .unwrap_or_else(|_| {
        Err((
            "the namespace thread panicked",
            std::io::Error::other("panic"),
        ))
    });
    if let Err((what, source)) = result {
        remove_netns(path);
        return Err(HostSandboxError::Netns {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        });
    }
    Ok(())
}

/// Unmounts and deletes a namespace made by [`create_netns`]; absent is fine.
pub fn remove_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just opened and own from here on.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads ifr_name and writes the flags into req,
    // which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union's flags member is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads req, which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What the agent of one host sandbox runs with.
#[derive(Debug)]
pub struct AgentLaunch<'a> {
    pub binary: &'a Path,
    pub socket: &'a Path,
    pub state_dir: &'a Path,
    pub cgroup_parent: &'a str,
    /// The network namespace to run in; None = the node's.
    pub netns: Option<&'a Path>,
    /// Where the agent's own stdout/stderr go.
    pub log: &'a Path,
    /// hostPID pod: the agent stays in the node's PID namespace. Otherwise
    /// it is PID 1 of a new one, the pod's: containers that share the pod's
    /// PID namespace see only the pod, and all of them die with the agent.
    pub host_pid: bool,
    /// hostIPC pod: the agent stays in the node's IPC namespace.
    pub host_ipc: bool,
}

/// Starts the agent in its own session (it outlives a daemon restart) and
/// returns its PID.
pub fn spawn_agent(launch: &AgentLaunch<'_>) -> Result<i32, HostSandboxError> {
    let mut cmd = std::process::Command::new(launch.binary);
    cmd.arg("--listen")
        .arg(format!("unix:{}", launch.socket.display()))
        .arg("--state-dir")
        .arg(launch.state_dir)
        .arg("--cgroup-parent")
        .arg(launch.cgroup_parent);
    if launch.host_ipc {
        cmd.arg("--host-ipc");
    }
    if launch.host_pid {
        spawn_detached(cmd, launch.netns, launch.log)
    } else {
        spawn_in_new_pid_namespace(&cmd, launch.netns, launch.log)
    }
}

/// The child's side of [`spawn_in_new_pid_namespace`]: joins the network
/// namespace, starts a session, wires stdio and execs; never returns. Only
/// async-signal-safe system calls on values made before the clone.
fn exec_in_child(
    netns_fd: Option<i32>,
    null_fd: i32,
    log_fd: i32,
    argv: &[*const libc::c_char],
) -> ! {
    let fail = |code| {
        // SAFETY: _exit ends this forked child without running anything of
        // the parent's (no destructors, no atexit handlers).
        unsafe { libc::_exit(code) }
    };
    if let Some(fd) = netns_fd {
        // SAFETY: setns takes an fd the parent keeps open across the clone.
        if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
            fail(126);
        }
    }
    // SAFETY: setsid takes no arguments.
    if unsafe { libc::setsid() } < 0 {
        fail(126);
    }
    for (from, to) in [(null_fd, 0), (log_fd, 1), (log_fd, 2)] {
        // SAFETY: dup2 on fds open in this process.
        if unsafe { libc::dup2(from, to) } < 0 {
            fail(126);
        }
    }
    if let Some(&program) = argv.first() {
        // SAFETY: argv is a NULL-terminated array of pointers to
        // NUL-terminated strings that live in this (copied) address space.
        unsafe { libc::execv(program, argv.as_ptr()) };
    }
    fail(127)
}

/// Like [`spawn_detached`], but the program is PID 1 of a new PID
/// namespace. `std::process::Command` cannot ask for that (unshare in
/// pre_exec would put only the program's children there), so this is a
/// raw clone(CLONE_NEWPID) followed by execv, with nothing but
/// async-signal-safe calls in between.
fn spawn_in_new_pid_namespace(
    cmd: &std::process::Command,
    netns: Option<&Path>,
    log: &Path,
) -> Result<i32, HostSandboxError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let binary = PathBuf::from(cmd.get_program());
    let err = |source| HostSandboxError::SpawnAgent {
        binary: binary.clone(),
        source,
    };
    let invalid = || {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an argument holds a NUL byte",
        ))
    };
    // Everything the child needs is made before the clone: it must not
    // allocate (another thread may hold the allocator's lock).
    let mut argv = vec![CString::new(cmd.get_program().as_bytes()).map_err(|_| invalid())?];
    for a in cmd.get_args() {
        argv.push(CString::new(a.as_bytes()).map_err(|_| invalid())?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let netns = match netns {
        Some(p) => Some(std::fs::File::open(p).map_err(err)?),
        None => None,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(err)?;
    let devnull = std::fs::File::open("/dev/null").map_err(err)?;
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let log_fd = log.as_raw_fd();
    let null_fd = devnull.as_raw_fd();
    // SAFETY: clone with no new stack and no CLONE_VM is fork(2) with a
    // new PID namespace: the child gets a copy of this address space and
    // runs on from here with one thread. It only makes async-signal-safe
    // system calls on values prepared above, then execs or _exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if pid == 0 {
        exec_in_child(netns_fd, null_fd, log_fd, &argv_ptrs);
    }
    if pid < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let pid = i32::try_from(pid).map_err(|_| invalid())?;
    // Reaped here while this daemon runs; after a restart init does.
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    });
    Ok(pid)
}

/// Spawns `cmd` in its own session with stdout and stderr appended to
/// `log`, optionally inside a network namespace, and returns its PID. A
/// thread reaps it while this daemon runs; after a restart init does.
pub fn spawn_detached(
    mut cmd: std::process::Command,
    netns: Option<&Path>,
    log: &Path,
) -> Result<i32, HostSandboxError> {
    let binary = PathBuf::from(cmd.get_program());
    let err = |source| HostSandboxError::SpawnAgent {
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

/// Moves host processes of a VM pod (its VMM or QEMU and their helpers)
/// into the pod's cgroup in every hierarchy, so the node's accounting (the
/// kubelet's pod cgroup, when it names one) sees the VM. cpuset cgroups
/// start empty in cgroup v1 and take their parent's CPUs and memory nodes.
pub fn join_cgroups(parent: &str, pids: &[i32]) -> Result<(), HostSandboxError> {
    let rel = parent.trim_start_matches('/');
    let mut roots: Vec<PathBuf> = Vec::new();
    if Path::new("/sys/fs/cgroup/cgroup.procs").exists() {
        roots.push(PathBuf::from("/sys/fs/cgroup")); // cgroup v2 only
    } else if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(
            hierarchies
                .flatten()
                .map(|h| h.path())
                .filter(|h| h.join("cgroup.procs").exists()),
        );
    }
    let err = |path: &Path, e: std::io::Error| HostSandboxError::Cgroup {
        path: path.to_path_buf(),
        source: e,
    };
    for root in roots {
        let dir = root.join(rel);
        // Create level by level so cpuset levels inherit as they appear.
        let mut at = root.clone();
        for part in Path::new(rel).components() {
            at.push(part);
            if at.is_dir() {
                continue;
            }
            std::fs::create_dir(&at).map_err(|e| err(&at, e))?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let own = at.join(file);
                let Some(up) = at.parent().map(|p| p.join(file)) else {
                    continue;
                };
                if own.exists()
                    && std::fs::read_to_string(&own).is_ok_and(|s| s.trim().is_empty())
                    && let Ok(value) = std::fs::read_to_string(&up)
                {
                    std::fs::write(&own, value.trim()).map_err(|e| err(&own, e))?;
                }
            }
        }
        let procs = dir.join("cgroup.procs");
        for pid in pids {
            std::fs::write(&procs, pid.to_string()).map_err(|e| err(&procs, e))?;
        }
    }
    Ok(())
}

/// Kills whatever still runs under a sandbox's cgroup parent, in every
/// hierarchy of the host, and removes the cgroups, deepest first.
pub async fn remove_cgroups(parent: &str) {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            collect_dirs(&h.path().join(parent.trim_start_matches('/')), &mut dirs);
        }
    }
    // cgroup v2 mounted directly on /sys/fs/cgroup.
    collect_dirs(
        &Path::new("/sys/fs/cgroup").join(parent.trim_start_matches('/')),
        &mut dirs,
    );
    for dir in &dirs {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.dedup();
    for _ in 0..50 {
        dirs.retain(|d| std::fs::remove_dir(d).is_err() && d.exists());
        if dirs.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(?dirs, "cgroups left behind");
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
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
