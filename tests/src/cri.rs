//! A real `vmpod serve` for CRI tests: built once per test process, started
//! on a temp socket with a temp config (host handler, the demo image as
//! `localhost/vmpod/busybox:latest`), driven with the `k8s-cri` client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

use k8s_cri::v1::*;
use tonic::Code;

use crate::{artefact, static_agent, workspace_root};

/// The loopback-only network every test daemon starts with, in
/// [`Daemon::cni_conf_dir`].
pub const LOOPBACK_CONFLIST: &str = "99-loopback.conflist";

/// The demo image's name in the test config.
pub const BUSYBOX: &str = "localhost/vmpod/busybox:latest";

/// A CRI client.
pub type Cri = RuntimeServiceClient<Channel>;

/// `target/debug/vmpod`, built from this tree once per test process so a
/// stale binary is never tested; `vmpod-vmm` (the VMM the daemon runs from
/// beside itself) is built with it.
pub fn vmpod_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(workspace_root())
                .args([
                    "build",
                    "--quiet",
                    "--locked",
                    "-p",
                    "vmpod",
                    "--bin",
                    "vmpod",
                    "-p",
                    "vmpod-vmm",
                    "--bin",
                    "vmpod-vmm",
                ])
                .status()
                .expect("running cargo build -p vmpod -p vmpod-vmm");
            assert!(status.success(), "cargo build -p vmpod -p vmpod-vmm failed");
            let bin = crate::target_dir().join("debug/vmpod");
            assert!(
                bin.is_file(),
                "{} is missing after the build",
                bin.display()
            );
            bin
        })
        .clone()
}

/// `target/debug/vmpod-vmm`, built by [`vmpod_binary`].
pub fn vmm_binary() -> PathBuf {
    vmpod_binary().with_file_name("vmpod-vmm")
}

/// A running daemon and its temp dir.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    /// The network namespace the daemon runs in (see [`Daemon::in_netns`]).
    netns: Option<PathBuf>,
    /// The `vmpod` binary it runs (see [`Daemon::from_copy`]).
    binary: PathBuf,
}

/// Which sandbox backend a scenario's pods run on (the daemon's default
/// handler, so `run_pod` with an empty handler lands there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Handler `host`: the agent as a host process in fresh namespaces.
    Host,
    /// Handler `vm`: QEMU microvm under TCG, the agent as guest PID 1.
    Vm,
}

impl Backend {
    /// The handler's name in the test config.
    pub fn handler(self) -> &'static str {
        match self {
            Backend::Host => "host",
            Backend::Vm => "vm",
        }
    }
}

impl Daemon {
    /// Starts `vmpod serve` with `backend` as the default handler; fails
    /// loudly when the backend's programs are missing.
    pub fn on(backend: Backend, extra: &str) -> Daemon {
        if backend == Backend::Vm {
            crate::require_program("qemu-system-x86_64", "qemu-system-x86");
            assert!(
                vmpod::hypervisor::qemu::VhostVsock::binary().is_file(),
                "vhost-device-vsock is not installed: `cargo install vhost-device-vsock --locked` \
                 (scripts/install-deps does)"
            );
        }
        Daemon::start_with(backend.handler(), extra)
    }

    /// Starts `vmpod serve` with the default test config (default handler
    /// `host`) plus `extra` TOML
    /// (top-level keys or whole `[handlers.<name>]` tables). Handlers:
    /// `host`; `vm`, explicitly QEMU with TCG, because this machine's KVM
    /// (PVM) cannot boot a stock Linux guest and `vmpod` is the default
    /// hypervisor of a vm handler; `vmpod`, our own VMM on /dev/kvm.
    pub fn start(extra: &str) -> Daemon {
        Daemon::start_with("host", extra)
    }

    /// Like [`Daemon::on`], but `vmpod serve` (and so every CNI plugin,
    /// bridge and VMM it starts) runs in a fresh network namespace of its
    /// own, so pod networks never touch the machine's; removed on drop.
    pub fn in_netns(backend: Backend, extra: &str) -> Daemon {
        if backend == Backend::Vm {
            crate::require_program("qemu-system-x86_64", "qemu-system-x86");
        }
        Daemon::start_full(backend.handler(), extra, true)
    }

    fn start_with(default_handler: &str, extra: &str) -> Daemon {
        Daemon::start_full(default_handler, extra, false)
    }

