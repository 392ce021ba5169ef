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
        // RuntimeReady: pods of the default handler can start. Other
        // handlers' readiness is in the message and the verbose info; a pod
        // for an unready handler is refused with the reason.
        let handlers = self.handler_readiness();
        let default = self.config.default_handler.clone();
        let default_ready = handlers
            .iter()
            .find(|(name, _)| *name == default)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| Err(format!("the default handler {default:?} is not configured")));
        let unready: Vec<String> = handlers
            .iter()
            .filter_map(|(name, r)| {
                r.as_ref()
                    .err()
                    .map(|why| format!("handler {name:?}: {why}"))
            })
            .collect();
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            info.insert("config".to_string(), format!("{:?}", self.config));
            let per_handler: serde_json::Map<String, serde_json::Value> = handlers
                .iter()
                .map(|(name, r)| {
                    (
                        name.clone(),
                        serde_json::json!({"ready": r.is_ok(), "reason": r.as_ref().err()}),
                    )
                })
                .collect();
            info.insert(
                "handlers".to_string(),
                serde_json::Value::Object(per_handler).to_string(),
            );
        }
        let runtime_handlers = handlers
            .iter()
            .flat_map(|(name, _)| {
                // The default handler is also listed under "".
                let names = if *name == default {
                    vec![String::new(), name.clone()]
                } else {
                    vec![name.clone()]
                };
                names.into_iter().map(|name| k8s_cri::v1::RuntimeHandler {
                    name,
                    features: Some(k8s_cri::v1::RuntimeHandlerFeatures {
                        recursive_read_only_mounts: false,
                        user_namespaces: false,
                    }),
                })
            })
            .collect();
        Ok(StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![
                    condition(
                        "RuntimeReady",
                        default_ready.is_ok(),
                        if default_ready.is_ok() {
                            ""
                        } else {
                            "HandlerNotReady"
                        },
                        &match &default_ready {
                            Ok(()) => unready.join("; "),
                            Err(why) => format!("default handler {default:?}: {why}"),
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
            runtime_handlers,
            ..Default::default()
        })
    }

    /// Every configured handler and whether its pods can start here.
    pub(super) fn handler_readiness(&self) -> Vec<(String, Result<(), String>)> {
        let agent = self.config.agent_binary();
        let mut out: Vec<(String, Result<(), String>)> = self
            .config
            .handlers
            .iter()
            .map(|(name, h)| (name.clone(), crate::sandbox::readiness(h, &agent)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
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
