//! The MQTT side of the fake: TLS listeners, one task per connection, subscriptions, policy
//! checks, message routing, and the shared state the HTTP side also reads.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::ca::{Authority, certificate_id};
use crate::clock::Clock;
use crate::faults::{Api, FaultAction, Faults};
use crate::mqtt::{self, ConnAckCode, DisconnectReason, Incoming, Outgoing, Version};
use crate::policy::{self, Action, Principal};
use crate::registry::{CertStatus, Registry};
use crate::template::Override;
use crate::tls::{self, ALPN_MQTT_CA, Sni};

/// Behaviour switches; defaults are AWS's behaviour where it is known.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub region: String,
    pub account: String,
    /// Validity of issued certificates at start; `None` is AWS's fixed end of 2049. Tests change
    /// it at run time (`Shared::set_cert_validity`, `PUT /_fake/certificate-validity`), also per
    /// template.
    pub cert_validity: Option<Duration>,
    pub require_sni: bool,
    /// MQTT 3.1.1 has no negative PUBACK; AWS closes the connection on a denied publish.
    pub disconnect_on_denied_publish: bool,
    pub single_use_tokens: bool,
    pub token_ttl_secs: i64,
    pub connect_gap: Option<Duration>,
    /// What RegisterThing does for a thing property that OverrideSettings does not mention.
    pub default_override: Override,
    pub hook_timeout: Duration,
    /// Requests per second above which an API answers 429 (for `Connect`: the account-wide
    /// CONNECT rate, refused in the CONNACK). None by default; AWS's are in `AWS_QUOTAS`.
    pub throttles: Vec<(Api, u32)>,
    /// Names the server certificate is for besides `localhost`, 127.0.0.1 and ::1 (DNS names
    /// or IP addresses): a second fake on another loopback address stands for another
    /// account's or region's endpoint.
    pub server_names: Vec<String>,
    /// Whether live connections of a certificate are closed when UpdateCertificate moves it out
    /// of ACTIVE (INACTIVE, REVOKED). AWS documents it for UpdateCertificate: "Within a few
    /// minutes of updating a certificate from the ACTIVE state to any other state, AWS IoT
    /// disconnects all devices that used that certificate to connect." The fake closes them at
    /// once (MQTT 5: DISCONNECT 0x87 Not authorized); `false` keeps them, for a test of the
    /// minutes in between (new CONNECTs are refused either way).
    pub disconnect_on_certificate_deactivation: bool,
    /// Whether a live connection is closed when its certificate's notAfter passes (on the
    /// fake's clock, `/_fake/clock` included). AWS documents no such thing: it checks validity
    /// in the TLS handshake, and nothing we know of says it drops a session whose certificate
    /// expires during it, so the default keeps the session (a device finds out at its next
    /// CONNECT). `true` closes it (MQTT 5: DISCONNECT 0x87), for agents that must cope with
    /// either. Trusted-user claims are closed at expiry regardless (AWS docs).
    pub disconnect_on_certificate_expiry: bool,
}

/// AWS's published defaults (archived quota table): RegisterThing 10/s,
/// CreateCertificateFromCsr 15/s, CONNECT 500/s per account. The current MQTT fleet
/// provisioning rates are not published where we could read them: configurable, not asserted.
pub const AWS_QUOTAS: [(Api, u32); 3] = [
    (Api::RegisterThing, 10),
    (Api::CreateCertificateFromCsr, 15),
    (Api::Connect, 500),
];

impl Settings {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            region: "us-east-1".to_owned(),
            account: "123456789012".to_owned(),
            cert_validity: None,
            require_sni: true,
            disconnect_on_denied_publish: true,
            single_use_tokens: true,
            token_ttl_secs: 3600,
            connect_gap: Some(Duration::from_secs(1)),
            default_override: Override::Replace,
            hook_timeout: Duration::from_secs(5),
            throttles: Vec::new(),
            server_names: Vec::new(),
            disconnect_on_certificate_deactivation: true,
            disconnect_on_certificate_expiry: false,
        }
    }

    pub fn arn(&self, resource: &str) -> String {
        format!("arn:aws:iot:{}:{}:{resource}", self.region, self.account)
    }
}

/// What a connection task is told to do by others.
#[derive(Debug)]
pub enum Control {
    Deliver {
        topic: String,
        payload: Bytes,
        qos: u8,
    },
    Close(DisconnectReason),
    /// Close with this reason, saying why in the message log.
    CloseBecause(DisconnectReason, String),
}

/// A connected client, as the rest of the fake sees it.
#[derive(Debug)]
pub struct Session {
    pub conn_id: u64,
    pub client_id: String,
    pub cert_id: String,
    pub version: Version,
    pub remote: SocketAddr,
    pub alpn: bool,
    pub connected_at: i64,
    pub subscriptions: Mutex<Vec<(String, u8)>>,
    tx: mpsc::UnboundedSender<Control>,
}

