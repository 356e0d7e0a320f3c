//! The persisted state: `state.json` and the issued certificates under `gen/<n>/` in the state
//! directory.
//!
//! `state.json` (schema 2) holds two things that change independently:
//! - the **identity**: the generation, certificate and thing the gateway connects as, once one
//!   has connected; it changes only by one atomic write of this file (a commit);
//! - the **operation** in progress: provisioning (with its step and where its claim came from)
//!   or rotation (with its step and the staged generation). A failed operation never touches
//!   the identity.
//!
//! Every write is atomic (temp file, fsync, rename, fsync of the directory) and happens before
//! the step that depends on it begins, so that a gateway killed at any instant finds on disk
//! either the old state or the new one, never half of one. Schema 1 (the first release: one
//! linear `step`) is migrated on load; a schema newer than this iotd knows is refused and left
//! untouched.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The layout of `state.json` this iotd writes. Bumped when it changes incompatibly; every
/// older schema it can read is migrated in `migrate`.
pub const SCHEMA: u32 = 2;

/// The identity the gateway connects as: made by provisioning, replaced by a rotation's commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The key generation: the key and certificate are in `gen/<generation>/`.
    pub generation: u32,
    pub certificate_id: String,
    /// The certificate (chain); `gen/<generation>/cert.pem` is written from it.
    pub certificate_pem: String,
    pub thing_name: String,
    /// Where the key is (`DeviceKey::location`), as it was when the identity was committed;
    /// `None` for an identity migrated from schema 1 until its next write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The certificate's validity (Unix seconds).
    pub not_before: i64,
    pub not_after: i64,
    /// What the template's DeviceConfiguration said.
    #[serde(default)]
    pub device_configuration: BTreeMap<String, String>,
    /// When this identity became the current one (Unix seconds).
    pub committed_at: i64,
    /// The AWS IoT endpoint (host) the identity belongs to when it is not `cloud.endpoint`:
    /// an installer's claim for another of `onboarding.allowed_endpoints` made it there, and
    /// its certificate and thing exist in that account and region only. `None`: the
    /// configured endpoint, whatever it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The template parameters an installer supplied with the claim that made this identity
    /// (`onboarding.installer_parameters`, e.g. the site). They exist nowhere else on the
    /// gateway, so each rotation's RegisterThing sends them again and the template sets the
    /// same attributes. Empty for a claim from files.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub installer_parameters: BTreeMap<String, String>,
}

/// Where the claim of a provisioning came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClaimOrigin {
    /// The claim certificate and key files named in the configuration (baked into the image).
    File,
    /// Handed over the local network by an installer (trusted-user provisioning); kept in
    /// memory only, so after a restart the operation waits for a new one.
    Network,
}

/// The steps that take a new key to a registered certificate; provisioning and rotation share
/// them. Each carries what the next one needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Step {
    /// The device key of `generation` exists; no certificate yet.
    #[serde(rename_all = "camelCase")]
    KeyReady { generation: u32 },
    /// AWS issued a certificate for our key (PENDING_ACTIVATION until RegisterThing).
    #[serde(rename_all = "camelCase")]
    CertificateIssued {
        generation: u32,
        certificate_id: String,
        /// The certificate (chain) as AWS issued it: state.json is its durable copy, and
        /// `gen/<n>/cert.pem` is written from it (see `Store::write_certificate`).
        certificate_pem: String,
        ownership_token: String,
        issued_at: i64,
        /// The endpoint that issued it, when not `cloud.endpoint` (see `Identity::endpoint`):
        /// only a claim for that endpoint can register it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
    /// RegisterThing accepted: the thing exists and the certificate is ACTIVE and attached.
    /// Connecting with it is what verifies it; only then is it committed as the identity.
    #[serde(rename_all = "camelCase")]
    ThingRegistered {
        generation: u32,
        certificate_id: String,
        certificate_pem: String,
        thing_name: String,
        device_configuration: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// What RegisterThing was sent of the installer's parameters (`Identity::installer_parameters`).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        installer_parameters: BTreeMap<String, String>,
    },
}

impl Step {
    /// The step's name as logs, STATUS= and D-Bus show it.
    pub fn name(&self) -> &'static str {
        match self {
            Step::KeyReady { .. } => "key-ready",
            Step::CertificateIssued { .. } => "certificate-issued",
            Step::ThingRegistered { .. } => "thing-registered",
        }
    }

    pub fn generation(&self) -> u32 {
        match self {
            Step::KeyReady { generation }
            | Step::CertificateIssued { generation, .. }
            | Step::ThingRegistered { generation, .. } => *generation,
        }
    }

    /// The certificate PEM this step holds, if it has one.
    pub fn certificate_pem(&self) -> Option<&str> {
        match self {
            Step::KeyReady { .. } => None,
            Step::CertificateIssued {
                certificate_pem, ..
            }
            | Step::ThingRegistered {
                certificate_pem, ..
            } => Some(certificate_pem),
        }
    }

    /// The certificate this step holds, if it has one.
    pub fn certificate_id(&self) -> Option<&str> {
        match self {
            Step::KeyReady { .. } => None,
            Step::CertificateIssued { certificate_id, .. }
            | Step::ThingRegistered { certificate_id, .. } => Some(certificate_id),
        }
    }
}

