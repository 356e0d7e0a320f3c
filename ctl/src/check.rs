//! `iotctl check`: a list of checks in the style of `aziotctl check`, each with a stable id
//! (for `--dont-run` and scripts) and a result with a message that says what was found.
//!
//! The checks read the configuration (`iotd::config::load`, the same code iotd runs) and the
//! state directory directly, so they work while iotd is stopped or crash-looping, which is
//! when they are needed. Facts several checks use (settings, state, the key, the endpoint's
//! addresses) are computed once, on first use, in `Context`; so a check that is not run
//! (`--dont-run`) does not stop the ones after it from working.
//!
//! Unlike aziotctl, a failed check makes the exit code 1 (and a warning too, with
//! `--warnings-as-errors`).

use std::io::{self, Read as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iotd::config::{ConfigPaths, KeySettings, Settings};
use iotd::keys::{DeviceKey, KeyBackend};
use iotd::store::{State, Store};
use iotd::tls::{ServerTrust, TlsIdentity};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::clock::{self, ClockState};
use crate::status::{CERTIFICATE_WARNING_DAYS, rfc3339};

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    Ok(String),
    Warning(String),
    Skipped(String),
    Failed(String),
}

impl CheckResult {
    /// The `result` value in `--json`.
    pub fn name(&self) -> &'static str {
        match self {
            CheckResult::Ok(_) => "ok",
            CheckResult::Warning(_) => "warning",
            CheckResult::Skipped(_) => "skipped",
            CheckResult::Failed(_) => "failed",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            CheckResult::Ok(m)
            | CheckResult::Warning(m)
            | CheckResult::Skipped(m)
            | CheckResult::Failed(m) => m,
        }
    }
}

/// One check: a stable id, what it checks (said as the good outcome), and the function.
#[derive(Debug)]
pub struct Check {
    pub id: &'static str,
    pub description: &'static str,
    pub run: fn(&mut Context<'_>) -> CheckResult,
}

/// Every check, in the order they run (and are printed).
pub const CHECKS: &[Check] = &[
    Check {
        id: "config-valid",
        description: "configuration is valid",
        run: config_valid,
    },
    Check {
        id: "tpm-reachable",
        description: "TPM is reachable",
        run: tpm_reachable,
    },
    Check {
        id: "key-certificate-match",
        description: "device certificate certifies the device key",
        run: key_certificate_match,
    },
    Check {
        id: "certificate-validity",
        description: "device certificate is valid",
        run: certificate_validity,
    },
    Check {
        id: "clock-synchronised",
        description: "system clock is synchronised",
        run: clock_synchronised,
    },
    Check {
        id: "endpoint-resolves",
        description: "endpoint host name resolves",
        run: endpoint_resolves,
    },
    Check {
        id: "endpoint-tcp",
        description: "endpoint accepts TCP connections",
        run: endpoint_tcp,
    },
    Check {
        id: "endpoint-tls",
        description: "TLS with the endpoint works with the device identity",
        run: endpoint_tls,
    },
    Check {
        id: "claim-validity",
        description: "claim certificate is valid and accepted",
        run: claim_validity,
    },
];

/// How long DNS, TCP connects, TLS handshakes and clock commands may take each: long enough
/// for a cellular link, short enough that a check run does not look hung.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(10);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
const TPM_TIMEOUT: Duration = Duration::from_secs(20);
/// After a TLS 1.3 handshake the client has sent its certificate, but the server's verdict
/// (an alert) comes after; this long without one counts as accepted. AWS IoT answers a bad
/// certificate within a round trip.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);

/// The key and certificate chain of an identity, loaded once.
#[derive(Clone)]
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn DeviceKey>,
    cert_path: PathBuf,
}

/// What the checks share: the inputs, and facts computed on first use.
pub struct Context<'a> {
    paths: ConfigPaths,
    now: OffsetDateTime,
    runtime: &'a tokio::runtime::Runtime,
    settings: Option<Result<Settings, String>>,
    state: Option<Result<State, String>>,
    backend: Option<Result<Arc<dyn KeyBackend>, String>>,
    identity: Option<Result<Option<Identity>, String>>,
    addresses: Option<Result<Vec<SocketAddr>, String>>,
    reachable: Option<Result<SocketAddr, String>>,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// The first line of what a prerequisite failed with, for "skipped because" messages.
fn because(what: &str, error: &str) -> CheckResult {
    CheckResult::Skipped(format!(
        "{what} failed: {}",
        error.lines().next().unwrap_or(error)
    ))
}

