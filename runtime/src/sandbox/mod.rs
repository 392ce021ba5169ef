//! Sandbox backends: what runs a pod on the host (an agent process in
//! namespaces) or in a VM (QEMU, or vmpod's own VMM), behind one trait,
//! [`SandboxBackend`], and the host pieces they share (cgroups, the
//! virtio-fs share, the undo journal of a creation).
//!
//! A sandbox record holds its backend's state as one [`BackendState`]
//! value (persisted in `sandbox.json`): the processes the backend started,
//! each named by PID and start time ([`Proc`]), and what the backend needs
//! to find again after a daemon restart (sockets, block slots, disks).
//! The RPCs in `cri/` never look inside it; they call the trait.

pub mod cgroups;
pub mod host;
pub mod qemu;
pub mod rollback;
pub mod scratch;
pub mod shared_fs;
pub mod vm;
pub mod vmm;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use vmpod_proto::v1::agent_client::AgentClient;

use crate::agent_client::AgentAddr;
use crate::config::Handler;
use crate::cri::image::ResolvedImage;
use crate::cri::store::MountRecord;
use crate::process::Proc;
pub use rollback::{Rollback, Step};

/// Errors of a sandbox backend. The variants without a source say which
/// gRPC code the kubelet should see; the others are internal.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The node cannot run this (a missing guest image, no slot left for a
    /// volume kind): FailedPrecondition.
    #[error("{0}")]
    Precondition(String),
    /// The request asks for something impossible: InvalidArgument.
    #[error("{0}")]
    Invalid(String),
    /// A guest or helper did not answer in time: DeadlineExceeded.
    #[error("{0}")]
    Timeout(String),
    /// A bounded resource ran out: ResourceExhausted.
    #[error("{0}")]
    Exhausted(String),
    /// Something failed on the host or in the guest: Internal.
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Spawn(#[from] crate::process::SpawnError),
    #[error(transparent)]
    Cgroup(#[from] cgroups::CgroupError),
    #[error(transparent)]
    SharedFs(#[from] shared_fs::SharedFsError),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    #[error(transparent)]
    Tap(#[from] crate::network::tap::VmNetworkError),
    #[error("the agent cannot be reached")]
    AgentUnreachable(#[source] crate::agent_client::AgentClientError),
}

/// Which backend a handler runs pods on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Host,
    Qemu,
    Vmm,
}

impl BackendKind {
    /// The backend of a configured handler.
    pub fn of(handler: &Handler) -> BackendKind {
        use crate::config::{Backend, Hypervisor};
        match (handler.backend, handler.hypervisor()) {
            (Backend::Host, _) => BackendKind::Host,
            (Backend::Vm, Hypervisor::Qemu) => BackendKind::Qemu,
            (Backend::Vm, Hypervisor::Vmpod) => BackendKind::Vmm,
        }
    }

    /// Whether pods of this backend run in a VM.
    pub fn is_vm(self) -> bool {
        self != BackendKind::Host
    }
}

/// Whether pods of `handler` can start on this node: its backend's
/// programs, guest files and devices are there. Err names what is missing.
pub fn readiness(handler: &Handler, agent_binary: &Path) -> Result<(), String> {
    let file = |what: &str, p: &Path| {
        if p.is_file() {
            Ok(())
        } else {
            Err(format!("{what} {} is missing", p.display()))
        }
    };
    let program = |name: &str| {
        let p = crate::hypervisor::helper_program(name);
        if p.is_file() {
            Ok(())
        } else {
            Err(format!(
                "{name} is not installed (not on PATH nor in ~/.cargo/bin)"
            ))
        }
    };
    let kvm = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))
    };
    match BackendKind::of(handler) {
        BackendKind::Host => file("the agent binary", agent_binary),
        BackendKind::Qemu => {
            file("the guest kernel", &handler.kernel())?;
            file("the guest initramfs", &handler.initramfs())?;
            program("qemu-system-x86_64")?;
            program("vhost-device-vsock")?;
            program("virtiofsd")?;
            if handler.accel.unwrap_or(crate::config::Accel::Kvm) == crate::config::Accel::Kvm {
                kvm()?;
            }
            Ok(())
        }
        BackendKind::Vmm => {
            file("the guest kernel", &handler.kernel())?;
            file("the guest initramfs", &handler.initramfs())?;
            kvm()?;
            let vmm = crate::vmm_binary();
            file("the VMM binary (vmpod-vmm)", &vmm)?;
            program("virtiofsd")?;
            if handler.probe_kvm() {
                kvm_probe(&vmm)
                    .map_err(|why| format!("{why} (probe_kvm = false skips this check)"))?;
            }
            Ok(())
        }
    }
}

