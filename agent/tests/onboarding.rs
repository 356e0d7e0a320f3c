//! Trusted-user onboarding end to end: a gateway registered with `iotctl onboarding register`,
//! with no claim of its own and its key in a TPM (a private swtpm), waits; an installer gets a
//! 5-minute claim from fake-iot-core's CreateProvisioningClaim (AWS's REST path) and hands it
//! over with `iotctl onboard`, which exits 0 once the gateway is connected with its own
//! identity. Everything on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use iotd_testkit::swtpm::Swtpm;
use iotd_testkit::*;

fn iotctl() -> std::path::PathBuf {
    let path = iotd_binary().with_file_name("iotctl");
    assert!(
        path.exists(),
        "build iotctl first (cargo test --workspace does)"
    );
    path
}

/// A port on 127.0.0.1 nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The gateway's configuration: no claim files, the TPM, onboarding on 127.0.0.1.
fn gateway_config(cloud: &Cloud, dir: &Path, serial: &str, port: u16, tpm: &Swtpm) -> String {
    let (cert, key) = cloud.claim();
    let conf = config(cloud, &dir.join("state"), serial)
        .replace(&format!("claim_certificate = \"{cert}\"\n"), "")
        .replace(&format!("claim_key = \"{key}\"\n"), "");
    format!(
        "{conf}\n[key]\nbackend = \"tpm\"\ntcti = \"{tcti}\"\n\n[onboarding]\nserial = \"GW-{serial}\"\n\
         listen = \"127.0.0.1:{port}\"\ninstaller_parameters = [\"Site\"]\n",
        tcti = tpm.tcti()
    )
}

/// An HTTP POST with an empty body to the fake's control plane; returns the JSON answer.
async fn post(cloud: &Cloud, path: &str) -> serde_json::Value {
    use http_body_util::{BodyExt, Empty};
    let client: hyper_util::client::legacy::Client<_, Empty<hyper::body::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url = format!("{}{path}", cloud.ready["http"].as_str().unwrap());
    let resp = client
        .request(hyper::Request::post(url).body(Empty::new()).unwrap())
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn an_installer_hands_over_a_claim_and_the_gateway_provisions_with_its_tpm_key() {
    let cloud = Cloud::start().await;
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = gateway_config(&cloud, dir.path(), "e1", port, &tpm);
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &conf).unwrap();

    // On the production line: the record, and the label's QR payload.
    let out = std::process::Command::new(iotctl())
        .args([
            "--config",
            config_path.to_str().unwrap(),
            "onboarding",
            "register",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let label = String::from_utf8_lossy(&out.stdout).into_owned();
    let qr = label
        .lines()
        .find_map(|l| l.trim().strip_prefix("QR payload: "))
        .unwrap_or_else(|| panic!("no QR payload in {label}"))
        .to_owned();

    let mut iotd =
        Iotd::start_with_config(&iotd_binary(), &config_path, &dir.path().join("state"), &[]).await;
    iotd.wait_status("Waiting for a claim").await;
    iotd.wait_status("READY=1").await;

    // The installer's phone (here: the test) gets a claim valid for 5 minutes.
    let claim = post(&cloud, "/provisioning-templates/gateway/provisioning-claim").await;
    let cert = dir.path().join("claim.pem");
    let key = dir.path().join("claim.key");
    std::fs::write(&cert, claim["certificatePem"].as_str().unwrap()).unwrap();
    std::fs::write(&key, claim["keyPair"]["PrivateKey"].as_str().unwrap()).unwrap();

    let started = Instant::now();
    let out = tokio::process::Command::new(iotctl())
        .args(["onboard", &format!("127.0.0.1:{port}"), "--qr", &qr])
        .args(["--claim-cert", cert.to_str().unwrap()])
        .args(["--claim-key", key.to_str().unwrap()])
        .args(["--param", "Site=hall-9", "--json"])
        .output()
        .await
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iotctl onboard: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(result["result"], "connected", "{result}");
    println!(
        "pairing + hand-over + provisioning with the TPM key: {:.0} ms; the claim had {} s left",
        took.as_secs_f64() * 1000.0,
        result["claim_seconds_left"]
    );
    assert!(
        took.as_secs() < 60,
        "well inside the claim's 5 minutes: {took:?}"
    );

    iotd.wait_status("Provisioned as gw-e1; certificate").await;
    let state = iotd.state();
    assert_eq!(state["identity"]["thingName"], "gw-e1", "{state}");
    assert!(
        state["identity"]["key"]
            .as_str()
            .unwrap()
            .starts_with("tpm "),
        "{state}"
    );
    let thing = &cloud.registry()["things"]["gw-e1"];
    assert_eq!(thing["attributes"]["site"], "hall-9", "{thing}");
    // The window closed on success: a second pairing is refused.
    let again = std::process::Command::new(iotctl())
        .args(["onboard", &format!("127.0.0.1:{port}"), "--qr", &qr])
        .args(["--claim-cert", cert.to_str().unwrap()])
        .args(["--claim-key", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("window"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(iotd.terminate().await.success());
}
