//! The shape arithmetic of exported models, imported as host steps ([`HostOp`]): a node whose
//! inputs are all known on the host (shapes, integer constants, small float constants, and what
//! is computed from them) is folded there per input shape and never reaches the GPU. `Shape`
//! and `Size` are always host steps: they read only their input's shape.

use tract_onnx::pb;

use super::{
    ImportError, Importer, Ref, attr, attr_int, attr_ints, input_name, node_unsupported, onnx_type,
};
use crate::graph::{
    BinaryOp, DType, HostData, HostOp, HostTensor, NumberKind, Origin, Step, UnaryOp, View,
};

/// The largest float constant taken into shape arithmetic (larger ones are weights).
const HOST_FLOAT_CONST: usize = 4096;

/// The ops that can run on the host.
const HOST_OPS: &[&str] = &[
    "Shape",
    "Size",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Reshape",
    "Flatten",
    "Identity",
    "Concat",
    "Cast",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
    "Not",
    "Neg",
    "Abs",
    "Sqrt",
    "Floor",
    "Ceil",
    "Reciprocal",
    "Relu",
    "Where",
    "Range",
    "ConstantOfShape",
    "Slice",
    "Expand",
];

/// The binary op an ONNX op name is, on the host or the GPU.
pub(super) fn binary_op(op: &str) -> Option<BinaryOp> {
    Some(match op {
        "Add" => BinaryOp::Add,
        "Sub" => BinaryOp::Sub,
        "Mul" => BinaryOp::Mul,
        "Div" => BinaryOp::Div,
        "Pow" => BinaryOp::Pow,
        "Max" => BinaryOp::Max,
        "Min" => BinaryOp::Min,
        "Equal" => BinaryOp::Equal,
        "Less" => BinaryOp::Less,
        "Greater" => BinaryOp::Greater,
        "LessOrEqual" => BinaryOp::LessOrEqual,
        "GreaterOrEqual" => BinaryOp::GreaterOrEqual,
        "And" => BinaryOp::And,
        "Or" => BinaryOp::Or,
        "Xor" => BinaryOp::Xor,
        _ => return None,
    })
}

/// The number kind an ONNX element type casts to, or `None` for one the engine does not carry
/// (f16, f64, strings, complex).
pub(super) fn number_kind(to: i32) -> Option<NumberKind> {
    match to {
        onnx_type::FLOAT => Some(NumberKind::Float),
        9 => Some(NumberKind::Bool),
        2..=7 | 12 | 13 => Some(NumberKind::Int),
        _ => None,
    }
}

impl Importer {
    /// Input `name` as a host value, if it is known on the host.
    fn host_arg(&mut self, name: &str) -> Option<usize> {
        if let Some(&v) = self.names.get(name) {
            return (self.graph.values[v].dtype == DType::Host).then_some(v);
        }
        if let Some(&v) = self.host_consts.get(name) {
            return Some(v);
        }
        let t = if let Some((dims, data)) = self.ints.get(name) {
            HostTensor {
                dims: dims.clone(),
                data: HostData::Int(data.clone()),
            }
        } else if let Some((dims, data)) = self.f32s.get(name)
            && data.len() <= HOST_FLOAT_CONST
        {
            HostTensor {
                dims: dims.clone(),
                data: HostData::Float(data.clone()),
            }
        } else {
            return None;
        };
        let v = self.host_const(t);
        self.host_consts.insert(name.to_owned(), v);
        Some(v)
    }

    /// A new host value holding `t`.
    pub(super) fn host_const(&mut self, t: HostTensor) -> usize {
        let out = self.graph.add_value(DType::Host, Origin::Step);
        self.graph.steps.push(Step::Host {
            op: HostOp::Const(t),
            inputs: Vec::new(),
            out,
        });
        out
    }

    /// Input `i` of `node` as a host value: a constant becomes one; anything else is the
    /// reason it cannot be folded.
    pub(super) fn host_input(
        &mut self,
        node: &pb::NodeProto,
        i: usize,
    ) -> Result<usize, ImportError> {
        let name = input_name(node, i)?;
        self.host_arg(name).ok_or_else(|| {
            node_unsupported(
                node,
                format!("input {name:?} must be known from the shapes (a constant, or computed from Shape)"),
            )
        })
    }

