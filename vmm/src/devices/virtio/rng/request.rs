//! Parsing an entropy request: a chain of device-writable buffers.

use crate::devices::virtio::chain::DescChain;

use super::MAX_BYTES_PER_REQUEST;

/// How many bytes to write into `chain`: all of its writable space, capped
/// at [`MAX_BYTES_PER_REQUEST`]. Readable buffers carry nothing for this
/// device and are ignored.
pub fn request_len(chain: &DescChain) -> u32 {
    chain.writable_len().min(MAX_BYTES_PER_REQUEST)
}