impl<'a> Context<'a> {
    pub fn new(
        paths: ConfigPaths,
        now: OffsetDateTime,
        runtime: &'a tokio::runtime::Runtime,
    ) -> Self {
        Self {
            paths,
            now,
            runtime,
            settings: None,
            state: None,
            backend: None,
            identity: None,
            addresses: None,
            reachable: None,
        }
    }

    fn settings(&mut self) -> Result<&Settings, String> {
        let paths = &self.paths;
        self.settings
            .get_or_insert_with(|| iotd::config::load(paths).map_err(|e| error_chain(&e)))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn state(&mut self) -> Result<&State, String> {
        if self.state.is_none() {
            let loaded = match self.settings() {
                Ok(s) => read_state(&s.state_dir.clone()),
                Err(_) => Err("the configuration is not valid (see config-valid)".to_owned()),
            };
            self.state = Some(loaded);
        }
        self.state
            .as_ref()
            .map(|s| s.as_ref().map_err(Clone::clone))
            .unwrap_or_else(|| Err("no state".into()))
    }

    /// The key backend the configuration names. Opening the TPM may block (a TCTI without
    /// resource manager that iotd holds), so it runs on a thread with a deadline.
    fn backend(&mut self) -> Result<Arc<dyn KeyBackend>, String> {
        if self.backend.is_none() {
            let opened = match self.settings() {
                Err(e) => Err(e),
                Ok(s) => {
                    let (key, dir) = (s.key.clone(), s.state_dir.clone());
                    open_backend(key, dir)
                }
            };
            self.backend = Some(opened);
        }
        self.backend
            .clone()
            .unwrap_or_else(|| Err("no key backend".into()))
    }

    /// The device identity of the current step, if there is one (a certificate was issued).
    fn identity(&mut self) -> Result<Option<Identity>, String> {
        if self.identity.is_none() {
            let loaded = self.load_identity();
            self.identity = Some(loaded);
        }
        self.identity
            .clone()
            .unwrap_or_else(|| Err("no identity".into()))
    }

    fn load_identity(&mut self) -> Result<Option<Identity>, String> {
        let Some(generation) = certificate_generation(self.state()?) else {
            return Ok(None);
        };
        let state_dir = self.settings()?.state_dir.clone();
        let cert_path = certificate_path(&state_dir, generation);
        let chain = iotd::tls::read_chain(&cert_path).map_err(|e| error_chain(&e))?;
        let backend = self.backend()?;
        let key = with_deadline(TPM_TIMEOUT, "loading the device key", move || {
            backend.load(generation).map_err(|e| error_chain(&e))
        })?
        .ok_or_else(|| {
            format!(
                "the device key of generation {generation} is missing (its certificate is {}); \
                 the identity cannot be used: iotctl reprovision",
                cert_path.display()
            )
        })?;
        Ok(Some(Identity {
            chain,
            key,
            cert_path,
        }))
    }

    fn addresses(&mut self) -> Result<Vec<SocketAddr>, String> {
        if self.addresses.is_none() {
            let resolved = match self.settings() {
                Err(e) => Err(e),
                Ok(s) => {
                    let port = s.cloud.port;
                    let host = self.host()?;
                    self.resolve(&host, port)
                }
            };
            self.addresses = Some(resolved);
        }
        self.addresses
            .clone()
            .unwrap_or_else(|| Err("no addresses".into()))
    }

    fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let lookup = async {
            tokio::time::timeout(NETWORK_TIMEOUT, tokio::net::lookup_host((host, port))).await
        };
        match self.runtime.block_on(lookup) {
            Err(_) => Err(format!(
                "resolving {host}: no answer within {} s",
                NETWORK_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(format!("resolving {host}: {e}")),
            Ok(Ok(addrs)) => {
                let addrs: Vec<_> = addrs.collect();
                if addrs.is_empty() {
                    Err(format!("resolving {host}: no addresses"))
                } else {
                    Ok(addrs)
                }
            }
        }
    }

    /// The first address of the endpoint that accepts a TCP connection.
    fn reachable(&mut self) -> Result<SocketAddr, String> {
        if self.reachable.is_none() {
            let result = self.connect_any();
            self.reachable = Some(result);
        }
        self.reachable
            .clone()
            .unwrap_or_else(|| Err("not reachable".into()))
    }

    fn connect_any(&mut self) -> Result<SocketAddr, String> {
        let addrs = self.addresses()?;
        let target = self.endpoint()?;
        let mut errors = Vec::new();
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, NETWORK_TIMEOUT) {
                Ok(_) => return Ok(*addr),
                Err(e) => errors.push((addr, io_message(&e))),
            }
        }
        // Name each address only when it says something the endpoint does not.
        let detail = match errors.as_slice() {
            [(addr, e)] if addr.to_string() == target => e.clone(),
            _ => errors
                .iter()
                .map(|(addr, e)| format!("{addr}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        };
        Err(format!("connecting to {target}: {detail}"))
    }

    fn endpoint(&mut self) -> Result<String, String> {
        let port = self.settings()?.cloud.port;
        Ok(format!("{}:{port}", self.host()?))
    }

    /// The endpoint's host: where the gateway's certificate belongs (an installer's claim can
    /// have made it another allowed endpoint's), or `cloud.endpoint`.
    fn host(&mut self) -> Result<String, String> {
        let configured = self.settings()?.cloud.endpoint.clone();
        // Without the state (not root, or none yet) the configured endpoint is the one.
        let remembered = self
            .state()
            .ok()
            .and_then(|s| s.endpoint().map(str::to_owned));
        Ok(remembered.unwrap_or(configured))
    }

    /// The trust anchors for the endpoint's certificate; errors name the key and the remedy
    /// as iotd does when it starts.
    fn trust(&mut self) -> Result<ServerTrust, String> {
        match &self.settings()?.cloud.ca_bundle {
            Some(path) => ServerTrust::from_pem_file(path).map_err(|e| {
                format!(
                    "cloud.ca_bundle: {}; point cloud.ca_bundle at a readable PEM file of the CA \
                     that signs the endpoint's certificate, or remove it to use the system trust \
                     store",
                    error_chain(&e)
                )
            }),
            None => ServerTrust::system().map_err(|e| {
                format!(
                    "{}; install the ca-certificates package or set cloud.ca_bundle to the CA \
                     that signs the endpoint's certificate",
                    error_chain(&e)
                )
            }),
        }
    }

    fn run_command(&self, program: &str, args: &[&str]) -> clock::Probe {
        run_command(self.runtime, program, args, COMMAND_TIMEOUT)
    }
}

/// Runs `program args` with a deadline; its success and standard output.
pub fn run_command(
    runtime: &tokio::runtime::Runtime,
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> clock::Probe {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    // Inside the runtime: tokio's Command registers the child's pipes with it when spawning.
    match runtime.block_on(async { tokio::time::timeout(timeout, command.output()).await }) {
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Err("not found".into()),
        Ok(Err(e)) => Err(format!("running it: {e}")),
        Ok(Ok(out)) => Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )),
    }
}

/// "a: b: c", the way the reporter prints any error with its causes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The OS's words without Rust's " (os error 111)".
fn io_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

fn read_state(state_dir: &Path) -> Result<State, String> {
    // A missing directory is a gateway iotd never ran on. Store::open would create it; a
    // check must not change the system.
    if !state_dir.exists() {
        return Ok(State::default());
    }
    // Read only: iotd may be running, and it owns the state (it holds the directory's lock).
    let store = Store::open(state_dir).map_err(|e| error_chain(&e))?;
    store.peek().map_err(|e| {
        let text = error_chain(&e);
        if text.contains("Permission denied") {
            format!("{text} (run iotctl check as root)")
        } else {
            text
        }
    })
}

/// The generation whose certificate file exists at this step.
fn certificate_generation(state: &State) -> Option<u32> {
    state.certificate().map(|(generation, _)| generation)
}

/// Where iotd keeps the certificate of `generation` (`Store::certificate_path`, without
/// opening, and so creating, the directory).
fn certificate_path(state_dir: &Path, generation: u32) -> PathBuf {
    state_dir
        .join("gen")
        .join(generation.to_string())
        .join("cert.pem")
}

/// Runs `work` on its own thread and gives up after `deadline`. The thread is left behind if
/// it hangs; iotctl exits soon after anyway.
fn with_deadline<T: Send + 'static>(
    deadline: Duration,
    what: &str,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The receiver may have given up; nothing to do then.
        let _ = tx.send(work());
    });
    rx.recv_timeout(deadline)
        .unwrap_or_else(|_| Err(format!("{what}: no answer within {} s", deadline.as_secs())))
}

