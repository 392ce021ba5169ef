//! Exec and attach over WebSocket (`channel.k8s.io` family), as the
//! kubelet's wsstream serves them: every message carries a channel number,
//! stdin 0, stdout 1, stderr 2, error 3, resize 4.
//!
//! ```text
//!  binary (channel.k8s.io, v4., v5.):  [channel byte] data…
//!  text   (base64.channel.k8s.io, v4.base64.):  '0'+channel, then base64(data)
//!  v5 only: [255, channel] from the client closes that channel (stdin EOF)
//! ```
//!
//! On open, an empty message on the lowest writable channel tells the
//! client the session is up. Messages are bounded (1 MiB).
//!
//! Port-forward (`?port=P&port=Q`, sub-protocol "", `v4.channel.k8s.io` or
//! `v4.base64.channel.k8s.io`): one forwarded connection per port, data on
//! channel 2i and errors on 2i+1; each channel's first message is the port
//! (u16, little endian).

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::remotecommand::{self, Channels, Protocol, Sink};
use super::{Gone, PortForwardSession, Session};
use crate::agent_client;

/// Largest message accepted from a client.
const MAX_MESSAGE: usize = 1 << 20;
/// The v5 close signal's marker byte.
const CLOSE_SIGNAL: u8 = 255;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// The WebSocket sub-protocols served for exec and attach, preferred first.
pub const NAMES: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// How a negotiated sub-protocol frames and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsProtocol {
    base64: bool,
    close_signal: bool,
    status: Protocol,
}

impl WsProtocol {
    /// "" (no sub-protocol asked for) is plain binary channels.
    pub fn from_name(name: &str) -> Option<WsProtocol> {
        let (base64, close_signal, status) = match name {
            "v5.channel.k8s.io" => (false, true, Protocol::V4),
            "v4.channel.k8s.io" => (false, false, Protocol::V4),
            "v4.base64.channel.k8s.io" => (true, false, Protocol::V4),
            "channel.k8s.io" | "" => (false, false, Protocol::V1),
            "base64.channel.k8s.io" => (true, false, Protocol::V1),
            _ => return None,
        };
        Some(WsProtocol {
            base64,
            close_signal,
            status,
        })
    }

    fn encode(self, channel: u8, data: &[u8]) -> Message {
        if self.base64 {
            let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
            text.push(char::from(b'0' + channel));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
            Message::Text(text.into())
        } else {
            let mut bytes = Vec::with_capacity(1 + data.len());
            bytes.push(channel);
            bytes.extend_from_slice(data);
            Message::Binary(bytes.into())
        }
    }

    /// A client message as (channel, data); None if malformed.
    fn decode(self, msg: Message) -> Option<(u8, Vec<u8>)> {
        match msg {
            Message::Binary(b) if !self.base64 => {
                let (&channel, data) = b.split_first()?;
                Some((channel, data.to_vec()))
            }
            Message::Text(t) if self.base64 => {
                let (first, rest) = t.as_str().split_at_checked(1)?;
                let channel = first.as_bytes()[0].checked_sub(b'0')?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()?;
                Some((channel, data))
            }
            _ => None,
        }
    }
}

/// Fuzzing entry (see `super::fuzzing`): a client message of `payload`
/// (a text frame when `text`, which must be UTF-8 as tungstenite checks)
/// under every sub-protocol; what decodes re-encodes to the same channel
/// and data.
pub(super) fn fuzz_message(text: bool, payload: &[u8]) {
    let msg = || {
        if text {
            std::str::from_utf8(payload)
                .ok()
                .map(|t| Message::Text(t.to_string().into()))
        } else {
            Some(Message::Binary(payload.to_vec().into()))
        }
    };
    for name in NAMES {
        let Some(protocol) = WsProtocol::from_name(name) else {
            continue;
        };
        let Some((channel, data)) = msg().and_then(|m| protocol.decode(m)) else {
            continue;
        };
        assert!(data.len() <= payload.len());
        let again = protocol.decode(protocol.encode(channel, &data));
        assert_eq!(again, Some((channel, data)), "{name}");
    }
}

/// One writable channel.
struct WsSink {
    channel: u8,
    out: mpsc::Sender<(u8, Vec<u8>)>,
}

#[tonic::async_trait]
impl Sink for WsSink {
    async fn write(&self, data: &[u8]) -> bool {
        for chunk in data.chunks(64 * 1024) {
            if self.out.send((self.channel, chunk.to_vec())).await.is_err() {
                return false;
            }
        }
        true
    }
    async fn close(&self) {}
}

