//! The model's constants on the GPU: weights, tables and small operands uploaded once at load,
//! split in blocks that fit a storage binding, and found again by the [`Binding`]s the lowering
//! names. The host copies are dropped once uploaded; the graph keeps only their shapes.
//!
//! Kernels read constant operands and f32 tables as activations, so those are held in the
//! context's [`Precision`]; weights, biases and int8 tables with their scales keep theirs.

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::graph::{Graph, TableData, WeightData};
use crate::import::ImportError;
use crate::kernels::Precision;
use crate::lower::{Binding, Lowering, TableLayout, WeightLayout};
use crate::shape::product;

/// A weight's buffers, in its layout's order.
struct WeightBuffers {
    blocks: Vec<wgpu::Buffer>,
    scale: Option<wgpu::Buffer>,
    bias: Option<wgpu::Buffer>,
}

/// A table's buffers, in its layout's order.
struct TableBuffers {
    blocks: Vec<wgpu::Buffer>,
    scale: Option<wgpu::Buffer>,
}

/// Everything a model keeps on the GPU between calls.
pub(crate) struct Uploaded {
    consts: Vec<wgpu::Buffer>,
    weights: Vec<WeightBuffers>,
    tables: Vec<TableBuffers>,
    weight_layouts: Vec<WeightLayout>,
    table_layouts: Vec<TableLayout>,
    /// Bound where a kernel's binding has nothing to read (no bias, no scale).
    unused: wgpu::Buffer,
    precision: Precision,
}

/// A storage buffer holding `bytes` (at least 4: a binding cannot be empty).
pub(crate) fn storage(device: &wgpu::Device, label: &str, bytes: &[u8]) -> wgpu::Buffer {
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

/// int8 packed four to a word, little end first, padded to whole words.
fn pack_i8(q: &[i8]) -> Vec<u8> {
    let mut bytes: Vec<u8> = q.iter().map(|&v| v as u8).collect();
    bytes.resize(q.len().div_ceil(4) * 4, 0);
    bytes
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Uploads `graph`'s constants, dropping their host copies. A constant too large for one
/// binding that cannot be split is [`ImportError::Unsupported`] (the model runs on tract); a
/// GPU that runs out of memory is [`ImportError::Device`].
pub(crate) fn upload(ctx: &GpuContext, graph: &mut Graph) -> Result<Uploaded, ImportError> {
    let device = &ctx.device;
    let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let block_bytes = usize::try_from(ctx.weight_block_bytes).unwrap_or(usize::MAX);
    let max_binding = usize::try_from(ctx.max_binding()).unwrap_or(usize::MAX);
    let precision = ctx.precision;
    let act = precision.bytes();
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
            if c.data.len() * act > max_binding {
                return Err(too_big(&format!("constant {i}"), c.data.len() * act));
            }
            Ok(storage(
                device,
                "constant",
                &precision.encode(c.data.iter().copied()),
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut weights = Vec::new();
    let mut weight_layouts = Vec::new();
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
        let mut layout = Vec::new();
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
            layout.push((n0, nb));
            blocks.push(storage(device, "weight", &bytes));
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
        weight_layouts.push(WeightLayout {
            k: w.k,
            n: w.n,
            k4,
            q8,
            blocks: layout,
            has_bias: bias.is_some(),
        });
        weights.push(WeightBuffers {
            blocks,
            scale,
            bias,
        });
        // The host copy is not needed any more.
        w.data = WeightData::F32(Vec::new());
        w.bias = None;
    }

    let mut tables = Vec::new();
    let mut table_layouts = Vec::new();
    for (i, t) in graph.tables.iter_mut().enumerate() {
        let rows = t.dims.first().copied().unwrap_or(1);
        let inner = product(&t.dims[1.min(t.dims.len())..]);
        let (row_bytes, total) = match &t.data {
            TableData::Q8 { q, .. } => (inner, q.len().div_ceil(4) * 4),
            TableData::F32(v) => (inner * act, v.len() * act),
        };
        let mut layout = Vec::new();
        let mut blocks = Vec::new();
        if total <= block_bytes {
            let bytes = match &t.data {
                TableData::Q8 { q, .. } => pack_i8(q),
                TableData::F32(v) => precision.encode(v.iter().copied()),
            };
            layout.push((0, rows));
            blocks.push(storage(device, "table", &bytes));
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
                    TableData::F32(v) => {
                        precision.encode(v[r0 * inner..(r0 + rc) * inner].iter().copied())
                    }
                };
                layout.push((r0, rc));
                blocks.push(storage(device, "table", &bytes));
                r0 += rc;
            }
        }
        let (scale, scale_layout) = match &t.data {
            TableData::Q8 { scale, axis, .. } => (
                Some(storage(device, "table scale", &f32_bytes(scale))),
                Some((product(&t.dims[axis + 1..]).max(1), t.dims[*axis].max(1))),
            ),
            TableData::F32(_) => (None, None),
        };
        table_layouts.push(TableLayout {
            dims: t.dims.clone(),
            blocks: layout,
            scale: scale_layout,
        });
        tables.push(TableBuffers { blocks, scale });
        t.data = TableData::F32(Vec::new());
    }
    graph.consts.iter_mut().for_each(|c| c.data = Vec::new());
    let unused = storage(device, "unused", &[0; 4]);
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(ImportError::Device(format!("uploading the weights: {e}")));
    }
    Ok(Uploaded {
        consts,
        weights,
        tables,
        weight_layouts,
        table_layouts,
        unused,
        precision,
    })
}

impl Uploaded {
    /// What the lowering needs to know of the uploaded constants.
    pub(crate) fn lowering(&self, dot4: bool) -> Lowering<'_> {
        Lowering {
            weights: &self.weight_layouts,
            tables: &self.table_layouts,
            dot4,
            precision: self.precision,
        }
    }

    /// The buffer `binding` names, activations taken from `activations`; `None` when it names
    /// nothing that exists (a lowering fault).
    pub(crate) fn buffer<'a>(
        &'a self,
        binding: Binding,
        activations: &'a [wgpu::Buffer],
    ) -> Option<&'a wgpu::Buffer> {
        Some(match binding {
            Binding::Activation(i) => activations.get(i)?,
            Binding::Const(c) => self.consts.get(c)?,
            Binding::WeightBlock(w, b) => self.weights.get(w)?.blocks.get(b)?,
            Binding::WeightScale(w) => self.weights.get(w)?.scale.as_ref().unwrap_or(&self.unused),
            Binding::WeightBias(w) => self.weights.get(w)?.bias.as_ref().unwrap_or(&self.unused),
            Binding::TableBlock(t, b) => self.tables.get(t)?.blocks.get(b)?,
            Binding::TableScale(t) => self.tables.get(t)?.scale.as_ref().unwrap_or(&self.unused),
        })
    }

    /// Bytes of weights, tables and constants held on the GPU.
    pub(crate) fn bytes(&self) -> u64 {
        let w: u64 = self
            .weights
            .iter()
            .flat_map(|w| w.blocks.iter().map(wgpu::Buffer::size))
            .sum();
        let t: u64 = self
            .tables
            .iter()
            .flat_map(|t| t.blocks.iter().map(wgpu::Buffer::size))
            .sum();
        w + t + self.consts.iter().map(wgpu::Buffer::size).sum::<u64>()
    }
}
