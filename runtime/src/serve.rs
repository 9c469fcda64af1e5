//! Serving loops both daemons use: an HTTP/1 server that one bad client cannot starve, whose
//! connections end with it, and waiting for the signal to stop.
//!
//! Bounds ([`ServeLimits`]): at most `max_connections` open connections (past it the server
//! stops accepting and new connections wait in the kernel's backlog, costing no descriptor); a
//! connection must send a request's headers within `header_timeout` of being accepted or of its
//! last answer (hyper measures the idle keep-alive wait and the header read with one timer); a
//! body must keep arriving at `body_min_rate` on average after `body_grace`; and a failed
//! `accept` (out of descriptors) backs off instead of spinning.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Incoming};
use hyper::{Request, Response};
use tokio::sync::{Semaphore, watch};

use crate::Backoff;

/// How much an HTTP server lets its clients take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Open connections at once.
    pub max_connections: usize,
    /// The longest a connection may take to send a request's headers, counted from its accept
    /// or its last answer (so also the longest it may sit idle between requests).
    pub header_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// How a request body must arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// The largest body, in bytes.
    pub max_bytes: usize,
    /// The slowest average rate a body may arrive at after `grace`, in bytes per second.
    pub min_rate: u64,
    /// Time a body has before the rate counts.
    pub grace: Duration,
}

impl BodyLimits {
    /// Bodies of at most `max_bytes`, at 64 KiB/s or faster after 10 s: a 64 MiB body may take
    /// up to 17 minutes, a client that stalls is cut after 10 s.
    pub const fn up_to(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            min_rate: 64 << 10,
            grace: Duration::from_secs(10),
        }
    }
}

/// The first wait after a failed `accept`, and the longest.
const ACCEPT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));

/// Serves HTTP/1 on `listener` with `handler` within `limits` until `shutdown` changes.
/// Connection tasks live in one set, so shutdown ends them all, and with them whatever state the
/// handler holds.
pub async fn serve_http<H, F>(
    listener: tokio::net::TcpListener,
    limits: ServeLimits,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut backoff = ACCEPT_BACKOFF;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Finished connections leave the set (it holds only open ones).
        while connections.try_join_next().is_some() {}
        // A free slot first: at the cap, connections wait in the backlog, not in our memory.
        let slot = tokio::select! {
            _ = shutdown.changed() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.succeed();
                stream
            }
            Err(e) => {
                // Out of descriptors (EMFILE) or a connection reset before accept: wait, or
                // the loop spins on the error.
                let delay = backoff.fail();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        let handler = handler.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
    connections.shutdown().await;
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// It is larger than the limit (answer 413).
    #[error("the request body is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// It arrives slower than the limits allow (answer 408).
    #[error("the request body arrives too slowly: {received} bytes in {elapsed_ms} ms")]
    TooSlow {
        /// Bytes received when it was cut.
        received: usize,
        /// Time taken so far.
        elapsed_ms: u64,
    },
    /// The connection failed while reading it (answer 400).
    #[error("the request body could not be read: {0}")]
    Unreadable(String),
}

/// Reads a whole request body within `limits`. Handlers read the body before judging a
/// request: answering early and closing would reset the connection under a client still
/// sending, and the client could lose the answer.
pub async fn read_body(mut body: Incoming, limits: &BodyLimits) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge {
        limit: limits.max_bytes,
    };
    // A declared length over the limit is refused before anything is read.
    if body.size_hint().lower() > limits.max_bytes as u64 {
        return Err(too_large);
    }
    let start = tokio::time::Instant::now();
    // The declared length is a hint: what arrives decides what is allocated past 1 MiB.
    let hint = usize::try_from(body.size_hint().lower()).unwrap_or(0);
    let mut bytes = BytesMut::with_capacity(hint.min(limits.max_bytes).min(1 << 20));
    loop {
        // By now at least `min_rate` bytes a second since the grace ended.
        let allowed = limits.grace
            + Duration::from_secs_f64(bytes.len() as f64 / limits.min_rate.max(1) as f64);
        let frame = match tokio::time::timeout_at(start + allowed, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => return Err(BodyError::Unreadable(e.to_string())),
            Ok(None) => return Ok(bytes.freeze()),
            Err(_) => {
                return Err(BodyError::TooSlow {
                    received: bytes.len(),
                    elapsed_ms: start.elapsed().as_millis() as u64,
                });
            }
        };
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limits.max_bytes {
                return Err(too_large);
            }
            bytes.extend_from_slice(&data);
        }
    }
}

/// Waits for Ctrl-C or, on Unix, SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}