impl Session {
    pub fn send(&self, control: Control) -> bool {
        self.tx.send(control).is_ok()
    }

    fn subscribed_qos(&self, topic: &str) -> Option<u8> {
        lock(&self.subscriptions)
            .iter()
            .filter(|(f, _)| mqtt::topic_matches(topic, f))
            .map(|(_, q)| *q)
            .max()
    }
}

/// Certificate validity set at run time: for the account, and per provisioning template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validity {
    /// `None`: AWS's fixed 2049-12-31T23:59:59Z.
    pub account: Option<Duration>,
    /// Per template, over `account`: certificates created on a connection whose certificate
    /// belongs to the template (see `Shared::caller_template`). `None` here is 2049 too.
    pub templates: std::collections::BTreeMap<String, Option<Duration>>,
}

/// One entry of the message log (`/_fake/messages`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    pub seq: u64,
    pub time_ms: u128,
    pub kind: &'static str,
    pub client_id: String,
    pub conn_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

const LOG_CAPACITY: usize = 50_000;

/// State shared by the MQTT and HTTP sides.
pub struct Shared {
    pub settings: Settings,
    pub clock: Arc<Clock>,
    pub ca: Authority,
    registry: Mutex<Registry>,
    dirty: Notify,
    pub sessions: Mutex<HashMap<String, Arc<Session>>>,
    pub faults: Mutex<Faults>,
    /// What `jobs::notify_thing` last pushed per thing, so that it pushes only changes.
    pub job_pushes: Mutex<HashMap<String, crate::jobs::Pushed>>,
    /// Validity of the certificates issued from now on (starts as `settings.cert_validity`).
    pub validity: Mutex<Validity>,
    log: Mutex<VecDeque<LogEntry>>,
    log_seq: AtomicU64,
    /// The sequence number of the newest log entry, for waiters (tests, long polls).
    log_watch: tokio::sync::watch::Sender<u64>,
    next_conn: AtomicU64,
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Locks a mutex, recovering from poisoning: a panicked connection task must not take the
/// whole fake down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn payload_text(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(s) => s.to_owned(),
        Err(_) => {
            use base64::Engine;
            format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(payload)
            )
        }
    }
}

impl Shared {
    pub fn new(settings: Settings, clock: Arc<Clock>, ca: Authority, registry: Registry) -> Self {
        let mut faults = Faults::new(settings.connect_gap);
        for (api, per_second) in &settings.throttles {
            faults.set_throttle(*api, Some(*per_second));
        }
        let validity = Validity {
            account: settings.cert_validity,
            templates: Default::default(),
        };
        Self {
            settings,
            clock,
            ca,
            registry: Mutex::new(registry),
            dirty: Notify::new(),
            sessions: Mutex::new(HashMap::new()),
            faults: Mutex::new(faults),
            job_pushes: Mutex::new(HashMap::new()),
            validity: Mutex::new(validity),
            log: Mutex::new(VecDeque::new()),
            log_seq: AtomicU64::new(1),
            log_watch: tokio::sync::watch::Sender::new(0),
            next_conn: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
        }
    }

    /// Reads the registry (after the lazy sweep of expired tokens and claims).
    pub fn read<R>(&self, f: impl FnOnce(&Registry) -> R) -> R {
        let mut reg = lock(&self.registry);
        let timed_out = reg.sweep(self.clock.now());
        let out = f(&reg);
        drop(reg);
        self.after_sweep(&timed_out);
        out
    }

