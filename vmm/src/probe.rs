//! Can this host's KVM run a stock Linux guest? (`vmpod-vmm --probe`)
//!
//! A KVM that runs guests on hardware virtualization (VT-x/AMD-V) executes
//! every instruction a stock kernel uses. Some KVMs do not: PVM (a
//! paravirtual KVM without hardware virtualization) runs unmodified guests
//! through KVM's instruction emulator, which gives up at the FPU/XSAVE
//! instructions and `cmpxchg16b` that every Linux boot executes, after the
//! kernel has been running for about a second. The daemon runs this probe
//! once at start-up and reports a handler whose guests cannot boot as not
//! ready, instead of failing every RunPodSandbox at its boot timeout.
//!
//! The probe is a 67-byte 64-bit guest on the same boot path as a Linux
//! guest (long mode, our page tables, GDT, CPUID, MSRs, LAPIC): it executes
//! `fxsave`/`fxrstor`, `xsetbv`, `xsave`/`xrstor` and `lock cmpxchg16b`,
//! then writes 0x42 to port [`PROBE_PORT`]. Done: the port write arrives.
//! Anything else (an emulation failure, a triple fault, a halt first) names
//! the instruction it stopped at.

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::{cpuid, regs};

/// The port the probe guest writes [`PROBE_DONE`] to when it got through.
pub const PROBE_PORT: u16 = 0x404;
/// The byte it writes.
pub const PROBE_DONE: u8 = 0x42;
/// Where the probe's code sits in guest memory.
const CODE_AT: u64 = 0x10_0000;
/// Guest RAM of the probe VM.
const MEMORY: usize = 4 << 20;
/// The most exits the probe takes before it gives up (it needs one).
const MAX_EXITS: usize = 64;
/// CR4.OSFXSR, CR4.OSXMMEXCPT, CR4.OSXSAVE: what a kernel sets before it
/// touches FPU state.
const CR4_FPU_BITS: u64 = (1 << 9) | (1 << 10) | (1 << 18);

/// The probe guest (assembled from the listing in the comments), and the
/// instruction each offset starts.
const CODE: &[u8] = &[
    0xbf, 0x00, 0x10, 0x18, 0x00, // 00 mov edi, 0x181000
    0x0f, 0xae, 0x07, //             05 fxsave [rdi]
    0x0f, 0xae, 0x0f, //             08 fxrstor [rdi]
    0x31, 0xc9, //                   0b xor ecx, ecx
    0xb8, 0x03, 0x00, 0x00, 0x00, // 0d mov eax, 3 (x87 | SSE)
    0x31, 0xd2, //                   12 xor edx, edx
    0x0f, 0x01, 0xd1, //             14 xsetbv
    0xbf, 0x00, 0x00, 0x18, 0x00, // 17 mov edi, 0x180000
    0xb8, 0x03, 0x00, 0x00, 0x00, // 1c mov eax, 3
    0x31, 0xd2, //                   21 xor edx, edx
    0x0f, 0xae, 0x27, //             23 xsave [rdi]
    0x0f, 0xae, 0x2f, //             26 xrstor [rdi]
    0xbf, 0x00, 0x20, 0x18, 0x00, // 29 mov edi, 0x182000
    0x31, 0xc0, //                   2e xor eax, eax
    0x31, 0xd2, //                   30 xor edx, edx
    0x31, 0xdb, //                   32 xor ebx, ebx
    0x31, 0xc9, //                   34 xor ecx, ecx
    0xf0, 0x48, 0x0f, 0xc7, 0x0f, // 36 lock cmpxchg16b [rdi]
    0x66, 0xba, 0x04, 0x04, //       3b mov dx, 0x404
    0xb0, 0x42, //                   3f mov al, 0x42
    0xee, //                         41 out dx, al
    0xf4, //                         42 hlt
];

/// The instruction at or before code offset `offset`.
fn instruction_at(offset: u64) -> &'static str {
    const STARTS: &[(u64, &str)] = &[
        (0x05, "fxsave"),
        (0x08, "fxrstor"),
        (0x14, "xsetbv"),
        (0x23, "xsave"),
        (0x26, "xrstor"),
        (0x36, "lock cmpxchg16b"),
        (0x41, "out"),
        (0x42, "hlt"),
    ];
    STARTS
        .iter()
        .rev()
        .find(|(start, _)| *start <= offset)
        .map_or("the first instructions", |(_, name)| name)
}

