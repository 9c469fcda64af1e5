//! The simulated fleet: provisioned for the run (a device certificate each, as `firmware-config
//! provision` makes them), its coordinator and, when asked, its MQTT broker as child processes
//! of this one, its agents in this process.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use cloud_coordinator::{AdminClient, Coordinator};
use edge_agent::{Agent, AgentHandle};
use firmware_config::{AgentConfig, CoordinatorConfig, EngineChoice, FleetPlan, HostPort};

/// The name of the simulated fleet (its devices are `sim-0001`, `sim-0002`, …).
const FLEET: &str = "sim";

/// How long a child process may take to say it is ready.
const CHILD_READY: Duration = Duration::from_secs(120);

/// Agents started at once.
const START_CONCURRENCY: usize = 16;

/// Which MQTT broker the fleet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Broker {
    /// The coordinator's embedded broker (it dies with the coordinator).
    Embedded,
    /// The embedded broker run on its own, in a child process that can be killed alone.
    Standalone,
}

/// A child process, killed when dropped.
#[derive(Debug)]
struct ChildProcess {
    child: Child,
}

impl ChildProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fleet of a simulation.
#[derive(Debug)]
pub(super) struct SimFleet {
    dir: PathBuf,
    fleet_dir: PathBuf,
    coordinator_config: PathBuf,
    exe: PathBuf,
    broker_port: Option<u16>,
    coordinator: Option<ChildProcess>,
    broker: Option<ChildProcess>,
    /// The coordinator's admin API.
    pub(super) admin: AdminClient,
    /// Device `sim-{i+1:04}` at index `i`: running, or not (never started, or stopped).
    pub(super) agents: Vec<Option<AgentHandle>>,
    /// Whether agents started from now on jitter their MQTT reconnects.
    pub(super) jitter: bool,
}

impl SimFleet {
    /// Provisions `devices` devices into `dir`, starts the broker (if standalone) and the
    /// coordinator; no agent runs yet.
    pub(super) async fn provision(
        dir: &Path,
        devices: usize,
        broker: Broker,
        rollout: impl FnOnce(&mut firmware_config::RolloutSection),
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this program to run the children")?;
        let quic = free_udp_port()?;
        let mqtt = free_tcp_port()?;
        let admin = free_tcp_port()?;
        let loopback = |port: u16| HostPort {
            host: "127.0.0.1".to_owned(),
            port,
        };
        let fleet_dir = dir.join("fleet");
        if fleet_dir.exists() {
            bail!(
                "{} exists: give --data a new folder (a simulation provisions its own fleet)",
                fleet_dir.display()
            );
        }
        let count = u32::try_from(devices).context("too many devices")?;
        let plan = FleetPlan::numbered(FLEET, count, vec![loopback(quic)], loopback(mqtt))?;
        let provisioned = firmware_config::provision(&plan, &fleet_dir)
            .context("provisioning the simulated fleet")?;

        let mut config = CoordinatorConfig::load(&provisioned.coordinator_config)?;
        config.storage.data_dir = dir.join("coordinator");
        config.admin.listen = SocketAddr::from(([127, 0, 0, 1], admin));
        match broker {
            Broker::Embedded => config.mqtt.listen = Some(SocketAddr::from(([127, 0, 0, 1], mqtt))),
            Broker::Standalone => config.mqtt.external = Some(loopback(mqtt)),
        }
        let wanted = u32::try_from(devices.saturating_mul(2)).unwrap_or(u32::MAX);
        config.mqtt.max_connections = Some(
            config
                .mqtt
                .max_connections
                .unwrap_or(firmware_config::CoordinatorMqtt::DEFAULT_MAX_CONNECTIONS)
                .max(wanted),
        );
        rollout(&mut config.rollout);
        let coordinator_config = dir.join("coordinator.toml");
        std::fs::write(
            &coordinator_config,
            toml::to_string(&config).context("writing the coordinator's config")?,
        )?;

        let mut fleet = SimFleet {
            dir: dir.to_owned(),
            fleet_dir,
            coordinator_config,
            exe,
            broker_port: (broker == Broker::Standalone).then_some(mqtt),
            coordinator: None,
            broker: None,
            admin: AdminClient::new(SocketAddr::from(([127, 0, 0, 1], admin)), ""),
            agents: (0..devices).map(|_| None).collect(),
            jitter: true,
        };
        if broker == Broker::Standalone {
            fleet.start_broker().await?;
        }
        fleet.start_coordinator().await?;
        Ok(fleet)
    }

