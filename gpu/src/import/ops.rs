//! The ops that are more than one step of their inputs: matrix products with a constant
//! right operand (`MatMul`, `Gemm`, `Einsum`; weights kept int8 or quantised per output channel
//! at load), `Gather` (from a constant table, or from a computed tensor at ids known from the
//! shapes), and the views (`Reshape`, also to a shape computed from `Shape`, `Flatten`,
//! `Squeeze`, `Unsqueeze`, `Identity`, `Dropout`).

use outpost_runtime::quantize;
use tract_onnx::pb;

use super::{
    ImportError, Importer, Ref, attr_float, attr_int, attr_ints, attr_string, input_name,
    node_unsupported,
};
use crate::graph::{
    DType, GatherSource, MatWeight, Step, Table, TableData, UnaryOp, View, WeightData,
};

impl Importer {
    /// The constant right operand of a matrix product as `[n][k]`, quantised per output channel
    /// (kept int8 if it came int8; quantised here if the file has no int8 pattern), times
    /// `alpha`. `transposed`: the operand is `[n, k]` (Gemm's transB) instead of `[k, n]`.
    pub(super) fn weight(
        &mut self,
        node: &pb::NodeProto,
        i: usize,
        transposed: bool,
        alpha: f32,
    ) -> Result<usize, ImportError> {
        let name = input_name(node, i)?;
        let (dims, data) = match self.reference(name, &node.op_type)? {
            Ref::Q8 {
                dims,
                q,
                scale,
                axis,
            } if dims.len() == 2 && axis == usize::from(!transposed) => {
                let (rows, cols) = (dims[0], dims[1]);
                let (k, n) = if transposed {
                    (cols, rows)
                } else {
                    (rows, cols)
                };
                let q = if transposed {
                    q
                } else {
                    transpose(&q, rows, cols)
                };
                let scale = scale.iter().map(|s| s * alpha).collect();
                return Ok(self.add_weight(k, n, WeightData::Q8 { q, scale }));
            }
            q8 @ Ref::Q8 { .. } => q8.dequantized(),
            Ref::F32(dims, data) => (dims, data),
            Ref::Value(_) | Ref::Ints => {
                return Err(node_unsupported(
                    node,
                    format!(
                        "right operand {name:?} is computed; only constant weights run on the GPU"
                    ),
                ));
            }
        };
        if dims.len() != 2 {
            return Err(node_unsupported(
                node,
                format!("weight {name:?} has rank {}, not 2", dims.len()),
            ));
        }
        let (rows, cols) = (dims[0], dims[1]);
        let (k, n) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let nk: Vec<f32> = if transposed {
            data
        } else {
            transpose(&data, rows, cols)
        };
        let nk: Vec<f32> = nk.into_iter().map(|v| v * alpha).collect();
        if !self.quantised_file
            && nk.len() >= quantize::MIN_ELEMENTS
            && let Some((q, scale)) = quantize::quantize_matrix(&nk, n, k, 0)
        {
            self.graph.quantised_at_load = true;
            return Ok(self.add_weight(k, n, WeightData::Q8 { q, scale }));
        }
        Ok(self.add_weight(k, n, WeightData::F32(nk)))
    }

    fn add_weight(&mut self, k: usize, n: usize, data: WeightData) -> usize {
        self.graph.weights.push(MatWeight {
            k,
            n,
            data,
            bias: None,
        });
        self.graph.weights.len() - 1
    }

