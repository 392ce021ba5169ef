//! Counters of the virtio-fs device.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::devices::virtio::MetricsSnapshot;

/// virtio-fs counters. The requests themselves are the backend's to count.
#[derive(Debug, Default)]
pub struct FsMetrics {
    /// Times the backend was started on the driver's queues.
    pub activations: AtomicU64,
    /// Starts or stops the backend refused or could not take.
    pub backend_errors: AtomicU64,
    /// Backend "call" notifications turned into guest interrupts.
    pub interrupts: AtomicU64,
    /// The backend hung up.
    pub disconnects: AtomicU64,
}

impl FsMetrics {
    /// A snapshot for the metrics endpoint.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("fs_activations", g(&self.activations)),
            ("fs_backend_errors", g(&self.backend_errors)),
            ("fs_interrupts", g(&self.interrupts)),
            ("fs_disconnects", g(&self.disconnects)),
        ]
    }
}
