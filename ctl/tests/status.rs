//! `iotctl status` without a bus: the text of each state against golden files, and the
//! `--json` schema. To update the golden files after an intended change of the screen:
//! `IOTCTL_BLESS=1 cargo test -p iotctl --test status`, then review the diff.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use iotctl::status::{LastErrorView, StatusView, render_status, status_json};
use serde_json::Value;
use time::OffsetDateTime;
use time::macros::datetime;

/// The "now" of every golden file: 2026-06-07T10:00:00Z.
const NOW: OffsetDateTime = datetime!(2026-06-07 10:00 UTC);

fn at(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn unprovisioned() -> StatusView {
    StatusView {
        state: "unprovisioned".into(),
        step: "waiting-for-claim".into(),
        waiting_for: Some(
            "a claim: provisioning.claim_certificate /etc/iotd/claim.pem does not exist; \
             install the claim and restart iotd, or onboard the gateway"
                .into(),
        ),
        key_backend: "tpm".into(),
        endpoint: Some("a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com:8883".into()),
        version: Some("0.1.0".into()),
        ..StatusView::default()
    }
}

fn provisioning() -> StatusView {
    StatusView {
        state: "provisioning".into(),
        step: "certificate-issued".into(),
        certificate_id: Some(
            "4f1c0e7d2b9a8c6e5f4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f".into(),
        ),
        certificate_path: Some("/var/lib/iotd/gen/1/cert.pem".into()),
        key_backend: "tpm".into(),
        key_reference: Some(
            "tpm device:/dev/tpmrm0 parent 0x81000001, blobs /var/lib/iotd/gen/1/key.pub+key.priv"
                .into(),
        ),
        endpoint: Some("a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com:8883".into()),
        last_error: Some(LastErrorView {
            code: "network".into(),
            message: "connecting to a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com:8883 failed: connection timed out".into(),
            time: Some(at(datetime!(2026-06-07 09:58:30 UTC))),
        }),
        version: Some("0.1.0".into()),
        ..StatusView::default()
    }
}

fn provisioned() -> StatusView {
    StatusView {
        state: "provisioned".into(),
        step: "provisioned".into(),
        thing_name: Some("gw-0042".into()),
        certificate_id: Some(
            "4f1c0e7d2b9a8c6e5f4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f".into(),
        ),
        certificate_not_after: Some(at(datetime!(2026-09-01 00:00 UTC))),
        certificate_path: Some("/var/lib/iotd/gen/1/cert.pem".into()),
        next_rotation: Some(at(datetime!(2026-08-02 00:00 UTC))),
        key_backend: "file".into(),
        key_reference: Some("file /var/lib/iotd/gen/1/key.pem".into()),
        connected: true,
        endpoint: Some("a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com:8883".into()),
        version: Some("0.1.0".into()),
        ..StatusView::default()
    }
}

fn failed() -> StatusView {
    StatusView {
        state: "failed".into(),
        step: "unprovisioned".into(),
        key_backend: "tpm".into(),
        endpoint: Some("a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com:8883".into()),
        last_error: Some(LastErrorView {
            code: "claim-expired".into(),
            message: "claim certificate /usr/lib/iotd/claim/claim.pem expired at 2026-06-01T00:00:00Z (AWS IoT refused it); install a new claim".into(),
            time: Some(at(datetime!(2026-06-07 07:12 UTC))),
        }),
        version: Some("0.1.0".into()),
        ..StatusView::default()
    }
}

fn golden(name: &str, view: &StatusView) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("status-{name}.txt"));
    let rendered = render_status(view, NOW, false);
    if std::env::var_os("IOTCTL_BLESS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e} (IOTCTL_BLESS=1 writes it)", path.display()));
    assert_eq!(
        rendered,
        expected,
        "iotctl status for {name} differs from {}; rendered:\n{rendered}",
        path.display()
    );
}

#[test]
fn golden_unprovisioned() {
    golden("unprovisioned", &unprovisioned());
}

#[test]
fn golden_provisioning_with_a_retrying_error() {
    golden("provisioning", &provisioning());
}

#[test]
fn golden_provisioned_and_connected() {
    golden("provisioned", &provisioned());
}

#[test]
fn golden_failed_with_its_remedy() {
    golden("failed", &failed());
}

