//! Configs for the fleet's production brokers, made by [`provision`](super::provision) and kept
//! current by enrolment and revocation: Mosquitto (a TLS listener, topic rules by certificate
//! common name, a CRL) and the MQTT listener of a NATS server (a user per certificate, with
//! per-subject permissions).
//!
//! Revocation reaches these brokers through files of the fleet folder, written where the CA key
//! is: `revoked.txt` (a device id a line) is the list; `crl.pem` (the CA's revocation list of
//! those devices' certificates: Mosquitto's `crlfile`) and `nats-users.conf` (NATS reads no CRL:
//! a revoked device has no user there) follow from it. Each is replaced whole (written aside,
//! synced, renamed), so a broker reloading at any moment reads the old file or the new one.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};

use super::{FleetAuthority, ProvisionError, coordinator_common_name, files, read_text};
use crate::types::{DeviceId, HostPort};

/// How long a revocation list is valid for. OpenSSL (and so Mosquitto) refuses every client
/// once the broker's CRL is past its next update, so this is long: a list is signed again on
/// every revocation and enrolment, and `firmware-config revoke --fleet DIR` with no device signs
/// a fresh one.
pub const CRL_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// What [`FleetAuthority::update_broker_files`] wrote.
#[derive(Debug, Clone)]
pub struct BrokerFiles {
    /// Every revoked device of the fleet folder.
    pub revoked: Vec<DeviceId>,
    /// The revocation list (Mosquitto's `crlfile`).
    pub crl: PathBuf,
    /// The NATS users (one per device not revoked, and the coordinator).
    pub nats_users: PathBuf,
}

/// The devices revoked in fleet folder `fleet_dir` (none when it has no `revoked.txt`).
pub fn revoked_devices(fleet_dir: &Path) -> Result<Vec<DeviceId>, ProvisionError> {
    let path = fleet_dir.join(files::REVOKED);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ProvisionError::Io { path, source }),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.parse::<DeviceId>()
                .map_err(|e| ProvisionError::Invalid(format!("{}: {l:?}: {e}", path.display())))
        })
        .collect()
}

/// The devices issued in fleet folder `fleet_dir` (those with a certificate), sorted.
fn issued_devices(fleet_dir: &Path) -> Result<Vec<DeviceId>, ProvisionError> {
    let dir = fleet_dir.join(files::DEVICES);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ProvisionError::Io { path: dir, source }),
    };
    let mut devices = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ProvisionError::Io {
            path: dir.clone(),
            source,
        })?;
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<DeviceId>().ok())
        else {
            continue;
        };
        if entry.path().join(files::DEVICE_CERT).is_file() {
            devices.push(id);
        }
    }
    devices.sort();
    Ok(devices)
}

/// The serial number of device `id`'s certificate in `fleet_dir`.
fn device_serial(fleet_dir: &Path, id: &DeviceId) -> Result<Vec<u8>, ProvisionError> {
    let path = fleet_dir
        .join(files::DEVICES)
        .join(id.as_str())
        .join(files::DEVICE_CERT);
    if !path.is_file() {
        return Err(ProvisionError::Invalid(format!(
            "device {id} was not issued from this fleet folder ({} is missing), so its certificate cannot be put on the revocation list",
            path.display()
        )));
    }
    let der = pem::parse(read_text(&path)?)
        .map_err(|e| ProvisionError::Key(format!("{}: {e}", path.display())))?
        .into_contents();
    crate::identity::serial_from_certificate(&der)
        .map_err(|e| ProvisionError::Key(format!("{}: {e}", path.display())))
}

