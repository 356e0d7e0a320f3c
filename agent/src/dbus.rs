//! The agent on the system bus: `io.iotd.Agent1` at `/io/iotd/Agent1`, owned under the name
//! `io.iotd.Agent1` (names and the client proxy live in the `iotd-api` crate, which `iotctl`
//! shares).
//!
//! This module is a thin adapter over the core's `Handle`. Properties are read from the core's
//! `watch` snapshot, so a reader never waits for the task that owns the state; methods become
//! `Command`s on the core's channel and answer what the core answered, without disturbing work
//! in progress. One task follows the core: each snapshot change becomes one
//! `PropertiesChanged` (naming exactly the properties whose value changed; a `watch` keeps only
//! the latest snapshot, so it carries the net change), and each of the core's events becomes
//! its signal (`Provisioned`, `Failed`, `SessionUp`, `SessionDown`). Signals come from the
//! events the core emits when things happen, never from comparing snapshots, so a quick
//! in-and-out is still announced. `CredentialsRotated` is declared for rotation, which comes
//! later.
//!
//! Who may do what is decided by dbus-daemon, from the policy shipped as
//! `/usr/share/dbus-1/system.d/io.iotd.Agent1.conf` (packaging/dbus/): anyone may read
//! properties and receive signals, only root and group `iotd-admin` may call methods, only
//! user `iotd` may own the name. The daemon does not repeat the group check itself: dbus-daemon
//! 1.14 (Debian bookworm) reports no supplementary groups in GetConnectionCredentials, and
//! reading them from `/proc/<pid>` would race with PID reuse, whereas the bus takes them from
//! the socket (SO_PEERGROUPS) when the client connects.

use std::collections::HashMap;
use std::time::Duration;

use iotd_api::LastErrorWire;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use zbus::fdo::RequestNameFlags;
use zbus::message::Header;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, Variant};

use crate::core::{Command, Handle, Outcome};
use crate::error::{AgentError, ErrorCode};
use crate::fsm::Event;
use crate::snapshot::Snapshot;

/// Where `Builder::system()` connects when `DBUS_SYSTEM_BUS_ADDRESS` is unset (D-Bus spec).
const DEFAULT_SYSTEM_BUS: &str = "unix:path=/var/run/dbus/system_bus_socket";

/// The errors a caller sees, named `io.iotd.Error.<Variant>` (the names are part of the
/// contract: `iotd_api::errors`). The text is the agent's message, written for people.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.iotd.Error")]
pub enum Error {
    /// The operation needs an identity and the gateway has none yet.
    NotProvisioned(String),
    /// Try again later: another request is waiting for the agent, or the cloud is throttling
    /// this device.
    Busy(String),
    /// The operation does not exist in this build (onboarding).
    NotSupported(String),
    /// The caller's arguments are wrong. Not used for configuration errors: those are the
    /// administrator's to fix, not the caller's.
    InvalidArgument(String),
    /// The operation failed; the message says why and what to do.
    Failed(String),
    /// The caller may not do this. dbus-daemon's own `org.freedesktop.DBus.Error.AccessDenied`
    /// is what callers meet today (the bus policy refuses before iotd sees the call); the name
    /// is reserved for checks iotd makes itself.
    AccessDenied(String),
}

/// The one mapping from the agent's error codes to D-Bus error names. No `_` arm: a new
/// `ErrorCode` does not compile until someone decides what callers see for it.
///
/// | ErrorCode | D-Bus error |
/// |---|---|
/// | NotProvisioned | NotProvisioned (rotation needs an identity first) |
/// | NotSupported | NotSupported |
/// | Throttled | Busy (the cloud asked the device to slow down: try again later) |
/// | Busy | Busy (work in progress that a command must not disturb: try again later) |
/// | every other code | Failed (the message names the cause and the remedy) |
///
/// `Config` is Failed, not InvalidArgument: a bad configuration is the administrator's to fix,
/// and InvalidArgument would tell the caller its call was malformed.
pub fn to_dbus_error(e: AgentError) -> Error {
    let AgentError { code, message, .. } = e;
    match code {
        ErrorCode::NotProvisioned => Error::NotProvisioned(message),
        ErrorCode::NotSupported => Error::NotSupported(message),
        ErrorCode::Throttled | ErrorCode::Busy => Error::Busy(message),
        ErrorCode::Config
        | ErrorCode::Parameter
        | ErrorCode::ClaimMissing
        | ErrorCode::ClaimExpired
        | ErrorCode::ClaimRejected
        | ErrorCode::PolicyDenied
        | ErrorCode::TemplateRejected
        | ErrorCode::HookDenied
        | ErrorCode::NoReply
        | ErrorCode::Rejected
        | ErrorCode::ServerUntrusted
        | ErrorCode::Network
        | ErrorCode::ConnectRefused
        | ErrorCode::CertificateMismatch
        | ErrorCode::CertificateExpired
        | ErrorCode::CertificateRevoked
        | ErrorCode::CertificateInactive
        | ErrorCode::Key
        | ErrorCode::KeyLost
        | ErrorCode::Store => Error::Failed(message),
    }
}

