//! Where the agent listens: vsock inside a guest, a unix socket on the host.
//! The same gRPC service is served on either.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockStream};
use tonic::transport::server::Connected;

/// A listen address: `vsock:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(port) = s.strip_prefix("vsock:") {
            port.parse()
                .map(Listen::Vsock)
                .map_err(|_| format!("bad vsock port in {s:?}"))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("empty unix socket path".into());
            }
            Ok(Listen::Unix(path.into()))
        } else {
            Err(format!(
                "listen address {s:?} is neither vsock:PORT nor unix:PATH"
            ))
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Vsock(port) => write!(f, "vsock:{port}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Binds a vsock listener on any CID (the guest's own).
pub fn bind_vsock(port: u32) -> io::Result<tokio_vsock::VsockListener> {
    tokio_vsock::VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
}

/// A vsock connection that tonic 0.14 can serve (tokio-vsock implements
/// `Connected` only for older tonic releases).
#[derive(Debug)]
pub struct VsockConn(pub VsockStream);

impl Connected for VsockConn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for VsockConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for VsockConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_listen_addresses() {
        assert_eq!("vsock:1024".parse::<Listen>().unwrap(), Listen::Vsock(1024));
        assert_eq!(
            "unix:/run/a.sock".parse::<Listen>().unwrap().to_string(),
            "unix:/run/a.sock"
        );
        assert!("vsock:x".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
        assert!("tcp:1".parse::<Listen>().is_err());
    }
}
