//! Safe unpacking of image layers into one flattened root filesystem.
//!
//! Layers are hostile. Every entry path is relative and made only of normal
//! components (no `..`, no absolute paths); every parent directory is
//! checked with `lstat` while walking down from the root, so an entry can
//! never be written through a symlink (a layer that plants `etc -> /etc` and
//! then writes `etc/passwd` is refused); hard links must name an existing
//! non-directory inside the root, reached the same way. Symlink *targets*
//! are stored, never followed: they are resolved inside the guest, where the
//! root is the image. Uncompressed bytes and entry counts are bounded
//! across the whole image against decompression bombs.
//!
//! Whiteouts follow the OCI layer spec: `.wh.<name>` deletes `<name>` from
//! lower layers, `.wh..wh..opq` empties its directory of lower-layer content.
//!
//! The unpack runs in a fresh private directory that nothing else writes,
//! so the checks cannot race with another writer.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest as _, Sha256};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
const AUFS_META_PREFIX: &str = ".wh..wh.";
const MAX_PATH_LEN: usize = 4096;
const MAX_XATTR_VALUE: usize = 64 * 1024;
const COPY_BUFFER: usize = 256 * 1024;

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry path leaves the root (`..`, absolute, empty).
    #[error("layer entry {0:?} escapes the root")]
    PathEscape(String),
    /// An entry would be written through a symlink.
    #[error("layer entry {0:?} goes through a symlink")]
    ThroughSymlink(String),
    /// A hard link names something outside the root, missing or a directory.
    #[error("hard link {path:?} -> {target:?} is not a file inside the root")]
    BadHardLink {
        /// The link.
        path: String,
        /// What it names.
        target: String,
    },
    /// An entry's parent is not a directory.
    #[error("parent of layer entry {0:?} is not a directory")]
    NotADirectory(String),
    /// The image unpacks to more than the configured bound.
    #[error("image unpacks to more than {0} bytes")]
    TooLarge(u64),
    /// The image has more entries than the configured bound.
    #[error("image has more than {0} entries")]
    TooManyEntries(u64),
    /// The layer compression is not gzip, zstd or none.
    #[error("unsupported layer compression")]
    UnsupportedCompression,
    /// The layer is not a valid (compressed) tar stream.
    #[error("malformed layer")]
    Malformed(#[source] std::io::Error),
    /// Applying an entry failed on the host.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The uncompressed layer does not match the config's `diff_id`.
    #[error("layer content does not match diff_id {expected} (got {actual})")]
    DiffIdMismatch {
        /// The config's diff_id.
        expected: String,
        /// What the layer hashes to.
        actual: String,
    },
    /// The pull was cancelled.
    #[error("unpack cancelled")]
    Cancelled,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Bounds on what one image may unpack to.
#[derive(Clone, Copy, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnpackLimits {
    /// Total bytes of file content across all layers.
    pub max_bytes: u64,
    /// Total entries across all layers.
    pub max_entries: u64,
    /// Apply the entries' owners (needs root).
    pub preserve_ownership: bool,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 30,
            max_entries: 2_000_000,
            preserve_ownership: nix::unistd::geteuid().is_root(),
        }
    }
}

/// What an unpack produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// File content bytes written.
    pub bytes: u64,
    /// Entries applied (including whiteouts).
    pub entries: u64,
}

/// One layer to apply: its blob and the sha256 its uncompressed tar must
/// have (the config's `rootfs.diff_ids` entry).
#[derive(Clone, Debug)]
pub struct LayerSource {
    /// The (compressed) blob.
    pub path: PathBuf,
    /// `sha256:<hex>` of the uncompressed stream, when known.
    pub diff_id: Option<String>,
}

