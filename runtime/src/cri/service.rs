//! The tonic face of the runtime: every RPC is one line that goes through
//! [`instrument`] (a span, the latency in the log, the error → Status
//! mapping) to its module.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use k8s_cri::v1::runtime_service_server::RuntimeService;
use k8s_cri::v1::*;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{Cri, CriError};

/// The RuntimeService implementation.
#[derive(Clone, Debug)]
pub struct CriService {
    cri: Arc<Cri>,
}

impl CriService {
    pub fn new(cri: Arc<Cri>) -> CriService {
        CriService { cri }
    }
}

/// Runs one RPC in its span, logs its outcome and latency, and maps its
/// error to a gRPC status: the one place that happens.
pub async fn instrument<T>(
    rpc: &'static str,
    f: impl Future<Output = Result<T, CriError>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!("cri", rpc);
    let start = Instant::now();
    let result = f.instrument(span.clone()).await;
    let _enter = span.enter();
    let micros = start.elapsed().as_micros() as u64;
    match result {
        Ok(v) => {
            tracing::debug!(micros, "ok");
            Ok(Response::new(v))
        }
        Err(e) => {
            let status = e.to_status();
            tracing::info!(micros, code = ?status.code(), error = %status.message(), "failed");
            Err(status)
        }
    }
}

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

macro_rules! rpc {
    ($self:ident, $name:literal, $method:ident, $req:ident) => {
        instrument($name, $self.cri.$method($req.into_inner())).await
    };
}

#[tonic::async_trait]
impl RuntimeService for CriService {
    async fn version(
        &self,
        r: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        rpc!(self, "Version", version, r)
    }
    async fn run_pod_sandbox(
        &self,
        r: Request<RunPodSandboxRequest>,
    ) -> Result<Response<RunPodSandboxResponse>, Status> {
        rpc!(self, "RunPodSandbox", run_pod_sandbox, r)
    }
    async fn stop_pod_sandbox(
        &self,
        r: Request<StopPodSandboxRequest>,
    ) -> Result<Response<StopPodSandboxResponse>, Status> {
        rpc!(self, "StopPodSandbox", stop_pod_sandbox, r)
    }
    async fn remove_pod_sandbox(
        &self,
        r: Request<RemovePodSandboxRequest>,
    ) -> Result<Response<RemovePodSandboxResponse>, Status> {
        rpc!(self, "RemovePodSandbox", remove_pod_sandbox, r)
    }
    async fn pod_sandbox_status(
        &self,
        r: Request<PodSandboxStatusRequest>,
    ) -> Result<Response<PodSandboxStatusResponse>, Status> {
        rpc!(self, "PodSandboxStatus", pod_sandbox_status, r)
    }
    async fn list_pod_sandbox(
        &self,
        r: Request<ListPodSandboxRequest>,
    ) -> Result<Response<ListPodSandboxResponse>, Status> {
        rpc!(self, "ListPodSandbox", list_pod_sandbox, r)
    }
    async fn create_container(
        &self,
        r: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        rpc!(self, "CreateContainer", create_container, r)
    }
    async fn start_container(
        &self,
        r: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        rpc!(self, "StartContainer", start_container, r)
    }
    async fn stop_container(
        &self,
        r: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        rpc!(self, "StopContainer", stop_container, r)
    }
    async fn remove_container(
        &self,
        r: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        rpc!(self, "RemoveContainer", remove_container, r)
    }
    async fn list_containers(
        &self,
        r: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        rpc!(self, "ListContainers", list_containers, r)
    }
    async fn container_status(
        &self,
        r: Request<ContainerStatusRequest>,
    ) -> Result<Response<ContainerStatusResponse>, Status> {
        rpc!(self, "ContainerStatus", container_status, r)
    }
    async fn update_container_resources(
        &self,
        r: Request<UpdateContainerResourcesRequest>,
    ) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
        rpc!(
            self,
            "UpdateContainerResources",
            update_container_resources,
            r
        )
    }
    async fn reopen_container_log(
        &self,
        r: Request<ReopenContainerLogRequest>,
    ) -> Result<Response<ReopenContainerLogResponse>, Status> {
        rpc!(self, "ReopenContainerLog", reopen_container_log, r)
    }
    async fn exec_sync(
        &self,
        r: Request<ExecSyncRequest>,
    ) -> Result<Response<ExecSyncResponse>, Status> {
        rpc!(self, "ExecSync", exec_sync, r)
    }
    async fn exec(&self, r: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        rpc!(self, "Exec", exec, r)
    }
    async fn attach(&self, r: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
        rpc!(self, "Attach", attach, r)
    }
    async fn port_forward(
        &self,
        r: Request<PortForwardRequest>,
    ) -> Result<Response<PortForwardResponse>, Status> {
        rpc!(self, "PortForward", port_forward, r)
    }
    async fn container_stats(
        &self,
        r: Request<ContainerStatsRequest>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        rpc!(self, "ContainerStats", container_stats, r)
    }
    async fn list_container_stats(
        &self,
        r: Request<ListContainerStatsRequest>,
    ) -> Result<Response<ListContainerStatsResponse>, Status> {
        rpc!(self, "ListContainerStats", list_container_stats, r)
    }
    async fn pod_sandbox_stats(
        &self,
        r: Request<PodSandboxStatsRequest>,
    ) -> Result<Response<PodSandboxStatsResponse>, Status> {
        rpc!(self, "PodSandboxStats", pod_sandbox_stats, r)
    }
    async fn list_pod_sandbox_stats(
        &self,
        r: Request<ListPodSandboxStatsRequest>,
    ) -> Result<Response<ListPodSandboxStatsResponse>, Status> {
        rpc!(self, "ListPodSandboxStats", list_pod_sandbox_stats, r)
    }
    async fn update_runtime_config(
        &self,
        r: Request<UpdateRuntimeConfigRequest>,
    ) -> Result<Response<UpdateRuntimeConfigResponse>, Status> {
        rpc!(self, "UpdateRuntimeConfig", update_runtime_config, r)
    }
    async fn status(&self, r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        rpc!(self, "Status", status, r)
    }
    async fn checkpoint_container(
        &self,
        _r: Request<CheckpointContainerRequest>,
    ) -> Result<Response<CheckpointContainerResponse>, Status> {
        Err(Status::unimplemented(
            "CheckpointContainer is not supported",
        ))
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _r: Request<GetEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        use tokio_stream::StreamExt;
        let rx = self.cri.subscribe();
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|item| match item {
                Ok(ev) => Some(Ok(ev)),
                Err(lagged) => {
                    tracing::warn!(%lagged, "an event subscriber fell behind");
                    None
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }
    async fn list_metric_descriptors(
        &self,
        _r: Request<ListMetricDescriptorsRequest>,
    ) -> Result<Response<ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(ListMetricDescriptorsResponse::default()))
    }
    async fn list_pod_sandbox_metrics(
        &self,
        _r: Request<ListPodSandboxMetricsRequest>,
    ) -> Result<Response<ListPodSandboxMetricsResponse>, Status> {
        Ok(Response::new(ListPodSandboxMetricsResponse::default()))
    }
    async fn runtime_config(
        &self,
        r: Request<RuntimeConfigRequest>,
    ) -> Result<Response<RuntimeConfigResponse>, Status> {
        rpc!(self, "RuntimeConfig", runtime_config, r)
    }
}
