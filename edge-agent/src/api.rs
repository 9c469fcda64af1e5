//! The local Open Inference Protocol v2 REST API (JSON and binary tensors), plus `/metrics` and
//! `/v1/status`. Each request reads one snapshot of the serving table. Errors are
//! `{"error": "..."}`: 400 for a bad request (naming the input and what was expected), 404 for an
//! unknown model or version, 500 when the model fails on a valid request, 503 when a model cannot
//! be served now (not loaded yet, no coordinator for a cloud model, the device failed).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use outpost_runtime::serve::{BodyError, BodyLimits, ServeLimits, read_body_within};
use outpost_shared::oip::{self, InferRequest, OipError, RequestLimits};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::Context;
use crate::counters::Counters;
use crate::guard;
use crate::router::{self, RouteError};
use crate::serving::{Models, Serving};

/// The largest request body accepted (64 MiB).
pub const MAX_BODY: usize = 64 << 20;

type Reply = Response<Full<Bytes>>;

/// Serves the API until shutdown.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
) {
    let limits = ServeLimits {
        max_connections: usize::try_from(ctx.config.profile().api_connections).unwrap_or(1),
        ..ServeLimits::default()
    };
    let handler = move |req| {
        let ctx = ctx.clone();
        async move {
            // A panic in a request's handling is answered (500) and counted rather than dropping
            // the connection without a status.
            match CatchUnwind(Box::pin(guarded(req, &ctx))).await {
                Ok(reply) => reply,
                Err(()) => {
                    Counters::count(&ctx.counters.panics);
                    Counters::count(&ctx.counters.errors);
                    error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the agent failed while handling this request (counted in outpost_agent_request_panics_total)",
                    )
                }
            }
        }
    };
    outpost_runtime::serve::serve_http(listener, limits, handler, shutdown).await;
}

/// A future whose panic becomes `Err(())` (logged once by the panic hook), so the request it
/// serves still gets an answer.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => {
                tracing::error!("a request's handling panicked; answered 500");
                std::task::Poll::Ready(Err(()))
            }
        }
    }
}

/// The API behind its web-page rules ([`guard`]): refused origins and hosts get 403, allowed
/// origins get their CORS preflight and headers.
async fn guarded(req: Request<Incoming>, ctx: &Context) -> Reply {
    let origin = match guard::check(req.headers(), &ctx.config.api.allowed_origins) {
        Ok(origin) => origin,
        Err(refused) if refused.is_malformed() => {
            return error(StatusCode::BAD_REQUEST, refused.to_string());
        }
        Err(refused) => return error(StatusCode::FORBIDDEN, refused.to_string()),
    };
    let mut r = if req.method() == Method::OPTIONS {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        r
    } else {
        route(req, ctx).await
    };
    if let Some(origin) = origin {
        let h = r.headers_mut();
        h.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            hyper::header::VARY,
            hyper::header::HeaderValue::from_static("Origin"),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_METHODS,
            hyper::header::HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_HEADERS,
            hyper::header::HeaderValue::from_static(
                "content-type, inference-header-content-length",
            ),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_EXPOSE_HEADERS,
            hyper::header::HeaderValue::from_static("inference-header-content-length"),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_MAX_AGE,
            hyper::header::HeaderValue::from_static("600"),
        );
    }
    r
}

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    reply(status, &json!({ "error": message.into() }))
}

