//! The `qemu` hypervisor: Debian's `qemu-system-x86_64 -M microvm` booting
//! the guest-image kernel and initramfs.
//!
//! Verified details that shape the command line:
//! - `acpi=off`: with ACPI on, QEMU does not put the `virtio_mmio.device=`
//!   entries on the kernel command line and the guest finds no devices.
//! - `tsc_early_khz=<host TSC kHz>`: without it TSC calibration under TCG
//!   hangs some boots when the host is loaded.
//! - `tsc=reliable`: on a loaded host the emulated timer interrupts lag, the
//!   clocksource watchdog blames the (correct) TSC, and the guest falls
//!   back to jiffies; seen to leave the guest's vsock unanswered for minutes.
//! - `no_timer_check`: on a loaded host the IO-APIC timer check at boot can
//!   miss its emulated ticks and panic the guest ("IO-APIC + timer doesn't
//!   work"), seen with twenty TCG boots at once.
//! - no ACPI means a guest power-off only halts, so the agent ends the VM by
//!   rebooting (`reboot=t`) and QEMU runs with `-no-reboot`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Errors from launching QEMU or waiting for the guest.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("starting {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not exist")]
    MissingFile { path: String },
    #[error(
        "the guest printed no agent ready line within {timeout:?}; last console lines:\n{console}"
    )]
    Timeout { timeout: Duration, console: String },
    #[error(
        "QEMU exited ({status}) before the agent was ready; last console lines:\n{console}\nQEMU said:\n{stderr}"
    )]
    Exited {
        status: String,
        console: String,
        stderr: String,
    },
}

/// How QEMU executes guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// Software emulation: slow, but boots a stock guest on any host.
    Tcg,
}

impl Accel {
    fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// One QEMU microvm guest.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// Uncompressed ELF vmlinux (booted through its PVH entry point).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the kernel command line vmpod needs.
    pub extra_cmdline: String,
    /// The vhost-user socket of a running `vhost-device-vsock` (see
    /// [`VhostVsock`]): gives the guest a vsock device whose host side is
    /// that daemon's hybrid vsock socket.
    pub vhost_user_vsock: Option<PathBuf>,
    /// A virtio-fs device served by a running virtiofsd.
    pub vhost_user_fs: Option<VhostUserFs>,
    /// virtio-blk disks, in order.
    pub disks: Vec<QemuDisk>,
    /// A virtio-net NIC on an existing tap device.
    pub net: Option<QemuNet>,
}

