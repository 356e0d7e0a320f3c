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
    /// Read first.
    pub main: PathBuf,
    /// Whether a missing main file is an error ([`ConfigError::MissingFile`]). The system's
    /// may be missing, because an image may ship only drop-ins; a file named on the command
    /// line that is not there is a typo, which would otherwise show up as a missing key.
    pub main_required: bool,
    /// Drop-in directories, lowest priority first; missing directories are skipped.
    pub dropin_dirs: Vec<PathBuf>,
}

impl ConfigPaths {
    /// `/etc/iotd/config.toml` (which may be missing) and the three system drop-in directories.
    pub fn system() -> Self {
        Self {
            main: PathBuf::from(SYSTEM_CONFIG_FILE),
            main_required: false,
            dropin_dirs: SYSTEM_DROPIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// `path` as the main file, which must exist, and `<its directory>/config.d/` as the only
    /// drop-in directory (`--config PATH`, tests).
    pub fn for_main(path: &Path) -> Self {
        let dir = path.parent().unwrap_or(Path::new(""));
        Self {
            main: path.to_path_buf(),
            main_required: true,
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
    pub onboarding: OnboardingSettings,
    pub rotation: RotationSettings,
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
    /// Where the fleet's backend is told about certificates iotd gave up (`{thing}` is the
    /// thing name); empty: nowhere.
    pub report_topic: String,
}

/// `cloud.report_topic` when no file sets it.
pub const DEFAULT_REPORT_TOPIC: &str = "iotd/{thing}/certificates";

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

/// `[onboarding]`: trusted-user onboarding (an installer hands the gateway a claim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnboardingSettings {
    /// The gateway's serial as printed on its label: SPAKE2+'s idVerifier, and in the QR
    /// payload. Resolved by [`OnboardingSettings::resolve_serial`]; `None` when not configured.
    pub serial: Option<ParameterSource>,
    /// The gateway's model, announced with the serial while the window is open (DNS-SD TXT
    /// `model=`). Resolved by [`OnboardingSettings::resolve_model`]; `None` when not configured
    /// (the announcement then reads the device tree's or DMI's model).
    pub model: Option<ParameterSource>,
    /// Where the onboarding server listens.
    pub listen: std::net::SocketAddr,
    /// The templates an installer's claim may name; the configured template when not set.
    pub allowed_templates: Vec<String>,
    /// The endpoints an installer's claim may name; the configured endpoint when not set.
    pub allowed_endpoints: Vec<String>,
    /// Template parameters an installer may supply (e.g. Site); never one the gateway sources
    /// itself (provisioning.parameters).
    pub installer_parameters: Vec<String>,
    /// Interfaces that are direct links to the installer (the setup access point, a USB
    /// gadget, a cable): the installer's page and the browser API are served there on plain
    /// HTTP. Empty: the page is not served.
    pub page_interfaces: Vec<String>,
    /// Interfaces on shared networks where the page is served all the same, by explicit
    /// choice; the page then warns that `iotctl onboard` or an app is the safe path.
    pub page_shared_interfaces: Vec<String>,
    /// The page's TCP port on those interfaces.
    pub page_port: u16,
}

/// The port of the installer's page when no file sets it.
pub const DEFAULT_PAGE_PORT: u16 = 8080;

/// The port of `onboarding.listen` when no file sets it (on all IPv4 addresses).
pub const DEFAULT_ONBOARDING_PORT: u16 = 8443;

impl OnboardingSettings {
    /// Resolves `onboarding.serial` now (a file read, a command run with a 5 s timeout), like a
    /// template parameter; `None` when it is not configured. The value is not checked here as
    /// a serial: the caller does that, naming the key.
    pub fn resolve_serial(&self) -> Result<Option<String>, ConfigError> {
        self.resolve_serial_within(PARAMETER_COMMAND_TIMEOUT)
    }

    fn resolve_serial_within(&self, timeout: Duration) -> Result<Option<String>, ConfigError> {
        let Some(source) = &self.serial else {
            return Ok(None);
        };
        let sources = BTreeMap::from([(ONBOARDING_SERIAL_NAME.to_owned(), source.clone())]);
        let mut values = parameters::resolve_all(&sources, timeout).map_err(|cause| {
            ConfigError::OnboardingSerial {
                cause: Box::new(cause),
            }
        })?;
        Ok(values.remove(ONBOARDING_SERIAL_NAME))
    }

    /// Resolves `onboarding.model` now, like [`OnboardingSettings::resolve_serial`] (it blocks
    /// for up to 5 s); `None` when it is not configured.
    pub fn resolve_model(&self) -> Result<Option<String>, ConfigError> {
        let Some(source) = &self.model else {
            return Ok(None);
        };
        let sources = BTreeMap::from([(ONBOARDING_MODEL_NAME.to_owned(), source.clone())]);
        let mut values =
            parameters::resolve_all(&sources, PARAMETER_COMMAND_TIMEOUT).map_err(|cause| {
                ConfigError::OnboardingModel {
                    cause: Box::new(cause),
                }
            })?;
        Ok(values.remove(ONBOARDING_MODEL_NAME))
    }
}

/// The name `onboarding.serial` is resolved under by the template parameter resolver, whose
/// messages name `provisioning.parameters.<name>`; [`ConfigError::OnboardingSerial`] puts the
/// right key in their place.
const ONBOARDING_SERIAL_NAME: &str = "serial";
/// The same for `onboarding.model` and [`ConfigError::OnboardingModel`].
const ONBOARDING_MODEL_NAME: &str = "model";

/// A resolver message about `onboarding.<name>`, with its key in place of the template
/// parameter's.
fn onboarding_key_message(name: &str, cause: &ConfigError) -> String {
    let message = cause.to_string();
    let parameter = parameter_context(name);
    match message.strip_prefix(&parameter) {
        Some(rest) => format!("resolving onboarding.{name}{rest}"),
        None => message,
    }
}

/// `[rotation]`: replacing the certificate before it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationSettings {
    /// How long before notAfter to rotate.
    pub renew_before: Span,
    /// Rotate when the certificate is older than this (since notBefore); `None`: no age limit.
    pub max_age: Option<Duration>,
    /// The per-device spread before the due time, so that a fleet whose certificates were issued
    /// together does not rotate together.
    pub jitter: Span,
    /// After a failed (rolled back) rotation, try again after this.
    pub retry_interval: Duration,
    /// The provisioning template RegisterThing uses for a rotation; `None` means
    /// `provisioning.template`.
    pub template: Option<String>,
    /// Where the rotation report goes (`{thing}` is the thing name); empty: nowhere.
    pub report_topic: String,
    /// How long the previous key and certificate are kept after a rotation committed (the
    /// fallback if the new certificate is refused), then deleted; zero deletes them at once.
    pub grace_period: Duration,
    /// Trust the system clock without systemd-timesyncd's synchronised flag (gateways with an
    /// RTC).
    pub trust_clock: bool,
}

/// A length of time given either as a share of a certificate's lifetime or as a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// 0 to 100 (percent).
    Percent(u8),
    Duration(Duration),
}

/// As the configuration writes it: `20%`, `30d`, `1d12h`, `0s`.
impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Span::Percent(percent) => write!(f, "{percent}%"),
            Span::Duration(duration) => {
                let mut seconds = duration.as_secs();
                if seconds == 0 {
                    return f.write_str("0s");
                }
                for (unit, length) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
                    if seconds >= length {
                        write!(f, "{}{unit}", seconds / length)?;
                        seconds %= length;
                    }
                }
                Ok(())
            }
        }
    }
}

