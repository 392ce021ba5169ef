//! The control socket: a unix socket speaking JSON lines, one request and
//! one response per line, served from the VMM's event loop.
//!
//! ```text
//! → {"op":"status"}              ← {"ok":true,"protocol":1,"state":"running","vcpus":1,...}
//! → {"op":"pause"}               ← {"ok":true}
//! → {"op":"resume"}              ← {"ok":true}
//! → {"op":"shutdown","timeout_ms":5000}
//!                                ← {"ok":true}  (Ctrl-Alt-Del now; stopped at the deadline)
//! → {"op":"metrics"}             ← {"ok":true,"vmm_rss_bytes":...,"guest_touched_bytes":...,"exits":{...},"devices":{...}}
//! → {"op":"block_attach","slot":0,"path":"/img/rootfs.erofs","read_only":true}
//!                                ← {"ok":true}  (attach, or replace what the slot holds)
//! → {"op":"block_detach","slot":0}
//!                                ← {"ok":true}
//! ```
//!
//! Clients are hostile as far as the VMM cares: lines are bounded, the
//! number of connections is bounded, a client that does not read its
//! replies is dropped, and nothing here blocks the event loop.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};

/// Longest request line.
pub const MAX_LINE: usize = 4096;
/// Most simultaneous control connections.
pub const MAX_CONNECTIONS: usize = 16;
/// Default and largest graceful-shutdown timeouts.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

/// Errors from setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("binding the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    Status,
    Pause,
    Resume,
    /// Ask the guest to shut down, stop the VM after `timeout_ms`.
    Shutdown {
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    Metrics,
    /// Attach a backing file to a block slot, replacing what it holds.
    BlockAttach {
        slot: usize,
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
    },
    /// Empty a block slot.
    BlockDetach {
        slot: usize,
    },
}

/// The control protocol's version, in every `status` reply as `protocol`.
/// A change that an older peer would misread bumps it; the daemon refuses
/// a VMM that speaks another version.
pub const PROTOCOL_VERSION: u32 = 1;

impl ControlRequest {
    /// The request's `op`, for messages.
    pub fn op(&self) -> &'static str {
        match self {
            ControlRequest::Status => "status",
            ControlRequest::Pause => "pause",
            ControlRequest::Resume => "resume",
            ControlRequest::Shutdown { .. } => "shutdown",
            ControlRequest::Metrics => "metrics",
            ControlRequest::BlockAttach { .. } => "block_attach",
            ControlRequest::BlockDetach { .. } => "block_detach",
        }
    }
}

/// Longest path accepted for a block backing file.
pub const MAX_PATH: usize = 4096;

impl ControlRequest {
    /// Checks the bounds a request must meet before anything acts on it.
    pub fn validate(&self, block_slots: usize) -> Result<(), String> {
        match self {
            ControlRequest::BlockAttach { slot, path, .. } => {
                check_slot(*slot, block_slots)?;
                let len = path.as_os_str().len();
                if !path.is_absolute() || len > MAX_PATH {
                    return Err(format!(
                        "block path must be absolute and at most {MAX_PATH} bytes"
                    ));
                }
                Ok(())
            }
            ControlRequest::BlockDetach { slot } => check_slot(*slot, block_slots),
            _ => Ok(()),
        }
    }
}

fn check_slot(slot: usize, slots: usize) -> Result<(), String> {
    if slot < slots {
        Ok(())
    } else {
        Err(format!("no block slot {slot} (the VM has {slots})"))
    }
}

/// Run-time control of the virtio devices, implemented where the devices
/// are wired in (see `machine::DeviceHook`).
pub trait DeviceControl: Send + Sync {
    /// Attaches a backing file to block slot `slot` (replacing its file, if
    /// any) and tells the guest the capacity changed: `file` when the daemon
    /// passed one (SCM_RIGHTS; `path` is then only its name), else `path`
    /// opened (never in a jailed VMM).
    fn block_attach(
        &self,
        slot: usize,
        path: &Path,
        read_only: bool,
        file: Option<std::fs::File>,
    ) -> Result<(), String>;
    /// Detaches block slot `slot`'s file; the guest sees capacity 0.
    fn block_detach(&self, slot: usize) -> Result<(), String>;
    /// Per-device counters for the metrics reply.
    fn metrics(&self) -> serde_json::Value;
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<ControlRequest, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    serde_json::from_str(text.trim()).map_err(|e| format!("bad request: {e}"))
}

