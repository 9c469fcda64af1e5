//! Which engine runs a local model, and the load of a version: the GPU the agent may use (from
//! the config's `engine` and the profile's `gpu`), the GPU engine when its kernels cover the
//! model and it passes a warm-up; on the CPU, ONNX Runtime when the config names its library and
//! it loads and warms the model up, tract otherwise; a cloud-only version loads no engine.

use std::sync::Arc;

use firmware_config::{EngineChoice, GpuActivations, GpuPreference};
use outpost_gpu::{GpuContext, GpuModel, GpuOptions};
use outpost_runtime::admission::AdmissionLimits;
use outpost_runtime::onnxruntime::{OnnxRuntime, OnnxRuntimeModel, OnnxRuntimeOptions};
use outpost_runtime::text::{TextError, TextTokenizer};
use outpost_runtime::tract::{self, TractModel, TractOptions};
use outpost_runtime::{AssembleError, ChunkStore, Engine, RunError};
use outpost_shared::release::ChunkRef;
use outpost_shared::{ModelVersion, Placement, Target, Variant};

use crate::serving::Serving;

/// What a model's graph says of a call's working memory, or why it cannot say.
type CallGraph = Result<Arc<outpost_runtime::graph_memory::GraphMemory>, String>;

/// A model loaded on the CPU, and what was read off it on the way.
struct CpuEngine {
    engine: Arc<dyn Engine>,
    /// Why it is on tract though the config names ONNX Runtime.
    fallback: Option<String>,
    graph: CallGraph,
    labels: Vec<String>,
}