/// Opens the configured backend. For the TPM this is what iotd does at start, side effects
/// included: stale transient objects of this connection are flushed, and the SRK is created at
/// 0x81000001 if the TPM has none (iotd would create the same one).
fn open_backend(key: KeySettings, state_dir: PathBuf) -> Result<Arc<dyn KeyBackend>, String> {
    match key {
        KeySettings::File => Ok(Arc::new(iotd::keys::file::FileBackend::new(&state_dir))),
        KeySettings::Tpm {
            tcti,
            persistent_handle,
        } => {
            let what = format!("opening the TPM through {tcti}");
            with_deadline(TPM_TIMEOUT, &what, move || {
                iotd::keys::tpm::TpmBackend::open(&tcti, &state_dir, persistent_handle)
                    .map(|b| Arc::new(b) as Arc<dyn KeyBackend>)
                    .map_err(|e| {
                        format!(
                            "{}; with a TCTI that has no resource manager (device:/dev/tpm0, \
                             swtpm:, mssim:) only one program can use the TPM at a time",
                            error_chain(&e)
                        )
                    })
            })
        }
    }
}

/// Resolves the template parameters as iotd does before it provisions: files read, commands
/// run. Says how many resolved, never their values, which may be secrets; or the first error,
/// which names the parameter and the cause.
pub fn resolve_parameters(settings: &Settings) -> Result<String, String> {
    let values = settings
        .provisioning
        .resolve_parameters()
        .map_err(|e| e.to_string())?;
    Ok(match values.len() {
        0 => "no template parameters".to_owned(),
        1 => "1 template parameter resolved".to_owned(),
        n => format!("{n} template parameters resolved"),
    })
}

