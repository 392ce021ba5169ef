//! Counters of the net device.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::devices::virtio::MetricsSnapshot;

/// virtio-net counters.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames sent by the guest to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes sent by the guest (frames only).
    pub tx_bytes: AtomicU64,
    /// Guest frames dropped (malformed or tap error).
    pub tx_dropped: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (frames only).
    pub rx_bytes: AtomicU64,
    /// Host frames dropped (no room in the guest buffer).
    pub rx_dropped: AtomicU64,
}

impl NetMetrics {
    /// A snapshot for the metrics endpoint.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("net_tx_frames", g(&self.tx_frames)),
            ("net_tx_bytes", g(&self.tx_bytes)),
            ("net_tx_dropped", g(&self.tx_dropped)),
            ("net_rx_frames", g(&self.rx_frames)),
            ("net_rx_bytes", g(&self.rx_bytes)),
            ("net_rx_dropped", g(&self.rx_dropped)),
        ]
    }
}