impl FleetAuthority {
    /// Revokes `revoke` (besides those already in `revoked.txt`) for the fleet's brokers: writes
    /// `revoked.txt`, a newly signed `crl.pem` and `nats-users.conf` in `fleet_dir`. With nothing
    /// to revoke it signs the list again and writes the users of every device issued (after an
    /// enrolment). A broker takes the new files on reload (`kill -HUP` Mosquitto,
    /// `nats-server --signal reload`).
    pub fn update_broker_files(
        &self,
        fleet_dir: &Path,
        revoke: &[DeviceId],
    ) -> Result<BrokerFiles, ProvisionError> {
        let mut revoked = revoked_devices(fleet_dir)?;
        for id in revoke {
            if !revoked.contains(id) {
                // Refuse a device this folder never issued before anything is written.
                device_serial(fleet_dir, id)?;
                revoked.push(id.clone());
            }
        }
        let now = SystemTime::now();
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let revoked_certs = revoked
            .iter()
            .map(|id| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&device_serial(fleet_dir, id)?),
                    revocation_time: now.into(),
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, ProvisionError>>()?;
        let crl = CertificateRevocationListParams {
            this_update: now.into(),
            next_update: (now + CRL_VALIDITY).into(),
            // Later lists have larger numbers: the time of signing, in milliseconds.
            crl_number: SerialNumber::from(
                u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
            ),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer()?)?;
        let pem = crl.pem()?;

        let mut list = String::from(
            "# Devices revoked for the fleet's brokers (a device id a line); crl.pem and\n# nats-users.conf are made from it by `firmware-config revoke`.\n",
        );
        for id in &revoked {
            list.push_str(id.as_str());
            list.push('\n');
        }
        let allowed: Vec<DeviceId> = issued_devices(fleet_dir)?
            .into_iter()
            .filter(|d| !revoked.contains(d))
            .collect();
        let crl_path = fleet_dir.join(files::CRL);
        let users_path = fleet_dir.join(files::NATS_USERS);
        replace_file(&fleet_dir.join(files::REVOKED), list.as_bytes())?;
        replace_file(&crl_path, pem.as_bytes())?;
        replace_file(&users_path, nats_users(&self.name, &allowed).as_bytes())?;
        Ok(BrokerFiles {
            revoked,
            crl: crl_path,
            nats_users: users_path,
        })
    }
}

/// Replaces `path` whole: written beside it, synced, renamed over it, the folder synced.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    let io = |source| ProvisionError::Io {
        path: path.to_owned(),
        source,
    };
    let mut aside = path.as_os_str().to_owned();
    aside.push(".new");
    let aside = PathBuf::from(aside);
    let mut file = fs::File::create(&aside).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&aside, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// The NATS subject an MQTT topic or filter becomes, as NATS's MQTT listener maps them: `/` →
/// `.`, `.` → `//`, and the wildcards `+` → `*`, `#` → `>`.
fn subject(topic: &str) -> String {
    let mut subject = String::with_capacity(topic.len() + 8);
    for c in topic.chars() {
        match c {
            '/' => subject.push('.'),
            '.' => subject.push_str("//"),
            '+' => subject.push('*'),
            '#' => subject.push('>'),
            c => subject.push(c),
        }
    }
    subject
}

/// The users of the fleet's NATS server: the coordinator (known by its certificate's subject,
/// as NATS writes it) writes releases and reads every status; each device in `devices` (known
/// by the DNS name its certificate carries, its id) reads releases and writes only its own
/// status. MQTT connections only. Every MQTT client also subscribes to `$MQTT.sub.>`: the
/// server delivers QoS 1 messages to a session there (an MQTT client cannot name a `$MQTT` topic
/// itself, so it reads only its own).
fn nats_users(fleet: &str, devices: &[DeviceId]) -> String {
    let deliveries = nats_string("$MQTT.sub.>");
    let manifests = subject(outpost_shared::topic::ALL_MANIFESTS);
    let statuses = subject(outpost_shared::topic::ALL_DEVICE_STATUS);
    let mut text = format!(
        "# Users of the fleet's NATS server, made by `firmware-config`: one per device not revoked\n\
         # (see revoked.txt), each limited to its own status subject. Written again on every\n\
         # enrolment and revocation; `nats-server --signal reload` takes it.\n\
         authorization {{\n  users = [\n    {{user: {coordinator}, permissions: {{publish: [{manifests}], subscribe: [{manifests}, {statuses}, {deliveries}]}}, allowed_connection_types: [\"MQTT\"]}}\n",
        coordinator = nats_string(&format!("CN={}", coordinator_common_name(fleet))),
        manifests = nats_string(&manifests),
        statuses = nats_string(&statuses),
        deliveries = deliveries,
    );
    for id in devices {
        let status = subject(&format!(
            "{}devices/{id}/status",
            outpost_shared::topic::PREFIX
        ));
        text.push_str(&format!(
            "    {{user: {user}, permissions: {{publish: [{status}], subscribe: [{manifests}, {deliveries}]}}, allowed_connection_types: [\"MQTT\"]}}\n",
            user = nats_string(id.as_str()),
            status = nats_string(&status),
            manifests = nats_string(&manifests),
            deliveries = deliveries,
        ));
    }
    text.push_str("  ]\n}\n");
    text
}

