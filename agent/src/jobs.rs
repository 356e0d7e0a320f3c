//! Cloud-triggered rotation through AWS IoT Jobs, device side. A job whose document is
//! `{"operation": "ROTATE_CERTIFICATE"}` makes the gateway rotate; every other job is left
//! untouched (never started, never updated), for the software that owns it.
//!
//! The watcher is one task, alive while iotd runs. It is told when the committed identity's
//! connection comes up (it then subscribes to `$aws/things/<thing>/jobs/notify` and lists the
//! pending executions) and when a notification arrives; it looks at each pending job with
//! DescribeJobExecution by job id (not StartNextPendingJobExecution, which would start any
//! job), takes a rotation job IN_PROGRESS, asks the core to rotate, and ends the job SUCCEEDED
//! or FAILED with `statusDetails` naming the cause. Its requests go over the production
//! connection of the moment (`watch` of an `Exchanger`: a rotation replaces the connection in
//! the middle of a job). A job found IN_PROGRESS after a restart is run again (a rotation that
//! did not commit was rolled back), unless the last committed rotation was this job's: then it
//! is only ended SUCCEEDED.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::cloud::Session;
use crate::connection::Exchanger;
use crate::error::{AgentError, ErrorCode, Retry};
use crate::fsm::Event;

/// The job document's `operation` that asks for a rotation.
pub const ROTATE_OPERATION: &str = "ROTATE_CERTIFICATE";

/// `statusDetails` values are at most this long (AWS limits each to 1024 characters).
const DETAIL_MAX: usize = 1000;

fn topic(thing: &str, rest: &str) -> String {
    format!("$aws/things/{thing}/jobs/{rest}")
}

/// The topic of the pending-list pushes for `thing`.
pub fn notify_topic(thing: &str) -> String {
    topic(thing, "notify")
}

/// One job execution, as DescribeJobExecution tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    pub job_id: String,
    pub status: String,
    pub version: Option<i64>,
    /// The document asks for a certificate rotation.
    pub rotate: bool,
}

/// The job ids of a GetPendingJobExecutions reply (`inProgressJobs`, `queuedJobs`) or of a
/// `notify` push (`jobs.IN_PROGRESS`, `jobs.QUEUED`), in progress first.
pub fn pending_ids(payload: &[u8]) -> Vec<String> {
    let Ok(value) = serde_json::from_slice::<Value>(payload) else {
        return Vec::new();
    };
    let lists = [
        &value["inProgressJobs"],
        &value["jobs"]["IN_PROGRESS"],
        &value["queuedJobs"],
        &value["jobs"]["QUEUED"],
    ];
    let mut ids = Vec::new();
    for list in lists {
        for summary in list.as_array().into_iter().flatten() {
            if let Some(id) = summary["jobId"].as_str()
                && !ids.iter().any(|i| i == id)
            {
                ids.push(id.to_owned());
            }
        }
    }
    ids
}

/// A DescribeJobExecution reply (`execution`), read leniently.
pub fn parse_execution(payload: &[u8]) -> Result<Execution, String> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| format!("the reply is not JSON: {e}"))?;
    let execution = &value["execution"];
    let job_id = execution["jobId"]
        .as_str()
        .ok_or("the reply has no execution.jobId")?
        .to_owned();
    // AWS sends the document as an object; accept it as a JSON string too.
    let document = match &execution["jobDocument"] {
        Value::String(text) => serde_json::from_str(text).unwrap_or(Value::Null),
        other => other.clone(),
    };
    Ok(Execution {
        job_id,
        status: execution["status"].as_str().unwrap_or_default().to_owned(),
        version: execution["versionNumber"].as_i64(),
        rotate: document["operation"] == ROTATE_OPERATION,
    })
}

async fn call(
    session: &mut Session,
    topic: String,
    body: Value,
    timeout: Duration,
) -> Result<Vec<u8>, AgentError> {
    let reply = session
        .request(&topic, body.to_string().into_bytes(), timeout)
        .await?;
    if reply.accepted {
        return Ok(reply.payload);
    }
    let rejected: Value = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
    Err(AgentError::new(
        ErrorCode::Rejected,
        Retry::SameConnection,
        format!(
            "AWS IoT Jobs refused {topic}: {} {}",
            rejected["code"].as_str().unwrap_or("?"),
            rejected["message"].as_str().unwrap_or_default()
        ),
    ))
}

/// What the watcher is told.
#[derive(Debug)]
pub enum Notice {
    /// The committed identity's connection is up: subscribe and look at the pending jobs.
    Connected,
    /// A push on the notify topic.
    Pushed(Vec<u8>),
}

/// What the watcher asks the core.
#[derive(Debug)]
pub struct RotateForJob {
    pub job_id: String,
    /// The rotation's id, or why none was started.
    pub reply: oneshot::Sender<Result<String, AgentError>>,
}

