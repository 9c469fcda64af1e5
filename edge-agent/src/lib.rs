//! The Outpost edge agent: answers apps on localhost with the Open Inference Protocol, runs
//! models on the device (tract), offloads to the coordinator over QUIC, and keeps its models in
//! sync with the fleet's signed releases over MQTT. It keeps serving from its cache offline.
//!
//! [`Agent::start`] runs everything on the current tokio runtime and returns an [`AgentHandle`];
//! `main.rs` is a thin CLI over it, and tests and the `outpost` tool run many agents in one
//! process.

pub mod api;
pub mod offload;
pub mod router;
pub mod state;
mod sync;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use firmware_config::AgentConfig;
use outpost_shared::{DeviceStatus, ManifestVerifier};
use tokio::sync::{mpsc, watch};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The local store could not be opened.
    #[error("local store in {dir}: {reason}")]
    Store {
        /// The data folder.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The device's trust material cannot be used.
    #[error("device identity: {0}")]
    Identity(String),
    /// `engine = "gpu"`, and no GPU adapter can be used.
    #[error("engine = \"gpu\": {0}")]
    Gpu(String),
    /// The API could not listen.
    #[error("the local API cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// What the agent's tasks share.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) config: AgentConfig,
    pub(crate) verifier: ManifestVerifier,
    pub(crate) store: Arc<state::Store>,
    pub(crate) offload: offload::OffloadClient,
    pub(crate) last_error: Mutex<Option<String>>,
}

/// Starts agents.
#[derive(Debug)]
pub struct Agent;

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    /// The local API's address.
    pub api_addr: SocketAddr,
    /// The device id.
    pub device_id: String,
    /// The data folder.
    pub data_dir: PathBuf,
    ctx: Arc<Context>,
    mqtt: rumqttc::AsyncClient,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// Starts an agent: opens its store and serves its cached models at once, then connects.
    pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
        let data_dir = config.data_dir();
        let store_err = |reason: String| AgentError::Store {
            dir: data_dir.clone(),
            reason,
        };
        std::fs::create_dir_all(&data_dir).map_err(|e| store_err(e.to_string()))?;
        let db = sled::open(data_dir.join("state.sled")).map_err(|e| store_err(e.to_string()))?;
        let records = db
            .open_tree("models")
            .map_err(|e| store_err(e.to_string()))?;
        let chunks = outpost_runtime::ChunkStore::open(&data_dir.join("chunks"))
            .map_err(|e| store_err(e.to_string()))?;
        let choice = config.engine;
        let preference = config.profile().gpu;
        let gpu = tokio::task::spawn_blocking(move || choose_gpu(choice, preference))
            .await
            .map_err(|e| AgentError::Gpu(e.to_string()))??;
        let store = Arc::new(state::Store {
            slots: RwLock::default(),
            records,
            db,
            chunks,
            counters: Default::default(),
            engine_options: outpost_runtime::tract::TractOptions {
                threads: engine_threads(config.profile().inference_threads),
                ..Default::default()
            },
            gpu,
        });
        check_identity(&config)?;
        let offload = offload::OffloadClient::new(&config).map_err(AgentError::Identity)?;
        let verifier = ManifestVerifier::new(config.fleet.manifest_keys.clone());
        let ctx = Arc::new(Context {
            config,
            verifier,
            store,
            offload,
            last_error: Mutex::new(None),
        });

        // Cached models serve before any network is up.
        let loader = ctx.clone();
        tokio::task::spawn_blocking(move || sync::load_cached(&loader))
            .await
            .map_err(|e| store_err(e.to_string()))?
            .map_err(store_err)?;

        let listen = ctx.config.api.listen;
        let listener =
            tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| AgentError::Listen {
                    addr: listen,
                    reason: e.to_string(),
                })?;
        let api_addr = listener.local_addr().map_err(|e| AgentError::Listen {
            addr: listen,
            reason: e.to_string(),
        })?;
        let (shutdown, watcher) = watch::channel(false);
        let (client, events) = rumqttc::AsyncClient::new(sync::mqtt_options(&ctx), 64);
        let (manifests_tx, manifests_rx) = mpsc::channel(256);
        let tasks = vec![
            tokio::spawn(api::serve(listener, ctx.clone(), watcher.clone())),
            tokio::spawn(sync::run_mqtt(
                ctx.clone(),
                client.clone(),
                events,
                manifests_tx,
                watcher,
            )),
            tokio::spawn(sync::run_installer(
                ctx.clone(),
                client.clone(),
                manifests_rx,
            )),
        ];
        tracing::info!(device = %ctx.config.device.id, %api_addr, "agent started");
        Ok(AgentHandle {
            api_addr,
            device_id: ctx.config.device.id.to_string(),
            data_dir,
            ctx,
            mqtt: client,
            shutdown,
            tasks,
        })
    }
}

