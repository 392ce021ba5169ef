//! virtio-blk slots whose backing file can change at run time.
//!
//! A VM gets a fixed number of block devices ("slots") at boot, so the
//! kernel command line never changes; each slot starts empty (capacity 0)
//! or with a file. The control socket attaches, replaces or detaches a
//! slot's file while the guest runs; the device then raises a config-change
//! interrupt and the guest re-reads the capacity.
//!
//! Read-only is a property of each attachment, not of the slot (the
//! VIRTIO_BLK_F_RO feature is fixed at driver probe), so it is enforced by
//! failing writes with VIRTIO_BLK_S_IOERR.

mod device;
mod event_handler;
pub mod metrics;
pub mod request;
#[cfg(test)]
mod test_utils;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use device::Block;
pub use request::{Request, RequestType};

use crate::devices::virtio::chain::ChainError;

/// Queue size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Largest segment the guest may use (advertised as size_max).
pub const SIZE_MAX: u32 = 64 * 1024;
/// Most data segments per request (advertised as seg_max; header and status take two).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest request accepted: what size_max × seg_max allows.
pub const MAX_REQUEST_BYTES: u32 = SIZE_MAX * SEG_MAX;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// A malformed block request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain is too short for the request header.
    #[error("request header missing ({0} readable bytes)")]
    ShortHeader(u32),
    /// There is no device-writable byte for the status.
    #[error("no status byte")]
    NoStatus,
    /// The data length is not a multiple of the sector size.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u32),
    /// The data is larger than [`MAX_REQUEST_BYTES`].
    #[error("request of {0} bytes over the limit")]
    TooLarge(u32),
    /// Data buffers point the wrong way for the request type.
    #[error("data buffers in the wrong direction for request type {0}")]
    Direction(u32),
    /// Reading the header failed.
    #[error("cannot read request header")]
    Chain(#[source] ChainError),
}

/// Errors of block slots and their backing files.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file could not be opened.
    #[error("cannot open backing file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating the device's EventFds failed.
    #[error("cannot create eventfd")]
    EventFd(#[source] io::Error),
    /// The slot has no file to detach.
    #[error("slot is empty")]
    Empty,
}

/// Storage behind a slot.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether the backend has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn flush(&self) -> io::Result<()>;
}

/// A regular file (or block device node) as a backend.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    len: u64,
    read_only: bool,
    path: PathBuf,
}

impl DiskFile {
    /// Opens `path`; read-only opens it O_RDONLY, so the host enforces it too.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        Self::from_file(file, path, read_only)
    }

    /// A disk on an open file (`path` names it in messages). A read-only
    /// disk is enforced here whatever the descriptor allows; a writable one
    /// needs a descriptor opened for writing.
    pub fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        if !read_only {
            // SAFETY: F_GETFL on a descriptor `file` owns; no memory passed.
            let flags =
                unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETFL) };
            if flags < 0 {
                return Err(err(io::Error::last_os_error()));
            }
            if flags & libc::O_ACCMODE == libc::O_RDONLY {
                return Err(err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "a writable disk needs a descriptor opened for writing",
                )));
            }
        }
        // Works for regular files and block devices alike.
        let len = {
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0)).map_err(err)?
        };
        Ok(Self {
            file,
            len,
            read_only,
            path: path.to_path_buf(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockBackend for DiskFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
