//! The vhost-user frontend: the connection to virtiofsd, through the
//! `vhost` crate's [`Frontend`].
//!
//! Everything that waits for a reply happens once, while the VM is built
//! ([`VhostUserFs::connect`]): SET_OWNER, GET_FEATURES,
//! GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM and SET_MEM_TABLE (acknowledged
//! when the backend offers REPLY_ACK), on a helper thread with a deadline;
//! past it the socket is shut down, which ends the blocked read.
//!
//! At run time ([`FsBackend::start`], [`FsBackend::stop`], from the vCPU
//! thread that writes the status register) the frontend's messages are
//! sent without NEED_REPLY, after `poll` says the socket has room (a Unix
//! socket reports POLLOUT only with half of its send buffer free, far more
//! than the dozen small messages of one start), and then the device waits,
//! at most [`BARRIER_TIMEOUT`], for the reply to one GET_FEATURES it sends
//! and reads itself ([`VhostUserFs::barrier`]). The backend handles its
//! messages in order, so the reply proves it applied everything before it:
//! without that, a guest kick right after DRIVER_OK can reach virtiofsd's
//! worker while the rings are still the old ones, and be lost. A backend
//! that stopped reading or answering turns into an error after at most
//! that long, never into a vCPU blocked for good. Syscalls: `poll`,
//! `sendmsg`, `read`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{FsBackend, FsError, NUM_QUEUES, QueueInfo};
use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// How long the build-time handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a vCPU waits for the backend to confirm a start or stop.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(1);

/// `VHOST_USER_GET_FEATURES`, the barrier's request.
const GET_FEATURES: u32 = 1;
/// Header flags: protocol version 1; a reply has 0x4 set too.
const HDR_VERSION_1: u32 = 0x1;
const HDR_REPLY: u32 = 0x4;
/// A vhost-user header (request, flags, size) and a u64 body.
const HDR_LEN: usize = 12;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: rings start disabled and are enabled
/// with SET_VRING_ENABLE, which is how the device stops them on reset.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Ring features the guest may negotiate with the backend directly: the
/// device never touches the rings itself, so it needs no support for them.
const RING_FEATURES: u64 = (1 << 28) | (1 << 29); // INDIRECT_DESC, EVENT_IDX

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
    move |source| FsError::Protocol { step, source }
}

/// A connected, handshaken vhost-user backend (virtiofsd).
pub struct VhostUserFs {
    frontend: Frontend,
    /// The same socket as the frontend's: polled before sending, watched by
    /// the event loop for the backend going away.
    socket: UnixStream,
    /// Virtio features the backend offered.
    features: u64,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

/// The memory table: every guest RAM region with its memfd.
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, FsError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| FsError::MemoryNotShared)
        })
        .collect()
}

