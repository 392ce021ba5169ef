//! GetContainerEvents: every create/start/stop/delete as it happens, to
//! every subscriber. A subscriber that falls behind by more than the channel
//! holds loses the oldest events (and is told so in the log), it never
//! slows the runtime down.

use k8s_cri::v1::{ContainerEventResponse, ContainerEventType};

use super::container_query::status;
use super::store::ContainerRecord;
use super::{Cri, lock, now_ns};

impl Cri {
    pub(super) fn emit(&self, rec: &ContainerRecord, kind: ContainerEventType) {
        let pod_sandbox_status = lock(&self.sandboxes).get(&rec.sandbox_id).map(|s| {
            let r = s.rec();
            k8s_cri::v1::PodSandboxStatus {
                id: r.id,
                state: if r.state == super::store::SandboxState::Ready {
                    k8s_cri::v1::PodSandboxState::SandboxReady as i32
                } else {
                    k8s_cri::v1::PodSandboxState::SandboxNotready as i32
                },
                created_at: r.created_at,
                metadata: Some(k8s_cri::v1::PodSandboxMetadata {
                    name: r.name,
                    uid: r.uid,
                    namespace: r.namespace,
                    attempt: r.attempt,
                }),
                ..Default::default()
            }
        });
        // No subscriber is not an error.
        let _ = self.events.send(ContainerEventResponse {
            container_id: rec.id.clone(),
            container_event_type: kind as i32,
            created_at: now_ns(),
            pod_sandbox_status,
            containers_statuses: vec![status(rec)],
        });
    }

    pub(super) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ContainerEventResponse> {
        self.events.subscribe()
    }
}
