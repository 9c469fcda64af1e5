//! `outpost up`: a coordinator with its embedded broker, N agents, the demo models pushed, and
//! ready-to-paste curl commands — one process, dev-mode trust (a throwaway fleet made by the same
//! provisioning code as everywhere else; each agent has its own device certificate).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cloud_coordinator::{Coordinator, CoordinatorHandle};
use edge_agent::{Agent, AgentHandle};
use firmware_config::{AgentConfig, CoordinatorConfig, DeviceId, FleetAuthority};
use model_zoo::{DEFAULT_SEED, DemoModel};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What `outpost up` starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many agents.
    pub agents: u16,
    /// The first agent's API port (the others follow).
    pub first_port: u16,
    /// Where everything keeps its data.
    pub data_dir: PathBuf,
    /// The coordinator's QUIC, admin and MQTT addresses.
    pub coordinator: CoordinatorConfig,
}

/// The models the quickstart pushes: (name, query, model, optional cloud model).
fn demo_pushes() -> Vec<(&'static str, &'static str, DemoModel, Option<DemoModel>)> {
    vec![
        (
            "video-ranker",
            "placement=local",
            DemoModel::VideoRanker,
            Some(DemoModel::VideoRankerXl),
        ),
        (
            "video-ranker-xl",
            "placement=cloud",
            DemoModel::VideoRankerXl,
            None,
        ),
        (
            "intent-classifier",
            "placement=cascade%3Aintent_probs%3A0.6",
            DemoModel::IntentClassifier,
            None,
        ),
        (
            "music-two-tower",
            "placement=local",
            DemoModel::MusicTwoTower,
            None,
        ),
    ]
}

/// A running quickstart.
#[derive(Debug)]
pub struct Running {
    /// The coordinator.
    pub coordinator: CoordinatorHandle,
    /// The agents.
    pub agents: Vec<AgentHandle>,
}

impl Running {
    /// Stops the agents, then the coordinator.
    pub async fn shutdown(self) {
        for a in self.agents {
            a.shutdown().await;
        }
        self.coordinator.shutdown().await;
    }
}