async fn route(req: Request<Incoming>, ctx: &Context) -> Reply {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["v2"]) => reply(
            StatusCode::OK,
            &json!({ "name": "outpost-edge-agent", "version": env!("CARGO_PKG_VERSION"), "extensions": [oip::EXTENSION, oip::classification::EXTENSION] }),
        ),
        (Method::GET, ["v2", "health", "live"]) => reply(StatusCode::OK, &json!({ "live": true })),
        (Method::GET, ["v2", "health", "ready"]) => {
            reply(StatusCode::OK, &json!({ "ready": true }))
        }
        (Method::GET, ["v1", "status"]) => reply(
            StatusCode::OK,
            &serde_json::to_value(ctx.status()).unwrap_or_default(),
        ),
        (Method::GET, ["metrics"]) => metrics(ctx),
        (Method::GET, ["v2", "models", name]) => metadata(ctx, name, None),
        (Method::GET, ["v2", "models", name, "versions", v]) => metadata(ctx, name, Some(v)),
        (Method::GET, ["v2", "models", name, "ready"]) => ready(ctx, name, None),
        (Method::GET, ["v2", "models", name, "versions", v, "ready"]) => ready(ctx, name, Some(v)),
        (Method::POST, ["v2", "models", name, "infer"]) => {
            let name = (*name).to_owned();
            infer(req, ctx, &name, None).await
        }
        (Method::POST, ["v2", "models", name, "versions", v, "infer"]) => {
            let (name, v) = ((*name).to_owned(), (*v).to_owned());
            infer(req, ctx, &name, Some(&v)).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route for {} {path}", req.method()),
        ),
    }
}

/// The serving version of `name` in `models` (matching `version` if given).
fn find(models: &Models, name: &str, version: Option<&str>) -> Result<Arc<Serving>, Box<Reply>> {
    let Some(slot) = models.get(name) else {
        let known: Vec<&str> = models.names().collect();
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("unknown model {name:?} (serving: {})", known.join(", ")),
        )));
    };
    let Some(active) = slot.active.clone() else {
        let why = slot
            .last_error
            .clone()
            .unwrap_or_else(|| "it is still being fetched".into());
        return Err(Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model {name:?} is not ready: {why}"),
        )));
    };
    match version {
        None => Ok(active),
        Some(v) => {
            let wanted: u64 = v.parse().map_err(|_| {
                Box::new(error(
                    StatusCode::NOT_FOUND,
                    format!("model {name:?} has no version {v:?}"),
                ))
            })?;
            slot.versions()
                .find(|s| s.version.version == wanted)
                .cloned()
                .ok_or_else(|| {
                    Box::new(error(
                        StatusCode::NOT_FOUND,
                        format!("model {name:?} has no version {wanted} on this device"),
                    ))
                })
        }
    }
}

fn specs(specs: &[outpost_shared::TensorSpec]) -> Value {
    specs
        .iter()
        .map(|s| json!({ "name": s.name, "datatype": s.datatype.as_str(), "shape": s.shape.iter().map(|d| i64::from(*d)).collect::<Vec<_>>() }))
        .collect()
}

fn metadata(ctx: &Context, name: &str, version: Option<&str>) -> Reply {
    // One snapshot for the version asked for and the list of versions.
    let models = ctx.models();
    match find(&models, name, version) {
        Ok(s) => {
            let versions: Vec<String> = models
                .get(name)
                .map(|slot| {
                    slot.versions()
                        .map(|s| s.version.version.to_string())
                        .collect()
                })
                .unwrap_or_default();
            // A text model lists its text input first; its token inputs still work.
            let inputs: Vec<outpost_shared::TensorSpec> = s
                .text
                .iter()
                .map(|t| t.metadata_spec())
                .chain(s.version.inputs.iter().cloned())
                .collect();
            let text = s.text.as_ref().map(|t| {
                let spec = t.spec();
                let token_inputs: Vec<&String> = [&spec.input_ids]
                    .into_iter()
                    .chain(spec.attention_mask.as_ref())
                    .chain(spec.token_type_ids.as_ref())
                    .collect();
                json!({
                    "name": spec.name,
                    "tokenizer": t.kind(),
                    "max_tokens": spec.max_tokens,
                    "truncate": spec.truncate,
                    "token_inputs": token_inputs,
                })
            });
            reply(
                StatusCode::OK,
                &json!({
                    "name": name,
                    "versions": versions,
                    "platform": "onnx",
                    "inputs": specs(&inputs),
                    "outputs": specs(&s.version.outputs),
                    "parameters": {
                        "engine": s.engine_name(),
                        "placement": s.version.placement,
                        "adapter": s.adapter,
                        "gpu_fallback": s.gpu_fallback,
                        "cpu_fallback": s.cpu_fallback,
                        "text_input": text,
                        "working_memory": working_memory(ctx, &s),
                    },
                }),
            )
        }
        Err(r) => *r,
    }
}

