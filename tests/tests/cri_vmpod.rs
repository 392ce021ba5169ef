//! The CRI server's `vmpod` hypervisor on the real /dev/kvm: `vmpod serve`
//! runs each pod VM on our own VMM (`vmpod-vmm --config <sandbox dir>/vmm.json`).
//!
//! What this machine allows: its KVM is PVM, which runs a stock Linux guest
//! only through KVM's instruction emulator; the kernel prints its banner and
//! memory map and stops in early boot (at `xrstor` or `lock cmpxchg16b`,
//! docs/benchmarks.md). The daemon's start-up probe finds that and reports
//! the handler not ready (tested here). The CRI path up to the running VMM
//! is tested with the probe off; the whole Linux pod needs hardware KVM and
//! is `#[ignore]`d here (`-- --ignored` runs it on such a host).
//!
//! The freestanding test guest (not an agent, but the same VMM boot path)
//! covers the rest on any KVM: a VM that ends before its agent answers fails
//! RunPodSandbox at once; and the daemon's own functions drive a real VMM's
//! block slots and its shutdown (graceful, deadline, SIGKILL) over the
//! control socket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use tonic::Code;
use vmpod::config::{Backend, Handler, Hypervisor};
use vmpod::process::{self as host_sandbox, Proc};
use vmpod::sandbox::vm::CONSOLE_LOG;
use vmpod::sandbox::vmm::{self as vmm_sandbox, VmmError};
use vmpod_tests::cri::*;
use vmpod_tests::{artefact, build_freestanding_guest, kvm_is_pvm, require_kvm};
use vmpod_vmm::config::{VmmConfig, block_slot_serial};
use vmpod_vmm::control::{CallError, ControlRequest};

/// The two processes of a jailed pod VMM: the one the daemon started and
/// the jailed VMM it forked.
fn vmm_processes(dir: &Path) -> (i64, i64) {
    let pids: Vec<i64> = processes_mentioning(&dir.join("vmm.json"))
        .iter()
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    let ppid = |pid: i64| -> i64 {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        st.lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1)
    };
    if ppid(pids[1]) == pids[0] {
        (pids[0], pids[1])
    } else {
        assert_eq!(ppid(pids[0]), pids[1], "{pids:?} are not parent and child");
        (pids[1], pids[0])
    }
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

async fn list_pods(cri: &mut Cri) -> Vec<PodSandbox> {
    cri.list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
}

/// The `kvm` handler: the guest-image kernel on the vmpod hypervisor.
fn kvm_handler(boot_timeout_secs: u64, probe: bool) -> String {
    format!(
        "[handlers.kvm]\nbackend = \"vm\"\nhypervisor = \"vmpod\"\nkernel = \"{}\"\n\
         initramfs = \"{}\"\nblock_slots = 4\nboot_timeout_secs = {boot_timeout_secs}\n\
         probe_kvm = {probe}\n",
        artefact("vmlinux").display(),
        artefact("initramfs.cpio").display(),
    )
}