/// Applies layers (bottom first) onto `root`, which must be an existing,
/// private, initially empty directory.
pub fn unpack_layers(
    root: &Path,
    layers: &[LayerSource],
    limits: &UnpackLimits,
    cancel: &AtomicBool,
) -> Result<UnpackStats, UnpackError> {
    let mut stats = UnpackStats::default();
    for layer in layers {
        let file = fs::File::open(&layer.path).map_err(io("opening", &layer.path))?;
        let reader = decompress(BufReader::with_capacity(COPY_BUFFER, file))?;
        let mut hashing = HashingReader {
            inner: reader,
            hasher: Sha256::new(),
        };
        let mut rest = apply_layer(root, &mut hashing, limits, cancel, &mut stats)?;
        // The tar ends before the stream does (end-of-archive padding): hash
        // the remainder too, within the same byte budget.
        let budget = limits.max_bytes.saturating_sub(stats.bytes);
        let drained = std::io::copy(&mut (&mut rest).take(budget + 1), &mut std::io::sink())
            .map_err(UnpackError::Malformed)?;
        if drained > budget {
            return Err(UnpackError::TooLarge(limits.max_bytes));
        }
        if let Some(expected) = &layer.diff_id {
            let actual = format!("sha256:{}", hex(&hashing.hasher.finalize()));
            if actual != *expected {
                return Err(UnpackError::DiffIdMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
    }
    Ok(stats)
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Picks the decompressor from the stream's magic bytes: manifests lie
/// about media types more often than gzip and zstd headers do.
pub fn decompress<'a, R: BufRead + 'a>(mut reader: R) -> Result<Box<dyn Read + 'a>, UnpackError> {
    let head = reader.fill_buf().map_err(UnpackError::Malformed)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(ZstdFrames::new(reader)))
    } else if head.len() >= 262 && &head[257..262] == b"ustar" || head.is_empty() {
        Ok(Box::new(reader))
    } else {
        Err(UnpackError::UnsupportedCompression)
    }
}

/// A zstd stream of one or more frames.
struct ZstdFrames<R: BufRead> {
    decoder: Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>,
    source: Option<R>,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> Self {
        Self {
            decoder: None,
            source: Some(source),
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(decoder) = self.decoder.as_mut() {
                let n = decoder.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                let decoder = self.decoder.take();
                self.source = decoder.map(|d| d.into_inner());
            }
            let Some(mut source) = self.source.take() else {
                return Ok(0);
            };
            if source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            let decoder = ruzstd::decoding::StreamingDecoder::new(source)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            self.decoder = Some(decoder);
        }
    }
}

/// Applies one uncompressed tar stream; returns the reader, positioned
/// after the end-of-archive marker.
pub fn apply_layer<R: Read>(
    root: &Path,
    reader: R,
    limits: &UnpackLimits,
    cancel: &AtomicBool,
    stats: &mut UnpackStats,
) -> Result<R, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    apply_entries(root, &mut archive, limits, cancel, stats)?;
    Ok(archive.into_inner())
}

