//! A model on the GPU: weights uploaded once, and per input shape a prepared list of dispatches
//! with its buffers and bind groups, so a call writes its inputs, submits once and reads back.

use std::sync::{Arc, Mutex};

use outpost_runtime::engine::Engine;
use outpost_runtime::engine::{RunError, check_inputs};
use outpost_shared::{DataType, Tensor, TensorSpec};
use wgpu::util::DeviceExt;

use crate::context::{AdapterSummary, GpuContext};
use crate::import::{
    self, DType, GatherSource, Graph, ImportError, Origin, Step, TableData, View, WeightData,
};
use crate::kernels::{Kernel, MAX_RANK, WORKGROUP};

/// Input shapes that keep their prepared dispatches (least recently used makes room).
const PREPARED_SHAPES: usize = 4;

/// The largest K for `dot4I8Packed` sums: 127 · 127 · K must stay within an i32.
const DOT4_MAX_K: usize = 131_072;

struct GpuWeight {
    k: usize,
    n: usize,
    k4: usize,
    q8: bool,
    /// (first output channel, channels, buffer).
    blocks: Vec<(usize, usize, wgpu::Buffer)>,
    scale: Option<wgpu::Buffer>,
    bias: Option<wgpu::Buffer>,
}

struct GpuTable {
    dims: Vec<usize>,
    /// (first row along axis 0, rows, buffer); one block unless the table is split.
    blocks: Vec<(usize, usize, wgpu::Buffer)>,
    /// int8 scales: (buffer, stride, channels).
    scale: Option<(wgpu::Buffer, usize, usize)>,
}

/// A model running on a [`GpuContext`].
pub struct GpuModel {
    ctx: Arc<GpuContext>,
    graph: Graph,
    consts: Vec<wgpu::Buffer>,
    weights: Vec<GpuWeight>,
    tables: Vec<GpuTable>,
    dummy: wgpu::Buffer,
    prepared: Mutex<Prepared>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("adapter", &self.ctx.summary.name)
            .field("steps", &self.graph.steps.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Prepared {
    shapes: Vec<(Vec<Vec<usize>>, Arc<Plan>, u64)>,
    tick: u64,
}

/// Everything one input shape needs.
struct Plan {
    buffers: Vec<wgpu::Buffer>,
    dispatches: Vec<(Kernel, wgpu::BindGroup, u32, u32)>,
    /// Per model input: its buffer (None when it has no elements).
    inputs: Vec<Option<usize>>,
    /// Per output: where it is, its shape, its offset in the read-back buffer.
    outputs: Vec<(Loc, Vec<usize>, u64)>,
    readback: wgpu::Buffer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Slot(usize),
    Const(usize),
}

#[derive(Debug, Clone, Copy)]
enum Buf {
    Slot(usize),
    Const(usize),
    WeightBlock(usize, usize),
    WeightScale(usize),
    WeightBias(usize),
    TableBlock(usize, usize),
    TableScale(usize),
}

struct Dispatch {
    kernel: Kernel,
    params: Vec<u32>,
    bindings: Vec<(u32, Buf)>,
    threads: usize,
}

fn storage(device: &wgpu::Device, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    let padded;
    let contents = if bytes.len() < 4 {
        padded = [0u8; 4];
        &padded[..]
    } else {
        bytes
    };
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    })
}

fn pack_i8(q: &[i8]) -> Vec<u8> {
    let mut bytes: Vec<u8> = q.iter().map(|&v| v as u8).collect();
    bytes.resize(q.len().div_ceil(4) * 4, 0);
    bytes
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The element count, saturating (any count that large is refused against the binding limit
/// before it is used).
fn product(dims: &[usize]) -> usize {
    dims.iter().fold(1usize, |n, &d| n.saturating_mul(d))
}

fn u32_of(n: usize, what: &str) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("{what} ({n}) does not fit the GPU's 32-bit indices"))
}

