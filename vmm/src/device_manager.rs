//! The DeviceManager owns the buses, the MMIO and GSI allocators and the
//! device declarations for the kernel command line.
//!
//! Adding a virtio-mmio device is one generic call,
//! [`DeviceManager::add_virtio_mmio_device`]: allocate a 4 KiB window and a
//! GSI, wire the device's eventfds into KVM (irqfd for its interrupt,
//! ioeventfds on QueueNotify for its queues), put it on the MMIO bus and in
//! the event loop, and declare it as `virtio_mmio.device=4K@<base>:<gsi>`.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::arch::{IOAPIC_PINS, MMIO_GAP_START};
use super::bus::{Bus, BusDevice, BusError};
use super::devices::legacy::serial::SerialOut;
use super::devices::legacy::{EventFdTrigger, I8042Device, SerialDevice};

/// The event loop's subscriber type.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The VMM's event loop.
pub type VmmEventManager = EventManager<Subscriber>;

/// Size of one virtio-mmio window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify in a virtio-mmio window.
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// First GSI for virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// The serial console.
pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_GSI: u32 = 4;
/// The i8042 (0x60-0x64).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_GSI: u32 = 1;
/// The end of the virtio-mmio area: the IOAPIC sits above it.
const MMIO_END: u64 = super::arch::IOAPIC_START;

/// What a virtio-mmio transport gives the device manager: the bus device
/// itself and the eventfds to wire into KVM. The devices branch implements
/// this for `devices::virtio::MmioTransport`.
pub trait VirtioMmioDevice: BusDevice {
    /// One eventfd per queue, in queue order; KVM writes queue i's when the
    /// guest writes i to QueueNotify.
    fn queue_events(&self) -> Vec<EventFd>;
    /// The eventfd that raises the device's interrupt.
    fn interrupt_evt(&self) -> &EventFd;
}

/// Errors from setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("no MMIO space left for another virtio device")]
    MmioSpaceExhausted,
    #[error("no IOAPIC pin left for another device (GSI {0})")]
    GsisExhausted(u32),
    #[error("placing a device on the bus")]
    Bus(#[from] BusError),
    #[error("registering {what} with KVM")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Where a virtio-mmio device landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base of the 4 KiB window.
    pub base: u64,
    /// The IOAPIC pin (GSI) of its interrupt.
    pub gsi: u32,
}

impl MmioSlot {
    /// The kernel command-line declaration of this device.
    pub fn cmdline_arg(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.gsi)
    }
}

/// What the device manager needs from KVM; a trait so the allocation and
/// wiring logic is tested without /dev/kvm.
pub trait IrqRegistrar {
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl IrqRegistrar for VmFd {
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, evt, gsi)
    }
    fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_ioevent(self, evt, &IoEventAddress::Mmio(addr), datamatch)
    }
}

/// The buses, allocators and legacy devices of one VM.
pub struct DeviceManager {
    /// virtio-mmio windows.
    pub mmio_bus: Bus,
    /// Legacy ports (serial, i8042).
    pub pio_bus: Bus,
    next_mmio: u64,
    next_gsi: u32,
    cmdline: Vec<String>,
    /// The console, once added.
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    /// The i8042, once added (reset, Ctrl-Alt-Del).
    pub i8042: Option<Arc<Mutex<I8042Device>>>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceManager {
    /// An empty device manager.
    pub fn new() -> Self {
        DeviceManager {
            mmio_bus: Bus::new(),
            pio_bus: Bus::new(),
            next_mmio: MMIO_GAP_START,
            next_gsi: FIRST_VIRTIO_GSI,
            cmdline: Vec::new(),
            serial: None,
            i8042: None,
        }
    }

    /// Kernel command-line arguments declaring the devices added so far.
    pub fn cmdline_args(&self) -> &[String] {
        &self.cmdline
    }

    /// The serial console (0x3f8, IRQ 4) and the i8042 (0x60, IRQ 1) whose
    /// reset command writes `reset_evt`.
    pub fn add_legacy_devices(
        &mut self,
        vm: &dyn IrqRegistrar,
        serial_out: SerialOut,
        reset_evt: EventFd,
    ) -> Result<(), DeviceManagerError> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd);
        let serial = SerialDevice::new(EventFdTrigger::new(evt()?), serial_out);
        vm.register_irqfd(serial.interrupt_evt(), SERIAL_GSI)
            .map_err(|source| DeviceManagerError::Kvm {
                what: "the serial irqfd",
                source,
            })?;
        let serial = Arc::new(Mutex::new(serial));
        self.pio_bus.insert(serial.clone(), SERIAL_PORT, 8)?;
        self.serial = Some(serial);

