//! `outpost bench --text-only [--text-model FILE]`: the model-zoo text encoder (or the
//! operator's own), side by side in one run.
//!
//! - Fixed shapes (sequence 32 and 128, batch 1 and 8): tract fp32 and int8 on their
//!   shape-optimised plans, against ONNX Runtime fp32 on the same ONNX file at the same thread
//!   count (a small Python script, run when `python3 -c "import onnxruntime"` works; the line
//!   says so when it does not), and the GPU engine on the int8 file (on whatever adapter there
//!   is, lavapipe included; the line names it, or says why there is none), with f32 and, where
//!   the adapter has `shader-f16`, f16 activations. And the agent's own ONNX Runtime engine
//!   (`onnxruntime_library`) on the fp32 and int8 files, in this process, where a library is
//!   named or the Python package has one: what the agent costs over ONNX Runtime itself.
//! - Texts of varying length, one a call, through the agent's tokenizer: padded to the sequence
//!   buckets (what the agent does) against padded to each text's own length (a new shape nearly
//!   every call, so the plan cache's four shapes keep being evicted).
//!
//! Calls are interleaved between tract and the GPU engine, so drift hits all alike; ONNX Runtime
//! (the Python baseline and the agent's engine) runs each file's calls in a row.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use model_zoo::{DEFAULT_SEED, TextModel, vocab};
use outpost_runtime::Engine as _;
use outpost_runtime::onnxruntime::{
    OnnxRuntime, OnnxRuntimeModel, OnnxRuntimeOptions, library_in_package,
};
use outpost_runtime::text::TextTokenizer;
use outpost_runtime::tract::{TractModel, TractOptions};
use outpost_shared::release::{Blob, Dim, TextInput};
use outpost_shared::{Tensor, TensorSpec};

use crate::bench::{largest_difference, percentiles};

/// The fixed shapes measured: (batch, sequence).
const SHAPES: [(u64, u64); 4] = [(1, 32), (8, 32), (1, 128), (8, 128)];

/// The ONNX Runtime baseline: reads the model path, threads and calls from argv, then one
/// `batch seq` line a shape from stdin; prints `p50_ms p99_ms` a shape. It feeds the token
/// inputs the model has, made as [`token_inputs`] makes them.
const ORT_SCRIPT: &str = r#"
import sys, time
import numpy as np
import onnxruntime as ort
path, threads, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
o = ort.SessionOptions()
o.intra_op_num_threads = threads
o.inter_op_num_threads = 1
o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
for line in sys.stdin:
    b, n = map(int, line.split())
    ids = ((np.arange(b * n) * 7919 + 13) % 500 + 5).reshape(b, n).astype(np.int64)
    every = {"input_ids": ids, "attention_mask": np.ones((b, n), np.int64),
             "token_type_ids": np.zeros((b, n), np.int64)}
    feed = {i.name: every[i.name] for i in s.get_inputs()}
    for _ in range(20):
        s.run(None, feed)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    times.sort()
    at = lambda q: times[max(0, min(len(times) - 1, int(np.ceil(len(times) * q)) - 1))]
    print(f"{at(0.5) * 1e3:.4f} {at(0.99) * 1e3:.4f}", flush=True)
"#;

/// The token inputs a BERT-class encoder may have; `input_ids` is required.
const TOKEN_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

