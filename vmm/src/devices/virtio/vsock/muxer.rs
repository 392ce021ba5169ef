//! The hybrid vsock backend: host unix sockets ⇄ guest vsock connections.
//!
//! The muxer has its own epoll set (listener, handshakes, connection
//! streams, a deadline timer); the device registers that one fd with the
//! VMM's event loop and calls [`VsockBackend::notify`] when it fires.
//!
//! Handshake (host side): `CONNECT <port>\n` is read one byte at a time so
//! nothing after the newline is consumed, bounded to [`MAX_HANDSHAKE_LEN`]
//! bytes and [`HANDSHAKE_TIMEOUT`]; the `OK <host port>\n` reply is written
//! when the guest accepts.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, ConnState, Connection, Interest};
use super::metrics::VsockMetrics;
use super::packet::{PacketHeader, TxPacket};
use super::{
    HANDSHAKE_TIMEOUT, HOST_CID, MAX_CONNECTIONS, MAX_HANDSHAKE_LEN, TYPE_STREAM, VsockBackend,
    VsockError, op,
};
use crate::devices::virtio::log_limit::{LogLimiter, guest_warn};

/// First host-side port handed out for host-initiated connections.
const LOCAL_PORT_START: u32 = 1 << 30;
/// Most RSTs for unknown connections held for the guest.
const MAX_PENDING_RST: usize = 256;
/// How often deadlines are checked while any exist.
const TICK: Duration = Duration::from_millis(500);
/// Accepts per notification, so a flood cannot monopolise the loop.
const ACCEPTS_PER_NOTIFY: usize = 32;

#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Parses `CONNECT <port>\n` (an optional `\r` before the newline is accepted).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let port = line.strip_prefix(b"CONNECT ")?;
    if port.is_empty() || port.len() > 10 || !port.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(port).ok()?.parse().ok()
}

/// Hybrid vsock backend over unix sockets.
#[derive(Debug)]
pub struct HybridMuxer {
    uds_path: PathBuf,
    guest_cid: u64,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    /// The listener is out of the epoll set after an accept error (e.g.
    /// EMFILE), which would otherwise keep it readable forever.
    listener_paused: bool,
    conns: HashMap<ConnKey, Connection>,
    registered: HashMap<RawFd, (ConnKey, Option<Interest>)>,
    handshakes: HashMap<RawFd, Handshake>,
    rxq: VecDeque<ConnKey>,
    rst_queue: VecDeque<PacketHeader>,
    next_local_port: u32,
    timeout: Duration,
    metrics: Arc<VsockMetrics>,
    log: LogLimiter,
}

