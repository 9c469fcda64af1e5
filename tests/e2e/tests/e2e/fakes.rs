//! A fake coordinator for tests of what an agent does when its coordinator misbehaves: real
//! QUIC with the fleet's coordinator certificate and key (one that hangs, one that replays old
//! releases: what a stuck process or a stolen key could do), answering as a test says.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use outpost_shared::frame::{self, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use outpost_shared::{Request, Response};

/// What a fake coordinator answers to a request: the frames, or `None` to hold the stream open
/// and answer nothing, ever.
pub type Answer = Arc<dyn Fn(&Request) -> Option<Vec<Response>> + Send + Sync>;

/// The answer to a hello.
pub fn hello() -> Response {
    Response::Hello {
        protocol: PROTOCOL_VERSION,
        coordinator_version: "fake".into(),
    }
}

/// Serves QUIC on a loopback port with `dir/coordinator.{crt,key}` (a provisioned fleet's),
/// taking any client, answering each request as `answer` says; runs on `runtime`. Its address
/// and the count of requests it held unanswered.
pub fn fake_coordinator(
    runtime: &tokio::runtime::Handle,
    dir: &Path,
    answer: Answer,
) -> (SocketAddr, Arc<AtomicUsize>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let chain: Vec<CertificateDer<'static>> = pem::parse_many(read("coordinator.crt"))
        .unwrap()
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        pem::parse(read("coordinator.key")).unwrap().into_contents(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let _guard = runtime.enter();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&held);
    runtime.spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let (count, answer) = (Arc::clone(&count), Arc::clone(&answer));
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    let (count, answer) = (Arc::clone(&count), Arc::clone(&answer));
                    tokio::spawn(async move {
                        let bytes = recv.read_to_end(1 << 20).await.unwrap_or_default();
                        let answered = match frame::decode::<Request>(&bytes, MAX_FRAME_BYTES) {
                            Ok(Some((request, _))) => answer(&request),
                            _ => None,
                        };
                        let Some(responses) = answered else {
                            count.fetch_add(1, Ordering::SeqCst);
                            let _held = send;
                            std::future::pending::<()>().await;
                            return;
                        };
                        for response in responses {
                            let frame = frame::encode(&response, MAX_FRAME_BYTES).unwrap();
                            if send.write_all(&frame).await.is_err() {
                                return;
                            }
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    (addr, held)
}
