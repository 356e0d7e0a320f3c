//! The device side of AWS IoT Jobs over MQTT (reference §9): GetPendingJobExecutions,
//! StartNextPendingJobExecution, DescribeJobExecution (including `$next`) and
//! UpdateJobExecution, with the `notify` and `notify-next` pushes, optimistic versioning,
//! step timers and injected faults. JSON only, timestamps in epoch seconds.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::faults::Api;
use crate::registry::{JobExecution, Registry};
use crate::server::{ApiRequest, Gate, Session, Shared, lock};

/// `notify` lists at most this many executions (AWS docs).
const NOTIFY_LIMIT: usize = 10;
/// Longest `clientToken` AWS accepts.
const CLIENT_TOKEN_MAX: usize = 64;
/// `stepTimeoutInMinutes` range: one minute to seven days; -1 cancels the timer.
const STEP_TIMEOUT_MAX: i64 = 10_080;
/// Statuses a device may report; the others are set by the service only.
const DEVICE_STATUSES: [&str; 4] = ["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"];
const SERVICE_STATUSES: [&str; 4] = ["QUEUED", "TIMED_OUT", "REMOVED", "CANCELED"];

/// One of the four request APIs, parsed from its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    GetPending,
    StartNext,
    Describe { job_id: String },
    Update { job_id: String },
}

/// Parses a Jobs request topic `$aws/things/{thing}/jobs/...` into the thing name and API;
/// reply and notification topics are not requests.
pub fn parse_topic(topic: &str) -> Option<(String, Op)> {
    let levels: Vec<&str> = topic.split('/').collect();
    let op = match levels.as_slice() {
        ["$aws", "things", _, "jobs", "get"] => Op::GetPending,
        ["$aws", "things", _, "jobs", "start-next"] => Op::StartNext,
        ["$aws", "things", _, "jobs", job, "get"] if !job.is_empty() => Op::Describe {
            job_id: (*job).to_owned(),
        },
        ["$aws", "things", _, "jobs", job, "update"] if !job.is_empty() => Op::Update {
            job_id: (*job).to_owned(),
        },
        _ => return None,
    };
    let thing = levels[2];
    (!thing.is_empty()).then(|| (thing.to_owned(), op))
}

pub fn is_api_topic(topic: &str) -> bool {
    parse_topic(topic).is_some()
}

/// Any topic of the Jobs API (requests, replies, notifications): the broker does not relay
/// device publishes to the ones that are not requests.
pub fn is_reserved_topic(topic: &str) -> bool {
    let mut levels = topic.split('/');
    levels.next() == Some("$aws")
        && levels.next() == Some("things")
        && levels.next().is_some()
        && levels.next() == Some("jobs")
}

/// A rejected reply, before `clientToken` and `timestamp` are added.
#[derive(Debug, Clone, PartialEq)]
struct Rejection {
    code: String,
    message: String,
    /// `JobExecutionState`, sent with InvalidStateTransition and VersionMismatch.
    execution_state: Option<Value>,
}

impl Rejection {
    fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            execution_state: None,
        }
    }
    fn with_state(code: &str, message: impl Into<String>, exec: &JobExecution) -> Self {
        Self {
            execution_state: Some(execution_state(exec)),
            ..Self::new(code, message)
        }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new("InvalidRequest", message)
    }
}

/// What a handler produces: the accepted body, and whether executions changed (so that the
/// notifications are re-evaluated).
type Outcome = Result<(Map<String, Value>, bool), Rejection>;

