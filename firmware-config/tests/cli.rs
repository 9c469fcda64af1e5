//! The `firmware-config` binary: provision then validate, and the exit codes and messages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_firmware-config"))
}

#[test]
fn provision_then_validate_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fleet");
    let status = cli()
        .args([
            "provision",
            "--fleet",
            "demo",
            "--devices",
            "2",
            "--coordinator",
            "localhost:4433",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("demo-0002"), "{stdout}");

    let files = [
        out.join("coordinator.toml"),
        out.join("devices/demo-0001/agent.toml"),
        out.join("devices/demo-0002/agent.toml"),
    ];
    let result = cli().arg("validate").args(&files).output().unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert_eq!(stdout.matches(": ok").count(), 3, "{stdout}");
    assert!(stdout.contains("(agent config)") && stdout.contains("(coordinator config)"));

    // A second provision into the same folder fails and says why.
    let again = cli()
        .args([
            "provision",
            "--fleet",
            "demo",
            "--coordinator",
            "localhost:4433",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));
}

#[test]
fn validate_exits_1_with_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("agent.toml");
    std::fs::write(&bad, "[device]\nid = \"x\"\ncertificate = \"c\"\nkey = \"k\"\n[fleet]\nname = \"f\"\nca = \"ca\"\nmanifest_keys = []\n[coordinater]\n").unwrap();
    let result = cli().arg("validate").arg(&bad).output().unwrap();
    assert_eq!(result.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr
            .contains("agent.toml:9:2: unknown key \"coordinater\", did you mean \"coordinator\"?"),
        "{stderr}"
    );

    let missing = cli()
        .args(["validate", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read the file"));
}

#[test]
fn bad_arguments_are_refused_by_name() {
    let result = cli()
        .args([
            "provision",
            "--fleet",
            "x",
            "--coordinator",
            "nohost",
            "--out",
            "/tmp/never",
        ])
        .output()
        .unwrap();
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("not a HOST:PORT"));
    let help = cli().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("provision"));
}

/// The provisioned coordinator config names no CA key (a coordinator serves without it); devices
/// are enrolled offline where the key is, with `firmware-config enroll`, and a folder without
/// the key says where enrolment happens.
#[test]
fn enrolment_happens_where_the_ca_key_is() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fleet");
    let made = cli()
        .args([
            "provision",
            "--fleet",
            "off",
            "--coordinator",
            "localhost:4433",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let toml = std::fs::read_to_string(out.join("coordinator.toml")).unwrap();
    let config = firmware_config::CoordinatorConfig::load(&out.join("coordinator.toml")).unwrap();
    assert_eq!(config.fleet.unwrap().ca_key, None, "{toml}");

    let enrolled = cli()
        .args(["enroll", "--fleet"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    assert!(String::from_utf8_lossy(&enrolled.stdout).contains("off-0002"));
    let agent = out.join("devices/off-0002/agent.toml");
    let check = cli().args(["validate"]).arg(&agent).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The key moved offline: enrolment here says where it happens.
    std::fs::rename(out.join("ca.key"), dir.path().join("ca.key.offline")).unwrap();
    let refused = cli()
        .args(["enroll", "--fleet"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("no CA key") && err.contains("firmware-config enroll"),
        "{err}"
    );
}