/// What started a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Trigger {
    Schedule,
    OnDemand,
    #[serde(rename_all = "camelCase")]
    Job {
        job_id: String,
    },
}

impl Trigger {
    /// The job's id, for a rotation a job asked for.
    pub fn job_id(&self) -> Option<String> {
        match self {
            Trigger::Job { job_id } => Some(job_id.clone()),
            Trigger::Schedule | Trigger::OnDemand => None,
        }
    }

    /// As the rotation report's `reason` says it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::OnDemand => "on-demand",
            Trigger::Job { .. } => "job",
        }
    }
}

/// The operation in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Operation {
    /// Making the first identity (there is none while this runs).
    Provisioning {
        claim: ClaimOrigin,
        /// `None` until the key exists: the operation has started (a claim was at hand) but
        /// nothing is on disk yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<Step>,
    },
    /// Replacing the live identity's key and certificate; the live identity stays in use
    /// until the staged generation is committed.
    #[serde(rename_all = "camelCase")]
    Rotation {
        staged_generation: u32,
        trigger: Trigger,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<Step>,
    },
}

impl Operation {
    pub fn step(&self) -> Option<&Step> {
        match self {
            Operation::Provisioning { step, .. } | Operation::Rotation { step, .. } => {
                step.as_ref()
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Operation::Provisioning { .. } => "provisioning",
            Operation::Rotation { .. } => "rotation",
        }
    }
}

/// The last error, kept so that a person can see why the agent is stuck or what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    pub code: String,
    pub message: String,
    pub at: i64,
    /// The operation stopped trying until the service restarts or is told to try again.
    pub permanent: bool,
    /// When the next attempt starts (Unix seconds), for transient errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<i64>,
    /// Kept until the next rotation commits (or a reprovision), whatever the connection does
    /// meanwhile: why a rotation was rolled back, or why the gateway fell back to its previous
    /// certificate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sticky: bool,
}

/// Everything in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub schema: u32,
    pub identity: Option<Identity>,
    pub operation: Option<Operation>,
    /// The highest key generation ever created, so that a new key never reuses a directory.
    #[serde(default)]
    pub last_generation: u32,
    #[serde(default)]
    pub last_error: Option<LastError>,
    /// Certificates given up on the way. One whose RegisterThing succeeded without the reply
    /// reaching us stays ACTIVE and attached to the thing: kept here so that it can be
    /// reported and cleaned up in AWS IoT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub abandoned_certificates: Vec<String>,
    /// The abandoned certificates the fleet's backend was told about (a report on
    /// `cloud.report_topic` that the broker acknowledged): each is reported once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reported_certificates: Vec<String>,
    /// The onboarding window's attempt count, which survives restarts.
    #[serde(default, skip_serializing_if = "is_default")]
    pub onboarding: crate::onboard::window::Persisted,
    /// The identity a rotation replaced, kept (its key and generation) for `grace_period` in
    /// case the new certificate is refused: iotd then falls back to it while it is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Previous>,
    /// Rotation bookkeeping that must survive restarts.
    #[serde(default, skip_serializing_if = "is_default")]
    pub rotation: RotationRecord,
}

/// The identity before the last rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Previous {
    pub identity: Identity,
    /// When its key and generation are deleted (Unix seconds).
    pub delete_after: i64,
}

/// What a rotation leaves behind for later: when to try again after one failed, and the reports
/// the fleet's backend has not acknowledged yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationRecord {
    /// A scheduled rotation failed (and was rolled back): the next one starts no earlier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<i64>,
    /// Rotation reports not acknowledged by the broker yet, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<RotationReport>,
    /// The last rotation that committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<RotationReport>,
}

/// A rotation's outcome, as reported on `rotation.report_topic` (the payload's fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationReport {
    pub thing_name: String,
    pub old_certificate_id: String,
    pub new_certificate_id: String,
    pub rotated_at: i64,
    /// `schedule`, `on-demand` or `job`.
    pub reason: String,
    /// `committed` (the backend deactivates the old certificate) or `rolled-back` (the new
    /// one was never used: the backend deletes it; the old one stays).
    pub outcome: String,
    /// Why it was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// The AWS IoT job that asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl Default for State {
    fn default() -> Self {
        Self {
            schema: SCHEMA,
            identity: None,
            operation: None,
            last_generation: 0,
            last_error: None,
            abandoned_certificates: Vec::new(),
            reported_certificates: Vec::new(),
            onboarding: crate::onboard::window::Persisted::default(),
            previous: None,
            rotation: RotationRecord::default(),
        }
    }
}