/// Runs the text benchmarks with `threads` threads and `calls` calls a figure, on `model` (an
/// ONNX file) or else the model-zoo text encoder.
/// `library`: the ONNX Runtime library for the agent's engine (else the Python package's).
pub fn run(
    calls: usize,
    threads: usize,
    model: Option<&std::path::Path>,
    library: Option<&std::path::Path>,
    report: &mut impl FnMut(&str),
) -> anyhow::Result<()> {
    let fp32 = match model {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => TextModel::TextEncoder.bytes(DEFAULT_SEED)?,
    };
    let int8 = outpost_runtime::quantize::quantize_int8(&fp32)?.bytes;
    let options = TractOptions {
        threads,
        ..TractOptions::default()
    };
    let tract_fp32 = TractModel::load_with(&fp32, options).map_err(anyhow::Error::msg)?;
    let tract_int8 = TractModel::load_with(&int8, options).map_err(anyhow::Error::msg)?;
    let names: Vec<&str> = tract_fp32
        .inputs()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    if let Some(other) = names.iter().find(|n| !TOKEN_INPUTS.contains(n)) {
        anyhow::bail!(
            "the model has an input {other:?}: a text encoder here takes {} only",
            TOKEN_INPUTS.join(", ")
        );
    }
    if !names.contains(&"input_ids") {
        anyhow::bail!("the model has no input_ids input: is it a text encoder?");
    }
    let described = match model {
        Some(path) => format!(
            "{} ({:.1} MiB fp32)",
            path.display(),
            fp32.len() as f64 / (1 << 20) as f64
        ),
        None => format!(
            "text-encoder (2 layers, hidden 128, {:.2} M parameters)",
            model_zoo::parameter_count(&TextModel::TextEncoder.build(DEFAULT_SEED)?) as f64 / 1e6
        ),
    };
    report(&format!(
        "{described}, {threads} thread(s), {calls} calls each (p50 / p99):"
    ));
    let (line, gpu) = gpu_engine(&int8, true, false);
    report(&line);
    // Parity with f32 activations too (int8 weights unpacked): the engine's own error, apart
    // from the activations' rounding that dot4I8Packed adds. And the same engine with f16
    // activations, where the adapter has them.
    let (unpacked, half) = match &gpu {
        Some(_) => (
            gpu_engine(&int8, false, false).1,
            gpu_engine(&int8, true, true).1.filter(|m| m.adapter().f16),
        ),
        None => (None, None),
    };
    if gpu.is_some() && half.is_none() {
        report("  GPU engine with f16 activations: not measured (the adapter has no shader-f16)");
    }
    let ort = ort_figures(&fp32, threads, calls);
    if let Err(e) = &ort {
        report(&format!("  ONNX Runtime: not measured ({e})"));
    }
    let engines = match ort_engines(library, &fp32, &int8, threads) {
        Ok((path, engines)) => {
            report(&format!(
                "  the agent's ONNX Runtime engine: {}",
                path.display()
            ));
            Some(engines)
        }
        Err(e) => {
            report(&format!(
                "  the agent's ONNX Runtime engine: not measured ({e:#})"
            ));
            None
        }
    };
    for (i, &(batch, seq)) in SHAPES.iter().enumerate() {
        let inputs = token_inputs(batch, seq, &names)?;
        for _ in 0..20 {
            tract_fp32.run(&inputs).map_err(anyhow::Error::msg)?;
            tract_int8.run(&inputs).map_err(anyhow::Error::msg)?;
            for engine in engines.iter().flatten() {
                engine.run(&inputs).map_err(anyhow::Error::msg)?;
            }
        }
        let reference = tract_int8.run(&inputs).map_err(anyhow::Error::msg)?;
        if let Some(gpu) = &gpu {
            for _ in 0..5 {
                gpu.run(&inputs).map_err(anyhow::Error::msg)?;
            }
            let got = gpu.run(&inputs).map_err(anyhow::Error::msg)?;
            let mut others = String::new();
            for (what, engine) in [("f32 activations", &unpacked), ("f16 activations", &half)] {
                if let Some(engine) = engine {
                    for _ in 0..5 {
                        engine.run(&inputs).map_err(anyhow::Error::msg)?;
                    }
                    let got = engine.run(&inputs).map_err(anyhow::Error::msg)?;
                    others += &format!("; {what} {:.2e}", largest_difference(&got, &reference)?);
                }
            }
            report(&format!(
                "  batch {batch}, sequence {seq:>3}  GPU engine against tract int8, largest difference: as measured {:.2e}{others}",
                largest_difference(&got, &reference)?
            ));
        }
        // The shape plans are optimised on a background thread: let them land.
        std::thread::sleep(Duration::from_secs(2));
        let (mut a, mut b, mut c, mut h) = (
            Vec::with_capacity(calls),
            Vec::with_capacity(calls),
            Vec::with_capacity(calls),
            Vec::with_capacity(calls),
        );
        let mut on_ort = [Vec::with_capacity(calls), Vec::with_capacity(calls)];
        for _ in 0..calls {
            let t = Instant::now();
            tract_fp32.run(&inputs).map_err(anyhow::Error::msg)?;
            a.push(t.elapsed());
            let t = Instant::now();
            tract_int8.run(&inputs).map_err(anyhow::Error::msg)?;
            b.push(t.elapsed());
            if let Some(gpu) = &gpu {
                let t = Instant::now();
                gpu.run(&inputs).map_err(anyhow::Error::msg)?;
                c.push(t.elapsed());
            }
            if let Some(half) = &half {
                let t = Instant::now();
                half.run(&inputs).map_err(anyhow::Error::msg)?;
                h.push(t.elapsed());
            }
        }
        // The agent's ONNX Runtime engine, each file's calls in a row, as the Python baseline
        // runs them: interleaved with tract, whose calls evict the weights from the caches, it
        // would be measured on colder caches than ONNX Runtime itself (1.5× at batch 1 on a
        // 66 MiB model, where a call is mostly reading weights).
        for (engine, times) in engines.iter().flatten().zip(&mut on_ort) {
            for _ in 0..calls {
                let t = Instant::now();
                engine.run(&inputs).map_err(anyhow::Error::msg)?;
                times.push(t.elapsed());
            }
        }
        let (fp32_p50, fp32_p99) = percentiles(&mut a);
        let (int8_p50, int8_p99) = percentiles(&mut b);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let shape = format!("batch {batch}, sequence {seq:>3}");
        report(&format!(
            "  {shape}  tract fp32     {:>8.3} ms / {:>8.3} ms",
            ms(fp32_p50),
            ms(fp32_p99)
        ));
        report(&format!(
            "  {shape}  tract int8     {:>8.3} ms / {:>8.3} ms",
            ms(int8_p50),
            ms(int8_p99)
        ));
        for (what, times) in [("GPU engine int8", &mut c), ("GPU int8, f16  ", &mut h)] {
            if !times.is_empty() {
                let (p50, p99) = percentiles(times);
                report(&format!(
                    "  {shape}  {what} {:>7.3} ms / {:>8.3} ms",
                    ms(p50),
                    ms(p99)
                ));
            }
        }
        let baseline = ort
            .as_ref()
            .ok()
            .and_then(|o| o.get(i))
            .map(|&(p50, _)| p50);
        for (what, times) in ["ORT engine fp32", "ORT engine int8"]
            .into_iter()
            .zip(&mut on_ort)
        {
            if !times.is_empty() {
                let (p50, p99) = percentiles(times);
                let ratio = baseline.map_or_else(String::new, |b| {
                    format!(
                        "   {} / onnxruntime p50: {:.2}",
                        what.trim_start_matches("ORT "),
                        ms(p50) / b
                    )
                });
                report(&format!(
                    "  {shape}  {what} {:>7.3} ms / {:>8.3} ms{ratio}",
                    ms(p50),
                    ms(p99)
                ));
            }
        }
        if let Ok(ort) = &ort
            && let Some(&(p50, p99)) = ort.get(i)
        {
            report(&format!(
                "  {shape}  onnxruntime    {p50:>8.3} ms / {p99:>8.3} ms   tract fp32 / onnxruntime p50: {:.2}",
                ms(fp32_p50) / p50
            ));
        }
    }
    match model {
        // The buckets need the model's own tokenizer; the zoo encoder's is at hand.
        Some(_) => Ok(()),
        None => buckets(&fp32, threads, calls, report),
    }
}

