//! Plumbing every virtio device shares: features, activation, the queues
//! once active, NEEDS_RESET on a malformed queue.

use std::fmt::Display;
use std::io;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::log_limit::{LogLimiter, guest_warn};
use super::queue::VirtQueue;
use super::{ActivateError, Activation, Interrupt};

/// Epoll data token of the activation EventFd (queue events use their index).
pub const TOKEN_ACTIVATE: u32 = 0x100;
/// First epoll data token a device may use for its backend fds.
pub const TOKEN_BACKEND: u32 = 0x200;

/// Most chains one queue event handles before yielding the event loop to
/// other devices (a guest adding chains as fast as they are consumed could
/// otherwise hold the loop forever). The rest is picked up by re-signalling.
pub const MAX_CHAINS_PER_EVENT: usize = 256;

/// An activated device's queues and memory.
#[derive(Debug)]
pub struct Active {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, by index.
    pub queues: Vec<VirtQueue>,
}

/// State shared by all virtio devices.
#[derive(Debug)]
pub struct DeviceState {
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Interrupt line and transport-visible status.
    pub interrupt: Arc<Interrupt>,
    /// Written on activation so the event handler (re)registers the queue fds.
    pub activate_evt: EventFd,
    /// Queue notification fds, kept from the first activation: later
    /// activations deliver duplicates of the same eventfds, and keeping the
    /// first set keeps the epoll registration valid across driver resets.
    pub queue_evts: Vec<EventFd>,
    /// Whether `queue_evts` are registered with the event loop.
    pub queue_evts_registered: bool,
    /// The running device, `None` before DRIVER_OK and after reset.
    pub active: Option<Active>,
    /// Set when a queue turned out malformed; cleared by reset.
    pub broken: bool,
    /// Limits guest-triggered log lines.
    pub log: LogLimiter,
}

impl DeviceState {
    /// A device offering `avail_features`.
    pub fn new(avail_features: u64) -> io::Result<Self> {
        Ok(Self {
            avail_features,
            acked_features: 0,
            interrupt: Arc::new(Interrupt::new()?),
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            queue_evts: Vec::new(),
            queue_evts_registered: false,
            active: None,
            broken: false,
            log: LogLimiter::new(),
        })
    }

    /// Takes the queues from the transport and wakes the event handler.
    pub fn activate(
        &mut self,
        activation: Activation,
        queue_count: usize,
    ) -> Result<(), ActivateError> {
        if activation.queues.len() != queue_count || activation.queue_evts.len() != queue_count {
            return Err(ActivateError::QueueCount {
                expected: queue_count,
                got: activation.queues.len(),
            });
        }
        if self.queue_evts.is_empty() {
            self.queue_evts = activation.queue_evts;
        }
        self.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues.into_iter().map(VirtQueue::new).collect(),
        });
        self.broken = false;
        self.activate_evt.write(1).map_err(ActivateError::EventFd)
    }

    /// Forgets queues and negotiated features.
    pub fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.acked_features = 0;
    }

    /// Whether the device should process its queues.
    pub fn is_running(&self) -> bool {
        self.active.is_some() && !self.broken
    }

    /// The device found a malformed queue: stop, and tell the driver NEEDS_RESET.
    pub fn fail(&mut self, device: &str, err: &dyn Display) {
        guest_warn!(
            self.log,
            "{device}: malformed virtqueue, device needs reset: {err}"
        );
        self.broken = true;
        if let Err(e) = self.interrupt.set_needs_reset() {
            guest_warn!(
                self.log,
                "{device}: cannot raise NEEDS_RESET interrupt: {e}"
            );
        }
    }

    /// Re-signals queue `index` so the event loop comes back to it later.
    pub fn reschedule(&mut self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            if let Err(e) = evt.write(1) {
                guest_warn!(self.log, "cannot reschedule queue: {e}");
            }
        }
    }

    /// Raises the used-buffer interrupt, logging (rate-limited) on failure.
    pub fn signal_used(&mut self, device: &str) {
        if let Err(e) = self.interrupt.signal_used_queue() {
            guest_warn!(
                self.log,
                "{device}: cannot raise used-buffer interrupt: {e}"
            );
        }
    }
}

impl DeviceState {
    /// Handles the activation event: registers the queue EventFds with the
    /// event loop (once; they survive resets). Returns whether the device
    /// is now running.
    pub fn on_activate(&mut self, device: &str, ops: &mut event_manager::EventOps) -> bool {
        let _ = self.activate_evt.read();
        if !self.queue_evts_registered {
            for (i, evt) in self.queue_evts.iter().enumerate() {
                let token = u32::try_from(i).unwrap_or(u32::MAX);
                if let Err(e) = ops.add(event_manager::Events::with_data(
                    evt,
                    token,
                    event_manager::EventSet::IN,
                )) {
                    // Without its queue events the device would look alive
                    // and never answer: tell the driver instead.
                    self.fail(device, &format!("cannot register queue eventfd: {e:?}"));
                    return false;
                }
            }
            self.queue_evts_registered = true;
        }
        self.is_running()
    }

    /// Registers the activation EventFd (from `MutEventSubscriber::init`).
    pub fn register_activate(&self, device: &str, ops: &mut event_manager::EventOps) {
        if let Err(e) = ops.add(event_manager::Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            event_manager::EventSet::IN,
        )) {
            crate::log::error!("{device}: cannot register activation eventfd: {e:?}");
        }
    }

    /// Drains queue `index`'s notification; returns whether to process it.
    pub fn on_queue_event(&mut self, index: usize) -> bool {
        if let Some(evt) = self.queue_evts.get(index) {
            let _ = evt.read();
        }
        self.is_running()
    }
}
