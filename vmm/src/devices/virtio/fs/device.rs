//! The virtio-fs device: config space, features and the backend's life
//! cycle; the queues belong to the backend.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::FsConfig;
use crate::devices::virtio::device_state::{Active, DeviceState};
use crate::devices::virtio::log_limit::guest_warn;
use crate::devices::virtio::queue::VirtQueue;
use crate::devices::virtio::{
    ActivateError, Activation, Interrupt, MetricsSnapshot, TYPE_FS, VirtioDevice, read_config_bytes,
};

use super::metrics::FsMetrics;
use super::vhost_user::{HANDSHAKE_TIMEOUT, VhostUserFs, guest_features};
use super::{CONFIG_SPACE_LEN, FsBackend, FsError, NUM_QUEUES, QueueInfo, config_space};

/// A virtio-fs device in front of a backend that serves its queues.
pub struct Fs {
    pub(super) state: DeviceState,
    pub(super) backend: Box<dyn FsBackend>,
    config: [u8; CONFIG_SPACE_LEN],
    queue_sizes: [u16; NUM_QUEUES],
    /// The backend's "used buffers" notifications, one per queue; the event
    /// loop relays them to the guest's interrupt. Kept across resets.
    pub(super) calls: Vec<EventFd>,
    /// The backend may have enabled rings: a reset must stop them.
    started: bool,
    /// The backend hung up, or its calls cannot be relayed: the device
    /// cannot run again.
    pub(super) backend_gone: bool,
    pub(super) metrics: Arc<FsMetrics>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("state", &self.state)
            .field("started", &self.started)
            .field("backend_gone", &self.backend_gone)
            .finish_non_exhaustive()
    }
}