/// How long `vmpod-vmm --probe` may take (it needs ~10 ms).
const KVM_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether this host's KVM can run a stock Linux guest, as `vmpod-vmm
/// --probe` finds (see the VMM's `probe` module). Run once per daemon and
/// VMM binary, the first time it is asked (`vmpod serve` asks at start-up);
/// the answer describes the host and does not change while the daemon runs.
pub fn kvm_probe(vmm: &Path) -> Result<(), String> {
    static PROBED: std::sync::Mutex<Vec<(PathBuf, Result<(), String>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut probed = PROBED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, r)) = probed.iter().find(|(p, _)| p == vmm) {
        return r.clone();
    }
    let result = run_kvm_probe(vmm);
    match &result {
        Ok(()) => tracing::info!(vmm = %vmm.display(), "KVM probe: stock Linux guests run here"),
        Err(why) => tracing::warn!(vmm = %vmm.display(), "KVM probe: {why}"),
    }
    probed.push((vmm.to_path_buf(), result.clone()));
    result
}

fn run_kvm_probe(vmm: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut child = std::process::Command::new(vmm)
        .arg("--probe")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("running {} --probe: {e}", vmm.display()))?;
    let deadline = std::time::Instant::now() + KVM_PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the KVM probe did not finish within {KVM_PROBE_TIMEOUT:?}"
                ));
            }
            Err(e) => return Err(format!("waiting for the KVM probe: {e}")),
        }
    };
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(4096).read_to_string(&mut out);
    }
    let out = out.trim();
    if status.success() {
        Ok(())
    } else if out.is_empty() {
        Err(format!("the KVM probe failed ({status})"))
    } else {
        Err(format!("KVM probe: {out}"))
    }
}

/// What a backend needs to start a pod. Paths are the pod's own: nothing
/// else uses them.
#[derive(Debug)]
pub struct StartSpec<'a> {
    pub id: &'a str,
    /// `<state dir>/sandboxes/<id>`, already made.
    pub dir: &'a Path,
    /// `<state dir>/s/<id prefix>`, already made (socket paths are short).
    pub sockets: &'a Path,
    /// The handler, sized for this pod (VM backends).
    pub handler: &'a Handler,
    /// The pod's cgroup, `<parent>/<id>`.
    pub cgroup_parent: &'a str,
    /// The pod's network namespace, if it has one of its own.
    pub netns: Option<&'a Path>,
    /// The CNI result, when the pod's network gave it an address (VM
    /// backends then wire a NIC to it).
    pub addressed: Option<&'a serde_json::Value>,
    /// hostPID / hostIPC (host backend).
    pub host_pid: bool,
    pub host_ipc: bool,
    /// The host agent binary (host backend).
    pub agent_binary: &'a Path,
    /// The images the node has now (QEMU attaches them at boot).
    pub images: &'a [ResolvedImage],
}

/// A started sandbox: its agent answered Health.
#[derive(Debug)]
pub struct Started {
    pub agent: AgentClient<Channel>,
    /// The guest NICs SetupSandbox configures.
    pub interfaces: Vec<vmpod_proto::v1::NetworkInterface>,
}

/// Where the agent finds what CreateContainer names: the rootfs image and
/// each mount's source, in the agent's view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exposed {
    pub rootfs_source: String,
    pub mount_sources: Vec<String>,
    /// The container's writable-layer file (see scratch.rs); empty: none.
    pub scratch_source: String,
}

/// The one interface between the RPCs and a backend.
///
/// `start` makes the state; the other calls work on a copy of it, taken
/// under the sandbox's operation lock, and the caller stores the copy back
/// (and persists it) when a call changed it.
pub trait SandboxBackend: Sized {
    /// Starts the pod's agent (host) or VM and connects to its agent.
    /// Every host side effect is registered in `undo` as it happens (and
    /// `undo` journals it), so a failure, a cancellation or a crash leaves
    /// nothing behind.
    fn start(
        spec: &StartSpec<'_>,
        undo: &mut Rollback,
    ) -> impl Future<Output = Result<(Self, Started), SandboxError>> + Send;

    /// Where the agent listens.
    fn agent_addr(&self) -> AgentAddr;

    /// The host processes whose end ends the sandbox (the monitor watches
    /// them; adoption requires the first one alive).
    fn vital(&self) -> Vec<Proc>;

    /// Every host process the backend started, vital or not.
    fn processes(&self) -> Vec<Proc>;

    /// Whether the sandbox's main process still runs (a restarted daemon
    /// re-adopts only those).
    fn alive(&self) -> bool {
        self.vital().first().is_some_and(Proc::alive)
    }

    /// Ends the sandbox's host processes after the agent's Shutdown, each
    /// given `grace` to end on its own, and releases what the backend holds
    /// on the host besides cgroups and the network (the share's mounts).
    fn stop(
        &self,
        dir: &Path,
        grace: Duration,
    ) -> impl Future<Output = Result<(), SandboxError>> + Send;

    /// Makes a container's image, volumes and writable-layer file
    /// (`scratch`, read-write) reachable by the agent (attaching a disk,
    /// exposing through the share). `in_use`: the images of the pod's other
    /// containers. May change the state.
    fn expose(
        &mut self,
        dir: &Path,
        container_id: &str,
        image: &ResolvedImage,
        mounts: &[MountRecord],
        scratch: Option<&Path>,
        in_use: &BTreeSet<String>,
    ) -> impl Future<Output = Result<Exposed, SandboxError>> + Send;

