//! The pod's containers: create, start, exec, stdio, signals, wait, update,
//! stats, remove.
//!
//! ```text
//!   CreateContainer ──► CREATED ──StartContainer──► RUNNING ──(main exits)──► EXITED
//!          │                │                          │                        │
//!          └────────────────┴──────── RemoveContainer ─┴────────────────────────┴──► gone
//! ```
//!
//! Errors map to gRPC codes in exactly one place, `From<ContainerError> for
//! Status`, so NotFound stays NotFound at the kubelet.

pub mod cgroup;
pub mod helper;
pub mod rootfs;
pub mod spec;
pub mod stage;
pub mod user;

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use vmpod_proto::v1::{
    CreateContainerRequest, Process, Resources, StatsResponse, WaitProcessResponse,
};

use crate::process::{self, ExitInfo, FdReader, FdWriter, ProcessTable};

/// How long the libcontainer helper may take to create a container or start
/// a process before it is killed.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long RemoveContainer waits for killed processes to go.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new output reader waits for the current one to let go.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest container or exec ID accepted.
const MAX_ID: usize = 128;
/// Exec'd processes a container may hold at once. Past it, finished ones
/// are forgotten (a caller that never released them gets NotFound later);
/// if all are running, ExecProcess is RESOURCE_EXHAUSTED. An exec probe
/// every 10 s for weeks never grows the agent.
const MAX_EXECS: usize = 256;
/// How long an AttachOutput client may hold up the output before it is
/// dropped (see [`Proc::attach`]).
const ATTACH_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Attach streams per output stream of one process.
const MAX_ATTACH: usize = 16;

/// What went wrong, by the kind the caller sees.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ContainerError> for tonic::Status {
    fn from(e: ContainerError) -> Self {
        match e {
            ContainerError::NotFound(m) => tonic::Status::not_found(m),
            ContainerError::AlreadyExists(m) => tonic::Status::already_exists(m),
            ContainerError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ContainerError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            ContainerError::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            ContainerError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

/// An error with its whole source chain on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

fn internal(context: &str, e: &dyn std::error::Error) -> ContainerError {
    ContainerError::Internal(format!("{context}: {}", chain(e)))
}

/// IDs become paths and cgroup names: a small safe alphabet only.
pub fn validate_id(kind: &str, id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidArgument(format!(
            "invalid {kind} {id:?}: use 1-{MAX_ID} of [A-Za-z0-9_.-]"
        )))
    }
}

/// Pod-level files every container mounts.
#[derive(Debug, Default)]
pub struct SandboxFiles {
    pub hostname: String,
    pub resolv_conf: Option<PathBuf>,
    pub etc_hostname: Option<PathBuf>,
    pub shm: Option<PathBuf>,
}

/// A stdout/stderr slot: one reader at a time. A new reader takes over
/// from the current one (a daemon that restarted cannot hang up its old
/// stream first); the reader that lets go hands back the pipe with any
/// bytes it had not delivered, so nothing is lost between readers.
enum OutputSlot {
    Available { reader: FdReader, pending: Vec<u8> },
    Busy(Arc<tokio::sync::Notify>),
    Finished,
}

/// One process: a container's main process or an exec.
pub struct Proc {
    pid: i32,
    exit: watch::Receiver<Option<ExitInfo>>,
    stdin: tokio::sync::Mutex<Option<FdWriter>>,
    stdout: Mutex<OutputSlot>,
    stderr: Mutex<OutputSlot>,
    /// The terminal master, for resizes.
    tty: Option<OwnedFd>,
    /// AttachOutput streams of stdout and stderr: copies of what is read.
    attached: [Mutex<Vec<tokio::sync::mpsc::Sender<Vec<u8>>>>; 2],
}

impl Proc {
    fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    fn attached(&self, stderr: bool) -> &Mutex<Vec<tokio::sync::mpsc::Sender<Vec<u8>>>> {
        &self.attached[usize::from(stderr)]
    }

