//! tract-onnx as an [`Engine`]: loading and checking a model, reading its signature, and running
//! it on protocol tensors, each recurring input shape on a plan optimised for it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use outpost_shared::{DataType, Dim, Tensor, TensorSpec};
use tract_onnx::prelude::{
    self as tp, DatumType, Framework as _, InferenceModelExt as _, IntoRunnable as _,
};
use tract_onnx::tract_core::tract_linalg::multithread::{Executor, multithread_tract_scope};

use crate::engine::{Engine, RunError, check_inputs};
use crate::graph_memory::{GraphMemory, Unmeasurable};
use crate::plans::ShapePlans;

/// A model ready to run.
type Plan = Arc<tp::TypedRunnableModel>;

/// Why tract cannot load a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No bytes at all.
    #[error("the file is empty")]
    Empty,
    /// The bytes are not an ONNX model tract can parse.
    #[error("not an ONNX model tract can read: {0}")]
    Unreadable(String),
    /// tract reads the model but cannot type, simplify or optimise it, or its signature has a
    /// type Outpost does not carry.
    #[error("{0}")]
    Unsupported(String),
}

fn optimise(typed: tp::TypedModel) -> Result<Plan, LoadError> {
    typed
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| LoadError::Unsupported(format!("tract cannot run the model: {}", chain(&e))))
}

/// A model typed (decluttered, symbols kept), its signature and its class names.
struct Typed {
    model: tp::TypedModel,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    labels: Vec<String>,
}

/// The metadata key naming a classifier's classes, comma-separated, in output order.
pub const LABELS_KEY: &str = "outpost.labels";

/// The model typed (decluttered, symbols kept), its signature and class names.
fn typed(bytes: &[u8]) -> Result<Typed, LoadError> {
    if bytes.is_empty() {
        return Err(LoadError::Empty);
    }
    let onnx = tract_onnx::onnx();
    let mut proto = onnx
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| LoadError::Unreadable(chain(&e)))?;
    let labels = proto
        .metadata_props
        .iter()
        .find(|p| p.key == LABELS_KEY)
        .map(|p| p.value.split(',').map(|l| l.trim().to_owned()).collect())
        .unwrap_or_default();
    crate::dequantize::fold_constant_dequantize(&mut proto);
    let model = onnx
        .model_for_proto_model(&proto)
        .map_err(|e| LoadError::Unreadable(chain(&e)))?;
    drop(proto);
    let typed = model.into_typed().map_err(|e| {
        LoadError::Unsupported(format!("tract cannot analyse the model: {}", chain(&e)))
    })?;
    let unsupported = |e: tp::TractError| LoadError::Unsupported(chain(&e));
    let inputs = typed
        .input_outlets()
        .map_err(unsupported)?
        .iter()
        .map(|o| spec(&typed, *o))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = typed
        .output_outlets()
        .map_err(unsupported)?
        .iter()
        .map(|o| spec(&typed, *o))
        .collect::<Result<Vec<_>, _>>()?;
    let model = typed.into_decluttered().map_err(|e| {
        LoadError::Unsupported(format!("tract cannot simplify the model: {}", chain(&e)))
    })?;
    Ok(Typed {
        model,
        inputs,
        outputs,
        labels,
    })
}

fn chain(e: &tp::TractError) -> String {
    let parts: Vec<String> = e.chain().map(ToString::to_string).collect();
    parts.join(": ")
}

fn spec(model: &tp::TypedModel, outlet: tp::OutletId) -> Result<TensorSpec, LoadError> {
    let fact = model
        .outlet_fact(outlet)
        .map_err(|e| LoadError::Unsupported(chain(&e)))?;
    let name = model
        .outlet_label(outlet)
        .map_or_else(|| model.node(outlet.node).name.clone(), str::to_owned);
    let datatype = from_datum(fact.datum_type).ok_or_else(|| {
        LoadError::Unsupported(format!(
            "{name:?} has type {:?}, which Outpost does not carry",
            fact.datum_type
        ))
    })?;
    let shape = fact
        .shape
        .iter()
        .map(|d| {
            d.to_i64()
                .ok()
                .and_then(|n| u64::try_from(n).ok())
                .map_or(Dim::Dynamic, Dim::Fixed)
        })
        .collect();
    Ok(TensorSpec {
        name,
        datatype,
        shape,
    })
}

fn from_datum(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::I8 => DataType::Int8,
        DatumType::I32 => DataType::Int32,
        // Shape arithmetic (`Shape`, sizes): ONNX declares it INT64.
        DatumType::I64 | DatumType::TDim => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        _ => return None,
    })
}

