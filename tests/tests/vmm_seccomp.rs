//! The VMM with its seccomp filters on (`"seccomp": true`): the freestanding
//! guest runs, the control socket answers every request, and graceful
//! shutdown works — all without a syscall outside the filters (a violation
//! kills this whole test process with SIGSYS). In its own test binary so
//! that kill cannot take other tests down with it.

use std::time::Duration;

use vmpod_tests::vmm::{config, ctl, read, start, wait_end, wait_serial};
use vmpod_tests::{build_freestanding_guest, require_kvm};
use vmpod_vmm::VmExitReason;

#[test]
fn vm_runs_and_is_controlled_under_seccomp() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_freestanding_guest(dir.path());
    let mut cfg = config(elf, "console=ttyS0 guest.wait_cad", dir.path());
    cfg.seccomp = true;
    cfg.vcpus = 2;
    let serial = dir.path().join("serial.log");
    let rx = start(cfg);
    assert!(
        wait_serial(&serial, "waiting: ctrl-alt-del", Duration::from_secs(30)),
        "{}",
        read(&serial)
    );
    for (req, key) in [
        (r#"{"op":"status"}"#, "state"),
        (r#"{"op":"pause"}"#, "ok"),
        (r#"{"op":"resume"}"#, "ok"),
        (r#"{"op":"metrics"}"#, "guest_touched_bytes"),
        (r#"{"op":"nonsense"}"#, "error"),
    ] {
        let v = ctl(dir.path(), req);
        assert!(v.get(key).is_some(), "{req} → {v}");
    }
    let v = ctl(dir.path(), r#"{"op":"shutdown","timeout_ms":30000}"#);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(wait_end(&rx, &serial), VmExitReason::Reset);
    assert!(read(&serial).contains("got: ctrl-alt-del"));
}

/// The device path under the filters: block reads/writes/flush and a
/// run-time attach, vsock accept and echo, rng — the syscalls the device
/// backends make in the event loop are all in `EVENT_LOOP_SYSCALLS`.
#[test]
fn devices_run_under_seccomp() {
    vmpod_tests::device_scenario::run(true);
}
