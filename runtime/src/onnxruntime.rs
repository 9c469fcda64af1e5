//! ONNX Runtime as an [`Engine`] for the CPU, loaded at run time from a library the operator
//! names (`libonnxruntime.so`, 1.17 or newer: the one a `pip install onnxruntime` wheel ships in
//! `onnxruntime/capi/` serves). Nothing is linked or downloaded at build time; a device without the
//! library runs its CPU models on tract.
//!
//! Why a second CPU engine: on transformer encoders tract is 1.4–2.8× ONNX Runtime at the same
//! thread count (README, "Benchmarks"): ONNX Runtime fuses attention, LayerNorm and GELU and its
//! matrix kernels are faster on these shapes. The int8 variant's constant `DequantizeLinear` nodes
//! are folded first, as for tract ([`crate::dequantize`]): ONNX Runtime's own constant folding
//! leaves `DequantizeLinear` alone by default (it keeps QDQ pairs for its quantised kernels), and
//! the weights here are meant to be f32 in memory, int8 only on the wire and on disk.
//!
//! One library per process: ONNX Runtime's API is process-global, so the first
//! [`OnnxRuntime::load`] decides it and a later one naming another file is refused.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::logging::LogLevel;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use outpost_shared::{DataType, Dim, Tensor, TensorSpec};
use prost::Message as _;

use crate::engine::{Engine, RunError, check_inputs};

/// Why ONNX Runtime cannot load a library or a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The library cannot be loaded (missing, not ONNX Runtime, older than 1.17), or another
    /// one is loaded in this process already.
    #[error("ONNX Runtime library {}: {why}", path.display())]
    Library {
        /// The file named.
        path: PathBuf,
        /// Why it cannot serve.
        why: String,
    },
    /// No bytes at all.
    #[error("the file is empty")]
    Empty,
    /// ONNX Runtime refuses the model (unreadable, an op or type it lacks), or its signature has
    /// a type Outpost does not carry.
    #[error("ONNX Runtime cannot run the model: {0}")]
    Unsupported(String),
}

/// A loaded ONNX Runtime library: what sessions are created in.
#[derive(Debug)]
pub struct OnnxRuntime {
    path: PathBuf,
    environment: ort::environment::Environment,
}

/// The library this process loaded (a failed load is not kept: the file may be put right).
static LOADED: Mutex<Option<Arc<OnnxRuntime>>> = Mutex::new(None);

impl OnnxRuntime {
    /// Loads ONNX Runtime from `path`, once per process: the same path again returns the same
    /// runtime; another path, once one is loaded, is refused.
    pub fn load(path: &Path) -> Result<Arc<Self>, LoadError> {
        let mut loaded = LOADED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let refuse = |why: String| LoadError::Library {
            path: path.to_path_buf(),
            why,
        };
        if let Some(runtime) = loaded.as_ref()
            && runtime.path == path
        {
            return Ok(Arc::clone(runtime));
        }
        if !path.is_file() {
            return Err(refuse("no such file".into()));
        }
        if let Some(runtime) = loaded.as_ref() {
            return Err(LoadError::Library {
                path: path.to_path_buf(),
                why: format!(
                    "this process has ONNX Runtime from {} already (one library per process)",
                    runtime.path.display()
                ),
            });
        }
        let runtime = Self::open(path).map_err(refuse)?;
        *loaded = Some(Arc::clone(&runtime));
        Ok(runtime)
    }

    fn open(path: &Path) -> Result<Arc<Self>, String> {
        let environment = ort::init_from(path)
            .map_err(|e| e.to_string())?
            .with_name("outpost")
            .with_telemetry(false)
            .with_logger(Arc::new(log))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            environment,
        }))
    }

    /// The library's file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// ONNX Runtime's log, into ours (it would write to stderr otherwise). A failed call's error
/// comes back to the caller as well, so ONNX Runtime's errors are debug lines, not warnings an
/// attacker could fill the log with.
fn log(level: LogLevel, category: &str, _id: &str, location: &str, message: &str) {
    match level {
        LogLevel::Fatal => tracing::error!(category, location, "ONNX Runtime: {message}"),
        LogLevel::Error | LogLevel::Warning => {
            tracing::debug!(category, location, "ONNX Runtime: {message}");
        }
        LogLevel::Info | LogLevel::Verbose => {
            tracing::trace!(category, location, "ONNX Runtime: {message}");
        }
    }
}

