//! What the edge agent and the cloud coordinator both run, with I/O (so not in `shared`):
//!
//! - [`store`]: content-addressed chunk files, each written once through a synced temporary file.
//! - [`tract`]: tract-onnx as an engine: load and check a model, read its signature, run it on
//!   protocol tensors with inputs checked against the signature.

pub mod store;
pub mod tract;

pub use store::ChunkStore;
