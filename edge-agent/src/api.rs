//! The local Open Inference Protocol v2 REST API (JSON tensors), plus `/metrics` and
//! `/v1/status`. Errors are `{"error": "..."}`: 400 for a bad request (naming the input and what
//! was expected), 404 for an unknown model or version, 503 when a model cannot be served now.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use outpost_runtime::serve::{BodyError, read_body};
use outpost_shared::oip::{self, InferRequest};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::Context;
use crate::router::{self, RouteError};
use crate::state::Serving;

/// The largest request body accepted (64 MiB).
pub const MAX_BODY: usize = 64 << 20;

type Reply = Response<Full<Bytes>>;

/// Serves the API until shutdown.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
) {
    let handler = move |req| {
        let ctx = ctx.clone();
        async move { route(req, &ctx).await }
    };
    outpost_runtime::serve::serve_http(listener, handler, shutdown).await;
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
            &json!({ "name": "outpost-edge-agent", "version": env!("CARGO_PKG_VERSION"), "extensions": [oip::EXTENSION] }),
        ),
        (Method::GET, ["v2", "health", "live"]) => reply(StatusCode::OK, &json!({ "live": true })),
        (Method::GET, ["v2", "health", "ready"]) => {
            reply(StatusCode::OK, &json!({ "ready": true }))
        }
        (Method::GET, ["v1", "status"]) => reply(
            StatusCode::OK,
            &serde_json::to_value(crate::sync::status(ctx)).unwrap_or_default(),
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

/// The serving version of `name` (matching `version` if given).
fn find(ctx: &Context, name: &str, version: Option<&str>) -> Result<Arc<Serving>, Box<Reply>> {
    let slots = ctx.store.slots.read().map_err(|_| {
        Box::new(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "state lock poisoned",
        ))
    })?;
    let Some(slot) = slots.get(name) else {
        let known: Vec<&str> = slots.keys().map(String::as_str).collect();
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
            [Some(active), slot.previous.clone()]
                .into_iter()
                .flatten()
                .find(|s| s.version.version == wanted)
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
    match find(ctx, name, version) {
        Ok(s) => {
            let versions: Vec<String> = ctx
                .store
                .slots
                .read()
                .ok()
                .and_then(|slots| {
                    slots.get(name).map(|slot| {
                        [slot.active.clone(), slot.previous.clone()]
                            .into_iter()
                            .flatten()
                            .map(|s| s.version.version.to_string())
                            .collect()
                    })
                })
                .unwrap_or_default();
            reply(
                StatusCode::OK,
                &json!({
                    "name": name,
                    "versions": versions,
                    "platform": "onnx",
                    "inputs": specs(&s.version.inputs),
                    "outputs": specs(&s.version.outputs),
                    "parameters": {
                        "engine": crate::sync::engine_name(&s),
                        "placement": s.version.placement,
                        "adapter": s.adapter,
                        "gpu_fallback": s.gpu_fallback,
                    },
                }),
            )
        }
        Err(r) => *r,
    }
}

fn ready(ctx: &Context, name: &str, version: Option<&str>) -> Reply {
    match find(ctx, name, version) {
        Ok(_) => reply(StatusCode::OK, &json!({ "name": name, "ready": true })),
        Err(r) => *r,
    }
}

async fn infer(req: Request<Incoming>, ctx: &Context, name: &str, version: Option<&str>) -> Reply {
    let header_length = req
        .headers()
        .get(oip::HEADER_LENGTH)
        .map(|v| v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()));
    // Read the body before judging the request (see `read_body`).
    let body = match read_body(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request is larger than {} MiB", MAX_BODY >> 20),
            );
        }
        Err(BodyError::Unreadable(e)) => {
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
    let serving = match find(ctx, name, version) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let mut request = match InferRequest::parse(&body, header_length) {
        Ok(r) => r,
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
    match router::infer(ctx, name, &serving, inputs).await {
        Ok(answer) => {
            let mut parameters = Map::new();
            parameters.insert("rows_local".into(), json!(answer.rows_local));
            parameters.insert("rows_cloud".into(), json!(answer.rows_cloud));
            if let Some(note) = answer.note {
                parameters.insert("fallback".into(), Value::String(note));
            }
            let mut fields = Map::new();
            fields.insert("model_name".into(), json!(name));
            fields.insert("model_version".into(), json!(answer.version.to_string()));
            if let Some(id) = &request.id {
                fields.insert("id".into(), json!(id));
            }
            fields.insert("parameters".into(), Value::Object(parameters));
            let chosen = request.select(&answer.outputs);
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
            ctx.store.counters.errors.fetch_add(1, Ordering::Relaxed);
            match e {
                RouteError::BadInput(m) => error(StatusCode::BAD_REQUEST, m),
                RouteError::Unavailable(m) => error(StatusCode::SERVICE_UNAVAILABLE, m),
                RouteError::Failed(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
            }
        }
    }
}

fn metrics(ctx: &Context) -> Reply {
    let c = &ctx.store.counters;
    let text = format!(
        "# HELP outpost_agent_inferences_total Inferences by where they ran.\n# TYPE outpost_agent_inferences_total counter\n\
         outpost_agent_inferences_total{{where=\"local\"}} {}\noutpost_agent_inferences_total{{where=\"cloud\"}} {}\n\
         # HELP outpost_agent_inference_errors_total Failed inferences.\n# TYPE outpost_agent_inference_errors_total counter\noutpost_agent_inference_errors_total {}\n\
         # HELP outpost_agent_manifests_rejected_total Releases refused.\n# TYPE outpost_agent_manifests_rejected_total counter\noutpost_agent_manifests_rejected_total {}\n\
         # HELP outpost_agent_chunks_fetched_total Chunks fetched.\n# TYPE outpost_agent_chunks_fetched_total counter\noutpost_agent_chunks_fetched_total {}\n\
         # HELP outpost_agent_bytes_fetched_total Bytes fetched.\n# TYPE outpost_agent_bytes_fetched_total counter\noutpost_agent_bytes_fetched_total {}\n",
        c.local.load(Ordering::Relaxed),
        c.offloaded.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed),
        c.rejected.load(Ordering::Relaxed),
        c.chunks.load(Ordering::Relaxed),
        c.bytes.load(Ordering::Relaxed),
    );
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
