//! The whole VMM⇄guest device path under real KVM: `vmpod-vmm`'s device
//! wiring (rng, vsock, three block slots) driven by the freestanding test
//! guest's own virtio-mmio drivers through real virtqueues and interrupts
//! (`guest.virtio`, see `freestanding_guest/README.md` and
//! `vmpod_tests::device_scenario`).

#[test]
fn freestanding_guest_drives_blk_vsock_and_rng_through_real_virtqueues() {
    vmpod_tests::device_scenario::run(false);
}
