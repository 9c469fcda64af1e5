//! `outpost`: the quickstart (`up`), the benchmarks (`bench`) and the fleet simulator (`sim`).

#[cfg(target_os = "linux")]
mod runtime_dir;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use outpost::bench::{self, BenchOptions};
use outpost::quickstart::{self, Options};
use outpost::sim::{self, Scenario, SimOptions};
use outpost::{memory, mqtt_connect, switching};

#[derive(Parser)]
#[command(name = "outpost", version, about = "Outpost's quickstart and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a coordinator (embedded broker), agents and the demo models, print curl commands,
    /// and serve until Ctrl-C.
    Up {
        /// How many agents (API ports 8080, 8081, …).
        #[arg(long, default_value_t = 1)]
        agents: u16,
        /// The first agent's API port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Where to keep data.
        #[arg(long, default_value = "outpost-data/quickstart")]
        data: PathBuf,
    },
    /// Simulate a fleet: N real agents (each with its own device certificate, store, MQTT and
    /// QUIC connections, the tract engine) in this process against a coordinator in a child
    /// process, through a scenario. Prints a table of figures (or JSON) and writes a plot.
    Sim {
        /// Agents at once.
        #[arg(long, default_value_t = 100)]
        agents: usize,
        /// What happens: push (a new version), canary (a worse candidate the gate must
        /// abort), broker-restart, coordinator-restart (the reconnect storm, with and without
        /// jitter), churn (agents leaving and joining during a rollout).
        #[arg(long, value_enum, default_value_t = Scenario::Push)]
        scenario: Scenario,
        /// Print the report as JSON on stdout (figures, notes and curves) instead of a table.
        #[arg(long)]
        json: bool,
        /// Where to write the plot of convergence over time (SVG) [default:
        /// outpost-sim-SCENARIO.svg]; `-` for none.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// canary: the candidate's share of the fleet, percent.
        #[arg(long, default_value_t = 10)]
        canary: u8,
        /// canary: seconds the candidate bakes before the gate decides.
        #[arg(long, default_value_t = 10)]
        bake: u64,
        /// broker-restart, coordinator-restart: seconds the killed process stays down.
        #[arg(long, default_value_t = 5)]
        down: u64,
        /// churn: seconds agents leave and join.
        #[arg(long, default_value_t = 20)]
        churn: u64,
        /// The longest any phase may take, seconds, before the simulation fails.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Keep the fleet, stores and logs (coordinator.log, broker.log) in this new folder
        /// [default: a temporary one, removed at the end].
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// The simulation's coordinator, in this process (run by `sim`).
    #[command(hide = true)]
    SimCoordinator {
        /// Its config.
        config: PathBuf,
    },
    /// Measure the agent against its baselines, side by side in one run: local API vs the
    /// engine in-process, idle memory, push-to-serving for 1, 10 and 100 agents. Build with
    /// --release.
    Bench {
        /// Calls per latency figure.
        #[arg(long, default_value_t = 1000)]
        calls: usize,
        /// Agent counts for push-to-serving.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
        agents: Vec<u32>,
        /// Only the GPU engine against tract (video-ranker, 1, 64 and 1024 candidates).
        #[arg(long)]
        gpu_only: bool,
        /// Only the local API against the engine in-process (video-ranker, 1 and 256
        /// candidates, JSON and binary), and an idle agent's memory.
        #[arg(long)]
        api_only: bool,
        /// Only peak memory against body size (JSON and binary requests, each in a child).
        #[arg(long)]
        memory_only: bool,
        /// Only load (64 clients) with the model steady and during 10 version switches.
        #[arg(long)]
        switch_only: bool,
        /// Only the text encoder: tract fp32 and int8 against ONNX Runtime (when python3 has
        /// onnxruntime) at sequence 32 and 128, batch 1 and 8, and sequence buckets against
        /// exact lengths.
        #[arg(long)]
        text_only: bool,
        /// Only offloaded calls to Open Inference Protocol servers (repeat for replicas;
        /// http://IP:PORT, each serving the demo video-ranker as "video-ranker"): through the
        /// coordinator against the server directly, batch 1 and 256, and throughput with one
        /// replica and with all.
        #[arg(long, value_name = "URL")]
        backend: Vec<String>,
        /// Only coordinator replicas on one shared store (a folder): how long the replica takes
        /// a release over, and a fresh agent's first sync from it against the same from the
        /// coordinator the model was pushed to (video-ranker-xl), this many rounds.
        #[arg(long, value_name = "ROUNDS")]
        replicas_only: Option<usize>,
        /// Threads for the text encoder's figures (tract and ONNX Runtime alike).
        #[arg(long, default_value_t = 1)]
        text_threads: usize,
        /// With --text-only: your own encoder instead of the model-zoo one (an ONNX file whose
        /// inputs are input_ids and, when it has them, attention_mask and token_type_ids, as a
        /// standard BERT-class export writes them).
        #[arg(long, value_name = "FILE", requires = "text_only")]
        text_model: Option<PathBuf>,
        /// The ONNX Runtime library (libonnxruntime.so, 1.17 or newer) for the figures of the
        /// agent's ONNX Runtime engine (`onnxruntime_library` in agent.toml); by default the one
        /// python3's onnxruntime package ships.
        #[arg(long, value_name = "FILE")]
        onnxruntime_library: Option<PathBuf>,
        /// Only MQTT connects: this many clients at once to the embedded broker over TLS, beside
        /// rumqttd over plain TCP (each broker in a child, its memory per connection).
        #[arg(long)]
        mqtt_only: Option<usize>,
        /// Request sizes, in video-ranker rows, for the memory figures (past the agent's
        /// 64 MiB body limit a request is refused before it is read).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "10000,100000,900000,10000000"
        )]
        memory_rows: Vec<u64>,
        /// Text lengths, in tokens, for the memory figures of 2 000 texts in one request to the
        /// intent classifier, on the device and offloaded to the coordinator.
        #[arg(long, value_delimiter = ',', default_value = "8,32,128,512")]
        memory_tokens: Vec<u64>,
    },
    /// The GPU engine against tract on this machine's adapter, from the binary (for a GPU
    /// machine without a Rust toolchain): every demo and text model's int8 variant and each
    /// --model file, int8 weights unpacked (held to 1e-4; the exit status says whether all
    /// were) and with int8 activations (shown).
    GpuCheck {
        /// An ONNX model of your own to check too (repeat for several); quantised to int8 as
        /// the coordinator does unless it already is.
        #[arg(long = "model", value_name = "FILE")]
        models: Vec<PathBuf>,
    },
    /// One MQTT broker in this process (run by `bench --mqtt-only`).
    #[command(hide = true)]
    BenchMqttBroker {
        /// plain or tls.
        case: String,
        /// The provisioned fleet folder.
        fleet: PathBuf,
        /// The port.
        port: u16,
    },
    /// One memory case in this process (run by `bench`).
    #[command(hide = true)]
    BenchMemoryCase {
        /// parse-value, parse-typed, agent-json or agent-binary.
        case: String,
        /// video-ranker rows.
        rows: u64,
    },
}

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn main() -> std::process::ExitCode {
    // Before anything else: this process may be the GPU probe's child.
    outpost_gpu::answer_probe_if_asked();
    let cli = Cli::parse();
    // Before any thread starts and any GPU probe: quiets Mesa's Wayland probe (see the module).
    #[cfg(target_os = "linux")]
    if matches!(
        cli.command,
        Command::Up { .. }
            | Command::Bench { .. }
            | Command::BenchMemoryCase { .. }
            | Command::Sim { .. }
            | Command::GpuCheck { .. }
    ) {
        runtime_dir::ensure();
    }
    let (agents, port, data) = match cli.command {
        Command::Up { agents, port, data } => (agents, port, data),
        Command::Bench {
            calls,
            agents,
            gpu_only,
            api_only,
            memory_only,
            switch_only,
            mqtt_only,
            memory_rows,
            memory_tokens,
            text_only,
            text_threads,
            text_model,
            onnxruntime_library,
            backend,
            replicas_only,
        } => {
            let text = || {
                outpost::text_bench::run(
                    calls.clamp(1, 500),
                    text_threads.max(1),
                    text_model.as_deref(),
                    onnxruntime_library.as_deref(),
                    &mut |line| println!("{line}"),
                )
            };
            if text_only {
                return exit(text());
            }
            if !backend.is_empty() {
                return exit(on_runtime(outpost::backend_bench::run(
                    &backend,
                    calls.clamp(1, 2000),
                    &mut |line| println!("{line}"),
                )));
            }
            if let Some(rounds) = replicas_only {
                return exit(on_runtime(outpost::replica_bench::run(
                    rounds.clamp(1, 100),
                    &mut |line| println!("{line}"),
                )));
            }
            if let Some(clients) = mqtt_only {
                return exit(mqtt_connect::run(clients.max(1), |line| println!("{line}")));
            }
            if switch_only {
                return exit(on_runtime(switching::bench(64, 10, |line| {
                    println!("{line}")
                })));
            }
            if memory_only {
                return exit(memory::run(&memory_rows, &memory_tokens, |line| {
                    println!("{line}")
                }));
            }
            let memory = run_bench(BenchOptions {
                calls: calls.max(1),
                agents,
                gpu_only,
                api_only,
            });
            if gpu_only || api_only || memory != std::process::ExitCode::SUCCESS {
                return memory;
            }
            return exit(
                memory::run(&memory_rows, &memory_tokens, |line| println!("{line}"))
                    .and_then(|()| text()),
            );
        }
        Command::BenchMemoryCase { case, rows } => return exit(memory::run_case(&case, rows)),
        Command::BenchMqttBroker { case, fleet, port } => {
            return exit(mqtt_connect::run_broker(&case, &fleet, port));
        }
        Command::Sim {
            agents,
            scenario,
            json,
            plot,
            canary,
            bake,
            down,
            churn,
            timeout,
            data,
        } => {
            let options = SimOptions {
                agents,
                scenario,
                canary_percent: canary,
                bake: std::time::Duration::from_secs(bake),
                down: std::time::Duration::from_secs(down),
                churn: std::time::Duration::from_secs(churn),
                timeout: std::time::Duration::from_secs(timeout),
                data_dir: data,
            };
            let plot = match plot {
                Some(p) if p.as_os_str() == "-" => None,
                Some(p) => Some(p),
                None => Some(PathBuf::from(format!(
                    "outpost-sim-{}.svg",
                    scenario.name()
                ))),
            };
            return exit(run_sim(&options, json, plot.as_deref()));
        }
        Command::GpuCheck { models } => {
            return match outpost::gpu_check::run(&models, &mut |line| println!("{line}")) {
                Ok(true) => std::process::ExitCode::SUCCESS,
                Ok(false) => {
                    eprintln!("error: a model is off the GPU or past the tolerance (above)");
                    std::process::ExitCode::FAILURE
                }
                Err(e) => exit(Err(e)),
            };
        }
        Command::SimCoordinator { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "warn".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            return exit(sim::run_coordinator_child(&config));
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let options = Options {
        agents: agents.max(1),
        first_port: port,
        data_dir: data,
        coordinator: Default::default(),
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let running = quickstart::up(&options, |line| println!("{line}")).await?;
                println!(
                    "\nReady. Try:\n{}\n\nCtrl-C to stop.",
                    quickstart::curl_examples(running.agents[0].api_addr)
                );
                outpost_runtime::serve::wait_for_signal().await;
                println!("stopping");
                running.shutdown().await;
                anyhow::Ok(())
            })
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs `work` to the end on a new multi-threaded runtime.
fn on_runtime(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(work)
}

#[allow(clippy::print_stderr)]
fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a simulation: a progress line on stderr while it runs, then the table or the JSON on
/// stdout and the plot.
#[allow(clippy::print_stdout, clippy::print_stderr)]
fn run_sim(options: &SimOptions, json: bool, plot: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: a debug build; run `cargo run --release -p outpost -- sim` for figures"
        );
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let terminal = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut progress = |line: &str| {
        let elapsed = started.elapsed().as_secs_f64();
        if terminal {
            eprint!("\r\x1b[2K[{elapsed:>6.1} s] {line}");
        } else {
            eprintln!("[{elapsed:>6.1} s] {line}");
        }
        let _ = std::io::stderr().flush();
    };
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(sim::run(options, &mut progress)));
    if terminal {
        eprintln!();
    }
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for line in report.table() {
            println!("{line}");
        }
    }
    if let Some(path) = plot {
        report.plot(path)?;
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn run_bench(options: BenchOptions) -> std::process::ExitCode {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: a debug build; run `cargo run --release -p outpost -- bench` for figures"
        );
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(bench::run(&options, |line| println!("{line}"))));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