impl GpuModel {
    /// Imports `bytes` and uploads the weights. [`ImportError::Unsupported`] names the op that
    /// keeps the model off the GPU.
    pub fn load(bytes: &[u8], ctx: Arc<GpuContext>) -> Result<Self, ImportError> {
        let mut graph = import::import(bytes)?;
        let device = &ctx.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let block_bytes = usize::try_from(ctx.weight_block_bytes).unwrap_or(usize::MAX);
        let max_binding = usize::try_from(ctx.max_binding()).unwrap_or(usize::MAX);
        let too_big = |what: &str, bytes: usize| ImportError::Unsupported {
            op: "weights".into(),
            node: what.to_owned(),
            reason: format!(
                "{bytes} bytes do not fit one GPU binding ({max_binding} bytes) and cannot be split"
            ),
        };

        let consts = graph
            .consts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if c.data.len() * 4 > max_binding {
                    return Err(too_big(&format!("constant {i}"), c.data.len() * 4));
                }
                Ok(storage(device, "constant", &f32_bytes(&c.data)))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut weights = Vec::new();
        for (i, w) in graph.weights.iter_mut().enumerate() {
            let k4 = w.k.div_ceil(4);
            let (q8, per_channel) = match &w.data {
                WeightData::Q8 { .. } => (true, k4 * 4),
                WeightData::F32(_) => (false, w.k * 4),
            };
            if per_channel > max_binding {
                return Err(too_big(&format!("weight {i}"), per_channel));
            }
            if w.n == 0 || w.k == 0 {
                return Err(ImportError::Invalid(format!(
                    "weight {i} has an empty dimension"
                )));
            }
            let per_block = (block_bytes / per_channel).max(1);
            let mut blocks = Vec::new();
            let mut n0 = 0;
            while n0 < w.n {
                let nb = per_block.min(w.n - n0);
                let bytes = match &w.data {
                    WeightData::Q8 { q, .. } => {
                        let mut words = Vec::with_capacity(nb * k4 * 4);
                        for c in n0..n0 + nb {
                            words.extend(pack_i8(&q[c * w.k..(c + 1) * w.k]));
                        }
                        words
                    }
                    WeightData::F32(v) => f32_bytes(&v[n0 * w.k..(n0 + nb) * w.k]),
                };
                blocks.push((n0, nb, storage(device, "weight", &bytes)));
                n0 += nb;
            }
            let scale = match &w.data {
                WeightData::Q8 { scale, .. } => Some(storage(device, "scale", &f32_bytes(scale))),
                WeightData::F32(_) => None,
            };
            let bias = w
                .bias
                .as_ref()
                .map(|b| storage(device, "bias", &f32_bytes(b)));
            weights.push(GpuWeight {
                k: w.k,
                n: w.n,
                k4,
                q8,
                blocks,
                scale,
                bias,
            });
            // The host copy is not needed any more.
            w.data = WeightData::F32(Vec::new());
            w.bias = None;
        }

        let mut tables = Vec::new();
        for (i, t) in graph.tables.iter_mut().enumerate() {
            let rows = t.dims.first().copied().unwrap_or(1);
            let inner = product(&t.dims[1.min(t.dims.len())..]);
            let (row_bytes, total) = match &t.data {
                TableData::Q8 { q, .. } => (inner, q.len().div_ceil(4) * 4),
                TableData::F32(v) => (inner * 4, v.len() * 4),
            };
            let mut blocks = Vec::new();
            if total <= block_bytes {
                let bytes = match &t.data {
                    TableData::Q8 { q, .. } => pack_i8(q),
                    TableData::F32(v) => f32_bytes(v),
                };
                blocks.push((0, rows, storage(device, "table", &bytes)));
            } else {
                // Split along axis 0; a block starts on a word boundary, so keep rows × inner
                // a multiple of 4 elements for int8 (each block is packed from its own start).
                // Blocks are ranges of the gathered axis: only axis 0 keeps them contiguous.
                if row_bytes > block_bytes || t.axis != 0 {
                    return Err(too_big(&format!("table {i}"), total));
                }
                let per_block = (block_bytes / row_bytes.max(1)).max(1);
                let mut r0 = 0;
                while r0 < rows {
                    let rc = per_block.min(rows - r0);
                    let bytes = match &t.data {
                        TableData::Q8 { q, .. } => pack_i8(&q[r0 * inner..(r0 + rc) * inner]),
                        TableData::F32(v) => f32_bytes(&v[r0 * inner..(r0 + rc) * inner]),
                    };
                    blocks.push((r0, rc, storage(device, "table", &bytes)));
                    r0 += rc;
                }
            }
            let scale = match &t.data {
                TableData::Q8 { scale, axis, .. } => Some((
                    storage(device, "table scale", &f32_bytes(scale)),
                    product(&t.dims[axis + 1..]).max(1),
                    t.dims[*axis].max(1),
                )),
                TableData::F32(_) => None,
            };
            tables.push(GpuTable {
                dims: t.dims.clone(),
                blocks,
                scale,
            });
            t.data = TableData::F32(Vec::new());
        }
        graph.consts.iter_mut().for_each(|c| c.data = Vec::new());
        let dummy = storage(device, "unused", &[0; 4]);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(ImportError::Device(format!("uploading the weights: {e}")));
        }
        Ok(GpuModel {
            ctx,
            graph,
            consts,
            weights,
            tables,
            dummy,
            prepared: Mutex::new(Prepared::default()),
        })
    }

    /// The adapter the model runs on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.ctx.summary
    }

    /// How the model's weights are held, for status pages.
    pub fn detail(&self) -> String {
        let products = if self.ctx.summary.dot4 {
            "int8 weights × int8 activations (dot4I8Packed)"
        } else {
            "int8 weights unpacked to f32"
        };
        let origin = if self.graph.quantised_at_load {
            "; f32 weights quantised to int8 at load"
        } else {
            ""
        };
        format!("{products}{origin}")
    }

    /// Bytes of weights held on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        let w: u64 = self
            .weights
            .iter()
            .flat_map(|w| w.blocks.iter().map(|b| b.2.size()))
            .sum();
        let t: u64 = self
            .tables
            .iter()
            .flat_map(|t| t.blocks.iter().map(|b| b.2.size()))
            .sum();
        w + t + self.consts.iter().map(wgpu::Buffer::size).sum::<u64>()
    }

    fn plan_for(&self, shapes: &[Vec<usize>]) -> Result<Arc<Plan>, RunError> {
        let mut prepared = self
            .prepared
            .lock()
            .map_err(|_| RunError::Model("an earlier call failed while preparing".into()))?;
        prepared.tick += 1;
        let tick = prepared.tick;
        if let Some(entry) = prepared.shapes.iter_mut().find(|(s, _, _)| s == shapes) {
            entry.2 = tick;
            return Ok(Arc::clone(&entry.1));
        }
        let plan = Arc::new(self.prepare(shapes)?);
        if prepared.shapes.len() >= PREPARED_SHAPES {
            if let Some(oldest) = prepared
                .shapes
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, _, t))| *t)
                .map(|(i, _)| i)
            {
                prepared.shapes.swap_remove(oldest);
            }
        }
        prepared
            .shapes
            .push((shapes.to_vec(), Arc::clone(&plan), tick));
        Ok(plan)
    }

    /// Shapes, buffers and dispatches for one set of input shapes.
    fn prepare(&self, input_shapes: &[Vec<usize>]) -> Result<Plan, RunError> {
        let g = &self.graph;
        // Shapes of every value.
        let mut shapes: Vec<Vec<usize>> = vec![Vec::new(); g.values.len()];
        for (i, &v) in g.input_values.iter().enumerate() {
            shapes[v] = input_shapes[i].clone();
        }
        for (v, value) in g.values.iter().enumerate() {
            if let Origin::Const(c) = value.origin {
                shapes[v] = g.consts[c].dims.clone();
            }
        }
        for step in &g.steps {
            let shape = self.infer(step, &shapes).map_err(RunError::Input)?;
            shapes[step.out()] = shape;
        }
        let max_binding = self.ctx.max_binding();
        for shape in &shapes {
            let bytes = product(shape).saturating_mul(4);
            if bytes as u64 > max_binding {
                return Err(RunError::Input(format!(
                    "these inputs need a {shape:?} tensor ({bytes} bytes); the GPU binds at most {max_binding} bytes (send fewer rows per call)"
                )));
            }
        }

        // Where every value lives: views share their input's buffer.
        let mut loc: Vec<Option<Loc>> = vec![None; g.values.len()];
        // Per virtual slot: bytes, the time it is written, the time of its last read.
        let mut slot_bytes: Vec<usize> = Vec::new();
        let mut slot_def: Vec<usize> = Vec::new();
        let mut slot_last: Vec<usize> = Vec::new();
        fn new_slot(
            slots: (&mut Vec<usize>, &mut Vec<usize>, &mut Vec<usize>),
            bytes: usize,
            t: usize,
        ) -> usize {
            slots.0.push(bytes);
            slots.1.push(t);
            slots.2.push(t);
            slots.0.len() - 1
        }
        for (v, value) in g.values.iter().enumerate() {
            if let Origin::Const(c) = value.origin {
                loc[v] = Some(Loc::Const(c));
            }
        }
        for &v in &g.input_values {
            let s = new_slot(
                (&mut slot_bytes, &mut slot_def, &mut slot_last),
                product(&shapes[v]) * 4,
                0,
            );
            loc[v] = Some(Loc::Slot(s));
        }
        // Step j runs at time j + 1 (inputs are written at time 0).
        let mut scratch: Vec<Vec<usize>> = Vec::new();
        for (j, step) in g.steps.iter().enumerate() {
            let t = j + 1;
            let out = step.out();
            loc[out] = match step {
                Step::View { x, .. } => loc[*x],
                _ => Some(Loc::Slot(new_slot(
                    (&mut slot_bytes, &mut slot_def, &mut slot_last),
                    product(&shapes[out]) * 4,
                    t,
                ))),
            };
            let mut mine = Vec::new();
            for bytes in self.scratch_bytes(step, &shapes) {
                mine.push(new_slot(
                    (&mut slot_bytes, &mut slot_def, &mut slot_last),
                    bytes,
                    t,
                ));
            }
            scratch.push(mine);
            for v in step.inputs() {
                if let Some(Loc::Slot(s)) = loc[v] {
                    slot_last[s] = slot_last[s].max(t);
                }
            }
        }
        for &v in &g.output_values {
            if let Some(Loc::Slot(s)) = loc[v] {
                slot_last[s] = usize::MAX;
            }
        }
        // Physical buffers: reuse a freed one of sufficient size, smallest first.
        let mut physical: Vec<usize> = Vec::new();
        let mut assigned = vec![usize::MAX; slot_bytes.len()];
        let mut free: Vec<usize> = Vec::new();
        let steps = g.steps.len();
        for t in 0..=steps {
            for s in 0..slot_bytes.len() {
                if slot_def[s] != t {
                    continue;
                }
                let need = slot_bytes[s].max(4);
                let pick = free
                    .iter()
                    .enumerate()
                    .filter(|&(_, &b)| physical[b] >= need)
                    .min_by_key(|&(_, &b)| physical[b])
                    .map(|(i, _)| i);
                assigned[s] = match pick {
                    Some(i) => free.swap_remove(i),
                    None => {
                        physical.push(need);
                        physical.len() - 1
                    }
                };
            }
            for s in 0..slot_bytes.len() {
                if slot_last[s] == t && assigned[s] != usize::MAX {
                    free.push(assigned[s]);
                }
            }
        }
        if let Some(bytes) = slot_bytes.iter().find(|&&b| b as u64 > max_binding) {
            return Err(RunError::Input(format!(
                "these inputs need a {bytes}-byte scratch buffer; the GPU binds at most {max_binding} bytes (send fewer rows per call)"
            )));
        }

        // Dispatches.
        let slot = |v: usize| -> Result<Buf, RunError> {
            match loc[v] {
                Some(Loc::Slot(s)) => Ok(Buf::Slot(assigned[s])),
                Some(Loc::Const(c)) => Ok(Buf::Const(c)),
                None => Err(RunError::Model(format!("value {v} has no storage"))),
            }
        };
        let mut dispatches = Vec::new();
        for (j, step) in g.steps.iter().enumerate() {
            let scratch: Vec<Buf> = scratch[j].iter().map(|&s| Buf::Slot(assigned[s])).collect();
            self.dispatches(step, &shapes, &slot, &scratch, &mut dispatches)
                .map_err(RunError::Input)?;
        }

        // Buffers and bind groups.
        let device = &self.ctx.device;
        let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffers: Vec<wgpu::Buffer> = physical
            .iter()
            .map(|&bytes| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("activations"),
                    size: bytes.div_ceil(4) as u64 * 4,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_DST
                        | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let mut bound = Vec::new();
        let max_groups = self.ctx.limits.max_compute_workgroups_per_dimension.max(1);
        for d in dispatches {
            if d.threads == 0 {
                continue;
            }
            let groups = u32_of(d.threads.div_ceil(WORKGROUP as usize), "the thread count")
                .map_err(RunError::Input)?;
            let x = groups.min(max_groups);
            let y = groups.div_ceil(x);
            if y > max_groups {
                return Err(RunError::Input(format!(
                    "{} threads exceed the GPU's dispatch limit",
                    d.threads
                )));
            }
            let params = storage(device, "params", bytemuck::cast_slice(&d.params));
            let pipeline = self.ctx.pipeline(d.kernel).map_err(RunError::Model)?;
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            }];
            for (binding, buf) in &d.bindings {
                let buffer = match *buf {
                    Buf::Slot(i) => &buffers[i],
                    Buf::Const(c) => &self.consts[c],
                    Buf::WeightBlock(w, b) => &self.weights[w].blocks[b].2,
                    Buf::WeightScale(w) => self.weights[w].scale.as_ref().unwrap_or(&self.dummy),
                    Buf::WeightBias(w) => self.weights[w].bias.as_ref().unwrap_or(&self.dummy),
                    Buf::TableBlock(t, b) => &self.tables[t].blocks[b].2,
                    Buf::TableScale(t) => {
                        self.tables[t].scale.as_ref().map_or(&self.dummy, |s| &s.0)
                    }
                };
                entries.push(wgpu::BindGroupEntry {
                    binding: *binding,
                    resource: buffer.as_entire_binding(),
                });
            }
            let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(d.kernel.name()),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            bound.push((d.kernel, group, x, y));
        }

        let inputs = g
            .input_values
            .iter()
            .map(|&v| match loc[v] {
                Some(Loc::Slot(s)) if slot_bytes[s] > 0 => Some(assigned[s]),
                _ => None,
            })
            .collect();
        let mut outputs = Vec::new();
        let mut offset = 0u64;
        for &v in &g.output_values {
            let place = match loc[v] {
                Some(Loc::Slot(s)) => Loc::Slot(assigned[s]),
                Some(other) => other,
                None => return Err(RunError::Model(format!("output value {v} has no storage"))),
            };
            outputs.push((place, shapes[v].clone(), offset));
            offset += (product(&shapes[v]) as u64 * 4).div_ceil(8) * 8;
        }
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back"),
            size: offset.max(8),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(invalid.pop()) {
            return Err(RunError::Model(format!(
                "preparing these shapes on the GPU: {e}"
            )));
        }
        if let Some(e) = pollster::block_on(out_of_memory.pop()) {
            return Err(RunError::Model(format!("GPU memory for these shapes: {e}")));
        }
        Ok(Plan {
            buffers,
            dispatches: bound,
            inputs,
            outputs,
            readback,
        })
    }

    fn scratch_bytes(&self, step: &Step, shapes: &[Vec<usize>]) -> Vec<usize> {
        match step {
            Step::MatMul { a, weight, .. } if self.uses_dot4(*weight) => {
                let w = &self.weights[*weight];
                let m = product(&shapes[*a]) / w.k.max(1);
                vec![m * w.k4 * 4, m * 4]
            }
            Step::Reduce { x, axes, .. } => {
                let runs = reduce_runs(&shapes[*x], axes.as_deref()).unwrap_or_default();
                // Every run but the last writes an intermediate.
                let mut shape = shapes[*x].clone();
                let mut out = Vec::new();
                for (i, (start, len)) in runs.iter().enumerate() {
                    for d in &mut shape[*start..start + len] {
                        *d = 1;
                    }
                    if i + 1 < runs.len() {
                        out.push(product(&shape) * 4);
                    }
                }
                out
            }
            _ => Vec::new(),
        }
    }

    fn uses_dot4(&self, weight: usize) -> bool {
        let w = &self.weights[weight];
        self.ctx.summary.dot4 && w.q8 && w.k <= DOT4_MAX_K
    }

    fn infer(&self, step: &Step, shapes: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        Ok(match step {
            Step::MatMul { a, weight, .. } => {
                let w = &self.weights[*weight];
                let s = &shapes[*a];
                match s.last() {
                    Some(&k) if k == w.k => {
                        let mut out = s.clone();
                        if let Some(last) = out.last_mut() {
                            *last = w.n;
                        }
                        out
                    }
                    _ => return Err(format!("a matrix product takes [..., {}], got {s:?}", w.k)),
                }
            }
            Step::Binary { a, b, .. } => broadcast(&shapes[*a], &shapes[*b])?,
            Step::Unary { x, .. } => shapes[*x].clone(),
            Step::Softmax { x, axis, .. } => {
                normalize_axis(*axis, shapes[*x].len())?;
                shapes[*x].clone()
            }
            Step::Gather {
                data, ids, axis, ..
            } => {
                let dims = match data {
                    GatherSource::Table(t) => &self.tables[*t].dims,
                    GatherSource::Value(v) => &shapes[*v],
                };
                let a = normalize_axis(*axis, dims.len())?;
                let mut out = dims[..a].to_vec();
                out.extend(&shapes[*ids]);
                out.extend(&dims[a + 1..]);
                out
            }
            Step::Reduce {
                x, axes, keep_dims, ..
            } => {
                let s = &shapes[*x];
                let axes = reduce_axes(s.len(), axes.as_deref())?;
                s.iter()
                    .enumerate()
                    .filter_map(|(i, &d)| {
                        if !axes.contains(&i) {
                            Some(d)
                        } else if *keep_dims {
                            Some(1)
                        } else {
                            None
                        }
                    })
                    .collect()
            }
            Step::Concat { xs, axis, .. } => {
                let first = &shapes[xs[0]];
                let a = normalize_axis(*axis, first.len())?;
                let mut out = first.clone();
                out[a] = 0;
                for &x in xs {
                    let s = &shapes[x];
                    let same = s.len() == first.len()
                        && s.iter()
                            .zip(first)
                            .enumerate()
                            .all(|(i, (p, q))| i == a || p == q);
                    if !same {
                        return Err(format!(
                            "Concat on axis {a}: shapes {first:?} and {s:?} do not fit"
                        ));
                    }
                    out[a] = out[a].saturating_add(s[a]);
                }
                out
            }
            Step::Transpose { x, perm, .. } => {
                let s = &shapes[*x];
                let perm = permutation(perm.as_deref(), s.len())?;
                perm.iter().map(|&p| s[p]).collect()
            }
            Step::View { x, view, .. } => view_shape(view, &shapes[*x])?,
        })
    }

    fn dispatches(
        &self,
        step: &Step,
        shapes: &[Vec<usize>],
        slot: &dyn Fn(usize) -> Result<Buf, RunError>,
        scratch: &[Buf],
        out: &mut Vec<Dispatch>,
    ) -> Result<(), String> {
        let at = |v: usize| slot(v).map_err(|e| e.to_string());
        match step {
            Step::MatMul {
                a,
                weight,
                act,
                out: y,
            } => {
                let w = &self.weights[*weight];
                let m = product(&shapes[*a]) / w.k.max(1);
                let (mu, ku, nu, k4) = (
                    u32_of(m, "rows")?,
                    u32_of(w.k, "K")?,
                    u32_of(w.n, "N")?,
                    u32_of(w.k4, "K")?,
                );
                let has_bias = u32::from(w.bias.is_some());
                let dot4 = self.uses_dot4(*weight);
                if dot4 {
                    out.push(Dispatch {
                        kernel: Kernel::QuantizeRows,
                        params: vec![mu, ku, k4],
                        bindings: vec![(1, at(*a)?), (2, scratch[0]), (3, scratch[1])],
                        threads: m,
                    });
                }
                for (b, (n0, nb, _)) in w.blocks.iter().enumerate() {
                    let params = vec![
                        mu,
                        ku,
                        u32_of(*nb, "N")?,
                        u32_of(*n0, "N")?,
                        nu,
                        *act,
                        has_bias,
                        k4,
                    ];
                    let (kernel, bindings) = if dot4 {
                        (
                            Kernel::MatMulDot4,
                            vec![
                                (1, scratch[0]),
                                (2, Buf::WeightBlock(*weight, b)),
                                (3, Buf::WeightBias(*weight)),
                                (4, at(*y)?),
                                (5, Buf::WeightScale(*weight)),
                                (6, scratch[1]),
                            ],
                        )
                    } else if w.q8 {
                        (
                            Kernel::MatMulQ8,
                            vec![
                                (1, at(*a)?),
                                (2, Buf::WeightBlock(*weight, b)),
                                (3, Buf::WeightBias(*weight)),
                                (4, at(*y)?),
                                (5, Buf::WeightScale(*weight)),
                            ],
                        )
                    } else {
                        (
                            Kernel::MatMulF32,
                            vec![
                                (1, at(*a)?),
                                (2, Buf::WeightBlock(*weight, b)),
                                (3, Buf::WeightBias(*weight)),
                                (4, at(*y)?),
                            ],
                        )
                    };
                    out.push(Dispatch {
                        kernel,
                        params,
                        bindings,
                        threads: m * nb,
                    });
                }
            }
            Step::Binary { op, a, b, out: y } => {
                let shape = &shapes[*y];
                let rank = shape.len();
                if rank > MAX_RANK {
                    return Err(format!(
                        "rank {rank} broadcasts are not supported on the GPU"
                    ));
                }
                let mut params = vec![u32_of(product(shape), "elements")?, *op, rank as u32];
                let mut dims = [1u32; MAX_RANK];
                for (i, &d) in shape.iter().enumerate() {
                    dims[i] = u32_of(d, "a dimension")?;
                }
                params.extend(dims);
                params.extend(broadcast_strides(&shapes[*a], shape));
                params.extend(broadcast_strides(&shapes[*b], shape));
                out.push(Dispatch {
                    kernel: Kernel::Binary,
                    params,
                    bindings: vec![(1, at(*a)?), (2, at(*b)?), (3, at(*y)?)],
                    threads: product(shape),
                });
            }
            Step::Unary { op, x, out: y } => {
                let n = product(&shapes[*x]);
                out.push(Dispatch {
                    kernel: Kernel::Unary,
                    params: vec![u32_of(n, "elements")?, *op],
                    bindings: vec![(1, at(*x)?), (2, at(*y)?)],
                    threads: n,
                });
            }
            Step::Softmax {
                x,
                axis,
                legacy,
                out: y,
            } => {
                let s = &shapes[*x];
                let a = normalize_axis(*axis, s.len())?;
                let (len, inner) = if *legacy {
                    (product(&s[a..]), 1)
                } else {
                    (s[a], product(&s[a + 1..]))
                };
                let rows = product(&s[..a]) * inner;
                out.push(Dispatch {
                    kernel: Kernel::Softmax,
                    params: vec![
                        u32_of(rows, "rows")?,
                        u32_of(len, "axis")?,
                        u32_of(inner, "inner")?,
                    ],
                    bindings: vec![(1, at(*x)?), (2, at(*y)?)],
                    threads: if len == 0 { 0 } else { rows },
                });
            }
            Step::Reduce {
                x,
                axes,
                mean,
                out: y,
                ..
            } => {
                let runs = reduce_runs(&shapes[*x], axes.as_deref())?;
                let mut shape = shapes[*x].clone();
                let mut from = at(*x)?;
                if runs.is_empty() {
                    // Nothing to reduce (every axis of a scalar): a copy.
                    let n = product(&shape);
                    out.push(Dispatch {
                        kernel: Kernel::Unary,
                        params: vec![u32_of(n, "elements")?, 0],
                        bindings: vec![(1, from), (2, at(*y)?)],
                        threads: n,
                    });
                }
                for (i, &(start, len)) in runs.iter().enumerate() {
                    let outer = product(&shape[..start]);
                    let r = product(&shape[start..start + len]);
                    let inner = product(&shape[start + len..]);
                    let to = if i + 1 == runs.len() {
                        at(*y)?
                    } else {
                        scratch[i]
                    };
                    out.push(Dispatch {
                        kernel: Kernel::Reduce,
                        params: vec![
                            u32_of(outer * inner, "rows")?,
                            u32_of(r, "axis")?,
                            u32_of(inner, "inner")?,
                            u32::from(*mean),
                        ],
                        bindings: vec![(1, from), (2, to)],
                        threads: outer * inner,
                    });
                    for d in &mut shape[start..start + len] {
                        *d = 1;
                    }
                    from = to;
                }
            }
            Step::Gather {
                data,
                ids,
                axis,
                out: y,
            } => {
                let GatherSource::Table(t) = data else {
                    return Err("gathering from a computed tensor".into());
                };
                let table = &self.tables[*t];
                let a = normalize_axis(*axis, table.dims.len())?;
                let outer = product(&table.dims[..a]);
                let rows = table.dims[a];
                let inner = product(&table.dims[a + 1..]);
                let n_ids = product(&shapes[*ids]);
                let count = outer * n_ids * inner;
                let (stride, channels) = table.scale.as_ref().map_or((1, 1), |s| (s.1, s.2));
                for (b, (r0, rc, _)) in table.blocks.iter().enumerate() {
                    // A split table is split along axis 0, which is the gathered axis.
                    let (r0, rc) = if table.blocks.len() == 1 {
                        (0, rows)
                    } else {
                        (*r0, *rc)
                    };
                    let params = vec![
                        u32_of(count, "elements")?,
                        u32_of(n_ids, "ids")?,
                        u32_of(inner, "inner")?,
                        u32_of(rows, "rows")?,
                        u32_of(r0, "rows")?,
                        u32_of(rc, "rows")?,
                        u32_of(stride, "stride")?,
                        u32_of(channels, "channels")?,
                    ];
                    let mut bindings =
                        vec![(1, Buf::TableBlock(*t, b)), (2, at(*ids)?), (3, at(*y)?)];
                    let kernel = if table.scale.is_some() {
                        bindings.push((4, Buf::TableScale(*t)));
                        Kernel::GatherQ8
                    } else {
                        Kernel::GatherF32
                    };
                    out.push(Dispatch {
                        kernel,
                        params,
                        bindings,
                        threads: count,
                    });
                }
            }
            Step::Concat { xs, axis, out: y } => {
                let shape = &shapes[*y];
                let a = normalize_axis(*axis, shape.len())?;
                let outer = product(&shape[..a]);
                let inner = product(&shape[a + 1..]);
                let mut offset = 0;
                for &x in xs {
                    let chunk = shapes[x][a] * inner;
                    out.push(Dispatch {
                        kernel: Kernel::Concat,
                        params: vec![
                            u32_of(outer * chunk, "elements")?,
                            u32_of(chunk.max(1), "chunk")?,
                            u32_of(shape[a] * inner, "row")?,
                            u32_of(offset, "offset")?,
                        ],
                        bindings: vec![(1, at(x)?), (2, at(*y)?)],
                        threads: outer * chunk,
                    });
                    offset += chunk;
                }
            }
            Step::Transpose { x, perm, out: y } => {
                let s = &shapes[*x];
                if s.len() > MAX_RANK {
                    return Err(format!(
                        "rank {} transposes are not supported on the GPU",
                        s.len()
                    ));
                }
                let perm = permutation(perm.as_deref(), s.len())?;
                let mut strides = vec![1usize; s.len()];
                for i in (0..s.len().saturating_sub(1)).rev() {
                    strides[i] = strides[i + 1] * s[i + 1];
                }
                let shape = &shapes[*y];
                let mut params = vec![u32_of(product(shape), "elements")?, s.len() as u32];
                let mut dims = [1u32; MAX_RANK];
                let mut st = [0u32; MAX_RANK];
                for (i, &p) in perm.iter().enumerate() {
                    dims[i] = u32_of(shape[i], "a dimension")?;
                    st[i] = u32_of(strides[p], "a stride")?;
                }
                params.extend(dims);
                params.extend(st);
                out.push(Dispatch {
                    kernel: Kernel::Strided,
                    params,
                    bindings: vec![(1, at(*x)?), (2, at(*y)?)],
                    threads: product(shape),
                });
            }
            Step::View { .. } => {}
        }
        Ok(())
    }

    fn execute(
        &self,
        plan: &Plan,
        data: &[std::borrow::Cow<'_, [u8]>],
    ) -> Result<Vec<Vec<u8>>, RunError> {
        if let Some(lost) = self.ctx.lost() {
            return Err(RunError::Model(lost));
        }
        let device = &self.ctx.device;
        let queue = &self.ctx.queue;
        // Scopes catch this call's errors only (they are per thread), not another model's.
        let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
        for (buffer, bytes) in plan.inputs.iter().zip(data) {
            if let Some(b) = buffer {
                queue.write_buffer(&plan.buffers[*b], 0, bytes);
            }
        }
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("inference"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("inference"),
                timestamp_writes: None,
            });
            for (kernel, group, x, y) in &plan.dispatches {
                let pipeline = self.ctx.pipeline(*kernel).map_err(RunError::Model)?;
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(*x, *y, 1);
            }
        }
        for (place, shape, offset) in &plan.outputs {
            let bytes = product(shape) as u64 * 4;
            if bytes == 0 {
                continue;
            }
            let source = match place {
                Loc::Slot(b) => &plan.buffers[*b],
                Loc::Const(c) => &self.consts[*c],
            };
            encoder.copy_buffer_to_buffer(source, 0, &plan.readback, *offset, bytes);
        }
        queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        plan.readback.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        let outcome = 'read: {
            if let Err(e) = device.poll(wgpu::PollType::wait_indefinitely()) {
                break 'read Err(RunError::Model(format!("waiting for the GPU: {e}")));
            }
            if let Some(e) = pollster::block_on(invalid.pop()) {
                break 'read Err(RunError::Model(format!("the GPU refused the work: {e}")));
            }
            if let Some(e) = pollster::block_on(out_of_memory.pop()) {
                break 'read Err(RunError::Model(format!("the GPU ran out of memory: {e}")));
            }
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    break 'read Err(RunError::Model(format!("reading the outputs back: {e}")));
                }
                Err(_) => {
                    break 'read Err(RunError::Model(
                        "the GPU never answered the read-back".into(),
                    ));
                }
            }
            let view = match plan.readback.get_mapped_range(..) {
                Ok(view) => view,
                Err(e) => {
                    break 'read Err(RunError::Model(format!("reading the outputs back: {e}")));
                }
            };
            Ok(plan
                .outputs
                .iter()
                .map(|(_, shape, offset)| {
                    let start = *offset as usize;
                    view[start..start + product(shape) * 4].to_vec()
                })
                .collect())
        };
        // Always: a read-back left mapped would fail every later call of this shape.
        plan.readback.unmap();
        outcome
    }

    /// Drops the prepared plan of `shapes` (after a failure, so the next call starts afresh).
    fn forget(&self, shapes: &[Vec<usize>]) {
        if let Ok(mut prepared) = self.prepared.lock() {
            prepared.shapes.retain(|(s, _, _)| s != shapes);
        }
    }
}

