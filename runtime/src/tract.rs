//! tract-onnx behind the coordinator: checking that an uploaded model runs, reading its
//! signature, and running it on protocol tensors.

use std::sync::Arc;

use outpost_shared::{DataType, Dim, Tensor, TensorSpec};
use tract_onnx::prelude::{
    self as tp, DatumType, Framework as _, InferenceModelExt as _, IntoRunnable as _,
};

/// A model ready to run.
pub type Plan = Arc<tp::TypedRunnableModel>;

/// Loads an ONNX model and optimises it for running; the error quotes tract's reason.
pub fn load(bytes: &[u8]) -> Result<(Plan, Vec<TensorSpec>, Vec<TensorSpec>), String> {
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
    let plan = typed
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| format!("tract cannot run the model: {}", chain(&e)))?;
    Ok((plan, inputs, outputs))
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
    let values = inputs
        .iter()
        .map(|t| to_tract(t))
        .collect::<Result<tp::TVec<_>, _>>()?;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan.run(values)))
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

/// A loaded model with its signature: what an engine runs.
#[derive(Debug, Clone)]
pub struct TractModel {
    plan: Plan,
    /// The inputs, in the model's order.
    pub inputs: Vec<TensorSpec>,
    /// The outputs, in the model's order.
    pub outputs: Vec<TensorSpec>,
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
    /// Loads and optimises an ONNX model.
    pub fn load(bytes: &[u8]) -> Result<Self, String> {
        let (plan, inputs, outputs) = load(bytes)?;
        Ok(Self {
            plan,
            inputs,
            outputs,
        })
    }

    /// Checks `inputs` against the signature and runs the model.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let ordered = check_inputs(&self.inputs, inputs).map_err(RunError::Input)?;
        run(&self.plan, &ordered, &self.outputs).map_err(RunError::Model)
    }

    /// Inputs of batch 1 (dynamic dimensions 1) filled with zeros, to warm the model up.
    pub fn zero_inputs(&self) -> Result<Vec<Tensor>, String> {
        self.inputs
            .iter()
            .map(|s| {
                let shape: Vec<u64> = s
                    .shape
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => *n,
                        Dim::Dynamic => 1,
                    })
                    .collect();
                let n = outpost_shared::tensor::element_count(&shape).ok_or("shape overflows")?
                    as usize;
                let size = s
                    .datatype
                    .element_size()
                    .ok_or("BYTES inputs cannot be warmed up")?;
                Tensor::from_bytes(s.name.clone(), s.datatype, shape, vec![0; n * size])
                    .map_err(|e| e.to_string())
            })
            .collect()
    }
}
