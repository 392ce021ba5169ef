//! Bind-mount sources of host pods, taken from the node's mount namespace
//! when the container is created.
//!
//! A host agent lives in a private mount namespace cloned from the node's
//! when its pod started. A path resolved there misses whatever the node
//! mounted since (the kubelet's volumes, a tmpfs under a hostPath), and no
//! node mount made later can reach the container. So, as runc sees the
//! node's tree at create time, the agent clones each source with
//! `open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)` *in the node's namespace*
//! and attaches the clone under the container's directory; libcontainer
//! then binds that. The clone keeps the source's propagation: a source that
//! is shared on the node stays a peer, so `rslave` (HostToContainer) and
//! `rshared` (Bidirectional) behave as with runc, and a private one stays
//! private.
//!
//! `setns` into a mount namespace needs a single-threaded caller, so a
//! short-lived helper (the agent re-executed as `__stage-mount`) does it,
//! as `helper.rs` does for libcontainer.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use super::{ContainerError, internal};
use crate::process::{self, ProcessTable};

/// The first argument that selects the helper.
pub const STAGE_ARG: &str = "__stage-mount";

/// How long the helper may take.
const STAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The node's mount namespace; set only in a host agent.
static NODE_MOUNT_NS: OnceLock<OwnedFd> = OnceLock::new();

/// Keeps the node's mount namespace; a host agent calls it before it
/// unshares its own. From then on bind sources are staged.
pub fn remember_node_namespace() -> std::io::Result<()> {
    let ns = std::fs::File::open("/proc/self/ns/mnt")?;
    let _ = NODE_MOUNT_NS.set(ns.into());
    Ok(())
}

/// Whether bind sources come from the node's namespace (host agents).
pub fn enabled() -> bool {
    NODE_MOUNT_NS.get().is_some()
}

/// Attaches a clone of the node's `source` (with its submounts) at
/// `target`, which must not exist; `target`'s parent is the caller's.
pub async fn stage(
    table: &ProcessTable,
    source: &str,
    target: &Path,
) -> Result<(), ContainerError> {
    let ns = NODE_MOUNT_NS
        .get()
        .ok_or_else(|| ContainerError::Internal("no node mount namespace to stage from".into()))?;
    let ns_fd = ns.as_raw_fd();
    let error_file = target.with_extension("stage-error");
    let stderr =
        std::fs::File::create(&error_file).map_err(|e| internal("stage error file", &e))?;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg(STAGE_ARG)
        .arg(ns_fd.to_string())
        .arg(source)
        .arg(target)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    let keep_open = move || {
        // SAFETY: fcntl(F_SETFD) on a descriptor that lives for the agent's
        // lifetime; it touches no memory.
        if unsafe { libc::fcntl(ns_fd, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure makes one async-signal-safe call (fcntl) and
    // allocates nothing.
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, keep_open) };
    let child = cmd
        .spawn()
        .map_err(|e| internal("starting the stage helper", &e))?;
    let pid = child.id() as i32;
    // The reaper owns every child's status.
    drop(child);
    let exit = table.register(pid);
    let outcome = tokio::time::timeout(STAGE_TIMEOUT, process::wait(exit)).await;
    table.forget(pid);
    let text = std::fs::read_to_string(&error_file).unwrap_or_default();
    let _ = std::fs::remove_file(&error_file);
    match outcome {
        Ok(Some(info)) if info.code == 0 => Ok(()),
        Ok(Some(_)) => Err(ContainerError::InvalidArgument(format!(
            "mount source {source:?}: {}",
            text.trim()
        ))),
        Ok(None) => Err(ContainerError::Internal("lost the stage helper".into())),
        Err(_) => {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            Err(ContainerError::Internal(format!(
                "staging {source:?} timed out after {STAGE_TIMEOUT:?}"
            )))
        }
    }
}

/// Detaches a staged tree. Made private first: unmounting a submount of a
/// tree that is still a peer of the node's would propagate the unmount to
/// the node's own mounts.
pub fn unstage(target: &Path) {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let _ = mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    );
    let _ = umount2(target, MntFlags::MNT_DETACH);
}

/// Where a container's staged sources live (under its directory).
pub fn staging_dir(container_dir: &Path) -> std::path::PathBuf {
    container_dir.join("mounts")
}

/// Detaches every staged tree of a container; true when none is left
/// mounted, so the container's directory may be deleted (deleting through
/// a mounted tree would delete the node's files).
pub fn unstage_all(container_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dir = staging_dir(container_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return true;
    };
    let Ok(dev) = std::fs::metadata(&dir).map(|m| m.dev()) else {
        return false;
    };
    let mut clean = true;
    for entry in entries.flatten() {
        let path = entry.path();
        unstage(&path);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.dev() != dev) {
            tracing::error!(path = %path.display(), "a staged mount is still attached; keeping the container directory");
            clean = false;
        }
    }
    clean
}

/// Entry point of the helper process (`args` follow STAGE_ARG).
pub fn main(args: &[String]) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let [ns, source, target] = args else {
        return Err("usage: __stage-mount NS_FD SOURCE TARGET".into());
    };
    let node: RawFd = ns.parse().map_err(|_| format!("bad namespace fd {ns:?}"))?;
    // SAFETY: the agent passed this descriptor to us, open; we own it now.
    let node = unsafe { OwnedFd::from_raw_fd(node) };
    let own = std::fs::File::open("/proc/self/ns/mnt")
        .map_err(|e| format!("opening the agent's mount namespace: {e}"))?;
    let enter = |fd: &dyn AsRawFd, what: &str| {
        // SAFETY: setns takes an open namespace descriptor and a constant.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNS) } < 0 {
            return Err(format!(
                "entering the {what} mount namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    enter(&node, "node's")?;
    let is_dir = std::fs::metadata(source)
        .map_err(|e| format!("{e}"))?
        .is_dir();
    let c_source = CString::new(Path::new(source).as_os_str().as_bytes())
        .map_err(|_| "a NUL in the source path".to_string())?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32;
    // SAFETY: open_tree reads the NUL-terminated path, alive across the call.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c_source.as_ptr(),
            flags,
        )
    };
    if tree < 0 {
        return Err(format!(
            "cloning its mount: {}",
            std::io::Error::last_os_error()
        ));
    }
    let tree = i32::try_from(tree).map_err(|_| "fd out of range".to_string())?;
    // SAFETY: the kernel just returned this fresh descriptor.
    let tree = unsafe { OwnedFd::from_raw_fd(tree) };
    enter(&own, "agent's")?;
    let made = if is_dir {
        std::fs::create_dir(target)
    } else {
        std::fs::File::create_new(target).map(drop)
    };
    made.map_err(|e| format!("creating the mount point {target}: {e}"))?;
    let c_target = CString::new(Path::new(target).as_os_str().as_bytes())
        .map_err(|_| "a NUL in the target path".to_string())?;
    // SAFETY: move_mount reads two NUL-terminated strings, alive across the
    // call, and uses the open tree descriptor.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c_target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if ret < 0 {
        return Err(format!("attaching it: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