impl Engine for GpuModel {
    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn inputs(&self) -> &[TensorSpec] {
        &self.graph.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.graph.outputs
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let ordered = check_inputs(&self.graph.inputs, inputs)?;
        let mut shapes = Vec::with_capacity(ordered.len());
        let mut data = Vec::with_capacity(ordered.len());
        for (i, t) in ordered.iter().enumerate() {
            let shape = t
                .shape()
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    RunError::Input(format!("input {:?}: a dimension overflows", t.name()))
                })?;
            // f32 inputs go to the GPU as they are; ids are narrowed to i32.
            let bytes = match self.graph.values[self.graph.input_values[i]].dtype {
                DType::F32 => std::borrow::Cow::Borrowed(t.data()),
                DType::I32 => std::borrow::Cow::Owned(ids_to_i32(t, &self.graph.id_bounds[i])?),
            };
            shapes.push(shape);
            data.push(bytes);
        }
        let plan = self.plan_for(&shapes)?;
        // One call at a time per model: the plan's buffers are shared by calls of one shape.
        let outputs = {
            let _guard = self
                .prepared
                .lock()
                .map_err(|_| RunError::Model("an earlier call failed while running".into()))?;
            self.execute(&plan, &data)
        };
        let outputs = match outputs {
            Ok(outputs) => outputs,
            Err(e) => {
                self.forget(&shapes);
                return Err(e);
            }
        };
        outputs
            .into_iter()
            .zip(&plan.outputs)
            .zip(&self.graph.outputs)
            .map(|((bytes, (_, shape, _)), spec)| {
                let shape = shape.iter().map(|&d| d as u64).collect();
                Tensor::from_bytes(spec.name.clone(), DataType::Fp32, shape, bytes)
                    .map_err(|e| RunError::Model(e.to_string()))
            })
            .collect()
    }
}

