//! The host side of Firecracker-style hybrid vsock.
//!
//! The VMM exposes `<vm dir>/vsock.sock`. The host connects, writes
//! `CONNECT <port>\n`, reads `OK <host port>\n`, and from then on the unix
//! stream is a raw vsock connection to the guest listener on `port`.
//!
//! The reply is read one byte at a time: the peer's first bytes (for tonic,
//! the server's HTTP/2 SETTINGS frame) can follow the `OK` line in the same
//! segment, and a buffered reader would swallow them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The longest reply line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 32;

/// Errors from the hybrid vsock handshake.
#[derive(Debug, thiserror::Error)]
pub enum HybridVsockError {
    #[error("connecting to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake with {path} for port {port}")]
    Io {
        path: PathBuf,
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("no handshake reply from {path} for port {port} within {timeout:?}")]
    Timeout {
        path: PathBuf,
        port: u32,
        timeout: Duration,
    },
    #[error("{path} refused port {port}: {reply:?}")]
    Refused {
        path: PathBuf,
        port: u32,
        reply: String,
    },
    #[error(
        "{path} closed the connection before answering for port {port} (nothing listens there yet?)"
    )]
    Closed { path: PathBuf, port: u32 },
}

/// Connects to guest `port` through the hybrid vsock socket at `uds`.
pub async fn connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HybridVsockError> {
    let handshake = async {
        let mut stream =
            UnixStream::connect(uds)
                .await
                .map_err(|source| HybridVsockError::Connect {
                    path: uds.to_path_buf(),
                    source,
                })?;
        let io_err = |source| HybridVsockError::Io {
            path: uds.to_path_buf(),
            port,
            source,
        };
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(io_err)?;
        let mut reply = Vec::with_capacity(MAX_REPLY);
        loop {
            let mut byte = [0u8; 1];
            if stream.read(&mut byte).await.map_err(io_err)? == 0 {
                return Err(HybridVsockError::Closed {
                    path: uds.to_path_buf(),
                    port,
                });
            }
            if byte[0] == b'\n' {
                break;
            }
            reply.push(byte[0]);
            if reply.len() > MAX_REPLY {
                return Err(refused(uds, port, &reply));
            }
        }
        parse_ok(&reply).ok_or_else(|| refused(uds, port, &reply))?;
        Ok(stream)
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| HybridVsockError::Timeout {
            path: uds.to_path_buf(),
            port,
            timeout,
        })?
}

fn refused(uds: &Path, port: u32, reply: &[u8]) -> HybridVsockError {
    HybridVsockError::Refused {
        path: uds.to_path_buf(),
        port,
        reply: String::from_utf8_lossy(reply).into_owned(),
    }
}

/// `OK <host port>` → the host port.
fn parse_ok(line: &[u8]) -> Option<u32> {
    std::str::from_utf8(line)
        .ok()?
        .strip_prefix("OK ")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn parses_only_ok_lines() {
        assert_eq!(parse_ok(b"OK 1073741824"), Some(1_073_741_824));
        assert_eq!(parse_ok(b"OK x"), None);
        assert_eq!(parse_ok(b"ERR"), None);
        assert_eq!(parse_ok(b""), None);
    }

    /// A fake VMM side: answers the handshake and sends the first payload
    /// bytes in the same write, as a real peer may.
    async fn fake_vmm(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(reply).await.unwrap();
            // Keep the stream open for the client's reads.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn keeps_payload_that_arrives_with_the_ok_line() {
        let (_dir, path) = fake_vmm(b"OK 1073741824\nPAYLOAD").await;
        let mut stream = connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        let mut payload = [0u8; 7];
        stream.read_exact(&mut payload).await.unwrap();
        assert_eq!(&payload, b"PAYLOAD");
    }

    #[tokio::test]
    async fn refusals_and_endless_lines_are_errors() {
        let (_dir, path) = fake_vmm(b"NOPE\n").await;
        assert!(matches!(
            connect(&path, 1024, Duration::from_secs(5)).await,
            Err(HybridVsockError::Refused { .. })
        ));
        let (_dir, path) = fake_vmm(&[b'O'; 100]).await;
        assert!(matches!(
            connect(&path, 1024, Duration::from_secs(5)).await,
            Err(HybridVsockError::Refused { .. })
        ));
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (_dir, path) = fake_vmm(b"").await;
        let err = connect(&path, 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::Timeout { .. }), "{err}");
    }
}
