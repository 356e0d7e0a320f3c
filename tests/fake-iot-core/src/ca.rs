//! The fake's certificate authority: a root kept in the state directory, the TLS server
//! certificate, and the certificates it issues to devices (subject `CN=AWS IoT Certificate`, like
//! AWS's own). Certificate ids are the lowercase hex SHA-256 of the DER, as AWS computes them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use x509_parser::prelude::FromDer;

/// AWS-issued certificates expire at the end of 2049 (AWS IoT developer guide).
pub const AWS_DEFAULT_NOT_AFTER: i64 = 2_524_607_999; // 2049-12-31T23:59:59Z

/// Errors of the CA's own files.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading CA key {path}: {source}")]
    Key { path: PathBuf, source: rcgen::Error },
    #[error("{action}: {source}")]
    Rcgen {
        action: &'static str,
        source: rcgen::Error,
    },
    #[error("generating an RSA-2048 key: {0}")]
    Rsa(String),
}

/// Why a CSR was refused; the message goes to the device in the rejected reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct CsrError(pub String);

/// A certificate the CA has just signed.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub id: String,
    pub pem: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// The root CA and the TLS server identity.
pub struct Authority {
    root_pem: String,
    root_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("root", &self.root_path)
            .finish_non_exhaustive()
    }
}

/// Lowercase hex SHA-256 of a certificate's DER: AWS's certificate id.
pub fn certificate_id(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn offset_time(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive INTEGER: clear the top bit.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| CaError::Write {
            path: tmp.clone(),
            source,
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| CaError::Write {
            path: tmp.clone(),
            source,
        })?;
    fs::rename(&tmp, path).map_err(|source| CaError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file atomically (temp file, fsync, rename).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

impl Authority {
    /// Loads the root CA from `dir` (creating it on first start) and makes a fresh server
    /// certificate for `localhost`, `127.0.0.1`, `::1` and `more` (DNS names or IP addresses).
    pub fn load_or_create(dir: &Path, now: i64, more: &[String]) -> Result<Self, CaError> {
        let root_path = dir.join("root-ca.pem");
        let key_path = dir.join("root-ca.key");
        let (root_pem, root_key) = if root_path.exists() && key_path.exists() {
            let key_pem = fs::read_to_string(&key_path).map_err(|source| CaError::Read {
                path: key_path.clone(),
                source,
            })?;
            let key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::Key {
                path: key_path.clone(),
                source,
            })?;
            let pem = fs::read_to_string(&root_path).map_err(|source| CaError::Read {
                path: root_path.clone(),
                source,
            })?;
            (pem, key)
        } else {
            let key = KeyPair::generate().map_err(|source| CaError::Rcgen {
                action: "generating the root CA key",
                source,
            })?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "fake-iot-core");
            dn.push(DnType::CommonName, "fake-iot-core Root CA");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = offset_time(now - 86_400);
            params.not_after = offset_time(AWS_DEFAULT_NOT_AFTER + 86_400 * 365 * 10);
            params.serial_number = Some(random_serial());
            let cert = params.self_signed(&key).map_err(|source| CaError::Rcgen {
                action: "signing the root CA",
                source,
            })?;
            write_private(&key_path, &key.serialize_pem())?;
            write_file(&root_path, cert.pem().as_bytes(), 0o644).map_err(|source| {
                CaError::Write {
                    path: root_path.clone(),
                    source,
                }
            })?;
            (cert.pem(), key)
        };
        let issuer =
            Issuer::from_ca_cert_pem(&root_pem, root_key).map_err(|source| CaError::Rcgen {
                action: "reading the root CA certificate",
                source,
            })?;

        let server_key = KeyPair::generate().map_err(|source| CaError::Rcgen {
            action: "generating the server key",
            source,
        })?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).map_err(|source| {
                CaError::Rcgen {
                    action: "building the server certificate",
                    source,
                }
            })?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from(
                std::net::Ipv6Addr::LOCALHOST,
            )));
        for name in more {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(name.clone().try_into().map_err(|source| CaError::Rcgen {
                        action: "naming the server certificate (--server-name)",
                        source,
                    })?)
                }
            };
            params.subject_alt_names.push(san);
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "*.iot.us-east-1.amazonaws.com");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = offset_time(now - 86_400);
        params.not_after = offset_time(now + 86_400 * 365 * 5);
        params.serial_number = Some(random_serial());
        let server_cert =
            params
                .signed_by(&server_key, &issuer)
                .map_err(|source| CaError::Rcgen {
                    action: "signing the server certificate",
                    source,
                })?;
        let root_der = x509_parser::pem::parse_x509_pem(root_pem.as_bytes())
            .map(|(_, pem)| pem.contents)
            .unwrap_or_default();
        Ok(Self {
            root_pem,
            root_path,
            issuer,
            server_chain: vec![server_cert.der().clone(), CertificateDer::from(root_der)],
            server_key_der: server_key.serialize_der(),
        })
    }

    /// Path of the root CA certificate that clients trust.
    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// The root CA certificate in PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The TLS server's chain and key.
    pub fn server_identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            self.server_chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone())),
        )
    }

    /// Signs a device certificate for `key` valid from `not_before` to `not_after`.
    pub fn issue(
        &self,
        key: &impl PublicKeyData,
        not_before: i64,
        not_after: i64,
    ) -> Result<IssuedCert, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "AWS IoT Certificate");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = offset_time(not_before);
        params.not_after = offset_time(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|source| CaError::Rcgen {
                action: "signing a device certificate",
                source,
            })?;
        Ok(IssuedCert {
            id: certificate_id(cert.der()),
            pem: cert.pem(),
            not_before,
            not_after,
        })
    }

    /// Checks a PEM CSR as AWS does (signature; RSA >= 2048 or EC P-256/P-384/P-521) and signs it.
    pub fn issue_from_csr(
        &self,
        csr_pem: &str,
        not_before: i64,
        not_after: i64,
    ) -> Result<IssuedCert, CsrError> {
        let key = check_csr(csr_pem)?;
        self.issue(&key, not_before, not_after)
            .map_err(|e| CsrError(format!("the CSR could not be signed: {e}")))
    }
}

