//! The PKCS#10 certificate signing request for CreateCertificateFromCsr, and the onboarding
//! server's self-signed certificate, both signed through a key backend (file or TPM), so the
//! private key never has to leave it.
//!
//! Written here with `der` rather than by rcgen: the two fixed structures are a few lines of
//! DER, and rcgen (with yasna and pem) was 60 kB of a binary with a 5 MB budget.

use crate::der;
use crate::keys::file::p256_point;
use crate::keys::{DeviceKey, KeyError};

const ACTION: &str = "building the certificate signing request";

/// AlgorithmIdentifier ecdsa-with-SHA256 (1.2.840.10045.4.3.2), parameters absent (RFC 5758).
const ECDSA_WITH_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];

/// A PEM PKCS#10 request for the public key of `key`, signed by `key` (ECDSA P-256 / SHA-256).
///
/// The subject is CN=iotd: AWS IoT ignores the CSR's subject, and the certificate it issues has
/// its own. Keys that are not P-256 answer `KeyError::Unsupported`.
pub fn build_csr(key: &dyn DeviceKey) -> Result<String, KeyError> {
    let spki = p256_spki(key, ACTION, "device")?;
    // CertificationRequestInfo: version 0, subject, subjectPKInfo, attributes [0] (none).
    let info = der::sequence(&[
        &[0x02, 0x01, 0x00],
        &der::common_name("iotd"),
        &spki,
        &[0xa0, 0x00],
    ]);
    Ok(der::pem("CERTIFICATE REQUEST", &signed(key, &info)?))
}

/// The onboarding certificate's serial number length (bytes).
const SERIAL_LEN: usize = 16;

/// A self-signed certificate (DER) for `key`, for the onboarding server: nobody can verify it
/// (the setup code authenticates the gateway, and the client binds to the certificate it saw),
/// so it only needs to be stable and this gateway's. Valid from `not_before` for 30 years.
pub fn self_signed(
    key: &dyn DeviceKey,
    common_name: &str,
    not_before: time::OffsetDateTime,
) -> Result<Vec<u8>, KeyError> {
    const SELF_SIGNING: &str = "making the onboarding certificate";
    let spki = p256_spki(key, SELF_SIGNING, "onboarding")?;
    // 16 random bytes, positive as RFC 5280 §4.1.2.2 wants (and never a leading zero byte,
    // which DER would forbid).
    let mut serial = rand::random::<[u8; SERIAL_LEN]>();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    let name = der::common_name(common_name);
    let not_after = not_before.saturating_add(time::Duration::days(30 * 365));
    let validity = der::sequence(&[&der::time(not_before), &der::time(not_after)]);
    // TBSCertificate: version [0] v3, serialNumber, signature, issuer, validity, subject,
    // subjectPublicKeyInfo; no extensions.
    let tbs = der::sequence(&[
        &[0xa0, 0x03, 0x02, 0x01, 0x02],
        &der::tlv(0x02, &serial),
        ECDSA_WITH_SHA256,
        &name,
        &validity,
        &name,
        &spki,
    ]);
    signed(key, &tbs)
}

/// `key`'s SubjectPublicKeyInfo, which must be P-256; `what` names the key in the error
/// ("device", "onboarding").
fn p256_spki(key: &dyn DeviceKey, action: &'static str, what: &str) -> Result<Vec<u8>, KeyError> {
    let spki = key.public_key_spki();
    if p256_point(&spki).is_none() {
        return Err(KeyError::Unsupported {
            action,
            message: format!("the {what} key ({}) is not ECDSA P-256", key.location()),
        });
    }
    Ok(spki)
}

