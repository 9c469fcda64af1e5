//! Features, the split, the training of a new head and the figures that judge it.
//!
//! The head is linear, so its training is a convex problem: softmax cross-entropy (a classifier)
//! or binary cross-entropy (a score) with L2 on the weights, over the features of the training
//! split, minimised full-batch by argmin's L-BFGS (More–Thuente line search), warm-started from
//! the current head. It runs in rounds of [`ROUND_ITERS`] iterations; after each the loss on the
//! validation split is measured and the best weights kept, and training stops when a round
//! brings no gain ([`PATIENCE`] rounds) or after [`MAX_ROUNDS`]. Everything is in a fixed order
//! from a seed, so the same data and seed give the same head.

use std::collections::BTreeMap;

use argmin::core::{CostFunction, Executor, Gradient, State};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;
use ndarray::{Array1, Array2, ArrayView2, Axis};
use outpost_shared::{DataType, Tensor};
use serde::{Deserialize, Serialize};

use super::data::{Example, Label};
use super::head::HeadKind;
use crate::tract::{TractModel, TractOptions};

/// L-BFGS iterations between two looks at the validation loss.
pub const ROUND_ITERS: u64 = 10;
/// Rounds at most.
pub const MAX_ROUNDS: usize = 50;
/// Rounds without a better validation loss before training stops.
pub const PATIENCE: usize = 3;
/// The fewest examples a fine-tune takes: each split needs some.
pub const MIN_EXAMPLES: usize = 20;

/// How to train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Share of the examples held out for the gate.
    pub holdout: f64,
    /// Share of the rest used for early stopping.
    pub validation: f64,
    /// L2 strength on the weights (not the bias).
    pub l2: f64,
    /// Seed of the split.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            holdout: 0.2,
            validation: 0.1,
            l2: 1e-4,
            seed: 2026,
        }
    }
}

/// Why features or training failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrainError {
    /// The feature model did not load or run.
    #[error("computing the features: {0}")]
    Features(String),
    /// The optimiser failed.
    #[error("training the head: {0}")]
    Optimiser(String),
    /// Options out of range.
    #[error("{0}")]
    Options(String),
}

/// The features of every example, row-major `[examples][width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// Examples.
    pub rows: usize,
    /// Width of each.
    pub width: usize,
    /// The values.
    pub values: Vec<f32>,
}

impl Features {
    fn view(&self) -> Result<ArrayView2<'_, f32>, TrainError> {
        ArrayView2::from_shape((self.rows, self.width), &self.values)
            .map_err(|e| TrainError::Features(e.to_string()))
    }
}

/// Runs the feature model (`bytes`, the graph cut at the head's input) over every example,
/// `batch` rows at a time (examples of the same input shapes together), on `threads` threads;
/// `progress(done, total)` after each batch.
pub fn compute_features(
    bytes: &[u8],
    examples: &[Example],
    batch: usize,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Features, TrainError> {
    let model = TractModel::load_with(
        bytes,
        TractOptions {
            threads: threads.max(1),
            shape_plans: 0,
        },
    )
    .map_err(|e| TrainError::Features(e.to_string()))?;
    // Examples with the same shapes, in a fixed order.
    let mut groups: BTreeMap<Vec<Vec<u64>>, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        let shapes = e.inputs.iter().map(|t| t.shape().to_vec()).collect();
        groups.entry(shapes).or_default().push(i);
    }
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; examples.len()];
    let mut width = None;
    let mut done = 0;
    for indices in groups.values() {
        for part in indices.chunks(batch.max(1)) {
            let first = &examples[part[0]];
            let mut inputs = Vec::with_capacity(first.inputs.len());
            for (k, t) in first.inputs.iter().enumerate() {
                let mut data = Vec::with_capacity(t.data().len() * part.len());
                for &i in part {
                    data.extend_from_slice(examples[i].inputs[k].data());
                }
                let mut shape = t.shape().to_vec();
                shape[0] = part.len() as u64;
                inputs.push(
                    Tensor::from_bytes(t.name(), t.datatype(), shape, data)
                        .map_err(|e| TrainError::Features(e.to_string()))?,
                );
            }
            let out = model
                .run(&inputs)
                .map_err(|e| TrainError::Features(e.to_string()))?;
            let out = out
                .first()
                .ok_or_else(|| TrainError::Features("the feature model gave nothing".into()))?;
            if out.datatype() != DataType::Fp32 {
                return Err(TrainError::Features(format!(
                    "the features are {}, not FP32",
                    out.datatype()
                )));
            }
            let values: Vec<f32> = out
                .to_values()
                .map_err(|e| TrainError::Features(e.to_string()))?;
            let w = values.len() / part.len();
            if w == 0 || values.len() != w * part.len() || *width.get_or_insert(w) != w {
                return Err(TrainError::Features(format!(
                    "the features have shape {:?}; a head takes one row of fixed width per example",
                    out.shape()
                )));
            }
            for (j, &i) in part.iter().enumerate() {
                rows[i] = Some(values[j * w..(j + 1) * w].to_vec());
            }
            done += part.len();
            progress(done, examples.len());
        }
    }
    let width = width.unwrap_or(0);
    let mut values = Vec::with_capacity(examples.len() * width);
    for row in rows {
        values.extend(row.ok_or_else(|| TrainError::Features("an example was missed".into()))?);
    }
    Ok(Features {
        rows: examples.len(),
        width,
        values,
    })
}