/// Serves one request: faults and throttle first, then the API, then notifications.
pub async fn serve(shared: &Shared, session: &Session, req: &ApiRequest) {
    let Some((thing, op)) = parse_topic(&req.topic) else {
        return;
    };
    let gate = crate::server::fault_gate(shared, session, Api::Jobs).await;
    if gate == Gate::Closed {
        return;
    }
    let body = parse_body(&req.payload);
    // The token is echoed even on rejections, so take it before validating anything else.
    let client_token = body
        .as_ref()
        .ok()
        .and_then(|b| b.get("clientToken"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let outcome: Outcome = match &gate {
        Gate::Throttled => Err(Rejection::new(
            "RequestThrottled",
            "The rate exceeds the limit.",
        )),
        Gate::Reject {
            error_code,
            error_message,
            ..
        } => Err(Rejection::new(error_code, error_message.clone())),
        Gate::Serve { .. } | Gate::Closed => body.and_then(|b| {
            check_client_token(&b)?;
            match &op {
                Op::GetPending => get_pending(shared, &thing),
                Op::StartNext => start_next(shared, &thing, &b),
                Op::Describe { job_id } => describe(shared, &thing, job_id, &b),
                Op::Update { job_id } => update(shared, &thing, job_id, &b),
            }
        }),
    };
    let changed = matches!(outcome, Ok((_, true)));
    match gate {
        Gate::Serve { drop_reply: true } => {
            shared.log_event(
                "dropped",
                (&session.client_id, session.conn_id),
                Some(&req.topic),
                None,
                Some("injected fault: reply dropped".to_owned()),
            );
        }
        _ => {
            let (suffix, mut reply) = match outcome {
                Ok((accepted, _)) => ("accepted", accepted),
                Err(r) => ("rejected", rejection_body(r)),
            };
            reply.insert("timestamp".to_owned(), json!(shared.clock.now()));
            if let Some(token) = client_token {
                reply.insert("clientToken".to_owned(), Value::String(token));
            }
            let topic = format!("{}/{suffix}", req.topic);
            shared.reply(
                session,
                &topic,
                Bytes::from(Value::Object(reply).to_string()),
                false,
            );
        }
    }
    // A dropped reply still did the work, so the pushes still follow it.
    if changed {
        notify_thing(shared, &thing);
    }
}

fn rejection_body(r: Rejection) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("code".to_owned(), Value::String(r.code));
    m.insert("message".to_owned(), Value::String(r.message));
    if let Some(state) = r.execution_state {
        m.insert("executionState".to_owned(), state);
    }
    m
}

/// The request body; an empty payload is an empty request, as every field is optional for
/// three of the four APIs and SDKs differ on sending `{}` or nothing.
fn parse_body(payload: &[u8]) -> Result<Map<String, Value>, Rejection> {
    if payload.is_empty() {
        return Ok(Map::new());
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| Rejection::new("InvalidJson", "The request payload is not valid UTF-8."))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Rejection::invalid(
            "The request payload must be a JSON object.",
        )),
        Err(e) => Err(Rejection::new(
            "InvalidJson",
            format!("The request payload is not valid JSON: {e}"),
        )),
    }
}

fn check_client_token(body: &Map<String, Value>) -> Result<(), Rejection> {
    match body.get("clientToken") {
        None => Ok(()),
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= CLIENT_TOKEN_MAX => Ok(()),
        Some(_) => Err(Rejection::invalid(format!(
            "clientToken must be a string of 1 to {CLIENT_TOKEN_MAX} characters."
        ))),
    }
}

fn opt_bool(body: &Map<String, Value>, name: &str) -> Result<Option<bool>, Rejection> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(Rejection::invalid(format!("{name} must be a boolean."))),
    }
}

fn opt_i64(body: &Map<String, Value>, name: &str) -> Result<Option<i64>, Rejection> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| Rejection::invalid(format!("{name} must be an integer."))),
    }
}

/// `statusDetails`: a map of strings (AWS: keys `[a-zA-Z0-9:_-]+` up to 128 characters,
/// values up to 1024 characters).
fn status_details(
    body: &Map<String, Value>,
) -> Result<Option<BTreeMap<String, String>>, Rejection> {
    let Some(v) = body.get("statusDetails").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let obj = v
        .as_object()
        .ok_or_else(|| Rejection::invalid("statusDetails must be an object of strings."))?;
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let key_ok = !k.is_empty()
            && k.len() <= 128
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-'));
        if !key_ok {
            return Err(Rejection::invalid(format!(
                "statusDetails key {k:?} must match [a-zA-Z0-9:_-]+ (1 to 128 characters)."
            )));
        }
        match v {
            Value::String(s) if !s.is_empty() && s.chars().count() <= 1024 => {
                out.insert(k.clone(), s.clone());
            }
            _ => {
                return Err(Rejection::invalid(format!(
                    "statusDetails.{k} must be a string of 1 to 1024 characters."
                )));
            }
        }
    }
    Ok(Some(out))
}

