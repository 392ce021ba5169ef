//! A pod's network namespace, kept alive by a bind mount (as `ip netns`
//! does, so a restarted daemon finds it again), with loopback up.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A namespace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("creating the network namespace at {path}: {what}")]
    Netns {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Creates a network namespace with loopback up, bind-mounted on `path`.
pub fn create_netns(path: &Path) -> Result<(), NetnsError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |source| NetnsError::Netns {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err("creating its directory"))?;
    }
    std::fs::File::create(path).map_err(err("creating the mount point"))?;
    let target = path.to_path_buf();
    // unshare(CLONE_NEWNET) changes only the calling thread: a fresh thread
    // that ends afterwards keeps every other thread in the node's network.
    let result = std::thread::spawn(move || -> Result<(), (&'static str, std::io::Error)> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| ("unshare(CLONE_NEWNET)", e.into()))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| ("bind-mounting the namespace", e.into()))?;
        loopback_up().map_err(|e| ("bringing lo up", e))
    })
    .join()
    .unwrap_or_else(|_| {
        Err((
            "the namespace thread panicked",
            std::io::Error::other("panic"),
        ))
    });
    if let Err((what, source)) = result {
        remove_netns(path);
        return Err(NetnsError::Netns {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        });
    }
    Ok(())
}

/// Unmounts and deletes a namespace made by [`create_netns`]; absent is fine.
pub fn remove_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just opened and own from here on.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads ifr_name and writes the flags into req,
    // which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union's flags member is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads req, which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
