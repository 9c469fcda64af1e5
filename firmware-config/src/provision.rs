//! Provisioning: the one way Outpost makes trust material.
//!
//! [`provision`] makes a fleet in a folder: a manifest-signing key (ed25519), a fleet CA, a
//! coordinator certificate for the coordinator's hosts, and one folder per device with its key,
//! its certificate (naming the device id) and a ready `agent.toml`. The coordinator's dev mode
//! calls the same code to make its throwaway fleet, and [`FleetAuthority::enroll`] issues more
//! devices from an existing fleet ([`FleetAuthority::enroll_like_first_device`]: with the
//! addresses its first device has). Nothing here (or anywhere) makes material that skips
//! verification.
//!
//! Layout of a fleet folder:
//! ```text
//! coordinator.toml  ca.crt  ca.key  coordinator.crt  coordinator.key
//! fleet-signing.key  fleet-signing.pub
//! mosquitto.conf  mosquitto.acl  nats.conf  nats-users.conf  crl.pem  revoked.txt
//! devices/{id}/agent.toml  devices/{id}/device.crt  devices/{id}/device.key  devices/{id}/ca.crt
//! ```
//! The broker files are described in [`brokers`](self::brokers).
//! Private keys are written with mode 0600, and existing keys are never overwritten.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use outpost_shared::{ManifestSigner, PublicKey};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom as _;

mod brokers;

pub use brokers::{BrokerFiles, CRL_VALIDITY, NatsNode, revoked_devices, write_nats_cluster};

use crate::coordinator::CoordinatorConfig;
use crate::profile::DeviceClass;
use crate::types::{DeviceId, HostPort};

/// File names inside a fleet folder.
pub mod files {
    /// The coordinator's config.
    pub const COORDINATOR_CONFIG: &str = "coordinator.toml";
    /// The fleet CA certificate.
    pub const CA_CERT: &str = "ca.crt";
    /// The fleet CA key.
    pub const CA_KEY: &str = "ca.key";
    /// The coordinator's certificate.
    pub const COORDINATOR_CERT: &str = "coordinator.crt";
    /// The coordinator's key.
    pub const COORDINATOR_KEY: &str = "coordinator.key";
    /// The manifest-signing key (PKCS#8 PEM).
    pub const SIGNING_KEY: &str = "fleet-signing.key";
    /// The manifest-verifying public key (hex).
    pub const SIGNING_PUB: &str = "fleet-signing.pub";
    /// The folder of device folders.
    pub const DEVICES: &str = "devices";
    /// A device's config.
    pub const AGENT_CONFIG: &str = "agent.toml";
    /// A device's certificate.
    pub const DEVICE_CERT: &str = "device.crt";
    /// A device's key.
    pub const DEVICE_KEY: &str = "device.key";
    /// A Mosquitto config for the fleet's production broker (TLS, client certificates, ACL).
    pub const MOSQUITTO_CONFIG: &str = "mosquitto.conf";
    /// Its topic rules.
    pub const MOSQUITTO_ACL: &str = "mosquitto.acl";
    /// The fleet's revocation list for its brokers (Mosquitto's `crlfile`).
    pub const CRL: &str = "crl.pem";
    /// The devices revoked for the fleet's brokers, a device id a line.
    pub const REVOKED: &str = "revoked.txt";
    /// A NATS server config for the fleet's production broker (its MQTT listener).
    pub const NATS_CONFIG: &str = "nats.conf";
    /// The NATS server's users, one per device not revoked (included by `nats.conf`).
    pub const NATS_USERS: &str = "nats-users.conf";
    /// The NATS server's JetStream folder (MQTT sessions and retained releases).
    pub const NATS_STORE: &str = "nats-data";
}

/// What to provision.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    /// The fleet's name (a valid Outpost name).
    pub name: String,
    /// The coordinators' public addresses; their hosts become the certificate's names.
    pub coordinators: Vec<HostPort>,
    /// The MQTT broker agents use.
    pub mqtt: HostPort,
    /// The devices to issue.
    pub devices: Vec<DeviceId>,
    /// The class written in each device's config.
    pub device_class: DeviceClass,
}

