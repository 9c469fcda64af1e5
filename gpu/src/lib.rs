//! The GPU engine: int8 ONNX models on wgpu compute shaders (Vulkan, Metal, DX12, GL).
//!
//! - [`GpuContext`]: one adapter and device per process, with the WGSL kernels compiled once.
//! - [`GpuModel`]: a model imported from ONNX onto those kernels, its weights uploaded once
//!   (int8 taken from the edge variant's `DequantizeLinear` pattern, or quantised per output
//!   channel at load), run through [`outpost_runtime::Engine`] like tract.
//!
//! The crate reads as its pipeline, a module per stage. At load: `import` (ONNX → `graph`, the
//! IR) → `fuse` → `upload`. Per input shape, once: `shape` (every value's shape, and the shape
//! arithmetic exporters write folded on the host by `host`) → `memory` (values to buffers by
//! liveness) → `lower` (steps to dispatches) → bind groups (`model`).
//! Per call: write the inputs, submit, read back (`model`). The graph, fusion, shape, memory
//! and lowering stages are pure and unit-tested without an adapter; the WGSL kernels are in
//! `kernels/*.wgsl`, assembled by `kernels`.
//!
//! - [`probe_in_child`]: whether a usable adapter is present, asked of a child process so a
//!   process that uses none never maps the drivers probing loads ([`answer_probe_if_asked`]
//!   opts a binary in).
//!
//! A model with an op the kernels do not cover fails to load with
//! [`ImportError::Unsupported`], naming the op: the agent runs it on tract and says why.

mod context;
mod fuse;
mod graph;
mod host;
mod import;
mod kernels;
mod lower;
mod memory;
mod model;
mod probe;
mod shape;
mod upload;

pub use context::{AdapterSummary, GpuContext, GpuOptions};
pub use import::ImportError;
pub use kernels::ERF_MAX_ERROR;
pub use model::GpuModel;
pub use probe::{answer_probe_if_asked, probe_in_child};
