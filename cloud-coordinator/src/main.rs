//! `cloud-coordinator`: serve, and talk to a running coordinator's admin API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use cloud_coordinator::admin::{PlacementArg, PushQuery, parse_output_kinds};
use cloud_coordinator::registry::{Int8Overrides, Quantize, TextOptions};
use cloud_coordinator::{ADMIN_TOKEN_FILE, AdminClient, Coordinator, PushOptions};
use firmware_config::{CoordinatorConfig, FleetAuthority, HostPort};
use outpost_runtime::accuracy::OutputKind;

mod summary;

use summary::{finetune_progress, summarise_finetune, summarise_push, upload_progress};

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

// Parsed once, at start: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
        /// It stays there until `rollout` moves it.
        #[arg(long, default_value_t = 100, conflicts_with = "canary")]
        rollout: u8,
        /// A rollout gated on device health: this share (1-99) gets the new version first; the
        /// coordinator widens it after each bake within the limits ([rollout] steps, then
        /// stable) and aborts it past one. Limits default to coordinator.toml's [rollout].
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=99))]
        canary: Option<u8>,
        /// With --canary: seconds each step must stay within the limits.
        #[arg(long, value_name = "SECONDS", requires = "canary")]
        bake: Option<u64>,
        /// With --canary: the candidate's largest error rate (0.01 is 1 %).
        #[arg(long, value_name = "SHARE", requires = "canary")]
        max_error_rate: Option<f64>,
        /// With --canary: the largest rise of its p99 latency over stable's (0.2 is 20 %).
        #[arg(long, value_name = "SHARE", requires = "canary")]
        max_p99_regression: Option<f64>,
        /// With --canary: the largest rise of its offloaded share over stable's (0.1 is 10
        /// points).
        #[arg(long, value_name = "SHARE", requires = "canary")]
        max_offload_increase: Option<f64>,
        /// The most rows (outermost dimension) one inference request may carry, like Triton's
        /// max_batch_size; devices and the coordinator refuse more with an error naming it.
        /// Default: bounded only by each device's memory budget.
        #[arg(long, value_name = "ROWS", value_parser = clap::value_parser!(u64).range(1..))]
        max_batch: Option<u64>,
        /// Weight quantisation of the edge variant: int8 (the default when devices run the
        /// model: 4x smaller, behind an accuracy gate) or none.
        #[arg(long, value_parser = ["int8", "none"])]
        quantize: Option<String>,
        /// Inputs for the int8 accuracy gate: an inference request body ({"inputs": [...]}).
        /// Without it the gate generates inputs from the model's signature.
        #[arg(long, value_name = "FILE")]
        samples: Option<PathBuf>,
        /// The model's HuggingFace tokenizer.json (WordPiece, BPE or Unigram): devices then
        /// take text, a BYTES input of UTF-8 strings, and tokenize it into the model's
        /// input_ids (and attention_mask, token_type_ids when it has them). Token ids keep
        /// working. Stored as chunks and signed with the model.
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
        /// With --tokenizer: the text input's name apps send.
        #[arg(long, value_name = "NAME", requires = "tokenizer", default_value = cloud_coordinator::registry::DEFAULT_TEXT_INPUT)]
        text_input: String,
        /// With --tokenizer: the most tokens a text may have, special tokens included
        /// (default: the tokenizer's truncation length, else 512). The push runs the model
        /// once at this length.
        #[arg(long, value_name = "TOKENS", requires = "tokenizer")]
        max_tokens: Option<u32>,
        /// With --tokenizer: cut longer texts to --max-tokens (the answer's "truncated"
        /// parameter lists them) instead of refusing them with a 400.
        #[arg(long, requires = "tokenizer")]
        truncate: bool,
        /// The coordinator.toml [[backend]] (an Open Inference Protocol server: Triton, KServe,
        /// MLServer) that serves the model's offloaded calls instead of the coordinator's
        /// worker pool. The push checks that the backend serves a model of this name; the
        /// file gives the signature devices check inputs against.
        #[arg(long, value_name = "NAME")]
        backend: Option<String>,
        /// What an output is, for the int8 gate, which judges classifiers by top-1 agreement
        /// and probability error, embeddings by cosine, scores by absolute error, and shows
        /// hidden states without judging them, and labels (integers) by the share of elements
        /// equal. Repeat for several outputs. Default: a Softmax's or the cascade's output is a
        /// classifier; an integer or boolean output a label; otherwise rank 3+ is hidden, one
        /// value a row a score, the rest embeddings.
        #[arg(long = "output-kind", value_name = "NAME:KIND", value_parser = parse_output_kind)]
        output_kinds: Vec<(String, OutputKind)>,
        /// This push's int8 gate tolerance for scores ([registry] int8_max_abs_error).
        #[arg(long, value_name = "ERROR")]
        int8_max_abs_error: Option<f64>,
        /// ... for classifiers' probabilities ([registry] int8_max_prob_error).
        #[arg(long, value_name = "ERROR")]
        int8_max_prob_error: Option<f64>,
        /// ... for embeddings: the smallest cosine of a vector ([registry] int8_min_cosine).
        #[arg(long, value_name = "COSINE")]
        int8_min_cosine: Option<f64>,
        /// ... for classifiers: the least share of rows whose top class agrees (0.9 is 90 %;
        /// [registry] int8_min_top1_agreement).
        #[arg(long, value_name = "SHARE")]
        int8_min_top1_agreement: Option<f64>,
        /// The most of the weights (0-1, by elements) the gate may keep in fp32 to pass
        /// ([registry] int8_max_kept_share).
        #[arg(long, value_name = "SHARE")]
        int8_max_kept_share: Option<f64>,
        /// Report sizes, accuracy and the download against the current version; publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the coordinator's JSON answer instead of a summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Retrain a model's head (its last MatMul/Gemm layer before the output) on labelled
    /// examples, judge it against the current head on held-out examples, and publish it only
    /// when it is better: the usual int8 variant and accuracy gate, a signed release, as a canary
    /// under the health gate by default. Devices fetch only the head's chunks.
    Finetune {
        /// The model (its stable version is the starting point).
        name: String,
        /// The examples: JSON Lines, one a line, the model's inputs as in an inference request
        /// (one row) plus "label" (a class index or name, or a 0-1 target for a score).
        #[arg(long)]
        data: PathBuf,
        /// The output whose head is retrained (needed when the model has several).
        #[arg(long)]
        output: Option<String>,
        /// The layer to retrain: auto (the MatMul/Gemm before the output) or a node name.
        #[arg(long, default_value = "auto")]
        layer: String,
        /// Share of the examples held out to judge the old and the new head.
        #[arg(long, default_value_t = 0.2)]
        holdout: f64,
        /// Seed of the split into train, validation and held-out examples.
        #[arg(long)]
        seed: Option<u64>,
        /// The least gain in accuracy (classifier) or AUC (score) that publishes.
        #[arg(long, default_value_t = cloud_coordinator::finetune::DEFAULT_MIN_GAIN)]
        min_gain: f64,
        /// Share of devices (1-100) that get the new head first; under 100 the rollout is gated
        /// on device health ([rollout] in coordinator.toml).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=100))]
        rollout: u8,
        /// Train and judge, and report what devices would fetch; publish nothing.
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
    /// Move a model's candidate along: give it to another share of devices (those that have it
    /// keep it: the cohort grows from the same devices), promote it to stable, or abort it (every
    /// device back to stable). Each is a new signed release.
    Rollout {
        /// The model.
        name: String,
        /// The share of devices, 1 to 99, that get the candidate.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=99), conflicts_with_all = ["promote", "abort"])]
        percent: Option<u8>,
        /// Make the candidate the stable version.
        #[arg(long, conflicts_with = "abort")]
        promote: bool,
        /// Drop the candidate.
        #[arg(long)]
        abort: bool,
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
    /// Revoke a device: the coordinator refuses its QUIC connections and closes the open ones,
    /// the embedded broker refuses it and closes its connection, its statuses are ignored, and
    /// it gets no new release. Kept across restarts. (`revoked` lists them.)
    Revoke {
        /// The device id.
        device: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The revoked devices, with when each was revoked.
    Revoked {
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
    admin: Option<HostPort>,
    /// Speak HTTPS to the admin API, trusting this CA certificate (PEM) [default: HTTPS with
    /// the fleet CA when the config sets [admin] tls_cert, else plain HTTP on loopback].
    #[arg(long, value_name = "FILE")]
    admin_ca: Option<PathBuf>,
    /// The admin token [default: $OUTPOST_ADMIN_TOKEN, else the data folder's admin.token].
    #[arg(long, env = "OUTPOST_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The coordinator's config, for its address and data folder.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The log filter when RUST_LOG is unset.
const DEFAULT_LOG: &str = "info,rumqttd=warn";

fn load_config(path: Option<&Path>) -> anyhow::Result<CoordinatorConfig> {
    match path {
        Some(p) => Ok(CoordinatorConfig::load(p)?),
        None => Ok(CoordinatorConfig::default()),
    }
}

impl AdminArgs {
    /// The admin API client these arguments name.
    fn client(&self) -> anyhow::Result<AdminClient> {
        let config = load_config(self.config.as_deref())?;
        let token = self.token(&config)?;
        // The address: --admin, else where the config listens (its loopback when it listens on
        // every address).
        let target = match &self.admin {
            Some(target) => target.clone(),
            None => {
                let listen = config.admin.listen;
                let ip = match listen.ip() {
                    std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    }
                    std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    }
                    ip => ip,
                };
                HostPort {
                    host: ip.to_string(),
                    port: listen.port(),
                }
            }
        };
        let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&target.to_string())
            .with_context(|| format!("the admin API's address {target}"))?
            .next()
            .with_context(|| format!("{target} names no address"))?;
        let client = AdminClient::new(addr, token);
        let ca = match (&self.admin_ca, &config.fleet) {
            (Some(ca), _) => Some(ca.clone()),
            (None, Some(fleet)) if config.admin.tls().is_some() => Some(fleet.ca.clone()),
            (None, None) if config.admin.tls().is_some() => anyhow::bail!(
                "the config's admin API speaks HTTPS but names no fleet CA: pass --admin-ca"
            ),
            (None, _) => None,
        };
        Ok(match ca {
            Some(ca) => client.over_tls(&ca, &target.host)?,
            None => client,
        })
    }

    fn token(&self, config: &CoordinatorConfig) -> anyhow::Result<String> {
        let token = match &self.token {
            Some(t) => {
                if std::env::var("OUTPOST_ADMIN_TOKEN").ok().as_deref() != Some(t.as_str()) {
                    #[allow(clippy::print_stderr)]
                    {
                        eprintln!(
                            "warning: a token given as --token is visible to every user of this machine (ps); set OUTPOST_ADMIN_TOKEN, or run where the data folder's {ADMIN_TOKEN_FILE} is"
                        );
                    }
                }
                t.clone()
            }
            None => {
                let path = config.storage.data_dir.join(ADMIN_TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .with_context(|| format!("no admin token: pass --token, set OUTPOST_ADMIN_TOKEN, or run where {} exists", path.display()))?
                    .trim()
                    .to_owned()
            }
        };
        Ok(token)
    }
}

#[allow(clippy::print_stderr)]
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The fault tests' crash points, from FAILPOINTS (a build with the `failpoints` feature).
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
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

#[allow(clippy::print_stdout, clippy::print_stderr)]
async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => serve(config).await,
        Command::Push {
            file,
            name,
            cloud,
            placement,
            rollout,
            canary,
            bake,
            max_error_rate,
            max_p99_regression,
            max_offload_increase,
            max_batch,
            quantize,
            samples,
            tokenizer,
            text_input,
            max_tokens,
            truncate,
            backend,
            output_kinds,
            int8_max_abs_error,
            int8_max_prob_error,
            int8_min_cosine,
            int8_min_top1_agreement,
            int8_max_kept_share,
            dry_run,
            json,
            admin,
        } => {
            let client = admin.client()?.on_upload(upload_progress());
            let model =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let read = |path: Option<PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
                path.map(|p| std::fs::read(&p).with_context(|| format!("reading {}", p.display())))
                    .transpose()
            };
            let options = PushOptions {
                query: PushQuery {
                    placement: placement.0,
                    rollout_percent: canary.unwrap_or(rollout),
                    canary,
                    bake_s: bake,
                    max_error_rate,
                    max_p99_regression,
                    max_offload_increase,
                    max_batch,
                    quantize: match quantize.as_deref() {
                        Some("none") => Some(Quantize::None),
                        Some(_) => Some(Quantize::Int8),
                        None => None,
                    },
                    output_kinds,
                    int8: Int8Overrides {
                        max_abs_error: int8_max_abs_error,
                        max_prob_error: int8_max_prob_error,
                        min_cosine: int8_min_cosine,
                        min_top1_agreement: int8_min_top1_agreement,
                        max_kept_share: int8_max_kept_share,
                    },
                    dry_run,
                    text: TextOptions {
                        name: tokenizer.is_some().then_some(text_input),
                        max_tokens,
                        truncate,
                    },
                    backend,
                    ..PushQuery::default()
                },
                cloud_model: read(cloud)?,
                samples: read(samples)?,
                tokenizer: read(tokenizer)?,
            };
            let published = client.push(&name, model, &options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&published)?);
            } else {
                print!("{}", summarise_push(&published)?);
            }
            Ok(())
        }
        Command::Finetune {
            name,
            data,
            output,
            layer,
            holdout,
            seed,
            min_gain,
            rollout,
            dry_run,
            json,
            admin,
        } => {
            let client = admin
                .client()?
                .on_upload(upload_progress())
                .on_finetune(finetune_progress());
            let body =
                std::fs::read(&data).with_context(|| format!("reading {}", data.display()))?;
            let query = cloud_coordinator::finetune::FinetuneQuery {
                output,
                layer: (layer != "auto").then_some(layer),
                holdout: Some(holdout),
                seed,
                min_gain: Some(min_gain),
                rollout: Some(rollout),
                dry_run,
            };
            eprintln!(
                "fine-tuning {name} on {} ({} bytes) at the coordinator",
                data.display(),
                body.len()
            );
            let report = client.finetune(&name, body, &query).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", summarise_finetune(&report)?);
            }
            Ok(())
        }
        Command::Rollback { name, to, admin } => {
            let published = admin.client()?.rollback(&name, to).await?;
            println!("{}", serde_json::to_string_pretty(&published)?);
            Ok(())
        }
        Command::Rollout {
            name,
            percent,
            promote,
            abort,
            admin,
        } => {
            use cloud_coordinator::registry::RolloutAction;
            let action = match (percent, promote, abort) {
                (Some(p), false, false) => RolloutAction::Percent(p),
                (None, true, false) => RolloutAction::Promote,
                (None, false, true) => RolloutAction::Abort,
                _ => anyhow::bail!("say one of --percent P, --promote, --abort"),
            };
            let published = admin.client()?.rollout(&name, action).await?;
            println!(
                "{} release {}: version {} {}",
                published.model,
                published.release,
                published.version,
                match action {
                    RolloutAction::Percent(p) => format!("on {p} % of devices"),
                    RolloutAction::Promote => "promoted to stable".to_owned(),
                    RolloutAction::Abort => "stable; the candidate is dropped".to_owned(),
                }
            );
            Ok(())
        }
        Command::Models { admin } => {
            let models = admin.client()?.models().await?;
            println!("{}", serde_json::to_string_pretty(&models)?);
            Ok(())
        }
        Command::Fleet { admin } => {
            let fleet = admin.client()?.fleet().await?;
            println!("{}", serde_json::to_string_pretty(&fleet)?);
            Ok(())
        }
        Command::Revoke { device, admin } => {
            let revoked = admin.client()?.revoke(&device).await?;
            if revoked.new {
                println!("revoked device {}", revoked.device);
            } else {
                println!("device {} was already revoked", revoked.device);
            }
            if let Some(files) = &revoked.broker_files {
                println!("production brokers: {files}");
            }
            Ok(())
        }
        Command::Revoked { admin } => {
            let list = admin.client()?.revoked().await?;
            println!("{}", serde_json::to_string_pretty(&list)?);
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
            let id = id.map(|id| id.parse()).transpose()?;
            let (id, path) =
                authority.enroll_next(id, &fleet_dir, fleet_config.quic.listen.port(), &out)?;
            println!("enrolled device {id}: {}", path.display());
            Ok(())
        }
    }
}

#[allow(clippy::print_stdout)]
async fn serve(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // rumqttd logs several INFO lines per device connection: at fleet scale that floods the
            // log, so the embedded broker speaks at warn unless RUST_LOG asks for more.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = load_config(config_path.as_deref())?;
    let handle = Coordinator::start(config).await?;
    println!("Outpost coordinator");
    println!("  QUIC (agents):  {}", handle.quic_addr);
    let scheme = if handle.admin_tls { "https" } else { "http" };
    println!("  admin API:      {scheme}://{}", handle.admin_addr);
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

/// `--output-kind NAME:KIND`.
fn parse_output_kind(text: &str) -> Result<(String, OutputKind), String> {
    let mut kinds = parse_output_kinds(text)?;
    match (kinds.pop(), kinds.is_empty()) {
        (Some(kind), true) => Ok(kind),
        _ => Err(format!("{text:?} must be one NAME:KIND")),
    }
}
