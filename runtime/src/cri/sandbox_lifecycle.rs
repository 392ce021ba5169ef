//! StopPodSandbox, RemovePodSandbox (both idempotent: an unknown ID is
//! success, as the kubelet retries them), the re-adoption of sandboxes
//! persisted by an earlier daemon, and the reaper that finishes the undo
//! of UNKNOWN sandboxes.

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
/// How often QEMU guest consoles are checked against their cap.
const CONSOLE_CHECK: Duration = Duration::from_secs(5);
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
        // The backend's processes (only those still ours: a PID may have
        // been reused) and its host mounts.
        if let Some(backend) = &rec.backend {
            backend
                .stop(&self.state.sandbox_dir(&rec.id), SHUTDOWN_TIMEOUT)
                .await?;
        }
        // Log pumps end with their streams once the agent is gone; one
        // that does not is ended here, before the pod's cgroups (where it
        // lives) are emptied.
        for c in self.containers_of(&rec.id) {
            let pump = lock(&c.rec).log_pump;
            if let Some((pid, start)) = pump {
                crate::process::Proc { pid, start }
                    .end(LOG_PUMP_DRAIN)
                    .await;
            }
        }
        // Host pods' containers, VM pods' host processes, log pumps.
        crate::sandbox::cgroups::remove_cgroups(&rec.cgroup_parent).await;
        // CNI DEL while the namespace still exists; a failure fails the
        // stop (the kubelet retries it) with the namespace kept for DEL.
        if let Some(att) = &rec.cni {
            crate::network::cni::del(&self.config.cni.bin_dirs, att).await?;
            let r = {
                let mut r = lock(&sandbox.rec);
                r.cni = None;
                r.clone()
            };
            self.state.save_sandbox(&r)?;
            tracing::info!(sandbox = %rec.id, "pod network detached");
        }
        if let Some(netns) = &rec.netns {
            crate::network::netns::remove_netns(netns);
        }
        for c in self.containers_of(&rec.id) {
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
            if r.state == SandboxState::Ready {
                r.state = SandboxState::NotReady;
            }
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
        if lock(&sandbox.rec).state == SandboxState::Unknown {
            return self.finish_unknown(&sandbox).await;
        }
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
    /// NOTREADY, its running containers EXITED with reason Unknown. A
    /// CREATING record is a creation an earlier daemon did not finish: it
    /// becomes UNKNOWN, and the reaper runs its journaled undo before the
    /// daemon serves.
    pub async fn adopt(self: &Arc<Self>) {
        self.sweep_recordless_dirs();
        for (mut rec, containers) in self.state.load() {
            let mut agent = None;
            match rec.state {
                SandboxState::Creating => {
                    rec.state = SandboxState::Unknown;
                    let _ = self.state.save_sandbox(&rec);
                }
                SandboxState::Ready => {
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
                SandboxState::NotReady | SandboxState::Unknown => {}
            }
            tracing::info!(sandbox = %rec.id, state = ?rec.state, ready = agent.is_some(), "adopted pod sandbox");
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
                    self.watch_pump(container.clone());
                    self.watch_exit(container, agent.clone());
                }
            }
        }
        self.reap().await;
    }

    /// A sandbox dir without a record: a creation that died before its
    /// first journal write. Nothing was started for it yet.
    fn sweep_recordless_dirs(&self) {
        let Ok(entries) = std::fs::read_dir(self.state.sandboxes()) else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path();
            if dir.join("sandbox.json").exists() {
                continue;
            }
            match crate::sandbox::shared_fs::remove_sandbox_dir(&dir) {
                Ok(()) => {
                    tracing::warn!(dir = %dir.display(), "removed a sandbox dir without a record")
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %super::error_chain(&e), "a sandbox dir without a record")
                }
            }
        }
    }

    /// Runs the undo of every UNKNOWN sandbox; those done are gone.
    pub async fn reap(&self) {
        let unknown: Vec<Arc<Sandbox>> = lock(&self.sandboxes)
            .values()
            .filter(|s| lock(&s.rec).state == SandboxState::Unknown)
            .cloned()
            .collect();
        for sandbox in unknown {
            let _op = sandbox.op.lock().await;
            if let Err(e) = self.finish_unknown(&sandbox).await {
                tracing::warn!(error = %super::error_chain(&e), "the reaper could not finish a sandbox");
            }
        }
    }

    /// Housekeeping while the runtime lives: QEMU consoles are capped
    /// every [`CONSOLE_CHECK`], UNKNOWN sandboxes reaped every `period`.
    pub fn spawn_reaper(self: &Arc<Self>, period: Duration) {
        let cri = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_reap = std::time::Instant::now();
            loop {
                tokio::time::sleep(CONSOLE_CHECK.min(period)).await;
                let Some(cri) = cri.upgrade() else {
                    return;
                };
                cri.cap_consoles();
                if last_reap.elapsed() >= period {
                    last_reap = std::time::Instant::now();
                    cri.reap().await;
                }
            }
        });
    }

    /// Cuts back QEMU guest consoles past their cap (the vmpod VMM caps
    /// its own).
    fn cap_consoles(&self) {
        use crate::sandbox::{BackendState, qemu};
        let dirs: Vec<std::path::PathBuf> = lock(&self.sandboxes)
            .values()
            .filter(|s| matches!(lock(&s.rec).backend, Some(BackendState::Qemu(_))))
            .map(|s| self.state.sandbox_dir(&lock(&s.rec).id))
            .collect();
        for dir in dirs {
            match qemu::cap_console(&dir, qemu::CONSOLE_MAX, qemu::CONSOLE_KEEP) {
                Ok(true) => {
                    tracing::info!(dir = %dir.display(), "guest console cut back to its last MiB")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "capping a guest console")
                }
            }
        }
    }

    /// Runs an UNKNOWN sandbox's remaining undo steps (the caller holds its
    /// op lock). Done: the sandbox is gone. Otherwise the steps still to do
    /// are saved and the call fails.
    async fn finish_unknown(
        &self,
        sandbox: &Sandbox,
    ) -> Result<RemovePodSandboxResponse, CriError> {
        let rec = sandbox.rec();
        if rec.state != SandboxState::Unknown {
            return Ok(RemovePodSandboxResponse {});
        }
        // Whatever the backend got to start, even if unjournaled.
        if let Some(backend) = &rec.backend {
            backend.kill();
        }
        let left = crate::sandbox::Rollback::from_steps(rec.undo.clone())
            .run()
            .await;
        if left.is_empty() {
            let _ = std::fs::remove_dir_all(self.state.socket_dir(&rec.id));
            lock(&self.sandboxes).remove(&rec.id);
            tracing::info!(sandbox = %rec.id, "an UNKNOWN pod sandbox is undone and removed");
            return Ok(RemovePodSandboxResponse {});
        }
        let count = left.len();
        let r = {
            let mut r = lock(&sandbox.rec);
            r.undo = left;
            r.clone()
        };
        self.state.save_sandbox(&r)?;
        Err(CriError::Internal(format!(
            "pod sandbox {} is not fully undone yet: {count} steps are left (see its verbose \
             status); vmpod retries them",
            rec.id
        )))
    }
}
