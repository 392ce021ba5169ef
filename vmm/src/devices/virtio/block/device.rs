//! The virtio-blk device: one slot.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestMemoryMmap};

use super::metrics::BlockMetrics;
use super::request::{
    Request, RequestType, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, status_addr,
};
use super::{
    BlockBackend, BlockError, DiskFile, ID_BYTES, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};
use crate::devices::virtio::chain::DescChain;
use crate::devices::virtio::device_state::{DeviceState, MAX_CHAINS_PER_EVENT};
use crate::devices::virtio::log_limit::guest_warn;
use crate::devices::virtio::{
    ActivateError, Activation, Interrupt, MetricsSnapshot, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes,
};

/// Feature: size_max is valid.
const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature: seg_max is valid.
const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature: flush is supported.
const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Host bytes copied per step, so a large request does not need a large buffer.
const COPY_CHUNK: usize = 64 * 1024;

/// A virtio-blk slot.
pub struct Block {
    pub(super) state: DeviceState,
    id: [u8; ID_BYTES],
    disk: Option<Box<dyn BlockBackend>>,
    metrics: Arc<BlockMetrics>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("id", &String::from_utf8_lossy(&self.id))
            .field("capacity", &self.capacity_bytes())
            .finish_non_exhaustive()
    }
}

