//! TLS as AWS IoT Core's data endpoint does it: a client certificate is required; clients are
//! identified by the certificate's fingerprint (not by chain), so certificates registered
//! without a CA work too; an expired certificate fails the handshake; SNI is required unless
//! switched off, and an IP-literal SNI counts as present.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::prelude::FromDer;

use crate::clock::Clock;

/// The ALPN protocol AWS requires for MQTT with client certificates on port 443.
pub const ALPN_MQTT_CA: &[u8] = b"x-amzn-mqtt-ca";

#[derive(Debug)]
struct FingerprintVerifier {
    clock: Arc<Clock>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for FingerprintVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        // The fake's clock, not the wall clock, so that tests can expire a claim.
        let now = self.clock.now();
        let validity = cert.validity();
        if now > validity.not_after.timestamp() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
        }
        if now < validity.not_before.timestamp() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Builds the server configuration of one listener.
pub fn server_config(
    clock: Arc<Clock>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: bool,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(FingerprintVerifier {
        clock,
        provider: provider.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    if alpn {
        config.alpn_protocols = vec![ALPN_MQTT_CA.to_vec()];
    }
    // AWS IoT does not support session tickets; stateful resumption stays rustls's default.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// What a ClientHello says about SNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sni {
    Present,
    Absent,
    /// Not a TLS ClientHello we could read; the handshake will fail on its own.
    Unreadable,
}

/// Looks for the server_name extension in the first TLS record (a ClientHello), which rustls
/// does not expose for IP literals. Needs the whole record in `buf`; `None` asks for more.
pub fn client_hello_sni(buf: &[u8]) -> Option<Sni> {
    let rd = |i: usize| buf.get(i).copied();
    let u16_at = |i: usize| Some(usize::from(u16::from_be_bytes([rd(i)?, rd(i + 1)?])));
    if buf.len() < 5 {
        return None;
    }
    if rd(0) != Some(22) {
        return Some(Sni::Unreadable);
    }
    let record_len = u16_at(3)?;
    if buf.len() < 5 + record_len {
        return None;
    }
    let body = &buf[5..5 + record_len];
    let parse = || -> Option<Sni> {
        let b = |i: usize| body.get(i).copied();
        let w = |i: usize| Some(usize::from(u16::from_be_bytes([b(i)?, b(i + 1)?])));
        if b(0)? != 1 {
            return Some(Sni::Unreadable);
        }
        // handshake header (4) + version (2) + random (32)
        let mut i = 4 + 2 + 32;
        i += 1 + usize::from(b(i)?); // session id
        i += 2 + w(i)?; // cipher suites
        i += 1 + usize::from(b(i)?); // compression methods
        let ext_end = i + 2 + w(i)?;
        i += 2;
        while i + 4 <= ext_end {
            let kind = w(i)?;
            let len = w(i + 2)?;
            if kind == 0 {
                return Some(Sni::Present);
            }
            i += 4 + len;
        }
        Some(Sni::Absent)
    };
    Some(parse().unwrap_or(Sni::Unreadable))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_foreign_data() {
        assert_eq!(client_hello_sni(&[22, 3, 1]), None);
        assert_eq!(client_hello_sni(&[0x10, 0, 0, 0, 0]), Some(Sni::Unreadable));
    }
}
