//! Walks a descriptor chain out of arbitrary guest memory, then reads and
//! writes through every validated buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpod_vmm::devices::virtio::chain::DescChain;
use vmpod_vmm::devices::virtio::fuzz_support::guest_from;

fuzz_target!(|data: &[u8]| {
    let Some((mem, table, size, head)) = guest_from(data) else {
        return;
    };
    if let Ok(chain) = DescChain::parse(&mem, table, size, head) {
        let mut r = chain.reader();
        let mut buf = vec![0u8; r.remaining().min(1 << 16)];
        let _ = r.read_exact(&mem, &mut buf);
        let mut w = chain.writer();
        let out = vec![0xa5u8; w.remaining().min(1 << 16)];
        let _ = w.write_all(&mem, &out);
    }
});
