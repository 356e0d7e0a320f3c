//! `iotctl check` as a black box: exit codes, what fails, `--dont-run`, `--warnings-as-errors`,
//! `--json`, against configs and state directories made for each case. The clock is what a
//! fake `timedatectl` on PATH says (iotctl's first clock source); the endpoint is 127.0.0.1 on
//! a port that does or does not listen; TLS runs against fake-iot-core.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Dir, check_line, closed_port, describe, open_port, stdout};
use serde_json::Value;
use time::{Duration, OffsetDateTime};

#[test]
fn unreachable_endpoint_fails_and_is_named() {
    let dir = Dir::new();
    dir.clock(true);
    let port = closed_port();
    dir.write_config("127.0.0.1", port, "", "");
    let out = dir.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report = stdout(&out);
    let line = check_line(&report, "endpoint-tcp");
    assert!(
        line.starts_with('×') && line.ends_with("failed"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "connecting to 127.0.0.1:{port}: Connection refused"
        )),
        "{report}"
    );
    assert!(
        check_line(&report, "config-valid").starts_with('√'),
        "{report}"
    );
    assert!(
        check_line(&report, "clock-synchronised").starts_with('√'),
        "{report}"
    );
}

#[test]
fn unsynchronised_clock_fails() {
    let dir = Dir::new();
    dir.clock(false);
    let (_listener, port) = open_port();
    dir.write_config("127.0.0.1", port, "", "");
    let out = dir.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report = stdout(&out);
    assert!(
        check_line(&report, "clock-synchronised").starts_with('×'),
        "{report}"
    );
    assert!(report.contains("NTPSynchronized=no"), "{report}");
    // Nothing else failed: the clock alone decides the exit code here.
    assert!(
        check_line(&report, "endpoint-tcp").starts_with('√'),
        "{report}"
    );
    assert_eq!(report.matches('×').count(), 1, "{report}");
}

