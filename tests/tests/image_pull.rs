//! Image pulls against a real registry (Debian's docker-registry on
//! 127.0.0.1, started per test): plain, multi-layer with whiteouts,
//! multi-arch, Docker schema 2, zstd and plain layers, basic auth, mirrors,
//! a corrupted blob, restart persistence, coalesced pulls and hostile layers.

use std::path::Path;
use std::sync::Arc;

use vmpod::image::manager::{ImageConfig, ImageError, ImageManager};
use vmpod::image::pull::{Credentials, Endpoint, HostConfig, PullError};
use vmpod::image::unpack::UnpackError;
use vmpod_tests::oci_layout::{
    Compression, LayerTar, busybox_layer, extract_erofs, layer, write_image, write_multi_arch,
};
use vmpod_tests::registry::{TestRegistry, free_port};

fn config(hosts: &[(&str, Vec<Endpoint>)]) -> ImageConfig {
    let mut config = ImageConfig::default();
    for (host, endpoints) in hosts {
        config.registry.hosts.insert(
            host.to_string(),
            HostConfig {
                endpoints: endpoints.clone(),
            },
        );
    }
    config.registry.request_timeout_secs = 10;
    config
}

fn plain(host: &str) -> Endpoint {
    Endpoint {
        host: host.to_string(),
        plain_http: true,
    }
}

fn manager_for(state: &Path, registry: &TestRegistry) -> ImageManager {
    let host = registry.host();
    ImageManager::open(state, config(&[(&host, vec![plain(&host)])])).expect("opening the store")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

fn pull(m: &ImageManager, reference: &str) -> Result<vmpod::image::store::ImageRecord, ImageError> {
    runtime().block_on(m.pull(reference, &Credentials::Anonymous, &|_| {}))
}

fn rootfs_of(m: &ImageManager, id: &str) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("temp dir");
    let image = m.rootfs(id).expect("image has a rootfs");
    extract_erofs(&image, &out.path().join("root"));
    out
}

fn no_leftovers(state: &Path) {
    for scratch in ["ingest", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(state.join(scratch))
            .expect("scratch dir")
            .collect();
        assert!(left.is_empty(), "{scratch}/ not empty: {left:?}");
    }
}

