//! Fakes for virtio-fs tests: a backend that records what the device asks
//! of it, a real virtiofsd, and the few FUSE messages the tests send.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{FsBackend, FsError, QueueInfo};

/// What a [`FakeBackend`] was asked to do.
#[derive(Debug, Default)]
pub struct FakeLog {
    /// Acked features and queues of every start.
    pub starts: Vec<(u64, Vec<QueueInfo>)>,
    /// Clones of the kick fds of the last start.
    pub kicks: Vec<EventFd>,
    /// Clones of the call fds of the last start (signal them to fake a backend call).
    pub calls: Vec<EventFd>,
    /// Stops, with their queue counts.
    pub stops: Vec<usize>,
}

/// A backend that records requests; its "socket" is one end of a socket
/// pair whose other end the test holds (drop it to fake a hang-up).
#[derive(Debug)]
pub struct FakeBackend {
    /// Offered features.
    pub features: u64,
    /// Whether `start` fails.
    pub fail_start: Arc<Mutex<bool>>,
    /// What the device asked.
    pub log: Arc<Mutex<FakeLog>>,
    socket: UnixStream,
}

impl FakeBackend {
    /// A backend offering `features`, and the peer end of its socket.
    pub fn new(features: u64) -> (Self, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (
            Self {
                features,
                fail_start: Arc::new(Mutex::new(false)),
                log: Arc::new(Mutex::new(FakeLog::default())),
                socket: ours,
            },
            theirs,
        )
    }
}

impl FsBackend for FakeBackend {
    fn features(&self) -> u64 {
        self.features
    }

    fn start(
        &mut self,
        features: u64,
        _mem: &GuestMemoryMmap,
        queues: &[QueueInfo],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), FsError> {
        if *self.fail_start.lock().unwrap() {
            return Err(FsError::BackendStalled);
        }
        let mut log = self.log.lock().unwrap();
        log.starts.push((features, queues.to_vec()));
        log.kicks = kicks.iter().map(|e| e.try_clone().unwrap()).collect();
        log.calls = calls.iter().map(|e| e.try_clone().unwrap()).collect();
        Ok(())
    }

    fn stop(&mut self, queues: usize) -> Result<(), FsError> {
        self.log.lock().unwrap().stops.push(queues);
        Ok(())
    }

    fn watch_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.socket.as_fd())
    }
}

/// A running virtiofsd exporting `shared` on `socket`; killed on drop.
pub struct Virtiofsd {
    child: Child,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The exported directory.
    pub shared: PathBuf,
    log: PathBuf,
}

/// The virtiofsd binary: `VIRTIOFSD`, else on PATH, else ~/.cargo/bin.
fn virtiofsd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VIRTIOFSD") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        Path::new(&home).join(".cargo/bin/virtiofsd")
    })
}

impl Virtiofsd {
    /// Starts virtiofsd under `dir` (`dir/shared` exported, `dir/fs.sock`)
    /// and waits for its socket. Panics, saying why, without root or virtiofsd:
    /// these tests must never pass by not running.
    pub fn start(dir: &Path) -> Self {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "virtio-fs tests need root (virtiofsd serves files as their owners)"
        );
        let bin = virtiofsd_binary();
        assert!(
            bin.is_file(),
            "virtio-fs tests need virtiofsd: {} is missing (cargo install virtiofsd, or set VIRTIOFSD)",
            bin.display()
        );
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        let socket = dir.join("fs.sock");
        let log = dir.join("virtiofsd.log");
        let child = Command::new(&bin)
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared.display()))
            .args(["--sandbox=none", "--cache=never", "--log-level=debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut d = Self {
            child,
            socket,
            shared,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.socket.exists() {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("virtiofsd exited ({status}): {}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "virtiofsd did not create its socket: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// virtiofsd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills virtiofsd (our own child, by its handle) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// FUSE opcodes the tests use.
pub const FUSE_LOOKUP: u32 = 1;
/// FUSE_INIT.
pub const FUSE_INIT: u32 = 26;
/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER_LEN: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER_LEN: usize = 16;
/// `sizeof(struct fuse_init_out)` (7.23 and later).
pub const INIT_OUT_LEN: usize = 64;
/// `sizeof(struct fuse_entry_out)`.
pub const ENTRY_OUT_LEN: usize = 128;

/// A FUSE request: `struct fuse_in_header` then `body`.
pub fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(IN_HEADER_LEN + body.len()).unwrap();
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_le_bytes());
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&unique.to_le_bytes());
    m.extend_from_slice(&nodeid.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes()); // uid
    m.extend_from_slice(&0u32.to_le_bytes()); // gid
    m.extend_from_slice(&1u32.to_le_bytes()); // pid
    m.extend_from_slice(&0u16.to_le_bytes()); // total_extlen
    m.extend_from_slice(&0u16.to_le_bytes()); // padding
    m.extend_from_slice(body);
    m
}

/// `struct fuse_init_in` (64 bytes): version 7.`minor`, no flags.
pub fn fuse_init_in(minor: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&7u32.to_le_bytes()); // major
    b.extend_from_slice(&minor.to_le_bytes());
    b.extend_from_slice(&(128u32 << 10).to_le_bytes()); // max_readahead
    b.extend_from_slice(&0u32.to_le_bytes()); // flags
    b.resize(64, 0); // flags2, unused
    b
}

/// A parsed `struct fuse_out_header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutHeader {
    /// Length of the whole reply.
    pub len: u32,
    /// 0 or a negated errno.
    pub error: i32,
    /// The request's unique.
    pub unique: u64,
}

/// Parses a reply's header.
pub fn out_header(b: &[u8]) -> OutHeader {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    OutHeader {
        len: u32_at(0),
        error: i32::from_le_bytes(b[4..8].try_into().unwrap()),
        unique: u64::from_le_bytes(b[8..16].try_into().unwrap()),
    }
}

/// Little-endian u32 / u64 at `offset`.
pub fn le_u32(b: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(b[offset..offset + 4].try_into().unwrap())
}

/// Little-endian u64 at `offset`.
pub fn le_u64(b: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(b[offset..offset + 8].try_into().unwrap())
}
