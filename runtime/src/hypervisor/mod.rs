//! Hypervisors a pod VM can run on. `qemu` launches Debian's QEMU microvm
//! (KVM where the host has hardware virtualization, TCG where configured);
//! vmpod's own VMM lands beside it.

pub mod qemu;
