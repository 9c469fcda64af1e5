//! A model on the GPU and how a call runs: the stages in order at load (import, fuse, upload),
//! and per input shape a prepared plan (shapes, memory, lowering, then the buffers and bind
//! groups), kept in a [`ShapePlans`] cache, so a call writes its inputs, submits once and reads
//! back.
//!
//! Errors say whose fault a failed call is: the inputs' ([`RunError::Input`]), the model's
//! ([`RunError::Model`]) or the device's ([`RunError::Device`]: out of memory, lost, refusing
//! the work, failing the read-back, or a lock poisoned by an earlier failed call).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use outpost_runtime::engine::{Engine, RunError, check_inputs};
use outpost_runtime::plans::ShapePlans;
use outpost_shared::{DataType, Tensor, TensorSpec};

use crate::context::{AdapterSummary, GpuContext};
use crate::graph::{DType, Graph, HostData, Step};
use crate::import::{self, ImportError};
use crate::kernels::{Kernel, Precision};
use crate::memory::{Place, element_bytes, plan_memory};
use crate::shape::{infer_all, product};
use crate::upload::{Uploaded, storage, upload};
use crate::{fuse, lower};

/// Input shapes that keep their prepared plans (least recently used makes room).
const PREPARED_SHAPES: usize = 4;

/// Plans by the shapes of the model's inputs (a failed call drops its shape's plan).
type Plans = ShapePlans<Vec<Vec<usize>>, Arc<Plan>>;

/// A model running on a [`GpuContext`].
pub struct GpuModel {
    ctx: Arc<GpuContext>,
    graph: Graph,
    /// Per input: the largest id magnitude a call may send when the GPU computes with the
    /// input's ids as numbers (exact integers only, as the activations hold them).
    numeric_ids: Vec<Option<i64>>,
    uploaded: Uploaded,
    /// Also held for the length of a call: one call at a time per model, since a plan's
    /// buffers are shared by every call of its shape.
    plans: Mutex<Plans>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("adapter", &self.ctx.summary.name)
            .field("steps", &self.graph.steps.len())
            .finish_non_exhaustive()
    }
}

/// A dispatch with its bind group, ready to record.
struct BoundDispatch {
    kernel: Kernel,
    group: wgpu::BindGroup,
    /// Workgroups along x and y.
    grid: (u32, u32),
}

/// Where an output is read back from.
struct PlannedOutput {
    place: Place,
    shape: Vec<usize>,
    /// Its offset in the read-back buffer.
    offset: u64,
    /// Its bytes on the GPU.
    bytes: u64,
    /// Activations (widened to f32 when held as f16) rather than ids.
    float: bool,
}

/// Everything one input shape needs.
struct Plan {
    buffers: Vec<wgpu::Buffer>,
    dispatches: Vec<BoundDispatch>,
    /// Per model input: its buffer (None when it has no elements).
    inputs: Vec<Option<usize>>,
    /// Host values the GPU reads, folded for this shape: (buffer, bytes), written with the
    /// inputs (their buffers are reused once read, like any other).
    uploads: Vec<(usize, Vec<u8>)>,
    outputs: Vec<PlannedOutput>,
    readback: wgpu::Buffer,
}

impl GpuModel {
    /// Imports `bytes` and uploads the weights. [`ImportError::Unsupported`] names the op that
    /// keeps the model off the GPU.
    pub fn load(bytes: &[u8], ctx: Arc<GpuContext>) -> Result<Self, ImportError> {
        let mut graph = import::import(bytes)?;
        let exact = ctx.precision.exact_integers();
        let numeric_ids: Vec<Option<i64>> = graph
            .ids_cast_to_numbers()
            .into_iter()
            .map(|cast| cast.then_some(exact))
            .collect();
        for (i, limit) in numeric_ids.iter().enumerate() {
            // Ids a table takes that the activations cannot all hold: every call would risk it.
            if let Some(limit) = limit
                && let Some(&rows) = graph.id_bounds[i].iter().max()
                && rows as i64 > limit + 1
            {
                return Err(ImportError::Unsupported {
                    op: "Cast".into(),
                    node: graph.inputs[i].name.clone(),
                    reason: format!(
                        "the model computes with the ids of input {:?} (up to {}) as numbers, and {} activations hold integers exactly only to {limit}{}",
                        graph.inputs[i].name,
                        rows - 1,
                        if ctx.precision == Precision::F16 {
                            "f16"
                        } else {
                            "f32"
                        },
                        if ctx.precision == Precision::F16 {
                            " (gpu_activations = \"f32\" runs it on the GPU)"
                        } else {
                            ""
                        },
                    ),
                });
            }
        }
        fuse::fuse(&mut graph);
        let uploaded = upload(&ctx, &mut graph)?;
        Ok(GpuModel {
            ctx,
            graph,
            numeric_ids,
            uploaded,
            plans: Mutex::new(ShapePlans::new(PREPARED_SHAPES)),
        })
    }