/// Integer ids as i32, each within every table it indexes (negative ids count from the end).
fn ids_to_i32(t: &Tensor, bounds: &[usize]) -> Result<Vec<u8>, RunError> {
    let values: Vec<i64> = match t.datatype() {
        DataType::Int64 => t.to_values::<i64>(),
        DataType::Int32 => t
            .to_values::<i32>()
            .map(|v| v.into_iter().map(i64::from).collect()),
        other => {
            return Err(RunError::Input(format!(
                "input {:?}: {other} ids",
                t.name()
            )));
        }
    }
    .map_err(|e| RunError::Input(e.to_string()))?;
    let limit = bounds.iter().copied().min().map(|b| b as i64);
    let mut out = Vec::with_capacity(values.len() * 4);
    for (i, &v) in values.iter().enumerate() {
        if let Some(limit) = limit {
            if v < -limit || v >= limit {
                return Err(RunError::Input(format!(
                    "input {:?}: id {v} (element {i}) is out of range: the table has {limit} rows",
                    t.name()
                )));
            }
        }
        let v = i32::try_from(v).map_err(|_| {
            RunError::Input(format!(
                "input {:?}: id {v} (element {i}) does not fit 32 bits, which the GPU uses",
                t.name()
            ))
        })?;
        out.extend(v.to_le_bytes());
    }
    Ok(out)
}

