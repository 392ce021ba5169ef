//! PID-1 duties inside a guest: the mounts a Linux userland expects, the
//! console, loopback, orphan reaping, and ending the VM.
//!
//! The initramfs holds nothing but this binary as `/init`, so everything a
//! container runtime expects of a booted system is set up here.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::process::ExitCode;

use nix::mount::{MsFlags, mount};

/// What can go wrong while setting up the guest.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "refusing guest setup: /proc is already mounted, so this is not the first process of a \
         fresh guest (a host agent needs --listen)"
    )]
    NotAGuest,
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("creating {path}")]
    Create {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the console")]
    Console(#[source] nix::Error),
    #[error("bringing up the loopback interface")]
    Loopback(#[source] std::io::Error),
}

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// Mounted in order; a later target may live inside an earlier one.
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
];

/// Sets the guest up. Called first thing as PID 1, before any logging.
pub fn setup() -> Result<(), InitError> {
    // A guest's init starts on the bare initramfs. PID 1 of a PID namespace
    // on a host sees the host's /proc: remounting "/" there would bury the
    // host's root, so refuse.
    if std::path::Path::new("/proc/self/mountinfo").exists() {
        return Err(InitError::NotAGuest);
    }
    switch_root_to_tmpfs()?;
    for m in MOUNTS {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(m.target)
            .map_err(|source| InitError::Create {
                path: m.target,
                source,
            })?;
        mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data).map_err(|source| {
            InitError::Mount {
                fstype: m.fstype,
                target: m.target,
                source,
            }
        })?;
    }
    open_console()?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        // devtmpfs may already provide some of these.
        let _ = fs::remove_file(link);
        symlink(target, link).map_err(|source| InitError::Create { path: link, source })?;
    }
    loopback_up().map_err(InitError::Loopback)?;
    Ok(())
}

/// The initramfs is the kernel's rootfs, which pivot_root(2) cannot leave:
/// every container start would fail. So the agent moves a fresh tmpfs over
/// `/` and chroots into it (what switch_root does); containers then pivot
/// from a root that has a parent mount. The agent binary stays reachable
/// through /proc/self/exe for the libcontainer helper.
fn switch_root_to_tmpfs() -> Result<(), InitError> {
    const NEW_ROOT: &str = "/newroot";
    fs::DirBuilder::new()
        .mode(0o755)
        .create(NEW_ROOT)
        .map_err(|source| InitError::Create {
            path: NEW_ROOT,
            source,
        })?;
    mount(
        Some("rootfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|source| InitError::Mount {
        fstype: "tmpfs",
        target: NEW_ROOT,
        source,
    })?;
    let switch = || -> nix::Result<()> {
        nix::unistd::chdir(NEW_ROOT)?;
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
        nix::unistd::chroot(".")?;
        nix::unistd::chdir("/")
    };
    switch().map_err(|source| InitError::Mount {
        fstype: "tmpfs (switch root)",
        target: "/",
        source,
    })
}

/// The initramfs has no /dev/console, so the kernel started us with no
/// stdio; devtmpfs has it now.
fn open_console() -> Result<(), InitError> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    let fd = open(
        "/dev/console",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(InitError::Console)?;
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors; nothing in this
        // process holds them yet (the kernel gave PID 1 none), so no owned
        // fd is invalidated.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err(InitError::Console(nix::Error::last()));
        }
    }
    Ok(())
}

/// `ip link set lo up`, with one ioctl pair on a throwaway socket.
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the interface name and writes ifru_flags
    // inside `req`, which lives for the whole call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just filled ifru_flags, so reading that union
    // member is reading initialised data.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Ends the VM. A guest without ACPI cannot power off, so the agent reboots:
/// the kernel runs with `reboot=t` (QEMU, with `-no-reboot`) or `reboot=k`
/// (our VMM, which turns the i8042 reset into a clean exit).
pub fn power_off() -> ExitCode {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Unreachable unless reboot(2) failed; PID 1 must not return.
    halt_forever()
}

/// PID 1 cannot exit (the kernel would panic with an unreadable message):
/// say why on the console and end the VM.
pub fn fatal(msg: &str) -> ExitCode {
    eprintln!("{msg}");
    power_off()
}

fn halt_forever() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
