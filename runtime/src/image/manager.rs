//! The image manager: pulls and imports into the store, unpacks each image
//! once into its erofs rootfs, and answers lookups by any reference.
//!
//! Concurrent work on the same thing is coalesced with keyed locks: two
//! pulls of one reference run one after the other (the second finds
//! everything in place), a layer shared by two images is downloaded once,
//! and an image ID is unpacked once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};

use super::erofs::{self, ErofsError};
use super::manifest::{self, ManifestError, Platform};
use super::pull::{Credentials, Progress, PullError, PullEvent, Puller, RegistryConfig};
use super::reference::{ImageReference, ReferenceError, is_sha256_hex};
use super::store::{ImageRecord, LayerRecord, Store, StoreError};
use super::unpack::{self, UnpackError, UnpackLimits};

/// Errors of image operations; the CRI service maps them to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference is malformed.
    #[error("invalid image reference")]
    Reference(#[from] ReferenceError),
    /// No image matches.
    #[error("image {0:?} not found")]
    NotFound(String),
    /// The pull failed.
    #[error("pulling {0}")]
    Pull(String, #[source] PullError),
    /// The image's manifest or config is unusable.
    #[error("image {0}")]
    Manifest(String, #[source] ManifestError),
    /// A layer could not be unpacked (or was refused).
    #[error("unpacking image {0}")]
    Unpack(String, #[source] UnpackError),
    /// The erofs image could not be built.
    #[error("building the rootfs of image {0}")]
    Erofs(String, #[source] ErofsError),
    /// The store failed.
    #[error("image store")]
    Store(#[from] StoreError),
    /// The image is in use and cannot be removed.
    #[error("image {0} is in use by a container")]
    InUse(String),
    /// An import source is unusable.
    #[error("importing {}", path.display())]
    Import {
        /// The layout or archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: super::import::ImportError,
    },
    /// A blocking task died.
    #[error("image task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Settings of the image manager; the daemon's TOML config embeds it
/// (`[image]`, with `[image.registry]` and `[image.unpack]`).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Registry endpoints, timeouts and bounds.
    pub registry: RegistryConfig,
    /// The platform picked from indexes.
    pub platform: Platform,
    /// Bounds on unpacking.
    pub unpack: UnpackLimits,
    /// Bound on one `mkfs.erofs` run, in seconds.
    pub erofs_timeout_secs: u64,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            registry: RegistryConfig::default(),
            platform: Platform::default(),
            unpack: UnpackLimits::default(),
            erofs_timeout_secs: 600,
        }
    }
}

/// What [`ImageManager::remove`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removed {
    /// Nothing matched.
    NotFound,
    /// One tag was dropped; the image stays for its other references.
    Untagged(String),
    /// The image and its rootfs are gone.
    Deleted(ImageRecord),
}

/// Bytes and inodes the store occupies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsUsage {
    /// Bytes allocated on disk.
    pub bytes: u64,
    /// Inodes (files and directories).
    pub inodes: u64,
}

/// Pulls, imports, lookups and removal of images.
pub struct ImageManager {
    store: Store,
    puller: Puller,
    unpack: UnpackLimits,
    erofs_timeout: Duration,
    locks: KeyedLocks,
}

impl std::fmt::Debug for ImageManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageManager")
            .field("root", &self.store.root())
            .finish_non_exhaustive()
    }
}

/// Sets its flag when dropped: tells a blocking unpack that nobody waits.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Hands a scratch tree to [`Store::discard`] when dropped.
struct DiscardOnDrop<'a> {
    store: &'a Store,
    dir: Option<tempfile::TempDir>,
}

impl DiscardOnDrop<'_> {
    fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new(""), |d| d.path())
    }
}

impl Drop for DiscardOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            self.store.discard(dir);
        }
    }
}

/// What to record for an image whose manifest and config are in the store.
pub(crate) struct Commit {
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub manifest_digest: String,
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    pub layers: Vec<LayerRecord>,
}

