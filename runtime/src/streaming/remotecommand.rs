//! Exec and attach sessions (Kubernetes "remotecommand"): the client's
//! stdin/stdout/stderr/error/resize streams wired to a process through the
//! agent.
//!
//! ```text
//!  exec:   streams ready ─► ExecProcess ─► pumps: ReadOutput×2 → stdout/stderr,
//!          stdin → WriteStdin (+CloseStdin at FIN), resize → ResizeTty
//!          ─► WaitProcess ─► drain output ─► status on the error stream ─► GOAWAY
//!          client gone before the exit ─► SIGKILL, wait, ReleaseProcess (ProcessGuard)
//!  attach: the same on exec_id "" with AttachOutput (a copy of the log pump's
//!          reads), ends when the output ends, the container exits or the client
//!          leaves; stdin_once closes the container's stdin when the attach's ends.
//! ```
//!
//! The error stream carries, from v4 on, a JSON `metav1.Status`: Success,
//! or Failure with reason NonZeroExitCode and an ExitCode cause; before v4
//! only a failure's message, as text.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;
use vmpod_proto::v1 as agent;
use vmpod_proto::v1::agent_client::AgentClient;

use super::Gone;
use super::spdy::conn::{ConnHandle, Stream, StreamWriter};
use super::spdy::headers;
use super::{AttachSession, ExecSession, Session};
use crate::agent_client::{self, AgentAddr};

/// How long reaching the agent may take when a session starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The deadline of each short agent call (start, close, resize, kill).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// WaitProcess is asked again after this long (each call has a deadline).
const WAIT_SLICE: Duration = Duration::from_secs(60);
/// How long output may keep coming after the process exited (a child
/// that inherited the pipe can hold it open).
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);
/// Largest stdin chunk sent to the agent.
const STDIN_CHUNK: usize = 64 * 1024;
/// Largest resize message buffered (they are ~30 bytes).
const MAX_RESIZE_BUF: usize = 4096;
/// How long a tty exec waits for the client's first size before it starts.
const FIRST_SIZE_WAIT: Duration = Duration::from_millis(500);

/// The remotecommand sub-protocol versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    /// channel.k8s.io
    V1,
    V2,
    /// Adds the resize stream.
    V3,
    /// Adds the JSON status on the error stream (v5 over SPDY is v4).
    V4,
}

impl Protocol {
    /// What the SPDY upgrade accepts, the oldest last.
    pub const SPDY_NAMES: &'static [&'static str] = &[
        "v5.channel.k8s.io",
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
        "channel.k8s.io",
    ];

    pub fn from_name(name: &str) -> Option<Protocol> {
        Some(match name {
            "v5.channel.k8s.io" | "v4.channel.k8s.io" => Protocol::V4,
            "v3.channel.k8s.io" => Protocol::V3,
            "v2.channel.k8s.io" => Protocol::V2,
            "channel.k8s.io" => Protocol::V1,
            _ => return None,
        })
    }

    fn resize(self) -> bool {
        self >= Protocol::V3
    }
}

/// Where output goes: a SPDY stream (or, later, a WebSocket channel).
#[tonic::async_trait]
pub(super) trait Sink: Send + Sync {
    /// False once the client cannot take more.
    async fn write(&self, data: &[u8]) -> bool;
    async fn close(&self);
}

#[tonic::async_trait]
impl Sink for StreamWriter {
    async fn write(&self, data: &[u8]) -> bool {
        StreamWriter::write(self, data).await.is_ok()
    }
    async fn close(&self) {
        let _ = StreamWriter::close(self).await;
    }
}

/// A session's client side, whatever the transport.
#[derive(Default)]
pub(super) struct Channels {
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    pub stdout: Option<Box<dyn Sink>>,
    pub stderr: Option<Box<dyn Sink>>,
    pub error: Option<Box<dyn Sink>>,
    pub resize: Option<mpsc::Receiver<Vec<u8>>>,
}

/// How a session ended, for the error stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Success,
    ExitCode { code: i32, cmd: Vec<String> },
    Error(String),
}