#[test]
fn days_left_follow_now() {
    let view = provisioned();
    let later = datetime!(2026-08-20 00:00 UTC);
    let text = render_status(&view, later, false);
    assert!(text.contains("(12 days left)"), "{text}");
    let text = render_status(&view, datetime!(2026-09-03 00:00 UTC), false);
    assert!(
        text.contains("expired 2026-09-01T00:00:00Z (2 days ago)"),
        "{text}"
    );
}

/// The JSON type of each key, as the schema promises: add keys, never rename or retype.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
    })
}

/// Key -> allowed types.
const SCHEMA: &[(&str, &[&str])] = &[
    ("state", &["string"]),
    ("step", &["string"]),
    ("waitingFor", &["string", "null"]),
    ("thingName", &["string", "null"]),
    ("certificateId", &["string", "null"]),
    ("certificateNotAfter", &["string", "null"]),
    ("certificatePath", &["string", "null"]),
    ("nextRotation", &["string", "null"]),
    ("previousCertificateId", &["string", "null"]),
    ("previousDeleteAfter", &["string", "null"]),
    ("keyBackend", &["string"]),
    ("keyReference", &["string", "null"]),
    ("connected", &["boolean"]),
    ("endpoint", &["string", "null"]),
    ("lastError", &["object", "null"]),
    ("onboarding", &["object"]),
    ("version", &["string", "null"]),
];

fn check_schema(name: &str, json: &Value) {
    let object = json.as_object().unwrap();
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let mut expected: Vec<&str> = SCHEMA.iter().map(|(k, _)| *k).collect();
    expected.sort_unstable();
    assert_eq!(keys, expected, "{name}: the key set");
    for (key, types) in SCHEMA {
        let t = kind(&json[key]);
        assert!(
            types.contains(&t),
            "{name}: {key} is {t}, not one of {types:?}"
        );
    }
    for key in ["certificateNotAfter", "nextRotation"] {
        assert!(
            json[key].is_null() || is_rfc3339(&json[key]),
            "{name}: {key}"
        );
    }
    if let Some(e) = json["lastError"].as_object() {
        let keys: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(keys, ["code", "message", "time"], "{name}: lastError keys");
        assert_eq!(kind(&e["code"]), "string");
        assert_eq!(kind(&e["message"]), "string");
        assert!(
            e["time"].is_null() || is_rfc3339(&e["time"]),
            "{name}: lastError.time"
        );
    }
    let onboarding = json["onboarding"].as_object().unwrap();
    let keys: Vec<&str> = onboarding.keys().map(String::as_str).collect();
    assert_eq!(keys, ["closesAt", "open"], "{name}: onboarding keys");
    assert_eq!(kind(&onboarding["open"]), "boolean");
    assert!(onboarding["closesAt"].is_null() || is_rfc3339(&onboarding["closesAt"]));
}

#[test]
fn json_schema_holds_in_every_state() {
    for (name, view) in [
        ("unprovisioned", unprovisioned()),
        ("provisioning", provisioning()),
        ("provisioned", provisioned()),
        ("failed", failed()),
    ] {
        check_schema(name, &status_json(&view));
    }
}

#[test]
fn json_values_of_a_provisioned_gateway() {
    let mut view = provisioned();
    view.onboarding_open = true;
    view.onboarding_closes_at = Some(at(datetime!(2026-06-07 10:15 UTC)));
    let json = status_json(&view);
    assert_eq!(json["state"], "provisioned");
    assert_eq!(json["thingName"], "gw-0042");
    assert_eq!(json["certificateNotAfter"], "2026-09-01T00:00:00Z");
    assert_eq!(json["nextRotation"], "2026-08-02T00:00:00Z");
    assert_eq!(json["connected"], true);
    assert_eq!(json["lastError"], Value::Null);
    assert_eq!(json["onboarding"]["open"], true);
    assert_eq!(json["onboarding"]["closesAt"], "2026-06-07T10:15:00Z");

    let json = status_json(&failed());
    assert_eq!(json["lastError"]["code"], "claim-expired");
    assert_eq!(json["lastError"]["time"], "2026-06-07T07:12:00Z");
    assert_eq!(json["certificateNotAfter"], Value::Null);
    check_schema("onboarding open", &status_json(&view));
}
