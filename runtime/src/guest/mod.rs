//! The guest image: the initramfs that carries the agent as `/init`, and the
//! checks that the agent can run there.

pub mod elf;
pub mod initramfs;