impl Outcome {
    /// The error stream's bytes under `protocol` (None: write nothing).
    pub(super) fn encode(&self, protocol: Protocol) -> Option<Vec<u8>> {
        let message = match self {
            Outcome::Success => None,
            Outcome::ExitCode { code, cmd } => Some(format!(
                "command terminated with non-zero exit code: error executing command {cmd:?}, \
                 exit code {code}"
            )),
            Outcome::Error(m) => Some(m.clone()),
        };
        if protocol < Protocol::V4 {
            return message.map(String::into_bytes);
        }
        let status = match self {
            Outcome::Success => serde_json::json!({"metadata": {}, "status": "Success"}),
            Outcome::ExitCode { code, .. } => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Outcome::Error(m) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": m,
                "reason": "InternalError",
                "code": 500,
            }),
        };
        Some(status.to_string().into_bytes())
    }
}

/// Runs an exec or attach on a SPDY connection: waits for the client's
/// streams, then the session, then ends the connection.
pub(super) async fn serve_spdy(
    session: Session,
    protocol: Protocol,
    mut incoming: mpsc::Receiver<Stream>,
    conn: ConnHandle,
    creation_timeout: Duration,
) {
    let stdio = match &session {
        Session::Exec(e) => e.stdio,
        Session::Attach(a) => a.stdio,
        Session::PortForward(_) => return,
    };
    let expected = 1
        + usize::from(stdio.stdin)
        + usize::from(stdio.stdout)
        + usize::from(stdio.stderr)
        + usize::from(stdio.tty && protocol.resize());
    let mut ch = Channels::default();
    let deadline = tokio::time::Instant::now() + creation_timeout;
    let mut got = 0;
    while got < expected {
        let stream = match tokio::time::timeout_at(deadline, incoming.recv()).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(_) => {
                tracing::info!("timed out waiting for the client to create streams");
                conn.shutdown().await;
                return;
            }
        };
        let kind = headers::get(&stream.headers, "streamtype").unwrap_or("");
        match kind {
            "error" => ch.error = Some(Box::new(stream.writer)),
            "stdin" => ch.stdin = Some(stream.data),
            "stdout" => ch.stdout = Some(Box::new(stream.writer)),
            "stderr" => ch.stderr = Some(Box::new(stream.writer)),
            "resize" => ch.resize = Some(stream.data),
            other => {
                tracing::debug!(stream_type = other, "ignoring an unexpected stream");
                continue;
            }
        }
        got += 1;
    }
    // Streams opened later are refused by dropping them.
    tokio::spawn(async move { while incoming.recv().await.is_some() {} });
    run(session, ch, protocol, &conn.gone()).await;
    conn.shutdown().await;
}

/// Runs an exec or attach on a transport's channels.
pub(super) async fn run(session: Session, ch: Channels, protocol: Protocol, gone: &Gone) {
    match session {
        Session::Exec(e) => run_exec(e, ch, protocol, gone).await,
        Session::Attach(a) => run_attach(a, ch, protocol, gone).await,
        Session::PortForward(_) => {}
    }
}

async fn connect(addr: &AgentAddr) -> Result<AgentClient<Channel>, String> {
    agent_client::connect_streaming(addr, CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("reaching the pod's agent: {}", crate::error_chain(&e)))
}

fn with_deadline<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// A random exec ID for a streaming exec.
fn exec_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    // Unique among this container's execs is all it needs to be.
    format!(
        "stream-{:016x}",
        RandomState::new().hash_one(std::time::Instant::now())
    )
}

/// Writes the outcome and closes every output stream.
async fn finish(ch: &mut Channels, protocol: Protocol, outcome: Outcome) {
    if let Some(err) = ch.error.take() {
        if let Some(bytes) = outcome.encode(protocol) {
            err.write(&bytes).await;
        }
        err.close().await;
    }
    for sink in [ch.stdout.take(), ch.stderr.take()].into_iter().flatten() {
        sink.close().await;
    }
}

