//! A BERT-class text encoder and the two products built on it, written with the op patterns a
//! standard PyTorch/Optimum export of such a model has at opset 14, so the engines meet here
//! what they meet in an operator's model:
//!
//! - embeddings: word + position (`Shape` → `Gather` → `Range` → `Unsqueeze` → `Gather`) +
//!   token type, then LayerNorm in its decomposed form (`ReduceMean`, `Sub`, `Pow`, `Add`,
//!   `Sqrt`, `Div`, `Mul`, `Add`);
//! - the attention mask made additive (`Unsqueeze`, `Cast`, `Sub` from 1, `Mul` by the lowest
//!   f32);
//! - [`LAYERS`] layers of multi-head self-attention (heads split and merged by `Reshape` to
//!   shapes computed from `Shape`/`Gather`/`Unsqueeze`/`Concat`, `Transpose`, a `MatMul` of two
//!   computed tensors, `Softmax` over the keys) and a GELU MLP (the `Erf` form), each with a
//!   residual and a LayerNorm;
//! - masked mean pooling (`Unsqueeze`, `Expand`, `Cast`, `ReduceSum`, `Clip`, `Div`) and L2
//!   normalisation (`ReduceL2`, `Clip`, `Div`).
//!
//! | model | inputs (i64 `[batch, sequence]`) | outputs |
//! |---|---|---|
//! | `text-encoder` | `input_ids`, `attention_mask`, `token_type_ids` | `last_hidden_state` f32 `[batch, sequence, 128]`, `sentence_embedding` f32 `[batch, 128]` |
//! | `intent-classifier-text` | same | `intent_probs` f32 `[batch, 16]` |
//! | `video-search` | same | `scores` f32 `[batch, 48]`, one a catalogue title |
//!
//! The weights are random, yet the products answer sensibly: a random encoder with residual
//! connections keeps each word's identity, so texts that share words have close embeddings.
//! `intent-classifier-text`'s head holds, for each intent, the mean embedding of a few example
//! messages (a nearest-prototype classifier), and `video-search`'s catalogue matrix holds each
//! title's embedding: "refund my order" lands on `refund_request`, "calm piano for study" on the
//! piano title. Those embeddings are computed with tract when the model is built and rounded to
//! 2⁻¹⁰, so the same seed gives the same bytes.

use prost::Message as _;
use tract_onnx::pb::{ModelProto, tensor_proto::DataType};
use tract_onnx::prelude::*;

use crate::graph::{Dim, GraphBuilder, int_attr, ints_attr};
use crate::vocab;

/// Width of the hidden state and the sentence embedding.
pub const HIDDEN: usize = 128;
/// Attention heads a layer.
pub const HEADS: usize = 4;
/// Encoder layers.
pub const LAYERS: usize = 2;
/// Width of each layer's MLP.
pub const INTERMEDIATE: usize = 512;
/// The opset the text models declare.
pub const TEXT_OPSET: i64 = 14;
/// The gain of the layers that write into the residual stream: small, as in a trained
/// encoder, so each token keeps its word's identity through the layers.
const RESIDUAL_GAIN: f32 = 0.3;
/// How confident `intent-classifier-text`'s softmax is: the cosine to each prototype times this.
const INTENT_SCALE: f32 = 24.0;

/// Example messages of each intent, in [`crate::INTENTS`] order: their mean embedding is the
/// intent's prototype.
pub const INTENT_EXAMPLES: [[&str; 3]; 16] = [
    [
        "question about my bill",
        "why is my invoice so high",
        "explain the charges on my bill",
    ],
    [
        "cancel my subscription",
        "i want to cancel my plan",
        "stop my subscription please",
    ],
    [
        "change to a different plan",
        "upgrade to the premium plan",
        "downgrade to the basic plan",
    ],
    [
        "my payment failed",
        "my card was declined",
        "the payment is failing",
    ],
    [
        "refund my order",
        "i want my money back",
        "please refund the charge",
    ],
    [
        "i cannot log in",
        "login problem with my account",
        "sign in does not work",
    ],
    [
        "reset my password",
        "i forgot my password",
        "i need a new password",
    ],
    [
        "the video will not play",
        "playback error on the movie",
        "the stream keeps buffering",
    ],
    [
        "the video is blurry",
        "bad video quality",
        "how do i get hd resolution",
    ],
    [
        "download a movie to watch offline",
        "downloads do not work",
        "watch offline on a flight",
    ],
    [
        "too many devices",
        "device limit reached",
        "how many screens can i use",
    ],
    [
        "set parental controls",
        "lock mature content with a pin",
        "kids profile restrict rating",
    ],
    [
        "bad recommendations",
        "stop suggesting boring shows",
        "my recommendations feed is wrong",
    ],
    [
        "please add this movie",
        "request a show for the catalog",
        "the series is missing",
    ],
    [
        "delete my account",
        "erase my data forever",
        "remove my account permanently",
    ],
    [
        "talk to a human",
        "i want a real person",
        "contact a support agent",
    ],
];

