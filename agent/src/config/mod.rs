//! Configuration: `/etc/iotd/config.toml` merged with systemd-style `config.d/` drop-ins.
//!
//! Files (see [`ConfigPaths::system`]): the main file first, then every `*.toml` drop-in from
//! `/usr/lib/iotd/config.d/`, `/etc/iotd/config.d/` and `/run/iotd/config.d/`. A drop-in in a
//! later directory masks the one of the same name in an earlier directory (an empty file or a
//! symlink to `/dev/null` masks it away); the survivors apply in lexical order of file name, and
//! a later file overrides the keys it sets. The shipped, fully commented reference is
//! `config/iotd.toml` in the source tree.
//!
//! Processing has three stages, one per file, so each can be tested on its own:
//! 1. `fragments`: one file's TOML into serde structs, every field optional, unknown keys
//!    refused, every value kept with its byte span so later errors can point at
//!    `file:line:column`.
//! 2. `inputs`: each file's values checked one by one (ranges, names, absolute paths) where they
//!    are written — a bad value is an error even if a later file overrides it — then merged:
//!    scalar keys are replaced, `[provisioning.parameters]` merges per parameter name.
//! 3. here: defaults applied, required keys and rules that span several keys checked, and the
//!    plain [`Settings`] built that the rest of the agent uses.
//!
//! `files` finds and reads the files; `parameters` resolves template parameter values (files and
//! commands) at provisioning time rather than at load time, because a serial number read from a
//! command belongs to the provisioning attempt, not to the config check.

mod files;
mod fragments;
mod inputs;
mod parameters;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use inputs::{Backend, Layer, Located};

/// The main config file of an installed system.
pub const SYSTEM_CONFIG_FILE: &str = iotd_api::paths::CONFIG_FILE;
/// Drop-in directories of an installed system, lowest priority first: the image's defaults, the
/// admin's files, runtime overrides.
pub const SYSTEM_DROPIN_DIRS: [&str; 3] = iotd_api::paths::CONFIG_DROPIN_DIRS;
/// Where state lives when `state.dir` is not set.
pub const DEFAULT_STATE_DIR: &str = iotd_api::paths::STATE_DIR;
/// The TPM access used when `key.tcti` is not set: the kernel's resource manager, so other TPM
/// users on the gateway are not locked out.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// How long a `{ command = [...] }` template parameter may run.
pub const PARAMETER_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

const DEFAULT_PORT: u16 = 8883;
/// The port on which ALPN is offered by default: AWS IoT serves MQTT there only with ALPN.
const ALPN_PORT: u16 = 443;
const DEFAULT_KEEP_ALIVE_SECS: u64 = 300;
const DEFAULT_REPLY_TIMEOUT_SECS: u64 = 30;
/// Chosen with fleet-sim: 1000 gateways against RegisterThing at 10/s finish within about 1.1x
/// of the 100 s the quota allows, at about a dozen throttled requests per gateway.
const DEFAULT_THROTTLE_RETRY_MAX_SECS: u64 = 10;

/// Which files make up the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPaths {
    /// Read first; a missing main file is not an error (an image may ship only drop-ins).
    pub main: PathBuf,
    /// Drop-in directories, lowest priority first; missing directories are skipped.
    pub dropin_dirs: Vec<PathBuf>,
}

