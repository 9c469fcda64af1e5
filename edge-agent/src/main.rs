//! `edge-agent`: run the Outpost agent.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use edge_agent::Agent;
use firmware_config::AgentConfig;

#[derive(Parser)]
#[command(name = "edge-agent", version, about = "The Outpost edge agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// The agent's config: from `firmware-config provision`, or a dev coordinator's
        /// `dev-fleet/devices/dev-0001/agent.toml` (`cloud-coordinator enroll` makes more).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn main() -> std::process::ExitCode {
    // Before anything else: this process may be the GPU probe's child.
    outpost_gpu::answer_probe_if_asked();
    let Command::Run { config } = Cli::parse().command;
    let Some(config) = config else {
        eprintln!(
            "error: edge-agent needs a config (--config agent.toml). Get one from `firmware-config provision`, \
             or start `cloud-coordinator serve` in dev mode and use the agent config it prints."
        );
        return std::process::ExitCode::FAILURE;
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The fault tests' crash points, from FAILPOINTS (a build with the `failpoints` feature).
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let config = AgentConfig::load(&config)
                    .with_context(|| format!("loading {}", config.display()))?;
                let handle = Agent::start(config).await?;
                println!(
                    "Outpost agent {} serving on http://{}",
                    handle.device_id, handle.api_addr
                );
                outpost_runtime::serve::wait_for_signal().await;
                handle.shutdown().await;
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
