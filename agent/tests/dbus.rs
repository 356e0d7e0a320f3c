//! The D-Bus service against a real dbus-daemon running the shipped policy
//! (packaging/dbus/io.iotd.Agent1.conf): `iotd::dbus::serve` runs in this process with a
//! `Handle` the test drives (it answers the commands and publishes the snapshots), and clients
//! are this process (root) through the `iotd-api` proxy, or `busctl`/`gdbus` run under
//! `setpriv` as other users.
//!
//! Needs root (setpriv, and the accounts below), dbus-daemon, busctl (systemd), gdbus
//! (libglib2.0-bin) and setpriv (util-linux). Creates, if missing, the system group
//! `iotd-admin` and the system user `iotd` that the package's sysusers.d file would create:
//! dbus-daemon resolves the names in the policy when it loads it, and ignores rules for
//! accounts that don't exist.
//!
//! The shipped policy lets only user `iotd` own the name; the test process is root, so each
//! bus gets one extra test-only rule letting root own it (`ROOT_MAY_OWN`), except where the
//! test is that root may not.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use iotd::core::{Command, Handle, Outcome};
use iotd::dbus::ServeError;
use iotd::error::{AgentError, ErrorCode, Retry};
use iotd::fsm::Event;
use iotd::snapshot::Snapshot;
use iotd::store::LastError;
use iotd_api::Agent1Proxy;
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::{ROOT_MAY_OWN, dbus_policy_file};
use tokio::sync::{broadcast, mpsc, watch};
use zbus::export::futures_core::Stream;

const WAIT: Duration = Duration::from_secs(20);

fn committed_xml() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/dbus/io.iotd.Agent1.xml")
}