/// The titles of `video-search`'s catalogue, in the order of its `scores`.
pub const CATALOG_TITLES: [&str; 48] = [
    "calm piano for study",
    "relaxing jazz for a rainy night",
    "live rock concert",
    "classical symphony orchestra",
    "lofi hip hop to focus",
    "workout dance mix",
    "acoustic guitar songs",
    "ambient sounds for sleep",
    "nature documentary ocean wildlife",
    "space science documentary",
    "history of the city",
    "cooking recipes for beginners",
    "baking guide christmas",
    "travel guide island beach",
    "mountain road trip",
    "football highlights",
    "basketball best plays",
    "tennis classic matches",
    "racing cars full race",
    "anime action series",
    "family cartoon movie",
    "kids animation songs",
    "horror movie night",
    "romantic comedy film",
    "epic action thriller",
    "funny cats and dogs",
    "wildlife animals of the forest",
    "summer party hits",
    "winter holiday movies",
    "morning news today",
    "trending music videos",
    "top pop songs of the year",
    "country folk music",
    "metal live show",
    "electronic dance party",
    "blues and soul classics",
    "indie songs playlist",
    "drama series season one",
    "documentary about food",
    "science lessons for kids",
    "guitar tutorial for beginners",
    "piano lessons learn to play",
    "sleep music soft and gentle",
    "rain sounds white noise",
    "podcast about movies",
    "greatest hits radio",
    "happy upbeat songs",
    "sad songs for a quiet evening",
];

/// One of the text models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TextModel {
    /// The encoder: a hidden state per token and a sentence embedding.
    TextEncoder,
    /// The encoder with a 16-intent head (the cascade demo, text in).
    IntentClassifierText,
    /// The encoder with the catalogue's title embeddings: a score a title.
    VideoSearch,
}

impl TextModel {
    /// Every text model.
    pub const ALL: [TextModel; 3] = [
        TextModel::TextEncoder,
        TextModel::IntentClassifierText,
        TextModel::VideoSearch,
    ];

