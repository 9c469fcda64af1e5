//! A model's head: where it is, the graph without it, and new weights written back in place.
//!
//! The head is `features · W (+ b)` followed by the activation that makes the output: Softmax
//! (a classifier, one probability per class) or Sigmoid over one column (a score). `W` and `b`
//! must be f32 initializers. MatMul (`W` is `[features, outputs]`) and Gemm (with `transB`, `W` is
//! `[outputs, features]`; `alpha` and `beta` 1, no `transA`) are both read.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tract_onnx::pb::{
    GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto,
    tensor_proto::DataType as PbType,
    type_proto::{Tensor as TensorType, Value as TypeValue},
};

/// What the head's output means, which decides its loss and its figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// Softmax over the classes: cross-entropy; accuracy and log-loss.
    Classifier,
    /// Sigmoid over one column: binary cross-entropy; AUC and log-loss.
    Score,
}

/// A model's head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// The model output it makes.
    pub output: String,
    /// The MatMul or Gemm node's name.
    pub node: String,
    /// Its input: the features the new head is trained on.
    pub features: String,
    /// The weight initializer.
    pub weight: String,
    /// The bias initializer, when the layer has one.
    pub bias: Option<String>,
    /// Whether the weight is stored `[outputs, features]` (Gemm with `transB`).
    pub transposed: bool,
    /// Width of the features.
    pub inputs: usize,
    /// Classes (a classifier) or 1 (a score).
    pub outputs: usize,
    /// What the output means.
    pub kind: HeadKind,
    /// The class names, from the model's `outpost.labels` metadata (comma-separated) when it
    /// has as many as the head has classes.
    pub labels: Vec<String>,
}

/// Why a model's head could not be found or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The model has no graph, or the output or layer named is not in it.
    #[error("{0}")]
    NotFound(String),
    /// The graph around the output is not a head this can retrain.
    #[error("{0}")]
    Unsupported(String),
    /// New weights of the wrong size.
    #[error("{0}")]
    Shape(String),
}

fn graph(model: &ModelProto) -> Result<&GraphProto, HeadError> {
    model
        .graph
        .as_ref()
        .ok_or_else(|| HeadError::NotFound("the model has no graph".into()))
}

