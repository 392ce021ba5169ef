//! The virtio-rng device.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::devices::virtio::device_state::{DeviceState, MAX_CHAINS_PER_EVENT};
use crate::devices::virtio::log_limit::guest_warn;
use crate::devices::virtio::{
    ActivateError, Activation, Interrupt, MetricsSnapshot, TYPE_RNG, VIRTIO_F_VERSION_1,
    VirtioDevice,
};

use super::metrics::RngMetrics;
use super::request::request_len;
use super::{EntropySource, QUEUE_SIZE, RNG_QUEUE, RngError};

/// A virtio entropy device.
pub struct Rng {
    pub(super) state: DeviceState,
    source: Box<dyn EntropySource>,
    metrics: Arc<RngMetrics>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Rng {
    /// An entropy device reading from `source`.
    pub fn new(source: Box<dyn EntropySource>) -> Result<Self, RngError> {
        Ok(Self {
            state: DeviceState::new(1 << VIRTIO_F_VERSION_1).map_err(RngError::EventFd)?,
            source,
            metrics: Arc::new(RngMetrics::default()),
            buf: Vec::new(),
        })
    }

    /// The device's counters.
    pub fn rng_metrics(&self) -> &Arc<RngMetrics> {
        &self.metrics
    }

    /// Serves every available request.
    pub(super) fn process_queue(&mut self) {
        let mut used_any = false;
        for round in 0.. {
            if round == MAX_CHAINS_PER_EVENT {
                self.state.reschedule(RNG_QUEUE);
                break;
            }
            let Some(active) = self.state.active.as_mut() else {
                return;
            };
            let mem = &active.mem;
            let queue = &mut active.queues[RNG_QUEUE];
            let chain = match queue.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    self.state.fail("rng", &e);
                    return;
                }
            };
            let len = request_len(&chain) as usize;
            self.buf.resize(len, 0);
            let written = match self.source.fill(&mut self.buf) {
                Ok(()) => match chain.writer().write_all(mem, &self.buf) {
                    Ok(()) => len,
                    Err(e) => {
                        guest_warn!(self.state.log, "rng: cannot write buffer: {e}");
                        0
                    }
                },
                Err(e) => {
                    self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                    guest_warn!(self.state.log, "rng: host entropy source failed: {e}");
                    0
                }
            };
            // `written` is at most MAX_BYTES_PER_REQUEST, so it fits a u32.
            if let Err(e) = queue.add_used(mem, chain.head(), written as u32) {
                self.state.fail("rng", &e);
                return;
            }
            used_any = true;
            self.metrics.requests.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .bytes
                .fetch_add(written as u64, Ordering::Relaxed);
        }
        if used_any {
            self.state.signal_used("rng");
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.state.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.state.acked_features = acked;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.state.activate(activation, 1)
    }

    fn reset(&mut self) {
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
    use crate::devices::virtio::rng::MAX_BYTES_PER_REQUEST;
    use crate::devices::virtio::rng::Urandom;
    use crate::devices::virtio::rng::test_utils::{FailingSource, PatternSource};
    use crate::devices::virtio::test_utils::{Buf, MockDriver, event_manager_with, wait_used};

    fn setup(source: Box<dyn EntropySource>) -> (Arc<Mutex<Rng>>, MockDriver) {
        let dev = Arc::new(Mutex::new(Rng::new(source).unwrap()));
        let mut d = MockDriver::new(dev.clone());
        d.init(0);
        (dev, d)
    }

    #[test]
    fn request_is_filled_from_the_source() {
        let (dev, mut d) = setup(Box::new(PatternSource(7)));
        let mut em = event_manager_with(dev.clone());
        let c = d.add_chain(0, &[Buf::In(4), Buf::In(4)]);
        d.notify(0);
        let used = wait_used(&mut em, &mut d, 0);
        assert_eq!((used.head, used.len), (c.head, 8));
        let (a0, _) = c.buffers[0];
        let (a1, _) = c.buffers[1];
        assert_eq!(d.read_mem(a0, 4), vec![7, 8, 9, 10]);
        assert_eq!(d.read_mem(a1, 4), vec![11, 12, 13, 14]);
        let m = dev.lock().unwrap().metrics();
        assert!(m.contains(&("rng_bytes", 8)));
    }

    #[test]
    fn real_urandom_fills_buffer() {
        let (dev, mut d) = setup(Box::new(Urandom::open().unwrap()));
        let mut em = event_manager_with(dev);
        let c = d.add_chain(0, &[Buf::In(64)]);
        d.notify(0);
        let used = wait_used(&mut em, &mut d, 0);
        assert_eq!(used.len, 64);
        // 64 random bytes are all zero with probability 2^-512.
        assert!(d.read_mem(c.buffers[0].0, 64).iter().any(|&b| b != 0));
    }

    #[test]
    fn huge_request_is_capped() {
        let (dev, mut d) = setup(Box::new(PatternSource(0)));
        let mut em = event_manager_with(dev);
        d.add_chain(0, &[Buf::In(MAX_BYTES_PER_REQUEST * 4)]);
        d.notify(0);
        let used = wait_used(&mut em, &mut d, 0);
        assert_eq!(used.len, MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn failing_source_returns_empty_buffer() {
        let (dev, mut d) = setup(Box::new(FailingSource));
        let mut em = event_manager_with(dev.clone());
        d.add_chain(0, &[Buf::In(16)]);
        d.notify(0);
        let used = wait_used(&mut em, &mut d, 0);
        assert_eq!(used.len, 0);
        assert!(dev.lock().unwrap().metrics().contains(&("rng_failures", 1)));
    }
}
