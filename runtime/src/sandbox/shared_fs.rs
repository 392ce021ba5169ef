//! The virtio-fs share of a VM pod, host side: how container volumes and
//! images that came after the boot reach the guest.
//!
//! Each VM pod runs one virtiofsd exporting one directory, laid out as
//! Kata lays it out:
//!
//! ```text
//! <sandbox dir>/mounts/               staging: a bind mount of itself, its own
//!                                     shared peer group; only the daemon writes here
//! <sandbox dir>/mounts/<cid>/<n>      CRI mount n of container <cid>: its host path,
//!                                     attached as a detached recursive clone
//!                                     (private, nosuid, nodev; read-only if asked)
//! <sandbox dir>/mounts/<cid>/rootfs   an image's erofs file, read-only
//! <sandbox dir>/mounts/<cid>/scratch  the container's writable-layer file
//!                                     (an ext4 image, see scratch.rs), read-write
//! <sandbox dir>/shared/               a read-only slave bind of mounts/: what
//!                                     virtiofsd exports (tag `vmpod`)
//! ```
//!
//! A mount attached under `mounts/` propagates into `shared/` and into
//! virtiofsd's own mount namespace (a slave of ours); unmounting it
//! propagates the same way. Everything else the guest sees is the
//! read-only `shared/` itself: it can write only inside a read-write
//! volume, and reaches nothing but the volumes and image files put there.
//!
//! Read-only needs care: a remount does not propagate, so a volume bound
//! and then remounted read-only would stay writable in `shared/` and in
//! virtiofsd. Volumes are therefore cloned with `open_tree`, made
//! read-only with `mount_setattr` while still detached, and only then
//! attached with `move_mount`; every copy inherits the flags.
//!
//! Host paths come from the kubelet: their symlinks are resolved once (as
//! containerd does), then the resolved path is opened with
//! `RESOLVE_NO_SYMLINKS` and the mount is made from that descriptor, so a
//! symlink swapped in meanwhile is never followed.
//!
//! Nothing here is persisted: the mount table is the state, so a restarted
//! daemon tears down what an earlier one made.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::cri::store::MountRecord;

/// The tag the guest mounts.
pub const TAG: &str = vmpod_proto::SHARED_FS_TAG;
/// How long virtiofsd gets to create its socket.
const VIRTIOFSD_START: Duration = Duration::from_secs(10);
/// The staged name of a container's image file.
const ROOTFS_NAME: &str = "rootfs";
/// The staged name of a container's writable-layer file.
const SCRATCH_NAME: &str = "scratch";

/// Errors of a pod's share.
#[derive(Debug, thiserror::Error)]
pub enum SharedFsError {
    #[error("mount source {0:?} does not exist")]
    MissingSource(String),
    #[error(
        "mount source {0:?} is neither a directory nor a regular file, which is all a VM pod can share"
    )]
    UnsupportedSource(String),
    #[error("this pod VM was started without a shared file system; recreate the pod")]
    NoShare,
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("mounts are still present under {path}: {left:?}")]
    Leftover { path: PathBuf, left: Vec<String> },
    #[error("starting virtiofsd")]
    Spawn(#[source] crate::process::SpawnError),
    #[error("virtiofsd did not create {socket} within {VIRTIOFSD_START:?} (see {log})")]
    NotStarted { socket: PathBuf, log: PathBuf },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SharedFsError + 'a {
    move |source| SharedFsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn mount_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::Error) -> SharedFsError + 'a {
    move |source| SharedFsError::Mount {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What CreateContainer hands the agent for a container's share entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Exposed {
    /// `shared:<cid>/<n>`, one per CRI mount, in order.
    pub mount_sources: Vec<String>,
    /// `shared:<cid>/rootfs` when the image file was exposed.
    pub rootfs_source: Option<String>,
    /// `shared:<cid>/scratch` when the writable-layer file was exposed.
    pub scratch_source: Option<String>,
}

/// A pod's share, named by its sandbox dir.
#[derive(Clone, Debug)]
pub struct Share {
    dir: PathBuf,
}

impl Share {
    pub fn new(sandbox_dir: &Path) -> Share {
        Share {
            dir: sandbox_dir.to_path_buf(),
        }
    }