    /// The model's name (also its registry name and file stem).
    pub const fn name(self) -> &'static str {
        match self {
            TextModel::TextEncoder => "text-encoder",
            TextModel::IntentClassifierText => "intent-classifier-text",
            TextModel::VideoSearch => "video-search",
        }
    }

    /// The model whose name is `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The model as an ONNX protobuf; every text model shares the encoder of `seed`.
    pub fn build(self, seed: u64) -> Result<ModelProto, BuildError> {
        let seed = encoder_seed(seed);
        Ok(match self {
            TextModel::TextEncoder => {
                let mut g = GraphBuilder::new(seed).with_opset(TEXT_OPSET);
                let (hidden, embedding) = encoder(&mut g);
                g.rename_value(&hidden, "last_hidden_state");
                g.rename_value(&embedding, "sentence_embedding");
                let (batch, seq) = (Dim::Symbol("batch"), Dim::Symbol("sequence"));
                g.output(
                    "last_hidden_state",
                    DataType::Float,
                    &[batch, seq, Dim::Fixed(HIDDEN)],
                );
                g.output(
                    "sentence_embedding",
                    DataType::Float,
                    &[batch, Dim::Fixed(HIDDEN)],
                );
                g.finish(
                    self.name(),
                    "A BERT-class text encoder: a hidden state per token and an L2-normalised sentence embedding (masked mean pooling).",
                    &metadata(),
                )
            }
            TextModel::IntentClassifierText => {
                let prototypes = embed(seed, &intent_texts())?;
                let mut weights = vec![0.0f32; HIDDEN * crate::INTENTS.len()];
                for (intent, examples) in prototypes.chunks(INTENT_EXAMPLES[0].len()).enumerate() {
                    let mean = normalised(&mean_of(examples));
                    for (d, v) in mean.iter().enumerate() {
                        weights[d * crate::INTENTS.len() + intent] = round(v * INTENT_SCALE);
                    }
                }
                let mut g = GraphBuilder::new(seed).with_opset(TEXT_OPSET);
                let (_, embedding) = encoder(&mut g);
                let head = g.floats("head.weight", &[HIDDEN, crate::INTENTS.len()], &weights);
                let logits = g.node("MatMul", &[&embedding, &head], None, vec![]);
                g.node(
                    "Softmax",
                    &[&logits],
                    Some("intent_probs"),
                    vec![int_attr("axis", -1)],
                );
                g.output(
                    "intent_probs",
                    DataType::Float,
                    &[Dim::Symbol("batch"), Dim::Fixed(crate::INTENTS.len())],
                );
                let mut meta = metadata();
                meta.push(("outpost.labels", crate::INTENTS.join(",")));
                g.finish(
                    self.name(),
                    "Classifies a customer-service message, as text, into one of 16 intents.",
                    &meta,
                )
            }
            TextModel::VideoSearch => {
                let titles: Vec<String> = CATALOG_TITLES.iter().map(|t| (*t).to_owned()).collect();
                let embeddings = embed(seed, &titles)?;
                let mut catalogue = vec![0.0f32; HIDDEN * titles.len()];
                for (t, e) in embeddings.iter().enumerate() {
                    for (d, v) in e.iter().enumerate() {
                        catalogue[d * titles.len() + t] = round(*v);
                    }
                }
                let mut g = GraphBuilder::new(seed).with_opset(TEXT_OPSET);
                let (_, embedding) = encoder(&mut g);
                let c = g.floats("catalog.embeddings", &[HIDDEN, titles.len()], &catalogue);
                g.node("MatMul", &[&embedding, &c], Some("scores"), vec![]);
                g.output(
                    "scores",
                    DataType::Float,
                    &[Dim::Symbol("batch"), Dim::Fixed(titles.len())],
                );
                let mut meta = metadata();
                meta.push(("outpost.labels", CATALOG_TITLES.join(",")));
                g.finish(
                    self.name(),
                    "Scores each catalogue title against a search query (cosine of their embeddings).",
                    &meta,
                )
            }
        })
    }

    /// The model's ONNX file bytes.
    pub fn bytes(self, seed: u64) -> Result<Vec<u8>, BuildError> {
        Ok(self.build(seed)?.encode_to_vec())
    }
}

/// Why a text model could not be built (its prototypes are computed by running the encoder).
#[derive(Debug, thiserror::Error)]
#[error("building a text model: {0}")]
pub struct BuildError(String);

fn metadata() -> Vec<(&'static str, String)> {
    vec![
        ("outpost.max_tokens", vocab::MAX_TOKENS.to_string()),
        ("outpost.tokenizer", "bert-wordpiece".to_owned()),
    ]
}

/// Every text model's encoder draws from this stream, so they share its weights.
fn encoder_seed(seed: u64) -> u64 {
    seed ^ 0x7e47_e4c0_de5e_ed00
}

/// Rounds to 2⁻¹⁰, so the last bits of one CPU's kernels do not reach the file.
fn round(v: f32) -> f32 {
    (v * 1024.0).round() / 1024.0
}

fn intent_texts() -> Vec<String> {
    INTENT_EXAMPLES
        .iter()
        .flatten()
        .map(|t| (*t).to_owned())
        .collect()
}

fn mean_of(rows: &[Vec<f32>]) -> Vec<f32> {
    let mut mean = vec![0.0f32; HIDDEN];
    for r in rows {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v / rows.len() as f32;
        }
    }
    mean
}

fn normalised(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / norm).collect()
}

