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
