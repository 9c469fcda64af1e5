//! The Outpost cloud coordinator: registry, manifest signing and publishing, embedded MQTT
//! broker, QUIC chunk and inference service, admin API.
//!
//! [`Coordinator::start`] runs everything on the current tokio runtime and returns a
//! [`CoordinatorHandle`] with the real addresses (port 0 picks a free port), so tests and the
//! `outpost` tool run coordinators in-process; `main.rs` is a thin CLI over it. [`AdminClient`]
//! talks to a running coordinator's admin API (over HTTP, in-process or not).

/// A place where the fault tests stop the coordinator dead: with the `failpoints` feature,
/// `FAILPOINTS=name=return` makes it abort there (as `kill -9` would). Without the feature it
/// compiles to nothing. The names are listed in [`CRASH_POINTS`].
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| std::process::abort())
    };
}

/// Every crash point, in the order a push meets them (see `crash_point!`).
pub const CRASH_POINTS: [&str; 7] = [
    "registry.chunks_stored",
    "registry.record_committed",
    "registry.flushed",
    "registry.gc_listed",
    "registry.gc_done",
    "admin.before_announce",
    "admin.announced",
];

pub mod admin;
mod admin_client;
pub mod backend;
pub mod broker;
pub mod error;
pub mod finetune;
pub mod gate;
pub mod gateway;
mod infer;
pub mod metrics;
pub mod mqtt;
mod quic;
pub mod registry;
pub mod revocation;
pub mod trust;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use firmware_config::{CoordinatorConfig, HostPort};
use tokio::sync::watch;

pub use admin_client::{AdminClient, AdminError, FinetuneProgress, PushOptions};
pub use error::{CoordinatorError, RegistryError};
pub use quic::{MAX_CONNECTIONS_PER_DEVICE, MAX_STREAMS_PER_CONNECTION};

/// The file, in the data folder, holding the admin API's bearer token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Starts coordinators.
#[derive(Debug)]
pub struct Coordinator;

/// A running coordinator.
#[derive(Debug)]
pub struct CoordinatorHandle {
    /// The QUIC service's address.
    pub quic_addr: SocketAddr,
    /// The admin API's address.
    pub admin_addr: SocketAddr,
    /// Whether the admin API speaks HTTPS (`[admin] tls_cert`).
    pub admin_tls: bool,
    /// The MQTT broker in use (embedded or external).
    pub mqtt: HostPort,
    /// Whether the broker is the embedded one.
    pub embedded_broker: bool,
    /// The embedded broker's router (rumqttd) behind its TLS front: a loopback port that takes
    /// only the front's secret login. Known so that it can be firewalled and tested.
    pub mqtt_router: Option<SocketAddr>,
    /// The admin API's bearer token.
    pub admin_token: String,
    /// Whether the token was made by this start (print it).
    pub new_admin_token: bool,
    /// The coordinator config of the fleet in use (the dev fleet's in dev mode).
    pub fleet_config: Option<PathBuf>,
    /// In dev mode, a ready agent config of the dev fleet.
    pub dev_agent_config: Option<PathBuf>,
    /// The data folder.
    pub data_dir: PathBuf,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    workers: infer::Workers,
    db: sled::Db,
}

impl Coordinator {
    /// Starts a coordinator as `config` says.
    pub async fn start(config: CoordinatorConfig) -> Result<CoordinatorHandle, CoordinatorError> {
        if let Some((_, problem)) = config.admin.problem() {
            return Err(CoordinatorError::AdminListen(problem));
        }
        let admin_tls = match config.admin.tls() {
            Some((cert, key)) => Some(Arc::new(trust::admin_server_config(cert, key)?)),
            None => None,
        };
        let data_dir = config.storage.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| CoordinatorError::Io {
            path: data_dir.clone(),
            source,
        })?;

        // The broker's address first: the dev fleet's agent configs name it.
        let (mqtt, embedded) = match (&config.mqtt.external, config.mqtt.embedded_listen()) {
            (Some(external), _) => (external.clone(), None),
            (None, Some(listen)) => {
                let listener = broker::bind(listen).await?;
                let addr = listener
                    .local_addr()
                    .map_err(|e| CoordinatorError::Network(e.to_string()))?;
                (
                    HostPort {
                        host: addr.ip().to_string(),
                        port: addr.port(),
                    },
                    Some(listener),
                )
            }
            (None, None) => {
                return Err(CoordinatorError::Network(
                    "no MQTT broker configured".into(),
                ));
            }
        };
        let embedded_broker = embedded.is_some();