/// The device id is the one in its certificate: a config naming another is refused.
fn check_identity(config: &AgentConfig) -> Result<(), AgentError> {
    let path = &config.device.certificate;
    let text = std::fs::read_to_string(path)
        .map_err(|e| AgentError::Identity(format!("{}: {e}", path.display())))?;
    let der =
        pem::parse(text).map_err(|e| AgentError::Identity(format!("{}: {e}", path.display())))?;
    let id = firmware_config::device_id_from_certificate(der.contents())
        .map_err(|e| AgentError::Identity(e.to_string()))?;
    if id != config.device.id {
        return Err(AgentError::Identity(format!(
            "the config says device {:?} but its certificate names {:?}",
            config.device.id.as_str(),
            id.as_str()
        )));
    }
    Ok(())
}

impl AgentHandle {
    /// The agent's status now (what it publishes).
    pub fn status(&self) -> DeviceStatus {
        sync::status(&self.ctx)
    }

    /// The active version of `model`, if it serves.
    pub fn active_version(&self, model: &str) -> Option<u64> {
        self.ctx
            .store
            .slots
            .read()
            .ok()?
            .get(model)?
            .active
            .as_ref()
            .map(|s| s.version.version)
    }

    /// Publishes an offline status, stops serving, and flushes the store.
    pub async fn shutdown(self) {
        let mut status = sync::status(&self.ctx);
        status.health = outpost_shared::Health::Offline;
        if let (Ok(topic), Ok(bytes)) = (
            outpost_shared::Topic::device_status(&status.device_id),
            status.to_cbor(),
        ) {
            let _ = self
                .mqtt
                .try_publish(topic.name(), rumqttc::QoS::AtLeastOnce, true, bytes);
        }
        let _ = self.shutdown.send(true);
        let _ = self.mqtt.try_disconnect();
        let mut tasks = self.tasks;
        // The installer ends when the MQTT task (its sender) ends.
        for task in tasks.drain(..) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
        self.ctx.offload.close();
        if let Err(e) = self.ctx.store.db.flush_async().await {
            tracing::error!(error = %e, "could not flush the store");
        }
    }
}

/// The profile's inference threads, at most the CPUs present.
fn engine_threads(wanted: u32) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    usize::try_from(wanted).unwrap_or(1).clamp(1, cpus)
}

/// The GPU local models may use, from the config's `engine` and the profile's `gpu`.
fn choose_gpu(
    choice: firmware_config::EngineChoice,
    preference: firmware_config::GpuPreference,
) -> Result<state::LocalGpu, AgentError> {
    use firmware_config::EngineChoice;
    use firmware_config::GpuPreference;
    use outpost_gpu::{GpuContext, GpuOptions};
    match (choice, preference) {
        (EngineChoice::Cpu, _) => Ok(state::LocalGpu::Absent(
            "the agent config sets engine = \"cpu\"".into(),
        )),
        (EngineChoice::Auto, GpuPreference::Never) => Ok(state::LocalGpu::Absent(
            "the device profile sets gpu = \"never\"".into(),
        )),
        (EngineChoice::Auto, GpuPreference::Prefer) => {
            Ok(match GpuContext::new(GpuOptions::default()) {
                Ok(gpu) => state::LocalGpu::Ready(gpu),
                Err(e) => {
                    tracing::info!(reason = %e, "no GPU for local models; they run on tract");
                    state::LocalGpu::Absent(e)
                }
            })
        }
        (EngineChoice::Gpu, _) => GpuContext::new(GpuOptions {
            allow_software: true,
            ..GpuOptions::default()
        })
        .map(state::LocalGpu::Ready)
        .map_err(AgentError::Gpu),
    }
}