    fn start_full(default_handler: &str, extra: &str, own_netns: bool) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("vmpod.sock");
        let config = dir.path().join("config.toml");
        let text = format!(
            "state_dir = \"{state}\"\nlog_dir_root = \"{logs}\"\nagent_binary = \"{agent}\"\n\
             default_handler = \"{default_handler}\"\n{extra}\n\
             [handlers.host]\nbackend = \"host\"\n\
             [handlers.vm]\nbackend = \"vm\"\nhypervisor = \"qemu\"\naccel = \"tcg\"\n\
             kernel = \"{kernel}\"\ninitramfs = \"{initramfs}\"\n\
             [handlers.vmpod]\nbackend = \"vm\"\nhypervisor = \"vmpod\"\n\
             kernel = \"{kernel}\"\ninitramfs = \"{initramfs}\"\n\
             [[static_images]]\nname = \"{BUSYBOX}\"\nerofs = \"{erofs}\"\noci_layout = \"{layout}\"\n\
             [cni]\nconf_dir = \"{cni}\"\n\
             bin_dirs = [\"/opt/cni/bin\", \"/usr/lib/cni\", \"{cni_bin}\"]\n",
            state = dir.path().join("state").display(),
            logs = dir.path().join("logs").display(),
            agent = static_agent().display(),
            erofs = artefact("demo-image.erofs").display(),
            layout = artefact("demo-image").display(),
            kernel = artefact("vmlinux").display(),
            initramfs = artefact("initramfs.cpio").display(),
            // Never the machine's /etc/cni/net.d.
            cni = dir.path().join("cni").display(),
            // Where a test may put fake plugins.
            cni_bin = dir.path().join("cni-bin").display(),
        );
        // A loopback-only network: every pod goes through CNI ADD/DEL and
        // the node reports NetworkReady, without touching any real network.
        // Tests of real networks add a config that sorts before it.
        std::fs::create_dir_all(dir.path().join("cni")).expect("the CNI conf dir");
        std::fs::write(
            dir.path().join("cni").join(LOOPBACK_CONFLIST),
            r#"{"cniVersion": "1.0.0", "name": "lo-only", "plugins": [{"type": "loopback"}]}"#,
        )
        .expect("writing the loopback network");
        let netns = own_netns.then(|| {
            let path = dir.path().join("node-netns");
            vmpod::network::netns::create_netns(&path).expect("creating the test netns");
            path
        });
        std::fs::write(&config, text).expect("writing the config");
        let mut d = Daemon {
            dir,
            socket,
            config,
            child: None,
            netns,
            binary: vmpod_binary(),
        };
        d.spawn();
        d
    }

    /// Like [`Daemon::start`], but the daemon runs a copy of the `vmpod`
    /// binary in its temp dir ([`Daemon::binary`]), which a test may
    /// replace as a package upgrade does.
    pub fn from_copy(extra: &str) -> Daemon {
        let mut d = Daemon::start(extra);
        let bin = d.dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("the binary's dir");
        let copy = bin.join("vmpod");
        std::fs::copy(vmpod_binary(), &copy).expect("copying vmpod");
        std::fs::copy(vmm_binary(), bin.join("vmpod-vmm")).expect("copying vmpod-vmm");
        // The daemon started from the build has no pods yet: replaced.
        if let Some(mut c) = d.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        d.binary = copy;
        d.spawn();
        d
    }

    /// The `vmpod` binary this daemon runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vmpod.log"))
            .expect("daemon log");
        let mut cmd = Command::new(&self.binary);
        if let Some(netns) = &self.netns {
            let ns = std::fs::File::open(netns).expect("opening the test netns");
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = ns.as_raw_fd();
            let in_child = move || {
                let _keep = &ns;
                // SAFETY: setns takes an fd that stays open (`ns` lives in
                // this closure) and a constant flag.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            // SAFETY: the closure makes one async-signal-safe system call
            // (setns) and allocates nothing.
            unsafe { cmd.pre_exec(in_child) };
        }
        let child = cmd
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
        // The socket file appears at bind(), a moment before listen():
        // ready means a connection is accepted.
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
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

    /// SIGTERMs the daemon, asserts it ends cleanly (in time), and starts
    /// it again.
    pub fn terminate_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) takes plain integers; the PID is our child's.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(
                        status.success(),
                        "vmpod serve ended with {status}:\n{}",
                        self.log()
                    );
                    break;
                }
                assert!(Instant::now() < deadline, "vmpod serve ignored SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.spawn();
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// A channel to the daemon's socket with a per-call timeout.
    async fn channel(&self, timeout: Duration) -> Channel {
        let path = self.socket.clone();
        Endpoint::from_static("http://vmpod")
            .timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .expect("connecting to vmpod serve")
    }

    /// A connected RuntimeService client.
    pub async fn client(&self) -> Cri {
        // Generous: twenty TCG boots at once on two busy cores take minutes.
        RuntimeServiceClient::new(self.channel(Duration::from_secs(300)).await)
    }

    /// A connected ImageService client (pulls get two minutes).
    pub async fn image_client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel(Duration::from_secs(120)).await)
    }

    /// `vmpod run IMAGE -- CMD` against this daemon (handler "" = the
    /// default one), bounded by `timeout_secs`.
    pub async fn vmpod_run(
        &self,
        handler: &str,
        timeout_secs: u64,
        image: &str,
        cmd: &[&str],
    ) -> std::process::Output {
        let mut run = tokio::process::Command::new(vmpod_binary());
        run.arg("run")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--log-root")
            .arg(self.log_root());
        if !handler.is_empty() {
            run.arg("--runtime-handler").arg(handler);
        }
        run.arg("--timeout")
            .arg(timeout_secs.to_string())
            .arg(image)
            .arg("--")
            .args(cmd)
            .output()
            .await
            .expect("running vmpod run")
    }

    /// The pods' log root (the config's log_dir_root).
    pub fn log_root(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// The state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The CNI conf dir of the test config (holding [`LOOPBACK_CONFLIST`]
    /// at first).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.path().join("cni")
    }

    /// A CNI bin dir of the test config, after the real ones (fake
    /// plugins go here; absent at first).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.path().join("cni-bin")
    }

    /// The daemon's network namespace, when it has its own.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }
}

