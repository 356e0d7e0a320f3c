//! Crash injection, the short run (`iotd-bench --only crash` is the long one): new gateways whose
//! iotd is killed with SIGKILL once or twice at random instants of its provisioning, then
//! started again; each must end provisioned, with the certificate of its state.json ACTIVE and
//! attached to its thing. Extra certificates (a request whose reply a kill lost) are allowed,
//! and printed. The kill instants come from a seed that is printed; IOTD_CRASH_SEED=N replays
//! the same instants.
#![allow(clippy::unwrap_used)]

use iotd_testkit::*;

/// Runs with one kill, and as many with two; they take turns.
const RUNS_EACH: u32 = 50;

#[tokio::test]
async fn sigkill_once_or_twice_at_random_instants_ends_provisioned() {
    let seed = crash_seed("IOTD_CRASH_SEED");
    eprintln!("crash: seed {seed} (IOTD_CRASH_SEED={seed} draws the same kill instants)");
    let mut rng = CrashRng::new(seed);
    let cloud = crash_cloud().await;
    let exe = iotd_binary();

    // The kill window: an unkilled provisioning with this build on this machine (median of 5).
    let (window, times) = crash_window(&cloud, &exe, 5).await.unwrap();
    eprintln!("crash: unkilled provisionings {times:?}; kills drawn from [0, {window:?}]");

    let mut runs = Vec::new();
    for i in 0..2 * RUNS_EACH {
        let kills = 1 + i % 2;
        let serial = format!("crash-{i:02}");
        let run = crash_run(&cloud, &exe, &serial, kills, window, &mut rng, true).await;
        eprintln!(
            "crash: {serial}: {} kill(s) at {:?} (state.json then: {:?}); {}; {} duplicate(s) \
             ({} attached); back in {:?}",
            run.kills,
            run.kill_instants,
            run.killed_at,
            if run.recovered {
                "recovered"
            } else {
                "NOT RECOVERED"
            },
            run.duplicates,
            run.attached_duplicates,
            run.recovery
        );
        runs.push(run);
    }
    cloud.stop().await;

    let failed: Vec<String> = runs
        .iter()
        .filter(|r| !r.recovered)
        .map(|r| format!("{}: {}", r.serial, r.failure.as_deref().unwrap_or("?")))
        .collect();
    assert!(
        failed.is_empty(),
        "seed {seed}: {} of {} runs did not end provisioned:\n{}",
        failed.len(),
        runs.len(),
        failed.join("\n")
    );
    // Not a vacuous pass: kills must have landed inside the provisioning, not only after it.
    let during = runs
        .iter()
        .flat_map(|r| &r.killed_at)
        .filter(|s| *s != "provisioned")
        .count();
    assert!(
        during > 0,
        "seed {seed}: every kill came after the provisioning (window {window:?})"
    );
    let duplicates: u32 = runs.iter().map(|r| r.duplicates).sum();
    let attached: u32 = runs.iter().map(|r| r.attached_duplicates).sum();
    eprintln!(
        "crash: {} runs ({RUNS_EACH} killed once, {RUNS_EACH} twice), all recovered; {during} of \
         {} kills before provisioned; {duplicates} duplicate certificate(s), {attached} of them \
         attached",
        runs.len(),
        3 * RUNS_EACH
    );
}

/// The harness can tell a run that does not recover: here the cloud refuses RegisterThing for
/// good (a pre-provisioning hook's denial), so iotd stops with "Failed at certificate-issued".
#[tokio::test]
async fn a_gateway_that_does_not_end_provisioned_is_a_failed_run() {
    let cloud = crash_cloud().await;
    cloud.add_fault(
        serde_json::json!({"api": "RegisterThing", "action": "reject",
        "statusCode": 403, "errorCode": "AccessDenied", "errorMessage": "denied by the hook"}),
    );
    let window = std::time::Duration::from_millis(5);
    let mut rng = CrashRng::new(1);
    let run = crash_run(
        &cloud,
        &iotd_binary(),
        "crash-denied",
        1,
        window,
        &mut rng,
        false,
    )
    .await;
    assert!(!run.recovered, "{run:?}");
    let failure = run.failure.unwrap();
    assert!(
        failure.contains("iotd gave up: STATUS=Failed at certificate-issued"),
        "{failure}"
    );
    assert!(failure.contains("state.json: {"), "{failure}");
    assert!(failure.contains("end of iotd's log"), "{failure}");
    assert_eq!(run.kill_instants.len(), 1);
}
