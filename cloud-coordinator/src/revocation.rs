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