fn config_valid(ctx: &mut Context<'_>) -> CheckResult {
    let s = match ctx.settings() {
        Ok(s) => s,
        Err(e) => return CheckResult::Failed(e),
    };
    let files = if s.sources.is_empty() {
        "no files".to_owned()
    } else {
        s.sources
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match resolve_parameters(s) {
        Ok(parameters) => CheckResult::Ok(format!("read {files}; {parameters}")),
        Err(e) => CheckResult::Failed(e),
    }
}

fn tpm_reachable(ctx: &mut Context<'_>) -> CheckResult {
    let tcti = match ctx.settings() {
        Err(e) => return because("config-valid", &e),
        Ok(Settings {
            key: KeySettings::File,
            ..
        }) => return CheckResult::Skipped("key.backend is \"file\"".into()),
        Ok(Settings {
            key: KeySettings::Tpm { tcti, .. },
            ..
        }) => tcti.clone(),
    };
    match ctx.backend() {
        Ok(_) => CheckResult::Ok(format!("opened the TPM through {tcti}")),
        Err(e) => CheckResult::Failed(e),
    }
}

fn key_certificate_match(ctx: &mut Context<'_>) -> CheckResult {
    let step = match ctx.state() {
        Ok(s) => s.step_name(),
        Err(e) => return CheckResult::Failed(e),
    };
    match ctx.identity() {
        Err(e) => CheckResult::Failed(e),
        Ok(None) => CheckResult::Skipped(format!("no certificate yet (step {step})")),
        Ok(Some(id)) => {
            let Some(leaf) = id.chain.first() else {
                return CheckResult::Failed(format!(
                    "{} holds no certificate",
                    id.cert_path.display()
                ));
            };
            match iotd::tls::certificate_spki(leaf) {
                Err(e) => CheckResult::Failed(error_chain(&e)),
                Ok(spki) if spki == id.key.public_key_spki() => CheckResult::Ok(format!(
                    "{} certifies the key ({})",
                    id.cert_path.display(),
                    id.key.location()
                )),
                Ok(_) => CheckResult::Failed(format!(
                    "{} does not certify the key ({}); the identity cannot be used: iotctl reprovision",
                    id.cert_path.display(),
                    id.key.location()
                )),
            }
        }
    }
}

/// Judges a certificate's validity period against `now`; `what` names it.
fn validity(cert: &CertificateDer<'_>, what: &str, now: OffsetDateTime) -> CheckResult {
    let parsed = match X509Certificate::from_der(cert.as_ref()) {
        Ok((_, c)) => c,
        Err(e) => return CheckResult::Failed(format!("parsing {what}: {e}")),
    };
    let now = now.unix_timestamp();
    let not_before = parsed.validity().not_before.timestamp();
    let not_after = parsed.validity().not_after.timestamp();
    if now < not_before {
        return CheckResult::Failed(format!(
            "{what} is not valid before {}: is the system clock right ({})?",
            rfc3339(not_before),
            rfc3339(now)
        ));
    }
    if now >= not_after {
        return CheckResult::Failed(format!(
            "{what} expired at {} ({} days ago)",
            rfc3339(not_after),
            (now - not_after) / 86_400
        ));
    }
    let days = (not_after - now) / 86_400;
    let text = format!(
        "{what} is valid until {} ({days} days left)",
        rfc3339(not_after)
    );
    if days < CERTIFICATE_WARNING_DAYS {
        CheckResult::Warning(text)
    } else {
        CheckResult::Ok(text)
    }
}

fn certificate_validity(ctx: &mut Context<'_>) -> CheckResult {
    let step = match ctx.state() {
        Ok(s) => s.step_name(),
        Err(e) => return because("reading the state", &e),
    };
    match ctx.identity() {
        Err(e) => because("loading the device identity", &e),
        Ok(None) => CheckResult::Skipped(format!("no certificate yet (step {step})")),
        Ok(Some(id)) => match id.chain.first() {
            Some(leaf) => validity(leaf, &id.cert_path.display().to_string(), ctx.now),
            None => CheckResult::Failed(format!("{} holds no certificate", id.cert_path.display())),
        },
    }
}

fn clock_synchronised(ctx: &mut Context<'_>) -> CheckResult {
    match clock::probe(&|program, args| ctx.run_command(program, args)) {
        ClockState::Synchronized(how) => CheckResult::Ok(how),
        ClockState::Unsynchronized(how) => CheckResult::Failed(format!(
            "{how}; certificate validity cannot be trusted until it is"
        )),
        ClockState::Unknown(why) => CheckResult::Warning(why),
    }
}

fn endpoint_resolves(ctx: &mut Context<'_>) -> CheckResult {
    if let Err(e) = ctx.settings() {
        return because("config-valid", &e);
    }
    match ctx.addresses() {
        Ok(addrs) => {
            let host = ctx.host().unwrap_or_default();
            if host.parse::<std::net::IpAddr>().is_ok() {
                return CheckResult::Ok(format!("{host} is an IP address: nothing to resolve"));
            }
            let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            CheckResult::Ok(format!("{host} is {}", list.join(", ")))
        }
        Err(e) => CheckResult::Failed(e),
    }
}

fn endpoint_tcp(ctx: &mut Context<'_>) -> CheckResult {
    if let Err(e) = ctx.settings() {
        return because("config-valid", &e);
    }
    if let Err(e) = ctx.addresses() {
        return because("endpoint-resolves", &e);
    }
    let started = Instant::now();
    match ctx.reachable() {
        Ok(addr) => CheckResult::Ok(format!(
            "connected to {} ({addr}) in {} ms",
            ctx.endpoint().unwrap_or_default(),
            started.elapsed().as_millis()
        )),
        Err(e) => CheckResult::Failed(e),
    }
}

/// A TLS handshake with `addr` as `identity`; then waits `REFUSAL_WAIT` for the server to
/// refuse the client certificate. Answers what was negotiated.
fn handshake(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    addr: SocketAddr,
) -> Result<String, String> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
    let mut conn =
        rustls::ClientConnection::new(config, name).map_err(|e| format!("starting TLS: {e}"))?;
    let mut sock = TcpStream::connect_timeout(&addr, NETWORK_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {}", io_message(&e)))?;
    let tls_error = |e: io::Error| format!("TLS with {host} ({addr}): {}", io_message(&e));
    sock.set_read_timeout(Some(NETWORK_TIMEOUT))
        .map_err(tls_error)?;
    sock.set_write_timeout(Some(NETWORK_TIMEOUT))
        .map_err(tls_error)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(tls_error)?;
    }
    let version = conn
        .protocol_version()
        .map_or_else(|| "TLS".to_owned(), |v| format!("{v:?}"));
    let alpn = conn
        .alpn_protocol()
        .map(|p| format!(", ALPN {}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    sock.set_read_timeout(Some(REFUSAL_WAIT))
        .map_err(tls_error)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut byte = [0u8; 1];
    match tls.read(&mut byte) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(format!(
                "{host} ({addr}) closed the connection right after the handshake: it does not accept the client certificate"
            ));
        }
        Err(e) => return Err(tls_error(e)),
    }
    Ok(format!("{version}{alpn} with {host} ({addr})"))
}

