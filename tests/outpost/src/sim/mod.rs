//! `outpost sim`: a fleet of real agents against one coordinator, through a scenario, with its
//! figures, a table, `--json` and a plot of convergence over time.
//!
//! Each simulated device is the agent library itself ([`edge_agent::Agent`]): its own device
//! certificate from a fleet provisioned for the run, its own sled store and chunk files, its own
//! MQTT (TLS 1.3, mutual) and QUIC connections, the tract engine. The agents run in this
//! process on a lean profile (one inference thread, a small API and queue, the CPU engine). The
//! coordinator runs in a child process (`outpost sim-coordinator`, hidden), so that it can be
//! killed and started again as a real one would be, and so that this process's resident memory
//! is the agents' alone; in `broker-restart` the MQTT broker is a child of its own too (the
//! embedded broker, standalone: `outpost bench-mqtt-broker tls`).
//!
//! Scenarios ([`Scenario`]): `push`, `canary`, `broker-restart`, `coordinator-restart` and
//! `churn`; see [`scenarios`].

mod fleet;
mod plot;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use fleet::run_coordinator_child;

/// What `outpost sim` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// A new version pushed to every agent: time until each serves it, bytes moved.
    Push,
    /// A candidate less sure of itself (its cascade offloads far more) to a canary share: the
    /// gate must abort it by itself, and no device may stay on it.
    Canary,
    /// The MQTT broker killed and started again: the reconnect storm, with and without jitter.
    BrokerRestart,
    /// The coordinator (with its embedded broker) killed and started again: the same storm;
    /// the agents serve from their cache meanwhile.
    CoordinatorRestart,
    /// Agents leaving and joining during a rollout: every agent running at the end serves it.
    Churn,
}

impl Scenario {
    /// The name as the command line takes it.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Push => "push",
            Scenario::Canary => "canary",
            Scenario::BrokerRestart => "broker-restart",
            Scenario::CoordinatorRestart => "coordinator-restart",
            Scenario::Churn => "churn",
        }
    }
}

/// How to run a simulation.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Agents at once.
    pub agents: usize,
    /// What happens to them.
    pub scenario: Scenario,
    /// `canary`: the candidate's share of the fleet, percent.
    pub canary_percent: u8,
    /// `canary`: the bake time before the gate decides.
    pub bake: Duration,
    /// `broker-restart`, `coordinator-restart`: how long the killed process stays down.
    pub down: Duration,
    /// `churn`: how long agents leave and join.
    pub churn: Duration,
    /// The longest any phase may take before the simulation fails.
    pub timeout: Duration,
    /// Where the run keeps its fleet, stores and logs; a temporary folder when `None`.
    pub data_dir: Option<PathBuf>,
}

/// One figure of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What it is.
    pub name: String,
    /// Its value.
    pub value: f64,
    /// Its unit (`s`, `ms`, `MiB`, `agents`, `/s`, `%`, empty for a count).
    pub unit: &'static str,
}

/// A curve: `(seconds, value)` points, for the plot and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// The legend.
    pub label: String,
    /// The points, in time order.
    pub points: Vec<(f64, f64)>,
}

/// What a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: Scenario,
    /// Agents at once.
    pub agents: usize,
    /// The figures, in the order they are printed.
    pub figures: Vec<Figure>,
    /// Facts in words (an abort's reason, what was left alone).
    pub notes: Vec<String>,
    /// The plot's title and its y axis.
    pub plot_title: String,
    /// The y axis's label.
    pub plot_y: String,
    /// The curves.
    pub series: Vec<Series>,
}

impl Report {
    fn new(options: &SimOptions, plot_title: String, plot_y: &str) -> Self {
        Report {
            scenario: options.scenario,
            agents: options.agents,
            figures: Vec::new(),
            notes: Vec::new(),
            plot_title,
            plot_y: plot_y.to_owned(),
            series: Vec::new(),
        }
    }

    fn figure(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
        });
    }

    /// Figures p50, p99 and max of `each` (seconds), named `{what} p50` and so on.
    fn spread(&mut self, what: &str, each: &[Duration]) {
        let mut sorted: Vec<f64> = each.iter().map(Duration::as_secs_f64).collect();
        sorted.sort_by(f64::total_cmp);
        for (label, q) in [("p50", 0.50), ("p99", 0.99)] {
            self.figure(format!("{what} {label}"), quantile(&sorted, q), "s");
        }
        self.figure(
            format!("{what} max"),
            sorted.last().copied().unwrap_or(0.0),
            "s",
        );
    }

    /// The table `outpost sim` prints.
    pub fn table(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "outpost sim --scenario {} --agents {}",
            self.scenario.name(),
            self.agents
        )];
        let width = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(0);
        for f in &self.figures {
            let value = if f.value.fract() == 0.0 && f.value.abs() < 1e15 {
                format!("{}", f.value as i64)
            } else if f.value.abs() >= 100.0 {
                format!("{:.0}", f.value)
            } else {
                format!("{:.3}", f.value)
            };
            lines.push(format!("  {:<width$}  {value:>12} {}", f.name, f.unit));
        }
        for note in &self.notes {
            lines.push(format!("  note: {note}"));
        }
        lines
    }

    /// Writes the plot (SVG) to `path`.
    pub fn plot(&self, path: &std::path::Path) -> anyhow::Result<()> {
        plot::draw(self, path)
    }
}

/// The `q` quantile (nearest rank) of sorted values; 0 when there are none.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs the simulation; `progress` gets a line now and then while it runs (for stderr).
pub async fn run(options: &SimOptions, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Report> {
    if options.agents == 0 {
        anyhow::bail!("--agents must be at least 1");
    }
    if !(1..=100).contains(&options.canary_percent) {
        anyhow::bail!("--canary must be a percentage from 1 to 100");
    }
    let temporary;
    let dir = match &options.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temporary = tempfile::tempdir()?;
            temporary.path().to_owned()
        }
    };
    scenarios::run(options, &dir, progress).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
