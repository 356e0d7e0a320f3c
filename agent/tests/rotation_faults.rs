//! Certificate rotation when AWS IoT refuses a certificate: the real iotd binary (on a private
//! system bus, for `iotctl rotate`) against fake-iot-core in this process, on 127.0.0.1.
//!
//! - The new certificate refused at its CONNECT (a fault on the next certificate the fake
//!   issues): the rotation is rolled back, the old identity connects again, the backend hears of
//!   it, `iotctl rotate --wait` says so (exit 1); without the fault the next rotation commits.
//! - The committed certificate revoked (UpdateCertificate): iotd falls back to the identity the
//!   rotation kept for the grace period, also when the revocation comes before the rotation's
//!   report reached the backend (which must then not hear that the rotation committed); with
//!   `grace_period = "0"` nothing is kept and iotd stays disconnected, retrying with the revoked
//!   certificate, and says why.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fake_iot_core::registry::CertStatus;
use fake_iot_core::server::{LogEntry, lock};
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::*;
use serde_json::{Value, json};

/// One gateway: its directory (config, state, iotd's log) and thing name.
struct Gateway {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    script: PathBuf,
    log: PathBuf,
    thing: String,
}

impl Gateway {
    /// A gateway `serial` of `cloud` with `rotation` (TOML lines) in `[rotation]`. iotd's log
    /// goes to a file, so that a failure can quote it and a test can read what iotd said.
    fn new(cloud: &Cloud, serial: &str, rotation: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        let conf = format!(
            "{}\n[rotation]\n{rotation}",
            config(cloud, &dir.path().join("state"), serial)
        );
        std::fs::write(&config_path, conf).unwrap();
        let (script, log) = iotd_with_log(&iotd_binary(), dir.path());
        Gateway {
            dir,
            config_path,
            script,
            log,
            thing: format!("gw-{serial}"),
        }
    }

    async fn start(&self, bus: &DbusDaemon) -> Iotd {
        Iotd::start_with_config(
            &self.script,
            &self.config_path,
            &self.dir.path().join("state"),
            &[("DBUS_SYSTEM_BUS_ADDRESS", bus.address())],
        )
        .await
    }

    /// Waits until iotd says it is provisioned and connected ("Provisioned as THING;
    /// certificate valid until …"); returns state.json.
    async fn connected(&self, iotd: &mut Iotd) -> Value {
        if let Err(e) = wait_provisioned(iotd, &self.thing, WAIT).await {
            panic!("{e}\n{}", self.log_tail());
        }
        iotd.state()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log, 40)
    }
}

/// `iotctl rotate --wait`, which must succeed; returns its stdout.
async fn rotate_ok(bus: &DbusDaemon, gateway: &Gateway) -> String {
    let out = run_iotctl(bus.address(), &["rotate", "--wait"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "iotctl rotate --wait: {:?}\nstdout: {stdout}\nstderr: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        gateway.log_tail()
    );
    stdout
}

fn abandoned(state: &Value, id: &str) -> bool {
    state["abandonedCertificates"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c == id))
}

fn last_error(state: &Value) -> &str {
    state["lastError"]["message"].as_str().unwrap_or_default()
}

/// How often these tests read state.json while they wait on it. Not every write has a signal
/// a test could wait on (a STATUS= line only when the summary changes), and the states passed
/// through on the way (a rollback's, a fallback's) are what some assertions are about.
const STATE_LOOK: Duration = Duration::from_millis(20);

/// Polls state.json (iotd writes it at each transition) until `done`, within `WAIT`; every
/// state seen on the way goes to `seen` (a transient one can matter).
async fn wait_state(
    iotd: &Iotd,
    gateway: &Gateway,
    what: &str,
    seen: &mut Vec<Value>,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let state = iotd.state();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if done(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "state.json does not show {what} within {WAIT:?}: {state:#}\n{}",
            gateway.log_tail()
        );
        tokio::time::sleep(STATE_LOOK).await;
    }
}

/// The sequence number of the fake's last log entry: what a test looks after.
fn log_mark(cloud: &Cloud) -> u64 {
    cloud.log().last().map_or(0, |e| e.seq)
}

