//! `model-zoo`: write the demo models as ONNX files.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use model_zoo::{DemoModel, TextModel};

#[derive(Parser)]
#[command(
    name = "model-zoo",
    version,
    about = "Write Outpost's deterministic demo models as ONNX files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the models into a folder (as NAME.onnx).
    Write {
        /// The folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The seed; the same seed gives the same bytes.
        #[arg(long, default_value_t = model_zoo::DEFAULT_SEED)]
        seed: u64,
        /// Only these models (repeatable): video-ranker, video-ranker-xl, intent-classifier,
        /// music-two-tower, and the text models text-encoder, intent-classifier-text,
        /// video-search (each written with its NAME.tokenizer.json).
        #[arg(long = "model", value_name = "NAME")]
        models: Vec<String>,
        /// Re-draw only the output layer's weights from this seed, as a fine-tune of the last
        /// layer would (to try delta updates: every other byte stays the same).
        #[arg(long, value_name = "SEED")]
        retrain_head: Option<u64>,
    },
    /// Write a labelled data set for `cloud-coordinator finetune --data` (JSON Lines): inputs
    /// plus a label that follows a rule the model's current head does not know.
    Labelled {
        /// intent-classifier (16 intents), intent-classifier-text (16 intents, the text
        /// itself) or video-ranker (a 0/1 score).
        #[arg(long)]
        model: String,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// Examples.
        #[arg(long, default_value_t = 10_000)]
        examples: usize,
        /// The seed of the model the data is for (the one pushed).
        #[arg(long, default_value_t = model_zoo::DEFAULT_SEED)]
        seed: u64,
        /// The seed of the rule the labels follow.
        #[arg(long, default_value_t = 7)]
        rule_seed: u64,
    },
    /// List the models.
    List,
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::List => {
            let mut protos: Vec<_> = DemoModel::ALL
                .iter()
                .map(|m| (m.name(), m.build(model_zoo::DEFAULT_SEED)))
                .collect();
            for m in TextModel::ALL {
                protos.push((m.name(), m.build(model_zoo::DEFAULT_SEED)?));
            }
            for (name, proto) in protos {
                println!(
                    "{name:<22} {:>11} parameters  {}",
                    model_zoo::parameter_count(&proto),
                    proto.doc_string
                );
            }
        }
        Command::Labelled {
            model,
            out,
            examples,
            seed,
            rule_seed,
        } => {
            let text = if model == TextModel::IntentClassifierText.name() {
                model_zoo::labelled::text_examples(rule_seed, examples)
            } else {
                let m = DemoModel::from_name(&model)
                    .with_context(|| format!("unknown model {model:?}"))?;
                model_zoo::labelled::labelled_examples(m, seed, rule_seed, examples)?
            };
            let tmp = out.with_extension("tmp");
            std::fs::write(&tmp, &text)
                .and_then(|()| std::fs::rename(&tmp, &out))
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{examples} examples for {model} in {}", out.display());
        }
        Command::Write {
            out,
            seed,
            models,
            retrain_head,
        } => {
            let all: Vec<Chosen> = DemoModel::ALL
                .into_iter()
                .map(Chosen::Demo)
                .chain(TextModel::ALL.into_iter().map(Chosen::Text))
                .collect();
            let chosen: Vec<Chosen> = if models.is_empty() {
                all
            } else {
                models
                    .iter()
                    .map(|n| {
                        all.iter()
                            .copied()
                            .find(|m| m.name() == n)
                            .with_context(|| {
                                let names: Vec<_> = all.iter().map(|m| m.name()).collect();
                                format!("unknown model {n:?} (known: {})", names.join(", "))
                            })
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            for (i, m) in chosen.iter().enumerate() {
                let mut proto = match m {
                    Chosen::Demo(d) => d.build(seed),
                    Chosen::Text(t) => t.build(seed)?,
                };
                if let Some(head_seed) = retrain_head {
                    model_zoo::retrain_head(&mut proto, head_seed);
                }
                let bytes = prost::Message::encode_to_vec(&proto);
                let path = model_zoo::write_model(&out, m.name(), &bytes)
                    .with_context(|| format!("writing {} into {}", m.name(), out.display()))?;
                let size = std::fs::metadata(&path).map(|md| md.len()).unwrap_or(0);
                println!(
                    "[{}/{}] {} ({:.1} MB)",
                    i + 1,
                    chosen.len(),
                    path.display(),
                    size as f64 / 1e6
                );
                if let Chosen::Text(_) = m {
                    let path = model_zoo::vocab::write_tokenizer(&out, m.name())
                        .with_context(|| format!("writing {}'s tokenizer", m.name()))?;
                    println!("      {}", path.display());
                }
            }
        }
    }
    Ok(())
}

/// A model the `write` command may write.
#[derive(Clone, Copy)]
enum Chosen {
    Demo(DemoModel),
    Text(TextModel),
}

impl Chosen {
    fn name(self) -> &'static str {
        match self {
            Chosen::Demo(m) => m.name(),
            Chosen::Text(m) => m.name(),
        }
    }
}
