//! The `edge-agent` binary refuses to start without a usable config, and says how to get one.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn agent(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn without_a_usable_config_it_says_what_to_do() {
    let (ok, err) = agent(&["run"]);
    assert!(!ok);
    assert!(
        err.contains("needs a config") && err.contains("firmware-config provision"),
        "{err}"
    );
    let (ok, err) = agent(&["run", "--config", "/nonexistent/agent.toml"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("agent.toml");
    std::fs::write(&broken, "[device]\nid = \"x\"\n[coordinater]\n").unwrap();
    let (ok, err) = agent(&["run", "--config", broken.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("agent.toml:1:1: missing key \"device.certificate\""),
        "{err}"
    );
}
