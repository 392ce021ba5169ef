//! StopPodSandbox, RemovePodSandbox (both idempotent: an unknown ID is
//! success, as the kubelet retries them) and the re-adoption of sandboxes
//! persisted by an earlier daemon.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_cri::v1::{
    ContainerEventType, RemovePodSandboxRequest, RemovePodSandboxResponse, StopPodSandboxRequest,
    StopPodSandboxResponse,
};

use super::store::{ContainerState, SandboxState};
use super::{Container, Cri, CriError, Sandbox, lock, now_ns};
use crate::agent_client;
use crate::sandbox::shared_fs;

/// How long a log pump gets to copy the last output after its pod stopped.
const LOG_PUMP_DRAIN: Duration = Duration::from_secs(2);
/// How long the agent gets to stop everything and exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

impl Cri {
    pub(super) async fn stop_pod_sandbox(
        &self,
        req: StopPodSandboxRequest,
    ) -> Result<StopPodSandboxResponse, CriError> {
        let sandbox = match self.sandbox(&req.pod_sandbox_id) {
            Ok(s) => s,
            Err(CriError::NotFound(_)) => return Ok(StopPodSandboxResponse {}),
            Err(e) => return Err(e),
        };
        let _op = sandbox.op.lock().await;
        self.stop_locked(&sandbox).await?;
        Ok(StopPodSandboxResponse {})
    }

    async fn stop_locked(&self, sandbox: &Sandbox) -> Result<(), CriError> {
        let rec = sandbox.rec();
        let agent = lock(&sandbox.agent).take();
        if let Some(mut agent) = agent {
            let mut req = tonic::Request::new(vmpod_proto::v1::ShutdownRequest {});
            req.set_timeout(SHUTDOWN_TIMEOUT);
            if let Err(status) = agent.shutdown(req).await {
                tracing::warn!(sandbox = %rec.id, %status, "agent Shutdown failed; killing it");
            }
        }
        // Only processes that are still ours: a PID may have been reused.
        if let Some(pid) = rec.agent_pid.filter(|&p| rec.owns(p)) {
            crate::process::end_process(pid, SHUTDOWN_TIMEOUT).await;
        }
        // A VM guest ends by rebooting, which QEMU (-no-reboot) and our
        // VMM (reboot=k) turn into their exit; then QEMU's vsock backend
        // goes. Our VMM is also asked through its control socket.
        if let Some(pid) = rec.vmm_pid.filter(|&p| rec.owns(p)) {
            super::vmm_sandbox::end_vmm(&self.state.sandbox_dir(&rec.id), pid, SHUTDOWN_TIMEOUT)
                .await;
        }
        if let Some(pid) = rec.vsock_pid.filter(|&p| rec.owns(p)) {
            crate::process::end_process(pid, Duration::ZERO).await;
        }
        if let Some(pid) = rec.virtiofsd_pid.filter(|&p| rec.owns(p)) {
            crate::process::end_process(pid, Duration::ZERO).await;
        }
        // Nothing reads the share once the VM is gone: a stopped pod holds
        // no host mounts.
        if rec.is_vm() {
            shared_fs::Share::new(&self.state.sandbox_dir(&rec.id)).teardown()?;
        }
        // Host pods' containers, VM pods' host processes.
        crate::sandbox::cgroups::remove_cgroups(&rec.cgroup_parent).await;
        // CNI DEL while the namespace still exists; a failure fails the
        // stop (the kubelet retries it) with the namespace kept for DEL.
        if let Some(att) = &rec.cni {
            crate::network::cni::del(&self.config.cni.bin_dirs, att).await?;
            let r = {
                let mut r = lock(&sandbox.rec);
                r.cni = None;
                r.tap = None;
                r.clone()
            };
            self.state.save_sandbox(&r)?;
            tracing::info!(sandbox = %rec.id, "pod network detached");
        }
        if let Some(netns) = &rec.netns {
            crate::network::netns::remove_netns(netns);
        }
        for c in self.containers_of(&rec.id) {
            // Log pumps end with their streams; one whose agent vanished
            // without closing them is ended here.
            let pump = lock(&c.rec).log_pump;
            if let Some((pid, start)) = pump
                && crate::process::same_process(pid, start)
            {
                crate::process::end_process(pid, LOG_PUMP_DRAIN).await;
            }
            let changed = {
                let mut r = lock(&c.rec);
                if r.state == ContainerState::Running {
                    r.state = ContainerState::Exited;
                    r.finished_at = now_ns();
                    r.exit_code = 137;
                    r.reason = "Error".into();
                    r.message = "the pod sandbox was stopped".into();
                    Some(r.clone())
                } else {
                    None
                }
            };
            if let Some(r) = changed {
                self.state.save_container(&r)?;
                self.emit(&r, ContainerEventType::ContainerStoppedEvent);
            }
        }
        let rec = {
            let mut r = lock(&sandbox.rec);
            r.state = SandboxState::NotReady;
            r.clone()
        };
        self.state.save_sandbox(&rec)?;
        tracing::info!(sandbox = %rec.id, "pod sandbox stopped");
        Ok(())
    }

