//! The onboarding server's TLS identity: a self-signed certificate for the onboarding key the
//! key backend keeps (in the TPM with the TPM backend), in `<state>/onboarding/cert.pem`.
//!
//! Nobody can verify this certificate, and nobody needs to: the setup code authenticates the
//! gateway (SPAKE2+), and a client that can read the certificate binds the exchange to it
//! (`tls-server-end-point`), so a TLS-terminating relay makes the confirmation fail. It is kept
//! so that it stays the same across restarts; it is made again when it is missing or no longer
//! certifies the key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::keys::DeviceKey;

/// What the onboarding server needs for TLS.
#[derive(Debug)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// The leaf certificate (DER), for the `tls-server-end-point` binding.
    pub leaf_der: Vec<u8>,
}

/// Where the certificate is kept.
pub fn certificate_path(state_dir: &Path) -> PathBuf {
    state_dir.join("onboarding").join("cert.pem")
}

/// The certificate in `path` if it certifies `key`.
fn kept(path: &Path, key: &dyn DeviceKey) -> Option<Vec<u8>> {
    let pem = std::fs::read_to_string(path).ok()?;
    let chain = crate::tls::parse_chain_pem(&pem, "the onboarding certificate").ok()?;
    let first = chain.first()?;
    let spki = crate::tls::certificate_spki(first).ok()?;
    (spki == key.public_key_spki()).then(|| first.as_ref().to_vec())
}

/// The onboarding server's TLS configuration for `key` (the key backend's onboarding key): the
/// kept certificate, or a new one named after `serial`.
pub fn server_tls(
    state_dir: &Path,
    key: Arc<dyn DeviceKey>,
    serial: &str,
) -> Result<ServerTls, String> {
    let path = certificate_path(state_dir);
    let leaf_der = match kept(&path, key.as_ref()) {
        Some(der) => der,
        None => {
            let der = crate::csr::self_signed(
                key.as_ref(),
                &format!("iotd onboarding {serial}"),
                // A day back: a client whose clock is a little behind still sees it valid.
                time::OffsetDateTime::now_utc() - time::Duration::days(1),
            )
            .map_err(|e| e.to_string())?;
            let pem = crate::der::pem("CERTIFICATE", &der);
            if let Some(dir) = path.parent() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            crate::store::write_atomic(
                &path,
                pem.as_bytes(),
                0o644,
                crate::store::Durability::Durable,
            )
            .map_err(|e| format!("keeping the onboarding certificate: {e}"))?;
            tracing::info!(path = %path.display(), "made the onboarding certificate");
            der
        }
    };
    let certified = Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(leaf_der.clone())],
        key.tls_signing_key(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("setting up the onboarding server's TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Always(certified)));
    Ok(ServerTls {
        config: Arc::new(config),
        leaf_der,
    })
}

/// The one certificate, whatever the client asks for (it reaches the gateway by address).
#[derive(Debug)]
struct Always(Arc<CertifiedKey>);

impl ResolvesServerCert for Always {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::keys::file::FileKey;

    fn key() -> Arc<dyn DeviceKey> {
        Arc::new(
            FileKey::from_pem(
                crate::keys::file::testdata::EC_SEC1_PEM,
                Path::new("onboarding key"),
            )
            .unwrap(),
        )
    }

    #[test]
    fn the_certificate_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = server_tls(dir.path(), key(), "GW-1").unwrap();
        let again = server_tls(dir.path(), key(), "GW-1").unwrap();
        assert_eq!(first.leaf_der, again.leaf_der, "the same across restarts");
        let spki =
            crate::tls::certificate_spki(&CertificateDer::from(first.leaf_der.clone())).unwrap();
        assert_eq!(spki, key().public_key_spki());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(certificate_path(dir.path()))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_certificate_for_another_key_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let other = crate::keys::file::FileBackend::new(dir.path());
        let other_key = crate::keys::KeyBackend::create(&other, 1).unwrap();
        let old = server_tls(dir.path(), other_key, "GW-1").unwrap();
        let new = server_tls(dir.path(), key(), "GW-1").unwrap();
        assert_ne!(old.leaf_der, new.leaf_der);
        std::fs::write(certificate_path(dir.path()), "damaged").unwrap();
        let remade = server_tls(dir.path(), key(), "GW-1").unwrap();
        assert_ne!(remade.leaf_der, Vec::<u8>::new());
    }
}
