//! The `file` key backend: the device key is a PEM file, mode 0600, at
//! `<state_dir>/gen/<generation>/key.pem`; the onboarding server's TLS key (a P-256 key made on
//! first use) at `<state_dir>/onboarding/key.pem`, mode 0600 in a 0700 directory.
//!
//! Keys this backend creates are ECDSA P-256 (PKCS#8). Imported keys (AWS's
//! CreateKeysAndCertificate returns RSA-2048 as PKCS#1) are stored in the encoding they came in,
//! re-armoured so that only the key block lands on disk. Any key rustls can sign with works for
//! TLS; only P-256 keys can sign a CSR.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::SigningKey;

use super::{
    DAMAGED_ONBOARDING_KEY, DeviceKey, KeyBackend, KeyError, ensure_onboarding_dir, onboarding_dir,
    remove_generation_dir, remove_onboarding_dir, sync_dir,
};

/// The DER of a P-256 SubjectPublicKeyInfo up to the uncompressed point: SEQUENCE {
/// SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) }. DER is canonical, so
/// every P-256 SPKI with an uncompressed point is exactly this prefix plus the 65-byte point.
pub const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The length of an uncompressed P-256 point (0x04 || x || y).
const P256_POINT_LEN: usize = 65;

/// The SubjectPublicKeyInfo DER of a P-256 public key given as its uncompressed point; `None`
/// if `point` is not one. Also for other backends (the TPM gives the point).
pub fn p256_spki(point: &[u8]) -> Option<Vec<u8>> {
    if point.len() != P256_POINT_LEN || point.first() != Some(&0x04) {
        return None;
    }
    let mut spki = P256_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(point);
    Some(spki)
}

/// The uncompressed point inside a P-256 SubjectPublicKeyInfo; `None` for any other key.
pub fn p256_point(spki: &[u8]) -> Option<&[u8]> {
    let point = spki.strip_prefix(&P256_SPKI_PREFIX[..])?;
    (point.len() == P256_POINT_LEN && point.first() == Some(&0x04)).then_some(point)
}

const KEY_FILE: &str = "key.pem";
/// One fixed temporary name per generation: a stale one (power cut mid-write) is removed before
/// the next write, and a concurrent writer fails on `create_new` instead of mixing files.
const KEY_TEMP_FILE: &str = ".key.pem.tmp";

/// Device keys as PEM files under the state directory.
#[derive(Debug, Clone)]
pub struct FileBackend {
    /// The state directory (`/var/lib/iotd`); keys go to `gen/<n>/key.pem` below it.
    dir: PathBuf,
    /// Held by `onboarding_key` and `remove_onboarding_key`: two first uses at once make one
    /// key, not two racing for the file.
    onboarding: Arc<Mutex<()>>,
}

impl FileBackend {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.to_path_buf(),
            onboarding: Arc::default(),
        }
    }

    /// `<state_dir>/onboarding/key.pem`: the onboarding server's TLS key.
    pub fn onboarding_key_path(&self) -> PathBuf {
        onboarding_dir(&self.dir).join(KEY_FILE)
    }

    /// `<state_dir>/gen/<generation>`.
    pub fn generation_dir(&self, generation: u32) -> PathBuf {
        self.dir.join("gen").join(generation.to_string())
    }

    /// `<state_dir>/gen/<generation>/key.pem`.
    pub fn key_path(&self, generation: u32) -> PathBuf {
        self.generation_dir(generation).join(KEY_FILE)
    }

    /// Creates `gen/` and `gen/<n>/` (0700) if missing. The new entries become durable with
    /// `Store::sync_generation`, which the agent calls before any state refers to the key.
    fn ensure_generation_dir(&self, generation: u32) -> Result<PathBuf, KeyError> {
        const ACTION: &str = "creating key directory";
        let io_err = |path: &Path, source| KeyError::Io {
            action: ACTION,
            path: path.to_path_buf(),
            source,
        };
        // The state directory itself is normally made by systemd (StateDirectory=) or the
        // package; create it for development setups, private like the rest.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| io_err(&self.dir, e))?;
        let gen_root = self.dir.join("gen");
        let gen_dir = self.generation_dir(generation);
        for dir in [&gen_root, &gen_dir] {
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(io_err(dir, e)),
            }
        }
        Ok(gen_dir)
    }

    /// Writes `pem` to `gen/<n>/key.pem` atomically (`write_key_file`). The rename is made
    /// durable with the generation's other entries by `Store::sync_generation` (one directory
    /// sync per persisted step, not one per file).
    fn write_key(
        &self,
        generation: u32,
        action: &'static str,
        pem: &[u8],
    ) -> Result<PathBuf, KeyError> {
        let gen_dir = self.ensure_generation_dir(generation)?;
        write_key_file(&gen_dir, action, pem)
    }
}

