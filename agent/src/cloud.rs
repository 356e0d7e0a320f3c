//! One MQTT connection to AWS IoT (rumqttc over our rustls configuration), as the provisioning
//! steps and the production session use it: connect and wait for CONNACK, subscribe and wait
//! for SUBACK, publish a request and wait for its reply, notice when the connection ends.
//! Reconnecting is the caller's decision (with backoff), so every failure comes back here as an
//! `AgentError` that says what happened and what to do about it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use crate::error::{AgentError, ErrorCode, Retry};

/// Whose identity a connection uses: errors read differently for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The claim (with its notAfter, for the "claim expired" message). `by_clock`: refuse it
    /// without asking AWS once the gateway's clock is past notAfter. False for an installer's
    /// claim: it is minutes old by the installer's phone, and a gateway before NTP may be
    /// hours or years off, so AWS's answer is the one that counts (and is reported).
    Claim {
        not_after: i64,
        path: String,
        by_clock: bool,
    },
    /// The device's own certificate.
    Device { certificate_id: String },
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    /// Describes the server trust for error messages ("CA bundle /etc/iotd/ca.pem").
    pub trust: String,
}

/// Keeps CONNECTs of one client id at least a second apart (AWS throttles more). AWS counts
/// from a CONNECT's arrival, which is after our TCP and TLS handshakes: the second is counted
/// from the end of the previous attempt (its CONNACK, or its failure), so that a faster
/// handshake (a rotation's new key, a TPM that signs quicker) cannot bring two arrivals
/// closer than a second.
#[derive(Debug, Default)]
pub struct ConnectPacer {
    last: Mutex<HashMap<String, Instant>>,
}

impl ConnectPacer {
    /// The attempt of `client_id` that `wait` let go is over (answered, refused or failed).
    fn done(&self, client_id: &str) {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(client_id.to_owned(), Instant::now());
    }

