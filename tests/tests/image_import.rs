//! Offline import of the demo image (`guest-image/demo-image/build.sh`):
//! as an OCI archive and as an OCI layout directory, and a tampered layout.

use std::path::Path;

use vmpod::image::manager::{ImageConfig, ImageError, ImageManager};
use vmpod_tests::oci_layout::extract_erofs;
use vmpod_tests::registry::run_with_timeout;
use vmpod_tests::{require_program, workspace_root};

const DEMO_NAME: &str = "localhost/vmpod/busybox:latest";

fn build_demo(out: &Path) {
    require_program("busybox", "busybox-static");
    let mut cmd =
        std::process::Command::new(workspace_root().join("guest-image/demo-image/build.sh"));
    cmd.arg(out);
    run_with_timeout(cmd, std::time::Duration::from_secs(120));
}

fn config_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(&manifest[7..])).unwrap(),
    )
    .unwrap();
    manifest["config"]["digest"].as_str().unwrap().to_string()
}

#[test]
fn demo_image_imports_from_archive_and_layout() {
    let out = tempfile::tempdir().unwrap();
    build_demo(out.path());
    let layout = out.path().join("demo-image");
    let id = config_digest(&layout);

    let state = tempfile::tempdir().unwrap();
    let m = ImageManager::open(state.path(), ImageConfig::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let records = rt
        .block_on(m.import(&out.path().join("demo-image.tar")))
        .expect("importing the archive");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id, id);
    assert_eq!(records[0].repo_tags, vec![DEMO_NAME]);
    let again = rt
        .block_on(m.import(&layout))
        .expect("importing the layout");
    assert_eq!(again[0].id, id);
    assert_eq!(m.list().len(), 1, "same image, one record");
    assert_eq!(m.find("localhost/vmpod/busybox").unwrap().id, id);

    let root = tempfile::tempdir().unwrap();
    extract_erofs(&m.rootfs(&id).unwrap(), &root.path().join("r"));
    assert_eq!(
        std::fs::read(root.path().join("r/bin/busybox")).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert!(
        std::fs::symlink_metadata(root.path().join("r/bin/sh"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn tampered_layout_is_refused_and_nothing_is_kept() {
    let out = tempfile::tempdir().unwrap();
    build_demo(out.path());
    let layout = out.path().join("demo-image");
    // Append a byte to the largest blob (the layer).
    let blobs = layout.join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut data = std::fs::read(&biggest).unwrap();
    data.push(0);
    std::fs::write(&biggest, data).unwrap();

    let state = tempfile::tempdir().unwrap();
    let m = ImageManager::open(state.path(), ImageConfig::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(m.import(&layout)).unwrap_err();
    assert!(matches!(err, ImageError::Import { .. }), "{err:?}");
    assert!(m.list().is_empty());
    let hex = biggest.file_name().unwrap().to_string_lossy().into_owned();
    assert!(!m.store().has_blob(&format!("sha256:{hex}")));
    assert_eq!(
        std::fs::read_dir(state.path().join("ingest"))
            .unwrap()
            .count(),
        0
    );
}