/// The properties as they go on the wire, from one snapshot: `None` becomes "" or 0. Getters and
/// the change follower both use this, so a `PropertiesChanged` says what a `Get` would.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wire {
    state: String,
    step: String,
    waiting_for: String,
    thing_name: String,
    certificate_id: String,
    certificate_not_after: i64,
    certificate_not_before: i64,
    previous_certificate_id: String,
    previous_delete_after: i64,
    next_rotation: i64,
    key_backend: String,
    key_reference: String,
    certificate_path: String,
    connected: bool,
    endpoint: String,
    last_error: LastErrorWire,
    onboarding_open: bool,
    onboarding_closes_at: i64,
    onboarding_attempts_left: u32,
    onboarding_discovery: String,
}

impl Wire {
    fn from_snapshot(s: &Snapshot) -> Wire {
        Wire {
            state: s.state.to_owned(),
            step: s.step.to_owned(),
            waiting_for: s.waiting_for.clone().unwrap_or_default(),
            thing_name: s.thing_name.clone().unwrap_or_default(),
            certificate_id: s.certificate_id.clone().unwrap_or_default(),
            certificate_not_after: s.certificate_not_after.unwrap_or(0),
            certificate_not_before: s.certificate_not_before.unwrap_or(0),
            previous_certificate_id: s.previous_certificate_id.clone().unwrap_or_default(),
            previous_delete_after: s.previous_delete_after.unwrap_or(0),
            next_rotation: s.next_rotation.unwrap_or(0),
            key_backend: s.key_backend.to_owned(),
            key_reference: s.key_reference.clone().unwrap_or_default(),
            certificate_path: s
                .certificate_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            connected: s.connected,
            endpoint: s.endpoint.clone(),
            last_error: s.last_error.as_ref().map_or_else(
                || (String::new(), String::new(), 0),
                |e| (e.code.clone(), e.message.clone(), e.at),
            ),
            onboarding_open: s.onboarding_open,
            onboarding_closes_at: s.onboarding_closes_at.unwrap_or(0),
            onboarding_attempts_left: s.onboarding_attempts_left,
            onboarding_discovery: s.onboarding_discovery.clone(),
        }
    }

    /// The properties whose value differs in `new`, by D-Bus name, with their new values.
    /// `Version` never changes while the process runs, so it is not compared.
    fn changed(&self, new: &Wire) -> HashMap<&'static str, Variant<'static>> {
        let mut out = HashMap::new();
        macro_rules! compare {
            ($($field:ident => $name:literal),+ $(,)?) => {
                $(
                    if self.$field != new.$field {
                        out.insert($name, Variant::from(new.$field.clone()));
                    }
                )+
            };
        }
        compare!(
            state => "State",
            step => "Step",
            waiting_for => "WaitingFor",
            thing_name => "ThingName",
            certificate_id => "CertificateId",
            certificate_not_after => "CertificateNotAfter",
            certificate_not_before => "CertificateNotBefore",
            previous_certificate_id => "PreviousCertificateId",
            previous_delete_after => "PreviousDeleteAfter",
            next_rotation => "NextRotation",
            key_backend => "KeyBackend",
            key_reference => "KeyReference",
            certificate_path => "CertificatePath",
            connected => "Connected",
            endpoint => "Endpoint",
            onboarding_open => "OnboardingOpen",
            onboarding_closes_at => "OnboardingClosesAt",
            onboarding_attempts_left => "OnboardingAttemptsLeft",
            onboarding_discovery => "OnboardingDiscovery",
        );
        if self.last_error != new.last_error {
            let value = zbus::Structure::from(new.last_error.clone());
            out.insert("LastError", Variant::from(value));
        }
        out
    }
}