/// `rotation.report_topic` when no file sets it.
pub const DEFAULT_ROTATION_REPORT_TOPIC: &str = "iotd/{thing}/rotation";
/// `rotation.renew_before` when no file sets it: a year's certificate is renewed 73 days before
/// it expires, time enough for a gateway that is offline for weeks.
const DEFAULT_RENEW_BEFORE: Span = Span::Percent(20);
const DEFAULT_ROTATION_JITTER: Span = Span::Percent(10);
/// Long enough that a rotation AWS refuses (a disabled template, a policy without the
/// provisioning topics) does not cost a request a minute per gateway; short enough that a
/// passing outage delays it by no more than an hour.
const DEFAULT_ROTATION_RETRY_INTERVAL: Duration = Duration::from_secs(3600);
/// A week covers a new certificate that AWS refuses only later (deactivated by a backend that
/// has not caught up), and a gateway switched off over a holiday.
const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(7 * 86_400);

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
///
/// The message (`Display`) is what reaches users, so it carries the cause, such as the OS
/// error, itself; no variant also has a `source`, which would print the cause twice in a
/// chain of causes.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {}: {error}", path.display())]
    ReadFile { path: PathBuf, error: io::Error },
    /// The file is not UTF-8; where the first byte that is not UTF-8 text is.
    #[error(
        "reading config file {}: it is not UTF-8 text (byte {byte:#04x} at line {line}, column \
         {column}); save it as UTF-8",
        path.display()
    )]
    NotUtf8 {
        path: PathBuf,
        byte: u8,
        line: usize,
        column: usize,
    },
    /// A main file that must exist ([`ConfigPaths::main_required`]) does not.
    #[error("config file {} does not exist", path.display())]
    MissingFile { path: PathBuf },
    #[error("listing config drop-in directory {}: {error}", path.display())]
    ReadDir { path: PathBuf, error: io::Error },
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
    /// Reading a `{ file = "…" }` parameter failed.
    #[error(
        "{}: reading file {}: {error}{}",
        parameter_context(name),
        path.display(),
        file_remedy(error)
    )]
    ParameterFile {
        name: String,
        path: PathBuf,
        error: io::Error,
    },
    /// Starting a `{ command = […] }` parameter's command, or waiting for it, failed.
    #[error(
        "{}: running command {command}: {error}{}",
        parameter_context(name),
        command_remedy(error)
    )]
    ParameterCommand {
        name: String,
        command: String,
        error: io::Error,
    },
    #[error("{}: command {command} failed ({status}){}", parameter_context(name), stderr.as_deref().map(|s| format!(": {s}")).unwrap_or_default())]
    ParameterCommandFailed {
        name: String,
        command: String,
        status: ExitStatus,
        /// The first non-empty line the command wrote to stderr.
        stderr: Option<String>,
    },
    #[error(
        "{}: command {command} did not finish within {timeout:?}; killed it",
        parameter_context(name)
    )]
    ParameterCommandTimeout {
        name: String,
        command: String,
        timeout: Duration,
    },
    /// The file or command gave something that cannot be a value: nothing, non-UTF-8, too much.
    #[error("{}: {}", parameter_context(name), value_problem(origin, *problem))]
    ParameterValue {
        name: String,
        origin: ValueOrigin,
        problem: ValueProblem,
    },
    /// Resolving `onboarding.serial` (a file or command) failed; `cause` is the resolver's
    /// error, and the message names the key in its place.
    #[error("{}", onboarding_key_message(ONBOARDING_SERIAL_NAME, cause))]
    OnboardingSerial { cause: Box<ConfigError> },
    /// Resolving `onboarding.model` failed, as for [`ConfigError::OnboardingSerial`].
    #[error("{}", onboarding_key_message(ONBOARDING_MODEL_NAME, cause))]
    OnboardingModel { cause: Box<ConfigError> },
}