/// Finds the head that makes `output` (the model's only output when `None`); `layer` names the
/// MatMul/Gemm node to retrain instead of the one found, which must still feed the output's
/// activation directly (through its bias Add): layers after it would need their own gradients.
pub fn find_head(
    model: &ModelProto,
    output: Option<&str>,
    layer: Option<&str>,
) -> Result<Head, HeadError> {
    let g = graph(model)?;
    let outputs: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let output = match output {
        Some(name) if outputs.contains(&name) => name.to_owned(),
        Some(name) => {
            return Err(HeadError::NotFound(format!(
                "output {name:?} is not an output of the model ({})",
                outputs.join(", ")
            )));
        }
        None if outputs.len() == 1 => outputs[0].to_owned(),
        None => {
            return Err(HeadError::NotFound(format!(
                "the model has {} outputs ({}): name the one to retrain with --output",
                outputs.len(),
                outputs.join(", ")
            )));
        }
    };
    let producers: HashMap<&str, &NodeProto> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let initializers: HashMap<&str, &TensorProto> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let produced_by = |tensor: &str| {
        producers.get(tensor).copied().ok_or_else(|| {
            HeadError::Unsupported(format!("{tensor:?} is not made by a node of the graph"))
        })
    };

    let activation = produced_by(&output)?;
    let kind = match activation.op_type.as_str() {
        "Softmax" => HeadKind::Classifier,
        "Sigmoid" => HeadKind::Score,
        op => {
            return Err(HeadError::Unsupported(format!(
                "output {output:?} comes from a {op} ({:?}); a head ends in Softmax (a classifier) or Sigmoid (a score)",
                activation.name
            )));
        }
    };
    let logits = first_input(activation)?;
    let mut node = produced_by(logits)?;
    let mut bias = None;
    if node.op_type == "Add" {
        let (x, b) = match (node.input.first(), node.input.get(1)) {
            (Some(a), Some(b)) if initializers.contains_key(b.as_str()) => (a, b),
            (Some(a), Some(b)) if initializers.contains_key(a.as_str()) => (b, a),
            _ => {
                return Err(HeadError::Unsupported(format!(
                    "the Add {:?} before {output:?} adds no constant bias",
                    node.name
                )));
            }
        };
        bias = Some(b.clone());
        node = produced_by(x)?;
    }
    if let Some(layer) = layer
        && node.name != layer
    {
        return Err(match g.node.iter().find(|n| n.name == layer) {
            None => HeadError::NotFound(format!("no node named {layer:?} in the graph")),
            Some(n) => HeadError::Unsupported(format!(
                "layer {layer:?} ({}) does not feed {output:?} directly (the layer that does is {:?}); only the last layer can be retrained",
                n.op_type, node.name
            )),
        });
    }
    let (features, weight, transposed) = match node.op_type.as_str() {
        "MatMul" => match (node.input.first(), node.input.get(1)) {
            (Some(x), Some(w)) => (x.clone(), w.clone(), false),
            _ => return Err(HeadError::Unsupported("a MatMul without two inputs".into())),
        },
        "Gemm" => {
            let int = |name: &str, default: i64| {
                node.attribute
                    .iter()
                    .find(|a| a.name == name)
                    .map_or(default, |a| a.i)
            };
            let float = |name: &str| {
                node.attribute
                    .iter()
                    .find(|a| a.name == name)
                    .map_or(1.0, |a| a.f)
            };
            if int("transA", 0) != 0 || float("alpha") != 1.0 || float("beta") != 1.0 {
                return Err(HeadError::Unsupported(format!(
                    "Gemm {:?} has transA, alpha or beta set: only transB is read",
                    node.name
                )));
            }
            if let Some(c) = node.input.get(2).filter(|c| !c.is_empty()) {
                if bias.is_some() {
                    return Err(HeadError::Unsupported(format!(
                        "Gemm {:?} has a bias and an Add after it",
                        node.name
                    )));
                }
                bias = Some(c.clone());
            }
            match (node.input.first(), node.input.get(1)) {
                (Some(x), Some(w)) => (x.clone(), w.clone(), int("transB", 0) != 0),
                _ => return Err(HeadError::Unsupported("a Gemm without two inputs".into())),
            }
        }
        op => {
            return Err(HeadError::Unsupported(format!(
                "{output:?} is not made by a MatMul or Gemm layer (found {op} {:?} before its activation)",
                node.name
            )));
        }
    };
    let w = initializers.get(weight.as_str()).ok_or_else(|| {
        HeadError::Unsupported(format!(
            "the weight {weight:?} of {:?} is computed, not a constant",
            node.name
        ))
    })?;
    if w.data_type != PbType::Float as i32 || w.dims.len() != 2 {
        return Err(HeadError::Unsupported(format!(
            "the weight {weight:?} must be a 2-D f32 constant (it is type {} with dims {:?})",
            w.data_type, w.dims
        )));
    }
    let (rows, cols) = (dim(w.dims[0])?, dim(w.dims[1])?);
    let (inputs, outputs) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    if let Some(b) = &bias {
        let t = initializers.get(b.as_str()).ok_or_else(|| {
            HeadError::Unsupported(format!("the bias {b:?} is computed, not a constant"))
        })?;
        let count: i64 = t.dims.iter().product();
        if t.data_type != PbType::Float as i32 || count != outputs as i64 {
            return Err(HeadError::Unsupported(format!(
                "the bias {b:?} must be {outputs} f32 values (it is type {} with dims {:?})",
                t.data_type, t.dims
            )));
        }
    }
    if kind == HeadKind::Score && outputs != 1 {
        return Err(HeadError::Unsupported(format!(
            "output {output:?} is a Sigmoid over {outputs} columns; a score head has one"
        )));
    }
    if kind == HeadKind::Classifier && outputs < 2 {
        return Err(HeadError::Unsupported(format!(
            "output {output:?} is a Softmax over {outputs} column; a classifier needs two classes or more"
        )));
    }
    let labels: Vec<String> = model
        .metadata_props
        .iter()
        .find(|p| p.key == "outpost.labels")
        .map(|p| p.value.split(',').map(|l| l.trim().to_owned()).collect())
        .filter(|l: &Vec<String>| l.len() == outputs)
        .unwrap_or_default();
    Ok(Head {
        output,
        node: node.name.clone(),
        features,
        weight,
        bias,
        transposed,
        inputs,
        outputs,
        kind,
        labels,
    })
}

