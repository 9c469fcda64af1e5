//! `outpost up`: a coordinator with its embedded broker, N agents, the demo models pushed, and
//! ready-to-paste curl commands — one process, dev-mode trust (a throwaway fleet made by the same
//! provisioning code as everywhere else; each agent has its own device certificate).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cloud_coordinator::{AdminClient, Coordinator, CoordinatorHandle, PushOptions};
use edge_agent::{Agent, AgentHandle};
use firmware_config::{AgentConfig, CoordinatorConfig, DeviceId, FleetAuthority};
use model_zoo::{DEFAULT_SEED, DemoModel, TextModel};
use outpost_shared::Placement;

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

/// A model the quickstart pushes.
#[derive(Debug, Clone, Copy)]
enum Pushed {
    /// Tensors in.
    Demo(DemoModel),
    /// Text in: pushed with the model-zoo tokenizer.json.
    Text(TextModel),
}

/// The models the quickstart pushes: (name, placement, model, optional cloud model).
fn demo_pushes() -> Vec<(&'static str, Placement, Pushed, Option<DemoModel>)> {
    let demo = |(name, placement, model, cloud): (
        &'static str,
        Placement,
        DemoModel,
        Option<DemoModel>,
    )| { (name, placement, Pushed::Demo(model), cloud) };
    let mut pushes: Vec<_> = [
        (
            "video-ranker",
            Placement::Local,
            DemoModel::VideoRanker,
            Some(DemoModel::VideoRankerXl),
        ),
        (
            "video-ranker-xl",
            Placement::Cloud,
            DemoModel::VideoRankerXl,
            None,
        ),
        (
            "intent-classifier",
            Placement::Cascade {
                output: "intent_probs".into(),
                threshold: 0.6,
            },
            DemoModel::IntentClassifier,
            None,
        ),
        (
            "music-two-tower",
            Placement::Local,
            DemoModel::MusicTwoTower,
            None,
        ),
    ]
    .into_iter()
    .map(demo)
    .collect();
    // The seed's use cases with text in: customer service as a cascade (the device answers the
    // messages it is sure of, the cloud the rest) and search on the device.
    pushes.push((
        "intent-classifier-text",
        Placement::Cascade {
            output: "intent_probs".into(),
            threshold: 0.6,
        },
        Pushed::Text(TextModel::IntentClassifierText),
        None,
    ));
    pushes.push((
        "video-search",
        Placement::Local,
        Pushed::Text(TextModel::VideoSearch),
        None,
    ));
    pushes
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
    let admin = AdminClient::of(&coordinator);
    for (name, placement, model, cloud) in demo_pushes() {
        let mut options = PushOptions::default().placement(placement);
        let model = match model {
            Pushed::Demo(m) => m.bytes(DEFAULT_SEED),
            Pushed::Text(m) => {
                options = options.tokenizer(model_zoo::vocab::tokenizer_json().into_bytes());
                m.bytes(DEFAULT_SEED)
                    .with_context(|| format!("building {name}"))?
            }
        };
        if let Some(cloud) = cloud {
            options = options.cloud_model(cloud.bytes(DEFAULT_SEED));
        }
        let size = model.len() + options.cloud_model.as_ref().map_or(0, Vec::len);
        let started = Instant::now();
        admin
            .push(name, model, &options)
            .await
            .with_context(|| format!("pushing {name} failed"))?;
        progress(&format!(
            "pushed {name} ({:.1} MB) in {:.1} s",
            size as f64 / 1e6,
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
    quic_port: u16,
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
            quic_port: coordinator.quic_addr.port(),
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
        self.start_agent_with(n, port, data_dir, |_| {}).await
    }

    /// [`DevFleet::start_agent`], its config changed by `adjust` first.
    pub async fn start_agent_with(
        &self,
        n: u32,
        port: u16,
        data_dir: &Path,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> anyhow::Result<AgentHandle> {
        let id: DeviceId = format!("dev-{n:04}").parse()?;
        let path = self
            .dir
            .join("devices")
            .join(id.as_str())
            .join("agent.toml");
        if !path.exists() {
            self.authority
                .enroll_like_first_device(&id, &self.dir, self.quic_port, &self.dir)?;
        }
        let mut config = AgentConfig::load(&path)?;
        config.api.listen = SocketAddr::from(([127, 0, 0, 1], port));
        config.storage.data_dir = Some(data_dir.join(format!("agent-{id}")));
        adjust(&mut config);
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
         curl -s http://{api}/v2/models/intent-classifier-text/infer -d '{{\"inputs\":[{{\"name\":\"text\",\"shape\":[2],\"datatype\":\"BYTES\",\"data\":[\"refund my order\",\"the video keeps buffering\"]}}],\"outputs\":[{{\"name\":\"intent_probs\",\"parameters\":{{\"classification\":3}}}}]}}'\n\
         curl -s http://{api}/v2/models/video-search/infer -d '{{\"inputs\":[{{\"name\":\"text\",\"shape\":[1],\"datatype\":\"BYTES\",\"data\":[\"calm piano music for study\"]}}]}}'\n\
         curl -s http://{api}/v1/status"
    )
}
