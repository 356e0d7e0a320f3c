//! The real iotd on a private dbus-daemon (the shipped policy) against fake-iot-core: commands
//! that arrive while work is in progress are answered without disturbing it, `Rotate` answers
//! at once (the same rotation while it runs), an expired device certificate is reported
//! as the device's (not the claim's), and a core that stops makes iotd exit non-zero.
#![allow(clippy::unwrap_used)]

use iotd_api::Agent1Proxy;
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::*;
use serde_json::json;

fn method_error(e: zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, desc, _) => (name.to_string(), desc.unwrap_or_default()),
        other => panic!("expected a D-Bus error reply, got {other:?}"),
    }
}

fn connects(cloud: &Cloud, client_id: &str) -> usize {
    cloud
        .log()
        .iter()
        .filter(|e| e.kind == "connect" && e.client_id == client_id)
        .count()
}

fn requests(cloud: &Cloud, topic_part: &str) -> usize {
    cloud
        .log()
        .iter()
        .filter(|e| e.kind == "in" && e.topic.as_deref().is_some_and(|t| t.contains(topic_part)))
        .count()
}

/// A bus, iotd on it, and a client proxy.
struct Gateway {
    _bus: DbusDaemon,
    iotd: Iotd,
    _client: zbus::Connection,
    proxy: Agent1Proxy<'static>,
}

async fn start(cloud: &Cloud, dir: &std::path::Path, serial: &str) -> Gateway {
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
    let conf = config(cloud, &dir.join("state"), serial);
    let env = [("DBUS_SYSTEM_BUS_ADDRESS", bus.address())];
    let mut iotd = Iotd::start_env(&iotd_binary(), dir, &conf, &env).await;
    iotd.wait_status("READY=1").await;
    let client = zbus::connection::Builder::address(bus.address())
        .build()
        .await
        .unwrap();
    // Uncached: each read asks the service, which reads the core's latest snapshot.
    let proxy = Agent1Proxy::builder(&client)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    Gateway {
        _bus: bus,
        iotd,
        _client: client,
        proxy,
    }
}