/// Runs `plan` on `inputs` (already checked), naming outputs after `outputs`; `symbols` (where
/// each symbolic dimension sits in the inputs) make a shape the model outputs concrete. A panic
/// inside tract (it panics on some bad inputs, such as an out-of-range Gather index) becomes an
/// error.
fn run_on(
    plan: &Plan,
    inputs: &[&Tensor],
    outputs: &[TensorSpec],
    executor: Option<&Executor>,
    symbols: &[(usize, usize, tp::Symbol)],
) -> Result<Vec<Tensor>, RunError> {
    // Only a shape output needs them, read from the inputs then.
    let resolved = || {
        let mut values = tp::SymbolValues::default();
        for (i, d, symbol) in symbols {
            if let Some(&n) = inputs.get(*i).and_then(|t| t.shape().get(*d)) {
                values.set(symbol, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        values
    };
    let values = inputs
        .iter()
        .map(|t| to_tract(t))
        .collect::<Result<tp::TVec<_>, _>>()
        .map_err(RunError::Input)?;
    let go = || match executor {
        Some(pool) => multithread_tract_scope(pool.clone(), || plan.run(values)),
        None => plan.run(values),
    };
    // tract panics on inputs outside the model's domain (an id past a table's end).
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(go))
        .map_err(|_| {
            RunError::Input("the model failed on these inputs (an index out of range?)".to_owned())
        })?
        .map_err(|e| RunError::Model(format!("the model failed: {}", chain(&e))))?;
    result
        .iter()
        .zip(outputs)
        .map(|(value, spec)| from_tract(&spec.name, value, &resolved).map_err(RunError::Model))
        .collect()
}

fn to_tract(t: &Tensor) -> Result<tp::TValue, String> {
    let shape: Vec<usize> = t
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
        .collect();
    let err = |e: outpost_shared::TensorError| e.to_string();
    let tensor = match t.datatype() {
        DataType::Bool => tp::Tensor::from_shape(&shape, &t.to_values::<bool>().map_err(err)?),
        DataType::Uint8 => tp::Tensor::from_shape(&shape, &t.to_values::<u8>().map_err(err)?),
        DataType::Int8 => tp::Tensor::from_shape(&shape, &t.to_values::<i8>().map_err(err)?),
        DataType::Int32 => tp::Tensor::from_shape(&shape, &t.to_values::<i32>().map_err(err)?),
        DataType::Int64 => tp::Tensor::from_shape(&shape, &t.to_values::<i64>().map_err(err)?),
        DataType::Fp16 => tp::Tensor::from_shape(&shape, &t.to_values::<half::f16>().map_err(err)?),
        DataType::Fp32 => tp::Tensor::from_shape(&shape, &t.to_values::<f32>().map_err(err)?),
        DataType::Fp64 => tp::Tensor::from_shape(&shape, &t.to_values::<f64>().map_err(err)?),
        other => {
            return Err(format!(
                "input {:?}: {other} is not supported by the tract engine",
                t.name()
            ));
        }
    };
    tensor
        .map(tp::IntoTValue::into_tvalue)
        .map_err(|e| chain(&e))
}

fn from_tract(
    name: &str,
    value: &tp::TValue,
    symbols: &dyn Fn() -> tp::SymbolValues,
) -> Result<Tensor, String> {
    let shape: Vec<u64> = value.shape().iter().map(|&d| d as u64).collect();
    fn values<T: tp::Datum + Copy>(v: &tp::TValue) -> Result<Vec<T>, String> {
        Ok(v.to_plain_array_view::<T>()
            .map_err(|e| chain(&e))?
            .iter()
            .copied()
            .collect())
    }
    let tensor = match value.datum_type() {
        DatumType::Bool => Tensor::from_values(name, shape, &values::<bool>(value)?),
        DatumType::U8 => Tensor::from_values(name, shape, &values::<u8>(value)?),
        DatumType::I8 => Tensor::from_values(name, shape, &values::<i8>(value)?),
        DatumType::I32 => Tensor::from_values(name, shape, &values::<i32>(value)?),
        DatumType::I64 => Tensor::from_values(name, shape, &values::<i64>(value)?),
        // A shape computed by the model, in terms of the inputs' symbols on the symbolic plan.
        DatumType::TDim => {
            let symbols = symbols();
            let ints = value
                .to_plain_array_view::<tp::TDim>()
                .map_err(|e| chain(&e))?
                .iter()
                .map(|d| d.eval_to_i64(&symbols))
                .collect::<Result<Vec<i64>, _>>()
                .map_err(|e| format!("output {name:?}: {}", chain(&e)))?;
            Tensor::from_values(name, shape, &ints)
        }
        DatumType::F16 => Tensor::from_values(name, shape, &values::<half::f16>(value)?),
        DatumType::F32 => Tensor::from_values(name, shape, &values::<f32>(value)?),
        DatumType::F64 => Tensor::from_values(name, shape, &values::<f64>(value)?),
        other => {
            return Err(format!(
                "output {name:?} has type {other:?}, which Outpost does not carry"
            ));
        }
    };
    tensor.map_err(|e| e.to_string())
}

/// A call whose working memory is at most this runs on the calling thread alone: waking the
/// matrix threads costs more than they save on it (a ranker's one row, not an encoder's text).
pub const SMALL_CALL_BYTES: u64 = 256 << 10;

/// How a [`TractModel`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TractOptions {
    /// Threads for matrix products (1: the calling thread only).
    pub threads: usize,
    /// Input shapes (values of the model's symbolic dimensions, such as the batch size) that
    /// get their own plan, optimised for exactly that shape; 0 runs every call on the symbolic
    /// plan.
    pub shape_plans: usize,
}

impl Default for TractOptions {
    fn default() -> Self {
        Self {
            threads: 1,
            shape_plans: 4,
        }
    }
}

/// A loaded model with its signature: what an engine runs.
///
/// Symbolic dimensions (a dynamic batch, a sequence length) cost tract 10–45 % (FINDINGS.md).
/// So every call runs on a plan for its exact shape when one is ready; a shape seen for the first
/// time runs on the symbolic plan while its own plan is optimised on a background thread, so no
/// call waits for an optimisation. Up to [`TractOptions::shape_plans`] shapes keep a plan; the
/// least recently used one makes room.
#[derive(Debug)]
pub struct TractModel {
    /// The inputs, in the model's order.
    pub inputs: Vec<TensorSpec>,
    /// The outputs, in the model's order.
    pub outputs: Vec<TensorSpec>,
    /// What the graph says of a call's working memory and id ranges (or why it cannot say).
    pub memory: Result<Arc<GraphMemory>, Unmeasurable>,
    /// The class names the model carries ([`LABELS_KEY`]), if any.
    pub labels: Vec<String>,
    inner: Arc<Inner>,
}

/// What tract reads off a model for an engine other than tract (the GPU, ONNX Runtime) that
/// runs it: what its graph says of a call's working memory (or why it cannot say), and its
/// class names.
#[derive(Debug)]
pub struct ModelFacts {
    /// The call's working memory and id ranges.
    pub memory: Result<GraphMemory, String>,
    /// The class names ([`LABELS_KEY`]).
    pub labels: Vec<String>,
}

/// Reads [`ModelFacts`] off `bytes`.
pub fn model_facts(bytes: &[u8]) -> ModelFacts {
    match typed(bytes) {
        Ok(t) => ModelFacts {
            memory: GraphMemory::analyse(&t.model).map_err(|e| e.to_string()),
            labels: t.labels,
        },
        Err(e) => ModelFacts {
            memory: Err(e.to_string()),
            labels: Vec::new(),
        },
    }
}

struct Inner {
    generic: Plan,
    /// The decluttered model to specialise, when it has symbolic input dimensions.
    typed: Option<tp::TypedModel>,
    /// Where each symbol of the inputs is: (input, dimension, symbol).
    symbols: Vec<(usize, usize, tp::Symbol)>,
    shapes: Mutex<Specialised>,
    executor: Option<Executor>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("symbols", &self.symbols.len())
            .finish_non_exhaustive()
    }
}

