//! PodSandboxStatus and ListPodSandbox.

use k8s_cri::v1::{
    LinuxPodSandboxStatus, ListPodSandboxRequest, ListPodSandboxResponse, Namespace, NamespaceMode,
    NamespaceOption, PodSandbox, PodSandboxMetadata, PodSandboxNetworkStatus, PodSandboxState,
    PodSandboxStatus, PodSandboxStatusRequest, PodSandboxStatusResponse,
};

use super::store::{SandboxRecord, SandboxState};
use super::{Cri, CriError, labels_match, lock};

fn cri_state(s: SandboxState) -> i32 {
    (match s {
        SandboxState::Ready => PodSandboxState::SandboxReady,
        // The CRI has no UNKNOWN for sandboxes; CREATING ones are not
        // listed.
        SandboxState::NotReady | SandboxState::Unknown | SandboxState::Creating => {
            PodSandboxState::SandboxNotready
        }
    }) as i32
}

fn metadata(r: &SandboxRecord) -> PodSandboxMetadata {
    PodSandboxMetadata {
        name: r.name.clone(),
        uid: r.uid.clone(),
        namespace: r.namespace.clone(),
        attempt: r.attempt,
    }
}

/// The pod's own addresses from its CNI result: the first is `ip`, the
/// others `additional_ips` (none for loopback-only and host-network pods).
fn network_status(rec: &SandboxRecord) -> PodSandboxNetworkStatus {
    let ips: Vec<String> = rec
        .cni
        .as_ref()
        .map(|a| crate::network::cni::pod_network(&a.result).ips)
        .unwrap_or_default()
        .into_iter()
        .map(|ip| ip.address.to_string())
        .collect();
    let mut ips = ips.into_iter();
    PodSandboxNetworkStatus {
        ip: ips.next().unwrap_or_default(),
        additional_ips: ips.map(|ip| k8s_cri::v1::PodIp { ip }).collect(),
    }
}

impl Cri {
    /// The sandbox's record, with READY turned NOTREADY when its agent died
    /// since the last call.
    fn fresh_record(&self, sandbox: &super::Sandbox) -> SandboxRecord {
        let mut rec = sandbox.rec();
        if rec.state == SandboxState::Ready && !rec.main_alive() {
            rec.state = SandboxState::NotReady;
            lock(&sandbox.rec).state = SandboxState::NotReady;
            lock(&sandbox.agent).take();
            let _ = self.state.save_sandbox(&rec);
            tracing::warn!(sandbox = %rec.id, "the pod's agent is gone: NOTREADY");
        }
        rec
    }

    pub(super) async fn pod_sandbox_status(
        &self,
        req: PodSandboxStatusRequest,
    ) -> Result<PodSandboxStatusResponse, CriError> {
        let sandbox = self.sandbox(&req.pod_sandbox_id)?;
        let rec = self.fresh_record(&sandbox);
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            let verbose = serde_json::json!({
                "backend": rec.backend,
                "state": rec.state,
                "handler": rec.resolved_handler,
                "pid": rec.main_pid(),
                "agent": rec.agent_addr().to_string(),
                "netns": rec.netns,
                "cniNetwork": rec.cni.as_ref().map(|a| &a.network.name),
                "cniResult": rec.cni.as_ref().map(|a| &a.result),
                "cgroupParent": rec.cgroup_parent,
                "undo": rec.undo,
            });
            info.insert("info".to_string(), verbose.to_string());
        }
        let network_mode = if rec.host_network {
            NamespaceMode::Node
        } else {
            NamespaceMode::Pod
        };
        Ok(PodSandboxStatusResponse {
            status: Some(PodSandboxStatus {
                id: rec.id.clone(),
                metadata: Some(metadata(&rec)),
                state: cri_state(rec.state),
                created_at: rec.created_at,
                network: Some(network_status(&rec)),
                linux: Some(LinuxPodSandboxStatus {
                    namespaces: Some(Namespace {
                        options: Some(NamespaceOption {
                            network: network_mode as i32,
                            pid: rec.pid_mode,
                            ipc: rec.ipc_mode,
                            ..Default::default()
                        }),
                    }),
                }),
                labels: rec.labels.clone().into_iter().collect(),
                annotations: rec.annotations.clone().into_iter().collect(),
                runtime_handler: rec.runtime_handler.clone(),
            }),
            info,
            ..Default::default()
        })
    }

    pub(super) async fn list_pod_sandbox(
        &self,
        req: ListPodSandboxRequest,
    ) -> Result<ListPodSandboxResponse, CriError> {
        let filter = req.filter.unwrap_or_default();
        let sandboxes: Vec<_> = lock(&self.sandboxes).values().cloned().collect();
        let mut items: Vec<PodSandbox> = sandboxes
            .iter()
            .map(|s| self.fresh_record(s))
            .filter(|r| filter.id.is_empty() || r.id.starts_with(&filter.id))
            .filter(|r| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == cri_state(r.state))
            })
            .filter(|r| labels_match(&r.labels, &filter.label_selector))
            .map(|r| PodSandbox {
                id: r.id.clone(),
                metadata: Some(metadata(&r)),
                state: cri_state(r.state),
                created_at: r.created_at,
                labels: r.labels.into_iter().collect(),
                annotations: r.annotations.into_iter().collect(),
                runtime_handler: r.runtime_handler,
            })
            .collect();
        items.sort_by_key(|s| s.created_at);
        Ok(ListPodSandboxResponse { items })
    }
}
