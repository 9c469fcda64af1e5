//! An S3-compatible server for the shared-store tests: moto's server mode (PyPI `moto[server]`,
//! installed into `.oip-servers/moto` by `bash tests/support/python/install`), on a free
//! loopback port, killed when dropped. A protocol check of the S3 code path, not a claim about
//! AWS itself.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_runtime::http::{Method, Request};

use crate::ports::free_tcp_port;
use crate::process::ChildGuard;

/// A running moto server with one bucket.
#[derive(Debug)]
pub struct S3Server {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The bucket made at start.
    pub bucket: String,
    _child: ChildGuard,
}

impl S3Server {
    /// Starts moto and makes `bucket`; waits (up to 30 s) until it answers.
    pub fn start(bucket: &str) -> Self {
        let port = free_tcp_port();
        let venv = crate::oip_servers::venv("moto");
        let child = ChildGuard::spawn(
            Command::new(venv.join("bin/moto_server"))
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let made = crate::http::blocking(port, Request::new(Method::PUT, format!("/{bucket}")));
            if made.0 == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "moto did not make bucket {bucket} on port {port}: {made:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            port,
            bucket: bucket.to_owned(),
            _child: child,
        }
    }

    /// Its endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
