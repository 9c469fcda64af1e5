//! A model's signature as its ONNX file declares it, read from the protobuf alone: for models
//! the coordinator does not run (those a `[[backend]]` serves), which tract may not even load.

use outpost_shared::{DataType, Dim, TensorSpec};
use prost::Message as _;
use tract_onnx::pb::tensor_proto::DataType as PbType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::pb::{ModelProto, ValueInfoProto};

/// The graph's inputs (those that are not initializers) and outputs, as declared. A dimension
/// without a fixed size (a name, or nothing) is dynamic.
pub fn declared_signature(model: &[u8]) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), String> {
    let proto = ModelProto::decode(model).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = proto.graph.ok_or("the ONNX model has no graph")?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = graph
        .input
        .iter()
        .filter(|v| !initializers.contains(v.name.as_str()))
        .map(|v| spec(v, "input"))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = graph
        .output
        .iter()
        .map(|v| spec(v, "output"))
        .collect::<Result<Vec<_>, _>>()?;
    if inputs.is_empty() || outputs.is_empty() {
        return Err(format!(
            "the ONNX graph declares {} inputs and {} outputs; a model needs at least one of each",
            inputs.len(),
            outputs.len()
        ));
    }
    Ok((inputs, outputs))
}

fn spec(value: &ValueInfoProto, role: &str) -> Result<TensorSpec, String> {
    let name = &value.name;
    let Some(TypeValue::TensorType(tensor)) = value.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(format!("{role} {name:?} declares no tensor type"));
    };
    let datatype = match PbType::try_from(tensor.elem_type) {
        Ok(PbType::Float) => DataType::Fp32,
        Ok(PbType::Double) => DataType::Fp64,
        Ok(PbType::Float16) => DataType::Fp16,
        Ok(PbType::Int8) => DataType::Int8,
        Ok(PbType::Uint8) => DataType::Uint8,
        Ok(PbType::Int32) => DataType::Int32,
        Ok(PbType::Int64) => DataType::Int64,
        Ok(PbType::Bool) => DataType::Bool,
        Ok(PbType::String) => DataType::Bytes,
        other => {
            return Err(format!(
                "{role} {name:?} has element type {other:?}, which Outpost does not carry"
            ));
        }
    };
    let Some(shape) = &tensor.shape else {
        return Err(format!(
            "{role} {name:?} declares no shape (its rank is needed to check requests)"
        ));
    };
    let shape = shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(DimValue::DimValue(n)) if n >= 0 => Dim::Fixed(n as u64),
            _ => Dim::Dynamic,
        })
        .collect();
    Ok(TensorSpec {
        name: name.clone(),
        datatype,
        shape,
    })
}
