//! ListContainers and ContainerStatus.

use k8s_cri::v1::{
    Container, ContainerMetadata, ContainerStatus, ContainerStatusRequest, ContainerStatusResponse,
    ImageSpec, ListContainersRequest, ListContainersResponse, Mount,
};

use super::store::{ContainerRecord, ContainerState};
use super::{Cri, CriError, labels_match, lock};

/// The CRI ContainerState value of a record's state.
pub(super) fn cri_state(s: ContainerState) -> i32 {
    use k8s_cri::v1::ContainerState as C;
    (match s {
        ContainerState::Created => C::ContainerCreated,
        ContainerState::Running => C::ContainerRunning,
        ContainerState::Exited => C::ContainerExited,
        ContainerState::Unknown => C::ContainerUnknown,
    }) as i32
}

fn metadata(r: &ContainerRecord) -> ContainerMetadata {
    ContainerMetadata {
        name: r.name.clone(),
        attempt: r.attempt,
    }
}

fn image_spec(r: &ContainerRecord) -> ImageSpec {
    ImageSpec {
        image: r.image.clone(),
        ..Default::default()
    }
}

/// The full CRI status of a record.
pub(super) fn status(r: &ContainerRecord) -> ContainerStatus {
    ContainerStatus {
        id: r.id.clone(),
        metadata: Some(metadata(r)),
        state: cri_state(r.state),
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        exit_code: r.exit_code,
        image: Some(image_spec(r)),
        image_ref: r.image_id.clone(),
        image_id: r.image_id.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: r.labels.clone().into_iter().collect(),
        annotations: r.annotations.clone().into_iter().collect(),
        mounts: r
            .mounts
            .iter()
            .map(|m| Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                propagation: m.propagation,
                ..Default::default()
            })
            .collect(),
        log_path: r.log_path.clone(),
        ..Default::default()
    }
}

impl Cri {
    pub(super) async fn list_containers(
        &self,
        req: ListContainersRequest,
    ) -> Result<ListContainersResponse, CriError> {
        let filter = req.filter.unwrap_or_default();
        let mut containers: Vec<Container> = lock(&self.containers)
            .values()
            .map(|c| c.rec())
            .filter(|r| filter.id.is_empty() || r.id.starts_with(&filter.id))
            .filter(|r| {
                filter.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&filter.pod_sandbox_id)
            })
            .filter(|r| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == cri_state(r.state))
            })
            .filter(|r| labels_match(&r.labels, &filter.label_selector))
            .map(|r| Container {
                id: r.id.clone(),
                pod_sandbox_id: r.sandbox_id.clone(),
                metadata: Some(metadata(&r)),
                image: Some(image_spec(&r)),
                image_ref: r.image_id.clone(),
                image_id: r.image_id.clone(),
                state: cri_state(r.state),
                created_at: r.created_at,
                labels: r.labels.into_iter().collect(),
                annotations: r.annotations.into_iter().collect(),
            })
            .collect();
        containers.sort_by_key(|c| c.created_at);
        Ok(ListContainersResponse { containers })
    }

    pub(super) async fn container_status(
        &self,
        req: ContainerStatusRequest,
    ) -> Result<ContainerStatusResponse, CriError> {
        let rec = self.container(&req.container_id)?.rec();
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            info.insert(
                "info".to_string(),
                serde_json::to_string(&rec).unwrap_or_default(),
            );
        }
        Ok(ContainerStatusResponse {
            status: Some(status(&rec)),
            info,
        })
    }
}
