//! Building and running one VM: KVM, guest memory, the boot path, devices,
//! vCPU threads and the event loop, until the guest ends or is stopped.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::arch::{self, EBDA_START, boot, cpuid, mptable, regs};
use super::config::{MAX_CMDLINE_LEN, VmmConfig};
use super::control::{
    ControlRequest, ControlServer, ControlTarget, DeviceControl, shutdown_timeout,
};
use super::device_manager::{DeviceManager, Subscriber, VmmEventManager};
use super::devices::legacy::serial::SerialOut;
use super::metrics::{VmmMetrics, proc_status_bytes, resident_bytes};
use super::seccomp;
use super::vcpu::{Vcpu, VcpuControl, VcpuHandles, VmExit, VmExitReason, install_kick_handler};

/// Where KVM puts its TSS (three pages just below the BIOS area, out of RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// How long pause and stop wait for vCPUs.
const VCPU_WAIT: Duration = Duration::from_secs(2);
/// The event loop wakes at least this often to check deadlines.
const LOOP_TICK_MS: i32 = 100;

/// Errors from building the VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("opening /dev/kvm (is KVM available and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("the VM configuration")]
    Config(#[from] super::config::ConfigError),
    #[error("this KVM lacks {0}")]
    MissingCapabilities(String),
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("allocating guest memory")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    #[error("loading the guest")]
    Boot(#[from] boot::BootError),
    #[error("setting up a vCPU")]
    Regs(#[from] regs::RegsError),
    #[error("writing the MP table")]
    Mptable(#[from] mptable::MptableError),
    #[error("setting up devices")]
    Devices(#[from] super::device_manager::DeviceManagerError),
    #[error("building the virtio devices")]
    VirtioDevices(#[from] super::devices::builder::BuilderError),
    #[error("opening the serial output {path}")]
    SerialOut {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the control socket")]
    Control(#[from] super::control::ControlError),
    #[error("{what}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("the event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { op, source }
}

/// Wakes the loop on the VM's exit eventfd and turns the i8042 reset into a VM exit.
struct ExitWatcher {
    exit: Arc<VmExit>,
    reset_evt: EventFd,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.exit.eventfd(), EventSet::IN));
        let _ = ops.add(Events::new(&self.reset_evt, EventSet::IN));
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.exit.request(VmExitReason::Reset);
        } else {
            let _ = self.exit.eventfd().read();
        }
    }
}

/// What the control socket acts on.
struct MachineControl {
    config: VmmConfig,
    metrics: Arc<VmmMetrics>,
    memory: Arc<GuestMemoryMmap>,
    vcpus: Arc<Mutex<Option<VcpuHandles>>>,
    devices: Arc<Mutex<DeviceManager>>,
    device_control: Option<Arc<dyn DeviceControl>>,
    shutdown_deadline: Arc<Mutex<Option<Instant>>>,
}

/// Bytes of guest RAM the guest has touched (resident in the VMM).
pub fn guest_touched_bytes(memory: &GuestMemoryMmap) -> u64 {
    memory
        .iter()
        .filter_map(|r| {
            let host = memory.get_host_address(r.start_addr()).ok()?;
            resident_bytes(host, r.len() as usize).ok()
        })
        .sum()
}

impl MachineControl {
    fn device_control(&self) -> Result<&Arc<dyn DeviceControl>, String> {
        self.device_control
            .as_ref()
            .ok_or_else(|| "this VMM has no block devices wired in".to_string())
    }

    fn metrics_json(&self) -> serde_json::Value {
        let rss = proc_status_bytes("VmRSS").unwrap_or(0);
        let touched = guest_touched_bytes(&self.memory);
        let serial_dropped = self
            .devices
            .lock()
            .ok()
            .and_then(|d| d.serial.clone())
            .and_then(|s| s.lock().ok().map(|s| s.output_errors))
            .unwrap_or(0);
        serde_json::json!({
            "serial_output_errors": serial_dropped,
            "vmm_rss_bytes": rss,
            "guest_touched_bytes": touched,
            "vmm_rss_excluding_guest_bytes": rss.saturating_sub(touched),
            "first_exit_ns": self.metrics.first_exit_ns.load(Ordering::Relaxed),
            "exits": self.metrics.exits.snapshot(),
            "devices": self
                .device_control
                .as_ref()
                .map_or(serde_json::Value::Null, |d| d.metrics()),
        })
    }
}

impl ControlTarget for MachineControl {
    fn handle(
        &self,
        req: &ControlRequest,
        file: Option<std::fs::File>,
    ) -> Result<serde_json::Value, String> {
        req.validate(self.config.block.len())?;
        match req {
            ControlRequest::BlockAttach {
                slot,
                path,
                read_only,
            } => {
                let dc = self.device_control()?;
                return dc
                    .block_attach(*slot, path, *read_only, file)
                    .map(|()| serde_json::json!({}));
            }
            ControlRequest::BlockDetach { slot } => {
                let dc = self.device_control()?;
                return dc.block_detach(*slot).map(|()| serde_json::json!({}));
            }
            _ => {}
        }
        let vcpus = self
            .vcpus
            .lock()
            .map_err(|_| "VMM state poisoned".to_string())?;
        let Some(vcpus) = vcpus.as_ref() else {
            return Err("the VM is stopping".into());
        };
        match req {
            ControlRequest::Status => Ok(serde_json::json!({
                "protocol": crate::control::PROTOCOL_VERSION,
                "state": if vcpus.control.is_paused() { "paused" } else { "running" },
                "vcpus": self.config.vcpus,
                "memory_mib": self.config.memory_mib,
                "uptime_ms": self.metrics.started.elapsed().as_millis() as u64,
                "shutting_down": self.shutdown_deadline.lock().map(|d| d.is_some()).unwrap_or(false),
            })),
            ControlRequest::Pause => vcpus
                .pause(VCPU_WAIT)
                .map(|()| serde_json::json!({}))
                .map_err(|e| e.to_string()),
            ControlRequest::Resume => {
                vcpus.resume();
                Ok(serde_json::json!({}))
            }
            ControlRequest::Shutdown { timeout_ms } => {
                let deadline = Instant::now() + shutdown_timeout(*timeout_ms);
                if let Ok(mut d) = self.shutdown_deadline.lock() {
                    *d = Some(d.map_or(deadline, |old| old.min(deadline)));
                }
                // A paused guest cannot react to Ctrl-Alt-Del.
                vcpus.resume();
                let devices = self
                    .devices
                    .lock()
                    .map_err(|_| "devices poisoned".to_string())?;
                let sent = match &devices.i8042 {
                    Some(i8042) => i8042
                        .lock()
                        .map_err(|_| "i8042 poisoned".to_string())?
                        .trigger_ctrl_alt_del()
                        .is_ok(),
                    None => false,
                };
                Ok(serde_json::json!({ "ctrl_alt_del_sent": sent }))
            }
            ControlRequest::Metrics => Ok(self.metrics_json()),
            ControlRequest::BlockAttach { .. } | ControlRequest::BlockDetach { .. } => {
                Err("handled above".into())
            }
        }
    }
}

/// The KVM capabilities this VMM relies on, checked up front so a host that
/// lacks one fails with its name rather than with an obscure ioctl error.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

fn check_capabilities(kvm: &Kvm) -> Result<(), MachineError> {
    let missing: Vec<&str> = REQUIRED_CAPS
        .iter()
        .filter(|(cap, _)| !kvm.check_extension(*cap))
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MachineError::MissingCapabilities(missing.join(", ")))
    }
}

/// Guest RAM over `ranges`, populated on first touch. Private anonymous
/// memory unless `shared`: then each range is a sealed memfd mapped
/// MAP_SHARED, which a vhost-user backend (virtiofsd) can map as well.
pub fn guest_memory(
    ranges: &[(GuestAddress, usize)],
    shared: bool,
) -> Result<GuestMemoryMmap, MachineError> {
    if !shared {
        return GuestMemoryMmap::from_ranges(ranges).map_err(MachineError::Memory);
    }
    let with_files = ranges
        .iter()
        .map(|&(start, len)| Ok((start, len, Some(FileOffset::new(guest_ram_memfd(len)?, 0)))))
        .collect::<Result<Vec<_>, MachineError>>()?;
    GuestMemoryMmap::from_ranges_with_files(&with_files).map_err(MachineError::Memory)
}

/// A memfd of `len` bytes for one RAM range. Sealed against resizing: the
/// backend gets this fd, and a shrunk file would turn the VMM's next access
/// to guest memory into a SIGBUS.
fn guest_ram_memfd(len: usize) -> Result<File, MachineError> {
    use std::os::fd::FromRawFd;
    let os = |what| move |source| MachineError::Os { what, source };
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"vmpod-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(os("creating a memfd for guest RAM")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)
        .map_err(os("sizing the guest RAM memfd"))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd we own, with an int argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(os("sealing the guest RAM memfd")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

/// Creates guest memory (see [`guest_memory`]) and registers it with KVM.
fn create_memory(
    vm: &VmFd,
    memory_bytes: u64,
    shared: bool,
) -> Result<GuestMemoryMmap, MachineError> {
    let ranges: Vec<(GuestAddress, usize)> = arch::ram_ranges(memory_bytes)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let memory = guest_memory(&ranges, shared)?;
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|_| MachineError::Os {
                what: "guest memory region without a host mapping",
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            })?;
        let kvm_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `memory`, which the VM
        // keeps alive (in an Arc) for as long as the vCPUs can run; slots do
        // not overlap because the ranges do not.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(memory)
}

fn serial_output(config: &VmmConfig) -> Result<SerialOut, MachineError> {
    match &config.serial {
        Some(s) => {
            use std::os::unix::fs::OpenOptionsExt;
            // Non-blocking: a FIFO without a reader fails here instead of
            // blocking start-up, and a full one drops console bytes (counted)
            // instead of stalling the vCPU that writes them.
            let file = File::options()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NONBLOCK)
                .mode(0o600)
                .open(&s.path)
                .map_err(|source| MachineError::SerialOut {
                    path: s.path.display().to_string(),
                    source,
                })?;
            Ok(Box::new(CappedLog::new(file, CONSOLE_LOG_CAP)))
        }
        None => Ok(Box::new(std::io::stdout())),
    }
}

/// At most this many bytes of guest console in the log file: the guest
/// decides what it prints, and the host disk is not its to fill.
const CONSOLE_LOG_CAP: u64 = 4 << 20;

/// A file that starts over (truncated, with a marker line) whenever the
/// next write would take it past its cap, so it never holds more than
/// `cap` bytes and always holds the latest output (what error messages
/// quote).
struct CappedLog {
    file: File,
    written: u64,
    cap: u64,
}

impl CappedLog {
    fn new(file: File, cap: u64) -> CappedLog {
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        CappedLog { file, written, cap }
    }
}

impl std::io::Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        const MARK: &[u8] = b"[vmpod: console log truncated]\n";
        let buf = &buf[..buf
            .len()
            .min((self.cap as usize).saturating_sub(MARK.len()))];
        if self.written + buf.len() as u64 > self.cap {
            self.file.set_len(0)?;
            self.written = 0;
            self.file.write_all(MARK)?;
            self.written += MARK.len() as u64;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Adds the virtio devices (vsock, blk, net, rng) to a VM being built:
/// called once, before the command line is written, with the VM, the device
/// manager ([`DeviceManager::add_virtio_mmio_device`]), the event loop and
/// guest memory. Returns the run-time control of those devices, if any
/// (block slot attach/detach, per-device metrics on the control socket).
pub type DeviceHook<'a> = &'a mut dyn FnMut(
    &VmFd,
    &mut DeviceManager,
    &mut VmmEventManager,
    &Arc<GuestMemoryMmap>,
)
    -> Result<Option<Arc<dyn DeviceControl>>, MachineError>;

/// Builds the VM described by `config` and runs it until it ends.
pub fn run(
    config: &VmmConfig,
    started: Instant,
    add_devices: Option<DeviceHook<'_>>,
) -> Result<VmExitReason, MachineError> {
    config.validate()?;
    // Opened now: a jailed VMM cannot open it later.
    let _ = crate::metrics::proc_status();
    let kvm = Kvm::new().map_err(MachineError::OpenKvm)?;
    check_capabilities(&kvm)?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;

    crate::log::debug!(
        "kvm VM created elapsed_us={}",
        started.elapsed().as_micros()
    );
    let memory_bytes = config.memory_bytes();
    let memory = Arc::new(create_memory(&vm, memory_bytes, config.memory_is_shared())?);
    let kernel = boot::load_kernel(&memory, &config.kernel)?;
    let initramfs = match &config.initramfs {
        Some(path) => Some(boot::load_initramfs(
            &memory,
            path,
            kernel.end,
            memory_bytes,
        )?),
        None => None,
    };
    regs::write_boot_tables(&memory)?;
    mptable::write_mptable(&memory, EBDA_START, config.vcpus)?;

    crate::log::debug!("guest loaded elapsed_us={}", started.elapsed().as_micros());
    let exit = Arc::new(VmExit::new().map_err(|source| MachineError::Os {
        what: "creating the exit eventfd",
        source,
    })?);
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| MachineError::Os {
        what: "creating the reset eventfd",
        source,
    })?;
    let mut event_manager = VmmEventManager::new().map_err(MachineError::EventLoop)?;
    let mut dm = DeviceManager::new();
    dm.add_legacy_devices(
        &vm,
        serial_output(config)?,
        reset_evt.try_clone().map_err(|source| MachineError::Os {
            what: "cloning the reset eventfd",
            source,
        })?,
    )?;
    let device_control = match add_devices {
        Some(hook) => hook(&vm, &mut dm, &mut event_manager, &memory)?,
        None => None,
    };
    let cmdline = boot::build_cmdline(&config.cmdline, dm.cmdline_args(), MAX_CMDLINE_LEN)?;
    boot::write_boot_info(&memory, &cmdline, initramfs, memory_bytes)?;

    let watcher: Subscriber = Arc::new(Mutex::new(ExitWatcher {
        exit: exit.clone(),
        reset_evt,
    }));
    event_manager.add_subscriber(watcher);

    let metrics = Arc::new(VmmMetrics::new(started));
    let pio = Arc::new(dm.pio_bus.clone());
    let mmio = Arc::new(dm.mmio_bus.clone());
    let serial = dm.serial.clone();
    let devices = Arc::new(Mutex::new(dm));

    crate::log::debug!("devices ready elapsed_us={}", started.elapsed().as_micros());
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    install_kick_handler().map_err(|e| MachineError::Os {
        what: "installing the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let control = Arc::new(VcpuControl::default());
    let (vcpu_filter, loop_filter) = if config.seccomp {
        (
            Some(Arc::new(seccomp::vcpu_filter()?)),
            Some(seccomp::event_loop_filter(config.jail.is_some())?),
        )
    } else {
        (None, None)
    };
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut entries = supported.as_slice().to_vec();
        cpuid::filter_cpuid(&mut entries, id, config.vcpus);
        let cpuid = kvm_bindings::CpuId::from_entries(&entries).map_err(|_| MachineError::Os {
            what: "too many CPUID entries",
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        regs::configure_vcpu(&fd, kernel.entry)?;
        vcpus.push(Vcpu {
            fd,
            id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
            metrics: metrics.clone(),
            control: control.clone(),
            seccomp: vcpu_filter.clone(),
        });
    }

    crate::log::debug!(
        "vCPUs configured elapsed_us={}",
        started.elapsed().as_micros()
    );
    let shutdown_deadline = Arc::new(Mutex::new(None::<Instant>));
    let handles = Arc::new(Mutex::new(None::<VcpuHandles>));
    if let Some(path) = &config.control_socket {
        let target = Arc::new(MachineControl {
            config: config.clone(),
            metrics: metrics.clone(),
            memory: memory.clone(),
            vcpus: handles.clone(),
            devices: devices.clone(),
            device_control: device_control.clone(),
            shutdown_deadline: shutdown_deadline.clone(),
        });
        let server: Subscriber = Arc::new(Mutex::new(ControlServer::bind(path, target)?));
        event_manager.add_subscriber(server);
    }

    // Everything the VM needs is open: confine the VMM before any guest
    // instruction runs (the vCPU threads start next).
    if let Some(jail) = &config.jail {
        crate::jail::confine(jail).map_err(|source| MachineError::Os {
            what: "jailing the VMM",
            source: std::io::Error::other(crate::error_chain(&source)),
        })?;
        crate::log::info!(
            "jailed: uid {} gid {}, root {}",
            jail.uid,
            jail.gid,
            jail.root.display()
        );
    }
    let mut threads = Vec::new();
    for vcpu in vcpus {
        match vcpu.start() {
            Ok(t) => threads.push(t),
            Err(source) => {
                exit.request(VmExitReason::VmmError(format!(
                    "starting a vCPU thread: {source}"
                )));
                break;
            }
        }
    }
    if let Ok(mut h) = handles.lock() {
        *h = Some(VcpuHandles {
            threads,
            control: control.clone(),
        });
    }

    crate::log::debug!("vCPUs started elapsed_us={}", started.elapsed().as_micros());
    if let Some(filter) = &loop_filter {
        if let Err(e) = seccomp::apply(filter) {
            exit.request(VmExitReason::VmmError(e.to_string()));
        }
    }
    if let Some(target) = crate::jail::armed_probe() {
        crate::jail::probe(target);
    }
    let reason = loop {
        if let Err(e) = event_manager.run_with_timeout(LOOP_TICK_MS) {
            break VmExitReason::VmmError(format!("event loop: {e:?}"));
        }
        if let Some(reason) = exit.reason() {
            break reason;
        }
        let expired = shutdown_deadline
            .lock()
            .map(|d| d.is_some_and(|d| Instant::now() >= d))
            .unwrap_or(false);
        if expired {
            break VmExitReason::ShutdownTimeout;
        }
    };

    let taken = handles.lock().ok().and_then(|mut h| h.take());
    if let Some(h) = taken {
        let stuck = h.stop(VCPU_WAIT);
        if stuck > 0 {
            crate::log::warning!("{stuck} vCPU threads did not stop; exiting anyway");
        }
    }
    if let Some(serial) = serial {
        if let Ok(mut s) = serial.lock() {
            s.flush();
        }
    }
    let _ = std::io::stdout().flush();
    let exits = metrics.exits.snapshot();
    crate::log::info!(
        "VM ended: {reason} first_exit_us={} run_ms={} vmm_rss_kib={} guest_touched_kib={} \
         io_out={} io_in={} mmio={}",
        metrics.first_exit_ns.load(Ordering::Relaxed) / 1000,
        metrics.started.elapsed().as_millis(),
        proc_status_bytes("VmRSS").unwrap_or(0) / 1024,
        guest_touched_bytes(&memory) / 1024,
        exits.io_out,
        exits.io_in,
        exits.mmio_read + exits.mmio_write
    );
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn private_memory_by_default_shared_memfds_on_request() {
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 2 << 20)];
        let private = super::guest_memory(&ranges, false).unwrap();
        assert!(private.iter().all(|r| r.file_offset().is_none()));

        let shared = super::guest_memory(&ranges, true).unwrap();
        assert_eq!(shared.num_regions(), 2);
        for region in shared.iter() {
            let fo = region.file_offset().expect("shared RAM is file-backed");
            assert_eq!(fo.file().metadata().unwrap().len(), region.len());
            // A backend cannot shrink it under the VMM.
            assert!(fo.file().set_len(0).is_err(), "memfd not sealed");
        }
        // What the guest writes is in the file: what a backend maps sees it.
        shared.write_obj(0xabcd_u16, GuestAddress(4 << 20)).unwrap();
        let fo = shared.iter().nth(1).unwrap().file_offset().unwrap();
        let mut b = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(fo.file(), &mut b, 0).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0xabcd);
    }

    #[test]
    fn the_console_log_never_passes_its_cap() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut log = super::CappedLog::new(file, 1000);
        for i in 0..500 {
            log.write_all(format!("line {i}\n").as_bytes()).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= 1000);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("[vmpod: console log truncated]"), "{text}");
        assert!(text.ends_with("line 499\n"), "{text}");
        // One write larger than the cap is cut, never over the cap.
        log.write_all(&[b'x'; 5000]).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= 1000);
    }
}
