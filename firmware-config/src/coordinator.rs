//! `coordinator.toml`: the coordinator's fleet material, listeners, broker and limits. With no
//! file at all the defaults apply and the coordinator runs in dev mode.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::diagnostic::{ConfigErrors, Source};
use crate::types::HostPort;
use crate::{FileKind, check_file, load_toml};

mod gateway;
pub use gateway::{BackendEncoding, BackendSection, GatewaySection};
mod replicas;
pub use replicas::{SharedStoreLocation, SharedStoreSection};

/// The coordinator's configuration. Relative paths are relative to the config file's folder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// The fleet's trust material; absent means dev mode (a throwaway fleet in the data folder).
    pub fleet: Option<FleetMaterial>,
    /// Local storage.
    #[serde(default)]
    pub storage: CoordinatorStorage,
    /// The QUIC listener for agents.
    #[serde(default)]
    pub quic: QuicSection,
    /// The admin HTTP API.
    #[serde(default)]
    pub admin: AdminSection,
    /// MQTT: the embedded broker, or an external one.
    #[serde(default)]
    pub mqtt: CoordinatorMqtt,
    /// The model registry.
    #[serde(default)]
    pub registry: RegistrySection,
    /// Offloaded inference.
    #[serde(default)]
    pub inference: InferenceSection,
    /// Rollouts gated on device health: the defaults of `push --canary`.
    #[serde(default)]
    pub rollout: RolloutSection,
    /// Open Inference Protocol servers that run some models' offloaded calls (`[[backend]]`).
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendSection>,
    /// Rate limits on offloaded calls.
    #[serde(default)]
    pub gateway: GatewaySection,
}

/// `[rollout]`: how a gated rollout (`push --canary P`) is judged, unless the push says
/// otherwise. The candidate cohort's health (from the devices' signed statuses) is compared with
/// the stable cohort's; past a limit the rollout is aborted, and after `bake_s` within them it
/// widens to the next of `steps`, then is promoted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSection {
    /// How often the coordinator looks at gated rollouts, seconds.
    #[serde(default = "default_check_interval_s")]
    pub check_interval_s: u64,
    /// How long each step runs within the limits before the next, seconds.
    #[serde(default = "default_bake_s")]
    pub bake_s: u64,
    /// The candidate cohort's largest error rate (errors per call, 0.01 is 1 %).
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// The largest rise of the candidate's p99 latency over the stable cohort's (0.2 is 20 %).
    #[serde(default = "default_max_p99_regression")]
    pub max_p99_regression: f64,
    /// The largest rise of the candidate's offloaded share of rows over the stable cohort's, in
    /// points of share (0.1 is 10 points): a less confident cascade model sends more to the cloud.
    #[serde(default = "default_max_offload_increase")]
    pub max_offload_increase: f64,
    /// Calls each cohort must have served in the window before a step is judged.
    #[serde(default = "default_min_calls")]
    pub min_calls: u64,
    /// The shares the candidate widens to after the canary, in order (then it is promoted).
    #[serde(default = "default_steps")]
    pub steps: Vec<u8>,
}

impl Default for RolloutSection {
    fn default() -> Self {
        Self {
            check_interval_s: default_check_interval_s(),
            bake_s: default_bake_s(),
            max_error_rate: default_max_error_rate(),
            max_p99_regression: default_max_p99_regression(),
            max_offload_increase: default_max_offload_increase(),
            min_calls: default_min_calls(),
            steps: default_steps(),
        }
    }
}

impl RolloutSection {
    /// [`RolloutSection::check_interval_s`], at least one second.
    pub fn check_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.check_interval_s.max(1))
    }

    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("rollout.max_error_rate", self.max_error_rate),
            ("rollout.max_p99_regression", self.max_p99_regression),
            ("rollout.max_offload_increase", self.max_offload_increase),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                problems.push((key, "must be a finite number of at least 0".to_owned()));
            }
        }
        if self.steps.iter().any(|p| !(1..=99).contains(p))
            || self.steps.windows(2).any(|w| w[0] >= w[1])
        {
            problems.push((
                "rollout.steps",
                "must be rising shares from 1 to 99 (after the last the candidate is promoted)"
                    .to_owned(),
            ));
        }
        problems
    }
}

const fn default_check_interval_s() -> u64 {
    5
}

const fn default_bake_s() -> u64 {
    300
}

