//! Certificate rotation end to end: the real iotd binary against fake-iot-core issuing
//! short-lived certificates, everything on 127.0.0.1.
//!
//! - Scheduled rotations, one after the other: each a new key in a new generation (file and
//!   TPM), committed only after the new certificate connected, the thing holding the new
//!   certificate ACTIVE, and a report for each on the rotation topic.
//! - `iotctl rotate --wait` over a private system bus (the shipped D-Bus policy), and its
//!   refusal before the gateway is provisioned.
//! - AWS IoT Jobs: a rotation job ends SUCCEEDED, another job is left alone, a rotation job
//!   whose rotation fails ends FAILED with the cause.
//! - Clock trust: a due rotation waits until systemd-timesyncd's flag file appears, or until a
//!   stand-in for systemd-timedated on the private bus says NTPSynchronized.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::*;
use serde_json::Value;

/// iotd's configuration for `cloud` with `[rotation]` as these tests want it: half the
/// lifetime before expiry, no spread, the clock trusted (no systemd-timesyncd here), plus
/// `extra` lines in `[rotation]`.
fn rotation_config(cloud: &Cloud, dir: &Path, serial: &str, extra: &str) -> String {
    format!(
        "{}\n[rotation]\nrenew_before = \"50%\"\njitter = \"0\"\ntrust_clock = true\n{extra}",
        config(cloud, &dir.join("state"), serial)
    )
}

/// Waits for the report of the rotation that replaced certificate `old` of `thing` (published
/// right after the commit, which state.json then shows): the fake's log is the signal.
async fn wait_rotated(cloud: &Cloud, thing: &str, old: &str) {
    let topic = format!("iotd/{thing}/rotation");
    let old = format!("\"oldCertificateId\":\"{old}\"");
    cloud
        .wait_log("the report of a committed rotation", |e| {
            e.kind == "in"
                && e.topic.as_deref() == Some(topic.as_str())
                && e.payload
                    .as_deref()
                    .is_some_and(|p| p.contains(&old) && p.contains("\"committed\""))
        })
        .await;
}

/// The certificates the fake saw connect as `client_id`, in order of their first CONNECT.
fn connected_certificates(cloud: &Cloud, client_id: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for entry in cloud.log() {
        if entry.kind != "connect" || entry.client_id != client_id {
            continue;
        }
        let detail = entry.detail.unwrap_or_default();
        let Some(id) = detail.split("certificate ").nth(1) else {
            continue;
        };
        let id = id.split_whitespace().next().unwrap_or_default().to_owned();
        if !seen.contains(&id) {
            seen.push(id);
        }
    }
    seen
}

/// The public key (SPKI DER) the identity's certificate certifies.
fn public_key(state: &Value) -> Vec<u8> {
    let pem = state["identity"]["certificatePem"].as_str().unwrap();
    let chain = iotd::tls::parse_chain_pem(pem, "the identity's certificate").unwrap();
    iotd::tls::certificate_spki(&chain[0]).unwrap()
}

