//! The provisioning state machine and the production session, driven by one task that owns
//! the agent's state. Each step reads what the store says, does its work, writes the result
//! and moves on, so that a restart at any point resumes at the step that was interrupted:
//!
//! ```text
//! unprovisioned -> key-ready -> certificate-issued -> thing-registered -> provisioned
//!                  (CSR)        (RegisterThing)       (connect as thing)   (session kept)
//! ```
//!
//! With `certificate_source = "cloud-generated"`, CreateKeysAndCertificate takes the device
//! from unprovisioned straight to certificate-issued.

use std::sync::Arc;

use tokio::sync::watch;

use crate::cloud::{ConnectPacer, Identity, Session, Target, rfc3339};
use crate::config::{CertificateSource, Settings};
use crate::error::{AgentError, Backoff, ErrorCode, Retry};
use crate::keys::{DeviceKey, KeyBackend};
use crate::store::{LastError, State, Step, Store};
use crate::tls::{self, ServerTrust, TlsIdentity};

/// An ownership token is valid for an hour; past 55 minutes a RegisterThing would race its
/// expiry, so the agent asks for a new certificate instead.
const TOKEN_MAX_AGE_SECS: i64 = 55 * 60;

/// What readers (systemd status, D-Bus properties, iotctl) see of the agent. Published through a
/// `watch` channel by the task that owns the state; readers never lock anything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// One of `iotd_api::state::*`.
    pub state: &'static str,
    /// The provisioning step (`store::Step::name`).
    pub step: &'static str,
    pub thing_name: Option<String>,
    pub certificate_id: Option<String>,
    pub certificate_not_after: Option<i64>,
    pub certificate_path: Option<std::path::PathBuf>,
    /// When the next rotation is due; `None` until rotation exists.
    pub next_rotation: Option<i64>,
    /// "file" or "tpm".
    pub key_backend: &'static str,
    /// Where the key is (`DeviceKey::location`), once there is one.
    pub key_reference: Option<String>,
    pub connected: bool,
    /// "host:port".
    pub endpoint: String,
    pub last_error: Option<LastError>,
    pub onboarding_open: bool,
    pub onboarding_closes_at: Option<i64>,
    /// The one-line summary also sent as systemd STATUS=.
    pub status_line: String,
}

/// What an operation did: "safe to repeat, says whether it changed anything".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Changed(String),
    Unchanged(String),
}

impl Outcome {
    pub fn message(&self) -> &str {
        match self {
            Outcome::Changed(m) | Outcome::Unchanged(m) => m,
        }
    }
}

/// Requests to the task that owns the state, each with its answer channel.
#[derive(Debug)]
pub enum Command {
    /// Abandon the identity and provision a new one with a new key.
    Reprovision(tokio::sync::oneshot::Sender<Result<Outcome, AgentError>>),
    /// Replace the certificate now.
    Rotate(tokio::sync::oneshot::Sender<Result<Outcome, AgentError>>),
}

/// The handle other tasks (D-Bus) hold: a command sender and the snapshot.
#[derive(Debug, Clone)]
pub struct Handle {
    pub commands: tokio::sync::mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Snapshot>,
}

