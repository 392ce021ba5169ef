//! Parses registry documents (manifests, indexes, image configs) and image
//! references from arbitrary bytes: hostile registry input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpod::image::manifest;
use vmpod::image::reference::ImageReference;

fuzz_target!(|data: &[u8]| {
    for content_type in [
        None,
        Some("application/vnd.oci.image.manifest.v1+json"),
        Some("application/vnd.oci.image.index.v1+json"),
        Some("application/vnd.docker.distribution.manifest.v2+json"),
        Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    ] {
        let _ = manifest::parse(data, content_type);
    }
    let _ = manifest::parse_config(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(reference) = ImageReference::parse(text) {
            // What we print must parse back to the same reference.
            let again = ImageReference::parse(&reference.to_string()).expect("a printed reference parses");
            assert_eq!(again.to_string(), reference.to_string());
        }
        let _ = manifest::split_user(text);
    }
});