impl State {
    /// Where the gateway stands, in one word for messages: "provisioned" with an identity,
    /// else the operation's step ("key-ready", …; "starting" before the key), else
    /// "unprovisioned".
    pub fn step_name(&self) -> &'static str {
        match (&self.identity, &self.operation) {
            (Some(_), _) => "provisioned",
            (None, Some(op)) => op.step().map_or("starting", Step::name),
            (None, None) => "unprovisioned",
        }
    }

    /// The generation and certificate the gateway connects with, or would next: the identity's,
    /// else those of a provisioning step that has a certificate.
    pub fn certificate(&self) -> Option<(u32, &str)> {
        if let Some(i) = &self.identity {
            return Some((i.generation, &i.certificate_id));
        }
        let step = self.operation.as_ref()?.step()?;
        Some((step.generation(), step.certificate_id()?))
    }

    /// Whether a certificate is registered (ACTIVE, attached to a thing) for the gateway: the
    /// identity, or a provisioning step past RegisterThing.
    pub fn registered(&self) -> bool {
        self.identity.is_some()
            || matches!(
                self.operation.as_ref().and_then(Operation::step),
                Some(Step::ThingRegistered { .. })
            )
    }

    /// The endpoint (host) the gateway's certificate belongs to when it is not `cloud.endpoint`:
    /// the operation's certificate's, or else the identity's. `None`: `cloud.endpoint`.
    pub fn endpoint(&self) -> Option<&str> {
        let step = self.operation.as_ref().and_then(Operation::step);
        match step {
            Some(
                Step::CertificateIssued { endpoint, .. } | Step::ThingRegistered { endpoint, .. },
            ) => endpoint.as_deref(),
            _ => self.identity.as_ref().and_then(|i| i.endpoint.as_deref()),
        }
    }

    /// The abandoned certificates not reported yet, oldest first.
    pub fn unreported_certificates(&self) -> impl Iterator<Item = &str> {
        self.abandoned_certificates
            .iter()
            .filter(|id| !self.reported_certificates.contains(id))
            .map(String::as_str)
    }

    /// The generations whose files must be kept: the identity's and the operation's.
    pub fn live_generations(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.identity.iter().map(|i| i.generation).collect();
        match &self.operation {
            Some(Operation::Rotation {
                staged_generation, ..
            }) => out.push(*staged_generation),
            Some(Operation::Provisioning { step: Some(s), .. }) => out.push(s.generation()),
            _ => {}
        }
        out.extend(self.previous.iter().map(|p| p.identity.generation));
        out
    }
}

/// Schema 1, as the first release wrote it: one linear step, flattened into the top level.
mod v1 {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(tag = "step", rename_all = "kebab-case")]
    pub enum Step {
        Unprovisioned,
        #[serde(rename_all = "camelCase")]
        KeyReady {
            generation: u32,
        },
        #[serde(rename_all = "camelCase")]
        CertificateIssued {
            generation: u32,
            certificate_id: String,
            ownership_token: String,
            issued_at: i64,
        },
        #[serde(rename_all = "camelCase")]
        ThingRegistered {
            generation: u32,
            certificate_id: String,
            thing_name: String,
            device_configuration: BTreeMap<String, String>,
        },
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

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct State {
        #[serde(flatten)]
        pub step: Step,
        #[serde(default)]
        pub last_generation: u32,
        #[serde(default)]
        pub last_error: Option<super::LastError>,
        #[serde(default)]
        pub abandoned_certificates: Vec<String>,
    }
}

/// What migration needs of a generation's certificate file (schema 1 kept the certificate only
/// there): its PEM and its notBefore.
#[derive(Debug, Default)]
struct V1Certificate {
    pem: String,
    not_before: Option<i64>,
}

