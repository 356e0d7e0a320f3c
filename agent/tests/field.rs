//! Field defects (issue 12): what a technician does to a gateway, and what a flaky boot does,
//! must not lose its identity nor leave systemd restarting iotd forever. Each test starts the
//! real iotd against fake-iot-core.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use iotd_testkit::*;
use serde_json::json;

/// Provisions gateway `serial` in `dir` and stops iotd; returns the certificate id.
async fn provisioned(cloud: &Cloud, dir: &Path, serial: &str) -> (String, String) {
    let conf = config(cloud, &dir.join("state"), serial);
    let mut iotd = Iotd::start(&iotd_binary(), dir, &conf).await;
    iotd.wait_status(&format!("Provisioned as gw-{serial}; certificate"))
        .await;
    let cert = iotd.state()["identity"]["certificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(iotd.terminate().await.success());
    (conf, cert)
}

fn count_requests(cloud: &Cloud, topic_part: &str) -> usize {
    cloud
        .log()
        .iter()
        .filter(|e| e.kind == "in" && e.topic.as_deref().is_some_and(|t| t.contains(topic_part)))
        .count()
}

/// iotd run to its exit with `config`, its stderr captured; with the unit's umask (0077).
fn run_to_exit(config_path: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", "umask 077; exec \"$0\" --config \"$1\""])
        .arg(iotd_binary())
        .arg(config_path)
        .envs(env.iter().copied())
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Defect 1: a damaged state.json (garbage, not even UTF-8) or a missing one (a technician
/// followed old advice and moved it away) is rebuilt from gen/: the same identity, no new
/// certificate, nothing overwritten, the damaged file kept.
#[tokio::test]
async fn a_damaged_or_missing_state_is_rebuilt_from_the_generation() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (conf, cert) = provisioned(&cloud, dir.path(), "r1").await;
    let state_dir = dir.path().join("state");
    let key_before = std::fs::read(state_dir.join("gen/1/key.pem")).unwrap();
    let requests = count_requests(&cloud, "create-from-csr");
    assert!(state_dir.join("gen/1/identity.json").exists());

    for damage in ["garbage", "missing"] {
        match damage {
            "garbage" => {
                std::fs::write(state_dir.join("state.json"), b"\xff\xfe{\x00garbage").unwrap()
            }
            _ => std::fs::remove_file(state_dir.join("state.json")).unwrap(),
        }
        let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
        iotd.wait_status("Provisioned as gw-r1; certificate").await;
        iotd.wait_status("READY=1").await;
        let state = iotd.state();
        assert_eq!(
            state["identity"]["certificateId"],
            cert.as_str(),
            "{damage}: {state}"
        );
        assert_eq!(state["identity"]["generation"], 1, "{damage}");
        assert_eq!(
            state["abandonedCertificates"],
            serde_json::Value::Null,
            "{damage}"
        );
        assert!(iotd.terminate().await.success());
    }
    assert_eq!(
        count_requests(&cloud, "create-from-csr"),
        requests,
        "no new certificate"
    );
    assert_eq!(
        std::fs::read(state_dir.join("gen/1/key.pem")).unwrap(),
        key_before
    );
    assert!(!state_dir.join("gen/2").exists());
    let kept = std::fs::read(state_dir.join("state.json.damaged")).unwrap();
    assert!(kept.starts_with(b"\xff\xfe"), "the damaged file is kept");
    assert_eq!(cloud.principals("gw-r1"), vec![cert]);
}