/// The object served at `/io/iotd/Agent1`.
struct Agent1 {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
}

impl Agent1 {
    fn wire(&self) -> Wire {
        Wire::from_snapshot(&self.snapshot.borrow())
    }

    /// Sends one command to the agent and waits for its answer. `try_send`, not `send`: a full
    /// channel means requests are already queued behind a running operation, and the caller is
    /// better told so than left waiting into its D-Bus timeout.
    async fn request(
        &self,
        what: &str,
        caller: Option<String>,
        command: impl FnOnce(oneshot::Sender<Result<Outcome, AgentError>>) -> Command,
    ) -> Result<String, Error> {
        let caller = caller.as_deref().unwrap_or("unknown sender");
        tracing::info!(caller, "{what} requested over D-Bus");
        let (tx, rx) = oneshot::channel();
        match self.commands.try_send(command(tx)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(Error::Busy(format!(
                    "{what}: another request is waiting for the agent; try again when it is done"
                )));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Error::Failed(format!(
                    "{what}: the agent is stopping; nothing was done"
                )));
            }
        }
        match rx.await {
            Ok(Ok(outcome)) => Ok(outcome.message().to_owned()),
            Ok(Err(e)) => {
                tracing::warn!(
                    caller,
                    code = e.code.as_str(),
                    retry = ?e.retry,
                    "{what} requested over D-Bus failed: {}",
                    e.message
                );
                Err(to_dbus_error(e))
            }
            Err(_) => Err(Error::Failed(format!(
                "{what}: the agent stopped before answering; see the journal (journalctl -u iotd)"
            ))),
        }
    }
}

fn sender(header: &Header<'_>) -> Option<String> {
    header.sender().map(ToString::to_string)
}

/// Sends a command whose answer is not an `Outcome`, with `request`'s handling of a full
/// queue, a stopping agent, and errors.
async fn ask<T>(
    commands: &mpsc::Sender<Command>,
    what: &str,
    caller: Option<String>,
    command: impl FnOnce(oneshot::Sender<Result<T, AgentError>>) -> Command,
) -> Result<T, Error> {
    let caller = caller.as_deref().unwrap_or("unknown sender");
    tracing::info!(caller, "{what} requested over D-Bus");
    let (tx, rx) = oneshot::channel();
    match commands.try_send(command(tx)) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return Err(Error::Busy(format!(
                "{what}: another request is waiting for the agent; try again when it is done"
            )));
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return Err(Error::Failed(format!(
                "{what}: the agent is stopping; nothing was done"
            )));
        }
    }
    match rx.await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => {
            tracing::warn!(
                caller,
                code = e.code.as_str(),
                "{what} failed: {}",
                e.message
            );
            Err(to_dbus_error(e))
        }
        Err(_) => Err(Error::Failed(format!(
            "{what}: the agent stopped before answering; see the journal (journalctl -u iotd)"
        ))),
    }
}

#[zbus::interface(name = "io.iotd.Agent1")]
impl Agent1 {
    /// Replaces the certificate now; answers what it did.
    #[zbus(out_args("message"))]
    async fn rotate(&self, #[zbus(header)] header: Header<'_>) -> Result<String, Error> {
        self.request("certificate rotation", sender(&header), Command::Rotate)
            .await
    }

    /// Abandons the identity and provisions a new one with a new key; answers what it did.
    #[zbus(out_args("message"))]
    async fn reprovision(&self, #[zbus(header)] header: Header<'_>) -> Result<String, Error> {
        self.request("reprovisioning", sender(&header), Command::Reprovision)
            .await
    }