    /// Folds `node` on the host when it can be: `Ok(true)` when it was.
    pub(super) fn try_host_node(&mut self, node: &pb::NodeProto) -> Result<bool, ImportError> {
        let op = node.op_type.as_str();
        if !HOST_OPS.contains(&op) {
            return Ok(false);
        }
        if op == "Shape" || op == "Size" {
            self.shape_node(node)?;
            return Ok(true);
        }
        // Every input known on the host, and at least one of them not a float constant (those
        // stay GPU steps, as they were).
        let mut count = 0;
        let mut integral = false;
        for name in node.input.iter().filter(|n| !n.is_empty()) {
            match self.names.get(name) {
                Some(&v) if self.graph.values[v].dtype == DType::Host => integral = true,
                // A GPU value: a GPU step.
                Some(_) => return Ok(false),
                None if self.ints.contains_key(name) => integral = true,
                None if self
                    .f32s
                    .get(name)
                    .is_some_and(|(_, d)| d.len() <= HOST_FLOAT_CONST) => {}
                // Weights, int8 constants, unknown names.
                None => return Ok(false),
            }
            count += 1;
        }
        if !integral {
            return Ok(false);
        }
        let host_op = self.host_op(node)?;
        // Unsqueeze's and Squeeze's axes are read at import: only the data is an input.
        let take = match op {
            "Unsqueeze" | "Squeeze" | "Flatten" | "Identity" => 1,
            _ => count,
        };
        // The inputs present, in order (an optional one left empty is skipped: `Slice`'s flags
        // say which are there).
        let present: Vec<usize> = (0..node.input.len())
            .filter(|&i| !node.input[i].is_empty())
            .take(take)
            .collect();
        let mut inputs = Vec::with_capacity(take);
        for i in present {
            inputs.push(self.host_input(node, i)?);
        }
        self.push(node, DType::Host, |out| Step::Host {
            op: host_op,
            inputs,
            out,
        })?;
        Ok(true)
    }

    /// `Shape` and `Size`: of a value, a host step; of a constant, a constant.
    fn shape_node(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let name = input_name(node, 0)?;
        let op = if node.op_type == "Size" {
            HostOp::Size
        } else {
            HostOp::Shape {
                start: attr_int(node, "start").unwrap_or(0),
                end: attr_int(node, "end"),
            }
        };
        let input = match self.names.get(name) {
            Some(&v) => v,
            None => {
                let dims = match self.reference(name, &node.op_type)? {
                    Ref::F32(dims, _) | Ref::Q8 { dims, .. } => dims,
                    Ref::Ints => self.ints[name].0.clone(),
                    Ref::Value(v) => return Err(node_unsupported(node, format!("value {v}"))),
                };
                // A constant's shape is known now: folded at import into a constant (nothing
                // of the constant's data is copied).
                let stand_in = HostTensor {
                    dims: vec![0],
                    data: HostData::Int(Vec::new()),
                };
                let t = crate::host::eval(
                    &op,
                    &[crate::host::Arg {
                        shape: &dims,
                        host: Some(&stand_in),
                    }],
                )
                .map_err(|e| node_unsupported(node, e.0))?;
                let out_name = node
                    .output
                    .first()
                    .ok_or_else(|| node_unsupported(node, "the node has no output".into()))?;
                let v = self.host_const(t);
                self.names.insert(out_name.clone(), v);
                return Ok(());
            }
        };
        self.push(node, DType::Host, |out| Step::Host {
            op,
            inputs: vec![input],
            out,
        })
    }

