//! The production connection: one task that owns the MQTT session with the device's own
//! identity, keeps it up (reconnecting with jittered backoff), routes what arrives on it to the
//! core, and reports every connect and disconnect. Commands to the core never cancel it; only
//! the core stops it, when its identity is no longer the one to use.
//!
//! The same task verifies a new identity: the core starts it with a registered certificate
//! that is not committed yet, and its first `Up` is the proof that the certificate works (the
//! CONNACK), which is when the core commits it.
//!
//! It also publishes the core's reports for the fleet's backend (QoS 1, one at a time, kept
//! across reconnects until the broker acknowledges each): the core marks a report done only
//! on `Reported`. A report the device policy does not allow makes AWS close the connection;
//! after three connections lost that way in a row the task stops publishing reports (until
//! the identity changes or iotd restarts) and says so, rather than disconnect forever.
//!
//! A rotation's requests (CreateCertificateFromCsr, RegisterThing) go over this session too:
//! the core hands the task an `Exchange` (through an `Exchanger`), which runs on the session
//! between the task's own reads, while connected; one that waits too long is given up by its
//! caller and then never runs. What arrives on the session meanwhile is kept for the task.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::cloud::{self, ConnectPacer, Message, Session, SessionEvent, Target};
use crate::error::{AgentError, Backoff, ErrorCode, Retry};

/// Requests run on the live session by someone else than the task (see the module comment).
pub type Exchange = Box<
    dyn for<'s> FnOnce(&'s mut Session) -> Pin<Box<dyn Future<Output = ()> + Send + 's>> + Send,
>;

/// A future borrowing the session.
pub type OnSession<'s, T> = Pin<Box<dyn Future<Output = Result<T, AgentError>> + Send + 's>>;

/// Runs requests on the production session (a clone per unit of work).
#[derive(Clone)]
pub struct Exchanger {
    jobs: mpsc::UnboundedSender<Exchange>,
}

impl std::fmt::Debug for Exchanger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchanger").finish_non_exhaustive()
    }
}

impl Exchanger {
    /// One whose connection is gone: every request fails at once (a rotation step started
    /// while no production connection exists).
    pub fn closed() -> Self {
        let (jobs, _) = mpsc::unbounded_channel();
        Self { jobs }
    }

    /// Runs `f` on the session once the connection is up, waiting at most `wait` for that and
    /// for `f`. `what` names the request for errors ("requesting a certificate").
    pub async fn run<T, F>(&self, what: &str, wait: Duration, f: F) -> Result<T, AgentError>
    where
        T: Send + 'static,
        F: for<'s> FnOnce(&'s mut Session) -> OnSession<'s, T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Exchange = Box::new(move |session| {
            Box::pin(async move {
                // The caller gave up waiting (the connection was down too long): a request
                // made now would issue a certificate nobody uses.
                if tx.is_closed() {
                    return;
                }
                let _ = tx.send(f(session).await);
            })
        });
        let stopped = || {
            AgentError::new(
                ErrorCode::Network,
                Retry::Reconnect,
                format!("{what}: the production connection stopped"),
            )
        };
        self.jobs.send(job).map_err(|_| stopped())?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(AgentError::new(
                ErrorCode::Network,
                Retry::SameConnection,
                format!(
                    "{what}: the production connection was not up (or gave no answer) within {} s",
                    wait.as_secs()
                ),
            )),
        }
    }
}

/// Everything the task needs to connect as the device.
#[derive(Clone)]
pub struct Credentials {
    pub generation: u32,
    pub certificate_id: String,
    /// The MQTT client id.
    pub thing_name: String,
    pub tls: Arc<rustls::ClientConfig>,
    /// The certificate's validity (Unix seconds).
    pub not_before: i64,
    pub not_after: i64,
    /// Where the key is, for the snapshot and the identity record.
    pub key_location: String,
    /// The endpoint the identity belongs to (`None`: `cloud.endpoint`).
    pub endpoint: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("generation", &self.generation)
            .field("certificate_id", &self.certificate_id)
            .field("thing_name", &self.thing_name)
            .finish_non_exhaustive()
    }
}

/// What the connection task reports to the core.
#[derive(Debug)]
pub enum ConnectionEvent {
    /// Connected (CONNACK accepted) with `certificate_id`.
    Up { certificate_id: String },
    /// The connection failed or ended; the task tries again after `retry_in`.
    Down {
        certificate_id: String,
        error: AgentError,
        retry_in: Duration,
    },
    /// A message arrived on a subscribed topic (Jobs notifications, later).
    Message {
        certificate_id: String,
        message: Message,
    },
    /// The broker acknowledged report `id`.
    Reported { certificate_id: String, id: String },
}

