//! HTTP helpers for the tests, on [`outpost_runtime::http`]: a request whose answer is read as
//! JSON (or, when not JSON, as a JSON string of its text), a blocking form for tests without a
//! runtime, and raw bytes for requests a well-behaved client would not send.

use std::net::SocketAddr;
use std::time::Duration;

use outpost_runtime::http::{HttpClient, Limits, Request, Response};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Sends `request` to `addr`; fails the test if no answer comes.
pub async fn send(addr: SocketAddr, request: Request) -> Response {
    let what = format!("{} {}", request.method, request.path);
    HttpClient::new(addr)
        .send(request)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The answer's status, and its body as JSON (a JSON string of the text when it is not JSON).
pub fn status_and_json(answer: &Response) -> (u16, Value) {
    let json =
        serde_json::from_slice(&answer.body).unwrap_or_else(|_| Value::String(answer.text()));
    (answer.status.as_u16(), json)
}

/// Sends `request` to `addr`; the status and the body as JSON (see [`status_and_json`]).
pub async fn request_json(addr: SocketAddr, request: Request) -> (u16, Value) {
    status_and_json(&send(addr, request).await)
}

/// `GET path`; the status and the body as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    request_json(addr, Request::get(path)).await
}

/// Sends `request` to a loopback port from a test without a runtime (on a runtime of its own,
/// waiting at most 30 s); the status and the body as text, or status 0 and the reason when no
/// answer came (nothing listens yet, say).
pub fn blocking(port: u16, request: Request) -> (u16, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = HttpClient::new(SocketAddr::from(([127, 0, 0, 1], port))).with_limits(Limits {
        timeout: Duration::from_secs(30),
        ..Limits::default()
    });
    match runtime.block_on(client.send(request)) {
        Ok(answer) => (answer.status.as_u16(), answer.text()),
        Err(e) => (0, e.to_string()),
    }
}

/// Writes `bytes` as they are and reads until the server closes: for requests a client library
/// would not send (oversized, malformed), whose answer may come before the request is read.
/// The status, the head (lower-cased) and the body.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (u16, String, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading it all: a failed write is no failure here.
    let _ = stream.write_all(bytes).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.get(split + 4..).unwrap_or_default().to_vec();
    (status, head, body)
}
