//! The three binaries as separate processes, from `firmware-config provision` output: the
//! coordinator serves the provisioned fleet, an agent syncs and serves what `cloud-coordinator
//! push` published; an agent that does not trust the coordinator's certificate, and a device whose
//! certificate the fleet did not issue, get nothing.
//!
//! `cargo test --workspace` builds the binaries in the target folder this test runs from
//! (`outpost_test_support::process::binary` finds them); the test fails, naming the command,
//! when they are missing.

use outpost_runtime::http::Method;
use outpost_test_support::eventually::eventually_blocking;
use outpost_test_support::fleet::{agent_config, agent_status, append, http, push_ranker};
use outpost_test_support::ports::{free_tcp_port, free_udp_port};
use outpost_test_support::process::{Process, run};

fn status(api: u16) -> serde_json::Value {
    agent_status(api).expect("the agent's /v1/status did not answer 200")
}

fn model_error(api: u16, model: &str) -> Option<String> {
    status(api)["models"]
        .as_array()?
        .iter()
        .find(|m| m["model"] == model)?["last_error"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn provisioned_binaries_sync_serve_and_refuse_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let (quic, mqtt, admin) = (free_udp_port(), free_tcp_port(), free_tcp_port());
    run(
        "firmware-config",
        &[
            "provision",
            "--fleet",
            "e2e",
            "--devices",
            "3",
            "--coordinator",
            &format!("127.0.0.1:{quic}"),
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
            "--out",
            fleet.to_str().unwrap(),
        ],
    );
    let coordinator_toml = fleet.join("coordinator.toml");
    append(
        &coordinator_toml,
        &format!(
            "\n[mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
        ),
    );
    // Another fleet: its CA and device identities are strangers to ours.
    let other = dir.path().join("other");
    run(
        "firmware-config",
        &[
            "provision",
            "--fleet",
            "other",
            "--coordinator",
            "127.0.0.1:9",
            "--out",
            other.to_str().unwrap(),
        ],
    );

    let config = coordinator_toml.to_str().unwrap();
    // The default log, as an operator runs it: the embedded broker's per-connection INFO lines
    // must stay out of it.
    let mut coordinator =
        Process::start_with_default_log("cloud-coordinator", &["serve", "--config", config]);
    coordinator.wait_for("admin API:");

    // A device of the fleet, as provisioned.
    let api = free_tcp_port();
    let good = agent_config(
        &fleet.join("devices/e2e-0001"),
        api,
        &dir.path().join("agent-1"),
    );
    let mut agent = Process::start("edge-agent", &["run", "--config", good.to_str().unwrap()]);
    agent.wait_for("serving on http://");

    // Device 2 trusts another CA: it verifies releases (same fleet key) but cannot trust the
    // coordinator's certificate, so it refuses to connect and never gets the model.
    let device_2 = fleet.join("devices/e2e-0002");
    std::fs::copy(other.join("ca.crt"), device_2.join("ca.crt")).unwrap();
    let wrong_ca_api = free_tcp_port();
    let wrong_ca = agent_config(&device_2, wrong_ca_api, &dir.path().join("agent-2"));
    let mut wrong_ca_agent = Process::start(
        "edge-agent",
        &["run", "--config", wrong_ca.to_str().unwrap()],
    );
    wrong_ca_agent.wait_for("serving on http://");

    // Device 3 holds a key and certificate our CA never issued (the other fleet's device,
    // renamed to its id): the coordinator refuses it.
    let device_3 = fleet.join("devices/e2e-0003");
    let stranger = other.join("devices/other-0001");
    for file in ["device.crt", "device.key"] {
        std::fs::copy(stranger.join(file), device_3.join(file)).unwrap();
    }
    let text = std::fs::read_to_string(device_3.join("agent.toml")).unwrap();
    std::fs::write(
        device_3.join("agent.toml"),
        text.replace("id = \"e2e-0003\"", "id = \"other-0001\""),
    )
    .unwrap();
    let stranger_api = free_tcp_port();
    let stranger_config = agent_config(&device_3, stranger_api, &dir.path().join("agent-3"));
    let mut stranger_agent = Process::start(
        "edge-agent",
        &["run", "--config", stranger_config.to_str().unwrap()],
    );
    stranger_agent.wait_for("serving on http://");

    // Push with the CLI, as an operator would.
    push_ranker(config, &dir.path().join("models"), 0, 1);

    // The fleet's device syncs and answers.
    eventually_blocking("the agent to serve video-ranker", || {
        http(api, Method::GET, "/v2/models/video-ranker/ready", "").0 == 200
    });
    let body = serde_json::json!({ "inputs": [
        { "name": "user_features", "shape": [2, 32], "datatype": "FP32", "data": vec![0.1f32; 64] },
        { "name": "item_ids", "shape": [2], "datatype": "INT64", "data": [1, 2] }
    ]})
    .to_string();
    let (code, reply) = http(api, Method::POST, "/v2/models/video-ranker/infer", &body);
    assert_eq!(code, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["outputs"][0]["shape"], serde_json::json!([2, 1]));
    // An agent that found no GPU worth using (here: only Mesa's software adapters) asked a
    // child process, so no driver is mapped into it.
    let model = status(api)["models"][0].clone();
    let fallback = model["gpu_fallback"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if model["engine"] == "tract" && fallback.contains("no usable GPU adapter") {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", agent.id())).unwrap();
        let drivers: Vec<&str> = maps
            .lines()
            .filter(|l| {
                ["libvulkan", "libEGL", "libGLX", "libLLVM"]
                    .iter()
                    .any(|d| l.contains(d))
            })
            .collect();
        assert!(drivers.is_empty(), "{fallback}; mapped: {drivers:#?}");
    }

    // The strangers get nothing at all: not even the release, since the broker and they cannot
    // trust each other. Each says why in its status, and the coordinator counted the refusals.
    eventually_blocking("the wrong-CA agent to report its broker failure", || {
        status(wrong_ca_api)["broker_error"].is_string()
    });
    let why = status(wrong_ca_api)["broker_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        why.contains("MQTT broker") && why.contains("certificate"),
        "{why}"
    );
    eventually_blocking("the stranger to report its broker failure", || {
        status(stranger_api)["broker_error"].is_string()
    });
    for port in [wrong_ca_api, stranger_api] {
        assert_eq!(status(port)["health"], "degraded");
        assert!(model_error(port, "video-ranker").is_none());
        assert_ne!(
            http(port, Method::GET, "/v2/models/video-ranker/ready", "").0,
            200
        );
    }
    let (code, metrics) = http(admin, Method::GET, "/metrics", "");
    assert_eq!(code, 200, "{metrics}");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outpost_mqtt_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 2, "{metrics}");
    // The fleet view (from device status over MQTT) shows the device.
    eventually_blocking("the device in the fleet view", || {
        run("cloud-coordinator", &["fleet", "--config", config]).contains("e2e-0001")
    });
    // Three devices connected to the embedded broker, and its INFO lines stayed out of the log.
    let broker_info: Vec<String> = coordinator
        .printed()
        .into_iter()
        .filter(|l| l.contains("INFO") && l.contains("rumqttd"))
        .collect();
    assert!(broker_info.is_empty(), "{broker_info:#?}");
    drop((agent, wrong_ca_agent, stranger_agent, coordinator));
}