/// Serves an exec or attach on an upgraded WebSocket connection.
pub(super) async fn serve<IO>(session: Session, protocol: WsProtocol, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stdio = match &session {
        Session::Exec(e) => e.stdio,
        Session::Attach(a) => a.stdio,
        Session::PortForward(_) => return,
    };
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_MESSAGE);
    config.max_frame_size = Some(MAX_MESSAGE);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let (gone_tx, gone_rx) = watch::channel(false);
    let gone = Gone(gone_rx);

    let (stdin_tx, stdin_rx) = mpsc::channel(8);
    let (resize_tx, resize_rx) = mpsc::channel(8);
    // Client → channels, until the client closes or breaks the framing.
    let reader = tokio::spawn(async move {
        let mut stdin_tx = Some(stdin_tx);
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            if matches!(msg, Message::Ping(_) | Message::Pong(_)) {
                continue;
            }
            let Some((channel, data)) = protocol.decode(msg) else {
                tracing::debug!("a malformed WebSocket message ends the session");
                break;
            };
            match channel {
                STDIN => {
                    if let Some(tx) = &stdin_tx {
                        if !data.is_empty() && tx.send(data).await.is_err() {
                            stdin_tx = None;
                        }
                    }
                }
                RESIZE => {
                    let _ = resize_tx.send(data).await;
                }
                // v5's close signal for stdin: EOF to the process.
                CLOSE_SIGNAL if protocol.close_signal && data.first() == Some(&STDIN) => {
                    stdin_tx = None;
                }
                _ => {}
            }
        }
        gone_tx.send_replace(true);
    });
    // Channels → client.
    let writer = tokio::spawn(async move {
        while let Some((channel, data)) = out_rx.recv().await {
            if sink.send(protocol.encode(channel, &data)).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
    });

    let sink = |channel| -> Option<Box<dyn Sink>> {
        Some(Box::new(WsSink {
            channel,
            out: out_tx.clone(),
        }))
    };
    let ch = Channels {
        stdin: stdio.stdin.then_some(stdin_rx),
        stdout: if stdio.stdout { sink(STDOUT) } else { None },
        stderr: if stdio.stderr { sink(STDERR) } else { None },
        error: sink(ERROR),
        resize: stdio.tty.then_some(resize_rx),
    };
    // The session is up: an empty message on the lowest writable channel.
    let first = if stdio.stdout {
        STDOUT
    } else if stdio.stderr {
        STDERR
    } else {
        ERROR
    };
    let _ = out_tx.send((first, Vec::new())).await;
    remotecommand::run(session, ch, protocol.status, &gone).await;
    drop(out_tx);
    let _ = writer.await;
    reader.abort();
}

/// The WebSocket sub-protocols served for port-forward.
pub const PORT_FORWARD_NAMES: &[&str] = &["v4.channel.k8s.io", "v4.base64.channel.k8s.io"];

/// Serves a port-forward on an upgraded WebSocket connection: one TCP
/// connection per port in `ports`, relayed until every one has ended.
pub(super) async fn serve_port_forward<IO>(
    pf: PortForwardSession,
    ports: Vec<u16>,
    protocol: WsProtocol,
    io: IO,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_MESSAGE);
    config.max_frame_size = Some(MAX_MESSAGE);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let mut inputs = Vec::new();
    let mut relays = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
        inputs.push(Some(tx));
        let data_ch = (2 * i) as u8;
        let out = out_tx.clone();
        let addr = pf.agent.clone();
        let sandbox = pf.sandbox_id.clone();
        relays.spawn(async move {
            let _ = out.send((data_ch, port.to_le_bytes().to_vec())).await;
            let _ = out.send((data_ch + 1, port.to_le_bytes().to_vec())).await;
            if let Err(msg) = relay(addr, port, rx, data_ch, &out).await {
                let msg = format!("error forwarding port {port} to pod {sandbox}: {msg}");
                let _ = out.send((data_ch + 1, msg.into_bytes())).await;
            }
        });
    }
    drop(out_tx);
    // Client → the relays' inputs (data channels only).
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            if matches!(msg, Message::Ping(_) | Message::Pong(_)) {
                continue;
            }
            let Some((channel, data)) = protocol.decode(msg) else {
                break;
            };
            let slot = usize::from(channel / 2);
            if channel % 2 == 0 {
                if let Some(Some(tx)) = inputs.get(slot) {
                    if !data.is_empty() && tx.send(data).await.is_err() {
                        inputs[slot] = None;
                    }
                }
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some((channel, data)) = out_rx.recv().await {
            if sink.send(protocol.encode(channel, &data)).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
    });
    // Until every relay ended, or the client left (which ends them all).
    let mut reader = reader;
    tokio::select! {
        () = async { while relays.join_next().await.is_some() {} } => reader.abort(),
        _ = &mut reader => {}
    }
    drop(relays);
    let _ = writer.await;
}

/// One forwarded connection: client bytes from `rx` to the pod, the pod's
/// bytes to `data_ch`, until the pod closes its side (WebSocket has no
/// half-close) or the client goes.
async fn relay(
    addr: agent_client::AgentAddr,
    port: u16,
    rx: mpsc::Receiver<Vec<u8>>,
    data_ch: u8,
    out: &mpsc::Sender<(u8, Vec<u8>)>,
) -> Result<(), String> {
    let (mut down, upstream) = super::portforward::open_agent_relay(&addr, port, rx).await?;
    let result = loop {
        match down.message().await {
            Ok(Some(chunk)) => {
                if !chunk.data.is_empty() && out.send((data_ch, chunk.data)).await.is_err() {
                    break Ok(());
                }
                if chunk.closed {
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(s) => break Err(s.message().to_string()),
        }
    };
    drop(upstream);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_frame_as_each_protocol_says() {
        let v5 = WsProtocol::from_name("v5.channel.k8s.io").unwrap();
        assert_eq!(
            v5.encode(STDOUT, b"hi"),
            Message::Binary(vec![1, b'h', b'i'].into())
        );
        assert_eq!(
            v5.decode(Message::Binary(vec![0, b'x'].into())),
            Some((0, b"x".to_vec()))
        );
        assert_eq!(v5.decode(Message::Binary(Vec::new().into())), None);
        let b64 = WsProtocol::from_name("base64.channel.k8s.io").unwrap();
        assert_eq!(b64.encode(STDERR, b"hi"), Message::Text("2aGk=".into()));
        assert_eq!(
            b64.decode(Message::Text("0aGk=".into())),
            Some((0, b"hi".to_vec()))
        );
        assert_eq!(b64.decode(Message::Text("0!!".into())), None);
        assert_eq!(b64.decode(Message::Binary(vec![0].into())), None);
        assert!(WsProtocol::from_name("v9.channel.k8s.io").is_none());
        for n in NAMES {
            assert!(WsProtocol::from_name(n).is_some(), "{n}");
        }
    }
}
