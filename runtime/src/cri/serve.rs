//! `vmpod serve`: the CRI socket, the runtime, graceful shutdown.
//!
//! Shutdown (SIGTERM/SIGINT) stops serving and leaves every pod running: the
//! next daemon re-adopts them from the state dir.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;

use super::Cri;
use super::image::{ImageResolver, StaticImages, StoreImages};
use super::service::CriService;
use crate::config::Config;
use crate::image::manager::ImageManager;

/// How often UNKNOWN sandboxes (a creation whose undo did not finish) are
/// retried.
const REAPER_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);
use crate::image::service::CriImageService;
use crate::streaming::StreamingServer;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("preparing the socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the static images")]
    Images(#[source] super::image::ImageError),
    #[error("opening the image store")]
    ImageStore(#[source] crate::image::manager::ImageError),
    #[error("starting the streaming server")]
    Streaming(#[source] crate::streaming::StreamingError),
    #[error("serving gRPC")]
    Serve(#[source] tonic::transport::Error),
}

/// The CRI socket's permissions: owner and group (the kubelet's).
pub const SOCKET_MODE: u32 = 0o660;

/// Serves the CRI on `socket` until SIGTERM or SIGINT.
pub async fn serve(config: Config, socket: &Path) -> Result<(), ServeError> {
    // Pin the binary's path now, before an upgrade can replace it (log
    // pumps are this binary re-executed, VMMs the one beside it; see
    // `self_exe`).
    if let Err(e) = crate::self_exe() {
        tracing::warn!(error = %e, "cannot resolve the vmpod binary's path");
    }
    let manager = Arc::new(
        ImageManager::open(&config.state_dir.join("images"), config.image.clone())
            .map_err(ServeError::ImageStore)?,
    );
    // Can this KVM run the `vmpod` hypervisor's guests? Asked once, now,
    // so Status answers from the cache (sandbox::kvm_probe).
    let probes = config.handlers.values().any(|h| {
        crate::sandbox::BackendKind::of(h) == crate::sandbox::BackendKind::Vmm && h.probe_kvm()
    });
    if probes {
        let vmm = crate::vmm_binary();
        if vmm.is_file() {
            let _ = tokio::task::spawn_blocking(move || crate::sandbox::kvm_probe(&vmm)).await;
        }
    }
    let fallback = StaticImages::load(&config.static_images).map_err(ServeError::Images)?;
    let images: Arc<dyn ImageResolver> = Arc::new(StoreImages::new(manager.clone(), fallback));
    let streaming = StreamingServer::start(config.streaming.clone())
        .await
        .map_err(ServeError::Streaming)?;
    let cri = Cri::new(config, images);
    cri.set_streaming(streaming);
    let image_service = CriImageService::new(manager, cri.clone());
    cri.adopt().await;
    cri.spawn_reaper(REAPER_PERIOD);
    let sock_err = |source| ServeError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(sock_err(e)),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(sock_err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(sock_err)?;
    tracing::info!(socket = %socket.display(), "serving CRI v1");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::new(CriService::new(cri)))
        .add_service(ImageServiceServer::new(image_service))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await
        .map_err(ServeError::Serve)?;
    let _ = std::fs::remove_file(socket);
    tracing::info!("stopped serving; pods keep running");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon still serves; it then ends
        // only by SIGKILL, which it survives by design (state on disk).
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