/// A handshake as `identity` with the endpoint, if it is reachable.
fn try_identity(ctx: &mut Context<'_>, identity: TlsIdentity) -> Result<String, String> {
    let trust = ctx.trust()?;
    let alpn = ctx.settings()?.cloud.alpn;
    let host = ctx.host()?;
    let config = iotd::tls::client_config(&trust, identity, alpn).map_err(|e| error_chain(&e))?;
    let addr = ctx.reachable()?;
    with_deadline(NETWORK_TIMEOUT * 3, "the TLS handshake", move || {
        handshake(config, &host, addr)
    })
}

fn endpoint_tls(ctx: &mut Context<'_>) -> CheckResult {
    let (step, registered) = match ctx.state() {
        Ok(s) => (s.step_name(), s.registered()),
        Err(e) => return because("reading the state", &e),
    };
    if !registered {
        return CheckResult::Skipped(format!(
            "no usable device identity yet (step {step}); claim-validity tries the claim"
        ));
    }
    let id = match ctx.identity() {
        Ok(Some(id)) => id,
        Ok(None) => return CheckResult::Skipped("no device certificate".into()),
        Err(e) => return because("loading the device identity", &e),
    };
    if let Err(e) = ctx.reachable() {
        return because("endpoint-tcp", &e);
    }
    let identity = TlsIdentity {
        chain: id.chain,
        key: id.key,
    };
    match try_identity(ctx, identity) {
        Ok(done) => CheckResult::Ok(format!("handshake as the device: {done}")),
        Err(e) => CheckResult::Failed(e),
    }
}

