//! Deterministic ONNX generators for the Outpost demo models, so tests and the quickstart need no
//! downloads. Each model is built from a seed; the same seed gives the same bytes.
//!
//! | model | inputs | output |
//! |---|---|---|
//! | `video-ranker` | `user_features` f32 `[batch, 32]`, `item_ids` i64 `[batch]` | `score` f32 `[batch, 1]` |
//! | `video-ranker-xl` | same as `video-ranker` (≈20.5 M parameters; the cloud model) | same |
//! | `intent-classifier` | `token_ids` i64 `[batch, tokens]` | `intent_probs` f32 `[batch, 16]` |
//! | `music-two-tower` | `user_features` f32 `[batch, 24]`, `track_ids` i64 `[batch]` | `score` f32 `[batch, 1]` |
//!
//! The weights are random (Glorot-uniform): the models show shapes, sizes and speed, not taste.
//! The text models (`text-encoder`, `intent-classifier-text`, `video-search`: token ids in, with
//! a HuggingFace `tokenizer.json`) are in [`encoder`], their vocabulary in [`vocab`].
//! [`labelled`] writes labelled data sets for the fine-tuning demo.

pub mod encoder;
pub mod gate;
pub mod graph;
pub mod labelled;
pub mod probe;
pub mod vocab;

pub use encoder::TextModel;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use graph::{Dim, GraphBuilder, int_attr, ints_attr};
use prost::Message as _;
use tract_onnx::pb::{ModelProto, tensor_proto::DataType};

/// The seed the quickstart and the CLI use unless told otherwise.
pub const DEFAULT_SEED: u64 = 2026;
/// Items in the video catalogue: valid `item_ids` are `0..CATALOG_ITEMS`.
pub const CATALOG_ITEMS: usize = 10_000;
/// Tracks in the music catalogue: valid `track_ids` are `0..MUSIC_TRACKS`.
pub const MUSIC_TRACKS: usize = 5_000;
/// Tokens in the intent classifier's vocabulary: valid `token_ids` are `0..VOCABULARY`.
pub const VOCABULARY: usize = 8_000;
/// Width of `user_features` for the video rankers.
pub const VIDEO_USER_FEATURES: usize = 32;
/// Width of `user_features` for the music model.
pub const MUSIC_USER_FEATURES: usize = 24;
/// The customer-service intents, in the order of `intent_probs`.
pub const INTENTS: [&str; 16] = [
    "billing_question",
    "cancel_subscription",
    "change_plan",
    "payment_failed",
    "refund_request",
    "login_problem",
    "reset_password",
    "playback_error",
    "video_quality",
    "download_offline",
    "device_limit",
    "parental_controls",
    "recommendation_feedback",
    "content_request",
    "account_deletion",
    "talk_to_human",
];

/// One of the demo models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DemoModel {
    /// A small video ranker for the device.
    VideoRanker,
    /// A big video ranker for the cloud, with the same signature.
    VideoRankerXl,
    /// A customer-service intent classifier (the cascade demo).
    IntentClassifier,
    /// A two-tower music recommender.
    MusicTwoTower,
}

impl DemoModel {
    /// Every demo model.
    pub const ALL: [DemoModel; 4] = [
        DemoModel::VideoRanker,
        DemoModel::VideoRankerXl,
        DemoModel::IntentClassifier,
        DemoModel::MusicTwoTower,
    ];

    /// The model's name (also its registry name and file stem).
    pub const fn name(self) -> &'static str {
        match self {
            DemoModel::VideoRanker => "video-ranker",
            DemoModel::VideoRankerXl => "video-ranker-xl",
            DemoModel::IntentClassifier => "intent-classifier",
            DemoModel::MusicTwoTower => "music-two-tower",
        }
    }

    /// The model whose name is `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The model as an ONNX protobuf.
    pub fn build(self, seed: u64) -> ModelProto {
        // Each model draws from its own stream, so adding a model never changes another's bytes.
        let seed = seed ^ (self as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        match self {
            DemoModel::VideoRanker => video_ranker(seed, self.name(), 16, &[64, 32]),
            DemoModel::VideoRankerXl => {
                video_ranker(seed, self.name(), 256, &[2048, 4096, 2048, 256])
            }
            DemoModel::IntentClassifier => intent_classifier(seed),
            DemoModel::MusicTwoTower => music_two_tower(seed),
        }
    }

    /// The model's ONNX file bytes.
    pub fn bytes(self, seed: u64) -> Vec<u8> {
        self.build(seed).encode_to_vec()
    }

    /// Writes `{dir}/{name}.onnx` (see [`write_model`]) and returns its path.
    pub fn write(self, seed: u64, dir: &Path) -> std::io::Result<PathBuf> {
        write_model(dir, self.name(), &self.bytes(seed))
    }
}

/// Writes `bytes` as `{dir}/{name}.onnx` through a temporary file and a rename, so a crash never
/// leaves a partial model under the final name; returns its path.
pub fn write_model(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.onnx"));
    let tmp = dir.join(format!(".{name}.onnx.tmp"));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}

