//! What tests of certificate rotation need from the fake, against the real binary: a production
//! certificate rotating through the gateway template over its own connection, certificate
//! validity set at run time and per template, faults selected by certificate (also "the next
//! certificate issued"), and what happens to a live session when its certificate is deactivated
//! or expires.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::{Value, json};

const CSR_TOPIC: &str = "$aws/certificates/create-from-csr/json";
const GATEWAY_PROVISION: &str = "$aws/provisioning-templates/gateway/provision/json";

/// The fake as iotd's tests run it: the shipped gateway template, a factory claim, and no
/// CONNECT pacing (these tests reconnect one client id at once on purpose).
async fn gateway_fake(extra: &[&str]) -> Fake {
    let mut args = vec!["--claim", "factory=gateway", "--no-connect-throttle"];
    args.extend_from_slice(extra);
    Fake::start(&[("gateway", gateway_template())], &args).await
}

/// A gateway provisioned with the factory claim (thing `gw-<serial>`).
async fn provision(fake: &Fake, serial: &str) -> Device {
    let params = BTreeMap::from([("SerialNumber", serial)]);
    let device = provision_csr(
        fake,
        &fake.claim("factory"),
        "gateway",
        &params,
        &format!("claim-{serial}"),
    )
    .await
    .expect("provisioning with the factory claim");
    assert_eq!(device.thing_name, format!("gw-{serial}"));
    device
}

fn certificate<'a>(registry: &'a Value, id: &str) -> &'a Value {
    let c = &registry["certificates"][id];
    assert!(
        c.is_object(),
        "certificate {id} in the registry: {registry:#}"
    );
    c
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Validity of a certificate in the registry, in seconds.
fn validity_secs(registry: &Value, id: &str) -> i64 {
    let c = certificate(registry, id);
    c["notAfter"].as_i64().unwrap() - c["notBefore"].as_i64().unwrap()
}

async fn put_validity(fake: &Fake, body: Value) -> (u16, Value) {
    let (status, _, reply) = fake
        .http("PUT", "/_fake/certificate-validity", Some(body))
        .await;
    (status, reply)
}

async fn add_fault(fake: &Fake, rule: Value) {
    let (status, _, body) = fake.http("POST", "/_fake/faults", Some(rule)).await;
    assert_eq!(status, 201, "{body}");
}

async fn set_status(fake: &Fake, id: &str, status: &str) {
    let (code, kind, body) = fake
        .http(
            "PUT",
            &format!("/certificates/{id}?newStatus={status}"),
            None,
        )
        .await;
    assert_eq!(code, 200, "UpdateCertificate {status}: {kind:?} {body}");
}

/// A new certificate from CreateCertificateFromCsr on `mqtt`'s connection, with its key.
async fn new_certificate(mqtt: &mut Mqtt) -> Result<(Identity, String, String), Value> {
    let (key_pem, csr) = new_csr();
    let created = call(mqtt, CSR_TOPIC, &json!({"certificateSigningRequest": csr})).await?;
    Ok((
        Identity {
            cert_pem: created["certificatePem"].as_str().unwrap().to_owned(),
            key_pem,
        },
        created["certificateId"].as_str().unwrap().to_owned(),
        created["certificateOwnershipToken"]
            .as_str()
            .unwrap()
            .to_owned(),
    ))
}