        let i8042 = I8042Device::new(reset_evt, evt()?);
        vm.register_irqfd(i8042.kbd_interrupt_evt(), I8042_GSI)
            .map_err(|source| DeviceManagerError::Kvm {
                what: "the i8042 irqfd",
                source,
            })?;
        let i8042 = Arc::new(Mutex::new(i8042));
        self.pio_bus.insert(i8042.clone(), I8042_PORT, 5)?;
        self.i8042 = Some(i8042);
        Ok(())
    }

    fn allocate(&mut self) -> Result<MmioSlot, DeviceManagerError> {
        if self.next_gsi >= u32::from(IOAPIC_PINS) {
            return Err(DeviceManagerError::GsisExhausted(self.next_gsi));
        }
        let base = self.next_mmio;
        if base + MMIO_WINDOW > MMIO_END {
            return Err(DeviceManagerError::MmioSpaceExhausted);
        }
        Ok(MmioSlot {
            base,
            gsi: self.next_gsi,
        })
    }

    /// Adds a virtio-mmio device: see the module docs. `subscriber` is the
    /// device's event handler (queue eventfds, backend fds) for the event loop.
    pub fn add_virtio_mmio_device<D: VirtioMmioDevice + 'static>(
        &mut self,
        vm: &dyn IrqRegistrar,
        event_manager: Option<&mut VmmEventManager>,
        device: Arc<Mutex<D>>,
        subscriber: Option<Subscriber>,
    ) -> Result<MmioSlot, DeviceManagerError> {
        let slot = self.allocate()?;
        {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            vm.register_irqfd(dev.interrupt_evt(), slot.gsi)
                .map_err(|source| DeviceManagerError::Kvm {
                    what: "a virtio irqfd",
                    source,
                })?;
            for (queue, evt) in dev.queue_events().iter().enumerate() {
                vm.register_ioevent(evt, slot.base + VIRTIO_MMIO_QUEUE_NOTIFY, queue as u32)
                    .map_err(|source| DeviceManagerError::Kvm {
                        what: "a virtio queue ioeventfd",
                        source,
                    })?;
            }
        }
        self.mmio_bus.insert(device, slot.base, MMIO_WINDOW)?;
        if let (Some(em), Some(sub)) = (event_manager, subscriber) {
            em.add_subscriber(sub);
        }
        self.next_mmio += MMIO_WINDOW;
        self.next_gsi += 1;
        self.cmdline.push(slot.cmdline_arg());
        Ok(slot)
    }
}

/// Fakes for tests: a virtio-mmio device and a KVM that records registrations.
#[cfg(test)]
pub mod test_utils {
    use super::*;
    use std::cell::RefCell;

    /// A virtio-mmio "device" that answers its magic value and records writes.
    pub struct FakeVirtioDevice {
        pub queues: Vec<EventFd>,
        pub irq: EventFd,
        pub writes: Vec<(u64, Vec<u8>)>,
    }

    impl FakeVirtioDevice {
        pub fn new(queues: usize) -> Self {
            FakeVirtioDevice {
                queues: (0..queues)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                writes: Vec::new(),
            }
        }
    }

