//! The streaming server of `vmpod serve`: exec, attach and port-forward, as
//! containerd's CRI plugin and CRI-O run one.
//!
//! ```text
//!  CRI Exec/Attach/PortForward ──validate──► Session ──► TokenStore ──► URL http://ADDR:PORT/exec/<token>
//!  client ──HTTP upgrade (SPDY/3.1)──► server.rs ──take token──► remotecommand.rs | portforward.rs
//!                                                                   │  agent RPCs (host pods and VM pods alike)
//!                                                                   ▼
//!                 ExecProcess, ReadOutput, WriteStdin, CloseStdin, ResizeTty, WaitProcess,
//!                 SignalProcess, ReleaseProcess, AttachOutput, PortForward
//! ```
//!
//! Exec, attach and port-forward speak SPDY/3.1 and WebSocket
//! (channel.k8s.io v1, v4, v5 and base64). Tokens are single-use and live one minute; an
//! unknown, used or expired token is a 404. With `tls_cert_file` and `tls_key_file` set the server
//! speaks HTTPS only (rustls) and its URLs say `https`; without them it is plain HTTP on the
//! default loopback address, where the kubelet (or crictl) on the node reaches it.

mod portforward;
mod remotecommand;
mod server;
pub mod spdy;
pub mod token;
mod websocket;

/// Entry points for the fuzz targets (`fuzz/`): the streaming server's
/// parsers of client input besides SPDY's (`spdy::frame`, `spdy::headers`).
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes a WebSocket message under every sub-protocol and checks
    /// that what decodes round-trips.
    pub fn websocket_message(text: bool, payload: &[u8]) {
        super::websocket::fuzz_message(text, payload)
    }

    /// Feeds a terminal-resize stream split into `chunks`; whether it
    /// stayed well-formed.
    pub fn resize_stream(chunks: &[&[u8]]) -> bool {
        super::remotecommand::fuzz_resize(chunks)
    }
}

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use vmpod_proto::v1 as agent;

use crate::agent_client::AgentAddr;

use token::TokenStore;

/// `[streaming]` in the daemon's config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingConfig {
    /// The address to listen on and to put in URLs. Default `127.0.0.1`;
    /// an unspecified address (`0.0.0.0`, `::`) listens everywhere and
    /// puts loopback in URLs.
    pub address: IpAddr,
    /// The TCP port; 0 (the default) lets the kernel choose.
    pub port: u16,
    /// A connection with no traffic for this long is closed. Default 4 h.
    pub idle_timeout_secs: u64,
    /// How long a client has to open its streams after the upgrade.
    /// Default 30 s.
    pub stream_creation_timeout_secs: u64,
    /// PEM certificate chain (leaf first) to serve HTTPS with; needs
    /// `tls_key_file`. Unset (the default): plain HTTP.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            idle_timeout_secs: 4 * 3600,
            stream_creation_timeout_secs: 30,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl StreamingConfig {
    /// Checks the bounds: both timeouts 1 s ..= 1 week; TLS cert and key
    /// both set (absolute paths) or neither.
    pub fn validate(&self) -> Result<(), StreamingError> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                if !cert.is_absolute() || !key.is_absolute() {
                    return Err(StreamingError::Config(
                        "tls_cert_file and tls_key_file must be absolute paths".into(),
                    ));
                }
            }
            _ => {
                return Err(StreamingError::Config(
                    "tls_cert_file and tls_key_file go together: set both or neither".into(),
                ));
            }
        }
        for (name, v) in [
            ("idle_timeout_secs", self.idle_timeout_secs),
            (
                "stream_creation_timeout_secs",
                self.stream_creation_timeout_secs,
            ),
        ] {
            if !(1..=7 * 24 * 3600).contains(&v) {
                return Err(StreamingError::Config(format!(
                    "{name} must be between 1 and 604800, not {v}"
                )));
            }
        }
        Ok(())
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    fn stream_creation_timeout(&self) -> Duration {
        Duration::from_secs(self.stream_creation_timeout_secs)
    }

    /// The TLS acceptor when TLS is configured: the files are read once,
    /// at start-up.
    fn tls_acceptor(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, StreamingError> {
        let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) else {
            return Ok(None);
        };
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pem_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source: rustls::pki_types::pem::Error| StreamingError::TlsFile { path, source }
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(pem_err(cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err(cert))?;
        if chain.is_empty() {
            return Err(StreamingError::Config(format!(
                "{} holds no PEM certificate",
                cert.display()
            )));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
            .map_err(StreamingError::Tls)?;
        // HTTP/1.1 only: SPDY and WebSocket both upgrade an HTTP/1.1
        // connection (client-go's SPDY dialer asks for exactly this).
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
    }
}

/// Errors of the streaming server.
#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    #[error("binding the streaming server to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    TooManyTokens(#[from] token::TooManyTokens),
    #[error("[streaming]: {0}")]
    Config(String),
    #[error("[streaming]: reading {}", path.display())]
    TlsFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("[streaming]: the TLS certificate and key")]
    Tls(#[source] rustls::Error),
}