fn run(program: &str, args: &[&str]) -> Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Creates (idempotently) the accounts the policy names; returns the gid of `iotd-admin`.
fn accounts() -> u32 {
    static GID: OnceLock<u32> = OnceLock::new();
    *GID.get_or_init(|| {
        let out = run("groupadd", &["--system", "-f", "iotd-admin"]);
        assert!(
            out.status.success(),
            "creating group iotd-admin (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !run("getent", &["passwd", "iotd"]).status.success() {
            let out = run(
                "useradd",
                &[
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "iotd",
                ],
            );
            // Another test binary may have created it meanwhile.
            assert!(
                out.status.success() || run("getent", &["passwd", "iotd"]).status.success(),
                "creating user iotd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = run("getent", &["group", "iotd-admin"]);
        let line = String::from_utf8(out.stdout).unwrap();
        line.split(':').nth(2).unwrap().trim().parse().unwrap()
    })
}

/// Who runs a command line client.
#[derive(Debug, Clone, Copy)]
enum User {
    /// nobody/nogroup without supplementary groups: any local user.
    Nobody,
    /// nobody, with iotd-admin as a supplementary group.
    Admin,
    /// The service's own user.
    Iotd,
}

/// Runs `program args` as `user` against `bus`, with a clean environment; fails the test if
/// it takes longer than WAIT.
async fn run_as(user: User, bus: &DbusDaemon, program: &str, args: &[&str]) -> Output {
    let gid = accounts().to_string();
    let who: Vec<&str> = match user {
        User::Nobody => vec!["--reuid=nobody", "--regid=nogroup", "--clear-groups"],
        User::Admin => vec!["--reuid=nobody", "--regid=nogroup", "--groups", &gid],
        User::Iotd => vec!["--reuid=iotd", "--regid=nogroup", "--clear-groups"],
    };
    let child = tokio::process::Command::new("setpriv")
        .args(&who)
        .arg("--")
        .arg(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} as {user:?} did not finish in time"))
        .unwrap_or_else(|e| panic!("running setpriv {program}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `gdbus call` on the agent's object (gdbus prints the D-Bus error name on failure).
async fn gdbus_call(user: User, bus: &DbusDaemon, method: &str, args: &[&str]) -> Output {
    let mut all = vec![
        "call",
        "--system",
        "--dest",
        iotd_api::BUS_NAME,
        "--object-path",
        iotd_api::OBJECT_PATH,
        "--method",
        method,
    ];
    all.extend_from_slice(args);
    run_as(user, bus, "gdbus", &all).await
}

async fn next<S: Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    let item = std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx));
    tokio::time::timeout(WAIT, item)
        .await
        .unwrap_or_else(|_| panic!("no {what} in time"))
        .unwrap_or_else(|| panic!("the {what} stream ended"))
}

fn snapshot() -> Snapshot {
    Snapshot {
        state: iotd_api::state::PROVISIONED,
        step: "provisioned",
        thing_name: Some("gw-test-1".into()),
        certificate_id: Some("c0ffee".into()),
        certificate_not_after: Some(1_800_000_000),
        certificate_not_before: Some(1_700_000_000),
        certificate_path: Some("/var/lib/iotd/gen/1/cert.pem".into()),
        previous_certificate_id: Some("decaf".into()),
        previous_delete_after: Some(1_700_600_000),
        next_rotation: None,
        waiting_for: None,
        waiting_for_clock: false,
        key_backend: "file",
        key_reference: Some("/var/lib/iotd/gen/1/key.pem".into()),
        connected: true,
        endpoint: "example.iot.eu-west-1.amazonaws.com:8883".into(),
        last_error: Some(LastError {
            sticky: false,
            code: "network".into(),
            message: "connecting to example: no route to host".into(),
            at: 1_700_000_000,
            permanent: false,
            retry_at: None,
        }),
        onboarding_open: false,
        onboarding_closes_at: None,
        onboarding_attempts_left: 0,
        onboarding_discovery: "off: Avahi is not running".into(),
        status_line: "provisioned as gw-test-1".into(),
    }
}

/// A bus with the shipped policy (plus ROOT_MAY_OWN) and the service on it.
struct Fixture {
    bus: DbusDaemon,
    commands: mpsc::Receiver<Command>,
    /// The agent's side of the command channel, for filling it.
    sender: mpsc::Sender<Command>,
    snapshot: watch::Sender<Snapshot>,
    events: broadcast::Sender<Event>,
    service: zbus::Connection,
    client: zbus::Connection,
}

impl Fixture {
    async fn start(initial: Snapshot) -> Fixture {
        accounts();
        let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
        let (tx, commands) = mpsc::channel(4);
        let (snapshot, rx) = watch::channel(initial);
        let (events, _) = broadcast::channel(16);
        let handle = Handle {
            commands: tx.clone(),
            snapshot: rx,
            events: events.clone(),
            onboarding: iotd::onboard::port::Port::pair().0,
        };
        let service = match iotd::dbus::serve(handle, Some(bus.address())).await {
            Ok(server) => server.connection,
            Err(e) => panic!("serving: {e}\ndbus-daemon log:\n{}", bus.log()),
        };
        let client = zbus::connection::Builder::address(bus.address())
            .build()
            .await
            .unwrap();
        Fixture {
            bus,
            commands,
            sender: tx,
            snapshot,
            events,
            service,
            client,
        }
    }

    async fn proxy(&self) -> Agent1Proxy<'static> {
        Agent1Proxy::new(&self.client).await.unwrap()
    }

    async fn next_command(&mut self) -> Command {
        tokio::time::timeout(WAIT, self.commands.recv())
            .await
            .expect("a command reaches the agent in time")
            .expect("the command channel is open")
    }
}

fn method_error(e: zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, desc, _) => (name.to_string(), desc.unwrap_or_default()),
        other => panic!("expected a D-Bus error reply, got {other:?}"),
    }
}

/// Comments out, whitespace between tags out, runs of whitespace as one space; then the
/// `io.iotd.Agent1` interface element alone.
fn interface_node(xml: &str) -> String {
    let mut s = String::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<!--") {
        s.push_str(&rest[..start]);
        let end = rest[start..].find("-->").expect("a closed XML comment");
        rest = &rest[start + end + 3..];
    }
    s.push_str(rest);
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let s = s.replace("> <", "><").replace(" />", "/>");
    let open = format!("<interface name=\"{}\">", iotd_api::INTERFACE);
    let start = s
        .find(&open)
        .unwrap_or_else(|| panic!("no {open} in the introspection:\n{xml}"));
    let end = s[start..].find("</interface>").expect("a closed interface") + start;
    s[start..end + "</interface>".len()].to_owned()
}