/// Which examples train, stop training early, and judge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Indices of the training examples.
    pub train: Vec<usize>,
    /// Indices of the validation examples (early stopping).
    pub validation: Vec<usize>,
    /// Indices of the held-out examples (the gate).
    pub holdout: Vec<usize>,
}

/// Shuffles `0..n` with `options.seed` and cuts it into held-out, validation and train.
pub fn split(n: usize, options: &TrainOptions) -> Result<Split, TrainError> {
    if !(0.05..=0.5).contains(&options.holdout) {
        return Err(TrainError::Options(format!(
            "holdout {} must be from 0.05 to 0.5",
            options.holdout
        )));
    }
    if n < MIN_EXAMPLES {
        return Err(TrainError::Options(format!(
            "{n} examples; a fine-tune needs at least {MIN_EXAMPLES}"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = options.seed;
    for i in (1..n).rev() {
        let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let held = ((n as f64 * options.holdout).round() as usize).max(1);
    let validation = (((n - held) as f64 * options.validation).round() as usize).max(1);
    let holdout = order[..held].to_vec();
    let validation_set = order[held..held + validation].to_vec();
    let train = order[held + validation..].to_vec();
    Ok(Split {
        train,
        validation: validation_set,
        holdout,
    })
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A trained head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trained {
    /// Row-major `[features][outputs]`.
    pub weight: Vec<f32>,
    /// One per output.
    pub bias: Vec<f32>,
    /// L-BFGS iterations run.
    pub iterations: u64,
    /// The best validation loss (the weights kept are those).
    pub validation_loss: f64,
}

/// What a head scores on some examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Examples judged.
    pub examples: usize,
    /// Share of top-1 answers equal to the label (classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Area under the ROC curve, labels read as `>= 0.5` (scores; none when the examples hold
    /// one class only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auc: Option<f64>,
    /// Mean cross-entropy.
    pub log_loss: f64,
}

impl Evaluation {
    /// The figure the gate compares: accuracy for a classifier, AUC for a score.
    pub fn headline(&self) -> Option<f64> {
        self.accuracy.or(self.auc)
    }
}

struct Data {
    x: Array2<f64>,
    classes: Vec<usize>,
    targets: Vec<f64>,
    kind: HeadKind,
    outputs: usize,
    l2: f64,
    bias: bool,
}

fn gather(features: &Features, rows: &[usize]) -> Result<Array2<f64>, TrainError> {
    let view = features.view()?;
    Ok(view.select(Axis(0), rows).mapv(f64::from))
}

impl Data {
    fn new(
        features: &Features,
        labels: &[Label],
        rows: &[usize],
        kind: HeadKind,
        outputs: usize,
        l2: f64,
        bias: bool,
    ) -> Result<Self, TrainError> {
        let x = gather(features, rows)?;
        let mut classes = Vec::new();
        let mut targets = Vec::new();
        for &r in rows {
            match labels.get(r) {
                Some(Label::Class(c)) => classes.push(*c),
                Some(Label::Target(t)) => targets.push(f64::from(*t)),
                None => return Err(TrainError::Options("a label is missing".into())),
            }
        }
        Ok(Self {
            x,
            classes,
            targets,
            kind,
            outputs,
            l2,
            bias,
        })
    }

    fn unpack(&self, p: &[f64]) -> Result<(Array2<f64>, Array1<f64>), argmin::core::Error> {
        let width = self.x.ncols();
        let w = Array2::from_shape_vec((width, self.outputs), p[..width * self.outputs].to_vec())?;
        let b = Array1::from_vec(p[width * self.outputs..].to_vec());
        Ok((w, b))
    }

    /// The mean loss without the penalty, and the gradient of the penalised loss.
    fn loss_and_gradient(
        &self,
        p: &[f64],
        with_gradient: bool,
    ) -> Result<(f64, Vec<f64>), argmin::core::Error> {
        let (w, b) = self.unpack(p)?;
        let n = self.x.nrows().max(1) as f64;
        let mut logits = self.x.dot(&w) + &b;
        let mut loss = 0.0;
        match self.kind {
            HeadKind::Classifier => {
                for (mut row, &y) in logits.rows_mut().into_iter().zip(&self.classes) {
                    let max = row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                    row.mapv_inplace(|v| (v - max).exp());
                    let sum = row.sum();
                    loss += sum.ln() - (row[y].ln());
                    row.mapv_inplace(|v| v / sum);
                    row[y] -= 1.0;
                }
            }
            HeadKind::Score => {
                for (mut row, &y) in logits.rows_mut().into_iter().zip(&self.targets) {
                    let z = row[0];
                    // softplus(z) - y z, stably.
                    loss += z.max(0.0) + (-z.abs()).exp().ln_1p() - y * z;
                    row[0] = 1.0 / (1.0 + (-z).exp()) - y;
                }
            }
        }
        let loss = loss / n;
        if !with_gradient {
            return Ok((loss, Vec::new()));
        }
        // `logits` now holds dLoss/dLogits · n.
        let dw = self.x.t().dot(&logits) / n + &w * self.l2;
        let db = if self.bias {
            logits.sum_axis(Axis(0)) / n
        } else {
            Array1::zeros(self.outputs)
        };
        let mut g = dw.into_raw_vec_and_offset().0;
        g.extend(db);
        Ok((loss, g))
    }

    fn penalty(&self, p: &[f64]) -> f64 {
        let weights = self.x.ncols() * self.outputs;
        0.5 * self.l2 * p[..weights].iter().map(|v| v * v).sum::<f64>()
    }
}

struct Objective<'a>(&'a Data);

impl CostFunction for Objective<'_> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, p: &Self::Param) -> Result<f64, argmin::core::Error> {
        Ok(self.0.loss_and_gradient(p, false)?.0 + self.0.penalty(p))
    }
}

impl Gradient for Objective<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, p: &Self::Param) -> Result<Vec<f64>, argmin::core::Error> {
        Ok(self.0.loss_and_gradient(p, true)?.1)
    }
}

