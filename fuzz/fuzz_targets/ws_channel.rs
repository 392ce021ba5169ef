//! The streaming server's other parsers of hostile client input: WebSocket
//! channel messages (binary and base64 sub-protocols) and the terminal
//! resize stream (JSON sizes split anywhere).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpod::streaming::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    fuzzing::websocket_message(first & 1 == 1, rest);
    // The resize stream, cut where the input says.
    let cut = usize::from(first) % (rest.len() + 1);
    let (a, b) = rest.split_at(cut);
    fuzzing::resize_stream(&[a, b]);
});
