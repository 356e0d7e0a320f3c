//! The MQTT broker against the real binary: TLS as AWS does it (client certificates, SNI, the
//! ALPN listener, expiry), MQTT 3.1.1 and 5, pub/sub with wildcards, policies, duplicate client
//! ids, connect throttling and forced disconnects.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use common::*;
use fake_iot_core::server::CONNECT_DEADLINE;
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn fake(extra: &[&str]) -> Fake {
    let mut args = vec!["--claim", "factory=gw"];
    args.extend_from_slice(extra);
    Fake::start(&[("gw", device_template())], &args).await
}

async fn device(fake: &Fake, serial: &str) -> Device {
    provision_csr(
        fake,
        &fake.claim("factory"),
        "gw",
        &BTreeMap::from([("SerialNumber", serial)]),
        &format!("claim-{serial}"),
    )
    .await
    .unwrap()
}

/// A raw TLS handshake; returns the negotiated ALPN or the error.
async fn handshake(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // In TLS 1.3 a refused client certificate shows up on the first read, not in connect().
    let connect = [
        0x10u8, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 4, b't', b'e', b's', b't',
    ];
    tls.write_all(&connect).await.map_err(|e| e.to_string())?;
    let mut ack = [0u8; 4];
    tls.read_exact(&mut ack).await.map_err(|e| e.to_string())?;
    Ok(tls)
}

fn client_without_cert(root: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut root.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

#[tokio::test]
async fn tls_requires_a_client_certificate_and_sni() {
    let fake = fake(&[]).await;
    let claim = fake.claim("factory");
    let no_cert = handshake(
        fake.mqtt_port(),
        client_without_cert(&fake.root_ca()),
        localhost(),
    )
    .await;
    assert!(
        no_cert.is_err(),
        "a handshake without a client certificate must fail"
    );

    // rustls sends no SNI for an IP address: refused unless SNI is switched off.
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = tls_config(&fake.root_ca(), &claim, false);
    assert!(
        handshake(fake.mqtt_port(), tls.clone(), ip.clone())
            .await
            .is_err()
    );
    assert!(
        handshake(fake.mqtt_port(), tls.clone(), localhost())
            .await
            .is_ok()
    );
    let lax = fake_with_sni_off().await;
    assert!(
        handshake(
            lax.mqtt_port(),
            tls_config(&lax.root_ca(), &lax.claim("factory"), false),
            ip
        )
        .await
        .is_ok()
    );
}

async fn fake_with_sni_off() -> Fake {
    fake(&["--no-require-sni"]).await
}

#[tokio::test]
async fn ip_literal_sni_is_accepted() {
    let fake = fake(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let claim = fake.claim("factory");
    let cert = dir.path().join("c.pem");
    let key = dir.path().join("k.pem");
    std::fs::write(&cert, &claim.cert_pem).unwrap();
    std::fs::write(&key, &claim.key_pem).unwrap();
    // openssl sends an IP literal in SNI when asked to, as some device stacks do.
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", fake.mqtt_port()),
            "-servername",
            "127.0.0.1",
        ])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .arg("-CAfile")
        .arg(fake.ready["rootCa"].as_str().unwrap())
        .args(["-verify_return_error", "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CONNECTION ESTABLISHED"), "{stderr}");
    assert!(stderr.contains("Verification: OK"), "{stderr}");
}

