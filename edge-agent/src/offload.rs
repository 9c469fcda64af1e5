//! The agent's QUIC client to its coordinators: one connection reused for every request, the
//! configured coordinators tried in order (failover), each verified against the fleet CA with
//! this device's certificate (mutual TLS), keep-alive so an idle connection does not silently die.
//!
//! After every coordinator failed, the next attempt waits a jittered, exponentially growing delay
//! (`outpost_runtime::Backoff`: 250 ms doubling to 30 s, each drawn from half to one and a half
//! times that); calls in between fail at once with the last reason, so a cascade falls back to
//! the device without waiting on connection timeouts. The first call after the delay
//! reconnects; success resets it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use firmware_config::{AgentConfig, HostPort};
use outpost_runtime::Backoff;
use outpost_shared::frame::{self, HEADER_BYTES, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use outpost_shared::{ChunkId, ErrorKind, Request, Response, Tensor};
use tokio::sync::{Mutex, watch};

/// Why an offloaded request failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// No coordinator could be reached.
    #[error("no coordinator is reachable: {0}")]
    Unreachable(String),
    /// The coordinator is at capacity.
    #[error("the coordinator is busy; retry in {0} ms")]
    Busy(u32),
    /// The coordinator answered with an error.
    #[error("the coordinator refused: {message}")]
    Refused {
        /// Its kind.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
    /// The answer was not what the protocol allows.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The coordinator did not answer within the request's deadline (a stalled stream).
    #[error("the coordinator did not answer within {} s", .0.as_secs())]
    TimedOut(Duration),
}

/// How long a connection may go without a packet from the coordinator before it counts as
/// dead (quinn's default is 30 s; a stuck install would wait that long).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(6);

/// How long one request may take, from opening its stream to its last answer; past it the
/// request fails, the connection is dropped and the next round of connecting starts with the
/// next coordinator, so an installer or a caller moves on from a stalled coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadlines {
    hello: Duration,
    infer: Duration,
    chunks: Duration,
}

impl Deadlines {
    /// From `coordinator.request_timeout_s` (T): an inference T, a hello T/6 within 1 to 5 s,
    /// a batch of up to 256 chunks 4 T (room for tens of MiB on a slow link). T = 30 s gives
    /// 5 s, 30 s and 120 s.
    pub(crate) fn from_timeout(timeout: Duration) -> Self {
        Self {
            hello: (timeout / 6).clamp(Duration::from_secs(1), Duration::from_secs(5)),
            infer: timeout,
            chunks: timeout.saturating_mul(4),
        }
    }

    /// The deadline of `request`.
    pub(crate) fn of(&self, request: &Request) -> Duration {
        match request {
            Request::Hello { .. } => self.hello,
            Request::GetChunks { .. } | Request::Releases { .. } => self.chunks,
            Request::Infer { .. } => self.infer,
        }
    }
}

/// The QUIC client; cheap to clone.
#[derive(Clone, Debug)]
pub struct OffloadClient {
    endpoint: quinn::Endpoint,
    coordinators: Vec<HostPort>,
    deadlines: Deadlines,
    link: Arc<Mutex<Link>>,
}

/// The shared connection and the state of reconnecting.
#[derive(Debug)]
struct Link {
    connection: Option<quinn::Connection>,
    /// Connection rounds that failed in a row, and the delay before the next.
    backoff: Backoff,
    /// No attempt before this.
    retry_at: Option<Instant>,
    /// Why the last round failed.
    last_error: String,
    /// The index in the list of the coordinator `connection` is to.
    connected_to: usize,
    /// The coordinator the next round starts with: the first, or the one after a coordinator
    /// that let a request pass its deadline.
    first: usize,
    /// The round of connecting in flight, if one is: its result, when it has one. Callers that
    /// need a connection meanwhile wait for it (within their own deadline) outside the lock.
    connecting: Option<watch::Receiver<Option<Result<quinn::Connection, String>>>>,
}