/// A new ECDSA P-256 key (PKCS#8) that will be stored at `path`, and its PEM.
fn generate_p256(path: &Path, action: &'static str) -> Result<(FileKey, String), KeyError> {
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).map_err(|_| {
            KeyError::Crypto {
                action,
                key: path.display().to_string(),
                message: "ring could not generate a P-256 key".into(),
            }
        })?;
    let der = PrivateKeyDer::Pkcs8(pkcs8.as_ref().to_vec().into());
    let key = FileKey::from_der(&der, path, action)?;
    Ok((key, crate::der::pem("PRIVATE KEY", pkcs8.as_ref())))
}

/// Writes `pem` to `<dir>/key.pem` atomically: a 0600 temporary file (never readable by others,
/// not even for an instant), fsync, rename over the key. Syncing `dir` (making the rename
/// durable) is the caller's.
fn write_key_file(dir: &Path, action: &'static str, pem: &[u8]) -> Result<PathBuf, KeyError> {
    let path = dir.join(KEY_FILE);
    let temp = dir.join(KEY_TEMP_FILE);
    let io_err = |path: &Path, source| KeyError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };

    remove_if_exists(&temp).map_err(|e| io_err(&temp, e))?;
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(pem)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(io_err(&temp, e));
    }
    if let Err(e) = fs::rename(&temp, &path) {
        let _ = fs::remove_file(&temp);
        return Err(io_err(&path, e));
    }
    Ok(path)
}

impl KeyBackend for FileBackend {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn load(&self, generation: u32) -> Result<Option<Arc<dyn DeviceKey>>, KeyError> {
        let path = self.key_path(generation);
        match FileKey::read_if_exists(&path, "loading device key")? {
            Some(key) => Ok(Some(Arc::new(key))),
            None => Ok(None),
        }
    }

    fn create(&self, generation: u32) -> Result<Arc<dyn DeviceKey>, KeyError> {
        const ACTION: &str = "creating device key";
        let path = self.key_path(generation);
        let (key, pem) = generate_p256(&path, ACTION)?;
        self.write_key(generation, ACTION, pem.as_bytes())?;
        tracing::info!(path = %path.display(), "created ECDSA P-256 device key");
        Ok(Arc::new(key))
    }

    fn import_pem(&self, generation: u32, pem: &str) -> Result<Arc<dyn DeviceKey>, KeyError> {
        const ACTION: &str = "importing device key";
        let path = self.key_path(generation);
        // Validate before writing: a key rustls cannot use must not replace anything on disk.
        let der = parse_pem_key(pem.as_bytes(), &path, ACTION)?;
        let key = FileKey::from_der(&der, &path, ACTION)?;
        let label = match &der {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        let armored = crate::der::pem(label, der.secret_der());
        self.write_key(generation, ACTION, armored.as_bytes())?;
        tracing::info!(path = %path.display(), algorithm = key.algorithm, "imported device key");
        Ok(Arc::new(key))
    }

    fn remove(&self, generation: u32) -> Result<(), KeyError> {
        const ACTION: &str = "removing device key";
        let gen_dir = self.generation_dir(generation);
        for name in [KEY_FILE, KEY_TEMP_FILE] {
            let path = gen_dir.join(name);
            remove_if_exists(&path).map_err(|source| KeyError::Io {
                action: ACTION,
                path,
                source,
            })?;
        }
        remove_generation_dir(&self.dir, &gen_dir, ACTION)
    }

    fn onboarding_key(&self) -> Result<Arc<dyn DeviceKey>, KeyError> {
        const LOADING: &str = "loading the onboarding key";
        const CREATING: &str = "creating the onboarding key";
        let _making = self
            .onboarding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.onboarding_key_path();
        // A file that is there but unusable is the operator's to remove: replacing it here
        // would hide whatever damaged it.
        let damaged = |message: String| KeyError::Crypto {
            action: LOADING,
            key: path.display().to_string(),
            message: format!("{message}; {DAMAGED_ONBOARDING_KEY}"),
        };
        match FileKey::read_if_exists(&path, LOADING) {
            Ok(Some(key)) if key.p256.is_some() => return Ok(Arc::new(key)),
            Ok(Some(key)) => {
                return Err(damaged(format!("{}, not ECDSA P-256", key.algorithm)));
            }
            Ok(None) => {}
            Err(KeyError::Crypto { message, .. }) => return Err(damaged(message)),
            Err(other) => return Err(other),
        }

        let (key, pem) = generate_p256(&path, CREATING)?;
        let io_err = |(path, source)| KeyError::Io {
            action: CREATING,
            path,
            source,
        };
        let dir = ensure_onboarding_dir(&self.dir).map_err(io_err)?;
        write_key_file(&dir, CREATING, pem.as_bytes())?;
        sync_dir(&dir).map_err(|e| io_err((dir.clone(), e)))?;
        tracing::info!(path = %path.display(), "created the onboarding server's ECDSA P-256 key");
        Ok(Arc::new(key))
    }

    fn remove_onboarding_key(&self) -> Result<(), KeyError> {
        const ACTION: &str = "removing the onboarding key";
        let _making = self
            .onboarding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = onboarding_dir(&self.dir);
        let mut removed = false;
        for name in [KEY_FILE, KEY_TEMP_FILE] {
            let path = dir.join(name);
            removed |= path.exists();
            remove_if_exists(&path).map_err(|source| KeyError::Io {
                action: ACTION,
                path,
                source,
            })?;
        }
        if removed {
            sync_dir(&dir).map_err(|source| KeyError::Io {
                action: ACTION,
                path: dir.clone(),
                source,
            })?;
            tracing::info!(path = %dir.join(KEY_FILE).display(), "removed the onboarding key");
        }
        remove_onboarding_dir(&self.dir, ACTION)
    }
}

/// Loads a key file that must exist and that the agent never writes: the claim key named in
/// the configuration. Same formats as `import_pem`; errors name the file.
pub fn load_pem_file(path: &Path) -> Result<Arc<dyn DeviceKey>, KeyError> {
    Ok(Arc::new(FileKey::read(path)?))
}

/// A private key read from a PEM file. Also used for the claim key, which lives outside the
/// state directory and is never written by the agent.
pub struct FileKey {
    path: PathBuf,
    /// "ECDSA P-256", "RSA", ...: for messages.
    algorithm: &'static str,
    /// Present for P-256 keys only: the CSR signer.
    p256: Option<EcdsaKeyPair>,
    tls: Arc<dyn SigningKey>,
    spki: Vec<u8>,
}

impl FileKey {
    /// Reads the key at `path`, which must exist (the claim key named in the configuration).
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        const ACTION: &str = "loading key";
        Self::read_if_exists(path, ACTION)?.ok_or_else(|| KeyError::Io {
            action: ACTION,
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        })
    }