fn normalize_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank {
                a[i + a.len() - rank]
            } else {
                1
            };
            let db = if i + b.len() >= rank {
                b[i + b.len() - rank]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
            }
        })
        .collect()
}

/// Strides of `operand` read as `shape` (0 along broadcast dimensions), padded to MAX_RANK.
fn broadcast_strides(operand: &[usize], shape: &[usize]) -> [u32; MAX_RANK] {
    let mut out = [0u32; MAX_RANK];
    let offset = shape.len() - operand.len();
    let mut stride = 1usize;
    for i in (0..operand.len()).rev() {
        if operand[i] != 1 || shape[i + offset] == 1 {
            out[i + offset] = if operand[i] == 1 { 0 } else { stride as u32 };
        }
        stride *= operand[i];
    }
    out
}

fn reduce_axes(rank: usize, axes: Option<&[i64]>) -> Result<Vec<usize>, String> {
    let mut out = match axes {
        None => (0..rank).collect(),
        Some(a) => a
            .iter()
            .map(|&x| normalize_axis(x, rank))
            .collect::<Result<Vec<_>, _>>()?,
    };
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The reduced axes as runs of consecutive axes: (first, length).
fn reduce_runs(shape: &[usize], axes: Option<&[i64]>) -> Result<Vec<(usize, usize)>, String> {
    let axes = reduce_axes(shape.len(), axes)?;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for a in axes {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == a => *len += 1,
            _ => runs.push((a, 1)),
        }
    }
    Ok(runs)
}