    async fn wait(&self, client_id: &str) {
        let wait = {
            let last = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            last.get(client_id)
                .map(|t| Duration::from_secs(1).saturating_sub(t.elapsed()))
                .unwrap_or_default()
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(client_id.to_owned(), Instant::now());
    }
}

#[derive(Debug)]
enum Incoming {
    ConnAck(ConnectReturnCode),
    SubAck(Vec<SubscribeReasonCode>),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// The broker acknowledged a QoS 1 PUBLISH of ours.
    PubAck,
    Closed(String, Option<AgentError>),
}

/// What arrives on the production session.
#[derive(Debug)]
pub enum SessionEvent {
    /// A message on a subscribed topic.
    Message(Message),
    /// The broker acknowledged our oldest unacknowledged QoS 1 PUBLISH (the production session
    /// has at most one in flight, so this one).
    Acknowledged,
}

/// A live connection.
#[derive(Debug)]
pub struct Session {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Incoming>,
    task: tokio::task::JoinHandle<()>,
    pub client_id: String,
    identity: Identity,
    target: Target,
    subscribed: Vec<String>,
    /// Messages that arrived while a request or subscription waited for its answer: kept for
    /// `next_event` (a job notification must not be lost to a rotation's request).
    held: std::collections::VecDeque<Message>,
    /// Acknowledgements of our QoS 1 publishes that arrived meanwhile, likewise (a report in
    /// flight must be marked done, not published again).
    held_acks: u32,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A message that arrived on a subscribed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A reply of a request/response API.
#[derive(Debug)]
pub struct Reply {
    pub accepted: bool,
    pub payload: Vec<u8>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{secs}"))
}

/// Finds the rustls error inside rumqttc's error, if the failure was TLS. With TLS 1.3 a
/// refused client certificate only shows on the first read, so it arrives wrapped as an MQTT
/// read error.
fn rustls_error(err: &ConnectionError) -> Option<&rustls::Error> {
    let io = match err {
        ConnectionError::Tls(rumqttc::TlsError::TLS(e)) => return Some(e),
        ConnectionError::Tls(rumqttc::TlsError::Io(io))
        | ConnectionError::Io(io)
        | ConnectionError::MqttState(rumqttc::StateError::Io(io))
        | ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::Io(io),
        )) => io,
        _ => return None,
    };
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Turns a connection failure into a message with its remedy.
fn classify(
    err: &ConnectionError,
    identity: &Identity,
    target: &Target,
    client_id: &str,
) -> AgentError {
    let at = format!("{}:{}", target.host, target.port);
    if let Some(tls) = rustls_error(err) {
        use rustls::{AlertDescription as A, CertificateError as C};
        return match (tls, identity) {
            (
                rustls::Error::AlertReceived(A::CertificateExpired),
                Identity::Claim {
                    not_after, path, ..
                },
            ) => AgentError::permanent(
                ErrorCode::ClaimExpired,
                format!(
                    "claim certificate {path} expired at {} (AWS IoT refused it); install a new claim",
                    rfc3339(*not_after)
                ),
            ),
            // The device's own certificate: the identity stays, and the connection keeps
            // retrying with backoff, so a fix in the cloud (an activated certificate) or on the
            // gateway (a rotation, `iotctl reprovision`) takes effect without a restart.
            (
                rustls::Error::AlertReceived(A::CertificateExpired),
                Identity::Device { certificate_id },
            ) => AgentError::new(
                ErrorCode::CertificateExpired,
                Retry::Reconnect,
                format!(
                    "AWS IoT says the device certificate {certificate_id} has expired; it must be rotated, or the gateway re-provisioned (iotctl reprovision)"
                ),
            ),
            (
                rustls::Error::AlertReceived(A::CertificateRevoked),
                Identity::Device { certificate_id },
            ) => AgentError::new(
                ErrorCode::CertificateRevoked,
                Retry::Reconnect,
                format!(
                    "AWS IoT says the device certificate {certificate_id} has been revoked; the gateway needs a new identity (iotctl reprovision)"
                ),
            ),
            (
                rustls::Error::AlertReceived(
                    alert @ (A::BadCertificate
                    | A::UnknownCA
                    | A::CertificateUnknown
                    | A::AccessDenied),
                ),
                Identity::Device { certificate_id },
            ) => AgentError::new(
                ErrorCode::CertificateInactive,
                Retry::Reconnect,
                format!(
                    "AWS IoT refused the device certificate {certificate_id} during the TLS handshake ({alert:?}): it is not ACTIVE (deactivated, or deleted) or not registered in this account and region; activate it in AWS IoT, or re-provision the gateway (iotctl reprovision)"
                ),
            ),
            (
                rustls::Error::AlertReceived(
                    alert @ (A::BadCertificate
                    | A::UnknownCA
                    | A::CertificateRevoked
                    | A::CertificateUnknown
                    | A::AccessDenied),
                ),
                Identity::Claim { path, .. },
            ) => AgentError::permanent(
                ErrorCode::ClaimRejected,
                format!(
                    "AWS IoT refused the claim certificate {path} during the TLS handshake ({alert:?}): it is not registered, not active or revoked"
                ),
            ),
            (rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature), _) => {
                AgentError::permanent(
                    ErrorCode::ServerUntrusted,
                    format!(
                        "the server at {at} presented a certificate that {} does not trust; check cloud.ca_bundle and cloud.endpoint",
                        target.trust
                    ),
                )
            }
            (
                rustls::Error::InvalidCertificate(
                    C::NotValidForName | C::NotValidForNameContext { .. },
                ),
                _,
            ) => AgentError::permanent(
                ErrorCode::ServerUntrusted,
                format!(
                    "the server at {at} has a certificate for another name than {}; check cloud.endpoint",
                    target.host
                ),
            ),
            (
                rustls::Error::InvalidCertificate(
                    C::Expired
                    | C::ExpiredContext { .. }
                    | C::NotValidYet
                    | C::NotValidYetContext { .. },
                ),
                _,
            ) => AgentError::new(
                ErrorCode::ServerUntrusted,
                Retry::Reconnect,
                format!(
                    "the server certificate at {at} is outside its validity period by this gateway's clock ({}); check the system clock (NTP)",
                    rfc3339(now())
                ),
            ),
            (other, _) => AgentError::new(
                ErrorCode::Network,
                Retry::Reconnect,
                format!("TLS with {at} failed: {other}"),
            ),
        };
    }
    match err {
        ConnectionError::ConnectionRefused(code) => {
            let (retry, why) = match code {
                ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => (
                    match identity {
                        Identity::Claim { .. } => Retry::Permanent,
                        Identity::Device { .. } => Retry::Reconnect,
                    },
                    match identity {
                        Identity::Claim { path, .. } => format!(
                            "the claim certificate {path} is not ACTIVE, or its policy does not allow iot:Connect as client id {client_id}"
                        ),
                        Identity::Device { certificate_id } => format!(
                            "certificate {certificate_id} is not ACTIVE, or its policy does not allow iot:Connect as {client_id} (right after registration this can take a moment)"
                        ),
                    },
                ),
                ConnectReturnCode::BadClientId => (
                    Retry::Permanent,
                    format!("client id {client_id} is not valid for AWS IoT (1-128 bytes)"),
                ),
                _ => (
                    Retry::Reconnect,
                    format!("AWS IoT is unavailable ({code:?})"),
                ),
            };
            let code_name =
                if retry == Retry::Permanent && matches!(identity, Identity::Claim { .. }) {
                    ErrorCode::ClaimRejected
                } else {
                    ErrorCode::ConnectRefused
                };
            AgentError::new(
                code_name,
                retry,
                format!("AWS IoT at {at} refused the connection: {why}"),
            )
        }
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            AgentError::new(
                ErrorCode::Network,
                Retry::Reconnect,
                format!(
                    "nothing accepts connections at {at}; check cloud.endpoint and cloud.port, and the network"
                ),
            )
        }
        ConnectionError::Io(io)
            if io.kind() == std::io::ErrorKind::NotFound
                || io.to_string().contains("failed to lookup") =>
        {
            AgentError::new(
                ErrorCode::Network,
                Retry::Reconnect,
                format!(
                    "{} does not resolve ({io}); check cloud.endpoint and DNS",
                    target.host
                ),
            )
        }
        ConnectionError::NetworkTimeout => AgentError::new(
            ErrorCode::Network,
            Retry::Reconnect,
            format!("no answer from {at} in time; check the network"),
        ),
        other => AgentError::new(
            ErrorCode::Network,
            Retry::Reconnect,
            format!("the connection to {at} failed: {other}"),
        ),
    }
}