    /// Changes the registry and schedules a write to disk.
    pub fn write<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut reg = lock(&self.registry);
        let timed_out = reg.sweep(self.clock.now());
        let out = f(&mut reg);
        drop(reg);
        self.dirty.notify_one();
        self.after_sweep(&timed_out);
        out
    }

    /// Things whose job executions timed out in a sweep get their notifications, outside the
    /// registry lock (notify_thing reads the registry itself).
    fn after_sweep(&self, timed_out: &[String]) {
        if timed_out.is_empty() {
            return;
        }
        self.dirty.notify_one();
        for thing in timed_out {
            crate::jobs::notify_thing(self, thing);
        }
    }

    /// Serialises the registry for the persister.
    pub fn snapshot(&self) -> Result<String, serde_json::Error> {
        let mut reg = lock(&self.registry);
        reg.clock_offset = self.clock.offset();
        serde_json::to_string_pretty(&*reg)
    }

    /// Writes the registry whenever it changes, coalescing bursts; returns at shutdown after a
    /// final write.
    pub async fn persist_loop(self: Arc<Self>) {
        let path = self.settings.state_dir.join("registry.json");
        loop {
            let stop = tokio::select! {
                () = self.dirty.notified() => false,
                () = self.shutdown.cancelled() => true,
            };
            if !stop {
                // Coalesce a burst of changes (a provisioning flow makes several) into one write.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            match self.snapshot() {
                Ok(text) => {
                    let target = path.clone();
                    let result = tokio::task::spawn_blocking(move || {
                        crate::ca::write_file(&target, text.as_bytes(), 0o600)
                    })
                    .await;
                    if let Ok(Err(e)) = result {
                        tracing::error!("writing registry {}: {e}", path.display());
                    }
                }
                Err(e) => tracing::error!("serialising the registry: {e}"),
            }
            if stop {
                return;
            }
        }
    }

    pub fn log_event(
        &self,
        kind: &'static str,
        session: (&str, u64),
        topic: Option<&str>,
        payload: Option<&[u8]>,
        detail: Option<String>,
    ) {
        let entry = LogEntry {
            seq: self.log_seq.fetch_add(1, Ordering::Relaxed),
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            kind,
            client_id: session.0.to_owned(),
            conn_id: session.1,
            topic: topic.map(str::to_owned),
            payload: payload.map(payload_text),
            detail,
        };
        let seq = entry.seq;
        let mut log = lock(&self.log);
        if log.len() >= LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(entry);
        drop(log);
        self.log_watch.send_replace(seq);
    }

    /// Changes whenever an entry is added to the message log.
    pub fn log_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.log_watch.subscribe()
    }

    /// Waits until the log holds an entry for which `matches` is true, up to `timeout`.
    pub async fn wait_for_log(
        &self,
        timeout: Duration,
        matches: impl Fn(&LogEntry) -> bool,
    ) -> Option<LogEntry> {
        let mut updates = self.log_updates();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Mark the current value seen before looking, so no entry slips between the two.
            updates.borrow_and_update();
            if let Some(found) = lock(&self.log).iter().find(|e| matches(e)) {
                return Some(found.clone());
            }
            if tokio::time::timeout_at(deadline, updates.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    pub fn log_entries(&self) -> Vec<LogEntry> {
        lock(&self.log).iter().cloned().collect()
    }

    pub fn clear_log(&self) {
        lock(&self.log).clear();
    }

    /// Whether the certificate `cert_id`, connected as `client_id`, may do `action` on `resource`
    /// (an ARN). Trusted-user claims carry implicit permissions for one template's topics.
    pub fn authorize(
        &self,
        cert_id: &str,
        client_id: &str,
        action: Action,
        resource: &str,
    ) -> bool {
        let s = &self.settings;
        self.read(|reg| {
            let Some(cert) = reg.certificates.get(cert_id) else {
                return false;
            };
            if let Some(template) = &cert.temporary_claim_for {
                return temporary_claim_allows(s, template, action, resource);
            }
            let thing = cert
                .things
                .contains(client_id)
                .then(|| reg.things.get(client_id))
                .flatten();
            let principal = Principal {
                region: &s.region,
                account: &s.account,
                client_id,
                thing_name: thing.map(|t| t.name.as_str()),
                thing_attributes: thing.map(|t| &t.attributes),
                common_name: None,
            };
            let docs = cert
                .policies
                .iter()
                .filter_map(|name| reg.policies.get(name))
                .filter_map(|p| p.parsed.as_ref());
            policy::is_allowed(docs, action, resource, &principal)
        })
    }

    /// Sends a message to every connection subscribed to `topic` that may receive it.
    pub fn route(&self, topic: &str, payload: &Bytes) -> usize {
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        let resource = policy::topic_arn(&self.settings.region, &self.settings.account, topic);
        let mut delivered = 0;
        for s in sessions {
            if let Some(qos) = s.subscribed_qos(topic)
                && self.authorize(&s.cert_id, &s.client_id, Action::Receive, &resource)
            {
                self.log_event(
                    "out",
                    (&s.client_id, s.conn_id),
                    Some(topic),
                    Some(payload),
                    None,
                );
                if s.send(Control::Deliver {
                    topic: topic.to_owned(),
                    payload: payload.clone(),
                    qos: qos.min(1),
                }) {
                    delivered += 1;
                }
            }
        }
        delivered
    }

    /// Sends a reply of a request-response API to the requesting connection only. Fleet
    /// provisioning replies need a subscription; Jobs replies are sent regardless (AWS docs).
    pub fn reply(
        &self,
        session: &Session,
        topic: &str,
        payload: Bytes,
        needs_subscription: bool,
    ) -> bool {
        let qos = match session.subscribed_qos(topic) {
            Some(q) => q.min(1),
            None if needs_subscription => {
                self.log_event(
                    "dropped",
                    (&session.client_id, session.conn_id),
                    Some(topic),
                    Some(&payload),
                    Some("not subscribed to the reply topic".to_owned()),
                );
                return false;
            }
            None => 0,
        };
        let resource = policy::topic_arn(&self.settings.region, &self.settings.account, topic);
        if !self.authorize(
            &session.cert_id,
            &session.client_id,
            Action::Receive,
            &resource,
        ) {
            self.log_event(
                "dropped",
                (&session.client_id, session.conn_id),
                Some(topic),
                Some(&payload),
                Some("iot:Receive denied".to_owned()),
            );
            return false;
        }
        self.log_event(
            "out",
            (&session.client_id, session.conn_id),
            Some(topic),
            Some(&payload),
            None,
        );
        session.send(Control::Deliver {
            topic: topic.to_owned(),
            payload,
            qos,
        })
    }

    /// Closes the connection of `client_id`, if any.
    pub fn disconnect(&self, client_id: &str) -> bool {
        let session = lock(&self.sessions).get(client_id).cloned();
        session.is_some_and(|s| s.send(Control::Close(DisconnectReason::AdministrativeAction)))
    }

    /// Closes every live connection authenticated with `cert_id` (MQTT 5: DISCONNECT 0x87),
    /// logging `why`; returns how many there were.
    pub fn disconnect_certificate(&self, cert_id: &str, why: &str) -> usize {
        let sessions: Vec<_> = lock(&self.sessions)
            .values()
            .filter(|s| s.cert_id == cert_id)
            .cloned()
            .collect();
        sessions
            .iter()
            .filter(|s| {
                s.send(Control::CloseBecause(
                    DisconnectReason::NotAuthorized,
                    why.to_owned(),
                ))
            })
            .count()
    }

    /// notAfter of a certificate issued now by the account's default validity (without a
    /// template's; see `issued_not_after_for`).
    pub fn issued_not_after(&self, now: i64) -> i64 {
        self.issued_not_after_for(now, None)
    }

    /// notAfter of a certificate issued now for a caller of `template`: the template's validity
    /// if one is set, else the account's; `None` (either) is AWS's end of 2049.
    pub fn issued_not_after_for(&self, now: i64, template: Option<&str>) -> i64 {
        let validity = {
            let v = lock(&self.validity);
            template
                .and_then(|t| v.templates.get(t).copied())
                .unwrap_or(v.account)
        };
        match validity {
            Some(d) => now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2)),
            None => crate::ca::AWS_DEFAULT_NOT_AFTER,
        }
    }

    /// Sets the validity of certificates issued from now on, account-wide (`None`: AWS's 2049).
    pub fn set_cert_validity(&self, validity: Option<Duration>) {
        lock(&self.validity).account = validity;
    }

    /// Sets (`Some`) or removes (`None`) one template's validity; `Some(None)` is AWS's 2049
    /// for that template whatever the account's is.
    pub fn set_template_cert_validity(&self, template: &str, validity: Option<Option<Duration>>) {
        let mut v = lock(&self.validity);
        match validity {
            Some(d) => {
                v.templates.insert(template.to_owned(), d);
            }
            None => {
                v.templates.remove(template);
            }
        }
    }

    /// The provisioning template a connection's certificate belongs to, which picks a
    /// template's certificate validity for what that connection asks to be issued (the create
    /// APIs name no template; AWS decides validity account-wide, with a certificate provider):
    /// a trusted-user claim's template, the template of a `--claim`, or the template whose
    /// RegisterThing registered the certificate (a device rotating through its template).
    pub fn caller_template(&self, cert_id: &str) -> Option<String> {
        self.read(|reg| {
            let c = reg.certificates.get(cert_id)?;
            c.temporary_claim_for.clone().or_else(|| c.template.clone())
        })
    }
}