    impl BusDevice for FakeVirtioDevice {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(b"virt");
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    impl VirtioMmioDevice for FakeVirtioDevice {
        fn queue_events(&self) -> Vec<EventFd> {
            self.queues.iter().map(|e| e.try_clone().unwrap()).collect()
        }
        fn interrupt_evt(&self) -> &EventFd {
            &self.irq
        }
    }

    /// Records irqfd and ioeventfd registrations.
    #[derive(Default)]
    pub struct FakeKvm {
        pub irqfds: RefCell<Vec<u32>>,
        pub ioevents: RefCell<Vec<(u64, u32)>>,
    }

    impl IrqRegistrar for FakeKvm {
        fn register_irqfd(&self, _: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            self.irqfds.borrow_mut().push(gsi);
            Ok(())
        }
        fn register_ioevent(
            &self,
            _: &EventFd,
            addr: u64,
            datamatch: u32,
        ) -> Result<(), kvm_ioctls::Error> {
            self.ioevents.borrow_mut().push((addr, datamatch));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::*;
    use super::*;

    #[test]
    fn virtio_devices_get_windows_gsis_and_cmdline() {
        let kvm = FakeKvm::default();
        let mut dm = DeviceManager::new();
        let a = Arc::new(Mutex::new(FakeVirtioDevice::new(2)));
        let b = Arc::new(Mutex::new(FakeVirtioDevice::new(1)));
        let sa = dm
            .add_virtio_mmio_device(&kvm, None, a.clone(), None)
            .unwrap();
        let sb = dm.add_virtio_mmio_device(&kvm, None, b, None).unwrap();
        assert_eq!(
            sa,
            MmioSlot {
                base: 0xd000_0000,
                gsi: 5
            }
        );
        assert_eq!(
            sb,
            MmioSlot {
                base: 0xd000_1000,
                gsi: 6
            }
        );
        assert_eq!(*kvm.irqfds.borrow(), vec![5, 6]);
        assert_eq!(
            *kvm.ioevents.borrow(),
            vec![(0xd000_0050, 0), (0xd000_0050, 1), (0xd000_1050, 0)]
        );
        assert_eq!(
            dm.cmdline_args(),
            [
                "virtio_mmio.device=4K@0xd0000000:5",
                "virtio_mmio.device=4K@0xd0001000:6"
            ]
        );
        // The bus routes with offsets relative to the window.
        let mut magic = [0u8; 4];
        assert!(dm.mmio_bus.read(0xd000_0000, &mut magic));
        assert_eq!(&magic, b"virt");
        assert!(dm.mmio_bus.write(0xd000_0070, &[1, 0, 0, 0]));
        assert_eq!(a.lock().unwrap().writes, vec![(0x70, vec![1, 0, 0, 0])]);
    }

    #[test]
    fn gsis_run_out_cleanly() {
        let kvm = FakeKvm::default();
        let mut dm = DeviceManager::new();
        let mut added = 0;
        let err = loop {
            match dm.add_virtio_mmio_device(
                &kvm,
                None,
                Arc::new(Mutex::new(FakeVirtioDevice::new(1))),
                None,
            ) {
                Ok(_) => added += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(added, 24 - 5);
        assert!(matches!(err, DeviceManagerError::GsisExhausted(24)));
        assert_eq!(dm.cmdline_args().len(), added);
    }

    #[test]
    fn legacy_devices_on_the_pio_bus() {
        let kvm = FakeKvm::default();
        let mut dm = DeviceManager::new();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        dm.add_legacy_devices(&kvm, Box::new(std::io::sink()), reset.try_clone().unwrap())
            .unwrap();
        assert_eq!(*kvm.irqfds.borrow(), vec![SERIAL_GSI, I8042_GSI]);
        assert!(dm.pio_bus.write(0x64, &[0xfe]));
        assert_eq!(reset.read().unwrap(), 1);
        let mut lsr = [0u8];
        assert!(dm.pio_bus.read(0x3fd, &mut lsr));
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