/// The sentence embedding of each text, by the encoder of `seed` on tract.
fn embed(seed: u64, texts: &[String]) -> Result<Vec<Vec<f32>>, BuildError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| BuildError(format!("{what}: {e}"));
    let tokenizer = tokenizers::Tokenizer::from_bytes(vocab::tokenizer_json().as_bytes())
        .map_err(|e| fail("reading the tokenizer", &e))?;
    let mut g = GraphBuilder::new(seed).with_opset(TEXT_OPSET);
    let (_, embedding) = encoder(&mut g);
    g.rename_value(&embedding, "sentence_embedding");
    g.output_any("sentence_embedding", DataType::Float);
    let bytes = g.finish("text-encoder", "", &[]).encode_to_vec();
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| fail("loading the encoder", &e))?;
    texts
        .iter()
        .map(|text| {
            let enc = tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| fail("tokenizing", &e))?;
            let n = enc.get_ids().len();
            let column = |v: &[u32]| {
                let v: Vec<i64> = v.iter().map(|&x| i64::from(x)).collect();
                tract_ndarray::Array2::from_shape_vec((1, n), v)
                    .map(|a| a.into_tensor().into_tvalue())
                    .map_err(|e| fail("shaping the tokens", &e))
            };
            let out = plan
                .run(tvec![
                    column(enc.get_ids())?,
                    column(enc.get_attention_mask())?,
                    column(enc.get_type_ids())?,
                ])
                .map_err(|e| fail("running the encoder", &e))?;
            let values = out
                .first()
                .ok_or_else(|| BuildError("the encoder gave no output".into()))?
                .to_plain_array_view::<f32>()
                .map_err(|e| fail("reading the embedding", &e))?
                .iter()
                .copied()
                .collect();
            Ok(values)
        })
        .collect()
}

/// The encoder's graph into `g`: its three inputs and `(hidden state, sentence embedding)`.
fn encoder(g: &mut GraphBuilder) -> (String, String) {
    let vocabulary = vocab::vocabulary().len();
    let (batch, seq) = (Dim::Symbol("batch"), Dim::Symbol("sequence"));
    let ids = g.input("input_ids", DataType::Int64, &[batch, seq]);
    let mask = g.input("attention_mask", DataType::Int64, &[batch, seq]);
    let types = g.input("token_type_ids", DataType::Int64, &[batch, seq]);

    // Embeddings.
    let words = g.random(
        "embeddings.word_embeddings.weight",
        &[vocabulary, HIDDEN],
        1.0,
    );
    let positions = g.random(
        "embeddings.position_embeddings.weight",
        &[vocab::MAX_TOKENS, HIDDEN],
        0.2,
    );
    let type_table = g.random("embeddings.token_type_embeddings.weight", &[2, HIDDEN], 0.2);
    let w = g.node("Gather", &[&words, &ids], None, vec![int_attr("axis", 0)]);
    let shape = g.node("Shape", &[&ids], None, vec![]);
    let one = g.int_scalar("const.one_index", 1);
    let length = g.node("Gather", &[&shape, &one], None, vec![int_attr("axis", 0)]);
    let zero = g.int_scalar("const.zero", 0);
    let step = g.int_scalar("const.step", 1);
    let range = g.node("Range", &[&zero, &length, &step], None, vec![]);
    let axis0 = g.ints("const.axes_0", &[0]);
    let position_ids = g.node("Unsqueeze", &[&range, &axis0], None, vec![]);
    let p = g.node(
        "Gather",
        &[&positions, &position_ids],
        None,
        vec![int_attr("axis", 0)],
    );
    let t = g.node(
        "Gather",
        &[&type_table, &types],
        None,
        vec![int_attr("axis", 0)],
    );
    let wp = g.node("Add", &[&w, &p], None, vec![]);
    let sum = g.node("Add", &[&wp, &t], None, vec![]);
    let mut x = layer_norm(g, &sum, "embeddings.LayerNorm");

    // The additive attention mask, [batch, 1, 1, sequence].
    let axes12 = g.ints("const.axes_1_2", &[1, 2]);
    let m4 = g.node("Unsqueeze", &[&mask, &axes12], None, vec![]);
    let mf = g.node(
        "Cast",
        &[&m4],
        None,
        vec![int_attr("to", DataType::Float as i64)],
    );
    let unit = g.float_scalar("const.unit", 1.0);
    let inverted = g.node("Sub", &[&unit, &mf], None, vec![]);
    let lowest = g.float_scalar("const.lowest", f32::MIN);
    let additive = g.node("Mul", &[&inverted, &lowest], None, vec![]);

    for layer in 0..LAYERS {
        x = encoder_layer(g, &x, &additive, &format!("encoder.layer.{layer}"));
    }

    // Masked mean pooling and L2 normalisation (sentence-transformers' export).
    let axis_last = g.ints("const.axes_last", &[-1]);
    let m3 = g.node("Unsqueeze", &[&mask, &axis_last], None, vec![]);
    let hidden_shape = g.node("Shape", &[&x], None, vec![]);
    let expanded = g.node("Expand", &[&m3, &hidden_shape], None, vec![]);
    let mfloat = g.node(
        "Cast",
        &[&expanded],
        None,
        vec![int_attr("to", DataType::Float as i64)],
    );
    let masked = g.node("Mul", &[&x, &mfloat], None, vec![]);
    let axis1 = g.ints("const.axes_1", &[1]);
    let summed = g.node(
        "ReduceSum",
        &[&masked, &axis1],
        None,
        vec![int_attr("keepdims", 0)],
    );
    let counted = g.node(
        "ReduceSum",
        &[&mfloat, &axis1],
        None,
        vec![int_attr("keepdims", 0)],
    );
    let tiny = g.float_scalar("const.count_min", 1e-9);
    let count = g.node("Clip", &[&counted, &tiny], None, vec![]);
    let mean = g.node("Div", &[&summed, &count], None, vec![]);
    let norm = g.node(
        "ReduceL2",
        &[&mean],
        None,
        vec![ints_attr("axes", &[1]), int_attr("keepdims", 1)],
    );
    let norm_min = g.float_scalar("const.norm_min", 1e-12);
    let clipped = g.node("Clip", &[&norm, &norm_min], None, vec![]);
    let embedding = g.node("Div", &[&mean, &clipped], None, vec![]);
    (x, embedding)
}

