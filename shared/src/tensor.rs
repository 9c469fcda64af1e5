//! Tensors: a datatype, a shape and row-major little-endian bytes.
//!
//! A [`Tensor`] is valid by construction: its bytes always hold exactly as many elements of its
//! datatype as its shape says. BYTES tensors hold each element as a 4-byte little-endian length
//! followed by the bytes, as the protocol's binary extension does. The Open Inference Protocol
//! JSON form of a tensor is in [`crate::oip`] ([`crate::JsonTensor`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The element types of the Open Inference Protocol that Outpost carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataType {
    /// One byte, 0 or 1.
    Bool,
    /// Unsigned 8-bit integer.
    Uint8,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer.
    Int64,
    /// IEEE 754 half precision.
    Fp16,
    /// IEEE 754 single precision.
    Fp32,
    /// IEEE 754 double precision.
    Fp64,
    /// Byte strings of any length.
    Bytes,
}

impl DataType {
    /// Every datatype, in declaration order.
    pub const ALL: [DataType; 9] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Int8,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The protocol's name for the datatype (`"FP32"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Int8 => "INT8",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Bytes per element; `None` for BYTES, whose elements vary in length.
    pub const fn element_size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Fp16 => Some(2),
            DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A datatype name the protocol does not define (or Outpost does not carry).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown datatype {0:?} (expected one of BOOL, UINT8, INT8, INT32, INT64, FP16, FP32, FP64, BYTES)"
)]
pub struct UnknownDataType(pub String);

impl FromStr for DataType {
    type Err = UnknownDataType;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        DataType::ALL
            .into_iter()
            .find(|d| d.as_str() == text)
            .ok_or_else(|| UnknownDataType(text.chars().take(40).collect()))
    }
}

/// What is wrong with a tensor; every variant names the tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The datatype name is not one of the protocol's.
    #[error("tensor {tensor:?}: {source}")]
    UnknownDatatype {
        /// The tensor's name.
        tensor: String,
        /// The unknown name.
        source: UnknownDataType,
    },
    /// The shape has a negative dimension or too many elements.
    #[error("tensor {tensor:?}: shape {shape:?} is invalid: {reason}")]
    BadShape {
        /// The tensor's name.
        tensor: String,
        /// The shape as given.
        shape: Vec<i64>,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The data holds a different number of elements than the shape says.
    #[error(
        "tensor {tensor:?}: shape {shape:?} needs {expected} elements, but the data has {actual}"
    )]
    ElementCount {
        /// The tensor's name.
        tensor: String,
        /// The shape.
        shape: Vec<u64>,
        /// Elements the shape needs.
        expected: u64,
        /// Elements found.
        actual: u64,
    },
    /// The raw bytes do not fit the datatype and shape.
    #[error(
        "tensor {tensor:?}: {datatype} data for shape {shape:?} must be {expected}, but it is {actual} bytes"
    )]
    ByteLength {
        /// The tensor's name.
        tensor: String,
        /// Its datatype.
        datatype: DataType,
        /// Its shape.
        shape: Vec<u64>,
        /// What the length should be, in words.
        expected: String,
        /// The length found.
        actual: usize,
    },
    /// One element is of the wrong kind or out of range for the datatype.
    #[error("tensor {tensor:?}: element {index} is {found}, expected {expected}")]
    BadElement {
        /// The tensor's name.
        tensor: String,
        /// The element's flat (row-major) index.
        index: u64,
        /// What was expected.
        expected: String,
        /// What was found, cut short.
        found: String,
    },
    /// The tensor's JSON `data` cannot be read as its elements (nested deeper than the shape,
    /// or not JSON the protocol allows).
    #[error("tensor {tensor:?}: data {reason}")]
    BadData {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The tensor's `data` is not a JSON array.
    #[error("tensor {tensor:?}: data must be a JSON array, found {found}")]
    DataNotArray {
        /// The tensor's name.
        tensor: String,
        /// The kind of JSON value found.
        found: &'static str,
    },
    /// The tensor holds a different datatype than the caller asked for.
    #[error("tensor {tensor:?} is {actual}, not {expected}")]
    DatatypeMismatch {
        /// The tensor's name.
        tensor: String,
        /// The datatype asked for.
        expected: DataType,
        /// The tensor's datatype.
        actual: DataType,
    },
}

