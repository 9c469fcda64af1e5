//! The accuracy gate: how far a quantised model's answers are from the original's.
//!
//! Both models run on the same inputs — the operator's sample file, or inputs generated from the
//! signature: integer inputs that index an embedding table are drawn within the table (its size is
//! read from the graph), other integers from `{0, 1}`, floats uniformly from `[-1, 1)`, dynamic
//! dimensions [`SAMPLE_ROWS`] (the first) or [`SAMPLE_WIDTH`] (the others).
//!
//! Each output is judged by what it is ([`OutputKind`]), because the same error means different
//! things: a classifier by the share of rows whose top-1 class agrees and the largest error of a
//! class probability; an embedding by the smallest cosine of any of its vectors (retrieval reads
//! directions); a score by its largest absolute error; integers (labels, ids, a mask passed
//! through) by the share of elements equal. Hidden states (a transformer's last hidden
//! state) are measured and shown but not judged — they are not what an app reads — unless the
//! push names another kind for them, or the model has no other output. Kinds are read from the graph
//! (a Softmax's output, or a cascade's, is a classifier) and the output's shape (rank 3 or more:
//! hidden; one value a row: a score; otherwise an embedding); a push may name them.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use outpost_shared::{DataType, Tensor};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tract_onnx::pb::ModelProto;

use crate::tract::TractModel;

mod samples;

pub use samples::{SAMPLE_ROWS, SAMPLE_WIDTH, generate_samples};

/// How far a quantised model may be from the original, by output kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Scores: the largest absolute difference of any element.
    pub max_abs_error: f64,
    /// Classifiers: the largest absolute difference of any class probability (of the softmax
    /// of each row, when the output holds logits).
    pub max_prob_error: f64,
    /// Embeddings: the smallest cosine similarity of any vector (along the last axis).
    pub min_cosine: f64,
    /// Classifiers: the smallest share (0–1) of rows whose top-1 class agrees.
    pub min_top1_agreement: f64,
}

/// What an output is, which decides how the gate judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// Class probabilities or logits: top-1 agreement and the largest probability error.
    Classifier,
    /// Vectors read by direction (retrieval): the smallest cosine of any vector.
    Embedding,
    /// Numbers read as they are (a ranking score): the largest absolute error. (Also what a
    /// report written before kinds existed reads as.)
    #[default]
    Score,
    /// Intermediate states: measured, not judged unless asked.
    Hidden,
    /// Integers or booleans (class labels, token ids, a mask a model passes through): the
    /// share of elements equal, held to the top-1 agreement's tolerance. The kind of every
    /// output that is not a float, unless the push names another.
    Label,
}

impl OutputKind {
    /// Every kind.
    pub const ALL: [OutputKind; 5] = [
        OutputKind::Classifier,
        OutputKind::Embedding,
        OutputKind::Score,
        OutputKind::Hidden,
        OutputKind::Label,
    ];

    /// The kind's name, as a push writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            OutputKind::Classifier => "classifier",
            OutputKind::Embedding => "embedding",
            OutputKind::Score => "score",
            OutputKind::Hidden => "hidden",
            OutputKind::Label => "label",
        }
    }

    /// The kind an output of `shape` has when nothing else says: rank 3 or more is a hidden
    /// state, one value a row a score, anything else an embedding.
    pub fn from_shape(shape: &[u64]) -> Self {
        match shape {
            s if s.len() >= 3 => OutputKind::Hidden,
            [] | [_] => OutputKind::Score,
            [.., 1] => OutputKind::Score,
            _ => OutputKind::Embedding,
        }
    }
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OutputKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        OutputKind::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "output kind {text:?} must be classifier, embedding, score, hidden or label"
                )
            })
    }
}

/// The figures the gate measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyReport {
    /// Where the inputs came from.
    pub samples: String,
    /// Rows compared (the first dimension of the first output).
    pub rows: u64,
    /// Each output's figures.
    pub outputs: Vec<OutputAccuracy>,
}

