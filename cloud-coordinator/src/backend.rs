//! Open Inference Protocol v2 backends: HTTP servers (Triton, KServe, MLServer) that run some
//! models' offloaded calls instead of the worker pool.
//!
//! Each `[[backend]]` has replicas behind one pooled HTTP/1.1 client. A call goes to the less
//! loaded of two ready replicas picked at random (power of two choices on calls in flight), each
//! replica takes at most `max_concurrency` calls at once (past that on every replica: `Busy`),
//! and a call has `timeout_ms`. A call is retried on another replica only when nothing can have
//! reached the model: the connection failed, or the replica answered that it is not ready (503)
//! or lacks the model (404). After `circuit_failures` failed calls in a row a replica's circuit
//! opens for `circuit_open_ms`, then one trial call decides. A health task asks every replica's
//! `/v2/health/ready`, `GET /v2` (for the binary tensor extension) and each routed model's ready
//! endpoint every `health_interval_ms`, taking replicas out and back.
//!
//! Errors keep their kind: a backend's 400 (or 422) is the agent's 400, a backend that cannot
//! answer is `Unavailable` with the reason, which agents answer 503.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use firmware_config::{BackendEncoding, BackendSection};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use outpost_shared::oip::{self, InferResponse, RequestLimits};
use outpost_shared::{ErrorKind, Tensor};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

mod replica;
use replica::{InFlight, Replica, ReplicaState, is_server_error};

/// Models whose readiness one backend's health task follows (the routed models it has seen).
const MAX_WATCHED_MODELS: usize = 256;

/// The largest answer to a health or metadata request.
const HEALTH_BODY_LIMIT: usize = 64 * 1024;

/// The configured backends.
#[derive(Debug, Default)]
pub struct Backends {
    list: Vec<Arc<Backend>>,
}

impl Backends {
    /// The backends of `sections`, each with a health task on the current runtime that runs
    /// until `shutdown` turns true.
    pub fn start(
        sections: &[BackendSection],
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(Self, Vec<JoinHandle<()>>), String> {
        let mut list = Vec::with_capacity(sections.len());
        let mut tasks = Vec::with_capacity(sections.len());
        for section in sections {
            let backend = Arc::new(Backend::new(section)?);
            tasks.push(tokio::spawn(Arc::clone(&backend).watch(shutdown.clone())));
            list.push(backend);
        }
        Ok((Self { list }, tasks))
    }

    /// The backend named `name`.
    pub fn named(&self, name: &str) -> Option<&Arc<Backend>> {
        self.list.iter().find(|b| b.name == name)
    }

    /// The names of the backends, in config order.
    pub fn names(&self) -> Vec<&str> {
        self.list.iter().map(|b| b.name.as_str()).collect()
    }

    /// The backend that serves `model`: the one it was pushed to, else the first whose `models`
    /// list it.
    pub fn serving(&self, model: &str, pushed_to: Option<&str>) -> Option<&Arc<Backend>> {
        match pushed_to {
            Some(name) => self.named(name),
            None => self.list.iter().find(|b| b.section.lists(model)),
        }
    }
}

/// One backend: its replicas and the client that reaches them.
pub struct Backend {
    name: String,
    section: BackendSection,
    replicas: Vec<Replica>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Models routed here, whose readiness the health task follows.
    watched: Mutex<BTreeSet<String>>,
    /// The random state of the replica choice.
    seed: AtomicU64,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("replicas", &self.replicas.len())
            .finish_non_exhaustive()
    }
}

/// A backend's answer to one call: the outputs, or why there are none.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendError {
    /// Every ready replica has `max_concurrency` calls in flight.
    Busy,
    /// The call failed; the kind says whose fault it is.
    Failed(ErrorKind, String),
}

/// What one try on one replica gave.
enum Try {
    Answered(Vec<Tensor>),
    /// Nothing reached the model: try another replica (`busy`: it said it is full, 429).
    Elsewhere {
        why: String,
        busy: bool,
    },
    /// Final: the kind and message, and whose fault it was.
    Failed {
        kind: ErrorKind,
        message: String,
        fault: Fault,
    },
}

/// Whose fault a failed try was, for the replica's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The replica's (unreachable, timed out, a server error): counts towards its circuit.
    Replica,
    /// The call's own (its inputs, the model's error on them): the replica answered.
    Call,
    /// Nothing was sent.
    NotSent,
}