/// The live introspection of the object, as root.
async fn introspect(client: &zbus::Connection) -> String {
    zbus::fdo::IntrospectableProxy::builder(client)
        .destination(iotd_api::BUS_NAME)
        .path(iotd_api::OBJECT_PATH)
        .build()
        .await
        .unwrap()
        .introspect()
        .await
        .unwrap()
}

/// The committed XML is what the service serves. To regenerate it after an interface change:
/// `IOTD_BLESS_INTROSPECTION=1 cargo test -p iotd --test dbus introspection`, then review the
/// diff (it is part of the API).
#[tokio::test]
async fn introspection_matches_committed_xml() {
    let f = Fixture::start(snapshot()).await;
    let live = introspect(&f.client).await;
    if std::env::var_os("IOTD_BLESS_INTROSPECTION").is_some() {
        let start = live
            .find(&format!("<interface name=\"{}\">", iotd_api::INTERFACE))
            .unwrap();
        let end = live[start..].find("</interface>").unwrap() + start;
        let body = format!(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
             \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n\
             <!-- The io.iotd.Agent1 interface as iotd serves it at /io/iotd/Agent1 on the system\n     \
             bus; installed as /usr/share/dbus-1/interfaces/io.iotd.Agent1.xml. Generated from the\n     \
             running service: run the dbus integration test \"introspection\" with\n     \
             IOTD_BLESS_INTROSPECTION=1; a test compares it with the live object. -->\n\
             <node>\n  {}\n</node>\n",
            &live[start..end + "</interface>".len()]
        );
        std::fs::write(committed_xml(), body).unwrap();
    }
    let committed = std::fs::read_to_string(committed_xml()).unwrap();
    assert_eq!(
        interface_node(&live),
        interface_node(&committed),
        "the live interface differs from packaging/dbus/io.iotd.Agent1.xml; live:\n{live}"
    );
}

/// Any local user reads every property, with the values the snapshot gives (None as "" or 0,
/// LastError as a structure), and introspects the object.
#[tokio::test]
async fn unprivileged_user_reads_every_property() {
    let f = Fixture::start(snapshot()).await;
    let version = format!("s \"{}\"", env!("CARGO_PKG_VERSION"));
    let expected = [
        ("State", "s \"provisioned\""),
        ("Step", "s \"provisioned\""),
        ("ThingName", "s \"gw-test-1\""),
        ("CertificateId", "s \"c0ffee\""),
        ("CertificateNotAfter", "x 1800000000"),
        ("CertificateNotBefore", "x 1700000000"),
        ("PreviousCertificateId", "s \"decaf\""),
        ("PreviousDeleteAfter", "x 1700600000"),
        ("NextRotation", "x 0"),
        ("KeyBackend", "s \"file\""),
        ("KeyReference", "s \"/var/lib/iotd/gen/1/key.pem\""),
        ("CertificatePath", "s \"/var/lib/iotd/gen/1/cert.pem\""),
        ("Connected", "b true"),
        ("Endpoint", "s \"example.iot.eu-west-1.amazonaws.com:8883\""),
        (
            "LastError",
            "(ssx) \"network\" \"connecting to example: no route to host\" 1700000000",
        ),
        ("OnboardingOpen", "b false"),
        ("OnboardingClosesAt", "x 0"),
        ("OnboardingAttemptsLeft", "u 0"),
        ("OnboardingDiscovery", "s \"off: Avahi is not running\""),
        ("Version", version.as_str()),
    ];
    for (property, value) in expected {
        let out = run_as(
            User::Nobody,
            &f.bus,
            "busctl",
            &[
                "--system",
                "get-property",
                iotd_api::BUS_NAME,
                iotd_api::OBJECT_PATH,
                iotd_api::INTERFACE,
                property,
            ],
        )
        .await;
        assert!(out.status.success(), "reading {property}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            value,
            "{property}"
        );
    }
    // GetAll (what `busctl introspect` and most UIs use) and Introspect are open as well.
    let out = run_as(
        User::Nobody,
        &f.bus,
        "busctl",
        &[
            "--system",
            "introspect",
            iotd_api::BUS_NAME,
            iotd_api::OBJECT_PATH,
            iotd_api::INTERFACE,
        ],
    )
    .await;
    assert!(out.status.success(), "introspecting: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"gw-test-1\""));
}

