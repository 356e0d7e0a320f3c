//! Fault injection through `/_fake/faults` and `/_fake/throttle`, per API and per client id.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const CSR_TOPIC: &str = "$aws/certificates/create-from-csr/json";

async fn fake() -> Fake {
    Fake::start(
        &[("gw", device_template())],
        &["--claim", "factory=gw", "--no-connect-throttle"],
    )
    .await
}

async fn csr_call(m: &mut Mqtt) -> Result<serde_json::Value, serde_json::Value> {
    let (_, csr) = new_csr();
    call(m, CSR_TOPIC, &json!({"certificateSigningRequest": csr})).await
}

async fn add_fault(fake: &Fake, rule: serde_json::Value) {
    let (status, _, body) = fake.http("POST", "/_fake/faults", Some(rule)).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn reject_applies_to_the_named_client_for_count_requests() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    add_fault(
        &fake,
        json!({"api": "CreateCertificateFromCsr", "clientId": "victim", "action": "reject",
        "statusCode": 500, "errorCode": "InternalFailure", "errorMessage": "injected", "count": 1}),
    )
    .await;
    let mut other = Mqtt::connect(&fake, &claim, "bystander").await.unwrap();
    assert!(
        csr_call(&mut other).await.is_ok(),
        "other clients are not affected"
    );
    let mut victim = Mqtt::connect(&fake, &claim, "victim").await.unwrap();
    let rejected = csr_call(&mut victim).await.unwrap_err();
    assert_eq!(
        rejected,
        json!({"statusCode": 500, "errorCode": "InternalFailure", "errorMessage": "injected"})
    );
    assert!(
        csr_call(&mut victim).await.is_ok(),
        "count 1: the second request succeeds"
    );
}

#[tokio::test]
async fn dropped_reply_still_does_the_work() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    add_fault(
        &fake,
        json!({"api": "CreateCertificateFromCsr", "action": "drop", "count": 1}),
    )
    .await;
    let mut m = Mqtt::connect(&fake, &claim, "drop").await.unwrap();
    m.subscribe(&format!("{CSR_TOPIC}/accepted")).await;
    m.subscribe(&format!("{CSR_TOPIC}/rejected")).await;
    let (_, csr) = new_csr();
    m.publish(
        CSR_TOPIC,
        json!({"certificateSigningRequest": csr}).to_string(),
    )
    .await;
    // The next request is answered; the first never was, but its certificate exists (pending).
    assert!(csr_call(&mut m).await.is_ok());
    let reg = fake.registry().await;
    let pending = reg["certificates"]
        .as_object()
        .unwrap()
        .values()
        .filter(|c| c["status"] == "PENDING_ACTIVATION")
        .count();
    assert_eq!(pending, 2);
    let delivered = fake
        .messages(&format!(
            "kind=out&clientId=drop&topic={CSR_TOPIC}/accepted"
        ))
        .await;
    assert_eq!(delivered.len(), 1);
}

#[tokio::test]
async fn delay_holds_the_reply() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    add_fault(
        &fake,
        json!({"api": "CreateCertificateFromCsr", "action": "delay", "delayMs": 700, "count": 1}),
    )
    .await;
    let mut m = Mqtt::connect(&fake, &claim, "slow").await.unwrap();
    let start = Instant::now();
    assert!(csr_call(&mut m).await.is_ok());
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn disconnect_mid_flow_closes_the_requesting_connection() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    add_fault(
        &fake,
        json!({"api": "RegisterThing", "action": "disconnect", "count": 1}),
    )
    .await;
    let mut m = Mqtt::connect(&fake, &claim, "cut").await.unwrap();
    let created = csr_call(&mut m).await.unwrap();
    let topic = "$aws/provisioning-templates/gw/provision/json";
    m.subscribe(&format!("{topic}/accepted")).await;
    m.subscribe(&format!("{topic}/rejected")).await;
    m.publish(topic, json!({"certificateOwnershipToken": created["certificateOwnershipToken"], "parameters": {"SerialNumber": "x"}}).to_string()).await;
    m.expect_closed().await;
    // The token is still good after the cut: a reconnecting device can finish.
    let mut again = Mqtt::connect(&fake, &claim, "cut").await.unwrap();
    let done = call(&mut again, topic, &json!({"certificateOwnershipToken": created["certificateOwnershipToken"], "parameters": {"SerialNumber": "x"}})).await;
    assert_eq!(done.unwrap()["thingName"], "gw-x");
}

