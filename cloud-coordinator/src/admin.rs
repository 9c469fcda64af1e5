//! The admin HTTP API (bearer token): push, rollback, model and fleet listings; plus the
//! unauthenticated Prometheus `/metrics`. It also owns the API's wire types: the server
//! serialises them here and [`AdminClient`](crate::AdminClient) deserialises the same ones.
//!
//! | route | what | answer (JSON) |
//! |---|---|---|
//! | `POST /v1/models/{name}?placement=&rollout=&max_batch=&quantize=&cloud_size=&samples_size=&dry_run=` | push (query: [`PushQuery`]; body: the model file, then the cloud model's `cloud_size` bytes, then the gate's sample file's `samples_size` bytes) | [`Published`]: 201, or 200 for a dry run |
//! | `POST /v1/models/{name}/rollback?to=V` | publish version V's content as a new version | [`Published`], 201 |
//! | `GET /v1/models` | models and versions | a list of [`ModelSummary`] |
//! | `GET /v1/fleet` | devices and their last status | a list of [`DeviceStatus`] |
//! | `GET /metrics` | Prometheus metrics | text |
//!
//! Every refusal is a 4xx or 5xx with an [`ErrorReply`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use outpost_runtime::serve::{BodyError, BodyLimits, ServeLimits, read_body};
use outpost_shared::Placement;
use tokio::sync::watch;

use crate::error::RegistryError;
use crate::metrics::Metrics;
use crate::mqtt::{Announcer, FleetView};
use crate::registry::{PushRequest, Quantize, Registry, RolloutAction};

pub use crate::registry::{Delta, EdgeReport, ModelSummary, Published, Stage, VariantSummary};
pub use outpost_shared::DeviceStatus;

/// The body of every refusal: what went wrong, in words.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorReply {
    /// The reason.
    pub error: String,
}

/// The query of a push, `POST /v1/models/{name}?…`: written by the client, read by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct PushQuery {
    /// Where inference runs (`placement`, default `local`).
    pub placement: Placement,
    /// The share of devices that get the version first (`rollout`, default 100).
    pub rollout_percent: u8,
    /// The most rows one request may carry (`max_batch`; default: no limit but the device's
    /// memory budget).
    pub max_batch: Option<u64>,
    /// The edge variant's weights (`quantize`: `none` or `int8`; default: int8 when devices run
    /// the model).
    pub quantize: Option<Quantize>,
    /// Measure and report only (`dry_run`).
    pub dry_run: bool,
    /// The cloud model's size at the end of the body, before the samples (`cloud_size`).
    pub cloud_size: Option<usize>,
    /// The gate's sample file's size at the very end of the body (`samples_size`).
    pub samples_size: Option<usize>,
    /// A rollout gated on health (`canary`: the candidate's first share, 1 to 99); the other
    /// keys override `[rollout]` for this rollout.
    pub canary: Option<u8>,
    /// How long each step must stay within the limits (`bake_s`).
    pub bake_s: Option<u64>,
    /// The candidate's largest error rate (`max_error_rate`, 0.01 is 1 %).
    pub max_error_rate: Option<f64>,
    /// The largest p99 rise over stable (`max_p99_regression`, 0.2 is 20 %).
    pub max_p99_regression: Option<f64>,
    /// The largest rise of the offloaded share over stable (`max_offload_increase`, in points
    /// of share: 0.1 is 10 points).
    pub max_offload_increase: Option<f64>,
}

impl Default for PushQuery {
    fn default() -> Self {
        PushQuery {
            placement: Placement::Local,
            rollout_percent: 100,
            max_batch: None,
            quantize: None,
            dry_run: false,
            cloud_size: None,
            samples_size: None,
            canary: None,
            bake_s: None,
            max_error_rate: None,
            max_p99_regression: None,
            max_offload_increase: None,
        }
    }
}

