//! Reading a device's identity back from its certificate: the subject's common name, which
//! provisioning sets to the device id. A small DER walk, enough for X.509 subjects; it reads only
//! certificates a TLS stack has already verified against the fleet CA.

use crate::types::DeviceId;

/// Why a certificate does not name a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate does not name a device: {0}")]
pub struct IdentityError(&'static str);

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const INTEGER: u8 = 0x02;
const CONTEXT_0: u8 = 0xa0;
/// 2.5.4.3, id-at-commonName.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The device id in a DER certificate's subject common name.
pub fn device_id_from_certificate(der: &[u8]) -> Result<DeviceId, IdentityError> {
    let (cert, _) = expect(der, SEQUENCE, "not a DER certificate")?;
    let (mut tbs, _) = expect(cert, SEQUENCE, "no to-be-signed part")?;
    if tbs.first() == Some(&CONTEXT_0) {
        tbs = tlv(tbs).ok_or(IdentityError("bad version field"))?.2;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        tbs = tlv(tbs).ok_or(IdentityError("truncated certificate"))?.2;
    }
    let (mut subject, _) = expect(tbs, SEQUENCE, "no subject")?;
    while !subject.is_empty() {
        let (mut rdn, rest) = expect(subject, SET, "bad subject name")?;
        subject = rest;
        while !rdn.is_empty() {
            let (attribute, rest) = expect(rdn, SEQUENCE, "bad subject attribute")?;
            rdn = rest;
            let (oid, value) = expect(attribute, OID, "bad attribute type")?;
            if oid == COMMON_NAME {
                let (_, text, _) = tlv(value).ok_or(IdentityError("bad common name"))?;
                let text = std::str::from_utf8(text)
                    .map_err(|_| IdentityError("common name is not text"))?;
                return text
                    .parse()
                    .map_err(|_| IdentityError("common name is not a valid device id"));
            }
        }
    }
    Err(IdentityError("no common name in the subject"))
}

/// The serial number (the INTEGER's content bytes) of a DER certificate: what a revocation list
/// names it by.
pub fn serial_from_certificate(der: &[u8]) -> Result<Vec<u8>, IdentityError> {
    let (cert, _) = expect(der, SEQUENCE, "not a DER certificate")?;
    let (mut tbs, _) = expect(cert, SEQUENCE, "no to-be-signed part")?;
    if tbs.first() == Some(&CONTEXT_0) {
        tbs = tlv(tbs).ok_or(IdentityError("bad version field"))?.2;
    }
    let (serial, _) = expect(tbs, INTEGER, "no serial number")?;
    if serial.is_empty() {
        return Err(IdentityError("empty serial number"));
    }
    Ok(serial.to_vec())
}

/// One DER element: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

fn expect<'a>(
    input: &'a [u8],
    tag: u8,
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), IdentityError> {
    match tlv(input) {
        Some((t, contents, rest)) if t == tag => Ok((contents, rest)),
        _ => Err(IdentityError(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FleetPlan;

    #[test]
    fn reads_the_id_of_provisioned_devices_and_rejects_junk() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FleetPlan::numbered(
            "idt",
            2,
            vec!["localhost:4433".parse().unwrap()],
            "localhost:1883".parse().unwrap(),
        )
        .unwrap();
        let fleet = crate::provision(&plan, dir.path()).unwrap();
        for (id, config) in &fleet.devices {
            let pem_text =
                std::fs::read_to_string(config.parent().unwrap().join("device.crt")).unwrap();
            let der = pem::parse(pem_text).unwrap().into_contents();
            assert_eq!(&device_id_from_certificate(&der).unwrap(), id);
            for cut in [0, 1, 10, der.len() / 2, der.len() - 1] {
                assert!(
                    device_id_from_certificate(&der[..cut]).is_err(),
                    "cut at {cut}"
                );
            }
        }
        // The coordinator's certificate has a common name that is no device id.
        let pem_text = std::fs::read_to_string(dir.path().join("coordinator.crt")).unwrap();
        let der = pem::parse(pem_text).unwrap().into_contents();
        assert!(device_id_from_certificate(&der).is_err());
        assert!(device_id_from_certificate(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
