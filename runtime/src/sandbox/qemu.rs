//! The VM sandbox backend on the `qemu` hypervisor: one QEMU microvm per
//! pod, vsock through its own `vhost-device-vsock` (the hybrid-vsock socket
//! `<state dir>/s/<ID prefix>/vsock.sock`), the pod's volumes through its
//! own virtiofsd, the agent as PID 1 of the guest.
//!
//! Every process runs in its own session with its output in files of the
//! sandbox dir, so they outlive a daemon restart and are re-adopted.
//!
//! Images: QEMU's microvm machine cannot hot-add disks and has only
//! [`MICROVM_TRANSPORTS`] virtio-mmio slots, of which vsock, the share and
//! the NIC take up to three. The images the node has at boot get the
//! slots left, as read-only virtio-blk disks (serial `img<N>`), in name
//! order; every other image (more images than slots, or pulled later)
//! reaches the guest as its erofs file through the pod's virtio-fs share
//! (see shared_fs.rs), as the containers' volumes do, which never runs out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::shared_fs::{self, Share};
use super::vm::{self, CONSOLE_LOG, GUEST_CID, VSOCK_SOCKET};
use super::{Exposed, Rollback, SandboxBackend, SandboxError, StartSpec, Started, Step};
use crate::agent_client::{self, AgentAddr};
use crate::config::Accel;
use crate::cri::image::ResolvedImage;
use crate::cri::store::MountRecord;
use crate::hypervisor::qemu::{self, QemuConfig, QemuDisk, VhostUserFs, VhostVsock};
use crate::process::{Proc, spawn_detached};

/// The guest console (serial and QEMU's own output) is cut back to its
/// last [`CONSOLE_KEEP`] bytes, kept in `console.log.1`, once it passes
/// this size ([`cap_console`], run every few seconds by the daemon).
pub const CONSOLE_MAX: u64 = 4 << 20;
/// What a cut keeps of the console.
pub const CONSOLE_KEEP: u64 = 1 << 20;

/// QEMU's microvm machine's virtio-mmio transports (hw/i386/microvm.c).
pub const MICROVM_TRANSPORTS: usize = 8;

/// How long vhost-device-vsock gets to create its socket.
const VSOCK_START: Duration = Duration::from_secs(10);

/// A QEMU pod: its processes and boot disks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QemuState {
    pub qemu: Option<Proc>,
    pub vsock: Option<Proc>,
    pub virtiofsd: Option<Proc>,
    /// The hybrid-vsock socket.
    pub uds: PathBuf,
    /// Image ID → the serial of its boot disk in the guest.
    #[serde(default)]
    pub image_disks: BTreeMap<String, String>,
    /// The tap in the pod's netns, when the VM has a NIC.
    #[serde(default)]
    pub tap: Option<String>,
}