impl PushQuery {
    /// The query string, without the `?`.
    pub fn to_query(&self) -> String {
        let mut query = format!(
            "placement={}&dry_run={}",
            encode(&PlacementArg(self.placement.clone()).to_string()),
            self.dry_run
        );
        // A canary's share is its own key.
        if self.canary.is_none() {
            query.push_str(&format!("&rollout={}", self.rollout_percent));
        }
        if let Some(q) = self.quantize {
            query.push_str(match q {
                Quantize::None => "&quantize=none",
                Quantize::Int8 => "&quantize=int8",
            });
        }
        for (key, size) in [
            ("max_batch", self.max_batch),
            ("cloud_size", self.cloud_size.map(|n| n as u64)),
            ("samples_size", self.samples_size.map(|n| n as u64)),
        ] {
            if let Some(n) = size {
                query.push_str(&format!("&{key}={n}"));
            }
        }
        if let Some(p) = self.canary {
            query.push_str(&format!("&canary={p}"));
        }
        if let Some(s) = self.bake_s {
            query.push_str(&format!("&bake_s={s}"));
        }
        for (key, value) in [
            ("max_error_rate", self.max_error_rate),
            ("max_p99_regression", self.max_p99_regression),
            ("max_offload_increase", self.max_offload_increase),
        ] {
            if let Some(v) = value {
                query.push_str(&format!("&{key}={v}"));
            }
        }
        query
    }

    /// The health gate this push asks for: `[rollout]` (`defaults`) with this push's overrides,
    /// when it is a canary.
    pub fn gate(
        &self,
        defaults: &firmware_config::RolloutSection,
    ) -> Option<firmware_config::RolloutSection> {
        self.canary?;
        let mut gate = defaults.clone();
        if let Some(s) = self.bake_s {
            gate.bake_s = s;
        }
        if let Some(v) = self.max_error_rate {
            gate.max_error_rate = v;
        }
        if let Some(v) = self.max_p99_regression {
            gate.max_p99_regression = v;
        }
        if let Some(v) = self.max_offload_increase {
            gate.max_offload_increase = v;
        }
        // Steps past the canary's share only.
        let canary = self.canary.unwrap_or(0);
        gate.steps.retain(|p| *p > canary);
        Some(gate)
    }

    /// Reads a decoded query; the error names the key and what it must be.
    pub fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        let placement = query
            .get("placement")
            .map(String::as_str)
            .unwrap_or("local")
            .parse::<PlacementArg>()?
            .0;
        let rollout_percent = match query.get("rollout").map(|v| v.parse::<u8>()) {
            None => 100,
            Some(Ok(p)) if p <= 100 => p,
            Some(_) => return Err("rollout must be a percentage from 0 to 100".to_owned()),
        };
        let quantize = match query.get("quantize").map(String::as_str) {
            None => None,
            Some("none") => Some(Quantize::None),
            Some("int8") => Some(Quantize::Int8),
            Some(other) => return Err(format!("quantize must be none or int8, not {other:?}")),
        };
        let dry_run = match query.get("dry_run").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(format!("dry_run must be true or false, not {other:?}")),
        };
        let size = |key: &str| -> Result<Option<usize>, String> {
            query
                .get(key)
                .map(|text| {
                    text.parse()
                        .map_err(|_| format!("{key} must be a byte count, not {text:?}"))
                })
                .transpose()
        };
        let max_batch = match query.get("max_batch").map(|v| v.parse::<u64>()) {
            None => None,
            Some(Ok(n)) if n > 0 => Some(n),
            Some(_) => {
                return Err("max_batch must be a row count of at least 1".to_owned());
            }
        };
        let samples_size = size("samples_size")?;
        let cloud_size = size("cloud_size")?;
        let canary = match query.get("canary").map(|v| v.parse::<u8>()) {
            None => None,
            Some(Ok(p)) if (1..=99).contains(&p) => Some(p),
            Some(_) => return Err("canary must be a percentage from 1 to 99".to_owned()),
        };
        if canary.is_some() && query.contains_key("rollout") {
            return Err(
                "give either rollout (a share the operator moves) or canary (a share the health gate moves), not both"
                    .to_owned(),
            );
        }
        let bake_s = match query.get("bake_s").map(|v| v.parse::<u64>()) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(_)) => return Err("bake_s must be a number of seconds".to_owned()),
        };
        let share = |key: &str| -> Result<Option<f64>, String> {
            match query.get(key).map(|v| v.parse::<f64>()) {
                None => Ok(None),
                Some(Ok(v)) if v >= 0.0 && v.is_finite() => Ok(Some(v)),
                Some(_) => Err(format!(
                    "{key} must be a number of at least 0 (0.01 is 1 %)"
                )),
            }
        };
        let (max_error_rate, max_p99_regression, max_offload_increase) = (
            share("max_error_rate")?,
            share("max_p99_regression")?,
            share("max_offload_increase")?,
        );
        Ok(PushQuery {
            placement,
            rollout_percent: canary.unwrap_or(rollout_percent),
            max_batch,
            quantize,
            dry_run,
            cloud_size,
            samples_size,
            canary,
            bake_s,
            max_error_rate,
            max_p99_regression,
            max_offload_increase,
        })
    }
}

