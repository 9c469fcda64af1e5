//! The Open Inference Protocol v2: a tensor's JSON form ([`JsonTensor`]) and inference bodies,
//! with the binary tensor data extension that Triton's and KServe's HTTP clients use by default.
//!
//! With the extension, a body is a JSON header of `Inference-Header-Content-Length` bytes, then
//! the raw little-endian elements of every tensor whose `parameters.binary_data_size` is set, in
//! the order the tensors appear in the header (BYTES elements each with a 4-byte little-endian
//! length). Outputs travel the same way when the request asks for it: `parameters.binary_data`
//! on a requested output, or `parameters.binary_data_output` on the request for all outputs.
//!
//! The JSON form of one tensor, and its checked conversions to and from a [`Tensor`]
//! ([`Tensor::from_json`], [`Tensor::to_json`]), live in the `json` submodule.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::tensor::{Tensor, TensorError};

pub mod classification;
mod json;

pub use json::JsonTensor;

/// The header that gives the JSON part's length.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The name of the extension, as `GET /v2` lists it.
pub const EXTENSION: &str = "binary_tensor_data";

/// Why an inference body cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum OipError {
    /// The JSON part is malformed.
    #[error("malformed inference body: {0}")]
    Json(String),
    /// `Inference-Header-Content-Length` does not fit the body.
    #[error("Inference-Header-Content-Length is {header} but the body has only {body} bytes")]
    HeaderLength {
        /// The header's value.
        header: usize,
        /// The body's length.
        body: usize,
    },
    /// The binary part's length differs from the sum of `binary_data_size`.
    #[error(
        "the inputs declare {declared} bytes of binary data (binary_data_size), but {actual} follow the JSON"
    )]
    BinaryLength {
        /// The sum of the declared sizes.
        declared: u64,
        /// The bytes after the JSON.
        actual: usize,
    },
    /// A tensor's `binary_data_size` is not a byte count, or comes with `data` as well.
    #[error("input {tensor:?}: {reason}")]
    BadInput {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An input has more rows than the model's `max_batch`.
    #[error(
        "input {tensor:?} has {rows} rows, more than this model's max_batch of {max_batch}; send at most {max_batch} rows per request"
    )]
    TooManyRows {
        /// The input.
        tensor: String,
        /// Its rows (outermost dimension).
        rows: u64,
        /// The model's limit.
        max_batch: u64,
    },
    /// The inputs hold more elements than one request may carry on this device.
    #[error(
        "the inputs hold {total} elements (counted up to input {tensor:?}), more than the {max_elements} one request may carry on this device (max_elements, from its memory budget)"
    )]
    TooManyElements {
        /// The input at which the count passed the limit.
        tensor: String,
        /// Elements counted so far.
        total: u64,
        /// The limit.
        max_elements: u64,
    },
    /// A requested output's parameters are wrong.
    #[error("output {output:?}: {reason}")]
    BadOutput {
        /// The output.
        output: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A tensor's content is wrong.
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// An inference request, its tensors read.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The request id, echoed in the response.
    pub id: Option<String>,
    /// The inputs.
    pub inputs: Vec<Tensor>,
    /// The outputs asked for (empty: all).
    pub outputs: Vec<RequestedOutput>,
    /// Whether outputs not otherwise asked for come as binary data.
    pub binary_output: bool,
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedOutput {
    /// Its name.
    pub name: String,
    /// Whether it comes as binary data.
    pub binary: Option<bool>,
    /// `parameters.classification`: answer its top N classes per row instead
    /// ([`classification::classify`]).
    pub classification: Option<usize>,
}

/// What one request may carry, checked on every input's header before any element is read or
/// any buffer is allocated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// The most rows (the outermost dimension) of any input: the model's `max_batch`, set by
    /// the operator at push; `None` when it has none.
    pub max_batch: Option<u64>,
    /// The most elements all inputs together may hold (derived from the device's memory
    /// budget).
    pub max_elements: u64,
}