#[test]
fn dont_run_skips_a_check_and_its_verdict() {
    let dir = Dir::new();
    dir.clock(false);
    let (_listener, port) = open_port();
    dir.write_config("127.0.0.1", port, "", "");
    let out = dir.run(&["check", "--dont-run", "clock-synchronised"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report = stdout(&out);
    let line = check_line(&report, "clock-synchronised");
    assert!(
        line.starts_with('-') && line.ends_with("skipped"),
        "{report}"
    );
    assert!(report.contains("not run (--dont-run)"), "{report}");

    // Repeatable; a check whose prerequisite is not run still computes what it needs.
    let out = dir.run(&[
        "check",
        "--dont-run",
        "clock-synchronised",
        "--dont-run",
        "endpoint-resolves",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report = stdout(&out);
    assert!(
        check_line(&report, "endpoint-resolves").starts_with('-'),
        "{report}"
    );
    assert!(
        check_line(&report, "endpoint-tcp").starts_with('√'),
        "{report}"
    );
}

#[test]
fn unknown_dont_run_id_is_a_usage_error() {
    let dir = Dir::new();
    dir.write_config("127.0.0.1", 1, "", "");
    let out = dir.run(&["check", "--dont-run", "no-such-check"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        common::stderr(&out).contains("no-such-check"),
        "{}",
        describe(&out)
    );
}

#[test]
fn warnings_as_errors_changes_the_exit_code() {
    let dir = Dir::new();
    dir.clock(true);
    let (_listener, port) = open_port();
    // No claim configured while unprovisioned: a warning, nothing failed.
    dir.write_config("127.0.0.1", port, "", "");
    let out = dir.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report = stdout(&out);
    assert!(
        check_line(&report, "claim-validity").starts_with('‼'),
        "{report}"
    );

    let out = dir.run(&["check", "--warnings-as-errors"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

#[test]
fn json_lists_every_check_with_its_result() {
    let dir = Dir::new();
    dir.clock(false);
    dir.write_config("127.0.0.1", closed_port(), "", "");
    let out = dir.run(&["check", "--json", "--dont-run", "tpm-reachable"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = json.as_array().unwrap();
    let ids: Vec<&str> = checks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "config-valid",
            "tpm-reachable",
            "key-certificate-match",
            "certificate-validity",
            "clock-synchronised",
            "endpoint-resolves",
            "endpoint-tcp",
            "endpoint-tls",
            "claim-validity",
        ]
    );
    for c in checks {
        let keys: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["description", "id", "message", "result"]);
        assert!(["ok", "warning", "skipped", "failed"].contains(&c["result"].as_str().unwrap()));
    }
    let result = |id: &str| {
        checks.iter().find(|c| c["id"] == id).unwrap()["result"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(result("config-valid"), "ok");
    assert_eq!(result("tpm-reachable"), "skipped");
    assert_eq!(result("clock-synchronised"), "failed");
    assert_eq!(result("endpoint-tcp"), "failed");
}

#[test]
fn invalid_config_fails_first_and_the_rest_say_why_they_skip() {
    let dir = Dir::new();
    dir.clock(true);
    std::fs::write(
        dir.config_path(),
        "[cloud]\nendpoint = \"x\"\nport = \"eighty\"\n",
    )
    .unwrap();
    let out = dir.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report = stdout(&out);
    assert!(
        check_line(&report, "config-valid").starts_with('×'),
        "{report}"
    );
    assert!(report.contains("config.toml:3:"), "{report}");
    assert!(
        check_line(&report, "endpoint-resolves").starts_with('-'),
        "{report}"
    );
    assert!(report.contains("config-valid failed"), "{report}");
}

#[test]
fn device_certificate_near_expiry_warns_and_matches_the_key() {
    let dir = Dir::new();
    dir.clock(true);
    let (_listener, port) = open_port();
    dir.write_config("127.0.0.1", port, "", "");
    dir.provision(
        OffsetDateTime::now_utc() + Duration::days(10) + Duration::hours(1),
        false,
    );
    let out = dir.run(&["check", "--dont-run", "endpoint-tls"]);
    let report = stdout(&out);
    assert!(
        check_line(&report, "key-certificate-match").starts_with('√'),
        "{report}"
    );
    let line = check_line(&report, "certificate-validity");
    assert!(line.starts_with('‼'), "{report}");
    assert!(report.contains("(10 days left)"), "{report}");
    assert!(
        check_line(&report, "claim-validity").starts_with('-'),
        "{report}"
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn expired_or_mismatched_device_certificate_fails() {
    let dir = Dir::new();
    dir.clock(true);
    let (_listener, port) = open_port();
    dir.write_config("127.0.0.1", port, "", "");
    dir.provision(OffsetDateTime::now_utc() - Duration::days(2), false);
    let out = dir.run(&["check", "--dont-run", "endpoint-tls"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report = stdout(&out);
    assert!(
        check_line(&report, "certificate-validity").starts_with('×'),
        "{report}"
    );
    assert!(report.contains("expired at"), "{report}");

    let dir = Dir::new();
    dir.clock(true);
    dir.write_config("127.0.0.1", port, "", "");
    dir.provision(OffsetDateTime::now_utc() + Duration::days(100), true);
    let out = dir.run(&["check", "--dont-run", "endpoint-tls"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report = stdout(&out);
    assert!(
        check_line(&report, "key-certificate-match").starts_with('×'),
        "{report}"
    );
    assert!(report.contains("does not certify the key"), "{report}");
}

#[test]
fn missing_device_key_fails_with_the_remedy() {
    let dir = Dir::new();
    dir.clock(true);
    dir.write_config("127.0.0.1", closed_port(), "", "");
    dir.provision(OffsetDateTime::now_utc() + Duration::days(100), false);
    std::fs::remove_file(dir.state_dir().join("gen/1/key.pem")).unwrap();
    let out = dir.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report = stdout(&out);
    assert!(
        check_line(&report, "key-certificate-match").starts_with('×'),
        "{report}"
    );
    assert!(report.contains("iotctl reprovision"), "{report}");
}

/// The claim fake-iot-core issued passes, with a real TLS handshake; a server outside the
/// configured trust and an expired claim fail, and the check says why. (fake-iot-core, like
/// AWS IoT, takes any unexpired client certificate in the handshake and decides at CONNECT, so
/// a claim it does not know is not a handshake failure here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_validity_shakes_hands_with_the_endpoint() {
    let cloud = iotd_testkit::Cloud::start().await;
    let dir = Dir::new();
    dir.clock(true);
    let (cert, key) = cloud.claim();
    let claim = format!("claim_certificate = \"{cert}\"\nclaim_key = \"{key}\"");
    let trust = format!("ca_bundle = \"{}\"", cloud.root_ca());
    let check = || async {
        let out = tokio::process::Command::from(dir.command(&["check"]))
            .output()
            .await
            .unwrap();
        (out.status.code(), stdout(&out), describe(&out))
    };

    dir.write_config("localhost", cloud.mqtt_port(), &claim, &trust);
    let (code, report, all) = check().await;
    assert_eq!(code, Some(0), "{all}");
    assert!(
        check_line(&report, "claim-validity").starts_with('√'),
        "{report}"
    );
    assert!(
        report.contains("handshake as the claim: TLSv1_3"),
        "{report}"
    );

    // A CA bundle the server's certificate does not chain to.
    let stranger = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["stranger".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let stranger_ca = params.self_signed(&stranger).unwrap();
    let stranger_ca_path = dir.path().join("stranger-ca.pem");
    std::fs::write(&stranger_ca_path, stranger_ca.pem()).unwrap();
    dir.write_config(
        "localhost",
        cloud.mqtt_port(),
        &claim,
        &format!("ca_bundle = \"{}\"", stranger_ca_path.display()),
    );
    let (code, report, all) = check().await;
    assert_eq!(code, Some(1), "{all}");
    assert!(
        check_line(&report, "claim-validity").starts_with('×'),
        "{report}"
    );
    assert!(report.contains("invalid peer certificate"), "{report}");

    // An expired claim fails before any handshake.
    let mut params = rcgen::CertificateParams::new(vec!["claim".to_owned()]).unwrap();
    params.not_before = time::macros::datetime!(2020-01-01 00:00 UTC);
    params.not_after = time::macros::datetime!(2021-01-01 00:00 UTC);
    let old = params.self_signed(&stranger).unwrap();
    let old_path = dir.path().join("old-claim.pem");
    let old_key_path = dir.path().join("old-claim.key");
    std::fs::write(&old_path, old.pem()).unwrap();
    std::fs::write(&old_key_path, stranger.serialize_pem()).unwrap();
    dir.write_config(
        "localhost",
        cloud.mqtt_port(),
        &format!(
            "claim_certificate = \"{}\"\nclaim_key = \"{}\"",
            old_path.display(),
            old_key_path.display()
        ),
        &trust,
    );
    let (code, report, all) = check().await;
    assert_eq!(code, Some(1), "{all}");
    assert!(
        check_line(&report, "claim-validity").starts_with('×'),
        "{report}"
    );
    assert!(
        report.contains("expired at 2021-01-01T00:00:00Z"),
        "{report}"
    );
    cloud.stop().await;
}
