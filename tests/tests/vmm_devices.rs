//! The whole VMM⇄guest device path under real KVM: `vmpod vmm`'s device
//! wiring (rng, vsock, three block slots) driven by the freestanding test
//! guest's own virtio-mmio drivers through real virtqueues and interrupts
//! (`guest.virtio`, see `freestanding_guest/README.md`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmpod::vmm::VmExitReason;
use vmpod::vmm::config::{BlockSlotConfig, VsockConfig};
use vmpod_tests::vmm::{config, ctl, read, start_with_devices, wait_end, wait_serial};
use vmpod_tests::{build_freestanding_guest, require_kvm};

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

#[test]
fn freestanding_guest_drives_blk_vsock_and_rng_through_real_virtqueues() {
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

    // The guest's write reached slot 1's file at sector 1, and nothing else changed.
    let d1 = std::fs::read(&disk1).unwrap();
    let msg = b"written by the vmpod freestanding guest";
    assert_eq!(&d1[512..512 + msg.len()], msg);
    assert!(d1[..512].iter().all(|&b| b == 0));
    assert!(d1[512 + msg.len()..].iter().all(|&b| b == 0));
    // The refused write left the read-only disk alone.
    assert_eq!(std::fs::read(&disk0).unwrap(), data0);
}
