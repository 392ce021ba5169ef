//! The VM sandbox backend on the `vmpod` hypervisor: one `vmpod-vmm`
//! process per pod (our own KVM VMM), the agent as PID 1 of the guest,
//! reached over the VMM's own hybrid vsock (no vhost-device-vsock).
//!
//! ```text
//! <state dir>/sandboxes/<id>/vmm.json     the VMM's configuration
//!                           /vmm.log      the VMM's own stderr (its exit reason)
//!                           /console.log  the guest's serial console
//! <state dir>/s/<id prefix>/vmm.sock      the VMM's control socket (JSON lines)
//!                          /vsock.sock    hybrid vsock (`CONNECT <port>\n`)
//! ```
//!
//! The VMM runs in its own session, outlives a daemon restart, and is
//! re-adopted by its recorded PID and start time like QEMU is. A daemon that
//! ends during RunPodSandbox leaves a CREATING record whose undo journal
//! names the VMM: the next daemon's reaper ends it (see rollback.rs).
//!
//! Images are hot-plugged: the VMM starts with `block_slots` empty
//! virtio-blk slots; CreateContainer attaches the image's erofs read-only to
//! a free slot through the control socket (`block_attach`) the first time a
//! container of the pod uses it, and records the slot's serial in the
//! sandbox's [`VmmState::image_disks`] (persisted, so a restarted daemon knows
//! the slots). RemoveContainer detaches images no container of the pod uses
//! any more, once the agent has released the container's rootfs; a slot left
//! taken by a failed CreateContainer is reclaimed when the slots run out.
//! Reusing a slot is safe for the guest's page cache: Linux drops a block
//! device's cached pages when its last opener (the erofs mount) closes it.
//!
//! Known gap on the guest side: the guest learns a new capacity from a
//! config-change interrupt handled on a kernel workqueue, so an agent that
//! mounts the disk in the instant after `block_attach` returns could still
//! see capacity 0; the agent's `serial:` lookup should wait (bounded) for a
//! non-zero size.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use vmpod_proto::v1::agent_client::AgentClient;

use super::shared_fs::{self, Share};
use super::vm::{self, CONSOLE_LOG, GUEST_CID, VSOCK_SOCKET};
use super::{Exposed, Rollback, SandboxBackend, SandboxError, StartSpec, Started, Step};
use crate::agent_client::{self, AgentAddr};
use crate::config::Handler;
use crate::cri::image::ResolvedImage;
use crate::cri::store::MountRecord;
use crate::network::tap::GuestNic;
use crate::process::Proc;
use vmpod_vmm::config::{
    BlockSlotConfig, DEFAULT_FS_QUEUE_SIZE, FsConfig, NetConfig, SerialConfig, VmmConfig,
    VsockConfig, block_slot_serial,
};
use vmpod_vmm::control::{CallError, ControlRequest, PROTOCOL_VERSION};
use vmpod_vmm::jail::JailConfig;

/// The VMM's configuration file in the sandbox dir.
pub const CONFIG_FILE: &str = "vmm.json";
/// The jailed VMM's (empty) root in the sandbox dir.
pub const JAIL_ROOT: &str = "jail";
/// The VMM's stderr in the sandbox dir.
pub const VMM_LOG: &str = "vmm.log";
/// The control socket in the sandbox's socket dir.
pub const CONTROL_SOCKET: &str = "vmm.sock";
/// The guest kernel's command line: the console on the VMM's 16550 (and
/// early, so a kernel that dies before its console driver still tells why),
/// `reboot=k` because the VMM's only reset is the i8042's, `panic=-1` so a
/// panicking guest ends its VM, and no i8042 AUX/MUX probing (the VMM's
/// i8042 has neither).
pub const GUEST_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1 \
                                 i8042.noaux i8042.nomux i8042.dumbkbd";
/// The VMM's own memory beyond guest RAM that its cgroup allows (its
/// binary, device buffers, page tables; an idle VMM uses ~4 MiB).
const VMM_MEMORY_OVERHEAD: u64 = 128 << 20;
/// Tasks a VMM's cgroup allows beyond one per vCPU.
const VMM_SPARE_TASKS: u32 = 16;
/// How long the VMM gets to build the VM and answer on its control socket.
const VMM_START: Duration = Duration::from_secs(10);
/// The bound on one control-socket request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a VMM outlives the shutdown deadline it was given before it is
/// SIGKILLed.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(2);