/// Trains a head of `outputs` outputs on the training split, from `weight` and `bias` (the
/// current head), stopping early on the validation split.
#[allow(clippy::too_many_arguments)]
pub fn train_head(
    features: &Features,
    labels: &[Label],
    split: &Split,
    kind: HeadKind,
    outputs: usize,
    has_bias: bool,
    (weight, bias): (&[f32], &[f32]),
    options: &TrainOptions,
) -> Result<Trained, TrainError> {
    let train = Data::new(
        features,
        labels,
        &split.train,
        kind,
        outputs,
        options.l2,
        has_bias,
    )?;
    let validation = Data::new(
        features,
        labels,
        &split.validation,
        kind,
        outputs,
        options.l2,
        has_bias,
    )?;
    let mut param: Vec<f64> = weight.iter().chain(bias).map(|&v| f64::from(v)).collect();
    if param.len() != features.width * outputs + outputs {
        return Err(TrainError::Options(format!(
            "a head of {} values for {} features and {outputs} outputs",
            param.len(),
            features.width
        )));
    }
    let opt = |e: argmin::core::Error| TrainError::Optimiser(e.to_string());
    let mut best_loss = validation.loss_and_gradient(&param, false).map_err(opt)?.0;
    let mut best = param.clone();
    let mut iterations = 0;
    let mut stale = 0;
    for _ in 0..MAX_ROUNDS {
        let solver = LBFGS::new(MoreThuenteLineSearch::new(), 7);
        let result = Executor::new(Objective(&train), solver)
            .configure(|s| s.param(param.clone()).max_iters(ROUND_ITERS))
            .run()
            .map_err(opt)?;
        let state = result.state();
        iterations += state.get_iter();
        let Some(next) = state.get_best_param().cloned() else {
            break;
        };
        let converged = next == param;
        param = next;
        let loss = validation.loss_and_gradient(&param, false).map_err(opt)?.0;
        if loss < best_loss - 1e-6 {
            best_loss = loss;
            best.clone_from(&param);
            stale = 0;
        } else {
            stale += 1;
        }
        if converged || stale >= PATIENCE {
            break;
        }
    }
    let split_at = features.width * outputs;
    Ok(Trained {
        weight: best[..split_at].iter().map(|&v| v as f32).collect(),
        bias: best[split_at..].iter().map(|&v| v as f32).collect(),
        iterations,
        validation_loss: best_loss,
    })
}

