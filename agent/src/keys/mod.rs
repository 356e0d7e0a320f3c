//! Device keys behind one small trait, chosen in `main`: a P-256 key in a 0600 file (`file`),
//! or one made inside the TPM that never leaves it (`tpm`). A key signs in two places: the CSR
//! (rcgen's remote-key traits) and TLS client authentication (a rustls `SigningKey`).
//!
//! Besides the identity generations' keys (`<state>/gen/<n>/`), each backend keeps one more
//! key: the onboarding server's TLS key, in `<state>/onboarding/` (see
//! `KeyBackend::onboarding_key`). It is not a generation: `Store::generations()` lists numeric
//! names under `gen/` only, and the TPM backend never gives it a persistent handle.

use std::fmt;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod file;
pub mod tpm;

/// An error of a key operation, naming the action and the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} {key}: {message}")]
    Crypto {
        action: &'static str,
        key: String,
        message: String,
    },
    #[error("{action}: {message}")]
    Unsupported {
        action: &'static str,
        message: String,
    },
    /// The key exists on disk but its keeper can no longer use it, and never will again: the
    /// TPM was cleared or its owner changed, so the parent the key was made under is gone. The
    /// identity is lost; the agent must provision a new key.
    #[error("{action} {key}: {reason}")]
    Lost {
        action: &'static str,
        key: String,
        reason: String,
    },
}

/// A private key the agent can use but need not be able to read.
pub trait DeviceKey: Send + Sync + fmt::Debug {
    /// Where the key lives, for messages and D-Bus ("file /var/lib/iotd/gen/1/key.pem").
    fn location(&self) -> String;

    /// The public key as a DER SubjectPublicKeyInfo: compared with the issued certificate's.
    fn public_key_spki(&self) -> Vec<u8>;

    /// Signs `message` with ECDSA P-256 / SHA-256 and returns the DER signature (for the CSR).
    /// Keys that are not P-256 answer `KeyError::Unsupported`.
    fn sign_ecdsa_p256_sha256(&self, message: &[u8]) -> Result<Vec<u8>, KeyError>;

    /// The key as rustls uses it for TLS client authentication (TLS 1.2 and 1.3).
    fn tls_signing_key(&self) -> Arc<dyn rustls::sign::SigningKey>;
}

/// Creates and loads device keys of one kind, in one place.
pub trait KeyBackend: Send + Sync + fmt::Debug {
    /// "file" or "tpm".
    fn kind(&self) -> &'static str;

    /// Loads the key of generation `generation`, if it exists.
    fn load(&self, generation: u32) -> Result<Option<Arc<dyn DeviceKey>>, KeyError>;

    /// Creates a new ECDSA P-256 key for `generation`, replacing any half-made one. The key's
    /// files are written and their data synced when this returns; their directory entries
    /// become durable with `Store::sync_generation`, which the agent calls before any state it
    /// persists refers to the key.
    fn create(&self, generation: u32) -> Result<Arc<dyn DeviceKey>, KeyError>;

    /// Stores a private key the cloud generated (CreateKeysAndCertificate: PKCS#1 or PKCS#8
    /// PEM). Backends that keep keys in hardware refuse: a key that travelled is not theirs.
    fn import_pem(&self, generation: u32, pem: &str) -> Result<Arc<dyn DeviceKey>, KeyError>;

    /// Removes the key of `generation` (after a newer one took over).
    fn remove(&self, generation: u32) -> Result<(), KeyError>;

    /// The onboarding server's TLS key, made on first use and kept in `<state>/onboarding/`:
    /// a P-256 key that never signs anything but the onboarding server's TLS handshakes.
    ///
    /// (It also signs its own self-signed certificate, which the caller keeps beside it.) Later
    /// calls load the same key. Its files are written, their data and the directory synced,
    /// before this returns. A damaged key file is an error naming it, never silently replaced;
    /// a key its keeper can no longer use (a cleared TPM) is `KeyError::Lost`: the caller may
    /// then `remove_onboarding_key` and call this again for a new one. The setup code on the
    /// gateway's label does not depend on this key, so a new key costs only a new certificate.
    /// The TPM backend keeps it as a blob pair under the SRK, never at a persistent handle, in
    /// both of its modes.
    fn onboarding_key(&self) -> Result<Arc<dyn DeviceKey>, KeyError>;

    /// Removes the onboarding key's files (nothing else in `<state>/onboarding/`, such as the
    /// certificate), so that the next `onboarding_key` makes a new key. Removing a key that is
    /// not there is fine.
    fn remove_onboarding_key(&self) -> Result<(), KeyError>;

    /// How many commands the backend sent to hardware so far (the TPM's), for benchmarks.
    fn commands_issued(&self) -> Option<u64> {
        None
    }
}

/// fsync of a directory: makes a rename or a new entry in it durable.
pub(crate) fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes a key generation's directory once the backend removed its key files: only when
/// nothing else (the certificate) is left in it, then makes that durable in `<state>/gen`.
pub(crate) fn remove_generation_dir(
    state_dir: &Path,
    gen_dir: &Path,
    action: &'static str,
) -> Result<(), KeyError> {
    remove_empty_dir(&state_dir.join("gen"), gen_dir, action)
}

/// Removes `dir` (a child of `parent`) if nothing is left in it, then makes that durable in
/// `parent`. Neither being there is fine.
fn remove_empty_dir(parent: &Path, dir: &Path, action: &'static str) -> Result<(), KeyError> {
    use std::io::ErrorKind;
    match std::fs::remove_dir(dir) {
        Err(e) if !matches!(e.kind(), ErrorKind::NotFound | ErrorKind::DirectoryNotEmpty) => {
            return Err(KeyError::Io {
                action,
                path: dir.to_owned(),
                source: e,
            });
        }
        _ => {}
    }
    match sync_dir(parent) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(KeyError::Io {
            action,
            path: parent.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The onboarding key's directory below the state directory (beside `gen/`, not in it).
pub const ONBOARDING_DIR: &str = "onboarding";

/// `<state_dir>/onboarding`: where each backend keeps the onboarding key.
pub fn onboarding_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(ONBOARDING_DIR)
}

/// How to get out of a damaged onboarding key, added to the error that names its file.
pub(crate) const DAMAGED_ONBOARDING_KEY: &str = "remove this file and restart iotd: a new \
     onboarding key and certificate are made, and the setup code on the gateway's label stays \
     valid";

/// Creates `<state>/onboarding/` (0700) if missing, the state directory too (for development
/// setups; systemd normally makes it), and makes a new directory's entry durable. Errors come
/// with the path that failed.
pub(crate) fn ensure_onboarding_dir(state_dir: &Path) -> Result<PathBuf, (PathBuf, io::Error)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| (state_dir.to_path_buf(), e))?;
    let dir = onboarding_dir(state_dir);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => sync_dir(state_dir).map_err(|e| (state_dir.to_path_buf(), e))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err((dir, e)),
    }
    Ok(dir)
}

/// Removes the onboarding directory if the backend's removal of the key left it empty (the
/// certificate may still be there), durably.
pub(crate) fn remove_onboarding_dir(
    state_dir: &Path,
    action: &'static str,
) -> Result<(), KeyError> {
    remove_empty_dir(state_dir, &onboarding_dir(state_dir), action)
}
