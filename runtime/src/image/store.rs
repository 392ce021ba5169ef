//! The image store under the state dir:
//!
//! ```text
//! <state>/blobs/sha256/<hex>     content-addressed blobs, only ever verified ones
//! <state>/ingest/                downloads in progress (emptied at open)
//! <state>/images/<id hex>.json   one record per image: what makes it visible
//! <state>/rootfs/<id hex>.erofs  the read-only root filesystem, shared by all pods
//! <state>/tmp/                   unpack scratch (emptied at open)
//! <state>/trash/                 scratch trees being deleted in the background
//! ```
//!
//! An image is visible only once its record is written, and the record is
//! written (temp file + rename) after its blobs and its erofs image exist:
//! a crash at any point leaves either the old state or the whole new image.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::reference::{is_sha256_hex, validate_digest};

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
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
    /// Content did not hash to the digest it was announced with.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The announced digest.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// Content is larger than announced or allowed.
    #[error("blob {digest} is larger than {limit} bytes")]
    TooLarge {
        /// The blob.
        digest: String,
        /// The bound.
        limit: u64,
    },
    /// The digest is malformed.
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    /// A blob the caller needs is not in the store.
    #[error("blob {0} is not in the store")]
    MissingBlob(String),
    /// Another process (a daemon, a CLI) has the store open.
    #[error("the image store {} is in use by another process", .0.display())]
    Locked(PathBuf),
    /// An image record could not be encoded.
    #[error("encoding the record of image {0}")]
    Encode(String, #[source] serde_json::Error),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A layer of an image as the registry described it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// Digest of the (compressed) blob.
    pub digest: String,
    /// Media type from the manifest.
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
}

/// Everything the daemon knows about one image; persisted as JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The image ID: the config digest.
    pub id: String,
    /// `name:tag` references that point at this image.
    pub repo_tags: Vec<String>,
    /// `name@digest` references (manifest or index digest).
    pub repo_digests: Vec<String>,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    /// The layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// Bytes of config + layers: what the registry transferred.
    pub size: u64,
    /// The `User` of the image config (`1000`, `nobody`, `1000:1000`, or empty).
    pub user: String,
    /// Bytes of the erofs image.
    pub rootfs_size: u64,
    /// Unix seconds when the image was pulled or imported.
    pub pulled_at: i64,
}

impl ImageRecord {
    /// The hex part of the ID: names the record and the erofs file.
    pub fn id_hex(&self) -> &str {
        self.id.strip_prefix("sha256:").unwrap_or(&self.id)
    }

    /// Every blob the image needs (config, manifest, layers).
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        [self.id.as_str(), self.manifest_digest.as_str()]
            .into_iter()
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }
}

/// The on-disk store; the record map is the in-memory truth after `open`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    images: Mutex<BTreeMap<String, ImageRecord>>,
    /// Held while open: `open` empties the scratch dirs, which must never
    /// happen under another process's running pull.
    _lock: nix::fcntl::Flock<fs::File>,
}