/// A pod of the `kvm` handler, 1 + 1 vCPUs and 256 + 64 MiB.
fn kvm_pod(d: &Daemon) -> PodSandboxConfig {
    let mut config = pod_config(d, "kvmpod", &[]);
    config.linux = Some(LinuxPodSandboxConfig {
        resources: Some(LinuxContainerResources {
            cpu_quota: 100_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// Honest readiness: the daemon probes its KVM at start-up. Where stock
/// Linux guests cannot run (this machine's PVM, judged independently by its
/// kernel module), Status says so for the handler and RunPodSandbox fails
/// at once with FailedPrecondition, not at the boot timeout; on hardware
/// KVM the handler is ready. `probe_kvm = false` turns the check off.
#[tokio::test(flavor = "multi_thread")]
async fn a_kvm_that_cannot_boot_linux_makes_the_handler_not_ready() {
    require_kvm();
    let pvm = kvm_is_pvm();
    let d = Daemon::start(
        &(kvm_handler(600, true)
            + &kvm_handler(600, false).replace("handlers.kvm", "handlers.unprobed")),
    );
    let mut cri = d.client().await;
    let st = cri
        .status(StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    let handlers: serde_json::Value =
        serde_json::from_str(&st.info["handlers"]).expect("the handlers' readiness");
    assert_eq!(handlers["kvm"]["ready"], !pvm, "{handlers}");
    assert_eq!(handlers["unprobed"]["ready"], true, "{handlers}");
    let ready = st.status.expect("status").conditions;
    let runtime_ready = ready
        .iter()
        .find(|c| c.r#type == "RuntimeReady")
        .expect("RuntimeReady");
    if !pvm {
        return;
    }
    let why = handlers["kvm"]["reason"].as_str().expect("a reason");
    assert!(why.contains("cannot run a stock Linux guest"), "{why}");
    assert!(why.contains("xsave") || why.contains("cmpxchg16b"), "{why}");
    // The default handler is ready; the message names the one that is not.
    assert!(runtime_ready.status, "{runtime_ready:?}");
    assert!(
        runtime_ready.message.contains("handler \"kvm\""),
        "{runtime_ready:?}"
    );

    let started = Instant::now();
    let status = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(kvm_pod(&d)),
            runtime_handler: "kvm".into(),
        })
        .await
        .expect_err("the kvm handler is not ready");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("cannot run a stock Linux guest"),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(list_pods(&mut cri).await.is_empty());
    assert!(booting_sandbox(&d).is_none(), "nothing was made");
}

/// The CRI path up to the VMM, on any KVM: RunPodSandbox on the vmpod
/// hypervisor renders the pod-sized VMM config, starts `vmpod-vmm` on it,
/// and the VMM loads our kernel with the pod's memory map and its devices
/// on the command line. (The probe is off, so this runs on PVM too, where
/// the stock kernel stops in early boot.) Whichever way the boot ends, the
/// pod is then removed and nothing is left behind; the whole pod on
/// hardware KVM is [`linux_pod_on_the_vmpod_hypervisor`].
#[tokio::test(flavor = "multi_thread")]
async fn runpodsandbox_starts_the_vmm_with_the_pods_config() {
    require_kvm();
    let d = Daemon::start(&kvm_handler(15, false));
    let mut cri = d.client().await;
    let config = kvm_pod(&d);
    let run = tokio::spawn({
        let mut cri = cri.clone();
        async move {
            cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: "kvm".into(),
            })
            .await
        }
    });

    // While it boots: the VMM process and what it was started with.
    let (id, dir) = poll("the sandbox's vmm.json", || booting_sandbox(&d)).await;
    let sockets = d.state_dir().join("s").join(&id[..16]);
    let cfg = VmmConfig::from_file(&dir.join("vmm.json")).expect("the VMM config");
    assert_eq!((cfg.vcpus, cfg.memory_mib), (2, 320), "{cfg:?}");
    assert_eq!(cfg.block.len(), 4);
    assert!(cfg.block.iter().all(|b| b.path.is_none() && b.read_only));
    assert!(cfg.seccomp);
    assert_eq!(cfg.control_socket, Some(sockets.join("vmm.sock")));
    assert_eq!(
        cfg.vsock.as_ref().map(|v| v.uds_path.clone()),
        Some(sockets.join("vsock.sock"))
    );
    // vmm.json is written a moment before the VMM is spawned.
    let vmm_procs = poll("the VMM processes", || {
        let p = processes_mentioning(&dir.join("vmm.json"));
        (p.len() == 2).then_some(p)
    })
    .await;
    assert!(
        vmm_procs.iter().all(|p| p.contains("vmpod-vmm --config ")),
        "{vmm_procs:?}"
    );
    // The daemon started one; it forked the jailed VMM (own PID namespace,
    // the jail's uid) and waits for it.
    // It leaves root behind before the guest's first instruction.
    let (_, jailed) = vmm_processes(&dir);
    poll("the jailed VMM's uid", || {
        let st = std::fs::read_to_string(format!("/proc/{jailed}/status")).ok()?;
        let uid = st.lines().find_map(|l| l.strip_prefix("Uid:"))?;
        (uid.split_whitespace().next()? != "0").then_some(())
    })
    .await;

    // The VMM runs our kernel: its banner, the pod-sized memory map (320 MiB
    // of RAM end at 0x13ffffff), the VMM's rng, vsock and 4 block slots.
    let console = dir.join("console.log");
    let banner = poll("the kernel's memory map on the console", || {
        let text = read(&console);
        // The console is written as the guest prints: wait for a whole line.
        let start = text.find("BIOS-e820: [mem 0x0000000000100000-")?;
        text[start..].contains('\n').then_some(text)
    })
    .await;
    assert!(banner.contains("Linux version 6.1"), "{banner}");
    assert!(
        banner.contains("BIOS-e820: [mem 0x0000000000100000-0x0000000013ffffff] usable"),
        "{banner}"
    );
    let cmdline = banner
        .lines()
        .find(|l| l.starts_with("Command line:"))
        .unwrap_or_else(|| panic!("no command line in {banner}"));
    // vsock, rng, 4 block slots, and the pod share's virtio-fs.
    assert_eq!(
        cmdline.matches("virtio_mmio.device=").count(),
        7,
        "{cmdline}"
    );
    // The share: virtiofsd on the pod's socket, which the VMM connected to
    // (on guest RAM it shares with virtiofsd).
    let fs = cfg
        .fs
        .as_ref()
        .expect("a virtio-fs device in the VMM config");
    assert_eq!(fs.socket, sockets.join("fs.sock"));
    assert_eq!(fs.tag, "vmpod");
    assert!(cfg.memory_is_shared());
    poll("virtiofsd serving the VMM", || {
        read(&dir.join("virtiofsd.log"))
            .contains("Client connected")
            .then_some(())
    })
    .await;

    // However the boot ends (boot timeout on PVM), the pod goes cleanly.
    let result = run.await.expect("the RunPodSandbox task");
    if let Ok(resp) = result {
        stop_remove_pod(&mut cri, &resp.into_inner().pod_sandbox_id).await;
    }
    assert!(list_pods(&mut cri).await.is_empty());
    assert_no_leaks(&d, &[id]);
}

/// The whole Linux pod on the vmpod hypervisor: boot, a container from a
/// hot-plugged image disk, its log, the slot freed on RemoveContainer.
/// Needs a KVM that runs stock Linux guests (hardware virtualization); on
/// such a host run it with
/// `cargo test -p vmpod-tests --test cri_vmpod -- --ignored`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs VT-x/AMD-V KVM"]
async fn linux_pod_on_the_vmpod_hypervisor() {
    require_kvm();
    let vmm = vmm_binary();
    let probe = std::process::Command::new(&vmm)
        .arg("--probe")
        .output()
        .expect("running vmpod-vmm --probe");
    assert!(
        probe.status.success(),
        "this test needs a KVM that runs stock Linux guests: {}",
        String::from_utf8_lossy(&probe.stdout)
    );
    let d = Daemon::start(&kvm_handler(120, true));
    let mut cri = d.client().await;
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(kvm_pod(&d)),
            runtime_handler: "kvm".into(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let c = create(
        &mut cri,
        &pod,
        container_config("main", &["sh", "-c"], &["echo hello from the vmpod VMM"]),
    )
    .await;
    let verbose = |cri: &mut Cri| {
        let mut cri = cri.clone();
        let pod = pod.clone();
        async move {
            cri.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod,
                verbose: true,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner()
            .info["info"]
                .clone()
        }
    };
    let info = verbose(&mut cri).await;
    assert!(info.contains(&block_slot_serial(0)), "{info}");
    start(&mut cri, &c).await;
    let st = wait_exited(&mut cri, &c).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    let lines = log_lines(&d.log_root().join("kvmpod/main/0.log"), 1).await;
    assert!(
        lines
            .iter()
            .any(|l| parse_record(l).3 == "hello from the vmpod VMM"),
        "{lines:?}"
    );
    cri.remove_container(RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("RemoveContainer");
    // No container uses the image any more: its slot is free again.
    let info = verbose(&mut cri).await;
    assert!(!info.contains(&block_slot_serial(0)), "{info}");
    stop_remove_pod(&mut cri, &pod).await;
    assert!(list_pods(&mut cri).await.is_empty());
    assert_no_leaks(&d, &[pod]);
}

/// A guest that ends before any agent answers (the freestanding guest
/// resets at once) fails RunPodSandbox as soon as the VMM exits, not at the
/// boot timeout, with the VMM's exit reason and the console in the message.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_that_ends_before_its_agent_answers_fails_at_once() {
    require_kvm();
    let tmp = tempfile::tempdir().expect("temp dir");
    let elf = build_freestanding_guest(tmp.path());
    let extra = format!(
        "[handlers.fg]\nbackend = \"vm\"\nhypervisor = \"vmpod\"\nkernel = \"{}\"\n\
         initramfs = \"{}\"\nblock_slots = 2\nboot_timeout_secs = 600\nprobe_kvm = false\n",
        elf.display(),
        artefact("initramfs.cpio").display(),
    );
    let d = Daemon::start(&extra);
    let mut cri = d.client().await;
    let status = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config(&d, "fg", &[])),
            runtime_handler: "fg".into(),
        })
        .await
        .expect_err("the freestanding guest has no agent");
    // Internal, not DeadlineExceeded: the VMM's exit was noticed.
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let msg = status.message();
    for needle in [
        "the pod VM ended before its agent answered",
        "vmpod vmm: guest reset",
        "vmpod freestanding guest: hello",
        "done: resetting",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing in {msg}");
    }
    // The guest saw the VMM's rng, vsock, both block slots and the share.
    let cmdline = msg
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .unwrap_or_else(|| panic!("no cmdline line in {msg}"));
    assert_eq!(
        cmdline.matches("virtio_mmio.device=").count(),
        5,
        "{cmdline}"
    );
    assert!(list_pods(&mut cri).await.is_empty());
    let procs = processes_mentioning(&d.state_dir());
    assert!(procs.is_empty(), "{procs:?}");
    for sub in ["sandboxes", "s"] {
        let left: Vec<_> = std::fs::read_dir(d.state_dir().join(sub))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in {sub}: {left:?}");
    }
}

/// A daemon killed while a pod VM boots leaves a VMM and its dirs but no
/// record; the next daemon ends them before it serves. The freestanding
/// guest in `guest.idle` mode stays up without ever answering as an agent,
/// so the kill always lands mid-boot, on any KVM.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_killed_during_runpodsandbox_leaves_no_vmm_behind() {
    require_kvm();
    let tmp = tempfile::tempdir().expect("temp dir");
    let elf = build_freestanding_guest(tmp.path());
    let extra = format!(
        "[handlers.idle]\nbackend = \"vm\"\nhypervisor = \"vmpod\"\nkernel = \"{}\"\n\
         initramfs = \"{}\"\nkernel_args = \"guest.idle\"\nboot_timeout_secs = 600\n\
         probe_kvm = false\n",
        elf.display(),
        artefact("initramfs.cpio").display(),
    );
    let mut d = Daemon::start(&extra);
    let run = tokio::spawn({
        let mut cri = d.client().await;
        let config = pod_config(&d, "idle", &[]);
        async move {
            cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: "idle".into(),
            })
            .await
        }
    });
    let (id, dir) = poll("the sandbox's vmm.json", || booting_sandbox(&d)).await;
    let console = dir.join(CONSOLE_LOG);
    poll("the idle guest", || {
        read(&console).contains("idle: halting").then_some(())
    })
    .await;
    // The kernel_args reached the guest.
    assert!(read(&console).contains(" guest.idle"), "{}", read(&console));
    // The creation is journaled: a CREATING record whose undo ends the VMM.
    let record: serde_json::Value =
        serde_json::from_str(&read(&dir.join("sandbox.json"))).expect("the CREATING record");
    assert_eq!(record["state"], "Creating", "{record}");
    let (vmm_pid, _jailed) = vmm_processes(&dir);
    assert!(
        record["undo"]
            .as_array()
            .expect("undo steps")
            .iter()
            .any(|s| s["undo"] == "end" && s["process"]["pid"] == vmm_pid),
        "{record}"
    );

    d.kill9_and_restart();
    let _ = run.await;
    // The new daemon swept the unfinished pod before it opened its socket.
    assert!(list_pods(&mut d.client().await).await.is_empty());
    let procs = processes_mentioning(&d.state_dir());
    assert!(procs.is_empty(), "a VMM outlived the sweep: {procs:?}");
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(!d.state_dir().join("s").join(&id[..16]).exists());
}

