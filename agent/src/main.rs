//! vmpod-agent: PID 1 of a pod VM, or a host process for the host sandbox
//! backend. Serves the `vmpod.agent.v1` API on vsock (guest) or a unix
//! socket (host) and runs the pod's containers with libcontainer.
//!
//! Usage:
//!   vmpod-agent                          as PID 1: guest mode, vsock port 1024
//!   vmpod-agent --listen unix:PATH [--state-dir DIR] [--cgroup-parent PATH]
//!               [--host-ipc]             host mode (the daemon starts it as
//!                                        PID 1 of the pod's PID namespace,
//!                                        or in the node's for hostPID pods)
//!   vmpod-agent __libcontainer ...       internal: see container::helper
//!   vmpod-agent __stage-mount ...        internal: see container::stage

mod container;
mod init;
mod netif;
mod port_forward;
mod process;
mod sandbox;
mod server;
mod shared_fs;
mod transport;

use std::path::PathBuf;
use std::process::ExitCode;

use transport::Listen;

/// How the agent runs: decides PID-1 duties and what Shutdown does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a guest: mounts the basics, reaps orphans, ends the VM on exit.
    Guest,
    /// A host process; the pod's namespaces come from the daemon.
    Host,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Guest => "guest",
            Mode::Host => "host",
        }
    }
}

#[derive(Debug)]
struct Args {
    listen: Listen,
    state_dir: PathBuf,
    cgroup_parent: String,
    /// Stay in the node's IPC namespace (hostIPC pods).
    host_ipc: bool,
}

fn parse_args(mode: Mode, args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut listen = match mode {
        Mode::Guest => Some(Listen::Vsock(vmpod_proto::AGENT_VSOCK_PORT)),
        Mode::Host => None,
    };
    let mut state_dir = PathBuf::from("/run/vmpod-agent");
    let mut cgroup_parent = String::from("/vmpod");
    let mut host_ipc = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = Some(args.next().ok_or("--listen needs a value")?.parse()?),
            "--state-dir" => state_dir = args.next().ok_or("--state-dir needs a value")?.into(),
            "--cgroup-parent" => {
                cgroup_parent = args.next().ok_or("--cgroup-parent needs a value")?;
                if !cgroup_parent.starts_with('/') || cgroup_parent.split('/').any(|c| c == "..") {
                    return Err(format!(
                        "--cgroup-parent {cgroup_parent:?} must be an absolute cgroup path"
                    ));
                }
            }
            "--host-ipc" if mode == Mode::Host => host_ipc = true,
            "--version" => return Err(format!("vmpod-agent {}", env!("CARGO_PKG_VERSION"))),
            // As PID 1 the kernel hands over command-line words it did not
            // understand; they are not ours to reject.
            _ if mode == Mode::Guest => {}
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let listen = listen.ok_or("host mode needs --listen unix:PATH or --listen vsock:PORT")?;
    if !state_dir.is_absolute() {
        return Err("--state-dir must be absolute".into());
    }
    Ok(Args {
        listen,
        state_dir,
        cgroup_parent,
        host_ipc,
    })
}

/// A host-mode agent gets private mount, UTS and IPC namespaces (its mounts
/// never reach the host and vanish with it; hostname and shared memory are
/// the pod's; IPC stays the node's for hostIPC pods), and becomes the
/// subreaper of its containers. As PID 1 of the pod's PID namespace it
/// mounts that namespace's /proc over the node's. Must run before any
/// thread exists: unsharing the mount namespace needs that.
fn isolate_host_agent(host_ipc: bool) -> Result<(), String> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    container::stage::remember_node_namespace()
        .map_err(|e| format!("opening the node's mount namespace: {e}"))?;
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS;
    if !host_ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
    }
    unshare(flags).map_err(|e| format!("unsharing namespaces (needs root): {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making mounts private: {e}"))?;
    if std::process::id() == 1 {
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| format!("mounting the pod's /proc: {e}"))?;
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        return Err(format!(
            "becoming a subreaper: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(container::helper::HELPER_ARG) {
        return container::helper::main(&argv[2..]);
    }
    if argv.get(1).map(String::as_str) == Some(container::stage::STAGE_ARG) {
        return container::stage::main(&argv[2..]);
    }
    // The kernel runs /init without --listen; the daemon's host agent may
    // be PID 1 too (of the pod's PID namespace), but always has --listen.
    let host_args = argv
        .iter()
        .skip(1)
        .any(|a| a == "--listen" || a.starts_with("--listen="));
    let mode = if std::process::id() == 1 && !host_args {
        Mode::Guest
    } else {
        Mode::Host
    };
    if mode == Mode::Guest {
        // Before anything logs: the console is not open yet.
        if let Err(e) = init::setup() {
            return init::fatal(&format!("vmpod-agent: guest setup failed: {e}"));
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .init();

    let fail = |msg: String| -> ExitCode {
        eprintln!("vmpod-agent: {msg}");
        if mode == Mode::Guest {
            init::fatal(&msg)
        } else {
            ExitCode::FAILURE
        }
    };
    if mode == Mode::Guest {
        match shared_fs::mount_at_boot() {
            Ok(true) => tracing::info!(at = shared_fs::MOUNT_POINT, "pod share mounted"),
            Ok(false) => tracing::info!("no pod share (no virtio-fs device with our tag)"),
            // Containers without volumes still run: report, do not die.
            Err(e) => tracing::warn!(error = %container::chain(&e), "pod share not mounted"),
        }
    }
    let args = match parse_args(mode, argv.into_iter().skip(1)) {
        Ok(args) => args,
        Err(msg) => return fail(msg),
    };
    if mode == Mode::Host {
        if let Err(msg) = isolate_host_agent(args.host_ipc) {
            return fail(msg);
        }
    }
    if let Err(e) = std::fs::create_dir_all(&args.state_dir) {
        return fail(format!("creating {}: {e}", args.state_dir.display()));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(server::run(
        mode,
        args.listen,
        args.state_dir,
        args.cgroup_parent,
    ));
    drop(runtime);
    match (mode, result) {
        (Mode::Guest, Ok(())) => init::power_off(),
        (Mode::Host, Ok(())) => ExitCode::SUCCESS,
        (_, Err(e)) => fail(container::chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn guest_defaults_to_the_agent_vsock_port_and_ignores_kernel_words() {
        let a = parse_args(Mode::Guest, args(&["quiet", "foo=bar"])).unwrap();
        assert_eq!(a.listen, Listen::Vsock(vmpod_proto::AGENT_VSOCK_PORT));
        assert_eq!(a.state_dir, PathBuf::from("/run/vmpod-agent"));
    }

    #[test]
    fn host_requires_a_listen_address_and_rejects_strays() {
        assert!(parse_args(Mode::Host, args(&[])).is_err());
        assert!(parse_args(Mode::Host, args(&["--listen", "unix:/tmp/a.sock", "x"])).is_err());
        let a = parse_args(
            Mode::Host,
            args(&["--listen", "unix:/tmp/a.sock", "--state-dir", "/tmp/s"]),
        )
        .unwrap();
        assert_eq!(a.listen, Listen::Unix("/tmp/a.sock".into()));
        assert_eq!(a.state_dir, PathBuf::from("/tmp/s"));
        assert!(
            parse_args(
                Mode::Host,
                args(&["--listen", "unix:/a", "--cgroup-parent", "../x"])
            )
            .is_err()
        );
        assert!(
            parse_args(
                Mode::Host,
                args(&["--listen", "unix:/a", "--state-dir", "rel"])
            )
            .is_err()
        );
    }
}
