//! Stock crictl (cri-tools, `../shared/tools/crictl` beside the checkout):
//! the upstream CRI client, used as the independent client it is. Tests
//! that use it fail loudly when it is missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cri::Daemon;

/// How long one crictl command may take.
const TIMEOUT: Duration = Duration::from_secs(180);

/// crictl's path: `$VMPOD_CRICTL`, else `shared/tools/crictl` beside the
/// workspace.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("VMPOD_CRICTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("../shared/tools/crictl"));
    assert!(
        path.is_file(),
        "crictl is missing at {} (stock cri-tools crictl; see shared/tools/README.md, or set \
         VMPOD_CRICTL)",
        path.display()
    );
    path
}

/// crictl pointed at one daemon's socket.
pub struct Crictl {
    socket: PathBuf,
    config: PathBuf,
}

impl Crictl {
    pub fn new(d: &Daemon) -> Crictl {
        // Its own config file: never a machine's /etc/crictl.yaml (crictl
        // insists on reading one).
        let config = d.dir.path().join("crictl.yaml");
        let endpoint = format!("unix://{}", d.socket.display());
        std::fs::write(
            &config,
            format!(
                "runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 120\n\
                 debug: false\npull-image-on-create: false\n"
            ),
        )
        .expect("writing crictl.yaml");
        Crictl {
            socket: d.socket.clone(),
            config,
        }
    }

    /// Runs `crictl ARGS`; its output, whatever the exit status.
    pub async fn run(&self, args: &[&str]) -> std::process::Output {
        let endpoint = format!("unix://{}", self.socket.display());
        let run = tokio::process::Command::new(binary())
            .arg("--runtime-endpoint")
            .arg(&endpoint)
            .arg("--image-endpoint")
            .arg(&endpoint)
            .arg("--timeout")
            .arg("120s")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(TIMEOUT, run)
            .await
            .unwrap_or_else(|_| panic!("crictl {args:?} took longer than {TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("running crictl {args:?}: {e}"))
    }

    /// Runs `crictl ARGS`, which must succeed; its stdout, trimmed.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "crictl {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// Writes a JSON document (a crictl pod or container config) to a file.
pub fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).expect("JSON")).expect("writing JSON");
    path
}