    /// Parses a PEM private key; `path` names it in messages.
    pub fn from_pem(pem: &str, path: &Path) -> Result<Self, KeyError> {
        const ACTION: &str = "loading key";
        let der = parse_pem_key(pem.as_bytes(), path, ACTION)?;
        Self::from_der(&der, path, ACTION)
    }

    /// The file the key is (or will be) stored in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// "ECDSA P-256", "RSA", "ECDSA (not P-256)" or "Ed25519".
    pub fn algorithm(&self) -> &'static str {
        self.algorithm
    }

    fn read_if_exists(path: &Path, action: &'static str) -> Result<Option<Self>, KeyError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(KeyError::Io {
                    action,
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        // A key others can read may already be compromised; say so, but keep working: refusing
        // would take the gateway offline for a permissions slip.
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "private key file is accessible by group or others"
            );
        }
        let der = parse_pem_key(&bytes, path, action)?;
        Self::from_der(&der, path, action).map(Some)
    }

    fn from_der(
        der: &PrivateKeyDer<'_>,
        path: &Path,
        action: &'static str,
    ) -> Result<Self, KeyError> {
        let crypto_err = |message: String| KeyError::Crypto {
            action,
            key: path.display().to_string(),
            message,
        };
        let tls = rustls::crypto::ring::sign::any_supported_type(der).map_err(|_| {
            crypto_err("not an RSA, ECDSA or Ed25519 private key usable for TLS".into())
        })?;
        let p256 = load_p256(der);
        let spki = match &p256 {
            Some(pair) => p256_spki(pair.public_key().as_ref()),
            None => tls.public_key().map(|spki| spki.as_ref().to_vec()),
        }
        .ok_or_else(|| crypto_err("cannot derive the public key".into()))?;
        let algorithm = match (&p256, tls.algorithm()) {
            (Some(_), _) => "ECDSA P-256",
            (None, rustls::SignatureAlgorithm::RSA) => "RSA",
            (None, rustls::SignatureAlgorithm::ECDSA) => "ECDSA (not P-256)",
            (None, rustls::SignatureAlgorithm::ED25519) => "Ed25519",
            (None, _) => "unknown",
        };
        Ok(Self {
            path: path.to_path_buf(),
            algorithm,
            p256,
            tls,
            spki,
        })
    }
}

impl fmt::Debug for FileKey {
    // Only where the key is and what it is: never any of its bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileKey")
            .field("path", &self.path)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl DeviceKey for FileKey {
    fn location(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn public_key_spki(&self) -> Vec<u8> {
        self.spki.clone()
    }

    fn sign_ecdsa_p256_sha256(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        const ACTION: &str = "signing with ECDSA P-256";
        let Some(pair) = &self.p256 else {
            return Err(KeyError::Unsupported {
                action: ACTION,
                message: format!(
                    "the key {} is {}, not ECDSA P-256",
                    self.path.display(),
                    self.algorithm
                ),
            });
        };
        let signature = pair
            .sign(&SystemRandom::new(), message)
            .map_err(|_| KeyError::Crypto {
                action: ACTION,
                key: self.path.display().to_string(),
                message: "ring could not sign".into(),
            })?;
        Ok(signature.as_ref().to_vec())
    }

    fn tls_signing_key(&self) -> Arc<dyn SigningKey> {
        self.tls.clone()
    }
}

/// The first private key in `pem` (PKCS#1, PKCS#8 or SEC1); other blocks are skipped.
fn parse_pem_key(
    pem: &[u8],
    path: &Path,
    action: &'static str,
) -> Result<PrivateKeyDer<'static>, KeyError> {
    let crypto_err = |message: String| KeyError::Crypto {
        action,
        key: path.display().to_string(),
        message,
    };
    match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(der)) => Ok(der),
        Ok(None) => Err(crypto_err("not a PEM private key".into())),
        Err(e) => Err(crypto_err(format!("not a PEM private key ({e})"))),
    }
}

