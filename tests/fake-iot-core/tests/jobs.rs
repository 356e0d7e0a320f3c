//! The Jobs MQTT API against the real binary: a device provisioned through fleet provisioning
//! (production policy scoped by `${iot:Connection.Thing.ThingName}`) gets jobs created through
//! the control plane, is pushed `notify`/`notify-next`, and drives executions with
//! start-next, describe and update, including version conflicts, terminal states and faults.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use rumqttc::{Event, Packet};
use serde_json::{Value, json};

/// A provisioned device, connected as its thing.
struct Online {
    fake: Fake,
    thing: String,
    inbox: Inbox,
}

async fn online(serial: &str) -> Online {
    let fake = Fake::start(
        &[("gw", device_template())],
        &["--claim", "factory=gw", "--no-connect-throttle"],
    )
    .await;
    let claim = fake.claim("factory");
    let params = BTreeMap::from([("SerialNumber", serial)]);
    let device = provision_csr(&fake, &claim, "gw", &params, &format!("claim-{serial}"))
        .await
        .expect("provisioning the device");
    let mqtt = Mqtt::connect(&fake, &device.identity, &device.thing_name)
        .await
        .unwrap();
    Online {
        fake,
        thing: device.thing_name,
        inbox: Inbox {
            mqtt,
            stash: Vec::new(),
        },
    }
}

/// The MQTT client with a stash, so that waiting for one topic does not lose messages that
/// arrive first on another (`notify` and `notify-next` come together).
struct Inbox {
    mqtt: Mqtt,
    stash: Vec<(String, Value)>,
}

