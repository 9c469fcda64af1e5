//! The seam between a server and what runs a model: tract on the CPU, the wgpu engine on a GPU.
//! An engine is loaded once per model version and shared by concurrent calls. Every engine fails
//! a call with one [`RunError`], whose kind decides the answer (bad input 400, the model or the
//! device 5xx); each server maps it once.

use outpost_shared::{Dim, Tensor, TensorSpec};

/// Why a call failed, by whose fault: the caller's inputs, the model, or the device running it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The inputs do not fit the signature or the model's domain (an id out of range): the
    /// caller can fix it (HTTP 400).
    #[error("{0}")]
    Input(String),
    /// The model failed on inputs that fit its signature, or cannot be run at all (HTTP 500).
    #[error("{0}")]
    Model(String),
    /// The device running the model failed: out of memory, a lost or refusing GPU. Another
    /// call, or another engine, may succeed (HTTP 503).
    #[error("{0}")]
    Device(String),
}

/// A model loaded by some engine, ready to answer.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// The engine's name, as status and model metadata show it (`"tract"`, `"wgpu"`).
    fn name(&self) -> &'static str;

    /// The inputs, in the model's order.
    fn inputs(&self) -> &[TensorSpec];

    /// The outputs, in the model's order.
    fn outputs(&self) -> &[TensorSpec];

    /// Checks `inputs` against the signature and runs the model.
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError>;

    /// Runs the model once on zeros of batch 1, so the first real call does not pay for lazy
    /// set-up, and so a model that cannot run is found before it serves.
    fn warm_up(&self) -> Result<(), RunError> {
        let zeros = zero_inputs(self.inputs())?;
        self.run(&zeros).map(|_| ()).map_err(|e| match e {
            RunError::Input(m) | RunError::Model(m) => {
                RunError::Model(format!("warm-up failed: {m}"))
            }
            RunError::Device(m) => RunError::Device(format!("warm-up failed: {m}")),
        })
    }
}

/// Checks inputs against the signature: every input present once, right type, right rank and
/// fixed dimensions. Returns them in the model's input order; every failure is
/// [`RunError::Input`], naming the input.
pub fn check_inputs<'a>(
    specs: &[TensorSpec],
    inputs: &'a [Tensor],
) -> Result<Vec<&'a Tensor>, RunError> {
    for t in inputs {
        if !specs.iter().any(|s| s.name == t.name()) {
            let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(RunError::Input(format!(
                "unknown input {:?} (the model takes {})",
                t.name(),
                names.join(", ")
            )));
        }
    }
    specs
        .iter()
        .map(|s| {
            let mut matching = inputs.iter().filter(|t| t.name() == s.name);
            let t = matching
                .next()
                .ok_or_else(|| RunError::Input(format!("input {:?} is missing", s.name)))?;
            if matching.next().is_some() {
                return Err(RunError::Input(format!(
                    "input {:?} is given twice",
                    s.name
                )));
            }
            if t.datatype() != s.datatype {
                return Err(RunError::Input(format!(
                    "input {:?} must be {}, not {}",
                    s.name,
                    s.datatype,
                    t.datatype()
                )));
            }
            let fits = t.shape().len() == s.shape.len()
                && s.shape.iter().zip(t.shape()).all(|(d, &n)| d.accepts(n));
            if !fits {
                let want: Vec<i64> = s.shape.iter().map(|&d| i64::from(d)).collect();
                return Err(RunError::Input(format!(
                    "input {:?} has shape {:?}, but the model takes {want:?} (-1: any)",
                    s.name,
                    t.shape()
                )));
            }
            Ok(t)
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|ordered| {
            // Only inputs whose first dimension is free are rows of the call.
            let batched: Vec<&Tensor> = specs
                .iter()
                .zip(&ordered)
                .filter(|(s, _)| s.shape.first() == Some(&Dim::Dynamic))
                .map(|(_, t)| *t)
                .collect();
            check_rows(&batched)?;
            Ok(ordered)
        })
}

/// Checks that every input carries the same number of rows (its outermost dimension): a call's
/// rows are one batch, and inputs that disagree are the caller's error, not the model's.
pub fn check_rows<T: std::borrow::Borrow<Tensor>>(inputs: &[T]) -> Result<(), RunError> {
    let mut first: Option<(&str, u64)> = None;
    for t in inputs {
        let t = t.borrow();
        let Some(&rows) = t.shape().first() else {
            continue;
        };
        match first {
            None => first = Some((t.name(), rows)),
            Some((name, n)) if n != rows => {
                return Err(RunError::Input(format!(
                    "inputs {name:?} and {:?} have {n} and {rows} rows: every input of a call must have the same number of rows",
                    t.name()
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// `spec`'s shape with its dynamic dimensions set: the first to `first` (the batch), the others
/// to `rest`.
pub fn concrete_shape(spec: &TensorSpec, first: u64, rest: u64) -> Vec<u64> {
    spec.shape
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Fixed(n) => *n,
            Dim::Dynamic if i == 0 => first,
            Dim::Dynamic => rest,
        })
        .collect()
}

/// The most bytes one warm-up input may take (a model whose batch of 1 needs more is refused).
pub const MAX_WARM_UP_BYTES: usize = 256 << 20;

/// Zero-filled inputs for `specs`, dynamic dimensions 1. A signature that cannot be filled (a
/// shape that overflows, text inputs) is [`RunError::Model`].
pub fn zero_inputs(specs: &[TensorSpec]) -> Result<Vec<Tensor>, RunError> {
    specs
        .iter()
        .map(|s| {
            let shape = concrete_shape(s, 1, 1);
            let n = outpost_shared::tensor::element_count(&shape)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    RunError::Model(format!("input {:?}: the shape overflows", s.name))
                })?;
            let size = s.datatype.element_size().ok_or_else(|| {
                RunError::Model(format!(
                    "input {:?}: BYTES inputs cannot be warmed up",
                    s.name
                ))
            })?;
            let bytes = n
                .checked_mul(size)
                .filter(|&b| b <= MAX_WARM_UP_BYTES)
                .ok_or_else(|| {
                    RunError::Model(format!(
                        "input {:?}: a batch of 1 is over {} MiB, too large to warm up",
                        s.name,
                        MAX_WARM_UP_BYTES >> 20
                    ))
                })?;
            Tensor::from_bytes(s.name.clone(), s.datatype, shape, vec![0; bytes])
                .map_err(|e| RunError::Model(e.to_string()))
        })
        .collect()
}
