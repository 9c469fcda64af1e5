//! What the `cloud-coordinator` binary prints for people (part of `main.rs`, not the library):
//! the summaries of a push and a fine-tune, and the progress of an upload and a fine-tune.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cloud_coordinator::admin::Published;
use outpost_runtime::http::UploadProgress;

/// A push's answer for people: what was (or would be) published, each variant's size and
/// download against the current version, and the int8 figures.
pub(crate) fn summarise_push(published: &Published) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let what = format!(
        "{} version {} (release {}, {})",
        published.model, published.version, published.release, published.stage
    );
    if published.dry_run {
        writeln!(
            out,
            "dry run: {what} would be published; nothing was stored or announced"
        )?;
    } else {
        writeln!(out, "published {what}")?;
    }
    for d in &published.delta {
        let against = match d.against_version {
            Some(old) => format!(
                "{} new against version {old} ({} of {} chunks, {:.1} %)",
                size(d.new_bytes),
                d.new_chunks,
                d.chunks,
                100.0 * d.new_bytes as f64 / d.bytes.max(1) as f64
            ),
            None => "all new".to_owned(),
        };
        writeln!(
            out,
            "  {:<10}  {} in {} chunks; {against}",
            d.target.as_str(),
            size(d.bytes),
            d.chunks
        )?;
    }
    if let Some(edge) = &published.edge {
        let q = &edge.quantize;
        writeln!(
            out,
            "  int8: {} weight tensors; {} fp32 -> {} int8 ({:.1} %)",
            q.tensors,
            size(q.fp32_bytes),
            size(q.int8_bytes),
            100.0 * q.int8_bytes as f64 / q.fp32_bytes.max(1) as f64
        )?;
        if let Some(f) = &edge.fallback {
            writeln!(
                out,
                "  all-int8 missed the gate ({}); kept {} weight tensors in fp32 ({:.1} % of the weights, +{}, {} gate runs):",
                f.missed.join("; "),
                f.kept.len(),
                f.kept_share * 100.0,
                size(f.extra_bytes),
                f.gate_runs
            )?;
            for k in &f.kept {
                let alone = k
                    .distance_alone
                    .map_or("NaN".to_owned(), |d| format!("{d:.2}"));
                writeln!(
                    out,
                    "    {} ({} elements; alone {alone} of the tolerance)",
                    k.name, k.elements
                )?;
            }
        }
        let a = &edge.accuracy;
        writeln!(out, "  accuracy gate ({} rows, {}):", a.rows, a.samples)?;
        for o in &a.outputs {
            writeln!(out, "    {o}")?;
        }
    }
    Ok(out)
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// The summary `finetune` prints: the head, the figures side by side, and what was published.
pub(crate) fn summarise_finetune(
    r: &cloud_coordinator::finetune::FinetuneReport,
) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    writeln!(
        out,
        "{} version {}: head {} ({} features -> {} {}), {} examples: {} train, {} validation, {} held out",
        r.model,
        r.from_version,
        r.head.node,
        r.head.inputs,
        r.head.outputs,
        match r.head.kind {
            outpost_runtime::finetune::HeadKind::Classifier => "classes",
            outpost_runtime::finetune::HeadKind::Score => "score",
        },
        r.examples,
        r.train,
        r.validation,
        r.holdout
    )?;
    writeln!(
        out,
        "features: {:.1} s ({:.0} examples/s); training: {:.1} s, {} L-BFGS iterations",
        r.features_s, r.examples_per_s, r.train_s, r.iterations
    )?;
    writeln!(
        out,
        "held out: {}",
        cloud_coordinator::finetune::describe(r)
    )?;
    if let Some(p) = &r.published {
        out.push_str(&summarise_push(p)?);
    }
    Ok(out)
}

/// Shows a fine-tune's progress on stderr: a bar redrawn in place on a terminal, a line every
/// 10 % otherwise (a CI log).
pub(crate) fn finetune_progress() -> cloud_coordinator::FinetuneProgress {
    use cloud_coordinator::admin::FinetuneEvent;
    let terminal = std::io::stderr().is_terminal();
    let shown = AtomicU64::new(0);
    Arc::new(move |event: &FinetuneEvent| {
        let line = match event {
            FinetuneEvent::Read { examples } => format!("read {examples} examples"),
            FinetuneEvent::Features { done, total, per_s } => {
                let tenth = (done * 10 / (*total).max(1)) as u64;
                if !terminal && tenth <= shown.swap(tenth, Ordering::Relaxed) {
                    return;
                }
                let width = 30;
                let filled = done * width / (*total).max(1);
                let bar = format!("{}{}", "#".repeat(filled), ".".repeat(width - filled));
                let text = format!(
                    "features [{bar}] {done}/{total} ({:.0} %), {per_s:.0} examples/s",
                    *done as f64 * 100.0 / (*total).max(1) as f64
                );
                if terminal && done < total {
                    #[allow(clippy::print_stderr)]
                    {
                        eprint!("\r\x1b[2K{text}");
                    }
                    return;
                }
                text
            }
            FinetuneEvent::Training { examples } => {
                format!("training the head on {examples} examples")
            }
            FinetuneEvent::Publishing => {
                "the new head is better: making the edge variant, gating and signing it".to_owned()
            }
            FinetuneEvent::Done { .. } => return,
        };
        #[allow(clippy::print_stderr)]
        {
            if terminal {
                eprintln!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
        }
    })
}

/// Shows a big upload's progress on a terminal: a percentage, then a line once it is all sent.
pub(crate) fn upload_progress() -> UploadProgress {
    let show = std::io::stderr().is_terminal();
    let shown = AtomicU64::new(0);
    Arc::new(move |sent: u64, total: u64| {
        if !show || total <= 4 << 20 {
            return;
        }
        let percent = sent * 100 / total;
        let before = shown.load(Ordering::Relaxed);
        if percent >= before + 5 {
            #[allow(clippy::print_stderr)]
            {
                eprint!("\ruploading {percent:>3}% of {:.1} MB", total as f64 / 1e6);
            }
            shown.store(percent, Ordering::Relaxed);
        }
        if sent >= total {
            #[allow(clippy::print_stderr)]
            {
                eprintln!(
                    "\ruploaded {:.1} MB, waiting for the coordinator to check and store it",
                    total as f64 / 1e6
                );
            }
        }
    })
}
