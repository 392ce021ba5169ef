//! RunPodSandbox: checks the pod's isolation against the handler's policy,
//! makes the pod's network namespace and runs CNI ADD in it (when the node
//! has a CNI network), then starts the agent in it (host backend) or a VM
//! whose tap is wired to the namespace's eth0 (VM backend), and configures
//! the pod through SetupSandbox. Each step registers its undo; a failure
//! runs them in reverse, so nothing leaks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_cri::v1::{NamespaceMode, RunPodSandboxRequest, RunPodSandboxResponse};

use super::store::{SandboxRecord, SandboxState};
use super::{Cri, CriError, Sandbox, new_id, now_ns};
use super::{vm_sandbox, vmm_sandbox};
use crate::agent_client;
use crate::config::{Backend, Hypervisor};
use crate::network::cni::{self, NetworkList};
use crate::network::tap as vm_network;
use crate::sandbox::host::AgentLaunch;

/// How long a new host agent has to answer Health.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

impl Cri {
    /// The kubelet cancels RunPodSandbox at its deadline, and tonic then
    /// drops this future. So the creation runs in a task of its own that
    /// always finishes: the pod ends up ready (listed, for the kubelet to
    /// find or remove), or its rollback has run. Nothing is left half made.
    pub(super) async fn run_pod_sandbox(
        self: &Arc<Self>,
        req: RunPodSandboxRequest,
    ) -> Result<RunPodSandboxResponse, CriError> {
        use tracing::Instrument;
        let cri = self.clone();
        let span = tracing::Span::current();
        let create = async move {
            let result = cri.create_pod_sandbox(req).await;
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
            state: SandboxState::Ready,
            created_at: now_ns(),
            log_directory: config.log_directory,
            hostname: hostname.clone(),
            agent_pid: None,
            agent_socket: self.state.socket_dir(&id).join("agent.sock"),
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
            backend: String::from(if host_backend { "host" } else { "vm" }),
            vmm_pid: None,
            vsock_pid: None,
            virtiofsd_pid: None,
            image_disks: Default::default(),
            pid_starts: Default::default(),
            cni: None,
            tap: None,
            port_mappings,
        };
        let mut undo = Rollback::default();
        let result = if host_backend {
            self.start_host_sandbox(
                rec,
                network.as_ref(),
                config.dns_config,
                config.linux,
                &mut undo,
            )
            .await
        } else {
            self.start_vm_sandbox(
                rec,
                &handler,
                network.as_ref(),
                config.dns_config,
                config.linux,
                &mut undo,
            )
            .await
        };
        match result {
            Ok(sandbox) => {
                let sandbox = Arc::new(sandbox);
                super::lock(&self.sandboxes).insert(id.clone(), sandbox.clone());
                self.monitor(sandbox);
                tracing::info!(sandbox = %id, "pod sandbox ready");
                Ok(RunPodSandboxResponse { pod_sandbox_id: id })
            }
            Err(e) => {
                undo.run().await;
                Err(e)
            }
        }
    }

