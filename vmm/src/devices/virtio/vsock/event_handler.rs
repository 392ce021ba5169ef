//! Drives the vsock device from the VMM's epoll loop: the three queue
//! EventFds plus the backend's own epoll fd.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;
use super::{EVQ, RXQ, TXQ, VsockBackend};
use crate::devices::virtio::device_state::{TOKEN_ACTIVATE, TOKEN_BACKEND};

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let (tx, rx) = match events.data() {
            TOKEN_ACTIVATE => {
                let run = self.state.on_activate("vsock", ops);
                (run, run)
            }
            TOKEN_BACKEND => {
                // Host I/O happens even while the driver is not running, so
                // handshakes time out and level-triggered fds are consumed.
                self.backend.notify();
                (false, self.state.is_running())
            }
            t if t as usize == RXQ => (false, self.state.on_queue_event(RXQ)),
            t if t as usize == TXQ => {
                let run = self.state.on_queue_event(TXQ);
                (run, run)
            }
            t if t as usize == EVQ => {
                // The event queue only matters for live migration, which
                // this VMM does not do: its buffers are left alone.
                let _ = self.state.on_queue_event(EVQ);
                (false, false)
            }
            _ => (false, false),
        };
        if tx {
            self.process_tx();
        }
        if rx {
            self.process_rx();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate("vsock", ops);
        if let Err(e) = ops.add(Events::with_data(
            &self.backend,
            TOKEN_BACKEND,
            EventSet::IN,
        )) {
            crate::log::error!("vsock: cannot register backend fd: {e:?}");
        }
    }
}
