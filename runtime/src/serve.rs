//! Serving loops both daemons use: an HTTP/1 server whose connections end with it, and waiting
//! for the signal to stop.

use std::future::Future;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::sync::watch;

/// Serves HTTP/1 on `listener` with `handler` until `shutdown` changes. Connection tasks live in
/// one set, so shutdown ends them all, and with them whatever state the handler holds.
pub async fn serve_http<H, F>(
    listener: tokio::net::TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let Ok((stream, _)) = accepted else { continue };
        let handler = handler.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
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
#[derive(Debug)]
pub enum BodyError {
    /// It is larger than the limit (answer 413).
    TooLarge,
    /// The connection failed while reading it (answer 400).
    Unreadable(String),
}

/// Reads a whole request body of at most `limit` bytes. Handlers read the body before judging a
/// request: answering early and closing would reset the connection under a client still
/// sending, and the client could lose the answer.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    match Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(BodyError::TooLarge)
        }
        Err(e) => Err(BodyError::Unreadable(e.to_string())),
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
