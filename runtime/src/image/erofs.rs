//! Read-only erofs images of unpacked root filesystems, built with
//! `mkfs.erofs` (Debian erofs-utils). One per image, shared by every pod:
//! the VM gets it as a block device, the host backend as a loop device.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// The program that builds the images.
pub const MKFS_EROFS: &str = "mkfs.erofs";
const MAX_STDERR: u64 = 16 * 1024;

/// Why an erofs image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    /// `mkfs.erofs` could not be started.
    #[error("running {MKFS_EROFS} (install Debian's erofs-utils)")]
    Spawn(#[source] std::io::Error),
    /// `mkfs.erofs` failed.
    #[error("{MKFS_EROFS} failed ({status}): {stderr}")]
    Failed {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// `mkfs.erofs` did not finish in time (it was killed).
    #[error("{MKFS_EROFS} did not finish within {0:?}")]
    Timeout(Duration),
    /// Creating or moving the output failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Builds `out` from the directory `src`; `out` appears only complete.
/// Returns its size in bytes. Dropping the future kills `mkfs.erofs` and
/// removes the partial output.
pub async fn build(src: &Path, out: &Path, timeout: Duration) -> Result<u64, ErofsError> {
    let dir = out.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|source| ErofsError::Io {
            op: "creating in",
            path: dir.to_path_buf(),
            source,
        })?
        .into_temp_path();
    let mut child = tokio::process::Command::new(MKFS_EROFS)
        .arg("--quiet")
        .arg(&*tmp)
        .arg(src)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(ErofsError::Spawn)?;
    let mut stderr = String::new();
    let status = tokio::time::timeout(timeout, async {
        if let Some(err) = child.stderr.take() {
            let _ = err.take(MAX_STDERR).read_to_string(&mut stderr).await;
        }
        child.wait().await
    })
    .await
    .map_err(|_| ErofsError::Timeout(timeout))?
    .map_err(ErofsError::Spawn)?;
    if !status.success() {
        return Err(ErofsError::Failed {
            status,
            stderr: stderr.trim().to_string(),
        });
    }
    let size = std::fs::metadata(&*tmp)
        .map_err(|source| ErofsError::Io {
            op: "inspecting",
            path: tmp.to_path_buf(),
            source,
        })?
        .len();
    // Read-only for everyone: the VMM (possibly jailed as another user) opens it.
    std::fs::set_permissions(&*tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644)).map_err(
        |source| ErofsError::Io {
            op: "changing mode of",
            path: tmp.to_path_buf(),
            source,
        },
    )?;
    tmp.persist(out).map_err(|e| ErofsError::Io {
        op: "renaming to",
        path: out.to_path_buf(),
        source: e.error,
    })?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builds_an_erofs_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello"), b"world").unwrap();
        let out = dir.path().join("img.erofs");
        let size = build(&src, &out, Duration::from_secs(60)).await.unwrap();
        let data = std::fs::read(&out).unwrap();
        assert_eq!(data.len() as u64, size);
        // EROFS_SUPER_MAGIC_V1 at byte 1024, little endian.
        assert_eq!(&data[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
        // A failed build leaves nothing behind.
        let err = build(
            &dir.path().join("missing"),
            &dir.path().join("x.erofs"),
            Duration::from_secs(60),
        )
        .await;
        assert!(err.is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
