//! Provisioning makes working trust material: certificates chain to the fleet CA, name the
//! device, keys are private, nothing is overwritten, and enrolled devices join the same fleet.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use firmware_config::{AgentConfig, CoordinatorConfig, FleetAuthority, FleetPlan, ProvisionError};
use outpost_shared::{ManifestSigner, ManifestVerifier};

fn plan(devices: u32) -> FleetPlan {
    FleetPlan::numbered(
        "acme",
        devices,
        vec![
            "localhost:4433".parse().unwrap(),
            "10.1.2.3:4433".parse().unwrap(),
        ],
        "localhost:1883".parse().unwrap(),
    )
    .unwrap()
}

fn pem_der(path: &Path) -> Vec<u8> {
    pem::parse(std::fs::read_to_string(path).unwrap())
        .unwrap()
        .into_contents()
}

#[test]
fn layout_modes_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = firmware_config::provision(&plan(2), dir.path()).unwrap();
    let ids: Vec<&str> = fleet.devices.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["acme-0001", "acme-0002"]);
    for f in [
        "ca.crt",
        "ca.key",
        "coordinator.crt",
        "coordinator.key",
        "fleet-signing.key",
        "fleet-signing.pub",
        "coordinator.toml",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for key in [
            "ca.key",
            "coordinator.key",
            "fleet-signing.key",
            "devices/acme-0001/device.key",
        ] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
    }
    // The device certificate names the device (its subject CN and its SAN are the id).
    let der = pem_der(&dir.path().join("devices/acme-0001/device.crt"));
    let text = String::from_utf8_lossy(&der);
    assert!(text.contains("acme-0001"));
    // The coordinator certificate names its hosts; the IP as an IP SAN (4 raw bytes).
    let der = pem_der(&dir.path().join("coordinator.crt"));
    assert!(String::from_utf8_lossy(&der).contains("localhost"));
    assert!(der.windows(4).any(|w| w == [10, 1, 2, 3]));
    let public = std::fs::read_to_string(dir.path().join("fleet-signing.pub")).unwrap();
    assert_eq!(public.trim(), fleet.manifest_key.to_string());
}

#[test]
fn refuses_to_overwrite_keys() {
    let dir = tempfile::tempdir().unwrap();
    firmware_config::provision(&plan(1), dir.path()).unwrap();
    let before = std::fs::read(dir.path().join("ca.key")).unwrap();
    let err = firmware_config::provision(&plan(1), dir.path()).unwrap_err();
    assert!(matches!(err, ProvisionError::Exists(_)), "{err}");
    assert!(err.to_string().contains("never overwrites"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
}

#[test]
fn bad_plans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = plan(1);
    p.coordinators.clear();
    assert!(
        firmware_config::provision(&p, dir.path())
            .unwrap_err()
            .to_string()
            .contains("coordinator")
    );
    assert!(FleetPlan::numbered("bad/name", 1, vec![], "localhost:1883".parse().unwrap()).is_err());
    let mut p = plan(1);
    p.devices.push(p.devices[0].clone());
    assert!(
        firmware_config::provision(&p, dir.path())
            .unwrap_err()
            .to_string()
            .contains("twice")
    );
}

#[test]
fn signing_key_signs_what_agents_verify() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = firmware_config::provision(&plan(1), dir.path()).unwrap();
    let coordinator = CoordinatorConfig::load(&fleet.coordinator_config).unwrap();
    let signing = coordinator.fleet.as_ref().unwrap().signing_key.clone();
    let signer = ManifestSigner::from_pkcs8(&pem_der(&signing)).unwrap();
    let agent = AgentConfig::load(&fleet.devices[0].1).unwrap();
    assert_eq!(agent.fleet.manifest_keys, vec![signer.public_key()]);
    let verifier = ManifestVerifier::new(agent.fleet.manifest_keys.clone());
    let manifest = outpost_shared::Manifest {
        model: "m".into(),
        release: 1,
        created_at: 1,
        expires_at: Some(u64::MAX),
        stable: outpost_shared::ModelVersion {
            version: 1,
            inputs: vec![outpost_shared::TensorSpec {
                name: "x".into(),
                datatype: outpost_shared::DataType::Fp32,
                shape: vec![outpost_shared::Dim::Dynamic],
            }],
            outputs: vec![outpost_shared::TensorSpec {
                name: "y".into(),
                datatype: outpost_shared::DataType::Fp32,
                shape: vec![outpost_shared::Dim::Fixed(1)],
            }],
            placement: outpost_shared::Placement::Local,
            max_batch: None,
            text: None,
            variants: vec![outpost_shared::Variant::describe(
                outpost_shared::Target::EdgeFp32,
                outpost_shared::ModelFormat::Onnx,
                b"bytes",
            )],
        },
        candidate: None,
    };
    assert_eq!(
        verifier
            .verify(&signer.sign(&manifest).unwrap(), 2)
            .unwrap(),
        manifest
    );
}