/// The bounded shutdown timeout a request asks for.
pub fn shutdown_timeout(timeout_ms: Option<u64>) -> Duration {
    timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT)
        .min(MAX_SHUTDOWN_TIMEOUT)
}

/// What the control socket acts on; the VMM implements it.
pub trait ControlTarget: Send + Sync {
    /// Answers one request with a JSON object (without `ok`), or an error
    /// message. `file`: a descriptor the client sent with it (block_attach).
    fn handle(
        &self,
        req: &ControlRequest,
        file: Option<std::fs::File>,
    ) -> Result<serde_json::Value, String>;
}

/// Renders a response line.
pub fn response_line(result: Result<serde_json::Value, String>) -> Vec<u8> {
    let mut v = match result {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("ok".into(), true.into());
            serde_json::Value::Object(map)
        }
        Ok(other) => serde_json::json!({"ok": true, "result": other}),
        Err(e) => serde_json::json!({"ok": false, "error": e}),
    };
    if v.is_null() {
        v = serde_json::json!({"ok": false});
    }
    let mut out = serde_json::to_vec(&v).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec());
    out.push(b'\n');
    out
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Descriptors received with the bytes in `buf`, oldest first (bounded).
    fds: std::collections::VecDeque<std::os::fd::OwnedFd>,
}

/// The most descriptors one message may carry, and one connection hold.
const MAX_FDS: usize = 2;

/// Reads what is there, with the descriptors that come with it
/// (recvmsg + SCM_RIGHTS, close-on-exec). Beyond [`MAX_FDS`] held
/// descriptors, new ones are closed.
fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut std::collections::VecDeque<std::os::fd::OwnedFd>,
) -> std::io::Result<usize> {
    use std::os::fd::FromRawFd;
    // Room for MAX_FDS ints, aligned for cmsghdr.
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all zeroes is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: msg points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: msg is the header recvmsg filled in; CMSG_FIRSTHDR/NXTHDR stay
    // within msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !c.is_null() {
        // SAFETY: c points at a complete cmsghdr inside `cmsg`.
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a constant computation.
            let data_len = hdr.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            let count = data_len / std::mem::size_of::<libc::c_int>();
            // SAFETY: the data of an SCM_RIGHTS message is `count` ints.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: i < count: the pointer stays inside the message's data.
                let at = unsafe { data.add(i) };
                // SAFETY: `at` points at one of the message's ints; cmsg data
                // need not be aligned for an int, hence the unaligned read.
                let raw = unsafe { at.read_unaligned() };
                // SAFETY: the kernel installed `raw` in this process for us;
                // nothing else owns it.
                let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
                if fds.len() < MAX_FDS {
                    fds.push_back(fd);
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&raw const msg, c) };
    }
    Ok(n as usize)
}

