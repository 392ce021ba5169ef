//! The vmpod VMM: one KVM microVM per process.

pub mod bus;
pub mod devices;