impl Fs {
    /// A device showing `tag`, with queues of `queue_size`, served by `backend`.
    pub fn new(tag: &str, queue_size: u16, backend: Box<dyn FsBackend>) -> Result<Self, FsError> {
        let config = config_space(tag)?;
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| FsError::Io("creating a call eventfd", e))?;
        Ok(Self {
            state: DeviceState::new(guest_features(backend.features()))
                .map_err(|e| FsError::Io("creating the device eventfds", e))?,
            backend,
            config,
            queue_sizes: [queue_size; NUM_QUEUES],
            calls,
            started: false,
            backend_gone: false,
            metrics: Arc::new(FsMetrics::default()),
        })
    }

    /// The device `config` describes, connected to its virtiofsd (see
    /// [`VhostUserFs::connect`]); `mem` must be shared guest memory.
    pub fn vhost_user(config: &FsConfig, mem: &GuestMemoryMmap) -> Result<Self, FsError> {
        let backend = VhostUserFs::connect(&config.socket, mem, HANDSHAKE_TIMEOUT)?;
        Self::new(&config.tag, config.queue_size, Box::new(backend))
    }

    /// The device's counters.
    pub fn fs_metrics(&self) -> &Arc<FsMetrics> {
        &self.metrics
    }

    /// The backend went away: stop relaying and tell the driver.
    pub(super) fn backend_failed(&mut self, err: &FsError) {
        self.metrics.disconnects.fetch_add(1, Ordering::Relaxed);
        self.backend_gone = true;
        // Once per backend, not guest-triggerable: no rate limit needed.
        crate::log::error!("virtio-fs: {err}; the device needs a reset and stays broken");
        if self.state.is_running() {
            self.state.broken = true;
            if let Err(e) = self.state.interrupt.set_needs_reset() {
                crate::log::error!("virtio-fs: cannot raise NEEDS_RESET: {e}");
            }
        }
    }

    /// A backend call on queue `index`: the guest gets a used-buffer interrupt.
    pub(super) fn relay_call(&mut self, index: usize) {
        if let Some(call) = self.calls.get(index) {
            let _ = call.read();
        }
        // Calls after a reset or failure belong to no running driver.
        if self.state.is_running() {
            self.metrics.interrupts.fetch_add(1, Ordering::Relaxed);
            self.state.signal_used("virtio-fs");
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.state.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.state.acked_features = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only (virtio 1.2 section 5.11.4).
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if activation.queues.len() != NUM_QUEUES || activation.queue_evts.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: activation.queues.len(),
            });
        }
        if self.backend_gone {
            return Err(ActivateError::Backend(FsError::Disconnected.to_string()));
        }
        use virtio_queue::QueueT;
        let infos: Vec<QueueInfo> = activation
            .queues
            .iter()
            .map(|q| QueueInfo {
                size: q.size(),
                max_size: q.max_size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                next_avail: q.next_avail(),
            })
            .collect();
        // Calls left over from a previous run must not interrupt this one.
        for call in &self.calls {
            let _ = call.read();
        }
        // Set before starting: a start that fails half-way may have enabled rings.
        self.started = true;
        // The kick fds are the transport's queue-notify eventfds (also KVM's
        // ioeventfds): the backend reads them, the event loop never does.
        let started = self.backend.start(
            self.state.acked_features,
            &activation.mem,
            &infos,
            &activation.queue_evts,
            &self.calls,
        );
        if let Err(e) = started {
            self.metrics.backend_errors.fetch_add(1, Ordering::Relaxed);
            return Err(ActivateError::Backend(crate::error_chain(&e)));
        }
        self.metrics.activations.fetch_add(1, Ordering::Relaxed);
        self.state.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues.into_iter().map(VirtQueue::new).collect(),
        });
        self.state.broken = false;
        Ok(())
    }

    fn reset(&mut self) {
        if self.started && !self.backend_gone {
            if let Err(e) = self.backend.stop(NUM_QUEUES) {
                self.metrics.backend_errors.fetch_add(1, Ordering::Relaxed);
                guest_warn!(
                    self.state.log,
                    "virtio-fs: cannot stop the backend's rings: {}",
                    crate::error_chain(&e)
                );
            }
        }
        self.started = false;
        self.state.reset();
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.state.interrupt
    }

    fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bus::BusDevice;
    use crate::devices::virtio::fs::test_utils::{FakeBackend, FakeLog};
    use crate::devices::virtio::fs::{HIPRIO_QUEUE, REQUEST_QUEUE};
    use crate::devices::virtio::mmio::reg;
    use crate::devices::virtio::test_utils::{MockDriver, event_manager_with, run_idle, run_until};
    use crate::devices::virtio::{VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING, status};

    const EVENT_IDX: u64 = 1 << 29;
    const PROTOCOL_FEATURES: u64 = 1 << 30;

    /// What a test keeps of the fake backend it hands the device.
    struct Backend {
        log: Arc<Mutex<FakeLog>>,
        fail_start: Arc<Mutex<bool>>,
    }

    fn fake(features: u64) -> (Arc<Mutex<Fs>>, Backend, std::os::unix::net::UnixStream) {
        let (backend, peer) = FakeBackend::new(features);
        let handle = Backend {
            log: backend.log.clone(),
            fail_start: backend.fail_start.clone(),
        };
        let fs = Fs::new("myfs", 256, Box::new(backend)).unwrap();
        (Arc::new(Mutex::new(fs)), handle, peer)
    }

    #[test]
    fn shows_type_tag_and_the_features_both_sides_support() {
        let all = (1 << VIRTIO_F_VERSION_1) | EVENT_IDX | PROTOCOL_FEATURES | (1 << 42);
        let (dev, _b, _peer) = fake(all);
        let mut d = MockDriver::new(dev);
        assert_eq!(d.read_reg(reg::DEVICE_ID), 26);
        // Ring features pass through; vhost-user and unknown bits do not.
        assert_eq!(d.device_features(), (1 << VIRTIO_F_VERSION_1) | EVENT_IDX);
        let config = d.read_config(0, 40);
        assert_eq!(&config[..4], b"myfs");
        assert!(config[4..36].iter().all(|&b| b == 0));
        assert_eq!(le32(&config[36..]), 1, "num_request_queues");
        // The queues: hiprio and one request queue.
        d.write_reg(reg::QUEUE_SEL, 2);
        assert_eq!(d.read_reg(reg::QUEUE_NUM_MAX), 0);
        d.write_reg(reg::QUEUE_SEL, 1);
        assert_eq!(d.read_reg(reg::QUEUE_NUM_MAX), 256);
        // Read-only config.
        d.transport.write(0x100, b"evil");
        assert_eq!(&d.read_config(0, 4), b"myfs");
    }

    fn le32(b: &[u8]) -> u32 {
        u32::from_le_bytes(b[..4].try_into().unwrap())
    }

    #[test]
    fn driver_ok_starts_the_backend_on_the_drivers_rings() {
        let (dev, b, _peer) = fake((1 << VIRTIO_F_VERSION_1) | EVENT_IDX | PROTOCOL_FEATURES);
        let mut d = MockDriver::new(dev.clone());
        d.init(EVENT_IDX);
        let log = b.log.lock().unwrap();
        assert_eq!(log.starts.len(), 1);
        let (features, queues) = &log.starts[0];
        assert_eq!(*features, (1 << VIRTIO_F_VERSION_1) | EVENT_IDX);
        for (q, mq) in queues.iter().zip(&d.queues) {
            assert_eq!(
                (q.size, q.desc, q.avail, q.used, q.next_avail),
                (mq.size, mq.desc.0, mq.avail.0, mq.used.0, 0)
            );
        }
        // The kick fds are the transport's notify eventfds: what the guest
        // notifies, the backend sees.
        d.notify(REQUEST_QUEUE);
        assert_eq!(log.kicks[REQUEST_QUEUE].read().unwrap(), 1);
        assert!(
            log.kicks[HIPRIO_QUEUE].read().is_err(),
            "wrong queue kicked"
        );
        assert_eq!(dev.lock().unwrap().metrics()[0], ("fs_activations", 1));
    }

    #[test]
    fn backend_call_raises_the_used_buffer_interrupt() {
        let (dev, b, _peer) = fake((1 << VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES);
        let mut d = MockDriver::new(dev.clone());
        let mut em = event_manager_with(dev.clone());
        let irq = dev.lock().unwrap().interrupt().clone();
        d.init(0);
        run_idle(&mut em);
        assert_eq!(d.read_reg(reg::INTERRUPT_STATUS), 0);
        let call = b.log.lock().unwrap().calls[REQUEST_QUEUE]
            .try_clone()
            .unwrap();
        call.write(1).unwrap();
        run_until(&mut em, "the relayed interrupt", || {
            irq.evt().read().is_ok()
        });
        assert_eq!(d.take_interrupt(), VIRTIO_MMIO_INT_VRING);
        assert!(
            dev.lock()
                .unwrap()
                .metrics()
                .contains(&("fs_interrupts", 1))
        );
        // After a reset the backend's late calls reach no driver.
        d.write_reg(reg::STATUS, 0);
        call.write(1).unwrap();
        run_idle(&mut em);
        assert_eq!(d.read_reg(reg::INTERRUPT_STATUS), 0);
        assert!(irq.evt().read().is_err());
    }

    #[test]
    fn reset_stops_the_backend_only_when_it_was_started() {
        let (dev, b, _peer) = fake((1 << VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES);
        let mut d = MockDriver::new(dev);
        // Linux resets before bringing a device up: nothing to stop yet.
        d.write_reg(reg::STATUS, 0);
        assert!(b.log.lock().unwrap().stops.is_empty());
        d.init(0);
        d.write_reg(reg::STATUS, 0);
        assert_eq!(b.log.lock().unwrap().stops, vec![2]);
        d.write_reg(reg::STATUS, 0);
        assert_eq!(b.log.lock().unwrap().stops, vec![2], "stopped twice");
        // And it comes back.
        d.init(0);
        assert_eq!(b.log.lock().unwrap().starts.len(), 2);
    }

    #[test]
    fn backend_start_failure_means_needs_reset() {
        let (dev, b, _peer) = fake((1 << VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES);
        let mut d = MockDriver::new(dev.clone());
        *b.fail_start.lock().unwrap() = true;
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        d.setup_queues();
        d.write_reg(reg::STATUS, 0xf);
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(
            dev.lock()
                .unwrap()
                .metrics()
                .contains(&("fs_backend_errors", 1))
        );
        *b.fail_start.lock().unwrap() = false;
        d.init(0);
        assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn backend_hang_up_means_needs_reset_for_good() {
        let (dev, _b, peer) = fake((1 << VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES);
        let mut d = MockDriver::new(dev.clone());
        let mut em = event_manager_with(dev.clone());
        d.init(0);
        run_idle(&mut em);
        drop(peer);
        run_until(&mut em, "NEEDS_RESET", || {
            dev.lock().unwrap().interrupt().needs_reset()
        });
        assert!(
            dev.lock()
                .unwrap()
                .metrics()
                .contains(&("fs_disconnects", 1))
        );
        // The watch is gone (no busy loop) and a new bring-up is refused.
        run_idle(&mut em);
        assert!(
            dev.lock()
                .unwrap()
                .metrics()
                .contains(&("fs_disconnects", 1))
        );
        d.negotiate(1 << VIRTIO_F_VERSION_1);
        d.setup_queues();
        d.write_reg(reg::STATUS, 0xf);
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }
}