impl HybridMuxer {
    /// Listens on `uds_path` for host clients of guest `guest_cid`.
    pub fn new(
        uds_path: &Path,
        guest_cid: u64,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(guest_cid));
        }
        let bind = |source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind)?;
        // Whoever connects talks to the guest's agent: the daemon only
        // (the umask's mode would let any local user in).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(uds_path, std::fs::Permissions::from_mode(0o600))
                .map_err(bind)?;
        }
        listener.set_nonblocking(true).map_err(bind)?;
        let epoll = Epoll::new().map_err(VsockError::Events)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Events(e.into()))?;
        // A stray wakeup must never block the event loop in timer.wait().
        // SAFETY: F_SETFL on the fd `timer` owns; no memory is passed.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(VsockError::Events(io::Error::last_os_error()));
        }
        let m = Self {
            uds_path: uds_path.to_path_buf(),
            guest_cid,
            listener,
            epoll,
            timer,
            timer_armed: false,
            listener_paused: false,
            conns: HashMap::new(),
            registered: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_local_port: LOCAL_PORT_START,
            timeout: HANDSHAKE_TIMEOUT,
            metrics,
            log: LogLimiter::new(),
        };
        for fd in [m.listener.as_raw_fd(), m.timer.as_raw_fd()] {
            m.epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(VsockError::Events)?;
        }
        Ok(m)
    }

    /// Changes the handshake and close timeout (default [`HANDSHAKE_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Number of live connections (for tests and metrics).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// A connection by key (for tests).
    pub fn connection(&self, key: &ConnKey) -> Option<&Connection> {
        self.conns.get(key)
    }

    fn arm_timer(&mut self) {
        let tick = TICK.min(self.timeout / 2).max(Duration::from_millis(1));
        if !self.timer_armed && self.timer.reset(tick, Some(tick)).is_ok() {
            self.timer_armed = true;
        }
    }

    fn on_timer(&mut self) {
        let _ = self.timer.wait();
        if self.listener_paused {
            let fd = self.listener.as_raw_fd();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .is_ok()
            {
                self.listener_paused = false;
            }
        }
        let now = Instant::now();
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            self.metrics
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            self.drop_handshake(fd);
        }
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(c) = self.conns.get_mut(&key) {
                c.expire(now);
            }
            self.after_conn_op(key);
        }
        let any_deadline = self.listener_paused
            || !self.handshakes.is_empty()
            || self.conns.values().any(|c| c.deadline().is_some());
        if !any_deadline && self.timer.clear().is_ok() {
            self.timer_armed = false;
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if self.handshakes.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_NOTIFY {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    guest_warn!(self.log, "vsock: accept failed, pausing the listener: {e}");
                    let fd = self.listener.as_raw_fd();
                    if self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                        .is_ok()
                    {
                        self.listener_paused = true;
                        self.arm_timer();
                    }
                    return;
                }
            };
            if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                self.metrics.conns_refused.fetch_add(1, Ordering::Relaxed);
                continue; // dropping the stream closes it
            }
            let fd = stream.as_raw_fd();
            if stream.set_nonblocking(true).is_err()
                || self
                    .epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, fd as u64),
                    )
                    .is_err()
            {
                continue;
            }
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_HANDSHAKE_LEN),
                    deadline: Instant::now() + self.timeout,
                },
            );
            self.arm_timer();
        }
    }

    fn on_handshake(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match h.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) => {
                    h.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break parse_connect_line(&h.line);
                    }
                    if h.line.len() >= MAX_HANDSHAKE_LEN {
                        break None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        let Some(peer_port) = port else {
            self.metrics
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(local_port) = self.allocate_local_port(peer_port) else {
            self.metrics
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let conn = Connection::new_local(h.stream, key, self.guest_cid, self.timeout);
        self.add_connection(key, conn);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(LOCAL_PORT_START);
            let key = ConnKey {
                local_port: p,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    fn add_connection(&mut self, key: ConnKey, conn: Connection) {
        let fd = conn.stream().as_raw_fd();
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::empty(), fd as u64),
            )
            .is_err()
        {
            return;
        }
        self.registered.insert(
            fd,
            (
                key,
                Some(Interest {
                    read: false,
                    write: false,
                }),
            ),
        );
        if let Some(old) = self.conns.insert(key, conn) {
            // Cannot happen (keys are checked), but never leak a registration.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old.stream().as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.metrics.conns_added.fetch_add(1, Ordering::Relaxed);
        self.arm_timer();
        self.after_conn_op(key);
    }

    /// Brings queueing and epoll interest in line with the connection's
    /// state; forgets finished connections.
    fn after_conn_op(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        if conn.is_finished() {
            // Deregister before the stream (and its fd number) is released.
            if let Some((_, Some(_))) = self.registered.remove(&fd) {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.conns.remove(&key);
            self.metrics.conns_removed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if conn.has_pending() && !conn.queued {
            conn.queued = true;
            self.rxq.push_back(key);
        }
        let want = conn.interest();
        let hup = conn.hup;
        if conn.deadline().is_some() {
            self.arm_timer();
        }
        let Some((_, current)) = self.registered.get_mut(&fd) else {
            return;
        };
        if hup {
            if current.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                *current = None;
            }
            return;
        }
        if *current != Some(want) {
            let mut set = EventSet::empty();
            if want.read {
                set |= EventSet::IN;
            }
            if want.write {
                set |= EventSet::OUT;
            }
            if self
                .epoll
                .ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(set, fd as u64),
                )
                .is_ok()
            {
                *current = Some(want);
            }
        }
    }

    fn on_stream(&mut self, fd: RawFd, events: EventSet) {
        let Some(&(key, _)) = self.registered.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::OUT) {
            conn.flush();
        }
        if events.contains(EventSet::IN) {
            conn.on_readable();
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.hup = true;
            match conn.state() {
                // The host client gave up before the guest answered.
                ConnState::LocalInit => conn.kill(),
                // Reading finds the remaining data, then EOF.
                _ => conn.on_readable(),
            }
        }
        self.after_conn_op(key);
    }

    fn queue_rst(&mut self, hdr: &PacketHeader) {
        if self.rst_queue.len() >= MAX_PENDING_RST {
            return;
        }
        let mut rst = PacketHeader::default();
        rst.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(hdr.dst_port())
            .set_dst_port(hdr.src_port())
            .set_type(TYPE_STREAM)
            .set_op(op::RST);
        self.rst_queue.push_back(rst);
        self.metrics.rst_sent.fetch_add(1, Ordering::Relaxed);
    }

    fn connect_host(&self, port: u32) -> io::Result<UnixStream> {
        // A jailed VMM creates no sockets: guest connections to host ports
        // are refused (the agent only listens; the host always connects).
        if crate::jail::is_jailed() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a jailed VMM makes no host connections",
            ));
        }
        let path = format!("{}_{}", self.uds_path.display(), port);
        let addr = sockaddr_un(Path::new(&path))?;
        // Non-blocking connect: a unix listener with a full backlog answers
        // EAGAIN instead of stalling the VMM's event loop.
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh socket that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: `addr` is an initialised sockaddr_un and the length is its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(UnixStream::from(fd))
    }
}

