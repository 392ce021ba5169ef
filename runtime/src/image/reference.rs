//! Image references, normalised the way Kubernetes users expect
//! (docker/distribution's `ParseNormalizedNamed`): `busybox` is
//! `docker.io/library/busybox:latest`, `host:port/repo:tag` keeps its host,
//! `repo@sha256:...` pins a digest, and `repo:tag@sha256:...` keeps both.

use std::fmt;

/// The registry host of unqualified names.
pub const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
const OFFICIAL_REPO_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
/// Longest reference accepted (distribution's NameTotalLengthMax is 255 for
/// the name; a tag and a digest add at most 200 more).
const MAX_REFERENCE_LEN: usize = 512;
const MAX_NAME_LEN: usize = 255;

/// Why a string is not an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// The string was empty.
    #[error("empty image reference")]
    Empty,
    /// Longer than any registry accepts.
    #[error("image reference is longer than {MAX_REFERENCE_LEN} bytes")]
    TooLong,
    /// The repository path is malformed.
    #[error("invalid repository name {0:?} (lowercase letters, digits and separators only)")]
    InvalidName(String),
    /// The registry host is malformed.
    #[error("invalid registry host {0:?}")]
    InvalidDomain(String),
    /// The tag is malformed.
    #[error("invalid tag {0:?}")]
    InvalidTag(String),
    /// The digest is malformed or uses an unsupported algorithm.
    #[error("invalid digest {0:?} (only sha256:<64 hex> is supported)")]
    InvalidDigest(String),
}

/// A normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageReference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageReference {
    /// Parses and normalises a reference. A reference with neither tag nor
    /// digest gets the tag `latest`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if input.len() > MAX_REFERENCE_LEN {
            return Err(ReferenceError::TooLong);
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest)?;
                (rest, Some(digest.to_string()))
            }
            None => (input, None),
        };
        // A tag is a ':' after the last '/', so `host:5000/repo` has none.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                validate_tag(tag)?;
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        let (domain, path) = split_domain(name);
        validate_domain(&domain)?;
        validate_path(&path)?;
        if domain.len() + 1 + path.len() > MAX_NAME_LEN {
            return Err(ReferenceError::TooLong);
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(Self {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// The registry host (`docker.io`, `localhost:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path inside the registry (`library/busybox`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `domain/path`: the repository name used in repo tags and digests.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// `name:tag`, the CRI repo tag, when there is a tag.
    pub fn repo_tag(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// `name@digest` for a given manifest digest: the CRI repo digest.
    pub fn repo_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn registry_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageReference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The first component is a registry host when it looks like one (has a
/// '.' or a ':' or is `localhost`); otherwise the name is on Docker Hub.
fn split_domain(name: &str) -> (String, String) {
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
    };
    let domain = if domain == LEGACY_DEFAULT_DOMAIN {
        DEFAULT_DOMAIN.to_string()
    } else {
        domain
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("{OFFICIAL_REPO_PREFIX}{path}")
    } else {
        path
    };
    (domain, path)
}

fn validate_domain(domain: &str) -> Result<(), ReferenceError> {
    let bad = || ReferenceError::InvalidDomain(domain.to_string());
    let (host, port) = if domain.starts_with('[') {
        let end = domain.find(']').ok_or_else(bad)?;
        let tail = &domain[end + 1..];
        let port = match tail.strip_prefix(':') {
            Some(port) => Some(port),
            None if tail.is_empty() => None,
            None => return Err(bad()),
        };
        (&domain[..=end], port)
    } else {
        match domain.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(bad());
    }
    if host.is_empty() {
        return Err(bad());
    }
    // IPv6 literals in brackets, otherwise DNS labels.
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err(bad());
        }
        return Ok(());
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// Path components: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn validate_path(path: &str) -> Result<(), ReferenceError> {
    let bad = || ReferenceError::InvalidName(path.to_string());
    if path.is_empty() {
        return Err(bad());
    }
    for component in path.split('/') {
        let bytes = component.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err(bad());
        }
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if alnum(b) {
                i += 1;
                continue;
            }
            // A separator run: '.', '_', '__' or any number of '-'.
            let start = i;
            while i < bytes.len() && !alnum(bytes[i]) {
                i += 1;
            }
            let sep = &component[start..i];
            let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
            if !ok {
                return Err(bad());
            }
        }
    }
    Ok(())
}

/// Tags: `[\w][\w.-]{0,127}`.
fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.starts_with(word)
        && tag.chars().all(|c| word(c) || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag(tag.to_string()))
    }
}

/// Only sha256 digests are accepted: the store is addressed by them.
pub fn validate_digest(digest: &str) -> Result<(), ReferenceError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if is_sha256_hex(hex) => Ok(()),
        _ => Err(ReferenceError::InvalidDigest(digest.to_string())),
    }
}

/// 64 lowercase hex digits.
pub fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        ImageReference::parse(s).unwrap().to_string()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_names_are_normalised() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(
            norm("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            norm("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
    }

    #[test]
    fn hosts_ports_and_localhost_are_kept() {
        assert_eq!(
            norm("localhost/vmpod/busybox"),
            "localhost/vmpod/busybox:latest"
        );
        assert_eq!(norm("127.0.0.1:5000/a/b:t"), "127.0.0.1:5000/a/b:t");
        assert_eq!(
            norm("registry.k8s.io/pause:3.10"),
            "registry.k8s.io/pause:3.10"
        );
        let r = ImageReference::parse("localhost:5000/repo").unwrap();
        assert_eq!(r.domain(), "localhost:5000");
        assert_eq!(r.path(), "repo");
        assert_eq!(r.tag(), Some("latest"));
    }

    #[test]
    fn digests_pin_and_tags_are_kept_alongside() {
        let r = ImageReference::parse(&format!("busybox@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.registry_reference(), D);
        assert_eq!(r.repo_tag(), None);
        let r = ImageReference::parse(&format!("quay.io/a/b:v2@{D}")).unwrap();
        assert_eq!(r.tag(), Some("v2"));
        assert_eq!(r.registry_reference(), D);
        assert_eq!(r.to_string(), format!("quay.io/a/b:v2@{D}"));
        assert_eq!(r.repo_digest(D), format!("quay.io/a/b@{D}"));
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "a//b",
            "host:port/x",
            "-a",
            "a..b",
            "/abs",
            "repo:",
        ] {
            assert!(ImageReference::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            ImageReference::parse(&"a".repeat(600)),
            Err(ReferenceError::TooLong)
        );
    }
}
