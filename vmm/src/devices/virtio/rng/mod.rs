//! virtio-rng: guest entropy from the host's random source.

mod device;
mod event_handler;
pub mod metrics;
pub mod request;
#[cfg(test)]
pub(crate) mod test_utils;

use std::fs::File;
use std::io::{self, Read};

pub use device::Rng;

/// The one request queue.
pub const RNG_QUEUE: usize = 0;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request, so one request cannot stall the event loop.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// Errors of the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The host entropy source failed.
    #[error("cannot read host entropy")]
    Source(#[source] io::Error),
    /// Creating the device's EventFds failed.
    #[error("cannot create eventfd")]
    EventFd(#[source] io::Error),
}

/// Where the device's bytes come from.
pub trait EntropySource: Send {
    /// Fills `buf` completely.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

/// The host's `/dev/urandom`, opened once (so it keeps working inside a jail).
#[derive(Debug)]
pub struct Urandom(File);

impl Urandom {
    /// Opens `/dev/urandom`.
    pub fn open() -> Result<Self, RngError> {
        File::open("/dev/urandom")
            .map(Self)
            .map_err(RngError::Source)
    }
}

impl EntropySource for Urandom {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact(buf)
    }
}
