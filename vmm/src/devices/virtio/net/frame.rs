//! Frames between virtqueue chains and host buffers.

use vm_memory::GuestMemoryMmap;

use super::{FrameError, MAX_FRAME, VNET_HDR_SIZE};
use crate::devices::virtio::chain::DescChain;

/// Copies a tx chain's frame into `out` behind a zeroed header (the guest's
/// header is skipped, never trusted). Returns the bytes to hand to the tap.
pub fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: &DescChain,
    out: &mut Vec<u8>,
) -> Result<usize, FrameError> {
    if !chain.writable().is_empty() {
        return Err(FrameError::Writable);
    }
    let total = chain.readable_len();
    let frame_len = (total as usize)
        .checked_sub(VNET_HDR_SIZE)
        .ok_or(FrameError::Short(total))?;
    if frame_len > MAX_FRAME {
        return Err(FrameError::TooLong(total));
    }
    out.clear();
    out.resize(VNET_HDR_SIZE + frame_len, 0);
    let mut reader = chain.reader();
    reader.skip(VNET_HDR_SIZE).map_err(FrameError::Chain)?;
    reader
        .read_exact(mem, &mut out[VNET_HDR_SIZE..])
        .map_err(FrameError::Chain)?;
    Ok(out.len())
}

/// Writes a header + frame read from the tap into an rx chain, with
/// num_buffers = 1. Returns the bytes written, or `None` if it does not fit.
pub fn write_rx_frame(mem: &GuestMemoryMmap, chain: &DescChain, pkt: &mut [u8]) -> Option<u32> {
    if pkt.len() < VNET_HDR_SIZE || !chain.readable().is_empty() {
        return None;
    }
    if pkt.len() > chain.writable_len() as usize {
        return None;
    }
    // num_buffers is the last field of virtio_net_hdr_v1.
    pkt[10..12].copy_from_slice(&1u16.to_le_bytes());
    chain.writer().write_all(mem, pkt).ok()?;
    u32::try_from(pkt.len()).ok()
}
