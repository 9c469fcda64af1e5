//! Refusals: what an agent will not take, and says why in its status while the version it has
//! keeps serving: a release over its storage budget, releases signed by another fleet or older
//! than what it runs, a certificate naming another device.

use cloud_coordinator::PushOptions;
use cloud_coordinator::registry::Quantize;
use edge_agent::{Agent, AgentHandle};
use firmware_config::AgentConfig;
use model_zoo::DemoModel;
use outpost_test_support::agent::agent_config;
use outpost_test_support::coordinator::{push, start_coordinator};
use outpost_test_support::eventually::{eventually, eventually_async};
use outpost_test_support::mqtt::{ClientIdentity, MqttObserver};

/// A release that would take the device over its storage budget is refused, and the status says
/// why; the version it had keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_budget_refuses_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let mut config = agent_config(&coordinator, dir.path());
    config.profile.storage_budget_mb = Some(1);
    let agent = Agent::start(config).await.unwrap();
    // fp32 video-ranker: 662 KB of the 1 MiB budget.
    let fp32 = |seed| DemoModel::VideoRanker.bytes(seed);
    push(
        &coordinator,
        "video-ranker",
        &PushOptions::default().quantize(Quantize::None),
        &fp32(1),
    )
    .await;
    eventually("version 1", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    // A second fp32 version would keep both (active and previous): 1.3 MB.
    push(
        &coordinator,
        "video-ranker",
        &PushOptions::default().quantize(Quantize::None),
        &fp32(2),
    )
    .await;
    let refused = |agent: &AgentHandle| {
        agent
            .status()
            .models
            .iter()
            .find(|m| m.model == "video-ranker")
            .and_then(|m| m.last_error.clone())
    };
    eventually("the refusal in the status", || refused(&agent).is_some()).await;
    let why = refused(&agent).unwrap();
    assert!(
        why.contains("storage budget") && why.contains("profile.storage_budget_mb"),
        "{why}"
    );
    assert_eq!(agent.active_version("video-ranker"), Some(1));
    // The int8 version fits beside version 1.
    push(
        &coordinator,
        "video-ranker",
        &PushOptions::default(),
        &fp32(3),
    )
    .await;
    eventually("version 3", || {
        agent.active_version("video-ranker") == Some(3)
    })
    .await;
    assert_eq!(refused(&agent), None);
    agent.shutdown().await;
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_stale_releases_are_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    push(
        &coordinator,
        "video-ranker",
        &PushOptions::default(),
        &DemoModel::VideoRanker.bytes(1),
    )
    .await;

    // Keep release 1 as the broker has it, to replay it later. Only the coordinator may write
    // releases on the embedded broker: the forger here has its key (or a broker that lets
    // anyone write), and the agent still refuses what it sends.
    let topic = "outpost/v1/models/video-ranker/manifest";
    let mut observer = MqttObserver::new(
        &coordinator.mqtt,
        "observer",
        &ClientIdentity::coordinator_of(&coordinator),
    );
    observer.subscribe(topic).await;
    let release_1 = observer.next_message(topic).await;
    let client = observer.into_publisher();

    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("version 1", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    push(
        &coordinator,
        "video-ranker",
        &PushOptions::default(),
        &DemoModel::VideoRanker.bytes(2),
    )
    .await;
    eventually("version 2", || {
        agent.active_version("video-ranker") == Some(2)
    })
    .await;

    // A release signed by another fleet's key, for a "newer" version.
    let other = tempfile::tempdir().unwrap();
    let plan = firmware_config::FleetPlan::numbered(
        "evil",
        1,
        vec!["localhost:1".parse().unwrap()],
        "localhost:1".parse().unwrap(),
    )
    .unwrap();
    firmware_config::provision(&plan, other.path()).unwrap();
    let key = pem::parse(std::fs::read_to_string(other.path().join("fleet-signing.key")).unwrap())
        .unwrap();
    let evil = outpost_shared::ManifestSigner::from_pkcs8(key.contents()).unwrap();
    let mut forged = ManifestVerifierFor::trusting(&agent_config(&coordinator, dir.path()))
        .verify_cbor(&release_1, now())
        .unwrap();
    forged.release = 99;
    forged.stable.version = 99;
    let forged = evil.sign(&forged).unwrap().to_cbor().unwrap();

    let rejected = agent.status().counters.manifests_rejected;
    for payload in [forged, release_1, Vec::new()] {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    eventually("three refusals", || {
        agent.status().counters.manifests_rejected >= rejected + 3
    })
    .await;
    assert_eq!(
        agent.active_version("video-ranker"),
        Some(2),
        "a refused release changed nothing"
    );
    let status = agent.status();
    let last = status.last_error.unwrap_or_default();
    assert!(!last.is_empty());
    agent.shutdown().await;
    coordinator.shutdown().await;
}

struct ManifestVerifierFor;

impl ManifestVerifierFor {
    fn trusting(config: &AgentConfig) -> outpost_shared::ManifestVerifier {
        outpost_shared::ManifestVerifier::new(config.fleet.manifest_keys.clone())
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_the_device_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let mut config = agent_config(&coordinator, dir.path());
    config.device.id = "dev-9999".parse().unwrap();
    let err = Agent::start(config).await.unwrap_err().to_string();
    assert!(err.contains("certificate names \"dev-0001\""), "{err}");
    coordinator.shutdown().await;
}

/// The local API is not open to web pages: a page from an origin the config does not list is
/// refused, its preflight too, and so is a page that rebinds its own name to the device
/// (a `Host` that is not localhost or an address); a listed origin gets the CORS headers, and
/// an app that sends no origin is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_reach_the_api_only_from_allowed_origins() {
    use outpost_runtime::http::{Method, Request};
    use outpost_test_support::http::send;

    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let mut config = agent_config(&coordinator, dir.path());
    config.api.allowed_origins = vec!["https://app.example".into()];
    let agent = Agent::start(config).await.unwrap();
    let api = agent.api_addr;
    let origin = |o: &str| Request::get("/v2/health/ready").header("origin", o);

    // An app (no Origin): served.
    assert_eq!(
        send(api, Request::get("/v2/health/ready")).await.status,
        200
    );
    // A page from another origin, its preflight, and a rebound host name: 403, saying why.
    let evil = send(api, origin("https://evil.example")).await;
    assert_eq!(evil.status, 403);
    assert!(
        evil.text().contains("api.allowed_origins"),
        "{}",
        evil.text()
    );
    assert!(evil.header("access-control-allow-origin").is_none());
    let preflight = Request::new(Method::OPTIONS, "/v2/models/m/infer")
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST");
    assert_eq!(send(api, preflight).await.status, 403);
    let rebound = Request::get("/v2/health/ready").header("host", "evil.example:8080");
    let rebound = send(api, rebound).await;
    assert_eq!(rebound.status, 403);
    assert!(
        rebound.text().contains("evil.example"),
        "{}",
        rebound.text()
    );
    // The allowed origin: served, with the CORS headers; its preflight answered.
    let app = send(api, origin("https://app.example")).await;
    assert_eq!(app.status, 200);
    assert_eq!(
        app.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let preflight = Request::new(Method::OPTIONS, "/v2/models/m/infer")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST");
    let preflight = send(api, preflight).await;
    assert_eq!(preflight.status, 204);
    assert!(
        preflight
            .header("access-control-allow-methods")
            .is_some_and(|m| m.contains("POST"))
    );
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// Releases expire (here after 4 s) and the coordinator signs each again before it does: an
/// agent records every fresh release without fetching or switching anything, and its status
/// says how long the newest one has left. A wiped device handed an expired release refuses it.
/// An agent cut off from its coordinator keeps serving past the expiry, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_expire_and_are_signed_again_before_they_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = outpost_test_support::coordinator::coordinator_config(dir.path());
    config.registry.release_ttl_s = 4;
    let coordinator = cloud_coordinator::Coordinator::start(config).await.unwrap();
    push(
        &coordinator,
        "video-ranker",
        &PushOptions::default(),
        &DemoModel::VideoRanker.bytes(1),
    )
    .await;
    let topic = "outpost/v1/models/video-ranker/manifest";
    let mut observer = MqttObserver::new(
        &coordinator.mqtt,
        "keeper",
        &ClientIdentity::coordinator_of(&coordinator),
    );
    observer.subscribe(topic).await;
    let first = observer.next_message(topic).await;
    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("version 1", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    let fetched = agent.status().counters.bytes_fetched;

    // Signed again within the TTL: recorded, nothing fetched, the same version serving.
    let verifier = outpost_shared::ManifestVerifier::new(
        agent_config(&coordinator, dir.path()).fleet.manifest_keys,
    );
    let release_1 = verifier.verify_cbor(&first, now()).unwrap();
    let fresh = observer
        .next_message_where(topic, |p| {
            verifier
                .verify_cbor(p, now())
                .is_ok_and(|m| m.release > release_1.release)
        })
        .await;
    let fresh = verifier.verify_cbor(&fresh, now()).unwrap();
    assert_eq!(fresh.stable, release_1.stable, "the content changed");
    assert!(fresh.expires_at > release_1.expires_at);
    eventually("the fresh release recorded", || {
        let status = agent.status();
        let model = status.models.iter().find(|m| m.model == "video-ranker");
        model.and_then(|m| m.release_expires_in_s) > Some(0)
            && status.counters.bytes_fetched == fetched
    })
    .await;
    assert_eq!(agent.active_version("video-ranker"), Some(1));

    // Past release 1's expiry, a wiped device handed it (by a coordinator that replays it: a
    // stolen coordinator key would do) refuses it, and says why.
    let left = release_1.expires_at.unwrap().saturating_sub(now()) + 1;
    tokio::time::sleep(std::time::Duration::from_secs(left)).await;
    let fleet = coordinator.fleet_config.as_ref().unwrap().parent().unwrap();
    let replay = first.clone();
    let answer: crate::fakes::Answer = std::sync::Arc::new(move |request| match request {
        outpost_shared::Request::Hello { .. } => Some(vec![crate::fakes::hello()]),
        outpost_shared::Request::Releases { .. } => Some(vec![outpost_shared::Response::Release {
            model: "video-ranker".into(),
            signed: replay.clone(),
        }]),
        _ => None,
    });
    let (replayer, _) =
        crate::fakes::fake_coordinator(&tokio::runtime::Handle::current(), fleet, answer);
    let wiped_dir = tempfile::tempdir().unwrap();
    let mut wiped_config = agent_config(&coordinator, wiped_dir.path());
    wiped_config.coordinator.addresses = vec![replayer.to_string().parse().unwrap()];
    // No broker: only the replay reaches it.
    wiped_config.mqtt.broker.port = 9;
    wiped_config.sync.release_poll_s = 1;
    let wiped = Agent::start(wiped_config).await.unwrap();
    eventually("the replay refused as expired", || {
        wiped.status().counters.manifests_rejected >= 1
            && wiped
                .status()
                .last_error
                .is_some_and(|e| e.contains("expired"))
    })
    .await;
    assert_eq!(wiped.active_version("video-ranker"), None);
    wiped.shutdown().await;
    drop(observer);

    // The coordinator goes: the agent keeps serving past the expiry and says so.
    coordinator.shutdown().await;
    eventually("the expiry in the status", || {
        let status = agent.status();
        status.models.iter().any(|m| {
            m.release_expires_in_s.is_some_and(|s| s <= 0)
                && m.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("expired"))
        })
    })
    .await;
    let (code, reply) = outpost_test_support::agent::infer(
        &agent,
        "video-ranker",
        &outpost_test_support::agent::ranker_request(1).0,
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    agent.shutdown().await;
}

/// A revoked device loses QUIC and MQTT within seconds and gets no new release, while another
/// device of the fleet goes on as before; its statuses no longer count, and the revocation
/// outlives a restart of the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_cut_off_and_the_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = outpost_test_support::coordinator::coordinator_config(dir.path());
    let coordinator = cloud_coordinator::Coordinator::start(config.clone())
        .await
        .unwrap();
    // A second device of the dev fleet.
    let fleet_config = coordinator.fleet_config.clone().unwrap();
    let fleet = fleet_config.parent().unwrap();
    let authority = firmware_config::provision::FleetAuthority::load(
        &firmware_config::CoordinatorConfig::load(&fleet_config).unwrap(),
    )
    .unwrap();
    let second = authority
        .enroll(
            &"dev-0002".parse().unwrap(),
            &[format!("127.0.0.1:{}", coordinator.quic_addr.port())
                .parse()
                .unwrap()],
            &coordinator.mqtt,
            fleet,
        )
        .unwrap();
    let start = |config: AgentConfig, data: &std::path::Path| {
        let mut config = config;
        config.api.listen = "127.0.0.1:0".parse().unwrap();
        config.storage.data_dir = Some(data.to_owned());
        config.sync.release_poll_s = 1;
        Agent::start(config)
    };
    let revoked = start(
        agent_config(&coordinator, dir.path()),
        &dir.path().join("one"),
    )
    .await
    .unwrap();
    let other = start(AgentConfig::load(&second).unwrap(), &dir.path().join("two"))
        .await
        .unwrap();
    push(
        &coordinator,
        "video-ranker",
        &PushOptions::default(),
        &DemoModel::VideoRanker.bytes(1),
    )
    .await;
    for agent in [&revoked, &other] {
        eventually("version 1 on both", || {
            agent.active_version("video-ranker") == Some(1)
        })
        .await;
    }
    let admin = cloud_coordinator::AdminClient::of(&coordinator);
    eventually_async("both in the fleet view", || async {
        admin.fleet().await.unwrap().len() == 2
    })
    .await;

    let answer = admin.revoke("dev-0001").await.unwrap();
    assert!(answer.new);
    // MQTT: its connection is closed and it cannot come back.
    eventually("the revoked device's broker connection gone", || {
        revoked.status().broker_error.is_some()
    })
    .await;
    eventually_async("the revoked device out of the fleet view", || async {
        let fleet = admin.fleet().await.unwrap();
        fleet.len() == 1 && fleet[0].device_id == "dev-0002"
    })
    .await;
    // A new release reaches the other device, not the revoked one.
    push(
        &coordinator,
        "video-ranker",
        &PushOptions::default(),
        &DemoModel::VideoRanker.bytes(2),
    )
    .await;
    eventually("version 2 on the other device", || {
        other.active_version("video-ranker") == Some(2)
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(revoked.active_version("video-ranker"), Some(1));
    assert!(other.status().broker_error.is_none());
    // The fleet view keeps ignoring it.
    assert!(
        admin
            .fleet()
            .await
            .unwrap()
            .iter()
            .all(|d| d.device_id != "dev-0001")
    );
    revoked.shutdown().await;
    other.shutdown().await;
    coordinator.shutdown().await;

    // Restarted on the same data: still revoked.
    let again = cloud_coordinator::Coordinator::start(config).await.unwrap();
    let list = cloud_coordinator::AdminClient::of(&again)
        .revoked()
        .await
        .unwrap();
    assert_eq!(
        list.iter().map(|r| r.device.as_str()).collect::<Vec<_>>(),
        ["dev-0001"]
    );
    again.shutdown().await;
}

/// A client id the embedded broker's front cannot namespace (here one holding `:`) is answered
/// with CONNACK return code 2, identifier rejected (MQTT 3.1.1, 3.2.2.3), not a cut connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_client_id_is_refused_with_connack_identifier_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let config = agent_config(&coordinator, dir.path());
    let identity = ClientIdentity::device(&config);
    let (_client, mut events) =
        rumqttc::AsyncClient::new(identity.options("bad:id", &coordinator.mqtt), 10);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), events.poll())
        .await
        .expect("an answer within 10 s");
    match answer {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadClientId);
        }
        other => panic!("{other:?}"),
    }
    coordinator.shutdown().await;
}