#[tokio::test]
async fn alpn_listener_requires_x_amzn_mqtt_ca_and_both_tls_versions_work() {
    let fake = fake(&["--no-connect-throttle"]).await;
    let claim = fake.claim("factory");
    let without = handshake(
        fake.alpn_port(),
        tls_config(&fake.root_ca(), &claim, false),
        localhost(),
    )
    .await;
    assert!(
        without.is_err(),
        "port-443 listener without ALPN must refuse"
    );
    let with = handshake(
        fake.alpn_port(),
        tls_config(&fake.root_ca(), &claim, true),
        localhost(),
    )
    .await
    .unwrap();
    assert_eq!(
        with.get_ref().1.alpn_protocol(),
        Some(&b"x-amzn-mqtt-ca"[..])
    );
    let mqtt = Mqtt::connect_with(
        fake.alpn_port(),
        tls_config(&fake.root_ca(), &claim, true),
        "claim-alpn",
    )
    .await;
    drop(mqtt.unwrap());

    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut fake.root_ca().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<_> = rustls_pemfile::certs(&mut claim.cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = rustls_pemfile::private_key(&mut claim.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        let tls = handshake(fake.mqtt_port(), Arc::new(config), localhost())
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
    }
}

/// A TCP connection that never starts TLS is closed at the deadline a client has for the TLS
/// handshake and CONNECT together: on both listeners, whether SNI is required (the fake waits
/// for the ClientHello) or not (rustls does).
#[tokio::test]
async fn silent_tcp_connections_are_closed_at_the_connect_deadline() {
    let (fake, sni_off) = tokio::join!(fake(&[]), fake_with_sni_off());
    let started = Instant::now();
    let silent = [fake.mqtt_port(), fake.alpn_port(), sni_off.mqtt_port()].map(|port| {
        tokio::spawn(async move {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let mut byte = [0u8; 1];
            // Bounded: without the deadline the read never returns.
            let read = tokio::time::timeout(CONNECT_DEADLINE + WAIT, tcp.read(&mut byte))
                .await
                .map(|r| r.map_err(|e| e.to_string()));
            (port, read, started.elapsed())
        })
    });
    for connection in silent {
        let (port, read, elapsed) = connection.await.unwrap();
        assert_eq!(
            read,
            Ok(Ok(0)),
            "port {port}: the fake closes the connection"
        );
        assert!(
            elapsed >= CONNECT_DEADLINE,
            "port {port}: closed after {elapsed:?}, before the deadline"
        );
    }
}

#[tokio::test]
async fn expired_certificate_fails_the_handshake() {
    let fake = fake(&["--cert-validity", "10m", "--no-connect-throttle"]).await;
    let d = device(&fake, "exp").await;
    drop(Mqtt::connect(&fake, &d.identity, "gw-exp").await.unwrap());
    let (_, _, _) = fake
        .http("POST", "/_fake/clock", Some(json!({"advanceSeconds": 601})))
        .await;
    let refused = Mqtt::connect(&fake, &d.identity, "gw-exp").await.refusal();
    assert!(refused.to_lowercase().contains("expired"), "{refused}");
}

#[tokio::test]
async fn pub_sub_with_wildcards_never_matches_dollar_topics_by_wildcard() {
    let fake = fake(&["--no-connect-throttle"]).await;
    // A policy that allows everything, attached through the control plane.
    let a = device(&fake, "a").await;
    let (status, _, _) = fake
        .http(
            "POST",
            "/policies/all",
            Some(json!({"policyDocument": json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]
    }).to_string()})),
        )
        .await;
    assert_eq!(status, 200);
    let arn = format!(
        "arn:aws:iot:us-east-1:123456789012:cert/{}",
        a.certificate_id
    );
    let (status, _, _) = fake
        .http("PUT", "/target-policies/all", Some(json!({"target": arn})))
        .await;
    assert_eq!(status, 200);

    let mut sub = Mqtt::connect(&fake, &a.identity, "gw-a").await.unwrap();
    sub.subscribe("#").await;
    sub.subscribe("sensors/+/temp").await;
    // gw-a-2 is not a thing name: the thing-scoped policy would refuse it; the all-policy allows it.
    let p = Mqtt::connect(&fake, &a.identity, "gw-a-2").await.unwrap();
    p.publish("$aws/things/gw-a/shadow/update", "{}").await;
    p.publish("sensors/kitchen/temp", "21").await;
    let (topic, _) = sub.expect_message("#").await;
    assert_eq!(topic, "sensors/kitchen/temp", "`#` must not match $aws/...");
    assert_eq!(
        sub.message_within("$aws/#", std::time::Duration::from_millis(100))
            .await,
        None
    );
}

#[tokio::test]
async fn denied_publish_closes_an_mqtt311_connection() {
    let fake = fake(&["--no-connect-throttle"]).await;
    let claim = fake.claim("factory");
    let mut m = Mqtt::connect(&fake, &claim, "claim-deny").await.unwrap();
    m.publish("not/allowed", "x").await;
    let why = m.expect_closed().await;
    assert!(!why.is_empty());
    let log = fake.messages("kind=denied&clientId=claim-deny").await;
    assert_eq!(log[0]["topic"], "not/allowed");
}

