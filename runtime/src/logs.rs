//! Container logs in the CRI format, one line per record:
//!
//! ```text
//! 2026-11-26T16:00:00.123456789Z stdout F a whole line
//! 2026-11-26T16:00:00.123456789Z stderr P the first 16 KiB of a long line
//! ```
//!
//! One writer task per container owns the file; one reader task per stream
//! turns agent output chunks into records and hands them over a bounded
//! channel. A slow disk therefore slows the readers, which slows the agent's
//! stream, which is the agent's own backpressure; nothing buffers without
//! bound. ReopenContainerLog asks the writer to reopen the path.

use std::path::PathBuf;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

/// Lines longer than this are split into partial (P) records.
pub const MAX_LINE: usize = 16 * 1024;

/// Which stream a record comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    fn name(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

enum LogMsg {
    Record(Vec<u8>),
    Reopen(oneshot::Sender<std::io::Result<()>>),
    Flush(oneshot::Sender<std::io::Result<()>>),
}

/// The handle to a container's log writer.
#[derive(Clone, Debug)]
pub struct LogWriter {
    tx: mpsc::Sender<LogMsg>,
}

impl std::fmt::Debug for LogMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogMsg")
    }
}

impl LogWriter {
    /// Opens (appends to) `path` and starts the writer task.
    pub async fn open(path: PathBuf) -> std::io::Result<LogWriter> {
        let mut file = open_append(&path).await?;
        // A few records in flight; beyond that the readers wait.
        let (tx, mut rx) = mpsc::channel::<LogMsg>(16);
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                match msg {
                    LogMsg::Record(bytes) => {
                        if let Err(e) = file.write_all(&bytes).await {
                            // Rate: at most one warning per record, and
                            // records are bounded by the agent's stream.
                            tracing::warn!(path = %path.display(), error = %e, "writing a log record");
                        }
                    }
                    LogMsg::Flush(reply) => {
                        let _ = reply.send(file.flush().await);
                    }
                    LogMsg::Reopen(reply) => {
                        let _ = file.flush().await;
                        let result = open_append(&path).await.map(|f| file = f);
                        let _ = reply.send(result);
                    }
                }
            }
            let _ = file.flush().await;
        });
        Ok(LogWriter { tx })
    }

    /// Reopens the file (after the kubelet rotated it).
    pub async fn reopen(&self) -> std::io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(LogMsg::Reopen(reply))
            .await
            .map_err(|_| std::io::Error::other("the log writer has ended"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the log writer has ended"))?
    }

    /// Waits until everything sent so far is in the file (tokio's File
    /// writes in the background: a process that exits without this loses
    /// its last records).
    pub async fn flush(&self) -> std::io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(LogMsg::Flush(reply))
            .await
            .map_err(|_| std::io::Error::other("the log writer has ended"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the log writer has ended"))?
    }

    async fn write(&self, record: Vec<u8>) -> bool {
        self.tx.send(LogMsg::Record(record)).await.is_ok()
    }
}

async fn open_append(path: &std::path::Path) -> std::io::Result<tokio::fs::File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .await
}

/// Creates a container's log file (and its directory) if it is missing,
/// as containerd does before the container starts; never truncates.
pub async fn create_log_file(path: &std::path::Path) -> std::io::Result<()> {
    open_append(path).await.map(drop)
}

/// Splits a stream into CRI records.
#[derive(Debug)]
pub struct LineSplitter {
    stream: LogStream,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(stream: LogStream) -> LineSplitter {
        LineSplitter {
            stream,
            pending: Vec::new(),
        }
    }

    /// Feeds a chunk; returns the complete records it finished.
    pub fn push(&mut self, mut data: &[u8], now: &str) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let room = MAX_LINE - self.pending.len();
            let take = data.len().min(room);
            match data[..take].iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.pending.extend_from_slice(&data[..nl]);
                    out.push(self.record(now, true));
                    data = &data[nl + 1..];
                }
                None => {
                    self.pending.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.pending.len() >= MAX_LINE {
                        out.push(self.record(now, false));
                    }
                }
            }
        }
        out
    }

    /// The rest at end of stream, as a full record (as containerd does).
    pub fn finish(&mut self, now: &str) -> Option<Vec<u8>> {
        (!self.pending.is_empty()).then(|| self.record(now, true))
    }

    fn record(&mut self, now: &str, full: bool) -> Vec<u8> {
        let tag = if full { "F" } else { "P" };
        let mut r = Vec::with_capacity(self.pending.len() + now.len() + 12);
        r.extend_from_slice(now.as_bytes());
        r.push(b' ');
        r.extend_from_slice(self.stream.name().as_bytes());
        r.push(b' ');
        r.extend_from_slice(tag.as_bytes());
        r.push(b' ');
        r.append(&mut self.pending);
        r.push(b'\n');
        r
    }
}

/// Now in RFC 3339 with nanoseconds, UTC.
pub fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Copies chunks from `rx` (one agent output stream) into the log until the
/// stream ends.
pub async fn pump(
    stream: LogStream,
    mut chunks: tonic::Streaming<vmpod_proto::v1::OutputChunk>,
    writer: LogWriter,
) {
    let mut split = LineSplitter::new(stream);
    loop {
        match chunks.message().await {
            Ok(Some(chunk)) => {
                for record in split.push(&chunk.data, &timestamp()) {
                    if !writer.write(record).await {
                        return;
                    }
                }
            }
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(?stream, %status, "container output stream ended");
                break;
            }
        }
    }
    if let Some(record) = split.finish(&timestamp()) {
        writer.write(record).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(records: Vec<Vec<u8>>) -> Vec<String> {
        records
            .into_iter()
            .map(|r| String::from_utf8(r).unwrap())
            .collect()
    }

    #[test]
    fn lines_become_full_records_across_chunks() {
        let mut s = LineSplitter::new(LogStream::Stdout);
        assert!(s.push(b"hel", "T").is_empty());
        assert_eq!(
            text(s.push(b"lo\nworld\n\nx", "T")),
            ["T stdout F hello\n", "T stdout F world\n", "T stdout F \n"]
        );
        assert_eq!(
            text(s.finish("T").into_iter().collect()),
            ["T stdout F x\n"]
        );
        assert!(s.finish("T").is_none());
    }

    #[test]
    fn long_lines_split_at_16k() {
        let mut s = LineSplitter::new(LogStream::Stderr);
        let mut data = vec![b'a'; MAX_LINE * 2 + 5];
        data.push(b'\n');
        let out = s.push(&data, "T");
        assert_eq!(out.len(), 3);
        assert!(out[0].starts_with(b"T stderr P aaa"));
        assert_eq!(out[0].len(), "T stderr P ".len() + MAX_LINE + 1);
        assert!(out[1].starts_with(b"T stderr P "));
        assert_eq!(out[2], b"T stderr F aaaaa\n");
    }

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        let t = timestamp();
        assert!(t.ends_with('Z') && t.contains('T'));
        assert!(chrono::DateTime::parse_from_rfc3339(&t).is_ok());
    }
}
