//! Loading the guest for the 64-bit Linux boot protocol
//! (Documentation/arch/x86/boot.rst): the ELF kernel, the initramfs placed
//! high, the command line and the zero page with its e820 map.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{KernelLoader, elf::Elf, load_cmdline};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    CMDLINE_START, EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};

/// Errors from loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the ELF kernel {path}")]
    LoadKernel {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error(
        "the initramfs ({size} bytes) does not fit between the kernel end {kernel_end:#x} and {ram_end:#x}"
    )]
    InitramfsTooLarge {
        size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    #[error("reading the initramfs {path} into guest memory")]
    LoadInitramfs {
        path: String,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the kernel command line is invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("writing the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("writing the zero page")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    #[error("the e820 map needs more than {0} entries")]
    E820Full(usize),
}

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const PAGE_SIZE: u64 = 4096;

/// Where the kernel was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The 64-bit entry point (physical).
    pub entry: u64,
    /// First byte past the kernel image (incl. BSS).
    pub end: u64,
}

/// Loads an ELF kernel (vmlinux or any ELF built the same way) at its physical addresses.
pub fn load_kernel(guest_mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let res = Elf::load(guest_mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(
        |source| BootError::LoadKernel {
            path: path.display().to_string(),
            source,
        },
    )?;
    Ok(LoadedKernel {
        entry: res.kernel_load.raw_value(),
        end: res.kernel_end,
    })
}

/// The top of the RAM below the MMIO gap: where the initramfs goes.
pub fn lowmem_end(memory_bytes: u64) -> u64 {
    memory_bytes.min(MMIO_GAP_START)
}

/// Where an initramfs of `size` bytes goes: as high as possible below
/// `ram_end`, page-aligned, clear of the kernel.
pub fn initramfs_addr(size: u64, kernel_end: u64, ram_end: u64) -> Result<u64, BootError> {
    let too_large = BootError::InitramfsTooLarge {
        size,
        kernel_end,
        ram_end,
    };
    let addr = ram_end.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(BootError::InitramfsTooLarge {
            size,
            kernel_end,
            ram_end,
        });
    }
    Ok(addr)
}

/// Loads the initramfs high in low memory; returns (address, size).
pub fn load_initramfs(
    guest_mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    memory_bytes: u64,
) -> Result<(u64, u64), BootError> {
    let open_err = |source| BootError::Open {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let addr = initramfs_addr(size, kernel_end, lowmem_end(memory_bytes))?;
    guest_mem
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::LoadInitramfs {
            path: path.display().to_string(),
            source,
        })?;
    Ok((addr, size))
}

/// The e820 map for `memory_bytes` of RAM: base memory up to the EBDA, then
/// RAM from 1 MiB to the MMIO gap, then the rest above 4 GiB.
pub fn e820_map(memory_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    let low_end = lowmem_end(memory_bytes);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if memory_bytes > MMIO_GAP_START {
        map.push((
            FIRST_ADDR_PAST_32BITS,
            memory_bytes - MMIO_GAP_START,
            E820_RAM,
        ));
    }
    map
}

/// Builds a kernel command line of at most `capacity` bytes.
pub fn build_cmdline(base: &str, extra: &[String], capacity: usize) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(capacity).map_err(BootError::Cmdline)?;
    if !base.trim().is_empty() {
        cmdline
            .insert_str(base.trim())
            .map_err(BootError::Cmdline)?;
    }
    for e in extra {
        cmdline.insert_str(e).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// The zero page.
pub fn build_boot_params(
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
    e820: &[(u64, u64, u32)],
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initramfs {
        // Below the MMIO gap, so 32 bits hold both.
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::E820Full(params.e820_table.len()));
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes the command line and the zero page.
pub fn write_boot_info(
    guest_mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    initramfs: Option<(u64, u64)>,
    memory_bytes: u64,
) -> Result<(), BootError> {
    load_cmdline(guest_mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();
    let params = build_boot_params(cmdline_len, initramfs, &e820_map(memory_bytes))?;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        guest_mem,
    )
    .map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_guest() {
        let m = e820_map(256 << 20);
        assert_eq!(
            m,
            vec![
                (0, EBDA_START, E820_RAM),
                (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM)
            ]
        );
    }

    #[test]
    fn e820_large_guest_skips_the_gap() {
        let mem = 5u64 << 30;
        let m = e820_map(mem);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM));
        assert_eq!(m[2], (1 << 32, mem - MMIO_GAP_START, E820_RAM));
        let ram: u64 = m.iter().map(|e| e.1).sum();
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn initramfs_goes_high_and_aligned() {
        let end = 256 << 20;
        let addr = initramfs_addr(3_747_328 + 5, 0x300_0000, end).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 3_747_328 + 5 <= end);
        assert!(end - addr < 3_747_328 + 5 + PAGE_SIZE);
        assert!(initramfs_addr(end, 0x300_0000, end).is_err());
        assert!(initramfs_addr(end + 1, 0, end).is_err());
    }

    #[test]
    fn zero_page_fields() {
        let e820 = e820_map(128 << 20);
        let p = build_boot_params(42, Some((0x700_0000, 0x1234)), &e820).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 2);
        let second = p.e820_table[1];
        assert_eq!(
            ({ second.addr }, { second.size }, { second.r#type }),
            (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM)
        );
        let too_many = vec![(0, 1, E820_RAM); 200];
        assert!(build_boot_params(0, None, &too_many).is_err());
    }

    #[test]
    fn boot_info_lands_where_the_guest_looks() {
        let mem = 64u64 << 20;
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem as usize)]).unwrap();
        let cmdline = build_cmdline(
            "console=ttyS0",
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
            2048,
        )
        .unwrap();
        write_boot_info(&gm, &cmdline, None, mem).unwrap();
        // The guest reads cmd_line_ptr at 0x228 and the e820 count at 0x1e8.
        let ptr: u32 = gm.read_obj(GuestAddress(ZERO_PAGE_START + 0x228)).unwrap();
        assert_eq!(u64::from(ptr), CMDLINE_START);
        let n: u8 = gm.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(n, 2);
        let magic: u32 = gm.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        let mut text = vec![0u8; 52];
        gm.read_slice(&mut text, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(
            &text[..51],
            b"console=ttyS0 virtio_mmio.device=4K@0xd0000000:5\0\0\0"
                .get(..51)
                .unwrap()
        );
    }

    #[test]
    fn cmdline_capacity_is_enforced() {
        assert!(build_cmdline(&"x".repeat(100), &[], 50).is_err());
    }
}
