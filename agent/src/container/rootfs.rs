//! A container's root file system: the image's read-only erofs block device
//! (a virtio-blk disk in a guest, a loop device on the host), with an
//! overlay whose writable upper layer lives on a size-limited tmpfs.
//!
//! ```text
//! <dir>/image    erofs, read-only          (lowerdir)
//! <dir>/rw       tmpfs size=N              upper/ and work/
//! <dir>/bundle/rootfs   overlay            what the container sees as /
//! ```

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use vmpod_proto::v1::Rootfs;

/// The writable layer's size when the request does not say.
pub const DEFAULT_WRITABLE_BYTES: u64 = 64 << 20;

/// Errors from setting up or tearing down a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs source {0:?} is neither a block device, a file, nor serial:<id> of a disk")]
    BadSource(String),
    #[error("no disk has serial {0:?}")]
    NoSuchSerial(String),
    #[error("rootfs file system type {0:?} is not supported (erofs, ext4)")]
    BadFsType(String),
    #[error("attaching {path} to a loop device")]
    Loop {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting {what} on {target}")]
    Mount {
        what: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("preparing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A mounted rootfs; [`Mounted::unmount`] undoes it.
#[derive(Debug)]
pub struct Mounted {
    pub image: PathBuf,
    pub rw: Option<PathBuf>,
    pub rootfs: PathBuf,
    /// Bytes and inodes the writable layer's filesystem used when it was
    /// new (an ext4 scratch disk's own metadata): not the container's.
    pub baseline: (u64, u64),
}

fn mount_err<'a>(
    what: &'static str,
    target: &'a Path,
) -> impl FnOnce(nix::Error) -> RootfsError + 'a {
    move |source| RootfsError::Mount {
        what,
        target: target.to_path_buf(),
        source,
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A block device to mount. For a loop device the open handle must live
/// until the mount holds the device: autoclear detaches it at last close.
pub struct Device {
    pub path: PathBuf,
    _hold: Option<fs::File>,
}

/// Finds the block device for a request's source. A regular file is
/// attached to a read-only loop device that frees itself once unmounted.
pub fn resolve_source(source: &str) -> Result<Device, RootfsError> {
    resolve(source, false)
}

fn resolve(source: &str, writable: bool) -> Result<Device, RootfsError> {
    if let Some(serial) = source.strip_prefix("serial:") {
        let path = find_by_serial(Path::new("/sys/block"), serial)?;
        wait_for_capacity(Path::new("/sys/block"), &path, HOTPLUG_SETTLE);
        return Ok(Device { path, _hold: None });
    }
    let path = Path::new(source);
    if !path.is_absolute() {
        return Err(RootfsError::BadSource(source.into()));
    }
    let meta = fs::metadata(path).map_err(|_| RootfsError::BadSource(source.into()))?;
    if meta.file_type().is_block_device() {
        Ok(Device {
            path: path.to_path_buf(),
            _hold: None,
        })
    } else if meta.is_file() {
        attach_loop(path, writable)
    } else {
        Err(RootfsError::BadSource(source.into()))
    }
}

/// How long a hot-plugged disk gets to show its size.
const HOTPLUG_SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// A disk attached to an empty slot at run time (the `vmpod` VMM's
/// block_attach) learns its new size on a kernel workqueue after the
/// config-change interrupt; mounting before that sees an empty disk. Waits,
/// bounded, until `/sys/block/<dev>/size` is non-zero; past the bound the
/// mount reports the problem.
fn wait_for_capacity(sys_block: &Path, dev: &Path, bound: std::time::Duration) {
    let Some(name) = dev.file_name() else {
        return;
    };
    let size = sys_block.join(name).join("size");
    let deadline = std::time::Instant::now() + bound;
    loop {
        let sectors = fs::read_to_string(&size)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if sectors > 0 || std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The disk whose virtio-blk serial (`/sys/block/*/serial`) is `serial`.
fn find_by_serial(sys_block: &Path, serial: &str) -> Result<PathBuf, RootfsError> {
    if serial.is_empty() {
        return Err(RootfsError::NoSuchSerial(serial.into()));
    }
    let entries = fs::read_dir(sys_block).map_err(io_err(sys_block))?;
    for entry in entries.flatten() {
        let Ok(found) = fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        if found.trim_end_matches(['\n', '\0']) == serial {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(RootfsError::NoSuchSerial(serial.into()))
}

// From <linux/loop.h>; the libc crate does not carry them.
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

fn attach_loop(file: &Path, writable: bool) -> Result<Device, RootfsError> {
    let loop_err = |source| RootfsError::Loop {
        path: file.to_path_buf(),
        source,
    };
    // The loop device is read-only exactly when its backing file is.
    let backing = fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(file)
        .map_err(loop_err)?;
    let control = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(loop_err)?;
    // Another process may take the free device first: try again then.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device
        // number or -1; `control` is an open loop-control descriptor.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(loop_err(std::io::Error::last_os_error()));
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let device = fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&dev)
            .map_err(loop_err)?;
        // SAFETY: LOOP_SET_FD takes the backing file's descriptor by value;
        // both descriptors are open for the duration of the call.
        if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_FD, backing.as_raw_fd()) } < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EBUSY) {
                continue;
            }
            return Err(loop_err(err));
        }
        let info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR | if writable { 0 } else { LO_FLAGS_READ_ONLY },
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        // SAFETY: LOOP_SET_STATUS64 reads a loop_info64 that lives across
        // the call.
        if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_STATUS64, &info) } < 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: LOOP_CLR_FD takes no argument; undoes LOOP_SET_FD.
            unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD, 0) };
            return Err(loop_err(err));
        }
        return Ok(Device {
            path: dev,
            _hold: Some(device),
        });
    }
    Err(loop_err(std::io::Error::other(
        "no free loop device after 16 tries",
    )))
}

