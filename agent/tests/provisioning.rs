//! iotd end to end against fake-iot-core: both certificate sources, recovery from each fault
//! class or a failed state naming the cause, SIGKILL after each persisted step, and a restart
//! that goes straight to the production session.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use iotd_testkit::*;
use serde_json::json;

fn is_provisioning_request(e: &fake_iot_core::server::LogEntry) -> bool {
    e.kind == "in"
        && e.topic.as_deref().is_some_and(|t| {
            t.starts_with("$aws/certificates/") || t.starts_with("$aws/provisioning-templates/")
        })
}

/// Asserts the end state of a successful provisioning: persisted, one certificate attached,
/// connected as the thing with it.
fn assert_provisioned(cloud: &Cloud, iotd: &Iotd, thing: &str) -> String {
    let state = iotd.state();
    assert_eq!(state["operation"], serde_json::Value::Null, "{state}");
    assert_eq!(state["identity"]["thingName"], thing, "{state}");
    let cert = state["identity"]["certificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        cloud.principals(thing),
        vec![cert.clone()],
        "exactly one certificate attached"
    );
    assert_eq!(cloud.registry()["certificates"][&cert]["status"], "ACTIVE");
    let connects: Vec<_> = cloud
        .log()
        .into_iter()
        .filter(|e| e.kind == "connect" && e.client_id == thing)
        .collect();
    assert!(
        connects
            .iter()
            .all(|e| e.detail.as_deref().unwrap_or_default().contains(&cert)),
        "{connects:?}"
    );
    assert!(!connects.is_empty());
    cert
}

#[tokio::test]
async fn csr_flow_provisions_and_only_then_reports_provisioned() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut iotd = Iotd::start(
        &iotd_binary(),
        dir.path(),
        &config(&cloud, &dir.path().join("state"), "0042"),
    )
    .await;
    let status = iotd
        .wait_status("Provisioned as gw-0042; certificate valid until 2049-12-31T23:59:59Z")
        .await;
    assert!(status.starts_with("STATUS="), "{status}");
    let cert = assert_provisioned(&cloud, &iotd, "gw-0042");

    // The steps came in order, and "provisioned" only after the connection as the thing.
    let steps: Vec<&String> = iotd
        .seen
        .iter()
        .filter(|l| l.starts_with("STATUS="))
        .collect();
    let position = |text: &str| {
        steps
            .iter()
            .position(|l| l.contains(text))
            .unwrap_or_else(|| panic!("{text} in {steps:#?}"))
    };
    assert!(position("key-ready") < position("certificate-issued"));
    assert!(position("certificate-issued") < position("thing-registered"));
    assert!(position("thing-registered") < position("Provisioned as"));
    assert!(iotd.seen.iter().any(|l| l == "READY=1"));

    // The key is ours, private, and certified; the claim is untouched.
    let key = iotd.state_dir.join("gen/1/key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pem = std::fs::read_to_string(iotd.state_dir.join("gen/1/cert.pem")).unwrap();
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    assert_eq!(fake_iot_core::ca::certificate_id(&block.contents), cert);
    let (claim_cert, claim_key) = cloud.claim();
    assert!(
        std::path::Path::new(&claim_cert).exists() && std::path::Path::new(&claim_key).exists()
    );
    let thing = &cloud.registry()["things"]["gw-0042"];
    assert_eq!(
        thing["attributes"],
        json!({"serial": "0042", "site": "lab"})
    );
    assert!(iotd.terminate().await.success());
}

#[tokio::test]
async fn cloud_generated_keys_flow() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut conf = config(&cloud, &dir.path().join("state"), "0043");
    conf = conf.replace(
        "template = \"gateway\"",
        "template = \"gateway\"\ncertificate_source = \"cloud-generated\"\ndelete_claim = true",
    );
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-0043").await;
    assert_provisioned(&cloud, &iotd, "gw-0043");
    let key = std::fs::read_to_string(iotd.state_dir.join("gen/1/key.pem")).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    assert!(
        cloud
            .log()
            .iter()
            .any(|e| e.kind == "in" && e.topic.as_deref() == Some("$aws/certificates/create/json"))
    );
    // delete_claim = true: the claim files go, but only after success.
    let (claim_cert, claim_key) = cloud.claim();
    assert!(
        !std::path::Path::new(&claim_cert).exists() && !std::path::Path::new(&claim_key).exists()
    );
}