#[test]
fn plain_pull_of_a_multi_layer_image_applies_whiteouts() {
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    let base = busybox_layer();
    let lower = LayerTar::new()
        .dir("data", 0o755)
        .file("data/old", 0o644, b"lower")
        .dir("opaque", 0o755)
        .file("opaque/lower", 0o644, b"lower")
        .file("etc/motd", 0o600, b"hello")
        .finish();
    let upper = LayerTar::new()
        .file("data/.wh.old", 0o644, b"")
        .dir("opaque", 0o755)
        .file("opaque/.wh..wh..opq", 0o644, b"")
        .file("opaque/upper", 0o644, b"upper")
        .hardlink("etc/motd.link", "etc/motd")
        .finish();
    let built = write_image(
        layout.path(),
        "v1",
        &[
            layer(&base, Compression::Gzip),
            layer(&lower, Compression::Gzip),
            layer(&upper, Compression::Gzip),
        ],
        "1000",
    );
    registry.push_layout(layout.path(), "v1", "test/multi", &[]);

    let state = tempfile::tempdir().unwrap();
    let m = manager_for(state.path(), &registry);
    let reference = format!("{}/test/multi:v1", registry.host());
    let record = pull(&m, &reference).expect("pull");
    assert_eq!(record.id, built.config, "image ID is the config digest");
    assert_eq!(record.repo_tags, vec![reference.clone()]);
    assert_eq!(
        record.repo_digests,
        vec![format!("{}/test/multi@{}", registry.host(), built.manifest)]
    );
    assert_eq!(record.user, "1000");
    assert_eq!(record.layers.len(), 3);
    for digest in &built.layers {
        assert!(m.store().has_blob(digest), "layer {digest} kept");
    }

    let root = rootfs_of(&m, &record.id);
    let root = root.path().join("root");
    assert_eq!(
        std::fs::read(root.join("bin/busybox")).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert!(!root.join("data/old").exists(), "whiteout applied");
    assert!(root.join("data").is_dir());
    assert!(
        !root.join("opaque/lower").exists(),
        "opaque dir hides lower content"
    );
    assert_eq!(std::fs::read(root.join("opaque/upper")).unwrap(), b"upper");
    assert_eq!(std::fs::read(root.join("etc/motd.link")).unwrap(), b"hello");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join("etc/motd"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o600);
    no_leftovers(state.path());

    // Found by every kind of reference.
    for q in [
        reference.clone(),
        format!("{}/test/multi@{}", registry.host(), built.manifest),
        record.id.clone(),
        record.id_hex().to_string(),
        record.id_hex()[..12].to_string(),
    ] {
        assert_eq!(m.find(&q).map(|r| r.id), Some(record.id.clone()), "{q}");
    }
}

#[test]
fn multi_arch_index_resolves_to_linux_amd64() {
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    let amd = LayerTar::new().file("arch", 0o644, b"amd64").finish();
    let built = write_multi_arch(layout.path(), "multi", &[layer(&amd, Compression::Gzip)]);
    registry.push_layout(layout.path(), "multi", "test/arch", &["--all"]);

    let state = tempfile::tempdir().unwrap();
    let m = manager_for(state.path(), &registry);
    let record = pull(&m, &format!("{}/test/arch:multi", registry.host())).expect("pull");
    assert_eq!(record.id, built.config);
    assert_eq!(record.manifest_digest, built.manifest);
    // The repo digest is the index digest: what the tag points at.
    assert_eq!(
        record.repo_digests,
        vec![format!("{}/test/arch@{}", registry.host(), built.top)]
    );
    let root = rootfs_of(&m, &record.id);
    assert_eq!(
        std::fs::read(root.path().join("root/arch")).unwrap(),
        b"amd64"
    );
    // Pulling by the index digest gives the same image.
    let by_digest = pull(&m, &format!("{}/test/arch@{}", registry.host(), built.top)).unwrap();
    assert_eq!(by_digest.id, record.id);
}

#[test]
fn docker_schema2_zstd_and_plain_layers_are_pulled() {
    let registry = TestRegistry::start();
    let state = tempfile::tempdir().unwrap();
    let m = manager_for(state.path(), &registry);

    // Docker v2 schema 2 (skopeo converts the manifest and media types).
    let layout = tempfile::tempdir().unwrap();
    let t = LayerTar::new().file("docker", 0o644, b"schema2").finish();
    write_image(
        layout.path(),
        "s2",
        &[layer(&t, Compression::Gzip)],
        "nobody",
    );
    registry.push_layout(layout.path(), "s2", "test/docker", &["--format", "v2s2"]);
    let record = pull(&m, &format!("{}/test/docker:s2", registry.host())).expect("schema 2 pull");
    let manifest = m
        .store()
        .read_blob(&record.manifest_digest, 1 << 20)
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(record.user, "nobody");
    let root = rootfs_of(&m, &record.id);
    assert_eq!(
        std::fs::read(root.path().join("root/docker")).unwrap(),
        b"schema2"
    );

    // zstd and uncompressed layers in one image.
    let layout = tempfile::tempdir().unwrap();
    let z = LayerTar::new().file("zstd", 0o644, b"z").finish();
    let p = LayerTar::new().file("plain", 0o644, b"p").finish();
    write_image(
        layout.path(),
        "mixed",
        &[layer(&z, Compression::Zstd), layer(&p, Compression::None)],
        "",
    );
    registry.push_layout(layout.path(), "mixed", "test/mixed", &[]);
    let record = pull(&m, &format!("{}/test/mixed:mixed", registry.host())).expect("zstd pull");
    assert_eq!(
        record.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let root = rootfs_of(&m, &record.id);
    assert_eq!(std::fs::read(root.path().join("root/zstd")).unwrap(), b"z");
    assert_eq!(std::fs::read(root.path().join("root/plain")).unwrap(), b"p");
}

#[test]
fn basic_auth_registry_needs_the_right_credentials() {
    let registry = TestRegistry::start_with_basic_auth("alice", "s3cret");
    let layout = tempfile::tempdir().unwrap();
    let t = LayerTar::new().file("secret", 0o644, b"ok").finish();
    let built = write_image(layout.path(), "v1", &[layer(&t, Compression::Gzip)], "");
    registry.push_layout(layout.path(), "v1", "private/app", &[]);

    let state = tempfile::tempdir().unwrap();
    let m = manager_for(state.path(), &registry);
    let reference = format!("{}/private/app:v1", registry.host());
    let rt = runtime();
    let anonymous = rt.block_on(m.pull(&reference, &Credentials::Anonymous, &|_| {}));
    assert!(
        matches!(
            anonymous,
            Err(ImageError::Pull(_, PullError::Unauthorized(_)))
        ),
        "{anonymous:?}"
    );
    let wrong = Credentials::Basic {
        username: "alice".into(),
        password: "wrong".into(),
    };
    let wrong = rt.block_on(m.pull(&reference, &wrong, &|_| {}));
    assert!(
        matches!(wrong, Err(ImageError::Pull(_, PullError::Unauthorized(_)))),
        "{wrong:?}"
    );
    let right = Credentials::Basic {
        username: "alice".into(),
        password: "s3cret".into(),
    };
    let record = rt
        .block_on(m.pull(&reference, &right, &|_| {}))
        .expect("authorised pull");
    assert_eq!(record.id, built.config);
}

#[test]
fn mirror_configuration_falls_back_to_the_next_endpoint() {
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    let t = LayerTar::new().file("mirrored", 0o644, b"yes").finish();
    let built = write_image(layout.path(), "v1", &[layer(&t, Compression::Gzip)], "");
    registry.push_layout(layout.path(), "v1", "library/mirrored", &[]);

    // docker.io names, served by a dead mirror first and the test registry second.
    let dead = format!("127.0.0.1:{}", free_port());
    let state = tempfile::tempdir().unwrap();
    let m = ImageManager::open(
        state.path(),
        config(&[("docker.io", vec![plain(&dead), plain(&registry.host())])]),
    )
    .unwrap();
    let record = pull(&m, "mirrored:v1").expect("pull through the second endpoint");
    assert_eq!(record.id, built.config);
    assert_eq!(record.repo_tags, vec!["docker.io/library/mirrored:v1"]);

    // With only the dead endpoint the pull fails, and says so.
    let state = tempfile::tempdir().unwrap();
    let m = ImageManager::open(state.path(), config(&[("docker.io", vec![plain(&dead)])])).unwrap();
    assert!(matches!(
        pull(&m, "mirrored:v1"),
        Err(ImageError::Pull(_, PullError::Registry { .. }))
    ));
}

#[test]
fn corrupted_blob_is_refused_and_nothing_is_kept() {
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    let good = LayerTar::new().file("good", 0o644, b"good").finish();
    let bad = LayerTar::new().file("bad", 0o644, &[7u8; 4096]).finish();
    let built = write_image(
        layout.path(),
        "v1",
        &[
            layer(&good, Compression::Gzip),
            layer(&bad, Compression::Gzip),
        ],
        "",
    );
    registry.push_layout(layout.path(), "v1", "test/corrupt", &[]);
    // Flip one byte of the second layer in the registry's storage.
    let data = registry.blob_data(&built.layers[1]);
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let state = tempfile::tempdir().unwrap();
    let m = manager_for(state.path(), &registry);
    let err = pull(&m, &format!("{}/test/corrupt:v1", registry.host())).unwrap_err();
    assert!(
        matches!(err, ImageError::Pull(_, PullError::DigestMismatch { .. })),
        "{err:?}"
    );
    assert!(!m.store().has_blob(&built.layers[1]), "corrupt blob kept");
    assert!(m.list().is_empty(), "half image visible");
    assert!(
        std::fs::read_dir(state.path().join("rootfs"))
            .unwrap()
            .next()
            .is_none()
    );
    no_leftovers(state.path());
}

#[test]
fn images_survive_a_restart_and_concurrent_pulls_coalesce() {
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    let built = write_image(
        layout.path(),
        "v1",
        &[layer(&busybox_layer(), Compression::Gzip)],
        "",
    );
    registry.push_layout(layout.path(), "v1", "test/persist", &[]);
    let reference = format!("{}/test/persist:v1", registry.host());
    let state = tempfile::tempdir().unwrap();
    {
        let m = Arc::new(manager_for(state.path(), &registry));
        let rt = runtime();
        let results = rt.block_on(async {
            let pulls = (0..4).map(|_| {
                let m = m.clone();
                let reference = reference.clone();
                tokio::spawn(
                    async move { m.pull(&reference, &Credentials::Anonymous, &|_| {}).await },
                )
            });
            futures_join(pulls.collect()).await
        });
        for r in results {
            assert_eq!(r.expect("pull").id, built.config);
        }
        assert_eq!(m.list().len(), 1);
    }
    let m = manager_for(state.path(), &registry);
    let images = m.list();
    assert_eq!(images.len(), 1, "restarted store lists the image");
    assert_eq!(images[0].repo_tags, vec![reference]);
    assert!(m.rootfs(&built.config).unwrap().is_file());
    let rootfs_count = std::fs::read_dir(state.path().join("rootfs"))
        .unwrap()
        .count();
    assert_eq!(rootfs_count, 1, "one erofs image per image ID");
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("pull task"));
    }
    out
}