impl Backend {
    fn new(section: &BackendSection) -> Result<Self, String> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(section.connect_timeout_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(section.max_concurrency as usize)
            .build(connector);
        let mut replicas = Vec::with_capacity(section.replicas.len());
        for url in &section.replicas {
            let base = url.trim_end_matches('/').to_owned();
            base.parse::<hyper::Uri>()
                .map_err(|e| format!("backend {:?}: replica {url:?}: {e}", section.name))?;
            replicas.push(Replica {
                base,
                in_flight: AtomicU32::new(0),
                state: Mutex::new(ReplicaState {
                    // Out until the first health check finds it ready.
                    out: Some("not checked yet".into()),
                    ..ReplicaState::default()
                }),
            });
        }
        Ok(Self {
            name: section.name.clone(),
            section: section.clone(),
            replicas,
            client,
            watched: Mutex::new(BTreeSet::new()),
            seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks, for a push, that the backend serves `model`: the first replica that answers
    /// `GET /v2/models/MODEL` decides (200 yes, anything else no, with the reason).
    pub async fn serves(&self, model: &str) -> Result<(), String> {
        let limit = Duration::from_millis(self.section.timeout_ms);
        let mut unreachable = Vec::new();
        for replica in &self.replicas {
            match self
                .get(replica, &format!("/v2/models/{model}"), limit)
                .await
            {
                Ok((StatusCode::OK, _)) => {
                    self.watch_model(model);
                    return Ok(());
                }
                Ok((status @ (StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST), body)) => {
                    return Err(format!(
                        "backend {:?} does not serve model {model:?}: replica {} answered {status} to GET /v2/models/{model}: {}",
                        self.name,
                        replica.base,
                        server_message(&body)
                    ));
                }
                // Loading, or failing: another replica may know.
                Ok((status, body)) => unreachable.push(format!(
                    "{}: {status}: {}",
                    replica.base,
                    server_message(&body)
                )),
                Err(e) => unreachable.push(format!("{}: {e}", replica.base)),
            }
        }
        Err(format!(
            "backend {:?} could not be asked whether it serves model {model:?}: {}",
            self.name,
            unreachable.join("; ")
        ))
    }

    /// Runs `model` on a replica.
    pub async fn infer(&self, model: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        self.watch_model(model);
        let mut tried: Vec<usize> = Vec::new();
        let mut reasons: Vec<String> = Vec::new();
        let mut busy = false;
        while tried.len() < self.replicas.len() {
            let (i, slot) = match self.pick(model, &tried) {
                Ok(Some(picked)) => picked,
                Ok(None) => break,
                Err(e) => {
                    busy = e == BackendError::Busy;
                    break;
                }
            };
            tried.push(i);
            let replica = &self.replicas[i];
            let outcome = {
                // Counted until the try ends, or its future is dropped (the device went away).
                let _slot = slot;
                self.try_on(replica, model, inputs).await
            };
            match outcome {
                Try::Answered(outputs) => {
                    replica.succeeded();
                    return Ok(outputs);
                }
                Try::Elsewhere { why, busy: full } => {
                    tracing::info!(backend = %self.name, replica = %replica.base, model, reason = %why, "retrying the call on another replica");
                    busy |= full;
                    reasons.push(format!("{}: {why}", replica.base));
                }
                Try::Failed {
                    kind,
                    message,
                    fault,
                } => {
                    match fault {
                        Fault::Replica => replica.failed(&self.section),
                        Fault::Call => replica.succeeded(),
                        Fault::NotSent => replica.end_trial(),
                    }
                    return Err(BackendError::Failed(
                        kind,
                        format!(
                            "backend {:?} replica {}: {message}",
                            self.name, replica.base
                        ),
                    ));
                }
            }
        }
        if busy {
            return Err(BackendError::Busy);
        }
        if reasons.is_empty() {
            reasons = self.out_reasons(model);
        }
        Err(BackendError::Failed(
            ErrorKind::Unavailable,
            format!(
                "backend {:?} has no replica ready for model {model:?} ({})",
                self.name,
                reasons.join("; ")
            ),
        ))
    }

    /// The replica for the next try, with its slot reserved: the less loaded of two eligible
    /// ones chosen at random. `Ok(None)` when none is eligible; `Busy` when the only ones left
    /// are full.
    fn pick(
        &self,
        model: &str,
        tried: &[usize],
    ) -> Result<Option<(usize, InFlight<'_>)>, BackendError> {
        let max = self.section.max_concurrency;
        // Another call may take the chosen slot (or trial) first: choose again, a few times.
        for _ in 0..8 {
            let now = Instant::now();
            let mut full = false;
            let eligible: Vec<usize> = (0..self.replicas.len())
                .filter(|i| !tried.contains(i))
                .filter(|&i| {
                    let r = &self.replicas[i];
                    if !r.ready_for(model, now) {
                        return false;
                    }
                    if r.in_flight.load(Ordering::Acquire) >= max {
                        full = true;
                        return false;
                    }
                    true
                })
                .collect();
            let i = match eligible.len() {
                0 if full => return Err(BackendError::Busy),
                0 => return Ok(None),
                1 => eligible[0],
                n => {
                    let r = self.random();
                    let a = eligible[(r % n as u64) as usize];
                    let mut b = eligible[((r >> 32) % (n as u64 - 1)) as usize];
                    if b == a {
                        b = eligible[n - 1];
                    }
                    let load = |i: usize| self.replicas[i].in_flight.load(Ordering::Acquire);
                    if load(b) < load(a) { b } else { a }
                }
            };
            let replica = &self.replicas[i];
            let Some(slot) = InFlight::reserve(&replica.in_flight, max) else {
                continue;
            };
            if replica.claim(model, now) {
                return Ok(Some((i, slot)));
            }
        }
        Err(BackendError::Busy)
    }

    /// A splitmix64 step: cheap, and good enough to spread calls.
    fn random(&self) -> u64 {
        let mut z = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn out_reasons(&self, model: &str) -> Vec<String> {
        let now = Instant::now();
        self.replicas
            .iter()
            .map(|r| {
                let why = {
                    let s = r.state();
                    match (&s.out, s.open_until) {
                        (Some(out), _) => out.clone(),
                        (None, Some(until)) if until > now => {
                            format!("circuit open after {} failed calls in a row", s.failures)
                        }
                        _ if s.missing.contains(model) => {
                            format!("model {model:?} is not ready there")
                        }
                        (None, Some(_)) if s.trial => {
                            "a trial call is running on its circuit".into()
                        }
                        _ => "ready".into(),
                    }
                };
                format!("{}: {why}", r.base)
            })
            .collect()
    }

    fn watch_model(&self, model: &str) {
        if let Ok(mut w) = self.watched.lock()
            && !w.contains(model)
            && w.len() < MAX_WATCHED_MODELS
        {
            w.insert(model.to_owned());
        }
    }

    async fn try_on(&self, replica: &Replica, model: &str, inputs: &[Tensor]) -> Try {
        let binary = match self.section.encoding {
            BackendEncoding::Binary => true,
            BackendEncoding::Json => false,
            BackendEncoding::Auto => replica.state().binary,
        };
        let encoded = match oip::encode_request(inputs, binary) {
            Ok(e) => e,
            Err(e) => {
                return Try::Failed {
                    kind: ErrorKind::InvalidInput,
                    message: e.to_string(),
                    fault: Fault::NotSent,
                };
            }
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/v2/models/{model}/infer", replica.base));
        // Binary bodies say so by the header length and a content type that is not JSON (a
        // server that sees application/json parses the whole body as JSON).
        request = match encoded.header_length {
            Some(len) => request
                .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
                .header(oip::HEADER_LENGTH, len),
            None => request.header(hyper::header::CONTENT_TYPE, "application/json"),
        };
        let request = match request.body(Full::new(Bytes::from(encoded.body))) {
            Ok(r) => r,
            Err(e) => {
                return Try::Failed {
                    kind: ErrorKind::Internal,
                    message: format!("could not build the request: {e}"),
                    fault: Fault::NotSent,
                };
            }
        };
        let limit = Duration::from_millis(self.section.timeout_ms);
        let max_body = usize::try_from(self.section.max_response_mb.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX);
        let call = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let header_length = response
                .headers()
                .get(oip::HEADER_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            let body = Limited::new(response.into_body(), max_body)
                .collect()
                .await
                .map(|b| b.to_bytes());
            Ok::<_, hyper_util::client::legacy::Error>((status, header_length, body))
        };
        let (status, header_length, body) = match tokio::time::timeout(limit, call).await {
            Err(_) => {
                return Try::Failed {
                    kind: ErrorKind::Unavailable,
                    message: format!("no answer within {} ms (timeout_ms)", limit.as_millis()),
                    fault: Fault::Replica,
                };
            }
            Ok(Err(e)) if e.is_connect() => {
                replica.failed(&self.section);
                let why = format!("cannot connect: {}", error_chain(&e));
                replica.take_out(why.clone());
                return Try::Elsewhere { why, busy: false };
            }
            Ok(Err(e)) => {
                return Try::Failed {
                    kind: ErrorKind::Unavailable,
                    message: format!("the call failed: {}", error_chain(&e)),
                    fault: Fault::Replica,
                };
            }
            Ok(Ok(answer)) => answer,
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                let message = match e.downcast_ref::<http_body_util::LengthLimitError>() {
                    Some(_) => format!(
                        "its answer is over max_response_mb ({} MiB)",
                        self.section.max_response_mb
                    ),
                    None => format!("its answer could not be read: {e}"),
                };
                return Try::Failed {
                    kind: ErrorKind::Unavailable,
                    message,
                    fault: Fault::Replica,
                };
            }
        };
        let says = server_message(&body);
        match status {
            StatusCode::OK => {
                let limits = RequestLimits::UNLIMITED;
                match InferResponse::parse(&body, header_length, &limits) {
                    Ok(answer) => Try::Answered(answer.outputs),
                    Err(e) => Try::Failed {
                        kind: ErrorKind::Internal,
                        message: format!("its answer is not a valid inference response: {e}"),
                        fault: Fault::Call,
                    },
                }
            }
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => Try::Failed {
                kind: ErrorKind::InvalidInput,
                message: format!("refused the inputs: {says}"),
                fault: Fault::Call,
            },
            StatusCode::PAYLOAD_TOO_LARGE => Try::Failed {
                kind: ErrorKind::InvalidInput,
                message: format!("the inputs are too large for it (413): {says}"),
                fault: Fault::Call,
            },
            StatusCode::NOT_FOUND => {
                replica.missing(model);
                Try::Elsewhere {
                    why: format!("does not serve model {model:?} (404: {says})"),
                    busy: false,
                }
            }
            StatusCode::TOO_MANY_REQUESTS => Try::Elsewhere {
                why: format!("busy (429: {says})"),
                busy: true,
            },
            // The server itself says the model is not ready (its JSON error): nothing ran, so
            // another replica may take the call. A bare 503 may come from a proxy after the
            // model ran: not retried.
            StatusCode::SERVICE_UNAVAILABLE if is_server_error(&body) => {
                replica.missing(model);
                Try::Elsewhere {
                    why: format!("model {model:?} is not ready (503: {says})"),
                    busy: false,
                }
            }
            StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::BAD_GATEWAY
            | StatusCode::GATEWAY_TIMEOUT => Try::Failed {
                kind: ErrorKind::Unavailable,
                message: format!("answered {status}: {says}"),
                fault: Fault::Replica,
            },
            // The model failed on these inputs and the server said so: the replica works.
            StatusCode::INTERNAL_SERVER_ERROR if is_server_error(&body) => Try::Failed {
                kind: ErrorKind::Internal,
                message: format!("the model failed (500): {says}"),
                fault: Fault::Call,
            },
            other => Try::Failed {
                kind: ErrorKind::Internal,
                message: format!("answered {other}: {says}"),
                fault: Fault::Replica,
            },
        }
    }

    /// The health task: checks every replica (at once) each `health_interval_ms` until
    /// `shutdown` turns true.
    async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let period = Duration::from_millis(self.section.health_interval_ms);
        loop {
            let mut checks = JoinSet::new();
            for i in 0..self.replicas.len() {
                let backend = Arc::clone(&self);
                checks.spawn(async move { backend.check(i).await });
            }
            while checks.join_next().await.is_some() {}
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    /// One replica's health check: server ready, its extensions, and each watched model.
    async fn check(&self, index: usize) {
        let Some(replica) = self.replicas.get(index) else {
            return;
        };
        let limit = Duration::from_millis(
            self.section
                .timeout_ms
                .min(self.section.health_interval_ms.max(100)),
        );
        let epoch = replica.state().epoch;
        let ready = self.get(replica, "/v2/health/ready", limit).await;
        let out = match ready {
            Ok((StatusCode::OK, _)) => None,
            Ok((status, body)) => Some(format!(
                "/v2/health/ready answered {status}: {}",
                server_message(&body)
            )),
            Err(e) => Some(e),
        };
        let binary = match (&out, self.section.encoding) {
            (None, BackendEncoding::Auto) => match self.get(replica, "/v2", limit).await {
                Ok((StatusCode::OK, body)) => lists_binary_extension(&body),
                _ => false,
            },
            _ => false,
        };
        let models: Vec<String> = self
            .watched
            .lock()
            .map(|w| w.iter().cloned().collect())
            .unwrap_or_default();
        // The models are asked in turn within one `limit` together, so a slow replica cannot
        // stretch the round; a model not asked in time keeps what the last round found.
        let mut answers: Vec<(String, bool)> = Vec::new();
        if out.is_none() {
            let _ = tokio::time::timeout(limit, async {
                for model in &models {
                    let path = format!("/v2/models/{model}/ready");
                    let ready = matches!(
                        self.get(replica, &path, limit).await,
                        Ok((StatusCode::OK, _))
                    );
                    answers.push((model.clone(), ready));
                }
            })
            .await;
        }
        {
            let mut s = replica.state();
            if s.epoch != epoch {
                // A call took it out or found a model missing meanwhile: that is newer.
                return;
            }
            let mut missing: BTreeSet<String> = models
                .into_iter()
                .filter(|m| s.missing.contains(m))
                .collect();
            for (model, ready) in answers {
                if ready {
                    missing.remove(&model);
                } else {
                    missing.insert(model);
                }
            }
            match (&s.out, &out) {
                (Some(was), None) => {
                    tracing::info!(backend = %self.name, replica = %replica.base, was = %was, "backend replica is ready")
                }
                (None, Some(why)) => {
                    tracing::warn!(backend = %self.name, replica = %replica.base, reason = %why, "backend replica taken out")
                }
                _ => {}
            }
            s.out = out;
            s.binary = binary;
            s.missing = missing;
        }
    }

    async fn get(
        &self,
        replica: &Replica,
        path: &str,
        limit: Duration,
    ) -> Result<(StatusCode, Bytes), String> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("{}{path}", replica.base))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), HEALTH_BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(limit, call)
            .await
            .map_err(|_| format!("{path} did not answer within {} ms", limit.as_millis()))?
    }
}

/// Whether a `GET /v2` answer lists the binary tensor data extension.
fn lists_binary_extension(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("extensions")
                .and_then(|e| e.as_array())
                .map(|e| e.iter().any(|x| x.as_str() == Some(oip::EXTENSION)))
        })
        .unwrap_or(false)
}

