//! iotctl against a live `io.iotd.Agent1` on a private dbus-daemon that runs the shipped
//! policy (packaging/dbus/io.iotd.Agent1.conf):
//! - most tests serve the interface in this process (`iotd::dbus::serve`) with a snapshot and a
//!   command channel the test drives, so every state and transition is exact;
//! - `end_to_end_*` run the real iotd binary against fake-iot-core. That binary is not built
//!   by `cargo test -p iotctl` (Cargo builds a dependency's library, not its binaries): it is
//!   looked up next to this test's directory, `target/<profile>/iotd`, which `cargo test
//!   --workspace` or `cargo build -p iotd` puts there.
//!
//! Needs dbus-daemon, and root for the `setpriv` test (as iotd's own D-Bus tests do).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::{NO_BUS, iotctl};
use iotd::core::{Command, Handle, Outcome};
use iotd::error::{AgentError, ErrorCode, Retry};
use iotd::fsm::Event;
use iotd::snapshot::Snapshot;
use iotd::store::LastError;
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::{ROOT_MAY_OWN, dbus_policy_file, iotd_binary};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{broadcast, mpsc, watch};

const WAIT: Duration = Duration::from_secs(30);

fn provisioning() -> Snapshot {
    Snapshot {
        state: iotd_api::state::PROVISIONING,
        step: "certificate-issued",
        certificate_id: Some("c0ffee".into()),
        key_backend: "file",
        key_reference: Some("file /var/lib/iotd/gen/1/key.pem".into()),
        endpoint: "example-ats.iot.eu-west-1.amazonaws.com:8883".into(),
        last_error: Some(LastError {
            sticky: false,
            code: "network".into(),
            message: "connecting to example: no route to host".into(),
            at: 1_780_826_310,
            permanent: false,
            retry_at: Some(1_780_826_315),
        }),
        ..Snapshot::default()
    }
}

fn provisioned() -> Snapshot {
    Snapshot {
        state: iotd_api::state::PROVISIONED,
        step: "provisioned",
        thing_name: Some("gw-live-1".into()),
        certificate_id: Some("c0ffee".into()),
        certificate_not_after: Some(1_800_000_000),
        certificate_path: Some("/var/lib/iotd/gen/1/cert.pem".into()),
        key_backend: "file",
        key_reference: Some("file /var/lib/iotd/gen/1/key.pem".into()),
        connected: true,
        endpoint: "example-ats.iot.eu-west-1.amazonaws.com:8883".into(),
        ..Snapshot::default()
    }
}

/// A bus with the shipped policy and the interface served in this process.
struct Service {
    bus: DbusDaemon,
    commands: mpsc::Receiver<Command>,
    snapshot: watch::Sender<Snapshot>,
    /// Kept: the service follows the core until the core's events end.
    _events: broadcast::Sender<Event>,
    connection: Option<zbus::Connection>,
}

impl Service {
    async fn start(initial: Snapshot) -> Service {
        let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
        let (tx, commands) = mpsc::channel(4);
        let (snapshot, rx) = watch::channel(initial);
        let (events, _) = broadcast::channel(16);
        let handle = Handle {
            commands: tx,
            snapshot: rx,
            events: events.clone(),
            onboarding: iotd::onboard::port::Port::pair().0,
        };
        let connection = match iotd::dbus::serve(handle, Some(bus.address())).await {
            Ok(server) => server.connection,
            Err(e) => panic!("serving: {e}\ndbus-daemon log:\n{}", bus.log()),
        };
        Service {
            bus,
            commands,
            snapshot,
            _events: events,
            connection: Some(connection),
        }
    }