async fn forward(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<Incoming>,
    identity: Identity,
    target: Target,
    client_id: String,
) {
    loop {
        let incoming = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => Incoming::ConnAck(ack.code),
            Ok(Event::Incoming(Packet::SubAck(ack))) => Incoming::SubAck(ack.return_codes),
            Ok(Event::Incoming(Packet::Publish(p))) => Incoming::Message {
                topic: p.topic,
                payload: p.payload.to_vec(),
            },
            Ok(Event::Incoming(Packet::PubAck(_))) => Incoming::PubAck,
            Ok(_) => continue,
            Err(e) => {
                let classified = classify(&e, &identity, &target, &client_id);
                let _ = tx.send(Incoming::Closed(e.to_string(), Some(classified)));
                return;
            }
        };
        if tx.send(incoming).is_err() {
            return;
        }
    }
}

impl Session {
    /// Keeps `message` for `next_event`; a claim session, which never reads them, keeps only
    /// the last few (late replies to requests given up on).
    fn hold(&mut self, message: Message) {
        const HELD_MAX: usize = 64;
        if self.held.len() == HELD_MAX {
            self.held.pop_front();
        }
        self.held.push_back(message);
    }

    /// The host it is connected to.
    pub fn host(&self) -> &str {
        &self.target.host
    }

