//! Labelled data sets for the fine-tuning demo, as JSON Lines (`cloud-coordinator finetune
//! --data`): one example a line, the model's inputs as in an inference request plus `"label"`.
//!
//! The labels follow a rule the model's current head does not know: a new linear read-out of
//! the model's own penultimate features (the features its head sees), drawn from `rule_seed`
//! and centred on the data so every class (or both scores) occurs. That is what "this season's
//! intents" or a new catalogue is to a model that already understands messages or viewers: the
//! representation stays, the mapping on top changes, and a retrained head can learn all of it.
//! So a head that learnt the rule can reach 100 % of the rule's accuracy, and the old head is
//! at chance. Intent messages the rule barely decides (the third with the smallest margin
//! between their two best intents) are left out, as an operator would not label them either. Only the demo models with a dense head before their output have data sets:
//! `intent-classifier` (16 intents, labels by name) and `video-ranker` (a 0/1 score).

use std::fmt::Write as _;

use tract_onnx::pb::{ModelProto, TensorProto};

use crate::graph::Rng;
use crate::{CATALOG_ITEMS, DemoModel, INTENTS, VIDEO_USER_FEATURES, VOCABULARY};

/// Why a data set could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelledError {
    /// The model has no data set.
    #[error(
        "{0} has no labelled data set (intent-classifier and video-ranker have: their heads are dense layers)"
    )]
    NoDataSet(&'static str),
    /// The model's weights are not where the generator looks.
    #[error("the model has no weight {0:?}")]
    Weight(String),
}

/// Words an operator's messages carry around their point, added to the example messages.
const FILLER: [&str; 8] = [
    "please", "hi", "thanks", "today", "again", "now", "help", "hello",
];

/// `count` labelled text examples for `intent-classifier-text` (`{"text": …, "label": …}`):
/// the intent examples of [`crate::encoder::INTENT_EXAMPLES`], a word dropped or a polite word
/// added here and there, each intent's messages labelled as another intent (a derangement
/// drawn from `rule_seed`: this season's taxonomy). The old head answers the old intents, so it
/// is at 0 %; the encoder's embedding keeps the messages of one intent together, so a new head
/// learns the mapping.
pub fn text_examples(rule_seed: u64, count: usize) -> String {
    let mut rng = Rng::new(rule_seed ^ 0x7e47_da7a);
    let n = INTENTS.len();
    // A random rotation of the intents by 1..n: every intent moves.
    let shift = 1 + (rng.next_u64() % (n as u64 - 1)) as usize;
    let mut out = String::new();
    for _ in 0..count {
        let intent = (rng.next_u64() % n as u64) as usize;
        let examples = &crate::encoder::INTENT_EXAMPLES[intent];
        let base = examples[(rng.next_u64() % examples.len() as u64) as usize];
        let mut words: Vec<&str> = base.split(' ').collect();
        if words.len() > 3 && rng.next_u64().is_multiple_of(3) {
            let at = (rng.next_u64() % words.len() as u64) as usize;
            words.remove(at);
        }
        if rng.next_u64().is_multiple_of(2) {
            let filler = FILLER[(rng.next_u64() % FILLER.len() as u64) as usize];
            if rng.next_u64().is_multiple_of(2) {
                words.insert(0, filler);
            } else {
                words.push(filler);
            }
        }
        let line = serde_json::json!({
            "text": words.join(" "),
            "label": INTENTS[(intent + shift) % n],
        });
        let _ = writeln!(out, "{line}");
    }
    out
}

/// `count` labelled examples for `model` built from `model_seed`, labelled by the rule drawn from
/// `rule_seed`, as JSON Lines.
pub fn labelled_examples(
    model: DemoModel,
    model_seed: u64,
    rule_seed: u64,
    count: usize,
) -> Result<String, LabelledError> {
    let proto = model.build(model_seed);
    let weights = Weights(&proto);
    let mut rng = Rng::new(rule_seed ^ 0x5eed_da7a);
    match model {
        DemoModel::IntentClassifier => intents(&weights, &mut rng, count),
        DemoModel::VideoRanker => ranker(&weights, &mut rng, count),
        other => Err(LabelledError::NoDataSet(other.name())),
    }
}

struct Weights<'a>(&'a ModelProto);

impl Weights<'_> {
    fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), LabelledError> {
        let t: &TensorProto = self
            .0
            .graph
            .as_ref()
            .and_then(|g| g.initializer.iter().find(|t| t.name == name))
            .ok_or_else(|| LabelledError::Weight(name.to_owned()))?;
        let values = t
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((t.dims.iter().map(|&d| d as usize).collect(), values))
    }

    /// `relu(x · W + b)` of the dense layer `name`.
    fn dense_relu(&self, name: &str, x: &[f32]) -> Result<Vec<f32>, LabelledError> {
        let (dims, w) = self.get(&format!("{name}.weight"))?;
        let (_, b) = self.get(&format!("{name}.bias"))?;
        let (fan_in, fan_out) = (dims[0], dims[1]);
        Ok((0..fan_out)
            .map(|o| {
                let sum: f32 = (0..fan_in).map(|i| x[i] * w[i * fan_out + o]).sum();
                (sum + b[o]).max(0.0)
            })
            .collect())
    }
}

