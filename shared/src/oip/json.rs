//! The Open Inference Protocol v2 JSON form of a tensor (`{"name", "shape", "datatype",
//! "data"}`): [`JsonTensor`], and the conversions between it and a [`Tensor`]
//! ([`Tensor::from_json`], [`Tensor::from_binary`], [`Tensor::to_json`]) that check every
//! element's type and range.
//!
//! Elements are read and written straight between JSON text and the tensor's little-endian
//! bytes by one serde visitor ([`Level`]) and one serializer ([`JsonElements`]); no tree of
//! `serde_json::Value`s is built for them, so a request's elements cost their own bytes and
//! nothing more (a `Value` per element is 32 bytes before the vector that holds it).

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::fmt;

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

/// A request's input as it arrives: the header read, the elements left as a slice of the body
/// until the header has passed the request's limits.
#[derive(Deserialize)]
pub(super) struct RequestTensor<'a> {
    pub(super) name: String,
    pub(super) shape: Vec<i64>,
    pub(super) datatype: String,
    #[serde(default)]
    pub(super) parameters: Option<serde_json::Map<String, Value>>,
    #[serde(default, borrow)]
    pub(super) data: Option<&'a RawValue>,
}

/// A tensor's checked name, datatype, shape and element count.
pub(super) struct Header {
    pub(super) name: String,
    pub(super) datatype: DataType,
    pub(super) shape: Vec<u64>,
    pub(super) count: u64,
}

/// Checks a tensor's datatype name and shape.
pub(super) fn header(name: &str, shape: &[i64], datatype: &str) -> Result<Header, TensorError> {
    let datatype: DataType = datatype
        .parse()
        .map_err(|source| TensorError::UnknownDatatype {
            tensor: name.to_owned(),
            source,
        })?;
    let bad_shape = |reason| TensorError::BadShape {
        tensor: name.to_owned(),
        shape: shape.to_vec(),
        reason,
    };
    let shape = shape
        .iter()
        .map(|&d| u64::try_from(d).map_err(|_| bad_shape("dimensions must not be negative")))
        .collect::<Result<Vec<u64>, _>>()?;
    let count = element_count(&shape).ok_or_else(|| bad_shape("its element count overflows"))?;
    Ok(Header {
        name: name.to_owned(),
        datatype,
        shape,
        count,
    })
}

impl Header {
    /// The tensor whose elements are the JSON text `data`.
    pub(super) fn read_json(self, data: &RawValue) -> Result<Tensor, TensorError> {
        // Every element takes at least two bytes of text ("1,"), so the text bounds the
        // elements there can be: a shape that claims more allocates no more than the text.
        let at_most = (data.get().len() / 2 + 1) as u64;
        let mut de = serde_json::Deserializer::from_str(data.get());
        self.read(&mut de, at_most)
    }

    /// The tensor whose elements `data` holds, reading at most `at_most` of them into memory
    /// before the count is known.
    fn read<'de, D: Deserializer<'de>>(self, data: D, at_most: u64) -> Result<Tensor, TensorError> {
        let size = self.datatype.element_size().unwrap_or(0) as u64;
        let capacity = usize::try_from(self.count.min(at_most).saturating_mul(size)).unwrap_or(0);
        let mut sink = Sink {
            datatype: self.datatype,
            expected: self.count,
            out: Vec::with_capacity(capacity),
            count: 0,
            failure: None,
        };
        let max_depth = self.shape.len().max(1);
        let read = Level {
            sink: &mut sink,
            depth: 0,
            max_depth,
        }
        .deserialize(data);
        let tensor = self.name;
        match (sink.failure, read) {
            (Some(Failure::NotArray(found)), _) => {
                return Err(TensorError::DataNotArray { tensor, found });
            }
            (Some(Failure::TooDeep), _) => {
                return Err(TensorError::BadData {
                    tensor,
                    reason: format!(
                        "is nested deeper than its shape's {} dimensions",
                        self.shape.len()
                    ),
                });
            }
            (
                Some(Failure::Element {
                    index,
                    expected,
                    found,
                }),
                _,
            ) => {
                return Err(TensorError::BadElement {
                    tensor,
                    index,
                    expected: expected.to_owned(),
                    found,
                });
            }
            (None, Err(e)) => {
                return Err(TensorError::BadData {
                    tensor,
                    reason: format!("cannot be read: {e}"),
                });
            }
            (None, Ok(())) => {}
        }
        if sink.count != self.count {
            return Err(TensorError::ElementCount {
                tensor,
                shape: self.shape,
                expected: self.count,
                actual: sink.count,
            });
        }
        Tensor::from_bytes(tensor, self.datatype, self.shape, sink.out)
    }
}

/// Where the visitor writes elements, and why it stopped if it did.
struct Sink {
    datatype: DataType,
    expected: u64,
    out: Vec<u8>,
    /// Elements seen, stored or not.
    count: u64,
    failure: Option<Failure>,
}

