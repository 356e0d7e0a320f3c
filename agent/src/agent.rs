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

/// What readers (systemd status, later D-Bus and iotctl) see of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub step: String,
    pub thing_name: Option<String>,
    pub certificate_id: Option<String>,
    pub certificate_not_after: Option<i64>,
    pub connected: bool,
    pub last_error: Option<LastError>,
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
    AgentError::permanent(ErrorCode::Key, e.to_string())
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
    ) -> Result<(Self, watch::Receiver<Snapshot>), AgentError> {
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
        let agent = Self {
            settings,
            store,
            backend,
            trust,
            pacer: ConnectPacer::default(),
            state,
            snapshot,
            claim_client_id,
        };
        agent.publish(false);
        Ok((agent, rx))
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
            (Step::Provisioned { thing_name, .. }, Some(e)) => {
                format!("Provisioned as {thing_name}; disconnected: {}", e.message)
            }
            (Step::Provisioned { thing_name, .. }, None) => {
                format!("Provisioned as {thing_name}; connecting")
            }
            (_, Some(e)) if e.permanent => {
                format!("Failed at {}: {}", self.state.step.name(), e.message)
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

    fn publish(&self, connected: bool) {
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
        let snap = Snapshot {
            step: self.state.step.name().to_owned(),
            thing_name: thing,
            certificate_id: cert,
            certificate_not_after: not_after,
            connected,
            last_error: self.state.last_error.clone(),
        };
        self.snapshot.send_if_modified(|s| {
            if *s == snap {
                return false;
            }
            *s = snap;
            true
        });
        crate::notify::status(&self.status_line(connected));
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
    /// synchronous, so dropping it between awaits leaves a consistent state).
    pub async fn run(mut self) {
        crate::notify::ready(&self.status_line(false));
        let mut claim: Option<Session> = None;
        let mut backoff = Backoff::default();
        loop {
            match self.advance(&mut claim).await {
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
                        tracing::error!(
                            step = self.state.step.name(),
                            code = e.code.as_str(),
                            "{e}"
                        );
                        self.record_error(&e, None);
                        if let Some(c) = claim.take() {
                            c.disconnect().await;
                        }
                        // Stay up with the cause visible; a restart (or, later, Reprovision over
                        // D-Bus) tries again.
                        std::future::pending::<()>().await;
                    }
                    Retry::RestartFromCsr => {
                        tracing::warn!(step = self.state.step.name(), "{e}");
                        self.record_error(&e, Some(std::time::Duration::ZERO));
                        if let Err(e) = self.restart_from_csr() {
                            self.record_error(&e, None);
                            std::future::pending::<()>().await;
                        }
                    }
                    Retry::SameConnection | Retry::Reconnect => {
                        if e.retry == Retry::Reconnect {
                            claim = None;
                        }
                        let delay = backoff.next_delay();
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
        }
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
            let not_after = chain
                .first()
                .map(tls::certificate_not_after)
                .transpose()
                .map_err(|e| tls_error(ErrorCode::ClaimMissing, e))?
                .unwrap_or(i64::MAX);
            let config = tls::client_config(
                &self.trust,
                TlsIdentity { chain, key },
                self.settings.cloud.alpn,
            )
            .map_err(|e| tls_error(ErrorCode::ClaimMissing, e))?;
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
                tracing::info!(thing = %thing_name, certificate_id = %certificate_id, "provisioned: connected with the issued certificate");
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
                tracing::info!(thing = %thing_name, certificate_id = %certificate_id, "connected");
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
        let not_after = chain
            .first()
            .map(tls::certificate_not_after)
            .transpose()
            .map_err(|e| tls_error(ErrorCode::Store, e))?
            .unwrap_or(i64::MAX);
        let config = tls::client_config(
            &self.trust,
            TlsIdentity { chain, key },
            self.settings.cloud.alpn,
        )
        .map_err(|e| tls_error(ErrorCode::Key, e))?;
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