/// Mounts the rootfs for `spec` under `dir`.
pub fn mount_rootfs(dir: &Path, spec: &Rootfs) -> Result<Mounted, RootfsError> {
    let fstype = match spec.fstype.as_str() {
        "" | "erofs" => "erofs",
        "ext4" => "ext4",
        other => return Err(RootfsError::BadFsType(other.into())),
    };
    let device = resolve_source(&spec.source)?;
    let image = dir.join("image");
    let rootfs = dir.join("bundle/rootfs");
    for d in [&image, &rootfs] {
        fs::create_dir_all(d).map_err(io_err(d))?;
    }
    mount(
        Some(&device.path),
        &image,
        Some(fstype),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(mount_err("the image", &image))?;
    if spec.readonly {
        if let Err(e) = mount(
            Some(&image),
            &rootfs,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            let _ = umount2(&image, MntFlags::MNT_DETACH);
            return Err(mount_err("the read-only root", &rootfs)(e));
        }
        return Ok(Mounted {
            image,
            rw: None,
            rootfs,
            baseline: (0, 0),
        });
    }
    let rw = dir.join("rw");
    let result = (|| {
        fs::create_dir_all(&rw).map_err(io_err(&rw))?;
        if spec.scratch_source.is_empty() {
            let size = if spec.writable_bytes == 0 {
                DEFAULT_WRITABLE_BYTES
            } else {
                spec.writable_bytes
            };
            mount(
                Some("tmpfs"),
                &rw,
                Some("tmpfs"),
                MsFlags::MS_NODEV,
                Some(format!("size={size},mode=0755").as_str()),
            )
            .map_err(mount_err("the writable layer", &rw))?;
        } else {
            let scratch = resolve(&spec.scratch_source, true)?;
            mount(
                Some(&scratch.path),
                &rw,
                Some("ext4"),
                MsFlags::MS_NODEV,
                None::<&str>,
            )
            .map_err(mount_err("the scratch disk", &rw))?;
            // A scratch disk reused from an earlier container starts clean.
            for sub in ["upper", "work"] {
                let _ = fs::remove_dir_all(rw.join(sub));
            }
        }
        for sub in ["upper", "work"] {
            fs::create_dir(rw.join(sub)).map_err(io_err(&rw))?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            image.display(),
            rw.join("upper").display(),
            rw.join("work").display()
        );
        mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(mount_err("the overlay", &rootfs))
    })();
    let baseline = if result.is_ok() {
        writable_usage(&rw)
    } else {
        (0, 0)
    };
    let mounted = Mounted {
        image,
        rw: Some(rw),
        rootfs,
        baseline,
    };
    if let Err(e) = result {
        mounted.unmount();
        return Err(e);
    }
    Ok(mounted)
}

impl Mounted {
    /// Unmounts in reverse order; lazily, so a straggling process cannot
    /// keep the agent from cleaning up. The loop device, if any, frees
    /// itself (autoclear) once the image is unmounted.
    pub fn unmount(&self) {
        for target in [Some(&self.rootfs), self.rw.as_ref(), Some(&self.image)]
            .into_iter()
            .flatten()
        {
            let _ = umount2(target, MntFlags::MNT_DETACH);
        }
    }
}

/// Bytes and inodes used in the writable layer's filesystem (the
/// container's share is this less [`Mounted::baseline`]).
pub fn writable_usage(rw: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(rw) {
        Ok(s) => {
            let bytes = (s.blocks() - s.blocks_free()) * s.fragment_size();
            let inodes = s.files() - s.files_free();
            (bytes, inodes)
        }
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hot_plugged_disk_is_waited_for_until_it_has_a_size() {
        let sys = tempfile::tempdir().unwrap();
        fs::create_dir(sys.path().join("vdb")).unwrap();
        fs::write(sys.path().join("vdb/size"), "0\n").unwrap();
        let size = sys.path().join("vdb/size");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            fs::write(size, "3920\n").unwrap();
        });
        let start = std::time::Instant::now();
        wait_for_capacity(
            sys.path(),
            Path::new("/dev/vdb"),
            std::time::Duration::from_secs(5),
        );
        writer.join().unwrap();
        let waited = start.elapsed();
        assert!(waited >= std::time::Duration::from_millis(50), "{waited:?}");
        assert_eq!(
            fs::read_to_string(sys.path().join("vdb/size")).unwrap(),
            "3920\n"
        );
        // A disk that stays empty ends the wait at the bound.
        fs::create_dir(sys.path().join("vdc")).unwrap();
        fs::write(sys.path().join("vdc/size"), "0\n").unwrap();
        wait_for_capacity(
            sys.path(),
            Path::new("/dev/vdc"),
            std::time::Duration::from_millis(30),
        );
    }

    #[test]
    fn disks_are_found_by_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (dev, serial) in [("vda", "boot\n"), ("vdb", "image-3"), ("vdc", "")] {
            fs::create_dir(sys.path().join(dev)).unwrap();
            fs::write(sys.path().join(dev).join("serial"), serial).unwrap();
        }
        fs::create_dir(sys.path().join("loop0")).unwrap(); // no serial file
        assert_eq!(
            find_by_serial(sys.path(), "image-3").unwrap(),
            Path::new("/dev/vdb")
        );
        assert_eq!(
            find_by_serial(sys.path(), "boot").unwrap(),
            Path::new("/dev/vda")
        );
        assert!(matches!(
            find_by_serial(sys.path(), "nope"),
            Err(RootfsError::NoSuchSerial(_))
        ));
        assert!(matches!(
            find_by_serial(sys.path(), ""),
            Err(RootfsError::NoSuchSerial(_))
        ));
    }

    #[test]
    fn bad_sources_and_types_are_refused() {
        assert!(matches!(
            resolve_source("relative/path"),
            Err(RootfsError::BadSource(_))
        ));
        assert!(matches!(
            resolve_source("/nonexistent/image.erofs"),
            Err(RootfsError::BadSource(_))
        ));
        assert!(matches!(
            resolve_source("/"),
            Err(RootfsError::BadSource(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let spec = Rootfs {
            source: "/dev/null".into(),
            fstype: "nfs".into(),
            ..Default::default()
        };
        assert!(matches!(
            mount_rootfs(dir.path(), &spec),
            Err(RootfsError::BadFsType(_))
        ));
    }
}