impl Store {
    /// Opens (creating) the store at `root`, drops leftovers of interrupted
    /// pulls and loads the image records.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(root).map_err(io("creating", root))?;
        let lock_path = root.join("store.lock");
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("opening", &lock_path))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::Locked(root.to_path_buf()))?;
        for dir in ["blobs/sha256", "images", "rootfs"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io("creating", &p))?;
        }
        for scratch in ["ingest", "tmp", "trash"] {
            let p = root.join(scratch);
            // A deleter thread of an earlier store in this process may be
            // removing the same trees: losing that race is fine.
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).map_err(io("creating", &p))?;
        }
        let mut images = BTreeMap::new();
        let dir = root.join("images");
        for entry in fs::read_dir(&dir).map_err(io("reading", &dir))? {
            let entry = entry.map_err(io("reading", &dir))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                // A record temp file of a crashed write.
                let _ = fs::remove_file(&path);
                continue;
            }
            let record: ImageRecord = match fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => r,
                None => {
                    tracing::warn!(path = %path.display(), "ignoring unreadable image record");
                    continue;
                }
            };
            let rootfs = root
                .join("rootfs")
                .join(format!("{}.erofs", record.id_hex()));
            if validate_digest(&record.id).is_err() || !rootfs.exists() {
                tracing::warn!(path = %path.display(), "ignoring image record without its rootfs");
                continue;
            }
            images.insert(record.id.clone(), record);
        }
        // Rootfs images nobody records: a crash after mkfs, before the record.
        let rootfs_dir = root.join("rootfs");
        for entry in fs::read_dir(&rootfs_dir).map_err(io("reading", &rootfs_dir))? {
            let entry = entry.map_err(io("reading", &rootfs_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = name
                .strip_suffix(".erofs")
                .is_some_and(|hex| images.contains_key(&format!("sha256:{hex}")));
            if !keep {
                let _ = fs::remove_file(entry.path());
            }
        }
        // Blobs no image references: left by pulls that failed or were
        // cancelled after some content was verified. Nothing else runs yet.
        let referenced: std::collections::HashSet<&str> =
            images.values().flat_map(|r| r.blobs()).collect();
        let blob_dir = root.join("blobs/sha256");
        for entry in fs::read_dir(&blob_dir).map_err(io("reading", &blob_dir))? {
            let entry = entry.map_err(io("reading", &blob_dir))?;
            let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
            if !referenced.contains(digest.as_str()) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            images: Mutex::new(images),
            _lock: lock,
        })
    }

    /// The state dir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| is_sha256_hex(h))
            .ok_or_else(|| StoreError::InvalidDigest(digest.to_string()))?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    /// Whether a verified blob is present.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    /// Reads a whole blob, refusing more than `limit` bytes.
    pub fn read_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest)?;
        let meta = fs::metadata(&path).map_err(|_| StoreError::MissingBlob(digest.to_string()))?;
        if meta.len() > limit {
            return Err(StoreError::TooLarge {
                digest: digest.to_string(),
                limit,
            });
        }
        fs::read(&path).map_err(io("reading", &path))
    }

    /// Verifies and stores a blob held in memory.
    pub fn write_blob(&self, digest: &str, data: &[u8]) -> Result<(), StoreError> {
        let actual = sha256_digest(data);
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        let path = self.blob_path(digest)?;
        if path.is_file() {
            return Ok(());
        }
        let ingest = self.root.join("ingest");
        let mut tmp =
            tempfile::NamedTempFile::new_in(&ingest).map_err(io("creating in", &ingest))?;
        tmp.write_all(data).map_err(io("writing", tmp.path()))?;
        tmp.persist(&path)
            .map_err(|e| io("renaming to", &path)(e.error))?;
        Ok(())
    }

    /// Copies a file into the store as blob `digest`, verifying it on the
    /// way and refusing more than `limit` bytes.
    pub fn import_file(&self, digest: &str, src: &Path, limit: u64) -> Result<(), StoreError> {
        use std::io::Read;
        let dest = self.blob_path(digest)?;
        if dest.is_file() {
            return Ok(());
        }
        let mut input = fs::File::open(src).map_err(io("opening", src))?;
        let ingest = self.root.join("ingest");
        let mut tmp =
            tempfile::NamedTempFile::new_in(&ingest).map_err(io("creating in", &ingest))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(io("reading", src))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > limit {
                return Err(StoreError::TooLarge {
                    digest: digest.to_string(),
                    limit,
                });
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io("writing", src))?;
        }
        let actual = format!("sha256:{}", hex(&hasher.finalize()));
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        tmp.persist(&dest)
            .map_err(|e| io("renaming to", &dest)(e.error))?;
        Ok(())
    }

    /// Starts writing a blob that arrives in pieces; nothing is visible
    /// until [`BlobWriter::commit`] has verified it.
    pub fn blob_writer(&self, digest: &str, limit: u64) -> Result<BlobWriter, StoreError> {
        let dest = self.blob_path(digest)?;
        let ingest = self.root.join("ingest");
        let tmp = tempfile::NamedTempFile::new_in(&ingest).map_err(io("creating in", &ingest))?;
        let (file, path) = tmp.into_parts();
        Ok(BlobWriter {
            digest: digest.to_string(),
            dest,
            file: tokio::fs::File::from_std(file),
            path,
            hasher: Sha256::new(),
            written: 0,
            limit,
        })
    }

    /// A fresh scratch directory (removed when dropped).
    pub fn scratch_dir(&self) -> Result<tempfile::TempDir, StoreError> {
        let tmp = self.root.join("tmp");
        tempfile::TempDir::new_in(&tmp).map_err(io("creating in", &tmp))
    }

    /// Deletes a scratch tree off the caller's path: it is moved to
    /// `trash/` (one rename) and removed by a background thread, so a pull
    /// returns as soon as its rootfs exists. Whatever a process exit
    /// interrupts is removed at the next open.
    pub fn discard(&self, dir: tempfile::TempDir) {
        let path = dir.keep();
        let Some(name) = path.file_name() else {
            let _ = fs::remove_dir_all(&path);
            return;
        };
        let target = self.root.join("trash").join(name);
        let doomed = match fs::rename(&path, &target) {
            Ok(()) => target,
            Err(_) => path,
        };
        let spawned = std::thread::Builder::new()
            .name("vmpod-trash".into())
            .spawn({
                let doomed = doomed.clone();
                move || {
                    let _ = fs::remove_dir_all(&doomed);
                }
            });
        if spawned.is_err() {
            let _ = fs::remove_dir_all(&doomed);
        }
    }

    /// Where the erofs image of an image ID lives.
    pub fn rootfs_path(&self, id: &str) -> PathBuf {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        self.root.join("rootfs").join(format!("{hex}.erofs"))
    }

    /// All image records.
    pub fn list(&self) -> Vec<ImageRecord> {
        self.lock().values().cloned().collect()
    }

    /// The record of an image ID.
    pub fn get(&self, id: &str) -> Option<ImageRecord> {
        self.lock().get(id).cloned()
    }

    /// Adds a record (merging tags and digests into an existing one of the
    /// same ID) and persists it. Tags move: whoever had a tag the new record
    /// claims loses it.
    pub fn put(&self, record: ImageRecord) -> Result<ImageRecord, StoreError> {
        let mut images = self.lock();
        let mut changed = Vec::new();
        for (id, other) in images.iter_mut() {
            if *id == record.id {
                continue;
            }
            let before = other.repo_tags.len();
            other.repo_tags.retain(|t| !record.repo_tags.contains(t));
            if other.repo_tags.len() != before {
                changed.push(other.clone());
            }
        }
        let merged = match images.get(&record.id) {
            Some(old) => {
                let mut merged = record.clone();
                for t in &old.repo_tags {
                    if !merged.repo_tags.contains(t) {
                        merged.repo_tags.push(t.clone());
                    }
                }
                for d in &old.repo_digests {
                    if !merged.repo_digests.contains(d) {
                        merged.repo_digests.push(d.clone());
                    }
                }
                merged
            }
            None => record,
        };
        self.persist(&merged)?;
        for other in &changed {
            self.persist(other)?;
        }
        images.insert(merged.id.clone(), merged.clone());
        Ok(merged)
    }

    /// Replaces a record as is (used to drop single tags).
    pub fn replace(&self, record: ImageRecord) -> Result<(), StoreError> {
        let mut images = self.lock();
        self.persist(&record)?;
        images.insert(record.id.clone(), record);
        Ok(())
    }

    /// Removes an image: its record first (so it is gone even if a later
    /// step fails), then its rootfs, then blobs no other image uses.
    pub fn remove(&self, id: &str) -> Result<Option<ImageRecord>, StoreError> {
        let mut images = self.lock();
        let Some(record) = images.remove(id) else {
            return Ok(None);
        };
        let path = self.record_path(&record);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                images.insert(record.id.clone(), record);
                return Err(io("removing", &path)(e));
            }
        }
        let _ = fs::remove_file(self.rootfs_path(&record.id));
        for blob in record.blobs() {
            let shared = images.values().any(|r| r.blobs().any(|b| b == blob));
            if !shared && let Ok(p) = self.blob_path(blob) {
                let _ = fs::remove_file(p);
            }
        }
        Ok(Some(record))
    }

    fn record_path(&self, record: &ImageRecord) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", record.id_hex()))
    }

    fn persist(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| StoreError::Encode(record.id.clone(), e))?;
        let dir = self.root.join("images");
        let mut tmp = tempfile::Builder::new()
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(io("creating in", &dir))?;
        tmp.write_all(&bytes).map_err(io("writing", tmp.path()))?;
        tmp.as_file()
            .sync_all()
            .map_err(io("syncing", tmp.path()))?;
        let path = self.record_path(record);
        tmp.persist(&path)
            .map_err(|e| io("renaming to", &path)(e.error))?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ImageRecord>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every update is a single insert/remove), so poisoning is harmless.
        self.images.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A blob being written: hashed as it arrives, bounded, renamed into place
