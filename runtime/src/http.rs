//! The one HTTP/1.1 client of Outpost's tools and tests, on hyper: a request (method, path and
//! query, headers, body) to a socket address; the answer's status, headers and body, read whole
//! up to a size bound and within a timeout; typed errors.
//!
//! [`HttpClient::send`] opens a connection per request; [`HttpClient::connect`] gives an
//! [`HttpConnection`] that keeps one open across requests (HTTP keep-alive), as a client library
//! would. Bodies go out in 1 MiB pieces, and [`Request::on_upload`] reports their progress.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt as _, Limited};
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;

pub use bytes::Bytes;
pub use hyper::{HeaderMap, Method, StatusCode};

/// How long a request may take and how large its answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From connecting until the whole answer is read.
    pub timeout: Duration,
    /// The largest answer body read, in bytes.
    pub max_response_bytes: usize,
}

impl Default for Limits {
    /// 60 s and 64 MiB: generous for every API Outpost serves.
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(60),
            max_response_bytes: 64 << 20,
        }
    }
}

/// Told after each piece of a request body is handed to the connection: bytes sent, bytes in all.
pub type UploadProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Told each piece of an answer's body as it arrives (a streamed answer's lines, say), before
/// the whole answer is returned.
pub type DownloadProgress = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// A request: method, path (with its query), headers and body. `Host` is added when absent;
/// `Content-Length` comes from the body.
#[derive(Clone)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path and query, e.g. `/v1/models?x=1`.
    pub path: String,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty for none).
    pub body: Bytes,
    progress: Option<UploadProgress>,
    download: Option<DownloadProgress>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("headers", &self.headers)
            .field("body_bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl Request {
    /// A request with no headers and no body.
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Request {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
            progress: None,
            download: None,
        }
    }

    /// A `GET`.
    pub fn get(path: impl Into<String>) -> Self {
        Request::new(Method::GET, path)
    }

    /// A `POST` of `body`.
    pub fn post(path: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Request::new(Method::POST, path).body(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Adds `Authorization: Bearer {token}`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("Authorization", format!("Bearer {token}"))
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Calls `progress` as the body goes out.
    pub fn on_upload(mut self, progress: UploadProgress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Calls `download` with each piece of the answer's body as it arrives.
    pub fn on_download(mut self, download: DownloadProgress) -> Self {
        self.download = Some(download);
        self
    }
}

/// An answer, read whole.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// No connection could be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed (the server's certificate is not valid for the name, or not
    /// from the CA trusted).
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The request cannot be written (a bad path, header name or value).
    #[error("cannot send {what} to {addr}: {reason}")]
    InvalidRequest {
        /// Where.
        addr: SocketAddr,
        /// The method and path.
        what: String,
        /// Why.
        reason: String,
    },
    /// The connection failed or the answer was not HTTP/1.1.
    #[error("{what} to {addr} failed: {source}")]
    Exchange {
        /// Where.
        addr: SocketAddr,
        /// The method and path.
        what: String,
        /// Why.
        source: hyper::Error,
    },
    /// The answer's body could not be read.
    #[error("reading the answer to {what} from {addr} failed: {reason}")]
    Body {
        /// Where.
        addr: SocketAddr,
        /// The method and path.
        what: String,
        /// Why.
        reason: String,
    },
    /// The answer's body is over the limit.
    #[error("the answer to {what} from {addr} is larger than {limit} bytes")]
    TooLarge {
        /// Where.
        addr: SocketAddr,
        /// The method and path.
        what: String,
        /// The limit.
        limit: usize,
    },
    /// No whole answer within the timeout.
    #[error("no answer to {what} from {addr} within {timeout:?}")]
    Timeout {
        /// Where.
        addr: SocketAddr,
        /// The method and path.
        what: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Sends requests to one address, a connection each.
#[derive(Debug, Clone)]
pub struct HttpClient {
    addr: SocketAddr,
    limits: Limits,
    tls: Option<Tls>,
}

/// HTTPS: the server's certificate is verified by `config` as `name`.
#[derive(Clone)]
struct Tls {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client of `addr` with the default [`Limits`].
    pub fn new(addr: SocketAddr) -> Self {
        HttpClient {
            addr,
            limits: Limits::default(),
            tls: None,
        }
    }

    /// The same client over TLS: the server's certificate is checked by `config` (see
    /// [`crate::tls::client_config_without_identity`]) and must be valid for `name`.
    pub fn with_tls(
        mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> Self {
        self.tls = Some(Tls { config, name });
        self
    }

    /// The same client with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The limits in use.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Sends `request` on a new connection and reads the whole answer.
    pub async fn send(&self, request: Request) -> Result<Response, HttpError> {
        let what = describe(&request);
        let exchange = async {
            let mut connection =
                HttpConnection::open(self.addr, self.limits, self.tls.as_ref()).await?;
            connection.exchange(request).await
        };
        tokio::time::timeout(self.limits.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                addr: self.addr,
                what,
                timeout: self.limits.timeout,
            })?
    }

    /// Opens a connection to send several requests on, one after another.
    pub async fn connect(&self) -> Result<HttpConnection, HttpError> {
        tokio::time::timeout(
            self.limits.timeout,
            HttpConnection::open(self.addr, self.limits, self.tls.as_ref()),
        )
        .await
        .map_err(|_| HttpError::Timeout {
            addr: self.addr,
            what: "connecting".to_owned(),
            timeout: self.limits.timeout,
        })?
    }
}

/// One open HTTP/1.1 connection (keep-alive), for requests one after another.
pub struct HttpConnection {
    addr: SocketAddr,
    limits: Limits,
    sender: SendRequest<UploadBody>,
}

impl fmt::Debug for HttpConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConnection")
            .field("addr", &self.addr)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl HttpConnection {
    async fn open(addr: SocketAddr, limits: Limits, tls: Option<&Tls>) -> Result<Self, HttpError> {
        let connect_error = |source| HttpError::Connect { addr, source };
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(connect_error)?;
        // Small requests and answers: do not wait to fill segments.
        stream.set_nodelay(true).map_err(connect_error)?;
        let sender = match tls {
            None => Self::handshake(addr, stream).await?,
            Some(tls) => {
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
                    .connect(tls.name.clone(), stream)
                    .await
                    .map_err(|source| HttpError::Tls { addr, source })?;
                Self::handshake(addr, stream).await?
            }
        };
        Ok(HttpConnection {
            addr,
            limits,
            sender,
        })
    }

    /// HTTP/1's handshake on `io`; the connection is driven on its own task, which ends when
    /// the sender is dropped.
    async fn handshake<I>(addr: SocketAddr, io: I) -> Result<SendRequest<UploadBody>, HttpError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .map_err(|source| HttpError::Exchange {
                    addr,
                    what: "the handshake".to_owned(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP client connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends `request` on this connection and reads the whole answer, within the timeout.
    pub async fn send(&mut self, request: Request) -> Result<Response, HttpError> {
        let (addr, timeout, what) = (self.addr, self.limits.timeout, describe(&request));
        tokio::time::timeout(timeout, self.exchange(request))
            .await
            .map_err(|_| HttpError::Timeout {
                addr,
                what,
                timeout,
            })?
    }

    async fn exchange(&mut self, request: Request) -> Result<Response, HttpError> {
        let addr = self.addr;
        let what = describe(&request);
        let invalid = |reason: String| HttpError::InvalidRequest {
            addr,
            what: what.clone(),
            reason,
        };
        let mut builder = hyper::Request::builder()
            .method(request.method)
            .uri(request.path);
        let has_host = request
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("host"));
        if !has_host {
            builder = builder.header(hyper::header::HOST, addr.to_string());
        }
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let hyper_request = builder
            .body(UploadBody::new(request.body, request.progress))
            .map_err(|e| invalid(e.to_string()))?;
        let exchange = |source| HttpError::Exchange {
            addr,
            what: what.clone(),
            source,
        };
        self.sender.ready().await.map_err(exchange)?;
        let answer = self
            .sender
            .send_request(hyper_request)
            .await
            .map_err(exchange)?;
        let (parts, body) = answer.into_parts();
        let limit = self.limits.max_response_bytes;
        let mut body = Limited::new(body, limit);
        let mut whole = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(HttpError::TooLarge {
                        addr,
                        what: what.clone(),
                        limit,
                    });
                }
                Err(e) => {
                    return Err(HttpError::Body {
                        addr,
                        what: what.clone(),
                        reason: e.to_string(),
                    });
                }
            };
            if let Ok(data) = frame.into_data() {
                if let Some(download) = &request.download {
                    download(&data);
                }
                whole.extend_from_slice(&data);
            }
        }
        let body = whole.freeze();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

fn describe(request: &Request) -> String {
    format!("{} {}", request.method, request.path)
}

/// The largest piece of a request body handed to the connection at once.
const UPLOAD_PIECE: usize = 1 << 20;

/// A request body of known length, sent in pieces, telling its progress.
struct UploadBody {
    data: Bytes,
    sent: usize,
    progress: Option<UploadProgress>,
}

impl UploadBody {
    fn new(data: Bytes, progress: Option<UploadProgress>) -> Self {
        UploadBody {
            data,
            sent: 0,
            progress,
        }
    }
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.sent >= this.data.len() {
            return Poll::Ready(None);
        }
        let end = this.sent.saturating_add(UPLOAD_PIECE).min(this.data.len());
        let piece = this.data.slice(this.sent..end);
        this.sent = end;
        if let Some(progress) = &this.progress {
            progress(this.sent as u64, this.data.len() as u64);
        }
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.data.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.len().saturating_sub(self.sent) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `answers` (raw bytes) on a loopback port, one per connection, each after reading
    /// the request; returns its address.
    async fn raw_server(answers: Vec<Vec<u8>>) -> SocketAddr {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for answer in answers {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let mut body = vec![0; length];
                let _ = stream.read_exact(&mut body).await;
                // The client may have gone (a refused request): nothing to check here.
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_are_read_whole_with_status_and_headers() {
        let addr = raw_server(vec![
            b"HTTP/1.1 201 Created\r\nX-Thing: 7\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        ])
        .await;
        let answer = HttpClient::new(addr)
            .send(Request::post("/x?y=1", "body").header("X-Asked", "1"))
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::CREATED);
        assert_eq!(answer.header("x-thing"), Some("7"));
        assert_eq!(answer.text(), "hello");
    }

    #[tokio::test]
    async fn a_large_answer_and_a_silent_server_are_typed_errors() {
        let addr = raw_server(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789".to_vec(),
        ])
        .await;
        let small = Limits {
            max_response_bytes: 4,
            ..Limits::default()
        };
        let err = HttpClient::new(addr)
            .with_limits(small)
            .send(Request::get("/"))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::TooLarge { limit: 4, .. }), "{err}");

        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let quick = Limits {
            timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let err = HttpClient::new(silent.local_addr().unwrap())
            .with_limits(quick)
            .send(Request::get("/"))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error_and_a_bad_header_is_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = HttpClient::new(port)
            .send(Request::get("/"))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Connect { .. }), "{err}");

        let addr = raw_server(vec![b"HTTP/1.1 200 OK\r\n\r\n".to_vec()]).await;
        let err = HttpClient::new(addr)
            .send(Request::get("/").header("bad header", "x"))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::InvalidRequest { .. }), "{err}");
    }
}
