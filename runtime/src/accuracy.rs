//! The accuracy gate: how far a quantised model's answers are from the original's.
//!
//! Both models run on the same inputs — the operator's sample file, or inputs generated from the
//! signature: integer inputs that index an embedding table are drawn within the table (its size is
//! read from the graph), other integers from `{0, 1}`, floats uniformly from `[-1, 1)`, dynamic
//! dimensions [`SAMPLE_ROWS`] (the first) or [`SAMPLE_WIDTH`] (the others). For each output:
//! the largest absolute difference, the cosine similarity of the two outputs as vectors, and for
//! classifier outputs (a Softmax's, or one the caller names, such as a cascade's) the share of rows
//! whose top-1 class agrees.

use std::collections::{HashMap, HashSet};
use std::fmt;

use outpost_shared::{DataType, Tensor, TensorSpec};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tract_onnx::pb::ModelProto;

use crate::tract::TractModel;

/// Rows generated for the first dynamic dimension (the batch).
pub const SAMPLE_ROWS: u64 = 64;
/// Size generated for other dynamic dimensions (a sequence length, say).
pub const SAMPLE_WIDTH: u64 = 8;

/// How far a quantised model may be from the original.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// The largest absolute difference of any output element.
    pub max_abs_error: f64,
    /// The smallest cosine similarity of any output.
    pub min_cosine: f64,
    /// The smallest share (0–1) of rows whose top-1 class agrees, on classifier outputs.
    pub min_top1_agreement: f64,
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
    /// The largest absolute difference of an element.
    pub max_abs_error: f64,
    /// Cosine similarity of the two outputs as flat vectors (1: same direction).
    pub cosine: f64,
    /// The share of rows whose top-1 class agrees, for classifier outputs.
    pub top1_agreement: Option<f64>,
}

impl AccuracyReport {
    /// What exceeds `tolerance`, one line per figure; empty when the model passes.
    pub fn violations(&self, tolerance: &Tolerance) -> Vec<String> {
        let mut out = Vec::new();
        for o in &self.outputs {
            // A NaN figure (the model produced NaN) fails every test.
            if o.max_abs_error.is_nan() || o.max_abs_error > tolerance.max_abs_error {
                out.push(format!(
                    "{}: max abs error {:.6} is over {}",
                    o.name, o.max_abs_error, tolerance.max_abs_error
                ));
            }
            if o.cosine.is_nan() || o.cosine < tolerance.min_cosine {
                out.push(format!(
                    "{}: cosine similarity {:.6} is under {}",
                    o.name, o.cosine, tolerance.min_cosine
                ));
            }
            if let Some(agree) = o.top1_agreement
                && (agree.is_nan() || agree < tolerance.min_top1_agreement)
            {
                out.push(format!(
                    "{}: top-1 agreement {:.1} % is under {:.1} %",
                    o.name,
                    agree * 100.0,
                    tolerance.min_top1_agreement * 100.0
                ));
            }
        }
        out
    }
}

impl fmt::Display for AccuracyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, o) in self.outputs.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "{}: max abs error {:.6}, cosine {:.6}",
                o.name, o.max_abs_error, o.cosine
            )?;
            if let Some(a) = o.top1_agreement {
                write!(f, ", top-1 agreement {:.1} %", a * 100.0)?;
            }
        }
        write!(f, " ({} rows, {})", self.rows, self.samples)
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

/// Inputs for `specs`, drawn from a fixed seed (the same model gets the same samples).
pub fn generate_samples(
    specs: &[TensorSpec],
    facts: &GraphFacts,
    seed: u64,
) -> Result<Vec<Tensor>, String> {
    let mut rng = XorShift(seed | 1);
    specs
        .iter()
        .map(|s| {
            let shape = crate::engine::concrete_shape(s, SAMPLE_ROWS, SAMPLE_WIDTH);
            let n = outpost_shared::tensor::element_count(&shape)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n <= 1 << 24)
                .ok_or_else(|| {
                    format!(
                        "input {:?} is too large to sample; give a sample file",
                        s.name
                    )
                })?;
            let bound = facts.index_bounds.get(&s.name).copied().unwrap_or(2).max(1);
            let mut ints = || (0..n).map(|_| rng.below(bound)).collect::<Vec<u64>>();
            let name = s.name.clone();
            let tensor = match s.datatype {
                DataType::Fp32 => {
                    let v: Vec<f32> = (0..n).map(|_| rng.unit() as f32).collect();
                    Tensor::from_values(name, shape, &v)
                }
                DataType::Fp64 => {
                    let v: Vec<f64> = (0..n).map(|_| rng.unit()).collect();
                    Tensor::from_values(name, shape, &v)
                }
                DataType::Int64 => {
                    let v: Vec<i64> = ints().into_iter().map(|i| i as i64).collect();
                    Tensor::from_values(name, shape, &v)
                }
                DataType::Int32 => {
                    let v: Vec<i32> = ints()
                        .into_iter()
                        .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
                        .collect();
                    Tensor::from_values(name, shape, &v)
                }
                DataType::Bool => {
                    let v: Vec<bool> = (0..n).map(|_| rng.below(2) == 1).collect();
                    Tensor::from_values(name, shape, &v)
                }
                other => {
                    return Err(format!(
                        "cannot generate {other} samples for input {:?}; give a sample file",
                        s.name
                    ));
                }
            };
            tensor.map_err(|e| e.to_string())
        })
        .collect()
}

