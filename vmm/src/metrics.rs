//! VMM metrics: vCPU exits per kind, VMM memory, guest memory touched, and a
//! rate limiter for logs a guest can trigger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// vCPU exit counters, shared by all vCPU threads.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub hlt: AtomicU64,
    pub shutdown: AtomicU64,
    pub system_event: AtomicU64,
    pub fail_entry: AtomicU64,
    pub internal_error: AtomicU64,
    pub intr: AtomicU64,
    pub other: AtomicU64,
    /// Accesses to ports/addresses where no device is.
    pub unhandled_pio: AtomicU64,
    pub unhandled_mmio: AtomicU64,
}

/// A snapshot of [`ExitCounters`].
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ExitCountsSnapshot {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    pub shutdown: u64,
    pub system_event: u64,
    pub fail_entry: u64,
    pub internal_error: u64,
    pub intr: u64,
    pub other: u64,
    pub unhandled_pio: u64,
    pub unhandled_mmio: u64,
}

impl ExitCounters {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed)
    }

    /// The current values.
    pub fn snapshot(&self) -> ExitCountsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCountsSnapshot {
            io_in: l(&self.io_in),
            io_out: l(&self.io_out),
            mmio_read: l(&self.mmio_read),
            mmio_write: l(&self.mmio_write),
            hlt: l(&self.hlt),
            shutdown: l(&self.shutdown),
            system_event: l(&self.system_event),
            fail_entry: l(&self.fail_entry),
            internal_error: l(&self.internal_error),
            intr: l(&self.intr),
            other: l(&self.other),
            unhandled_pio: l(&self.unhandled_pio),
            unhandled_mmio: l(&self.unhandled_mmio),
        }
    }
}

/// VMM-wide metrics.
#[derive(Debug)]
pub struct VmmMetrics {
    /// When the VMM process started its VM setup.
    pub started: Instant,
    /// Nanoseconds from `started` to the first vCPU exit (0 = none yet):
    /// an upper bound on "VMM start → first guest instruction".
    pub first_exit_ns: AtomicU64,
    pub exits: ExitCounters,
}

impl VmmMetrics {
    /// Metrics starting now.
    pub fn new(started: Instant) -> Self {
        VmmMetrics {
            started,
            first_exit_ns: AtomicU64::new(0),
            exits: ExitCounters::default(),
        }
    }

    /// Records the first vCPU exit.
    pub fn note_exit(&self) {
        if self.first_exit_ns.load(Ordering::Relaxed) == 0 {
            let ns = self.started.elapsed().as_nanos().max(1) as u64;
            let _ =
                self.first_exit_ns
                    .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

/// Whether the `n`-th (0-based) occurrence of a guest-triggerable event is
/// logged: the first 10, then only at powers of two, so a hostile guest gets
/// O(log n) log lines out of n events.
pub fn should_log(n: u64) -> bool {
    n < 10 || n.is_power_of_two()
}

/// Reads a `kB` field (`VmRSS`, `RssAnon`, ...) of /proc/self/status, in bytes.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let file = proc_status()?;
    let mut buf = vec![0u8; 8192];
    let n = file.read_at(&mut buf, 0).ok()?;
    parse_status_field(&String::from_utf8_lossy(&buf[..n]), field)
}

/// `/proc/self/status`, opened once: the first call (made at start-up,
/// before the jail) keeps it for every later one.
pub fn proc_status() -> Option<&'static std::fs::File> {
    static STATUS: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    STATUS
        .get_or_init(|| std::fs::File::open("/proc/self/status").ok())
        .as_ref()
}

fn parse_status_field(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kb.checked_mul(1024)
    })
}

/// Bytes of `[addr, addr + len)` resident in memory (mincore).
pub fn resident_bytes(addr: *const u8, len: usize) -> std::io::Result<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr` is page-aligned (an mmap'ed region), `[addr, addr+len)` is one
    // mapping owned by the caller for the duration of the call, and `vec` holds
    // one byte per page as mincore requires.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let resident = vec.iter().filter(|b| *b & 1 == 1).count() as u64;
    Ok(resident * page as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let s = "Name:\tvmpod\nVmRSS:\t    4321 kB\nRssAnon:\t  100 kB\n";
        assert_eq!(parse_status_field(s, "VmRSS"), Some(4321 * 1024));
        assert_eq!(parse_status_field(s, "RssAnon"), Some(100 * 1024));
        assert_eq!(parse_status_field(s, "VmSwap"), None);
        assert_eq!(parse_status_field("VmRSS: lots kB", "VmRSS"), None);
        assert!(proc_status_bytes("VmRSS").unwrap() > 0);
    }

    #[test]
    fn log_rate_limit_is_logarithmic() {
        let logged = (0..1_000_000u64).filter(|n| should_log(*n)).count();
        assert!(logged < 40, "{logged}");
        assert!(should_log(0) && should_log(9) && !should_log(10) && should_log(16));
    }

    #[test]
    fn mincore_counts_touched_pages_only() {
        let len = 64 * 4096;
        let gm =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), len)])
                .unwrap();
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let region = gm.iter().next().unwrap();
        let host = gm.get_host_address(vm_memory::GuestAddress(0)).unwrap();
        assert_eq!(resident_bytes(host, region.len() as usize).unwrap(), 0);
        for i in 0..3u64 {
            gm.write_obj(1u8, vm_memory::GuestAddress(i * 4096 * 10))
                .unwrap();
        }
        assert_eq!(resident_bytes(host, len).unwrap(), 3 * 4096);
    }
}