    /// The adapter the model runs on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.ctx.summary
    }

    /// How the model's weights and activations are held, for status pages.
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
        let activations = if self.ctx.precision == Precision::F16 {
            "; f16 activations"
        } else {
            ""
        };
        format!("{products}{origin}{activations}")
    }

    /// Bytes of weights held on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        self.uploaded.bytes()
    }

    /// The plan for these input shapes, prepared now if there is none.
    fn plan_for(&self, shapes: &[Vec<usize>]) -> Result<Arc<Plan>, RunError> {
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| RunError::Device("an earlier call failed while preparing".into()))?;
        if let Some(plan) = plans.get(shapes) {
            return Ok(plan);
        }
        let plan = Arc::new(self.prepare(shapes)?);
        plans.insert(shapes.to_vec(), Arc::clone(&plan));
        Ok(plan)
    }

    /// Shapes, buffers and dispatches for one set of input shapes.
    fn prepare(&self, input_shapes: &[Vec<usize>]) -> Result<Plan, RunError> {
        let g = &self.graph;
        let precision = self.ctx.precision;
        let known = infer_all(g, input_shapes)?;
        let shapes = &known.shapes;
        let max_binding = self.ctx.max_binding();
        for (shape, value) in shapes.iter().zip(&g.values) {
            let bytes = product(shape).saturating_mul(element_bytes(value.dtype, precision));
            if bytes as u64 > max_binding {
                return Err(RunError::Input(format!(
                    "these inputs need a {shape:?} tensor ({bytes} bytes); the GPU binds at most {max_binding} bytes (send fewer rows per call)"
                )));
            }
        }
        let lowering = self.uploaded.lowering(self.ctx.summary.dot4);
        let memory = plan_memory(g, shapes, &lowering.scratch_bytes(g, shapes), precision);
        if memory.largest_request as u64 > max_binding {
            return Err(RunError::Input(format!(
                "these inputs need a {}-byte scratch buffer; the GPU binds at most {max_binding} bytes (send fewer rows per call)",
                memory.largest_request
            )));
        }
        let dispatches = lowering.lower(g, &known, &memory)?;
        let uploads = upload_bytes(g, &known.host, &memory.places, precision)?;

        // Buffers and bind groups.
        let device = &self.ctx.device;
        let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffers: Vec<wgpu::Buffer> = memory
            .buffer_bytes
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
        let max_groups = self.ctx.limits.max_compute_workgroups_per_dimension;
        for d in dispatches {
            let Some(grid) = lower::workgroups(d.threads, max_groups)? else {
                continue;
            };
            let params = storage(device, "params", bytemuck::cast_slice(&d.params));
            let pipeline = self.ctx.pipeline(d.kernel)?;
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            }];
            for &(binding, buf) in &d.bindings {
                let buffer = self.uploaded.buffer(buf, &buffers).ok_or_else(|| {
                    RunError::Model(format!("{}: {buf:?} names no buffer", d.kernel.name()))
                })?;
                entries.push(wgpu::BindGroupEntry {
                    binding,
                    resource: buffer.as_entire_binding(),
                });
            }
            let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(d.kernel.name()),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            bound.push(BoundDispatch {
                kernel: d.kernel,
                group,
                grid,
            });
        }

        let inputs = g
            .input_values
            .iter()
            .map(|&v| match memory.places[v] {
                Some(Place::Buffer(b)) if product(&shapes[v]) > 0 => Some(b),
                _ => None,
            })
            .collect();
        let mut outputs = Vec::new();
        let mut offset = 0u64;
        for &v in &g.output_values {
            let place = memory.places[v]
                .ok_or_else(|| RunError::Model(format!("output value {v} has no storage")))?;
            let dtype = g.values[v].dtype;
            let bytes = (product(&shapes[v]) * element_bytes(dtype, precision)) as u64;
            outputs.push(PlannedOutput {
                place,
                shape: shapes[v].clone(),
                offset,
                bytes,
                float: dtype == DType::F32,
            });
            offset += bytes.div_ceil(8) * 8;
        }
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back"),
            size: offset.max(8),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(invalid.pop()) {
            return Err(RunError::Device(format!(
                "preparing these shapes on the GPU: {e}"
            )));
        }
        if let Some(e) = pollster::block_on(out_of_memory.pop()) {
            return Err(RunError::Device(format!(
                "GPU memory for these shapes: {e}"
            )));
        }
        Ok(Plan {
            buffers,
            dispatches: bound,
            inputs,
            uploads,
            outputs,
            readback,
        })
    }

    /// Runs `plan` on the inputs' bytes (in the model's order) and reads the outputs back.
    fn execute(&self, plan: &Plan, data: &[Cow<'_, [u8]>]) -> Result<Vec<Vec<u8>>, RunError> {
        if let Some(lost) = self.ctx.lost() {
            return Err(RunError::Device(lost));
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
        for (b, bytes) in &plan.uploads {
            queue.write_buffer(&plan.buffers[*b], 0, bytes);
        }
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("inference"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("inference"),
                timestamp_writes: None,
            });
            for d in &plan.dispatches {
                pass.set_pipeline(self.ctx.pipeline(d.kernel)?);
                pass.set_bind_group(0, &d.group, &[]);
                pass.dispatch_workgroups(d.grid.0, d.grid.1, 1);
            }
        }
        for output in &plan.outputs {
            // Copies are whole words; every buffer is sized so.
            let bytes = output.bytes.div_ceil(4) * 4;
            if bytes == 0 {
                continue;
            }
            let source = match output.place {
                Place::Buffer(b) => plan.buffers.get(b),
                Place::Const(c) => self.uploaded.buffer(lower::Binding::Const(c), &[]),
            }
            .ok_or_else(|| RunError::Model("an output names no buffer".into()))?;
            encoder.copy_buffer_to_buffer(source, 0, &plan.readback, output.offset, bytes);
        }
        queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        plan.readback.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        let outcome = 'read: {
            if let Err(e) = device.poll(wgpu::PollType::wait_indefinitely()) {
                break 'read Err(RunError::Device(format!("waiting for the GPU: {e}")));
            }
            if let Some(e) = pollster::block_on(invalid.pop()) {
                break 'read Err(RunError::Device(format!("the GPU refused the work: {e}")));
            }
            if let Some(e) = pollster::block_on(out_of_memory.pop()) {
                break 'read Err(RunError::Device(format!("the GPU ran out of memory: {e}")));
            }
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    break 'read Err(RunError::Device(format!("reading the outputs back: {e}")));
                }
                Err(_) => {
                    break 'read Err(RunError::Device(
                        "the GPU never answered the read-back".into(),
                    ));
                }
            }
            let view = match plan.readback.get_mapped_range(..) {
                Ok(view) => view,
                Err(e) => {
                    break 'read Err(RunError::Device(format!("reading the outputs back: {e}")));
                }
            };
            let precision = self.ctx.precision;
            Ok(plan
                .outputs
                .iter()
                .map(|output| {
                    let at = &view[output.offset as usize..];
                    let count = product(&output.shape);
                    if output.float {
                        precision.decode(at, count)
                    } else {
                        at[..count * 4].to_vec()
                    }
                })
                .collect())
        };
        // Always: a read-back left mapped would fail every later call of this shape.
        plan.readback.unmap();
        outcome
    }

    /// Drops the plan of `shapes` after a failed call, so the next call of that shape prepares
    /// afresh.
    fn forget(&self, shapes: &[Vec<usize>]) {
        if let Ok(mut plans) = self.plans.lock() {
            plans.remove(shapes);
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
            // f32 inputs go to the GPU as they are (or as f16); ids are narrowed to i32.
            let bytes = match self.graph.values[self.graph.input_values[i]].dtype {
                DType::F32 => match self.ctx.precision {
                    Precision::F32 => Cow::Borrowed(t.data()),
                    Precision::F16 => Cow::Owned(
                        Precision::F16.encode(
                            t.data()
                                .chunks_exact(4)
                                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                        ),
                    ),
                },
                DType::I32 => Cow::Owned(ids_to_i32(
                    t,
                    &self.graph.id_bounds[i],
                    self.numeric_ids.get(i).copied().flatten(),
                )?),
                DType::Host => {
                    return Err(RunError::Model(format!(
                        "input {:?} is folded on the host",
                        t.name()
                    )));
                }
            };
            shapes.push(shape);
            data.push(bytes);
        }
        let plan = self.plan_for(&shapes)?;
        let outputs = {
            let _one_call_at_a_time = self
                .plans
                .lock()
                .map_err(|_| RunError::Device("an earlier call failed while running".into()))?;
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
            .map(|((bytes, output), spec)| {
                let shape = output.shape.iter().map(|&d| d as u64).collect();
                // f32 as it is; ids (i32 on the GPU) widened to the output's type.
                let bytes = match spec.datatype {
                    DataType::Int64 => bytes
                        .chunks_exact(4)
                        .flat_map(|b| {
                            i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()
                        })
                        .collect(),
                    _ => bytes,
                };
                Tensor::from_bytes(spec.name.clone(), spec.datatype, shape, bytes)
                    .map_err(|e| RunError::Model(e.to_string()))
            })
            .collect()
    }
}