impl ConfigPaths {
    /// `/etc/iotd/config.toml` and the three system drop-in directories.
    pub fn system() -> Self {
        Self {
            main: PathBuf::from(SYSTEM_CONFIG_FILE),
            dropin_dirs: SYSTEM_DROPIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// `path` as the main file and `<its directory>/config.d/` as the only drop-in directory
    /// (`--config PATH`, tests).
    pub fn for_main(path: &Path) -> Self {
        let dir = path.parent().unwrap_or(Path::new(""));
        Self {
            main: path.to_path_buf(),
            dropin_dirs: vec![dir.join("config.d")],
        }
    }
}

/// The validated configuration, with every default applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cloud: CloudSettings,
    pub provisioning: ProvisioningSettings,
    pub key: KeySettings,
    pub state_dir: PathBuf,
    /// The files that were read, in order (main first), for `iotctl config check` and logs.
    /// Masks (empty files, symlinks to `/dev/null`) and a missing main file are not listed.
    pub sources: Vec<PathBuf>,
}

/// `[cloud]`: where and how to connect.
#[derive(Debug, Clone)]
pub struct CloudSettings {
    /// Host name of the AWS IoT data endpoint (`…-ats.iot.<region>.amazonaws.com`).
    pub endpoint: String,
    pub port: u16,
    /// Offer ALPN [`crate::tls::ALPN_AWS_MQTT`]; defaults to `port == 443`.
    pub alpn: bool,
    /// PEM bundle of trusted roots; `None` means the system trust store
    /// ([`crate::tls::SYSTEM_CA_BUNDLE`]).
    pub ca_bundle: Option<PathBuf>,
    pub keep_alive: Duration,
    /// How long to wait for a reply from the fleet provisioning API.
    pub reply_timeout: Duration,
    /// The longest random part of the wait before retrying a request AWS IoT throttled (the
    /// wait is 1 s plus up to this); other errors back off up to 5 minutes.
    pub throttle_retry_max: Duration,
}

/// `[provisioning]`: fleet provisioning by claim.
#[derive(Debug, Clone)]
pub struct ProvisioningSettings {
    /// Name of the fleet provisioning template.
    pub template: String,
    pub certificate_source: CertificateSource,
    /// The claim certificate and key; `None` when neither is configured.
    pub claim: Option<ClaimPaths>,
    /// MQTT client id of the claim connection; `None` means the caller derives one.
    pub claim_client_id: Option<String>,
    /// Delete the claim files once provisioning succeeded.
    pub delete_claim: bool,
    /// When the device key is lost for good (a cleared TPM), provision a new identity with a new
    /// key from the claim, instead of stopping.
    pub reprovision_when_key_lost: bool,
    pub format: PayloadFormat,
    /// Template parameters by name, resolved by [`ProvisioningSettings::resolve_parameters`].
    pub parameters: BTreeMap<String, ParameterSource>,
}

/// The claim certificate and its key (both PEM).
#[derive(Debug, Clone)]
pub struct ClaimPaths {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// Where the device certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateSource {
    /// The device key is made here and a CSR is signed by AWS (CreateCertificateFromCsr).
    Csr,
    /// AWS makes the key and certificate (CreateKeysAndCertificate); file backend only.
    CloudGenerated,
}

/// Payload format of the fleet provisioning MQTT API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    Json,
    Cbor,
}

/// Where a template parameter's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParameterSource {
    /// The value itself.
    Literal(String),
    /// The trimmed contents of this file.
    File(PathBuf),
    /// The trimmed standard output of this program and its arguments.
    Command(Vec<String>),
}

/// `[key]`: where the device key lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySettings {
    /// A PEM file in the state directory.
    File,
    /// Inside the TPM.
    Tpm {
        /// TCTI configuration, e.g. `device:/dev/tpmrm0` or `swtpm:host=localhost,port=2321`.
        tcti: String,
        /// Keep the key at this persistent handle instead of as blobs in the state directory.
        persistent_handle: Option<u32>,
    },
}

/// A place in a config file: `file:line:column`, both counted from 1, the column in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Why the configuration could not be loaded, or a template parameter not resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("listing config drop-in directory {}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not TOML; `key` is the key the error is in, when the parser got that far.
    #[error("{at}: {}invalid TOML: {message}", key.as_deref().map(|k| format!("key {k}: ")).unwrap_or_default())]
    Syntax {
        at: Location,
        key: Option<String>,
        message: String,
    },
    /// An unknown key, a value of the wrong type, or a value that is out of range or conflicts
    /// with another key.
    #[error("{at}: key {key}: {message}")]
    Invalid {
        at: Location,
        key: String,
        message: String,
    },
    #[error("missing required key {key} (set it in {} or a config.d drop-in)", main.display())]
    Missing { key: &'static str, main: PathBuf },
    #[error("resolving template parameter {name}: reading file {}", path.display())]
    ParameterFile {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Starting or waiting for the command failed.
    #[error("resolving template parameter {name}: running command {command}")]
    ParameterCommand {
        name: String,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("resolving template parameter {name}: command {command} failed ({status}){}", stderr.as_deref().map(|s| format!(": {s}")).unwrap_or_default())]
    ParameterCommandFailed {
        name: String,
        command: String,
        status: ExitStatus,
        /// The first non-empty line the command wrote to stderr.
        stderr: Option<String>,
    },
    #[error(
        "resolving template parameter {name}: command {command} did not finish within {timeout:?}; killed it"
    )]
    ParameterCommandTimeout {
        name: String,
        command: String,
        timeout: Duration,
    },
    /// The file or command gave something that cannot be a value: nothing, non-UTF-8, too much.
    #[error("resolving template parameter {name}: {origin} {problem}")]
    ParameterValue {
        name: String,
        /// `file /path` or ``command `prog arg` ``.
        origin: String,
        problem: String,
    },
}

/// Reads, merges and validates. Errors name the file, the key and the line (and column).
pub fn load(paths: &ConfigPaths) -> Result<Settings, ConfigError> {
    let fragments = files::read_all(paths)?;
    build(&fragments, &paths.main)
}

/// Same, from in-memory (name, text) fragments in order — for unit tests and
/// `iotctl config check FILE`.
pub fn load_fragments(fragments: &[(PathBuf, String)]) -> Result<Settings, ConfigError> {
    let main = fragments.first().map_or_else(
        || PathBuf::from(SYSTEM_CONFIG_FILE),
        |(path, _)| path.clone(),
    );
    build(fragments, &main)
}