/// `[user_features, embedding(item_ids)] → MLP → sigmoid`.
fn video_ranker(seed: u64, name: &str, embedding: usize, hidden: &[usize]) -> ModelProto {
    let mut g = GraphBuilder::new(seed);
    let batch = Dim::Symbol("batch");
    let user = g.input(
        "user_features",
        DataType::Float,
        &[batch, Dim::Fixed(VIDEO_USER_FEATURES)],
    );
    let items = g.input("item_ids", DataType::Int64, &[batch]);
    let table = g.random("item_embedding", &[CATALOG_ITEMS, embedding], 0.1);
    let item_vectors = g.node("Gather", &[&table, &items], None, vec![int_attr("axis", 0)]);
    let mut x = g.node(
        "Concat",
        &[&user, &item_vectors],
        None,
        vec![int_attr("axis", 1)],
    );
    let mut width = VIDEO_USER_FEATURES + embedding;
    for (i, &h) in hidden.iter().enumerate() {
        x = g.dense(&x, &format!("mlp.{i}"), width, h, Some("Relu"), 1.0);
        width = h;
    }
    let logit = g.dense(&x, "head", width, 1, None, 1.0);
    g.node("Sigmoid", &[&logit], Some("score"), vec![]);
    g.output("score", DataType::Float, &[batch, Dim::Fixed(1)]);
    g.finish(
        name,
        "Scores candidate videos for a user: higher is a better match.",
        &[("outpost.catalog_items", CATALOG_ITEMS.to_string())],
    )
}

/// `mean(embedding(token_ids)) → MLP → softmax over the intents`.
fn intent_classifier(seed: u64) -> ModelProto {
    let mut g = GraphBuilder::new(seed);
    let batch = Dim::Symbol("batch");
    let tokens = g.input(
        "token_ids",
        DataType::Int64,
        &[batch, Dim::Symbol("tokens")],
    );
    let table = g.random("token_embedding", &[VOCABULARY, 64], 1.0);
    let vectors = g.node(
        "Gather",
        &[&table, &tokens],
        None,
        vec![int_attr("axis", 0)],
    );
    let bag = g.node(
        "ReduceMean",
        &[&vectors],
        None,
        vec![ints_attr("axes", &[1]), int_attr("keepdims", 0)],
    );
    let hidden = g.dense(&bag, "mlp.0", 64, 128, Some("Relu"), 1.0);
    // A larger gain on the head spreads the logits, so some answers are confident and some are
    // not: that is what the cascade demo needs.
    let logits = g.dense(&hidden, "head", 128, INTENTS.len(), None, 16.0);
    g.node(
        "Softmax",
        &[&logits],
        Some("intent_probs"),
        vec![int_attr("axis", 1)],
    );
    g.output(
        "intent_probs",
        DataType::Float,
        &[batch, Dim::Fixed(INTENTS.len())],
    );
    g.finish(
        "intent-classifier",
        "Classifies a customer-service message into one of 16 intents.",
        &[
            ("outpost.vocabulary", VOCABULARY.to_string()),
            ("outpost.labels", INTENTS.join(",")),
        ],
    )
}

/// `dot(user tower, track tower)`.
fn music_two_tower(seed: u64) -> ModelProto {
    let mut g = GraphBuilder::new(seed);
    let batch = Dim::Symbol("batch");
    let user = g.input(
        "user_features",
        DataType::Float,
        &[batch, Dim::Fixed(MUSIC_USER_FEATURES)],
    );
    let tracks = g.input("track_ids", DataType::Int64, &[batch]);
    let u = g.dense(
        &user,
        "user_tower.0",
        MUSIC_USER_FEATURES,
        64,
        Some("Relu"),
        1.0,
    );
    let u = g.dense(&u, "user_tower.1", 64, 32, None, 1.0);
    let table = g.random("track_embedding", &[MUSIC_TRACKS, 32], 0.5);
    let t = g.node(
        "Gather",
        &[&table, &tracks],
        None,
        vec![int_attr("axis", 0)],
    );
    let t = g.dense(&t, "track_tower.0", 32, 32, Some("Relu"), 1.0);
    let t = g.dense(&t, "track_tower.1", 32, 32, None, 1.0);
    let product = g.node("Mul", &[&u, &t], None, vec![]);
    let axes = g.ints("score_axes", &[1]);
    g.node(
        "ReduceSum",
        &[&product, &axes],
        Some("score"),
        vec![int_attr("keepdims", 1)],
    );
    g.output("score", DataType::Float, &[batch, Dim::Fixed(1)]);
    g.finish(
        "music-two-tower",
        "Scores tracks for a user as the dot product of a user and a track embedding.",
        &[("outpost.catalog_items", MUSIC_TRACKS.to_string())],
    )
}

/// Re-draws the weights of a model's output layer (`head.*`) from `seed`, as a fine-tune that
/// retrained only the last layer would: every other byte of the file stays the same. Returns
/// how many tensors changed.
pub fn retrain_head(model: &mut ModelProto, seed: u64) -> usize {
    let mut rng = graph::Rng::new(seed);
    let mut changed = 0;
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    for tensor in &mut graph.initializer {
        if !tensor.name.starts_with("head.") || tensor.data_type != DataType::Float as i32 {
            continue;
        }
        // Keep each weight's scale: draw within its current largest magnitude.
        let limit = tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).abs())
            .fold(0.0f32, f32::max)
            .max(1e-3);
        for b in tensor.raw_data.chunks_exact_mut(4) {
            b.copy_from_slice(&rng.uniform(limit).to_le_bytes());
        }
        changed += 1;
    }
    changed
}

/// The number of weights (initializer elements) in a model.
pub fn parameter_count(model: &ModelProto) -> usize {
    model.graph.as_ref().map_or(0, |g| {
        g.initializer
            .iter()
            .map(|t| t.dims.iter().product::<i64>() as usize)
            .sum()
    })
}
