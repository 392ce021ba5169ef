//! Containers' writable layers on disk.
//!
//! A container of a handler with `writable_layer = "disk"` gets a sparse
//! file of `writable_layer_mib` in its sandbox dir, formatted ext4 here;
//! the agent loop-mounts it under the overlay's upper and work dirs (a host
//! pod's agent from the node's path, a QEMU pod's from the virtio-fs share).
//! Only what the container writes takes space on the node, and none of it
//! guest RAM. The file goes with the container (RemoveContainer) or with
//! the sandbox dir.
//!
//! ```text
//! <sandbox dir>/scratch/<container id>.ext4
//! ```

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SandboxError;

/// How long mkfs.ext4 gets (it takes tens of milliseconds on a sparse file).
const MKFS_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory of a sandbox's writable-layer files.
pub fn dir(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join("scratch")
}

/// The writable-layer file of a container.
pub fn path(sandbox_dir: &Path, container_id: &str) -> PathBuf {
    dir(sandbox_dir).join(format!("{container_id}.ext4"))
}

/// Creates a sparse file of `bytes` at `path` and formats it ext4 with
/// no journal (the layer dies with its container) and no reserved blocks.
/// On error no file is left.
pub async fn create(path: &Path, bytes: u64) -> Result<(), SandboxError> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| io_err("creating the directory of", path, e))?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err("creating", path, e))?;
    let result = format(file, path, bytes).await;
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> SandboxError {
    SandboxError::Failed(format!("{what} {}: {e}", path.display()))
}

async fn format(file: std::fs::File, path: &Path, bytes: u64) -> Result<(), SandboxError> {
    file.set_len(bytes).map_err(|e| io_err("sizing", path, e))?;
    drop(file);
    // mke2fs punches the file's blocks (it is sparse already), so it marks
    // the inode tables zeroed and the kernel never writes them out.
    let mut cmd = tokio::process::Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
        .args(["-E", "lazy_itable_init=1", "-L", "vmpod-layer"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| {
        SandboxError::Failed(format!(
            "running mkfs.ext4 (Debian's e2fsprogs) for {}: {e}",
            path.display()
        ))
    })?;
    let out = tokio::time::timeout(MKFS_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            SandboxError::Failed(format!(
                "mkfs.ext4 of {} took longer than {MKFS_TIMEOUT:?}",
                path.display()
            ))
        })?
        .map_err(|e| io_err("formatting", path, e))?;
    if !out.status.success() {
        let err = &out.stderr[out.stderr.len().saturating_sub(512)..];
        return Err(SandboxError::Failed(format!(
            "mkfs.ext4 of {} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(err).trim()
        )));
    }
    Ok(())
}

/// Removes a container's writable-layer file. Idempotent.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What the writable-layer files of the node take on its disk: bytes
/// allocated (sparse files count only what was written) and file count.
pub fn usage(files: impl IntoIterator<Item = PathBuf>) -> (u64, u64) {
    files
        .into_iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .fold((0, 0), |(bytes, n), m| (bytes + m.blocks() * 512, n + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[tokio::test]
    async fn a_layer_is_a_sparse_ext4_file_and_goes_away() {
        let tmp = tempfile::tempdir().unwrap();
        let file = path(tmp.path(), "c1");
        create(&file, 1 << 30).await.unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        // Sparse: a few MiB of metadata, not the size.
        let (bytes, n) = usage([file.clone()]);
        assert_eq!(n, 1);
        assert!(bytes < 16 << 20, "{bytes} bytes allocated");
        // ext4's magic at 1024 + 0x38.
        let mut magic = [0u8; 2];
        std::fs::File::open(&file)
            .unwrap()
            .read_exact_at(&mut magic, 1024 + 0x38)
            .unwrap();
        assert_eq!(magic, [0x53, 0xef]);
        // Never over an existing file.
        assert!(create(&file, 1 << 20).await.is_err());
        assert!(file.exists(), "a failed create removed someone else's file");
        remove(&file).unwrap();
        remove(&file).unwrap();
        assert_eq!(usage([file]), (0, 0));
    }

    #[tokio::test]
    async fn a_failed_format_leaves_no_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = path(tmp.path(), "tiny");
        // 4 KiB is too small for ext4.
        assert!(create(&file, 4096).await.is_err());
        assert!(!file.exists());
    }
}
