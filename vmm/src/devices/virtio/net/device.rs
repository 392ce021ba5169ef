//! The virtio-net device.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::frame::{read_tx_frame, write_rx_frame};
use super::metrics::NetMetrics;
use super::{MAX_FRAME, NetBackend, NetError, QUEUE_SIZE, RXQ, TXQ, Tap, VNET_HDR_SIZE};
use crate::devices::virtio::device_state::{DeviceState, MAX_CHAINS_PER_EVENT};
use crate::devices::virtio::log_limit::guest_warn;
use crate::devices::virtio::{
    ActivateError, Activation, Interrupt, MetricsSnapshot, TYPE_NET, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes,
};

/// Feature: the config space holds the MAC address.
const VIRTIO_NET_F_MAC: u32 = 5;

/// A virtio-net device.
pub struct Net<B: NetBackend = Tap> {
    pub(super) state: DeviceState,
    mac: [u8; 6],
    pub(super) backend: B,
    metrics: Arc<NetMetrics>,
    rx_buf: Vec<u8>,
    /// Length of a frame read from the tap that still waits for a guest buffer.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
}

impl<B: NetBackend> std::fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

impl Net<Tap> {
    /// A net device on the tap `tap_name` (opened in the caller's network namespace).
    pub fn with_tap(tap_name: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        Self::new(Tap::open(tap_name)?, mac)
    }
}

impl<B: NetBackend> Net<B> {
    /// A net device on `backend` with guest MAC `mac`.
    pub fn new(backend: B, mac: [u8; 6]) -> Result<Self, NetError> {
        Ok(Self {
            state: DeviceState::new((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC))
                .map_err(NetError::EventFd)?,
            mac,
            backend,
            metrics: Arc::new(NetMetrics::default()),
            rx_buf: vec![0u8; VNET_HDR_SIZE + MAX_FRAME],
            rx_pending: None,
            tx_buf: Vec::new(),
        })
    }

