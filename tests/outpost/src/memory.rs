//! `outpost bench --memory-only`: peak memory against body size for one inference request,
//! each case in a fresh child process (`outpost bench-memory-case`, hidden) so that no case
//! inherits another's freed-but-resident heap.
//!
//! A child builds the body first, then resets its peak resident set (`/proc/self/clear_refs`,
//! `5`), does the one thing measured, and reports the peak's growth over the resident set at
//! the reset. The cases, on `video-ranker` requests of N rows (32 features and an item id each;
//! features are small integers, so N = 900 000 is a 62 MB JSON body, the size of the issue's
//! 59 MB request):
//!
//! - `parse-value`: the baseline, the body read the way the agent read it before: a
//!   `serde_json::Value` tree per request, then the tensors from it;
//! - `parse-typed`: [`InferRequest::parse`], elements parsed straight into the tensors' bytes;
//! - `engine`: the engine alone (tract, the int8 variant agents get) running the tensors, to
//!   tell its share of the agent's figure;
//! - `agent-json` / `agent-binary`: the whole request through a running agent (in the child),
//!   body to answer: parsing, the engine, the response. The binary body is the tensors' bytes
//!   after a JSON header.
//!
//! And a second table, 1 000 texts of T tokens in one request to the intent classifier (a
//! transformer encoder: its attention grows with T²), against the budgets that bound it:
//!
//! - `agent-texts`: placed on the device, through a running agent (laptop profile: 1 024 MiB of
//!   working memory, 256 MiB a call);
//! - `cloud-texts`: placed in the cloud: the agent tokenizes, the coordinator runs it (in the
//!   same child: 2 048 MiB of working memory, 1 024 MiB a call with its 2 workers).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cloud_coordinator::{AdminClient, PushOptions};
use model_zoo::{DEFAULT_SEED, DemoModel, TextModel, vocab};
use outpost_runtime::http::{Bytes, HttpClient, Request, StatusCode};
use outpost_runtime::quantize::quantize_int8;
use outpost_runtime::tract::{TractModel, TractOptions};
use outpost_shared::oip::{InferRequest, RequestLimits};
use outpost_shared::{JsonTensor, Placement, Tensor};

use crate::quickstart::DevFleet;

/// The cases, in the order they are reported.
pub const CASES: [&str; 5] = [
    "parse-value",
    "parse-typed",
    "engine",
    "agent-json",
    "agent-binary",
];

/// What one child measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// The request body's bytes.
    pub body: usize,
    /// The input tensors' bytes.
    pub tensors: usize,
    /// Growth of the peak resident set over the resident set before the request, KiB.
    pub growth_kib: u64,
    /// The HTTP status when the agent refused the request (a body over its limit).
    pub refused: Option<u16>,
    /// Resident set kept a second after the answer, over the one before the request, KiB
    /// (what the allocator did not give back).
    pub kept_kib: u64,
    /// The working memory estimated for one part of the call (the text cases), KiB.
    pub estimate_kib: u64,
}

/// The text cases, in the order they are reported.
pub const TEXT_CASES: [&str; 2] = ["agent-texts", "cloud-texts"];

/// Texts in one request of the text cases (the issue's: 1 000 texts of 490 tokens took a
/// coordinator down).
pub const TEXTS: usize = 1_000;