/// A quoted string for NATS's config syntax (JSON's quoting is a subset it reads).
fn nats_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// A NATS server config for the fleet's broker at `mqtt`: its MQTT listener with TLS and fleet
/// client certificates mapped to the users of `nats-users.conf`, JetStream (which keeps MQTT
/// sessions and retained releases) under `folder`.
pub(super) fn nats_conf(folder: &Path, fleet: &str, mqtt: &HostPort) -> String {
    let file = |name: &str| nats_string(&folder.join(name).display().to_string());
    format!(
        "# NATS for this Outpost fleet, made by `firmware-config provision`: the MQTT listener takes\n\
         # only clients with a certificate of the fleet CA, each mapped to its user in\n\
         # nats-users.conf (what it may publish and subscribe to). Debian: nats-server.\n\
         # Run: nats-server -c {conf}\n\
         # Point the coordinator at it with [mqtt] external = \"{mqtt}\".\n\
         server_name: {server}\n\
         # NATS's own client port: Outpost uses none, so loopback and a free port.\n\
         listen: \"127.0.0.1:-1\"\n\
         # Bounds: connections as the embedded broker's default, a payload as the largest release\n\
         # (MAX_MANIFEST_BYTES and 64 KiB of framing), JetStream's memory and disk.\n\
         max_connections: 10000\n\
         max_payload: {max_payload}\n\
         jetstream {{\n  store_dir: {store}\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
         mqtt {{\n  listen: {listen}\n  tls {{\n    cert_file: {cert}\n    key_file: {key}\n    ca_file: {ca}\n    verify_and_map: true\n    timeout: 5\n  }}\n}}\n\
         include {users}\n",
        conf = folder.join(files::NATS_CONFIG).display(),
        server = nats_string(&format!("outpost-{fleet}")),
        store = file(files::NATS_STORE),
        listen = nats_string(&mqtt.to_string()),
        cert = file(files::COORDINATOR_CERT),
        key = file(files::COORDINATOR_KEY),
        ca = file(files::CA_CERT),
        users = nats_string(files::NATS_USERS),
        max_payload = outpost_shared::signing::MAX_MANIFEST_BYTES + (64 << 10),
    )
}

/// One node of a NATS server cluster for the fleet: where MQTT clients connect, and where the
/// other nodes reach it (its cluster route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsNode {
    /// Its MQTT listener (TLS, fleet client certificates).
    pub mqtt: HostPort,
    /// Its cluster listener, which the other nodes route to.
    pub route: HostPort,
}

