//! Interop with AWS's own software, unchanged: the AWS IoT Device SDK v2 for Python
//! (`awsiot.iotidentity`, both of its service clients) runs the CreateCertificateFromCsr and
//! CreateKeysAndCertificate flows over MQTT 3.1.1 and MQTT 5 (and through the ALPN listener)
//! and reconnects with the issued certificate; boto3's `iot` client drives the control plane,
//! including a trusted-user claim from CreateProvisioningClaim. The venv comes from
//! `scripts/python-venv.sh` (`make test` runs it); a missing venv fails these tests.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let venv =
        std::env::var_os("IOTD_VENV").map_or_else(|| repo().join("target/venv"), PathBuf::from);
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/python-venv.sh (make test does)",
        python.display()
    );
    python
}

async fn run_python(args: &[String]) -> Value {
    let out = tokio::process::Command::new(python())
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed:\n{stderr}\n{stdout}");
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

async fn sdk_provision(
    fake: &Fake,
    (cert, key): (&str, &str),
    template: &str,
    flow: &str,
    protocol: &str,
    client: &str,
    extra: &[&str],
) -> Value {
    let out = tempfile::tempdir().unwrap();
    let port = if extra.contains(&"--alpn") {
        fake.alpn_port()
    } else {
        fake.mqtt_port()
    };
    let mut args: Vec<String> = [
        repo()
            .join("tests/interop/fleet_provision.py")
            .display()
            .to_string(),
        "--endpoint".into(),
        "localhost".into(),
        "--port".into(),
        port.to_string(),
        "--ca".into(),
        fake.ready["rootCa"].as_str().unwrap().into(),
        "--cert".into(),
        cert.into(),
        "--key".into(),
        key.into(),
        "--template".into(),
        template.into(),
        "--flow".into(),
        flow.into(),
        "--protocol".into(),
        protocol.into(),
        "--client-id".into(),
        format!("claim-{client}"),
        "--param".into(),
        format!("SerialNumber={client}"),
        "--out-dir".into(),
        out.path().display().to_string(),
        "--quiet".into(),
    ]
    .into();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    run_python(&args).await
}

#[tokio::test]
async fn aws_device_sdk_provisions_over_mqtt311_and_mqtt5_and_reconnects() {
    let fake = Fake::start(&[("gw", device_template())], &["--claim", "factory=gw"]).await;
    let claim = &fake.ready["claims"]["factory"];
    let (cert, key) = (
        claim["cert"].as_str().unwrap(),
        claim["key"].as_str().unwrap(),
    );
    let cases: [(&str, &str, &str, &[&str]); 6] = [
        ("csr", "mqtt3", "sdk-a", &["--service-client", "v1"]),
        ("keys", "mqtt3", "sdk-b", &["--service-client", "v1"]),
        ("csr", "mqtt5", "sdk-c", &["--service-client", "v2"]),
        ("keys", "mqtt5", "sdk-d", &["--service-client", "v2"]),
        ("csr", "mqtt3", "sdk-e", &["--service-client", "v2"]),
        (
            "csr",
            "mqtt5",
            "sdk-f",
            &["--alpn", "--service-client", "v1"],
        ),
    ];
    for (flow, protocol, serial, extra) in cases {
        let r = sdk_provision(&fake, (cert, key), "gw", flow, protocol, serial, extra).await;
        assert_eq!(
            r["thingName"],
            format!("gw-{serial}"),
            "{flow} {protocol} {extra:?}"
        );
        assert_eq!(r["reconnected"], true);
        assert_eq!(r["deviceConfiguration"]["Fallback"], "https://example.com");
        // The fake saw the production connection: client id = thing name, issued certificate.
        let connects = fake
            .messages(&format!("kind=connect&clientId=gw-{serial}"))
            .await;
        assert_eq!(connects.len(), 1, "{connects:?}");
        let detail = connects[0]["detail"].as_str().unwrap();
        assert!(
            detail.contains(r["certificateId"].as_str().unwrap()),
            "{detail}"
        );
        let want = if protocol == "mqtt5" {
            "MQTT 5"
        } else {
            "MQTT 3.1.1"
        };
        assert!(detail.starts_with(want), "{detail}");
    }
}

#[tokio::test]
async fn boto3_control_plane_and_trusted_user_claim() {
    let fake = Fake::start(&[], &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let script = repo()
        .join("tests/interop/control_plane.py")
        .display()
        .to_string();
    let http = fake.http_url();
    let setup = run_python(&[
        script.clone(),
        "--http".into(),
        http.clone(),
        "setup".into(),
        "--template".into(),
        "Fleet".into(),
        "--out-dir".into(),
        dir.path().display().to_string(),
    ])
    .await;
    let cert = setup["claim"]["cert"]
        .as_str()
        .unwrap_or_else(|| panic!("claim paths in {setup}"))
        .to_owned();
    let key = setup["claim"]["key"].as_str().unwrap().to_owned();
    // The trusted user's 5-minute claim provisions a device with AWS's SDK.
    let device = sdk_provision(&fake, (&cert, &key), "Fleet", "csr", "mqtt5", "tu-1", &[]).await;
    let thing = device["thingName"].as_str().unwrap().to_owned();
    assert_eq!(thing, "device-tu-1");
    let id = device["certificateId"].as_str().unwrap().to_owned();
    let inspect = run_python(&[
        script.clone(),
        "--http".into(),
        http.clone(),
        "inspect".into(),
        "--thing".into(),
        thing.clone(),
        "--certificate-id".into(),
        id.clone(),
    ])
    .await;
    assert!(inspect.to_string().contains(&id), "{inspect}");
    let job = run_python(&[
        script,
        "--http".into(),
        http,
        "job".into(),
        "--thing".into(),
        thing,
        "--job-id".into(),
        "rotate-1".into(),
    ])
    .await;
    assert!(job.to_string().contains("QUEUED"), "{job}");
    // The temporary claim is gone once its five minutes are over.
    let claim_id = Identity {
        cert_pem: std::fs::read_to_string(&cert).unwrap(),
        key_pem: String::new(),
    }
    .certificate_id();
    assert!(
        fake.registry().await["certificates"]
            .get(&claim_id)
            .is_some()
    );
    fake.http(
        "POST",
        "/_fake/clock",
        Some(serde_json::json!({"advanceSeconds": 301})),
    )
    .await;
    assert!(
        fake.registry().await["certificates"]
            .get(&claim_id)
            .is_none()
    );
}