/// Opens one output stream of a process (ReadOutput, or AttachOutput for
/// a copy of the container's output; an attach tap exists once this
/// returns, so no output is missed after it).
async fn open_output(
    mut agent: AgentClient<Channel>,
    req: agent::ReadOutputRequest,
    attach: bool,
) -> Option<tonic::Streaming<agent::OutputChunk>> {
    // No deadline: the stream lasts as long as the process's output.
    let call = if attach {
        agent.attach_output(req).await
    } else {
        agent.read_output(req).await
    };
    call.ok().map(tonic::Response::into_inner)
}

/// Copies an output stream to `sink` (or discards it, so the process never
/// blocks on an unread pipe), then closes the sink.
async fn pump_output(
    stream: Option<tonic::Streaming<agent::OutputChunk>>,
    sink: Option<Box<dyn Sink>>,
) {
    if let Some(mut stream) = stream {
        let mut alive = sink.is_some();
        while let Ok(Some(chunk)) = stream.message().await {
            if alive {
                if let Some(s) = &sink {
                    alive = s.write(&chunk.data).await;
                }
            }
        }
    }
    if let Some(s) = sink {
        s.close().await;
    }
}

/// Feeds the client's stdin to the process; at the client's FIN, closes
/// the process's stdin when `close_at_end`.
async fn pump_stdin(
    agent: AgentClient<Channel>,
    container_id: String,
    exec_id: String,
    mut rx: mpsc::Receiver<Vec<u8>>,
    close_at_end: bool,
    gone: Gone,
) {
    let (tx, chunks) = mpsc::channel(4);
    let first = agent::StdinChunk {
        container_id: container_id.clone(),
        exec_id: exec_id.clone(),
        data: Vec::new(),
    };
    if tx.send(first).await.is_err() {
        return;
    }
    let mut writer = agent.clone();
    let call = tokio::spawn(async move {
        writer
            .write_stdin(tokio_stream::wrappers::ReceiverStream::new(chunks))
            .await
    });
    'feed: while let Some(data) = rx.recv().await {
        for piece in data.chunks(STDIN_CHUNK) {
            let chunk = agent::StdinChunk {
                data: piece.to_vec(),
                ..Default::default()
            };
            if tx.send(chunk).await.is_err() {
                break 'feed;
            }
        }
    }
    drop(tx);
    let _ = call.await;
    if close_at_end && !gone.is_gone() {
        let mut agent = agent;
        let _ = agent
            .close_stdin(with_deadline(agent::CloseStdinRequest {
                container_id,
                exec_id,
            }))
            .await;
    }
}

/// A terminal size message, `{"Width":80,"Height":24}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Size {
    width: u16,
    height: u16,
}

/// The resize stream's bytes so far: complete messages are taken off the
/// front, a partial one waits for more.
#[derive(Default)]
struct ResizeBuf(Vec<u8>);

impl ResizeBuf {
    /// Adds `data`; the last complete size in the buffer, if any. An error
    /// for a malformed stream or one that buffers too much.
    fn push(&mut self, data: &[u8]) -> Result<Option<Size>, ()> {
        self.0.extend_from_slice(data);
        let mut sizes = serde_json::Deserializer::from_slice(&self.0).into_iter::<Size>();
        let mut last = None;
        for size in sizes.by_ref() {
            match size {
                Ok(s) => last = Some(s),
                Err(e) if e.is_eof() => break,
                Err(_) => return Err(()),
            }
        }
        let used = sizes.byte_offset();
        if self.0.len() - used > MAX_RESIZE_BUF {
            return Err(());
        }
        self.0.drain(..used);
        Ok(last)
    }
}

/// Fuzzing entry (see `super::fuzzing`): a resize stream in `chunks`;
/// whether it stayed well-formed. The buffer never grows past its bound.
pub(super) fn fuzz_resize(chunks: &[&[u8]]) -> bool {
    let mut buf = ResizeBuf::default();
    for chunk in chunks {
        if buf.push(chunk).is_err() {
            return false;
        }
        assert!(buf.0.len() <= MAX_RESIZE_BUF);
    }
    true
}

