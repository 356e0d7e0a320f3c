//! Fleet provisioning over MQTT against the real binary: both create APIs, RegisterThing,
//! JSON and CBOR, reply routing, ownership tokens, certificate states and injected faults.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn fake() -> Fake {
    Fake::start(
        &[("gw", device_template())],
        &["--claim", "factory=gw", "--no-connect-throttle"],
    )
    .await
}

fn serial(s: &str) -> BTreeMap<&str, &str> {
    BTreeMap::from([("SerialNumber", s)])
}

#[tokio::test]
async fn csr_flow_registers_thing_and_device_connects_with_issued_certificate() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let device = provision_csr(&fake, &claim, "gw", &serial("0042"), "claim-0042")
        .await
        .unwrap();
    assert_eq!(device.thing_name, "gw-0042");
    assert_eq!(
        device.device_configuration,
        json!({"Site": "lab", "Fallback": "https://example.com"})
    );
    assert_eq!(
        device.certificate_id,
        device.identity.certificate_id(),
        "certificateId is SHA-256 of the DER"
    );

    // The issued certificate looks like AWS's.
    let (_, pem) = x509_parser::pem::parse_x509_pem(device.identity.cert_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert_eq!(cert.subject().to_string(), "CN=AWS IoT Certificate");
    assert_eq!(cert.validity().not_after.timestamp(), 2_524_607_999);

    let registry = fake.registry().await;
    let thing = &registry["things"]["gw-0042"];
    assert_eq!(
        thing["attributes"],
        json!({"serial": "0042", "site": "lab"})
    );
    assert_eq!(thing["principals"], json!([device.certificate_id]));
    assert_eq!(
        registry["certificates"][&device.certificate_id]["status"],
        "ACTIVE"
    );

    // The production identity connects as its thing and may use its own topics only.
    let mut prod = Mqtt::connect(&fake, &device.identity, "gw-0042")
        .await
        .unwrap();
    let codes = prod.subscribe("dt/gw-0042/telemetry").await;
    assert_eq!(
        codes,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );
    let denied = prod.subscribe("dt/gw-0001/telemetry").await;
    assert_eq!(denied, vec![rumqttc::SubscribeReasonCode::Failure]);
    prod.publish("dt/gw-0042/telemetry", "{\"t\":21}").await;
    let (_, payload) = prod.expect_message("dt/gw-0042/telemetry").await;
    assert_eq!(&payload[..], b"{\"t\":21}");

    // ${iot:Connection.Thing.ThingName} needs client id == thing name.
    let refused = Mqtt::connect(&fake, &device.identity, "not-the-thing")
        .await
        .refusal();
    assert!(refused.contains("NotAuthorized"), "{refused}");
}

#[tokio::test]
async fn cloud_generated_keys_flow_accepts_empty_and_brace_payloads() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let mut mqtt = Mqtt::connect(&fake, &claim, "claim-keys").await.unwrap();
    mqtt.subscribe("$aws/certificates/create/json/accepted")
        .await;
    mqtt.subscribe("$aws/certificates/create/json/rejected")
        .await;
    for payload in [&b""[..], &b"{}"[..]] {
        mqtt.publish("$aws/certificates/create/json", payload.to_vec())
            .await;
        let (topic, body) = mqtt.expect_message("$aws/certificates/create/json/+").await;
        assert!(
            topic.ends_with("/accepted"),
            "{topic}: {}",
            String::from_utf8_lossy(&body)
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        let key = v["privateKey"].as_str().unwrap();
        assert!(
            key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
            "PKCS#1 like AWS"
        );
        assert_eq!(v["certificateId"].as_str().unwrap().len(), 64);
        assert!(v["certificateOwnershipToken"].as_str().unwrap().len() > 300);
        // The issued certificate's key is the returned RSA-2048 key.
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(v["certificatePem"].as_str().unwrap().as_bytes())
                .unwrap();
        let cert = pem.parse_x509().unwrap();
        match cert.public_key().parsed().unwrap() {
            x509_parser::public_key::PublicKey::RSA(rsa) => assert_eq!(rsa.key_size(), 2048),
            other => panic!("expected RSA, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn replies_go_only_to_the_requesting_connection() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let mut a = Mqtt::connect(&fake, &claim, "claim-a").await.unwrap();
    let mut b = Mqtt::connect(&fake, &claim, "claim-b").await.unwrap();
    for m in [&mut a, &mut b] {
        m.subscribe("$aws/certificates/create-from-csr/json/accepted")
            .await;
        m.subscribe("$aws/certificates/create-from-csr/json/rejected")
            .await;
    }
    let (_, csr) = new_csr();
    a.publish(
        "$aws/certificates/create-from-csr/json",
        json!({"certificateSigningRequest": csr}).to_string(),
    )
    .await;
    let (topic, _) = a
        .expect_message("$aws/certificates/create-from-csr/json/+")
        .await;
    assert!(topic.ends_with("/accepted"));
    // Positive control for b: its own request is answered to it...
    let (_, csr_b) = new_csr();
    b.publish(
        "$aws/certificates/create-from-csr/json",
        json!({"certificateSigningRequest": csr_b}).to_string(),
    )
    .await;
    let (topic_b, _) = b
        .expect_message("$aws/certificates/create-from-csr/json/+")
        .await;
    assert!(topic_b.ends_with("/accepted"));
    // ...and a's reply never reached b, nor b's reply a (the log shows one delivery each).
    let out = fake
        .messages("kind=out&topic=$aws/certificates/create-from-csr/json/accepted")
        .await;
    let clients: Vec<&str> = out
        .iter()
        .map(|m| m["clientId"].as_str().unwrap())
        .collect();
    assert_eq!(clients, vec!["claim-a", "claim-b"]);
    assert_eq!(
        a.message_within("$aws/certificates/#", Duration::from_millis(200))
            .await,
        None
    );
}

#[tokio::test]
async fn no_reply_without_subscription() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let mut m = Mqtt::connect(&fake, &claim, "claim-nosub").await.unwrap();
    let (_, csr) = new_csr();
    m.publish(
        "$aws/certificates/create-from-csr/json",
        json!({"certificateSigningRequest": csr}).to_string(),
    )
    .await;
    // Requests of one connection are answered in order, so once the second (subscribed)
    // request has its reply, the first one has been handled: without a reply.
    let (_, csr) = new_csr();
    let second = call(
        &mut m,
        "$aws/certificates/create-from-csr/json",
        &json!({"certificateSigningRequest": csr}),
    )
    .await;
    assert!(second.is_ok());
    let dropped = fake.messages("kind=dropped&clientId=claim-nosub").await;
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0]["detail"], "not subscribed to the reply topic");
    let delivered = fake.messages("kind=out&clientId=claim-nosub").await;
    assert_eq!(delivered.len(), 1, "{delivered:?}");
}

