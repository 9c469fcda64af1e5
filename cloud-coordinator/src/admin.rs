//! The admin HTTP API (bearer token): push, rollback, model and fleet listings; plus the
//! unauthenticated Prometheus `/metrics`. It also owns the API's wire types: the server
//! serialises them here and [`AdminClient`](crate::AdminClient) deserialises the same ones.
//!
//! | route | what | answer (JSON) |
//! |---|---|---|
//! | `POST /v1/models/{name}?placement=&rollout=&max_batch=&quantize=&output_kinds=&int8_…=&cloud_size=&samples_size=&dry_run=` | push (query: [`PushQuery`]; body: the model file, then the cloud model's `cloud_size` bytes, then the gate's sample file's `samples_size` bytes) | [`Published`]: 201, or 200 for a dry run |
//! | `POST /v1/models/{name}/rollback?to=V` | publish version V's content as a new version | [`Published`], 201 |
//! | `POST /v1/models/{name}/rollout?percent=P` \| `?promote` \| `?abort` | move the candidate along (see [`crate::registry::RolloutAction`]) | [`Published`], 201 |
//! | `POST /v1/models/{name}/finetune?output=&layer=&holdout=&seed=&min_gain=&rollout=&dry_run=` | retrain the head on the body's labelled examples (JSON Lines; see [`crate::finetune`]) and publish it when it is better | [`FinetuneReport`]: 201, 200 for a dry run, 422 (with the figures) when the head is not better, 429 past `[registry] max_finetunes`; with `Accept: application/x-ndjson`, a 200 streaming [`FinetuneEvent`] lines, the last with that status |
//! | `POST /v1/devices/{id}/revoke` | revoke a device | [`Revoked`] |
//! | `GET /v1/revoked` | the revoked devices | a list of [`Revoked`] |
//! | `GET /v1/models` | models, versions, rollout gates and histories | a list of [`ModelSummary`] |
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
use tokio::sync::watch;

use crate::error::RegistryError;
use crate::metrics::Metrics;
use crate::mqtt::{Announcer, FleetView};
use crate::registry::{Int8Overrides, PushRequest, Registry, RolloutAction, TextOptions};

mod query;

pub(crate) use query::encode;
use query::parse_query;

/// The query parser, for the tests of other modules.
#[cfg(test)]
pub(crate) fn parse_query_for_tests(query: &str) -> HashMap<String, String> {
    parse_query(query)
}
pub use query::{PlacementArg, PushQuery, parse_output_kinds};

pub use crate::finetune::{FinetuneEvent, FinetuneQuery, FinetuneReport};
pub use crate::registry::{Delta, EdgeReport, ModelSummary, Published, Stage, VariantSummary};
pub use outpost_shared::DeviceStatus;

/// The body of every refusal: what went wrong, in words.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorReply {
    /// The reason.
    pub error: String,
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
    /// Fine-tunes that may run at once (`[registry] max_finetunes`).
    pub max_finetunes: usize,
    /// Their permits.
    pub finetunes: Arc<tokio::sync::Semaphore>,
    /// The Open Inference Protocol backends (`[[backend]]`).
    pub backends: Arc<crate::backend::Backends>,
}

/// An answer's body: whole, or streamed (a fine-tune's progress).
type Body = http_body_util::Either<Full<Bytes>, http_body_util::Channel<Bytes>>;

type Reply = Response<Body>;

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
    let mut reply = Response::new(Body::Left(Full::new(Bytes::from(body))));
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
        let mut reply = Response::new(Body::Left(Full::new(Bytes::from(state.metrics.render()))));
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
            Ok(mut models) => {
                let offloads = state.metrics.offloads();
                for m in &mut models {
                    if let Some(counts) = offloads.get(&m.name) {
                        m.offloaded = *counts;
                    }
                }
                json(StatusCode::OK, &models)
            }
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
        (Method::POST, ["v1", "models", name, "finetune"]) => {
            finetune(req, (*name).to_owned(), &query, state).await
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

/// Reads an upload within `[registry] max_upload_mb`; the refusal is the reply.
async fn read_upload(req: Request<Incoming>, state: &AdminState) -> Result<Bytes, Reply> {
    match read_body(req.into_body(), &BodyLimits::up_to(state.max_upload)).await {
        Ok(b) => Ok(b),
        Err(BodyError::TooLarge { .. }) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the upload is larger than the limit of {} MiB (registry.max_upload_mb)",
                state.max_upload >> 20
            ),
        )),
        Err(e @ BodyError::TooSlow { .. }) => {
            Err(error(StatusCode::REQUEST_TIMEOUT, e.to_string()))
        }
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("could not read the upload: {e}"),
        )),
    }
}

