//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2).
//!
//! A 0x1000-byte window: registers below 0x100 (32-bit accesses only), the
//! device's config space from 0x100. The driver walks the status state
//! machine below; the transport checks every step and hands the queues to
//! the device on DRIVER_OK.
//!
//! ```text
//!   0 ──ACKNOWLEDGE──▶ ACK ──DRIVER──▶ ACK|DRIVER ──(features)──FEATURES_OK──▶
//!   ... ──(queue setup)──DRIVER_OK──▶ running ──(malformed queue)──▶ running|NEEDS_RESET
//!   any state ──write 0──▶ 0 (reset: device stopped, queues and features cleared)
//! ```
//!
//! FEATURES_OK is refused (the bit stays clear, as the spec asks) unless
//! the driver accepted VIRTIO_F_VERSION_1 and nothing the device did not offer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::log_limit::{LogLimiter, guest_warn};
use super::{Activation, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::bus::BusDevice;

/// Size of the MMIO window of one device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the device config space in the window.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets.
pub mod reg {
    /// "virt" in little endian.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Transport version (2 = modern).
    pub const VERSION: u64 = 0x004;
    /// Virtio device ID.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor ID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Offered feature bits, 32 at a time.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects the 32-bit word of DEVICE_FEATURES.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Accepted feature bits, 32 at a time.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects the 32-bit word of DRIVER_FEATURES.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Whether the selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification (value = queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt causes.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Changes whenever the config space changes.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

const MMIO_MAGIC: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("VMPD").
const VENDOR_ID: u32 = 0x4450_4d56;

/// The driver's view of one queue while it sets it up. Kept here rather
/// than in `virtio_queue::Queue` because that type's setters log every bad
/// value through the `log` crate, unthrottled, and the values are guest input.
#[derive(Clone, Copy, Debug)]
struct QueueConfig {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Builds the live queue, checking size, alignment and that all three
    /// areas lie in guest memory.
    fn build(&self, mem: &GuestMemoryMmap) -> Result<Queue, String> {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        if !self.ready {
            return Err("queue not ready".into());
        }
        let size = u16::try_from(self.size).map_err(|_| format!("queue size {}", self.size))?;
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(size)
            .map_err(|_| format!("invalid queue size {size}"))?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| e.to_string())?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(|e| e.to_string())?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(|e| e.to_string())?;
        let n = u64::from(size);
        // Descriptor table, avail ring (flags, idx, ring, used_event), used
        // ring (flags, idx, ring of 8-byte elements, avail_event).
        for (what, addr, len) in [
            ("descriptor table", self.desc, 16 * n),
            ("available ring", self.avail, 6 + 2 * n),
            ("used ring", self.used, 6 + 8 * n),
        ] {
            let inside = addr.checked_add(len).is_some()
                && GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize);
            if !inside {
                return Err(format!("{what} {addr:#x}+{len:#x} outside guest memory"));
            }
        }
        q.set_ready(true);
        Ok(q)
    }
}