    /// Connects and waits for CONNACK.
    pub async fn connect(
        target: &Target,
        tls: Arc<rustls::ClientConfig>,
        client_id: &str,
        identity: Identity,
        pacer: &ConnectPacer,
    ) -> Result<Session, AgentError> {
        if let Identity::Claim {
            not_after,
            path,
            by_clock: true,
        } = &identity
            && now() > *not_after
        {
            return Err(AgentError::permanent(
                ErrorCode::ClaimExpired,
                format!(
                    "claim certificate {path} expired at {}; install a new claim",
                    rfc3339(*not_after)
                ),
            ));
        }
        pacer.wait(client_id).await;
        let mut options = MqttOptions::new(client_id, target.host.clone(), target.port);
        options.set_keep_alive(target.keep_alive);
        options.set_clean_session(true);
        // AWS IoT allows 128 KB messages; job documents and device configuration can be large.
        options.set_max_packet_size(132 * 1024, 132 * 1024);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        // Request/response over MQTT is a string of small writes each waiting for an answer:
        // with Nagle's algorithm every one of them waits out the peer's delayed ACK (~40 ms).
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(forward(
            eventloop,
            tx,
            identity.clone(),
            target.clone(),
            client_id.to_owned(),
        ));
        let wait = target
            .keep_alive
            .max(Duration::from_secs(10))
            .min(Duration::from_secs(30));
        let first = tokio::time::timeout(wait, events.recv()).await;
        pacer.done(client_id);
        let session = Session {
            client,
            events,
            task,
            client_id: client_id.to_owned(),
            identity,
            target: target.clone(),
            subscribed: Vec::new(),
            held: std::collections::VecDeque::new(),
            held_acks: 0,
        };
        match first {
            Ok(Some(Incoming::ConnAck(ConnectReturnCode::Success))) => Ok(session),
            Ok(Some(Incoming::ConnAck(code))) => Err(classify(
                &ConnectionError::ConnectionRefused(code),
                &session.identity,
                target,
                client_id,
            )),
            Ok(Some(Incoming::Closed(_, Some(e)))) => Err(e),
            Ok(None) | Ok(Some(Incoming::Closed(_, None))) => Err(AgentError::new(
                ErrorCode::Network,
                Retry::Reconnect,
                format!(
                    "the connection to {}:{} closed before CONNACK (throttled?)",
                    target.host, target.port
                ),
            )),
            Ok(Some(other)) => Err(AgentError::new(
                ErrorCode::Network,
                Retry::Reconnect,
                format!(
                    "unexpected {other:?} before CONNACK from {}:{}",
                    target.host, target.port
                ),
            )),
            Err(_) => Err(AgentError::new(
                ErrorCode::Network,
                Retry::Reconnect,
                format!(
                    "no CONNACK from {}:{} within {} s",
                    target.host,
                    target.port,
                    wait.as_secs()
                ),
            )),
        }
    }

    fn closed(&self, why: &str, classified: Option<AgentError>, context: &str) -> AgentError {
        classified.unwrap_or_else(|| {
            AgentError::new(
                ErrorCode::Network,
                Retry::Reconnect,
                format!(
                    "the connection to {}:{} closed {context}: {why}",
                    self.target.host, self.target.port
                ),
            )
        })
    }

