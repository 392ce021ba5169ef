//! The server side of one SPDY/3.1 connection: a reader task that turns
//! frames into [`Stream`]s and their data, and a writer task that owns the
//! socket's write half and the outgoing header compression.
//!
//! ```text
//!  client ──frames──► reader ──SYN_STREAM──► incoming (bounded; the reader waits)
//!                       │  └──DATA──► the stream's data channel (bounded: a slow consumer
//!                       │                  holds up the reader, i.e. TCP backpressure)
//!                       └──PING, replies──► out ──► writer ──frames──► client
//!  sessions ──StreamWriter::write/close──► out (bounded)
//! ```
//!
//! Flow control: like Kubernetes' spdystream, neither side sends or needs
//! WINDOW_UPDATE; backpressure is TCP's plus the bounded channels above.
//! Any malformed frame ends the connection (GOAWAY PROTOCOL_ERROR), and
//! only it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use super::frame::{FLAG_FIN, Frame, FrameHeader, HEADER_LEN, goaway, rst};
use super::headers::{HeaderCodec, Headers};

/// Largest DATA payload this side sends.
pub const MAX_OUT_DATA: usize = 64 * 1024;
/// Frames queued for the writer.
const OUT_QUEUE: usize = 32;
/// DATA frames queued per incoming stream before the reader waits.
const STREAM_QUEUE: usize = 8;
/// New streams queued for the session.
const INCOMING_QUEUE: usize = 16;
/// How long the socket is drained after our GOAWAY, so a close does not
/// reset the connection under data the client has yet to read.
const LINGER: Duration = Duration::from_secs(5);

/// Per-connection bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Streams open at once.
    pub max_streams: usize,
    /// No frame either way for this long ends the connection.
    pub idle_timeout: Duration,
}

/// A stream the client opened.
#[derive(Debug)]
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    /// Its DATA, until the client's FIN (or RST, or the connection ends).
    pub data: mpsc::Receiver<Vec<u8>>,
    pub writer: StreamWriter,
}

#[derive(Debug, Default)]
struct StreamState {
    reset: AtomicBool,
    notify: Notify,
}

/// The stream was reset or the connection is gone.
#[derive(Debug, thiserror::Error)]
#[error("the stream is closed")]
pub struct StreamClosed;

/// Sends on one stream.
#[derive(Clone, Debug)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::Sender<Out>,
    state: Arc<StreamState>,
}

impl StreamWriter {
    /// Sends `data` (in frames of at most MAX_OUT_DATA).
    pub async fn write(&self, data: &[u8]) -> Result<(), StreamClosed> {
        for chunk in data.chunks(MAX_OUT_DATA) {
            self.send(chunk.to_vec(), false).await?;
        }
        Ok(())
    }

    /// Ends this side of the stream (an empty DATA frame with FIN).
    pub async fn close(&self) -> Result<(), StreamClosed> {
        self.send(Vec::new(), true).await
    }

    /// Aborts the stream (RST_STREAM CANCEL).
    pub async fn reset(&self) {
        if !self.state.reset.swap(true, Ordering::SeqCst) {
            self.state.notify.notify_waiters();
            let _ = self
                .out
                .send(Out::Rst {
                    id: self.id,
                    status: rst::CANCEL,
                })
                .await;
        }
    }

    async fn send(&self, data: Vec<u8>, fin: bool) -> Result<(), StreamClosed> {
        if self.state.reset.load(Ordering::SeqCst) {
            return Err(StreamClosed);
        }
        self.out
            .send(Out::Data {
                id: self.id,
                data,
                fin,
            })
            .await
            .map_err(|_| StreamClosed)
    }

    /// Resolves once the client reset the stream (or the connection ended).
    pub async fn reset_by_peer(&self) {
        loop {
            let notified = self.state.notify.notified();
            if self.state.reset.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug)]
enum Out {
    Reply(u32),
    Data { id: u32, data: Vec<u8>, fin: bool },
    Rst { id: u32, status: u32 },
    Ping(u32),
    GoAway(u32),
}

/// Controls a connection.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    out: mpsc::Sender<Out>,
    closed: watch::Receiver<bool>,
}