enum Failure {
    NotArray(&'static str),
    TooDeep,
    Element {
        index: u64,
        expected: &'static str,
        found: String,
    },
}

/// One element as JSON gave it.
enum Leaf<'a> {
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
    Null,
    Object,
}

impl Leaf<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Leaf::Bool(_) => "a boolean",
            Leaf::Int(_) | Leaf::Float(_) => "a number",
            Leaf::Str(_) => "a string",
            Leaf::Null => "null",
            Leaf::Object => "an object",
        }
    }

    /// The element for an error message, cut to 40 characters.
    fn describe(&self) -> String {
        let text = match self {
            Leaf::Bool(b) => b.to_string(),
            Leaf::Int(v) => v.to_string(),
            Leaf::Float(x) => format!("{x:?}"),
            Leaf::Str(s) => format!("{s:?}"),
            Leaf::Null => "null".to_owned(),
            Leaf::Object => "an object".to_owned(),
        };
        if text.chars().count() > 40 {
            format!(
                "{}… ({})",
                text.chars().take(40).collect::<String>(),
                self.kind()
            )
        } else {
            text
        }
    }
}

impl Sink {
    /// Takes one element; an error only after recording the failure.
    fn leaf<E: de::Error>(&mut self, leaf: Leaf<'_>) -> Result<(), E> {
        let index = self.count;
        self.count = self.count.saturating_add(1);
        // Elements past the shape are counted (for the error), not stored.
        if index >= self.expected {
            return Ok(());
        }
        write_element(self.datatype, &leaf, &mut self.out).map_err(|expected| {
            self.failure = Some(Failure::Element {
                index,
                expected,
                found: leaf.describe(),
            });
            E::custom("bad element")
        })
    }
}

/// The visitor for one level of (possibly nested) `data` arrays.
struct Level<'s> {
    sink: &'s mut Sink,
    depth: usize,
    max_depth: usize,
}

impl Level<'_> {
    fn leaf<E: de::Error>(self, leaf: Leaf<'_>) -> Result<(), E> {
        if self.depth == 0 {
            self.sink.failure = Some(Failure::NotArray(leaf.kind()));
            return Err(E::custom("data is not an array"));
        }
        self.sink.leaf(leaf)
    }
}

impl<'de> DeserializeSeed<'de> for Level<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of tensor elements")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.leaf(Leaf::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.leaf(Leaf::Int(i128::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.leaf(Leaf::Int(i128::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.leaf(Leaf::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.leaf(Leaf::Str(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf(Leaf::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.leaf(Leaf::Null)
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        self.leaf(Leaf::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= self.max_depth {
            self.sink.failure = Some(Failure::TooDeep);
            return Err(de::Error::custom("data is nested too deep"));
        }
        while seq
            .next_element_seed(Level {
                sink: &mut *self.sink,
                depth: self.depth + 1,
                max_depth: self.max_depth,
            })?
            .is_some()
        {}
        Ok(())
    }
}

impl Tensor {
    /// Reads a tensor from its Open Inference Protocol JSON form, checking the datatype name,
    /// the shape, the element count and every element's type and range. `data` may be flat or
    /// nested (row-major) arrays, no deeper than the shape.
    pub fn from_json(json: &JsonTensor) -> Result<Self, TensorError> {
        header(&json.name, &json.shape, &json.datatype)?.read(&json.data, u64::MAX)
    }

    /// Reads a tensor whose header (name, datatype, shape) is JSON and whose elements came as
    /// raw bytes (the binary tensor data extension), checking the length against the shape.
    pub fn from_binary(json: &JsonTensor, data: Vec<u8>) -> Result<Self, TensorError> {
        let h = header(&json.name, &json.shape, &json.datatype)?;
        Self::from_bytes(h.name, h.datatype, h.shape, data)
    }

    /// The tensor in Open Inference Protocol JSON form, with flat `data`.
    ///
    /// Fails for values JSON cannot carry: NaN or infinite floats, and BYTES elements that are
    /// not UTF-8.
    pub fn to_json(&self) -> Result<JsonTensor, TensorError> {
        let elements = JsonElements::new(self)?;
        Ok(JsonTensor {
            name: self.name().to_owned(),
            shape: self
                .shape()
                .iter()
                .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                .collect(),
            datatype: self.datatype().as_str().to_owned(),
            parameters: None,
            data: serde_json::to_value(elements).map_err(|e| TensorError::BadData {
                tensor: self.name().to_owned(),
                reason: format!("cannot be written as JSON: {e}"),
            })?,
        })
    }
}

/// A tensor's elements as a flat JSON array, serialized straight from its bytes; made only for
/// tensors JSON can carry ([`JsonElements::new`] checks).
#[derive(Clone, Copy)]
pub(super) struct JsonElements<'a>(&'a Tensor);