fn apply_entries<R: Read>(
    root: &Path,
    archive: &mut tar::Archive<R>,
    limits: &UnpackLimits,
    cancel: &AtomicBool,
    stats: &mut UnpackStats,
) -> Result<(), UnpackError> {
    let mut this_layer: HashSet<PathBuf> = HashSet::new();
    let entries = archive.entries().map_err(UnpackError::Malformed)?;
    for entry in entries {
        if cancel.load(Ordering::Relaxed) {
            return Err(UnpackError::Cancelled);
        }
        let mut entry = entry.map_err(UnpackError::Malformed)?;
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(UnpackError::TooManyEntries(limits.max_entries));
        }
        let raw_path = entry.path_bytes().into_owned();
        let Some(rel) = relative_path(&raw_path)? else {
            continue; // the root itself ("./")
        };
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let display = rel.to_string_lossy().into_owned();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));

        if name == OPAQUE_WHITEOUT {
            if let Some(dir) = resolve_dir(root, parent_rel, false, &display)? {
                clear_lower(&dir, parent_rel, &this_layer)?;
            }
            continue;
        }
        // AUFS metadata (`.wh..wh.plnk/...` and the like) is not content.
        if rel.components().any(|c| {
            c.as_os_str()
                .as_bytes()
                .starts_with(AUFS_META_PREFIX.as_bytes())
        }) {
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                return Err(UnpackError::PathEscape(display));
            }
            if let Some(dir) = resolve_dir(root, parent_rel, false, &display)? {
                remove_existing(&dir.join(hidden))?;
            }
            continue;
        }

        let entry_type = entry.header().entry_type();
        if !matches!(
            entry_type,
            tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse
                | tar::EntryType::Directory
                | tar::EntryType::Symlink
                | tar::EntryType::Link
                | tar::EntryType::Char
                | tar::EntryType::Block
                | tar::EntryType::Fifo
        ) {
            // Global pax headers, GNU volume labels and the like carry no file.
            continue;
        }
        let dir = resolve_dir(root, parent_rel, true, &display)?
            .ok_or_else(|| UnpackError::NotADirectory(display.clone()))?;
        let dest = dir.join(&name);
        let (uid, gid) = owner(&mut entry)?;
        let mode = entry.header().mode().map_err(UnpackError::Malformed)? & 0o7777;
        let xattrs = xattrs(&mut entry)?;

        match entry_type {
            tar::EntryType::Directory => match fs::symlink_metadata(&dest) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_existing(&dest)?;
                    fs::create_dir(&dest).map_err(io("creating", &dest))?;
                }
                Err(_) => fs::create_dir(&dest).map_err(io("creating", &dest))?,
            },
            // The tar reader expands sparse entries into their full content.
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_existing(&dest)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(io("creating", &dest))?;
                let budget = limits.max_bytes.saturating_sub(stats.bytes);
                let written = copy_bounded(&mut entry, &mut file, budget, &dest)?;
                stats.bytes += written;
                if let Ok(mtime) = entry.header().mtime() {
                    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    let _ = file.set_modified(t);
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::Malformed(invalid("symlink without target")))?
                    .into_owned();
                if target.is_empty() || target.len() > MAX_PATH_LEN {
                    return Err(UnpackError::Malformed(invalid("bad symlink target")));
                }
                remove_existing(&dest)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &dest)
                    .map_err(io("creating symlink", &dest))?;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::Malformed(invalid("hard link without target")))?
                    .into_owned();
                let bad = || UnpackError::BadHardLink {
                    path: display.clone(),
                    target: String::from_utf8_lossy(&target_raw).into_owned(),
                };
                let target_rel = relative_path(&target_raw)
                    .map_err(|_| bad())?
                    .ok_or_else(bad)?;
                let target_dir = resolve_dir(
                    root,
                    target_rel.parent().unwrap_or(Path::new("")),
                    false,
                    &display,
                )
                .map_err(|_| bad())?
                .ok_or_else(bad)?;
                let target = target_dir.join(target_rel.file_name().ok_or_else(bad)?);
                match fs::symlink_metadata(&target) {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(bad()),
                }
                if target != dest {
                    remove_existing(&dest)?;
                    // linkat without AT_SYMLINK_FOLLOW: links the entry itself.
                    fs::hard_link(&target, &dest).map_err(io("linking", &dest))?;
                }
                this_layer.insert(rel);
                // A hard link shares its target's inode: no owner or mode of its own.
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                remove_existing(&dest)?;
                let kind = match entry_type {
                    tar::EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
                    tar::EntryType::Block => nix::sys::stat::SFlag::S_IFBLK,
                    _ => nix::sys::stat::SFlag::S_IFIFO,
                };
                // A FIFO has no device number; tar writers often leave the
                // fields blank for it.
                let (major, minor) = if entry_type == tar::EntryType::Fifo {
                    (0, 0)
                } else {
                    let h = entry.header();
                    (
                        h.device_major()
                            .map_err(UnpackError::Malformed)?
                            .unwrap_or(0),
                        h.device_minor()
                            .map_err(UnpackError::Malformed)?
                            .unwrap_or(0),
                    )
                };
                nix::sys::stat::mknod(
                    &dest,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    nix::sys::stat::makedev(u64::from(major), u64::from(minor)),
                )
                .map_err(|e| io("creating device", &dest)(e.into()))?;
            }
            _ => continue,
        }

        let is_symlink = entry_type == tar::EntryType::Symlink;
        if limits.preserve_ownership {
            std::os::unix::fs::lchown(&dest, Some(uid), Some(gid))
                .map_err(io("changing owner of", &dest))?;
        }
        for (key, value) in &xattrs {
            set_xattr(&dest, key, value)?;
        }
        // After chown, which clears set-id bits. Never on a symlink: chmod follows it.
        if !is_symlink {
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                .map_err(io("changing mode of", &dest))?;
        }
        this_layer.insert(rel);
    }
    Ok(())
}

