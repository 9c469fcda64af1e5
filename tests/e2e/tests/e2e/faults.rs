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

/// How the coordinator goes away in [`an_install_converges_after`].
#[derive(Debug, Clone, Copy)]
enum Away {
    /// Killed, then started again: its port answers "unreachable" meanwhile.
    Killed,
    /// Stopped (`SIGSTOP`), then continued: a black hole meanwhile, as a dropped link is;
    /// nothing answers and nothing refuses, so only deadlines and idle timeouts notice. Away
    /// for 8 s, past the agent's 6 s QUIC idle timeout.
    Frozen,
}

impl Away {
    fn lasts(self) -> Duration {
        match self {
            Away::Killed => Duration::from_secs(3),
            Away::Frozen => Duration::from_secs(8),
        }
    }
}

/// The coordinator goes `away` (for [`Away::lasts`]) while an agent installs a new version (the agent holds
/// its fetch for 2 s, a `sleep` crash point, so the fault lands mid-install): the agent keeps
/// serving the old version, retries with back-off, and converges once the coordinator is back,
/// with no new push. Returns the seconds from its return to the new version serving (and
/// prints it: the figure goes in the notes).
#[allow(clippy::print_stderr)]
fn an_install_converges_after(away: Away) -> f64 {
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
    let signal = |name: &str, pid: u32| {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    };
    let pid = coordinator.id();
    let mut frozen = None;
    match away {
        Away::Killed => drop(coordinator),
        Away::Frozen => {
            signal("STOP", pid);
            frozen = Some(coordinator);
        }
    }
    // Away: the held fetch fails, and so does at least one retry.
    let gone = Instant::now();
    while gone.elapsed() < away.lasts() {
        let (code, _) = http(api, Method::GET, "/v2/models/video-ranker/ready", "");
        assert_eq!(code, 200, "the old version stopped serving");
        assert_eq!(active_version(api), Some(1));
        std::thread::sleep(Duration::from_millis(100));
    }
    let _back = match frozen {
        None => {
            let mut coordinator = Process::start("cloud-coordinator", &serve);
            coordinator.wait_for("admin API:");
            coordinator
        }
        Some(coordinator) => {
            signal("CONT", pid);
            coordinator
        }
    };
    let back = Instant::now();
    let deadline = back + Duration::from_secs(90);
    while active_version(api) != Some(2) {
        assert!(
            Instant::now() < deadline,
            "no version 2 90 s after the coordinator returned ({away:?}); the agent printed:\n{}",
            agent.printed().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = back.elapsed().as_secs_f64();
    eprintln!("{away:?}: converged {took:.2} s after the coordinator returned");
    took
}

#[test]
fn an_install_converges_once_a_killed_coordinator_returns() {
    an_install_converges_after(Away::Killed);
}

#[test]
fn an_install_converges_once_a_frozen_coordinator_thaws() {
    an_install_converges_after(Away::Frozen);
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

/// `video-ranker`'s entry in the agent's status.
fn ranker_status(api: u16) -> Option<serde_json::Value> {
    agent_status(api)?["models"]
        .as_array()?
        .iter()
        .find(|m| m["model"] == "video-ranker")
        .cloned()
}

/// The agent's data folder on a 32 MB tmpfs of its own, filled for real after version 1
/// installs: version 2's install says the disk is full in the status (pending, with the reason
/// and the next try), writes nothing (no temporary file is left, the database still works), and
/// version 1 keeps answering; once space is freed, version 2 installs with no new push.
#[test]
fn a_full_disk_is_reported_and_the_old_version_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = provision(dir.path(), "full", 1);
    let config = fleet.coordinator_toml.to_str().unwrap();
    let mut coordinator = Process::start("cloud-coordinator", &["serve", "--config", config]);
    coordinator.wait_for("admin API:");
    let data = dir.path().join("agent");
    let (api, agent_toml) = fleet.first_agent(&data);
    outpost_test_support::fleet::append(&agent_toml, "\n[sync]\ninstall_retry_max_s = 1\n");
    let mut agent = Process::start_on_tmpfs(
        "edge-agent",
        &data,
        32 << 20,
        &["run", "--config", agent_toml.to_str().unwrap()],
    );
    agent.wait_for("serving on http://");
    let models = dir.path().join("models");
    push_ranker(config, &models, 1, 1);
    eventually_blocking("version 1", || active_version(api) == Some(1));

    // Fill the agent's disk (its tmpfs, seen through its root) until a write fails.
    let inside = std::path::PathBuf::from(format!("/proc/{}/root", agent.id()))
        .join(data.strip_prefix("/").unwrap());
    let filler = inside.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![7u8; 1 << 20];
    let full = (0..64)
        .find_map(|_| file.write_all(&block).err())
        .expect("32 MB of tmpfs took 64 MB");
    assert_eq!(full.kind(), std::io::ErrorKind::StorageFull, "{full}");
    drop(file);

    push_ranker(config, &models, 2, 2);
    let body = serde_json::json!({ "inputs": [
        { "name": "user_features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5f32; 32] },
        { "name": "item_ids", "shape": [1], "datatype": "INT64", "data": [3] }
    ]})
    .to_string();
    let mut reported = None;
    eventually_blocking("the full disk in the status", || {
        reported = ranker_status(api).filter(|m| {
            m["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("the disk is full"))
        });
        reported.is_some()
    });
    let reported = reported.unwrap();
    assert_eq!(reported["active"], 1, "{reported}");
    assert_eq!(reported["pending"], 2, "{reported}");
    assert!(reported["retry_in_ms"].as_u64().is_some(), "{reported}");
    assert_eq!(agent_status(api).unwrap()["health"], "degraded");
    // Version 1 answers through several tries, and nothing half-written is left.
    let tried = Instant::now();
    while tried.elapsed() < Duration::from_secs(3) {
        let (code, reply) = http(api, Method::POST, "/v2/models/video-ranker/infer", &body);
        assert_eq!(code, 200, "{reply}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(active_version(api), Some(1));
    let partial: Vec<_> = std::fs::read_dir(inside.join("chunks"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
        .collect();
    assert!(partial.is_empty(), "temporary files left: {partial:?}");

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while active_version(api) != Some(2) {
        assert!(
            Instant::now() < deadline,
            "no version 2 30 s after space was freed; the agent printed:\n{}",
            agent.printed().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let installed = ranker_status(api).unwrap();
    assert!(installed["last_error"].is_null(), "{installed}");
    assert_eq!(agent_status(api).unwrap()["health"], "ready");
}

/// The peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Sends `head` then `body` (written from a thread, so an answer that comes before the body is
/// all read is still read) on a new connection, and reads the answer until the agent closes:
/// its status and text.
fn raw_call(
    port: u16,
    head: String,
    body: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> (u16, String) {
    use std::io::Read as _;
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        if writer.write_all(head.as_bytes()).is_err() {
            return;
        }
        for part in body {
            if writer.write_all(&part).is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = (&stream).read_to_end(&mut answer);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Hostile bodies against the agent process: oversized (declared, and streamed chunked past the
/// 64 MiB limit), a shape claiming 10^10 elements, nesting a million deep, truncated, wrong
/// counts and types, and binary bodies whose lengths lie. Each gets its 4xx naming the
/// problem, the agent's peak memory grows by no more than the 64 MiB body limit and a quarter,
/// and a real call answers afterwards.
#[test]
fn hostile_bodies_get_a_4xx_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = provision(dir.path(), "hostile", 1);
    let config = fleet.coordinator_toml.to_str().unwrap();
    let mut coordinator = Process::start("cloud-coordinator", &["serve", "--config", config]);
    coordinator.wait_for("admin API:");
    let (api, agent_toml) = fleet.first_agent(&dir.path().join("agent"));
    let mut agent = Process::start(
        "edge-agent",
        &["run", "--config", agent_toml.to_str().unwrap()],
    );
    agent.wait_for("serving on http://");
    push_ranker(config, &dir.path().join("models"), 0, 1);
    eventually_blocking("version 1", || active_version(api) == Some(1));
    let path = "/v2/models/video-ranker/infer";
    let good = serde_json::json!({ "inputs": [
        { "name": "user_features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.5f32; 32] },
        { "name": "item_ids", "shape": [1], "datatype": "INT64", "data": [3] }
    ]})
    .to_string();
    assert_eq!(http(api, Method::POST, path, &good).0, 200);
    let before = peak_memory(agent.id());

    let ids = r#"{ "name": "item_ids", "shape": [1], "datatype": "INT64", "data": [3] }"#;
    let features = |shape: &str, data: &str| {
        format!(
            r#"{{ "inputs": [{{ "name": "user_features", "shape": {shape}, "datatype": "FP32", "data": {data} }}, {ids}] }}"#
        )
    };
    let deep = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
    let json_cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "10^10 elements claimed",
            features("[312500000, 32]", "[0.5]"),
            413,
            "max_elements",
        ),
        (
            "nested a million deep",
            features("[1, 32]", &deep),
            400,
            "user_features",
        ),
        (
            "truncated",
            good[..good.len() / 2].to_owned(),
            400,
            "malformed",
        ),
        (
            "too few elements",
            features("[1, 32]", "[0.5, 0.5]"),
            400,
            "needs 32 elements",
        ),
        (
            "a string for a float",
            features("[1, 32]", r#"["x"]"#),
            400,
            "user_features",
        ),
        (
            "a negative dimension",
            features("[-1, 32]", "[0.5]"),
            400,
            "shape",
        ),
    ];
    for (what, body, status, names) in json_cases {
        let (code, reply) = http(api, Method::POST, path, &body);
        assert_eq!(code, status, "{what}: {reply}");
        assert!(reply.contains(names), "{what}: {reply}");
    }

    // Binary bodies whose declared lengths lie.
    let binary = |header: &str, header_length: usize, tail: &[u8]| {
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(tail);
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{api}\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: {header_length}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        raw_call(api, head, std::iter::once(body))
    };
    let declared = |size: u64| {
        format!(
            r#"{{ "inputs": [{{ "name": "user_features", "shape": [1, 32], "datatype": "FP32", "parameters": {{ "binary_data_size": {size} }} }}, {ids}] }}"#
        )
    };
    let header = declared(128);
    let binary_cases: Vec<(&str, (u16, String), &str)> = vec![
        (
            "a header longer than the body",
            binary(&header, header.len() + 1_000_000, &[0; 128]),
            "Inference-Header-Content-Length",
        ),
        (
            "fewer bytes than declared",
            binary(&header, header.len(), &[0; 64]),
            "binary_data_size",
        ),
        (
            "10^12 bytes declared",
            binary(&declared(1 << 40), declared(1 << 40).len(), &[0; 128]),
            "binary_data_size",
        ),
    ];
    for (what, (code, reply), names) in binary_cases {
        assert_eq!(code, 400, "{what}: {reply}");
        assert!(reply.contains(names), "{what}: {reply}");
    }

    // Declared larger than the limit: refused before any of it is read.
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{api}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        1u64 << 40
    );
    let (code, reply) = raw_call(api, head, std::iter::empty());
    assert_eq!(code, 413, "{reply}");
    assert!(reply.contains("64 MiB"), "{reply}");
    // Streamed without a length, 80 MiB of it: cut at the limit.
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{api}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let piece = {
        let data = vec![b' '; 1 << 20];
        let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
        chunk.extend_from_slice(&data);
        chunk.extend_from_slice(b"\r\n");
        chunk
    };
    let (code, reply) = raw_call(api, head, std::iter::repeat_n(piece, 80));
    assert_eq!(code, 413, "{reply}");

    let grown = peak_memory(agent.id()).saturating_sub(before);
    eprintln!(
        "peak memory before {:.1} MiB, grown by {:.1} MiB",
        before as f64 / f64::from(1 << 20),
        grown as f64 / f64::from(1 << 20)
    );
    assert!(
        grown < (edge_agent::MAX_BODY as u64) * 5 / 4,
        "the agent's peak memory grew by {grown} bytes"
    );
    assert_eq!(http(api, Method::POST, path, &good).0, 200);
}

/// A coordinator that hangs, as one stuck in a deadlock would (see [`fake_coordinator`]): it
/// answers nothing (a hello excepted, when `answers_hello`: then it looks alive). Its address
/// and the count of requests it swallowed.
fn hung_coordinator(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    answers_hello: bool,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let answer: crate::fakes::Answer = Arc::new(move |request| match request {
        outpost_shared::Request::Hello { .. } if answers_hello => Some(vec![crate::fakes::hello()]),
        _ => None,
    });
    crate::fakes::fake_coordinator(runtime.handle(), dir, answer)
}

/// A fleet whose first coordinator is a [`hung_coordinator`] (answering hellos when
/// `answers_hello`) and whose second is the real one, an agent listing them in that order (with
/// `[coordinator] request_timeout_s` when given), and a push: fails the test unless the agent
/// serves the new version within 60 s, having tried the hung one. The agent, to read its log.
fn serves_past_a_hung_first_coordinator(
    fleet_name: &str,
    answers_hello: bool,
    request_timeout_s: Option<u32>,
) -> (Process, SocketAddr) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fleet = provision(dir.path(), fleet_name, 1);
    let (hung, swallowed) = hung_coordinator(&runtime, &fleet.dir, answers_hello);
    let config = fleet.coordinator_toml.to_str().unwrap();
    let mut coordinator = Process::start("cloud-coordinator", &["serve", "--config", config]);
    coordinator.wait_for("admin API:");
    let device_toml = fleet
        .dir
        .join(format!("devices/{fleet_name}-0001/agent.toml"));
    let text = std::fs::read_to_string(&device_toml).unwrap();
    let timeout = request_timeout_s.map_or(String::new(), |s| format!("request_timeout_s = {s}\n"));
    let text = text.replacen(
        "addresses = [",
        &format!("{timeout}addresses = [\"{hung}\", "),
        1,
    );
    std::fs::write(&device_toml, text).unwrap();
    let (api, agent_toml) = fleet.first_agent(&dir.path().join("agent"));
    let mut agent = Process::start(
        "edge-agent",
        &["run", "--config", agent_toml.to_str().unwrap()],
    );
    agent.wait_for("serving on http://");
    let pushed = Instant::now();
    push_ranker(config, &dir.path().join("models"), 1, 1);
    let deadline = pushed + Duration::from_secs(60);
    while active_version(api) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "no version 1 60 s after the push; the agent printed:\n{}",
            agent.printed().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "served {:.1} s after the push",
            pushed.elapsed().as_secs_f64()
        );
    }
    assert!(
        swallowed.load(Ordering::SeqCst) >= 1,
        "the agent never waited on the hung coordinator"
    );
    drop(coordinator);
    (agent, hung)
}

/// The agent's first coordinator hangs (handshake done, no answer on any stream): the agent's
/// hello passes its deadline, it moves on to the next coordinator in its list, installs what is
/// pushed there, and serves.
#[test]
fn a_hung_coordinator_is_passed_over_at_the_request_deadline() {
    let (mut agent, hung) = serves_past_a_hung_first_coordinator("hung", false, None);
    let connected = agent.wait_for("connected to coordinator");
    assert!(!connected.contains(&hung.to_string()), "{connected}");
}

/// The agent's first coordinator answers hellos, so it looks alive, but lets every other
/// request stall: the chunk request passes its deadline (4 s, from `request_timeout_s = 1`),
/// the agent tries the next coordinator first, installs from it, and serves.
#[test]
fn a_coordinator_that_stalls_chunk_requests_is_left_for_the_next() {
    let (mut agent, _) = serves_past_a_hung_first_coordinator("stall", true, Some(1));
    agent.wait_for("passed its deadline; trying the next coordinator first");
}