    async fn start_host_sandbox(
        &self,
        mut rec: SandboxRecord,
        network: Option<&NetworkList>,
        dns: Option<k8s_cri::v1::DnsConfig>,
        linux: Option<k8s_cri::v1::LinuxPodSandboxConfig>,
        undo: &mut Rollback,
    ) -> Result<Sandbox, CriError> {
        let dir = self.state.sandbox_dir(&rec.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| CriError::Internal(format!("creating {}: {e}", dir.display())))?;
        undo.push(Step::RemoveDir(dir.clone()));
        self.make_socket_dir(&rec.id, undo)?;
        if let Some(netns) = &rec.netns {
            crate::network::netns::create_netns(netns)?;
            undo.push(Step::RemoveNetns(netns.clone()));
            if let Some(network) = network {
                self.attach_network(&mut rec, network, undo).await?;
            }
        }
        let binary = self.config.agent_binary();
        let pid = crate::sandbox::host::spawn_agent(&AgentLaunch {
            binary: &binary,
            socket: &rec.agent_socket,
            state_dir: &dir.join("agent"),
            cgroup_parent: &rec.cgroup_parent,
            netns: rec.netns.as_deref(),
            log: &dir.join("agent.log"),
            host_pid: rec.pid_mode == NamespaceMode::Node as i32,
            host_ipc: rec.ipc_mode == NamespaceMode::Node as i32,
        })?;
        undo.push(Step::KillAgent(pid, rec.cgroup_parent.clone()));
        rec.agent_pid = Some(pid);
        rec.note_pid(pid);
        let agent = agent_client::connect_ready(&rec.agent_addr(), AGENT_READY_TIMEOUT)
            .await
            .map_err(CriError::AgentUnreachable)?;
        self.setup(rec, agent, dns, linux, Vec::new()).await
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
        undo.push(Step::CniDel(bins, Box::new(att.clone())));
        rec.cni = Some(att);
        Ok(())
    }

    async fn start_vm_sandbox(
        &self,
        mut rec: SandboxRecord,
        handler: &crate::config::Handler,
        network: Option<&NetworkList>,
        dns: Option<k8s_cri::v1::DnsConfig>,
        linux: Option<k8s_cri::v1::LinuxPodSandboxConfig>,
        undo: &mut Rollback,
    ) -> Result<Sandbox, CriError> {
        // vCPUs and memory: the handler's plus the pod's limits, on both
        // hypervisors.
        let handler = &vmm_sandbox::sized_handler(handler, linux.as_ref())?;
        // The pod's network first: its namespace, CNI ADD there.
        let mut addressed = None;
        if let (Some(netns), Some(network)) = (rec.netns.clone(), network) {
            crate::network::netns::create_netns(&netns)?;
            undo.push(Step::RemoveNetns(netns.clone()));
            self.attach_network(&mut rec, network, undo).await?;
            let result = rec
                .cni
                .as_ref()
                .map(|a| a.result.clone())
                .unwrap_or_default();
            // A network that gives the pod no address (loopback only) gives
            // the VM no NIC.
            if !cni::pod_network(&result).ips.is_empty() {
                addressed = Some((netns, result));
            }
        }
        if handler.hypervisor() == Hypervisor::Vmpod {
            if addressed.is_some() {
                return Err(CriError::FailedPrecondition(
                    "the node's CNI network gives pods an address, but the vmpod hypervisor has \
                     no network device yet; use a handler with hypervisor = \"qemu\""
                        .into(),
                ));
            }
            return self.start_vmm_sandbox(rec, handler, dns, linux, undo).await;
        }
        let dir = self.state.sandbox_dir(&rec.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| CriError::Internal(format!("creating {}: {e}", dir.display())))?;
        undo.push(Step::RemoveDir(dir.clone()));
        let sockets = self.make_socket_dir(&rec.id, undo)?;
        let mut nic = None;
        if let Some((netns, result)) = addressed {
            // The tap dies with the namespace; nothing to undo by itself.
            let guest = vm_network::connect(&netns, &result).await?;
            rec.tap = Some(guest.tap.clone());
            nic = Some(guest);
        }
        let images = self.images.list();
        // Before the VM starts: its share's mounts go before its dir.
        undo.push(Step::TearDownShare(dir.clone()));
        let vm = vm_sandbox::start(&dir, &sockets, handler, &images, nic.as_ref())?;
        undo.push(Step::KillProcess(vm.virtiofsd_pid));
        undo.push(Step::KillVm(vm.vmm_pid, vm.vsock_pid));
        undo.push(Step::RemoveCgroups(rec.cgroup_parent.clone()));
        crate::sandbox::cgroups::join_cgroups(
            &rec.cgroup_parent,
            &[vm.vmm_pid, vm.vsock_pid, vm.virtiofsd_pid],
        )?;
        rec.vmm_pid = Some(vm.vmm_pid);
        rec.vsock_pid = Some(vm.vsock_pid);
        rec.virtiofsd_pid = Some(vm.virtiofsd_pid);
        rec.note_pid(vm.vmm_pid);
        rec.note_pid(vm.vsock_pid);
        rec.note_pid(vm.virtiofsd_pid);
        rec.agent_socket = vm.uds;
        rec.image_disks = vm.image_disks;
        let booted = std::time::Instant::now();
        vm_sandbox::wait_console_ready(&dir, &rec, handler.boot_timeout()).await?;
        let left = handler
            .boot_timeout()
            .saturating_sub(booted.elapsed())
            .max(Duration::from_secs(10));
        let agent = agent_client::connect_ready(&rec.agent_addr(), left)
            .await
            .map_err(|e| {
                CriError::Internal(format!(
                    "the pod VM's agent did not answer: {}\nconsole:\n{}",
                    super::error_chain(&e),
                    vm_sandbox::console_tail(&dir)
                ))
            })?;
        let interfaces = nic.map(|n| vec![n.interface]).unwrap_or_default();
        self.setup(rec, agent, dns, linux, interfaces).await
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
        undo.push(Step::RemoveDir(sockets.clone()));
        Ok(sockets)
    }

