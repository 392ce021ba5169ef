//! Devices the VMM emulates: legacy PC devices in `legacy/`; the virtio-mmio
//! transport and the virtio devices in `virtio/`.

pub mod builder;
pub mod legacy;
pub mod virtio;
