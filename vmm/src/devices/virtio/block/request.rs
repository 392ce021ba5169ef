//! Parsing a virtio-blk request chain.
//!
//! Layout: a 16-byte device-readable header (type, reserved, sector), then
//! data (device-readable for writes, device-writable for reads), then one
//! device-writable status byte, the last byte of the chain.

use vm_memory::{Address, ByteValued, GuestAddress, GuestMemoryMmap, Le32, Le64};

use super::{MAX_REQUEST_BYTES, RequestError, SECTOR_SIZE};
use crate::devices::virtio::chain::DescChain;

/// Request types (virtio 1.2 section 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Size of the request header.
pub const HEADER_SIZE: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RequestHeader {
    type_: Le32,
    _reserved: Le32,
    sector: Le64,
}

// SAFETY: RequestHeader is repr(C) with only little-endian integer fields,
// 16 bytes without padding; every bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Flush the write cache.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Anything else: answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

/// A parsed request; its header was copied out of guest memory once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request type.
    pub kind: RequestType,
    /// First sector.
    pub sector: u64,
    /// Bytes of data (readable for Out, writable for In/GetId).
    pub data_len: u32,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// Where the status byte of `chain` is: its last writable byte.
pub fn status_addr(chain: &DescChain) -> Option<GuestAddress> {
    let last = chain.writable().iter().rev().find(|b| b.len > 0)?;
    last.addr.checked_add(u64::from(last.len) - 1)
}

impl Request {
    /// Parses and bounds a request chain. Entry point for the fuzzer too.
    pub fn parse(mem: &GuestMemoryMmap, chain: &DescChain) -> Result<Self, RequestError> {
        let status_addr = status_addr(chain).ok_or(RequestError::NoStatus)?;
        if chain.readable_len() < HEADER_SIZE {
            return Err(RequestError::ShortHeader(chain.readable_len()));
        }
        let hdr: RequestHeader = chain.reader().read_obj(mem).map_err(RequestError::Chain)?;
        let type_ = u32::from(hdr.type_);
        let sector = u64::from(hdr.sector);
        let readable_data = chain.readable_len() - HEADER_SIZE;
        // The status byte is the last writable byte; the rest is data.
        let writable_data = chain.writable_len() - 1;
        let (kind, data_len) = match type_ {
            VIRTIO_BLK_T_IN => {
                if readable_data != 0 {
                    return Err(RequestError::Direction(type_));
                }
                (RequestType::In, writable_data)
            }
            VIRTIO_BLK_T_OUT => {
                if writable_data != 0 {
                    return Err(RequestError::Direction(type_));
                }
                (RequestType::Out, readable_data)
            }
            VIRTIO_BLK_T_FLUSH => (RequestType::Flush, 0),
            VIRTIO_BLK_T_GET_ID => (RequestType::GetId, writable_data),
            other => (RequestType::Unsupported(other), 0),
        };
        if data_len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(data_len));
        }
        if matches!(kind, RequestType::In | RequestType::Out)
            && u64::from(data_len) % SECTOR_SIZE != 0
        {
            return Err(RequestError::Unaligned(data_len));
        }
        Ok(Self {
            kind,
            sector,
            data_len,
            status_addr,
        })
    }

    /// Byte offset and length on the disk, if inside `capacity` bytes.
    pub fn disk_range(&self, capacity: u64) -> Option<(u64, u64)> {
        let offset = self.sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(u64::from(self.data_len))?;
        (end <= capacity).then_some((offset, u64::from(self.data_len)))
    }
}