/// What a call of `s` takes in working memory, as the metadata shows it: the fixed part and
/// the part per row (at a text model's longest text, and at a few sequence lengths for a model
/// with one), with the per-call bound; or why it is not known.
fn working_memory(ctx: &Context, s: &Serving) -> Value {
    let Some(graph) = &s.graph else {
        return Value::Null;
    };
    let graph = match graph {
        Ok(g) => g,
        Err(why) => return json!({ "unknown": why }),
    };
    let sequence = s
        .text
        .as_ref()
        .map_or(1, |t| u64::from(t.spec().max_tokens));
    let cost = graph.cost(sequence);
    let mut figures = json!({
        "fixed_bytes": cost.fixed,
        "per_row_bytes": cost.per_row,
        "call_limit_bytes": ctx.config.profile().call_memory_bytes(),
        "splits_rows": graph.splits(),
    });
    if graph.has_sequence() {
        figures["at_tokens"] = json!(sequence);
        let per_row: Map<String, Value> = [8u64, 32, 128, 512]
            .iter()
            .map(|&n| (n.to_string(), json!(graph.cost(n).per_row)))
            .collect();
        figures["per_row_bytes_by_tokens"] = Value::Object(per_row);
    }
    figures
}

fn ready(ctx: &Context, name: &str, version: Option<&str>) -> Reply {
    match find(&ctx.models(), name, version) {
        Ok(_) => reply(StatusCode::OK, &json!({ "name": name, "ready": true })),
        Err(r) => *r,
    }
}

async fn infer(req: Request<Incoming>, ctx: &Context, name: &str, version: Option<&str>) -> Reply {
    let header_length = req
        .headers()
        .get(oip::HEADER_LENGTH)
        .map(|v| v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()));
    // Read the body before judging the request (see `read_body`); its bytes are held in the
    // budget of bodies until the call ends (the parsed tensors take about as much).
    let read = read_body_within(req.into_body(), &BodyLimits::local(MAX_BODY), &ctx.bodies).await;
    let (body, _body_memory) = match read {
        Ok(b) => b,
        Err(BodyError::TooLarge { .. }) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request is larger than {} MiB", MAX_BODY >> 20),
            );
        }
        Err(e @ BodyError::TooSlow { .. }) => {
            return error(StatusCode::REQUEST_TIMEOUT, e.to_string());
        }
        Err(e @ BodyError::Busy { .. }) => {
            return retry_later(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("could not read the request: {e}"),
            );
        }
    };
    let header_length = match header_length {
        None => None,
        Some(Some(n)) => Some(n),
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "Inference-Header-Content-Length must be a byte count",
            );
        }
    };
    let serving = match find(&ctx.models(), name, version) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let limits = RequestLimits {
        max_batch: serving.version.max_batch,
        max_elements: ctx.config.profile().max_request_elements(),
    };
    // A large body leaves large buffers freed behind it: give them back after the call.
    let _give_back = (body.len() as u64 >= router::GIVE_BACK_AFTER / 8).then_some(GiveBack);
    let parsed = InferRequest::parse(&body, header_length, &limits);
    // The body's bytes are not needed past here; the tensors hold what the engine reads.
    drop(body);
    let mut request = match parsed {
        Ok(r) => r,
        Err(e @ OipError::TooManyElements { .. }) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string());
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(unknown) = request
        .outputs
        .iter()
        .find(|o| !serving.version.outputs.iter().any(|s| s.name == o.name))
    {
        let names: Vec<&str> = serving
            .version
            .outputs
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown output {:?} (the model gives {})",
                unknown.name,
                names.join(", ")
            ),
        );
    }
    let inputs = std::mem::take(&mut request.inputs);
    let rows = router::rows(&inputs);
    let started = std::time::Instant::now();
    let answered = router::infer(ctx, name, &serving, inputs).await;
    // The model's service, for the status: what it answered or failed (a caller's bad input and
    // a full queue say nothing about the model).
    let call = match &answered {
        Ok(answer) => Some((false, answer.rows_cloud)),
        Err(RouteError::Failed(_) | RouteError::Unavailable(_)) => Some((true, 0)),
        Err(RouteError::BadInput(_) | RouteError::Busy(_) | RouteError::TooLarge(_)) => None,
    };
    if let Some((failed, rows_offloaded)) = call {
        let now = std::time::Instant::now();
        ctx.health.record(
            name,
            crate::health::Call {
                version: serving.version.version,
                latency: now.saturating_duration_since(started),
                failed,
                rows,
                rows_offloaded,
            },
            now,
        );
    }
    match answered {
        Ok(answer) => {
            let mut parameters = Map::new();
            parameters.insert("rows_local".into(), json!(answer.rows_local));
            parameters.insert("rows_cloud".into(), json!(answer.rows_cloud));
            if let Some(note) = answer.note {
                parameters.insert("fallback".into(), Value::String(note));
            }
            if !answer.truncated.is_empty() {
                parameters.insert("truncated".into(), json!(answer.truncated));
            }
            let mut fields = Map::new();
            fields.insert("model_name".into(), json!(name));
            fields.insert("model_version".into(), json!(answer.version.to_string()));
            if let Some(id) = &request.id {
                fields.insert("id".into(), json!(id));
            }
            fields.insert("parameters".into(), Value::Object(parameters));
            let outputs = match classified(&request, answer.outputs, &serving.labels) {
                Ok(o) => o,
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            };
            let chosen = request.select(&outputs);
            match oip::encode_response(fields, &chosen) {
                Ok(encoded) => {
                    let mut r = Response::new(Full::new(Bytes::from(encoded.body)));
                    let content_type = match encoded.header_length {
                        Some(n) => {
                            r.headers_mut()
                                .insert(oip::HEADER_LENGTH, hyper::header::HeaderValue::from(n));
                            "application/octet-stream"
                        }
                        None => "application/json",
                    };
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(content_type),
                    );
                    r
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        Err(e) => {
            Counters::count(&ctx.counters.errors);
            let r = error(status_of(&e), e.to_string());
            if matches!(e, RouteError::Busy(_)) {
                retry_later(r)
            } else {
                r
            }
        }
    }
}

/// Gives the memory the allocator holds free back to the system when dropped (at the end of a
/// large request), on a blocking thread.
struct GiveBack;

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(outpost_heap::give_back);
        }
    }
}

