//! Counters of the vsock device.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::devices::virtio::MetricsSnapshot;

/// virtio-vsock counters.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets taken from the tx queue.
    pub tx_packets: AtomicU64,
    /// Payload bytes from the guest.
    pub tx_bytes: AtomicU64,
    /// Packets put into the rx queue.
    pub rx_packets: AtomicU64,
    /// Payload bytes to the guest.
    pub rx_bytes: AtomicU64,
    /// Tx packets that failed to parse or had wrong addressing.
    pub malformed: AtomicU64,
    /// Connections created.
    pub conns_added: AtomicU64,
    /// Connections removed.
    pub conns_removed: AtomicU64,
    /// Connections refused because the limit was reached.
    pub conns_refused: AtomicU64,
    /// Host handshakes that failed (bad line, timeout, EOF).
    pub handshake_failures: AtomicU64,
    /// RST packets sent to the guest.
    pub rst_sent: AtomicU64,
    /// Rx buffers too small for a packet header.
    pub rx_bad_buffers: AtomicU64,
}

impl VsockMetrics {
    /// A snapshot for the metrics endpoint.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("vsock_tx_packets", g(&self.tx_packets)),
            ("vsock_tx_bytes", g(&self.tx_bytes)),
            ("vsock_rx_packets", g(&self.rx_packets)),
            ("vsock_rx_bytes", g(&self.rx_bytes)),
            ("vsock_malformed", g(&self.malformed)),
            ("vsock_conns_added", g(&self.conns_added)),
            ("vsock_conns_removed", g(&self.conns_removed)),
            ("vsock_conns_refused", g(&self.conns_refused)),
            ("vsock_handshake_failures", g(&self.handshake_failures)),
            ("vsock_rst_sent", g(&self.rst_sent)),
            ("vsock_rx_bad_buffers", g(&self.rx_bad_buffers)),
        ]
    }
}
