//! HTTP/1.1 front of the streaming server: routes `/exec/<token>`,
//! `/attach/<token>` and `/portforward/<token>`, negotiates the
//! sub-protocol and upgrades the connection to SPDY/3.1.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::remotecommand::Protocol;
use super::spdy::conn::{self, Limits};
use super::{Session, StreamingServer, portforward, remotecommand, websocket};

/// Connections (upgraded sessions included) served at once.
const MAX_CONNECTIONS: usize = 1024;
/// Streams open at once on one connection (32 forwarded connections take
/// 64).
const MAX_STREAMS: usize = 256;
/// The header with which client and server agree on a sub-protocol.
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
/// Sent with a 403 when no offered sub-protocol is served.
const ACCEPTED_HEADER: &str = "x-accepted-stream-protocol-versions";
/// The port-forward sub-protocol.
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

type Body = Full<Bytes>;
type PermitSlot = std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>;

pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    server: Arc<StreamingServer>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, _peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a streaming connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let server = server.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let creation = server.config.stream_creation_timeout();
            match tls {
                None => serve_connection(tcp, permit, server).await,
                Some(acceptor) => {
                    // The handshake counts against the creation timeout
                    // too: a client that never finishes it holds nothing.
                    match tokio::time::timeout(creation, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => serve_connection(tls, permit, server).await,
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "a streaming TLS handshake failed")
                        }
                        Err(_) => tracing::info!("a streaming TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serves one HTTP/1.1 connection (plain TCP or TLS) until its request is
/// answered; an upgraded session goes on in its own task, with the permit.
async fn serve_connection<I>(
    io: I,
    permit: tokio::sync::OwnedSemaphorePermit,
    server: Arc<StreamingServer>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let slot = Arc::new(std::sync::Mutex::new(Some(permit)));
    let handler_server = server.clone();
    let handler_slot = slot.clone();
    let service = hyper::service::service_fn(move |req| {
        let server = handler_server.clone();
        let slot = handler_slot.clone();
        async move { Ok::<_, Infallible>(server.handle(req, &slot)) }
    });
    // Keep-alive stays on: with it off, hyper answers the upgrade
    // with "Connection: Upgrade, close", which client-go refuses.
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    // Until the request is read and answered; an upgraded session
    // runs in its own task, holding the permit.
    let _ = tokio::time::timeout(server.config.stream_creation_timeout(), conn).await;
}

fn plain(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg.into() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether a comma-separated header (any of its occurrences) holds `token`.
fn header_has(req: &Request<Incoming>, name: hyper::header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// The client's offered sub-protocols, in its order of preference.
fn offered(req: &Request<Incoming>) -> Vec<String> {
    req.headers()
        .get_all(PROTOCOL_HEADER)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

impl StreamingServer {
    fn handle(self: &Arc<Self>, mut req: Request<Incoming>, permit: &PermitSlot) -> Response<Body> {
        let path = req.uri().path().to_string();
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if !matches!(kind, "exec" | "attach" | "portforward") || token.is_empty() {
            return plain(StatusCode::NOT_FOUND, "not found");
        }
        let Some(session) = self.tokens.take(token) else {
            return plain(StatusCode::NOT_FOUND, "unknown or expired token");
        };
        if session.path() != kind {
            return plain(StatusCode::NOT_FOUND, "unknown or expired token");
        }
        let is_upgrade = header_has(&req, CONNECTION, "upgrade");
        if is_upgrade && header_has(&req, UPGRADE, "websocket") {
            return self.upgrade_websocket(req, session, permit);
        }
        if !is_upgrade || !header_has(&req, UPGRADE, "spdy/3.1") {
            return plain(
                StatusCode::BAD_REQUEST,
                "this endpoint needs an upgrade to SPDY/3.1",
            );
        }
        let offered = offered(&req);
        let served: &[&str] = match session {
            Session::PortForward(_) => &[PORT_FORWARD_PROTOCOL],
            _ => Protocol::SPDY_NAMES,
        };
        // The first offered that is served; none offered is the oldest.
        let chosen = if offered.is_empty() {
            served[served.len() - 1]
        } else {
            match offered
                .iter()
                .find_map(|o| served.iter().find(|s| **s == o))
            {
                Some(p) => *p,
                None => {
                    let mut r = plain(
                        StatusCode::FORBIDDEN,
                        format!(
                            "unable to upgrade: unable to negotiate protocol: client supports \
                             {offered:?}, server accepts {served:?}"
                        ),
                    );
                    for s in served {
                        r.headers_mut()
                            .append(ACCEPTED_HEADER, HeaderValue::from_static(s));
                    }
                    return r;
                }
            }
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let limits = Limits {
            max_streams: MAX_STREAMS,
            idle_timeout: self.config.idle_timeout(),
        };
        let creation = self.config.stream_creation_timeout();
        let permit = permit.lock().unwrap_or_else(|e| e.into_inner()).take();
        tokio::spawn(async move {
            let _permit = permit;
            let io = match on_upgrade.await {
                Ok(io) => TokioIo::new(io),
                Err(e) => {
                    tracing::info!(error = %e, "a streaming upgrade failed");
                    return;
                }
            };
            let (incoming, handle) = conn::start(io, limits);
            match session {
                Session::PortForward(pf) => {
                    portforward::serve(pf, incoming, handle, creation).await;
                }
                other => {
                    let protocol = Protocol::from_name(chosen).unwrap_or(Protocol::V1);
                    remotecommand::serve_spdy(other, protocol, incoming, handle, creation).await;
                }
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        h.insert(PROTOCOL_HEADER, HeaderValue::from_static(chosen));
        r
    }

    /// The WebSocket upgrade (RFC 6455) for exec and attach.
    fn upgrade_websocket(
        &self,
        mut req: Request<Incoming>,
        session: Session,
        permit: &PermitSlot,
    ) -> Response<Body> {
        let forward_ports = match &session {
            Session::PortForward(pf) => match ws_ports(&req, &pf.ports) {
                Ok(p) => Some(p),
                Err(msg) => return plain(StatusCode::BAD_REQUEST, msg),
            },
            _ => None,
        };
        let names: &[&str] = if forward_ports.is_some() {
            websocket::PORT_FORWARD_NAMES
        } else {
            websocket::NAMES
        };
        let Some(key) = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| k.as_bytes().to_vec())
        else {
            return plain(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is required");
        };
        let offered: Vec<String> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        let chosen: &'static str = if offered.is_empty() {
            ""
        } else {
            match offered.iter().find_map(|o| names.iter().find(|n| **n == o)) {
                Some(n) => n,
                None => {
                    return plain(
                        StatusCode::FORBIDDEN,
                        format!(
                            "unable to negotiate a WebSocket sub-protocol: client supports \
                             {offered:?}, server accepts {names:?}"
                        ),
                    );
                }
            }
        };
        let Some(protocol) = websocket::WsProtocol::from_name(chosen) else {
            return plain(StatusCode::FORBIDDEN, "unknown sub-protocol");
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let permit = permit.lock().unwrap_or_else(|e| e.into_inner()).take();
        tokio::spawn(async move {
            let _permit = permit;
            let io = match on_upgrade.await {
                Ok(io) => TokioIo::new(io),
                Err(e) => return tracing::info!(error = %e, "a WebSocket upgrade failed"),
            };
            match (session, forward_ports) {
                (Session::PortForward(pf), Some(ports)) => {
                    websocket::serve_port_forward(pf, ports, protocol, io).await
                }
                (session, _) => websocket::serve(session, protocol, io).await,
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert("sec-websocket-accept", v);
        }
        if !chosen.is_empty() {
            h.insert("sec-websocket-protocol", HeaderValue::from_static(chosen));
        }
        r
    }
}

/// The `port` query parameters of a WebSocket port-forward, each allowed by
/// the CRI request (when it named any).
fn ws_ports(req: &Request<Incoming>, allowed: &[u16]) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in req.uri().query().unwrap_or("").split('&') {
        if let Some(v) = pair.strip_prefix("port=") {
            let port = v
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("invalid port {v:?}"))?;
            if !allowed.is_empty() && !allowed.contains(&port) {
                return Err(format!(
                    "port {port} was not asked for in the PortForward request"
                ));
            }
            ports.push(port);
        }
    }
    if ports.is_empty() || ports.len() > 64 {
        return Err("between 1 and 64 port query parameters are required".into());
    }
    Ok(ports)
}
