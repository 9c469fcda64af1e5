//! The tensor ops transformer encoders add: products of two computed operands, `Where`,
//! `LayerNormalization`, `Clip`, `Expand`, `Slice`, `Split`, `Cast` between number kinds, and
//! the reductions beyond sum and mean. Bounds, shapes and indices they take are host values
//! ([`super::host`]), so a reshape target or a slice end computed from `Shape` costs nothing on
//! the GPU.

use tract_onnx::pb;

use super::host::number_kind;
use super::{
    ImportError, Importer, Ref, attr_float, attr_int, attr_ints, input_name, node_unsupported,
};
use crate::graph::{
    BinaryOp, DType, HostData, HostTensor, NumberKind, Origin, ReduceKind, Step, UnaryOp, View,
    Window,
};

impl Importer {
    /// A value with no name (an intermediate of a node that is more than one step).
    fn push_unnamed(&mut self, dtype: DType, step: impl FnOnce(usize) -> Step) -> usize {
        let out = self.graph.add_value(dtype, Origin::Step);
        self.graph.steps.push(step(out));
        out
    }

    /// Whether input `i` is a constant matrix a product can hold as a weight.
    pub(super) fn is_weight(&self, node: &pb::NodeProto, i: usize) -> bool {
        let Some(name) = node.input.get(i) else {
            return false;
        };
        self.f32s.get(name).is_some_and(|(d, _)| d.len() == 2)
            || self.q8s.get(name).is_some_and(|(d, ..)| d.len() == 2)
    }

    /// `MatMul` of two computed operands (or a constant that is not a 2-D weight).
    pub(super) fn batch_matmul(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let a = self.f32_input(node, 0)?;
        let b = self.f32_input(node, 1)?;
        self.push(node, DType::F32, |out| Step::BatchMatMul { a, b, out })
    }

    pub(super) fn where_node(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let cond = self.f32_input(node, 0)?;
        let a = self.f32_input(node, 1)?;
        let b = self.f32_input(node, 2)?;
        self.push(node, DType::F32, |out| Step::Where { cond, a, b, out })
    }

    pub(super) fn layer_norm(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        if node.output.iter().skip(1).any(|o| !o.is_empty()) {
            return Err(node_unsupported(
                node,
                "the Mean and InvStdDev outputs".into(),
            ));
        }
        let x = self.f32_input(node, 0)?;
        let scale = self.f32_input(node, 1)?;
        let bias = match node.input.get(2).filter(|n| !n.is_empty()) {
            Some(_) => Some(self.f32_input(node, 2)?),
            None => None,
        };
        let axis = attr_int(node, "axis").unwrap_or(-1);
        let epsilon = attr_float(node, "epsilon").unwrap_or(1e-5);
        self.push(node, DType::F32, |out| Step::LayerNorm {
            x,
            scale,
            bias,
            axis,
            epsilon,
            out,
        })
    }

    /// `Clip(x, min, max)`: a `Max` and a `Min` with constants (inputs from opset 11, attributes
    /// before).
    pub(super) fn clip(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let mut x = self.f32_input(node, 0)?;
        let bounds: [(Option<usize>, BinaryOp); 2] = if self.opset >= 11 {
            let mut b = [(None, BinaryOp::Max), (None, BinaryOp::Min)];
            for (i, slot) in b.iter_mut().enumerate() {
                if node.input.get(i + 1).is_some_and(|n| !n.is_empty()) {
                    slot.0 = Some(self.f32_input(node, i + 1)?);
                }
            }
            b
        } else {
            let mut bound = |name: &str, op| {
                (
                    attr_float(node, name).map(|v| {
                        self.const_value(
                            &format!(
                                "{}#{name}",
                                node.output.first().cloned().unwrap_or_default()
                            ),
                            Vec::new(),
                            vec![v],
                        )
                    }),
                    op,
                )
            };
            [bound("min", BinaryOp::Max), bound("max", BinaryOp::Min)]
        };
        let present: Vec<(usize, BinaryOp)> = bounds
            .iter()
            .filter_map(|(v, op)| v.map(|v| (v, *op)))
            .collect();
        if present.is_empty() {
            return self.push(node, DType::F32, |out| Step::View {
                x,
                view: View::Identity,
                out,
            });
        }
        for (i, &(b, op)) in present.iter().enumerate() {
            if i + 1 == present.len() {
                return self.push(node, DType::F32, |out| Step::Binary { op, a: x, b, out });
            }
            x = self.push_unnamed(DType::F32, |out| Step::Binary { op, a: x, b, out });
        }
        Ok(())
    }

    /// A GPU value of any kind (ids stay ids), for the ops that copy elements.
    fn any_input(&mut self, node: &pb::NodeProto, i: usize) -> Result<usize, ImportError> {
        let name = input_name(node, i)?;
        match self.reference(name, &node.op_type)? {
            Ref::Value(v) if self.graph.values[v].dtype == DType::I32 => Ok(v),
            _ => self.f32_input(node, i),
        }
    }

    pub(super) fn expand(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let x = self.any_input(node, 0)?;
        let shape = self.host_input(node, 1)?;
        let dtype = self.graph.values[x].dtype;
        self.push(node, dtype, |out| Step::Expand { x, shape, out })
    }