/// The GPU engine on the int8 file, with a line naming the adapter (or why there is none);
/// `dot4`: int8 activations where the adapter has `dot4I8Packed`; `f16`: f16 activations where
/// it has `shader-f16`.
fn gpu_engine(int8: &[u8], dot4: bool, f16: bool) -> (String, Option<outpost_gpu::GpuModel>) {
    use outpost_gpu::{GpuContext, GpuModel, GpuOptions};
    let ctx = match GpuContext::new(GpuOptions {
        allow_software: true,
        dot4,
        f16,
        ..GpuOptions::default()
    }) {
        Ok(ctx) => ctx,
        Err(e) => return (format!("  GPU engine: no adapter ({e})"), None),
    };
    match GpuModel::load(int8, ctx) {
        Ok(model) => (
            format!(
                "  GPU engine on {} ({}): {}",
                model.adapter().name,
                model.adapter().backend,
                model.detail()
            ),
            Some(model),
        ),
        Err(e) => (
            format!("  GPU engine: not measured, it does not cover the encoder ({e})"),
            None,
        ),
    }
}

/// The agent's ONNX Runtime engine on the fp32 and the int8 file, from `library` or else the
/// library of python3's `onnxruntime` package; with the library's path.
fn ort_engines(
    library: Option<&std::path::Path>,
    fp32: &[u8],
    int8: &[u8],
    threads: usize,
) -> anyhow::Result<(std::path::PathBuf, [OnnxRuntimeModel; 2])> {
    let path = match library {
        Some(path) => path.to_path_buf(),
        None => {
            let out = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
                ])
                .stderr(std::process::Stdio::null())
                .output()
                .context("python3 is not installed")?;
            let package = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            anyhow::ensure!(
                out.status.success() && !package.is_empty(),
                "python3 has no onnxruntime; name a library with --onnxruntime-library"
            );
            library_in_package(std::path::Path::new(&package)).with_context(|| {
                format!(
                    "no ONNX Runtime library in {package}/capi; name one with --onnxruntime-library"
                )
            })?
        }
    };
    let runtime = OnnxRuntime::load(&path)?;
    let options = OnnxRuntimeOptions { threads };
    let fp32 = OnnxRuntimeModel::load(&runtime, fp32, options).context("the fp32 file")?;
    let int8 = OnnxRuntimeModel::load(&runtime, int8, options).context("the int8 file")?;
    Ok((path, [fp32, int8]))
}

