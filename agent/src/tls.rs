//! The rustls client configuration for AWS IoT Core: the server is checked against a CA bundle,
//! and the client authenticates with a certificate whose key signs through `DeviceKey` (a file
//! or the TPM), so the key itself is never handed to rustls.
//!
//! The ring provider is named explicitly instead of relying on a process-wide default, so
//! nothing depends on which rustls crypto features other crates switch on.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::client::Resumption;
use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use sha2::{Digest, Sha256};

mod x509;

use crate::keys::DeviceKey;

/// The ALPN protocol that lets AWS IoT Core take MQTT with X.509 client certificates over TLS on
/// port 443 (`cloud.alpn`).
pub const ALPN_AWS_MQTT: &[u8] = b"x-amzn-mqtt-ca";

/// The system trust store, as Debian's, Ubuntu's and Yocto's ca-certificates install it: the
/// server certificate is checked against it when `cloud.ca_bundle` is not set.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// An error of the TLS set-up, naming the action and the file or object.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A PEM file or text that holds no usable certificates; `what` names it (with its path).
    #[error("reading {what}: {message}")]
    Pem { what: String, message: String },
    /// A certificate that does not parse; named by the start of its SHA-256 fingerprint.
    #[error("parsing certificate {fingerprint}: {message}")]
    Certificate {
        fingerprint: String,
        message: String,
    },
    #[error("building the TLS client configuration: {message}")]
    Identity { message: String },
    #[error("building the TLS client configuration: {source}")]
    Rustls {
        #[source]
        source: rustls::Error,
    },
}

/// The client certificate chain (leaf first) and the key it certifies.
#[derive(Clone)]
pub struct TlsIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<dyn DeviceKey>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("certificates", &self.chain.len())
            .field("key", &self.key.location())
            .finish()
    }
}

/// The CAs the server certificate must chain to.
#[derive(Clone)]
pub struct ServerTrust {
    roots: Arc<rustls::RootCertStore>,
}

impl fmt::Debug for ServerTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTrust")
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl ServerTrust {
    /// A PEM bundle file (AmazonRootCA1.pem, or a private CA for tests). Every certificate in it
    /// must be a usable trust anchor: a broken explicit bundle is a configuration error.
    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        let pem = read_file(path, "CA bundle")?;
        Self::from_pem_bytes(&pem, &format!("CA bundle {}", path.display()))
    }

    /// A PEM bundle in memory; `what` names it in errors.
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, TlsError> {
        Self::from_pem_bytes(pem.as_bytes(), what)
    }

    /// The system trust store, `/etc/ssl/certs/ca-certificates.crt`. Unlike an explicit bundle,
    /// certificates webpki cannot use are skipped: distributions ship a few odd ones.
    pub fn system() -> Result<Self, TlsError> {
        let path = Path::new(SYSTEM_CA_BUNDLE);
        let pem = read_file(path, "system CA bundle")?;
        let what = format!("system CA bundle {}", path.display());
        let certs = pem_certificates(&pem, &what)?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsError::Pem {
                what,
                message: "no usable CA certificates in it".into(),
            });
        }
        if ignored > 0 {
            tracing::debug!(bundle = %path.display(), added, ignored, "skipped unusable CA certificates");
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    /// How many trust anchors there are.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    fn from_pem_bytes(pem: &[u8], what: &str) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for (index, cert) in pem_certificates(pem, what)?.into_iter().enumerate() {
            roots.add(cert).map_err(|e| TlsError::Pem {
                what: what.to_string(),
                message: format!(
                    "certificate {} is not a usable CA certificate: {e}",
                    index + 1
                ),
            })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }
}

/// A client configuration for AWS IoT Core: ring provider, TLS 1.3 and 1.2, the client
/// certificate chain with its key signing through `DeviceKey`, and ALPN `x-amzn-mqtt-ca` when
/// `alpn` is true (port 443). SNI comes from the server name the MQTT client connects to.
///
/// The leaf certificate must certify `identity.key`: a mismatch is caught here, with the key
/// named, rather than as an opaque handshake failure at the broker.
pub fn client_config(
    trust: &ServerTrust,
    identity: TlsIdentity,
    alpn: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let TlsIdentity { chain, key } = identity;
    let leaf = chain.first().ok_or_else(|| TlsError::Identity {
        message: format!("no client certificate for the key {}", key.location()),
    })?;
    if certificate_spki(leaf)? != key.public_key_spki() {
        return Err(TlsError::Identity {
            message: format!(
                "the client certificate {} does not certify the key {}",
                fingerprint(leaf),
                key.location()
            ),
        });
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = CertifiedKey::new(chain, key.tls_signing_key());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Rustls { source })?
        .with_root_certificates(trust.roots.clone())
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    if alpn {
        config.alpn_protocols = vec![ALPN_AWS_MQTT.to_vec()];
    }
    // Every connection proves possession of the key: a resumed session would skip the client
    // signature and hide a key (TPM) that stopped working until the ticket ran out.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Reads a PEM certificate chain file (leaf first), naming the file in errors.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path, "certificate chain")?;
    parse_chain_bytes(&pem, &format!("certificate chain {}", path.display()))
}

