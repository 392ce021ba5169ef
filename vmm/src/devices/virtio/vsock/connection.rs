//! One vsock stream connection between a guest port and a host unix stream.
//!
//! ```text
//!   host CONNECT ─▶ LocalInit ──guest RESPONSE──▶ Established ◀── guest REQUEST (we connect <uds>_P)
//!                      │ timeout/RST                 │ host hang-up ─▶ Closing ──guest RST/SHUTDOWN/timeout──▶ Dead
//!                      ▼                             │ guest SHUTDOWN(both)/RST, I/O error, credit overrun
//!                     Dead ◀─────────────────────────┘
//! ```
//!
//! Packets for the guest are not built eagerly: the connection keeps a set
//! of pending kinds, and the muxer asks for the next one when the guest has
//! an rx buffer. That bounds host memory per connection to `tx_buf`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{PacketHeader, TxPacket};
use super::{CONN_TX_BUF_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};

/// Identifies a connection: (host-side port, guest-side port).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey {
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated; REQUEST sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows both ways.
    Established,
    /// The host hung up; SHUTDOWN sent, waiting for the guest's RST.
    /// (A host half-close stays Established, see `host_eof`.)
    Closing,
    /// Finished; removed once its pending RST (if any) is delivered.
    Dead,
}

/// Pending packet kinds, in delivery priority order.
mod pending {
    pub const RST: u8 = 1 << 0;
    pub const REQUEST: u8 = 1 << 1;
    pub const RESPONSE: u8 = 1 << 2;
    pub const RW: u8 = 1 << 3;
    pub const SHUTDOWN: u8 = 1 << 4;
    pub const CREDIT_UPDATE: u8 = 1 << 5;
    pub const CREDIT_REQUEST: u8 = 1 << 6;
}

/// Send a credit update once this much was forwarded since the last one.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_TX_BUF_SIZE / 4;

/// The epoll interest a connection wants for its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Wants EPOLLIN.
    pub read: bool,
    /// Wants EPOLLOUT.
    pub write: bool,
}

/// A vsock stream connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    guest_cid: u64,
    state: ConnState,
    pending: u8,
    /// Whether the key sits in the muxer's rx queue.
    pub(super) queued: bool,
    /// `OK <port>\n`, written to the host before any data.
    reply: Vec<u8>,
    /// Guest → host bytes not yet written to the stream.
    tx_buf: VecDeque<u8>,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    peer_shut_send: bool,
    /// The host half-closed (read EOF, stream not hung up): the guest was
    /// told with SHUTDOWN(SEND) and may still send.
    host_eof: bool,
    /// Flags of the SHUTDOWN packet pending for the guest.
    shutdown_flags: u32,
    close_after_flush: bool,
    /// The stream reported HUP/ERR; it is polled by reading, not by epoll.
    pub(super) hup: bool,
    deadline: Option<Instant>,
    timeout: Duration,
}

impl Connection {
    fn new(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        state: ConnState,
        timeout: Duration,
    ) -> Self {
        Self {
            stream,
            key,
            guest_cid,
            state,
            pending: 0,
            queued: false,
            reply: Vec::new(),
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            peer_shut_send: false,
            host_eof: false,
            shutdown_flags: 0,
            close_after_flush: false,
            hup: false,
            deadline: None,
            timeout,
        }
    }

    /// A host client asked for guest port `key.peer_port`: send REQUEST;
    /// the guest has `timeout` to answer (also the limit for closing).
    pub fn new_local(stream: UnixStream, key: ConnKey, guest_cid: u64, timeout: Duration) -> Self {
        let mut c = Self::new(stream, key, guest_cid, ConnState::LocalInit, timeout);
        c.pending = pending::REQUEST;
        c.deadline = Some(Instant::now() + timeout);
        c
    }

    /// The guest's REQUEST was connected to a host listener: send RESPONSE.
    pub fn new_peer(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        req: &PacketHeader,
        timeout: Duration,
    ) -> Self {
        let mut c = Self::new(stream, key, guest_cid, ConnState::Established, timeout);
        c.update_peer_credit(req);
        c.pending = pending::RESPONSE;
        c
    }

    /// The stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The connection's state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Whether a packet for the guest is pending.
    pub fn has_pending(&self) -> bool {
        self.pending != 0
    }

    /// Whether the muxer can forget the connection.
    pub fn is_finished(&self) -> bool {
        self.state == ConnState::Dead && self.pending == 0
    }

    /// The deadline of a handshake or close in progress.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Bytes the guest can still take: `buf_alloc - (rx_cnt - fwd_cnt)`,
    /// zero if the guest's numbers are inconsistent.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes buffered towards the host.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// The epoll interest for the stream.
    pub fn interest(&self) -> Interest {
        let live = matches!(self.state, ConnState::Established | ConnState::Closing);
        Interest {
            read: self.state == ConnState::Established
                && self.pending & pending::RW == 0
                && self.peer_credit() > 0
                && !self.hup
                && !self.host_eof,
            write: live && !self.hup && (!self.reply.is_empty() || !self.tx_buf.is_empty()),
        }
    }

    /// Tears the connection down, telling the guest with RST.
    pub fn kill(&mut self) {
        self.state = ConnState::Dead;
        self.pending = pending::RST;
        self.deadline = None;
    }