/// Certificates valid 20 s, rotated at half their lifetime: three rotations in a row, each
/// with a new key (a new generation, a new public key; in the TPM with `key`), committed only
/// after its certificate connected, the new certificate ACTIVE on the thing, the report
/// published.
async fn three_scheduled_rotations(serial: &str, key: &str) {
    let thing = format!("gw-{serial}");
    let cloud = Cloud::start_with(|s| s.cert_validity = Some(Duration::from_secs(20))).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = format!(
        "{}
{key}",
        rotation_config(&cloud, dir.path(), serial, "")
    );
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status(&format!("Provisioned as {thing}; certificate valid until"))
        .await;
    let state = iotd.state();
    let (mut generation, mut certificate) = identity_of(&state);
    let mut keys = BTreeSet::new();
    keys.insert(public_key(&state));

    for round in 1..=3 {
        wait_rotated(&cloud, &thing, &certificate).await;
        let state = iotd.state();
        let (new_generation, new_certificate) = identity_of(&state);
        assert_eq!(new_generation, generation + 1, "{state:#}");
        assert_ne!(new_certificate, certificate);
        // A new key: its own generation, different from every earlier one.
        assert!(
            keys.insert(public_key(&state)),
            "rotation {round} reused a key"
        );
        if !key.is_empty() {
            let location = state["identity"]["key"].as_str().unwrap_or_default();
            assert!(location.starts_with("tpm "), "{state:#}");
        }
        // Committed only after it connected: the fake saw the CONNECT with it.
        assert!(
            connected_certificates(&cloud, &thing).contains(&new_certificate),
            "{:#?}",
            cloud.log()
        );
        assert_eq!(
            state["previous"]["identity"]["certificateId"],
            certificate.as_str()
        );
        cloud.assert_active_and_attached(&thing, &new_certificate, &format!("rotation {round}"));
        // The backend hears of it (QoS 1 on iotd/<thing>/rotation).
        let report = cloud
            .wait_log("the rotation report", |e| {
                e.kind == "in"
                    && e.topic.as_deref() == Some(format!("iotd/{thing}/rotation").as_str())
                    && e.payload
                        .as_deref()
                        .is_some_and(|p| p.contains(&new_certificate))
            })
            .await;
        let report: Value = serde_json::from_str(report.payload.as_deref().unwrap()).unwrap();
        assert_eq!(report["oldCertificateId"], certificate.as_str());
        assert_eq!(report["outcome"], "committed");
        assert_eq!(report["reason"], "schedule");
        (generation, certificate) = (new_generation, new_certificate);
    }
    // The previous generation of the last rotation is kept (grace period); older ones are gone.
    let kept = |g: u64| iotd.state_dir.join(format!("gen/{g}")).exists();
    assert!(kept(generation - 1) && !kept(generation - 2));
    assert!(iotd.terminate().await.success());
}

#[tokio::test]
async fn three_scheduled_rotations_with_a_file_key() {
    three_scheduled_rotations("r1", "").await;
}

#[tokio::test]
async fn three_scheduled_rotations_with_a_tpm_key() {
    let tpm = iotd_testkit::swtpm::Swtpm::start();
    let key = format!("[key]\nbackend = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti());
    three_scheduled_rotations("r2", &key).await;
}

/// iotd on a private system bus (the shipped policy), for iotctl.
async fn iotd_on_bus(conf: &str, dir: &Path, bus: &DbusDaemon) -> Iotd {
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, conf).unwrap();
    Iotd::start_with_config(
        &iotd_binary(),
        &config_path,
        &dir.join("state"),
        &[("DBUS_SYSTEM_BUS_ADDRESS", bus.address())],
    )
    .await
}