    /// Hands a copy of freshly read output to every attached stream; one
    /// that is gone or does not take it within ATTACH_SEND_TIMEOUT is
    /// dropped (its stream ends), so a stuck client cannot stall the
    /// container for longer than that.
    async fn feed_attached(&self, stderr: bool, chunk: &[u8]) {
        let taps = self
            .attached(stderr)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for tap in taps {
            let sent = tokio::time::timeout(ATTACH_SEND_TIMEOUT, tap.send(chunk.to_vec())).await;
            if !matches!(sent, Ok(Ok(()))) {
                self.attached(stderr)
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|t| !t.same_channel(&tap));
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Created,
    Running,
}

/// One container.
pub struct Container {
    dir: PathBuf,
    mounted: rootfs::Mounted,
    cgroup: cgroup::Cgroup,
    state: tokio::sync::Mutex<State>,
    processes: Mutex<HashMap<String, Arc<Proc>>>,
}

/// Every container of the pod.
pub struct Manager {
    state_dir: PathBuf,
    cgroup_parent: String,
    cgroup_mount: PathBuf,
    bounding_caps: u64,
    table: Arc<ProcessTable>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pub sandbox: Mutex<SandboxFiles>,
}

/// The agent ends of a process's stdio, and the child's ends.
struct StdioPlan {
    child: [Stdio; 3],
    stdin: Option<FdWriter>,
    stdout: Option<FdReader>,
    stderr: Option<FdReader>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal("creating a pipe", &e))
}

fn stdio_plan(p: &Process) -> Result<StdioPlan, ContainerError> {
    let wrap = |e: std::io::Error| internal("setting up stdio", &e);
    if p.terminal {
        // The terminal arrives over the console socket; the process's own
        // stdio is the terminal's slave side.
        return Ok(StdioPlan {
            child: [Stdio::null(), Stdio::null(), Stdio::null()],
            stdin: None,
            stdout: None,
            stderr: None,
        });
    }
    let (stdin_child, stdin) = if p.stdin {
        let (r, w) = pipe()?;
        (Stdio::from(r), Some(FdWriter::new(w).map_err(wrap)?))
    } else {
        (Stdio::null(), None)
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok(StdioPlan {
        child: [stdin_child, Stdio::from(out_w), Stdio::from(err_w)],
        stdin,
        stdout: Some(FdReader::new(out_r).map_err(wrap)?),
        stderr: Some(FdReader::new(err_r).map_err(wrap)?),
    })
}

/// Where the console socket of a process in `work` is bound: in `work`
/// unless that path is too long for a unix socket (host agents' state dirs
/// can be deep), then a random name in the temp dir. It is removed once
/// the terminal arrived.
fn console_socket_path(work: &Path) -> Result<PathBuf, ContainerError> {
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    let path = work.join("console.sock");
    // sun_path holds 108 bytes including the NUL.
    if path.as_os_str().as_bytes().len() < 100 {
        return Ok(path);
    }
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| internal("reading /dev/urandom", &e))?;
    let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(std::env::temp_dir().join(format!("vmpod-console-{name}.sock")))
}

/// Receives the terminal master that libcontainer sends over the console
/// socket (SCM_RIGHTS), with a deadline.
async fn receive_terminal(listener: tokio::net::UnixListener) -> Result<OwnedFd, ContainerError> {
    let accept = tokio::time::timeout(HELPER_TIMEOUT, listener.accept())
        .await
        .map_err(|_| ContainerError::Internal("no terminal arrived on the console socket".into()))?
        .map_err(|e| internal("accepting on the console socket", &e))?;
    let stream = accept
        .0
        .into_std()
        .map_err(|e| internal("console socket", &e))?;
    stream
        .set_nonblocking(false)
        .map_err(|e| internal("console socket", &e))?;
    stream
        .set_read_timeout(Some(HELPER_TIMEOUT))
        .map_err(|e| internal("console socket", &e))?;
    tokio::task::spawn_blocking(move || {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::os::fd::FromRawFd;
        let mut name = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| internal("receiving the terminal", &e))?;
        for cmsg in msg
            .cmsgs()
            .map_err(|e| internal("receiving the terminal", &e))?
        {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just installed this descriptor in
                    // our table for us (SCM_RIGHTS); nothing else owns it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(ContainerError::Internal(
            "the console socket message carried no terminal".into(),
        ))
    })
    .await
    .map_err(|e| internal("receiving the terminal", &e))?
}

