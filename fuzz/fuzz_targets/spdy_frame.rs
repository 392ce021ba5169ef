//! Parses SPDY/3.1 frames and inflates their header blocks from arbitrary
//! bytes: hostile streaming-client input (the streaming server's parser).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpod::streaming::spdy::frame::{self, Frame};
use vmpod::streaming::spdy::headers::HeaderCodec;

fuzz_target!(|data: &[u8]| {
    // One connection's worth: frames back to back, header blocks through
    // one shared zlib stream, as the connection reader does.
    let mut codec = HeaderCodec::new();
    let mut rest = data;
    while let Ok(Some((f, used))) = frame::parse(rest) {
        assert!(used >= frame::HEADER_LEN && used <= rest.len());
        rest = &rest[used..];
        let block = match &f {
            Frame::SynStream { header_block, .. }
            | Frame::SynReply { header_block, .. }
            | Frame::Headers { header_block, .. } => Some(header_block),
            _ => None,
        };
        if let Some(block) = block {
            if let Ok(headers) = codec.decode(block) {
                assert!(headers.len() <= vmpod::streaming::spdy::headers::MAX_PAIRS);
            } else {
                break;
            }
        }
        // What parses re-encodes to the same bytes' meaning.
        let mut wire = Vec::new();
        f.encode(&mut wire);
        if !matches!(f, Frame::Unknown { .. }) {
            let (again, _) = frame::parse(&wire).expect("an encoded frame parses").expect("whole");
            assert_eq!(again, f);
        }
    }
    // And a header block on its own.
    let _ = HeaderCodec::new().decode(data);
});
