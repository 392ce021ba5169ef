//! Devices the VMM emulates for its guest.

pub mod virtio;
