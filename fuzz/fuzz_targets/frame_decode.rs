//! Arbitrary bytes into the QUIC frame decoder: errors are fine, panics and large allocations
//! are not. Whatever decodes must encode again and decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::frame::{self, MAX_FRAME_BYTES};
use outpost_shared::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((request, _))) = frame::decode::<Request>(data, 1 << 20) {
        let again = frame::encode(&request, MAX_FRAME_BYTES).expect("a decoded request encodes");
        let (back, _) = frame::decode::<Request>(&again, MAX_FRAME_BYTES).expect("re-decodes").expect("whole frame");
        assert_eq!(back, request);
    }
    let _ = frame::decode::<Response>(data, 1 << 20);
    let _ = frame::decode_body::<Request>(data, 1 << 20);
});
