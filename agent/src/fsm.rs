//! The agent's state machine, pure: `Machine::apply(input, now)` checks that the input is legal
//! in the current state, moves to the next state and says what the core must do about it
//! (`Action`s: persist, emit an event, remove a key, …). No I/O, no clock of its own: the core
//! passes the wall-clock time in, so tests move time by passing another number.
//!
//! The state is the persisted `store::State` (identity + operation) plus what only lives while
//! the process runs: whether a usable claim is at hand, whether the production connection is
//! up, and whether the operation stopped on a permanent error (parked: a restart, or
//! `Reprovision`, tries again).
//!
//! ```text
//!  no identity, no operation ──ClaimAvailable──> provisioning (no step) ──KeyCreated──> key-ready
//!       ^  (waiting for a claim)                   │ CertificateIssued (cloud-generated keys)
//!       │                                          v
//!  Reprovision                key-ready ──CertificateIssued──> certificate-issued
//!       │                     certificate-issued ──ThingRegistered──> thing-registered
//!       │                     thing-registered ──IdentityVerified──> identity (committed)
//!  identity live <──Connected / Disconnected──> (the connection task reconnects by itself)
//! ```
//!
//! Rules: a failed operation never takes the live identity offline; the identity changes only
//! by `IdentityVerified` (one atomic write of state.json: the commit); without a claim the
//! machine waits and nothing is created, locally or in the cloud.

use std::collections::BTreeMap;

use crate::error::{ErrorCode, Retry};
use crate::store::{
    ClaimOrigin, Durability, Identity, LastError, Operation, Previous, RotationReport, State, Step,
    Trigger,
};

/// What the state machine needs to know of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// `provisioning.certificate_source = "cloud-generated"`: the key comes with the
    /// certificate (CreateKeysAndCertificate), so there is no key-ready step.
    pub cloud_generated_keys: bool,
    /// `provisioning.reprovision_when_key_lost`.
    pub reprovision_when_key_lost: bool,
    /// `provisioning.delete_claim`: the claim files go once provisioned.
    pub delete_claim: bool,
    /// `rotation.grace_period` (seconds): how long the identity a rotation replaced is kept.
    pub grace_period: i64,
    /// `rotation.retry_interval` (seconds): after a rotation rolled back, the next starts no
    /// earlier.
    pub retry_interval: i64,
}

/// A failed unit of work or a lost connection, as the state machine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    pub retry: Retry,
    /// When the core will try again (seconds from now), for retryable failures.
    pub retry_in: Option<u64>,
}

impl Failure {
    pub fn new(e: &crate::error::AgentError, retry_in: Option<std::time::Duration>) -> Self {
        Self {
            code: e.code,
            message: e.message.clone(),
            retry: e.retry,
            retry_in: retry_in.map(|d| d.as_secs()),
        }
    }
}

/// Everything that can happen to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A usable claim is at hand (configured files, or one handed over the network).
    ClaimAvailable(ClaimOrigin),
    /// The claim at hand can no longer be used (expired, removed): wait for another one.
    ClaimGone { code: ErrorCode, message: String },
    /// The device key of `generation` was created (and is durable).
    KeyCreated { generation: u32 },
    /// AWS issued a certificate for the operation's key (written to `gen/<generation>/`,
    /// whose entries are durable).
    CertificateIssued {
        generation: u32,
        certificate_id: String,
        certificate_pem: String,
        ownership_token: String,
        /// The endpoint of the claim that requested it, when not `cloud.endpoint`.
        endpoint: Option<String>,
    },
    /// RegisterThing accepted the certificate.
    ThingRegistered {
        thing_name: String,
        device_configuration: BTreeMap<String, String>,
        /// The installer's parameters it was sent (`Identity::installer_parameters`).
        installer_parameters: BTreeMap<String, String>,
    },
    /// The operation's new certificate connected: it works, commit it as the identity.
    IdentityVerified {
        not_before: i64,
        not_after: i64,
        key: String,
    },
    /// The production connection is up with the live identity.
    Connected,
    /// The production connection went down; the connection task reconnects by itself.
    Disconnected(Failure),
    /// A unit of work failed.
    Failed(Failure),
    /// Abandon the identity (and any operation) and provision a new one with a new key.
    Reprovision,
    /// The fleet's backend was told (the broker acknowledged the report) about an abandoned
    /// certificate.
    CertificateReported { certificate_id: String },
    /// Replace the live identity's key and certificate (the schedule, a person, a job).
    RotationDue(Trigger),
    /// The broker acknowledged the rotation report about `new_certificate_id`.
    RotationReported { new_certificate_id: String },
    /// The committed identity is refused (revoked, inactive): go back to the previous one,
    /// which a rotation kept, while it is valid.
    FallBack(Failure),
    /// The grace period of the previous identity is over: its key and generation go.
    PreviousExpired,
}

impl Input {
    fn name(&self) -> &'static str {
        match self {
            Input::ClaimAvailable(_) => "a claim arriving",
            Input::ClaimGone { .. } => "the claim going away",
            Input::KeyCreated { .. } => "a key being created",
            Input::CertificateIssued { .. } => "a certificate being issued",
            Input::ThingRegistered { .. } => "a thing being registered",
            Input::IdentityVerified { .. } => "a new identity connecting",
            Input::Connected => "the connection coming up",
            Input::Disconnected(_) => "the connection going down",
            Input::Failed(_) => "a failure",
            Input::Reprovision => "a reprovisioning request",
            Input::CertificateReported { .. } => "a report being acknowledged",
            Input::RotationDue(_) => "a rotation being due",
            Input::RotationReported { .. } => "a rotation report being acknowledged",
            Input::FallBack(_) => "the identity being refused",
            Input::PreviousExpired => "the previous identity's grace period ending",
        }
    }
}

/// `f`, its message naming `iotctl reprovision` (see `Machine::key_lost`).
fn naming_reprovision(f: &Failure) -> Failure {
    let mut f = f.clone();
    if !f.message.contains("iotctl reprovision") {
        f.message
            .push_str(" (iotctl reprovision starts over with a new identity, given a claim)");
    }
    f
}

/// An event for the outside world (D-Bus signals, later the onboarding page): said once, when it
/// happens, never derived from comparing snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new identity connected for the first time (provisioning's commit).
    Provisioned {
        thing_name: String,
        certificate_id: String,
    },
    /// An operation stopped on a permanent error.
    Failed { code: ErrorCode, message: String },
    /// The production connection is up.
    Connected { certificate_id: String },
    /// The production connection went down: on an error (`code`; it reconnects by itself), or
    /// because iotd stopped it (no code: the identity it used was abandoned).
    Disconnected {
        code: Option<ErrorCode>,
        message: String,
    },
    /// The onboarding window opened; it closes at `closes_at` (Unix seconds).
    OnboardingOpened { closes_at: i64, attempts_left: u32 },
    /// The onboarding window closed: `timeout`, `requested`, `attempts`, `success` or
    /// `not-needed`.
    OnboardingClosed { reason: &'static str },
    /// A rotation committed: the gateway connects with `certificate_id` (valid until
    /// `not_after`) from now on.
    CredentialsRotated {
        certificate_id: String,
        not_after: i64,
    },
    /// A rotation started (`trigger`: schedule, on-demand, job); `id` names it.
    RotationStarted { id: String, trigger: &'static str },
    /// A rotation failed before its commit and was rolled back: the gateway keeps its identity.
    RotationFailed {
        id: String,
        code: ErrorCode,
        message: String,
    },
    /// The committed identity was refused; the gateway went back to the previous one.
    FellBack {
        certificate_id: String,
        message: String,
    },
    /// An installer's client proved it knows the setup code.
    OnboardingPaired,
    /// The installer's claim was accepted; provisioning uses it now.
    OnboardingClaimReceived,
}

/// What the core must do after a transition, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write state.json before anything else happens: always atomically; `Durable` when a
    /// request to the cloud depends on it (see `store::Durability`).
    Persist(Durability),
    Emit(Event),
    /// Close the claim connection (a reconnect is due, or provisioning is over).
    DropClaimSession,
    /// Stop the production connection (its identity is no longer the one to use).
    StopConnection,
    /// The operation is over with the claim: delete its files if the configuration says so,
    /// forget a claim held in memory.
    ClaimUsed(ClaimOrigin),
    /// Remove a generation's key, which no state refers to any more.
    RemoveKey(u32),
}

/// What the core should be doing now, derived from the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Nothing: parked on a permanent error, or an identity is live and the connection task
    /// keeps it connected.
    Idle,
    /// An identity is live: keep the production connection to it.
    Serve,
    /// No usable claim: wait for one (files installed and iotd restarted, or one handed over).
    WaitForClaim,
    CreateKey {
        generation: u32,
    },
    /// CreateKeysAndCertificate: the key comes from AWS.
    CreateKeysAndCertificate {
        generation: u32,
    },
    /// CreateCertificateFromCsr for the key of `generation`.
    RequestCertificate {
        generation: u32,
    },
    RegisterThing {
        generation: u32,
        certificate_id: String,
        certificate_pem: String,
        ownership_token: String,
        issued_at: i64,
        /// Where the certificate was issued (`None`: `cloud.endpoint`): only a claim for
        /// the same endpoint can register it.
        endpoint: Option<String>,
        /// A rotation's: the current identity's installer parameters, sent again. Empty when
        /// provisioning, where they come with the claim.
        installer_parameters: BTreeMap<String, String>,
    },
    /// Connect with the registered certificate; success commits it.
    VerifyIdentity {
        generation: u32,
        certificate_id: String,
        certificate_pem: String,
        thing_name: String,
        /// Where the identity lives (`None`: `cloud.endpoint`).
        endpoint: Option<String>,
    },
}

/// How a rotation is named to D-Bus and iotctl: by its staged generation.
pub fn rotation_id(staged_generation: u32) -> String {
    format!("rotation-{staged_generation}")
}