/// What `stepTimeoutInMinutes` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepTimer {
    Cancel,
    Minutes(i64),
}

fn step_timer(body: &Map<String, Value>) -> Result<Option<StepTimer>, Rejection> {
    match opt_i64(body, "stepTimeoutInMinutes")? {
        None => Ok(None),
        Some(-1) => Ok(Some(StepTimer::Cancel)),
        Some(m) if (1..=STEP_TIMEOUT_MAX).contains(&m) => Ok(Some(StepTimer::Minutes(m))),
        Some(m) => Err(Rejection::invalid(format!(
            "stepTimeoutInMinutes must be between 1 and {STEP_TIMEOUT_MAX}, or -1 to cancel the timer; got {m}."
        ))),
    }
}

/// Sets the deadline of an execution entering or staying in IN_PROGRESS. The registry keeps
/// one deadline, so it holds the earlier of the step timer (`stepTimeoutInMinutes`, reset or
/// cancelled by each request that gives it) and the job's in-progress timeout (counted from
/// `startedAt`, which AWS says step timers do not affect). Without `stepTimeoutInMinutes`
/// the deadline already stored stands.
fn apply_step_timer(
    exec: &mut JobExecution,
    timer: Option<StepTimer>,
    job_timeout_minutes: Option<i64>,
    now: i64,
) {
    let job_deadline = exec
        .started_at
        .zip(job_timeout_minutes.filter(|m| *m > 0))
        .map(|(started, m)| started + m * 60);
    let step_deadline = match timer {
        Some(StepTimer::Minutes(m)) => Some(now + m * 60),
        Some(StepTimer::Cancel) => None,
        None if exec.step_timeout_at.is_some() => return,
        None => None,
    };
    exec.step_timeout_at = match (step_deadline, job_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
}

fn execution_key(thing: &str, job_id: &str) -> String {
    format!("{thing}/{job_id}")
}

/// The job document as a JSON object. CreateJob takes it as a string; parse it here in case
/// the control plane stored it unparsed.
fn job_document(reg: &Registry, job_id: &str) -> Option<Value> {
    let doc = &reg.jobs.get(job_id)?.document;
    match doc {
        Value::String(s) => Some(serde_json::from_str(s).unwrap_or_else(|_| doc.clone())),
        other => Some(other.clone()),
    }
}

/// `JobExecutionState`.
fn execution_state(exec: &JobExecution) -> Value {
    json!({"status": exec.status, "statusDetails": exec.status_details, "versionNumber": exec.version_number})
}

/// `JobExecutionSummary`.
fn summary(exec: &JobExecution) -> Value {
    let mut m = Map::new();
    m.insert("jobId".to_owned(), json!(exec.job_id));
    m.insert("queuedAt".to_owned(), json!(exec.queued_at));
    if let Some(t) = exec.started_at {
        m.insert("startedAt".to_owned(), json!(t));
    }
    m.insert("lastUpdatedAt".to_owned(), json!(exec.last_updated_at));
    m.insert("versionNumber".to_owned(), json!(exec.version_number));
    m.insert("executionNumber".to_owned(), json!(exec.execution_number));
    Value::Object(m)
}

/// `JobExecutionData`.
fn execution_data(reg: &Registry, exec: &JobExecution, include_document: bool) -> Value {
    let mut m = Map::new();
    m.insert("jobId".to_owned(), json!(exec.job_id));
    m.insert("thingName".to_owned(), json!(exec.thing_name));
    if include_document && let Some(doc) = job_document(reg, &exec.job_id) {
        m.insert("jobDocument".to_owned(), doc);
    }
    m.insert("status".to_owned(), json!(exec.status));
    if !exec.status_details.is_empty() {
        m.insert("statusDetails".to_owned(), json!(exec.status_details));
    }
    m.insert("queuedAt".to_owned(), json!(exec.queued_at));
    if let Some(t) = exec.started_at {
        m.insert("startedAt".to_owned(), json!(t));
    }
    m.insert("lastUpdatedAt".to_owned(), json!(exec.last_updated_at));
    m.insert("versionNumber".to_owned(), json!(exec.version_number));
    m.insert("executionNumber".to_owned(), json!(exec.execution_number));
    Value::Object(m)
}

fn get_pending(shared: &Shared, thing: &str) -> Outcome {
    let (in_progress, queued) = shared.read(|reg| {
        let pending = reg.pending_executions(thing);
        let (a, b): (Vec<&JobExecution>, Vec<&JobExecution>) =
            pending.into_iter().partition(|e| e.status == "IN_PROGRESS");
        (
            a.into_iter().map(summary).collect::<Vec<_>>(),
            b.into_iter().map(summary).collect::<Vec<_>>(),
        )
    });
    let mut m = Map::new();
    m.insert("inProgressJobs".to_owned(), Value::Array(in_progress));
    m.insert("queuedJobs".to_owned(), Value::Array(queued));
    Ok((m, false))
}

fn start_next(shared: &Shared, thing: &str, body: &Map<String, Value>) -> Outcome {
    let details = status_details(body)?;
    let timer = step_timer(body)?;
    let now = shared.clock.now();
    shared.write(|reg| {
        let Some(key) = reg
            .pending_executions(thing)
            .first()
            .map(|e| execution_key(thing, &e.job_id))
        else {
            // Nothing pending: accepted, without `execution`.
            return Ok((Map::new(), false));
        };
        let job_timeout = reg
            .executions
            .get(&key)
            .and_then(|e| reg.jobs.get(&e.job_id))
            .and_then(|j| j.step_timeout_minutes);
        let Some(exec) = reg.executions.get_mut(&key) else {
            return Err(Rejection::new(
                "InternalError",
                "the pending execution vanished",
            ));
        };
        // The head may already be IN_PROGRESS (a device restarting mid-job): it is returned
        // as it is, like AWS does for "the next pending (IN_PROGRESS or QUEUED) execution".
        let changed = exec.status == "QUEUED";
        if changed {
            exec.status = "IN_PROGRESS".to_owned();
            exec.started_at = Some(now);
            exec.last_updated_at = now;
            exec.version_number += 1;
            if let Some(d) = details {
                exec.status_details = d;
            }
            apply_step_timer(exec, timer, job_timeout, now);
        }
        let exec = exec.clone();
        let mut m = Map::new();
        m.insert("execution".to_owned(), execution_data(reg, &exec, true));
        Ok((m, changed))
    })
}

fn describe(shared: &Shared, thing: &str, job_id: &str, body: &Map<String, Value>) -> Outcome {
    let execution_number = opt_i64(body, "executionNumber")?;
    let include_document = opt_bool(body, "includeJobDocument")?.unwrap_or(true);
    shared.read(|reg| {
        let mut m = Map::new();
        if job_id == "$next" {
            // `$next` with nothing pending is accepted without `execution`.
            if let Some(exec) = reg.pending_executions(thing).first() {
                m.insert(
                    "execution".to_owned(),
                    execution_data(reg, exec, include_document),
                );
            }
            return Ok((m, false));
        }
        let exec = reg
            .executions
            .get(&execution_key(thing, job_id))
            .filter(|e| execution_number.is_none_or(|n| n == e.execution_number))
            .ok_or_else(|| not_found(thing, job_id))?;
        if exec.is_terminal() {
            // AWS: TerminalStateReached "occurs when a command to describe a job is performed
            // on a job that is in a terminal state".
            return Err(Rejection::new(
                "TerminalStateReached",
                format!(
                    "Job execution {job_id} of thing {thing} is in terminal state {}.",
                    exec.status
                ),
            ));
        }
        m.insert(
            "execution".to_owned(),
            execution_data(reg, exec, include_document),
        );
        Ok((m, false))
    })
}

fn not_found(thing: &str, job_id: &str) -> Rejection {
    Rejection::new(
        "ResourceNotFound",
        format!("Job execution {job_id} of thing {thing} not found."),
    )
}

fn update(shared: &Shared, thing: &str, job_id: &str, body: &Map<String, Value>) -> Outcome {
    if job_id == "$next" {
        return Err(Rejection::new(
            "InvalidTopic",
            "$next is only valid for DescribeJobExecution.",
        ));
    }
    let status = match body.get("status") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(Rejection::invalid("status must be a string.")),
        None => return Err(Rejection::invalid("status is required.")),
    };
    if !DEVICE_STATUSES.contains(&status.as_str()) && !SERVICE_STATUSES.contains(&status.as_str()) {
        return Err(Rejection::invalid(format!(
            "{status} is not a job execution status."
        )));
    }
    let details = status_details(body)?;
    let expected_version = opt_i64(body, "expectedVersion")?;
    let execution_number = opt_i64(body, "executionNumber")?;
    let include_state = opt_bool(body, "includeJobExecutionState")?.unwrap_or(false);
    let include_document = opt_bool(body, "includeJobDocument")?.unwrap_or(false);
    let timer = step_timer(body)?;
    let now = shared.clock.now();
    shared.write(|reg| {
        let key = execution_key(thing, job_id);
        let job_timeout = reg.jobs.get(job_id).and_then(|j| j.step_timeout_minutes);
        let exec = reg
            .executions
            .get_mut(&key)
            .filter(|e| execution_number.is_none_or(|n| n == e.execution_number))
            .ok_or_else(|| not_found(thing, job_id))?;
        if let Some(v) = expected_version
            && v != exec.version_number
        {
            return Err(Rejection::with_state(
                "VersionMismatch",
                format!(
                    "Expected version {v} but the job execution is at version {}.",
                    exec.version_number
                ),
                exec,
            ));
        }
        // AWS docs give SUCCEEDED -> IN_PROGRESS as their example of InvalidStateTransition, so
        // every update of a terminal execution is one; devices may only report the four
        // statuses of DEVICE_STATUSES.
        let allowed = matches!(exec.status.as_str(), "QUEUED" | "IN_PROGRESS")
            && DEVICE_STATUSES.contains(&status.as_str());
        if !allowed {
            return Err(Rejection::with_state(
                "InvalidStateTransition",
                format!(
                    "Cannot update job execution {job_id} from {} to {status}.",
                    exec.status
                ),
                exec,
            ));
        }
        let starting = exec.status == "QUEUED";
        exec.status = status.clone();
        if let Some(d) = details {
            exec.status_details = d;
        }
        if status == "IN_PROGRESS" {
            if starting {
                exec.started_at = Some(now);
            }
            apply_step_timer(exec, timer, job_timeout, now);
        } else {
            exec.step_timeout_at = None;
        }
        exec.last_updated_at = now;
        exec.version_number += 1;
        let exec = exec.clone();
        let mut m = Map::new();
        if include_state {
            m.insert("executionState".to_owned(), execution_state(&exec));
        }
        if include_document && let Some(doc) = job_document(reg, job_id) {
            m.insert("jobDocument".to_owned(), doc);
        }
        Ok((m, true))
    })
}