    /// Where the daemon attaches mounts.
    pub fn staging(&self) -> PathBuf {
        self.dir.join("mounts")
    }

    /// What virtiofsd exports.
    pub fn exported(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// Sets up `mounts/` and `shared/`. On error nothing is left mounted.
    pub fn prepare(&self) -> Result<(), SharedFsError> {
        let result = self.prepare_mounts();
        if result.is_err() {
            let _ = self.teardown();
        }
        result
    }

    fn prepare_mounts(&self) -> Result<(), SharedFsError> {
        let staging = self.staging();
        let exported = self.exported();
        for d in [&staging, &exported] {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(d)
                .map_err(io_err("creating", d))?;
        }
        let none = None::<&str>;
        // A peer group of its own, cut off from whatever the state dir's
        // mount propagates to or from.
        mount(Some(&staging), &staging, none, MsFlags::MS_BIND, none)
            .map_err(mount_err("bind-mounting", &staging))?;
        mount(none, &staging, none, MsFlags::MS_PRIVATE, none)
            .map_err(mount_err("making private", &staging))?;
        mount(none, &staging, none, MsFlags::MS_SHARED, none)
            .map_err(mount_err("making shared", &staging))?;
        // The export receives the staging's mounts and sends nothing back;
        // its own files and directories are read-only to the guest.
        mount(Some(&staging), &exported, none, MsFlags::MS_BIND, none)
            .map_err(mount_err("bind-mounting the staging dir on", &exported))?;
        mount(none, &exported, none, MsFlags::MS_SLAVE, none)
            .map_err(mount_err("making a slave", &exported))?;
        mount(
            none,
            &exported,
            none,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            none,
        )
        .map_err(mount_err("remounting read-only", &exported))?;
        Ok(())
    }

    /// Whether [`Share::prepare`] ran for this pod (the export is mounted).
    pub fn is_prepared(&self) -> bool {
        let exported = self.exported();
        mount_points().contains(&exported)
    }

    /// Attaches a container's CRI mounts, and its image file when given,
    /// under `mounts/<container id>/`. On error nothing of it stays.
    pub fn expose(
        &self,
        container_id: &str,
        mounts: &[MountRecord],
        image_file: Option<&Path>,
        scratch_file: Option<&Path>,
    ) -> Result<Exposed, SharedFsError> {
        if !is_name(container_id) {
            return Err(SharedFsError::Io {
                what: "container ID is not a plain name",
                path: container_id.into(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        // Nothing to share: nothing to touch (and pods started before the
        // share existed keep running containers without volumes).
        if mounts.is_empty() && image_file.is_none() && scratch_file.is_none() {
            return Ok(Exposed::default());
        }
        if !self.is_prepared() {
            return Err(SharedFsError::NoShare);
        }
        let dir = self.staging().join(container_id);
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .map_err(io_err("creating", &dir))?;
        let result = (|| {
            let mut out = Exposed::default();
            for (n, m) in mounts.iter().enumerate() {
                let source = open_source(&m.host_path)?;
                attach(&source, &dir.join(n.to_string()), m.readonly, true)?;
                out.mount_sources.push(format!(
                    "{}{container_id}/{n}",
                    vmpod_proto::SHARED_SOURCE_PREFIX
                ));
            }
            if let Some(file) = image_file {
                let source = open_source(&file.display().to_string())?;
                attach(&source, &dir.join(ROOTFS_NAME), true, false)?;
                out.rootfs_source = Some(format!(
                    "{}{container_id}/{ROOTFS_NAME}",
                    vmpod_proto::SHARED_SOURCE_PREFIX
                ));
            }
            if let Some(file) = scratch_file {
                let source = open_source(&file.display().to_string())?;
                attach(&source, &dir.join(SCRATCH_NAME), false, false)?;
                out.scratch_source = Some(format!(
                    "{}{container_id}/{SCRATCH_NAME}",
                    vmpod_proto::SHARED_SOURCE_PREFIX
                ));
            }
            Ok(out)
        })();
        if result.is_err() {
            let _ = self.withdraw(container_id);
        }
        result
    }

    /// Detaches everything of a container and removes its directory.
    /// Idempotent.
    pub fn withdraw(&self, container_id: &str) -> Result<(), SharedFsError> {
        if !is_name(container_id) {
            return Ok(());
        }
        let dir = self.staging().join(container_id);
        unmount_under(&dir)?;
        // The unmounts propagated; check the export too before deleting.
        ensure_unmounted(&self.exported().join(container_id))?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &dir)(e)),
        }
    }

    /// Unmounts every volume, the export and the staging dir, then removes
    /// both directories. Idempotent; an error means a mount is left and the
    /// sandbox dir must not be deleted (it would delete through it).
    pub fn teardown(&self) -> Result<(), SharedFsError> {
        let staging = self.staging();
        let exported = self.exported();
        unmount_under(&staging)?;
        unmount_under(&exported)?;
        ensure_unmounted(&self.dir)?;
        for d in [&exported, &staging] {
            match std::fs::remove_dir_all(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", d)(e)),
            }
        }
        Ok(())
    }
}

/// Removes a sandbox dir, but only once no mount is left under it:
/// `remove_dir_all` would otherwise delete the files of a volume.
pub fn remove_sandbox_dir(dir: &Path) -> Result<(), SharedFsError> {
    Share::new(dir).teardown()?;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", dir)(e)),
    }
}

/// The virtiofsd program, found on PATH or in ~/.cargo/bin (`cargo install
/// virtiofsd`, see scripts/install-deps).
pub fn virtiofsd_binary() -> PathBuf {
    crate::hypervisor::helper_program("virtiofsd")
}

/// virtiofsd's command line for a share served on `socket`.
pub fn virtiofsd_command(share: &Share, socket: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(virtiofsd_binary());
    cmd.arg("--shared-dir")
        .arg(share.exported())
        .arg("--socket-path")
        .arg(socket)
        // Its own mount, PID and network namespaces, pivoted into the
        // export, under its seccomp filter (kill on anything else).
        .args(["--sandbox", "namespace", "--seccomp", "kill"])
        // A guest must not create device nodes in a host directory.
        .arg("--modcaps=-mknod")
        .args(["--cache", "auto", "--announce-submounts"]);
    cmd
}

/// Starts the pod's virtiofsd (own session, log in `log`) and waits for its
/// socket. Returns its PID; on error it is not left running.
pub fn start_virtiofsd(share: &Share, socket: &Path, log: &Path) -> Result<i32, SharedFsError> {
    let pid = crate::process::spawn_detached(virtiofsd_command(share, socket), None, log)
        .map_err(SharedFsError::Spawn)?;
    let deadline = Instant::now() + VIRTIOFSD_START;
    while !socket.exists() {
        if !crate::process::alive(pid) || Instant::now() >= deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(SharedFsError::NotStarted {
                socket: socket.to_path_buf(),
                log: log.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(pid)
}

/// A single plain path component (a container ID).
fn is_name(s: &str) -> bool {
    let mut c = Path::new(s).components();
    matches!((c.next(), c.next()), (Some(Component::Normal(n)), None) if n == s)
}

/// The kind of a source the share can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// An opened mount source.
struct Source {
    fd: OwnedFd,
    kind: Kind,
    path: PathBuf,
}

/// Resolves a host path's symlinks once, then opens the result without
/// following any symlink (O_PATH): the descriptor is what gets mounted.
fn open_source(host_path: &str) -> Result<Source, SharedFsError> {
    let resolved = match std::fs::canonicalize(host_path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SharedFsError::MissingSource(host_path.into()));
        }
        Err(e) => return Err(io_err("resolving", Path::new(host_path))(e)),
    };
    let fd = openat2_no_symlinks(&resolved).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOENT) {
            SharedFsError::MissingSource(host_path.into())
        } else {
            io_err("opening (no symlinks)", &resolved)(e)
        }
    })?;
    let meta = fstat(&fd).map_err(io_err("inspecting", &resolved))?;
    let kind = match meta.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFREG => Kind::File,
        _ => return Err(SharedFsError::UnsupportedSource(host_path.into())),
    };
    Ok(Source {
        fd,
        kind,
        path: resolved,
    })
}

