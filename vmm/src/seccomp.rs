//! seccomp filters for the VMM's threads: after set-up, a vCPU thread may
//! only run KVM_RUN and what its exits need; the event-loop thread only what
//! the event loop, the control socket and metrics need. Anything else kills
//! the process: a guest that compromised the VMM gets no new syscalls.
//!
//! On by default (`"seccomp": false` in the VM config turns it off, for
//! debugging). The device backends that run in the event loop (vsock, blk,
//! net, rng) have their syscalls in [`EVENT_LOOP_SYSCALLS`]; virtio-fs relays
//! its backend's calls there with `read`/`write` on eventfds, and talks to
//! the backend from the vCPU thread that activates it (`VCPU_SYSCALLS`);
//! `tests/tests/vmm_seccomp.rs` runs the devices under the filters.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors from building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("compiling the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("installing the seccomp filter")]
    Apply(#[source] seccompiler::Error),
}

/// `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;
/// `_IOR(KVMIO, 0x81, struct kvm_regs)`: read for crash reports.
pub const KVM_GET_REGS: u64 = 0x8090_ae81;
/// `FIONBIO`: what `set_nonblocking` uses on accepted control connections.
pub const FIONBIO: u64 = 0x5421;

/// Syscalls of memory management, signals, time and thread exit: both thread kinds.
const COMMON_SYSCALLS: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    // malloc grows its per-thread arenas with mprotect.
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    // Debug builds of std check an fd with F_GETFD before closing it.
    libc::SYS_fcntl,
];

/// vCPU threads: eventfd writes (irqfds, reset), serial output, PIO/MMIO exits.
/// Dropping the VcpuFd at thread exit closes it.
const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_close,
    // virtio-fs: the driver's DRIVER_OK or reset, trapped on this thread,
    // (re)starts or stops the vhost-user backend's rings: a `poll` for room
    // on the socket, then messages (some with eventfds) sent, none awaited.
    libc::SYS_poll,
    libc::SYS_sendmsg,
];

/// The event loop (which also serves the control socket and runs the
/// device backends), jailed or not: epoll, the control socket (descriptors
/// arrive with recvmsg), metrics (pread of the status file opened at
/// start-up, mincore), kicking vCPUs.
pub const EVENT_LOOP_SYSCALLS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_close,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lseek,
    libc::SYS_mincore,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_shutdown,
    // virtio-blk: reads, writes and flushes of the backing files.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    // vsock: the muxer's handshake-timeout timer.
    libc::SYS_timerfd_settime,
    // virtio-net moves frames with read/write on the tap (in COMMON_SYSCALLS).
];

/// What only an unjailed event loop may do: open files by path (block
/// attach by path), remove its sockets on exit, and connect to host
/// listeners for guest-initiated vsock connections (`socket` is limited to
/// AF_UNIX). A jailed VMM gets its disks as descriptors and makes no
/// connections.
const UNJAILED_EVENT_LOOP_SYSCALLS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_connect,
];

fn ioctl_rule(requests: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    requests
        .iter()
        .map(|&req| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                .map_err(SeccompError::Build)?;
            SeccompRule::new(vec![cond]).map_err(SeccompError::Build)
        })
        .collect()
}

/// `socket(AF_UNIX, ...)` only: the vsock muxer's connections to host listeners.
fn unix_socket_rule() -> Result<Vec<SeccompRule>, SeccompError> {
    let cond = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .map_err(SeccompError::Build)?;
    Ok(vec![
        SeccompRule::new(vec![cond]).map_err(SeccompError::Build)?,
    ])
}

fn build(
    syscalls: &[&[i64]],
    ioctls: &[u64],
    extra: Vec<(i64, Vec<SeccompRule>)>,
) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = extra.into_iter().collect();
    for list in syscalls {
        for &nr in *list {
            rules.insert(nr, vec![]);
        }
    }
    rules.insert(libc::SYS_ioctl, ioctl_rule(ioctls)?);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// The filter for vCPU threads.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    build(
        &[COMMON_SYSCALLS, VCPU_SYSCALLS],
        allowed_ioctls(ThreadKind::Vcpu),
        Vec::new(),
    )
}

/// The filter for the event-loop thread; `jailed`: without
/// [`UNJAILED_EVENT_LOOP_SYSCALLS`] and `socket`.
pub fn event_loop_filter(jailed: bool) -> Result<BpfProgram, SeccompError> {
    if jailed {
        build(
            &[COMMON_SYSCALLS, EVENT_LOOP_SYSCALLS],
            &[FIONBIO],
            Vec::new(),
        )
    } else {
        build(
            &[
                COMMON_SYSCALLS,
                EVENT_LOOP_SYSCALLS,
                UNJAILED_EVENT_LOOP_SYSCALLS,
            ],
            &[FIONBIO],
            vec![(libc::SYS_socket, unix_socket_rule()?)],
        )
    }
}

/// The threads the VMM filters, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    /// The main thread: event loop, control socket, device backends.
    EventLoop {
        jailed: bool,
    },
}