/// The 18 topics of one template's fleet provisioning API: all a trusted-user claim may use.
fn temporary_claim_allows(s: &Settings, template: &str, action: Action, resource: &str) -> bool {
    if action == Action::Connect {
        return true;
    }
    let prefix = match action {
        Action::Subscribe => s.arn("topicfilter/"),
        _ => s.arn("topic/"),
    };
    let Some(topic) = resource.strip_prefix(&prefix) else {
        return false;
    };
    let base = [
        "$aws/certificates/create/",
        "$aws/certificates/create-from-csr/",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain(std::iter::once(format!(
        "$aws/provisioning-templates/{template}/provision/"
    )));
    for b in base {
        for fmt in ["json", "cbor"] {
            let request = format!("{b}{fmt}");
            if topic == request
                || topic == format!("{request}/accepted")
                || topic == format!("{request}/rejected")
            {
                return true;
            }
        }
    }
    false
}

/// How long a client has from its TCP connection to a complete CONNECT: the ClientHello (read
/// for SNI), the TLS handshake and the CONNECT packet together. A connection that never starts
/// TLS, or stalls at any point before CONNECT, is closed then, so idle sockets cannot pile up.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// Accepts connections on one listener until shutdown.
pub async fn listen(shared: Arc<Shared>, listener: TcpListener, acceptor: TlsAcceptor, alpn: bool) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((tcp, remote)) => {
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    if let Err(reason) =
                        serve(shared.clone(), tcp, remote, acceptor, alpn, conn_id).await
                    {
                        tracing::debug!(%remote, conn_id, "connection ended: {reason}");
                        shared.log_event("refused", ("", conn_id), None, None, Some(reason));
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn wait_for_sni(tcp: &TcpStream) -> Sni {
    let mut buf = vec![0u8; 16 * 1024 + 5];
    // The ClientHello normally arrives in one segment; allow a little time for stragglers.
    for _ in 0..100 {
        let n = match tcp.peek(&mut buf).await {
            Ok(0) | Err(_) => return Sni::Unreadable,
            Ok(n) => n,
        };
        if let Some(sni) = tls::client_hello_sni(&buf[..n]) {
            return sni;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Sni::Unreadable
}

/// Keep-alive as AWS applies it: 0 or > 1200 s becomes 1200 s; 1..29 s becomes 30 s.
fn effective_keep_alive(requested: u16) -> u16 {
    match requested {
        0 | 1201.. => 1200,
        1..=29 => 30,
        k => k,
    }
}

type Tls = tokio_rustls::server::TlsStream<TcpStream>;

async fn write_packet(
    stream: &mut Tls,
    version: Version,
    packet: &Outgoing,
) -> Result<bool, String> {
    let mut out = BytesMut::new();
    let encoded = mqtt::encode(version, packet, &mut out).map_err(|e| e.to_string())?;
    if encoded {
        stream
            .write_all(&out)
            .await
            .map_err(|e| format!("writing to the client: {e}"))?;
    }
    Ok(encoded)
}

async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    alpn_listener: bool,
    conn_id: u64,
) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + CONNECT_DEADLINE;
    let late = |what: &str| {
        format!(
            "{what} within {} s of connecting",
            CONNECT_DEADLINE.as_secs()
        )
    };
    if shared.settings.require_sni {
        let sni = tokio::time::timeout_at(deadline, wait_for_sni(&tcp))
            .await
            .map_err(|_| late("no TLS ClientHello"))?;
        if sni == Sni::Absent {
            return Err("TLS ClientHello without SNI (AWS IoT requires it)".to_owned());
        }
    }
    let mut stream = tokio::time::timeout_at(deadline, acceptor.accept(tcp))
        .await
        .map_err(|_| late("no complete TLS handshake"))?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let (_, conn) = stream.get_ref();
    if alpn_listener && conn.alpn_protocol() != Some(ALPN_MQTT_CA) {
        return Err("no ALPN x-amzn-mqtt-ca on the port-443 listener".to_owned());
    }
    let cert_id = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| certificate_id(c))
        .ok_or_else(|| "no client certificate".to_owned())?;

    // CONNECT must come first, before the deadline that the handshake had too.
    let mut buf = BytesMut::with_capacity(4096);
    let (version, info) = loop {
        match mqtt::decode(None, &mut buf).map_err(|e| e.to_string())? {
            Some((v, Incoming::Connect(info))) => break (v, info),
            Some(_) => return Err("first packet is not CONNECT".to_owned()),
            None => {}
        }
        let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf))
            .await
            .map_err(|_| late("no CONNECT"))?
            .map_err(|e| format!("reading CONNECT: {e}"))?;
        if n == 0 {
            return Err("closed before CONNECT".to_owned());
        }
    };
    let client_id = info.client_id.clone();

    let refusal = check_connect(&shared, &info, &cert_id);
    if let Some((code, why)) = refusal {
        shared.log_event(
            "refused",
            (&client_id, conn_id),
            None,
            None,
            Some(why.clone()),
        );
        // A throttled MQTT 3.1.1 CONNECT is just closed, as AWS does; MQTT 5 gets a reason code.
        if !(code == ConnAckCode::RateExceeded && version == Version::V311) {
            let _ = write_packet(
                &mut stream,
                version,
                &Outgoing::ConnAck {
                    code,
                    server_keep_alive: None,
                },
            )
            .await;
        }
        let _ = stream.shutdown().await;
        return Err(why);
    }

    let (tx, mut rx) = mpsc::unbounded_channel();
    let session = Arc::new(Session {
        conn_id,
        client_id: client_id.clone(),
        cert_id: cert_id.clone(),
        version,
        remote,
        alpn: alpn_listener,
        connected_at: shared.clock.now(),
        subscriptions: Mutex::new(Vec::new()),
        tx,
    });
    let previous = lock(&shared.sessions).insert(client_id.clone(), session.clone());
    if let Some(old) = previous {
        old.send(Control::Close(DisconnectReason::SessionTakenOver));
    }
    let keep_alive = effective_keep_alive(info.keep_alive);
    let server_keep_alive =
        (keep_alive != info.keep_alive && version == Version::V5).then_some(keep_alive);
    write_packet(
        &mut stream,
        version,
        &Outgoing::ConnAck {
            code: ConnAckCode::Accepted,
            server_keep_alive,
        },
    )
    .await?;
    shared.log_event(
        "connect",
        (&client_id, conn_id),
        None,
        None,
        Some(format!(
            "MQTT {} certificate {cert_id}{}",
            version.as_str(),
            if alpn_listener { " via ALPN" } else { "" }
        )),
    );

    let (api_tx, api_rx) = mpsc::unbounded_channel();
    let worker = tokio::spawn(api_worker(shared.clone(), session.clone(), api_rx));
    let expiry = session_expiry(&shared, &cert_id);

    let result = connection_loop(
        &shared,
        &session,
        &mut stream,
        &mut buf,
        &mut rx,
        &api_tx,
        keep_alive,
        expiry,
    )
    .await;
    worker.abort();
    {
        let mut sessions = lock(&shared.sessions);
        if sessions
            .get(&client_id)
            .is_some_and(|s| s.conn_id == conn_id)
        {
            sessions.remove(&client_id);
        }
    }
    let _ = stream.shutdown().await;
    shared.log_event(
        "disconnect",
        (&client_id, conn_id),
        None,
        None,
        Some(
            result
                .clone()
                .err()
                .unwrap_or_else(|| "client DISCONNECT".to_owned()),
        ),
    );
    Ok(())
}