fn build(fragments: &[(PathBuf, String)], main: &Path) -> Result<Settings, ConfigError> {
    let mut merged = Layer::default();
    for (path, text) in fragments {
        let source = fragments::Source { path, text };
        let fragment = fragments::parse(&source)?;
        merged.merge(Layer::from_fragment(fragment, &source)?);
    }
    let sources = fragments
        .iter()
        .filter(|(_, text)| !text.is_empty())
        .map(|(path, _)| path.clone())
        .collect();
    settings(merged, main, sources)
}

/// Stage 3: defaults, required keys, rules across keys.
fn settings(merged: Layer, main: &Path, sources: Vec<PathBuf>) -> Result<Settings, ConfigError> {
    let missing = |key| ConfigError::Missing {
        key,
        main: main.to_path_buf(),
    };
    // Destructured so that a key added to `Layer` but forgotten here does not compile.
    let Layer {
        endpoint,
        port,
        alpn,
        ca_bundle,
        keep_alive,
        reply_timeout,
        throttle_retry_max,
        template,
        certificate_source,
        claim_certificate,
        claim_key,
        claim_client_id,
        delete_claim,
        reprovision_when_key_lost,
        format,
        parameters,
        backend,
        tcti,
        persistent_handle,
        state_dir,
    } = merged;

    let endpoint = endpoint.ok_or_else(|| missing("cloud.endpoint"))?.value;
    let template = template
        .ok_or_else(|| missing("provisioning.template"))?
        .value;
    let port = port.map_or(DEFAULT_PORT, |p| p.value);

    let key = match backend.as_ref().map_or(Backend::File, |b| b.value) {
        Backend::File => {
            // Not an error: an image may set the TPM details in a drop-in and an admin switch
            // the backend back to `file` in a later one.
            for (name, at) in [
                ("key.tcti", tcti.map(|t| t.at)),
                ("key.persistent_handle", persistent_handle.map(|h| h.at)),
            ] {
                if let Some(at) = at {
                    tracing::warn!(%at, "ignoring {name}: it applies only to key.backend = \"tpm\"");
                }
            }
            KeySettings::File
        }
        Backend::Tpm => KeySettings::Tpm {
            tcti: tcti.map_or_else(|| DEFAULT_TCTI.to_owned(), |t| t.value),
            persistent_handle: persistent_handle.map(|h| h.value),
        },
    };

    if let (Some(source), Some(backend)) = (&certificate_source, &backend)
        && source.value == CertificateSource::CloudGenerated
        && backend.value == Backend::Tpm
    {
        return Err(ConfigError::Invalid {
            at: source.at.clone(),
            key: "provisioning.certificate_source".to_owned(),
            message: format!(
                "\"cloud-generated\" needs key.backend = \"file\" (key.backend = \"tpm\" at {}): \
                 a TPM key never leaves the TPM",
                backend.at
            ),
        });
    }

    let claim = match (claim_certificate, claim_key) {
        (None, None) => None,
        (Some(certificate), Some(key)) => Some(ClaimPaths {
            certificate: certificate.value,
            key: key.value,
        }),
        (Some(only), None) => return Err(half_claim(only, "claim_certificate", "claim_key")),
        (None, Some(only)) => return Err(half_claim(only, "claim_key", "claim_certificate")),
    };

    Ok(Settings {
        cloud: CloudSettings {
            endpoint,
            port,
            alpn: alpn.map_or(port == ALPN_PORT, |a| a.value),
            ca_bundle: ca_bundle.map(|c| c.value),
            keep_alive: keep_alive
                .map_or(Duration::from_secs(DEFAULT_KEEP_ALIVE_SECS), |k| k.value),
            reply_timeout: reply_timeout
                .map_or(Duration::from_secs(DEFAULT_REPLY_TIMEOUT_SECS), |r| r.value),
            throttle_retry_max: throttle_retry_max
                .map_or(Duration::from_secs(DEFAULT_THROTTLE_RETRY_MAX_SECS), |t| {
                    t.value
                }),
        },
        provisioning: ProvisioningSettings {
            template,
            certificate_source: certificate_source.map_or(CertificateSource::Csr, |c| c.value),
            claim,
            claim_client_id: claim_client_id.map(|c| c.value),
            delete_claim: delete_claim.is_some_and(|d| d.value),
            reprovision_when_key_lost: reprovision_when_key_lost.is_none_or(|r| r.value),
            format: format.map_or(PayloadFormat::Json, |f| f.value),
            parameters: parameters.into_iter().map(|(k, v)| (k, v.value)).collect(),
        },
        key,
        state_dir: state_dir.map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |d| d.value),
        sources,
    })
}

/// One of the two claim paths is set and the other is not: a claim needs both.
fn half_claim(set: Located<PathBuf>, set_key: &str, other_key: &str) -> ConfigError {
    ConfigError::Invalid {
        at: set.at,
        key: format!("provisioning.{set_key}"),
        message: format!("is set but provisioning.{other_key} is not (set both, or neither)"),
    }
}
