//! Drives the entropy device from the VMM's epoll loop.

use std::sync::atomic::Ordering;

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::{RNG_QUEUE, Rng};
use crate::devices::virtio::device_state::TOKEN_ACTIVATE;

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let run = match events.data() {
            // Requests may already be queued from before DRIVER_OK.
            TOKEN_ACTIVATE => self.state.on_activate("rng", ops),
            token if token as usize == RNG_QUEUE => {
                self.rng_metrics()
                    .queue_events
                    .fetch_add(1, Ordering::Relaxed);
                self.state.on_queue_event(RNG_QUEUE)
            }
            _ => false,
        };
        if run {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate("rng", ops);
    }
}