/// Defect 1, when gen/ holds no complete identity (here: its record is gone too): a new
/// identity in a new generation, the old key untouched, its certificate recorded as abandoned.
#[tokio::test]
async fn without_a_complete_generation_a_new_one_is_made_and_the_old_certificate_recorded() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (conf, old) = provisioned(&cloud, dir.path(), "r2").await;
    let state_dir = dir.path().join("state");
    let key_before = std::fs::read(state_dir.join("gen/1/key.pem")).unwrap();
    std::fs::remove_file(state_dir.join("gen/1/identity.json")).unwrap();
    std::fs::write(
        state_dir.join("state.json"),
        "{\"schema\": 2, \"identity\": ",
    )
    .unwrap();

    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-r2; certificate").await;
    let state = iotd.state();
    assert_eq!(state["identity"]["generation"], 2, "{state}");
    assert_eq!(state["abandonedCertificates"], json!([old]), "{state}");
    assert_eq!(
        std::fs::read(state_dir.join("gen/1/key.pem")).unwrap(),
        key_before
    );
    assert!(iotd.terminate().await.success());
}

/// Defect 2: an error a restart cannot fix exits with a status the unit does not restart on,
/// names the config key, and leaves the reason for `iotctl status`.
#[tokio::test]
async fn errors_a_restart_cannot_fix_exit_2_or_3_and_iotctl_status_says_why() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let env = [("RUNTIME_DIRECTORY", runtime.to_str().unwrap())];
    let config_path = dir.path().join("config.toml");
    let conf = config(&cloud, &dir.path().join("state"), "x1");

    // An unreadable CA bundle: a configuration error.
    let missing = dir.path().join("no-such-ca.pem");
    std::fs::write(
        &config_path,
        conf.replace(cloud.root_ca(), missing.to_str().unwrap()),
    )
    .unwrap();
    let (status, stderr) = run_to_exit(&config_path, &env);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("cloud.ca_bundle"), "{stderr}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runtime.join("exit.json")).unwrap()).unwrap();
    assert_eq!(record["status"], 2);
    let mode = std::fs::metadata(runtime.join("exit.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o644,
        "readable by a non-root iotctl despite UMask=0077"
    );
    assert!(
        record["message"]
            .as_str()
            .unwrap()
            .contains("cloud.ca_bundle")
    );

    // iotctl status, with no bus to find iotd on: the reason, and that systemd won't restart.
    let iotctl = iotd_binary().with_file_name("iotctl");
    assert!(
        iotctl.exists(),
        "build iotctl first (cargo test --workspace does)"
    );
    let out = std::process::Command::new(iotctl)
        .args(["--config", config_path.to_str().unwrap(), "status"])
        .env("RUNTIME_DIRECTORY", &runtime)
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        said.contains("exit status 2") && said.contains("cloud.ca_bundle"),
        "{said}"
    );
    assert!(said.contains("does not restart"), "{said}");

    // A state.json from a newer iotd: a state error.
    std::fs::write(&config_path, &conf).unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/state.json"), "{\"schema\": 9}").unwrap();
    let (status, stderr) = run_to_exit(&config_path, &env);
    assert_eq!(status, Some(3), "{stderr}");
    assert!(stderr.contains("newer iotd"), "{stderr}");

    // Fixed: the record goes once iotd is ready.
    std::fs::remove_file(dir.path().join("state/state.json")).unwrap();
    let mut iotd = Iotd::start_env(&iotd_binary(), dir.path(), &conf, &env).await;
    iotd.wait_status("Provisioned as gw-x1").await;
    assert!(!runtime.join("exit.json").exists());
    assert!(iotd.terminate().await.success());
}

/// Defect 5: a second iotd on the same state directory is refused, naming the first's PID.
#[tokio::test]
async fn a_second_iotd_on_the_same_state_directory_is_refused() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "l1");
    let mut first = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    first.wait_status("Provisioned as gw-l1").await;
    let (status, stderr) = run_to_exit(&first.config_path, &[]);
    assert_eq!(status, Some(1), "{stderr}");
    let pid = first.pid().unwrap();
    assert!(
        stderr.contains(&format!("another iotd (PID {pid})")),
        "{stderr}"
    );
    assert_eq!(cloud.principals("gw-l1").len(), 1);
    assert!(first.terminate().await.success());
}

/// Defect 9: a state directory open to others is closed (0700), with a warning.
#[tokio::test]
async fn an_open_state_directory_is_closed() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let conf = config(&cloud, &state_dir, "m1");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-m1").await;
    let mode = std::fs::metadata(&state_dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
    assert!(iotd.terminate().await.success());
}

