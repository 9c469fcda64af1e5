//! The Outpost protocol: everything the edge agent and the cloud coordinator say to each other,
//! as pure functions over bytes.
//!
//! This crate does no I/O, spawns no tasks and knows nothing of sled, tract or wgpu (see
//! DESIGN.md). The agent and the coordinator move bytes and call into it:
//!
//! - [`tensor`]: typed tensors and their Open Inference Protocol v2 JSON form.
//! - [`manifest`]: model releases, their ed25519 signatures and the rules for accepting one.
//! - [`status`]: what an agent reports about itself on its status topic.
//! - [`frame`]: the QUIC request/response frames (length-prefixed CBOR).
//! - [`oip`]: Open Inference Protocol v2 inference bodies, JSON and binary tensor data.
//! - [`topic`]: MQTT topic names and the names they carry.
//! - [`chunk`]: content-defined chunking and content digests.
//! - [`cbor`]: bounded CBOR encoding and decoding shared by all of the above.

pub mod cbor;
pub mod chunk;
pub mod frame;
pub mod hex;
pub mod manifest;
pub mod oip;
pub mod status;
pub mod tensor;
pub mod topic;

pub use chunk::{ChunkId, ChunkSpan, Digest};
pub use frame::{ErrorKind, FrameError, Request, Response};
pub use manifest::{
    Candidate, Dim, KeyId, Manifest, ManifestError, ManifestSigner, ManifestVerifier, ModelFormat,
    ModelVersion, Placement, PublicKey, SignedManifest, Target, TensorSpec, Variant,
};
pub use status::{Counters, DeviceStatus, Health, ModelStatus};
pub use tensor::{DataType, JsonTensor, Tensor, TensorError};
pub use topic::{Topic, TopicError};
