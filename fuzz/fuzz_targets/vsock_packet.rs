//! Parses a vsock tx packet and an rx buffer from arbitrary guest memory,
//! and the hybrid-vsock handshake line from the raw input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpod_vmm::devices::virtio::chain::DescChain;
use vmpod_vmm::devices::virtio::fuzz_support::guest_from;
use vmpod_vmm::devices::virtio::vsock::muxer::parse_connect_line;
use vmpod_vmm::devices::virtio::vsock::packet::{parse_tx, rx_capacity, write_rx};

fuzz_target!(|data: &[u8]| {
    let _ = parse_connect_line(data);
    let Some((mem, table, size, head)) = guest_from(data) else {
        return;
    };
    let Ok(chain) = DescChain::parse(&mem, table, size, head) else {
        return;
    };
    if let Ok(pkt) = parse_tx(&mem, &chain) {
        assert_eq!(pkt.data.len(), pkt.hdr.len() as usize);
    }
    if let Ok(cap) = rx_capacity(&chain) {
        let hdr = Default::default();
        let payload = vec![0u8; cap];
        let _ = write_rx(&mem, &chain, &hdr, &payload);
    }
});