impl Block {
    /// An empty slot; `id` (up to 20 bytes) is what GET_ID returns.
    pub fn new(id: &str) -> Result<Self, BlockError> {
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH);
        Ok(Self {
            state: DeviceState::new(features).map_err(BlockError::EventFd)?,
            id: id_bytes,
            disk: None,
            metrics: Arc::new(BlockMetrics::default()),
            buf: Vec::new(),
        })
    }

    /// The slot's counters.
    pub fn block_metrics(&self) -> &Arc<BlockMetrics> {
        &self.metrics
    }

    /// Capacity in bytes the guest sees (whole sectors).
    pub fn capacity_bytes(&self) -> u64 {
        self.disk
            .as_ref()
            .map_or(0, |d| d.len() / SECTOR_SIZE * SECTOR_SIZE)
    }

    /// Whether a backing file is attached.
    pub fn is_attached(&self) -> bool {
        self.disk.is_some()
    }

    /// Attaches a file to an empty slot or replaces the current one.
    pub fn attach(&mut self, path: &Path, read_only: bool) -> Result<(), BlockError> {
        let disk = DiskFile::open(path, read_only)?;
        self.set_backend(Some(Box::new(disk)));
        Ok(())
    }

    /// Same as [`Block::attach`]: the name the control socket uses for a full slot.
    pub fn replace(&mut self, path: &Path, read_only: bool) -> Result<(), BlockError> {
        self.attach(path, read_only)
    }

    /// Empties the slot (capacity 0).
    pub fn detach(&mut self) -> Result<(), BlockError> {
        if self.disk.is_none() {
            return Err(BlockError::Empty);
        }
        self.set_backend(None);
        Ok(())
    }

    /// Swaps the backend and tells the guest the capacity changed.
    pub fn set_backend(&mut self, disk: Option<Box<dyn BlockBackend>>) {
        if let Some(old) = &self.disk {
            // Best effort: the old file is going away.
            let _ = old.flush();
        }
        self.disk = disk;
        self.metrics.backing_changes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.state.interrupt.signal_config_change() {
            crate::log::warning!("block: cannot raise config-change interrupt: {e}");
        }
    }

    fn config_space(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..8].copy_from_slice(&(self.capacity_bytes() / SECTOR_SIZE).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Serves every available request.
    pub(super) fn process_queue(&mut self) {
        let mut used_any = false;
        for round in 0.. {
            if round == MAX_CHAINS_PER_EVENT {
                self.state.reschedule(0);
                break;
            }
            let Some(active) = self.state.active.as_mut() else {
                return;
            };
            let chain = match active.queues[0].pop(&active.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return self.state.fail("block", &e),
            };
            let mem = active.mem.clone();
            let len = self.execute(&mem, &chain);
            let Some(active) = self.state.active.as_mut() else {
                return;
            };
            if let Err(e) = active.queues[0].add_used(&mem, chain.head(), len) {
                return self.state.fail("block", &e);
            }
            used_any = true;
        }
        if used_any {
            self.state.signal_used("block");
        }
    }

    /// Runs one request; returns the bytes written into the chain.
    fn execute(&mut self, mem: &GuestMemoryMmap, chain: &DescChain) -> u32 {
        let req = match Request::parse(mem, chain) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.invalid.fetch_add(1, Ordering::Relaxed);
                guest_warn!(self.state.log, "block: malformed request: {e}");
                // Report the error if there is a status byte to report it in.
                return match status_addr(chain) {
                    Some(addr) if mem.write_obj(VIRTIO_BLK_S_IOERR, addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let (status, data_written) = match self.run(mem, chain, &req) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(status) => (status, 0),
        };
        if mem.write_obj(status, req.status_addr).is_err() {
            return 0;
        }
        data_written.saturating_add(1)
    }

    /// Returns the data bytes written into guest memory, or the error status.
    fn run(&mut self, mem: &GuestMemoryMmap, chain: &DescChain, req: &Request) -> Result<u32, u8> {
        let ioerr = |m: &BlockMetrics| {
            m.io_errors.fetch_add(1, Ordering::Relaxed);
            VIRTIO_BLK_S_IOERR
        };
        match req.kind {
            RequestType::In | RequestType::Out => {
                let Some(disk) = self.disk.as_deref() else {
                    return Err(ioerr(&self.metrics));
                };
                let Some((mut offset, _)) = req.disk_range(disk.len()) else {
                    return Err(ioerr(&self.metrics));
                };
                if req.kind == RequestType::Out && disk.read_only() {
                    return Err(ioerr(&self.metrics));
                }
                let mut left = req.data_len as usize;
                let mut cursor = if req.kind == RequestType::In {
                    chain.writer()
                } else {
                    let mut r = chain.reader();
                    r.skip(super::request::HEADER_SIZE as usize)
                        .map_err(|_| ioerr(&self.metrics))?;
                    r
                };
                self.buf.resize(COPY_CHUNK, 0);
                while left > 0 {
                    let seg = cursor
                        .next_segment(left.min(COPY_CHUNK))
                        .ok_or_else(|| ioerr(&self.metrics))?;
                    let n = seg.len as usize;
                    let buf = &mut self.buf[..n];
                    let ok = if req.kind == RequestType::In {
                        disk.read_at(buf, offset).is_ok() && mem.write_slice(buf, seg.addr).is_ok()
                    } else {
                        mem.read_slice(buf, seg.addr).is_ok() && disk.write_at(buf, offset).is_ok()
                    };
                    if !ok {
                        return Err(ioerr(&self.metrics));
                    }
                    offset += n as u64;
                    left -= n;
                }
                if req.kind == RequestType::In {
                    self.metrics.reads.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .read_bytes
                        .fetch_add(u64::from(req.data_len), Ordering::Relaxed);
                    Ok(req.data_len)
                } else {
                    self.metrics.writes.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .write_bytes
                        .fetch_add(u64::from(req.data_len), Ordering::Relaxed);
                    Ok(0)
                }
            }
            RequestType::Flush => {
                if let Some(disk) = self.disk.as_deref() {
                    if !disk.read_only() {
                        disk.flush().map_err(|_| ioerr(&self.metrics))?;
                    }
                }
                self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            RequestType::GetId => {
                let n = (req.data_len as usize).min(ID_BYTES);
                chain
                    .writer()
                    .write_all(mem, &self.id[..n])
                    .map_err(|_| ioerr(&self.metrics))?;
                // n <= 20.
                Ok(n as u32)
            }
            RequestType::Unsupported(_) => {
                self.metrics.unsupported.fetch_add(1, Ordering::Relaxed);
                Err(VIRTIO_BLK_S_UNSUPP)
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
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

    use super::super::MAX_REQUEST_BYTES;
    use super::super::request::{
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use super::super::test_utils::{add_request, disk_file, status_of};
    use super::*;
    use crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG;
    use crate::devices::virtio::mmio::reg;
    use crate::devices::virtio::test_utils::{
        Buf, MockDriver, TestEventManager, event_manager_with, wait_used,
    };

    struct Slot {
        dir: tempfile::TempDir,
        dev: Arc<Mutex<Block>>,
        d: MockDriver,
        em: TestEventManager,
    }

    fn slot() -> Slot {
        let dir = tempfile::tempdir().unwrap();
        let dev = Arc::new(Mutex::new(Block::new("slot-0").unwrap()));
        let mut d = MockDriver::new(dev.clone());
        d.init(1 << VIRTIO_BLK_F_FLUSH);
        let em = event_manager_with(dev.clone());
        Slot { dir, dev, d, em }
    }

    impl Slot {
        /// Submits a request and returns (status, used length, chain).
        fn submit(&mut self, type_: u32, sector: u64, data: &[Buf]) -> (u8, u32, Vec<u8>) {
            let c = add_request(&mut self.d, type_, sector, data);
            self.d.notify(0);
            let used = wait_used(&mut self.em, &mut self.d, 0);
            assert_eq!(used.head, c.head);
            let first_data = c
                .buffers
                .get(1)
                .filter(|_| c.buffers.len() > 2)
                .map(|&(a, l)| self.d.read_mem(a, l as usize))
                .unwrap_or_default();
            (status_of(&self.d, &c), used.len, first_data)
        }

        fn capacity(&mut self) -> u64 {
            u64::from_le_bytes(self.d.read_config(0, 8).try_into().unwrap())
        }
    }

    #[test]
    fn empty_slot_has_no_capacity_and_fails_io() {
        let mut s = slot();
        assert_eq!(s.capacity(), 0);
        let (st, len, _) = s.submit(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
        assert_eq!((st, len), (VIRTIO_BLK_S_IOERR, 1));
        let (st, _, _) = s.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(st, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn attach_read_write_flush_get_id() {
        let mut s = slot();
        let gen0 = s.d.read_reg(reg::CONFIG_GENERATION);
        let path = disk_file(s.dir.path(), "disk.img", 8, 0x10);
        s.dev.lock().unwrap().attach(&path, false).unwrap();
        assert_ne!(s.d.take_interrupt() & VIRTIO_MMIO_INT_CONFIG, 0);
        assert_ne!(s.d.read_reg(reg::CONFIG_GENERATION), gen0);
        assert_eq!(s.capacity(), 8);

        let (st, len, data) = s.submit(VIRTIO_BLK_T_IN, 2, &[Buf::In(1024)]);
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1025));
        assert_eq!(&data[..512], &[0x12u8; 512][..]);
        assert_eq!(&data[512..], &[0x13u8; 512][..]);

        let (st, len, _) = s.submit(VIRTIO_BLK_T_OUT, 7, &[Buf::Out(vec![0xaa; 512])]);
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1));
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[7 * 512..], &[0xaau8; 512][..]);

        let (st, _, _) = s.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(st, VIRTIO_BLK_S_OK);

        let (st, len, id) = s.submit(VIRTIO_BLK_T_GET_ID, 0, &[Buf::In(20)]);
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 21));
        assert_eq!(&id[..6], b"slot-0");

        let m = s.dev.lock().unwrap().metrics();
        assert!(m.contains(&("block_read_bytes", 1024)));
        assert!(m.contains(&("block_write_bytes", 512)));
    }

    #[test]
    fn read_only_attachment_rejects_writes() {
        let mut s = slot();
        let path = disk_file(s.dir.path(), "ro.img", 4, 1);
        s.dev.lock().unwrap().attach(&path, true).unwrap();
        let (st, _, _) = s.submit(VIRTIO_BLK_T_OUT, 0, &[Buf::Out(vec![0xff; 512])]);
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
        assert_eq!(&std::fs::read(&path).unwrap()[..512], &[1u8; 512][..]);
        let (st, _, data) = s.submit(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
        assert_eq!((st, data[0]), (VIRTIO_BLK_S_OK, 1));
    }

    #[test]
    fn hot_replace_and_detach_change_capacity_and_contents() {
        let mut s = slot();
        let a = disk_file(s.dir.path(), "a.img", 4, 0xa0);
        let b = disk_file(s.dir.path(), "b.img", 16, 0xb0);
        s.dev.lock().unwrap().attach(&a, false).unwrap();
        s.d.take_interrupt();
        assert_eq!(s.capacity(), 4);
        s.dev.lock().unwrap().replace(&b, true).unwrap();
        assert_ne!(s.d.take_interrupt() & VIRTIO_MMIO_INT_CONFIG, 0);
        assert_eq!(s.capacity(), 16);
        let (st, _, data) = s.submit(VIRTIO_BLK_T_IN, 10, &[Buf::In(512)]);
        assert_eq!((st, data[0]), (VIRTIO_BLK_S_OK, 0xba));
        s.dev.lock().unwrap().detach().unwrap();
        assert_ne!(s.d.take_interrupt() & VIRTIO_MMIO_INT_CONFIG, 0);
        assert_eq!(s.capacity(), 0);
        let (st, _, _) = s.submit(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
        assert!(matches!(
            s.dev.lock().unwrap().detach(),
            Err(BlockError::Empty)
        ));
        assert!(
            s.dev
                .lock()
                .unwrap()
                .attach(&s.dir.path().join("missing"), false)
                .is_err()
        );
    }

    #[test]
    fn out_of_range_unaligned_oversized_and_unknown_requests() {
        let mut s = slot();
        let path = disk_file(s.dir.path(), "d.img", 4, 0);
        s.dev.lock().unwrap().attach(&path, false).unwrap();
        // Past the end, and a sector number that overflows the byte offset.
        assert_eq!(
            s.submit(VIRTIO_BLK_T_IN, 4, &[Buf::In(512)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            s.submit(VIRTIO_BLK_T_IN, 3, &[Buf::In(1024)]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            s.submit(VIRTIO_BLK_T_IN, u64::MAX, &[Buf::In(512)]).0,
            VIRTIO_BLK_S_IOERR
        );
        // Not a whole number of sectors.
        assert_eq!(
            s.submit(VIRTIO_BLK_T_IN, 0, &[Buf::In(100)]).0,
            VIRTIO_BLK_S_IOERR
        );
        // Over the request size bound.
        assert_eq!(
            s.submit(VIRTIO_BLK_T_IN, 0, &[Buf::In(MAX_REQUEST_BYTES + 512)])
                .0,
            VIRTIO_BLK_S_IOERR
        );
        // Read with device-readable data.
        assert_eq!(
            s.submit(VIRTIO_BLK_T_IN, 0, &[Buf::Out(vec![0; 512])]).0,
            VIRTIO_BLK_S_IOERR
        );
        // Unknown type.
        assert_eq!(s.submit(77, 0, &[]).0, VIRTIO_BLK_S_UNSUPP);
        // No status byte at all: completed with nothing written.
        let c =
            s.d.add_chain(0, &[Buf::Out(super::super::test_utils::header(0, 0))]);
        s.d.notify(0);
        let used = wait_used(&mut s.em, &mut s.d, 0);
        assert_eq!((used.head, used.len), (c.head, 0));
        // The device is still healthy.
        assert_eq!(
            s.submit(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]).0,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(
            s.d.status() & crate::devices::virtio::status::DEVICE_NEEDS_RESET,
            0
        );
    }
}