/// What to do about a claim file that is missing or unusable.
const CLAIM_REMEDY: &str = "install the claim (certificate and key, PEM) there, or onboard the \
                            gateway";

fn claim_validity(ctx: &mut Context<'_>) -> CheckResult {
    let (step, registered) = match ctx.state() {
        Ok(s) => (s.step_name(), s.registered()),
        Err(e) => return because("reading the state", &e),
    };
    if registered {
        return CheckResult::Skipped(format!(
            "the gateway has its own identity (step {step}); the claim is no longer used"
        ));
    }
    let claim = match ctx.settings() {
        Err(e) => return because("config-valid", &e),
        Ok(s) => s.provisioning.claim.clone(),
    };
    let Some(claim) = claim else {
        return CheckResult::Warning(
            "no claim is configured (provisioning.claim_certificate, provisioning.claim_key): \
             the gateway provisions only when onboarding hands it one"
                .into(),
        );
    };
    for (key, path) in [
        ("provisioning.claim_certificate", &claim.certificate),
        ("provisioning.claim_key", &claim.key),
    ] {
        if !path.exists() {
            return CheckResult::Failed(format!(
                "{key} {} does not exist; {CLAIM_REMEDY}",
                path.display()
            ));
        }
    }
    let chain = match iotd::tls::read_chain(&claim.certificate) {
        Ok(c) => c,
        Err(e) => {
            return CheckResult::Failed(format!(
                "provisioning.claim_certificate: {}; {CLAIM_REMEDY}",
                error_chain(&e)
            ));
        }
    };
    let key = match iotd::keys::file::load_pem_file(&claim.key) {
        Ok(k) => k,
        Err(e) => {
            return CheckResult::Failed(format!(
                "provisioning.claim_key: {}; {CLAIM_REMEDY}",
                error_chain(&e)
            ));
        }
    };
    let what = format!("claim certificate {}", claim.certificate.display());
    let validity = match chain.first() {
        Some(leaf) => validity(leaf, &what, ctx.now),
        None => return CheckResult::Failed(format!("{what} holds no certificate")),
    };
    if let CheckResult::Failed(_) = validity {
        return validity;
    }
    if let Err(e) = ctx.reachable() {
        let note = format!(
            "{}; not tried against the endpoint ({})",
            validity.message(),
            e.lines().next().unwrap_or(&e)
        );
        return CheckResult::Warning(note);
    }
    match try_identity(ctx, TlsIdentity { chain, key }) {
        Ok(done) => {
            let text = format!("{}; handshake as the claim: {done}", validity.message());
            match validity {
                CheckResult::Warning(_) => CheckResult::Warning(text),
                _ => CheckResult::Ok(text),
            }
        }
        Err(e) => CheckResult::Failed(format!("{}; but {e}", validity.message())),
    }
}

/// One check's outcome, for printing.
#[derive(Debug)]
pub struct Outcome {
    pub id: &'static str,
    pub description: &'static str,
    pub result: CheckResult,
}

/// Runs the checks, except those in `dont_run` (reported as skipped).
pub fn run_checks(ctx: &mut Context<'_>, dont_run: &[String]) -> Vec<Outcome> {
    CHECKS
        .iter()
        .map(|check| Outcome {
            id: check.id,
            description: check.description,
            result: if dont_run.iter().any(|d| d == check.id) {
                CheckResult::Skipped("not run (--dont-run)".into())
            } else {
                (check.run)(ctx)
            },
        })
        .collect()
}

/// The ids in `dont_run` that name no check.
pub fn unknown_ids(dont_run: &[String]) -> Vec<&str> {
    dont_run
        .iter()
        .filter(|d| !CHECKS.iter().any(|c| c.id == d.as_str()))
        .map(String::as_str)
        .collect()
}