/// Defect 3: the key disappears while the certificate waits for RegisterThing: that
/// certificate is never registered (never activated), a new key makes the identity.
#[tokio::test]
async fn a_key_lost_before_register_thing_is_never_registered() {
    let cloud = Cloud::start().await;
    cloud.add_fault(json!({"api": "RegisterThing", "action": "reject", "statusCode": 503, "errorCode": "ServiceUnavailable", "errorMessage": "held", "count": 1}));
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "k9");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioning (certificate-issued); retrying")
        .await;
    let first = iotd.state()["operation"]["step"]["certificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_file(iotd.state_dir.join("gen/1/key.pem")).unwrap();
    iotd.wait_status("Provisioned as gw-k9; certificate").await;
    let state = iotd.state();
    assert_eq!(state["identity"]["generation"], 2, "{state}");
    assert_eq!(state["abandonedCertificates"], json!([first]), "{state}");
    assert_ne!(
        cloud.registry()["certificates"][&first]["status"],
        "ACTIVE",
        "the keyless certificate was not activated"
    );
    assert_eq!(cloud.principals("gw-k9").len(), 1);
    assert!(iotd.terminate().await.success());
}

/// Defect 3: the live identity's file key is deleted; without automatic re-provisioning the
/// status says what to run.
#[tokio::test]
async fn a_lost_file_key_names_iotctl_reprovision() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (conf, _) = provisioned(&cloud, dir.path(), "k8").await;
    std::fs::remove_file(dir.path().join("state/gen/1/key.pem")).unwrap();
    let conf = conf.replace(
        "template = \"gateway\"",
        "template = \"gateway\"\nreprovision_when_key_lost = false",
    );
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    let status = iotd.wait_status("STATUS=Failed").await;
    iotd.wait_status("READY=1").await;
    assert!(status.contains("gone"), "{status}");
    assert!(status.contains("iotctl reprovision"), "{status}");
    assert!(iotd.terminate().await.success());

    // With it (the default), a new identity is made at once.
    let conf = conf.replace("reprovision_when_key_lost = false", "");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-k8; certificate").await;
    assert_eq!(iotd.state()["identity"]["generation"], 2);
    assert!(iotd.terminate().await.success());
}

/// "Also": a certificate given up on the way (here: RegisterThing's reply lost, so the agent
/// starts again from the CSR) is reported, once connected, for the fleet's backend to
/// deactivate, and only once.
#[tokio::test]
async fn an_abandoned_certificate_is_reported_once_connected_and_only_once() {
    let cloud = Cloud::start().await;
    cloud.add_fault(json!({"api": "RegisterThing", "action": "drop", "count": 1}));
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "a1");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-a1; certificate").await;
    let report = cloud
        .wait_log("the report", |e| {
            e.kind == "in" && e.topic.as_deref() == Some("iotd/gw-a1/certificates")
        })
        .await;
    let state = iotd.state();
    let abandoned = state["abandonedCertificates"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value =
        serde_json::from_str(report.payload.as_deref().unwrap_or_default()).unwrap();
    assert_eq!(body["type"], "abandoned-certificate");
    assert_eq!(body["certificateId"], abandoned.as_str());
    assert_eq!(body["thingName"], "gw-a1");
    // The broker's acknowledgement is what marks it reported; state.json says so right after
    // (nothing else announces it, so this reads the file until it does, within a bound).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while iotd.state()["reportedCertificates"] != json!([abandoned]) {
        assert!(tokio::time::Instant::now() < deadline, "{}", iotd.state());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(iotd.terminate().await.success());

    // Started again, it connects (and would publish what it has not reported right after the
    // CONNACK, on the same connection, before anything else).
    let seen = cloud.log().iter().map(|e| e.seq).max().unwrap_or(0);
    let mut again = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    again.wait_status("READY=1").await;
    cloud
        .wait_log("the second connection as the thing", |e| {
            e.seq > seen && e.kind == "connect" && e.client_id == "gw-a1"
        })
        .await;
    assert!(again.terminate().await.success());
    assert_eq!(
        count_requests(&cloud, "iotd/gw-a1/certificates"),
        1,
        "reported once"
    );
}