    pub(super) async fn remove_pod_sandbox(
        &self,
        req: RemovePodSandboxRequest,
    ) -> Result<RemovePodSandboxResponse, CriError> {
        let sandbox = match self.sandbox(&req.pod_sandbox_id) {
            Ok(s) => s,
            Err(CriError::NotFound(_)) => return Ok(RemovePodSandboxResponse {}),
            Err(e) => return Err(e),
        };
        let _op = sandbox.op.lock().await;
        // Removing a ready pod stops it first (containerd refuses instead;
        // the kubelet always stops first, so both agree for it).
        // A pod whose agent died was never stopped: its network still
        // needs its DEL.
        if lock(&sandbox.rec).state == SandboxState::Ready
            || lock(&sandbox.agent).is_some()
            || lock(&sandbox.rec).cni.is_some()
        {
            self.stop_locked(&sandbox).await?;
        }
        let id = lock(&sandbox.rec).id.clone();
        for c in self.containers_of(&id) {
            let r = c.rec();
            lock(&self.containers).remove(&r.id);
            self.emit(&r, ContainerEventType::ContainerDeletedEvent);
        }
        // Never through a mount left under it: that would delete a
        // volume's files.
        shared_fs::remove_sandbox_dir(&self.state.sandbox_dir(&id))?;
        let _ = std::fs::remove_dir_all(self.state.socket_dir(&id));
        lock(&self.sandboxes).remove(&id);
        tracing::info!(sandbox = %id, "pod sandbox removed");
        Ok(RemovePodSandboxResponse {})
    }

    /// Loads every persisted sandbox and container; reconnects to the
    /// agents of those that were ready. A sandbox whose agent is gone is
    /// NOTREADY, its running containers EXITED with reason Unknown.
    pub async fn adopt(self: &Arc<Self>) {
        super::vmm_sandbox::sweep_unfinished(&self.state).await;
        for (mut rec, containers) in self.state.load() {
            let mut agent = None;
            if rec.state == SandboxState::Ready {
                if rec.main_alive() {
                    match agent_client::connect_ready(&rec.agent_addr(), Duration::from_secs(5))
                        .await
                    {
                        Ok(a) => agent = Some(a),
                        Err(e) => {
                            tracing::warn!(sandbox = %rec.id, error = %super::error_chain(&e), "cannot reach the agent")
                        }
                    }
                }
                if agent.is_none() {
                    rec.state = SandboxState::NotReady;
                    let _ = self.state.save_sandbox(&rec);
                }
            }
            tracing::info!(sandbox = %rec.id, ready = agent.is_some(), "adopted pod sandbox");
            let sandbox = Arc::new(Sandbox {
                rec: Mutex::new(rec.clone()),
                op: tokio::sync::Mutex::new(()),
                agent: Mutex::new(agent.clone()),
            });
            lock(&self.sandboxes).insert(rec.id.clone(), sandbox.clone());
            if agent.is_some() {
                self.monitor(sandbox);
            }
            for mut c in containers {
                if c.state == ContainerState::Running && agent.is_none() {
                    c.state = ContainerState::Exited;
                    c.finished_at = now_ns();
                    c.exit_code = 255;
                    c.reason = "Unknown".into();
                    c.message = "the pod's agent ended while vmpod was down".into();
                    let _ = self.state.save_container(&c);
                }
                let running = c.state == ContainerState::Running;
                let container = Arc::new(Container {
                    rec: Mutex::new(c.clone()),
                });
                lock(&self.containers).insert(c.id.clone(), container.clone());
                if running && let Some(agent) = &agent {
                    self.watch_exit(container, agent.clone());
                }
            }
        }
    }
}
