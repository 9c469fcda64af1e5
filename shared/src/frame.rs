//! QUIC frames between an agent and a coordinator: one bidirectional stream per request, each
//! message a u32 big-endian length followed by that many bytes of CBOR.
//!
//! The length is checked against a limit before anything is allocated, and decoding arbitrary
//! bytes returns an error, never panics.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cbor::{self, CborError};
use crate::chunk::ChunkId;
use crate::tensor::Tensor;

/// The protocol version sent in [`Request::Hello`]; peers refuse versions they do not speak.
pub const PROTOCOL_VERSION: u32 = 1;
/// The QUIC/TLS application protocol name.
pub const ALPN: &[u8] = b"outpost/1";
/// The default limit on one frame's body: 16 MiB.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 4;
/// The most chunk ids one `GetChunks` may name: each is a file read on the coordinator, so one
/// small frame must not ask for thousands.
pub const MAX_CHUNKS_PER_REQUEST: usize = 256;

/// What an agent asks a coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// First message on a connection: the agent's protocol version.
    Hello {
        /// The protocol version the agent speaks.
        protocol: u32,
        /// The agent's software version.
        agent_version: String,
    },
    /// Send these chunks, in order; each is answered with a [`Response::Chunk`] or, when the
    /// coordinator does not have it, [`Response::ChunkMissing`].
    GetChunks {
        /// The chunks wanted.
        ids: Vec<ChunkId>,
    },
    /// Run a model.
    Infer {
        /// The model's name.
        model: String,
        /// A specific version, or the current one.
        version: Option<u64>,
        /// The inputs.
        inputs: Vec<Tensor>,
        /// The outputs wanted (empty: all).
        outputs: Vec<String>,
    },
    /// Send the current signed release of every model (or of these models only), each as a
    /// [`Response::Release`]: the channel beside MQTT, so that a release hidden from the broker
    /// still reaches the device.
    Releases {
        /// Only these models (empty: all).
        models: Vec<String>,
    },
}

/// What a coordinator answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello {
        /// The protocol version the coordinator speaks.
        protocol: u32,
        /// The coordinator's software version.
        coordinator_version: String,
    },
    /// One chunk's bytes.
    Chunk {
        /// The chunk's id.
        id: ChunkId,
        /// Its bytes (the receiver verifies them against `id`).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A chunk the coordinator does not have.
    ChunkMissing {
        /// The chunk's id.
        id: ChunkId,
    },
    /// The outputs of an inference.
    Inferred {
        /// The model that ran.
        model: String,
        /// The version that ran.
        version: u64,
        /// The outputs.
        outputs: Vec<Tensor>,
    },
    /// One model's current release: the signed manifest, byte for byte as on MQTT (the
    /// receiver verifies it, and `model` is only a hint until then).
    Release {
        /// The model it names.
        model: String,
        /// The signed manifest (CBOR).
        #[serde(with = "serde_bytes")]
        signed: Vec<u8>,
    },
    /// The coordinator is at capacity; try again after the hint.
    Busy {
        /// Milliseconds to wait before retrying.
        retry_after_ms: u32,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// What went wrong, in words.
        message: String,
    },
}

/// The kinds of failure a [`Response::Error`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The frame could not be read or is not a valid request.
    BadRequest,
    /// The peer speaks a protocol version this side does not.
    UnsupportedProtocol,
    /// No such model (or version).
    UnknownModel,
    /// The inputs do not fit the model's signature.
    InvalidInput,
    /// The peer is not allowed to do this.
    Unauthorized,
    /// Something failed on the answering side.
    Internal,
    /// A server the answer needs is down or not ready (a backend's replicas): try again later.
    Unavailable,
    /// A kind this version does not know (sent by a newer peer).
    #[serde(other)]
    Other,
}

/// Why a frame could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announces a body over the limit (nothing was allocated).
    #[error("frame of {len} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The announced body length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// The body is not a valid message.
    #[error(transparent)]
    Cbor(#[from] CborError),
}

/// Encodes `message` as one frame (header and body), refusing bodies over `limit` bytes.
pub fn encode<T: Serialize>(message: &T, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; HEADER_BYTES];
    cbor::encode_into("frame", message, &mut frame)?;
    let body = frame.len() - HEADER_BYTES;
    let len = u32::try_from(body)
        .ok()
        .filter(|_| body <= limit)
        .ok_or(FrameError::TooLarge {
            len: body as u64,
            limit,
        })?;
    frame[..HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
    Ok(frame)
}

/// Reads a frame header: the body length, checked against `limit`.
pub fn body_len(header: [u8; HEADER_BYTES], limit: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    usize::try_from(len)
        .ok()
        .filter(|&n| n <= limit)
        .ok_or(FrameError::TooLarge {
            len: u64::from(len),
            limit,
        })
}

/// Decodes a frame body (the bytes after the header) as exactly one message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8], limit: usize) -> Result<T, FrameError> {
    Ok(cbor::decode("frame", body, limit)?)
}