#[tokio::test]
async fn a_certificate_whose_token_is_too_old_is_replaced_before_register_thing() {
    let cloud = Cloud::start().await;
    cloud.add_fault(json!({"api": "RegisterThing", "action": "delay", "delayMs": 60000}));
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "0050");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    cloud
        .wait_log("RegisterThing request", |e| {
            e.kind == "in"
                && e.topic
                    .as_deref()
                    .is_some_and(|t| t.contains("/provision/"))
        })
        .await;
    iotd.kill().await;
    assert_eq!(
        iotd.state()["operation"]["step"]["name"],
        "certificate-issued"
    );
    // The power came back 56 minutes later: the token would expire under the request.
    cloud.clear_faults();
    let later = [("IOTD_TEST_CLOCK_OFFSET_SECS", "3360")];
    let mut again = Iotd::start_env(&iotd_binary(), dir.path(), &conf, &later).await;
    again
        .wait_status("Provisioned as gw-0050; certificate")
        .await;
    assert_provisioned(&cloud, &again, "gw-0050");
    let csr_requests = cloud
        .log()
        .iter()
        .filter(|e| {
            e.kind == "in" && e.topic.as_deref() == Some("$aws/certificates/create-from-csr/json")
        })
        .count();
    assert_eq!(
        csr_requests, 2,
        "a new certificate was requested instead of using the old token"
    );
}

#[tokio::test]
async fn restart_of_a_provisioned_gateway_makes_no_provisioning_request() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "0044");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-0044; certificate")
        .await;
    iotd.terminate().await;
    cloud.shared().clear_log();
    let mut again = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    again
        .wait_status("Provisioned as gw-0044; certificate")
        .await;
    let log = cloud.log();
    assert!(!log.iter().any(is_provisioning_request), "{log:#?}");
    assert!(
        !log.iter()
            .any(|e| e.kind == "connect" && e.client_id == "claim-0044"),
        "the claim is not used again"
    );
    assert_provisioned(&cloud, &again, "gw-0044");
}

#[tokio::test]
async fn sigkill_after_each_persisted_step_resumes_to_one_attached_certificate() {
    // (the step to stop at, the fault that holds the agent there, what shows it is there)
    let cases = [
        (
            "key-ready",
            json!({"api": "Connect", "clientId": "claim-k1", "action": "reject", "statusCode": 503, "errorCode": "x", "errorMessage": "held"}),
        ),
        (
            "certificate-issued",
            json!({"api": "RegisterThing", "action": "delay", "delayMs": 60000}),
        ),
        (
            "thing-registered",
            json!({"api": "Connect", "clientId": "gw-k3", "action": "reject", "statusCode": 503, "errorCode": "x", "errorMessage": "held"}),
        ),
    ];
    for (i, (step, fault)) in cases.into_iter().enumerate() {
        let serial = format!("k{}", i + 1);
        let thing = format!("gw-{serial}");
        let cloud = Cloud::start().await;
        let dir = tempfile::tempdir().unwrap();
        let conf = config(&cloud, &dir.path().join("state"), &serial);
        cloud.add_fault(fault);
        let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
        match step {
            "certificate-issued" => {
                // The request is only sent after the step was persisted.
                cloud
                    .wait_log("RegisterThing request", |e| {
                        e.kind == "in"
                            && e.topic
                                .as_deref()
                                .is_some_and(|t| t.contains("/provision/"))
                    })
                    .await;
            }
            _ => {
                iotd.wait_status(&format!("Provisioning ({step}); retrying"))
                    .await;
            }
        }
        iotd.kill().await;
        assert_eq!(iotd.state()["operation"]["step"]["name"], step, "{step}");
        cloud.clear_faults();
        let mut again = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
        again
            .wait_status(&format!("Provisioned as {thing}; certificate"))
            .await;
        assert_provisioned(&cloud, &again, &thing);
        assert_eq!(again.state()["identity"]["generation"], 1, "{step}");
    }
}

