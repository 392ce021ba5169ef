//! The VM sandbox backend on the `qemu` hypervisor: one QEMU microvm per
//! pod, vsock through its own `vhost-device-vsock` (the hybrid-vsock socket
//! `<state dir>/s/<ID prefix>/vsock.sock`), the agent as PID 1 of the guest.
//!
//! Both processes run in their own sessions with their output in files of
//! the sandbox dir, so they outlive a daemon restart and are re-adopted.
//!
//! Images: QEMU's microvm machine cannot hot-add disks, so every image the
//! resolver knows when the pod boots is attached as a read-only virtio-blk
//! disk (serial `img<N>`); the erofs file of an image that came later
//! reaches the guest through the pod's virtio-fs share (see shared_fs.rs),
//! as do the containers' volumes. Hot-plugged block slots are the `vmpod`
//! VMM's job.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::CriError;
use super::image::ResolvedImage;
use crate::config::{Accel, Handler, Hypervisor};
use crate::hypervisor::qemu::{self, QemuConfig, QemuDisk, VhostUserFs, VhostVsock};
use crate::sandbox::shared_fs::{self, Share};

/// The guest's vsock context ID (each pod has its own vhost-device-vsock).
const GUEST_CID: u32 = 3;
/// How long vhost-device-vsock gets to create its socket.
const VSOCK_START: Duration = Duration::from_secs(10);

/// Processes and disks of a started VM.
#[derive(Debug)]
pub struct StartedVm {
    pub vmm_pid: i32,
    pub vsock_pid: i32,
    pub virtiofsd_pid: i32,
    /// The hybrid-vsock socket.
    pub uds: std::path::PathBuf,
    /// Image ID → disk serial.
    pub image_disks: BTreeMap<String, String>,
}

