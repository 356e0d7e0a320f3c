//! Device keys behind one small trait, chosen in `main`: a P-256 key in a 0600 file (`file`),
//! or one made inside the TPM that never leaves it (`tpm`). A key signs in two places: the CSR
//! (rcgen's remote-key traits) and TLS client authentication (a rustls `SigningKey`).

use std::fmt;
use std::path::PathBuf;
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
    state_dir: &std::path::Path,
    gen_dir: &std::path::Path,
    action: &'static str,
) -> Result<(), KeyError> {
    use std::io::ErrorKind;
    match std::fs::remove_dir(gen_dir) {
        Err(e) if !matches!(e.kind(), ErrorKind::NotFound | ErrorKind::DirectoryNotEmpty) => {
            return Err(KeyError::Io {
                action,
                path: gen_dir.to_owned(),
                source: e,
            });
        }
        _ => {}
    }
    let gen_root = state_dir.join("gen");
    match sync_dir(&gen_root) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(KeyError::Io {
            action,
            path: gen_root,
            source: e,
        }),
        _ => Ok(()),
    }
}