/// " in 3 s" for a transient error with a scheduled retry.
fn retry_in(e: &LastError) -> String {
    match e.retry_at {
        Some(t) if !e.permanent => format!(" in {} s", (t - e.at).max(0)),
        _ => String::new(),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn store_error(e: crate::store::StoreError) -> AgentError {
    AgentError::permanent(ErrorCode::Store, e.to_string())
}

fn key_error(e: crate::keys::KeyError) -> AgentError {
    match e {
        // Decided by `Agent::lost_key`, which knows whether a new identity may be made.
        crate::keys::KeyError::Lost { .. } => {
            AgentError::new(ErrorCode::KeyLost, Retry::NewIdentity, e.to_string())
        }
        other => AgentError::permanent(ErrorCode::Key, other.to_string()),
    }
}

fn tls_error(code: ErrorCode, e: tls::TlsError) -> AgentError {
    AgentError::permanent(code, e.to_string())
}

/// What one step did.
enum Advance {
    /// The state moved on; run the next step.
    Next,
    /// Connected with the device's own identity.
    Connected(Session),
}

/// The agent: settings, store, key backend, and the state it owns.
pub struct Agent {
    settings: Settings,
    store: Store,
    backend: Arc<dyn KeyBackend>,
    trust: ServerTrust,
    pacer: ConnectPacer,
    state: State,
    snapshot: watch::Sender<Snapshot>,
    claim_client_id: String,
    commands: Option<tokio::sync::mpsc::Receiver<Command>>,
    /// Where the current device key is, once known (for the snapshot).
    key_location: Option<String>,
    connected: bool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("step", &self.state.step.name())
            .finish_non_exhaustive()
    }
}

/// The claim connection's client id: configured, or derived from /etc/machine-id so that it
/// is stable across restarts and distinct per gateway.
fn default_claim_client_id() -> String {
    let id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let id = id.trim();
    if id.len() >= 16 {
        format!("iotd-{}", &id[..16])
    } else {
        format!("iotd-{}", hex::encode(rand::random::<[u8; 8]>()))
    }
}

impl Agent {
    /// Opens the store and the server trust; fails with a clear message when they can't be used.
    pub fn new(
        settings: Settings,
        backend: Arc<dyn KeyBackend>,
    ) -> Result<(Self, Handle), AgentError> {
        let store = Store::open(&settings.state_dir).map_err(store_error)?;
        let state = store.load().map_err(store_error)?;
        let trust = match &settings.cloud.ca_bundle {
            Some(path) => ServerTrust::from_pem_file(path),
            None => ServerTrust::system(),
        }
        .map_err(|e| tls_error(ErrorCode::Config, e))?;
        let claim_client_id = settings
            .provisioning
            .claim_client_id
            .clone()
            .unwrap_or_else(default_claim_client_id);
        let (snapshot, rx) = watch::channel(Snapshot::default());
        // Commands are rare and answered one at a time; a small queue is plenty.
        let (commands_tx, commands) = tokio::sync::mpsc::channel(8);
        let mut agent = Self {
            settings,
            store,
            backend,
            trust,
            pacer: ConnectPacer::default(),
            state,
            snapshot,
            claim_client_id,
            commands: Some(commands),
            key_location: None,
            connected: false,
        };
        agent.key_location = agent
            .state
            .step
            .generation()
            .and_then(|g| agent.backend.load(g).ok().flatten())
            .map(|k| k.location());
        agent.publish(false);
        Ok((
            agent,
            Handle {
                commands: commands_tx,
                snapshot: rx,
            },
        ))
    }

    /// The status line of the current state (for READY=1).
    pub fn status(&self) -> String {
        self.status_line(self.connected)
    }

    pub fn step(&self) -> &Step {
        &self.state.step
    }

    fn target(&self) -> Target {
        let c = &self.settings.cloud;
        Target {
            host: c.endpoint.clone(),
            port: c.port,
            keep_alive: c.keep_alive,
            trust: match &c.ca_bundle {
                Some(p) => format!("CA bundle {}", p.display()),
                None => "the system trust store".to_owned(),
            },
        }
    }

    /// A one-line summary for STATUS= and logs.
    fn status_line(&self, connected: bool) -> String {
        match (&self.state.step, &self.state.last_error) {
            (
                Step::Provisioned {
                    thing_name,
                    not_after,
                    ..
                },
                _,
            ) if connected => {
                format!(
                    "Provisioned as {thing_name}; certificate valid until {}",
                    rfc3339(*not_after)
                )
            }
            (_, Some(e)) if e.permanent => {
                format!("Failed at {}: {}", self.state.step.name(), e.message)
            }
            (Step::Provisioned { thing_name, .. }, Some(e)) => {
                format!(
                    "Provisioned as {thing_name}; disconnected, retrying{}: {}",
                    retry_in(e),
                    e.message
                )
            }
            (Step::Provisioned { thing_name, .. }, None) => {
                format!("Provisioned as {thing_name}; connecting")
            }
            (step, Some(e)) => format!(
                "Provisioning ({}); retrying{}: {}",
                step.name(),
                retry_in(e),
                e.message
            ),
            (step, None) => format!("Provisioning ({})", step.name()),
        }
    }

    fn publish(&mut self, connected: bool) {
        self.connected = connected;
        let (thing, cert, not_after) = match &self.state.step {
            Step::Provisioned {
                thing_name,
                certificate_id,
                not_after,
                ..
            } => (
                Some(thing_name.clone()),
                Some(certificate_id.clone()),
                Some(*not_after),
            ),
            Step::ThingRegistered {
                thing_name,
                certificate_id,
                ..
            } => (Some(thing_name.clone()), Some(certificate_id.clone()), None),
            Step::CertificateIssued { certificate_id, .. } => {
                (None, Some(certificate_id.clone()), None)
            }
            _ => (None, None, None),
        };
        let state = match (&self.state.step, &self.state.last_error) {
            (_, Some(e)) if e.permanent => iotd_api::state::FAILED,
            (Step::Provisioned { .. }, _) => iotd_api::state::PROVISIONED,
            (Step::Unprovisioned, None) if self.settings.provisioning.claim.is_none() => {
                iotd_api::state::UNPROVISIONED
            }
            _ => iotd_api::state::PROVISIONING,
        };
        let certificate_path = cert
            .as_ref()
            .and(self.state.step.generation())
            .map(|g| self.store.certificate_path(g));
        let snap = Snapshot {
            state,
            step: self.state.step.name(),
            thing_name: thing,
            certificate_id: cert,
            certificate_not_after: not_after,
            certificate_path,
            next_rotation: None,
            key_backend: self.backend.kind(),
            key_reference: self.key_location.clone(),
            connected,
            endpoint: format!(
                "{}:{}",
                self.settings.cloud.endpoint, self.settings.cloud.port
            ),
            last_error: self.state.last_error.clone(),
            onboarding_open: false,
            onboarding_closes_at: None,
            status_line: self.status_line(connected),
        };
        let line = snap.status_line.clone();
        let changed = self.snapshot.send_if_modified(|s| {
            if *s == snap {
                return false;
            }
            *s = snap;
            true
        });
        if changed {
            crate::notify::status(&line);
        }
    }

    /// Persists a new step (clearing the last error: the step succeeded).
    fn transition(&mut self, step: Step) -> Result<(), AgentError> {
        let mut next = self.state.clone();
        next.step = step;
        next.last_error = None;
        if let Some(g) = next.step.generation() {
            next.last_generation = next.last_generation.max(g);
        }
        self.store.save(&next).map_err(store_error)?;
        tracing::info!(step = next.step.name(), "provisioning step done");
        self.state = next;
        self.publish(false);
        Ok(())
    }

    /// Records (and shows) the last error; `retry_in` is when the next attempt starts.
    fn record_error(&mut self, e: &AgentError, retry_in: Option<std::time::Duration>) {
        let at = now();
        let last = LastError {
            code: e.code.as_str().to_owned(),
            message: e.message.clone(),
            at,
            permanent: e.is_permanent(),
            retry_at: retry_in.map(|d| at + i64::try_from(d.as_secs()).unwrap_or(0)),
        };
        let mut next = self.state.clone();
        next.last_error = Some(last);
        // The error is worth keeping across a restart, but failing to write it changes nothing.
        if let Err(err) = self.store.save(&next) {
            tracing::warn!("recording the last error: {err}");
        }
        self.state = next;
        self.publish(false);
    }

    /// Runs until shutdown (the caller drops this future on SIGTERM: every write is atomic and
    /// synchronous, so dropping it between awaits leaves a consistent state). This task owns
    /// the state: it does the provisioning work, answers commands, and pings the systemd
    /// watchdog from the same loop, so that a stuck loop stops the pings.
    pub async fn run(mut self) {
        let Some(mut commands) = self.commands.take() else {
            return;
        };
        let mut watchdog = crate::notify::watchdog_interval();
        let mut claim: Option<Session> = None;
        let mut backoff = Backoff::default();
        let mut parked = false;
        loop {
            let mut command = None;
            {
                // One unit of work (a step, a session, a wait); commands and watchdog ticks are
                // served around it. A command cancels the unit: each is safe to interrupt.
                let work = async {
                    if parked {
                        std::future::pending::<()>().await;
                    }
                    parked = self.work_once(&mut claim, &mut backoff).await;
                };
                tokio::pin!(work);
                loop {
                    tokio::select! {
                        () = &mut work => break,
                        // Without a D-Bus API every sender is gone: the branch is then
                        // disabled (a closed channel would otherwise answer at once, forever).
                        Some(c) = commands.recv() => {
                            command = Some(c);
                            break;
                        }
                        () = crate::notify::tick(&mut watchdog) => crate::notify::watchdog(),
                    }
                }
            }
            #[cfg(feature = "test-hooks")]
            crate::notify::test_stall_once();
            if let Some(c) = command
                && self.handle(c, &mut claim).await
            {
                parked = false;
                backoff.reset();
            }
        }
    }

    /// Does one unit of work; returns true when the agent must stop trying (permanent error).
    async fn work_once(&mut self, claim: &mut Option<Session>, backoff: &mut Backoff) -> bool {
        match self.advance(claim).await {
            Ok(Advance::Next) => backoff.reset(),
            Ok(Advance::Connected(session)) => {
                if let Some(c) = claim.take() {
                    c.disconnect().await;
                }
                backoff.reset();
                let e = self.serve(session).await;
                let delay = backoff.next_delay();
                self.record_error(&e, Some(delay));
                tracing::warn!(delay_ms = delay.as_millis() as u64, "{e}; reconnecting");
                tokio::time::sleep(delay).await;
            }
            Err(e) => match e.retry {
                Retry::Permanent => {
                    tracing::error!(step = self.state.step.name(), code = e.code.as_str(), "{e}");
                    self.record_error(&e, None);
                    if let Some(c) = claim.take() {
                        c.disconnect().await;
                    }
                    // Stay up with the cause visible; a restart or Reprovision tries again.
                    return true;
                }
                Retry::NewIdentity => {
                    let p = &self.settings.provisioning;
                    if !p.reprovision_when_key_lost || p.claim.is_none() {
                        let e = AgentError::permanent(
                            ErrorCode::KeyLost,
                            format!(
                                "{}; set provisioning.reprovision_when_key_lost = true and keep a claim to get a new identity automatically, or run iotctl reprovision",
                                e.message
                            ),
                        );
                        tracing::error!(code = e.code.as_str(), "{e}");
                        self.record_error(&e, None);
                        return true;
                    }
                    tracing::error!(
                        code = e.code.as_str(),
                        "{e}; provisioning a new identity with a new key"
                    );
                    let e = AgentError::new(
                        ErrorCode::KeyLost,
                        Retry::NewIdentity,
                        format!("{}; provisioning a new identity with a new key", e.message),
                    );
                    self.record_error(&e, Some(std::time::Duration::ZERO));
                    if let Some(id) = self.current_certificate() {
                        self.state.abandoned_certificates.push(id);
                    }
                    *claim = None;
                    self.key_location = None;
                    // Keep the error visible through the new provisioning, until a step succeeds.
                    let last = self.state.last_error.clone();
                    if let Err(e) = self.transition(Step::Unprovisioned) {
                        self.record_error(&e, None);
                        return true;
                    }
                    self.state.last_error = last;
                    self.publish(false);
                }
                Retry::RestartFromCsr => {
                    tracing::warn!(step = self.state.step.name(), "{e}");
                    self.record_error(&e, Some(std::time::Duration::ZERO));
                    if let Err(e) = self.restart_from_csr() {
                        self.record_error(&e, None);
                        return true;
                    }
                }
                Retry::SameConnection | Retry::Reconnect => {
                    if e.retry == Retry::Reconnect {
                        *claim = None;
                    }
                    let delay = if e.code == ErrorCode::Throttled {
                        backoff.next_delay_within(self.settings.cloud.throttle_retry_max)
                    } else {
                        backoff.next_delay()
                    };
                    self.record_error(&e, Some(delay));
                    tracing::warn!(
                        step = self.state.step.name(),
                        code = e.code.as_str(),
                        delay_ms = delay.as_millis() as u64,
                        "{e}; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            },
        }
        false
    }

    /// Answers a command; returns true when the agent should start working again.
    async fn handle(&mut self, command: Command, claim: &mut Option<Session>) -> bool {
        match command {
            Command::Reprovision(reply) => {
                let result = self.reprovision(claim).await;
                let restart = result
                    .as_ref()
                    .is_ok_and(|o| matches!(o, Outcome::Changed(_)));
                let _ = reply.send(result);
                restart
            }
            Command::Rotate(reply) => {
                let result = match &self.state.step {
                    Step::Provisioned { .. } => Err(AgentError::permanent(
                        ErrorCode::NotSupported,
                        "certificate rotation is not available in this version of iotd; use reprovision to get a new key and certificate",
                    )),
                    _ => Err(AgentError::permanent(
                        ErrorCode::NotProvisioned,
                        format!(
                            "this gateway is not provisioned yet ({}); there is no certificate to rotate",
                            self.state.step.name()
                        ),
                    )),
                };
                let _ = reply.send(result);
                false
            }
        }
    }

    /// The certificate of the current step, if it has one.
    fn current_certificate(&self) -> Option<String> {
        match &self.state.step {
            Step::CertificateIssued { certificate_id, .. }
            | Step::ThingRegistered { certificate_id, .. }
            | Step::Provisioned { certificate_id, .. } => Some(certificate_id.clone()),
            _ => None,
        }
    }

    /// Abandons the current identity and starts over with a new key. Idempotent: asking while
    /// the agent is already at the start changes nothing.
    async fn reprovision(&mut self, claim: &mut Option<Session>) -> Result<Outcome, AgentError> {
        if self.state.step == Step::Unprovisioned && self.state.last_error.is_none() {
            return Ok(Outcome::Unchanged(
                "already provisioning from the start; no action taken".to_owned(),
            ));
        }
        if self.settings.provisioning.claim.is_none() {
            return Err(AgentError::permanent(
                ErrorCode::ClaimMissing,
                "no claim certificate is configured, so a new identity cannot be provisioned",
            ));
        }
        if let Some(c) = claim.take() {
            c.disconnect().await;
        }
        let previous = match &self.state.step {
            Step::Provisioned {
                thing_name,
                certificate_id,
                ..
            }
            | Step::ThingRegistered {
                thing_name,
                certificate_id,
                ..
            } => {
                format!("thing {thing_name}, certificate {certificate_id}")
            }
            other => format!("step {}", other.name()),
        };
        if let Some(id) = self.current_certificate() {
            self.state.abandoned_certificates.push(id);
        }
        self.key_location = None;
        self.transition(Step::Unprovisioned)?;
        tracing::info!("re-provisioning on request (was {previous})");
        Ok(Outcome::Changed(format!(
            "re-provisioning with a new key (was {previous})"
        )))
    }

    /// The ownership token is lost or too old: request a new certificate (same key with a CSR,
    /// a new key with cloud-generated keys).
    fn restart_from_csr(&mut self) -> Result<(), AgentError> {
        let (step, abandoned) = match (
            &self.state.step,
            self.settings.provisioning.certificate_source,
        ) {
            (
                Step::CertificateIssued {
                    generation,
                    certificate_id,
                    ..
                },
                CertificateSource::Csr,
            ) => (
                Step::KeyReady {
                    generation: *generation,
                },
                Some(certificate_id.clone()),
            ),
            (
                Step::CertificateIssued {
                    generation,
                    certificate_id,
                    ..
                },
                CertificateSource::CloudGenerated,
            ) => {
                // That key came with the abandoned certificate; it is of no use without it.
                if let Err(e) = self.backend.remove(*generation) {
                    tracing::warn!("removing the abandoned key of generation {generation}: {e}");
                }
                (Step::Unprovisioned, Some(certificate_id.clone()))
            }
            (other, _) => (other.clone(), None),
        };
        if let Some(id) = abandoned {
            // Unregistered, it expires with its token. But if a RegisterThing succeeded and only
            // its reply was lost, it is ACTIVE and attached: say so, for the cloud side to clean.
            tracing::warn!(certificate_id = %id, "abandoning this certificate; if an earlier RegisterThing for it succeeded without its reply arriving, it stays attached to the thing and should be detached in AWS IoT");
            self.state.abandoned_certificates.push(id);
        }
        self.transition(step)
    }

    /// The TLS configuration for an identity, and its certificate's notAfter; errors carry `code`
    /// (whose identity it is decides what went wrong: the claim's files, or the state's).
    fn client_tls(
        &self,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: Arc<dyn DeviceKey>,
        code: ErrorCode,
    ) -> Result<(Arc<rustls::ClientConfig>, i64), AgentError> {
        let not_after = chain
            .first()
            .map(tls::certificate_not_after)
            .transpose()
            .map_err(|e| tls_error(code, e))?
            .unwrap_or(i64::MAX);
        let config = tls::client_config(
            &self.trust,
            TlsIdentity { chain, key },
            self.settings.cloud.alpn,
        )
        .map_err(|e| tls_error(code, e))?;
        Ok((config, not_after))
    }

    /// Connects with the claim unless a claim connection is open.
    async fn claim_session<'a>(
        &self,
        slot: &'a mut Option<Session>,
    ) -> Result<&'a mut Session, AgentError> {
        if slot.is_none() {
            let claim = self.settings.provisioning.claim.as_ref().ok_or_else(|| {
                AgentError::permanent(
                    ErrorCode::ClaimMissing,
                    "no claim certificate is configured: set provisioning.claim_certificate and provisioning.claim_key",
                )
            })?;
            let chain = tls::read_chain(&claim.certificate)
                .map_err(|e| tls_error(ErrorCode::ClaimMissing, e))?;
            let key = crate::keys::file::load_pem_file(&claim.key)
                .map_err(|e| AgentError::permanent(ErrorCode::ClaimMissing, e.to_string()))?;
            let (config, not_after) = self.client_tls(chain, key, ErrorCode::ClaimMissing)?;
            let identity = Identity::Claim {
                not_after,
                path: claim.certificate.display().to_string(),
            };
            let session = Session::connect(
                &self.target(),
                config,
                &self.claim_client_id,
                identity,
                &self.pacer,
            )
            .await?;
            tracing::info!(client_id = %self.claim_client_id, "connected with the claim");
            *slot = Some(session);
        }
        slot.as_mut()
            .ok_or_else(|| AgentError::permanent(ErrorCode::Network, "claim connection vanished"))
    }

    fn load_key(&self, generation: u32) -> Result<Option<Arc<dyn DeviceKey>>, AgentError> {
        self.backend.load(generation).map_err(key_error)
    }

    /// Checks that the certificate AWS issued certifies our key, then stores it.
    fn accept_certificate(
        &self,
        generation: u32,
        key: &dyn DeviceKey,
        pem: &str,
    ) -> Result<i64, AgentError> {
        let chain = tls::parse_chain_pem(pem, "the issued certificate")
            .map_err(|e| tls_error(ErrorCode::CertificateMismatch, e))?;
        let cert = chain.first().ok_or_else(|| {
            AgentError::permanent(
                ErrorCode::CertificateMismatch,
                "the issued certificate PEM holds no certificate",
            )
        })?;
        let spki = tls::certificate_spki(cert)
            .map_err(|e| tls_error(ErrorCode::CertificateMismatch, e))?;
        if spki != key.public_key_spki() {
            // Registering it would activate a certificate this gateway can never use.
            return Err(AgentError::new(
                ErrorCode::CertificateMismatch,
                Retry::RestartFromCsr,
                format!(
                    "the certificate AWS issued does not certify this gateway's key ({}); not registering it",
                    key.location()
                ),
            ));
        }
        let not_after = tls::certificate_not_after(cert)
            .map_err(|e| tls_error(ErrorCode::CertificateMismatch, e))?;
        self.store
            .write_certificate(generation, pem)
            .map_err(store_error)?;
        Ok(not_after)
    }

    /// Runs the current step once.
    async fn advance(&mut self, claim: &mut Option<Session>) -> Result<Advance, AgentError> {
        let p = &self.settings.provisioning;
        let (format, timeout) = (p.format, self.settings.cloud.reply_timeout);
        match self.state.step.clone() {
            Step::Unprovisioned => match p.certificate_source {
                CertificateSource::Csr => {
                    let generation = self.state.last_generation + 1;
                    let key = self.backend.create(generation).map_err(key_error)?;
                    tracing::info!(generation, key = %key.location(), "created the device key");
                    self.transition(Step::KeyReady { generation })?;
                    Ok(Advance::Next)
                }
                CertificateSource::CloudGenerated => {
                    let session = self.claim_session(claim).await?;
                    let issued =
                        crate::fleet::create_keys_and_certificate(session, format, timeout).await?;
                    let generation = self.state.last_generation + 1;
                    let pem = issued.private_key.unwrap_or_default();
                    let key = self
                        .backend
                        .import_pem(generation, &pem)
                        .map_err(key_error)?;
                    self.accept_certificate(generation, key.as_ref(), &issued.certificate_pem)?;
                    tracing::info!(certificate_id = %issued.certificate_id, "AWS issued a certificate and key");
                    self.transition(Step::CertificateIssued {
                        generation,
                        certificate_id: issued.certificate_id,
                        ownership_token: issued.certificate_ownership_token,
                        issued_at: now(),
                    })?;
                    Ok(Advance::Next)
                }
            },
            Step::KeyReady { generation } => {
                let Some(key) = self.load_key(generation)? else {
                    tracing::warn!(generation, "the device key is missing; creating a new one");
                    self.transition(Step::Unprovisioned)?;
                    return Ok(Advance::Next);
                };
                let csr = crate::csr::build_csr(key.as_ref()).map_err(key_error)?;
                let session = self.claim_session(claim).await?;
                let issued =
                    crate::fleet::create_certificate_from_csr(session, format, timeout, &csr)
                        .await?;
                self.accept_certificate(generation, key.as_ref(), &issued.certificate_pem)?;
                tracing::info!(certificate_id = %issued.certificate_id, "AWS issued a certificate for our key");
                self.transition(Step::CertificateIssued {
                    generation,
                    certificate_id: issued.certificate_id,
                    ownership_token: issued.certificate_ownership_token,
                    issued_at: now(),
                })?;
                Ok(Advance::Next)
            }
            Step::CertificateIssued {
                generation,
                certificate_id,
                ownership_token,
                issued_at,
            } => {
                if now() - issued_at > TOKEN_MAX_AGE_SECS {
                    tracing::info!(certificate_id = %certificate_id, "the ownership token is too old; requesting a new certificate");
                    self.restart_from_csr()?;
                    return Ok(Advance::Next);
                }
                let provisioning = self.settings.provisioning.clone();
                let parameters =
                    tokio::task::spawn_blocking(move || provisioning.resolve_parameters())
                        .await
                        .map_err(|e| {
                            AgentError::permanent(
                                ErrorCode::Config,
                                format!("resolving template parameters: {e}"),
                            )
                        })?
                        .map_err(|e| AgentError::permanent(ErrorCode::Config, e.to_string()))?;
                let template = self.settings.provisioning.template.clone();
                let session = self.claim_session(claim).await?;
                let registered = crate::fleet::register_thing(
                    session,
                    format,
                    timeout,
                    &template,
                    &ownership_token,
                    &parameters,
                )
                .await?;
                let thing_name = registered.thing_name.ok_or_else(|| {
                    AgentError::permanent(
                        ErrorCode::TemplateRejected,
                        format!("template {template} registered no thing (no AWS::IoT::Thing resource); iotd needs a thing name to connect as"),
                    )
                })?;
                tracing::info!(thing = %thing_name, certificate_id = %certificate_id, "thing registered");
                self.transition(Step::ThingRegistered {
                    generation,
                    certificate_id,
                    thing_name,
                    device_configuration: registered.device_configuration,
                })?;
                Ok(Advance::Next)
            }
            Step::ThingRegistered {
                generation,
                certificate_id,
                thing_name,
                device_configuration,
            } => {
                if let Some(c) = claim.take() {
                    c.disconnect().await;
                }
                let (session, not_after) = self
                    .connect_device(generation, &certificate_id, &thing_name)
                    .await?;
                // The identity works, so the claim is no longer needed; removing it before the
                // step is recorded means that nobody sees "provisioned" with the claim still there.
                self.after_provisioning();
                self.transition(Step::Provisioned {
                    generation,
                    certificate_id: certificate_id.clone(),
                    thing_name: thing_name.clone(),
                    device_configuration,
                    provisioned_at: now(),
                    not_after,
                })?;
                tracing::info!(
                    thing = %thing_name,
                    certificate_id = %certificate_id,
                    hardware_commands = self.backend.commands_issued(),
                    "provisioned: connected with the issued certificate"
                );
                Ok(Advance::Connected(session))
            }
            Step::Provisioned {
                generation,
                certificate_id,
                thing_name,
                ..
            } => {
                let (session, _) = self
                    .connect_device(generation, &certificate_id, &thing_name)
                    .await?;
                tracing::info!(
                    thing = %thing_name,
                    certificate_id = %certificate_id,
                    hardware_commands = self.backend.commands_issued(),
                    "connected"
                );
                Ok(Advance::Connected(session))
            }
        }
    }

    /// Connects with the device's own identity, as its thing.
    async fn connect_device(
        &self,
        generation: u32,
        certificate_id: &str,
        thing_name: &str,
    ) -> Result<(Session, i64), AgentError> {
        let key = self.load_key(generation)?.ok_or_else(|| {
            AgentError::permanent(
                ErrorCode::Key,
                format!("the device key of generation {generation} is gone; the identity cannot be used (re-provision)"),
            )
        })?;
        let pem = self
            .store
            .read_certificate(generation)
            .map_err(store_error)?;
        let chain = tls::parse_chain_pem(&pem, "the device certificate")
            .map_err(|e| tls_error(ErrorCode::Store, e))?;
        let (config, not_after) = self.client_tls(chain, key, ErrorCode::Store)?;
        let identity = Identity::Device {
            certificate_id: certificate_id.to_owned(),
        };
        let session =
            Session::connect(&self.target(), config, thing_name, identity, &self.pacer).await?;
        Ok((session, not_after))
    }

    /// Deletes the claim files when the config asks for it (only after success).
    fn after_provisioning(&self) {
        let p = &self.settings.provisioning;
        if !p.delete_claim {
            return;
        }
        if let Some(claim) = &p.claim {
            for path in [&claim.certificate, &claim.key] {
                match std::fs::remove_file(path) {
                    Ok(()) => tracing::info!(
                        "deleted claim file {} (provisioning.delete_claim)",
                        path.display()
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("deleting claim file {}: {e}", path.display()),
                }
            }
        }
    }

    /// Keeps the production session until it ends; returns why it ended.
    async fn serve(&mut self, mut session: Session) -> AgentError {
        if self.state.last_error.is_some() {
            let mut next = self.state.clone();
            next.last_error = None;
            if let Err(e) = self.store.save(&next) {
                tracing::warn!("clearing the last error: {e}");
            }
            self.state = next;
        }
        self.publish(true);
        let reason = session.closed_reason().await;
        self.publish(false);
        reason
    }
}
