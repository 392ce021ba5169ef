//! The CRI v1 RuntimeService.
//!
//! Layers, as in containerd's `internal/cri`: [`service`] is the thin tonic
//! impl; every call goes through [`service::instrument`] (span, latency,
//! error → Status in one place) into one module per RPC (`sandbox_run.rs`,
//! `container_create.rs`, ...), which work on the [`Cri`] runtime and its
//! stores ([`store`]).

mod attach;
mod container_create;
mod container_lifecycle;
mod container_query;
mod events;
mod exec;
mod exec_sync;
pub mod image;
mod monitor;
mod port_forward;
mod runtime_info;
mod sandbox_lifecycle;
mod sandbox_query;
mod sandbox_run;
mod security;
pub mod serve;
pub mod service;
mod stats;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::broadcast;
use tonic::transport::Channel;
use vmpod_proto::v1::agent_client::AgentClient;

use crate::config::Config;
use crate::network::cni;
use crate::sandbox::SandboxError;
use crate::sandbox::shared_fs;
use image::ImageResolver;
use store::{ContainerRecord, SandboxRecord, StateDir};

/// Errors of CRI calls; [`CriError::to_status`] is the one place they
/// become gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
    /// An agent call failed; its code is kept.
    #[error("agent {what}: {}", .status.message())]
    Agent { what: String, status: tonic::Status },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Spawn(#[from] crate::process::SpawnError),
    #[error(transparent)]
    Netns(#[from] crate::network::netns::NetnsError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    SharedFs(#[from] shared_fs::SharedFsError),
    #[error(transparent)]
    Cni(#[from] cni::CniError),
    #[error(transparent)]
    Streaming(#[from] crate::streaming::StreamingError),
    #[error("the agent cannot be reached")]
    AgentUnreachable(#[source] crate::agent_client::AgentClientError),
}

impl CriError {
    /// The gRPC status the kubelet sees.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            CriError::NotFound(_) => Code::NotFound,
            CriError::InvalidArgument(_) => Code::InvalidArgument,
            CriError::FailedPrecondition(_) => Code::FailedPrecondition,
            CriError::AlreadyExists(_) => Code::AlreadyExists,
            CriError::Unimplemented(_) => Code::Unimplemented,
            CriError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CriError::ResourceExhausted(_) => Code::ResourceExhausted,
            CriError::Agent { status, .. } => status.code(),
            CriError::Image(image::ImageError::NotFound(_)) => Code::NotFound,
            CriError::AgentUnreachable(_) => Code::Unavailable,
            CriError::SharedFs(
                shared_fs::SharedFsError::MissingSource(_)
                | shared_fs::SharedFsError::UnsupportedSource(_),
            ) => Code::InvalidArgument,
            CriError::SharedFs(shared_fs::SharedFsError::NoShare) => Code::FailedPrecondition,
            CriError::Sandbox(e) => match e {
                SandboxError::Precondition(_) => Code::FailedPrecondition,
                SandboxError::Invalid(_) => Code::InvalidArgument,
                SandboxError::Timeout(_) => Code::DeadlineExceeded,
                SandboxError::Exhausted(_) => Code::ResourceExhausted,
                SandboxError::AgentUnreachable(_) => Code::Unavailable,
                SandboxError::SharedFs(
                    shared_fs::SharedFsError::MissingSource(_)
                    | shared_fs::SharedFsError::UnsupportedSource(_),
                ) => Code::InvalidArgument,
                SandboxError::SharedFs(shared_fs::SharedFsError::NoShare) => {
                    Code::FailedPrecondition
                }
                _ => Code::Internal,
            },
            CriError::Streaming(crate::streaming::StreamingError::TooManyTokens(_)) => {
                Code::ResourceExhausted
            }
            CriError::Internal(_)
            | CriError::Store(_)
            | CriError::Spawn(_)
            | CriError::Netns(_)
            | CriError::Cni(_)
            | CriError::Image(_)
            | CriError::SharedFs(_)
            | CriError::Streaming(_) => Code::Internal,
        };
        tonic::Status::new(code, error_chain(self))
    }

    fn agent(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> CriError {
        let what = what.into();
        move |status| CriError::Agent { what, status }
    }
}

pub use crate::error_chain;

/// A sandbox in memory.
#[derive(Debug)]
pub struct Sandbox {
    rec: Mutex<SandboxRecord>,
    /// Serializes lifecycle calls on this sandbox and its containers.
    op: tokio::sync::Mutex<()>,
    agent: Mutex<Option<AgentClient<Channel>>>,
}

/// A container in memory.
#[derive(Debug)]
pub struct Container {
    rec: Mutex<ContainerRecord>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sandbox {
    fn rec(&self) -> SandboxRecord {
        lock(&self.rec).clone()
    }

    fn agent(&self) -> Result<AgentClient<Channel>, CriError> {
        lock(&self.agent).clone().ok_or_else(|| {
            CriError::FailedPrecondition(format!(
                "sandbox {} is not ready (its agent is gone)",
                lock(&self.rec).id
            ))
        })
    }
}

impl Container {
    fn rec(&self) -> ContainerRecord {
        lock(&self.rec).clone()
    }
}

/// The runtime: configuration, stores, image resolver, event stream.
pub struct Cri {
    config: Config,
    /// The node's CNI network, re-read when its conf dir changes.
    cni: cni::Cni,
    state: StateDir,
    images: Arc<dyn ImageResolver>,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Pod names (namespace/name/uid/attempt) whose RunPodSandbox is in
    /// progress, as containerd reserves names: a retry while the first
    /// attempt still runs is AlreadyExists, never a second pod.
    creating: Mutex<std::collections::HashSet<String>>,
    events: broadcast::Sender<k8s_cri::v1::ContainerEventResponse>,
    /// The exec/attach/port-forward server, once `vmpod serve` started it.
    streaming: OnceLock<Arc<crate::streaming::StreamingServer>>,
}

/// RemoveImage refuses images that containers were created from.
impl crate::image::service::ImageUsage for Cri {
    fn in_use(&self, image_id: &str) -> bool {
        lock(&self.containers)
            .values()
            .any(|c| lock(&c.rec).image_id == image_id)
    }

    /// The writable layers on disk of every container the daemon knows.
    fn container_fs(&self) -> Option<crate::image::service::ContainerFs> {
        let files: Vec<std::path::PathBuf> = lock(&self.containers)
            .values()
            .map(|c| {
                let r = lock(&c.rec);
                crate::sandbox::scratch::path(&self.state.sandbox_dir(&r.sandbox_id), &r.id)
            })
            .collect();
        let (used_bytes, inodes_used) = crate::sandbox::scratch::usage(files);
        Some(crate::image::service::ContainerFs {
            mountpoint: self.state.sandboxes().display().to_string(),
            used_bytes,
            inodes_used,
        })
    }
}

impl std::fmt::Debug for Cri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cri")
            .field("state_dir", &self.config.state_dir)
            .finish_non_exhaustive()
    }
}

impl Cri {
    /// A runtime with nothing adopted yet (see [`Cri::adopt`]).
    pub fn new(config: Config, images: Arc<dyn ImageResolver>) -> Arc<Cri> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Cri {
            state: StateDir::new(&config.state_dir),
            cni: cni::Cni::new(
                config.cni.conf_dir.clone(),
                config.cni.bin_dirs.clone(),
                config.cni.network.clone(),
            ),
            config,
            images,
            sandboxes: Mutex::new(HashMap::new()),
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(Default::default()),
            events,
            streaming: OnceLock::new(),
        })
    }

    /// Hands the runtime its streaming server (once).
    pub fn set_streaming(&self, server: Arc<crate::streaming::StreamingServer>) {
        let _ = self.streaming.set(server);
    }

    fn streaming(&self) -> Result<&crate::streaming::StreamingServer, CriError> {
        self.streaming.get().map(|s| s.as_ref()).ok_or_else(|| {
            CriError::FailedPrecondition("the streaming server is not running".into())
        })
    }

    fn sandbox(&self, id: &str) -> Result<Arc<Sandbox>, CriError> {
        let id = self.resolve_id(id, true)?;
        lock(&self.sandboxes)
            .get(&id)
            .cloned()
            .ok_or_else(|| CriError::NotFound(format!("pod sandbox {id:?} not found")))
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, CriError> {
        let id = self.resolve_id(id, false)?;
        lock(&self.containers)
            .get(&id)
            .cloned()
            .ok_or_else(|| CriError::NotFound(format!("container {id:?} not found")))
    }

    /// Full IDs, or a unique prefix of one (as crictl users type them).
    fn resolve_id(&self, id: &str, sandbox: bool) -> Result<String, CriError> {
        if id.is_empty() {
            return Err(CriError::InvalidArgument("an ID is required".into()));
        }
        let keys: Vec<String> = if sandbox {
            lock(&self.sandboxes).keys().cloned().collect()
        } else {
            lock(&self.containers).keys().cloned().collect()
        };
        if keys.iter().any(|k| k == id) {
            return Ok(id.to_string());
        }
        let mut matches = keys.into_iter().filter(|k| k.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some(one), None) => Ok(one),
            (Some(_), Some(_)) => Err(CriError::InvalidArgument(format!(
                "ID prefix {id:?} is ambiguous"
            ))),
            _ => Ok(id.to_string()),
        }
    }

    fn containers_of(&self, sandbox_id: &str) -> Vec<Arc<Container>> {
        lock(&self.containers)
            .values()
            .filter(|c| lock(&c.rec).sandbox_id == sandbox_id)
            .cloned()
            .collect()
    }
}

/// A fresh random 64-hex-digit ID.
fn new_id() -> Result<String, CriError> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| CriError::Internal(format!("reading /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Unix nanoseconds now.
fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whether a label set matches a selector (all of its pairs).
fn labels_match(
    labels: &std::collections::BTreeMap<String, String>,
    selector: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
