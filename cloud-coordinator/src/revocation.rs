//! Revoked devices, kept in sled (they survive restarts). A revoked device's certificate still
//! chains to the fleet CA, so every door checks this list: QUIC refuses it and closes its open
//! connections, the embedded broker refuses it and closes its open connections, and its
//! statuses are ignored. Every holder of a connection watches [`Revocations::changes`] and
//! ends its own when its device is revoked.

use std::collections::BTreeMap;
use std::sync::RwLock;

use tokio::sync::watch;

/// Devices revoked at most: a list past this is refused, as a runaway script would make it.
pub const MAX_REVOKED: usize = 1_000_000;

/// The revoked devices.
#[derive(Debug)]
pub struct Revocations {
    tree: sled::Tree,
    db: sled::Db,
    /// Device id → when it was revoked (Unix seconds).
    revoked: RwLock<BTreeMap<String, u64>>,
    changes: watch::Sender<u64>,
}

/// Why a device could not be revoked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeError {
    /// The list could not be written.
    #[error("the revocation list: {0}")]
    Storage(#[from] sled::Error),
    /// The list holds [`MAX_REVOKED`] devices.
    #[error("the revocation list holds its limit of {MAX_REVOKED} devices")]
    Full,
}

impl Revocations {
    /// Opens the list in `db` (tree `revoked`).
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let tree = db.open_tree("revoked")?;
        let mut revoked = BTreeMap::new();
        for entry in tree.iter() {
            let (id, at) = entry?;
            let at = <[u8; 8]>::try_from(at.as_ref()).map_or(0, u64::from_be_bytes);
            revoked.insert(String::from_utf8_lossy(&id).into_owned(), at);
        }
        Ok(Self {
            tree,
            db: db.clone(),
            revoked: RwLock::new(revoked),
            changes: watch::channel(0).0,
        })
    }

    /// Whether `device` is revoked.
    pub fn is_revoked(&self, device: &str) -> bool {
        self.revoked.read().map_or(true, |r| r.contains_key(device))
    }

    /// Revokes `device` (durably, before anything is told); whether it was not revoked before.
    pub fn revoke(&self, device: &str, now: u64) -> Result<bool, RevokeError> {
        if self.is_revoked(device) {
            return Ok(false);
        }
        if self.revoked.read().map_or(0, |r| r.len()) >= MAX_REVOKED {
            return Err(RevokeError::Full);
        }
        self.tree.insert(device.as_bytes(), &now.to_be_bytes())?;
        self.db.flush()?;
        if let Ok(mut r) = self.revoked.write() {
            r.insert(device.to_owned(), now);
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(true)
    }

    /// Every revoked device, with when it was revoked.
    pub fn list(&self) -> Vec<(String, u64)> {
        self.revoked
            .read()
            .map(|r| r.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// Changes whenever a device is revoked.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The fleet folder's broker files (`crl.pem`, `nats-users.conf`: see
/// [`firmware_config::provision::FleetAuthority::update_broker_files`]), kept current by a
/// coordinator that can sign them: one whose fleet CA key is beside its CA certificate or named
/// by `[fleet] ca_key` (dev mode always is). Without the key they are signed offline with
/// `firmware-config revoke`.
#[derive(Debug)]
pub struct BrokerFiles {
    fleet_dir: std::path::PathBuf,
    authority: Option<firmware_config::FleetAuthority>,
}

impl BrokerFiles {
    /// The broker files of the fleet `config` names (its CA certificate's folder).
    pub fn new(config: &firmware_config::CoordinatorConfig) -> Self {
        let fleet_dir = config
            .fleet
            .as_ref()
            .and_then(|f| f.ca.parent())
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        let authority = firmware_config::FleetAuthority::load(config).ok();
        Self {
            fleet_dir,
            authority,
        }
    }

    /// Puts `devices` on the brokers' revocation list (an empty list signs it again): what was
    /// done, or what the operator must do, in words.
    pub fn revoke(&self, devices: &[String]) -> String {
        let dir = self.fleet_dir.display();
        let Some(authority) = &self.authority else {
            return format!(
                "the fleet CA key is not here, so the production brokers' files cannot be signed: run `firmware-config revoke --fleet {dir} {}` where ca.key is, copy crl.pem and nats-users.conf to the brokers and reload them",
                devices.join(" ")
            );
        };
        let ids: Result<Vec<firmware_config::DeviceId>, _> =
            devices.iter().map(|d| d.parse()).collect();
        let written = ids.map_err(|e| e.to_string()).and_then(|ids| {
            authority
                .update_broker_files(&self.fleet_dir, &ids)
                .map_err(|e| e.to_string())
        });
        match written {
            Ok(written) => format!(
                "{} and {} signed again with {} revoked: reload the production brokers (kill -HUP mosquitto; nats-server --signal reload)",
                written.crl.display(),
                written.nats_users.display(),
                written.revoked.len()
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not update the brokers' revocation files");
                format!("the production brokers' files in {dir} were not updated: {e}")
            }
        }
    }
}
