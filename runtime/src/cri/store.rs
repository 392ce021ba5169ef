//! Sandbox and container records, in memory and persisted as one JSON file
//! per object under the state dir, so a restarted daemon re-adopts its pods:
//!
//! ```text
//! <state_dir>/sandboxes/<sandbox id>/sandbox.json
//! <state_dir>/sandboxes/<sandbox id>/containers/<container id>.json
//! ```
//!
//! Files are written to a temporary name, fsynced, renamed and the dir
//! fsynced: a crash leaves the old or the new record, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::agent_client::AgentAddr;
use crate::process::Proc;
use crate::sandbox::host::HostState;
use crate::sandbox::qemu::QemuState;
use crate::sandbox::vmm::{self, VmmState};
use crate::sandbox::{BackendState, Step};

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
///   RunPodSandbox ──► CREATING ──► READY ──StopPodSandbox / a sandbox process ended──► NOTREADY
///                        │                                                              │
///                        ├─ failed, undone ──► (record deleted)       RemovePodSandbox ◄┘ (record deleted)
///                        └─ an undo step failed, or the daemon died ──► UNKNOWN ──reaper / RemovePodSandbox──► (deleted)
/// ```
///
/// CREATING and UNKNOWN records carry the undo steps still to do. The CRI
/// lists UNKNOWN sandboxes as NOTREADY; CREATING ones are not listed.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum SandboxState {
    Creating,
    Ready,
    NotReady,
    Unknown,
}

/// Everything the daemon knows about a sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "SandboxRecordOnDisk")]
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
    /// The bind-mounted network namespace; None = the node's network.
    pub netns: Option<PathBuf>,
    /// The pod's cgroup (`<kubelet's parent>/<id>`).
    pub cgroup_parent: String,
    pub host_network: bool,
    /// CRI NamespaceMode values (POD=0, CONTAINER=1, NODE=2).
    pub pid_mode: i32,
    pub ipc_mode: i32,
    /// What its backend started and needs to find again; None until the
    /// backend started (CREATING).
    pub backend: Option<BackendState>,
    /// The pod's CNI attachment: what DEL needs, even after a restart and
    /// a change of the config files. None = loopback only (or torn down).
    pub cni: Option<crate::network::cni::Attachment>,
    /// The pod's hostPort mappings, for CNI's `portMappings` capability.
    pub port_mappings: Vec<crate::network::cni::PortMapping>,
    /// CREATING / UNKNOWN: the undo steps still to do, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undo: Vec<Step>,
}

impl SandboxRecord {
    /// Whether this sandbox runs in a VM.
    pub fn is_vm(&self) -> bool {
        self.backend.as_ref().is_some_and(BackendState::is_vm)
    }

    /// Where its agent listens (nowhere before its backend started).
    pub fn agent_addr(&self) -> AgentAddr {
        self.backend
            .as_ref()
            .map(BackendState::agent_addr)
            .unwrap_or_else(|| AgentAddr::Unix(PathBuf::new()))
    }

    /// Whether the sandbox's main process (agent or VMM) still runs.
    pub fn main_alive(&self) -> bool {
        self.backend.as_ref().is_some_and(BackendState::alive)
    }

    /// The sandbox's main process, for status output.
    pub fn main_pid(&self) -> Option<i32> {
        self.backend
            .as_ref()
            .and_then(|b| b.vital().first().map(|p| p.pid))
    }
}

