//! Devices the VMM emulates: legacy PC devices here; the virtio-mmio
//! transport and virtio devices in `virtio/` (added with the devices branch).

pub mod legacy;