/// Errors of the `vmpod` hypervisor's host side.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("writing the VMM configuration {path}")]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the rendered VMM configuration is invalid")]
    Config(#[from] vmpod_vmm::config::ConfigError),
    #[error("starting the VMM")]
    Spawn(#[from] crate::process::SpawnError),
    #[error(transparent)]
    Control(#[from] CallError),
    #[error(transparent)]
    Cgroup(#[from] super::cgroups::CgroupError),
    #[error("opening the disk {path} to pass it to the VMM")]
    OpenDisk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the VMM speaks control protocol {found:?}, this daemon {expected} \
         (install vmpod and vmpod-vmm from the same build)"
    )]
    Protocol { found: Option<u64>, expected: u32 },
}

/// The VMM configuration of a pod VM: `handler` already sized, the files
/// in the sandbox dir `dir`, the sockets in `sockets`, every block slot
/// empty and read-only until an image is attached, and the guest NIC on
/// `nic`'s tap when the pod has a network.
pub fn vmm_config(
    dir: &Path,
    sockets: &Path,
    handler: &Handler,
    nic: Option<&GuestNic>,
    fs_socket: Option<&Path>,
) -> Result<VmmConfig, SandboxError> {
    // The jail's root: an empty directory in the sandbox dir. Its uid/gid
    // are derived from the sandbox ID (the dir's name).
    let jail = handler.jail().then(|| {
        let id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (uid, gid) = handler.vmm_ids(&id);
        JailConfig {
            root: dir.join(JAIL_ROOT),
            uid,
            gid,
            // Without a NIC the VMM needs no network at all.
            new_netns: nic.is_none(),
        }
    });
    let (kernel, initramfs) = vm::guest_files(handler)?;
    let vcpus = u8::try_from(handler.base_vcpus()).map_err(|_| {
        SandboxError::Invalid(format!("{} vCPUs is too many", handler.base_vcpus()))
    })?;
    let slots = usize::try_from(handler.block_slots()).unwrap_or(usize::MAX);
    let cfg = VmmConfig {
        vcpus,
        memory_mib: handler.base_memory_mib(),
        kernel,
        initramfs: Some(initramfs),
        cmdline: match handler.kernel_args.as_deref() {
            Some(args) if !args.trim().is_empty() => format!("{GUEST_CMDLINE} {}", args.trim()),
            _ => GUEST_CMDLINE.into(),
        },
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: sockets.join(VSOCK_SOCKET),
        }),
        block: vec![
            BlockSlotConfig {
                path: None,
                read_only: true,
            };
            slots
        ],
        net: nic.map(|n| NetConfig {
            tap: n.tap.clone(),
            mac: n.mac.clone(),
        }),
        // The pod's share (CRI mounts) through virtiofsd; guest RAM is then
        // shared memory, which virtiofsd maps.
        fs: fs_socket.map(|socket| FsConfig {
            socket: socket.to_path_buf(),
            tag: shared_fs::TAG.into(),
            queue_size: DEFAULT_FS_QUEUE_SIZE,
        }),
        shared_memory: false,
        serial: Some(SerialConfig {
            path: dir.join(CONSOLE_LOG),
        }),
        control_socket: Some(sockets.join(CONTROL_SOCKET)),
        seccomp: true,
        jail,
    };
    cfg.validate().map_err(VmmError::Config)?;
    Ok(cfg)
}

/// Writes `cfg` to `<dir>/vmm.json` and starts `vmpod-vmm --config` on it
/// in its own session (in `netns`, where its tap is, when the pod has a
/// network; in the pod's cgroup `cgroup` from its first instruction),
/// stderr to `<dir>/vmm.log`. Returns its PID: with a jail, the process
/// that waits for the jailed VMM and ends with it.
pub fn spawn_vmm(
    dir: &Path,
    cfg: &VmmConfig,
    netns: Option<&Path>,
    cgroup: Option<&str>,
) -> Result<i32, VmmError> {
    spawn_vmm_with(&crate::vmm_binary(), dir, cfg, netns, cgroup)
}