/// Writes `nats-node-{n}.conf` (n from 1) into the fleet folder `folder` for a NATS cluster of
/// `nodes`, each like `nats.conf` (its MQTT listener with the fleet's TLS and `nats-users.conf`)
/// plus its cluster block (routes to every other node, on loopback or a private network: routes
/// carry no TLS here) and its own JetStream folder; MQTT's sessions and retained releases are
/// replicated on up to three nodes, so one node lost loses nothing. Their paths, in order.
pub fn write_nats_cluster(
    folder: &Path,
    fleet: &str,
    nodes: &[NatsNode],
) -> Result<Vec<PathBuf>, ProvisionError> {
    if nodes.len() < 3 {
        return Err(ProvisionError::Invalid(format!(
            "a NATS cluster needs at least 3 nodes (JetStream, which keeps MQTT's state, needs a majority to survive a node), not {}",
            nodes.len()
        )));
    }
    let folder = fs::canonicalize(folder).map_err(|source| ProvisionError::Io {
        path: folder.to_owned(),
        source,
    })?;
    let replicas = nodes.len().min(3);
    let mut written = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let n = i + 1;
        let routes: Vec<String> = nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, other)| nats_string(&format!("nats-route://{}", other.route)))
            .collect();
        let text = nats_conf(&folder, fleet, &node.mqtt)
            .replace(
                &format!("server_name: {}", nats_string(&format!("outpost-{fleet}"))),
                &format!(
                    "server_name: {}",
                    nats_string(&format!("outpost-{fleet}-{n}"))
                ),
            )
            .replace(
                &format!(
                    "store_dir: {}",
                    nats_string(&folder.join(files::NATS_STORE).display().to_string())
                ),
                &format!(
                    "store_dir: {}",
                    nats_string(
                        &folder
                            .join(files::NATS_STORE)
                            .join(format!("node-{n}"))
                            .display()
                            .to_string()
                    )
                ),
            )
            .replace(
                "  listen: ",
                &format!(
                    "  stream_replicas: {replicas}\n  consumer_replicas: {replicas}\n  listen: "
                ),
            )
            + &format!(
                "cluster {{\n  name: {name}\n  listen: {listen}\n  routes: [{routes}]\n}}\n",
                name = nats_string(&format!("outpost-{fleet}")),
                listen = nats_string(&node.route.to_string()),
                routes = routes.join(", "),
            );
        let path = folder.join(format!("nats-node-{n}.conf"));
        replace_file(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// A Mosquitto config for the fleet's broker at `mqtt`, with the files of the fleet folder
/// `folder` (absolute paths: Mosquitto reads relative ones from where it was started).
pub(super) fn mosquitto_conf(folder: &Path, mqtt: &HostPort) -> String {
    let file = |name: &str| folder.join(name).display().to_string();
    format!(
        "# Mosquitto for this Outpost fleet, made by `firmware-config provision`: TLS 1.3 only, every
# client presents a certificate of the fleet CA that is not on the fleet's revocation list
# (crl.pem, signed again by `firmware-config revoke`; `kill -HUP` takes it), and is known by its
# common name (a device by its id, the coordinator by its certificate's); mosquitto.acl says
# what each may read and write.
# Run: mosquitto -c {conf}
# (Started as root, Mosquitto changes to user `mosquitto`, which must be able to read the key.)
# Point the coordinator at it with [mqtt] external = \"{host}:{port}\".
per_listener_settings false
allow_anonymous false
acl_file {acl}
listener {port} {host}
cafile {ca}
certfile {cert}
keyfile {key}
crlfile {crl}
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
set_tcp_nodelay true
",
        conf = file(files::MOSQUITTO_CONFIG),
        host = mqtt.host,
        port = mqtt.port,
        acl = file(files::MOSQUITTO_ACL),
        ca = file(files::CA_CERT),
        cert = file(files::COORDINATOR_CERT),
        key = file(files::COORDINATOR_KEY),
        crl = file(files::CRL),
    )
}

/// The topic rules of fleet `fleet`'s broker: the coordinator writes releases and reads every
/// status; a device reads releases and writes only its own status.
pub(super) fn mosquitto_acl(fleet: &str) -> String {
    format!(
        "# What each client of the fleet's broker may do (user names are certificate common names).
# The coordinator: writes releases (and reads them back, to put back one that was cleared), reads
# every device's status.
user {coordinator}
topic readwrite outpost/v1/models/+/manifest
topic read outpost/v1/devices/+/status

# Every device (its user name is its id): reads releases, writes only its own status.
pattern read outpost/v1/models/+/manifest
pattern write outpost/v1/devices/%u/status
",
        coordinator = coordinator_common_name(fleet)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_become_the_subjects_nats_uses() {
        assert_eq!(
            subject("outpost/v1/devices/cam.lobby-1/status"),
            "outpost.v1.devices.cam//lobby-1.status"
        );
        assert_eq!(
            subject(outpost_shared::topic::ALL_MANIFESTS),
            "outpost.v1.models.*.manifest"
        );
        assert_eq!(subject("a/#"), "a.>");
    }
}