/// The bytes of every [`Step::Upload`] with elements, by its buffer: activations as `precision`
/// holds them, or i32 ids.
fn upload_bytes(
    g: &Graph,
    host: &[Option<crate::graph::HostTensor>],
    places: &[Option<Place>],
    precision: Precision,
) -> Result<Vec<(usize, Vec<u8>)>, RunError> {
    let mut out = Vec::new();
    for step in &g.steps {
        let Step::Upload { x, dtype, out: v } = step else {
            continue;
        };
        let t = host[*x]
            .as_ref()
            .ok_or_else(|| RunError::Model(format!("value {x} was not folded on the host")))?;
        if t.data.len() == 0 {
            continue;
        }
        let Some(Place::Buffer(b)) = places[*v] else {
            return Err(RunError::Model(format!("upload {v} has no buffer")));
        };
        let bytes: Vec<u8> = match (&t.data, dtype) {
            (HostData::Int(ids), DType::I32) => {
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    let id = i32::try_from(id).map_err(|_| {
                        RunError::Input(format!(
                            "index {id} does not fit 32 bits, which the GPU uses"
                        ))
                    })?;
                    bytes.extend(id.to_le_bytes());
                }
                bytes
            }
            (HostData::Int(v), _) => precision.encode(v.iter().map(|&x| x as f32)),
            (HostData::Float(v), DType::I32) => {
                v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect()
            }
            (HostData::Float(v), _) => precision.encode(v.iter().copied()),
        };
        out.push((b, bytes));
    }
    Ok(out)
}

