//! The `outpost` binary's command line, run as a process: bad arguments are refused with the
//! reason. (This test also makes `cargo test --workspace` build the binary, which the e2e
//! tests run.)

#![allow(clippy::unwrap_used)]

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