    pub(super) fn slice(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let x = self.any_input(node, 0)?;
        let dtype = self.graph.values[x].dtype;
        let window = if self.opset >= 10 {
            let optional = |im: &mut Self, i: usize| -> Result<Option<usize>, ImportError> {
                match node.input.get(i).filter(|n| !n.is_empty()) {
                    Some(_) => im.host_input(node, i).map(Some),
                    None => Ok(None),
                }
            };
            Window::Slice {
                starts: self.host_input(node, 1)?,
                ends: self.host_input(node, 2)?,
                axes: optional(self, 3)?,
                steps: optional(self, 4)?,
            }
        } else {
            let mut list = |name: &str| -> Result<Option<usize>, ImportError> {
                Ok(attr_ints(node, name).map(|v| {
                    self.host_const(HostTensor {
                        dims: vec![v.len()],
                        data: HostData::Int(v),
                    })
                }))
            };
            let starts = list("starts")?;
            let ends = list("ends")?;
            let axes = list("axes")?;
            let (Some(starts), Some(ends)) = (starts, ends) else {
                return Err(node_unsupported(node, "no starts or ends".into()));
            };
            Window::Slice {
                starts,
                ends,
                axes,
                steps: None,
            }
        };
        self.push(node, dtype, |out| Step::Window { x, window, out })
    }

    /// `Split`: one window per output.
    pub(super) fn split(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let x = self.any_input(node, 0)?;
        let dtype = self.graph.values[x].dtype;
        let axis = attr_int(node, "axis").unwrap_or(0);
        let sizes = if self.opset >= 13 {
            self.const_ints(node, 1)?
        } else {
            attr_ints(node, "split")
        };
        let parts = match (&sizes, attr_int(node, "num_outputs")) {
            (Some(s), _) => s.len(),
            (None, Some(n)) if n > 0 => n as usize,
            _ => node.output.len(),
        };
        if parts != node.output.len() {
            return Err(node_unsupported(
                node,
                format!("{parts} parts for {} outputs", node.output.len()),
            ));
        }
        for (index, name) in node.output.iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            let out = self.new_value(name, dtype, Origin::Step);
            self.graph.steps.push(Step::Window {
                x,
                window: Window::SplitPart {
                    axis,
                    sizes: sizes.clone(),
                    parts,
                    index,
                },
                out,
            });
        }
        Ok(())
    }

    /// `Cast` of a GPU value: between ids, integers held as f32, booleans (0 and 1 in f32) and
    /// floats.
    pub(super) fn cast(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let name = input_name(node, 0)?;
        let to = attr_int(node, "to").unwrap_or(0) as i32;
        let kind = number_kind(to).ok_or_else(|| {
            node_unsupported(
                node,
                format!("a cast to element type {to}, which the GPU does not carry"),
            )
        })?;
        let x = match self.reference(name, "Cast")? {
            Ref::Value(v) => v,
            _ => self.f32_input(node, 0)?,
        };
        let dtype = self.graph.values[x].dtype;
        match (dtype, kind) {
            // Ids stay ids; the same kind is a view.
            (DType::I32, NumberKind::Int) | (DType::F32, NumberKind::Float) => {
                self.push(node, dtype, |out| Step::View {
                    x,
                    view: View::Identity,
                    out,
                })
            }
            (_, NumberKind::Float) => {
                let x = self.f32_input(node, 0)?;
                self.push(node, DType::F32, |out| Step::View {
                    x,
                    view: View::Identity,
                    out,
                })
            }
            (_, kind) => {
                let x = self.f32_input(node, 0)?;
                let op = if kind == NumberKind::Bool {
                    UnaryOp::NonZero
                } else {
                    UnaryOp::Trunc
                };
                self.push(node, DType::F32, |out| Step::Unary { op, x, out })?;
                self.mark_int(node);
                Ok(())
            }
        }
    }

    /// The reductions: `ReduceSum`/`Mean`/`Max`/`Min`/`SumSquare`/`L2` (axes as an input from
    /// opset 18, and from 13 for `ReduceSum`).
    pub(super) fn reduce(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let op = node.op_type.as_str();
        let kind = match op {
            "ReduceSum" => ReduceKind::Sum,
            "ReduceMean" => ReduceKind::Mean,
            "ReduceMax" => ReduceKind::Max,
            "ReduceMin" => ReduceKind::Min,
            "ReduceSumSquare" => ReduceKind::SumSquare,
            _ => ReduceKind::L2,
        };
        let axes_in_input = if kind == ReduceKind::Sum {
            self.opset >= 13
        } else {
            self.opset >= 18
        };
        let axes = if axes_in_input {
            self.const_ints(node, 1)?
        } else {
            attr_ints(node, "axes")
        };
        let noop = attr_int(node, "noop_with_empty_axes").unwrap_or(0) != 0;
        let keep_dims = attr_int(node, "keepdims").unwrap_or(1) != 0;
        let x = self.f32_input(node, 0)?;
        let axes = match axes {
            Some(a) if !a.is_empty() => Some(a),
            _ if noop => {
                return self.push(node, DType::F32, |out| Step::View {
                    x,
                    view: View::Identity,
                    out,
                });
            }
            _ => None,
        };
        self.push(node, DType::F32, |out| Step::Reduce {
            x,
            axes,
            keep_dims,
            kind,
            out,
        })
    }
}
