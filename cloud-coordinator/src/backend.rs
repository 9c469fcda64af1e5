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

/// One replica: its address, calls in flight, and what the health checks and calls found.
#[derive(Debug)]
struct Replica {
    base: String,
    in_flight: AtomicU32,
    state: Mutex<ReplicaState>,
}

#[derive(Debug, Default)]
struct ReplicaState {
    /// Why it is out (not ready, unreachable); `None` when ready.
    out: Option<String>,
    /// Models it answered not ready for (or 404).
    missing: BTreeSet<String>,
    /// It lists the binary tensor extension.
    binary: bool,
    /// Failed calls in a row.
    failures: u32,
    /// Its circuit is open until then.
    open_until: Option<Instant>,
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
    /// Nothing reached the model: try another replica.
    Elsewhere(String),
    /// Final: the kind and message.
    Failed {
        kind: ErrorKind,
        message: String,
        replica_fault: bool,
    },
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
                Ok((status, body)) => {
                    return Err(format!(
                        "backend {:?} does not serve model {model:?}: replica {} answered {status} to GET /v2/models/{model}: {}",
                        self.name,
                        replica.base,
                        server_message(&body)
                    ));
                }
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
        while tried.len() < self.replicas.len() {
            let Some(i) = self.pick(model, &tried)? else {
                break;
            };
            tried.push(i);
            let replica = &self.replicas[i];
            replica.in_flight.fetch_add(1, Ordering::AcqRel);
            let outcome = self.try_on(replica, model, inputs).await;
            replica.in_flight.fetch_sub(1, Ordering::AcqRel);
            match outcome {
                Try::Answered(outputs) => {
                    replica.succeeded();
                    return Ok(outputs);
                }
                Try::Elsewhere(why) => {
                    tracing::info!(backend = %self.name, replica = %replica.base, model, reason = %why, "retrying the call on another replica");
                    reasons.push(format!("{}: {why}", replica.base));
                }
                Try::Failed {
                    kind,
                    message,
                    replica_fault,
                } => {
                    if replica_fault {
                        replica.failed(&self.section);
                    } else {
                        replica.succeeded();
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

    /// The replica for the next try: the less loaded of two eligible ones chosen at random.
    /// `Ok(None)` when none is eligible; `Busy` when the only ones left are full.
    fn pick(&self, model: &str, tried: &[usize]) -> Result<Option<usize>, BackendError> {
        let now = Instant::now();
        let max = self.section.max_concurrency;
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
        match eligible.len() {
            0 if full => Err(BackendError::Busy),
            0 => Ok(None),
            1 => Ok(Some(eligible[0])),
            n => {
                let r = self.random();
                let a = eligible[(r % n as u64) as usize];
                let mut b = eligible[((r >> 32) % (n as u64 - 1)) as usize];
                if b == a {
                    b = eligible[n - 1];
                }
                let load = |i: usize| self.replicas[i].in_flight.load(Ordering::Acquire);
                Ok(Some(if load(b) < load(a) { b } else { a }))
            }
        }
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
                let why = match r.state.lock() {
                    Ok(s) => match (&s.out, s.open_until) {
                        (Some(out), _) => out.clone(),
                        (None, Some(until)) if until > now => {
                            format!("circuit open after {} failed calls in a row", s.failures)
                        }
                        _ if s.missing.contains(model) => {
                            format!("model {model:?} is not ready there")
                        }
                        _ => "ready".into(),
                    },
                    Err(_) => "state unreadable".into(),
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
            BackendEncoding::Auto => replica.state.lock().map(|s| s.binary).unwrap_or(false),
        };
        let encoded = match oip::encode_request(inputs, binary) {
            Ok(e) => e,
            Err(e) => {
                return Try::Failed {
                    kind: ErrorKind::InvalidInput,
                    message: e.to_string(),
                    replica_fault: false,
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
                    replica_fault: false,
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
                    replica_fault: true,
                };
            }
            Ok(Err(e)) if e.is_connect() => {
                replica.failed(&self.section);
                replica.take_out(format!("cannot connect: {}", error_chain(&e)));
                return Try::Elsewhere(format!("cannot connect: {}", error_chain(&e)));
            }
            Ok(Err(e)) => {
                return Try::Failed {
                    kind: ErrorKind::Unavailable,
                    message: format!("the call failed: {}", error_chain(&e)),
                    replica_fault: true,
                };
            }
            Ok(Ok(answer)) => answer,
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                return Try::Failed {
                    kind: ErrorKind::Unavailable,
                    message: format!(
                        "the answer could not be read (over max_response_mb {}?): {e}",
                        self.section.max_response_mb
                    ),
                    replica_fault: true,
                };
            }
        };
        match status {
            StatusCode::OK => {
                let limits = RequestLimits::UNLIMITED;
                match InferResponse::parse(&body, header_length, &limits) {
                    Ok(answer) => Try::Answered(answer.outputs),
                    Err(e) => Try::Failed {
                        kind: ErrorKind::Internal,
                        message: format!("its answer is not a valid inference response: {e}"),
                        replica_fault: true,
                    },
                }
            }
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => Try::Failed {
                kind: ErrorKind::InvalidInput,
                message: format!("refused the inputs: {}", server_message(&body)),
                replica_fault: false,
            },
            StatusCode::NOT_FOUND => {
                replica.missing(model);
                Try::Elsewhere(format!("does not serve model {model:?}"))
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                replica.take_out(format!("answered 503: {}", server_message(&body)));
                Try::Elsewhere(format!("not ready: {}", server_message(&body)))
            }
            other => Try::Failed {
                kind: ErrorKind::Internal,
                message: format!("answered {other}: {}", server_message(&body)),
                replica_fault: true,
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
        let mut missing = BTreeSet::new();
        if out.is_none() {
            for model in models {
                let path = format!("/v2/models/{model}/ready");
                if !matches!(
                    self.get(replica, &path, limit).await,
                    Ok((StatusCode::OK, _))
                ) {
                    missing.insert(model);
                }
            }
        }
        if let Ok(mut s) = replica.state.lock() {
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

impl Replica {
    fn ready_for(&self, model: &str, now: Instant) -> bool {
        match self.state.lock() {
            Ok(s) => {
                s.out.is_none()
                    && !s.missing.contains(model)
                    && s.open_until.is_none_or(|until| until <= now)
            }
            Err(_) => false,
        }
    }

    fn succeeded(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.failures = 0;
            s.open_until = None;
        }
    }

    fn failed(&self, section: &BackendSection) {
        if let Ok(mut s) = self.state.lock() {
            s.failures = s.failures.saturating_add(1);
            if s.failures >= section.circuit_failures {
                if s.open_until.is_none_or(|u| u <= Instant::now()) {
                    tracing::warn!(replica = %self.base, failures = s.failures, "backend replica's circuit opened");
                }
                s.open_until =
                    Some(Instant::now() + Duration::from_millis(section.circuit_open_ms));
            }
        }
    }

    fn take_out(&self, why: String) {
        if let Ok(mut s) = self.state.lock() {
            s.out = Some(why);
        }
    }

    fn missing(&self, model: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.missing.insert(model.to_owned());
        }
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
            picks[backend.pick("m", &[]).unwrap().unwrap()] += 1;
        }
        // Replica 1 wins whenever it is one of the two: 2/3 of the time.
        assert!(picks[1] > 330, "{picks:?}");
        assert!(picks[0] > 50 && picks[2] > 50, "{picks:?}");
        assert_eq!(backend.pick("m", &[1]).unwrap().map(|i| i != 1), Some(true));
        for r in &backend.replicas {
            r.in_flight.store(4, Ordering::Relaxed);
        }
        assert_eq!(backend.pick("m", &[]), Err(BackendError::Busy));
        assert_eq!(backend.pick("m", &[0, 1, 2]), Ok(None));
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