impl FleetPlan {
    /// A plan for `count` devices named `{name}-0001`, `{name}-0002`, …
    pub fn numbered(
        name: &str,
        count: u32,
        coordinators: Vec<HostPort>,
        mqtt: HostPort,
    ) -> Result<Self, ProvisionError> {
        let devices = (1..=count)
            .map(|i| {
                format!("{name}-{i:04}")
                    .parse::<DeviceId>()
                    .map_err(|e| ProvisionError::Invalid(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(FleetPlan {
            name: name.to_owned(),
            coordinators,
            mqtt,
            devices,
            device_class: DeviceClass::default(),
        })
    }
}

/// What [`provision`] made.
#[derive(Debug, Clone)]
pub struct ProvisionedFleet {
    /// The fleet folder.
    pub dir: PathBuf,
    /// The coordinator's config.
    pub coordinator_config: PathBuf,
    /// Each device and its config.
    pub devices: Vec<(DeviceId, PathBuf)>,
    /// The key that verifies the fleet's manifests.
    pub manifest_key: PublicKey,
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// The plan is not valid.
    #[error("{0}")]
    Invalid(String),
    /// A key file is already there; provisioning never overwrites keys.
    #[error(
        "{0} already exists; provisioning never overwrites keys (choose another folder, or remove the old fleet on purpose)"
    )]
    Exists(PathBuf),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("could not make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Key generation or loading failed.
    #[error("key: {0}")]
    Key(String),
    /// The fleet's coordinator config could not be read.
    #[error("{0}")]
    Config(#[from] crate::ConfigErrors),
}

/// The fleet's CA and signing key, able to issue devices.
pub struct FleetAuthority {
    name: String,
    ca_key: KeyPair,
    ca_cert_pem: String,
    signing_pkcs8: Vec<u8>,
    device_class: DeviceClass,
}

impl std::fmt::Debug for FleetAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetAuthority")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Makes a fleet in `out` (created if missing) as `plan` says.
pub fn provision(plan: &FleetPlan, out: &Path) -> Result<ProvisionedFleet, ProvisionError> {
    outpost_shared::topic::validate_name(outpost_shared::topic::NameKind::Device, &plan.name)
        .map_err(|e| ProvisionError::Invalid(format!("fleet name: {e}")))?;
    if plan.coordinators.is_empty() {
        return Err(ProvisionError::Invalid(
            "at least one coordinator address is needed".into(),
        ));
    }
    for (i, d) in plan.devices.iter().enumerate() {
        if plan.devices[..i].contains(d) {
            return Err(ProvisionError::Invalid(format!(
                "device {d} is listed twice"
            )));
        }
    }
    for name in [
        files::CA_KEY,
        files::COORDINATOR_KEY,
        files::SIGNING_KEY,
        files::COORDINATOR_CONFIG,
    ] {
        refuse_existing(&out.join(name))?;
    }
    for d in &plan.devices {
        refuse_existing(
            &out.join(files::DEVICES)
                .join(d.as_str())
                .join(files::DEVICE_KEY),
        )?;
    }
    create_dir(out)?;

    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params(&plan.name)?.self_signed(&ca_key)?;
    let signing = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|e| ProvisionError::Key(format!("could not generate the signing key: {e}")))?;
    let authority = FleetAuthority {
        name: plan.name.clone(),
        ca_key,
        ca_cert_pem: ca_cert.pem(),
        signing_pkcs8: signing.as_ref().to_vec(),
        device_class: plan.device_class,
    };
    let manifest_key = authority.manifest_key()?;

    write_file(
        &out.join(files::CA_CERT),
        authority.ca_cert_pem.as_bytes(),
        Secrecy::Public,
    )?;
    write_file(
        &out.join(files::CA_KEY),
        authority.ca_key.serialize_pem().as_bytes(),
        Secrecy::Secret,
    )?;
    let signing_pem = pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        authority.signing_pkcs8.clone(),
    ));
    write_file(
        &out.join(files::SIGNING_KEY),
        signing_pem.as_bytes(),
        Secrecy::Secret,
    )?;
    write_file(
        &out.join(files::SIGNING_PUB),
        format!("{manifest_key}\n").as_bytes(),
        Secrecy::Public,
    )?;

    // The coordinator's certificate also serves the embedded MQTT broker, so it names the
    // broker's host too.
    let mut hosts = plan.coordinators.clone();
    hosts.push(plan.mqtt.clone());
    let (cert, key) = authority.issue_coordinator(&hosts)?;
    write_file(
        &out.join(files::COORDINATOR_CERT),
        cert.as_bytes(),
        Secrecy::Public,
    )?;
    write_file(
        &out.join(files::COORDINATOR_KEY),
        key.as_bytes(),
        Secrecy::Secret,
    )?;
    let config = coordinator_toml(&plan.name, &plan.coordinators);
    let coordinator_config = out.join(files::COORDINATOR_CONFIG);
    write_file(&coordinator_config, config.as_bytes(), Secrecy::Public)?;
    let folder = std::fs::canonicalize(out).map_err(|source| ProvisionError::Io {
        path: out.to_owned(),
        source,
    })?;
    write_file(
        &out.join(files::MOSQUITTO_CONFIG),
        brokers::mosquitto_conf(&folder, &plan.mqtt).as_bytes(),
        Secrecy::Public,
    )?;
    write_file(
        &out.join(files::MOSQUITTO_ACL),
        brokers::mosquitto_acl(&plan.name).as_bytes(),
        Secrecy::Public,
    )?;
    write_file(
        &out.join(files::NATS_CONFIG),
        brokers::nats_conf(&folder, &plan.name, &plan.mqtt).as_bytes(),
        Secrecy::Public,
    )?;

    let devices = plan
        .devices
        .iter()
        .map(|d| {
            authority
                .enroll(d, &plan.coordinators, &plan.mqtt, out)
                .map(|path| (d.clone(), path))
        })
        .collect::<Result<_, _>>()?;
    // The brokers' revocation list (empty) and NATS users (every device).
    authority.update_broker_files(out, &[])?;
    Ok(ProvisionedFleet {
        dir: out.to_owned(),
        coordinator_config,
        devices,
        manifest_key,
    })
}

impl FleetAuthority {
    /// Loads the authority of the fleet whose coordinator config is `config`: the CA key is
    /// `[fleet] ca_key`, or `ca.key` beside the CA certificate (the fleet folder, where
    /// enrolment happens; a coordinator serves without it).
    pub fn load(config: &CoordinatorConfig) -> Result<Self, ProvisionError> {
        let fleet = config.fleet.as_ref().ok_or_else(|| {
            ProvisionError::Invalid("the coordinator config has no [fleet] section".into())
        })?;
        let beside = fleet.ca.with_file_name(files::CA_KEY);
        let ca_key_path = match &fleet.ca_key {
            Some(path) => path.clone(),
            None if beside.is_file() => beside,
            None => {
                return Err(ProvisionError::Invalid(format!(
                    "no CA key here ({} is missing and [fleet] ca_key is not set): enrol devices where the fleet's ca.key is, with `firmware-config enroll --fleet DIR`",
                    beside.display()
                )));
            }
        };
        let ca_key_path = &ca_key_path;
        let ca_key = KeyPair::from_pem(&read_text(ca_key_path)?)
            .map_err(|e| ProvisionError::Key(format!("{}: {e}", ca_key_path.display())))?;
        let signing = pem::parse(read_text(&fleet.signing_key)?)
            .map_err(|e| ProvisionError::Key(format!("{}: {e}", fleet.signing_key.display())))?;
        let authority = FleetAuthority {
            name: fleet.name.clone(),
            ca_key,
            ca_cert_pem: read_text(&fleet.ca)?,
            signing_pkcs8: signing.contents().to_vec(),
            device_class: DeviceClass::default(),
        };
        authority.manifest_key()?;
        Ok(authority)
    }