/// The control socket server, an event-loop subscriber.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<i32, Conn>,
    target: Arc<dyn ControlTarget>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket file).
    pub fn bind(path: &Path, target: Arc<dyn ControlTarget>) -> Result<Self, ControlError> {
        let bind_err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        // Only the owner (the daemon) may drive the VM.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            conns: HashMap::new(),
            target,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        // Bounded: at most MAX_CONNECTIONS accepted, the rest refused.
        for _ in 0..MAX_CONNECTIONS * 2 {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err()
                    {
                        let mut s = stream;
                        let _ = s.write_all(&response_line(Err("too many connections".into())));
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                        self.conns.insert(
                            fd,
                            Conn {
                                stream,
                                buf: Vec::new(),
                                fds: std::collections::VecDeque::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    crate::log::warning!("control socket accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads what is there and answers complete lines; false = close.
    fn serve(conn: &mut Conn, target: &dyn ControlTarget) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match recv_with_fds(&conn.stream, &mut chunk, &mut conn.fds) {
                Ok(0) => return false,
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            if conn.buf.len() > MAX_LINE * 4 {
                break;
            }
        }
        while let Some(pos) = conn.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=pos).collect();
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply = if line.len() > MAX_LINE {
                response_line(Err(format!("request longer than {MAX_LINE} bytes")))
            } else {
                response_line(parse_request(line).and_then(|req| {
                    // A descriptor goes with the block_attach it came with.
                    let file = matches!(req, ControlRequest::BlockAttach { .. })
                        .then(|| conn.fds.pop_front().map(std::fs::File::from))
                        .flatten();
                    target.handle(&req, file)
                }))
            };
            // Replies are small; a client that cannot take one is gone.
            if conn.stream.write_all(&reply).is_err() {
                return false;
            }
        }
        if conn.buf.len() > MAX_LINE {
            let _ = conn.stream.write_all(&response_line(Err(format!(
                "request longer than {MAX_LINE} bytes"
            ))));
            return false;
        }
        true
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // A jailed VMM cannot see the path (and may not unlink): the daemon
        // removes the pod's socket dir.
        if !crate::jail::is_jailed() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            crate::log::error!("control socket not in the event loop: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let keep = match self.conns.get_mut(&fd) {
            Some(conn) => {
                !events.event_set().intersects(EventSet::ERROR)
                    && Self::serve(conn, self.target.as_ref())
            }
            None => return,
        };
        if !keep {
            if let Some(conn) = self.conns.remove(&fd) {
                let _ = ops.remove(Events::new(&conn.stream, EventSet::IN));
            }
        }
    }
}

/// A blocking client for tests and tools: sends one raw request line, reads
/// one reply line (bounded by `timeout` and 1 MiB).
pub fn request(path: &Path, req: &str, timeout: Duration) -> std::io::Result<serde_json::Value> {
    request_with_fd(path, req, None, timeout)
}

/// [`request`], passing `fd` with the line (SCM_RIGHTS).
pub fn request_with_fd(
    path: &Path,
    req: &str,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    timeout: Duration,
) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = req.as_bytes().to_vec();
    line.push(b'\n');
    match fd {
        Some(fd) => send_with_fd(&s, &line, fd)?,
        None => s.write_all(&line)?,
    }
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1 << 20 {
        match s.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    serde_json::from_slice(&line).map_err(std::io::Error::other)
}

/// Why a control call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VMM answered and refused (its message, bounded).
    #[error("the VMM refused {op}: {message}")]
    Refused { op: &'static str, message: String },
}

/// Sends all of `line` with `fd` attached to its first byte.
fn send_with_fd(
    s: &UnixStream,
    line: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut cmsg = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: line.as_ptr() as *mut libc::c_void,
        iov_len: line.len(),
    };
    // SAFETY: msghdr is plain old data; all zeroes is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a constant computation.
    msg.msg_controllen =
        unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // SAFETY: msg_control points at `cmsg`, large enough for one cmsghdr
    // with one int.
    let c = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    if c.is_null() {
        return Err(std::io::Error::other("no room for the SCM_RIGHTS header"));
    }
    // SAFETY: CMSG_LEN is a constant computation.
    let len = unsafe { libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // SAFETY: c points into `cmsg`, which has room for one SCM_RIGHTS header
    // and its int (CMSG_SPACE above), and nothing else refers to it.
    let hdr = unsafe { &mut *c };
    hdr.cmsg_level = libc::SOL_SOCKET;
    hdr.cmsg_type = libc::SCM_RIGHTS;
    hdr.cmsg_len = len;
    // SAFETY: the header's data follows it inside `cmsg`.
    let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
    // SAFETY: `data` has room for one int (CMSG_SPACE above); unaligned write.
    unsafe { data.write_unaligned(fd.as_raw_fd()) };
    // SAFETY: msg points at live buffers of the sizes it states.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut w = s;
    w.write_all(&line[n as usize..])
}

/// The typed client the daemon uses: sends `req`, returns the reply object
/// when the VMM says `ok`.
pub fn call(
    path: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<serde_json::Value, CallError> {
    call_with_fd(path, req, None, timeout)
}

/// [`call`], passing `fd` with the request (block_attach's disk).
pub fn call_with_fd(
    path: &Path,
    req: &ControlRequest,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<serde_json::Value, CallError> {
    let line = serde_json::to_string(req).map_err(|e| CallError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let reply = request_with_fd(path, &line, fd, timeout).map_err(|source| CallError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if reply["ok"] == true {
        Ok(reply)
    } else {
        Err(CallError::Refused {
            op: req.op(),
            message: reply["error"]
                .as_str()
                .unwrap_or("no reason given")
                .chars()
                .take(512)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::SubscriberOps;
    use std::sync::Mutex;

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_request(br#"{"op":"status"}"#),
            Ok(ControlRequest::Status)
        );
        assert_eq!(
            parse_request(br#" {"op":"shutdown","timeout_ms":250} "#),
            Ok(ControlRequest::Shutdown {
                timeout_ms: Some(250)
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"shutdown"}"#),
            Ok(ControlRequest::Shutdown { timeout_ms: None })
        );
        assert_eq!(
            parse_request(br#"{"op":"block_attach","slot":1,"path":"/a/b.img"}"#),
            Ok(ControlRequest::BlockAttach {
                slot: 1,
                path: "/a/b.img".into(),
                read_only: false
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"block_detach","slot":0}"#),
            Ok(ControlRequest::BlockDetach { slot: 0 })
        );
    }

    #[test]
    fn block_requests_are_bounded() {
        let attach = |slot, path: &str| ControlRequest::BlockAttach {
            slot,
            path: path.into(),
            read_only: true,
        };
        assert!(attach(0, "/img").validate(1).is_ok());
        assert!(attach(1, "/img").validate(1).is_err(), "slot out of range");
        assert!(attach(0, "relative/img").validate(1).is_err());
        assert!(
            attach(0, &format!("/{}", "a".repeat(MAX_PATH)))
                .validate(1)
                .is_err()
        );
        assert!(ControlRequest::BlockDetach { slot: 0 }.validate(0).is_err());
        assert!(ControlRequest::Status.validate(0).is_ok());
        for bad in [
            &br#"{"op":"block_attach","slot":-1,"path":"/a"}"#[..],
            br#"{"op":"block_attach","slot":0}"#,
            br#"{"op":"block_detach"}"#,
            br#"{"op":"block_attach","slot":0,"path":"/a","read_only":"yes"}"#,
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn hostile_requests_are_errors_not_panics() {
        for bad in [
            &b"\xff\xfe"[..],
            b"{",
            b"[]",
            b"null",
            br#"{"op":"launch_missiles"}"#,
            br#"{"op":"shutdown","timeout_ms":-1}"#,
            br#"{"op":"shutdown","timeout_ms":1e400}"#,
            br#"{"op":7}"#,
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = "[".repeat(100_000);
        assert!(parse_request(deep.as_bytes()).is_err());
    }

    #[test]
    fn shutdown_timeouts_are_bounded() {
        assert_eq!(shutdown_timeout(None), DEFAULT_SHUTDOWN_TIMEOUT);
        assert_eq!(shutdown_timeout(Some(u64::MAX)), MAX_SHUTDOWN_TIMEOUT);
        assert_eq!(shutdown_timeout(Some(5)), Duration::from_millis(5));
    }

    struct Echo(Mutex<Vec<ControlRequest>>);
    impl ControlTarget for Echo {
        fn handle(
            &self,
            req: &ControlRequest,
            _file: Option<std::fs::File>,
        ) -> Result<serde_json::Value, String> {
            self.0.lock().unwrap().push(req.clone());
            match req {
                ControlRequest::Pause => Err("cannot".into()),
                _ => Ok(serde_json::json!({"state": "running"})),
            }
        }
    }

    #[test]
    fn serves_lines_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let target = Arc::new(Echo(Mutex::new(Vec::new())));
        let server = ControlServer::bind(&path, target.clone()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut em =
            event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                .unwrap();
        em.add_subscriber(Arc::new(Mutex::new(server)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let loop_thread = std::thread::spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                em.run_with_timeout(20).unwrap();
            }
        });
        let t = Duration::from_secs(5);
        let v = request(&path, r#"{"op":"status"}"#, t).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["state"], "running");
        let v = request(&path, r#"{"op":"pause"}"#, t).unwrap();
        assert_eq!(
            (v["ok"].clone(), v["error"].clone()),
            (false.into(), "cannot".into())
        );
        let v = request(&path, "garbage", t).unwrap();
        assert_eq!(v["ok"], false);
        // An endless line: the server answers with an error and hangs up
        // (our write may fail once it has).
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(t)).unwrap();
        let _ = s.write_all("x".repeat(MAX_LINE * 3).as_bytes());
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(reply.contains("longer than"), "{reply}");
        // Two requests on one connection, answered in order.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(t)).unwrap();
        s.write_all(b"{\"op\":\"metrics\"}\n{\"op\":\"resume\"}\n")
            .unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 256];
        while got.matches('\n').count() < 2 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        loop_thread.join().unwrap();
        assert_eq!(
            *target.0.lock().unwrap(),
            vec![
                ControlRequest::Status,
                ControlRequest::Pause,
                ControlRequest::Metrics,
                ControlRequest::Resume
            ]
        );
    }
}
