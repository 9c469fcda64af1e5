//! What a model's graph says about a call before it runs: its working memory for a number of
//! rows and a sequence length ([`GraphMemory::cost`]), whether its answers can be cut and joined
//! by rows, and the id inputs that index a table (checked before an engine sees them).
//!
//! The working memory is the peak of the values alive at once when the nodes run in tract's
//! order, each freed after its last use (as tract's plan frees them), plus the request's inputs
//! and the answer's outputs as the server holds them beside the engine. Weights are not
//! counted: they are the model's memory, held whether or not it runs. Shapes come from the typed
//! graph with its symbols (the batch, the sequence) set, so attention's `s²` shows as it is.

use std::sync::Mutex;

use outpost_shared::{DataType, Tensor};
use tract_onnx::prelude::{self as tp, TDim};
use tract_onnx::tract_core::ops::array::Gather;
use tract_onnx::tract_core::ops::cast::Cast;

use crate::engine::RunError;
use crate::memory::CallCost;
use crate::plans::ShapePlans;

/// One value the graph computes: its shape (in the input symbols), element size and the steps
/// (in evaluation order) from which it is alive to after which it is freed.
#[derive(Debug, Clone)]
struct Value {
    dims: Vec<TDim>,
    size: u64,
    born: usize,
    dies: usize,
    /// An input or output, also held by the server in protocol form.
    held_twice: bool,
}

/// An id input that indexes a table: values must lie in `-rows..rows`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdRange {
    /// The input's name.
    pub input: String,
    /// The table's rows.
    pub rows: u64,
}

/// Sequence lengths whose cost is kept (a text model sees one per padded length).
const COSTS_KEPT: usize = 64;

/// A model's graph, as far as memory and id ranges go.
#[derive(Debug)]
pub struct GraphMemory {
    values: Vec<Value>,
    steps: usize,
    batch: Option<tp::Symbol>,
    /// The input symbols other than the batch, with where each first appears (input, dim).
    sequence: Vec<(String, usize, tp::Symbol)>,
    /// Every output's first dimension is the batch: a call can be cut into row parts.
    splits: bool,
    /// Every output's first dimension is the first input's (a row of answer per input row).
    by_row: bool,
    ids: Vec<IdRange>,
    costs: Mutex<ShapePlans<u64, CallCost>>,
}

/// The graph cannot be measured (a shape that depends on values, not on the inputs' shapes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the model's working memory cannot be estimated: {0}")]
pub struct Unmeasurable(pub String);

fn chain(e: &tp::TractError) -> String {
    let parts: Vec<String> = e.chain().map(ToString::to_string).collect();
    parts.join(": ")
}