/// iotd's rotation, step by step, over the production connection (client id = thing name,
/// the device's current certificate): CreateCertificateFromCsr, RegisterThing with the same
/// parameters (same thing: the new certificate becomes its second principal), DISCONNECT,
/// CONNECT with the new certificate, the report on `iotd/<thing>/rotation` at QoS 1.
#[tokio::test]
async fn a_production_certificate_rotates_through_the_gateway_template() {
    let fake = gateway_fake(&[]).await;
    let device = provision(&fake, "r1").await;
    let thing = device.thing_name.clone();
    let mut production = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .unwrap();

    let (new_identity, new_id, token) = new_certificate(&mut production)
        .await
        .expect("CreateCertificateFromCsr on the production connection");
    assert_ne!(new_id, device.certificate_id);
    assert_eq!(new_identity.certificate_id(), new_id);
    let registry = fake.registry().await;
    assert_eq!(
        certificate(&registry, &new_id)["status"],
        "PENDING_ACTIVATION"
    );
    let registered = call(
        &mut production,
        GATEWAY_PROVISION,
        &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "r1"}}),
    )
    .await
    .expect("RegisterThing on the production connection");
    assert_eq!(registered["thingName"], thing.as_str());
    assert_eq!(registered["deviceConfiguration"], json!({"Site": "lab"}));

    production.disconnect().await;
    // The CONNACK of this connection is the verification of the new certificate.
    let mut rotated = Mqtt::connect(&fake, &new_identity, &thing).await.unwrap();
    let report = json!({"type": "rotated", "from": device.certificate_id, "to": new_id});
    rotated
        .publish_acked(&format!("iotd/{thing}/rotation"), report.to_string())
        .await;
    let seen = fake
        .wait_message(&format!(
            "kind=in&clientId={thing}&topic=iotd/{thing}/rotation"
        ))
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(seen["payload"].as_str().unwrap()).unwrap(),
        report
    );
    let (_, _, connections) = fake.http("GET", "/_fake/connections", None).await;
    let live: Vec<&Value> = connections["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["clientId"] == thing.as_str())
        .collect();
    assert_eq!(live.len(), 1, "{connections}");
    assert_eq!(live[0]["certificateId"], new_id.as_str());
    let denied = fake.messages("kind=denied").await;
    assert!(
        denied.is_empty(),
        "the gateway policy allows every step: {denied:#?}"
    );

    // The thing holds both certificates, both ACTIVE, until the backend deactivates the old one.
    let registry = fake.registry().await;
    let principals = strings(&registry["things"][&thing]["principals"]);
    assert_eq!(
        principals,
        BTreeSet::from([device.certificate_id.clone(), new_id.clone()])
    );
    for id in [&device.certificate_id, &new_id] {
        let c = certificate(&registry, id);
        assert_eq!(c["status"], "ACTIVE", "{id}");
        assert_eq!(
            strings(&c["things"]),
            BTreeSet::from([thing.clone()]),
            "{id}"
        );
    }
    assert_eq!(
        certificate(&registry, &new_id)["policies"],
        certificate(&registry, &device.certificate_id)["policies"],
        "the template's policy is attached to the new certificate"
    );
    assert_eq!(registry["things"][&thing]["attributes"]["serial"], "r1");

    // The old certificate still connects (it takes the session over) until it is deactivated.
    let mut old = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .unwrap();
    rotated.expect_closed().await;
    set_status(&fake, &device.certificate_id, "INACTIVE").await;
    old.expect_closed().await;
    Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .refusal();
    Mqtt::connect(&fake, &new_identity, &thing).await.unwrap();
}

/// The production policy is what allows rotation: a device policy without the
/// create-from-csr statements (the test template's) is refused, and its connection closed
/// for the denied publish, as AWS does on MQTT 3.1.1.
#[tokio::test]
async fn rotation_over_the_production_connection_needs_the_policy_statements() {
    let fake = Fake::start(
        &[("gw", device_template())],
        &["--claim", "factory=gw", "--no-connect-throttle"],
    )
    .await;
    let params = BTreeMap::from([("SerialNumber", "p1")]);
    let device = provision_csr(&fake, &fake.claim("factory"), "gw", &params, "claim-p1")
        .await
        .unwrap();
    let mut production = Mqtt::connect(&fake, &device.identity, "gw-p1")
        .await
        .unwrap();
    let codes = production.subscribe(&format!("{CSR_TOPIC}/accepted")).await;
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Failure]);
    production.publish(CSR_TOPIC, "{}").await;
    production.expect_closed().await;
    let denied = fake
        .wait_message(&format!("kind=denied&clientId=gw-p1&topic={CSR_TOPIC}"))
        .await;
    assert_eq!(denied["detail"], "iot:Publish denied");
}

