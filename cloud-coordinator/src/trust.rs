//! The coordinator's trust material: a provisioned fleet, or in dev mode a throwaway fleet made
//! in the data folder by the same provisioning code; and the TLS configs built from it. Every
//! QUIC connection is mutual TLS 1.3 against the fleet CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use firmware_config::{CoordinatorConfig, FleetMaterial, FleetPlan, HostPort};
use outpost_shared::ManifestSigner;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::CoordinatorError;

/// The folder, inside the data folder, of the dev-mode fleet.
pub const DEV_FLEET_DIR: &str = "dev-fleet";

/// Loaded trust material.
pub struct Trust {
    /// The fleet's files.
    pub fleet: FleetMaterial,
    /// The coordinator config the fleet came with (dev mode) or was given.
    pub fleet_config: Option<PathBuf>,
    /// The CA certificate.
    pub ca: CertificateDer<'static>,
    /// The coordinator's certificate.
    pub certificate: CertificateDer<'static>,
    /// The coordinator's key.
    pub key: PrivateKeyDer<'static>,
    /// Signs manifests.
    pub signer: ManifestSigner,
    /// The dev fleet's first device config, in dev mode.
    pub dev_agent_config: Option<PathBuf>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("fleet", &self.fleet.name)
            .finish_non_exhaustive()
    }
}

/// The dev fleet's coordinator config path for a data folder.
pub fn dev_fleet_config(data_dir: &Path) -> PathBuf {
    data_dir
        .join(DEV_FLEET_DIR)
        .join(firmware_config::provision::files::COORDINATOR_CONFIG)
}

/// Loads the configured fleet, or in dev mode loads (making it on first start) the dev fleet.
pub fn load(
    config: &CoordinatorConfig,
    quic_port: u16,
    mqtt: &HostPort,
) -> Result<Trust, CoordinatorError> {
    let fleet_err = |e: &dyn std::fmt::Display| CoordinatorError::Fleet(e.to_string());
    let (fleet, fleet_config, dev_agent_config) = match &config.fleet {
        Some(f) => (f.clone(), None, None),
        None => {
            let path = dev_fleet_config(&config.storage.data_dir);
            let dir = config.storage.data_dir.join(DEV_FLEET_DIR);
            if !path.exists() {
                let hosts = vec![
                    HostPort {
                        host: "localhost".into(),
                        port: quic_port,
                    },
                    HostPort {
                        host: "127.0.0.1".into(),
                        port: quic_port,
                    },
                ];
                let plan = FleetPlan::numbered("dev", 1, hosts, mqtt.clone())
                    .map_err(|e| fleet_err(&e))?;
                firmware_config::provision(&plan, &dir).map_err(|e| fleet_err(&e))?;
                tracing::info!(dir = %dir.display(), "made a throwaway dev fleet");
            }
            let loaded = CoordinatorConfig::load(&path).map_err(|e| fleet_err(&e))?;
            let fleet = loaded.fleet.ok_or_else(|| {
                CoordinatorError::Fleet(format!("{} has no [fleet]", path.display()))
            })?;
            let agent = dir
                .join("devices")
                .join("dev-0001")
                .join(firmware_config::provision::files::AGENT_CONFIG);
            (fleet, Some(path), Some(agent))
        }
    };
    let ca = CertificateDer::from(read_pem(&fleet.ca)?);
    let certificate = CertificateDer::from(read_pem(&fleet.certificate)?);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(read_pem(&fleet.key)?));
    let signer =
        ManifestSigner::from_pkcs8(&read_pem(&fleet.signing_key)?).map_err(|e| fleet_err(&e))?;
    Ok(Trust {
        fleet,
        fleet_config,
        ca,
        certificate,
        key,
        signer,
        dev_agent_config,
    })
}

fn read_pem(path: &Path) -> Result<Vec<u8>, CoordinatorError> {
    let text = std::fs::read_to_string(path).map_err(|source| CoordinatorError::Io {
        path: path.to_owned(),
        source,
    })?;
    pem::parse(text)
        .map(pem::Pem::into_contents)
        .map_err(|e| CoordinatorError::Fleet(format!("{}: {e}", path.display())))
}

/// The QUIC server config: TLS 1.3 only, ALPN `outpost/1`, client certificates required and
/// verified against the fleet CA.
pub fn quic_server_config(trust: &Trust) -> Result<quinn::ServerConfig, CoordinatorError> {
    let tls_err = |e: &dyn std::fmt::Display| CoordinatorError::Fleet(format!("TLS setup: {e}"));
    let identity = outpost_runtime::tls::Identity {
        chain: vec![trust.certificate.clone(), trust.ca.clone()],
        key: trust.key.clone_key(),
    };
    let tls = outpost_runtime::tls::server_config(
        fleet_roots(trust)?,
        identity,
        Some(outpost_shared::frame::ALPN),
    )
    .map_err(tls_error)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| tls_err(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Chunk downloads want bigger windows than quinn's defaults (see FINDINGS.md).
    transport.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024));
    transport.receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024));
    transport.send_window(32 * 1024 * 1024);
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(
        crate::quic::MAX_STREAMS_PER_CONNECTION,
    ));
    // Agents open no unidirectional streams.
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

