//! Coordinator replicas over one shared store, as separate processes: three on a folder behind
//! Mosquitto, the one the agent uses killed in the middle of a rollout; two on an S3-compatible
//! server (moto, a protocol check of the S3 code path).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outpost_runtime::http::Method;
use outpost_test_support::eventually::eventually_blocking;
use outpost_test_support::fleet::{agent_config, agent_status, http, push_ranker};
use outpost_test_support::ports::{free_tcp_port, free_udp_port};
use outpost_test_support::process::{Process, run};

use crate::brokers::{Kind, start_broker};

/// A coordinator replica's config: the provisioned `coordinator.toml` with its own data folder,
/// QUIC and admin ports, the external broker and the shared store (`shared`: the lines of
/// `[registry.shared]`).
fn replica_config(fleet: &Path, name: &str, quic: u16, mqtt: u16, shared: &str) -> (String, u16) {
    let provisioned = std::fs::read_to_string(fleet.join("coordinator.toml")).unwrap();
    let mut text = String::new();
    let mut in_quic = false;
    for line in provisioned.lines() {
        if line.starts_with('[') {
            in_quic = line == "[quic]";
        }
        let line = match line {
            l if l.starts_with("data_dir") => format!("data_dir = \"data-{name}\""),
            l if in_quic && l.starts_with("listen") => format!("listen = \"127.0.0.1:{quic}\""),
            l => l.to_owned(),
        };
        text.push_str(&line);
        text.push('\n');
    }
    let admin = free_tcp_port();
    text.push_str(&format!(
        "\n[mqtt]\nexternal = \"127.0.0.1:{mqtt}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[registry.shared]\n{shared}\n",
    ));
    let path = fleet.join(format!("coordinator-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    (path.to_str().unwrap().to_owned(), admin)
}

/// A counter of replica `admin`'s `/metrics`.
fn counter(admin: u16, name: &str) -> u64 {
    let (code, metrics) = http(admin, Method::GET, "/metrics", "");
    assert_eq!(code, 200, "{metrics}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

fn active(api: u16, model: &str) -> Option<u64> {
    agent_status(api)?["models"]
        .as_array()?
        .iter()
        .find(|m| m["model"] == model)?["active"]
        .as_u64()
}

/// The model's current release as replica `config` lists it.
fn release_at(config: &str, model: &str) -> Option<u64> {
    let out = run("cloud-coordinator", &["models", "--config", config]);
    let models: serde_json::Value = serde_json::from_str(&out).ok()?;
    models.as_array()?.iter().find(|m| m["name"] == model)?["release"].as_u64()
}

/// Starts the device's agent (its data in `data`) and waits until it serves video-ranker
/// version 1; the process and its API port.
fn start_agent(device: &Path, data: &Path) -> (Process, u16) {
    let api = free_tcp_port();
    let config = agent_config(device, api, data);
    let mut agent = Process::start("edge-agent", &["run", "--config", config.to_str().unwrap()]);
    agent.wait_for("serving on http://");
    eventually_blocking("the agent to serve version 1", || {
        active(api, "video-ranker") == Some(1)
    });
    (agent, api)
}

/// Starts a coordinator process on each config (with `env`), waiting until each serves.
fn start_replicas(configs: &[String], env: &[(&str, &str)]) -> Vec<Option<Process>> {
    configs
        .iter()
        .map(|c| {
            let mut p =
                Process::start_with_env("cloud-coordinator", &["serve", "--config", c], env);
            p.wait_for("admin API:");
            Some(p)
        })
        .collect()
}

fn offload_body() -> String {
    serde_json::json!({ "inputs": [
        { "name": "user_features", "shape": [1, 32], "datatype": "FP32", "data": vec![0.25f32; 32] },
        { "name": "item_ids", "shape": [1], "datatype": "INT64", "data": [3] }
    ]})
    .to_string()
}

fn push_cloud_model(config: &str, models: &Path) {
    let file = model_zoo::DemoModel::VideoRankerXl
        .write(model_zoo::DEFAULT_SEED, &models.join("xl"))
        .unwrap();
    let out = run(
        "cloud-coordinator",
        &[
            "push",
            file.to_str().unwrap(),
            "--name",
            "ranker-xl",
            "--placement",
            "cloud",
            "--config",
            config,
        ],
    );
    assert!(out.contains("published ranker-xl version 1"), "{out}");
}

/// Three replicas on one store folder, agents listing all three and one Mosquitto. A model is
/// pushed to the first; the others take it over. The second starts a rollout of version 2 and
/// the first (the one the agent talks to) is killed at once; the third promotes it. The agent
/// fetches version 2 from a survivor, its offloaded calls are served again by one, and the
/// release numbers stay one sequence across the three.
#[test]
fn three_replicas_on_one_store_lose_the_agents_coordinator_mid_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let quic: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let mqtt = free_tcp_port();
    let mut args = vec![
        "provision".to_owned(),
        "--fleet".into(),
        "rep".into(),
        "--devices".into(),
        "1".into(),
        "--mqtt".into(),
        format!("127.0.0.1:{mqtt}"),
        "--out".into(),
        fleet.to_str().unwrap().into(),
    ];
    for port in &quic {
        args.extend(["--coordinator".into(), format!("127.0.0.1:{port}")]);
    }
    run(
        "firmware-config",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let _broker = start_broker(Kind::Mosquitto, &fleet, mqtt);
    let store = dir.path().join("store");
    let shared = format!("url = \"file://{}\"\npoll_ms = 200", store.display());
    let (configs, admins): (Vec<String>, Vec<u16>) = ["a", "b", "c"]
        .iter()
        .zip(&quic)
        .map(|(name, port)| replica_config(&fleet, name, *port, mqtt, &shared))
        .unzip();
    let mut replicas = start_replicas(&configs, &[]);
    let (a, b, c) = (&configs[0], &configs[1], &configs[2]);

    let models = dir.path().join("models");
    push_ranker(a, &models, 0, 1);
    push_cloud_model(a, &models);
    for config in [b, c] {
        eventually_blocking("the other replicas to take the releases over", || {
            release_at(config, "video-ranker") == Some(1)
                && release_at(config, "ranker-xl") == Some(1)
        });
    }

    let (agent, api) = start_agent(&fleet.join("devices/rep-0001"), &dir.path().join("agent"));
    let body = offload_body();
    let (code, reference) = http(api, Method::POST, "/v2/models/ranker-xl/infer", &body);
    assert_eq!(code, 200, "{reference}");
    let reference: serde_json::Value = serde_json::from_str(&reference).unwrap();

    // Offloaded calls all along: (when it ended, status, outputs).
    let stop = Arc::new(AtomicBool::new(false));
    let caller = {
        let stop = stop.clone();
        let body = body.clone();
        std::thread::spawn(move || {
            let mut calls = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let (code, reply) = http(api, Method::POST, "/v2/models/ranker-xl/infer", &body);
                let outputs = serde_json::from_str::<serde_json::Value>(&reply)
                    .map(|v| v["outputs"].clone())
                    .unwrap_or_default();
                calls.push((Instant::now(), code, outputs));
                std::thread::sleep(Duration::from_millis(20));
            }
            calls
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // B starts a rollout of version 2 to half the devices; A dies at once.
    let file = model_zoo::DemoModel::VideoRanker
        .write(model_zoo::DEFAULT_SEED + 1, &models.join("v2"))
        .unwrap();
    let out = run(
        "cloud-coordinator",
        &[
            "push",
            file.to_str().unwrap(),
            "--name",
            "video-ranker",
            "--rollout",
            "50",
            "--config",
            b,
        ],
    );
    assert!(out.contains("published video-ranker version 2"), "{out}");
    drop(replicas[0].take());
    let killed = Instant::now();
    // C promotes it: C numbers its release after B's.
    eventually_blocking("C to take over B's candidate", || {
        release_at(c, "video-ranker") == Some(2)
    });
    let out = run(
        "cloud-coordinator",
        &["rollout", "video-ranker", "--promote", "--config", c],
    );
    assert!(
        out.contains("video-ranker release 3: version 2 promoted"),
        "{out}"
    );
    eventually_blocking(
        "the agent to serve version 2 from a surviving replica",
        || active(api, "video-ranker") == Some(2),
    );
    eventually_blocking("B to take over C's promotion", || {
        release_at(b, "video-ranker") == Some(3)
    });

    // Offloaded calls: served again after the kill, with the same answer.
    eventually_blocking("an offloaded call served after the kill", || {
        let (code, _) = http(api, Method::POST, "/v2/models/ranker-xl/infer", &body);
        code == 200
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let calls = caller.join().unwrap();
    let after: Vec<_> = calls.iter().filter(|(at, _, _)| *at > killed).collect();
    let failed = after.iter().filter(|(_, code, _)| *code != 200).count();
    let back = after
        .iter()
        .find(|(_, code, _)| *code == 200)
        .map(|(at, _, _)| at.duration_since(killed));
    println!(
        "failover: {} calls before the kill, {} after; {failed} failed; served again {back:?} after the kill",
        calls.len() - after.len(),
        after.len()
    );
    let back = back.expect("no offloaded call was served after the kill");
    assert!(
        back < Duration::from_secs(30),
        "served again only after {back:?}"
    );
    for (_, code, outputs) in &calls {
        if *code == 200 {
            assert_eq!(outputs, &reference["outputs"]);
        }
    }

    // The surviving replicas hold one history; the store holds each release once.
    assert_eq!(release_at(b, "video-ranker"), release_at(c, "video-ranker"));
    let mut stored: Vec<String> = std::fs::read_dir(store.join("releases/video-ranker"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        (1..=3u64).map(|r| format!("{r:020}")).collect::<Vec<_>>()
    );
    // Replicas on one broker never announced over each other's newer release (they would
    // take turns replacing it, flooding every device).
    for admin in &admins[1..] {
        assert_eq!(counter(*admin, "outpost_releases_reasserted_total"), 0);
    }
    drop(agent);
    drop(replicas);
}

/// Two replicas on an S3-compatible store (moto's server, credentials from the environment as
/// in production): a release pushed to one is served by the other to an agent that only knows
/// the other, and pushes to both at once never publish one release number twice.
#[test]
fn two_replicas_share_releases_through_an_s3_store() {
    let s3 = outpost_test_support::s3::S3Server::start("outpost-fleet");
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let (quic_a, quic_b, mqtt) = (free_udp_port(), free_udp_port(), free_tcp_port());
    run(
        "firmware-config",
        &[
            "provision",
            "--fleet",
            "sss",
            "--devices",
            "1",
            "--coordinator",
            &format!("127.0.0.1:{quic_b}"),
            "--coordinator",
            &format!("127.0.0.1:{quic_a}"),
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
            "--out",
            fleet.to_str().unwrap(),
        ],
    );
    let _broker = start_broker(Kind::Mosquitto, &fleet, mqtt);
    let shared = format!(
        "url = \"s3://{}/replicas\"\nendpoint = \"{}\"\npoll_ms = 200",
        s3.bucket,
        s3.endpoint()
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", "outpost-test"),
        ("AWS_SECRET_ACCESS_KEY", "outpost-test-secret"),
    ];
    let configs: Vec<String> = [("a", quic_a), ("b", quic_b)]
        .iter()
        .map(|(name, port)| replica_config(&fleet, name, *port, mqtt, &shared).0)
        .collect();
    let _replicas = start_replicas(&configs, &env);
    let (a, b) = (&configs[0], &configs[1]);
    let models = dir.path().join("models");
    push_ranker(a, &models, 0, 1);
    eventually_blocking("B to take over A's release", || {
        release_at(b, "video-ranker") == Some(1)
    });
    // The agent lists B first: it gets the chunks from B, which had them from the store.
    let (agent, _) = start_agent(&fleet.join("devices/sss-0001"), &dir.path().join("agent"));

    // Pushes to both at once: each release number is published by one of them.
    let pushes: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(i, config)| {
            let file = model_zoo::DemoModel::VideoRanker
                .write(
                    model_zoo::DEFAULT_SEED + 10 + i as u64,
                    &models.join(format!("p{i}")),
                )
                .unwrap();
            std::thread::spawn(move || {
                let out = std::process::Command::new(outpost_test_support::process::binary(
                    "cloud-coordinator",
                ))
                .args([
                    "push",
                    file.to_str().unwrap(),
                    "--name",
                    "video-ranker",
                    "--config",
                    &config,
                ])
                .output()
                .unwrap();
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned()
                        + &String::from_utf8_lossy(&out.stderr),
                )
            })
        })
        .collect();
    let results: Vec<(bool, String)> = pushes.into_iter().map(|p| p.join().unwrap()).collect();
    let mut releases = Vec::new();
    for (ok, out) in &results {
        if *ok {
            let release = out
                .split("release ")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|r| r.parse::<u64>().ok());
            releases.push(release.unwrap_or_else(|| panic!("no release in {out}")));
        } else {
            assert!(
                out.contains("another coordinator published release"),
                "{out}"
            );
        }
    }
    assert!(!releases.is_empty(), "{results:?}");
    releases.sort_unstable();
    releases.dedup();
    assert_eq!(
        releases.len(),
        results.iter().filter(|r| r.0).count(),
        "{results:?}"
    );
    let newest = *releases.last().unwrap();
    for config in [a, b] {
        eventually_blocking("both replicas at the newest release", || {
            release_at(config, "video-ranker") == Some(newest)
        });
    }
    drop(agent);
}
