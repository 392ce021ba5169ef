//! vmpod's own VMM under real KVM: the freestanding test guest through the
//! Linux boot path, the control socket against a live VM, and how far the
//! stock guest kernel gets (on PVM hosts the instruction emulator stops it,
//! see `linux_kernel_boot_smoke`).

use std::time::{Duration, Instant};

use vmpod_tests::vmm::{VM_TIMEOUT, config, ctl, read, start, wait_end, wait_serial};
use vmpod_tests::{artefact, build_freestanding_guest, require_kvm};
use vmpod_vmm::VmExitReason;

#[test]
fn freestanding_guest_boots_through_the_linux_path_and_resets() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_freestanding_guest(dir.path());
    let cfg = config(elf, "console=ttyS0 reboot=k token=f00d", dir.path());
    let serial = dir.path().join("serial.log");
    let reason = wait_end(&start(cfg), &serial);
    let out = read(&serial);
    assert_eq!(reason, VmExitReason::Reset, "serial:\n{out}");
    assert_eq!(reason.exit_code(), 0);
    assert!(
        out.starts_with("vmpod freestanding guest: hello\n"),
        "{out}"
    );
    // RSI held the zero page, and it carries the boot protocol magic.
    assert!(
        out.contains("boot_params: 0x7000 magic 0x53726448\n"),
        "{out}"
    );
    assert!(
        out.contains("cmdline: console=ttyS0 reboot=k token=f00d\n"),
        "{out}"
    );
    // 64 MiB: base memory below the EBDA plus 1 MiB..64 MiB.
    let ram = 0x9fc00u64 + (64 << 20) - (1 << 20);
    assert!(
        out.contains(&format!("e820: entries 0x2 ram {ram:#x}\n")),
        "{out}"
    );
    assert!(out.ends_with("done: resetting\n"), "{out}");
}

