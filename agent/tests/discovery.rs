//! DNS-SD discovery for onboarding, over real mDNS between two network namespaces the test
//! creates (never the machine's network): the gateway's namespace runs iotd and an
//! avahi-daemon on a private system bus; the installer's namespace, at the other end of a veth
//! pair, runs another avahi-daemon on another private bus, and `iotctl onboard --discover`.
//! iotd announces the gateway while its window is open, follows Avahi when it restarts, and
//! withdraws the announcement when the window closes. Without Avahi, `OnboardingDiscovery` and
//! `iotctl onboarding status` say discovery is off, and `iotctl onboard --discover` exits 3.
//!
//! The gateway that is discovered is a provisioned one (the schema-1 fixture's state) whose
//! window is opened and closed with iotctl: a gateway without a claim opens its window again
//! as soon as it is closed, for as long as it waits for a claim. Its cloud endpoint is
//! localhost inside the namespace, where nothing listens: no cloud is contacted.
//!
//! Needs root, iproute2, util-linux and avahi-daemon (scripts/setup.sh).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use iotd_api::Agent1Proxy;
use iotd_testkit::avahi::{Avahi, Link, Netns, avahi_policy_file};
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::{Iotd, ROOT_MAY_OWN, WAIT, copy_tree, dbus_policy_file, iotd_binary};
use zbus::export::futures_core::Stream;

/// The port iotd listens on inside the gateway's namespace: nothing else is there.
const PORT: u16 = 8443;

fn iotctl() -> PathBuf {
    let path = iotd_binary().with_file_name("iotctl");
    assert!(
        path.exists(),
        "build iotctl first (cargo test --workspace does)"
    );
    path
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A gateway without a claim of its own, registered for onboarding as `serial`, listening on
/// `listen`; its cloud is localhost:1, where nothing listens.
fn gateway_config(dir: &Path, serial: &str, listen: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[cloud]\nendpoint = \"localhost\"\nport = 1\n[provisioning]\ntemplate = \"gateway\"\n\
             [state]\ndir = \"{}\"\n[onboarding]\nserial = \"{serial}\"\nlisten = \"{listen}\"\n\
             model = {{ command = [\"echo\", \"Test Gateway 3000\"] }}\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

/// `iotctl onboarding register`, as on the production line.
fn register(config: &Path) {
    let out = std::process::Command::new(iotctl())
        .args([
            "--config",
            config.to_str().unwrap(),
            "onboarding",
            "register",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "register: {}", text(&out));
}

/// iotd started inside `netns` on `bus`; returns once it is READY.
async fn start_iotd(netns: &Netns, dir: &Path, config: &Path, bus: &DbusDaemon) -> Iotd {
    let wrapper = netns.wrapper(&iotd_binary(), &dir.join("iotd-in-netns"));
    let env = [("DBUS_SYSTEM_BUS_ADDRESS", bus.address())];
    let mut iotd = Iotd::start_with_config(&wrapper, config, &dir.join("state"), &env).await;
    iotd.wait_status("READY=1").await;
    iotd
}

/// iotd's `OnboardingDiscovery`, followed through its property changes.
struct Discovery {
    proxy: Agent1Proxy<'static>,
    changes: zbus::fdo::PropertiesChangedStream,
    _connection: zbus::Connection,
}

impl Discovery {
    async fn connect(bus: &DbusDaemon) -> Discovery {
        let connection = zbus::connection::Builder::address(bus.address())
            .build()
            .await
            .unwrap();
        let proxy = Agent1Proxy::builder(&connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .unwrap();
        let properties = zbus::fdo::PropertiesProxy::builder(&connection)
            .destination(iotd_api::BUS_NAME)
            .path(iotd_api::OBJECT_PATH)
            .build()
            .await
            .unwrap();
        // Subscribed before the first read: no change is lost in between.
        let changes = properties.receive_properties_changed().await.unwrap();
        Discovery {
            proxy,
            changes,
            _connection: connection,
        }
    }

    /// Waits until `OnboardingDiscovery` starts with `prefix`; returns it.
    async fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let now = self.proxy.onboarding_discovery().await.unwrap();
            if now.starts_with(prefix) {
                return now;
            }
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            let next =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.changes).poll_next(cx));
            if tokio::time::timeout_at(deadline, next).await.is_err() {
                panic!("OnboardingDiscovery never started with {prefix:?}; it said {seen:#?}");
            }
        }
    }
}