/// The ONNX Runtime library of a Python `onnxruntime` package (the directory `import
/// onnxruntime` loads from): `capi/libonnxruntime.so.*` (`.dylib`, `onnxruntime.dll`).
pub fn library_in_package(package: &Path) -> Option<PathBuf> {
    let capi = package.join("capi");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&capi)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libonnxruntime.") && (n.contains(".so") || n.ends_with(".dylib"))
                    || n == "onnxruntime.dll"
            })
        })
        .collect();
    // The versioned file (`libonnxruntime.so.1.32.0`) over a bare link, when both exist.
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.into_iter().next()
}

/// The ONNX Runtime library of the `onnxruntime` package installed in the Python virtual
/// environment `venv` (`lib/python3.*/site-packages/onnxruntime`).
pub fn library_in_venv(venv: &Path) -> Option<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .find_map(|e| library_in_package(&e.path().join("site-packages/onnxruntime")))
}

/// How an [`OnnxRuntimeModel`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnnxRuntimeOptions {
    /// Threads for one call's operators (1: the calling thread only). Idle pool threads sleep
    /// rather than spin: an edge device's cores are not ours to burn between calls.
    pub threads: usize,
}

impl Default for OnnxRuntimeOptions {
    fn default() -> Self {
        Self { threads: 1 }
    }
}

/// A model loaded in ONNX Runtime, with its signature.
///
/// ONNX Runtime's `Run` is not safe to call from two threads on one session (the `ort` crate
/// takes `&mut`), so calls of one model take turns; the agent's admission bounds how many wait.
#[derive(Debug)]
pub struct OnnxRuntimeModel {
    /// The inputs, in the model's order.
    pub inputs: Vec<TensorSpec>,
    /// The outputs, in the model's order.
    pub outputs: Vec<TensorSpec>,
    session: Mutex<Session>,
    _runtime: Arc<OnnxRuntime>,
}

impl OnnxRuntimeModel {
    /// Loads an ONNX model, its constant `DequantizeLinear` nodes folded, with every graph
    /// optimisation ONNX Runtime has.
    pub fn load(
        runtime: &Arc<OnnxRuntime>,
        bytes: &[u8],
        options: OnnxRuntimeOptions,
    ) -> Result<Self, LoadError> {
        if bytes.is_empty() {
            return Err(LoadError::Empty);
        }
        let folded = fold_dequantize(bytes);
        let bytes = folded.as_deref().unwrap_or(bytes);
        let unsupported = |e: ort::Error| LoadError::Unsupported(e.to_string());
        let session = Session::builder(&runtime.environment)
            .map_err(unsupported)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| unsupported(e.into()))?
            .with_intra_threads(options.threads.max(1))
            .map_err(|e| unsupported(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| unsupported(e.into()))?
            .with_intra_op_spinning(false)
            .map_err(|e| unsupported(e.into()))?
            .commit_from_memory(bytes)
            .map_err(unsupported)?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            inputs,
            outputs,
            session: Mutex::new(session),
            _runtime: Arc::clone(runtime),
        })
    }

    /// Checks `inputs` against the signature and runs the model.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let ordered = check_inputs(&self.inputs, inputs)?;
        let values = ordered
            .iter()
            .map(|t| to_ort(t).map(|v| (t.name().to_owned(), v)))
            .collect::<Result<Vec<_>, _>>()?;
        // A poisoned lock: a call panicked inside ONNX Runtime's binding; the session's state is
        // its own (the binding keeps none between calls), so later calls go on.
        let mut session = self
            .session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outputs = session.run(values).map_err(|e| match e.code() {
            // Inputs that fit the signature but not the model's domain (an id past a table).
            ort::ErrorCode::InvalidArgument => RunError::Input(format!("ONNX Runtime: {e}")),
            _ => RunError::Model(format!("ONNX Runtime: {e}")),
        })?;
        self.outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(spec.name.as_str()).ok_or_else(|| {
                    RunError::Model(format!("ONNX Runtime returned no output {:?}", spec.name))
                })?;
                from_ort(&spec.name, value)
            })
            .collect()
    }
}

impl Engine for OnnxRuntimeModel {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        OnnxRuntimeModel::run(self, inputs)
    }
}

/// `bytes` re-encoded with its constant `DequantizeLinear` nodes folded, or `None` when there
/// are none (or the bytes do not parse: ONNX Runtime then says why).
fn fold_dequantize(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut proto = tract_onnx::pb::ModelProto::decode(bytes).ok()?;
    (crate::dequantize::fold_constant_dequantize(&mut proto) > 0).then(|| proto.encode_to_vec())
}

