//! A gateway that loses power at any instant of a rotation comes back with a working identity.
//!
//! The real iotd (with the `test-hooks` feature) against fake-iot-core, on a private system bus
//! for `iotctl rotate`: for each rotation failpoint, iotd aborts right after that transition (as
//! a power cut would, nothing flushed beyond what it wrote); then at random instants of a
//! rotation it is killed with SIGKILL. Each time it is started again and must be connected with
//! a valid identity whose certificate is ACTIVE and attached to the thing, with no rotation
//! left half-done: before the commit the old identity (the staged key gone, an issued
//! certificate recorded for the backend), from the commit on the new one.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use iotd::core::ROTATION_FAILPOINTS;
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::*;
use serde_json::Value;

/// Random kills per run of `make test` (`IOTD_CRASH_SEED=N` replays the instants).
const RANDOM_KILLS: u32 = 12;

struct Gateway {
    dir: tempfile::TempDir,
    config_path: std::path::PathBuf,
    thing: String,
}

impl Gateway {
    fn new(cloud: &Cloud, serial: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        let conf = format!(
            "{}\n[rotation]\ntrust_clock = true\n",
            config(cloud, &dir.path().join("state"), serial)
        );
        std::fs::write(&config_path, conf).unwrap();
        Gateway {
            dir,
            config_path,
            thing: format!("gw-{serial}"),
        }
    }

    async fn start(&self, bus: &DbusDaemon, failpoint: Option<&str>) -> Iotd {
        let mut env = vec![("DBUS_SYSTEM_BUS_ADDRESS", bus.address())];
        if let Some(point) = failpoint {
            env.push(("IOTD_TEST_FAILPOINT", point));
        }
        Iotd::start_with_config(
            &iotd_binary(),
            &self.config_path,
            &self.dir.path().join("state"),
            &env,
        )
        .await
    }

    /// Started (again): connected with a committed identity.
    async fn connected(&self, iotd: &mut Iotd) -> Value {
        iotd.wait_status(&format!(
            "Provisioned as {}; certificate valid until",
            self.thing
        ))
        .await;
        iotd.state()
    }
}

/// `iotctl rotate` without waiting; what it says does not matter here (iotd may be gone
/// before it answers).
async fn ask_rotation(bus: &DbusDaemon) {
    let out = tokio::process::Command::new(iotctl_binary())
        .arg("rotate")
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .kill_on_drop(true)
        .output();
    let _ = tokio::time::timeout(WAIT, out).await;
}

fn generation(state: &Value) -> u64 {
    state["identity"]["generation"].as_u64().unwrap()
}