const fn default_max_error_rate() -> f64 {
    0.01
}

const fn default_max_p99_regression() -> f64 {
    0.2
}

const fn default_max_offload_increase() -> f64 {
    0.1
}

const fn default_min_calls() -> u64 {
    50
}

fn default_steps() -> Vec<u8> {
    vec![50]
}

/// `[fleet]`: files made by `firmware-config provision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetMaterial {
    /// The fleet's name.
    pub name: String,
    /// The fleet CA certificate (PEM): device certificates must chain to it.
    pub ca: PathBuf,
    /// The fleet CA's private key, needed only to enroll new devices.
    pub ca_key: Option<PathBuf>,
    /// The coordinator's certificate (PEM).
    pub certificate: PathBuf,
    /// The coordinator's private key (PEM).
    pub key: PathBuf,
    /// The ed25519 manifest-signing key (PKCS#8 PEM).
    pub signing_key: PathBuf,
}

/// `[storage]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorStorage {
    /// The data folder.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

impl Default for CoordinatorStorage {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("outpost-data").join("coordinator")
}

/// `[quic]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicSection {
    /// Where agents connect (port 0 picks a free port).
    #[serde(default = "default_quic_listen")]
    pub listen: SocketAddr,
    /// How long a stream may take to send its request, in seconds; a stalled stream is answered
    /// with an error and closed, freeing its slot.
    #[serde(default = "default_request_timeout_s")]
    pub request_timeout_s: u32,
}

impl Default for QuicSection {
    fn default() -> Self {
        Self {
            listen: default_quic_listen(),
            request_timeout_s: default_request_timeout_s(),
        }
    }
}

impl QuicSection {
    /// [`QuicSection::request_timeout_s`], at least one second.
    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.request_timeout_s.max(1)))
    }
}

fn default_request_timeout_s() -> u32 {
    30
}

fn default_quic_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4433))
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Where the admin API listens.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Open admin connections at once (past it, new ones wait to be accepted).
    #[serde(default = "default_admin_connections")]
    pub max_connections: u32,
    /// The admin API's certificate chain (PEM, leaf first). With `tls_key` the admin API speaks
    /// HTTPS only (TLS 1.3); needed when `listen` is beyond loopback, where the bearer token
    /// would otherwise cross the network in the clear. The coordinator's own certificate will
    /// do: it names the coordinator's hosts, and clients check it against the fleet CA.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PKCS#8 PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            max_connections: default_admin_connections(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl AdminSection {
    /// The admin API's certificate and key, when it speaks HTTPS.
    pub fn tls(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }

    /// Why the admin API may not listen as configured: beyond loopback without TLS, or half a
    /// TLS identity. The key to set, and the message.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => Some((
                "admin.tls_key",
                "admin.tls_cert is set, so admin.tls_key (its private key) must be too".to_owned(),
            )),
            (None, Some(_)) => Some((
                "admin.tls_cert",
                "admin.tls_key is set, so admin.tls_cert (its certificate) must be too".to_owned(),
            )),
            (None, None) if !self.listen.ip().is_loopback() => Some((
                "admin.tls_cert",
                format!(
                    "admin.listen = {} is beyond loopback, where the admin token would cross the network in the clear: set admin.tls_cert and admin.tls_key (the coordinator's certificate and key will do), or keep admin.listen on loopback (127.0.0.1:7070) and reach it through SSH",
                    self.listen
                ),
            )),
            _ => None,
        }
    }
}

const fn default_admin_connections() -> u32 {
    64
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}

/// `[mqtt]`: either the embedded broker's `listen` address, or an `external` broker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorMqtt {
    /// Where the embedded broker listens (default 127.0.0.1:1883).
    pub listen: Option<SocketAddr>,
    /// Use this broker instead of the embedded one.
    pub external: Option<HostPort>,
    /// Devices the fleet view holds (default [`CoordinatorMqtt::DEFAULT_MAX_DEVICES`]); the
    /// status of a device past it is not kept (a warning says so), so a flood of invented
    /// device ids cannot grow the coordinator's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_devices: Option<u32>,
    /// For an external broker: the CA certificate (PEM) its certificate must chain to, when the
    /// fleet CA did not issue it; default `fleet.ca`. The connection is always TLS, with the
    /// coordinator's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Client connections the embedded broker holds at once (default
    /// [`CoordinatorMqtt::DEFAULT_MAX_CONNECTIONS`]); past it a new connection is closed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// With `external`: more nodes of the same broker cluster, tried in turn after it whenever
    /// the one in use cannot be reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<HostPort>,
}

