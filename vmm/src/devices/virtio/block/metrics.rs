//! Counters of a block slot.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::devices::virtio::MetricsSnapshot;

/// virtio-blk counters.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Read requests completed.
    pub reads: AtomicU64,
    /// Write requests completed.
    pub writes: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Requests answered with VIRTIO_BLK_S_IOERR.
    pub io_errors: AtomicU64,
    /// Requests answered with VIRTIO_BLK_S_UNSUPP.
    pub unsupported: AtomicU64,
    /// Malformed requests.
    pub invalid: AtomicU64,
    /// Backing file attaches, replaces and detaches.
    pub backing_changes: AtomicU64,
}

impl BlockMetrics {
    /// A snapshot for the metrics endpoint.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("block_reads", g(&self.reads)),
            ("block_writes", g(&self.writes)),
            ("block_flushes", g(&self.flushes)),
            ("block_read_bytes", g(&self.read_bytes)),
            ("block_write_bytes", g(&self.write_bytes)),
            ("block_io_errors", g(&self.io_errors)),
            ("block_unsupported", g(&self.unsupported)),
            ("block_invalid", g(&self.invalid)),
            ("block_backing_changes", g(&self.backing_changes)),
        ]
    }
}
