//! virtio-vsock with the Firecracker-style hybrid backend.
//!
//! The host side is one unix socket (`uds_path`). A host client connects,
//! writes `CONNECT <port>\n` and reads `OK <host port>\n`; from then on the
//! stream is a raw connection to the guest listener on `<port>`. A guest
//! connecting to host port P reaches whatever listens on `<uds_path>_P`.
//!
//! ```text
//!  guest driver ──tx queue──▶ Vsock ──send_pkt──▶ HybridMuxer ──▶ Connection ──▶ unix stream
//!  guest driver ◀─rx queue─── Vsock ◀─recv_pkt─── HybridMuxer ◀── Connection ◀── unix stream
//! ```
//!
//! Flow control is the virtio credit scheme in both directions: the muxer
//! never sends the guest more than `buf_alloc - (tx_cnt - fwd_cnt)` of the
//! guest's last advertised credit, and resets a guest that overruns the
//! credit the muxer advertised.

pub mod connection;
mod device;
mod event_handler;
pub mod metrics;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod test_utils;

use std::io;

pub use device::Vsock;
pub use muxer::HybridMuxer;
pub use packet::{PacketHeader, TxPacket};

use crate::devices::virtio::chain::ChainError;

/// Queue indices.
pub const RXQ: usize = 0;
/// Guest → host packets.
pub const TXQ: usize = 1;
/// Transport events (unused by this device; buffers are left alone).
pub const EVQ: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Largest payload of one packet (the Linux driver's maximum).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Host→guest buffer per connection; also the credit advertised to the guest.
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Most simultaneous connections (including host handshakes in progress).
pub const MAX_CONNECTIONS: usize = 256;
/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_HANDSHAKE_LEN: usize = 32;
/// How long a host client may take to send its `CONNECT` line, and the
/// guest to answer a connection request.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Socket type: stream.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or torn down.
    pub const RST: u16 = 3;
    /// Orderly shutdown (flags say which direction).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit announcement.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A malformed packet.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain is too short for a header.
    #[error("chain holds {0} bytes, less than a packet header")]
    ShortHeader(usize),
    /// The header declares a payload over [`MAX_PKT_DATA`].
    #[error("payload length {0} over the limit")]
    TooLong(u32),
    /// The header declares more payload than the chain holds.
    #[error("header declares {declared} payload bytes, chain holds {present}")]
    ShortData {
        /// Declared length.
        declared: u32,
        /// Bytes present.
        present: usize,
    },
    /// A tx chain has device-writable buffers.
    #[error("tx chain has a device-writable buffer")]
    WritableTxBuffer,
    /// An rx chain has device-readable buffers.
    #[error("rx chain has a device-readable buffer")]
    ReadableRxBuffer,
    /// Copying from or to the chain failed.
    #[error("chain access failed")]
    Chain(#[source] ChainError),
}

/// Errors of the vsock device and its backend.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Binding the host unix socket failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An epoll, timerfd or eventfd operation failed.
    #[error("cannot set up vsock event sources")]
    Events(#[source] io::Error),
    /// The guest CID is reserved.
    #[error("guest CID {0} is reserved (must be > 2)")]
    Cid(u64),
}

/// Where the device sends guest packets and gets packets for the guest.
pub trait VsockBackend: Send + std::os::fd::AsRawFd {
    /// Handles a packet from the guest.
    fn send_pkt(&mut self, pkt: TxPacket);
    /// Produces the next packet for the guest, payload into `data`;
    /// returns its header and payload length.
    fn recv_pkt(&mut self, data: &mut [u8]) -> Option<(PacketHeader, usize)>;
    /// Whether `recv_pkt` may have something.
    fn has_pending_rx(&self) -> bool;
    /// The backend's fd (see `AsRawFd`) is readable: do the host-side I/O.
    fn notify(&mut self);
    /// Drops every connection (device reset).
    fn reset(&mut self);
}
