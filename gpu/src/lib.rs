//! The GPU engine: int8 ONNX models on wgpu compute shaders (Vulkan, Metal, DX12, GL).
//!
//! - [`GpuContext`]: one adapter and device per process, with the WGSL kernels compiled once.
//! - [`GpuModel`]: a model imported from ONNX ([`import`]) onto those kernels, its weights
//!   uploaded once (int8 taken from the edge variant's `DequantizeLinear` pattern, or quantised
//!   per output channel at load), run through [`outpost_runtime::Engine`] like tract.
//!
//! A model with an op the kernels do not cover fails to load with
//! [`ImportError::Unsupported`], naming the op: the agent runs it on tract and says why.

mod context;
mod import;
mod kernels;
mod model;

pub use context::{AdapterSummary, GpuContext, GpuOptions};
pub use import::ImportError;
pub use kernels::ERF_MAX_ERROR;
pub use model::GpuModel;