    /// Opens the local onboarding endpoint for `seconds`; answers when it closes (Unix
    /// seconds).
    // 1 to 900 seconds; anything else is InvalidArgument. Without an onboarding server
    // (no record) NotSupported. (`//` comments stay out of the introspection.)
    #[zbus(out_args("closes_at"))]
    async fn open_onboarding(
        &self,
        #[zbus(header)] header: Header<'_>,
        seconds: u32,
    ) -> Result<i64, Error> {
        let max = crate::onboard::window::MAX_OPEN_SECS;
        if seconds == 0 || i64::from(seconds) > max {
            return Err(Error::InvalidArgument(format!(
                "an onboarding window lasts 1 to {max} seconds; {seconds} is not allowed"
            )));
        }
        ask(
            &self.commands,
            "opening onboarding",
            sender(&header),
            |reply| Command::OpenOnboarding { seconds, reply },
        )
        .await
    }

    /// Closes the onboarding endpoint; answers whether it was open.
    #[zbus(out_args("was_open"))]
    async fn close_onboarding(&self, #[zbus(header)] header: Header<'_>) -> Result<bool, Error> {
        ask(
            &self.commands,
            "closing onboarding",
            sender(&header),
            Command::CloseOnboarding,
        )
        .await
    }

    /// unprovisioned, provisioning, provisioned or failed.
    #[zbus(property)]
    fn state(&self) -> String {
        self.wire().state
    }

    /// The step of the operation in progress (key-ready, certificate-issued, …),
    /// "provisioned", or "waiting-for-claim".
    #[zbus(property)]
    fn step(&self) -> String {
        self.wire().step
    }

    /// What the agent waits for, in words ("a claim: …"); "" when it is not waiting.
    #[zbus(property)]
    fn waiting_for(&self) -> String {
        self.wire().waiting_for
    }

    /// The AWS IoT thing name; "" before registration.
    #[zbus(property)]
    fn thing_name(&self) -> String {
        self.wire().thing_name
    }

    /// The AWS IoT certificate id; "" before one is issued.
    #[zbus(property)]
    fn certificate_id(&self) -> String {
        self.wire().certificate_id
    }

    /// The certificate's notAfter (Unix seconds); 0 when unknown.
    #[zbus(property)]
    fn certificate_not_after(&self) -> i64 {
        self.wire().certificate_not_after
    }

    /// When the next scheduled rotation starts (Unix seconds); 0 when none is planned (no
    /// identity, or an operation runs).
    #[zbus(property)]
    fn next_rotation(&self) -> i64 {
        self.wire().next_rotation
    }

    /// When the current certificate became valid (Unix seconds); 0 without one.
    #[zbus(property)]
    fn certificate_not_before(&self) -> i64 {
        self.wire().certificate_not_before
    }

    /// The certificate the last rotation replaced, kept as a fallback until
    /// `PreviousDeleteAfter`; "" when there is none.
    #[zbus(property)]
    fn previous_certificate_id(&self) -> String {
        self.wire().previous_certificate_id
    }

    /// When the previous certificate's key and generation are deleted (Unix seconds); 0 when
    /// there is none.
    #[zbus(property)]
    fn previous_delete_after(&self) -> i64 {
        self.wire().previous_delete_after
    }

    /// Where the device key lives: "file" or "tpm".
    #[zbus(property)]
    fn key_backend(&self) -> String {
        self.wire().key_backend
    }

    /// The key's location within its backend; "" before there is a key.
    #[zbus(property)]
    fn key_reference(&self) -> String {
        self.wire().key_reference
    }

    /// The device certificate's file; "" before there is one.
    #[zbus(property)]
    fn certificate_path(&self) -> String {
        self.wire().certificate_path
    }

    /// Whether the MQTT session with the device's own identity is up.
    #[zbus(property)]
    fn connected(&self) -> bool {
        self.wire().connected
    }

    /// The AWS IoT endpoint, host:port.
    #[zbus(property)]
    fn endpoint(&self) -> String {
        self.wire().endpoint
    }

    /// (code, message, Unix time) of the last error; ("", "", 0) when there is none.
    #[zbus(property)]
    fn last_error(&self) -> LastErrorWire {
        self.wire().last_error
    }

    /// Whether the local onboarding endpoint is open.
    #[zbus(property)]
    fn onboarding_open(&self) -> bool {
        self.wire().onboarding_open
    }

    /// When the onboarding endpoint closes (Unix seconds); 0 when it is closed.
    #[zbus(property)]
    fn onboarding_closes_at(&self) -> i64 {
        self.wire().onboarding_closes_at
    }