        let udp = bind_udp(config.quic.listen)?;
        let quic_port = udp
            .local_addr()
            .map_err(|e| CoordinatorError::Network(e.to_string()))?
            .port();
        let trust = trust::load(&config, quic_port, &mqtt)?;
        let server_config = trust::quic_server_config(&trust)?;
        let mqtt_client = trust::mqtt_client_config(&trust, config.mqtt.ca.as_deref())?;
        let mqtt_server = match &embedded {
            Some(_) => Some(Arc::new(trust::mqtt_server_config(&trust)?)),
            None => None,
        };
        let coordinator_certificate = trust.certificate.clone();
        let status_verifier = trust::StatusVerifier::new(trust.ca.clone());

        let db = open_database(&data_dir.join("registry.sled")).await?;
        let revocations = Arc::new(revocation::Revocations::open(&db)?);
        let broker_files = Arc::new(revocation::BrokerFiles::new(&CoordinatorConfig {
            fleet: Some(trust.fleet.clone()),
            ..CoordinatorConfig::default()
        }));
        let chunks =
            outpost_runtime::ChunkStore::open(&data_dir.join("chunks")).map_err(|source| {
                CoordinatorError::Io {
                    path: data_dir.join("chunks"),
                    source,
                }
            })?;
        let shared = match &config.registry.shared {
            Some(section) => {
                let store =
                    registry::SharedStore::open(section, tokio::runtime::Handle::current())?;
                let checked = tokio::task::spawn_blocking(move || store.check().map(|()| store));
                Some(checked.await.map_err(|e| {
                    CoordinatorError::Network(format!("checking the shared store: {e}"))
                })??)
            }
            None => None,
        };
        let registry = Arc::new(registry::Registry::open(
            db.clone(),
            chunks,
            trust.signer,
            &config.registry,
            shared,
        )?);
        // A replica starts with every release the others published (before it serves any).
        if registry.shared_poll().is_some() {
            let registry_ = registry.clone();
            let followed = tokio::task::spawn_blocking(move || registry_.follow_shared())
                .await
                .map_err(|e| {
                    CoordinatorError::Network(format!("reading the shared store: {e}"))
                })??;
            tracing::info!(
                models = followed.taken.len(),
                "took over the shared store's releases"
            );
        }
        let (admin_token, new_admin_token) = admin_token(&data_dir)?;
        let metrics = Arc::new(metrics::Metrics::default());
        let fleet = mqtt::FleetView::default();
        let (shutdown, watcher) = watch::channel(false);
        let mut tasks = Vec::new();

        let mut mqtt_router = None;
        if let (Some(listener), Some(tls)) = (embedded, mqtt_server) {
            let settings = broker::FrontSettings {
                tls,
                coordinator_certificate,
                max_connections: config.mqtt.max_connections(),
                revocations: revocations.clone(),
            };
            let (task, router) =
                broker::start(listener, settings, metrics.clone(), watcher.clone()).await?;
            tasks.push(task);
            mqtt_router = Some(router);
        }
        let mut brokers = vec![mqtt.clone()];
        if config.mqtt.external.is_some() {
            brokers.extend(config.mqtt.fallbacks.iter().cloned());
        }
        let (announcer, mqtt_task) = mqtt::Announcer::start(
            brokers,
            mqtt_client,
            registry.clone(),
            fleet.clone(),
            mqtt::StatusCheck {
                verifier: status_verifier,
                metrics: metrics.clone(),
                max_devices: config.mqtt.max_devices(),
                revocations: revocations.clone(),
            },
            watcher.clone(),
        );
        tasks.push(mqtt_task);
        tasks.push(tokio::spawn(gate::run(
            registry.clone(),
            announcer.clone(),
            fleet.clone(),
            metrics.clone(),
            config.rollout.check_interval(),
            watcher.clone(),
        )));
        if let Some(every) = registry.shared_poll() {
            tasks.push(tokio::spawn(registry::follow(
                registry.clone(),
                announcer.clone(),
                embedded_broker,
                every,
                watcher.clone(),
            )));
        }
        tasks.push(tokio::spawn(mqtt::keep_releases_fresh(
            registry.clone(),
            announcer.clone(),
            watcher.clone(),
        )));