/// What was last pushed for one thing: the pending list as (jobId, status), and the head of
/// the queue as (jobId, executionNumber).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pushed {
    list: Vec<(String, String)>,
    head: Option<(String, i64)>,
}

/// Publishes `notify` when the thing's pending list changed and `notify-next` when the head of
/// its queue changed, since the last call. Called by the control plane after CreateJob and by
/// this module after every change of an execution. It reads the registry itself, so it must
/// not be called from inside `Shared::read`/`Shared::write` (the registry lock is not
/// re-entrant).
pub fn notify_thing(shared: &Shared, thing_name: &str) {
    // Held while publishing so that concurrent changes push in the order computed.
    let mut pushed = lock(&shared.job_pushes);
    let now = shared.clock.now();
    let (current, notify, next) = shared.read(|reg| {
        let pending = reg.pending_executions(thing_name);
        let current = Pushed {
            list: pending
                .iter()
                .map(|e| (e.job_id.clone(), e.status.clone()))
                .collect(),
            head: pending
                .first()
                .map(|e| (e.job_id.clone(), e.execution_number)),
        };
        let mut groups: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for e in pending.iter().take(NOTIFY_LIMIT) {
            groups
                .entry(e.status.as_str())
                .or_default()
                .push(summary(e));
        }
        let notify = json!({"timestamp": now, "jobs": groups});
        let next = match pending.first() {
            Some(e) => json!({"timestamp": now, "execution": execution_data(reg, e, true)}),
            None => json!({"timestamp": now}),
        };
        (current, notify, next)
    });
    let key = thing_name.to_owned();
    let previous = pushed.get(&key).cloned().unwrap_or_default();
    if previous.list != current.list {
        shared.route(
            &format!("$aws/things/{thing_name}/jobs/notify"),
            &Bytes::from(notify.to_string()),
        );
    }
    if previous.head != current.head {
        shared.route(
            &format!("$aws/things/{thing_name}/jobs/notify-next"),
            &Bytes::from(next.to_string()),
        );
    }
    // An empty state is the default; dropping it keeps the map to things with pending work.
    if current == Pushed::default() {
        pushed.remove(&key);
    } else {
        pushed.insert(key, current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topics_parse_and_reply_topics_do_not() {
        let t = |s: &str| parse_topic(s);
        assert_eq!(
            t("$aws/things/gw-1/jobs/get"),
            Some(("gw-1".into(), Op::GetPending))
        );
        assert_eq!(
            t("$aws/things/gw-1/jobs/start-next"),
            Some(("gw-1".into(), Op::StartNext))
        );
        assert_eq!(
            t("$aws/things/gw-1/jobs/$next/get"),
            Some((
                "gw-1".into(),
                Op::Describe {
                    job_id: "$next".into()
                }
            ))
        );
        assert_eq!(
            t("$aws/things/gw-1/jobs/j1/update"),
            Some((
                "gw-1".into(),
                Op::Update {
                    job_id: "j1".into()
                }
            ))
        );
        for reply in [
            "$aws/things/gw-1/jobs/get/accepted",
            "$aws/things/gw-1/jobs/j1/update/rejected",
            "$aws/things/gw-1/jobs/notify",
            "$aws/things/gw-1/jobs/notify-next",
            "$aws/things/gw-1/shadow/get",
            "$aws/things//jobs/get",
        ] {
            assert!(!is_api_topic(reply), "{reply}");
        }
    }

    #[test]
    fn body_and_field_validation() {
        assert_eq!(parse_body(b"").map(|m| m.len()), Ok(0));
        assert_eq!(
            parse_body(b"{nope").map_err(|r| r.code),
            Err("InvalidJson".to_owned())
        );
        assert_eq!(
            parse_body(b"[1]").map_err(|r| r.code),
            Err("InvalidRequest".to_owned())
        );
        let body = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(
            step_timer(&body(json!({"stepTimeoutInMinutes": -1}))),
            Ok(Some(StepTimer::Cancel))
        );
        assert_eq!(
            step_timer(&body(json!({"stepTimeoutInMinutes": 5}))),
            Ok(Some(StepTimer::Minutes(5)))
        );
        assert!(step_timer(&body(json!({"stepTimeoutInMinutes": 0}))).is_err());
        assert!(step_timer(&body(json!({"stepTimeoutInMinutes": 10_081}))).is_err());
        assert!(status_details(&body(json!({"statusDetails": {"step": 1}}))).is_err());
        assert!(status_details(&body(json!({"statusDetails": {"bad key": "x"}}))).is_err());
        assert_eq!(
            status_details(&body(json!({"statusDetails": {"step": "download"}}))),
            Ok(Some(BTreeMap::from([(
                "step".to_owned(),
                "download".to_owned()
            )])))
        );
        assert!(check_client_token(&body(json!({"clientToken": 7}))).is_err());
        assert!(check_client_token(&body(json!({"clientToken": "x".repeat(65)}))).is_err());
        assert!(check_client_token(&body(json!({"clientToken": "abc"}))).is_ok());
    }
}