/// A virtio-net device backed by a tap device that already exists (QEMU
/// runs in the namespace that holds it and only attaches to it).
#[derive(Clone, Debug)]
pub struct QemuNet {
    /// The tap device's name.
    pub tap: String,
    /// The guest NIC's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// A virtio-fs share: the guest mounts `tag`; virtiofsd serves it on the
/// vhost-user `socket`.
#[derive(Clone, Debug)]
pub struct VhostUserFs {
    pub socket: PathBuf,
    pub tag: String,
}

/// A raw disk image given to the guest as a virtio-blk device.
#[derive(Clone, Debug)]
pub struct QemuDisk {
    pub path: PathBuf,
    pub read_only: bool,
    /// The virtio-blk serial: the guest finds the disk by it
    /// (`/sys/block/*/serial`); at most 20 bytes.
    pub serial: String,
}

impl QemuConfig {
    /// A configuration with the defaults for a pod VM.
    pub fn new(kernel: impl Into<PathBuf>, initramfs: impl Into<PathBuf>, accel: Accel) -> Self {
        QemuConfig {
            binary: "qemu-system-x86_64".into(),
            kernel: kernel.into(),
            initramfs: initramfs.into(),
            accel,
            vcpus: 1,
            memory_mib: 256,
            extra_cmdline: String::new(),
            vhost_user_vsock: None,
            vhost_user_fs: None,
            disks: Vec::new(),
            net: None,
        }
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut cmdline = String::from("console=ttyS0 reboot=t panic=-1 no_timer_check");
        if let Some(khz) = host_tsc_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
        }
        if !self.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.extra_cmdline);
        }
        cmdline
    }

    /// The full QEMU command. The serial console is QEMU's stdout.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        let memory = format!("{}M", self.memory_mib);
        if self.vhost_user_vsock.is_some() || self.vhost_user_fs.is_some() {
            // vhost-user devices need guest RAM the backend can map: a shared memfd.
            cmd.args(["-M", "microvm,acpi=off,memory-backend=mem"])
                .args([
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
                ]);
        } else {
            cmd.args(["-M", "microvm,acpi=off"]);
        }
        cmd.args(self.accel.qemu_args())
            .args(["-smp", &self.vcpus.to_string(), "-m", &memory])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", "stdio"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .args(["-append", &self.cmdline()]);
        for (i, disk) in self.disks.iter().enumerate() {
            let mut drive = std::ffi::OsString::from("file=");
            drive.push(&disk.path);
            drive.push(format!(
                ",if=none,id=disk{i},format=raw,readonly={}",
                if disk.read_only { "on" } else { "off" }
            ));
            cmd.arg("-drive").arg(drive);
            cmd.args([
                "-device",
                &format!("virtio-blk-device,drive=disk{i},serial={}", disk.serial),
            ]);
        }
        if let Some(net) = &self.net {
            // script=no: the tap is made and wired by the caller.
            cmd.args([
                "-netdev",
                &format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
                "-device",
                &format!("virtio-net-device,netdev=net0,mac={}", net.mac),
            ]);
        }
        if let Some(socket) = &self.vhost_user_vsock {
            let mut chardev = std::ffi::OsString::from("socket,id=vsock0,path=");
            chardev.push(socket);
            cmd.arg("-chardev")
                .arg(chardev)
                .args(["-device", "vhost-user-vsock-device,chardev=vsock0"]);
        }
        if let Some(fs) = &self.vhost_user_fs {
            let mut chardev = std::ffi::OsString::from("socket,id=fs0,path=");
            chardev.push(&fs.socket);
            cmd.arg("-chardev").arg(chardev).args([
                "-device",
                &format!("vhost-user-fs-device,chardev=fs0,tag={}", fs.tag),
            ]);
        }
        cmd
    }

    /// Starts the guest and waits until the agent prints its ready line on
    /// the console. The returned guest is killed when dropped.
    pub fn boot_until_ready(&self, timeout: Duration) -> Result<RunningGuest, QemuError> {
        for path in [&self.kernel, &self.initramfs] {
            if !path.exists() {
                return Err(QemuError::MissingFile {
                    path: path.display().to_string(),
                });
            }
        }
        let started = Instant::now();
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                // The console is guest output: keep it as lossy text.
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(
                &mut std::io::Read::take(stderr, 64 * 1024),
                &mut text,
            );
            text
        });
        let mut guest = RunningGuest {
            child,
            console: Vec::new(),
            lines,
            ready: None,
            stderr: Some(stderr),
        };
        let deadline = started + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match guest.lines.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.starts_with(vmpod_proto::READY_LINE_PREFIX);
                    guest.console.push(line);
                    if ready {
                        guest.ready = Some(started.elapsed());
                        return Ok(guest);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(QemuError::Timeout {
                        timeout,
                        console: guest.console_tail(30),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = guest
                        .child
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string());
                    let stderr = guest
                        .stderr
                        .take()
                        .and_then(|h| h.join().ok())
                        .unwrap_or_default();
                    return Err(QemuError::Exited {
                        status,
                        console: guest.console_tail(30),
                        stderr,
                    });
                }
            }
        }
    }
}

/// A `vhost-device-vsock` process (rust-vmm): the vsock backend for a QEMU
/// guest. It serves QEMU on a vhost-user socket and exposes the same hybrid
/// vsock unix socket as vmpod's VMM (`CONNECT <port>`/`OK <port>`). Killed
/// on drop.
#[derive(Debug)]
pub struct VhostVsock {
    child: Child,
    /// For QEMU: `QemuConfig::vhost_user_vsock`.
    pub vhost_socket: PathBuf,
    /// For the host side: the hybrid vsock socket.
    pub uds: PathBuf,
}