/// Defect 4: a parameter command that fails at boot (its device node not there yet) is
/// retried with backoff, before any request to the cloud; the status names the parameter.
#[tokio::test]
async fn a_parameter_command_that_fails_at_first_is_retried_before_any_cloud_request() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; \
         if [ $n -ge 3 ]; then echo p1; else echo 'cannot open /dev/mtd0' >&2; exit 1; fi",
        c = count.display()
    );
    let conf = config(&cloud, &dir.path().join("state"), "p1").replace(
        "SerialNumber = \"p1\"",
        &format!("SerialNumber = {{ command = [\"/bin/sh\", \"-c\", {script:?}] }}"),
    );
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    let status = iotd.wait_status("; retrying").await;
    assert!(status.contains("SerialNumber"), "{status}");
    assert!(status.contains("cannot open /dev/mtd0"), "{status}");
    assert_eq!(
        count_requests(&cloud, "$aws/"),
        0,
        "no request before the parameters"
    );
    iotd.wait_status("Provisioned as gw-p1; certificate").await;
    assert_eq!(std::fs::read_to_string(&count).unwrap().trim(), "3");
    assert!(iotd.terminate().await.success());
}

/// Defect 4: a parameter command whose executable is missing is a configuration mistake:
/// provisioning stops at once, before any request to the cloud, and says which parameter.
#[tokio::test]
async fn a_missing_parameter_executable_stops_before_any_cloud_request() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "p2").replace(
        "SerialNumber = \"p2\"",
        "SerialNumber = { command = [\"/usr/bin/no-such-fw_printenv\", \"serial\"] }",
    );
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    let status = iotd.wait_status("STATUS=Failed").await;
    assert!(status.contains("SerialNumber"), "{status}");
    assert!(status.contains("no-such-fw_printenv"), "{status}");
    assert_eq!(
        count_requests(&cloud, "$aws/"),
        0,
        "no request, no certificate"
    );
    assert_eq!(iotd.state()["lastError"]["code"], "parameter");
    assert!(iotd.terminate().await.success());
}

/// Defect 1, on a flaky boot: a key that can't be read right now (here: a directory where the
/// key file should be) fails the start for systemd to try again, abandoning nothing; once it
/// reads again, the identity is rebuilt.
#[tokio::test]
async fn a_key_unreadable_during_a_rebuild_fails_the_start_and_abandons_nothing() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (conf, cert) = provisioned(&cloud, dir.path(), "r3").await;
    let state_dir = dir.path().join("state");
    let key = state_dir.join("gen/1/key.pem");
    std::fs::rename(&key, state_dir.join("key.pem.away")).unwrap();
    std::fs::create_dir(&key).unwrap();
    std::fs::write(state_dir.join("state.json"), "garbage").unwrap();
    std::fs::write(dir.path().join("config.toml"), &conf).unwrap();

    let (status, stderr) = run_to_exit(&dir.path().join("config.toml"), &[]);
    assert_eq!(status, Some(1), "a restart may help: {stderr}");
    assert!(stderr.contains("gen/1"), "{stderr}");
    assert!(!state_dir.join("gen/2").exists());
    assert!(!state_dir.join("state.json").exists(), "nothing written");

    std::fs::remove_dir(&key).unwrap();
    std::fs::rename(state_dir.join("key.pem.away"), &key).unwrap();
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-r3; certificate").await;
    iotd.wait_status("READY=1").await;
    let state = iotd.state();
    assert_eq!(state["identity"]["certificateId"], cert.as_str(), "{state}");
    assert_eq!(
        state["abandonedCertificates"],
        serde_json::Value::Null,
        "{state}"
    );
    assert!(iotd.terminate().await.success());
}
