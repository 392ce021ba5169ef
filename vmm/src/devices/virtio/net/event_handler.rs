//! Drives the net device from the VMM's epoll loop: two queue EventFds and
//! the tap (edge-triggered, see `process_rx`).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;
use super::{NetBackend, RXQ, TXQ};
use crate::devices::virtio::device_state::{TOKEN_ACTIVATE, TOKEN_BACKEND};

impl<B: NetBackend> MutEventSubscriber for Net<B> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let (tx, rx) = match events.data() {
            TOKEN_ACTIVATE => {
                let run = self.state.on_activate("net", ops);
                (run, run)
            }
            TOKEN_BACKEND => (false, self.state.is_running()),
            t if t as usize == RXQ => (false, self.state.on_queue_event(RXQ)),
            t if t as usize == TXQ => (self.state.on_queue_event(TXQ), false),
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
        self.state.register_activate("net", ops);
        if let Err(e) = ops.add(Events::with_data(
            &self.backend,
            TOKEN_BACKEND,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )) {
            crate::log::error!("net: cannot register tap: {e:?}");
        }
    }
}