    /// Starts the coordinator (again: same config, ports and data).
    pub(super) async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let args = [
            "sim-coordinator".as_ref(),
            self.coordinator_config.as_os_str(),
        ];
        let (child, line) = self.spawn(&args, "coordinator.log").await?;
        let mut words = line.split_whitespace();
        let (Some("ready"), Some(addr), Some(token)) = (words.next(), words.next(), words.next())
        else {
            bail!("the coordinator did not start: {line:?} (see its log)");
        };
        self.admin = AdminClient::new(addr.parse()?, token);
        self.coordinator = Some(child);
        Ok(())
    }

    /// Kills the coordinator (SIGKILL: a crash, its embedded broker with it).
    pub(super) fn kill_coordinator(&mut self) {
        self.coordinator = None;
    }

    /// Starts the standalone broker (again, on the same port).
    pub(super) async fn start_broker(&mut self) -> anyhow::Result<()> {
        let port = self
            .broker_port
            .context("this simulation's broker is the coordinator's embedded one")?;
        let port = port.to_string();
        let args = [
            "bench-mqtt-broker".as_ref(),
            "tls".as_ref(),
            self.fleet_dir.as_os_str(),
            port.as_ref(),
        ];
        let (child, line) = self.spawn(&args, "broker.log").await?;
        if line != "ready" {
            bail!("the MQTT broker did not start: {line:?} (see its log)");
        }
        self.broker = Some(child);
        Ok(())
    }

    /// Kills the standalone broker (SIGKILL).
    pub(super) fn kill_broker(&mut self) {
        self.broker = None;
    }

    /// The coordinator's CPU time so far, seconds (user and system, all its threads).
    pub(super) fn coordinator_cpu_s(&self) -> Option<f64> {
        cpu_seconds(&format!("/proc/{}/stat", self.coordinator.as_ref()?.pid()))
    }

    /// Runs this program with `args`, its stderr appended to `log` in the simulation's
    /// folder, and waits for its first line on stdout.
    async fn spawn(
        &self,
        args: &[&std::ffi::OsStr],
        log: &str,
    ) -> anyhow::Result<(ChildProcess, String)> {
        let log_path = self.dir.join(log);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut child = Command::new(&self.exe)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {:?}", args.first()))?;
        let stdout = child.stdout.take().context("no stdout from the child")?;
        let child = ChildProcess { child };
        let reading = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let mut reader = BufReader::new(stdout);
            let read = reader.read_line(&mut line);
            // Keep the pipe drained, so the child never blocks on a full one.
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            read.map(|_| line.trim().to_owned())
        });
        match tokio::time::timeout(CHILD_READY, reading).await {
            Ok(Ok(Ok(line))) => Ok((child, line)),
            Ok(Ok(Err(e))) => Err(e).context("reading the child's first line"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!(
                "{:?} did not start within {CHILD_READY:?} (see {})",
                args.first(),
                log_path.display()
            ),
        }
    }

    /// The config of device `i` (index from 0), on the lean profile of a simulated device.
    fn agent_config(&self, i: usize) -> anyhow::Result<AgentConfig> {
        let id = device_id(i);
        let mut config =
            AgentConfig::load(&self.fleet_dir.join("devices").join(&id).join("agent.toml"))?;
        config.api.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.storage.data_dir = Some(self.dir.join("agents").join(&id));
        config.engine = EngineChoice::Cpu;
        // Health every 2 s, so the gate sees a canary within a short bake.
        config.sync.health_interval_s = 2;
        config.mqtt.reconnect_jitter = self.jitter;
        config.profile.inference_threads = Some(1);
        config.profile.api_connections = Some(8);
        config.profile.inference_concurrency = Some(1);
        config.profile.inference_queue = Some(8);
        Ok(config)
    }

    /// Starts the agents of `devices` (indices) that are not running, some at a time;
    /// `progress` gets how many run.
    pub(super) async fn start_agents(
        &mut self,
        devices: std::ops::Range<usize>,
        progress: &mut dyn FnMut(&str),
    ) -> anyhow::Result<()> {
        let wanted: Vec<usize> = devices
            .filter(|&i| self.agents.get(i).is_some_and(Option::is_none))
            .collect();
        let mut reported = std::time::Instant::now();
        for batch in wanted.chunks(START_CONCURRENCY) {
            let mut starting = tokio::task::JoinSet::new();
            for &i in batch {
                let config = self.agent_config(i)?;
                starting.spawn(async move { (i, Agent::start(config).await) });
            }
            while let Some(joined) = starting.join_next().await {
                let (i, started) = joined?;
                let agent = started.with_context(|| format!("starting agent {}", device_id(i)))?;
                self.agents[i] = Some(agent);
            }
            if reported.elapsed() >= Duration::from_secs(1) {
                reported = std::time::Instant::now();
                progress(&format!(
                    "starting agents: {} running",
                    self.running().count()
                ));
            }
        }
        Ok(())
    }

    /// Starts device `i`'s agent.
    pub(super) async fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let config = self.agent_config(i)?;
        let agent = Agent::start(config)
            .await
            .with_context(|| format!("starting agent {}", device_id(i)))?;
        self.agents[i] = Some(agent);
        Ok(())
    }

    /// Stops device `i`'s agent (offline status, store flushed) in a task of its own; the
    /// task ends when it has.
    pub(super) fn stop_agent(&mut self, i: usize) -> Option<tokio::task::JoinHandle<()>> {
        let agent = self.agents.get_mut(i)?.take()?;
        Some(tokio::spawn(agent.shutdown()))
    }

    /// Stops every agent, all at once.
    pub(super) async fn stop_agents(&mut self) {
        let stopping: Vec<_> = (0..self.agents.len())
            .filter_map(|i| self.stop_agent(i))
            .collect();
        for task in stopping {
            let _ = task.await;
        }
    }

    /// The running agents.
    pub(super) fn running(&self) -> impl Iterator<Item = &AgentHandle> {
        self.agents.iter().flatten()
    }

    /// Stops the agents, then the coordinator and the broker.
    pub(super) async fn shutdown(mut self) {
        self.stop_agents().await;
        self.kill_coordinator();
        self.kill_broker();
    }
}

/// Device `i`'s id (index from 0).
pub(super) fn device_id(i: usize) -> String {
    format!("{FLEET}-{:04}", i + 1)
}

/// This process's CPU time so far, seconds.
pub(super) fn own_cpu_s() -> Option<f64> {
    cpu_seconds("/proc/self/stat")
}

/// User and system time from a `/proc/…/stat` file, seconds (clock ticks at 100 Hz, the value
/// of `USER_HZ` on every Linux architecture Outpost runs on).
fn cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((ticks(14)? + ticks(15)?) as f64 / 100.0)
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// `outpost sim-coordinator CONFIG`: the simulation's coordinator, in this (child) process;
/// prints `ready ADMIN_ADDR TOKEN` once it serves, then serves until killed or interrupted.
pub fn run_coordinator_child(config: &Path) -> anyhow::Result<()> {
    let config = CoordinatorConfig::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let coordinator = Coordinator::start(config)
            .await
            .context("starting the coordinator")?;
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "ready {} {}",
                coordinator.admin_addr, coordinator.admin_token
            )?;
            out.flush()?;
        }
        outpost_runtime::serve::wait_for_signal().await;
        coordinator.shutdown().await;
        anyhow::Ok(())
    })
}
