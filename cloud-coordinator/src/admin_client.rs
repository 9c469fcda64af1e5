//! [`AdminClient`]: the typed client of a running coordinator's admin API (push, rollback,
//! model and fleet listings, metrics), on [`outpost_runtime::http`]. It reads the same wire
//! types the server writes ([`crate::admin`]); the CLI, the `outpost` tool and the tests use it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_runtime::http::{
    HttpClient, HttpError, Limits, Method, Request, Response, StatusCode, UploadProgress,
};
use outpost_shared::Placement;
use serde::de::DeserializeOwned;

use crate::admin::{
    DeviceStatus, ErrorReply, FinetuneEvent, ModelSummary, Published, PushQuery, encode,
};
use crate::registry::Quantize;

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The admin API cannot be reached.
    #[error("cannot reach the admin API at {addr} (is the coordinator running?): {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed or timed out after it was made.
    #[error("the admin API at {addr} did not answer: {source}")]
    Transport {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: HttpError,
    },
    /// HTTPS could not be set up, or the server's certificate is not trusted.
    #[error("TLS with the admin API at {addr}: {reason}")]
    Tls {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The coordinator refused the call, with its reason.
    #[error("{}", refusal(*status, message))]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The server's message (its `error`, or the body as text).
        message: String,
    },
    /// The answer is not what the admin API sends.
    #[error("the coordinator's answer to {what} is not what the admin API sends: {reason}")]
    BadBody {
        /// The call.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl AdminError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            AdminError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn refusal(status: StatusCode, message: &str) -> String {
    if status == StatusCode::UNAUTHORIZED {
        format!("the coordinator refused the admin token: {message}")
    } else {
        format!("{status}: {message}")
    }
}

/// What to push with a model file; [`Default`] is a local, int8-when-possible, stable push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Placement, rollout, quantisation and dry run (the sizes are set from the files below).
    pub query: PushQuery,
    /// A bigger model with the same signature for the coordinator to run.
    pub cloud_model: Option<Vec<u8>>,
    /// Inputs for the int8 accuracy gate: an inference request body (`{"inputs": [...]}`).
    pub samples: Option<Vec<u8>>,
    /// A HuggingFace `tokenizer.json`: devices then take text for the model's token ids
    /// (`query.text` describes the text input).
    pub tokenizer: Option<Vec<u8>>,
}

impl PushOptions {
    /// Where inference runs.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.query.placement = placement;
        self
    }

    /// The share of devices (0–100) that get the version first.
    pub fn rollout(mut self, percent: u8) -> Self {
        self.query.rollout_percent = percent;
        self
    }

    /// The most rows one request may carry; devices refuse more with a 400 that names it.
    pub fn max_batch(mut self, rows: u64) -> Self {
        self.query.max_batch = Some(rows);
        self
    }

    /// The edge variant's weights.
    pub fn quantize(mut self, quantize: Quantize) -> Self {
        self.query.quantize = Some(quantize);
        self
    }

    /// Measure and report; publish nothing.
    pub fn dry_run(mut self) -> Self {
        self.query.dry_run = true;
        self
    }

    /// A bigger model for the coordinator to run.
    pub fn cloud_model(mut self, bytes: Vec<u8>) -> Self {
        self.cloud_model = Some(bytes);
        self
    }

    /// The accuracy gate's sample file.
    pub fn samples(mut self, bytes: Vec<u8>) -> Self {
        self.samples = Some(bytes);
        self
    }

    /// The model's `tokenizer.json`: devices take text for it.
    pub fn tokenizer(mut self, json: Vec<u8>) -> Self {
        self.tokenizer = Some(json);
        self
    }

    /// The `[[backend]]` that serves the model's offloaded calls.
    pub fn backend(mut self, name: impl Into<String>) -> Self {
        self.query.backend = Some(name.into());
        self
    }
}

/// The typed client of one coordinator's admin API.
#[derive(Clone)]
pub struct AdminClient {
    http: HttpClient,
    token: String,
    upload_progress: Option<UploadProgress>,
    finetune_progress: Option<FinetuneProgress>,
}

/// Told each line of a fine-tune's progress.
pub type FinetuneProgress = Arc<dyn Fn(&FinetuneEvent) + Send + Sync>;

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("addr", &self.http.addr())
            .finish_non_exhaustive()
    }
}

/// How long an admin call may take: a push of a big model is quantised and checked before the
/// answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(600);

impl AdminClient {
    /// A client of the admin API at `addr`, with the bearer `token`.
    pub fn new(addr: SocketAddr, token: impl Into<String>) -> Self {
        AdminClient {
            http: HttpClient::new(addr).with_limits(Limits {
                timeout: ADMIN_TIMEOUT,
                ..Limits::default()
            }),
            token: token.into(),
            upload_progress: None,
            finetune_progress: None,
        }
    }

