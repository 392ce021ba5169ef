//! Port-forward sessions (`portforward.k8s.io`): for each forwarded
//! connection the client opens an error stream and a data stream with the
//! same `requestID` and a `port`; the pair becomes one agent PortForward
//! call, which dials localhost:PORT in the pod.
//!
//! ```text
//!  data stream ──DATA──► PortForward request (≤ 64 KiB chunks; FIN → half-close)
//!  data stream ◄──DATA── PortForward response (ends → FIN on data and error)
//!  error stream ◄── a dial or relay error, as text (then FIN)
//! ```
//!
//! Backpressure end to end: the SPDY reader waits for the relay, the relay
//! waits for the gRPC stream (HTTP/2 windows), the agent waits for the
//! socket; and back the same way.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use vmpod_proto::v1 as agent;

use super::PortForwardSession;
use super::spdy::conn::{ConnHandle, Stream};
use super::spdy::headers;
use crate::agent_client;

/// Request IDs waiting for their second stream.
const MAX_PENDING: usize = 128;
/// Largest chunk sent to the agent (its bound).
const CHUNK: usize = 64 * 1024;
/// How long reaching the agent may take per forwarded connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Pair {
    error: Option<Stream>,
    data: Option<Stream>,
    port: u16,
}

/// The request ID of a stream: its header, or (older clients) derived from
/// the stream ID as the kubelet does (the data stream follows its error
/// stream).
fn request_id(stream: &Stream, kind: &str) -> String {
    match headers::get(&stream.headers, "requestid") {
        Some(id) if !id.is_empty() => id.to_string(),
        _ if kind == "data" => stream.id.saturating_sub(2).to_string(),
        _ => stream.id.to_string(),
    }
}

pub(super) async fn serve(
    s: PortForwardSession,
    mut incoming: mpsc::Receiver<Stream>,
    conn: ConnHandle,
    creation_timeout: Duration,
) {
    let mut pending: HashMap<String, (Instant, Pair)> = HashMap::new();
    let mut sweep = tokio::time::interval(creation_timeout.min(Duration::from_secs(5)));
    loop {
        let stream = tokio::select! {
            s = incoming.recv() => match s {
                Some(s) => s,
                None => break,
            },
            _ = sweep.tick() => {
                // A half pair whose other stream never came: reset it, so
                // the client's wait for it ends.
                let now = Instant::now();
                let expired: Vec<String> = pending
                    .iter()
                    .filter(|(_, (at, _))| now.duration_since(*at) >= creation_timeout)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in expired {
                    if let Some((_, pair)) = pending.remove(&id) {
                        for s in [pair.error, pair.data].into_iter().flatten() {
                            s.writer.reset().await;
                        }
                    }
                }
                continue;
            }
        };
        let kind = headers::get(&stream.headers, "streamtype")
            .unwrap_or("")
            .to_string();
        if kind != "error" && kind != "data" {
            tracing::debug!(stream_type = %kind, "port-forward: unexpected stream");
            stream.writer.reset().await;
            continue;
        }
        let port = headers::get(&stream.headers, "port")
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&p| p > 0);
        let Some(port) = port else {
            let _ = stream.writer.write(b"invalid or missing port header").await;
            stream.writer.reset().await;
            continue;
        };
        let id = request_id(&stream, &kind);
        if !pending.contains_key(&id) && pending.len() >= MAX_PENDING {
            stream.writer.reset().await;
            continue;
        }
        let (_, pair) = pending
            .entry(id.clone())
            .or_insert_with(|| (Instant::now(), Pair::default()));
        pair.port = port;
        if kind == "error" {
            pair.error = Some(stream);
        } else {
            pair.data = Some(stream);
        }
        if pair.error.is_some() && pair.data.is_some() {
            let Some((_, pair)) = pending.remove(&id) else {
                continue;
            };
            let (Some(error), Some(data)) = (pair.error, pair.data) else {
                continue;
            };
            let allowed = s.ports.is_empty() || s.ports.contains(&port);
            let addr = s.agent.clone();
            let sandbox = s.sandbox_id.clone();
            tokio::spawn(async move {
                if !allowed {
                    let msg = format!("port {port} was not asked for in the PortForward request");
                    let _ = error.writer.write(msg.as_bytes()).await;
                    let _ = error.writer.close().await;
                    let _ = data.writer.close().await;
                    return;
                }
                relay(addr, sandbox, port, error, data).await;
            });
        }
    }
    // The client is gone: relays end as their streams fail.
    conn.shutdown().await;
}

/// One forwarded connection.
async fn relay(
    addr: agent_client::AgentAddr,
    sandbox: String,
    port: u16,
    error: Stream,
    mut data: Stream,
) {
    let fail = |msg: String| {
        let error = error.writer.clone();
        let data = data.writer.clone();
        async move {
            let msg = format!("error forwarding port {port} to pod {sandbox}: {msg}");
            let _ = error.write(msg.as_bytes()).await;
            let _ = error.close().await;
            let _ = data.close().await;
        }
    };
    // Client → pod, until the client's FIN (the request stream ends:
    // half-close) or the relay ends.
    let client_data = std::mem::replace(&mut data.data, mpsc::channel(1).1);
    let (mut down, upstream) = match open_agent_relay(&addr, port, client_data).await {
        Ok(r) => r,
        Err(msg) => return fail(msg).await,
    };
    // Pod → client; the pod's half-close is a FIN on the data stream, and
    // the relay lasts until both directions are done or the client resets.
    let result = loop {
        tokio::select! {
            msg = down.message() => match msg {
                Ok(Some(chunk)) => {
                    if !chunk.data.is_empty() && data.writer.write(&chunk.data).await.is_err() {
                        break Ok(());
                    }
                    if chunk.closed {
                        let _ = data.writer.close().await;
                    }
                }
                Ok(None) => break Ok(()),
                Err(status) => break Err(status.message().to_string()),
            },
            () = data.writer.reset_by_peer() => break Ok(()),
        }
    };
    drop(upstream);
    match result {
        Ok(()) => {
            let _ = data.writer.close().await;
            let _ = error.writer.close().await;
        }
        Err(msg) => fail(msg).await,
    }
}

/// Opens the agent's PortForward stream to `port` in the pod: returns the
/// pod's side (chunks, `closed` when it half-closes) and the task that
/// sends the client's bytes from `client` up in bounded chunks until
/// `client` ends (dropping the guard stops it). Shared by SPDY and
/// WebSocket port-forward.
pub(super) async fn open_agent_relay(
    addr: &agent_client::AgentAddr,
    port: u16,
    mut client: mpsc::Receiver<Vec<u8>>,
) -> Result<(tonic::Streaming<agent::PortForwardChunk>, AbortOnDrop), String> {
    let mut agent = agent_client::connect_streaming(addr, CONNECT_TIMEOUT)
        .await
        .map_err(|e| crate::error_chain(&e))?;
    let (tx, rx) = mpsc::channel(2);
    let _ = tx
        .send(agent::PortForwardChunk {
            port: u32::from(port),
            data: Vec::new(),
            closed: false,
        })
        .await;
    let upstream = AbortOnDrop(tokio::spawn(async move {
        while let Some(bytes) = client.recv().await {
            for piece in bytes.chunks(CHUNK) {
                let chunk = agent::PortForwardChunk {
                    port: 0,
                    data: piece.to_vec(),
                    closed: false,
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        }
    }));
    let down = agent
        .port_forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|status| status.message().to_string())?
        .into_inner();
    Ok((down, upstream))
}

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
