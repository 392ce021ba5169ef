//! PortForward: a ready pod's ports, reached through its agent (which dials
//! localhost inside the pod's network namespace).

use k8s_cri::v1::{PortForwardRequest, PortForwardResponse};

use super::store::SandboxState;
use super::{Cri, CriError};
use crate::streaming::{PortForwardSession, Session};

impl Cri {
    pub(super) async fn port_forward(
        &self,
        req: PortForwardRequest,
    ) -> Result<PortForwardResponse, CriError> {
        let sandbox = self.sandbox(&req.pod_sandbox_id)?;
        let rec = sandbox.rec();
        if rec.state != SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                rec.id
            )));
        }
        sandbox.agent()?;
        let ports = req
            .port
            .iter()
            .map(|&p| {
                u16::try_from(p)
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| CriError::InvalidArgument(format!("invalid port {p}")))
            })
            .collect::<Result<Vec<u16>, _>>()?;
        let session = Session::PortForward(PortForwardSession {
            agent: rec.agent_addr(),
            sandbox_id: rec.id.clone(),
            ports,
        });
        let url = self.streaming()?.url(session)?;
        Ok(PortForwardResponse { url })
    }
}
