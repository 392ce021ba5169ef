//! The vmpod VMM: one process, one KVM microVM.
pub mod arch;
pub mod bus;
pub mod config;
