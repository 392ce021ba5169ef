//! Validated virtqueue descriptor chains.
//!
//! The guest writes the descriptor table; everything in it is hostile. A
//! chain is walked exactly once, here, and every descriptor is checked
//! before a device touches the buffer it names:
//!
//! - indices inside the table, and at most `queue_size` descriptors (a TTL,
//!   so a `next` loop ends);
//! - no indirect descriptors (the transport never offers them);
//! - every buffer entirely inside guest RAM, with checked address arithmetic;
//! - device-readable buffers strictly before device-writable ones;
//! - byte totals with checked arithmetic.
//!
//! Devices then read and write through [`ChainCursor`], which never leaves
//! the validated buffers.

use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Size of one split-ring descriptor in the table.
pub const DESCRIPTOR_SIZE: u64 = 16;

/// A malformed descriptor chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index is outside the table.
    #[error("descriptor index {index} outside a table of {queue_size}")]
    IndexOutOfRange {
        /// The offending index.
        index: u16,
        /// Size of the table.
        queue_size: u16,
    },
    /// The chain has more descriptors than the table (a loop).
    #[error("descriptor chain longer than the queue (loop?)")]
    TooLong,
    /// The chain uses an indirect table, which was not negotiated.
    #[error("indirect descriptor not negotiated")]
    Indirect,
    /// A buffer lies (partly) outside guest RAM.
    #[error("buffer {addr:#x}+{len:#x} outside guest memory")]
    OutOfGuestMemory {
        /// Guest-physical start.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The byte totals overflow.
    #[error("descriptor chain length overflows")]
    LengthOverflow,
    /// The descriptor table itself could not be read.
    #[error("cannot read descriptor {index}")]
    DescriptorRead {
        /// Index of the descriptor.
        index: u16,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The chain's buffers are shorter than the request needs.
    #[error("descriptor chain too short: needed {needed} more bytes")]
    Short {
        /// Bytes missing.
        needed: usize,
    },
    /// Copying to or from a validated buffer failed.
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// One validated buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes (the whole range is inside guest RAM).
    pub len: u32,
}

/// A validated descriptor chain: readable buffers, then writable buffers.
#[derive(Clone, Debug, Default)]
pub struct DescChain {
    head: u16,
    readable: Vec<Buffer>,
    writable: Vec<Buffer>,
    readable_len: u32,
    writable_len: u32,
}

impl DescChain {
    /// Walks and validates the chain starting at `head` in the descriptor
    /// table at `desc_table` of `queue_size` entries. Reads each descriptor
    /// out of guest memory exactly once.
    pub fn parse(
        mem: &GuestMemoryMmap,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Result<Self, ChainError> {
        let mut chain = DescChain {
            head,
            ..Default::default()
        };
        let mut index = head;
        let mut ttl = queue_size;
        loop {
            if index >= queue_size {
                return Err(ChainError::IndexOutOfRange { index, queue_size });
            }
            if ttl == 0 {
                return Err(ChainError::TooLong);
            }
            ttl -= 1;
            let desc_addr = desc_table
                .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
                .ok_or(ChainError::LengthOverflow)?;
            let mut raw = [0u8; DESCRIPTOR_SIZE as usize];
            mem.read_slice(&mut raw, desc_addr)
                .map_err(|source| ChainError::DescriptorRead { index, source })?;
            let (addr, len, flags, next) = decode_descriptor(&raw);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            let buffer = Buffer {
                addr: GuestAddress(addr),
                len,
            };
            check_in_memory(mem, buffer)?;
            if flags & VIRTQ_DESC_F_WRITE != 0 {
                chain.writable_len = chain
                    .writable_len
                    .checked_add(len)
                    .ok_or(ChainError::LengthOverflow)?;
                chain.writable.push(buffer);
            } else {
                if !chain.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                chain.readable_len = chain
                    .readable_len
                    .checked_add(len)
                    .ok_or(ChainError::LengthOverflow)?;
                chain.readable.push(buffer);
            }
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            index = next;
        }
    }

    /// Index of the head descriptor (what goes into the used ring).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// The device-readable buffers.
    pub fn readable(&self) -> &[Buffer] {
        &self.readable
    }

    /// The device-writable buffers.
    pub fn writable(&self) -> &[Buffer] {
        &self.writable
    }

    /// A cursor over the device-readable part.
    pub fn reader(&self) -> ChainCursor<'_> {
        ChainCursor::new(&self.readable)
    }

    /// A cursor over the device-writable part.
    pub fn writer(&self) -> ChainCursor<'_> {
        ChainCursor::new(&self.writable)
    }
}