/// Transport-level counters.
#[derive(Debug, Default)]
pub struct MmioMetrics {
    /// Accesses of the wrong width, to unknown registers, or out of order.
    pub bad_accesses: AtomicU64,
    /// Activations refused (queues unusable).
    pub activate_fails: AtomicU64,
    /// Device resets by the driver.
    pub resets: AtomicU64,
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<QueueConfig>,
    queue_evts: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    metrics: Arc<MmioMetrics>,
    log: LogLimiter,
}

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device declared an impossible queue size.
    #[error("device declares invalid queue size {0}")]
    QueueSize(u16),
    /// An EventFd could not be created.
    #[error("cannot create queue eventfd")]
    EventFd(#[source] std::io::Error),
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("queue_sel", &self.queue_sel)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    // A poisoned lock means a device thread panicked; the state is still
    // memory-safe to use, and the transport must keep answering the guest.
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MmioTransport {
    /// Puts `device` behind an MMIO transport over guest memory `mem`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let (sizes, interrupt) = {
            let d = lock(&device);
            (d.queue_max_sizes().to_vec(), d.interrupt().clone())
        };
        let queues = sizes
            .iter()
            .map(|&s| {
                Queue::new(s)
                    .map(|_| QueueConfig::new(s))
                    .map_err(|_| MmioError::QueueSize(s))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            metrics: Arc::new(MmioMetrics::default()),
            log: LogLimiter::new(),
        })
    }

    /// Clones of the queue notification EventFds, by queue index (for KVM
    /// ioeventfds at base + 0x50 with datamatch = index).
    ///
    /// All or nothing: if duplicating an fd fails (fd exhaustion) this logs
    /// and returns an empty list. The device still works then, only slower:
    /// QueueNotify writes trap to [`BusDevice::write`], which signals the
    /// same EventFds.
    pub fn queue_events(&self) -> Vec<EventFd> {
        match self.try_queue_events() {
            Ok(evts) => evts,
            Err(e) => {
                crate::log::error!("virtio-mmio: cannot clone queue eventfds: {e}");
                Vec::new()
            }
        }
    }

    fn try_queue_events(&self) -> std::io::Result<Vec<EventFd>> {
        self.queue_evts.iter().map(EventFd::try_clone).collect()
    }

    /// The interrupt EventFd (for a KVM irqfd).
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.evt()
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Transport counters.
    pub fn metrics(&self) -> &Arc<MmioMetrics> {
        &self.metrics
    }

    /// Device and transport counters together, for the VMM's metrics endpoint.
    pub fn metrics_snapshot(&self) -> super::MetricsSnapshot {
        let mut m = lock(&self.device).metrics();
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        m.push(("mmio_bad_accesses", g(&self.metrics.bad_accesses)));
        m.push(("mmio_activate_fails", g(&self.metrics.activate_fails)));
        m.push(("mmio_resets", g(&self.metrics.resets)));
        m.push(("needs_reset", u64::from(self.interrupt.needs_reset())));
        m
    }

    fn bad_access(&mut self, what: &str, offset: u64) {
        self.metrics.bad_accesses.fetch_add(1, Ordering::Relaxed);
        guest_warn!(self.log, "virtio-mmio: {what} (offset {offset:#x})");
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn status(&self) -> u32 {
        let mut s = self.status;
        if self.interrupt.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn reset(&mut self) {
        self.metrics.resets.fetch_add(1, Ordering::Relaxed);
        lock(&self.device).reset();
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        // Drop notifications that were pending from before the reset.
        for e in &self.queue_evts {
            let _ = e.read();
        }
        self.interrupt.reset();
        self.status = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            // Bits are only ever added; clearing one needs a full reset.
            self.bad_access("status bit cleared without reset", reg::STATUS);
            return;
        }
        let added = value & !old;
        let mut new = value;
        if added & status::FEATURES_OK != 0 {
            let ok =
                old & status::DRIVER != 0 && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if ok {
                lock(&self.device).set_acked_features(self.acked_features);
            } else {
                // The driver reads the status back and gives up on the device.
                new &= !status::FEATURES_OK;
                self.bad_access("FEATURES_OK without VERSION_1", reg::STATUS);
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                new &= !status::DRIVER_OK;
                self.bad_access("DRIVER_OK before FEATURES_OK", reg::STATUS);
            } else {
                self.activate();
            }
        }
        self.status = new;
    }

    fn activate(&mut self) {
        let result = self
            .queues
            .iter()
            .map(|q| q.build(&self.mem))
            .collect::<Result<Vec<Queue>, String>>()
            .and_then(|queues| {
                let queue_evts = self
                    .try_queue_events()
                    .map_err(|e| format!("cannot clone queue eventfds: {e}"))?;
                lock(&self.device)
                    .activate(Activation {
                        mem: self.mem.clone(),
                        queues,
                        queue_evts,
                    })
                    .map_err(|e| e.to_string())
            });
        if let Err(reason) = result {
            self.metrics.activate_fails.fetch_add(1, Ordering::Relaxed);
            guest_warn!(
                self.log,
                "virtio-mmio: activation failed, device needs reset: {reason}"
            );
            let _ = self.interrupt.set_needs_reset();
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size.into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready.into()),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                self.bad_access("read of unknown register", offset);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    self.bad_access("features written outside negotiation", offset);
                    return;
                }
                let avail = lock(&self.device).avail_features();
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let word = (u64::from(v) << shift) & avail;
                let mask = 0xffff_ffffu64 << shift;
                self.acked_features = (self.acked_features & !mask) | word;
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        guest_warn!(self.log, "virtio-mmio: cannot signal queue: {e}");
                    }
                }
                None => self.bad_access("notify of unknown queue", offset),
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => {
                if !self.queue_setup_allowed() {
                    self.bad_access("queue register written outside setup", offset);
                    return;
                }
                let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
                    self.bad_access("queue register of unknown queue", offset);
                    return;
                };
                let set_lo = |a: &mut u64| *a = (*a & !0xffff_ffff) | u64::from(v);
                let set_hi = |a: &mut u64| *a = (*a & 0xffff_ffff) | (u64::from(v) << 32);
                match offset {
                    // Checked when the queue is built, at DRIVER_OK.
                    reg::QUEUE_NUM => q.size = v,
                    reg::QUEUE_READY => q.ready = v == 1,
                    reg::QUEUE_DESC_LOW => set_lo(&mut q.desc),
                    reg::QUEUE_DESC_HIGH => set_hi(&mut q.desc),
                    reg::QUEUE_AVAIL_LOW => set_lo(&mut q.avail),
                    reg::QUEUE_AVAIL_HIGH => set_hi(&mut q.avail),
                    reg::QUEUE_USED_LOW => set_lo(&mut q.used),
                    _ => set_hi(&mut q.used),
                }
            }
            _ => self.bad_access("write of unknown or read-only register", offset),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if offset.saturating_add(data.len() as u64) > MMIO_WINDOW_SIZE {
                data.fill(0);
                self.bad_access("config read past window", offset);
                return;
            }
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            self.bad_access("register read not 32 bits wide", offset);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if offset.saturating_add(data.len() as u64) > MMIO_WINDOW_SIZE {
                self.bad_access("config write past window", offset);
                return;
            }
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_access("register write not 32 bits wide", offset);
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::TYPE_RNG;
    use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::rng::test_utils::PatternSource;
    use crate::devices::virtio::test_utils::{
        Buf, MockDriver, event_manager_with, run_idle, run_until, wait_used,
    };

    fn rng() -> Arc<Mutex<Rng>> {
        Arc::new(Mutex::new(Rng::new(Box::new(PatternSource(0))).unwrap()))
    }

    #[test]
    fn linux_style_bring_up_reaches_driver_ok() {
        let mut d = MockDriver::new(rng());
        assert_eq!(d.read_reg(reg::DEVICE_ID), TYPE_RNG);
        assert_ne!(d.device_features() & (1 << VIRTIO_F_VERSION_1), 0);
        d.init(0);
        assert_eq!(
            d.status(),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
        );
        assert_eq!(d.queues.len(), 1);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let mut d = MockDriver::new(rng());
        let s = d.negotiate(0);
        assert_eq!(s & status::FEATURES_OK, 0);
        // DRIVER_OK is refused too: the device is never activated.
        d.write_reg(reg::STATUS, 0xf);
        assert_eq!(d.status() & status::DRIVER_OK, 0);
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd() {
        let mut d = MockDriver::new(rng());
        let evts = d.transport.queue_events();
        assert_eq!(evts.len(), 1);
        d.init(0);
        d.notify(0);
        assert_eq!(evts[0].read().unwrap(), 1);
        // Unknown queue: ignored, counted.
        d.notify(7);
        assert_eq!(
            d.transport.metrics().bad_accesses.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn ioeventfd_path_drives_the_device_without_a_notify_write() {
        let dev = rng();
        let mut d = MockDriver::new(dev.clone());
        // What KVM would hold: the clones, signalled on a guest write to 0x50.
        let ioevents = d.transport.queue_events();
        let mut em = event_manager_with(dev);
        d.init(0);
        let c = d.add_chain(0, &[Buf::In(4)]);
        ioevents[0].write(1).unwrap();
        let used = wait_used(&mut em, &mut d, 0);
        assert_eq!((used.head, used.len), (c.head, 4));
    }

    #[test]
    fn bad_widths_and_late_queue_writes_are_ignored() {
        let mut d = MockDriver::new(rng());
        d.init(0);
        let mut two = [0xffu8; 2];
        d.transport.read(reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        d.write_reg(reg::QUEUE_SEL, 0);
        d.write_reg(reg::QUEUE_READY, 0);
        assert_eq!(d.read_reg(reg::QUEUE_READY), 1);
        // Clearing a status bit without a reset is refused.
        d.write_reg(reg::STATUS, status::ACKNOWLEDGE);
        assert_ne!(d.status() & status::DRIVER_OK, 0);
        assert!(d.transport.metrics().bad_accesses.load(Ordering::Relaxed) >= 3);
    }

    #[test]
    fn unready_queue_at_driver_ok_means_needs_reset() {
        let mut d = MockDriver::new(rng());
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        d.write_reg(reg::STATUS, 0xf);
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            d.transport.metrics().activate_fails.load(Ordering::Relaxed),
            1
        );
        // A reset clears it and a proper bring-up works.
        d.init(0);
        assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    /// Sets up queue 0 with the given values, then DRIVER_OK; returns the status.
    fn bring_up_with(size: u32, desc: u64, avail: u64, used: u64) -> u32 {
        let mut d = MockDriver::new(rng());
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        d.write_reg(reg::QUEUE_SEL, 0);
        d.write_reg(reg::QUEUE_NUM, size);
        for (lo, a) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_AVAIL_LOW, avail),
            (reg::QUEUE_USED_LOW, used),
        ] {
            d.write_reg(lo, a as u32);
            d.write_reg(lo + 4, (a >> 32) as u32);
        }
        d.write_reg(reg::QUEUE_READY, 1);
        d.write_reg(reg::STATUS, 0xf);
        d.status()
    }

    #[test]
    fn bad_queue_configuration_means_needs_reset() {
        let ok = bring_up_with(256, 0x1_0000, 0x2_0000, 0x3_0000);
        assert_eq!(ok & status::DEVICE_NEEDS_RESET, 0);
        for (size, desc, avail, used) in [
            (100, 0x1_0000, 0x2_0000, 0x3_0000),       // not a power of two
            (512, 0x1_0000, 0x2_0000, 0x3_0000),       // over the maximum
            (0, 0x1_0000, 0x2_0000, 0x3_0000),         // empty
            (256, 0x1_0008, 0x2_0000, 0x3_0000),       // misaligned table
            (256, 0x1_0000, 0x2_0001, 0x3_0000),       // misaligned avail ring
            (256, 0x1_0000, 0x2_0000, 0x3_0002),       // misaligned used ring
            (256, 0x1_0000, 0x2_0000, (32 << 20) - 8), // used ring past RAM
            (256, u64::MAX - 15, 0x2_0000, 0x3_0000),  // wraps the address space
        ] {
            let s = bring_up_with(size, desc, avail, used);
            assert_ne!(
                s & status::DEVICE_NEEDS_RESET,
                0,
                "accepted size {size} desc {desc:#x} avail {avail:#x} used {used:#x}"
            );
        }
    }

    #[test]
    fn malformed_queue_stops_device_with_needs_reset_and_reset_recovers() {
        let dev = rng();
        let mut d = MockDriver::new(dev.clone());
        let mut em = event_manager_with(dev.clone());
        d.init(0);
        run_idle(&mut em);
        // A descriptor loop: 0 -> 1 -> 0.
        d.write_desc(0, 0, 0x20_0000, 16, 1 | 2, 1);
        d.write_desc(0, 1, 0x20_0000, 16, 1 | 2, 0);
        d.publish(0, 0);
        d.notify(0);
        run_until(&mut em, "NEEDS_RESET", || {
            dev.lock().unwrap().interrupt().needs_reset()
        });
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(d.pop_used(0).is_none());
        // Further notifications are drained without work (no busy loop:
        // the loop goes idle and nothing is used).
        d.notify(0);
        run_idle(&mut em);
        assert!(d.pop_used(0).is_none());
        // Reset and bring up again: the device serves requests.
        d.init(0);
        let c = d.add_chain(0, &[Buf::In(8)]);
        d.notify(0);
        let used = wait_used(&mut em, &mut d, 0);
        assert_eq!((used.head, used.len), (c.head, 8));
        assert_ne!(d.take_interrupt() & VIRTIO_MMIO_INT_VRING, 0);
        assert_eq!(d.read_reg(reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn impossible_avail_index_means_needs_reset() {
        let dev = rng();
        let mut d = MockDriver::new(dev.clone());
        let mut em = event_manager_with(dev.clone());
        d.init(0);
        run_idle(&mut em);
        d.set_avail_idx(0, 1000);
        d.notify(0);
        run_until(&mut em, "NEEDS_RESET", || {
            dev.lock().unwrap().interrupt().needs_reset()
        });
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }
}
