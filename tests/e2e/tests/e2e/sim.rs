//! `outpost sim` as an operator runs it: the real executable (it runs its coordinator and
//! broker as children of itself), each scenario on a small fleet, its JSON report and its plot.

use std::path::Path;
use std::process::Command;

use outpost_test_support::process::binary;
use serde_json::Value;

/// Runs `outpost sim --scenario SCENARIO` with 8 agents and `extra`; the JSON report.
fn sim(dir: &Path, scenario: &str, extra: &[&str]) -> Value {
    let plot = dir.join(format!("{scenario}.svg"));
    let out = Command::new(binary("outpost"))
        .args(["sim", "--agents", "8", "--scenario", scenario, "--json"])
        .args(["--timeout", "120", "--plot"])
        .arg(&plot)
        .arg("--data")
        .arg(dir.join(scenario))
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "outpost sim {scenario}: {stderr}");
    assert!(
        stderr.contains("] provisioning "),
        "no progress line: {stderr}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("seconds"), "{svg}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The figure `name` of a report.
fn figure(report: &Value, name: &str) -> f64 {
    report["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .and_then(|f| f["value"].as_f64())
        .unwrap_or_else(|| panic!("no figure {name:?} in {report:#}"))
}

#[test]
fn push_reports_when_every_agent_serves_and_what_moved() {
    let dir = tempfile::tempdir().unwrap();
    let report = sim(dir.path(), "push", &[]);
    assert_eq!(report["agents"], 8);
    let all = figure(&report, "all serving");
    assert!(all > 0.0 && all >= figure(&report, "serving it max") - 1e-9);
    assert!(figure(&report, "heard of it (fan-out) max") <= all);
    // A new version of video-ranker: most of its bytes are new to each agent.
    assert!(
        figure(&report, "bytes moved per agent") > 50.0,
        "{report:#}"
    );
    assert!(figure(&report, "memory per agent, serving (growth)") > 0.0);
    let serving = &report["series"][1]["points"];
    assert_eq!(serving.as_array().unwrap().last().unwrap()[1], 8.0);
}

#[test]
fn canary_of_a_worse_candidate_is_aborted_and_no_device_stays_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let report = sim(dir.path(), "canary", &["--canary", "50", "--bake", "3"]);
    assert_eq!(figure(&report, "devices left on the candidate"), 0.0);
    let ever = figure(&report, "devices that ever ran the candidate");
    assert!((1.0..8.0).contains(&ever), "{report:#}");
    // The gate aborts once a limit is past, without waiting out the bake.
    assert!(figure(&report, "push to abort") > 0.0);
    assert_eq!(figure(&report, "calls failed"), 0.0);
    let notes = report["notes"].to_string();
    assert!(notes.contains("offloaded share"), "{notes}");
}

#[test]
fn broker_restart_brings_every_agent_back_with_and_without_jitter() {
    let dir = tempfile::tempdir().unwrap();
    let report = sim(dir.path(), "broker-restart", &["--down", "2"]);
    for label in ["with jitter", "without jitter"] {
        assert!(figure(&report, &format!("{label}: all back")) > 0.0);
        assert!(figure(&report, &format!("{label}: connects made")) >= 8.0);
        assert!(figure(&report, &format!("{label}: peak connects")) >= 1.0);
    }
    assert_eq!(report["series"].as_array().unwrap().len(), 2);
}

#[test]
fn coordinator_restart_leaves_local_models_serving() {
    let dir = tempfile::tempdir().unwrap();
    let report = sim(dir.path(), "coordinator-restart", &["--down", "2"]);
    for label in ["with jitter", "without jitter"] {
        let made = figure(&report, &format!("{label}: local calls made"));
        assert!(made >= 1.0);
        assert_eq!(
            figure(
                &report,
                &format!("{label}: local calls answered while it was down")
            ),
            made
        );
        assert!(figure(&report, &format!("{label}: all back")) > 0.0);
    }
}

#[test]
fn churn_ends_with_every_running_agent_on_the_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let report = sim(dir.path(), "churn", &["--churn", "4"]);
    assert_eq!(figure(&report, "agents running at the end"), 8.0);
    assert!(figure(&report, "joins") >= 1.0);
    assert!(figure(&report, "leaves") >= 1.0);
    let serving = report["series"][1]["points"].as_array().unwrap();
    assert_eq!(serving.last().unwrap()[1], 8.0);
}
