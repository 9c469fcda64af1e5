//! Config parsing, validation messages and profiles, on real files in temp folders.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use firmware_config::{
    AgentConfig, BatteryPolicy, ConfigKind, CoordinatorConfig, DeviceClass, EngineChoice,
    FleetPlan, GpuActivations, GpuPreference, HostPort,
};

const KEY: &str = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";

fn agent_toml(extra: &str) -> String {
    format!(
        "[device]\nid = \"dev-1\"\nclass = \"phone\"\ncertificate = \"device.crt\"\nkey = \"device.key\"\n\n\
         [fleet]\nname = \"demo\"\nca = \"ca.crt\"\nmanifest_keys = [\"{KEY}\"]\n\n\
         [coordinator]\naddresses = [\"localhost:4433\", \"[::1]:4433\"]\n{extra}"
    )
}

fn agent_error(text: &str) -> String {
    AgentConfig::from_toml(Path::new("agent.toml"), text)
        .unwrap_err()
        .to_string()
}

#[test]
fn a_minimal_agent_config_gets_the_defaults() {
    let config = AgentConfig::from_toml(Path::new("agent.toml"), &agent_toml("")).unwrap();
    assert_eq!(config.device.id.as_str(), "dev-1");
    assert_eq!(config.api.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.mqtt.broker.to_string(), "127.0.0.1:1883");
    assert_eq!(config.coordinator.addresses.len(), 2);
    assert_eq!(config.data_dir(), Path::new("outpost-data/agent-dev-1"));
    assert_eq!(config.profile(), DeviceClass::Phone.profile());
    assert!(config.sync.models.is_empty());
    assert_eq!(config.engine, EngineChoice::Auto);
}

#[test]
fn the_engine_is_chosen_at_the_top_of_the_file() {
    for (value, choice) in [
        ("auto", EngineChoice::Auto),
        ("gpu", EngineChoice::Gpu),
        ("cpu", EngineChoice::Cpu),
    ] {
        let text = format!("engine = \"{value}\"\n{}", agent_toml(""));
        let config = AgentConfig::from_toml(Path::new("agent.toml"), &text).unwrap();
        assert_eq!(config.engine, choice);
    }
    let msg = agent_error(&format!("engine = \"gpux\"\n{}", agent_toml("")));
    assert!(
        msg.starts_with(
            "agent.toml:1:10: unknown value \"gpux\" for engine, did you mean \"gpu\"?"
        ),
        "{msg}"
    );
}

#[test]
fn gpu_activations_default_to_f32_and_take_f16() {
    let config = AgentConfig::from_toml(Path::new("agent.toml"), &agent_toml("")).unwrap();
    assert_eq!(config.gpu_activations, GpuActivations::F32);
    let text = format!("gpu_activations = \"f16\"\n{}", agent_toml(""));
    let config = AgentConfig::from_toml(Path::new("agent.toml"), &text).unwrap();
    assert_eq!(config.gpu_activations, GpuActivations::F16);
    let msg = agent_error(&format!("gpu_activations = \"fp16\"\n{}", agent_toml("")));
    assert!(
        msg.starts_with("agent.toml:1:19: unknown value \"fp16\" for gpu_activations"),
        "{msg}"
    );
}

#[test]
fn unknown_keys_are_located_and_suggested() {
    let text = agent_toml("\n[coordinater]\naddresses = []\n");
    let line = text.lines().position(|l| l == "[coordinater]").unwrap() + 1;
    let msg = agent_error(&text);
    assert_eq!(
        msg,
        format!("agent.toml:{line}:2: unknown key \"coordinater\", did you mean \"coordinator\"?")
    );

    let text = agent_toml("").replace("class = \"phone\"", "clas = \"phone\"");
    let msg = agent_error(&text);
    assert_eq!(
        msg,
        "agent.toml:3:1: unknown key \"device.clas\", did you mean \"class\"?"
    );
}

