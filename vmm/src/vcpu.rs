//! One OS thread per vCPU: KVM_RUN in a loop, exits dispatched to the buses,
//! pause/resume by a kick signal with `immediate_exit`, and the VM's end
//! reported to the event loop through an eventfd.
//!
//! ```text
//!            pause()                     resume()
//!  Running ───────────▶ Paused (parked) ───────────▶ Running
//!     │                    │
//!     └──── stop() ────────┴──────────▶ Exiting (thread returns)
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use super::bus::Bus;
use super::metrics::{ExitCounters, VmmMetrics, should_log};

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest reset the machine (i8042 0xFE, `reboot=k`) or asked KVM to.
    Reset,
    /// The guest powered off (KVM system event).
    PowerOff,
    /// Every vCPU halted without an in-kernel irqchip to wake it.
    Halted,
    /// The guest triple-faulted (what `reboot=t` does, and what a crash does).
    TripleFault,
    /// A graceful shutdown timed out and the VMM stopped the VM.
    ShutdownTimeout,
    /// The guest crashed (KVM crash event, failed entry, internal error).
    GuestCrash(String),
    /// The VMM failed.
    VmmError(String),
}

impl VmExitReason {
    /// The VMM's exit status: 0 for a guest reset or power-off, 2 for a guest
    /// crash or triple fault, 3 when a shutdown timed out, 1 for VMM errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExitReason::Reset | VmExitReason::PowerOff | VmExitReason::Halted => 0,
            VmExitReason::VmmError(_) => 1,
            VmExitReason::TripleFault | VmExitReason::GuestCrash(_) => 2,
            VmExitReason::ShutdownTimeout => 3,
        }
    }
}

impl std::fmt::Display for VmExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExitReason::Reset => write!(f, "guest reset"),
            VmExitReason::PowerOff => write!(f, "guest power-off"),
            VmExitReason::Halted => write!(f, "guest halted"),
            VmExitReason::TripleFault => write!(f, "guest triple fault"),
            VmExitReason::ShutdownTimeout => write!(f, "graceful shutdown timed out"),
            VmExitReason::GuestCrash(m) => write!(f, "guest crashed: {m}"),
            VmExitReason::VmmError(m) => write!(f, "VMM error: {m}"),
        }
    }
}

/// The first reason the VM should end, and the eventfd that wakes the event loop.
#[derive(Debug)]
pub struct VmExit {
    reason: Mutex<Option<VmExitReason>>,
    evt: EventFd,
}

impl VmExit {
    /// A fresh exit slot.
    pub fn new() -> std::io::Result<Self> {
        Ok(VmExit {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is recorded already, and wakes the event loop.
    pub fn request(&self, reason: VmExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<VmExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd the event loop watches.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Exiting,
}

/// What the VMM tells its vCPU threads.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<RunState>,
    cv: Condvar,
    parked: AtomicUsize,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            state: Mutex::new(RunState::Running),
            cv: Condvar::new(),
            parked: AtomicUsize::new(0),
        }
    }
}

impl VcpuControl {
    fn set(&self, s: RunState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
        self.cv.notify_all();
    }

    /// Whether vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) == RunState::Paused
    }

    /// Blocks while paused; returns false when the thread must exit.
    fn wait_runnable(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *st {
                RunState::Running => return true,
                RunState::Exiting => return false,
                RunState::Paused => {
                    self.parked.fetch_add(1, Ordering::SeqCst);
                    self.cv.notify_all();
                    // Bounded wait: re-check the state even if a notify is lost.
                    st = self
                        .cv
                        .wait_timeout(st, Duration::from_millis(100))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                    self.parked.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }
}

thread_local! {
    /// This thread's kvm_run, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: one real-time signal, handled on vCPU threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A kick that lands between the run-state check and KVM_RUN would be lost;
    // immediate_exit makes that KVM_RUN return EINTR at once instead.
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // The pointer is this thread's mmap'ed kvm_run, set while the VcpuFd
            // that owns the mapping is alive on this thread and cleared before
            // it is dropped.
            let flag = run
                .cast::<u8>()
                .wrapping_add(std::mem::offset_of!(kvm_run, immediate_exit));
            // SAFETY: `flag` points at the u8 immediate_exit field of this thread's
            // live kvm_run mapping (see above); a byte-sized volatile store is
            // async-signal-safe.
            unsafe { std::ptr::write_volatile(flag, 1) };
        }
    });
}

