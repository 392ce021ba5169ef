//! Turns fuzzer input into guest memory holding a descriptor table, so the
//! fuzz targets in `fuzz/` exercise the same parsers the devices use.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size for fuzzing: small, so random addresses often hit it.
pub const FUZZ_MEM_SIZE: usize = 64 * 1024;

/// Builds guest memory from `data`: bytes 0..2 pick the queue size
/// (1..=256), 2..4 the head index, the rest is copied to guest address 0,
/// where the descriptor table lives. Returns (memory, table, size, head).
pub fn guest_from(data: &[u8]) -> Option<(GuestMemoryMmap, GuestAddress, u16, u16)> {
    let [s0, s1, h0, h1, rest @ ..] = data else {
        return None;
    };
    let size = u16::from_le_bytes([*s0, *s1]) % 256 + 1;
    let head = u16::from_le_bytes([*h0, *h1]);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_MEM_SIZE)]).ok()?;
    let n = rest.len().min(FUZZ_MEM_SIZE);
    mem.write_slice(&rest[..n], GuestAddress(0)).ok()?;
    Some((mem, GuestAddress(0), size, head))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::chain::DescChain;

    #[test]
    fn fuzz_input_layout_reaches_the_parser() {
        // size 8, head 0, one descriptor: addr 0x100, len 16, no flags.
        let mut input = vec![7, 0, 0, 0];
        input.extend_from_slice(&0x100u64.to_le_bytes());
        input.extend_from_slice(&16u32.to_le_bytes());
        input.extend_from_slice(&[0, 0, 0, 0]);
        let (mem, table, size, head) = guest_from(&input).unwrap();
        let chain = DescChain::parse(&mem, table, size, head).unwrap();
        assert_eq!(chain.readable_len(), 16);
    }
}
