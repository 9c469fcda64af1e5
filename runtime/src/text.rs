//! Text in: a model's `BYTES` text input turned into its token-id inputs with the HuggingFace
//! `tokenizers` crate, from the `tokenizer.json` the operator pushed (WordPiece, BPE, Unigram
//! and WordLevel models; any normalizer, pre-tokenizer and post-processor the file names).
//!
//! Each text becomes the tokenizer's ids with its special tokens (`[CLS] … [SEP]` for BERT).
//! A batch is padded with the tokenizer's pad id to one length, with the attention mask 0 and
//! token types 0 on the padding:
//!
//! - **the model's sequence is fixed** (`[batch, 128]`): that length;
//! - **it is dynamic and the model takes an attention mask**: the smallest of
//!   [`SEQUENCE_BUCKETS`] that holds the longest text (and never past `max_tokens`), so one
//!   optimised plan serves every length up to the bucket, and a masked encoder answers the same
//!   as at the exact length;
//! - **dynamic, with no mask**: the longest text (padding would change the answer).
//!
//! Bad text is the caller's fault and named: an element that is not UTF-8, one that is empty
//! (or only spaces), one over `max_tokens` tokens — cut to it instead when the push said
//! `truncate`, and the answer lists which were cut. A text is read only up to
//! [`MAX_BYTES_PER_TOKEN`] bytes a token of `max_tokens`, so no request makes the tokenizer
//! work on megabytes.

use outpost_shared::release::{Dim, TensorSpec, TextInput};
use outpost_shared::{DataType, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

/// The padded lengths of a batch whose model takes a dynamic sequence and an attention mask.
pub const SEQUENCE_BUCKETS: [usize; 6] = [16, 32, 64, 128, 256, 512];

/// The most bytes of text read for each token of `max_tokens` (a WordPiece token is at most 100
/// characters; real text averages under 8 bytes a token).
pub const MAX_BYTES_PER_TOKEN: usize = 64;

/// Why a tokenizer could not be used, or a text could not be tokenized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// The `tokenizer.json` is not one this build reads.
    #[error("the tokenizer is not a HuggingFace tokenizer.json this build reads: {0}")]
    Tokenizer(String),
    /// The text tensor is not a list of strings.
    #[error(
        "text input {name:?} must be BYTES of shape [batch] or [batch, 1] (UTF-8 strings), not {datatype} {shape:?}"
    )]
    Shape {
        /// The input.
        name: String,
        /// Its datatype.
        datatype: &'static str,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// An element is not UTF-8.
    #[error("text input {name:?} element {index} is not UTF-8 text")]
    NotUtf8 {
        /// The input.
        name: String,
        /// The element.
        index: usize,
    },
    /// An element is empty or only white space.
    #[error("text input {name:?} element {index} is empty")]
    Empty {
        /// The input.
        name: String,
        /// The element.
        index: usize,
    },
    /// An element has more tokens than the model takes, and the push did not ask to truncate.
    #[error(
        "text input {name:?} element {index} is {tokens} tokens, more than this model's {max_tokens} (the operator may push it with truncation)"
    )]
    TooLong {
        /// The input.
        name: String,
        /// The element.
        index: usize,
        /// Its tokens, or a lower bound when it was too long to tokenize whole.
        tokens: String,
        /// The model's limit.
        max_tokens: u32,
    },
    /// The tokenizer failed on a text.
    #[error("text input {name:?} element {index} could not be tokenized: {reason}")]
    Failed {
        /// The input.
        name: String,
        /// The element.
        index: usize,
        /// The tokenizer's message.
        reason: String,
    },
}

/// A model's tokenizer, ready to turn its text input into token ids.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    /// No truncation: texts over `max_tokens` are found and refused.
    whole: Tokenizer,
    /// Truncating at `max_tokens` (with room for the special tokens), when the push asked.
    truncating: Option<Tokenizer>,
    spec: TextInput,
    pad_id: u32,
    kind: &'static str,
    vocabulary: usize,
}

/// A text input's token-id tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The model's token-id inputs (ids, then the mask and types the model takes).
    pub inputs: Vec<Tensor>,
    /// The elements cut to `max_tokens`.
    pub truncated: Vec<usize>,
    /// The padded length.
    pub length: usize,
}