/// Decodes the first frame in `buf`: `Ok(None)` when `buf` does not yet hold a whole frame,
/// else the message and how many bytes it took.
pub fn decode<T: DeserializeOwned>(
    buf: &[u8],
    limit: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some((header, rest)) = buf.split_first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let len = body_len(*header, limit)?;
    let Some(body) = rest.get(..len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body, limit)?, HEADER_BYTES + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Digest;
    use proptest::prelude::*;

    fn tensor() -> impl Strategy<Value = Tensor> {
        (1u64..5, 1u64..5).prop_flat_map(|(a, b)| {
            proptest::collection::vec(-1e6f32..1e6, (a * b) as usize)
                .prop_map(move |v| Tensor::from_values("x", vec![a, b], &v).unwrap())
        })
    }

    fn digest() -> impl Strategy<Value = ChunkId> {
        proptest::array::uniform32(any::<u8>()).prop_map(Digest::from_bytes)
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any::<u32>(), ".{0,20}").prop_map(|(protocol, agent_version)| Request::Hello {
                protocol,
                agent_version
            }),
            proptest::collection::vec(digest(), 0..10).prop_map(|ids| Request::GetChunks { ids }),
            (
                "[a-z-]{1,20}",
                proptest::option::of(any::<u64>()),
                proptest::collection::vec(tensor(), 0..3),
                proptest::collection::vec("[a-z]{1,8}", 0..3)
            )
                .prop_map(|(model, version, inputs, outputs)| Request::Infer {
                    model,
                    version,
                    inputs,
                    outputs
                }),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (any::<u32>(), ".{0,20}").prop_map(|(protocol, coordinator_version)| Response::Hello {
                protocol,
                coordinator_version
            }),
            (digest(), proptest::collection::vec(any::<u8>(), 0..2000))
                .prop_map(|(id, data)| Response::Chunk { id, data }),
            digest().prop_map(|id| Response::ChunkMissing { id }),
            (
                "[a-z-]{1,20}",
                any::<u64>(),
                proptest::collection::vec(tensor(), 0..3)
            )
                .prop_map(|(model, version, outputs)| Response::Inferred {
                    model,
                    version,
                    outputs
                }),
            any::<u32>().prop_map(|retry_after_ms| Response::Busy { retry_after_ms }),
            (
                prop_oneof![
                    Just(ErrorKind::BadRequest),
                    Just(ErrorKind::UnknownModel),
                    Just(ErrorKind::Internal)
                ],
                ".{0,40}"
            )
                .prop_map(|(kind, message)| Response::Error { kind, message }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in request()) {
            let frame = encode(&req, MAX_FRAME_BYTES).unwrap();
            let (back, used) = decode::<Request>(&frame, MAX_FRAME_BYTES).unwrap().unwrap();
            prop_assert_eq!(back, req);
            prop_assert_eq!(used, frame.len());
        }

        #[test]
        fn responses_round_trip(resp in response()) {
            let frame = encode(&resp, MAX_FRAME_BYTES).unwrap();
            let (back, used) = decode::<Response>(&frame, MAX_FRAME_BYTES).unwrap().unwrap();
            prop_assert_eq!(back, resp);
            prop_assert_eq!(used, frame.len());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = decode::<Request>(&bytes, 4096);
            let _ = decode::<Response>(&bytes, 4096);
            let _ = decode_body::<Request>(&bytes, 4096);
        }

        #[test]
        fn truncated_frames_wait_for_more(resp in response(), cut in 0usize..64) {
            let frame = encode(&resp, MAX_FRAME_BYTES).unwrap();
            let cut = cut.min(frame.len() - 1);
            prop_assert!(decode::<Response>(&frame[..cut], MAX_FRAME_BYTES).unwrap().is_none());
        }

        #[test]
        fn mutated_frames_never_panic(req in request(), at in any::<usize>(), bit in 0u8..8) {
            let mut frame = encode(&req, MAX_FRAME_BYTES).unwrap();
            let i = at % frame.len();
            frame[i] ^= 1 << bit;
            let _ = decode::<Request>(&frame, MAX_FRAME_BYTES);
        }
    }

    #[test]
    fn oversized_header_is_refused_before_allocating() {
        let err = decode::<Request>(&[0xff, 0xff, 0xff, 0xff, 0], 1024).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    len: 4_294_967_295,
                    limit: 1024
                }
            ),
            "{err}"
        );
        let req = Request::GetChunks {
            ids: vec![Digest::of(b"x"); 100],
        };
        assert!(matches!(encode(&req, 64), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn trailing_bytes_and_wrong_types_are_errors() {
        let mut frame = encode(&Request::GetChunks { ids: vec![] }, 1024).unwrap();
        frame.push(0);
        let len = u32::try_from(frame.len() - HEADER_BYTES).unwrap();
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let err = decode::<Request>(&frame, 1024).unwrap_err();
        assert!(err.to_string().contains("unexpected bytes"), "{err}");
        let resp = encode(&Response::Busy { retry_after_ms: 5 }, 1024).unwrap();
        assert!(decode::<Request>(&resp, 1024).is_err());
    }

    #[test]
    fn a_byte_string_longer_than_the_body_is_an_error() {
        // CBOR: map(1) "GetChunks" … would be long; use a bare byte string header claiming 4 GiB.
        let body = [0x5a, 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(decode_body::<Response>(&body, 1024).is_err());
    }

    #[test]
    fn unknown_error_kinds_from_newer_peers_still_decode() {
        #[derive(Serialize)]
        enum Future {
            Error { kind: String, message: String },
        }
        let frame = encode(
            &Future::Error {
                kind: "quota-exceeded".into(),
                message: "m".into(),
            },
            1024,
        )
        .unwrap();
        let (resp, _) = decode::<Response>(&frame, 1024).unwrap().unwrap();
        assert_eq!(
            resp,
            Response::Error {
                kind: ErrorKind::Other,
                message: "m".into()
            }
        );
    }

    #[test]
    fn byte_fields_are_cbor_byte_strings() {
        // serde_bytes keeps chunk data a byte string: 1 byte of overhead per chunk, not per byte.
        let frame = encode(
            &Response::Chunk {
                id: Digest::of(b""),
                data: vec![0xff; 1000],
            },
            4096,
        )
        .unwrap();
        assert!(frame.len() < 1000 + 120, "{} bytes", frame.len());
    }
}
