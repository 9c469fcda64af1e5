//! Content-defined chunking (FastCDC) and content digests (SHA-256).
//!
//! Model bytes are split where their content says, not at fixed offsets, so a model that changed
//! in one place shares every other chunk with its previous version and agents fetch only what
//! they lack. Chunks are named by the SHA-256 of their bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Smallest chunk FastCDC cuts (except the last one of a file).
pub const MIN_CHUNK: u32 = 16 * 1024;
/// The average chunk size FastCDC aims for.
pub const AVG_CHUNK: u32 = 64 * 1024;
/// Largest chunk FastCDC cuts; also the largest chunk anyone should accept.
pub const MAX_CHUNK: u32 = 256 * 1024;

/// A SHA-256 digest, written as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// A chunk is named by the digest of its bytes.
pub type ChunkId = Digest;

impl Digest {
    /// The SHA-256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        crate::hex::encode(&self.0)
    }

    /// Checks that `bytes` hash to this digest.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), DigestMismatch> {
        let actual = Self::of(bytes);
        if actual == *self {
            Ok(())
        } else {
            Err(DigestMismatch {
                expected: *self,
                actual,
                len: bytes.len(),
            })
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// Text that is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a SHA-256 digest (64 hex digits)")]
pub struct BadDigest {
    /// The offending text, cut to 80 characters.
    pub text: String,
}

impl FromStr for Digest {
    type Err = BadDigest;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        crate::hex::decode_array(text)
            .map(Self)
            .ok_or_else(|| BadDigest {
                text: text.chars().take(80).collect(),
            })
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Bytes whose digest is not the one expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("content digest mismatch: expected {expected}, got {actual} over {len} bytes")]
pub struct DigestMismatch {
    /// The digest that was expected.
    pub expected: Digest,
    /// The digest of the bytes received.
    pub actual: Digest,
    /// How many bytes were hashed.
    pub len: usize,
}

/// One chunk of a larger byte string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Where the chunk starts in the source.
    pub offset: usize,
    /// Its length in bytes.
    pub len: usize,
    /// The digest of its bytes.
    pub id: ChunkId,
}

impl ChunkSpan {
    /// The chunk's bytes within `source` (the bytes it was cut from).
    pub fn bytes<'a>(&self, source: &'a [u8]) -> &'a [u8] {
        &source[self.offset..self.offset + self.len]
    }
}