    /// Pairing attempts left before the window closes (20 per window); 0 when it is closed.
    #[zbus(property)]
    fn onboarding_attempts_left(&self) -> u32 {
        self.wire().onboarding_attempts_left
    }

    /// Whether the gateway is announced on the local network (DNS-SD through Avahi), in
    /// words; "" when the gateway has no onboarding server.
    #[zbus(property)]
    fn onboarding_discovery(&self) -> String {
        self.wire().onboarding_discovery
    }

    /// The version of iotd serving this object.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// The gateway connected with a new identity for the first time.
    #[zbus(signal)]
    async fn provisioned(
        emitter: &SignalEmitter<'_>,
        thing_name: &str,
        certificate_id: &str,
    ) -> zbus::Result<()>;

    /// The certificate was replaced.
    #[zbus(signal)]
    async fn credentials_rotated(
        emitter: &SignalEmitter<'_>,
        certificate_id: &str,
        not_after: i64,
    ) -> zbus::Result<()>;

    /// A rotation started (`trigger`: schedule, on-demand or job); `id` is what `Rotate`
    /// returned for an on-demand one.
    #[zbus(signal)]
    async fn rotation_started(
        emitter: &SignalEmitter<'_>,
        id: &str,
        trigger: &str,
    ) -> zbus::Result<()>;

    /// A rotation failed before its commit and was rolled back; the gateway keeps its
    /// certificate and tries again after rotation.retry_interval.
    #[zbus(signal)]
    async fn rotation_failed(
        emitter: &SignalEmitter<'_>,
        id: &str,
        code: &str,
        message: &str,
    ) -> zbus::Result<()>;

    /// The certificate a rotation committed is refused (revoked, inactive): the gateway went
    /// back to the previous one, `certificate_id`.
    #[zbus(signal)]
    async fn fell_back(
        emitter: &SignalEmitter<'_>,
        certificate_id: &str,
        message: &str,
    ) -> zbus::Result<()>;

