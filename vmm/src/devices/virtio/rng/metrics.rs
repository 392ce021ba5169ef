//! Counters of the entropy device.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::devices::virtio::MetricsSnapshot;

/// virtio-rng counters.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Bytes handed to the guest.
    pub bytes: AtomicU64,
    /// Requests that failed (host source error).
    pub failures: AtomicU64,
    /// Queue events received.
    pub queue_events: AtomicU64,
}

impl RngMetrics {
    /// A snapshot for the metrics endpoint.
    pub fn snapshot(&self) -> MetricsSnapshot {
        vec![
            ("rng_requests", self.requests.load(Ordering::Relaxed)),
            ("rng_bytes", self.bytes.load(Ordering::Relaxed)),
            ("rng_failures", self.failures.load(Ordering::Relaxed)),
            (
                "rng_queue_events",
                self.queue_events.load(Ordering::Relaxed),
            ),
        ]
    }
}