    /// The fleet's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key that verifies this fleet's manifests.
    pub fn manifest_key(&self) -> Result<PublicKey, ProvisionError> {
        ManifestSigner::from_pkcs8(&self.signing_pkcs8)
            .map(|s| s.public_key())
            .map_err(|e| ProvisionError::Key(e.to_string()))
    }

    /// Issues device `id`: writes `fleet_dir/devices/{id}/` (key, certificate, CA, agent.toml)
    /// and returns the path of its `agent.toml`. Refuses a device that already has a key.
    pub fn enroll(
        &self,
        id: &DeviceId,
        coordinators: &[HostPort],
        mqtt: &HostPort,
        fleet_dir: &Path,
    ) -> Result<PathBuf, ProvisionError> {
        let dir = fleet_dir.join(files::DEVICES).join(id.as_str());
        refuse_existing(&dir.join(files::DEVICE_KEY))?;
        create_dir(&dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![id.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, id.as_str());
        params.distinguished_name.push(
            DnType::OrganizationName,
            format!("Outpost fleet {}", self.name),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, 5)?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        write_file(
            &dir.join(files::DEVICE_KEY),
            key.serialize_pem().as_bytes(),
            Secrecy::Secret,
        )?;
        write_file(
            &dir.join(files::DEVICE_CERT),
            cert.pem().as_bytes(),
            Secrecy::Public,
        )?;
        write_file(
            &dir.join(files::CA_CERT),
            self.ca_cert_pem.as_bytes(),
            Secrecy::Public,
        )?;
        let config = agent_toml(
            &self.name,
            id,
            self.device_class,
            &self.manifest_key()?,
            coordinators,
            mqtt,
        );
        let config_path = dir.join(files::AGENT_CONFIG);
        write_file(&config_path, config.as_bytes(), Secrecy::Public)?;
        Ok(config_path)
    }

    /// Issues device `id` into `out` (see [`FleetAuthority::enroll`]), reaching the coordinators
    /// and the MQTT broker as the fleet's first device (`{fleet}-0001` in `fleet_dir`) does, so
    /// a device added to a running fleet needs no addresses. Without that device's config:
    /// `localhost` on `quic_port`, and MQTT on `localhost:1883`; with a config that does not
    /// load, its errors.
    pub fn enroll_like_first_device(
        &self,
        id: &DeviceId,
        fleet_dir: &Path,
        quic_port: u16,
        out: &Path,
    ) -> Result<PathBuf, ProvisionError> {
        let first = fleet_dir
            .join(files::DEVICES)
            .join(format!("{}-0001", self.name))
            .join(files::AGENT_CONFIG);
        // No first device: the defaults. A first device whose config is broken: say so, rather
        // than hand out addresses that may be wrong.
        let (coordinators, mqtt) = if first.is_file() {
            let agent = crate::AgentConfig::load(&first)?;
            (agent.coordinator.addresses, agent.mqtt.broker)
        } else {
            (
                vec![HostPort {
                    host: "localhost".into(),
                    port: quic_port,
                }],
                HostPort {
                    host: "localhost".into(),
                    port: 1883,
                },
            )
        };
        self.enroll(id, &coordinators, &mqtt, out)
    }

    /// Issues a new device into `out` as [`FleetAuthority::enroll_like_first_device`] does:
    /// `id`, or the next free `{fleet}-NNNN` there. Its id and its `agent.toml`.
    pub fn enroll_next(
        &self,
        id: Option<DeviceId>,
        fleet_dir: &Path,
        quic_port: u16,
        out: &Path,
    ) -> Result<(DeviceId, PathBuf), ProvisionError> {
        let id = match id {
            Some(id) => id,
            None => (1..10_000)
                .map(|n| format!("{}-{n:04}", self.name))
                .find(|id| !out.join(files::DEVICES).join(id).exists())
                .ok_or_else(|| ProvisionError::Invalid("no free device id".into()))?
                .parse()
                .map_err(|e| ProvisionError::Invalid(format!("device id: {e}")))?,
        };
        let path = self.enroll_like_first_device(&id, fleet_dir, quic_port, out)?;
        // Issued into the fleet folder: the NATS server gets its user too.
        if same_folder(out, fleet_dir) {
            self.update_broker_files(fleet_dir, &[])?;
        }
        Ok((id, path))
    }

    /// A certificate and key (PEM) for a coordinator reachable at `hosts`: a TLS server (QUIC,
    /// the embedded MQTT broker) and a TLS client (of an external MQTT broker).
    fn issue_coordinator(&self, hosts: &[HostPort]) -> Result<(String, String), ProvisionError> {
        let mut names: Vec<String> = Vec::new();
        for h in hosts {
            if !names.contains(&h.host) {
                names.push(h.host.clone());
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, coordinator_common_name(&self.name));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params, 5)?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, ProvisionError> {
        // The CA's certificate is made from these same parameters, so the issuer name and key
        // identifier written into issued certificates match it.
        Ok(Issuer::new(ca_params(&self.name)?, &self.ca_key))
    }
}

fn ca_params(fleet: &str) -> Result<CertificateParams, ProvisionError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Outpost fleet {fleet} CA"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, format!("Outpost fleet {fleet}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, 20)?;
    Ok(params)
}

/// Valid from the start of this year for `years` years, with a random serial number.
fn set_validity(params: &mut CertificateParams, years: i32) -> Result<(), ProvisionError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Whole years since 1970 (mean Gregorian year); good enough for a validity start.
    let year = 1970 + i32::try_from(secs / 31_556_952).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| ProvisionError::Key("the system random generator failed".into()))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(())
}