/// Each request the cloud holds is a provisioning step in flight: `Rotate` and `Reprovision`
/// called then are refused with the reason, and the step completes. While the new identity is
/// being verified (its first CONNECT refused once), a `Rotate` is refused too. In the end the
/// fake saw one claim connection and one request of each kind. On the provisioned gateway a
/// `Rotate` answers its rotation's id at once, the same id while it runs (its certificate
/// request held by the cloud), while `Reprovision` is refused as busy; the production session
/// stays up meanwhile (no disconnect before the rotation's own switch).
#[tokio::test]
async fn commands_during_each_step_neither_break_it_nor_reconnect() {
    let cloud = Cloud::start().await;
    // Long enough for three D-Bus round trips on a loaded machine; the step waits for nothing
    // else.
    for api in ["CreateCertificateFromCsr", "RegisterThing"] {
        cloud.add_fault(json!({"api": api, "action": "delay", "delayMs": 4000, "count": 1}));
    }
    cloud.add_fault(
        json!({"api": "Connect", "clientId": "gw-0070", "action": "reject",
        "statusCode": 503, "errorCode": "x", "errorMessage": "held", "count": 1}),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut gw = start(&cloud, dir.path(), "0070").await;
    for (topic, step) in [
        ("$aws/certificates/create-from-csr/", "key-ready"),
        ("/provision/", "certificate-issued"),
    ] {
        cloud
            .wait_log(topic, |e| {
                e.kind == "in" && e.topic.as_deref().is_some_and(|t| t.contains(topic))
            })
            .await;
        let (name, text) = method_error(gw.proxy.rotate().await.unwrap_err());
        assert_eq!(name, iotd_api::errors::NOT_PROVISIONED, "{step}: {text}");
        assert!(text.contains(step), "{step}: {text}");
        let (name, text) = method_error(gw.proxy.reprovision().await.unwrap_err());
        assert_eq!(name, iotd_api::errors::BUSY, "{step}: {text}");
        assert!(
            text.contains(&format!("provisioning ({step}) is in progress; try again")),
            "{step}: {text}"
        );
        assert_eq!(gw.proxy.step().await.unwrap(), step);
    }
    // Verifying the new identity: its first CONNECT was refused, the connection retries.
    gw.iotd
        .wait_status("Provisioning (thing-registered); retrying")
        .await;
    let (name, text) = method_error(gw.proxy.rotate().await.unwrap_err());
    assert_eq!(name, iotd_api::errors::NOT_PROVISIONED, "{text}");
    gw.iotd
        .wait_status("Provisioned as gw-0070; certificate")
        .await;
    assert!(gw.proxy.connected().await.unwrap());
    // One CONNECT refused (the fault), one session kept.
    assert!(
        cloud
            .log()
            .iter()
            .any(|e| e.kind == "refused" && e.client_id == "gw-0070"),
        "{:#?}",
        cloud.log()
    );
    assert_eq!(connects(&cloud, "gw-0070"), 1, "{:#?}", cloud.log());

    assert_eq!(connects(&cloud, "claim-0070"), 1, "{:#?}", cloud.log());
    assert_eq!(
        requests(&cloud, "$aws/certificates/create-from-csr/json"),
        1
    );
    assert_eq!(requests(&cloud, "/provision/json"), 1);

    cloud.add_fault(
        json!({"api": "CreateCertificateFromCsr", "action": "delay", "delayMs": 4000, "count": 1}),
    );
    let seen = cloud.log().iter().map(|e| e.seq).max().unwrap_or(0);
    let id = gw.proxy.rotate().await.unwrap();
    assert_eq!(id, "rotation-2");
    cloud
        .wait_log("the rotation's certificate request", |e| {
            e.seq > seen
                && e.kind == "in"
                && e.client_id == "gw-0070"
                && e.topic.as_deref() == Some("$aws/certificates/create-from-csr/json")
        })
        .await;
    assert_eq!(
        gw.proxy.rotate().await.unwrap(),
        id,
        "asked again while it runs"
    );
    let (name, text) = method_error(gw.proxy.reprovision().await.unwrap_err());
    assert_eq!(name, iotd_api::errors::BUSY, "{text}");
    assert!(gw.proxy.connected().await.unwrap());
    assert!(
        !cloud
            .log()
            .iter()
            .any(|e| e.seq > seen && e.client_id == "gw-0070" && e.kind == "disconnect"),
        "the session was touched before the switch: {:#?}",
        cloud.log()
    );
    gw.iotd
        .wait_status("Provisioned as gw-0070; certificate")
        .await;
    assert!(gw.iotd.terminate().await.success());
}

/// The fake's clock moves past the device certificate's notAfter: iotd says that the device
/// certificate expired (with a remedy for the device), keeps the identity, and keeps trying.
#[tokio::test]
async fn an_expired_device_certificate_is_the_devices_error_not_the_claims() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "0071");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-0071; certificate")
        .await;
    assert!(iotd.terminate().await.success());
    // The fake's certificates end in 2049.
    cloud.shared().clock.advance(30 * 365 * 86_400);
    let mut again = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    let status = again
        .wait_status("Provisioned as gw-0071; disconnected, retrying")
        .await;
    assert!(status.contains("expired"), "{status}");
    let state = again.state();
    assert_eq!(state["lastError"]["code"], "certificate-expired", "{state}");
    assert!(
        state["lastError"]["message"]
            .as_str()
            .unwrap()
            .contains("iotctl reprovision"),
        "{state}"
    );
    assert_eq!(state["identity"]["thingName"], "gw-0071", "{state}");
    assert!(again.terminate().await.success());
}

/// A core that stops (here at a test failpoint) takes iotd down with a non-zero status, for
/// systemd to restart it: never an agent that looks alive without its core.
#[tokio::test]
async fn a_core_that_stops_makes_iotd_exit_non_zero() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "0072");
    let env = [("IOTD_TEST_FAILPOINT", "core-exit")];
    let mut iotd = Iotd::start_env(&iotd_binary(), dir.path(), &conf, &env).await;
    let status = iotd.wait_exit().await;
    assert_eq!(status.code(), Some(1), "{status:?}");
}
