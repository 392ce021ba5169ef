//! The jailed VMM (`"jail"` in its config), as the real `vmpod-vmm` binary
//! runs it with the freestanding guest under KVM: what the confined process
//! looks like from outside (its namespaces, root, ids, capabilities,
//! no_new_privs, seccomp), that it still serves its control socket and
//! takes new disks as file descriptors, and what a compromised VMM could do
//! from inside (the `VMPOD_VMM_JAIL_PROBE` test hook): open a host file,
//! create a socket, connect to a unix socket standing in for the CRI
//! socket, ptrace. Needs root and /dev/kvm.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmpod_tests::cri::vmm_binary;
use vmpod_tests::vmm::{config, read, wait_serial};
use vmpod_tests::{build_freestanding_guest, require_kvm};
use vmpod_vmm::config::{BlockSlotConfig, VmmConfig};
use vmpod_vmm::control::{self, ControlRequest};
use vmpod_vmm::jail::JailConfig;

const UID: u32 = 1_342_177_281;
const GID: u32 = 1_342_177_282;

fn require_root() {
    assert_eq!(
        // SAFETY: geteuid takes no arguments.
        unsafe { libc::geteuid() },
        0,
        "the jailer needs root: run this test as root"
    );
}

/// A jailed, idle freestanding-guest VM in `dir` with one empty block slot.
fn jailed_config(dir: &Path, elf: &Path, seccomp: bool) -> VmmConfig {
    let root = dir.join("jail");
    std::fs::create_dir_all(&root).expect("the jail root");
    let mut cfg = config(elf.to_path_buf(), "guest.idle", dir);
    cfg.block = vec![BlockSlotConfig {
        path: None,
        read_only: true,
    }];
    cfg.seccomp = seccomp;
    cfg.jail = Some(JailConfig {
        root,
        uid: UID,
        gid: GID,
        new_netns: true,
    });
    cfg
}

fn spawn(dir: &Path, cfg: &VmmConfig, probe: Option<&Path>) -> Child {
    let path = dir.join("vmm.json");
    std::fs::write(&path, serde_json::to_vec(cfg).expect("json")).expect("vmm.json");
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(target) = probe {
        cmd.env("VMPOD_VMM_JAIL_PROBE", target);
    }
    cmd.spawn().expect("spawning vmpod-vmm")
}

