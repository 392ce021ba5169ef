//! The VMM's virtio-net device end to end under real KVM: the freestanding
//! guest (`guest.virtio guest.net`) sends one Ethernet frame through the
//! device and receives one, over a real tap in a network namespace of the
//! test's own, where a raw-socket responder answers. Needs root, /dev/kvm,
//! iproute2 and python3; nothing leaves the test's namespace.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use vmpod_tests::cri::vmm_binary;
use vmpod_tests::vmm::{VM_TIMEOUT, config, read};
use vmpod_tests::{build_freestanding_guest, require_kvm, require_program};
use vmpod_vmm::config::NetConfig;

/// Answers the first EtherType 0x88b5 frame on tap0 with its own, to the
/// sender's MAC, and prints what it got.
const RESPONDER: &str = r#"
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind(("tap0", 0x88b5))
s.settimeout(60)
print("ready", flush=True)
f = s.recv(2048)
print("got", f[14:].rstrip(b"\0").decode(errors="replace"), "from", f[6:12].hex(), flush=True)
s.send(f[6:12] + bytes.fromhex("020000000099") + b"\x88\xb5" + b"vmpod host: frame in" + b"\0" * 26)
"#;

struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("vmpod-fgnet-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        assert!(ip(&["netns", "add", &name]), "ip netns add {name}");
        let ns = Netns(name);
        for args in [
            vec!["tuntap", "add", "dev", "tap0", "mode", "tap"],
            vec!["link", "set", "tap0", "up"],
        ] {
            let mut all = vec!["-n", ns.0.as_str()];
            all.extend(args);
            assert!(ip(&all), "ip {all:?}");
        }
        ns
    }

    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_guest_sends_and_receives_frames_through_a_real_tap() {
    require_kvm();
    require_program("ip", "iproute2");
    require_program("python3", "python3");
    // SAFETY: geteuid takes no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test creates a network namespace and a tap: run it as root"
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let elf = build_freestanding_guest(tmp.path());
    let ns = Netns::new();

    let mut responder = ns
        .exec("python3")
        .args(["-c", RESPONDER])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the responder");
    let mut out = BufReader::new(responder.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line)
        .expect("the responder's first line");
    assert_eq!(line.trim(), "ready");

    let mut cfg = config(elf, "guest.virtio guest.net", tmp.path());
    cfg.control_socket = None;
    cfg.seccomp = true;
    cfg.net = Some(NetConfig {
        tap: "tap0".into(),
        mac: "02:00:00:00:00:01".into(),
    });
    let path = tmp.path().join("vmm.json");
    std::fs::write(&path, serde_json::to_vec(&cfg).expect("json")).expect("vmm.json");
    // The VMM opens tap0 by name, so it runs in the namespace.
    let mut vmm = ns.exec(vmm_binary().to_str().expect("a UTF-8 path"));
    vmm.arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vmm.output());
    });
    let vmm = rx
        .recv_timeout(VM_TIMEOUT)
        .expect("the VM did not end")
        .expect("running vmpod-vmm");
    let serial = read(&tmp.path().join("serial.log"));
    assert!(
        vmm.status.success(),
        "{:?}: {}\nserial:\n{serial}",
        vmm.status,
        String::from_utf8_lossy(&vmm.stderr)
    );

    // Out: the host saw the guest's frame, from the MAC the VMM gave it.
    line.clear();
    out.read_line(&mut line).expect("the responder's report");
    assert_eq!(
        line.trim(),
        "got vmpod freestanding guest: frame out from 020000000001",
        "serial:\n{serial}\nVMM:\n{}",
        String::from_utf8_lossy(&vmm.stderr)
    );
    let _ = responder.wait();
    // In: the guest got the host's answer.
    assert!(serial.contains("net: frame sent"), "{serial}");
    assert!(
        serial.contains("net: received type 0x88b5 payload vmpod host: frame in"),
        "{serial}"
    );
}