/// A revoked device, as `POST /v1/devices/{id}/revoke` and `GET /v1/revoked` answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revoked {
    /// The device id.
    pub device: String,
    /// When it was revoked (Unix seconds).
    pub revoked_at: u64,
    /// Whether this call revoked it (false: it was already).
    #[serde(default)]
    pub new: bool,
    /// What became of the production brokers' revocation files (`crl.pem`,
    /// `nats-users.conf`): signed again here, or what to run where the CA key is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_files: Option<String>,
}

/// What the admin API needs.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// The registry.
    pub registry: Arc<Registry>,
    /// Publishes manifests.
    pub announcer: Announcer,
    /// The fleet view.
    pub fleet: FleetView,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Revoked devices.
    pub revocations: Arc<crate::revocation::Revocations>,
    /// The production brokers' revocation files.
    pub broker_files: Arc<crate::revocation::BrokerFiles>,
    /// The bearer token.
    pub token: String,
    /// The largest upload, bytes.
    pub max_upload: usize,
    /// Open admin connections at once.
    pub max_connections: usize,
    /// The defaults of gated rollouts (`[rollout]`).
    pub rollout: firmware_config::RolloutSection,
}

type Reply = Response<Full<Bytes>>;

/// Serves the admin API until shutdown, over HTTPS when `tls` is given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    shutdown: watch::Receiver<bool>,
) {
    let limits = ServeLimits {
        max_connections: state.max_connections,
        ..ServeLimits::default()
    };
    let handler = move |req| {
        let state = state.clone();
        async move { route(req, &state).await }
    };
    match tls {
        Some(tls) => {
            outpost_runtime::serve::serve_https(listener, limits, tls, handler, shutdown).await;
        }
        None => outpost_runtime::serve::serve_http(listener, limits, handler, shutdown).await,
    }
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    reply
}

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    json(
        status,
        &ErrorReply {
            error: message.into(),
        },
    )
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Constant time in the token's length.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn route(req: Request<Incoming>, state: &AdminState) -> Reply {
    let path = req.uri().path().to_owned();
    if req.method() == Method::GET && path == "/metrics" {
        let mut reply = Response::new(Full::new(Bytes::from(state.metrics.render())));
        reply.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        return reply;
    }
    if !authorized(&req, &state.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer TOKEN)",
        );
    }
    let query = parse_query(req.uri().query().unwrap_or_default());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["v1", "models"]) => match state.registry.list() {
            Ok(models) => json(StatusCode::OK, &models),
            Err(e) => registry_error(e),
        },
        (Method::GET, ["v1", "fleet"]) => {
            let fleet = state
                .fleet
                .lock()
                .map(|f| f.values().map(|c| c.status.clone()).collect::<Vec<_>>())
                .unwrap_or_default();
            json(StatusCode::OK, &fleet)
        }
        (Method::POST, ["v1", "devices", device, "revoke"]) => {
            if let Err(e) = device.parse::<firmware_config::DeviceId>() {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("device id {device:?}: {e}"),
                );
            }
            let (revocations, files, id) = (
                state.revocations.clone(),
                state.broker_files.clone(),
                (*device).to_owned(),
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let revoked = tokio::task::spawn_blocking(move || {
                let new = revocations.revoke(&id, now)?;
                Ok::<_, crate::revocation::RevokeError>((new, files.revoke(&[id])))
            });
            match revoked.await {
                Ok(Ok((new, broker_files))) => {
                    if let Ok(mut fleet) = state.fleet.lock() {
                        fleet.remove(*device);
                    }
                    tracing::warn!(device, new, broker_files, "device revoked");
                    json(
                        StatusCode::OK,
                        &Revoked {
                            device: (*device).to_owned(),
                            revoked_at: now,
                            new,
                            broker_files: Some(broker_files),
                        },
                    )
                }
                Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (Method::GET, ["v1", "revoked"]) => {
            let list: Vec<Revoked> = state
                .revocations
                .list()
                .into_iter()
                .map(|(device, revoked_at)| Revoked {
                    device,
                    revoked_at,
                    new: false,
                    broker_files: None,
                })
                .collect();
            json(StatusCode::OK, &list)
        }
        (Method::POST, ["v1", "models", name]) => {
            push(req, (*name).to_owned(), &query, state).await
        }
        (Method::POST, ["v1", "models", name, "rollback"]) => {
            let Some(to) = query.get("to").and_then(|v| v.parse::<u64>().ok()) else {
                return error(StatusCode::BAD_REQUEST, "rollback needs ?to=VERSION");
            };
            let (registry, name) = (state.registry.clone(), (*name).to_owned());
            let result = tokio::task::spawn_blocking(move || registry.rollback(&name, to)).await;
            publish(result, state).await
        }
        (Method::POST, ["v1", "models", name, "rollout"]) => {
            let action = match (
                query.get("percent"),
                query.contains_key("promote"),
                query.contains_key("abort"),
            ) {
                (Some(p), false, false) => match p.parse::<u8>() {
                    Ok(p) => RolloutAction::Percent(p),
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("rollout percent {p:?} is not a number from 1 to 99"),
                        );
                    }
                },
                (None, true, false) => RolloutAction::Promote,
                (None, false, true) => RolloutAction::Abort,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "rollout needs one of ?percent=P, ?promote, ?abort",
                    );
                }
            };
            let (registry, name) = (state.registry.clone(), (*name).to_owned());
            let result = tokio::task::spawn_blocking(move || {
                registry.rollout(&name, action, "by the operator", None)
            })
            .await;
            publish(result, state).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route for {} {path}", req.method()),
        ),
    }
}