/// Whether `a` and `b` are one folder.
fn same_folder(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn toml_list(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().map(|s| toml_string(&s)).collect();
    format!("[{}]", items.join(", "))
}

/// The common name of fleet `fleet`'s coordinator certificate (its MQTT user name on a broker
/// that takes identities from certificates).
pub fn coordinator_common_name(fleet: &str) -> String {
    format!("Outpost coordinator of fleet {fleet}")
}

fn coordinator_toml(fleet: &str, hosts: &[HostPort]) -> String {
    let port = hosts.first().map_or(4433, |h| h.port);
    let local_only = hosts.iter().all(|h| {
        h.host == "localhost"
            || h.host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    let ip = if local_only { "127.0.0.1" } else { "0.0.0.0" };
    format!(
        "# Outpost coordinator of fleet {fleet}, made by `firmware-config provision`.\n\
         # Paths are relative to this file. The coordinator serves without the CA key: enrol\n\
         # devices with `firmware-config enroll --fleet DIR` where ca.key is, and keep it offline.\n\n\
         [fleet]\nname = {name}\nca = \"{ca}\"\n# ca_key = \"{ca_key}\"   # only to let `cloud-coordinator enroll` enrol here\ncertificate = \"{cert}\"\nkey = \"{key}\"\nsigning_key = \"{sk}\"\n\n\
         [storage]\ndata_dir = \"data\"\n\n\
         [quic]\nlisten = \"{ip}:{port}\"\n\n\
         # The admin API listens on 127.0.0.1:7070. Beyond loopback it needs TLS; the coordinator's\n\
         # certificate names its hosts, and `cloud-coordinator ... --config` checks it against the\n\
         # fleet CA:\n\
         # [admin]\n# listen = \"0.0.0.0:7070\"\n# tls_cert = \"{cert}\"\n# tls_key = \"{key}\"\n",
        name = toml_string(fleet),
        ca = files::CA_CERT,
        ca_key = files::CA_KEY,
        cert = files::COORDINATOR_CERT,
        key = files::COORDINATOR_KEY,
        sk = files::SIGNING_KEY,
    )
}

fn agent_toml(
    fleet: &str,
    id: &DeviceId,
    class: DeviceClass,
    manifest_key: &PublicKey,
    coordinators: &[HostPort],
    mqtt: &HostPort,
) -> String {
    let class = match class {
        DeviceClass::Phone => "phone",
        DeviceClass::Laptop => "laptop",
        DeviceClass::EdgeBox => "edge-box",
    };
    format!(
        "# Outpost agent {id} of fleet {fleet}, made by `firmware-config provision`.\n\
         # Paths are relative to this file.\n\n\
         [device]\nid = {id_str}\nclass = \"{class}\"\ncertificate = \"{cert}\"\nkey = \"{key}\"\n\n\
         [fleet]\nname = {name}\nca = \"{ca}\"\nmanifest_keys = [\"{manifest_key}\"]\n\n\
         [coordinator]\naddresses = {addresses}\n\n\
         [mqtt]\nbroker = {mqtt}\n",
        id_str = toml_string(id.as_str()),
        cert = files::DEVICE_CERT,
        key = files::DEVICE_KEY,
        name = toml_string(fleet),
        ca = files::CA_CERT,
        addresses = toml_list(coordinators.iter().map(ToString::to_string)),
        mqtt = toml_string(&mqtt.to_string()),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Secrecy {
    Public,
    Secret,
}

fn refuse_existing(path: &Path) -> Result<(), ProvisionError> {
    if path.exists() {
        Err(ProvisionError::Exists(path.to_owned()))
    } else {
        Ok(())
    }
}

fn create_dir(dir: &Path) -> Result<(), ProvisionError> {
    fs::create_dir_all(dir).map_err(|source| ProvisionError::Io {
        path: dir.to_owned(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, ProvisionError> {
    fs::read_to_string(path).map_err(|source| ProvisionError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a new file (never replacing one), secret ones readable by the owner only, and syncs it.
fn write_file(path: &Path, bytes: &[u8], secrecy: Secrecy) -> Result<(), ProvisionError> {
    let io = |source| ProvisionError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secrecy == Secrecy::Secret {
            0o600
        } else {
            0o644
        });
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            ProvisionError::Exists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}
