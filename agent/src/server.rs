//! The `vmpod.agent.v1.Agent` gRPC service and the serve loop.

use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use vmpod_proto::v1::agent_server::{Agent, AgentServer};
use vmpod_proto::v1::*;

use crate::Mode;
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
}

/// The API package this agent serves.
const API_VERSION: &str = "vmpod.agent.v1";

struct AgentService {
    mode: Mode,
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
        _: Request<SetupSandboxRequest>,
    ) -> Result<Response<SetupSandboxResponse>, Status> {
        Err(not_yet("SetupSandbox"))
    }

    async fn create_container(
        &self,
        _: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        Err(not_yet("CreateContainer"))
    }

    async fn start_container(
        &self,
        _: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        Err(not_yet("StartContainer"))
    }

    async fn remove_container(
        &self,
        _: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        Err(not_yet("RemoveContainer"))
    }

    async fn exec_process(
        &self,
        _: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        Err(not_yet("ExecProcess"))
    }

    type ReadOutputStream = tokio_stream::wrappers::ReceiverStream<Result<OutputChunk, Status>>;

    async fn read_output(
        &self,
        _: Request<ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        Err(not_yet("ReadOutput"))
    }

    async fn write_stdin(
        &self,
        _: Request<tonic::Streaming<StdinChunk>>,
    ) -> Result<Response<WriteStdinResponse>, Status> {
        Err(not_yet("WriteStdin"))
    }

    async fn close_stdin(
        &self,
        _: Request<CloseStdinRequest>,
    ) -> Result<Response<CloseStdinResponse>, Status> {
        Err(not_yet("CloseStdin"))
    }

    async fn resize_tty(
        &self,
        _: Request<ResizeTtyRequest>,
    ) -> Result<Response<ResizeTtyResponse>, Status> {
        Err(not_yet("ResizeTty"))
    }

    async fn signal_process(
        &self,
        _: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        Err(not_yet("SignalProcess"))
    }

    async fn wait_process(
        &self,
        _: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        Err(not_yet("WaitProcess"))
    }

    async fn update_container(
        &self,
        _: Request<UpdateContainerRequest>,
    ) -> Result<Response<UpdateContainerResponse>, Status> {
        Err(not_yet("UpdateContainer"))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Err(not_yet("Stats"))
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        tracing::info!("shutdown requested");
        // The serve loop drains in-flight calls (this reply included) before
        // it returns and the VM ends.
        self.shutdown.send_replace(true);
        Ok(Response::new(ShutdownResponse {}))
    }
}

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented by this agent yet"))
}

/// Binds `listen`, prints the ready line and serves until Shutdown.
pub async fn run(mode: Mode, listen: Listen) -> Result<(), ServeError> {
    if mode == Mode::Guest {
        tokio::spawn(crate::init::reap_orphans());
    }
    let (shutdown, requested) = watch::channel(false);
    let service = AgentServer::new(AgentService { mode, shutdown });
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
