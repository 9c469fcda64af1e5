//! `outpost gpu-check [--model FILE]…`: the GPU engine against tract, from the binary.
//!
//! The parity tests (`gpu/tests/parity.rs`) need `cargo test`; a machine lent for its GPU has no
//! Rust toolchain (FINDINGS.md), so this runs the same comparison from a release binary carried
//! there: every demo model and text model (their int8 edge variants) and each `--model` file
//! (quantised to int8 the way the coordinator does, unless it already is), on inputs generated
//! from each signature (ids within their tables, masks of ones, two seeds), on whatever adapter
//! the machine has. Each line gives the largest difference from tract with the int8 weights
//! unpacked to f32 — held to [`UNPACKED`], the parity table's tolerance; the exit status says
//! whether every model kept it — and beside it with int8 activations (`dot4I8Packed`, as the
//! agent runs when the adapter has it) and with f16 activations (agent config
//! `gpu_activations = "f16"`, where the adapter has `shader-f16`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use model_zoo::{DEFAULT_SEED, DemoModel, TextModel};
use outpost_gpu::{GpuContext, GpuModel, GpuOptions};
use outpost_runtime::Engine as _;
use outpost_runtime::accuracy::{GraphFacts, generate_samples};
use outpost_runtime::tract::TractModel;
use outpost_shared::Tensor;

use crate::bench::largest_difference;

/// The tolerance with int8 weights unpacked (the same arithmetic as tract's, summed in another
/// order): the parity table's `UNPACKED`.
pub const UNPACKED: f64 = 1e-4;

/// Checks every model; `Ok(false)` when one is off the GPU or past [`UNPACKED`].
pub fn run(models: &[PathBuf], report: &mut impl FnMut(&str)) -> anyhow::Result<bool> {
    let context = |dot4, f16| {
        GpuContext::new(GpuOptions {
            allow_software: true,
            dot4,
            f16,
            ..GpuOptions::default()
        })
        .map_err(|e| anyhow::anyhow!("no GPU adapter: {e}"))
    };
    let unpacked = context(false, false)?;
    let packed = context(true, false)?;
    let half = context(true, true)?;
    let adapter = unpacked.adapter();
    let yes = |b: bool| if b { "yes" } else { "no" };
    report(&format!(
        "GPU adapter: {} ({}, {}); dot4I8Packed: {}; shader-f16: {}",
        adapter.name,
        adapter.backend,
        adapter.device_type,
        yes(packed.adapter().dot4),
        yes(half.adapter().f16),
    ));
    let half = half.adapter().f16.then_some(half);
    let mut cases: Vec<(String, Vec<u8>)> = DemoModel::ALL
        .into_iter()
        .map(|m| (m.name().to_owned(), m.bytes(DEFAULT_SEED)))
        .collect();
    for m in TextModel::ALL {
        cases.push((m.name().to_owned(), m.bytes(DEFAULT_SEED)?));
    }
    for path in models {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        cases.push((path.display().to_string(), bytes));
    }
    let mut all_within = true;
    for (name, fp32) in cases {
        let int8 = match outpost_runtime::quantize::quantize_int8(&fp32) {
            Ok(q) => q.bytes,
            Err(outpost_runtime::quantize::QuantizeError::AlreadyQuantized) => fp32,
            Err(e) => return Err(anyhow::Error::new(e).context(format!("{name}: quantising"))),
        };
        match check(&int8, &unpacked, &packed, half.as_ref()) {
            Ok([diff, dot4_diff, half_diff]) => {
                // The first two engines always run.
                let (diff, dot4_diff) = (diff.unwrap_or(f64::NAN), dot4_diff.unwrap_or(f64::NAN));
                let within = diff <= UNPACKED;
                all_within &= within;
                let half = match half_diff {
                    Some(d) => format!("   + f16 activations {d:.2e}"),
                    None => String::new(),
                };
                report(&format!(
                    "  {name:<28} unpacked {diff:.2e} ({})   int8 activations {dot4_diff:.2e}{half}",
                    if within { "ok" } else { "PAST 1e-4" },
                ));
            }
            Err(e) => {
                all_within = false;
                report(&format!("  {name:<28} FAILED: {e:#}"));
            }
        }
    }
    Ok(all_within)
}

/// The largest difference from tract over two sets of generated inputs: unpacked, dot4 and
/// (with a context for it) f16 activations.
fn check(
    int8: &[u8],
    unpacked: &Arc<GpuContext>,
    packed: &Arc<GpuContext>,
    half: Option<&Arc<GpuContext>>,
) -> anyhow::Result<[Option<f64>; 3]> {
    let cpu = TractModel::load(int8).map_err(anyhow::Error::msg)?;
    let mut engines = Vec::new();
    for ctx in [Some(unpacked), Some(packed), half] {
        engines.push(match ctx {
            Some(ctx) => Some(GpuModel::load(int8, Arc::clone(ctx)).context("not on the GPU")?),
            None => None,
        });
    }
    let facts = GraphFacts::read(int8).map_err(anyhow::Error::msg)?;
    let mut worst = [None; 3];
    for seed in [7, 8] {
        let inputs = samples(&cpu, &facts, seed)?;
        let want = cpu.run(&inputs).map_err(anyhow::Error::msg)?;
        for (engine, worst) in engines.iter().zip(&mut worst) {
            if let Some(engine) = engine {
                let got = engine.run(&inputs).map_err(anyhow::Error::msg)?;
                let d = largest_difference(&got, &want)?;
                *worst = Some(worst.map_or(d, |w: f64| w.max(d)));
            }
        }
    }
    Ok(worst)
}

/// Inputs from the signature as the accuracy gate makes them, with every attention mask all
/// ones (a random mask could hide whole rows) and token types zero.
fn samples(model: &TractModel, facts: &GraphFacts, seed: u64) -> anyhow::Result<Vec<Tensor>> {
    let mut inputs = generate_samples(&model.inputs, facts, seed).map_err(anyhow::Error::msg)?;
    for t in &mut inputs {
        let fill = match t.name() {
            "attention_mask" => 1i64,
            "token_type_ids" => 0,
            _ => continue,
        };
        let shape = t.shape().to_vec();
        let n = usize::try_from(shape.iter().product::<u64>())?;
        *t = Tensor::from_values(t.name().to_owned(), shape, &vec![fill; n])?;
    }
    Ok(inputs)
}
