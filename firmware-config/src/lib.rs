//! Typed configuration of Outpost agents and coordinators, device-class profiles, and fleet
//! provisioning (the one way Outpost makes trust material).
//!
//! Configs are TOML with every table `deny_unknown_fields`; errors name the file, line, column
//! and key, and suggest the nearest valid key (`agent.toml:12:1: unknown key "coordinater",
//! did you mean "coordinator"?`). This crate starts nothing.

mod agent;
mod coordinator;
mod diagnostic;
pub mod identity;
mod profile;
pub mod provision;
mod types;

use std::path::Path;

pub use agent::{
    AgentConfig, AgentStorage, ApiSection, CoordinatorEndpoints, DeviceSection, EngineChoice,
    FleetTrust, GpuActivations, MqttBroker, SyncSection,
};
pub use coordinator::{
    AdminSection, BackendEncoding, BackendSection, CoordinatorConfig, CoordinatorMqtt,
    CoordinatorStorage, FleetMaterial, GatewaySection, InferenceSection, QuicSection,
    RegistrySection, RolloutSection, SharedStoreLocation, SharedStoreSection,
    int8_tolerance_problem,
};
pub use diagnostic::{ConfigError, ConfigErrors};
pub use identity::{IdentityError, device_id_from_certificate};
pub use profile::{BatteryPolicy, DeviceClass, GpuPreference, Profile, ProfileOverrides};
pub use provision::{FleetAuthority, FleetPlan, ProvisionError, ProvisionedFleet, provision};
pub use types::{DeviceId, HostPort};

use diagnostic::Source;

/// Which kind of config a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigKind {
    /// `agent.toml`.
    Agent,
    /// `coordinator.toml`.
    Coordinator,
}

impl ConfigKind {
    /// Guesses from the text: a `[device]` table makes an agent config, anything else a
    /// coordinator config.
    pub fn detect(text: &str) -> Self {
        let has_device = text
            .lines()
            .any(|l| l.split('#').next().is_some_and(|l| l.trim() == "[device]"));
        if has_device {
            ConfigKind::Agent
        } else {
            ConfigKind::Coordinator
        }
    }
}

/// Loads and checks `path` as `kind` (or the detected kind); returns the kind checked.
pub fn validate_file(path: &Path, kind: Option<ConfigKind>) -> Result<ConfigKind, ConfigErrors> {
    let kind = match kind {
        Some(k) => k,
        None => ConfigKind::detect(&read(path)?),
    };
    match kind {
        ConfigKind::Agent => AgentConfig::load(path).map(|_| kind),
        ConfigKind::Coordinator => CoordinatorConfig::load(path).map(|_| kind),
    }
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    let source = Source {
        file: path,
        text: "",
    };
    std::fs::read_to_string(path)
        .map_err(|e| source.error(format!("cannot read the file: {e}")).into())
}

/// Reads `path` and parses it as `T`, with located errors.
fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<(T, String), ConfigErrors> {
    let text = read(path)?;
    let source = Source {
        file: path,
        text: &text,
    };
    let value = toml::from_str(&text).map_err(|e| ConfigErrors::from(source.toml_error(&e)))?;
    Ok((value, text))
}

/// What a file named by a config must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Certificate,
    PrivateKey,
}

/// Checks that `path` exists and holds PEM of the right kind; private keys must not be readable
/// by other users.
fn check_file(path: &Path, kind: FileKind) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let block = pem::parse(&text).map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    let ok = match kind {
        FileKind::Certificate => block.tag() == "CERTIFICATE",
        FileKind::PrivateKey => block.tag().ends_with("PRIVATE KEY"),
    };
    if !ok {
        let wanted = if kind == FileKind::Certificate {
            "a certificate"
        } else {
            "a private key"
        };
        return Err(format!(
            "{} holds a {:?} block, not {wanted}",
            path.display(),
            block.tag()
        ));
    }
    #[cfg(unix)]
    if kind == FileKind::PrivateKey {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)
            .map_err(|e| e.to_string())?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} is readable by other users (mode {:o}); run: chmod 600 {}",
                path.display(),
                mode & 0o777,
                path.display()
            ));
        }
    }
    Ok(())
}
