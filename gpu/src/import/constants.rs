//! Constant tensors: initializers and `Constant` nodes read into host values by element type,
//! and `DequantizeLinear(int8 initializer, scale)` kept as int8 with its scales (the pattern the
//! edge variant carries), rather than folded to f32.

use tract_onnx::pb;

use super::{ImportError, Importer, attr_int, input_name, node_unsupported, onnx_type};

/// An initializer's dimensions.
fn dims_of(t: &pb::TensorProto) -> Result<Vec<usize>, ImportError> {
    t.dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            ImportError::Invalid(format!("initializer {:?} has a negative dimension", t.name))
        })
}

/// The element count of `dims`, refused when it overflows.
fn count_of(name: &str, dims: &[usize]) -> Result<usize, ImportError> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| ImportError::Invalid(format!("initializer {name:?}: the shape overflows")))
}

/// The values of a constant tensor, by element type.
fn read_raw<const N: usize, T>(
    t: &pb::TensorProto,
    count: usize,
    from: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, ImportError> {
    if t.raw_data.len() != count * N {
        return Err(ImportError::Invalid(format!(
            "initializer {:?}: {} bytes of data for {count} elements",
            t.name,
            t.raw_data.len()
        )));
    }
    Ok(t.raw_data
        .chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            from(b)
        })
        .collect())
}

fn typed_len_error(t: &pb::TensorProto, have: usize, count: usize) -> ImportError {
    ImportError::Invalid(format!(
        "initializer {:?}: {have} values for {count} elements",
        t.name
    ))
}

impl Importer {
    pub(super) fn is_constant(&self, name: &str) -> bool {
        self.f32s.contains_key(name)
            || self.ints.contains_key(name)
            || self.int8s.contains_key(name)
            || self.q8s.contains_key(name)
    }

    pub(super) fn add_constant(
        &mut self,
        name: &str,
        t: &pb::TensorProto,
    ) -> Result<(), ImportError> {
        if t.data_location == Some(1) {
            return Err(ImportError::Invalid(format!(
                "initializer {name:?} keeps its data in an external file, which Outpost does not carry"
            )));
        }
        let dims = dims_of(t)?;
        let count = count_of(name, &dims)?;
        match t.data_type {
            onnx_type::FLOAT => {
                let data = if t.raw_data.is_empty() {
                    if t.float_data.len() != count {
                        return Err(typed_len_error(t, t.float_data.len(), count));
                    }
                    t.float_data.clone()
                } else {
                    read_raw(t, count, f32::from_le_bytes)?
                };
                self.f32s.insert(name.to_owned(), (dims, data));
            }
            onnx_type::INT64 | onnx_type::INT32 => {
                let data = if !t.raw_data.is_empty() && t.data_type == onnx_type::INT64 {
                    read_raw(t, count, i64::from_le_bytes)?
                } else if !t.raw_data.is_empty() {
                    read_raw(t, count, |b| i64::from(i32::from_le_bytes(b)))?
                } else if t.data_type == onnx_type::INT64 {
                    t.int64_data.clone()
                } else {
                    t.int32_data.iter().map(|&v| i64::from(v)).collect()
                };
                if data.len() != count {
                    return Err(typed_len_error(t, data.len(), count));
                }
                self.ints.insert(name.to_owned(), (dims, data));
            }
            onnx_type::INT8 => {
                let data: Vec<i8> = if t.raw_data.is_empty() {
                    t.int32_data.iter().map(|&v| v as i8).collect()
                } else {
                    t.raw_data.iter().map(|&b| b as i8).collect()
                };
                if data.len() != count {
                    return Err(typed_len_error(t, data.len(), count));
                }
                self.int8s.insert(name.to_owned(), (dims, data));
            }
            other => {
                // Kept out of the way: only an error if a GPU op reads it.
                tracing::debug!(
                    name,
                    data_type = other,
                    "constant of a type the GPU does not read"
                );
            }
        }
        Ok(())
    }

    pub(super) fn constant_node(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let name = node.output.first().cloned().unwrap_or_default();
        for a in &node.attribute {
            match a.name.as_str() {
                "value" => {
                    if let Some(t) = &a.t {
                        return self.add_constant(&name, t);
                    }
                }
                "value_float" => {
                    self.f32s.insert(name, (vec![], vec![a.f]));
                    return Ok(());
                }
                "value_floats" => {
                    self.f32s
                        .insert(name, (vec![a.floats.len()], a.floats.clone()));
                    return Ok(());
                }
                "value_int" => {
                    self.ints.insert(name, (Vec::new(), vec![a.i]));
                    return Ok(());
                }
                "value_ints" => {
                    self.ints.insert(name, (vec![a.ints.len()], a.ints.clone()));
                    return Ok(());
                }
                _ => {}
            }
        }
        Err(node_unsupported(
            node,
            "a constant of a kind the GPU does not read".into(),
        ))
    }

    pub(super) fn dequantize_node(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let x = input_name(node, 0)?;
        let Some((dims, q)) = self.int8s.get(x).cloned() else {
            return Err(node_unsupported(
                node,
                format!("input {x:?} must be an int8 initializer"),
            ));
        };
        let scale_name = input_name(node, 1)?;
        let Some((_, scale)) = self.f32s.get(scale_name).cloned() else {
            return Err(node_unsupported(
                node,
                format!("scale {scale_name:?} must be an f32 initializer"),
            ));
        };
        if let Some(zp) = node.input.get(2).filter(|n| !n.is_empty()) {
            let zero = self
                .int8s
                .get(zp)
                .is_some_and(|(_, z)| z.iter().all(|&v| v == 0))
                || self
                    .ints
                    .get(zp)
                    .is_some_and(|(_, z)| z.iter().all(|&v| v == 0));
            if !zero {
                return Err(node_unsupported(
                    node,
                    "a non-zero zero point (only symmetric int8)".into(),
                ));
            }
        }
        let axis = if scale.len() == 1 {
            0
        } else {
            let a = attr_int(node, "axis").unwrap_or(1);
            let rank = dims.len() as i64;
            let a = if a < 0 { a + rank } else { a };
            let ok = (0..rank).contains(&a) && dims[a as usize] == scale.len();
            if !ok {
                return Err(node_unsupported(
                    node,
                    "scale does not match the axis".into(),
                ));
            }
            a as usize
        };
        let scale = if scale.len() == 1 {
            // One scale for the tensor: spread it on axis 0 so every consumer sees per-channel.
            let rows = dims.first().copied().unwrap_or(1);
            vec![scale[0]; rows]
        } else {
            scale
        };
        let out = node.output.first().cloned().unwrap_or_default();
        self.q8s.insert(out, (dims, q, scale, axis));
        Ok(())
    }
}

/// int8 values times their scales along `axis`.
pub(super) fn dequantize(dims: &[usize], q: &[i8], scale: &[f32], axis: usize) -> Vec<f32> {
    let inner: usize = dims.iter().skip(axis + 1).product();
    let len = dims.get(axis).copied().unwrap_or(1).max(1);
    q.iter()
        .enumerate()
        .map(|(i, &v)| f32::from(v) * scale[(i / inner.max(1)) % len])
        .collect()
}