        let (pool, workers) =
            infer::InferencePool::start(&config.inference, registry.clone(), metrics.clone());
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            udp,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| CoordinatorError::Network(format!("QUIC endpoint: {e}")))?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(|e| CoordinatorError::Network(e.to_string()))?;
        let (backends, backend_tasks) = backend::Backends::start(&config.backends, &watcher)
            .map_err(CoordinatorError::Backend)?;
        tasks.extend(backend_tasks);
        let backends = Arc::new(backends);
        let service = quic::Service {
            registry: registry.clone(),
            gateway: gateway::Gateway {
                registry: registry.clone(),
                pool,
                backends: backends.clone(),
                limits: Arc::new(gateway::RateLimits::new(&config.gateway)),
                metrics: metrics.clone(),
            },
            metrics: metrics.clone(),
            connections: Arc::default(),
            request_timeout: config.quic.request_timeout(),
            revocations: revocations.clone(),
        };
        tasks.push(tokio::spawn(quic::serve(
            endpoint,
            service,
            watcher.clone(),
        )));

        let listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => CoordinatorError::AddressInUse {
                    what: "the admin API",
                    addr: config.admin.listen,
                    hint: " (set [admin] listen to another address)",
                },
                _ => {
                    CoordinatorError::Network(format!("admin API on {}: {e}", config.admin.listen))
                }
            })?;
        let admin_addr = listener
            .local_addr()
            .map_err(|e| CoordinatorError::Network(e.to_string()))?;
        let max_upload = usize::try_from(config.registry.max_upload_mb.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX);
        let state = admin::AdminState {
            registry,
            announcer,
            fleet,
            metrics,
            revocations,
            broker_files,
            token: admin_token.clone(),
            max_upload,
            max_connections: usize::try_from(config.admin.max_connections).unwrap_or(1),
            rollout: config.rollout.clone(),
            max_finetunes: config.registry.max_finetunes as usize,
            finetunes: Arc::new(tokio::sync::Semaphore::new(
                config.registry.max_finetunes.max(1) as usize,
            )),
            backends,
        };
        tasks.push(tokio::spawn(admin::serve(
            listener, state, admin_tls, watcher,
        )));

        tracing::info!(%quic_addr, %admin_addr, mqtt = %mqtt, embedded_broker, "coordinator started");
        Ok(CoordinatorHandle {
            quic_addr,
            admin_addr,
            admin_tls: config.admin.tls().is_some(),
            mqtt,
            embedded_broker,
            mqtt_router,
            admin_token,
            new_admin_token,
            fleet_config: trust.fleet_config,
            dev_agent_config: trust.dev_agent_config,
            data_dir,
            shutdown,
            tasks,
            workers,
            db,
        })
    }
}

impl CoordinatorHandle {
    /// Stops serving, waits for the tasks and workers, and flushes and closes the registry, so
    /// the data folder can be opened again at once. (The embedded broker's thread cannot be
    /// stopped; it ends with the process.)
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
        if let Err(e) = self.db.flush_async().await {
            tracing::error!(error = %e, "could not flush the registry");
        }
    }
}

/// Opens the registry database. A coordinator stopped a moment ago may still be letting go of
/// its lock (sled's background flusher ends after the last handle is dropped): a lock held is
/// tried again for up to 2 s, then reported (another coordinator on the same data).
async fn open_database(path: &Path) -> Result<sled::Db, CoordinatorError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::open(path) {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, CoordinatorError> {
    std::net::UdpSocket::bind(addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => CoordinatorError::AddressInUse {
            what: "the QUIC service",
            addr,
            hint: " (is another coordinator running? set [quic] listen to another address)",
        },
        _ => CoordinatorError::Network(format!("QUIC on {addr}: {e}")),
    })
}

/// Reads the admin token, making one (32 random bytes, hex, mode 0600) on first start.
fn admin_token(data_dir: &Path) -> Result<(String, bool), CoordinatorError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let io = |source| CoordinatorError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok((token.trim().to_owned(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| CoordinatorError::Fleet("the system random generator failed".into()))?;
    let token = outpost_shared::hex::encode(&raw);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&path).map_err(io)?;
    std::io::Write::write_all(&mut file, token.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok((token, true))
}