/// [`spawn_vmm`] with the `vmpod-vmm` binary given (tests run their build).
pub fn spawn_vmm_with(
    vmm: &Path,
    dir: &Path,
    cfg: &VmmConfig,
    netns: Option<&Path>,
    cgroup: Option<&str>,
) -> Result<i32, VmmError> {
    let path = dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(cfg).map_err(|e| VmmError::WriteConfig {
        path: path.clone(),
        source: e.into(),
    })?;
    std::fs::write(&path, json).map_err(|source| VmmError::WriteConfig {
        path: path.clone(),
        source,
    })?;
    if let Some(jail) = &cfg.jail {
        std::fs::create_dir_all(&jail.root).map_err(|source| VmmError::WriteConfig {
            path: jail.root.clone(),
            source,
        })?;
    }
    let cgroups = match cgroup {
        Some(parent) => super::cgroups::prepare(parent)?,
        None => Vec::new(),
    };
    let mut cmd = std::process::Command::new(vmm);
    cmd.arg("--config")
        .arg(&path)
        // The jail's test hook is for tests that start the VMM themselves.
        .env_remove("VMPOD_VMM_JAIL_PROBE");
    Ok(crate::process::spawn_detached_in(
        cmd,
        netns,
        &dir.join(VMM_LOG),
        &cgroups,
    )?)
}

/// One control-socket request (blocking, bounded by [`CONTROL_TIMEOUT`]).
pub fn control(socket: &Path, request: &ControlRequest) -> Result<serde_json::Value, VmmError> {
    Ok(vmpod_vmm::control::call(socket, request, CONTROL_TIMEOUT)?)
}

async fn control_async(
    socket: PathBuf,
    request: ControlRequest,
) -> Result<serde_json::Value, VmmError> {
    let op = request.op();
    on_control_thread(op, move || control(&socket, &request)).await
}

/// Runs a blocking control-socket exchange `call` (for `op`) off the async
/// runtime.
async fn on_control_thread(
    op: &'static str,
    call: impl FnOnce() -> Result<serde_json::Value, VmmError> + Send + 'static,
) -> Result<serde_json::Value, VmmError> {
    tokio::task::spawn_blocking(call).await.unwrap_or_else(|e| {
        Err(VmmError::Control(CallError::Refused {
            op,
            message: format!("the control thread failed: {e}"),
        }))
    })
}

/// Attaches the disk at `path` read-only to block slot `slot`: the daemon
/// opens it and passes the descriptor (a jailed VMM opens no paths).
pub fn attach_disk(socket: &Path, slot: usize, path: &Path) -> Result<serde_json::Value, VmmError> {
    use std::os::fd::AsFd;
    let disk = std::fs::File::open(path).map_err(|source| VmmError::OpenDisk {
        path: path.to_path_buf(),
        source,
    })?;
    let request = ControlRequest::BlockAttach {
        slot,
        path: path.to_path_buf(),
        read_only: true,
    };
    Ok(vmpod_vmm::control::call_with_fd(
        socket,
        &request,
        Some(disk.as_fd()),
        CONTROL_TIMEOUT,
    )?)
}