/// The plans optimised for one shape each, keyed by the values of the input symbols.
struct Specialised {
    ready: ShapePlans<Vec<i64>, Plan>,
    /// Being optimised now.
    pending: Option<Vec<i64>>,
    /// Shapes whose optimisation failed (they stay on the symbolic plan); the oldest are
    /// forgotten past [`FAILED_SHAPES`], so they are tried again one day.
    failed: VecDeque<Vec<i64>>,
}

/// Shapes remembered as failing to specialise.
const FAILED_SHAPES: usize = 16;

impl TractModel {
    /// Loads and optimises an ONNX model with the default options.
    pub fn load(bytes: &[u8]) -> Result<Self, LoadError> {
        Self::load_with(bytes, TractOptions::default())
    }

    /// Loads and optimises an ONNX model.
    pub fn load_with(bytes: &[u8], options: TractOptions) -> Result<Self, LoadError> {
        let Typed {
            model: typed,
            inputs,
            outputs,
            labels,
        } = typed(bytes)?;
        let unsupported = |e: tp::TractError| LoadError::Unsupported(chain(&e));
        let mut symbols = Vec::new();
        for (i, outlet) in typed
            .input_outlets()
            .map_err(unsupported)?
            .iter()
            .enumerate()
        {
            let fact = typed.outlet_fact(*outlet).map_err(unsupported)?;
            for (d, dim) in fact.shape.iter().enumerate() {
                if let tp::TDim::Sym(symbol) = dim {
                    symbols.push((i, d, symbol.clone()));
                }
            }
        }
        let memory = GraphMemory::analyse(&typed).map(Arc::new);
        if let Err(e) = &memory {
            tracing::info!(reason = %e, "calls of this model are bounded by their size only");
        }
        let specialise = !symbols.is_empty() && options.shape_plans > 0;
        let generic = optimise(typed.clone())?;
        let executor = (options.threads > 1)
            .then(|| Executor::multithread_with_name(options.threads, "outpost-tract"));
        Ok(Self {
            inputs,
            outputs,
            memory,
            labels,
            inner: Arc::new(Inner {
                generic,
                typed: specialise.then_some(typed),
                symbols,
                shapes: Mutex::new(Specialised {
                    ready: ShapePlans::new(options.shape_plans),
                    pending: None,
                    failed: VecDeque::new(),
                }),
                executor,
            }),
        })
    }