/// The jailed VMM: the only child of the process we started.
fn jailed_pid(parent: u32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().expect("a PID");
        }
        assert!(Instant::now() < deadline, "vmpod-vmm never forked its VMM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the VMM's status")
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        assert!(Instant::now() < deadline, "the VMM did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

#[test]
fn a_jailed_vmm_is_confined_and_still_runs_its_vm() {
    require_kvm();
    require_root();
    let tmp = tempfile::tempdir().expect("temp dir");
    let elf = build_freestanding_guest(tmp.path());
    let cfg = jailed_config(tmp.path(), &elf, true);
    let mut child = spawn(tmp.path(), &cfg, None);
    let socket = tmp.path().join("control.sock");
    let serial = tmp.path().join("serial.log");
    assert!(
        wait_serial(
            &serial,
            "vmpod freestanding guest: hello",
            Duration::from_secs(30)
        ),
        "the guest did not start: {}",
        read(&serial)
    );
    let vmm = jailed_pid(child.id());

    // From outside: its own namespaces (the network one too: no NIC) ...
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let of = |p: &str| std::fs::metadata(p).expect(ns).ino();
        assert_ne!(
            of(&format!("/proc/{vmm}/ns/{ns}")),
            of(&format!("/proc/self/ns/{ns}")),
            "the jailed VMM shares the {ns} namespace"
        );
    }
    // ... an empty root ...
    let root: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{vmm}/root"))
        .expect("the VMM's root")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(root.is_empty(), "the jail root is not empty: {root:?}");
    // ... unprivileged, without capabilities, no_new_privs, seccomp.
    let st = status(vmm);
    assert_eq!(
        field(&st, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}"),
        "{st}"
    );
    assert_eq!(
        field(&st, "Gid"),
        format!("{GID}\t{GID}\t{GID}\t{GID}"),
        "{st}"
    );
    assert_eq!(field(&st, "Groups"), "", "{st}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&st, caps), "0000000000000000", "{caps}: {st}");
    }
    assert_eq!(field(&st, "NoNewPrivs"), "1", "{st}");
    assert_eq!(field(&st, "Seccomp"), "2", "{st}");
    // The parent that waits for it is not the VMM: no guest-facing code,
    // but it ends with it.
    assert_ne!(vmm, child.id() as i32);

    // It still serves its control socket, and takes a disk as a descriptor
    // (a path it cannot open is refused with the reason, not a crash).
    let status = control::call(&socket, &ControlRequest::Status, Duration::from_secs(5))
        .expect("status from the jailed VMM");
    assert_eq!(status["protocol"], control::PROTOCOL_VERSION);
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![7u8; 8192]).expect("a disk");
    let attach = ControlRequest::BlockAttach {
        slot: 0,
        path: disk.clone(),
        read_only: true,
    };
    match control::call(&socket, &attach, Duration::from_secs(5)) {
        Err(control::CallError::Refused { message, .. }) => {
            assert!(message.contains("file descriptor"), "{message}")
        }
        other => panic!("a path attach in the jail: {other:?}"),
    }
    let file = std::fs::File::open(&disk).expect("the disk");
    control::call_with_fd(&socket, &attach, Some(file.as_fd()), Duration::from_secs(5))
        .expect("attach by descriptor");
    let m =
        control::call(&socket, &ControlRequest::Metrics, Duration::from_secs(5)).expect("metrics");
    assert_eq!(m["devices"]["block0"]["block_backing_changes"], 1, "{m}");
    // Metrics still read the VMM's own status (opened before the jail).
    assert!(m["vmm_rss_bytes"].as_u64().unwrap_or(0) > 0, "{m}");

    // Killing what the daemon started ends the jailed VMM too.
    child.kill().expect("kill");
    wait_exit(&mut child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{vmm}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the jailed VMM outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a compromised VMM tries, with seccomp off: the jail alone stops it.
#[test]
fn without_seccomp_the_jail_alone_stops_a_compromised_vmm() {
    require_kvm();
    require_root();
    let tmp = tempfile::tempdir().expect("temp dir");
    let elf = build_freestanding_guest(tmp.path());
    // A listening unix socket standing in for the CRI socket.
    let cri = tmp.path().join("cri.sock");
    let listener = std::os::unix::net::UnixListener::bind(&cri).expect("the fake CRI socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let cfg = jailed_config(tmp.path(), &elf, false);
    let mut child = spawn(tmp.path(), &cfg, Some(&cri));
    let serial = tmp.path().join("serial.log");
    assert!(
        wait_serial(
            &serial,
            "vmpod freestanding guest: hello",
            Duration::from_secs(30)
        ),
        "the guest did not start: {}",
        read(&serial)
    );
    // The probe ran before the guest's first instruction; end the VM.
    child.kill().expect("kill");
    wait_exit(&mut child);
    let log = stderr_of(&mut child);
    let result = |what: &str| {
        log.lines()
            .find_map(|l| {
                l.split_once(&format!("jail-probe {what}: "))
                    .map(|(_, r)| r)
            })
            .unwrap_or_else(|| panic!("no probe of {what} in {log}"))
            .to_string()
    };
    assert!(
        result("open /etc/hostname").contains("No such file"),
        "{log}"
    );
    assert!(
        result(&format!("connect {}", cri.display())).contains("No such file"),
        "{log}"
    );
    // PID 1 of its namespace is the VMM itself: no other process to trace.
    assert!(
        result("ptrace(PTRACE_ATTACH, 1)").contains("not permitted"),
        "{log}"
    );
    assert!(
        listener.accept().is_err(),
        "the jailed VMM reached the socket"
    );
}

/// With seccomp on (the default), the first forbidden call kills the VMM.
#[test]
fn with_seccomp_a_forbidden_call_kills_the_jailed_vmm() {
    require_kvm();
    require_root();
    let tmp = tempfile::tempdir().expect("temp dir");
    let elf = build_freestanding_guest(tmp.path());
    let cri = tmp.path().join("cri.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&cri).expect("the fake CRI socket");
    let cfg = jailed_config(tmp.path(), &elf, true);
    let mut child = spawn(tmp.path(), &cfg, Some(&cri));
    let st = wait_exit(&mut child);
    let log = stderr_of(&mut child);
    // The waiting parent reports the VMM's death by SIGSYS as 128 + 31.
    assert_eq!(st.code(), Some(128 + libc::SIGSYS), "{st:?}: {log}");
    assert!(!log.contains("jail-probe"), "a probe got through: {log}");
}
