//! `cloud-coordinator`: serve, and talk to a running coordinator's admin API.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use cloud_coordinator::admin::PlacementArg;
use cloud_coordinator::{ADMIN_TOKEN_FILE, Coordinator};
use firmware_config::{CoordinatorConfig, FleetAuthority, HostPort};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Method, Request, StatusCode};

#[derive(Parser)]
#[command(
    name = "cloud-coordinator",
    version,
    about = "The Outpost cloud coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator. Without --config: dev mode on loopback, with a throwaway fleet and an
    /// embedded MQTT broker, data in ./outpost-data/coordinator.
    Serve {
        /// A coordinator.toml (as `firmware-config provision` writes it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Push a model: validate it, store it as chunks, sign and announce a new version.
    Push {
        /// The ONNX model file.
        file: PathBuf,
        /// The model's name.
        #[arg(long)]
        name: String,
        /// A bigger model with the same signature for the coordinator to run.
        #[arg(long)]
        cloud: Option<PathBuf>,
        /// Where inference runs: local, cloud, or cascade:OUTPUT:THRESHOLD.
        #[arg(long, default_value = "local")]
        placement: PlacementArg,
        /// Share of devices (0-100) that get the new version first; 100 makes it stable at once.
        #[arg(long, default_value_t = 100)]
        rollout: u8,
        /// Weight quantisation of the edge variant: int8 (the default when devices run the
        /// model: 4x smaller, behind an accuracy gate) or none.
        #[arg(long, value_parser = ["int8", "none"])]
        quantize: Option<String>,
        /// Inputs for the int8 accuracy gate: an inference request body ({"inputs": [...]}).
        /// Without it the gate generates inputs from the model's signature.
        #[arg(long, value_name = "FILE")]
        samples: Option<PathBuf>,
        /// Report sizes, accuracy and the download against the current version; publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the coordinator's JSON answer instead of a summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Publish an earlier kept version's content as a new, stable version.
    Rollback {
        /// The model.
        name: String,
        /// The kept version to go back to.
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List models and versions.
    Models {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List devices and their last status.
    Fleet {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Issue another device of the coordinator's fleet (the dev fleet in dev mode).
    Enroll {
        /// The coordinator's config (default: dev mode's).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The new device's id [default: the next free dev-NNNN].
        #[arg(long)]
        id: Option<String>,
        /// The folder to write devices/ID/ into [default: the fleet's folder].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
struct AdminArgs {
    /// The admin API's address [default: from the config, 127.0.0.1:7070].
    #[arg(long, value_name = "HOST:PORT")]
    admin: Option<SocketAddr>,
    /// The admin token [default: $OUTPOST_ADMIN_TOKEN, else the data folder's admin.token].
    #[arg(long, env = "OUTPOST_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The coordinator's config, for its address and data folder.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn load_config(path: Option<&Path>) -> anyhow::Result<CoordinatorConfig> {
    match path {
        Some(p) => Ok(CoordinatorConfig::load(p)?),
        None => Ok(CoordinatorConfig::default()),
    }
}

impl AdminArgs {
    fn resolve(&self) -> anyhow::Result<(SocketAddr, String)> {
        let config = load_config(self.config.as_deref())?;
        let addr = self.admin.unwrap_or(config.admin.listen);
        let token = match &self.token {
            Some(t) => t.clone(),
            None => {
                let path = config.storage.data_dir.join(ADMIN_TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .with_context(|| format!("no admin token: pass --token, set OUTPOST_ADMIN_TOKEN, or run where {} exists", path.display()))?
                    .trim()
                    .to_owned()
            }
        };
        Ok((addr, token))
    }
}

#[allow(clippy::print_stderr)]
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => serve(config).await,
        Command::Push {
            file,
            name,
            cloud,
            placement,
            rollout,
            quantize,
            samples,
            dry_run,
            json,
            admin,
        } => {
            let (addr, token) = admin.resolve()?;
            let mut body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut path = format!(
                "/v1/models/{name}?placement={}&rollout={rollout}&dry_run={dry_run}",
                encode(&placement.to_string())
            );
            if let Some(q) = quantize {
                path.push_str(&format!("&quantize={q}"));
            }
            for (key, extra) in [("cloud_size", cloud), ("samples_size", samples)] {
                if let Some(extra) = extra {
                    let bytes = std::fs::read(&extra)
                        .with_context(|| format!("reading {}", extra.display()))?;
                    path.push_str(&format!("&{key}={}", bytes.len()));
                    body.extend(bytes);
                }
            }
            let reply = call(addr, Method::POST, &path, &token, Some(body)).await?;
            if json {
                println!("{reply}");
            } else {
                print!("{}", summarise_push(&reply)?);
            }
            Ok(())
        }
        Command::Rollback { name, to, admin } => {
            let (addr, token) = admin.resolve()?;
            println!(
                "{}",
                call(
                    addr,
                    Method::POST,
                    &format!("/v1/models/{name}/rollback?to={to}"),
                    &token,
                    None
                )
                .await?
            );
            Ok(())
        }
        Command::Models { admin } => {
            let (addr, token) = admin.resolve()?;
            println!(
                "{}",
                call(addr, Method::GET, "/v1/models", &token, None).await?
            );
            Ok(())
        }
        Command::Fleet { admin } => {
            let (addr, token) = admin.resolve()?;
            println!(
                "{}",
                call(addr, Method::GET, "/v1/fleet", &token, None).await?
            );
            Ok(())
        }
        Command::Enroll { config, id, out } => {
            let config_path = match config {
                Some(p) => p,
                None => cloud_coordinator::trust::dev_fleet_config(
                    &CoordinatorConfig::default().storage.data_dir,
                ),
            };
            let fleet_config = CoordinatorConfig::load(&config_path).with_context(|| {
                format!(
                    "loading the fleet of {} (start the coordinator once to make the dev fleet)",
                    config_path.display()
                )
            })?;
            let authority = FleetAuthority::load(&fleet_config)?;
            let fleet_dir = config_path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            let out = out.unwrap_or_else(|| fleet_dir.clone());
            let id = match id {
                Some(id) => id.parse()?,
                None => (1..10_000)
                    .map(|n| format!("{}-{n:04}", authority.name()))
                    .find(|id| !out.join("devices").join(id).exists())
                    .context("no free device id")?
                    .parse()?,
            };
            // New devices reach this coordinator and broker as the fleet's first device does.
            let template = fleet_dir
                .join("devices")
                .join(format!("{}-0001", authority.name()))
                .join("agent.toml");
            let (coordinators, mqtt) = match firmware_config::AgentConfig::load(&template) {
                Ok(agent) => (agent.coordinator.addresses, agent.mqtt.broker),
                Err(_) => (
                    vec![HostPort {
                        host: "localhost".into(),
                        port: fleet_config.quic.listen.port(),
                    }],
                    HostPort {
                        host: "localhost".into(),
                        port: 1883,
                    },
                ),
            };
            let path = authority.enroll(&id, &coordinators, &mqtt, &out)?;
            println!("enrolled device {id}: {}", path.display());
            Ok(())
        }
    }
}

#[allow(clippy::print_stdout)]
async fn serve(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = load_config(config_path.as_deref())?;
    let handle = Coordinator::start(config).await?;
    println!("Outpost coordinator");
    println!("  QUIC (agents):  {}", handle.quic_addr);
    println!("  admin API:      http://{}", handle.admin_addr);
    println!(
        "  MQTT broker:    {}{}",
        handle.mqtt,
        if handle.embedded_broker {
            " (embedded)"
        } else {
            ""
        }
    );
    println!("  data:           {}", handle.data_dir.display());
    if handle.new_admin_token {
        println!(
            "  admin token:    {} (saved in {})",
            handle.admin_token,
            handle.data_dir.join(ADMIN_TOKEN_FILE).display()
        );
    }
    if let Some(agent) = &handle.dev_agent_config {
        println!(
            "  dev mode: a throwaway fleet; an agent config is ready at {}",
            agent.display()
        );
        println!("            more devices: cloud-coordinator enroll");
    }
    outpost_runtime::serve::wait_for_signal().await;
    println!("shutting down");
    handle.shutdown().await;
    Ok(())
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Calls the admin API; returns the body, or the server's error message as an error.
/// A push's answer for people: what was (or would be) published, each variant's size and
/// download against the current version, and the int8 figures.
fn summarise_push(reply: &str) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let v: serde_json::Value =
        serde_json::from_str(reply).context("the coordinator's answer is not JSON")?;
    let text = |key: &str| v[key].as_str().unwrap_or("?").to_owned();
    let mut out = String::new();
    let what = format!(
        "{} version {} (release {}, {})",
        text("model"),
        v["version"],
        v["release"],
        text("stage")
    );
    if v["dry_run"].as_bool() == Some(true) {
        writeln!(
            out,
            "dry run: {what} would be published; nothing was stored or announced"
        )?;
    } else {
        writeln!(out, "published {what}")?;
    }
    for d in v["delta"].as_array().into_iter().flatten() {
        let bytes = d["bytes"].as_u64().unwrap_or(0);
        let new = d["new_bytes"].as_u64().unwrap_or(0);
        let against = match d["against_version"].as_u64() {
            Some(old) => format!(
                "{} new against version {old} ({} of {} chunks, {:.1} %)",
                size(new),
                d["new_chunks"],
                d["chunks"],
                100.0 * new as f64 / bytes.max(1) as f64
            ),
            None => "all new".to_owned(),
        };
        writeln!(
            out,
            "  {:<10}  {} in {} chunks; {against}",
            d["target"].as_str().unwrap_or("?"),
            size(bytes),
            d["chunks"]
        )?;
    }
    if let Some(edge) = v.get("edge").filter(|e| !e.is_null()) {
        let q = &edge["quantize"];
        let (fp32, int8) = (
            q["fp32_bytes"].as_u64().unwrap_or(0),
            q["int8_bytes"].as_u64().unwrap_or(0),
        );
        writeln!(
            out,
            "  int8: {} weight tensors; {} fp32 -> {} int8 ({:.1} %)",
            q["tensors"],
            size(fp32),
            size(int8),
            100.0 * int8 as f64 / fp32.max(1) as f64
        )?;
        let a = &edge["accuracy"];
        writeln!(
            out,
            "  accuracy gate ({} rows, {}):",
            a["rows"],
            a["samples"].as_str().unwrap_or("?")
        )?;
        for o in a["outputs"].as_array().into_iter().flatten() {
            write!(
                out,
                "    {}: max abs error {:.6}, cosine {:.6}",
                o["name"].as_str().unwrap_or("?"),
                o["max_abs_error"].as_f64().unwrap_or(f64::NAN),
                o["cosine"].as_f64().unwrap_or(f64::NAN)
            )?;
            if let Some(t) = o["top1_agreement"].as_f64() {
                write!(out, ", top-1 agreement {:.1} %", t * 100.0)?;
            }
            out.push('\n');
        }
    }
    Ok(out)
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("cannot reach the admin API at {addr} (is the coordinator running?)")
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let body = Upload::new(body.unwrap_or_default());
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(body)?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if status.is_success() {
        return Ok(text);
    }
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or(text);
    if status == StatusCode::UNAUTHORIZED {
        bail!("the coordinator refused the admin token: {message}");
    }
    bail!("{status}: {message}")
}

/// A request body sent in 1 MiB pieces, showing progress on a terminal for big uploads.
struct Upload {
    data: Bytes,
    sent: usize,
    shown: usize,
    show: bool,
}

impl Upload {
    fn new(data: Vec<u8>) -> Self {
        let show = data.len() > 4 << 20 && std::io::stderr().is_terminal();
        Upload {
            data: Bytes::from(data),
            sent: 0,
            shown: 0,
            show,
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    #[allow(clippy::print_stderr)]
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.sent >= this.data.len() {
            if this.show && this.shown < 100 {
                eprintln!(
                    "\ruploaded {:.1} MB, waiting for the coordinator to check and store it",
                    this.data.len() as f64 / 1e6
                );
                this.shown = 100;
            }
            return Poll::Ready(None);
        }
        let end = (this.sent + (1 << 20)).min(this.data.len());
        let piece = this.data.slice(this.sent..end);
        this.sent = end;
        let percent = this.sent * 100 / this.data.len();
        if this.show && percent >= this.shown + 5 {
            eprint!(
                "\ruploading {percent:>3}% of {:.1} MB",
                this.data.len() as f64 / 1e6
            );
            this.shown = percent;
        }
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.data.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.data.len() - self.sent) as u64)
    }
}
