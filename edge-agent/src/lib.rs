//! The Outpost edge agent: answers apps on localhost with the Open Inference Protocol, runs
//! models on the device (GPU or tract), offloads to the coordinator over QUIC, and keeps its
//! models in sync with the fleet's signed releases over MQTT. It keeps serving from its cache
//! offline.
//!
//! [`Agent::start`] runs everything on the current tokio runtime and returns an [`AgentHandle`];
//! `main.rs` is a thin CLI over it, and tests and the `outpost` tool run many agents in one
//! process.
//!
//! The parts, each owning one thing (all private; tests and the `outpost` tool go through
//! [`Agent`] and [`AgentHandle`], and `api` stays public for [`MAX_BODY`]):
//!
//! - `api`: the local HTTP API, and the one mapping of a failed inference to a status code.
//! - `router`: where a call runs (device, cloud, cascade) and the typed error of a call.
//! - `offload`: the QUIC client to the coordinators (reused connection, failover, back-off).
//! - `sync`: the MQTT connection: subscriptions, manifests in, status out.
//! - `installer`: the one task that changes what serves; it owns the serving table.
//! - `plan`: the install decision, a pure function of what the installer read.
//! - `serving`: the serving table and its immutable snapshots.
//! - `engines`: GPU or tract, and the load of a version from its chunks.
//! - `store`: the sled records and the chunk files.
//! - `status`: the device status from one snapshot; `counters`: what it counted.

/// A place where the fault tests stop the agent dead: with the `failpoints` feature,
/// `FAILPOINTS=name=return` makes the agent abort there (no destructor runs, nothing more is
/// flushed: as `kill -9` would). Without the feature it compiles to nothing. The names are
/// listed in `CRASH_POINTS`, which the tests walk.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| std::process::abort())
    };
}

/// Every crash point, in the order an install meets them (see `crash_point!`).
pub const CRASH_POINTS: [&str; 21] = [
    "agent.cached_loaded",
    "sync.manifest_received",
    "installer.verified",
    "installer.planned",
    "installer.switch_pending",
    "installer.fetch_requesting",
    "installer.fetch_received",
    "installer.chunk_stored",
    "installer.fetched",
    "installer.loaded",
    "installer.record_saving",
    "store.record_encoded",
    "store.record_inserted",
    "store.record_flushed",
    "installer.record_saved",
    "installer.switched",
    "installer.gc_starting",
    "store.gc_kept_listed",
    "store.gc_done",
    "installer.installed",
    "installer.status_publishing",
];

pub mod api;
mod counters;
mod engines;
mod guard;
mod health;
mod installer;
mod offload;
mod plan;
mod router;
mod serving;
mod status;
mod store;
mod sync;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use firmware_config::AgentConfig;
use outpost_runtime::memory::MemoryBudget;
use outpost_shared::{DeviceStatus, ManifestVerifier};
use tokio::sync::watch;

pub use api::MAX_BODY;
pub use store::StoreError;

use crate::counters::Counters;
use crate::engines::Engines;
use crate::installer::Installer;
use crate::serving::{Models, ServingTable};
use crate::store::Store;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The local store could not be opened, or its records read.
    #[error("local store in {dir}: {source}")]
    Store {
        /// The data folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: StoreError,
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
    /// A start-up task (choosing the GPU, loading the cached models) ended without an answer.
    #[error("starting the agent: {0}")]
    Startup(String),
}

/// What the agent's tasks share. The serving table is not here: the installer owns it, and
/// this holds the receiver of its snapshots.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) config: AgentConfig,
    pub(crate) store: Arc<Store>,
    pub(crate) offload: offload::OffloadClient,
    pub(crate) counters: Counters,
    /// Each model's recent service (the status's `health`).
    pub(crate) health: health::HealthWindows,
    models: watch::Receiver<Arc<Models>>,
    /// Why the MQTT connection is down, while it is (set and cleared by the MQTT loop).
    pub(crate) broker_error: std::sync::Mutex<Option<String>>,
    /// Signs the statuses and the last will.
    pub(crate) signer: status::StatusSigner,
    /// Wakes the release poller (after an MQTT reconnect).
    pub(crate) poll_releases: tokio::sync::Notify,
    /// The working memory local calls share (the profile's `working_memory_mb`).
    pub(crate) working_memory: MemoryBudget,
    /// The request bodies held at once (the profile's `body_memory_mb`).
    pub(crate) bodies: MemoryBudget,
}

impl Context {
    /// The serving table as it stands: one snapshot, unchanged however long it is held.
    pub(crate) fn models(&self) -> Arc<Models> {
        Arc::clone(&self.models.borrow())
    }

