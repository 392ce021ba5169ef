//! Parses a virtio-blk request from arbitrary guest memory and checks its
//! disk range against a small capacity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpod_vmm::devices::virtio::block::{MAX_REQUEST_BYTES, Request};
use vmpod_vmm::devices::virtio::chain::DescChain;
use vmpod_vmm::devices::virtio::fuzz_support::guest_from;

fuzz_target!(|data: &[u8]| {
    let Some((mem, table, size, head)) = guest_from(data) else {
        return;
    };
    let Ok(chain) = DescChain::parse(&mem, table, size, head) else {
        return;
    };
    if let Ok(req) = Request::parse(&mem, &chain) {
        assert!(req.data_len <= MAX_REQUEST_BYTES);
        if let Some((offset, len)) = req.disk_range(1 << 20) {
            assert!(offset + len <= 1 << 20);
        }
    }
});
