//! The VM sandbox backend on the `vmpod` hypervisor: one `vmpod vmm`
//! process per pod (our own KVM VMM), the agent as PID 1 of the guest,
//! reached over the VMM's own hybrid vsock (no vhost-device-vsock).
//!
//! ```text
//! <state dir>/sandboxes/<id>/vmm.json     the VMM's configuration (its presence marks a vmpod VM)
//!                           /vmm.pid      the VMM's PID and start time, until sandbox.json exists
//!                           /vmm.log      the VMM's own stderr (its exit reason)
//!                           /console.log  the guest's serial console
//! <state dir>/s/<id prefix>/vmm.sock      the VMM's control socket (JSON lines)
//!                          /vsock.sock    hybrid vsock (`CONNECT <port>\n`)
//! ```
//!
//! The VMM runs in its own session, outlives a daemon restart, and is
//! re-adopted by its recorded PID and start time like QEMU is. A daemon that
//! ends during RunPodSandbox leaves a sandbox dir without `sandbox.json`:
//! the next daemon kills that VMM (by `vmm.pid`) and removes its dirs.
//!
//! Images are hot-plugged: the VMM starts with `block_slots` empty
//! virtio-blk slots; CreateContainer attaches the image's erofs read-only to
//! a free slot through the control socket (`block_attach`) the first time a
//! container of the pod uses it, and records the slot's serial in the
//! sandbox record's `image_disks` (persisted, so a restarted daemon knows
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

use k8s_cri::v1::{LinuxContainerResources, LinuxPodSandboxConfig};
use tonic::transport::Channel;
use vmpod_proto::v1::agent_client::AgentClient;

use super::image::ResolvedImage;
use super::sandbox_run::{Rollback, Step};
use super::store::{SandboxRecord, StateDir};
use super::{Cri, CriError, Sandbox, lock};
use crate::agent_client::{self, AgentAddr};
use crate::config::Handler;
use crate::vmm::config::{
    BlockSlotConfig, SerialConfig, VmmConfig, VsockConfig, block_slot_serial,
};

/// The VMM's configuration file in the sandbox dir.
pub const CONFIG_FILE: &str = "vmm.json";
/// The VMM's PID and start time in the sandbox dir.
pub const PID_FILE: &str = "vmm.pid";
/// The VMM's stderr in the sandbox dir.
pub const VMM_LOG: &str = "vmm.log";
/// The guest console in the sandbox dir.
pub const CONSOLE_LOG: &str = "console.log";
/// The control socket in the sandbox's socket dir.
pub const CONTROL_SOCKET: &str = "vmm.sock";
/// The hybrid-vsock socket in the sandbox's socket dir.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The guest's vsock context ID (every pod VM has its own vsock device).
const GUEST_CID: u32 = 3;
/// The guest kernel's command line: the console on the VMM's 16550 (and
/// early, so a kernel that dies before its console driver still tells why),
/// `reboot=k` because the VMM's only reset is the i8042's, `panic=-1` so a
/// panicking guest ends its VM, and no i8042 AUX/MUX probing (the VMM's
/// i8042 has neither).
pub const GUEST_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1 \
                                 i8042.noaux i8042.nomux i8042.dumbkbd";
/// How long the VMM gets to build the VM and answer on its control socket.
const VMM_START: Duration = Duration::from_secs(10);
/// The bound on one control-socket request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a VMM outlives the shutdown deadline it was given before it is
/// SIGKILLed.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(2);
/// Lines of the console and the VMM log put into error messages.
const TAIL_LINES: usize = 20;