/// Schema 1 → 2. Schema 1 had claims from files only. A provisioned gateway keeps its identity
/// (it never provisions again because of an upgrade); the certificate and its notBefore come
/// from its file, read by the caller (when it can't be read, the PEM stays empty, which makes
/// iotd read the file again when it connects, and the provisioning time stands in for
/// notBefore).
fn migrate_v1(old: v1::State, certificate: impl Fn(u32) -> V1Certificate) -> State {
    let provisioning = |step| {
        Some(Operation::Provisioning {
            claim: ClaimOrigin::File,
            step: Some(step),
        })
    };
    let (identity, operation) = match old.step {
        v1::Step::Unprovisioned => (None, None),
        v1::Step::KeyReady { generation } => (None, provisioning(Step::KeyReady { generation })),
        v1::Step::CertificateIssued {
            generation,
            certificate_id,
            ownership_token,
            issued_at,
        } => (
            None,
            provisioning(Step::CertificateIssued {
                generation,
                certificate_id,
                certificate_pem: certificate(generation).pem,
                ownership_token,
                issued_at,
                endpoint: None,
            }),
        ),
        v1::Step::ThingRegistered {
            generation,
            certificate_id,
            thing_name,
            device_configuration,
        } => (
            None,
            provisioning(Step::ThingRegistered {
                generation,
                certificate_id,
                certificate_pem: certificate(generation).pem,
                thing_name,
                device_configuration,
                endpoint: None,
                installer_parameters: BTreeMap::new(),
            }),
        ),
        v1::Step::Provisioned {
            generation,
            certificate_id,
            thing_name,
            device_configuration,
            provisioned_at,
            not_after,
        } => {
            let cert = certificate(generation);
            (
                Some(Identity {
                    generation,
                    certificate_id,
                    certificate_pem: cert.pem,
                    thing_name,
                    key: None,
                    not_before: cert.not_before.unwrap_or(provisioned_at),
                    not_after,
                    device_configuration,
                    committed_at: provisioned_at,
                    endpoint: None,
                    installer_parameters: BTreeMap::new(),
                }),
                None,
            )
        }
    };
    // A permanent error of schema 1 parked the whole agent; with an identity it is history now.
    let last_error = match (&identity, old.last_error) {
        (Some(_), Some(e)) if e.permanent => None,
        (_, e) => e,
    };
    State {
        schema: SCHEMA,
        identity,
        operation,
        last_generation: old.last_generation,
        last_error,
        abandoned_certificates: old.abandoned_certificates,
        reported_certificates: Vec::new(),
        onboarding: crate::onboard::window::Persisted::default(),
        previous: None,
        rotation: RotationRecord::default(),
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
    /// Damaged: iotd sets it aside and rebuilds it from `gen/` when it starts (see `recover`).
    #[error(
        "reading {path}: {message}. iotd keeps it as state.json.damaged and rebuilds it from \
         {dir}/gen/ when it starts; never delete gen/: it holds the device key and certificate \
         of this gateway's identity",
        dir = path.parent().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "reading {path}: it has schema {schema}, written by a newer iotd; this iotd ({version}) \
         reads schemas 1 to {SCHEMA}. It is left untouched: install the newer iotd again",
        version = env!("CARGO_PKG_VERSION")
    )]
    Newer { path: PathBuf, schema: u64 },
    /// Another process holds the state directory's lock.
    #[error(
        "state directory {dir} is in use by {holder} (it holds the lock on {lock}); two agents \
         on one state directory would make two identities. Stop the other one first",
        dir = lock.parent().map(|p| p.display().to_string()).unwrap_or_default(),
        lock = lock.display(),
        holder = holder.map_or_else(|| "another process".to_owned(), |pid| format!("another iotd (PID {pid})"))
    )]
    Locked { lock: PathBuf, holder: Option<u32> },
    /// The state directory is open to others and could not be closed.
    #[error(
        "state directory {dir} has mode {mode:04o}, open to other users, and iotd could not \
         change it to 0700 ({source}); it holds the device key. Run: chmod 0700 {dir} (as its \
         owner or root)",
        dir = dir.display()
    )]
    Exposed {
        dir: PathBuf,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether restarting iotd could get past this error: not for a damaged or newer state,
    /// nor for a state directory iotd may not use; yes for a disk that failed for a moment or
    /// another iotd that may go away.
    pub fn fixed_by_restart(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::NotADirectory
                    | std::io::ErrorKind::IsADirectory
                    | std::io::ErrorKind::InvalidData
            ),
            StoreError::Locked { .. } => true,
            StoreError::Corrupt { .. } | StoreError::Newer { .. } | StoreError::Exposed { .. } => {
                false
            }
        }
    }
}

/// What `gen/<n>/identity.json` holds: what the certificate and key beside it do not say about
/// the identity they make. Written when an identity is committed, so that a `state.json` that
/// is lost or damaged can be rebuilt from `gen/` (see `recover`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRecord {
    pub certificate_id: String,
    pub thing_name: String,
    #[serde(default)]
    pub device_configuration: BTreeMap<String, String>,
    pub committed_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub installer_parameters: BTreeMap<String, String>,
}

impl From<&Identity> for IdentityRecord {
    fn from(i: &Identity) -> Self {
        Self {
            certificate_id: i.certificate_id.clone(),
            thing_name: i.thing_name.clone(),
            device_configuration: i.device_configuration.clone(),
            committed_at: i.committed_at,
            endpoint: i.endpoint.clone(),
            installer_parameters: i.installer_parameters.clone(),
        }
    }
}

/// The exclusive lock on a state directory; released when dropped (or when the process ends,
/// however it ends: the kernel drops a `flock` with its file).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// How durable a write must be when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Whole: the data is synced before the rename, so a crash leaves the old file or the new
    /// one, never a torn one. The rename itself may be lost in a crash; for state.json that
    /// means a step done again, never a wrong state.
    Atomic,
    /// Also the rename is durable (the directory is synced): for a state that a request to the
    /// cloud depends on.
    Durable,
}

