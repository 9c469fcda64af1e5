//! TLS configs from a fleet's PEM files, shared by every client and server that speaks TLS
//! (QUIC, MQTT): TLS 1.3 only, on ring, peers verified against one CA. There is no way to build
//! one that skips verification.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds no block of the kind expected.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the material (a key that does not match, a CA that is not one).
    #[error("{what}: {source}")]
    Rustls {
        /// What was being set up.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::Error,
    },
}

/// An identity: a certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Reads a certificate chain and a PKCS#8 key from PEM files.
    pub fn load(certificate: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = certificates(certificate)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(one_block(key)?));
        Ok(Self { chain, key })
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain.first()
    }
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Every PEM block of a file, as DER certificates.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    let blocks = pem::parse_many(text).map_err(|e| file_error(path, e))?;
    if blocks.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(blocks
        .into_iter()
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}

fn one_block(path: &Path) -> Result<Vec<u8>, TlsError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    pem::parse(text)
        .map(pem::Pem::into_contents)
        .map_err(|e| file_error(path, e))
}

/// A root store holding the certificates of the PEM file `ca`.
pub fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            what: "the CA certificate",
            source,
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config: the server verified against `roots` (its name against the address dialled),
/// `identity` presented when the server asks, ALPN `alpn` when given.
pub fn client_config(
    roots: rustls::RootCertStore,
    identity: Identity,
    alpn: Option<&[u8]>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3",
            source,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(|source| TlsError::Rustls {
            what: "the client certificate",
            source,
        })?;
    if let Some(alpn) = alpn {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    Ok(config)
}

/// A server config that requires a client certificate chaining to `roots`.
pub fn server_config(
    roots: rustls::RootCertStore,
    identity: Identity,
    alpn: Option<&[u8]>,
) -> Result<rustls::ServerConfig, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Rustls {
                what: "the client verifier",
                source: rustls::Error::General(e.to_string()),
            })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .map_err(|source| TlsError::Rustls {
            what: "the server certificate",
            source,
        })?;
    if let Some(alpn) = alpn {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    Ok(config)
}

/// A server config for clients that prove who they are some other way (the admin API's bearer
/// token): the server presents `identity` and asks for no client certificate.
pub fn server_config_without_client_auth(
    identity: Identity,
) -> Result<rustls::ServerConfig, TlsError> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3",
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .map_err(|source| TlsError::Rustls {
            what: "the server certificate",
            source,
        })
}

/// A client config that verifies the server against `roots` and presents no certificate.
pub fn client_config_without_identity(
    roots: rustls::RootCertStore,
) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3",
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