/// A sandbox record as stored: today's shape, or the flat one of vmpod
/// before backends had their own state (per-backend optional PIDs, a
/// `backend` string), which a daemon upgraded under running pods must
/// still read.
#[derive(Deserialize)]
struct SandboxRecordOnDisk {
    id: String,
    name: String,
    uid: String,
    namespace: String,
    attempt: u32,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    runtime_handler: String,
    #[serde(default)]
    resolved_handler: String,
    state: SandboxState,
    #[serde(default)]
    created_at: i64,
    #[serde(default)]
    log_directory: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    cgroup_parent: String,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    pid_mode: i32,
    #[serde(default)]
    ipc_mode: i32,
    /// Today: a [`BackendState`] (or null); before: "host" or "vm".
    #[serde(default)]
    backend: serde_json::Value,
    #[serde(default)]
    cni: Option<crate::network::cni::Attachment>,
    #[serde(default)]
    port_mappings: Vec<crate::network::cni::PortMapping>,
    #[serde(default)]
    undo: Vec<Step>,
    // The flat shape's fields.
    #[serde(default)]
    agent_pid: Option<i32>,
    #[serde(default)]
    agent_socket: PathBuf,
    #[serde(default)]
    vmm_pid: Option<i32>,
    #[serde(default)]
    vsock_pid: Option<i32>,
    #[serde(default)]
    virtiofsd_pid: Option<i32>,
    #[serde(default)]
    image_disks: BTreeMap<String, String>,
    #[serde(default)]
    pid_starts: BTreeMap<String, u64>,
    #[serde(default)]
    tap: Option<String>,
}

impl SandboxRecordOnDisk {
    /// The backend state of a flat record. PIDs without a recorded start
    /// time are dropped: they cannot be told from a reused PID.
    fn flat_backend(&self, kind: &str) -> Option<BackendState> {
        let proc_of = |pid: Option<i32>| {
            let pid = pid?;
            Some(Proc {
                pid,
                start: *self.pid_starts.get(&pid.to_string())?,
            })
        };
        let sockets = self.agent_socket.parent().unwrap_or(Path::new(""));
        match kind {
            "host" => Some(BackendState::Host(HostState {
                agent: proc_of(self.agent_pid),
                socket: self.agent_socket.clone(),
            })),
            // Only QEMU pods had a vhost-device-vsock.
            "vm" if self.vsock_pid.is_none() => {
                // <state>/s/<prefix>/vsock.sock → <state>/sandboxes/<id>/vmm.json
                let slots = sockets
                    .parent()
                    .and_then(Path::parent)
                    .map(|state| {
                        state
                            .join("sandboxes")
                            .join(&self.id)
                            .join(vmm::CONFIG_FILE)
                    })
                    .and_then(|p| vmpod_vmm::config::VmmConfig::from_file(&p).ok())
                    .map_or(crate::config::DEFAULT_BLOCK_SLOTS as usize, |c| {
                        c.block.len()
                    });
                Some(BackendState::Vmm(VmmState {
                    vmm: proc_of(self.vmm_pid),
                    virtiofsd: None,
                    control_socket: sockets.join(vmm::CONTROL_SOCKET),
                    uds: self.agent_socket.clone(),
                    block_slots: slots,
                    image_disks: self.image_disks.clone(),
                    // Old records are from before the VMM had a NIC.
                    tap: None,
                }))
            }
            "vm" => Some(BackendState::Qemu(QemuState {
                qemu: proc_of(self.vmm_pid),
                vsock: proc_of(self.vsock_pid),
                virtiofsd: proc_of(self.virtiofsd_pid),
                uds: self.agent_socket.clone(),
                image_disks: self.image_disks.clone(),
                tap: self.tap.clone(),
            })),
            _ => None,
        }
    }
}