/// Methods and property writes are refused by the bus for any local user, and nothing reaches
/// the agent.
#[tokio::test]
async fn unprivileged_user_cannot_call_methods() {
    let mut f = Fixture::start(snapshot()).await;
    let calls: [(&str, &[&str]); 5] = [
        ("io.iotd.Agent1.Rotate", &[]),
        ("io.iotd.Agent1.Reprovision", &[]),
        ("io.iotd.Agent1.OpenOnboarding", &["uint32 60"]),
        ("io.iotd.Agent1.CloseOnboarding", &[]),
        (
            "org.freedesktop.DBus.Properties.Set",
            &["io.iotd.Agent1", "State", "<'failed'>"],
        ),
    ];
    for (method, args) in calls {
        let out = gdbus_call(User::Nobody, &f.bus, method, args).await;
        assert!(!out.status.success(), "{method} as nobody: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("org.freedesktop.DBus.Error.AccessDenied"),
            "{method} as nobody: {}",
            text(&out)
        );
    }
    assert!(
        f.commands.try_recv().is_err(),
        "a refused call reached the agent"
    );
}

/// A member of iotd-admin (not root) may call methods; the answer is the agent's.
#[tokio::test]
async fn admin_group_member_calls_methods() {
    let mut f = Fixture::start(snapshot()).await;
    let bus = &f.bus;
    let call = gdbus_call(User::Admin, bus, "io.iotd.Agent1.Reprovision", &[]);
    let answer = async {
        match tokio::time::timeout(WAIT, f.commands.recv()).await {
            Ok(Some(Command::Reprovision(reply))) => reply
                .send(Ok(Outcome::Changed("reprovisioning as requested".into())))
                .unwrap(),
            other => panic!("expected Reprovision, got {other:?}"),
        }
    };
    let (out, ()) = tokio::join!(call, answer);
    assert!(
        out.status.success(),
        "Reprovision as iotd-admin: {}",
        text(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "('reprovisioning as requested',)"
    );
}

/// Root calls through the iotd-api proxy: the command round trip, the error mapping, and the
/// agent going away.
#[tokio::test]
async fn root_calls_methods_through_the_command_channel() {
    let mut f = Fixture::start(snapshot()).await;
    let proxy = f.proxy().await;

    let call = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.reprovision().await }
    });
    match f.next_command().await {
        Command::Reprovision(reply) => reply
            .send(Ok(Outcome::Changed(
                "abandoned thing gw-test-1; provisioning with a new key".into(),
            )))
            .unwrap(),
        other => panic!("expected Reprovision, got {other:?}"),
    }
    assert_eq!(
        call.await.unwrap().unwrap(),
        "abandoned thing gw-test-1; provisioning with a new key"
    );

    let call = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.rotate().await }
    });
    match f.next_command().await {
        Command::Rotate(reply) => reply
            .send(Ok(Outcome::Unchanged(
                "certificate c0ffee is new; no action taken".into(),
            )))
            .unwrap(),
        other => panic!("expected Rotate, got {other:?}"),
    }
    assert_eq!(
        call.await.unwrap().unwrap(),
        "certificate c0ffee is new; no action taken"
    );

    // Agent errors become named D-Bus errors with the agent's message.
    for (error, name) in [
        (
            AgentError::new(
                ErrorCode::Throttled,
                Retry::SameConnection,
                "AWS IoT is throttling this device; try again in a minute",
            ),
            iotd_api::errors::BUSY,
        ),
        (
            AgentError::permanent(ErrorCode::Key, "reading device key /k: permission denied"),
            iotd_api::errors::FAILED,
        ),
    ] {
        let call = tokio::spawn({
            let proxy = proxy.clone();
            async move { proxy.rotate().await }
        });
        let message = error.message.clone();
        match f.next_command().await {
            Command::Rotate(reply) => reply.send(Err(error)).unwrap(),
            other => panic!("expected Rotate, got {other:?}"),
        }
        let (got_name, got_message) = method_error(call.await.unwrap().unwrap_err());
        assert_eq!(
            (got_name.as_str(), got_message.as_str()),
            (name, message.as_str())
        );
    }

    // The agent drops the request without answering.
    let call = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.reprovision().await }
    });
    drop(f.next_command().await);
    let (name, message) = method_error(call.await.unwrap().unwrap_err());
    assert_eq!(name, iotd_api::errors::FAILED);
    assert!(message.contains("stopped before answering"), "{message}");

    // The agent is gone.
    drop(f.commands);
    let (name, message) = method_error(proxy.rotate().await.unwrap_err());
    assert_eq!(name, iotd_api::errors::FAILED);
    assert!(message.contains("stopping"), "{message}");
}