/// `iotctl rotate --wait` on a provisioned gateway (AWS's default 2049 certificate, nothing
/// due): exits 0 once the new certificate is committed, and `iotctl status` shows it, the
/// previous one and the next rotation. Asked while the gateway is still waiting for a claim,
/// it is refused with the reason, exit 1.
#[tokio::test]
async fn iotctl_rotate_wait_follows_an_on_demand_rotation_and_is_refused_before_provisioning() {
    let cloud = Cloud::start().await;
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));

    // Not provisioned: no claim at all.
    let waiting_dir = tempfile::tempdir().unwrap();
    let (cert, key) = cloud.claim();
    let conf = config(&cloud, &waiting_dir.path().join("state"), "w1")
        .replace(&format!("claim_certificate = \"{cert}\"\n"), "")
        .replace(&format!("claim_key = \"{key}\"\n"), "");
    let mut waiting = iotd_on_bus(&conf, waiting_dir.path(), &bus).await;
    waiting.wait_status("READY=1").await;
    let out = run_iotctl(bus.address(), &["rotate", "--wait"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not provisioned yet"), "{stderr}");
    assert!(waiting.terminate().await.success());

    let dir = tempfile::tempdir().unwrap();
    let conf = rotation_config(&cloud, dir.path(), "w2", "");
    let mut iotd = iotd_on_bus(&conf, dir.path(), &bus).await;
    iotd.wait_status("Provisioned as gw-w2; certificate valid until")
        .await;
    let (generation, certificate) = identity_of(&iotd.state());
    let out = run_iotctl(bus.address(), &["rotate", "--wait"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = iotd.state();
    let (new_generation, new_certificate) = identity_of(&state);
    assert_eq!(new_generation, generation + 1);
    assert!(
        stdout.contains(&format!("rotation-{new_generation} committed"))
            && stdout.contains(&new_certificate),
        "{stdout}"
    );
    assert_eq!(state["rotation"]["last"]["reason"], "on-demand");

    let out = run_iotctl(bus.address(), &["status", "--json"]).await;
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["certificateId"],
        new_certificate.as_str(),
        "{status:#}"
    );
    assert_eq!(
        status["previousCertificateId"],
        certificate.as_str(),
        "{status:#}"
    );
    assert!(status["nextRotation"].is_string(), "{status:#}");
    assert!(iotd.terminate().await.success());
}

/// Creates job `id` for `thing` with `document` (CreateJob on the fake's control plane).
async fn create_job(cloud: &Cloud, id: &str, thing: &str, document: Value) {
    let body = serde_json::json!({
        "targets": [format!("arn:aws:iot:us-east-1:123456789012:thing/{thing}")],
        "document": document.to_string(),
    });
    let (status, reply) = cloud.http("PUT", &format!("/jobs/{id}"), Some(body)).await;
    assert_eq!(status, 200, "CreateJob {id}: {reply}");
}

/// Waits until iotd ended job `id` of `thing` (its UpdateJobExecution to SUCCEEDED or FAILED,
/// and the fake's answer to it, in the fake's log); returns the execution as DescribeJobExecution
/// tells it.
async fn wait_job(cloud: &Cloud, id: &str, thing: &str) -> Value {
    let topic = format!("$aws/things/{thing}/jobs/{id}/update");
    let ended = cloud
        .wait_log(&format!("the end of job {id}"), |e| {
            e.kind == "in"
                && e.topic.as_deref() == Some(topic.as_str())
                && e.payload
                    .as_deref()
                    .is_some_and(|p| p.contains("SUCCEEDED") || p.contains("FAILED"))
        })
        .await;
    let accepted = format!("{topic}/accepted");
    cloud
        .wait_log(&format!("the answer to the end of job {id}"), |e| {
            e.seq > ended.seq && e.kind == "out" && e.topic.as_deref() == Some(accepted.as_str())
        })
        .await;
    let (_, reply) = cloud
        .http("GET", &format!("/things/{thing}/jobs/{id}"), None)
        .await;
    reply["execution"].clone()
}

/// AWS IoT Jobs: a job `{"operation": "ROTATE_CERTIFICATE"}` makes the gateway rotate and ends
/// SUCCEEDED; a job with another operation is left untouched (QUEUED, never updated); a
/// rotation job whose rotation fails (RegisterThing refused for good) ends FAILED with the
/// cause in its statusDetails, and the gateway keeps its certificate.
#[tokio::test]
async fn jobs_trigger_rotations_and_end_succeeded_or_failed_and_other_jobs_are_left_alone() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = rotation_config(&cloud, dir.path(), "j1", "");
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-j1; certificate valid until")
        .await;
    let (generation, certificate) = identity_of(&iotd.state());

    create_job(
        &cloud,
        "reboot-1",
        "gw-j1",
        serde_json::json!({"operation": "REBOOT"}),
    )
    .await;
    create_job(
        &cloud,
        "rotate-1",
        "gw-j1",
        serde_json::json!({"operation": "ROTATE_CERTIFICATE"}),
    )
    .await;
    let execution = wait_job(&cloud, "rotate-1", "gw-j1").await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution:#}");
    let state = iotd.state();
    let (new_generation, new_certificate) = identity_of(&state);
    assert_eq!(new_generation, generation + 1);
    assert_ne!(new_certificate, certificate);
    assert_eq!(state["rotation"]["last"]["reason"], "job");
    assert_eq!(state["rotation"]["last"]["jobId"], "rotate-1");
    cloud.assert_active_and_attached("gw-j1", &new_certificate, "after the job");

    // The other job: never started, never updated by iotd.
    let (_, reply) = cloud.http("GET", "/things/gw-j1/jobs/reboot-1", None).await;
    assert_eq!(reply["execution"]["status"], "QUEUED", "{reply:#}");
    let touched = cloud.log().into_iter().any(|e| {
        e.kind == "in"
            && e.topic
                .as_deref()
                .is_some_and(|t| t.contains("jobs/reboot-1/update"))
    });
    assert!(!touched, "iotd updated a job that is not its own");

    // A rotation that fails for good: the job ends FAILED, saying why.
    cloud.add_fault(
        serde_json::json!({"api": "RegisterThing", "action": "reject",
        "statusCode": 400, "errorCode": "InvalidParameters", "errorMessage": "no rotation today"}),
    );
    create_job(
        &cloud,
        "rotate-2",
        "gw-j1",
        serde_json::json!({"operation": "ROTATE_CERTIFICATE"}),
    )
    .await;
    let execution = wait_job(&cloud, "rotate-2", "gw-j1").await;
    assert_eq!(execution["status"], "FAILED", "{execution:#}");
    let cause = execution["statusDetails"]["detailsMap"]["cause"]
        .as_str()
        .unwrap_or_default();
    assert!(
        cause.contains("rolled back") && cause.contains("no rotation today"),
        "{execution:#}"
    );
    assert_eq!(identity_of(&iotd.state()).1, new_certificate);
    assert!(iotd.terminate().await.success());
}

/// A gateway whose clock is not trusted yet (`trust_clock` at its default, false), on a private
/// system bus with the shipped policy and, when `timedated` is given, a stand-in for
/// systemd-timedated on it. A due rotation waits, and status says what for. `flag` stands for
/// systemd-timesyncd's flag file (through the test hook); the clock is looked at every 200 ms.
struct UntrustedClock {
    cloud: Cloud,
    dir: tempfile::TempDir,
    iotd: Iotd,
    generation: u64,
    certificate: String,
    _bus: DbusDaemon,
}

impl UntrustedClock {
    async fn start(serial: &str, timedated: Option<&Timedated>, bus: DbusDaemon) -> Self {
        let cloud = Cloud::start_with(|s| s.cert_validity = Some(Duration::from_secs(20))).await;
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            "{}\n[rotation]\nrenew_before = \"50%\"\njitter = \"0\"\n",
            config(&cloud, &dir.path().join("state"), serial)
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, conf).unwrap();
        let flag = dir.path().join("synchronized");
        let mut iotd = Iotd::start_with_config(
            &iotd_binary(),
            &config_path,
            &dir.path().join("state"),
            &[
                ("DBUS_SYSTEM_BUS_ADDRESS", bus.address()),
                ("IOTD_TEST_TIMESYNC_FLAG", flag.to_str().unwrap()),
                ("IOTD_TEST_CLOCK_RECHECK_MS", "200"),
            ],
        )
        .await;
        iotd.wait_status(&format!(
            "Provisioned as gw-{serial}; certificate valid until"
        ))
        .await;
        let (generation, certificate) = identity_of(&iotd.state());
        iotd.wait_status("a rotation is due: waiting for the system clock to be synchronised")
            .await;
        if let Some(timedated) = timedated {
            // Asked, and answered "no", at least twice: still waiting.
            timedated.wait_asked(2).await;
        }
        assert_eq!(
            identity_of(&iotd.state()).0,
            generation,
            "rotated without a trusted clock"
        );
        UntrustedClock {
            cloud,
            dir,
            iotd,
            generation,
            certificate,
            _bus: bus,
        }
    }

    async fn assert_rotates(mut self, serial: &str) {
        wait_rotated(&self.cloud, &format!("gw-{serial}"), &self.certificate).await;
        assert_eq!(identity_of(&self.iotd.state()).0, self.generation + 1);
        assert!(self.iotd.terminate().await.success());
    }
}

