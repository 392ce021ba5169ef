//! Shared helpers for vmpod's end-to-end tests: where the built artefacts
//! are, and loud failures when they are missing.
//!
//! The artefacts come from `guest-image/build` (run by `scripts/test` and
//! `.ci/run`). A test that needs one fails with a message that says how to
//! make it; it never passes by skipping.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Where `guest-image/build` puts the guest image (`VMPOD_GUEST_DIR`
/// overrides it).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("VMPOD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest"))
}

/// A built artefact; panics with instructions when it is missing.
pub fn artefact(name: &str) -> PathBuf {
    let path = guest_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the guest image first with `guest-image/build` (or run `scripts/test`)",
        path.display()
    );
    path
}

/// The static agent binary built for the initramfs (`VMPOD_AGENT` overrides).
pub fn static_agent() -> PathBuf {
    let path = std::env::var_os("VMPOD_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/x86_64-unknown-linux-gnu/release/vmpod-agent")
        });
    assert!(
        path.exists(),
        "{} is missing: build it with `guest-image/build` (a static release build of vmpod-agent)",
        path.display()
    );
    path
}

/// Panics with a clear message unless `program` is on PATH.
pub fn require_program(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: install Debian's {package} (scripts/install-deps does)"
    );
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(data);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub mod sandbox;

/// Panics with a clear message unless /dev/kvm exists and can be opened
/// read-write (tests that boot VMs with vmpod's own VMM need it).
pub fn require_kvm() {
    let path = Path::new("/dev/kvm");
    assert!(
        path.exists(),
        "/dev/kvm does not exist: this test boots a VM with vmpod's VMM and needs KVM \
         (load kvm_intel/kvm_amd, or run on a host with KVM or PVM)"
    );
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        panic!(
            "/dev/kvm cannot be opened read-write ({e}): run the tests as root or in the kvm group"
        );
    }
}

/// The freestanding test guest's sources (`tests/tests/freestanding_guest/`).
pub fn freestanding_guest_dir() -> PathBuf {
    workspace_root().join("tests/tests/freestanding_guest")
}

/// Builds the freestanding test guest into `out_dir` with gcc and returns the ELF.
pub fn build_freestanding_guest(out_dir: &Path) -> PathBuf {
    require_program("gcc", "gcc");
    let src = freestanding_guest_dir();
    let elf = out_dir.join("freestanding-guest.elf");
    let output = std::process::Command::new("gcc")
        .args([
            "-ffreestanding",
            "-mgeneral-regs-only",
            "-nostdlib",
            "-fno-pic",
            "-no-pie",
            "-static",
            "-mno-red-zone",
            "-fno-stack-protector",
            "-O2",
            "-Wall",
            "-Werror",
            "-Wl,--build-id=none",
            "-Wl,--no-warn-rwx-segments",
            "-T",
        ])
        .arg(src.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(src.join("start.S"))
        .arg(src.join("main.c"))
        .output()
        .expect("running gcc");
    assert!(
        output.status.success(),
        "building the freestanding guest failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    elf
}

/// Running vmpod's VMM in-process from tests: a VM on a thread, its serial
/// log in a file, its control socket next to it.
pub mod vmm {
    use std::path::{Path, PathBuf};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use vmpod::vmm::VmExitReason;
    use vmpod::vmm::config::{SerialConfig, VmmConfig};
    use vmpod::vmm::control::request;

    /// How long any test VM may run.
    pub const VM_TIMEOUT: Duration = Duration::from_secs(120);

    /// A 1-vCPU, 64 MiB VM with its serial log at `dir/serial.log` and its
    /// control socket at `dir/control.sock`.
    pub fn config(kernel: PathBuf, cmdline: &str, dir: &Path) -> VmmConfig {
        VmmConfig {
            vcpus: 1,
            memory_mib: 64,
            kernel,
            initramfs: None,
            cmdline: cmdline.into(),
            vsock: None,
            block: vec![],
            net: None,
            serial: Some(SerialConfig {
                path: dir.join("serial.log"),
            }),
            control_socket: Some(dir.join("control.sock")),
            seccomp: false,
        }
    }

    /// Runs the VM (legacy devices only) on a thread; the receiver yields its end.
    pub fn start(cfg: VmmConfig) -> mpsc::Receiver<Result<VmExitReason, String>> {
        spawn(cfg, false)
    }

    /// Runs the VM with the virtio devices its config asks for (what
    /// `vmpod vmm` runs) on a thread; the receiver yields its end.
    pub fn start_with_devices(cfg: VmmConfig) -> mpsc::Receiver<Result<VmExitReason, String>> {
        spawn(cfg, true)
    }

    fn spawn(cfg: VmmConfig, devices: bool) -> mpsc::Receiver<Result<VmExitReason, String>> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = if devices {
                vmpod::vmm::run_with_devices(&cfg, Instant::now())
            } else {
                vmpod::vmm::run(&cfg, Instant::now(), None)
            };
            let r = r.map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                msg
            });
            let _ = tx.send(r);
        });
        rx
    }

    /// Waits (bounded) for the VM to end; panics with the serial log otherwise.
    pub fn wait_end(
        rx: &mpsc::Receiver<Result<VmExitReason, String>>,
        serial: &Path,
    ) -> VmExitReason {
        match rx.recv_timeout(VM_TIMEOUT) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("the VMM failed: {e}\nserial:\n{}", read(serial)),
            Err(_) => panic!(
                "the VM did not end within {VM_TIMEOUT:?}\nserial:\n{}",
                read(serial)
            ),
        }
    }

    /// The file's bytes as text (empty when missing).
    pub fn read(path: &Path) -> String {
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
    }

    /// Polls the serial log until it contains `needle` (bounded).
    pub fn wait_serial(path: &Path, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if read(path).contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// One control-socket request, retried (bounded) until the socket exists.
    pub fn ctl(dir: &Path, req: &str) -> serde_json::Value {
        let path = dir.join("control.sock");
        // The socket appears once the VM is built.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match request(&path, req, Duration::from_secs(10)) {
                Ok(v) => return v,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("control request {req} failed: {e}"),
            }
        }
    }
}
