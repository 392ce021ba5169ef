//! The Intel MultiProcessor table (MP spec 1.4): how an SMP guest without
//! ACPI finds its CPUs, the IOAPIC and the ISA interrupt routing.
//!
//! Layout at [`EBDA_START`](super::EBDA_START): the 16-byte floating pointer
//! ("_MP_"), then the configuration table ("PCMP") with one processor entry
//! per vCPU, the ISA bus, the IOAPIC, one I/O interrupt entry per IOAPIC pin
//! and the two local interrupt entries (ExtINT on LINT0, NMI on LINT1).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{APIC_START, IOAPIC_PINS, IOAPIC_START};

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("writing the MP table into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6, as a modern CPU reports it.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Size of the floating pointer and of the configuration table header.
pub const FLOATING_LEN: usize = 16;
pub const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP table bytes for `num_cpus` vCPUs, to be placed at guest address `base`.
pub fn mptable_bytes(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n → IOAPIC pin n, conforming polarity and trigger.
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, MP_IRQ_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 = ExtINT, LINT1 = NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FLOATING_LEN as u64;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.push(MPC_SPEC);
    header.push(0); // checksum, below
    header.extend_from_slice(b"VMPOD   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MPC_SPEC, 0, 0, 0, 0, 0, 0]); // length in 16-byte units
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table at `base` in guest memory.
pub fn write_mptable(
    guest_mem: &GuestMemoryMmap,
    base: u64,
    num_cpus: u8,
) -> Result<(), MptableError> {
    let bytes = mptable_bytes(base, num_cpus)?;
    guest_mem
        .write_slice(&bytes, GuestAddress(base))
        .map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::EBDA_START;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_layout() {
        for cpus in [1u8, 2, 64, 254] {
            let t = mptable_bytes(EBDA_START, cpus).unwrap();
            let (fp, table) = t.split_at(FLOATING_LEN);
            assert_eq!(&fp[0..4], b"_MP_");
            assert_eq!(sum(fp), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(fp[4..8].try_into().unwrap());
            assert_eq!(u64::from(ptr), EBDA_START + FLOATING_LEN as u64);
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
            assert_eq!(count, u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2);
            let lapic = u32::from_le_bytes(table[36..40].try_into().unwrap());
            assert_eq!(u64::from(lapic), APIC_START);
            assert_eq!(len, HEADER_LEN + 20 * cpus as usize + 8 * (2 + 24 + 2));
        }
    }

    #[test]
    fn processor_entries() {
        let t = mptable_bytes(EBDA_START, 3).unwrap();
        let entries = &t[FLOATING_LEN + HEADER_LEN..];
        for cpu in 0..3usize {
            let e = &entries[cpu * 20..cpu * 20 + 20];
            assert_eq!(e[0], 0, "processor entry type");
            assert_eq!(e[1] as usize, cpu, "APIC ID");
            let bsp = e[3] & CPU_BOOTPROCESSOR != 0;
            assert_eq!(bsp, cpu == 0);
            assert_ne!(e[3] & CPU_ENABLED, 0);
        }
        let ioapic = &entries[3 * 20 + 8..3 * 20 + 16];
        assert_eq!((ioapic[0], ioapic[1]), (2, 3));
    }

    #[test]
    fn refuses_impossible_cpu_counts() {
        assert!(mptable_bytes(EBDA_START, 0).is_err());
        assert!(mptable_bytes(EBDA_START, 255).is_err());
    }
}