/// A server's error text: the `error` field of its JSON (Triton, KServe, MLServer), FastAPI's
/// `detail`, or the body itself, cut to 500 characters.
fn server_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => match (v.get("error"), v.get("detail")) {
            (Some(serde_json::Value::String(e)), _) => e.clone(),
            (_, Some(d)) => d.to_string(),
            _ => v.to_string(),
        },
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = text.trim();
    match text.char_indices().nth(500) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None if text.is_empty() => "(no message)".into(),
        None => text.to_owned(),
    }
}

/// An error and its sources, as one line (hyper's top-level messages say little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn section(replicas: usize) -> BackendSection {
        BackendSection {
            name: "b".into(),
            replicas: (0..replicas)
                .map(|i| format!("http://127.0.0.1:{}", 1 + i))
                .collect(),
            models: vec!["m".into()],
            max_concurrency: 4,
            timeout_ms: 2_000,
            connect_timeout_ms: 500,
            health_interval_ms: 1_000,
            circuit_failures: 3,
            circuit_open_ms: 60,
            encoding: BackendEncoding::Auto,
            max_response_mb: 1,
        }
    }

    fn ready(backend: &Backend) {
        for r in &backend.replicas {
            r.state.lock().unwrap().out = None;
        }
    }

    /// Failures in a row open the circuit; after `circuit_open_ms` a trial is let through, and
    /// a success closes it.
    #[test]
    fn failures_open_a_replicas_circuit_until_a_trial_succeeds() {
        let s = section(1);
        let backend = Backend::new(&s).unwrap();
        let r = &backend.replicas[0];
        assert!(!r.ready_for("m", Instant::now()), "out until checked");
        ready(&backend);
        r.failed(&s);
        r.failed(&s);
        assert!(r.ready_for("m", Instant::now()));
        r.failed(&s);
        assert!(!r.ready_for("m", Instant::now()), "open after 3");
        let reasons = backend.out_reasons("m").join(";");
        assert!(
            reasons.contains("circuit open after 3 failed calls"),
            "{reasons}"
        );
        std::thread::sleep(Duration::from_millis(80));
        assert!(r.ready_for("m", Instant::now()), "half open: a trial");
        assert!(r.claim("m", Instant::now()), "the one trial");
        assert!(
            !r.ready_for("m", Instant::now()) && !r.claim("m", Instant::now()),
            "only one"
        );
        r.failed(&s);
        assert!(
            !r.ready_for("m", Instant::now()),
            "a failed trial opens it again"
        );
        std::thread::sleep(Duration::from_millis(80));
        r.succeeded();
        r.failed(&s);
        assert!(r.ready_for("m", Instant::now()), "a success closed it");
        r.missing("m");
        assert!(!r.ready_for("m", Instant::now()) && r.ready_for("other", Instant::now()));
    }

    /// The less loaded of the two picked wins; full replicas are skipped, and when only full
    /// ones are left the call is `Busy`.
    #[test]
    fn calls_go_to_the_less_loaded_of_two_and_full_replicas_are_busy() {
        let backend = Backend::new(&section(3)).unwrap();
        ready(&backend);
        backend.replicas[0].in_flight.store(3, Ordering::Relaxed);
        backend.replicas[2].in_flight.store(3, Ordering::Relaxed);
        let mut picks = [0u32; 3];
        for _ in 0..600 {
            picks[backend.pick("m", &[]).unwrap().unwrap().0] += 1;
        }
        // Replica 1 wins whenever it is one of the two: 2/3 of the time.
        assert!(picks[1] > 330, "{picks:?}");
        assert!(picks[0] > 50 && picks[2] > 50, "{picks:?}");
        assert_eq!(
            backend.pick("m", &[1]).unwrap().map(|(i, _)| i != 1),
            Some(true)
        );
        for r in &backend.replicas {
            r.in_flight.store(4, Ordering::Relaxed);
        }
        assert!(matches!(backend.pick("m", &[]), Err(BackendError::Busy)));
        assert!(matches!(backend.pick("m", &[0, 1, 2]), Ok(None)));
    }

    /// A replica nobody listens on: the call is tried on the next and, with none left, fails
    /// `Unavailable` naming each replica's reason; the replicas are taken out.
    #[tokio::test]
    async fn unreachable_replicas_are_tried_in_turn_and_named() {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            })
            .collect();
        let mut s = section(2);
        s.replicas = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let backend = Backend::new(&s).unwrap();
        ready(&backend);
        let x = Tensor::from_values("x", vec![1], &[1.0f32]).unwrap();
        let e = backend.infer("m", &[x]).await.unwrap_err();
        let BackendError::Failed(kind, message) = e else {
            panic!("{e:?}")
        };
        assert_eq!(kind, ErrorKind::Unavailable);
        for p in &ports {
            assert!(
                message.contains(&format!("127.0.0.1:{p}: cannot connect")),
                "{message}"
            );
        }
        assert!(
            backend
                .replicas
                .iter()
                .all(|r| !r.ready_for("m", Instant::now()))
        );
        let e = backend.serves("m").await.unwrap_err();
        assert!(e.contains("could not be asked"), "{e}");
    }

    /// A call whose caller goes away (its future dropped mid-call) no longer counts against
    /// the replica's `max_concurrency`.
    #[tokio::test]
    async fn a_dropped_call_frees_its_slot() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts and never answers.
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                open.push(stream);
            }
        });
        let mut s = section(1);
        s.replicas = vec![format!("http://127.0.0.1:{port}")];
        let backend = Backend::new(&s).unwrap();
        ready(&backend);
        let x = Tensor::from_values("x", vec![1], &[1.0f32]).unwrap();
        for _ in 0..6 {
            let call = backend.infer("m", std::slice::from_ref(&x));
            assert!(
                tokio::time::timeout(Duration::from_millis(50), call)
                    .await
                    .is_err()
            );
        }
        assert_eq!(backend.replicas[0].in_flight.load(Ordering::Acquire), 0);
        assert!(backend.pick("m", &[]).unwrap().is_some(), "not full");
        held.abort();
    }

    #[test]
    fn server_messages_are_read_from_each_servers_error_shape() {
        assert_eq!(
            server_message(br#"{"error":"Model x not found"}"#),
            "Model x not found"
        );
        assert!(server_message(br#"{"detail":[{"msg":"bad"}]}"#).contains("bad"));
        assert_eq!(
            server_message(b"Internal Server Error"),
            "Internal Server Error"
        );
        assert_eq!(server_message(b""), "(no message)");
        assert_eq!(server_message(&[b'a'; 900]).chars().count(), 501);
        assert!(lists_binary_extension(
            br#"{"name":"triton","extensions":["classification","binary_tensor_data"]}"#
        ));
        assert!(!lists_binary_extension(
            br#"{"name":"mlserver","extensions":[]}"#
        ));
    }
}