impl ConnHandle {
    /// Resolves once the connection is gone: the client closed or vanished,
    /// it was idle too long, or it broke the protocol.
    pub async fn closed(&self) {
        self.gone().wait().await
    }

    /// The same signal, for sessions that do not know the transport.
    pub fn gone(&self) -> crate::streaming::Gone {
        crate::streaming::Gone(self.closed.clone())
    }

    /// Ends the connection gracefully: GOAWAY after every frame queued so
    /// far, then the socket closes.
    pub async fn shutdown(&self) {
        let _ = self.out.send(Out::GoAway(goaway::OK)).await;
    }
}

/// One stream's entry in the connection's table.
struct Entry {
    /// None once the client sent FIN.
    data: Option<mpsc::Sender<Vec<u8>>>,
    state: Arc<StreamState>,
    local_fin: bool,
}

type Table = Arc<Mutex<HashMap<u32, Entry>>>;

fn lock(t: &Table) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds since `base` of the last frame either way.
struct Activity {
    base: tokio::time::Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_deadline(&self, idle: Duration) -> tokio::time::Instant {
        self.base + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle
    }
}

/// Serves SPDY on `io` (after the HTTP upgrade). Returns the streams the
/// client opens and a handle; both tasks end with the connection.
pub fn start<IO>(io: IO, limits: Limits) -> (mpsc::Receiver<Stream>, ConnHandle)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_QUEUE);
    let (closed_tx, closed_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let table: Table = Arc::default();
    let activity = Arc::new(Activity {
        base: tokio::time::Instant::now(),
        last: AtomicU64::new(0),
    });
    tokio::spawn(write_loop(
        wr,
        out_rx,
        table.clone(),
        activity.clone(),
        stop_tx,
    ));
    let reader = Reader {
        table,
        out: out_tx.clone(),
        incoming: Some(incoming_tx),
        codec: HeaderCodec::new(),
        last_id: 0,
        limits,
        activity,
    };
    tokio::spawn(reader.run(rd, stop_rx, closed_tx));
    (
        incoming_rx,
        ConnHandle {
            out: out_tx,
            closed: closed_rx,
        },
    )
}

/// Why reading stopped.
#[derive(Debug)]
enum ReadEnd {
    /// EOF, a read error, or our own GOAWAY.
    Closed,
    Idle,
    Protocol(String),
}

struct Reader {
    table: Table,
    out: mpsc::Sender<Out>,
    incoming: Option<mpsc::Sender<Stream>>,
    codec: HeaderCodec,
    last_id: u32,
    limits: Limits,
    activity: Arc<Activity>,
}

