//! Offline import of OCI image layouts (a directory with `oci-layout`,
//! `index.json` and `blobs/`) and of OCI archives (a tar of one), such as
//! the demo image `guest-image/demo-image/build.sh` makes.
//!
//! Every blob is verified against its digest on the way into the store;
//! names come from the `io.containerd.image.name` annotation, or from
//! `org.opencontainers.image.ref.name` when that is a full reference.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex};

use super::manager::{Commit, ImageError, ImageManager};
use super::manifest::{self, Document, ManifestError};
use super::reference::{ImageReference, is_sha256_hex};
use super::store::{ImageRecord, LayerRecord, StoreError};

const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";
const MAX_ARCHIVE_ENTRY: u64 = 16 << 30;

/// Why a layout or archive cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Not an OCI layout (no `oci-layout` or `index.json`).
    #[error("not an OCI image layout or archive: {0}")]
    NotALayout(&'static str),
    /// The index, a manifest or a config is unusable.
    #[error("bad image metadata")]
    Manifest(#[from] ManifestError),
    /// A blob the index needs is not there.
    #[error("blob {0} is missing from the layout")]
    MissingBlob(String),
    /// A blob does not match its digest (or is too large).
    #[error("blob of the layout")]
    Blob(#[source] StoreError),
    /// Reading the layout or archive failed.
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
    /// The index lists no image.
    #[error("the index lists no image")]
    Empty,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImportError + 'a {
    move |source| ImportError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl ImageManager {
    /// Imports every image of an OCI layout directory or OCI archive.
    pub async fn import(&self, path: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        let wrap = |source| ImageError::Import {
            path: path.to_path_buf(),
            source,
        };
        let scratch;
        let layout = if path.is_dir() {
            path.to_path_buf()
        } else {
            scratch = self.store().scratch_dir()?;
            let dest = scratch.path().to_path_buf();
            let src = path.to_path_buf();
            tokio::task::spawn_blocking(move || extract_archive(&src, &dest))
                .await
                .map_err(ImageError::Task)?
                .map_err(wrap)?;
            scratch.path().to_path_buf()
        };
        let images = read_layout(&layout, self).map_err(wrap)?;
        let mut records = Vec::new();
        for image in images {
            records.push(self.commit(image).await?);
        }
        Ok(records)
    }
}

/// Reads the index and copies (verifying) every blob the images need into
/// the store.
fn read_layout(layout: &Path, manager: &ImageManager) -> Result<Vec<Commit>, ImportError> {
    if !layout.join("oci-layout").is_file() {
        return Err(ImportError::NotALayout("no oci-layout file"));
    }
    let index_path = layout.join("index.json");
    let index_bytes = read_bounded(&index_path, manifest::MAX_MANIFEST_BYTES)?;
    let index: ImageIndex = serde_json::from_slice(&index_bytes)
        .map_err(|e| ManifestError::Malformed("index.json", e))?;
    let blob = |digest: &str| -> Result<PathBuf, ImportError> {
        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
        if !is_sha256_hex(hex) {
            return Err(ImportError::MissingBlob(digest.to_string()));
        }
        let p = layout.join("blobs/sha256").join(hex);
        if p.is_file() {
            Ok(p)
        } else {
            Err(ImportError::MissingBlob(digest.to_string()))
        }
    };
    let store = manager.store();
    let put = |digest: &str, limit: u64| -> Result<(), ImportError> {
        store
            .import_file(digest, &blob(digest)?, limit)
            .map_err(ImportError::Blob)
    };
    let mut commits = Vec::new();
    for desc in index.manifests() {
        let name = image_name(desc);
        let top = manifest::digest_of(desc)?;
        put(&top, manifest::MAX_MANIFEST_BYTES)?;
        let bytes = store
            .read_blob(&top, manifest::MAX_MANIFEST_BYTES)
            .map_err(ImportError::Blob)?;
        let (manifest_digest, m) = match manifest::parse(&bytes, Some(desc.media_type().as_ref()))?
        {
            Document::Manifest(m) => (top.clone(), m),
            Document::Index(inner) => {
                let chosen = manifest::select(&inner, &manifest::Platform::default())?;
                let digest = manifest::digest_of(&chosen)?;
                put(&digest, manifest::MAX_MANIFEST_BYTES)?;
                let bytes = store
                    .read_blob(&digest, manifest::MAX_MANIFEST_BYTES)
                    .map_err(ImportError::Blob)?;
                match manifest::parse(&bytes, None)? {
                    Document::Manifest(m) => (digest, m),
                    Document::Index(_) => {
                        return Err(
                            ManifestError::UnsupportedMediaType("nested index".into()).into()
                        );
                    }
                }
            }
        };
        let config_digest = manifest::digest_of(m.config())?;
        put(&config_digest, manifest::MAX_CONFIG_BYTES)?;
        let config_bytes = store
            .read_blob(&config_digest, manifest::MAX_CONFIG_BYTES)
            .map_err(ImportError::Blob)?;
        let mut layers = Vec::new();
        for l in m.layers() {
            let digest = manifest::digest_of(l)?;
            put(&digest, l.size())?;
            layers.push(LayerRecord {
                digest,
                media_type: l.media_type().to_string(),
                size: l.size(),
            });
        }
        commits.push(Commit {
            repo_tags: name.iter().filter_map(|n| n.repo_tag()).collect(),
            repo_digests: name.iter().map(|n| n.repo_digest(&top)).collect(),
            manifest_digest,
            config_digest,
            config_bytes,
            layers,
        });
    }
    if commits.is_empty() {
        return Err(ImportError::Empty);
    }
    Ok(commits)
}

/// The name of an index entry, when it carries a full one.
fn image_name(desc: &Descriptor) -> Option<ImageReference> {
    let empty = HashMap::new();
    let annotations = desc.annotations().as_ref().unwrap_or(&empty);
    annotations
        .get(CONTAINERD_NAME)
        .or_else(|| annotations.get(OCI_REF_NAME).filter(|n| n.contains('/')))
        .and_then(|n| ImageReference::parse(n).ok())
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ImportError> {
    let file = std::fs::File::open(path).map_err(io("opening", path))?;
    let mut data = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(io("reading", path))?;
    if data.len() as u64 > limit {
        return Err(ImportError::NotALayout("index.json too large"));
    }
    Ok(data)
}

/// Extracts the parts of an OCI archive that matter (`oci-layout`,
/// `index.json`, `blobs/sha256/<hex>`) as plain files; everything else,
/// including any link or odd path, is ignored.
fn extract_archive(src: &Path, dest: &Path) -> Result<(), ImportError> {
    let file = std::fs::File::open(src).map_err(io("opening", src))?;
    let reader = super::unpack::decompress(std::io::BufReader::new(file))
        .map_err(|_| ImportError::NotALayout("not a tar archive"))?;
    let mut archive = tar::Archive::new(reader);
    let blobs = dest.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io("creating", &blobs))?;
    let entries = archive.entries().map_err(io("reading", src))?;
    for entry in entries {
        let mut entry = entry.map_err(io("reading", src))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().map_err(io("reading", src))?.into_owned();
        let parts: Vec<String> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let out = match parts
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["oci-layout"] => dest.join("oci-layout"),
            ["index.json"] => dest.join("index.json"),
            ["blobs", "sha256", hex] if is_sha256_hex(hex) => blobs.join(hex),
            _ => continue,
        };
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::RootDir))
        {
            continue;
        }
        // A compressed archive could inflate without end: bound every file.
        if entry.size() > MAX_ARCHIVE_ENTRY {
            return Err(ImportError::NotALayout("archive entry too large"));
        }
        let mut f = std::fs::File::create(&out).map_err(io("creating", &out))?;
        std::io::copy(&mut (&mut entry).take(MAX_ARCHIVE_ENTRY), &mut f)
            .map_err(io("writing", &out))?;
    }
    Ok(())
}