/// The core's side of the watcher.
#[derive(Debug)]
pub struct Watcher {
    pub notices: mpsc::UnboundedSender<Notice>,
    pub exchanger: watch::Sender<Option<Exchanger>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the watcher stands with the cloud and the core.
struct Context {
    thing: String,
    timeout: Duration,
    exchanger: watch::Receiver<Option<Exchanger>>,
    requests: mpsc::Sender<RotateForJob>,
    events: broadcast::Sender<Event>,
    /// The job of the last committed rotation (after a restart: end it, do not rotate again).
    last_committed_job: Option<String>,
}

/// Starts the watcher for `thing`. `events` are the core's; `requests` go to the core.
pub fn spawn(
    thing: String,
    timeout: Duration,
    events: broadcast::Sender<Event>,
    requests: mpsc::Sender<RotateForJob>,
    last_committed_job: Option<String>,
) -> Watcher {
    let (notices, received) = mpsc::unbounded_channel();
    let (exchanger, current) = watch::channel(None);
    let cx = Context {
        thing,
        timeout,
        exchanger: current,
        requests,
        events,
        last_committed_job,
    };
    let task = tokio::spawn(run(cx, received));
    Watcher {
        notices,
        exchanger,
        task,
    }
}

impl Context {
    /// Runs `f` on the current production connection.
    async fn on_session<T: Send + 'static>(
        &self,
        what: &str,
        f: impl for<'s> FnOnce(&'s mut Session) -> crate::connection::OnSession<'s, T> + Send + 'static,
    ) -> Result<T, AgentError> {
        let exchanger = self.exchanger.borrow().clone().ok_or_else(|| {
            AgentError::new(
                ErrorCode::Network,
                Retry::Reconnect,
                format!("{what}: not connected"),
            )
        })?;
        exchanger.run(what, self.timeout * 3, f).await
    }

    async fn subscribe(&self) -> Result<(), AgentError> {
        let filter = notify_topic(&self.thing);
        let timeout = self.timeout;
        self.on_session("subscribing to job notifications", move |s| {
            Box::pin(async move { s.subscribe(&[filter], timeout).await })
        })
        .await
    }

    async fn pending(&self) -> Result<Vec<String>, AgentError> {
        let (topic, timeout) = (topic(&self.thing, "get"), self.timeout);
        let payload = self
            .on_session("listing pending jobs", move |s| {
                Box::pin(async move { call(s, topic, json!({}), timeout).await })
            })
            .await?;
        Ok(pending_ids(&payload))
    }

    async fn describe(&self, job_id: &str) -> Result<Execution, AgentError> {
        let (topic, timeout) = (topic(&self.thing, &format!("{job_id}/get")), self.timeout);
        let payload = self
            .on_session("describing a job", move |s| {
                Box::pin(async move {
                    call(s, topic, json!({"includeJobDocument": true}), timeout).await
                })
            })
            .await?;
        parse_execution(&payload).map_err(|e| {
            AgentError::new(
                ErrorCode::Rejected,
                Retry::SameConnection,
                format!("describing job {job_id}: {e}"),
            )
        })
    }

    async fn update(
        &self,
        job_id: &str,
        status: &str,
        details: BTreeMap<String, String>,
        expected_version: Option<i64>,
    ) -> Result<(), AgentError> {
        let (topic, timeout) = (
            topic(&self.thing, &format!("{job_id}/update")),
            self.timeout,
        );
        let mut body = json!({"status": status, "statusDetails": details});
        if let Some(version) = expected_version {
            body["expectedVersion"] = json!(version);
        }
        self.on_session("updating a job", move |s| {
            Box::pin(async move { call(s, topic, body, timeout).await.map(|_| ()) })
        })
        .await
    }

    /// Takes job `id` if it asks for a rotation, runs it, ends it. Returns whether the job is
    /// done with (ended, or not ours); `false`: look again later.
    async fn handle(&mut self, id: &str) -> Result<bool, AgentError> {
        let execution = self.describe(id).await?;
        if !execution.rotate {
            tracing::debug!(job_id = id, "a job for other software; left alone");
            return Ok(true);
        }
        if !matches!(execution.status.as_str(), "QUEUED" | "IN_PROGRESS") {
            return Ok(true);
        }
        if execution.status == "IN_PROGRESS" && self.last_committed_job.as_deref() == Some(id) {
            // Committed before a restart took the update away.
            self.end(id, true, "the certificate was rotated").await?;
            return Ok(true);
        }
        if execution.status == "QUEUED" {
            let mut details = BTreeMap::new();
            details.insert(
                "agent".to_owned(),
                concat!("iotd ", env!("CARGO_PKG_VERSION")).to_owned(),
            );
            self.update(id, "IN_PROGRESS", details, execution.version)
                .await?;
        }
        tracing::info!(job_id = id, "rotation job taken IN_PROGRESS");
        // Subscribed before asking, so that an outcome that comes at once is not missed.
        let mut events = self.events.subscribe();
        let (reply, answer) = oneshot::channel();
        let asked = RotateForJob {
            job_id: id.to_owned(),
            reply,
        };
        if self.requests.send(asked).await.is_err() {
            return Ok(false);
        }
        let rotation = match answer.await {
            Ok(Ok(rotation)) => rotation,
            Ok(Err(e)) if e.code == ErrorCode::Busy => return Ok(false),
            Ok(Err(e)) => {
                self.end(id, false, &e.message).await?;
                return Ok(true);
            }
            Err(_) => return Ok(false),
        };
        loop {
            match events.recv().await {
                Ok(Event::CredentialsRotated { .. }) => break,
                Ok(Event::RotationFailed {
                    id: failed,
                    message,
                    ..
                }) if failed == rotation => {
                    self.end(id, false, &message).await?;
                    return Ok(true);
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Ok(false),
            }
        }
        self.last_committed_job = Some(id.to_owned());
        self.end(id, true, "the certificate was rotated").await?;
        Ok(true)
    }

    /// Ends job `id` SUCCEEDED or FAILED, saying why in `statusDetails`.
    async fn end(&self, id: &str, succeeded: bool, detail: &str) -> Result<(), AgentError> {
        let mut details = BTreeMap::new();
        let key = if succeeded { "result" } else { "cause" };
        let detail: String = detail.chars().take(DETAIL_MAX).collect();
        details.insert(key.to_owned(), detail);
        let status = if succeeded { "SUCCEEDED" } else { "FAILED" };
        // The connection may be the new one, which waits for its CONNECT pacing: a few tries.
        let mut last = None;
        for attempt in 0..3u32 {
            match self.update(id, status, details.clone(), None).await {
                Ok(()) => {
                    tracing::info!(job_id = id, status, "rotation job ended");
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(job_id = id, attempt, "ending the rotation job: {e}");
                    last = Some(e);
                    // 1, 2, 4 s, each with up to half of it again at random.
                    let base = 1000u64 << attempt;
                    let jitter = rand::random::<u64>() % (base / 2 + 1);
                    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            AgentError::new(ErrorCode::Network, Retry::Reconnect, "ending the job")
        }))
    }

    /// Looks at the pending jobs (subscribing first on a new connection).
    async fn look(&mut self, subscribe: bool, done: &mut BTreeSet<String>) {
        if subscribe && let Err(e) = self.subscribe().await {
            // A policy without the jobs topics: no cloud-triggered rotation, and no publish to
            // them either (AWS would close the connection on it).
            tracing::warn!("job notifications are off on this connection: {e}");
            return;
        }
        let ids = match self.pending().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!("listing pending jobs: {e}");
                return;
            }
        };
        for id in ids {
            if done.contains(&id) {
                continue;
            }
            match self.handle(&id).await {
                Ok(true) => {
                    done.insert(id);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(job_id = %id, "rotation job: {e}"),
            }
        }
    }
}