#[test]
fn control_socket_pauses_reports_and_shuts_down_gracefully() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_freestanding_guest(dir.path());
    let mut cfg = config(elf, "console=ttyS0 guest.wait_cad", dir.path());
    // The second vCPU sits in KVM waiting for a SIPI that never comes: pause
    // and stop must still get it out.
    cfg.vcpus = 2;
    let serial = dir.path().join("serial.log");
    let rx = start(cfg);
    assert!(
        wait_serial(&serial, "waiting: ctrl-alt-del", Duration::from_secs(30)),
        "guest never got to its wait loop:\n{}",
        read(&serial)
    );
    let v = ctl(dir.path(), r#"{"op":"status"}"#);
    assert_eq!(
        (v["ok"].as_bool(), v["state"].as_str()),
        (Some(true), Some("running")),
        "{v}"
    );
    assert_eq!(v["vcpus"], 2);

    let v = ctl(dir.path(), r#"{"op":"pause"}"#);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(ctl(dir.path(), r#"{"op":"status"}"#)["state"], "paused");
    let v = ctl(dir.path(), r#"{"op":"resume"}"#);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(ctl(dir.path(), r#"{"op":"status"}"#)["state"], "running");
    // Kicks race with vCPUs entering KVM_RUN (immediate_exit closes that
    // window); every pause must land within its 2 s bound, 25 times over.
    for _ in 0..25 {
        assert_eq!(ctl(dir.path(), r#"{"op":"pause"}"#)["ok"], true);
        assert_eq!(ctl(dir.path(), r#"{"op":"resume"}"#)["ok"], true);
    }

    let m = ctl(dir.path(), r#"{"op":"metrics"}"#);
    assert_eq!(m["ok"], true, "{m}");
    assert!(
        m["exits"]["io_out"].as_u64().unwrap() > 30,
        "serial bytes are PIO exits: {m}"
    );
    assert!(m["first_exit_ns"].as_u64().unwrap() > 0, "{m}");
    let touched = m["guest_touched_bytes"].as_u64().unwrap();
    // The guest touched its code, stack, zero page and page tables, not its 64 MiB.
    assert!(
        touched > 0 && touched < 8 << 20,
        "guest memory is populated lazily: {m}"
    );
    assert!(m["vmm_rss_bytes"].as_u64().unwrap() > 0, "{m}");

    let bad = ctl(dir.path(), r#"{"op":"explode"}"#);
    assert_eq!(bad["ok"], false, "{bad}");

    let v = ctl(dir.path(), r#"{"op":"shutdown","timeout_ms":30000}"#);
    assert_eq!(
        (v["ok"].as_bool(), v["ctrl_alt_del_sent"].as_bool()),
        (Some(true), Some(true)),
        "{v}"
    );
    let reason = wait_end(&rx, &serial);
    assert_eq!(reason, VmExitReason::Reset, "serial:\n{}", read(&serial));
    assert!(read(&serial).contains("got: ctrl-alt-del\n"));
    assert!(
        !dir.path().join("control.sock").exists(),
        "socket removed on exit"
    );
}

#[test]
fn a_guest_poking_every_port_and_the_mmio_gap_does_not_hurt_the_vmm() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_freestanding_guest(dir.path());
    let cfg = config(
        elf,
        "console=ttyS0 guest.hostile guest.wait_cad",
        dir.path(),
    );
    let serial = dir.path().join("serial.log");
    let rx = start(cfg);
    assert!(
        wait_serial(&serial, "waiting: ctrl-alt-del", VM_TIMEOUT),
        "{}",
        read(&serial)
    );
    assert!(read(&serial).contains("hostile: done\n"));
    let m = ctl(dir.path(), r#"{"op":"metrics"}"#);
    let exits = &m["exits"];
    // 65536 ports minus the 13 of the console and i8042, twice each (minus
    // the ports KVM's in-kernel PIC/PIT answer); 11968 MMIO pages, twice each.
    assert!(exits["unhandled_pio"].as_u64().unwrap() > 2 * 65_000, "{m}");
    assert_eq!(exits["unhandled_mmio"].as_u64().unwrap(), 2 * 11_968, "{m}");
    let v = ctl(dir.path(), r#"{"op":"shutdown","timeout_ms":30000}"#);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(wait_end(&rx, &serial), VmExitReason::Reset);
}

#[test]
fn shutdown_of_a_guest_that_ignores_it_ends_at_the_deadline() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_freestanding_guest(dir.path());
    let cfg = config(elf, "console=ttyS0 guest.idle", dir.path());
    let serial = dir.path().join("serial.log");
    let rx = start(cfg);
    assert!(
        wait_serial(&serial, "idle: halting", Duration::from_secs(30)),
        "{}",
        read(&serial)
    );
    let v = ctl(dir.path(), r#"{"op":"shutdown","timeout_ms":300}"#);
    assert_eq!(v["ok"], true, "{v}");
    let reason = wait_end(&rx, &serial);
    assert_eq!(reason, VmExitReason::ShutdownTimeout);
    assert_eq!(reason.exit_code(), 3);
}

#[test]
fn a_kernel_that_is_not_an_elf_is_refused() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    // Not an ELF at all: the loader refuses it before any vCPU runs.
    let bogus = dir.path().join("bogus");
    std::fs::write(&bogus, b"\x7fELF but not really").unwrap();
    let cfg = config(bogus, "", dir.path());
    let serial = dir.path().join("serial.log");
    match start(cfg).recv_timeout(VM_TIMEOUT) {
        Ok(Err(e)) => assert!(e.contains("loading the ELF kernel"), "{e}"),
        other => panic!("a bogus kernel was accepted: {other:?}\n{}", read(&serial)),
    }
}

/// The stock guest kernel on our VMM. On a PVM host (no VT-x/AMD-V) KVM
/// runs a non-PVM kernel in its instruction emulator, which gives up at the
/// first instruction it does not emulate: `lock cmpxchg16b` in SLUB
/// (`__cmpxchg_double_slab`), right after "Memory: ..." — and, with CX16
/// hidden, at XSAVE/XRSTOR in FPU init. Up to there the kernel has parsed
/// everything the VMM gave it: the banner, our command line, our e820 map,
/// our MP table, the KVM CPUID leaves and kvmclock. This test asserts
/// exactly that, then stops the VM (or accepts the emulator's crash).
/// `earlyprintk`: the 8250 console driver registers after the point where
/// PVM's emulator stops the kernel, so without the early console the log
/// would still sit in the printk buffer.
const CMDLINE_SMOKE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1 \
    i8042.noaux i8042.nomux i8042.dumbkbd token=smoke42";

#[test]
fn linux_kernel_boot_smoke() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(artefact("vmlinux"), CMDLINE_SMOKE, dir.path());
    cfg.memory_mib = 256;
    // Two vCPUs: the kernel must find both in our MP table.
    cfg.vcpus = 2;
    cfg.initramfs = Some(artefact("initramfs.cpio"));
    let serial = dir.path().join("serial.log");
    let rx = start(cfg);
    // In the order the kernel prints them; the last is where PVM stops it.
    let markers: Vec<String> = vec![
        "Linux version 6.1".into(),
        format!("Command line: {CMDLINE_SMOKE}"),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".into(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable".into(),
        "Hypervisor detected: KVM".into(),
        "kvm-clock: Using msrs".into(),
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]".into(),
        "RAMDISK: [mem 0x".into(),
        "MPTABLE: OEM ID: VMPOD".into(),
        "Processor #1".into(),
        "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23".into(),
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs".into(),
        "Memory: ".into(),
    ];
    let last = markers[markers.len() - 1].clone();
    // Either the kernel prints every marker, or the VM ends first (PVM's
    // emulator gives up); in both cases check what the serial shows.
    let deadline = Instant::now() + VM_TIMEOUT;
    let mut ended = None;
    while Instant::now() < deadline && ended.is_none() && !read(&serial).contains(&last) {
        if let Ok(r) = rx.recv_timeout(Duration::from_millis(100)) {
            ended = Some(r);
        }
    }
    let out = read(&serial);
    for m in &markers {
        assert!(
            out.contains(m.as_str()),
            "the kernel did not print {m:?}; VM end: {ended:?}; serial:\n{out}"
        );
    }
    let reason = match ended {
        Some(r) => r.unwrap_or_else(|e| panic!("the VMM failed: {e}")),
        None => {
            // Still running (a host with real KVM, or slow emulation): stop
            // it. PVM often ends it right after the last marker, before the
            // request lands (its control socket is gone then): either way
            // the VM's own end is what counts.
            let socket = dir.path().join("control.sock");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(r) = rx.recv_timeout(Duration::from_millis(50)) {
                    break r.unwrap_or_else(|e| panic!("the VMM failed: {e}"));
                }
                let req = r#"{"op":"shutdown","timeout_ms":0}"#;
                if let Ok(v) = vmpod_vmm::control::request(&socket, req, Duration::from_secs(10)) {
                    assert_eq!(v["ok"], true, "{v}");
                    break wait_end(&rx, &serial);
                }
                assert!(
                    Instant::now() < deadline,
                    "the VM neither ended nor took a shutdown request"
                );
            }
        }
    };
    // The initramfs sits at the top of the 256 MiB of RAM.
    let ramdisk = out
        .lines()
        .find(|l| l.starts_with("RAMDISK: "))
        .unwrap_or("");
    assert!(
        ramdisk.ends_with("-0x000000000fffffff]") || ramdisk.ends_with("-0x0fffffff]"),
        "{ramdisk}"
    );
    assert!(!out.contains("Kernel panic"), "{out}");
    eprintln!("linux boot smoke: VM ended with: {reason}");
    eprintln!("last serial line: {:?}", out.lines().last().unwrap_or(""));
}

mod device_hook {
    //! The DeviceHook path under real KVM, with a fake virtio-mmio device:
    //! the generic `add_virtio_mmio_device` registers a real irqfd and
    //! ioeventfd, the guest finds the device on its command line, reads it
    //! through the MMIO bus and notifies it through the ioeventfd, and the
    //! control socket reaches the hook's DeviceControl.

    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::EventFd;
    use vmpod_tests::vmm::{VM_TIMEOUT, config, ctl, read, wait_serial};
    use vmpod_tests::{build_freestanding_guest, require_kvm};
    use vmpod_vmm::VmExitReason;
    use vmpod_vmm::bus::BusDevice;
    use vmpod_vmm::config::BlockSlotConfig;
    use vmpod_vmm::control::DeviceControl;
    use vmpod_vmm::device_manager::VirtioMmioDevice;

    struct FakeDevice {
        queue: EventFd,
        irq: EventFd,
    }

    impl BusDevice for FakeDevice {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&0x7472_6976u32.to_le_bytes()); // "virt"
            }
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    impl VirtioMmioDevice for FakeDevice {
        fn queue_events(&self) -> Vec<EventFd> {
            vec![self.queue.try_clone().unwrap()]
        }
        fn interrupt_evt(&self) -> &EventFd {
            &self.irq
        }
    }

    #[derive(Default)]
    struct FakeControl(Mutex<Vec<String>>);

    impl DeviceControl for FakeControl {
        fn block_attach(
            &self,
            slot: usize,
            path: &Path,
            ro: bool,
            _file: Option<std::fs::File>,
        ) -> Result<(), String> {
            self.0
                .lock()
                .unwrap()
                .push(format!("attach {slot} {} {ro}", path.display()));
            Ok(())
        }
        fn block_detach(&self, slot: usize) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("detach {slot}"));
            Err("slot busy".into())
        }
        fn metrics(&self) -> serde_json::Value {
            serde_json::json!({"fake": {"requests": 7}})
        }
    }

    #[test]
    fn virtio_mmio_device_is_declared_routed_and_notified() {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let elf = build_freestanding_guest(dir.path());
        let mut cfg = config(elf, "console=ttyS0 guest.irq guest.wait_cad", dir.path());
        cfg.block = vec![BlockSlotConfig {
            path: None,
            read_only: true,
        }];
        let queue = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let queue_seen = queue.try_clone().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq_host = irq.try_clone().unwrap();
        let control = Arc::new(FakeControl::default());
        let control_in = control.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let device = Arc::new(Mutex::new(FakeDevice { queue, irq }));
            let mut hook =
                move |vm: &kvm_ioctls::VmFd,
                      dm: &mut vmpod_vmm::device_manager::DeviceManager,
                      em: &mut vmpod_vmm::device_manager::VmmEventManager,
                      _mem: &Arc<vm_memory::GuestMemoryMmap>| {
                    dm.add_virtio_mmio_device(vm, Some(em), device.clone(), None)?;
                    let dc: Arc<dyn DeviceControl> = control_in.clone();
                    Ok(Some(dc))
                };
            let r = vmpod_vmm::run(&cfg, Instant::now(), Some(&mut hook));
            let _ = tx.send(r.map_err(|e| format!("{e:?}")));
        });
        let serial = dir.path().join("serial.log");
        assert!(
            wait_serial(&serial, "irq: waiting", Duration::from_secs(30)),
            "{}",
            read(&serial)
        );
        // The device's interrupt, raised the way a device raises it: the
        // irqfd add_virtio_mmio_device registered on GSI 5 → IOAPIC → LAPIC.
        irq_host.write(1).unwrap();
        assert!(
            wait_serial(&serial, "waiting: ctrl-alt-del", Duration::from_secs(30)),
            "{}",
            read(&serial)
        );
        let out = read(&serial);
        assert!(
            out.contains(
                "cmdline: console=ttyS0 guest.irq guest.wait_cad virtio_mmio.device=4K@0xd0000000:5\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("virtio-mmio: base 0xd0000000 gsi 0x5 magic 0x74726976\n"),
            "{out}"
        );
        assert!(out.contains("irq: received vector 0x30\n"), "{out}");
        assert!(out.contains("virtio-mmio: notified queue 0\n"), "{out}");
        assert_eq!(
            queue_seen
                .read()
                .expect("the QueueNotify write reached the ioeventfd"),
            1
        );

        let v = ctl(dir.path(), r#"{"op":"metrics"}"#);
        assert_eq!(v["devices"]["fake"]["requests"], 7, "{v}");
        let v = ctl(
            dir.path(),
            r#"{"op":"block_attach","slot":0,"path":"/img/a.erofs","read_only":true}"#,
        );
        assert_eq!(v["ok"], true, "{v}");
        let v = ctl(dir.path(), r#"{"op":"block_detach","slot":0}"#);
        assert_eq!(
            (v["ok"].as_bool(), v["error"].as_str()),
            (Some(false), Some("slot busy"))
        );
        let v = ctl(dir.path(), r#"{"op":"block_detach","slot":1}"#);
        assert_eq!(v["ok"], false, "slot 1 does not exist: {v}");
        assert_eq!(
            *control.0.lock().unwrap(),
            vec![
                "attach 0 /img/a.erofs true".to_string(),
                "detach 0".to_string()
            ]
        );

        let v = ctl(dir.path(), r#"{"op":"shutdown","timeout_ms":30000}"#);
        assert_eq!(v["ok"], true, "{v}");
        let end = rx.recv_timeout(VM_TIMEOUT).expect("VM ended");
        assert_eq!(end, Ok(VmExitReason::Reset));
    }
}
