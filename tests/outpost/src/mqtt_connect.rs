//! `outpost bench --mqtt-only`: N MQTT clients connecting at once to the embedded broker as it
//! serves now (TLS 1.3 through its front, a fleet certificate each) beside rumqttd over plain TCP
//! as the coordinator embedded it before TLS (the baseline, in this benchmark only). Each broker
//! runs in a child process of its own (`outpost bench-mqtt-broker`, hidden), so its resident
//! memory is the broker's alone. Reported: the time until every client has its CONNACK, and the
//! broker's resident memory per open connection.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The cases, in the order they are reported.
pub const CASES: [&str; 2] = ["plain", "tls"];

/// Runs both cases with `clients` clients; `report` gets the table's lines.
pub fn run(clients: usize, mut report: impl FnMut(&str)) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fleet = dir.path().join("fleet");
    let plan = firmware_config::FleetPlan::numbered(
        "bench",
        1,
        vec!["127.0.0.1:1".parse()?],
        "127.0.0.1:1".parse()?,
    )?;
    firmware_config::provision(&plan, &fleet)?;
    let exe = std::env::current_exe().context("finding this program to run the brokers")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    report(&format!(
        "MQTT connect: {clients} clients at once, each broker in a child process"
    ));
    report(&format!(
        "  {:<6} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "case", "all in (s)", "p50 (ms)", "max (ms)", "broker MiB", "KiB / conn"
    ));
    for case in CASES {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port();
        let mut child = Command::new(&exe)
            .args(["bench-mqtt-broker", case])
            .arg(&fleet)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {case} broker"))?;
        let pid = child.id();
        let ready = child
            .stdout
            .take()
            .map(|out| {
                std::io::BufReader::new(out)
                    .lines()
                    .next()
                    .and_then(Result::ok)
            })
            .unwrap_or_default();
        if ready.as_deref() != Some("ready") {
            let _ = child.kill();
            bail!("the {case} broker did not start: {ready:?}");
        }
        let before = crate::memory::process_status_kib(pid, "VmRSS")?;
        let measured = runtime.block_on(connect_all(case, &fleet, port, clients));
        let after = crate::memory::process_status_kib(pid, "VmRSS");
        let _ = child.kill();
        let _ = child.wait();
        let (all, mut each, held) = measured?;
        let after = after?;
        each.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let per = after.saturating_sub(before) as f64 / clients.max(1) as f64;
        report(&format!(
            "  {case:<6} {:>12.3} {:>12.2} {:>12.2} {:>14.1} {:>14.1}",
            all.as_secs_f64(),
            ms(each[each.len() / 2]),
            ms(each[each.len() - 1]),
            after as f64 / 1024.0,
            per
        ));
        drop(held);
    }
    Ok(())
}

/// Connects `clients` clients at once; the time until the last CONNACK, each client's time, and
/// the clients (kept connected while the broker's memory is read).
async fn connect_all(
    case: &str,
    fleet: &Path,
    port: u16,
    clients: usize,
) -> anyhow::Result<(Duration, Vec<Duration>, Vec<rumqttc::AsyncClient>)> {
    let tls = match case {
        "tls" => {
            let device = fleet.join("devices/bench-0001");
            let roots = outpost_runtime::tls::roots(&fleet.join("ca.crt"))?;
            let identity = outpost_runtime::tls::Identity::load(
                &device.join("device.crt"),
                &device.join("device.key"),
            )?;
            Some(Arc::new(outpost_runtime::tls::client_config(
                roots, identity, None,
            )?))
        }
        _ => None,
    };
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..clients {
        let mut options = rumqttc::MqttOptions::new(format!("bench-{n}"), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(60));
        if let Some(tls) = &tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)),
            ));
        }
        tasks.spawn(async move {
            let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
            events.network_options.set_connection_timeout(60);
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => break,
                    Ok(_) => {}
                    Err(e) => return Err(anyhow::anyhow!("client {n}: {e}")),
                }
            }
            let took = started.elapsed();
            // Keeps the connection (and its pings) going until the benchmark drops the client.
            tokio::spawn(async move { while events.poll().await.is_ok() {} });
            Ok((took, client))
        });
    }
    let mut each = Vec::with_capacity(clients);
    let mut held = Vec::with_capacity(clients);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(joined) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .context("the clients did not all connect within 120 s")?
    {
        let (took, client) = joined??;
        each.push(took);
        held.push(client);
    }
    let all = started.elapsed();
    // Settled: the broker's buffers for every connection are allocated.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((all, each, held))
}

/// One broker, in this (child) process: `plain` (rumqttd alone, plain TCP, configured as the
/// coordinator embedded it before TLS) or `tls` (the embedded broker as it is now); prints
/// `ready` once it takes connections, then serves until killed.
pub fn run_broker(case: &str, fleet: &Path, port: u16) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (_keep, shutdown) = tokio::sync::watch::channel(false);
        let _task = match case {
            "plain" => {
                start_plain_rumqttd(addr)?;
                None
            }
            "tls" => {
                let roots = outpost_runtime::tls::roots(&fleet.join("ca.crt"))?;
                let identity = outpost_runtime::tls::Identity::load(
                    &fleet.join("coordinator.crt"),
                    &fleet.join("coordinator.key"),
                )?;
                let coordinator_certificate = identity
                    .leaf()
                    .cloned()
                    .context("the coordinator certificate file is empty")?;
                let tls = outpost_runtime::tls::server_config(roots, identity, None)?;
                // An empty revocation list, in a throwaway database.
                let db = sled::Config::new().temporary(true).open()?;
                let settings = cloud_coordinator::broker::FrontSettings {
                    tls: Arc::new(tls),
                    coordinator_certificate,
                    max_connections: 10_000,
                    revocations: Arc::new(cloud_coordinator::revocation::Revocations::open(&db)?),
                };
                let listener = cloud_coordinator::broker::bind(addr).await?;
                let metrics = Arc::new(cloud_coordinator::metrics::Metrics::default());
                Some(cloud_coordinator::broker::start(listener, settings, metrics, shutdown).await?)
            }
            other => bail!("unknown broker {other:?} (plain or tls)"),
        };
        #[allow(clippy::print_stdout)]
        {
            println!("ready");
        }
        std::future::pending::<anyhow::Result<()>>().await
    })
}

/// rumqttd on `addr`, plain TCP, as the coordinator started it before TLS; returns once it
/// accepts connections.
fn start_plain_rumqttd(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    // As the coordinator embedded it before TLS: no login, 60 s for a CONNECT, 1 ms between
    // accepts.
    let config = cloud_coordinator::broker::router_config(addr, None, 10_000, 60_000, 1);
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    for _ in 0..500 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("rumqttd did not start listening on {addr}")
}
