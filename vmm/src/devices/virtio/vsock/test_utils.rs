//! A guest-side harness for vsock device tests: a real hybrid muxer on a
//! temporary unix socket, the mock driver, and a real event loop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vm_memory::ByteValued;

use super::device::Vsock;
use super::packet::{HDR_SIZE, PacketHeader};
use super::{HOST_CID, RXQ, TXQ, TYPE_STREAM};
use crate::devices::virtio::test_utils::{
    AddedChain, Buf, MockDriver, TestEventManager, event_manager_with, run_idle, wait_used,
};

/// The guest CID tests use.
pub const GUEST_CID: u64 = 3;
/// Payload room of each rx buffer the harness posts.
pub const RX_BUF_DATA: u32 = 4096;

/// Guest side of a vsock device under test.
pub struct Harness {
    /// Holds the socket directory alive.
    pub _dir: tempfile::TempDir,
    /// The host unix socket.
    pub uds: PathBuf,
    /// The device.
    pub dev: Arc<Mutex<Vsock>>,
    /// The mock driver.
    pub d: MockDriver,
    /// The event loop.
    pub em: TestEventManager,
    rx_chains: HashMap<u16, AddedChain>,
}

impl Harness {
    /// A running device with 8 rx buffers posted.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let dev = Arc::new(Mutex::new(Vsock::new_hybrid(GUEST_CID, &uds).unwrap()));
        let mut d = MockDriver::new(dev.clone());
        d.init(0);
        let em = event_manager_with(dev.clone());
        let mut h = Self {
            _dir: dir,
            uds,
            dev,
            d,
            em,
            rx_chains: HashMap::new(),
        };
        for _ in 0..8 {
            h.post_rx();
        }
        run_idle(&mut h.em);
        h
    }

    /// Posts one rx buffer (header and payload in one descriptor, as Linux ≥ 6.2 does).
    pub fn post_rx(&mut self) {
        let c = self
            .d
            .add_chain(RXQ, &[Buf::In(HDR_SIZE as u32 + RX_BUF_DATA)]);
        self.rx_chains.insert(c.head, c);
        self.d.notify(RXQ);
    }

    /// A guest → host header from guest port `src` to host port `dst`.
    pub fn hdr(op: u16, src: u32, dst: u32) -> PacketHeader {
        let mut h = PacketHeader::default();
        h.set_src_cid(GUEST_CID)
            .set_dst_cid(HOST_CID)
            .set_src_port(src)
            .set_dst_port(dst)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_buf_alloc(64 * 1024);
        h
    }

    /// Transmits raw tx buffers and waits until the device consumed them.
    pub fn send_raw(&mut self, bufs: &[Buf]) {
        let c = self.d.add_chain(TXQ, bufs);
        self.d.notify(TXQ);
        let used = wait_used(&mut self.em, &mut self.d, TXQ);
        assert_eq!(used.head, c.head);
    }

    /// Transmits a packet (payload length set from `data`).
    pub fn send(&mut self, mut hdr: PacketHeader, data: &[u8]) {
        hdr.set_len(u32::try_from(data.len()).unwrap());
        let mut bytes = hdr.as_slice().to_vec();
        bytes.extend_from_slice(data);
        self.send_raw(&[Buf::Out(bytes)]);
    }

    /// Waits for the next packet the device gives the guest, and re-posts its buffer.
    pub fn recv(&mut self) -> (PacketHeader, Vec<u8>) {
        let used = wait_used(&mut self.em, &mut self.d, RXQ);
        let chain = self.rx_chains.remove(&used.head).unwrap();
        let (addr, _) = chain.buffers[0];
        let raw = self.d.read_mem(addr, used.len as usize);
        assert!(raw.len() >= HDR_SIZE, "rx packet shorter than a header");
        let mut hdr = PacketHeader::default();
        hdr.as_mut_slice().copy_from_slice(&raw[..HDR_SIZE]);
        assert_eq!(raw.len() - HDR_SIZE, hdr.len() as usize);
        self.post_rx();
        (hdr, raw[HDR_SIZE..].to_vec())
    }

    /// Runs the loop a little and returns a packet if the device produced one.
    pub fn try_recv(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
        run_idle(&mut self.em);
        self.poll()
    }

    /// Returns a packet the device already produced, without running the loop.
    pub fn poll(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
        let used = self.d.pop_used(RXQ)?;
        let chain = self.rx_chains.remove(&used.head).unwrap();
        let raw = self.d.read_mem(chain.buffers[0].0, used.len as usize);
        let mut hdr = PacketHeader::default();
        hdr.as_mut_slice().copy_from_slice(&raw[..HDR_SIZE]);
        self.post_rx();
        Some((hdr, raw[HDR_SIZE..].to_vec()))
    }

    /// Runs the event loop for a few rounds.
    pub fn idle(&mut self) {
        run_idle(&mut self.em);
    }
}