    /// An operation stopped on a permanent error.
    #[zbus(signal)]
    async fn failed(emitter: &SignalEmitter<'_>, code: &str, message: &str) -> zbus::Result<()>;

    /// The MQTT session with the device's identity is up.
    #[zbus(signal)]
    async fn session_up(emitter: &SignalEmitter<'_>, certificate_id: &str) -> zbus::Result<()>;

    /// The onboarding window opened: pairing is allowed until `closes_at` (Unix seconds),
    /// with `attempts_left` attempts.
    #[zbus(signal)]
    async fn onboarding_opened(
        emitter: &SignalEmitter<'_>,
        closes_at: i64,
        attempts_left: u32,
    ) -> zbus::Result<()>;

    /// The onboarding window closed: `timeout`, `requested`, `attempts` (20 used), `success`
    /// or `not-needed` (the gateway has an identity or a claim of its own).
    #[zbus(signal)]
    async fn onboarding_closed(emitter: &SignalEmitter<'_>, reason: &str) -> zbus::Result<()>;

    /// An installer's client proved it knows the setup code.
    #[zbus(signal)]
    async fn onboarding_paired(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    /// The installer's claim was accepted; the gateway provisions with it now.
    #[zbus(signal)]
    async fn onboarding_claim_received(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    /// The MQTT session went down: on an error (its code; iotd reconnects by itself), or
    /// because iotd stopped it ("" code: its identity was abandoned).
    #[zbus(signal)]
    async fn session_down(
        emitter: &SignalEmitter<'_>,
        code: &str,
        message: &str,
    ) -> zbus::Result<()>;
}

/// Follows the core until it stops: each snapshot change becomes one `PropertiesChanged`
/// (naming exactly the properties whose value changed), each event its signal. Emission
/// failures are logged and do not stop the follower: a reader that missed a signal can still
/// read the properties.
async fn follow(
    emitter: SignalEmitter<'static>,
    mut snapshot: watch::Receiver<Snapshot>,
    mut events: broadcast::Receiver<Event>,
) {
    let mut shown = Wire::from_snapshot(&snapshot.borrow_and_update());
    let interface = InterfaceName::from_static_str_unchecked(iotd_api::INTERFACE);
    loop {
        tokio::select! {
            changed = snapshot.changed() => {
                if changed.is_err() {
                    break;
                }
                let wire = Wire::from_snapshot(&snapshot.borrow_and_update());
                let changed = shown.changed(&wire);
                shown = wire;
                if changed.is_empty() {
                    continue;
                }
                let names: Vec<&str> = changed.keys().copied().collect();
                tracing::debug!(?names, "emitting PropertiesChanged");
                if let Err(e) = zbus::fdo::Properties::properties_changed(
                    &emitter,
                    interface.clone(),
                    changed,
                    std::borrow::Cow::Borrowed(&[]),
                )
                .await
                {
                    tracing::warn!("emitting PropertiesChanged on D-Bus: {e}");
                }
            }
            event = events.recv() => {
                let event = match event {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("the D-Bus adapter missed {n} events of the core");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if let Err(e) = emit(&emitter, &event).await {
                    tracing::warn!("emitting {event:?} on D-Bus: {e}");
                }
            }
        }
    }
    tracing::debug!("the core stopped; the D-Bus follower stops");
}

/// The signal of one event of the core.
async fn emit(emitter: &SignalEmitter<'_>, event: &Event) -> zbus::Result<()> {
    match event {
        Event::Provisioned {
            thing_name,
            certificate_id,
        } => Agent1::provisioned(emitter, thing_name, certificate_id).await,
        Event::Failed { code, message } => Agent1::failed(emitter, code.as_str(), message).await,
        Event::Connected { certificate_id } => Agent1::session_up(emitter, certificate_id).await,
        Event::Disconnected { code, message } => {
            let code = code.map_or("", |c| c.as_str());
            Agent1::session_down(emitter, code, message).await
        }
        Event::OnboardingOpened {
            closes_at,
            attempts_left,
        } => Agent1::onboarding_opened(emitter, *closes_at, *attempts_left).await,
        Event::OnboardingClosed { reason } => Agent1::onboarding_closed(emitter, reason).await,
        Event::OnboardingPaired => Agent1::onboarding_paired(emitter).await,
        Event::OnboardingClaimReceived => Agent1::onboarding_claim_received(emitter).await,
        Event::CredentialsRotated {
            certificate_id,
            not_after,
        } => Agent1::credentials_rotated(emitter, certificate_id, *not_after).await,
        Event::RotationStarted { id, trigger } => {
            Agent1::rotation_started(emitter, id, trigger).await
        }
        Event::RotationFailed { id, code, message } => {
            Agent1::rotation_failed(emitter, id, code.as_str(), message).await
        }
        Event::FellBack {
            certificate_id,
            message,
        } => Agent1::fell_back(emitter, certificate_id, message).await,
    }
}

/// Whether the bus refused a request (its policy), however zbus carries the error.
fn is_access_denied(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::FDO(f) => matches!(**f, zbus::fdo::Error::AccessDenied(_)),
        zbus::Error::MethodError(name, ..) => {
            name.as_str() == "org.freedesktop.DBus.Error.AccessDenied"
        }
        _ => false,
    }
}

/// Why `serve` failed. The messages carry their cause (as the agent's errors do), ready for
/// the journal; the variants let the caller tell "no bus" from "another agent is running".
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("connecting to the D-Bus {bus}: {cause}")]
    Connect { bus: String, cause: zbus::Error },
    #[error(
        "owning D-Bus name {name} on the {bus}: another process owns it (is iotd already \
         running?)",
        name = iotd_api::BUS_NAME
    )]
    NameTaken { bus: String },
    #[error(
        "owning D-Bus name {name} on the {bus}: the bus policy refuses it ({cause}); only the \
         user named in /usr/share/dbus-1/system.d/{name}.conf (iotd) may own it",
        name = iotd_api::BUS_NAME
    )]
    NameRefused { bus: String, cause: zbus::Error },
    #[error("owning D-Bus name {name} on the {bus}: {cause}", name = iotd_api::BUS_NAME)]
    Name { bus: String, cause: zbus::Error },
    #[error("serving D-Bus object {path}: {cause}", path = iotd_api::OBJECT_PATH)]
    Object { cause: zbus::Error },
}

/// The D-Bus server: the connection that owns the name, and the task that follows the core.
#[derive(Debug)]
pub struct Server {
    pub connection: Connection,
    pub task: tokio::task::JoinHandle<()>,
}

/// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, else the standard socket; `address`
/// overrides both), serves `io.iotd.Agent1` at `/io/iotd/Agent1`, owns the name
/// `io.iotd.Agent1`, and starts following `handle.snapshot` for PropertiesChanged and signals.
///
/// Returns once the name is owned, so the caller may then report readiness (READY=1). Fails
/// when the bus can't be reached, or the name is owned by someone else or refused by the bus
/// policy. Keep the returned connection for the life of the service and supervise its task:
/// the follower stops only when the core does.
pub async fn serve(handle: Handle, address: Option<&str>) -> Result<Server, ServeError> {
    // Subscribed before anything can happen, so that no event is missed.
    let events = handle.subscribe();
    let Handle {
        commands,
        mut snapshot,
        ..
    } = handle;
    // Mark the current snapshot as seen now, so that a change made while connecting is
    // announced once the follower starts.
    let follower_snapshot = {
        snapshot.borrow_and_update();
        snapshot.clone()
    };
    let clock_snapshot = snapshot.clone();
    let clock_commands = commands.clone();
    // For messages: which bus, and where (what `Builder::system()` will use).
    let bus = match address {
        Some(a) => format!("bus at {a}"),
        None => format!(
            "system bus at {}",
            std::env::var("DBUS_SYSTEM_BUS_ADDRESS").unwrap_or_else(|_| DEFAULT_SYSTEM_BUS.into())
        ),
    };
    let builder = match address {
        Some(a) => zbus::connection::Builder::address(a),
        None => zbus::connection::Builder::system(),
    };
    let connection = match builder
        .serve_at(iotd_api::OBJECT_PATH, Agent1 { commands, snapshot })
        .build()
        .await
    {
        Ok(c) => c,
        Err(cause) => return Err(ServeError::Connect { bus, cause }),
    };
    let emitter = SignalEmitter::new(&connection, iotd_api::OBJECT_PATH)
        .map_err(|cause| ServeError::Object { cause })?
        .into_owned();

    // Neither queue behind nor replace an owner, and don't let one replace us: two agents for
    // one identity would fight over it, so the second must fail at start.
    match connection
        .request_name_with_flags(iotd_api::BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
    {
        Ok(_) => {}
        Err(zbus::Error::NameTaken) => return Err(ServeError::NameTaken { bus }),
        Err(cause) if is_access_denied(&cause) => {
            return Err(ServeError::NameRefused { bus, cause });
        }
        Err(cause) => return Err(ServeError::Name { bus, cause }),
    }
    tracing::info!(name = iotd_api::BUS_NAME, "serving on the D-Bus {bus}");
    let clock = confirm_clock(connection.clone(), clock_snapshot, clock_commands);
    let task = tokio::spawn(async move {
        // Both end when the core does.
        tokio::join!(follow(emitter, follower_snapshot, events), clock);
    });
    Ok(Server { connection, task })
}

/// While a scheduled rotation waits for the clock (`Snapshot::waiting_for_clock`), asks
/// systemd-timedated once a minute whether the kernel's clock is synchronised
/// (`NTPSynchronized`: the kernel's own flag, set by whichever NTP daemon disciplines the clock,
/// chrony and ntpd as well as systemd-timesyncd), and tells the core when it is. The core looks
/// at timesyncd's flag file itself; this covers the gateways without timesyncd. timedated emits
/// no change signal for this property, so it is asked; it is started on demand by the bus and
/// exits when idle.
async fn confirm_clock(
    connection: Connection,
    mut snapshot: watch::Receiver<Snapshot>,
    commands: mpsc::Sender<Command>,
) {
    let mut said = false;
    loop {
        if snapshot.wait_for(|s| s.waiting_for_clock).await.is_err() {
            return;
        }
        match ntp_synchronized(&connection).await {
            Ok(true) => {
                tracing::info!("systemd-timedated says the system clock is synchronised");
                if commands.send(Command::ClockSynchronised).await.is_err() {
                    return;
                }
            }
            Ok(false) => {}
            // No timedated (a system without it, a test bus): the flag file or trust_clock
            // decide. Said once, not every minute.
            Err(e) if !std::mem::replace(&mut said, true) => {
                tracing::info!("asking systemd-timedated whether the clock is synchronised: {e}");
            }
            Err(_) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(crate::core::clock_recheck()) => {}
            ended = snapshot.wait_for(|s| !s.waiting_for_clock) => {
                if ended.is_err() {
                    return;
                }
            }
        }
    }
}

/// timedated's `NTPSynchronized` property.
async fn ntp_synchronized(connection: &Connection) -> Result<bool, String> {
    const TIMEDATED: &str = "org.freedesktop.timedate1";
    let call = crate::bus::call(
        connection,
        TIMEDATED,
        "/org/freedesktop/timedate1",
        "org.freedesktop.DBus.Properties",
        "Get",
        crate::bus::Args::new((TIMEDATED, "NTPSynchronized")),
    );
    let reply = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| "no answer in 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    // Properties.Get answers a variant holding the value.
    let value = match reply.value(0).map_err(|e| e.to_string())? {
        Variant::Variant(inner) => *inner,
        other => other,
    };
    match value {
        Variant::Bool(synchronised) => Ok(synchronised),
        other => Err(format!(
            "NTPSynchronized is a {}, not a boolean",
            zbus::DynamicType::signature(&other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LastError;
    use zbus::DBusError as _;

    fn provisioned(cert: &str, connected: bool) -> Snapshot {
        Snapshot {
            state: iotd_api::state::PROVISIONED,
            step: "provisioned",
            thing_name: Some("gw-1".into()),
            certificate_id: Some(cert.into()),
            connected,
            ..Snapshot::default()
        }
    }

    #[test]
    fn error_names_are_the_contract() {
        let m = String::new;
        let pairs = [
            (
                Error::NotProvisioned(m()),
                iotd_api::errors::NOT_PROVISIONED,
            ),
            (Error::Busy(m()), iotd_api::errors::BUSY),
            (Error::NotSupported(m()), iotd_api::errors::NOT_SUPPORTED),
            (
                Error::InvalidArgument(m()),
                iotd_api::errors::INVALID_ARGUMENT,
            ),
            (Error::Failed(m()), iotd_api::errors::FAILED),
            (Error::AccessDenied(m()), iotd_api::errors::ACCESS_DENIED),
        ];
        for (e, name) in pairs {
            assert_eq!(e.name().as_str(), name);
            assert!(name.starts_with(iotd_api::ERROR_PREFIX));
        }
    }

    #[test]
    fn agent_errors_keep_their_message() {
        let e = to_dbus_error(AgentError::permanent(ErrorCode::Key, "reading key k: gone"));
        assert_eq!(e.name().as_str(), iotd_api::errors::FAILED);
        assert_eq!(e.description(), Some("reading key k: gone"));
        let e = to_dbus_error(AgentError::permanent(ErrorCode::Throttled, "slow down"));
        assert_eq!(e.name().as_str(), iotd_api::errors::BUSY);
        let e = to_dbus_error(AgentError::permanent(
            ErrorCode::NotProvisioned,
            "no identity",
        ));
        assert_eq!(e.name().as_str(), iotd_api::errors::NOT_PROVISIONED);
    }

    #[test]
    fn none_is_empty_or_zero() {
        let w = Wire::from_snapshot(&Snapshot::default());
        assert_eq!(w.thing_name, "");
        assert_eq!(w.certificate_not_after, 0);
        assert_eq!(w.last_error, (String::new(), String::new(), 0));
        assert_eq!(w.certificate_path, "");
    }

    #[test]
    fn only_changed_properties_are_named() {
        let a = Wire::from_snapshot(&provisioned("c1", false));
        assert!(a.changed(&a.clone()).is_empty());
        let b = Wire::from_snapshot(&provisioned("c1", true));
        let changed = a.changed(&b);
        assert_eq!(changed.keys().copied().collect::<Vec<_>>(), ["Connected"]);
        assert_eq!(changed["Connected"], Variant::from(true));

        let mut s = provisioned("c1", true);
        s.last_error = Some(LastError {
            sticky: false,
            code: "network".into(),
            message: "no route".into(),
            at: 7,
            permanent: false,
            retry_at: None,
        });
        let changed = b.changed(&Wire::from_snapshot(&s));
        assert_eq!(changed.keys().copied().collect::<Vec<_>>(), ["LastError"]);
    }
}
