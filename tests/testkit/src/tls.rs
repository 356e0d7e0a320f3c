//! A TLS client for tests that talk to a server with a self-signed certificate nobody can
//! verify (iotd's onboarding server): it accepts any server certificate, still checks the
//! handshake signature, and keeps the leaf it saw (for the `tls-server-end-point` binding).

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// The leaf certificate the last handshake saw (DER).
pub type Seen = Arc<Mutex<Option<Vec<u8>>>>;

/// A client configuration that accepts any server certificate and records it in the returned
/// `Seen`.
pub fn accept_any() -> (Arc<rustls::ClientConfig>, Seen) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen: Seen = Arc::new(Mutex::new(None));
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny {
            provider,
            seen: seen.clone(),
        }))
        .with_no_client_auth();
    (Arc::new(config), seen)
}

#[derive(Debug)]
struct AcceptAny {
    provider: Arc<CryptoProvider>,
    seen: Seen,
}

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