/// Where a template parameter's value was read from, for [`ConfigError::ParameterValue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueOrigin {
    File(PathBuf),
    /// The command as [`ConfigError::ParameterCommand`] shows it, in backticks.
    Command(String),
}

/// What is wrong with a template parameter's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueProblem {
    /// Nothing but whitespace and NUL bytes.
    Empty,
    NotUtf8,
    /// Over [`MAX_PARAMETER_BYTES`].
    TooLong,
}

/// More than this from a file or command is not a parameter value but a wrong path.
pub const MAX_PARAMETER_BYTES: usize = 64 * 1024;

/// ENOEXEC on Linux: the kernel cannot execute the file (a script without `#!`, a program for
/// another architecture). std has no `io::ErrorKind` for it.
const EXEC_FORMAT_ERROR: i32 = 8;

impl ConfigError {
    /// Whether trying again later may succeed without anyone changing the gateway: the daemon
    /// retries transient errors with a backoff and stops, showing the cause, on permanent ones.
    ///
    /// Transient, because what a parameter reads may not be ready yet at boot (a sysfs node
    /// whose driver is still probing, a command whose service has not started):
    /// - a parameter command that ran but failed: non-zero exit, killed by a signal, timed out,
    ///   or printed nothing, too much or something that is not UTF-8;
    /// - a parameter command that could not be started, or waited for, for any other reason
    ///   than those below (no memory, too many processes);
    /// - a parameter file that could not be read, missing included, except as below;
    /// - a parameter file that holds only whitespace (a sysfs value not filled in yet).
    ///
    /// Permanent, because only a change to the gateway helps:
    /// - a parameter command whose program does not exist, may not be executed or is not an
    ///   executable at all;
    /// - a parameter file that iotd may not read or that is a directory, or that holds more
    ///   than 64 KiB or text that is not UTF-8: a wrong path or missing permissions;
    /// - every error that is not about a template parameter: the configuration itself is
    ///   wrong, or its files cannot be read.
    pub fn is_transient(&self) -> bool {
        match self {
            ConfigError::ParameterFile { error, .. } => !matches!(
                error.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::IsADirectory
            ),
            ConfigError::ParameterCommand { error, .. } => !is_not_runnable(error),
            ConfigError::ParameterCommandFailed { .. }
            | ConfigError::ParameterCommandTimeout { .. } => true,
            ConfigError::ParameterValue {
                origin: ValueOrigin::Command(_),
                ..
            } => true,
            ConfigError::ParameterValue {
                origin: ValueOrigin::File(_),
                problem,
                ..
            } => *problem == ValueProblem::Empty,
            ConfigError::OnboardingSerial { cause } | ConfigError::OnboardingModel { cause } => {
                cause.is_transient()
            }
            ConfigError::ReadFile { .. }
            | ConfigError::NotUtf8 { .. }
            | ConfigError::MissingFile { .. }
            | ConfigError::ReadDir { .. }
            | ConfigError::Syntax { .. }
            | ConfigError::Invalid { .. }
            | ConfigError::Missing { .. } => false,
        }
    }