/// Integer ids as i32, each within every table it indexes (negative ids count from the end) and,
/// when the GPU computes with them as numbers, within `numeric` (the integers the activations
/// hold exactly).
fn ids_to_i32(t: &Tensor, bounds: &[usize], numeric: Option<i64>) -> Result<Vec<u8>, RunError> {
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
        if let Some(limit) = limit
            && (v < -limit || v >= limit)
        {
            return Err(RunError::Input(format!(
                "input {:?}: id {v} (element {i}) is out of range: the table has {limit} rows",
                t.name()
            )));
        }
        if let Some(numeric) = numeric
            && v.unsigned_abs() > numeric.unsigned_abs()
        {
            return Err(RunError::Input(format!(
                "input {:?}: {v} (element {i}) is past ±{numeric}, the largest integer the GPU's activations hold exactly, and the model computes with this input as numbers",
                t.name()
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_range_checked_and_narrowed() {
        let t = Tensor::from_values("ids", vec![3], &[0i64, 9, -10]).unwrap();
        let bytes = ids_to_i32(&t, &[10], None).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, i32>(&bytes), &[0, 9, -10]);
        let t = Tensor::from_values("ids", vec![1], &[10i64]).unwrap();
        let e = ids_to_i32(&t, &[10], None).unwrap_err().to_string();
        assert!(e.contains("id 10") && e.contains("10 rows"), "{e}");
        let t = Tensor::from_values("ids", vec![1], &[1i64 << 40]).unwrap();
        assert!(
            ids_to_i32(&t, &[], None)
                .unwrap_err()
                .to_string()
                .contains("32 bits")
        );
        // Computed with as numbers: exact integers only (f16 activations: ±2048).
        let mask = Tensor::from_values("mask", vec![3], &[0i64, 1, -2048]).unwrap();
        assert!(ids_to_i32(&mask, &[], Some(2048)).is_ok());
        let mask = Tensor::from_values("mask", vec![2], &[1i64, 2049]).unwrap();
        let e = ids_to_i32(&mask, &[], Some(2048)).unwrap_err().to_string();
        assert!(e.contains("2049 (element 1) is past ±2048"), "{e}");
    }
}