/// A full command channel means Busy at once, not a wait into the caller's timeout.
#[tokio::test]
async fn queued_request_is_busy() {
    let f = Fixture::start(snapshot()).await;
    // Fill the agent's queue (capacity 4) as requests waiting behind a long operation would.
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let (reply, answer) = tokio::sync::oneshot::channel();
        f.sender.try_send(Command::Rotate(reply)).unwrap();
        waiting.push(answer);
    }
    let (name, message) = method_error(f.proxy().await.reprovision().await.unwrap_err());
    assert_eq!(name, iotd_api::errors::BUSY);
    assert!(message.contains("try again"), "{message}");
}

/// OpenOnboarding and CloseOnboarding reach the agent with their typed answers; a duration
/// outside 1..=900 s is refused before it does.
#[tokio::test]
async fn onboarding_requests_reach_the_agent_and_bad_durations_are_refused() {
    let mut f = Fixture::start(snapshot()).await;
    let proxy = f.proxy().await;
    for seconds in [0, 901] {
        let (name, message) = method_error(proxy.open_onboarding(seconds).await.unwrap_err());
        assert_eq!(name, iotd_api::errors::INVALID_ARGUMENT);
        assert!(message.contains("1 to 900 seconds"), "{message}");
    }
    let agent = async {
        match f.next_command().await {
            Command::OpenOnboarding { seconds, reply } => {
                assert_eq!(seconds, 60);
                reply.send(Ok(1_800_000_060)).unwrap();
            }
            other => panic!("{other:?}"),
        }
        match f.next_command().await {
            Command::CloseOnboarding(reply) => reply.send(Ok(true)).unwrap(),
            other => panic!("{other:?}"),
        }
        match f.next_command().await {
            Command::OpenOnboarding { reply, .. } => reply
                .send(Err(iotd::error::AgentError::permanent(
                    iotd::error::ErrorCode::NotSupported,
                    "onboarding is off on this gateway",
                )))
                .unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let client = async {
        assert_eq!(proxy.open_onboarding(60).await.unwrap(), 1_800_000_060);
        assert!(proxy.close_onboarding().await.unwrap());
        let (name, message) = method_error(proxy.open_onboarding(60).await.unwrap_err());
        assert_eq!(name, iotd_api::errors::NOT_SUPPORTED);
        assert!(message.contains("onboarding is off"), "{message}");
    };
    tokio::join!(agent, client);
}

/// Only user iotd may own the name: nobody and an iotd-admin member are refused by the bus;
/// iotd is not (the bus answers that the name exists, held by the service under test).
#[tokio::test]
async fn only_iotd_may_own_the_name() {
    let f = Fixture::start(snapshot()).await;
    for user in [User::Nobody, User::Admin, User::Iotd] {
        // RequestName goes to the bus driver; 4 = DBUS_NAME_FLAG_DO_NOT_QUEUE.
        let out = run_as(
            user,
            &f.bus,
            "gdbus",
            &[
                "call",
                "--system",
                "--dest",
                "org.freedesktop.DBus",
                "--object-path",
                "/org/freedesktop/DBus",
                "--method",
                "org.freedesktop.DBus.RequestName",
                iotd_api::BUS_NAME,
                "uint32 4",
            ],
        )
        .await;
        match user {
            User::Nobody | User::Admin => {
                assert!(!out.status.success(), "{user:?}: {}", text(&out));
                assert!(
                    String::from_utf8_lossy(&out.stderr)
                        .contains("org.freedesktop.DBus.Error.AccessDenied"),
                    "{user:?}: {}",
                    text(&out)
                );
            }
            // 3 = DBUS_REQUEST_NAME_REPLY_EXISTS: allowed, but taken.
            User::Iotd => assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "(uint32 3,)",
                "iotd: {}\ndbus-daemon log:\n{}",
                text(&out),
                f.bus.log()
            ),
        }
    }
}

/// A handle whose commands nobody answers, for the cases where serving fails.
fn unanswered_handle() -> Handle {
    let (commands, _) = mpsc::channel(1);
    let (_, snapshot) = watch::channel(snapshot());
    let (events, _) = broadcast::channel(1);
    Handle {
        commands,
        snapshot,
        events,
        onboarding: iotd::onboard::port::Port::pair().0,
    }
}

/// The shipped policy alone refuses root the name, and serve says so.
#[tokio::test]
async fn serve_fails_clearly_when_the_policy_refuses_the_name() {
    accounts();
    let bus = DbusDaemon::start(&[&dbus_policy_file()], None);
    let err = iotd::dbus::serve(unanswered_handle(), Some(bus.address()))
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::NameRefused { .. }), "{err:?}");
    let e = err.to_string();
    assert!(
        e.starts_with(&format!(
            "owning D-Bus name io.iotd.Agent1 on the bus at {}: the bus policy refuses it",
            bus.address()
        )),
        "{e}"
    );
}