impl VhostVsock {
    /// The program, found on PATH or in ~/.cargo/bin (`cargo install
    /// vhost-device-vsock`).
    pub fn binary() -> PathBuf {
        super::helper_program("vhost-device-vsock")
    }

    /// Starts the backend for guest `cid` with its sockets in `dir`, and
    /// waits (up to `timeout`) until QEMU can connect to it.
    pub fn start(dir: &std::path::Path, cid: u32, timeout: Duration) -> Result<Self, QemuError> {
        let vhost_socket = dir.join("vhost-vsock.sock");
        let uds = dir.join("vsock.sock");
        let binary = Self::binary();
        // Its log stays beside its sockets for post-mortems.
        let log = std::fs::File::create(dir.join("vhost-device-vsock.log")).map_err(|source| {
            QemuError::Spawn {
                binary: binary.display().to_string(),
                source,
            }
        })?;
        let child = Command::new(&binary)
            .arg("--guest-cid")
            .arg(cid.to_string())
            .arg("--socket")
            .arg(&vhost_socket)
            .arg("--uds-path")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        let mut daemon = VhostVsock {
            child,
            vhost_socket,
            uds,
        };
        let deadline = Instant::now() + timeout;
        while !daemon.vhost_socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(QemuError::Exited {
                    status: status.to_string(),
                    console: String::new(),
                    stderr: format!("{} exited before creating its socket", binary.display()),
                });
            }
            if Instant::now() >= deadline {
                return Err(QemuError::MissingFile {
                    path: daemon.vhost_socket.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }
}

impl Drop for VhostVsock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running QEMU guest; killed on drop.
#[derive(Debug)]
pub struct RunningGuest {
    child: Child,
    console: Vec<String>,
    lines: mpsc::Receiver<String>,
    ready: Option<Duration>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl RunningGuest {
    /// Console lines seen so far.
    pub fn console(&self) -> &[String] {
        &self.console
    }

    /// The agent's ready line.
    pub fn ready_line(&self) -> Option<&str> {
        self.console
            .last()
            .map(String::as_str)
            .filter(|l| l.starts_with(vmpod_proto::READY_LINE_PREFIX))
    }

    /// Time from spawning QEMU to the agent's ready line.
    pub fn time_to_ready(&self) -> Option<Duration> {
        self.ready
    }

    /// QEMU's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// QEMU's exit status once it has exited by itself.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for QEMU to exit by itself (the guest ended),
    /// collecting console lines meanwhile. Returns whether it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.console.extend(self.lines.try_iter());
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Ok(line) = self.lines.recv_timeout(left.min(Duration::from_millis(50))) {
                self.console.push(line);
            }
        }
    }

    fn console_tail(&self, n: usize) -> String {
        self.console[self.console.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The host's TSC frequency in kHz, from the `cpu MHz` line of
/// /proc/cpuinfo (the TSC rate on hosts with an invariant TSC).
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz_khz(&cpuinfo)
}

fn parse_cpu_mhz_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's arguments as one string.
    fn command_line(cfg: &QemuConfig) -> String {
        let args: Vec<String> = cfg
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        args.join(" ")
    }

    #[test]
    fn command_line_has_the_verified_microvm_settings() {
        let cfg = QemuConfig::new("/k", "/i", Accel::Tcg);
        let joined = command_line(&cfg);
        assert!(joined.contains("-M microvm,acpi=off"), "{joined}");
        assert!(joined.contains("-accel tcg -cpu max"), "{joined}");
        assert!(joined.split(' ').any(|a| a == "-no-reboot"), "{joined}");
        assert!(cfg.cmdline().contains("reboot=t"));
        assert!(cfg.cmdline().starts_with("console=ttyS0"));
    }

    #[test]
    fn vhost_user_vsock_needs_shared_guest_memory() {
        let mut cfg = QemuConfig::new("/k", "/i", Accel::Tcg);
        cfg.vhost_user_vsock = Some("/run/v.sock".into());
        let joined = command_line(&cfg);
        assert!(
            joined.contains("-M microvm,acpi=off,memory-backend=mem"),
            "{joined}"
        );
        assert!(
            joined.contains("memory-backend-memfd,id=mem,size=256M,share=on"),
            "{joined}"
        );
        assert!(
            joined.contains("-chardev socket,id=vsock0,path=/run/v.sock"),
            "{joined}"
        );
        assert!(
            joined.contains("-device vhost-user-vsock-device,chardev=vsock0"),
            "{joined}"
        );
    }

    #[test]
    fn vhost_user_fs_is_a_virtio_fs_device_on_shared_memory() {
        let mut cfg = QemuConfig::new("/k", "/i", Accel::Tcg);
        cfg.memory_mib = 512;
        cfg.vhost_user_fs = Some(VhostUserFs {
            socket: "/run/s/fs.sock".into(),
            tag: "vmpod".into(),
        });
        let joined = command_line(&cfg);
        // virtiofsd maps guest RAM to serve requests: it must be shared
        // even without a vsock device.
        assert!(
            joined.contains("-M microvm,acpi=off,memory-backend=mem"),
            "{joined}"
        );
        assert!(
            joined.contains("memory-backend-memfd,id=mem,size=512M,share=on"),
            "{joined}"
        );
        assert!(
            joined.contains("-chardev socket,id=fs0,path=/run/s/fs.sock"),
            "{joined}"
        );
        assert!(
            joined.contains("-device vhost-user-fs-device,chardev=fs0,tag=vmpod"),
            "{joined}"
        );
        assert!(!joined.contains("vsock"), "{joined}");

        // Both vhost-user devices share one memory backend.
        cfg.vhost_user_vsock = Some("/run/s/v.sock".into());
        let joined = command_line(&cfg);
        assert_eq!(
            joined.matches("memory-backend-memfd").count(),
            1,
            "{joined}"
        );
        assert!(joined.contains("chardev=vsock0"), "{joined}");
        assert!(joined.contains("chardev=fs0"), "{joined}");
    }

    #[test]
    fn disks_become_virtio_blk_devices_with_serials() {
        let mut cfg = QemuConfig::new("/k", "/i", Accel::Tcg);
        cfg.disks.push(QemuDisk {
            path: "/img/a.erofs".into(),
            read_only: true,
            serial: "image0".into(),
        });
        let joined = command_line(&cfg);
        assert!(
            joined.contains("-drive file=/img/a.erofs,if=none,id=disk0,format=raw,readonly=on"),
            "{joined}"
        );
        assert!(
            joined.contains("-device virtio-blk-device,drive=disk0,serial=image0"),
            "{joined}"
        );
    }

    #[test]
    fn net_is_a_virtio_net_device_on_the_given_tap() {
        let mut cfg = QemuConfig::new("/k", "/i", Accel::Tcg);
        assert!(!command_line(&cfg).contains("-netdev"));
        cfg.net = Some(QemuNet {
            tap: "tap0".into(),
            mac: "0a:58:0a:58:00:05".into(),
        });
        let joined = command_line(&cfg);
        assert!(
            joined.contains("-netdev tap,id=net0,ifname=tap0,script=no,downscript=no"),
            "{joined}"
        );
        assert!(
            joined.contains("-device virtio-net-device,netdev=net0,mac=0a:58:0a:58:00:05"),
            "{joined}"
        );
    }

    #[test]
    fn parses_the_tsc_rate() {
        let info = "processor\t: 0\ncpu MHz\t\t: 2099.998\ncache size\t: 1 KB\n";
        assert_eq!(parse_cpu_mhz_khz(info), Some(2_099_998));
        assert_eq!(parse_cpu_mhz_khz("nothing"), None);
        assert_eq!(parse_cpu_mhz_khz("cpu MHz : garbage"), None);
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let cfg = QemuConfig::new("/nonexistent/vmlinux", "/nonexistent/initramfs", Accel::Tcg);
        let err = cfg.boot_until_ready(Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}