    fn host_op(&self, node: &pb::NodeProto) -> Result<HostOp, ImportError> {
        let op = node.op_type.as_str();
        if let Some(b) = binary_op(op) {
            if node.input.len() != 2 {
                return Err(node_unsupported(node, "not two inputs".into()));
            }
            return Ok(HostOp::Binary(b));
        }
        Ok(match op {
            "Gather" => HostOp::Gather {
                axis: attr_int(node, "axis").unwrap_or(0),
            },
            "Unsqueeze" => HostOp::View(View::Unsqueeze {
                axes: if self.opset >= 13 {
                    self.const_ints(node, 1)?
                } else {
                    attr_ints(node, "axes")
                }
                .ok_or_else(|| node_unsupported(node, "no axes".into()))?,
            }),
            "Squeeze" => HostOp::View(View::Squeeze {
                axes: if self.opset >= 13 {
                    self.const_ints(node, 1)?
                } else {
                    attr_ints(node, "axes")
                },
            }),
            "Flatten" => HostOp::View(View::Flatten {
                axis: attr_int(node, "axis").unwrap_or(1),
            }),
            "Identity" => HostOp::View(View::Identity),
            "Reshape" => HostOp::Reshape {
                allow_zero: attr_int(node, "allowzero").unwrap_or(0) != 0,
            },
            "Concat" => HostOp::Concat {
                axis: attr_int(node, "axis")
                    .ok_or_else(|| node_unsupported(node, "no axis attribute".into()))?,
            },
            "Cast" => {
                let to = attr_int(node, "to").unwrap_or(0) as i32;
                HostOp::Cast(number_kind(to).ok_or_else(|| {
                    node_unsupported(node, format!("a cast to element type {to}"))
                })?)
            }
            "Not" => HostOp::Unary(UnaryOp::Not),
            "Neg" => HostOp::Unary(UnaryOp::Neg),
            "Abs" => HostOp::Unary(UnaryOp::Abs),
            "Sqrt" => HostOp::Unary(UnaryOp::Sqrt),
            "Floor" => HostOp::Unary(UnaryOp::Floor),
            "Ceil" => HostOp::Unary(UnaryOp::Ceil),
            "Reciprocal" => HostOp::Unary(UnaryOp::Reciprocal),
            "Relu" => HostOp::Unary(UnaryOp::Relu),
            "Where" => HostOp::Where,
            "Range" => HostOp::Range,
            "ConstantOfShape" => {
                let value = match attr(node, "value").and_then(|a| a.t.as_ref()) {
                    None => HostTensor {
                        dims: vec![1],
                        data: HostData::Float(vec![0.0]),
                    },
                    Some(t) => constant_value(node, t)?,
                };
                HostOp::ConstantOfShape(value)
            }
            "Slice" => {
                if self.opset < 10 {
                    return Err(node_unsupported(
                        node,
                        "Slice before opset 10 (bounds as attributes) on shapes".into(),
                    ));
                }
                HostOp::Slice {
                    axes: node.input.get(3).is_some_and(|n| !n.is_empty()),
                    steps: node.input.get(4).is_some_and(|n| !n.is_empty()),
                }
            }
            "Expand" => HostOp::Expand,
            _ => return Err(node_unsupported(node, "no host folding for this op".into())),
        })
    }
}

/// `ConstantOfShape`'s one-element value.
fn constant_value(node: &pb::NodeProto, t: &pb::TensorProto) -> Result<HostTensor, ImportError> {
    let int = |v: i64| HostTensor {
        dims: vec![1],
        data: HostData::Int(vec![v]),
    };
    let raw = |n: usize| t.raw_data.get(..n).map(|b| b.to_vec());
    Ok(match t.data_type {
        onnx_type::FLOAT => {
            let v = match raw(4) {
                Some(b) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                None => t.float_data.first().copied().unwrap_or(0.0),
            };
            HostTensor {
                dims: vec![1],
                data: HostData::Float(vec![v]),
            }
        }
        onnx_type::INT64 => int(match raw(8) {
            Some(b) => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            None => t.int64_data.first().copied().unwrap_or(0),
        }),
        onnx_type::INT32 => int(match raw(4) {
            Some(b) => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            None => i64::from(t.int32_data.first().copied().unwrap_or(0)),
        }),
        onnx_type::INT8 => int(match raw(1) {
            Some(b) => i64::from(b[0] as i8),
            None => i64::from(t.int32_data.first().copied().unwrap_or(0)),
        }),
        // bool, uint8
        9 | 2 => int(match raw(1) {
            Some(b) => i64::from(b[0]),
            None => i64::from(t.int32_data.first().copied().unwrap_or(0)),
        }),
        other => {
            return Err(node_unsupported(
                node,
                format!("a value of element type {other}"),
            ));
        }
    })
}
