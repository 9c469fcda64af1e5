//! Serving loops both daemons use: an HTTP/1 server (plain, or over TLS) that one bad client
//! cannot starve, whose connections end with it, and waiting for the signal to stop.
//!
//! Bounds ([`ServeLimits`]): at most `max_connections` open connections; a connection must send
//! a request's headers within `header_timeout` of being accepted or of its last answer (hyper
//! measures the idle keep-alive wait and the header read with one timer); a body must keep
//! arriving at `body_min_rate` on average after `body_grace`; and a failed `accept` (out of
//! descriptors) backs off instead of spinning.
//!
//! At the cap, one more connection is accepted and held unserved, and the connection idle the
//! longest (no request running: waiting between requests, or still sending a request head), for
//! at least [`EVICT_AFTER_IDLE`], is closed to make room for it. So connections that hold a slot
//! and do nothing (a slowloris, a flood of idle sockets) are cut as soon as someone else needs
//! the slot, not after `header_timeout`, and a real call queued behind hundreds of them waits
//! about [`EVICT_AFTER_IDLE`] per `max_connections` of them. Connections with a request running
//! are never cut; when every slot runs one, the new connection waits for the first to end.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use tokio::sync::{Notify, Semaphore, watch};

use crate::Backoff;
use crate::memory::{MemoryBudget, Reservation};

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
    /// The longest wait for the next bytes of a body, whatever the average so far.
    pub idle: Duration,
}

impl BodyLimits {
    /// Bodies of at most `max_bytes`, at 64 KiB/s or faster after 10 s, with no pause of 10 s:
    /// a 64 MiB body may take up to 17 minutes, a client that stalls is cut after 10 s.
    pub const fn up_to(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            min_rate: 64 << 10,
            grace: Duration::from_secs(10),
            idle: Duration::from_secs(10),
        }
    }

    /// Bodies of at most `max_bytes` from a client on this machine (a local API): at 1 MiB/s
    /// or faster after 2 s, with no pause of 2 s. Loopback moves gigabytes a second, so only a
    /// client that holds its body back is cut, and it gives its connection slot and its
    /// buffered bytes back within seconds.
    pub const fn local(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            min_rate: 1 << 20,
            grace: Duration::from_secs(2),
            idle: Duration::from_secs(2),
        }
    }
}

/// The first wait after a failed `accept`, and the longest.
const ACCEPT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));

/// How long a connection must have been idle (no request running) before it may be closed to
/// make room for a new one at the cap. A client that means to send a request has sent its head
/// well within this on any link a local API sees; a real call's head takes microseconds on
/// loopback.
pub const EVICT_AFTER_IDLE: Duration = Duration::from_millis(250);

/// What the accept loop knows of one open connection.
#[derive(Debug)]
struct Tracked {
    /// Requests running on it.
    running: AtomicUsize,
    /// Since when it has run none.
    idle_since: Mutex<Instant>,
    /// Chosen to be closed (so it is not chosen again).
    evicted: AtomicBool,
    close: Notify,
}

/// The open connections, by id.
type Open = Arc<Mutex<HashMap<u64, Arc<Tracked>>>>;

/// Closes the connection idle the longest, if one has been idle for `min_idle`; whether one was
/// chosen.
fn evict_longest_idle(open: &Open, min_idle: Duration) -> bool {
    let Ok(open) = open.lock() else { return false };
    let now = Instant::now();
    let longest = open
        .values()
        .filter(|t| t.running.load(Ordering::SeqCst) == 0 && !t.evicted.load(Ordering::SeqCst))
        .filter_map(|t| Some((*t.idle_since.lock().ok()?, t)))
        .filter(|(since, _)| now.duration_since(*since) >= min_idle)
        .min_by_key(|(since, _)| *since);
    match longest {
        Some((_, t)) => {
            t.evicted.store(true, Ordering::SeqCst);
            t.close.notify_one();
            true
        }
        None => false,
    }
}

/// One request running on a connection, from its arrival until its answer's body has been
/// sent or dropped.
#[derive(Debug)]
struct Running(Arc<Tracked>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut since) = self.0.idle_since.lock() {
            *since = Instant::now();
        }
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body, holding its request's [`Running`] until it ends.
#[derive(Debug)]
struct Counted<B> {
    body: B,
    _running: Running,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How often the accept loop, holding a connection at the cap, looks again for one to close.
const EVICT_CHECK: Duration = Duration::from_millis(25);

/// Serves HTTP/1 on `listener` with `handler` within `limits` until `shutdown` changes.
/// Connection tasks live in one set, so shutdown ends them all, and with them whatever state the
/// handler holds. An answer's body may be streamed (`B`): its request counts as running, so its
/// connection is never closed at the cap, until the body has been sent or dropped.
pub async fn serve_http<H, F, B>(
    listener: tokio::net::TcpListener,
    limits: ServeLimits,
    handler: H,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve(listener, limits, None, handler, shutdown).await;
}

/// [`serve_http`] over TLS (`tls`): the handshake must finish within `header_timeout` of the
/// accept, and a connection still in it counts as idle at the cap.
pub async fn serve_https<H, F, B>(
    listener: tokio::net::TcpListener,
    limits: ServeLimits,
    tls: Arc<rustls::ServerConfig>,
    handler: H,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve(listener, limits, Some(acceptor), handler, shutdown).await;
}

/// Serves one connection's requests until it ends or the client stops.
async fn serve_connection<I, S, B>(io: I, limits: ServeLimits, service: S)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Counted<B>>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}

