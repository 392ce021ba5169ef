//! RunPodSandbox: checks the pod's isolation against the handler's policy,
//! makes the pod's network namespace and runs CNI ADD in it (when the node
//! has a CNI network), then has the handler's sandbox backend start the
//! agent or VM (`crate::sandbox`), and configures the pod through
//! SetupSandbox.
//!
//! The creation is a persisted state machine: its record is written
//! CREATING right after the sandbox dir exists, and every side effect's
//! undo step is journaled into it as it happens (`sandbox::rollback`). A
//! failure runs the steps in reverse; a step that fails leaves the sandbox
//! UNKNOWN (listed, removable) for the reaper to finish, as does a daemon
//! that dies mid-creation.

use std::sync::{Arc, Mutex};

use k8s_cri::v1::{NamespaceMode, RunPodSandboxRequest, RunPodSandboxResponse};

use super::store::{SandboxRecord, SandboxState};
use super::{Cri, CriError, Sandbox, new_id, now_ns};
use crate::config::Backend;
use crate::network::cni::{self, NetworkList};
use crate::sandbox::{BackendKind, BackendState, Rollback, StartSpec, Step, vm};

impl Cri {
    /// The kubelet cancels RunPodSandbox at its deadline, and tonic then
    /// drops this future. So the creation runs in a task of its own that
    /// always finishes: the pod ends up ready, or its rollback has run.
    /// A pod whose caller is gone by then is stopped and removed, as
    /// containerd does: nobody knows its ID. Nothing is left half made.
    pub(super) async fn run_pod_sandbox(
        self: &Arc<Self>,
        req: RunPodSandboxRequest,
    ) -> Result<RunPodSandboxResponse, CriError> {
        use tracing::Instrument;
        let cri = self.clone();
        let span = tracing::Span::current();
        // Dropped with this future: the task then knows the caller left.
        let (_caller, gone) = tokio::sync::oneshot::channel::<()>();
        let create = async move {
            let result = cri.create_pod_sandbox(req, gone).await;
            // The caller may be gone: say here how it ended.
            if let Err(e) = &result {
                tracing::info!(error = %super::error_chain(e), "pod sandbox not created; rolled back");
            }
            result
        };
        tokio::spawn(create.instrument(span))
            .await
            .map_err(|e| CriError::Internal(format!("the RunPodSandbox task failed: {e}")))?
    }

    async fn create_pod_sandbox(
        self: &Arc<Self>,
        req: RunPodSandboxRequest,
        mut caller: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<RunPodSandboxResponse, CriError> {
        let config = req
            .config
            .ok_or_else(|| CriError::InvalidArgument("config is required".into()))?;
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| CriError::InvalidArgument("metadata is required".into()))?;
        if meta.name.is_empty() || meta.namespace.is_empty() {
            return Err(CriError::InvalidArgument(
                "metadata.name and metadata.namespace are required".into(),
            ));
        }
        let (handler_name, handler) =
            self.config.handler(&req.runtime_handler).ok_or_else(|| {
                CriError::NotFound(format!(
                    "runtime handler {:?} is not configured",
                    req.runtime_handler
                ))
            })?;
        let handler_name = handler_name.to_string();
        let handler = handler.clone();
        let kind = BackendKind::of(&handler);
        // VMs are sized before anything is made (and before readiness: a
        // request that can never succeed is InvalidArgument on any node).
        let handler = if kind.is_vm() {
            vm::sized_handler(&handler, config.linux.as_ref())?
        } else {
            handler
        };
        // Honest readiness: a handler that cannot run pods here says why
        // before anything is made.
        crate::sandbox::readiness(&handler, &self.config.agent_binary()).map_err(|why| {
            CriError::FailedPrecondition(format!(
                "runtime handler {handler_name:?} cannot run pods on this node: {why}"
            ))
        })?;
        // Same metadata → the same pod; the kubelet must remove the old
        // one first (as containerd reserves names). A creation of the same
        // pod still in progress holds the name too.
        let key = format!(
            "{}/{}/{}/{}",
            meta.namespace, meta.name, meta.uid, meta.attempt
        );
        if !super::lock(&self.creating).insert(key.clone()) {
            return Err(CriError::AlreadyExists(format!(
                "pod {}/{} attempt {} is being created already",
                meta.namespace, meta.name, meta.attempt
            )));
        }
        let _reserved = Reservation { cri: self, key };
        let duplicate = super::lock(&self.sandboxes).values().any(|s| {
            let r = super::lock(&s.rec);
            r.name == meta.name
                && r.namespace == meta.namespace
                && r.uid == meta.uid
                && r.attempt == meta.attempt
        });
        if duplicate {
            return Err(CriError::AlreadyExists(format!(
                "pod {}/{} attempt {} already exists",
                meta.namespace, meta.name, meta.attempt
            )));
        }

        let security = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.clone())
            .unwrap_or_default();
        let ns = security.namespace_options.unwrap_or_default();
        let host_network = ns.network == NamespaceMode::Node as i32;
        let host_pid = ns.pid == NamespaceMode::Node as i32;
        let host_ipc = ns.ipc == NamespaceMode::Node as i32;
        let policy = &self.config.host;
        let refuse = |what: &str| {
            Err(CriError::FailedPrecondition(format!(
                "the pod asks for {what}, which handler {handler_name:?} does not allow \
                 (vmpod never downgrades isolation silently; see [host] in the config)"
            )))
        };
        let host_backend = handler.backend == Backend::Host;
        if host_network && !(host_backend && policy.allow_host_network) {
            return refuse("the node's network namespace");
        }
        if host_pid && !(host_backend && policy.allow_host_pid) {
            return refuse("the node's PID namespace");
        }
        if host_ipc && !(host_backend && policy.allow_host_ipc) {
            return refuse("the node's IPC namespace");
        }
        // A privileged pod in a VM is privileged inside the guest only (all
        // capabilities, no seccomp, the guest's devices): the VM stays the
        // boundary, as in Kata. On the host backend it needs the policy.
        if security.privileged && host_backend && !policy.allow_privileged {
            return refuse("privileged mode");
        }

