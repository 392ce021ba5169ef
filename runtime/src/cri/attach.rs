//! Attach: to a running container's own stdio. Its terminal and stdin are
//! what the container was created with; stdin is attached only if the
//! container has one.

use k8s_cri::v1::{AttachRequest, AttachResponse};

use super::exec::checked_stdio;
use super::{Cri, CriError};
use crate::streaming::{AttachSession, Session};

impl Cri {
    pub(super) async fn attach(&self, req: AttachRequest) -> Result<AttachResponse, CriError> {
        let (rec, agent) = self.running_container(&req.container_id)?;
        if req.stdin && !rec.stdio.stdin {
            return Err(CriError::InvalidArgument(format!(
                "container {} was not created with stdin",
                rec.id
            )));
        }
        if req.tty != rec.stdio.tty {
            return Err(CriError::InvalidArgument(format!(
                "tty {} does not match the container's ({})",
                req.tty, rec.stdio.tty
            )));
        }
        let stdio = checked_stdio(req.stdin, req.stdout, req.stderr, req.tty)?;
        let session = Session::Attach(AttachSession {
            agent,
            container_id: rec.id.clone(),
            stdio,
            stdin_once: rec.stdio.stdin_once,
        });
        let url = self.streaming()?.url(session)?;
        Ok(AttachResponse { url })
    }
}
