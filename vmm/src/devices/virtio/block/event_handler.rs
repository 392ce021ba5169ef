//! Drives a block slot from the VMM's epoll loop.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::Block;
use crate::devices::virtio::device_state::TOKEN_ACTIVATE;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let run = match events.data() {
            TOKEN_ACTIVATE => self.state.on_activate("block", ops),
            0 => self.state.on_queue_event(0),
            _ => false,
        };
        if run {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate("block", ops);
    }
}