/// Attaches a clone of `source` at `target` (created here, of the
/// source's kind): recursive for volumes, private, nosuid and nodev,
/// read-only when asked (read-only all the way down for recursive ones).
fn attach(
    source: &Source,
    target: &Path,
    readonly: bool,
    recursive: bool,
) -> Result<(), SharedFsError> {
    match source.kind {
        Kind::Dir => std::fs::DirBuilder::new()
            .mode(0o755)
            .create(target)
            .map(|_| ()),
        Kind::File => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(target)
            .map(|_| ()),
    }
    .map_err(io_err("creating the mount point", target))?;
    let tree = open_tree_clone(&source.fd, recursive)
        .map_err(io_err("cloning the mount of", &source.path))?;
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if readonly {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    set_attrs(&tree, set, recursive).map_err(io_err("setting mount flags on", &source.path))?;
    move_mount_to(&tree, target).map_err(io_err("attaching a clone at", target))
}

/// How a mount propagates, from /proc/self/mountinfo's optional fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    Private,
    /// Receives from a master (`master:N`), sends nothing.
    Slave,
    /// In a peer group (`shared:N`), maybe also a slave.
    Shared,
}

/// The propagation of the mount that holds `path` (the longest mount
/// point above it) in this mount namespace, as containerd checks a
/// HostToContainer or Bidirectional source.
pub fn propagation_of(path: &Path) -> Propagation {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    propagation_in(&info, path)
}