    pub(super) fn gemm(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        if attr_int(node, "transA").unwrap_or(0) != 0 {
            return Err(node_unsupported(node, "transA = 1".into()));
        }
        let alpha = attr_float(node, "alpha").unwrap_or(1.0);
        let beta = attr_float(node, "beta").unwrap_or(1.0);
        let trans_b = attr_int(node, "transB").unwrap_or(0) != 0;
        let a = self.f32_input(node, 0)?;
        let weight = self.weight(node, 1, trans_b, alpha)?;
        if let Some(c) = node.input.get(2).filter(|n| !n.is_empty()) {
            let n = self.graph.weights[weight].n;
            let bias = match self.reference(c, "Gemm")? {
                Ref::F32(dims, data)
                    if data.len() == n && dims.iter().rev().skip(1).all(|&d| d == 1) =>
                {
                    data
                }
                Ref::F32(_, data) if data.len() == 1 => vec![data[0]; n],
                _ => {
                    return Err(node_unsupported(
                        node,
                        format!("C {c:?} must be a constant of {n} values (a bias)"),
                    ));
                }
            };
            self.graph.weights[weight].bias = Some(bias.into_iter().map(|v| v * beta).collect());
        }
        self.push(node, DType::F32, |out| Step::MatMul {
            a,
            weight,
            act: UnaryOp::Identity,
            out,
        })
    }

    /// EinSum equations that are a matrix product with a constant: `…k,kn->…n` or `…k,nk->…n`.
    pub(super) fn einsum(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let eq: String = attr_string(node, "equation")
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let not_matmul = || {
            node_unsupported(
                node,
                format!("equation {eq:?} is not a product with a constant matrix"),
            )
        };
        let (lhs, out) = eq.split_once("->").ok_or_else(not_matmul)?;
        let (a, b) = lhs.split_once(',').ok_or_else(not_matmul)?;
        let a = a.replace("...", "*");
        let out = out.replace("...", "*");
        let b: Vec<char> = b.chars().collect();
        let k = a.chars().last().ok_or_else(not_matmul)?;
        if b.len() != 2 || b[0] == b[1] || node.input.len() != 2 {
            return Err(not_matmul());
        }
        let (n, transposed) = if b[0] == k {
            (b[1], false)
        } else if b[1] == k {
            (b[0], true)
        } else {
            return Err(not_matmul());
        };
        let prefix = &a[..a.len() - k.len_utf8()];
        let expected = format!("{prefix}{n}");
        if out != expected || prefix.contains(k) || prefix.contains(n) {
            return Err(not_matmul());
        }
        let x = self.f32_input(node, 0)?;
        let weight = self.weight(node, 1, transposed, 1.0)?;
        self.push(node, DType::F32, |out| Step::MatMul {
            a: x,
            weight,
            act: UnaryOp::Identity,
            out,
        })
    }

    pub(super) fn gather(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let axis = attr_int(node, "axis").unwrap_or(0);
        let ids_name = input_name(node, 1)?;
        // Ids from an input (checked per call against the table), or folded on the host
        // (position ids from `Range`, constant indices; checked per shape).
        let (ids, host_ids) = match self.reference(ids_name, "Gather")? {
            Ref::Value(v) if self.graph.values[v].dtype == DType::I32 => (v, false),
            Ref::Value(v) if self.graph.values[v].dtype == DType::Host => {
                (self.upload(v, DType::I32), true)
            }
            Ref::Ints => {
                let v = self.host_input(node, 1)?;
                (self.upload(v, DType::I32), true)
            }
            _ => {
                return Err(node_unsupported(
                    node,
                    format!(
                        "indices {ids_name:?} must be integer ids from an input or known from the shapes"
                    ),
                ));
            }
        };
        let data_name = input_name(node, 0)?;
        let (data, dims) = match self.reference(data_name, "Gather")? {
            Ref::Q8 {
                dims,
                q,
                scale,
                axis: qa,
            } => {
                let t = self.add_table(dims.clone(), TableData::Q8 { q, scale, axis: qa });
                (GatherSource::Table(t), Some(dims))
            }
            Ref::F32(dims, data) => {
                let quantise = !self.quantised_file
                    && dims.len() == 2
                    && axis == 0
                    && data.len() >= quantize::MIN_ELEMENTS;
                let table = match quantise
                    .then(|| quantize::quantize_matrix(&data, dims[0], dims[1], 1))
                    .flatten()
                {
                    Some((q, scale)) => {
                        self.graph.quantised_at_load = true;
                        TableData::Q8 { q, scale, axis: 1 }
                    }
                    None => TableData::F32(data),
                };
                let t = self.add_table(dims.clone(), table);
                (GatherSource::Table(t), Some(dims))
            }
            Ref::Value(v) if self.graph.values[v].dtype == DType::F32 => {
                (GatherSource::Value(v), None)
            }
            Ref::Value(v) if self.graph.values[v].dtype == DType::I32 => {
                let v = self.f32_input(node, 0)?;
                (GatherSource::Value(v), None)
            }
            _ => {
                return Err(node_unsupported(
                    node,
                    format!("data {data_name:?} must be f32"),
                ));
            }
        };
        match dims {
            Some(dims) => {
                let rank = dims.len() as i64;
                let a = if axis < 0 { axis + rank } else { axis };
                if !(0..rank).contains(&a) {
                    return Err(node_unsupported(
                        node,
                        format!("axis {axis} out of range for rank {rank}"),
                    ));
                }
                if !host_ids {
                    let Some(&root) = self.id_root.get(&ids) else {
                        return Err(node_unsupported(
                            node,
                            "indices must come from a model input".into(),
                        ));
                    };
                    self.graph.id_bounds[root].push(dims[a as usize]);
                }
                if let GatherSource::Table(t) = data {
                    self.graph.tables[t].axis = a as usize;
                }
            }
            // A computed tensor's size is known per shape only: its ids must be too.
            None if !host_ids => {
                return Err(node_unsupported(
                    node,
                    "gathering from a computed tensor with ids computed on the GPU (only ids known from the shapes)".into(),
                ));
            }
            None => {}
        }
        self.push(node, DType::F32, |out| Step::Gather {
            data,
            ids,
            axis,
            out,
        })
    }

