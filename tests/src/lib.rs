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

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the
/// workspace when relative), else `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where `guest-image/build` puts the guest image (`VMPOD_GUEST_DIR`
/// overrides it).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("VMPOD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest"))
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
        .unwrap_or_else(|| target_dir().join("x86_64-unknown-linux-gnu/release/vmpod-agent"));
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

pub mod cri;
pub mod crictl;
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

/// Whether /dev/kvm is PVM (paravirtual KVM without VT-x/AMD-V): it runs
/// freestanding guests and PVM-patched kernels, but a stock Linux guest
/// only in KVM's instruction emulator, which gives up during early boot.
pub fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
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

    use vmpod_vmm::VmExitReason;
    use vmpod_vmm::config::{SerialConfig, VmmConfig};
    use vmpod_vmm::control::request;

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
            fs: None,
            shared_memory: false,
            serial: Some(SerialConfig {
                path: dir.join("serial.log"),
            }),
            control_socket: Some(dir.join("control.sock")),
            seccomp: false,
            jail: None,
        }
    }

    /// Runs the VM (legacy devices only) on a thread; the receiver yields its end.
    pub fn start(cfg: VmmConfig) -> mpsc::Receiver<Result<VmExitReason, String>> {
        spawn(cfg, false)
    }

    /// Runs the VM with the virtio devices its config asks for (what
    /// `vmpod-vmm` runs) on a thread; the receiver yields its end.
    pub fn start_with_devices(cfg: VmmConfig) -> mpsc::Receiver<Result<VmExitReason, String>> {
        spawn(cfg, true)
    }

    fn spawn(cfg: VmmConfig, devices: bool) -> mpsc::Receiver<Result<VmExitReason, String>> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = if devices {
                vmpod_vmm::run_with_devices(&cfg, Instant::now())
            } else {
                vmpod_vmm::run(&cfg, Instant::now(), None)
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

pub mod oci_layout;
pub mod registry;

/// The freestanding guest driving the VMM's virtio devices (shared by
/// `vmm_devices.rs` and `vmm_seccomp.rs`).
pub mod device_scenario {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::Duration;

    use vmpod_vmm::VmExitReason;
    use vmpod_vmm::config::{BlockSlotConfig, VsockConfig};

    use super::vmm::{config, ctl, read, start_with_devices, wait_end, wait_serial};
    use super::{build_freestanding_guest, require_kvm};

    /// The guest's checksum (FNV-1a, 32 bits).
    fn fnv1a(data: &[u8]) -> u32 {
        data.iter().fold(0x811c_9dc5u32, |h, &b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        })
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add((i / 512) as u8) ^ seed)
            .collect()
    }

    const WAIT: Duration = Duration::from_secs(60);

    /// Listens on `<uds>_<port>` for the guest's connection: reads one line,
    /// answers `pong from the host`, returns the line (bounded waits).
    fn host_listener(uds: &Path, port: u32) -> std::thread::JoinHandle<Vec<u8>> {
        let path = format!("{}_{port}", uds.display());
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + WAIT;
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "the guest never connected to {path}"
                        );
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("accept on {path}: {e}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut line = Vec::new();
            BufReader::new(stream.try_clone().unwrap())
                .read_until(b'\n', &mut line)
                .expect("reading the guest's line");
            stream.write_all(b"pong from the host\n").unwrap();
            line
        })
    }

    /// Connects through the hybrid vsock socket, echoes one message through
    /// the guest, returns what came back.
    fn vsock_echo(uds: &Path, port: u32, message: &[u8]) -> (String, Vec<u8>) {
        let mut s = UnixStream::connect(uds).expect("connecting to the vsock socket");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut ok = String::new();
        reader
            .read_line(&mut ok)
            .expect("reading the handshake reply");
        s.write_all(message).unwrap();
        let mut back = vec![0u8; message.len()];
        reader.read_exact(&mut back).expect("reading the echo");
        // Closing our end makes the muxer shut the stream down towards the guest.
        drop(reader);
        drop(s);
        (ok, back)
    }

    /// Boots the freestanding guest in `guest.virtio` mode with rng, vsock and
    /// three block slots (read-only with a pattern, read-write, empty), attaches
    /// a disk to the empty slot at run time, echoes a message through vsock,
    /// and asserts every result line on the serial console and the written
    /// file. `seccomp` runs the VMM with its filters on.
    pub fn run(seccomp: bool) {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let elf = build_freestanding_guest(dir.path());
        let disk0 = dir.path().join("disk0.img");
        let disk1 = dir.path().join("disk1.img");
        let disk2 = dir.path().join("disk2.img");
        let data0 = pattern(8 * 512, 0);
        let data2 = pattern(16 * 512, 0x5a);
        std::fs::write(&disk0, &data0).unwrap();
        std::fs::write(&disk1, vec![0u8; 4 * 512]).unwrap();
        std::fs::write(&disk2, &data2).unwrap();

        let mut cfg = config(elf, "console=ttyS0 reboot=k guest.virtio", dir.path());
        cfg.seccomp = seccomp;
        let uds = dir.path().join("vsock.sock");
        cfg.vsock = Some(VsockConfig {
            guest_cid: 42,
            uds_path: uds.clone(),
        });
        cfg.block = vec![
            BlockSlotConfig {
                path: Some(disk0.clone()),
                read_only: true,
            },
            BlockSlotConfig {
                path: Some(disk1.clone()),
                read_only: false,
            },
            BlockSlotConfig {
                path: None,
                read_only: false,
            },
        ];
        // The guest connects out to host port 6000: the VMM connects to `<uds>_6000`.
        let host_listener = host_listener(&uds, 6000);
        let serial = dir.path().join("serial.log");
        let rx = start_with_devices(cfg);

        // Slot 2 is empty from boot; attaching a disk at run time raises a
        // config-change interrupt the guest waits for.
        assert!(
            wait_serial(&serial, "blk0x2: capacity 0x0, waiting for a disk", WAIT),
            "{}",
            read(&serial)
        );
        let v = ctl(
            dir.path(),
            &format!(
                r#"{{"op":"block_attach","slot":2,"path":"{}","read_only":true}}"#,
                disk2.display()
            ),
        );
        assert_eq!(v["ok"], true, "{v}");

        assert!(
            wait_serial(&serial, "vsock: cid 0x2a listening on port 0x1388", WAIT),
            "{}",
            read(&serial)
        );
        let message = b"hello from the host, through hybrid vsock\n";
        let (ok, back) = vsock_echo(&uds, 5000, message);
        assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
        assert_eq!(back, message.to_ascii_uppercase());

        let m = ctl(dir.path(), r#"{"op":"metrics"}"#);
        assert_eq!(m["ok"], true, "{m}");
        for dev in ["rng", "vsock", "block0", "block1", "block2"] {
            assert!(m["devices"][dev].is_object(), "{dev} missing: {m}");
        }

        let reason = wait_end(&rx, &serial);
        let out = read(&serial);
        assert_eq!(reason, VmExitReason::Reset, "serial:\n{out}");
        let expect = [
            "rng: read 0x20 bytes, nonzero yes\n".to_string(),
            format!(
                "blk0x0: capacity 0x8 read status 0x0 sum {:#x}\n",
                fnv1a(&data0)
            ),
            // VIRTIO_BLK_S_IOERR: the slot is read-only.
            "blk0x0: write status 0x1\n".to_string(),
            "blk0x1: write status 0x0 flush status 0x0\n".to_string(),
            "blk0x2: config changed\n".to_string(),
            format!(
                "blk0x2: capacity 0x10 read status 0x0 sum {:#x}\n",
                fnv1a(&data2)
            ),
            format!("vsock: echoed {:#x} bytes\n", message.len()),
            "virtio: device interrupts seen\n".to_string(),
            "done: resetting\n".to_string(),
        ];
        for line in &expect {
            assert!(out.contains(line.as_str()), "missing {line:?} in:\n{out}");
        }
        assert!(out.contains("vsock: accepted from host port "), "{out}");
        assert!(
            out.contains("vsock: connected to host port 0x1770\n"),
            "{out}"
        );
        assert!(
            out.contains("vsock: host replied pong from the host\n"),
            "{out}"
        );
        let from_guest = host_listener
            .join()
            .expect("the host listener thread panicked");
        assert_eq!(from_guest, b"PING FROM THE GUEST\n");

        // The guest's write reached slot 1's file at sector 1, and nothing else changed.
        let d1 = std::fs::read(&disk1).unwrap();
        let msg = b"written by the vmpod freestanding guest";
        assert_eq!(&d1[512..512 + msg.len()], msg);
        assert!(d1[..512].iter().all(|&b| b == 0));
        assert!(d1[512 + msg.len()..].iter().all(|&b| b == 0));
        // The refused write left the read-only disk alone.
        assert_eq!(std::fs::read(&disk0).unwrap(), data0);
    }
}

/// Each scenario once per sandbox backend: `host::name` and `vm::name`,
/// each `async fn name(b: Backend)` in the calling test file.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod host {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name($crate::cri::Backend::Host).await
                }
            )*
        }
        mod vm {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name($crate::cri::Backend::Vm).await
                }
            )*
        }
    };
}
