//! tract-onnx behind the coordinator: checking that an uploaded model runs, reading its
//! signature, and running it on protocol tensors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outpost_shared::{DataType, Dim, Tensor, TensorSpec};
use tract_onnx::prelude::{
    self as tp, DatumType, Framework as _, InferenceModelExt as _, IntoRunnable as _,
};
use tract_onnx::tract_core::tract_linalg::multithread::{Executor, multithread_tract_scope};

/// A model ready to run.
pub type Plan = Arc<tp::TypedRunnableModel>;

/// Loads an ONNX model and optimises it for running; the error quotes tract's reason.
pub fn load(bytes: &[u8]) -> Result<(Plan, Vec<TensorSpec>, Vec<TensorSpec>), String> {
    let (typed, inputs, outputs) = typed(bytes)?;
    Ok((optimise(typed)?, inputs, outputs))
}

fn optimise(typed: tp::TypedModel) -> Result<Plan, String> {
    typed
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| format!("tract cannot run the model: {}", chain(&e)))
}

/// The model typed (decluttered, symbols kept) and its signature.
fn typed(bytes: &[u8]) -> Result<(tp::TypedModel, Vec<TensorSpec>, Vec<TensorSpec>), String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(|e| format!("not an ONNX model tract can read: {}", chain(&e)))?;
    let typed = model
        .into_typed()
        .map_err(|e| format!("tract cannot analyse the model: {}", chain(&e)))?;
    let inputs = typed
        .input_outlets()
        .map_err(|e| chain(&e))?
        .iter()
        .map(|o| spec(&typed, *o))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = typed
        .output_outlets()
        .map_err(|e| chain(&e))?
        .iter()
        .map(|o| spec(&typed, *o))
        .collect::<Result<Vec<_>, _>>()?;
    let typed = typed
        .into_decluttered()
        .map_err(|e| format!("tract cannot simplify the model: {}", chain(&e)))?;
    Ok((typed, inputs, outputs))
}

fn chain(e: &tp::TractError) -> String {
    let parts: Vec<String> = e.chain().map(ToString::to_string).collect();
    parts.join(": ")
}

fn spec(model: &tp::TypedModel, outlet: tp::OutletId) -> Result<TensorSpec, String> {
    let fact = model.outlet_fact(outlet).map_err(|e| chain(&e))?;
    let name = model
        .outlet_label(outlet)
        .map_or_else(|| model.node(outlet.node).name.clone(), str::to_owned);
    let datatype = from_datum(fact.datum_type).ok_or_else(|| {
        format!(
            "{name:?} has type {:?}, which Outpost does not carry",
            fact.datum_type
        )
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
        DatumType::I64 => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        _ => return None,
    })
}

/// Checks inputs against the signature: every input present once, right type, right rank and
/// fixed dimensions. Returns them in the model's input order.
pub fn check_inputs<'a>(
    specs: &[TensorSpec],
    inputs: &'a [Tensor],
) -> Result<Vec<&'a Tensor>, String> {
    for t in inputs {
        if !specs.iter().any(|s| s.name == t.name()) {
            let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(format!(
                "unknown input {:?} (the model takes {})",
                t.name(),
                names.join(", ")
            ));
        }
    }
    specs
        .iter()
        .map(|s| {
            let mut matching = inputs.iter().filter(|t| t.name() == s.name);
            let t = matching
                .next()
                .ok_or_else(|| format!("input {:?} is missing", s.name))?;
            if matching.next().is_some() {
                return Err(format!("input {:?} is given twice", s.name));
            }
            if t.datatype() != s.datatype {
                return Err(format!(
                    "input {:?} must be {}, not {}",
                    s.name,
                    s.datatype,
                    t.datatype()
                ));
            }
            let fits = t.shape().len() == s.shape.len()
                && s.shape.iter().zip(t.shape()).all(|(d, &n)| d.accepts(n));
            if !fits {
                let want: Vec<i64> = s.shape.iter().map(|&d| i64::from(d)).collect();
                return Err(format!(
                    "input {:?} has shape {:?}, but the model takes {want:?} (-1: any)",
                    s.name,
                    t.shape()
                ));
            }
            Ok(t)
        })
        .collect()
}