async fn serve<H, F, B>(
    listener: tokio::net::TcpListener,
    limits: ServeLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open: Open = Arc::default();
    let mut next_id = 0u64;
    let mut backoff = ACCEPT_BACKOFF;
    let mut connections = tokio::task::JoinSet::new();
    'accept: loop {
        // Finished connections leave the set (it holds only open ones).
        while connections.try_join_next().is_some() {}
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
        // A slot for it: a free one, or one freed by closing the longest-idle connection.
        let slot = loop {
            if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
                break slot;
            }
            evict_longest_idle(&open, EVICT_AFTER_IDLE);
            tokio::select! {
                _ = shutdown.changed() => break 'accept,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => break slot,
                    Err(_) => break 'accept,
                },
                _ = tokio::time::sleep(EVICT_CHECK) => {}
            }
        };
        let id = next_id;
        next_id += 1;
        let tracked = Arc::new(Tracked {
            running: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            evicted: AtomicBool::new(false),
            close: Notify::new(),
        });
        if let Ok(mut open) = open.lock() {
            open.insert(id, Arc::clone(&tracked));
        }
        let (handler, open, tls) = (handler.clone(), Arc::clone(&open), tls.clone());
        connections.spawn(async move {
            let _slot = slot;
            let on_requests = Arc::clone(&tracked);
            let service = hyper::service::service_fn(move |req| {
                on_requests.running.fetch_add(1, Ordering::SeqCst);
                let answer = handler(req);
                let running = Running(Arc::clone(&on_requests));
                async move {
                    let answer = answer.await;
                    Ok::<_, std::convert::Infallible>(answer.map(|body| Counted {
                        body,
                        _running: running,
                    }))
                }
            });
            let served = async {
                match tls {
                    None => serve_connection(stream, limits, service).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => serve_connection(stream, limits, service).await,
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                }
            };
            tokio::select! {
                () = served => {}
                () = tracked.close.notified() => {
                    tracing::debug!("closed an idle HTTP connection to make room at the cap");
                }
            }
            if let Ok(mut open) = open.lock() {
                open.remove(&id);
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
    /// It arrives slower than the limits allow, or pauses too long (answer 408).
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
    /// Other requests' bodies hold the memory bodies may take (answer 503 with `Retry-After`).
    #[error(
        "busy: request bodies being received hold the {total_mib} MiB this server keeps for them; try again"
    )]
    Busy {
        /// The budget for bodies, MiB.
        total_mib: u64,
    },
}

/// How much more of a body's budget is reserved at a time, as its bytes arrive.
const BODY_RESERVE_STEP: u64 = 1 << 20;

/// How long a body waits for other bodies to give budget back: shorter than the local API's
/// grace (2 s), so a new body is answered busy while the ones holding the budget are still
/// within their time, not given the room of a body cut for holding back.
const BODY_BUDGET_WAIT: Duration = Duration::from_secs(1);

/// Reads a whole request body within `limits`. Handlers read the body before judging a
/// request: answering early and closing would reset the connection under a client still
/// sending, and the client could lose the answer.
pub async fn read_body(body: Incoming, limits: &BodyLimits) -> Result<Bytes, BodyError> {
    read(body, limits, None).await.map(|(bytes, _)| bytes)
}

/// [`read_body`] within `budget`, shared by every body the server holds: the bytes are
/// reserved as they arrive (the declared length up front), and the reservation comes back with
/// the body, to be held as long as the body (or what is parsed from it) is.
pub async fn read_body_within(
    body: Incoming,
    limits: &BodyLimits,
    budget: &MemoryBudget,
) -> Result<(Bytes, Reservation), BodyError> {
    let (bytes, reservation) = read(body, limits, Some(budget)).await?;
    Ok((bytes, reservation.unwrap_or_else(Reservation::none)))
}

async fn read(
    mut body: Incoming,
    limits: &BodyLimits,
    budget: Option<&MemoryBudget>,
) -> Result<(Bytes, Option<Reservation>), BodyError> {
    let too_large = BodyError::TooLarge {
        limit: limits.max_bytes,
    };
    // A declared length over the limit is refused before anything is read.
    if body.size_hint().lower() > limits.max_bytes as u64 {
        return Err(too_large);
    }
    let busy = |b: &MemoryBudget| BodyError::Busy {
        total_mib: b.total() >> 20,
    };
    let mut reserved = match budget {
        Some(b) => {
            let declared = body.size_hint().lower().max(BODY_RESERVE_STEP);
            Some(
                b.reserve(declared, BODY_BUDGET_WAIT)
                    .await
                    .map_err(|_| busy(b))?,
            )
        }
        None => None,
    };
    let start = tokio::time::Instant::now();
    // The declared length is a hint: what arrives decides what is allocated past 1 MiB.
    let hint = usize::try_from(body.size_hint().lower()).unwrap_or(0);
    let mut bytes = BytesMut::with_capacity(hint.min(limits.max_bytes).min(1 << 20));
    let mut last = start;
    loop {
        // By now at least `min_rate` bytes a second since the grace ended, and no long pause.
        let allowed = limits.grace
            + Duration::from_secs_f64(bytes.len() as f64 / limits.min_rate.max(1) as f64);
        let deadline = (start + allowed).min(last + limits.idle);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => return Err(BodyError::Unreadable(e.to_string())),
            Ok(None) => return Ok((bytes.freeze(), reserved)),
            Err(_) => {
                return Err(BodyError::TooSlow {
                    received: bytes.len(),
                    elapsed_ms: start.elapsed().as_millis() as u64,
                });
            }
        };
        last = tokio::time::Instant::now();
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limits.max_bytes {
                return Err(too_large);
            }
            let needed = (bytes.len() + data.len()) as u64;
            if let (Some(b), Some(r)) = (budget, reserved.as_mut())
                && needed > r.bytes
            {
                let more = (needed - r.bytes).max(BODY_RESERVE_STEP);
                b.grow(r, more, BODY_BUDGET_WAIT)
                    .await
                    .map_err(|_| busy(b))?;
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