fn propagation_in(mountinfo: &str, path: &Path) -> Propagation {
    let mut best: Option<(usize, Propagation)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(point) = fields.get(4).map(|m| PathBuf::from(decode_mountinfo(m))) else {
            continue;
        };
        if !path.starts_with(&point) {
            continue;
        }
        let optional = fields.iter().skip(6).take_while(|f| **f != "-");
        let mut kind = Propagation::Private;
        for f in optional {
            if f.starts_with("shared:") {
                kind = Propagation::Shared;
            } else if f.starts_with("master:") && kind == Propagation::Private {
                kind = Propagation::Slave;
            }
        }
        // Later lines mount over earlier ones at the same point.
        let depth = point.components().count();
        if best.is_none_or(|(d, _)| depth >= d) {
            best = Some((depth, kind));
        }
    }
    best.map_or(Propagation::Private, |(_, k)| k)
}

/// Mount points (decoded) in this mount namespace, in mount order.
fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(decode_mountinfo(m)))
        .collect()
}

/// `\040`-style octal escapes of /proc/self/mountinfo undone.
fn decode_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or below `dir`.
fn mounts_at_or_under(dir: &Path) -> Vec<PathBuf> {
    mount_points()
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Detaches every mount at or below `dir`, deepest (latest) first.
fn unmount_under(dir: &Path) -> Result<(), SharedFsError> {
    for m in mounts_at_or_under(dir).iter().rev() {
        match umount2(m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            // Already gone with a parent detached before it.
            Ok(()) | Err(nix::Error::EINVAL | nix::Error::ENOENT) => {}
            Err(e) => return Err(mount_err("unmounting", m)(e)),
        }
    }
    ensure_unmounted(dir)
}

fn ensure_unmounted(dir: &Path) -> Result<(), SharedFsError> {
    let left = mounts_at_or_under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        Err(SharedFsError::Leftover {
            path: dir.to_path_buf(),
            left: left.iter().map(|p| p.display().to_string()).collect(),
        })
    }
}

fn cstring(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// A syscall's fd result as an OwnedFd.
fn owned(ret: libc::c_long) -> std::io::Result<OwnedFd> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fresh descriptor; nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// openat2(path, O_PATH, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS).
fn openat2_no_symlinks(path: &Path) -> std::io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: open_how is plain old data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated path and the open_how
    // struct, both alive across the call, and the size matches the struct.
    owned(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    })
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, which lives across the call; the fd
    // is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// open_tree(fd, "", OPEN_TREE_CLONE): a detached copy of the mount at the
/// descriptor, with its submounts when `recursive`.
fn open_tree_clone(fd: &OwnedFd, recursive: bool) -> std::io::Result<OwnedFd> {
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as u32;
    if recursive {
        flags |= libc::AT_RECURSIVE as u32;
    }
    // SAFETY: open_tree reads the empty NUL-terminated string and uses the
    // open descriptor; no memory is written.
    owned(unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) })
}