/// The unit of work that takes an operation on from `step`.
fn step_work(step: &Step) -> Work {
    match step {
        Step::KeyReady { generation } => Work::RequestCertificate {
            generation: *generation,
        },
        Step::CertificateIssued {
            generation,
            certificate_id,
            certificate_pem,
            ownership_token,
            issued_at,
            endpoint,
        } => Work::RegisterThing {
            generation: *generation,
            certificate_id: certificate_id.clone(),
            certificate_pem: certificate_pem.clone(),
            ownership_token: ownership_token.clone(),
            issued_at: *issued_at,
            endpoint: endpoint.clone(),
            installer_parameters: BTreeMap::new(),
        },
        Step::ThingRegistered {
            generation,
            certificate_id,
            certificate_pem,
            thing_name,
            endpoint,
            ..
        } => Work::VerifyIdentity {
            generation: *generation,
            certificate_id: certificate_id.clone(),
            certificate_pem: certificate_pem.clone(),
            thing_name: thing_name.clone(),
            endpoint: endpoint.clone(),
        },
    }
}

/// An input that is not legal in the current state: a bug in the core, said plainly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input} is not possible while the agent is {state}")]
pub struct IllegalTransition {
    pub input: &'static str,
    pub state: String,
}

/// The result of a transition: what to do, and whether anything changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transition {
    pub actions: Vec<Action>,
}

impl Transition {
    pub fn changed(&self) -> bool {
        !self.actions.is_empty()
    }
}

/// The state machine: the persisted state and what lives only while the process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub state: State,
    pub policy: Policy,
    /// A usable claim is at hand, and where it came from.
    pub claim: Option<ClaimOrigin>,
    /// The production connection is up with the live identity.
    pub connected: bool,
    /// The operation stopped on a permanent error; a restart, `Reprovision` or a new claim
    /// tries again.
    pub parked: bool,
    /// state.json could not be written: the state in memory is ahead of the disk, so nothing
    /// more is done until a restart reloads what is on disk (no command clears this).
    pub halted: bool,
}

impl Machine {
    /// The machine for a state loaded at start. A rotation that was not committed when the
    /// process stopped is rolled back (its staged key removed): the live identity is still the
    /// committed one. Returns the actions for that.
    pub fn resume(state: State, policy: Policy) -> (Self, Transition) {
        let mut machine = Self {
            state,
            policy,
            claim: None,
            connected: false,
            parked: false,
            halted: false,
        };
        let mut t = Transition::default();
        if let Some(Operation::Rotation {
            staged_generation,
            step,
            ..
        }) = machine.state.operation.clone()
        {
            if let Some(id) = step.as_ref().and_then(Step::certificate_id) {
                machine.state.abandoned_certificates.push(id.to_owned());
            }
            machine.state.operation = None;
            // Durable before the key goes: a TPM eviction cannot be undone by a lost rename.
            t.actions.push(Action::Persist(Durability::Durable));
            t.actions.push(Action::RemoveKey(staged_generation));
        }
        (machine, t)
    }

    /// A short description of where the machine is, for messages.
    pub fn describe(&self) -> String {
        match (&self.state.identity, &self.state.operation) {
            (_, Some(op)) => match op.step() {
                Some(step) => format!("{} ({})", op.name(), step.name()),
                None => format!("{} (starting)", op.name()),
            },
            (Some(i), None) => format!("provisioned as {}", i.thing_name),
            (None, None) => "without an identity".to_owned(),
        }
    }

    /// What the core should be doing now.
    pub fn work(&self) -> Work {
        if self.parked || self.halted {
            return Work::Idle;
        }
        let provisioning_step = match &self.state.operation {
            Some(Operation::Provisioning { step, .. }) => step,
            // Over the production connection: no claim needed.
            Some(Operation::Rotation {
                staged_generation,
                step,
                ..
            }) => {
                let Some(step) = step else {
                    return Work::CreateKey {
                        generation: *staged_generation,
                    };
                };
                let mut work = step_work(step);
                // The rotation's RegisterThing sends the installer's parameters again.
                if let (
                    Work::RegisterThing {
                        installer_parameters,
                        ..
                    },
                    Some(identity),
                ) = (&mut work, &self.state.identity)
                {
                    installer_parameters.clone_from(&identity.installer_parameters);
                }
                return work;
            }
            None if self.state.identity.is_some() => return Work::Serve,
            None => return Work::WaitForClaim,
        };
        let has_claim = self.claim.is_some();
        match provisioning_step {
            None if !has_claim => Work::WaitForClaim,
            None => {
                let generation = self.state.last_generation + 1;
                if self.policy.cloud_generated_keys {
                    Work::CreateKeysAndCertificate { generation }
                } else {
                    Work::CreateKey { generation }
                }
            }
            Some(Step::KeyReady { .. } | Step::CertificateIssued { .. }) if !has_claim => {
                Work::WaitForClaim
            }
            Some(step) => step_work(step),
        }
    }

    fn illegal(&self, input: &Input) -> IllegalTransition {
        IllegalTransition {
            input: input.name(),
            state: self.describe(),
        }
    }

    /// The provisioning step, when provisioning is the operation.
    fn provisioning(&mut self) -> Option<(&mut Option<Step>, ClaimOrigin)> {
        match &mut self.state.operation {
            Some(Operation::Provisioning { step, claim }) => Some((step, *claim)),
            _ => None,
        }
    }

    /// Moves the provisioning operation to `next`, if it is at a step `at` accepts.
    fn advance(
        &mut self,
        input: &Input,
        at: impl FnOnce(&Option<Step>) -> bool,
        next: Step,
        persist: Option<Durability>,
    ) -> Result<Transition, IllegalTransition> {
        let illegal = self.illegal(input);
        let (step, _) = self.provisioning().ok_or_else(|| illegal.clone())?;
        if !at(step) {
            return Err(illegal);
        }
        let generation = next.generation();
        *step = Some(next);
        self.state.last_generation = self.state.last_generation.max(generation);
        self.state.last_error = None;
        Ok(Transition {
            actions: persist.map(Action::Persist).into_iter().collect(),
        })
    }