/// Without a trusted clock no expiry decision is made: a due rotation waits, and status says
/// what for; once systemd-timesyncd's flag appears (here a file of the test's, through the
/// test hook), the rotation runs. The bus has no timedated.
#[tokio::test]
async fn a_scheduled_rotation_waits_for_a_trusted_clock() {
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
    let gateway = UntrustedClock::start("t1", None, bus).await;
    std::fs::write(gateway.dir.path().join("synchronized"), "").unwrap();
    gateway.assert_rotates("t1").await;
}

/// The gateways without systemd-timesyncd (chrony, ntpd): no flag file, but systemd-timedated's
/// `NTPSynchronized` (the kernel's flag) says the clock is synchronised. Here a stand-in for
/// timedated on the private bus, with the access its own policy gives (anyone may call it),
/// answers "no", then "yes": the rotation runs.
#[tokio::test]
async fn a_scheduled_rotation_runs_once_timedated_says_the_clock_is_synchronised() {
    let bus = DbusDaemon::start(
        &[&dbus_policy_file()],
        Some(&format!("{ROOT_MAY_OWN}{TIMEDATED_POLICY}")),
    );
    let timedated = Timedated::start(&bus).await;
    let gateway = UntrustedClock::start("t2", Some(&timedated), bus).await;
    timedated.synchronised(true);
    gateway.assert_rotates("t2").await;
}