fn check_connect(
    shared: &Shared,
    info: &mqtt::ConnectInfo,
    cert_id: &str,
) -> Option<(ConnAckCode, String)> {
    let client_id = &info.client_id;
    if client_id.is_empty() || client_id.len() > 128 {
        return Some((
            ConnAckCode::BadClientId,
            format!("client id {client_id:?} must be 1 to 128 bytes"),
        ));
    }
    if let Some(FaultAction::Reject {
        status_code,
        error_code,
        error_message,
    }) = lock(&shared.faults).take_for(Api::Connect, client_id, Some(cert_id))
    {
        // What an MQTT client can be told: not authorized (a certificate or policy refusal),
        // over a rate (closed without CONNACK on MQTT 3.1.1, as AWS does), or unavailable.
        let code = match status_code {
            401 | 403 => ConnAckCode::NotAuthorized,
            429 => ConnAckCode::RateExceeded,
            _ => ConnAckCode::ServerUnavailable,
        };
        return Some((
            code,
            format!("injected fault: {status_code} {error_code}: {error_message}"),
        ));
    }
    if !lock(&shared.faults).admit_connect(client_id) {
        return Some((
            ConnAckCode::RateExceeded,
            format!("more than one CONNECT per second for client id {client_id}"),
        ));
    }
    // The account-wide CONNECT rate (AWS: 500/s, adjustable), set like the APIs' throttles.
    if !lock(&shared.faults).admit(Api::Connect) {
        return Some((
            ConnAckCode::RateExceeded,
            "over the account's CONNECT rate".to_owned(),
        ));
    }
    let status = shared.read(|reg| reg.certificates.get(cert_id).map(|c| c.status));
    match status {
        None => {
            return Some((
                ConnAckCode::NotAuthorized,
                format!("certificate {cert_id} is not registered"),
            ));
        }
        Some(CertStatus::Active) => {}
        Some(other) => {
            return Some((
                ConnAckCode::NotAuthorized,
                format!("certificate {cert_id} is {}", other.as_str()),
            ));
        }
    }
    let resource = policy::client_arn(&shared.settings.region, &shared.settings.account, client_id);
    if !shared.authorize(cert_id, client_id, Action::Connect, &resource) {
        return Some((
            ConnAckCode::NotAuthorized,
            format!("iot:Connect denied for {resource}"),
        ));
    }
    None
}

