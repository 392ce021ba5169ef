//! virtio-vsock packets: the 44-byte header and its payload.
//!
//! A tx packet's header is copied out of guest memory once and every field
//! used afterwards comes from that copy; the payload length is checked
//! against both a hard bound and what the chain really holds before a byte
//! is copied.

use vm_memory::{ByteValued, GuestMemoryMmap, Le16, Le32, Le64};

use super::{MAX_PKT_DATA, PacketError};
use crate::devices::virtio::chain::DescChain;

/// Size of the packet header.
pub const HDR_SIZE: usize = 44;

const _: () = assert!(HDR_SIZE == virtio_vsock::packet::PKT_HEADER_SIZE);

/// The vsock packet header (virtio 1.2 section 5.10.6), little endian.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    src_cid: Le64,
    dst_cid: Le64,
    src_port: Le32,
    dst_port: Le32,
    len: Le32,
    type_: Le16,
    op: Le16,
    flags: Le32,
    buf_alloc: Le32,
    fwd_cnt: Le32,
}

const _: () = assert!(std::mem::size_of::<PacketHeader>() == HDR_SIZE);

// SAFETY: PacketHeader is repr(C, packed) and made only of little-endian
// integer wrappers, so every bit pattern is a valid value and it has no padding.
unsafe impl ByteValued for PacketHeader {}

macro_rules! field {
    ($get:ident, $set:ident, $f:ident, $t:ty) => {
        /// Field getter.
        pub fn $get(&self) -> $t {
            self.$f.into()
        }
        /// Field setter.
        pub fn $set(&mut self, v: $t) -> &mut Self {
            self.$f = v.into();
            self
        }
    };
}

impl PacketHeader {
    /// Whether the packet carries no payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    field!(src_cid, set_src_cid, src_cid, u64);
    field!(dst_cid, set_dst_cid, dst_cid, u64);
    field!(src_port, set_src_port, src_port, u32);
    field!(dst_port, set_dst_port, dst_port, u32);
    field!(len, set_len, len, u32);
    field!(type_, set_type, type_, u16);
    field!(op, set_op, op, u16);
    field!(flags, set_flags, flags, u32);
    field!(buf_alloc, set_buf_alloc, buf_alloc, u32);
    field!(fwd_cnt, set_fwd_cnt, fwd_cnt, u32);
}

/// A packet the guest transmitted, copied out of guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxPacket {
    /// The header (copied once).
    pub hdr: PacketHeader,
    /// The payload, `hdr.len()` bytes (at most [`MAX_PKT_DATA`]).
    pub data: Vec<u8>,
}

/// Parses a tx chain: header, then `len` payload bytes from the readable
/// buffers (Linux ≥ 6.2 may put both in one descriptor; the cursor does
/// not care). Entry point for the fuzzer as well.
pub fn parse_tx(mem: &GuestMemoryMmap, chain: &DescChain) -> Result<TxPacket, PacketError> {
    if !chain.writable().is_empty() {
        return Err(PacketError::WritableTxBuffer);
    }
    let mut reader = chain.reader();
    if reader.remaining() < HDR_SIZE {
        return Err(PacketError::ShortHeader(reader.remaining()));
    }
    let hdr: PacketHeader = reader.read_obj(mem).map_err(PacketError::Chain)?;
    let len = hdr.len();
    if len > MAX_PKT_DATA {
        return Err(PacketError::TooLong(len));
    }
    if (len as usize) > reader.remaining() {
        return Err(PacketError::ShortData {
            declared: len,
            present: reader.remaining(),
        });
    }
    let mut data = vec![0u8; len as usize];
    reader
        .read_exact(mem, &mut data)
        .map_err(PacketError::Chain)?;
    Ok(TxPacket { hdr, data })
}

/// Payload room in an rx chain, after the header; `Err` if not even a header fits.
pub fn rx_capacity(chain: &DescChain) -> Result<usize, PacketError> {
    if !chain.readable().is_empty() {
        return Err(PacketError::ReadableRxBuffer);
    }
    let total = chain.writable_len() as usize;
    if total < HDR_SIZE {
        return Err(PacketError::ShortHeader(total));
    }
    Ok((total - HDR_SIZE).min(MAX_PKT_DATA as usize))
}

/// Writes a packet into an rx chain; returns the bytes written.
pub fn write_rx(
    mem: &GuestMemoryMmap,
    chain: &DescChain,
    hdr: &PacketHeader,
    data: &[u8],
) -> Result<u32, PacketError> {
    let mut writer = chain.writer();
    writer
        .write_all(mem, hdr.as_slice())
        .map_err(PacketError::Chain)?;
    writer.write_all(mem, data).map_err(PacketError::Chain)?;
    // Bounded by the chain's writable length, a u32.
    Ok(u32::try_from(writer.consumed()).unwrap_or(u32::MAX))
}
