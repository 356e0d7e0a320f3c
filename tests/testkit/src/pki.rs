//! A test PKI for mutual TLS: a CA (a software P-256 key) that issues a server certificate for
//! `SERVER_NAME` and client certificates for any key, given by its public key only (the CA
//! signs, so a device key in a file or in the TPM just hands over its SubjectPublicKeyInfo);
//! the rustls server configuration that trusts the CA for client certificates; and one
//! mutual-TLS connection over loopback TCP.
//!
//! rcgen is built without a crypto backend of its own here: the keys are ring's, and key
//! identifiers and serial numbers are supplied (rcgen would leave the first empty and refuse
//! without the second).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyUsagePurpose, PublicKeyData, SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ProtocolVersion, ServerConfig, SupportedProtocolVersion};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The name in the server certificate; clients connect to it.
pub const SERVER_NAME: &str = "iot.example.test";

/// id-ecPublicKey and the P-256 curve, rsaEncryption: the keys a client certificate can be for.
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// A software P-256 key for the CA and the server.
struct RingKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl RingKey {
    fn generate() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self {
            pair,
            pkcs8: pkcs8.as_ref().to_vec(),
        }
    }
}

impl PublicKeyData for RingKey {
    fn der_bytes(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for RingKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let sig = self
            .pair
            .sign(&SystemRandom::new(), msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)?;
        Ok(sig.as_ref().to_vec())
    }
}

/// The public half of a key to certify, from its DER SubjectPublicKeyInfo: an ECDSA P-256 or
/// an RSA key.
pub struct SubjectKey {
    /// The SubjectPublicKeyInfo's BIT STRING: the EC point, or the PKCS#1 RSAPublicKey.
    der: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
}

impl SubjectKey {
    /// Panics on anything but a P-256 or an RSA key.
    pub fn from_spki(spki: &[u8]) -> Self {
        let (rest, parsed) = SubjectPublicKeyInfo::from_der(spki).unwrap();
        assert!(
            rest.is_empty(),
            "trailing bytes after the SubjectPublicKeyInfo"
        );
        let algorithm = parsed.algorithm.algorithm.to_id_string();
        let curve = parsed
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|oid| oid.to_id_string());
        let algorithm = match (algorithm.as_str(), curve.as_deref()) {
            (OID_EC_PUBLIC_KEY, Some(OID_P256)) => &rcgen::PKCS_ECDSA_P256_SHA256,
            (OID_RSA, _) => &rcgen::PKCS_RSA_SHA256,
            other => panic!("no test certificates for {other:?} keys"),
        };
        Self {
            der: parsed.subject_public_key.data.to_vec(),
            algorithm,
        }
    }
}

impl PublicKeyData for SubjectKey {
    fn der_bytes(&self) -> &[u8] {
        &self.der
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

/// Certificate parameters for `key` with `subject_alt_names`, a key identifier (SHA-256 of the
/// SubjectPublicKeyInfo, truncated) and a random positive serial number.
fn params_for(key: &impl PublicKeyData, subject_alt_names: &[&str]) -> CertificateParams {
    let names = subject_alt_names
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>();
    let mut params = CertificateParams::new(names).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
    params.key_identifier_method = KeyIdMethod::PreSpecified(digest.as_ref()[..20].to_vec());
    let mut serial = [0u8; 16];
    SystemRandom::new().fill(&mut serial).unwrap();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params
}

/// A CA ("iotd test CA": every instance has the same name), and a server certificate it issued
/// for `SERVER_NAME`.
pub struct Pki {
    ca: CertifiedIssuer<'static, RingKey>,
    server_cert: CertificateDer<'static>,
    server_key: RingKey,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = RingKey::generate();
        let mut params = params_for(&ca_key, &[]);
        params
            .distinguished_name
            .push(DnType::CommonName, "iotd test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, ca_key).unwrap();

        let server_key = RingKey::generate();
        let mut params = params_for(&server_key, &[SERVER_NAME]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params.signed_by(&server_key, &ca).unwrap().der().clone();
        Self {
            ca,
            server_cert,
            server_key,
        }
    }

    /// The CA certificate, PEM (what a client trusts).
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        self.ca.der()
    }

    /// A client certificate (CN "gw1", clientAuth) for the key with SubjectPublicKeyInfo
    /// `spki`.
    pub fn client_cert(&self, spki: &[u8]) -> CertificateDer<'static> {
        self.client_cert_with(spki, |_| {})
    }

    /// A client certificate for the key with SubjectPublicKeyInfo `spki`, its parameters
    /// adjusted by `adjust` (a validity period, other names) before the CA signs.
    pub fn client_cert_with(
        &self,
        spki: &[u8],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> CertificateDer<'static> {
        let subject = SubjectKey::from_spki(spki);
        let mut params = params_for(&subject, &[]);
        params.distinguished_name.push(DnType::CommonName, "gw1");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        adjust(&mut params);
        params.signed_by(&subject, &self.ca).unwrap().der().clone()
    }

    /// A server that speaks `version` only, offers `alpn` (none if empty), and requires a
    /// client certificate issued by this CA.
    pub fn server_config(
        &self,
        version: &'static SupportedProtocolVersion,
        alpn: &[&[u8]],
    ) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let key = PrivateKeyDer::Pkcs8(self.server_key.pkcs8.clone().into());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server_cert.clone()], key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// What the server saw of one connection.
#[derive(Debug)]
pub struct Seen {
    pub client_chain: Vec<CertificateDer<'static>>,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<ProtocolVersion>,
}

/// One mutual-TLS connection over loopback TCP to `SERVER_NAME`; the client sends "ping", the
/// server answers "pong" (so the TLS 1.3 client certificate, sent after the server's Finished,
/// is checked before anything is returned). A failed handshake is an error naming the side.
pub fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Result<Seen, String> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_thread = std::thread::spawn(move || -> Result<Seen, String> {
        let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let conn = rustls::ServerConnection::new(server).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .map_err(|e| format!("server: {e}"))?;
        assert_eq!(&buf, b"ping");
        tls.write_all(b"pong").map_err(|e| format!("server: {e}"))?;
        tls.flush().map_err(|e| format!("server: {e}"))?;
        Ok(Seen {
            client_chain: tls.conn.peer_certificates().unwrap_or_default().to_vec(),
            alpn: tls.conn.alpn_protocol().map(<[u8]>::to_vec),
            version: tls.conn.protocol_version(),
        })
    });

    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    let conn = rustls::ClientConnection::new(client, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let client_result = (|| {
        tls.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)?;
        assert_eq!(&buf, b"pong");
        Ok::<_, io::Error>(())
    })();
    drop(tls);
    let seen = server_thread.join().unwrap();
    client_result.map_err(|e| format!("client: {e}"))?;
    seen
}
