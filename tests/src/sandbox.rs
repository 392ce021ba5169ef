//! The two places an agent runs, as test fixtures: a host process on a unix
//! socket, and PID 1 of a QEMU microvm (TCG) reached over hybrid vsock
//! through `vhost-device-vsock`. Suites take a [`Backend`] parameter and run
//! against both.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;
use vmpod::agent_client::{self, AgentAddr};
use vmpod::hypervisor::qemu::{Accel, QemuConfig, QemuDisk, RunningGuest, VhostVsock};
use vmpod_proto::v1::agent_client::AgentClient;

use crate::{artefact, require_program, static_agent};

/// Where the agent under test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `vmpod-agent --listen unix:PATH` as a host process.
    Host,
    /// PID 1 of a QEMU microvm under TCG, over hybrid vsock.
    QemuTcg,
}

/// The serial of the demo image's disk in a guest.
pub const IMAGE_SERIAL: &str = "image0";
/// The serial of the scratch disk in a guest.
pub const SCRATCH_SERIAL: &str = "scratch0";

/// A fresh ext4 file system in a file, for a container's writable layer.
fn make_scratch(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("scratch.ext4");
    let file = std::fs::File::create(&path).expect("scratch file");
    file.set_len(64 << 20).expect("scratch size");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&path)
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(status.success(), "mkfs.ext4 failed");
    path
}

/// A running agent; everything it started is stopped on drop.
pub struct Sandbox {
    pub backend: Backend,
    pub addr: AgentAddr,
    /// The `Rootfs.source` that names the demo busybox image for this agent:
    /// the erofs file (a loop device) on the host, the disk's serial in a guest.
    pub image_source: String,
    /// `Rootfs.scratch_source` of an empty ext4 disk for one container.
    pub scratch_source: String,
    pub dir: tempfile::TempDir,
    host_agent: Option<Child>,
    /// The host agent's --cgroup-parent, torn down on drop.
    cgroup_parent: Option<String>,
    guest: Option<RunningGuest>,
    _vsock: Option<VhostVsock>,
}

impl Sandbox {
    /// Starts an agent on `backend`; panics with a clear message if what it
    /// needs (binaries, the guest image, QEMU) is missing.
    pub fn start(backend: Backend) -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Host => {
                let socket = dir.path().join("agent.sock");
                // Distinct per sandbox: tests run in parallel.
                let cgroup_parent = format!("/vmpod-test-{}-{}", std::process::id(), next_serial());
                let child = Command::new(static_agent())
                    .arg("--listen")
                    .arg(format!("unix:{}", socket.display()))
                    .arg("--state-dir")
                    .arg(dir.path().join("state"))
                    .arg("--cgroup-parent")
                    .arg(&cgroup_parent)
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("spawning the agent");
                Sandbox {
                    backend,
                    addr: AgentAddr::Unix(socket),
                    image_source: artefact("demo-image.erofs").display().to_string(),
                    scratch_source: make_scratch(dir.path()).display().to_string(),
                    dir,
                    host_agent: Some(child),
                    cgroup_parent: Some(cgroup_parent),
                    guest: None,
                    _vsock: None,
                }
            }
            Backend::QemuTcg => {
                require_program("qemu-system-x86_64", "qemu-system-x86");
                let binary = VhostVsock::binary();
                assert!(
                    binary.is_file(),
                    "vhost-device-vsock is not installed: `cargo install vhost-device-vsock --locked` (scripts/install-deps does)"
                );
                let vsock = VhostVsock::start(dir.path(), 3, Duration::from_secs(10))
                    .expect("starting vhost-device-vsock");
                let mut cfg =
                    QemuConfig::new(artefact("vmlinux"), artefact("initramfs.cpio"), Accel::Tcg);
                cfg.vhost_user_vsock = Some(vsock.vhost_socket.clone());
                cfg.disks.push(QemuDisk {
                    path: artefact("demo-image.erofs"),
                    read_only: true,
                    serial: IMAGE_SERIAL.into(),
                });
                cfg.disks.push(QemuDisk {
                    path: make_scratch(dir.path()),
                    read_only: false,
                    serial: SCRATCH_SERIAL.into(),
                });
                let guest = match cfg.boot_until_ready(Duration::from_secs(120)) {
                    Ok(g) => g,
                    Err(e) => panic!("the guest did not reach the agent: {e}"),
                };
                Sandbox {
                    backend,
                    image_source: format!("serial:{IMAGE_SERIAL}"),
                    scratch_source: format!("serial:{SCRATCH_SERIAL}"),
                    addr: AgentAddr::HybridVsock {
                        uds: vsock.uds.clone(),
                        port: vmpod_proto::AGENT_VSOCK_PORT,
                    },
                    dir,
                    host_agent: None,
                    cgroup_parent: None,
                    guest: Some(guest),
                    _vsock: Some(vsock),
                }
            }
        }
    }

    /// A client that has seen the agent answer Health.
    pub async fn client(&self) -> AgentClient<Channel> {
        match agent_client::connect_ready(&self.addr, Duration::from_secs(60)).await {
            Ok(c) => c,
            Err(e) => panic!(
                "agent on {:?} not reachable: {e}\nconsole:\n{}",
                self.backend,
                self.console()
            ),
        }
    }

    /// The guest console so far (empty for host agents).
    pub fn console(&self) -> String {
        self.guest
            .as_ref()
            .map(|g| g.console().join("\n"))
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for the sandbox to end by itself (after
    /// Shutdown): the agent process exits, or QEMU exits because the guest
    /// rebooted. Returns whether it ended with success.
    pub fn wait_ended(&mut self, timeout: Duration) -> bool {
        if let Some(child) = &mut self.host_agent {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return status.success();
                }
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let guest = self.guest.as_mut().expect("a guest or a host agent");
        guest.wait_exit(timeout) && guest.exit_status().is_some_and(|s| s.success())
    }

    /// The working directory of this sandbox.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

fn next_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(child) = &mut self.host_agent {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(parent) = &self.cgroup_parent {
            remove_cgroup_tree(parent);
        }
    }
}

/// Kills what still runs in a host sandbox's cgroups (a killed agent leaves
/// its containers behind) and removes the cgroups, deepest first, in every
/// hierarchy of the host.
pub(crate) fn remove_cgroup_tree(parent: &str) {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        let top = h.path().join(parent.trim_start_matches('/'));
        collect_dirs(&top, &mut dirs);
    }
    for dir in &dirs {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) takes plain integers; the PID comes from
                // the sandbox's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    // Deepest first; killed processes take a moment to leave their cgroups.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for _ in 0..50 {
        dirs.retain(|d| std::fs::remove_dir(d).is_err() && d.exists());
        if dirs.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn collect_dirs(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}
