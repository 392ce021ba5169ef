//! The vmpod VMM: one process, one KVM microVM.
pub mod arch;
pub mod bus;
pub mod config;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod machine;
pub mod metrics;
pub mod seccomp;
pub mod vcpu;

pub use devices::builder::run_with_devices;
pub use machine::run;
pub use vcpu::VmExitReason;