/// The `sockaddr_un` of `path`; InvalidInput when it does not fit.
pub(crate) fn sockaddr_un(path: &Path) -> io::Result<libc::sockaddr_un> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain old data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(addr)
}

impl AsRawFd for HybridMuxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl VsockBackend for HybridMuxer {
    fn send_pkt(&mut self, pkt: TxPacket) {
        let hdr = pkt.hdr;
        if hdr.src_cid() != self.guest_cid || hdr.dst_cid() != HOST_CID {
            self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            guest_warn!(
                self.log,
                "vsock: packet with wrong CIDs dropped: src_cid={} dst_cid={}",
                hdr.src_cid(),
                hdr.dst_cid()
            );
            return;
        }
        if hdr.type_() != TYPE_STREAM {
            self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            if hdr.op() != op::RST {
                self.queue_rst(&hdr);
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port(),
            peer_port: hdr.src_port(),
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.send_pkt(&pkt);
            if matches!(hdr.op(), op::CREDIT_UPDATE | op::RW | op::CREDIT_REQUEST) {
                conn.on_credit();
            }
            if conn.state() == ConnState::Dead && conn.has_pending() {
                self.metrics.rst_sent.fetch_add(1, Ordering::Relaxed);
            }
            self.after_conn_op(key);
            return;
        }
        match hdr.op() {
            op::RST => {}
            op::REQUEST => {
                if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                    self.metrics.conns_refused.fetch_add(1, Ordering::Relaxed);
                    self.queue_rst(&hdr);
                    return;
                }
                match self.connect_host(hdr.dst_port()) {
                    Ok(stream) => {
                        let conn =
                            Connection::new_peer(stream, key, self.guest_cid, &hdr, self.timeout);
                        self.add_connection(key, conn);
                    }
                    Err(e) => {
                        guest_warn!(
                            self.log,
                            "vsock: guest connection to host port {} refused: {e}",
                            hdr.dst_port()
                        );
                        self.queue_rst(&hdr);
                    }
                }
            }
            _ => self.queue_rst(&hdr),
        }
    }

    fn recv_pkt(&mut self, data: &mut [u8]) -> Option<(PacketHeader, usize)> {
        if let Some(rst) = self.rst_queue.pop_front() {
            return Some((rst, 0));
        }
        while let Some(key) = self.rxq.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let pkt = conn.recv_pkt(data);
            self.after_conn_op(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }

    fn notify(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                guest_warn!(self.log, "vsock: epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            if fd == self.listener.as_raw_fd() {
                self.accept();
            } else if fd == self.timer.as_raw_fd() {
                self.on_timer();
            } else if self.handshakes.contains_key(&fd) {
                self.on_handshake(fd);
            } else {
                self.on_stream(fd, ev.event_set());
            }
        }
    }

    fn reset(&mut self) {
        let fds: Vec<RawFd> = self.handshakes.keys().copied().collect();
        for fd in fds {
            self.drop_handshake(fd);
        }
        for (fd, (_, reg)) in self.registered.drain() {
            if reg.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        self.conns.clear();
        self.rxq.clear();
        self.rst_queue.clear();
    }
}

impl Drop for HybridMuxer {
    fn drop(&mut self) {
        // A jailed VMM cannot see the path (and may not unlink).
        if !crate::jail::is_jailed() {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let m = HybridMuxer::new(&path, 3, Arc::new(VsockMetrics::default())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(m);
        assert!(!path.exists());
    }

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 1024\n"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r\n"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT \n"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1\n"), None);
        assert_eq!(parse_connect_line(b"connect 1\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT 1"), None);
    }
}
