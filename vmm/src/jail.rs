//! The jailer: what confines a pod's VMM before any guest code runs
//! (Firecracker's jailer is the model, done in-process).
//!
//! Two steps, both as root, both while the process is single-threaded:
//!
//! 1. [`enter_pid_namespace`], first thing in `main`: `unshare(CLONE_NEWPID)`
//!    and fork. The child is PID 1 of a namespace of its own and goes on to
//!    build the VM (a KVM VM belongs to the process that created it, so the
//!    fork must come first). The parent only waits for it and exits with its
//!    status; it dies with `SIGKILL` if the daemon kills it, and the child
//!    follows (parent-death signal).
//! 2. [`confine`], once the VM is built: every host resource is open by then
//!    (`/dev/kvm`, the kernel and initramfs, the disks, the tap, the console
//!    log, `/dev/urandom`, `/proc/self/status`, the bound control and vsock
//!    sockets). New mount, IPC and UTS namespaces (and a new, empty network
//!    namespace when the VM has no NIC; with one it stays in the pod's),
//!    `pivot_root` into an empty read-only per-pod directory, the old root
//!    detached, all capabilities dropped (bounding set included), the
//!    configured uid/gid with no supplementary groups, `no_new_privs`.
//!
//! After that the seccomp filters (see `seccomp`, jailed variants) forbid
//! `openat`, `socket`, `connect`, `unlink` and `ptrace`: the VMM works on
//! the file descriptors it holds, and new disks arrive as file descriptors
//! on the control socket (`SCM_RIGHTS`).

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// How the VMM is jailed (`"jail"` in the VM config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// An empty directory that becomes the VMM's root (absolute).
    pub root: PathBuf,
    /// The unprivileged uid and gid the VMM runs as (not 0).
    pub uid: u32,
    pub gid: u32,
    /// A fresh network namespace (the VM has no NIC). False: stay in the
    /// namespace the VMM was started in (the pod's, where its tap is).
    #[serde(default)]
    pub new_netns: bool,
}

impl JailConfig {
    /// Checks what can be checked before anything runs.
    pub fn validate(&self) -> Result<(), String> {
        if !self.root.is_absolute() || self.root.as_os_str().len() > 1024 {
            return Err("jail root must be an absolute path of at most 1024 bytes".into());
        }
        if self.uid == 0 || self.gid == 0 {
            return Err("the jailed VMM must not run as uid or gid 0".into());
        }
        Ok(())
    }
}

/// Errors of the jailer: which step failed, with the OS error.
#[derive(Debug, thiserror::Error)]
#[error("jail: {step}")]
pub struct JailError {
    pub step: String,
    #[source]
    pub source: std::io::Error,
}

fn os_err(step: impl Into<String>) -> JailError {
    JailError {
        step: step.into(),
        source: std::io::Error::last_os_error(),
    }
}

fn check(rc: libc::c_int, step: &str) -> Result<(), JailError> {
    if rc < 0 { Err(os_err(step)) } else { Ok(()) }
}

static JAILED: AtomicBool = AtomicBool::new(false);

/// Whether this process is jailed: code that would open a path, create a
/// socket or unlink a file (which the jailed seccomp filters forbid) asks
/// this first and refuses instead.
pub fn is_jailed() -> bool {
    JAILED.load(Ordering::Relaxed)
}

