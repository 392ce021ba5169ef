//! A minimal i8042 keyboard controller: enough for Linux's i8042 driver to
//! probe quickly (self-test, command byte, keyboard acks), the CPU reset
//! line (command 0xFE, what `reboot=k` uses) and Ctrl-Alt-Del injection for
//! a graceful shutdown request.
//!
//! Ports: 0x60 data (offset 0), 0x64 status/command (offset 4).

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_RESET_CPU: u8 = 0xfe;

const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;
/// Set-2 make codes: Ctrl, Alt, Del (extended).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
/// Bounds the output buffer: a guest cannot grow it.
const BUF_CAP: usize = 16;

/// The i8042 on the PIO bus.
pub struct I8042Device {
    reset_evt: EventFd,
    kbd_irq: EventFd,
    status: u8,
    control: u8,
    outp: u8,
    /// The command waiting for its data byte on port 0x60.
    pending_cmd: Option<u8>,
    buf: VecDeque<u8>,
}

impl I8042Device {
    /// `reset_evt` is written when the guest resets the CPU; `kbd_irq` raises IRQ 1.
    pub fn new(reset_evt: EventFd, kbd_irq: EventFd) -> Self {
        I8042Device {
            reset_evt,
            kbd_irq,
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            pending_cmd: None,
            buf: VecDeque::with_capacity(BUF_CAP),
        }
    }

    /// The keyboard IRQ eventfd (register as irqfd on GSI 1).
    pub fn kbd_interrupt_evt(&self) -> &EventFd {
        &self.kbd_irq
    }

    /// Types Ctrl-Alt-Del: the guest kernel restarts (or signals init).
    pub fn trigger_ctrl_alt_del(&mut self) -> std::io::Result<()> {
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.kbd_irq.write(1)
    }

    fn push(&mut self, b: u8) {
        if self.buf.len() < BUF_CAP {
            self.buf.push_back(b);
        }
        self.status |= SB_OUT_DATA_AVAIL;
    }

    fn push_and_interrupt(&mut self, b: u8) {
        self.push(b);
        if self.control & CB_KBD_INT != 0 {
            let _ = self.kbd_irq.write(1);
        }
    }

    fn pop(&mut self) -> u8 {
        let b = self.buf.pop_front().unwrap_or(0);
        if self.buf.is_empty() {
            self.status &= !SB_OUT_DATA_AVAIL;
        }
        b
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            OFFSET_COMMAND => self.status,
            OFFSET_DATA => self.pop(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            OFFSET_COMMAND => {
                self.status |= SB_I8042_CMD_DATA;
                match value {
                    CMD_RESET_CPU => {
                        // Failing to signal leaves the guest spinning in its reset loop;
                        // nothing better to do from a vCPU thread.
                        let _ = self.reset_evt.write(1);
                    }
                    CMD_READ_CTR => {
                        self.buf.clear();
                        self.push(self.control);
                    }
                    CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_cmd = Some(value),
                    CMD_READ_OUTP => {
                        self.buf.clear();
                        self.push(self.outp);
                    }
                    CMD_SELF_TEST => {
                        self.buf.clear();
                        self.push(0x55);
                    }
                    CMD_KBD_TEST => {
                        self.buf.clear();
                        self.push(0x00);
                    }
                    CMD_KBD_DISABLE => self.control |= 0x10,
                    CMD_KBD_ENABLE => self.control &= !0x10,
                    _ => {}
                }
            }
            OFFSET_DATA => {
                self.status &= !SB_I8042_CMD_DATA;
                match self.pending_cmd.take() {
                    Some(CMD_WRITE_CTR) => self.control = value,
                    Some(_) => self.outp = value,
                    None => {
                        // A command to the keyboard itself.
                        self.buf.clear();
                        self.push_and_interrupt(KBD_ACK);
                        if value == 0xff {
                            self.push_and_interrupt(KBD_RESET_OK);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> I8042Device {
        I8042Device::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
    }

    fn rd(d: &mut I8042Device, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_vmm() {
        let mut d = dev();
        assert!(d.reset_evt.read().is_err(), "nothing signalled yet");
        d.write(OFFSET_COMMAND, &[0xfe]);
        assert_eq!(d.reset_evt.read().unwrap(), 1);
    }

    #[test]
    fn self_test_and_command_byte() {
        let mut d = dev();
        d.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        assert_ne!(rd(&mut d, OFFSET_COMMAND) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(rd(&mut d, OFFSET_DATA), 0x55);
        assert_eq!(rd(&mut d, OFFSET_COMMAND) & SB_OUT_DATA_AVAIL, 0);
        d.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        d.write(OFFSET_DATA, &[0x45]);
        d.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, OFFSET_DATA), 0x45);
    }

    #[test]
    fn ctrl_alt_del_queues_scancodes_and_interrupts() {
        let mut d = dev();
        d.trigger_ctrl_alt_del().unwrap();
        assert_eq!(d.kbd_irq.read().unwrap(), 1);
        let codes: Vec<u8> = (0..4).map(|_| rd(&mut d, OFFSET_DATA)).collect();
        assert_eq!(codes, CTRL_ALT_DEL);
    }

    #[test]
    fn hostile_guest_cannot_grow_the_buffer() {
        let mut d = dev();
        for _ in 0..10_000 {
            d.write(OFFSET_DATA, &[0xff]);
            d.trigger_ctrl_alt_del().unwrap();
        }
        assert!(d.buf.len() <= BUF_CAP);
        d.write(7, &[1]);
        d.write(OFFSET_DATA, &[]);
    }
}
