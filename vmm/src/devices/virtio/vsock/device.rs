//! The virtio-vsock device: moves packets between the queues and a backend.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::metrics::VsockMetrics;
use super::packet::{parse_tx, rx_capacity, write_rx};
use super::{HybridMuxer, QUEUE_SIZE, RXQ, TXQ, VsockBackend, VsockError};
use crate::devices::virtio::device_state::{DeviceState, MAX_CHAINS_PER_EVENT};
use crate::devices::virtio::log_limit::guest_warn;
use crate::devices::virtio::{
    ActivateError, Activation, Interrupt, MetricsSnapshot, TYPE_VSOCK, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes,
};

/// A virtio-vsock device.
pub struct Vsock<B: VsockBackend = HybridMuxer> {
    pub(super) state: DeviceState,
    cid: u64,
    pub(super) backend: B,
    metrics: Arc<VsockMetrics>,
    rx_data: Vec<u8>,
}

impl<B: VsockBackend> std::fmt::Debug for Vsock<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Vsock<HybridMuxer> {
    /// A vsock device for guest `cid` with the hybrid backend on `uds_path`.
    pub fn new_hybrid(cid: u64, uds_path: &std::path::Path) -> Result<Self, VsockError> {
        let metrics = Arc::new(VsockMetrics::default());
        let backend = HybridMuxer::new(uds_path, cid, metrics.clone())?;
        Self::with_backend(cid, backend, metrics)
    }
}

impl<B: VsockBackend> Vsock<B> {
    /// A vsock device over any backend (counters shared with it).
    pub fn with_backend(
        cid: u64,
        backend: B,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        Ok(Self {
            state: DeviceState::new(1 << VIRTIO_F_VERSION_1).map_err(VsockError::Events)?,
            cid,
            backend,
            metrics,
            rx_data: vec![0u8; super::MAX_PKT_DATA as usize],
        })
    }