    /// Undoes [`SandboxBackend::expose`]'s volumes for a container that is
    /// removed or whose creation failed.
    fn withdraw(&self, dir: &Path, container_id: &str) -> Result<(), SandboxError>;

    /// Releases images no container of the pod uses (`in_use`) once the
    /// agent no longer holds them. May change the state.
    fn release_images(&mut self, in_use: &BTreeSet<String>) -> impl Future<Output = ()> + Send;

    /// Figures for PodSandboxStats beyond the containers' cgroups: the
    /// resident memory of the backend's own host processes (the VMM's
    /// guest RAM, QEMU's, helpers), in bytes.
    fn overhead_bytes(&self) -> u64 {
        self.processes()
            .iter()
            .filter(|p| p.alive())
            .filter_map(|p| crate::process::rss_bytes(p.pid))
            .sum()
    }
}

/// The persisted state of a sandbox's backend.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackendState {
    Host(host::HostState),
    Qemu(qemu::QemuState),
    Vmm(vmm::VmmState),
}

impl BackendState {
    pub fn kind(&self) -> BackendKind {
        match self {
            BackendState::Host(_) => BackendKind::Host,
            BackendState::Qemu(_) => BackendKind::Qemu,
            BackendState::Vmm(_) => BackendKind::Vmm,
        }
    }

    pub fn is_vm(&self) -> bool {
        self.kind().is_vm()
    }

    /// Starts a sandbox on the backend `kind`.
    pub async fn start(
        kind: BackendKind,
        spec: &StartSpec<'_>,
        undo: &mut Rollback,
    ) -> Result<(BackendState, Started), SandboxError> {
        Ok(match kind {
            BackendKind::Host => {
                let (s, started) = host::HostState::start(spec, undo).await?;
                (BackendState::Host(s), started)
            }
            BackendKind::Qemu => {
                let (s, started) = qemu::QemuState::start(spec, undo).await?;
                (BackendState::Qemu(s), started)
            }
            BackendKind::Vmm => {
                let (s, started) = vmm::VmmState::start(spec, undo).await?;
                (BackendState::Vmm(s), started)
            }
        })
    }
}

/// Calls the same method on whichever backend the state is.
macro_rules! dispatch {
    ($self:expr, $s:ident => $call:expr) => {
        match $self {
            BackendState::Host($s) => $call,
            BackendState::Qemu($s) => $call,
            BackendState::Vmm($s) => $call,
        }
    };
}

impl BackendState {
    pub fn agent_addr(&self) -> AgentAddr {
        dispatch!(self, s => s.agent_addr())
    }

    pub fn vital(&self) -> Vec<Proc> {
        dispatch!(self, s => s.vital())
    }

    pub fn processes(&self) -> Vec<Proc> {
        dispatch!(self, s => s.processes())
    }

    pub fn alive(&self) -> bool {
        dispatch!(self, s => s.alive())
    }

    pub async fn stop(&self, dir: &Path, grace: Duration) -> Result<(), SandboxError> {
        dispatch!(self, s => s.stop(dir, grace).await)
    }

    pub async fn expose(
        &mut self,
        dir: &Path,
        container_id: &str,
        image: &ResolvedImage,
        mounts: &[MountRecord],
        scratch: Option<&Path>,
        in_use: &BTreeSet<String>,
    ) -> Result<Exposed, SandboxError> {
        dispatch!(self, s => s.expose(dir, container_id, image, mounts, scratch, in_use).await)
    }

    pub fn withdraw(&self, dir: &Path, container_id: &str) -> Result<(), SandboxError> {
        dispatch!(self, s => s.withdraw(dir, container_id))
    }

    pub async fn release_images(&mut self, in_use: &BTreeSet<String>) {
        dispatch!(self, s => s.release_images(in_use).await)
    }

    pub fn overhead_bytes(&self) -> u64 {
        dispatch!(self, s => s.overhead_bytes())
    }

    /// SIGKILLs every process the backend started that is still ours.
    pub fn kill(&self) {
        for p in self.processes() {
            p.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Hypervisor};

    #[test]
    fn readiness_names_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let agent = tmp.path().join("vmpod-agent");
        let host = Handler::new(Backend::Host);
        assert!(
            readiness(&host, &agent)
                .unwrap_err()
                .contains("agent binary")
        );
        std::fs::write(&agent, b"").unwrap();
        assert_eq!(readiness(&host, &agent), Ok(()));
        for hv in [Hypervisor::Qemu, Hypervisor::Vmpod] {
            let mut vm = Handler::new(Backend::Vm);
            vm.hypervisor = Some(hv);
            vm.kernel = Some(tmp.path().join("no-vmlinux"));
            let why = readiness(&vm, &agent).unwrap_err();
            assert!(why.contains("no-vmlinux"), "{hv:?}: {why}");
        }
    }
}