/// Parses a PEM certificate chain; `what` names it in errors ("claim certificate /etc/...").
/// Each certificate must parse as X.509, so a damaged file fails here and not at the broker.
pub fn parse_chain_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_chain_bytes(pem.as_bytes(), what)
}

/// The SubjectPublicKeyInfo DER of a certificate, to compare with `DeviceKey::public_key_spki`.
pub fn certificate_spki(cert: &CertificateDer<'_>) -> Result<Vec<u8>, TlsError> {
    Ok(parse_certificate(cert)?.spki.to_vec())
}

/// The certificate's notAfter as Unix seconds.
pub fn certificate_not_after(cert: &CertificateDer<'_>) -> Result<i64, TlsError> {
    Ok(parse_certificate(cert)?.not_after)
}

/// The certificate's notBefore and notAfter as Unix seconds.
pub fn certificate_validity(cert: &CertificateDer<'_>) -> Result<(i64, i64), TlsError> {
    let fields = parse_certificate(cert)?;
    Ok((fields.not_before, fields.not_after))
}

fn parse_certificate<'a>(cert: &'a CertificateDer<'_>) -> Result<x509::Fields<'a>, TlsError> {
    x509::parse(cert.as_ref()).map_err(|message| TlsError::Certificate {
        fingerprint: fingerprint(cert),
        message,
    })
}

/// "sha256:" and the first 8 bytes of the fingerprint in hex: enough to tell certificates apart
/// in a message.
fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(cert.as_ref());
    format!("sha256:{}", hex::encode(&digest[..8]))
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn parse_chain_bytes(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = pem_certificates(pem, what)?;
    for (index, cert) in certs.iter().enumerate() {
        if let Err(e) = x509::parse(cert.as_ref()) {
            return Err(TlsError::Pem {
                what: what.to_string(),
                message: format!("certificate {} is not valid X.509: {e}", index + 1),
            });
        }
    }
    Ok(certs)
}

