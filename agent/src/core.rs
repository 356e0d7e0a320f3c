//! The core: the one task that owns the agent's state. It loops over what can happen — a unit
//! of work finishing, a retry timer, a command, an event of the production connection, a
//! watchdog tick — feeds each to the state machine (`fsm`), carries out the actions the
//! machine returns (persist, emit an event, start or stop the connection, remove a key), and
//! publishes a new snapshot.
//!
//! Units of work (`work`) run in their own tasks, one at a time, so a command is answered while
//! a step runs, without cancelling it: a request that can't run now says why. The production
//! connection (`connection`) is a task of its own that no command disturbs. Watchdog pings come
//! from this loop, so a stuck core stops them; long operations don't.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::claim::{Claim, Claims};
use crate::cloud::{ConnectPacer, Session, Target};
use crate::config::{CertificateSource, Settings};
use crate::connection::{Connection, ConnectionEvent, Credentials};
use crate::error::{AgentError, Backoff, ErrorCode, Retry};
use crate::fsm::{Action, Event, Failure, IllegalTransition, Input, Machine, Policy, Work};
use crate::keys::KeyBackend;
use crate::onboard::{self, window::Window};
use crate::snapshot::{self, Snapshot};
use crate::store::{ClaimOrigin, Store};
use crate::tls::ServerTrust;
use crate::work::{self, Done, Produced, Resources, TOKEN_MAX_AGE_SECS, store_error};

/// Wall-clock time for certificate validity and token age. Timers use tokio's monotonic clock.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix seconds.
    fn now(&self) -> i64;
}

/// The system's clock. With the `test-hooks` feature (tests only, never release builds),
/// `IOTD_TEST_CLOCK_OFFSET_SECS` moves it, so that a test can age a token or a certificate
/// without editing state.json.
#[derive(Debug, Default)]
pub struct SystemClock {
    offset: i64,
}