/// A linear rule over features of width `width` into `outputs` scores, centred on `features`.
fn rule(rng: &mut Rng, features: &[Vec<f32>], width: usize, outputs: usize) -> Vec<Vec<f32>> {
    let teacher: Vec<f32> = (0..width * outputs).map(|_| rng.uniform(1.0)).collect();
    let n = features.len().max(1) as f32;
    let mean: Vec<f32> = (0..width)
        .map(|i| features.iter().map(|f| f[i]).sum::<f32>() / n)
        .collect();
    features
        .iter()
        .map(|f| {
            (0..outputs)
                .map(|c| {
                    (0..width)
                        .map(|i| (f[i] - mean[i]) * teacher[i * outputs + c])
                        .sum()
                })
                .collect()
        })
        .collect()
}

fn intents(w: &Weights<'_>, rng: &mut Rng, count: usize) -> Result<String, LabelledError> {
    let (dims, table) = w.get("token_embedding")?;
    let width = dims[1];
    // Candidates, of which the clearest `count` are kept (see below).
    let candidates = count + count.div_ceil(2);
    let mut messages = Vec::with_capacity(candidates);
    let mut features = Vec::with_capacity(candidates);
    for _ in 0..candidates {
        let len = 3 + (rng.next_u64() % 10) as usize;
        let tokens: Vec<usize> = (0..len)
            .map(|_| (rng.next_u64() % VOCABULARY as u64) as usize)
            .collect();
        let mut bag = vec![0.0f32; width];
        for &t in &tokens {
            for (b, v) in bag.iter_mut().zip(&table[t * width..(t + 1) * width]) {
                *b += v;
            }
        }
        bag.iter_mut().for_each(|b| *b /= len as f32);
        features.push(w.dense_relu("mlp.0", &bag)?);
        messages.push(tokens);
    }
    let hidden = features.first().map_or(0, Vec::len);
    let scores = rule(rng, &features, hidden, INTENTS.len());
    // A message the rule barely decides (its two best intents almost tied) is one an operator
    // would not label either: the third of the candidates with the smallest margins is left out.
    let margin = |s: &[f32]| {
        let mut sorted = s.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        sorted[0] - sorted.get(1).copied().unwrap_or(0.0)
    };
    let margins: Vec<f32> = scores.iter().map(|s| margin(s)).collect();
    let mut order = margins.clone();
    order.sort_by(|a, b| b.total_cmp(a));
    let threshold = order.get(count.saturating_sub(1)).copied().unwrap_or(0.0);
    let mut out = String::new();
    let mut kept = 0;
    for ((tokens, s), m) in messages.iter().zip(&scores).zip(&margins) {
        if *m < threshold || kept == count {
            continue;
        }
        kept += 1;
        let label = (0..s.len())
            .max_by(|&a, &b| s[a].total_cmp(&s[b]))
            .unwrap_or(0);
        let data: Vec<String> = tokens.iter().map(usize::to_string).collect();
        let _ = writeln!(
            out,
            r#"{{"inputs":[{{"name":"token_ids","shape":[1,{}],"datatype":"INT64","data":[{}]}}],"label":"{}"}}"#,
            tokens.len(),
            data.join(","),
            INTENTS[label]
        );
    }
    Ok(out)
}

fn ranker(w: &Weights<'_>, rng: &mut Rng, count: usize) -> Result<String, LabelledError> {
    let (dims, table) = w.get("item_embedding")?;
    let width = dims[1];
    let mut rows = Vec::with_capacity(count);
    let mut features = Vec::with_capacity(count);
    for _ in 0..count {
        // Three decimals, so the file says exactly what the rule saw.
        let user: Vec<f32> = (0..VIDEO_USER_FEATURES)
            .map(|_| (rng.uniform(1.0) * 1000.0).round() / 1000.0)
            .collect();
        let item = (rng.next_u64() % CATALOG_ITEMS as u64) as usize;
        let mut x = user.clone();
        x.extend_from_slice(&table[item * width..(item + 1) * width]);
        let h = w.dense_relu("mlp.0", &x)?;
        features.push(w.dense_relu("mlp.1", &h)?);
        rows.push((user, item));
    }
    let hidden = features.first().map_or(0, Vec::len);
    let scores = rule(rng, &features, hidden, 1);
    let mut out = String::new();
    for ((user, item), s) in rows.iter().zip(&scores) {
        let data: Vec<String> = user.iter().map(f32::to_string).collect();
        let _ = writeln!(
            out,
            r#"{{"inputs":[{{"name":"user_features","shape":[1,{VIDEO_USER_FEATURES}],"datatype":"FP32","data":[{}]}},{{"name":"item_ids","shape":[1],"datatype":"INT64","data":[{item}]}}],"label":{}}}"#,
            data.join(","),
            u8::from(s[0] > 0.0)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_sets_are_deterministic_and_use_every_class() {
        let a = labelled_examples(DemoModel::IntentClassifier, 1, 2, 400).unwrap();
        assert_eq!(
            a,
            labelled_examples(DemoModel::IntentClassifier, 1, 2, 400).unwrap()
        );
        assert_eq!(a.lines().count(), 400);
        let used = INTENTS
            .iter()
            .filter(|i| a.contains(&format!("\"label\":\"{i}\"")))
            .count();
        assert!(used >= 12, "{used} of 16 intents used");
        let r = labelled_examples(DemoModel::VideoRanker, 1, 2, 400).unwrap();
        let ones = r.matches("\"label\":1").count();
        assert!((100..300).contains(&ones), "{ones} of 400 positive");
        assert_eq!(
            labelled_examples(DemoModel::MusicTwoTower, 1, 2, 1).unwrap_err(),
            LabelledError::NoDataSet("music-two-tower")
        );
    }
}
