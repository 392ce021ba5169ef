//! Manifests, indexes and image configs as registries and OCI layouts hand
//! them out (OCI and Docker v2 schema 2 media types), and platform choice.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// What a pull accepts, in order of preference.
pub const ACCEPTED: [&str; 4] = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];
/// Largest manifest or index accepted (registries cap them at 4 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest image config accepted.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

const LAYER_TYPES: [&str; 7] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// Why a manifest, index or config is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid JSON of the expected shape.
    #[error("malformed {0}")]
    Malformed(&'static str, #[source] serde_json::Error),
    /// A media type vmpod cannot run (schema 1, artifacts, foreign formats).
    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    /// No entry of the index matches the platform.
    #[error("no image for {0} in the index")]
    NoMatchingPlatform(String),
    /// A descriptor's digest is not sha256 or its size is absurd.
    #[error("invalid descriptor {0}")]
    InvalidDescriptor(String),
}

/// A fetched manifest document.
#[derive(Debug)]
pub enum Document {
    /// A multi-platform index (OCI index or Docker manifest list).
    Index(Box<ImageIndex>),
    /// A single-platform image manifest.
    Manifest(Box<ImageManifest>),
}

/// The platform to pick from indexes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`.
    pub architecture: String,
    /// e.g. `v8` for arm64; `None` accepts any.
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Parses a manifest or index. The media type comes from the document,
/// else from the HTTP content type, else from its shape.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Document, ManifestError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion", default)]
        schema_version: i64,
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed("manifest", e))?;
    if probe.schema_version != 2 {
        return Err(ManifestError::UnsupportedMediaType(format!(
            "schema version {}",
            probe.schema_version
        )));
    }
    let media_type = probe
        .media_type
        .or_else(|| content_type.map(str::to_string))
        .unwrap_or_else(|| {
            if probe.manifests.is_some() {
                OCI_INDEX.to_string()
            } else {
                OCI_MANIFEST.to_string()
            }
        });
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => Ok(Document::Index(Box::new(
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed("index", e))?,
        ))),
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let manifest: ImageManifest = serde_json::from_slice(bytes)
                .map_err(|e| ManifestError::Malformed("manifest", e))?;
            check_manifest(&manifest)?;
            Ok(Document::Manifest(Box::new(manifest)))
        }
        other => Err(ManifestError::UnsupportedMediaType(other.to_string())),
    }
}

/// The digest of a descriptor, checked to be a sha256 digest.
pub fn digest_of(desc: &Descriptor) -> Result<String, ManifestError> {
    let digest = desc.digest().to_string();
    super::reference::validate_digest(&digest)
        .map_err(|_| ManifestError::InvalidDescriptor(digest.clone()))?;
    Ok(digest)
}

fn check_manifest(manifest: &ImageManifest) -> Result<(), ManifestError> {
    digest_of(manifest.config())?;
    for layer in manifest.layers() {
        digest_of(layer)?;
        let media_type = layer.media_type().to_string();
        if !LAYER_TYPES.contains(&media_type.as_str()) {
            return Err(ManifestError::UnsupportedMediaType(media_type));
        }
    }
    Ok(())
}

/// The manifest of `platform` in an index: exact variant when one is
/// asked for, else the first entry for the OS and architecture.
pub fn select(index: &ImageIndex, platform: &Platform) -> Result<Descriptor, ManifestError> {
    index
        .manifests()
        .iter()
        .find(|d| {
            let Some(p) = d.platform() else {
                return false;
            };
            p.os().to_string() == platform.os
                && p.architecture().to_string() == platform.architecture
                && (platform.variant.is_none() || *p.variant() == platform.variant)
        })
        .cloned()
        .ok_or_else(|| ManifestError::NoMatchingPlatform(platform.to_string()))
}

/// The parts of an image config vmpod uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigSummary {
    /// The `User` field (may be empty).
    pub user: String,
    /// `rootfs.diff_ids`: sha256 of each uncompressed layer, bottom first.
    pub diff_ids: Vec<String>,
}

/// Parses an image config.
pub fn parse_config(bytes: &[u8]) -> Result<ConfigSummary, ManifestError> {
    let config: ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed("image config", e))?;
    let user = config
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .unwrap_or_default();
    let diff_ids = config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| d.to_string())
        .collect();
    Ok(ConfigSummary { user, diff_ids })
}

/// The CRI view of a config `User`: a numeric UID, or a user name
/// (a group after ':' is ignored, as containerd does).
pub fn split_user(user: &str) -> (Option<i64>, String) {
    let name = user.split(':').next().unwrap_or_default();
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn index_picks_linux_amd64() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
            {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D1}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
            {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D2}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let Document::Index(index) = parse(index.as_bytes(), None).unwrap() else {
            panic!("not an index");
        };
        assert_eq!(
            select(&index, &Platform::default())
                .unwrap()
                .digest()
                .to_string(),
            D2
        );
        let arm = Platform {
            architecture: "arm64".into(),
            variant: Some("v8".into()),
            ..Platform::default()
        };
        assert_eq!(select(&index, &arm).unwrap().digest().to_string(), D1);
        let s390 = Platform {
            architecture: "s390x".into(),
            ..Platform::default()
        };
        assert!(select(&index, &s390).is_err());
    }

    #[test]
    fn manifests_with_foreign_layers_or_schema1_are_refused() {
        let m = |layer_type: &str| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":2}},
                "layers":[{{"mediaType":"{layer_type}","digest":"{D2}","size":3}}]}}"#
            )
        };
        assert!(
            parse(
                m("application/vnd.oci.image.layer.v1.tar+gzip").as_bytes(),
                None
            )
            .is_ok()
        );
        assert!(matches!(
            parse(m("application/vnd.example.wasm").as_bytes(), None),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        assert!(parse(br#"{"schemaVersion":1,"name":"x"}"#, None).is_err());
        assert!(parse(b"not json", None).is_err());
    }

    #[test]
    fn users_split_into_uid_or_name() {
        assert_eq!(split_user("1000"), (Some(1000), String::new()));
        assert_eq!(split_user("1000:50"), (Some(1000), String::new()));
        assert_eq!(split_user("nobody:nogroup"), (None, "nobody".into()));
        assert_eq!(split_user(""), (None, String::new()));
        let cfg = br#"{"architecture":"amd64","os":"linux","config":{"User":"www-data"},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert_eq!(parse_config(cfg).unwrap().user, "www-data");
    }
}