/// Why a version cannot serve on this device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Its bytes are not all here, or they are not the model the release names.
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// tract cannot load the model.
    #[error(transparent)]
    Tract(#[from] tract::LoadError),
    /// The version's tokenizer cannot be read.
    #[error(transparent)]
    Text(#[from] TextError),
    /// The model loads but cannot run zeros of its own signature.
    #[error(transparent)]
    WarmUp(#[from] RunError),
}

/// The GPU this agent may use, or why it uses none.
#[derive(Debug, Clone)]
pub(crate) enum LocalGpu {
    /// Models go to the GPU when its kernels cover them.
    Ready(Arc<GpuContext>),
    /// Every local model runs on tract, for this reason.
    Absent(String),
}

/// How this device runs local models.
#[derive(Debug)]
pub(crate) struct Engines {
    /// The GPU, if local models may use one.
    pub(crate) gpu: LocalGpu,
    /// How local models run on tract (threads from the device profile).
    pub(crate) tract: TractOptions,
    /// ONNX Runtime for the models the CPU runs, when the config names its library: loaded, or
    /// why it could not be (then tract runs them, and their status says why).
    pub(crate) onnxruntime: Option<Result<Arc<OnnxRuntime>, String>>,
    /// How many calls of one model run and wait at once (from the device profile).
    pub(crate) admission: AdmissionLimits,
}

/// The variant a device runs locally, if any: int8 first, then fp32; none for a cloud-only
/// version.
pub(crate) fn local_variant(version: &ModelVersion) -> Option<&Variant> {
    if version.placement == Placement::Cloud {
        return None;
    }
    version
        .variant(Target::EdgeInt8)
        .or_else(|| version.variant(Target::EdgeFp32))
}

/// The chunks a device stores for `version`: its local variant's (none for a cloud-only
/// version) and its tokenizer's (a text model's device tokenizes wherever the model runs).
pub(crate) fn stored_chunks(version: &ModelVersion) -> impl Iterator<Item = &ChunkRef> {
    local_variant(version)
        .into_iter()
        .flat_map(|v| v.chunks.iter())
        .chain(version.extra_chunks())
}

/// The profile's inference threads, at most the CPUs present.
pub(crate) fn engine_threads(wanted: u32) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    usize::try_from(wanted).unwrap_or(1).clamp(1, cpus)
}

/// The GPU local models may use, from the config's `engine` and `gpu_activations` and the
/// profile's `gpu`; `Err` (the reason) only when the config demands a GPU and none can be used.
/// Blocking.
pub(crate) fn choose_gpu(
    choice: EngineChoice,
    activations: GpuActivations,
    preference: GpuPreference,
) -> Result<LocalGpu, String> {
    let options = GpuOptions {
        f16: activations == GpuActivations::F16,
        ..GpuOptions::default()
    };
    match (choice, preference) {
        (EngineChoice::Cpu, _) => Ok(LocalGpu::Absent(
            "the agent config sets engine = \"cpu\"".into(),
        )),
        (EngineChoice::Auto, GpuPreference::Never) => Ok(LocalGpu::Absent(
            "the device profile sets gpu = \"never\"".into(),
        )),
        (EngineChoice::Auto, GpuPreference::Prefer) => {
            // Asked of a child first (when this binary answers probes): with no usable adapter
            // this process never loads a driver.
            if let Some(Err(why)) = outpost_gpu::probe_in_child(options) {
                tracing::info!(reason = %why, "no GPU for local models; they run on tract");
                return Ok(LocalGpu::Absent(why));
            }
            Ok(match GpuContext::new(options) {
                Ok(gpu) => LocalGpu::Ready(gpu),
                Err(e) => {
                    tracing::info!(reason = %e, "no GPU for local models; they run on tract");
                    LocalGpu::Absent(e)
                }
            })
        }
        (EngineChoice::Gpu, _) => GpuContext::new(GpuOptions {
            allow_software: true,
            ..options
        })
        .map(LocalGpu::Ready),
    }
}

/// ONNX Runtime from the config's `onnxruntime_library`, if it names one: loaded, or why not
/// (logged; the agent serves on tract rather than not at all). Blocking.
pub(crate) fn load_onnxruntime(
    library: Option<&std::path::Path>,
) -> Option<Result<Arc<OnnxRuntime>, String>> {
    let library = library?;
    Some(match OnnxRuntime::load(library) {
        Ok(runtime) => {
            tracing::info!(library = %library.display(), "CPU models run on ONNX Runtime");
            Ok(runtime)
        }
        Err(e) => {
            tracing::warn!(error = %e, "ONNX Runtime cannot be used; CPU models run on tract");
            Err(e.to_string())
        }
    })
}

impl Engines {
    /// Loads a version for serving from the stored chunks: its local engine (warmed up), or
    /// none for a cloud-only version, and its tokenizer when it takes text. Blocking.
    pub(crate) fn load(
        &self,
        version: &ModelVersion,
        chunks: &ChunkStore,
    ) -> Result<Serving, LoadError> {
        let text = match &version.text {
            Some(spec) => {
                let json = chunks.assemble_blob(&spec.tokenizer)?;
                Some(Arc::new(TextTokenizer::load(&json, spec)?))
            }
            None => None,
        };
        let mut serving = self.load_engine(version, chunks)?;
        serving.text = text;
        Ok(serving)
    }

    fn load_engine(
        &self,
        version: &ModelVersion,
        chunks: &ChunkStore,
    ) -> Result<Serving, LoadError> {
        let Some(variant) = local_variant(version) else {
            return Ok(Serving::cloud_only(version));
        };
        let bytes = chunks.assemble(variant)?;
        let fallback = match &self.gpu {
            LocalGpu::Ready(gpu) => match GpuModel::load(&bytes, Arc::clone(gpu)) {
                // The warm-up also proves the GPU runs it before it serves.
                Ok(model) => match model.warm_up() {
                    Ok(()) => {
                        let a = model.adapter();
                        let half = if a.f16 { ", f16 activations" } else { "" };
                        let adapter = format!("{} ({}{half})", a.name, a.backend);
                        let mut serving =
                            Serving::local(version, Some(Arc::new(model)), self.admission);
                        serving.adapter = Some(adapter);
                        let facts = tract::model_facts(&bytes);
                        serving.graph = Some(facts.memory.map(Arc::new));
                        serving.labels = facts.labels;
                        return Ok(serving);
                    }
                    Err(e) => format!("the GPU failed the warm-up: {e}"),
                },
                Err(e) => e.to_string(),
            },
            LocalGpu::Absent(why) => why.clone(),
        };
        if matches!(self.gpu, LocalGpu::Ready(_)) {
            tracing::info!(version = version.version, reason = %fallback, "running on the CPU, not the GPU");
        }
        let cpu = self.load_cpu(version, &bytes)?;
        let mut serving = Serving::local(version, Some(cpu.engine), self.admission);
        serving.graph = Some(cpu.graph);
        serving.labels = cpu.labels;
        serving.gpu_fallback = Some(fallback);
        serving.cpu_fallback = cpu.fallback;
        Ok(serving)
    }

    /// The CPU engine for `bytes`, warmed up: ONNX Runtime when it is loaded and runs the
    /// model, tract otherwise (with the reason, when ONNX Runtime was asked for); and what the
    /// graph says of a call's working memory, and the model's class names.
    fn load_cpu(&self, version: &ModelVersion, bytes: &[u8]) -> Result<CpuEngine, LoadError> {
        let refused = match &self.onnxruntime {
            None => None,
            Some(Err(why)) => Some(why.clone()),
            Some(Ok(runtime)) => {
                let options = OnnxRuntimeOptions {
                    threads: self.tract.threads,
                };
                let loaded = OnnxRuntimeModel::load(runtime, bytes, options)
                    .map_err(|e| e.to_string())
                    .and_then(|model| match model.warm_up() {
                        Ok(()) => Ok(model),
                        Err(e) => Err(format!("ONNX Runtime failed the warm-up: {e}")),
                    });
                match loaded {
                    Ok(model) => {
                        let facts = tract::model_facts(bytes);
                        return Ok(CpuEngine {
                            engine: Arc::new(model),
                            fallback: None,
                            graph: facts.memory.map(Arc::new),
                            labels: facts.labels,
                        });
                    }
                    Err(why) => {
                        tracing::warn!(version = version.version, reason = %why, "running on tract, not ONNX Runtime");
                        Some(why)
                    }
                }
            }
        };
        let model = TractModel::load_with(bytes, self.tract)?;
        let graph = model.memory.clone().map_err(|e| e.to_string());
        let labels = model.labels.clone();
        let model: Arc<dyn Engine> = Arc::new(model);
        // A model that cannot run zeros is not worth serving.
        model.warm_up()?;
        Ok(CpuEngine {
            engine: model,
            fallback: refused,
            graph,
            labels,
        })
    }
}