/// How the head `(weight, bias)` does on the examples `rows`.
pub fn evaluate(
    features: &Features,
    labels: &[Label],
    rows: &[usize],
    kind: HeadKind,
    outputs: usize,
    (weight, bias): (&[f32], &[f32]),
) -> Result<Evaluation, TrainError> {
    let data = Data::new(features, labels, rows, kind, outputs, 0.0, true)?;
    let p: Vec<f64> = weight.iter().chain(bias).map(|&v| f64::from(v)).collect();
    let opt = |e: argmin::core::Error| TrainError::Optimiser(e.to_string());
    let (log_loss, _) = data.loss_and_gradient(&p, false).map_err(opt)?;
    let (w, b) = data.unpack(&p).map_err(opt)?;
    let logits = data.x.dot(&w) + &b;
    let (accuracy, auc) = match kind {
        HeadKind::Classifier => {
            let right = logits
                .rows()
                .into_iter()
                .zip(&data.classes)
                .filter(|(row, y)| {
                    let top = row
                        .iter()
                        .enumerate()
                        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &v)| {
                            if v > bv { (i, v) } else { (bi, bv) }
                        })
                        .0;
                    top == **y
                })
                .count();
            (Some(right as f64 / rows.len().max(1) as f64), None)
        }
        HeadKind::Score => {
            let scores: Vec<f64> = logits.column(0).to_vec();
            (None, auc(&scores, &data.targets))
        }
    };
    Ok(Evaluation {
        examples: rows.len(),
        accuracy,
        auc,
        log_loss,
    })
}

/// Area under the ROC curve of `scores` against `targets >= 0.5` (Mann–Whitney, ties halved).
fn auc(scores: &[f64], targets: &[f64]) -> Option<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    let positive: Vec<usize> = (0..targets.len()).filter(|&k| targets[k] >= 0.5).collect();
    let (p, n) = (
        positive.len() as f64,
        (targets.len() - positive.len()) as f64,
    );
    if p == 0.0 || n == 0.0 {
        return None;
    }
    let sum: f64 = positive.iter().map(|&k| ranks[k]).sum();
    Some((sum - p * (p + 1.0) / 2.0) / (p * n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_reversed_and_tied_scores() {
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &[0.0, 0.0, 1.0, 1.0]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]), Some(0.0));
        assert_eq!(auc(&[0.5; 4], &[0.0, 1.0, 0.0, 1.0]), Some(0.5));
        assert_eq!(auc(&[0.5; 2], &[1.0, 1.0]), None);
    }

    #[test]
    fn the_split_is_deterministic_disjoint_and_complete() {
        let options = TrainOptions::default();
        let s = split(1000, &options).unwrap();
        assert_eq!(s, split(1000, &options).unwrap());
        assert_eq!(
            (s.holdout.len(), s.validation.len(), s.train.len()),
            (200, 80, 720)
        );
        let mut all: Vec<usize> = s
            .train
            .iter()
            .chain(&s.validation)
            .chain(&s.holdout)
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert!(split(10, &options).is_err());
        assert!(
            split(
                1000,
                &TrainOptions {
                    holdout: 0.9,
                    ..options
                }
            )
            .is_err()
        );
    }

    /// A linearly separable rule over random features is learnt from a head that knows
    /// nothing of it, and the same seed gives the same head.
    #[test]
    fn a_linear_rule_is_learnt_and_training_is_deterministic() {
        let (rows, width, classes) = (2000, 24, 5);
        let mut state = 7u64;
        let mut uniform = || (splitmix(&mut state) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        let values: Vec<f32> = (0..rows * width).map(|_| uniform() as f32).collect();
        let teacher: Vec<f64> = (0..width * classes).map(|_| uniform()).collect();
        let labels: Vec<Label> = (0..rows)
            .map(|r| {
                let score = |c: usize| {
                    (0..width)
                        .map(|i| f64::from(values[r * width + i]) * teacher[i * classes + c])
                        .sum::<f64>()
                };
                Label::Class(
                    (0..classes)
                        .max_by(|&a, &b| score(a).total_cmp(&score(b)))
                        .unwrap(),
                )
            })
            .collect();
        let features = Features {
            rows,
            width,
            values,
        };
        let options = TrainOptions::default();
        let s = split(rows, &options).unwrap();
        let zero = (vec![0.0; width * classes], vec![0.0; classes]);
        let before = evaluate(
            &features,
            &labels,
            &s.holdout,
            HeadKind::Classifier,
            classes,
            (&zero.0, &zero.1),
        )
        .unwrap();
        let trained = train_head(
            &features,
            &labels,
            &s,
            HeadKind::Classifier,
            classes,
            true,
            (&zero.0, &zero.1),
            &options,
        )
        .unwrap();
        let after = evaluate(
            &features,
            &labels,
            &s.holdout,
            HeadKind::Classifier,
            classes,
            (&trained.weight, &trained.bias),
        )
        .unwrap();
        assert!(after.accuracy.unwrap() >= 0.9, "{before:?} -> {after:?}");
        assert!(after.log_loss < before.log_loss);
        let again = train_head(
            &features,
            &labels,
            &s,
            HeadKind::Classifier,
            classes,
            true,
            (&zero.0, &zero.1),
            &options,
        )
        .unwrap();
        assert_eq!(again, trained);
    }
}
