//! Transfer learning of a model's head: keep everything a pre-trained model computes up to its
//! last layer, retrain that layer on the operator's labelled examples, and write it back in place.
//!
//! - [`head`]: find the head (the last MatMul/Gemm, its bias and its Softmax or Sigmoid, before
//!   an output), cut the graph at the head's input (the features), and write new weights into
//!   the same initializers, so every other byte of the file stays the same.
//! - [`data`]: the examples, JSON Lines of inference inputs plus a `"label"`; every bad line is
//!   reported with its number.
//! - [`train`]: features through tract in batches, the split into train, validation and held-out
//!   examples, L-BFGS (argmin) on softmax or sigmoid cross-entropy with L2, early stopping on the
//!   validation split, and the held-out figures the publish gate compares.
//!
//! The coordinator's `finetune` drives these over a registry version.

pub mod data;
pub mod head;
pub mod train;

pub use data::{DataError, Example, Label, parse_examples};
pub use head::{Head, HeadError, HeadKind, feature_model, find_head, write_head};
pub use train::{
    Evaluation, Features, Split, TrainError, TrainOptions, Trained, compute_features, evaluate,
    split, train_head,
};
