//! Real Open Inference Protocol servers for the backend tests: MLServer and KServe's Python
//! model server, each serving one ONNX file through onnxruntime (`tests/support/python`), on a
//! free loopback port, killed when dropped. `bash tests/support/python/install` (CI runs it)
//! puts them in `.oip-servers/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_runtime::http::Request;
use serde_json::Value;

use crate::ports::free_tcp_port;
use crate::process::ChildGuard;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OipServerKind {
    /// MLServer 1.7 (`mlserver start`), a custom runtime.
    MlServer,
    /// KServe 0.21's `ModelServer`, a custom `Model`.
    KServe,
}

/// One running server.
#[derive(Debug)]
pub struct OipServer {
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    /// The model it serves.
    pub model: String,
    /// Which server it is.
    pub kind: OipServerKind,
    child: Option<ChildGuard>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The virtual environment `name` of `.oip-servers/`; fails the test, saying how to install
/// it, when it is missing.
pub(crate) fn venv(name: &str) -> PathBuf {
    let dir = workspace().join(".oip-servers").join(name);
    assert!(
        dir.join("bin/python").exists(),
        "{} is missing: run `bash tests/support/python/install` (CI does) to install MLServer, KServe and moto",
        dir.display()
    );
    dir
}

/// The ONNX Runtime library of the `onnxruntime` wheel in `.oip-servers/mlserver` (what an
/// agent's `onnxruntime_library` names in the tests); fails the test, saying how to install it,
/// when it is missing.
pub fn onnxruntime_library() -> PathBuf {
    let venv = venv("mlserver");
    outpost_runtime::onnxruntime::library_in_venv(&venv).unwrap_or_else(|| {
        panic!(
            "no onnxruntime library in {}: run `bash tests/support/python/install`",
            venv.display()
        )
    })
}

impl OipServer {
    /// Starts `kind` serving `onnx` as `model`, its files in `dir`; waits (up to 90 s) until
    /// the server and the model are ready.
    pub fn start(kind: OipServerKind, model: &str, onnx: &Path, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_tcp_port();
        let python = workspace().join("tests/support/python");
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut command = match kind {
            OipServerKind::MlServer => {
                let settings = serde_json::json!({
                    "host": "127.0.0.1",
                    "http_port": port,
                    "grpc_port": free_tcp_port(),
                    "metrics_port": free_tcp_port(),
                    "parallel_workers": 0,
                });
                std::fs::write(dir.join("settings.json"), settings.to_string()).unwrap();
                let model_dir = dir.join(model);
                std::fs::create_dir_all(&model_dir).unwrap();
                let model_settings = serde_json::json!({
                    "name": model,
                    "implementation": "mlserver_onnx.OnnxRuntime",
                    "parameters": {"uri": onnx},
                });
                std::fs::write(
                    model_dir.join("model-settings.json"),
                    model_settings.to_string(),
                )
                .unwrap();
                let mut c = Command::new(venv("mlserver").join("bin/mlserver"));
                c.arg("start").arg(dir);
                c
            }
            OipServerKind::KServe => {
                let mut c = Command::new(venv("kserve").join("bin/python"));
                c.arg(python.join("kserve_onnx.py"))
                    .args(["--model_name", model, "--model_file"])
                    .arg(onnx)
                    .args(["--http_port", &port.to_string(), "--workers", "1"]);
                c
            }
        };
        command
            .env("PYTHONPATH", &python)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut server = OipServer {
            port,
            model: model.to_owned(),
            kind,
            child: Some(ChildGuard::spawn(&mut command)),
        };
        server.wait_ready(dir);
        server
    }

    fn wait_ready(&mut self, dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let ready = format!("/v2/models/{}/ready", self.model);
        while Instant::now() < deadline {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.0.try_wait()
            {
                panic!(
                    "{:?} exited ({status}) before it was ready: {}",
                    self.kind,
                    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
                );
            }
            if get_status(self.port, &ready) == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "{:?} was not ready within 90 s: {}",
            self.kind,
            std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        );
    }

    /// Its base URL, as `[[backend]] replicas` takes it.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Calls the server directly: `POST /v2/models/MODEL/infer` with a JSON body; the status and
    /// the answer.
    pub async fn infer(&self, body: &Value) -> (u16, Value) {
        let request = Request::post(format!("/v2/models/{}/infer", self.model), body.to_string())
            .header("content-type", "application/json");
        crate::http::request_json(self.addr(), request).await
    }

    /// Kills the server now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.child = None;
    }
}

/// `GET path` on a loopback port with the standard library alone (the fixture starts servers
/// from async tests, where no second runtime may be started): the status, or `None` when
/// nothing answers within 2 s.
fn get_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