/// The build-time exchange; runs on a helper thread.
fn handshake(
    mut frontend: Frontend,
    regions: &[VhostUserMemoryRegionInfo],
) -> Result<u64, FsError> {
    frontend.set_owner().map_err(step("SET_OWNER"))?;
    let features = frontend.get_features().map_err(step("GET_FEATURES"))?;
    for (bit, what) in [
        (1 << VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
        (PROTOCOL_FEATURES, "VHOST_USER_F_PROTOCOL_FEATURES"),
    ] {
        if features & bit == 0 {
            return Err(FsError::BackendFeatures { what, features });
        }
    }
    let offered = frontend
        .get_protocol_features()
        .map_err(step("GET_PROTOCOL_FEATURES"))?;
    // REPLY_ACK: know now whether the backend could map guest memory. MQ:
    // check the backend has both queues. Nothing else (no CONFIG: the
    // device answers config reads itself; no backend requests: no DAX).
    let wanted = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ;
    let acked = offered & wanted;
    frontend
        .set_protocol_features(acked)
        .map_err(step("SET_PROTOCOL_FEATURES"))?;
    if acked.contains(VhostUserProtocolFeatures::MQ) {
        let n = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
        if n < NUM_QUEUES as u64 {
            return Err(FsError::QueueNum(n));
        }
    }
    if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let table = frontend
        .set_mem_table(regions)
        .map_err(step("SET_MEM_TABLE"));
    // From here on nothing waits for a reply (see the module docs).
    frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
    table?;
    Ok(features)
}

impl VhostUserFs {
    /// Connects to the backend at `path` and hands it guest memory `mem`
    /// (which must be shared); fails if the backend has not answered
    /// within `timeout`.
    pub fn connect(path: &Path, mem: &GuestMemoryMmap, timeout: Duration) -> Result<Self, FsError> {
        let regions = memory_regions(mem)?;
        let socket = UnixStream::connect(path).map_err(|source| FsError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let theirs = socket
            .try_clone()
            .map_err(|e| FsError::Io("cloning the vhost-user socket", e))?;
        let frontend = Frontend::from_stream(theirs, NUM_QUEUES as u64);
        let features = std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let fe = frontend.clone();
            let regions = &regions;
            s.spawn(move || {
                let _ = tx.send(handshake(fe, regions));
            });
            match rx.recv_timeout(timeout) {
                Ok(result) => result,
                Err(_) => {
                    // Unblocks the helper (its read sees EOF); the scope joins it.
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                    Err(FsError::Timeout(timeout))
                }
            }
        })?;
        Ok(Self {
            frontend,
            socket,
            features,
        })
    }

    /// Fails unless the backend is connected and reading: then the few
    /// messages of one start or stop fit the send buffer without blocking.
    fn check_writable(&self) -> Result<(), FsError> {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1, no timeout: poll only writes revents.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n < 0 {
            return Err(FsError::Io(
                "polling the vhost-user socket",
                std::io::Error::last_os_error(),
            ));
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(FsError::Disconnected);
        }
        if pfd.revents & libc::POLLOUT == 0 {
            return Err(FsError::BackendStalled);
        }
        Ok(())
    }

    /// Sends GET_FEATURES and waits up to `timeout` for its reply, read
    /// here rather than by the frontend so the wait is bounded. Anything
    /// but exactly that reply (the device never has another one pending)
    /// is an error.
    fn barrier(&self, timeout: Duration) -> Result<(), FsError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut request = [0u8; HDR_LEN];
        request[..4].copy_from_slice(&GET_FEATURES.to_le_bytes());
        request[4..8].copy_from_slice(&HDR_VERSION_1.to_le_bytes());
        let iov = libc::iovec {
            iov_base: request.as_mut_ptr().cast(),
            iov_len: request.len(),
        };
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = (&raw const iov).cast_mut();
        msg.msg_iovlen = 1;
        // SAFETY: `msg` points at one iovec over `request`, which outlives
        // the call; MSG_NOSIGNAL turns a closed peer into EPIPE, not SIGPIPE.
        let sent = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent != HDR_LEN as isize {
            // check_writable guaranteed room: a short send means a dead socket.
            return Err(FsError::Disconnected);
        }
        let mut reply = [0u8; HDR_LEN + 8];
        let mut got = 0;
        while got < reply.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(FsError::Timeout(timeout));
            }
            let mut pfd = libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd, count 1: poll only writes revents.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(FsError::Io("polling the vhost-user socket", e));
            }
            if n == 0 {
                continue;
            }
            let rest = &mut reply[got..];
            // read(2), not std's UnixStream::read: that is recvfrom, which
            // the vCPU seccomp filter does not allow.
            // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes.
            let k = unsafe {
                libc::read(
                    self.socket.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                )
            };
            match k {
                0 => return Err(FsError::Disconnected),
                k if k > 0 => got += k as usize,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(FsError::Io("reading the vhost-user socket", e));
                    }
                }
            }
        }
        let word =
            |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
        if word(0) != GET_FEATURES || word(4) != HDR_VERSION_1 | HDR_REPLY || word(8) != 8 {
            return Err(FsError::UnexpectedReply);
        }
        Ok(())
    }
}

impl FsBackend for VhostUserFs {
    fn features(&self) -> u64 {
        self.features
    }

