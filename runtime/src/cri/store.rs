//! Sandbox and container records, in memory and persisted as one JSON file
//! per object under the state dir, so a restarted daemon re-adopts its pods:
//!
//! ```text
//! <state_dir>/sandboxes/<sandbox id>/sandbox.json
//! <state_dir>/sandboxes/<sandbox id>/containers/<container id>.json
//! ```
//!
//! Files are written to a temporary name and renamed: a crash leaves the old
//! or the new record, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors from the state dir.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding the record for {0}")]
    Encode(String, #[source] serde_json::Error),
}

/// A pod sandbox's life:
///
/// ```text
///   RunPodSandbox ──► READY ──StopPodSandbox / agent gone──► NOTREADY
///                                                                │
///                                          RemovePodSandbox ◄────┘ (record deleted)
/// ```
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum SandboxState {
    Ready,
    NotReady,
}

/// Everything the daemon knows about a sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The handler the pod asked for ("" = default) and the one that ran it.
    pub runtime_handler: String,
    pub resolved_handler: String,
    pub state: SandboxState,
    /// Unix nanoseconds.
    pub created_at: i64,
    pub log_directory: String,
    pub hostname: String,
    /// The host agent's process ID (host backend).
    pub agent_pid: Option<i32>,
    /// The agent's unix socket (host backend).
    pub agent_socket: PathBuf,
    /// The bind-mounted network namespace; None = the node's network.
    pub netns: Option<PathBuf>,
    /// The agent's cgroup parent (host backend).
    pub cgroup_parent: String,
    pub host_network: bool,
    /// CRI NamespaceMode values (POD=0, CONTAINER=1, NODE=2).
    pub pid_mode: i32,
    pub ipc_mode: i32,
    /// "host" or "vm".
    #[serde(default)]
    pub backend: String,
    /// VM backend: the VMM (QEMU) and vhost-device-vsock processes.
    #[serde(default)]
    pub vmm_pid: Option<i32>,
    #[serde(default)]
    pub vsock_pid: Option<i32>,
    /// VM backend: the pod's virtiofsd (volumes and late images).
    #[serde(default)]
    pub virtiofsd_pid: Option<i32>,
    /// VM backend: image ID → the serial of its disk in the guest.
    #[serde(default)]
    pub image_disks: BTreeMap<String, String>,
    /// PID → its start time, so a PID reused by another process (after the
    /// sandbox died while vmpod was down, or a reboot) is never taken for,
    /// or killed as, the sandbox's.
    #[serde(default)]
    pub pid_starts: BTreeMap<String, u64>,
    /// The pod's CNI attachment: what DEL needs, even after a restart and
    /// a change of the config files. None = loopback only (or torn down).
    #[serde(default)]
    pub cni: Option<crate::network::cni::Attachment>,
    /// VM pods on a CNI network: the tap device in the pod's netns.
    #[serde(default)]
    pub tap: Option<String>,
    /// The pod's hostPort mappings, for CNI's `portMappings` capability.
    #[serde(default)]
    pub port_mappings: Vec<crate::network::cni::PortMapping>,
}

impl SandboxRecord {
    /// Whether this sandbox runs in a VM.
    pub fn is_vm(&self) -> bool {
        self.backend == "vm"
    }

    /// Where its agent listens: the host agent's socket, or the VM's
    /// hybrid-vsock socket (`agent_socket` holds it for VMs).
    pub fn agent_addr(&self) -> crate::agent_client::AgentAddr {
        if self.is_vm() {
            crate::agent_client::AgentAddr::HybridVsock {
                uds: self.agent_socket.clone(),
                port: vmpod_proto::AGENT_VSOCK_PORT,
            }
        } else {
            crate::agent_client::AgentAddr::Unix(self.agent_socket.clone())
        }
    }

    /// The process whose life is the sandbox's: the VMM or the host agent.
    pub fn main_pid(&self) -> Option<i32> {
        if self.is_vm() {
            self.vmm_pid
        } else {
            self.agent_pid
        }
    }

    /// Remembers who `pid` is.
    pub fn note_pid(&mut self, pid: i32) {
        if let Some(start) = crate::process::start_time(pid) {
            self.pid_starts.insert(pid.to_string(), start);
        }
    }

    /// Whether `pid` is still the process this sandbox started.
    pub fn owns(&self, pid: i32) -> bool {
        match self.pid_starts.get(&pid.to_string()) {
            Some(&start) => crate::process::same_process(pid, start),
            None => false,
        }
    }