/// One output's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputAccuracy {
    /// The output.
    pub name: String,
    /// What it is, which decides the figures judged.
    #[serde(default)]
    pub kind: OutputKind,
    /// Whether the gate judged it (hidden states are only shown).
    #[serde(default = "judged_by_default")]
    pub judged: bool,
    /// The largest absolute difference of an element.
    pub max_abs_error: f64,
    /// Cosine similarity of the two outputs as flat vectors (1: same direction).
    pub cosine: f64,
    /// The smallest cosine similarity of any vector along the last axis (a row of a
    /// `[batch, width]` output).
    #[serde(default = "one")]
    pub min_vector_cosine: f64,
    /// The share of rows whose top-1 class agrees, for classifier outputs; the share of
    /// elements equal, for labels.
    pub top1_agreement: Option<f64>,
    /// The largest difference of a class probability, for classifier outputs.
    #[serde(default)]
    pub max_prob_error: Option<f64>,
}

fn judged_by_default() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

impl OutputAccuracy {
    /// The judged figures as `(what, measured, allowed, distance)`: `distance` is 0 for an
    /// exact match and 1 at the tolerance (more: over it; NaN counts as infinitely far).
    fn figures(&self, tolerance: &Tolerance) -> Vec<(&'static str, f64, f64, f64)> {
        // How far `error` is along the way to `allowed` (an allowance of 0 is passed only by 0).
        let ratio = |error: f64, allowed: f64| {
            if error.is_nan() {
                f64::INFINITY
            } else if allowed <= 0.0 {
                if error <= 0.0 { 0.0 } else { f64::INFINITY }
            } else {
                error / allowed
            }
        };
        if !self.judged {
            return Vec::new();
        }
        match self.kind {
            OutputKind::Classifier => {
                let mut out = Vec::new();
                if let Some(agree) = self.top1_agreement {
                    out.push((
                        "top-1 agreement",
                        agree,
                        tolerance.min_top1_agreement,
                        ratio(1.0 - agree, 1.0 - tolerance.min_top1_agreement),
                    ));
                }
                let prob = self.max_prob_error.unwrap_or(self.max_abs_error);
                out.push((
                    "probability error",
                    prob,
                    tolerance.max_prob_error,
                    ratio(prob, tolerance.max_prob_error),
                ));
                out
            }
            OutputKind::Embedding | OutputKind::Hidden => vec![(
                "smallest vector cosine",
                self.min_vector_cosine,
                tolerance.min_cosine,
                ratio(1.0 - self.min_vector_cosine, 1.0 - tolerance.min_cosine),
            )],
            OutputKind::Score => vec![(
                "max abs error",
                self.max_abs_error,
                tolerance.max_abs_error,
                ratio(self.max_abs_error, tolerance.max_abs_error),
            )],
            OutputKind::Label => {
                let equal = self.top1_agreement.unwrap_or(0.0);
                vec![(
                    "equal elements",
                    equal,
                    tolerance.min_top1_agreement,
                    ratio(1.0 - equal, 1.0 - tolerance.min_top1_agreement),
                )]
            }
        }
    }
}

impl AccuracyReport {
    /// What exceeds `tolerance`, one line per figure; empty when the model passes.
    pub fn violations(&self, tolerance: &Tolerance) -> Vec<String> {
        let mut out = Vec::new();
        for o in &self.outputs {
            // A NaN anywhere means the model is broken, judged output or not.
            if o.max_abs_error.is_nan() && !o.judged {
                out.push(format!("{}: the quantised model produced NaN", o.name));
            }
            for (what, measured, allowed, distance) in o.figures(tolerance) {
                if distance <= 1.0 {
                    continue;
                }
                out.push(match what {
                    "top-1 agreement" | "equal elements" => format!(
                        "{} ({}): {what} {:.1} % is under {:.1} %",
                        o.name,
                        o.kind,
                        measured * 100.0,
                        allowed * 100.0
                    ),
                    "smallest vector cosine" => format!(
                        "{} ({}): smallest vector cosine {measured:.6} is under {allowed}",
                        o.name, o.kind
                    ),
                    _ => format!(
                        "{} ({}): {what} {measured:.6} is over {allowed}",
                        o.name, o.kind
                    ),
                });
            }
        }
        out
    }