/// Why the probe failed: what a person reads in the handler's status.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(pub String);

fn fail(what: &str) -> impl Fn(kvm_ioctls::Error) -> ProbeError + '_ {
    move |e| ProbeError(format!("{what}: {e}"))
}

/// Runs the probe guest. `Ok` when it got through every instruction a
/// Linux boot needs.
pub fn run_probe() -> Result<(), ProbeError> {
    let kvm = Kvm::new().map_err(fail("opening /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(fail("KVM_CREATE_VM"))?;
    vm.create_irq_chip().map_err(fail("KVM_CREATE_IRQCHIP"))?;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)])
        .map_err(|e| ProbeError(format!("guest memory: {e}")))?;
    let host = memory
        .get_host_address(GuestAddress(0))
        .map_err(|e| ProbeError(format!("guest memory: {e}")))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEMORY as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region is a live mapping owned by `memory`, which outlives
    // `vm` (declared after it, dropped first) and so every vCPU run.
    unsafe { vm.set_user_memory_region(region) }.map_err(fail("KVM_SET_USER_MEMORY_REGION"))?;
    regs::write_boot_tables(&memory).map_err(|e| ProbeError(format!("boot tables: {e}")))?;
    memory
        .write_slice(CODE, GuestAddress(CODE_AT))
        .map_err(|e| ProbeError(format!("probe code: {e}")))?;

    let mut vcpu = vm.create_vcpu(0).map_err(fail("KVM_CREATE_VCPU"))?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(fail("KVM_GET_SUPPORTED_CPUID"))?;
    let mut entries = supported.as_slice().to_vec();
    cpuid::filter_cpuid(&mut entries, 0, 1);
    let cpuid = kvm_bindings::CpuId::from_entries(&entries)
        .map_err(|_| ProbeError("too many CPUID entries".into()))?;
    vcpu.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;
    regs::configure_vcpu(&vcpu, CODE_AT).map_err(|e| ProbeError(format!("vCPU set-up: {e}")))?;
    let mut sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    sregs.cr4 |= CR4_FPU_BITS;
    vcpu.set_sregs(&sregs)
        .map_err(fail("KVM_SET_SREGS (CR4.OSXSAVE: the CPU has no XSAVE?)"))?;

    let stopped_at = |vcpu: &kvm_ioctls::VcpuFd| {
        vcpu.get_regs().map_or_else(
            |_| "an unknown instruction".to_string(),
            |r| {
                let offset = r.rip.wrapping_sub(CODE_AT);
                format!("{} (rip {:#x})", instruction_at(offset), r.rip)
            },
        )
    };
    for _ in 0..MAX_EXITS {
        let exit = vcpu.run();
        let why = match exit {
            Ok(VcpuExit::IoOut(PROBE_PORT, data)) if data == [PROBE_DONE] => return Ok(()),
            Ok(VcpuExit::IoOut(_, _) | VcpuExit::IoIn(_, _) | VcpuExit::Intr) => continue,
            Ok(VcpuExit::InternalError) => "KVM's instruction emulator gave up",
            Ok(VcpuExit::Shutdown) => "the guest triple-faulted",
            Ok(VcpuExit::Hlt) => "the guest halted early",
            Ok(VcpuExit::FailEntry(_, _)) => "KVM could not enter the guest",
            Ok(_) => "an unexpected exit",
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(ProbeError(format!("KVM_RUN: {e}"))),
        };
        return Err(ProbeError(format!(
            "{why} at {}: this KVM cannot run a stock Linux guest (it needs \
             VT-x/AMD-V; a PVM or emulating KVM runs only PVM-patched kernels)",
            stopped_at(&vcpu)
        )));
    }
    Err(ProbeError(format!(
        "the probe guest did not finish in {MAX_EXITS} exits (last at {})",
        stopped_at(&vcpu)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_name_their_instructions() {
        assert_eq!(instruction_at(0x36), "lock cmpxchg16b");
        assert_eq!(instruction_at(0x38), "lock cmpxchg16b");
        assert_eq!(instruction_at(0x26), "xrstor");
        assert_eq!(instruction_at(0x00), "the first instructions");
        assert_eq!(instruction_at(u64::MAX), "hlt");
        // The listing's offsets are the code's: out is the second-last byte.
        assert_eq!(CODE.len(), 0x43);
        assert_eq!(CODE[0x41], 0xee);
        assert_eq!(&CODE[0x36..0x3b], &[0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
    }
}