impl GraphMemory {
    /// Reads `model` (typed, decluttered, with its symbols).
    pub fn analyse(model: &tp::TypedModel) -> Result<Self, Unmeasurable> {
        let err = |e: tp::TractError| Unmeasurable(chain(&e));
        let order = model.eval_order().map_err(err)?;
        let inputs = model.input_outlets().map_err(err)?.to_vec();
        let outputs = model.output_outlets().map_err(err)?.to_vec();
        let mut position = vec![usize::MAX; model.nodes().len()];
        for (step, &node) in order.iter().enumerate() {
            position[node] = step;
        }
        // The symbols of the inputs: the first dimension is the batch, the others sequences.
        let mut batch = None;
        let mut sequence: Vec<(String, usize, tp::Symbol)> = Vec::new();
        for outlet in &inputs {
            let fact = model.outlet_fact(*outlet).map_err(err)?;
            let name = model.node(outlet.node).name.clone();
            for (d, dim) in fact.shape.iter().enumerate() {
                if let TDim::Sym(symbol) = dim {
                    if d == 0 && batch.as_ref().is_none_or(|b| b == symbol) {
                        batch = Some(symbol.clone());
                    } else if Some(symbol) != batch.as_ref()
                        && !sequence.iter().any(|(_, _, s)| s == symbol)
                    {
                        sequence.push((name.clone(), d, symbol.clone()));
                    }
                }
            }
        }
        let last = order.len();
        let mut values = Vec::new();
        for &node in &order {
            let n = model.node(node);
            let is_input = inputs.iter().any(|o| o.node == node);
            for (slot, fact) in n.outputs.iter().map(|o| &o.fact).enumerate() {
                // Weights and other constants are the model's memory, not the call's.
                if fact.konst.is_some() {
                    continue;
                }
                let outlet = tp::OutletId::new(node, slot);
                let is_output = outputs.contains(&outlet);
                let dies = if is_output {
                    last
                } else {
                    model
                        .outlet_successors(outlet)
                        .iter()
                        .map(|inlet| position[inlet.node])
                        .max()
                        .unwrap_or(position[node])
                };
                values.push(Value {
                    dims: fact.shape.iter().cloned().collect(),
                    size: fact.datum_type.size_of() as u64,
                    born: position[node],
                    dies,
                    held_twice: is_input || is_output,
                });
            }
        }
        let splits = batch.as_ref().is_some_and(|b| {
            outputs.iter().all(|o| {
                model
                    .outlet_fact(*o)
                    .is_ok_and(|f| f.shape.iter().next() == Some(&TDim::Sym(b.clone())))
            })
        });
        let first_rows = inputs
            .first()
            .and_then(|o| model.outlet_fact(*o).ok())
            .and_then(|f| f.shape.iter().next().cloned());
        let by_row = first_rows.is_some_and(|rows| {
            outputs.iter().all(|o| {
                model
                    .outlet_fact(*o)
                    .is_ok_and(|f| f.shape.iter().next() == Some(&rows))
            })
        });
        let ids = id_ranges(model, &inputs);
        let memory = Self {
            values,
            steps: last,
            batch,
            sequence,
            splits,
            by_row,
            ids,
            costs: Mutex::new(ShapePlans::new(COSTS_KEPT)),
        };
        // Every shape must be known from the inputs' shapes alone.
        memory.peak(1, 1)?;
        Ok(memory)
    }

    /// Whether a call's rows can run in parts whose answers are joined by rows.
    pub fn splits(&self) -> bool {
        self.splits
    }

    /// Whether every output has a row for each input row (what a cascade needs).
    pub fn answers_by_row(&self) -> bool {
        self.by_row
    }

    /// Whether the model has a sequence dimension (a text or token model).
    pub fn has_sequence(&self) -> bool {
        !self.sequence.is_empty()
    }

    /// The id inputs that index a table.
    pub fn id_ranges(&self) -> &[IdRange] {
        &self.ids
    }

    /// The cost of a call at sequence length `sequence` (ignored by a model without one).
    pub fn cost(&self, sequence: u64) -> CallCost {
        let sequence = if self.sequence.is_empty() {
            1
        } else {
            sequence.max(1)
        };
        if let Ok(mut costs) = self.costs.lock()
            && let Some(cost) = costs.get(&sequence)
        {
            return cost;
        }
        let cost = self.measure(sequence);
        if let Ok(mut costs) = self.costs.lock() {
            costs.insert(sequence, cost);
        }
        cost
    }

    /// The longest sequence `inputs` carry (1 for a model without one).
    pub fn sequence_of(&self, inputs: &[Tensor]) -> u64 {
        self.sequence
            .iter()
            .filter_map(|(name, d, _)| {
                inputs
                    .iter()
                    .find(|t| t.name() == name)
                    .and_then(|t| t.shape().get(*d).copied())
            })
            .max()
            .unwrap_or(1)
    }

    /// The bytes a call with these inputs takes.
    pub fn bytes_for(&self, inputs: &[Tensor]) -> u64 {
        let rows = inputs
            .first()
            .and_then(|t| t.shape().first().copied())
            .unwrap_or(1);
        let cost = self.cost(self.sequence_of(inputs));
        if self.batch.is_some() {
            cost.bytes(rows)
        } else {
            cost.bytes(1)
        }
    }

    /// Fits `fixed + rows × per_row` through the peaks at 1, 2 and 4 rows (the larger slope, so
    /// a graph that grows faster than linearly in rows is not underestimated at small batches).
    fn measure(&self, sequence: u64) -> CallCost {
        let at = |rows| self.peak(rows, sequence).unwrap_or(u64::MAX);
        let one = at(1);
        if self.batch.is_none() {
            return CallCost {
                fixed: one,
                per_row: 0,
            };
        }
        let (two, four) = (at(2), at(4));
        let per_row = two
            .saturating_sub(one)
            .max(four.saturating_sub(one).div_ceil(3));
        CallCost {
            fixed: one.saturating_sub(per_row),
            per_row,
        }
    }