/// A key alone is not worth a write of state.json (a key-ready step with no error to record
/// is not persisted): killed while its CSR is out, the gateway makes a new key in the next
/// generation, never overwriting one; once provisioned, it removes the key that never got a
/// certificate.
#[tokio::test]
async fn sigkill_before_the_first_certificate_uses_the_next_generation() {
    let cloud = Cloud::start().await;
    cloud
        .add_fault(json!({"api": "CreateCertificateFromCsr", "action": "delay", "delayMs": 60000}));
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "0052");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    cloud
        .wait_log("CreateCertificateFromCsr request", |e| {
            e.kind == "in"
                && e.topic
                    .as_deref()
                    .is_some_and(|t| t.contains("create-from-csr"))
        })
        .await;
    iotd.kill().await;
    assert!(!iotd.state_dir.join("state.json").exists());
    let key = iotd.state_dir.join("gen/1/key.pem");
    assert!(key.exists());
    cloud.clear_faults();
    let mut again = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    again
        .wait_status("Provisioned as gw-0052; certificate")
        .await;
    assert_provisioned(&cloud, &again, "gw-0052");
    assert_eq!(again.state()["identity"]["generation"], 2);
    assert!(again.state_dir.join("gen/2/key.pem").exists());
    assert!(
        !again.state_dir.join("gen/1").exists(),
        "the uncertified key is gone"
    );
}

#[tokio::test]
async fn throttling_and_a_cut_mid_flow_are_retried_until_provisioned() {
    let cloud = Cloud::start().await;
    cloud.add_fault(json!({"api": "CreateCertificateFromCsr", "action": "reject", "statusCode": 429, "errorCode": "Throttling", "errorMessage": "Rate exceeded", "count": 2}));
    cloud.add_fault(json!({"api": "RegisterThing", "action": "disconnect", "count": 1}));
    let dir = tempfile::tempdir().unwrap();
    let mut iotd = Iotd::start(
        &iotd_binary(),
        dir.path(),
        &config(&cloud, &dir.path().join("state"), "0045"),
    )
    .await;
    iotd.wait_status("throttled by AWS IoT").await;
    iotd.wait_status("the connection to localhost").await;
    iotd.wait_status("Provisioned as gw-0045; certificate")
        .await;
    assert_provisioned(&cloud, &iotd, "gw-0045");
}

