//! CPUID for a vCPU: KVM_GET_SUPPORTED_CPUID, filtered.
//!
//! What the filter changes and why:
//! - leaf 0x1: APIC ID and logical CPU count of this vCPU, the hypervisor bit;
//!   features the VMM does not emulate (MONITOR, VMX/SMX, thermal and debug
//!   stores, PDCM) are cleared.
//! - leaves 0x4, 0xb, 0x1f, 0x8000_0008, 0x8000_001e: topology: `n` cores,
//!   one thread each, one node.
//! - leaf 0x6: only ARAT (the APIC timer keeps running) — no power management.
//! - leaf 0xa: no PMU.
//! - leaf 0x4000_0000: the KVM signature, so the guest uses kvmclock and PV features.

use kvm_bindings::kvm_cpuid_entry2;

// Leaf 1 ECX bits cleared: DTES64, MONITOR, DS-CPL, VMX, SMX, EST, TM2, PDCM.
const LEAF1_ECX_MASKED: u32 =
    (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 15);
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX bits cleared: DS, ACPI (thermal MSRs), TM, PBE.
const LEAF1_EDX_MASKED: u32 = (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31);
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF6_EAX_ARAT: u32 = 1 << 2;

/// `KVMKVMKVM\0\0\0` as EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// The KVM paravirtual leaves.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// Number of bits the core ID takes in an APIC ID for `count` cores.
fn core_id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Filters the supported CPUID entries in place for vCPU `id` of `count`.
pub fn filter_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, id: u8, count: u8) {
    let count = count.max(1);
    let apic_id = u32::from(id);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(count) << 16);
                e.ecx = (e.ecx & !LEAF1_ECX_MASKED) | LEAF1_ECX_HYPERVISOR;
                e.edx &= !LEAF1_EDX_MASKED;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cores per package - 1 in 31:26; threads sharing this cache - 1 in 25:14.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { u32::from(count) - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((u32::from(count) - 1) << 26) | (sharing << 14);
            }
            0x6 => {
                e.eax &= LEAF6_EAX_ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Level 0: SMT, one thread per core. Level 1: cores in the package.
                let (eax, ebx, ecx) = match e.index {
                    0 => (0, 1, 1 << 8),
                    1 => (core_id_bits(count), u32::from(count), (2 << 8) | 1),
                    n => (0, 0, n & 0xff),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = ecx;
                e.edx = apic_id;
            }
            0x8000_0008 => {
                // AMD: NC = cores - 1, ApicIdSize in 15:12.
                e.ecx = (core_id_bits(count) << 12) | (u32::from(count) - 1);
            }
            0x8000_001e => {
                // AMD extended APIC ID, compute-unit (core) ID with one thread
                // per core, one node: the host's values would name host cores.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    match entries
        .iter_mut()
        .find(|e| e.function == KVM_CPUID_SIGNATURE)
    {
        Some(e) => {
            e.ebx = KVM_SIGNATURE[0];
            e.ecx = KVM_SIGNATURE[1];
            e.edx = KVM_SIGNATURE[2];
            e.eax = e.eax.max(KVM_CPUID_FEATURES);
        }
        None => entries.push(kvm_cpuid_entry2 {
            function: KVM_CPUID_SIGNATURE,
            eax: KVM_CPUID_FEATURES,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs,
            ebx: regs,
            ecx: regs,
            edx: regs,
            ..Default::default()
        }
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn leaf1_topology_and_masks() {
        let mut e = vec![entry(1, 0, u32::MAX)];
        filter_cpuid(&mut e, 3, 4);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical CPUs");
        assert_eq!(l1.ebx & 0xffff, 0xffff, "CLFLUSH size and brand kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_MASKED, 0);
        assert_eq!(l1.edx & LEAF1_EDX_MASKED, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);

        let mut e = vec![entry(1, 0, 0)];
        filter_cpuid(&mut e, 0, 1);
        assert_eq!(find(&e, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_per_vcpu() {
        let mut e = vec![entry(0xb, 0, 7), entry(0xb, 1, 7), entry(0xb, 2, 7)];
        filter_cpuid(&mut e, 2, 3);
        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
        let end = find(&e, 0xb, 2);
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
    }

    #[test]
    fn unemulated_leaves_are_masked() {
        let mut e = vec![entry(6, 0, u32::MAX), entry(0xa, 0, u32::MAX)];
        filter_cpuid(&mut e, 0, 1);
        let l6 = find(&e, 6, 0);
        assert_eq!((l6.eax, l6.ebx, l6.ecx, l6.edx), (LEAF6_EAX_ARAT, 0, 0, 0));
        let la = find(&e, 0xa, 0);
        assert_eq!((la.eax, la.ebx, la.ecx, la.edx), (0, 0, 0, 0));
    }

    #[test]
    fn kvm_signature_is_present() {
        let mut e = vec![];
        filter_cpuid(&mut e, 0, 1);
        let sig = find(&e, KVM_CPUID_SIGNATURE, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert!(sig.eax >= KVM_CPUID_FEATURES);
    }

    #[test]
    fn amd_extended_apic_id() {
        let mut e = vec![entry(0x8000_001e, 0, u32::MAX), entry(0x8000_0008, 0, 0)];
        filter_cpuid(&mut e, 5, 8);
        let t = find(&e, 0x8000_001e, 0);
        assert_eq!((t.eax, t.ebx, t.ecx, t.edx), (5, 5, 0, 0));
        let s = find(&e, 0x8000_0008, 0);
        assert_eq!((s.ecx & 0xff, (s.ecx >> 12) & 0xf), (7, 3));
    }

    #[test]
    fn cache_leaf_sharing() {
        // L1 data cache (level 1) and L3 (level 3).
        let mut e = vec![entry(4, 0, 1 << 5), entry(4, 3, 3 << 5)];
        filter_cpuid(&mut e, 0, 4);
        assert_eq!(find(&e, 4, 0).eax >> 26, 3);
        assert_eq!((find(&e, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&e, 4, 3).eax >> 14) & 0xfff, 3);
    }
}