    fn start(
        &mut self,
        features: u64,
        mem: &GuestMemoryMmap,
        queues: &[QueueInfo],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), FsError> {
        self.check_writable()?;
        let host = |i: usize, gpa: u64| {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| FsError::RingAddress(i))
        };
        let fe = &mut self.frontend;
        // The guest's features (ring layout) plus the protocol bit, which
        // keeps the rings disabled until SET_VRING_ENABLE.
        let acked = (features & self.features) | PROTOCOL_FEATURES;
        fe.set_features(acked).map_err(step("SET_FEATURES"))?;
        for (i, ((q, kick), call)) in queues.iter().zip(kicks).zip(calls).enumerate() {
            let config = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(i, q.desc)?,
                used_ring_addr: host(i, q.used)?,
                avail_ring_addr: host(i, q.avail)?,
                log_addr: None,
            };
            fe.set_vring_num(i, q.size).map_err(step("SET_VRING_NUM"))?;
            fe.set_vring_addr(i, &config)
                .map_err(step("SET_VRING_ADDR"))?;
            fe.set_vring_base(i, q.next_avail)
                .map_err(step("SET_VRING_BASE"))?;
            fe.set_vring_call(i, call).map_err(step("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, kick).map_err(step("SET_VRING_KICK"))?;
            fe.set_vring_enable(i, true)
                .map_err(step("SET_VRING_ENABLE"))?;
        }
        self.barrier(BARRIER_TIMEOUT)
    }

    fn stop(&mut self, queues: usize) -> Result<(), FsError> {
        self.check_writable()?;
        for i in 0..queues {
            // Not GET_VRING_BASE: it waits for a reply. A disabled ring is
            // neither read nor signalled; the next start sets it up afresh.
            self.frontend
                .set_vring_enable(i, false)
                .map_err(step("SET_VRING_ENABLE"))?;
        }
        // Once confirmed, the backend no longer reads the old rings.
        self.barrier(BARRIER_TIMEOUT)
    }

    fn watch_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.socket.as_fd())
    }
}

