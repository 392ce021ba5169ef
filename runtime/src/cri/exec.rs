//! Exec: validates the request and answers the streaming server's URL for
//! it; the process starts when the client connects (streaming/).

use k8s_cri::v1::{ExecRequest, ExecResponse};

use super::exec_sync::exec_process;
use super::store::{ContainerRecord, ContainerState};
use super::{Cri, CriError};
use crate::streaming::{ExecSession, Session, Stdio};

/// A remotecommand request's streams, checked as the kubelet checks them
/// (the checks Exec and Attach share).
pub(super) fn checked_stdio(
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
) -> Result<Stdio, CriError> {
    if !stdin && !stdout && !stderr {
        return Err(CriError::InvalidArgument(
            "one of stdin, stdout and stderr must be asked for".into(),
        ));
    }
    if tty && stderr {
        return Err(CriError::InvalidArgument(
            "tty and stderr cannot both be true (a terminal has no separate stderr)".into(),
        ));
    }
    Ok(Stdio {
        stdin,
        stdout,
        stderr,
        tty,
    })
}

impl Cri {
    /// A running container's record and its sandbox's agent address.
    pub(super) fn running_container(
        &self,
        id: &str,
    ) -> Result<(ContainerRecord, crate::agent_client::AgentAddr), CriError> {
        let rec = self.container(id)?.rec();
        if rec.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        let sandbox = self.sandbox(&rec.sandbox_id)?;
        // No agent: the pod is not ready.
        sandbox.agent()?;
        Ok((rec, sandbox.rec().agent_addr()))
    }

    pub(super) async fn exec(&self, req: ExecRequest) -> Result<ExecResponse, CriError> {
        if req.cmd.is_empty() {
            return Err(CriError::InvalidArgument("cmd is required".into()));
        }
        let stdio = checked_stdio(req.stdin, req.stdout, req.stderr, req.tty)?;
        let (rec, agent) = self.running_container(&req.container_id)?;
        let session = Session::Exec(ExecSession {
            agent,
            container_id: rec.id.clone(),
            process: exec_process(&rec.exec_base, req.cmd, req.tty, req.stdin),
            stdio,
        });
        let url = self.streaming()?.url(session)?;
        Ok(ExecResponse { url })
    }
}
