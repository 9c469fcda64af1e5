//! What the edge agent and the cloud coordinator both run, with I/O (so not in `shared`):
//!
//! - [`store`]: content-addressed chunk files, each written once through a synced temporary file.
//! - [`serve`]: the HTTP serving loop and signal wait both daemons use.
//! - [`http`]: the HTTP/1.1 client of the tools and tests (bounded answers, timeouts, typed errors).
//! - [`tract`]: tract-onnx as an engine: load and check a model, read its signature, run it on
//!   protocol tensors with inputs checked against the signature.
//! - [`onnxruntime`]: ONNX Runtime as an optional CPU engine, loaded at run time from a library
//!   the operator names (faster than tract on transformer encoders).
//! - [`engine`]: the [`Engine`] trait every engine implements, its typed [`RunError`] and the
//!   input checks all engines share.
//! - [`plans`]: the per-shape plan cache both engines keep.
//! - [`backoff`]: the one jittered exponential back-off between retries.
//! - [`admission`]: how many calls of a model run and wait at once; past that, busy.
//! - [`memory`]: a call's working memory as a cost per row, the cut into row parts that fit,
//!   and the budget calls share; [`graph_memory`] reads that cost (and id ranges) off a graph.
//! - [`quantize`]: weight-only int8 quantisation as an ONNX rewrite (`DequantizeLinear`).
//! - [`dequantize`]: that rewrite undone on constants before tract loads a model (fp32 speed).
//! - [`accuracy`]: the gate that measures a quantised model against the original.
//! - [`finetune`]: transfer learning of a model's head (find, cut, train, write back).

pub mod accuracy;
pub mod admission;
pub mod backoff;
pub mod dequantize;
pub mod engine;
pub mod finetune;
pub mod graph_memory;
pub mod http;
pub mod memory;
pub mod onnxruntime;
pub mod plans;
pub mod quantize;
pub mod serve;
pub mod signature;
pub mod store;
pub mod text;
pub mod tls;
pub mod tract;

pub use backoff::Backoff;
pub use engine::{Engine, RunError};
pub use plans::ShapePlans;
pub use store::{AssembleError, ChunkStore};
