//! Unpacks an arbitrary (possibly compressed) layer into a fresh directory
//! with small limits: hostile registry input. Escapes, bombs and malformed
//! archives must be errors, never panics or writes outside the root.
#![no_main]

use std::io::BufReader;
use std::sync::atomic::AtomicBool;

use libfuzzer_sys::fuzz_target;
use vmpod::image::unpack::{self, UnpackLimits, UnpackStats};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let root = dir.path().join("root");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    let limits = UnpackLimits { max_bytes: 1 << 20, max_entries: 256, preserve_ownership: false };
    let Ok(reader) = unpack::decompress(BufReader::new(data)) else { return };
    let _ = unpack::apply_layer(&root, reader, &limits, &AtomicBool::new(false), &mut UnpackStats::default());
    // Nothing may appear beside the root.
    let outside: Vec<_> = std::fs::read_dir(dir.path()).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
    assert_eq!(outside, vec![std::ffi::OsString::from("root")], "an entry escaped the root");
});
