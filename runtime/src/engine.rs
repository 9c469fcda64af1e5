//! The seam between the agent and what runs a model on the device: tract on the CPU now, a GPU
//! engine later. An engine is loaded once per model version and shared by concurrent calls.

use outpost_shared::{Dim, Tensor, TensorSpec};

use crate::tract::{RunError, TractModel};

/// A model loaded by some engine, ready to answer.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// The engine's name, as status and model metadata show it (`"tract"`, …).
    fn name(&self) -> &'static str;

    /// The inputs, in the model's order.
    fn inputs(&self) -> &[TensorSpec];

    /// The outputs, in the model's order.
    fn outputs(&self) -> &[TensorSpec];

    /// Checks `inputs` against the signature and runs the model.
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError>;

    /// Runs the model once on zeros of batch 1, so the first real call does not pay for lazy
    /// set-up, and so a model that cannot run is found before it serves.
    fn warm_up(&self) -> Result<(), String> {
        let zeros = zero_inputs(self.inputs())?;
        self.run(&zeros)
            .map(|_| ())
            .map_err(|e| format!("warm-up failed: {e}"))
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

/// Zero-filled inputs for `specs`, dynamic dimensions 1.
pub fn zero_inputs(specs: &[TensorSpec]) -> Result<Vec<Tensor>, String> {
    specs
        .iter()
        .map(|s| {
            let shape = concrete_shape(s, 1, 1);
            let n = outpost_shared::tensor::element_count(&shape)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("input {:?}: the shape overflows", s.name))?;
            let size = s
                .datatype
                .element_size()
                .ok_or_else(|| format!("input {:?}: BYTES inputs cannot be warmed up", s.name))?;
            Tensor::from_bytes(s.name.clone(), s.datatype, shape, vec![0; n * size])
                .map_err(|e| e.to_string())
        })
        .collect()
}
