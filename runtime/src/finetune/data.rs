//! Labelled examples: JSON Lines, one example a line, the model's inputs as in an inference
//! request (one row each) plus `"label"`:
//!
//! ```json
//! {"inputs":[{"name":"token_ids","shape":[1,5],"datatype":"INT64","data":[12,873,4410,95,7]}],"label":"refund_request"}
//! ```
//!
//! A model with a tokenizer takes its text instead of token ids, as an input (the text input's
//! name, `BYTES`, shape `[1]`) or, shorter, a `"text"` field:
//!
//! ```json
//! {"text":"refund my order","label":"refund_request"}
//! ```
//!
//! A classifier's label is a class index or, where the model names its classes, a name; a
//! score's is a target from 0 to 1. Blank lines are skipped. Every bad line is reported with its
//! number (the first [`MAX_REPORTED`]), and one bad line refuses the whole file: a head trained
//! on part of what the operator meant is not what they asked for.

use outpost_shared::oip::{InferRequest, RequestLimits};
use outpost_shared::{Tensor, TensorSpec};
use serde::Deserialize;

use super::head::{Head, HeadKind};
use crate::engine::check_inputs;
use crate::text::TextTokenizer;

/// Bad lines named in a [`DataError`]; the rest are counted.
pub const MAX_REPORTED: usize = 20;

/// One labelled example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Its inputs, one row each, in the model's input order.
    pub inputs: Vec<Tensor>,
    /// What the head should answer.
    pub label: Label,
    /// Its line in the file (from 1).
    pub line: usize,
}

/// A label.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Label {
    /// A class index (classifier).
    Class(usize),
    /// A target from 0 to 1 (score).
    Target(f32),
}

/// Why a data file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// Lines that could not be used: `(line, reason)`, the first [`MAX_REPORTED`] of `count`.
    #[error("{count} bad line(s) in the data: {}{}", .lines.iter().map(|(n, r)| format!("line {n}: {r}")).collect::<Vec<_>>().join("; "), if *.count > .lines.len() { format!("; and {} more", .count - .lines.len()) } else { String::new() })]
    BadLines {
        /// The first bad lines.
        lines: Vec<(usize, String)>,
        /// All of them.
        count: usize,
    },
    /// More examples than allowed.
    #[error("the data holds more than {limit} examples (the limit)")]
    TooMany {
        /// The limit.
        limit: usize,
    },
    /// Too few to train and judge a head.
    #[error("the data holds {found} examples; a fine-tune needs at least {needed}")]
    TooFew {
        /// Examples found.
        found: usize,
        /// The least that will do.
        needed: usize,
    },
}

#[derive(Deserialize)]
struct LabelField {
    label: Option<serde_json::Value>,
    text: Option<String>,
}

/// Reads `text` as examples for `head` of a model taking `inputs`; at most `max_examples`.
/// `tokenizer`: the model's, when it takes text.
pub fn parse_examples(
    text: &[u8],
    inputs: &[TensorSpec],
    head: &Head,
    max_examples: usize,
    tokenizer: Option<&TextTokenizer>,
) -> Result<Vec<Example>, DataError> {
    let mut examples = Vec::new();
    let mut bad = Vec::new();
    let mut count = 0usize;
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let number = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if examples.len() + count >= max_examples {
            return Err(DataError::TooMany {
                limit: max_examples,
            });
        }
        match parse_line(line, inputs, head, tokenizer) {
            Ok((inputs, label)) => examples.push(Example {
                inputs,
                label,
                line: number,
            }),
            Err(reason) => {
                count += 1;
                if bad.len() < MAX_REPORTED {
                    bad.push((number, reason));
                }
            }
        }
    }
    if count > 0 {
        return Err(DataError::BadLines { lines: bad, count });
    }
    Ok(examples)
}

fn parse_line(
    line: &[u8],
    specs: &[TensorSpec],
    head: &Head,
    tokenizer: Option<&TextTokenizer>,
) -> Result<(Vec<Tensor>, Label), String> {
    let field: LabelField = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let label = match field.label {
        None => return Err("no \"label\"".into()),
        Some(value) => label(&value, head)?,
    };
    let mut given = match field.text {
        Some(text) => {
            let t = tokenizer.ok_or("\"text\": the model has no tokenizer; give its inputs")?;
            vec![
                Tensor::from_byte_strings(t.spec().name.clone(), vec![1], &[text.as_bytes()])
                    .map_err(|e| e.to_string())?,
            ]
        }
        None => {
            InferRequest::parse(line, None, &RequestLimits::UNLIMITED)
                .map_err(|e| e.to_string())?
                .inputs
        }
    };
    if let Some(t) = tokenizer
        && let Some(at) = given.iter().position(|g| g.name() == t.spec().name)
    {
        let text = given.remove(at);
        let ids = specs
            .iter()
            .find(|s| s.name == t.spec().input_ids)
            .ok_or("the model lost its token-id input")?;
        given.extend(t.encode(&text, ids).map_err(|e| e.to_string())?.inputs);
    }
    let ordered = check_inputs(specs, &given).map_err(|e| e.to_string())?;
    let mut inputs = Vec::with_capacity(ordered.len());
    for t in ordered {
        if t.shape().first() != Some(&1) {
            return Err(format!(
                "input {:?} has shape {:?}: an example is one row (the first dimension 1)",
                t.name(),
                t.shape()
            ));
        }
        inputs.push(t.clone());
    }
    Ok((inputs, label))
}

