//! The `vmpod image` CLI end to end on the demo image (no registry):
//! import, list, remove, against a temporary state dir.

use std::path::{Path, PathBuf};
use std::process::Command;

fn demo_archive() -> PathBuf {
    // Where guest-image/build puts it: $VMPOD_GUEST_DIR, else the guest/
    // dir of cargo's target dir.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let guest = match (
        std::env::var_os("VMPOD_GUEST_DIR"),
        std::env::var_os("CARGO_TARGET_DIR"),
    ) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Some(target)) => workspace.join(target).join("guest"),
        (None, None) => workspace.join("target/guest"),
    };
    let path = guest.join("demo-image.tar");
    assert!(
        path.exists(),
        "{} is missing: run guest-image/build first (scripts/test does)",
        path.display()
    );
    path
}

fn vmpod(state: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmpod"))
        .arg("image")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("running vmpod");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn import_list_and_remove_the_demo_image() {
    let state = tempfile::tempdir().unwrap();
    let archive = demo_archive();
    let (ok, out, err) = vmpod(state.path(), &["import", archive.to_str().unwrap()]);
    assert!(ok, "import failed: {out}{err}");

    let (ok, out, err) = vmpod(state.path(), &["ls"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("localhost/vmpod/busybox"),
        "the imported image is listed: {out}"
    );

    let (ok, out, err) = vmpod(state.path(), &["rm", "localhost/vmpod/busybox:latest"]);
    assert!(ok, "rm failed: {out}{err}");
    let (_, out, _) = vmpod(state.path(), &["ls"]);
    assert!(
        !out.contains("localhost/vmpod/busybox"),
        "removed images are gone: {out}"
    );

    // As the CRI's RemoveImage: removing what is not there is not an
    // error, but the CLI says so.
    let (ok, out, err) = vmpod(state.path(), &["rm", "localhost/vmpod/nope:latest"]);
    assert!(ok, "{err}");
    assert!(format!("{out}{err}").contains("not found"), "{out}{err}");
}

#[test]
fn importing_garbage_fails_with_a_message() {
    let state = tempfile::tempdir().unwrap();
    let junk = state.path().join("junk.tar");
    std::fs::write(&junk, b"not an archive").unwrap();
    let (ok, out, err) = vmpod(state.path(), &["import", junk.to_str().unwrap()]);
    assert!(!ok, "garbage imported: {out}");
    assert!(!err.trim().is_empty(), "a failure says why");
}
