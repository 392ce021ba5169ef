//! Pod networking on the host: the pod's network namespace, CNI ADD/DEL in
//! it, and (VM pods) the tap that carries the namespace's eth0 into the
//! guest.

pub mod cni;
pub mod netns;
pub mod tap;
