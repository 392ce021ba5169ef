//! PortForward: one TCP connection to localhost:PORT in the sandbox's
//! network namespace (the agent's own: the pod netns for host pods, the
//! guest's for VM pods), relayed over a bidirectional gRPC stream.
//!
//! Flow control is the transports': a chunk is read from the socket only
//! when the response stream has room (one chunk in flight), and a request
//! chunk is taken only after the previous one was written to the socket, so
//! HTTP/2's windows hold back a fast side and nothing buffers without bound.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::{Status, Streaming};
use vmpod_proto::v1::PortForwardChunk;

/// Largest chunk sent either way (the proto's documented bound).
pub const MAX_CHUNK: usize = 64 * 1024;
/// How long dialing localhost may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Dials `localhost:port` as the kubelet's runtimes do: IPv4 first, then
/// IPv6, and reports the first error if both fail.
async fn dial(port: u16) -> Result<TcpStream, Status> {
    let mut first_error = None;
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => {
                first_error.get_or_insert(format!("dialing localhost:{port}: {e}"));
            }
            Err(_) => {
                first_error.get_or_insert(format!(
                    "dialing localhost:{port}: timed out after {DIAL_TIMEOUT:?}"
                ));
            }
        }
    }
    Err(Status::unavailable(first_error.unwrap_or_default()))
}

/// Starts the relay: reads the port from the first message, dials, and
/// returns the stream of bytes coming back. Ends (and closes the socket)
/// when both directions are done or either side goes away.
pub async fn start(
    mut requests: Streaming<PortForwardChunk>,
) -> Result<tokio::sync::mpsc::Receiver<Result<PortForwardChunk, Status>>, Status> {
    let first = requests
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the first message must name the port"))?;
    let port = u16::try_from(first.port)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| Status::invalid_argument(format!("invalid port {}", first.port)))?;
    let conn = dial(port).await?;
    let (mut rd, mut wr) = conn.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let upstream = async move {
        let mut next = Some(first);
        while let Some(chunk) = next {
            if chunk.data.len() > MAX_CHUNK {
                return Err(Status::invalid_argument(format!(
                    "chunk of {} bytes is larger than {MAX_CHUNK}",
                    chunk.data.len()
                )));
            }
            if !chunk.data.is_empty() {
                wr.write_all(&chunk.data)
                    .await
                    .map_err(|e| Status::unavailable(format!("writing to port {port}: {e}")))?;
            }
            next = requests.message().await?;
        }
        // The client is done sending: half-close, the peer sees EOF.
        let _ = wr.shutdown().await;
        Ok::<_, Status>(wr)
    };
    let downstream_tx = tx.clone();
    let downstream = async move {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let permit = downstream_tx
                .reserve()
                .await
                .map_err(|_| Status::cancelled("the client went away"))?;
            match rd.read(&mut buf).await {
                Ok(0) => {
                    // The peer's half-close, passed on; the other way may
                    // still carry data.
                    permit.send(Ok(PortForwardChunk {
                        port: 0,
                        data: Vec::new(),
                        closed: true,
                    }));
                    return Ok::<_, Status>(());
                }
                Ok(n) => permit.send(Ok(PortForwardChunk {
                    port: 0,
                    data: buf[..n].to_vec(),
                    closed: false,
                })),
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "reading from port {port}: {e}"
                    )));
                }
            }
        }
    };
    tokio::spawn(async move {
        // Both directions run to their end; the first error ends the whole
        // relay (dropping the socket) and is the call's status.
        if let Err(status) = tokio::try_join!(upstream, downstream) {
            let _ = tx.send(Err(status)).await;
        }
    });
    Ok(rx)
}
