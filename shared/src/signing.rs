//! Signed releases: the fleet's ed25519 keys, the signed form a release travels in, and the
//! signer and verifier.
//!
//! A release travels as a [`SignedManifest`]: the CBOR bytes of a payload (format version,
//! signing key id, manifest) and an ed25519 signature over exactly those bytes. The verifier
//! checks the signature over the bytes it received, so no re-encoding is ever trusted.

use std::fmt;
use std::str::FromStr;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cbor;
use crate::chunk::Digest;
use crate::release::{Manifest, ManifestError};

/// The payload format this code writes and reads.
pub const MANIFEST_FORMAT: u16 = 1;
/// The largest signed manifest accepted (a 1 GiB model has ~16k chunks ≈ 1.2 MB of chunk list).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// The id of a signing key: the first 8 bytes of the SHA-256 of its public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        let raw: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
            serde::de::Error::custom(format!("key id must be 8 bytes, not {}", bytes.len()))
        })?;
        Ok(KeyId(raw))
    }
}

/// An ed25519 public key that verifies manifests; written as 64 hex digits in configs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps the 32 raw bytes of an ed25519 public key.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key's id, carried in every payload it signs.
    pub fn id(&self) -> KeyId {
        let digest = Digest::of(&self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest.as_bytes()[..8]);
        KeyId(id)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Text that is not an ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an ed25519 public key (64 hex digits)")]
pub struct BadPublicKey {
    /// The offending text, cut to 80 characters.
    pub text: String,
}

impl FromStr for PublicKey {
    type Err = BadPublicKey;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        crate::hex::decode_array(text)
            .map(Self)
            .ok_or_else(|| BadPublicKey {
                text: text.chars().take(80).collect(),
            })
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A manifest as published: the signed payload's bytes and the signature over them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// CBOR of the signed payload (format, key id, manifest).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// ed25519 signature over `payload`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl fmt::Debug for SignedManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedManifest")
            .field("payload_bytes", &self.payload.len())
            .field("signature_bytes", &self.signature.len())
            .finish()
    }
}

impl SignedManifest {
    /// The CBOR bytes published on the model's manifest topic.
    pub fn to_cbor(&self) -> Result<Vec<u8>, ManifestError> {
        Ok(cbor::encode("signed manifest", self, MAX_MANIFEST_BYTES)?)
    }

    /// Reads a signed manifest from its CBOR bytes (not yet verified).
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, ManifestError> {
        Ok(cbor::decode("signed manifest", bytes, MAX_MANIFEST_BYTES)?)
    }
}

#[derive(Serialize, Deserialize)]
struct SignedPayload {
    format: u16,
    key_id: KeyId,
    manifest: Manifest,
}

/// Signs manifests with the fleet's ed25519 key.
pub struct ManifestSigner {
    key: Ed25519KeyPair,
    public: PublicKey,
}

impl fmt::Debug for ManifestSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManifestSigner")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl ManifestSigner {
    /// A signer from an ed25519 key in PKCS#8 DER (as `firmware-config provision` writes it).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, ManifestError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| ManifestError::BadKey(format!("not an ed25519 PKCS#8 key: {e}")))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(key.public_key().as_ref());
        Ok(Self {
            key,
            public: PublicKey(public),
        })
    }

    /// The public key that verifies this signer's manifests.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Validates and signs `manifest`.
    pub fn sign(&self, manifest: &Manifest) -> Result<SignedManifest, ManifestError> {
        manifest.validate()?;
        let payload = SignedPayload {
            format: MANIFEST_FORMAT,
            key_id: self.public.id(),
            manifest: manifest.clone(),
        };
        let payload = cbor::encode("manifest payload", &payload, MAX_MANIFEST_BYTES)?;
        let signature = self.key.sign(&payload).as_ref().to_vec();
        Ok(SignedManifest { payload, signature })
    }
}

/// A signature over bytes that are not a manifest (a coordinator replica's release record), and
/// the key that made it. What was signed is named by a purpose label, so a signature made for
/// one use never verifies for another, nor as a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachedSignature {
    /// The signing key.
    pub key_id: KeyId,
    /// ed25519 over the purpose label and the bytes.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What a detached signature covers: a fixed prefix (not a CBOR map, so never a manifest