/// Splits `data` into content-defined chunks (FastCDC 2020, [`MIN_CHUNK`]..[`MAX_CHUNK`], about
/// [`AVG_CHUNK`] on average). The chunks cover `data` in order, without gaps; empty data gives
/// no chunks.
pub fn split(data: &[u8]) -> Vec<ChunkSpan> {
    fastcdc::v2020::FastCDC::new(data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        .map(|c| ChunkSpan {
            offset: c.offset,
            len: c.length,
            id: Digest::of(&data[c.offset..c.offset + c.length]),
        })
        .collect()
}

/// Consecutive weight tensors smaller than this share a chunk (see [`split_model`]).
pub const MIN_TENSOR_CHUNK: usize = 4 * 1024;

/// Splits an ONNX model's bytes at its weight tensors: a cut before each initializer of the
/// graph, consecutive small ones grouped until a group holds [`MIN_TENSOR_CHUNK`] bytes, and
/// FastCDC ([`split`]) inside a group larger than [`MAX_CHUNK`]. A retrained layer then changes
/// only its own tensors' chunks (a few KiB for a classifier head) instead of the ~64 KiB chunk
/// FastCDC alone would cut around it. Bytes that do not read as an ONNX protobuf are split by
/// [`split`] alone. The chunks cover `data` in order, without gaps.
pub fn split_model(data: &[u8]) -> Vec<ChunkSpan> {
    let Some(cuts) = initializer_offsets(data) else {
        return split(data);
    };
    let mut groups = Vec::new();
    let mut start = 0;
    for cut in cuts {
        if cut - start >= MIN_TENSOR_CHUNK {
            groups.push((start, cut));
            start = cut;
        }
    }
    if start < data.len() {
        groups.push((start, data.len()));
    }
    let mut spans = Vec::new();
    for (from, to) in groups {
        let part = &data[from..to];
        if part.len() <= MAX_CHUNK as usize {
            spans.push(ChunkSpan {
                offset: from,
                len: part.len(),
                id: Digest::of(part),
            });
        } else {
            spans.extend(split(part).into_iter().map(|s| ChunkSpan {
                offset: s.offset + from,
                ..s
            }));
        }
    }
    spans
}

fn varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Walks the fields of one protobuf message in `data[from..to]`, calling `field(number,
/// key_offset, payload)` for each length-delimited one; `None` if the bytes are not a message.
fn fields(
    data: &[u8],
    from: usize,
    to: usize,
    mut field: impl FnMut(u64, usize, (usize, usize)),
) -> Option<()> {
    let mut pos = from;
    while pos < to {
        let key_at = pos;
        let key = varint(data, &mut pos)?;
        match key & 7 {
            0 => {
                varint(data, &mut pos)?;
            }
            1 => pos = pos.checked_add(8)?,
            5 => pos = pos.checked_add(4)?,
            2 => {
                let len = usize::try_from(varint(data, &mut pos)?).ok()?;
                let end = pos.checked_add(len)?;
                if end > to {
                    return None;
                }
                field(key >> 3, key_at, (pos, end));
                pos = end;
            }
            _ => return None,
        }
    }
    (pos == to).then_some(())
}

/// Where each initializer of an ONNX model's graph starts (its field key), in order.
fn initializer_offsets(data: &[u8]) -> Option<Vec<usize>> {
    // ModelProto.graph is field 7; GraphProto.initializer is field 5.
    let mut graph = None;
    fields(data, 0, data.len(), |number, _, payload| {
        if number == 7 {
            graph = Some(payload);
        }
    })?;
    let (from, to) = graph?;
    let mut offsets = Vec::new();
    fields(data, from, to, |number, key_at, _| {
        if number == 5 {
            offsets.push(key_at);
        }
    })?;
    (!offsets.is_empty()).then_some(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn digest_of_known_input() {
        assert_eq!(
            Digest::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn verify_names_both_digests() {
        let d = Digest::of(b"model");
        assert!(d.verify(b"model").is_ok());
        let err = d.verify(b"modex").unwrap_err();
        assert_eq!(err.expected, d);
        assert!(err.to_string().contains(&d.to_hex()));
    }

    #[test]
    fn chunks_cover_data_within_bounds() {
        let data = pseudo_random(3 * 1024 * 1024 + 17, 7);
        let spans = split(&data);
        let mut next = 0;
        for (i, span) in spans.iter().enumerate() {
            assert_eq!(span.offset, next);
            assert!(span.len <= MAX_CHUNK as usize);
            if i + 1 < spans.len() {
                assert!(span.len >= MIN_CHUNK as usize);
            }
            assert_eq!(span.id, Digest::of(span.bytes(&data)));
            next += span.len;
        }
        assert_eq!(next, data.len());
        // About 64 KiB on average: 48 chunks expected for 3 MiB, allow a wide margin.
        assert!((20..=100).contains(&spans.len()), "{} chunks", spans.len());
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn a_local_change_keeps_most_chunks() {
        let data = pseudo_random(4 * 1024 * 1024, 11);
        let mut changed = data.clone();
        for b in &mut changed[2_000_000..2_000_100] {
            *b ^= 0x5a;
        }
        let before: std::collections::HashSet<_> = split(&data).iter().map(|s| s.id).collect();
        let after = split(&changed);
        let new_bytes: usize = after
            .iter()
            .filter(|s| !before.contains(&s.id))
            .map(|s| s.len)
            .sum();
        assert!(
            new_bytes <= 3 * MAX_CHUNK as usize,
            "{new_bytes} bytes changed"
        );
    }

    /// A protobuf length-delimited field.
    fn message(field: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for mut v in [field << 3 | 2, payload.len() as u64] {
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(byte);
                    break;
                }
                out.push(byte | 0x80);
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// An ONNX-shaped protobuf: a graph (field 7) of a node and initializers (field 5) of the
    /// given sizes, then opset-like trailing fields.
    fn model(tensors: &[(usize, u64)]) -> Vec<u8> {
        let mut graph = message(1, b"a node");
        for &(len, seed) in tensors {
            graph.extend(message(5, &pseudo_random(len, seed)));
        }
        graph.extend(message(11, b"an input"));
        let mut out = vec![0x08, 0x08]; // ir_version 8
        out.extend(message(7, &graph));
        out.extend(message(8, b"opset"));
        out
    }

    #[test]
    fn a_model_is_cut_at_its_tensors_and_a_changed_head_is_its_own_chunk() {
        let layers = [(600_000, 1), (40_000, 2), (512, 3), (2048, 4), (64, 5)];
        let v1 = model(&layers);
        let mut changed = layers;
        changed[3].1 = 99; // the head's weights
        changed[4].1 = 98; // and its bias
        let v2 = model(&changed);
        assert_eq!(v1.len(), v2.len());
        for data in [&v1, &v2] {
            let spans = split_model(data);
            let mut offset = 0;
            for s in &spans {
                assert_eq!(s.offset, offset);
                assert!(s.len <= MAX_CHUNK as usize);
                offset += s.len;
            }
            assert_eq!(offset, data.len());
        }
        let before: std::collections::HashSet<_> = split_model(&v1).iter().map(|s| s.id).collect();
        let new: usize = split_model(&v2)
            .iter()
            .filter(|s| !before.contains(&s.id))
            .map(|s| s.len)
            .sum();
        // The 512-byte tensor before the head shares its group; nothing else is new.
        assert!(new > 2048 && new < 3 * 1024, "{new} new bytes");
        // Not a model: plain FastCDC.
        let noise = pseudo_random(100_000, 3);
        assert_eq!(split_model(&noise), split(&noise));
    }

    proptest! {
        #[test]
        fn split_model_covers_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let spans = split_model(&data);
            let total: usize = spans.iter().map(|s| s.len).sum();
            prop_assert_eq!(total, data.len());
        }

        #[test]
        fn digest_text_round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let d = Digest::from_bytes(bytes);
            prop_assert_eq!(d.to_hex().parse::<Digest>(), Ok(d));
            let cbor = crate::cbor::encode("digest", &d, 1024).unwrap();
            prop_assert_eq!(crate::cbor::decode::<Digest>("digest", &cbor, 1024).unwrap(), d);
        }

        #[test]
        fn split_is_deterministic_and_complete(len in 0usize..300_000, seed in any::<u64>()) {
            let data = pseudo_random(len, seed | 1);
            let spans = split(&data);
            prop_assert_eq!(&spans, &split(&data));
            let total: usize = spans.iter().map(|s| s.len).sum();
            prop_assert_eq!(total, len);
        }
    }
}
