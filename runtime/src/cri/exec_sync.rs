//! ExecSync: runs a command in a container and returns its exit code and
//! output, each stream capped; the timeout is honoured by killing the
//! process and answering DeadlineExceeded (which the kubelet turns into a
//! probe timeout).

use std::time::Duration;

use k8s_cri::v1::{ExecSyncRequest, ExecSyncResponse};
use vmpod_proto::v1 as agent;

use super::store::{ContainerState, ExecBase};
use super::{Cri, CriError, new_id};

/// Per-stream output cap (the kubelet's own limit for ExecSync replies).
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;
/// The bound for an ExecSync without a timeout: every wait has one.
const NO_TIMEOUT_BOUND: Duration = Duration::from_secs(3600);

/// An exec's process: `args` with what the container's execs inherit.
pub(super) fn exec_process(
    base: &ExecBase,
    args: Vec<String>,
    terminal: bool,
    stdin: bool,
) -> agent::Process {
    agent::Process {
        args,
        env: base.env.clone(),
        cwd: base.cwd.clone(),
        user: Some(agent::User {
            uid: base.uid,
            gid: base.gid,
            username: base.username.clone(),
            additional_gids: base.additional_gids.clone(),
        }),
        terminal,
        stdin,
    }
}

impl Cri {
    pub(super) async fn exec_sync(
        &self,
        req: ExecSyncRequest,
    ) -> Result<ExecSyncResponse, CriError> {
        if req.cmd.is_empty() {
            return Err(CriError::InvalidArgument("cmd is required".into()));
        }
        let container = self.container(&req.container_id)?;
        let rec = container.rec();
        if rec.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        let mut client = self.sandbox(&rec.sandbox_id)?.agent()?;
        let exec_id = format!("exec-{}", &new_id()?[..16]);
        client
            .exec_process(agent::ExecProcessRequest {
                container_id: rec.id.clone(),
                exec_id: exec_id.clone(),
                process: Some(exec_process(&rec.exec_base, req.cmd.clone(), false, false)),
            })
            .await
            .map_err(CriError::agent("ExecProcess"))?;
        let timeout = match u64::try_from(req.timeout) {
            Ok(s) if s > 0 => Duration::from_secs(s),
            _ => NO_TIMEOUT_BOUND,
        };
        let read = |which: agent::read_output_request::Stream| {
            let mut client = client.clone();
            let mut r = tonic::Request::new(agent::ReadOutputRequest {
                container_id: rec.id.clone(),
                exec_id: exec_id.clone(),
                stream: which as i32,
            });
            r.set_timeout(timeout + Duration::from_secs(5));
            async move {
                let mut out = Vec::new();
                let Ok(stream) = client.read_output(r).await else {
                    return out;
                };
                let mut stream = stream.into_inner();
                while let Ok(Some(chunk)) = stream.message().await {
                    // Keep reading past the cap, so the process never
                    // blocks on a full pipe; drop what does not fit.
                    let room = MAX_EXEC_OUTPUT.saturating_sub(out.len());
                    out.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
                }
                out
            }
        };
        let mut wait_req = tonic::Request::new(agent::WaitProcessRequest {
            container_id: rec.id.clone(),
            exec_id: exec_id.clone(),
        });
        // The local timeout below decides; the call's own deadline is a backstop.
        wait_req.set_timeout(timeout + Duration::from_secs(5));
        let mut wait_client = client.clone();
        let (stdout, stderr, exit) = tokio::join!(
            read(agent::read_output_request::Stream::Stdout),
            read(agent::read_output_request::Stream::Stderr),
            async {
                match tokio::time::timeout(timeout, wait_client.wait_process(wait_req)).await {
                    Ok(r) => r.map(|r| Some(r.into_inner())),
                    Err(_) => Ok(None),
                }
                .or_else(|s| {
                    if s.code() == tonic::Code::DeadlineExceeded {
                        Ok(None)
                    } else {
                        Err(s)
                    }
                })
                .inspect(|exit| {
                    if exit.is_none() {
                        // Kill on timeout, so the readers above end too.
                        let mut c = client.clone();
                        let (id, exec_id) = (rec.id.clone(), exec_id.clone());
                        tokio::spawn(async move {
                            let _ = c
                                .signal_process(agent::SignalProcessRequest {
                                    container_id: id,
                                    exec_id,
                                    signal: libc::SIGKILL.unsigned_abs(),
                                })
                                .await;
                        });
                    }
                })
            }
        );
        // The agent keeps an exec's state until told: release it once the
        // process is gone (after the kill above, if it timed out), in a task
        // of its own so a caller that stops waiting cannot skip it.
        let mut c = client.clone();
        let (id, eid) = (rec.id.clone(), exec_id.clone());
        tokio::spawn(async move {
            let mut wait = tonic::Request::new(agent::WaitProcessRequest {
                container_id: id.clone(),
                exec_id: eid.clone(),
            });
            wait.set_timeout(Duration::from_secs(10));
            let _ = c.wait_process(wait).await;
            let _ = c
                .release_process(agent::ReleaseProcessRequest {
                    container_id: id,
                    exec_id: eid,
                })
                .await;
        });
        match exit.map_err(CriError::agent("WaitProcess"))? {
            Some(exit) => Ok(ExecSyncResponse {
                stdout,
                stderr,
                exit_code: exit.exit_code,
            }),
            None => Err(CriError::DeadlineExceeded(format!(
                "command {:?} timed out after {timeout:?}",
                req.cmd
            ))),
        }
    }
}
