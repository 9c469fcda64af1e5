//! `outpost bench` runs end to end (few calls, few agents) and reports every figure.

use outpost::bench::{self, BenchOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_every_figure() {
    let mut lines = Vec::new();
    bench::run(
        &BenchOptions {
            calls: 5,
            agents: vec![1, 3],
            gpu_only: false,
            api_only: false,
        },
        |l| lines.push(l.to_owned()),
    )
    .await
    .unwrap();
    let text = lines.join("\n");
    for needle in [
        "agent idle, no model: +",
        "  1 candidates  in-process engine",
        "  1 candidates  in-process, symbolic",
        "256 candidates  API, JSON",
        "256 candidates  API, binary tensors",
        "push to serving,   1 agents",
        "push to serving,   3 agents",
        "GPU adapter: ",
        "GPU vs tract, video-ranker int8",
        "   1 candidates  wgpu, int8 unpacked",
        "1024 candidates  wgpu, int8 unpacked",
        "1024 candidates  tract (CPU, 1 thread)",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

/// 64 clients call an agent while its model switches version ten times: not one call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_fails_while_a_model_switches_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = outpost_test_support::coordinator::start_coordinator(dir.path()).await;
    let mut config = outpost_test_support::agent::agent_config(&coordinator, dir.path());
    // Room for every client in the admission queue: a 503 here would be by design, not a
    // switch's fault.
    config.profile.inference_queue = Some(64);
    let agent = edge_agent::Agent::start(config).await.unwrap();
    let mut report = outpost::switching::run(
        &coordinator,
        &agent,
        64,
        std::time::Duration::from_secs(2),
        10,
    )
    .await
    .unwrap();
    assert_eq!(report.final_version, 11);
    for (label, phase) in [
        ("steady", &mut report.steady),
        ("switching", &mut report.switching),
    ] {
        assert!(phase.ok > 64, "{label}: only {} calls answered", phase.ok);
        assert_eq!(
            phase.errors, 0,
            "{label}: {} calls failed, the first: {:?}",
            phase.errors, phase.first_error
        );
        eprintln!("{}", phase.line(label));
    }
    agent.shutdown().await;
    coordinator.shutdown().await;
}