    fn record(&mut self, f: &Failure, permanent: bool, now: i64) {
        self.state.last_error = Some(LastError {
            sticky: false,
            code: f.code.as_str().to_owned(),
            message: f.message.clone(),
            at: now,
            permanent,
            retry_at: f
                .retry_in
                .filter(|_| !permanent)
                .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX))),
        });
    }

    /// Applies `input` at wall-clock time `now` (Unix seconds).
    pub fn apply(&mut self, input: Input, now: i64) -> Result<Transition, IllegalTransition> {
        match &input {
            Input::ClaimAvailable(origin) => {
                let origin = *origin;
                let before = self.claim.replace(origin);
                let mut t = Transition::default();
                if self.state.identity.is_none() && self.state.operation.is_none() {
                    // Started in memory only: nothing is on disk until the key exists, so a
                    // restart before then starts over the same way.
                    self.state.operation = Some(Operation::Provisioning {
                        claim: origin,
                        step: None,
                    });
                    self.state.last_error = None;
                } else if before.is_some_and(|b| b != origin) {
                    // Another claim than the one a claim connection may be open with.
                    t.actions.push(Action::DropClaimSession);
                }
                if self.parked && self.state.identity.is_none() {
                    // A new claim is a reason to try again (an installer rescuing a gateway
                    // whose factory claim was refused).
                    self.parked = false;
                }
                Ok(t)
            }
            Input::ClaimGone { code, message } => {
                self.claim = None;
                let mut t = Transition {
                    actions: vec![Action::DropClaimSession],
                };
                if self.state.identity.is_none() || self.state.operation.is_some() {
                    self.state.last_error = Some(LastError {
                        sticky: false,
                        code: code.as_str().to_owned(),
                        message: message.clone(),
                        at: now,
                        permanent: false,
                        retry_at: None,
                    });
                    t.actions.insert(0, Action::Persist(Durability::Atomic));
                }
                Ok(t)
            }
            Input::KeyCreated { generation } => {
                let generation = *generation;
                if self.rotating() {
                    return self.rotation_advance(&input, Step::KeyReady { generation }, None);
                }
                if self.policy.cloud_generated_keys {
                    return Err(self.illegal(&input));
                }
                // Not persisted: until a certificate exists for it, a key is worth nothing, and
                // after a restart a new one is made in the next unused generation.
                self.advance(&input, Option::is_none, Step::KeyReady { generation }, None)
            }
            Input::CertificateIssued {
                generation,
                certificate_id,
                certificate_pem,
                ownership_token,
                endpoint,
            } => {
                let generation = *generation;
                if self.rotating() {
                    // Over the production connection: the identity's endpoint.
                    let endpoint = self
                        .state
                        .identity
                        .as_ref()
                        .and_then(|i| i.endpoint.clone());
                    let next = Step::CertificateIssued {
                        generation,
                        certificate_id: certificate_id.clone(),
                        certificate_pem: certificate_pem.clone(),
                        ownership_token: ownership_token.clone(),
                        issued_at: now,
                        endpoint,
                    };
                    // Durable: a rotation rolled back after a crash records this certificate
                    // (which RegisterThing may activate) for the backend.
                    return self.rotation_advance(&input, next, Some(Durability::Durable));
                }
                let cloud = self.policy.cloud_generated_keys;
                let next = Step::CertificateIssued {
                    generation,
                    certificate_id: certificate_id.clone(),
                    certificate_pem: certificate_pem.clone(),
                    ownership_token: ownership_token.clone(),
                    issued_at: now,
                    endpoint: endpoint.clone(),
                };
                self.advance(
                    &input,
                    |step| match step {
                        None => cloud,
                        Some(Step::KeyReady { generation: g }) => !cloud && *g == generation,
                        _ => false,
                    },
                    next,
                    // Durable before RegisterThing: a certificate it activates is never one that
                    // a crash makes the gateway forget.
                    Some(Durability::Durable),
                )
            }
            Input::ThingRegistered {
                thing_name,
                device_configuration,
                installer_parameters,
            } => {
                if self.rotating() {
                    return self.rotation_registered(&input, thing_name, device_configuration, now);
                }
                let Some((
                    Some(Step::CertificateIssued {
                        generation,
                        certificate_id,
                        certificate_pem,
                        endpoint,
                        ..
                    }),
                    origin,
                )) = self.provisioning().map(|(s, o)| (s.clone(), o))
                else {
                    return Err(self.illegal(&input));
                };
                let next = Step::ThingRegistered {
                    generation,
                    certificate_id,
                    certificate_pem,
                    thing_name: thing_name.clone(),
                    device_configuration: device_configuration.clone(),
                    endpoint,
                    installer_parameters: installer_parameters.clone(),
                };
                // From here on a restart needs no claim: connecting as the thing completes it.
                // Durable when a restart from certificate-issued would find no claim (it is
                // in memory, or its files go after the commit); otherwise atomic is enough: a
                // rename lost in a crash sends the agent back there, where the token is refused
                // (used) and it starts again from the CSR with the claim files, recording this
                // certificate as abandoned.
                let durability = match (origin, self.policy.delete_claim) {
                    (ClaimOrigin::File, false) => Durability::Atomic,
                    _ => Durability::Durable,
                };
                self.advance(&input, |_| true, next, Some(durability))
            }
            Input::IdentityVerified {
                not_before,
                not_after,
                key,
            } => {
                if self.rotating() {
                    return self.commit_rotation(&input, *not_before, *not_after, key, now);
                }
                let Some((
                    Some(Step::ThingRegistered {
                        generation,
                        certificate_id,
                        certificate_pem,
                        thing_name,
                        device_configuration,
                        endpoint,
                        installer_parameters,
                    }),
                    origin,
                )) = self.provisioning().map(|(s, o)| (s.clone(), o))
                else {
                    return Err(self.illegal(&input));
                };
                self.state.identity = Some(Identity {
                    endpoint,
                    installer_parameters,
                    generation,
                    certificate_id: certificate_id.clone(),
                    certificate_pem,
                    thing_name: thing_name.clone(),
                    key: Some(key.clone()),
                    not_before: *not_before,
                    not_after: *not_after,
                    device_configuration,
                    committed_at: now,
                });
                self.state.operation = None;
                self.state.last_error = None;
                self.connected = true;
                // The claim that did the work: the one at hand (after a restart it can come
                // from elsewhere than the one the operation started with).
                let origin = self.claim.take().unwrap_or(origin);
                Ok(Transition {
                    actions: vec![
                        Action::DropClaimSession,
                        // Atomic is enough: lost in a crash, the gateway connects as the thing
                        // again (thing-registered is durable) and commits; no claim needed.
                        Action::Persist(Durability::Atomic),
                        Action::ClaimUsed(origin),
                        Action::Emit(Event::Provisioned {
                            thing_name,
                            certificate_id: certificate_id.clone(),
                        }),
                        Action::Emit(Event::Connected { certificate_id }),
                    ],
                })
            }
            Input::CertificateReported { certificate_id } => {
                let known = self.state.abandoned_certificates.contains(certificate_id);
                if !known || self.state.reported_certificates.contains(certificate_id) {
                    return Ok(Transition::default());
                }
                self.state
                    .reported_certificates
                    .push(certificate_id.clone());
                // Lost in a crash, the report is only sent again: no need for the directory.
                Ok(Transition {
                    actions: vec![Action::Persist(Durability::Atomic)],
                })
            }
            Input::Connected => {
                let Some(identity) = &self.state.identity else {
                    return Err(self.illegal(&input));
                };
                let certificate_id = identity.certificate_id.clone();
                let mut t = Transition::default();
                // A rotation's rollback or a fall-back stays on show until the next commit.
                if self
                    .state
                    .last_error
                    .as_ref()
                    .is_some_and(|e| !e.sticky && self.state.operation.is_none())
                {
                    self.state.last_error = None;
                    t.actions.push(Action::Persist(Durability::Atomic));
                }
                if !self.connected {
                    self.connected = true;
                    t.actions
                        .push(Action::Emit(Event::Connected { certificate_id }));
                }
                Ok(t)
            }
            Input::Disconnected(f) => {
                if self.state.identity.is_none() {
                    return Err(self.illegal(&input));
                }
                let was = std::mem::replace(&mut self.connected, false);
                let mut t = Transition::default();
                let sticky = self.state.last_error.as_ref().is_some_and(|e| e.sticky);
                if self.state.operation.is_none() && !sticky {
                    self.record(f, false, now);
                    t.actions.push(Action::Persist(Durability::Atomic));
                }
                if was {
                    t.actions.push(Action::Emit(Event::Disconnected {
                        code: Some(f.code),
                        message: f.message.clone(),
                    }));
                }
                Ok(t)
            }
            Input::Failed(f) => self.fail(f, now),
            Input::Reprovision => self.reprovision(),
            Input::RotationDue(trigger) => self.start_rotation(&input, trigger.clone()),
            Input::RotationReported { new_certificate_id } => {
                let reports = &mut self.state.rotation.reports;
                let before = reports.len();
                reports.retain(|r| r.new_certificate_id != *new_certificate_id);
                if reports.len() == before {
                    return Ok(Transition::default());
                }
                // Lost in a crash, the report is only sent again.
                Ok(Transition {
                    actions: vec![Action::Persist(Durability::Atomic)],
                })
            }
            Input::FallBack(f) => self.fall_back(&input, f, now),
            Input::PreviousExpired => {
                let Some(previous) = self.state.previous.take() else {
                    return Ok(Transition::default());
                };
                Ok(Transition {
                    actions: vec![
                        // Durable before the key goes: the state must never name a removed key.
                        Action::Persist(Durability::Durable),
                        Action::RemoveKey(previous.identity.generation),
                    ],
                })
            }
        }
    }

    fn fail(&mut self, f: &Failure, now: i64) -> Result<Transition, IllegalTransition> {
        if self.rotating() && self.state.identity.is_some() {
            return Ok(match f.retry {
                // The step is tried again (the core gives up after a few tries: a Permanent).
                Retry::SameConnection | Retry::Reconnect => {
                    self.record(f, false, now);
                    Transition {
                        actions: vec![Action::Persist(Durability::Atomic)],
                    }
                }
                Retry::RestartFromCsr | Retry::NewIdentity | Retry::Permanent => {
                    self.roll_back(f, now)
                }
            });
        }
        let mut t = Transition::default();
        match f.retry {
            Retry::SameConnection | Retry::Reconnect => {
                // An operation's step, or the identity's connection being prepared (a TPM
                // that did not answer): either is tried again.
                if self.state.operation.is_none() && self.state.identity.is_none() {
                    return Err(self.illegal(&Input::Failed(f.clone())));
                }
                self.record(f, false, now);
                t.actions.push(Action::Persist(Durability::Atomic));
                if f.retry == Retry::Reconnect {
                    t.actions.push(Action::DropClaimSession);
                }
            }
            Retry::RestartFromCsr => {
                let cloud = self.policy.cloud_generated_keys;
                let Some((step, _)) = self.provisioning() else {
                    return Err(self.illegal(&Input::Failed(f.clone())));
                };
                let Some(Step::CertificateIssued {
                    generation,
                    certificate_id,
                    ..
                }) = step.clone()
                else {
                    return Err(self.illegal(&Input::Failed(f.clone())));
                };
                // Unregistered, it expires with its token. But if a RegisterThing succeeded
                // and only its reply was lost, it is ACTIVE and attached: keep its id.
                if cloud {
                    // That key came with the abandoned certificate; it is of no use without it.
                    *step = None;
                    t.actions.push(Action::RemoveKey(generation));
                } else {
                    *step = Some(Step::KeyReady { generation });
                }
                self.state.abandoned_certificates.push(certificate_id);
                self.record(f, false, now);
                // Durable before a key goes (cloud-generated keys): a lost rename must not
                // bring back a step whose key was removed.
                let durability = if cloud {
                    Durability::Durable
                } else {
                    Durability::Atomic
                };
                t.actions.insert(0, Action::Persist(durability));
            }
            Retry::NewIdentity => return Ok(self.key_lost(f, now)),
            Retry::Permanent => {
                self.record(f, true, now);
                t.actions.push(Action::Persist(Durability::Atomic));
                t.actions.push(Action::DropClaimSession);
                t.actions.push(Action::Emit(Event::Failed {
                    code: f.code,
                    message: f.message.clone(),
                }));
                match self.state.operation.take() {
                    // The live identity stays in use: only the operation is given up (its
                    // staged key goes).
                    Some(Operation::Rotation {
                        staged_generation,
                        step,
                        ..
                    }) if self.state.identity.is_some() => {
                        if let Some(id) = step.as_ref().and_then(Step::certificate_id) {
                            self.state.abandoned_certificates.push(id.to_owned());
                        }
                        t.actions[0] = Action::Persist(Durability::Durable);
                        t.actions.push(Action::RemoveKey(staged_generation));
                    }
                    other => {
                        self.state.operation = other;
                        self.parked = true;
                    }
                }
            }
        }
        Ok(t)
    }

    /// The device key is gone for good (a cleared TPM, a deleted file). Every message about it
    /// names `iotctl reprovision`, the one remedy a person has when it keeps happening.
    fn key_lost(&mut self, f: &Failure, now: i64) -> Transition {
        let mut t = Transition::default();
        if let Some(Operation::Provisioning { step, .. }) = &mut self.state.operation {
            // The operation's own key: make another one, in the same operation.
            if let Some(id) = step.as_ref().and_then(Step::certificate_id) {
                self.state.abandoned_certificates.push(id.to_owned());
            }
            let lost = step.take().map(|s| s.generation());
            self.record(&naming_reprovision(f), false, now);
            t.actions.push(Action::Persist(if lost.is_some() {
                Durability::Durable
            } else {
                Durability::Atomic
            }));
            t.actions.push(Action::DropClaimSession);
            // What is left of it (files, a TPM handle) would only be in the way.
            t.actions.extend(lost.map(Action::RemoveKey));
            return t;
        }
        // The live identity's key: the identity can never connect again.
        let identity_cert = self
            .state
            .identity
            .as_ref()
            .map(|i| i.certificate_id.clone());
        if self.policy.reprovision_when_key_lost && self.claim.is_some() {
            let origin = self.claim.unwrap_or(ClaimOrigin::File);
            if let Some(id) = identity_cert {
                self.state.abandoned_certificates.push(id);
            }
            let lost = self.state.identity.take().map(|i| i.generation);
            self.state.operation = Some(Operation::Provisioning {
                claim: origin,
                step: None,
            });
            let f = naming_reprovision(&Failure {
                message: format!("{}; provisioning a new identity with a new key", f.message),
                ..f.clone()
            });
            self.record(&f, false, now);
            t.actions = vec![Action::StopConnection, Action::Persist(Durability::Durable)];
            t.actions.extend(lost.map(Action::RemoveKey));
            t.actions.extend(self.stopped(&f.message));
        } else {
            let why = if self.policy.reprovision_when_key_lost {
                "no claim is at hand to provision a new identity with: install one or onboard, \
                 then run iotctl reprovision"
            } else {
                "set provisioning.reprovision_when_key_lost = true and keep a claim to get a new \
                 identity automatically, or run iotctl reprovision"
            };
            let f = Failure {
                message: format!("{}; {why}", f.message),
                retry: Retry::Permanent,
                ..f.clone()
            };
            self.record(&f, true, now);
            self.parked = true;
            t.actions = vec![Action::StopConnection, Action::Persist(Durability::Atomic)];
            t.actions.extend(self.stopped(&f.message));
            t.actions.push(Action::Emit(Event::Failed {
                code: f.code,
                message: f.message,
            }));
        }
        t
    }

    /// The connection was stopped by iotd itself: said once, if it was up.
    fn stopped(&mut self, why: &str) -> Option<Action> {
        std::mem::replace(&mut self.connected, false).then(|| {
            Action::Emit(Event::Disconnected {
                code: None,
                message: why.to_owned(),
            })
        })
    }

    fn rotating(&self) -> bool {
        matches!(self.state.operation, Some(Operation::Rotation { .. }))
    }

    /// Moves the rotation to `next`, from the step before it.
    fn rotation_advance(
        &mut self,
        input: &Input,
        next: Step,
        persist: Option<Durability>,
    ) -> Result<Transition, IllegalTransition> {
        let illegal = self.illegal(input);
        let Some(Operation::Rotation {
            staged_generation,
            step,
            ..
        }) = &mut self.state.operation
        else {
            return Err(illegal);
        };
        let follows = match (&*step, &next) {
            (None, Step::KeyReady { generation }) => generation == staged_generation,
            (
                Some(Step::KeyReady { generation: g }),
                Step::CertificateIssued { generation, .. },
            )
            | (
                Some(Step::CertificateIssued { generation: g, .. }),
                Step::ThingRegistered { generation, .. },
            ) => g == generation,
            _ => false,
        };
        if !follows {
            return Err(illegal);
        }
        *step = Some(next);
        self.state.last_error = None;
        Ok(Transition {
            actions: persist.map(Action::Persist).into_iter().collect(),
        })
    }

    /// The rotation's RegisterThing answered: with the same thing, it goes on to the switch;
    /// with another (a rotation template that names things differently), it is rolled back.
    fn rotation_registered(
        &mut self,
        input: &Input,
        thing_name: &str,
        device_configuration: &BTreeMap<String, String>,
        now: i64,
    ) -> Result<Transition, IllegalTransition> {
        let Some(Operation::Rotation {
            step:
                Some(Step::CertificateIssued {
                    generation,
                    certificate_id,
                    certificate_pem,
                    endpoint,
                    ..
                }),
            ..
        }) = self.state.operation.clone()
        else {
            return Err(self.illegal(input));
        };
        let Some(current) = self.state.identity.as_ref().map(|i| i.thing_name.clone()) else {
            return Err(self.illegal(input));
        };
        if thing_name != current {
            let f = Failure {
                code: ErrorCode::TemplateRejected,
                message: format!(
                    "the rotation's RegisterThing registered certificate {certificate_id} to \
                     thing {thing_name}, not to this gateway's thing {current}; check \
                     rotation.template (it must name the same thing); rolled back"
                ),
                retry: Retry::Permanent,
                retry_in: None,
            };
            return Ok(self.roll_back(&f, now));
        }
        let next = Step::ThingRegistered {
            generation,
            certificate_id,
            certificate_pem,
            thing_name: thing_name.to_owned(),
            device_configuration: device_configuration.clone(),
            endpoint,
            // What the work sent: the current identity's.
            installer_parameters: self
                .state
                .identity
                .as_ref()
                .map(|i| i.installer_parameters.clone())
                .unwrap_or_default(),
        };
        // Atomic is enough: a rotation is rolled back after a crash whatever its step, and the
        // certificate is already recorded (certificate-issued is durable).
        let mut t = self.rotation_advance(input, next, Some(Durability::Atomic))?;
        // Next the connection switches to the new certificate: down until it is up again.
        if std::mem::replace(&mut self.connected, false) {
            t.actions.push(Action::Emit(Event::Disconnected {
                code: None,
                message: "switching to the rotation's new certificate".to_owned(),
            }));
        }
        Ok(t)
    }

    /// Starts a rotation: a new key in the next generation, the live identity in use until
    /// the commit. The identity a previous rotation kept goes first: a TPM has two slots.
    fn start_rotation(
        &mut self,
        input: &Input,
        trigger: Trigger,
    ) -> Result<Transition, IllegalTransition> {
        if self.state.identity.is_none() || self.state.operation.is_some() || self.halted {
            return Err(self.illegal(input));
        }
        let staged_generation = self.state.last_generation + 1;
        self.state.last_generation = staged_generation;
        let started = Event::RotationStarted {
            id: rotation_id(staged_generation),
            trigger: trigger.as_str(),
        };
        self.state.operation = Some(Operation::Rotation {
            staged_generation,
            trigger,
            step: None,
        });
        self.parked = false;
        let mut actions = Vec::new();
        if let Some(previous) = self.state.previous.take() {
            actions.push(Action::Persist(Durability::Durable));
            actions.push(Action::RemoveKey(previous.identity.generation));
        } else {
            // On disk before the key exists, so that a restart removes the staged key.
            actions.push(Action::Persist(Durability::Atomic));
        }
        actions.push(Action::Emit(started));
        Ok(Transition { actions })
    }

    /// The new certificate connected: one durable write makes it the identity, and the one it
    /// replaces is kept for the grace period.
    fn commit_rotation(
        &mut self,
        input: &Input,
        not_before: i64,
        not_after: i64,
        key: &str,
        now: i64,
    ) -> Result<Transition, IllegalTransition> {
        let Some(Operation::Rotation {
            trigger,
            step:
                Some(Step::ThingRegistered {
                    generation,
                    certificate_id,
                    certificate_pem,
                    thing_name,
                    device_configuration,
                    endpoint,
                    installer_parameters,
                }),
            ..
        }) = self.state.operation.clone()
        else {
            return Err(self.illegal(input));
        };
        let Some(old) = self.state.identity.take() else {
            return Err(self.illegal(input));
        };
        let report = RotationReport {
            thing_name: thing_name.clone(),
            old_certificate_id: old.certificate_id.clone(),
            new_certificate_id: certificate_id.clone(),
            rotated_at: now,
            reason: trigger.as_str().to_owned(),
            outcome: "committed".to_owned(),
            cause: None,
            job_id: trigger.job_id(),
        };
        self.state.identity = Some(Identity {
            generation,
            certificate_id: certificate_id.clone(),
            certificate_pem,
            thing_name,
            key: Some(key.to_owned()),
            not_before,
            not_after,
            device_configuration,
            committed_at: now,
            endpoint,
            installer_parameters,
        });
        self.state.previous = Some(Previous {
            identity: old,
            delete_after: now.saturating_add(self.policy.grace_period),
        });
        self.state.operation = None;
        self.state.last_error = None;
        self.state.rotation.retry_at = None;
        self.state.rotation.reports.push(report.clone());
        self.state.rotation.last = Some(report);
        self.connected = true;
        Ok(Transition {
            actions: vec![
                // Durable: the report that makes the backend deactivate the old certificate
                // goes out only after this, and must never be about a commit a crash undid.
                Action::Persist(Durability::Durable),
                Action::Emit(Event::CredentialsRotated {
                    certificate_id: certificate_id.clone(),
                    not_after,
                }),
                Action::Emit(Event::Connected { certificate_id }),
            ],
        })
    }

    /// Gives a rotation up before its commit: the live identity stays, the staged key goes,
    /// the certificate (if one was issued) is recorded for the backend, and the next scheduled
    /// rotation waits `retry_interval`.
    fn roll_back(&mut self, f: &Failure, now: i64) -> Transition {
        let Some(Operation::Rotation {
            staged_generation,
            step,
            trigger,
        }) = self.state.operation.take()
        else {
            return Transition::default();
        };
        let abandoned = step
            .as_ref()
            .and_then(Step::certificate_id)
            .map(str::to_owned);
        let retry_at = now.saturating_add(self.policy.retry_interval);
        let f = Failure {
            message: format!(
                "rotation {} ({}) failed and was rolled back: {}; the gateway keeps certificate \
                 {}",
                rotation_id(staged_generation),
                trigger.as_str(),
                f.message,
                self.state
                    .identity
                    .as_ref()
                    .map_or("(none)", |i| i.certificate_id.as_str())
            ),
            retry_in: u64::try_from(self.policy.retry_interval).ok(),
            ..f.clone()
        };
        self.record(&f, false, now);
        if let Some(e) = &mut self.state.last_error {
            e.retry_at = Some(retry_at);
            e.sticky = true;
        }
        self.state.rotation.retry_at = Some(retry_at);
        if let (Some(id), Some(identity)) = (&abandoned, &self.state.identity) {
            self.state.abandoned_certificates.push(id.clone());
            self.state.rotation.reports.push(RotationReport {
                thing_name: identity.thing_name.clone(),
                old_certificate_id: identity.certificate_id.clone(),
                new_certificate_id: id.clone(),
                rotated_at: now,
                reason: trigger.as_str().to_owned(),
                outcome: "rolled-back".to_owned(),
                cause: Some(f.message.clone()),
                job_id: trigger.job_id(),
            });
        }
        Transition {
            actions: vec![
                // Durable before the staged key goes.
                Action::Persist(Durability::Durable),
                Action::RemoveKey(staged_generation),
                Action::Emit(Event::RotationFailed {
                    id: rotation_id(staged_generation),
                    code: f.code,
                    message: f.message,
                }),
            ],
        }
    }

    /// The committed identity is refused: the previous one, if a rotation kept it and it is
    /// still valid, becomes the identity again.
    fn fall_back(
        &mut self,
        input: &Input,
        f: &Failure,
        now: i64,
    ) -> Result<Transition, IllegalTransition> {
        if self.state.operation.is_some() {
            return Err(self.illegal(input));
        }
        let usable = self
            .state
            .previous
            .as_ref()
            .is_some_and(|p| p.identity.not_after > now);
        let (Some(refused), true) = (self.state.identity.as_ref(), usable) else {
            return Err(self.illegal(input));
        };
        let refused_id = refused.certificate_id.clone();
        let refused_generation = refused.generation;
        let Some(previous) = self.state.previous.take() else {
            return Err(self.illegal(input));
        };
        let back_to = previous.identity.certificate_id.clone();
        self.state.identity = Some(previous.identity);
        self.state.abandoned_certificates.push(refused_id.clone());
        let message = format!(
            "certificate {refused_id} is refused ({}); fell back to the previous certificate \
             {back_to}, which a rotation kept: rotate again (iotctl rotate) or find out why AWS \
             IoT refuses the new one",
            f.message
        );
        self.record(
            &Failure {
                message: message.clone(),
                ..f.clone()
            },
            false,
            now,
        );
        if let Some(e) = &mut self.state.last_error {
            e.sticky = true;
        }
        // A report of the commit not sent yet would make the backend deactivate the certificate
        // the gateway is going back to.
        self.state
            .rotation
            .reports
            .retain(|r| r.new_certificate_id != refused_id);
        self.connected = false;
        Ok(Transition {
            actions: vec![
                Action::StopConnection,
                Action::Persist(Durability::Durable),
                Action::RemoveKey(refused_generation),
                Action::Emit(Event::FellBack {
                    certificate_id: back_to,
                    message,
                }),
            ],
        })
    }

    /// Abandons the identity and any operation; provisioning starts over with a new key. The
    /// core refuses first when work is in flight or no claim is at hand.
    fn reprovision(&mut self) -> Result<Transition, IllegalTransition> {
        let Some(origin) = self.claim else {
            return Err(self.illegal(&Input::Reprovision));
        };
        let at_start = self.state.identity.is_none()
            && matches!(
                self.state.operation,
                Some(Operation::Provisioning { step: None, .. }) | None
            );
        if at_start && self.state.last_error.is_none() && !self.parked {
            return Ok(Transition::default());
        }
        // The abandoned identity's and operation's keys go once the state no longer names
        // them: a new identity is asked for, and a TPM has two persistent slots, not more.
        let mut removed = Vec::new();
        if let Some(identity) = self.state.identity.take() {
            self.state
                .abandoned_certificates
                .push(identity.certificate_id);
            removed.push(identity.generation);
        }
        let (step, staged) = match self.state.operation.take() {
            Some(Operation::Provisioning { step, .. }) => (step, None),
            Some(Operation::Rotation {
                step,
                staged_generation,
                ..
            }) => (step, Some(staged_generation)),
            None => (None, None),
        };
        if let Some(step) = &step {
            if let Some(id) = step.certificate_id() {
                self.state.abandoned_certificates.push(id.to_owned());
            }
            removed.push(step.generation());
        }
        removed.extend(staged);
        if let Some(previous) = self.state.previous.take() {
            self.state
                .abandoned_certificates
                .push(previous.identity.certificate_id);
            removed.push(previous.identity.generation);
        }
        removed.dedup();
        self.state.operation = Some(Operation::Provisioning {
            claim: origin,
            step: None,
        });
        self.state.last_error = None;
        self.parked = false;
        let mut actions = vec![
            Action::StopConnection,
            Action::DropClaimSession,
            // Durable before a key goes: a TPM eviction cannot be undone by a lost rename.
            Action::Persist(if removed.is_empty() {
                Durability::Atomic
            } else {
                Durability::Durable
            }),
        ];
        actions.extend(removed.into_iter().map(Action::RemoveKey));
        actions.extend(self.stopped("the identity was abandoned (reprovision)"));
        Ok(Transition { actions })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{LastError, Trigger};

    const NOW: i64 = 1_000;

    fn fresh(policy: Policy) -> Machine {
        Machine::resume(State::default(), policy).0
    }

    fn failure(retry: Retry, code: ErrorCode) -> Failure {
        Failure {
            code,
            message: format!("{} happened", code.as_str()),
            retry,
            retry_in: Some(3),
        }
    }

    fn issued(generation: u32) -> Input {
        Input::CertificateIssued {
            endpoint: None,
            generation,
            certificate_id: format!("cert-{generation}"),
            certificate_pem: format!("PEM {generation}"),
            ownership_token: "token".into(),
        }
    }

    fn registered() -> Input {
        Input::ThingRegistered {
            thing_name: "gw-1".into(),
            device_configuration: BTreeMap::new(),
            installer_parameters: BTreeMap::new(),
        }
    }

    fn verified() -> Input {
        Input::IdentityVerified {
            not_before: 10,
            not_after: 20,
            key: "file /k".into(),
        }
    }

    /// A machine taken through provisioning with a file claim, up to the identity.
    fn provisioned() -> Machine {
        let mut m = fresh(Policy::default());
        for input in [
            Input::ClaimAvailable(ClaimOrigin::File),
            Input::KeyCreated { generation: 1 },
            issued(1),
            registered(),
            verified(),
        ] {
            m.apply(input, NOW).unwrap();
        }
        m
    }

    /// A machine with cloud-generated keys at certificate-issued (generation 1).
    fn cloud_generated_issued() -> Machine {
        let mut m = fresh(Policy {
            cloud_generated_keys: true,
            ..Policy::default()
        });
        m.apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        m.apply(issued(1), NOW).unwrap();
        m
    }

    fn step(m: &Machine) -> Option<&Step> {
        m.state.operation.as_ref().and_then(Operation::step)
    }

    #[test]
    fn without_a_claim_it_waits_and_creates_nothing() {
        let m = fresh(Policy::default());
        assert_eq!(m.work(), Work::WaitForClaim);
        assert_eq!(m.state, State::default());
    }

    /// `provisioned()` with a rotation policy: 7 days' grace, 1 h between tries.
    fn rotation_policy() -> Policy {
        Policy {
            grace_period: 7 * 86_400,
            retry_interval: 3_600,
            ..Policy::default()
        }
    }

    /// A provisioned machine (generation 1) under `rotation_policy`, its rotation started.
    fn rotating() -> Machine {
        let mut m = provisioned();
        m.policy = rotation_policy();
        m.apply(Input::RotationDue(Trigger::Schedule), NOW).unwrap();
        m
    }

    #[test]
    fn a_rotation_commits_only_when_the_new_certificate_connected() {
        let mut m = provisioned();
        m.policy = rotation_policy();
        let t = m.apply(Input::RotationDue(Trigger::OnDemand), NOW).unwrap();
        assert_eq!(
            t.actions,
            [
                Action::Persist(Durability::Atomic),
                Action::Emit(Event::RotationStarted {
                    id: "rotation-2".into(),
                    trigger: "on-demand"
                })
            ]
        );
        // A new key, in the next generation, over the production connection: no claim.
        assert_eq!(m.claim, None);
        assert_eq!(m.work(), Work::CreateKey { generation: 2 });
        m.apply(Input::KeyCreated { generation: 2 }, NOW).unwrap();
        assert_eq!(m.work(), Work::RequestCertificate { generation: 2 });
        let t = m.apply(issued(2), NOW).unwrap();
        assert_eq!(t.actions, [Action::Persist(Durability::Durable)]);
        assert!(matches!(
            m.work(),
            Work::RegisterThing { generation: 2, .. }
        ));
        m.apply(registered(), NOW).unwrap();
        assert!(matches!(
            m.work(),
            Work::VerifyIdentity { generation: 2, .. }
        ));
        // Until the commit the live identity is the old one.
        assert_eq!(m.state.identity.as_ref().unwrap().certificate_id, "cert-1");

        let t = m.apply(verified(), NOW + 5).unwrap();
        assert_eq!(t.actions[0], Action::Persist(Durability::Durable));
        assert!(t.actions.contains(&Action::Emit(Event::CredentialsRotated {
            certificate_id: "cert-2".into(),
            not_after: 20
        })));
        let identity = m.state.identity.as_ref().unwrap();
        assert_eq!(
            (identity.generation, identity.certificate_id.as_str()),
            (2, "cert-2")
        );
        let previous = m.state.previous.as_ref().unwrap();
        assert_eq!(previous.identity.certificate_id, "cert-1");
        assert_eq!(previous.delete_after, NOW + 5 + 7 * 86_400);
        assert_eq!(m.state.operation, None);
        let report = &m.state.rotation.reports[0];
        assert_eq!(
            (
                report.old_certificate_id.as_str(),
                report.new_certificate_id.as_str(),
                report.reason.as_str(),
                report.outcome.as_str()
            ),
            ("cert-1", "cert-2", "on-demand", "committed")
        );
        assert_eq!(m.work(), Work::Serve);

        // The report acknowledged: once, then nothing to do.
        let ack = Input::RotationReported {
            new_certificate_id: "cert-2".into(),
        };
        assert!(m.apply(ack.clone(), NOW).unwrap().changed());
        assert!(m.state.rotation.reports.is_empty());
        assert!(!m.apply(ack, NOW).unwrap().changed());

        // The grace period over, the previous key goes (after a durable write).
        let t = m.apply(Input::PreviousExpired, NOW).unwrap();
        assert_eq!(
            t.actions,
            [Action::Persist(Durability::Durable), Action::RemoveKey(1)]
        );
        assert_eq!(m.state.previous, None);
    }

    #[test]
    fn a_failed_rotation_is_rolled_back_and_retried_later() {
        let mut m = rotating();
        m.apply(Input::KeyCreated { generation: 2 }, NOW).unwrap();
        m.apply(issued(2), NOW).unwrap();
        // A transient failure: the step is tried again.
        let t = m
            .apply(
                Input::Failed(failure(Retry::SameConnection, ErrorCode::NoReply)),
                NOW,
            )
            .unwrap();
        assert_eq!(t.actions, [Action::Persist(Durability::Atomic)]);
        assert!(matches!(m.work(), Work::RegisterThing { .. }));
        // A permanent one: rolled back.
        let t = m
            .apply(
                Input::Failed(failure(Retry::Permanent, ErrorCode::TemplateRejected)),
                NOW,
            )
            .unwrap();
        assert_eq!(t.actions[0], Action::Persist(Durability::Durable));
        assert_eq!(t.actions[1], Action::RemoveKey(2));
        assert!(matches!(
            t.actions[2],
            Action::Emit(Event::RotationFailed { .. })
        ));
        assert_eq!(m.state.operation, None);
        assert_eq!(m.state.identity.as_ref().unwrap().certificate_id, "cert-1");
        assert_eq!(m.state.abandoned_certificates, ["cert-2"]);
        assert_eq!(m.state.rotation.retry_at, Some(NOW + 3_600));
        assert_eq!(m.state.rotation.reports[0].outcome, "rolled-back");
        let error = m.state.last_error.as_ref().unwrap();
        assert!(!error.permanent);
        assert!(error.message.contains("rolled back") && error.message.contains("cert-1"));
        assert_eq!(m.work(), Work::Serve);
    }

    #[test]
    fn a_rotation_that_registers_another_thing_is_rolled_back() {
        let mut m = rotating();
        m.apply(Input::KeyCreated { generation: 2 }, NOW).unwrap();
        m.apply(issued(2), NOW).unwrap();
        let other = Input::ThingRegistered {
            thing_name: "gw-other".into(),
            device_configuration: BTreeMap::new(),
            installer_parameters: BTreeMap::new(),
        };
        let t = m.apply(other, NOW).unwrap();
        assert!(t.actions.contains(&Action::RemoveKey(2)));
        assert_eq!(m.state.operation, None);
        let message = &m.state.last_error.as_ref().unwrap().message;
        assert!(message.contains("gw-other") && message.contains("rotation.template"));
    }

    #[test]
    fn a_new_rotation_removes_the_previous_identity_first() {
        let mut m = rotating();
        for input in [
            Input::KeyCreated { generation: 2 },
            issued(2),
            registered(),
            verified(),
        ] {
            m.apply(input, NOW).unwrap();
        }
        assert!(m.state.previous.is_some());
        let t = m.apply(Input::RotationDue(Trigger::Schedule), NOW).unwrap();
        assert_eq!(
            t.actions[..2],
            [Action::Persist(Durability::Durable), Action::RemoveKey(1)]
        );
        assert_eq!(m.work(), Work::CreateKey { generation: 3 });
        // Only one operation at a time.
        assert!(m.apply(Input::RotationDue(Trigger::OnDemand), NOW).is_err());
    }

    #[test]
    fn a_refused_new_identity_falls_back_to_the_previous_one_while_valid() {
        let mut m = rotating();
        for input in [
            Input::KeyCreated { generation: 2 },
            issued(2),
            registered(),
            verified(),
        ] {
            m.apply(input, NOW).unwrap();
        }
        let revoked = failure(Retry::Reconnect, ErrorCode::CertificateRevoked);
        // The previous certificate expired (notAfter 20 in `provisioned`): nothing to go back to.
        assert!(m.apply(Input::FallBack(revoked.clone()), NOW).is_err());
        m.state.previous.as_mut().unwrap().identity.not_after = NOW + 100;
        let t = m.apply(Input::FallBack(revoked), NOW).unwrap();
        assert_eq!(t.actions[0], Action::StopConnection);
        assert!(t.actions.contains(&Action::RemoveKey(2)));
        assert_eq!(m.state.identity.as_ref().unwrap().certificate_id, "cert-1");
        assert_eq!(m.state.previous, None);
        assert_eq!(m.state.abandoned_certificates, ["cert-2"]);
        assert!(
            m.state
                .last_error
                .as_ref()
                .unwrap()
                .message
                .contains("fell back")
        );
        assert_eq!(m.work(), Work::Serve);
    }

    #[test]
    fn the_certificates_endpoint_goes_with_it_to_the_identity() {
        let mut m = fresh(Policy::default());
        m.apply(Input::ClaimAvailable(ClaimOrigin::Network), NOW)
            .unwrap();
        m.apply(Input::KeyCreated { generation: 1 }, NOW).unwrap();
        let elsewhere = Some("b-ats.iot.eu-west-1.amazonaws.com".to_owned());
        let Input::CertificateIssued {
            generation,
            certificate_id,
            certificate_pem,
            ownership_token,
            ..
        } = issued(1)
        else {
            unreachable!()
        };
        let input = Input::CertificateIssued {
            generation,
            certificate_id,
            certificate_pem,
            ownership_token,
            endpoint: elsewhere.clone(),
        };
        m.apply(input, NOW).unwrap();
        assert!(matches!(m.work(), Work::RegisterThing { endpoint, .. } if endpoint == elsewhere));
        m.apply(registered(), NOW).unwrap();
        assert!(matches!(m.work(), Work::VerifyIdentity { endpoint, .. } if endpoint == elsewhere));
        m.apply(verified(), NOW).unwrap();
        let identity = m.state.identity.as_ref().unwrap();
        assert_eq!(identity.endpoint, elsewhere);
        assert_eq!(m.state.endpoint(), elsewhere.as_deref());
    }

    #[test]
    fn provisioning_with_a_csr_step_by_step() {
        let mut m = fresh(Policy::default());
        let t = m
            .apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        // Nothing on disk yet: a restart here starts over the same way.
        assert!(t.actions.is_empty());
        assert_eq!(m.work(), Work::CreateKey { generation: 1 });

        // A key alone is not persisted: a restart makes another in the next generation.
        let t = m.apply(Input::KeyCreated { generation: 1 }, NOW).unwrap();
        assert!(t.actions.is_empty());
        assert_eq!(step(&m), Some(&Step::KeyReady { generation: 1 }));
        assert_eq!(m.state.last_generation, 1);
        assert_eq!(m.work(), Work::RequestCertificate { generation: 1 });

        let t = m.apply(issued(1), NOW).unwrap();
        // Durable before RegisterThing.
        assert_eq!(t.actions, [Action::Persist(Durability::Durable)]);
        assert_eq!(
            m.work(),
            Work::RegisterThing {
                endpoint: None,
                generation: 1,
                certificate_id: "cert-1".into(),
                certificate_pem: "PEM 1".into(),
                ownership_token: "token".into(),
                issued_at: NOW,
                installer_parameters: BTreeMap::new(),
            }
        );

        let t = m.apply(registered(), NOW).unwrap();
        // The claim files stay: atomic is enough (see `thing_registered_is_durable_when_…`).
        assert_eq!(t.actions, [Action::Persist(Durability::Atomic)]);
        assert_eq!(
            m.work(),
            Work::VerifyIdentity {
                endpoint: None,
                generation: 1,
                certificate_id: "cert-1".into(),
                certificate_pem: "PEM 1".into(),
                thing_name: "gw-1".into(),
            }
        );

        let t = m.apply(verified(), NOW + 5).unwrap();
        assert_eq!(
            t.actions,
            [
                Action::DropClaimSession,
                Action::Persist(Durability::Atomic),
                Action::ClaimUsed(ClaimOrigin::File),
                Action::Emit(Event::Provisioned {
                    thing_name: "gw-1".into(),
                    certificate_id: "cert-1".into()
                }),
                Action::Emit(Event::Connected {
                    certificate_id: "cert-1".into()
                }),
            ]
        );
        let identity = m.state.identity.clone().unwrap();
        assert_eq!(
            (identity.generation, identity.not_before, identity.not_after),
            (1, 10, 20)
        );
        assert_eq!(identity.committed_at, NOW + 5);
        assert_eq!(identity.key.as_deref(), Some("file /k"));
        assert_eq!(m.state.operation, None);
        assert!(m.connected);
        assert_eq!(m.work(), Work::Serve);
    }

    #[test]
    fn cloud_generated_keys_skip_the_key_step() {
        let policy = Policy {
            cloud_generated_keys: true,
            ..Policy::default()
        };
        let mut m = fresh(policy);
        m.apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        assert_eq!(m.work(), Work::CreateKeysAndCertificate { generation: 1 });
        let e = m
            .apply(Input::KeyCreated { generation: 1 }, NOW)
            .unwrap_err();
        assert_eq!(e.input, "a key being created");
        m.apply(issued(1), NOW).unwrap();
        assert_eq!(step(&m).unwrap().name(), "certificate-issued");
    }

    #[test]
    fn illegal_transitions_name_the_input_and_the_state() {
        let mut m = provisioned();
        let before = m.clone();
        for input in [
            Input::KeyCreated { generation: 2 },
            issued(2),
            registered(),
            verified(),
            Input::Failed(failure(Retry::RestartFromCsr, ErrorCode::Rejected)),
        ] {
            let e = m.apply(input, NOW).unwrap_err();
            assert!(
                e.to_string()
                    .ends_with("while the agent is provisioned as gw-1"),
                "{e}"
            );
            assert_eq!(m, before, "an illegal input changes nothing");
        }
        let mut m = fresh(Policy::default());
        for input in [
            Input::Connected,
            Input::Disconnected(failure(Retry::Reconnect, ErrorCode::Network)),
            Input::Reprovision,
        ] {
            let e = m.apply(input, NOW).unwrap_err();
            assert!(e.to_string().contains("without an identity"), "{e}");
        }
        m.apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        m.apply(Input::KeyCreated { generation: 1 }, NOW).unwrap();
        let e = m.apply(issued(7), NOW).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a certificate being issued is not possible while the agent is provisioning (key-ready)"
        );
        assert!(m.apply(registered(), NOW).is_err());
        assert!(m.apply(verified(), NOW).is_err());
        assert!(m.apply(Input::KeyCreated { generation: 2 }, NOW).is_err());
        assert!(
            m.apply(
                Input::Failed(failure(Retry::RestartFromCsr, ErrorCode::Rejected)),
                NOW
            )
            .is_err()
        );
    }

    #[test]
    fn a_claim_that_expires_sends_provisioning_back_to_waiting() {
        let mut m = fresh(Policy::default());
        m.apply(Input::ClaimAvailable(ClaimOrigin::Network), NOW)
            .unwrap();
        m.apply(Input::KeyCreated { generation: 1 }, NOW).unwrap();
        let t = m
            .apply(
                Input::ClaimGone {
                    code: ErrorCode::ClaimExpired,
                    message: "the claim expired".into(),
                },
                NOW,
            )
            .unwrap();
        assert_eq!(
            t.actions,
            [
                Action::Persist(Durability::Atomic),
                Action::DropClaimSession
            ]
        );
        assert_eq!(m.work(), Work::WaitForClaim);
        // The step is kept: the key is reused with the next claim.
        assert_eq!(step(&m), Some(&Step::KeyReady { generation: 1 }));
        let e = m.state.last_error.clone().unwrap();
        assert_eq!((e.code.as_str(), e.permanent), ("claim-expired", false));

        m.apply(Input::ClaimAvailable(ClaimOrigin::Network), NOW)
            .unwrap();
        assert_eq!(m.work(), Work::RequestCertificate { generation: 1 });
    }

    #[test]
    fn retryable_failures_record_when_the_retry_comes() {
        let mut m = fresh(Policy::default());
        m.apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        m.apply(Input::KeyCreated { generation: 1 }, NOW).unwrap();
        let t = m
            .apply(
                Input::Failed(failure(Retry::Reconnect, ErrorCode::Network)),
                NOW,
            )
            .unwrap();
        assert_eq!(
            t.actions,
            [
                Action::Persist(Durability::Atomic),
                Action::DropClaimSession
            ]
        );
        let e = m.state.last_error.clone().unwrap();
        assert_eq!((e.retry_at, e.permanent, e.at), (Some(NOW + 3), false, NOW));
        let t = m
            .apply(
                Input::Failed(failure(Retry::SameConnection, ErrorCode::Throttled)),
                NOW,
            )
            .unwrap();
        assert_eq!(t.actions, [Action::Persist(Durability::Atomic)]);
        assert_eq!(m.work(), Work::RequestCertificate { generation: 1 });
        // The next step that succeeds clears the error.
        m.apply(issued(1), NOW).unwrap();
        assert_eq!(m.state.last_error, None);
    }

    #[test]
    fn a_lost_ownership_token_goes_back_to_the_csr() {
        let mut m = fresh(Policy::default());
        m.apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        m.apply(Input::KeyCreated { generation: 1 }, NOW).unwrap();
        m.apply(issued(1), NOW).unwrap();
        let t = m
            .apply(
                Input::Failed(failure(Retry::RestartFromCsr, ErrorCode::Rejected)),
                NOW,
            )
            .unwrap();
        assert_eq!(t.actions, [Action::Persist(Durability::Atomic)]);
        assert_eq!(step(&m), Some(&Step::KeyReady { generation: 1 }));
        assert_eq!(m.state.abandoned_certificates, ["cert-1"]);

        // With cloud-generated keys the key goes with its certificate.
        let mut m = cloud_generated_issued();
        let t = m
            .apply(
                Input::Failed(failure(Retry::RestartFromCsr, ErrorCode::Rejected)),
                NOW,
            )
            .unwrap();
        assert_eq!(
            t.actions,
            [Action::Persist(Durability::Durable), Action::RemoveKey(1)]
        );
        assert_eq!(step(&m), None);
        assert_eq!(m.work(), Work::CreateKeysAndCertificate { generation: 2 });
    }

    #[test]
    fn a_lost_key_during_provisioning_makes_a_new_one() {
        let mut m = fresh(Policy::default());
        m.apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        m.apply(Input::KeyCreated { generation: 1 }, NOW).unwrap();
        m.apply(issued(1), NOW).unwrap();
        m.apply(
            Input::Failed(failure(Retry::NewIdentity, ErrorCode::KeyLost)),
            NOW,
        )
        .unwrap();
        assert_eq!(step(&m), None);
        assert_eq!(m.state.abandoned_certificates, ["cert-1"]);
        let said = m.state.last_error.clone().unwrap().message;
        assert!(said.contains("iotctl reprovision"), "{said}");
        // Never the same generation again.
        assert_eq!(m.work(), Work::CreateKey { generation: 2 });
    }

    #[test]
    fn a_lost_identity_key_reprovisions_only_when_allowed_and_possible() {
        let mut m = provisioned();
        m.policy.reprovision_when_key_lost = true;
        m.claim = Some(ClaimOrigin::File);
        let t = m
            .apply(
                Input::Failed(failure(Retry::NewIdentity, ErrorCode::KeyLost)),
                NOW,
            )
            .unwrap();
        assert_eq!(
            t.actions[..3],
            [
                Action::StopConnection,
                Action::Persist(Durability::Durable),
                Action::RemoveKey(1)
            ]
        );
        assert!(matches!(
            t.actions[3],
            Action::Emit(Event::Disconnected { code: None, .. })
        ));
        assert_eq!(m.state.identity, None);
        assert_eq!(m.state.abandoned_certificates, ["cert-1"]);
        assert_eq!(m.work(), Work::CreateKey { generation: 2 });
        let said = m.state.last_error.clone().unwrap().message;
        assert!(said.contains("iotctl reprovision"), "{said}");

        let mut m = provisioned();
        let t = m
            .apply(
                Input::Failed(failure(Retry::NewIdentity, ErrorCode::KeyLost)),
                NOW,
            )
            .unwrap();
        assert!(m.parked && !m.connected);
        assert_eq!(m.work(), Work::Idle);
        let e = m.state.last_error.clone().unwrap();
        assert!(
            e.permanent && e.message.contains("iotctl reprovision"),
            "{e:?}"
        );
        assert!(matches!(
            t.actions.last(),
            Some(Action::Emit(Event::Failed { .. }))
        ));
    }

    #[test]
    fn a_permanent_failure_parks_provisioning_until_a_new_claim() {
        let mut m = fresh(Policy::default());
        m.apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        let t = m
            .apply(
                Input::Failed(failure(Retry::Permanent, ErrorCode::ClaimRejected)),
                NOW,
            )
            .unwrap();
        assert!(t.actions.contains(&Action::Emit(Event::Failed {
            code: ErrorCode::ClaimRejected,
            message: "claim-rejected happened".into()
        })));
        assert!(m.parked);
        assert_eq!(m.work(), Work::Idle);
        assert!(m.state.last_error.clone().unwrap().permanent);
        // An installer's claim rescues it.
        m.apply(Input::ClaimAvailable(ClaimOrigin::Network), NOW)
            .unwrap();
        assert!(!m.parked);
        assert_eq!(m.work(), Work::CreateKey { generation: 1 });
    }

    #[test]
    fn a_failed_operation_leaves_the_live_identity_live() {
        let mut m = provisioned();
        m.state.operation = Some(Operation::Rotation {
            staged_generation: 2,
            trigger: Trigger::OnDemand,
            step: Some(Step::CertificateIssued {
                endpoint: None,
                generation: 2,
                certificate_id: "cert-2".into(),
                certificate_pem: "PEM 2".into(),
                ownership_token: "t".into(),
                issued_at: NOW,
            }),
        });
        let t = m
            .apply(
                Input::Failed(failure(Retry::Permanent, ErrorCode::TemplateRejected)),
                NOW,
            )
            .unwrap();
        assert!(t.actions.contains(&Action::RemoveKey(2)));
        assert!(!t.actions.contains(&Action::StopConnection));
        assert!(!m.parked && m.connected);
        assert_eq!(m.state.identity.clone().unwrap().certificate_id, "cert-1");
        assert_eq!(m.state.operation, None);
        assert_eq!(m.state.abandoned_certificates, ["cert-2"]);
        assert_eq!(m.work(), Work::Serve);
    }

    #[test]
    fn the_connection_going_down_and_up_is_said_once_each() {
        let mut m = provisioned();
        let f = failure(Retry::Reconnect, ErrorCode::Network);
        let t = m.apply(Input::Disconnected(f.clone()), NOW).unwrap();
        assert_eq!(
            t.actions,
            [
                Action::Persist(Durability::Atomic),
                Action::Emit(Event::Disconnected {
                    code: Some(ErrorCode::Network),
                    message: f.message.clone()
                })
            ]
        );
        assert!(!m.connected);
        assert_eq!(
            m.work(),
            Work::Serve,
            "the identity is still the one to serve"
        );
        // A second failed attempt is recorded but not announced again.
        let t = m.apply(Input::Disconnected(f), NOW + 2).unwrap();
        assert_eq!(t.actions, [Action::Persist(Durability::Atomic)]);
        assert_eq!(m.state.last_error.clone().unwrap().at, NOW + 2);
        let t = m.apply(Input::Connected, NOW).unwrap();
        assert_eq!(
            t.actions,
            [
                Action::Persist(Durability::Atomic),
                Action::Emit(Event::Connected {
                    certificate_id: "cert-1".into()
                })
            ]
        );
        assert_eq!(m.state.last_error, None);
        assert!(!m.apply(Input::Connected, NOW).unwrap().changed());
    }

    #[test]
    fn a_claim_while_provisioned_changes_nothing() {
        let mut m = provisioned();
        let before = m.state.clone();
        m.apply(Input::ClaimAvailable(ClaimOrigin::Network), NOW)
            .unwrap();
        let t = m
            .apply(
                Input::ClaimGone {
                    code: ErrorCode::ClaimExpired,
                    message: "gone".into(),
                },
                NOW,
            )
            .unwrap();
        assert_eq!(t.actions, [Action::DropClaimSession]);
        assert_eq!(m.state, before);
    }

    #[test]
    fn reprovision_abandons_the_identity_and_starts_over() {
        let mut m = provisioned();
        m.claim = Some(ClaimOrigin::File);
        let t = m.apply(Input::Reprovision, NOW).unwrap();
        assert_eq!(
            t.actions,
            [
                Action::StopConnection,
                Action::DropClaimSession,
                // Durable before the old key goes.
                Action::Persist(Durability::Durable),
                Action::RemoveKey(1),
                Action::Emit(Event::Disconnected {
                    code: None,
                    message: "the identity was abandoned (reprovision)".into()
                })
            ]
        );
        assert_eq!(m.state.identity, None);
        assert_eq!(m.state.abandoned_certificates, ["cert-1"]);
        assert_eq!(m.work(), Work::CreateKey { generation: 2 });
        // Asking again at the start changes nothing.
        assert!(!m.apply(Input::Reprovision, NOW).unwrap().changed());
        // A parked machine is unparked.
        m.parked = true;
        m.state.last_error = Some(LastError {
            sticky: false,
            code: "x".into(),
            message: "m".into(),
            at: 0,
            permanent: true,
            retry_at: None,
        });
        assert!(m.apply(Input::Reprovision, NOW).unwrap().changed());
        assert!(!m.parked);
    }

    #[test]
    fn an_uncommitted_rotation_is_rolled_back_at_start() {
        let mut state = provisioned().state;
        state.operation = Some(Operation::Rotation {
            staged_generation: 2,
            trigger: Trigger::Schedule,
            step: Some(Step::KeyReady { generation: 2 }),
        });
        let (m, t) = Machine::resume(state, Policy::default());
        // Durable before the key goes: an eviction can't be undone by a lost rename.
        assert_eq!(
            t.actions,
            [Action::Persist(Durability::Durable), Action::RemoveKey(2)]
        );
        assert_eq!(m.state.operation, None);
        assert_eq!(m.state.identity.unwrap().certificate_id, "cert-1");
        let (_, t) = Machine::resume(State::default(), Policy::default());
        assert!(!t.changed());
    }

    #[test]
    fn a_live_identity_whose_connection_cannot_be_prepared_is_retried() {
        let mut m = provisioned();
        m.apply(
            Input::Disconnected(failure(Retry::Reconnect, ErrorCode::Network)),
            NOW,
        )
        .unwrap();
        let t = m
            .apply(
                Input::Failed(failure(Retry::Reconnect, ErrorCode::Key)),
                NOW,
            )
            .unwrap();
        assert_eq!(t.actions[0], Action::Persist(Durability::Atomic));
        assert!(!m.parked);
        assert_eq!(m.work(), Work::Serve);
        assert_eq!(m.state.last_error.clone().unwrap().retry_at, Some(NOW + 3));
        // Neither identity nor operation: nothing to retry.
        let mut m = fresh(Policy::default());
        assert!(
            m.apply(
                Input::Failed(failure(Retry::Reconnect, ErrorCode::Network)),
                NOW
            )
            .is_err()
        );
    }

    #[test]
    fn a_permanent_failure_of_the_identity_itself_parks_it() {
        let mut m = provisioned();
        let t = m
            .apply(
                Input::Failed(failure(Retry::Permanent, ErrorCode::Store)),
                NOW,
            )
            .unwrap();
        assert!(m.parked);
        assert_eq!(m.work(), Work::Idle);
        assert!(
            t.actions
                .iter()
                .any(|a| matches!(a, Action::Emit(Event::Failed { .. })))
        );
        assert!(m.state.identity.is_some(), "the identity is kept on disk");
    }

    #[test]
    fn a_claim_from_elsewhere_drops_the_claim_connection() {
        let mut m = fresh(Policy::default());
        m.apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        let t = m
            .apply(Input::ClaimAvailable(ClaimOrigin::File), NOW)
            .unwrap();
        assert!(t.actions.is_empty(), "the same claim: the connection stays");
        let t = m
            .apply(Input::ClaimAvailable(ClaimOrigin::Network), NOW)
            .unwrap();
        assert_eq!(t.actions, [Action::DropClaimSession]);
        // The claim that finishes provisioning is the one reported as used.
        for input in [Input::KeyCreated { generation: 1 }, issued(1), registered()] {
            m.apply(input, NOW).unwrap();
        }
        let t = m.apply(verified(), NOW).unwrap();
        assert!(t.actions.contains(&Action::ClaimUsed(ClaimOrigin::Network)));
    }

    #[test]
    fn a_lost_key_with_cloud_generated_keys_asks_for_another() {
        let mut m = cloud_generated_issued();
        let t = m
            .apply(
                Input::Failed(failure(Retry::NewIdentity, ErrorCode::KeyLost)),
                NOW,
            )
            .unwrap();
        assert_eq!(t.actions[0], Action::Persist(Durability::Durable));
        assert!(t.actions.contains(&Action::RemoveKey(1)));
        assert_eq!(m.work(), Work::CreateKeysAndCertificate { generation: 2 });
    }

    #[test]
    fn the_claim_going_away_after_registration_does_not_matter() {
        let mut m = fresh(Policy::default());
        for input in [
            Input::ClaimAvailable(ClaimOrigin::Network),
            Input::KeyCreated { generation: 1 },
            issued(1),
            registered(),
        ] {
            m.apply(input, NOW).unwrap();
        }
        m.apply(
            Input::ClaimGone {
                code: ErrorCode::ClaimExpired,
                message: "expired".into(),
            },
            NOW,
        )
        .unwrap();
        // Connecting as the thing needs no claim.
        assert!(matches!(m.work(), Work::VerifyIdentity { .. }));
    }

    #[test]
    fn a_rotation_with_a_certificate_is_rolled_back_and_recorded() {
        let mut state = provisioned().state;
        state.operation = Some(Operation::Rotation {
            staged_generation: 2,
            trigger: Trigger::Job { job_id: "j".into() },
            step: Some(Step::CertificateIssued {
                endpoint: None,
                generation: 2,
                certificate_id: "cert-2".into(),
                certificate_pem: "PEM 2".into(),
                ownership_token: "t".into(),
                issued_at: NOW,
            }),
        });
        let (m, _) = Machine::resume(state, Policy::default());
        assert_eq!(m.state.abandoned_certificates, ["cert-2"]);
        assert_eq!(m.work(), Work::Serve);
    }

    #[test]
    fn thing_registered_is_durable_when_a_restart_would_find_no_claim() {
        for (origin, delete_claim, durability) in [
            (ClaimOrigin::File, false, Durability::Atomic),
            (ClaimOrigin::File, true, Durability::Durable),
            (ClaimOrigin::Network, false, Durability::Durable),
        ] {
            let mut m = fresh(Policy {
                delete_claim,
                ..Policy::default()
            });
            for input in [
                Input::ClaimAvailable(origin),
                Input::KeyCreated { generation: 1 },
                issued(1),
            ] {
                m.apply(input, NOW).unwrap();
            }
            let t = m.apply(registered(), NOW).unwrap();
            assert_eq!(
                t.actions,
                [Action::Persist(durability)],
                "{origin:?} {delete_claim}"
            );
        }
    }

    #[test]
    fn a_report_is_recorded_once_and_only_for_an_abandoned_certificate() {
        let mut m = provisioned();
        m.state.abandoned_certificates = vec!["old-1".into(), "old-2".into()];
        let t = m
            .apply(
                Input::CertificateReported {
                    certificate_id: "old-1".into(),
                },
                NOW,
            )
            .unwrap();
        assert_eq!(t.actions, [Action::Persist(Durability::Atomic)]);
        assert_eq!(
            m.state.unreported_certificates().collect::<Vec<_>>(),
            ["old-2"]
        );
        for id in ["old-1", "never-abandoned"] {
            let t = m
                .apply(
                    Input::CertificateReported {
                        certificate_id: id.into(),
                    },
                    NOW,
                )
                .unwrap();
            assert!(t.actions.is_empty(), "{id}");
        }
        assert_eq!(m.state.reported_certificates, ["old-1"]);
    }
}