fn is_connect(e: &LogEntry, thing: &str, certificate: &str) -> bool {
    e.kind == "connect"
        && e.client_id == thing
        && e.detail
            .as_deref()
            .is_some_and(|d| d.contains(&format!("certificate {certificate}")))
}

/// The fake's log entries of `thing` after `mark`, one line each, for failure messages.
fn log_since(cloud: &Cloud, thing: &str, mark: u64) -> String {
    cloud
        .log()
        .into_iter()
        .filter(|e| e.seq > mark && e.client_id == thing)
        .map(|e| {
            format!(
                "  #{} {} {} {}\n",
                e.seq,
                e.kind,
                e.topic.unwrap_or_default(),
                e.detail.unwrap_or_default()
            )
        })
        .collect()
}

/// Waits until the last STATUS= line iotd sent contains `text` (a line is sent when it changes;
/// the one that is current is what systemd shows).
async fn wait_current_status(iotd: &mut Iotd, gateway: &Gateway, text: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        // Every line sent so far, then each new one as it comes.
        while iotd.next_line(Duration::ZERO).await.is_some() {}
        let current = iotd
            .seen
            .iter()
            .rev()
            .find(|l| l.starts_with("STATUS="))
            .cloned()
            .unwrap_or_default();
        if current.contains(text) {
            return current;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            iotd.next_line(left).await.is_some(),
            "the current STATUS= line does not contain {text:?} within {WAIT:?}: {current:?}\n{}",
            gateway.log_tail()
        );
    }
}

