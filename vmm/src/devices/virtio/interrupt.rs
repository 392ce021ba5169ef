//! Device → driver signalling state shared by a device and its transport.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// The interrupt line of one virtio device plus the status the transport
/// reports for it (InterruptStatus, NEEDS_RESET, ConfigGeneration).
///
/// The EventFd is registered by the VMM as a KVM irqfd on the device's GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// Creates an interrupt with a fresh, non-blocking EventFd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The EventFd that raises the interrupt (a KVM irqfd).
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// Tells the driver that used buffers were added.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Tells the driver that the device configuration changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) and tells the driver
    /// through a config-change interrupt, as virtio 1.2 section 2.1.2 asks.
    pub fn set_needs_reset(&self) -> io::Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change()
    }

    /// Whether the device reported NEEDS_RESET since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The InterruptACK register: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Device reset: clears status and NEEDS_RESET (the generation keeps counting).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}
