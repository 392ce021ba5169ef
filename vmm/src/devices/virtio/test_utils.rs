//! A mock virtio driver for device tests.
//!
//! It drives a device through [`MmioTransport`] register accesses in the
//! order Linux's `virtio_mmio` driver uses, lays real split rings out in a
//! `GuestMemoryMmap`, adds descriptor chains, notifies, and reads used
//! entries and the interrupt status back. Tests then run the device's
//! event handler in a real `EventManager`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use super::mmio::{CONFIG_SPACE_OFFSET, MmioTransport, reg};
use super::{VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::bus::BusDevice;

/// Guest RAM of the mock VM.
pub const MEM_SIZE: usize = 32 << 20;
const QUEUE_AREA: u64 = 0x1_0000;
const QUEUE_STRIDE: u64 = 0x1_0000;
const DATA_START: u64 = 0x10_0000;

/// The event loop type tests drive devices with.
pub type TestEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// One buffer of a chain to add: device-readable bytes or a device-writable length.
#[derive(Clone, Debug)]
pub enum Buf {
    /// Device-readable, with these contents.
    Out(Vec<u8>),
    /// Device-writable, this many bytes.
    In(u32),
}

/// A driver-side split virtqueue.
#[derive(Debug)]
pub struct MockQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: GuestAddress,
    /// Available ring address.
    pub avail: GuestAddress,
    /// Used ring address.
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// A used-ring entry with the buffers of its chain.
#[derive(Clone, Debug)]
pub struct Used {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes the device wrote.
    pub len: u32,
}

/// A chain the driver added: its head and where its buffers are.
#[derive(Clone, Debug)]
pub struct AddedChain {
    /// Head descriptor index.
    pub head: u16,
    /// Guest address and length of each buffer, in chain order.
    pub buffers: Vec<(GuestAddress, u32)>,
}

/// A virtio driver over an [`MmioTransport`], for tests.
pub struct MockDriver {
    /// The transport under test.
    pub transport: MmioTransport,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, once set up.
    pub queues: Vec<MockQueue>,
    next_data: u64,
}

impl MockDriver {
    /// A fresh VM's memory with `device` behind a transport.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Self::with_memory(device, mem)
    }

    /// `device` behind a transport over `mem` (at least [`MEM_SIZE`] from 0),
    /// e.g. shared memory for a vhost-user device.
    pub fn with_memory(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap) -> Self {
        let transport = MmioTransport::new(mem.clone(), device).unwrap();
        Self {
            transport,
            mem,
            queues: Vec::new(),
            next_data: DATA_START,
        }
    }

    /// Reads a 32-bit register.
    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write_reg(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    /// Reads device config space.
    pub fn read_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.transport.read(CONFIG_SPACE_OFFSET + offset, &mut b);
        b
    }

    /// The device's offered features.
    pub fn device_features(&mut self) -> u64 {
        self.write_reg(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read_reg(reg::DEVICE_FEATURES);
        self.write_reg(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read_reg(reg::DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// The status register.
    pub fn status(&mut self) -> u32 {
        self.read_reg(reg::STATUS)
    }

    /// Resets, negotiates `wanted` (plus VERSION_1) features and stops
    /// before queue setup; returns the status after FEATURES_OK.
    pub fn negotiate(&mut self, wanted: u64) -> u32 {
        assert_eq!(self.read_reg(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read_reg(reg::VERSION), 2);
        self.write_reg(reg::STATUS, 0);
        assert_eq!(self.status(), 0);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let accept = self.device_features() & wanted;
        self.write_reg(reg::DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::DRIVER_FEATURES, (accept >> 32) as u32);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 0);
        self.write_reg(reg::DRIVER_FEATURES, accept as u32);
        self.write_reg(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.status()
    }

    /// Sets up every queue the device has, with its maximum size.
    pub fn setup_queues(&mut self) {
        self.queues.clear();
        let mut i = 0u32;
        loop {
            self.write_reg(reg::QUEUE_SEL, i);
            let max = self.read_reg(reg::QUEUE_NUM_MAX);
            if max == 0 {
                break;
            }
            assert_eq!(self.read_reg(reg::QUEUE_READY), 0);
            let size = u16::try_from(max).unwrap();
            let base = QUEUE_AREA + u64::from(i) * QUEUE_STRIDE;
            let q = MockQueue {
                size,
                desc: GuestAddress(base),
                avail: GuestAddress(base + 16 * u64::from(size)),
                used: GuestAddress(base + 0x8000),
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            };
            // Zero the rings: a reset must not see stale indices.
            self.mem
                .write_slice(&vec![0u8; QUEUE_STRIDE as usize], q.desc)
                .unwrap();
            self.write_reg(reg::QUEUE_NUM, max);
            for (lo, addr) in [
                (reg::QUEUE_DESC_LOW, q.desc),
                (reg::QUEUE_AVAIL_LOW, q.avail),
                (reg::QUEUE_USED_LOW, q.used),
            ] {
                self.write_reg(lo, addr.0 as u32);
                self.write_reg(lo + 4, (addr.0 >> 32) as u32);
            }
            self.write_reg(reg::QUEUE_READY, 1);
            self.queues.push(q);
            i += 1;
        }
    }

    /// The whole Linux-style bring-up: negotiate, queues, DRIVER_OK.
    pub fn init(&mut self, wanted: u64) {
        let s = self.negotiate(wanted | (1 << VIRTIO_F_VERSION_1));
        assert_ne!(s & status::FEATURES_OK, 0, "device refused features");
        self.setup_queues();
        self.write_reg(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(self.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    /// Allocates `len` bytes of guest memory for buffers.
    pub fn alloc(&mut self, len: u32) -> GuestAddress {
        let len = u64::from(len).max(1).next_multiple_of(16);
        if self.next_data + len > MEM_SIZE as u64 {
            self.next_data = DATA_START;
        }
        let a = GuestAddress(self.next_data);
        self.next_data += len;
        a
    }

    /// Writes a raw descriptor into queue `q`'s table.
    pub fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let table = self.queues[q].desc;
        self.mem
            .write_slice(&raw, GuestAddress(table.0 + 16 * u64::from(index)))
            .unwrap();
    }

    /// Adds a chain of `bufs` to queue `q` and makes it available (no notify).
    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> AddedChain {
        let size = self.queues[q].size;
        let head = self.queues[q].next_desc;
        let mut buffers = Vec::new();
        for (n, b) in bufs.iter().enumerate() {
            let index = (head + n as u16) % size;
            let next = (index + 1) % size;
            let (addr, len, mut flags) = match b {
                Buf::Out(data) => {
                    let len = u32::try_from(data.len()).unwrap();
                    let a = self.alloc(len);
                    self.mem.write_slice(data, a).unwrap();
                    (a, len, 0)
                }
                Buf::In(len) => {
                    let a = self.alloc(*len);
                    self.mem.write_slice(&vec![0u8; *len as usize], a).unwrap();
                    (a, *len, VIRTQ_DESC_F_WRITE)
                }
            };
            if n + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(q, index, addr.0, len, flags, next);
            buffers.push((addr, len));
        }
        self.queues[q].next_desc = (head + bufs.len() as u16) % size;
        self.publish(q, head);
        AddedChain { head, buffers }
    }

    /// Puts `head` into queue `q`'s available ring and bumps its index.
    pub fn publish(&mut self, q: usize, head: u16) {
        let mq = &mut self.queues[q];
        let slot = mq.avail_idx % mq.size;
        let entry = GuestAddress(mq.avail.0 + 4 + 2 * u64::from(slot));
        self.mem.write_obj(head.to_le(), entry).unwrap();
        mq.avail_idx = mq.avail_idx.wrapping_add(1);
        let idx = mq.avail_idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(mq.avail.0 + 2))
            .unwrap();
    }

    /// Overwrites queue `q`'s available index (to fake a hostile driver).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let mq = &mut self.queues[q];
        mq.avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(mq.avail.0 + 2))
            .unwrap();
    }

    /// Writes QueueNotify for queue `q`.
    pub fn notify(&mut self, q: usize) {
        self.write_reg(reg::QUEUE_NOTIFY, q as u32);
    }

    /// Takes the next used entry of queue `q`, if the device added one.
    pub fn pop_used(&mut self, q: usize) -> Option<Used> {
        let mq = &mut self.queues[q];
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(mq.used.0 + 2))
            .map(u16::from_le)
            .unwrap();
        if idx == mq.used_seen {
            return None;
        }
        let slot = mq.used_seen % mq.size;
        let entry = GuestAddress(mq.used.0 + 4 + 8 * u64::from(slot));
        let id: u32 = self.mem.read_obj(entry).map(u32::from_le).unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(entry.0 + 4))
            .map(u32::from_le)
            .unwrap();
        mq.used_seen = mq.used_seen.wrapping_add(1);
        Some(Used {
            head: u16::try_from(id).unwrap(),
            len,
        })
    }

    /// Reads `len` bytes of guest memory.
    pub fn read_mem(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, addr).unwrap();
        b
    }

    /// Reads and acknowledges the interrupt status.
    pub fn take_interrupt(&mut self) -> u32 {
        let s = self.read_reg(reg::INTERRUPT_STATUS);
        self.write_reg(reg::INTERRUPT_ACK, s);
        s
    }
}

/// An event loop with `device` registered.
pub fn event_manager_with<D>(device: Arc<Mutex<D>>) -> TestEventManager
where
    D: MutEventSubscriber + Send + 'static,
{
    let mut em = TestEventManager::new().unwrap();
    let sub: Arc<Mutex<dyn MutEventSubscriber + Send>> = device;
    em.add_subscriber(sub);
    em
}

/// Runs the event loop until `done` holds or 10 s pass (then panics with `what`).
pub fn run_until(em: &mut TestEventManager, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        em.run_with_timeout(20).unwrap();
    }
}

/// Runs the event loop for a few idle rounds (lets the device settle).
pub fn run_idle(em: &mut TestEventManager) {
    for _ in 0..5 {
        em.run_with_timeout(10).unwrap();
    }
}

/// Runs the event loop until queue `q` has a used entry and returns it.
pub fn wait_used(em: &mut TestEventManager, d: &mut MockDriver, q: usize) -> Used {
    let mut used = None;
    run_until(em, &format!("a used entry on queue {q}"), || {
        used = d.pop_used(q);
        used.is_some()
    });
    used.unwrap()
}