/// `PUT /_fake/certificate-validity`: for the account, and per template (the template of the
/// connection's certificate: a claim's, or the one that registered a device's certificate).
#[tokio::test]
async fn certificate_validity_is_set_at_run_time_and_per_template() {
    let fake = Fake::start(
        &[
            ("gateway", gateway_template()),
            ("other", device_template()),
        ],
        &[
            "--claim",
            "factory=gateway",
            "--claim",
            "installer=other",
            "--no-connect-throttle",
            "--cert-validity",
            "10m",
        ],
    )
    .await;
    let (status, _, got) = fake.http("GET", "/_fake/certificate-validity", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (&got["seconds"], &got["templates"]),
        (&json!(600), &json!({})),
        "--cert-validity is the value at start"
    );
    let aws_end = got["awsDefaultNotAfter"].as_i64().unwrap();
    assert_eq!(aws_end, 2_524_607_999, "2049-12-31T23:59:59Z");

    let first = provision(&fake, "v1").await;
    assert_eq!(
        validity_secs(&fake.registry().await, &first.certificate_id),
        600
    );

    let (status, set) = put_validity(&fake, json!({"seconds": 120})).await;
    assert_eq!((status, &set["seconds"]), (200, &json!(120)));
    let (status, set) = put_validity(&fake, json!({"template": "gateway", "seconds": 3600})).await;
    assert_eq!(status, 200);
    assert_eq!(set["templates"], json!({"gateway": 3600}));

    // A claim of the gateway template gets the template's validity, another template's claim
    // the account's.
    let second = provision(&fake, "v2").await;
    let other = provision_csr(
        &fake,
        &fake.claim("installer"),
        "other",
        &BTreeMap::from([("SerialNumber", "o1")]),
        "claim-o1",
    )
    .await
    .unwrap();
    let registry = fake.registry().await;
    assert_eq!(validity_secs(&registry, &second.certificate_id), 3600);
    assert_eq!(validity_secs(&registry, &other.certificate_id), 120);
    assert_eq!(
        certificate(&registry, &second.certificate_id)["template"],
        "gateway"
    );

    // A device registered by the gateway template rotating over its own connection: the
    // template's validity too.
    let mut production = Mqtt::connect(&fake, &second.identity, &second.thing_name)
        .await
        .unwrap();
    let (_, rotated, _) = new_certificate(&mut production).await.unwrap();
    assert_eq!(validity_secs(&fake.registry().await, &rotated), 3600);

    // null: AWS's end of 2049, for the template and then for the account.
    let (status, _) = put_validity(&fake, json!({"template": "gateway", "seconds": null})).await;
    assert_eq!(status, 200);
    let (_, forever, _) = new_certificate(&mut production).await.unwrap();
    let registry = fake.registry().await;
    assert_eq!(
        certificate(&registry, &forever)["notAfter"].as_i64(),
        Some(aws_end)
    );
    let mut installer = Mqtt::connect(&fake, &fake.claim("installer"), "claim-o2")
        .await
        .unwrap();
    let (_, short, _) = new_certificate(&mut installer).await.unwrap();
    assert_eq!(validity_secs(&fake.registry().await, &short), 120);
    let (status, _) = put_validity(&fake, json!({"seconds": null})).await;
    assert_eq!(status, 200);
    let (_, long, _) = new_certificate(&mut installer).await.unwrap();
    assert_eq!(
        certificate(&fake.registry().await, &long)["notAfter"].as_i64(),
        Some(aws_end)
    );

    // DELETE with ?template= drops one template's, without: back to the start-up value.
    let (_, _, after) = fake
        .http(
            "DELETE",
            "/_fake/certificate-validity?template=gateway",
            None,
        )
        .await;
    assert_eq!(
        (&after["seconds"], &after["templates"]),
        (&Value::Null, &json!({}))
    );
    put_validity(&fake, json!({"template": "gateway", "seconds": 60})).await;
    let (_, _, after) = fake
        .http("DELETE", "/_fake/certificate-validity", None)
        .await;
    assert_eq!(
        (&after["seconds"], &after["templates"]),
        (&json!(600), &json!({}))
    );

    for (body, want, says) in [
        (json!({"seconds": 0}), 400, "from 1 to"),
        (json!({"seconds": -5}), 400, "from 1 to"),
        (json!({"seconds": "60"}), 400, "from 1 to"),
        (json!({}), 400, "seconds is required"),
        (json!({"seconds": 60, "template": 7}), 400, "template name"),
        (json!({"seconds": 60, "days": 1}), 400, "unknown field"),
        (json!({"template": "nope", "seconds": 60}), 404, "nope"),
    ] {
        let (status, reply) = put_validity(&fake, body.clone()).await;
        assert_eq!(status, want, "{body}: {reply}");
        assert!(
            reply["message"].as_str().unwrap().contains(says),
            "{body}: {reply}"
        );
    }
}