    /// Subscribes to `filters` (those not yet subscribed) in one SUBSCRIBE and waits for SUBACK.
    pub async fn subscribe(
        &mut self,
        filters: &[String],
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let new: Vec<String> = filters
            .iter()
            .filter(|f| !self.subscribed.contains(f))
            .cloned()
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        self.client
            .subscribe_many(
                new.iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
            )
            .await
            .map_err(|e| {
                AgentError::new(
                    ErrorCode::Network,
                    Retry::Reconnect,
                    format!("subscribing to {}: {e}", new.join(", ")),
                )
            })?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Incoming::SubAck(codes))) => {
                    let refused: Vec<&String> = new
                        .iter()
                        .zip(&codes)
                        .filter(|(_, c)| matches!(c, SubscribeReasonCode::Failure))
                        .map(|(f, _)| f)
                        .collect();
                    if !refused.is_empty() {
                        let whose = match &self.identity {
                            Identity::Claim { .. } => "the claim policy",
                            Identity::Device { .. } => "the device policy",
                        };
                        let list: Vec<&str> = refused.iter().map(|s| s.as_str()).collect();
                        return Err(AgentError::permanent(
                            ErrorCode::PolicyDenied,
                            format!(
                                "{whose} does not allow subscribing to {}; add iot:Subscribe on topicfilter/… for it",
                                list.join(", ")
                            ),
                        ));
                    }
                    self.subscribed.extend(new);
                    return Ok(());
                }
                Ok(Some(Incoming::Closed(why, classified))) => {
                    return Err(self.closed(&why, classified, "while subscribing"));
                }
                Ok(Some(Incoming::Message { topic, payload })) => {
                    self.hold(Message { topic, payload })
                }
                Ok(Some(Incoming::PubAck)) => self.held_acks += 1,
                Ok(Some(_)) => {}
                Ok(None) => return Err(self.closed("event loop ended", None, "while subscribing")),
                Err(_) => {
                    return Err(AgentError::new(
                        ErrorCode::NoReply,
                        Retry::Reconnect,
                        format!(
                            "no SUBACK for {} within {} s",
                            new.join(", "),
                            timeout.as_secs()
                        ),
                    ));
                }
            }
        }
    }

    /// Publishes a request to `topic` (after subscribing to its accepted/rejected replies) and
    /// waits for one of them.
    pub async fn request(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Reply, AgentError> {
        let accepted = format!("{topic}/accepted");
        let rejected = format!("{topic}/rejected");
        self.subscribe(&[accepted.clone(), rejected.clone()], timeout)
            .await?;
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| {
                AgentError::new(
                    ErrorCode::Network,
                    Retry::Reconnect,
                    format!("publishing to {topic}: {e}"),
                )
            })?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Incoming::Message { topic: t, payload }))
                    if t == accepted || t == rejected =>
                {
                    return Ok(Reply {
                        accepted: t == accepted,
                        payload,
                    });
                }
                Ok(Some(Incoming::Closed(why, classified))) => {
                    // AWS closes an MQTT 3.1.1 connection when a publish is not allowed.
                    let whose = match &self.identity {
                        Identity::Claim { .. } => "the claim policy",
                        Identity::Device { .. } => "the device policy",
                    };
                    let mut e =
                        self.closed(&why, classified, &format!("after publishing to {topic}"));
                    if e.code == ErrorCode::Network {
                        e.message = format!(
                            "{}; if this repeats, {whose} probably does not allow publishing to {topic}",
                            e.message
                        );
                    }
                    return Err(e);
                }
                Ok(Some(Incoming::Message { topic, payload })) => {
                    self.hold(Message { topic, payload })
                }
                Ok(Some(Incoming::PubAck)) => self.held_acks += 1,
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(self.closed("event loop ended", None, "while waiting for a reply"));
                }
                Err(_) => {
                    return Err(AgentError::new(
                        ErrorCode::NoReply,
                        Retry::SameConnection,
                        format!("no reply to {topic} within {} s", timeout.as_secs()),
                    ));
                }
            }
        }
    }

    /// Publishes `payload` to `topic` with QoS 1 without waiting: the acknowledgement comes
    /// as `SessionEvent::Acknowledged` from `next_event`.
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), AgentError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| {
                AgentError::new(
                    ErrorCode::Network,
                    Retry::Reconnect,
                    format!("publishing to {topic}: {e}"),
                )
            })
    }

    /// The next message on a subscribed topic or acknowledgement of our publish, or why the
    /// connection ended (the production session, which routes what arrives).
    pub async fn next_event(&mut self) -> Result<SessionEvent, AgentError> {
        if self.held_acks > 0 {
            self.held_acks -= 1;
            return Ok(SessionEvent::Acknowledged);
        }
        if let Some(message) = self.held.pop_front() {
            return Ok(SessionEvent::Message(message));
        }
        loop {
            match self.events.recv().await {
                Some(Incoming::Message { topic, payload }) => {
                    return Ok(SessionEvent::Message(Message { topic, payload }));
                }
                Some(Incoming::PubAck) => return Ok(SessionEvent::Acknowledged),
                Some(Incoming::Closed(why, classified)) => {
                    return Err(self.closed(&why, classified, "unexpectedly"));
                }
                Some(_) => {}
                None => return Err(self.closed("event loop ended", None, "unexpectedly")),
            }
        }
    }

    /// Disconnects politely (best effort, bounded).
    pub async fn disconnect(self) {
        let _ = self.client.try_disconnect();
        let mut me = self;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(ev) = me.events.recv().await {
                if matches!(ev, Incoming::Closed(..)) {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::AlertDescription as A;

    fn target() -> Target {
        Target {
            host: "a1b2c3-ats.iot.eu-west-1.amazonaws.com".into(),
            port: 8883,
            keep_alive: Duration::from_secs(300),
            trust: "CA bundle /etc/iotd/ca.pem".into(),
        }
    }

    fn device() -> Identity {
        Identity::Device {
            certificate_id: "c0ffee".into(),
        }
    }

    fn claim() -> Identity {
        Identity::Claim {
            not_after: 1_780_000_000,
            path: "/usr/lib/iotd/claim/claim.pem".into(),
            by_clock: true,
        }
    }

    /// The alert as rumqttc reports a failed handshake (TLS 1.2, or a refusal the client sees
    /// while it still shakes hands).
    fn handshake_alert(alert: A) -> ConnectionError {
        ConnectionError::Tls(rumqttc::TlsError::TLS(rustls::Error::AlertReceived(alert)))
    }

    /// The alert as it arrives with TLS 1.3: on the first read, inside an I/O error.
    fn first_read_alert(alert: A) -> ConnectionError {
        ConnectionError::MqttState(rumqttc::StateError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(alert),
        )))
    }

    fn classify_as(err: &ConnectionError, identity: &Identity) -> AgentError {
        classify(err, identity, &target(), "gw-0001")
    }

    #[test]
    fn an_expired_device_certificate_is_not_a_claim_problem() {
        for err in [
            handshake_alert(A::CertificateExpired),
            first_read_alert(A::CertificateExpired),
        ] {
            let e = classify_as(&err, &device());
            assert_eq!(e.code, ErrorCode::CertificateExpired, "{e}");
            assert_eq!(e.retry, Retry::Reconnect, "{e}");
            assert!(e.message.contains("device certificate c0ffee"), "{e}");
            assert!(e.message.contains("rotated"), "{e}");
            assert!(e.message.contains("iotctl reprovision"), "{e}");
        }
        // The claim's expiry stays the claim's.
        let e = classify_as(&handshake_alert(A::CertificateExpired), &claim());
        assert_eq!(e.code, ErrorCode::ClaimExpired, "{e}");
        assert!(e.is_permanent());
    }

    #[test]
    fn a_revoked_device_certificate_says_so() {
        for err in [
            handshake_alert(A::CertificateRevoked),
            first_read_alert(A::CertificateRevoked),
        ] {
            let e = classify_as(&err, &device());
            assert_eq!(e.code, ErrorCode::CertificateRevoked, "{e}");
            assert_eq!(e.retry, Retry::Reconnect, "{e}");
            assert!(e.message.contains("c0ffee"), "{e}");
            assert!(e.message.contains("revoked"), "{e}");
        }
        let e = classify_as(&handshake_alert(A::CertificateRevoked), &claim());
        assert_eq!(e.code, ErrorCode::ClaimRejected, "{e}");
    }

    #[test]
    fn a_refused_device_certificate_is_inactive() {
        for alert in [
            A::BadCertificate,
            A::UnknownCA,
            A::CertificateUnknown,
            A::AccessDenied,
        ] {
            for err in [handshake_alert(alert), first_read_alert(alert)] {
                let e = classify_as(&err, &device());
                assert_eq!(e.code, ErrorCode::CertificateInactive, "{alert:?}: {e}");
                assert_eq!(e.retry, Retry::Reconnect, "{alert:?}: {e}");
                assert!(e.message.contains("c0ffee"), "{e}");
                assert!(e.message.contains("not ACTIVE"), "{e}");
                assert!(e.message.contains(&format!("{alert:?}")), "{e}");
            }
            let e = classify_as(&handshake_alert(alert), &claim());
            assert_eq!(e.code, ErrorCode::ClaimRejected, "{alert:?}: {e}");
            assert!(e.is_permanent());
        }
    }

    #[test]
    fn a_refused_connect_of_the_device_stays_connect_refused() {
        for code in [
            ConnectReturnCode::NotAuthorized,
            ConnectReturnCode::BadUserNamePassword,
        ] {
            let err = ConnectionError::ConnectionRefused(code);
            let e = classify_as(&err, &device());
            // A policy problem, or the moments right after registration: keep trying.
            assert_eq!(e.code, ErrorCode::ConnectRefused, "{code:?}: {e}");
            assert_eq!(e.retry, Retry::Reconnect, "{code:?}: {e}");
            assert!(e.message.contains("iot:Connect as gw-0001"), "{e}");
            let e = classify_as(&err, &claim());
            assert_eq!(e.code, ErrorCode::ClaimRejected, "{code:?}: {e}");
            assert!(e.is_permanent());
        }
    }

    #[test]
    fn other_alerts_are_network_trouble() {
        let e = classify_as(&handshake_alert(A::HandshakeFailure), &device());
        assert_eq!(e.code, ErrorCode::Network, "{e}");
        assert_eq!(e.retry, Retry::Reconnect, "{e}");
    }
}