/// The terminal size a tty exec starts with: the client's first resize
/// message when it comes within [`FIRST_SIZE_WAIT`] (client-go sends the
/// terminal's size as soon as the resize stream is open), so the process
/// never sees 0x0. Without one, the terminal starts as runc and containerd
/// start it: unsized until the first resize.
async fn first_size(rx: &mut mpsc::Receiver<Vec<u8>>, buf: &mut ResizeBuf) -> Option<Size> {
    let wait = async {
        while let Some(data) = rx.recv().await {
            match buf.push(&data) {
                Ok(Some(size)) => return Some(size),
                Ok(None) => {}
                Err(()) => return None,
            }
        }
        None
    };
    tokio::time::timeout(FIRST_SIZE_WAIT, wait)
        .await
        .ok()
        .flatten()
}

/// Resize messages → ResizeTty, after what `buf` holds already.
async fn pump_resize(
    mut agent: AgentClient<Channel>,
    container_id: String,
    exec_id: String,
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut buf: ResizeBuf,
) {
    while let Some(data) = rx.recv().await {
        let Ok(last) = buf.push(&data) else {
            tracing::debug!("dropping a malformed resize stream");
            return;
        };
        if let Some(size) = last {
            let _ = agent
                .resize_tty(with_deadline(agent::ResizeTtyRequest {
                    container_id: container_id.clone(),
                    exec_id: exec_id.clone(),
                    rows: u32::from(size.height),
                    cols: u32::from(size.width),
                }))
                .await;
        }
    }
}

/// Waits for the process's exit code, one bounded call after another.
async fn wait_exit(
    mut agent: AgentClient<Channel>,
    container_id: String,
    exec_id: String,
) -> Result<i32, tonic::Status> {
    loop {
        let mut req = tonic::Request::new(agent::WaitProcessRequest {
            container_id: container_id.clone(),
            exec_id: exec_id.clone(),
        });
        req.set_timeout(WAIT_SLICE);
        let started = tokio::time::Instant::now();
        match agent.wait_process(req).await {
            Ok(r) => return Ok(r.into_inner().exit_code),
            Err(s) if matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                if started.elapsed() < Duration::from_secs(1) {
                    // Not the deadline: do not spin.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(s) => return Err(s),
        }
    }
}

/// Kills (unless it exited) and releases an exec's process when dropped, in
/// a task of its own so it finishes whatever ends the session.
struct ProcessGuard {
    agent: AgentClient<Channel>,
    container_id: String,
    exec_id: String,
    exited: bool,
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let mut agent = self.agent.clone();
        let (container_id, exec_id, exited) = (
            std::mem::take(&mut self.container_id),
            std::mem::take(&mut self.exec_id),
            self.exited,
        );
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            if !exited {
                tracing::debug!(%container_id, %exec_id, "the client left: killing its exec");
                let _ = agent
                    .signal_process(with_deadline(agent::SignalProcessRequest {
                        container_id: container_id.clone(),
                        exec_id: exec_id.clone(),
                        signal: libc::SIGKILL.unsigned_abs(),
                    }))
                    .await;
                let _ = tokio::time::timeout(
                    CALL_TIMEOUT,
                    wait_exit(agent.clone(), container_id.clone(), exec_id.clone()),
                )
                .await;
            }
            let _ = agent
                .release_process(with_deadline(agent::ReleaseProcessRequest {
                    container_id,
                    exec_id,
                }))
                .await;
        });
    }
}