#[tokio::test]
async fn second_connection_with_same_client_id_takes_over() {
    let fake = fake(&["--no-connect-throttle"]).await;
    let claim = fake.claim("factory");
    let mut first = Mqtt::connect(&fake, &claim, "claim-dup").await.unwrap();
    let _second = Mqtt::connect(&fake, &claim, "claim-dup").await.unwrap();
    first.expect_closed().await;
    let (_, _, conns) = fake.http("GET", "/_fake/connections", None).await;
    let ids: Vec<_> = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["clientId"].clone())
        .collect();
    assert_eq!(ids, vec![json!("claim-dup")]);
}

#[tokio::test]
async fn connects_of_one_client_id_are_limited_to_one_per_second() {
    let fake = fake(&[]).await;
    let claim = fake.claim("factory");
    let first = Mqtt::connect(&fake, &claim, "claim-rate").await.unwrap();
    drop(first);
    let refused = Mqtt::connect(&fake, &claim, "claim-rate").await.refusal();
    assert!(!refused.is_empty());
    let log = fake.messages("kind=refused&clientId=claim-rate").await;
    assert!(
        log[0]["detail"]
            .as_str()
            .unwrap()
            .contains("one CONNECT per second"),
        "{log:?}"
    );
    // Another client id is not affected.
    drop(Mqtt::connect(&fake, &claim, "claim-rate-2").await.unwrap());
}

#[tokio::test]
async fn forced_disconnect_and_connection_listing() {
    let fake = fake(&["--no-connect-throttle"]).await;
    let claim = fake.claim("factory");
    let mut m = Mqtt::connect(&fake, &claim, "claim-kick").await.unwrap();
    m.subscribe("$aws/certificates/create/json/accepted").await;
    let (_, _, conns) = fake.http("GET", "/_fake/connections", None).await;
    let c = &conns["connections"][0];
    assert_eq!(c["protocol"], "3.1.1");
    assert_eq!(c["certificateId"], claim.certificate_id());
    assert_eq!(
        c["subscriptions"][0]["filter"],
        "$aws/certificates/create/json/accepted"
    );
    let (status, _, _) = fake
        .http(
            "POST",
            "/_fake/disconnect",
            Some(json!({"clientId": "claim-kick"})),
        )
        .await;
    assert_eq!(status, 204);
    m.expect_closed().await;
    let (status, _, _) = fake
        .http(
            "POST",
            "/_fake/disconnect",
            Some(json!({"clientId": "claim-kick"})),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn mqtt5_client_connects_subscribes_and_gets_reason_codes() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let fake = fake(&["--no-connect-throttle"]).await;
    let claim = fake.claim("factory");
    let mut options = MqttOptions::new("claim-v5", "localhost", fake.mqtt_port());
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls_config(&fake.root_ca(), &claim, false)),
    ));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let mut next = async || {
        tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .unwrap()
            .unwrap()
    };
    assert!(
        matches!(next().await, Event::Incoming(Packet::ConnAck(a)) if a.properties.as_ref().and_then(|p| p.max_qos) == Some(1))
    );
    client
        .subscribe(
            "$aws/certificates/create-from-csr/json/accepted",
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    client
        .subscribe("not/allowed", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish("not/allowed", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let (_, csr) = new_csr();
    client
        .publish(
            "$aws/certificates/create-from-csr/json",
            QoS::AtLeastOnce,
            false,
            json!({"certificateSigningRequest": csr}).to_string(),
        )
        .await
        .unwrap();
    let mut sub_codes = Vec::new();
    let mut puback_reasons = Vec::new();
    loop {
        match next().await {
            Event::Incoming(Packet::SubAck(ack)) => sub_codes.extend(ack.return_codes),
            Event::Incoming(Packet::PubAck(ack)) => puback_reasons.push(ack.reason),
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(
                    &p.topic[..],
                    b"$aws/certificates/create-from-csr/json/accepted"
                );
                break;
            }
            _ => {}
        }
    }
    use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
    assert_eq!(
        sub_codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::NotAuthorized
        ]
    );
    assert_eq!(
        puback_reasons[0],
        PubAckReason::NotAuthorized,
        "MQTT 5 keeps the connection and says why"
    );
}