async fn push(
    req: Request<Incoming>,
    name: String,
    query: &HashMap<String, String>,
    state: &AdminState,
) -> Reply {
    // Read the upload before judging the options (see `read_body`).
    let body = match read_upload(req, state).await {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let options = match PushQuery::parse(query) {
        Ok(o) => o,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // The body is the model, then the optional cloud model, tokenizer and sample file: each
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
    let tokenizer = match take_tail("tokenizer_size", options.tokenizer_size) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let cloud_model = match take_tail("cloud_size", options.cloud_size) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if let Some(name_of_backend) = &options.backend {
        // The name goes into the backend's URL: checked first.
        if let Err(e) =
            outpost_shared::topic::validate_name(outpost_shared::topic::NameKind::Model, &name)
        {
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
        let Some(backend) = state.backends.named(name_of_backend) else {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "no backend named {name_of_backend:?} in coordinator.toml (configured: {:?})",
                    state.backends.names()
                ),
            );
        };
        if let Err(e) = backend.serves(&name).await {
            return error(StatusCode::BAD_REQUEST, e);
        }
    }
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
        tokenizer,
        text: options.text,
        output_kinds: options.output_kinds,
        int8: options.int8,
        dry_run: options.dry_run,
        gate,
        known_devices: known_devices(state),
        backend: options.backend,
    };
    let registry = state.registry.clone();
    let result = tokio::task::spawn_blocking(move || registry.push(request)).await;
    publish(result, state).await
}

/// The media type of a streamed fine-tune: one [`FinetuneEvent`] a line.
pub const NDJSON: &str = "application/x-ndjson";

/// Progress lines a streamed fine-tune holds for a slow reader; past them, progress lines are
/// dropped (each tells the whole state so far) and the last line still comes.
const PROGRESS_QUEUE: usize = 64;

/// How long a streamed fine-tune's last line waits for a reader that stopped reading.
const LAST_LINE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Fine-tunes `name`'s head on the upload and, when the new head is better, pushes it with the
/// stable version's placement and quantisation, as a canary under the health gate unless the
/// query says `rollout=100`. With `Accept: application/x-ndjson` the answer is a 200 whose
/// body streams [`FinetuneEvent`]s as the work goes, the last one [`FinetuneEvent::Done`] with
/// the status the plain answer would have had. At most `[registry] max_finetunes` run at once;
/// one more is a 429. A client that goes away does not stop a fine-tune already running.
async fn finetune(
    req: Request<Incoming>,
    name: String,
    query: &HashMap<String, String>,
    state: &AdminState,
) -> Reply {
    let streamed = req
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with(NDJSON)));
    let body = match read_upload(req, state).await {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let options = match FinetuneQuery::parse(query) {
        Ok(o) => o,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Ok(permit) = Arc::clone(&state.finetunes).try_acquire_owned() else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} fine-tune(s) are running, the most at once (registry.max_finetunes); try again when one ends",
                state.max_finetunes
            ),
        );
    };
    if !streamed {
        let logged = name.clone();
        let mut shown = 0;
        let progress = move |event: FinetuneEvent| {
            if let FinetuneEvent::Features { done, total, .. } = event {
                let tenth = done * 10 / total.max(1);
                if tenth > shown {
                    shown = tenth;
                    tracing::info!(model = logged, done, total, "fine-tune: features");
                }
            }
        };
        let (status, answer) = run_finetune(name, body, options, state, progress).await;
        drop(permit);
        return match answer {
            Ok(report) => json(status, &report),
            Err(message) => error(status, message),
        };
    }
    let (mut lines, stream) = http_body_util::Channel::<Bytes>::new(PROGRESS_QUEUE);
    let state = state.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let (events, mut queued) = tokio::sync::mpsc::channel(PROGRESS_QUEUE);
        let progress = move |event| {
            // Full (a slow reader): this line is dropped, the next tells the same and more.
            let _ = events.try_send(event);
        };
        let run = run_finetune(name, body, options, &state, progress);
        tokio::pin!(run);
        // Progress lines never wait for the reader (one that does not read cannot hold the
        // fine-tune's permit); the last line waits up to `LAST_LINE_WAIT`.
        let mut tell = |event: &FinetuneEvent| {
            let _ = lines.try_send(hyper::body::Frame::data(line(event)));
        };
        let (status, answer) = loop {
            tokio::select! {
                ended = &mut run => break ended,
                Some(event) = queued.recv() => tell(&event),
            }
        };
        // What the work told after its last poll, then the end.
        while let Ok(event) = queued.try_recv() {
            tell(&event);
        }
        let (report, error) = match answer {
            Ok(report) => (Some(Box::new(report)), None),
            Err(message) => (None, Some(message)),
        };
        let done = FinetuneEvent::Done {
            status: status.as_u16(),
            report,
            error,
        };
        let sent = tokio::time::timeout(LAST_LINE_WAIT, lines.send_data(line(&done))).await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::info!(
                status = status.as_u16(),
                "the fine-tune's caller left before its end (it ran to the end)"
            );
        }
    });
    let mut reply = Response::new(Body::Right(stream));
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(NDJSON),
    );
    reply
}

