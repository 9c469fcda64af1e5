//! One GPU for the process: the adapter, its device and queue, and the compiled kernels, shared
//! by every model loaded on it; and whether the device was lost since.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outpost_runtime::engine::RunError;

use crate::kernels::Kernel;

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
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            allow_software: false,
            dot4: true,
            weight_block_bytes: None,
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
}

/// A device with the kernels compiled.
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) summary: AdapterSummary,
    pub(crate) limits: wgpu::Limits,
    pub(crate) weight_block_bytes: u64,
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
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("outpost"),
            required_features: wgpu::Features::empty(),
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
        let mut pipelines = HashMap::new();
        let mut dot4 = false;
        for kernel in Kernel::ALL {
            if kernel.needs_dot4() && !(options.dot4 && dot4_language) {
                continue;
            }
            match compile(&device, kernel) {
                Ok(p) => {
                    dot4 |= kernel.needs_dot4();
                    pipelines.insert(kernel, p);
                }
                // The packed product is an optional extension: without it, unpack.
                Err(e) if kernel.needs_dot4() || kernel == Kernel::QuantizeRows => {
                    tracing::info!(error = %e, "dot4I8Packed unavailable; int8 products unpack");
                }
                Err(e) => return Err(format!("{}: kernel {}: {e}", info.name, kernel.name())),
            }
        }
        dot4 &= pipelines.contains_key(&Kernel::QuantizeRows);
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
        };
        tracing::info!(adapter = %summary.name, backend = %summary.backend, dot4, "GPU ready");
        Ok(Arc::new(GpuContext {
            device,
            queue,
            summary,
            limits,
            weight_block_bytes,
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
fn compile(device: &wgpu::Device, kernel: Kernel) -> Result<wgpu::ComputePipeline, wgpu::Error> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let source = kernel.source();
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
