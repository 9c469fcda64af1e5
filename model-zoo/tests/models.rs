//! Every demo model loads and runs in tract-onnx with dynamic batch sizes, its outputs are finite
//! and of the declared shapes, and the same seed gives the same bytes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use model_zoo::{CATALOG_ITEMS, DEFAULT_SEED, DemoModel, INTENTS, MUSIC_TRACKS, VOCABULARY};
use tract_onnx::prelude::*;

type Plan = Arc<TypedRunnableModel>;

fn load(model: DemoModel) -> Plan {
    let bytes = model.bytes(DEFAULT_SEED);
    tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

/// Deterministic inputs within each model's valid ranges.
fn inputs(model: DemoModel, batch: usize) -> TVec<TValue> {
    let floats = |width: usize| {
        let data: Vec<f32> = (0..batch * width)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        Tensor::from_shape(&[batch, width], &data)
            .unwrap()
            .into_tvalue()
    };
    let ids = |shape: &[usize], range: usize| {
        let n: usize = shape.iter().product();
        let data: Vec<i64> = (0..n).map(|i| ((i * 7919 + 13) % range) as i64).collect();
        Tensor::from_shape(shape, &data).unwrap().into_tvalue()
    };
    match model {
        DemoModel::VideoRanker | DemoModel::VideoRankerXl => {
            tvec!(floats(32), ids(&[batch], CATALOG_ITEMS))
        }
        DemoModel::IntentClassifier => tvec!(ids(&[batch, 12], VOCABULARY)),
        DemoModel::MusicTwoTower => tvec!(floats(24), ids(&[batch], MUSIC_TRACKS)),
    }
}

fn run(plan: &Plan, model: DemoModel, batch: usize) -> Vec<f32> {
    let out = plan.run(inputs(model, batch)).unwrap();
    assert_eq!(out.len(), 1);
    let width = if model == DemoModel::IntentClassifier {
        INTENTS.len()
    } else {
        1
    };
    assert_eq!(
        out[0].shape(),
        &[batch, width],
        "{} batch {batch}",
        model.name()
    );
    let values: Vec<f32> = out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect();
    assert!(
        values.iter().all(|v| v.is_finite()),
        "{}: non-finite output",
        model.name()
    );
    values
}

#[test]
fn small_models_run_with_dynamic_batches() {
    for model in [
        DemoModel::VideoRanker,
        DemoModel::IntentClassifier,
        DemoModel::MusicTwoTower,
    ] {
        let plan = load(model);
        let mut first_rows = Vec::new();
        for batch in [1, 3, 64] {
            let values = run(&plan, model, batch);
            first_rows.push(
                values[..if model == DemoModel::IntentClassifier {
                    16
                } else {
                    1
                }]
                    .to_vec(),
            );
            match model {
                DemoModel::VideoRanker => assert!(values.iter().all(|v| (0.0..=1.0).contains(v))),
                DemoModel::IntentClassifier => {
                    for row in values.chunks(16) {
                        let sum: f32 = row.iter().sum();
                        assert!((sum - 1.0).abs() < 1e-4, "softmax row sums to {sum}");
                    }
                }
                _ => {}
            }
        }
        // Row 0 gets the same inputs at every batch size, so the same answer.
        for row in &first_rows[1..] {
            for (a, b) in row.iter().zip(&first_rows[0]) {
                assert!((a - b).abs() < 1e-5, "{}: {a} vs {b}", model.name());
            }
        }
    }
}

#[test]
fn rankers_distinguish_candidates_and_intents_vary_in_confidence() {
    let scores = run(&load(DemoModel::VideoRanker), DemoModel::VideoRanker, 64);
    let spread = scores.iter().cloned().fold(f32::MIN, f32::max)
        - scores.iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > 1e-3, "all candidates score alike ({spread})");
    // The cascade demo needs both confident and unsure answers.
    let probs = run(
        &load(DemoModel::IntentClassifier),
        DemoModel::IntentClassifier,
        64,
    );
    let top: Vec<f32> = probs
        .chunks(16)
        .map(|r| r.iter().cloned().fold(0.0, f32::max))
        .collect();
    let (lo, hi) = (
        top.iter().cloned().fold(1.0, f32::min),
        top.iter().cloned().fold(0.0, f32::max),
    );
    assert!(hi - lo > 0.1, "top-1 confidence only ranges {lo}..{hi}");
}

#[test]
fn xl_ranker_is_big_and_runs() {
    let proto = DemoModel::VideoRankerXl.build(DEFAULT_SEED);
    let params = model_zoo::parameter_count(&proto);
    assert!(params >= 20_000_000, "{params} parameters");
    let plan = load(DemoModel::VideoRankerXl);
    for batch in [1, 5] {
        let values = run(&plan, DemoModel::VideoRankerXl, batch);
        assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}

/// tract's Gather panics (slice index out of range) on an id outside the table, so engines must
/// check ids against the table size before running: the models say that size in their metadata,
/// and it matches the embedding table's first dimension.
#[test]
fn models_declare_their_id_ranges() {
    for (model, table, key, size) in [
        (
            DemoModel::VideoRanker,
            "item_embedding",
            "outpost.catalog_items",
            CATALOG_ITEMS,
        ),
        (
            DemoModel::VideoRankerXl,
            "item_embedding",
            "outpost.catalog_items",
            CATALOG_ITEMS,
        ),
        (
            DemoModel::MusicTwoTower,
            "track_embedding",
            "outpost.catalog_items",
            MUSIC_TRACKS,
        ),
        (
            DemoModel::IntentClassifier,
            "token_embedding",
            "outpost.vocabulary",
            VOCABULARY,
        ),
    ] {
        let proto = model.build(DEFAULT_SEED);
        let meta = proto.metadata_props.iter().find(|p| p.key == key).unwrap();
        assert_eq!(meta.value, size.to_string());
        let graph = proto.graph.unwrap();
        let init = graph.initializer.iter().find(|t| t.name == table).unwrap();
        assert_eq!(init.dims[0], size as i64, "{}", model.name());
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    for model in [
        DemoModel::VideoRanker,
        DemoModel::IntentClassifier,
        DemoModel::MusicTwoTower,
    ] {
        assert_eq!(model.bytes(7), model.bytes(7), "{}", model.name());
        assert_ne!(model.bytes(7), model.bytes(8), "{}", model.name());
    }
    assert_ne!(
        DemoModel::VideoRanker.bytes(7),
        DemoModel::MusicTwoTower.bytes(7)
    );
}

#[test]
fn write_puts_each_model_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = DemoModel::MusicTwoTower.write(3, dir.path()).unwrap();
    assert_eq!(path, dir.path().join("music-two-tower.onnx"));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        DemoModel::MusicTwoTower.bytes(3)
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
    assert_eq!(
        DemoModel::from_name("video-ranker-xl"),
        Some(DemoModel::VideoRankerXl)
    );
    assert_eq!(DemoModel::from_name("nope"), None);
}
