//! Shared helpers for vmpod's end-to-end tests: where the built artefacts
//! are, and loud failures when they are missing.
//!
//! The artefacts come from `guest-image/build` (run by `scripts/test` and
//! `.ci/run`). A test that needs one fails with a message that says how to
//! make it; it never passes by skipping.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Where `guest-image/build` puts the guest image (`VMPOD_GUEST_DIR`
/// overrides it).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("VMPOD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest"))
}

/// A built artefact; panics with instructions when it is missing.
pub fn artefact(name: &str) -> PathBuf {
    let path = guest_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the guest image first with `guest-image/build` (or run `scripts/test`)",
        path.display()
    );
    path
}

/// The static agent binary built for the initramfs (`VMPOD_AGENT` overrides).
pub fn static_agent() -> PathBuf {
    let path = std::env::var_os("VMPOD_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/x86_64-unknown-linux-gnu/release/vmpod-agent")
        });
    assert!(
        path.exists(),
        "{} is missing: build it with `guest-image/build` (a static release build of vmpod-agent)",
        path.display()
    );
    path
}

/// Panics with a clear message unless `program` is on PATH.
pub fn require_program(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: install Debian's {package} (scripts/install-deps does)"
    );
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(data);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub mod cri;
pub mod sandbox;