    /// How far the worst judged figure is towards its tolerance: 0 for an exact match, 1 at
    /// the tolerance, more past it (infinite for NaN). The fallback ranks weights by it.
    pub fn distance(&self, tolerance: &Tolerance) -> f64 {
        self.outputs
            .iter()
            .flat_map(|o| {
                let nan = o.max_abs_error.is_nan().then_some(f64::INFINITY);
                o.figures(tolerance)
                    .into_iter()
                    .map(|f| f.3)
                    .chain(nan)
                    .collect::<Vec<_>>()
            })
            .fold(0.0, f64::max)
    }
}

impl fmt::Display for AccuracyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, o) in self.outputs.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{o}")?;
        }
        write!(f, " ({} rows, {})", self.rows, self.samples)
    }
}

impl fmt::Display for OutputAccuracy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}{}): max abs error {:.6}",
            self.name,
            self.kind,
            if self.judged { "" } else { ", not judged" },
            self.max_abs_error,
        )?;
        if matches!(self.kind, OutputKind::Embedding | OutputKind::Hidden) {
            write!(f, ", smallest vector cosine {:.6}", self.min_vector_cosine)?;
        }
        match (self.top1_agreement, self.kind) {
            (Some(a), OutputKind::Label) => write!(f, ", equal elements {:.1} %", a * 100.0)?,
            (Some(a), _) => write!(f, ", top-1 agreement {:.1} %", a * 100.0)?,
            (None, _) => {}
        }
        if let Some(p) = self.max_prob_error {
            write!(f, ", probability error {p:.6}")?;
        }
        Ok(())
    }
}

/// What the gate reads from the graph itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphFacts {
    /// Graph inputs used as Gather indices, with the size of the gathered axis (ids must be below).
    pub index_bounds: HashMap<String, u64>,
    /// Graph outputs produced by a Softmax.
    pub softmax_outputs: HashSet<String>,
}

impl GraphFacts {
    /// The output kinds the graph says: a Softmax's output is a classifier.
    pub fn kinds(&self) -> HashMap<String, OutputKind> {
        self.softmax_outputs
            .iter()
            .map(|o| (o.clone(), OutputKind::Classifier))
            .collect()
    }

    /// Reads the facts from an ONNX file.
    pub fn read(model: &[u8]) -> Result<Self, String> {
        let proto = ModelProto::decode(model).map_err(|e| format!("not an ONNX model: {e}"))?;
        let Some(graph) = proto.graph else {
            return Ok(Self::default());
        };
        let sizes: HashMap<&str, &[i64]> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t.dims.as_slice()))
            .collect();
        // Which graph input each value is a shape- or type-changed copy of.
        let mut origin: HashMap<&str, &str> = graph
            .input
            .iter()
            .filter(|i| !sizes.contains_key(i.name.as_str()))
            .map(|i| (i.name.as_str(), i.name.as_str()))
            .collect();
        let mut facts = Self::default();
        for node in &graph.node {
            let first = node.input.first().map(String::as_str).unwrap_or_default();
            match node.op_type.as_str() {
                "Cast" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" => {
                    if let (Some(&o), Some(out)) = (origin.get(first), node.output.first()) {
                        origin.insert(out.as_str(), o);
                    }
                }
                "Gather" => {
                    let axis = node
                        .attribute
                        .iter()
                        .find(|a| a.name == "axis")
                        .map_or(0, |a| a.i);
                    let indices = node.input.get(1).map(String::as_str).unwrap_or_default();
                    let (Some(&input), Some(dims)) = (origin.get(indices), sizes.get(first)) else {
                        continue;
                    };
                    let axis = if axis < 0 {
                        axis + dims.len() as i64
                    } else {
                        axis
                    };
                    let Some(&size) = usize::try_from(axis).ok().and_then(|a| dims.get(a)) else {
                        continue;
                    };
                    let size = u64::try_from(size).unwrap_or(0);
                    facts
                        .index_bounds
                        .entry(input.to_owned())
                        .and_modify(|b| *b = (*b).min(size))
                        .or_insert(size);
                }
                "Softmax" => {
                    facts.softmax_outputs.extend(node.output.iter().cloned());
                }
                _ => {}
            }
        }
        let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
        facts
            .softmax_outputs
            .retain(|o| outputs.contains(o.as_str()));
        Ok(facts)
    }
}