impl Drop for Daemon {
    /// Kills the daemon and whatever its pods still run: a failed test must
    /// not leave agents, VMs, cgroups or namespaces behind.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Log pumps and agents name the state dir on their command line.
        for p in processes_mentioning(&self.state_dir()) {
            if let Some(pid) = p.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) takes plain integers; the process belongs
                // to this test's daemon (its command line names our dir).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        self.unmount_leftovers();
        self.remove_sandboxes_and_netns();
    }
}

impl Daemon {
    fn remove_sandboxes_and_netns(&self) {
        self.kill_recorded_sandboxes();
        // Last: what CNI made in it (bridge, veths) goes with it.
        if let Some(netns) = &self.netns {
            vmpod::network::netns::remove_netns(netns);
        }
    }

    fn kill_recorded_sandboxes(&self) {
        let Ok(entries) = std::fs::read_dir(self.state_dir().join("sandboxes")) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(text) = std::fs::read(e.path().join("sandbox.json")) else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<serde_json::Value>(&text) else {
                continue;
            };
            // Every process the backend recorded: `{"pid": .., "start": ..}`
            // values in its state (agent, VMM or QEMU, helpers).
            let procs = rec["backend"]
                .as_object()
                .into_iter()
                .flat_map(|b| b.values());
            for p in procs {
                if p["start"].is_u64()
                    && let Some(pid) = p["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
                {
                    // SAFETY: kill(2) takes plain integers; the PID is one
                    // this test's daemon started and recorded.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if let Some(parent) = rec["cgroup_parent"].as_str() {
                crate::sandbox::remove_cgroup_tree(parent);
            }
            if let Some(netns) = rec["netns"].as_str()
                && let Ok(c) = std::ffi::CString::new(netns)
            {
                // SAFETY: umount2 takes a NUL-terminated path that lives
                // for the call.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

impl Daemon {
    /// VM pods' share mounts a failed test left: detached, deepest first,
    /// so the temp dir's removal never deletes through them.
    fn unmount_leftovers(&self) {
        for line in mounts_under(self.dir.path()).iter().rev() {
            if let Some(point) = line.split(' ').nth(4)
                && let Ok(c) = std::ffi::CString::new(point)
            {
                // SAFETY: umount2 takes a NUL-terminated path that lives
                // for the call.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
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

// Scenario helpers shared by the host and VM suites.

pub fn pod_config(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("{name}-host"),
        log_directory: d.log_root().join(name).display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.0.0.53".into()],
            searches: vec!["svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

pub async fn run_pod(cri: &mut Cri, config: PodSandboxConfig) -> String {
    cri.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: String::new(),
    })
    .await
    .unwrap_or_else(|s| panic!("RunPodSandbox: {s:?}"))
    .into_inner()
    .pod_sandbox_id
}

pub fn container_config(name: &str, command: &[&str], args: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        args: args.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: [("app".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

/// `config` with a security context set by `f`.
pub fn with_security(
    mut config: ContainerConfig,
    f: impl FnOnce(&mut LinuxContainerSecurityContext),
) -> ContainerConfig {
    let mut sc = LinuxContainerSecurityContext::default();
    f(&mut sc);
    config.linux = Some(LinuxContainerConfig {
        security_context: Some(sc),
        ..Default::default()
    });
    config
}

pub async fn create(cri: &mut Cri, pod: &str, config: ContainerConfig) -> String {
    cri.create_container(CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: None,
    })
    .await
    .unwrap_or_else(|s| panic!("CreateContainer: {s:?}"))
    .into_inner()
    .container_id
}

/// CreateContainer, then StartContainer; the container's ID.
pub async fn run_container(cri: &mut Cri, pod: &str, config: ContainerConfig) -> String {
    let id = create(cri, pod, config).await;
    start(cri, &id).await;
    id
}

pub async fn start(cri: &mut Cri, id: &str) {
    cri.start_container(StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .unwrap_or_else(|s| panic!("StartContainer: {s:?}"));
}

pub async fn status(cri: &mut Cri, id: &str) -> ContainerStatus {
    cri.container_status(ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .unwrap_or_else(|s| panic!("ContainerStatus: {s:?}"))
    .into_inner()
    .status
    .expect("a status")
}

/// Polls until the container has exited (bounded).
pub async fn wait_exited(cri: &mut Cri, id: &str) -> ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(cri, id).await;
        if s.state == ContainerState::ContainerExited as i32 {
            return s;
        }
        assert!(Instant::now() < deadline, "{id} did not exit: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until the log file holds `n` lines (bounded).
pub async fn log_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(String::from).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, wanted {n}: {text:?}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn exec(
    cri: &mut Cri,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<ExecSyncResponse, tonic::Status> {
    cri.exec_sync(ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout,
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn stop_remove_pod(cri: &mut Cri, pod: &str) {
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("StopPodSandbox");
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("RemovePodSandbox");
}

/// Nothing the daemon made for its pods is left: agents, container
/// processes (their cgroups), mounts, state files.
pub fn assert_no_leaks(d: &Daemon, pods: &[String]) {
    let procs = processes_mentioning(&d.state_dir());
    assert!(procs.is_empty(), "processes left behind: {procs:?}");
    let own_netns = d.netns().map(|p| p.display().to_string());
    let mounts: Vec<String> = mounts_under(d.dir.path())
        .into_iter()
        .filter(|m| m.split(' ').nth(4) != own_netns.as_deref())
        .collect();
    assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    for pod in pods {
        let cgroups = cgroups_of(pod);
        assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:?}");
        assert!(
            !d.state_dir().join("sandboxes").join(pod).exists(),
            "state of {pod} left behind"
        );
        assert!(
            !d.state_dir().join("s").join(&pod[..16]).exists(),
            "sockets of {pod} left behind"
        );
    }
}

/// The code of a call that must fail.
pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call must fail").code()
}

pub fn parse_record(line: &str) -> (&str, &str, &str, &str) {
    let mut parts = line.splitn(4, ' ');
    let ts = parts.next().unwrap_or_default();
    let stream = parts.next().unwrap_or_default();
    let tag = parts.next().unwrap_or_default();
    let msg = parts.next().unwrap_or_default();
    (ts, stream, tag, msg)
}

/// How long [`poll`] waits for something a booting VM or the daemon does.
pub const POLL_WAIT: Duration = Duration::from_secs(60);

/// Polls until `f` returns Some (bounded by [`POLL_WAIT`]).
pub async fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + POLL_WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The one sandbox dir under the daemon's state dir that holds a VMM config.
pub fn booting_sandbox(d: &Daemon) -> Option<(String, PathBuf)> {
    let entries = std::fs::read_dir(d.state_dir().join("sandboxes")).ok()?;
    entries.flatten().find_map(|e| {
        let dir = e.path();
        dir.join("vmm.json")
            .is_file()
            .then(|| (e.file_name().to_string_lossy().into_owned(), dir))
    })
}
