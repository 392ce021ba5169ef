//! The host sandbox backend: the agent as a host process in the pod's
//! namespaces (its own PID namespace unless the pod is hostPID).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Exposed, Rollback, SandboxBackend, SandboxError, StartSpec, Started, Step};
use crate::agent_client::{self, AgentAddr};
use crate::cri::image::ResolvedImage;
use crate::cri::store::MountRecord;
use crate::process::{Proc, SpawnError, spawn_detached};

/// How long a new host agent has to answer Health.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A host pod: its agent process and socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostState {
    pub agent: Option<Proc>,
    pub socket: PathBuf,
}

impl SandboxBackend for HostState {
    async fn start(
        spec: &StartSpec<'_>,
        undo: &mut Rollback,
    ) -> Result<(Self, Started), SandboxError> {
        let socket = spec.sockets.join("agent.sock");
        let pid = spawn_agent(&AgentLaunch {
            binary: spec.agent_binary,
            socket: &socket,
            state_dir: &spec.dir.join("agent"),
            cgroup_parent: spec.cgroup_parent,
            netns: spec.netns,
            log: &spec.dir.join("agent.log"),
            host_pid: spec.host_pid,
            host_ipc: spec.host_ipc,
        })?;
        let agent = Proc::of(pid);
        // The agent's containers live in the pod's cgroups: undo those
        // after the agent (steps run newest first).
        undo.push(Step::RemoveCgroups {
            parent: spec.cgroup_parent.to_string(),
        });
        if let Some(process) = agent {
            undo.push(Step::End { process });
        }
        let state = HostState { agent, socket };
        let client = agent_client::connect_ready(&state.agent_addr(), AGENT_READY_TIMEOUT)
            .await
            .map_err(SandboxError::AgentUnreachable)?;
        Ok((
            state,
            Started {
                agent: client,
                interfaces: Vec::new(),
            },
        ))
    }

    fn agent_addr(&self) -> AgentAddr {
        AgentAddr::Unix(self.socket.clone())
    }

    fn vital(&self) -> Vec<Proc> {
        self.agent.into_iter().collect()
    }

    fn processes(&self) -> Vec<Proc> {
        self.vital()
    }

    async fn stop(&self, _dir: &Path, grace: Duration) -> Result<(), SandboxError> {
        if let Some(agent) = self.agent {
            agent.end(grace).await;
        }
        Ok(())
    }

    async fn expose(
        &mut self,
        _dir: &Path,
        _container_id: &str,
        image: &ResolvedImage,
        mounts: &[MountRecord],
        scratch: Option<&Path>,
        _in_use: &BTreeSet<String>,
    ) -> Result<Exposed, SandboxError> {
        // The agent shares the node's filesystem: it stages each mount
        // itself, from the node's mount namespace.
        Ok(Exposed {
            rootfs_source: image.erofs_path.display().to_string(),
            mount_sources: mounts.iter().map(|m| m.host_path.clone()).collect(),
            scratch_source: scratch.map(|p| p.display().to_string()).unwrap_or_default(),
        })
    }

    fn withdraw(&self, _dir: &Path, _container_id: &str) -> Result<(), SandboxError> {
        Ok(())
    }

    async fn release_images(&mut self, _in_use: &BTreeSet<String>) {}
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
pub fn spawn_agent(launch: &AgentLaunch<'_>) -> Result<i32, SpawnError> {
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
) -> Result<i32, SpawnError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let binary = PathBuf::from(cmd.get_program());
    let err = |source| SpawnError {
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
