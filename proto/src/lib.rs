//! The vmpod agent API.
//!
//! The daemon talks to the agent (PID 1 of a pod VM, or a host process for
//! the host sandbox backend) with this gRPC service over hybrid vsock or a
//! unix socket. The package is versioned: `vmpod.agent.v1` only ever grows
//! compatibly; a breaking change is a new package.

/// Version 1 of the agent API.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("vmpod.agent.v1");
}

/// The vsock port the agent listens on inside a guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The line the agent prints on its console once it serves the API. The
/// VMM, the QEMU launcher and the tests wait for it.
pub const READY_LINE_PREFIX: &str = "vmpod-agent: ready";

/// The virtio-fs tag of a pod VM's shared directory (the host runs one
/// virtiofsd per pod; the agent mounts the tag at boot).
pub const SHARED_FS_TAG: &str = "vmpod";

/// A mount or rootfs source `shared:<relative path>` names a file or
/// directory inside the pod's virtio-fs share; the agent maps it to its
/// mount point of the share.
pub const SHARED_SOURCE_PREFIX: &str = "shared:";