/// `SEQUENCE { body, ecdsa-with-SHA256, BIT STRING signature }`: the shape of both a signed
/// request and a certificate. The key's own error, if signing fails, is what is returned.
fn signed(key: &dyn DeviceKey, body: &[u8]) -> Result<Vec<u8>, KeyError> {
    let signature = key.sign_ecdsa_p256_sha256(body)?;
    Ok(der::sequence(&[
        body,
        ECDSA_WITH_SHA256,
        &der::bit_string(&signature),
    ]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
    use x509_parser::prelude::{FromDer, X509CertificationRequest};

    use super::*;
    use crate::keys::KeyBackend;
    use crate::keys::file::FileBackend;
    use crate::keys::file::testdata::{EC_SEC1_PEM, RSA_PKCS1_PEM};

    fn csr_der(pem: &str) -> Vec<u8> {
        let mut reader = pem.as_bytes();
        let item = rustls_pemfile::read_one(&mut reader).unwrap().unwrap();
        match item {
            rustls_pemfile::Item::Csr(der) => der.as_ref().to_vec(),
            other => panic!("expected a CSR, got {other:?}"),
        }
    }

    fn assert_csr_verifies(key: &dyn DeviceKey) {
        let pem = build_csr(key).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{pem}"
        );
        let der = csr_der(&pem);
        let (rest, csr) = X509CertificationRequest::from_der(&der).unwrap();
        assert!(rest.is_empty());

        // The request carries the device key's public key ...
        let info = &csr.certification_request_info;
        assert_eq!(info.subject_pki.raw, key.public_key_spki().as_slice());
        assert_eq!(info.subject.to_string(), "CN=iotd");
        // ... and is signed with it: ECDSA with SHA-256 (1.2.840.10045.4.3.2) over the info.
        assert_eq!(
            csr.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.10045.4.3.2"
        );
        let point = p256_point(info.subject_pki.raw).unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(info.raw, &csr.signature_value.data)
            .expect("the CSR signature verifies");
    }

    /// The onboarding certificate parses, names its holder, is valid from the given instant
    /// for 30 years (a notAfter past 2049 in GeneralizedTime), is signed by its own key, and
    /// has a positive 16-byte serial that is new each time.
    #[test]
    fn the_self_signed_certificate_is_well_formed_and_signed_by_its_key() {
        use x509_parser::prelude::X509Certificate;
        let dir = tempfile::tempdir().unwrap();
        let key = FileBackend::new(dir.path()).create(1).unwrap();

        let now = time::macros::datetime!(2026-12-04 23:10:07 UTC);
        let serials: Vec<Vec<u8>> = (0..2)
            .map(|_| {
                let der = self_signed(key.as_ref(), "iotd onboarding GW-1", now).unwrap();
                let (rest, cert) = X509Certificate::from_der(&der).unwrap();
                assert!(rest.is_empty());
                assert_eq!(cert.version().0, 2);
                assert_eq!(cert.subject().to_string(), "CN=iotd onboarding GW-1");
                assert_eq!(cert.issuer(), cert.subject());
                assert_eq!(cert.validity().not_before.timestamp(), now.unix_timestamp());
                assert_eq!(
                    cert.validity().not_after.timestamp(),
                    (now + time::Duration::days(30 * 365)).unix_timestamp()
                );
                assert_eq!(cert.public_key().raw, key.public_key_spki().as_slice());
                cert.verify_signature(None).expect("signed by its own key");
                let serial = cert.raw_serial().to_vec();
                assert_eq!(serial.len(), SERIAL_LEN, "{serial:02x?}");
                assert!(serial[0] & 0x80 == 0 && serial[0] != 0, "{serial:02x?}");
                serial
            })
            .collect();
        assert_ne!(serials[0], serials[1]);
    }

    #[test]
    fn a_key_that_is_not_p256_makes_no_onboarding_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let key = FileBackend::new(dir.path())
            .import_pem(1, RSA_PKCS1_PEM)
            .unwrap();
        let now = time::OffsetDateTime::now_utc();
        let err = self_signed(key.as_ref(), "x", now).unwrap_err();
        assert!(matches!(err, KeyError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn csr_of_created_key_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let key = FileBackend::new(dir.path()).create(1).unwrap();
        assert_csr_verifies(key.as_ref());
    }

    #[test]
    fn csr_of_imported_sec1_key_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let key = FileBackend::new(dir.path())
            .import_pem(1, EC_SEC1_PEM)
            .unwrap();
        assert_csr_verifies(key.as_ref());
    }

    #[test]
    fn rsa_key_cannot_sign_a_csr() {
        let dir = tempfile::tempdir().unwrap();
        let key = FileBackend::new(dir.path())
            .import_pem(1, RSA_PKCS1_PEM)
            .unwrap();
        let err = build_csr(key.as_ref()).unwrap_err();
        assert!(matches!(err, KeyError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains(&key.location()), "{err}");
    }

    /// A P-256 key whose signer fails, as a TPM that went away would.
    #[derive(Debug)]
    struct BrokenSigner(Arc<dyn DeviceKey>);

    impl DeviceKey for BrokenSigner {
        fn location(&self) -> String {
            "tpm 0x81000002".into()
        }
        fn public_key_spki(&self) -> Vec<u8> {
            self.0.public_key_spki()
        }
        fn sign_ecdsa_p256_sha256(&self, _message: &[u8]) -> Result<Vec<u8>, KeyError> {
            Err(KeyError::Crypto {
                action: "signing",
                key: self.location(),
                message: "TPM unreachable".into(),
            })
        }
        fn tls_signing_key(&self) -> Arc<dyn rustls::sign::SigningKey> {
            self.0.tls_signing_key()
        }
    }

    #[test]
    fn signer_failure_is_reported_as_the_keys_error() {
        let dir = tempfile::tempdir().unwrap();
        let key = FileBackend::new(dir.path()).create(1).unwrap();
        let err = build_csr(&BrokenSigner(key)).unwrap_err();
        assert_eq!(err.to_string(), "signing tpm 0x81000002: TPM unreachable");
    }
}