impl Inbox {
    /// The first message on a topic matching `filter`, already received or still to come.
    async fn take(&mut self, filter: &str) -> (String, Value) {
        if let Some(i) = self
            .stash
            .iter()
            .position(|(t, _)| fake_iot_core::mqtt::topic_matches(t, filter))
        {
            return self.stash.remove(i);
        }
        loop {
            match self.mqtt.next().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let value: Value =
                        serde_json::from_slice(&p.payload).expect("Jobs messages are JSON");
                    if fake_iot_core::mqtt::topic_matches(&p.topic, filter) {
                        return (p.topic, value);
                    }
                    self.stash.push((p.topic, value));
                }
                Ok(_) => {}
                Err(e) => panic!("waiting for a message on {filter}: {e}"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        let codes = self.mqtt.subscribe(filter).await;
        assert!(
            !codes.contains(&rumqttc::SubscribeReasonCode::Failure),
            "subscription to {filter} refused"
        );
    }

    /// Publishes a request without subscribing to its replies (Jobs replies need no
    /// subscription) and returns `Ok(accepted)` or `Err(rejected)`.
    async fn request(&mut self, topic: &str, body: &Value) -> Result<Value, Value> {
        self.mqtt.publish(topic, body.to_string()).await;
        self.reply(topic).await
    }

    async fn reply(&mut self, topic: &str) -> Result<Value, Value> {
        let (t, v) = self.take(&format!("{topic}/+")).await;
        assert!(
            v["timestamp"].is_i64(),
            "every reply has an epoch-seconds timestamp: {v}"
        );
        if t.ends_with("/accepted") {
            Ok(v)
        } else {
            Err(v)
        }
    }
}

fn jobs_topic(thing: &str, rest: &str) -> String {
    format!("$aws/things/{thing}/jobs/{rest}")
}

/// CreateJob through the control plane.
async fn create_job(fake: &Fake, job_id: &str, thing: &str, document: &Value) {
    create_job_with(fake, job_id, thing, document, json!({})).await;
}

async fn create_job_with(fake: &Fake, job_id: &str, thing: &str, document: &Value, extra: Value) {
    let mut body = json!({
        "targets": [format!("arn:aws:iot:us-east-1:123456789012:thing/{thing}")],
        "document": document.to_string(),
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    let (status, kind, reply) = fake
        .http("PUT", &format!("/jobs/{job_id}"), Some(body))
        .await;
    assert_eq!(status, 200, "CreateJob {job_id}: {kind:?} {reply}");
}

async fn add_fault(fake: &Fake, rule: Value) {
    let (status, _, body) = fake.http("POST", "/_fake/faults", Some(rule)).await;
    assert_eq!(status, 201, "{body}");
}

fn rotate() -> Value {
    json!({"operation": "ROTATE_CERTIFICATE", "reason": "test"})
}

#[tokio::test]
async fn create_job_pushes_notifications_and_start_next_starts_it() {
    let Online {
        fake,
        thing,
        mut inbox,
    } = online("0001").await;
    inbox.subscribe(&jobs_topic(&thing, "notify-next")).await;
    inbox.subscribe(&jobs_topic(&thing, "notify")).await;

    create_job(&fake, "rotate-1", &thing, &rotate()).await;
    let (_, next) = inbox.take(&jobs_topic(&thing, "notify-next")).await;
    let exec = &next["execution"];
    assert_eq!(exec["jobId"], "rotate-1");
    assert_eq!(exec["thingName"], thing.as_str());
    assert_eq!(exec["status"], "QUEUED");
    assert_eq!(
        exec["jobDocument"],
        rotate(),
        "the document is pushed as a JSON object"
    );
    assert_eq!(
        (
            exec["versionNumber"].as_i64(),
            exec["executionNumber"].as_i64()
        ),
        (Some(1), Some(1))
    );
    assert!(next["timestamp"].is_i64());
    let (_, notify) = inbox.take(&jobs_topic(&thing, "notify")).await;
    assert_eq!(notify["jobs"]["QUEUED"][0]["jobId"], "rotate-1");
    assert!(notify["jobs"].get("IN_PROGRESS").is_none(), "{notify}");

    let started = inbox
        .request(
            &jobs_topic(&thing, "start-next"),
            &json!({"clientToken": "sn-1", "statusDetails": {"step": "csr"}, "stepTimeoutInMinutes": 10}),
        )
        .await
        .expect("start-next accepted");
    assert_eq!(started["clientToken"], "sn-1");
    let exec = &started["execution"];
    assert_eq!(exec["jobId"], "rotate-1");
    assert_eq!(exec["status"], "IN_PROGRESS");
    assert_eq!(exec["statusDetails"], json!({"step": "csr"}));
    assert_eq!(exec["versionNumber"], 2);
    assert_eq!(exec["jobDocument"], rotate());
    let started_at = exec["startedAt"].as_i64().expect("startedAt set");
    let registry = fake.registry().await;
    let timeout_at = registry["executions"][format!("{thing}/rotate-1")]["stepTimeoutAt"].as_i64();
    assert_eq!(
        timeout_at,
        Some(started_at + 600),
        "stepTimeoutInMinutes starts the step timer"
    );

    // Moving to IN_PROGRESS changes the list but not its head: notify only.
    let (_, notify) = inbox.take(&jobs_topic(&thing, "notify")).await;
    assert_eq!(notify["jobs"]["IN_PROGRESS"][0]["jobId"], "rotate-1");
    assert_eq!(notify["jobs"]["IN_PROGRESS"][0]["versionNumber"], 2);

    // A second job queues behind the first: notify, and no notify-next (the head is the
    // same); finishing the first makes the second the head, and that is the next notify-next.
    create_job(&fake, "rotate-2", &thing, &json!({"operation": "NOOP"})).await;
    let (_, notify) = inbox.take(&jobs_topic(&thing, "notify")).await;
    assert_eq!(notify["jobs"]["IN_PROGRESS"][0]["jobId"], "rotate-1");
    assert_eq!(notify["jobs"]["QUEUED"][0]["jobId"], "rotate-2");
    inbox
        .request(
            &jobs_topic(&thing, "rotate-1/update"),
            &json!({"status": "SUCCEEDED", "expectedVersion": 2}),
        )
        .await
        .expect("update accepted");
    let (_, next) = inbox.take(&jobs_topic(&thing, "notify-next")).await;
    assert_eq!(
        next["execution"]["jobId"], "rotate-2",
        "no notify-next was sent while the head stayed"
    );
    assert_eq!(
        next["execution"]["jobDocument"],
        json!({"operation": "NOOP"})
    );
}

#[tokio::test]
async fn replies_arrive_without_subscription_and_echo_client_token() {
    let Online {
        fake,
        thing,
        mut inbox,
    } = online("0002").await;
    let empty = inbox
        .request(&jobs_topic(&thing, "get"), &json!({"clientToken": "tok-1"}))
        .await
        .expect("get accepted");
    assert_eq!(empty["clientToken"], "tok-1");
    assert_eq!(
        (&empty["inProgressJobs"], &empty["queuedJobs"]),
        (&json!([]), &json!([]))
    );

    create_job(&fake, "job-a", &thing, &json!({"n": 1})).await;
    create_job(&fake, "job-b", &thing, &json!({"n": 2})).await;
    let pending = inbox
        .request(&jobs_topic(&thing, "get"), &json!({}))
        .await
        .expect("get accepted");
    assert!(
        pending.get("clientToken").is_none(),
        "no token asked, none echoed: {pending}"
    );
    let queued: Vec<&str> = pending["queuedJobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["jobId"].as_str().unwrap())
        .collect();
    assert_eq!(queued, ["job-a", "job-b"]);
    let summary = &pending["queuedJobs"][0];
    for field in [
        "queuedAt",
        "lastUpdatedAt",
        "versionNumber",
        "executionNumber",
    ] {
        assert!(summary[field].is_i64(), "summary has {field}: {summary}");
    }
    assert!(
        summary.get("jobDocument").is_none(),
        "summaries carry no document"
    );

    // An empty payload is an empty request; rejections echo the token too.
    inbox
        .mqtt
        .publish(&jobs_topic(&thing, "get"), Vec::new())
        .await;
    inbox
        .reply(&jobs_topic(&thing, "get"))
        .await
        .expect("empty payload accepted");
    let missing = inbox
        .request(
            &jobs_topic(&thing, "nope/get"),
            &json!({"clientToken": "tok-2"}),
        )
        .await
        .expect_err("unknown job rejected");
    assert_eq!(
        (missing["code"].as_str(), missing["clientToken"].as_str()),
        (Some("ResourceNotFound"), Some("tok-2"))
    );

    // Nothing was subscribed, yet every reply arrived.
    let listing = fake.http("GET", "/_fake/connections", None).await.2;
    let device = listing["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["clientId"] == thing.as_str())
        .cloned();
    assert_eq!(
        device.expect("the device is listed")["subscriptions"],
        json!([])
    );
}

#[tokio::test]
async fn update_checks_expected_version_and_returns_requested_state() {
    let Online {
        fake,
        thing,
        mut inbox,
    } = online("0003").await;
    create_job(&fake, "rotate", &thing, &rotate()).await;
    let update = jobs_topic(&thing, "rotate/update");

    let stale = inbox
        .request(
            &update,
            &json!({"status": "IN_PROGRESS", "expectedVersion": 7, "clientToken": "u-1"}),
        )
        .await
        .expect_err("stale version rejected");
    assert_eq!(stale["code"], "VersionMismatch");
    assert_eq!(stale["clientToken"], "u-1");
    assert_eq!(stale["executionState"]["status"], "QUEUED");
    assert_eq!(stale["executionState"]["versionNumber"], 1);

    // QUEUED -> IN_PROGRESS straight from update, with state and document asked for.
    let ok = inbox
        .request(
            &update,
            &json!({"status": "IN_PROGRESS", "expectedVersion": 1, "statusDetails": {"step": "csr"},
                    "includeJobExecutionState": true, "includeJobDocument": true}),
        )
        .await
        .expect("update accepted");
    assert_eq!(
        ok["executionState"],
        json!({"status": "IN_PROGRESS", "statusDetails": {"step": "csr"}, "versionNumber": 2})
    );
    assert_eq!(ok["jobDocument"], rotate());

    // Progress updates bump the version; without the include flags the reply is bare.
    let bare = inbox
        .request(&update, &json!({"status": "IN_PROGRESS", "expectedVersion": 2, "statusDetails": {"step": "register"}}))
        .await
        .expect("progress update accepted");
    assert!(
        bare.get("executionState").is_none() && bare.get("jobDocument").is_none(),
        "{bare}"
    );
    let conflict = inbox
        .request(
            &update,
            &json!({"status": "SUCCEEDED", "expectedVersion": 2}),
        )
        .await
        .expect_err("second writer with the old version loses");
    assert_eq!(conflict["code"], "VersionMismatch");
    assert_eq!(conflict["executionState"]["versionNumber"], 3);
    assert_eq!(
        conflict["executionState"]["statusDetails"],
        json!({"step": "register"})
    );

    // Statuses only the service sets, and malformed fields.
    let queued = inbox
        .request(&update, &json!({"status": "QUEUED"}))
        .await
        .expect_err("QUEUED is not for devices");
    assert_eq!(queued["code"], "InvalidStateTransition");
    assert_eq!(queued["executionState"]["status"], "IN_PROGRESS");
    for bad in [
        json!({}),
        json!({"status": "DONE"}),
        json!({"status": "FAILED", "statusDetails": {"n": 1}}),
    ] {
        let r = inbox
            .request(&update, &bad)
            .await
            .expect_err("invalid update rejected");
        assert_eq!(r["code"], "InvalidRequest", "{bad} -> {r}");
    }
    inbox.mqtt.publish(&update, "{not json").await;
    let r = inbox.reply(&update).await.expect_err("bad JSON rejected");
    assert_eq!(r["code"], "InvalidJson");
}

#[tokio::test]
async fn terminal_executions_reject_updates_and_leave_the_queue() {
    let Online {
        fake,
        thing,
        mut inbox,
    } = online("0004").await;
    inbox.subscribe(&jobs_topic(&thing, "notify-next")).await;
    inbox.subscribe(&jobs_topic(&thing, "notify")).await;
    create_job(&fake, "rotate", &thing, &rotate()).await;
    inbox.take(&jobs_topic(&thing, "notify-next")).await;
    inbox.take(&jobs_topic(&thing, "notify")).await;

    let done = inbox
        .request(
            &jobs_topic(&thing, "rotate/update"),
            &json!({"status": "SUCCEEDED", "includeJobExecutionState": true}),
        )
        .await
        .expect("QUEUED -> SUCCEEDED accepted");
    assert_eq!(done["executionState"]["status"], "SUCCEEDED");

    // The queue emptied: notify with no groups and notify-next with only a timestamp.
    let (_, notify) = inbox.take(&jobs_topic(&thing, "notify")).await;
    assert_eq!(notify["jobs"], json!({}));
    let (_, next) = inbox.take(&jobs_topic(&thing, "notify-next")).await;
    assert!(
        next.get("execution").is_none() && next["timestamp"].is_i64(),
        "{next}"
    );

    // Once terminal, any update is an invalid transition (AWS's own example is SUCCEEDED ->
    // IN_PROGRESS) and describing it is TerminalStateReached.
    let again = inbox
        .request(
            &jobs_topic(&thing, "rotate/update"),
            &json!({"status": "IN_PROGRESS", "clientToken": "late"}),
        )
        .await
        .expect_err("update after SUCCEEDED rejected");
    assert_eq!(again["code"], "InvalidStateTransition");
    assert_eq!(again["clientToken"], "late");
    assert_eq!(again["executionState"]["status"], "SUCCEEDED");
    let described = inbox
        .request(&jobs_topic(&thing, "rotate/get"), &json!({}))
        .await
        .expect_err("describe of a terminal execution rejected");
    assert_eq!(described["code"], "TerminalStateReached");

    // Nothing pending: start-next and $next are accepted without an execution.
    let none = inbox
        .request(
            &jobs_topic(&thing, "start-next"),
            &json!({"clientToken": "sn"}),
        )
        .await
        .expect("accepted");
    assert!(none.get("execution").is_none(), "{none}");
    assert_eq!(none["clientToken"], "sn");
    let none = inbox
        .request(&jobs_topic(&thing, "$next/get"), &json!({}))
        .await
        .expect("accepted");
    assert!(none.get("execution").is_none(), "{none}");
    let (_, _, job) = fake.http("GET", "/jobs/rotate", None).await;
    assert_eq!(job["job"]["status"], "COMPLETED", "{job}");
}

#[tokio::test]
async fn next_get_describes_the_head_of_the_queue() {
    let Online {
        fake,
        thing,
        mut inbox,
    } = online("0005").await;
    create_job(&fake, "first", &thing, &json!({"n": 1})).await;
    create_job(&fake, "second", &thing, &json!({"n": 2})).await;
    let next = jobs_topic(&thing, "$next/get");

    let head = inbox
        .request(&next, &json!({"clientToken": "d-1"}))
        .await
        .expect("$next accepted");
    assert_eq!(head["clientToken"], "d-1");
    assert_eq!(head["execution"]["jobId"], "first");
    assert_eq!(
        head["execution"]["jobDocument"],
        json!({"n": 1}),
        "includeJobDocument defaults to true"
    );
    let lean = inbox
        .request(&next, &json!({"includeJobDocument": false}))
        .await
        .expect("$next accepted");
    assert!(lean["execution"].get("jobDocument").is_none(), "{lean}");

    // An IN_PROGRESS execution comes before older QUEUED ones.
    inbox
        .request(
            &jobs_topic(&thing, "second/update"),
            &json!({"status": "IN_PROGRESS"}),
        )
        .await
        .expect("second started");
    let head = inbox
        .request(&next, &json!({}))
        .await
        .expect("$next accepted");
    assert_eq!(head["execution"]["jobId"], "second");
    assert_eq!(head["execution"]["status"], "IN_PROGRESS");
    // start-next returns the execution already in progress rather than starting another.
    let started = inbox
        .request(&jobs_topic(&thing, "start-next"), &json!({}))
        .await
        .expect("accepted");
    assert_eq!(started["execution"]["jobId"], "second");
    assert_eq!(started["execution"]["versionNumber"], 2);

    // A specific job, with and without the right execution number.
    let first = inbox
        .request(
            &jobs_topic(&thing, "first/get"),
            &json!({"executionNumber": 1}),
        )
        .await
        .expect("accepted");
    assert_eq!(first["execution"]["status"], "QUEUED");
    let wrong = inbox
        .request(
            &jobs_topic(&thing, "first/get"),
            &json!({"executionNumber": 9}),
        )
        .await
        .expect_err("no such execution number");
    assert_eq!(wrong["code"], "ResourceNotFound");
}

#[tokio::test]
async fn injected_faults_and_throttle_apply_to_jobs_requests() {
    let Online {
        fake,
        thing,
        mut inbox,
    } = online("0006").await;
    let get = jobs_topic(&thing, "get");
    add_fault(
        &fake,
        json!({"api": "Jobs", "action": "reject", "statusCode": 500, "errorCode": "InternalError",
               "errorMessage": "injected", "count": 1}),
    )
    .await;
    let r = inbox
        .request(&get, &json!({"clientToken": "f-1"}))
        .await
        .expect_err("injected rejection");
    assert_eq!(
        (
            r["code"].as_str(),
            r["message"].as_str(),
            r["clientToken"].as_str()
        ),
        (Some("InternalError"), Some("injected"), Some("f-1"))
    );

    // A dropped reply: the next request's reply is the first to arrive.
    add_fault(&fake, json!({"api": "Jobs", "action": "drop", "count": 1})).await;
    inbox
        .mqtt
        .publish(&get, json!({"clientToken": "dropped"}).to_string())
        .await;
    let r = inbox
        .request(&get, &json!({"clientToken": "kept"}))
        .await
        .expect("accepted");
    assert_eq!(r["clientToken"], "kept");

    let (status, _, _) = fake
        .http(
            "POST",
            "/_fake/throttle",
            Some(json!({"api": "Jobs", "perSecond": 0})),
        )
        .await;
    assert_eq!(status, 204);
    let r = inbox
        .request(&get, &json!({"clientToken": "t"}))
        .await
        .expect_err("throttled");
    assert_eq!(r["code"], "RequestThrottled");
    let (status, _, _) = fake
        .http(
            "POST",
            "/_fake/throttle",
            Some(json!({"api": "Jobs", "perSecond": null})),
        )
        .await;
    assert_eq!(status, 204);

    add_fault(
        &fake,
        json!({"api": "Jobs", "action": "disconnect", "count": 1}),
    )
    .await;
    inbox.mqtt.publish(&get, "{}").await;
    inbox.mqtt.expect_closed().await;
}

async fn advance_clock(fake: &Fake, seconds: i64) {
    let (status, _, body) = fake
        .http(
            "POST",
            "/_fake/clock",
            Some(json!({"advanceSeconds": seconds})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn step_timers_reset_on_update_and_time_the_execution_out() {
    let Online {
        fake,
        thing,
        mut inbox,
    } = online("0007").await;
    create_job(&fake, "slow", &thing, &rotate()).await;
    let next = jobs_topic(&thing, "$next/get");
    inbox
        .request(
            &jobs_topic(&thing, "start-next"),
            &json!({"stepTimeoutInMinutes": 1}),
        )
        .await
        .expect("start-next accepted");
    // Resetting the timer to five minutes keeps the execution alive past the first minute.
    inbox
        .request(
            &jobs_topic(&thing, "slow/update"),
            &json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 5}),
        )
        .await
        .expect("timer reset");
    advance_clock(&fake, 120).await;
    let head = inbox
        .request(&next, &json!({}))
        .await
        .expect("$next accepted");
    assert_eq!(head["execution"]["status"], "IN_PROGRESS", "{head}");
    advance_clock(&fake, 200).await;
    let head = inbox
        .request(&next, &json!({}))
        .await
        .expect("$next accepted");
    assert!(
        head.get("execution").is_none(),
        "timed out, so no longer pending: {head}"
    );
    let late = inbox
        .request(
            &jobs_topic(&thing, "slow/update"),
            &json!({"status": "SUCCEEDED"}),
        )
        .await
        .expect_err("a timed-out execution cannot succeed");
    assert_eq!(late["code"], "InvalidStateTransition");
    assert_eq!(late["executionState"]["status"], "TIMED_OUT");

    // The job's in-progress timeout bounds a longer step timer, and outlives a cancelled one.
    create_job_with(
        &fake,
        "bounded",
        &thing,
        &rotate(),
        json!({"timeoutConfig": {"inProgressTimeoutInMinutes": 3}}),
    )
    .await;
    let started = inbox
        .request(
            &jobs_topic(&thing, "start-next"),
            &json!({"stepTimeoutInMinutes": 10}),
        )
        .await
        .expect("start-next accepted");
    let started_at = started["execution"]["startedAt"]
        .as_i64()
        .expect("startedAt");
    let deadline = |registry: Value| {
        registry["executions"][format!("{thing}/bounded")]["stepTimeoutAt"].as_i64()
    };
    assert_eq!(deadline(fake.registry().await), Some(started_at + 180));
    inbox
        .request(
            &jobs_topic(&thing, "bounded/update"),
            &json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": -1}),
        )
        .await
        .expect("step timer cancelled");
    assert_eq!(deadline(fake.registry().await), Some(started_at + 180));
}

fn arn(resource: &str) -> String {
    format!("arn:aws:iot:us-east-1:123456789012:{resource}")
}

async fn create_group(fake: &Fake, name: &str, parent: Option<&str>) {
    let body = match parent {
        Some(p) => json!({"parentGroupName": p}),
        None => json!({}),
    };
    let (status, _, reply) = fake
        .http("POST", &format!("/thing-groups/{name}"), Some(body))
        .await;
    assert_eq!(status, 200, "{reply}");
}

async fn group_membership(fake: &Fake, group: &str, thing: &str, add: bool) {
    let path = if add {
        "/thing-groups/addThingToThingGroup"
    } else {
        "/thing-groups/removeThingFromThingGroup"
    };
    let (status, _, reply) = fake
        .http(
            "PUT",
            path,
            Some(json!({"thingGroupName": group, "thingName": thing})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
}

/// Job ids with an execution for `thing`, with their statuses (ListJobExecutionsForThing).
async fn executions_of(fake: &Fake, thing: &str) -> Vec<(String, String)> {
    let (_, _, list) = fake
        .http("GET", &format!("/things/{thing}/jobs"), None)
        .await;
    list["executionSummaries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["jobId"].as_str().unwrap().to_owned(),
                e["jobExecutionSummary"]["status"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect()
}

/// A CONTINUOUS job on a thing group reaches a thing added to the group (here to a child
/// group) after the job was created, and the device runs it by job id as iotd does
/// (DescribeJobExecution, UpdateJobExecution); the job never completes on its own. A SNAPSHOT
/// job on the same group does not reach the thing.
#[tokio::test]
async fn a_continuous_job_reaches_a_thing_that_joins_its_target_group_later() {
    let Online {
        fake,
        thing,
        mut inbox,
    } = online("c001").await;
    inbox.subscribe(&jobs_topic(&thing, "notify-next")).await;
    create_group(&fake, "rotate", None).await;
    create_group(&fake, "rotate-eu", Some("rotate")).await;
    let document = json!({"operation": "ROTATE_CERTIFICATE"});
    for (id, selection) in [("rot-c", "CONTINUOUS"), ("rot-s", "SNAPSHOT")] {
        let (status, kind, reply) = fake
            .http(
                "PUT",
                &format!("/jobs/{id}"),
                Some(json!({"targets": [arn("thinggroup/rotate")],
                    "document": document.to_string(), "targetSelection": selection})),
            )
            .await;
        assert_eq!(status, 200, "{kind:?} {reply}");
    }
    let (_, _, described) = fake.http("GET", "/jobs/rot-c", None).await;
    let j = &described["job"];
    assert_eq!(
        (j["status"].as_str(), j["targetSelection"].as_str()),
        (Some("IN_PROGRESS"), Some("CONTINUOUS"))
    );
    assert!(executions_of(&fake, &thing).await.is_empty());

    group_membership(&fake, "rotate-eu", &thing, true).await;
    let (_, next) = inbox.take(&jobs_topic(&thing, "notify-next")).await;
    assert_eq!(next["execution"]["jobId"], "rot-c");
    assert_eq!(next["execution"]["jobDocument"], document);
    assert_eq!(
        executions_of(&fake, &thing).await,
        vec![("rot-c".to_owned(), "QUEUED".to_owned())],
        "the SNAPSHOT job does not reach a thing that joined later"
    );

    let got = inbox
        .request(&jobs_topic(&thing, "rot-c/get"), &json!({}))
        .await
        .expect("DescribeJobExecution by job id");
    assert_eq!(got["execution"]["status"], "QUEUED");
    let version = got["execution"]["versionNumber"].as_i64().unwrap();
    inbox
        .request(
            &jobs_topic(&thing, "rot-c/update"),
            &json!({"status": "IN_PROGRESS", "expectedVersion": version}),
        )
        .await
        .expect("IN_PROGRESS");
    inbox
        .request(
            &jobs_topic(&thing, "rot-c/update"),
            &json!({"status": "SUCCEEDED", "expectedVersion": version + 1}),
        )
        .await
        .expect("SUCCEEDED");
    let (_, _, described) = fake.http("GET", "/jobs/rot-c", None).await;
    let j = &described["job"];
    assert_eq!(
        j["status"], "IN_PROGRESS",
        "a continuous job never completes"
    );
    assert_eq!(j["jobProcessDetails"]["numberOfSucceededThings"], 1);

    // Leaving and joining again does not run it a second time.
    group_membership(&fake, "rotate-eu", &thing, false).await;
    group_membership(&fake, "rotate", &thing, true).await;
    assert_eq!(
        executions_of(&fake, &thing).await,
        vec![("rot-c".to_owned(), "SUCCEEDED".to_owned())]
    );
}

/// A thing that RegisterThing puts into a target group (the template's ThingGroups) has its
/// execution as soon as it exists; AssociateTargetsWithJob adds groups to a continuous job;
/// CONTINUOUS is accepted for thing targets too.
#[tokio::test]
async fn continuous_jobs_reach_registered_things_and_associated_groups() {
    let mut template = device_template();
    template["Resources"]["thing"]["Properties"]["ThingGroups"] = json!(["fleet"]);
    let fake = Fake::start(
        &[("grouped", template)],
        &["--claim", "factory=grouped", "--no-connect-throttle"],
    )
    .await;
    create_group(&fake, "fleet", None).await;
    let continuous = |targets: Value| {
        json!({"targets": targets, "document": json!({"operation": "ROTATE_CERTIFICATE"}).to_string(),
            "targetSelection": "CONTINUOUS"})
    };
    let (status, _, reply) = fake
        .http(
            "PUT",
            "/jobs/fleet-rotate",
            Some(continuous(json!([arn("thinggroup/fleet")]))),
        )
        .await;
    assert_eq!(status, 200, "{reply}");

    let claim = fake.claim("factory");
    let params = BTreeMap::from([("SerialNumber", "g001")]);
    let device = provision_csr(&fake, &claim, "grouped", &params, "claim-g001")
        .await
        .unwrap();
    assert_eq!(
        executions_of(&fake, &device.thing_name).await,
        vec![("fleet-rotate".to_owned(), "QUEUED".to_owned())]
    );
    let mqtt = Mqtt::connect(&fake, &device.identity, &device.thing_name)
        .await
        .unwrap();
    let mut inbox = Inbox {
        mqtt,
        stash: Vec::new(),
    };
    let got = inbox
        .request(
            &jobs_topic(&device.thing_name, "fleet-rotate/get"),
            &json!({}),
        )
        .await
        .expect("the execution is there when the device connects");
    assert_eq!(
        got["execution"]["jobDocument"]["operation"],
        "ROTATE_CERTIFICATE"
    );

    // AssociateTargetsWithJob: a group whose members get the job now.
    let (status, _, _) = fake.http("POST", "/things/t-late", Some(json!({}))).await;
    assert_eq!(status, 200);
    create_group(&fake, "late", None).await;
    group_membership(&fake, "late", "t-late", true).await;
    assert!(executions_of(&fake, "t-late").await.is_empty());
    let (status, kind, reply) = fake
        .http(
            "POST",
            "/jobs/fleet-rotate/targets",
            Some(json!({"targets": [arn("thinggroup/late")], "comment": "late comers"})),
        )
        .await;
    assert_eq!(status, 200, "{kind:?} {reply}");
    assert_eq!(reply["jobId"], "fleet-rotate");
    assert_eq!(
        executions_of(&fake, "t-late").await,
        vec![("fleet-rotate".to_owned(), "QUEUED".to_owned())]
    );
    let (_, _, described) = fake.http("GET", "/jobs/fleet-rotate", None).await;
    assert_eq!(
        described["job"]["targets"],
        json!([arn("thinggroup/fleet"), arn("thinggroup/late")])
    );

    // CONTINUOUS with a thing target; AssociateTargetsWithJob refuses snapshot jobs and things.
    let (status, _, reply) = fake
        .http(
            "PUT",
            "/jobs/one-thing",
            Some(continuous(json!([arn("thing/t-late")]))),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    create_job(&fake, "snap", "t-late", &json!({"operation": "x"})).await;
    for (job, target, says) in [
        ("snap", arn("thinggroup/late"), "CONTINUOUS"),
        ("fleet-rotate", arn("thing/t-late"), "thing group"),
        ("nope", arn("thinggroup/late"), "nope"),
    ] {
        let (status, kind, reply) = fake
            .http(
                "POST",
                &format!("/jobs/{job}/targets"),
                Some(json!({"targets": [target]})),
            )
            .await;
        assert!(status == 400 || status == 404, "{job}: {status} {reply}");
        assert!(kind.is_some(), "{job}: {reply}");
        assert!(
            reply["message"].as_str().unwrap().contains(says),
            "{job}: {reply}"
        );
    }
}