    /// The device's counters.
    pub fn net_metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// Sends every frame the guest queued.
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
                Err(e) => return self.state.fail("net", &e),
            };
            match read_tx_frame(mem, &chain, &mut self.tx_buf) {
                Ok(n) => match self.backend.write_frame(&self.tx_buf[..n]) {
                    Ok(_) => {
                        self.metrics.tx_frames.fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .tx_bytes
                            .fetch_add((n - VNET_HDR_SIZE) as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                        guest_warn!(self.state.log, "net: tap write failed: {e}");
                    }
                },
                Err(e) => {
                    self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    guest_warn!(self.state.log, "net: malformed tx frame: {e}");
                }
            }
            if let Err(e) = queue.add_used(mem, chain.head(), 0) {
                return self.state.fail("net", &e);
            }
            used_any = true;
        }
        if used_any {
            self.state.signal_used("net");
        }
    }

    /// Moves frames from the tap into guest rx buffers until either runs out.
    ///
    /// The tap is registered edge-triggered, so this must read until
    /// `WouldBlock` or keep the frame it read for the next rx notification.
    pub(super) fn process_rx(&mut self) {
        let mut used_any = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        crate::log::warning!("net: tap read failed: {e}");
                        break;
                    }
                },
            };
            self.rx_pending = Some(len);
            let Some(active) = self.state.active.as_mut() else {
                break;
            };
            let mem = &active.mem;
            let queue = &mut active.queues[RXQ];
            let chain = match queue.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return self.state.fail("net", &e),
            };
            self.rx_pending = None;
            match write_rx_frame(mem, &chain, &mut self.rx_buf[..len]) {
                Some(written) => {
                    if let Err(e) = queue.add_used(mem, chain.head(), written) {
                        return self.state.fail("net", &e);
                    }
                    used_any = true;
                    self.metrics.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .rx_bytes
                        .fetch_add(len.saturating_sub(VNET_HDR_SIZE) as u64, Ordering::Relaxed);
                }
                None => {
                    // Too small for this frame: drop the frame, keep the buffer.
                    queue.undo_pop();
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if used_any {
            self.state.signal_used("net");
        }
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn avail_features(&self) -> u64 {
        self.state.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.state.acked_features = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.state.activate(activation, 2)
    }

    fn reset(&mut self) {
        self.rx_pending = None;
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

    use super::super::test_utils::{NetNs, PacketSocket, PairBackend, test_frame};
    use super::*;
    use crate::devices::virtio::test_utils::{
        Buf, MockDriver, event_manager_with, run_idle, wait_used,
    };

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

    fn tx_chain(frame: &[u8]) -> Vec<Buf> {
        // Header and frame in separate descriptors, with garbage in the
        // header the device must not pass on.
        vec![
            Buf::Out(vec![0xff; VNET_HDR_SIZE]),
            Buf::Out(frame.to_vec()),
        ]
    }

    #[test]
    fn frames_flow_both_ways_through_a_backend() {
        let (backend, host) = PairBackend::pair();
        let dev = Arc::new(Mutex::new(Net::new(backend, MAC).unwrap()));
        let mut d = MockDriver::new(dev.clone());
        d.init(1 << VIRTIO_NET_F_MAC);
        assert_eq!(d.read_config(0, 6), MAC);
        let mut em = event_manager_with(dev.clone());

        let frame = test_frame([0xff; 6], MAC, b"to the host");
        d.add_chain(TXQ, &tx_chain(&frame));
        d.notify(TXQ);
        wait_used(&mut em, &mut d, TXQ);
        let mut got = vec![0u8; 2048];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(
            &got[..VNET_HDR_SIZE],
            &[0u8; VNET_HDR_SIZE],
            "guest header leaked"
        );
        assert_eq!(&got[VNET_HDR_SIZE..n], &frame[..]);

        // Host frame before any rx buffer: it waits, then lands in the buffer.
        let inbound = test_frame(MAC, [0x02; 6], b"to the guest");
        let mut msg = vec![0u8; VNET_HDR_SIZE];
        msg.extend_from_slice(&inbound);
        host.send(&msg).unwrap();
        run_idle(&mut em);
        let c = d.add_chain(RXQ, &[Buf::In(2048)]);
        d.notify(RXQ);
        let used = wait_used(&mut em, &mut d, RXQ);
        assert_eq!(used.len as usize, VNET_HDR_SIZE + inbound.len());
        let raw = d.read_mem(c.buffers[0].0, used.len as usize);
        assert_eq!(&raw[10..12], &1u16.to_le_bytes(), "num_buffers");
        assert_eq!(&raw[VNET_HDR_SIZE..], &inbound[..]);
    }

    #[test]
    fn malformed_tx_is_dropped_and_small_rx_buffer_skipped() {
        let (backend, host) = PairBackend::pair();
        let dev = Arc::new(Mutex::new(Net::new(backend, MAC).unwrap()));
        let mut d = MockDriver::new(dev.clone());
        d.init(0);
        let mut em = event_manager_with(dev.clone());
        // Shorter than a header, and a writable tx buffer.
        d.add_chain(TXQ, &[Buf::Out(vec![0; 4])]);
        d.add_chain(TXQ, &[Buf::In(64)]);
        d.notify(TXQ);
        wait_used(&mut em, &mut d, TXQ);
        wait_used(&mut em, &mut d, TXQ);
        let m = dev.lock().unwrap().metrics();
        assert!(m.contains(&("net_tx_dropped", 2)));
        // A frame that does not fit the guest's buffer is dropped; the buffer
        // serves the next frame.
        let mut big = vec![0u8; VNET_HDR_SIZE];
        big.extend_from_slice(&test_frame(MAC, MAC, &[7u8; 1000]));
        host.send(&big).unwrap();
        let mut small = vec![0u8; VNET_HDR_SIZE];
        small.extend_from_slice(&test_frame(MAC, MAC, b"fits"));
        host.send(&small).unwrap();
        d.add_chain(RXQ, &[Buf::In(100)]);
        d.notify(RXQ);
        let used = wait_used(&mut em, &mut d, RXQ);
        assert_eq!(used.len as usize, small.len());
        assert!(
            dev.lock()
                .unwrap()
                .metrics()
                .contains(&("net_rx_dropped", 1))
        );
    }

    /// Needs root: a real tap in a namespace of its own.
    #[test]
    fn real_tap_in_a_network_namespace() {
        let ns = NetNs::new();
        // setns moves only the calling thread: use a thread of our own.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                ns.enter();
                let tap = Tap::open("vmpodtap0").unwrap();
                ns.ip(&["link", "set", "vmpodtap0", "up"]);
                let sock = PacketSocket::bind("vmpodtap0");
                let dev = Arc::new(Mutex::new(Net::new(tap, MAC).unwrap()));
                let mut d = MockDriver::new(dev.clone());
                d.init(1 << VIRTIO_NET_F_MAC);
                let mut em = event_manager_with(dev.clone());

                // Guest → tap.
                let out = test_frame([0xff; 6], MAC, b"vmpod guest to tap");
                d.add_chain(TXQ, &tx_chain(&out));
                d.notify(TXQ);
                wait_used(&mut em, &mut d, TXQ);
                let seen =
                    sock.recv_matching(|f| f.len() >= out.len() && f[..out.len()] == out[..]);
                assert_eq!(&seen[..out.len()], &out[..]);

                // Tap → guest. Other traffic (IPv6 router solicitations...) may
                // come first: look through the used buffers for ours.
                let inbound = test_frame(MAC, [0x02, 0, 0, 0, 0, 0x02], b"vmpod tap to guest");
                let mut chains = std::collections::HashMap::new();
                for _ in 0..16 {
                    let c = d.add_chain(RXQ, &[Buf::In(2048)]);
                    chains.insert(c.head, c);
                }
                d.notify(RXQ);
                sock.send(&inbound);
                let mut found = false;
                for _ in 0..16 {
                    let used = wait_used(&mut em, &mut d, RXQ);
                    let c = &chains[&used.head];
                    let raw = d.read_mem(c.buffers[0].0, used.len as usize);
                    if raw.len() >= VNET_HDR_SIZE && raw[VNET_HDR_SIZE..] == inbound[..] {
                        found = true;
                        break;
                    }
                }
                assert!(found, "frame written to the tap never reached an rx buffer");
            });
        });
    }
}