#[test]
fn unknown_values_are_suggested() {
    let msg = agent_error(&agent_toml("").replace("\"phone\"", "\"lapton\""));
    assert!(
        msg.starts_with(
            "agent.toml:3:9: unknown value \"lapton\" for device.class, did you mean \"laptop\"?"
        ),
        "{msg}"
    );
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        (
            agent_toml("").replace("\"dev-1\"", "\"dev/1\""),
            "device.id",
            "invalid",
        ),
        (
            agent_toml("").replace(KEY, "abc"),
            "fleet.manifest_keys",
            "not an ed25519 public key",
        ),
        (
            agent_toml("").replace("localhost:4433", "localhost"),
            "coordinator.addresses",
            "no port",
        ),
        (
            agent_toml("\n[api]\nlisten = \"nope\"\n"),
            "api.listen",
            "invalid socket address",
        ),
        (
            agent_toml("\n[profile]\nmemory_budget_mb = -1\n"),
            "profile.memory_budget_mb",
            "invalid value",
        ),
        (
            agent_toml("").replace("id = \"dev-1\"\n", ""),
            "device.id",
            "missing key",
        ),
    ];
    for (text, key, needle) in cases {
        let msg = agent_error(&text);
        assert!(
            msg.contains(key) && msg.contains(needle),
            "expected {key} and {needle:?} in: {msg}"
        );
        assert!(msg.starts_with("agent.toml:"), "{msg}");
    }
}

#[test]
fn semantic_errors_point_at_their_key() {
    let text = agent_toml("\n[profile]\nmax_model_mb = 0\n")
        .replace("[\"localhost:4433\", \"[::1]:4433\"]", "[]");
    let errors = AgentConfig::from_toml(Path::new("agent.toml"), &text).unwrap_err();
    let msgs: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    let line_of = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    assert!(
        msgs.contains(&format!(
            "agent.toml:{}:1: profile.max_model_mb: must be at least 1",
            line_of("max_model_mb")
        )),
        "{msgs:?}"
    );
    assert!(
        msgs.contains(&format!(
            "agent.toml:{}:1: coordinator.addresses: needs at least one HOST:PORT",
            line_of("addresses")
        )),
        "{msgs:?}"
    );
}

#[test]
fn syntax_errors_are_located() {
    let msg = agent_error("[device\nid = 1\n");
    assert!(msg.starts_with("agent.toml:1:"), "{msg}");
}

#[test]
fn profile_overrides_apply_key_by_key() {
    let text = agent_toml("\n[profile]\nmemory_budget_mb = 300\ngpu = \"never\"\n");
    let config = AgentConfig::from_toml(Path::new("agent.toml"), &text).unwrap();
    let profile = config.profile();
    assert_eq!(profile.memory_budget_mb, 300);
    assert_eq!(profile.gpu, GpuPreference::Never);
    assert_eq!(
        profile.max_model_mb,
        DeviceClass::Phone.profile().max_model_mb
    );
    assert_eq!(profile.on_battery, BatteryPolicy::Offload);
    for class in [
        DeviceClass::Phone,
        DeviceClass::Laptop,
        DeviceClass::EdgeBox,
    ] {
        let p = class.profile();
        assert!(p.max_model_mb <= p.storage_budget_mb && p.memory_budget_mb > 0);
    }
    assert!(
        DeviceClass::Phone.profile().memory_budget_mb
            < DeviceClass::EdgeBox.profile().memory_budget_mb
    );
}

#[test]
fn coordinator_defaults_are_dev_mode_on_loopback() {
    let config = CoordinatorConfig::from_toml(Path::new("c.toml"), "").unwrap();
    assert!(config.is_dev_mode());
    assert_eq!(config, CoordinatorConfig::default());
    assert_eq!(config.registry.max_finetunes, 1);
    assert_eq!(config.quic.listen.to_string(), "127.0.0.1:4433");
    assert_eq!(config.admin.listen.to_string(), "127.0.0.1:7070");
    assert_eq!(
        config.mqtt.embedded_listen().unwrap().to_string(),
        "127.0.0.1:1883"
    );
    assert_eq!(
        config.storage.data_dir,
        Path::new("outpost-data/coordinator")
    );
}