/// Installs the kick signal handler (process-wide, once before vCPUs start).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

/// One vCPU and what it needs to handle exits.
pub struct Vcpu {
    /// The KVM vCPU, configured for boot.
    pub fd: VcpuFd,
    /// Its index, which is also its APIC ID.
    pub id: u8,
    /// Where port I/O exits go.
    pub pio: Arc<Bus>,
    /// Where MMIO exits go.
    pub mmio: Arc<Bus>,
    /// Where the vCPU reports the end of the VM.
    pub exit: Arc<VmExit>,
    /// Exit counters.
    pub metrics: Arc<VmmMetrics>,
    /// Pause/resume/stop requests.
    pub control: Arc<VcpuControl>,
    /// The seccomp filter this thread installs before its first KVM_RUN.
    pub seccomp: Option<Arc<seccompiler::BpfProgram>>,
}

/// What the run loop does after an exit.
enum Next {
    Continue,
    Stop(VmExitReason),
}

impl Vcpu {
    /// Runs the vCPU on its own thread.
    pub fn start(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run_loop())
    }

    /// Where the guest was when it crashed, for the exit message.
    fn crash_context(&mut self) -> String {
        let mut out = format!("vcpu {}", self.id);
        if let Ok(regs) = self.fd.get_regs() {
            out.push_str(&format!(" rip={:#x} rsp={:#x}", regs.rip, regs.rsp));
        }
        let run = self.fd.get_kvm_run();
        if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says the `internal` member of the union is the one KVM filled.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            out.push_str(&format!(
                " suberror={} data={:x?}",
                internal.suberror,
                &internal.data[..n]
            ));
        }
        out
    }

    fn run_loop(mut self) {
        if let Some(filter) = &self.seccomp {
            if let Err(e) = super::seccomp::apply(filter) {
                self.exit
                    .request(VmExitReason::VmmError(format!("vCPU {}: {e}", self.id)));
                return;
            }
        }
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let reason = loop {
            if !self.control.wait_runnable() {
                break None;
            }
            match self.fd.run() {
                Ok(exit) => {
                    self.metrics.note_exit();
                    match handle_exit(exit, &self.pio, &self.mmio, &self.metrics.exits) {
                        Next::Continue => {}
                        Next::Stop(VmExitReason::GuestCrash(m)) => {
                            break Some(VmExitReason::GuestCrash(format!(
                                "{m}; {}",
                                self.crash_context()
                            )));
                        }
                        Next::Stop(r) => break Some(r),
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitCounters::inc(&self.metrics.exits.intr);
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => break Some(VmExitReason::VmmError(format!("KVM_RUN: {e}"))),
            }
        };
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        if let Some(r) = reason {
            self.exit.request(r);
        }
    }
}

fn handle_exit(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus, c: &ExitCounters) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ExitCounters::inc(&c.io_in);
            if !pio.read(u64::from(port), data) {
                // Nothing there: the floating bus reads all ones.
                data.fill(0xff);
                unhandled_pio(c, port, "in");
            }
        }
        VcpuExit::IoOut(port, data) => {
            ExitCounters::inc(&c.io_out);
            if !pio.write(u64::from(port), data) {
                unhandled_pio(c, port, "out");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            ExitCounters::inc(&c.mmio_read);
            if !mmio.read(addr, data) {
                data.fill(0);
                unhandled_mmio(c, addr, "read");
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            ExitCounters::inc(&c.mmio_write);
            if !mmio.write(addr, data) {
                unhandled_mmio(c, addr, "write");
            }
        }
        VcpuExit::Hlt => {
            ExitCounters::inc(&c.hlt);
            return Next::Stop(VmExitReason::Halted);
        }
        VcpuExit::Shutdown => {
            ExitCounters::inc(&c.shutdown);
            return Next::Stop(VmExitReason::TripleFault);
        }
        VcpuExit::SystemEvent(kind, _) => {
            ExitCounters::inc(&c.system_event);
            return Next::Stop(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExitReason::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExitReason::Reset,
                other => VmExitReason::GuestCrash(format!("KVM system event {other}")),
            });
        }
        VcpuExit::FailEntry(reason, cpu) => {
            ExitCounters::inc(&c.fail_entry);
            return Next::Stop(VmExitReason::GuestCrash(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on cpu {cpu}"
            )));
        }
        VcpuExit::InternalError => {
            ExitCounters::inc(&c.internal_error);
            return Next::Stop(VmExitReason::GuestCrash(
                "KVM_EXIT_INTERNAL_ERROR (the instruction emulator gave up)".into(),
            ));
        }
        VcpuExit::Intr => {
            ExitCounters::inc(&c.intr);
        }
        other => {
            // Exits this VMM never enables: ending the VM beats re-entering
            // in a loop the guest might control.
            ExitCounters::inc(&c.other);
            return Next::Stop(VmExitReason::GuestCrash(format!(
                "unexpected vCPU exit {other:?}"
            )));
        }
    }
    Next::Continue
}