/// payload), the purpose, a zero byte, the bytes.
fn detached_message(purpose: &str, bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(32 + purpose.len() + bytes.len());
    message.extend_from_slice(b"outpost detached signature\0");
    message.extend_from_slice(purpose.as_bytes());
    message.push(0);
    message.extend_from_slice(bytes);
    message
}

impl ManifestSigner {
    /// Signs `bytes` for `purpose` (a fixed label such as `"replica release record"`).
    pub fn sign_detached(&self, purpose: &'static str, bytes: &[u8]) -> DetachedSignature {
        DetachedSignature {
            key_id: self.public.id(),
            signature: self
                .key
                .sign(&detached_message(purpose, bytes))
                .as_ref()
                .to_vec(),
        }
    }
}

/// Verifies signed manifests against the fleet's trusted keys.
#[derive(Debug, Clone)]
pub struct ManifestVerifier {
    keys: Vec<PublicKey>,
}

impl ManifestVerifier {
    /// A verifier that trusts exactly `keys` (more than one while keys rotate).
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        Self {
            keys: keys.into_iter().collect(),
        }
    }

    /// Checks format, key, signature, expiry (against `now`, Unix seconds) and the manifest's
    /// own rules, and returns the manifest. Anything unverifiable is an error.
    pub fn verify(&self, signed: &SignedManifest, now: u64) -> Result<Manifest, ManifestError> {
        let payload: SignedPayload =
            cbor::decode("manifest payload", &signed.payload, MAX_MANIFEST_BYTES)?;
        if payload.format != MANIFEST_FORMAT {
            return Err(ManifestError::UnsupportedFormat(payload.format));
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.id() == payload.key_id)
            .ok_or(ManifestError::UnknownKey(payload.key_id))?;
        UnparsedPublicKey::new(&ED25519, key.as_bytes())
            .verify(&signed.payload, &signed.signature)
            .map_err(|_| ManifestError::BadSignature {
                model: payload.manifest.model.clone(),
            })?;
        let manifest = payload.manifest;
        let Some(expires_at) = manifest.expires_at else {
            return Err(ManifestError::NoExpiry {
                model: manifest.model,
            });
        };
        if now >= expires_at {
            return Err(ManifestError::Expired {
                model: manifest.model,
                expires_at,
                now,
            });
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks that `signature` is a trusted key's over `bytes` for `purpose`.
    pub fn verify_detached(
        &self,
        purpose: &'static str,
        bytes: &[u8],
        signature: &DetachedSignature,
    ) -> Result<(), ManifestError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id() == signature.key_id)
            .ok_or(ManifestError::UnknownKey(signature.key_id))?;
        UnparsedPublicKey::new(&ED25519, key.as_bytes())
            .verify(&detached_message(purpose, bytes), &signature.signature)
            .map_err(|_| ManifestError::BadDetachedSignature { purpose })
    }

    /// [`SignedManifest::from_cbor`] then [`Self::verify`].
    pub fn verify_cbor(&self, bytes: &[u8], now: u64) -> Result<Manifest, ManifestError> {
        self.verify(&SignedManifest::from_cbor(bytes)?, now)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::release::tests::manifest;
    use proptest::prelude::*;

    pub(crate) fn new_signer() -> ManifestSigner {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        ManifestSigner::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    const NOW: u64 = 1_750_000_000;

    #[test]
    fn signed_manifest_verifies() {
        let signer = new_signer();
        let signed = signer.sign(&manifest()).unwrap();
        let bytes = signed.to_cbor().unwrap();
        let verifier = ManifestVerifier::new([signer.public_key()]);
        assert_eq!(verifier.verify_cbor(&bytes, NOW).unwrap(), manifest());
    }

    #[test]
    fn detached_signatures_cover_their_bytes_and_purpose() {
        let signer = new_signer();
        let verifier = ManifestVerifier::new([signer.public_key()]);
        let signature = signer.sign_detached("replica release record", b"record bytes");
        verifier
            .verify_detached("replica release record", b"record bytes", &signature)
            .unwrap();
        for (purpose, bytes) in [
            ("replica release record", &b"record byteS"[..]),
            ("something else", &b"record bytes"[..]),
        ] {
            assert!(matches!(
                verifier.verify_detached(purpose, bytes, &signature),
                Err(ManifestError::BadDetachedSignature { .. })
            ));
        }
        let stranger = ManifestVerifier::new([new_signer().public_key()]);
        assert!(matches!(
            stranger.verify_detached("replica release record", b"record bytes", &signature),
            Err(ManifestError::UnknownKey(_))
        ));
        // Never valid as a manifest either.
        let forged = SignedManifest {
            payload: detached_message("replica release record", b"record bytes"),
            signature: signature.signature.clone(),
        };
        assert!(verifier.verify(&forged, NOW).is_err());
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let signer = new_signer();
        let verifier = ManifestVerifier::new([signer.public_key()]);
        let bytes = signer.sign(&manifest()).unwrap().to_cbor().unwrap();
        // Flip each byte of the encoding in turn (step 7 keeps the test fast; every region is hit).
        for i in (0..bytes.len()).step_by(7) {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            assert!(
                verifier.verify_cbor(&tampered, NOW).is_err(),
                "byte {i} changed and still accepted"
            );
        }
    }

    #[test]
    fn payload_change_is_a_bad_signature() {
        let signer = new_signer();
        let verifier = ManifestVerifier::new([signer.public_key()]);
        let mut signed = signer.sign(&manifest()).unwrap();
        let mut other = manifest();
        other.candidate.as_mut().unwrap().rollout_percent = 100;
        signed.payload = signer.sign(&other).unwrap().payload;
        let err = verifier.verify(&signed, NOW).unwrap_err();
        assert!(matches!(err, ManifestError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn wrong_key_is_refused_by_id_and_by_signature() {
        let signer = new_signer();
        let other = new_signer();
        let signed = signer.sign(&manifest()).unwrap();
        let err = ManifestVerifier::new([other.public_key()])
            .verify(&signed, NOW)
            .unwrap_err();
        assert!(
            matches!(err, ManifestError::UnknownKey(id) if id == signer.public_key().id()),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&signer.public_key().id().to_string())
        );
        // A signature by another key under the right key id.
        let forged = SignedManifest {
            payload: signed.payload.clone(),
            signature: other.sign(&manifest()).unwrap().signature,
        };
        let err = ManifestVerifier::new([signer.public_key()])
            .verify(&forged, NOW)
            .unwrap_err();
        assert!(matches!(err, ManifestError::BadSignature { .. }), "{err}");
        let err = ManifestVerifier::new([]).verify(&signed, NOW).unwrap_err();
        assert!(matches!(err, ManifestError::UnknownKey(_)), "{err}");
    }

    #[test]
    fn rotation_accepts_either_trusted_key() {
        let (old, new) = (new_signer(), new_signer());
        let verifier = ManifestVerifier::new([old.public_key(), new.public_key()]);
        assert!(
            verifier
                .verify(&old.sign(&manifest()).unwrap(), NOW)
                .is_ok()
        );
        assert!(
            verifier
                .verify(&new.sign(&manifest()).unwrap(), NOW)
                .is_ok()
        );
    }

    #[test]
    fn expired_manifest_is_refused() {
        let signer = new_signer();
        let verifier = ManifestVerifier::new([signer.public_key()]);
        let signed = signer.sign(&manifest()).unwrap();
        assert!(verifier.verify(&signed, 1_799_999_999).is_ok());
        let err = verifier.verify(&signed, 1_800_000_000).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::Expired {
                    expires_at: 1_800_000_000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn garbage_and_empty_messages_are_errors() {
        let verifier = ManifestVerifier::new([new_signer().public_key()]);
        for bytes in [&b""[..], b"offline", &[0xff; 64], &[0xa0]] {
            assert!(verifier.verify_cbor(bytes, NOW).is_err());
        }
    }

    #[test]
    fn key_text_round_trips() {
        let key = new_signer().public_key();
        assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
        assert!("zz".parse::<PublicKey>().is_err());
    }

    proptest! {
        #[test]
        fn manifests_round_trip(release in 3u64..1000, percent in 0u8..=100, salt in "[a-z]{0,12}", created in 0u64..1_000_000) {
            let mut m = manifest();
            m.release = release;
            m.created_at = created;
            m.expires_at = Some(NOW + created + 1);
            let c = m.candidate.as_mut().unwrap();
            c.rollout_percent = percent;
            c.salt = salt;
            let signer = new_signer();
            let bytes = signer.sign(&m).unwrap().to_cbor().unwrap();
            prop_assert_eq!(ManifestVerifier::new([signer.public_key()]).verify_cbor(&bytes, NOW).unwrap(), m);
        }
    }
}