impl SystemClock {
    pub fn new() -> Self {
        #[cfg(feature = "test-hooks")]
        {
            let offset = std::env::var("IOTD_TEST_CLOCK_OFFSET_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            Self { offset }
        }
        #[cfg(not(feature = "test-hooks"))]
        Self { offset: 0 }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        secs.saturating_add(self.offset)
    }
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

/// How a command is answered.
pub type Reply = oneshot::Sender<Result<Outcome, AgentError>>;

/// Requests to the core, each with its answer channel.
#[derive(Debug)]
pub enum Command {
    /// Abandon the identity and provision a new one with a new key.
    Reprovision(Reply),
    /// Replace the certificate now.
    Rotate(Reply),
    /// A claim handed over in memory (trusted-user onboarding).
    ProvideClaim(Box<Claim>, Reply),
    /// Opens the onboarding window for `seconds` (1 to 900; a new attempt count); answers
    /// when it closes (Unix seconds).
    OpenOnboarding {
        seconds: u32,
        reply: oneshot::Sender<Result<i64, AgentError>>,
    },
    /// Closes the onboarding window; answers whether it was open.
    CloseOnboarding(oneshot::Sender<Result<bool, AgentError>>),
    /// systemd-timedated says the kernel's clock is synchronised (NTPSynchronized), which
    /// chrony or ntpd set as well as systemd-timesyncd: a due rotation may start.
    ClockSynchronised,
}

/// What other tasks (D-Bus, the onboarding server) hold: a command sender, the snapshot, the
/// events, and the onboarding server's port.
#[derive(Debug, Clone)]
pub struct Handle {
    pub commands: mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub events: broadcast::Sender<Event>,
    pub onboarding: crate::onboard::port::Port,
}

impl Handle {
    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// Why the core stopped. It only stops on a bug (an illegal transition) or a test failpoint:
/// iotd then exits non-zero and systemd restarts it from its persisted state.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("the agent's state machine refused a transition: {0}")]
    Illegal(#[from] IllegalTransition),
    #[error("test failpoint {0} reached")]
    Failpoint(&'static str),
    #[error("scheduling did not settle on work or a wait (the agent is {0})")]
    Unsettled(String),
}

/// The production connection and what it connects as.
#[derive(Debug)]
struct Live {
    connection: Connection,
    credentials: Credentials,
}

/// The core (see the module documentation).
pub struct Core {
    res: Arc<Resources>,
    clock: Arc<dyn Clock>,
    machine: Machine,
    claims: Claims,
    /// The claim at hand, when there is one.
    claim: Option<Claim>,
    /// What the agent waits for while it has no claim.
    waiting_for_claim: Option<String>,
    snapshot: watch::Sender<Snapshot>,
    events: broadcast::Sender<Event>,
    commands: mpsc::Receiver<Command>,
    connection_tx: mpsc::UnboundedSender<ConnectionEvent>,
    connection_rx: mpsc::UnboundedReceiver<ConnectionEvent>,
    live: Option<Live>,
    /// The unit of work in flight, and what it is.
    work: Option<(Work, tokio::task::JoinHandle<Done>)>,
    /// The claim connection, between units of work.
    session: Option<Session>,
    retry_at: Option<tokio::time::Instant>,
    backoff: Backoff,
    /// Actions left from `resume`, carried out when `run` starts.
    pending: Vec<Action>,
    /// Where the operation's key is, once a unit of work has seen it (for status).
    key_reference: Option<String>,
    /// Key removals in the background; the next unit of work waits for them.
    cleanup: Option<tokio::task::JoinHandle<()>>,
    /// Something may have changed the claims since the agent last looked (see `schedule`).
    look_for_claims: bool,
    /// The identity whose `gen/<n>/identity.json` is known to be written.
    recorded_identity: Option<(u32, String)>,
    /// The template parameter values of the provisioning in progress, once resolved.
    parameters: Option<work::Parameters>,
    /// The onboarding window (its attempt count is persisted in state.json).
    window: Window,
    /// What the onboarding server shows; its requests.
    onboarding_view: watch::Sender<onboard::port::View>,
    onboarding_requests: mpsc::Receiver<onboard::port::Request>,
    /// Onboarding's own progress before provisioning takes over (paired, claim received).
    onboarding_phase: Option<onboard::port::Phase>,
    /// The provisioning in progress at start used an installer's claim, which lived in memory
    /// only: the installer must hand over a new one.
    installer_claim_lost: bool,
    /// Transient failures of the rotation in progress: after `ROTATION_TRIES` it is rolled
    /// back (and tried again after rotation.retry_interval).
    rotation_failures: u32,
    /// The staged certificate's connection failed this many times in a row (its verification).
    staged_downs: u32,
    /// CONNECTs of the committed certificate refused in a row (see `COMMITTED_REFUSALS`).
    committed_refusals: u32,
    /// A scheduled rotation is due but the clock is not trusted yet: when to look again.
    clock_recheck_at: Option<tokio::time::Instant>,
    /// Said once per wait: the clock is not trusted.
    clock_wait_logged: bool,
    /// systemd-timedated said the clock is synchronised (kept until iotd stops: the kernel's
    /// clock does not become untrustworthy again by itself).
    clock_synchronised: bool,
    /// Cloud-triggered rotation (AWS IoT Jobs), once the identity has connected.
    jobs: Option<crate::jobs::Watcher>,
    job_requests: mpsc::Receiver<crate::jobs::RotateForJob>,
    job_requests_tx: mpsc::Sender<crate::jobs::RotateForJob>,
    /// The onboarding server runs.
    onboarding_served: bool,
    /// Whether the gateway is announced on the local network (DNS-SD), as the discovery task
    /// last reported it.
    onboarding_discovery: String,
    /// Resolving them failed this many times in a row.
    parameter_failures: u32,
}

/// How many times in a row resolving the template parameters may fail before provisioning
/// stops (with backoff: about a minute in all).
const PARAMETER_ATTEMPTS: u32 = 6;

/// The onboarding server does not run.
fn onboarding_off() -> AgentError {
    AgentError::permanent(
        ErrorCode::NotSupported,
        "onboarding is off on this gateway: it has no onboarding record (iotctl onboarding \
         register makes one; then restart iotd), or its server could not listen (see the journal)",
    )
}

/// A parameter source that fails at boot (a device node not there yet) gets a few tries with
/// backoff; one that keeps failing is a person's to fix: its error becomes permanent.
fn count_parameter_failure(e: AgentError, failures: &mut u32) -> AgentError {
    if e.code != ErrorCode::Parameter || e.is_permanent() {
        return e;
    }
    *failures += 1;
    if *failures < PARAMETER_ATTEMPTS {
        return e;
    }
    *failures = 0;
    AgentError::permanent(
        e.code,
        format!(
            "{}; failed {PARAMETER_ATTEMPTS} times in a row, not trying again: fix it (iotctl \
             check runs it), then run iotctl reprovision",
            e.message
        ),
    )
}

#[cfg(test)]
mod parameter_tests {
    use super::*;

    #[test]
    fn a_parameter_failure_is_retried_a_bounded_number_of_times() {
        let transient = || AgentError::new(ErrorCode::Parameter, Retry::SameConnection, "p: x");
        let mut failures = 0;
        for _ in 1..PARAMETER_ATTEMPTS {
            assert!(!count_parameter_failure(transient(), &mut failures).is_permanent());
        }
        let last = count_parameter_failure(transient(), &mut failures);
        assert!(last.is_permanent(), "{last:?}");
        assert!(last.message.contains("iotctl reprovision"), "{last:?}");
        assert_eq!(failures, 0, "counted anew after that");
        // Other errors are not counted.
        let network = AgentError::new(ErrorCode::Network, Retry::Reconnect, "n");
        assert_eq!(
            count_parameter_failure(network.clone(), &mut failures),
            network
        );
        assert_eq!(failures, 0);
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("machine", &self.machine.describe())
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

fn target(settings: &Settings) -> Target {
    let c = &settings.cloud;
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

/// Waits for the unit of work in flight (forever when there is none).
async fn finished(work: &mut Option<(Work, tokio::task::JoinHandle<Done>)>) -> Done {
    match work {
        Some((work, handle)) => match handle.await {
            Ok(done) => done,
            Err(e) => Done {
                result: Err(AgentError::new(
                    ErrorCode::Store,
                    Retry::SameConnection,
                    format!("running {work:?}: the task stopped: {e}"),
                )),
                session: None,
                parameters: None,
            },
        },
        None => std::future::pending().await,
    }
}

/// Rewrites a `gen/<n>/cert.pem` that a crash left damaged from state.json's copy (the file is
/// for other programs on the gateway; iotd connects with the state's copy).
fn repair_certificates(store: &Store, state: &crate::store::State) {
    let identity = state
        .identity
        .as_ref()
        .map(|i| (i.generation, i.certificate_pem.as_str()));
    let step = state
        .operation
        .as_ref()
        .and_then(crate::store::Operation::step)
        .and_then(|s| Some((s.generation(), s.certificate_pem()?)));
    for (generation, pem) in identity.into_iter().chain(step) {
        match store.repair_certificate(generation, pem) {
            Ok(true) => tracing::warn!(
                "rewrote {} from state.json (it was missing or damaged)",
                store.certificate_path(generation).display()
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!("repairing the certificate of generation {generation}: {e}"),
        }
    }
}

/// Why the agent could not start, and whether a restart could help (for the exit status:
/// systemd does not restart iotd after an error only a person can fix).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StartError {
    pub code: ErrorCode,
    pub message: String,
    pub restart_helps: bool,
}

impl From<crate::store::StoreError> for StartError {
    fn from(e: crate::store::StoreError) -> Self {
        Self {
            code: ErrorCode::Store,
            restart_helps: e.fixed_by_restart(),
            message: e.to_string(),
        }
    }
}

/// Reads state.json; when it is damaged (moved aside, for a person to look at) or missing
/// while `gen/` holds generations, rebuilds it from `gen/` (see `recover`) and writes it.
fn load_or_rebuild(
    store: &Store,
    backend: &dyn KeyBackend,
) -> Result<crate::store::State, crate::store::StoreError> {
    use crate::store::StoreError;
    let why = match store.load() {
        Ok(state) if store.state_path().exists() => return Ok(state),
        Ok(state) => {
            if store.generations()?.is_empty() {
                return Ok(state);
            }
            format!(
                "{} is missing but gen/ is not empty",
                store.state_path().display()
            )
        }
        Err(StoreError::Corrupt { path, message }) => {
            let aside = store.set_aside_damaged()?;
            format!(
                "{} was damaged ({message}); kept it as {}",
                path.display(),
                aside.display()
            )
        }
        Err(e) => return Err(e),
    };
    let rebuilt = crate::recover::rebuild(store, backend, &why)?;
    if rebuilt.state.identity.is_some() || !rebuilt.state.abandoned_certificates.is_empty() {
        tracing::warn!("{}", rebuilt.report);
    } else {
        tracing::info!("{}", rebuilt.report);
    }
    store.save(&rebuilt.state, crate::store::Durability::Durable)?;
    Ok(rebuilt.state)
}

/// Writes the identity's `gen/<n>/identity.json` unless `recorded` says it is written; returns
/// what is recorded now. A failure is only logged: the record is a spare (see `recover`).
fn record_identity(
    store: &Store,
    state: &crate::store::State,
    recorded: Option<(u32, String)>,
) -> Option<(u32, String)> {
    let identity = state.identity.as_ref()?;
    let key = (identity.generation, identity.certificate_id.clone());
    if recorded.as_ref() == Some(&key) {
        return recorded;
    }
    match store.write_identity_record(identity) {
        Ok(_) => Some(key),
        Err(e) => {
            tracing::warn!("recording the identity in gen/{}: {e}", identity.generation);
            None
        }
    }
}

/// Where abandoned certificates are reported: `cloud.report_topic` with `{thing}` replaced by
/// the thing name; `None` when it is empty (reports off).
/// The rotation failpoint (test-hooks: `IOTD_TEST_FAILPOINT`) of `input` applied to `machine`:
/// iotd aborts just after that transition, as if the power went, so that a test can restart
/// it from every step of a rotation.
#[cfg(feature = "test-hooks")]
fn rotation_failpoint(input: &Input, machine: &crate::fsm::Machine) -> Option<&'static str> {
    let rotating = matches!(
        machine.state.operation,
        Some(crate::store::Operation::Rotation { .. })
    );
    Some(match input {
        Input::RotationDue(_) => "rotation-started",
        Input::KeyCreated { .. } if rotating => "rotation-key-ready",
        Input::CertificateIssued { .. } if rotating => "rotation-certificate-issued",
        Input::ThingRegistered { .. } if rotating => "rotation-thing-registered",
        Input::IdentityVerified { .. } if rotating => "rotation-committed",
        Input::Failed(_) if rotating => "rotation-failed",
        Input::RotationReported { .. } => "rotation-reported",
        Input::PreviousExpired => "rotation-previous-removed",
        _ => return None,
    })
}

/// The rotation failpoints, in the order a rotation reaches them.
#[cfg(feature = "test-hooks")]
pub const ROTATION_FAILPOINTS: [&str; 6] = [
    "rotation-started",
    "rotation-key-ready",
    "rotation-certificate-issued",
    "rotation-thing-registered",
    "rotation-committed",
    "rotation-reported",
];

/// A duration in whole seconds, as the state machine counts.
fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// After this many transient failures in a row a rotation is rolled back.
const ROTATION_TRIES: u32 = 4;
/// The staged certificate's connection may fail this often (the network's doing) before the
/// rotation is rolled back; a refusal (revoked, inactive, not authorised) rolls back at once.
const STAGED_DOWNS: u32 = 3;
/// A committed certificate whose CONNECT is refused as not authorised this many times in a row
/// (AWS closes a revoked certificate's session, then refuses it) makes iotd fall back to the
/// previous one, when a rotation kept it: once could be a policy being edited.
const COMMITTED_REFUSALS: u32 = 2;
/// While a scheduled rotation waits for the clock to be trusted, it is looked at this often:
/// systemd-timesyncd's flag file gives no notification iotd could wait on without inotify, and
/// systemd-timedated's NTPSynchronized emits no change signal.
const CLOCK_RECHECK: Duration = Duration::from_secs(60);
/// Written by systemd-timesyncd once the clock is synchronised.
const TIMESYNC_FLAG: &str = "/run/systemd/timesync/synchronized";
/// What status says while a due rotation waits for the clock.
const WAITING_FOR_CLOCK: &str = "the system clock to be synchronised (systemd-timesyncd's flag, or \
     NTPSynchronized from systemd-timedated) before the scheduled rotation; set \
     rotation.trust_clock = true on a gateway with a trusted RTC";

/// systemd-timesyncd's flag file; with `test-hooks`, `IOTD_TEST_TIMESYNC_FLAG` names another.
fn timesync_flag() -> std::path::PathBuf {
    #[cfg(feature = "test-hooks")]
    if let Ok(path) = std::env::var("IOTD_TEST_TIMESYNC_FLAG") {
        return path.into();
    }
    TIMESYNC_FLAG.into()
}

/// How often a due rotation looks at the clock again (the core at the flag file, the D-Bus side
/// at timedated); with `test-hooks`, `IOTD_TEST_CLOCK_RECHECK_MS` sets it.
pub(crate) fn clock_recheck() -> Duration {
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = std::env::var("IOTD_TEST_CLOCK_RECHECK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    CLOCK_RECHECK
}

/// The wall-clock time `at` (Unix seconds) on tokio's monotonic clock.
fn instant_at(at: i64, now: i64) -> tokio::time::Instant {
    let secs = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
    tokio::time::Instant::now() + Duration::from_secs(secs)
}

/// A configured report topic (`cloud.report_topic`, `rotation.report_topic`) for `thing`;
/// `None` when it is set to "" (no reports).
fn topic_for(topic: &str, thing: &str) -> Option<String> {
    (!topic.is_empty()).then(|| topic.replace("{thing}", thing))
}

/// The id under which a rotation report is queued (an abandoned certificate's is its id).
const ROTATION_REPORT_PREFIX: &str = "rotation:";

async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What woke the core.
enum Wake {
    Work(Box<Done>),
    Retry,
    /// The scheduled rotation is due (or the clock is to be looked at again).
    Rotation,
    /// The previous identity's grace period is over.
    PreviousExpired,
    Command(Command),
    Connection(ConnectionEvent),
    Onboarding(onboard::port::Request),
    Job(crate::jobs::RotateForJob),
    WindowTimeout,
    Watchdog,
}

impl Core {
    /// Opens the store and the server trust; fails with a clear message when they can't be used.
    pub fn new(
        settings: Settings,
        backend: Arc<dyn KeyBackend>,
    ) -> Result<(Self, Handle), StartError> {
        Self::with_clock(settings, backend, Arc::new(SystemClock::new()))
    }

    pub fn with_clock(
        settings: Settings,
        backend: Arc<dyn KeyBackend>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, Handle), StartError> {
        let store = Store::open(&settings.state_dir)?;
        store.secure()?;
        let mut state = load_or_rebuild(&store, backend.as_ref())?;
        // A key made but never recorded (key-ready is not persisted) keeps its generation: the
        // next key goes into a directory nothing ever used.
        let on_disk = store.highest_generation()?;
        state.last_generation = state.last_generation.max(on_disk);
        repair_certificates(&store, &state);
        let recorded_identity = record_identity(&store, &state, None);
        let trust = match &settings.cloud.ca_bundle {
            Some(path) => ServerTrust::from_pem_file(path).map_err(|e| StartError {
                code: ErrorCode::Config,
                message: format!(
                    "cloud.ca_bundle: {e}; point cloud.ca_bundle at a readable PEM file of the \
                     CA that signs the endpoint's certificate, or remove it to use the system \
                     trust store"
                ),
                restart_helps: false,
            }),
            None => ServerTrust::system().map_err(|e| StartError {
                code: ErrorCode::Config,
                message: format!(
                    "{e}; install the ca-certificates package or set cloud.ca_bundle to the CA \
                     that signs the endpoint's certificate"
                ),
                restart_helps: false,
            }),
        }?;
        let claim_client_id = settings
            .provisioning
            .claim_client_id
            .clone()
            .unwrap_or_else(default_claim_client_id);
        let policy = Policy {
            cloud_generated_keys: settings.provisioning.certificate_source
                == CertificateSource::CloudGenerated,
            reprovision_when_key_lost: settings.provisioning.reprovision_when_key_lost,
            delete_claim: settings.provisioning.delete_claim,
            grace_period: secs(settings.rotation.grace_period),
            retry_interval: secs(settings.rotation.retry_interval),
        };
        let state_onboarding = state.onboarding.clone();
        let installer_claim_lost = matches!(
            state.operation,
            Some(crate::store::Operation::Provisioning {
                claim: ClaimOrigin::Network,
                ..
            })
        );
        let (machine, resumed) = Machine::resume(state, policy);
        let claims = Claims::new(settings.provisioning.claim.clone());
        let (snapshot, snapshot_rx) = watch::channel(Snapshot::default());
        // Events are rare; a reader that falls this far behind is told it lagged.
        let (events, _) = broadcast::channel(64);
        // Commands are rare and answered at once; a small queue is plenty.
        let (commands_tx, commands) = mpsc::channel(8);
        let (job_requests_tx, job_requests) = mpsc::channel(1);
        let (connection_tx, connection_rx) = mpsc::unbounded_channel();
        let (port, core_end) = onboard::port::Port::pair();
        let window = Window::new(state_onboarding.clone());
        let res = Resources {
            target: target(&settings),
            settings,
            store,
            backend,
            trust,
            pacer: Arc::new(ConnectPacer::default()),
            claim_client_id,
        };
        let mut core = Self {
            res: Arc::new(res),
            clock,
            machine,
            claims,
            claim: None,
            waiting_for_claim: None,
            snapshot,
            events: events.clone(),
            commands,
            connection_tx,
            connection_rx,
            live: None,
            work: None,
            session: None,
            retry_at: None,
            backoff: Backoff::default(),
            pending: resumed.actions,
            key_reference: None,
            cleanup: None,
            look_for_claims: true,
            recorded_identity,
            parameters: None,
            parameter_failures: 0,
            window,
            onboarding_view: core_end.view,
            onboarding_requests: core_end.requests,
            onboarding_phase: None,
            installer_claim_lost,
            rotation_failures: 0,
            staged_downs: 0,
            committed_refusals: 0,
            clock_recheck_at: None,
            clock_wait_logged: false,
            clock_synchronised: false,
            jobs: None,
            job_requests,
            job_requests_tx,
            onboarding_served: false,
            onboarding_discovery: "off: the onboarding server does not announce itself".to_owned(),
        };
        if core.machine.work() == Work::WaitForClaim {
            let now = core.clock.now();
            let waiting = core.claims.current(now).err();
            core.waiting_for_claim = waiting.map(|w| core.waiting_for(w));
        }
        core.publish();
        Ok((
            core,
            Handle {
                commands: commands_tx,
                snapshot: snapshot_rx,
                events,
                onboarding: port,
            },
        ))
    }

    /// Says that the onboarding server runs (main starts it before the core runs): only then
    /// does the snapshot (D-Bus) show the window, which without a server nobody could use.
    pub fn onboarding_served(&mut self) {
        self.onboarding_served = true;
    }

    /// The status line of the current state (for READY=1).
    pub fn status(&self) -> String {
        self.snapshot.borrow().status_line.clone()
    }

    /// Runs until shutdown (the caller drops this future on SIGTERM: every write is atomic and
    /// synchronous, so dropping it between awaits leaves a consistent state). Returns only on a
    /// bug, for the caller to exit non-zero.
    pub async fn run(mut self) -> Result<(), CoreError> {
        #[cfg(feature = "test-hooks")]
        if std::env::var("IOTD_TEST_FAILPOINT").as_deref() == Ok("core-exit") {
            return Err(CoreError::Failpoint("core-exit"));
        }
        for action in std::mem::take(&mut self.pending) {
            self.act(action);
        }
        let mut watchdog = crate::notify::watchdog_interval();
        loop {
            self.schedule()?;
            self.update_window();
            self.publish();
            #[cfg(feature = "test-hooks")]
            if self
                .machine
                .state
                .operation
                .as_ref()
                .and_then(crate::store::Operation::step)
                .is_some()
            {
                crate::notify::test_stall_once();
            }
            // A requested window's end, on the monotonic clock (wall time may jump).
            let window_closes = self.window.closes_at().map(|at| {
                let secs = u64::try_from(at - self.clock.now()).unwrap_or(0);
                tokio::time::Instant::now() + Duration::from_secs(secs)
            });
            let now = self.clock.now();
            let rotation_at = self
                .clock_recheck_at
                .or_else(|| self.next_rotation().map(|at| instant_at(at, now)));
            let previous_expires = self
                .machine
                .state
                .previous
                .as_ref()
                .filter(|_| self.machine.state.operation.is_none())
                .map(|p| instant_at(p.delete_after, now));
            let wake = tokio::select! {
                done = finished(&mut self.work) => Wake::Work(Box::new(done)),
                () = until(self.retry_at) => Wake::Retry,
                () = until(rotation_at) => Wake::Rotation,
                () = until(previous_expires) => Wake::PreviousExpired,
                // Without a D-Bus API every sender may be gone: the branch is then disabled.
                Some(c) = self.commands.recv() => Wake::Command(c),
                Some(e) = self.connection_rx.recv() => Wake::Connection(e),
                Some(r) = self.onboarding_requests.recv() => Wake::Onboarding(r),
                Some(r) = self.job_requests.recv() => Wake::Job(r),
                () = until(window_closes) => Wake::WindowTimeout,
                () = crate::notify::tick(&mut watchdog) => Wake::Watchdog,
            };
            match wake {
                Wake::Work(done) => {
                    self.work = None;
                    self.finish(*done)?;
                }
                Wake::Retry => self.retry_at = None,
                Wake::Rotation => self.rotation_due()?,
                Wake::PreviousExpired => {
                    let due = self
                        .machine
                        .state
                        .previous
                        .as_ref()
                        .is_some_and(|p| p.delete_after <= self.clock.now());
                    if due {
                        tracing::info!(
                            "the previous identity's grace period (rotation.grace_period) is over; removing its key"
                        );
                        self.apply(Input::PreviousExpired)?;
                    }
                }
                Wake::Command(c) => self.command(c)?,
                Wake::Connection(e) => self.connection_event(e)?,
                Wake::Onboarding(r) => self.onboarding_request(r)?,
                Wake::Job(request) => {
                    let answer = self.rotate_for_job(request.job_id);
                    let _ = request.reply.send(answer);
                }
                Wake::WindowTimeout => {
                    if let Some(change) = self.window.tick(self.clock.now()) {
                        self.window_changed(change);
                    }
                }
                Wake::Watchdog => crate::notify::watchdog(),
            }
        }
    }

    /// Opens the onboarding window while the gateway needs a claim (it waits for one, or
    /// provisioning stopped for good without an identity: an installer can rescue it), and
    /// closes an automatic one when it no longer does.
    fn update_window(&mut self) {
        let unprovisioned = self.machine.state.identity.is_none();
        let needed = unprovisioned
            && (self.machine.work() == Work::WaitForClaim
                || (self.machine.parked && self.claim_is_not_the_installers()));
        if let Some(change) = self.window.need_claim(needed) {
            self.window_changed(change);
        } else {
            // A person's close is forgotten once no claim is needed: that is persisted too.
            self.persist_window();
        }
    }

    /// Whether the claim in use (if any) is not one an installer handed over: a rescue window
    /// is for a gateway whose own claim failed.
    fn claim_is_not_the_installers(&self) -> bool {
        !matches!(
            self.machine.state.operation,
            Some(crate::store::Operation::Provisioning {
                claim: ClaimOrigin::Network,
                ..
            })
        )
    }

    /// Logs a change of the window and persists its count.
    fn window_changed(&mut self, change: onboard::window::Change) {
        use onboard::window::Change;
        // Without the onboarding server the window is bookkeeping only (still persisted):
        // nothing to announce, and a log line saying it opened would mislead the journal's
        // reader.
        if self.onboarding_served {
            match change {
                Change::Opened(opener) => {
                    tracing::info!(
                        ?opener,
                        attempts_left = self.window.attempts_left(),
                        closes_at = self.window.closes_at(),
                        "onboarding window open"
                    );
                    let _ = self.events.send(Event::OnboardingOpened {
                        closes_at: self.window.closes_at().unwrap_or(0),
                        attempts_left: self.window.attempts_left(),
                    });
                }
                Change::Closed(why) => {
                    tracing::info!(why = why.as_str(), "onboarding window closed");
                    let _ = self.events.send(Event::OnboardingClosed {
                        reason: why.as_str(),
                    });
                }
            }
        }
        self.persist_window();
    }

    /// Writes the window's count to state.json when it changed; says whether it is on disk.
    fn persist_window(&mut self) -> bool {
        if self.machine.state.onboarding == self.window.persisted {
            return true;
        }
        self.machine.state.onboarding = self.window.persisted.clone();
        // Durable: the count is what limits guesses at the code, across restarts.
        match self
            .res
            .store
            .save(&self.machine.state, crate::store::Durability::Durable)
        {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("recording the onboarding attempt count: {e}");
                false
            }
        }
    }

    /// Offers a claim handed over in memory and, unless a step is running, uses it now rather
    /// than after a retry delay or a wait (an installer's claim lives 5 minutes).
    fn use_claim(&mut self, claim: Claim) -> Result<(), CoreError> {
        self.claims.offer(claim);
        self.look_for_claims = true;
        if self.work.is_none() {
            self.retry_at = None;
            self.backoff.reset();
            if let Ok(c) = self.claims.current(self.clock.now()) {
                let origin = c.origin;
                self.claim = Some(c);
                self.waiting_for_claim = None;
                self.apply(Input::ClaimAvailable(origin))?;
            }
        }
        Ok(())
    }

    /// What the gateway waits for, in words (status, D-Bus).
    fn waiting_for(&self, waiting: crate::claim::Waiting) -> String {
        if self.installer_claim_lost {
            "a claim: the installer's claim was lost in a restart; hand over a new one".to_owned()
        } else {
            waiting.what
        }
    }

    /// The installer's claim bundle (opened by the server): validated, then used at once.
    fn hand_over(
        &mut self,
        plaintext: &[u8],
    ) -> Result<Result<(), onboard::port::Refusal>, CoreError> {
        use onboard::bundle::{BundlePolicy, open_bundle};
        use onboard::port::{Phase, Refusal};
        if self.machine.state.identity.is_some() && self.machine.state.operation.is_none() {
            return Ok(Err(Refusal {
                code: "window_closed",
                status: 403,
                message: "the gateway is already provisioned; it does not need a claim".to_owned(),
            }));
        }
        let policy = BundlePolicy::from_settings(&self.res.settings);
        let handed = match open_bundle(plaintext, &policy) {
            Ok(handed) => handed,
            Err(r) => {
                tracing::warn!(
                    code = r.code(),
                    "onboarding: claim bundle refused: {}",
                    r.message()
                );
                return Ok(Err(Refusal {
                    code: r.code(),
                    status: r.http_status(),
                    message: r.message(),
                }));
            }
        };
        let mut claim = handed.claim;
        claim.template = Some(handed.template);
        claim.installer_parameters = handed.parameters;
        // Another allowed endpoint: the identity made with this claim belongs there (it
        // remembers it, see `store::Identity::endpoint`).
        claim.endpoint = handed.endpoint;
        tracing::info!(
            template = claim.template.as_deref().unwrap_or_default(),
            endpoint = claim
                .endpoint
                .as_deref()
                .unwrap_or(&self.res.settings.cloud.endpoint),
            not_after = handed.not_after,
            "onboarding: received the installer's claim; provisioning with it"
        );
        self.installer_claim_lost = false;
        self.use_claim(claim)?;
        let closed = self.window.close(onboard::window::Closed::Success);
        self.window_changed(closed);
        self.onboarding_phase = Some(Phase::ClaimReceived);
        let _ = self.events.send(Event::OnboardingClaimReceived);
        Ok(Ok(()))
    }

    /// A request of the onboarding server.
    fn onboarding_request(&mut self, request: onboard::port::Request) -> Result<(), CoreError> {
        use onboard::port::{Phase, Refusal, Request};
        match request {
            Request::CountAttempt { peer, reply } => {
                let answer = match self.window.count_attempt(self.clock.now()) {
                    Ok((left, closed)) => {
                        tracing::info!(%peer, attempts_left = left, "onboarding: pairing attempt");
                        if let Some(change) = closed {
                            self.window_changed(change);
                        }
                        if self.persist_window() {
                            self.publish();
                            Ok(left)
                        } else {
                            Err(Refusal {
                                code: "window_closed",
                                status: 403,
                                message: "the gateway could not record the attempt (its \
                                          storage failed); try again later"
                                    .to_owned(),
                            })
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%peer, "onboarding: pairing refused: {e}");
                        Err(Refusal {
                            code: "window_closed",
                            status: 403,
                            message: e.to_string(),
                        })
                    }
                };
                let _ = reply.send(answer);
            }
            Request::Paired { peer } => {
                tracing::info!(%peer, "onboarding: paired with the installer's client");
                self.onboarding_phase = Some(Phase::Paired);
                let _ = self.events.send(Event::OnboardingPaired);
            }
            Request::Unpaired => {
                if self.onboarding_phase == Some(Phase::Paired) {
                    tracing::info!("onboarding: the paired session ended without a claim");
                    self.onboarding_phase = None;
                }
            }
            Request::HandOver { plaintext, reply } => {
                let answer = self.hand_over(&plaintext)?;
                if answer.is_err() && self.onboarding_phase == Some(Phase::Paired) {
                    // The session ends with the refusal: the installer pairs again.
                    self.onboarding_phase = None;
                }
                // What the installer's client reads next (`/v1/events`, `/v1/status`) must
                // already be this claim's progress, not the previous claim's outcome.
                self.publish();
                let _ = reply.send(answer);
            }
            Request::Discovery { detail } => {
                tracing::info!("onboarding discovery: {detail}");
                self.onboarding_discovery = detail;
            }
        }
        Ok(())
    }

    /// The endpoint the gateway talks to: its certificate's, or before it has one its claim's.
    fn endpoint(&self) -> &str {
        let state = &self.machine.state;
        let certified = state.identity.is_some() || state.endpoint().is_some();
        let endpoint = if certified {
            state.endpoint()
        } else {
            self.claim.as_ref().and_then(|c| c.endpoint.as_deref())
        };
        endpoint.unwrap_or(&self.res.settings.cloud.endpoint)
    }

    fn publish(&mut self) {
        let cx = snapshot::Context {
            key_backend: self.res.backend.kind(),
            key_reference: self
                .live
                .as_ref()
                .map(|l| l.credentials.key_location.clone())
                .or_else(|| self.key_reference.clone())
                .or_else(|| {
                    self.machine
                        .state
                        .identity
                        .as_ref()
                        .and_then(|i| i.key.clone())
                }),
            endpoint: format!("{}:{}", self.endpoint(), self.res.settings.cloud.port),
            state_dir: self.res.store.dir().to_owned(),
            waiting_for_claim: self.waiting_for_claim.clone(),
        };
        let mut snap = snapshot::snapshot(&self.machine, &cx);
        snap.next_rotation = self.next_rotation();
        if self.clock_wait_logged && self.machine.state.operation.is_none() {
            snap.waiting_for_clock = true;
            snap.waiting_for = Some(WAITING_FOR_CLOCK.to_owned());
            snap.status_line = format!(
                "{}; a rotation is due: waiting for the system clock to be synchronised",
                snap.status_line
            );
        }
        if self.onboarding_served {
            snap.onboarding_open = self.window.is_open();
            snap.onboarding_closes_at = self.window.closes_at();
            snap.onboarding_attempts_left = if self.window.is_open() {
                self.window.attempts_left()
            } else {
                0
            };
            snap.onboarding_discovery = self.onboarding_discovery.clone();
        }
        let line = snap.status_line.clone();
        let mut line_changed = false;
        self.snapshot.send_if_modified(|s| {
            if *s == snap {
                return false;
            }
            line_changed = s.status_line != snap.status_line;
            *s = snap;
            true
        });
        // systemd hears a line when the line changes, not when another field does.
        if line_changed {
            crate::notify::status(&line);
        }
        let view = self.onboarding_view();
        self.onboarding_view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }

    /// What the onboarding server shows the installer: the window, and how far the gateway
    /// got with the installer's claim, in the profile's phases. No secrets.
    fn onboarding_view(&self) -> onboard::port::View {
        use crate::store::{Operation, Step};
        use onboard::port::{Phase, View};
        let state = &self.machine.state;
        let mut thing_name = None;
        let mut error = None;
        let phase = match (&state.identity, &state.operation) {
            (Some(identity), None) => {
                thing_name = Some(identity.thing_name.clone());
                if self.onboarding_phase.is_some() {
                    Phase::Connected
                } else {
                    Phase::Waiting
                }
            }
            (
                _,
                Some(Operation::Provisioning {
                    claim: ClaimOrigin::Network,
                    step,
                }),
            ) if !self.installer_claim_lost => {
                // Stopped for good, or waiting for another claim (the installer's expired or
                // was refused): the installer must act.
                let stuck = self.machine.work() == Work::WaitForClaim;
                if let Some(e) = state.last_error.as_ref().filter(|e| e.permanent || stuck) {
                    error = Some((e.code.clone(), e.message.clone()));
                    Phase::Failed
                } else {
                    match step {
                        None | Some(Step::KeyReady { .. }) => Phase::ConnectingWithClaim,
                        Some(Step::CertificateIssued { .. }) => Phase::CertificateIssued,
                        Some(Step::ThingRegistered { thing_name: t, .. }) => {
                            thing_name = Some(t.clone());
                            Phase::ThingRegistered
                        }
                    }
                }
            }
            _ => self.onboarding_phase.unwrap_or(Phase::Waiting),
        };
        View {
            open: self.window.is_open(),
            closes_at: self.window.closes_at(),
            attempts_left: self.window.attempts_left(),
            phase,
            thing_name,
            error,
        }
    }

    /// Applies `input` to the state machine and carries out its actions.
    fn apply(&mut self, input: Input) -> Result<(), CoreError> {
        let before = self.machine.describe();
        #[cfg(feature = "test-hooks")]
        let point = rotation_failpoint(&input, &self.machine);
        let t = self.machine.apply(input, self.clock.now())?;
        let after = self.machine.describe();
        if before != after {
            tracing::info!("{before} -> {after}");
        }
        for action in t.actions {
            self.act(action);
        }
        #[cfg(feature = "test-hooks")]
        if let Some(point) = point
            && std::env::var("IOTD_TEST_FAILPOINT").as_deref() == Ok(point)
        {
            // As a power cut would, right after the transition and its actions.
            tracing::warn!(point, "test hook: failpoint reached; aborting");
            std::process::abort();
        }
        Ok(())
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Persist(durability) => {
                let saved = self.res.store.save(&self.machine.state, durability);
                if saved.is_ok() {
                    self.recorded_identity = record_identity(
                        &self.res.store,
                        &self.machine.state,
                        self.recorded_identity.take(),
                    );
                }
                if let Err(e) = saved {
                    // The state on disk is behind the one in memory: stop working until a
                    // restart reloads what is on disk.
                    let e = store_error(e);
                    tracing::error!("{e}; stopping until iotd is restarted");
                    self.machine.halted = true;
                    self.machine.state.last_error = Some(crate::store::LastError {
                        sticky: false,
                        code: e.code.as_str().to_owned(),
                        message: e.message.clone(),
                        at: self.clock.now(),
                        permanent: true,
                        retry_at: None,
                    });
                    let _ = self.events.send(Event::Failed {
                        code: e.code,
                        message: e.message,
                    });
                }
            }
            Action::Emit(event) => {
                match &event {
                    Event::Provisioned {
                        thing_name,
                        certificate_id,
                    } => tracing::info!(
                        thing = %thing_name,
                        certificate_id = %certificate_id,
                        hardware_commands = self.res.backend.commands_issued(),
                        "provisioned: connected with the issued certificate"
                    ),
                    Event::Failed { code, message } => {
                        tracing::error!(code = code.as_str(), "{message}");
                    }
                    Event::CredentialsRotated {
                        certificate_id,
                        not_after,
                    } => tracing::info!(
                        certificate_id = %certificate_id,
                        not_after = %crate::cloud::rfc3339(*not_after),
                        "rotation committed: connected with the new certificate"
                    ),
                    Event::RotationStarted { id, trigger } => {
                        tracing::info!(%id, trigger, "rotation started");
                    }
                    Event::RotationFailed { code, message, .. } => {
                        tracing::warn!(code = code.as_str(), "{message}");
                    }
                    // Loud: the gateway runs on a certificate the fleet meant to replace.
                    Event::FellBack { message, .. } => tracing::error!("{message}"),
                    Event::Connected { .. }
                    | Event::Disconnected { .. }
                    | Event::OnboardingOpened { .. }
                    | Event::OnboardingClosed { .. }
                    | Event::OnboardingPaired
                    | Event::OnboardingClaimReceived => {}
                }
                let _ = self.events.send(event);
            }
            Action::DropClaimSession => {
                if let Some(session) = self.session.take() {
                    tokio::spawn(session.disconnect());
                }
            }
            Action::StopConnection => {
                if let Some(live) = self.live.take() {
                    live.connection.stop();
                }
                self.key_reference = None;
                // The identity changes (a reprovision, a fall-back): a new watcher starts with
                // the next connection, reading its jobs afresh.
                self.jobs = None;
            }
            Action::ClaimUsed(origin) => {
                let claim = self.claim.take();
                // A claim from the network is used once; the files are used again (a later
                // `iotctl reprovision`) unless the configuration says to delete them.
                let spent = match origin {
                    ClaimOrigin::Network => true,
                    ClaimOrigin::File => self.delete_claim_files(),
                };
                if spent && let Some(claim) = claim {
                    self.claims
                        .forget(&claim, "the claim was used to provision this gateway");
                }
            }
            Action::RemoveKey(generation) => self.cleanup(move |backend, store| {
                // The record first: an abandoned generation must never be rebuilt as the
                // identity (see `recover`), even if removing its key fails.
                if let Err(e) = store.remove_identity_record(generation) {
                    tracing::warn!("{e}");
                }
                // The certificate is of no use without its key (and its id is recorded where
                // it matters): the key's removal then takes the whole generation directory.
                let certificate = store.certificate_path(generation);
                match std::fs::remove_file(&certificate) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(
                        "removing certificate {} of generation {generation}: {e}",
                        certificate.display()
                    ),
                    _ => {}
                }
                if let Err(e) = backend.remove(generation) {
                    tracing::warn!("removing the key of generation {generation}: {e}");
                }
            }),
        }
    }

    /// Key removals run in the background, one after the other, and every unit of work waits
    /// for them first: a new key never races the removal of an old one (a TPM's two slots).
    fn cleanup(&mut self, job: impl FnOnce(&dyn KeyBackend, &Store) + Send + 'static) {
        let before = self.cleanup.take();
        let res = self.res.clone();
        self.cleanup = Some(tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            let _ =
                tokio::task::spawn_blocking(move || job(res.backend.as_ref(), &res.store)).await;
        }));
    }

    /// Deletes the claim files when the config asks for it (only after success); says whether
    /// it did.
    fn delete_claim_files(&self) -> bool {
        let p = &self.res.settings.provisioning;
        let (true, Some(claim)) = (p.delete_claim, &p.claim) else {
            return false;
        };
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
        true
    }

    /// Looks at what the machine wants done and starts it, unless something is in flight or a
    /// retry is pending.
    fn schedule(&mut self) -> Result<(), CoreError> {
        // Each pass either starts something, waits, or applies an input that changes the
        // state; a few passes at most.
        for _ in 0..8 {
            if self.work.is_some() || self.retry_at.is_some() {
                return Ok(());
            }
            let now = self.clock.now();
            let work = self.machine.work();
            if self.machine.state.operation.is_none() {
                // The next provisioning reads its parameters again.
                self.parameters = None;
            }
            match &work {
                Work::Idle => return Ok(()),
                // Waiting is not polling: the claims are looked at again when something may
                // have changed them (a start, a command, a claim that went away).
                Work::WaitForClaim if !std::mem::take(&mut self.look_for_claims) => {
                    return Ok(());
                }
                Work::WaitForClaim => match self.claims.current(now) {
                    Ok(claim) => {
                        let origin = claim.origin;
                        self.claim = Some(claim);
                        self.waiting_for_claim = None;
                        self.apply(Input::ClaimAvailable(origin))?;
                    }
                    Err(waiting) => {
                        let why = self.waiting_for(waiting);
                        if self.waiting_for_claim.as_ref() != Some(&why) {
                            tracing::info!("waiting for {why}");
                        }
                        self.waiting_for_claim = Some(why);
                        self.claim = None;
                        return Ok(());
                    }
                },
                Work::Serve => {
                    let Some(i) = &self.machine.state.identity else {
                        return Ok(());
                    };
                    let verify = Work::VerifyIdentity {
                        generation: i.generation,
                        certificate_id: i.certificate_id.clone(),
                        certificate_pem: i.certificate_pem.clone(),
                        thing_name: i.thing_name.clone(),
                        endpoint: i.endpoint.clone(),
                    };
                    self.connect(verify);
                    return Ok(());
                }
                Work::VerifyIdentity { .. } => {
                    self.connect(work);
                    return Ok(());
                }
                Work::RegisterThing { issued_at, .. } if now - issued_at > TOKEN_MAX_AGE_SECS => {
                    let e = AgentError::new(
                        ErrorCode::Rejected,
                        Retry::RestartFromCsr,
                        "the ownership token is too old for RegisterThing; requesting a new certificate",
                    );
                    tracing::info!("{e}");
                    self.apply(Input::Failed(Failure::new(&e, None)))?;
                }
                Work::CreateKey { .. }
                | Work::CreateKeysAndCertificate { .. }
                | Work::RequestCertificate { .. }
                | Work::RegisterThing { .. } => {
                    // The claim must still be usable (a claim from an installer lasts minutes);
                    // the one at hand is checked by its date, without reading its files again.
                    // An installer's claim is not judged by the gateway's clock (see `Claims`).
                    let usable = self
                        .claim
                        .as_ref()
                        .is_some_and(|c| c.origin == ClaimOrigin::Network || c.not_after > now);
                    // A rotation talks to the cloud as the device: no claim.
                    let needs_claim = !matches!(work, Work::CreateKey { .. }) && !self.rotating();
                    if needs_claim && !usable {
                        match self.claims.current(now) {
                            Ok(claim) => self.claim = Some(claim),
                            Err(waiting) => {
                                self.claim = None;
                                self.look_for_claims = true;
                                self.apply(Input::ClaimGone {
                                    code: waiting.code,
                                    message: format!("waiting for {}", waiting.what),
                                })?;
                                continue;
                            }
                        }
                    } else {
                        self.remove_uncertified_keys();
                    }
                    self.start(work);
                    return Ok(());
                }
            }
        }
        // Each pass above changes the state towards work or a wait; never this many.
        Err(CoreError::Unsettled(self.machine.describe()))
    }

    /// Before a new key is made: removes the keys of generations that no state refers to and
    /// that never got a certificate (a crash before the first certificate leaves one behind):
    /// worthless, and in the way of a TPM's two persistent slots. Generations with a
    /// certificate are left alone: they may be an identity whose state.json was lost.
    fn remove_uncertified_keys(&mut self) {
        let live = self.machine.state.live_generations();
        self.cleanup(move |backend, store| {
            let generations = match store.generations() {
                Ok(g) => g,
                Err(e) => return tracing::warn!("looking for unused keys: {e}"),
            };
            for generation in generations {
                if live.contains(&generation) || store.certificate_path(generation).exists() {
                    continue;
                }
                match backend.remove(generation) {
                    Ok(()) => {
                        tracing::info!(generation, "removed a key that never got a certificate")
                    }
                    Err(e) => {
                        tracing::warn!("removing the unused key of generation {generation}: {e}")
                    }
                }
            }
        });
    }

    fn start(&mut self, work: Work) {
        let carried = work::Carried {
            claim: self.claim.clone(),
            session: self.session.take(),
            parameters: self.parameters.clone(),
            cleanup: self.cleanup.take(),
            production: self.rotating().then(|| {
                self.live
                    .as_ref()
                    .map(|l| l.connection.exchanger())
                    .unwrap_or_else(crate::connection::Exchanger::closed)
            }),
        };
        let task = tokio::spawn(work::run(self.res.clone(), work.clone(), carried));
        self.work = Some((work, task));
    }

    /// Makes sure the production connection uses the certificate of `verify` (a
    /// `Work::VerifyIdentity`): prepares its credentials (a unit of work: it loads the key)
    /// and starts it, replacing a connection that uses another certificate.
    fn connect(&mut self, verify: Work) {
        let Work::VerifyIdentity { certificate_id, .. } = &verify else {
            return;
        };
        if let Some(live) = &self.live {
            if live.connection.certificate_id() == certificate_id {
                return;
            }
            if let Some(live) = self.live.take() {
                live.connection.stop();
            }
        }
        self.start(verify);
    }

    fn rotating(&self) -> bool {
        matches!(
            self.machine.state.operation,
            Some(crate::store::Operation::Rotation { .. })
        )
    }

    fn finish(&mut self, done: Done) -> Result<(), CoreError> {
        if let Some(session) = done.session {
            self.session = Some(session);
        }
        if done.parameters.is_some() {
            self.parameters = done.parameters;
            self.parameter_failures = 0;
        }
        match done.result {
            Ok(Produced::Input { input, key }) => {
                if key.is_some() {
                    self.key_reference = key;
                }
                self.backoff.reset();
                self.apply(input)
            }
            Ok(Produced::Credentials(credentials)) => {
                let connection = Connection::start(
                    self.res.target(credentials.endpoint.as_deref()),
                    self.res.pacer.clone(),
                    self.res.settings.cloud.throttle_retry_max,
                    credentials.clone(),
                    self.connection_tx.clone(),
                );
                self.live = Some(Live {
                    connection,
                    credentials,
                });
                Ok(())
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed(&mut self, mut e: AgentError) -> Result<(), CoreError> {
        self.look_for_claims = true;
        e = count_parameter_failure(e, &mut self.parameter_failures);
        if self.rotating() && matches!(e.retry, Retry::SameConnection | Retry::Reconnect) {
            self.rotation_failures += 1;
            if self.rotation_failures >= ROTATION_TRIES {
                e.message = format!("{} ({ROTATION_TRIES} tries)", e.message);
                e.retry = Retry::Permanent;
            }
        }
        if matches!(
            e.code,
            ErrorCode::ClaimExpired | ErrorCode::ClaimMissing | ErrorCode::ClaimRejected
        ) && let Some(claim) = self.claim.take()
        {
            // This claim won't work again; another one (an installer's) may.
            self.claims.forget(&claim, e.message.clone());
            if e.code != ErrorCode::ClaimRejected {
                tracing::warn!(code = e.code.as_str(), "{e}; waiting for another claim");
                return self.apply(Input::ClaimGone {
                    code: e.code,
                    message: e.message,
                });
            }
            // Refused: provisioning stops, unless another claim was handed over meanwhile.
            self.apply(Input::Failed(Failure::new(&e, None)))?;
            if let Ok(other) = self.claims.current(self.clock.now()) {
                tracing::info!("trying claim certificate {} instead", other.description);
                let origin = other.origin;
                self.claim = Some(other);
                self.apply(Input::ClaimAvailable(origin))?;
            }
            return Ok(());
        }
        if e.retry == Retry::NewIdentity
            && self.machine.claim.is_none()
            && let Ok(claim) = self.claims.current(self.clock.now())
        {
            // A new identity needs a claim; a provisioned gateway did not look for one.
            let origin = claim.origin;
            self.claim = Some(claim);
            self.apply(Input::ClaimAvailable(origin))?;
        }
        let delay = match e.retry {
            Retry::SameConnection | Retry::Reconnect if e.code == ErrorCode::Throttled => Some(
                self.backoff
                    .next_delay_within(self.res.settings.cloud.throttle_retry_max),
            ),
            Retry::SameConnection | Retry::Reconnect => Some(self.backoff.next_delay()),
            Retry::RestartFromCsr | Retry::NewIdentity => Some(Duration::ZERO),
            Retry::Permanent => None,
        };
        if let Some(d) = delay {
            tracing::warn!(
                code = e.code.as_str(),
                delay_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                "{e}; retrying"
            );
            if !d.is_zero() {
                self.retry_at = Some(tokio::time::Instant::now() + d);
            }
        }
        self.apply(Input::Failed(Failure::new(&e, delay)))
    }

    /// Hands the abandoned certificates not reported yet to the production connection, once
    /// it is up with the committed identity: the fleet's backend deactivates them.
    fn queue_reports(&self) {
        let (Some(live), Some(identity)) = (&self.live, &self.machine.state.identity) else {
            return;
        };
        if let Some(topic) = topic_for(
            &self.res.settings.rotation.report_topic,
            &identity.thing_name,
        ) {
            for report in &self.machine.state.rotation.reports {
                live.connection.report(crate::connection::Report {
                    id: format!("{ROTATION_REPORT_PREFIX}{}", report.new_certificate_id),
                    topic: topic.clone(),
                    payload: serde_json::to_vec(report).unwrap_or_default(),
                });
            }
        }
        let Some(topic) = topic_for(&self.res.settings.cloud.report_topic, &identity.thing_name)
        else {
            return;
        };
        for id in self.machine.state.unreported_certificates() {
            let payload = serde_json::json!({
                "type": "abandoned-certificate",
                "certificateId": id,
                "thingName": identity.thing_name,
                "currentCertificateId": identity.certificate_id,
                "agent": concat!("iotd ", env!("CARGO_PKG_VERSION")),
                "advice": "iotd gave this certificate up (a lost reply, a lost key or a new \
                           identity); it may be ACTIVE and attached: deactivate it",
            });
            live.connection.report(crate::connection::Report {
                id: id.to_owned(),
                topic: topic.clone(),
                payload: payload.to_string().into_bytes(),
            });
        }
    }

    fn connection_event(&mut self, event: ConnectionEvent) -> Result<(), CoreError> {
        let Some(live) = &self.live else {
            return Ok(());
        };
        match event {
            ConnectionEvent::Up { certificate_id } => {
                if live.credentials.certificate_id != certificate_id {
                    return Ok(());
                }
                self.committed_refusals = 0;
                let committed = self
                    .machine
                    .state
                    .identity
                    .as_ref()
                    .is_some_and(|i| i.certificate_id == certificate_id);
                if committed {
                    self.apply(Input::Connected)?;
                } else {
                    let c = &live.credentials;
                    let input = Input::IdentityVerified {
                        not_before: c.not_before,
                        not_after: c.not_after,
                        key: c.key_location.clone(),
                    };
                    self.apply(input)?;
                }
                self.queue_reports();
                self.jobs_connected();
                Ok(())
            }
            ConnectionEvent::Reported { certificate_id, id } => {
                if live.credentials.certificate_id != certificate_id {
                    return Ok(());
                }
                if let Some(new) = id.strip_prefix(ROTATION_REPORT_PREFIX) {
                    tracing::info!(new_certificate_id = %new, "the rotation report was acknowledged");
                    return self.apply(Input::RotationReported {
                        new_certificate_id: new.to_owned(),
                    });
                }
                tracing::info!(
                    certificate_id = %id,
                    "reported the abandoned certificate to the fleet's backend"
                );
                self.apply(Input::CertificateReported { certificate_id: id })
            }
            ConnectionEvent::Down {
                certificate_id,
                error,
                retry_in,
            } => {
                if live.credentials.certificate_id != certificate_id {
                    return Ok(());
                }
                let failure = Failure::new(&error, Some(retry_in));
                let state = &self.machine.state;
                let committed = state
                    .identity
                    .as_ref()
                    .is_some_and(|i| i.certificate_id == certificate_id);
                if state.identity.is_some() && !committed {
                    // A rotation's new certificate, being verified: a refusal rolls the
                    // rotation back at once, the network's failures after a few tries.
                    self.staged_downs += 1;
                    let refused = !matches!(
                        error.code,
                        ErrorCode::Network | ErrorCode::Throttled | ErrorCode::NoReply
                    );
                    if refused || self.staged_downs >= STAGED_DOWNS {
                        let e = AgentError::permanent(
                            error.code,
                            format!(
                                "the new certificate {certificate_id} did not connect: {error}"
                            ),
                        );
                        return self.failed(e);
                    }
                    return Ok(());
                }
                // Revoked or inactive said by a TLS alert, or (AWS's way, after it closed the
                // session) a CONNECT refused as not authorised twice in a row, for a certificate
                // that connected before.
                if committed && error.code == ErrorCode::ConnectRefused {
                    self.committed_refusals += 1;
                } else if committed {
                    self.committed_refusals = 0;
                }
                let refused = matches!(
                    error.code,
                    ErrorCode::CertificateRevoked | ErrorCode::CertificateInactive
                ) || self.committed_refusals >= COMMITTED_REFUSALS;
                let now = self.clock.now();
                let fallback = state
                    .previous
                    .as_ref()
                    .is_some_and(|p| p.identity.not_after > now);
                if committed && refused && fallback && state.operation.is_none() {
                    self.committed_refusals = 0;
                    return self.apply(Input::FallBack(failure));
                }
                if self.machine.state.identity.is_some() {
                    self.apply(Input::Disconnected(failure))
                } else {
                    // A registered certificate not verified yet: the connection task keeps
                    // trying (right after registration a refusal can be a moment's delay).
                    self.apply(Input::Failed(Failure {
                        retry: Retry::Reconnect,
                        ..failure
                    }))
                }
            }
            ConnectionEvent::Message {
                certificate_id,
                message,
            } => {
                let thing = self.machine.state.identity.as_ref().map(|i| &i.thing_name);
                let notify = thing.map(|t| crate::jobs::notify_topic(t));
                match &self.jobs {
                    Some(jobs) if notify.as_ref() == Some(&message.topic) => {
                        let _ = jobs
                            .notices
                            .send(crate::jobs::Notice::Pushed(message.payload));
                    }
                    _ => tracing::debug!(
                        certificate_id = %certificate_id,
                        topic = %message.topic,
                        bytes = message.payload.len(),
                        "message on the production session for no one"
                    ),
                }
                Ok(())
            }
        }
    }

    /// When the next scheduled rotation starts (Unix seconds): the identity's due time under
    /// `[rotation]`, or later after a rolled-back one; `None` while an operation runs.
    fn next_rotation(&self) -> Option<i64> {
        let state = &self.machine.state;
        let identity = state.identity.as_ref()?;
        if state.operation.is_some() || self.machine.halted {
            return None;
        }
        let policy = &self.res.settings.rotation;
        let mut due = crate::schedule::due(
            identity.not_before,
            identity.not_after,
            &identity.thing_name,
            policy,
        );
        if due <= identity.committed_at {
            // Due before it was even committed: certificates issued for less than
            // renew_before (or older than max_age at once). Rotating at once would only make
            // another such certificate: one try per retry_interval instead of a loop.
            due = identity
                .committed_at
                .saturating_add(secs(policy.retry_interval));
        }
        Some(due.max(state.rotation.retry_at.unwrap_or(i64::MIN)))
    }

    /// Whether expiry and age can be judged by the system clock: systemd-timesyncd's flag file
    /// or systemd-timedated (through the D-Bus side) says it is synchronised, or the
    /// configuration says the clock can be trusted (an RTC).
    fn clock_trusted(&self) -> bool {
        self.res.settings.rotation.trust_clock
            || self.clock_synchronised
            || timesync_flag().exists()
    }

    /// The rotation timer fired: start the scheduled rotation if it is due by the wall clock
    /// and the clock is trusted.
    fn rotation_due(&mut self) -> Result<(), CoreError> {
        self.clock_recheck_at = None;
        let now = self.clock.now();
        let Some(at) = self.next_rotation().filter(|at| *at <= now) else {
            return Ok(());
        };
        if !self.clock_trusted() {
            if !std::mem::replace(&mut self.clock_wait_logged, true) {
                tracing::warn!(
                    due = %crate::cloud::rfc3339(at),
                    "the certificate is due for rotation, but the system clock is not synchronised ({} is missing, and systemd-timedated does not say NTPSynchronized): waiting for it (set rotation.trust_clock = true on a gateway with a trusted RTC)",
                    timesync_flag().display()
                );
            }
            self.clock_recheck_at = Some(tokio::time::Instant::now() + clock_recheck());
            return Ok(());
        }
        self.clock_wait_logged = false;
        if self.work.is_some() || self.live.is_none() {
            // After the unit in flight (a second); without a production connection (its
            // credentials failing to load: minutes, maybe) once a minute, not in a tight loop.
            let again = if self.live.is_none() {
                CLOCK_RECHECK
            } else {
                Duration::from_secs(1)
            };
            self.clock_recheck_at = Some(tokio::time::Instant::now() + again);
            return Ok(());
        }
        let reason = crate::schedule::reason(
            self.machine
                .state
                .identity
                .as_ref()
                .map_or(0, |i| i.not_before),
            self.machine
                .state
                .identity
                .as_ref()
                .map_or(0, |i| i.not_after),
            &self.res.settings.rotation,
        );
        tracing::info!(reason, "the certificate is due for rotation");
        self.begin_rotation(crate::store::Trigger::Schedule)
    }

    fn begin_rotation(&mut self, trigger: crate::store::Trigger) -> Result<(), CoreError> {
        self.rotation_failures = 0;
        self.staged_downs = 0;
        self.parameters = None;
        self.retry_at = None;
        self.backoff.reset();
        self.apply(Input::RotationDue(trigger))
    }

    /// The committed identity's connection is up: the jobs watcher (started with the first
    /// one) uses it and looks at the pending jobs.
    fn jobs_connected(&mut self) {
        let (Some(identity), Some(live)) = (&self.machine.state.identity, &self.live) else {
            return;
        };
        if live.credentials.certificate_id != identity.certificate_id {
            return;
        }
        let watcher = self.jobs.get_or_insert_with(|| {
            let last_job = self
                .machine
                .state
                .rotation
                .last
                .as_ref()
                .and_then(|r| r.job_id.clone());
            crate::jobs::spawn(
                identity.thing_name.clone(),
                self.res.settings.cloud.reply_timeout,
                self.events.clone(),
                self.job_requests_tx.clone(),
                last_job,
            )
        });
        watcher
            .exchanger
            .send_replace(Some(live.connection.exchanger()));
        let _ = watcher.notices.send(crate::jobs::Notice::Connected);
    }

    /// A rotation job (taken IN_PROGRESS by the watcher): rotates now, whatever the schedule
    /// and the clock say.
    fn rotate_for_job(&mut self, job_id: String) -> Result<String, AgentError> {
        self.start_rotation_now(crate::store::Trigger::Job { job_id })
            .map(|o| o.message().to_owned())
    }

    /// `Rotate` (D-Bus, `iotctl rotate`): starts a rotation now, whatever the schedule and the
    /// clock say; answers with its id at once. Asked again while it runs, answers the same id.
    fn rotate_on_demand(&mut self) -> Result<Outcome, AgentError> {
        self.start_rotation_now(crate::store::Trigger::OnDemand)
    }

    fn start_rotation_now(
        &mut self,
        trigger: crate::store::Trigger,
    ) -> Result<Outcome, AgentError> {
        let state = &self.machine.state;
        match (&state.identity, &state.operation) {
            (
                Some(_),
                Some(crate::store::Operation::Rotation {
                    staged_generation, ..
                }),
            ) => {
                return Ok(Outcome::Unchanged(crate::fsm::rotation_id(
                    *staged_generation,
                )));
            }
            (None, _) | (_, Some(crate::store::Operation::Provisioning { .. })) => {
                return Err(AgentError::permanent(
                    ErrorCode::NotProvisioned,
                    format!(
                        "this gateway is not provisioned yet ({}); there is no certificate to rotate",
                        self.machine.describe()
                    ),
                ));
            }
            (Some(_), None) => {}
        }
        if self.machine.halted || self.live.is_none() || self.work.is_some() {
            return Err(AgentError::new(
                ErrorCode::Busy,
                Retry::SameConnection,
                format!(
                    "the gateway is busy ({}); try again in a moment",
                    self.machine.describe()
                ),
            ));
        }
        self.begin_rotation(trigger)
            .map_err(|e| AgentError::permanent(ErrorCode::Store, e.to_string()))?;
        match &self.machine.state.operation {
            Some(crate::store::Operation::Rotation {
                staged_generation, ..
            }) => Ok(Outcome::Changed(crate::fsm::rotation_id(
                *staged_generation,
            ))),
            _ => Err(AgentError::permanent(
                ErrorCode::Store,
                "the rotation could not be started (see the log)",
            )),
        }
    }

    fn command(&mut self, command: Command) -> Result<(), CoreError> {
        self.look_for_claims = true;
        match command {
            Command::Rotate(reply) => {
                let answer = self.rotate_on_demand();
                let _ = reply.send(answer);
                Ok(())
            }
            Command::ClockSynchronised => {
                self.clock_synchronised = true;
                self.rotation_due()
            }
            Command::Reprovision(reply) => {
                let answer = self.reprovision();
                let _ = reply.send(answer);
                Ok(())
            }
            Command::OpenOnboarding { seconds, reply } => {
                let answer = if self.onboarding_served {
                    let now = self.clock.now();
                    match self.window.open_for(i64::from(seconds), now) {
                        Ok(change) => {
                            self.window_changed(change);
                            Ok(now + i64::from(seconds))
                        }
                        Err(e) => Err(AgentError::permanent(ErrorCode::Config, e.to_string())),
                    }
                } else {
                    Err(onboarding_off())
                };
                let _ = reply.send(answer);
                Ok(())
            }
            Command::CloseOnboarding(reply) => {
                let answer = if self.onboarding_served {
                    let was_open = self.window.is_open();
                    let change = self.window.close(onboard::window::Closed::Requested);
                    if was_open {
                        self.window_changed(change);
                    }
                    Ok(was_open)
                } else {
                    Err(onboarding_off())
                };
                let _ = reply.send(answer);
                Ok(())
            }
            Command::ProvideClaim(claim, reply) => {
                let answer = match &self.machine.state.identity {
                    Some(i) if self.machine.state.operation.is_none() => {
                        Ok(Outcome::Unchanged(format!(
                            "already provisioned as {}; the claim is not needed",
                            i.thing_name
                        )))
                    }
                    _ => {
                        tracing::info!("received claim certificate {}", claim.description);
                        self.use_claim(*claim)?;
                        Ok(Outcome::Changed(
                            "claim accepted; provisioning with it".to_owned(),
                        ))
                    }
                };
                let _ = reply.send(answer);
                Ok(())
            }
        }
    }

    fn reprovision(&mut self) -> Result<Outcome, AgentError> {
        if let Some((work, _)) = &self.work {
            let doing = match work {
                Work::VerifyIdentity { .. } => "the agent is preparing its connection".to_owned(),
                _ => format!("{} is in progress", self.machine.describe()),
            };
            return Err(AgentError::permanent(
                ErrorCode::Busy,
                format!("{doing}; try again when it has finished"),
            ));
        }
        let claim = self.claims.current(self.clock.now()).map_err(|waiting| {
            AgentError::permanent(
                ErrorCode::ClaimMissing,
                format!(
                    "no claim is at hand to provision a new identity with; iotd needs {waiting}"
                ),
            )
        })?;
        // A new provisioning reads its template parameters again (they may have been fixed).
        self.parameters = None;
        self.parameter_failures = 0;
        let previous = self.machine.describe();
        let was_waiting = self.machine.work() == Work::WaitForClaim;
        let origin = claim.origin;
        let found = format!("claim certificate {}", claim.description);
        self.claim = Some(claim);
        self.waiting_for_claim = None;
        self.apply(Input::ClaimAvailable(origin))
            .map_err(|e| AgentError::permanent(ErrorCode::Store, e.to_string()))?;
        if was_waiting && self.machine.state.identity.is_none() {
            // Nothing to abandon: the claim it waited for is here now.
            self.retry_at = None;
            tracing::info!("found {found} on request; provisioning");
            return Ok(Outcome::Changed(format!(
                "found {found}; provisioning with it"
            )));
        }
        let t = self
            .machine
            .apply(Input::Reprovision, self.clock.now())
            .map_err(|e| AgentError::permanent(ErrorCode::Store, e.to_string()))?;
        if !t.changed() {
            return Ok(Outcome::Unchanged(
                "already provisioning from the start; no action taken".to_owned(),
            ));
        }
        for action in t.actions {
            self.act(action);
        }
        self.retry_at = None;
        self.backoff.reset();
        tracing::info!("re-provisioning on request (was {previous})");
        Ok(Outcome::Changed(format!(
            "re-provisioning with a new key (was {previous})"
        )))
    }
}
