//! iotd's core in this process against fake-iot-core: with no claim it waits; a claim handed
//! over in memory (what the onboarding endpoint will do) provisions it, and the core says so
//! through its events and its snapshot. The core's side of trusted-user onboarding: the
//! window opens while the gateway waits for a claim, attempts are counted and persisted before
//! they are answered (and the cap survives a restart), and a claim bundle handed over through
//! the onboarding port is validated and provisions the gateway with the installer's template
//! parameters, the view following each phase.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use iotd::claim::Claim;
use iotd::config::{self, ConfigPaths};
use iotd::core::{Command, Core, Outcome};
use iotd::fsm::Event;
use iotd::keys::file::FileBackend;
use iotd::onboard::port::{Phase, Refusal, Request, View};
use iotd_testkit::*;

/// Waits for `what` for at most `WAIT`: a regression fails the test instead of hanging it.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen in time"))
}

fn start_core(
    dir: &std::path::Path,
    conf: &str,
) -> (tokio::task::JoinHandle<()>, iotd::core::Handle) {
    let path = dir.join("config.toml");
    std::fs::write(&path, conf).unwrap();
    let settings = config::load(&ConfigPaths::for_main(&path)).unwrap();
    let backend = Arc::new(FileBackend::new(&settings.state_dir));
    let (core, handle) = Core::new(settings, backend).unwrap();
    let run = tokio::spawn(async move {
        core.run().await.unwrap();
    });
    (run, handle)
}

/// The snapshot once the core is provisioned and connected.
async fn connected(
    snapshot: &mut tokio::sync::watch::Receiver<iotd::snapshot::Snapshot>,
) -> iotd::snapshot::Snapshot {
    within(
        "provisioned and connected",
        snapshot.wait_for(|s| s.state == "provisioned" && s.connected),
    )
    .await
    .unwrap()
    .clone()
}

async fn command(
    handle: &iotd::core::Handle,
    make: impl FnOnce(iotd::core::Reply) -> Command,
) -> Result<Outcome, iotd::error::AgentError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    handle.commands.send(make(tx)).await.unwrap();
    within("the answer", rx).await.unwrap()
}

#[tokio::test]
async fn a_claim_handed_over_in_memory_provisions_a_waiting_gateway() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = cloud.claim();
    // No claim files: the configuration names none.
    let conf = config(&cloud, &dir.path().join("state"), "0080")
        .replace(&format!("claim_certificate = \"{cert_path}\"\n"), "")
        .replace(&format!("claim_key = \"{key_path}\"\n"), "");
    assert!(!conf.contains("claim_certificate"), "{conf}");
    let (run, handle) = start_core(dir.path(), &conf);
    let mut events = handle.subscribe();
    let mut snapshot = handle.snapshot.clone();
    let waiting = within("waiting", snapshot.wait_for(|s| s.waiting_for.is_some()))
        .await
        .unwrap()
        .clone();
    assert_eq!(
        (waiting.state, waiting.step),
        ("unprovisioned", "waiting-for-claim")
    );
    assert!(
        waiting
            .waiting_for
            .as_deref()
            .unwrap()
            .contains("none is configured"),
        "{waiting:?}"
    );

    // A damaged hand-over is refused before it reaches the core.
    let err = Claim::from_pem("not a certificate", "also not a key", "from the test").unwrap_err();
    assert!(err.contains("claim certificate from the test"), "{err}");

    let claim = Claim::from_pem(
        &std::fs::read_to_string(&cert_path).unwrap(),
        &std::fs::read_to_string(&key_path).unwrap(),
        "handed over by the test",
    )
    .unwrap();
    let answer = command(&handle, |r| {
        Command::ProvideClaim(Box::new(claim.clone()), r)
    })
    .await;
    assert!(matches!(answer, Ok(Outcome::Changed(_))), "{answer:?}");

    let provisioned = loop {
        match within("an event", events.recv()).await.unwrap() {
            e @ Event::Provisioned { .. } => break e,
            Event::Failed { code, message } => panic!("{code:?}: {message}"),
            _ => {}
        }
    };
    let Event::Provisioned {
        thing_name,
        certificate_id,
    } = provisioned
    else {
        unreachable!()
    };
    assert_eq!(thing_name, "gw-0080");
    assert_eq!(
        within("Connected", events.recv()).await.unwrap(),
        Event::Connected {
            certificate_id: certificate_id.clone()
        }
    );
    let s = connected(&mut snapshot).await;
    assert_eq!(s.certificate_id.as_deref(), Some(certificate_id.as_str()));
    assert_eq!(s.waiting_for, None);
    assert_eq!(cloud.principals("gw-0080"), vec![certificate_id]);
    // The claim's connection used the claim handed over; the claim files were never needed.
    assert!(
        cloud
            .log()
            .iter()
            .any(|e| e.kind == "connect" && e.client_id == "claim-0080")
    );

    // Once provisioned, another claim changes nothing.
    let answer = command(&handle, |r| Command::ProvideClaim(Box::new(claim), r)).await;
    assert!(
        matches!(&answer, Ok(Outcome::Unchanged(m)) if m.contains("already provisioned as gw-0080")),
        "{answer:?}"
    );
    run.abort();
}