/// `iotctl onboard --discover --json` in the installer's namespace, on its bus; its exit code
/// and result object.
fn discover(link: &Link, bus: &DbusDaemon) -> (Option<i32>, serde_json::Value) {
    let out = link
        .installer
        .command(iotctl())
        .args(["onboard", "--discover", "--json"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .output()
        .unwrap();
    let result = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iotctl printed no JSON ({e}): {}", text(&out)));
    (out.status.code(), result)
}

/// Runs `iotctl args` against the gateway's bus (its D-Bus socket is a file: reachable from
/// the test's namespace).
fn iotctl_on(bus: &DbusDaemon, args: &[&str]) -> Output {
    std::process::Command::new(iotctl())
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .output()
        .unwrap()
}

#[tokio::test]
async fn an_installer_discovers_the_gateway_while_its_window_is_open() {
    let started = Instant::now();
    let link = Link::new();
    let gateway_bus = DbusDaemon::start(
        &[&avahi_policy_file(), &dbus_policy_file()],
        Some(ROOT_MAY_OWN),
    );
    let installer_bus = DbusDaemon::start(&[&avahi_policy_file()], None);
    let id = std::process::id();
    let gateway_host = format!("iotd-gw-{id}");
    let gateway_avahi = Avahi::start(&link.gateway, &link.gateway_if, &gateway_host, &gateway_bus);
    let installer_avahi = Avahi::start(
        &link.installer,
        &link.installer_if,
        &format!("iotd-installer-{id}"),
        &installer_bus,
    );

    let dir = tempfile::tempdir().unwrap();
    copy_tree(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema-1/state"),
        &dir.path().join("state"),
    );
    let serial = format!("GW-D{id}");
    let config = gateway_config(dir.path(), &serial, &format!("{}:{PORT}", link.gateway_ip));
    register(&config);
    let mut iotd = start_iotd(&link.gateway, dir.path(), &config, &gateway_bus).await;
    let mut discovery = Discovery::connect(&gateway_bus).await;
    let service = format!("_iotd-onboard._tcp \"iotd {serial}\" on port {PORT}");

    // Provisioned: the window is closed, and nothing is announced.
    let said = discovery.wait_for("not announced").await;
    assert_eq!(
        said,
        format!(
            "not announced while the window is closed; announced as {service} through Avahi \
             while it is open"
        )
    );

    // A person opens the window: announced on the veth, the interface of the listening
    // address, once Avahi made sure the name is free.
    let out = iotctl_on(&gateway_bus, &["onboarding", "open", "--for", "10m"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = discovery.wait_for("announced as").await;
    assert_eq!(
        said,
        format!(
            "announced as {service} on {} (while the window is open)",
            link.gateway_if
        )
    );
    let announced_after = started.elapsed();
    let (code, result) = discover(&link, &installer_bus);
    assert_eq!(code, Some(0), "{result}");
    assert_eq!(result["result"], "found", "{result}");
    let gateways = result["gateways"].as_array().unwrap();
    assert_eq!(gateways.len(), 1, "{result}");
    let found = &gateways[0];
    assert_eq!(found["serial"], serial.as_str(), "{result}");
    assert_eq!(found["model"], "Test Gateway 3000", "{result}");
    assert_eq!(found["address"], link.gateway_ip.to_string(), "{result}");
    assert_eq!(found["port"], PORT, "{result}");
    assert_eq!(found["host"], format!("{gateway_host}.local"), "{result}");
    assert_eq!(found["interface"], link.installer_if.as_str(), "{result}");
    assert_eq!(found["txt"]["v"], "1", "{result}");

    // Avahi restarts (a package upgrade): iotd says so, and announces again once it is back.
    gateway_avahi.stop();
    discovery.wait_for("off: Avahi is not running").await;
    let gateway_avahi = Avahi::start(&link.gateway, &link.gateway_if, &gateway_host, &gateway_bus);
    discovery.wait_for("announced as").await;

    // The window closes: withdrawn (goodbye packets), so the installer no longer finds it.
    let out = iotctl_on(&gateway_bus, &["onboarding", "close"]);
    assert!(out.status.success(), "{}", text(&out));
    discovery.wait_for("not announced").await;
    let (code, result) = discover(&link, &installer_bus);
    assert_eq!(code, Some(1), "{result}");
    assert_eq!(result["result"], "none", "{result}");
    assert_eq!(result["gateways"], serde_json::json!([]), "{result}");

    assert!(iotd.terminate().await.success());
    println!(
        "announced {:.1} s after the test started; whole test {:.1} s",
        announced_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop((gateway_avahi, installer_avahi));
}

#[tokio::test]
async fn without_avahi_discovery_is_off_and_the_window_opens_all_the_same() {
    let netns = Netns::new("gw");
    let bus = DbusDaemon::start(
        &[&avahi_policy_file(), &dbus_policy_file()],
        Some(ROOT_MAY_OWN),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), "GW-NOAVAHI", &format!("0.0.0.0:{PORT}"));
    register(&config);
    let mut iotd = start_iotd(&netns, dir.path(), &config, &bus).await;
    let mut discovery = Discovery::connect(&bus).await;
    let said = discovery.wait_for("off: Avahi").await;
    assert_eq!(
        said,
        format!(
            "off: Avahi is not running (no org.freedesktop.Avahi on the system bus); installers \
             reach the gateway by its address (0.0.0.0:{PORT})"
        )
    );
    // The window is open all the same (the gateway waits for a claim), and iotctl shows why
    // nothing is announced.
    let out = iotctl_on(&bus, &["onboarding", "status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["open"], true, "{status}");
    assert_eq!(status["discovery"], said.as_str(), "{status}");

    // The installer's side without Avahi: exit 3, whether the bus or only Avahi is missing.
    for address in [bus.address(), "unix:path=/nonexistent/bus"] {
        let out = netns
            .command(iotctl())
            .args(["onboard", "--discover", "--for", "1s"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", address)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{address}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Avahi is not running") || stderr.contains("no system bus"),
            "{stderr}"
        );
    }
    assert!(iotd.terminate().await.success());
}
