//! A throwaway Docker registry for tests: Debian's `docker-registry` on
//! 127.0.0.1 with a random free port, a temp config and a temp storage dir,
//! optionally behind htpasswd basic auth. Started and stopped by the test
//! itself (killed on drop); never a system service.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require_program;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const SKOPEO_TIMEOUT: Duration = Duration::from_secs(120);

/// A running registry.
pub struct TestRegistry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    auth: Option<(String, String)>,
}

impl TestRegistry {
    /// Starts an open registry.
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// Starts a registry that demands basic auth with this user.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Self {
        Self::start_inner(Some((user.to_string(), password.to_string())))
    }

    fn start_inner(auth: Option<(String, String)>) -> Self {
        require_program("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).expect("registry storage dir");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((user, password)) = &auth {
            require_program("htpasswd", "apache2-utils");
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("running htpasswd");
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(&htpasswd, &out.stdout).expect("writing htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: vmpod-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("writing the registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("registry log"))
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let registry = Self {
            child,
            dir,
            port,
            auth,
        };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(
                &([127, 0, 0, 1], self.port).into(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        panic!(
            "docker-registry did not listen on 127.0.0.1:{} within {START_TIMEOUT:?}: {log}",
            self.port
        );
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's storage dir (to corrupt blobs in).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps a blob.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes an OCI layout (`dir`, entry `tag`) as `repo:tag` with skopeo;
    /// `extra` are more skopeo copy flags (`--format v2s2`, `--all`).
    pub fn push_layout(&self, dir: &Path, tag: &str, repo: &str, extra: &[&str]) {
        require_program("skopeo", "skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if let Some((user, password)) = &self.auth {
            cmd.arg(format!("--dest-creds={user}:{password}"));
        }
        cmd.args(extra);
        cmd.arg(format!("oci:{}:{tag}", dir.display()));
        cmd.arg(format!("docker://{}/{repo}:{tag}", self.host()));
        run_with_timeout(cmd, SKOPEO_TIMEOUT);
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Runs a command, killing it after `timeout`; panics with its output on failure.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) {
    let program = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().expect("waiting for a child") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{program} did not finish within {timeout:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let out = child.wait_with_output().expect("collecting output");
    assert!(
        out.status.success(),
        "{program} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