/// A new EC P-256 key (claim certificates).
pub fn new_ec_key() -> Result<KeyPair, CaError> {
    KeyPair::generate().map_err(|source| CaError::Rcgen {
        action: "generating an EC key",
        source,
    })
}

/// A new RSA-2048 key as AWS's CreateKeysAndCertificate returns it: PKCS#1 PEM, plus its
/// public key for the certificate. Slow (tens of ms even optimised): call from a blocking thread.
pub fn new_rsa_key() -> Result<(String, String, SubjectPublicKeyInfo), CaError> {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::EncodePublicKey;
    let fail = |what: String| CaError::Rsa(what);
    let mut rng = rsa::rand_core::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, 2048).map_err(|e| fail(e.to_string()))?;
    let private_pem = key
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| fail(e.to_string()))?
        .to_string();
    let public = key.to_public_key();
    let public_der = public
        .to_public_key_der()
        .map_err(|e| fail(e.to_string()))?;
    let public_pem = public
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| fail(e.to_string()))?;
    let spki =
        SubjectPublicKeyInfo::from_der(public_der.as_bytes()).map_err(|source| CaError::Rcgen {
            action: "encoding an RSA public key",
            source,
        })?;
    Ok((private_pem, public_pem, spki))
}

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";

/// Parses and checks a CSR; returns the public key to certify.
fn check_csr(csr_pem: &str) -> Result<SubjectPublicKeyInfo, CsrError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|_| CsrError("certificateSigningRequest is not a PEM block".to_owned()))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(CsrError(format!(
            "certificateSigningRequest is a PEM {}, not a CERTIFICATE REQUEST",
            pem.label
        )));
    }
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| CsrError(format!("the CSR is not valid PKCS#10: {e}")))?;
    let spki = &csr.certification_request_info.subject_pki;
    let alg = spki.algorithm.algorithm.to_id_string();
    if alg == OID_RSA {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => {
                return Err(CsrError(
                    "the CSR's RSA public key cannot be parsed".to_owned(),
                ));
            }
        };
        if bits < 2048 {
            return Err(CsrError(format!(
                "the CSR's RSA key has {bits} bits; at least 2048 are required"
            )));
        }
    } else if alg == OID_EC {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|oid| oid.to_id_string())
            .unwrap_or_default();
        match curve.as_str() {
            OID_P256 | OID_P384 => {}
            OID_P521 => {
                verify_p521(&csr)?;
                return Err(CsrError(
                    "P-521 CSRs are valid for AWS IoT but this fake's signer cannot issue P-521 certificates; use P-256 or P-384".to_owned(),
                ));
            }
            other => {
                return Err(CsrError(format!(
                    "the CSR's EC curve {other} is not supported; use P-256, P-384 or P-521"
                )));
            }
        }
    } else {
        return Err(CsrError(format!(
            "the CSR's key algorithm {alg} is not supported; use RSA (2048 bits or more) or EC"
        )));
    }
    csr.verify_signature()
        .map_err(|_| CsrError("the CSR's signature does not verify".to_owned()))?;
    SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| CsrError(format!("the CSR's public key cannot be used: {e}")))
}

fn verify_p521(
    csr: &x509_parser::certification_request::X509CertificationRequest<'_>,
) -> Result<(), CsrError> {
    use p521::ecdsa::signature::Verifier;
    let point = &csr
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data;
    let key = p521::ecdsa::VerifyingKey::from_sec1_bytes(point)
        .map_err(|_| CsrError("the CSR's P-521 public key is not a valid point".to_owned()))?;
    let sig = p521::ecdsa::Signature::from_der(&csr.signature_value.data)
        .map_err(|_| CsrError("the CSR's signature is not DER ECDSA".to_owned()))?;
    key.verify(csr.certification_request_info.raw, &sig)
        .map_err(|_| CsrError("the CSR's signature does not verify".to_owned()))
}

/// Reads validity and the SPKI of a certificate PEM (registry imports, claim checks).
pub fn parse_cert_pem(pem: &str) -> Option<(Vec<u8>, i64, i64)> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&block.contents).ok()?;
    let validity = cert.validity();
    Some((
        block.contents.clone(),
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}
