//! StartContainer, StopContainer, RemoveContainer, ReopenContainerLog,
//! UpdateContainerResources, and the task per running container that waits
//! for its exit and records it.

use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1::{
    ContainerEventType, RemoveContainerRequest, RemoveContainerResponse, ReopenContainerLogRequest,
    ReopenContainerLogResponse, StartContainerRequest, StartContainerResponse,
    StopContainerRequest, StopContainerResponse, UpdateContainerResourcesRequest,
    UpdateContainerResourcesResponse,
};
use tonic::transport::Channel;
use vmpod_proto::v1 as agent;
use vmpod_proto::v1::agent_client::AgentClient;

use super::store::ContainerState;
use super::{Container, Cri, CriError, lock, now_ns};

/// After SIGKILL, how long a process gets to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// One WaitProcess call of the exit watcher; it calls again after this.
const WAIT_SLICE: Duration = Duration::from_secs(3600);
/// How long a log pump that ended is left before it counts as dead early.
const PUMP_GRACE: Duration = Duration::from_millis(500);
/// Quick log pump deaths in a row after which it is not restarted.
const PUMP_RESTARTS: u32 = 10;
/// How long the exit watcher lets the log pump drain after the exit.
const LOG_DRAIN: Duration = Duration::from_secs(5);

impl Cri {
    pub(super) async fn start_container(
        self: &Arc<Self>,
        req: StartContainerRequest,
    ) -> Result<StartContainerResponse, CriError> {
        let container = self.container(&req.container_id)?;
        let rec = container.rec();
        let sandbox = self.sandbox(&rec.sandbox_id)?;
        let _op = sandbox.op.lock().await;
        let state = lock(&container.rec).state;
        if state != ContainerState::Created {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is {state:?}, not Created",
                rec.id
            )));
        }
        let mut client = sandbox.agent()?;
        client
            .start_container(agent::StartContainerRequest {
                container_id: rec.id.clone(),
            })
            .await
            .map_err(CriError::agent("StartContainer"))?;
        // The output is copied by a process of its own, which outlives a
        // daemon restart (see log_pump.rs).
        let pump = self.spawn_log_pump(&sandbox.rec(), &rec).await?;
        let rec = {
            let mut r = lock(&container.rec);
            r.state = ContainerState::Running;
            r.started_at = now_ns();
            r.log_pump = Some((pump.pid, pump.start));
            r.clone()
        };
        self.state.save_container(&rec)?;
        self.emit(&rec, ContainerEventType::ContainerStartedEvent);
        self.watch_pump(container.clone());
        self.watch_exit(container, client);
        tracing::info!(container = %rec.id, "container started");
        Ok(StartContainerResponse {})
    }

    /// Starts a container's log pump, in the pod's cgroup (its memory and
    /// CPU count as the pod's). Without a log path it still drains the
    /// pipes, so the container never blocks on them.
    pub(super) async fn spawn_log_pump(
        &self,
        srec: &super::store::SandboxRecord,
        rec: &super::store::ContainerRecord,
    ) -> Result<crate::process::Proc, CriError> {
        let log = if rec.log_path.is_empty() {
            "/dev/null".to_string()
        } else {
            rec.log_path.clone()
        };
        // The file exists once StartContainer returns, as with containerd,
        // even before the container writes anything (critest opens it at
        // once); the pump opens it in append mode later.
        if !rec.log_path.is_empty() {
            crate::logs::create_log_file(std::path::Path::new(&rec.log_path))
                .await
                .map_err(|e| {
                    CriError::Internal(format!("creating the log file {}: {e}", rec.log_path))
                })?;
        }
        let mut cmd = std::process::Command::new(
            crate::self_exe()
                .map_err(|e| CriError::Internal(format!("locating the vmpod binary: {e}")))?,
        );
        cmd.arg("log-pump")
            .arg("--agent")
            .arg(srec.agent_addr().to_string())
            .arg("--container")
            .arg(&rec.id)
            .arg("--log")
            .arg(&log);
        // SAFETY: the closure only calls pthread_sigmask (async-signal-safe)
        // on a set on its own stack.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(
                &mut cmd,
                crate::log_pump::block_sighup_in_child,
            )
        };
        let pid = crate::process::spawn_detached(
            cmd,
            None,
            &self.state.sandbox_dir(&srec.id).join("log-pumps.log"),
        )?;
        let pump = crate::process::Proc::of(pid).ok_or_else(|| {
            CriError::Internal(format!("the log pump of {} ended at once", rec.id))
        })?;
        match crate::sandbox::cgroups::join_cgroups(&srec.cgroup_parent, &[pid]) {
            Ok(()) => {}
            // A container that exits at once has its output copied and
            // its pump gone before it could move: nothing left to place.
            Err(e) if e.source.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => {
                pump.kill();
                return Err(CriError::Sandbox(e.into()));
            }
        }
        Ok(pump)
    }

    /// Keeps a running container's log pump alive: a pump that ends while
    /// its container still runs (killed, crashed) is started again, and
    /// the agent hands the new one the output from where the old one
    /// stopped, so the container never blocks on a full pipe. Restarts
    /// back off, and stop after [`PUMP_RESTARTS`] in a row that each died
    /// within a minute.
    pub(super) fn watch_pump(self: &Arc<Self>, container: Arc<Container>) {
        let cri = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut quick_deaths = 0u32;
            loop {
                let Some((pid, start)) = lock(&container.rec).log_pump else {
                    return;
                };
                let pump = crate::process::Proc { pid, start };
                let since = std::time::Instant::now();
                if let Some(fd) = pump.pidfd() {
                    // SAFETY: `OwnedFd` holds an open pidfd, moves into the
                    // AsyncFd and is closed only when it drops.
                    let Ok(fd) = (unsafe {
                        tokio::io::unix::AsyncFd::register_with_interest(
                            fd,
                            tokio::io::Interest::READABLE,
                        )
                    }) else {
                        return;
                    };
                    let _ = fd.readable().await;
                }
                // Its container's exit ends a pump too: give the exit
                // watcher time to record it first.
                tokio::time::sleep(PUMP_GRACE).await;
                let Some(cri) = cri.upgrade() else {
                    return;
                };
                let rec = container.rec();
                if rec.state != ContainerState::Running || rec.log_pump != Some((pid, start)) {
                    return;
                }
                let Ok(sandbox) = cri.sandbox(&rec.sandbox_id) else {
                    return;
                };
                let _op = sandbox.op.lock().await;
                if sandbox.agent().is_err() || container.rec().state != ContainerState::Running {
                    return;
                }
                quick_deaths = if since.elapsed() < Duration::from_secs(60) {
                    quick_deaths + 1
                } else {
                    1
                };
                if quick_deaths > PUMP_RESTARTS {
                    tracing::error!(container = %rec.id, "the log pump keeps dying; its output is no longer copied");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100) * (1 << quick_deaths.min(6))).await;
                match cri.spawn_log_pump(&sandbox.rec(), &rec).await {
                    Ok(new) => {
                        let r = {
                            let mut r = lock(&container.rec);
                            r.log_pump = Some((new.pid, new.start));
                            r.clone()
                        };
                        if let Err(e) = cri.state.save_container(&r) {
                            tracing::warn!(container = %r.id, error = %super::error_chain(&e), "saving the new log pump");
                        }
                        tracing::warn!(container = %r.id, old = pid, new = new.pid, "the log pump ended early; started a new one");
                    }
                    Err(e) => {
                        tracing::warn!(container = %rec.id, error = %super::error_chain(&e), "restarting the log pump");
                    }
                }
            }
        });
    }

    /// Waits for a running container's exit and records it.
    pub(super) fn watch_exit(
        self: &Arc<Self>,
        container: Arc<Container>,
        mut client: AgentClient<Channel>,
    ) {
        let cri = Arc::clone(self);
        tokio::spawn(async move {
            let id = lock(&container.rec).id.clone();
            let exit = loop {
                let mut req = tonic::Request::new(agent::WaitProcessRequest {
                    container_id: id.clone(),
                    exec_id: String::new(),
                });
                req.set_timeout(WAIT_SLICE);
                match client.wait_process(req).await {
                    Ok(r) => break Ok(r.into_inner()),
                    // tonic reports its own client-side deadline as Cancelled.
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                        ) =>
                    {
                        continue;
                    }
                    Err(s) => break Err(s),
                }
            };
            // The log is complete when the status says exited: the pump
            // ends once it has copied the last bytes.
            let pump = lock(&container.rec).log_pump;
            if let Some((pid, start)) = pump {
                let deadline = std::time::Instant::now() + LOG_DRAIN;
                while crate::process::same_process(pid, start)
                    && std::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let rec = {
                let mut r = lock(&container.rec);
                if r.state != ContainerState::Running {
                    return;
                }
                r.state = ContainerState::Exited;
                match exit {
                    Ok(e) => {
                        r.exit_code = e.exit_code;
                        r.finished_at = if e.exited_at > 0 {
                            e.exited_at
                        } else {
                            now_ns()
                        };
                        r.reason = if e.oom_killed {
                            "OOMKilled"
                        } else if e.exit_code == 0 {
                            "Completed"
                        } else {
                            "Error"
                        }
                        .into();
                    }
                    Err(status) => {
                        r.exit_code = 255;
                        r.finished_at = now_ns();
                        r.reason = "Unknown".into();
                        r.message = format!("lost the container's agent: {}", status.message());
                    }
                }
                r.clone()
            };
            if let Err(e) = cri.state.save_container(&rec) {
                tracing::warn!(container = %id, error = %super::error_chain(&e), "persisting the exit");
            }
            cri.emit(&rec, ContainerEventType::ContainerStoppedEvent);
            tracing::info!(container = %id, exit_code = rec.exit_code, reason = %rec.reason, "container exited");
        });
    }

    pub(super) async fn stop_container(
        &self,
        req: StopContainerRequest,
    ) -> Result<StopContainerResponse, CriError> {
        // Idempotent, as the CRI asks: a container that is gone is stopped.
        let container = match self.container(&req.container_id) {
            Ok(c) => c,
            Err(CriError::NotFound(_)) => return Ok(StopContainerResponse {}),
            Err(e) => return Err(e),
        };
        let rec = container.rec();
        if rec.state != ContainerState::Running {
            return Ok(StopContainerResponse {});
        }
        let sandbox = self.sandbox(&rec.sandbox_id)?;
        let Ok(mut client) = sandbox.agent() else {
            return Ok(StopContainerResponse {});
        };
        let timeout = Duration::from_secs(u64::try_from(req.timeout).unwrap_or(0));
        let mut exited = false;
        if !timeout.is_zero() {
            let first = if rec.stop_signal > 0 {
                rec.stop_signal
            } else {
                libc::SIGTERM
            };
            let _ = self.signal(&mut client, &rec.id, first).await;
            exited = self.wait_gone(&mut client, &rec.id, timeout).await;
        }
        if !exited {
            let _ = self.signal(&mut client, &rec.id, libc::SIGKILL).await;
            if !self.wait_gone(&mut client, &rec.id, KILL_WAIT).await {
                return Err(CriError::DeadlineExceeded(format!(
                    "container {} did not exit {KILL_WAIT:?} after SIGKILL",
                    rec.id
                )));
            }
        }
        // The exit watcher records the exit; give it a moment so the status
        // the kubelet reads next says EXITED.
        for _ in 0..200 {
            if lock(&container.rec).state != ContainerState::Running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(StopContainerResponse {})
    }

    async fn signal(
        &self,
        client: &mut AgentClient<Channel>,
        id: &str,
        signal: i32,
    ) -> Result<(), tonic::Status> {
        client
            .signal_process(agent::SignalProcessRequest {
                container_id: id.into(),
                exec_id: String::new(),
                signal: signal.unsigned_abs(),
            })
            .await
            .map(|_| ())
    }

    /// Waits for the container's process to exit, up to `timeout`.
    async fn wait_gone(
        &self,
        client: &mut AgentClient<Channel>,
        id: &str,
        timeout: Duration,
    ) -> bool {
        let mut req = tonic::Request::new(agent::WaitProcessRequest {
            container_id: id.into(),
            exec_id: String::new(),
        });
        req.set_timeout(timeout);
        match client.wait_process(req).await {
            Ok(_) => true,
            Err(s) => s.code() == tonic::Code::NotFound,
        }
    }

    pub(super) async fn remove_container(
        &self,
        req: RemoveContainerRequest,
    ) -> Result<RemoveContainerResponse, CriError> {
        let container = match self.container(&req.container_id) {
            Ok(c) => c,
            Err(CriError::NotFound(_)) => return Ok(RemoveContainerResponse {}),
            Err(e) => return Err(e),
        };
        let rec = container.rec();
        if let Ok(sandbox) = self.sandbox(&rec.sandbox_id) {
            let _op = sandbox.op.lock().await;
            if let Ok(mut client) = sandbox.agent() {
                // The agent kills what still runs and releases the rootfs.
                match client
                    .remove_container(agent::RemoveContainerRequest {
                        container_id: rec.id.clone(),
                    })
                    .await
                {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(s) => return Err(CriError::agent("RemoveContainer")(s)),
                }
            }
            // The backend lets go of the container's volumes and, once the
            // agent released the rootfs, of images no other container of
            // the pod uses (a vmpod VM's block slots).
            let srec = sandbox.rec();
            if let Some(mut backend) = srec.backend.clone() {
                let dir = self.state.sandbox_dir(&srec.id);
                backend.withdraw(&dir, &rec.id)?;
                // Its writable layer on disk, if it had one.
                crate::sandbox::scratch::remove(&crate::sandbox::scratch::path(&dir, &rec.id))
                    .map_err(|e| {
                        CriError::Internal(format!(
                            "removing the writable layer of {}: {e}",
                            rec.id
                        ))
                    })?;
                if lock(&sandbox.agent).is_some() {
                    let in_use: std::collections::BTreeSet<String> = self
                        .containers_of(&srec.id)
                        .iter()
                        .map(|c| c.rec())
                        .filter(|c| c.id != rec.id)
                        .map(|c| c.image_id)
                        .collect();
                    backend.release_images(&in_use).await;
                }
                if srec.backend.as_ref() != Some(&backend) {
                    let r = {
                        let mut r = lock(&sandbox.rec);
                        r.backend = Some(backend);
                        r.clone()
                    };
                    if let Err(e) = self.state.save_sandbox(&r) {
                        tracing::warn!(sandbox = %r.id, error = %super::error_chain(&e), "saving the sandbox");
                    }
                }
            }
        }
        {
            let mut r = lock(&container.rec);
            if r.state == ContainerState::Running {
                r.state = ContainerState::Exited;
                r.finished_at = now_ns();
                r.exit_code = 137;
                r.reason = "Error".into();
            }
        }
        if let Some((pid, start)) = rec.log_pump
            && crate::process::same_process(pid, start)
        {
            crate::process::end_process(pid, LOG_DRAIN).await;
        }
        self.state.delete_container(&rec.sandbox_id, &rec.id);
        lock(&self.containers).remove(&rec.id);
        self.emit(&container.rec(), ContainerEventType::ContainerDeletedEvent);
        tracing::info!(container = %rec.id, "container removed");
        Ok(RemoveContainerResponse {})
    }

    pub(super) async fn reopen_container_log(
        &self,
        req: ReopenContainerLogRequest,
    ) -> Result<ReopenContainerLogResponse, CriError> {
        let rec = self.container(&req.container_id)?.rec();
        let pump = rec
            .log_pump
            .filter(|&(pid, start)| crate::process::same_process(pid, start));
        let (Some((pid, _)), false) = (pump, rec.log_path.is_empty()) else {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is not running or has no log",
                rec.id
            )));
        };
        let path = std::path::PathBuf::from(&rec.log_path);
        // The kubelet renamed the old file away. Make the new one here, so it
        // exists when this call returns, then have the pump switch to it.
        crate::logs::create_log_file(&path).await.map_err(|e| {
            CriError::Internal(format!("creating the log file {}: {e}", path.display()))
        })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .map_err(|e| CriError::Internal(format!("signalling the log pump: {e}")))?;
        Ok(ReopenContainerLogResponse {})
    }

    pub(super) async fn update_container_resources(
        &self,
        req: UpdateContainerResourcesRequest,
    ) -> Result<UpdateContainerResourcesResponse, CriError> {
        let container = self.container(&req.container_id)?;
        let rec = container.rec();
        let sandbox = self.sandbox(&rec.sandbox_id)?;
        let Some(linux) = req.linux else {
            return Ok(UpdateContainerResourcesResponse {});
        };
        sandbox
            .agent()?
            .update_container(agent::UpdateContainerRequest {
                container_id: rec.id,
                resources: Some(super::container_create::resources(&linux)),
            })
            .await
            .map_err(CriError::agent("UpdateContainer"))?;
        Ok(UpdateContainerResourcesResponse {})
    }
}