fn decode_descriptor(raw: &[u8; DESCRIPTOR_SIZE as usize]) -> (u64, u32, u16, u16) {
    let mut a = [0u8; 8];
    a.copy_from_slice(&raw[0..8]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&raw[8..12]);
    (
        u64::from_le_bytes(a),
        u32::from_le_bytes(l),
        u16::from_le_bytes([raw[12], raw[13]]),
        u16::from_le_bytes([raw[14], raw[15]]),
    )
}

fn check_in_memory(mem: &GuestMemoryMmap, buffer: Buffer) -> Result<(), ChainError> {
    let out = ChainError::OutOfGuestMemory {
        addr: buffer.addr.raw_value(),
        len: buffer.len,
    };
    if buffer.len == 0 {
        return Ok(());
    }
    // The last byte must not wrap around the address space.
    if buffer.addr.checked_add(u64::from(buffer.len) - 1).is_none() {
        return Err(out);
    }
    let len = usize::try_from(buffer.len).map_err(|_| ChainError::LengthOverflow)?;
    if GuestMemoryBackend::check_range(mem, buffer.addr, len) {
        Ok(())
    } else {
        Err(out)
    }
}

/// Sequential access to one direction of a validated chain.
#[derive(Clone, Debug)]
pub struct ChainCursor<'a> {
    buffers: &'a [Buffer],
    index: usize,
    offset: u32,
    consumed: usize,
}

impl<'a> ChainCursor<'a> {
    fn new(buffers: &'a [Buffer]) -> Self {
        Self {
            buffers,
            index: 0,
            offset: 0,
            consumed: 0,
        }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        let mut total = 0usize;
        for (i, b) in self.buffers.iter().enumerate().skip(self.index) {
            let len = if i == self.index {
                b.len - self.offset
            } else {
                b.len
            };
            total = total.saturating_add(len as usize);
        }
        total
    }

    /// Bytes consumed so far.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// Takes the next contiguous piece of at most `max` bytes.
    pub fn next_segment(&mut self, max: usize) -> Option<Buffer> {
        while let Some(b) = self.buffers.get(self.index) {
            let left = b.len - self.offset;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let take = u32::try_from(max).unwrap_or(u32::MAX).min(left);
            if take == 0 {
                return None;
            }
            // Cannot overflow: the whole buffer was checked to be inside guest memory.
            let addr = b.addr.unchecked_add(u64::from(self.offset));
            self.offset += take;
            self.consumed += take as usize;
            return Some(Buffer { addr, len: take });
        }
        None
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, mut n: usize) -> Result<(), ChainError> {
        while n > 0 {
            let seg = self
                .next_segment(n)
                .ok_or(ChainError::Short { needed: n })?;
            n -= seg.len as usize;
        }
        Ok(())
    }