/// Starts everything and waits until every agent serves every demo model; `progress` gets one
/// line per step.
pub async fn up(options: &Options, mut progress: impl FnMut(&str)) -> anyhow::Result<Running> {
    let mut config = options.coordinator.clone();
    config.storage.data_dir = options.data_dir.join("coordinator");
    let coordinator = Coordinator::start(config)
        .await
        .context("starting the coordinator")?;
    progress(&format!(
        "coordinator: QUIC {}, admin http://{}, MQTT {} (embedded)",
        coordinator.quic_addr, coordinator.admin_addr, coordinator.mqtt
    ));

    let fleet = DevFleet::of(&coordinator)?;
    for (name, query, model, cloud) in demo_pushes() {
        let mut body = model.bytes(DEFAULT_SEED);
        let mut query = query.to_owned();
        if let Some(cloud) = cloud {
            let extra = cloud.bytes(DEFAULT_SEED);
            query.push_str(&format!("&cloud_size={}", extra.len()));
            body.extend(extra);
        }
        let started = Instant::now();
        let (status, reply) = admin(
            coordinator.admin_addr,
            &coordinator.admin_token,
            &format!("/v1/models/{name}?{query}"),
            &body,
        )
        .await?;
        if status != 201 {
            bail!("pushing {name} failed ({status}): {reply}");
        }
        progress(&format!(
            "pushed {name} ({:.1} MB) in {:.1} s",
            body.len() as f64 / 1e6,
            started.elapsed().as_secs_f64()
        ));
    }

    let mut agents = Vec::new();
    for i in 0..options.agents {
        // Port 0 picks a free port for each agent.
        let port = if options.first_port == 0 {
            0
        } else {
            options.first_port.saturating_add(i)
        };
        let agent = fleet
            .start_agent(u32::from(i) + 1, port, &options.data_dir)
            .await?;
        progress(&format!(
            "agent {}: http://{}",
            agent.device_id, agent.api_addr
        ));
        agents.push(agent);
    }

    let started = Instant::now();
    let models: Vec<&str> = demo_pushes().iter().map(|p| p.0).collect();
    let mut reported = 0;
    loop {
        let ready = agents
            .iter()
            .filter(|a| models.iter().all(|m| a.active_version(m).is_some()))
            .count();
        if ready > reported {
            progress(&format!(
                "{ready}/{} agents serve every model ({:.1} s)",
                agents.len(),
                started.elapsed().as_secs_f64()
            ));
            reported = ready;
        }
        if ready == agents.len() {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let errors: Vec<String> = agents
                .iter()
                .filter_map(|a| a.status().last_error)
                .collect();
            bail!(
                "agents did not converge in 5 minutes: {}",
                errors.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Running {
        coordinator,
        agents,
    })
}

/// A dev-mode coordinator's fleet, to enroll and start agents in this process.
#[derive(Debug)]
pub struct DevFleet {
    authority: FleetAuthority,
    dir: PathBuf,
    template: AgentConfig,
}

impl DevFleet {
    /// The fleet of a coordinator running in dev mode.
    pub fn of(coordinator: &CoordinatorHandle) -> anyhow::Result<Self> {
        let config_path = coordinator
            .fleet_config
            .clone()
            .context("the coordinator is not in dev mode")?;
        let config = CoordinatorConfig::load(&config_path)?;
        Ok(Self {
            authority: FleetAuthority::load(&config)?,
            dir: config_path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            template: AgentConfig::load(
                coordinator
                    .dev_agent_config
                    .as_ref()
                    .context("no dev agent config")?,
            )?,
        })
    }

    /// Starts agent `dev-{n:04}` (enrolled on first use, with its own device certificate) with
    /// its API on `port` (0: any) and data in `data_dir/agent-{id}`.
    pub async fn start_agent(
        &self,
        n: u32,
        port: u16,
        data_dir: &Path,
    ) -> anyhow::Result<AgentHandle> {
        let id: DeviceId = format!("dev-{n:04}").parse()?;
        let path = self
            .dir
            .join("devices")
            .join(id.as_str())
            .join("agent.toml");
        if !path.exists() {
            self.authority.enroll(
                &id,
                &self.template.coordinator.addresses,
                &self.template.mqtt.broker,
                &self.dir,
            )?;
        }
        let mut config = AgentConfig::load(&path)?;
        config.api.listen = SocketAddr::from(([127, 0, 0, 1], port));
        config.storage.data_dir = Some(data_dir.join(format!("agent-{id}")));
        Agent::start(config)
            .await
            .with_context(|| format!("starting agent {id}"))
    }
}

/// Ready-to-paste curl commands for the first agent.
pub fn curl_examples(api: SocketAddr) -> String {
    let features: Vec<String> = (0..32)
        .map(|i| format!("{:.2}", (i % 7) as f32 / 7.0))
        .collect();
    let features = features.join(",");
    format!(
        "curl -s http://{api}/v2/models/video-ranker\n\
         curl -s http://{api}/v2/models/video-ranker/infer -d '{{\"inputs\":[{{\"name\":\"user_features\",\"shape\":[2,32],\"datatype\":\"FP32\",\"data\":[{features},{features}]}},{{\"name\":\"item_ids\",\"shape\":[2],\"datatype\":\"INT64\",\"data\":[42,4242]}}]}}'\n\
         curl -s http://{api}/v2/models/intent-classifier/infer -d '{{\"inputs\":[{{\"name\":\"token_ids\",\"shape\":[1,6],\"datatype\":\"INT64\",\"data\":[12,873,4410,95,7,3021]}}]}}'\n\
         curl -s http://{api}/v1/status"
    )
}

/// A POST to the admin API; the status and body.
pub(crate) async fn admin(
    addr: SocketAddr,
    token: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}