fn tls_error(e: outpost_runtime::tls::TlsError) -> CoordinatorError {
    CoordinatorError::Fleet(format!("TLS setup: {e}"))
}

/// The coordinator's identity: its certificate and key.
fn identity(trust: &Trust) -> outpost_runtime::tls::Identity {
    outpost_runtime::tls::Identity {
        chain: vec![trust.certificate.clone()],
        key: trust.key.clone_key(),
    }
}

/// A root store holding the fleet CA.
fn fleet_roots(trust: &Trust) -> Result<rustls::RootCertStore, CoordinatorError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(trust.ca.clone())
        .map_err(|e| CoordinatorError::Fleet(format!("TLS setup: the fleet CA: {e}")))?;
    Ok(roots)
}

/// The embedded MQTT broker's TLS config: the coordinator's certificate, TLS 1.3, and a client
/// certificate from the fleet CA required of every client.
pub fn mqtt_server_config(trust: &Trust) -> Result<rustls::ServerConfig, CoordinatorError> {
    outpost_runtime::tls::server_config(fleet_roots(trust)?, identity(trust), None)
        .map_err(tls_error)
}

/// The admin API's HTTPS config: `[admin] tls_cert` and `tls_key`; clients prove themselves with
/// the bearer token, not a certificate.
pub fn admin_server_config(
    cert: &Path,
    key: &Path,
) -> Result<rustls::ServerConfig, CoordinatorError> {
    let identity = outpost_runtime::tls::Identity::load(cert, key)
        .map_err(|e| CoordinatorError::AdminListen(format!("tls_cert / tls_key: {e}")))?;
    outpost_runtime::tls::server_config_without_client_auth(identity)
        .map_err(|e| CoordinatorError::AdminListen(format!("tls_cert / tls_key: {e}")))
}

/// The coordinator's MQTT client TLS config: its certificate, and the broker's verified against
/// `broker_ca` (`[mqtt] ca`) or the fleet CA.
pub fn mqtt_client_config(
    trust: &Trust,
    broker_ca: Option<&Path>,
) -> Result<rustls::ClientConfig, CoordinatorError> {
    let roots = match broker_ca {
        Some(ca) => outpost_runtime::tls::roots(ca).map_err(tls_error)?,
        None => fleet_roots(trust)?,
    };
    outpost_runtime::tls::client_config(roots, identity(trust), None).map_err(tls_error)
}

/// Checks device statuses: signed by a device key whose certificate chains to the fleet CA and
/// names the device the status is about.
#[derive(Debug, Clone)]
pub struct StatusVerifier {
    ca: CertificateDer<'static>,
}

impl StatusVerifier {
    /// A verifier trusting the fleet CA `ca`.
    pub fn new(ca: CertificateDer<'static>) -> Self {
        Self { ca }
    }

    /// The status in `signed`, published on device `device`'s topic, and where it stands in the
    /// device's output; why not, when the certificate, the signature or the names do not hold.
    pub fn verify(
        &self,
        device: &str,
        signed: &outpost_shared::SignedStatus,
    ) -> Result<(outpost_shared::DeviceStatus, outpost_shared::StatusOrder), String> {
        let anchor =
            webpki::anchor_from_trusted_cert(&self.ca).map_err(|e| format!("the fleet CA: {e}"))?;
        let der = CertificateDer::from(signed.certificate.as_slice());
        let cert = webpki::EndEntityCert::try_from(&der)
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| format!("the certificate is not one of the fleet's devices: {e}"))?;
        cert.verify_signature(
            webpki::ring::ECDSA_P256_SHA256,
            &signed.message(),
            &signed.signature,
        )
        .map_err(|e| format!("the signature does not verify: {e}"))?;
        let named = firmware_config::device_id_from_certificate(&signed.certificate)
            .map_err(|e| format!("the certificate names no device: {e}"))?;
        if named.as_str() != device {
            return Err(format!(
                "signed by device {named}, published as device {device}"
            ));
        }
        let status = signed
            .device_status()
            .map_err(|e| format!("the status inside does not decode: {e}"))?;
        if status.device_id != device {
            return Err(format!(
                "the status is about device {}, published as device {device}",
                status.device_id
            ));
        }
        let order = outpost_shared::StatusOrder {
            session: signed.session,
            seq: signed.seq,
            updated_at: status.updated_at,
        };
        Ok((status, order))
    }
}