/// Waits until the VMM answers `status` on its control socket. Errors (with
/// the VMM's log) when it exits first or `timeout` passes.
pub async fn wait_vmm_ready(
    dir: &Path,
    socket: &Path,
    pid: i32,
    timeout: Duration,
) -> Result<(), SandboxError> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no control socket yet");
    loop {
        if !crate::process::alive(pid) {
            return Err(SandboxError::Failed(format!(
                "the VMM exited while starting:\n{}",
                vm::tail(&dir.join(VMM_LOG))
            )));
        }
        if socket.exists() {
            match control_async(socket.to_path_buf(), ControlRequest::Status).await {
                Ok(reply) => {
                    let found = reply["protocol"].as_u64();
                    if found != Some(u64::from(PROTOCOL_VERSION)) {
                        return Err(VmmError::Protocol {
                            found,
                            expected: PROTOCOL_VERSION,
                        }
                        .into());
                    }
                    return Ok(());
                }
                Err(e) => last = crate::error_chain(&e),
            }
        }
        if Instant::now() >= deadline {
            return Err(SandboxError::Timeout(format!(
                "the VMM did not answer on {} within {timeout:?} ({last}):\n{}",
                socket.display(),
                vm::tail(&dir.join(VMM_LOG))
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the guest's agent to answer Health, or for the VMM to end,
/// whichever comes first: a VM that died says so at once, not after the
/// whole boot timeout. Errors carry the console's last lines.
pub async fn wait_agent(
    dir: &Path,
    addr: &AgentAddr,
    pid: i32,
    timeout: Duration,
) -> Result<AgentClient<Channel>, SandboxError> {
    let vmm_gone = async {
        while crate::process::alive(pid) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        r = agent_client::connect_ready(addr, timeout) => r.map_err(|e| {
            SandboxError::Timeout(format!(
                "the pod VM's agent did not answer within {timeout:?} (boot_timeout_secs): {}\n\
                 console (last lines):\n{}",
                crate::error_chain(&e),
                vm::console_tail(dir)
            ))
        }),
        () = vmm_gone => Err(SandboxError::Failed(format!(
            "the pod VM ended before its agent answered: {}\nconsole (last lines):\n{}",
            vm::tail(&dir.join(VMM_LOG)).lines().last().unwrap_or("(no VMM log)"),
            vm::console_tail(dir)
        ))),
    }
}

/// Ends a pod's VMM: a graceful shutdown through its control socket (the
/// guest gets Ctrl-Alt-Del; the VMM stops the VM itself at `timeout`), then
/// SIGKILL if it is still there [`SHUTDOWN_MARGIN`] later. A VMM whose guest
/// already rebooted (after the agent's Shutdown) is gone before that.
pub async fn end_vmm(socket: &Path, vmm: Proc, timeout: Duration) {
    if vmm.alive() {
        let req = ControlRequest::Shutdown {
            timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        };
        if let Err(e) = control_async(socket.to_path_buf(), req).await {
            // Usually: the guest rebooted and the VMM is on its way out.
            tracing::debug!(pid = vmm.pid, error = %crate::error_chain(&e), "VMM shutdown request");
        }
    }
    vmm.end(timeout + SHUTDOWN_MARGIN).await;
    // A jailed VMM cannot remove its sockets (it no longer sees them).
    for path in [socket.to_path_buf(), socket.with_file_name(VSOCK_SOCKET)] {
        let _ = std::fs::remove_file(path);
    }
}

/// The slot a serial of ours names (`vmpod-slot<N>`).
fn slot_of(serial: &str) -> Option<usize> {
    let n: usize = serial.strip_prefix("vmpod-slot")?.parse().ok()?;
    (block_slot_serial(n) == serial).then_some(n)
}

/// The lowest slot of `slots` that no image in `image_disks` holds.
pub fn free_slot(image_disks: &BTreeMap<String, String>, slots: usize) -> Option<usize> {
    let taken: BTreeSet<usize> = image_disks.values().filter_map(|s| slot_of(s)).collect();
    (0..slots).find(|s| !taken.contains(s))
}

/// Images in `image_disks` that no container in `in_use` needs, with their slots.
pub fn unused_disks(
    image_disks: &BTreeMap<String, String>,
    in_use: &BTreeSet<String>,
) -> Vec<(String, usize)> {
    image_disks
        .iter()
        .filter(|(image, _)| !in_use.contains(*image))
        .filter_map(|(image, serial)| slot_of(serial).map(|slot| (image.clone(), slot)))
        .collect()
}

/// A pod VM on the `vmpod` hypervisor: the VMM, its sockets, its block
/// slots and which image each holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmState {
    pub vmm: Option<Proc>,
    /// The pod share's virtiofsd (pods from before the VMM had virtio-fs
    /// have none).
    #[serde(default)]
    pub virtiofsd: Option<Proc>,
    pub control_socket: PathBuf,
    /// The hybrid-vsock socket.
    pub uds: PathBuf,
    /// How many block slots the VM has.
    pub block_slots: usize,
    /// Image ID → the serial of the slot holding it.
    #[serde(default)]
    pub image_disks: BTreeMap<String, String>,
    /// The tap in the pod's netns, when the VM has a NIC.
    #[serde(default)]
    pub tap: Option<String>,
}

impl SandboxBackend for VmmState {
    /// The VMM with `block_slots` empty slots, then the agent over hybrid
    /// vsock.
    async fn start(
        spec: &StartSpec<'_>,
        undo: &mut Rollback,
    ) -> Result<(Self, Started), SandboxError> {
        let (dir, sockets) = (spec.dir, spec.sockets);
        // As on QEMU: a tap beside CNI's eth0 in the pod's namespace, tc
        // redirecting between them; the VMM runs in that namespace and its
        // virtio-net device takes eth0's MAC. The tap dies with the
        // namespace; nothing to undo by itself.
        let mut nic = None;
        if let (Some(netns), Some(result)) = (spec.netns, spec.addressed) {
            nic = Some(crate::network::tap::connect(netns, result).await?);
        }
        undo.push(Step::RemoveCgroups {
            parent: spec.cgroup_parent.to_string(),
        });
        // As on QEMU: the pod's share, exported by its own virtiofsd, which
        // must listen before the VMM connects to it while it builds the VM.
        let (virtiofsd, fs_socket) = vm::start_share(dir, sockets, undo)?;
        let cfg = vmm_config(dir, sockets, spec.handler, nic.as_ref(), Some(&fs_socket))?;
        let pid = spawn_vmm(
            dir,
            &cfg,
            nic.as_ref().map(|n| n.netns.as_path()),
            Some(spec.cgroup_parent),
        )?;
        let vmm = vm::started(pid, undo);
        // The pod cgroup holds only the VMM: bound its memory (guest RAM
        // plus the VMM's own) and its tasks (vCPU threads, the event loop,
        // the waiting parent, a few spare).
        super::cgroups::limit_vmm(
            spec.cgroup_parent,
            (u64::from(cfg.memory_mib) << 20) + VMM_MEMORY_OVERHEAD,
            u32::from(cfg.vcpus) + VMM_SPARE_TASKS,
        )?;
        if let Some(p) = virtiofsd {
            super::cgroups::join_cgroups(spec.cgroup_parent, &[p.pid])?;
        }
        let state = VmmState {
            vmm,
            virtiofsd,
            control_socket: sockets.join(CONTROL_SOCKET),
            uds: sockets.join(VSOCK_SOCKET),
            block_slots: cfg.block.len(),
            image_disks: BTreeMap::new(),
            tap: nic.as_ref().map(|n| n.tap.clone()),
        };
        wait_vmm_ready(dir, &state.control_socket, pid, VMM_START).await?;
        tracing::debug!(sandbox = %spec.id, pid, vcpus = cfg.vcpus, memory_mib = cfg.memory_mib, "VMM up");
        let agent = wait_agent(dir, &state.agent_addr(), pid, spec.handler.boot_timeout()).await?;
        Ok((
            state,
            Started {
                agent,
                interfaces: nic.map(|n| vec![n.interface]).unwrap_or_default(),
            },
        ))
    }

    fn agent_addr(&self) -> AgentAddr {
        AgentAddr::HybridVsock {
            uds: self.uds.clone(),
            port: vmpod_proto::AGENT_VSOCK_PORT,
        }
    }

    fn vital(&self) -> Vec<Proc> {
        self.vmm.into_iter().collect()
    }

    fn processes(&self) -> Vec<Proc> {
        self.vital().into_iter().chain(self.virtiofsd).collect()
    }

    async fn stop(&self, dir: &Path, grace: Duration) -> Result<(), SandboxError> {
        // A guest ends by rebooting (reboot=k), which the VMM turns into
        // its exit; it is also asked through its control socket.
        if let Some(vmm) = self.vmm {
            end_vmm(&self.control_socket, vmm, grace).await;
        }
        // virtiofsd ends when the VMM hangs up; make sure.
        if let Some(p) = self.virtiofsd {
            p.end(Duration::ZERO).await;
        }
        // Nothing reads the share once the VM is gone.
        Share::new(dir).teardown()?;
        Ok(())
    }

    /// Attaches the image to a free block slot unless the VM has it
    /// already. No volumes: this hypervisor has no shared filesystem yet.
    async fn expose(
        &mut self,
        dir: &Path,
        container_id: &str,
        image: &ResolvedImage,
        mounts: &[MountRecord],
        scratch: Option<&Path>,
        in_use: &BTreeSet<String>,
    ) -> Result<Exposed, SandboxError> {
        if scratch.is_some() {
            return Err(SandboxError::Precondition(
                "the vmpod hypervisor keeps writable layers in memory; a disk-backed one needs \
                 a handler with hypervisor = \"qemu\""
                    .into(),
            ));
        }
        // CRI mounts go through the pod's virtio-fs share, as on QEMU.
        let mount_sources = if mounts.is_empty() {
            Vec::new()
        } else {
            if self.virtiofsd.is_none() {
                return Err(SandboxError::Precondition(
                    "this pod's VM was started before the vmpod VMM had a shared filesystem; \
                     containers with mounts need a new pod"
                        .into(),
                ));
            }
            Share::new(dir)
                .expose(container_id, mounts, None, None)?
                .mount_sources
        };
        let serial = self.attach(image, in_use).await?;
        Ok(Exposed {
            rootfs_source: format!("serial:{serial}"),
            mount_sources,
            ..Default::default()
        })
    }

    fn withdraw(&self, dir: &Path, container_id: &str) -> Result<(), SandboxError> {
        if self.virtiofsd.is_none() {
            return Ok(());
        }
        Ok(Share::new(dir).withdraw(container_id)?)
    }

    /// Detaches the images no container of the pod uses. Errors are
    /// logged: the slot stays taken and is retried later.
    async fn release_images(&mut self, in_use: &BTreeSet<String>) {
        for (image, slot) in unused_disks(&self.image_disks, in_use) {
            let req = ControlRequest::BlockDetach { slot };
            match control_async(self.control_socket.clone(), req).await {
                Ok(_) => {
                    self.image_disks.remove(&image);
                    tracing::info!(image, slot, "image disk detached");
                }
                Err(e) => {
                    tracing::warn!(image, slot, error = %crate::error_chain(&e), "detaching an image disk")
                }
            }
        }
    }
}

impl VmmState {
    /// The serial of the slot holding `image`, attaching it to the lowest
    /// free slot first if needed. Slots held by images no container needs
    /// any more (a CreateContainer that failed after its attach) come back
    /// when the slots run out.
    async fn attach(
        &mut self,
        image: &ResolvedImage,
        in_use: &BTreeSet<String>,
    ) -> Result<String, SandboxError> {
        if let Some(serial) = self.image_disks.get(&image.id) {
            return Ok(serial.clone());
        }
        if !image.erofs_path.is_absolute() {
            return Err(SandboxError::Failed(format!(
                "image {} has a relative disk path {}",
                image.id,
                image.erofs_path.display()
            )));
        }
        let slot = match free_slot(&self.image_disks, self.block_slots) {
            Some(slot) => slot,
            None => {
                self.release_images(in_use).await;
                free_slot(&self.image_disks, self.block_slots).ok_or_else(|| {
                    SandboxError::Exhausted(format!(
                        "the pod uses {} images, every block slot of its VM (block_slots in the \
                         handler); remove containers of other images first",
                        self.block_slots
                    ))
                })?
            }
        };
        let (socket, path) = (self.control_socket.clone(), image.erofs_path.clone());
        on_control_thread("block_attach", move || attach_disk(&socket, slot, &path)).await?;
        let serial = block_slot_serial(slot);
        self.image_disks.insert(image.id.clone(), serial.clone());
        tracing::info!(image = %image.id, slot, "image disk attached");
        Ok(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Hypervisor};

    fn handler() -> Handler {
        let mut h = Handler::new(Backend::Vm);
        h.hypervisor = Some(Hypervisor::Vmpod);
        h
    }

    #[test]
    fn renders_a_config_the_vmm_accepts() {
        let tmp = tempfile::tempdir().unwrap();
        let (kernel, initramfs) = (tmp.path().join("vmlinux"), tmp.path().join("initrd"));
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initramfs, b"i").unwrap();
        let mut h = handler();
        h.kernel = Some(kernel.clone());
        h.initramfs = Some(initramfs.clone());
        h.block_slots = Some(3);
        h.vcpus = Some(2);
        h.memory_mib = Some(300);
        let (dir, sockets) = (tmp.path().join("sb"), tmp.path().join("s"));
        let cfg = vmm_config(&dir, &sockets, &h, None, None).unwrap();
        assert_eq!((cfg.vcpus, cfg.memory_mib), (2, 300));
        assert_eq!(cfg.kernel, kernel);
        assert_eq!(cfg.initramfs, Some(initramfs));
        assert_eq!(cfg.block.len(), 3);
        assert!(cfg.block.iter().all(|b| b.path.is_none() && b.read_only));
        assert_eq!(
            cfg.vsock,
            Some(VsockConfig {
                guest_cid: 3,
                uds_path: sockets.join("vsock.sock")
            })
        );
        assert_eq!(cfg.control_socket, Some(sockets.join("vmm.sock")));
        assert_eq!(cfg.serial.unwrap().path, dir.join("console.log"));
        assert!(cfg.seccomp, "the pod VMM always runs under seccomp");
        for word in ["console=ttyS0", "reboot=k", "panic=-1"] {
            assert!(cfg.cmdline.split(' ').any(|w| w == word), "{word}");
        }
        assert!(cfg.net.is_none());

        // The file the VMM reads back is the same configuration.
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = vmm_config(&dir, &sockets, &h, None, None).unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(VmmConfig::from_json(&json).unwrap(), cfg);

        h.kernel = Some(tmp.path().join("missing"));
        assert!(matches!(
            vmm_config(&dir, &sockets, &h, None, None),
            Err(SandboxError::Precondition(_))
        ));
    }

    #[test]
    fn slots_are_allocated_lowest_free_first() {
        let mut disks = BTreeMap::new();
        assert_eq!(free_slot(&disks, 3), Some(0));
        disks.insert("a".to_string(), block_slot_serial(0));
        disks.insert("b".to_string(), block_slot_serial(2));
        assert_eq!(free_slot(&disks, 3), Some(1));
        disks.insert("c".to_string(), block_slot_serial(1));
        assert_eq!(free_slot(&disks, 3), None);
        assert_eq!(free_slot(&disks, 4), Some(3));
        // QEMU's serials (img<N>) and strangers are not our slots.
        disks.clear();
        disks.insert("q".to_string(), "img0".into());
        disks.insert("x".to_string(), "vmpod-slot01".into());
        assert_eq!(free_slot(&disks, 1), Some(0));
        assert_eq!(slot_of("vmpod-slot15"), Some(15));
        assert_eq!(slot_of("vmpod-slot"), None);
        assert_eq!(slot_of("vmpod-slot-1"), None);
    }

    #[test]
    fn unused_images_are_found_for_detach() {
        let mut disks = BTreeMap::new();
        disks.insert("a".to_string(), block_slot_serial(0));
        disks.insert("b".to_string(), block_slot_serial(1));
        let in_use: BTreeSet<String> = ["a".to_string()].into();
        assert_eq!(unused_disks(&disks, &in_use), vec![("b".to_string(), 1)]);
        assert!(unused_disks(&disks, &["a".into(), "b".into()].into()).is_empty());
    }

    /// A stand-in for the VMM's control socket: answers each request line
    /// (block ops on slots below `slots` succeed) and records it.
    struct FakeVmm {
        requests: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl FakeVmm {
        fn start(path: &Path, slots: u64, fail: bool) -> FakeVmm {
            use std::io::{BufRead, Write};
            let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
            listener.set_nonblocking(true).unwrap();
            let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (r, st) = (requests.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                while !st.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok((conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    conn.set_nonblocking(false).unwrap();
                    let mut line = String::new();
                    std::io::BufReader::new(&conn).read_line(&mut line).unwrap();
                    let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let ok = !fail && req["slot"].as_u64().is_none_or(|s| s < slots);
                    r.lock().unwrap().push(req);
                    let reply = if ok {
                        serde_json::json!({"ok": true})
                    } else {
                        serde_json::json!({"ok": false, "error": "no such slot"})
                    };
                    (&conn).write_all(format!("{reply}\n").as_bytes()).unwrap();
                }
            });
            FakeVmm {
                requests,
                stop,
                thread: Some(thread),
            }
        }

        fn take(&self) -> Vec<serde_json::Value> {
            std::mem::take(&mut *self.requests.lock().unwrap())
        }
    }

    impl Drop for FakeVmm {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// An image whose disk exists (the daemon opens it to pass it on).
    fn image(id: &str) -> ResolvedImage {
        let erofs_path = disk_path(id);
        std::fs::write(&erofs_path, b"erofs").unwrap();
        ResolvedImage {
            id: id.into(),
            name: format!("localhost/{id}:latest"),
            erofs_path,
            config: Default::default(),
        }
    }

    fn disk_path(id: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmpod-unit-{}-{id}.erofs", std::process::id()))
    }

    /// A VM of `slots` slots whose VMM is a fake.
    fn state(tmp: &Path, slots: usize, fail: bool) -> (VmmState, FakeVmm) {
        let socket = tmp.join("vmm.sock");
        let fake = FakeVmm::start(&socket, slots as u64, fail);
        let state = VmmState {
            vmm: None,
            virtiofsd: None,
            control_socket: socket,
            uds: tmp.join("vsock.sock"),
            block_slots: slots,
            image_disks: BTreeMap::new(),
            tap: None,
        };
        (state, fake)
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    async fn expose(
        s: &mut VmmState,
        image_id: &str,
        in_use: &[&str],
    ) -> Result<Exposed, SandboxError> {
        s.expose(
            Path::new("/unused"),
            "c",
            &image(image_id),
            &[],
            None,
            &set(in_use),
        )
        .await
    }

    #[tokio::test]
    async fn containers_attach_and_release_image_disks() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, fake) = state(tmp.path(), 2, false);

        // First container of image a: slot 0, attached read-only.
        let e = expose(&mut s, "a", &[]).await.unwrap();
        assert_eq!(e.rootfs_source, "serial:vmpod-slot0");
        assert_eq!(s.image_disks["a"], "vmpod-slot0");
        assert_eq!(
            fake.take(),
            vec![serde_json::json!({"op": "block_attach", "slot": 0,
                "path": disk_path("a"), "read_only": true})]
        );
        // A second container of the same image needs nothing new.
        expose(&mut s, "a", &["a"]).await.unwrap();
        assert!(fake.take().is_empty());
        let e = expose(&mut s, "b", &["a"]).await.unwrap();
        assert_eq!(e.rootfs_source, "serial:vmpod-slot1");
        assert_eq!(fake.take().len(), 1);

        // Every slot holds an image a container uses: ResourceExhausted,
        // and the VMM is not asked to attach anything.
        let err = expose(&mut s, "c", &["a", "b"]).await.unwrap_err();
        assert!(matches!(err, SandboxError::Exhausted(_)), "{err:?}");
        assert!(fake.take().iter().all(|r| r["op"] != "block_attach"));

        // a's only container is removed: slot 0 is detached ...
        s.release_images(&set(&["b"])).await;
        assert_eq!(
            fake.take(),
            vec![serde_json::json!({"op": "block_detach", "slot": 0})]
        );
        assert!(!s.image_disks.contains_key("a"));
        // ... and c gets it.
        let e = expose(&mut s, "c", &["b"]).await.unwrap();
        assert_eq!(e.rootfs_source, "serial:vmpod-slot0");
        assert_eq!(s.image_disks.len(), 2);
        // The state survives its record.
        let json = serde_json::to_string(&super::super::BackendState::Vmm(s.clone())).unwrap();
        let back: super::super::BackendState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, super::super::BackendState::Vmm(s));
    }

    #[tokio::test]
    async fn a_slot_left_by_a_failed_create_is_reclaimed_when_slots_run_out() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, fake) = state(tmp.path(), 1, false);
        // Attached, but its CreateContainer failed later: no container.
        expose(&mut s, "a", &[]).await.unwrap();
        fake.take();
        expose(&mut s, "b", &[]).await.unwrap();
        assert_eq!(
            fake.take(),
            vec![
                serde_json::json!({"op": "block_detach", "slot": 0}),
                serde_json::json!({"op": "block_attach", "slot": 0,
                    "path": disk_path("b"), "read_only": true}),
            ]
        );
        assert_eq!(s.image_disks.len(), 1);
        assert_eq!(s.image_disks["b"], "vmpod-slot0");
    }

    #[tokio::test]
    async fn a_refused_attach_records_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, fake) = state(tmp.path(), 2, true);
        let err = expose(&mut s, "a", &[]).await.unwrap_err();
        assert!(
            matches!(
                err,
                SandboxError::Vmm(VmmError::Control(CallError::Refused { .. }))
            ),
            "{err:?}"
        );
        assert!(s.image_disks.is_empty());
        assert_eq!(fake.take().len(), 1);
    }

    #[tokio::test]
    async fn volumes_are_refused_in_a_pod_started_without_a_share() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, fake) = state(tmp.path(), 2, false);
        let mount = MountRecord {
            container_path: "/data".into(),
            host_path: "/tmp".into(),
            ..Default::default()
        };
        let err = s
            .expose(
                Path::new("/unused"),
                "c",
                &image("a"),
                &[mount],
                None,
                &set(&[]),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, SandboxError::Precondition(_)), "{err:?}");
        assert!(fake.take().is_empty());
    }
}
