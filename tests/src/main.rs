//! `outpost`: the quickstart (`up`). The fleet simulator and benchmarks are not built yet.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use outpost::quickstart::{self, Options};

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
    /// Simulate a fleet (not built yet).
    Sim,
    /// Benchmarks (not built yet).
    Bench,
}

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (agents, port, data) = match cli.command {
        Command::Up { agents, port, data } => (agents, port, data),
        Command::Sim | Command::Bench => {
            eprintln!(
                "error: `outpost sim` and `outpost bench` are not built yet; `outpost up` is"
            );
            return std::process::ExitCode::FAILURE;
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