/// A rule naming `certificateId` applies to connections authenticated with that certificate
/// only, whatever their client id: a refused CONNECT as AWS refuses one that is not allowed
/// (CONNACK "not authorized" for 401/403), and the request APIs as with `clientId`.
#[tokio::test]
async fn faults_select_connections_by_certificate() {
    let fake = gateway_fake(&[]).await;
    let device = provision(&fake, "f1").await;
    let thing = device.thing_name.clone();
    add_fault(
        &fake,
        json!({"api": "Connect", "certificateId": device.certificate_id, "action": "reject",
            "statusCode": 403, "errorCode": "AccessDenied", "errorMessage": "certificate refused",
            "count": 1}),
    )
    .await;
    // Another certificate with the same client id is not affected.
    let claim = fake.claim("factory");
    let mut bystander = Mqtt::connect(&fake, &claim, &thing).await.unwrap();
    bystander.disconnect().await;
    let refused = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .refusal();
    assert!(refused.contains("NotAuthorized"), "{refused}");
    let logged = fake
        .wait_message(&format!("kind=refused&clientId={thing}"))
        .await;
    assert_eq!(
        logged["detail"],
        "injected fault: 403 AccessDenied: certificate refused"
    );
    let mut production = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .unwrap();

    add_fault(
        &fake,
        json!({"api": "CreateCertificateFromCsr", "certificateId": device.certificate_id,
            "action": "reject", "statusCode": 500, "errorCode": "InternalFailure",
            "errorMessage": "injected"}),
    )
    .await;
    let rejected = new_certificate(&mut production).await.unwrap_err();
    assert_eq!(rejected["errorCode"], "InternalFailure");
    let mut claim_connection = Mqtt::connect(&fake, &claim, "claim-f2").await.unwrap();
    assert!(new_certificate(&mut claim_connection).await.is_ok());
    let rules = fake.fault_rules().await;
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["certificateId"], device.certificate_id.as_str());
}

/// `"certificateId": "$next"` waits for the next certificate the fake issues and becomes its
/// id: a test refuses the first CONNECT of a gateway's new certificate without knowing it in
/// advance, and reads the id from `GET /_fake/faults`.
#[tokio::test]
async fn the_connect_of_the_next_certificate_issued_can_be_refused() {
    let fake = gateway_fake(&[]).await;
    let device = provision(&fake, "n1").await;
    let thing = device.thing_name.clone();
    add_fault(
        &fake,
        json!({"api": "Connect", "certificateId": "$next", "action": "reject",
            "statusCode": 403, "errorCode": "AccessDenied", "errorMessage": "new certificate refused",
            "count": 1}),
    )
    .await;
    assert_eq!(fake.fault_rules().await[0]["certificateId"], "$next");
    // Certificates issued before are not the next one.
    let mut production = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .unwrap();
    let (new_identity, new_id, token) = new_certificate(&mut production).await.unwrap();
    assert_eq!(
        fake.fault_rules().await[0]["certificateId"],
        new_id.as_str()
    );
    call(
        &mut production,
        GATEWAY_PROVISION,
        &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "n1"}}),
    )
    .await
    .unwrap();
    // A later certificate is not bound either.
    let (_, later_id, _) = new_certificate(&mut production).await.unwrap();
    assert_eq!(
        fake.fault_rules().await[0]["certificateId"],
        new_id.as_str()
    );
    assert_ne!(later_id, new_id);
    production.disconnect().await;

    let refused = Mqtt::connect(&fake, &new_identity, &thing).await.refusal();
    assert!(refused.contains("NotAuthorized"), "{refused}");
    // The old certificate still works, and the new one once the rule is used up.
    Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .unwrap();
    Mqtt::connect(&fake, &new_identity, &thing).await.unwrap();
    assert!(fake.fault_rules().await.is_empty());
}

/// UpdateCertificate to INACTIVE or REVOKED closes the certificate's live connections (AWS
/// documents it for UpdateCertificate) and refuses new ones.
#[tokio::test]
async fn deactivating_a_certificate_closes_its_live_sessions() {
    let fake = gateway_fake(&[]).await;
    let device = provision(&fake, "d1").await;
    let thing = device.thing_name.clone();
    let mut live = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .unwrap();
    let claim = fake.claim("factory");
    let mut other = Mqtt::connect(&fake, &claim, "claim-d2").await.unwrap();
    set_status(&fake, &device.certificate_id, "REVOKED").await;
    live.expect_closed().await;
    let closed = fake
        .wait_message(&format!("kind=disconnect&clientId={thing}"))
        .await;
    let detail = closed["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "certificate {} was made REVOKED",
            device.certificate_id
        )),
        "{detail}"
    );
    let refused = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .refusal();
    assert!(refused.contains("NotAuthorized"), "{refused}");
    // Connections of other certificates stay.
    assert_eq!(
        other
            .subscribe("$aws/certificates/create-from-csr/json/accepted")
            .await,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );
}