        // The pod's network: the node's CNI network when it has one. A node
        // with no CNI config at all gives pods loopback only (so a runtime
        // without networking still runs pods); a broken config is refused,
        // as containerd does, rather than silently giving no network.
        let network = if host_network {
            None
        } else {
            match self.cni.current() {
                Ok(net) => Some(net),
                Err(_) if !self.cni.has_config_files() => None,
                Err(why) => {
                    return Err(CriError::FailedPrecondition(format!(
                        "the pod network is not ready: {why}"
                    )));
                }
            }
        };

        let port_mappings = cni::PortMapping::from_cri(&config.port_mappings)
            .map_err(|e| CriError::InvalidArgument(e.to_string()))?;
        let id = new_id()?;
        // PodSandboxConfig.hostname is optional; as containerd, an empty
        // one means the node's hostname (the pod *name* may be longer than
        // a hostname can be, and the kubelet sends names of any length).
        let hostname = if config.hostname.is_empty() {
            node_hostname()?
        } else {
            config.hostname.clone()
        };
        let rec = SandboxRecord {
            id: id.clone(),
            name: meta.name,
            uid: meta.uid,
            namespace: meta.namespace,
            attempt: meta.attempt,
            labels: config.labels.into_iter().collect(),
            annotations: config.annotations.into_iter().collect(),
            runtime_handler: req.runtime_handler,
            resolved_handler: handler_name,
            state: SandboxState::Creating,
            created_at: now_ns(),
            log_directory: config.log_directory,
            hostname: hostname.clone(),
            // Host pods always get their own namespace; VM pods one for
            // their network (QEMU and the tap live there).
            netns: (!host_network && (host_backend || network.is_some()))
                .then(|| self.state.netns_path(&id)),
            cgroup_parent: pod_cgroup(
                config
                    .linux
                    .as_ref()
                    .map(|l| l.cgroup_parent.as_str())
                    .unwrap_or(""),
                &id,
            )?,
            host_network,
            pid_mode: ns.pid,
            ipc_mode: ns.ipc,
            backend: None,
            cni: None,
            port_mappings,
            undo: Vec::new(),
        };
        let mut undo = Rollback::default();
        let result = self
            .start_sandbox(
                rec.clone(),
                kind,
                &handler,
                network.as_ref(),
                config.dns_config,
                config.linux,
                &mut undo,
            )
            .await;
        match result {
            Ok(sandbox) => {
                undo.commit();
                let sandbox = Arc::new(sandbox);
                super::lock(&self.sandboxes).insert(id.clone(), sandbox.clone());
                self.monitor(sandbox);
                tracing::info!(sandbox = %id, "pod sandbox ready");
                let caller_gone = matches!(
                    caller.try_recv(),
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed)
                );
                if caller_gone {
                    // Still holding the pod's name: a retry waits for this.
                    tracing::info!(sandbox = %id, "RunPodSandbox was cancelled: removing the pod");
                    self.remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await?;
                    return Err(CriError::DeadlineExceeded(format!(
                        "RunPodSandbox was cancelled; pod sandbox {id} was removed"
                    )));
                }
                Ok(RunPodSandboxResponse { pod_sandbox_id: id })
            }
            Err(e) => {
                let left = undo.run().await;
                if !left.is_empty() {
                    self.keep_unknown(rec, left);
                }
                Err(e)
            }
        }
    }

    /// A creation whose undo failed in part: the sandbox stays, UNKNOWN
    /// (NOTREADY to the kubelet), with the steps still to do, for
    /// RemovePodSandbox or the reaper.
    fn keep_unknown(&self, mut rec: SandboxRecord, left: Vec<Step>) {
        rec.state = SandboxState::Unknown;
        rec.undo = left;
        if let Err(e) = self.state.save_sandbox(&rec) {
            tracing::warn!(sandbox = %rec.id, error = %super::error_chain(&e), "saving an UNKNOWN sandbox");
        }
        tracing::warn!(sandbox = %rec.id, steps = rec.undo.len(), "pod sandbox UNKNOWN: its undo is not finished");
        super::lock(&self.sandboxes).insert(
            rec.id.clone(),
            Arc::new(Sandbox {
                rec: Mutex::new(rec),
                op: tokio::sync::Mutex::new(()),
                agent: Mutex::new(None),
            }),
        );
    }

    /// The sandbox's dirs, network and backend, each side effect
    /// journaled in `undo` (and so in the CREATING record).
    #[allow(clippy::too_many_arguments)]
    async fn start_sandbox(
        &self,
        mut rec: SandboxRecord,
        kind: BackendKind,
        handler: &crate::config::Handler,
        network: Option<&NetworkList>,
        dns: Option<k8s_cri::v1::DnsConfig>,
        linux: Option<k8s_cri::v1::LinuxPodSandboxConfig>,
        undo: &mut Rollback,
    ) -> Result<Sandbox, CriError> {
        let dir = self.state.sandbox_dir(&rec.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| CriError::Internal(format!("creating {}: {e}", dir.display())))?;
        // From here on every step is on disk before the next side effect.
        let state = self.state.clone();
        let mut journaled = rec.clone();
        undo.journal_to(Box::new(move |steps| {
            journaled.undo = steps.to_vec();
            if let Err(e) = state.save_sandbox(&journaled) {
                tracing::warn!(sandbox = %journaled.id, error = %crate::error_chain(&e), "journaling an undo step");
            }
        }));
        undo.push(Step::RemoveDir { path: dir.clone() });
        let sockets = self.make_socket_dir(&rec.id, undo)?;
        let mut addressed = None;
        if let Some(netns) = rec.netns.clone() {
            crate::network::netns::create_netns(&netns)?;
            undo.push(Step::RemoveNetns { path: netns });
            if let Some(network) = network {
                self.attach_network(&mut rec, network, undo).await?;
                // A network that gives the pod no address (loopback only)
                // gives a VM no NIC.
                addressed = rec
                    .cni
                    .as_ref()
                    .map(|a| a.result.clone())
                    .filter(|r| !cni::pod_network(r).ips.is_empty());
            }
        }
        let binary = self.config.agent_binary();
        let images = if kind == BackendKind::Qemu {
            self.images.list()
        } else {
            Vec::new()
        };
        let spec = StartSpec {
            id: &rec.id,
            dir: &dir,
            sockets: &sockets,
            handler,
            cgroup_parent: &rec.cgroup_parent,
            netns: rec.netns.as_deref(),
            addressed: addressed.as_ref(),
            host_pid: rec.pid_mode == NamespaceMode::Node as i32,
            host_ipc: rec.ipc_mode == NamespaceMode::Node as i32,
            agent_binary: &binary,
            images: &images,
        };
        let (backend, started) = BackendState::start(kind, &spec, undo).await?;
        rec.backend = Some(backend);
        rec.state = SandboxState::Ready;
        self.setup(rec, started.agent, dns, linux, started.interfaces)
            .await
    }

    /// CNI ADD in the pod's namespace; the attachment goes into the record
    /// (DEL needs it, even after a restart) and its DEL into the rollback.
    async fn attach_network(
        &self,
        rec: &mut SandboxRecord,
        network: &NetworkList,
        undo: &mut Rollback,
    ) -> Result<(), CriError> {
        let Some(netns) = rec.netns.clone() else {
            return Ok(());
        };
        let pod = cni::PodRef {
            sandbox_id: rec.id.clone(),
            namespace: rec.namespace.clone(),
            name: rec.name.clone(),
            uid: rec.uid.clone(),
            netns,
            port_mappings: rec.port_mappings.clone(),
        };
        let bins = self.config.cni.bin_dirs.clone();
        let att = match cni::add(&bins, network, &pod).await {
            Ok(att) => att,
            Err(e) => {
                // Plugins that did run may hold addresses: DEL them all
                // (DEL is idempotent for those that did not).
                let pending = cni::Attachment {
                    network: network.clone(),
                    pod,
                    result: serde_json::Value::Null,
                };
                let _ = cni::del(&bins, &pending).await;
                return Err(e.into());
            }
        };
        tracing::info!(sandbox = %rec.id, network = %network.name, "pod network attached");
        undo.push(Step::CniDel {
            bins,
            attachment: Box::new(att.clone()),
        });
        rec.cni = Some(att);
        Ok(())
    }

    /// Creates the sandbox's socket dir (it must be new: its name is a
    /// prefix of the ID).
    pub(super) fn make_socket_dir(
        &self,
        id: &str,
        undo: &mut Rollback,
    ) -> Result<std::path::PathBuf, CriError> {
        let sockets = self.state.socket_dir(id);
        if let Some(parent) = sockets.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| CriError::Internal(format!("creating {}: {e}", parent.display())))?;
        }
        std::fs::create_dir(&sockets)
            .map_err(|e| CriError::Internal(format!("creating {}: {e}", sockets.display())))?;
        undo.push(Step::RemoveDir {
            path: sockets.clone(),
        });
        Ok(sockets)
    }

    /// SetupSandbox, then the record is persisted: the sandbox exists.
    async fn setup(
        &self,
        rec: SandboxRecord,
        mut agent: vmpod_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
        dns: Option<k8s_cri::v1::DnsConfig>,
        linux: Option<k8s_cri::v1::LinuxPodSandboxConfig>,
        interfaces: Vec<vmpod_proto::v1::NetworkInterface>,
    ) -> Result<Sandbox, CriError> {
        let dns = dns.unwrap_or_default();
        agent
            .setup_sandbox(vmpod_proto::v1::SetupSandboxRequest {
                hostname: rec.hostname.clone(),
                dns_servers: dns.servers,
                dns_searches: dns.searches,
                dns_options: dns.options,
                sysctls: linux.map(|l| l.sysctls).unwrap_or_default(),
                interfaces,
            })
            .await
            .map_err(CriError::agent("SetupSandbox"))?;
        self.state.save_sandbox(&rec)?;
        Ok(Sandbox {
            rec: Mutex::new(rec),
            op: tokio::sync::Mutex::new(()),
            agent: Mutex::new(Some(agent)),
        })
    }
}

