//! Sandbox backends: what runs a pod on the host (an agent process in
//! namespaces) or in a VM (QEMU or vmpod's own VMM), and the host pieces
//! they share (cgroups, the virtio-fs share).

pub mod cgroups;
pub mod host;
pub mod shared_fs;