/// A message for the fleet's backend, published with QoS 1 on the production session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// What the core knows it by (an abandoned certificate's id).
    pub id: String,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// After this many connections in a row lost right after a report was published (within
/// `REFUSAL_WINDOW`, with no PUBACK), the device policy most likely refuses the topic: stop
/// publishing reports. A connection lost later is the network's doing, not the policy's.
const REPORT_ATTEMPTS: u32 = 3;
const REFUSAL_WINDOW: Duration = Duration::from_secs(5);

/// The core's handle on the running task.
#[derive(Debug)]
pub struct Connection {
    certificate_id: String,
    stop: Option<oneshot::Sender<()>>,
    reports: mpsc::UnboundedSender<Report>,
    jobs: mpsc::UnboundedSender<Exchange>,
    task: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Starts the task for `credentials`; events go to `events`.
    pub fn start(
        target: Target,
        pacer: Arc<ConnectPacer>,
        throttle_retry_max: Duration,
        credentials: Credentials,
        events: mpsc::UnboundedSender<ConnectionEvent>,
    ) -> Self {
        let (stop, stopped) = oneshot::channel();
        let (reports, queued) = mpsc::unbounded_channel();
        let (jobs, exchanges) = mpsc::unbounded_channel();
        let certificate_id = credentials.certificate_id.clone();
        let task = tokio::spawn(run(
            target,
            pacer,
            throttle_retry_max,
            credentials,
            events,
            Channels {
                stopped,
                queued,
                exchanges,
            },
        ));
        Self {
            certificate_id,
            stop: Some(stop),
            reports,
            jobs,
            task,
        }
    }

    /// Runs requests on this connection's session (a rotation's).
    pub fn exchanger(&self) -> Exchanger {
        Exchanger {
            jobs: self.jobs.clone(),
        }
    }

    /// Queues `report` for publishing (once connected); one already queued is not queued again.
    pub fn report(&self, report: Report) {
        // The task ends only when stopped, and then nothing is left to report to.
        let _ = self.reports.send(report);
    }

    /// The certificate this connection uses.
    pub fn certificate_id(&self) -> &str {
        &self.certificate_id
    }

    /// Stops the task: a polite DISCONNECT if connected (bounded), then the task ends. Returns
    /// at once; the disconnect finishes in the background.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Without a polite stop (the core is going away): end the session with the process.
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// What the core sends the task besides its credentials.
struct Channels {
    stopped: oneshot::Receiver<()>,
    queued: mpsc::UnboundedReceiver<Report>,
    exchanges: mpsc::UnboundedReceiver<Exchange>,
}

/// The reports waiting for the broker's acknowledgement, oldest first.
#[derive(Default)]
struct Outbox {
    queue: VecDeque<Report>,
    /// The first in `queue` is published and not acknowledged yet (since when).
    in_flight: Option<std::time::Instant>,
    /// Connections lost in a row with a report in flight.
    lost: u32,
    /// Given up: the device policy does not allow the topic.
    refused: bool,
}

impl Outbox {
    fn add(&mut self, report: Report) {
        if !self.refused && !self.queue.iter().any(|r| r.id == report.id) {
            self.queue.push_back(report);
        }
    }