fn label(value: &serde_json::Value, head: &Head) -> Result<Label, String> {
    match head.kind {
        HeadKind::Classifier => {
            let class = match value {
                serde_json::Value::Number(n) => n
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| format!("label {n} is not a class index"))?,
                serde_json::Value::String(name) => {
                    head.labels.iter().position(|l| l == name).ok_or_else(|| {
                        if head.labels.is_empty() {
                            format!(
                                "label {name:?}: the model names no classes (outpost.labels), so labels are indices 0 to {}",
                                head.outputs - 1
                            )
                        } else {
                            format!(
                                "label {name:?} is not one of the head's classes ({})",
                                head.labels.join(", ")
                            )
                        }
                    })?
                }
                other => return Err(format!("label {other} is not a class index or name")),
            };
            if class >= head.outputs {
                return Err(format!(
                    "label {class} is outside the head's {} classes (0 to {})",
                    head.outputs,
                    head.outputs - 1
                ));
            }
            Ok(Label::Class(class))
        }
        HeadKind::Score => {
            let target = match value {
                serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
                serde_json::Value::Number(n) => n
                    .as_f64()
                    .ok_or_else(|| format!("label {n} is not a number"))?,
                other => return Err(format!("label {other} is not a target from 0 to 1")),
            };
            if !(0.0..=1.0).contains(&target) {
                return Err(format!("label {target} is not a target from 0 to 1"));
            }
            Ok(Label::Target(target as f32))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finetune::head::find_head;
    use outpost_shared::DataType;
    use outpost_shared::release::Dim;

    fn setup() -> (Vec<TensorSpec>, Head) {
        let model = model_zoo::DemoModel::IntentClassifier.build(1);
        let head = find_head(&model, None, None).unwrap();
        let specs = vec![TensorSpec {
            name: "token_ids".into(),
            datatype: DataType::Int64,
            shape: vec![Dim::Dynamic, Dim::Dynamic],
        }];
        (specs, head)
    }

    #[test]
    fn examples_are_read_with_names_or_indices() {
        let (specs, head) = setup();
        let text = concat!(
            r#"{"inputs":[{"name":"token_ids","shape":[1,3],"datatype":"INT64","data":[1,2,3]}],"label":"refund_request"}"#,
            "\n\n",
            r#"{"inputs":[{"name":"token_ids","shape":[1,2],"datatype":"INT64","data":[4,5]}],"label":15}"#,
            "\r\n"
        );
        let examples = parse_examples(text.as_bytes(), &specs, &head, 10, None).unwrap();
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[0].label, Label::Class(4));
        assert_eq!((examples[1].label, examples[1].line), (Label::Class(15), 3));
    }

    #[test]
    fn every_bad_line_is_named_by_its_number() {
        let (specs, head) = setup();
        let good = r#"{"inputs":[{"name":"token_ids","shape":[1,2],"datatype":"INT64","data":[4,5]}],"label":1}"#;
        let lines = [
            good,
            "not json",
            r#"{"inputs":[{"name":"token_ids","shape":[1,2],"datatype":"INT64","data":[4,5]}],"label":16}"#,
            r#"{"inputs":[{"name":"token_ids","shape":[1,2],"datatype":"INT64","data":[4,5]}],"label":"dance"}"#,
            r#"{"inputs":[{"name":"token_ids","shape":[1,2],"datatype":"INT64","data":[4,5]}]}"#,
            r#"{"inputs":[{"name":"token_ids","shape":[2,1],"datatype":"INT64","data":[4,5]}],"label":1}"#,
            r#"{"inputs":[{"name":"words","shape":[1,2],"datatype":"INT64","data":[4,5]}],"label":1}"#,
        ];
        let e = parse_examples(lines.join("\n").as_bytes(), &specs, &head, 100, None).unwrap_err();
        let DataError::BadLines { lines: bad, count } = &e else {
            panic!("{e}");
        };
        assert_eq!(*count, 6);
        let numbers: Vec<usize> = bad.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [2, 3, 4, 5, 6, 7]);
        let text = e.to_string();
        for part in [
            "line 2: not JSON",
            "line 3: label 16 is outside the head's 16 classes",
            "line 4: label \"dance\" is not one of the head's classes",
            "line 5: no \"label\"",
            "line 6: input \"token_ids\" has shape [2, 1]",
            "line 7: unknown input \"words\"",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        let many = [good; 11].join("\n");
        assert_eq!(
            parse_examples(many.as_bytes(), &specs, &head, 10, None).unwrap_err(),
            DataError::TooMany { limit: 10 }
        );
    }
}