    fn iotctl(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(iotctl());
        command
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn run(&self, args: &[&str]) -> Output {
        tokio::time::timeout(WAIT, self.iotctl(args).output())
            .await
            .unwrap_or_else(|_| panic!("iotctl {args:?} did not finish in time"))
            .unwrap()
    }

    async fn next_command(&mut self) -> Command {
        tokio::time::timeout(WAIT, self.commands.recv())
            .await
            .expect("a command reaches the agent in time")
            .expect("the command channel is open")
    }
}

fn describe(out: &Output) -> String {
    common::describe(out)
}

#[tokio::test]
async fn status_shows_what_the_agent_publishes() {
    let service = Service::start(provisioned()).await;
    let out = service.run(&["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"], "provisioned");
    assert_eq!(json["thingName"], "gw-live-1");
    assert_eq!(json["certificateNotAfter"], "2027-01-15T08:00:00Z");
    assert_eq!(json["nextRotation"], Value::Null);
    assert_eq!(json["connected"], true);
    assert_eq!(json["lastError"], Value::Null);
    assert_eq!(json["onboarding"]["open"], false);
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));

    let out = service.run(&["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = common::stdout(&out);
    assert!(text.starts_with("State:         provisioned\n"), "{text}");
    assert!(text.contains("Thing:         gw-live-1\n"), "{text}");
    assert!(
        text.contains("Connection:    connected to example-ats.iot.eu-west-1.amazonaws.com:8883"),
        "{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "no colour without a terminal: {text}"
    );
}

/// `--watch` prints the status, then again when the agent's state changes (PropertiesChanged),
/// and exits 3 when iotd leaves the bus.
#[tokio::test]
async fn watch_sees_a_transition_and_the_agent_leaving() {
    let mut service = Service::start(provisioning()).await;
    let mut child = service
        .iotctl(&["status", "--watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a status line in time")
            .unwrap()
            .expect("iotctl is still watching");
        serde_json::from_str(&line).unwrap()
    };

    let first = next().await;
    assert_eq!(first["state"], "provisioning");
    assert_eq!(first["lastError"]["code"], "network");

    service.snapshot.send(provisioned()).unwrap();
    let second = next().await;
    assert_eq!(second["state"], "provisioned");
    assert_eq!(second["thingName"], "gw-live-1");
    assert_eq!(second["connected"], true);

    // iotd goes away: its connection closes, and the bus releases the name.
    service.connection.take().unwrap().close().await.unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("iotctl notices that iotd left")
        .unwrap();
    assert_eq!(status.code(), Some(3));
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert!(stderr.contains("iotd is not running"), "{stderr}");
    // Nothing else reached the agent.
    assert!(service.commands.try_recv().is_err());
}

#[tokio::test]
async fn rotate_and_reprovision_print_the_agent_answer() {
    let mut service = Service::start(provisioned()).await;

    let rotate = tokio::spawn(service.iotctl(&["rotate"]).output());
    match service.next_command().await {
        Command::Rotate(reply) => reply
            .send(Ok(Outcome::Changed("rotation-2".into())))
            .unwrap(),
        other => panic!("expected Rotate, got {other:?}"),
    }
    let out = rotate.await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        common::stdout(&out),
        "rotation-2 started: a new key and certificate; iotctl rotate --wait follows it, \
         iotctl status shows where it is\n"
    );

    // An error of the agent: exit 1 with its message, naming the action.
    let reprovision = tokio::spawn(service.iotctl(&["reprovision"]).output());
    match service.next_command().await {
        Command::Reprovision(reply) => reply
            .send(Err(AgentError::new(
                ErrorCode::Throttled,
                Retry::SameConnection,
                "AWS IoT is throttling this device; try again in a minute",
            )))
            .unwrap(),
        other => panic!("expected Reprovision, got {other:?}"),
    }
    let out = reprovision.await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        common::stderr(&out),
        "iotctl: re-provisioning: AWS IoT is throttling this device; try again in a minute\n"
    );
}

