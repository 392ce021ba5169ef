//! The 16550A UART (vm-superio) as a port-I/O bus device: the guest console.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the serial IRQ by writing an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an eventfd.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// The eventfd to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART's output: the configured file or stdout.
pub type SerialOut = Box<dyn Write + Send>;

/// The serial console on the PIO bus (8 registers at 0x3f8).
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>,
    /// Output errors are counted, not logged per byte.
    pub output_errors: u64,
}

impl SerialDevice {
    /// A UART writing to `out`, interrupting through `irq`.
    pub fn new(irq: EventFdTrigger, out: SerialOut) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
            output_errors: 0,
        }
    }

    /// The IRQ eventfd.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.serial.interrupt_evt().eventfd()
    }

    /// Flushes the output.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match u8::try_from(offset) {
            Ok(off) if off < 8 => self.serial.read(off),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if off < 8 && self.serial.write(off, value).is_err() {
            self.output_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_survives_odd_accesses() {
        let out = Shared::default();
        let irq = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut dev = SerialDevice::new(irq, Box::new(out.clone()));
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        // Empty and oversized accesses, offsets past the UART: ignored.
        dev.write(0, &[]);
        dev.write(1 << 40, b"x");
        let mut empty = [];
        dev.read(0, &mut empty);
        let mut lsr = [0u8; 4];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
    }
}