    /// The client of an in-process coordinator.
    pub fn of(coordinator: &crate::CoordinatorHandle) -> Self {
        AdminClient::new(coordinator.admin_addr, coordinator.admin_token.clone())
    }

    /// The same client over HTTPS (an admin API with `[admin] tls_cert`): the server's
    /// certificate must chain to a certificate of the PEM file `ca` and be valid for `name` (a
    /// DNS name or an IP address).
    pub fn over_tls(mut self, ca: &std::path::Path, name: &str) -> Result<Self, AdminError> {
        let tls_error = |reason: String| AdminError::Tls {
            addr: self.http.addr(),
            reason,
        };
        let roots = outpost_runtime::tls::roots(ca).map_err(|e| tls_error(e.to_string()))?;
        let config = outpost_runtime::tls::client_config_without_identity(roots)
            .map_err(|e| tls_error(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| tls_error(format!("{name:?} is not a DNS name or an IP address: {e}")))?;
        self.http = self.http.with_tls(std::sync::Arc::new(config), name);
        Ok(self)
    }

    /// The same client with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.http = self.http.with_limits(limits);
        self
    }

    /// The same client, telling `progress` as pushes upload.
    pub fn on_upload(mut self, progress: UploadProgress) -> Self {
        self.upload_progress = Some(progress);
        self
    }

    /// The same client, telling `progress` each line of a fine-tune's progress.
    pub fn on_finetune(mut self, progress: FinetuneProgress) -> Self {
        self.finetune_progress = Some(progress);
        self
    }

    /// The admin API's address.
    pub fn addr(&self) -> SocketAddr {
        self.http.addr()
    }

    /// Pushes `model` as `name`: the coordinator checks it, stores it as chunks, signs and
    /// announces a new version (or, for a dry run, only reports).
    pub async fn push(
        &self,
        name: &str,
        model: Vec<u8>,
        options: &PushOptions,
    ) -> Result<Published, AdminError> {
        let mut body = model;
        let mut query = options.query.clone();
        query.cloud_size = options.cloud_model.as_ref().map(Vec::len);
        query.samples_size = options.samples.as_ref().map(Vec::len);
        query.tokenizer_size = options.tokenizer.as_ref().map(Vec::len);
        // The body's order is the server's: model, cloud model, tokenizer, samples.
        for extra in [&options.cloud_model, &options.tokenizer, &options.samples]
            .into_iter()
            .flatten()
        {
            body.extend_from_slice(extra);
        }
        let mut request = Request::post(
            format!("/v1/models/{}?{}", encode(name), query.to_query()),
            body,
        );
        if let Some(progress) = &self.upload_progress {
            request = request.on_upload(progress.clone());
        }
        self.call(request).await
    }

    /// Retrains `name`'s head on `data` (JSON Lines of labelled examples) and, when the new
    /// head is better on held-out examples, publishes it. A head that is not better is the
    /// refusal [`AdminError::Status`] (422) whose message carries both figures. The answer is
    /// streamed: [`AdminClient::on_finetune`] is told each [`FinetuneEvent`] as it comes.
    pub async fn finetune(
        &self,
        name: &str,
        data: Vec<u8>,
        query: &crate::finetune::FinetuneQuery,
    ) -> Result<crate::finetune::FinetuneReport, AdminError> {
        let what = format!("POST /v1/models/{name}/finetune");
        let mut request = Request::post(
            format!("/v1/models/{}/finetune?{}", encode(name), query.to_query()),
            data,
        )
        .header("Accept", crate::admin::NDJSON);
        if let Some(progress) = &self.upload_progress {
            request = request.on_upload(progress.clone());
        }
        if let Some(tell) = &self.finetune_progress {
            let (tell, pending) = (Arc::clone(tell), Mutex::new(Vec::<u8>::new()));
            request = request.on_download(Arc::new(move |piece: &[u8]| {
                let Ok(mut pending) = pending.lock() else {
                    return;
                };
                pending.extend_from_slice(piece);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if let Ok(event) = serde_json::from_slice::<FinetuneEvent>(&line) {
                        tell(&event);
                    }
                }
            }));
        }
        let answer = self.exchange(request.bearer(&self.token)).await?;
        let streamed = answer
            .header("content-type")
            .is_some_and(|t| t.starts_with(crate::admin::NDJSON));
        if !streamed {
            check(&answer)?;
            return serde_json::from_slice(&answer.body).map_err(|e| AdminError::BadBody {
                what,
                reason: e.to_string(),
            });
        }
        let last = answer
            .body
            .split(|&b| b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap_or_default();
        let bad = |reason: String| AdminError::BadBody {
            what: what.clone(),
            reason,
        };
        match serde_json::from_slice::<FinetuneEvent>(last) {
            Ok(FinetuneEvent::Done {
                status,
                report,
                error,
            }) => {
                let status = StatusCode::from_u16(status)
                    .map_err(|e| bad(format!("status {status}: {e}")))?;
                match report {
                    Some(report) if status.is_success() => Ok(*report),
                    report => Err(AdminError::Status {
                        status,
                        message: error
                            .or_else(|| report.and_then(|r| r.error))
                            .unwrap_or_else(|| status.to_string()),
                    }),
                }
            }
            Ok(other) => Err(bad(format!(
                "the stream ended before its last line (after {other:?}): did the coordinator stop?"
            ))),
            Err(e) => Err(bad(format!("its last line: {e}"))),
        }
    }

