//! Faults done for real to the real binaries: each test provisions a fleet, runs the
//! coordinator and an agent as separate processes, does the damage, and checks that a real call
//! still answers. Every loop is bounded in count and time.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outpost_runtime::http::Method;
use outpost_test_support::eventually::eventually_blocking;
use outpost_test_support::fleet::{agent_config, http, provision};
use outpost_test_support::ports::free_tcp_port;
use outpost_test_support::process::{Process, run};

/// Connections that hold a server's slots and do nothing useful: most send nothing, one in
/// ten is a slowloris, sending a request head one byte every 500 ms. Stopped when dropped.
struct Flood {
    held: usize,
    stop: Arc<AtomicBool>,
    trickle: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn open(port: u16, connections: usize) -> Flood {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut silent = Vec::new();
        let mut slow = Vec::new();
        for i in 0..connections {
            // Past the listen backlog a connect would hang: bounded, and skipped.
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
                continue;
            };
            if i % 10 == 0 {
                let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nx-slow: ");
                slow.push(s);
            } else {
                silent.push(s);
            }
        }
        let held = silent.len() + slow.len();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let trickle = std::thread::spawn(move || {
            let _silent = silent;
            // At most 2 minutes, whatever happens to the test.
            for _ in 0..240 {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                for s in &mut slow {
                    let _ = s.write_all(b"a");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Flood {
            held,
            stop,
            trickle: Some(trickle),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.trickle.take() {
            let _ = t.join();
        }
    }
}

/// The open descriptors of process `pid`.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The soft limit on open files of process `pid`, from `/proc/{pid}/limits`.
fn open_file_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[test]
fn floods_and_slowloris_leave_room_for_a_real_call() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = provision(dir.path(), "faults", 1);
    let config = fleet.coordinator_toml.to_str().unwrap();
    let mut coordinator =
        Process::start_with_open_files("cloud-coordinator", 1024, &["serve", "--config", config]);
    coordinator.wait_for("admin API:");
    let api = free_tcp_port();
    let agent_toml = agent_config(
        &fleet.dir.join("devices/faults-0001"),
        api,
        &dir.path().join("agent"),
    );
    let mut agent = Process::start_with_open_files(
        "edge-agent",
        1024,
        &["run", "--config", agent_toml.to_str().unwrap()],
    );
    agent.wait_for("serving on http://");
    for pid in [coordinator.id(), agent.id()] {
        assert_eq!(open_file_limit(pid), Some(1024), "prlimit did not apply");
    }
    let model = model_zoo::DemoModel::VideoRanker
        .write(model_zoo::DEFAULT_SEED, &dir.path().join("models"))
        .unwrap();
    let pushed = run(
        "cloud-coordinator",
        &[
            "push",
            model.to_str().unwrap(),
            "--name",
            "video-ranker",
            "--config",
            config,
        ],
    );
    assert!(
        pushed.contains("published video-ranker version 1"),
        "{pushed}"
    );
    eventually_blocking("the agent to serve video-ranker", || {
        http(api, Method::GET, "/v2/models/video-ranker/ready", "").0 == 200
    });
    let body = serde_json::json!({ "inputs": [
        { "name": "user_features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5f32; 32] },
        { "name": "item_ids", "shape": [1], "datatype": "INT64", "data": [3] }
    ]})
    .to_string();

    // The agent's API: 900 connections (more than its share of 1024 descriptors could hold if
    // each were served), then an inference.
    let flood = Flood::open(api, 900);
    assert!(
        flood.held > 500,
        "only {} flood connections opened",
        flood.held
    );
    let started = Instant::now();
    let (code, reply) = http(api, Method::POST, "/v2/models/video-ranker/infer", &body);
    let waited = started.elapsed();
    assert_eq!(code, 200, "{reply}");
    assert!(
        waited < Duration::from_secs(15),
        "the call waited {waited:?}"
    );
    let files = open_files(agent.id());
    assert!(
        files < 400,
        "the agent holds {files} descriptors under the flood"
    );
    drop(flood);

    // The admin API: the same, then the operator's CLI.
    let flood = Flood::open(fleet.admin, 900);
    assert!(
        flood.held > 500,
        "only {} flood connections opened",
        flood.held
    );
    let started = Instant::now();
    let models = run("cloud-coordinator", &["models", "--config", config]);
    let waited = started.elapsed();
    assert!(models.contains("video-ranker"), "{models}");
    assert!(
        waited < Duration::from_secs(15),
        "the CLI waited {waited:?}"
    );
    let files = open_files(coordinator.id());
    assert!(
        files < 400,
        "the coordinator holds {files} descriptors under the flood"
    );
    drop(flood);
    // Both still serve.
    assert_eq!(
        http(api, Method::POST, "/v2/models/video-ranker/infer", &body).0,
        200
    );
}