#[test]
fn coordinator_errors() {
    let err = CoordinatorConfig::from_toml(
        Path::new("c.toml"),
        "[mqtt]\nlisten = \"127.0.0.1:1\"\nexternal = \"b:1883\"\n",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "c.toml:3:1: mqtt.external: set either mqtt.listen (embedded broker) or mqtt.external, not both"
    );
    let err = CoordinatorConfig::from_toml(Path::new("c.toml"), "[registry]\nkeep_version = 3\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "c.toml:2:1: unknown key \"registry.keep_version\", did you mean \"keep_versions\"?"
    );
    let err = CoordinatorConfig::from_toml(Path::new("c.toml"), "[registry]\nmax_finetunes = 0\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("registry.max_finetunes: must be at least 1"),
        "{err}"
    );
    let err = CoordinatorConfig::from_toml(
        Path::new("c.toml"),
        "[registry]\nint8_max_prob_error = -1\nint8_max_kept_share = 1.5\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("registry.int8_max_prob_error: must be a finite number of at least 0")
            && err.contains("registry.int8_max_kept_share: must be a share between 0 and 1"),
        "{err}"
    );
    let config = CoordinatorConfig::from_toml(
        Path::new("c.toml"),
        "[mqtt]\nexternal = \"broker.example.com:8883\"\n",
    )
    .unwrap();
    assert_eq!(config.mqtt.embedded_listen(), None);
}

#[test]
fn provisioned_configs_load_and_name_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let coordinators = vec![
        "localhost:4433".parse::<HostPort>().unwrap(),
        "127.0.0.1:4434".parse().unwrap(),
    ];
    let plan = FleetPlan::numbered(
        "demo",
        3,
        coordinators.clone(),
        "localhost:1883".parse().unwrap(),
    )
    .unwrap();
    let fleet = firmware_config::provision(&plan, dir.path()).unwrap();
    assert_eq!(fleet.devices.len(), 3);
    let coordinator = CoordinatorConfig::load(&fleet.coordinator_config).unwrap();
    assert!(!coordinator.is_dev_mode());
    assert_eq!(coordinator.storage.data_dir, dir.path().join("data"));
    for (id, path) in &fleet.devices {
        let agent = AgentConfig::load(path).unwrap();
        assert_eq!(agent.onnxruntime_library, None);
        assert_eq!(&agent.device.id, id);
        assert_eq!(agent.fleet.manifest_keys, vec![fleet.manifest_key]);
        assert_eq!(agent.coordinator.addresses, coordinators);
        assert!(
            agent.device.certificate.is_absolute()
                || agent.device.certificate.starts_with(dir.path())
        );
        assert_eq!(
            firmware_config::validate_file(path, None).unwrap(),
            ConfigKind::Agent
        );
    }
    assert_eq!(
        firmware_config::validate_file(&fleet.coordinator_config, None).unwrap(),
        ConfigKind::Coordinator
    );
}

/// `onnxruntime_library` is relative to the config's folder, like every path in it; a file that
/// is not there is not a config error (the agent serves on tract and its status says why).
#[test]
fn the_onnxruntime_library_is_found_beside_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FleetPlan::numbered(
        "demo",
        1,
        vec!["localhost:4433".parse::<HostPort>().unwrap()],
        "localhost:1883".parse().unwrap(),
    )
    .unwrap();
    let fleet = firmware_config::provision(&plan, dir.path()).unwrap();
    let (_, path) = &fleet.devices[0];
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(
        path,
        format!("onnxruntime_library = \"lib/libonnxruntime.so\"\n{text}"),
    )
    .unwrap();
    let agent = AgentConfig::load(path).unwrap();
    assert_eq!(
        agent.onnxruntime_library,
        Some(path.parent().unwrap().join("lib/libonnxruntime.so"))
    );
}

