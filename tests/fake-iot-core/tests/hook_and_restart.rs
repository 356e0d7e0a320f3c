//! The pre-provisioning hook (a real HTTP webhook served by the test) and persistence of the
//! registry across a restart.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use common::*;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// A webhook answering with `reply` after `delay`, reporting each event it receives.
async fn webhook(reply: Value, delay: Duration) -> (String, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Arc::new((tx, reply, delay));
    type S = Arc<(mpsc::UnboundedSender<Value>, Value, Duration)>;
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|State(s): State<S>, Json(event): Json<Value>| async move {
                let _ = s.0.send(event);
                tokio::time::sleep(s.2).await;
                Json(s.1.clone())
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

async fn set_hook(fake: &Fake, url: &str) {
    let (status, _, body) = fake
        .http(
            "PATCH",
            "/provisioning-templates/gw",
            Some(
                json!({"preProvisioningHook": {"targetArn": url, "payloadVersion": "2020-04-01"}}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

fn serial(s: &str) -> BTreeMap<&str, &str> {
    BTreeMap::from([("SerialNumber", s)])
}

#[tokio::test]
async fn hook_sees_aws_event_and_its_overrides_apply() {
    let fake = Fake::start(
        &[("gw", device_template())],
        &["--claim", "factory=gw", "--no-connect-throttle"],
    )
    .await;
    let claim = fake.claim("factory");
    let (url, mut events) = webhook(
        json!({"allowProvisioning": true, "parameterOverrides": {"Site": "berlin"}}),
        Duration::ZERO,
    )
    .await;
    set_hook(&fake, &url).await;
    let device = provision_csr(&fake, &claim, "gw", &serial("h1"), "claim-h1")
        .await
        .unwrap();
    assert_eq!(device.device_configuration["Site"], "berlin");
    let event = events.recv().await.unwrap();
    assert_eq!(event["claimCertificateId"], claim.certificate_id());
    assert_eq!(event["certificateId"], device.certificate_id);
    assert_eq!(event["clientId"], "claim-h1");
    assert_eq!(
        event["templateArn"],
        "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/gw"
    );
    assert_eq!(event["parameters"], json!({"SerialNumber": "h1"}));
    assert!(
        event["certificatePem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
}

#[tokio::test]
async fn hook_denial_and_timeout_reject_and_create_nothing() {
    let fake = Fake::start(
        &[("gw", device_template())],
        &["--claim", "factory=gw", "--no-connect-throttle"],
    )
    .await;
    let claim = fake.claim("factory");
    let (deny, _events) = webhook(json!({"allowProvisioning": false}), Duration::ZERO).await;
    set_hook(&fake, &deny).await;
    let rejected = provision_csr(&fake, &claim, "gw", &serial("h2"), "claim-h2")
        .await
        .unwrap_err();
    assert_eq!(rejected["statusCode"], 403);
    assert_eq!(rejected["errorCode"], "AccessDenied");
    assert!(
        rejected["errorMessage"]
            .as_str()
            .unwrap()
            .contains("allowProvisioning")
    );

    // AWS gives the hook 5 s.
    let (slow, _events) = webhook(json!({"allowProvisioning": true}), Duration::from_secs(6)).await;
    set_hook(&fake, &slow).await;
    let rejected = provision_csr(&fake, &claim, "gw", &serial("h3"), "claim-h3")
        .await
        .unwrap_err();
    assert!(
        rejected["errorMessage"]
            .as_str()
            .unwrap()
            .contains("within 5 s"),
        "{rejected}"
    );
    assert_eq!(fake.registry().await["things"], json!({}));
}

#[tokio::test]
async fn registry_claims_and_clock_survive_a_restart() {
    let fake = Fake::start(
        &[("gw", device_template())],
        &["--claim", "factory=gw", "--no-connect-throttle"],
    )
    .await;
    let claim = fake.claim("factory");
    let device = provision_csr(&fake, &claim, "gw", &serial("r1"), "claim-r1")
        .await
        .unwrap();
    fake.http("POST", "/_fake/clock", Some(json!({"advanceSeconds": 120})))
        .await;
    let offset_before = fake.http("GET", "/_fake/clock", None).await.2["offsetSeconds"].clone();

    let mut v2 = device_template();
    v2["DeviceConfiguration"]["Fallback"] = json!("https://v2.example.com");
    let body = json!({"templateBody": v2.to_string()});
    let (status, _, created) = fake
        .http(
            "POST",
            "/provisioning-templates/gw/versions?setAsDefault=false",
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "{created}");

    let fake = fake.restart().await;
    let (_, _, versions) = fake
        .http("GET", "/provisioning-templates/gw/versions", None)
        .await;
    let ids: Vec<_> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["versionId"].clone(), v["isDefaultVersion"].clone()))
        .collect();
    assert_eq!(
        ids,
        vec![(json!(1), json!(true)), (json!(2), json!(false))],
        "template versions persist"
    );
    assert_eq!(
        fake.claim("factory").cert_pem,
        claim.cert_pem,
        "the claim is reused"
    );
    assert_eq!(
        fake.http("GET", "/_fake/clock", None).await.2["offsetSeconds"],
        offset_before
    );
    let reg = fake.registry().await;
    assert_eq!(
        reg["things"]["gw-r1"]["principals"],
        json!([device.certificate_id])
    );
    // The device reconnects to the restarted fake with its issued certificate.
    let mut m = Mqtt::connect(&fake, &device.identity, "gw-r1")
        .await
        .unwrap();
    m.subscribe("dt/gw-r1/#").await;
    // And the claim still provisions.
    provision_csr(&fake, &claim, "gw", &serial("r2"), "claim-r2")
        .await
        .unwrap();
}

#[tokio::test]
async fn sigterm_exits_zero_and_bad_arguments_name_the_problem() {
    let mut fake = Fake::start(&[], &[]).await;
    assert!(fake.terminate().await.success());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-iot-core"))
        .args(["--state-dir", "/tmp/unused", "--cert-validity", "soon"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--cert-validity") && stderr.contains("soon"),
        "{stderr}"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-iot-core"))
        .args([
            "--state-dir",
            "/tmp/unused-2",
            "--template",
            "gw=/nonexistent.json",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        "fake-iot-core: reading template gw from /nonexistent.json: No such file or directory (os error 2)"
    );
}
