//! The text models: the tokenizer.json is one the HuggingFace `tokenizers` crate reads, the
//! encoder computes what a BERT-class encoder computes (padding and batching change nothing,
//! embeddings are unit length), and the products answer the texts they were built around.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use model_zoo::encoder::{CATALOG_TITLES, HIDDEN, INTENT_EXAMPLES};
use model_zoo::{DEFAULT_SEED, INTENTS, TextModel, vocab};
use tract_onnx::prelude::*;

type Plan = Arc<TypedRunnableModel>;

fn load(model: TextModel) -> Plan {
    let bytes = model.bytes(DEFAULT_SEED).unwrap();
    tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

fn tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_bytes(vocab::tokenizer_json().as_bytes()).unwrap()
}

/// `texts` as the three inputs, padded with `[PAD]` to `width` tokens.
fn batch(texts: &[&str], width: usize) -> TVec<TValue> {
    let t = tokenizer();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for text in texts {
        let e = t.encode(*text, true).unwrap();
        assert!(
            e.get_ids().len() <= width,
            "{text:?} is longer than {width}"
        );
        for i in 0..width {
            ids.push(e.get_ids().get(i).map_or(0, |&v| i64::from(v)));
            mask.push(i64::from(i < e.get_ids().len()));
        }
    }
    let n = texts.len();
    let tensor = |v: Vec<i64>| {
        tract_ndarray::Array2::from_shape_vec((n, width), v)
            .unwrap()
            .into_tensor()
            .into_tvalue()
    };
    tvec![tensor(ids), tensor(mask), tensor(vec![0; n * width])]
}

fn rows(value: &TValue) -> Vec<Vec<f32>> {
    let width = *value.shape().last().unwrap();
    let values: Vec<f32> = value
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect();
    values.chunks(width).map(<[f32]>::to_vec).collect()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap()
}

#[test]
fn the_tokenizer_json_reads_as_bert_wordpiece() {
    let t = tokenizer();
    let e = t.encode("Refund my ORDER, please!", true).unwrap();
    assert_eq!(
        e.get_tokens(),
        [
            "[CLS]", "refund", "my", "order", ",", "please", "!", "[SEP]"
        ]
    );
    assert_eq!(e.get_ids()[0], vocab::CLS.1);
    // A word outside the vocabulary splits into pieces; a character outside it is [UNK].
    let e = t.encode("zebras ☃", true).unwrap();
    assert_eq!(
        e.get_tokens(),
        [
            "[CLS]", "z", "##e", "##b", "##r", "##a", "##s", "[UNK]", "[SEP]"
        ]
    );
    assert_eq!(t.get_vocab_size(true), vocab::vocabulary().len());
}

#[test]
fn the_encoder_ignores_padding_and_batching_and_gives_unit_embeddings() {
    let plan = load(TextModel::TextEncoder);
    let texts = ["play calm piano", "my payment failed twice this month"];
    let alone: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            let width = tokenizer().encode(*t, true).unwrap().get_ids().len();
            let out = plan.run(batch(&[t], width)).unwrap();
            assert_eq!(out[0].shape(), &[1, width, HIDDEN]);
            rows(&out[1]).remove(0)
        })
        .collect();
    let together = plan.run(batch(&texts, 24)).unwrap();
    assert_eq!(together[0].shape(), &[2, 24, HIDDEN]);
    for (a, b) in alone.iter().zip(rows(&together[1])) {
        let norm: f32 = b.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-4, "padding moved the embedding by {worst}");
    }
    // Different texts are different.
    let cosine: f32 = alone[0].iter().zip(&alone[1]).map(|(x, y)| x * y).sum();
    assert!(cosine < 0.9, "cosine of unrelated texts {cosine}");
}

#[test]
fn the_intent_classifier_answers_its_examples_and_new_wordings() {
    let plan = load(TextModel::IntentClassifierText);
    let examples: Vec<&str> = INTENT_EXAMPLES.iter().flatten().copied().collect();
    let out = plan.run(batch(&examples, 16)).unwrap();
    assert_eq!(out[0].shape(), &[examples.len(), INTENTS.len()]);
    let wrong: Vec<String> = rows(&out[0])
        .iter()
        .enumerate()
        .filter(|(i, row)| {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4);
            argmax(row) != i / 3
        })
        .map(|(i, row)| format!("{:?} as {}", examples[i], INTENTS[argmax(row)]))
        .collect();
    assert!(wrong.is_empty(), "misclassified: {wrong:?}");
    let new = [
        ("i need a refund for my order", "refund_request"),
        ("how do i reset the password", "reset_password"),
        ("please cancel the subscription", "cancel_subscription"),
        ("can i talk to a person", "talk_to_human"),
    ];
    let texts: Vec<&str> = new.iter().map(|(t, _)| *t).collect();
    let out = plan.run(batch(&texts, 16)).unwrap();
    let wrong: Vec<String> = new
        .iter()
        .zip(rows(&out[0]))
        .filter(|((_, intent), row)| INTENTS[argmax(row)] != *intent)
        .map(|((text, _), row)| format!("{text:?} as {}", INTENTS[argmax(&row)]))
        .collect();
    assert!(wrong.is_empty(), "misclassified: {wrong:?}");
}

#[test]
fn video_search_ranks_the_matching_title_first() {
    let plan = load(TextModel::VideoSearch);
    let queries = [
        ("calm piano music for study", "calm piano for study"),
        ("rock concert live", "live rock concert"),
        ("funny videos of cats", "funny cats and dogs"),
    ];
    let texts: Vec<&str> = queries.iter().map(|(q, _)| *q).collect();
    let out = plan.run(batch(&texts, 12)).unwrap();
    assert_eq!(out[0].shape(), &[queries.len(), CATALOG_TITLES.len()]);
    let wrong: Vec<String> = queries
        .iter()
        .zip(rows(&out[0]))
        .filter(|((_, title), row)| CATALOG_TITLES[argmax(row)] != *title)
        .map(|((q, _), row)| format!("{q:?} found {:?}", CATALOG_TITLES[argmax(&row)]))
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
}

#[test]
fn the_same_seed_gives_the_same_text_models() {
    for m in TextModel::ALL {
        assert_eq!(
            m.bytes(DEFAULT_SEED).unwrap(),
            m.bytes(DEFAULT_SEED).unwrap()
        );
    }
    assert_ne!(
        TextModel::TextEncoder.bytes(1).unwrap(),
        TextModel::TextEncoder.bytes(2).unwrap()
    );
}