impl From<SandboxRecordOnDisk> for SandboxRecord {
    fn from(d: SandboxRecordOnDisk) -> SandboxRecord {
        let backend = match &d.backend {
            serde_json::Value::String(kind) => d.flat_backend(kind),
            serde_json::Value::Null => None,
            v => match serde_json::from_value::<BackendState>(v.clone()) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(sandbox = %d.id, error = %e, "an unreadable backend state");
                    None
                }
            },
        };
        SandboxRecord {
            id: d.id,
            name: d.name,
            uid: d.uid,
            namespace: d.namespace,
            attempt: d.attempt,
            labels: d.labels,
            annotations: d.annotations,
            runtime_handler: d.runtime_handler,
            resolved_handler: d.resolved_handler,
            state: d.state,
            created_at: d.created_at,
            log_directory: d.log_directory,
            hostname: d.hostname,
            netns: d.netns,
            cgroup_parent: d.cgroup_parent,
            host_network: d.host_network,
            pid_mode: d.pid_mode,
            ipc_mode: d.ipc_mode,
            backend,
            cni: d.cni,
            port_mappings: d.port_mappings,
            undo: d.undo,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as vmpod wrote it before backends had their own state.
    fn flat(backend: &str, extra: &str) -> String {
        format!(
            r#"{{"id":"abc","name":"p","uid":"u","namespace":"n","attempt":0,
            "labels":{{}},"annotations":{{}},"runtime_handler":"","resolved_handler":"vm",
            "state":"Ready","created_at":1,"log_directory":"","hostname":"h",
            "agent_pid":null,"agent_socket":"/state/s/abc/vsock.sock","netns":null,
            "cgroup_parent":"/vmpod/abc","host_network":false,"pid_mode":0,"ipc_mode":0,
            "backend":"{backend}","pid_starts":{{"10":100,"11":110,"12":120}}{extra}}}"#
        )
    }

    #[test]
    fn flat_records_of_older_daemons_are_read_into_backend_states() {
        let qemu: SandboxRecord = serde_json::from_str(&flat(
            "vm",
            r#","vmm_pid":10,"vsock_pid":11,"virtiofsd_pid":12,"image_disks":{"i":"img0"},"tap":"tap0""#,
        ))
        .unwrap();
        assert_eq!(
            qemu.backend,
            Some(BackendState::Qemu(QemuState {
                qemu: Some(Proc {
                    pid: 10,
                    start: 100
                }),
                vsock: Some(Proc {
                    pid: 11,
                    start: 110
                }),
                virtiofsd: Some(Proc {
                    pid: 12,
                    start: 120
                }),
                uds: "/state/s/abc/vsock.sock".into(),
                image_disks: [("i".to_string(), "img0".to_string())].into(),
                tap: Some("tap0".into()),
            }))
        );
        let vmm: SandboxRecord =
            serde_json::from_str(&flat("vm", r#","vmm_pid":10,"vsock_pid":null"#)).unwrap();
        let Some(BackendState::Vmm(v)) = &vmm.backend else {
            panic!("{:?}", vmm.backend);
        };
        assert_eq!(
            v.vmm,
            Some(Proc {
                pid: 10,
                start: 100
            })
        );
        assert_eq!(v.control_socket, PathBuf::from("/state/s/abc/vmm.sock"));
        assert!(vmm.is_vm());
        let host: SandboxRecord = serde_json::from_str(
            &flat("host", r#","agent_pid":11"#).replace(r#""agent_pid":null,"#, ""),
        )
        .unwrap();
        assert_eq!(
            host.backend,
            Some(BackendState::Host(HostState {
                agent: Some(Proc {
                    pid: 11,
                    start: 110
                }),
                socket: "/state/s/abc/vsock.sock".into(),
            }))
        );
        // A PID without a start time cannot be told from a reused one.
        let unknown: SandboxRecord =
            serde_json::from_str(&flat("vm", r#","vmm_pid":99,"vsock_pid":11"#)).unwrap();
        let Some(BackendState::Qemu(q)) = unknown.backend else {
            panic!()
        };
        assert_eq!(q.qemu, None);
    }

    #[test]
    fn todays_records_round_trip() {
        let mut rec: SandboxRecord = serde_json::from_str(&flat("host", "")).unwrap();
        rec.state = SandboxState::Unknown;
        rec.undo = vec![Step::RemoveCgroups {
            parent: "/vmpod/abc".into(),
        }];
        let json = serde_json::to_string(&rec).unwrap();
        let back: SandboxRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.backend, rec.backend);
        assert_eq!(back.undo, rec.undo);
        assert_eq!(back.state, SandboxState::Unknown);
    }
}