fn permutation(perm: Option<&[i64]>, rank: usize) -> Result<Vec<usize>, String> {
    let perm: Vec<usize> = match perm {
        None => (0..rank).rev().collect(),
        Some(p) => p
            .iter()
            .map(|&x| normalize_axis(x, rank))
            .collect::<Result<_, _>>()?,
    };
    let mut seen = perm.clone();
    seen.sort_unstable();
    if seen != (0..rank).collect::<Vec<_>>() {
        return Err(format!("{perm:?} is not a permutation of {rank} axes"));
    }
    Ok(perm)
}

fn view_shape(view: &View, s: &[usize]) -> Result<Vec<usize>, String> {
    let count = product(s);
    Ok(match view {
        View::Identity => s.to_vec(),
        View::Reshape { shape, allow_zero } => {
            let mut out = Vec::with_capacity(shape.len());
            let mut infer = None;
            for (i, &d) in shape.iter().enumerate() {
                match d {
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        out.push(1);
                    }
                    0 if !allow_zero => {
                        out.push(*s.get(i).ok_or("Reshape: 0 beyond the input's rank")?)
                    }
                    d if d >= 0 => out.push(d as usize),
                    _ => return Err(format!("Reshape: bad target {shape:?}")),
                }
            }
            let known = product(&out);
            if let Some(i) = infer {
                if known == 0 || count % known != 0 {
                    return Err(format!("cannot reshape {s:?} to {shape:?}"));
                }
                out[i] = count / known;
            }
            if product(&out) != count {
                return Err(format!("cannot reshape {s:?} to {shape:?}"));
            }
            out
        }
        View::Flatten { axis } => {
            let r = s.len() as i64;
            let a = if *axis < 0 { axis + r } else { *axis };
            if !(0..=r).contains(&a) {
                return Err(format!("Flatten: axis {axis} for rank {r}"));
            }
            let a = a as usize;
            vec![product(&s[..a]), product(&s[a..])]
        }
        View::Squeeze { axes } => match axes {
            None => s.iter().copied().filter(|&d| d != 1).collect(),
            Some(axes) => {
                let axes = reduce_axes(s.len(), Some(axes))?;
                if let Some(&a) = axes.iter().find(|&&a| s[a] != 1) {
                    return Err(format!("Squeeze: axis {a} of {s:?} is not 1"));
                }
                s.iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, &d)| d)
                    .collect()
            }
        },
        View::Unsqueeze { axes } => {
            let rank = s.len() + axes.len();
            let axes = reduce_axes(rank, Some(axes))?;
            let mut rest = s.iter();
            (0..rank)
                .map(|i| {
                    if axes.contains(&i) {
                        1
                    } else {
                        rest.next().copied().unwrap_or(1)
                    }
                })
                .collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[4, 1, 3], &[5, 1]), Ok(vec![4, 5, 3]));
        assert!(broadcast(&[2, 3], &[4, 3]).is_err());
        assert_eq!(broadcast_strides(&[5, 1], &[4, 5, 3]), [0, 1, 0, 0, 0, 0]);
        assert_eq!(
            broadcast_strides(&[4, 5, 3], &[4, 5, 3]),
            [15, 3, 1, 0, 0, 0]
        );
    }

    #[test]
    fn views_compute_their_shapes() {
        let r = |shape: &[i64]| View::Reshape {
            shape: shape.to_vec(),
            allow_zero: false,
        };
        assert_eq!(view_shape(&r(&[0, -1]), &[2, 3, 4]), Ok(vec![2, 12]));
        assert!(view_shape(&r(&[5, -1]), &[2, 3]).is_err());
        assert_eq!(
            view_shape(&View::Flatten { axis: 1 }, &[2, 3, 4]),
            Ok(vec![2, 12])
        );
        assert_eq!(
            view_shape(
                &View::Squeeze {
                    axes: Some(vec![1])
                },
                &[2, 1, 4]
            ),
            Ok(vec![2, 4])
        );
        assert!(
            view_shape(
                &View::Squeeze {
                    axes: Some(vec![0])
                },
                &[2, 1]
            )
            .is_err()
        );
        assert_eq!(
            view_shape(&View::Unsqueeze { axes: vec![0, -1] }, &[3]),
            Ok(vec![1, 3, 1])
        );
    }

    #[test]
    fn reductions_group_consecutive_axes() {
        assert_eq!(reduce_runs(&[2, 3, 4, 5], Some(&[1, 2])), Ok(vec![(1, 2)]));
        assert_eq!(
            reduce_runs(&[2, 3, 4, 5], Some(&[0, -1])),
            Ok(vec![(0, 1), (3, 1)])
        );
        assert_eq!(reduce_runs(&[2, 3], None), Ok(vec![(0, 2)]));
    }

    #[test]
    fn ids_are_range_checked_and_narrowed() {
        let t = Tensor::from_values("ids", vec![3], &[0i64, 9, -10]).unwrap();
        let bytes = ids_to_i32(&t, &[10]).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, i32>(&bytes), &[0, 9, -10]);
        let t = Tensor::from_values("ids", vec![1], &[10i64]).unwrap();
        let e = ids_to_i32(&t, &[10]).unwrap_err().to_string();
        assert!(e.contains("id 10") && e.contains("10 rows"), "{e}");
        let t = Tensor::from_values("ids", vec![1], &[1i64 << 40]).unwrap();
        assert!(
            ids_to_i32(&t, &[])
                .unwrap_err()
                .to_string()
                .contains("32 bits")
        );
    }
}