/// The number of threads of this process (from `/proc/self/task`).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Step 1: into a new PID namespace. Returns in the child (PID 1 of the
/// namespace); the parent never returns: it waits for the child and exits
/// with its exit code (128 + the signal when it was killed).
pub fn enter_pid_namespace() -> Result<(), JailError> {
    if thread_count() != 1 {
        return Err(JailError {
            step: "the VMM must be single-threaded before it forks".into(),
            source: std::io::Error::from(std::io::ErrorKind::Other),
        });
    }
    check(
        // SAFETY: unshare with a constant flag; no memory is passed.
        unsafe { libc::unshare(libc::CLONE_NEWPID) },
        "unshare(CLONE_NEWPID)",
    )?;
    // SAFETY: the process is single-threaded (checked above), so the child
    // may go on running ordinary Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_err("fork into the PID namespace"));
    }
    if pid == 0 {
        check(
            // SAFETY: prctl with constant arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
            "prctl(PR_SET_PDEATHSIG)",
        )?;
        return Ok(());
    }
    // The parent: wait for the VMM and pass its status on. A signal that
    // ends the parent (SIGTERM, SIGKILL) ends the VMM through its
    // parent-death signal.
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(1);
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    };
    std::process::exit(code);
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError {
        step: format!("path {} has a NUL byte", p.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// Step 2: namespaces, `pivot_root`, no capabilities, the unprivileged ids,
/// `no_new_privs`. The caller has opened everything the VM needs.
pub fn confine(cfg: &JailConfig) -> Result<(), JailError> {
    cfg.validate().map_err(|e| JailError {
        step: e,
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    if thread_count() != 1 {
        // Namespaces and capabilities are per thread: a second thread
        // would stay outside the jail.
        return Err(JailError {
            step: "the VMM must be single-threaded when it is jailed".into(),
            source: std::io::Error::from(std::io::ErrorKind::Other),
        });
    }
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if cfg.new_netns {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare with constant flags; no memory is passed.
    check(unsafe { libc::unshare(flags) }, "unshare(mount, IPC, UTS)")?;
    let root = cstr(&cfg.root)?;
    let slash = c"/";
    let dot = c".";
    // Nothing we mount propagates back to the host.
    check(
        // SAFETY: mount(2) with valid C strings or NULLs, constant flags.
        unsafe {
            libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        },
        "making / private",
    )?;
    // pivot_root needs the new root to be a mount point.
    check(
        // SAFETY: as above.
        unsafe {
            libc::mount(
                root.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        },
        "bind-mounting the jail root",
    )?;
    check(
        // SAFETY: chdir with a valid C string.
        unsafe { libc::chdir(root.as_ptr()) },
        "chdir to the jail root",
    )?;
    // pivot_root(".", "."): the old root is stacked on the new one and
    // detached right after (no directory for it is needed).
    check(
        // SAFETY: the pivot_root syscall with two valid C strings.
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as libc::c_int,
        "pivot_root",
    )?;
    check(
        // SAFETY: umount2 with a valid C string and a constant flag.
        unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) },
        "detaching the old root",
    )?;
    // SAFETY: chdir with a valid C string.
    check(unsafe { libc::chdir(slash.as_ptr()) }, "chdir /")?;
    // The new root is read-only, without devices, setuid or exec.
    check(
        // SAFETY: mount(2) with valid C strings or NULLs, constant flags.
        unsafe {
            libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NODEV
                    | libc::MS_NOSUID
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        },
        "remounting the jail root read-only",
    )?;
    // Drop every capability from the bounding set while we still may.
    for cap in 0..=63 {
        // SAFETY: prctl with constant arguments; EINVAL past the last cap.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
        {
            return Err(os_err(format!(
                "dropping capability {cap} from the bounding set"
            )));
        }
    }
    check(
        // SAFETY: prctl with constant arguments.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        },
        "clearing ambient capabilities",
    )?;
    check(
        // SAFETY: setgroups with an empty list.
        unsafe { libc::setgroups(0, std::ptr::null()) },
        "setgroups([])",
    )?;
    check(
        // SAFETY: setresgid/setresuid with plain integers. Leaving uid 0 with
        // no keep-caps clears the permitted and effective sets.
        unsafe { libc::setresgid(cfg.gid, cfg.gid, cfg.gid) },
        "setresgid",
    )?;
    check(
        // SAFETY: as above.
        unsafe { libc::setresuid(cfg.uid, cfg.uid, cfg.uid) },
        "setresuid",
    )?;
    check(
        // SAFETY: prctl with constant arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "prctl(PR_SET_NO_NEW_PRIVS)",
    )?;
    // Changing credentials cleared the parent-death signal: set it again,
    // so the VMM still ends with the process the daemon started.
    check(
        // SAFETY: prctl with constant arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
        "prctl(PR_SET_PDEATHSIG)",
    )?;
    // setresuid may leave the process dumpable = 0; keep it so (no ptrace
    // or /proc/<pid>/mem from the same uid).
    check(
        // SAFETY: prctl with constant arguments.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) },
        "prctl(PR_SET_DUMPABLE)",
    )?;
    JAILED.store(true, Ordering::Relaxed);
    Ok(())
}

static PROBE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Arms the test hook [`probe`] (`main` does, from `VMPOD_VMM_JAIL_PROBE`).
pub fn arm_probe(target: String) {
    let _ = PROBE.set(target);
}

/// The armed probe's connect target, if armed.
pub fn armed_probe() -> Option<&'static str> {
    PROBE.get().map(String::as_str)
}

/// Test hook: `VMPOD_VMM_JAIL_PROBE` set when the VMM starts (read before
/// the jail, never set by the daemon) makes the jailed VMM try what a
/// compromised one would and log each result as `jail-probe <what>:
/// <result>`: open a host file, create a socket, connect to the unix
/// socket the variable names, ptrace PID 1 of the host. With seccomp on,
/// the first of them kills the VMM (SIGSYS); with it off, the namespaces
/// and the dropped privileges alone make each fail.
pub fn probe(target: &str) {
    let report = |what: &str, rc: i64| {
        let result = if rc < 0 {
            std::io::Error::last_os_error().to_string()
        } else {
            "succeeded".to_string()
        };
        crate::log::warning!("jail-probe {what}: {result}");
    };
    let etc = c"/etc/hostname";
    // SAFETY: open(2) with a valid C string and constant flags; a
    // descriptor it returns is closed below.
    let fd = unsafe { libc::open(etc.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    report("open /etc/hostname", i64::from(fd));
    if fd >= 0 {
        // SAFETY: closing the descriptor just opened.
        unsafe { libc::close(fd) };
    }
    // SAFETY: socket(2) with constant arguments.
    let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    report("socket(AF_UNIX)", i64::from(s));
    if s >= 0 {
        match crate::devices::virtio::vsock::muxer::sockaddr_un(Path::new(target)) {
            Ok(addr) => {
                // SAFETY: connect with an initialised sockaddr_un and its size.
                let rc = unsafe {
                    libc::connect(
                        s,
                        (&raw const addr).cast(),
                        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                    )
                };
                report(&format!("connect {target}"), i64::from(rc));
            }
            Err(e) => crate::log::warning!("jail-probe connect {target}: {e}"),
        }
        // SAFETY: closing the socket just created.
        unsafe { libc::close(s) };
    }
    // SAFETY: ptrace(PTRACE_ATTACH) with integer arguments only.
    let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) };
    report("ptrace(PTRACE_ATTACH, 1)", rc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_configs_are_validated() {
        let ok = JailConfig {
            root: "/var/lib/vmpod/sandboxes/x/jail".into(),
            uid: 1_000_000_000,
            gid: 1_000_000_000,
            new_netns: true,
        };
        assert_eq!(ok.validate(), Ok(()));
        for bad in [
            JailConfig {
                root: "relative".into(),
                ..ok.clone()
            },
            JailConfig {
                uid: 0,
                ..ok.clone()
            },
            JailConfig {
                gid: 0,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