/// Any user reads the status; only root and iotd-admin may rotate, and iotctl says so.
#[tokio::test]
async fn unprivileged_user_reads_but_may_not_rotate() {
    let service = Service::start(provisioned()).await;
    let as_nobody = |args: &[&str]| {
        let mut command = tokio::process::Command::new("setpriv");
        command
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(iotctl())
            .args(args)
            .env_clear()
            .env("DBUS_SYSTEM_BUS_ADDRESS", service.bus.address())
            .kill_on_drop(true);
        command
    };
    let out = tokio::time::timeout(WAIT, as_nobody(&["status", "--json"]).output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    let out = tokio::time::timeout(WAIT, as_nobody(&["rotate"]).output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        common::stderr(&out),
        "iotctl: permission denied: run as root or a member of iotd-admin\n"
    );
}

/// A bus without iotd on it is "not running" too (exit 3), as is no bus at all.
#[tokio::test]
async fn bus_without_iotd_is_exit_code_3() {
    let bus = DbusDaemon::start(&[&dbus_policy_file()], None);
    for address in [bus.address(), NO_BUS] {
        let out = tokio::process::Command::new(iotctl())
            .arg("status")
            .env("DBUS_SYSTEM_BUS_ADDRESS", address)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{address}: {}", describe(&out));
        assert!(
            common::stderr(&out)
                .starts_with("iotctl: iotd is not running (no io.iotd.Agent1 on the system bus)"),
            "{}",
            describe(&out)
        );
    }
}

/// The real agent, provisioning against fake-iot-core, seen through iotctl: `--watch` follows
/// it from provisioning to provisioned; then `status` and `check` (with the device identity
/// it made: key, certificate, TLS with the endpoint) agree that all is well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_with_iotd_and_fake_iot_core() {
    let cloud = iotd_testkit::Cloud::start().await;
    // AWS-style throttling holds the agent at "provisioning" (it retries by itself) until the
    // test has seen that state; then the fault goes and provisioning completes.
    cloud.add_fault(serde_json::json!({
        "api": "CreateCertificateFromCsr", "action": "reject",
        "statusCode": 429, "errorCode": "Throttling", "errorMessage": "Rate exceeded"
    }));
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
    let dir = tempfile::tempdir().unwrap();
    let config = iotd_testkit::config(&cloud, &dir.path().join("state"), "0042");
    let mut iotd = iotd_testkit::Iotd::start_env(
        &iotd_binary(),
        dir.path(),
        &config,
        &[("DBUS_SYSTEM_BUS_ADDRESS", bus.address())],
    )
    .await;
    // READY=1 comes once iotd owns its bus name.
    iotd.wait_status("READY=1").await;

    let mut watch = tokio::process::Command::new(iotctl())
        .args(["status", "--watch", "--json"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut released = false;
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no status change in time; seen {seen:#?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("iotctl stopped watching; seen {seen:#?}"));
        let json: Value = serde_json::from_str(&line).unwrap();
        seen.push(json.clone());
        if json["state"] == "provisioning" && !released {
            cloud.clear_faults();
            released = true;
        }
        if json["state"] == "provisioned" && json["connected"] == true {
            assert!(
                released,
                "provisioned before the fault was lifted: {seen:#?}"
            );
            assert_eq!(json["thingName"], "gw-0042", "{json}");
            break;
        }
    }
    watch.kill().await.unwrap();

    let run = |args: &'static [&'static str]| {
        let mut command = tokio::process::Command::new(iotctl());
        command
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
            .env("NO_COLOR", "1");
        command
    };
    let out = run(&["status"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = common::stdout(&out);
    assert!(text.contains("Thing:         gw-0042"), "{text}");
    assert!(text.contains("days left"), "{text}");

    // The clock check depends on the machine; the rest must all pass.
    let out = run(&["check", "--dont-run", "clock-synchronised"])
        .output()
        .await
        .unwrap();
    let report = common::stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for id in [
        "config-valid",
        "key-certificate-match",
        "certificate-validity",
        "endpoint-tcp",
        "endpoint-tls",
    ] {
        assert!(
            common::check_line(&report, id).starts_with('√'),
            "{id}: {report}"
        );
    }
    assert!(
        report.contains("handshake as the device: TLSv1_3"),
        "{report}"
    );
    iotd.terminate().await;
    cloud.stop().await;
}

/// `iotctl onboarding open/close/status`: the request reaches the agent with its duration, the
/// answers are printed, a duration out of range never leaves iotctl.
#[tokio::test]
async fn onboarding_open_close_and_status() {
    let mut service = Service::start(Snapshot {
        onboarding_open: true,
        onboarding_closes_at: Some(1_800_000_600),
        ..provisioned()
    })
    .await;
    let out = service.run(&["onboarding", "open", "--for", "16m"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));

    let mut command = service.iotctl(&["onboarding", "open", "--for", "10m"]);
    let run = command.output();
    let agent = async {
        match service.next_command().await {
            Command::OpenOnboarding { seconds, reply } => {
                assert_eq!(seconds, 600);
                reply.send(Ok(1_800_000_600)).unwrap();
            }
            other => panic!("{other:?}"),
        }
    };
    let (out, ()) = tokio::join!(run, agent);
    let out = out.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("open until 2027-01-15T08:10:00Z (600 s)"),
        "{}",
        describe(&out)
    );

    let mut command = service.iotctl(&["onboarding", "close"]);
    let run = command.output();
    let agent = async {
        match service.next_command().await {
            Command::CloseOnboarding(reply) => reply.send(Ok(true)).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let (out, ()) = tokio::join!(run, agent);
    let out = out.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("onboarding window closed"));

    let out = service.run(&["onboarding", "status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["open"], true);
    assert_eq!(json["closesAt"], 1_800_000_600);

    // Without a server on the gateway the agent says so, and iotctl passes it on.
    let mut command = service.iotctl(&["onboarding", "open"]);
    let run = command.output();
    let agent = async {
        match service.next_command().await {
            Command::OpenOnboarding { reply, .. } => reply
                .send(Err(AgentError::permanent(
                    ErrorCode::NotSupported,
                    "onboarding is off on this gateway: it has no onboarding record",
                )))
                .unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let (out, ()) = tokio::join!(run, agent);
    let out = out.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("onboarding is off"),
        "{}",
        describe(&out)
    );
}
