//! What the two VM backends (QEMU, vmpod's VMM) share: the VM's size, the
//! guest image files, the guest's vsock CID, the console file and its
//! bounded tail, and the wait for the agent's ready line.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::{LinuxContainerResources, LinuxPodSandboxConfig};

use super::shared_fs::{self, Share};
use super::{Rollback, SandboxError, Step};
use crate::config::Handler;
use crate::process::Proc;

/// The guest's vsock context ID (every pod VM has its own vsock device).
pub const GUEST_CID: u32 = 3;
/// The guest console in the sandbox dir (serial port; QEMU's stdout too).
pub const CONSOLE_LOG: &str = "console.log";
/// The hybrid-vsock socket in the sandbox's socket dir.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Lines of a console or log put into error messages.
const TAIL_LINES: usize = 20;
/// Bytes read from the end of a console or log for those lines.
const TAIL_BYTES: u64 = 16 << 10;
/// What the agent prints on the guest console once it listens.
const READY_LINE: &[u8] = b"vmpod-agent: ready ";

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
/// without a period, are invalid.
pub fn size_vm(
    handler: &Handler,
    resources: Option<&LinuxContainerResources>,
) -> Result<VmSize, SandboxError> {
    const MIB: u64 = 1 << 20;
    let mut vcpus = u64::from(handler.base_vcpus());
    let mut memory_mib = u64::from(handler.base_memory_mib());
    if let Some(r) = resources {
        // A quota ≤ 0 is "no limit" (cgroup v1 writes -1 for it).
        if r.cpu_quota > 0 {
            if r.cpu_period <= 0 {
                return Err(SandboxError::Invalid(format!(
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
        return Err(SandboxError::Invalid(format!(
            "the pod needs {vcpus} vCPUs (the handler's {} plus its CPU limit), more than the \
             handler's max_vcpus {}",
            handler.base_vcpus(),
            handler.max_vcpus()
        )));
    }
    if memory_mib > u64::from(handler.max_memory_mib()) {
        return Err(SandboxError::Invalid(format!(
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
) -> Result<Handler, SandboxError> {
    let size = size_vm(handler, linux.and_then(|l| l.resources.as_ref()))?;
    let mut sized = handler.clone();
    sized.vcpus = Some(size.vcpus);
    sized.memory_mib = Some(size.memory_mib);
    Ok(sized)
}

/// The guest kernel and initramfs of a handler; a missing one is a
/// precondition the node fails, named.
pub fn guest_files(handler: &Handler) -> Result<(PathBuf, PathBuf), SandboxError> {
    let (kernel, initramfs) = (handler.kernel(), handler.initramfs());
    for f in [&kernel, &initramfs] {
        if !f.is_file() {
            return Err(SandboxError::Precondition(format!(
                "the guest image file {} is missing",
                f.display()
            )));
        }
    }
    Ok((kernel, initramfs))
}

/// The last lines of a log file ("" when missing), read from its last
/// [`TAIL_BYTES`] only: a guest decides what its console holds.
pub fn tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = f.take(TAIL_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// The last lines of a sandbox's guest console.
pub fn console_tail(dir: &Path) -> String {
    tail(&dir.join(CONSOLE_LOG))
}

/// Waits until the guest console shows the agent's ready line; ends early
/// when one of `vital` dies. Dialing the hybrid vsock before that is what
/// vhost-device-vsock 0.3 sometimes never recovers from ("backend event
/// before vring initialization": the connection is dropped and later ones
/// get no handshake reply), so the daemon does not dial before it. The
/// line is only a hint: Health over vsock still decides.
pub async fn wait_console_ready(
    dir: &Path,
    vital: &[Proc],
    timeout: Duration,
) -> Result<(), SandboxError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = dir.join(CONSOLE_LOG);
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
        let dead = vital.iter().any(|p| !p.alive());
        if dead {
            return Err(SandboxError::Failed(format!(
                "the pod VM ended before its agent came up\nconsole:\n{}",
                console_tail(dir)
            )));
        }
        if Instant::now() >= deadline {
            return Err(SandboxError::Timeout(format!(
                "the pod VM's agent did not come up within {timeout:?} (boot_timeout_secs)\n\
                 console:\n{}",
                console_tail(dir)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The process `pid` as started by a pod's creation: its end is journaled
/// as an undo step.
pub fn started(pid: i32, undo: &mut Rollback) -> Option<Proc> {
    let p = Proc::of(pid);
    if let Some(process) = p {
        undo.push(Step::End { process });
    }
    p
}

/// virtiofsd's vhost-user socket in the sandbox's socket dir.
pub const FS_SOCKET: &str = "fs.sock";
/// virtiofsd's log in the sandbox dir.
pub const VIRTIOFSD_LOG: &str = "virtiofsd.log";

/// The pod's share (CRI mounts) in the sandbox dir `dir`, exported by its
/// own virtiofsd listening on `<sockets>/fs.sock` when this returns; both
/// hypervisors' VMs connect to it. Returns virtiofsd and its socket.
pub fn start_share(
    dir: &Path,
    sockets: &Path,
    undo: &mut Rollback,
) -> Result<(Option<Proc>, PathBuf), SandboxError> {
    // The share must exist before virtiofsd exports it; its mounts go
    // after virtiofsd (steps run newest first).
    undo.push(Step::TearDownShare {
        dir: dir.to_path_buf(),
    });
    let share = Share::new(dir);
    share.prepare()?;
    let socket = sockets.join(FS_SOCKET);
    let pid = shared_fs::start_virtiofsd(&share, &socket, &dir.join(VIRTIOFSD_LOG))?;
    Ok((started(pid, undo), socket))
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
                matches!(err, SandboxError::Invalid(_)),
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
    fn a_tail_reads_only_the_end_of_a_huge_console() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(CONSOLE_LOG);
        let mut text = "x".repeat(1 << 20);
        for i in 0..30 {
            text.push_str(&format!("\nline {i}"));
        }
        std::fs::write(&path, text).unwrap();
        let t = tail(&path);
        assert!(t.ends_with("line 29"), "{t}");
        assert!(!t.contains("line 9\n"), "{t}");
        assert!(t.len() < TAIL_BYTES as usize);
        assert_eq!(tail(&tmp.path().join("none")), "");
    }

    #[test]
    fn missing_guest_files_are_a_precondition() {
        let mut h = handler();
        h.kernel = Some("/nonexistent/vmlinux".into());
        assert!(matches!(
            guest_files(&h),
            Err(SandboxError::Precondition(m)) if m.contains("/nonexistent/vmlinux")
        ));
    }
}
