//! The persisted provisioning state: `state.json` and the issued certificates under
//! `gen/<n>/` in the state directory. Every write is atomic (temp file, fsync, rename, fsync of
//! the directory) and happens before the step that depends on it begins, so that a gateway
//! killed at any instant finds on disk either the old step or the new one, never half of one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bumped when the layout of `state.json` changes incompatibly.
pub const SCHEMA: u32 = 1;

/// Where provisioning stands. Each variant carries what the next step needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Nothing yet (or a previous identity was abandoned).
    Unprovisioned,
    /// The device key of `generation` exists; no certificate yet.
    #[serde(rename_all = "camelCase")]
    KeyReady { generation: u32 },
    /// AWS issued a certificate for our key (PENDING_ACTIVATION until RegisterThing).
    #[serde(rename_all = "camelCase")]
    CertificateIssued {
        generation: u32,
        certificate_id: String,
        ownership_token: String,
        issued_at: i64,
    },
    /// RegisterThing accepted: the thing exists and the certificate is ACTIVE and attached.
    #[serde(rename_all = "camelCase")]
    ThingRegistered {
        generation: u32,
        certificate_id: String,
        thing_name: String,
        device_configuration: BTreeMap<String, String>,
    },
    /// The device connected with its own identity: only now is it provisioned.
    #[serde(rename_all = "camelCase")]
    Provisioned {
        generation: u32,
        certificate_id: String,
        thing_name: String,
        device_configuration: BTreeMap<String, String>,
        provisioned_at: i64,
        not_after: i64,
    },
}

impl Step {
    /// The step's name as logs, STATUS= and D-Bus show it.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Unprovisioned => "unprovisioned",
            Step::KeyReady { .. } => "key-ready",
            Step::CertificateIssued { .. } => "certificate-issued",
            Step::ThingRegistered { .. } => "thing-registered",
            Step::Provisioned { .. } => "provisioned",
        }
    }

    pub fn generation(&self) -> Option<u32> {
        match self {
            Step::Unprovisioned => None,
            Step::KeyReady { generation }
            | Step::CertificateIssued { generation, .. }
            | Step::ThingRegistered { generation, .. }
            | Step::Provisioned { generation, .. } => Some(*generation),
        }
    }
}

/// The last error, kept so that a person can see why the agent is stuck.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    pub code: String,
    pub message: String,
    pub at: i64,
    /// Permanent errors stop the retries until the service restarts or is told to retry.
    pub permanent: bool,
    /// When the next attempt starts (Unix seconds), for transient errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<i64>,
}

/// Everything in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub schema: u32,
    #[serde(flatten)]
    pub step: Step,
    /// The highest key generation ever created, so that a new key never reuses a directory.
    #[serde(default)]
    pub last_generation: u32,
    #[serde(default)]
    pub last_error: Option<LastError>,
    /// Certificates given up on the way (their ownership token was gone). One whose
    /// RegisterThing succeeded without the reply reaching us stays ACTIVE and attached to the
    /// thing: kept here so that it can be reported and cleaned up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub abandoned_certificates: Vec<String>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            schema: SCHEMA,
            step: Step::Unprovisioned,
            last_generation: 0,
            last_error: None,
            abandoned_certificates: Vec::new(),
        }
    }
}

/// An error of the store, naming the action and the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {message}; move it away to provision from scratch")]
    Corrupt { path: PathBuf, message: String },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// Writes `contents` to `path` atomically with `mode`, and makes the rename durable.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    file.write_all(contents).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io("renaming into place", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("creating state directory", dir))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Reads `state.json`; a missing file is a fresh gateway.
    pub fn load(&self) -> Result<State, StoreError> {
        let path = self.state_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let state: State = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if state.schema != SCHEMA {
            return Err(StoreError::Corrupt {
                path,
                message: format!("schema {} is not {SCHEMA}", state.schema),
            });
        }
        Ok(state)
    }

    /// Writes `state.json` atomically (0600: it holds the ownership token).
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let path = self.state_path();
        let text = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: format!("serialising: {e}"),
        })?;
        write_atomic(&path, &text, 0o600)
    }

    fn generation_dir(&self, generation: u32) -> Result<PathBuf, StoreError> {
        let dir = self.dir.join("gen").join(generation.to_string());
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io("creating", &dir))?;
        Ok(dir)
    }

    /// Path of the issued certificate of `generation`.
    pub fn certificate_path(&self, generation: u32) -> PathBuf {
        self.dir
            .join("gen")
            .join(generation.to_string())
            .join("cert.pem")
    }

    /// Stores the issued certificate (public: 0644, so that other gateway programs can use it).
    pub fn write_certificate(&self, generation: u32, pem: &str) -> Result<PathBuf, StoreError> {
        self.generation_dir(generation)?;
        let path = self.certificate_path(generation);
        write_atomic(&path, pem.as_bytes(), 0o644)?;
        Ok(path)
    }

    pub fn read_certificate(&self, generation: u32) -> Result<String, StoreError> {
        let path = self.certificate_path(generation);
        fs::read_to_string(&path).map_err(io("reading certificate", &path))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn fresh_directory_is_unprovisioned_and_steps_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        assert_eq!(store.load().unwrap(), State::default());
        let state = State {
            step: Step::CertificateIssued {
                generation: 1,
                certificate_id: "ab".into(),
                ownership_token: "tok".into(),
                issued_at: 5,
            },
            last_generation: 1,
            ..State::default()
        };
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        let text = fs::read_to_string(dir.path().join("s/state.json")).unwrap();
        assert!(text.contains("\"step\": \"certificate-issued\""), "{text}");
        let mode = fs::metadata(dir.path().join("s/state.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(dir.path().join("s"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn corrupt_state_names_the_file_and_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("state.json"), "{ not json").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("state.json") && err.contains("move it away"),
            "{err}"
        );
    }

    #[test]
    fn certificates_are_kept_per_generation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let path = store.write_certificate(2, "PEM").unwrap();
        assert_eq!(path, dir.path().join("gen/2/cert.pem"));
        assert_eq!(store.read_certificate(2).unwrap(), "PEM");
        assert!(
            store
                .read_certificate(3)
                .unwrap_err()
                .to_string()
                .contains("gen/3/cert.pem")
        );
    }
}