    /// The name of the template parameter the error is about (as in
    /// `provisioning.parameters.NAME`), if it is about one.
    pub fn parameter(&self) -> Option<&str> {
        match self {
            ConfigError::ParameterFile { name, .. }
            | ConfigError::ParameterCommand { name, .. }
            | ConfigError::ParameterCommandFailed { name, .. }
            | ConfigError::ParameterCommandTimeout { name, .. }
            | ConfigError::ParameterValue { name, .. } => Some(name),
            // Resolved like one, but not a template parameter.
            ConfigError::OnboardingSerial { .. } | ConfigError::OnboardingModel { .. } => None,
            ConfigError::ReadFile { .. }
            | ConfigError::NotUtf8 { .. }
            | ConfigError::MissingFile { .. }
            | ConfigError::ReadDir { .. }
            | ConfigError::Syntax { .. }
            | ConfigError::Invalid { .. }
            | ConfigError::Missing { .. } => None,
        }
    }
}

/// The spawn errors no retry can cure: the program is missing, not executable, or not a
/// program (also the empty command, which the config refuses before it gets here).
fn is_not_runnable(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput
    ) || error.raw_os_error() == Some(EXEC_FORMAT_ERROR)
}

/// The start of every parameter error: the action, named by the key it comes from.
fn parameter_context(name: &str) -> String {
    format!(
        "resolving template parameter provisioning.parameters.{}",
        fragments::key_segment(name)
    )
}

fn file_remedy(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::PermissionDenied => "; make it readable by user iotd",
        _ => "",
    }
}

fn command_remedy(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::NotFound => "; install it, or give the program's absolute path",
        io::ErrorKind::PermissionDenied => "; make it executable by user iotd",
        _ => "",
    }
}

