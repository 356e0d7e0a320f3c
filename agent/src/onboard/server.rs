//! The onboarding server (profile §5.3–5.6): HTTPS (axum over rustls, HTTP/1.1) on the
//! configured address, for the installer's client; and, where the page is served (`page`),
//! plain HTTP on the interfaces configured for it: the installer's page and the profile's
//! browser variant of the API (binding `"none"` only: there is no certificate to bind to).
//! Both transports share one session slot, one rate limit and one connection cap.
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /` | the installer's page (plain HTTP only; gzip, with its Content-Security-Policy) |
//! | `GET /v1/form` | what the page asks before pairing: serial, installer parameters, link |
//! | `POST /v1/pair/params` | a new session: randoms, serial, PBKDF parameters (rate-limited) |
//! | `POST /v1/pair/start` | `share_p` → `share_v`, `confirm_v` (the attempt is counted first) |
//! | `POST /v1/pair/finish` | `confirm_p` → `paired` |
//! | `POST /v1/claim` | the sealed claim bundle → the sealed ack |
//! | `GET /v1/status` | the window and the progress, no secrets |
//! | `GET /v1/events` | the same object as Server-Sent Events, on every change |
//!
//! The server owns the HTTP side: the one session there may be at a time, SPAKE2+ as the
//! verifier, and the sealed channel. The core owns the window, the attempt counter and the
//! claim: the server asks it through the [`Port`] and reads its [`View`]; it never touches the
//! state itself.
//!
//! - **One handshake at a time.** `/pair/params` makes the session; while it is live, another
//!   gets `409 busy`. Each step has a deadline ([`Limits::step_deadline`], 30 s) from the reply
//!   of the one before, and a session lasts at most [`Limits::session_lifetime`] (120 s); an
//!   expired session is gone (`404 no_session`) and the slot is free again. A timer in the
//!   accept loop drops it when its deadline passes, so its secrets do not wait for the next
//!   request to be wiped. A handler that stops half-way (its client went away while it waited
//!   for the core) ends its session too, so the slot never stays taken.
//! - **Counting.** `/pair/start` checks the share (a bad one ends the session, not counted),
//!   computes `share_v` and `confirm_v`, and sends nothing before the core has counted and
//!   persisted the attempt ([`Request::CountAttempt`]); a refusal of the core (the window
//!   closed, the cap reached) is passed on and the computed keys are dropped.
//! - **Parsing.** `v` must be a whole number (`1` or `1.0`); another is `unsupported_version`.
//!   A field missing, of the wrong type, not unpadded base64url, or of the wrong length is
//!   `malformed`, as is a `binding` other than `tls-server-end-point` and `none`, or a
//!   `client_id` other than 1 to 64 printable ASCII characters; a share of the wrong length is
//!   `bad_share`. Unknown fields are ignored.
//! - **Session lifetime.** Any refusal at `/pair/start`, `/pair/finish` or `/claim` ends the
//!   session named in the request, except `409 busy` and `429` (which `/pair/params` alone
//!   gives); a step repeated or out of order is `409 wrong_state`, and ends it too. After the
//!   claim's ack, the session is gone: a replayed `/claim` gets `404 no_session`.
//! - **Rate limit.** `/pair/params` takes a token from one bucket for the whole server
//!   ([`Limits::params_burst`] tokens, one more every [`Limits::params_refill`]: 10 per 10 s),
//!   `429 rate_limited` when it is empty, with `Retry-After` in whole seconds until the next
//!   token (the page waits that long before it offers to try again). One bucket, not one per
//!   peer: the memory stays bounded, and a client on the LAN that floods it could as well hold
//!   the session slot.
//! - **Bodies.** At most [`PARAMS_BODY_LIMIT`] (1 KiB), [`CLAIM_BODY_LIMIT`] (20 KiB) for
//!   `/claim`: a `Content-Length` over the limit is refused before reading, and a body is
//!   counted as it arrives, so a chunked one stops at the limit (`413 too_large`).
//! - **Connections.** At most [`Limits::max_connections`] at once (more are closed at once);
//!   the TLS handshake, a request's headers and its body each have
//!   [`Limits::request_timeout`]; an idle keep-alive connection is closed after it too.
//!
//! Every refusal is the profile's JSON error `{"v":1,"error","message","attempts_left"}`, and is
//! logged with the peer's address. Neither the log nor a reply carries a secret (the verifier
//! record, `y`, the keys, confirmations or the claim). One code is not in the profile's table:
//! `500 internal`, for a failure of the gateway itself (its random number generator, or a core
//! that does not answer); the session ends and the client may pair again.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::BodyExt as _;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::page::{Accepted, Link};
use super::port::{Port, Refusal, Request, View};
use super::register::OnboardingRecord;
use super::session::{
    self, Binding, Channel, ContextParams, MessageType, RANDOM_LEN, Role, SESSION_ID_LEN, SUITE,
    SessionError,
};
use super::spake2plus::{
    CONFIRM_LEN, Spake2PlusError, Verifier, VerifierConfirming, VerifierResponse,
};

/// The largest request body, except `/v1/claim`'s.
pub const PARAMS_BODY_LIMIT: usize = 1024;
/// The largest `/v1/claim` body: a 12 KiB bundle, sealed and in base64url, fits.
pub const CLAIM_BODY_LIMIT: usize = 20 * 1024;
/// The PBKDF the record was made with, as `/v1/pair/params` names it.
pub const PBKDF_ALG: &str = "PBKDF2-HMAC-SHA256";
/// The profile's version, `"v"` in every body.
pub const VERSION: u64 = 1;

/// The server's time limits and bounds. The defaults are the profile's and production's; tests
/// shorten them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a session waits for its next step (the profile's 30 s).
    pub step_deadline: Duration,
    /// How long a session lives at most, from `/pair/params` (the profile's 120 s).
    pub session_lifetime: Duration,
    /// `/pair/params` requests allowed in a burst.
    pub params_burst: u32,
    /// The time after which one more `/pair/params` is allowed, up to the burst.
    pub params_refill: Duration,
    /// The TLS handshake, a request's headers, its body; and an idle connection.
    pub request_timeout: Duration,
    /// How long the server waits for the core's answer (counting an attempt, a hand-over).
    pub core_timeout: Duration,
    /// Connections served at once, `/v1/events` streams included.
    pub max_connections: usize,
    /// How often an idle `/v1/events` stream gets a comment, so that a dead peer is noticed.
    pub events_keep_alive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            step_deadline: Duration::from_secs(30),
            session_lifetime: Duration::from_secs(120),
            params_burst: 10,
            params_refill: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            core_timeout: Duration::from_secs(10),
            max_connections: 32,
            events_keep_alive: Duration::from_secs(15),
        }
    }
}

/// The onboarding server on a bound listener. [`Server::run`] serves until the core is gone
/// (its end of [`Port::requests`] dropped), or until the future is dropped, which also ends
/// every connection.
pub struct Server {
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    /// Connections accepted on the installer's page's interfaces (plain HTTP), if it is served.
    page: Option<tokio::sync::mpsc::Receiver<Accepted>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("serial", &self.shared.record.serial)
            .finish_non_exhaustive()
    }
}

/// Serves onboarding on `listener` with the default [`Limits`]: [`Server::new`] and
/// [`Server::run`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    leaf_der: Vec<u8>,
    record: OnboardingRecord,
    port: Port,
) -> io::Result<()> {
    Server::new(listener, tls, &leaf_der, record, port, Limits::default())
        .run()
        .await
}

impl Server {
    /// A server with the TLS configuration `tls` (its certificate chain must start with
    /// `leaf_der`, which the `tls-server-end-point` binding hashes), the verifier `record`, and
    /// its end of the port to the core. The server speaks HTTP/1.1 only, and says so in ALPN
    /// (`tls`'s own ALPN list is replaced).
    pub fn new(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        leaf_der: &[u8],
        record: OnboardingRecord,
        port: Port,
        limits: Limits,
    ) -> Self {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let bucket = Bucket {
            tokens: limits.params_burst,
            last: Instant::now(),
        };
        Self {
            listener,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            shared: Arc::new(Shared {
                binding: Binding::tls_server_end_point(leaf_der),
                record,
                requests: port.requests,
                view: port.view,
                limits,
                session: Mutex::new(None),
                bucket: Mutex::new(bucket),
                rearm: Notify::new(),
                installer_parameters: Vec::new(),
            }),
            page: None,
        }
    }

    /// The template parameters the installer may supply (`onboarding.installer_parameters`),
    /// which `GET /v1/form` lists for the page. Call before [`Server::run`].
    #[must_use]
    pub fn with_installer_parameters(mut self, names: Vec<String>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.installer_parameters = names;
        }
        self
    }

    /// Serves the installer's page and the browser API on plain HTTP to the connections that
    /// arrive on `page` (from [`super::page::listen`]).
    #[must_use]
    pub fn with_page(mut self, page: tokio::sync::mpsc::Receiver<Accepted>) -> Self {
        self.page = Some(page);
        self
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts and serves connections until the core is gone (then `Ok`). A transient accept
    /// error (a connection reset before it was accepted, no file descriptors left) is logged
    /// and retried; any other is returned.
    pub async fn run(self) -> io::Result<()> {
        let Self {
            listener,
            tls,
            shared,
            mut page,
        } = self;
        let router = router();
        let mut connections = JoinSet::new();
        loop {
            let deadline = shared.next_deadline();
            tokio::select! {
                Some(accepted) = next_page_connection(&mut page) => {
                    let Accepted { tcp, peer, link } = accepted;
                    if !admit(&connections, &shared.limits, &tcp, peer) {
                        continue;
                    }
                    let app = App { shared: shared.clone(), peer, transport: Transport::Plain(link) };
                    connections.spawn(serve_http(Box::new(tcp), app, router.clone()));
                }
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        if !admit(&connections, &shared.limits, &tcp, peer) {
                            continue;
                        }
                        let app = App { shared: shared.clone(), peer, transport: Transport::Tls };
                        connections.spawn(connection(tcp, tls.clone(), app, router.clone()));
                    }
                    Err(error) if transient(&error) => {
                        tracing::warn!("onboarding: accepting a connection: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(error) => return Err(error),
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                () = sleep_until(deadline) => shared.sweep(),
                () = shared.rearm.notified() => {}
                () = shared.requests.closed() => return Ok(()),
            }
        }
    }
}

/// Accept errors after which the listener still works.
pub(crate) fn transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::OutOfMemory
    ) || matches!(
        error.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// The errno values of running out of descriptors or buffers (Linux).
mod libc_errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOBUFS: i32 = 105;
}

/// Whether a new connection is served: not when [`Limits::max_connections`] are open already
/// (it is closed when the caller drops it).
fn admit(
    connections: &JoinSet<()>,
    limits: &Limits,
    tcp: &tokio::net::TcpStream,
    peer: SocketAddr,
) -> bool {
    if connections.len() >= limits.max_connections {
        tracing::warn!(%peer, "onboarding: refusing a connection: {} are open already", connections.len());
        return false;
    }
    // Progress events (`/v1/events`) are small writes: without this the client's delayed ACK
    // holds each one back by up to 40 ms.
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, "onboarding: TCP_NODELAY: {error}");
    }
    true
}

/// The next connection of the page's listeners; pending forever when the page is not served
/// (or its listeners are gone).
async fn next_page_connection(
    page: &mut Option<tokio::sync::mpsc::Receiver<Accepted>>,
) -> Option<Accepted> {
    match page {
        Some(receiver) => match receiver.recv().await {
            Some(accepted) => Some(accepted),
            None => {
                *page = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One connection: the TLS handshake, then HTTP/1.1.
async fn connection(
    tcp: tokio::net::TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    app: App,
    router: Router<App>,
) {
    let peer = app.peer;
    let timeout = app.shared.limits.request_timeout;
    let stream = match tokio::time::timeout(timeout, tls.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::info!(%peer, "onboarding: TLS handshake failed: {error}");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "onboarding: no TLS handshake within {timeout:?}");
            return;
        }
    };
    serve_http(Box::new(stream), app, router).await;
}

/// A connection's byte stream, TLS or plain.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// HTTP/1.1 on a connection (after TLS, or plain on the page's interfaces). One stream type
/// for both, so that hyper's HTTP/1 server is in the binary once, not once per transport
/// (35 KB).
async fn serve_http(stream: Box<dyn Io>, app: App, router: Router<App>) {
    let peer = app.peer;
    let timeout = app.shared.limits.request_timeout;
    let service = hyper_util::service::TowerToHyperService::new(router.with_state(app));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
    if let Err(error) = served {
        tracing::debug!(%peer, "onboarding: connection ended: {error}");
    }
}

/// Everything the handlers share.
struct Shared {
    record: OnboardingRecord,
    /// `tls-server-end-point` for our own leaf certificate.
    binding: Binding,
    requests: tokio::sync::mpsc::Sender<Request>,
    view: tokio::sync::watch::Receiver<View>,
    limits: Limits,
    /// The one session there may be.
    session: Mutex<Option<Session>>,
    bucket: Mutex<Bucket>,
    /// The session's deadline changed: the accept loop re-arms its timer.
    rearm: Notify,
    /// What `GET /v1/form` lists (`onboarding.installer_parameters`).
    installer_parameters: Vec<String>,
}

/// A token bucket for `/pair/params`.
struct Bucket {
    tokens: u32,
    /// When the last token was added (or the bucket was last full).
    last: Instant,
}

impl Bucket {
    /// Takes a token, or says how long until the next one comes.
    fn take(&mut self, limits: &Limits, now: Instant) -> Result<(), Duration> {
        let per = limits.params_refill.max(Duration::from_millis(1));
        if self.tokens >= limits.params_burst {
            self.last = now;
        } else {
            let elapsed = now.saturating_duration_since(self.last);
            let earned = elapsed.as_nanos() / per.as_nanos();
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            if earned > 0 {
                self.tokens = self.tokens.saturating_add(earned).min(limits.params_burst);
                self.last = if self.tokens >= limits.params_burst {
                    now
                } else {
                    self.last + per * earned
                };
            }
        }
        if self.tokens == 0 {
            return Err((self.last + per).saturating_duration_since(now));
        }
        self.tokens -= 1;
        Ok(())
    }
}

/// Where a session stands.
enum Step {
    /// `/pair/params` answered; waiting for `share_p`.
    Started(Box<Verifier>),
    /// A `/pair/start` is waiting for the core to count the attempt.
    Counting,
    /// `confirm_v` sent; waiting for `confirm_p`.
    Confirming(Box<VerifierConfirming>),
    /// Both confirmed; waiting for the claim.
    Paired(Box<Channel>),
    /// A `/claim` is waiting for the core to take the bundle.
    HandingOver,
}

impl Step {
    fn name(&self) -> &'static str {
        match self {
            Step::Started(_) => "waiting for /v1/pair/start",
            Step::Counting => "counting an attempt",
            Step::Confirming(_) => "waiting for /v1/pair/finish",
            Step::Paired(_) => "paired, waiting for /v1/claim",
            Step::HandingOver => "handing over a claim",
        }
    }

    /// A handler is waiting for the core in this step: it ends the step itself.
    fn in_flight(&self) -> bool {
        matches!(self, Step::Counting | Step::HandingOver)
    }
}

struct Session {
    id: [u8; SESSION_ID_LEN],
    peer: SocketAddr,
    step: Step,
    /// When the next step must have arrived.
    step_deadline: Instant,
    /// When the session ends anyway.
    expires_at: Instant,
}

impl Session {
    fn deadline(&self) -> Instant {
        self.step_deadline.min(self.expires_at)
    }

    fn expired(&self, now: Instant) -> bool {
        !self.step.in_flight() && now >= self.deadline()
    }

    /// The next step's deadline starts now.
    fn advance(&mut self, step: Step, limits: &Limits) {
        self.step = step;
        self.step_deadline = Instant::now() + limits.step_deadline;
    }
}

/// Compares session ids without an early exit.
fn same_id(a: &[u8; SESSION_ID_LEN], b: &[u8; SESSION_ID_LEN]) -> bool {
    a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// When the session expires, unless a handler is waiting for the core in it.
    fn next_deadline(&self) -> Option<Instant> {
        lock(&self.session)
            .as_ref()
            .filter(|s| !s.step.in_flight())
            .map(Session::deadline)
    }

    /// Drops the session if it expired.
    fn sweep(&self) {
        let mut slot = lock(&self.session);
        if slot.as_ref().is_some_and(|s| s.expired(Instant::now()))
            && let Some(session) = slot.take()
        {
            tracing::info!(peer = %session.peer, "onboarding: the session expired ({})", session.step.name());
            drop(slot);
            self.ended(&session.step);
        }
    }

    /// A session in `step` ended without a claim handed over: the core stops showing the
    /// client as paired. `try_send`: callers hold no lock but may not wait; the channel has
    /// room, as there is one session at a time.
    fn ended(&self, step: &Step) {
        if matches!(step, Step::Paired(_)) {
            self.unpaired();
        }
    }

    fn unpaired(&self) {
        if self.requests.try_send(Request::Unpaired).is_err() {
            tracing::warn!("onboarding: the core was not told that the paired session ended");
        }
    }

    /// Ends the session `id`, if it is the live one.
    fn end(&self, id: &[u8; SESSION_ID_LEN]) {
        let mut slot = lock(&self.session);
        if slot.as_ref().is_some_and(|s| same_id(&s.id, id)) {
            *slot = None;
        }
        drop(slot);
        self.rearm.notify_one();
    }

    /// Takes the live session `id` in `expected` step out of its step, leaving `placeholder`
    /// (a step in flight), and holds it; `404 no_session` when there is none (or it expired),
    /// `409 wrong_state` (and the session ends) when it is in another step.
    fn take_step(
        &self,
        id: &[u8; SESSION_ID_LEN],
        expected: fn(&Step) -> bool,
        placeholder: Step,
        endpoint: &'static str,
    ) -> Result<(Step, Held<'_>), ApiError> {
        let mut slot = lock(&self.session);
        let now = Instant::now();
        match slot.as_mut() {
            Some(session) if same_id(&session.id, id) && !session.expired(now) => {
                if expected(&session.step) {
                    let step = std::mem::replace(&mut session.step, placeholder);
                    Ok((
                        step,
                        Held {
                            shared: self,
                            id: *id,
                            put_back: false,
                        },
                    ))
                } else {
                    let state = session.step.name();
                    let ended = slot.take();
                    drop(slot);
                    self.rearm.notify_one();
                    if let Some(session) = ended {
                        self.ended(&session.step);
                    }
                    Err(ApiError::wrong_state(endpoint, state))
                }
            }
            Some(session) if same_id(&session.id, id) => {
                let ended = slot.take();
                drop(slot);
                self.rearm.notify_one();
                if let Some(session) = ended {
                    self.ended(&session.step);
                }
                Err(ApiError::no_session())
            }
            _ => Err(ApiError::no_session()),
        }
    }

    /// Sends `request` to the core and waits for its answer.
    async fn ask<T>(
        &self,
        request: Request,
        answer: oneshot::Receiver<Result<T, Refusal>>,
    ) -> Result<T, ApiError> {
        let timeout = self.limits.core_timeout;
        let asked = async {
            self.requests
                .send(request)
                .await
                .map_err(|_| ApiError::internal("the gateway's core is not running"))?;
            answer
                .await
                .map_err(|_| ApiError::internal("the gateway's core dropped the request"))
        };
        match tokio::time::timeout(timeout, asked).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(refusal))) => Err(ApiError::from_refusal(refusal)),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ApiError::internal(
                "the gateway's core did not answer in time",
            )),
        }
    }
}

/// A session whose step a handler took ([`Shared::take_step`]): the handler puts the next step
/// back, or the session ends when this is dropped. So a handler that stops half-way (hyper drops
/// it when its client goes away, while it waits for the core) ends the session instead of
/// leaving it in flight, and the slot is free again.
struct Held<'a> {
    shared: &'a Shared,
    id: [u8; SESSION_ID_LEN],
    put_back: bool,
}

impl Held<'_> {
    /// Puts the session back in `step` (its deadline starts now); false if it ended meanwhile
    /// (a concurrent request refused), when it stays ended.
    fn put(mut self, step: Step) -> bool {
        self.put_back = true;
        let shared = self.shared;
        let mut slot = lock(&shared.session);
        let put = match slot.as_mut() {
            Some(session) if same_id(&session.id, &self.id) && session.step.in_flight() => {
                session.advance(step, &shared.limits);
                true
            }
            _ => false,
        };
        drop(slot);
        shared.rearm.notify_one();
        put
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if !self.put_back {
            self.shared.end(&self.id);
        }
    }
}

/// How a connection reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// HTTPS on `onboarding.listen`: the API, for `iotctl onboard` and apps.
    Tls,
    /// Plain HTTP on one of the page's interfaces: the page and the browser API.
    Plain(Link),
}

/// A handler's view: the shared state, the peer of the connection and how it came.
#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    peer: SocketAddr,
    transport: Transport,
}

fn router() -> Router<App> {
    Router::new()
        .route("/", get(page))
        .route(PARAMS, post(pair_params))
        .route(START, post(pair_start))
        .route(FINISH, post(pair_finish))
        .route(CLAIM, post(claim))
        .route("/v1/form", get(form))
        .route("/v1/status", get(status))
        .route("/v1/events", get(events))
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// A refusal, as the profile's JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    /// Whole seconds for `Retry-After` (a `429`): the client can wait for the next token
    /// instead of guessing.
    pub(crate) retry_after: Option<u64>,
}

/// Every code a refusal of the server can have (the profile's table, and `internal`).
pub const ERROR_CODES: &[&str] = &[
    "malformed",
    "unsupported_version",
    "bad_share",
    "confirmation_failed",
    "bad_sequence",
    "decrypt_failed",
    "window_closed",
    "no_session",
    "busy",
    "wrong_state",
    "too_large",
    "claim_invalid",
    "rate_limited",
    "internal",
];

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn rate_limited(wait: Duration) -> Self {
        // Rounded up, and at least a second: a client that waits that long finds the token.
        let seconds = wait.as_millis().div_ceil(1000).max(1);
        let seconds = u64::try_from(seconds).unwrap_or(u64::MAX);
        let unit = if seconds == 1 { "second" } else { "seconds" };
        Self {
            retry_after: Some(seconds),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("Too many pairing requests; try again in {seconds} {unit}."),
            )
        }
    }

    fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed", message)
    }

    fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("The request body is larger than this endpoint's limit of {limit} bytes."),
        )
    }

    fn no_session() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "no_session",
            "There is no such pairing session: it expired, finished or never existed. Pair again.",
        )
    }

    fn wrong_state(endpoint: &str, state: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "wrong_state",
            format!(
                "{endpoint} does not fit the session's state ({state}); the session has ended. \
                 Pair again."
            ),
        )
    }

    fn window_closed() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "window_closed",
            "The gateway is not accepting onboarding now: open its onboarding window (or it has \
             used up its attempts) and try again.",
        )
    }

    fn internal(message: &str) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("The gateway failed to complete this step ({message}). Pair again."),
        )
    }

    /// The core's refusal, passed on.
    fn from_refusal(refusal: Refusal) -> Self {
        let status = StatusCode::from_u16(refusal.status)
            .ok()
            .filter(|s| s.is_client_error() || s.is_server_error())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, refusal.code, refusal.message)
    }

    /// The JSON body.
    pub(crate) fn body(&self, attempts_left: u32) -> Value {
        json!({
            "v": VERSION,
            "error": self.code,
            "message": self.message,
            "attempts_left": attempts_left,
        })
    }
}

/// JSON with `Cache-Control: no-store`.
fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

impl App {
    /// The refusal as a response, logged with the peer.
    fn refuse(&self, endpoint: &'static str, error: &ApiError) -> Response {
        tracing::warn!(
            peer = %self.peer,
            endpoint,
            code = error.code,
            status = error.status.as_u16(),
            "onboarding: refused: {}",
            error.message
        );
        let attempts_left = self.shared.view.borrow().attempts_left;
        let mut response = json_response(error.status, &error.body(attempts_left));
        if let Some(seconds) = error.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }

    fn reply(&self, endpoint: &'static str, result: Result<Value, ApiError>) -> Response {
        match result {
            Ok(body) => json_response(StatusCode::OK, &body),
            Err(error) => self.refuse(endpoint, &error),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request bodies.

/// Reads a body of at most `limit` bytes, counting as it arrives.
async fn read_body(
    request: HttpRequest,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let mut body: Body = request.into_body();
    let read = async {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| ApiError::malformed("The request body could not be read."))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > limit {
                    return Err(ApiError::too_large(limit));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::malformed(
                "The request body did not arrive in time.",
            ))
        })
}

/// What `/pair/params` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParamsRequest {
    pub(crate) client_random: [u8; RANDOM_LEN],
    pub(crate) client_id: String,
    pub(crate) binding: BindingChoice,
}

/// The binding a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BindingChoice {
    TlsServerEndPoint,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StartRequest {
    pub(crate) session_id: [u8; SESSION_ID_LEN],
    pub(crate) share_p: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FinishRequest {
    pub(crate) session_id: [u8; SESSION_ID_LEN],
    pub(crate) confirm_p: [u8; CONFIRM_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimRequest {
    pub(crate) session_id: [u8; SESSION_ID_LEN],
    pub(crate) seq: u64,
    pub(crate) ct: Vec<u8>,
}

/// A request that failed to parse, with the session it names if that much could be read (a
/// refusal ends that session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    pub(crate) session_id: Option<[u8; SESSION_ID_LEN]>,
    pub(crate) error: ApiError,
}

/// The body as a JSON object.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::malformed(
            "The request body is not a JSON object.",
        )),
        Err(_) => Err(ApiError::malformed("The request body is not JSON.")),
    }
}

/// `"v": 1`.
fn check_version(object: &Map<String, Value>) -> Result<(), ApiError> {
    let v = object.get("v").ok_or_else(|| {
        ApiError::malformed("The request has no \"v\" (the protocol version, 1).")
    })?;
    match whole_number(v) {
        Some(1) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_version",
            "This gateway speaks version 1 of the onboarding protocol (\"v\": 1) only.",
        )),
        None => Err(ApiError::malformed("\"v\" is not a whole number.")),
    }
}

/// The body as a JSON object with `"v": 1`.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let object = json_object(body)?;
    check_version(&object)?;
    Ok(object)
}

/// A JSON number with no fraction, as an integer (saturated); None for anything else.
fn whole_number(value: &Value) -> Option<i128> {
    let Value::Number(number) = value else {
        return None;
    };
    if let Some(n) = number.as_i64() {
        return Some(n.into());
    }
    if let Some(n) = number.as_u64() {
        return Some(n.into());
    }
    let f = number.as_f64()?;
    // Whole floats far outside any version are only "not 1".
    (f.is_finite() && f.fract() == 0.0).then_some(if f == 1.0 { 1 } else { i128::MAX })
}

fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Result<&'a Value, ApiError> {
    object
        .get(name)
        .ok_or_else(|| ApiError::malformed(format!("The request has no \"{name}\".")))
}

fn text_field<'a>(object: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    field(object, name)?
        .as_str()
        .ok_or_else(|| ApiError::malformed(format!("\"{name}\" is not a string.")))
}

/// Unpadded base64url bytes.
fn bytes_field(object: &Map<String, Value>, name: &str) -> Result<Vec<u8>, ApiError> {
    URL_SAFE_NO_PAD
        .decode(text_field(object, name)?)
        .map_err(|_| ApiError::malformed(format!("\"{name}\" is not unpadded base64url.")))
}

/// Unpadded base64url bytes of exactly `N` bytes.
fn array_field<const N: usize>(
    object: &Map<String, Value>,
    name: &str,
) -> Result<[u8; N], ApiError> {
    let bytes = bytes_field(object, name)?;
    <[u8; N]>::try_from(bytes.as_slice())
        .map_err(|_| ApiError::malformed(format!("\"{name}\" is {} bytes, not {N}.", bytes.len())))
}

/// Parses a request that names a session: the session id first, so that a refusal of the
/// rest can still end it.
fn with_session<T>(
    body: &[u8],
    rest: impl FnOnce(&Map<String, Value>, [u8; SESSION_ID_LEN]) -> Result<T, ApiError>,
) -> Result<T, ParseError> {
    let fail = |session_id, error| ParseError { session_id, error };
    let object = json_object(body).map_err(|e| fail(None, e))?;
    let named = array_field::<SESSION_ID_LEN>(&object, "session_id").ok();
    check_version(&object).map_err(|e| fail(named, e))?;
    let session_id =
        array_field::<SESSION_ID_LEN>(&object, "session_id").map_err(|e| fail(None, e))?;
    rest(&object, session_id).map_err(|e| fail(Some(session_id), e))
}

pub(crate) fn parse_params(body: &[u8]) -> Result<ParamsRequest, ApiError> {
    let object = object(body)?;
    let client_random = array_field::<RANDOM_LEN>(&object, "client_random")?;
    let client_id = text_field(&object, "client_id")?;
    session::check_client_id(client_id).map_err(|_| {
        ApiError::malformed(
            "\"client_id\" must be 1 to 64 printable ASCII characters (e.g. \"iotctl/0.1\").",
        )
    })?;
    let binding = match text_field(&object, "binding")? {
        "tls-server-end-point" => BindingChoice::TlsServerEndPoint,
        "none" => BindingChoice::None,
        _ => {
            return Err(ApiError::malformed(
                "\"binding\" must be \"tls-server-end-point\" or \"none\".",
            ));
        }
    };
    Ok(ParamsRequest {
        client_random,
        client_id: client_id.to_owned(),
        binding,
    })
}

pub(crate) fn parse_start(body: &[u8]) -> Result<StartRequest, ParseError> {
    with_session(body, |object, session_id| {
        Ok(StartRequest {
            session_id,
            share_p: bytes_field(object, "share_p")?,
        })
    })
}

pub(crate) fn parse_finish(body: &[u8]) -> Result<FinishRequest, ParseError> {
    with_session(body, |object, session_id| {
        Ok(FinishRequest {
            session_id,
            confirm_p: array_field::<CONFIRM_LEN>(object, "confirm_p")?,
        })
    })
}

pub(crate) fn parse_claim(body: &[u8]) -> Result<ClaimRequest, ParseError> {
    with_session(body, |object, session_id| {
        let seq = field(object, "seq")?
            .as_u64()
            .ok_or_else(|| ApiError::malformed("\"seq\" is not a whole number from 0."))?;
        Ok(ClaimRequest {
            session_id,
            seq,
            ct: bytes_field(object, "ct")?,
        })
    })
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// Handlers.

/// Seconds until `closes_at` (Unix seconds), 0 when closed.
fn closes_in(view: &View) -> i64 {
    if !view.open {
        return 0;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    view.closes_at.map_or(0, |at| at.saturating_sub(now).max(0))
}

/// `/v1/status`'s object (and each `/v1/events` event's data).
pub(crate) fn status_body(view: &View, serial: &str) -> Value {
    let mut body = json!({
        "v": VERSION,
        "serial": serial,
        "window": if view.open { "open" } else { "closed" },
        "closes_in": closes_in(view),
        "attempts_left": view.attempts_left,
        "phase": view.phase.as_str(),
    });
    if let Some(thing) = &view.thing_name {
        body["thing_name"] = json!(thing);
    }
    if let Some((code, message)) = &view.error {
        body["error"] = json!({ "code": code, "message": message });
    }
    body
}

/// The installer's page (agent/page/dist/index.html), gzip-compressed when iotd is built
/// (agent/build.rs), and the Content-Security-Policy that allows its one inline script and
/// style by their hashes, and nothing else.
static PAGE_GZIP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/page.html.gz"));
const PAGE_CSP: &str = include_str!(concat!(env!("OUT_DIR"), "/page.csp"));

/// `GET /`: the page, on the page's interfaces only. It is sent as it is stored, gzip: every
/// browser accepts that; a client that says it does not gets `406` and a sentence.
async fn page(State(app): State<App>, request: HttpRequest) -> Response {
    let text = |status: StatusCode, message: &'static str| {
        let mut response = (status, message).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if app.transport == Transport::Tls {
        return text(
            StatusCode::NOT_FOUND,
            "The installer's page is served on plain HTTP on the gateway's direct links \
             (onboarding.page_interfaces); this HTTPS port is for iotctl onboard and apps.\n",
        );
    }
    if !accepts_gzip(request.headers()) {
        return text(
            StatusCode::NOT_ACCEPTABLE,
            "This page is sent gzip-compressed: open it in a web browser (or curl --compressed).\n",
        );
    }
    let mut response = Response::new(Body::from(PAGE_GZIP));
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_ENCODING, "gzip"),
        (header::CACHE_CONTROL, "no-store"),
        (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::VARY, "accept-encoding"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Whether `Accept-Encoding` allows gzip (`gzip` or `*`, without `q=0`).
fn accepts_gzip(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            // q=0, q=0.0, q=0.000: not acceptable (RFC 9110 §12.4.2).
            let refused = parts.any(|p| {
                p.strip_prefix("q=").is_some_and(|q| {
                    q.starts_with('0') && q.bytes().all(|b| b == b'0' || b == b'.')
                })
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// `GET /v1/form`: what the page needs before pairing, no secrets: the serial, the template
/// parameters the installer may supply, whether this connection came over a direct link, and
/// the status.
async fn form(State(app): State<App>) -> Response {
    let view = app.shared.view();
    let serial = &app.shared.record.serial;
    json_response(
        StatusCode::OK,
        &json!({
            "v": VERSION,
            "serial": serial,
            "parameters": app.shared.installer_parameters,
            "direct_link": app.transport == Transport::Plain(Link::Direct),
            "status": status_body(&view, serial),
        }),
    )
}

async fn status(State(app): State<App>) -> Response {
    let view = app.shared.view();
    json_response(
        StatusCode::OK,
        &status_body(&view, &app.shared.record.serial),
    )
}

async fn events(State(app): State<App>) -> Response {
    let view = app.shared.view.clone();
    let serial = app.shared.record.serial.clone();
    let stream = futures_util::stream::unfold(
        (view, serial, true),
        |(mut view, serial, first)| async move {
            if !first && view.changed().await.is_err() {
                return None;
            }
            let data = status_body(&view.borrow_and_update(), &serial).to_string();
            Some((
                Ok::<_, Infallible>(Event::default().data(data)),
                (view, serial, false),
            ))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(app.shared.limits.events_keep_alive))
        .into_response()
}

const PARAMS: &str = "/v1/pair/params";
const START: &str = "/v1/pair/start";
const FINISH: &str = "/v1/pair/finish";
const CLAIM: &str = "/v1/claim";

async fn pair_params(State(app): State<App>, request: HttpRequest) -> Response {
    let result = params_step(&app, request).await;
    app.reply(PARAMS, result)
}

async fn params_step(app: &App, request: HttpRequest) -> Result<Value, ApiError> {
    let shared = &app.shared;
    let taken = lock(&shared.bucket).take(&shared.limits, Instant::now());
    if let Err(wait) = taken {
        return Err(ApiError::rate_limited(wait));
    }
    let body = read_body(request, PARAMS_BODY_LIMIT, shared.limits.request_timeout).await?;
    let asked = parse_params(&body)?;
    let view = shared.view();
    if !view.open || view.attempts_left == 0 {
        return Err(ApiError::window_closed());
    }
    let rng = SystemRandom::new();
    let mut session_id = [0; SESSION_ID_LEN];
    let mut gateway_random = [0; RANDOM_LEN];
    rng.fill(&mut session_id)
        .and_then(|()| rng.fill(&mut gateway_random))
        .map_err(|_| ApiError::internal("its random number generator failed"))?;
    let binding = match (asked.binding, app.transport) {
        (BindingChoice::TlsServerEndPoint, Transport::Tls) => shared.binding,
        (BindingChoice::TlsServerEndPoint, Transport::Plain(_)) => {
            return Err(ApiError::malformed(
                "\"binding\" must be \"none\" on plain HTTP (the installer's page): there is no \
                 TLS certificate to bind to; use HTTPS for \"tls-server-end-point\".",
            ));
        }
        (BindingChoice::None, _) => Binding::None,
    };
    let record = &shared.record;
    let info = session::session_info(
        &ContextParams {
            client_random: &asked.client_random,
            gateway_random: &gateway_random,
            session_id: &session_id,
            salt: &record.salt,
            iterations: record.iterations,
            binding: &binding,
        },
        &asked.client_id,
        &record.serial,
    )
    .map_err(|_| ApiError::malformed("\"client_id\" is not a valid client id."))?;
    let verifier = Verifier::new(info, &record.verifier);
    {
        let mut slot = lock(&shared.session);
        let now = Instant::now();
        if slot.as_ref().is_some_and(|s| !s.expired(now)) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "busy",
                "Another installer is pairing with this gateway; try again in a minute or two.",
            ));
        }
        *slot = Some(Session {
            id: session_id,
            peer: app.peer,
            step: Step::Started(Box::new(verifier)),
            step_deadline: now + shared.limits.step_deadline,
            expires_at: now + shared.limits.session_lifetime,
        });
    }
    shared.rearm.notify_one();
    tracing::info!(peer = %app.peer, client_id = %asked.client_id, binding = binding.name(), "onboarding: a pairing session started");
    Ok(json!({
        "v": VERSION,
        "session_id": b64(&session_id),
        "gateway_random": b64(&gateway_random),
        "serial": record.serial,
        "suite": SUITE,
        "pbkdf": {
            "alg": PBKDF_ALG,
            "salt": b64(&record.salt),
            "iterations": record.iterations,
        },
        "attempts_left": view.attempts_left,
        "window_closes_in": closes_in(&view),
    }))
}

/// Parses a session request; a refusal ends the session it names.
fn parsed<T>(app: &App, parsed: Result<T, ParseError>) -> Result<T, ApiError> {
    parsed.map_err(|ParseError { session_id, error }| {
        if let Some(id) = session_id {
            app.shared.end(&id);
        }
        error
    })
}

async fn pair_start(State(app): State<App>, request: HttpRequest) -> Response {
    let result = start_step(&app, request).await;
    app.reply(START, result)
}

async fn start_step(app: &App, request: HttpRequest) -> Result<Value, ApiError> {
    let shared = &app.shared;
    let body = read_body(request, PARAMS_BODY_LIMIT, shared.limits.request_timeout).await?;
    let asked = parsed(app, parse_start(&body))?;
    let id = asked.session_id;
    // From here, any return but the last ends the session (`held` is dropped).
    let (Step::Started(verifier), held) = shared.take_step(
        &id,
        |s| matches!(s, Step::Started(_)),
        Step::Counting,
        START,
    )?
    else {
        return Err(ApiError::internal("its session state is inconsistent"));
    };
    // The share is checked, and share_v and confirm_v computed; nothing leaves before the
    // attempt is counted.
    let (confirming, response) = match verifier.respond(&asked.share_p) {
        Ok(answer) => answer,
        Err(Spake2PlusError::BadShare(problem)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_share",
                format!(
                    "The client's share was refused ({problem}); the session has ended. Pair \
                     again."
                ),
            ));
        }
        Err(_) => return Err(ApiError::internal("computing its share failed")),
    };
    let (reply, answer) = oneshot::channel();
    let counted = shared
        .ask(
            Request::CountAttempt {
                peer: app.peer,
                reply,
            },
            answer,
        )
        .await;
    let attempts_left = counted?;
    let VerifierResponse { share_v, confirm_v } = response;
    if !held.put(Step::Confirming(Box::new(confirming))) {
        return Err(ApiError::no_session());
    }
    tracing::info!(peer = %app.peer, attempts_left, "onboarding: an attempt was counted");
    Ok(json!({
        "v": VERSION,
        "share_v": b64(&share_v),
        "confirm_v": b64(&confirm_v),
        "attempts_left": attempts_left,
    }))
}

async fn pair_finish(State(app): State<App>, request: HttpRequest) -> Response {
    let result = finish_step(&app, request).await;
    app.reply(FINISH, result)
}

async fn finish_step(app: &App, request: HttpRequest) -> Result<Value, ApiError> {
    let shared = &app.shared;
    let body = read_body(request, PARAMS_BODY_LIMIT, shared.limits.request_timeout).await?;
    let asked = parsed(app, parse_finish(&body))?;
    let id = asked.session_id;
    // Checked under the lock: nothing else can happen to the session meanwhile, and it
    // leaves this step either paired or ended.
    {
        let mut slot = lock(&shared.session);
        let now = Instant::now();
        let session = match slot.as_mut() {
            Some(session) if same_id(&session.id, &id) && !session.expired(now) => session,
            Some(session) if same_id(&session.id, &id) => {
                *slot = None;
                drop(slot);
                shared.rearm.notify_one();
                return Err(ApiError::no_session());
            }
            _ => return Err(ApiError::no_session()),
        };
        let step = std::mem::replace(&mut session.step, Step::HandingOver);
        let Step::Confirming(confirming) = step else {
            let state = step.name();
            *slot = None;
            drop(slot);
            shared.rearm.notify_one();
            return Err(ApiError::wrong_state(FINISH, state));
        };
        let channel = confirming
            .finish(&asked.confirm_p)
            .map_err(|_| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "confirmation_failed",
                    "The client's confirmation is wrong (a wrong setup code, or the exchange was \
                     tampered with); the session has ended. Pair again.",
                )
            })
            .and_then(|shared_key| {
                Channel::new(Role::Gateway, shared_key, &id)
                    .map_err(|_| ApiError::internal("deriving the session keys failed"))
            });
        match channel {
            Ok(channel) => session.advance(Step::Paired(Box::new(channel)), &shared.limits),
            Err(error) => {
                *slot = None;
                drop(slot);
                shared.rearm.notify_one();
                return Err(error);
            }
        }
    }
    shared.rearm.notify_one();
    tracing::info!(peer = %app.peer, "onboarding: a client paired");
    let notified = tokio::time::timeout(
        shared.limits.core_timeout,
        shared.requests.send(Request::Paired { peer: app.peer }),
    )
    .await;
    if !matches!(notified, Ok(Ok(()))) {
        tracing::warn!(peer = %app.peer, "onboarding: the core was not told of the pairing");
    }
    Ok(json!({ "v": VERSION, "status": "paired" }))
}

async fn claim(State(app): State<App>, request: HttpRequest) -> Response {
    let result = claim_step(&app, request).await;
    app.reply(CLAIM, result)
}

async fn claim_step(app: &App, request: HttpRequest) -> Result<Value, ApiError> {
    let shared = &app.shared;
    let body = read_body(request, CLAIM_BODY_LIMIT, shared.limits.request_timeout).await?;
    let asked = parsed(app, parse_claim(&body))?;
    let id = asked.session_id;
    // Whatever happens, the session ends here (`held` is never put back).
    let (Step::Paired(mut channel), held) = shared.take_step(
        &id,
        |s| matches!(s, Step::Paired(_)),
        Step::HandingOver,
        CLAIM,
    )?
    else {
        return Err(ApiError::internal("its session state is inconsistent"));
    };
    let plaintext = match channel.open(MessageType::Claim, asked.seq, &asked.ct) {
        Ok(plaintext) => plaintext,
        Err(error) => {
            shared.unpaired();
            return Err(match error {
                SessionError::BadSequence { expected, got } => ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_sequence",
                    format!(
                        "The message's sequence number is {got}, and the next one is {expected}; \
                         the session has ended. Pair again."
                    ),
                ),
                SessionError::DecryptFailed => ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "decrypt_failed",
                    "The sealed claim did not open: it was not sealed for this session, or it \
                     was changed on the way. The session has ended; pair again.",
                ),
                _ => ApiError::internal("opening the message failed"),
            });
        }
    };
    let (reply, answer) = oneshot::channel();
    let handed = shared
        .ask(Request::HandOver { plaintext, reply }, answer)
        .await;
    drop(held);
    handed?;
    let ack = Zeroizing::new(json!({ "v": VERSION, "status": "accepted" }).to_string());
    let sealed = channel
        .seal(MessageType::ClaimAck, ack.as_bytes())
        .map_err(|_| ApiError::internal("sealing its answer failed"))?;
    tracing::info!(peer = %app.peer, "onboarding: a claim was handed over");
    Ok(json!({
        "v": VERSION,
        "seq": sealed.seq,
        "ct": b64(&sealed.ciphertext),
    }))
}

#[cfg(test)]
mod tests;