    /// The deadline passed: a guest that never answered, or never finished closing.
    pub fn expire(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            self.kill();
        }
    }

    fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc();
        self.peer_fwd_cnt = hdr.fwd_cnt();
    }

    /// A packet from the guest for this connection.
    pub fn send_pkt(&mut self, pkt: &TxPacket) {
        let hdr = &pkt.hdr;
        self.update_peer_credit(hdr);
        match (hdr.op(), self.state) {
            (_, ConnState::Dead) => {}
            (op::RST, _) => {
                self.state = ConnState::Dead;
                self.pending = 0;
            }
            (op::RESPONSE, ConnState::LocalInit) => {
                self.state = ConnState::Established;
                self.deadline = None;
                self.reply = format!("OK {}\n", self.key.local_port).into_bytes();
                self.flush();
            }
            (op::RW, ConnState::Established) => {
                let room = (CONN_TX_BUF_SIZE as usize).saturating_sub(self.tx_buf.len());
                if pkt.data.len() > room || self.peer_shut_send {
                    // The guest overran the credit we advertised, or sent after SHUTDOWN.
                    self.kill();
                    return;
                }
                self.tx_buf.extend(pkt.data.iter());
                self.flush();
            }
            // The host is gone; the guest's in-flight data has nowhere to go.
            (op::RW, ConnState::Closing) => {}
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, ConnState::Established | ConnState::Closing) => {
                self.pending |= pending::CREDIT_UPDATE;
            }
            (op::SHUTDOWN, ConnState::Closing) => self.kill(),
            (op::SHUTDOWN, ConnState::Established) => {
                let flags = hdr.flags();
                if flags & SHUTDOWN_SEND != 0 {
                    self.peer_shut_send = true;
                }
                if flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    self.close_after_flush = true;
                    self.deadline = Some(Instant::now() + self.timeout);
                }
                self.flush();
            }
            // REQUEST on a live connection, RESPONSE out of turn, unknown op.
            _ => self.kill(),
        }
    }

    /// Writes buffered guest data to the host stream, as much as it takes.
    pub fn flush(&mut self) {
        if !matches!(self.state, ConnState::Established | ConnState::Closing) {
            return;
        }
        while !self.reply.is_empty() {
            match (&self.stream).write(&self.reply) {
                Ok(0) => return self.kill(),
                Ok(n) => {
                    self.reply.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.kill(),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return self.kill(),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    // n <= CONN_TX_BUF_SIZE, so it fits a u32.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.kill(),
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= pending::CREDIT_UPDATE;
        }
        if self.tx_buf.is_empty() {
            if self.close_after_flush {
                self.kill();
            } else if self.peer_shut_send {
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
    }

    /// The stream is readable (or hung up): fetch data when the guest has room.
    pub fn on_readable(&mut self) {
        if self.state == ConnState::Established {
            self.pending |= pending::RW;
        }
    }

    /// The guest raised our credit: resume reading a hung-up stream.
    pub fn on_credit(&mut self) {
        if self.hup && self.state == ConnState::Established && self.peer_credit() > 0 {
            self.pending |= pending::RW;
        }
    }

    fn header(&mut self, op: u16) -> PacketHeader {
        let mut h = PacketHeader::default();
        h.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(self.key.local_port)
            .set_dst_port(self.key.peer_port)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_buf_alloc(CONN_TX_BUF_SIZE)
            .set_fwd_cnt(self.fwd_cnt);
        self.last_fwd_cnt_sent = self.fwd_cnt;
        h
    }

    /// The next packet for the guest, payload into `data`.
    pub fn recv_pkt(&mut self, data: &mut [u8]) -> Option<(PacketHeader, usize)> {
        loop {
            let p = self.pending;
            if p == 0 {
                return None;
            }
            let bit = p & p.wrapping_neg();
            self.pending &= !bit;
            match bit {
                pending::RST => return Some((self.header(op::RST), 0)),
                pending::REQUEST => return Some((self.header(op::REQUEST), 0)),
                pending::RESPONSE => return Some((self.header(op::RESPONSE), 0)),
                pending::SHUTDOWN => {
                    let mut h = self.header(op::SHUTDOWN);
                    h.set_flags(self.shutdown_flags);
                    return Some((h, 0));
                }
                pending::CREDIT_UPDATE => return Some((self.header(op::CREDIT_UPDATE), 0)),
                pending::CREDIT_REQUEST => return Some((self.header(op::CREDIT_REQUEST), 0)),
                pending::RW => {
                    if self.state != ConnState::Established {
                        continue;
                    }
                    let credit = self.peer_credit() as usize;
                    let max = data.len().min(credit);
                    if max == 0 {
                        // Stalled on the guest's credit: ask for an update.
                        self.pending |= pending::CREDIT_REQUEST;
                        continue;
                    }
                    match (&self.stream).read(&mut data[..max]) {
                        Ok(0) if self.hup => {
                            // The host is gone both ways.
                            self.state = ConnState::Closing;
                            self.deadline = Some(Instant::now() + self.timeout);
                            self.shutdown_flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                            self.pending |= pending::SHUTDOWN;
                        }
                        Ok(0) => {
                            // Half-close: the host sends no more but may
                            // still read what the guest has to say.
                            if !self.host_eof {
                                self.host_eof = true;
                                self.shutdown_flags = SHUTDOWN_SEND;
                                self.pending |= pending::SHUTDOWN;
                            }
                        }
                        Ok(n) => {
                            // n <= MAX_PKT_DATA, so it fits a u32.
                            self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                            if self.peer_credit() == 0 {
                                // Out of guest credit: ask for an update
                                // rather than wait for the guest to offer one.
                                self.pending |= pending::CREDIT_REQUEST;
                            } else if self.hup {
                                // No epoll wakeups any more: keep draining by reading.
                                self.pending |= pending::RW;
                            }
                            let mut h = self.header(op::RW);
                            h.set_len(n as u32);
                            return Some((h, n));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                            self.pending |= pending::RW;
                        }
                        Err(_) => self.kill(),
                    }
                }
                _ => {}
            }
        }
    }
}