/// Runs `reference` and `candidate` on `samples` and measures the difference. `kinds` names
/// what outputs are; the others' kind is read from their shape ([`OutputKind::from_shape`]).
pub fn compare(
    reference: &TractModel,
    candidate: &TractModel,
    samples: &[Tensor],
    kinds: &HashMap<String, OutputKind>,
    source: &str,
) -> Result<AccuracyReport, String> {
    let want = reference
        .run(samples)
        .map_err(|e| format!("the original model failed on the samples: {e}"))?;
    let got = candidate
        .run(samples)
        .map_err(|e| format!("the quantised model failed on the samples: {e}"))?;
    let rows = want
        .first()
        .and_then(|t| t.shape().first())
        .copied()
        .unwrap_or(1);
    let mut outputs = want
        .iter()
        .zip(&got)
        .map(|(w, g)| {
            let name = w.name().to_owned();
            let values = |t: &Tensor| -> Result<Vec<f64>, String> {
                fn all<T: outpost_shared::tensor::Element>(
                    t: &Tensor,
                    f: impl Fn(T) -> f64,
                ) -> Result<Vec<f64>, String> {
                    Ok(t
                        .to_values::<T>()
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .map(f)
                        .collect())
                }
                match t.datatype() {
                    DataType::Fp32 => all(t, |x: f32| f64::from(x)),
                    DataType::Fp64 => all(t, |x: f64| x),
                    DataType::Fp16 => all(t, |x: half::f16| x.to_f64()),
                    // Exact as f64 up to 2^53: ids and labels are far below.
                    DataType::Int64 => all(t, |x: i64| x as f64),
                    DataType::Int32 => all(t, |x: i32| f64::from(x)),
                    DataType::Int8 => all(t, |x: i8| f64::from(x)),
                    DataType::Uint8 => all(t, |x: u8| f64::from(x)),
                    DataType::Bool => all(t, |x: bool| f64::from(u8::from(x))),
                    other => Err(format!("output {name:?} is {other}, which the gate cannot compare")),
                }
            };
            let (a, b) = (values(w)?, values(g)?);
            if a.len() != b.len() {
                return Err(format!(
                    "output {name:?} has {} values from the original and {} from the quantised model",
                    a.len(),
                    b.len()
                ));
            }
            let width = usize::try_from(w.shape().last().copied().unwrap_or(1))
                .unwrap_or(1)
                .max(1);
            let float = matches!(
                w.datatype(),
                DataType::Fp16 | DataType::Fp32 | DataType::Fp64
            );
            let kind = kinds.get(&name).copied().unwrap_or_else(|| {
                if float {
                    OutputKind::from_shape(w.shape())
                } else {
                    OutputKind::Label
                }
            });
            let classifier = kind == OutputKind::Classifier && width > 1;
            Ok(OutputAccuracy {
                max_abs_error: max_abs_error(&a, &b),
                cosine: cosine(&a, &b),
                min_vector_cosine: a
                    .chunks(width)
                    .zip(b.chunks(width))
                    .map(|(x, y)| cosine(x, y))
                    .fold(1.0, |m, c| if c.is_nan() || c < m { c } else { m }),
                top1_agreement: if kind == OutputKind::Label {
                    Some(equal_share(&a, &b))
                } else {
                    classifier.then(|| agreement(&a, &b, width))
                },
                max_prob_error: classifier.then(|| {
                    let (pa, pb) = (probabilities(&a, width), probabilities(&b, width));
                    max_abs_error(&pa, &pb)
                }),
                judged: kind != OutputKind::Hidden,
                kind,
                name,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    // A model whose outputs are all hidden states is judged on them.
    if !outputs.iter().any(|o| o.judged) {
        for o in &mut outputs {
            o.judged = true;
        }
    }
    Ok(AccuracyReport {
        samples: source.to_owned(),
        rows,
        outputs,
    })
}

/// The share of elements equal (1 for none at all).
fn equal_share(a: &[f64], b: &[f64]) -> f64 {
    if a.is_empty() {
        return 1.0;
    }
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
    equal as f64 / a.len() as f64
}

fn max_abs_error(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| {
            if d.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(d)
            }
        })
}

/// The rows of `values` (`width` a row) as probabilities: as they are when every row already is
/// one (values in `[0, 1]` summing to 1), else the softmax of each row (logits).
fn probabilities(values: &[f64], width: usize) -> Vec<f64> {
    let is_distribution = values.chunks(width).all(|row| {
        row.iter().all(|v| (0.0..=1.0).contains(v)) && (row.iter().sum::<f64>() - 1.0).abs() < 1e-3
    });
    if is_distribution {
        return values.to_vec();
    }
    values
        .chunks(width)
        .flat_map(|row| {
            let top = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = row.iter().map(|v| (v - top).exp()).collect();
            let sum: f64 = exp.iter().sum();
            exp.into_iter().map(move |e| e / sum)
        })
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    match (na == 0.0, nb == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => dot / (na * nb),
    }
}

fn agreement(a: &[f64], b: &[f64], classes: usize) -> f64 {
    let argmax = |row: &[f64]| {
        row.iter()
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0
    };
    let rows = a.len() / classes;
    if rows == 0 {
        return 1.0;
    }
    let same = a
        .chunks_exact(classes)
        .zip(b.chunks_exact(classes))
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    same as f64 / rows as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(
        name: &str,
        kind: OutputKind,
        err: f64,
        cos: f64,
        top1: Option<f64>,
    ) -> OutputAccuracy {
        OutputAccuracy {
            name: name.into(),
            kind,
            judged: kind != OutputKind::Hidden,
            max_abs_error: err,
            cosine: cos,
            min_vector_cosine: cos,
            top1_agreement: top1,
            max_prob_error: top1.map(|_| err),
        }
    }

    const TOLERANCE: Tolerance = Tolerance {
        max_abs_error: 0.01,
        max_prob_error: 0.02,
        min_cosine: 0.99,
        min_top1_agreement: 0.95,
    };

    #[test]
    fn each_kind_is_judged_by_its_own_figures() {
        use OutputKind::*;
        let report = AccuracyReport {
            samples: "generated".into(),
            rows: 4,
            outputs: vec![
                // A score with a cosine that would fail an embedding: judged by its error only.
                output("score", Score, 0.001, 0.5, None),
                output("probs", Classifier, 0.5, 0.9, Some(0.5)),
                // An embedding with a large element error but the right direction passes.
                output("embedding", Embedding, 0.3, 0.995, None),
                output("bad_embedding", Embedding, 0.0, 0.9, None),
                // A hidden state is shown, not judged.
                output("hidden", Hidden, 0.28, 0.5, None),
                output("broken", Score, f64::NAN, f64::NAN, None),
                // Labels: the share of equal elements, whatever their distance.
                output("ids", Label, 0.0, 1.0, Some(1.0)),
                output("labels", Label, 3.0, 0.9, Some(0.5)),
            ],
        };
        let v = report.violations(&TOLERANCE);
        assert_eq!(v.len(), 5, "{v:?}");
        assert_eq!(
            v[4],
            "labels (label): equal elements 50.0 % is under 95.0 %"
        );
        assert_eq!(
            v[0],
            "probs (classifier): top-1 agreement 50.0 % is under 95.0 %"
        );
        assert_eq!(
            v[1],
            "probs (classifier): probability error 0.500000 is over 0.02"
        );
        assert_eq!(
            v[2],
            "bad_embedding (embedding): smallest vector cosine 0.900000 is under 0.99"
        );
        assert!(v[3].starts_with("broken (score)"), "NaN must fail: {v:?}");
        assert!(report.distance(&TOLERANCE).is_infinite());
        let text = report.to_string();
        assert!(
            text.contains("hidden (hidden, not judged): max abs error 0.280000"),
            "{text}"
        );
        assert!(
            text.contains("labels (label): max abs error 3.000000, equal elements 50.0 %"),
            "{text}"
        );
        // An unjudged output that is NaN still fails: the model is broken.
        let mut nan = output("hidden", Hidden, f64::NAN, f64::NAN, None);
        nan.judged = false;
        let broken = AccuracyReport {
            outputs: vec![nan],
            ..report.clone()
        };
        assert_eq!(
            broken.violations(&TOLERANCE),
            ["hidden: the quantised model produced NaN"]
        );
    }

    #[test]
    fn distance_is_one_at_the_tolerance() {
        let at = |o: OutputAccuracy| {
            AccuracyReport {
                samples: String::new(),
                rows: 1,
                outputs: vec![o],
            }
            .distance(&TOLERANCE)
        };
        assert!((at(output("s", OutputKind::Score, 0.01, 1.0, None)) - 1.0).abs() < 1e-9);
        assert!((at(output("e", OutputKind::Embedding, 0.0, 0.995, None)) - 0.5).abs() < 1e-9);
        assert_eq!(at(output("h", OutputKind::Hidden, 9.0, 0.0, None)), 0.0);
        let exact = Tolerance {
            max_abs_error: 0.0,
            ..TOLERANCE
        };
        let zero = AccuracyReport {
            samples: String::new(),
            rows: 1,
            outputs: vec![output("s", OutputKind::Score, 0.0, 1.0, None)],
        };
        assert_eq!(zero.distance(&exact), 0.0);
        assert_eq!(zero.violations(&exact), Vec::<String>::new());
    }

    #[test]
    fn kinds_by_shape_and_by_name() {
        assert_eq!(OutputKind::from_shape(&[4, 1]), OutputKind::Score);
        assert_eq!(OutputKind::from_shape(&[4]), OutputKind::Score);
        assert_eq!(OutputKind::from_shape(&[4, 384]), OutputKind::Embedding);
        assert_eq!(OutputKind::from_shape(&[4, 8, 384]), OutputKind::Hidden);
        for kind in OutputKind::ALL {
            assert_eq!(kind.as_str().parse::<OutputKind>(), Ok(kind));
        }
        let err = "logits".parse::<OutputKind>().unwrap_err();
        assert!(
            err.contains("classifier, embedding, score, hidden or label"),
            "{err}"
        );
    }

    #[test]
    fn probabilities_of_logits_are_their_softmax() {
        let probs = [0.25, 0.75, 1.0, 0.0];
        assert_eq!(probabilities(&probs, 2), probs);
        let p = probabilities(&[0.0, 0.0, 2.0, 2.0], 2);
        assert!(p.iter().all(|v| (v - 0.5).abs() < 1e-12), "{p:?}");
    }

    #[test]
    fn cosine_and_agreement() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0], &[0.0]), 1.0);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        let a = [0.1, 0.9, 0.8, 0.2];
        assert_eq!(agreement(&a, &a, 2), 1.0);
        assert_eq!(agreement(&a, &[0.1, 0.9, 0.1, 0.9], 2), 0.5);
    }
}