    /// SetupSandbox, then the record is persisted: the sandbox exists.
    pub(super) async fn setup(
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

/// One undo step of a half-made sandbox.
#[derive(Debug)]
pub(super) enum Step {
    RemoveDir(std::path::PathBuf),
    RemoveNetns(std::path::PathBuf),
    KillAgent(i32, String),
    KillVm(i32, i32),
    /// SIGKILL one process (virtiofsd, the `vmpod` VMM).
    KillProcess(i32),
    TearDownShare(std::path::PathBuf),
    /// Kill what runs in a pod's cgroups and remove them.
    RemoveCgroups(String),
    /// CNI DEL with these bin dirs.
    CniDel(Vec<std::path::PathBuf>, Box<cni::Attachment>),
}

/// Undo steps, run in reverse on failure.
#[derive(Debug, Default)]
pub(super) struct Rollback(Vec<Step>);

impl Rollback {
    pub(super) fn push(&mut self, step: Step) {
        self.0.push(step);
    }

    async fn run(self) {
        for step in self.0.into_iter().rev() {
            tracing::debug!(?step, "rolling back");
            match step {
                Step::RemoveDir(dir) => {
                    // Never through a mount left under it.
                    if let Err(e) = crate::sandbox::shared_fs::remove_sandbox_dir(&dir) {
                        tracing::warn!(error = %super::error_chain(&e), "removing a sandbox dir");
                    }
                }
                Step::RemoveNetns(path) => crate::network::netns::remove_netns(&path),
                Step::CniDel(bins, att) => {
                    if let Err(e) = cni::del(&bins, &att).await {
                        tracing::warn!(error = %super::error_chain(&e), "CNI DEL on rollback");
                    }
                }
                Step::KillVm(vmm, vsock) => {
                    crate::process::end_process(vmm, Duration::ZERO).await;
                    crate::process::end_process(vsock, Duration::ZERO).await;
                }
                Step::KillProcess(pid) => crate::process::end_process(pid, Duration::ZERO).await,
                Step::RemoveCgroups(parent) => {
                    crate::sandbox::cgroups::remove_cgroups(&parent).await
                }
                Step::TearDownShare(dir) => {
                    if let Err(e) = crate::sandbox::shared_fs::Share::new(&dir).teardown() {
                        tracing::warn!(error = %super::error_chain(&e), "tearing down a pod share");
                    }
                }
                Step::KillAgent(pid, cgroup_parent) => {
                    crate::process::end_process(pid, Duration::ZERO).await;
                    crate::sandbox::cgroups::remove_cgroups(&cgroup_parent).await;
                }
            }
        }
    }
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
