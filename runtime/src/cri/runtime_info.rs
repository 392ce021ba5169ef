//! Version, Status, RuntimeConfig, UpdateRuntimeConfig.

use k8s_cri::v1::{
    CgroupDriver, LinuxRuntimeConfiguration, RuntimeCondition, RuntimeConfigRequest,
    RuntimeConfigResponse, RuntimeStatus, StatusRequest, StatusResponse,
    UpdateRuntimeConfigRequest, UpdateRuntimeConfigResponse, VersionRequest, VersionResponse,
};

use super::{Cri, CriError};

/// The CRI API version served.
pub const CRI_API_VERSION: &str = "v1";

impl Cri {
    pub(super) async fn version(&self, _req: VersionRequest) -> Result<VersionResponse, CriError> {
        Ok(VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "vmpod".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        })
    }

    pub(super) async fn status(&self, req: StatusRequest) -> Result<StatusResponse, CriError> {
        let condition = |kind: &str, ok: bool, reason: &str, message: &str| RuntimeCondition {
            r#type: kind.into(),
            status: ok,
            reason: reason.into(),
            message: message.into(),
        };
        let agent = self.config.agent_binary();
        let agent_ok = agent.is_file();
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            info.insert("config".to_string(), format!("{:?}", self.config));
        }
        Ok(StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![
                    condition(
                        "RuntimeReady",
                        agent_ok,
                        if agent_ok { "" } else { "AgentMissing" },
                        &if agent_ok {
                            String::new()
                        } else {
                            format!("the agent binary {} is missing", agent.display())
                        },
                    ),
                    match self.cni.current() {
                        Ok(_) => condition("NetworkReady", true, "", ""),
                        Err(why) => condition(
                            "NetworkReady",
                            false,
                            "NetworkPluginNotReady",
                            &format!("cni config uninitialized: {why}"),
                        ),
                    },
                ],
            }),
            info,
            ..Default::default()
        })
    }

    pub(super) async fn runtime_config(
        &self,
        _req: RuntimeConfigRequest,
    ) -> Result<RuntimeConfigResponse, CriError> {
        Ok(RuntimeConfigResponse {
            linux: Some(LinuxRuntimeConfiguration {
                cgroup_driver: CgroupDriver::Cgroupfs as i32,
            }),
        })
    }

    pub(super) async fn update_runtime_config(
        &self,
        req: UpdateRuntimeConfigRequest,
    ) -> Result<UpdateRuntimeConfigResponse, CriError> {
        // The only setting is the pod CIDR; CNI's IPAM config decides
        // addresses (as with containerd's default template-less setup).
        if let Some(cidr) = req
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
        {
            tracing::info!(%cidr, "pod CIDR updated (addresses come from the CNI IPAM config)");
        }
        Ok(UpdateRuntimeConfigResponse {})
    }
}