/// Every syscall `kind`'s filter allows (some with argument conditions:
/// `ioctl` only with the requests of [`allowed_ioctls`], `socket` only for
/// AF_UNIX), sorted: what the tests compare against the expected lists.
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<i64> {
    let mut out: Vec<i64> = match kind {
        ThreadKind::Vcpu => [COMMON_SYSCALLS, VCPU_SYSCALLS].concat(),
        ThreadKind::EventLoop { jailed: true } => [COMMON_SYSCALLS, EVENT_LOOP_SYSCALLS].concat(),
        ThreadKind::EventLoop { jailed: false } => [
            COMMON_SYSCALLS,
            EVENT_LOOP_SYSCALLS,
            UNJAILED_EVENT_LOOP_SYSCALLS,
            &[libc::SYS_socket],
        ]
        .concat(),
    };
    out.push(libc::SYS_ioctl);
    out.sort_unstable();
    out.dedup();
    out
}

/// The ioctl requests `kind`'s filter allows.
pub fn allowed_ioctls(kind: ThreadKind) -> &'static [u64] {
    match kind {
        ThreadKind::Vcpu => &[KVM_RUN, KVM_GET_REGS],
        ThreadKind::EventLoop { .. } => &[FIONBIO],
    }
}

/// Installs `filter` on the calling thread (and threads it creates later).
pub fn apply(filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(SeccompError::Apply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        assert!(vcpu_filter().unwrap().len() > 10);
        assert!(event_loop_filter(false).unwrap().len() > 10);
        assert!(event_loop_filter(true).unwrap().len() > 10);
    }

    /// The allow-lists, enumerated: a syscall added to or dropped from a
    /// filter must be added or dropped here too, on purpose.
    #[test]
    fn the_filters_allow_exactly_the_expected_syscalls() {
        use libc::*;
        let common = [
            SYS_brk,
            SYS_mmap,
            SYS_munmap,
            SYS_mremap,
            SYS_madvise,
            SYS_mprotect,
            SYS_futex,
            SYS_rt_sigreturn,
            SYS_rt_sigprocmask,
            SYS_sigaltstack,
            SYS_sched_yield,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_getrandom,
            SYS_exit,
            SYS_exit_group,
            SYS_read,
            SYS_write,
            SYS_writev,
            SYS_fcntl,
            SYS_ioctl,
        ];
        let sorted = |extra: &[i64]| {
            let mut v: Vec<i64> = common.iter().chain(extra).copied().collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        assert_eq!(
            allowed_syscalls(ThreadKind::Vcpu),
            sorted(&[SYS_gettid, SYS_getpid, SYS_close, SYS_poll, SYS_sendmsg])
        );
        let jailed_loop = [
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_epoll_ctl,
            SYS_accept4,
            SYS_recvfrom,
            SYS_recvmsg,
            SYS_sendto,
            SYS_close,
            SYS_statx,
            SYS_newfstatat,
            SYS_fstat,
            SYS_lseek,
            SYS_mincore,
            SYS_tgkill,
            SYS_getpid,
            SYS_gettid,
            SYS_shutdown,
            SYS_pread64,
            SYS_pwrite64,
            SYS_fdatasync,
            SYS_timerfd_settime,
        ];
        assert_eq!(
            allowed_syscalls(ThreadKind::EventLoop { jailed: true }),
            sorted(&jailed_loop)
        );
        let mut unjailed = jailed_loop.to_vec();
        unjailed.extend([
            SYS_openat,
            SYS_unlink,
            SYS_unlinkat,
            SYS_connect,
            SYS_socket,
        ]);
        assert_eq!(
            allowed_syscalls(ThreadKind::EventLoop { jailed: false }),
            sorted(&unjailed)
        );
        // What a jailed VMM must never get back.
        for kind in [ThreadKind::Vcpu, ThreadKind::EventLoop { jailed: true }] {
            let allowed = allowed_syscalls(kind);
            for nr in [
                SYS_openat,
                SYS_open,
                SYS_socket,
                SYS_connect,
                SYS_unlink,
                SYS_unlinkat,
                SYS_ptrace,
                SYS_execve,
                SYS_fork,
                SYS_clone,
                SYS_clone3,
                SYS_setuid,
                SYS_mount,
                SYS_unshare,
                SYS_setns,
                SYS_process_vm_writev,
            ] {
                assert!(!allowed.contains(&nr), "{kind:?} allows syscall {nr}");
            }
        }
        assert_eq!(allowed_ioctls(ThreadKind::Vcpu), &[KVM_RUN, KVM_GET_REGS]);
        assert_eq!(
            allowed_ioctls(ThreadKind::EventLoop { jailed: true }),
            &[FIONBIO]
        );
    }

    #[test]
    fn a_filtered_thread_keeps_allowed_syscalls_and_dies_on_others() {
        // Run in a child process: KillProcess would take the test runner down.
        let filter = vcpu_filter().unwrap();
        // SAFETY: the child only makes raw syscalls (prctl and seccomp via
        // seccompiler, getpid, socket, _exit): no locks or allocation after fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if apply(&filter).is_err() {
                // SAFETY: exiting the forked child.
                unsafe { libc::_exit(10) };
            }
            // Allowed: getpid. Then a forbidden one: socket.
            // SAFETY: raw syscalls with no pointer arguments.
            unsafe { libc::syscall(libc::SYS_getpid) };
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            // SAFETY: exiting the forked child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