async fn push(
    req: Request<Incoming>,
    name: String,
    query: &HashMap<String, String>,
    state: &AdminState,
) -> Reply {
    // Read the upload before judging the options (see `read_body`).
    let body = match read_body(req.into_body(), &BodyLimits::up_to(state.max_upload)).await {
        Ok(b) => b,
        Err(BodyError::TooLarge { .. }) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the upload is larger than the limit of {} MiB (registry.max_upload_mb)",
                    state.max_upload >> 20
                ),
            );
        }
        Err(e @ BodyError::TooSlow { .. }) => {
            return error(StatusCode::REQUEST_TIMEOUT, e.to_string());
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("could not read the upload: {e}"),
            );
        }
    };
    let options = match PushQuery::parse(query) {
        Ok(o) => o,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // The body is the model, then the optional cloud model, then the optional sample file: each
    // optional part is cut from the end by its size.
    let mut body = body.to_vec();
    let mut take_tail = |key: &str, size: Option<usize>| -> Result<Option<Vec<u8>>, String> {
        let Some(n) = size else {
            return Ok(None);
        };
        if n == 0 || n >= body.len() {
            return Err(format!(
                "{key} {n} does not fit an upload of {} bytes (the model comes first)",
                body.len()
            ));
        }
        Ok(Some(body.split_off(body.len() - n)))
    };
    let samples = match take_tail("samples_size", options.samples_size) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let cloud_model = match take_tail("cloud_size", options.cloud_size) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let gate = options.gate(&state.rollout);
    let request = PushRequest {
        name,
        model: body,
        cloud_model,
        placement: options.placement,
        rollout_percent: options.rollout_percent,
        max_batch: options.max_batch,
        quantize: options.quantize,
        samples,
        dry_run: options.dry_run,
        gate,
    };
    let registry = state.registry.clone();
    let result = tokio::task::spawn_blocking(move || registry.push(request)).await;
    publish(result, state).await
}

async fn publish(
    result: Result<Result<crate::registry::Outcome, RegistryError>, tokio::task::JoinError>,
    state: &AdminState,
) -> Reply {
    match result {
        Ok(Ok((published, None))) => json(StatusCode::OK, &published),
        Ok(Ok((published, Some(signed)))) => {
            state.metrics.pushes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                model = published.model,
                version = published.version,
                release = published.release,
                "published"
            );
            crash_point!("admin.before_announce");
            if let Err(e) = state.announcer.announce(&published.model, signed).await {
                // Stored and signed; it is announced again on the next broker (re)connect.
                tracing::warn!(model = published.model, error = %e, "could not announce now");
            }
            crash_point!("admin.announced");
            json(StatusCode::CREATED, &published)
        }
        Ok(Err(e)) => registry_error(e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the push task failed: {e}"),
        ),
    }
}