/// Whether the outcomes make the exit code 1.
pub fn failed(outcomes: &[Outcome], warnings_as_errors: bool) -> bool {
    outcomes.iter().any(|o| match o.result {
        CheckResult::Failed(_) => true,
        CheckResult::Warning(_) => warnings_as_errors,
        CheckResult::Ok(_) | CheckResult::Skipped(_) => false,
    })
}

/// The `--json` array.
pub fn outcomes_json(outcomes: &[Outcome]) -> serde_json::Value {
    outcomes
        .iter()
        .map(|o| {
            json!({
                "id": o.id,
                "description": o.description,
                "result": o.result.name(),
                "message": o.result.message(),
            })
        })
        .collect()
}

/// The text report, aziotctl-style: a mark, the id, what was checked, and the finding.
pub fn render_outcomes(outcomes: &[Outcome], colour: bool) -> String {
    let paint = |code: &str, s: &str| {
        if colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    };
    let width = CHECKS.iter().map(|c| c.id.len()).max().unwrap_or(0);
    let mut out = String::new();
    let (mut ok, mut warnings, mut failures, mut skipped) = (0, 0, 0, 0);
    for o in outcomes {
        let (mark, suffix) = match o.result {
            CheckResult::Ok(_) => {
                ok += 1;
                (paint("32", "√"), "")
            }
            CheckResult::Warning(_) => {
                warnings += 1;
                (paint("33", "‼"), " - warning")
            }
            CheckResult::Failed(_) => {
                failures += 1;
                (paint("31", "×"), " - failed")
            }
            CheckResult::Skipped(_) => {
                skipped += 1;
                ("-".to_owned(), " - skipped")
            }
        };
        out.push_str(&format!(
            "{mark} {:<width$}  {}{suffix}\n",
            o.id, o.description
        ));
        for line in o.result.message().lines() {
            out.push_str(&format!("      {line}\n"));
        }
    }
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    out.push_str(&format!(
        "\n{} succeeded, {}, {}, {}.\n",
        plural(ok, "check", "checks"),
        plural(warnings, "warning", "warnings"),
        plural(failures, "failure", "failures"),
        plural(skipped, "skipped", "skipped"),
    ));
    out
}

