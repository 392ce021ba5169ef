//! A device's view of one split virtqueue: pop validated chains, push used
//! entries. Ring bookkeeping comes from `virtio-queue`; chain walking is
//! ours ([`DescChain`]) so every descriptor is validated exactly once.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::chain::{ChainError, DescChain};

/// A malformed queue: the device must stop and report NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring is unreadable or its index is impossible.
    #[error("bad available ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// A descriptor chain is malformed.
    #[error("bad descriptor chain")]
    Chain(#[source] ChainError),
    /// The used ring could not be written.
    #[error("cannot write used ring")]
    UsedRing(#[source] virtio_queue::Error),
}

/// One virtqueue owned by an activated device.
#[derive(Debug)]
pub struct VirtQueue {
    queue: Queue,
}

impl VirtQueue {
    /// Wraps a queue the transport validated against guest memory.
    pub fn new(queue: Queue) -> Self {
        Self { queue }
    }

    /// Takes the next available chain, validated; `Ok(None)` when the ring is empty.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<DescChain>, QueueError> {
        let desc_table = GuestAddress(self.queue.desc_table());
        let size = self.queue.size();
        let head = {
            let mut iter = self.queue.iter(mem).map_err(QueueError::AvailRing)?;
            match iter.next() {
                Some(chain) => chain.head_index(),
                None => return Ok(None),
            }
        };
        DescChain::parse(mem, desc_table, size, head)
            .map(Some)
            .map_err(QueueError::Chain)
    }

    /// Puts the last popped chain back (e.g. an rx buffer with nothing to fill it with).
    pub fn undo_pop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Whether the driver made chains available that were not popped yet.
    pub fn has_available(&self, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let avail = self
            .queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(QueueError::AvailRing)?;
        Ok(avail.0 != self.queue.next_avail())
    }

    /// Returns a chain to the driver with `len` bytes written into it.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        self.queue
            .add_used(mem, head, len)
            .map_err(QueueError::UsedRing)
    }
}