impl RequestLimits {
    /// No limit beyond the body's size.
    pub const UNLIMITED: Self = Self {
        max_batch: None,
        max_elements: u64::MAX,
    };
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    id: Option<String>,
    #[serde(borrow)]
    inputs: Vec<json::RequestTensor<'a>>,
    #[serde(default)]
    outputs: Vec<RawOutput>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

fn flag(parameters: Option<&Map<String, Value>>, key: &str) -> Option<bool> {
    parameters.and_then(|p| p.get(key)).and_then(Value::as_bool)
}

/// Splits a body into its JSON part and the binary data after it.
fn split_body(body: &[u8], header_length: Option<usize>) -> Result<(&[u8], &[u8]), OipError> {
    let json_len = header_length.unwrap_or(body.len());
    match (body.get(..json_len), body.get(json_len..)) {
        (Some(j), Some(b)) => Ok((j, b)),
        _ => Err(OipError::HeaderLength {
            header: json_len,
            body: body.len(),
        }),
    }
}

/// Reads a body's tensors (a request's inputs or a response's outputs): every header is checked,
/// against `limits` too, before any tensor's elements are read; JSON elements are parsed straight
/// into the tensor's bytes, binary ones taken from `binary` in order.
fn read_tensors(
    raw: &[json::RequestTensor<'_>],
    mut binary: &[u8],
    limits: &RequestLimits,
) -> Result<Vec<Tensor>, OipError> {
    let mut headers = Vec::with_capacity(raw.len());
    let mut total = 0u64;
    for tensor in raw {
        let size = tensor
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"));
        let size = match size {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| OipError::BadInput {
                tensor: tensor.name.clone(),
                reason: "binary_data_size must be a byte count",
            })?),
        };
        match (size, tensor.data.is_none()) {
            (Some(_), false) => {
                return Err(OipError::BadInput {
                    tensor: tensor.name.clone(),
                    reason: "give either data or binary_data_size, not both",
                });
            }
            (None, true) => {
                return Err(OipError::BadInput {
                    tensor: tensor.name.clone(),
                    reason: "has no data (give data, or binary_data_size and binary data after the JSON)",
                });
            }
            _ => {}
        }
        let header = json::header(&tensor.name, &tensor.shape, &tensor.datatype)?;
        if let (Some(max_batch), Some(&rows)) = (limits.max_batch, header.shape.first())
            && rows > max_batch
        {
            return Err(OipError::TooManyRows {
                tensor: header.name,
                rows,
                max_batch,
            });
        }
        total = total.saturating_add(header.count);
        if total > limits.max_elements {
            return Err(OipError::TooManyElements {
                tensor: header.name,
                total,
                max_elements: limits.max_elements,
            });
        }
        headers.push((header, size));
    }
    // Checked: sizes come from the sender, and a wrapped sum must not pass for a match.
    let declared = headers
        .iter()
        .filter_map(|(_, size)| *size)
        .try_fold(0u64, |total, n| total.checked_add(n));
    if declared != Some(binary.len() as u64) {
        return Err(OipError::BinaryLength {
            declared: declared.unwrap_or(u64::MAX),
            actual: binary.len(),
        });
    }
    let mut tensors = Vec::with_capacity(raw.len());
    for (tensor, (header, size)) in raw.iter().zip(headers) {
        let tensor = match (size, tensor.data) {
            (Some(n), _) => {
                // The sizes add up to the binary part, so each fits; checked all the same.
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                let (Some(data), Some(rest)) = (binary.get(..n), binary.get(n..)) else {
                    return Err(OipError::BinaryLength {
                        declared: n as u64,
                        actual: binary.len(),
                    });
                };
                binary = rest;
                Tensor::from_bytes(header.name, header.datatype, header.shape, data.to_vec())?
            }
            (None, Some(data)) => header.read_json(data)?,
            // Refused above: a tensor without binary_data_size has data.
            (None, None) => {
                return Err(OipError::BadInput {
                    tensor: header.name,
                    reason: "has no data",
                });
            }
        };
        tensors.push(tensor);
    }
    Ok(tensors)
}

impl InferRequest {
    /// Reads a request body; `header_length` is `Inference-Header-Content-Length` when the
    /// request carried it. Every input's header is checked, against `limits` too, before any
    /// input's elements are read; JSON elements are parsed straight into the tensor's bytes.
    pub fn parse(
        body: &[u8],
        header_length: Option<usize>,
        limits: &RequestLimits,
    ) -> Result<Self, OipError> {
        let (json, binary) = split_body(body, header_length)?;
        let raw: RawRequest<'_> =
            serde_json::from_slice(json).map_err(|e| OipError::Json(e.to_string()))?;
        let inputs = read_tensors(&raw.inputs, binary, limits)?;
        Ok(InferRequest {
            id: raw.id,
            inputs,
            outputs: raw
                .outputs
                .into_iter()
                .map(|o| {
                    let classification = match o
                        .parameters
                        .as_ref()
                        .and_then(|p| p.get("classification"))
                    {
                        None => None,
                        Some(n) => match n.as_u64().filter(|&n| n >= 1) {
                            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                            None => {
                                return Err(OipError::BadOutput {
                                    output: o.name,
                                    reason: "classification must be a number of classes, 1 or more",
                                });
                            }
                        },
                    };
                    Ok(RequestedOutput {
                        binary: flag(o.parameters.as_ref(), "binary_data"),
                        classification,
                        name: o.name,
                    })
                })
                .collect::<Result<_, _>>()?,
            binary_output: flag(raw.parameters.as_ref(), "binary_data_output").unwrap_or(false),
        })
    }