/// Claim files installed after iotd started: `Reprovision` (iotctl reprovision) finds them, and
/// the waiting gateway provisions without a restart.
#[tokio::test]
async fn reprovision_finds_claim_files_installed_while_waiting() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = cloud.claim();
    let cert = dir.path().join("claim/claim.pem");
    let key = dir.path().join("claim/claim.key");
    let conf = config(&cloud, &dir.path().join("state"), "0081")
        .replace(&cert_path, cert.to_str().unwrap())
        .replace(&key_path, key.to_str().unwrap());
    let (run, handle) = start_core(dir.path(), &conf);
    let mut snapshot = handle.snapshot.clone();
    within("waiting", snapshot.wait_for(|s| s.waiting_for.is_some()))
        .await
        .unwrap();
    // Asking before the files are there changes nothing and says what is missing.
    let answer = command(&handle, Command::Reprovision).await;
    let e = answer.unwrap_err();
    assert_eq!(e.code, iotd::error::ErrorCode::ClaimMissing, "{e}");
    assert!(e.message.contains("does not exist"), "{e}");

    std::fs::create_dir_all(cert.parent().unwrap()).unwrap();
    std::fs::copy(&cert_path, &cert).unwrap();
    std::fs::copy(&key_path, &key).unwrap();
    let answer = command(&handle, Command::Reprovision).await;
    assert!(
        matches!(&answer, Ok(Outcome::Changed(m)) if m.starts_with(&format!("found claim certificate {}", cert.display()))),
        "{answer:?}"
    );
    let s = connected(&mut snapshot).await;
    assert_eq!(s.thing_name.as_deref(), Some("gw-0081"));
    assert!(
        s.key_reference.as_deref().unwrap().starts_with("file "),
        "{s:?}"
    );
    run.abort();
}

/// The configuration for `cloud` without claim files, letting installers supply `Site`.
fn without_claim(cloud: &Cloud, dir: &std::path::Path, serial: &str) -> String {
    let (cert, key) = cloud.claim();
    let conf = config(cloud, &dir.join("state"), serial)
        .replace(&format!("claim_certificate = \"{cert}\"\n"), "")
        .replace(&format!("claim_key = \"{key}\"\n"), "");
    format!("{conf}\n[onboarding]\ninstaller_parameters = [\"Site\"]\n")
}

async fn count(handle: &iotd::core::Handle) -> Result<u32, Refusal> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    handle
        .onboarding
        .requests
        .send(Request::CountAttempt {
            peer: "127.0.0.1:5000".parse().unwrap(),
            reply,
        })
        .await
        .unwrap();
    within("the count", answer).await.unwrap()
}