impl CoordinatorMqtt {
    /// The fleet view's default bound: about 100 MiB of device status at ~1 KiB each.
    pub const DEFAULT_MAX_DEVICES: u32 = 100_000;

    /// The embedded broker's default bound on connections.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

    /// The embedded broker's bound on connections.
    pub fn max_connections(&self) -> usize {
        self.max_connections
            .unwrap_or(Self::DEFAULT_MAX_CONNECTIONS)
            .max(1) as usize
    }

    /// The fleet view's bound.
    pub fn max_devices(&self) -> usize {
        self.max_devices.unwrap_or(Self::DEFAULT_MAX_DEVICES) as usize
    }

    /// The embedded broker's address, or `None` when an external broker is configured.
    pub fn embedded_listen(&self) -> Option<SocketAddr> {
        match self.external {
            Some(_) => None,
            None => Some(
                self.listen
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1883))),
            ),
        }
    }
}

/// `[registry]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    /// How many versions of each model to keep.
    #[serde(default = "default_keep_versions")]
    pub keep_versions: u32,
    /// The largest model upload accepted, MiB.
    #[serde(default = "default_max_upload_mb")]
    pub max_upload_mb: u64,
    /// The accuracy gate of int8 edge variants judges each output by its kind. Scores: the
    /// largest absolute difference of any element from the fp32 model's.
    #[serde(default = "default_int8_max_abs_error")]
    pub int8_max_abs_error: f64,
    /// Classifiers: the largest absolute difference of any class probability.
    #[serde(default = "default_int8_max_prob_error")]
    pub int8_max_prob_error: f64,
    /// Embeddings: the smallest cosine similarity of any vector to the fp32 model's.
    #[serde(default = "default_int8_min_cosine")]
    pub int8_min_cosine: f64,
    /// Classifiers: the smallest share (0–1) of rows whose top-1 class agrees with the fp32
    /// model's.
    #[serde(default = "default_int8_min_top1_agreement")]
    pub int8_min_top1_agreement: f64,
    /// When the int8 variant misses the tolerance, its most sensitive weights are kept in fp32
    /// one by one until it passes; past this share (0–1) of the quantisable weights (by element
    /// count) the push is refused instead.
    #[serde(default = "default_int8_max_kept_share")]
    pub int8_max_kept_share: f64,
    /// How long a signed release is valid, seconds (default 7 days). Agents refuse an expired
    /// release; the coordinator signs every current release again (a new release number, the
    /// same content) once half of this has passed.
    #[serde(default = "default_release_ttl_s")]
    pub release_ttl_s: u64,
    /// Fine-tunes that may run at once; one more is refused (429) until one ends. Each holds its
    /// upload (up to `max_upload_mb`), the examples' features and a tract plan of the model.
    #[serde(default = "default_max_finetunes")]
    pub max_finetunes: u32,
    /// Chunks and releases shared with other coordinator replicas; none: this coordinator's
    /// own data folder only.
    #[serde(default)]
    pub shared: Option<SharedStoreSection>,
}

fn default_max_finetunes() -> u32 {
    1
}

fn default_release_ttl_s() -> u64 {
    7 * 24 * 3600
}

impl Default for RegistrySection {
    fn default() -> Self {
        Self {
            release_ttl_s: default_release_ttl_s(),
            max_finetunes: default_max_finetunes(),
            keep_versions: default_keep_versions(),
            max_upload_mb: default_max_upload_mb(),
            int8_max_abs_error: default_int8_max_abs_error(),
            int8_max_prob_error: default_int8_max_prob_error(),
            int8_min_cosine: default_int8_min_cosine(),
            int8_max_kept_share: default_int8_max_kept_share(),
            int8_min_top1_agreement: default_int8_min_top1_agreement(),
            shared: None,
        }
    }
}

fn default_int8_max_abs_error() -> f64 {
    0.05
}

fn default_int8_max_prob_error() -> f64 {
    0.05
}

/// Retrieval keeps its ranking well above this; a standard sentence encoder's int8 variant
/// measures about 0.998.
fn default_int8_min_cosine() -> f64 {
    0.99
}