/// All CERTIFICATE blocks of `pem`; at least one.
fn pem_certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_string(),
            message: format!("not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_string(),
            message: "no certificates in it".into(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use iotd_testkit::pki::{Pki, handshake};

    use super::*;
    use crate::keys::KeyBackend;
    use crate::keys::file::FileBackend;
    use crate::keys::file::testdata::RSA_PKCS1_PEM;

    fn trust(pki: &Pki) -> ServerTrust {
        ServerTrust::from_pem(&pki.ca_pem(), "test CA").unwrap()
    }

    fn client_cert(pki: &Pki, key: &dyn DeviceKey) -> CertificateDer<'static> {
        pki.client_cert(&key.public_key_spki())
    }

    /// The test server, offering the AWS IoT ALPN protocol.
    fn server_config(
        pki: &Pki,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<rustls::ServerConfig> {
        pki.server_config(version, &[ALPN_AWS_MQTT])
    }

    fn mutual_tls(
        key: Arc<dyn DeviceKey>,
        version: &'static rustls::SupportedProtocolVersion,
        alpn: bool,
    ) {
        let pki = Pki::new();
        let cert = client_cert(&pki, key.as_ref());
        let identity = TlsIdentity {
            chain: vec![cert.clone()],
            key,
        };
        let client = client_config(&trust(&pki), identity, alpn).unwrap();
        let seen = handshake(server_config(&pki, version), client).unwrap();
        assert_eq!(
            seen.client_chain,
            vec![cert],
            "the server saw the client certificate"
        );
        assert_eq!(seen.version, Some(version.version));
        let expected_alpn = alpn.then(|| ALPN_AWS_MQTT.to_vec());
        assert_eq!(seen.alpn, expected_alpn);
    }

    fn ec_key(dir: &tempfile::TempDir) -> Arc<dyn DeviceKey> {
        FileBackend::new(dir.path()).create(1).unwrap()
    }

    fn rsa_key(dir: &tempfile::TempDir) -> Arc<dyn DeviceKey> {
        FileBackend::new(dir.path())
            .import_pem(1, RSA_PKCS1_PEM)
            .unwrap()
    }

    #[test]
    fn mutual_tls13_with_ec_file_key() {
        let dir = tempfile::tempdir().unwrap();
        mutual_tls(ec_key(&dir), &rustls::version::TLS13, true);
    }

    #[test]
    fn mutual_tls12_with_ec_file_key() {
        let dir = tempfile::tempdir().unwrap();
        mutual_tls(ec_key(&dir), &rustls::version::TLS12, true);
    }

    #[test]
    fn mutual_tls13_with_imported_rsa_key() {
        let dir = tempfile::tempdir().unwrap();
        mutual_tls(rsa_key(&dir), &rustls::version::TLS13, true);
    }

    #[test]
    fn mutual_tls12_with_imported_rsa_key() {
        let dir = tempfile::tempdir().unwrap();
        mutual_tls(rsa_key(&dir), &rustls::version::TLS12, false);
    }

    #[test]
    fn no_alpn_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        mutual_tls(ec_key(&dir), &rustls::version::TLS13, false);
    }

    #[test]
    fn server_outside_the_trust_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = ec_key(&dir);
        let (pki, other) = (Pki::new(), Pki::new());
        let identity = TlsIdentity {
            chain: vec![client_cert(&pki, key.as_ref())],
            key,
        };
        let client = client_config(&trust(&other), identity, true).unwrap();
        let err = handshake(server_config(&pki, &rustls::version::TLS13), client).unwrap_err();
        // Both test CAs have the same name, so webpki finds the wrong anchor and reports a bad
        // signature rather than an unknown issuer; either way the server is refused.
        assert!(err.starts_with("client: invalid peer certificate"), "{err}");
    }

    #[test]
    fn client_config_refuses_a_certificate_of_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = ec_key(&dir);
        let other = FileBackend::new(dir.path()).create(2).unwrap();
        let pki = Pki::new();
        let identity = TlsIdentity {
            chain: vec![client_cert(&pki, other.as_ref())],
            key: key.clone(),
        };
        let err = client_config(&trust(&pki), identity, true).unwrap_err();
        assert!(err.to_string().contains(&key.location()), "{err}");

        let err =
            client_config(&trust(&pki), TlsIdentity { chain: vec![], key }, true).unwrap_err();
        assert!(matches!(err, TlsError::Identity { .. }), "{err}");
    }

    #[test]
    fn certificate_spki_and_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let key = ec_key(&dir);
        let pki = Pki::new();
        let cert = client_cert(&pki, key.as_ref());
        assert_eq!(certificate_spki(&cert).unwrap(), key.public_key_spki());

        let cert = pki.client_cert_with(&key.public_key_spki(), |params| {
            params.not_after = rcgen::date_time_ymd(2030, 6, 1);
        });
        // `date -u -d 2030-06-01 +%s`
        assert_eq!(certificate_not_after(&cert).unwrap(), 1_906_502_400);

        let err = certificate_spki(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]))
            .unwrap_err();
        assert!(
            err.to_string().starts_with("parsing certificate sha256:"),
            "{err}"
        );
    }

    #[test]
    fn chain_files_are_read_and_errors_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let key = ec_key(&dir);
        let pki = Pki::new();
        let leaf = client_cert(&pki, key.as_ref());
        let leaf_pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &leaf)
        );
        let path = dir.path().join("claim.pem");
        fs::write(&path, format!("{leaf_pem}{}", pki.ca_pem())).unwrap();
        let chain = read_chain(&path).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0], leaf);

        fs::write(&path, "nothing here\n").unwrap();
        let err = read_chain(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "reading certificate chain {}: no certificates in it",
                path.display()
            )
        );

        let missing = dir.path().join("missing.pem");
        let err = read_chain(&missing).unwrap_err();
        assert!(err.to_string().starts_with(&format!(
            "reading certificate chain {}: ",
            missing.display()
        )));

        let err = parse_chain_pem(
            "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n",
            "claim certificate x",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("reading claim certificate x: certificate 1 is not valid X.509"),
            "{err}"
        );
    }

    #[test]
    fn ca_bundle_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let path = dir.path().join("ca.pem");
        fs::write(&path, pki.ca_pem()).unwrap();
        assert_eq!(ServerTrust::from_pem_file(&path).unwrap().len(), 1);

        fs::write(&path, "").unwrap();
        let err = ServerTrust::from_pem_file(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "reading CA bundle {}: no certificates in it",
                path.display()
            )
        );

        let missing = dir.path().join("none.pem");
        let err = ServerTrust::from_pem_file(&missing).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("reading CA bundle {}: ", missing.display())),
            "{err}"
        );
    }

    #[test]
    fn system_trust_store() {
        // Whether the bundle exists depends on the machine; either way the answer must be sane.
        match ServerTrust::system() {
            Ok(trust) => assert!(!trust.is_empty()),
            Err(err) => assert!(err.to_string().contains(SYSTEM_CA_BUNDLE), "{err}"),
        }
    }
}
