//! The Outpost protocol: everything the edge agent and the cloud coordinator say to each other,
//! as pure functions over bytes.
//!
//! This crate does no I/O, spawns no tasks and knows nothing of sled, tract or wgpu (see
//! DESIGN.md). The agent and the coordinator move bytes and call into it:
//!
//! - [`tensor`]: typed tensors as a datatype, a shape and little-endian bytes.
//! - [`release`]: model releases (manifests): versions, tensor specs, placement, variants and
//!   the rules a release must keep.
//! - [`signing`]: ed25519 keys, signed manifests, and the signer and verifier.
//! - [`rollout`]: which version each device runs, and which release may replace which.
//! - [`status`]: what an agent reports about itself on its status topic.
//! - [`frame`]: the QUIC request/response frames (length-prefixed CBOR).
//! - [`oip`]: Open Inference Protocol v2: tensors' JSON form, and inference bodies with JSON and
//!   binary tensor data.
//! - [`topic`]: MQTT topic names and the names they carry.
//! - [`chunk`]: content-defined chunking and content digests.
//! - [`cbor`]: bounded CBOR encoding and decoding shared by all of the above.
//! - [`hex`]: lowercase hex text for digests and keys.

pub mod cbor;
pub mod chunk;
pub mod frame;
pub mod hex;
pub mod oip;
pub mod release;
pub mod rollout;
pub mod signing;
pub mod status;
pub mod tensor;
pub mod topic;

pub use chunk::{ChunkId, ChunkSpan, Digest};
pub use frame::{ErrorKind, FrameError, Request, Response};
pub use oip::JsonTensor;
pub use release::{
    Blob, Candidate, Dim, Manifest, ManifestError, ModelFormat, ModelVersion, Placement, Target,
    TensorSpec, TextInput, Variant,
};
pub use signing::{
    DetachedSignature, KeyId, ManifestSigner, ManifestVerifier, PublicKey, SignedManifest,
};
pub use status::{
    Counters, DeviceStatus, Health, ModelHealth, ModelStatus, SignedStatus, StatusOrder,
};
pub use tensor::{DataType, Tensor, TensorError};
pub use topic::{Topic, TopicError};
