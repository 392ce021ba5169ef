//! Helpers for block slot tests: disk files and request chains.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::request::HEADER_SIZE;
use crate::devices::virtio::test_utils::{AddedChain, Buf, MockDriver};

/// Creates `sectors` sectors at `dir/name`, sector i filled with byte `seed + i`.
pub fn disk_file(dir: &Path, name: &str, sectors: u8, seed: u8) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..sectors {
        f.write_all(&[seed.wrapping_add(i); 512]).unwrap();
    }
    path
}

/// The 16-byte request header.
pub fn header(type_: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_SIZE as usize);
    h.extend_from_slice(&type_.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// Adds a request: header, `data` buffers, status byte; returns the chain.
pub fn add_request(d: &mut MockDriver, type_: u32, sector: u64, data: &[Buf]) -> AddedChain {
    let mut bufs = vec![Buf::Out(header(type_, sector))];
    bufs.extend_from_slice(data);
    bufs.push(Buf::In(1));
    d.add_chain(0, &bufs)
}

/// The status byte of a completed request.
pub fn status_of(d: &MockDriver, chain: &AddedChain) -> u8 {
    let (addr, _) = *chain.buffers.last().unwrap();
    d.read_mem(addr, 1)[0]
}