fn invalid(msg: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// A tar path as a relative path of normal components; `None` for the root.
fn relative_path(raw: &[u8]) -> Result<Option<PathBuf>, UnpackError> {
    let display = || String::from_utf8_lossy(raw).into_owned();
    if raw.len() > MAX_PATH_LEN || raw.contains(&0) {
        return Err(UnpackError::PathEscape(display()));
    }
    let path = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(c) => rel.push(c),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::PathEscape(display()));
            }
        }
    }
    Ok(if rel.as_os_str().is_empty() {
        None
    } else {
        Some(rel)
    })
}

/// Walks `rel` down from `root` with `lstat`, refusing symlinks and
/// non-directories; missing directories are created (mode 0755) when
/// `create`, else the result is `None`.
fn resolve_dir(
    root: &Path,
    rel: &Path,
    create: bool,
    display: &str,
) -> Result<Option<PathBuf>, UnpackError> {
    let mut dir = root.to_path_buf();
    for component in rel.components() {
        dir.push(component);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink(display.to_string()));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(UnpackError::NotADirectory(display.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                fs::create_dir(&dir).map_err(io("creating", &dir))?;
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                    .map_err(io("changing mode of", &dir))?;
            }
            Err(e) => return Err(io("inspecting", &dir)(e)),
        }
    }
    Ok(Some(dir))
}

/// Removes whatever is at `path` (never following a symlink).
fn remove_existing(path: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io("removing", path)),
        Ok(_) => fs::remove_file(path).map_err(io("removing", path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("inspecting", path)(e)),
    }
}

/// Opaque directory: drop every child that lower layers put there.
fn clear_lower(dir: &Path, rel: &Path, this_layer: &HashSet<PathBuf>) -> Result<(), UnpackError> {
    for child in fs::read_dir(dir).map_err(io("reading", dir))? {
        let child = child.map_err(io("reading", dir))?;
        if !this_layer.contains(&rel.join(child.file_name())) {
            remove_existing(&child.path())?;
        }
    }
    Ok(())
}

fn copy_bounded<R: Read>(
    reader: &mut R,
    file: &mut fs::File,
    budget: u64,
    dest: &Path,
) -> Result<u64, UnpackError> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut written = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(UnpackError::Malformed)?;
        if n == 0 {
            return Ok(written);
        }
        written += n as u64;
        if written > budget {
            return Err(UnpackError::TooLarge(budget));
        }
        file.write_all(&buf[..n]).map_err(io("writing", dest))?;
    }
}

/// Owner from the header, overridden by pax `uid`/`gid` (large IDs).
fn owner<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<(u32, u32), UnpackError> {
    let header_id = |v: std::io::Result<u64>| -> Result<u32, UnpackError> {
        let v = v.map_err(UnpackError::Malformed)?;
        u32::try_from(v).map_err(|_| UnpackError::Malformed(invalid("owner id out of range")))
    };
    let mut uid = header_id(entry.header().uid())?;
    let mut gid = header_id(entry.header().gid())?;
    if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Malformed)? {
        for ext in pax {
            let ext = ext.map_err(UnpackError::Malformed)?;
            let parse = || {
                ext.value()
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok())
                    .ok_or_else(|| UnpackError::Malformed(invalid("bad pax owner id")))
            };
            match ext.key_bytes() {
                b"uid" => uid = parse()?,
                b"gid" => gid = parse()?,
                _ => {}
            }
        }
    }
    Ok((uid, gid))
}

/// Extended attributes recorded as pax `SCHILY.xattr.<name>` records.
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(CString, Vec<u8>)>, UnpackError> {
    let mut out = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Malformed)? {
        for ext in pax {
            let ext = ext.map_err(UnpackError::Malformed)?;
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                let value = ext.value_bytes();
                if value.len() > MAX_XATTR_VALUE {
                    return Err(UnpackError::Malformed(invalid("xattr value too large")));
                }
                let name = CString::new(name)
                    .map_err(|_| UnpackError::Malformed(invalid("NUL in xattr name")))?;
                out.push((name, value.to_vec()));
            }
        }
    }
    Ok(out)
}