/// One layer: self-attention and the MLP, each with a residual and a LayerNorm.
fn encoder_layer(g: &mut GraphBuilder, x: &str, additive_mask: &str, name: &str) -> String {
    let head_width = HIDDEN / HEADS;
    let q = g.dense(
        x,
        &format!("{name}.attention.self.query"),
        HIDDEN,
        HIDDEN,
        None,
        1.0,
    );
    let k = g.dense(
        x,
        &format!("{name}.attention.self.key"),
        HIDDEN,
        HIDDEN,
        None,
        1.0,
    );
    let v = g.dense(
        x,
        &format!("{name}.attention.self.value"),
        HIDDEN,
        HIDDEN,
        None,
        1.0,
    );
    let q = split_heads(g, &q, x, &[0, 2, 1, 3]);
    let k = split_heads(g, &k, x, &[0, 2, 3, 1]);
    let v = split_heads(g, &v, x, &[0, 2, 1, 3]);
    let scores = g.node("MatMul", &[&q, &k], None, vec![]);
    let scale = g.float_scalar(
        &format!("{name}.attention.scale"),
        (head_width as f32).sqrt(),
    );
    let scaled = g.node("Div", &[&scores, &scale], None, vec![]);
    let masked = g.node("Add", &[&scaled, additive_mask], None, vec![]);
    let probs = g.node("Softmax", &[&masked], None, vec![int_attr("axis", -1)]);
    let context = g.node("MatMul", &[&probs, &v], None, vec![]);
    let merged = g.node(
        "Transpose",
        &[&context],
        None,
        vec![ints_attr("perm", &[0, 2, 1, 3])],
    );
    // [batch, sequence, HIDDEN], from x's own shape.
    let shape = g.node("Shape", &[x], None, vec![]);
    let b = shape_dim(g, &shape, 0);
    let s = shape_dim(g, &shape, 1);
    let width = g.ints(&format!("{name}.attention.merged_width"), &[HIDDEN as i64]);
    let target = g.node("Concat", &[&b, &s, &width], None, vec![int_attr("axis", 0)]);
    let merged = g.node("Reshape", &[&merged, &target], None, vec![]);
    let attended = g.dense(
        &merged,
        &format!("{name}.attention.output.dense"),
        HIDDEN,
        HIDDEN,
        None,
        RESIDUAL_GAIN,
    );
    let residual = g.node("Add", &[&attended, x], None, vec![]);
    let x = layer_norm(g, &residual, &format!("{name}.attention.output.LayerNorm"));

    let up = g.dense(
        &x,
        &format!("{name}.intermediate.dense"),
        HIDDEN,
        INTERMEDIATE,
        None,
        1.0,
    );
    let activated = gelu(g, &up, name);
    let down = g.dense(
        &activated,
        &format!("{name}.output.dense"),
        INTERMEDIATE,
        HIDDEN,
        None,
        RESIDUAL_GAIN,
    );
    let residual = g.node("Add", &[&down, &x], None, vec![]);
    layer_norm(g, &residual, &format!("{name}.output.LayerNorm"))
}

