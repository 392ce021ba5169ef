//! The vmpod VMM: one process, one KVM microVM.
//!
//! This crate is everything that faces the guest: KVM, guest memory, the
//! virtio devices and the control socket the daemon drives it through. It
//! depends on the rust-vmm crates, serde and thiserror only; the daemon
//! links it for the configuration and control-protocol types and runs the
//! `vmpod-vmm` binary, one process per pod.
pub mod arch;
pub mod bus;
pub mod config;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod jail;
pub mod log;
pub mod machine;
pub mod metrics;
pub mod probe;
pub mod seccomp;
pub mod vcpu;

pub use devices::builder::run_with_devices;
pub use machine::run;
pub use vcpu::VmExitReason;

/// An error with its whole source chain on one line (`outer: cause: root`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}