#[test]
fn malicious_layers_are_refused_with_nothing_written_outside() {
    let registry = TestRegistry::start();
    let state = tempfile::tempdir().unwrap();
    let m = manager_for(state.path(), &registry);
    // Only one process at a time may own a store.
    assert!(matches!(
        ImageManager::open(state.path(), ImageConfig::default()),
        Err(ImageError::Store(vmpod::image::store::StoreError::Locked(
            _
        )))
    ));
    let sentinel_dir = tempfile::tempdir().unwrap();
    let outside = sentinel_dir.path().display().to_string();
    let outside = outside.trim_start_matches('/').to_string();
    let bomb = {
        // 64 MiB of zeros inflate from ~64 KiB of gzip; the bound is 16 MiB.
        let zeros = vec![0u8; 64 << 20];
        LayerTar::new().file("bomb", 0o644, &zeros).finish()
    };
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            LayerTar::new()
                .file("../../../../../../../../tmp/vmpod-evil", 0o644, b"x")
                .finish(),
        ),
        (
            "absolute",
            LayerTar::new()
                .file(&format!("/{outside}/evil"), 0o644, b"x")
                .finish(),
        ),
        (
            "symlink-dir",
            LayerTar::new()
                .symlink("escape", &format!("/{outside}"))
                .file("escape/evil", 0o644, b"x")
                .finish(),
        ),
        (
            "symlink-relative",
            LayerTar::new()
                .symlink("up", "../../../../../../../..")
                .file(&format!("up/{outside}/evil"), 0o644, b"x")
                .finish(),
        ),
        (
            "hardlink-out",
            LayerTar::new()
                .hardlink("passwd", "../../../../../../../../etc/passwd")
                .finish(),
        ),
        (
            "hardlink-via-symlink",
            LayerTar::new()
                .symlink("etcdir", "/etc")
                .hardlink("passwd", "etcdir/passwd")
                .finish(),
        ),
        ("bomb", bomb),
    ];
    drop(m);
    let mut config = config(&[(&registry.host(), vec![plain(&registry.host())])]);
    config.unpack.max_bytes = 16 << 20;
    let m2 = ImageManager::open(state.path(), config).unwrap();
    for (name, tar) in corpus {
        let layout = tempfile::tempdir().unwrap();
        write_image(layout.path(), name, &[layer(&tar, Compression::Gzip)], "");
        registry.push_layout(layout.path(), name, "evil/corpus", &[]);
        let err = pull(&m2, &format!("{}/evil/corpus:{name}", registry.host()))
            .expect_err(&format!("{name} was accepted"));
        assert!(
            matches!(
                err,
                ImageError::Unpack(
                    _,
                    UnpackError::PathEscape(_)
                        | UnpackError::ThroughSymlink(_)
                        | UnpackError::BadHardLink { .. }
                        | UnpackError::TooLarge(_)
                )
            ),
            "{name}: {err:?}"
        );
        no_leftovers(state.path());
    }
    assert!(m2.list().is_empty());
    assert!(!Path::new("/tmp/vmpod-evil").exists());
    assert_eq!(std::fs::read_dir(sentinel_dir.path()).unwrap().count(), 0);
    assert!(
        std::fs::read_dir(state.path().join("rootfs"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn cancelled_pulls_leave_nothing_behind() {
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    let extra = LayerTar::new()
        .file("more", 0o644, &[1u8; 1 << 20])
        .finish();
    let built = write_image(
        layout.path(),
        "v1",
        &[
            layer(&busybox_layer(), Compression::Gzip),
            layer(&extra, Compression::Gzip),
        ],
        "",
    );
    registry.push_layout(layout.path(), "v1", "test/cancel", &[]);
    let reference = format!("{}/test/cancel:v1", registry.host());
    let rt = runtime();
    // Deadlines that fire at different points of the pull: resolving,
    // downloading, unpacking or building.
    for micros in [1u64, 500, 2_000, 5_000, 10_000, 20_000, 50_000] {
        let state = tempfile::tempdir().unwrap();
        let m = manager_for(state.path(), &registry);
        let result = rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_micros(micros),
                m.pull(&reference, &Credentials::Anonymous, &|_| {}),
            )
            .await
        });
        // A cancelled unpack notices at its next entry; give it a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::read_dir(state.path().join("tmp"))
            .unwrap()
            .next()
            .is_some()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        no_leftovers(state.path());
        match result {
            Ok(done) => {
                assert_eq!(done.unwrap().id, built.config);
            }
            Err(_) => {
                assert!(m.list().is_empty(), "half image visible after cancel");
                let rootfs: Vec<_> = std::fs::read_dir(state.path().join("rootfs"))
                    .unwrap()
                    .collect();
                assert!(rootfs.is_empty(), "partial erofs left: {rootfs:?}");
                // Blobs that are there are verified ones.
                for entry in std::fs::read_dir(state.path().join("blobs/sha256")).unwrap() {
                    let path = entry.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    let name = path.file_name().unwrap().to_string_lossy().into_owned();
                    assert_eq!(vmpod_tests::sha256_digest(&data), format!("sha256:{name}"));
                }
                // And the image can be pulled after all.
                let record = pull(&m, &reference).expect("pull after cancel");
                assert_eq!(record.id, built.config);
            }
        }
    }
}

