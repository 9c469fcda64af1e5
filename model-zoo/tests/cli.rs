//! The `model-zoo` binary writes loadable, deterministic files and refuses unknown names.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_model-zoo"))
}

/// `model-zoo write ARGS --out DIR`, which must succeed; its stdout.
fn write(args: &[&str], dir: &std::path::Path) -> String {
    let out = cli()
        .arg("write")
        .args(args)
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn write_selected_models_then_list() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = write(
        &[
            "--model",
            "video-ranker",
            "--model",
            "intent-classifier",
            "--seed",
            "5",
        ],
        dir.path(),
    );
    assert!(
        stdout.contains("[1/2]") && stdout.contains("[2/2]"),
        "{stdout}"
    );
    let written = std::fs::read(dir.path().join("video-ranker.onnx")).unwrap();
    assert_eq!(written, model_zoo::DemoModel::VideoRanker.bytes(5));
    assert!(dir.path().join("intent-classifier.onnx").is_file());
    assert!(!dir.path().join("music-two-tower.onnx").exists());

    let list = cli().arg("list").output().unwrap();
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert_eq!(stdout.lines().count(), 7, "{stdout}");
    assert!(stdout.contains("video-ranker-xl") && stdout.contains("video-search"));
}

#[test]
fn a_text_model_is_written_with_its_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    write(&["--model", "video-search"], dir.path());
    let model = std::fs::read(dir.path().join("video-search.onnx")).unwrap();
    assert_eq!(
        model,
        model_zoo::TextModel::VideoSearch
            .bytes(model_zoo::DEFAULT_SEED)
            .unwrap()
    );
    let json = std::fs::read(dir.path().join("video-search.tokenizer.json")).unwrap();
    assert_eq!(json, model_zoo::vocab::tokenizer_json().into_bytes());
}

#[test]
fn unknown_model_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli()
        .args(["write", "--model", "video-rankr", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown model \"video-rankr\"") && stderr.contains("video-ranker"),
        "{stderr}"
    );
}