async fn run(mut cx: Context, mut notices: mpsc::UnboundedReceiver<Notice>) {
    // Jobs looked at and done with in this process (ended, or another software's).
    let mut done = BTreeSet::new();
    while let Some(notice) = notices.recv().await {
        match notice {
            Notice::Connected => cx.look(true, &mut done).await,
            Notice::Pushed(payload) => {
                let new = pending_ids(&payload).iter().any(|id| !done.contains(id));
                if new {
                    cx.look(false, &mut done).await;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pending_ids_come_from_replies_and_pushes_in_progress_first() {
        let reply = br#"{"inProgressJobs":[{"jobId":"b"}],"queuedJobs":[{"jobId":"a"},{"jobId":"b"}],"timestamp":1}"#;
        assert_eq!(pending_ids(reply), ["b", "a"]);
        let push =
            br#"{"timestamp":1,"jobs":{"QUEUED":[{"jobId":"q"}],"IN_PROGRESS":[{"jobId":"p"}]}}"#;
        assert_eq!(pending_ids(push), ["p", "q"]);
        assert!(pending_ids(br#"{"timestamp":1,"jobs":{}}"#).is_empty());
        assert!(pending_ids(b"not json").is_empty());
    }

    #[test]
    fn an_execution_is_a_rotation_only_with_the_rotate_operation() {
        let rotate = br#"{"execution":{"jobId":"j","status":"QUEUED","versionNumber":1,
            "jobDocument":{"operation":"ROTATE_CERTIFICATE"}}}"#;
        assert_eq!(
            parse_execution(rotate).unwrap(),
            Execution {
                job_id: "j".into(),
                status: "QUEUED".into(),
                version: Some(1),
                rotate: true
            }
        );
        let as_text = br#"{"execution":{"jobId":"j","status":"IN_PROGRESS",
            "jobDocument":"{\"operation\":\"ROTATE_CERTIFICATE\"}"}}"#;
        assert!(parse_execution(as_text).unwrap().rotate);
        let other = br#"{"execution":{"jobId":"k","status":"QUEUED","jobDocument":{"operation":"REBOOT"}}}"#;
        assert!(!parse_execution(other).unwrap().rotate);
        assert!(parse_execution(br#"{"execution":{}}"#).is_err());
    }
}