/// When (on the fake's clock) and why a session of `cert_id` is closed by its certificate's
/// expiry: always for a trusted-user claim (at its notAfter, AWS docs), and once past notAfter
/// for any other certificate only with `disconnect_on_certificate_expiry`.
fn session_expiry(shared: &Shared, cert_id: &str) -> Option<(i64, String)> {
    let expire_all = shared.settings.disconnect_on_certificate_expiry;
    shared.read(|reg| {
        let c = reg.certificates.get(cert_id)?;
        if c.temporary_claim_for.is_some() {
            Some((
                c.not_after,
                "the temporary provisioning claim expired".to_owned(),
            ))
        } else if expire_all {
            Some((
                c.not_after.saturating_add(1),
                format!(
                    "certificate {cert_id} expired at {} (--disconnect-on-certificate-expiry)",
                    crate::clock::rfc3339(c.not_after)
                ),
            ))
        } else {
            None
        }
    })
}

/// What injected faults and throttles decide for one API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Do the work; `drop_reply` keeps the answer from the device.
    Serve { drop_reply: bool },
    /// Answer with this error instead of doing the work.
    Reject {
        status_code: u16,
        error_code: String,
        error_message: String,
    },
    /// Over the API's rate: answer with the API's throttling error.
    Throttled,
    /// The connection was closed instead; nothing was done.
    Closed,
}