/// A second agent on the same bus fails at start instead of queueing or taking over.
#[tokio::test]
async fn second_instance_fails_clearly() {
    let f = Fixture::start(snapshot()).await;
    let err = iotd::dbus::serve(unanswered_handle(), Some(f.bus.address()))
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::NameTaken { .. }), "{err:?}");
    let e = err.to_string();
    assert!(
        e.starts_with(&format!(
            "owning D-Bus name io.iotd.Agent1 on the bus at {}: another process owns it",
            f.bus.address()
        )),
        "{e}"
    );
    // The first one still answers.
    assert_eq!(f.proxy().await.state().await.unwrap(), "provisioned");
}

/// A failed connection names the bus.
#[tokio::test]
async fn serve_fails_clearly_without_a_bus() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("unix:path={}/absent", dir.path().display());
    let err = iotd::dbus::serve(unanswered_handle(), Some(&address))
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::Connect { .. }), "{err:?}");
    let e = err.to_string();
    assert!(
        e.starts_with(&format!("connecting to the D-Bus bus at {address}: ")),
        "{e}"
    );
}

/// Each snapshot change is one PropertiesChanged naming exactly the properties whose value
/// changed, and the proxy's property streams follow it.
#[tokio::test]
async fn properties_changed_follows_the_snapshot() {
    let start = Snapshot {
        state: iotd_api::state::PROVISIONING,
        step: "key-ready",
        key_backend: "file",
        endpoint: "example:8883".into(),
        ..Snapshot::default()
    };
    let f = Fixture::start(start.clone()).await;
    let proxy = f.proxy().await;
    let mut states = proxy.receive_state_changed().await;
    // The stream starts with the current value.
    assert_eq!(
        next(&mut states, "State").await.get().await.unwrap(),
        "provisioning"
    );

    let properties = zbus::fdo::PropertiesProxy::builder(&f.client)
        .destination(iotd_api::BUS_NAME)
        .path(iotd_api::OBJECT_PATH)
        .build()
        .await
        .unwrap();
    let mut changes = properties.receive_properties_changed().await.unwrap();

    // One field.
    f.snapshot.send_modify(|s| s.step = "certificate-issued");
    let signal = next(&mut changes, "PropertiesChanged").await;
    let args = signal.args().unwrap();
    assert_eq!(args.interface_name().as_str(), iotd_api::INTERFACE);
    let names: BTreeSet<&str> = args.changed_properties().keys().copied().collect();
    assert_eq!(names, BTreeSet::from(["Step"]));
    assert!(args.invalidated_properties().is_empty());

    // Many properties at once: one signal naming exactly those whose value changed.
    f.snapshot.send_replace(snapshot());
    let signal = next(&mut changes, "PropertiesChanged").await;
    let args = signal.args().unwrap();
    let names: BTreeSet<&str> = args.changed_properties().keys().copied().collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "State",
            "Step",
            "ThingName",
            "CertificateId",
            "CertificateNotAfter",
            "CertificateNotBefore",
            "PreviousCertificateId",
            "PreviousDeleteAfter",
            "KeyReference",
            "CertificatePath",
            "Connected",
            "Endpoint",
            "LastError",
            "OnboardingDiscovery",
        ]),
        "NextRotation, KeyBackend and the onboarding window's properties kept their values"
    );
    let last_error: iotd_api::LastErrorWire = args.changed_properties()["LastError"]
        .try_clone()
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(
        last_error,
        (
            "network".to_owned(),
            "connecting to example: no route to host".to_owned(),
            1_700_000_000
        )
    );

    // The proxy's State stream saw it.
    tokio::time::timeout(WAIT, async {
        loop {
            let value = next(&mut states, "State").await.get().await.unwrap();
            if value == "provisioned" {
                break;
            }
        }
    })
    .await
    .expect("State becomes provisioned");
    assert_eq!(proxy.thing_name().await.unwrap(), "gw-test-1");
    assert!(proxy.connected().await.unwrap());
}