/// Features the device offers the guest, given the backend's.
pub fn guest_features(backend: u64) -> u64 {
    (1 << VIRTIO_F_VERSION_1) | (backend & RING_FEATURES)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::fs::test_utils::*;
    use crate::devices::virtio::fs::{Fs, REQUEST_QUEUE};
    use crate::devices::virtio::mmio::reg;
    use crate::devices::virtio::test_utils::{
        Buf, MEM_SIZE, MockDriver, TestEventManager, event_manager_with, run_until, wait_used,
    };
    use crate::devices::virtio::{VIRTIO_MMIO_INT_VRING, VirtioDevice, status};

    fn shared_memory() -> GuestMemoryMmap {
        crate::machine::guest_memory(&[(GuestAddress(0), MEM_SIZE)], true).unwrap()
    }

    /// A device on a real virtiofsd, brought up by the mock driver.
    struct Setup {
        virtiofsd: Virtiofsd,
        dev: Arc<Mutex<Fs>>,
        d: MockDriver,
        em: TestEventManager,
        _dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let virtiofsd = Virtiofsd::start(dir.path());
        std::fs::write(virtiofsd.shared.join("hello"), b"hello, guest\n").unwrap();
        let mem = shared_memory();
        let backend = VhostUserFs::connect(&virtiofsd.socket, &mem, HANDSHAKE_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "{}; virtiofsd log:\n{}",
                    crate::error_chain(&e),
                    virtiofsd.log()
                )
            });
        let dev = Arc::new(Mutex::new(
            Fs::new("vmpod", 256, Box::new(backend)).unwrap(),
        ));
        let mut d = MockDriver::with_memory(dev.clone(), mem);
        let em = event_manager_with(dev.clone());
        d.init(0);
        Setup {
            virtiofsd,
            dev,
            d,
            em,
            _dir: dir,
        }
    }

    impl Setup {
        /// Sends one FUSE request on the request queue and returns the reply
        /// (`reply_len` bytes of device-writable space), after the relayed
        /// interrupt said it is there.
        fn fuse(&mut self, request: &[u8], reply_len: u32) -> Vec<u8> {
            let c = self.d.add_chain(
                REQUEST_QUEUE,
                &[Buf::Out(request.to_vec()), Buf::In(reply_len)],
            );
            self.d.notify(REQUEST_QUEUE);
            let irq = self.dev.lock().unwrap().interrupt().clone();
            let virtiofsd = &self.virtiofsd;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while irq.evt().read().is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no interrupt from virtiofsd; its log:\n{}",
                    virtiofsd.log()
                );
                self.em.run_with_timeout(20).unwrap();
            }
            assert_ne!(
                self.d.take_interrupt() & VIRTIO_MMIO_INT_VRING,
                0,
                "no used-buffer interrupt; virtiofsd log:\n{}",
                virtiofsd.log()
            );
            let used = wait_used(&mut self.em, &mut self.d, REQUEST_QUEUE);
            assert_eq!(used.head, c.head);
            let (addr, _) = c.buffers[1];
            let reply = self.d.read_mem(addr, used.len as usize);
            assert!(reply.len() >= OUT_HEADER_LEN, "short reply {reply:?}");
            assert_eq!(out_header(&reply).len, used.len, "header vs used length");
            reply
        }

        fn init(&mut self) {
            let reply = self.fuse(&fuse_request(FUSE_INIT, 1, 0, &fuse_init_in(31)), 256);
            let h = out_header(&reply);
            assert_eq!((h.error, h.unique), (0, 1), "{h:?}");
            assert_eq!(reply.len(), OUT_HEADER_LEN + INIT_OUT_LEN);
            assert_eq!(le_u32(&reply, OUT_HEADER_LEN), 7, "major");
            assert!(le_u32(&reply, OUT_HEADER_LEN + 4) >= 31, "minor");
        }

        fn lookup(&mut self, unique: u64, name: &str) -> (OutHeader, Vec<u8>) {
            let mut body = name.as_bytes().to_vec();
            body.push(0);
            let reply = self.fuse(&fuse_request(FUSE_LOOKUP, unique, 1, &body), 256);
            (out_header(&reply), reply)
        }
    }

    /// The whole path against a real virtiofsd: vhost-user handshake,
    /// rings set up on DRIVER_OK, the guest's notify reaching virtiofsd
    /// through the kick fd, its call coming back as our interrupt.
    #[test]
    fn fuse_init_and_lookup_through_virtiofsd() {
        let mut s = setup();
        s.init();

        let (h, reply) = s.lookup(2, "hello");
        assert_eq!((h.error, h.unique), (0, 2), "{h:?}");
        assert_eq!(reply.len(), OUT_HEADER_LEN + ENTRY_OUT_LEN);
        let entry = &reply[OUT_HEADER_LEN..];
        assert_ne!(le_u64(entry, 0), 0, "nodeid");
        // fuse_entry_out: 40 bytes of ids and timeouts, then fuse_attr
        // (ino, size, ...).
        assert_eq!(le_u64(entry, 48), 13, "attr.size");
        let mode = le_u32(entry, 40 + 8 * 6 + 4 * 3);
        assert_eq!(mode & libc::S_IFMT, libc::S_IFREG, "mode {mode:o}");

        let (h, reply) = s.lookup(3, "missing");
        assert_eq!((h.error, h.unique), (-libc::ENOENT, 3), "{h:?}");
        assert_eq!(reply.len(), OUT_HEADER_LEN);

        let m = s.dev.lock().unwrap().metrics();
        assert!(m.contains(&("fs_activations", 1)), "{m:?}");
        assert!(m.contains(&("fs_interrupts", 3)), "{m:?}");
        assert!(m.contains(&("fs_disconnects", 0)), "{m:?}");
    }

    /// A driver reset disables the rings (SET_VRING_ENABLE 0); a new
    /// bring-up sets them up again on fresh rings and virtiofsd serves them.
    #[test]
    fn reset_and_bring_up_again_on_virtiofsd() {
        let mut s = setup();
        s.init();
        s.d.write_reg(reg::STATUS, 0);
        s.d.init(0);
        let (h, _) = s.lookup(7, "hello");
        assert_eq!((h.error, h.unique), (0, 7), "{h:?}");
        assert!(
            s.dev
                .lock()
                .unwrap()
                .metrics()
                .contains(&("fs_activations", 2))
        );
    }

    /// DRIVER_OK and reset reach the device on a vCPU thread, the backend's
    /// calls on the event-loop thread: run each under its seccomp filter (a
    /// syscall outside it kills this test process with SIGSYS, failing the
    /// run loudly) while a request goes through virtiofsd.
    #[test]
    fn start_stop_and_relay_run_under_the_seccomp_filters() {
        let mut s = setup();
        s.init();
        let vcpu = crate::seccomp::vcpu_filter().unwrap();
        let event_loop = crate::seccomp::event_loop_filter(true).unwrap();
        let mut d = s.d;
        s.d = std::thread::spawn(move || {
            crate::seccomp::apply(&vcpu).unwrap();
            d.write_reg(reg::STATUS, 0);
            d.init(0);
            d
        })
        .join()
        .unwrap();
        let s = std::thread::spawn(move || {
            crate::seccomp::apply(&event_loop).unwrap();
            let (h, _) = s.lookup(9, "hello");
            assert_eq!((h.error, h.unique), (0, 9), "{h:?}");
            s
        })
        .join()
        .unwrap();
        assert!(
            s.dev
                .lock()
                .unwrap()
                .metrics()
                .contains(&("fs_activations", 2))
        );
    }

    #[test]
    fn virtiofsd_going_away_means_needs_reset() {
        let mut s = setup();
        s.init();
        s.virtiofsd.kill();
        let dev = s.dev.clone();
        run_until(&mut s.em, "NEEDS_RESET", || {
            dev.lock().unwrap().interrupt().needs_reset()
        });
        assert_ne!(s.d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn private_memory_is_refused_before_connecting() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let err =
            VhostUserFs::connect(Path::new("/nonexistent"), &mem, HANDSHAKE_TIMEOUT).unwrap_err();
        assert!(matches!(err, FsError::MemoryNotShared), "{err}");
    }

    /// A backend on a socket in a fresh directory, played by `serve` on a thread.
    fn fake_backend(
        serve: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                serve(stream);
            }
        });
        (dir, path)
    }

    use std::path::PathBuf;

    /// Reads one request (header and body); its (request, flags), or
    /// `None` once the frontend has gone.
    fn read_request(s: &mut UnixStream) -> Option<(u32, u32)> {
        let mut hdr = [0u8; 12];
        s.read_exact(&mut hdr).ok()?;
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
        let mut body = vec![0u8; size as usize];
        s.read_exact(&mut body).ok()?;
        Some((
            u32::from_le_bytes(hdr[0..4].try_into().unwrap()),
            u32::from_le_bytes(hdr[4..8].try_into().unwrap()),
        ))
    }

    /// A reply carrying a u64.
    fn reply_u64(s: &mut UnixStream, request: u32, value: u64) {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes()); // version 1, reply
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&value.to_le_bytes());
        s.write_all(&m).unwrap();
    }

    const SET_OWNER: u32 = 3;
    const GET_PROTOCOL_FEATURES: u32 = 15;

    /// Plays a minimal backend: the handshake (no REPLY_ACK, no MQ), then
    /// `barrier_reply`'s bytes (if any) for every later GET_FEATURES.
    fn scripted_backend(barrier_reply: Option<Vec<u8>>) -> (tempfile::TempDir, PathBuf) {
        fake_backend(move |mut s| {
            let features = (1 << VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES;
            let mut handshaken = false;
            while let Some((request, _)) = read_request(&mut s) {
                match request {
                    GET_FEATURES if !handshaken => {
                        handshaken = true;
                        reply_u64(&mut s, GET_FEATURES, features);
                    }
                    GET_FEATURES => {
                        if let Some(bytes) = &barrier_reply {
                            let _ = s.write_all(bytes);
                        }
                    }
                    GET_PROTOCOL_FEATURES => reply_u64(&mut s, GET_PROTOCOL_FEATURES, 0),
                    _ => {}
                }
            }
        })
    }

    fn device_on(path: &Path) -> (Arc<Mutex<Fs>>, MockDriver) {
        let mem = shared_memory();
        let backend = VhostUserFs::connect(path, &mem, HANDSHAKE_TIMEOUT).unwrap();
        let dev = Arc::new(Mutex::new(Fs::new("t", 64, Box::new(backend)).unwrap()));
        let d = MockDriver::with_memory(dev.clone(), mem);
        (dev, d)
    }

    /// DRIVER_OK (on a vCPU thread) waits for a silent backend at most
    /// BARRIER_TIMEOUT, then the device reports NEEDS_RESET.
    #[test]
    fn silent_backend_at_start_is_bounded_and_needs_reset() {
        let (_dir, path) = scripted_backend(None);
        let (_dev, mut d) = device_on(&path);
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        d.setup_queues();
        let t = std::time::Instant::now();
        d.write_reg(reg::STATUS, 0xf);
        assert!(t.elapsed() < BARRIER_TIMEOUT + Duration::from_secs(1));
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn wrong_reply_at_start_needs_reset() {
        let mut wrong = Vec::new();
        wrong.extend_from_slice(&GET_PROTOCOL_FEATURES.to_le_bytes());
        wrong.extend_from_slice(&(HDR_VERSION_1 | HDR_REPLY).to_le_bytes());
        wrong.extend_from_slice(&8u32.to_le_bytes());
        wrong.extend_from_slice(&0u64.to_le_bytes());
        let (_dir, path) = scripted_backend(Some(wrong));
        let (_dev, mut d) = device_on(&path);
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        d.setup_queues();
        d.write_reg(reg::STATUS, 0xf);
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    /// The scripted backend's right answer works: the failures above are
    /// the replies', not the script's.
    #[test]
    fn scripted_backend_that_answers_starts() {
        let mut right = Vec::new();
        right.extend_from_slice(&GET_FEATURES.to_le_bytes());
        right.extend_from_slice(&(HDR_VERSION_1 | HDR_REPLY).to_le_bytes());
        right.extend_from_slice(&8u32.to_le_bytes());
        right.extend_from_slice(&0u64.to_le_bytes());
        let (_dir, path) = scripted_backend(Some(right));
        let (_dev, mut d) = device_on(&path);
        d.init(0);
        assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn silent_backend_times_out() {
        let (_dir, path) = fake_backend(|mut s| {
            // Reads, never answers; holds the socket until the frontend gives up.
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let t = std::time::Instant::now();
        let err =
            VhostUserFs::connect(&path, &shared_memory(), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, FsError::Timeout(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn backend_without_protocol_features_is_refused() {
        let (_dir, path) = fake_backend(|mut s| {
            assert_eq!(read_request(&mut s).unwrap().0, SET_OWNER);
            assert_eq!(read_request(&mut s).unwrap().0, GET_FEATURES);
            reply_u64(&mut s, GET_FEATURES, 1 << VIRTIO_F_VERSION_1);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let err = VhostUserFs::connect(&path, &shared_memory(), HANDSHAKE_TIMEOUT).unwrap_err();
        assert!(
            matches!(
                err,
                FsError::BackendFeatures {
                    what: "VHOST_USER_F_PROTOCOL_FEATURES",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn garbage_reply_is_a_protocol_error() {
        let (_dir, path) = fake_backend(|mut s| {
            read_request(&mut s);
            read_request(&mut s);
            // A reply for another request, with an impossible size.
            s.write_all(&[0xff; 12 + 8]).unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let err = VhostUserFs::connect(&path, &shared_memory(), HANDSHAKE_TIMEOUT).unwrap_err();
        assert!(
            matches!(
                err,
                FsError::Protocol {
                    step: "GET_FEATURES",
                    ..
                }
            ),
            "{err}"
        );
    }
}
