//! `model-zoo`: write the demo models as ONNX files.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use model_zoo::DemoModel;

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
        /// music-two-tower.
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
        /// intent-classifier (16 intents) or video-ranker (a 0/1 score).
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
            for m in DemoModel::ALL {
                let proto = m.build(model_zoo::DEFAULT_SEED);
                println!(
                    "{:<18} {:>11} parameters  {}",
                    m.name(),
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
            let m =
                DemoModel::from_name(&model).with_context(|| format!("unknown model {model:?}"))?;
            let text = model_zoo::labelled::labelled_examples(m, seed, rule_seed, examples)?;
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
            let chosen = if models.is_empty() {
                DemoModel::ALL.to_vec()
            } else {
                models
                    .iter()
                    .map(|n| {
                        DemoModel::from_name(n).with_context(|| {
                            let names: Vec<_> = DemoModel::ALL.iter().map(|m| m.name()).collect();
                            format!("unknown model {n:?} (known: {})", names.join(", "))
                        })
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            for (i, m) in chosen.iter().enumerate() {
                let mut proto = m.build(seed);
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
            }
        }
    }
    Ok(())
}