/// Runs `reference` and `candidate` on `samples` and measures the difference. `classifiers`
/// names the outputs whose top-1 class is compared.
pub fn compare(
    reference: &TractModel,
    candidate: &TractModel,
    samples: &[Tensor],
    classifiers: &HashSet<String>,
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
    let outputs = want
        .iter()
        .zip(&got)
        .map(|(w, g)| {
            let name = w.name().to_owned();
            let values = |t: &Tensor| -> Result<Vec<f64>, String> {
                match t.datatype() {
                    DataType::Fp32 => Ok(t
                        .to_values::<f32>()
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .map(f64::from)
                        .collect()),
                    DataType::Fp64 => t.to_values::<f64>().map_err(|e| e.to_string()),
                    other => Err(format!("output {name:?} is {other}, not a float")),
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
            let classes = w.shape().last().copied().unwrap_or(1) as usize;
            let top1_agreement = (classifiers.contains(&name) && classes > 1)
                .then(|| agreement(&a, &b, classes));
            Ok(OutputAccuracy {
                max_abs_error: a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max),
                cosine: cosine(&a, &b),
                top1_agreement,
                name,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(AccuracyReport {
        samples: source.to_owned(),
        rows,
        outputs,
    })
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

/// xorshift64*: deterministic samples without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[-1, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// Uniform in `0..bound` (bound > 0).
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::Dim;

    fn output(name: &str, err: f64, cos: f64, top1: Option<f64>) -> OutputAccuracy {
        OutputAccuracy {
            name: name.into(),
            max_abs_error: err,
            cosine: cos,
            top1_agreement: top1,
        }
    }

    #[test]
    fn violations_name_each_figure_over_tolerance() {
        let tolerance = Tolerance {
            max_abs_error: 0.01,
            min_cosine: 0.999,
            min_top1_agreement: 0.95,
        };
        let report = AccuracyReport {
            samples: "generated".into(),
            rows: 4,
            outputs: vec![
                output("score", 0.001, 0.99999, None),
                output("probs", 0.5, 0.9, Some(0.5)),
                output("broken", f64::NAN, f64::NAN, None),
            ],
        };
        let v = report.violations(&tolerance);
        assert_eq!(v.len(), 5, "{v:?}");
        assert!(v[0].starts_with("probs: max abs error 0.5"));
        assert!(v[2].contains("top-1 agreement 50.0 % is under 95.0 %"));
        assert!(v[3].starts_with("broken"), "NaN must fail: {v:?}");
        let text = report.to_string();
        assert!(
            text.contains("probs: max abs error 0.500000, cosine 0.900000, top-1 agreement 50.0 %")
        );
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

    #[test]
    fn samples_follow_the_signature() {
        let specs = vec![
            TensorSpec {
                name: "ids".into(),
                datatype: DataType::Int64,
                shape: vec![Dim::Dynamic, Dim::Dynamic],
            },
            TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![Dim::Dynamic, Dim::Fixed(3)],
            },
        ];
        let facts = GraphFacts {
            index_bounds: HashMap::from([("ids".to_owned(), 10)]),
            softmax_outputs: HashSet::new(),
        };
        let samples = generate_samples(&specs, &facts, 7).unwrap();
        assert_eq!(samples[0].shape(), &[SAMPLE_ROWS, SAMPLE_WIDTH]);
        let ids = samples[0].to_values::<i64>().unwrap();
        assert!(ids.iter().all(|&i| (0..10).contains(&i)));
        assert!(
            ids.iter().any(|&i| i > 1),
            "ids should spread over the table"
        );
        let x = samples[1].to_values::<f32>().unwrap();
        assert_eq!(x.len() as u64, SAMPLE_ROWS * 3);
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_eq!(samples, generate_samples(&specs, &facts, 7).unwrap());
    }
}