    /// The peak bytes alive at once for `rows` rows at sequence length `sequence`.
    fn peak(&self, rows: i64, sequence: u64) -> Result<u64, Unmeasurable> {
        let mut symbols = tp::SymbolValues::default();
        if let Some(b) = &self.batch {
            symbols.set(b, rows);
        }
        let sequence = i64::try_from(sequence).unwrap_or(i64::MAX);
        for (_, _, s) in &self.sequence {
            symbols.set(s, sequence);
        }
        let mut born = vec![0u64; self.steps + 1];
        let mut freed = vec![0u64; self.steps + 1];
        let mut held = 0u64;
        for v in &self.values {
            let mut bytes = v.size;
            for d in &v.dims {
                let n = d.eval(&symbols).to_i64().map_err(|_| {
                    Unmeasurable(format!(
                        "a dimension ({d}) depends on more than the inputs' shapes"
                    ))
                })?;
                bytes = bytes.saturating_mul(u64::try_from(n).unwrap_or(0));
            }
            born[v.born] = born[v.born].saturating_add(bytes);
            freed[v.dies] = freed[v.dies].saturating_add(bytes);
            if v.held_twice {
                held = held.saturating_add(bytes);
            }
        }
        let (mut live, mut peak) = (0u64, 0u64);
        for step in 0..=self.steps {
            live = live.saturating_add(born[step]);
            peak = peak.max(live);
            live = live.saturating_sub(freed[step]);
        }
        Ok(peak.saturating_add(held))
    }

    /// Checks the id inputs against their tables: an id outside is the caller's error, found
    /// before an engine indexes past a table.
    pub fn check_ids(&self, inputs: &[Tensor]) -> Result<(), RunError> {
        for range in &self.ids {
            let Some(t) = inputs.iter().find(|t| t.name() == range.input) else {
                continue;
            };
            let rows = i64::try_from(range.rows).unwrap_or(i64::MAX);
            let bad = |index: usize, value: i64| {
                RunError::Input(format!(
                    "input {:?}: id {value} (element {index}) is outside the model's table of {} rows (ids from {} to {})",
                    range.input,
                    range.rows,
                    -rows,
                    rows - 1
                ))
            };
            let out = |v: i64| v < -rows || v >= rows;
            match t.datatype() {
                DataType::Int64 => {
                    for (i, c) in t.data().chunks_exact(8).enumerate() {
                        let v = i64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
                        if out(v) {
                            return Err(bad(i, v));
                        }
                    }
                }
                DataType::Int32 => {
                    for (i, c) in t.data().chunks_exact(4).enumerate() {
                        let v = i64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4])));
                        if out(v) {
                            return Err(bad(i, v));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The inputs that, directly or through a cast, index a constant table with a `Gather` on its
/// first axis (an embedding lookup).
fn id_ranges(model: &tp::TypedModel, inputs: &[tp::OutletId]) -> Vec<IdRange> {
    let mut ranges = Vec::new();
    for input in inputs {
        let name = model.node(input.node).name.clone();
        let mut frontier = vec![*input];
        let mut rows: Option<u64> = None;
        while let Some(outlet) = frontier.pop() {
            for inlet in model.outlet_successors(outlet) {
                let node = model.node(inlet.node);
                if node.op_is::<Cast>() {
                    frontier.push(tp::OutletId::new(inlet.node, 0));
                } else if let Some(gather) = node.op_as::<Gather>()
                    && gather.axis == 0
                    && inlet.slot == 1
                    && let Some(table) = node.inputs.first()
                    && let Ok(fact) = model.outlet_fact(*table)
                    && fact.konst.is_some()
                    && let Some(n) = fact.shape.iter().next().and_then(|d| d.to_i64().ok())
                {
                    let n = u64::try_from(n).unwrap_or(0);
                    rows = Some(rows.map_or(n, |r| r.min(n)));
                }
            }
        }
        if let Some(rows) = rows {
            ranges.push(IdRange { input: name, rows });
        }
    }
    ranges
}