async fn run_exec(mut s: ExecSession, mut ch: Channels, protocol: Protocol, gone: &Gone) {
    let agent = match connect(&s.agent).await {
        Ok(a) => a,
        Err(e) => return finish(&mut ch, protocol, Outcome::Error(e)).await,
    };
    let exec_id = exec_id();
    let cmd = s.process.args.clone();
    let mut resize_buf = ResizeBuf::default();
    if s.stdio.tty
        && let Some(rx) = ch.resize.as_mut()
        && let Some(size) = first_size(rx, &mut resize_buf).await
    {
        s.process.console_rows = u32::from(size.height);
        s.process.console_cols = u32::from(size.width);
    }
    let started = agent
        .clone()
        .exec_process(with_deadline(agent::ExecProcessRequest {
            container_id: s.container_id.clone(),
            exec_id: exec_id.clone(),
            process: Some(s.process),
        }))
        .await;
    if let Err(status) = started {
        let msg = format!("error executing command in container: {}", status.message());
        return finish(&mut ch, protocol, Outcome::Error(msg)).await;
    }
    let mut guard = ProcessGuard {
        agent: agent.clone(),
        container_id: s.container_id.clone(),
        exec_id: exec_id.clone(),
        exited: false,
    };
    let output = |stream: agent::read_output_request::Stream| agent::ReadOutputRequest {
        container_id: s.container_id.clone(),
        exec_id: exec_id.clone(),
        stream: stream as i32,
    };
    let mut outputs = JoinSet::new();
    let stdout = open_output(
        agent.clone(),
        output(agent::read_output_request::Stream::Stdout),
        false,
    )
    .await;
    outputs.spawn(pump_output(stdout, ch.stdout.take()));
    if !s.stdio.tty {
        let stderr = open_output(
            agent.clone(),
            output(agent::read_output_request::Stream::Stderr),
            false,
        )
        .await;
        outputs.spawn(pump_output(stderr, ch.stderr.take()));
    }
    let mut inputs = JoinSet::new();
    if let Some(rx) = ch.stdin.take() {
        inputs.spawn(pump_stdin(
            agent.clone(),
            s.container_id.clone(),
            exec_id.clone(),
            rx,
            true,
            gone.clone(),
        ));
    }
    if let Some(rx) = ch.resize.take() {
        inputs.spawn(pump_resize(
            agent.clone(),
            s.container_id.clone(),
            exec_id.clone(),
            rx,
            resize_buf,
        ));
    }
    let exit = tokio::select! {
        r = wait_exit(agent.clone(), s.container_id.clone(), exec_id.clone()) => r,
        () = gone.wait() => return, // the guard kills and releases
    };
    guard.exited = exit.is_ok();
    let drained = async { while outputs.join_next().await.is_some() {} };
    tokio::select! {
        _ = tokio::time::timeout(OUTPUT_DRAIN, drained) => {}
        () = gone.wait() => return,
    }
    drop(inputs);
    let outcome = match exit {
        Ok(0) => Outcome::Success,
        Ok(code) => Outcome::ExitCode { code, cmd },
        Err(status) => Outcome::Error(format!(
            "error executing command in container: {}",
            status.message()
        )),
    };
    finish(&mut ch, protocol, outcome).await;
}

