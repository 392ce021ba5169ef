//! The MMIO and port-I/O buses: address ranges mapped to devices.
//!
//! A vCPU exit names an address; the bus finds the device whose range holds
//! it and hands the access over with the offset from the device's base.
//! Ranges never overlap (checked at insert), so lookup is one ordered-map
//! search.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on the MMIO or port-I/O bus; `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from placing devices on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

/// A shared device on a bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct BusEntry {
    len: u64,
    device: SharedBusDevice,
}

/// Address ranges mapped to devices; used for both MMIO and PIO.
#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by base address.
    devices: BTreeMap<u64, BusEntry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(b, e)| (b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`; refuses empty, wrapping or overlapping ranges.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        // The closest device below `end` is the only one that can overlap.
        if let Some((&other, entry)) = self.devices.range(..end).next_back() {
            if other + entry.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.devices.insert(base, BusEntry { len, device });
        Ok(())
    }

    /// Removes the device based at `base`, if any.
    pub fn remove(&mut self, base: u64) -> Option<SharedBusDevice> {
        self.devices.remove(&base).map(|e| e.device)
    }

    /// The device whose range holds `addr`, with `addr`'s offset in it.
    pub fn resolve(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((offset, &entry.device))
    }

    /// Reads from the device at `addr`; false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                // A device that panicked while locked is poisoned; keep serving
                // it rather than taking the whole VMM down with it.
                let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
                dev.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Number of devices on the bus.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// True when no device is on the bus.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access so tests see offsets.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn insert_refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x1000, 0x1000).unwrap();
        bus.insert(dev(), 0x3000, 0x1000).unwrap();
        // Touching ranges are fine.
        bus.insert(dev(), 0x2000, 0x1000).unwrap();
        bus.insert(dev(), 0x0fff, 1).unwrap();
        for (base, len) in [(0x1800, 0x10), (0x0f00, 0x200), (0x3fff, 2), (0, 0x10000)] {
            assert!(
                matches!(bus.insert(dev(), base, len), Err(BusError::Overlap { .. })),
                "{base:#x}+{len:#x}"
            );
        }
        assert_eq!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
        assert!(matches!(
            bus.insert(dev(), 0x9000, 0),
            Err(BusError::BadRange { .. })
        ));
        assert_eq!(bus.len(), 4);
    }

    #[test]
    fn lookup_passes_offsets() {
        let mut bus = Bus::new();
        let a = dev();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(a.lock().unwrap().last_write, Some((0, vec![0x41])));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0x3f7, &[1]));
        assert!(bus.remove(0x3f8).is_some());
        assert!(!bus.write(0x3f8, &[1]));
        assert!(bus.is_empty());
    }
}
