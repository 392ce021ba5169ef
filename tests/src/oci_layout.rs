//! Builds OCI image layouts for tests: layers from tar entries (including
//! hostile ones the `tar` builder would refuse), gzip, zstd or plain,
//! single-platform or multi-platform, ready for `skopeo copy oci:...`.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::sha256_digest;

/// Layer compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// `tar+gzip`.
    Gzip,
    /// `tar+zstd`.
    Zstd,
    /// Plain `tar`.
    None,
}

/// A tar stream built entry by entry, with raw names (no sanitising).
#[derive(Default)]
pub struct LayerTar {
    builder: Option<tar::Builder<Vec<u8>>>,
}

impl LayerTar {
    /// An empty layer.
    pub fn new() -> Self {
        Self {
            builder: Some(tar::Builder::new(Vec::new())),
        }
    }

    fn append(
        &mut self,
        kind: tar::EntryType,
        path: &str,
        link: Option<&str>,
        mode: u32,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        let name = &mut h.as_old_mut().name;
        assert!(path.len() <= name.len(), "test path too long: {path}");
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            let l = &mut h.as_old_mut().linkname;
            l[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        self.builder
            .as_mut()
            .expect("layer finished")
            .append(&h, data)
            .expect("appending to an in-memory tar");
        self
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.append(tar::EntryType::Regular, path, None, mode, data)
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.append(tar::EntryType::Directory, path, None, mode, b"")
    }

    /// A symlink.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.append(tar::EntryType::Symlink, path, Some(target), 0o777, b"")
    }

    /// A hard link.
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.append(tar::EntryType::Link, path, Some(target), 0o644, b"")
    }

    /// The finished tar bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        self.builder
            .take()
            .expect("layer finished twice")
            .into_inner()
            .expect("finishing an in-memory tar")
    }
}

/// A busybox base layer: `/bin/busybox` plus a few applet links and an
/// `/etc/passwd` that knows user `app` (uid 1000).
pub fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox is missing: install Debian's busybox-static (scripts/install-deps)");
    let mut t = LayerTar::new();
    t.dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .symlink("bin/ls", "/bin/busybox")
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .dir("tmp", 0o1777);
    t.finish()
}

/// A layer blob ready for a layout.
pub struct Layer {
    /// The compressed bytes.
    pub blob: Vec<u8>,
    /// Its media type.
    pub media_type: &'static str,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
}

/// Compresses a tar into a layer.
pub fn layer(tar: &[u8], compression: Compression) -> Layer {
    let (blob, media_type) = match compression {
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).expect("gzip in memory");
            (
                gz.finish().expect("gzip in memory"),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Compression::Zstd => (
            ruzstd::encoding::compress_to_vec(tar, ruzstd::encoding::CompressionLevel::Fastest),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        Compression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
    };
    Layer {
        blob,
        media_type,
        diff_id: sha256_digest(tar),
    }
}

/// Digests of a written image.
#[derive(Clone, Debug)]
pub struct Built {
    /// The config digest: the image ID.
    pub config: String,
    /// The platform manifest digest (amd64).
    pub manifest: String,
    /// The digest `index.json` points at for the tag (index or manifest).
    pub top: String,
    /// The layer digests.
    pub layers: Vec<String>,
}

fn put_blob(dir: &Path, data: &[u8]) -> (String, u64) {
    let digest = sha256_digest(data);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("creating blobs/");
    std::fs::write(blobs.join(&digest["sha256:".len()..]), data).expect("writing a blob");
    (digest, data.len() as u64)
}

fn write_manifest(dir: &Path, layers: &[Layer], user: &str, arch: &str) -> (String, u64, String) {
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": { "User": user, "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>() },
    });
    let (config_digest, config_size) = put_blob(dir, config.to_string().as_bytes());
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| {
            let (d, s) = put_blob(dir, &l.blob);
            json!({ "mediaType": l.media_type, "digest": d, "size": s })
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": layer_descs,
    });
    let (d, s) = put_blob(dir, manifest.to_string().as_bytes());
    (d, s, config_digest)
}

fn write_index(dir: &Path, tag: &str, media_type: &str, digest: &str, size: u64) {
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type, "digest": digest, "size": size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
}

/// Writes a single-platform (linux/amd64) image as `tag` into layout `dir`.
pub fn write_image(dir: &Path, tag: &str, layers: &[Layer], user: &str) -> Built {
    let (manifest, size, config) = write_manifest(dir, layers, user, "amd64");
    write_index(
        dir,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
        size,
    );
    Built {
        config,
        top: manifest.clone(),
        manifest,
        layers: layers.iter().map(|l| sha256_digest(&l.blob)).collect(),
    }
}

/// Writes a linux/arm64 + linux/amd64 index as `tag`; the amd64 image has
/// `amd64_layers`, the arm64 one a layer with `/arch` = `arm64`.
pub fn write_multi_arch(dir: &Path, tag: &str, amd64_layers: &[Layer]) -> Built {
    let arm = layer(
        LayerTar::new()
            .file("arch", 0o644, b"arm64")
            .finish()
            .as_slice(),
        Compression::Gzip,
    );
    let (arm_manifest, arm_size, _) = write_manifest(dir, &[arm], "", "arm64");
    let (manifest, size, config) = write_manifest(dir, amd64_layers, "", "amd64");
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_manifest, "size": arm_size,
              "platform": { "os": "linux", "architecture": "arm64", "variant": "v8" } },
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest, "size": size,
              "platform": { "os": "linux", "architecture": "amd64" } },
        ],
    });
    let (top, top_size) = put_blob(dir, index.to_string().as_bytes());
    write_index(
        dir,
        tag,
        "application/vnd.oci.image.index.v1+json",
        &top,
        top_size,
    );
    Built {
        config,
        manifest,
        top,
        layers: amd64_layers
            .iter()
            .map(|l| sha256_digest(&l.blob))
            .collect(),
    }
}

/// Extracts an erofs image with `fsck.erofs --extract` (no mount, no root).
pub fn extract_erofs(image: &Path, dest: &Path) {
    crate::require_program("fsck.erofs", "erofs-utils");
    let mut cmd = std::process::Command::new("fsck.erofs");
    cmd.arg(format!("--extract={}", dest.display())).arg(image);
    crate::registry::run_with_timeout(cmd, std::time::Duration::from_secs(60));
}
