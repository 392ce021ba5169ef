//! `vmpod run IMAGE [-- CMD...]`: the one-command demo, as a CRI client of a
//! running `vmpod serve`: a pod, one container, its output on our stdout
//! and stderr, then everything removed. Returns the container's exit code.
//! An image the daemon does not have is pulled through its ImageService
//! (with the daemon's registry configuration) when CreateContainer says
//! NotFound.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint};

/// Errors of `vmpod run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach vmpod serve at {0}")]
    Connect(PathBuf, #[source] tonic::transport::Error),
    #[error("{0} failed")]
    Call(&'static str, #[source] tonic::Status),
    #[error("reading the container log {0}")]
    Log(PathBuf, #[source] std::io::Error),
}

/// What to run.
#[derive(Debug)]
pub struct RunOptions {
    pub socket: PathBuf,
    pub image: String,
    pub command: Vec<String>,
    pub runtime_handler: String,
    /// The daemon's log_dir_root (the pod's log directory goes below it).
    pub log_root: PathBuf,
    /// Upper bound on the whole run.
    pub timeout: Duration,
}

async fn connect(socket: &Path) -> Result<Channel, RunError> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://vmpod")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(180))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| RunError::Connect(socket.to_path_buf(), e))?;
    Ok(channel)
}

/// Runs the container; the pod is removed whatever happens after it ran.
pub async fn run(opts: RunOptions) -> Result<i32, RunError> {
    let channel = connect(&opts.socket).await?;
    let mut cri = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);
    let name = format!("vmpod-run-{}", std::process::id());
    let log_dir = opts.log_root.join(&name);
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: name.clone(),
                    uid: name.clone(),
                    namespace: "vmpod-run".into(),
                    attempt: 0,
                }),
                hostname: "vmpod-run".into(),
                log_directory: log_dir.display().to_string(),
                ..Default::default()
            }),
            runtime_handler: opts.runtime_handler.clone(),
        })
        .await
        .map_err(|s| RunError::Call("RunPodSandbox", s))?
        .into_inner()
        .pod_sandbox_id;
    let result = run_in_pod(&mut cri, &mut images, &pod, &opts, &log_dir).await;
    let _ = cri
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let _ = cri
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await;
    let _ = std::fs::remove_dir_all(&log_dir);
    result
}

async fn run_in_pod(
    cri: &mut RuntimeServiceClient<Channel>,
    images: &mut ImageServiceClient<Channel>,
    pod: &str,
    opts: &RunOptions,
    log_dir: &Path,
) -> Result<i32, RunError> {
    let spec = ImageSpec {
        image: opts.image.clone(),
        ..Default::default()
    };
    let request = || CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "main".into(),
                attempt: 0,
            }),
            image: Some(spec.clone()),
            command: opts.command.clone(),
            log_path: "main.log".into(),
            ..Default::default()
        }),
        sandbox_config: None,
    };
    let created = match cri.create_container(request()).await {
        Err(s) if s.code() == tonic::Code::NotFound => {
            eprintln!("vmpod run: pulling {}", opts.image);
            images
                .pull_image(PullImageRequest {
                    image: Some(spec.clone()),
                    ..Default::default()
                })
                .await
                .map_err(|s| RunError::Call("PullImage", s))?;
            cri.create_container(request()).await
        }
        other => other,
    };
    let container = created
        .map_err(|s| RunError::Call("CreateContainer", s))?
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest {
        container_id: container.clone(),
    })
    .await
    .map_err(|s| RunError::Call("StartContainer", s))?;
    let log = log_dir.join("main.log");
    let mut offset = 0usize;
    let deadline = tokio::time::Instant::now() + opts.timeout;
    loop {
        let status = cri
            .container_status(ContainerStatusRequest {
                container_id: container.clone(),
                verbose: false,
            })
            .await
            .map_err(|s| RunError::Call("ContainerStatus", s))?
            .into_inner()
            .status
            .unwrap_or_default();
        let exited = status.state == ContainerState::ContainerExited as i32;
        offset = print_new_records(&log, offset)?;
        if exited {
            return Ok(status.exit_code);
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("vmpod run: timed out after {:?}", opts.timeout);
            return Ok(124);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Prints the complete records after `offset` (stdout records to stdout,
/// stderr to stderr) and returns the new offset.
fn print_new_records(log: &Path, offset: usize) -> Result<usize, RunError> {
    use std::io::Write;
    let bytes = match std::fs::read(log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(offset),
        Err(e) => return Err(RunError::Log(log.to_path_buf(), e)),
    };
    let Some(new) = bytes.get(offset..) else {
        return Ok(offset);
    };
    let mut used = 0;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    while let Some(nl) = new[used..].iter().position(|&b| b == b'\n') {
        let line = &new[used..used + nl];
        used += nl + 1;
        let mut parts = line.splitn(4, |&b| b == b' ');
        let (_, stream, tag, msg) = (parts.next(), parts.next(), parts.next(), parts.next());
        let msg = msg.unwrap_or_default();
        let sink: &mut dyn Write = if stream == Some(b"stderr") {
            &mut err
        } else {
            &mut out
        };
        let _ = sink.write_all(msg);
        if tag != Some(b"P") {
            let _ = sink.write_all(b"\n");
        }
    }
    let _ = out.flush();
    Ok(offset + used)
}