impl Reader {
    async fn run<R: AsyncRead + Unpin>(
        mut self,
        mut rd: R,
        mut stop: watch::Receiver<bool>,
        closed: watch::Sender<bool>,
    ) {
        let idle = self.limits.idle_timeout;
        let activity = self.activity.clone();
        let end = tokio::select! {
            end = self.read_frames(&mut rd) => end,
            _ = stop.wait_for(|&s| s) => ReadEnd::Closed,
            () = async {
                loop {
                    let deadline = activity.idle_deadline(idle);
                    if tokio::time::Instant::now() >= deadline {
                        return;
                    }
                    tokio::time::sleep_until(deadline).await;
                }
            } => ReadEnd::Idle,
        };
        match &end {
            ReadEnd::Closed => {}
            ReadEnd::Idle => tracing::debug!("streaming connection idle, closing"),
            ReadEnd::Protocol(e) => tracing::info!(error = %e, "closing a streaming connection"),
        }
        // Every stream ends: consumers see their data end, writers fail.
        for (_, entry) in lock(&self.table).drain() {
            entry.state.reset.store(true, Ordering::SeqCst);
            entry.state.notify.notify_waiters();
        }
        self.incoming = None;
        closed.send_replace(true);
        match end {
            ReadEnd::Closed => {}
            ReadEnd::Idle => {
                let _ = self.out.send(Out::GoAway(goaway::OK)).await;
            }
            ReadEnd::Protocol(_) => {
                let _ = self.out.send(Out::GoAway(goaway::PROTOCOL_ERROR)).await;
            }
        }
        drop(self.out);
        // Drain until the client closes, bounded, so closing our side does
        // not reset the connection under data it has not read yet.
        let mut scratch = vec![0u8; 16 * 1024];
        let _ = tokio::time::timeout(LINGER, async {
            while matches!(rd.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    async fn read_frames<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> ReadEnd {
        loop {
            let mut head = [0u8; HEADER_LEN];
            if rd.read_exact(&mut head).await.is_err() {
                return ReadEnd::Closed;
            }
            let header = match FrameHeader::parse(head) {
                Ok(h) => h,
                Err(e) => return ReadEnd::Protocol(e.to_string()),
            };
            let mut payload = vec![0u8; header.len];
            if rd.read_exact(&mut payload).await.is_err() {
                return ReadEnd::Closed;
            }
            self.activity.touch();
            let frame = match header.decode(payload) {
                Ok(f) => f,
                Err(e) => return ReadEnd::Protocol(e.to_string()),
            };
            if let Err(e) = self.handle(frame).await {
                return ReadEnd::Protocol(e);
            }
        }
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), String> {
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                header_block,
                ..
            } => {
                // Inflate first: the zlib stream must see every block.
                let headers = self
                    .codec
                    .decode(&header_block)
                    .map_err(|e| e.to_string())?;
                if stream_id % 2 == 0 || stream_id <= self.last_id {
                    return Err(format!("stream id {stream_id} out of order"));
                }
                self.last_id = stream_id;
                self.open(stream_id, flags, headers).await;
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let sender = lock(&self.table)
                    .get(&stream_id)
                    .and_then(|e| e.data.clone());
                if let Some(sender) = sender {
                    if !data.is_empty() && sender.send(data).await.is_err() {
                        // The consumer is gone; later data is dropped.
                        if let Some(e) = lock(&self.table).get_mut(&stream_id) {
                            e.data = None;
                        }
                    }
                }
                if flags & FLAG_FIN != 0 {
                    self.remote_fin(stream_id);
                }
            }
            Frame::Headers {
                stream_id,
                flags,
                header_block,
            } => {
                self.codec
                    .decode(&header_block)
                    .map_err(|e| e.to_string())?;
                if flags & FLAG_FIN != 0 {
                    self.remote_fin(stream_id);
                }
            }
            Frame::SynReply { header_block, .. } => {
                // This side opens no streams; keep the zlib stream in step.
                self.codec
                    .decode(&header_block)
                    .map_err(|e| e.to_string())?;
            }
            Frame::RstStream { stream_id, .. } => {
                if let Some(entry) = lock(&self.table).remove(&stream_id) {
                    entry.state.reset.store(true, Ordering::SeqCst);
                    entry.state.notify.notify_waiters();
                }
            }
            Frame::Ping { id } => {
                // Answer the client's (odd) pings; ours it would echo.
                if id % 2 == 1 {
                    let _ = self.out.send(Out::Ping(id)).await;
                }
            }
            Frame::GoAway { .. } => {
                // No new streams; the open ones finish.
                self.incoming = None;
            }
            Frame::Settings { .. } | Frame::WindowUpdate { .. } | Frame::Unknown { .. } => {}
        }
        Ok(())
    }

    async fn open(&mut self, id: u32, flags: u8, headers: Headers) {
        let refuse = |out: &mpsc::Sender<Out>| {
            let out = out.clone();
            async move {
                let _ = out
                    .send(Out::Rst {
                        id,
                        status: rst::REFUSED_STREAM,
                    })
                    .await;
            }
        };
        let Some(incoming) = self.incoming.clone() else {
            return refuse(&self.out).await;
        };
        if lock(&self.table).len() >= self.limits.max_streams {
            tracing::debug!(id, "too many streams on one connection");
            return refuse(&self.out).await;
        }
        let (data_tx, data_rx) = mpsc::channel(STREAM_QUEUE);
        let state = Arc::new(StreamState::default());
        let fin = flags & FLAG_FIN != 0;
        lock(&self.table).insert(
            id,
            Entry {
                data: (!fin).then_some(data_tx),
                state: state.clone(),
                local_fin: false,
            },
        );
        let _ = self.out.send(Out::Reply(id)).await;
        let stream = Stream {
            id,
            headers,
            data: data_rx,
            writer: StreamWriter {
                id,
                out: self.out.clone(),
                state,
            },
        };
        // Waiting here holds up the reader: backpressure on a client that
        // opens streams faster than the session takes them.
        if incoming.send(stream).await.is_err() {
            lock(&self.table).remove(&id);
            refuse(&self.out).await;
        }
    }

    fn remote_fin(&mut self, id: u32) {
        let mut table = lock(&self.table);
        if let Some(entry) = table.get_mut(&id) {
            entry.data = None;
            if entry.local_fin {
                table.remove(&id);
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut out: mpsc::Receiver<Out>,
    table: Table,
    activity: Arc<Activity>,
    stop: watch::Sender<bool>,
) {
    let mut codec = HeaderCodec::new();
    let mut buf = Vec::with_capacity(MAX_OUT_DATA + 64);
    let mut done = false;
    while let Some(first) = out.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Out::Reply(id) => Frame::SynReply {
                    stream_id: id,
                    flags: 0,
                    header_block: codec.encode(&[]),
                }
                .encode(&mut buf),
                Out::Data { id, data, fin } => {
                    let mut t = lock(&table);
                    // Data for a stream that was reset or ended is dropped.
                    if let Some(entry) = t
                        .get_mut(&id)
                        .filter(|e| !e.local_fin && !e.state.reset.load(Ordering::SeqCst))
                    {
                        Frame::Data {
                            stream_id: id,
                            flags: if fin { FLAG_FIN } else { 0 },
                            data,
                        }
                        .encode(&mut buf);
                        if fin {
                            entry.local_fin = true;
                            if entry.data.is_none() {
                                t.remove(&id);
                            }
                        }
                    }
                }
                Out::Rst { id, status } => {
                    lock(&table).remove(&id);
                    Frame::RstStream {
                        stream_id: id,
                        status,
                    }
                    .encode(&mut buf);
                }
                Out::Ping(id) => Frame::Ping { id }.encode(&mut buf),
                Out::GoAway(status) => {
                    Frame::GoAway {
                        last_good_stream_id: 0,
                        status,
                    }
                    .encode(&mut buf);
                    done = true;
                    break;
                }
            }
            if buf.len() < 4 * MAX_OUT_DATA {
                next = out.try_recv().ok();
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            break;
        }
        activity.touch();
        if done {
            break;
        }
    }
    let _ = wr.shutdown().await;
    stop.send_replace(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streaming::spdy::frame;

    /// A minimal client: frames out, frames in.
    struct Client {
        io: tokio::io::DuplexStream,
        codec: HeaderCodec,
        buf: Vec<u8>,
    }

    impl Client {
        async fn send(&mut self, f: Frame) {
            let mut wire = Vec::new();
            f.encode(&mut wire);
            self.io.write_all(&wire).await.unwrap();
        }
        async fn syn(&mut self, id: u32, headers: &[(&str, &str)], flags: u8) {
            let header_block = self.codec.encode(headers);
            self.send(Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags,
                header_block,
            })
            .await;
        }
        async fn next(&mut self) -> Option<Frame> {
            loop {
                if let Some((f, used)) = frame::parse(&self.buf).unwrap() {
                    self.buf.drain(..used);
                    return Some(f);
                }
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(5), self.io.read(&mut chunk))
                    .await
                    .expect("a frame in time")
                    .unwrap();
                if n == 0 {
                    return None;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
    }

    fn limits() -> Limits {
        Limits {
            max_streams: 4,
            idle_timeout: Duration::from_secs(60),
        }
    }

    fn pair() -> (Client, mpsc::Receiver<Stream>, ConnHandle) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (incoming, handle) = start(b, limits());
        (
            Client {
                io: a,
                codec: HeaderCodec::new(),
                buf: Vec::new(),
            },
            incoming,
            handle,
        )
    }

    #[tokio::test]
    async fn streams_are_replied_and_carry_data_both_ways() {
        let (mut c, mut incoming, handle) = pair();
        c.syn(1, &[("streamtype", "stdin")], 0).await;
        let mut s = incoming.recv().await.expect("a stream");
        assert_eq!(s.id, 1);
        assert_eq!(
            super::super::headers::get(&s.headers, "streamtype"),
            Some("stdin")
        );
        let Some(Frame::SynReply { stream_id: 1, .. }) = c.next().await else {
            panic!("SYN_REPLY first")
        };
        c.send(Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            data: b"hi".to_vec(),
        })
        .await;
        assert_eq!(s.data.recv().await.as_deref(), Some(&b"hi"[..]));
        assert_eq!(s.data.recv().await, None, "FIN ends the data");
        s.writer.write(b"back").await.unwrap();
        s.writer.close().await.unwrap();
        assert_eq!(
            c.next().await,
            Some(Frame::Data {
                stream_id: 1,
                flags: 0,
                data: b"back".to_vec()
            })
        );
        assert_eq!(
            c.next().await,
            Some(Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: vec![]
            })
        );
        c.send(Frame::Ping { id: 1 }).await;
        assert_eq!(c.next().await, Some(Frame::Ping { id: 1 }));
        handle.shutdown().await;
        assert!(matches!(c.next().await, Some(Frame::GoAway { .. })));
        drop(c);
        handle.closed().await;
    }

    #[tokio::test]
    async fn a_malformed_frame_closes_the_connection() {
        let (mut c, _incoming, handle) = pair();
        // A PING with the wrong length.
        c.io.write_all(&[0x80, 3, 0, 6, 0, 0, 0, 1, 0])
            .await
            .unwrap();
        assert_eq!(
            c.next().await,
            Some(Frame::GoAway {
                last_good_stream_id: 0,
                status: goaway::PROTOCOL_ERROR
            })
        );
        handle.closed().await;
        drop(c);
    }

    #[tokio::test]
    async fn garbage_header_blocks_and_reused_ids_close_the_connection() {
        let (mut c, _incoming, handle) = pair();
        c.send(Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            flags: 0,
            header_block: b"garbage".to_vec(),
        })
        .await;
        assert!(matches!(c.next().await, Some(Frame::GoAway { .. })));
        handle.closed().await;

        let (mut c, mut incoming, handle) = pair();
        c.syn(3, &[("streamtype", "error")], 0).await;
        let _s = incoming.recv().await.unwrap();
        c.syn(1, &[("streamtype", "error")], 0).await;
        assert!(matches!(c.next().await, Some(Frame::SynReply { .. })));
        assert!(matches!(c.next().await, Some(Frame::GoAway { .. })));
        handle.closed().await;
    }

    #[tokio::test]
    async fn streams_beyond_the_bound_are_refused() {
        let (mut c, mut incoming, _handle) = pair();
        let mut kept = Vec::new();
        for i in 0..5u32 {
            c.syn(2 * i + 1, &[("streamtype", "data")], 0).await;
        }
        for _ in 0..4 {
            kept.push(incoming.recv().await.unwrap());
            assert!(matches!(c.next().await, Some(Frame::SynReply { .. })));
        }
        assert_eq!(
            c.next().await,
            Some(Frame::RstStream {
                stream_id: 9,
                status: rst::REFUSED_STREAM
            })
        );
    }

    #[tokio::test]
    async fn a_reset_stream_fails_its_writer_and_the_peer_vanishing_closes() {
        let (mut c, mut incoming, handle) = pair();
        c.syn(1, &[("streamtype", "data")], 0).await;
        let s = incoming.recv().await.unwrap();
        c.send(Frame::RstStream {
            stream_id: 1,
            status: rst::CANCEL,
        })
        .await;
        s.writer.reset_by_peer().await;
        assert!(s.writer.write(b"x").await.is_err());
        drop(c);
        handle.closed().await;
    }
}
