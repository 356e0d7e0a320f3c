//! The production connection: one task that owns the MQTT session with the device's own
//! identity, keeps it up (reconnecting with jittered backoff), routes what arrives on it to the
//! core, and reports every connect and disconnect. Commands to the core never cancel it; only
//! the core stops it, when its identity is no longer the one to use.
//!
//! The same task verifies a new identity: the core starts it with a registered certificate
//! that is not committed yet, and its first `Up` is the proof that the certificate works (the
//! CONNACK), which is when the core commits it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::cloud::{self, ConnectPacer, Message, Session, Target};
use crate::error::{AgentError, Backoff, ErrorCode};

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
}

/// The core's handle on the running task.
#[derive(Debug)]
pub struct Connection {
    certificate_id: String,
    stop: Option<oneshot::Sender<()>>,
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
        let certificate_id = credentials.certificate_id.clone();
        let task = tokio::spawn(run(
            target,
            pacer,
            throttle_retry_max,
            credentials,
            events,
            stopped,
        ));
        Self {
            certificate_id,
            stop: Some(stop),
            task,
        }
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

async fn run(
    target: Target,
    pacer: Arc<ConnectPacer>,
    throttle_retry_max: Duration,
    credentials: Credentials,
    events: mpsc::UnboundedSender<ConnectionEvent>,
    mut stopped: oneshot::Receiver<()>,
) {
    let certificate_id = credentials.certificate_id.clone();
    let identity = cloud::Identity::Device {
        certificate_id: certificate_id.clone(),
    };
    let mut backoff = Backoff::default();
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
                loop {
                    tokio::select! {
                        next = session.next_message() => match next {
                            Ok(message) => {
                                let _ = events.send(ConnectionEvent::Message {
                                    certificate_id: certificate_id.clone(),
                                    message,
                                });
                            }
                            Err(e) => break e,
                        },
                        _ = &mut stopped => {
                            session.disconnect().await;
                            return;
                        }
                    }
                }
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
