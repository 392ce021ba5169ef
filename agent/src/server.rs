//! The `vmpod.agent.v1.Agent` gRPC service and the serve loop.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use vmpod_proto::v1::agent_server::{Agent, AgentServer};
use vmpod_proto::v1::*;

use crate::Mode;
use crate::container::Manager;
use crate::process::ProcessTable;
use crate::transport::{self, Listen, VsockConn};

/// Errors that end the serve loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: Listen,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the agent API failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("preparing the sandbox")]
    Prepare(#[source] crate::container::ContainerError),
}

/// The API package this agent serves.
const API_VERSION: &str = "vmpod.agent.v1";

struct AgentService {
    mode: Mode,
    manager: Arc<Manager>,
    shutdown: watch::Sender<bool>,
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            status: health_response::Status::Serving as i32,
        }))
    }

    async fn version(
        &self,
        _: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Response::new(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION.to_string(),
            mode: self.mode.as_str().to_string(),
            kernel_release,
        }))
    }

    async fn setup_sandbox(
        &self,
        req: Request<SetupSandboxRequest>,
    ) -> Result<Response<SetupSandboxResponse>, Status> {
        crate::sandbox::setup(&self.manager, &req.into_inner())?;
        Ok(Response::new(SetupSandboxResponse {}))
    }

    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        self.manager.create(req.into_inner()).await?;
        Ok(Response::new(CreateContainerResponse {}))
    }

    async fn start_container(
        &self,
        req: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        let pid = self.manager.start(&req.into_inner().container_id).await?;
        Ok(Response::new(StartContainerResponse { pid }))
    }

    async fn remove_container(
        &self,
        req: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        self.manager.remove(&req.into_inner().container_id).await?;
        Ok(Response::new(RemoveContainerResponse {}))
    }

    async fn exec_process(
        &self,
        req: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        let req = req.into_inner();
        let process = req
            .process
            .ok_or_else(|| Status::invalid_argument("process is required"))?;
        let pid = self
            .manager
            .exec(&req.container_id, &req.exec_id, process)
            .await?;
        Ok(Response::new(ExecProcessResponse { pid }))
    }

    type ReadOutputStream = tokio_stream::wrappers::ReceiverStream<Result<OutputChunk, Status>>;

    async fn read_output(
        &self,
        req: Request<ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let req = req.into_inner();
        let stderr = match read_output_request::Stream::try_from(req.stream) {
            Ok(read_output_request::Stream::Stdout) => false,
            Ok(read_output_request::Stream::Stderr) => true,
            _ => return Err(Status::invalid_argument("stream must be STDOUT or STDERR")),
        };
        let mut chunks = self
            .manager
            .read_output(&req.container_id, &req.exec_id, stderr)
            .await?;
        // Same bound as the reader: one chunk here, four there.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(chunk) = chunks.recv().await {
                let item = chunk.map(|data| OutputChunk { data }).map_err(Status::from);
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn write_stdin(
        &self,
        req: Request<tonic::Streaming<StdinChunk>>,
    ) -> Result<Response<WriteStdinResponse>, Status> {
        let mut stream = req.into_inner();
        let Some(first) = stream.message().await? else {
            return Ok(Response::new(WriteStdinResponse { written: 0 }));
        };
        let (id, exec_id) = (first.container_id.clone(), first.exec_id.clone());
        let mut written = 0u64;
        let mut next = Some(first);
        while let Some(chunk) = next {
            if !chunk.data.is_empty() {
                self.manager.write_stdin(&id, &exec_id, &chunk.data).await?;
                written += chunk.data.len() as u64;
            }
            next = stream.message().await?;
        }
        Ok(Response::new(WriteStdinResponse { written }))
    }

    async fn close_stdin(
        &self,
        req: Request<CloseStdinRequest>,
    ) -> Result<Response<CloseStdinResponse>, Status> {
        let req = req.into_inner();
        self.manager
            .close_stdin(&req.container_id, &req.exec_id)
            .await?;
        Ok(Response::new(CloseStdinResponse {}))
    }

    async fn resize_tty(
        &self,
        req: Request<ResizeTtyRequest>,
    ) -> Result<Response<ResizeTtyResponse>, Status> {
        let req = req.into_inner();
        self.manager
            .resize(&req.container_id, &req.exec_id, req.rows, req.cols)?;
        Ok(Response::new(ResizeTtyResponse {}))
    }

    async fn signal_process(
        &self,
        req: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        let req = req.into_inner();
        self.manager
            .signal(&req.container_id, &req.exec_id, req.signal)?;
        Ok(Response::new(SignalProcessResponse {}))
    }

    async fn wait_process(
        &self,
        req: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.manager.wait(&req.container_id, &req.exec_id).await?,
        ))
    }

    async fn release_process(
        &self,
        req: Request<ReleaseProcessRequest>,
    ) -> Result<Response<ReleaseProcessResponse>, Status> {
        let req = req.into_inner();
        self.manager
            .release(&req.container_id, &req.exec_id)
            .await?;
        Ok(Response::new(ReleaseProcessResponse {}))
    }

    type AttachOutputStream = tokio_stream::wrappers::ReceiverStream<Result<OutputChunk, Status>>;

    async fn attach_output(
        &self,
        req: Request<ReadOutputRequest>,
    ) -> Result<Response<Self::AttachOutputStream>, Status> {
        let req = req.into_inner();
        let stderr = match read_output_request::Stream::try_from(req.stream) {
            Ok(read_output_request::Stream::Stdout) => false,
            Ok(read_output_request::Stream::Stderr) => true,
            _ => return Err(Status::invalid_argument("stream must be STDOUT or STDERR")),
        };
        let mut chunks = self
            .manager
            .attach_output(&req.container_id, &req.exec_id, stderr)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(data) = chunks.recv().await {
                if tx.send(Ok(OutputChunk { data })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type PortForwardStream =
        tokio_stream::wrappers::ReceiverStream<Result<PortForwardChunk, Status>>;

    async fn port_forward(
        &self,
        req: Request<tonic::Streaming<PortForwardChunk>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        let rx = crate::port_forward::start(req.into_inner()).await?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn update_container(
        &self,
        req: Request<UpdateContainerRequest>,
    ) -> Result<Response<UpdateContainerResponse>, Status> {
        let req = req.into_inner();
        self.manager
            .update(&req.container_id, &req.resources.unwrap_or_default())?;
        Ok(Response::new(UpdateContainerResponse {}))
    }

    async fn stats(&self, req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(
            self.manager.stats(&req.into_inner().container_id)?,
        ))
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        tracing::info!("shutdown requested");
        self.manager.remove_all().await;
        // The serve loop lets in-flight calls (this reply included) finish
        // before the sandbox ends.
        self.shutdown.send_replace(true);
        Ok(Response::new(ShutdownResponse {}))
    }
}

/// Binds `listen`, prints the ready line and serves until Shutdown.
pub async fn run(
    mode: Mode,
    listen: Listen,
    state_dir: PathBuf,
    cgroup_parent: String,
) -> Result<(), ServeError> {
    let table = Arc::new(ProcessTable::default());
    tokio::spawn(crate::process::reap(table.clone()));
    let manager = Arc::new(Manager::new(state_dir, cgroup_parent, table));
    crate::sandbox::prepare(&manager).map_err(ServeError::Prepare)?;
    let (shutdown, requested) = watch::channel(false);
    let service = AgentServer::new(AgentService {
        mode,
        manager,
        shutdown,
    });
    let router = tonic::transport::Server::builder().add_service(service);
    let stop = shutdown_requested(requested.clone());

    match &listen {
        Listen::Vsock(port) => {
            let listener = transport::bind_vsock(*port).map_err(|source| ServeError::Bind {
                addr: listen.clone(),
                source,
            })?;
            announce(mode, &listen);
            let incoming = listener.incoming().map(|conn| conn.map(VsockConn));
            bounded(
                router.serve_with_incoming_shutdown(incoming, stop),
                requested,
            )
            .await
        }
        Listen::Unix(path) => {
            // A stale socket from an earlier agent would make bind fail.
            let _ = std::fs::remove_file(path);
            let listener =
                tokio::net::UnixListener::bind(path).map_err(|source| ServeError::Bind {
                    addr: listen.clone(),
                    source,
                })?;
            announce(mode, &listen);
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let result = bounded(
                router.serve_with_incoming_shutdown(incoming, stop),
                requested,
            )
            .await;
            let _ = std::fs::remove_file(path);
            result
        }
    }
}

/// How long in-flight calls (the Shutdown reply among them) get to finish
/// once Shutdown was asked for. A graceful drain alone would wait for every
/// client to hang up, which a client holding its channel never does.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

async fn shutdown_requested(mut requested: watch::Receiver<bool>) {
    // An error means the sender is gone, which also ends serving.
    let _ = requested.wait_for(|&r| r).await;
}

/// Serves until the graceful drain ends, or SHUTDOWN_GRACE after Shutdown.
async fn bounded(
    serve: impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
    requested: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    tokio::select! {
        result = serve => result.map_err(ServeError::Serve),
        () = async {
            shutdown_requested(requested).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    }
}

/// The ready line goes to stdout (the guest console) in one write, so the
/// launcher that waits for it never sees it torn.
fn announce(mode: Mode, listen: &Listen) {
    use std::io::Write;
    let line = format!(
        "{} version={} api={API_VERSION} mode={} pid={} listen={listen}\n",
        vmpod_proto::READY_LINE_PREFIX,
        env!("CARGO_PKG_VERSION"),
        mode.as_str(),
        std::process::id(),
    );
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}