impl TextTokenizer {
    /// Reads `tokenizer.json` for the text input `spec`.
    pub fn load(json: &[u8], spec: &TextInput) -> Result<Self, TextError> {
        let mut whole =
            Tokenizer::from_bytes(json).map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let pad_id = whole
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| {
                ["[PAD]", "<pad>", "<PAD>"]
                    .iter()
                    .find_map(|t| whole.token_to_id(t))
            })
            .unwrap_or(0);
        // Padding and truncation are ours: the file's own settings would fight them.
        whole.with_padding(None);
        whole
            .with_truncation(None)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let truncating = if spec.truncate {
            let mut t = whole.clone();
            t.with_truncation(Some(TruncationParams {
                max_length: spec.max_tokens as usize,
                ..TruncationParams::default()
            }))
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
            Some(t)
        } else {
            None
        };
        let kind = match whole.get_model() {
            tokenizers::ModelWrapper::WordPiece(_) => "WordPiece",
            tokenizers::ModelWrapper::BPE(_) => "BPE",
            tokenizers::ModelWrapper::Unigram(_) => "Unigram",
            tokenizers::ModelWrapper::WordLevel(_) => "WordLevel",
        };
        let vocabulary = whole.get_vocab_size(true);
        Ok(Self {
            whole,
            truncating,
            spec: spec.clone(),
            pad_id,
            kind,
            vocabulary,
        })
    }

    /// The text input this tokenizer serves.
    pub fn spec(&self) -> &TextInput {
        &self.spec
    }

    /// The tokenizer's model kind: `"WordPiece"`, `"BPE"`, `"Unigram"` or `"WordLevel"`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Tokens in the vocabulary, added tokens included: ids run `0..vocabulary`.
    pub fn vocabulary(&self) -> usize {
        self.vocabulary
    }

    /// How the text input looks in model metadata: `BYTES [batch]`.
    pub fn metadata_spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.spec.name.clone(),
            datatype: DataType::Bytes,
            shape: vec![Dim::Dynamic],
        }
    }

    /// The token-id tensors of `texts` (a `BYTES` tensor `[batch]` or `[batch, 1]`), padded as
    /// the module says for a model whose token-id input is `ids`.
    pub fn encode(&self, texts: &Tensor, ids: &TensorSpec) -> Result<Encoded, TextError> {
        let name = &self.spec.name;
        let shape = texts.shape();
        let strings = match (texts.datatype(), shape) {
            (DataType::Bytes, [_] | [_, 1]) => texts.byte_strings().ok(),
            _ => None,
        }
        .ok_or_else(|| TextError::Shape {
            name: name.clone(),
            datatype: texts.datatype().as_str(),
            shape: shape.to_vec(),
        })?;
        let max_tokens = self.spec.max_tokens as usize;
        let max_bytes = max_tokens.saturating_mul(MAX_BYTES_PER_TOKEN);
        let mut encodings = Vec::with_capacity(strings.len());
        let mut truncated = Vec::new();
        for (index, raw) in strings.into_iter().enumerate() {
            let text = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8 {
                name: name.clone(),
                index,
            })?;
            if text.trim().is_empty() {
                return Err(TextError::Empty {
                    name: name.clone(),
                    index,
                });
            }
            let (text, cut) = if text.len() > max_bytes {
                if self.truncating.is_none() {
                    return Err(TextError::TooLong {
                        name: name.clone(),
                        index,
                        tokens: format!("over {} bytes, so more", text.len()),
                        max_tokens: self.spec.max_tokens,
                    });
                }
                (floor_char_boundary(text, max_bytes), true)
            } else {
                (text, false)
            };
            let tokenizer = self.truncating.as_ref().unwrap_or(&self.whole);
            let encoding = tokenizer
                .encode(text, true)
                .map_err(|e| TextError::Failed {
                    name: name.clone(),
                    index,
                    reason: e.to_string(),
                })?;
            if encoding.len() > max_tokens {
                return Err(TextError::TooLong {
                    name: name.clone(),
                    index,
                    tokens: encoding.len().to_string(),
                    max_tokens: self.spec.max_tokens,
                });
            }
            if cut || !encoding.get_overflowing().is_empty() {
                truncated.push(index);
            }
            encodings.push(encoding);
        }
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let length = match ids.shape.get(1) {
            Some(Dim::Fixed(n)) => usize::try_from(*n).unwrap_or(usize::MAX),
            _ => padded_length(longest, max_tokens, self.spec.attention_mask.is_some()),
        };
        if longest > length {
            return Err(TextError::TooLong {
                name: name.clone(),
                index: encodings
                    .iter()
                    .position(|e| e.len() == longest)
                    .unwrap_or(0),
                tokens: longest.to_string(),
                max_tokens: u32::try_from(length).unwrap_or(u32::MAX),
            });
        }
        let rows = encodings.len();
        let mut id_values = Vec::with_capacity(rows * length);
        let mut mask_values = Vec::with_capacity(rows * length);
        let mut type_values = Vec::with_capacity(rows * length);
        for e in &encodings {
            let n = e.len();
            id_values.extend(e.get_ids().iter().map(|&v| i64::from(v)));
            id_values.extend(std::iter::repeat_n(i64::from(self.pad_id), length - n));
            mask_values.extend(e.get_attention_mask().iter().map(|&v| i64::from(v)));
            mask_values.extend(std::iter::repeat_n(0, length - n));
            type_values.extend(e.get_type_ids().iter().map(|&v| i64::from(v)));
            type_values.extend(std::iter::repeat_n(0, length - n));
        }
        let shape = vec![rows as u64, length as u64];
        let tensor = |name: &str, values: &[i64]| {
            // The values fill the shape exactly, so this cannot fail.
            Tensor::from_values(name, shape.clone(), values).map_err(|e| TextError::Failed {
                name: name.to_owned(),
                index: 0,
                reason: e.to_string(),
            })
        };
        let mut inputs = vec![tensor(&self.spec.input_ids, &id_values)?];
        if let Some(mask) = &self.spec.attention_mask {
            inputs.push(tensor(mask, &mask_values)?);
        }
        if let Some(types) = &self.spec.token_type_ids {
            inputs.push(tensor(types, &type_values)?);
        }
        Ok(Encoded {
            inputs,
            truncated,
            length,
        })
    }

    /// `count` texts of 3 to 24 words drawn from the vocabulary (whole words, no special or
    /// continuation tokens), for the int8 gate of a model with a tokenizer: inputs shaped like
    /// real text, with real masks and padding.
    pub fn sample_texts(&self, count: usize, seed: u64) -> Vec<String> {
        let mut words: Vec<String> = self
            .whole
            .get_vocab(false)
            .into_keys()
            .filter(|w| {
                w.chars().count() > 1
                    && w.chars().all(char::is_alphanumeric)
                    && !w.starts_with("##")
            })
            .collect();
        words.sort();
        if words.is_empty() {
            words.push("text".to_owned());
        }
        let mut state = seed | 1;
        let mut next = move |below: usize| {
            // xorshift64: deterministic samples for a deterministic gate.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below.max(1) as u64) as usize
        };
        (0..count)
            .map(|_| {
                let n = 3 + next(22);
                (0..n)
                    .map(|_| words[next(words.len())].as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }
}

/// The truncation length a `tokenizer.json` declares (`truncation.max_length`), if any: the
/// default `max_tokens` of a push that gives none.
pub fn declared_max_tokens(json: &[u8]) -> Result<Option<u32>, TextError> {
    let tokenizer = Tokenizer::from_bytes(json).map_err(|e| TextError::Tokenizer(e.to_string()))?;
    Ok(tokenizer
        .get_truncation()
        .map(|t| u32::try_from(t.max_length).unwrap_or(u32::MAX)))
}

/// The padded length of a batch whose longest text is `longest` tokens: the smallest of
/// [`SEQUENCE_BUCKETS`] that holds it when the model takes an attention mask (capped at
/// `max_tokens`; past the last bucket, the next multiple of it), else `longest` itself.
pub fn padded_length(longest: usize, max_tokens: usize, bucketed: bool) -> usize {
    if !bucketed {
        return longest;
    }
    let last = SEQUENCE_BUCKETS[SEQUENCE_BUCKETS.len() - 1];
    let bucket = SEQUENCE_BUCKETS
        .iter()
        .copied()
        .find(|&b| b >= longest)
        .unwrap_or_else(|| longest.div_ceil(last) * last);
    bucket.min(max_tokens.max(longest))
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn floor_char_boundary(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_pad_to_the_smallest_bucket_that_holds_the_longest_text() {
        assert_eq!(padded_length(5, 512, true), 16);
        assert_eq!(padded_length(16, 512, true), 16);
        assert_eq!(padded_length(17, 512, true), 32);
        assert_eq!(padded_length(200, 512, true), 256);
        assert_eq!(padded_length(200, 128, true), 200);
        assert_eq!(padded_length(100, 128, true), 128);
        assert_eq!(padded_length(600, 2048, true), 1024);
        assert_eq!(padded_length(600, 700, true), 700);
        assert_eq!(padded_length(5, 512, false), 5);
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        assert_eq!(floor_char_boundary("héllo", 2), "h");
        assert_eq!(floor_char_boundary("héllo", 3), "hé");
        assert_eq!(floor_char_boundary("abc", 10), "abc");
    }
}
