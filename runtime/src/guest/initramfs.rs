//! The guest initramfs: a `newc` cpio archive whose only member is the
//! static agent as `/init`.
//!
//! Written here rather than with cpio(1) so the archive is reproducible by
//! construction (same agent bytes, same archive bytes: fixed inode numbers,
//! owners and timestamps) and so the reader below can check what we ship.

use std::path::Path;

use super::elf::{self, StaticElfError};

/// Errors from building or reading an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("reading the agent binary {path}")]
    ReadAgent {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent {path} cannot be the guest's /init")]
    NotStatic {
        path: String,
        #[source]
        source: StaticElfError,
    },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed cpio archive at byte {offset}: {what}")]
    Malformed { offset: usize, what: &'static str },
}

const NEWC_MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";
/// Regular file, rwxr-xr-x.
pub const MODE_EXECUTABLE: u32 = 0o100_755;

/// One member of a newc archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a leading `/`.
    pub name: String,
    /// st_mode: file type and permission bits.
    pub mode: u32,
    /// File contents (empty for directories).
    pub data: Vec<u8>,
}

/// Builds the initramfs for an agent binary, refusing one that is not static.
pub fn build(agent: &Path) -> Result<Vec<u8>, InitramfsError> {
    let path = agent.display().to_string();
    let data = std::fs::read(agent).map_err(|source| InitramfsError::ReadAgent {
        path: path.clone(),
        source,
    })?;
    elf::check_static(&data).map_err(|source| InitramfsError::NotStatic { path, source })?;
    Ok(write_newc(&[Entry {
        name: "init".into(),
        mode: MODE_EXECUTABLE,
        data,
    }]))
}

/// Builds the initramfs and writes it to `out` atomically (a reader never
/// sees half an archive).
pub fn build_to_file(agent: &Path, out: &Path) -> Result<usize, InitramfsError> {
    let bytes = build(agent)?;
    let tmp = out.with_extension("tmp");
    let write_err = |source| InitramfsError::Write {
        path: out.display().to_string(),
        source,
    };
    std::fs::write(&tmp, &bytes).map_err(write_err)?;
    std::fs::rename(&tmp, out).map_err(write_err)?;
    Ok(bytes.len())
}

/// Serialises entries as a newc archive with fixed metadata: inode numbers
/// count from 1, owner root, mtime 0.
pub fn write_newc(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        entries
            .iter()
            .map(|e| e.data.len() + HEADER_LEN + 256)
            .sum::<usize>()
            + 512,
    );
    for (i, e) in entries.iter().enumerate() {
        push_member(&mut out, (i + 1) as u32, &e.name, e.mode, &e.data);
    }
    push_member(&mut out, 0, TRAILER, 0, &[]);
    // The kernel reads the archive in whole 512-byte blocks comfortably.
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

fn push_member(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let fields: [u32; 13] = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // dev major
        0, // dev minor
        0, // rdev major
        0, // rdev minor
        (name.len() + 1) as u32,
        0, // check
    ];
    out.extend_from_slice(NEWC_MAGIC);
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Reads a newc archive. Bounded by the input: every length is checked
/// against what is left, so a corrupt archive is an error, never a panic.
pub fn read_newc(bytes: &[u8]) -> Result<Vec<Entry>, InitramfsError> {
    let mut entries = Vec::new();
    let mut off = 0usize;
    loop {
        let header = bytes
            .get(off..off + HEADER_LEN)
            .ok_or(InitramfsError::Malformed {
                offset: off,
                what: "truncated header",
            })?;
        if &header[..6] != NEWC_MAGIC {
            return Err(InitramfsError::Malformed {
                offset: off,
                what: "bad magic",
            });
        }
        let field = |i: usize| -> Result<usize, InitramfsError> {
            let hex = std::str::from_utf8(&header[6 + i * 8..6 + (i + 1) * 8]).map_err(|_| {
                InitramfsError::Malformed {
                    offset: off,
                    what: "non-ASCII header",
                }
            })?;
            usize::from_str_radix(hex, 16).map_err(|_| InitramfsError::Malformed {
                offset: off,
                what: "non-hex header",
            })
        };
        let mode = field(1)? as u32;
        let size = field(6)?;
        let namesize = field(11)?;
        let name_start = off + HEADER_LEN;
        let name_end = name_start
            .checked_add(namesize)
            .filter(|&end| namesize > 0 && end <= bytes.len())
            .ok_or(InitramfsError::Malformed {
                offset: off,
                what: "name out of bounds",
            })?;
        let name = std::str::from_utf8(&bytes[name_start..name_end - 1])
            .map_err(|_| InitramfsError::Malformed {
                offset: off,
                what: "name is not UTF-8",
            })?
            .to_string();
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start
            .checked_add(size)
            .filter(|&end| end <= bytes.len())
            .ok_or(InitramfsError::Malformed {
                offset: off,
                what: "data out of bounds",
            })?;
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(Entry {
            name,
            mode,
            data: bytes[data_start..data_end].to_vec(),
        });
        off = data_end.next_multiple_of(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry {
                name: "init".into(),
                mode: MODE_EXECUTABLE,
                data: b"\x7fELF and more".to_vec(),
            },
            Entry {
                name: "etc".into(),
                mode: 0o040_755,
                data: vec![],
            },
        ]
    }

    #[test]
    fn round_trips_and_is_reproducible() {
        let a = write_newc(&sample());
        let b = write_newc(&sample());
        assert_eq!(a, b, "same entries must give the same bytes");
        assert_eq!(a.len() % 512, 0);
        assert_eq!(read_newc(&a).unwrap(), sample());
    }

    #[test]
    fn headers_carry_fixed_owner_and_time() {
        let a = write_newc(&sample());
        let header = std::str::from_utf8(&a[..HEADER_LEN]).unwrap();
        assert_eq!(&header[..6], "070701");
        assert_eq!(&header[6..14], "00000001", "inode");
        assert_eq!(&header[14..22], "000081ed", "mode 0100755");
        assert_eq!(&header[22..38], "0000000000000000", "uid and gid 0");
        assert_eq!(&header[46..54], "00000000", "mtime 0");
    }

    #[test]
    fn corrupt_archives_are_errors_not_panics() {
        let good = write_newc(&sample());
        for cut in [0, 5, 109, 115, 130, 200, 300] {
            assert!(read_newc(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[6 + 6 * 8..6 + 7 * 8].copy_from_slice(b"ffffffff"); // huge size
        assert!(read_newc(&bad).is_err());
        let mut bad = good;
        bad[0] = b'1';
        assert!(read_newc(&bad).is_err());
    }

    #[test]
    fn build_refuses_a_dynamic_agent() {
        let err = build(&std::env::current_exe().unwrap()).unwrap_err();
        assert!(matches!(err, InitramfsError::NotStatic { .. }), "{err:?}");
    }
}