fn default_int8_max_kept_share() -> f64 {
    0.5
}

/// What is wrong with `value` for the int8 gate's tolerance `key` (`int8_max_abs_error` and
/// the others of `[registry]`, which a push may override); `None` when it is fine, or the key
/// is not one of them.
pub fn int8_tolerance_problem(key: &str, value: f64) -> Option<&'static str> {
    let ok = match key {
        "int8_max_abs_error" | "int8_max_prob_error" => value >= 0.0 && value.is_finite(),
        "int8_min_cosine" => (-1.0..=1.0).contains(&value),
        "int8_min_top1_agreement" | "int8_max_kept_share" => (0.0..=1.0).contains(&value),
        _ => true,
    };
    match key {
        _ if ok => None,
        "int8_min_cosine" => Some("must be between -1 and 1"),
        "int8_max_abs_error" | "int8_max_prob_error" => {
            Some("must be a finite number of at least 0")
        }
        _ => Some("must be a share between 0 and 1 (0.95 is 95 %)"),
    }
}

fn default_int8_min_top1_agreement() -> f64 {
    0.9
}

fn default_keep_versions() -> u32 {
    5
}

fn default_max_upload_mb() -> u64 {
    1024
}

/// `[inference]`: the bounded worker pool for offloaded calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceSection {
    /// Worker threads running models.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// Requests that may wait for a worker; more are answered `Busy`.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
    /// Working memory for running offloaded calls, MiB, shared by the workers: each call may
    /// take `working_memory_mb / workers`; a larger one runs in row parts that fit, and one
    /// whose single row does not fit is refused naming the figures.
    #[serde(default = "default_working_memory_mb")]
    pub working_memory_mb: u64,
    /// Calls one device may have queued or running in the pool at once; past it that device's
    /// calls are answered `Busy`, so no device can take the pool (and its memory) from the
    /// fleet.
    #[serde(default = "default_device_calls")]
    pub device_calls: u32,
}

impl Default for InferenceSection {
    fn default() -> Self {
        Self {
            workers: default_workers(),
            queue_depth: default_queue_depth(),
            working_memory_mb: default_working_memory_mb(),
            device_calls: default_device_calls(),
        }
    }
}

impl InferenceSection {
    /// The most working memory one offloaded call may take, bytes.
    pub fn call_memory_bytes(&self) -> u64 {
        (self.working_memory_mb.saturating_mul(1 << 20) / u64::from(self.workers.max(1))).max(1)
    }
}

fn default_working_memory_mb() -> u64 {
    2048
}

fn default_device_calls() -> u32 {
    8
}

fn default_workers() -> u32 {
    2
}

fn default_queue_depth() -> u32 {
    64
}

