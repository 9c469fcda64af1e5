//! Arbitrary bytes as a published manifest: never a panic, never accepted without the key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::{ManifestVerifier, PublicKey};

fuzz_target!(|data: &[u8]| {
    let verifier = ManifestVerifier::new([PublicKey::from_bytes([7; 32])]);
    assert!(verifier.verify_cbor(data, 0).is_err());
});
