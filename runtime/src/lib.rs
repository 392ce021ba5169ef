//! vmpod: a Kubernetes container runtime (CRI v1) that runs every pod
//! sandbox in its own microVM.
//!
//! This crate is the host side: the guest image tooling, the hypervisor
//! launchers and, as they land, the daemon and the VMM.

pub mod agent_client;
pub mod cri;
pub mod guest;
pub mod hypervisor;
pub mod image;
pub mod vmm;
