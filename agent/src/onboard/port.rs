//! What the onboarding server and the core say to each other. The server owns the HTTP side
//! (sessions, SPAKE2+, sealing); the core owns the window, the attempt counter (persisted in
//! state.json) and the claim. The server never touches the state itself: it asks through
//! `Request`s and reads the `View`.

use tokio::sync::{mpsc, oneshot, watch};
use zeroize::Zeroizing;

/// Where onboarding stands, as `GET /v1/status` and `/v1/events` show it (§5.4.1 of the
/// profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    Paired,
    ClaimReceived,
    ConnectingWithClaim,
    CertificateIssued,
    ThingRegistered,
    Connected,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Paired => "paired",
            Phase::ClaimReceived => "claim-received",
            Phase::ConnectingWithClaim => "connecting-with-claim",
            Phase::CertificateIssued => "certificate-issued",
            Phase::ThingRegistered => "thing-registered",
            Phase::Connected => "connected",
            Phase::Failed => "failed",
        }
    }
}

/// The window and the progress, as the core publishes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Whether pairing is allowed now.
    pub open: bool,
    /// When the window closes (Unix seconds), while open.
    pub closes_at: Option<i64>,
    /// Counted attempts left in this window (20 at most).
    pub attempts_left: u32,
    pub phase: Phase,
    /// The thing, once registered.
    pub thing_name: Option<String>,
    /// Why onboarding failed (`phase` is `Failed`): a stable code and a sentence for the
    /// installer. No secrets.
    pub error: Option<(String, String)>,
}

impl Default for View {
    fn default() -> Self {
        Self {
            open: false,
            closes_at: None,
            attempts_left: 0,
            phase: Phase::Waiting,
            thing_name: None,
            error: None,
        }
    }
}

/// Why the core refused a request of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The profile's error code (`window_closed`, `claim_invalid`, …).
    pub code: &'static str,
    /// The HTTP status that goes with it.
    pub status: u16,
    /// A sentence for the installer.
    pub message: String,
}

/// The server's requests to the core, each with its answer.
#[derive(Debug)]
pub enum Request {
    /// A `/v1/pair/start` is about to send its `confirm_v`: count the attempt and persist the
    /// count (fsync) before answering. The answer is the attempts left after this one, or
    /// `window_closed`.
    CountAttempt {
        peer: std::net::SocketAddr,
        reply: oneshot::Sender<Result<u32, Refusal>>,
    },
    /// A client proved it knows the code (`/v1/pair/finish` succeeded).
    Paired { peer: std::net::SocketAddr },
    /// The paired session ended without handing over a claim (it expired, or its `/v1/claim`
    /// did not open): the installer's client is no longer paired.
    Unpaired,
    /// The opened claim bundle (plaintext JSON): the core validates it and provisions with
    /// it at once. Answered once the claim is accepted or refused.
    HandOver {
        plaintext: Zeroizing<Vec<u8>>,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// The discovery task's news: whether the gateway is announced on the local network
    /// (DNS-SD through Avahi), in words for `iotctl onboarding status` ("announced as … on
    /// port 8443", "off: Avahi is not running").
    Discovery { detail: String },
}

/// The server's end.
#[derive(Debug, Clone)]
pub struct Port {
    pub requests: mpsc::Sender<Request>,
    pub view: watch::Receiver<View>,
}

/// The core's end: where requests arrive, and where the view is published.
#[derive(Debug)]
pub struct CoreEnd {
    pub requests: mpsc::Receiver<Request>,
    pub view: watch::Sender<View>,
}

impl Port {
    /// Both ends. The server has at most a few requests in flight (one handshake at a time).
    pub fn pair() -> (Port, CoreEnd) {
        let (requests_tx, requests) = mpsc::channel(4);
        let (view, view_rx) = watch::channel(View::default());
        (
            Port {
                requests: requests_tx,
                view: view_rx,
            },
            CoreEnd { requests, view },
        )
    }
}