/// Which stdio streams a session carries (validated by the CRI call).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stdio {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// A prepared exec: the process to start when the client connects.
#[derive(Debug)]
pub struct ExecSession {
    /// The pod's agent; the session connects when the client does.
    pub agent: AgentAddr,
    pub container_id: String,
    pub process: agent::Process,
    pub stdio: Stdio,
}

/// A prepared attach to a container's own process.
#[derive(Debug)]
pub struct AttachSession {
    /// The pod's agent; the session connects when the client does.
    pub agent: AgentAddr,
    pub container_id: String,
    pub stdio: Stdio,
    /// The container's stdin closes when this attach ends (CRI stdin_once).
    pub stdin_once: bool,
}

/// A prepared port-forward into a pod.
#[derive(Debug)]
pub struct PortForwardSession {
    /// The pod's agent; the session connects when the client does.
    pub agent: AgentAddr,
    pub sandbox_id: String,
    /// The ports the CRI request named; empty = any.
    pub ports: Vec<u16>,
}

/// What a token stands for.
#[derive(Debug)]
pub enum Session {
    Exec(ExecSession),
    Attach(AttachSession),
    PortForward(PortForwardSession),
}

impl Session {
    /// The URL path segment, as containerd's.
    fn path(&self) -> &'static str {
        match self {
            Session::Exec(_) => "exec",
            Session::Attach(_) => "attach",
            Session::PortForward(_) => "portforward",
        }
    }
}

/// Whether the client of a session is gone (its connection closed, broke
/// or idled out), whatever the transport.
#[derive(Clone, Debug)]
pub struct Gone(pub(crate) tokio::sync::watch::Receiver<bool>);

impl Gone {
    /// Resolves once the client is gone.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|&g| g).await;
    }

    pub fn is_gone(&self) -> bool {
        *self.0.borrow()
    }
}

/// The running server: where it listens and its pending sessions.
#[derive(Debug)]
pub struct StreamingServer {
    tokens: TokenStore<Session>,
    config: StreamingConfig,
    local_addr: SocketAddr,
    base_url: String,
}

impl StreamingServer {
    /// Binds and starts serving; runs as long as the daemon.
    pub async fn start(config: StreamingConfig) -> Result<Arc<StreamingServer>, StreamingError> {
        config.validate()?;
        let tls = config.tls_acceptor()?;
        let addr = SocketAddr::new(config.address, config.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StreamingError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StreamingError::Bind { addr, source })?;
        let url_ip = match local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{}", SocketAddr::new(url_ip, local_addr.port()));
        let server = Arc::new(StreamingServer {
            tokens: TokenStore::new(token::TOKEN_TTL),
            config,
            local_addr,
            base_url,
        });
        tracing::info!(addr = %local_addr, tls = tls.is_some(), "serving exec, attach and port-forward");
        tokio::spawn(server::serve(listener, tls, server.clone()));
        Ok(server)
    }

    /// Where the server listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stores `session` and answers the URL the client is to use.
    pub fn url(&self, session: Session) -> Result<String, StreamingError> {
        let path = session.path();
        let token = self.tokens.insert(session)?;
        Ok(format!("{}/{path}/{token}", self.base_url))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fuzzing_entries_take_what_clients_send() {
        super::fuzzing::websocket_message(false, b"\x00hello");
        super::fuzzing::websocket_message(true, b"0aGVsbG8=");
        super::fuzzing::websocket_message(true, b"\xff\xfe");
        super::fuzzing::websocket_message(false, b"");
        assert!(super::fuzzing::resize_stream(&[
            br#"{"Width":80,"#,
            br#""Height":24}"#
        ]));
        assert!(!super::fuzzing::resize_stream(&[b"not json"]));
    }

    use super::*;

    #[test]
    fn tls_cert_and_key_go_together() {
        let cert = Some(PathBuf::from("/etc/vmpod/stream.crt"));
        let key = Some(PathBuf::from("/etc/vmpod/stream.key"));
        let with = |tls_cert_file, tls_key_file| StreamingConfig {
            tls_cert_file,
            tls_key_file,
            ..Default::default()
        };
        assert!(with(None, None).validate().is_ok());
        assert!(with(cert.clone(), key.clone()).validate().is_ok());
        assert!(with(cert.clone(), None).validate().is_err());
        assert!(with(None, key).validate().is_err());
        assert!(
            with(cert, Some(PathBuf::from("stream.key")))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn unreadable_tls_files_are_start_up_errors() {
        let config = StreamingConfig {
            tls_cert_file: Some(PathBuf::from("/nonexistent/vmpod.crt")),
            tls_key_file: Some(PathBuf::from("/nonexistent/vmpod.key")),
            ..Default::default()
        };
        assert!(matches!(
            config.tls_acceptor(),
            Err(StreamingError::TlsFile { .. })
        ));
    }
}