/// A rotation whose new certificate AWS IoT refuses at CONNECT (403 AccessDenied for the next
/// certificate the fake issues): the rotation is rolled back (state.json, the staged generation
/// gone, the refused certificate recorded as abandoned), the old certificate connects again,
/// the backend gets a rolled-back report, and `iotctl rotate --wait` exits 1 saying so. With the
/// fault gone, the next rotation commits.
#[tokio::test]
async fn a_new_certificate_refused_at_connect_is_rolled_back_and_the_next_rotation_commits() {
    let cloud = Cloud::start().await;
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
    let gateway = Gateway::new(&cloud, "rf1", "");
    let thing = gateway.thing.clone();
    let mut iotd = gateway.start(&bus).await;
    let before = gateway.connected(&mut iotd).await;
    let (generation, old) = identity_of(&before);

    let rule = cloud.add_fault(json!({
        "api": "Connect",
        "certificateId": "$next",
        "action": "reject",
        "statusCode": 403,
        "errorCode": "AccessDenied",
        "errorMessage": "new certificate refused",
    }));
    let mark = log_mark(&cloud);

    // Follow the states while iotctl waits: the rollback's own state may not last (the old
    // certificate connects again right after it).
    let mut seen = Vec::new();
    let rotate = run_iotctl(bus.address(), &["rotate", "--wait"]);
    tokio::pin!(rotate);
    let out = loop {
        tokio::select! {
            out = &mut rotate => break out,
            () = tokio::time::sleep(STATE_LOOK) => {
                let state = iotd.state();
                if seen.last() != Some(&state) {
                    seen.push(state);
                }
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "iotctl rotate --wait must fail\nstdout: {stdout}\nstderr: {stderr}\n{}",
        gateway.log_tail()
    );
    let rotation = format!("rotation-{}", generation + 1);
    assert!(
        stderr.contains(&format!("{rotation} failed"))
            && stderr.contains("was rolled back")
            && stderr.contains(&old),
        "iotctl's stderr: {stderr}"
    );

    // The certificate the fake refused: the fault's "$next", resolved when it was issued.
    let refused = lock(&cloud.shared().faults)
        .rules()
        .iter()
        .find(|r| r.id == rule)
        .and_then(|r| r.certificate_id.clone())
        .unwrap();
    assert!(refused != "$next" && refused != old, "{refused}");
    let refusal = cloud
        .wait_log("the refused CONNECT of the new certificate", |e| {
            e.seq > mark
                && e.kind == "refused"
                && e.client_id == thing
                && e.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("403 AccessDenied: new certificate refused"))
        })
        .await;
    assert!(
        stderr.contains(&refused) || stderr.contains("AccessDenied") || stderr.contains("403"),
        "iotctl does not say which certificate was refused, or why: {stderr}"
    );

    // Rolled back: the old identity, no operation, a retry scheduled, the refused certificate
    // recorded for the backend.
    let state = wait_state(&iotd, &gateway, "the rollback", &mut seen, |s| {
        s["operation"].is_null() && abandoned(s, &refused)
    })
    .await;
    assert_eq!(identity_of(&state), (generation, old.clone()), "{state:#}");
    // The next scheduled rotation waits retry_interval (1 h by default).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let retry_at = state["rotation"]["retryAt"].as_i64();
    assert!(
        retry_at.is_some_and(|t| (now + 3_500..=now + 3_700).contains(&t)),
        "rotation.retryAt is not about an hour from now ({now}): {state:#}"
    );
    assert!(state["previous"].is_null(), "{state:#}");
    assert_eq!(state["lastGeneration"], generation + 1, "{state:#}");
    wait_gone(&iotd.state_dir.join(format!("gen/{}", generation + 1))).await;
    assert!(
        iotd.state_dir
            .join(format!("gen/{generation}/cert.pem"))
            .exists()
    );

    // The old certificate connects again after the refusal; iotd says it is connected.
    let reconnect = cloud
        .wait_log(
            "a CONNECT with the old certificate after the refusal",
            |e| e.seq > refusal.seq && is_connect(e, &thing, &old),
        )
        .await;
    assert!(
        !cloud
            .log()
            .iter()
            .any(|e| e.seq > mark && is_connect(e, &thing, &refused)),
        "the refused certificate connected:\n{}",
        log_since(&cloud, &thing, mark)
    );
    wait_current_status(
        &mut iotd,
        &gateway,
        &format!("Provisioned as {thing}; certificate valid until"),
    )
    .await;
    cloud.assert_active_and_attached(&thing, &old, "after the rollback");

    // The backend hears of the rollback (on the rotation topic) and of the abandoned
    // certificate (on the certificates topic), over the old certificate's session.
    let report = cloud
        .wait_log("the rolled-back rotation report", |e| {
            e.seq > reconnect.seq
                && e.kind == "in"
                && e.topic.as_deref() == Some(format!("iotd/{thing}/rotation").as_str())
                && e.payload.as_deref().is_some_and(|p| p.contains(&refused))
        })
        .await;
    let report: Value = serde_json::from_str(report.payload.as_deref().unwrap()).unwrap();
    assert_eq!(report["outcome"], "rolled-back", "{report:#}");
    assert_eq!(report["oldCertificateId"], old.as_str(), "{report:#}");
    assert_eq!(report["newCertificateId"], refused.as_str(), "{report:#}");
    assert_eq!(report["reason"], "on-demand", "{report:#}");
    assert_eq!(report["thingName"], thing.as_str(), "{report:#}");
    assert!(
        report["cause"]
            .as_str()
            .is_some_and(|c| c.contains("rolled back")),
        "{report:#}"
    );
    cloud
        .wait_log("the abandoned certificate's report", |e| {
            e.kind == "in"
                && e.topic.as_deref() == Some(format!("iotd/{thing}/certificates").as_str())
                && e.payload
                    .as_deref()
                    .is_some_and(|p| p.contains("abandoned-certificate") && p.contains(&refused))
        })
        .await;
    let state = wait_state(
        &iotd,
        &gateway,
        "the reports acknowledged",
        &mut seen,
        |s| {
            s["rotation"]["reports"].is_null()
                && s["reportedCertificates"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|c| c == refused.as_str()))
        },
    )
    .await;
    assert!(state["rotation"]["retryAt"].is_i64(), "{state:#}");

    // Why the rotation failed stays in state.json (lastError, which `iotctl status` shows)
    // after the old certificate connected again, not only until then: checked here, said at
    // the end (the second rotation below does not depend on it).
    let rolled_back = |s: &Value| {
        let m = last_error(s);
        m.contains("rolled back") && m.contains(&rotation) && m.contains(&old)
    };
    let lost_error = (!rolled_back(&state)).then(|| {
        format!(
            "lastError (why {rotation} failed and was rolled back) is not in state.json once \
             the old certificate {old} connected again ({}): nothing in state.json or `iotctl \
             status` says why the rotation failed (the rolled-back report is acknowledged and \
             gone; only rotation.retryAt and abandonedCertificates are left).\nstate.json now: \
             {state:#}\n{}",
            if seen.iter().any(rolled_back) {
                "it was there between the rollback and the reconnection, then cleared"
            } else {
                "no state.json polled during the rotation had it"
            },
            gateway.log_tail()
        )
    });

    // The fault gone, the next rotation commits: a new generation (the refused one's is not
    // reused), a new certificate, the old one kept as the previous identity.
    cloud.clear_faults();
    let mark = log_mark(&cloud);
    let stdout = rotate_ok(&bus, &gateway).await;
    let state = iotd.state();
    let (new_generation, new) = identity_of(&state);
    assert_eq!(new_generation, generation + 2, "{state:#}");
    assert!(new != old && new != refused, "{state:#}");
    assert!(
        stdout.contains(&format!("rotation-{new_generation} committed")) && stdout.contains(&new),
        "{stdout}"
    );
    assert_eq!(state["previous"]["identity"]["certificateId"], old.as_str());
    assert!(state["operation"].is_null(), "{state:#}");
    assert!(state["rotation"]["retryAt"].is_null(), "{state:#}");
    assert!(state["lastError"].is_null(), "{state:#}");
    assert_eq!(state["rotation"]["last"]["newCertificateId"], new.as_str());
    cloud
        .wait_log("a CONNECT with the rotated certificate", |e| {
            e.seq > mark && is_connect(e, &thing, &new)
        })
        .await;
    cloud.assert_active_and_attached(&thing, &new, "after the second rotation");
    let report = cloud
        .wait_log("the committed rotation report", |e| {
            e.kind == "in"
                && e.topic.as_deref() == Some(format!("iotd/{thing}/rotation").as_str())
                && e.payload.as_deref().is_some_and(|p| p.contains(&new))
        })
        .await;
    let report: Value = serde_json::from_str(report.payload.as_deref().unwrap()).unwrap();
    assert_eq!(report["outcome"], "committed", "{report:#}");
    assert_eq!(report["oldCertificateId"], old.as_str(), "{report:#}");
    assert!(iotd.terminate().await.success());
    assert!(lost_error.is_none(), "{}", lost_error.unwrap_or_default());
}