    /// Publishes the oldest report unless one is in flight.
    async fn send(&mut self, session: &mut Session) -> Result<(), crate::error::AgentError> {
        if self.in_flight.is_some() || self.refused {
            return Ok(());
        }
        if let Some(r) = self.queue.front() {
            session.publish(&r.topic, r.payload.clone()).await?;
            self.in_flight = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// The broker acknowledged the report in flight: returns its id.
    fn acknowledged(&mut self) -> Option<String> {
        self.in_flight.take()?;
        self.lost = 0;
        self.queue.pop_front().map(|r| r.id)
    }

    /// The connection was lost; a report in flight goes out again on the next one.
    fn connection_lost(&mut self) {
        let Some(published) = self.in_flight.take() else {
            return;
        };
        if published.elapsed() > REFUSAL_WINDOW {
            self.lost = 0;
            return;
        }
        self.lost += 1;
        if self.lost >= REPORT_ATTEMPTS {
            let topic = self
                .queue
                .front()
                .map(|r| r.topic.clone())
                .unwrap_or_default();
            tracing::error!(
                "the connection was lost {REPORT_ATTEMPTS} times in a row right after a report \
                 was published to {topic} (no PUBACK): the device policy probably does not allow iot:Publish \
                 on it. Not publishing reports until iotd restarts; allow the topic in the \
                 policy (or set cloud.report_topic to one it allows)"
            );
            self.refused = true;
            self.queue.clear();
        }
    }
}

async fn run(
    target: Target,
    pacer: Arc<ConnectPacer>,
    throttle_retry_max: Duration,
    credentials: Credentials,
    events: mpsc::UnboundedSender<ConnectionEvent>,
    channels: Channels,
) {
    let Channels {
        mut stopped,
        mut queued,
        mut exchanges,
    } = channels;
    let certificate_id = credentials.certificate_id.clone();
    let identity = cloud::Identity::Device {
        certificate_id: certificate_id.clone(),
    };
    let mut backoff = Backoff::default();
    let mut outbox = Outbox::default();
    loop {
        let connected = tokio::select! {
            r = Session::connect(
                &target,
                credentials.tls.clone(),
                &credentials.thing_name,
                identity.clone(),
                &pacer,
            ) => r,
            _ = &mut stopped => return,
        };
        let error = match connected {
            Ok(mut session) => {
                backoff.reset();
                tracing::info!(
                    thing = %credentials.thing_name,
                    certificate_id = %certificate_id,
                    "connected"
                );
                let _ = events.send(ConnectionEvent::Up {
                    certificate_id: certificate_id.clone(),
                });
                let ended = loop {
                    if let Err(e) = outbox.send(&mut session).await {
                        break e;
                    }
                    tokio::select! {
                        next = session.next_event() => match next {
                            Ok(SessionEvent::Message(message)) => {
                                let _ = events.send(ConnectionEvent::Message {
                                    certificate_id: certificate_id.clone(),
                                    message,
                                });
                            }
                            Ok(SessionEvent::Acknowledged) => {
                                if let Some(id) = outbox.acknowledged() {
                                    let _ = events.send(ConnectionEvent::Reported {
                                        certificate_id: certificate_id.clone(),
                                        id,
                                    });
                                }
                            }
                            Err(e) => break e,
                        },
                        Some(report) = queued.recv() => outbox.add(report),
                        // What arrives meanwhile (a report's acknowledgement, a notification) the
                        // session keeps for `next_event`.
                        Some(exchange) = exchanges.recv() => exchange(&mut session).await,
                        _ = &mut stopped => {
                            session.disconnect().await;
                            return;
                        }
                    }
                };
                outbox.connection_lost();
                ended
            }
            Err(e) => e,
        };
        let retry_in = if error.code == ErrorCode::Throttled {
            backoff.next_delay_within(throttle_retry_max)
        } else {
            backoff.next_delay()
        };
        tracing::warn!(
            certificate_id = %certificate_id,
            code = error.code.as_str(),
            delay_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
            "{error}; reconnecting"
        );
        if events
            .send(ConnectionEvent::Down {
                certificate_id: certificate_id.clone(),
                error,
                retry_in,
            })
            .is_err()
        {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(retry_in) => {}
            _ = &mut stopped => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str) -> Report {
        Report {
            id: id.to_owned(),
            topic: "iotd/gw/certificates".to_owned(),
            payload: Vec::new(),
        }
    }

    #[test]
    fn reports_are_queued_once_and_done_only_when_acknowledged() {
        let mut outbox = Outbox::default();
        outbox.add(report("a"));
        outbox.add(report("a"));
        outbox.add(report("b"));
        assert_eq!(outbox.queue.len(), 2);
        assert_eq!(outbox.acknowledged(), None, "nothing was in flight");
        outbox.in_flight = Some(std::time::Instant::now());
        outbox.connection_lost();
        assert_eq!(outbox.queue.len(), 2, "sent again on the next connection");
        outbox.in_flight = Some(std::time::Instant::now());
        assert_eq!(outbox.acknowledged().as_deref(), Some("a"));
        assert_eq!(outbox.lost, 0);
        assert_eq!(outbox.queue.len(), 1);
        // A connection lost long after the publish is the network's doing: not counted.
        outbox.lost = 2;
        outbox.in_flight = std::time::Instant::now().checked_sub(REFUSAL_WINDOW * 2);
        outbox.connection_lost();
        assert_eq!((outbox.lost, outbox.refused), (0, false));
    }

    #[test]
    fn a_topic_that_costs_the_connection_three_times_is_given_up() {
        let mut outbox = Outbox::default();
        outbox.add(report("a"));
        for _ in 0..REPORT_ATTEMPTS {
            assert!(!outbox.refused);
            outbox.in_flight = Some(std::time::Instant::now());
            outbox.connection_lost();
        }
        assert!(outbox.refused);
        assert!(outbox.queue.is_empty());
        outbox.add(report("b"));
        assert!(outbox.queue.is_empty(), "no more reports");
        // A connection lost with nothing in flight does not count.
        let mut other = Outbox::default();
        other.add(report("a"));
        for _ in 0..5 {
            other.connection_lost();
        }
        assert_eq!(other.lost, 0);
        assert!(!other.refused);
    }
}
