//! The Open Inference Protocol v2 JSON form of a tensor (`{"name", "shape", "datatype",
//! "data"}`): [`JsonTensor`], and the conversions between it and a [`Tensor`]
//! ([`Tensor::from_json`], [`Tensor::from_binary`], [`Tensor::to_json`]) that check every
//! element's type and range.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tensor::{DataType, Element, Tensor, TensorError, element_count};

/// A tensor as the Open Inference Protocol's JSON carries it (requests and responses alike).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonTensor {
    /// The tensor's name.
    pub name: String,
    /// The shape; the protocol uses signed integers (-1 for a dynamic dimension in metadata).
    pub shape: Vec<i64>,
    /// The datatype's name (`"FP32"`, …).
    pub datatype: String,
    /// Optional per-tensor parameters, passed through untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Map<String, Value>>,
    /// The elements, flat or nested in row-major order; absent (null) when they travel as
    /// binary data after the JSON (see [`crate::oip`]).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

impl JsonTensor {
    /// The checked name, datatype, shape and element count.
    fn header(&self) -> Result<(String, DataType, Vec<u64>, u64), TensorError> {
        let name = self.name.clone();
        let datatype: DataType =
            self.datatype
                .parse()
                .map_err(|source| TensorError::UnknownDatatype {
                    tensor: name.clone(),
                    source,
                })?;
        let bad_shape = |reason| TensorError::BadShape {
            tensor: name.clone(),
            shape: self.shape.clone(),
            reason,
        };
        let shape = self
            .shape
            .iter()
            .map(|&d| u64::try_from(d).map_err(|_| bad_shape("dimensions must not be negative")))
            .collect::<Result<Vec<u64>, _>>()?;
        let count =
            element_count(&shape).ok_or_else(|| bad_shape("its element count overflows"))?;
        Ok((name, datatype, shape, count))
    }
}

impl Tensor {
    /// Reads a tensor from its Open Inference Protocol JSON form, checking the datatype name,
    /// the shape, the element count and every element's type and range. `data` may be flat or
    /// nested (row-major) arrays.
    pub fn from_json(json: &JsonTensor) -> Result<Self, TensorError> {
        let (name, datatype, shape, expected) = json.header()?;
        let Value::Array(_) = &json.data else {
            return Err(TensorError::DataNotArray {
                tensor: name,
                found: json_kind(&json.data),
            });
        };
        let mut elements = Vec::new();
        flatten(&json.data, &mut elements);
        if elements.len() as u64 != expected {
            return Err(TensorError::ElementCount {
                tensor: name,
                shape,
                expected,
                actual: elements.len() as u64,
            });
        }
        let mut data = Vec::with_capacity(elements.len() * datatype.element_size().unwrap_or(8));
        for (index, value) in elements.into_iter().enumerate() {
            write_json_element(datatype, value, &mut data).map_err(|expected| {
                TensorError::BadElement {
                    tensor: name.clone(),
                    index: index as u64,
                    expected: expected.to_owned(),
                    found: describe_json(value),
                }
            })?;
        }
        Self::from_bytes(name, datatype, shape, data)
    }

    /// Reads a tensor whose header (name, datatype, shape) is JSON and whose elements came as
    /// raw bytes (the binary tensor data extension), checking the length against the shape.
    pub fn from_binary(json: &JsonTensor, data: Vec<u8>) -> Result<Self, TensorError> {
        let (name, datatype, shape, _) = json.header()?;
        Self::from_bytes(name, datatype, shape, data)
    }