fn first_input(node: &NodeProto) -> Result<&str, HeadError> {
    node.input
        .first()
        .map(String::as_str)
        .ok_or_else(|| HeadError::Unsupported(format!("node {:?} has no input", node.name)))
}

fn dim(d: i64) -> Result<usize, HeadError> {
    usize::try_from(d)
        .ok()
        .filter(|&d| d > 0)
        .ok_or_else(|| HeadError::Unsupported(format!("a weight dimension of {d}")))
}

/// The model cut at the head's input: the same inputs, one output (the features), only the
/// nodes and constants the features need.
pub fn feature_model(model: &ModelProto, head: &Head) -> Result<ModelProto, HeadError> {
    let g = graph(model)?;
    let producers: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut needed_nodes = HashSet::new();
    let mut needed_tensors: HashSet<&str> = HashSet::new();
    let mut stack = vec![head.features.as_str()];
    while let Some(tensor) = stack.pop() {
        if !needed_tensors.insert(tensor) {
            continue;
        }
        if let Some(&i) = producers.get(tensor)
            && needed_nodes.insert(i)
        {
            stack.extend(g.node[i].input.iter().map(String::as_str));
        }
    }
    let mut cut = model.clone();
    let Some(out) = cut.graph.as_mut() else {
        return Err(HeadError::NotFound("the model has no graph".into()));
    };
    out.node = g
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| needed_nodes.contains(i))
        .map(|(_, n)| n.clone())
        .collect();
    out.initializer
        .retain(|t| needed_tensors.contains(t.name.as_str()));
    out.output = vec![ValueInfoProto {
        name: head.features.clone(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TensorType {
                elem_type: PbType::Float as i32,
                shape: None,
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }];
    Ok(cut)
}

/// Writes a new head into `model`: `weight` row-major `[inputs][outputs]` (transposed here
/// when the model stores it the other way) and `bias` (`outputs` values; ignored when the
/// layer has none). The initializers keep their names, dims and places, so only their bytes
/// change.
pub fn write_head(
    model: &mut ModelProto,
    head: &Head,
    weight: &[f32],
    bias: &[f32],
) -> Result<(), HeadError> {
    if weight.len() != head.inputs * head.outputs {
        return Err(HeadError::Shape(format!(
            "{} weights for a {}×{} head",
            weight.len(),
            head.inputs,
            head.outputs
        )));
    }
    if head.bias.is_some() && bias.len() != head.outputs {
        return Err(HeadError::Shape(format!(
            "{} biases for {} outputs",
            bias.len(),
            head.outputs
        )));
    }
    let stored: Vec<f32> = if head.transposed {
        let mut t = vec![0.0; weight.len()];
        for i in 0..head.inputs {
            for o in 0..head.outputs {
                t[o * head.inputs + i] = weight[i * head.outputs + o];
            }
        }
        t
    } else {
        weight.to_vec()
    };
    let Some(g) = model.graph.as_mut() else {
        return Err(HeadError::NotFound("the model has no graph".into()));
    };
    let mut set = |name: &str, values: &[f32]| -> Result<(), HeadError> {
        let t = g
            .initializer
            .iter_mut()
            .find(|t| t.name == name)
            .ok_or_else(|| HeadError::NotFound(format!("no initializer {name:?}")))?;
        t.float_data.clear();
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(())
    };
    set(&head.weight, &stored)?;
    if let Some(b) = &head.bias {
        set(b, bias)?;
    }
    Ok(())
}

/// The values of an f32 initializer (raw or `float_data`).
pub fn initializer_values(model: &ModelProto, name: &str) -> Result<Vec<f32>, HeadError> {
    let t = graph(model)?
        .initializer
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| HeadError::NotFound(format!("no initializer {name:?}")))?;
    if !t.raw_data.is_empty() {
        if t.raw_data.len() % 4 != 0 {
            return Err(HeadError::Shape(format!(
                "initializer {name:?} has {} bytes, not a whole number of f32",
                t.raw_data.len()
            )));
        }
        return Ok(t
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect());
    }
    Ok(t.float_data.clone())
}