    /// Whether the sandbox's main process still runs.
    pub fn main_alive(&self) -> bool {
        self.main_pid().is_some_and(|p| self.owns(p))
    }
}

/// A container's life:
///
/// ```text
///   CreateContainer ──► CREATED ──StartContainer──► RUNNING ──process exits──► EXITED
///                          │                                                    │
///                          └──────────────── RemoveContainer ◄──────────────────┘
/// ```
/// (RemoveContainer of a RUNNING container kills it first.)
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// A mount as the kubelet asked for it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    /// The CRI MountPropagation value (0 private, 1 host-to-container,
    /// 2 bidirectional).
    #[serde(default)]
    pub propagation: i32,
}

/// Everything the daemon knows about a container.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    pub name: String,
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The image as the kubelet named it, and the resolved ID.
    pub image: String,
    pub image_id: String,
    pub state: ContainerState,
    /// Unix nanoseconds; 0 = not yet.
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// The absolute log file ("" = no log).
    pub log_path: String,
    pub mounts: Vec<MountRecord>,
    /// The `vmpod log-pump` process of the running container and its
    /// start time.
    #[serde(default)]
    pub log_pump: Option<(i32, u64)>,
    /// What execs in this container inherit: env, working dir, user.
    #[serde(default)]
    pub exec_base: ExecBase,
    /// The signal StopContainer sends first (the image's StopSignal);
    /// 0 = SIGTERM.
    #[serde(default)]
    pub stop_signal: i32,
    /// The container's stdio settings, for Attach.
    #[serde(default)]
    pub stdio: StdioConfig,
}

/// How a container's own stdio was asked for (CRI `stdin`, `stdin_once`,
/// `tty`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StdioConfig {
    pub stdin: bool,
    pub stdin_once: bool,
    pub tty: bool,
}

/// The process settings an exec inherits from its container.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecBase {
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: Option<u32>,
    pub username: String,
    pub additional_gids: Vec<u32>,
}

/// The state dir layout.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path) -> StateDir {
        StateDir {
            root: root.to_path_buf(),
        }
    }

    pub fn sandboxes(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// A short directory for a sandbox's unix sockets: socket paths are
    /// limited to 107 bytes, and a 64-digit ID in the path eats most of it.
    pub fn socket_dir(&self, id: &str) -> PathBuf {
        self.root.join("s").join(id.get(..16).unwrap_or(id))
    }

    /// Where a pod's network namespace is bind-mounted: outside its
    /// sandbox dir, whose VM share teardown refuses to run over mounts.
    pub fn netns_path(&self, id: &str) -> PathBuf {
        self.root.join("netns").join(id)
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.sandboxes().join(id)
    }

    fn container_file(&self, sandbox_id: &str, id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id)
            .join("containers")
            .join(format!("{id}.json"))
    }

    pub fn save_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        write_json(&self.sandbox_dir(&rec.id).join("sandbox.json"), rec)
    }

    pub fn save_container(&self, rec: &ContainerRecord) -> Result<(), StoreError> {
        write_json(&self.container_file(&rec.sandbox_id, &rec.id), rec)
    }

    pub fn delete_container(&self, sandbox_id: &str, id: &str) {
        let _ = std::fs::remove_file(self.container_file(sandbox_id, id));
    }

    /// Every readable record; unreadable ones are logged and skipped (a
    /// damaged file must not stop the daemon from serving the others).
    pub fn load(&self) -> Vec<(SandboxRecord, Vec<ContainerRecord>)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.sandboxes()) else {
            return out;
        };
        for e in entries.flatten() {
            let dir = e.path();
            let Some(sandbox) = read_json::<SandboxRecord>(&dir.join("sandbox.json")) else {
                continue;
            };
            let mut containers = Vec::new();
            if let Ok(files) = std::fs::read_dir(dir.join("containers")) {
                for f in files.flatten() {
                    if f.path().extension().is_some_and(|x| x == "json")
                        && let Some(c) = read_json::<ContainerRecord>(&f.path())
                    {
                        containers.push(c);
                    }
                }
            }
            out.push((sandbox, containers));
        }
        out
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable record");
            None
        }
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| StoreError::Encode(path.display().to_string(), e))?;
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        // Data on disk before the rename, the rename on disk before we
        // return: after a crash the record is the old one or the new one.
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    })
}