impl<'a> JsonElements<'a> {
    /// Checks that JSON can carry every element of `tensor`: floats finite, BYTES UTF-8.
    pub(super) fn new(tensor: &'a Tensor) -> Result<Self, TensorError> {
        let bad = |index: usize, expected: &str, found: String| TensorError::BadElement {
            tensor: tensor.name().to_owned(),
            index: index as u64,
            expected: expected.to_owned(),
            found,
        };
        let not_finite = |index: usize, x: f64| {
            bad(
                index,
                "a finite number (JSON cannot carry NaN or infinity)",
                x.to_string(),
            )
        };
        fn first_bad<T: Element + Into<f64>>(t: &Tensor) -> Option<(usize, f64)> {
            t.data()
                .chunks_exact(T::SIZE)
                .map(|b| T::read_le(b).into())
                .enumerate()
                .find(|(_, x): &(usize, f64)| !x.is_finite())
        }
        let found = match tensor.datatype() {
            DataType::Fp16 => first_bad::<half::f16>(tensor),
            DataType::Fp32 => first_bad::<f32>(tensor),
            DataType::Fp64 => first_bad::<f64>(tensor),
            DataType::Bytes => {
                for (i, b) in tensor.byte_strings()?.into_iter().enumerate() {
                    if std::str::from_utf8(b).is_err() {
                        return Err(bad(
                            i,
                            "UTF-8 text (JSON carries BYTES as strings)",
                            format!("{} non-UTF-8 bytes", b.len()),
                        ));
                    }
                }
                None
            }
            _ => None,
        };
        match found {
            Some((index, x)) => Err(not_finite(index, x)),
            None => Ok(JsonElements(tensor)),
        }
    }
}

impl Serialize for JsonElements<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        fn each<T: Element + Serialize, Q: SerializeSeq>(
            t: &Tensor,
            seq: &mut Q,
        ) -> Result<(), Q::Error> {
            t.data()
                .chunks_exact(T::SIZE)
                .try_for_each(|b| seq.serialize_element(&T::read_le(b)))
        }
        let t = self.0;
        let mut seq = serializer.serialize_seq(usize::try_from(t.len()).ok())?;
        match t.datatype() {
            DataType::Bool => each::<bool, _>(t, &mut seq)?,
            DataType::Uint8 => each::<u8, _>(t, &mut seq)?,
            DataType::Int8 => each::<i8, _>(t, &mut seq)?,
            DataType::Int32 => each::<i32, _>(t, &mut seq)?,
            DataType::Int64 => each::<i64, _>(t, &mut seq)?,
            DataType::Fp16 => t
                .data()
                .chunks_exact(2)
                .try_for_each(|b| seq.serialize_element(&f32::from(half::f16::read_le(b))))?,
            DataType::Fp32 => each::<f32, _>(t, &mut seq)?,
            DataType::Fp64 => each::<f64, _>(t, &mut seq)?,
            DataType::Bytes => {
                for b in t.byte_strings().map_err(ser::Error::custom)? {
                    let s = std::str::from_utf8(b).map_err(ser::Error::custom)?;
                    seq.serialize_element(s)?;
                }
            }
        }
        seq.end()
    }
}

/// Appends one JSON element as `datatype`; on failure, says what was expected.
fn write_element(
    datatype: DataType,
    leaf: &Leaf<'_>,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    fn int<T: TryFrom<i128> + Element>(
        leaf: &Leaf<'_>,
        out: &mut Vec<u8>,
        expected: &'static str,
    ) -> Result<(), &'static str> {
        let Leaf::Int(v) = leaf else {
            return Err(expected);
        };
        T::try_from(*v).map_err(|_| expected)?.write_le(out);
        Ok(())
    }
    let number = |expected| match leaf {
        Leaf::Int(v) => Ok(*v as f64),
        Leaf::Float(x) => Ok(*x),
        _ => Err(expected),
    };
    match datatype {
        DataType::Bool => match leaf {
            Leaf::Bool(b) => b.write_le(out),
            _ => return Err("true or false (BOOL)"),
        },
        DataType::Uint8 => int::<u8>(leaf, out, "an integer in 0..=255 (UINT8)")?,
        DataType::Int8 => int::<i8>(leaf, out, "an integer in -128..=127 (INT8)")?,
        DataType::Int32 => int::<i32>(leaf, out, "an integer that fits in 32 bits (INT32)")?,
        DataType::Int64 => int::<i64>(leaf, out, "an integer that fits in 64 bits (INT64)")?,
        DataType::Fp16 => {
            let h = half::f16::from_f64(number("a number (FP16)")?);
            if h.is_infinite() {
                return Err("a number within FP16 range (±65504)");
            }
            h.write_le(out);
        }
        DataType::Fp32 => {
            let f = number("a number (FP32)")? as f32;
            if f.is_infinite() {
                return Err("a number within FP32 range");
            }
            f.write_le(out);
        }
        DataType::Fp64 => number("a number (FP64)")?.write_le(out),
        DataType::Bytes => {
            let Leaf::Str(s) = leaf else {
                return Err("a string (BYTES)");
            };
            let len = u32::try_from(s.len()).map_err(|_| "a string shorter than 4 GiB")?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    Ok(())
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