/// Runs one case in a child process; what it measured.
fn in_child(exe: &std::path::Path, case: &str, n: u64) -> anyhow::Result<Measured> {
    let out = std::process::Command::new(exe)
        .args(["bench-memory-case", case, &n.to_string()])
        .output()
        .with_context(|| format!("running case {case}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    (out.status.success())
        .then(|| parse_line(&text))
        .flatten()
        .with_context(|| {
            format!(
                "case {case}, {n} failed: {}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
}

/// Runs every case for every row count and text length in child processes; `report` gets the
/// tables' lines.
pub fn run(rows: &[u64], tokens: &[u64], mut report: impl FnMut(&str)) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program to run the cases")?;
    report("peak memory of one video-ranker request (growth of the peak resident set, MiB):");
    report(&format!(
        "  {:>7}  {:<13} {:>9} {:>9} {:>9} {:>14}",
        "rows", "case", "body", "tensors", "growth", "growth / body"
    ));
    for &n in rows {
        for case in CASES {
            // Past the agent's body limit only the agent's refusal is worth measuring.
            if !case.starts_with("agent-") && n.saturating_mul(72) > edge_agent::MAX_BODY as u64 {
                report(&format!(
                    "  {n:>7}  {case:<13} (a body past the agent's limit)"
                ));
                continue;
            }
            let measured = in_child(&exe, case, n)?;
            let mib = |b: f64| b / (1024.0 * 1024.0);
            let ratio = match measured.refused {
                Some(status) => format!("refused {status}"),
                None if measured.body == 0 => "-".to_owned(),
                None => format!(
                    "{:.2}x",
                    measured.growth_kib as f64 * 1024.0 / measured.body.max(1) as f64
                ),
            };
            report(&format!(
                "  {n:>7}  {case:<13} {:>9.1} {:>9.1} {:>9.1} {ratio:>14}",
                mib(measured.body as f64),
                mib(measured.tensors as f64),
                measured.growth_kib as f64 / 1024.0,
            ));
        }
    }
    if tokens.is_empty() {
        return Ok(());
    }
    let laptop = firmware_config::DeviceClass::Laptop.profile();
    let coordinator = firmware_config::InferenceSection::default();
    report(&format!(
        "peak memory of {TEXTS} texts in one request to intent-classifier-text (growth of the peak resident set, MiB; working memory: device {} MiB, {} MiB a call; coordinator {} MiB, {} MiB a call):",
        laptop.working_memory_mb,
        laptop.call_memory_bytes() >> 20,
        coordinator.working_memory_mb,
        coordinator.call_memory_bytes() >> 20,
    ));
    report(&format!(
        "  {:>7}  {:<13} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "tokens", "case", "body", "growth", "after 1 s", "est. part", "answer"
    ));
    for &n in tokens {
        for case in TEXT_CASES {
            let measured = in_child(&exe, case, n)?;
            report(&format!(
                "  {n:>7}  {case:<13} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>10}",
                measured.body as f64 / (1024.0 * 1024.0),
                measured.growth_kib as f64 / 1024.0,
                measured.kept_kib as f64 / 1024.0,
                measured.estimate_kib as f64 / 1024.0,
                measured
                    .refused
                    .map_or_else(|| "200".to_owned(), |s| s.to_string()),
            ));
        }
    }
    Ok(())
}

fn parse_line(text: &str) -> Option<Measured> {
    let line = text.lines().find_map(|l| l.strip_prefix("measured "))?;
    let mut parts = line.split_whitespace().map(str::parse::<u64>);
    Some(Measured {
        body: usize::try_from(parts.next()?.ok()?).ok()?,
        tensors: usize::try_from(parts.next()?.ok()?).ok()?,
        growth_kib: parts.next()?.ok()?,
        refused: parts
            .next()?
            .ok()
            .filter(|&s| s != 200)
            .and_then(|s| u16::try_from(s).ok()),
        kept_kib: parts.next().and_then(Result::ok).unwrap_or(0),
        estimate_kib: parts.next().and_then(Result::ok).unwrap_or(0),
    })
}

/// One case, in this (child) process; prints `measured BODY TENSORS GROWTH_KIB STATUS`.
#[allow(clippy::print_stdout)]
pub fn run_case(case: &str, rows: u64) -> anyhow::Result<()> {
    let inputs = match case {
        "agent-texts" | "cloud-texts" => Vec::new(),
        _ => ranker_inputs(rows)?,
    };
    let tensors = inputs.iter().map(|t| t.data().len()).sum();
    let measured = match case {
        "parse-value" | "parse-typed" => {
            let body = json_body(rows);
            let growth = peak_growth(|| {
                let parsed = if case == "parse-value" {
                    parse_through_values(&body)
                } else {
                    InferRequest::parse(&body, None, &RequestLimits::UNLIMITED)
                        .map(|r| r.inputs)
                        .map_err(anyhow::Error::from)
                }?;
                if parsed != inputs {
                    bail!("the parsed tensors differ from the ones the body was made from");
                }
                Ok(())
            })?;
            Measured {
                body: body.len(),
                tensors,
                growth_kib: growth,
                refused: None,
                kept_kib: 0,
                estimate_kib: 0,
            }
        }
        "engine" => {
            let int8 = quantize_int8(&DemoModel::VideoRanker.bytes(DEFAULT_SEED))?.bytes;
            let engine = TractModel::load_with(&int8, TractOptions::default())
                .map_err(anyhow::Error::msg)?;
            let growth = peak_growth(|| {
                engine.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(())
            })?;
            Measured {
                body: 0,
                tensors,
                growth_kib: growth,
                refused: None,
                kept_kib: 0,
                estimate_kib: 0,
            }
        }
        "agent-texts" | "cloud-texts" => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(texts_through_agent(case == "cloud-texts", rows))?,
        "agent-json" | "agent-binary" => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(through_agent(case == "agent-binary", rows, &inputs))?,
        other => bail!(
            "unknown case {other:?} (cases: {}, {})",
            CASES.join(", "),
            TEXT_CASES.join(", ")
        ),
    };
    println!(
        "measured {} {} {} {} {} {}",
        measured.body,
        measured.tensors,
        measured.growth_kib,
        measured.refused.unwrap_or(200),
        measured.kept_kib,
        measured.estimate_kib
    );
    Ok(())
}

/// The agent's old reading of a body: a `Value` per element, then the tensors.
fn parse_through_values(body: &[u8]) -> anyhow::Result<Vec<Tensor>> {
    #[derive(serde::Deserialize)]
    struct Old {
        inputs: Vec<JsonTensor>,
    }
    let old: Old = serde_json::from_slice(body)?;
    old.inputs
        .iter()
        .map(|t| Tensor::from_json(t).map_err(anyhow::Error::from))
        .collect()
}

async fn through_agent(binary: bool, rows: u64, inputs: &[Tensor]) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    let coordinator = crate::bench::loopback_coordinator(dir.path()).await?;
    let fleet = DevFleet::of(&coordinator)?;
    let agent = fleet.start_agent(1, 0, dir.path()).await?;
    AdminClient::of(&coordinator)
        .push(
            "video-ranker",
            DemoModel::VideoRanker.bytes(DEFAULT_SEED),
            &PushOptions::default().placement(Placement::Local),
        )
        .await
        .map_err(|e| anyhow::anyhow!("push: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while agent.active_version("video-ranker").is_none() {
        if Instant::now() > deadline {
            bail!("the agent did not serve video-ranker within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (body, header) = if binary {
        let (body, header) = crate::bench::binary_body(inputs);
        (body, Some(header.len().to_string()))
    } else {
        (json_body(rows), None)
    };
    let body_len = body.len();
    let body = Bytes::from(body);
    let mut connection = HttpClient::new(agent.api_addr).connect().await?;
    // Settle: the install's buffers freed, the engine's first plan made.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = reset_peak()?;
    let mut request = Request::post("/v2/models/video-ranker/infer", body)
        .header("Content-Type", "application/json");
    if let Some(h) = &header {
        request = request.header("Inference-Header-Content-Length", h);
    }
    let answer = connection.send(request).await;
    let peak = status_kib("VmHWM:")?;
    let refused = match answer {
        Ok(answer) => match answer.status {
            StatusCode::OK => None,
            StatusCode::PAYLOAD_TOO_LARGE => Some(413),
            other => bail!("the agent answered {other}: {}", answer.text()),
        },
        // A declared length past the limit is answered 413 at once and the connection closed
        // under the rest of the body: the client may see the close before the answer.
        Err(_) if body_len > edge_agent::MAX_BODY => Some(413),
        Err(e) => return Err(e.into()),
    };
    drop(connection);
    agent.shutdown().await;
    coordinator.shutdown().await;
    Ok(Measured {
        body: body_len,
        tensors: inputs.iter().map(|t| t.data().len()).sum(),
        growth_kib: peak.saturating_sub(before),
        refused,
        kept_kib: 0,
        estimate_kib: 0,
    })
}

/// [`TEXTS`] texts of about `tokens` tokens each (with the tokenizer's two special tokens) to
/// the intent classifier, placed on the device or in the cloud, through a running agent and
/// coordinator in this process.
async fn texts_through_agent(cloud: bool, tokens: u64) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    let coordinator = crate::bench::loopback_coordinator(dir.path()).await?;
    let fleet = DevFleet::of(&coordinator)?;
    let agent = fleet.start_agent(1, 0, dir.path()).await?;
    let placement = if cloud {
        Placement::Cloud
    } else {
        Placement::Local
    };
    let model = TextModel::IntentClassifierText
        .bytes(DEFAULT_SEED)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // What one part of the call is estimated to take, at the bound it is cut to.
    let bound = if cloud {
        firmware_config::InferenceSection::default().call_memory_bytes()
    } else {
        firmware_config::DeviceClass::Laptop
            .profile()
            .call_memory_bytes()
    };
    let cost = TractModel::load(&model)
        .map_err(anyhow::Error::msg)?
        .memory
        .map_err(anyhow::Error::msg)?
        .cost(tokens);
    let estimate = cost
        .rows_within(bound)
        .map_or(0, |rows| cost.bytes(rows.min(TEXTS as u64)));
    AdminClient::of(&coordinator)
        .push(
            "intents",
            model,
            &PushOptions::default()
                .placement(placement)
                .tokenizer(vocab::tokenizer_json().into_bytes()),
        )
        .await
        .map_err(|e| anyhow::anyhow!("push: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while agent.active_version("intents").is_none() {
        if Instant::now() > deadline {
            bail!("the agent did not serve intents within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Words the vocabulary holds whole, one token each.
    let words: Vec<String> = vocab::vocabulary()
        .into_iter()
        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase()) && w.len() > 2)
        .take(200)
        .collect();
    if words.is_empty() {
        bail!("the vocabulary has no plain words");
    }
    let per_text = usize::try_from(tokens.saturating_sub(2).max(1))?;
    let texts: Vec<String> = (0..TEXTS)
        .map(|i| {
            (0..per_text)
                .map(|k| words[(i * 7 + k) % words.len()].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let body = serde_json::json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [TEXTS], "data": texts}]})
        .to_string()
        .into_bytes();
    drop(texts);
    let body_len = body.len();
    // A thousand long texts take minutes on two cores.
    let limits = outpost_runtime::http::Limits {
        timeout: Duration::from_secs(600),
        ..outpost_runtime::http::Limits::default()
    };
    let mut connection = HttpClient::new(agent.api_addr)
        .with_limits(limits)
        .connect()
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = reset_peak()?;
    let answer = connection
        .send(
            Request::post("/v2/models/intents/infer", Bytes::from(body))
                .header("Content-Type", "application/json"),
        )
        .await?;
    let peak = status_kib("VmHWM:")?;
    let refused = match answer.status {
        StatusCode::OK => None,
        other => Some(other.as_u16()),
    };
    drop(answer);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kept = status_kib("VmRSS:")?.saturating_sub(before);
    drop(connection);
    agent.shutdown().await;
    coordinator.shutdown().await;
    Ok(Measured {
        body: body_len,
        tensors: 0,
        growth_kib: peak.saturating_sub(before),
        refused,
        kept_kib: kept,
        estimate_kib: estimate / 1024,
    })
}

/// The peak's growth while `f` runs, KiB.
fn peak_growth(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<u64> {
    let before = reset_peak()?;
    f()?;
    Ok(status_kib("VmHWM:")?.saturating_sub(before))
}

/// Resets this process's peak resident set to the current one, which it returns (KiB).
fn reset_peak() -> anyhow::Result<u64> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("resetting the peak resident set (/proc/self/clear_refs; Linux only)")?;
    status_kib("VmRSS:")
}

/// A `/proc/self/status` figure in KiB (`VmRSS:`, `VmHWM:`).
pub(crate) fn status_kib(key: &str) -> anyhow::Result<u64> {
    status_figure("/proc/self/status", key)
}

/// A `/proc/{pid}/status` figure of another process in KiB (`VmRSS`, `VmHWM`).
pub(crate) fn process_status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    status_figure(&format!("/proc/{pid}/status"), &format!("{key}:"))
}

fn status_figure(path: &str, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}

/// `rows` video-ranker rows: features the small integers 0–9, item ids below the catalog size.
fn ranker_inputs(rows: u64) -> anyhow::Result<Vec<Tensor>> {
    let features: Vec<f32> = (0..rows * 32).map(|i| (i % 10) as f32).collect();
    let ids: Vec<i64> = (0..rows as i64)
        .map(|i| (i * 97) % model_zoo::CATALOG_ITEMS as i64)
        .collect();
    Ok(vec![
        Tensor::from_values("user_features", vec![rows, 32], &features)?,
        Tensor::from_values("item_ids", vec![rows], &ids)?,
    ])
}

/// The JSON body for [`ranker_inputs`], written directly (integers, as a client would send
/// them: two bytes a feature).
fn json_body(rows: u64) -> Vec<u8> {
    use std::io::Write;
    let mut body = Vec::with_capacity(rows as usize * 72 + 200);
    let _ = write!(
        body,
        r#"{{"inputs":[{{"name":"user_features","shape":[{rows},32],"datatype":"FP32","data":["#
    );
    for i in 0..rows * 32 {
        if i > 0 {
            body.push(b',');
        }
        body.push(b'0' + (i % 10) as u8);
    }
    let _ = write!(
        body,
        r#"]}},{{"name":"item_ids","shape":[{rows}],"datatype":"INT64","data":["#
    );
    for i in 0..rows as i64 {
        if i > 0 {
            body.push(b',');
        }
        let _ = write!(body, "{}", (i * 97) % model_zoo::CATALOG_ITEMS as i64);
    }
    body.extend_from_slice(b"]}]}");
    body
}