/// The key as a ring P-256 signer, if it is one. ring reads PKCS#8 only, so SEC1 is wrapped
/// into PKCS#8 first (what rustls does internally as well).
fn load_p256(der: &PrivateKeyDer<'_>) -> Option<EcdsaKeyPair> {
    let rng = SystemRandom::new();
    match der {
        PrivateKeyDer::Pkcs8(pkcs8) => EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .ok(),
        PrivateKeyDer::Sec1(sec1) => {
            // PrivateKeyInfo ::= SEQUENCE { version 0, AlgorithmIdentifier { id-ecPublicKey,
            // prime256v1 }, OCTET STRING { ECPrivateKey } }
            const VERSION_AND_ALGORITHM: &[u8] = &[
                0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
                0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
            ];
            let mut body = VERSION_AND_ALGORITHM.to_vec();
            body.extend(crate::der::tlv(0x04, sec1.secret_sec1_der()));
            let pkcs8 = crate::der::tlv(0x30, &body);
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng).ok()
        }
        _ => None,
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Throwaway test keys (generated once with openssl for these tests; they protect nothing).
#[cfg(test)]
pub(crate) mod testdata {
    /// `openssl genrsa -traditional 2048`: what CreateKeysAndCertificate hands out.
    pub const RSA_PKCS1_PEM: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEAtvkXMtffmi2ITnZbO+fgDeVof2UEaEc4bwcl6Iuclj4d71Tu
civ6C4S2NQxN1QKQ+9WVV1g31DYnbNwrKsUa+T1/y639nHF/xYvapSqAvSFzUNC0
wTem6s29bMmvB3o2t9jhx8YgjscuJZd69Qo5Rt1LeD5rT+ipzUhlFo74FX6QQch0
3J50miAzZBrQ5LBgyONnBYnHPsOkbkzv271r2PF7ZPgFFmgzvCKzJl2HU7s3XwFM
J4ad/9i3czxDipIzYjyb+ZGeR3hBvXvJ/1wQMhTV4vDIqoyL2YRecnzgbjhPRhny
ouLT022+fbw5tqwpG6g+wdHNwBKM5ReXY9nx4wIDAQABAoIBABGyTLqXo2Izhivk
iZVlK0fcyLsNh5wYS059t/5iRl5HmriTk85KD5B+oOrHil2QNnqM4TlF6HxnUm/W
aXxk/ONfPdVyugUf+xYdnSN9VV81dYQ680h+u++Yv3nelcWY3eLxIIEkWfDFNeLf
4D4D459Fdu+lxdZAL/ARUOmaIUdewJnSZY8QnFW+FgWUOAPbT87HfyrXDSP5XDHa
rD4d0oDz9GRPZMFSjXMY+NbnSppH2A4kD1EVHb5vJtgZSsCV3vAd2QsHyuDApT9T
6exbfulR1dvi+8S3LtqSz6T2U9GBEtUCKLb7ApoiFvrxMFm2q7xssBNaDZigLdFX
JmlLFCUCgYEA9iLLkmCwy4COg2bHGTGz4AjjYWpARG6RPgJOfN1vn67Is0NnZwC3
G7DtxkN+Av1g1QMyzEtTQoBWqcqpBj45GdMKqZ62TLWbuUp2t9KHo0v64+42w74B
qpfevaDO80Ijb8We0JYKwEYkkscsBivWnLH6gcTdhLBhGH1npPY27c0CgYEAvk5I
S0rzcKnWrgtU/GqeK3yuVtA/UFO9q/D6JNnUsF3Wap84kZ3EXkXK+D2E2GwlBJkm
yiDNce5/re22zqPIh5jlm1LOUT6uY7zSk2LKo/7jwd1t10wu+VZrhWeZ5x7rXFaU
JPkBIKbsrWsSMuZp0LSKhRG1Yg3nrZLX4XKGLm8CgYBa7rfuuDIYvMHp4cqkkCw4
FJCMqMhdf8vA8PE2SEi44cXcFIbbEvSTEmaF3OFtEVb421mlCB8WbnuV9v1DBTHr
TICf8ba/2EhTyCLb/reFqMhj9Nnerw/Gip0LyaErVb/px0TJIuWN61wPre2hyghb
k5VM5AJCxzbX6VylISFh8QKBgAzYq/ipLpXEYUGOckY3zEWTPRGPLTb28C7TLY+f
RMRDEV5RMThjNgZHH9RyEq2pXzZYQE4UuMmgF+5dxaFdXQQKRjWd+V9yo8MH1A8u
9A7t/eHwWKHX+rPKKafvvmvjom+xSH7WcEUL/54VRD07YJk+Fru03lGoLqOA7iHB
4VzxAoGAN5CsL4WTAInmTLKoSpSVjtcKBiRJ0c1lIjPrfhZyX0wQwuobDkqR9MNy
3Awwz1Xs0fkZByWpVTsuXbloC2I6iF0Av7WIy7WqN5I11lW7KjzL2vlUjjQPpDnl
NwYrAukDqHfhy5IzShQRmaVpI7qxy3vD/r4iHlJ3wlGiSAc0vY0=
-----END RSA PRIVATE KEY-----
";

    /// The same RSA key as PKCS#8 (`openssl pkcs8 -topk8 -nocrypt`).
    pub const RSA_PKCS8_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQC2+Rcy19+aLYhO
dls75+AN5Wh/ZQRoRzhvByXoi5yWPh3vVO5yK/oLhLY1DE3VApD71ZVXWDfUNids
3CsqxRr5PX/Lrf2ccX/Fi9qlKoC9IXNQ0LTBN6bqzb1sya8Heja32OHHxiCOxy4l
l3r1CjlG3Ut4PmtP6KnNSGUWjvgVfpBByHTcnnSaIDNkGtDksGDI42cFicc+w6Ru
TO/bvWvY8Xtk+AUWaDO8IrMmXYdTuzdfAUwnhp3/2LdzPEOKkjNiPJv5kZ5HeEG9
e8n/XBAyFNXi8MiqjIvZhF5yfOBuOE9GGfKi4tPTbb59vDm2rCkbqD7B0c3AEozl
F5dj2fHjAgMBAAECggEAEbJMupejYjOGK+SJlWUrR9zIuw2HnBhLTn23/mJGXkea
uJOTzkoPkH6g6seKXZA2eozhOUXofGdSb9ZpfGT841891XK6BR/7Fh2dI31VXzV1
hDrzSH6775i/ed6VxZjd4vEggSRZ8MU14t/gPgPjn0V276XF1kAv8BFQ6ZohR17A
mdJljxCcVb4WBZQ4A9tPzsd/KtcNI/lcMdqsPh3SgPP0ZE9kwVKNcxj41udKmkfY
DiQPURUdvm8m2BlKwJXe8B3ZCwfK4MClP1Pp7Ft+6VHV2+L7xLcu2pLPpPZT0YES
1QIotvsCmiIW+vEwWbarvGywE1oNmKAt0VcmaUsUJQKBgQD2IsuSYLDLgI6DZscZ
MbPgCONhakBEbpE+Ak583W+frsizQ2dnALcbsO3GQ34C/WDVAzLMS1NCgFapyqkG
PjkZ0wqpnrZMtZu5Sna30oejS/rj7jbDvgGql969oM7zQiNvxZ7QlgrARiSSxywG
K9acsfqBxN2EsGEYfWek9jbtzQKBgQC+TkhLSvNwqdauC1T8ap4rfK5W0D9QU72r
8Pok2dSwXdZqnziRncReRcr4PYTYbCUEmSbKIM1x7n+t7bbOo8iHmOWbUs5RPq5j
vNKTYsqj/uPB3W3XTC75VmuFZ5nnHutcVpQk+QEgpuytaxIy5mnQtIqFEbViDeet
ktfhcoYubwKBgFrut+64Mhi8wenhyqSQLDgUkIyoyF1/y8Dw8TZISLjhxdwUhtsS
9JMSZoXc4W0RVvjbWaUIHxZue5X2/UMFMetMgJ/xtr/YSFPIItv+t4WoyGP02d6v
D8aKnQvJoStVv+nHRMki5Y3rXA+t7aHKCFuTlUzkAkLHNtfpXKUhIWHxAoGADNir
+KkulcRhQY5yRjfMRZM9EY8tNvbwLtMtj59ExEMRXlExOGM2Bkcf1HISralfNlhA
ThS4yaAX7l3FoV1dBApGNZ35X3KjwwfUDy70Du394fBYodf6s8opp+++a+Oib7FI
ftZwRQv/nhVEPTtgmT4Wu7TeUaguo4DuIcHhXPECgYA3kKwvhZMAieZMsqhKlJWO
1woGJEnRzWUiM+t+FnJfTBDC6hsOSpH0w3LcDDDPVezR+RkHJalVOy5duWgLYjqI
XQC/tYjLtao3kjXWVbsqPMva+VSONA+kOeU3BisC6QOod+HLkjNKFBGZpWkjurHL
e8P+viIeUnfCUaJIBzS9jQ==
-----END PRIVATE KEY-----
";

    /// `openssl ecparam -name prime256v1 -genkey -noout`: SEC1 with parameters and public key.
    pub const EC_SEC1_PEM: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIBX74c+uReUylekV8cEuuL4rgGTzo2Tg6QAgYwvkjj/joAoGCCqGSM49
AwEHoUQDQgAENl96HB8UtERexMSyoudwfrPkg+YzbVVLxATgXU1OiyxnLmSjzLIq
35dvKrBrP7GHGV/ma3UQ5QvigXaA/62fEg==
-----END EC PRIVATE KEY-----
";
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};

    use super::testdata::{EC_SEC1_PEM, RSA_PKCS1_PEM, RSA_PKCS8_PEM};
    use super::*;

    fn backend() -> (tempfile::TempDir, FileBackend) {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::new(dir.path());
        (dir, backend)
    }

    fn verify_p256(key: &dyn DeviceKey, message: &[u8], signature: &[u8]) {
        let spki = key.public_key_spki();
        let point = p256_point(&spki).expect("a P-256 SPKI");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(message, signature)
            .expect("the signature verifies with the SPKI's key");
    }

    #[test]
    fn create_then_load_round_trips() {
        let (_dir, backend) = backend();
        assert_eq!(backend.kind(), "file");
        assert!(backend.load(1).unwrap().is_none(), "no key before create");

        let created = backend.create(1).unwrap();
        let loaded = backend.load(1).unwrap().expect("the key after create");
        assert_eq!(created.public_key_spki(), loaded.public_key_spki());
        assert_eq!(
            loaded.location(),
            format!("file {}", backend.key_path(1).display())
        );

        // The loaded key signs, and what it signs verifies with the created key's public key.
        let signature = loaded.sign_ecdsa_p256_sha256(b"hello").unwrap();
        verify_p256(created.as_ref(), b"hello", &signature);

        let pem = fs::read_to_string(backend.key_path(1)).unwrap();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
            "{pem:.30}"
        );
    }

    #[test]
    fn p256_spki_matches_rustls_encoding() {
        // Our fixed-prefix SPKI and the one rustls derives must agree, or the certificate check
        // (certificate SPKI == key SPKI) would fail for a correct certificate.
        let (_dir, backend) = backend();
        let key = backend.create(1).unwrap();
        let from_rustls = key
            .tls_signing_key()
            .public_key()
            .unwrap()
            .as_ref()
            .to_vec();
        assert_eq!(key.public_key_spki(), from_rustls);
        assert_eq!(key.public_key_spki().len(), 91);
    }

    #[test]
    fn create_replaces_a_half_made_key_and_leaves_no_temp_file() {
        let (_dir, backend) = backend();
        let gen_dir = backend.generation_dir(3);
        fs::create_dir_all(&gen_dir).unwrap();
        fs::write(gen_dir.join(KEY_TEMP_FILE), b"partial").unwrap();
        fs::write(gen_dir.join(KEY_FILE), b"garbage").unwrap();

        let key = backend.create(3).unwrap();
        assert!(!gen_dir.join(KEY_TEMP_FILE).exists());
        let loaded = backend.load(3).unwrap().unwrap();
        assert_eq!(key.public_key_spki(), loaded.public_key_spki());
    }

    #[test]
    fn key_file_is_0600_and_directories_0700() {
        let (dir, backend) = backend();
        backend.create(7).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&backend.key_path(7)), 0o600);
        assert_eq!(mode(&backend.generation_dir(7)), 0o700);
        assert_eq!(mode(&dir.path().join("gen")), 0o700);
    }

    #[test]
    fn imports_pkcs1_rsa_as_aws_returns_it() {
        let (_dir, backend) = backend();
        let key = backend.import_pem(2, RSA_PKCS1_PEM).unwrap();
        assert_eq!(
            key.tls_signing_key().algorithm(),
            rustls::SignatureAlgorithm::RSA
        );

        let stored = fs::read_to_string(backend.key_path(2)).unwrap();
        assert!(stored.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        assert_eq!(
            fs::metadata(backend.key_path(2)).unwrap().mode() & 0o777,
            0o600
        );

        let loaded = backend.load(2).unwrap().unwrap();
        assert_eq!(key.public_key_spki(), loaded.public_key_spki());
        // An RSA SPKI starts with SEQUENCE and contains rsaEncryption (1.2.840.113549.1.1.1).
        let rsa_oid = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
        assert!(
            loaded
                .public_key_spki()
                .windows(rsa_oid.len())
                .any(|w| w == rsa_oid)
        );

        let err = loaded.sign_ecdsa_p256_sha256(b"csr").unwrap_err();
        assert!(matches!(err, KeyError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn imports_pkcs8_rsa_with_the_same_public_key() {
        let (_dir, backend) = backend();
        let pkcs1 = backend.import_pem(1, RSA_PKCS1_PEM).unwrap();
        let pkcs8 = backend.import_pem(2, RSA_PKCS8_PEM).unwrap();
        assert_eq!(pkcs1.public_key_spki(), pkcs8.public_key_spki());
        let stored = fs::read_to_string(backend.key_path(2)).unwrap();
        assert!(stored.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    }

    #[test]
    fn imports_sec1_ec_and_signs_with_it() {
        let (_dir, backend) = backend();
        let key = backend.import_pem(4, EC_SEC1_PEM).unwrap();
        let stored = fs::read_to_string(backend.key_path(4)).unwrap();
        assert!(stored.starts_with("-----BEGIN EC PRIVATE KEY-----\n"));

        let loaded = backend.load(4).unwrap().unwrap();
        assert_eq!(key.public_key_spki(), loaded.public_key_spki());
        let signature = loaded.sign_ecdsa_p256_sha256(b"message").unwrap();
        verify_p256(key.as_ref(), b"message", &signature);
    }

    #[test]
    fn import_keeps_only_the_key_block() {
        let (_dir, backend) = backend();
        let pem = format!(
            "some text\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n{EC_SEC1_PEM}"
        );
        backend.import_pem(1, &pem).unwrap();
        let stored = fs::read_to_string(backend.key_path(1)).unwrap();
        assert_eq!(stored, EC_SEC1_PEM);
    }

    #[test]
    fn import_of_garbage_writes_nothing() {
        let (_dir, backend) = backend();
        let err = backend
            .import_pem(
                1,
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            )
            .unwrap_err();
        assert!(err.to_string().contains("not a PEM private key"), "{err}");
        assert!(!backend.key_path(1).exists());

        // A well-formed PEM block whose content is not a key.
        let err = backend
            .import_pem(
                1,
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            )
            .unwrap_err();
        assert!(
            err.to_string().starts_with("importing device key "),
            "{err}"
        );
        assert!(!backend.key_path(1).exists());
    }

    #[test]
    fn corrupt_key_file_error_names_the_path() {
        let (_dir, backend) = backend();
        let path = backend.key_path(1);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "this is not a key\n").unwrap();
        let err = backend.load(1).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "loading device key {}: not a PEM private key",
                path.display()
            )
        );

        // Valid PEM armour, truncated key inside.
        fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nMIIBAA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = backend.load(1).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("loading device key {}: ", path.display())),
            "{err}"
        );
    }

    #[test]
    fn unreadable_key_file_is_an_error_not_absent() {
        let (_dir, backend) = backend();
        let path = backend.key_path(1);
        // A directory where the file should be: reading fails with something other than NotFound.
        fs::create_dir_all(&path).unwrap();
        let err = backend.load(1).unwrap_err();
        assert!(matches!(err, KeyError::Io { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn remove_deletes_the_key_and_the_empty_generation_dir() {
        let (_dir, backend) = backend();
        backend.create(1).unwrap();
        backend.create(2).unwrap();
        fs::write(backend.generation_dir(2).join("cert.pem"), "cert").unwrap();

        backend.remove(1).unwrap();
        assert!(!backend.generation_dir(1).exists());
        backend.remove(2).unwrap();
        assert!(!backend.key_path(2).exists());
        assert!(
            backend.generation_dir(2).join("cert.pem").exists(),
            "other files stay"
        );
        // Removing what is not there is fine: a retried cleanup after a crash.
        backend.remove(1).unwrap();
        backend.remove(9).unwrap();
        assert!(backend.load(1).unwrap().is_none());
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let (_dir, backend) = backend();
        let created = backend.create(1).unwrap();
        let imported = backend.import_pem(2, RSA_PKCS1_PEM).unwrap();
        let stored = fs::read_to_string(backend.key_path(1)).unwrap();
        for (key, pem) in [(created, stored.as_str()), (imported, RSA_PKCS1_PEM)] {
            let der = rustls_pemfile::private_key(&mut pem.as_bytes())
                .unwrap()
                .unwrap();
            let debug = format!("{key:?} {:?} {backend:?}", key.tls_signing_key());
            assert!(debug.contains("FileKey"), "{debug}");
            let base64_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            for window in base64_body.as_bytes().chunks(12) {
                assert!(
                    !debug.contains(std::str::from_utf8(window).unwrap()),
                    "{debug}"
                );
            }
            let der_hex = hex::encode(der.secret_der());
            for window in der_hex.as_bytes().chunks(16) {
                assert!(
                    !debug
                        .to_lowercase()
                        .contains(std::str::from_utf8(window).unwrap()),
                    "{debug}"
                );
            }
        }
    }

    #[test]
    fn file_key_read_reports_missing_file() {
        let (dir, _backend) = backend();
        let path = dir.path().join("claim.key");
        let err = FileKey::read(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("loading key {}", path.display())),
            "{err}"
        );
        fs::write(&path, EC_SEC1_PEM).unwrap();
        let key = FileKey::read(&path).unwrap();
        assert_eq!(key.algorithm(), "ECDSA P-256");
        assert_eq!(key.path(), path);
        assert_eq!(
            load_pem_file(&path).unwrap().location(),
            format!("file {}", path.display())
        );
    }

    #[test]
    fn onboarding_key_is_made_once_then_loaded() {
        let (dir, backend) = backend();
        let path = backend.onboarding_key_path();
        assert_eq!(path, dir.path().join("onboarding").join("key.pem"));
        assert!(!path.exists());

        let made = backend.onboarding_key().unwrap();
        assert_eq!(made.location(), format!("file {}", path.display()));
        let again = backend.onboarding_key().unwrap();
        assert_eq!(
            again.public_key_spki(),
            made.public_key_spki(),
            "loaded, not made again"
        );
        // A new process (a new backend) loads the same key.
        let restarted = FileBackend::new(dir.path()).onboarding_key().unwrap();
        assert_eq!(restarted.public_key_spki(), made.public_key_spki());

        // P-256: it signs for rcgen and for rustls (server authentication), with one public key.
        assert_eq!(made.public_key_spki().len(), 91);
        let signature = restarted.sign_ecdsa_p256_sha256(b"certificate").unwrap();
        verify_p256(made.as_ref(), b"certificate", &signature);
        let tls = restarted.tls_signing_key();
        assert_eq!(tls.algorithm(), rustls::SignatureAlgorithm::ECDSA);
        assert_eq!(tls.public_key().unwrap().as_ref(), made.public_key_spki());
        assert!(
            tls.choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
                .is_some()
        );

        // Private: 0700 directory, 0600 key, PKCS#8, nothing left behind, no generation made.
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("onboarding")), 0o700);
        assert_eq!(mode(&path), 0o600);
        let pem = fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let names: Vec<_> = fs::read_dir(dir.path().join("onboarding"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key.pem"]);
        assert!(!dir.path().join("gen").exists());
    }

    #[test]
    fn onboarding_key_replaces_what_an_interrupted_write_left() {
        let (dir, backend) = backend();
        let onboarding = dir.path().join("onboarding");
        fs::create_dir_all(&onboarding).unwrap();
        fs::write(onboarding.join(KEY_TEMP_FILE), b"partial").unwrap();
        let key = backend.onboarding_key().unwrap();
        assert!(!onboarding.join(KEY_TEMP_FILE).exists());
        assert_eq!(
            backend.onboarding_key().unwrap().public_key_spki(),
            key.public_key_spki()
        );
    }

    #[test]
    fn a_damaged_onboarding_key_is_named_and_kept() {
        let (_dir, backend) = backend();
        let path = backend.onboarding_key_path();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "this is not a key\n").unwrap();
        let err = backend.onboarding_key().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "loading the onboarding key {}: not a PEM private key; remove this file and \
                 restart iotd: a new onboarding key and certificate are made, and the setup code \
                 on the gateway's label stays valid",
                path.display()
            )
        );
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "this is not a key\n",
            "kept"
        );

        // Valid PEM armour, truncated key inside.
        fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nMIIBAA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = backend.onboarding_key().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("loading the onboarding key {}: ", path.display())),
            "{err}"
        );
        assert!(err.ends_with(DAMAGED_ONBOARDING_KEY), "{err}");

        // A key, but not P-256: it could not sign the certificate.
        fs::write(&path, RSA_PKCS1_PEM).unwrap();
        let err = backend.onboarding_key().unwrap_err();
        assert!(matches!(err, KeyError::Crypto { .. }), "{err}");
        assert!(
            err.to_string().starts_with(&format!(
                "loading the onboarding key {}: RSA, not ECDSA P-256; remove this file",
                path.display()
            )),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), RSA_PKCS1_PEM);

        // The fix works: removed, a new key is made.
        backend.remove_onboarding_key().unwrap();
        backend.onboarding_key().unwrap();
    }

    #[test]
    fn removing_the_onboarding_key_makes_the_next_one_new() {
        let (dir, backend) = backend();
        let onboarding = dir.path().join("onboarding");
        let first = backend.onboarding_key().unwrap().public_key_spki();
        backend.remove_onboarding_key().unwrap();
        assert!(!onboarding.exists(), "an empty directory goes too");
        // Nothing there: fine (a retried removal).
        backend.remove_onboarding_key().unwrap();

        let second = backend.onboarding_key().unwrap().public_key_spki();
        assert_ne!(second, first);
        // Other files (the certificate) stay, and so does their directory.
        fs::write(onboarding.join("cert.pem"), "cert").unwrap();
        backend.remove_onboarding_key().unwrap();
        assert!(!backend.onboarding_key_path().exists());
        assert!(onboarding.join("cert.pem").exists());
        let third = backend.onboarding_key().unwrap().public_key_spki();
        assert_ne!(third, second);
    }

    #[test]
    fn the_onboarding_key_is_not_a_generation() {
        let (dir, backend) = backend();
        backend.onboarding_key().unwrap();
        backend.create(1).unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        assert_eq!(store.generations().unwrap(), [1]);
        backend.remove(1).unwrap();
        assert!(backend.onboarding_key_path().exists());
    }
}
