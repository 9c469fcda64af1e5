//! `firmware-config`: check Outpost configs and provision fleets.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use firmware_config::{ConfigKind, DeviceClass, FleetPlan, HostPort};

#[derive(Parser)]
#[command(
    name = "firmware-config",
    version,
    about = "Check Outpost configs and provision fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check config files: syntax, keys, values, and the files they name. Exits 1 on any error.
    Validate {
        /// The files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The kind of config; by default a file with a [device] table is an agent config.
        #[arg(long, value_enum)]
        kind: Option<ConfigKind>,
    },
    /// Make a fleet: signing key, CA, coordinator certificate and config, device keys,
    /// certificates and configs. Never overwrites existing keys.
    Provision {
        /// The fleet's name; devices are named NAME-0001, NAME-0002, …
        #[arg(long)]
        fleet: String,
        /// How many devices to issue.
        #[arg(long, default_value_t = 1)]
        devices: u32,
        /// A coordinator's public address (repeat for failover); its host goes in the
        /// coordinator certificate.
        #[arg(long = "coordinator", required = true, value_name = "HOST:PORT")]
        coordinators: Vec<HostPort>,
        /// The MQTT broker agents connect to [default: the first coordinator's host, port 1883].
        #[arg(long, value_name = "HOST:PORT")]
        mqtt: Option<HostPort>,
        /// The device class written in each agent config.
        #[arg(long, value_enum, default_value = "laptop")]
        class: Class,
        /// The folder to write the fleet into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue another device of a provisioned fleet, where its CA key is (offline: the
    /// coordinator does not need the key to serve). It reaches the coordinators and the broker
    /// as the fleet's first device does.
    Enroll {
        /// The fleet folder (`provision --out`: coordinator.toml, ca.crt, ca.key, …).
        #[arg(long)]
        fleet: PathBuf,
        /// The new device's id [default: the next free FLEET-NNNN].
        #[arg(long)]
        id: Option<String>,
        /// The folder to write devices/ID/ into [default: the fleet folder].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write configs for a NATS server cluster as the fleet's broker: nats-node-N.conf in the
    /// fleet folder, one per node (at least 3), each like nats.conf plus routes to the others.
    /// Give each node's MQTT address and cluster route address, in the same order. Agents list
    /// the other nodes in [mqtt] fallbacks.
    NatsCluster {
        /// The fleet folder (`provision --out`).
        #[arg(long)]
        fleet: PathBuf,
        /// A node's MQTT listener (repeat: one per node).
        #[arg(long = "mqtt", required = true, value_name = "HOST:PORT")]
        mqtt: Vec<HostPort>,
        /// A node's cluster listener (repeat: one per node, in the order of --mqtt).
        #[arg(long = "route", required = true, value_name = "HOST:PORT")]
        routes: Vec<HostPort>,
    },
    /// Revoke devices for the fleet's production brokers, where the CA key is: adds them to
    /// revoked.txt, signs a new crl.pem (Mosquitto's crlfile) and writes nats-users.conf without
    /// them; reload the broker to apply (`kill -HUP` Mosquitto, `nats-server --signal reload`).
    /// With no device it signs the list again. Revoke at the coordinator too
    /// (`cloud-coordinator revoke`), which closes QUIC and the embedded broker to the device.
    Revoke {
        /// The fleet folder (`provision --out`).
        #[arg(long)]
        fleet: PathBuf,
        /// The devices to revoke.
        devices: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Class {
    Phone,
    Laptop,
    EdgeBox,
}

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { files, kind } => {
            let mut failed = false;
            for file in &files {
                match firmware_config::validate_file(file, kind) {
                    Ok(kind) => println!("{}: ok ({} config)", file.display(), kind_name(kind)),
                    Err(errors) => {
                        failed = true;
                        eprintln!("{errors}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Provision {
            fleet,
            devices,
            coordinators,
            mqtt,
            class,
            out,
        } => {
            let mqtt = mqtt.unwrap_or_else(|| HostPort {
                host: coordinators[0].host.clone(),
                port: 1883,
            });
            let mut plan = FleetPlan::numbered(&fleet, devices, coordinators, mqtt)?;
            plan.device_class = match class {
                Class::Phone => DeviceClass::Phone,
                Class::Laptop => DeviceClass::Laptop,
                Class::EdgeBox => DeviceClass::EdgeBox,
            };
            let made = firmware_config::provision(&plan, &out)
                .with_context(|| format!("provisioning fleet {fleet} into {}", out.display()))?;
            println!("fleet {fleet} in {}", made.dir.display());
            println!("  manifest key: {}", made.manifest_key);
            println!("  coordinator:  {}", made.coordinator_config.display());
            println!(
                "  brokers:      {} (Mosquitto) and {} (NATS), TLS with the fleet's certificates; the embedded broker needs neither",
                made.dir
                    .join(firmware_config::provision::files::MOSQUITTO_CONFIG)
                    .display(),
                made.dir
                    .join(firmware_config::provision::files::NATS_CONFIG)
                    .display()
            );
            for (id, path) in &made.devices {
                println!("  device {id}: {}", path.display());
            }
            println!(
                "Keep ca.key and fleet-signing.key secret; copy each devices/ID folder to its device."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Enroll { fleet, id, out } => {
            let config_path = fleet.join(firmware_config::provision::files::COORDINATOR_CONFIG);
            let config = firmware_config::CoordinatorConfig::load(&config_path)
                .with_context(|| format!("loading the fleet in {}", fleet.display()))?;
            let authority = firmware_config::provision::FleetAuthority::load(&config)?;
            let id = id.map(|id| id.parse()).transpose()?;
            let out = out.unwrap_or_else(|| fleet.clone());
            let (id, path) = authority.enroll_next(id, &fleet, config.quic.listen.port(), &out)?;
            println!("enrolled device {id}: {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::NatsCluster {
            fleet,
            mqtt,
            routes,
        } => {
            anyhow::ensure!(
                mqtt.len() == routes.len(),
                "{} --mqtt addresses but {} --route addresses: give one of each per node",
                mqtt.len(),
                routes.len()
            );
            let config_path = fleet.join(firmware_config::provision::files::COORDINATOR_CONFIG);
            let config = firmware_config::CoordinatorConfig::load(&config_path)
                .with_context(|| format!("loading the fleet in {}", fleet.display()))?;
            let name = config
                .fleet
                .as_ref()
                .map(|f| f.name.clone())
                .context("the fleet's coordinator.toml has no [fleet]")?;
            let nodes: Vec<_> = mqtt
                .into_iter()
                .zip(routes)
                .map(|(mqtt, route)| firmware_config::provision::NatsNode { mqtt, route })
                .collect();
            for path in firmware_config::provision::write_nats_cluster(&fleet, &name, &nodes)? {
                println!(
                    "{} (run: nats-server -c {})",
                    path.display(),
                    path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { fleet, devices } => {
            let config_path = fleet.join(firmware_config::provision::files::COORDINATOR_CONFIG);
            let config = firmware_config::CoordinatorConfig::load(&config_path)
                .with_context(|| format!("loading the fleet in {}", fleet.display()))?;
            let authority = firmware_config::provision::FleetAuthority::load(&config)?;
            let devices = devices
                .iter()
                .map(|d| d.parse())
                .collect::<Result<Vec<firmware_config::DeviceId>, _>>()?;
            let written = authority.update_broker_files(&fleet, &devices)?;
            let revoked: Vec<&str> = written.revoked.iter().map(|d| d.as_str()).collect();
            println!(
                "revoked for the brokers: {}",
                if revoked.is_empty() {
                    "none".to_owned()
                } else {
                    revoked.join(", ")
                }
            );
            println!(
                "  {} (Mosquitto: kill -HUP to reload)",
                written.crl.display()
            );
            println!(
                "  {} (NATS: nats-server --signal reload)",
                written.nats_users.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn kind_name(kind: ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Agent => "agent",
        ConfigKind::Coordinator => "coordinator",
    }
}
