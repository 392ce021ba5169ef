//! The host side of the agent API: a tonic client for `vmpod.agent.v1`
//! over a unix socket (host sandboxes) or the VMM's hybrid vsock socket
//! (pod VMs).

pub mod hybrid_vsock;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
use vmpod_proto::v1::agent_client::AgentClient;

/// Where an agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddr {
    /// The agent's own unix socket (host sandbox backend).
    Unix(PathBuf),
    /// A hybrid vsock socket exposed by the VMM (or vhost-device-vsock);
    /// the agent listens on `port` inside the guest.
    HybridVsock { uds: PathBuf, port: u32 },
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            AgentAddr::HybridVsock { uds, port } => {
                write!(f, "hybrid-vsock:{}:{port}", uds.display())
            }
        }
    }
}

/// Errors from reaching an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error("cannot reach the agent at {addr}")]
    Connect {
        addr: AgentAddr,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the agent at {addr} did not answer Health within {timeout:?} (last error: {last})")]
    NotReady {
        addr: AgentAddr,
        timeout: Duration,
        last: String,
    },
}

/// Per-call deadline applied by the channel to every request that does not
/// set a shorter one: nothing waits forever on a guest.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to the agent (one attempt).
pub async fn connect(
    addr: &AgentAddr,
    connect_timeout: Duration,
) -> Result<AgentClient<Channel>, AgentClientError> {
    connect_with(addr, connect_timeout, Some(DEFAULT_CALL_TIMEOUT)).await
}

/// Connects for a streaming session (exec, attach, port-forward): no
/// channel-wide call deadline, because a client-streaming call such as
/// WriteStdin answers only when its stream ends, which is the session's
/// end. The session puts a deadline on every other call itself.
pub async fn connect_streaming(
    addr: &AgentAddr,
    connect_timeout: Duration,
) -> Result<AgentClient<Channel>, AgentClientError> {
    connect_with(addr, connect_timeout, None).await
}

async fn connect_with(
    addr: &AgentAddr,
    connect_timeout: Duration,
    call_timeout: Option<Duration>,
) -> Result<AgentClient<Channel>, AgentClientError> {
    // The URI is required by tonic but never resolved: the connector dials.
    let mut endpoint = Endpoint::from_static("http://vmpod-agent").connect_timeout(connect_timeout);
    if let Some(t) = call_timeout {
        endpoint = endpoint.timeout(t);
    }
    let dial = addr.clone();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let dial = dial.clone();
            async move {
                let stream = match &dial {
                    AgentAddr::Unix(path) => tokio::net::UnixStream::connect(path).await?,
                    AgentAddr::HybridVsock { uds, port } => {
                        hybrid_vsock::connect(uds, *port, connect_timeout)
                            .await
                            .map_err(std::io::Error::other)?
                    }
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| AgentClientError::Connect {
            addr: addr.clone(),
            source,
        })?;
    Ok(AgentClient::new(channel))
}

/// Connects and waits until the agent answers Health, retrying while the
/// guest boots (its vsock listener is not there yet), up to `timeout`.
pub async fn connect_ready(
    addr: &AgentAddr,
    timeout: Duration,
) -> Result<AgentClient<Channel>, AgentClientError> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AgentClientError::NotReady {
                addr: addr.clone(),
                timeout,
                last,
            });
        }
        let attempt = left.min(Duration::from_secs(2));
        match connect(addr, attempt).await {
            Ok(mut client) => {
                let mut req = tonic::Request::new(vmpod_proto::v1::HealthRequest {});
                req.set_timeout(attempt);
                match client.health(req).await {
                    Ok(_) => return Ok(client),
                    Err(status) => last = format!("Health: {status}"),
                }
            }
            Err(e) => last = crate::error_chain(&e),
        }
        tokio::time::sleep(
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}