#[test]
fn token_auth_registry_uses_the_bearer_challenge_flow() {
    let registry = TestRegistry::start_with_token_auth("carol", "tok-pw");
    let layout = tempfile::tempdir().unwrap();
    let t = LayerTar::new().file("token", 0o644, b"bearer").finish();
    let built = write_image(layout.path(), "v1", &[layer(&t, Compression::Gzip)], "");
    registry.push_layout(layout.path(), "v1", "token/app", &[]);
    let reference = format!("{}/token/app:v1", registry.host());
    let rt = runtime();

    let state = tempfile::tempdir().unwrap();
    let m = manager_for(state.path(), &registry);
    let anonymous = rt.block_on(m.pull(&reference, &Credentials::Anonymous, &|_| {}));
    assert!(
        matches!(
            anonymous,
            Err(ImageError::Pull(_, PullError::Unauthorized(_)))
        ),
        "{anonymous:?}"
    );
    // Username/password are exchanged for a token at the realm.
    let basic = Credentials::Basic {
        username: "carol".into(),
        password: "tok-pw".into(),
    };
    let record = rt
        .block_on(m.pull(&reference, &basic, &|_| {}))
        .expect("pull through the token flow");
    assert_eq!(record.id, built.config);

    // A registry token (CRI registry_token) is sent as is.
    drop(m);
    let state = tempfile::tempdir().unwrap();
    let m = manager_for(state.path(), &registry);
    let token = Credentials::RegistryToken(registry.token().unwrap().to_string());
    let record = rt
        .block_on(m.pull(&reference, &token, &|_| {}))
        .expect("pull with a registry token");
    assert_eq!(record.id, built.config);

    // An identity token (CRI identity_token) is exchanged by the OAuth2
    // refresh-token POST; a wrong one is refused.
    drop(m);
    let state = tempfile::tempdir().unwrap();
    let m = manager_for(state.path(), &registry);
    let wrong = Credentials::IdentityToken("not-the-token".into());
    let err = rt.block_on(m.pull(&reference, &wrong, &|_| {}));
    assert!(
        matches!(err, Err(ImageError::Pull(_, PullError::Unauthorized(_)))),
        "{err:?}"
    );
    let identity = Credentials::IdentityToken(registry.identity_token().unwrap().to_string());
    let record = rt
        .block_on(m.pull(&reference, &identity, &|_| {}))
        .expect("pull with an identity token");
    assert_eq!(record.id, built.config);
}

