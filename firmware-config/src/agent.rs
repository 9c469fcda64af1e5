//! `agent.toml`: who the device is, whom it trusts, where its coordinators and broker are, and
//! what it may spend.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use outpost_shared::PublicKey;
use serde::{Deserialize, Serialize};

use crate::diagnostic::{ConfigErrors, Source};
use crate::profile::{DeviceClass, Profile, ProfileOverrides};
use crate::types::{DeviceId, HostPort};
use crate::{FileKind, check_file, load_toml};

/// The agent's configuration. Relative paths are relative to the config file's folder and are
/// made absolute by [`AgentConfig::load`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// What runs local models: `auto` (the GPU when it has a hardware adapter and covers the
    /// model, else tract on the CPU), `gpu` (any adapter, a CPU-emulated one included), `cpu`.
    #[serde(default)]
    pub engine: EngineChoice,
    /// How the GPU engine holds activations: `f32` (the default) or `f16` where the adapter has
    /// `shader-f16` (half the memory traffic; each stored value rounded to 11 significant bits,
    /// the parity table's `HALF` tolerance), f32 where it has not.
    #[serde(default)]
    pub gpu_activations: GpuActivations,
    /// The ONNX Runtime library (`libonnxruntime.so`, 1.17 or newer) that runs the models the CPU
    /// runs, in place of tract (faster on transformer encoders); tract where it cannot load, or
    /// where it refuses a model (the model's status says why). Unset: tract.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnxruntime_library: Option<PathBuf>,
    /// The device's identity.
    pub device: DeviceSection,
    /// What the device trusts.
    pub fleet: FleetTrust,
    /// The coordinators to reach.
    pub coordinator: CoordinatorEndpoints,
    /// The MQTT broker.
    #[serde(default)]
    pub mqtt: MqttBroker,
    /// The local API.
    #[serde(default)]
    pub api: ApiSection,
    /// Local storage.
    #[serde(default)]
    pub storage: AgentStorage,
    /// Which models to keep in sync.
    #[serde(default)]
    pub sync: SyncSection,
    /// Overrides of the device class's profile.
    #[serde(default)]
    pub profile: ProfileOverrides,
}

/// `engine`: what runs local models.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// The GPU when a hardware adapter exists (not lavapipe or another CPU emulation, which is
    /// slower than tract) and the device profile allows it; per model, when its ops are covered.
    #[default]
    Auto,
    /// The GPU on any adapter, a software one included; the agent does not start without one.
    Gpu,
    /// tract on the CPU only.
    Cpu,
}

/// `gpu_activations`: the element type of the GPU engine's activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuActivations {
    #[default]
    F32,
    F16,
}

/// `[device]`: the device's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// The device id; must match the one in the certificate.
    pub id: DeviceId,
    /// The device class whose profile applies.
    #[serde(default)]
    pub class: DeviceClass,
    /// The device certificate (PEM), issued by the fleet CA.
    pub certificate: PathBuf,
    /// The device's private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// `[fleet]`: the trust anchors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetTrust {
    /// The fleet's name.
    pub name: String,
    /// The fleet CA certificate (PEM) that coordinators' certificates chain to.
    pub ca: PathBuf,
    /// The ed25519 public keys (hex) that sign manifests; more than one while keys rotate.
    pub manifest_keys: Vec<PublicKey>,
}

/// `[coordinator]`: where offload and chunk requests go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorEndpoints {
    /// QUIC addresses, tried in this order (failover).
    pub addresses: Vec<HostPort>,
    /// How long an offloaded inference may take, in seconds; the other requests' deadlines
    /// follow from it (a hello a sixth, 1 to 5 s; a batch of chunks four times). A coordinator
    /// that lets a request pass its deadline is left for the next one in `addresses`.
    #[serde(default = "default_request_timeout_s")]
    pub request_timeout_s: u32,
}

impl CoordinatorEndpoints {
    /// [`CoordinatorEndpoints::request_timeout_s`], at least one second.
    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.request_timeout_s.max(1)))
    }
}

fn default_request_timeout_s() -> u32 {
    30
}

/// `[mqtt]`: the broker carrying manifests and status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttBroker {
    /// The broker's address. The connection is always TLS, with this device's certificate.
    #[serde(default = "default_broker")]
    pub broker: HostPort,
    /// The CA certificate (PEM) the broker's certificate must chain to, for an operator's own
    /// broker whose certificate the fleet CA did not issue; default `fleet.ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// More nodes of the same broker cluster (same certificate rules), tried in turn, after
    /// `broker`, whenever the one in use cannot be reached: a node going down leaves no device
    /// without its broker. Spread devices over the nodes by giving each its own `broker`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<HostPort>,
    /// Whether reconnect delays are jittered (default true), so a fleet that lost its broker
    /// at once does not come back in lockstep. Off only to measure what the jitter does
    /// (`outpost sim --scenario broker-restart`).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub reconnect_jitter: bool,
}

impl Default for MqttBroker {
    fn default() -> Self {
        Self {
            broker: default_broker(),
            ca: None,
            fallbacks: Vec::new(),
            reconnect_jitter: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

impl MqttBroker {
    /// The brokers in the order they are tried: `broker`, then `fallbacks`.
    pub fn brokers(&self) -> impl Iterator<Item = &HostPort> {
        std::iter::once(&self.broker).chain(&self.fallbacks)
    }
}

fn default_broker() -> HostPort {
    HostPort {
        host: "127.0.0.1".to_owned(),
        port: 1883,
    }
}

/// `[api]`: the local Open Inference Protocol API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Where the API listens.
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// Web origins (`scheme://host[:port]`) whose pages may call the API; requests from any
    /// other page are refused. Apps that are not web pages send no origin and need no entry.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            listen: default_api_listen(),
            allowed_origins: Vec::new(),
        }
    }
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// `[storage]`: where the agent keeps its database and model chunks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStorage {
    /// The data folder; default `outpost-data/agent-{device id}` in the working directory.
    pub data_dir: Option<PathBuf>,
}

