//! The pod's virtio-fs share, guest side.
//!
//! A pod VM on the `qemu` hypervisor gets one virtio-fs device (tag
//! [`vmpod_proto::SHARED_FS_TAG`]) whose host side is a virtiofsd serving
//! the daemon's per-pod share: the container volumes and the image files
//! the daemon bind-mounted there, nothing else. The agent mounts it once at
//! boot on [`MOUNT_POINT`]; requests name things in it as
//! `shared:<relative path>` ([`vmpod_proto::SHARED_SOURCE_PREFIX`]), which
//! [`map_sources`] turns into paths under the mount point. A guest without
//! the device (our own VMM today, a host-mode agent) simply has no share,
//! and such sources fail with FailedPrecondition.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::mount::{MsFlags, mount};
use vmpod_proto::v1::CreateContainerRequest;
use vmpod_proto::{SHARED_FS_TAG, SHARED_SOURCE_PREFIX};

/// Where the guest mounts the share.
pub const MOUNT_POINT: &str = "/run/vmpod/shared";

/// Set once the share is mounted.
static MOUNTED: AtomicBool = AtomicBool::new(false);

/// Errors of the share.
#[derive(Debug, thiserror::Error)]
pub enum SharedFsError {
    #[error("creating {MOUNT_POINT}")]
    Create(#[source] std::io::Error),
    #[error("mounting virtio-fs tag {SHARED_FS_TAG:?} on {MOUNT_POINT}")]
    Mount(#[source] nix::Error),
    #[error("source {0:?} must be shared:<relative path> without '..'")]
    BadSource(String),
    #[error("source {0:?} names the pod's shared file system, which this guest does not have")]
    NoShare(String),
}

/// Mounts the share if the VM has it. Ok(false): no virtio-fs device with
/// our tag (the kernel answers EINVAL for an unknown tag, ENODEV without
/// the driver), which is a normal VM without volumes support.
pub fn mount_at_boot() -> Result<bool, SharedFsError> {
    std::fs::create_dir_all(MOUNT_POINT).map_err(SharedFsError::Create)?;
    // nodev: device nodes in a host directory are the host's, not the
    // guest's to open. nosuid: set-id bits on host files grant nothing here.
    match mount(
        Some(SHARED_FS_TAG),
        MOUNT_POINT,
        Some("virtiofs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    ) {
        Ok(()) => {
            MOUNTED.store(true, Ordering::SeqCst);
            Ok(true)
        }
        Err(nix::Error::EINVAL | nix::Error::ENODEV) => Ok(false),
        Err(e) => Err(SharedFsError::Mount(e)),
    }
}

/// The guest path of a `shared:` source under `mount_point`; None for any
/// other source.
fn resolve_in(source: &str, mount_point: &Path) -> Result<Option<PathBuf>, SharedFsError> {
    let Some(rel) = source.strip_prefix(SHARED_SOURCE_PREFIX) else {
        return Ok(None);
    };
    let rel = Path::new(rel);
    let plain = rel.components().next().is_some()
        && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(SharedFsError::BadSource(source.into()));
    }
    Ok(Some(mount_point.join(rel)))
}

/// Rewrites the `shared:` sources of a CreateContainer request (rootfs,
/// scratch disk, bind mounts) into paths in the mounted share.
pub fn map_sources(req: &mut CreateContainerRequest) -> Result<(), SharedFsError> {
    map_sources_in(req, Path::new(MOUNT_POINT), MOUNTED.load(Ordering::SeqCst))
}

fn map_sources_in(
    req: &mut CreateContainerRequest,
    mount_point: &Path,
    mounted: bool,
) -> Result<(), SharedFsError> {
    let map = |source: &mut String| -> Result<(), SharedFsError> {
        if let Some(path) = resolve_in(source, mount_point)? {
            if !mounted {
                return Err(SharedFsError::NoShare(source.clone()));
            }
            *source = path.display().to_string();
        }
        Ok(())
    };
    if let Some(rootfs) = req.rootfs.as_mut() {
        map(&mut rootfs.source)?;
        map(&mut rootfs.scratch_source)?;
    }
    for m in req.mounts.iter_mut().filter(|m| m.r#type != "tmpfs") {
        map(&mut m.source)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmpod_proto::v1::{Mount, Rootfs};

    fn request(rootfs: &str, mount: &str) -> CreateContainerRequest {
        CreateContainerRequest {
            rootfs: Some(Rootfs {
                source: rootfs.into(),
                ..Default::default()
            }),
            mounts: vec![Mount {
                destination: "/data".into(),
                source: mount.into(),
                r#type: "bind".into(),
                options: vec![],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn shared_sources_map_into_the_mount_point() {
        let mut req = request("shared:c1/rootfs", "shared:c1/0");
        map_sources_in(&mut req, Path::new("/mnt/s"), true).unwrap();
        assert_eq!(req.rootfs.unwrap().source, "/mnt/s/c1/rootfs");
        assert_eq!(req.mounts[0].source, "/mnt/s/c1/0");
    }

    #[test]
    fn other_sources_stay_as_they_are() {
        let mut req = request("serial:img0", "/host/dir");
        map_sources_in(&mut req, Path::new("/mnt/s"), false).unwrap();
        assert_eq!(req.rootfs.unwrap().source, "serial:img0");
        assert_eq!(req.mounts[0].source, "/host/dir");
    }

    #[test]
    fn escaping_or_empty_shared_paths_are_refused() {
        for bad in [
            "shared:",
            "shared:/etc",
            "shared:../x",
            "shared:c1/../../x",
            "shared:./c1",
        ] {
            let mut req = request("serial:img0", bad);
            assert!(
                matches!(
                    map_sources_in(&mut req, Path::new("/mnt/s"), true),
                    Err(SharedFsError::BadSource(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn shared_sources_without_a_share_are_refused() {
        let mut req = request("serial:img0", "shared:c1/0");
        assert!(matches!(
            map_sources_in(&mut req, Path::new("/mnt/s"), false),
            Err(SharedFsError::NoShare(_))
        ));
    }
}