impl Manager {
    /// A manager keeping its state under `state_dir`.
    pub fn new(state_dir: PathBuf, cgroup_parent: String, table: Arc<ProcessTable>) -> Manager {
        Manager {
            state_dir,
            cgroup_parent,
            cgroup_mount: PathBuf::from("/sys/fs/cgroup"),
            bounding_caps: spec::own_bounding_caps(),
            table,
            containers: Mutex::new(HashMap::new()),
            sandbox: Mutex::new(SandboxFiles::default()),
        }
    }

    fn libcontainer_root(&self) -> PathBuf {
        self.state_dir.join("libcontainer")
    }

    /// The directory for pod-level files (resolv.conf, shm).
    pub fn sandbox_dir(&self) -> PathBuf {
        self.state_dir.join("sandbox")
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("container {id:?} not found")))
    }

    fn proc(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>, ContainerError> {
        let c = self.get(id)?;
        let procs = c.processes.lock().unwrap_or_else(|p| p.into_inner());
        procs.get(exec_id).cloned().ok_or_else(|| {
            if exec_id.is_empty() {
                ContainerError::FailedPrecondition(format!("container {id:?} has no process yet"))
            } else {
                ContainerError::NotFound(format!(
                    "process {exec_id:?} not found in container {id:?}"
                ))
            }
        })
    }

    /// Runs the libcontainer helper; returns the PID it reports.
    async fn run_helper(
        &self,
        work: &Path,
        mut args: Vec<OsString>,
        plan: [Stdio; 3],
    ) -> Result<i32, ContainerError> {
        let pid_file = work.join("helper.pid");
        let error_file = work.join("helper.error");
        let _ = std::fs::remove_file(&pid_file);
        let _ = std::fs::remove_file(&error_file);
        args.extend([
            "--pid-file".into(),
            pid_file.clone().into(),
            "--error-file".into(),
            error_file.clone().into(),
        ]);
        let [stdin, stdout, stderr] = plan;
        let child = std::process::Command::new("/proc/self/exe")
            .arg(helper::HELPER_ARG)
            .args(&args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| internal("starting the libcontainer helper", &e))?;
        let helper_pid = child.id() as i32;
        // The reaper owns every child's status; the std handle must not wait.
        drop(child);
        let exit = self.table.register(helper_pid);
        let outcome = tokio::time::timeout(HELPER_TIMEOUT, process::wait(exit)).await;
        self.table.forget(helper_pid);
        let info = match outcome {
            Ok(Some(info)) => info,
            Ok(None) => {
                return Err(ContainerError::Internal(
                    "lost the libcontainer helper".into(),
                ));
            }
            Err(_) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(helper_pid),
                    nix::sys::signal::SIGKILL,
                );
                return Err(ContainerError::Internal(format!(
                    "libcontainer helper timed out after {HELPER_TIMEOUT:?}"
                )));
            }
        };
        if info.code != 0 {
            let reason = std::fs::read_to_string(&error_file)
                .unwrap_or_else(|_| format!("exit code {}", info.code));
            return Err(ContainerError::Internal(reason));
        }
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        pid.filter(|&p| p > 0)
            .ok_or_else(|| ContainerError::Internal("the helper reported no PID".into()))
    }

    /// Starts a process through the helper with stdio wired up; registers it.
    async fn spawn_process(
        &self,
        work: &Path,
        args: Vec<OsString>,
        p: &Process,
    ) -> Result<Arc<Proc>, ContainerError> {
        let plan = stdio_plan(p)?;
        let console = if p.terminal {
            let path = console_socket_path(work)?;
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|e| internal("console socket", &e))?;
            Some((path, tokio::spawn(receive_terminal(listener))))
        } else {
            None
        };
        let mut args = args;
        if let Some((path, _)) = &console {
            args.extend(["--console-socket".into(), path.clone().into()]);
        }
        let pid = self.run_helper(work, args, plan.child).await;
        let pid = match (pid, &console) {
            (Ok(pid), _) => pid,
            (Err(e), Some((path, task))) => {
                task.abort();
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        };
        let exit = self.table.register(pid);
        let (mut stdin, mut stdout, stderr, tty) = (plan.stdin, plan.stdout, plan.stderr, None);
        let mut tty = tty;
        if let Some((path, task)) = console {
            let master = task
                .await
                .map_err(|e| internal("receiving the terminal", &e))??;
            let _ = std::fs::remove_file(path);
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| internal("terminal", &e));
            let wrap = |e: std::io::Error| internal("terminal", &e);
            stdout = Some(FdReader::new(dup(&master)?).map_err(wrap)?);
            if p.stdin {
                stdin = Some(FdWriter::new(dup(&master)?).map_err(wrap)?);
            }
            tty = Some(master);
        }
        let slot = |r: Option<FdReader>| {
            Mutex::new(
                r.map(|reader| OutputSlot::Available {
                    reader,
                    pending: Vec::new(),
                })
                .unwrap_or(OutputSlot::Finished),
            )
        };
        Ok(Arc::new(Proc {
            pid,
            exit,
            stdin: tokio::sync::Mutex::new(stdin),
            stdout: slot(stdout),
            stderr: slot(stderr),
            tty,
            attached: Default::default(),
        }))
    }

    /// CreateContainer.
    pub async fn create(&self, mut req: CreateContainerRequest) -> Result<(), ContainerError> {
        validate_id("container ID", &req.container_id)?;
        crate::shared_fs::map_sources(&mut req).map_err(|e| match e {
            crate::shared_fs::SharedFsError::NoShare(_) => {
                ContainerError::FailedPrecondition(chain(&e))
            }
            _ => ContainerError::InvalidArgument(chain(&e)),
        })?;
        let id = req.container_id.clone();
        let rootfs_spec = req
            .rootfs
            .clone()
            .ok_or_else(|| ContainerError::InvalidArgument("rootfs is required".into()))?;
        let process = req
            .process
            .clone()
            .ok_or_else(|| ContainerError::InvalidArgument("process is required".into()))?;
        if self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
        {
            return Err(ContainerError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        // create_dir (not _all) is the reservation: of two concurrent
        // creates of one ID, exactly one gets the directory.
        let parent = self.state_dir.join("containers");
        std::fs::create_dir_all(&parent)
            .map_err(|e| internal("creating the containers directory", &e))?;
        let dir = parent.join(&id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ContainerError::AlreadyExists(format!(
                    "container {id:?} already exists"
                )));
            }
            Err(e) => return Err(internal("creating the container directory", &e)),
        }
        let mounted = match rootfs::mount_rootfs(&dir, &rootfs_spec) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(match e {
                    rootfs::RootfsError::BadSource(_) | rootfs::RootfsError::BadFsType(_) => {
                        ContainerError::InvalidArgument(chain(&e))
                    }
                    rootfs::RootfsError::NoSuchSerial(_) => ContainerError::NotFound(chain(&e)),
                    other => internal("mounting the rootfs", &other),
                });
            }
        };
        let cleanup = |mounted: &rootfs::Mounted| {
            mounted.unmount();
            if stage::unstage_all(&dir) {
                let _ = std::fs::remove_dir_all(&dir);
            }
        };
        let result = async {
            // Host agents bind what the node has now (see stage.rs).
            if stage::enabled() {
                let staging = stage::staging_dir(&dir);
                std::fs::create_dir(&staging).map_err(|e| internal("the staging dir", &e))?;
                for (i, m) in req.mounts.iter_mut().enumerate() {
                    if m.r#type == "bind" || m.r#type.is_empty() {
                        let target = staging.join(i.to_string());
                        stage::stage(&self.table, &m.source, &target).await?;
                        m.source = target.display().to_string();
                    }
                }
            }
            let user = process.user.clone().unwrap_or_default();
            let identity = user::resolve(
                &mounted.rootfs,
                &user.username,
                user.uid,
                user.gid,
                &user.additional_gids,
            )
            .map_err(|e| ContainerError::InvalidArgument(e.to_string()))?;
            let spec = {
                let files = self.sandbox.lock().unwrap_or_else(|p| p.into_inner());
                let ctx = spec::SpecContext {
                    cgroup_parent: &self.cgroup_parent,
                    hostname: &files.hostname,
                    resolv_conf: files.resolv_conf.as_deref(),
                    etc_hostname: files.etc_hostname.as_deref(),
                    shm: files.shm.as_deref(),
                    bounding_caps: self.bounding_caps,
                };
                spec::build(&req, &identity, &ctx)
                    .map_err(|e| ContainerError::InvalidArgument(e.to_string()))?
            };
            let bundle = dir.join("bundle");
            let json = serde_json::to_vec_pretty(&spec)
                .map_err(|e| internal("writing config.json", &e))?;
            std::fs::write(bundle.join("config.json"), json)
                .map_err(|e| internal("writing config.json", &e))?;
            std::fs::create_dir_all(self.libcontainer_root())
                .map_err(|e| internal("libcontainer root", &e))?;
            let args: Vec<OsString> = vec![
                "create".into(),
                "--root".into(),
                self.libcontainer_root().into(),
                "--id".into(),
                id.clone().into(),
                "--bundle".into(),
                bundle.into(),
            ];
            self.spawn_process(&dir, args, &process).await
        }
        .await;
        let main = match result {
            Ok(p) => p,
            Err(e) => {
                // A half-created libcontainer state would block the ID.
                self.delete_libcontainer(&id);
                cleanup(&mounted);
                return Err(e);
            }
        };
        let cgroup = cgroup::Cgroup::detect(
            &self.cgroup_mount,
            &format!("{}/{}", self.cgroup_parent.trim_end_matches('/'), id),
        );
        let container = Arc::new(Container {
            dir: dir.clone(),
            mounted,
            cgroup,
            state: tokio::sync::Mutex::new(State::Created),
            processes: Mutex::new(HashMap::from([(String::new(), main)])),
        });
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, container);
        Ok(())
    }

    fn delete_libcontainer(&self, id: &str) {
        let root = self.libcontainer_root().join(id);
        // A create that failed early left no state for libcontainer to load
        // (and it would log an error trying).
        if root.join("state.json").exists() {
            if let Ok(mut c) = libcontainer::container::Container::load(root.clone()) {
                let _ = c.delete(true);
            }
        }
        let _ = std::fs::remove_dir_all(root);
    }

    /// StartContainer: returns the main process's PID.
    pub async fn start(&self, id: &str) -> Result<u32, ContainerError> {
        let c = self.get(id)?;
        let mut state = c.state.lock().await;
        if *state != State::Created {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} was started already"
            )));
        }
        let root = self.libcontainer_root().join(id);
        let mut lc = libcontainer::container::Container::load(root)
            .map_err(|e| internal("loading the container", &e))?;
        lc.start()
            .map_err(|e| internal("starting the container", &e))?;
        *state = State::Running;
        let main = self.proc(id, "")?;
        Ok(main.pid as u32)
    }

    /// ExecProcess.
    pub async fn exec(&self, id: &str, exec_id: &str, p: Process) -> Result<u32, ContainerError> {
        validate_id("exec ID", exec_id)?;
        let c = self.get(id)?;
        let state = c.state.lock().await;
        let main = self.proc(id, "")?;
        if *state != State::Running || main.exited().is_some() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is not running"
            )));
        }
        if c.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(exec_id)
        {
            return Err(ContainerError::AlreadyExists(format!(
                "process {exec_id:?} already exists in {id:?}"
            )));
        }
        self.prune_finished_execs(&c)?;
        let config: serde_json::Value = std::fs::read(c.dir.join("bundle/config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                ContainerError::Internal("the container's config.json is unreadable".into())
            })?;
        let base = &config["process"];
        let user = p.user.clone().unwrap_or_default();
        let identity = if user.username.is_empty() && user.uid == 0 && user.gid.is_none() {
            // No user given: the container's own.
            user::Identity {
                uid: base["user"]["uid"].as_u64().unwrap_or(0) as u32,
                gid: base["user"]["gid"].as_u64().unwrap_or(0) as u32,
                additional_gids: serde_json::from_value(base["user"]["additionalGids"].clone())
                    .unwrap_or_default(),
            }
        } else {
            user::resolve(
                &c.mounted.rootfs,
                &user.username,
                user.uid,
                user.gid,
                &user.additional_gids,
            )
            .map_err(|e| ContainerError::InvalidArgument(e.to_string()))?
        };
        let caps: Vec<String> =
            serde_json::from_value(base["capabilities"]["bounding"].clone()).unwrap_or_default();
        let mut merged = p.clone();
        let mut env: Vec<String> = serde_json::from_value(base["env"].clone()).unwrap_or_default();
        env.extend(p.env.iter().cloned());
        merged.env = env;
        if merged.cwd.is_empty() {
            merged.cwd = base["cwd"].as_str().unwrap_or("/").to_string();
        }
        let process = spec::process(
            &merged,
            &identity,
            &caps,
            base["noNewPrivileges"].as_bool().unwrap_or(false),
            &base["rlimits"],
        )
        .map_err(|e| ContainerError::InvalidArgument(e.to_string()))?;
        let work = c.dir.join("exec").join(exec_id);
        std::fs::create_dir_all(&work).map_err(|e| internal("exec directory", &e))?;
        let process_file = work.join("process.json");
        std::fs::write(&process_file, process.to_string())
            .map_err(|e| internal("writing process.json", &e))?;
        let args: Vec<OsString> = vec![
            "exec".into(),
            "--root".into(),
            self.libcontainer_root().into(),
            "--id".into(),
            id.into(),
            "--process".into(),
            process_file.into(),
        ];
        let proc = self.spawn_process(&work, args, &p).await?;
        let pid = proc.pid as u32;
        c.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(exec_id.to_string(), proc);
        drop(state);
        Ok(pid)
    }

    /// When a container holds MAX_EXECS exec'd processes, forgets the
    /// finished ones; ResourceExhausted if none has finished.
    fn prune_finished_execs(&self, c: &Container) -> Result<(), ContainerError> {
        let finished: Vec<(String, Arc<Proc>)> = {
            let mut procs = c.processes.lock().unwrap_or_else(|p| p.into_inner());
            if procs.len() <= MAX_EXECS {
                return Ok(());
            }
            let ids: Vec<String> = procs
                .iter()
                .filter(|(k, p)| !k.is_empty() && p.exited().is_some())
                .map(|(k, _)| k.clone())
                .collect();
            ids.into_iter()
                .filter_map(|k| procs.remove(&k).map(|p| (k, p)))
                .collect()
        };
        if finished.is_empty() {
            return Err(ContainerError::ResourceExhausted(format!(
                "{MAX_EXECS} processes are running in the container already"
            )));
        }
        for (exec_id, p) in finished {
            self.table.forget(p.pid);
            let _ = std::fs::remove_dir_all(c.dir.join("exec").join(exec_id));
        }
        Ok(())
    }

    /// ReleaseProcess: forgets an exec'd process, killing it if it runs.
    pub async fn release(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        if exec_id.is_empty() {
            return Err(ContainerError::InvalidArgument(
                "the container's own process is released by RemoveContainer".into(),
            ));
        }
        validate_id("exec ID", exec_id)?;
        let c = self.get(id)?;
        let p = c
            .processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(exec_id)
            .ok_or_else(|| {
                ContainerError::NotFound(format!("process {exec_id:?} not found in {id:?}"))
            })?;
        self.end(&p).await;
        let dir = c.dir.join("exec").join(exec_id);
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await
            .ok();
        Ok(())
    }

    /// Kills a process that still runs (waiting, bounded, for its exit)
    /// and drops its entry in the process table.
    async fn end(&self, p: &Proc) {
        if p.exited().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::SIGKILL,
            );
            let _ = tokio::time::timeout(KILL_TIMEOUT, process::wait(p.exit.clone())).await;
        }
        self.table.forget(p.pid);
    }

    /// RemoveContainer: kills whatever runs, then frees everything.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let _state = c.state.lock().await;
        let root = self.libcontainer_root().join(id);
        if let (Ok(mut lc), Ok(kill)) = (
            libcontainer::container::Container::load(root),
            libcontainer::signal::Signal::try_from(libc::SIGKILL),
        ) {
            let _ = lc.kill(kill, true);
        }
        let procs: Vec<Arc<Proc>> = c
            .processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for p in &procs {
            self.end(p).await;
        }
        self.delete_libcontainer(id);
        c.mounted.unmount();
        if stage::unstage_all(&c.dir) {
            let _ = std::fs::remove_dir_all(&c.dir);
        }
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    /// SignalProcess.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32) -> Result<(), ContainerError> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::InvalidArgument(format!("invalid signal {signal}")))?;
        let p = self.proc(id, exec_id)?;
        if p.exited().is_some() {
            return Err(ContainerError::FailedPrecondition(format!(
                "process {exec_id:?} of {id:?} has exited"
            )));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig)
            .map_err(|e| internal("signalling", &e))
    }

    /// WaitProcess: until the process exits (the call's deadline bounds it).
    pub async fn wait(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, ContainerError> {
        let p = self.proc(id, exec_id)?;
        let info = process::wait(p.exit.clone())
            .await
            .ok_or_else(|| ContainerError::Internal("the process table went away".into()))?;
        let c = self.get(id)?;
        // As containerd: a kill by the OOM killer anywhere in the
        // container's cgroup makes it OOMKilled.
        let oom_killed = info.code != 0 && c.cgroup.stats().oom_kills > 0;
        Ok(WaitProcessResponse {
            exit_code: info.code,
            signal: info.signal,
            oom_killed,
            exited_at: info.at,
        })
    }

    /// ReadOutput: a bounded stream of the process's output.
    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<Vec<u8>, ContainerError>>, ContainerError> {
        let p = self.proc(id, exec_id)?;
        fn slot_of(p: &Proc, stderr: bool) -> &Mutex<OutputSlot> {
            if stderr { &p.stderr } else { &p.stdout }
        }
        // Take the pipe over from a current reader, waiting (bounded) for it
        // to let go.
        let deadline = tokio::time::Instant::now() + TAKEOVER_TIMEOUT;
        let taken = loop {
            {
                let mut slot = slot_of(&p, stderr)
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                match std::mem::replace(&mut *slot, OutputSlot::Finished) {
                    OutputSlot::Available { reader, pending } => {
                        let cancel = Arc::new(tokio::sync::Notify::new());
                        *slot = OutputSlot::Busy(cancel.clone());
                        break Some((reader, pending, cancel));
                    }
                    OutputSlot::Finished => break None,
                    OutputSlot::Busy(cancel) => {
                        cancel.notify_one();
                        *slot = OutputSlot::Busy(cancel);
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ContainerError::FailedPrecondition(format!(
                    "the current reader of {id:?}/{exec_id:?} did not let go"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Four chunks in flight at most: a slow reader slows the process.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let Some((reader, pending, cancel)) = taken else {
            return Ok(rx);
        };
        tokio::spawn(async move {
            let give_back = |reader: FdReader, pending: Vec<u8>| {
                *slot_of(&p, stderr)
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = OutputSlot::Available { reader, pending };
            };
            let mut chunk = pending;
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                if !chunk.is_empty() {
                    // Reserve first: no bytes move until the channel has
                    // room, so a takeover never drops them.
                    tokio::select! {
                        permit = tx.reserve() => match permit {
                            Ok(permit) => permit.send(Ok(std::mem::take(&mut chunk))),
                            // The client left: the next reader continues here.
                            Err(_) => return give_back(reader, chunk),
                        },
                        () = cancel.notified() => return give_back(reader, chunk),
                    }
                }
                tokio::select! {
                    read = reader.read(&mut buf) => match read {
                        Ok(0) => break,
                        Ok(n) => {
                            chunk = buf[..n].to_vec();
                            p.feed_attached(stderr, &chunk).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(internal("reading output", &e))).await;
                            break;
                        }
                    },
                    () = cancel.notified() => return give_back(reader, Vec::new()),
                }
            }
            *slot_of(&p, stderr)
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = OutputSlot::Finished;
            // The output ended: so do the attached streams.
            p.attached(stderr)
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        });
        Ok(rx)
    }

    /// AttachOutput: a copy of the output the current reader reads, from
    /// now on; ends with the output.
    pub fn attach_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<tokio::sync::mpsc::Receiver<Vec<u8>>, ContainerError> {
        let p = self.proc(id, exec_id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let slot = if stderr { &p.stderr } else { &p.stdout };
        let finished = matches!(
            *slot.lock().unwrap_or_else(|e| e.into_inner()),
            OutputSlot::Finished
        );
        if !finished {
            let mut taps = p.attached(stderr).lock().unwrap_or_else(|e| e.into_inner());
            taps.retain(|t| !t.is_closed());
            if taps.len() >= MAX_ATTACH {
                return Err(ContainerError::FailedPrecondition(format!(
                    "{id:?}/{exec_id:?} has {MAX_ATTACH} attached streams already"
                )));
            }
            taps.push(tx);
        }
        Ok(rx)
    }

    /// The stdin writer of a process, for WriteStdin.
    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<(), ContainerError> {
        let p = self.proc(id, exec_id)?;
        let stdin = p.stdin.lock().await;
        let writer = stdin.as_ref().ok_or_else(|| {
            ContainerError::FailedPrecondition(format!(
                "stdin of {id:?}/{exec_id:?} is closed or was not requested"
            ))
        })?;
        writer
            .write_all(data)
            .await
            .map_err(|e| internal("writing stdin", &e))
    }

    /// CloseStdin: end of input (EOF on a pipe; ^D on a terminal).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let p = self.proc(id, exec_id)?;
        let mut stdin = p.stdin.lock().await;
        if p.tty.is_some() {
            if let Some(w) = stdin.as_ref() {
                w.write_all(&[4])
                    .await
                    .map_err(|e| internal("writing stdin", &e))?;
            }
        }
        *stdin = None;
        Ok(())
    }

    /// ResizeTty.
    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ContainerError> {
        let p = self.proc(id, exec_id)?;
        let tty = p.tty.as_ref().ok_or_else(|| {
            ContainerError::FailedPrecondition(format!("{id:?}/{exec_id:?} has no terminal"))
        })?;
        let size = libc::winsize {
            ws_row: u16::try_from(rows)
                .map_err(|_| ContainerError::InvalidArgument("rows out of range".into()))?,
            ws_col: u16::try_from(cols)
                .map_err(|_| ContainerError::InvalidArgument("cols out of range".into()))?,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize that lives across the call;
        // `tty` is an open terminal master.
        if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
            return Err(internal(
                "resizing the terminal",
                &std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// UpdateContainer.
    pub fn update(&self, id: &str, r: &Resources) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        c.cgroup
            .update(r)
            .map_err(|e| internal("updating resources", &e))
    }

    /// Stats.
    pub fn stats(&self, id: &str) -> Result<StatsResponse, ContainerError> {
        let c = self.get(id)?;
        let s = c.cgroup.stats();
        let (bytes, inodes) = c
            .mounted
            .rw
            .as_deref()
            .map(|rw| {
                let (bytes, inodes) = rootfs::writable_usage(rw);
                let (b0, i0) = c.mounted.baseline;
                (bytes.saturating_sub(b0), inodes.saturating_sub(i0))
            })
            .unwrap_or((0, 0));
        Ok(StatsResponse {
            timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0),
            cpu_usage_ns: s.cpu_usage_ns,
            memory_working_set_bytes: s.memory_working_set_bytes,
            memory_usage_bytes: s.memory_usage_bytes,
            pids: s.pids,
            writable_bytes_used: bytes,
            writable_inodes_used: inodes,
            oom_kills: s.oom_kills,
        })
    }

    /// Removes every container (Shutdown).
    pub async fn remove_all(&self) {
        let ids: Vec<String> = self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            let _ = self.remove(&id).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_restricted_to_a_safe_alphabet() {
        for good in ["a", "c-1_2.x", &"x".repeat(MAX_ID)] {
            assert!(validate_id("id", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "sp ace",
            &"x".repeat(MAX_ID + 1),
            "nul\0",
        ] {
            assert!(
                matches!(
                    validate_id("id", bad),
                    Err(ContainerError::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn error_kinds_survive_as_grpc_codes() {
        let code = |e| tonic::Status::from(e).code();
        assert_eq!(
            code(ContainerError::NotFound("x".into())),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(ContainerError::AlreadyExists("x".into())),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            code(ContainerError::InvalidArgument("x".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(ContainerError::FailedPrecondition("x".into())),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(ContainerError::Internal("x".into())),
            tonic::Code::Internal
        );
    }
}
