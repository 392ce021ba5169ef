//! The `vmpod.agent.v1.Agent` gRPC service and the serve loop.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use vmpod_proto::v1::agent_server::{Agent, AgentServer};
use vmpod_proto::v1::{
    HealthRequest, HealthResponse, ShutdownRequest, ShutdownResponse, VersionRequest,
    VersionResponse, health_response,
};

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
    shutdown: Arc<Notify>,
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

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        tracing::info!("shutdown requested");
        // The serve loop drains in-flight calls (this reply included) before
        // it returns and the VM ends.
        self.shutdown.notify_one();
        Ok(Response::new(ShutdownResponse {}))
    }
}

/// Binds `listen`, prints the ready line and serves until Shutdown.
pub async fn run(mode: Mode, listen: Listen) -> Result<(), ServeError> {
    if mode == Mode::Guest {
        tokio::spawn(crate::init::reap_orphans());
    }
    let shutdown = Arc::new(Notify::new());
    let service = AgentServer::new(AgentService {
        mode,
        shutdown: shutdown.clone(),
    });
    let router = tonic::transport::Server::builder().add_service(service);
    let stop = async move { shutdown.notified().await };

    match &listen {
        Listen::Vsock(port) => {
            let listener = transport::bind_vsock(*port).map_err(|source| ServeError::Bind {
                addr: listen.clone(),
                source,
            })?;
            announce(mode, &listen);
            let incoming = listener.incoming().map(|conn| conn.map(VsockConn));
            router
                .serve_with_incoming_shutdown(incoming, stop)
                .await
                .map_err(ServeError::Serve)
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
            let result = router
                .serve_with_incoming_shutdown(incoming, stop)
                .await
                .map_err(ServeError::Serve);
            let _ = std::fs::remove_file(path);
            result
        }
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