    fn add_table(&mut self, dims: Vec<usize>, data: TableData) -> usize {
        self.graph.tables.push(Table {
            dims,
            data,
            axis: 0,
        });
        self.graph.tables.len() - 1
    }

    pub(super) fn view(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let op = node.op_type.as_str();
        if op == "Dropout" && node.output.get(1).is_some_and(|m| !m.is_empty()) {
            return Err(node_unsupported(node, "the mask output".into()));
        }
        let name = input_name(node, 0)?;
        let x = match self.reference(name, op)? {
            Ref::Value(v) if self.graph.values[v].dtype != DType::Host => v,
            _ => self.f32_input(node, 0)?,
        };
        let dtype = self.graph.values[x].dtype;
        let allow_zero = attr_int(node, "allowzero").unwrap_or(0) != 0;
        let view = match op {
            "Reshape" => {
                let shape_name = input_name(node, 1)?;
                match self.reference(shape_name, op)? {
                    Ref::Value(_) | Ref::F32(..) | Ref::Q8 { .. } => View::ReshapeTo {
                        shape: self.host_input(node, 1)?,
                        allow_zero,
                    },
                    Ref::Ints => View::Reshape {
                        shape: self
                            .const_ints(node, 1)?
                            .ok_or_else(|| node_unsupported(node, "no shape input".into()))?,
                        allow_zero,
                    },
                }
            }
            "Flatten" => View::Flatten {
                axis: attr_int(node, "axis").unwrap_or(1),
            },
            "Squeeze" => View::Squeeze {
                axes: if self.opset >= 13 {
                    self.const_ints(node, 1)?
                } else {
                    attr_ints(node, "axes")
                },
            },
            "Unsqueeze" => View::Unsqueeze {
                axes: if self.opset >= 13 {
                    self.const_ints(node, 1)?
                } else {
                    attr_ints(node, "axes")
                }
                .ok_or_else(|| node_unsupported(node, "no axes".into()))?,
            },
            _ => View::Identity,
        };
        self.push(node, dtype, |out| Step::View { x, view, out })
    }
}

/// A row-major [rows, cols] matrix as [cols, rows].
fn transpose<T: Copy>(data: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len());
    for c in 0..cols {
        for r in 0..rows {
            out.push(data[r * cols + c]);
        }
    }
    out
}
