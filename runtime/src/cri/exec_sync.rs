//! ExecSync: runs a command in a container and returns its exit code and
//! output, each stream capped; the timeout is honoured by killing the
//! process and answering DeadlineExceeded (which the kubelet turns into a
//! probe timeout).

use std::time::Duration;

use k8s_cri::v1::{ExecSyncRequest, ExecSyncResponse};
use vmpod_proto::v1 as agent;

use super::store::{ContainerState, ExecBase};
use super::{Cri, CriError, new_id};

/// Cap on stdout and stderr together: the reply must fit the kubelet's
/// 16 MiB gRPC message limit, with room for the rest of the message.
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024 - 64 * 1024;
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
        // The streaming server sets the size of an exec's terminal.
        ..Default::default()
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
        // However this call ends (done, timed out, or dropped at the
        // client's deadline), the agent forgets the process afterwards.
        let _release = Release {
            client: client.clone(),
            container_id: rec.id.clone(),
            exec_id: exec_id.clone(),
        };
        let timeout = match u64::try_from(req.timeout) {
            Ok(s) if s > 0 => Duration::from_secs(s),
            _ => NO_TIMEOUT_BOUND,
        };
        let budget = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(MAX_EXEC_OUTPUT));
        let read = |which: agent::read_output_request::Stream| {
            let budget = budget.clone();
            let mut client = client.clone();
            let mut r = tonic::Request::new(agent::ReadOutputRequest {
                container_id: rec.id.clone(),
                exec_id: exec_id.clone(),
                stream: which as i32,
            });
            r.set_timeout(timeout + Duration::from_secs(5));
            async move {
                use std::sync::atomic::Ordering;
                let mut out = Vec::new();
                let mut dropped = 0usize;
                let mut stream = client.read_output(r).await?.into_inner();
                while let Some(chunk) = stream.message().await? {
                    // Keep reading past the cap, so the process never
                    // blocks on a full pipe; drop what does not fit.
                    let want = chunk.data.len();
                    let took = budget
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                            Some(left - left.min(want))
                        })
                        .map_or(0, |left| left.min(want));
                    out.extend_from_slice(&chunk.data[..took]);
                    dropped += want - took;
                }
                if dropped > 0 {
                    tracing::warn!(
                        ?which,
                        dropped,
                        "ExecSync output beyond {MAX_EXEC_OUTPUT} bytes (stdout and stderr together) dropped"
                    );
                }
                Ok::<_, tonic::Status>(out)
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
        match exit.map_err(CriError::agent("WaitProcess"))? {
            Some(exit) => Ok(ExecSyncResponse {
                // A lost stream is an error, never silently empty output.
                stdout: stdout.map_err(CriError::agent("ReadOutput (stdout)"))?,
                stderr: stderr.map_err(CriError::agent("ReadOutput (stderr)"))?,
                exit_code: exit.exit_code,
            }),
            None => Err(CriError::DeadlineExceeded(format!(
                "command {:?} timed out after {timeout:?}",
                req.cmd
            ))),
        }
    }
}

/// Releases an exec'd process in the agent when dropped, in a task of its
/// own, so a cancelled ExecSync still frees it.
struct Release {
    client: vmpod_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    container_id: String,
    exec_id: String,
}

/// How long releasing an exec may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);

impl Drop for Release {
    fn drop(&mut self) {
        let mut client = self.client.clone();
        let mut req = tonic::Request::new(agent::ReleaseProcessRequest {
            container_id: std::mem::take(&mut self.container_id),
            exec_id: std::mem::take(&mut self.exec_id),
        });
        req.set_timeout(RELEASE_TIMEOUT);
        tokio::spawn(async move {
            if let Err(status) = client.release_process(req).await
                && status.code() != tonic::Code::NotFound
            {
                tracing::warn!(%status, "releasing an exec'd process");
            }
        });
    }
}
