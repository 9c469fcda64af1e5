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
use outpost_test_support::fleet::{agent_status, http, provision, push_ranker};
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
    let (api, agent_toml) = fleet.first_agent(&dir.path().join("agent"));
    let mut agent = Process::start_with_open_files(
        "edge-agent",
        1024,
        &["run", "--config", agent_toml.to_str().unwrap()],
    );
    agent.wait_for("serving on http://");
    for pid in [coordinator.id(), agent.id()] {
        assert_eq!(open_file_limit(pid), Some(1024), "prlimit did not apply");
    }
    push_ranker(config, &dir.path().join("models"), 0, 1);
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

/// `video-ranker`'s active version in the agent's status, if it serves one.
fn active_version(api: u16) -> Option<u64> {
    agent_status(api)?["models"]
        .as_array()?
        .iter()
        .find(|m| m["model"] == "video-ranker")?["active"]
        .as_u64()
}

/// The agent killed at each of its crash points in turn (the `failpoints` feature: the agent
/// aborts there, as `kill -9` would), each time during the install of a new version: after the
/// restart it serves at once (the old version or the new, never nothing) and then converges on
/// the new one with no further push.
#[test]
fn an_agent_killed_anywhere_in_an_install_serves_at_once_and_converges() {
    use std::os::unix::process::ExitStatusExt as _;

    let dir = tempfile::tempdir().unwrap();
    let fleet = provision(dir.path(), "crash", 1);
    let config = fleet.coordinator_toml.to_str().unwrap();
    let mut coordinator = Process::start("cloud-coordinator", &["serve", "--config", config]);
    coordinator.wait_for("admin API:");
    let (api, agent_toml) = fleet.first_agent(&dir.path().join("agent"));
    let agent_args = ["run", "--config", agent_toml.to_str().unwrap()];
    let models = dir.path().join("models");
    let converged = |version: u64, what: &str| {
        eventually_blocking(what, || active_version(api) == Some(version));
    };
    // Version 1, installed normally.
    {
        let mut agent = Process::start("edge-agent", &agent_args);
        agent.wait_for("serving on http://");
        push_ranker(config, &models, 1, 1);
        converged(1, "version 1");
    }
    for (n, point) in edge_agent::CRASH_POINTS.iter().enumerate() {
        let version = n as u64 + 2;
        let failpoints = format!("{point}=return");
        let mut agent =
            Process::start_with_env("edge-agent", &agent_args, &[("FAILPOINTS", &failpoints)]);
        push_ranker(config, &models, version, version);
        let status = agent
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("the agent never reached crash point {point}"));
        assert_eq!(status.signal(), Some(6), "{point}: {status:?}");
        drop(agent);

        let mut agent = Process::start("edge-agent", &agent_args);
        agent.wait_for("serving on http://");
        // Serving from the first moment: the old version or the new one.
        let (code, body) = http(api, Method::GET, "/v2/models/video-ranker/ready", "");
        assert_eq!(code, 200, "after a crash at {point}: {body}");
        let serving = active_version(api).unwrap();
        assert!(
            serving == version || serving == version - 1,
            "after a crash at {point}: version {serving}"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while active_version(api) != Some(version) {
            assert!(
                Instant::now() < deadline,
                "no version {version} 60 s after a crash at {point}; the agent printed:\n{}",
                agent.printed().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The coordinator process killed while an agent installs a new version (the agent holds its
/// fetch for 2 s, a `sleep` crash point, so the kill lands mid-install): the agent keeps serving
/// the old version, retries with back-off, and converges once the coordinator is back, with no
/// new push.
#[test]
fn an_install_converges_once_a_killed_coordinator_returns() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = provision(dir.path(), "away", 1);
    let config = fleet.coordinator_toml.to_str().unwrap();
    let serve = ["serve", "--config", config];
    let mut coordinator = Process::start("cloud-coordinator", &serve);
    coordinator.wait_for("admin API:");
    let (api, agent_toml) = fleet.first_agent(&dir.path().join("agent"));
    let mut agent = Process::start_with_env(
        "edge-agent",
        &["run", "--config", agent_toml.to_str().unwrap()],
        // The first fetch of the run waits 2 s (version 1's fetch is the first: it waits too).
        &[("FAILPOINTS", "installer.fetch_requesting=2*sleep(2000)")],
    );
    agent.wait_for("serving on http://");
    let models = dir.path().join("models");
    push_ranker(config, &models, 1, 1);
    eventually_blocking("version 1", || active_version(api) == Some(1));

    push_ranker(config, &models, 2, 2);
    agent.wait_for("fetching");
    drop(coordinator);
    // Away for 3 s: the held fetch fails, and so does at least one retry.
    let away = Instant::now();
    while away.elapsed() < Duration::from_secs(3) {
        let (code, _) = http(api, Method::GET, "/v2/models/video-ranker/ready", "");
        assert_eq!(code, 200, "the old version stopped serving");
        assert_eq!(active_version(api), Some(1));
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut coordinator = Process::start("cloud-coordinator", &serve);
    coordinator.wait_for("admin API:");
    let back = Instant::now();
    let deadline = back + Duration::from_secs(90);
    while active_version(api) != Some(2) {
        assert!(
            Instant::now() < deadline,
            "no version 2 90 s after the coordinator returned; the agent printed:\n{}",
            agent.printed().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "converged {:.2} s after the coordinator returned",
        back.elapsed().as_secs_f64()
    );
}

/// `video-ranker`'s stable version as the coordinator's CLI reports it.
fn stable_version(config: &str) -> u64 {
    let models: serde_json::Value =
        serde_json::from_str(&run("cloud-coordinator", &["models", "--config", config])).unwrap();
    models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "video-ranker")
        .and_then(|m| m["stable"].as_u64())
        .unwrap()
}

/// The coordinator killed at each of its crash points during a push (chunks stored, record
/// committed, flushed, garbage collection, around the announcement): after the restart it
/// serves, and whatever release it announces installs on a running agent, so no release was
/// announced whose chunks were not all stored. Past `keep_versions` (5) pushes, the collection
/// deletes chunks, so its crash points are met with something to delete.
#[test]
fn a_coordinator_killed_anywhere_in_a_push_announces_only_what_it_stored() {
    use std::os::unix::process::ExitStatusExt as _;

    let dir = tempfile::tempdir().unwrap();
    let fleet = provision(dir.path(), "push", 1);
    let config = fleet.coordinator_toml.to_str().unwrap();
    let serve = ["serve", "--config", config];
    let models = dir.path().join("models");
    let mut coordinator = Process::start("cloud-coordinator", &serve);
    coordinator.wait_for("admin API:");
    let (api, agent_toml) = fleet.first_agent(&dir.path().join("agent"));
    let _agent = Process::start(
        "edge-agent",
        &["run", "--config", agent_toml.to_str().unwrap()],
    );
    // Six versions first, so the collection has chunks to delete from here on.
    for version in 1..=6 {
        push_ranker(config, &models, version, version);
    }
    eventually_blocking("version 6", || active_version(api) == Some(6));
    drop(coordinator);
    let mut last = 6;

    for (n, point) in cloud_coordinator::CRASH_POINTS.iter().enumerate() {
        let failpoints = format!("{point}=return");
        let mut dying =
            Process::start_with_env("cloud-coordinator", &serve, &[("FAILPOINTS", &failpoints)]);
        dying.wait_for("admin API:");
        // The push dies with the coordinator: its answer is not awaited.
        let file = model_zoo::DemoModel::VideoRanker
            .write(
                model_zoo::DEFAULT_SEED + 100 + n as u64,
                &models.join(point),
            )
            .unwrap();
        let _ =
            std::process::Command::new(outpost_test_support::process::binary("cloud-coordinator"))
                .args([
                    "push",
                    file.to_str().unwrap(),
                    "--name",
                    "video-ranker",
                    "--config",
                    config,
                ])
                .output();
        let status = dying
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("the coordinator never reached crash point {point}"));
        assert_eq!(status.signal(), Some(6), "{point}: {status:?}");
        drop(dying);

        let mut coordinator = Process::start("cloud-coordinator", &serve);
        coordinator.wait_for("admin API:");
        // Whatever it now calls stable, it has every chunk of: the agent installs it. A crash
        // before the record was written loses the push; one after the flush keeps it.
        let stable = stable_version(config);
        match *point {
            "registry.chunks_stored" => assert_eq!(stable, last, "{point}"),
            "registry.record_committed" => assert!((last..=last + 1).contains(&stable)),
            _ => assert_eq!(stable, last + 1, "{point}: the flushed push was lost"),
        }
        last = stable;
        let deadline = Instant::now() + Duration::from_secs(60);
        while active_version(api) != Some(stable) {
            assert!(
                Instant::now() < deadline,
                "after a crash at {point} the agent never installed version {stable}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(coordinator);
    }
}