async fn run_attach(s: AttachSession, mut ch: Channels, protocol: Protocol, gone: &Gone) {
    let agent = match connect(&s.agent).await {
        Ok(a) => a,
        Err(e) => return finish(&mut ch, protocol, Outcome::Error(e)).await,
    };
    let output = |stream: agent::read_output_request::Stream| agent::ReadOutputRequest {
        container_id: s.container_id.clone(),
        exec_id: String::new(),
        stream: stream as i32,
    };
    // The taps first: stdin written after them cannot echo unseen.
    let mut outputs = JoinSet::new();
    if let Some(sink) = ch.stdout.take() {
        let stream = open_output(
            agent.clone(),
            output(agent::read_output_request::Stream::Stdout),
            true,
        )
        .await;
        outputs.spawn(pump_output(stream, Some(sink)));
    }
    if let Some(sink) = ch.stderr.take() {
        let stream = open_output(
            agent.clone(),
            output(agent::read_output_request::Stream::Stderr),
            true,
        )
        .await;
        outputs.spawn(pump_output(stream, Some(sink)));
    }
    let stdin_attached = ch.stdin.is_some();
    let mut inputs = JoinSet::new();
    if let Some(rx) = ch.stdin.take() {
        inputs.spawn(pump_stdin(
            agent.clone(),
            s.container_id.clone(),
            String::new(),
            rx,
            s.stdin_once,
            gone.clone(),
        ));
    }
    if let Some(rx) = ch.resize.take() {
        inputs.spawn(pump_resize(
            agent.clone(),
            s.container_id.clone(),
            String::new(),
            rx,
            ResizeBuf::default(),
        ));
    }
    let has_output = !outputs.is_empty();
    let outcome = {
        let outputs_done = async { while outputs.join_next().await.is_some() {} };
        tokio::select! {
            () = outputs_done, if has_output => Some(Outcome::Success),
            r = wait_exit(agent.clone(), s.container_id.clone(), String::new()) => Some(match r {
                Ok(_) => Outcome::Success,
                Err(status) => Outcome::Error(format!(
                    "error attaching to container: {}",
                    status.message()
                )),
            }),
            () = gone.wait() => None,
        }
    };
    if let Some(Outcome::Success) = outcome {
        // The container exited: let the last output through.
        let drained = async { while outputs.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(OUTPUT_DRAIN, drained).await;
    }
    drop(inputs);
    if s.stdin_once && stdin_attached {
        let _ = agent
            .clone()
            .close_stdin(with_deadline(agent::CloseStdinRequest {
                container_id: s.container_id.clone(),
                exec_id: String::new(),
            }))
            .await;
    }
    if let Some(outcome) = outcome {
        finish(&mut ch, protocol, outcome).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_messages_split_anywhere_and_bounded() {
        let mut b = ResizeBuf::default();
        assert_eq!(b.push(br#"{"Width":80,"Hei"#), Ok(None));
        assert_eq!(
            b.push(br#"ght":24}{"Width":100,"Height":30}{"Wi"#),
            Ok(Some(Size {
                width: 100,
                height: 30
            }))
        );
        assert_eq!(
            b.push(br#"dth":1,"Height":2}"#),
            Ok(Some(Size {
                width: 1,
                height: 2
            }))
        );
        assert_eq!(ResizeBuf::default().push(b"]"), Err(()));
        assert_eq!(
            ResizeBuf::default().push(br#"{"Width":70000,"Height":1}"#),
            Err(())
        );
        let mut b = ResizeBuf::default();
        assert_eq!(b.push(b"{\"Width\":"), Ok(None));
        assert_eq!(b.push(&[b' '; MAX_RESIZE_BUF]), Err(()));
    }

    #[tokio::test]
    async fn a_tty_exec_starts_with_the_first_size_or_none() {
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(br#"{"Width":77,"#.to_vec()).await.unwrap();
        tx.send(br#""Height":33}{"Width":1"#.to_vec())
            .await
            .unwrap();
        let mut buf = ResizeBuf::default();
        assert_eq!(
            first_size(&mut rx, &mut buf).await,
            Some(Size {
                width: 77,
                height: 33
            })
        );
        // The rest stays for the pump.
        assert_eq!(buf.0, br#"{"Width":1"#);
        let (_tx, mut rx) = mpsc::channel::<Vec<u8>>(1);
        let started = tokio::time::Instant::now();
        assert_eq!(first_size(&mut rx, &mut ResizeBuf::default()).await, None);
        assert!(started.elapsed() >= FIRST_SIZE_WAIT);
    }

    #[test]
    fn the_error_stream_speaks_each_protocol() {
        assert_eq!(
            Outcome::Success.encode(Protocol::V4).as_deref(),
            Some(&br#"{"metadata":{},"status":"Success"}"#[..])
        );
        assert_eq!(Outcome::Success.encode(Protocol::V3), None);
        let exit = Outcome::ExitCode {
            code: 7,
            cmd: vec!["sh".into()],
        };
        let v: serde_json::Value =
            serde_json::from_slice(&exit.encode(Protocol::V4).unwrap()).unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "7");
        let text = String::from_utf8(exit.encode(Protocol::V2).unwrap()).unwrap();
        assert!(text.contains("exit code 7"), "{text}");
    }

    #[test]
    fn protocols_are_named_as_kubernetes_names_them() {
        for name in Protocol::SPDY_NAMES {
            assert!(Protocol::from_name(name).is_some(), "{name}");
        }
        assert_eq!(Protocol::from_name("v5.channel.k8s.io"), Some(Protocol::V4));
        assert_eq!(Protocol::from_name("v9.channel.k8s.io"), None);
        assert!(!Protocol::V2.resize() && Protocol::V3.resize());
    }
}
