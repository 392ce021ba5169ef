//! Drives the virtio-fs device from the VMM's epoll loop: the backend's
//! call eventfds become guest interrupts; its socket hanging up means the
//! backend is gone. (Not readability: the replies the device waits for at
//! start and stop arrive on that socket too.)
//!
//! The queue-notify eventfds are not registered here: the backend reads them.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::{Fs, FsError, NUM_QUEUES};
use crate::devices::virtio::device_state::TOKEN_BACKEND;

/// Token of the backend's socket; the call eventfds use TOKEN_BACKEND + queue.
const TOKEN_SOCKET: u32 = TOKEN_BACKEND + 0x10;

impl MutEventSubscriber for Fs {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_SOCKET => {
                // Level-triggered: stop watching, or the loop would spin.
                let _ = ops.remove(events);
                self.backend_failed(&FsError::Disconnected);
            }
            token => {
                let index = token.wrapping_sub(TOKEN_BACKEND) as usize;
                if index < NUM_QUEUES {
                    self.relay_call(index);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, call) in self.calls.iter().enumerate() {
            let token = TOKEN_BACKEND + i as u32;
            if let Err(e) = ops.add(Events::with_data(call, token, EventSet::IN)) {
                // The device would look alive and never interrupt: refuse to run.
                crate::log::error!("virtio-fs: cannot register call eventfd {i}: {e:?}");
                self.backend_gone = true;
            }
        }
        if let Some(fd) = self.backend.watch_fd() {
            let set = EventSet::READ_HANG_UP;
            if let Err(e) = ops.add(Events::with_data(&fd, TOKEN_SOCKET, set)) {
                crate::log::error!("virtio-fs: cannot watch the backend socket: {e:?}");
            }
        }
    }
}
