//! Legacy PC devices on the port-I/O bus: the 16550 serial console, the
//! i8042 controller (reset and Ctrl-Alt-Del) and cheap answers for the
//! ports a booting kernel pokes but that need no emulation.

pub mod i8042;
pub mod serial;

pub use i8042::I8042Device;
pub use serial::{EventFdTrigger, SerialDevice};