impl CoordinatorConfig {
    /// Reads, checks and resolves a coordinator config, and checks the files it names.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let (mut config, text) = load_toml::<Self>(path)?;
        let source = Source {
            file: path,
            text: &text,
        };
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        let mut errors: Vec<_> = config
            .problems()
            .into_iter()
            .map(|(k, m)| source.key_error(k, m))
            .collect();
        if let Some(fleet) = &config.fleet {
            let mut files = vec![
                ("fleet.ca", &fleet.ca, FileKind::Certificate),
                (
                    "fleet.certificate",
                    &fleet.certificate,
                    FileKind::Certificate,
                ),
                ("fleet.key", &fleet.key, FileKind::PrivateKey),
                (
                    "fleet.signing_key",
                    &fleet.signing_key,
                    FileKind::PrivateKey,
                ),
            ];
            if let Some(ca_key) = &fleet.ca_key {
                files.push(("fleet.ca_key", ca_key, FileKind::PrivateKey));
            }
            if let Some(ca) = &config.mqtt.ca {
                files.push(("mqtt.ca", ca, FileKind::Certificate));
            }
            if let (Some(cert), Some(key)) = (&config.admin.tls_cert, &config.admin.tls_key) {
                files.push(("admin.tls_cert", cert, FileKind::Certificate));
                files.push(("admin.tls_key", key, FileKind::PrivateKey));
            }
            for (key, file, kind) in files {
                if let Err(message) = check_file(file, kind) {
                    errors.push(source.key_error(key, message));
                }
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Parses a coordinator config from text, without touching the files it names.
    pub fn from_toml(file: &Path, text: &str) -> Result<Self, ConfigErrors> {
        let source = Source { file, text };
        let config: Self = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
        let errors: Vec<_> = config
            .problems()
            .into_iter()
            .map(|(k, m)| source.key_error(k, m))
            .collect();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Whether the coordinator runs with a throwaway dev fleet.
    pub fn is_dev_mode(&self) -> bool {
        self.fleet.is_none()
    }

    fn resolve_paths(&mut self, base: &Path) {
        if let Some(f) = &mut self.fleet {
            for p in [
                &mut f.ca,
                &mut f.certificate,
                &mut f.key,
                &mut f.signing_key,
            ] {
                *p = base.join(&*p);
            }
            if let Some(p) = &mut f.ca_key {
                *p = base.join(&*p);
            }
        }
        self.storage.data_dir = base.join(&self.storage.data_dir);
        for p in [
            &mut self.mqtt.ca,
            &mut self.admin.tls_cert,
            &mut self.admin.tls_key,
        ]
        .into_iter()
        .flatten()
        {
            *p = base.join(&*p);
        }
    }

    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.mqtt.listen.is_some() && self.mqtt.external.is_some() {
            problems.push((
                "mqtt.external",
                "set either mqtt.listen (embedded broker) or mqtt.external, not both".to_owned(),
            ));
        }
        if !self.mqtt.fallbacks.is_empty() && self.mqtt.external.is_none() {
            problems.push((
                "mqtt.fallbacks",
                "fallback brokers need mqtt.external (the embedded broker is one machine)"
                    .to_owned(),
            ));
        }
        if self.registry.release_ttl_s < 2 {
            problems.push((
                "registry.release_ttl_s",
                "must be at least 2 seconds (a release is signed again at half of it)".to_owned(),
            ));
        }
        if self.registry.keep_versions < 2 {
            problems.push((
                "registry.keep_versions",
                "must be at least 2, so a rollback target is kept".to_owned(),
            ));
        }
        problems.extend(self.admin.problem());
        problems.extend(self.rollout.problems());
        if self.admin.max_connections == 0 {
            problems.push(("admin.max_connections", "must be at least 1".to_owned()));
        }
        if self.registry.max_finetunes == 0 {
            problems.push(("registry.max_finetunes", "must be at least 1".to_owned()));
        }
        if self.registry.max_upload_mb == 0 {
            problems.push(("registry.max_upload_mb", "must be at least 1".to_owned()));
        }
        let r = &self.registry;
        for (key, full, value) in [
            (
                "int8_max_abs_error",
                "registry.int8_max_abs_error",
                r.int8_max_abs_error,
            ),
            (
                "int8_max_prob_error",
                "registry.int8_max_prob_error",
                r.int8_max_prob_error,
            ),
            (
                "int8_min_cosine",
                "registry.int8_min_cosine",
                r.int8_min_cosine,
            ),
            (
                "int8_min_top1_agreement",
                "registry.int8_min_top1_agreement",
                r.int8_min_top1_agreement,
            ),
            (
                "int8_max_kept_share",
                "registry.int8_max_kept_share",
                r.int8_max_kept_share,
            ),
        ] {
            if let Some(problem) = int8_tolerance_problem(key, value) {
                problems.push((full, problem.to_owned()));
            }
        }
        if self.inference.workers == 0 {
            problems.push(("inference.workers", "must be at least 1".to_owned()));
        }
        if self.inference.working_memory_mb == 0 {
            problems.push((
                "inference.working_memory_mb",
                "must be at least 1".to_owned(),
            ));
        }
        if self.inference.device_calls == 0 {
            problems.push(("inference.device_calls", "must be at least 1".to_owned()));
        }
        if self.inference.queue_depth == 0 {
            problems.push(("inference.queue_depth", "must be at least 1".to_owned()));
        }
        problems.extend(self.gateway.problems());
        if let Some(shared) = &self.registry.shared {
            problems.extend(
                shared
                    .problems()
                    .into_iter()
                    .map(|m| ("registry.shared", m)),
            );
        }
        for (i, backend) in self.backends.iter().enumerate() {
            problems.extend(backend.problems().into_iter().map(|m| ("backend", m)));
            if self.backends[..i].iter().any(|b| b.name == backend.name) {
                problems.push((
                    "backend",
                    format!("backend {:?} is defined twice", backend.name),
                ));
            }
        }
        problems
    }
}