/// The pod's cgroup: `<kubelet's cgroup parent>/<sandbox ID>`, or
/// `/vmpod/<sandbox ID>` when the kubelet names none. Host pods' containers
/// live below it; VM pods' host processes are moved into it. Only the
/// cgroupfs driver's paths are accepted: a systemd slice is refused, not
/// silently replaced.
fn pod_cgroup(parent: &str, id: &str) -> Result<String, CriError> {
    if parent.is_empty() {
        return Ok(format!("/vmpod/{id}"));
    }
    if parent.ends_with(".slice") {
        return Err(CriError::InvalidArgument(format!(
            "cgroup parent {parent:?} is a systemd slice; vmpod manages cgroups directly \
             (configure the kubelet with cgroupDriver: cgroupfs)"
        )));
    }
    let valid = parent.starts_with('/')
        && parent.len() <= 512
        && parent
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
    if !valid {
        return Err(CriError::InvalidArgument(format!(
            "cgroup parent {parent:?} is not an absolute cgroup path"
        )));
    }
    Ok(format!("{parent}/{id}"))
}

/// The node's hostname, which pods without one of their own get.
fn node_hostname() -> Result<String, CriError> {
    nix::unistd::gethostname()
        .map_err(|e| CriError::Internal(format!("reading the node's hostname: {e}")))?
        .into_string()
        .map_err(|_| CriError::Internal("the node's hostname is not UTF-8".into()))
}

/// Holds a pod name in `Cri::creating` until RunPodSandbox is done.
struct Reservation<'a> {
    cri: &'a Cri,
    key: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        super::lock(&self.cri.creating).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_follow_the_kubelets_parent() {
        assert_eq!(pod_cgroup("", "abc").unwrap(), "/vmpod/abc");
        assert_eq!(
            pod_cgroup("/kubepods/burstable/pod1234", "abc").unwrap(),
            "/kubepods/burstable/pod1234/abc"
        );
        for bad in [
            "kubepods",
            "/kubepods/../etc",
            "/kubepods//x",
            "/kubepods/",
            "kubepods-burstable-pod1234.slice",
        ] {
            assert!(
                matches!(pod_cgroup(bad, "abc"), Err(CriError::InvalidArgument(_))),
                "{bad}"
            );
        }
    }
}