#[tokio::test]
async fn a_lost_register_thing_reply_ends_provisioned_and_reports_the_extra_certificate() {
    let cloud = Cloud::start().await;
    // AWS did the work; only the reply is lost. With single-use tokens (the fake's default) the
    // retry is refused, and the agent starts again from the CSR.
    cloud.add_fault(json!({"api": "RegisterThing", "action": "drop", "count": 1}));
    let dir = tempfile::tempdir().unwrap();
    let mut iotd = Iotd::start(
        &iotd_binary(),
        dir.path(),
        &config(&cloud, &dir.path().join("state"), "0049"),
    )
    .await;
    iotd.wait_status("no reply to $aws/provisioning-templates/gateway/provision/json within 5 s")
        .await;
    iotd.wait_status("Provisioned as gw-0049; certificate")
        .await;
    let state = iotd.state();
    let current = state["identity"]["certificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    let abandoned = state["abandonedCertificates"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let mut attached = cloud.principals("gw-0049");
    attached.sort();
    let mut want = vec![current, abandoned];
    want.sort();
    assert_eq!(
        attached, want,
        "the first certificate is attached too, and the agent says which"
    );
}

#[tokio::test]
async fn an_expired_ownership_token_restarts_from_the_csr() {
    let cloud = Cloud::start().await;
    cloud
        .add_fault(json!({"api": "RegisterThing", "action": "delay", "delayMs": 1500, "count": 1}));
    let dir = tempfile::tempdir().unwrap();
    let mut iotd = Iotd::start(
        &iotd_binary(),
        dir.path(),
        &config(&cloud, &dir.path().join("state"), "0046"),
    )
    .await;
    cloud
        .wait_log("RegisterThing request", |e| {
            e.kind == "in"
                && e.topic
                    .as_deref()
                    .is_some_and(|t| t.contains("/provision/"))
        })
        .await;
    cloud.shared().write(|reg| {
        for t in reg.tokens.values_mut() {
            t.expires_at = 0;
        }
    });
    iotd.wait_status("the ownership token is no longer valid")
        .await;
    iotd.wait_status("Provisioned as gw-0046; certificate")
        .await;
    let cert = assert_provisioned(&cloud, &iotd, "gw-0046");
    let csr_requests = cloud
        .log()
        .iter()
        .filter(|e| {
            e.kind == "in" && e.topic.as_deref() == Some("$aws/certificates/create-from-csr/json")
        })
        .count();
    assert_eq!(csr_requests, 2);
    // The abandoned certificate was never activated and is gone with its token.
    let certs = cloud.registry()["certificates"]
        .as_object()
        .unwrap()
        .clone();
    assert!(
        certs
            .values()
            .filter(|c| c["status"] == "PENDING_ACTIVATION")
            .count()
            == 0,
        "{certs:#?}"
    );
    assert!(certs.contains_key(&cert));
}

#[tokio::test]
async fn a_rejection_is_a_failed_state_that_names_the_cause() {
    let cloud = Cloud::start().await;
    cloud.add_fault(json!({"api": "RegisterThing", "action": "reject", "statusCode": 403, "errorCode": "AccessDenied", "errorMessage": "Pre-provisioning hook denied the request"}));
    let dir = tempfile::tempdir().unwrap();
    let mut iotd = Iotd::start(
        &iotd_binary(),
        dir.path(),
        &config(&cloud, &dir.path().join("state"), "0047"),
    )
    .await;
    let status = iotd.wait_status("Failed at certificate-issued").await;
    assert!(status.contains("AWS IoT rejected RegisterThing (403 AccessDenied: Pre-provisioning hook denied the request)"), "{status}");
    assert!(
        status.contains("pre-provisioning hook refused this device"),
        "{status}"
    );
    let state = iotd.state();
    assert_eq!(state["lastError"]["code"], "hook-denied");
    assert_eq!(state["lastError"]["permanent"], true);
    // Permanent: no further RegisterThing attempts.
    let attempts = cloud
        .log()
        .iter()
        .filter(|e| {
            e.kind == "in"
                && e.topic
                    .as_deref()
                    .is_some_and(|t| t.contains("/provision/"))
        })
        .count();
    assert_eq!(attempts, 1);
}

#[tokio::test]
async fn an_expired_claim_is_named_and_the_gateway_waits_for_another() {
    let cloud = Cloud::start().await;
    // A trusted-user claim (valid five minutes), then five minutes pass on the fake's clock.
    let body = post(&cloud, "/provisioning-templates/gateway/provisioning-claim").await;
    let claim = body;
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("claim.pem");
    let key = dir.path().join("claim.key");
    std::fs::write(&cert, claim["certificatePem"].as_str().unwrap()).unwrap();
    std::fs::write(&key, claim["keyPair"]["PrivateKey"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    cloud.shared().clock.advance(301);
    let (factory_cert, factory_key) = cloud.claim();
    let conf = config(&cloud, &dir.path().join("state"), "0048")
        .replace(&factory_cert, cert.to_str().unwrap())
        .replace(&factory_key, key.to_str().unwrap());
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    // Not a dead end: the gateway waits for another claim (an installer's, or new files).
    let status = iotd.wait_status("Waiting for a new claim").await;
    assert!(
        status.contains(&format!("claim certificate {} expired at", cert.display())),
        "{status}"
    );
    let state = iotd.state();
    assert_eq!(state["lastError"]["code"], "claim-expired", "{state}");
    assert_eq!(state["lastError"]["permanent"], false, "{state}");
    assert_eq!(state["operation"]["step"]["name"], "key-ready", "{state}");
}

/// An HTTP POST with an empty body to the fake's control plane; returns the JSON answer.
async fn post(cloud: &Cloud, path: &str) -> serde_json::Value {
    use http_body_util::{BodyExt, Empty};
    let client: hyper_util::client::legacy::Client<_, Empty<hyper::body::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url = format!("{}{path}", cloud.ready["http"].as_str().unwrap());
    let req = hyper::Request::post(url).body(Empty::new()).unwrap();
    let resp = client.request(req).await.unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// Replaces the factory claim's policy in the fake.
fn set_claim_policy(cloud: &Cloud, document: serde_json::Value) {
    let text = document.to_string();
    let parsed = fake_iot_core::policy::PolicyDocument::parse(&text).unwrap();
    cloud.shared().write(|reg| {
        let p = reg.policies.get_mut("fake-claim-gateway").unwrap();
        p.document = text;
        p.parsed = Some(parsed);
    });
}

#[tokio::test]
async fn claim_policy_mistakes_are_named() {
    let arn = |r: &str| format!("arn:aws:iot:us-east-1:123456789012:{r}");
    // Subscribing is refused: permanent, with the filter named.
    let cloud = Cloud::start().await;
    set_claim_policy(
        &cloud,
        json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": arn("topic/$aws/certificates/create/*")},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": arn("topicfilter/$aws/certificates/create/*")}
        ]}),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut iotd = Iotd::start(
        &iotd_binary(),
        dir.path(),
        &config(&cloud, &dir.path().join("state"), "0051"),
    )
    .await;
    let status = iotd.wait_status("Failed at key-ready").await;
    assert!(
        status.contains("the claim policy does not allow subscribing to $aws/certificates/create-from-csr/json/accepted"),
        "{status}"
    );
    assert_eq!(iotd.state()["lastError"]["code"], "policy-denied");

    // Publishing is refused: AWS closes the connection; the agent retries and says why it may be.
    let cloud = Cloud::start().await;
    set_claim_policy(
        &cloud,
        json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
            {"Effect": "Allow", "Action": "iot:Receive", "Resource": arn("topic/$aws/*")},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": arn("topicfilter/$aws/*")}
        ]}),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut iotd = Iotd::start(
        &iotd_binary(),
        dir.path(),
        &config(&cloud, &dir.path().join("state"), "0052"),
    )
    .await;
    let status = iotd.wait_status("retrying").await;
    assert!(
        status.contains("the claim policy probably does not allow publishing to $aws/certificates/create-from-csr/json"),
        "{status}"
    );
}

/// Without a claim there is nothing to provision with: iotd says what it waits for, creates
/// no key and contacts nobody (an installer's claim, or files and a restart, let it go on).
#[tokio::test]
async fn without_a_claim_the_gateway_waits_and_creates_nothing() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("claim/absent.pem");
    let (factory_cert, _) = cloud.claim();
    let conf = config(&cloud, &dir.path().join("state"), "0051")
        .replace(&factory_cert, missing.to_str().unwrap());
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    let status = iotd.wait_status("Waiting for a claim").await;
    assert!(
        status.contains(&format!(
            "provisioning.claim_certificate {} does not exist",
            missing.display()
        )),
        "{status}"
    );
    iotd.wait_status("READY=1").await;
    assert!(!iotd.state_dir.join("gen").exists(), "no key was made");
    assert!(!iotd.state_dir.join("state.json").exists());
    assert!(
        !cloud.log().iter().any(|e| e.kind == "connect"),
        "{:#?}",
        cloud.log()
    );
    assert!(iotd.terminate().await.success());
}
