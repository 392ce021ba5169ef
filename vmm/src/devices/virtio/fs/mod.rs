//! virtio-fs (virtio 1.2 section 5.11) as a vhost-user frontend.
//!
//! The VMM does not serve FUSE: a separate `virtiofsd` does, on its own
//! threads, straight out of guest memory (which must be shared, see
//! [`crate::machine::guest_memory`]). This device only
//!
//! - shows the guest the config space (tag, one request queue) and the
//!   features both sides support;
//! - on DRIVER_OK tells the backend where the rings are and hands it the
//!   transport's queue-notify eventfds as its kick fds ([`vhost_user`]);
//! - turns the backend's "call" eventfds into the guest's interrupt
//!   (InterruptStatus |= VRING, then the irqfd), in the event loop;
//! - reports NEEDS_RESET when the backend fails or goes away.
//!
//! ```text
//!   built: connected, SET_OWNER, features, SET_MEM_TABLE (replies awaited, with a deadline)
//!     │ DRIVER_OK
//!     ▼
//!   running: SET_FEATURES, SET_VRING_* per queue, SET_VRING_ENABLE 1, barrier
//!     │ driver writes status 0            │ backend hangs up / start fails
//!     ▼                                   ▼
//!   stopped: SET_VRING_ENABLE 0, barrier   NEEDS_RESET (for good if it hung up)
//! ```
//!
//! At run time (from the vCPU thread that writes the status register) the
//! device sends after checking that the socket has room, and waits for the
//! backend at most [`vhost_user::BARRIER_TIMEOUT`], so a stuck backend
//! cannot stall a vCPU for long.

mod device;
mod event_handler;
pub mod metrics;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vhost_user;

use std::os::fd::BorrowedFd;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use device::Fs;
pub use vhost_user::VhostUserFs;

/// The high-priority queue (FUSE_INTERRUPT, FORGET).
pub const HIPRIO_QUEUE: usize = 0;
/// The one request queue.
pub const REQUEST_QUEUE: usize = 1;
/// hiprio + one request queue.
pub const NUM_QUEUES: usize = 2;
/// The `num_request_queues` the config space announces.
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Size of the tag field of the config space.
pub const TAG_LEN: usize = crate::config::MAX_FS_TAG_LEN;
/// Config space: the tag, then `num_request_queues` (le32).
pub const CONFIG_SPACE_LEN: usize = TAG_LEN + 4;

/// Errors of the virtio-fs device and its vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag does not fit the config space.
    #[error("tag {0:?} is not 1..={TAG_LEN} bytes")]
    Tag(String),
    /// Connecting to the backend's socket failed.
    #[error("connecting to the vhost-user backend at {path}")]
    Connect {
        /// The socket.
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed or its reply was malformed.
    #[error("vhost-user {step} failed")]
    Protocol {
        /// The request.
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    /// The backend did not finish the handshake in time.
    #[error("the vhost-user backend did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The backend lacks a feature the device relies on.
    #[error("the vhost-user backend lacks {what} (it offers {features:#x})")]
    BackendFeatures {
        /// The missing feature.
        what: &'static str,
        /// What the backend offered.
        features: u64,
    },
    /// The backend serves fewer queues than the device has.
    #[error("the vhost-user backend has {0} queues, the device needs {NUM_QUEUES}")]
    QueueNum(u64),
    /// Guest RAM is not backed by file descriptors the backend could map.
    #[error("guest memory is not shared (memfd-backed); a vhost-user device needs shared_memory")]
    MemoryNotShared,
    /// A ring address is not in guest memory.
    #[error("queue {0}: ring address outside guest memory")]
    RingAddress(usize),
    /// The backend is not reading its socket (or it is gone): sending could block.
    #[error("the vhost-user backend is not reading its socket")]
    BackendStalled,
    /// The backend closed its socket or it failed.
    #[error("the vhost-user backend disconnected")]
    Disconnected,
    /// The backend sent something other than the reply the device waited for.
    #[error("the vhost-user backend sent an unexpected message")]
    UnexpectedReply,
    /// An EventFd or socket operation failed.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
}

/// Where one queue lives in guest memory, as the driver set it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    /// Queue size.
    pub size: u16,
    /// Largest size the device offered.
    pub max_size: u16,
    /// Descriptor table (guest-physical).
    pub desc: u64,
    /// Available ring (guest-physical).
    pub avail: u64,
    /// Used ring (guest-physical).
    pub used: u64,
    /// The next available index the backend starts from.
    pub next_avail: u16,
}

/// What serves the device's queues: a vhost-user backend in production, a
/// fake in tests (so the device logic is tested without virtiofsd).
pub trait FsBackend: Send {
    /// Virtio feature bits the backend supports.
    fn features(&self) -> u64;
    /// Starts serving `queues`: the backend reads `kicks[i]` for queue i's
    /// notifications and writes `calls[i]` when it used buffers.
    fn start(
        &mut self,
        features: u64,
        mem: &GuestMemoryMmap,
        queues: &[QueueInfo],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), FsError>;
    /// Stops serving the first `queues` queues (device reset).
    fn stop(&mut self, queues: usize) -> Result<(), FsError>;
    /// An fd that hangs up when the backend goes away (its socket);
    /// watched by the event loop.
    fn watch_fd(&self) -> Option<BorrowedFd<'_>>;
}

/// The config space of a device with `tag` (virtio 1.2 section 5.11.4): the
/// tag NUL-padded to 36 bytes (not NUL-terminated when it is 36 bytes long),
/// then `num_request_queues` little-endian.
pub fn config_space(tag: &str) -> Result<[u8; CONFIG_SPACE_LEN], FsError> {
    let bytes = tag.as_bytes();
    if bytes.is_empty() || bytes.len() > TAG_LEN {
        return Err(FsError::Tag(tag.to_string()));
    }
    let mut config = [0u8; CONFIG_SPACE_LEN];
    config[..bytes.len()].copy_from_slice(bytes);
    config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_padded_tag_then_le32_queue_count() {
        let c = config_space("vmpod").unwrap();
        assert_eq!(c.len(), 40);
        assert_eq!(&c[..5], b"vmpod");
        assert!(c[5..36].iter().all(|&b| b == 0));
        assert_eq!(&c[36..], &[1, 0, 0, 0]);
        // A full-length tag fills the field with no terminator.
        let long = "t".repeat(36);
        let c = config_space(&long).unwrap();
        assert_eq!(&c[..36], long.as_bytes());
        assert_eq!(u32::from_le_bytes(c[36..].try_into().unwrap()), 1);
        assert!(config_space("").is_err());
        assert!(config_space(&"t".repeat(37)).is_err());
    }
}
