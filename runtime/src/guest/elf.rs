//! Checks that a binary can run as `/init` in an initramfs that holds
//! nothing else: an x86-64 ELF executable with no program interpreter and no
//! shared-library dependencies.

use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader};

/// Why a binary cannot be the guest's `/init`.
#[derive(Debug, thiserror::Error)]
pub enum StaticElfError {
    #[error("not a 64-bit ELF file")]
    NotElf(#[source] object::read::Error),
    #[error("built for machine {0:#x}, not x86-64")]
    WrongMachine(u16),
    #[error("not an executable (ELF type {0})")]
    NotExecutable(u16),
    #[error("dynamically linked: it asks for the program interpreter {0:?}")]
    Interpreter(String),
    #[error("dynamically linked: it needs shared libraries")]
    Needed,
    #[error("malformed program headers")]
    Malformed(#[source] object::read::Error),
}

/// Succeeds only for a statically linked x86-64 executable (static-pie
/// included: it has a dynamic section for its own relocations, but no
/// interpreter and no DT_NEEDED).
pub fn check_static(data: &[u8]) -> Result<(), StaticElfError> {
    let header =
        elf::FileHeader64::<object::Endianness>::parse(data).map_err(StaticElfError::NotElf)?;
    let endian = header.endian().map_err(StaticElfError::NotElf)?;
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(StaticElfError::WrongMachine(machine));
    }
    let kind = header.e_type(endian);
    if kind != elf::ET_EXEC && kind != elf::ET_DYN {
        return Err(StaticElfError::NotExecutable(kind));
    }
    for ph in header
        .program_headers(endian, data)
        .map_err(StaticElfError::Malformed)?
    {
        if ph.p_type(endian) == elf::PT_INTERP {
            let interp = ph
                .data(endian, data)
                .map(|d| {
                    String::from_utf8_lossy(d)
                        .trim_end_matches('\0')
                        .to_string()
                })
                .unwrap_or_else(|()| "<unreadable>".to_string());
            return Err(StaticElfError::Interpreter(interp));
        }
        if let Some(dynamic) = ph
            .dynamic(endian, data)
            .map_err(StaticElfError::Malformed)?
        {
            if dynamic
                .iter()
                .any(|d| d.d_tag(endian) == u64::from(elf::DT_NEEDED))
            {
                return Err(StaticElfError::Needed);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamically_linked_binary_is_refused() {
        // The test binary itself links glibc dynamically.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        match check_static(&me) {
            Err(StaticElfError::Interpreter(i)) => {
                assert!(i.contains("ld-linux"), "interpreter {i}")
            }
            other => panic!("expected a refusal naming the interpreter, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_not_elf_and_does_not_panic() {
        assert!(matches!(
            check_static(b"#!/bin/sh\n"),
            Err(StaticElfError::NotElf(_))
        ));
        let mut truncated = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        truncated.truncate(80);
        assert!(check_static(&truncated).is_err());
    }
}
