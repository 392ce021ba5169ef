//! The guest image as built by `guest-image/build`: a static agent, an
//! initramfs that holds only it, a kernel with every required option, the
//! kernel cache, and the demo OCI image.

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

use vmpod::guest::{elf, initramfs};
use vmpod_tests::{artefact, sha256_digest, static_agent, workspace_root};

#[test]
fn agent_binary_is_statically_linked() {
    let agent = static_agent();
    let bytes = fs::read(&agent).unwrap();
    if let Err(e) = elf::check_static(&bytes) {
        panic!("{} is not a static binary: {e}", agent.display());
    }
}

#[test]
fn initramfs_holds_only_the_agent_as_init() {
    let cpio = fs::read(artefact("initramfs.cpio")).unwrap();
    let entries = initramfs::read_newc(&cpio).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["init"],
        "the initramfs must hold the agent and nothing else"
    );
    assert_eq!(entries[0].mode, initramfs::MODE_EXECUTABLE);
    assert!(
        entries[0].data == fs::read(static_agent()).unwrap(),
        "/init differs from the static agent binary"
    );
}

#[test]
fn initramfs_build_is_reproducible() {
    let agent = static_agent();
    let a = initramfs::build(&agent).unwrap();
    let b = initramfs::build(&agent).unwrap();
    assert!(a == b, "two builds from the same agent differ");
    assert!(
        a == fs::read(artefact("initramfs.cpio")).unwrap(),
        "the built initramfs.cpio is stale or not reproducible"
    );
}

/// Every `CONFIG_X=y` of the fragment, and every `# CONFIG_X is not set`.
fn fragment_options() -> (Vec<String>, Vec<String>) {
    let fragment =
        fs::read_to_string(workspace_root().join("guest-image/kernel/microvm.config")).unwrap();
    let mut on = Vec::new();
    let mut off = Vec::new();
    for line in fragment.lines() {
        if line.starts_with("CONFIG_") && line.ends_with("=y") {
            on.push(line.to_string());
        } else if let Some(opt) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            off.push(opt.to_string());
        }
    }
    (on, off)
}

#[test]
fn kernel_has_every_option_the_fragment_requires() {
    let config = fs::read_to_string(artefact("kernel.config")).unwrap();
    let lines: Vec<&str> = config.lines().collect();
    let (on, off) = fragment_options();
    assert!(
        on.len() > 100,
        "the fragment lost its options ({} found)",
        on.len()
    );
    let missing: Vec<&String> = on.iter().filter(|o| !lines.contains(&o.as_str())).collect();
    assert!(missing.is_empty(), "the kernel lacks {missing:?}");
    let set: Vec<&String> = off
        .iter()
        .filter(|o| lines.iter().any(|l| l.starts_with(&format!("{o}="))))
        .collect();
    assert!(set.is_empty(), "the kernel has {set:?} set");
    for required in ["CONFIG_PCI", "CONFIG_ACPI", "CONFIG_MODULES"] {
        assert!(
            off.iter().any(|o| o == required),
            "the fragment must keep {required} off"
        );
    }

    let vmlinux = fs::read(artefact("vmlinux")).unwrap();
    assert_eq!(
        &vmlinux[..4],
        b"\x7fELF",
        "vmlinux must be an uncompressed ELF kernel"
    );
}

#[test]
fn second_kernel_build_is_served_from_the_cache() {
    let out = Command::new(workspace_root().join("guest-image/kernel/build.sh"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build.sh failed: {stderr}");
    assert!(
        stderr.contains("kernel: cached"),
        "build.sh rebuilt the kernel instead of using its cache: {stderr}"
    );
    let cached = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        fs::canonicalize(artefact("vmlinux")).unwrap(),
        fs::canonicalize(&cached).unwrap(),
        "target/guest/vmlinux should link to the cached kernel"
    );
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reads a blob by descriptor and checks its digest and size.
fn blob(layout: &std::path::Path, desc: &serde_json::Value) -> Vec<u8> {
    let digest = desc["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let data = fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(
        sha256_digest(&data),
        digest,
        "blob content does not match its digest"
    );
    assert_eq!(
        desc["size"].as_u64().unwrap(),
        data.len() as u64,
        "descriptor size is wrong for {digest}"
    );
    data
}

#[test]
fn demo_image_is_a_valid_oci_layout_of_busybox() {
    let layout = artefact("demo-image");
    assert_eq!(
        read_json(&layout.join("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );
    let index = read_json(&layout.join("index.json"));
    let desc = &index["manifests"][0];
    assert_eq!(
        desc["annotations"]["io.containerd.image.name"],
        "localhost/vmpod/busybox:latest"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&layout, desc)).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&blob(&layout, &manifest["config"])).unwrap();
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Cmd"][0], "sh");

    let layer_desc = &manifest["layers"][0];
    assert_eq!(
        layer_desc["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer_gz = blob(&layout, layer_desc);
    let tmp = tempfile::tempdir().unwrap();
    let gz_path = tmp.path().join("layer.tar.gz");
    fs::write(&gz_path, &layer_gz).unwrap();
    let tar = Command::new("gzip")
        .arg("-dc")
        .arg(&gz_path)
        .output()
        .unwrap();
    assert!(tar.status.success());
    assert_eq!(
        config["rootfs"]["diff_ids"][0].as_str().unwrap(),
        sha256_digest(&tar.stdout),
        "diff_id mismatch"
    );
    let listing = Command::new("tar")
        .arg("-tvzf")
        .arg(&gz_path)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x 0/0") && l.ends_with("./bin/busybox")),
        "{listing}"
    );
    assert!(
        listing.lines().any(|l| l.ends_with("./bin/sh -> busybox")),
        "{listing}"
    );
    assert!(listing.contains("./etc/passwd"));
}

#[test]
fn demo_image_build_is_reproducible_and_archived() {
    let tmp = tempfile::tempdir().unwrap();
    let status = Command::new(workspace_root().join("guest-image/demo-image/build.sh"))
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success());
    let index_of = |dir: &std::path::Path| fs::read(dir.join("demo-image/index.json")).unwrap();
    assert!(
        index_of(tmp.path()) == index_of(artefact("demo-image").parent().unwrap()),
        "digests differ between builds"
    );

    // The OCI archive holds the same layout.
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(artefact("demo-image.tar"))
        .output()
        .unwrap();
    let names: BTreeMap<String, ()> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(|l| (l.trim_start_matches("./").to_string(), ()))
        .collect();
    for required in ["index.json", "oci-layout", "blobs/sha256/"] {
        assert!(
            names.contains_key(required),
            "demo-image.tar lacks {required}: {names:?}"
        );
    }
}