#[tokio::test]
async fn cbor_round_trip() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let mut m = Mqtt::connect(&fake, &claim, "claim-cbor").await.unwrap();
    let topic = "$aws/certificates/create-from-csr/cbor";
    m.subscribe(&format!("{topic}/accepted")).await;
    m.subscribe(&format!("{topic}/rejected")).await;
    let (_, csr) = new_csr();
    let mut body = Vec::new();
    ciborium::ser::into_writer(
        &ciborium::Value::Map(vec![(
            ciborium::Value::Text("certificateSigningRequest".into()),
            ciborium::Value::Text(csr),
        )]),
        &mut body,
    )
    .unwrap();
    m.publish(topic, body).await;
    let (t, payload) = m.expect_message(&format!("{topic}/+")).await;
    assert!(t.ends_with("/accepted"));
    let reply: ciborium::Value = ciborium::de::from_reader(&payload[..]).unwrap();
    let map = reply.as_map().unwrap();
    let get = |k: &str| {
        map.iter()
            .find(|(key, _)| key.as_text() == Some(k))
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let token = get("certificateOwnershipToken")
        .as_text()
        .unwrap()
        .to_owned();
    assert_eq!(get("certificateId").as_text().unwrap().len(), 64);

    let reg = "$aws/provisioning-templates/gw/provision/cbor";
    m.subscribe(&format!("{reg}/accepted")).await;
    m.subscribe(&format!("{reg}/rejected")).await;
    let mut body = Vec::new();
    let request = ciborium::Value::Map(vec![
        (
            ciborium::Value::Text("certificateOwnershipToken".into()),
            ciborium::Value::Text(token),
        ),
        (
            ciborium::Value::Text("parameters".into()),
            ciborium::Value::Map(vec![(
                ciborium::Value::Text("SerialNumber".into()),
                ciborium::Value::Text("C1".into()),
            )]),
        ),
    ]);
    ciborium::ser::into_writer(&request, &mut body).unwrap();
    m.publish(reg, body).await;
    let (t, payload) = m.expect_message(&format!("{reg}/+")).await;
    assert!(t.ends_with("/accepted"));
    let reply: ciborium::Value = ciborium::de::from_reader(&payload[..]).unwrap();
    let name = reply
        .as_map()
        .unwrap()
        .iter()
        .find(|(k, _)| k.as_text() == Some("thingName"))
        .unwrap()
        .1
        .as_text()
        .unwrap()
        .to_owned();
    assert_eq!(name, "gw-C1");
}

