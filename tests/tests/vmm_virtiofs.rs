//! virtio-fs in a running VM under real KVM: `vmpod-vmm`'s builder connects
//! to a real virtiofsd while the VM is built, the guest RAM it hands over is
//! memfd-backed (shared), and the VM runs on that memory with its seccomp
//! filters on: the freestanding guest drives virtio-rng through real
//! virtqueues and interrupts in shared RAM, and finds the fs device declared
//! on its command line next to it.
//!
//! The FUSE traffic itself (FUSE_INIT, LOOKUP through the vhost-user rings)
//! is tested in the VMM crate against a real virtiofsd
//! (`vmm/src/devices/virtio/fs/vhost_user.rs`): the freestanding guest has
//! no virtio-fs driver.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmpod_tests::vmm::{config, read, start_with_devices, wait_end};
use vmpod_tests::{build_freestanding_guest, require_kvm};
use vmpod_vmm::VmExitReason;
use vmpod_vmm::config::FsConfig;

/// virtiofsd, on PATH or in ~/.cargo/bin (`cargo install virtiofsd`).
fn virtiofsd_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("virtiofsd"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        Path::new(&home).join(".cargo/bin/virtiofsd")
    })
}

/// A virtiofsd child, killed (by its handle) on drop.
struct Virtiofsd(Child);

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_virtiofsd(dir: &Path) -> (Virtiofsd, PathBuf, PathBuf) {
    let bin = virtiofsd_binary();
    assert!(
        bin.is_file(),
        "this test needs virtiofsd: {} is missing (cargo install virtiofsd)",
        bin.display()
    );
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test needs root (virtiofsd serves files as their owners)"
    );
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let socket = dir.join("fs.sock");
    let log = dir.join("virtiofsd.log");
    let child = Command::new(&bin)
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", shared.display()))
        .args(["--sandbox=none", "--cache=never"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let mut d = Virtiofsd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = d.0.try_wait() {
            panic!("virtiofsd exited ({status}): {}", read(&log));
        }
        assert!(
            Instant::now() < deadline,
            "virtiofsd did not create its socket: {}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (d, socket, log)
}

#[test]
fn vm_with_an_fs_device_runs_on_shared_memory_under_seccomp() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (_virtiofsd, socket, log) = start_virtiofsd(dir.path());
    let elf = build_freestanding_guest(dir.path());
    let mut cfg = config(elf, "console=ttyS0 reboot=k guest.virtio", dir.path());
    cfg.seccomp = true;
    cfg.fs = Some(FsConfig {
        socket,
        tag: "vmpod".into(),
        queue_size: 1024,
    });
    assert!(cfg.memory_is_shared());
    let serial = dir.path().join("serial.log");
    let reason = wait_end(&start_with_devices(cfg), &serial);
    let out = read(&serial);
    assert_eq!(reason, VmExitReason::Reset, "serial:\n{out}");
    // rng first (0xd0000000, GSI 5), fs last: the guest sees both.
    let cmdline = out
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .unwrap_or_else(|| panic!("no cmdline line:\n{out}"));
    assert!(
        cmdline.ends_with(" virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
        "{cmdline}"
    );
    // Real virtqueues and interrupts, in memfd-backed guest RAM.
    assert!(out.contains("rng: read 0x20 bytes, nonzero yes\n"), "{out}");
    assert!(out.contains("virtio: device interrupts seen\n"), "{out}");
    // The VMM did the vhost-user handshake with virtiofsd while building the VM.
    assert!(
        read(&log).contains("Client connected"),
        "virtiofsd log:\n{}",
        read(&log)
    );
}