/// mount_setattr on a detached tree: sets `set` and private propagation.
fn set_attrs(tree: &OwnedFd, set: u64, recursive: bool) -> std::io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: mount_setattr reads the empty path and the mount_attr struct,
    // both alive across the call; the size matches the struct.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// move_mount(tree → target): attaches the detached tree; the target is
/// opened without following a symlink.
fn move_mount_to(tree: &OwnedFd, target: &Path) -> std::io::Result<()> {
    let target_fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(target)?;
    // SAFETY: move_mount reads two empty NUL-terminated strings and uses
    // two open descriptors; no memory is written.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target_fd.as_raw_fd(),
            c"".as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_propagation_of_the_deepest_mount_above_a_path_counts() {
        let info = "\
22 1 0:21 / / rw - ext4 /dev/vda rw
30 22 0:30 / /data rw shared:5 - ext4 /dev/vdb rw
31 30 0:31 / /data/slave rw master:5 - tmpfs t rw
32 30 0:32 / /data/both rw shared:7 master:5 - tmpfs t rw
33 22 0:33 / /data\\040x rw - tmpfs t rw";
        let p = |s: &str| propagation_in(info, Path::new(s));
        assert_eq!(p("/etc"), Propagation::Private);
        assert_eq!(p("/data/vol"), Propagation::Shared);
        assert_eq!(p("/data/slave/x"), Propagation::Slave);
        assert_eq!(p("/data/both"), Propagation::Shared);
        assert_eq!(p("/data x/y"), Propagation::Private);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(decode_mountinfo("/a\\040b"), "/a b");
        assert_eq!(decode_mountinfo("/tab\\011x\\134y"), "/tab\tx\\y");
        assert_eq!(decode_mountinfo("/plain"), "/plain");
        // Not an escape: left as it is.
        assert_eq!(decode_mountinfo("/x\\09"), "/x\\09");
        assert_eq!(decode_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn container_ids_must_be_plain_names() {
        assert!(is_name("0123abcd"));
        for bad in ["", ".", "..", "a/b", "/a", "a/"] {
            assert!(!is_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn virtiofsd_is_sandboxed_and_exports_only_the_share() {
        let share = Share::new(Path::new("/state/sandboxes/abc"));
        let cmd = virtiofsd_command(&share, Path::new("/state/s/abc/fs.sock"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("--shared-dir /state/sandboxes/abc/shared"),
            "{joined}"
        );
        assert!(
            joined.contains("--socket-path /state/s/abc/fs.sock"),
            "{joined}"
        );
        assert!(joined.contains("--sandbox namespace"), "{joined}");
        assert!(joined.contains("--seccomp kill"), "{joined}");
        assert!(joined.contains("--modcaps=-mknod"), "{joined}");
    }

    #[test]
    fn a_missing_source_is_its_own_error() {
        assert!(matches!(
            open_source("/nonexistent/vmpod-volume"),
            Err(SharedFsError::MissingSource(_))
        ));
    }

    #[test]
    fn sources_other_than_files_and_directories_are_refused() {
        assert!(matches!(
            open_source("/dev/null"),
            Err(SharedFsError::UnsupportedSource(_))
        ));
    }

    #[test]
    fn symlinks_in_a_host_path_are_resolved_once() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
        let s = open_source(&tmp.path().join("link").display().to_string()).unwrap();
        assert_eq!(s.kind, Kind::Dir);
        assert_eq!(s.path, std::fs::canonicalize(&real).unwrap());
    }

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes mounts: run it as root"
        );
    }

    fn write(path: &Path) -> std::io::Result<()> {
        std::fs::write(path, b"x")
    }

    #[test]
    fn share_propagates_volumes_with_their_flags_and_leaves_nothing() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let sandbox = tmp.path().join("sandbox");
        std::fs::create_dir(&sandbox).unwrap();
        let rw = tmp.path().join("rw");
        let ro = tmp.path().join("ro");
        std::fs::create_dir(&rw).unwrap();
        std::fs::create_dir(&ro).unwrap();
        std::fs::write(ro.join("kept"), b"ro data").unwrap();
        let hosts = tmp.path().join("hosts");
        std::fs::write(&hosts, b"127.0.0.1 x\n").unwrap();
        let image = tmp.path().join("image.erofs");
        std::fs::write(&image, b"image bytes").unwrap();
        let layer = tmp.path().join("layer.ext4");
        std::fs::write(&layer, b"layer").unwrap();

        let share = Share::new(&sandbox);
        assert!(!share.is_prepared());
        // Without a share, a container with nothing to share still works;
        // one with a volume gets FailedPrecondition material.
        assert_eq!(
            share.expose("c0", &[], None, None).unwrap(),
            Exposed::default()
        );
        assert!(!share.staging().exists());
        let vol = [MountRecord {
            container_path: "/x".into(),
            host_path: rw.display().to_string(),
            readonly: false,
            ..Default::default()
        }];
        assert!(matches!(
            share.expose("c0", &vol, None, None),
            Err(SharedFsError::NoShare)
        ));
        share.prepare().unwrap();
        assert!(share.is_prepared());
        let mounts = [
            MountRecord {
                container_path: "/data".into(),
                host_path: rw.display().to_string(),
                readonly: false,
                ..Default::default()
            },
            MountRecord {
                container_path: "/ro".into(),
                host_path: ro.display().to_string(),
                readonly: true,
                ..Default::default()
            },
            MountRecord {
                container_path: "/etc/hosts".into(),
                host_path: hosts.display().to_string(),
                readonly: false,
                ..Default::default()
            },
        ];
        let exposed = share
            .expose("c1", &mounts, Some(&image), Some(&layer))
            .unwrap();
        assert_eq!(
            exposed,
            Exposed {
                mount_sources: vec![
                    "shared:c1/0".into(),
                    "shared:c1/1".into(),
                    "shared:c1/2".into()
                ],
                rootfs_source: Some("shared:c1/rootfs".into()),
                scratch_source: Some("shared:c1/scratch".into()),
            }
        );
        let exported = share.exported().join("c1");
        // What virtiofsd serves: a write through the read-write volume
        // lands in the host dir; the read-only one refuses even root, in
        // the export (a remount would not have propagated there).
        write(&exported.join("0/new")).unwrap();
        assert_eq!(std::fs::read(rw.join("new")).unwrap(), b"x");
        let err = write(&exported.join("1/new")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        assert_eq!(std::fs::read(exported.join("1/kept")).unwrap(), b"ro data");
        assert_eq!(std::fs::read(exported.join("2")).unwrap(), b"127.0.0.1 x\n");
        assert_eq!(
            std::fs::read(exported.join("rootfs")).unwrap(),
            b"image bytes"
        );
        let err = write(&exported.join("rootfs")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        // The writable layer's file is writable through the export.
        write(&exported.join("scratch")).unwrap();
        assert_eq!(std::fs::read(&layer).unwrap(), b"x");
        // The export itself is read-only: nothing can be planted beside
        // the volumes.
        let err = write(&share.exported().join("planted")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

        // A missing host path: InvalidArgument material, nothing left.
        let missing = [MountRecord {
            container_path: "/x".into(),
            host_path: tmp.path().join("gone").display().to_string(),
            readonly: false,
            ..Default::default()
        }];
        assert!(matches!(
            share.expose("c2", &missing, None, None),
            Err(SharedFsError::MissingSource(_))
        ));
        assert!(!share.staging().join("c2").exists());

        share.withdraw("c1").unwrap();
        assert!(mounts_at_or_under(&share.staging().join("c1")).is_empty());
        assert!(mounts_at_or_under(&exported).is_empty());
        assert!(!share.staging().join("c1").exists());
        share.withdraw("c1").unwrap();

        share.expose("c3", &mounts[..1], None, None).unwrap();
        remove_sandbox_dir(&sandbox).unwrap();
        assert!(mounts_at_or_under(tmp.path()).is_empty());
        assert!(!sandbox.exists());
        // The volume's data survived the removal of the sandbox dir.
        assert_eq!(std::fs::read(rw.join("new")).unwrap(), b"x");
        assert!(ro.join("kept").exists());
    }

    #[test]
    fn the_no_symlink_open_refuses_any_symlink_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", tmp.path().join("link")).unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        assert!(openat2_no_symlinks(&base.join("real")).is_ok());
        let err = openat2_no_symlinks(&base.join("link")).expect_err("must fail");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
    }
}