/// One JSON Lines line.
fn line(event: &FinetuneEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Runs a fine-tune to its end: the status and the report, or the status and why it failed.
async fn run_finetune(
    name: String,
    body: Bytes,
    options: FinetuneQuery,
    state: &AdminState,
    mut progress: impl FnMut(FinetuneEvent) + Send + 'static,
) -> (StatusCode, Result<FinetuneReport, String>) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let (registry, model, q) = (state.registry.clone(), name.clone(), options.clone());
    let trained = tokio::task::spawn_blocking(move || {
        let trained = crate::finetune::train(&registry, &model, &body, &q, threads, &mut progress);
        (trained, progress)
    })
    .await;
    let (mut report, model, source, mut progress) = match trained {
        Ok((Ok((report, Some((model, source)))), progress)) => (report, model, source, progress),
        Ok((Ok((report, None)), _)) => {
            tracing::info!(model = name, refused = report.error, "fine-tune");
            return (StatusCode::UNPROCESSABLE_ENTITY, Ok(report));
        }
        Ok((Err(e), _)) => return registry_refusal(e),
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Err(format!("the fine-tune task failed: {e}")),
            );
        }
    };
    progress(FinetuneEvent::Publishing);
    let percent = options.rollout_percent();
    let gate = (percent < 100).then(|| {
        let mut gate = state.rollout.clone();
        gate.steps.retain(|p| *p > percent);
        gate
    });
    let request = PushRequest {
        name,
        model,
        cloud_model: source.cloud_model,
        placement: source.placement,
        rollout_percent: percent,
        max_batch: source.max_batch,
        quantize: Some(source.quantize),
        samples: None,
        tokenizer: source.text.as_ref().map(|(_, json)| json.clone()),
        text: source
            .text
            .as_ref()
            .map(|(spec, _)| TextOptions {
                name: Some(spec.name.clone()),
                max_tokens: Some(spec.max_tokens),
                truncate: spec.truncate,
            })
            .unwrap_or_default(),
        output_kinds: Vec::new(),
        int8: Int8Overrides::default(),
        dry_run: options.dry_run,
        gate,
        known_devices: known_devices(state),
        // New weights exist only in the registry: the worker pool serves them.
        backend: None,
    };
    let registry = state.registry.clone();
    match tokio::task::spawn_blocking(move || registry.push(request)).await {
        Ok(Ok((published, signed))) => {
            let status = match signed {
                Some(signed) => {
                    announce(state, &published, signed).await;
                    StatusCode::CREATED
                }
                None => StatusCode::OK,
            };
            report.published = Some(published);
            (status, Ok(report))
        }
        Ok(Err(e)) => registry_refusal(e),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Err(format!("the push task failed: {e}")),
        ),
    }
}

/// The devices the fleet view knows now (a canary's salt is chosen over them).
fn known_devices(state: &AdminState) -> Vec<String> {
    state
        .fleet
        .lock()
        .map(|fleet| fleet.keys().cloned().collect())
        .unwrap_or_default()
}

/// Counts, logs and announces a stored, signed release.
async fn announce(state: &AdminState, published: &Published, signed: Vec<u8>) {
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
}

async fn publish(
    result: Result<Result<crate::registry::Outcome, RegistryError>, tokio::task::JoinError>,
    state: &AdminState,
) -> Reply {
    match result {
        Ok(Ok((published, None))) => json(StatusCode::OK, &published),
        Ok(Ok((published, Some(signed)))) => {
            announce(state, &published, signed).await;
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
    let (status, message) = registry_refusal::<()>(e);
    error(status, message.err().unwrap_or_default())
}

/// A registry error's status and message.
fn registry_refusal<T>(e: RegistryError) -> (StatusCode, Result<T, String>) {
    let status = match &e {
        RegistryError::BadRequest(_) => StatusCode::BAD_REQUEST,
        RegistryError::BadModel(_) => StatusCode::UNPROCESSABLE_ENTITY,
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::Conflict(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, Err(e.to_string()))
}