    /// The outputs to send, and whether each goes as binary data: those asked for, in the
    /// model's order, or all of them.
    pub fn select<'a>(&self, outputs: &'a [Tensor]) -> Vec<(&'a Tensor, bool)> {
        outputs
            .iter()
            .filter_map(|t| {
                if self.outputs.is_empty() {
                    return Some((t, self.binary_output));
                }
                self.outputs
                    .iter()
                    .find(|o| o.name == t.name())
                    .map(|o| (t, o.binary.unwrap_or(self.binary_output)))
            })
            .collect()
    }
}

/// An encoded body (a request or a response), and the JSON part's length when some tensors
/// travel as binary data after it (the value of `Inference-Header-Content-Length`).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedBody {
    /// The body.
    pub body: Vec<u8>,
    /// The JSON part's length, when binary data follows it.
    pub header_length: Option<usize>,
}

/// Encodes a response: `fields` (model name, version, id, parameters) plus `outputs`, each as
/// JSON or as binary data after the JSON.
pub fn encode_response(
    fields: Map<String, Value>,
    outputs: &[(&Tensor, bool)],
) -> Result<EncodedBody, TensorError> {
    encode_body(fields, Tensors::Outputs, outputs)
}

/// Encodes a request for a server: `inputs`, all as binary data when `binary` (the server lists
/// the extension), and asks for the outputs the same way.
pub fn encode_request(inputs: &[Tensor], binary: bool) -> Result<EncodedBody, TensorError> {
    let mut fields = Map::new();
    if binary {
        fields.insert(
            "parameters".into(),
            serde_json::json!({ "binary_data_output": true }),
        );
    }
    let tensors: Vec<(&Tensor, bool)> = inputs.iter().map(|t| (t, binary)).collect();
    encode_body(fields, Tensors::Inputs, &tensors)
}

/// A body's JSON part.
#[derive(serde::Serialize)]
struct Body<'a> {
    #[serde(flatten)]
    fields: Map<String, Value>,
    #[serde(flatten)]
    tensors: Tensors<'a>,
}

/// A body's tensors: a request's inputs or a response's outputs.
#[derive(serde::Serialize)]
enum Tensors<'a> {
    #[serde(rename = "inputs")]
    Inputs(Vec<Wire<'a>>),
    #[serde(rename = "outputs")]
    Outputs(Vec<Wire<'a>>),
}

/// One tensor as it is written: its elements as JSON, or its size when they follow as binary.
#[derive(serde::Serialize)]
struct Wire<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<json::JsonElements<'a>>,
}