/// What systemd's own policy file for timedated allows, and root owning its name here.
const TIMEDATED_POLICY: &str = r#"<policy user="root"><allow own="org.freedesktop.timedate1"/></policy><policy context="default"><allow send_destination="org.freedesktop.timedate1"/></policy>"#;

/// A stand-in for systemd-timedated: `org.freedesktop.timedate1` with the one property iotd
/// reads, `NTPSynchronized`.
struct Timedated {
    state: std::sync::Arc<TimedatedState>,
    _connection: zbus::Connection,
}

#[derive(Default)]
struct TimedatedState {
    synchronised: std::sync::atomic::AtomicBool,
    asked: tokio::sync::watch::Sender<u32>,
}

struct TimedatedObject(std::sync::Arc<TimedatedState>);

#[zbus::interface(name = "org.freedesktop.timedate1")]
impl TimedatedObject {
    #[zbus(property, name = "NTPSynchronized")]
    fn ntp_synchronized(&self) -> bool {
        self.0.asked.send_modify(|n| *n += 1);
        self.0
            .synchronised
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Timedated {
    async fn start(bus: &DbusDaemon) -> Timedated {
        let state = std::sync::Arc::new(TimedatedState::default());
        let connection = zbus::connection::Builder::address(bus.address())
            .name("org.freedesktop.timedate1")
            .serve_at("/org/freedesktop/timedate1", TimedatedObject(state.clone()))
            .build()
            .await
            .unwrap();
        Timedated {
            state,
            _connection: connection,
        }
    }

    fn synchronised(&self, yes: bool) {
        self.state
            .synchronised
            .store(yes, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until NTPSynchronized was read `times` times.
    async fn wait_asked(&self, times: u32) {
        let mut asked = self.state.asked.subscribe();
        tokio::time::timeout(WAIT, asked.wait_for(|n| *n >= times))
            .await
            .unwrap_or_else(|_| panic!("timedated was not asked {times} times within {WAIT:?}"))
            .unwrap();
    }
}