    /// The tensor in Open Inference Protocol JSON form, with flat `data`.
    ///
    /// Fails for values JSON cannot carry: NaN or infinite floats, and BYTES elements that are
    /// not UTF-8.
    pub fn to_json(&self) -> Result<JsonTensor, TensorError> {
        let bad = |index: usize, expected: &str, found: String| TensorError::BadElement {
            tensor: self.name().to_owned(),
            index: index as u64,
            expected: expected.to_owned(),
            found,
        };
        let float = |index: usize, x: f64| {
            serde_json::Number::from_f64(x)
                .map(Value::Number)
                .ok_or_else(|| {
                    bad(
                        index,
                        "a finite number (JSON cannot carry NaN or infinity)",
                        x.to_string(),
                    )
                })
        };
        let data: Vec<Value> = match self.datatype() {
            DataType::Bool => self.data().iter().map(|&b| Value::Bool(b == 1)).collect(),
            DataType::Uint8 => self.data().iter().map(|&b| Value::from(b)).collect(),
            DataType::Int8 => self
                .to_values::<i8>()?
                .into_iter()
                .map(Value::from)
                .collect(),
            DataType::Int32 => self
                .to_values::<i32>()?
                .into_iter()
                .map(Value::from)
                .collect(),
            DataType::Int64 => self
                .to_values::<i64>()?
                .into_iter()
                .map(Value::from)
                .collect(),
            DataType::Fp16 => (self.to_values::<half::f16>()?.into_iter().enumerate())
                .map(|(i, x)| float(i, f64::from(x)))
                .collect::<Result<_, _>>()?,
            DataType::Fp32 => (self.to_values::<f32>()?.into_iter().enumerate())
                .map(|(i, x)| float(i, f64::from(x)))
                .collect::<Result<_, _>>()?,
            DataType::Fp64 => (self.to_values::<f64>()?.into_iter().enumerate())
                .map(|(i, x)| float(i, x))
                .collect::<Result<_, _>>()?,
            DataType::Bytes => (self.byte_strings()?.into_iter().enumerate())
                .map(|(i, b)| {
                    std::str::from_utf8(b)
                        .map(|s| Value::String(s.to_owned()))
                        .map_err(|_| {
                            bad(
                                i,
                                "UTF-8 text (JSON carries BYTES as strings)",
                                format!("{} non-UTF-8 bytes", b.len()),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(JsonTensor {
            name: self.name().to_owned(),
            shape: self
                .shape()
                .iter()
                .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                .collect(),
            datatype: self.datatype().as_str().to_owned(),
            parameters: None,
            data: Value::Array(data),
        })
    }
}

/// Appends the leaves of `value`, nested arrays read in row-major order.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

/// Appends one JSON element as `datatype`; on failure, says what was expected.
fn write_json_element(
    datatype: DataType,
    value: &Value,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    fn int<T: TryFrom<i64> + Element>(
        value: &Value,
        out: &mut Vec<u8>,
        expected: &'static str,
    ) -> Result<(), &'static str> {
        let v = value
            .as_i64()
            .and_then(|v| T::try_from(v).ok())
            .ok_or(expected)?;
        v.write_le(out);
        Ok(())
    }
    match datatype {
        DataType::Bool => value.as_bool().ok_or("true or false (BOOL)")?.write_le(out),
        DataType::Uint8 => int::<u8>(value, out, "an integer in 0..=255 (UINT8)")?,
        DataType::Int8 => int::<i8>(value, out, "an integer in -128..=127 (INT8)")?,
        DataType::Int32 => int::<i32>(value, out, "an integer that fits in 32 bits (INT32)")?,
        DataType::Int64 => int::<i64>(value, out, "an integer that fits in 64 bits (INT64)")?,
        DataType::Fp16 => {
            let x = value.as_f64().ok_or("a number (FP16)")?;
            let h = half::f16::from_f64(x);
            if h.is_infinite() {
                return Err("a number within FP16 range (±65504)");
            }
            h.write_le(out);
        }
        DataType::Fp32 => {
            let x = value.as_f64().ok_or("a number (FP32)")?;
            let f = x as f32;
            if f.is_infinite() {
                return Err("a number within FP32 range");
            }
            f.write_le(out);
        }
        DataType::Fp64 => value.as_f64().ok_or("a number (FP64)")?.write_le(out),
        DataType::Bytes => {
            let s = value.as_str().ok_or("a string (BYTES)")?;
            let len = u32::try_from(s.len()).map_err(|_| "a string shorter than 4 GiB")?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    Ok(())
}

/// The kind of a JSON value, in words for error messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON value for an error message, cut to 40 characters.
fn describe_json(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        format!(
            "{}… ({})",
            text.chars().take(40).collect::<String>(),
            json_kind(value)
        )
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::tests::datatype_and_values;
    use proptest::prelude::*;
    use serde_json::json;

    fn json_tensor(value: Value) -> JsonTensor {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn reads_flat_and_nested_json() {
        let flat = Tensor::from_json(&json_tensor(json!({
            "name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2.5, 3, 4]
        })))
        .unwrap();
        let nested = Tensor::from_json(&json_tensor(json!({
            "name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [3, 4]]
        })))
        .unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat.to_values::<f32>().unwrap(), vec![1.0, 2.5, 3.0, 4.0]);
        assert_eq!(flat.shape(), &[2, 2]);
    }

    #[test]
    fn element_count_error_names_tensor_and_counts() {
        let err = Tensor::from_json(&json_tensor(json!({
            "name": "user_features", "shape": [1, 32], "datatype": "FP32", "data": [1, 2, 3]
        })))
        .unwrap_err();
        assert!(
            matches!(
                err,
                TensorError::ElementCount {
                    expected: 32,
                    actual: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("user_features") && msg.contains("32") && msg.contains('3'),
            "{msg}"
        );
    }

    #[test]
    fn element_type_errors_name_the_element() {
        let cases = [
            (
                json!({"name": "ids", "shape": [2], "datatype": "INT64", "data": [1, 2.5]}),
                "element 1",
            ),
            (
                json!({"name": "b", "shape": [1], "datatype": "BOOL", "data": [2]}),
                "true or false",
            ),
            (
                json!({"name": "u", "shape": [1], "datatype": "UINT8", "data": [256]}),
                "0..=255",
            ),
            (
                json!({"name": "i", "shape": [1], "datatype": "INT8", "data": [-129]}),
                "-128..=127",
            ),
            (
                json!({"name": "i", "shape": [1], "datatype": "INT32", "data": [3000000000u64]}),
                "32 bits",
            ),
            (
                json!({"name": "f", "shape": [1], "datatype": "FP32", "data": ["1"]}),
                "a number",
            ),
            (
                json!({"name": "f", "shape": [1], "datatype": "FP32", "data": [1e300]}),
                "FP32 range",
            ),
            (
                json!({"name": "h", "shape": [1], "datatype": "FP16", "data": [1e6]}),
                "FP16 range",
            ),
            (
                json!({"name": "s", "shape": [1], "datatype": "BYTES", "data": [5]}),
                "a string",
            ),
        ];
        for (value, needle) in cases {
            let err = Tensor::from_json(&json_tensor(value.clone())).unwrap_err();
            assert!(err.to_string().contains(needle), "{value}: {err}");
        }
    }

    #[test]
    fn bad_datatype_shape_and_data_are_named() {
        let err = Tensor::from_json(&json_tensor(
            json!({"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}),
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("\"FLOAT\"") && err.to_string().contains("\"x\""),
            "{err}"
        );
        let err = Tensor::from_json(&json_tensor(
            json!({"name": "x", "shape": [-1], "datatype": "FP32", "data": []}),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("negative"), "{err}");
        let err = Tensor::from_json(&json_tensor(
            json!({"name": "x", "shape": [i64::MAX, i64::MAX], "datatype": "FP32", "data": []}),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        let err = Tensor::from_json(&json_tensor(
            json!({"name": "x", "shape": [1], "datatype": "FP32", "data": 1}),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("must be a JSON array"), "{err}");
    }

    #[test]
    fn json_refuses_nan_and_binary_bytes() {
        let t = Tensor::from_values("x", vec![2], &[1.0f32, f32::NAN]).unwrap();
        assert!(t.to_json().unwrap_err().to_string().contains("element 1"));
        let t = Tensor::from_byte_strings("s", vec![1], &[vec![0xffu8, 0xfe]]).unwrap();
        assert!(t.to_json().unwrap_err().to_string().contains("UTF-8"));
    }

    proptest! {
        #[test]
        fn json_round_trips((shape, tensor) in datatype_and_values()) {
            let json = tensor.to_json().unwrap();
            let text = serde_json::to_string(&json).unwrap();
            let back = Tensor::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
            prop_assert_eq!(back.shape(), &shape[..]);
            prop_assert_eq!(back, tensor);
        }
    }
}