fn spec(name: &str, dtype: &ValueType) -> Result<TensorSpec, LoadError> {
    let ValueType::Tensor { ty, shape, .. } = dtype else {
        return Err(LoadError::Unsupported(format!(
            "{name:?} is a {dtype}, not a tensor"
        )));
    };
    let datatype = from_element(*ty).ok_or_else(|| {
        LoadError::Unsupported(format!(
            "{name:?} has type {ty}, which Outpost does not carry"
        ))
    })?;
    Ok(TensorSpec {
        name: name.to_owned(),
        datatype,
        shape: shape
            .iter()
            .map(|&d| u64::try_from(d).map_or(Dim::Dynamic, Dim::Fixed))
            .collect(),
    })
}

fn from_element(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        _ => return None,
    })
}

/// A protocol tensor as an ONNX Runtime value (one copy).
fn to_ort(t: &Tensor) -> Result<DynValue, RunError> {
    let shape: Vec<i64> = t
        .shape()
        .iter()
        .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
        .collect();
    let name = t.name();
    let bad = |e: &dyn std::fmt::Display| RunError::Input(format!("input {name:?}: {e}"));
    macro_rules! value {
        ($t:ty) => {{
            let values = t.to_values::<$t>().map_err(|e| bad(&e))?;
            OrtTensor::<$t>::from_array((shape, values))
                .map(|v| v.into_dyn())
                .map_err(|e| bad(&e))
        }};
    }
    match t.datatype() {
        DataType::Bool => value!(bool),
        DataType::Uint8 => value!(u8),
        DataType::Int8 => value!(i8),
        DataType::Int32 => value!(i32),
        DataType::Int64 => value!(i64),
        DataType::Fp16 => value!(half::f16),
        DataType::Fp32 => value!(f32),
        DataType::Fp64 => value!(f64),
        DataType::Bytes => Err(RunError::Input(format!(
            "input {name:?}: BYTES inputs are not run by ONNX Runtime here"
        ))),
    }
}

/// An ONNX Runtime output as a protocol tensor named `name`.
fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, RunError> {
    let bad = |e: &dyn std::fmt::Display| RunError::Model(format!("output {name:?}: {e}"));
    macro_rules! tensor {
        ($t:ty) => {{
            let (shape, values) = value.try_extract_tensor::<$t>().map_err(|e| bad(&e))?;
            let shape = shape
                .iter()
                .map(|&d| u64::try_from(d).map_err(|_| bad(&"a negative dimension")))
                .collect::<Result<Vec<u64>, _>>()?;
            Tensor::from_values(name, shape, values).map_err(|e| bad(&e))
        }};
    }
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(bad(&"not a tensor"));
    };
    // The element types carried are [`from_element`]'s: one list, read both ways.
    let Some(datatype) = from_element(*ty) else {
        return Err(bad(&format!("type {ty}, which Outpost does not carry")));
    };
    match datatype {
        DataType::Bool => tensor!(bool),
        DataType::Uint8 => tensor!(u8),
        DataType::Int8 => tensor!(i8),
        DataType::Int32 => tensor!(i32),
        DataType::Int64 => tensor!(i64),
        DataType::Fp16 => tensor!(half::f16),
        DataType::Fp32 => tensor!(f32),
        DataType::Fp64 => tensor!(f64),
        DataType::Bytes => Err(bad(&"BYTES, which ONNX Runtime does not give here")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wheel_library_is_found_in_its_package() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir.path().join("capi");
        std::fs::create_dir(&capi).unwrap();
        assert_eq!(library_in_package(dir.path()), None);
        for f in [
            "libonnxruntime_providers_shared.so",
            "libonnxruntime.so",
            "libonnxruntime.so.1.32.0",
            "__init__.py",
        ] {
            std::fs::write(capi.join(f), b"").unwrap();
        }
        assert_eq!(
            library_in_package(dir.path()),
            Some(capi.join("libonnxruntime.so.1.32.0"))
        );
    }

    #[test]
    fn a_file_that_is_not_onnx_runtime_is_refused_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libonnxruntime.so");
        std::fs::write(&fake, b"not a shared library").unwrap();
        for _ in 0..2 {
            let err = OnnxRuntime::load(&fake).unwrap_err().to_string();
            assert!(
                err.contains("libonnxruntime.so") && err.contains("failed to load"),
                "{err}"
            );
        }
        let err = OnnxRuntime::load(&dir.path().join("missing.so"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such file"), "{err}");
    }
}