    /// Checks `inputs` against the signature and runs the model.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let ordered = check_inputs(&self.inputs, inputs)?;
        if let Ok(memory) = &self.memory {
            memory.check_ids(inputs)?;
        }
        let plan = self.plan_for(&ordered);
        // A small call is over before other threads would wake up to share it.
        let small = self
            .memory
            .as_ref()
            .is_ok_and(|m| m.bytes_for(inputs) <= SMALL_CALL_BYTES);
        let executor = self.inner.executor.as_ref().filter(|_| !small);
        run_on(
            &plan,
            &ordered,
            &self.outputs,
            executor,
            &self.inner.symbols,
        )
    }

    /// The shapes that have their own plan now: the values of the symbolic input dimensions,
    /// each symbol once, in the order the inputs first use them.
    pub fn shape_plans(&self) -> Vec<Vec<i64>> {
        self.inner
            .shapes
            .lock()
            .map(|s| s.ready.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The plan for these inputs' shape, or the symbolic plan while there is none (starting
    /// its optimisation if there is room).
    fn plan_for(&self, inputs: &[&Tensor]) -> Plan {
        let inner = &self.inner;
        let Some(typed) = &inner.typed else {
            return inner.generic.clone();
        };
        // Each symbol's value, in first-use order (a handful: a linear scan beats hashing).
        let mut values: Vec<(&tp::Symbol, i64)> = Vec::with_capacity(inner.symbols.len());
        for (i, d, symbol) in &inner.symbols {
            let Some(&n) = inputs.get(*i).and_then(|t| t.shape().get(*d)) else {
                return inner.generic.clone();
            };
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            match values.iter().find(|(s, _)| *s == symbol) {
                None => values.push((symbol, n)),
                Some(&(_, old)) if old == n => {}
                // One symbol in two places with two values: the symbolic plan reports it.
                Some(_) => return inner.generic.clone(),
            }
        }
        let key: Vec<i64> = values.iter().map(|(_, n)| *n).collect();
        // A poisoned lock means a plan thread panicked: serve on the symbolic plan.
        let Ok(mut shapes) = inner.shapes.lock() else {
            return inner.generic.clone();
        };
        if let Some(plan) = shapes.ready.get(key.as_slice()) {
            return plan;
        }
        // One optimisation at a time: it competes with serving for the CPU.
        if shapes.pending.is_some() || shapes.failed.contains(&key) {
            return inner.generic.clone();
        }
        shapes.pending = Some(key.clone());
        drop(shapes);
        let subs: HashMap<tp::Symbol, tp::TDim> = values
            .into_iter()
            .map(|(s, n)| (s.clone(), tp::TDim::Val(n)))
            .collect();
        let typed = typed.clone();
        let weak = Arc::downgrade(inner);
        let spawned = std::thread::Builder::new()
            .name("outpost-tract-plan".into())
            .spawn(move || {
                let plan = typed
                    .set_symbols(&subs)
                    .map_err(|e| LoadError::Unsupported(chain(&e)))
                    .and_then(optimise);
                let Some(inner) = weak.upgrade() else { return };
                let Ok(mut shapes) = inner.shapes.lock() else {
                    return;
                };
                shapes.pending = None;
                match plan {
                    Ok(plan) => {
                        shapes.ready.insert(key, plan);
                    }
                    Err(e) => {
                        tracing::debug!(
                            error = %e,
                            "no plan for this shape; the symbolic plan serves it"
                        );
                        if shapes.failed.len() >= FAILED_SHAPES {
                            shapes.failed.pop_front();
                        }
                        shapes.failed.push_back(key);
                    }
                }
            });
        if spawned.is_err()
            && let Ok(mut shapes) = inner.shapes.lock()
        {
            shapes.pending = None;
        }
        inner.generic.clone()
    }
}

impl Engine for TractModel {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        TractModel::run(self, inputs)
    }
}