/// A hostile registry that answers a manifest GET with an endless body
/// (chunked, no length to refuse up front): the pull fails with TooLarge
/// after the 4 MiB bound, having read only that much (the registry's
/// writes stop once the client hangs up), and keeps nothing.
#[test]
fn an_endless_manifest_is_cut_at_its_bound() {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let mut sent_to_manifest = 0u64;
        // /v2/ (the auth probe), then the manifest GET.
        for _ in 0..2 {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
            }
            let mut stream = stream;
            if !request.contains("/manifests/") {
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                    )
                    .unwrap();
                continue;
            }
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                      Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
                )
                .unwrap();
            let chunk = vec![b' '; 1 << 20];
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            // Up to 1 GiB, until the client hangs up.
            for _ in 0..1024 {
                if stream.write_all(&framed).is_err() {
                    break;
                }
                sent_to_manifest += chunk.len() as u64;
            }
        }
        sent_to_manifest
    });
    let state = tempfile::tempdir().unwrap();
    let m = ImageManager::open(state.path(), config(&[(&host, vec![plain(&host)])])).unwrap();
    let err = pull(&m, &format!("{host}/hostile/endless:v1")).expect_err("an endless manifest");
    assert!(
        matches!(
            err,
            ImageError::Pull(
                _,
                PullError::TooLarge {
                    what: "manifest",
                    ..
                }
            )
        ),
        "{err:?}"
    );
    let sent = server.join().unwrap();
    // What was read (4 MiB) plus what the sockets' buffers took.
    assert!(sent < 32 << 20, "the registry got {sent} bytes out");
    no_leftovers(state.path());
}