/// What a caller that needs a connection does, decided under the lock.
enum Step {
    /// Use this live connection.
    Ready(quinn::Connection),
    /// Fail at once (the back-off delay has not passed).
    Fail(OffloadError),
    /// Wait for the round in flight.
    Wait(watch::Receiver<Option<Result<quinn::Connection, String>>>),
    /// Make the round, starting with this coordinator, and tell the waiters.
    Connect(
        watch::Sender<Option<Result<quinn::Connection, String>>>,
        usize,
    ),
}

/// Reconnect delays: 250 ms after the first failed round, doubling to 30 s, jittered.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

impl Link {
    fn new() -> Self {
        Self {
            connection: None,
            backoff: RECONNECT,
            retry_at: None,
            last_error: String::new(),
            connected_to: 0,
            first: 0,
            connecting: None,
        }
    }
}

impl OffloadClient {
    /// A client for `config`'s coordinators, presenting `identity` (the device's certificate
    /// and key) and verifying coordinators against the fleet CA.
    pub fn new(
        config: &AgentConfig,
        identity: outpost_runtime::tls::Identity,
    ) -> Result<Self, String> {
        let roots =
            outpost_runtime::tls::roots(&config.fleet.ca).map_err(|e| format!("fleet CA: {e}"))?;
        let tls = outpost_runtime::tls::client_config(roots, identity, Some(frame::ALPN))
            .map_err(|e| e.to_string())?;
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        // A coordinator that vanished (killed, unplugged) sends nothing: the connection is
        // declared dead after IDLE_TIMEOUT without a packet, failing its streams, and the next
        // call reconnects. Keep-alives every third of it keep a live but quiet link open.
        transport.keep_alive_interval(Some(IDLE_TIMEOUT / 3));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).map_err(|e| e.to_string())?,
        ));
        transport.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024));
        transport.receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024));
        client.transport_config(Arc::new(transport));
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| format!("QUIC client: {e}"))?;
        endpoint.set_default_client_config(client);
        Ok(Self {
            endpoint,
            coordinators: config.coordinator.addresses.clone(),
            deadlines: Deadlines::from_timeout(config.coordinator.request_timeout()),
            link: Arc::new(Mutex::new(Link::new())),
        })
    }

    /// The live connection, or a new one to the first coordinator that answers (unless the
    /// last round failed and its back-off delay has not passed). One round of connecting runs at
    /// a time and never under the lock: callers arriving meanwhile wait for its result, each at
    /// most `wait` (its own request's deadline).
    async fn connection(&self, wait: Duration) -> Result<quinn::Connection, OffloadError> {
        let step = {
            let mut link = self.link.lock().await;
            self.next_step(&mut link)
        };
        match step {
            Step::Ready(c) => Ok(c),
            Step::Fail(e) => Err(e),
            Step::Wait(mut round) => {
                match tokio::time::timeout(wait, round.wait_for(Option::is_some)).await {
                    Ok(Ok(result)) => match result.as_ref() {
                        Some(Ok(c)) => Ok(c.clone()),
                        Some(Err(why)) => Err(OffloadError::Unreachable(why.clone())),
                        None => Err(OffloadError::Unreachable("no connection yet".into())),
                    },
                    // Its caller went away mid-round: the next call starts another.
                    Ok(Err(_)) => Err(OffloadError::Unreachable(
                        "the attempt to connect was abandoned".into(),
                    )),
                    Err(_) => Err(OffloadError::TimedOut(wait)),
                }
            }
            Step::Connect(done, first) => {
                let round = self.round(first).await;
                let mut link = self.link.lock().await;
                link.connecting = None;
                let result = match round {
                    Ok((c, index)) => {
                        tracing::info!(coordinator = %self.coordinators[index], after_failures = link.backoff.failures(), "connected to coordinator");
                        link.connection = Some(c.clone());
                        link.connected_to = index;
                        link.backoff.connected();
                        link.retry_at = None;
                        link.last_error.clear();
                        Ok(c)
                    }
                    Err(why) => {
                        let delay = link.backoff.fail();
                        link.retry_at = Some(Instant::now() + delay);
                        link.last_error = why;
                        tracing::debug!(
                            failures = link.backoff.failures(),
                            ?delay,
                            error = link.last_error,
                            "no coordinator reachable"
                        );
                        Err(link.last_error.clone())
                    }
                };
                done.send_replace(Some(result.clone()));
                result.map_err(OffloadError::Unreachable)
            }
        }
    }

    /// What a caller needing a connection does now (under the lock; nothing here waits).
    fn next_step(&self, link: &mut Link) -> Step {
        if let Some(c) = link.connection.as_ref() {
            if c.close_reason().is_none() {
                return Step::Ready(c.clone());
            }
            link.connection = None;
        }
        if let Some(round) = &link.connecting {
            // A round whose maker went away (its sender dropped) is over: start another.
            if round.has_changed().is_ok() {
                return Step::Wait(round.clone());
            }
            link.connecting = None;
        }
        if let Some(at) = link.retry_at {
            let now = Instant::now();
            if now < at {
                return Step::Fail(OffloadError::Unreachable(format!(
                    "{} (next attempt in {:.1} s)",
                    link.last_error,
                    (at - now).as_secs_f64()
                )));
            }
        }
        let (done, round) = watch::channel(None);
        link.connecting = Some(round);
        Step::Connect(done, link.first)
    }

    /// One round: each coordinator in turn from `first`, until one answers; it and its index,
    /// or every coordinator's reason.
    async fn round(&self, first: usize) -> Result<(quinn::Connection, usize), String> {
        let mut failures = Vec::new();
        let count = self.coordinators.len();
        for index in (0..count).map(|k| (first + k) % count) {
            let coordinator = &self.coordinators[index];
            match self.connect(coordinator).await {
                Ok(c) => return Ok((c, index)),
                Err(e) => failures.push(format!("{coordinator}: {e}")),
            }
        }
        if failures.is_empty() {
            failures.push("no coordinator is configured".into());
        }
        Err(failures.join("; "))
    }

    async fn connect(&self, coordinator: &HostPort) -> Result<quinn::Connection, String> {
        let addrs = tokio::net::lookup_host((coordinator.host.as_str(), coordinator.port))
            .await
            .map_err(|e| e.to_string())?;
        let mut last = String::from("no address");
        for addr in addrs {
            let connecting = match self.endpoint.connect(addr, &coordinator.host) {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            match tokio::time::timeout(Duration::from_secs(5), connecting).await {
                Ok(Ok(c)) => {
                    // Check the protocol version once per connection.
                    let hello = Request::Hello {
                        protocol: PROTOCOL_VERSION,
                        agent_version: env!("CARGO_PKG_VERSION").into(),
                    };
                    let limit = self.deadlines.of(&hello);
                    let hello_answer = tokio::time::timeout(limit, exchange(&c, &hello)).await;
                    match hello_answer.unwrap_or(Err(OffloadError::TimedOut(limit))) {
                        Ok(r) if matches!(r.first(), Some(Response::Hello { .. })) => return Ok(c),
                        Ok(r) => last = format!("unexpected answer to hello: {r:?}"),
                        // Said once: the round's error says "no coordinator is reachable".
                        Err(OffloadError::Unreachable(why)) => last = why,
                        Err(e) => last = e.to_string(),
                    }
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
        }
        Err(last)
    }

    /// One request on a new stream of the shared connection; reconnects (once) if it had died.
    /// Each try has the request's [`deadline`]; one that passes it drops the connection (a
    /// stalled coordinator) and is not tried again here.
    async fn call(&self, request: &Request) -> Result<Vec<Response>, OffloadError> {
        let wait = self.deadlines.of(request);
        let connection = self.connection(wait).await?;
        match self.exchange_within(&connection, request).await {
            Ok(r) => Ok(r),
            Err(OffloadError::Unreachable(_)) => {
                // The connection died under us (its coordinator vanished, most likely): drop
                // it and try once more now, from the next coordinator on, so the retry does
                // not first wait out a handshake with the one that just died.
                self.move_on_from(&connection).await;
                let connection = self.connection(wait).await?;
                self.exchange_within(&connection, request).await
            }
            Err(e) => Err(e),
        }
    }

    /// Drops `connection` if it is still the live one, and makes the next round of connecting
    /// start after its coordinator; that coordinator, when it was.
    async fn move_on_from(&self, connection: &quinn::Connection) -> Option<&HostPort> {
        let mut link = self.link.lock().await;
        if link
            .connection
            .as_ref()
            .is_none_or(|c| c.stable_id() != connection.stable_id())
        {
            return None;
        }
        link.connection = None;
        link.first = (link.connected_to + 1) % self.coordinators.len().max(1);
        self.coordinators.get(link.connected_to)
    }

    async fn exchange_within(
        &self,
        connection: &quinn::Connection,
        request: &Request,
    ) -> Result<Vec<Response>, OffloadError> {
        let limit = self.deadlines.of(request);
        match tokio::time::timeout(limit, exchange(connection, request)).await {
            Ok(result) => result,
            Err(_) => {
                connection.close(quinn::VarInt::from_u32(3), b"request deadline passed");
                // One that accepts requests and lets them stall would otherwise be chosen
                // first again and again.
                if let Some(coordinator) = self.move_on_from(connection).await {
                    tracing::warn!(
                        %coordinator,
                        deadline = ?limit,
                        "a request passed its deadline; trying the next coordinator first"
                    );
                }
                Err(OffloadError::TimedOut(limit))
            }
        }
    }

    /// Fetches chunks; returns those the coordinator had (each verified against its id).
    pub async fn get_chunks(
        &self,
        ids: Vec<ChunkId>,
    ) -> Result<Vec<(ChunkId, Vec<u8>)>, OffloadError> {
        let responses = self.call(&Request::GetChunks { ids }).await?;
        let mut out = Vec::new();
        for response in responses {
            match response {
                Response::Chunk { id, data } => {
                    id.verify(&data)
                        .map_err(|e| OffloadError::Protocol(e.to_string()))?;
                    out.push((id, data));
                }
                Response::ChunkMissing { id } => {
                    tracing::warn!(chunk = %id, "the coordinator lacks a chunk")
                }
                Response::Error { kind, message } => {
                    return Err(OffloadError::Refused { kind, message });
                }
                other => return Err(OffloadError::Protocol(format!("unexpected {other:?}"))),
            }
        }
        Ok(out)
    }

    /// The coordinator's current signed releases (of `models`, or all when empty), as
    /// `(model, signed manifest)`; not verified here (the installer verifies them).
    pub async fn releases(
        &self,
        models: Vec<String>,
    ) -> Result<Vec<(String, Vec<u8>)>, OffloadError> {
        let responses = self.call(&Request::Releases { models }).await?;
        let mut out = Vec::new();
        for response in responses {
            match response {
                Response::Release { model, signed } => out.push((model, signed)),
                Response::Error { kind, message } => {
                    return Err(OffloadError::Refused { kind, message });
                }
                other => return Err(OffloadError::Protocol(format!("unexpected {other:?}"))),
            }
        }
        Ok(out)
    }

    /// Runs `model` on the coordinator.
    pub async fn infer(
        &self,
        model: &str,
        version: Option<u64>,
        inputs: Vec<Tensor>,
    ) -> Result<(u64, Vec<Tensor>), OffloadError> {
        let request = Request::Infer {
            model: model.into(),
            version,
            inputs,
            outputs: vec![],
        };
        match self.call(&request).await?.into_iter().next() {
            Some(Response::Inferred {
                version, outputs, ..
            }) => Ok((version, outputs)),
            Some(Response::Busy { retry_after_ms }) => Err(OffloadError::Busy(retry_after_ms)),
            Some(Response::Error { kind, message }) => Err(OffloadError::Refused { kind, message }),
            other => Err(OffloadError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"agent shutting down");
    }
}

async fn exchange(
    connection: &quinn::Connection,
    request: &Request,
) -> Result<Vec<Response>, OffloadError> {
    let lost = |e: &dyn std::fmt::Display| OffloadError::Unreachable(e.to_string());
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| lost(&e))?;
    let bytes = frame::encode(request, MAX_FRAME_BYTES)
        .map_err(|e| OffloadError::Protocol(e.to_string()))?;
    send.write_all(&bytes).await.map_err(|e| lost(&e))?;
    send.finish().map_err(|e| lost(&e))?;
    let mut out = Vec::new();
    loop {
        let mut header = [0u8; HEADER_BYTES];
        match recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(out),
            Err(e) => return Err(lost(&e)),
        }
        let len = frame::body_len(header, MAX_FRAME_BYTES)
            .map_err(|e| OffloadError::Protocol(e.to_string()))?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.map_err(|e| lost(&e))?;
        out.push(
            frame::decode_body(&body, MAX_FRAME_BYTES)
                .map_err(|e| OffloadError::Protocol(e.to_string()))?,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While one round of connecting hangs (a coordinator address where nothing answers), other
    /// calls are not stuck behind it: each waits for the round at most its own deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_connect_holds_other_calls_no_longer_than_their_deadline() {
        let dir = tempfile::tempdir().unwrap();
        // A UDP port that never answers: the QUIC handshake waits out its 5 s.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at: HostPort = format!("127.0.0.1:{}", silent.local_addr().unwrap().port())
            .parse()
            .unwrap();
        let plan =
            firmware_config::FleetPlan::numbered("t", 1, vec![at.clone()], at.clone()).unwrap();
        firmware_config::provision(&plan, dir.path()).unwrap();
        let mut config = AgentConfig::load(&dir.path().join("devices/t-0001/agent.toml")).unwrap();
        config.coordinator.request_timeout_s = 1;
        let identity =
            outpost_runtime::tls::Identity::load(&config.device.certificate, &config.device.key)
                .unwrap();
        let client = OffloadClient::new(&config, identity).unwrap();
        let started = Instant::now();
        let calls: Vec<_> = (0..3)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    // The first makes the round; the others arrive while it runs.
                    tokio::time::sleep(Duration::from_millis(100 * i)).await;
                    let result = client.infer("m", None, vec![]).await;
                    (result, started.elapsed())
                })
            })
            .collect();
        let mut quick = 0;
        for call in calls {
            let (result, took) = call.await.unwrap();
            assert!(result.is_err(), "{result:?}");
            if took < Duration::from_secs(3) {
                assert!(
                    matches!(result, Err(OffloadError::TimedOut(_))),
                    "{result:?}"
                );
                quick += 1;
            }
        }
        assert_eq!(
            quick, 2,
            "the calls that did not connect waited out the round"
        );
    }

    #[test]
    fn deadlines_follow_the_request_timeout() {
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: String::new(),
        };
        let chunks = Request::GetChunks { ids: vec![] };
        let default = Deadlines::from_timeout(Duration::from_secs(30));
        assert_eq!(default.of(&hello), Duration::from_secs(5));
        assert_eq!(default.of(&chunks), Duration::from_secs(120));
        let short = Deadlines::from_timeout(Duration::from_secs(1));
        assert_eq!(short.of(&hello), Duration::from_secs(1));
        assert_eq!(short.of(&chunks), Duration::from_secs(4));
    }
}