/// A VMM started by the daemon's own functions for a VM handler.
struct TestVmm {
    dir: PathBuf,
    socket: PathBuf,
    pid: i32,
}

async fn start_vmm(root: &Path, name: &str, elf: &Path, guest_mode: &str) -> TestVmm {
    let mut h = Handler::new(Backend::Vm);
    h.hypervisor = Some(Hypervisor::Vmpod);
    h.kernel = Some(elf.to_path_buf());
    h.initramfs = Some(artefact("initramfs.cpio"));
    h.block_slots = Some(2);
    let (dir, sockets) = (root.join(name), root.join(format!("{name}.s")));
    std::fs::create_dir_all(&dir).expect("sandbox dir");
    std::fs::create_dir_all(&sockets).expect("socket dir");
    let mut cfg = vmm_sandbox::vmm_config(&dir, &sockets, &h, None, None).expect("the VMM config");
    cfg.cmdline.push(' ');
    cfg.cmdline.push_str(guest_mode);
    let pid = vmm_sandbox::spawn_vmm_with(&vmm_binary(), &dir, &cfg, None, None)
        .expect("spawning the VMM");
    let socket = sockets.join(vmm_sandbox::CONTROL_SOCKET);
    vmm_sandbox::wait_vmm_ready(&dir, &socket, pid, Duration::from_secs(30))
        .await
        .expect("the VMM answers on its control socket");
    let console = dir.join(CONSOLE_LOG);
    poll("the guest's hello", || {
        read(&console)
            .contains("vmpod freestanding guest: hello")
            .then_some(())
    })
    .await;
    TestVmm { dir, socket, pid }
}