    /// Publishes kept version `to` of `name` as a new, stable version.
    pub async fn rollback(&self, name: &str, to: u64) -> Result<Published, AdminError> {
        self.call(Request::new(
            Method::POST,
            format!("/v1/models/{}/rollback?to={to}", encode(name)),
        ))
        .await
    }

    /// Moves model `name`'s candidate along: another share of devices (the same devices
    /// first), promoted to stable, or aborted.
    pub async fn rollout(
        &self,
        name: &str,
        action: crate::registry::RolloutAction,
    ) -> Result<Published, AdminError> {
        let query = match action {
            crate::registry::RolloutAction::Percent(p) => format!("percent={p}"),
            crate::registry::RolloutAction::Promote => "promote".to_owned(),
            crate::registry::RolloutAction::Abort => "abort".to_owned(),
        };
        self.call(Request::new(
            Method::POST,
            format!("/v1/models/{}/rollout?{query}", encode(name)),
        ))
        .await
    }

    /// The models and their versions.
    pub async fn models(&self) -> Result<Vec<ModelSummary>, AdminError> {
        self.call(Request::get("/v1/models")).await
    }

    /// The devices and their last status.
    pub async fn fleet(&self) -> Result<Vec<DeviceStatus>, AdminError> {
        self.call(Request::get("/v1/fleet")).await
    }

    /// Revokes device `device`: from then on the coordinator and its broker refuse it.
    pub async fn revoke(&self, device: &str) -> Result<crate::admin::Revoked, AdminError> {
        self.call(Request::new(
            outpost_runtime::http::Method::POST,
            format!("/v1/devices/{device}/revoke"),
        ))
        .await
    }

    /// The revoked devices.
    pub async fn revoked(&self) -> Result<Vec<crate::admin::Revoked>, AdminError> {
        self.call(Request::get("/v1/revoked")).await
    }

    /// The Prometheus metrics, as text.
    pub async fn metrics(&self) -> Result<String, AdminError> {
        let what = "GET /metrics".to_owned();
        let answer = self.exchange(Request::get("/metrics")).await?;
        check(&answer)?;
        String::from_utf8(answer.body.to_vec()).map_err(|e| AdminError::BadBody {
            what,
            reason: e.to_string(),
        })
    }

    async fn call<T: DeserializeOwned>(&self, request: Request) -> Result<T, AdminError> {
        let what = format!("{} {}", request.method, request.path);
        let answer = self.exchange(request.bearer(&self.token)).await?;
        check(&answer)?;
        serde_json::from_slice(&answer.body).map_err(|e| AdminError::BadBody {
            what,
            reason: e.to_string(),
        })
    }

    async fn exchange(&self, request: Request) -> Result<Response, AdminError> {
        let addr = self.http.addr();
        self.http
            .send(request)
            .await
            .map_err(|source| match source {
                HttpError::Connect { source, .. } => AdminError::Connect { addr, source },
                HttpError::Tls { source, .. } => AdminError::Tls {
                    addr,
                    reason: format!(
                        "{source} (an admin API without TLS answers no handshake; one whose certificate is not from the CA given fails here)"
                    ),
                },
                source => AdminError::Transport { addr, source },
            })
    }
}

/// A success, or the refusal with the server's message.
fn check(answer: &Response) -> Result<(), AdminError> {
    if answer.status.is_success() {
        return Ok(());
    }
    let text = answer.text();
    let message = serde_json::from_slice::<ErrorReply>(&answer.body)
        .map(|e| e.error)
        .unwrap_or(text);
    Err(AdminError::Status {
        status: answer.status,
        message,
    })
}