impl SandboxBackend for QemuState {
    async fn start(
        spec: &StartSpec<'_>,
        undo: &mut Rollback,
    ) -> Result<(Self, Started), SandboxError> {
        let handler = spec.handler;
        let (dir, sockets) = (spec.dir, spec.sockets);
        let (kernel, initramfs) = vm::guest_files(handler)?;
        // Its processes join the pod's cgroup: remove it after them.
        undo.push(Step::RemoveCgroups {
            parent: spec.cgroup_parent.to_string(),
        });
        let mut nic = None;
        if let (Some(netns), Some(result)) = (spec.netns, spec.addressed) {
            // The tap dies with the namespace; nothing to undo by itself.
            nic = Some(crate::network::tap::connect(netns, result).await?);
        }

        let vhost_socket = sockets.join("vhost.sock");
        let uds = sockets.join(VSOCK_SOCKET);
        let mut vsock_cmd = std::process::Command::new(VhostVsock::binary());
        vsock_cmd
            .arg("--guest-cid")
            .arg(GUEST_CID.to_string())
            .arg("--socket")
            .arg(&vhost_socket)
            .arg("--uds-path")
            .arg(&uds);
        let vsock_log = dir.join("vhost-device-vsock.log");
        let vsock = vm::started(spawn_detached(vsock_cmd, None, &vsock_log)?, undo);
        let deadline = Instant::now() + VSOCK_START;
        while !vhost_socket.exists() {
            if !vsock.is_some_and(|p| p.alive()) || Instant::now() >= deadline {
                return Err(SandboxError::Failed(format!(
                    "vhost-device-vsock did not create {}:\n{}",
                    vhost_socket.display(),
                    vm::tail(&vsock_log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (virtiofsd, fs_socket) = vm::start_share(dir, sockets, undo)?;

        let mut cfg = QemuConfig::new(
            kernel,
            initramfs,
            match handler.accel.unwrap_or(Accel::Kvm) {
                Accel::Kvm => qemu::Accel::Kvm,
                Accel::Tcg => qemu::Accel::Tcg,
            },
        );
        cfg.vcpus = handler.base_vcpus();
        cfg.memory_mib = handler.base_memory_mib();
        cfg.vhost_user_vsock = Some(vhost_socket);
        cfg.vhost_user_fs = Some(VhostUserFs {
            socket: fs_socket,
            tag: shared_fs::TAG.into(),
        });
        cfg.extra_cmdline = handler.kernel_args.clone().unwrap_or_default();
        let mut image_disks = BTreeMap::new();
        // vsock and the share always, the NIC when there is one.
        let free = MICROVM_TRANSPORTS - 2 - usize::from(nic.is_some());
        for (i, img) in spec.images.iter().take(free).enumerate() {
            let serial = format!("img{i}");
            cfg.disks.push(QemuDisk {
                path: img.erofs_path.clone(),
                read_only: true,
                serial: serial.clone(),
            });
            image_disks.insert(img.id.clone(), serial);
        }
        // With a network, QEMU runs in the pod's namespace, where its tap is.
        cfg.net = nic.as_ref().map(|n| qemu::QemuNet {
            tap: n.tap.clone(),
            mac: n.mac.clone(),
        });
        let netns = nic.as_ref().map(|n| n.netns.as_path());
        let qemu = vm::started(
            spawn_detached(cfg.command(), netns, &dir.join(CONSOLE_LOG))?,
            undo,
        );
        let state = QemuState {
            qemu,
            vsock,
            virtiofsd,
            uds,
            image_disks,
            tap: nic.as_ref().map(|n| n.tap.clone()),
        };
        let pids: Vec<i32> = state.processes().iter().map(|p| p.pid).collect();
        super::cgroups::join_cgroups(spec.cgroup_parent, &pids)?;

        let booted = Instant::now();
        vm::wait_console_ready(dir, &state.vital(), handler.boot_timeout()).await?;
        let left = handler
            .boot_timeout()
            .saturating_sub(booted.elapsed())
            .max(Duration::from_secs(10));
        let agent = agent_client::connect_ready(&state.agent_addr(), left)
            .await
            .map_err(|e| {
                SandboxError::Timeout(format!(
                    "the pod VM's agent did not answer: {}\nconsole:\n{}",
                    crate::error_chain(&e),
                    vm::console_tail(dir)
                ))
            })?;
        let interfaces = nic.map(|n| vec![n.interface]).unwrap_or_default();
        Ok((state, Started { agent, interfaces }))
    }

    fn agent_addr(&self) -> AgentAddr {
        AgentAddr::HybridVsock {
            uds: self.uds.clone(),
            port: vmpod_proto::AGENT_VSOCK_PORT,
        }
    }

    fn vital(&self) -> Vec<Proc> {
        self.qemu.into_iter().chain(self.vsock).collect()
    }

    fn processes(&self) -> Vec<Proc> {
        self.vital().into_iter().chain(self.virtiofsd).collect()
    }

    async fn stop(&self, dir: &Path, grace: Duration) -> Result<(), SandboxError> {
        // The guest ends by rebooting after the agent's Shutdown, which
        // QEMU (-no-reboot) turns into its exit; then its helpers go.
        if let Some(qemu) = self.qemu {
            qemu.end(grace).await;
        }
        for helper in self.vsock.into_iter().chain(self.virtiofsd) {
            helper.end(Duration::ZERO).await;
        }
        // Nothing reads the share once the VM is gone: a stopped pod holds
        // no host mounts.
        Share::new(dir).teardown()?;
        Ok(())
    }

    async fn expose(
        &mut self,
        dir: &Path,
        container_id: &str,
        image: &ResolvedImage,
        mounts: &[MountRecord],
        scratch: Option<&Path>,
        _in_use: &BTreeSet<String>,
    ) -> Result<Exposed, SandboxError> {
        // Volumes, the writable-layer file, and an image that has no boot
        // disk reach the guest through the pod's virtio-fs share.
        let boot_disk = self.image_disks.get(&image.id);
        let late_image = boot_disk.is_none().then_some(image.erofs_path.as_path());
        let exposed = Share::new(dir).expose(container_id, mounts, late_image, scratch)?;
        Ok(Exposed {
            rootfs_source: match boot_disk {
                Some(serial) => format!("serial:{serial}"),
                None => exposed.rootfs_source.unwrap_or_default(),
            },
            mount_sources: exposed.mount_sources,
            scratch_source: exposed.scratch_source.unwrap_or_default(),
        })
    }

    fn withdraw(&self, dir: &Path, container_id: &str) -> Result<(), SandboxError> {
        Ok(Share::new(dir).withdraw(container_id)?)
    }

    async fn release_images(&mut self, _in_use: &BTreeSet<String>) {
        // Boot disks stay for the VM's life; late images leave the share
        // with their container (withdraw).
    }
}

/// Caps a QEMU pod's console log: past `max` bytes, its last `keep`
/// bytes go to `console.log.1` and the log is truncated in place
/// (copy-truncate: QEMU holds it open with O_APPEND, so its next write
/// lands at the new end). Returns whether it cut.
pub fn cap_console(dir: &Path, max: u64, keep: u64) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let path = dir.join(CONSOLE_LOG);
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len <= max {
        return Ok(false);
    }
    f.seek(SeekFrom::Start(len.saturating_sub(keep)))?;
    let mut rotated = std::fs::File::create(dir.join(format!("{CONSOLE_LOG}.1")))?;
    std::io::copy(&mut f.take(keep), &mut rotated)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)?
        .set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_past_its_cap_keeps_only_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(CONSOLE_LOG);
        // As QEMU holds it: open for appending.
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        use std::io::Write;
        writer.write_all(&[b'a'; 900]).unwrap();
        assert!(!cap_console(tmp.path(), 1000, 100).unwrap());
        writer.write_all(&[b'b'; 200]).unwrap();
        assert!(cap_console(tmp.path(), 1000, 100).unwrap());
        assert_eq!(
            std::fs::read(tmp.path().join("console.log.1")).unwrap(),
            vec![b'b'; 100]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // The writer goes on at the new end, with no hole before it.
        writer.write_all(b"after").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"after");
        assert!(!cap_console(&tmp.path().join("none"), 1, 1).unwrap());
    }
}
