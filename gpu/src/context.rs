//! One GPU for the process: the adapter, its device and queue, and the compiled kernels, shared
//! by every model loaded on it; and whether the device was lost since.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outpost_runtime::engine::RunError;

use crate::kernels::{Kernel, Precision};

/// Which adapters may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuOptions {
    /// Accept a CPU-emulated adapter (lavapipe, llvmpipe, WARP): correct, but slower than tract.
    /// `engine = "gpu"` and the tests set it; `engine = "auto"` does not.
    pub allow_software: bool,
    /// Use `dot4I8Packed` (int8 activations × int8 weights) when the adapter has it; otherwise
    /// int8 weights are unpacked and multiplied in f32.
    pub dot4: bool,
    /// Split weight tensors into blocks of at most this many bytes (the adapter's storage
    /// binding limit when `None`). Tests set it small to exercise the split.
    pub weight_block_bytes: Option<u64>,
    /// Hold activations as f16 where the adapter has `shader-f16` (half the memory traffic of
    /// every value; each stored value rounded to 11 significant bits, kernels still compute in
    /// f32); f32 where it has not. Off by default: agent config `gpu_activations = "f16"`.
    pub f16: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            allow_software: false,
            dot4: true,
            weight_block_bytes: None,
            f16: false,
        }
    }
}

/// The adapter, as status pages show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    /// The adapter's name ("NVIDIA H200", "llvmpipe (LLVM 15.0.6, 256 bits)").
    pub name: String,
    /// Vulkan, Metal, Dx12 or Gl.
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu or Other.
    pub device_type: String,
    /// Whether the adapter runs on the CPU.
    pub software: bool,
    /// Whether int8 products use `dot4I8Packed`.
    pub dot4: bool,
    /// Whether activations are held as f16.
    pub f16: bool,
}

/// A device with the kernels compiled.
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) summary: AdapterSummary,
    pub(crate) limits: wgpu::Limits,
    pub(crate) weight_block_bytes: u64,
    /// How activations are held (every kernel was compiled for it).
    pub(crate) precision: Precision,
    pipelines: HashMap<Kernel, wgpu::ComputePipeline>,
    /// Why the device was lost, once it is: every later call fails with it.
    lost: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.summary)
            .finish_non_exhaustive()
    }
}

/// Storage buffers one kernel binds at most (the int8 × int8 product).
const STORAGE_BINDINGS: u32 = 7;

fn rank(info: &wgpu::AdapterInfo) -> u8 {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    // Native compute APIs before GL.
    kind * 2 + u8::from(info.backend == wgpu::Backend::Gl)
}