impl ImageManager {
    /// Opens the store under `state_dir`.
    pub fn open(state_dir: &Path, config: ImageConfig) -> Result<Self, ImageError> {
        Ok(Self {
            store: Store::open(state_dir)?,
            puller: Puller::new(config.registry, config.platform),
            unpack: config.unpack,
            erofs_timeout: Duration::from_secs(config.erofs_timeout_secs.max(1)),
            locks: KeyedLocks::default(),
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// All images.
    pub fn list(&self) -> Vec<ImageRecord> {
        self.store.list()
    }

    /// The erofs rootfs of an image ID (what a VM gets as a disk).
    pub fn rootfs(&self, id: &str) -> Option<PathBuf> {
        self.store.get(id).map(|r| self.store.rootfs_path(&r.id))
    }

    /// Finds an image by ID (`sha256:<hex>`, `<hex>` or a unique hex prefix
    /// of at least 12 digits), `name:tag` or `name@digest`, in any of the
    /// forms users write them.
    pub fn find(&self, query: &str) -> Option<ImageRecord> {
        let hex = query.strip_prefix("sha256:").unwrap_or(query);
        if is_sha256_hex(hex) {
            if let Some(r) = self.store.get(&format!("sha256:{hex}")) {
                return Some(r);
            }
        } else if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matches: Vec<_> = self
                .store
                .list()
                .into_iter()
                .filter(|r| r.id_hex().starts_with(hex))
                .collect();
            if matches.len() == 1 {
                return matches.into_iter().next();
            }
        }
        let reference = ImageReference::parse(query).ok()?;
        let images = self.store.list();
        if let Some(digest) = reference.digest() {
            let wanted = reference.repo_digest(digest);
            return images
                .into_iter()
                .find(|r| r.repo_digests.contains(&wanted));
        }
        let tag = reference.repo_tag()?;
        images.into_iter().find(|r| r.repo_tags.contains(&tag))
    }

    /// Pulls an image and returns its record.
    pub async fn pull(
        &self,
        reference: &str,
        credentials: &Credentials,
        progress: Progress<'_>,
    ) -> Result<ImageRecord, ImageError> {
        let reference = ImageReference::parse(reference)?;
        let name = reference.to_string();
        let _pull = self.locks.lock(format!("pull:{name}")).await;
        let remote = self
            .puller
            .resolve(&reference, credentials)
            .await
            .map_err(|e| ImageError::Pull(name.clone(), e))?;
        progress(PullEvent::Resolved {
            endpoint: remote.endpoint().to_string(),
            layers: remote.layers.len(),
            bytes: remote.layers.iter().map(|l| l.size).sum(),
        });
        self.store
            .write_blob(&remote.manifest_digest, &remote.manifest_bytes)?;
        self.store
            .write_blob(&remote.config_digest, &remote.config_bytes)?;
        if self.store.get(&remote.config_digest).is_none() {
            let max = self.puller.config().max_layer_bytes;
            let parallel = self.puller.config().max_concurrent_downloads.max(1);
            let remote = &remote;
            futures_util::stream::iter(remote.layers.clone())
                .map(|layer: LayerRecord| async move {
                    let _blob = self.locks.lock(format!("blob:{}", layer.digest)).await;
                    if self.store.has_blob(&layer.digest) {
                        progress(PullEvent::LayerCached {
                            digest: layer.digest.clone(),
                        });
                        return Ok(());
                    }
                    remote.fetch_layer(&self.store, &layer, max, progress).await
                })
                .buffer_unordered(parallel)
                .try_collect::<Vec<()>>()
                .await
                .map_err(|e| ImageError::Pull(name.clone(), e))?;
        }
        progress(PullEvent::Unpacking);
        self.commit(Commit {
            // A pinned digest names the image; as containerd (whose
            // reference parser drops the tag of `name:tag@digest`), no tag.
            repo_tags: match reference.digest() {
                Some(_) => Vec::new(),
                None => reference.repo_tag().into_iter().collect(),
            },
            repo_digests: vec![reference.repo_digest(&remote.repo_digest)],
            manifest_digest: remote.manifest_digest.clone(),
            config_digest: remote.config_digest.clone(),
            config_bytes: remote.config_bytes.clone(),
            layers: remote.layers.clone(),
        })
        .await
    }

    /// Records an image whose blobs are all in the store, building its
    /// rootfs first if no other tag of it did.
    pub(crate) async fn commit(&self, c: Commit) -> Result<ImageRecord, ImageError> {
        let id = c.config_digest.clone();
        let config = manifest::parse_config(&c.config_bytes)
            .map_err(|e| ImageError::Manifest(id.clone(), e))?;
        let _unpack = self.locks.lock(format!("rootfs:{id}")).await;
        if config.diff_ids.len() != c.layers.len() {
            return Err(ImageError::Manifest(
                id,
                ManifestError::InvalidDescriptor(format!(
                    "{} layers but {} diff_ids",
                    c.layers.len(),
                    config.diff_ids.len()
                )),
            ));
        }
        let rootfs = self.store.rootfs_path(&id);
        if !rootfs.exists() {
            self.build_rootfs(&id, &c.layers, &config.diff_ids, &rootfs)
                .await?;
        }
        let rootfs_size = std::fs::metadata(&rootfs).map(|m| m.len()).unwrap_or(0);
        let record = ImageRecord {
            id,
            repo_tags: c.repo_tags,
            repo_digests: c.repo_digests,
            manifest_digest: c.manifest_digest,
            size: c.config_bytes.len() as u64 + c.layers.iter().map(|l| l.size).sum::<u64>(),
            layers: c.layers,
            user: config.user,
            rootfs_size,
            pulled_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        };
        Ok(self.store.put(record)?)
    }

    async fn build_rootfs(
        &self,
        id: &str,
        layers: &[LayerRecord],
        diff_ids: &[String],
        rootfs: &Path,
    ) -> Result<(), ImageError> {
        let paths = layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| {
                let path = self.store.blob_path(&l.digest)?;
                if path.is_file() {
                    Ok(unpack::LayerSource {
                        path,
                        diff_id: Some(diff_id.clone()),
                    })
                } else {
                    Err(StoreError::MissingBlob(l.digest.clone()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let scratch = self.store.scratch_dir()?;
        let started = std::time::Instant::now();
        let cancel = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let limits = self.unpack;
        // The closure owns the scratch dir: a cancelled pull's unpack stops
        // at the next entry and its directory goes with it.
        let (scratch, result) = tokio::task::spawn_blocking(move || {
            let root = scratch.path().join("rootfs");
            // 0755 whatever the daemon's umask: non-root container users
            // must be able to traverse `/`.
            let result = std::fs::create_dir(&root)
                .and_then(|()| {
                    std::fs::set_permissions(
                        &root,
                        std::os::unix::fs::PermissionsExt::from_mode(0o755),
                    )
                })
                .map_err(|source| UnpackError::Io {
                    op: "creating",
                    path: root.clone(),
                    source,
                })
                .and_then(|()| unpack::unpack_layers(&root, &paths, &limits, &cancel));
            (scratch, result)
        })
        .await
        .map_err(ImageError::Task)?;
        // From here on, however this ends (error, cancel), the tree goes to
        // the background deleter.
        let scratch = DiscardOnDrop {
            store: &self.store,
            dir: Some(scratch),
        };
        let stats = result.map_err(|e| ImageError::Unpack(id.to_string(), e))?;
        let unpacked = started.elapsed();
        let built = erofs::build(&scratch.path().join("rootfs"), rootfs, self.erofs_timeout).await;
        drop(scratch);
        tracing::info!(
            id,
            bytes = stats.bytes,
            entries = stats.entries,
            unpack_s = unpacked.as_secs_f64(),
            erofs_s = (started.elapsed() - unpacked).as_secs_f64(),
            "rootfs built"
        );
        built.map_err(|e| ImageError::Erofs(id.to_string(), e))?;
        Ok(())
    }

    /// Removes an image by any reference. A tag of an image with other
    /// references only loses that tag; an ID, a digest or the last tag
    /// deletes the image, unless `in_use` says a container uses it.
    ///
    /// Holds the image's rootfs lock, so it cannot interleave with a pull
    /// committing the same image (which could leave a record whose rootfs
    /// was just deleted).
    pub async fn remove(
        &self,
        query: &str,
        in_use: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Removed, ImageError> {
        let Some(found) = self.find(query) else {
            return Ok(Removed::NotFound);
        };
        let _rootfs = self.locks.lock(format!("rootfs:{}", found.id)).await;
        // Re-read under the lock: a pull may have changed its tags.
        let Some(mut record) = self.store.get(&found.id) else {
            return Ok(Removed::NotFound);
        };
        let tag = ImageReference::parse(query)
            .ok()
            .filter(|r| r.digest().is_none())
            .and_then(|r| r.repo_tag())
            .filter(|t| record.repo_tags.contains(t));
        if let Some(tag) = tag
            && record.repo_tags.len() > 1
        {
            record.repo_tags.retain(|t| *t != tag);
            self.store.replace(record)?;
            return Ok(Removed::Untagged(tag));
        }
        if in_use(&record.id) {
            return Err(ImageError::InUse(record.id));
        }
        match self.store.remove(&record.id)? {
            Some(r) => Ok(Removed::Deleted(r)),
            None => Ok(Removed::NotFound),
        }
    }

    /// Bytes and inodes under the state dir.
    pub async fn fs_usage(&self) -> Result<FsUsage, ImageError> {
        let root = self.store.root().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut usage = FsUsage::default();
            let mut stack = vec![root];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let Ok(meta) = entry.metadata() else { continue };
                    usage.inodes += 1;
                    usage.bytes += std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
                    if meta.is_dir() {
                        stack.push(entry.path());
                    }
                }
            }
            usage
        })
        .await
        .map_err(ImageError::Task)
    }
}

/// Async locks by name, dropped when nobody holds or waits for them.
#[derive(Default)]
struct KeyedLocks {
    map: std::sync::Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            match map.get(&key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_toml_with_defaults() {
        let config: ImageConfig = toml::from_str(
            r#"
            erofs_timeout_secs = 30
            [registry.hosts."docker.io"]
            endpoints = [{ host = "mirror.local:5000", plain_http = true }]
            [unpack]
            max_bytes = 1048576
            [platform]
            architecture = "arm64"
            variant = "v8"
            "#,
        )
        .unwrap();
        assert_eq!(config.erofs_timeout_secs, 30);
        assert_eq!(config.unpack.max_bytes, 1 << 20);
        assert_eq!(
            config.unpack.max_entries,
            UnpackLimits::default().max_entries
        );
        assert_eq!(config.platform.os, "linux");
        assert_eq!(config.platform.variant.as_deref(), Some("v8"));
        assert_eq!(
            config.registry.endpoints("docker.io")[0].host,
            "mirror.local:5000"
        );
        let empty: ImageConfig = toml::from_str("").unwrap();
        assert_eq!(empty.platform, Platform::default());
        assert!(toml::from_str::<ImageConfig>("nonsense = true").is_err());
    }
}