/// Writes `contents` to `path` atomically with `mode` (temp file, fsync, rename), and with
/// `Durable`, makes the rename durable.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    durability: Durability,
) -> Result<(), StoreError> {
    write_renamed(path, contents, mode, true)?;
    if durability == Durability::Durable {
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// Writes a file meant for other programs too (0644) with a rename, so that a reader never
/// sees half of it. Not synced: what it holds is also in state.json, from which it is
/// rewritten at start.
fn write_public(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    write_renamed(path, contents, 0o644, false)
}

/// Writes `contents` to a temp file beside `path` with `mode` (whatever the umask: the unit's
/// UMask=0077 would make a file meant for other readers, such as exit.json or cert.pem,
/// unreadable to them), syncs it when `sync` says so, and renames it into place.
fn write_renamed(path: &Path, contents: &[u8], mode: u32, sync: bool) -> Result<(), StoreError> {
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
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(io("setting the mode of", &tmp))?;
    file.write_all(contents).map_err(io("writing", &tmp))?;
    if sync {
        file.sync_all().map_err(io("syncing", &tmp))?;
    }
    drop(file);
    fs::rename(&tmp, path).map_err(io("renaming into place", path))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
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

    /// Takes the exclusive lock on the state directory (`flock` on its `lock` file), which the
    /// agent holds for as long as it runs: a second iotd on the same directory (possible without
    /// a system bus, whose name would otherwise tell) is refused, with the holder's PID.
    pub fn lock(&self) -> Result<StateLock, StoreError> {
        let path = self.dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io("opening lock file", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.trim().parse().ok());
                return Err(StoreError::Locked { lock: path, holder });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io("locking", &path)(e)),
        }
        // The PID is for the message a second iotd prints; the lock itself is the flock.
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(io("writing lock file", &path))?;
        Ok(StateLock { _file: file })
    }

    /// Makes sure the state directory is closed to other users (it holds the device key): a
    /// directory made by hand or by an installer with 0755 is changed to 0700, with a warning
    /// that says so; one that cannot be changed is refused.
    pub fn secure(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(&self.dir).map_err(io("reading the mode of", &self.dir))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 == 0 {
            return Ok(());
        }
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            StoreError::Exposed {
                dir: self.dir.clone(),
                mode,
                source,
            }
        })?;
        tracing::warn!(
            "state directory {} had mode {mode:04o}, open to other users; changed it to 0700 \
             (it holds the device key)",
            self.dir.display()
        );
        Ok(())
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Reads `state.json`; a missing file is a fresh gateway. A schema-1 file is migrated and
    /// written back as schema 2, after a copy of it is kept as `state.v1.json` (what an older
    /// iotd would need after a downgrade).
    pub fn load(&self) -> Result<State, StoreError> {
        self.read_state(true)
    }

    /// Reads `state.json` as `load` does, but writes nothing: a schema-1 file is migrated in
    /// memory only. For readers that are not the agent (`iotctl check`), which hold no lock.
    pub fn peek(&self) -> Result<State, StoreError> {
        self.read_state(false)
    }

    fn read_state(&self, write_migration: bool) -> Result<State, StoreError> {
        let path = self.state_path();
        let bytes = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let corrupt = |message: String| StoreError::Corrupt {
            path: path.clone(),
            message,
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            corrupt(match std::str::from_utf8(&bytes) {
                Ok(_) => format!("not valid JSON ({e})"),
                Err(_) => "not text (not UTF-8): the file is damaged".to_owned(),
            })
        })?;
        let schema = value
            .get("schema")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| corrupt("no \"schema\" number".to_owned()))?;
        match schema {
            2 => serde_json::from_value(value).map_err(|e| corrupt(format!("schema 2: {e}"))),
            1 => {
                let old: v1::State =
                    serde_json::from_value(value).map_err(|e| corrupt(format!("schema 1: {e}")))?;
                let state = migrate_v1(old, |generation| {
                    let Ok(pem) = self.read_certificate(generation) else {
                        return V1Certificate::default();
                    };
                    let not_before = crate::tls::parse_chain_pem(&pem, "the device certificate")
                        .ok()
                        .and_then(|chain| crate::tls::certificate_validity(chain.first()?).ok())
                        .map(|v| v.0);
                    V1Certificate { pem, not_before }
                });
                if !write_migration {
                    return Ok(state);
                }
                write_atomic(
                    &self.dir.join("state.v1.json"),
                    &bytes,
                    0o600,
                    Durability::Atomic,
                )?;
                self.save(&state, Durability::Durable)?;
                tracing::info!(
                    "migrated {} from schema 1 to {SCHEMA} (the old file is kept as state.v1.json)",
                    path.display()
                );
                Ok(state)
            }
            n if n > u64::from(SCHEMA) => Err(StoreError::Newer { path, schema: n }),
            n => Err(corrupt(format!("unknown schema {n}"))),
        }
    }

    /// Writes `state.json` atomically (0600: it holds the ownership token).
    pub fn save(&self, state: &State, durability: Durability) -> Result<(), StoreError> {
        let path = self.state_path();
        let text = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: format!("serialising: {e}"),
        })?;
        write_atomic(&path, &text, 0o600, durability)
    }

    /// Makes a generation's directory entries durable (its key files, its certificate, the
    /// directory itself): one sync for all of them, before a state that refers to them is
    /// persisted.
    pub fn sync_generation(&self, generation: u32) -> Result<(), StoreError> {
        sync_dir(&self.dir.join("gen").join(generation.to_string()))?;
        sync_dir(&self.dir.join("gen"))
    }

    /// The generations that have a directory under `gen/`, written or half-written.
    pub fn generations(&self) -> Result<Vec<u32>, StoreError> {
        let gen_root = self.dir.join("gen");
        let entries = match fs::read_dir(&gen_root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("listing", &gen_root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io("listing", &gen_root))?;
            if let Some(n) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The highest generation that has a directory under `gen/`: a new key never goes into
    /// one of them, even if state.json does not know it.
    pub fn highest_generation(&self) -> Result<u32, StoreError> {
        Ok(self.generations()?.last().copied().unwrap_or(0))
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

    /// Writes the issued certificate to `gen/<n>/cert.pem` (public: 0644, so that other gateway
    /// programs can use it) with a rename, so that a reader never sees half of one. Not synced
    /// on its own: state.json holds the durable copy, the directory entry becomes durable with
    /// `sync_generation`, and `repair_certificate` rewrites a file a crash damaged.
    pub fn write_certificate(&self, generation: u32, pem: &str) -> Result<PathBuf, StoreError> {
        self.generation_dir(generation)?;
        let path = self.certificate_path(generation);
        write_public(&path, pem.as_bytes())?;
        Ok(path)
    }

    /// Rewrites `gen/<n>/cert.pem` from the state's copy when it is missing or differs (a crash
    /// right after it was written); says whether it did.
    pub fn repair_certificate(&self, generation: u32, pem: &str) -> Result<bool, StoreError> {
        if pem.is_empty() || self.read_certificate(generation).is_ok_and(|f| f == pem) {
            return Ok(false);
        }
        self.write_certificate(generation, pem)?;
        Ok(true)
    }

    pub fn identity_record_path(&self, generation: u32) -> PathBuf {
        self.dir
            .join("gen")
            .join(generation.to_string())
            .join("identity.json")
    }

    /// Writes `gen/<n>/identity.json` for `identity` unless it already says the same; says
    /// whether it wrote. Like `cert.pem`, renamed into place but not synced on its own: it is a
    /// spare for when state.json is lost, and is checked (and rewritten) at every start.
    pub fn write_identity_record(&self, identity: &Identity) -> Result<bool, StoreError> {
        let record = IdentityRecord::from(identity);
        if self
            .read_identity_record(identity.generation)
            .is_ok_and(|r| r == record)
        {
            return Ok(false);
        }
        self.generation_dir(identity.generation)?;
        let path = self.identity_record_path(identity.generation);
        let text = serde_json::to_vec_pretty(&record).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: format!("serialising: {e}"),
        })?;
        write_public(&path, &text)?;
        Ok(true)
    }

    /// Removes `gen/<n>/identity.json` (the generation was given up); missing is fine.
    pub fn remove_identity_record(&self, generation: u32) -> Result<(), StoreError> {
        let path = self.identity_record_path(generation);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &path)(e)),
        }
    }

    pub fn read_identity_record(&self, generation: u32) -> Result<IdentityRecord, StoreError> {
        let path = self.identity_record_path(generation);
        let bytes = fs::read(&path).map_err(io("reading", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    /// Moves a damaged `state.json` aside as `state.json.damaged` (or `.damaged.<n>` when one
    /// is there already), for a person to look at; returns where it went.
    pub fn set_aside_damaged(&self) -> Result<PathBuf, StoreError> {
        let from = self.state_path();
        let mut to = self.dir.join("state.json.damaged");
        let mut n = 1u32;
        while to.exists() {
            n = n.saturating_add(1);
            to = self.dir.join(format!("state.json.damaged.{n}"));
        }
        fs::rename(&from, &to).map_err(io("moving aside", &from))?;
        Ok(to)
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

    fn registered() -> Step {
        Step::ThingRegistered {
            endpoint: None,
            generation: 1,
            certificate_id: "ab".into(),
            certificate_pem: String::new(),
            thing_name: "gw-1".into(),
            device_configuration: BTreeMap::from([("k".into(), "v".into())]),
            installer_parameters: BTreeMap::new(),
        }
    }

    #[test]
    fn fresh_directory_is_empty_and_states_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        assert_eq!(store.load().unwrap(), State::default());
        let states = [
            State {
                operation: Some(Operation::Provisioning {
                    claim: ClaimOrigin::Network,
                    step: Some(Step::CertificateIssued {
                        endpoint: None,
                        generation: 1,
                        certificate_id: "ab".into(),
                        certificate_pem: "PEM".into(),
                        ownership_token: "tok".into(),
                        issued_at: 5,
                    }),
                }),
                last_generation: 1,
                ..State::default()
            },
            State {
                identity: Some(Identity {
                    endpoint: None,
                    generation: 1,
                    certificate_id: "ab".into(),
                    certificate_pem: "PEM".into(),
                    thing_name: "gw-1".into(),
                    key: Some("file /x".into()),
                    not_before: 1,
                    not_after: 2,
                    device_configuration: BTreeMap::new(),
                    committed_at: 3,
                    installer_parameters: BTreeMap::new(),
                }),
                operation: Some(Operation::Rotation {
                    staged_generation: 2,
                    trigger: Trigger::Job { job_id: "j".into() },
                    step: Some(registered()),
                }),
                last_generation: 2,
                ..State::default()
            },
        ];
        for state in states {
            store.save(&state, Durability::Atomic).unwrap();
            assert_eq!(store.load().unwrap(), state);
        }
        let text = fs::read_to_string(dir.path().join("s/state.json")).unwrap();
        assert!(text.contains("\"schema\": 2"), "{text}");
        assert!(text.contains("\"kind\": \"rotation\""), "{text}");
        assert!(text.contains("\"name\": \"thing-registered\""), "{text}");
        let mode = |p: &str| {
            fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("s/state.json"), 0o600);
        assert_eq!(mode("s"), 0o700);
    }

    #[test]
    fn damaged_state_is_named_left_alone_by_load_and_gen_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (bytes, says) in [
            (&b"{ not json"[..], "not valid JSON"),
            (&b"\xff\xfe\x00garbage"[..], "not UTF-8"),
            (&b"{\"identity\": null}"[..], "no \"schema\""),
            (&b"{\"schema\": 0}"[..], "unknown schema 0"),
            (&b"{\"schema\": 2, \"identity\": 5}"[..], "schema 2:"),
        ] {
            fs::write(dir.path().join("state.json"), bytes).unwrap();
            let err = store.load().unwrap_err().to_string();
            assert!(err.contains("state.json") && err.contains(says), "{err}");
            assert!(err.contains("never delete gen/"), "{err}");
            assert!(!err.contains("move it away"), "{err}");
            assert_eq!(fs::read(dir.path().join("state.json")).unwrap(), bytes);
        }
    }

    #[test]
    fn a_newer_schema_is_refused_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let text = "{\"schema\": 3, \"somethingNew\": true}";
        fs::write(dir.path().join("state.json"), text).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Newer { schema: 3, .. }), "{err}");
        assert!(err.to_string().contains("newer iotd"), "{err}");
        assert_eq!(
            fs::read_to_string(dir.path().join("state.json")).unwrap(),
            text
        );
    }

    fn v1(text: &str) -> State {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("state.json"), text).unwrap();
        let state = store.load().unwrap();
        // Written back as schema 2, the original kept beside it.
        assert_eq!(store.load().unwrap(), state);
        assert_eq!(
            fs::read_to_string(dir.path().join("state.v1.json")).unwrap(),
            text
        );
        state
    }

    #[test]
    fn schema_1_steps_become_a_provisioning_operation() {
        let s = v1(r#"{"schema":1,"step":"unprovisioned","lastGeneration":0}"#);
        assert_eq!(s, State::default());
        let s = v1(r#"{"schema":1,"step":"key-ready","generation":3,"lastGeneration":3}"#);
        assert_eq!(
            s.operation,
            Some(Operation::Provisioning {
                claim: ClaimOrigin::File,
                step: Some(Step::KeyReady { generation: 3 })
            })
        );
        assert_eq!((s.identity, s.last_generation), (None, 3));
        let s = v1(
            r#"{"schema":1,"step":"thing-registered","generation":1,"certificateId":"ab",
               "thingName":"gw-1","deviceConfiguration":{"k":"v"},"lastGeneration":1,
               "lastError":{"code":"network","message":"m","at":4,"permanent":false,"retryAt":6},
               "abandonedCertificates":["old"]}"#,
        );
        assert_eq!(s.operation.unwrap().step(), Some(&registered()));
        assert_eq!(s.last_error.unwrap().retry_at, Some(6));
        assert_eq!(s.abandoned_certificates, ["old"]);
    }

    #[test]
    fn a_provisioned_schema_1_gateway_keeps_its_identity() {
        let s = v1(
            r#"{"schema":1,"step":"provisioned","generation":2,"certificateId":"cd",
               "thingName":"gw-2","deviceConfiguration":{},"provisionedAt":100,
               "notAfter":2000,"lastGeneration":2,
               "lastError":{"code":"key","message":"m","at":4,"permanent":true}}"#,
        );
        let identity = s.identity.unwrap();
        assert_eq!(
            (identity.generation, identity.certificate_id.as_str()),
            (2, "cd")
        );
        assert_eq!(identity.thing_name, "gw-2");
        // No certificate file here: the provisioning time stands in for notBefore.
        assert_eq!(
            (
                identity.not_before,
                identity.not_after,
                identity.committed_at
            ),
            (100, 2000, 100)
        );
        assert_eq!(s.operation, None);
        assert_eq!(
            s.last_error, None,
            "a permanent error no longer parks a live identity"
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

    #[test]
    fn live_generations_are_the_identity_and_the_operation() {
        let mut s = State::default();
        assert!(s.live_generations().is_empty());
        s.operation = Some(Operation::Provisioning {
            claim: ClaimOrigin::File,
            step: Some(Step::KeyReady { generation: 4 }),
        });
        assert_eq!(s.live_generations(), [4]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod directory_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_lock_is_exclusive_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let held = store.lock().unwrap();
        let err = store.lock().unwrap_err();
        assert!(
            matches!(err, StoreError::Locked { holder: Some(pid), .. } if pid == std::process::id()),
            "{err}"
        );
        assert!(err.fixed_by_restart());
        drop(held);
        store.lock().unwrap();
    }

    #[test]
    fn an_open_directory_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let store = Store::open(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        store.secure().unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn identity_records_round_trip_and_are_written_only_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut identity = Identity {
            endpoint: None,
            generation: 3,
            certificate_id: "ab".into(),
            certificate_pem: "PEM".into(),
            thing_name: "gw-1".into(),
            key: None,
            not_before: 1,
            not_after: 2,
            device_configuration: BTreeMap::new(),
            committed_at: 3,
            installer_parameters: BTreeMap::new(),
        };
        assert!(store.write_identity_record(&identity).unwrap());
        assert!(!store.write_identity_record(&identity).unwrap());
        identity.thing_name = "gw-2".into();
        assert!(store.write_identity_record(&identity).unwrap());
        let record = store.read_identity_record(3).unwrap();
        assert_eq!(record, IdentityRecord::from(&identity));
        // An identity of another endpoint says so in its record; one of cloud.endpoint
        // writes no key, as records did before endpoints were remembered.
        let text = fs::read_to_string(dir.path().join("gen/3/identity.json")).unwrap();
        assert!(!text.contains("endpoint"), "{text}");
        identity.endpoint = Some("b-ats.iot.eu-west-1.amazonaws.com".into());
        assert!(store.write_identity_record(&identity).unwrap());
        let record = store.read_identity_record(3).unwrap();
        assert_eq!(record.endpoint, identity.endpoint);
    }

    #[test]
    fn the_endpoint_is_the_operations_certificates_then_the_identitys() {
        let identity = |endpoint: Option<&str>| Identity {
            endpoint: endpoint.map(str::to_owned),
            generation: 1,
            certificate_id: "a".into(),
            certificate_pem: String::new(),
            thing_name: "gw".into(),
            key: None,
            not_before: 0,
            not_after: 1,
            device_configuration: BTreeMap::new(),
            committed_at: 0,
            installer_parameters: BTreeMap::new(),
        };
        let issued = |endpoint: Option<&str>| Step::CertificateIssued {
            generation: 2,
            certificate_id: "b".into(),
            certificate_pem: String::new(),
            ownership_token: "t".into(),
            issued_at: 0,
            endpoint: endpoint.map(str::to_owned),
        };
        let mut state = State::default();
        assert_eq!(state.endpoint(), None);
        state.identity = Some(identity(Some("b.example")));
        assert_eq!(state.endpoint(), Some("b.example"));
        state.operation = Some(Operation::Rotation {
            staged_generation: 2,
            trigger: Trigger::OnDemand,
            step: Some(Step::KeyReady { generation: 2 }),
        });
        assert_eq!(state.endpoint(), Some("b.example"));
        state.operation = Some(Operation::Provisioning {
            claim: ClaimOrigin::Network,
            step: Some(issued(Some("c.example"))),
        });
        assert_eq!(state.endpoint(), Some("c.example"));
        state.identity = None;
        state.operation = Some(Operation::Provisioning {
            claim: ClaimOrigin::Network,
            step: Some(issued(None)),
        });
        assert_eq!(state.endpoint(), None);
    }

    #[test]
    fn a_damaged_state_is_set_aside_without_overwriting_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (n, name) in ["state.json.damaged", "state.json.damaged.2"]
            .iter()
            .enumerate()
        {
            fs::write(store.state_path(), format!("bad {n}")).unwrap();
            let aside = store.set_aside_damaged().unwrap();
            assert_eq!(aside, dir.path().join(name));
            assert_eq!(fs::read_to_string(&aside).unwrap(), format!("bad {n}"));
        }
        assert!(!store.state_path().exists());
    }
}
