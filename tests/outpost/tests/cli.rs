//! The `outpost` binary's command line, run as a process: bad arguments are refused with the
//! reason, and `gpu-check` compares the GPU engine with tract. (This test also makes `cargo test --workspace` build the binary, which the e2e
//! tests run.)

#![allow(clippy::unwrap_used, clippy::panic)]

use std::process::Command;

fn binary(_: &str) -> &'static str {
    env!("CARGO_BIN_EXE_outpost")
}

#[test]
fn bad_arguments_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (args, reason) in [
        (&["--agents", "0"][..], "--agents must be at least 1"),
        (&["--canary", "0"][..], "--canary must be a percentage"),
        (&["--scenario", "storm"][..], "invalid value 'storm'"),
    ] {
        let out = Command::new(binary("outpost"))
            .arg("sim")
            .args(args)
            .arg("--data")
            .arg(dir.path().join("bad"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was taken");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    // A folder that already holds a simulation's fleet is not overwritten.
    std::fs::create_dir_all(dir.path().join("used/fleet")).unwrap();
    let out = Command::new(binary("outpost"))
        .args(["sim", "--agents", "1", "--data"])
        .arg(dir.path().join("used"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give --data a new folder"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `outpost gpu-check` (the parity check a GPU machine runs from the binary) compares every demo
/// and text model on this machine's adapter (lavapipe in CI), and names a model the GPU engine
/// does not take, failing the run.
#[test]
fn gpu_check_compares_every_model_and_names_one_off_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    // An ArgMax label: no GPU kernel takes it.
    let off_the_gpu = dir.path().join("labels.onnx");
    std::fs::write(
        &off_the_gpu,
        model_zoo::gate::label_outputs(model_zoo::DEFAULT_SEED),
    )
    .unwrap();
    let out = Command::new(binary("outpost"))
        .arg("gpu-check")
        .arg("--model")
        .arg(&off_the_gpu)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("GPU adapter: "), "{stdout}");
    // lavapipe has shader-f16: every line shows the f16 activations' difference too.
    let f16 = stdout.lines().next().unwrap().contains("shader-f16: yes");
    let names = model_zoo::DemoModel::ALL
        .iter()
        .map(|m| m.name())
        .chain(model_zoo::TextModel::ALL.iter().map(|m| m.name()));
    for name in names {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}: {stdout}"));
        assert!(line.contains("(ok)"), "{line}");
        assert_eq!(line.contains("f16 activations"), f16, "{line}");
    }
    let bad = stdout.lines().find(|l| l.contains("labels.onnx")).unwrap();
    assert!(
        bad.contains("FAILED") && bad.contains("ArgMax"),
        "{bad}\n{stdout}"
    );
    assert!(
        stderr.contains("off the GPU or past the tolerance"),
        "{stderr}"
    );
}

/// `bench --text-only --text-model FILE` names what is wrong with a file that is not a text
/// encoder, or not there, before measuring anything.
#[test]
fn a_text_model_that_is_not_an_encoder_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    // Its inputs are `tokens` (floats) and `ids`: not a text encoder's.
    let not_an_encoder = dir.path().join("labels.onnx");
    std::fs::write(
        &not_an_encoder,
        model_zoo::gate::label_outputs(model_zoo::DEFAULT_SEED),
    )
    .unwrap();
    for (file, reason) in [
        (not_an_encoder, "the model has an input \"tokens\""),
        (dir.path().join("missing.onnx"), "reading"),
    ] {
        let out = Command::new(binary("outpost"))
            .args(["bench", "--text-only", "--text-model"])
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file:?} was taken");
        assert!(stderr.contains(reason), "{file:?}: {stderr}");
    }
}

/// `bench --text-only --onnxruntime-library FILE` measures the agent's ONNX Runtime engine on
/// the fp32 and int8 files beside tract (no GPU here: `WGPU_BACKEND=dx12` finds no adapter on
/// Linux), and says why when the library cannot load, measuring the rest.
#[test]
fn the_text_bench_measures_the_onnx_runtime_engine_or_says_why_not() {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.oip-servers/mlserver");
    let library = outpost_runtime::onnxruntime::library_in_venv(&venv).unwrap_or_else(|| {
        panic!(
            "no onnxruntime in {}: run `bash tests/support/python/install`",
            venv.display()
        )
    });
    let run = |library: &std::path::Path| {
        let out = Command::new(binary("outpost"))
            .args([
                "bench",
                "--text-only",
                "--calls",
                "3",
                "--onnxruntime-library",
            ])
            .arg(library)
            .env("WGPU_BACKEND", "dx12")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let stdout = run(&library);
    assert!(
        stdout.contains(&format!(
            "the agent's ONNX Runtime engine: {}",
            library.display()
        )),
        "{stdout}"
    );
    for shape in ["batch 1, sequence  32", "batch 8, sequence 128"] {
        for row in ["ORT engine fp32", "ORT engine int8", "tract fp32"] {
            assert!(
                stdout.contains(&format!("{shape}  {row}")),
                "{shape} {row}: {stdout}"
            );
        }
    }
    let stdout = run(std::path::Path::new("/nowhere/libonnxruntime.so"));
    assert!(
        stdout.contains("the agent's ONNX Runtime engine: not measured (ONNX Runtime library /nowhere/libonnxruntime.so: no such file)"),
        "{stdout}"
    );
    assert!(!stdout.contains("ORT engine fp32"), "{stdout}");
    assert!(
        stdout.contains("batch 8, sequence 128  tract fp32"),
        "{stdout}"
    );
}

/// `bench --memory-only` measures requests of rows and of texts in child processes: a request
/// of 10 000 000 rows is refused at the agent's body limit, and texts to the intent classifier
/// answer on the device and through the coordinator, each growth shown beside its budget.
#[test]
fn the_memory_bench_measures_rows_and_texts_on_both_sides() {
    let out = Command::new(binary("outpost"))
        .args([
            "bench",
            "--memory-only",
            "--memory-rows",
            "1000,10000000",
            "--memory-tokens",
            "8",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "10000000  agent-json",
        "refused 413",
        "(a body past the agent's limit)",
        "1000 texts in one request to intent-classifier-text",
        "working memory: device 1024 MiB, 256 MiB a call",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    for case in ["agent-texts", "cloud-texts"] {
        let line = stdout
            .lines()
            .find(|l| l.contains(case))
            .unwrap_or_else(|| panic!("{case} missing from:\n{stdout}"));
        assert!(line.trim_end().ends_with("200"), "{line}");
    }
}