impl GpuContext {
    /// Opens the best adapter present (discrete, integrated, virtual; native APIs before GL),
    /// or says why none will do. `WGPU_BACKEND` narrows the backends.
    pub fn new(options: GpuOptions) -> Result<Arc<Self>, String> {
        // Native APIs first; GL (whose EGL probe is slow and noisy without a display) only if
        // they offer nothing usable. WGPU_BACKEND, when set, decides alone.
        let from_env = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        let tiers = if std::env::var_os("WGPU_BACKEND").is_some() {
            vec![from_env.backends]
        } else {
            vec![wgpu::Backends::PRIMARY, wgpu::Backends::SECONDARY]
        };
        let mut seen = Vec::new();
        let mut chosen = None;
        for backends in tiers {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
            desc.backends = backends;
            let instance = wgpu::Instance::new(desc);
            let mut usable = Vec::new();
            for adapter in pollster::block_on(instance.enumerate_adapters(backends)) {
                match unusable(&adapter, options) {
                    Some(why) => seen.push(why),
                    None => {
                        let info = adapter.get_info();
                        seen.push(format!(
                            "{} ({:?}, {:?})",
                            info.name, info.backend, info.device_type
                        ));
                        usable.push(adapter);
                    }
                }
            }
            usable.sort_by_key(|a| rank(&a.get_info()));
            if let Some(adapter) = usable.into_iter().next() {
                chosen = Some((instance, adapter));
                break;
            }
        }
        let Some((instance, adapter)) = chosen else {
            return Err(if seen.is_empty() {
                "no GPU adapter found (no Vulkan, Metal, DX12 or GL driver)".to_owned()
            } else {
                format!("no usable GPU adapter; found {}", seen.join("; "))
            });
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let f16 = options.f16 && adapter.features().contains(wgpu::Features::SHADER_F16);
        if options.f16 && !f16 {
            tracing::info!(adapter = %info.name, "no shader-f16 on this adapter; activations stay f32");
        }
        let required_features = if f16 {
            wgpu::Features::SHADER_F16
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("outpost"),
            required_features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| format!("{}: cannot open the device: {e}", info.name))?;

        // Calls catch their own errors in scopes; anything else is logged, never a panic (wgpu's
        // default handler panics).
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::warn!(error = %e, "GPU error outside a call");
        }));
        let lost = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            tracing::warn!(?reason, message, "GPU device lost");
            if let Ok(mut lost) = sink.lock() {
                *lost = Some(format!("the GPU device was lost ({reason:?}): {message}"));
            }
        });

        let dot4_language = instance
            .wgsl_language_features()
            .contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct);
        let use_dot4 = options.dot4 && dot4_language;
        let (precision, pipelines) = if f16 {
            match compile_all(&device, Precision::F16, use_dot4) {
                Ok(p) => (Precision::F16, p),
                // A driver that claims the feature yet fails a kernel: f32 still serves.
                Err((kernel, e)) => {
                    tracing::warn!(kernel = kernel.name(), error = %e, "f16 kernels failed to compile; activations stay f32");
                    (
                        Precision::F32,
                        compile_all(&device, Precision::F32, use_dot4)
                            .map_err(|(k, e)| format!("{}: kernel {}: {e}", info.name, k.name()))?,
                    )
                }
            }
        } else {
            (
                Precision::F32,
                compile_all(&device, Precision::F32, use_dot4)
                    .map_err(|(k, e)| format!("{}: kernel {}: {e}", info.name, k.name()))?,
            )
        };
        let dot4 = pipelines.contains_key(&Kernel::MatMulDot4)
            && pipelines.contains_key(&Kernel::QuantizeRows);
        let binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let weight_block_bytes = options
            .weight_block_bytes
            .map_or(binding, |b| b.min(binding))
            .max(16)
            / 4
            * 4;
        let summary = AdapterSummary {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            software: info.device_type == wgpu::DeviceType::Cpu,
            dot4,
            f16: precision == Precision::F16,
        };
        tracing::info!(adapter = %summary.name, backend = %summary.backend, dot4, f16 = summary.f16, "GPU ready");
        Ok(Arc::new(GpuContext {
            device,
            queue,
            summary,
            limits,
            weight_block_bytes,
            precision,
            pipelines,
            lost,
        }))
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.summary
    }

    /// The compiled kernel. One the adapter did not compile will not appear on a retry: the model
    /// cannot run here ([`RunError::Model`]; the agent loads it on tract at warm-up).
    pub(crate) fn pipeline(&self, kernel: Kernel) -> Result<&wgpu::ComputePipeline, RunError> {
        self.pipelines.get(&kernel).ok_or_else(|| {
            RunError::Model(format!(
                "kernel {} is not available on this adapter",
                kernel.name()
            ))
        })
    }

    /// The largest buffer a kernel may bind.
    pub(crate) fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Why the device was lost, if it was.
    pub(crate) fn lost(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|l| l.clone())
    }
}

/// Why `adapter` will not do, if it will not.
fn unusable(adapter: &wgpu::Adapter, options: GpuOptions) -> Option<String> {
    let info = adapter.get_info();
    let label = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
    let limits = adapter.limits();
    if !adapter
        .get_downlevel_capabilities()
        .flags
        .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
    {
        Some(format!("{label}: no compute shaders"))
    } else if limits.max_storage_buffers_per_shader_stage < STORAGE_BINDINGS {
        Some(format!(
            "{label}: binds {} storage buffers, the kernels need {STORAGE_BINDINGS}",
            limits.max_storage_buffers_per_shader_stage
        ))
    } else if info.device_type == wgpu::DeviceType::Cpu && !options.allow_software {
        Some(format!("{label}: emulated on the CPU (tract is faster)"))
    } else {
        None
    }
}

/// Compiles one kernel, or returns the validation error the device gave.
/// Every kernel for `precision`: the packed int8 product only with `dot4`, and dropped (int8
/// products unpack) when it fails to compile; any other kernel's failure is the error.
fn compile_all(
    device: &wgpu::Device,
    precision: Precision,
    dot4: bool,
) -> Result<HashMap<Kernel, wgpu::ComputePipeline>, (Kernel, wgpu::Error)> {
    let mut pipelines = HashMap::new();
    for kernel in Kernel::ALL {
        if kernel.needs_dot4() && !dot4 {
            continue;
        }
        match compile(device, kernel, precision) {
            Ok(p) => {
                pipelines.insert(kernel, p);
            }
            // The packed product is an optional extension: without it, unpack.
            Err(e) if kernel.needs_dot4() || kernel == Kernel::QuantizeRows => {
                tracing::info!(error = %e, "dot4I8Packed unavailable; int8 products unpack");
            }
            Err(e) => return Err((kernel, e)),
        }
    }
    Ok(pipelines)
}

fn compile(
    device: &wgpu::Device,
    kernel: Kernel,
    precision: Precision,
) -> Result<wgpu::ComputePipeline, wgpu::Error> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let source = kernel.source(precision);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(kernel.name()),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(kernel.name()),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions::default(),
        cache: None,
    });
    match pollster::block_on(scope.pop()) {
        Some(e) => Err(e),
        None => Ok(pipeline),
    }
}
