//! virtio-net on a host tap device (one rx and one tx queue).
//!
//! No offloads are negotiated, so every frame is a plain Ethernet frame
//! behind a 12-byte `virtio_net_hdr_v1`. The guest's tx header is never
//! passed to the host kernel: a zeroed one is written instead, so a hostile
//! guest cannot feed crafted GSO metadata to the tap driver.

mod device;
mod event_handler;
pub mod frame;
pub mod metrics;
pub mod tap;
#[cfg(test)]
mod test_utils;

use std::io;

pub use device::Net;
pub use tap::Tap;

/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1` (VIRTIO_F_VERSION_1 always includes num_buffers).
pub const VNET_HDR_SIZE: usize = 12;
/// Largest Ethernet frame without offloads, with headroom for VLAN tags;
/// anything bigger from the guest is dropped.
pub const MAX_FRAME: usize = 65_535;

/// Errors of the net device and its tap.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap name is empty or too long.
    #[error("invalid tap name {0:?}")]
    TapName(String),
    /// Opening or configuring the tap failed.
    #[error("cannot open tap {name}")]
    Tap {
        /// The tap's name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating the device's EventFds failed.
    #[error("cannot create eventfd")]
    EventFd(#[source] io::Error),
}

/// A malformed frame from the guest.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The chain is shorter than the virtio-net header.
    #[error("tx chain of {0} bytes has no room for a header")]
    Short(u32),
    /// The frame exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes over the limit")]
    TooLong(u32),
    /// The chain has device-writable buffers.
    #[error("tx chain has a device-writable buffer")]
    Writable,
    /// Copying from the chain failed.
    #[error("chain access failed")]
    Chain(#[source] crate::devices::virtio::chain::ChainError),
}

/// The host end of the guest's network interface.
pub trait NetBackend: Send + std::os::fd::AsRawFd {
    /// Reads one `virtio_net_hdr_v1` + frame; `WouldBlock` when none is queued.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one `virtio_net_hdr_v1` + frame.
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize>;
}