/// `--keep-connection-on-certificate-deactivation`: the live session stays and keeps working
/// (the minutes AWS may take), while a new CONNECT is refused.
#[tokio::test]
async fn the_switch_keeps_live_sessions_of_a_deactivated_certificate() {
    let fake = gateway_fake(&["--keep-connection-on-certificate-deactivation"]).await;
    let device = provision(&fake, "k1").await;
    let thing = device.thing_name.clone();
    let mut live = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .unwrap();
    set_status(&fake, &device.certificate_id, "INACTIVE").await;
    // Not a second connection with this client id: it would take the session over if it got
    // through. A refused one does not.
    let refused = Mqtt::connect(&fake, &device.identity, &format!("{thing}-2"))
        .await
        .refusal();
    assert!(refused.contains("NotAuthorized"), "{refused}");
    live.publish_acked(&format!("iotd/{thing}/rotation"), "{}")
        .await;
    assert_eq!(
        live.subscribe(&format!("dt/{thing}/x")).await,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );
    assert!(
        fake.messages(&format!("kind=disconnect&clientId={thing}"))
            .await
            .is_empty()
    );
}

/// The fake's clock passes the certificate's notAfter during a session: by default the session
/// stays (AWS checks validity in the handshake; nothing says it drops a session) and only new
/// TLS handshakes fail.
#[tokio::test]
async fn an_expiring_certificate_keeps_its_live_session_by_default() {
    let fake = gateway_fake(&["--cert-validity", "1h"]).await;
    let device = provision(&fake, "e1").await;
    let thing = device.thing_name.clone();
    let mut live = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .unwrap();
    let (status, _, _) = fake
        .http(
            "POST",
            "/_fake/clock",
            Some(json!({"advanceSeconds": 7200})),
        )
        .await;
    assert_eq!(status, 200);
    let refused = Mqtt::connect(&fake, &device.identity, &format!("{thing}-2"))
        .await
        .refusal();
    assert!(
        refused.to_lowercase().contains("certificate") || refused.contains("alert"),
        "an expired certificate fails the TLS handshake: {refused}"
    );
    live.publish_acked(&format!("iotd/{thing}/rotation"), "{}")
        .await;
    assert!(
        fake.messages(&format!("kind=disconnect&clientId={thing}"))
            .await
            .is_empty()
    );
}

/// `--disconnect-on-certificate-expiry`: the session is closed when notAfter passes, whether
/// the fake's clock is moved past it or wall time reaches it.
#[tokio::test]
async fn the_switch_closes_a_live_session_when_its_certificate_expires() {
    let fake = gateway_fake(&[
        "--cert-validity",
        "1h",
        "--disconnect-on-certificate-expiry",
    ])
    .await;
    let device = provision(&fake, "x1").await;
    let thing = device.thing_name.clone();
    let mut live = Mqtt::connect(&fake, &device.identity, &thing)
        .await
        .unwrap();
    fake.http(
        "POST",
        "/_fake/clock",
        Some(json!({"advanceSeconds": 3601})),
    )
    .await;
    live.expect_closed().await;
    let closed = fake
        .wait_message(&format!("kind=disconnect&clientId={thing}"))
        .await;
    let detail = closed["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("certificate {} expired at", device.certificate_id)),
        "{detail}"
    );

    // Wall time: a certificate with a few seconds left is closed when they have passed, not
    // before.
    let second = provision(&fake, "x2").await;
    let mut live = Mqtt::connect(&fake, &second.identity, &second.thing_name)
        .await
        .unwrap();
    let not_after = certificate(&fake.registry().await, &second.certificate_id)["notAfter"]
        .as_i64()
        .unwrap();
    let now = fake.http("GET", "/_fake/clock", None).await.2["now"]
        .as_i64()
        .unwrap();
    fake.http(
        "POST",
        "/_fake/clock",
        Some(json!({"advanceSeconds": not_after - now - 3})),
    )
    .await;
    live.publish_acked(&format!("iotd/{}/rotation", second.thing_name), "{}")
        .await;
    live.expect_closed().await;
    let now = fake.http("GET", "/_fake/clock", None).await.2["now"]
        .as_i64()
        .unwrap();
    assert!(now > not_after, "closed at {now}, notAfter {not_after}");
}