/// The head's current weights, row-major `[inputs][outputs]`, and its bias (zeros when the
/// layer has none).
pub fn read_head(model: &ModelProto, head: &Head) -> Result<(Vec<f32>, Vec<f32>), HeadError> {
    let stored = initializer_values(model, &head.weight)?;
    if stored.len() != head.inputs * head.outputs {
        return Err(HeadError::Shape(format!(
            "the weight {:?} holds {} values, not {}×{}",
            head.weight,
            stored.len(),
            head.inputs,
            head.outputs
        )));
    }
    let weight = if head.transposed {
        let mut w = vec![0.0; stored.len()];
        for o in 0..head.outputs {
            for i in 0..head.inputs {
                w[i * head.outputs + o] = stored[o * head.inputs + i];
            }
        }
        w
    } else {
        stored
    };
    let bias = match &head.bias {
        Some(b) => initializer_values(model, b)?,
        None => vec![0.0; head.outputs],
    };
    Ok((weight, bias))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent() -> ModelProto {
        model_zoo::DemoModel::IntentClassifier.build(model_zoo::DEFAULT_SEED)
    }

    #[test]
    fn the_intent_classifiers_head_is_found_with_its_labels() {
        let head = find_head(&intent(), None, None).unwrap();
        assert_eq!(head.kind, HeadKind::Classifier);
        assert_eq!((head.inputs, head.outputs), (128, 16));
        assert_eq!(head.weight, "head.weight");
        assert_eq!(head.bias.as_deref(), Some("head.bias"));
        assert_eq!(head.labels[4], "refund_request");
        let ranker = model_zoo::DemoModel::VideoRanker.build(1);
        let head = find_head(&ranker, Some("score"), None).unwrap();
        assert_eq!((head.kind, head.outputs), (HeadKind::Score, 1));
    }

    #[test]
    fn what_is_not_a_head_is_refused_by_name() {
        let music = model_zoo::DemoModel::MusicTwoTower.build(1);
        let e = find_head(&music, None, None).unwrap_err().to_string();
        assert!(e.contains("ReduceSum"), "{e}");
        let e = find_head(&intent(), Some("logits"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("intent_probs"), "{e}");
        let e = find_head(&intent(), None, Some("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no node named \"nope\""), "{e}");
        let first = intent()
            .graph
            .unwrap()
            .node
            .iter()
            .find(|n| n.op_type == "MatMul")
            .unwrap()
            .name
            .clone();
        let e = find_head(&intent(), None, Some(&first))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only the last layer"), "{e}");
    }

    #[test]
    fn writing_a_head_back_changes_only_its_tensors() {
        let mut model = intent();
        let head = find_head(&model, None, None).unwrap();
        let (w, b) = read_head(&model, &head).unwrap();
        let before = model.clone();
        let w2: Vec<f32> = w.iter().map(|x| x + 1.0).collect();
        write_head(&mut model, &head, &w2, &b).unwrap();
        assert_eq!(read_head(&model, &head).unwrap().0, w2);
        let (g0, g1) = (before.graph.unwrap(), model.graph.as_ref().unwrap().clone());
        for (a, c) in g0.initializer.iter().zip(&g1.initializer) {
            assert_eq!(a.name, c.name);
            assert_eq!(a == c, a.name != "head.weight", "{}", a.name);
        }
        assert!(write_head(&mut model, &head, &w2[1..], &b).is_err());
    }

    #[test]
    fn the_feature_model_ends_at_the_heads_input() {
        let model = intent();
        let head = find_head(&model, None, None).unwrap();
        let cut = feature_model(&model, &head).unwrap();
        let g = cut.graph.unwrap();
        assert_eq!(g.output[0].name, head.features);
        assert!(!g.initializer.iter().any(|t| t.name.starts_with("head.")));
        assert!(!g.node.iter().any(|n| n.op_type == "Softmax"));
    }
}
