//! The `cloud-coordinator` binary: serve in dev mode, push, list, roll back, enroll, and a
//! graceful stop on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cloud-coordinator"))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str], config: &std::path::Path) -> (bool, String, String) {
    let out = bin()
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_push_list_rollback_enroll_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        "[storage]\ndata_dir = \"data\"\n[quic]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut server = Server(child);
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut admin = None;
    let mut printed = String::new();
    while admin.is_none() || !printed.contains("dev mode") {
        assert!(
            Instant::now() < deadline,
            "serve printed no addresses: {printed}"
        );
        let line = lines.next().unwrap().unwrap();
        if let Some(addr) = line.trim().strip_prefix("admin API:") {
            admin = Some(addr.trim().trim_start_matches("http://").to_owned());
        }
        printed.push_str(&line);
        printed.push('\n');
    }
    assert!(printed.contains("admin token:"), "{printed}");
    let admin = admin.unwrap();

    let models = tempfile::tempdir().unwrap();
    let file = model_zoo::DemoModel::VideoRanker
        .write(1, models.path())
        .unwrap();
    let file = file.to_str().unwrap();
    let (ok, out, err) = run(
        &["push", file, "--name", "video-ranker", "--admin", &admin],
        &config,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("published video-ranker version 1 (release 1, stable)")
            && out.contains("edge-int8")
            && out.contains("accuracy gate (64 rows, generated from the signature)")
            && out.contains("score (score): max abs error"),
        "{out}"
    );
    // A dry run prints the same figures and the delta, and publishes nothing.
    let (ok, out, err) = run(
        &[
            "push",
            file,
            "--name",
            "video-ranker",
            "--dry-run",
            "--admin",
            &admin,
        ],
        &config,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("dry run: video-ranker version 2")
            && out.contains("0 B new against version 1 (0 of"),
        "{out}"
    );
    let (ok, _, err) = run(
        &[
            "push",
            file,
            "--name",
            "video-ranker",
            "--placement",
            "cascade:score:0.5",
            "--admin",
            &admin,
        ],
        &config,
    );
    assert!(ok, "{err}");
    let (ok, out, _) = run(&["models", "--admin", &admin], &config);
    assert!(
        ok && out.contains("\"versions\": [\n      1,\n      2\n    ]"),
        "{out}"
    );
    let (ok, out, err) = run(
        &["rollback", "video-ranker", "--to", "1", "--admin", &admin],
        &config,
    );
    assert!(ok && out.contains("\"version\": 3"), "{out}{err}");

    // Errors carry the server's message.
    let (ok, _, err) = run(
        &["push", "/etc/hostname", "--name", "junk", "--admin", &admin],
        &config,
    );
    assert!(!ok && err.contains("not an ONNX model"), "{err}");
    let (ok, _, err) = run(&["models", "--admin", &admin, "--token", "nope"], &config);
    assert!(!ok && err.contains("refused the admin token"), "{err}");
    let (ok, _, err) = run(
        &[
            "push",
            file,
            "--name",
            "x",
            "--placement",
            "sideways",
            "--admin",
            &admin,
        ],
        &config,
    );
    assert!(!ok && err.contains("placement"), "{err}");

    // enroll issues a second device of the dev fleet.
    let fleet = dir.path().join("data/dev-fleet/coordinator.toml");
    let out = bin()
        .args(["enroll", "--config"])
        .arg(&fleet)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("enrolled device dev-0002"), "{stdout}");
    firmware_config::AgentConfig::load(
        &dir.path()
            .join("data/dev-fleet/devices/dev-0002/agent.toml"),
    )
    .unwrap();

    // SIGTERM stops it cleanly.
    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!("[storage]\ndata_dir = \"data\"\n[quic]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let out = bin()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("address is in use") && err.contains("mqtt") && err.contains("external"),
        "{err}"
    );
}

/// An admin API beyond loopback without TLS is refused at start, naming the keys to set; a token
/// given as a flag
/// (visible in `ps`) is used, with a warning, and one from the environment is not warned about.
#[test]
fn the_admin_api_stays_on_loopback_and_flag_tokens_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        "[storage]\ndata_dir = \"data\"\n\n[quic]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"0.0.0.0:0\"\n\n[mqtt]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let (ok, _, err) = run(&["serve"], &config);
    assert!(!ok);
    assert!(
        err.contains("admin.tls_cert") && err.contains("beyond loopback"),
        "{err}"
    );
    // The CLI's warnings, with a config that loads.
    std::fs::write(
        &config,
        "[storage]\ndata_dir = \"data\"\n\n[admin]\nlisten = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let (_, _, err) = run(
        &["models", "--token", "secret", "--admin", "127.0.0.1:9"],
        &config,
    );
    assert!(err.contains("warning") && err.contains("--token"), "{err}");
    let out = bin()
        .args(["models", "--admin", "127.0.0.1:9", "--config"])
        .arg(&config)
        .env("OUTPOST_ADMIN_TOKEN", "secret")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("warning"), "{err}");
}

/// The admin API over HTTPS (`[admin] tls_cert`, here the coordinator's own certificate from
/// `provision`): `serve` says https, the CLI checks the certificate against the fleet CA named in
/// the config and is served; a plain HTTP request gets no answer; a client trusting another
/// fleet's CA is refused by its own check.
#[test]
fn the_admin_api_speaks_https_when_given_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let plan = firmware_config::FleetPlan::numbered(
        "adm",
        1,
        vec!["127.0.0.1:4433".parse().unwrap()],
        "127.0.0.1:1883".parse().unwrap(),
    )
    .unwrap();
    firmware_config::provision(&plan, &fleet).unwrap();
    let config = fleet.join("coordinator.toml");
    let provisioned = std::fs::read_to_string(&config).unwrap();
    assert!(
        provisioned.contains("# tls_cert = \"coordinator.crt\""),
        "{provisioned}"
    );
    let text = provisioned.replace("listen = \"127.0.0.1:4433\"", "listen = \"127.0.0.1:0\"")
        + "\n[admin]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"coordinator.crt\"\ntls_key = \"coordinator.key\"\n\n[mqtt]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(&config, text).unwrap();

    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _server = Server(child);
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let admin = loop {
        assert!(Instant::now() < deadline, "serve printed no admin address");
        let line = lines.next().unwrap().unwrap();
        if let Some(addr) = line.trim().strip_prefix("admin API:") {
            let addr = addr.trim();
            assert!(addr.starts_with("https://"), "{line}");
            break addr.trim_start_matches("https://").to_owned();
        }
    };

    let (ok, out, err) = run(&["models", "--admin", &admin], &config);
    assert!(ok && out.trim() == "[]", "{out}{err}");

    // Plain HTTP to the HTTPS port: no HTTP answer.
    use std::io::{Read as _, Write as _};
    let mut plain = std::net::TcpStream::connect(&admin).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {}",
        String::from_utf8_lossy(&answer)
    );

    // A client that trusts another fleet's CA does not accept this certificate.
    let other = dir.path().join("other");
    firmware_config::provision(&plan, &other).unwrap();
    let other_ca = other.join("ca.crt");
    let (ok, _, err) = run(
        &[
            "models",
            "--admin",
            &admin,
            "--admin-ca",
            other_ca.to_str().unwrap(),
        ],
        &config,
    );
    assert!(!ok && err.contains("TLS"), "{err}");
}
