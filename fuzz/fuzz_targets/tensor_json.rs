//! Arbitrary JSON as an Open Inference Protocol tensor: an error or a valid tensor, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::{JsonTensor, Tensor};

fuzz_target!(|data: &[u8]| {
    if let Ok(json) = serde_json::from_slice::<JsonTensor>(data) {
        if let Ok(tensor) = Tensor::from_json(&json) {
            if let Ok(back) = tensor.to_json() {
                assert_eq!(Tensor::from_json(&back).expect("round trip"), tensor);
            }
        }
    }
});