/// ONNX Runtime's p50 and p99 (ms) for each of [`SHAPES`], from [`ORT_SCRIPT`].
fn ort_figures(model: &[u8], threads: usize, calls: usize) -> anyhow::Result<Vec<(f64, f64)>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("text-encoder.onnx");
    std::fs::write(&path, model)?;
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(ORT_SCRIPT)
        .arg(&path)
        .arg(threads.to_string())
        .arg(calls.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("python3 is not installed")?;
    if let Some(mut stdin) = child.stdin.take() {
        for (batch, seq) in SHAPES {
            writeln!(stdin, "{batch} {seq}")?;
        }
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("it failed");
        anyhow::bail!("{last}; `pip install onnxruntime numpy` for the baseline");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace().map(str::parse::<f64>);
            match (it.next(), it.next()) {
                (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
                _ => anyhow::bail!("onnxruntime printed {l:?}"),
            }
        })
        .collect()
}

/// Texts of 3 to 40 words, one a call: padded to the buckets, against each to its own length.
fn buckets(
    fp32: &[u8],
    threads: usize,
    calls: usize,
    report: &mut impl FnMut(&str),
) -> anyhow::Result<()> {
    let json = vocab::tokenizer_json();
    let spec = TextInput {
        name: "text".into(),
        input_ids: "input_ids".into(),
        attention_mask: Some("attention_mask".into()),
        token_type_ids: Some("token_type_ids".into()),
        max_tokens: 512,
        truncate: false,
        tokenizer: Blob::describe(json.as_bytes()),
    };
    // The baseline pads nothing: the same tokenizer without the mask role (added below).
    let exact_spec = TextInput {
        attention_mask: None,
        token_type_ids: None,
        ..spec.clone()
    };
    let bucketed = TextTokenizer::load(json.as_bytes(), &spec)?;
    let exact = TextTokenizer::load(json.as_bytes(), &exact_spec)?;
    let options = TractOptions {
        threads,
        ..TractOptions::default()
    };
    let (a, b) = (
        TractModel::load_with(fp32, options).map_err(anyhow::Error::msg)?,
        TractModel::load_with(fp32, options).map_err(anyhow::Error::msg)?,
    );
    let ids = TensorSpec {
        name: "input_ids".into(),
        datatype: outpost_shared::DataType::Int64,
        shape: vec![Dim::Dynamic, Dim::Dynamic],
    };
    let words: Vec<String> = bucketed.sample_texts(1, 1)[0]
        .split(' ')
        .map(str::to_owned)
        .cycle()
        .take(40)
        .collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let (mut with, mut without) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    let (mut lengths, mut padded) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for call in 0..calls + 20 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = 3 + (state % 38) as usize;
        let text = words[..n].join(" ");
        let tensor = Tensor::from_byte_strings("text", vec![1], &[text.as_bytes()])?;
        let t = Instant::now();
        let encoded = bucketed.encode(&tensor, &ids)?;
        a.run(&encoded.inputs).map_err(anyhow::Error::msg)?;
        let with_time = t.elapsed();
        let t = Instant::now();
        let mut plain = exact.encode(&tensor, &ids)?.inputs;
        let len = plain[0].shape()[1];
        plain.push(Tensor::from_values(
            "attention_mask",
            vec![1, len],
            &vec![1i64; len as usize],
        )?);
        plain.push(Tensor::from_values(
            "token_type_ids",
            vec![1, len],
            &vec![0i64; len as usize],
        )?);
        b.run(&plain).map_err(anyhow::Error::msg)?;
        let without_time = t.elapsed();
        // The first calls warm both up.
        if call >= 20 {
            with.push(with_time);
            without.push(without_time);
            lengths.insert(len);
            padded.insert(encoded.length);
        }
    }
    let (w50, w99) = percentiles(&mut with);
    let (o50, o99) = percentiles(&mut without);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report(&format!(
        "texts of 3-40 words ({} lengths, {} to {} tokens), one a call, tokenize + tract fp32:",
        lengths.len(),
        lengths.first().copied().unwrap_or(0),
        lengths.last().copied().unwrap_or(0)
    ));
    let used: Vec<String> = padded.iter().map(ToString::to_string).collect();
    report(&format!(
        "  padded to the buckets ({:<10})  {:>8.3} ms / {:>8.3} ms",
        used.join(", "),
        ms(w50),
        ms(w99)
    ));
    report(&format!(
        "  each at its own length                {:>8.3} ms / {:>8.3} ms   own length / buckets p50: {:.2}",
        ms(o50),
        ms(o99),
        ms(o50) / ms(w50)
    ));
    Ok(())
}

/// The model's token inputs (`names`, of [`TOKEN_INPUTS`]) of `[batch, seq]`: ids as the ONNX
/// Runtime script makes them, `attention_mask` ones and `token_type_ids` zeros.
fn token_inputs(batch: u64, seq: u64, names: &[&str]) -> anyhow::Result<Vec<Tensor>> {
    let n = batch * seq;
    names
        .iter()
        .map(|&name| {
            let values: Vec<i64> = match name {
                "input_ids" => (0..n).map(|i| ((i * 7919 + 13) % 500 + 5) as i64).collect(),
                "attention_mask" => vec![1; n as usize],
                _ => vec![0; n as usize],
            };
            Ok(Tensor::from_values(name, vec![batch, seq], &values)?)
        })
        .collect()
}