fn set_xattr(path: &Path, name: &CString, value: &[u8]) -> Result<(), UnpackError> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| UnpackError::Malformed(invalid("NUL in path")))?;
    // SAFETY: both strings are valid NUL-terminated C strings that outlive
    // the call, and `value` is a live slice whose pointer and length match.
    let rc = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOTSUP) {
        // The scratch filesystem cannot hold this namespace (e.g. user.* on
        // tmpfs): the image still works, it only lacks the attribute.
        tracing::debug!(path = %path.display(), ?name, "xattr not supported here");
        return Ok(());
    }
    Err(io("setting xattr on", path)(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> UnpackLimits {
        UnpackLimits {
            max_bytes: 1 << 20,
            max_entries: 1000,
            preserve_ownership: false,
        }
    }

    enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            let (path, data, kind, link): (&str, &[u8], _, Option<&str>) = match e {
                E::File(p, d) => (p, d, tar::EntryType::Regular, None),
                E::Dir(p) => (p, b"", tar::EntryType::Directory, None),
                E::Sym(p, t) => (p, b"", tar::EntryType::Symlink, Some(t)),
                E::Hard(p, t) => (p, b"", tar::EntryType::Link, Some(t)),
            };
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            // Raw names: the builder's own checks would refuse the hostile ones.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                let l = &mut h.as_old_mut().linkname;
                l[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn apply(root: &Path, entries: &[E<'_>]) -> Result<UnpackStats, UnpackError> {
        let mut stats = UnpackStats::default();
        let data = tar_of(entries);
        apply_layer(
            root,
            &data[..],
            &limits(),
            &AtomicBool::new(false),
            &mut stats,
        )?;
        Ok(stats)
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_lower_layers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        apply(
            root,
            &[
                E::Dir("a"),
                E::File("a/keep", b"1"),
                E::File("a/gone", b"2"),
                E::Dir("o"),
                E::File("o/lower", b"3"),
                E::Sym("link", "/a/keep"),
            ],
        )
        .unwrap();
        apply(
            root,
            &[
                E::File("a/.wh.gone", b""),
                E::Dir("o"),
                E::File("o/.wh..wh..opq", b""),
                E::File("o/upper", b"4"),
                E::File(".wh.link", b""),
                E::Hard("a/hard", "a/keep"),
                E::Dir(".wh..wh.plnk"),
                E::File(".wh..wh.plnk/1.2", b"aufs"),
            ],
        )
        .unwrap();
        assert!(root.join("a/keep").exists());
        assert!(!root.join("a/gone").exists());
        assert!(!root.join("a/.wh.gone").exists());
        assert!(!root.join("o/lower").exists());
        assert_eq!(fs::read(root.join("o/upper")).unwrap(), b"4");
        assert!(fs::symlink_metadata(root.join("link")).is_err());
        assert_eq!(fs::read(root.join("a/hard")).unwrap(), b"1");
        assert!(!root.join(".wh..wh.plnk").exists(), "AUFS metadata skipped");
    }

    #[test]
    fn escapes_are_refused_and_nothing_lands_outside() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(outer.path().join("secret"), b"s").unwrap();
        let cases: Vec<Vec<E<'_>>> = vec![
            vec![E::File("../evil", b"x")],
            vec![E::File("/abs", b"x")],
            vec![E::File("a/../../evil", b"x")],
            vec![E::Sym("up", ".."), E::File("up/evil", b"x")],
            vec![E::Sym("esc", "/"), E::Dir("esc/evil")],
            vec![E::Hard("h", "../secret")],
            vec![E::Sym("s", ".."), E::Hard("h", "s/secret")],
            vec![E::File(".wh...", b"")],
        ];
        for case in cases {
            let err = apply(&root, &case).unwrap_err();
            assert!(
                matches!(
                    err,
                    UnpackError::PathEscape(_)
                        | UnpackError::ThroughSymlink(_)
                        | UnpackError::BadHardLink { .. }
                ),
                "{err}"
            );
        }
        let names: Vec<_> = fs::read_dir(outer.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(fs::read(outer.path().join("secret")).unwrap(), b"s");
    }

    #[test]
    fn bombs_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![0u8; 2 << 20];
        let err = apply(dir.path(), &[E::File("big", &big)]).unwrap_err();
        assert!(matches!(err, UnpackError::TooLarge(_)), "{err}");
        // Through gzip too: a small blob that inflates past the bound.
        let tar = tar_of(&[E::File("big", &big)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        assert!(gz.len() < 64 * 1024);
        let reader = decompress(&gz[..]).unwrap();
        let mut stats = UnpackStats::default();
        let err = apply_layer(
            dir.path(),
            reader,
            &limits(),
            &AtomicBool::new(false),
            &mut stats,
        )
        .err()
        .expect("bomb refused");
        assert!(matches!(err, UnpackError::TooLarge(_)), "{err}");
    }

    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        // "<len> <key>=<value>\n", where <len> counts itself too.
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        let mut out = format!("{len} {key}=").into_bytes();
        out.extend_from_slice(value);
        out.push(b'\n');
        out
    }

    #[test]
    fn owners_modes_devices_and_xattrs_are_applied() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (lchown, mknod): run the tests as root"
        );
        let mut b = tar::Builder::new(Vec::new());
        let header = |kind, path: &str, mode, uid, gid, size| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_path(path).unwrap();
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(gid);
            h.set_mtime(0);
            h.set_size(size);
            h
        };
        let pax = pax_record("SCHILY.xattr.user.vmpod", b"yes");
        let mut h = header(
            tar::EntryType::XHeader,
            "PaxHeader/f",
            0o644,
            0,
            0,
            pax.len() as u64,
        );
        h.set_cksum();
        b.append(&h, &pax[..]).unwrap();
        let mut h = header(tar::EntryType::Regular, "f", 0o4755, 1000, 2000, 1);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let mut h = header(tar::EntryType::Char, "null", 0o666, 0, 0, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let mut h = header(tar::EntryType::Fifo, "pipe", 0o600, 0, 0, 0);
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let data = b.into_inner().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let limits = UnpackLimits {
            preserve_ownership: true,
            ..limits()
        };
        let mut stats = UnpackStats::default();
        apply_layer(
            dir.path(),
            &data[..],
            &limits,
            &AtomicBool::new(false),
            &mut stats,
        )
        .unwrap();

        let f = fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!((f.uid(), f.gid()), (1000, 2000));
        assert_eq!(f.mode() & 0o7777, 0o4755, "set-uid survives the chown");
        let null = fs::metadata(dir.path().join("null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
        assert_eq!(null.mode() & 0o777, 0o666);
        assert!(
            fs::metadata(dir.path().join("pipe"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        let path = CString::new(dir.path().join("f").as_os_str().as_bytes()).unwrap();
        let name = CString::new("user.vmpod").unwrap();
        let mut value = [0u8; 16];
        // SAFETY: valid C strings and a live buffer whose length is passed.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert_eq!(
            n, 3,
            "user.vmpod xattr set (the scratch fs supports user xattrs)"
        );
        assert_eq!(&value[..3], b"yes");
    }

    #[test]
    fn diff_ids_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[E::File("f", b"x")]);
        let blob = dir.path().join("blob");
        fs::write(&blob, &tar).unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let good = format!("sha256:{}", hex(&Sha256::digest(&tar)));
        let layer = |diff_id: &str| LayerSource {
            path: blob.clone(),
            diff_id: Some(diff_id.to_string()),
        };
        let cancel = AtomicBool::new(false);
        unpack_layers(&root, &[layer(&good)], &limits(), &cancel).unwrap();
        let bad = format!("sha256:{}", "0".repeat(64));
        let err = unpack_layers(&root, &[layer(&bad)], &limits(), &cancel).unwrap_err();
        assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");
    }

    #[test]
    fn zstd_and_plain_layers_are_recognised() {
        let tar = tar_of(&[E::File("f", b"zstd")]);
        let z = ruzstd::encoding::compress_to_vec(
            &tar[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut out = Vec::new();
        decompress(&z[..]).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, tar);
        let mut out = Vec::new();
        decompress(&tar[..]).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, tar);
        // Several frames in a row (as chunked zstd writers produce).
        let (a, b) = tar.split_at(700);
        let mut frames =
            ruzstd::encoding::compress_to_vec(a, ruzstd::encoding::CompressionLevel::Fastest);
        frames.extend(ruzstd::encoding::compress_to_vec(
            b,
            ruzstd::encoding::CompressionLevel::Fastest,
        ));
        let mut out = Vec::new();
        decompress(&frames[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, tar);
        assert!(matches!(
            decompress(&b"garbage that is not a layer"[..]),
            Err(UnpackError::UnsupportedCompression)
        ));
    }
}
