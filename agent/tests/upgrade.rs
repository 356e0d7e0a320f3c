//! Upgrading in the field: a state directory written by the previous release (schema 1,
//! `fixtures/schema-1/`, made by that release against fake-iot-core, whose state is kept
//! beside it) is migrated by today's iotd, which connects with the identity it finds and never
//! provisions again.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use iotd_testkit::*;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema-1")
}

#[tokio::test]
async fn a_schema_1_gateway_keeps_its_identity_after_the_upgrade() {
    let cloud = Cloud::start_from(&fixture().join("cloud")).await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    copy_tree(&fixture().join("state"), &state_dir);
    let old = std::fs::read_to_string(state_dir.join("state.json")).unwrap();
    let old_json: serde_json::Value = serde_json::from_str(&old).unwrap();
    let certificate = old_json["certificateId"].as_str().unwrap();

    // The fake's CA from the fixture is the one the gateway trusts; the claim is the fixture's.
    let conf = config(&cloud, &state_dir, "v1");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-v1; certificate valid until")
        .await;

    let state = iotd.state();
    assert_eq!(state["schema"], 2, "{state}");
    assert_eq!(state["identity"]["certificateId"], certificate, "{state}");
    assert_eq!(state["identity"]["generation"], 1, "{state}");
    assert_eq!(state["identity"]["committedAt"], old_json["provisionedAt"]);
    assert_eq!(state["operation"], serde_json::Value::Null, "{state}");
    // notBefore was read from the certificate.
    assert!(
        state["identity"]["notBefore"].as_i64().unwrap() > 0,
        "{state}"
    );
    // The original is kept for a downgrade.
    assert_eq!(
        std::fs::read_to_string(state_dir.join("state.v1.json")).unwrap(),
        old
    );
    let log = cloud.log();
    assert!(
        !log.iter()
            .any(|e| e.kind == "in" && e.topic.as_deref().is_some_and(|t| t.starts_with("$aws/"))),
        "no provisioning request: {log:#?}"
    );
    let connects: Vec<_> = log.iter().filter(|e| e.kind == "connect").collect();
    assert_eq!(connects.len(), 1, "{connects:#?}");
    assert_eq!(connects[0].client_id, "gw-v1");
    assert!(
        connects[0]
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains(certificate),
        "{connects:#?}"
    );
    assert!(!state_dir.join("gen/2").exists(), "no new key");
    assert!(iotd.terminate().await.success());

    // And again: the migrated file is read as it is.
    let mut again = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    again
        .wait_status("Provisioned as gw-v1; certificate valid until")
        .await;
    assert_eq!(again.state(), state);
}