/// A named tensor with row-major little-endian data; valid by construction.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawTensor", into = "RawTensor")]
pub struct Tensor {
    name: String,
    datatype: DataType,
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// The wire form of a tensor, checked into a [`Tensor`] on decode.
#[derive(Serialize, Deserialize)]
struct RawTensor {
    name: String,
    datatype: DataType,
    shape: Vec<u64>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

impl TryFrom<RawTensor> for Tensor {
    type Error = TensorError;

    fn try_from(raw: RawTensor) -> Result<Self, Self::Error> {
        Tensor::from_bytes(raw.name, raw.datatype, raw.shape, raw.data)
    }
}

impl From<Tensor> for RawTensor {
    fn from(t: Tensor) -> Self {
        RawTensor {
            name: t.name,
            datatype: t.datatype,
            shape: t.shape,
            data: t.data,
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("datatype", &self.datatype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// The number of elements of `shape`, or `None` if it overflows a `u64`.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
}

impl Tensor {
    /// A tensor from raw row-major little-endian bytes, checked against datatype and shape.
    pub fn from_bytes(
        name: impl Into<String>,
        datatype: DataType,
        shape: Vec<u64>,
        data: Vec<u8>,
    ) -> Result<Self, TensorError> {
        let name = name.into();
        let Some(count) = element_count(&shape) else {
            return Err(TensorError::BadShape {
                tensor: name,
                shape: shape
                    .iter()
                    .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                    .collect(),
                reason: "its element count overflows",
            });
        };
        match datatype.element_size() {
            Some(size) => {
                let expected = u128::from(count) * size as u128;
                if expected != data.len() as u128 {
                    return Err(TensorError::ByteLength {
                        tensor: name,
                        datatype,
                        shape,
                        expected: format!("{expected} bytes ({count} elements of {size} bytes)"),
                        actual: data.len(),
                    });
                }
                if datatype == DataType::Bool
                    && let Some(index) = data.iter().position(|&b| b > 1)
                {
                    return Err(TensorError::BadElement {
                        tensor: name,
                        index: index as u64,
                        expected: "0 or 1 (BOOL)".to_owned(),
                        found: data[index].to_string(),
                    });
                }
            }
            None => {
                let actual = count_byte_strings(&data).ok_or_else(|| TensorError::ByteLength {
                    tensor: name.clone(),
                    datatype,
                    shape: shape.clone(),
                    expected: format!("{count} length-prefixed byte strings"),
                    actual: data.len(),
                })?;
                if actual != count {
                    return Err(TensorError::ElementCount {
                        tensor: name,
                        shape,
                        expected: count,
                        actual,
                    });
                }
            }
        }
        Ok(Tensor {
            name,
            datatype,
            shape,
            data,
        })
    }

    /// A tensor holding `values` in the given shape.
    pub fn from_values<T: Element>(
        name: impl Into<String>,
        shape: Vec<u64>,
        values: &[T],
    ) -> Result<Self, TensorError> {
        let mut data = Vec::with_capacity(std::mem::size_of_val(values));
        for v in values {
            v.write_le(&mut data);
        }
        Self::from_bytes(name, T::DATATYPE, shape, data)
    }

    /// A BYTES tensor holding `elements` in the given shape.
    pub fn from_byte_strings<B: AsRef<[u8]>>(
        name: impl Into<String>,
        shape: Vec<u64>,
        elements: &[B],
    ) -> Result<Self, TensorError> {
        let name = name.into();
        let mut data = Vec::new();
        for (index, element) in elements.iter().enumerate() {
            let bytes = element.as_ref();
            let len = u32::try_from(bytes.len()).map_err(|_| TensorError::BadElement {
                tensor: name.clone(),
                index: index as u64,
                expected: "a byte string shorter than 4 GiB".to_owned(),
                found: format!("{} bytes", bytes.len()),
            })?;
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(bytes);
        }
        Self::from_bytes(name, DataType::Bytes, shape, data)
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renames the tensor.
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// The element type.
    pub fn datatype(&self) -> DataType {
        self.datatype
    }

    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// The raw little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// How many elements the tensor holds.
    pub fn len(&self) -> u64 {
        // Checked at construction.
        element_count(&self.shape).unwrap_or(0)
    }

    /// Whether the tensor holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as `T`, which must be the tensor's datatype.
    pub fn to_values<T: Element>(&self) -> Result<Vec<T>, TensorError> {
        self.expect_datatype(T::DATATYPE)?;
        Ok(self.data.chunks_exact(T::SIZE).map(T::read_le).collect())
    }

    /// The elements of a BYTES tensor.
    pub fn byte_strings(&self) -> Result<Vec<&[u8]>, TensorError> {
        self.expect_datatype(DataType::Bytes)?;
        Ok(ByteStrings { rest: &self.data }.collect())
    }

    /// The rows `start..end` of the outermost dimension, as a tensor of the same name and type
    /// (BYTES too). A scalar has one row. Rows past the end are [`TensorError::BadShape`].
    pub fn rows(&self, start: u64, end: u64) -> Result<Tensor, TensorError> {
        let total = self.shape.first().copied().unwrap_or(1);
        if start > end || end > total {
            return Err(TensorError::BadShape {
                tensor: self.name.clone(),
                shape: self.signed_shape(),
                reason: "the rows asked for are past its outermost dimension",
            });
        }
        let mut shape = self.shape.clone();
        match shape.first_mut() {
            Some(first) => *first = end - start,
            // A scalar: its one row, or none.
            None if end - start == 1 => return Ok(self.clone()),
            None => shape = vec![0],
        }
        let data = match self.datatype.element_size() {
            Some(size) => {
                let per_row = self.data.len().checked_div(total as usize).unwrap_or(0);
                debug_assert_eq!(per_row % size.max(1), 0);
                self.data[start as usize * per_row..end as usize * per_row].to_vec()
            }
            None => {
                let per_row = element_count(&self.shape[1..]).unwrap_or(0);
                let skip = start.saturating_mul(per_row);
                let take = (end - start).saturating_mul(per_row);
                let mut strings = ByteStrings { rest: &self.data };
                let mut data = Vec::new();
                for (i, element) in strings.by_ref().enumerate() {
                    let i = i as u64;
                    if i >= skip + take {
                        break;
                    }
                    if i >= skip {
                        data.extend_from_slice(&(element.len() as u32).to_le_bytes());
                        data.extend_from_slice(element);
                    }
                }
                data
            }
        };
        Tensor::from_bytes(self.name.clone(), self.datatype, shape, data)
    }

    /// `parts` joined along their outermost dimension: one name, one type, and the same inner
    /// dimensions in every part, else [`TensorError::BadShape`] naming the first that differs.
    pub fn concat_rows(parts: &[Tensor]) -> Result<Tensor, TensorError> {
        let Some(first) = parts.first() else {
            return Err(TensorError::BadShape {
                tensor: String::new(),
                shape: Vec::new(),
                reason: "there are no parts to join",
            });
        };
        let mut rows = 0u64;
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for part in parts {
            if part.name != first.name
                || part.datatype != first.datatype
                || part.shape.len() != first.shape.len()
                || part.shape.get(1..) != first.shape.get(1..)
                || part.shape.is_empty()
            {
                return Err(TensorError::BadShape {
                    tensor: part.name.clone(),
                    shape: part.signed_shape(),
                    reason: "its parts differ in name, type or inner dimensions",
                });
            }
            rows += part.shape[0];
            data.extend_from_slice(&part.data);
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        Tensor::from_bytes(first.name.clone(), first.datatype, shape, data)
    }

    fn signed_shape(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
            .collect()
    }

    fn expect_datatype(&self, expected: DataType) -> Result<(), TensorError> {
        if self.datatype == expected {
            Ok(())
        } else {
            Err(TensorError::DatatypeMismatch {
                tensor: self.name.clone(),
                expected,
                actual: self.datatype,
            })
        }
    }
}

/// The Rust types that map onto a fixed-size [`DataType`].
pub trait Element: Copy + sealed::Sealed {
    /// The datatype of this element type.
    const DATATYPE: DataType;
    /// Bytes per element.
    const SIZE: usize;
    /// Appends the little-endian bytes of `self`.
    fn write_le(self, out: &mut Vec<u8>);
    /// Reads one element from exactly [`Self::SIZE`] little-endian bytes.
    fn read_le(bytes: &[u8]) -> Self;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! numeric_element {
    ($($t:ty => $dt:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DATATYPE: DataType = DataType::$dt;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(bytes);
                <$t>::from_le_bytes(raw)
            }
        }
    )*};
}

numeric_element!(u8 => Uint8, i8 => Int8, i32 => Int32, i64 => Int64, half::f16 => Fp16, f32 => Fp32, f64 => Fp64);

impl sealed::Sealed for bool {}
impl Element for bool {
    const DATATYPE: DataType = DataType::Bool;
    const SIZE: usize = 1;
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
    fn read_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

/// Iterates the elements of BYTES data; stops at the first incomplete element.
struct ByteStrings<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for ByteStrings<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (element, rest) = rest.split_at(len);
        self.rest = rest;
        Some(element)
    }
}

/// Counts the elements of BYTES data, or `None` if the framing does not end exactly at the end.
fn count_byte_strings(data: &[u8]) -> Option<u64> {
    let mut strings = ByteStrings { rest: data };
    let mut count = 0u64;
    while strings.next().is_some() {
        count += 1;
    }
    strings.rest.is_empty().then_some(count)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn rows_are_cut_and_joined_back_for_every_type() {
        let x = Tensor::from_values("x", vec![3, 2], &[1f32, 2., 3., 4., 5., 6.]).unwrap();
        let middle = x.rows(1, 2).unwrap();
        assert_eq!(middle.shape(), &[1, 2]);
        assert_eq!(middle.to_values::<f32>().unwrap(), vec![3., 4.]);
        let parts = [x.rows(0, 1).unwrap(), x.rows(1, 3).unwrap()];
        assert_eq!(Tensor::concat_rows(&parts).unwrap(), x);
        assert!(x.rows(2, 4).is_err());
        assert!(x.rows(2, 1).is_err());
        let texts = Tensor::from_byte_strings("t", vec![3], &["a", "bb", "ccc"]).unwrap();
        let tail = texts.rows(1, 3).unwrap();
        assert_eq!(tail.byte_strings().unwrap(), vec![&b"bb"[..], b"ccc"]);
        let parts = [texts.rows(0, 1).unwrap(), tail];
        assert_eq!(Tensor::concat_rows(&parts).unwrap(), texts);
        let other = Tensor::from_values("x", vec![1, 3], &[1f32, 2., 3.]).unwrap();
        let err = Tensor::concat_rows(&[x, other]).unwrap_err();
        assert!(err.to_string().contains("inner dimensions"), "{err}");
        assert!(Tensor::concat_rows(&[]).is_err());
    }

    #[test]
    fn raw_bytes_are_checked() {
        let err = Tensor::from_bytes("x", DataType::Fp32, vec![2], vec![0; 7]).unwrap_err();
        assert!(err.to_string().contains("8 bytes"), "{err}");
        assert!(Tensor::from_bytes("b", DataType::Bool, vec![2], vec![1, 3]).is_err());
        // A BYTES element whose length runs past the end.
        assert!(Tensor::from_bytes("s", DataType::Bytes, vec![1], vec![9, 0, 0, 0, b'a']).is_err());
        assert!(Tensor::from_bytes("s", DataType::Bytes, vec![2], vec![1, 0, 0, 0, b'a']).is_err());
    }

    #[test]
    fn datatype_mismatch_is_an_error() {
        let t = Tensor::from_values("x", vec![1], &[1i64]).unwrap();
        let err = t.to_values::<f32>().unwrap_err();
        assert!(err.to_string().contains("is INT64, not FP32"), "{err}");
    }

    #[test]
    fn decoding_checks_the_same_invariants() {
        let t = Tensor::from_values("x", vec![3], &[1.0f32, 2.0, 3.0]).unwrap();
        let mut raw: RawTensor = t.into();
        raw.shape = vec![4];
        let bytes = crate::cbor::encode("tensor", &raw, 1 << 20).unwrap();
        let err = crate::cbor::decode::<Tensor>("tensor", &bytes, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("16 bytes"), "{err}");
    }

    pub(crate) fn datatype_and_values() -> impl Strategy<Value = (Vec<u64>, Tensor)> {
        let shape = proptest::collection::vec(0u64..4, 0..4);
        shape.prop_flat_map(|shape| {
            let n = element_count(&shape).unwrap() as usize;
            let s = shape.clone();
            prop_oneof![
                proptest::collection::vec(any::<bool>(), n).prop_map(move |v| Tensor::from_values(
                    "t",
                    s.clone(),
                    &v
                )
                .unwrap()),
                proptest::collection::vec(any::<u8>(), n).prop_map({
                    let s = shape.clone();
                    move |v| Tensor::from_values("t", s.clone(), &v).unwrap()
                }),
                proptest::collection::vec(any::<i8>(), n).prop_map({
                    let s = shape.clone();
                    move |v| Tensor::from_values("t", s.clone(), &v).unwrap()
                }),
                proptest::collection::vec(any::<i32>(), n).prop_map({
                    let s = shape.clone();
                    move |v| Tensor::from_values("t", s.clone(), &v).unwrap()
                }),
                proptest::collection::vec(any::<i64>(), n).prop_map({
                    let s = shape.clone();
                    move |v| Tensor::from_values("t", s.clone(), &v).unwrap()
                }),
                proptest::collection::vec(-60000.0f32..60000.0, n).prop_map({
                    let s = shape.clone();
                    move |v| {
                        let h: Vec<half::f16> = v.into_iter().map(half::f16::from_f32).collect();
                        Tensor::from_values("t", s.clone(), &h).unwrap()
                    }
                }),
                proptest::collection::vec(-1e30f32..1e30, n).prop_map({
                    let s = shape.clone();
                    move |v| Tensor::from_values("t", s.clone(), &v).unwrap()
                }),
                proptest::collection::vec(-1e300f64..1e300, n).prop_map({
                    let s = shape.clone();
                    move |v| Tensor::from_values("t", s.clone(), &v).unwrap()
                }),
                proptest::collection::vec(".{0,8}", n).prop_map({
                    let s = shape.clone();
                    move |v| Tensor::from_byte_strings("t", s.clone(), &v).unwrap()
                }),
            ]
            .prop_map(move |t| (shape.clone(), t))
        })
    }

    proptest! {
        #[test]
        fn cbor_round_trips((_shape, tensor) in datatype_and_values()) {
            let bytes = crate::cbor::encode("tensor", &tensor, 1 << 20).unwrap();
            prop_assert_eq!(crate::cbor::decode::<Tensor>("tensor", &bytes, 1 << 20).unwrap(), tensor);
        }

        #[test]
        fn datatype_names_round_trip(i in 0usize..9) {
            let d = DataType::ALL[i];
            prop_assert_eq!(d.as_str().parse::<DataType>().unwrap(), d);
            prop_assert_eq!(serde_json::to_value(d).unwrap(), json!(d.as_str()));
        }
    }
}