/// Errors of the `vmpod` hypervisor's host side.
#[derive(Debug, thiserror::Error)]
pub enum VmmSandboxError {
    #[error("writing the VMM configuration {path}")]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the rendered VMM configuration is invalid")]
    Config(#[from] crate::vmm::config::ConfigError),
    #[error("finding the vmpod binary to run the VMM")]
    CurrentExe(#[source] std::io::Error),
    #[error("starting the VMM")]
    Spawn(#[from] crate::process::SpawnError),
    #[error("control request {op} on {path}")]
    Control {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM refused {op}: {message}")]
    Refused { op: &'static str, message: String },
}

/// The VM size a pod gets: the handler's defaults plus the pod's own
/// limits, as Kata sizes its VMs (default vCPUs + ⌈quota/period⌉, default
/// memory + the memory limit), bounded by the handler's maxima.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// Sizes a pod's VM from its handler and `PodSandboxConfig.linux.resources`.
/// Requests beyond the handler's `max_vcpus`/`max_memory_mib`, and CPU quotas
/// without a period, are InvalidArgument.
pub fn size_vm(
    handler: &Handler,
    resources: Option<&LinuxContainerResources>,
) -> Result<VmSize, CriError> {
    const MIB: u64 = 1 << 20;
    let mut vcpus = u64::from(handler.base_vcpus());
    let mut memory_mib = u64::from(handler.base_memory_mib());
    if let Some(r) = resources {
        // A quota ≤ 0 is "no limit" (cgroup v1 writes -1 for it).
        if r.cpu_quota > 0 {
            if r.cpu_period <= 0 {
                return Err(CriError::InvalidArgument(format!(
                    "linux.resources.cpu_quota {} needs a positive cpu_period, not {}",
                    r.cpu_quota, r.cpu_period
                )));
            }
            // Both positive i64: the casts are exact.
            vcpus += (r.cpu_quota as u64).div_ceil(r.cpu_period as u64);
        }
        if r.memory_limit_in_bytes > 0 {
            memory_mib += (r.memory_limit_in_bytes as u64).div_ceil(MIB);
        }
    }
    if vcpus > u64::from(handler.max_vcpus()) {
        return Err(CriError::InvalidArgument(format!(
            "the pod needs {vcpus} vCPUs (the handler's {} plus its CPU limit), more than the \
             handler's max_vcpus {}",
            handler.base_vcpus(),
            handler.max_vcpus()
        )));
    }
    if memory_mib > u64::from(handler.max_memory_mib()) {
        return Err(CriError::InvalidArgument(format!(
            "the pod needs {memory_mib} MiB of guest memory (the handler's {} plus its memory \
             limit), more than the handler's max_memory_mib {}",
            handler.base_memory_mib(),
            handler.max_memory_mib()
        )));
    }
    // Bounded by the maxima, which are u32.
    Ok(VmSize {
        vcpus: vcpus as u32,
        memory_mib: memory_mib as u32,
    })
}

/// The handler with `vcpus` and `memory_mib` set to the pod's VM size, so
/// both hypervisors' launchers size the VM the same way.
pub fn sized_handler(
    handler: &Handler,
    linux: Option<&LinuxPodSandboxConfig>,
) -> Result<Handler, CriError> {
    let size = size_vm(handler, linux.and_then(|l| l.resources.as_ref()))?;
    let mut sized = handler.clone();
    sized.vcpus = Some(size.vcpus);
    sized.memory_mib = Some(size.memory_mib);
    Ok(sized)
}

/// The VMM configuration of a pod VM: `handler` already sized, the files
/// in the sandbox dir `dir`, the sockets in `sockets`, every block slot
/// empty and read-only until an image is attached.
pub fn vmm_config(dir: &Path, sockets: &Path, handler: &Handler) -> Result<VmmConfig, CriError> {
    let (kernel, initramfs) = (handler.kernel(), handler.initramfs());
    for f in [&kernel, &initramfs] {
        if !f.is_file() {
            return Err(CriError::FailedPrecondition(format!(
                "the guest image file {} is missing",
                f.display()
            )));
        }
    }
    let vcpus = u8::try_from(handler.base_vcpus()).map_err(|_| {
        CriError::InvalidArgument(format!("{} vCPUs is too many", handler.base_vcpus()))
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
        net: None,
        serial: Some(SerialConfig {
            path: dir.join(CONSOLE_LOG),
        }),
        control_socket: Some(sockets.join(CONTROL_SOCKET)),
        seccomp: true,
    };
    cfg.validate().map_err(VmmSandboxError::Config)?;
    Ok(cfg)
}

/// Writes `cfg` to `<dir>/vmm.json` and starts `vmpod vmm --config` on it
/// (this very binary) in its own session, stderr to `<dir>/vmm.log`.
/// Returns its PID.
pub fn spawn_vmm(dir: &Path, cfg: &VmmConfig) -> Result<i32, VmmSandboxError> {
    let exe = crate::self_exe().map_err(VmmSandboxError::CurrentExe)?;
    spawn_vmm_with(&exe, dir, cfg)
}

/// [`spawn_vmm`] with the `vmpod` binary given (tests run it from theirs).
pub fn spawn_vmm_with(vmpod: &Path, dir: &Path, cfg: &VmmConfig) -> Result<i32, VmmSandboxError> {
    let path = dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(cfg).map_err(|e| VmmSandboxError::WriteConfig {
        path: path.clone(),
        source: e.into(),
    })?;
    std::fs::write(&path, json).map_err(|source| VmmSandboxError::WriteConfig {
        path: path.clone(),
        source,
    })?;
    let mut cmd = std::process::Command::new(vmpod);
    cmd.arg("vmm").arg("--config").arg(&path);
    Ok(crate::process::spawn_detached(
        cmd,
        None,
        &dir.join(VMM_LOG),
    )?)
}

/// The VMM configuration of a sandbox dir, if its VM runs on the vmpod
/// hypervisor.
pub fn vmm_config_of(dir: &Path) -> Option<VmmConfig> {
    let path = dir.join(CONFIG_FILE);
    if !path.exists() {
        return None;
    }
    match VmmConfig::from_file(&path) {
        Ok(cfg) => Some(cfg),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %crate::error_chain(&e), "unreadable VMM configuration");
            None
        }
    }
}

/// One control-socket request (blocking, bounded by [`CONTROL_TIMEOUT`]).
pub fn control(
    socket: &Path,
    op: &'static str,
    request: &serde_json::Value,
) -> Result<serde_json::Value, VmmSandboxError> {
    let reply = crate::vmm::control::request(socket, &request.to_string(), CONTROL_TIMEOUT)
        .map_err(|source| VmmSandboxError::Control {
            op,
            path: socket.to_path_buf(),
            source,
        })?;
    if reply["ok"] == true {
        Ok(reply)
    } else {
        Err(VmmSandboxError::Refused {
            op,
            message: reply["error"]
                .as_str()
                .unwrap_or("no reason given")
                .chars()
                .take(512)
                .collect(),
        })
    }
}

async fn control_async(
    socket: PathBuf,
    op: &'static str,
    request: serde_json::Value,
) -> Result<serde_json::Value, VmmSandboxError> {
    tokio::task::spawn_blocking(move || control(&socket, op, &request))
        .await
        .unwrap_or_else(|e| {
            Err(VmmSandboxError::Refused {
                op,
                message: format!("the control thread failed: {e}"),
            })
        })
}

/// Waits until the VMM answers `status` on its control socket. Errors (with
/// the VMM's log) when it exits first or `timeout` passes.
pub async fn wait_vmm_ready(
    dir: &Path,
    socket: &Path,
    pid: i32,
    timeout: Duration,
) -> Result<(), CriError> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no control socket yet");
    loop {
        if !crate::process::alive(pid) {
            return Err(CriError::Internal(format!(
                "the VMM exited while starting:\n{}",
                tail(&dir.join(VMM_LOG))
            )));
        }
        if socket.exists() {
            match control_async(
                socket.to_path_buf(),
                "status",
                serde_json::json!({"op": "status"}),
            )
            .await
            {
                Ok(_) => return Ok(()),
                Err(e) => last = crate::error_chain(&e),
            }
        }
        if Instant::now() >= deadline {
            return Err(CriError::Internal(format!(
                "the VMM did not answer on {} within {timeout:?} ({last}):\n{}",
                socket.display(),
                tail(&dir.join(VMM_LOG))
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
) -> Result<AgentClient<Channel>, CriError> {
    let vmm_gone = async {
        while crate::process::alive(pid) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        r = agent_client::connect_ready(addr, timeout) => r.map_err(|e| {
            CriError::DeadlineExceeded(format!(
                "the pod VM's agent did not answer within {timeout:?} (boot_timeout_secs): {}\n\
                 console (last lines):\n{}",
                crate::error_chain(&e),
                tail(&dir.join(CONSOLE_LOG))
            ))
        }),
        () = vmm_gone => Err(CriError::Internal(format!(
            "the pod VM ended before its agent answered: {}\nconsole (last lines):\n{}",
            tail(&dir.join(VMM_LOG)).lines().last().unwrap_or("(no VMM log)"),
            tail(&dir.join(CONSOLE_LOG))
        ))),
    }
}

/// Ends a pod's VMM: a graceful shutdown through its control socket (the
/// guest gets Ctrl-Alt-Del; the VMM stops the VM itself at `timeout`), then
/// SIGKILL if it is still there [`SHUTDOWN_MARGIN`] later. A VMM whose guest
/// already rebooted (after the agent's Shutdown) is gone before that.
pub async fn end_vmm(dir: &Path, pid: i32, timeout: Duration) {
    if let Some(socket) = vmm_config_of(dir).and_then(|c| c.control_socket)
        && crate::process::alive(pid)
    {
        let req = serde_json::json!({
            "op": "shutdown",
            "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        });
        if let Err(e) = control_async(socket, "shutdown", req).await {
            // Usually: the guest rebooted and the VMM is on its way out.
            tracing::debug!(pid, error = %crate::error_chain(&e), "VMM shutdown request");
        }
    }
    crate::process::end_process(pid, timeout + SHUTDOWN_MARGIN).await;
}

/// Ends what a RunPodSandbox that never finished left (the daemon ended
/// during it): for every sandbox dir with a VMM config but no record, the
/// VMM named by its `vmm.pid` (if it is still that process) and both dirs.
/// Runs before the daemon serves, so no RunPodSandbox is in flight.
pub async fn sweep_unfinished(state: &StateDir) {
    let Ok(entries) = std::fs::read_dir(state.sandboxes()) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if dir.join("sandbox.json").exists() || !dir.join(CONFIG_FILE).exists() {
            continue;
        }
        let id = e.file_name().to_string_lossy().into_owned();
        let recorded = std::fs::read_to_string(dir.join(PID_FILE))
            .ok()
            .and_then(|t| {
                let mut words = t.split_whitespace();
                Some((
                    words.next()?.parse::<i32>().ok()?,
                    words.next()?.parse::<u64>().ok()?,
                ))
            });
        if let Some((pid, start)) = recorded
            && crate::process::same_process(pid, start)
        {
            crate::process::end_process(pid, Duration::ZERO).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(state.socket_dir(&id));
        tracing::warn!(sandbox = %id, "removed a pod VM whose RunPodSandbox never finished");
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

/// The last [`TAIL_LINES`] lines of a log file ("" when missing), bounded
/// in bytes: a guest decides what its console holds.
pub fn tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX_BYTES: u64 = 16 << 10;
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
    let mut bytes = Vec::new();
    let _ = f.take(MAX_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

impl Cri {
    /// RunPodSandbox on the `vmpod` hypervisor: the VMM with empty block
    /// slots, then the agent over hybrid vsock. Each step registers its undo.
    pub(super) async fn start_vmm_sandbox(
        &self,
        mut rec: SandboxRecord,
        handler: &Handler,
        dns: Option<k8s_cri::v1::DnsConfig>,
        linux: Option<LinuxPodSandboxConfig>,
        undo: &mut Rollback,
    ) -> Result<Sandbox, CriError> {
        let dir = self.state.sandbox_dir(&rec.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| CriError::Internal(format!("creating {}: {e}", dir.display())))?;
        undo.push(Step::RemoveDir(dir.clone()));
        let sockets = self.make_socket_dir(&rec.id, undo)?;
        let cfg = vmm_config(&dir, &sockets, handler)?;
        let pid = spawn_vmm(&dir, &cfg)?;
        undo.push(Step::KillProcess(pid));
        undo.push(Step::RemoveCgroups(rec.cgroup_parent.clone()));
        crate::sandbox::cgroups::join_cgroups(&rec.cgroup_parent, &[pid])?;
        rec.vmm_pid = Some(pid);
        rec.vsock_pid = None;
        rec.note_pid(pid);
        // Until the record is saved, this file is how a restarted daemon
        // finds the VMM of a RunPodSandbox that never finished.
        if let Some(start) = crate::process::start_time(pid) {
            let path = dir.join(PID_FILE);
            std::fs::write(&path, format!("{pid} {start}\n")).map_err(|source| {
                VmmSandboxError::WriteConfig {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        rec.agent_socket = sockets.join(VSOCK_SOCKET);
        rec.image_disks = BTreeMap::new();
        let control = sockets.join(CONTROL_SOCKET);
        wait_vmm_ready(&dir, &control, pid, VMM_START).await?;
        tracing::debug!(sandbox = %rec.id, pid, vcpus = cfg.vcpus, memory_mib = cfg.memory_mib, "VMM up");
        let agent = wait_agent(&dir, &rec.agent_addr(), pid, handler.boot_timeout()).await?;
        // No network card on this hypervisor yet (checked by the caller).
        self.setup(rec, agent, dns, linux, Vec::new()).await
    }

    /// CreateContainer on a `vmpod` VM: attaches `image` to a free block
    /// slot unless the pod has it already, and persists the slot. Returns
    /// the (updated) sandbox record. Other sandboxes are returned as they
    /// are. The caller holds the sandbox's op lock.
    pub(super) async fn ensure_image_disk(
        &self,
        sandbox: &Sandbox,
        image: &ResolvedImage,
    ) -> Result<SandboxRecord, CriError> {
        let rec = sandbox.rec();
        if !rec.is_vm() || rec.image_disks.contains_key(&image.id) {
            return Ok(rec);
        }
        let dir = self.state.sandbox_dir(&rec.id);
        let Some(cfg) = vmm_config_of(&dir) else {
            return Ok(rec);
        };
        let Some(socket) = cfg.control_socket.clone() else {
            return Ok(rec);
        };
        if !image.erofs_path.is_absolute() {
            return Err(CriError::Internal(format!(
                "image {} has a relative disk path {}",
                image.id,
                image.erofs_path.display()
            )));
        }
        let slot = match free_slot(&rec.image_disks, cfg.block.len()) {
            Some(slot) => slot,
            None => {
                // Slots held by images no container needs any more (a
                // CreateContainer that failed after its attach) come back.
                self.release_unused_disks(sandbox, None).await;
                free_slot(&sandbox.rec().image_disks, cfg.block.len()).ok_or_else(|| {
                    CriError::ResourceExhausted(format!(
                        "pod {} uses {} images, every block slot of its VM (block_slots in the \
                         handler); remove containers of other images first",
                        rec.id,
                        cfg.block.len()
                    ))
                })?
            }
        };
        control_async(
            socket,
            "block_attach",
            serde_json::json!({
                "op": "block_attach",
                "slot": slot,
                "path": image.erofs_path,
                "read_only": true,
            }),
        )
        .await?;
        let rec = {
            let mut r = lock(&sandbox.rec);
            r.image_disks
                .insert(image.id.clone(), block_slot_serial(slot));
            r.clone()
        };
        tracing::info!(sandbox = %rec.id, image = %image.id, slot, "image disk attached");
        if let Err(e) = self.state.save_sandbox(&rec) {
            // Unrecorded, the slot would look free to a restarted daemon.
            self.detach(&socket_of(&cfg), sandbox, &image.id, slot)
                .await;
            return Err(e.into());
        }
        Ok(rec)
    }

    /// Detaches the images of a `vmpod` VM that no container of the pod
    /// uses (`removing` no longer counts), and persists the record. Errors
    /// are logged: the slot stays taken and is retried later.
    pub(super) async fn release_unused_disks(&self, sandbox: &Sandbox, removing: Option<&str>) {
        let rec = sandbox.rec();
        if !rec.is_vm() || rec.image_disks.is_empty() {
            return;
        }
        let Some(cfg) = vmm_config_of(&self.state.sandbox_dir(&rec.id)) else {
            return;
        };
        let in_use: BTreeSet<String> = self
            .containers_of(&rec.id)
            .iter()
            .map(|c| c.rec())
            .filter(|c| Some(c.id.as_str()) != removing)
            .map(|c| c.image_id)
            .collect();
        let socket = socket_of(&cfg);
        for (image, slot) in unused_disks(&rec.image_disks, &in_use) {
            self.detach(&socket, sandbox, &image, slot).await;
        }
        if let Err(e) = self.state.save_sandbox(&sandbox.rec()) {
            tracing::warn!(sandbox = %rec.id, error = %crate::error_chain(&e), "saving the sandbox");
        }
    }

    async fn detach(&self, socket: &Path, sandbox: &Sandbox, image: &str, slot: usize) {
        let req = serde_json::json!({"op": "block_detach", "slot": slot});
        match control_async(socket.to_path_buf(), "block_detach", req).await {
            Ok(_) => {
                lock(&sandbox.rec).image_disks.remove(image);
                tracing::info!(image, slot, "image disk detached");
            }
            Err(e) => {
                tracing::warn!(image, slot, error = %crate::error_chain(&e), "detaching an image disk")
            }
        }
    }
}

fn socket_of(cfg: &VmmConfig) -> PathBuf {
    cfg.control_socket.clone().unwrap_or_default()
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

    fn resources(quota: i64, period: i64, memory: i64) -> LinuxContainerResources {
        LinuxContainerResources {
            cpu_quota: quota,
            cpu_period: period,
            memory_limit_in_bytes: memory,
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_without_limits_gets_the_handler_defaults() {
        let size = |r: Option<&LinuxContainerResources>| size_vm(&handler(), r).unwrap();
        assert_eq!(
            size(None),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        // cgroup's "no limit" values add nothing.
        assert_eq!(size(Some(&resources(-1, 100_000, 0))), size(None));
        assert_eq!(size(Some(&resources(0, 0, -1))), size(None));
    }

    #[test]
    fn limits_are_added_as_kata_does() {
        let mut h = handler();
        h.vcpus = Some(2);
        h.memory_mib = Some(128);
        // 1.5 CPUs → 2 more vCPUs; 100 MiB + 1 byte → 101 MiB more.
        let size = size_vm(&h, Some(&resources(150_000, 100_000, (100 << 20) + 1))).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 4,
                memory_mib: 229
            }
        );
        let size = size_vm(&h, Some(&resources(100_000, 100_000, 64 << 20))).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 3,
                memory_mib: 192
            }
        );
    }

    #[test]
    fn absurd_requests_are_invalid_arguments() {
        let h = handler();
        for r in [
            resources(i64::MAX, 1, 0),
            resources(64 * 100_000, 100_000, 0), // 1 + 64 > 64
            resources(100_000, 0, 0),
            resources(100_000, -5, 0),
            resources(0, 0, i64::MAX),
            resources(0, 0, 129 << 30), // 256 MiB + 129 GiB > 128 GiB
        ] {
            let err = size_vm(&h, Some(&r)).unwrap_err();
            assert!(
                matches!(err, CriError::InvalidArgument(_)),
                "{r:?} gave {err:?}"
            );
        }
        let mut small = handler();
        small.max_vcpus = Some(2);
        small.max_memory_mib = Some(512);
        assert!(size_vm(&small, Some(&resources(100_000, 100_000, 256 << 20))).is_ok());
        assert!(size_vm(&small, Some(&resources(200_000, 100_000, 0))).is_err());
        assert!(size_vm(&small, Some(&resources(0, 0, (256 << 20) + 1))).is_err());
    }

    #[test]
    fn sized_handler_carries_the_size_for_both_hypervisors() {
        let linux = LinuxPodSandboxConfig {
            resources: Some(resources(300_000, 100_000, 512 << 20)),
            ..Default::default()
        };
        for hv in [Hypervisor::Vmpod, Hypervisor::Qemu] {
            let mut h = handler();
            h.hypervisor = Some(hv);
            let sized = sized_handler(&h, Some(&linux)).unwrap();
            assert_eq!((sized.vcpus, sized.memory_mib), (Some(4), Some(768)));
            assert_eq!(sized.hypervisor, Some(hv));
        }
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
        let cfg = vmm_config(&dir, &sockets, &h).unwrap();
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
        let cfg = vmm_config(&dir, &sockets, &h).unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(VmmConfig::from_json(&json).unwrap(), cfg);

        h.kernel = Some(tmp.path().join("missing"));
        assert!(matches!(
            vmm_config(&dir, &sockets, &h),
            Err(CriError::FailedPrecondition(_))
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

    struct NoImages;
    impl super::super::image::ImageResolver for NoImages {
        fn resolve(&self, r: &str) -> Result<ResolvedImage, super::super::image::ImageError> {
            Err(super::super::image::ImageError::NotFound(r.into()))
        }
        fn list(&self) -> Vec<ResolvedImage> {
            Vec::new()
        }
    }

    fn image(id: &str) -> ResolvedImage {
        ResolvedImage {
            id: id.into(),
            name: format!("localhost/{id}:latest"),
            erofs_path: PathBuf::from(format!("/images/{id}.erofs")),
            config: Default::default(),
        }
    }

    fn sandbox_record(id: &str, socket: &Path) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            name: "p".into(),
            uid: "u".into(),
            namespace: "n".into(),
            attempt: 0,
            labels: Default::default(),
            annotations: Default::default(),
            runtime_handler: "vm".into(),
            resolved_handler: "vm".into(),
            state: super::super::store::SandboxState::Ready,
            created_at: 0,
            log_directory: String::new(),
            hostname: "p".into(),
            agent_pid: None,
            agent_socket: socket.to_path_buf(),
            netns: None,
            cgroup_parent: String::new(),
            host_network: false,
            pid_mode: 0,
            ipc_mode: 0,
            backend: "vm".into(),
            vmm_pid: None,
            vsock_pid: None,
            virtiofsd_pid: None,
            cni: None,
            tap: None,
            port_mappings: Vec::new(),
            image_disks: Default::default(),
            pid_starts: Default::default(),
        }
    }

    fn container(cri: &Cri, id: &str, sandbox: &str, image: &str) {
        use super::super::store::{ContainerRecord, ContainerState};
        let rec = ContainerRecord {
            id: id.into(),
            sandbox_id: sandbox.into(),
            name: id.into(),
            attempt: 0,
            labels: Default::default(),
            annotations: Default::default(),
            image: image.into(),
            image_id: image.into(),
            state: ContainerState::Created,
            created_at: 0,
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path: String::new(),
            mounts: Vec::new(),
            log_pump: None,
            exec_base: Default::default(),
            stop_signal: 0,
            stdio: Default::default(),
        };
        lock(&cri.containers).insert(
            id.into(),
            std::sync::Arc::new(super::super::Container {
                rec: std::sync::Mutex::new(rec),
            }),
        );
    }

    /// A Cri with one vmpod sandbox of `slots` slots whose VMM is a fake.
    fn setup(tmp: &Path, slots: usize, fail: bool) -> (std::sync::Arc<Cri>, Sandbox, FakeVmm) {
        let config = crate::config::Config {
            state_dir: tmp.join("state"),
            ..Default::default()
        };
        let cri = Cri::new(config, std::sync::Arc::new(NoImages));
        let id = "0123456789abcdef0123456789abcdef";
        let dir = cri.state.sandbox_dir(id);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = tmp.join("vmm.sock");
        let fake = FakeVmm::start(&socket, slots as u64, fail);
        let mut cfg = VmmConfig::from_json(r#"{"vcpus":1,"memory_mib":64,"kernel":"/k"}"#).unwrap();
        cfg.block = vec![
            BlockSlotConfig {
                path: None,
                read_only: true
            };
            slots
        ];
        cfg.control_socket = Some(socket.clone());
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_vec(&cfg).unwrap()).unwrap();
        let sandbox = Sandbox {
            rec: std::sync::Mutex::new(sandbox_record(id, &tmp.join("vsock.sock"))),
            op: tokio::sync::Mutex::new(()),
            agent: std::sync::Mutex::new(None),
        };
        (cri, sandbox, fake)
    }

    fn persisted_disks(cri: &Cri, id: &str) -> BTreeMap<String, String> {
        let text = std::fs::read(cri.state.sandbox_dir(id).join("sandbox.json")).unwrap();
        serde_json::from_slice::<SandboxRecord>(&text)
            .unwrap()
            .image_disks
    }

    #[tokio::test]
    async fn create_and_remove_container_attach_and_detach_image_disks() {
        let tmp = tempfile::tempdir().unwrap();
        let (cri, sandbox, fake) = setup(tmp.path(), 2, false);
        let id = sandbox.rec().id;

        // First container of image a: slot 0, attached read-only, persisted.
        let rec = cri.ensure_image_disk(&sandbox, &image("a")).await.unwrap();
        assert_eq!(rec.image_disks["a"], "vmpod-slot0");
        assert_eq!(persisted_disks(&cri, &id), rec.image_disks);
        assert_eq!(
            fake.take(),
            vec![serde_json::json!({"op": "block_attach", "slot": 0,
                "path": "/images/a.erofs", "read_only": true})]
        );
        container(&cri, "ca", &id, "a");
        // A second container of the same image needs nothing new.
        cri.ensure_image_disk(&sandbox, &image("a")).await.unwrap();
        assert!(fake.take().is_empty());
        let rec = cri.ensure_image_disk(&sandbox, &image("b")).await.unwrap();
        assert_eq!(rec.image_disks["b"], "vmpod-slot1");
        assert_eq!(fake.take().len(), 1);
        container(&cri, "cb", &id, "b");

        // Every slot holds an image a container uses: ResourceExhausted,
        // and the VMM is not asked to attach anything.
        let err = cri
            .ensure_image_disk(&sandbox, &image("c"))
            .await
            .unwrap_err();
        assert!(matches!(err, CriError::ResourceExhausted(_)), "{err:?}");
        assert_eq!(err.to_status().code(), tonic::Code::ResourceExhausted);
        assert!(fake.take().iter().all(|r| r["op"] != "block_attach"));

        // RemoveContainer of a's only container: slot 0 is detached.
        cri.release_unused_disks(&sandbox, Some("ca")).await;
        assert_eq!(
            fake.take(),
            vec![serde_json::json!({"op": "block_detach", "slot": 0})]
        );
        lock(&cri.containers).remove("ca");
        assert!(!persisted_disks(&cri, &id).contains_key("a"));
        // ... and c gets it.
        let rec = cri.ensure_image_disk(&sandbox, &image("c")).await.unwrap();
        assert_eq!(rec.image_disks["c"], "vmpod-slot0");
        assert_eq!(persisted_disks(&cri, &id).len(), 2);
    }

    #[tokio::test]
    async fn a_slot_left_by_a_failed_create_is_reclaimed_when_slots_run_out() {
        let tmp = tempfile::tempdir().unwrap();
        let (cri, sandbox, fake) = setup(tmp.path(), 1, false);
        // Attached, but its CreateContainer failed later: no container.
        cri.ensure_image_disk(&sandbox, &image("a")).await.unwrap();
        fake.take();
        let rec = cri.ensure_image_disk(&sandbox, &image("b")).await.unwrap();
        assert_eq!(
            fake.take(),
            vec![
                serde_json::json!({"op": "block_detach", "slot": 0}),
                serde_json::json!({"op": "block_attach", "slot": 0,
                    "path": "/images/b.erofs", "read_only": true}),
            ]
        );
        assert_eq!(rec.image_disks.len(), 1);
        assert_eq!(rec.image_disks["b"], "vmpod-slot0");
    }

    #[tokio::test]
    async fn a_refused_attach_records_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (cri, sandbox, fake) = setup(tmp.path(), 2, true);
        let err = cri
            .ensure_image_disk(&sandbox, &image("a"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CriError::VmmSandbox(VmmSandboxError::Refused { .. })),
            "{err:?}"
        );
        assert!(sandbox.rec().image_disks.is_empty());
        assert_eq!(fake.take().len(), 1);
    }

    #[tokio::test]
    async fn qemu_and_host_sandboxes_are_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let (cri, sandbox, fake) = setup(tmp.path(), 2, false);
        // No vmm.json: a QEMU VM (its images were attached at boot).
        std::fs::remove_file(cri.state.sandbox_dir(&sandbox.rec().id).join(CONFIG_FILE)).unwrap();
        let rec = cri.ensure_image_disk(&sandbox, &image("a")).await.unwrap();
        assert!(rec.image_disks.is_empty());
        lock(&sandbox.rec).backend = "host".into();
        cri.ensure_image_disk(&sandbox, &image("a")).await.unwrap();
        cri.release_unused_disks(&sandbox, None).await;
        assert!(fake.take().is_empty());
    }

    #[test]
    fn tails_are_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("console.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let t = tail(&log);
        assert_eq!(t.lines().count(), TAIL_LINES);
        assert!(t.ends_with("line 99"));
        std::fs::write(&log, vec![b'x'; 1 << 20]).unwrap();
        assert!(tail(&log).len() <= 16 << 10);
        assert_eq!(tail(&tmp.path().join("missing")), "");
    }
}
