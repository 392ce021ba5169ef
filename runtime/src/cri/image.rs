//! How the CRI server finds a container image: a name → an erofs rootfs
//! file plus the image config. [`StoreImages`] serves what the image
//! service pulled or imported, then what the config file lists
//! ([`StaticImages`], local OCI layouts).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors from resolving an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0:?} is not present")]
    NotFound(String),
    #[error("reading the OCI layout at {path}")]
    Layout {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the OCI layout at {path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
}

/// The parts of an OCI image config a container runs with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// KEY=VALUE.
    pub env: Vec<String>,
    pub working_dir: String,
    /// "uid[:gid]" or "name[:group]"; "" = root.
    pub user: String,
    /// The image's StopSignal ("" = SIGTERM).
    pub stop_signal: String,
}

/// A present image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The image ID (the config digest).
    pub id: String,
    /// The canonical name it was found under.
    pub name: String,
    /// The read-only rootfs as an erofs image file.
    pub erofs_path: PathBuf,
    pub config: ImageConfig,
}

/// Name → image. Implemented by the image store.
pub trait ImageResolver: Send + Sync {
    /// Resolves a name, a name with tag or an image ID.
    fn resolve(&self, image_ref: &str) -> Result<ResolvedImage, ImageError>;

    /// Every present image (VM pods on hypervisors without disk hot-plug
    /// attach them all at boot).
    fn list(&self) -> Vec<ResolvedImage>;
}

/// One image served from local files, as listed in the config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticImage {
    /// The full name, e.g. `localhost/vmpod/busybox:latest`.
    pub name: String,
    /// The rootfs as an erofs image file.
    pub erofs: PathBuf,
    /// An OCI image layout directory holding the image's config.
    pub oci_layout: PathBuf,
}

/// A fixed set of images.
#[derive(Debug, Default)]
pub struct StaticImages {
    images: HashMap<String, ResolvedImage>,
}

impl StaticImages {
    /// Loads every image's config from its OCI layout.
    pub fn load(list: &[StaticImage]) -> Result<StaticImages, ImageError> {
        let mut images = HashMap::new();
        for img in list {
            let (id, config) = read_layout_config(&img.oci_layout)?;
            images.insert(
                img.name.clone(),
                ResolvedImage {
                    id,
                    name: img.name.clone(),
                    erofs_path: img.erofs.clone(),
                    config,
                },
            );
        }
        Ok(StaticImages { images })
    }
}

impl ImageResolver for StaticImages {
    fn resolve(&self, image_ref: &str) -> Result<ResolvedImage, ImageError> {
        let with_tag = if image_ref
            .rsplit('/')
            .next()
            .is_some_and(|l| !l.contains(':'))
        {
            format!("{image_ref}:latest")
        } else {
            image_ref.to_string()
        };
        self.images
            .get(image_ref)
            .or_else(|| self.images.get(&with_tag))
            .or_else(|| self.images.values().find(|i| i.id == image_ref))
            .cloned()
            .ok_or_else(|| ImageError::NotFound(image_ref.to_string()))
    }

    fn list(&self) -> Vec<ResolvedImage> {
        let mut all: Vec<ResolvedImage> = self.images.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// At most this much JSON is read from a layout file.
const MAX_JSON: u64 = 1 << 20;

fn read_small(path: &Path) -> Result<serde_json::Value, ImageError> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_JSON).read_to_end(&mut text))
        .map_err(|source| ImageError::Layout {
            path: path.to_path_buf(),
            source,
        })?;
    serde_json::from_slice(&text).map_err(|e| ImageError::Malformed {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

fn blob(layout: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ImageError::Malformed {
            path: layout.to_path_buf(),
            what: format!("bad digest {digest:?}"),
        })?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn read_layout_config(layout: &Path) -> Result<(String, ImageConfig), ImageError> {
    let malformed = |what: &str| ImageError::Malformed {
        path: layout.to_path_buf(),
        what: what.to_string(),
    };
    let index = read_small(&layout.join("index.json"))?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or_else(|| malformed("index.json has no manifest"))?;
    let manifest = read_small(&blob(layout, manifest_digest)?)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| malformed("the manifest has no config"))?
        .to_string();
    let config = read_small(&blob(layout, &config_digest)?)?;
    let c = &config["config"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok((
        config_digest,
        ImageConfig {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
            user: c["User"].as_str().unwrap_or_default().to_string(),
            stop_signal: c["StopSignal"].as_str().unwrap_or_default().to_string(),
        },
    ))
}

/// The image service's store first, then the statically listed images.
pub struct StoreImages {
    manager: std::sync::Arc<crate::image::manager::ImageManager>,
    fallback: StaticImages,
}

/// An image config is a few KiB; a larger one is not read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl StoreImages {
    pub fn new(
        manager: std::sync::Arc<crate::image::manager::ImageManager>,
        fallback: StaticImages,
    ) -> StoreImages {
        StoreImages { manager, fallback }
    }

    fn resolved(&self, record: &crate::image::store::ImageRecord) -> Option<ResolvedImage> {
        let erofs_path = self.manager.rootfs(&record.id)?;
        let bytes = self
            .manager
            .store()
            .read_blob(&record.id, MAX_CONFIG_BYTES)
            .ok()?;
        let parsed: oci_spec::image::ImageConfiguration = serde_json::from_slice(&bytes).ok()?;
        let c = parsed.config().clone().unwrap_or_default();
        Some(ResolvedImage {
            id: record.id.clone(),
            name: record
                .repo_tags
                .first()
                .cloned()
                .unwrap_or_else(|| record.id.clone()),
            erofs_path,
            config: ImageConfig {
                entrypoint: c.entrypoint().clone().unwrap_or_default(),
                cmd: c.cmd().clone().unwrap_or_default(),
                env: c.env().clone().unwrap_or_default(),
                working_dir: c.working_dir().clone().unwrap_or_default(),
                user: c.user().clone().unwrap_or_default(),
                stop_signal: c.stop_signal().clone().unwrap_or_default(),
            },
        })
    }
}

impl std::fmt::Debug for StoreImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreImages").finish_non_exhaustive()
    }
}

impl ImageResolver for StoreImages {
    fn resolve(&self, image_ref: &str) -> Result<ResolvedImage, ImageError> {
        match self.manager.find(image_ref) {
            Some(record) => self
                .resolved(&record)
                .ok_or_else(|| ImageError::NotFound(image_ref.to_string())),
            None => self.fallback.resolve(image_ref),
        }
    }

    fn list(&self) -> Vec<ResolvedImage> {
        let mut all: Vec<ResolvedImage> = self
            .manager
            .list()
            .iter()
            .filter_map(|r| self.resolved(r))
            .collect();
        all.extend(self.fallback.list());
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_by_name_short_name_and_id() {
        let img = ResolvedImage {
            id: "sha256:abc".into(),
            name: "localhost/vmpod/busybox:latest".into(),
            erofs_path: "/x.erofs".into(),
            config: ImageConfig::default(),
        };
        let s = StaticImages {
            images: [(img.name.clone(), img.clone())].into(),
        };
        assert_eq!(s.resolve("localhost/vmpod/busybox").unwrap(), img);
        assert_eq!(s.resolve("localhost/vmpod/busybox:latest").unwrap(), img);
        assert_eq!(s.resolve("sha256:abc").unwrap(), img);
        assert!(matches!(
            s.resolve("localhost/vmpod/busybox:1"),
            Err(ImageError::NotFound(_))
        ));
    }
}