    /// Copies exactly `buf.len()` bytes out of guest memory.
    pub fn read_exact(&mut self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<(), ChainError> {
        let mut done = 0;
        while done < buf.len() {
            let seg = self
                .next_segment(buf.len() - done)
                .ok_or(ChainError::Short {
                    needed: buf.len() - done,
                })?;
            let end = done + seg.len as usize;
            mem.read_slice(&mut buf[done..end], seg.addr)
                .map_err(ChainError::Memory)?;
            done = end;
        }
        Ok(())
    }

    /// Copies a plain-data object out of guest memory (once).
    pub fn read_obj<T: ByteValued>(&mut self, mem: &GuestMemoryMmap) -> Result<T, ChainError> {
        let mut obj = T::zeroed();
        self.read_exact(mem, obj.as_mut_slice())?;
        Ok(obj)
    }

    /// Copies all of `buf` into guest memory.
    pub fn write_all(&mut self, mem: &GuestMemoryMmap, buf: &[u8]) -> Result<(), ChainError> {
        let mut done = 0;
        while done < buf.len() {
            let seg = self
                .next_segment(buf.len() - done)
                .ok_or(ChainError::Short {
                    needed: buf.len() - done,
                })?;
            let end = done + seg.len as usize;
            mem.write_slice(&buf[done..end], seg.addr)
                .map_err(ChainError::Memory)?;
            done = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    #[test]
    fn valid_chain_split_by_direction() {
        let m = mem();
        put(&m, 0, 0, 0x1000, 16, VIRTQ_DESC_F_NEXT, 1);
        put(
            &m,
            0,
            1,
            0x2000,
            100,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            2,
        );
        put(&m, 0, 2, 0x3000, 1, VIRTQ_DESC_F_WRITE, 0);
        let c = DescChain::parse(&m, GuestAddress(0), 8, 0).unwrap();
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 101);
        assert_eq!(c.readable().len(), 1);
        assert_eq!(c.writable().len(), 2);
    }

    #[test]
    fn loop_is_cut_by_ttl() {
        let m = mem();
        put(&m, 0, 0, 0x1000, 16, VIRTQ_DESC_F_NEXT, 1);
        put(&m, 0, 1, 0x1000, 16, VIRTQ_DESC_F_NEXT, 0);
        assert!(matches!(
            DescChain::parse(&m, GuestAddress(0), 8, 0),
            Err(ChainError::TooLong)
        ));
    }

    #[test]
    fn rejects_out_of_memory_wrap_indirect_order_and_index() {
        let m = mem();
        put(&m, 0, 0, 0xff00, 0x200, 0, 0);
        assert!(matches!(
            DescChain::parse(&m, GuestAddress(0), 8, 0),
            Err(ChainError::OutOfGuestMemory { .. })
        ));
        put(&m, 0, 0, u64::MAX - 4, 16, 0, 0);
        assert!(matches!(
            DescChain::parse(&m, GuestAddress(0), 8, 0),
            Err(ChainError::OutOfGuestMemory { .. })
        ));
        put(&m, 0, 0, 0x1000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert!(matches!(
            DescChain::parse(&m, GuestAddress(0), 8, 0),
            Err(ChainError::Indirect)
        ));
        put(
            &m,
            0,
            0,
            0x1000,
            16,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            1,
        );
        put(&m, 0, 1, 0x1000, 16, 0, 0);
        assert!(matches!(
            DescChain::parse(&m, GuestAddress(0), 8, 0),
            Err(ChainError::ReadableAfterWritable)
        ));
        put(&m, 0, 0, 0x1000, 16, VIRTQ_DESC_F_NEXT, 9);
        assert!(matches!(
            DescChain::parse(&m, GuestAddress(0), 8, 0),
            Err(ChainError::IndexOutOfRange { index: 9, .. })
        ));
        assert!(matches!(
            DescChain::parse(&m, GuestAddress(0), 8, 8),
            Err(ChainError::IndexOutOfRange { index: 8, .. })
        ));
    }

    #[test]
    fn cursor_reads_across_buffers_and_stops_at_end() {
        let m = mem();
        m.write_slice(b"abc", GuestAddress(0x1000)).unwrap();
        m.write_slice(b"defg", GuestAddress(0x2000)).unwrap();
        put(&m, 0, 0, 0x1000, 3, VIRTQ_DESC_F_NEXT, 1);
        put(&m, 0, 1, 0x2000, 4, 0, 0);
        let c = DescChain::parse(&m, GuestAddress(0), 8, 0).unwrap();
        let mut r = c.reader();
        let mut buf = [0u8; 5];
        r.read_exact(&m, &mut buf).unwrap();
        assert_eq!(&buf, b"abcde");
        assert_eq!(r.remaining(), 2);
        assert!(matches!(
            r.read_exact(&m, &mut buf),
            Err(ChainError::Short { .. })
        ));
    }
}
