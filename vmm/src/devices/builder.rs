//! Builds the virtio devices a VM configuration asks for, puts each behind a
//! virtio-mmio transport on the device manager, and keeps the handles the
//! control socket needs (block slots, per-device counters).
//!
//! Order on the MMIO bus (and so on the kernel command line): rng, vsock,
//! the block slots in slot order, net, fs. The guest finds them by DeviceID
//! (and virtio-fs by its tag), not by position.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use super::virtio::block::{Block, BlockError, DiskFile};
use super::virtio::fs::{Fs, FsError};
use super::virtio::mmio::MmioError;
use super::virtio::net::{Net, NetError};
use super::virtio::rng::{Rng, RngError, Urandom};
use super::virtio::vsock::{Vsock, VsockError};
use super::virtio::{MmioTransport, VirtioDevice};
use crate::config::{VmmConfig, parse_mac};
use crate::control::DeviceControl;
use crate::device_manager::{
    DeviceManager, DeviceManagerError, IrqRegistrar, Subscriber, VirtioMmioDevice, VmmEventManager,
};
use crate::machine::{self, MachineError};
use crate::vcpu::VmExitReason;

/// Errors from building the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error("creating the virtio-rng device")]
    Rng(#[source] RngError),
    #[error("creating the virtio-vsock device")]
    Vsock(#[source] VsockError),
    #[error("creating block slot {slot}")]
    Block {
        slot: usize,
        #[source]
        source: BlockError,
    },
    #[error("creating the virtio-net device")]
    Net(#[source] NetError),
    #[error("creating the virtio-fs device")]
    Fs(#[source] FsError),
    #[error("the net MAC {0:?} is invalid")]
    Mac(String),
    #[error("creating the virtio-mmio transport of {0}")]
    Transport(String, #[source] MmioError),
    #[error("adding {0} to the device manager")]
    DeviceManager(String, #[source] DeviceManagerError),
}

impl VirtioMmioDevice for MmioTransport {
    fn queue_events(&self) -> Vec<vmm_sys_util::eventfd::EventFd> {
        MmioTransport::queue_events(self)
    }

    fn interrupt_evt(&self) -> &vmm_sys_util::eventfd::EventFd {
        MmioTransport::interrupt_evt(self)
    }
}

/// The virtio devices of one VM, as the control socket sees them.
pub struct VirtioDevices {
    /// Block slots, by slot index.
    blocks: Vec<Arc<Mutex<Block>>>,
    /// Every transport with the name its counters are reported under.
    transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
}

impl std::fmt::Debug for VirtioDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.transports.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("VirtioDevices")
            .field("devices", &names)
            .finish()
    }
}

/// Puts `device` (also the event-loop subscriber) behind a transport and on the bus.
fn add<D>(
    vm: &dyn IrqRegistrar,
    dm: &mut DeviceManager,
    em: &mut VmmEventManager,
    mem: &GuestMemoryMmap,
    name: String,
    device: Arc<Mutex<D>>,
) -> Result<(String, Arc<Mutex<MmioTransport>>), BuilderError>
where
    D: VirtioDevice + event_manager::MutEventSubscriber + Send + 'static,
{
    let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
    let transport = MmioTransport::new(mem.clone(), as_virtio)
        .map_err(|e| BuilderError::Transport(name.clone(), e))?;
    let transport = Arc::new(Mutex::new(transport));
    let subscriber: Subscriber = device;
    dm.add_virtio_mmio_device(vm, Some(em), transport.clone(), Some(subscriber))
        .map_err(|e| BuilderError::DeviceManager(name.clone(), e))?;
    Ok((name, transport))
}

impl VirtioDevices {
    /// Creates the devices `config` asks for (rng always) and adds them to `dm`.
    pub fn build(
        config: &VmmConfig,
        vm: &dyn IrqRegistrar,
        dm: &mut DeviceManager,
        em: &mut VmmEventManager,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, BuilderError> {
        let mut transports = Vec::new();
        let rng = Rng::new(Box::new(Urandom::open().map_err(BuilderError::Rng)?))
            .map_err(BuilderError::Rng)?;
        transports.push(add(
            vm,
            dm,
            em,
            mem,
            "rng".into(),
            Arc::new(Mutex::new(rng)),
        )?);
        if let Some(v) = &config.vsock {
            let vsock = Vsock::new_hybrid(u64::from(v.guest_cid), &v.uds_path)
                .map_err(BuilderError::Vsock)?;
            transports.push(add(
                vm,
                dm,
                em,
                mem,
                "vsock".into(),
                Arc::new(Mutex::new(vsock)),
            )?);
        }
        let mut blocks = Vec::new();
        for (slot, b) in config.block.iter().enumerate() {
            let block_err = |source| BuilderError::Block { slot, source };
            let mut block =
                Block::new(&crate::config::block_slot_serial(slot)).map_err(block_err)?;
            if let Some(path) = &b.path {
                block.attach(path, b.read_only).map_err(block_err)?;
            }
            let block = Arc::new(Mutex::new(block));
            transports.push(add(vm, dm, em, mem, format!("block{slot}"), block.clone())?);
            blocks.push(block);
        }
        if let Some(n) = &config.net {
            let mac = parse_mac(&n.mac).ok_or_else(|| BuilderError::Mac(n.mac.clone()))?;
            let net = Net::with_tap(&n.tap, mac).map_err(BuilderError::Net)?;
            transports.push(add(
                vm,
                dm,
                em,
                mem,
                "net".into(),
                Arc::new(Mutex::new(net)),
            )?);
        }
        if let Some(f) = &config.fs {
            // Connects and hands virtiofsd guest memory now, before seccomp
            // (which forbids `connect`) and before any vCPU runs.
            let fs = Fs::vhost_user(f, mem).map_err(BuilderError::Fs)?;
            transports.push(add(vm, dm, em, mem, "fs".into(), Arc::new(Mutex::new(fs)))?);
        }
        Ok(Self { blocks, transports })
    }

    fn block(&self, slot: usize) -> Result<&Arc<Mutex<Block>>, String> {
        self.blocks
            .get(slot)
            .ok_or_else(|| format!("no block slot {slot} (the VM has {})", self.blocks.len()))
    }
}

impl DeviceControl for VirtioDevices {
    fn block_attach(
        &self,
        slot: usize,
        path: &Path,
        read_only: bool,
        file: Option<std::fs::File>,
    ) -> Result<(), String> {
        let disk = match file {
            Some(file) => DiskFile::from_file(file, path, read_only),
            None if crate::jail::is_jailed() => {
                return Err(
                    "a jailed VMM opens no paths: send the disk as a file descriptor".into(),
                );
            }
            None => DiskFile::open(path, read_only),
        }
        .map_err(|e| crate::error_chain(&e))?;
        self.block(slot)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_backend(Some(Box::new(disk)));
        Ok(())
    }

    fn block_detach(&self, slot: usize) -> Result<(), String> {
        self.block(slot)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .detach()
            .map_err(|e| crate::error_chain(&e))
    }

    fn metrics(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, transport) in &self.transports {
            let snapshot = transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .metrics_snapshot();
            let counters: serde_json::Map<String, serde_json::Value> = snapshot
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into()))
                .collect();
            out.insert(name.clone(), counters.into());
        }
        out.into()
    }
}

/// Builds the VM described by `config` with all its virtio devices and runs
/// it until it ends: what `vmpod-vmm` runs.
pub fn run_with_devices(
    config: &VmmConfig,
    started: Instant,
) -> Result<VmExitReason, MachineError> {
    let mut hook = |vm: &VmFd,
                    dm: &mut DeviceManager,
                    em: &mut VmmEventManager,
                    mem: &Arc<GuestMemoryMmap>|
     -> Result<Option<Arc<dyn DeviceControl>>, MachineError> {
        let devices = VirtioDevices::build(config, vm, dm, em, mem)?;
        Ok(Some(Arc::new(devices)))
    };
    machine::run(config, started, Some(&mut hook))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BlockSlotConfig, VsockConfig};
    use crate::device_manager::test_utils::FakeKvm;
    use vm_memory::GuestAddress;

    fn config(dir: &Path, disk: &Path) -> VmmConfig {
        VmmConfig::from_json(r#"{"vcpus":1,"memory_mib":64,"kernel":"k"}"#)
            .map(|mut c| {
                c.vsock = Some(VsockConfig {
                    guest_cid: 3,
                    uds_path: dir.join("vsock.sock"),
                });
                c.block = vec![
                    BlockSlotConfig {
                        path: Some(disk.to_path_buf()),
                        read_only: true,
                    },
                    BlockSlotConfig {
                        path: None,
                        read_only: false,
                    },
                ];
                c
            })
            .unwrap()
    }

    /// virtio-fs needs guest memory the backend can map: with private
    /// memory the build fails up front, naming the problem.
    #[test]
    fn fs_on_private_memory_fails_clearly() {
        let mut cfg = VmmConfig::from_json(r#"{"vcpus":1,"memory_mib":64,"kernel":"k"}"#).unwrap();
        cfg.fs = Some(crate::config::FsConfig {
            socket: "/nonexistent/fs.sock".into(),
            tag: "vmpod".into(),
            queue_size: 256,
        });
        let kvm = FakeKvm::default();
        let mut dm = DeviceManager::new();
        let mut em = VmmEventManager::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let err = VirtioDevices::build(&cfg, &kvm, &mut dm, &mut em, &mem).unwrap_err();
        let chain = crate::error_chain(&err);
        assert!(chain.contains("not shared"), "{chain}");
    }

    #[test]
    fn builds_every_configured_device_and_controls_block_slots() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![7u8; 4096]).unwrap();
        let cfg = config(dir.path(), &disk);
        let kvm = FakeKvm::default();
        let mut dm = DeviceManager::new();
        let mut em = VmmEventManager::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let devices = VirtioDevices::build(&cfg, &kvm, &mut dm, &mut em, &mem).unwrap();

        // rng, vsock, two block slots (the empty one present from boot).
        assert_eq!(dm.cmdline_args().len(), 4, "{:?}", dm.cmdline_args());
        assert_eq!(*kvm.irqfds.borrow(), vec![5, 6, 7, 8]);
        assert!(dir.path().join("vsock.sock").exists());
        let m = devices.metrics();
        for name in ["rng", "vsock", "block0", "block1"] {
            assert!(m[name].is_object(), "{name} missing from {m}");
        }

        let cap = |slot: usize| devices.blocks[slot].lock().unwrap().capacity_bytes();
        assert_eq!((cap(0), cap(1)), (4096, 0));
        let other = dir.path().join("other.img");
        std::fs::write(&other, vec![1u8; 8192]).unwrap();
        devices.block_attach(1, &other, false, None).unwrap();
        assert_eq!(cap(1), 8192);
        // Replacing a full slot works the same way.
        devices.block_attach(0, &other, true, None).unwrap();
        assert_eq!(cap(0), 8192);
        devices.block_detach(1).unwrap();
        assert_eq!(cap(1), 0);
        assert!(devices.block_detach(1).is_err(), "detaching an empty slot");
        assert!(devices.block_attach(2, &other, false, None).is_err());
        let missing = devices
            .block_attach(1, &dir.path().join("missing"), false, None)
            .unwrap_err();
        assert!(missing.contains("missing"), "{missing}");

        // A descriptor the daemon passed instead of a path (what a jailed
        // VMM needs): the path is only its name.
        let third = dir.path().join("third.img");
        std::fs::write(&third, vec![2u8; 12288]).unwrap();
        let ro = std::fs::File::open(&third).unwrap();
        devices
            .block_attach(1, Path::new("/not/opened"), true, Some(ro))
            .unwrap();
        assert_eq!(cap(1), 12288);
        // A writable disk needs a descriptor opened for writing.
        let ro = std::fs::File::open(&third).unwrap();
        let err = devices
            .block_attach(1, Path::new("third.img"), false, Some(ro))
            .unwrap_err();
        assert!(err.contains("opened for writing"), "{err}");
    }
}