/// Runs `plan` on `inputs` (already checked), naming outputs after `outputs`. A panic inside
/// tract (it panics on some bad inputs, such as an out-of-range Gather index) becomes an error.
pub fn run(plan: &Plan, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Result<Vec<Tensor>, String> {
    run_on(plan, inputs, outputs, None)
}

fn run_on(
    plan: &Plan,
    inputs: &[&Tensor],
    outputs: &[TensorSpec],
    executor: Option<&Executor>,
) -> Result<Vec<Tensor>, String> {
    let values = inputs
        .iter()
        .map(|t| to_tract(t))
        .collect::<Result<tp::TVec<_>, _>>()?;
    let go = || match executor {
        Some(pool) => multithread_tract_scope(pool.clone(), || plan.run(values)),
        None => plan.run(values),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(go))
        .map_err(|_| "the model failed on these inputs (an index out of range?)".to_owned())?
        .map_err(|e| format!("the model failed: {}", chain(&e)))?;
    result
        .iter()
        .zip(outputs)
        .map(|(value, spec)| from_tract(&spec.name, value))
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

fn from_tract(name: &str, value: &tp::TValue) -> Result<Tensor, String> {
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
    inner: Arc<Inner>,
}

struct Inner {
    generic: Plan,
    /// The decluttered model to specialise, when it has symbolic input dimensions.
    typed: Option<tp::TypedModel>,
    /// Where each symbol of the inputs is: (input, dimension, symbol).
    symbols: Vec<(usize, usize, tp::Symbol)>,
    shapes: Mutex<ShapePlans>,
    max_shapes: usize,
    executor: Option<Executor>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("symbols", &self.symbols.len())
            .field("max_shapes", &self.max_shapes)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct ShapePlans {
    /// (symbol values, plan, last use).
    ready: Vec<(Vec<i64>, Plan, u64)>,
    /// Being optimised now.
    pending: Vec<Vec<i64>>,
    /// Shapes whose optimisation failed (they stay on the symbolic plan).
    failed: Vec<Vec<i64>>,
    tick: u64,
}

/// Why a run failed: the caller's inputs, or the model itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// The inputs do not fit the signature.
    Input(String),
    /// The model failed on valid-looking inputs.
    Model(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Input(m) | RunError::Model(m) => f.write_str(m),
        }
    }
}

impl TractModel {
    /// Loads and optimises an ONNX model with the default options.
    pub fn load(bytes: &[u8]) -> Result<Self, String> {
        Self::load_with(bytes, TractOptions::default())
    }

    /// Loads and optimises an ONNX model.
    pub fn load_with(bytes: &[u8], options: TractOptions) -> Result<Self, String> {
        let (typed, inputs, outputs) = typed(bytes)?;
        let mut symbols = Vec::new();
        for (i, outlet) in typed
            .input_outlets()
            .map_err(|e| chain(&e))?
            .iter()
            .enumerate()
        {
            let fact = typed.outlet_fact(*outlet).map_err(|e| chain(&e))?;
            for (d, dim) in fact.shape.iter().enumerate() {
                if let tp::TDim::Sym(symbol) = dim {
                    symbols.push((i, d, symbol.clone()));
                }
            }
        }
        let specialise = !symbols.is_empty() && options.shape_plans > 0;
        let generic = optimise(typed.clone())?;
        let executor = (options.threads > 1)
            .then(|| Executor::multithread_with_name(options.threads, "outpost-tract"));
        Ok(Self {
            inputs,
            outputs,
            inner: Arc::new(Inner {
                generic,
                typed: specialise.then_some(typed),
                symbols,
                shapes: Mutex::new(ShapePlans::default()),
                max_shapes: options.shape_plans,
                executor,
            }),
        })
    }

    /// Checks `inputs` against the signature and runs the model.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let ordered = check_inputs(&self.inputs, inputs).map_err(RunError::Input)?;
        let plan = self.plan_for(&ordered);
        run_on(&plan, &ordered, &self.outputs, self.inner.executor.as_ref())
            .map_err(RunError::Model)
    }

    /// The shapes that have their own plan now: the values of the symbolic input dimensions,
    /// each symbol once, in the order the inputs first use them.
    pub fn shape_plans(&self) -> Vec<Vec<i64>> {
        self.inner
            .shapes
            .lock()
            .map(|s| s.ready.iter().map(|(k, _, _)| k.clone()).collect())
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
        let Ok(mut shapes) = inner.shapes.lock() else {
            return inner.generic.clone();
        };
        shapes.tick += 1;
        let tick = shapes.tick;
        if let Some(entry) = shapes.ready.iter_mut().find(|(k, _, _)| *k == key) {
            entry.2 = tick;
            return entry.1.clone();
        }
        if shapes.pending.contains(&key)
            || shapes.failed.contains(&key)
            || !shapes.pending.is_empty()
        {
            // One optimisation at a time: it competes with serving for the CPU.
            return inner.generic.clone();
        }
        shapes.pending.push(key.clone());
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
                    .map_err(|e| chain(&e))
                    .and_then(optimise);
                let Some(inner) = weak.upgrade() else { return };
                let Ok(mut shapes) = inner.shapes.lock() else {
                    return;
                };
                shapes.pending.retain(|k| *k != key);
                match plan {
                    Ok(plan) => {
                        if shapes.ready.len() >= inner.max_shapes {
                            if let Some(oldest) = shapes
                                .ready
                                .iter()
                                .enumerate()
                                .min_by_key(|(_, e)| e.2)
                                .map(|(i, _)| i)
                            {
                                shapes.ready.swap_remove(oldest);
                            }
                        }
                        let tick = shapes.tick;
                        shapes.ready.push((key, plan, tick));
                    }
                    Err(e) => {
                        tracing::debug!(
                            error = e,
                            "no plan for this shape; the symbolic plan serves it"
                        );
                        shapes.failed.push(key);
                    }
                }
            });
        if spawned.is_err() {
            if let Ok(mut shapes) = inner.shapes.lock() {
                shapes.pending.clear();
            }
        }
        inner.generic.clone()
    }

    /// Inputs of batch 1 (dynamic dimensions 1) filled with zeros, to warm the model up.
    pub fn zero_inputs(&self) -> Result<Vec<Tensor>, String> {
        crate::engine::zero_inputs(&self.inputs)
    }
}