/// Each event of the core becomes its signal, in order, even when they follow each other
/// within microseconds and no snapshot changes in between (signals are not derived from
/// snapshot differences).
#[tokio::test]
async fn events_become_signals() {
    let f = Fixture::start(snapshot()).await;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(f.service.unique_name().unwrap().to_owned())
        .path(iotd_api::OBJECT_PATH)
        .build()
        .unwrap();
    let mut signals = zbus::MessageStream::for_match_rule(rule, &f.client, None)
        .await
        .unwrap();
    let events = [
        Event::Provisioned {
            thing_name: "gw-test-1".into(),
            certificate_id: "c0ffee".into(),
        },
        Event::Connected {
            certificate_id: "c0ffee".into(),
        },
        Event::Disconnected {
            code: Some(ErrorCode::Network),
            message: "the connection closed".into(),
        },
        Event::Connected {
            certificate_id: "c0ffee".into(),
        },
        Event::Failed {
            code: ErrorCode::ClaimRejected,
            message: "AWS IoT refused the claim certificate".into(),
        },
        Event::OnboardingOpened {
            closes_at: 1_800_000_600,
            attempts_left: 20,
        },
        Event::OnboardingPaired,
        Event::OnboardingClaimReceived,
        Event::OnboardingClosed { reason: "success" },
    ];
    for e in &events {
        f.events.send(e.clone()).unwrap();
    }
    let mut received = Vec::new();
    while received.len() < events.len() {
        let m = next(&mut signals, "signal").await.unwrap();
        received.push(m);
    }
    let members: Vec<String> = received
        .iter()
        .map(|m| m.header().member().unwrap().to_string())
        .collect();
    assert_eq!(
        members,
        [
            "Provisioned",
            "SessionUp",
            "SessionDown",
            "SessionUp",
            "Failed",
            "OnboardingOpened",
            "OnboardingPaired",
            "OnboardingClaimReceived",
            "OnboardingClosed",
        ]
    );
    let (closes_at, attempts_left): (i64, u32) = received[5].body().deserialize().unwrap();
    assert_eq!((closes_at, attempts_left), (1_800_000_600, 20));
    let (reason,): (String,) = received[8].body().deserialize().unwrap();
    assert_eq!(reason, "success");
    let (thing, cert): (String, String) = received[0].body().deserialize().unwrap();
    assert_eq!((thing.as_str(), cert.as_str()), ("gw-test-1", "c0ffee"));
    let (cert,): (String,) = received[1].body().deserialize().unwrap();
    assert_eq!(cert, "c0ffee");
    let (code, message): (String, String) = received[2].body().deserialize().unwrap();
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("network", "the connection closed")
    );
    let (code, message): (String, String) = received[4].body().deserialize().unwrap();
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("claim-rejected", "AWS IoT refused the claim certificate")
    );

    // The typed streams of the contract crate decode the signals.
    let proxy = f.proxy().await;
    let mut provisioned = proxy.receive_provisioned().await.unwrap();
    let mut down = proxy.receive_session_down().await.unwrap();
    f.events
        .send(Event::Provisioned {
            thing_name: "gw-test-1".into(),
            certificate_id: "beef".into(),
        })
        .unwrap();
    f.events
        .send(Event::Disconnected {
            code: Some(ErrorCode::CertificateMismatch),
            message: "m".into(),
        })
        .unwrap();
    let signal = next(&mut provisioned, "Provisioned").await;
    let args = signal.args().unwrap();
    assert_eq!(
        (*args.thing_name(), *args.certificate_id()),
        ("gw-test-1", "beef")
    );
    let signal = next(&mut down, "SessionDown").await;
    assert_eq!(*signal.args().unwrap().code(), "certificate-mismatch");
}
