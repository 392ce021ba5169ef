//! A real `vmpod serve` for CRI tests: built once per test process, started
//! on a temp socket with a temp config (host handler, the demo image as
//! `localhost/vmpod/busybox:latest`), driven with the `k8s-cri` client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::{artefact, static_agent, workspace_root};

/// The demo image's name in the test config.
pub const BUSYBOX: &str = "localhost/vmpod/busybox:latest";

/// A CRI client.
pub type Cri = RuntimeServiceClient<Channel>;

/// `target/debug/vmpod`, built from this tree once per test process so a
/// stale binary is never tested.
pub fn vmpod_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(workspace_root())
                .args([
                    "build", "--quiet", "--locked", "-p", "vmpod", "--bin", "vmpod",
                ])
                .status()
                .expect("running cargo build -p vmpod");
            assert!(status.success(), "cargo build -p vmpod failed");
            let bin = workspace_root().join("target/debug/vmpod");
            assert!(
                bin.is_file(),
                "{} is missing after the build",
                bin.display()
            );
            bin
        })
        .clone()
}

/// A running daemon and its temp dir.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `vmpod serve` with the default test config plus `extra` TOML.
    pub fn start(extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("vmpod.sock");
        let config = dir.path().join("config.toml");
        let text = format!(
            "state_dir = \"{state}\"\nlog_dir_root = \"{logs}\"\nagent_binary = \"{agent}\"\n\
             default_handler = \"host\"\n{extra}\n\
             [handlers.host]\nbackend = \"host\"\n\
             [handlers.vm]\nbackend = \"vm\"\nhypervisor = \"qemu\"\naccel = \"tcg\"\n\
             [[static_images]]\nname = \"{BUSYBOX}\"\nerofs = \"{erofs}\"\noci_layout = \"{layout}\"\n",
            state = dir.path().join("state").display(),
            logs = dir.path().join("logs").display(),
            agent = static_agent().display(),
            erofs = artefact("demo-image.erofs").display(),
            layout = artefact("demo-image").display(),
        );
        std::fs::write(&config, text).expect("writing the config");
        let mut d = Daemon {
            dir,
            socket,
            config,
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vmpod.log"))
            .expect("daemon log");
        let child = Command::new(vmpod_binary())
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "debug,h2=info,tower=info,hyper=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawning vmpod serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("vmpod serve exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "vmpod serve did not create its socket:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vmpod.log")).unwrap_or_default()
    }

    /// SIGKILLs the daemon (pods keep running) and starts it again.
    pub fn kill9_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL vmpod serve");
            let _ = c.wait();
        }
        self.spawn();
    }

    /// A connected client.
    pub async fn client(&self) -> Cri {
        let path = self.socket.clone();
        let channel = Endpoint::from_static("http://vmpod")
            .timeout(Duration::from_secs(120))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .expect("connecting to vmpod serve");
        RuntimeServiceClient::new(channel)
    }

    /// The pods' log root (the config's log_dir_root).
    pub fn log_root(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// The state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Processes whose command line mentions `needle` (e.g. a state dir).
pub fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.display().to_string();
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && !cmdline.contains("vmpod serve") {
                out.push(format!("{}: {cmdline}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

/// Mounts (in this mount namespace) under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&dir)))
        .map(String::from)
        .collect()
}

/// cgroup directories of a sandbox still present in any hierarchy.
pub fn cgroups_of(sandbox_id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for base in ["/sys/fs/cgroup"] {
        let mut candidates = vec![Path::new(base).join("vmpod").join(sandbox_id)];
        if let Ok(h) = std::fs::read_dir(base) {
            for e in h.flatten() {
                candidates.push(e.path().join("vmpod").join(sandbox_id));
            }
        }
        out.extend(candidates.into_iter().filter(|p| p.exists()));
    }
    out
}