/// `Unsqueeze(Gather(shape, index))`: one dimension of a computed shape, as a 1-element tensor.
fn shape_dim(g: &mut GraphBuilder, shape: &str, index: i64) -> String {
    let name = g.fresh("const.shape_index");
    let i = g.int_scalar(&name, index);
    let d = g.node("Gather", &[shape, &i], None, vec![int_attr("axis", 0)]);
    let name = g.fresh("const.unsqueeze_axes");
    let axes = g.ints(&name, &[0]);
    g.node("Unsqueeze", &[&d, &axes], None, vec![])
}

/// `[batch, sequence, HIDDEN]` → `[batch, sequence, HEADS, HIDDEN / HEADS]`, transposed by `perm`.
fn split_heads(g: &mut GraphBuilder, t: &str, like: &str, perm: &[i64]) -> String {
    let shape = g.node("Shape", &[like], None, vec![]);
    let b = shape_dim(g, &shape, 0);
    let s = shape_dim(g, &shape, 1);
    let name = g.fresh("const.heads");
    let heads = g.ints(&name, &[HEADS as i64, (HIDDEN / HEADS) as i64]);
    let target = g.node("Concat", &[&b, &s, &heads], None, vec![int_attr("axis", 0)]);
    let split = g.node("Reshape", &[t, &target], None, vec![]);
    g.node("Transpose", &[&split], None, vec![ints_attr("perm", perm)])
}

/// `x · 0.5 · (1 + erf(x / √2))`, as exporters write GELU.
fn gelu(g: &mut GraphBuilder, x: &str, name: &str) -> String {
    let root2 = g.float_scalar(&format!("{name}.gelu.sqrt2"), std::f32::consts::SQRT_2);
    let half = g.float_scalar(&format!("{name}.gelu.half"), 0.5);
    let unit = g.float_scalar(&format!("{name}.gelu.one"), 1.0);
    let scaled = g.node("Div", &[x, &root2], None, vec![]);
    let erf = g.node("Erf", &[&scaled], None, vec![]);
    let shifted = g.node("Add", &[&erf, &unit], None, vec![]);
    let product = g.node("Mul", &[x, &shifted], None, vec![]);
    g.node("Mul", &[&product, &half], None, vec![])
}

/// LayerNorm over the last axis in the decomposed form (opset < 17 exports).
fn layer_norm(g: &mut GraphBuilder, x: &str, name: &str) -> String {
    let gamma: Vec<f32> = (0..HIDDEN).map(|_| 1.0 + g.rng().uniform(0.1)).collect();
    let gamma = g.floats(&format!("{name}.weight"), &[HIDDEN], &gamma);
    let beta = g.random(&format!("{name}.bias"), &[HIDDEN], 0.02);
    let mean = g.node(
        "ReduceMean",
        &[x],
        None,
        vec![ints_attr("axes", &[-1]), int_attr("keepdims", 1)],
    );
    let centred = g.node("Sub", &[x, &mean], None, vec![]);
    let two = g.float_scalar(&format!("{name}.two"), 2.0);
    let squared = g.node("Pow", &[&centred, &two], None, vec![]);
    let variance = g.node(
        "ReduceMean",
        &[&squared],
        None,
        vec![ints_attr("axes", &[-1]), int_attr("keepdims", 1)],
    );
    let eps = g.float_scalar(&format!("{name}.eps"), 1e-12);
    let shifted = g.node("Add", &[&variance, &eps], None, vec![]);
    let sd = g.node("Sqrt", &[&shifted], None, vec![]);
    let normalised = g.node("Div", &[&centred, &sd], None, vec![]);
    let scaled = g.node("Mul", &[&normalised, &gamma], None, vec![]);
    g.node("Add", &[&scaled, &beta], None, vec![])
}