#[test]
fn missing_and_wrong_files_are_reported_at_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FleetPlan::numbered(
        "demo",
        1,
        vec!["localhost:4433".parse().unwrap()],
        "localhost:1883".parse().unwrap(),
    )
    .unwrap();
    let fleet = firmware_config::provision(&plan, dir.path()).unwrap();
    let agent = &fleet.devices[0].1;
    let device_dir = agent.parent().unwrap();

    std::fs::remove_file(device_dir.join("ca.crt")).unwrap();
    let msg = AgentConfig::load(agent).unwrap_err().to_string();
    assert!(
        msg.contains("agent.toml:12:1: fleet.ca: cannot read"),
        "{msg}"
    );

    // A key where a certificate should be.
    std::fs::copy(device_dir.join("device.crt"), device_dir.join("ca.crt")).unwrap();
    std::fs::write(
        device_dir.join("device.crt"),
        std::fs::read(device_dir.join("device.key")).unwrap(),
    )
    .unwrap();
    let msg = AgentConfig::load(agent).unwrap_err().to_string();
    assert!(
        msg.contains("device.certificate") && msg.contains("not a certificate"),
        "{msg}"
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::copy(device_dir.join("ca.crt"), device_dir.join("device.crt")).unwrap();
        std::fs::set_permissions(
            device_dir.join("device.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let msg = AgentConfig::load(agent).unwrap_err().to_string();
        assert!(
            msg.contains("device.key") && msg.contains("chmod 600"),
            "{msg}"
        );
    }
}

#[test]
fn the_api_connection_cap_comes_from_the_class_and_can_be_overridden() {
    let text = agent_toml("");
    let config = AgentConfig::from_toml(Path::new("agent.toml"), &text).unwrap();
    assert_eq!(
        config.profile().api_connections,
        config.device.class.profile().api_connections
    );
    let text = agent_toml("\n[profile]\napi_connections = 8\n");
    let config = AgentConfig::from_toml(Path::new("agent.toml"), &text).unwrap();
    assert_eq!(config.profile().api_connections, 8);
    let msg = agent_error(&agent_toml("\n[profile]\napi_connections = 0\n"));
    assert!(
        msg.contains("profile.api_connections: must be at least 1"),
        "{msg}"
    );
}

#[test]
fn allowed_origins_must_be_origins() {
    let text = agent_toml("\n[api]\nallowed_origins = [\"https://app.example\"]\n");
    let config = AgentConfig::from_toml(Path::new("agent.toml"), &text).unwrap();
    assert_eq!(config.api.allowed_origins, vec!["https://app.example"]);
    for bad in ["app.example", "https://app.example/page"] {
        let msg = agent_error(&agent_toml(&format!(
            "\n[api]\nallowed_origins = [\"{bad}\"]\n"
        )));
        assert!(
            msg.contains("api.allowed_origins") && msg.contains("is not an origin"),
            "{msg}"
        );
    }
}

/// The admin API beyond loopback needs TLS, and TLS needs both halves; each error names the key.
#[test]
fn the_admin_api_beyond_loopback_needs_tls() {
    let error = |text: &str| {
        CoordinatorConfig::from_toml(Path::new("coordinator.toml"), text)
            .unwrap_err()
            .to_string()
    };
    let e = error("[admin]\nlisten = \"0.0.0.0:7070\"\n");
    assert!(
        e.contains("admin.tls_cert") && e.contains("beyond loopback"),
        "{e}"
    );
    let e = error("[admin]\ntls_cert = \"admin.crt\"\n");
    assert!(e.contains("admin.tls_key"), "{e}");
    let e = error("[admin]\ntls_key = \"admin.key\"\n");
    assert!(e.contains("admin.tls_cert"), "{e}");
    let config = CoordinatorConfig::from_toml(
        Path::new("coordinator.toml"),
        "[admin]\nlisten = \"0.0.0.0:7070\"\ntls_cert = \"admin.crt\"\ntls_key = \"admin.key\"\n",
    )
    .unwrap();
    assert!(config.admin.tls().is_some());
}

/// Fallback brokers are for an external cluster: without `mqtt.external` they are refused by
/// name; a NATS cluster of fewer than three nodes is refused with the reason.
#[test]
fn fallback_brokers_need_an_external_cluster() {
    let e = CoordinatorConfig::from_toml(
        Path::new("coordinator.toml"),
        "[mqtt]\nfallbacks = [\"127.0.0.1:1884\"]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("mqtt.fallbacks") && e.contains("mqtt.external"),
        "{e}"
    );
    CoordinatorConfig::from_toml(
        Path::new("coordinator.toml"),
        "[mqtt]\nexternal = \"127.0.0.1:1883\"\nfallbacks = [\"127.0.0.1:1884\"]\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = |p: u16| firmware_config::provision::NatsNode {
        mqtt: format!("127.0.0.1:{p}").parse().unwrap(),
        route: format!("127.0.0.1:{}", p + 1000).parse().unwrap(),
    };
    let e = firmware_config::provision::write_nats_cluster(dir.path(), "f", &[node(1), node(2)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 3 nodes"), "{e}");
}
