//! The worker socket codec on arbitrary bytes: `check` then `parse` never panic, and a
//! frame that parses encodes back to exactly the bytes it came from (the codec has one
//! spelling per frame, so a worker and an agent can never disagree on a frame's meaning).

#![no_main]

use libfuzzer_sys::fuzz_target;
use natserve_protocol::Frame;

const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // `parse` on any slice must fail cleanly, whatever its length prefix says.
    let _ = Frame::parse(data);
    match Frame::check(data, MAX) {
        Ok(Some(n)) => {
            assert!(n <= data.len() && n >= 5);
            if let Ok(frame) = Frame::parse(&data[..n]) {
                assert_eq!(frame.to_bytes().as_ref(), &data[..n]);
            }
        }
        Ok(None) | Err(_) => {}
    }
});
