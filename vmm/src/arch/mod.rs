//! x86-64: the guest physical memory layout and everything that prepares a
//! vCPU and guest memory for the 64-bit Linux boot protocol.
//!
//! Low memory, below 1 MiB:
//!
//! ```text
//! 0x0500  GDT            0x0520  IDT (empty)
//! 0x7000  zero page (boot_params)
//! 0x8ff0  boot stack (grows down)
//! 0x9000  PML4   0xa000  PDPT   0xb000  PD (1 GiB identity map, 2 MiB pages)
//! 0x20000 kernel command line (2 KiB)
//! 0x9fc00 MP table (EBDA; Linux scans here for "_MP_")
//! ```
//!
//! Above: RAM from 1 MiB to the MMIO gap at 0xd000_0000 (virtio-mmio windows,
//! IOAPIC at 0xfec0_0000, LAPIC at 0xfee0_0000); RAM beyond that continues at 4 GiB.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod regs;

/// Where the GDT lives.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT lives.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`); its address is passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-table pages for the identity map.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the extended BIOS data area: the MP table goes here.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte of high memory: kernels and initramfs live at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap; virtio-mmio windows are allocated from here.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address past 32 bits: RAM that does not fit below the gap resumes here.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u8 = 24;

/// Guest RAM as (start, length) ranges for `memory_bytes` of RAM, skipping the MMIO gap.
pub fn ram_ranges(memory_bytes: u64) -> Vec<(u64, u64)> {
    if memory_bytes <= MMIO_GAP_START {
        vec![(0, memory_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (FIRST_ADDR_PAST_32BITS, memory_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
    }
}