fn certificate(state: &Value) -> String {
    state["identity"]["certificateId"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// What must hold after any restart: no operation left (a rotation not committed was rolled
/// back at start), the identity's certificate ACTIVE and attached, its key there.
fn assert_whole(cloud: &Cloud, gateway: &Gateway, state: &Value, state_dir: &Path, what: &str) {
    assert!(state["operation"].is_null(), "{what}: {state:#}");
    cloud.assert_active_and_attached(&gateway.thing, &certificate(state), what);
    let dir = state_dir.join(format!("gen/{}", generation(state)));
    assert!(
        dir.join("cert.pem").exists(),
        "{what}: no {}",
        dir.display()
    );
}

#[tokio::test]
async fn a_rotation_interrupted_at_any_step_comes_back_with_a_working_identity() {
    let cloud = crash_cloud().await;
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));

    for (i, point) in ROTATION_FAILPOINTS.iter().enumerate() {
        let gateway = Gateway::new(&cloud, &format!("fp{i}"));
        let mut iotd = gateway.start(&bus, Some(point)).await;
        let before = gateway.connected(&mut iotd).await;
        ask_rotation(&bus).await;
        let exit = tokio::time::timeout(WAIT, iotd.wait_exit())
            .await
            .unwrap_or_else(|_| panic!("{point}: iotd did not stop at the failpoint"));
        assert!(!exit.success(), "{point}: {exit:?}");
        let killed_at: Value = serde_json::from_str(
            &std::fs::read_to_string(iotd.state_dir.join("state.json")).unwrap(),
        )
        .unwrap();
        let staged = killed_at["operation"]["stagedGeneration"].as_u64();
        let issued = killed_at["operation"]["step"]["certificateId"]
            .as_str()
            .map(str::to_owned);

        let mut iotd = gateway.start(&bus, None).await;
        let after = gateway.connected(&mut iotd).await;
        assert_whole(&cloud, &gateway, &after, &iotd.state_dir, point);
        let committed = ["rotation-committed", "rotation-reported"].contains(point);
        if committed {
            assert_eq!(
                generation(&after),
                generation(&before) + 1,
                "{point}: {after:#}"
            );
            assert_eq!(
                after["previous"]["identity"]["certificateId"],
                certificate(&before).as_str(),
                "{point}"
            );
            // The report goes out (again) with the new identity.
            cloud
                .wait_log("the rotation report", |e| {
                    e.kind == "in"
                        && e.topic.as_deref()
                            == Some(format!("iotd/{}/rotation", gateway.thing).as_str())
                        && e.payload
                            .as_deref()
                            .is_some_and(|p| p.contains(&certificate(&after)))
                })
                .await;
        } else {
            assert_eq!(
                certificate(&after),
                certificate(&before),
                "{point}: {after:#}"
            );
            // The staged key and generation are gone; an issued certificate is recorded.
            if let Some(staged) = staged {
                let dir = iotd.state_dir.join(format!("gen/{staged}"));
                wait_gone(&dir).await;
            }
            if let Some(id) = issued {
                assert!(
                    after["abandonedCertificates"]
                        .as_array()
                        .is_some_and(|a| a.contains(&Value::from(id.as_str()))),
                    "{point}: {after:#}"
                );
            }
        }
        // And it rotates fine afterwards (iotctl follows it to its end: the D-Bus signal).
        let out = run_iotctl(bus.address(), &["rotate", "--wait"]).await;
        assert!(out.status.success(), "{point}: {out:?}");
        let rotated = iotd.state();
        assert!(
            generation(&rotated) > generation(&after),
            "{point}: {rotated:#}"
        );
        assert_whole(
            &cloud,
            &gateway,
            &rotated,
            &iotd.state_dir,
            &format!("{point}, then a rotation"),
        );
        assert!(iotd.terminate().await.success(), "{point}");
    }
}

#[tokio::test]
async fn sigkill_at_random_instants_of_a_rotation_comes_back_with_a_working_identity() {
    let seed = crash_seed("IOTD_CRASH_SEED");
    eprintln!("rotation crash: seed {seed} (IOTD_CRASH_SEED={seed} draws the same instants)");
    let mut rng = CrashRng::new(seed);
    let cloud = crash_cloud().await;
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
    let gateway = Gateway::new(&cloud, "rk");
    let mut iotd = gateway.start(&bus, None).await;
    gateway.connected(&mut iotd).await;
    // A rotation with a file key takes tens of milliseconds, then waits for its CONNECT: one
    // per second per client id, and the gateway connected just before. The kills fall in
    // [0, 1.5 s] after the request, so that some land before, some during and some after it.
    for round in 0..RANDOM_KILLS {
        let delay = rng.up_to(Duration::from_millis(1500));
        let bus_address = bus.address().to_owned();
        let ask = tokio::spawn(async move {
            let out = tokio::process::Command::new(iotctl_binary())
                .arg("rotate")
                .env("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
                .kill_on_drop(true)
                .output();
            let _ = tokio::time::timeout(WAIT, out).await;
        });
        tokio::task::spawn_blocking(move || std::thread::sleep(delay))
            .await
            .unwrap();
        iotd.kill().await;
        let _ = ask.await;
        let step = persisted_step(&iotd.state_dir);
        iotd = gateway.start(&bus, None).await;
        let state = gateway.connected(&mut iotd).await;
        let what = format!("kill {round} after {delay:?} (state.json at {step})");
        assert_whole(&cloud, &gateway, &state, &iotd.state_dir, &what);
        eprintln!(
            "rotation crash: {what}: back at generation {}",
            generation(&state)
        );
    }
    assert!(iotd.terminate().await.success());
}