#[tokio::test]
async fn throttle_rejects_with_429_beyond_the_rate() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let (status, _, _) = fake
        .http(
            "POST",
            "/_fake/throttle",
            Some(json!({"api": "CreateCertificateFromCsr", "perSecond": 2})),
        )
        .await;
    assert_eq!(status, 204);
    let mut m = Mqtt::connect(&fake, &claim, "busy").await.unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(
            csr_call(&mut m)
                .await
                .map(|_| 200)
                .unwrap_or_else(|e| e["statusCode"].as_u64().unwrap()),
        );
    }
    // Four requests within well under a second: two pass, the rest are throttled.
    assert_eq!(
        outcomes.iter().filter(|s| **s == 429).count(),
        2,
        "{outcomes:?}"
    );
    let (_, _, faults) = fake.http("GET", "/_fake/faults", None).await;
    assert_eq!(faults["stats"]["throttled"]["CreateCertificateFromCsr"], 2);
    let (status, _, _) = fake
        .http(
            "POST",
            "/_fake/throttle",
            Some(json!({"api": "CreateCertificateFromCsr", "perSecond": null})),
        )
        .await;
    assert_eq!(status, 204);
    assert!(csr_call(&mut m).await.is_ok());
}

#[tokio::test]
async fn connect_fault_and_token_expiry_now() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    add_fault(&fake, json!({"api": "Connect", "clientId": "nope", "action": "reject", "statusCode": 503, "errorCode": "ServiceUnavailable", "errorMessage": "maintenance", "count": 1})).await;
    let refused = Mqtt::connect(&fake, &claim, "nope").await.refusal();
    assert!(refused.contains("ServiceUnavailable"), "{refused}");

    let mut m = Mqtt::connect(&fake, &claim, "expire").await.unwrap();
    let created = csr_call(&mut m).await.unwrap();
    let (status, _, body) = fake.http("POST", "/_fake/tokens/expire", None).await;
    assert_eq!((status, body["expired"].as_u64()), (200, Some(1)));
    let rejected = call(&mut m, "$aws/provisioning-templates/gw/provision/json",
        &json!({"certificateOwnershipToken": created["certificateOwnershipToken"], "parameters": {"SerialNumber": "e"}})).await.unwrap_err();
    assert_eq!(rejected["errorCode"], "InvalidCertificateOwnershipToken");
    let (status, _, _) = fake
        .http(
            "POST",
            "/_fake/faults",
            Some(json!({"api": "Nope", "action": "drop"})),
        )
        .await;
    assert_eq!(status, 400, "a bad rule is refused with a reason");
}

#[tokio::test]
async fn throttle_flags_set_quotas_at_start_including_the_account_connect_rate() {
    let fake = Fake::start(
        &[("gw", device_template())],
        &[
            "--claim",
            "factory=gw",
            "--throttle",
            "Connect=1",
            "--throttle",
            "RegisterThing=3",
        ],
    )
    .await;
    let claim = fake.claim("factory");
    let (_, _, faults) = fake.http("GET", "/_fake/faults", None).await;
    assert_eq!(
        faults["throttles"],
        json!({"Connect": 1, "RegisterThing": 3})
    );
    // Two client ids within a second: the account rate refuses the second, whoever it is.
    let started = Instant::now();
    let _first = Mqtt::connect(&fake, &claim, "first").await.unwrap();
    let refused = Mqtt::connect(&fake, &claim, "second").await.refusal();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "both CONNECTs must fall in one second for this test to mean anything"
    );
    // MQTT 3.1.1 has no reason code for it: the connection is closed, as AWS does.
    assert!(!refused.is_empty());
    let log = fake.messages("kind=refused&clientId=second").await;
    assert_eq!(
        log[0]["detail"], "over the account's CONNECT rate",
        "{log:?}"
    );
    let (_, _, faults) = fake.http("GET", "/_fake/faults", None).await;
    assert_eq!(faults["stats"]["throttled"]["Connect"], 1);
}

#[tokio::test]
async fn throttle_flag_aws_and_bad_values() {
    let fake = Fake::start(
        &[("gw", device_template())],
        &["--claim", "factory=gw", "--throttle", "aws"],
    )
    .await;
    let (_, _, faults) = fake.http("GET", "/_fake/faults", None).await;
    assert_eq!(
        faults["throttles"],
        json!({"Connect": 500, "CreateCertificateFromCsr": 15, "RegisterThing": 10})
    );
    for (bad, says) in [
        ("RegisterThng=3", "unknown API \"RegisterThng\""),
        ("RegisterThing=0", "not a positive number"),
        ("RegisterThing", "expected NAME=VALUE"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fake-iot-core"))
            .args(["--state-dir", "/nonexistent", "--throttle", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains(says), "{bad}: {stderr}");
    }
}