fn registry_error(e: RegistryError) -> Reply {
    let status = match &e {
        RegistryError::BadRequest(_) => StatusCode::BAD_REQUEST,
        RegistryError::BadModel(_) => StatusCode::UNPROCESSABLE_ENTITY,
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// `local`, `cloud`, or `cascade:OUTPUT:THRESHOLD`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementArg(pub Placement);

impl std::str::FromStr for PlacementArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "placement {text:?} must be local, cloud or cascade:OUTPUT:THRESHOLD (e.g. cascade:intent_probs:0.7)"
            )
        };
        match text {
            "local" => Ok(PlacementArg(Placement::Local)),
            "cloud" => Ok(PlacementArg(Placement::Cloud)),
            _ => {
                let rest = text.strip_prefix("cascade:").ok_or_else(bad)?;
                let (output, threshold) = rest.rsplit_once(':').ok_or_else(bad)?;
                let threshold: f32 = threshold.parse().map_err(|_| bad())?;
                if output.is_empty() || !(0.0..=1.0).contains(&threshold) {
                    return Err(bad());
                }
                Ok(PlacementArg(Placement::Cascade {
                    output: output.to_owned(),
                    threshold,
                }))
            }
        }
    }
}

impl std::fmt::Display for PlacementArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Placement::Local => f.write_str("local"),
            Placement::Cloud => f.write_str("cloud"),
            Placement::Cascade { output, threshold } => write!(f, "cascade:{output}:{threshold}"),
        }
    }
}

/// `a=b&c=d`, with `%XX` and `+` decoded.
fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-encodes everything but `A-Z a-z 0-9 - _ .`, for a query value.
pub(crate) fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_parse_and_print() {
        for text in ["local", "cloud", "cascade:intent_probs:0.7"] {
            assert_eq!(text.parse::<PlacementArg>().unwrap().to_string(), text);
        }
        for bad in [
            "",
            "edge",
            "cascade:",
            "cascade:x",
            "cascade:x:2",
            "cascade::0.5",
        ] {
            assert!(bad.parse::<PlacementArg>().is_err(), "{bad}");
        }
    }

    #[test]
    fn push_queries_round_trip() {
        let query = PushQuery {
            placement: Placement::Cascade {
                output: "intent_probs".into(),
                threshold: 0.7,
            },
            rollout_percent: 10,
            max_batch: Some(64),
            quantize: Some(Quantize::None),
            dry_run: true,
            cloud_size: Some(5),
            samples_size: Some(3),
            ..PushQuery::default()
        };
        assert_eq!(
            PushQuery::parse(&parse_query(&query.to_query())).unwrap(),
            query
        );
        // A canary, with its gate's overrides, and the defaults it fills in.
        let canary = PushQuery {
            rollout_percent: 10,
            canary: Some(10),
            bake_s: Some(2),
            max_error_rate: Some(0.05),
            max_offload_increase: Some(0.25),
            ..PushQuery::default()
        };
        assert_eq!(
            PushQuery::parse(&parse_query(&canary.to_query())).unwrap(),
            canary
        );
        let gate = canary
            .gate(&firmware_config::RolloutSection::default())
            .unwrap();
        assert_eq!(
            (gate.bake_s, gate.max_error_rate, gate.max_offload_increase),
            (2, 0.05, 0.25)
        );
        assert_eq!(gate.max_p99_regression, 0.2);
        assert_eq!(gate.steps, vec![50]);
        assert!(
            PushQuery::default()
                .gate(&firmware_config::RolloutSection::default())
                .is_none()
        );
        for bad in [
            "canary=0",
            "canary=100",
            "canary=10&rollout=10",
            "max_error_rate=-1",
        ] {
            assert!(PushQuery::parse(&parse_query(bad)).is_err(), "{bad}");
        }
        for bad in ["max_batch=0", "max_batch=-1", "max_batch=many"] {
            let e = PushQuery::parse(&parse_query(bad)).unwrap_err();
            assert!(e.contains("max_batch must be a row count"), "{bad}: {e}");
        }
        assert_eq!(
            PushQuery::parse(&parse_query("")).unwrap(),
            PushQuery::default()
        );
    }

    #[test]
    fn queries_decode() {
        let q = parse_query("placement=cascade%3Aintent_probs%3A0.7&rollout=10&x=%zz&y=%4");
        assert_eq!(q["placement"], "cascade:intent_probs:0.7");
        assert_eq!(q["rollout"], "10");
        assert_eq!(q["x"], "%zz");
        assert_eq!(q["y"], "%4");
    }
}
