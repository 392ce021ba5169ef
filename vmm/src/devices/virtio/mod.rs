//! Virtio devices on the virtio-mmio transport.
//!
//! Every device follows the same shape (Firecracker style): `mod.rs` holds
//! constants, the error enum and the backend trait; `device.rs` the
//! [`VirtioDevice`] implementation; `event_handler.rs` the epoll
//! subscriber; `packet.rs`/`request.rs` the parsing of hostile guest
//! buffers; `metrics.rs` the counters; `test_utils.rs` the test fakes.
//!
//! The transport ([`MmioTransport`]) owns the register state machine and the
//! queue configuration; on DRIVER_OK it hands the queues to the device,
//! which from then on is driven by the VMM's epoll loop.

pub mod block;
pub mod chain;
pub mod device_state;
pub mod fs;
pub mod fuzz_support;
pub mod interrupt;
pub mod log_limit;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(test)]
pub mod test_utils;
pub mod vsock;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::Interrupt;
pub use mmio::MmioTransport;

/// Virtio device IDs (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
/// Block device ID.
pub const TYPE_BLOCK: u32 = 2;
/// Entropy device ID.
pub const TYPE_RNG: u32 = 4;
/// Socket device ID.
pub const TYPE_VSOCK: u32 = 19;
/// File system device ID.
pub const TYPE_FS: u32 = 26;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest OS has found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// The driver has acknowledged the features it understands.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Feature bit every device offers and requires: the modern (non-legacy) interface.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// What the transport hands to a device when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory the queues and buffers live in.
    pub mem: GuestMemoryMmap,
    /// The queues, in queue-index order, validated against guest memory.
    pub queues: Vec<virtio_queue::Queue>,
    /// One notification EventFd per queue (clones of the transport's).
    pub queue_evts: Vec<EventFd>,
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device has.
    #[error("expected {expected} queues, driver configured {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the transport delivered.
        got: usize,
    },
    /// Registering the device with the event loop failed.
    #[error("cannot signal the event loop")]
    EventFd(#[source] std::io::Error),
    /// The device backend could not be started.
    #[error("device backend failed to start: {0}")]
    Backend(String),
}

/// A named counter snapshot, as the VMM's metrics endpoint reports it.
pub type MetricsSnapshot = Vec<(&'static str, u64)>;

/// A virtio device behind a transport.
///
/// Called by [`MmioTransport`] from vCPU threads (config space, activation,
/// reset) and by the event loop (through the device's `MutEventSubscriber`
/// impl); both take the same mutex, so implementations need no locking of
/// their own.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, acked: u64);
    /// Reads device config space at `offset` (relative to 0x100).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space at `offset` (relative to 0x100).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device and drops all queue and backend state (status written 0).
    fn reset(&mut self);
    /// The interrupt (and NEEDS_RESET, config generation) state shared with the transport.
    fn interrupt(&self) -> &std::sync::Arc<Interrupt>;
    /// The device's counters.
    fn metrics(&self) -> MetricsSnapshot;
}

/// Reads `data.len()` bytes at `offset` from a config-space byte image; out-of-range reads read zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = start.saturating_add(data.len()).min(config.len());
    let n = end - start;
    data[..n].copy_from_slice(&config[start..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VMM registers each device both behind a transport and with its
    /// event loop, from one `Arc<Mutex<_>>`.
    #[test]
    fn devices_are_transport_and_event_loop_ready() {
        fn both<T: VirtioDevice + event_manager::MutEventSubscriber + Send + 'static>() {}
        both::<block::Block>();
        both::<fs::Fs>();
        both::<net::Net>();
        both::<rng::Rng>();
        both::<vsock::Vsock>();
    }

    #[test]
    fn config_reads_out_of_range_are_zero() {
        let mut b = [0xffu8; 4];
        read_config_bytes(&[1, 2, 3], 2, &mut b);
        assert_eq!(b, [3, 0, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
