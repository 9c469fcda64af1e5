//! The coordinator's errors, each saying what a user can do about it.

use std::path::PathBuf;

/// Why the coordinator could not start or an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// A listener's address is taken.
    #[error("{what} cannot listen on {addr}: the address is in use{hint}")]
    AddressInUse {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// How to get around it.
        hint: &'static str,
    },
    /// A file or folder could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The fleet's trust material is missing or broken.
    #[error("fleet: {0}")]
    Fleet(String),
    /// The admin API cannot listen as configured: beyond loopback without TLS (its token would
    /// cross the network in the clear), or half a TLS identity. Names the key to set.
    #[error("[admin]: {0}")]
    AdminListen(String),
    /// The registry database failed.
    #[error("registry database: {0}")]
    Database(#[from] sled::Error),
    /// The registry could not be opened (its shared store, for one).
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// A network setup step failed.
    #[error("{0}")]
    Network(String),
    /// A `[[backend]]` cannot be used as configured.
    #[error("[[backend]]: {0}")]
    Backend(String),
}

/// Why a push, rollback or lookup was refused; the admin API answers these with 4xx codes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The request is malformed (bad name, option, or signature mismatch).
    #[error("{0}")]
    BadRequest(String),
    /// The model file cannot be used.
    #[error("{0}")]
    BadModel(String),
    /// No such model or version.
    #[error("{0}")]
    NotFound(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// Another coordinator replica took the release number first (a shared store); the write
    /// may be tried again.
    #[error("{0}")]
    Conflict(String),
}

impl From<sled::Error> for RegistryError {
    fn from(e: sled::Error) -> Self {
        RegistryError::Storage(e.to_string())
    }
}