    /// The working memory a local call runs within.
    pub(crate) fn call_memory(&self) -> router::CallMemory<'_> {
        router::CallMemory {
            budget: &self.working_memory,
            per_call: self.config.profile().call_memory_bytes(),
        }
    }

    /// The device's status now.
    pub(crate) fn status(&self) -> DeviceStatus {
        let mut status = status::device_status(
            self.config.device.id.as_str(),
            &self.models(),
            &self.counters,
            &self.health,
            status::now(),
        );
        status.broker_error = self.broker_error.lock().ok().and_then(|e| e.clone());
        if status.broker_error.is_some() && status.health == outpost_shared::Health::Ready {
            status.health = outpost_shared::Health::Degraded;
        }
        status
    }
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
        let store_err = |source: StoreError| AgentError::Store {
            dir: data_dir.clone(),
            source,
        };
        let store = Arc::new(Store::open(&data_dir).map_err(store_err)?);
        let choice = config.engine;
        let activations = config.gpu_activations;
        let preference = config.profile().gpu;
        let library = config.onnxruntime_library.clone();
        let (gpu, onnxruntime) = tokio::task::spawn_blocking(move || {
            (
                engines::choose_gpu(choice, activations, preference),
                engines::load_onnxruntime(library.as_deref()),
            )
        })
        .await
        .map_err(|e| AgentError::Startup(e.to_string()))?;
        let gpu = gpu.map_err(AgentError::Gpu)?;
        let engines = Engines {
            gpu,
            tract: outpost_runtime::tract::TractOptions {
                threads: engines::engine_threads(config.profile().inference_threads),
                ..Default::default()
            },
            onnxruntime,
            admission: outpost_runtime::admission::AdmissionLimits {
                running: usize::try_from(config.profile().inference_concurrency).unwrap_or(1),
                waiting: usize::try_from(config.profile().inference_queue).unwrap_or(0),
            },
        };
        // The device's certificate and key, read once: QUIC, MQTT and status signing use them.
        let identity =
            outpost_runtime::tls::Identity::load(&config.device.certificate, &config.device.key)
                .map_err(|e| AgentError::Identity(e.to_string()))?;
        check_identity(&config, &identity)?;
        let signer = status::StatusSigner::new(&config, &identity).map_err(AgentError::Identity)?;
        let offload =
            offload::OffloadClient::new(&config, identity.clone()).map_err(AgentError::Identity)?;
        let mqtt_tls = sync::mqtt_tls(&config, identity).map_err(AgentError::Identity)?;
        let verifier = ManifestVerifier::new(config.fleet.manifest_keys.clone());
        let (table, models) =
            ServingTable::new(config.profile().memory_budget_mb.saturating_mul(1 << 20));
        let profile = config.profile();
        let ctx = Arc::new(Context {
            working_memory: MemoryBudget::new(profile.working_memory_bytes()),
            bodies: MemoryBudget::new(profile.body_memory_mb.saturating_mul(1 << 20)),
            config,
            store,
            offload,
            counters: Counters::default(),
            health: health::HealthWindows::default(),
            models,
            broker_error: std::sync::Mutex::new(None),
            signer,
            poll_releases: tokio::sync::Notify::new(),
        });

        // Cached models serve before any network is up.
        let mut installer = Installer::new(ctx.clone(), verifier, engines, table);
        let installer =
            tokio::task::spawn_blocking(move || installer.load_cached().map(|()| installer))
                .await
                .map_err(|e| AgentError::Startup(e.to_string()))?
                .map_err(store_err)?;
        crash_point!("agent.cached_loaded");

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
        let mqtt_tls = Arc::new(mqtt_tls);
        let (client, events) = rumqttc::AsyncClient::new(
            sync::mqtt_options(&ctx, &ctx.config.mqtt.broker, mqtt_tls.clone()),
            64,
        );
        let (manifests_tx, manifests_rx) = sync::manifest_queue();
        let tasks = vec![
            tokio::spawn(api::serve(listener, ctx.clone(), watcher.clone())),
            tokio::spawn(sync::poll_releases(
                ctx.clone(),
                manifests_tx.clone(),
                watcher.clone(),
            )),
            tokio::spawn(sync::run_mqtt(
                ctx.clone(),
                client.clone(),
                events,
                mqtt_tls,
                manifests_tx,
                watcher.clone(),
            )),
            tokio::spawn(sync::publish_health(ctx.clone(), client.clone(), watcher)),
            tokio::spawn(installer.run(client.clone(), manifests_rx)),
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
fn check_identity(
    config: &AgentConfig,
    identity: &outpost_runtime::tls::Identity,
) -> Result<(), AgentError> {
    let leaf = identity.leaf().ok_or_else(|| {
        AgentError::Identity(format!(
            "{}: no certificate in it",
            config.device.certificate.display()
        ))
    })?;
    let id = firmware_config::device_id_from_certificate(leaf)
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
        self.ctx.status()
    }

    /// The active version of `model`, if it serves.
    pub fn active_version(&self, model: &str) -> Option<u64> {
        self.ctx.models().active_version(model)
    }

    /// The version of `model` being fetched or loaded, if any: the agent has heard of it.
    pub fn pending_version(&self, model: &str) -> Option<u64> {
        self.ctx.models().get(model)?.pending
    }

    /// Whether the agent is connected to its MQTT broker now (it has been once, and has not
    /// lost the connection since).
    pub fn broker_connected(&self) -> bool {
        self.ctx
            .counters
            .broker_connects
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
            && self.ctx.broker_error.lock().is_ok_and(|e| e.is_none())
    }

    /// The agent's counters now (cheaper than [`AgentHandle::status`]).
    pub fn counters(&self) -> outpost_shared::Counters {
        self.ctx.counters.snapshot()
    }

    /// Publishes an offline status (signed like every status, so the coordinator keeps the
    /// device listed as offline rather than ignoring it), stops serving, and flushes the store.
    pub async fn shutdown(self) {
        let mut status = self.ctx.status();
        status.health = outpost_shared::Health::Offline;
        if let (Ok(topic), Ok(bytes)) = (
            outpost_shared::Topic::device_status(&status.device_id),
            self.ctx.signer.sign(&status),
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
        if let Err(e) = self.ctx.store.flush().await {
            tracing::error!(error = %e, "could not flush the store");
        }
    }
}