/// only when the digest matches. Dropping it deletes the temp file.
pub struct BlobWriter {
    digest: String,
    dest: PathBuf,
    file: tokio::fs::File,
    path: tempfile::TempPath,
    hasher: Sha256,
    written: u64,
    limit: u64,
}

impl BlobWriter {
    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.written += data.len() as u64;
        if self.written > self.limit {
            return Err(StoreError::TooLarge {
                digest: self.digest.clone(),
                limit: self.limit,
            });
        }
        self.hasher.update(data);
        let path: &Path = &self.path;
        self.file.write_all(data).await.map_err(io("writing", path))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies the digest and moves the blob into the store.
    pub async fn commit(mut self) -> Result<PathBuf, StoreError> {
        let actual = format!("sha256:{}", hex(&self.hasher.finalize_reset()));
        if actual != self.digest {
            return Err(StoreError::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        let path: &Path = &self.path;
        self.file.flush().await.map_err(io("writing", path))?;
        self.path
            .persist(&self.dest)
            .map_err(|e| io("renaming to", &self.dest)(e.error))?;
        Ok(self.dest)
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, tags: &[&str]) -> ImageRecord {
        ImageRecord {
            id: id.to_string(),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: vec![],
            manifest_digest: sha256_digest(b"m"),
            layers: vec![],
            size: 1,
            user: String::new(),
            rootfs_size: 0,
            pulled_at: 0,
        }
    }

    #[tokio::test]
    async fn unverified_blobs_never_become_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello");
        let mut w = store.blob_writer(&digest, 100).unwrap();
        w.write(b"hellO").await.unwrap();
        assert!(matches!(
            w.commit().await,
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(!store.has_blob(&digest));
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);

        let mut w = store.blob_writer(&digest, 3).unwrap();
        assert!(matches!(
            w.write(b"hello").await,
            Err(StoreError::TooLarge { .. })
        ));
        drop(w);
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);

        let mut w = store.blob_writer(&digest, 100).unwrap();
        w.write(b"hel").await.unwrap();
        w.write(b"lo").await.unwrap();
        w.commit().await.unwrap();
        assert_eq!(store.read_blob(&digest, 100).unwrap(), b"hello");
        assert!(store.write_blob(&digest, b"nope").is_err());
    }

    #[test]
    fn discarded_scratch_leaves_tmp_at_once_and_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let scratch = store.scratch_dir().unwrap();
        fs::create_dir_all(scratch.path().join("a/b")).unwrap();
        fs::write(scratch.path().join("a/b/f"), b"x").unwrap();
        store.discard(scratch);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // The deleter thread finishes on its own; a reopen removes the rest.
        drop(store);
        let _store = Store::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("trash")).unwrap().count(), 0);
    }

    #[test]
    fn records_survive_reopen_and_tags_move() {
        let dir = tempfile::tempdir().unwrap();
        let a = sha256_digest(b"a");
        let b = sha256_digest(b"b");
        {
            let store = Store::open(dir.path()).unwrap();
            for id in [&a, &b] {
                fs::write(store.rootfs_path(id), b"x").unwrap();
            }
            store.put(record(&a, &["x/y:1", "x/y:latest"])).unwrap();
            store.put(record(&b, &["x/y:latest"])).unwrap();
        }
        // A crashed record write, an orphan rootfs and an unreferenced blob
        // are cleaned at open.
        fs::write(dir.path().join("images/zzz.json.tmp"), b"{").unwrap();
        fs::write(dir.path().join("rootfs/orphan.erofs"), b"x").unwrap();
        let orphan = sha256_digest(b"orphan");
        let manifest = sha256_digest(b"m");
        {
            let store = Store::open(dir.path()).unwrap();
            store.write_blob(&orphan, b"orphan").unwrap();
            store.write_blob(&manifest, b"m").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.has_blob(&orphan));
        assert!(store.has_blob(&manifest), "referenced blob kept");
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
        assert_eq!(store.get(&a).unwrap().repo_tags, vec!["x/y:1"]);
        assert_eq!(store.get(&b).unwrap().repo_tags, vec!["x/y:latest"]);
        assert!(!dir.path().join("rootfs/orphan.erofs").exists());
        assert!(!dir.path().join("images/zzz.json.tmp").exists());
        store.remove(&a).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(store.get(&a).is_none());
        assert!(!store.rootfs_path(&a).exists());
    }
}
