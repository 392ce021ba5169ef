//! vmpod: a Kubernetes container runtime (CRI v1) that runs every pod
//! sandbox in its own microVM.
//!
//! This crate is the host side: the daemon, the guest image tooling and
//! the hypervisor launchers. The VMM is its own crate and binary
//! (`vmpod-vmm`); the daemon links it for its configuration and control
//! protocol only.

pub mod agent_client;
pub mod config;
pub mod cri;
pub mod guest;
pub mod hypervisor;
pub mod image;
pub mod log_pump;
pub mod logs;
pub mod network;
pub mod process;
pub mod run_cli;
pub mod sandbox;
pub mod streaming;

/// An error with its whole source chain on one line (`outer: cause: root`),
/// for messages that cross a process boundary (gRPC status, control-socket
/// replies, logs).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// The path of the running `vmpod` binary, resolved once, the first time
/// it is asked for (`vmpod serve` asks at start-up). The daemon re-executes
/// itself for log pumps and VMMs; after an upgrade replaced the binary,
/// `/proc/self/exe` names the deleted old image, while this path names the
/// new one, which is what new pumps and VMMs should run.
pub fn self_exe() -> std::io::Result<std::path::PathBuf> {
    static SELF_EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = SELF_EXE.get() {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    Ok(SELF_EXE.get_or_init(|| exe).clone())
}

/// The VMM binary (`vmpod-vmm`) pods of the `vmpod` hypervisor run: the
/// one installed beside this `vmpod` binary, else the packaged path.
pub fn vmm_binary() -> std::path::PathBuf {
    self_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("vmpod-vmm")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| std::path::PathBuf::from("/usr/lib/vmpod/vmpod-vmm"))
}