/// Applies the fault rules and throttle of `api` to one request of `session` (waiting out an
/// injected delay), so that every request-response API treats faults alike.
pub async fn fault_gate(shared: &Shared, session: &Session, api: Api) -> Gate {
    let fault = lock(&shared.faults).take_for(api, &session.client_id, Some(&session.cert_id));
    if let Some(FaultAction::Delay { delay_ms }) = &fault {
        tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
    }
    if fault == Some(FaultAction::Disconnect) {
        session.send(Control::Close(DisconnectReason::AdministrativeAction));
        return Gate::Closed;
    }
    if !lock(&shared.faults).admit(api) {
        return Gate::Throttled;
    }
    match fault {
        Some(FaultAction::Reject {
            status_code,
            error_code,
            error_message,
        }) => Gate::Reject {
            status_code,
            error_code,
            error_message,
        },
        Some(FaultAction::Drop) => Gate::Serve { drop_reply: true },
        Some(FaultAction::Delay { .. } | FaultAction::Disconnect) | None => {
            Gate::Serve { drop_reply: false }
        }
    }
}

/// A request to a request-response API, handled in order per connection.
#[derive(Debug)]
pub struct ApiRequest {
    pub topic: String,
    pub payload: Bytes,
}

#[allow(clippy::too_many_arguments)]
async fn connection_loop(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    stream: &mut Tls,
    buf: &mut BytesMut,
    rx: &mut mpsc::UnboundedReceiver<Control>,
    api_tx: &mpsc::UnboundedSender<ApiRequest>,
    keep_alive: u16,
    expiry: Option<(i64, String)>,
) -> Result<(), String> {
    let version = session.version;
    let idle_limit = Duration::from_millis(u64::from(keep_alive) * 1500);
    let mut deadline = tokio::time::Instant::now() + idle_limit;
    // On the fake's clock: moving it with /_fake/clock reaches this at once.
    let expired = async {
        match &expiry {
            Some((at, _)) => shared.clock.reached(*at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let mut next_pkid: u16 = 0;
    loop {
        // Handle every complete packet already buffered before waiting again.
        while let Some((_, packet)) = mqtt::decode(Some(version), buf).map_err(|e| e.to_string())? {
            if !handle_packet(shared, session, stream, packet, api_tx).await? {
                return Ok(());
            }
        }
        tokio::select! {
            read = stream.read_buf(buf) => {
                match read {
                    Ok(0) => return Err("closed without DISCONNECT".to_owned()),
                    Ok(_) => deadline = tokio::time::Instant::now() + idle_limit,
                    Err(e) => return Err(format!("reading from the client: {e}")),
                }
            }
            control = rx.recv() => match control {
                Some(Control::Deliver { topic, payload, qos }) => {
                    let pkid = if qos > 0 {
                        next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                        next_pkid
                    } else { 0 };
                    write_packet(stream, version, &Outgoing::Publish { topic, payload, qos, pkid }).await?;
                }
                Some(Control::Close(reason)) => {
                    let _ = write_packet(stream, version, &Outgoing::Disconnect(reason)).await;
                    return Err(format!("closed by the server: {reason:?}"));
                }
                Some(Control::CloseBecause(reason, why)) => {
                    let _ = write_packet(stream, version, &Outgoing::Disconnect(reason)).await;
                    return Err(format!("closed by the server: {reason:?}: {why}"));
                }
                None => return Err("session dropped".to_owned()),
            },
            () = tokio::time::sleep_until(deadline) => {
                let _ = write_packet(stream, version, &Outgoing::Disconnect(DisconnectReason::KeepAliveTimeout)).await;
                return Err(format!("no packet within 1.5 x keep-alive ({keep_alive} s)"));
            }
            () = &mut expired => {
                let _ = write_packet(stream, version, &Outgoing::Disconnect(DisconnectReason::NotAuthorized)).await;
                let why = expiry.as_ref().map(|(_, why)| why.clone()).unwrap_or_default();
                return Err(why);
            }
            () = shared.shutdown.cancelled() => {
                let _ = write_packet(stream, version, &Outgoing::Disconnect(DisconnectReason::AdministrativeAction)).await;
                return Err("server shutting down".to_owned());
            }
        }
    }
}

/// Handles one packet; `Ok(false)` ends the connection cleanly.
async fn handle_packet(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    stream: &mut Tls,
    packet: Incoming,
    api_tx: &mpsc::UnboundedSender<ApiRequest>,
) -> Result<bool, String> {
    let version = session.version;
    let who = (session.client_id.as_str(), session.conn_id);
    match packet {
        Incoming::Publish {
            topic,
            payload,
            qos,
            pkid,
            retain,
        } => {
            if qos > 1 {
                // AWS IoT sends no PUBACK/PUBREC for QoS 2 and drops the message.
                shared.log_event(
                    "dropped",
                    who,
                    Some(&topic),
                    Some(&payload),
                    Some("QoS 2 is not supported".to_owned()),
                );
                return Ok(true);
            }
            if !mqtt::valid_topic(&topic) {
                return Err(format!("PUBLISH to invalid topic {topic:?}"));
            }
            let resource =
                policy::topic_arn(&shared.settings.region, &shared.settings.account, &topic);
            let action = if retain {
                Action::RetainPublish
            } else {
                Action::Publish
            };
            let allowed = shared.authorize(
                &session.cert_id,
                &session.client_id,
                Action::Publish,
                &resource,
            ) && (action == Action::Publish
                || shared.authorize(&session.cert_id, &session.client_id, action, &resource));
            if !allowed {
                shared.log_event(
                    "denied",
                    who,
                    Some(&topic),
                    Some(&payload),
                    Some("iot:Publish denied".to_owned()),
                );
                if version == Version::V5 {
                    if qos == 1 {
                        write_packet(
                            stream,
                            version,
                            &Outgoing::PubAck {
                                pkid,
                                not_authorized: true,
                            },
                        )
                        .await?;
                    }
                    return Ok(true);
                }
                if shared.settings.disconnect_on_denied_publish {
                    return Err(format!(
                        "iot:Publish denied on {topic}; connection closed as AWS does on MQTT 3.1.1"
                    ));
                }
                return Ok(true);
            }
            shared.log_event("in", who, Some(&topic), Some(&payload), None);
            if qos == 1 {
                write_packet(
                    stream,
                    version,
                    &Outgoing::PubAck {
                        pkid,
                        not_authorized: false,
                    },
                )
                .await?;
            }
            if crate::provisioning::is_api_topic(&topic) || crate::jobs::is_api_topic(&topic) {
                let _ = api_tx.send(ApiRequest { topic, payload });
            } else if topic.starts_with("$aws/certificates/")
                || topic.starts_with("$aws/provisioning-templates/")
            {
                // Reply topics and unknown reserved topics: AWS ignores device publishes there.
            } else {
                shared.route(&topic, &payload);
            }
            Ok(true)
        }
        Incoming::Subscribe { pkid, filters } => {
            if filters.iter().any(|(_, q)| *q > 1) {
                // AWS IoT does not answer a QoS 2 subscription at all.
                shared.log_event(
                    "dropped",
                    who,
                    None,
                    None,
                    Some("SUBSCRIBE with QoS 2 is not supported".to_owned()),
                );
                return Ok(true);
            }
            let mut codes = Vec::with_capacity(filters.len());
            for (filter, qos) in filters {
                let resource = policy::topic_filter_arn(
                    &shared.settings.region,
                    &shared.settings.account,
                    &filter,
                );
                let ok = mqtt::valid_filter(&filter)
                    && shared.authorize(
                        &session.cert_id,
                        &session.client_id,
                        Action::Subscribe,
                        &resource,
                    );
                shared.log_event(
                    if ok { "subscribe" } else { "denied" },
                    who,
                    Some(&filter),
                    None,
                    (!ok).then(|| "iot:Subscribe denied".to_owned()),
                );
                if ok {
                    let mut subs = lock(&session.subscriptions);
                    subs.retain(|(f, _)| *f != filter);
                    subs.push((filter, qos));
                    codes.push(Some(qos));
                } else {
                    codes.push(None);
                }
            }
            write_packet(stream, version, &Outgoing::SubAck { pkid, codes }).await?;
            Ok(true)
        }
        Incoming::Unsubscribe { pkid, filters } => {
            let count = filters.len();
            lock(&session.subscriptions).retain(|(f, _)| !filters.contains(f));
            write_packet(stream, version, &Outgoing::UnsubAck { pkid, count }).await?;
            Ok(true)
        }
        Incoming::PingReq => {
            write_packet(stream, version, &Outgoing::PingResp).await?;
            Ok(true)
        }
        Incoming::Disconnect => Ok(false),
        Incoming::Connect(_) => Err("a second CONNECT on one connection".to_owned()),
        Incoming::PubAck | Incoming::Ignored(_) => Ok(true),
    }
}

/// Serves one connection's API requests in order, so that replies come back in request order
/// (the provisioning API has no correlation token).
async fn api_worker(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut rx: mpsc::UnboundedReceiver<ApiRequest>,
) {
    while let Some(req) = rx.recv().await {
        if crate::provisioning::is_api_topic(&req.topic) {
            crate::provisioning::serve(&shared, &session, &req).await;
        } else {
            crate::jobs::serve(&shared, &session, &req).await;
        }
    }
}