#[test]
fn enrolled_devices_join_the_same_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = firmware_config::provision(&plan(1), dir.path()).unwrap();
    let coordinator = CoordinatorConfig::load(&fleet.coordinator_config).unwrap();
    let authority = FleetAuthority::load(&coordinator).unwrap();
    assert_eq!(authority.name(), "acme");
    assert_eq!(authority.manifest_key().unwrap(), fleet.manifest_key);
    let p = plan(1);
    let id = "acme-extra".parse().unwrap();
    let path = authority
        .enroll(&id, &p.coordinators, &p.mqtt, dir.path())
        .unwrap();
    let agent = AgentConfig::load(&path).unwrap();
    assert_eq!(agent.device.id, id);
    // Its CA is the fleet's, byte for byte.
    assert_eq!(
        std::fs::read(&agent.fleet.ca).unwrap(),
        std::fs::read(dir.path().join("ca.crt")).unwrap()
    );
    // The issuer written in the new certificate is the CA's subject.
    let ca = pem_der(&dir.path().join("ca.crt"));
    let cert = pem_der(&agent.device.certificate);
    let ca_name = "Outpost fleet acme CA".as_bytes();
    assert!(ca.windows(ca_name.len()).any(|w| w == ca_name));
    assert!(cert.windows(ca_name.len()).any(|w| w == ca_name));
    // Enrolling the same id twice is refused.
    assert!(matches!(
        authority.enroll(&id, &p.coordinators, &p.mqtt, dir.path()),
        Err(ProvisionError::Exists(_))
    ));
}

/// The broker files follow the revocation list: provision writes an empty CRL and a NATS user per
/// device; revoking names the device's certificate serial in a CRL signed by the fleet CA, drops
/// its NATS user and survives the next enrolment; a device this folder never issued is refused
/// before anything is written.
#[test]
fn broker_files_follow_revocation_and_enrolment() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = firmware_config::provision(&plan(2), dir.path()).unwrap();
    let users = |dir: &Path| std::fs::read_to_string(dir.join("nats-users.conf")).unwrap();
    let text = users(dir.path());
    for id in ["acme-0001", "acme-0002"] {
        assert!(
            text.contains(&format!("user: \"{id}\""))
                && text.contains(&format!("outpost.v1.devices.{id}.status")),
            "{text}"
        );
    }
    assert!(
        text.contains("CN=Outpost coordinator of fleet acme"),
        "{text}"
    );
    let mosquitto = std::fs::read_to_string(dir.path().join("mosquitto.conf")).unwrap();
    assert!(mosquitto.contains("crlfile "), "{mosquitto}");
    let nats = std::fs::read_to_string(dir.path().join("nats.conf")).unwrap();
    assert!(
        nats.contains("verify_and_map: true")
            && nats.contains("max_payload: ")
            && nats.contains("include \"nats-users.conf\""),
        "{nats}"
    );
    let empty_crl = pem_der(&dir.path().join("crl.pem"));

    let coordinator = CoordinatorConfig::load(&fleet.coordinator_config).unwrap();
    let authority = FleetAuthority::load(&coordinator).unwrap();
    let stranger = "acme-9999".parse().unwrap();
    assert!(matches!(
        authority.update_broker_files(dir.path(), &[stranger]),
        Err(ProvisionError::Invalid(m)) if m.contains("acme-9999") && m.contains("not issued")
    ),);
    assert_eq!(pem_der(&dir.path().join("crl.pem")), empty_crl);

    let second = "acme-0002".parse().unwrap();
    let written = authority
        .update_broker_files(dir.path(), &[second])
        .unwrap();
    assert_eq!(written.revoked.len(), 1);
    let serial = firmware_config::identity::serial_from_certificate(&pem_der(
        &dir.path().join("devices/acme-0002/device.crt"),
    ))
    .unwrap();
    let crl = pem_der(&written.crl);
    assert!(
        crl.windows(serial.len()).any(|w| w == serial),
        "the serial is not on the CRL"
    );
    let ca_name = "Outpost fleet acme CA".as_bytes();
    assert!(crl.windows(ca_name.len()).any(|w| w == ca_name));
    let text = users(dir.path());
    assert!(
        !text.contains("acme-0002") && text.contains("acme-0001"),
        "{text}"
    );

    // A device enrolled later gets its user; the revoked one stays out.
    let (id, _) = authority
        .enroll_next(None, dir.path(), 4433, dir.path())
        .unwrap();
    let text = users(dir.path());
    assert!(
        text.contains(&format!("user: \"{id}\"")) && !text.contains("acme-0002"),
        "{text}"
    );
    assert_eq!(
        firmware_config::provision::revoked_devices(dir.path()).unwrap(),
        vec!["acme-0002".parse().unwrap()]
    );
}
