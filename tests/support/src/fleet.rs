//! A fleet as an operator makes it, for tests that run the real binaries: `firmware-config
//! provision` output in a temporary folder, the coordinator's and agents' configs completed with
//! free loopback ports, and blocking HTTP calls to them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use outpost_runtime::http::{Method, Request};

use crate::http::blocking;
use crate::ports::{free_tcp_port, free_udp_port};
use crate::process::run;

/// A provisioned fleet: its folder, its coordinator's config and ports.
#[derive(Debug)]
pub struct Provisioned {
    /// `firmware-config provision --out`.
    pub dir: PathBuf,
    /// `coordinator.toml`, with the MQTT and admin listen addresses set.
    pub coordinator_toml: PathBuf,
    /// The coordinator's admin API port.
    pub admin: u16,
}

/// Provisions fleet `name` with `devices` devices into `dir/name`, on free loopback ports.
pub fn provision(dir: &Path, name: &str, devices: u32) -> Provisioned {
    let out = dir.join(name);
    let (quic, mqtt, admin) = (free_udp_port(), free_tcp_port(), free_tcp_port());
    run(
        "firmware-config",
        &[
            "provision",
            "--fleet",
            name,
            "--devices",
            &devices.to_string(),
            "--coordinator",
            &format!("127.0.0.1:{quic}"),
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let coordinator_toml = out.join("coordinator.toml");
    append(
        &coordinator_toml,
        &format!(
            "\n[mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
        ),
    );
    Provisioned {
        dir: out,
        coordinator_toml,
        admin,
    }
}

/// Appends `text` to the file at `path`.
pub fn append(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// A request to a loopback port (JSON body); the status and body, status 0 when no answer came.
pub fn http(port: u16, method: Method, path: &str, body: &str) -> (u16, String) {
    let request = Request::new(method, path)
        .header("Content-Type", "application/json")
        .body(body.to_owned());
    blocking(port, request)
}

/// The device folder's agent config, with its API port and data folder set.
pub fn agent_config(device_dir: &Path, api: u16, data: &Path) -> PathBuf {
    let config = device_dir.join("agent.toml");
    append(
        &config,
        &format!(
            "\n[api]\nlisten = \"127.0.0.1:{api}\"\n\n[storage]\ndata_dir = {:?}\n",
            data.display().to_string()
        ),
    );
    config
}

impl Provisioned {
    /// The config of the fleet's first device (`{name}-0001`), with its API on a free loopback
    /// port (returned) and its data in `data`.
    pub fn first_agent(&self, data: &Path) -> (u16, PathBuf) {
        let name = self.dir.file_name().unwrap().to_string_lossy().into_owned();
        let api = free_tcp_port();
        let config = agent_config(&self.dir.join(format!("devices/{name}-0001")), api, data);
        (api, config)
    }
}

/// `GET /v1/status` of the agent on `port`, as JSON; `None` when it does not answer 200.
pub fn agent_status(port: u16) -> Option<serde_json::Value> {
    let (code, body) = http(port, Method::GET, "/v1/status", "");
    (code == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

/// Pushes `video-ranker` with the content of seed `DEFAULT_SEED + seed` (written to
/// `models/{seed}/`) through the operator's CLI and checks that it published `version`.
pub fn push_ranker(config: &str, models: &Path, seed: u64, version: u64) {
    let file = model_zoo::DemoModel::VideoRanker
        .write(
            model_zoo::DEFAULT_SEED + seed,
            &models.join(seed.to_string()),
        )
        .unwrap();
    let out = run(
        "cloud-coordinator",
        &[
            "push",
            file.to_str().unwrap(),
            "--name",
            "video-ranker",
            "--config",
            config,
        ],
    );
    assert!(
        out.contains(&format!("published video-ranker version {version}")),
        "{out}"
    );
}