    /// The device's counters.
    pub fn vsock_metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, for configuration.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Takes every packet the guest transmitted and hands it to the backend.
    pub(super) fn process_tx(&mut self) {
        let mut used_any = false;
        for round in 0.. {
            if round == MAX_CHAINS_PER_EVENT {
                self.state.reschedule(TXQ);
                break;
            }
            let Some(active) = self.state.active.as_mut() else {
                return;
            };
            let mem = &active.mem;
            let queue = &mut active.queues[TXQ];
            let chain = match queue.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return self.state.fail("vsock", &e),
            };
            let parsed = parse_tx(mem, &chain);
            if let Err(e) = queue.add_used(mem, chain.head(), 0) {
                return self.state.fail("vsock", &e);
            }
            used_any = true;
            match parsed {
                Ok(pkt) => {
                    self.metrics.tx_packets.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .tx_bytes
                        .fetch_add(pkt.data.len() as u64, Ordering::Relaxed);
                    self.backend.send_pkt(pkt);
                }
                Err(e) => {
                    self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                    guest_warn!(self.state.log, "vsock: malformed tx packet dropped: {e}");
                }
            }
        }
        if used_any {
            self.state.signal_used("vsock");
        }
    }

    /// Fills guest rx buffers with whatever the backend has.
    pub(super) fn process_rx(&mut self) {
        let mut used_any = false;
        while self.backend.has_pending_rx() {
            let Some(active) = self.state.active.as_mut() else {
                return;
            };
            let mem = &active.mem;
            let queue = &mut active.queues[RXQ];
            let chain = match queue.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return self.state.fail("vsock", &e),
            };
            let cap = match rx_capacity(&chain) {
                Ok(cap) => cap,
                Err(e) => {
                    // Unusable buffer: give it back empty and go on.
                    self.metrics.rx_bad_buffers.fetch_add(1, Ordering::Relaxed);
                    guest_warn!(self.state.log, "vsock: bad rx buffer: {e}");
                    if let Err(e) = queue.add_used(mem, chain.head(), 0) {
                        return self.state.fail("vsock", &e);
                    }
                    used_any = true;
                    continue;
                }
            };
            let Some((hdr, len)) = self.backend.recv_pkt(&mut self.rx_data[..cap]) else {
                queue.undo_pop();
                break;
            };
            let written = match write_rx(mem, &chain, &hdr, &self.rx_data[..len]) {
                Ok(n) => n,
                Err(e) => {
                    guest_warn!(self.state.log, "vsock: cannot write rx packet: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, chain.head(), written) {
                return self.state.fail("vsock", &e);
            }
            used_any = true;
            self.metrics.rx_packets.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .rx_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
        }
        if used_any {
            self.state.signal_used("vsock");
        }
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        self.state.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.state.acked_features = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.state.activate(activation, 3)
    }

    fn reset(&mut self) {
        self.backend.reset();
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
    use std::io::{BufRead, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    use super::super::test_utils::{GUEST_CID, Harness};
    use super::super::{CONN_TX_BUF_SIZE, HOST_CID, MAX_PKT_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND, op};
    use crate::devices::virtio::test_utils::{Buf, run_until};
    use crate::devices::virtio::{VirtioDevice, status};

    fn host_client(h: &Harness) -> UnixStream {
        let s = UnixStream::connect(&h.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Reads the reply line byte by byte, as a real client must.
    fn read_line(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            s.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    /// Host connects to guest port 1234; returns (client, host-side port).
    fn establish(h: &mut Harness, guest_port: u32) -> (UnixStream, u32) {
        let mut c = host_client(h);
        c.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let (req, _) = h.recv();
        assert_eq!(req.op(), op::REQUEST);
        assert_eq!((req.src_cid(), req.dst_cid()), (HOST_CID, GUEST_CID));
        assert_eq!(req.dst_port(), guest_port);
        let host_port = req.src_port();
        h.send(Harness::hdr(op::RESPONSE, guest_port, host_port), &[]);
        assert_eq!(read_line(&mut c), format!("OK {host_port}\n"));
        (c, host_port)
    }

    #[test]
    fn host_connect_handshake_then_data_both_ways() {
        let mut h = Harness::new();
        let (mut c, hp) = establish(&mut h, 1234);
        c.write_all(b"hello guest").unwrap();
        let (pkt, data) = h.recv();
        assert_eq!(pkt.op(), op::RW);
        assert_eq!((pkt.src_port(), pkt.dst_port()), (hp, 1234));
        assert_eq!(pkt.buf_alloc(), CONN_TX_BUF_SIZE);
        assert_eq!(data, b"hello guest");
        h.send(Harness::hdr(op::RW, 1234, hp), b"hello host");
        let mut buf = [0u8; 10];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello host");
        let m = h.dev.lock().unwrap().metrics();
        assert!(m.contains(&("vsock_conns_added", 1)));
    }

    #[test]
    fn guest_connects_to_host_listener() {
        let mut h = Harness::new();
        let listener = UnixListener::bind(format!("{}_52", h.uds.display())).unwrap();
        h.send(Harness::hdr(op::REQUEST, 40000, 52), &[]);
        let (resp, _) = h.recv();
        assert_eq!(resp.op(), op::RESPONSE);
        assert_eq!((resp.src_port(), resp.dst_port()), (52, 40000));
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        h.send(Harness::hdr(op::RW, 40000, 52), b"ping");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").unwrap();
        let (pkt, data) = h.recv();
        assert_eq!((pkt.op(), data.as_slice()), (op::RW, &b"pong"[..]));
    }

    #[test]
    fn guest_connect_without_listener_gets_rst() {
        let mut h = Harness::new();
        h.send(Harness::hdr(op::REQUEST, 40000, 77), &[]);
        let (rst, _) = h.recv();
        assert_eq!(rst.op(), op::RST);
        assert_eq!((rst.src_port(), rst.dst_port()), (77, 40000));
    }

    #[test]
    fn guest_rst_closes_host_stream_and_host_close_shuts_guest_side() {
        let mut h = Harness::new();
        let (mut c, hp) = establish(&mut h, 1234);
        h.send(Harness::hdr(op::RST, 1234, hp), &[]);
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut buf).unwrap(), 0, "host stream not closed");
        assert_eq!(h.dev.lock().unwrap().backend().connection_count(), 0);

        let (c2, hp2) = establish(&mut h, 1235);
        drop(c2);
        let (shut, _) = h.recv();
        assert_eq!(shut.op(), op::SHUTDOWN);
        assert_eq!(shut.flags(), SHUTDOWN_RCV | SHUTDOWN_SEND);
        h.send(Harness::hdr(op::RST, 1235, hp2), &[]);
        assert_eq!(h.dev.lock().unwrap().backend().connection_count(), 0);
    }

    #[test]
    fn host_half_close_still_carries_the_guest_reply() {
        let mut h = Harness::new();
        let (mut c, hp) = establish(&mut h, 1234);
        c.write_all(b"request").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let (p, data) = h.recv();
        assert_eq!((p.op(), data.as_slice()), (op::RW, &b"request"[..]));
        let (shut, _) = h.recv();
        assert_eq!((shut.op(), shut.flags()), (op::SHUTDOWN, SHUTDOWN_SEND));
        h.send(Harness::hdr(op::RW, 1234, hp), b"reply");
        let mut s = Harness::hdr(op::SHUTDOWN, 1234, hp);
        s.set_flags(SHUTDOWN_RCV | SHUTDOWN_SEND);
        h.send(s, &[]);
        assert_eq!(h.recv().0.op(), op::RST);
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"reply");
    }

    #[test]
    fn guest_shutdown_flushes_then_resets() {
        let mut h = Harness::new();
        let (mut c, hp) = establish(&mut h, 1234);
        h.send(Harness::hdr(op::RW, 1234, hp), b"last words");
        let mut s = Harness::hdr(op::SHUTDOWN, 1234, hp);
        s.set_flags(SHUTDOWN_RCV | SHUTDOWN_SEND);
        h.send(s, &[]);
        let (rst, _) = h.recv();
        assert_eq!(rst.op(), op::RST);
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"last words");
    }

    #[test]
    fn host_to_guest_respects_guest_credit() {
        let mut h = Harness::new();
        let mut c = host_client(&h);
        c.write_all(b"CONNECT 1234\n").unwrap();
        let (req, _) = h.recv();
        let hp = req.src_port();
        // The guest has room for 8 bytes only.
        let mut resp = Harness::hdr(op::RESPONSE, 1234, hp);
        resp.set_buf_alloc(8);
        h.send(resp, &[]);
        let mut line = String::new();
        std::io::BufReader::new(&mut c)
            .read_line(&mut line)
            .unwrap();
        c.write_all(b"0123456789abcdefghij").unwrap();
        let (p1, d1) = h.recv();
        assert_eq!((p1.op(), d1.as_slice()), (op::RW, &b"01234567"[..]));
        // Stalled: the device asks for credit and sends nothing more.
        let (p2, _) = h.recv();
        assert_eq!(p2.op(), op::CREDIT_REQUEST);
        assert!(h.try_recv().is_none(), "sent past the guest's credit");
        // The guest consumed 8 bytes: 8 more may flow.
        let mut upd = Harness::hdr(op::CREDIT_UPDATE, 1234, hp);
        upd.set_buf_alloc(8).set_fwd_cnt(8);
        h.send(upd, &[]);
        let (p3, d3) = h.recv();
        assert_eq!((p3.op(), d3.as_slice()), (op::RW, &b"89abcdef"[..]));
    }

    #[test]
    fn credit_request_gets_credit_update_with_forwarded_count() {
        let mut h = Harness::new();
        let (mut c, hp) = establish(&mut h, 1234);
        h.send(Harness::hdr(op::RW, 1234, hp), b"12345");
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        h.send(Harness::hdr(op::CREDIT_REQUEST, 1234, hp), &[]);
        let (upd, _) = h.recv();
        assert_eq!(upd.op(), op::CREDIT_UPDATE);
        assert_eq!(upd.buf_alloc(), CONN_TX_BUF_SIZE);
        assert_eq!(upd.fwd_cnt(), 5);
    }

    #[test]
    fn guest_overrunning_our_credit_is_reset() {
        let mut h = Harness::new();
        let (c, hp) = establish(&mut h, 1234);
        // The host never reads: the socket buffer fills, then tx_buf, then RST.
        let chunk = vec![0x55u8; MAX_PKT_DATA as usize];
        let mut got_rst = false;
        for _ in 0..32 {
            h.send(Harness::hdr(op::RW, 1234, hp), &chunk);
            if let Some((p, _)) = h.try_recv() {
                if p.op() == op::RST {
                    got_rst = true;
                    break;
                }
            }
        }
        assert!(
            got_rst,
            "no RST after overrunning {CONN_TX_BUF_SIZE} bytes of credit"
        );
        drop(c);
    }

    #[test]
    fn malformed_packets_are_dropped_or_reset_never_fatal() {
        let mut h = Harness::new();
        // Shorter than a header.
        h.send_raw(&[Buf::Out(vec![0u8; 10])]);
        // Declares more payload than present.
        let mut hdr = Harness::hdr(op::RW, 1, 2);
        hdr.set_len(100);
        let mut bytes = vm_memory::ByteValued::as_slice(&hdr).to_vec();
        bytes.extend_from_slice(&[0u8; 10]);
        h.send_raw(&[Buf::Out(bytes)]);
        // Declares a payload over the limit.
        hdr.set_len(MAX_PKT_DATA + 1);
        h.send_raw(&[Buf::Out(vm_memory::ByteValued::as_slice(&hdr).to_vec())]);
        // A device-writable tx buffer.
        h.send_raw(&[Buf::In(64)]);
        // Wrong source CID: dropped silently.
        let mut spoof = Harness::hdr(op::REQUEST, 1, 52);
        spoof.set_src_cid(99);
        h.send(spoof, &[]);
        assert!(h.try_recv().is_none());
        // Wrong socket type: RST.
        let mut seq = Harness::hdr(op::REQUEST, 5, 6);
        seq.set_type(2);
        h.send(seq, &[]);
        assert_eq!(h.recv().0.op(), op::RST);
        // Data for a connection that does not exist: RST.
        h.send(Harness::hdr(op::RW, 7, 8), b"x");
        assert_eq!(h.recv().0.op(), op::RST);
        // Unknown op: RST.
        h.send(Harness::hdr(99, 7, 8), &[]);
        assert_eq!(h.recv().0.op(), op::RST);
        assert!(
            h.dev
                .lock()
                .unwrap()
                .metrics()
                .contains(&("vsock_malformed", 6))
        );
        // The device still works.
        assert_eq!(h.d.status() & status::DEVICE_NEEDS_RESET, 0);
        let (_c, _) = establish(&mut h, 1234);
    }

    /// A megabyte each way with a small guest window: the data arrives
    /// intact and the device never exceeds the credit the guest advertised.
    #[test]
    fn bulk_transfer_both_ways_within_credit() {
        const TOTAL: usize = 1 << 20;
        const GUEST_BUF: u32 = 16 * 1024;
        let pattern = |i: usize| (i * 7 % 251) as u8;
        let mut h = Harness::new();
        let mut c = host_client(&h);
        c.write_all(b"CONNECT 1234\n").unwrap();
        let (req, _) = h.recv();
        let hp = req.src_port();
        let mut resp = Harness::hdr(op::RESPONSE, 1234, hp);
        resp.set_buf_alloc(GUEST_BUF);
        h.send(resp, &[]);
        assert_eq!(read_line(&mut c), format!("OK {hp}\n"));

        // Host → guest.
        let mut writer = c.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
            writer.write_all(&data).unwrap();
        });
        let mut got = Vec::with_capacity(TOTAL);
        let mut fwd: u32 = 0;
        let mut credit_msgs = 0;
        while got.len() < TOTAL {
            let (p, data) = h.recv();
            match p.op() {
                op::RW => {
                    got.extend_from_slice(&data);
                    let in_flight = got.len() as u32 - fwd;
                    assert!(
                        in_flight <= GUEST_BUF,
                        "device sent past the guest's credit"
                    );
                }
                op::CREDIT_REQUEST => {}
                other => panic!("unexpected op {other}"),
            }
            // The guest application consumed everything so far.
            if got.len() as u32 - fwd >= GUEST_BUF / 2 || p.op() == op::CREDIT_REQUEST {
                fwd = got.len() as u32;
                let mut upd = Harness::hdr(op::CREDIT_UPDATE, 1234, hp);
                upd.set_buf_alloc(GUEST_BUF).set_fwd_cnt(fwd);
                h.send(upd, &[]);
                credit_msgs += 1;
            }
        }
        sender.join().unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        assert!(credit_msgs > 1);

        // Guest → host, honouring the device's credit.
        let mut reader = c.try_clone().unwrap();
        let receiver = std::thread::spawn(move || {
            let mut all = vec![0u8; TOTAL];
            reader.read_exact(&mut all).unwrap();
            all
        });
        let (mut peer_alloc, mut peer_fwd) = (CONN_TX_BUF_SIZE, 0u32);
        let mut sent = 0usize;
        while sent < TOTAL {
            let credit = peer_alloc - (sent as u32 - peer_fwd);
            if credit == 0 {
                h.send(Harness::hdr(op::CREDIT_REQUEST, 1234, hp), &[]);
                let (p, _) = h.recv();
                peer_alloc = p.buf_alloc();
                peer_fwd = p.fwd_cnt();
                continue;
            }
            let n = (credit as usize).min(4096).min(TOTAL - sent);
            let chunk: Vec<u8> = (sent..sent + n).map(pattern).collect();
            let mut hdr = Harness::hdr(op::RW, 1234, hp);
            hdr.set_fwd_cnt(fwd);
            h.send(hdr, &chunk);
            sent += n;
            while let Some((p, _)) = h.poll() {
                peer_alloc = p.buf_alloc();
                peer_fwd = p.fwd_cnt();
            }
        }
        // The tail may still sit in the device's buffer: keep the loop
        // running (it flushes on EPOLLOUT) until the host has read it all.
        run_until(&mut h.em, "the host to read everything", || {
            receiver.is_finished()
        });
        let all = receiver.join().unwrap();
        assert!(all.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        assert_eq!(h.dev.lock().unwrap().backend().connection_count(), 1);
    }

    #[test]
    fn silent_client_and_silent_guest_time_out() {
        let mut h = Harness::new();
        h.dev
            .lock()
            .unwrap()
            .backend_mut()
            .set_timeout(Duration::from_millis(100));
        // A client that never sends its CONNECT line is closed.
        let mut silent = host_client(&h);
        let mut buf = [0u8; 1];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        silent.set_nonblocking(true).unwrap();
        loop {
            h.idle();
            match silent.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => panic!("unexpected {other:?}"),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "silent client never closed"
            );
        }
        // A guest that never answers REQUEST gets RST and the client EOF.
        let mut c = host_client(&h);
        c.write_all(b"CONNECT 4321\n").unwrap();
        let (req, _) = h.recv();
        assert_eq!(req.op(), op::REQUEST);
        let (rst, _) = h.recv();
        assert_eq!(rst.op(), op::RST);
        assert_eq!(rst.dst_port(), 4321);
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        assert_eq!(h.dev.lock().unwrap().backend().connection_count(), 0);
    }

    #[test]
    fn bad_handshake_lines_close_the_client() {
        let mut h = Harness::new();
        for bad in [&b"HELLO 1\n"[..], &[b'9'; 100][..], b"CONNECT x\n"] {
            let mut c = host_client(&h);
            c.write_all(bad).unwrap();
            h.idle();
            let mut buf = [0u8; 8];
            // Closed without a reply (a reset is fine too).
            assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
        }
        assert!(h.try_recv().is_none(), "bad handshake reached the guest");
        assert!(
            h.dev
                .lock()
                .unwrap()
                .metrics()
                .contains(&("vsock_handshake_failures", 3))
        );
    }
}