#[derive(serde::Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// `fields` plus the tensors (as `side` names them), each as JSON or as binary data after the
/// JSON.
fn encode_body<'a>(
    fields: Map<String, Value>,
    side: fn(Vec<Wire<'a>>) -> Tensors<'a>,
    tensors: &[(&'a Tensor, bool)],
) -> Result<EncodedBody, TensorError> {
    let mut binary_len = 0usize;
    let mut wire = Vec::with_capacity(tensors.len());
    for &(tensor, as_binary) in tensors {
        let (parameters, data) = if as_binary {
            binary_len = binary_len.saturating_add(tensor.data().len());
            let size = BinarySize {
                binary_data_size: tensor.data().len(),
            };
            (Some(size), None)
        } else {
            (None, Some(json::JsonElements::new(tensor)?))
        };
        wire.push(Wire {
            name: tensor.name(),
            datatype: tensor.datatype().as_str(),
            shape: tensor.shape(),
            parameters,
            data,
        });
    }
    let body = Body {
        fields,
        tensors: side(wire),
    };
    let mut bytes = serde_json::to_vec(&body).map_err(|e| TensorError::BadData {
        tensor: tensors
            .first()
            .map(|(t, _)| t.name().to_owned())
            .unwrap_or_default(),
        reason: format!("cannot be written as JSON: {e}"),
    })?;
    if binary_len == 0 && !tensors.iter().any(|(_, b)| *b) {
        return Ok(EncodedBody {
            body: bytes,
            header_length: None,
        });
    }
    let header_length = bytes.len();
    bytes.reserve_exact(binary_len);
    for (tensor, _) in tensors.iter().filter(|(_, b)| *b) {
        bytes.extend_from_slice(tensor.data());
    }
    Ok(EncodedBody {
        body: bytes,
        header_length: Some(header_length),
    })
}

/// A server's answer to an inference request, its output tensors read.
#[derive(Debug, Clone, PartialEq)]
pub struct InferResponse {
    /// The model that answered, as the server names it.
    pub model_name: Option<String>,
    /// The outputs.
    pub outputs: Vec<Tensor>,
}

#[derive(Deserialize)]
struct RawResponse<'a> {
    #[serde(default)]
    model_name: Option<String>,
    #[serde(borrow)]
    outputs: Vec<json::RequestTensor<'a>>,
}

impl InferResponse {
    /// Reads a response body; `header_length` is `Inference-Header-Content-Length` when the
    /// response carried it. The outputs are checked against `limits` before their elements are
    /// read, as a request's inputs are.
    pub fn parse(
        body: &[u8],
        header_length: Option<usize>,
        limits: &RequestLimits,
    ) -> Result<Self, OipError> {
        let (json, binary) = split_body(body, header_length)?;
        let raw: RawResponse<'_> =
            serde_json::from_slice(json).map_err(|e| OipError::Json(e.to_string()))?;
        Ok(InferResponse {
            outputs: read_tensors(&raw.outputs, binary, limits)?,
            model_name: raw.model_name,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        /// Any body and header length gives a request or an error, never a panic; a request
        /// cut anywhere in its binary part is refused.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256), len in proptest::option::of(0usize..300)) {
            let _ = InferRequest::parse(&body, len, &RequestLimits::UNLIMITED);
        }

        #[test]
        fn truncated_binary_parts_are_refused(cut in 1usize..14) {
            let (body, len) = binary_request();
            prop_assert!(InferRequest::parse(&body[..body.len() - cut], Some(len), &RequestLimits::UNLIMITED).is_err());
        }
    }

    fn binary_request() -> (Vec<u8>, usize) {
        let header = json!({
            "id": "7",
            "inputs": [
                {"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
                {"name": "ids", "shape": [1], "datatype": "INT64", "data": [5]},
                {"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}]
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend(1.5f32.to_le_bytes());
        body.extend((-2.0f32).to_le_bytes());
        body.extend(2u32.to_le_bytes());
        body.extend(b"hi");
        (body, header.len())
    }

    #[test]
    fn reads_binary_and_json_inputs_in_order() {
        let (body, len) = binary_request();
        let r = InferRequest::parse(&body, Some(len), &RequestLimits::UNLIMITED).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.inputs[0].to_values::<f32>().unwrap(), vec![1.5, -2.0]);
        assert_eq!(r.inputs[1].to_values::<i64>().unwrap(), vec![5]);
        assert_eq!(r.inputs[2].byte_strings().unwrap(), vec![b"hi".as_slice()]);
        assert_eq!(r.outputs[0].binary, Some(true));
        assert_eq!(r.outputs[1].binary, None);
    }

    #[test]
    fn refuses_inconsistent_binary_bodies_with_reasons() {
        let (body, len) = binary_request();
        let cases = [
            (&body[..body.len() - 1], Some(len), "declare 14 bytes"),
            (
                &body[..],
                Some(body.len() + 1),
                "Inference-Header-Content-Length",
            ),
            (&body[..], None, "malformed"),
            (&body[..], Some(len - 1), "malformed"),
        ];
        for (body, len, needle) in cases {
            let e = InferRequest::parse(body, len, &RequestLimits::UNLIMITED)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
        // A binary FP32 input whose size does not fit its shape names the tensor.
        let header = r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend(1f32.to_le_bytes());
        let e = InferRequest::parse(&body, Some(header.len()), &RequestLimits::UNLIMITED)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"x\"") && e.contains("8 bytes"), "{e}");
        // Sizes whose sum wraps around must not pass for the bytes sent.
        let half = u64::MAX / 2 + 1;
        let header = format!(
            r#"{{"inputs":[{{"name":"a","shape":[1],"datatype":"UINT8","parameters":{{"binary_data_size":{half}}}}},{{"name":"b","shape":[1],"datatype":"UINT8","parameters":{{"binary_data_size":{half}}}}}]}}"#
        );
        let e = InferRequest::parse(
            header.as_bytes(),
            Some(header.len()),
            &RequestLimits::UNLIMITED,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("binary_data_size"), "{e}");
        for (input, needle) in [
            (
                r#"{"name":"x","shape":[1],"datatype":"FP32","data":[1],"parameters":{"binary_data_size":4}}"#,
                "not both",
            ),
            (
                r#"{"name":"x","shape":[1],"datatype":"FP32"}"#,
                "has no data",
            ),
            (
                r#"{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":-4}}"#,
                "byte count",
            ),
        ] {
            let body = format!(r#"{{"inputs":[{input}]}}"#);
            let e = InferRequest::parse(body.as_bytes(), None, &RequestLimits::UNLIMITED)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn binary_outputs_follow_the_json_header() {
        let y = Tensor::from_values("y", vec![2], &[1.0f32, 2.0]).unwrap();
        let z = Tensor::from_values("z", vec![1], &[3i64]).unwrap();
        let (body, len) = binary_request();
        let request = InferRequest::parse(&body, Some(len), &RequestLimits::UNLIMITED).unwrap();
        let both = [y.clone(), z.clone()];
        let chosen = request.select(&both);
        assert_eq!(chosen, vec![(&y, true), (&z, false)]);
        let mut fields = Map::new();
        fields.insert("model_name".into(), json!("m"));
        let encoded = encode_response(fields, &chosen).unwrap();
        let n = encoded.header_length.unwrap();
        let head: Value = serde_json::from_slice(&encoded.body[..n]).unwrap();
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(head["outputs"][0].get("data").is_none());
        assert_eq!(head["outputs"][1]["data"], json!([3]));
        assert_eq!(&encoded.body[n..], y.data());

        // Without the extension the response is plain JSON.
        let all_json = encode_response(Map::new(), &[(&z, false)]).unwrap();
        assert_eq!(all_json.header_length, None);
        let plain: Value = serde_json::from_slice(&all_json.body).unwrap();
        assert_eq!(plain["outputs"][0]["data"], json!([3]));
    }

    #[test]
    fn limits_are_checked_on_headers_before_elements_are_read() {
        // Elements of the wrong type: the limit must answer first, as nothing is read.
        let body = br#"{"inputs":[{"name":"x","shape":[900000,8],"datatype":"FP32","data":["not read"]}]}"#;
        let batch = RequestLimits {
            max_batch: Some(4096),
            max_elements: u64::MAX,
        };
        let e = InferRequest::parse(body, None, &batch).unwrap_err();
        assert!(
            matches!(
                e,
                OipError::TooManyRows {
                    rows: 900000,
                    max_batch: 4096,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("max_batch of 4096"), "{e}");
        let elements = RequestLimits {
            max_batch: None,
            max_elements: 1000,
        };
        let e = InferRequest::parse(body, None, &elements).unwrap_err();
        assert!(
            e.to_string().contains("7200000 elements") && e.to_string().contains("max_elements"),
            "{e}"
        );
        // The count is over all inputs together, binary ones included.
        let header = r#"{"inputs":[{"name":"a","shape":[600],"datatype":"UINT8","parameters":{"binary_data_size":600}},{"name":"b","shape":[600],"datatype":"UINT8","data":[]}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend([0u8; 600]);
        let e = InferRequest::parse(&body, Some(header.len()), &elements).unwrap_err();
        assert!(
            matches!(e, OipError::TooManyElements { total: 1200, ref tensor, .. } if tensor == "b"),
            "{e:?}"
        );
        // Within the limits the same kind of request is read.
        let ok =
            br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4]]}]}"#;
        let limits = RequestLimits {
            max_batch: Some(2),
            max_elements: 4,
        };
        let r = InferRequest::parse(ok, None, &limits).unwrap();
        assert_eq!(
            r.inputs[0].to_values::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn nesting_deeper_than_the_shape_and_hostile_json_are_refused() {
        let deeper = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[[1],[2]]}]}"#;
        let e = InferRequest::parse(deeper, None, &RequestLimits::UNLIMITED).unwrap_err();
        assert!(
            e.to_string()
                .contains("nested deeper than its shape's 1 dimensions"),
            "{e}"
        );
        // A hundred thousand open brackets: an error, not a stack overflow.
        let mut deep = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":"#.to_vec();
        deep.extend(std::iter::repeat_n(b'[', 100_000));
        let e = InferRequest::parse(&deep, None, &RequestLimits::UNLIMITED).unwrap_err();
        assert!(matches!(e, OipError::Json(_)), "{e:?}");
        // An element that is an object, and a shape that claims more than the text holds.
        let object = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[{"a":1}]}]}"#;
        let e = InferRequest::parse(object, None, &RequestLimits::UNLIMITED).unwrap_err();
        assert!(e.to_string().contains("element 0 is an object"), "{e}");
        let claims =
            br#"{"inputs":[{"name":"x","shape":[100000000000],"datatype":"FP64","data":[1]}]}"#;
        let e = InferRequest::parse(claims, None, &RequestLimits::UNLIMITED).unwrap_err();
        assert!(
            matches!(
                e,
                OipError::Tensor(TensorError::ElementCount { actual: 1, .. })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn json_outputs_are_written_from_the_bytes() {
        let t = Tensor::from_values("y", vec![3], &[0.1f32, -2.5, 1e-3]).unwrap();
        let encoded = encode_response(Map::new(), &[(&t, false)]).unwrap();
        let body: Value = serde_json::from_slice(&encoded.body).unwrap();
        assert_eq!(body["outputs"][0]["data"], json!([0.1, -2.5, 0.001]));
        assert_eq!(body["outputs"][0]["shape"], json!([3]));
        let nan = Tensor::from_values("y", vec![2], &[1.0f32, f32::NAN]).unwrap();
        let e = encode_response(Map::new(), &[(&nan, false)]).unwrap_err();
        assert!(e.to_string().contains("element 1"), "{e}");
    }

    /// What a client encodes, a server reads the same; what a server answers, a client reads
    /// the same: JSON and binary both, BYTES included.
    #[test]
    fn requests_and_responses_round_trip() {
        let x = Tensor::from_values("x", vec![2, 2], &[1.5f32, -2.0, 0.0, 7.25]).unwrap();
        let ids = Tensor::from_values("ids", vec![3], &[5i64, -1, 9]).unwrap();
        let s = Tensor::from_byte_strings("s", vec![2], &[b"hi".as_slice(), b""]).unwrap();
        let inputs = vec![x, ids, s];
        for binary in [false, true] {
            let encoded = encode_request(&inputs, binary).unwrap();
            assert_eq!(encoded.header_length.is_some(), binary);
            let read = InferRequest::parse(
                &encoded.body,
                encoded.header_length,
                &RequestLimits::UNLIMITED,
            )
            .unwrap();
            assert_eq!(read.inputs, inputs, "binary {binary}");
            assert_eq!(read.binary_output, binary);

            let chosen: Vec<(&Tensor, bool)> = inputs.iter().map(|t| (t, binary)).collect();
            let mut fields = Map::new();
            fields.insert("model_name".into(), json!("m"));
            let answer = encode_response(fields, &chosen).unwrap();
            let read = InferResponse::parse(
                &answer.body,
                answer.header_length,
                &RequestLimits::UNLIMITED,
            )
            .unwrap();
            assert_eq!(read.outputs, inputs, "binary {binary}");
            assert_eq!(read.model_name.as_deref(), Some("m"));
        }
    }

    /// A server's answer is held to the same limits and checks as a client's request.
    #[test]
    fn responses_are_checked_like_requests() {
        let body = br#"{"model_name":"m","outputs":[{"name":"y","shape":[4],"datatype":"FP32","data":[1,2,3,4]}]}"#;
        let limits = RequestLimits {
            max_batch: None,
            max_elements: 3,
        };
        let e = InferResponse::parse(body, None, &limits).unwrap_err();
        assert!(matches!(e, OipError::TooManyElements { .. }), "{e:?}");
        let short = br#"{"outputs":[{"name":"y","shape":[4],"datatype":"FP32","data":[1,2]}]}"#;
        assert!(InferResponse::parse(short, None, &RequestLimits::UNLIMITED).is_err());
        let e = InferResponse::parse(b"<html>", None, &RequestLimits::UNLIMITED).unwrap_err();
        assert!(e.to_string().starts_with("malformed inference body"), "{e}");
    }
}