/// Starts vhost-device-vsock and QEMU for a pod in `dir`. On error nothing
/// started here is left running.
pub fn start(
    dir: &Path,
    sockets: &Path,
    handler: &Handler,
    images: &[ResolvedImage],
    nic: Option<&crate::network::tap::GuestNic>,
) -> Result<StartedVm, CriError> {
    // The vmpod hypervisor is started by `vmm_sandbox`.
    if handler.hypervisor() != Hypervisor::Qemu {
        return Err(CriError::Internal(
            "vm_sandbox::start runs QEMU only".into(),
        ));
    }
    let kernel = handler
        .kernel
        .clone()
        .unwrap_or_else(|| "/usr/lib/vmpod/vmlinux".into());
    let initramfs = handler
        .initramfs
        .clone()
        .unwrap_or_else(|| "/usr/lib/vmpod/initramfs.cpio".into());
    for f in [&kernel, &initramfs] {
        if !f.is_file() {
            return Err(CriError::FailedPrecondition(format!(
                "the guest image file {} is missing",
                f.display()
            )));
        }
    }
    let vhost_socket = sockets.join("vhost.sock");
    let uds = sockets.join("vsock.sock");
    let mut vsock_cmd = std::process::Command::new(VhostVsock::binary());
    vsock_cmd
        .arg("--guest-cid")
        .arg(GUEST_CID.to_string())
        .arg("--socket")
        .arg(&vhost_socket)
        .arg("--uds-path")
        .arg(&uds);
    let vsock_pid =
        crate::process::spawn_detached(vsock_cmd, None, &dir.join("vhost-device-vsock.log"))?;
    let deadline = Instant::now() + VSOCK_START;
    while !vhost_socket.exists() {
        if !crate::process::alive(vsock_pid) || Instant::now() >= deadline {
            kill(vsock_pid);
            return Err(CriError::Internal(format!(
                "vhost-device-vsock did not create {} (see {})",
                vhost_socket.display(),
                dir.join("vhost-device-vsock.log").display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The share must exist before virtiofsd exports it; on any error below
    // the caller's rollback tears it down.
    let share = Share::new(dir);
    if let Err(e) = share.prepare() {
        kill(vsock_pid);
        return Err(e.into());
    }
    let fs_socket = sockets.join("fs.sock");
    let virtiofsd_pid =
        match shared_fs::start_virtiofsd(&share, &fs_socket, &dir.join("virtiofsd.log")) {
            Ok(pid) => pid,
            Err(e) => {
                kill(vsock_pid);
                return Err(e.into());
            }
        };
    let mut cfg = QemuConfig::new(
        kernel,
        initramfs,
        match handler.accel.unwrap_or(Accel::Kvm) {
            Accel::Kvm => qemu::Accel::Kvm,
            Accel::Tcg => qemu::Accel::Tcg,
        },
    );
    cfg.vcpus = handler.vcpus.unwrap_or(1);
    cfg.memory_mib = handler.memory_mib.unwrap_or(256);
    cfg.vhost_user_vsock = Some(vhost_socket);
    cfg.vhost_user_fs = Some(VhostUserFs {
        socket: fs_socket,
        tag: shared_fs::TAG.into(),
    });
    cfg.extra_cmdline = handler.kernel_args.clone().unwrap_or_default();
    let mut image_disks = BTreeMap::new();
    for (i, img) in images.iter().enumerate() {
        let serial = format!("img{i}");
        cfg.disks.push(QemuDisk {
            path: img.erofs_path.clone(),
            read_only: true,
            serial: serial.clone(),
        });
        image_disks.insert(img.id.clone(), serial);
    }
    // With a network, QEMU runs in the pod's namespace, where its tap is.
    cfg.net = nic.map(|n| qemu::QemuNet {
        tap: n.tap.clone(),
        mac: n.mac.clone(),
    });
    let netns = nic.map(|n| n.netns.as_path());
    let vmm_pid =
        match crate::process::spawn_detached(cfg.command(), netns, &dir.join("console.log")) {
            Ok(pid) => pid,
            Err(e) => {
                kill(vsock_pid);
                kill(virtiofsd_pid);
                return Err(e.into());
            }
        };
    Ok(StartedVm {
        vmm_pid,
        vsock_pid,
        virtiofsd_pid,
        uds,
        image_disks,
    })
}

/// SIGKILLs a process we started (no wait).
pub fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// What the agent prints on the guest console once it listens.
const READY_LINE: &[u8] = b"vmpod-agent: ready ";

/// Waits until the guest console shows the agent's ready line; ends early
/// when a VM process dies. Dialing the hybrid vsock before that is what
/// vhost-device-vsock 0.3 sometimes never recovers from ("backend event
/// before vring initialization": the connection is dropped and later ones
/// get no handshake reply), so the daemon does not dial before it. The
/// line is only a hint: Health over vsock still decides.
pub async fn wait_console_ready(
    dir: &Path,
    rec: &super::store::SandboxRecord,
    timeout: Duration,
) -> Result<(), CriError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = dir.join("console.log");
    let deadline = Instant::now() + timeout;
    let mut offset = 0u64;
    // The tail of the previous chunk, so a line split across reads is seen.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        if let Ok(mut f) = std::fs::File::open(&path)
            && f.seek(SeekFrom::Start(offset)).is_ok()
        {
            let mut chunk = Vec::new();
            // Bounded per poll: a guest may print without end.
            if let Ok(n) = f.take(1 << 20).read_to_end(&mut chunk) {
                offset += n as u64;
                carry.extend_from_slice(&chunk);
                if carry.windows(READY_LINE.len()).any(|w| w == READY_LINE) {
                    return Ok(());
                }
                let keep = carry.len().saturating_sub(READY_LINE.len());
                carry.drain(..keep);
            }
        }
        let dead = [rec.vmm_pid, rec.vsock_pid]
            .into_iter()
            .flatten()
            .any(|p| !rec.owns(p));
        if dead || Instant::now() >= deadline {
            return Err(CriError::Internal(format!(
                "the pod VM's agent did not come up ({}) in {timeout:?}\nconsole:\n{}",
                if dead {
                    "a VM process ended"
                } else {
                    "no ready line"
                },
                console_tail(dir)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The last lines of the guest console, for error messages (bounded: the
/// guest decides what the file holds).
pub fn console_tail(dir: &Path) -> String {
    super::vmm_sandbox::tail(&dir.join("console.log"))
}