/// `[sync]`: which models the agent follows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    /// Model names to follow; empty follows every model the fleet publishes.
    #[serde(default)]
    pub models: Vec<String>,
    /// The longest wait between tries of a failed install, seconds (the first waits 1 s, or
    /// this if less; each failure doubles it, jittered).
    #[serde(default = "default_install_retry_max_s")]
    pub install_retry_max_s: u64,
    /// How often the agent also asks its coordinator for the current releases over QUIC,
    /// seconds (jittered by half either way; and at start and after every MQTT reconnect), so a
    /// release hidden from the broker, or a broker that is down, still reaches the device.
    #[serde(default = "default_release_poll_s")]
    pub release_poll_s: u64,
    /// How often, at most, the status is published again for the models' recent service
    /// (calls, errors, latency, offload share over the last minute), seconds (at least 1): calls
    /// are coalesced, never published one by one. Rollouts gated on health read it.
    #[serde(default = "default_health_interval_s")]
    pub health_interval_s: u64,
}

impl Default for SyncSection {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            install_retry_max_s: default_install_retry_max_s(),
            release_poll_s: default_release_poll_s(),
            health_interval_s: default_health_interval_s(),
        }
    }
}

impl SyncSection {
    /// [`SyncSection::health_interval_s`], at least one second.
    pub fn health_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.health_interval_s.max(1))
    }
}

const fn default_health_interval_s() -> u64 {
    30
}

const fn default_release_poll_s() -> u64 {
    300
}

const fn default_install_retry_max_s() -> u64 {
    300
}

impl AgentConfig {
    /// Reads, checks and resolves an agent config: TOML syntax, keys, values, and that every
    /// file it names exists and holds what it should. All problems are reported together.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let (mut config, text) = load_toml::<Self>(path)?;
        let source = Source {
            file: path,
            text: &text,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        let mut errors = Vec::new();
        for (key, message) in config.problems() {
            errors.push(source.key_error(&key, message));
        }
        for (key, file, kind) in [
            (
                "device.certificate",
                config.device.certificate.as_path(),
                FileKind::Certificate,
            ),
            (
                "device.key",
                config.device.key.as_path(),
                FileKind::PrivateKey,
            ),
            ("fleet.ca", config.fleet.ca.as_path(), FileKind::Certificate),
            ("mqtt.ca", config.broker_ca(), FileKind::Certificate),
        ] {
            if let Err(message) = check_file(file, kind) {
                errors.push(source.key_error(key, message));
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Parses an agent config from text, without touching the files it names (for tests and
    /// tools that build configs in memory).
    pub fn from_toml(file: &Path, text: &str) -> Result<Self, ConfigErrors> {
        let source = Source { file, text };
        let config: Self = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
        let errors: Vec<_> = config
            .problems()
            .into_iter()
            .map(|(k, m)| source.key_error(&k, m))
            .collect();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The effective profile: the class's defaults with `[profile]` applied.
    pub fn profile(&self) -> Profile {
        self.profile.apply(self.device.class.profile())
    }

    /// The CA the MQTT broker's certificate must chain to: `mqtt.ca`, or the fleet CA.
    pub fn broker_ca(&self) -> &Path {
        self.mqtt.ca.as_deref().unwrap_or(&self.fleet.ca)
    }

    /// The data folder: `storage.data_dir`, or `outpost-data/agent-{id}`.
    pub fn data_dir(&self) -> PathBuf {
        self.storage.data_dir.clone().unwrap_or_else(|| {
            PathBuf::from("outpost-data").join(format!("agent-{}", self.device.id))
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.device.certificate,
            &mut self.device.key,
            &mut self.fleet.ca,
        ] {
            *p = base.join(&*p);
        }
        if let Some(dir) = &mut self.storage.data_dir {
            *dir = base.join(&*dir);
        }
        if let Some(ca) = &mut self.mqtt.ca {
            *ca = base.join(&*ca);
        }
        if let Some(library) = &mut self.onnxruntime_library {
            *library = base.join(&*library);
        }
    }

    fn problems(&self) -> Vec<(String, String)> {
        let mut problems: Vec<(String, String)> = self
            .profile
            .problems()
            .into_iter()
            .map(|(k, m)| (k.to_owned(), m))
            .collect();
        if self.fleet.manifest_keys.is_empty() {
            problems.push((
                "fleet.manifest_keys".into(),
                "needs at least one key".into(),
            ));
        }
        if self.coordinator.addresses.is_empty() {
            problems.push((
                "coordinator.addresses".into(),
                "needs at least one HOST:PORT".into(),
            ));
        }
        if self.sync.release_poll_s == 0 {
            problems.push(("sync.release_poll_s".into(), "must be at least 1".into()));
        }
        if self.sync.install_retry_max_s == 0 {
            problems.push((
                "sync.install_retry_max_s".into(),
                "must be at least 1".into(),
            ));
        }
        for origin in &self.api.allowed_origins {
            let shape_ok = origin.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty() && !rest.is_empty() && !rest.contains('/')
            });
            if !shape_ok {
                problems.push((
                    "api.allowed_origins".into(),
                    format!("{origin:?} is not an origin (scheme://host[:port], no path)"),
                ));
            }
        }
        for model in &self.sync.models {
            if let Err(e) =
                outpost_shared::topic::validate_name(outpost_shared::topic::NameKind::Model, model)
            {
                problems.push(("sync.models".into(), e.to_string()));
            }
        }
        problems
    }
}