/// The certificate id of a `connect` entry of the fake's log.
fn connect_certificate(e: &LogEntry) -> String {
    e.detail
        .as_deref()
        .and_then(|d| d.split("certificate ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

/// Waits until iotd fell back from the revoked `new` to the previous certificate `old`
/// (state.json's identity); every state seen goes to `seen`, the last one that of the fallback.
async fn wait_fallback(
    iotd: &Iotd,
    gateway: &Gateway,
    cloud: &Cloud,
    (old, new): (&str, &str),
    mark: u64,
    seen: &mut Vec<Value>,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let state = iotd.state();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if identity_of(&state).1 == old {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "iotd did not fall back to the previous certificate {old} within {WAIT:?} of \
             certificate {new} being revoked (the previous identity is kept until {}, and valid \
             until {}).\nstate.json: {state:#}\nthe fake's log for {} since the revocation \
             (the session closed, then every CONNECT with the revoked certificate refused with \
             CONNACK not authorized, as AWS IoT does):\n{}{}",
            state["previous"]["deleteAfter"],
            state["previous"]["identity"]["notAfter"],
            gateway.thing,
            log_since(cloud, &gateway.thing, mark),
            gateway.log_tail()
        );
        tokio::time::sleep(STATE_LOOK).await;
    }
}

/// What a fallback from `new` (generation `generation`) to `old` (generation `old_generation`)
/// leaves: the previous identity used up, the revoked certificate recorded as abandoned, its
/// generation removed, the old certificate connected again, the log saying so. Returns why
/// lastError does not say so any more, if it does not (see the callers).
async fn assert_fell_back(
    iotd: &mut Iotd,
    gateway: &Gateway,
    cloud: &Cloud,
    (old_generation, old): (u64, &str),
    (generation, new): (u64, &str),
    mark: u64,
    seen: &[Value],
) -> Option<String> {
    let thing = &gateway.thing;
    // The state in which it fell back: the last one `wait_fallback` saw.
    let state = seen.last().unwrap();
    assert!(state["previous"].is_null(), "{state:#}");
    assert!(state["operation"].is_null(), "{state:#}");
    assert_eq!(state["identity"]["generation"], old_generation, "{state:#}");
    assert!(abandoned(state, new), "{state:#}");
    wait_gone(&iotd.state_dir.join(format!("gen/{generation}"))).await;
    assert!(
        iotd.state_dir
            .join(format!("gen/{old_generation}/cert.pem"))
            .exists()
    );
    // Connected with the old certificate again, and iotd says it is connected.
    cloud
        .wait_log(
            "a CONNECT with the previous certificate after the revocation",
            |e| e.seq > mark && is_connect(e, thing, old),
        )
        .await;
    wait_current_status(
        iotd,
        gateway,
        &format!("Provisioned as {thing}; certificate valid until"),
    )
    .await;
    cloud.assert_active_and_attached(thing, old, "after the fallback");
    // Said loudly: in the log, and in state.json's lastError.
    assert!(
        gateway
            .log_text()
            .lines()
            .any(|l| l.contains("fell back") && l.contains(new) && l.contains(old)),
        "iotd's log does not say it fell back from {new} to {old}:\n{}",
        gateway.log_tail()
    );
    let fell_back = |s: &Value| last_error(s).contains("fell back") && last_error(s).contains(new);
    let now = iotd.state();
    (!fell_back(&now)).then(|| {
        format!(
            "lastError (that the gateway fell back from the revoked certificate {new}) is not in \
             state.json once the previous certificate {old} connected again ({}): the gateway \
             runs on a certificate the fleet meant to replace, and nothing in state.json or \
             `iotctl status` says so.\nstate.json now: {now:#}\n{}",
            if seen.iter().any(fell_back) {
                "it was there between the fallback and the reconnection, then cleared"
            } else {
                "no state.json polled during the fallback had it"
            },
            gateway.log_tail()
        )
    })
}

/// A committed rotation (its report acknowledged) whose new certificate is then revoked
/// (UpdateCertificate REVOKED: the fake closes its session at once and refuses its CONNECTs):
/// iotd falls back to the previous identity, which the rotation kept for the grace period
/// (7 days by default): the previous certificate is the identity again, the revoked one is
/// recorded as abandoned, its generation removed, the gateway connected with the old
/// certificate, the log and lastError say so. A rotation after it commits.
#[tokio::test]
async fn a_revoked_new_certificate_falls_back_to_the_previous_identity() {
    let cloud = Cloud::start().await;
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
    let gateway = Gateway::new(&cloud, "fb1", "");
    let thing = gateway.thing.clone();
    let mut iotd = gateway.start(&bus).await;
    let (old_generation, old) = identity_of(&gateway.connected(&mut iotd).await);
    rotate_ok(&bus, &gateway).await;
    let mut seen = Vec::new();
    // The backend has the report (the broker acknowledged it).
    let rotated = wait_state(&iotd, &gateway, "the report acknowledged", &mut seen, |s| {
        s["rotation"]["reports"].is_null()
    })
    .await;
    let (generation, new) = identity_of(&rotated);
    assert_eq!(generation, old_generation + 1, "{rotated:#}");
    assert_eq!(
        rotated["previous"]["identity"]["certificateId"],
        old.as_str()
    );
    let kept_for = rotated["previous"]["deleteAfter"].as_i64().unwrap()
        - rotated["identity"]["committedAt"].as_i64().unwrap();
    assert_eq!(kept_for, 7 * 24 * 3600, "{rotated:#}");
    cloud
        .wait_log("a CONNECT with the rotated certificate", |e| {
            is_connect(e, &thing, &new)
        })
        .await;

    let mark = log_mark(&cloud);
    fake_iot_core::control::set_certificate_status(cloud.shared(), &new, CertStatus::Revoked)
        .unwrap();
    cloud
        .wait_log("the revoked certificate's session closed", |e| {
            e.seq > mark
                && e.kind == "disconnect"
                && e.client_id == thing
                && e.detail
                    .as_deref()
                    .is_some_and(|d| d.contains(&format!("certificate {new} was made REVOKED")))
        })
        .await;
    wait_fallback(&iotd, &gateway, &cloud, (&old, &new), mark, &mut seen).await;
    let lost_error = assert_fell_back(
        &mut iotd,
        &gateway,
        &cloud,
        (old_generation, &old),
        (generation, &new),
        mark,
        &seen,
    )
    .await;

    // As the message says: rotate again. A new generation, the old certificate kept.
    rotate_ok(&bus, &gateway).await;
    let state = iotd.state();
    let (third_generation, third) = identity_of(&state);
    assert_eq!(third_generation, generation + 1, "{state:#}");
    assert!(third != old && third != new, "{state:#}");
    assert_eq!(state["previous"]["identity"]["certificateId"], old.as_str());
    cloud.assert_active_and_attached(&thing, &third, "after rotating again");
    assert!(iotd.terminate().await.success());
    assert!(lost_error.is_none(), "{}", lost_error.unwrap_or_default());
}

/// The new certificate revoked as soon as it connected, before its rotation report reached the
/// backend (a backend that had not caught up): iotd falls back to the previous identity, and
/// must then not tell the backend that the rotation committed. A "committed" report names the
/// old certificate for the backend to deactivate: sent over the old certificate's session after
/// the fallback, it would have the backend deactivate the certificate the gateway now runs on.
#[tokio::test]
async fn a_fallback_before_the_rotation_report_does_not_report_the_commit() {
    let cloud = Cloud::start().await;
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
    let gateway = Gateway::new(&cloud, "fb2", "");
    let thing = gateway.thing.clone();
    let mut iotd = gateway.start(&bus).await;
    let (old_generation, old) = identity_of(&gateway.connected(&mut iotd).await);

    // Revoked the moment the fake accepted its CONNECT (its CONNACK is already on the wire:
    // iotd commits, then loses the session).
    let mark = log_mark(&cloud);
    let revoke = async {
        let connect = cloud
            .wait_log("the new certificate's CONNECT", |e| {
                e.seq > mark
                    && e.kind == "connect"
                    && e.client_id == thing
                    && connect_certificate(e) != old
            })
            .await;
        let new = connect_certificate(&connect);
        fake_iot_core::control::set_certificate_status(cloud.shared(), &new, CertStatus::Revoked)
            .unwrap();
        (new, log_mark(&cloud))
    };
    let (out, (new, revoked_at)) =
        tokio::join!(run_iotctl(bus.address(), &["rotate", "--wait"]), revoke);
    assert!(
        out.status.success(),
        "iotctl rotate --wait: {:?}\nstdout: {}\nstderr: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gateway.log_tail()
    );
    let report_of = |e: &LogEntry, outcome: &str| {
        e.kind == "in"
            && e.topic.as_deref() == Some(format!("iotd/{thing}/rotation").as_str())
            && e.payload.as_deref().is_some_and(|p| {
                p.contains(&new) && p.contains(&format!("\"outcome\":\"{outcome}\""))
            })
    };
    let reported_before = cloud
        .log()
        .iter()
        .any(|e| e.seq <= revoked_at && report_of(e, "committed"));

    let mut seen = Vec::new();
    wait_fallback(&iotd, &gateway, &cloud, (&old, &new), mark, &mut seen).await;
    let generation = old_generation + 1;
    let lost_error = assert_fell_back(
        &mut iotd,
        &gateway,
        &cloud,
        (old_generation, &old),
        (generation, &new),
        revoked_at,
        &seen,
    )
    .await;

    if reported_before {
        eprintln!(
            "the committed report reached the fake before the revocation: nothing to check about \
             it after the fallback"
        );
    } else {
        // Whatever iotd does with the pending report (drops it, or reports the fallback), it
        // is done once state.json holds no committed report for the revoked certificate.
        let state = wait_state(
            &iotd,
            &gateway,
            "no pending committed report for the revoked certificate",
            &mut seen,
            |s| {
                !s["rotation"]["reports"].as_array().is_some_and(|r| {
                    r.iter().any(|r| {
                        r["newCertificateId"] == new.as_str() && r["outcome"] == "committed"
                    })
                })
            },
        )
        .await;
        let sent: Vec<String> = cloud
            .log()
            .into_iter()
            .filter(|e| e.seq > revoked_at && report_of(e, "committed"))
            .map(|e| e.payload.unwrap_or_default())
            .collect();
        assert!(
            sent.is_empty(),
            "after falling back to {old}, iotd sent the rotation report that says {new} was \
             committed (the backend then deactivates {old}, the certificate the gateway runs on \
             again): {sent:#?}\nstate.json: {state:#}"
        );
    }
    assert!(iotd.terminate().await.success());
    assert!(lost_error.is_none(), "{}", lost_error.unwrap_or_default());
}

/// With `grace_period = "0"` the previous identity goes as soon as the rotation committed: a
/// revoked new certificate has nothing to fall back to. iotd keeps the identity and stays
/// disconnected, retrying, and says that the certificate is refused.
#[tokio::test]
async fn without_a_grace_period_a_revoked_new_certificate_stays_disconnected_and_says_why() {
    let cloud = Cloud::start().await;
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
    let gateway = Gateway::new(&cloud, "fb0", "grace_period = \"0\"\n");
    let thing = gateway.thing.clone();
    let mut iotd = gateway.start(&bus).await;
    let (old_generation, old) = identity_of(&gateway.connected(&mut iotd).await);
    rotate_ok(&bus, &gateway).await;
    let mut seen = Vec::new();
    let rotated = wait_state(
        &iotd,
        &gateway,
        "the previous identity removed",
        &mut seen,
        |s| s["previous"].is_null(),
    )
    .await;
    let (generation, new) = identity_of(&rotated);
    assert_eq!(generation, old_generation + 1, "{rotated:#}");
    wait_gone(&iotd.state_dir.join(format!("gen/{old_generation}"))).await;
    cloud
        .wait_log("a CONNECT with the rotated certificate", |e| {
            is_connect(e, &thing, &new)
        })
        .await;

    let mark = log_mark(&cloud);
    fake_iot_core::control::set_certificate_status(cloud.shared(), &new, CertStatus::Revoked)
        .unwrap();
    // iotd tries again (more than once: it keeps retrying) and is refused each time.
    let refused = |e: &LogEntry| {
        e.seq > mark
            && e.kind == "refused"
            && e.client_id == thing
            && e.detail
                .as_deref()
                .is_some_and(|d| d.contains(&format!("certificate {new} is REVOKED")))
    };
    let first = cloud
        .wait_log("a refused CONNECT of the revoked certificate", refused)
        .await;
    cloud
        .wait_log("a second refused CONNECT of the revoked certificate", |e| {
            e.seq > first.seq && refused(e)
        })
        .await;
    let state = wait_state(&iotd, &gateway, "the refusal recorded", &mut seen, |s| {
        last_error(s).contains(&new)
    })
    .await;
    assert_eq!(identity_of(&state), (generation, new.clone()), "{state:#}");
    assert!(state["previous"].is_null(), "{state:#}");
    assert!(state["operation"].is_null(), "{state:#}");
    assert!(!abandoned(&state, &new), "{state:#}");
    assert!(
        !state["lastError"]["permanent"].as_bool().unwrap_or(true),
        "{state:#}"
    );
    let message = last_error(&state);
    assert!(
        message.contains("not ACTIVE") || message.contains("revoked"),
        "lastError does not say the certificate is refused: {message}"
    );
    let status = wait_current_status(
        &mut iotd,
        &gateway,
        &format!("Provisioned as {thing}; disconnected, retrying"),
    )
    .await;
    assert!(status.contains(&new), "{status}");
    assert!(
        !cloud
            .log()
            .iter()
            .any(|e| e.seq > mark && is_connect(e, &thing, &old)),
        "the old certificate connected although its key was deleted:\n{}",
        log_since(&cloud, &thing, mark)
    );
    assert!(iotd.terminate().await.success());
}
