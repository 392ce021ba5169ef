//! The guest image boots in a real Linux guest without our VMM: QEMU's
//! microvm under TCG (these machines' KVM is PVM and cannot run a stock
//! kernel). This is the base of the guest-side tests and the reference our
//! VMM is compared with.

use std::time::Duration;

use vmpod::hypervisor::qemu::{Accel, QemuConfig};
use vmpod_tests::{artefact, require_program};

#[test]
fn guest_boots_to_the_agent_as_pid1_under_qemu_tcg() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let cfg = QemuConfig::new(artefact("vmlinux"), artefact("initramfs.cpio"), Accel::Tcg);
    let guest = match cfg.boot_until_ready(Duration::from_secs(120)) {
        Ok(g) => g,
        Err(e) => panic!("the guest did not reach the agent: {e}"),
    };
    let console = guest.console().join("\n");
    assert!(
        console.contains("Linux version 6.1."),
        "no kernel banner on the console:\n{console}"
    );
    assert!(console.contains("Run /init as init process"), "{console}");
    // The agent powers the VM off (it never prints ready) if any PID-1 mount
    // or the console fails, so the ready line proves the set-up too.
    let ready = guest.ready_line().expect("ready line");
    for field in [
        "mode=guest",
        "pid=1",
        "listen=vsock:1024",
        "api=vmpod.agent.v1",
    ] {
        assert!(ready.contains(field), "ready line lacks {field}: {ready}");
    }
    assert!(!console.contains("Kernel panic"), "{console}");
}