fn value_problem(origin: &ValueOrigin, problem: ValueProblem) -> String {
    let limit = MAX_PARAMETER_BYTES / 1024;
    match (origin, problem) {
        (ValueOrigin::File(path), ValueProblem::Empty) => {
            format!("file {} holds no value (only whitespace)", path.display())
        }
        (ValueOrigin::File(path), ValueProblem::NotUtf8) => {
            format!("file {} holds text that is not UTF-8", path.display())
        }
        (ValueOrigin::File(path), ValueProblem::TooLong) => format!(
            "file {} holds over {limit} KiB; is it the right file?",
            path.display()
        ),
        (ValueOrigin::Command(command), ValueProblem::Empty) => {
            format!("command {command} printed no value (only whitespace)")
        }
        (ValueOrigin::Command(command), ValueProblem::NotUtf8) => {
            format!("command {command} printed text that is not UTF-8")
        }
        (ValueOrigin::Command(command), ValueProblem::TooLong) => {
            format!("command {command} printed output over {limit} KiB; is it the right command?")
        }
    }
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
        report_topic,
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
        onboarding_serial,
        onboarding_model,
        onboarding_listen,
        allowed_templates,
        allowed_endpoints,
        installer_parameters,
        page_interfaces,
        page_shared_interfaces,
        page_port,
        rotation_renew_before,
        rotation_max_age,
        rotation_jitter,
        rotation_retry_interval,
        rotation_template,
        rotation_report_topic,
        rotation_grace_period,
        rotation_trust_clock,
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

    // An interface is a direct link or a shared network, not both: which warning the page shows
    // depends on it.
    if let (Some(direct), Some(shared)) = (&page_interfaces, &page_shared_interfaces)
        && let Some(both) = shared.value.iter().find(|name| direct.value.contains(name))
    {
        return Err(ConfigError::Invalid {
            at: shared.at.clone(),
            key: "onboarding.page_shared_interfaces".to_owned(),
            message: format!(
                "{both:?} is also in onboarding.page_interfaces (at {}): an interface is either \
                 a direct link or a shared network",
                direct.at
            ),
        });
    }

    // Refused when both are written; when only delete_claim is, reprovision_when_key_lost
    // defaults to false (below), so the two never hold together.
    if let (Some(delete), Some(reprovision)) = (&delete_claim, &reprovision_when_key_lost)
        && delete.value
        && reprovision.value
    {
        return Err(ConfigError::Invalid {
            at: delete.at.clone(),
            key: "provisioning.delete_claim".to_owned(),
            message: format!(
                "true cannot be combined with provisioning.reprovision_when_key_lost = true \
                 (at {}): deleting the claim after provisioning leaves nothing to provision a new \
                 identity with when the device key is lost; set one of them to false",
                reprovision.at
            ),
        });
    }

    let deletes_claim = delete_claim.as_ref().is_some_and(|d| d.value);
    // An installer's claim may name the configured template and endpoint unless the
    // configuration lists others.
    let default_templates = vec![template.clone()];
    let default_endpoints = vec![endpoint.clone()];
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
            report_topic: report_topic.map_or_else(|| DEFAULT_REPORT_TOPIC.to_owned(), |t| t.value),
        },
        provisioning: ProvisioningSettings {
            template,
            certificate_source: certificate_source.map_or(CertificateSource::Csr, |c| c.value),
            claim,
            claim_client_id: claim_client_id.map(|c| c.value),
            delete_claim: deletes_claim,
            reprovision_when_key_lost: reprovision_when_key_lost
                .map_or(!deletes_claim, |r| r.value),
            format: format.map_or(PayloadFormat::Json, |f| f.value),
            parameters: parameters.into_iter().map(|(k, v)| (k, v.value)).collect(),
        },
        key,
        state_dir: state_dir.map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |d| d.value),
        onboarding: OnboardingSettings {
            serial: onboarding_serial.map(|s| s.value),
            model: onboarding_model.map(|m| m.value),
            listen: onboarding_listen.map_or_else(
                || std::net::SocketAddr::from(([0, 0, 0, 0], DEFAULT_ONBOARDING_PORT)),
                |l| l.value,
            ),
            allowed_templates: allowed_templates.map_or(default_templates, |t| t.value),
            allowed_endpoints: allowed_endpoints.map_or(default_endpoints, |e| e.value),
            installer_parameters: installer_parameters.map(|p| p.value).unwrap_or_default(),
            page_interfaces: page_interfaces.map(|p| p.value).unwrap_or_default(),
            page_shared_interfaces: page_shared_interfaces.map(|p| p.value).unwrap_or_default(),
            page_port: page_port.map_or(DEFAULT_PAGE_PORT, |p| p.value),
        },
        rotation: RotationSettings {
            renew_before: rotation_renew_before.map_or(DEFAULT_RENEW_BEFORE, |r| r.value),
            max_age: rotation_max_age.and_then(|m| m.value),
            jitter: rotation_jitter.map_or(DEFAULT_ROTATION_JITTER, |j| j.value),
            retry_interval: rotation_retry_interval
                .map_or(DEFAULT_ROTATION_RETRY_INTERVAL, |r| r.value),
            template: rotation_template.map(|t| t.value),
            report_topic: rotation_report_topic
                .map_or_else(|| DEFAULT_ROTATION_REPORT_TOPIC.to_owned(), |t| t.value),
            grace_period: rotation_grace_period.map_or(DEFAULT_GRACE_PERIOD, |g| g.value),
            trust_clock: rotation_trust_clock.is_some_and(|t| t.value),
        },
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