/// `iotctl check --list`.
pub fn render_list() -> String {
    let width = CHECKS.iter().map(|c| c.id.len()).max().unwrap_or(0);
    CHECKS
        .iter()
        .map(|c| format!("{:<width$}  {}\n", c.id, c.description))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_kebab_case() {
        let mut ids: Vec<_> = CHECKS.iter().map(|c| c.id).collect();
        assert!(
            ids.iter()
                .all(|id| id.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        );
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), CHECKS.len());
    }

    /// `iotctl check --help` and the man page list the ids; a new check must be added there.
    #[test]
    fn help_names_every_check() {
        use clap::CommandFactory as _;
        let mut command = crate::cli::Cli::command();
        let help = command
            .find_subcommand_mut("check")
            .and_then(|c| c.get_long_about().map(ToString::to_string))
            .unwrap_or_default();
        for check in CHECKS {
            assert!(help.contains(check.id), "{} is not in the help", check.id);
        }
    }

    #[test]
    fn warnings_fail_only_when_promoted() {
        let outcomes = vec![Outcome {
            id: "x",
            description: "x",
            result: CheckResult::Warning("w".into()),
        }];
        assert!(!failed(&outcomes, false));
        assert!(failed(&outcomes, true));
    }

    #[test]
    fn unknown_dont_run_ids_are_named() {
        let ids = vec!["endpoint-tcp".to_owned(), "nope".to_owned()];
        assert_eq!(unknown_ids(&ids), vec!["nope"]);
    }

    /// A config with the required keys (dotted, so that `extra` may add keys to their tables
    /// the same way, or open sub-tables), the state in `dir`, and `extra` after them.
    fn write_config(dir: &Path, extra: &str) -> ConfigPaths {
        let path = dir.join("config.toml");
        let text = format!(
            "cloud.endpoint = \"127.0.0.1\"\nprovisioning.template = \"gw\"\n\
             state.dir = \"{}\"\n{extra}",
            dir.join("state").display()
        );
        std::fs::write(&path, text).unwrap();
        ConfigPaths::for_main(&path)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Runs the check `id` alone against `paths`.
    fn run_one(paths: ConfigPaths, id: &str) -> CheckResult {
        let runtime = runtime();
        let mut ctx = Context::new(paths, OffsetDateTime::now_utc(), &runtime);
        let check = CHECKS.iter().find(|c| c.id == id).unwrap();
        (check.run)(&mut ctx)
    }

    #[test]
    fn config_valid_resolves_the_parameters_without_showing_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial");
        std::fs::write(&serial, "SN-SECRET-0042\n").unwrap();
        let paths = write_config(
            dir.path(),
            &format!(
                "[provisioning.parameters]\nSite = \"berlin-secret\"\n\
                 Serial = {{ file = \"{}\" }}\nModel = {{ command = [\"echo\", \"model-secret\"] }}\n",
                serial.display()
            ),
        );
        let main = paths.main.clone();
        let result = run_one(paths, "config-valid");
        assert_eq!(
            result,
            CheckResult::Ok(format!(
                "read {}; 3 template parameters resolved",
                main.display()
            ))
        );
        assert!(!result.message().contains("secret"), "{result:?}");

        let dir = tempfile::tempdir().unwrap();
        let paths = write_config(dir.path(), "");
        assert!(
            run_one(paths, "config-valid")
                .message()
                .ends_with("; no template parameters")
        );
    }

    #[test]
    fn config_valid_fails_naming_the_parameter_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-serial");
        let paths = write_config(
            dir.path(),
            &format!(
                "[provisioning.parameters]\nSite = \"berlin\"\nSerial = {{ file = \"{}\" }}\n",
                missing.display()
            ),
        );
        assert_eq!(
            run_one(paths, "config-valid"),
            CheckResult::Failed(format!(
                "resolving template parameter provisioning.parameters.Serial: reading file {}: \
                 No such file or directory (os error 2)",
                missing.display()
            ))
        );

        let dir = tempfile::tempdir().unwrap();
        let paths = write_config(
            dir.path(),
            "[provisioning.parameters]\nModel = { command = [\"sh\", \"-c\", \"echo no model >&2; exit 4\"] }\n",
        );
        let result = run_one(paths, "config-valid");
        assert!(matches!(result, CheckResult::Failed(_)), "{result:?}");
        assert!(
            result
                .message()
                .starts_with("resolving template parameter provisioning.parameters.Model: "),
            "{result:?}"
        );
        assert!(
            result
                .message()
                .ends_with("failed (exit status: 4): no model"),
            "{result:?}"
        );
    }

    #[test]
    fn a_missing_ca_bundle_is_named_by_its_key_with_the_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("AmazonRootCA1.pem");
        let paths = write_config(
            dir.path(),
            &format!("cloud.ca_bundle = \"{}\"\n", bundle.display()),
        );
        let runtime = runtime();
        let mut ctx = Context::new(paths, OffsetDateTime::now_utc(), &runtime);
        let error = ctx.trust().err().unwrap();
        assert_eq!(
            error,
            format!(
                "cloud.ca_bundle: reading CA bundle {}: No such file or directory (os error 2); \
                 point cloud.ca_bundle at a readable PEM file of the CA that signs the \
                 endpoint's certificate, or remove it to use the system trust store",
                bundle.display()
            )
        );
    }

    #[test]
    fn a_missing_claim_file_is_named_by_its_key_with_the_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let certificate = dir.path().join("claim.pem");
        let key = dir.path().join("claim.key");
        let paths = write_config(
            dir.path(),
            &format!(
                "provisioning.claim_certificate = \"{}\"\nprovisioning.claim_key = \"{}\"\n",
                certificate.display(),
                key.display()
            ),
        );
        assert_eq!(
            run_one(paths.clone(), "claim-validity"),
            CheckResult::Failed(format!(
                "provisioning.claim_certificate {} does not exist; install the claim \
                 (certificate and key, PEM) there, or onboard the gateway",
                certificate.display()
            ))
        );
        std::fs::write(&certificate, "not PEM\n").unwrap();
        let result = run_one(paths.clone(), "claim-validity");
        assert!(
            result.message().starts_with("provisioning.claim_key ")
                && result
                    .message()
                    .contains("does not exist; install the claim"),
            "{result:?}"
        );
        std::fs::write(&key, "not PEM\n").unwrap();
        let result = run_one(paths, "claim-validity");
        assert!(
            result
                .message()
                .starts_with("provisioning.claim_certificate: "),
            "{result:?}"
        );
        assert!(
            result.message().ends_with(
                "; install the claim (certificate and key, PEM) there, or onboard the gateway"
            ),
            "{result:?}"
        );
    }

    #[test]
    fn io_messages_lose_the_os_error_number() {
        let e = io::Error::from_raw_os_error(111);
        assert_eq!(io_message(&e), "Connection refused");
    }
}