#[tokio::test]
async fn ownership_token_is_single_use_and_expires_after_an_hour() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let mut m = Mqtt::connect(&fake, &claim, "claim-token").await.unwrap();
    let (_, csr) = new_csr();
    let created = call(
        &mut m,
        "$aws/certificates/create-from-csr/json",
        &json!({"certificateSigningRequest": csr}),
    )
    .await
    .unwrap();
    let token = created["certificateOwnershipToken"].clone();
    let topic = "$aws/provisioning-templates/gw/provision/json";
    let body = json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "T1"}});
    call(&mut m, topic, &body).await.unwrap();
    let reused = call(&mut m, topic, &body).await.unwrap_err();
    assert_eq!(reused["statusCode"], 400);
    assert_eq!(reused["errorCode"], "InvalidCertificateOwnershipToken");

    let empty = call(
        &mut m,
        topic,
        &json!({"parameters": {"SerialNumber": "T1"}}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        empty["errorMessage"],
        "Certificate ownership token cannot be empty."
    );

    // A token unused for an hour expires, and its never-registered certificate is deleted.
    let (_, csr) = new_csr();
    let created = call(
        &mut m,
        "$aws/certificates/create-from-csr/json",
        &json!({"certificateSigningRequest": csr}),
    )
    .await
    .unwrap();
    let id = created["certificateId"].as_str().unwrap().to_owned();
    assert_eq!(
        fake.registry().await["certificates"][&id]["status"],
        "PENDING_ACTIVATION"
    );
    let (status, _, _) = fake
        .http(
            "POST",
            "/_fake/clock",
            Some(json!({"advanceSeconds": 3601})),
        )
        .await;
    assert_eq!(status, 200);
    let late = call(&mut m, topic, &json!({"certificateOwnershipToken": created["certificateOwnershipToken"], "parameters": {"SerialNumber": "T2"}})).await.unwrap_err();
    assert_eq!(late["errorCode"], "InvalidCertificateOwnershipToken");
    assert!(
        fake.registry().await["certificates"].get(&id).is_none(),
        "pending certificate deleted at token expiry"
    );
}

#[tokio::test]
async fn pending_certificate_cannot_connect_and_inactive_template_status_is_honoured() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let mut m = Mqtt::connect(&fake, &claim, "claim-pending").await.unwrap();
    let (key_pem, csr) = new_csr();
    let created = call(
        &mut m,
        "$aws/certificates/create-from-csr/json",
        &json!({"certificateSigningRequest": csr}),
    )
    .await
    .unwrap();
    let id = Identity {
        cert_pem: created["certificatePem"].as_str().unwrap().to_owned(),
        key_pem,
    };
    let refused = Mqtt::connect(&fake, &id, "gw-pending").await.refusal();
    assert!(refused.contains("NotAuthorized"), "{refused}");
    let log = fake.messages("kind=refused&clientId=gw-pending").await;
    assert!(
        log[0]["detail"]
            .as_str()
            .unwrap()
            .contains("PENDING_ACTIVATION"),
        "{log:?}"
    );
}

#[tokio::test]
async fn csr_checks_reject_bad_requests_with_reasons() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let mut m = Mqtt::connect(&fake, &claim, "claim-csr").await.unwrap();
    let topic = "$aws/certificates/create-from-csr/json";
    let (_, good) = new_csr();
    // A CSR whose signed bytes were altered no longer verifies.
    let (_, block) = x509_parser::pem::parse_x509_pem(good.as_bytes()).unwrap();
    let mut der = block.contents.clone();
    let n = der.len();
    der[n - 5] ^= 0x01;
    use base64::Engine;
    let tampered = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(&der)
    );
    let cases = [
        (json!({}), "certificateSigningRequest is required"),
        (json!({"certificateSigningRequest": "hello"}), "not a PEM"),
        (
            json!({"certificateSigningRequest": tampered}),
            "signature does not verify",
        ),
    ];
    for (body, want) in cases {
        let rejected = call(&mut m, topic, &body).await.unwrap_err();
        assert_eq!(rejected["statusCode"], 400, "{body}");
        assert!(
            rejected["errorMessage"].as_str().unwrap().contains(want),
            "{rejected} should say {want}"
        );
    }
    m.publish(topic, "not json").await;
    let (t, payload) = m.expect_message(&format!("{topic}/+")).await;
    assert!(t.ends_with("/rejected"));
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["errorCode"], "InvalidPayload");
}

#[tokio::test]
async fn unknown_and_disabled_templates_are_rejected() {
    let fake = fake().await;
    let claim = fake.claim("factory");
    let mut m = Mqtt::connect(&fake, &claim, "claim-tmpl").await.unwrap();
    let (_, csr) = new_csr();
    let created = call(
        &mut m,
        "$aws/certificates/create-from-csr/json",
        &json!({"certificateSigningRequest": csr}),
    )
    .await
    .unwrap();
    let body = json!({"certificateOwnershipToken": created["certificateOwnershipToken"], "parameters": {"SerialNumber": "D1"}});
    // The claim policy only covers gw's topics; an unknown template is a policy denial first.
    let (status, _, _) = fake
        .http(
            "PATCH",
            "/provisioning-templates/gw",
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200);
    let rejected = call(
        &mut m,
        "$aws/provisioning-templates/gw/provision/json",
        &body,
    )
    .await
    .unwrap_err();
    assert_eq!(rejected["statusCode"], 403);
    assert!(
        rejected["errorMessage"]
            .as_str()
            .unwrap()
            .contains("disabled")
    );
}
