//! The PKCS#10 certificate signing request for CreateCertificateFromCsr, signed through the
//! device key, so the private key never has to leave its backend (file or TPM).
//!
//! rcgen is built without a crypto backend: its remote-key traits (`PublicKeyData` and
//! `SigningKey`) are implemented here on an adapter over `&dyn DeviceKey`.

use std::cell::RefCell;

use crate::keys::file::p256_point;
use crate::keys::{DeviceKey, KeyError};

const ACTION: &str = "building the certificate signing request";

/// A PEM PKCS#10 request for the public key of `key`, signed by `key` (ECDSA P-256 / SHA-256).
///
/// The subject is CN=iotd: AWS IoT ignores the CSR's subject, and the certificate it issues has
/// its own. Keys that are not P-256 answer `KeyError::Unsupported`.
pub fn build_csr(key: &dyn DeviceKey) -> Result<String, KeyError> {
    let spki = key.public_key_spki();
    let signer = RemoteKey::new(key, &spki, ACTION, "device")?;

    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "iotd");

    let request = params.serialize_request(&signer);
    // rcgen only knows `RemoteKeyError`; the key's own error says what actually went wrong.
    if let Some(failure) = signer.failure.take() {
        return Err(failure);
    }
    let request = request.map_err(|e| rcgen_error(key, e))?;
    request.pem().map_err(|e| rcgen_error(key, e))
}

fn rcgen_error(key: &dyn DeviceKey, e: rcgen::Error) -> KeyError {
    KeyError::Crypto {
        action: ACTION,
        key: key.location(),
        message: e.to_string(),
    }
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
    let failed = |message: String| KeyError::Crypto {
        action: SELF_SIGNING,
        key: key.location(),
        message,
    };
    let spki = key.public_key_spki();
    let signer = RemoteKey::new(key, &spki, SELF_SIGNING, "onboarding")?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.not_before = not_before;
    params.not_after = not_before.saturating_add(time::Duration::days(30 * 365));
    // rcgen makes a serial number only with its `crypto` feature, which iotd does not build
    // (test builds get it from dev-dependencies, so only a release build would fail here):
    // 16 random bytes, positive as RFC 5280 §4.1.2.2 wants.
    let mut serial = rand::random::<[u8; SERIAL_LEN]>();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(rcgen::SerialNumber::from(serial.to_vec()));
    let certificate = params.self_signed(&signer);
    if let Some(failure) = signer.failure.take() {
        return Err(failure);
    }
    let certificate = certificate.map_err(|e| failed(e.to_string()))?;
    Ok(certificate.der().to_vec())
}

/// The device key as rcgen sees a remote key.
struct RemoteKey<'a> {
    key: &'a dyn DeviceKey,
    /// The uncompressed P-256 point, borrowed from the SPKI.
    point: &'a [u8],
    /// The error of a failed signature, kept because rcgen's error type cannot carry it.
    failure: RefCell<Option<KeyError>>,
}

impl<'a> RemoteKey<'a> {
    /// The adapter for `key` (whose SPKI is `spki`), which must be P-256; `what` names the key
    /// in the error ("device", "onboarding").
    fn new(
        key: &'a dyn DeviceKey,
        spki: &'a [u8],
        action: &'static str,
        what: &str,
    ) -> Result<Self, KeyError> {
        let Some(point) = p256_point(spki) else {
            return Err(KeyError::Unsupported {
                action,
                message: format!("the {what} key ({}) is not ECDSA P-256", key.location()),
            });
        };
        Ok(Self {
            key,
            point,
            failure: RefCell::new(None),
        })
    }
}

impl rcgen::PublicKeyData for RemoteKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for RemoteKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key.sign_ecdsa_p256_sha256(msg).map_err(|e| {
            self.failure.replace(Some(e));
            rcgen::Error::RemoteKeyError
        })
    }
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

    /// The serial number is iotd's own (rcgen without its `crypto` feature, as in a release
    /// build, refuses a certificate without one), positive, and new for each certificate.
    #[test]
    fn the_self_signed_certificate_has_its_own_positive_serial() {
        use x509_parser::prelude::X509Certificate;
        let dir = tempfile::tempdir().unwrap();
        let key = FileBackend::new(dir.path()).create(1).unwrap();

        let now = time::OffsetDateTime::now_utc();
        let serials: Vec<Vec<u8>> = (0..2)
            .map(|_| {
                let der = self_signed(key.as_ref(), "iotd onboarding GW-1", now).unwrap();
                let (_, cert) = X509Certificate::from_der(&der).unwrap();
                let serial = cert.raw_serial().to_vec();
                assert_eq!(serial.len(), SERIAL_LEN, "{serial:02x?}");
                assert!(serial[0] & 0x80 == 0 && serial[0] != 0, "{serial:02x?}");
                serial
            })
            .collect();
        assert_ne!(serials[0], serials[1]);
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
