//! `vmpod log-pump`: one small process per running container that copies
//! its stdout and stderr from the agent into the CRI log file, as
//! containerd's shim does. It is not part of the daemon so a daemon restart
//! never closes the container's output pipes (the agent drops a stream
//! whose reader went away, and the container's next write would meet
//! EPIPE/SIGPIPE). It ends when both streams end (the container exited).
//! SIGHUP reopens the log file (ReopenContainerLog).

use std::path::PathBuf;
use std::time::Duration;

use vmpod_proto::v1 as agent;

use crate::agent_client::{self, AgentAddr};
use crate::logs::{self, LogStream, LogWriter};

/// Errors of a log pump.
#[derive(Debug, thiserror::Error)]
pub enum LogPumpError {
    #[error("reaching the agent")]
    Agent(#[source] agent_client::AgentClientError),
    #[error("opening the {0:?} stream")]
    Stream(LogStream, #[source] tonic::Status),
    #[error("opening the log {0}")]
    Log(PathBuf, #[source] std::io::Error),
    #[error("watching SIGHUP")]
    Signal(#[source] std::io::Error),
}

/// How long the pump tries to reach the agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The streams last as long as the container.
const STREAM_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Pumps until both streams end.
pub async fn run(addr: AgentAddr, container_id: String, log: PathBuf) -> Result<(), LogPumpError> {
    // SIGHUP first: the daemon starts the pump with SIGHUP blocked (see
    // `block_sighup_in_child`), so a ReopenContainerLog that comes before
    // this point waits as a pending signal instead of killing the pump.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(LogPumpError::Signal)?;
    let mut unblock = nix::sys::signal::SigSet::empty();
    unblock.add(nix::sys::signal::Signal::SIGHUP);
    unblock
        .thread_unblock()
        .map_err(|e| LogPumpError::Signal(e.into()))?;
    let client = agent_client::connect_ready(&addr, CONNECT_TIMEOUT)
        .await
        .map_err(LogPumpError::Agent)?;
    let writer = LogWriter::open(log.clone())
        .await
        .map_err(|e| LogPumpError::Log(log.clone(), e))?;
    let mut pumps = Vec::new();
    for (stream, which) in [
        (
            LogStream::Stdout,
            agent::read_output_request::Stream::Stdout,
        ),
        (
            LogStream::Stderr,
            agent::read_output_request::Stream::Stderr,
        ),
    ] {
        let mut req = tonic::Request::new(agent::ReadOutputRequest {
            container_id: container_id.clone(),
            exec_id: String::new(),
            stream: which as i32,
        });
        req.set_timeout(STREAM_TIMEOUT);
        let chunks = client
            .clone()
            .read_output(req)
            .await
            .map_err(|s| LogPumpError::Stream(stream, s))?
            .into_inner();
        pumps.push(tokio::spawn(logs::pump(stream, chunks, writer.clone())));
    }
    let reopen = writer.clone();
    let hup = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if let Err(e) = reopen.reopen().await {
                tracing::warn!(error = %e, "reopening the log");
            }
        }
    });
    for p in pumps {
        let _ = p.await;
    }
    hup.abort();
    writer
        .flush()
        .await
        .map_err(|e| LogPumpError::Log(log, e))?;
    Ok(())
}

/// For the pump's `Command::pre_exec`: starts it with SIGHUP blocked (the
/// mask survives exec), until [`run`] has its handler in place.
pub fn block_sighup_in_child() -> std::io::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGHUP);
    // pthread_sigmask is async-signal-safe; the set lives on this stack.
    set.thread_block().map_err(std::io::Error::from)
}