async fn hand_over(handle: &iotd::core::Handle, bundle: &serde_json::Value) -> Result<(), Refusal> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    handle
        .onboarding
        .requests
        .send(Request::HandOver {
            plaintext: zeroize::Zeroizing::new(bundle.to_string().into_bytes()),
            reply,
        })
        .await
        .unwrap();
    within("the hand-over", answer).await.unwrap()
}

async fn view_where(handle: &iotd::core::Handle, what: &str, f: impl FnMut(&View) -> bool) -> View {
    let mut view = handle.onboarding.view.clone();
    within(what, view.wait_for(f)).await.unwrap().clone()
}

fn attempts_on_disk(dir: &std::path::Path) -> u64 {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state/state.json")).unwrap()).unwrap();
    state["onboarding"]["attemptsUsed"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn attempts_are_persisted_before_they_are_answered_and_the_cap_survives_a_restart() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = without_claim(&cloud, dir.path(), "o1");
    let (run, handle) = start_core(dir.path(), &conf);
    let open = view_where(&handle, "the window open", |v| v.open).await;
    assert_eq!((open.attempts_left, open.phase), (20, Phase::Waiting));
    for used in 1..=20u32 {
        assert_eq!(count(&handle).await, Ok(20 - used));
        assert_eq!(
            attempts_on_disk(dir.path()),
            u64::from(used),
            "on disk before the reply"
        );
    }
    let refused = count(&handle).await.unwrap_err();
    assert_eq!((refused.code, refused.status), ("window_closed", 403));
    assert!(
        refused.message.contains("iotctl onboarding open"),
        "{refused:?}"
    );
    run.abort();
    let _ = run.await;

    // Restarted: still waiting for a claim, but the window stays shut until a person opens it.
    let (run, handle) = start_core(dir.path(), &conf);
    let mut snapshot = handle.snapshot.clone();
    within("waiting", snapshot.wait_for(|s| s.waiting_for.is_some()))
        .await
        .unwrap();
    let view = handle.onboarding.view.borrow().clone();
    assert!(!view.open && view.attempts_left == 0, "{view:?}");
    assert_eq!(count(&handle).await.unwrap_err().code, "window_closed");
    run.abort();
}

#[tokio::test]
async fn a_claim_bundle_handed_over_provisions_with_the_installers_parameters() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = without_claim(&cloud, dir.path(), "o2");
    let (run, handle) = start_core(dir.path(), &conf);
    view_where(&handle, "the window open", |v| v.open).await;
    assert_eq!(count(&handle).await, Ok(19));

    // Refused: a template this gateway does not allow, then a parameter it sources itself.
    let (cert, key) = cloud.claim();
    let bundle = |extra: serde_json::Value| {
        let mut b = serde_json::json!({
            "v": 1,
            "certificate_pem": std::fs::read_to_string(&cert).unwrap(),
            "private_key_pem": std::fs::read_to_string(&key).unwrap(),
            "not_after": null,
        });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let refused = hand_over(&handle, &bundle(serde_json::json!({"template": "other"})))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code, refused.status),
        ("claim_invalid", 422),
        "{refused:?}"
    );
    let refused = hand_over(
        &handle,
        &bundle(serde_json::json!({"parameters": {"SerialNumber": "evil"}})),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code, "claim_invalid", "{refused:?}");
    assert!(
        handle.onboarding.view.borrow().open,
        "a refusal keeps the window open"
    );

    hand_over(
        &handle,
        &bundle(serde_json::json!({"template": "gateway", "parameters": {"Site": "hall-7"}})),
    )
    .await
    .unwrap();
    let done = view_where(&handle, "connected with its own identity", |v| {
        v.phase == Phase::Connected
    })
    .await;
    assert_eq!(done.thing_name.as_deref(), Some("gw-o2"));
    assert!(!done.open, "the window closes on success");
    let thing = &cloud.registry()["things"]["gw-o2"];
    assert_eq!(thing["attributes"]["site"], "hall-7", "{thing}");
    assert_eq!(
        thing["attributes"]["serial"], "o2",
        "the device's own value"
    );
    assert_eq!(attempts_on_disk(dir.path()), 0, "a new count after success");
    run.abort();
}