/// `outputs` with those asked for with `parameters.classification: N` replaced by their top N
/// classes per row, labelled from the model's class names.
fn classified(
    request: &InferRequest,
    mut outputs: Vec<outpost_shared::Tensor>,
    labels: &[String],
) -> Result<Vec<outpost_shared::Tensor>, String> {
    for wanted in &request.outputs {
        let Some(top) = wanted.classification else {
            continue;
        };
        if let Some(out) = outputs.iter_mut().find(|o| o.name() == wanted.name) {
            *out = oip::classification::classify(out, top, labels).map_err(|e| {
                format!(
                    "output {:?} cannot be classified (it must hold numbers): {e}",
                    wanted.name
                )
            })?;
        }
    }
    Ok(outputs)
}

/// `r` with `Retry-After: 1`: calls take milliseconds to seconds, so try again in one.
fn retry_later(mut r: Reply) -> Reply {
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from_static("1"),
    );
    r
}

/// The status code of a failed inference, by whose fault it failed: the one place it is decided.
fn status_of(e: &RouteError) -> StatusCode {
    match e {
        RouteError::BadInput(_) => StatusCode::BAD_REQUEST,
        RouteError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        RouteError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        RouteError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        RouteError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
    }
}

fn metrics(ctx: &Context) -> Reply {
    let c = ctx.counters.snapshot();
    let text = format!(
        "# HELP outpost_agent_inferences_total Inferences by where they ran.\n# TYPE outpost_agent_inferences_total counter\n\
         outpost_agent_inferences_total{{where=\"local\"}} {}\noutpost_agent_inferences_total{{where=\"cloud\"}} {}\n\
         # HELP outpost_agent_inference_errors_total Failed inferences.\n# TYPE outpost_agent_inference_errors_total counter\noutpost_agent_inference_errors_total {}\n\
         # HELP outpost_agent_manifests_rejected_total Releases refused.\n# TYPE outpost_agent_manifests_rejected_total counter\noutpost_agent_manifests_rejected_total {}\n\
         # HELP outpost_agent_chunks_fetched_total Chunks fetched.\n# TYPE outpost_agent_chunks_fetched_total counter\noutpost_agent_chunks_fetched_total {}\n\
         # HELP outpost_agent_bytes_fetched_total Bytes fetched.\n# TYPE outpost_agent_bytes_fetched_total counter\noutpost_agent_bytes_fetched_total {}\n\
         # HELP outpost_agent_broker_connects_total Connections made to the MQTT broker.\n# TYPE outpost_agent_broker_connects_total counter\noutpost_agent_broker_connects_total {}\n\
         # HELP outpost_agent_working_memory_bytes Working memory for running calls: the budget and what running calls hold.\n# TYPE outpost_agent_working_memory_bytes gauge\n\
         outpost_agent_working_memory_bytes{{state=\"budget\"}} {}\noutpost_agent_working_memory_bytes{{state=\"in_use\"}} {}\n\
         # HELP outpost_agent_call_memory_limit_bytes The most working memory one call may take.\n# TYPE outpost_agent_call_memory_limit_bytes gauge\noutpost_agent_call_memory_limit_bytes {}\n\
         # HELP outpost_agent_request_body_bytes Request bodies held in memory: the budget and what is held.\n# TYPE outpost_agent_request_body_bytes gauge\n\
         outpost_agent_request_body_bytes{{state=\"budget\"}} {}\noutpost_agent_request_body_bytes{{state=\"in_use\"}} {}\n\
         # HELP outpost_agent_calls_split_total Calls over the per-call working memory, run in row parts.\n# TYPE outpost_agent_calls_split_total counter\noutpost_agent_calls_split_total {}\n\
         # HELP outpost_agent_calls_too_large_total Calls refused because one row needs more than a call may take.\n# TYPE outpost_agent_calls_too_large_total counter\noutpost_agent_calls_too_large_total {}\n\
         # HELP outpost_agent_request_panics_total Requests whose handling panicked (answered 500).\n# TYPE outpost_agent_request_panics_total counter\noutpost_agent_request_panics_total {}\n",
        c.inferences_local,
        c.inferences_offloaded,
        c.inference_errors,
        c.manifests_rejected,
        c.chunks_fetched,
        c.bytes_fetched,
        c.broker_connects,
        ctx.working_memory.total(),
        ctx.working_memory.in_use(),
        ctx.config.profile().call_memory_bytes(),
        ctx.bodies.total(),
        ctx.bodies.in_use(),
        ctx.counters.split.load(Ordering::Relaxed),
        ctx.counters.too_large.load(Ordering::Relaxed),
        ctx.counters.panics.load(Ordering::Relaxed),
    );
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

#[cfg(test)]
mod tests {
    use outpost_runtime::{Engine, RunError};
    use outpost_shared::{DataType, Dim, ModelVersion, Placement, Tensor, TensorSpec};

    use outpost_runtime::admission::AdmissionLimits;
    use outpost_runtime::memory::MemoryBudget;

    use super::*;
    use crate::offload::OffloadError;

    /// An engine whose every call fails with one kind of [`RunError`].
    #[derive(Debug)]
    struct FailingEngine {
        inputs: Vec<TensorSpec>,
        error: RunError,
    }

    impl Engine for FailingEngine {
        fn name(&self) -> &'static str {
            "failing"
        }
        fn inputs(&self) -> &[TensorSpec] {
            &self.inputs
        }
        fn outputs(&self) -> &[TensorSpec] {
            &[]
        }
        fn run(&self, _: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
            Err(self.error.clone())
        }
    }

    fn local_version(inputs: &[TensorSpec]) -> ModelVersion {
        ModelVersion {
            version: 1,
            inputs: inputs.to_vec(),
            outputs: vec![],
            placement: Placement::Local,
            max_batch: None,
            text: None,
            variants: vec![],
        }
    }

    /// An engine whose calls take `ms` milliseconds and answer nothing.
    #[derive(Debug)]
    struct SlowEngine {
        inputs: Vec<TensorSpec>,
        ms: u64,
    }

    impl Engine for SlowEngine {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn inputs(&self) -> &[TensorSpec] {
            &self.inputs
        }
        fn outputs(&self) -> &[TensorSpec] {
            &[]
        }
        fn run(&self, _: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
            std::thread::sleep(std::time::Duration::from_millis(self.ms));
            Ok(vec![])
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_past_the_models_running_and_waiting_limits_are_busy() {
        let inputs = vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![Dim::Dynamic],
        }];
        let serving = Arc::new(Serving::local(
            &local_version(&inputs),
            Some(Arc::new(SlowEngine { inputs, ms: 300 })),
            AdmissionLimits {
                running: 2,
                waiting: 2,
            },
        ));
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let serving = Arc::clone(&serving);
                tokio::spawn(async move {
                    let x = Tensor::from_values("x", vec![1], &[0.5f32]).unwrap();
                    let budget = MemoryBudget::new(1 << 30);
                    let memory = router::CallMemory {
                        budget: &budget,
                        per_call: 1 << 30,
                    };
                    router::run_local(&memory, &serving, vec![x]).await
                })
            })
            .collect();
        let mut busy = Vec::new();
        for call in calls {
            if let Err(e) = call.await.unwrap() {
                busy.push(e);
            }
        }
        // Two run, two wait and then run, two are turned away at once.
        assert_eq!(busy.len(), 2, "{busy:?}");
        for e in &busy {
            assert!(matches!(e, RouteError::Busy(_)), "{e:?}");
            assert_eq!(status_of(e), StatusCode::SERVICE_UNAVAILABLE);
            assert!(
                e.to_string()
                    .contains("2 calls are running and 2 are waiting"),
                "{e}"
            );
        }
    }

    /// The status an app gets when the local engine fails with `error`.
    async fn answered(error: RunError) -> (StatusCode, String) {
        let inputs = vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![Dim::Dynamic, Dim::Fixed(2)],
        }];
        let serving = Serving::local(
            &local_version(&inputs),
            Some(Arc::new(FailingEngine { inputs, error })),
            AdmissionLimits {
                running: 1,
                waiting: 0,
            },
        );
        let x = Tensor::from_values("x", vec![1, 2], &[0.5f32, 0.5]).unwrap();
        let budget = MemoryBudget::new(1 << 30);
        let memory = router::CallMemory {
            budget: &budget,
            per_call: 1 << 30,
        };
        let e = router::run_local(&memory, &serving, vec![x])
            .await
            .unwrap_err();
        (status_of(&e), e.to_string())
    }

    #[tokio::test]
    async fn an_engine_failure_is_answered_by_whose_fault_it_is() {
        let cases = [
            (
                RunError::Input("input \"x\" is out of range".into()),
                StatusCode::BAD_REQUEST,
            ),
            (
                RunError::Model("the model failed: NaN".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                RunError::Device("the GPU ran out of memory".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (error, want) in cases {
            let message = error.to_string();
            let (status, said) = answered(error).await;
            assert_eq!(status, want, "{message}");
            assert_eq!(said, message);
        }
    }

    #[test]
    fn only_the_callers_fault_is_a_bad_request() {
        let bad = router::cloud_error(OffloadError::Refused {
            kind: outpost_shared::ErrorKind::InvalidInput,
            message: "input \"x\" is missing".into(),
        });
        assert_eq!(status_of(&bad), StatusCode::BAD_REQUEST);
        let offline = router::cloud_error(OffloadError::Unreachable("timed out".into()));
        assert_eq!(status_of(&offline), StatusCode::SERVICE_UNAVAILABLE);
        assert!(offline.to_string().contains("no coordinator is reachable"));
        let failed = router::cloud_error(OffloadError::Refused {
            kind: outpost_shared::ErrorKind::Internal,
            message: "the model failed".into(),
        });
        assert_eq!(status_of(&failed), StatusCode::INTERNAL_SERVER_ERROR);
        let busy = router::cloud_error(OffloadError::Busy(50));
        assert_eq!(status_of(&busy), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            status_of(&RouteError::from(RunError::Model("broken".into()))),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_ne!(
            status_of(&RouteError::from(RunError::Device("lost".into()))),
            StatusCode::BAD_REQUEST
        );
    }
}