fn unhandled_pio(c: &ExitCounters, port: u16, dir: &str) {
    let n = ExitCounters::inc(&c.unhandled_pio);
    // 0x80 is the POST/delay port: written constantly, never interesting.
    if port != 0x80 && should_log(n) {
        crate::log::debug!(
            "port I/O with no device: port={port:#x} dir={dir} count={}",
            n + 1
        );
    }
}

fn unhandled_mmio(c: &ExitCounters, addr: u64, dir: &str) {
    let n = ExitCounters::inc(&c.unhandled_mmio);
    if should_log(n) {
        crate::log::warning!(
            "MMIO with no device: addr={addr:#x} dir={dir} count={}",
            n + 1
        );
    }
}

/// The running vCPU threads.
pub struct VcpuHandles {
    /// One thread per vCPU.
    pub threads: Vec<JoinHandle<()>>,
    /// Shared with every vCPU thread.
    pub control: Arc<VcpuControl>,
}

/// Errors from pausing or stopping vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("{parked} of {total} vCPUs parked within {timeout:?}")]
    PauseTimeout {
        parked: usize,
        total: usize,
        timeout: Duration,
    },
}

impl VcpuHandles {
    fn kick_all(&self) {
        use std::os::unix::thread::JoinHandleExt;
        for t in &self.threads {
            if !t.is_finished() {
                // SAFETY: the pthread_t belongs to a thread we spawned that has not
                // been joined (we hold its JoinHandle), so it is still valid.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
        }
    }

    fn live(&self) -> usize {
        self.threads.iter().filter(|t| !t.is_finished()).count()
    }

    /// Pauses every vCPU; waits at most `timeout` for all of them to park.
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuError> {
        self.control.set(RunState::Paused);
        let deadline = Instant::now() + timeout;
        loop {
            self.kick_all();
            let parked = self.control.parked.load(Ordering::SeqCst);
            let total = self.live();
            if parked >= total {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VcpuError::PauseTimeout {
                    parked,
                    total,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        self.control.set(RunState::Running);
    }

    /// Stops every vCPU thread, joining those that stop within `timeout`.
    /// Threads still inside KVM after that are left to process exit.
    pub fn stop(self, timeout: Duration) -> usize {
        self.control.set(RunState::Exiting);
        let deadline = Instant::now() + timeout;
        while self.live() > 0 && Instant::now() < deadline {
            self.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut stuck = 0;
        for t in self.threads {
            if t.is_finished() {
                let _ = t.join();
            } else {
                stuck += 1;
            }
        }
        stuck
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_reason_wins() {
        let e = VmExit::new().unwrap();
        assert_eq!(e.reason(), None);
        e.request(VmExitReason::Reset);
        e.request(VmExitReason::GuestCrash("later".into()));
        assert_eq!(e.reason(), Some(VmExitReason::Reset));
        assert!(e.eventfd().read().unwrap() >= 1);
    }

    fn stop_reason(n: Next) -> Option<VmExitReason> {
        match n {
            Next::Continue => None,
            Next::Stop(r) => Some(r),
        }
    }

    #[test]
    fn exits_are_dispatched_and_counted() {
        let c = ExitCounters::default();
        let pio = Bus::new();
        let mmio = Bus::new();
        // Nothing on either bus: reads see a floating bus, writes vanish.
        let mut data = [0u8; 2];
        assert!(
            stop_reason(handle_exit(
                VcpuExit::IoIn(0x2f8, &mut data),
                &pio,
                &mmio,
                &c
            ))
            .is_none()
        );
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0xaau8; 4];
        assert!(
            stop_reason(handle_exit(
                VcpuExit::MmioRead(0xd000_0000, &mut data),
                &pio,
                &mmio,
                &c
            ))
            .is_none()
        );
        assert_eq!(data, [0; 4]);
        assert!(stop_reason(handle_exit(VcpuExit::IoOut(0x80, &[1]), &pio, &mmio, &c)).is_none());
        assert!(
            stop_reason(handle_exit(
                VcpuExit::MmioWrite(0x1000, &[1]),
                &pio,
                &mmio,
                &c
            ))
            .is_none()
        );
        let s = c.snapshot();
        assert_eq!((s.io_in, s.io_out, s.mmio_read, s.mmio_write), (1, 1, 1, 1));
        assert_eq!((s.unhandled_pio, s.unhandled_mmio), (2, 2));
    }

    #[test]
    fn guest_endings_map_to_exit_reasons() {
        let c = ExitCounters::default();
        let (pio, mmio) = (Bus::new(), Bus::new());
        let go = |e| stop_reason(handle_exit(e, &pio, &mmio, &c));
        assert_eq!(go(VcpuExit::Shutdown), Some(VmExitReason::TripleFault));
        assert_eq!(go(VcpuExit::Hlt), Some(VmExitReason::Halted));
        assert_eq!(
            go(VcpuExit::SystemEvent(
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN,
                &[]
            )),
            Some(VmExitReason::PowerOff)
        );
        assert_eq!(
            go(VcpuExit::SystemEvent(
                kvm_bindings::KVM_SYSTEM_EVENT_RESET,
                &[]
            )),
            Some(VmExitReason::Reset)
        );
        assert!(matches!(
            go(VcpuExit::SystemEvent(
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH,
                &[]
            )),
            Some(VmExitReason::GuestCrash(_))
        ));
        assert!(matches!(
            go(VcpuExit::InternalError),
            Some(VmExitReason::GuestCrash(_))
        ));
        assert!(matches!(
            go(VcpuExit::FailEntry(7, 0)),
            Some(VmExitReason::GuestCrash(_))
        ));
        // An exit this VMM never enables ends the VM instead of looping.
        assert!(matches!(
            go(VcpuExit::Unknown),
            Some(VmExitReason::GuestCrash(_))
        ));
        assert_eq!(go(VcpuExit::Intr), None);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(VmExitReason::Reset.exit_code(), 0);
        assert_eq!(VmExitReason::PowerOff.exit_code(), 0);
        assert_eq!(VmExitReason::GuestCrash("x".into()).exit_code(), 2);
        assert_eq!(VmExitReason::TripleFault.exit_code(), 2);
        assert_eq!(VmExitReason::VmmError("x".into()).exit_code(), 1);
        assert_eq!(VmExitReason::ShutdownTimeout.exit_code(), 3);
    }

    #[test]
    fn pause_waits_for_threads_to_park() {
        // The kick signal would kill the test process without its handler.
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let threads = (0..2)
            .map(|_| {
                let c = control.clone();
                std::thread::spawn(move || {
                    while c.wait_runnable() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        let h = VcpuHandles { threads, control };
        h.pause(Duration::from_secs(5)).unwrap();
        assert!(h.control.is_paused());
        h.resume();
        assert!(!h.control.is_paused());
        assert_eq!(h.stop(Duration::from_secs(5)), 0);
    }
}