fn backing_changes(vmm: &TestVmm, slot: usize) -> u64 {
    let m = vmm_sandbox::control(&vmm.socket, &ControlRequest::Metrics).expect("metrics");
    m["devices"][format!("block{slot}")]["block_backing_changes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no block{slot} counters in {m}"))
}

/// The daemon's side of hot-plug and shutdown against a real `vmpod-vmm`
/// running the freestanding guest: slots allocated and attached the way
/// CreateContainer does it, refusals, detach, then the three ways a VMM ends
/// (the guest reboots on Ctrl-Alt-Del; the VMM stops itself at the deadline;
/// a VMM that does not answer is SIGKILLed).
#[tokio::test(flavor = "multi_thread")]
async fn vmm_block_slots_and_shutdown_over_the_control_socket() {
    require_kvm();
    let tmp = tempfile::tempdir().expect("temp dir");
    let elf = build_freestanding_guest(tmp.path());
    let erofs = artefact("demo-image.erofs");
    let other = tmp.path().join("other.img");
    std::fs::write(&other, vec![0u8; 4096]).expect("a second disk");

    // Graceful: the guest waits for Ctrl-Alt-Del and resets.
    let vmm = start_vmm(tmp.path(), "cad", &elf, "guest.wait_cad").await;
    let attach = |slot: usize, path: &Path| vmm_sandbox::attach_disk(&vmm.socket, slot, path);
    let mut disks = BTreeMap::new();
    for (image, path) in [("busybox", &erofs), ("other", &other)] {
        let slot = vmm_sandbox::free_slot(&disks, 2).expect("a free slot");
        attach(slot, path).unwrap_or_else(|e| panic!("block_attach {slot}: {e:?}"));
        disks.insert(image.to_string(), block_slot_serial(slot));
        assert_eq!(backing_changes(&vmm, slot), 1);
    }
    assert_eq!(disks["busybox"], "vmpod-slot0");
    assert_eq!(disks["other"], "vmpod-slot1");
    assert_eq!(vmm_sandbox::free_slot(&disks, 2), None, "both slots taken");
    // The VMM refuses what the daemon must never send, and says why: a slot
    // it does not have, and (jailed) a disk by path instead of descriptor.
    let by_path = vmm_sandbox::control(
        &vmm.socket,
        &ControlRequest::BlockAttach {
            slot: 0,
            path: erofs.clone(),
            read_only: true,
        },
    );
    for (what, result) in [("slot 2", attach(2, &erofs)), ("by path", by_path)] {
        match result {
            Err(VmmError::Control(CallError::Refused { op, message })) => {
                assert_eq!(op, "block_attach");
                assert!(!message.is_empty());
            }
            other => panic!("attach {what}: {other:?}"),
        }
    }
    // A disk the daemon cannot open never reaches the VMM.
    assert!(matches!(
        attach(0, &tmp.path().join("missing.img")),
        Err(VmmError::OpenDisk { .. })
    ));
    // RemoveContainer of the last user of an image: detach, the slot is free.
    let unused = vmm_sandbox::unused_disks(&disks, &["busybox".to_string()].into());
    assert_eq!(unused, vec![("other".to_string(), 1)]);
    vmm_sandbox::control(&vmm.socket, &ControlRequest::BlockDetach { slot: 1 })
        .expect("block_detach");
    disks.remove("other");
    assert_eq!(backing_changes(&vmm, 1), 2);
    assert_eq!(vmm_sandbox::free_slot(&disks, 2), Some(1));

    vmm_sandbox::end_vmm(
        &vmm.socket,
        Proc::of(vmm.pid).expect("the VMM"),
        Duration::from_secs(20),
    )
    .await;
    assert!(!host_sandbox::alive(vmm.pid));
    let console = read(&vmm.dir.join(CONSOLE_LOG));
    assert!(console.contains("got: ctrl-alt-del"), "{console}");
    let log = read(&vmm.dir.join(vmm_sandbox::VMM_LOG));
    assert!(log.contains("vmpod vmm: guest reset"), "{log}");
    assert!(!vmm.socket.exists(), "the control socket is removed");

    // Deadline: an idle guest ignores Ctrl-Alt-Del; the VMM stops itself.
    let vmm = start_vmm(tmp.path(), "idle", &elf, "guest.idle").await;
    vmm_sandbox::end_vmm(
        &vmm.socket,
        Proc::of(vmm.pid).expect("the VMM"),
        Duration::from_secs(1),
    )
    .await;
    assert!(!host_sandbox::alive(vmm.pid));
    let log = read(&vmm.dir.join(vmm_sandbox::VMM_LOG));
    assert!(
        log.contains("vmpod vmm: graceful shutdown timed out"),
        "{log}"
    );

    // SIGKILL: a VMM that cannot answer (stopped) is killed after the deadline.
    let vmm = start_vmm(tmp.path(), "stopped", &elf, "guest.idle").await;
    // The jailed VMM is the only child of the process the daemon started.
    let jailed: i32 = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", vmm.pid))
        .expect("the VMM's children")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the jailed VMM");
    for pid in [vmm.pid, jailed] {
        // SAFETY: kill(2) takes plain integers; the PIDs are the VMM's.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    }
    vmm_sandbox::end_vmm(
        &vmm.socket,
        Proc::of(vmm.pid).expect("the VMM"),
        Duration::from_secs(1),
    )
    .await;
    assert!(
        !host_sandbox::alive(vmm.pid),
        "a stopped VMM must be SIGKILLed"
    );
    // ... and the jailed one with it (its parent-death signal).
    poll("the jailed VMM's end", || {
        (!host_sandbox::alive(jailed)).then_some(())
    })
    .await;
    let log = read(&vmm.dir.join(vmm_sandbox::VMM_LOG));
    assert!(!log.contains("vmpod vmm: "), "it never got to exit: {log}");
}
