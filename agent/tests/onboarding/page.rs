//! The installer's page (issue 15) in headless Chromium, against the real iotd and
//! fake-iot-core: Debian's chromium driven by playwright-core (agent/page/e2e/drive.mjs) at
//! phone size, 390×844. The page is served on the loopback interface, configured as a direct
//! link (`page_interfaces = ["lo"]`); the refusal on an interface that is not one runs in
//! network namespaces (a direct link and a "site LAN" to one gateway).
//!
//! Screenshots of every screen at 390×844 and 1280×800 go to `target/tmp/page-screenshots/`
//! (test artefacts); with `IOTD_BLESS_SCREENSHOTS=1` the main ones are copied to
//! docs/screenshots/, which README's onboarding section shows.
//!
//! Needs node (≥ 20.19), the page's npm packages (`npm ci` in agent/page) and
//! /usr/bin/chromium: scripts/setup.sh installs them. A missing one fails the test.

use iotd_testkit::avahi::Netns;

use super::*;

/// Where the screenshots go (a test artefact).
fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("page-screenshots")
}

fn page_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("page")
}

/// Runs one scenario of drive.mjs with `job` (the scenario's inputs); its JSON result. A
/// scenario that fails prints what it saw, and the test fails with it.
async fn drive(scenario: &str, job: Value) -> Value {
    drive_in(None, scenario, job).await
}

/// `drive`, with Chromium inside the network namespace `netns`.
async fn drive_in(netns: Option<&Netns>, scenario: &str, mut job: Value) -> Value {
    let driver = page_dir().join("e2e/drive.mjs");
    assert!(
        page_dir().join("node_modules/playwright-core").exists(),
        "agent/page/node_modules is missing: run scripts/setup.sh (npm ci in agent/page)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run scripts/setup.sh (apt-get install chromium)"
    );
    job["scenario"] = json!(scenario);
    job["shots"] = json!(shots());
    let mut command = match netns {
        Some(netns) => {
            let mut command = tokio::process::Command::new("ip");
            command.args(["netns", "exec", netns.name(), "node"]);
            command
        }
        None => tokio::process::Command::new("node"),
    };
    let child = command
        .arg(&driver)
        .env("IOTD_PAGE_JOB", job.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node (scripts/setup.sh checks it is there)");
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the browser scenario {scenario} did not finish in 3 minutes"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "{scenario}: drive.mjs printed no result ({}): {stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        out.status.success(),
        "{scenario} in Chromium: {}",
        serde_json::to_string_pretty(&result).unwrap()
    );
    bless();
    result
}

/// A gateway as `Gateway::start` makes it, serving the page on loopback (as a direct link, or
/// as a shared network with `shared`). Returns it and the page's URL.
async fn page_gateway(
    cloud: &Cloud,
    serial: &str,
    with_bus: bool,
    shared: bool,
) -> (Gateway, String) {
    let page_port = free_port();
    let list = if shared {
        "page_shared_interfaces"
    } else {
        "page_interfaces"
    };
    let gateway = Gateway::start_adjusted(cloud, serial, "", with_bus, |_, config| {
        format!("{config}{list} = [\"lo\"]\npage_port = {page_port}\n")
    })
    .await;
    (gateway, format!("http://127.0.0.1:{page_port}/"))
}

/// The claim as CreateProvisioningClaim returns it, in one JSON file (what a portal hands
/// out), beside its certificate and key files.
async fn claim_bundle(cloud: &Cloud, dir: &Path, name: &str) -> PathBuf {
    let claim = post(cloud, "/provisioning-templates/gateway/provisioning-claim").await;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, claim.to_string()).unwrap();
    path
}

fn text(result: &Value) -> &str {
    result["text"].as_str().unwrap_or_default()
}

/// The whole way, as an installer with a phone: the label's QR text pasted, the portal's claim
/// file, the site; the page pairs, hands the claim over and follows the gateway until it is
/// connected, then shows the thing name. The gateway is provisioned, with the installer's Site.
#[tokio::test]
async fn an_installer_onboards_the_gateway_from_a_phone_browser() {
    let cloud = Cloud::start().await;
    let (mut gateway, url) = page_gateway(&cloud, "p1", false, false).await;
    let bundle = claim_bundle(&cloud, gateway.dir.path(), "portal-claim").await;

    let result = drive(
        "onboard",
        json!({
            "url": url,
            "qr": gateway.label.qr,
            "files": [bundle],
            "params": {"Site": "hall-9"},
        }),
    )
    .await;
    assert_eq!(result["thing"], "gw-p1", "{result}");
    assert_eq!(result["title"], "Gateway set up", "{result}");
    let form = &result["seen"][0];
    assert_eq!(
        form["code_state"], "QR code read: gateway GW-p1.",
        "{result}"
    );
    assert!(
        form["claim_state"]
            .as_str()
            .unwrap()
            .starts_with("Certificate and key found. The claim expires in"),
        "{result}"
    );
    assert!(
        form["width320"].as_u64().unwrap() <= 320,
        "no sideways scrolling at 320 px: {result}"
    );
    assert_eq!(
        result["console"],
        json!([]),
        "no errors in the page: {result}"
    );

    gateway.iotd.wait_status("Provisioned as gw-p1").await;
    let state = gateway.iotd.state();
    assert_eq!(state["identity"]["thingName"], "gw-p1", "{state}");
    let thing = &cloud.registry()["things"]["gw-p1"];
    assert_eq!(thing["attributes"]["site"], "hall-9", "{thing}");
    // Opened again, the page says the gateway is set up.
    let again = drive("opens", json!({"url": url, "shot": "5-already-set-up"})).await;
    assert_eq!(again["title"], "This gateway is set up", "{again}");
    assert!(text(&again).contains("gw-p1"), "{again}");
    assert!(gateway.iotd.terminate().await.success());
}

/// The label's QR code read by the camera (where the browser has a barcode detector: Chromium
/// on Linux has none, so a stand-in "sees" the label's text in Chromium's fake camera stream),
/// the certificate and key as two files; and the gateway's answer to the hand-over lost on the
/// way (the claim arrived): the page follows the gateway's events to the thing name all the
/// same.
#[tokio::test]
async fn the_qr_code_can_be_scanned_and_the_claim_given_as_two_files() {
    let cloud = Cloud::start().await;
    let (mut gateway, url) = page_gateway(&cloud, "p2", false, false).await;
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;
    let result = drive(
        "onboard",
        json!({
            "url": url,
            "scan": gateway.label.qr,
            "prefix": "scan-",
            "loseClaimAnswer": true,
            "files": [claim.cert, claim.key],
            "params": {"Site": "dock-2"},
        }),
    )
    .await;
    assert_eq!(result["thing"], "gw-p2", "{result}");
    let code = result["seen"][0]["code"].as_str().unwrap();
    assert_eq!(code.replace('-', ""), gateway.label.code, "{result}");
    gateway.iotd.wait_status("Provisioned as gw-p2").await;
    assert!(gateway.iotd.terminate().await.success());
}

/// Wrong codes (valid check digit, so they reach the gateway): each shows the attempts left;
/// the 20th closes the window, and the page says setup is locked and what to do. The gateway
/// counted 20 and handed nothing to the cloud. On the way, the gateway's rate limit: the page
/// waits out its `Retry-After` before it offers to try again.
#[tokio::test]
async fn wrong_codes_show_the_attempts_left_and_the_window_closes_at_the_cap() {
    let cloud = Cloud::start().await;
    let (gateway, url) = page_gateway(&cloud, "p3", true, false).await;
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;
    let result = drive(
        "wrongCodes",
        json!({
            "url": url,
            "code": gateway.label.wrong_code(),
            "files": [claim.cert, claim.key],
            "params": {"Site": "x"},
        }),
    )
    .await;
    assert_eq!(result["title"], "Setup is locked", "{result}");
    assert!(text(&result).contains("iotctl onboard open"), "{result}");
    let refusals: Vec<&Value> = result["seen"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["title"] == "Setup code not accepted")
        .collect();
    assert_eq!(refusals.len(), 19, "{result}");
    // The gateway's rate limit (the driver empties its bucket before the first try): the page
    // says how long to wait, and holds "Try again" until then.
    let rated: Vec<&Value> = result["seen"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["title"] == "Too many requests")
        .collect();
    assert!(!rated.is_empty(), "{result}");
    for screen in rated {
        assert_eq!(screen["held"], true, "{screen}");
        assert!(
            text(screen).contains("Wait 1 second, then try again."),
            "{screen}"
        );
    }
    for (i, refusal) in refusals.iter().enumerate() {
        let left = 19 - i;
        let tries = if left == 1 { "try" } else { "tries" };
        assert!(
            text(refusal).contains(&format!("allows {left} more {tries}")),
            "refusal {i}: {refusal}"
        );
        assert_eq!(refusal["held"], false, "refusal {i}: {refusal}");
    }
    let window = gateway.window().await;
    assert_eq!(window["open"], false, "{window}");
    assert_eq!(window["attemptsLeft"], 0, "{window}");
    gateway.assert_untouched(&cloud);

    // Reloaded, the page says so at once.
    let again = drive("opens", json!({"url": url})).await;
    assert_eq!(again["title"], "Setup is locked", "{again}");
}

/// A claim that expired before the gateway used it: AWS refuses it; the page shows the cause
/// and asks for a new claim. A claim whose key is not its certificate's: the gateway refuses it
/// itself. A window closed by hand: the page says the gateway is not accepting setup.
#[tokio::test]
async fn an_expired_claim_a_mismatched_key_and_a_closed_window_are_explained() {
    let cloud = Cloud::start().await;
    let (gateway, url) = page_gateway(&cloud, "p4", true, false).await;
    let dir = gateway.dir.path();

    let first = new_claim(&cloud, dir, "first").await;
    let second = new_claim(&cloud, dir, "second").await;
    let mismatched = drive(
        "claimRefused",
        json!({
            "url": url,
            "code": gateway.label.code,
            "files": [first.cert, second.key],
            "params": {"Site": "x"},
        }),
    )
    .await;
    assert!(
        text(&mismatched).contains("certificate and the key must come from the same claim"),
        "{mismatched}"
    );
    assert!(
        text(&mismatched).contains("The key file does not belong to the claim’s certificate."),
        "{mismatched}"
    );

    let expired = claim_bundle(&cloud, dir, "expired").await;
    cloud.shared().clock.advance(301);
    let result = drive(
        "failsOnline",
        json!({
            "url": url,
            "code": gateway.label.code,
            "files": [expired],
            "params": {"Site": "x"},
            "expect": "The claim has expired",
            "shot": "8-claim-expired",
        }),
    )
    .await;
    assert!(text(&result).contains("Get a new claim"), "{result}");
    let status = gateway.status().await;
    assert_eq!(status["error"]["code"], "claim-expired", "{status}");

    gateway.ctl(&["onboarding", "close"]).await;
    let closed = drive("opens", json!({"url": url, "shot": "10-window-closed"})).await;
    assert_eq!(
        closed["title"], "The gateway is not accepting setup",
        "{closed}"
    );
    assert!(text(&closed).contains("press its setup button"), "{closed}");
}

/// Served on an interface configured as a shared network, the page warns that `iotctl onboard`
/// or an app is the safe path there; on a direct link it does not.
#[tokio::test]
async fn on_a_shared_network_the_page_says_iotctl_is_the_safe_path() {
    let cloud = Cloud::start().await;
    let (gateway, url) = page_gateway(&cloud, "p5", false, true).await;
    let shared = drive("opens", json!({"url": url, "shot": "0-shared-network"})).await;
    assert_eq!(shared["screen"], "form", "{shared}");
    assert_eq!(shared["warning"], true, "{shared}");
    assert!(text(&shared).contains("iotctl onboard"), "{shared}");
    drop(gateway);

    let (_gateway, url) = page_gateway(&cloud, "p6", false, false).await;
    let direct = drive("opens", json!({"url": url})).await;
    assert_eq!(direct["warning"], false, "{direct}");
}

/// `ip` with `args`, which must succeed.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth pair: `a` in `netns_a` with `ip_a`/24, `b` in `netns_b` with `ip_b`/24, both up.
fn veth(netns_a: &Netns, a: &str, ip_a: &str, netns_b: &Netns, b: &str, ip_b: &str) {
    ip(&[
        "link",
        "add",
        a,
        "netns",
        netns_a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        netns_b.name(),
    ]);
    for (netns, name, address) in [(netns_a, a, ip_a), (netns_b, b, ip_b)] {
        ip(&[
            "-n",
            netns.name(),
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            name,
        ]);
        ip(&["-n", netns.name(), "link", "set", name, "up"]);
    }
}

/// A gateway with two networks, each in network namespaces this test makes: a direct link to
/// the installer's phone (`page_interfaces`), made only after iotd started, and the site LAN.
/// The phone gets the page; a host on the LAN is refused, also when it routes to the direct
/// link's address through the gateway's LAN port (which reaches the HTTPS API there: only the
/// page is bound to its interface). The direct link removed and made again (a new interface
/// index) is served again.
#[tokio::test]
async fn the_page_is_served_on_the_direct_link_only() {
    let gateway_ns = Netns::new("gw");
    let phone = Netns::new("phone");
    let lan = Netns::new("lan");
    // Interface names are made in the host's namespace first: unique on the machine.
    let id = format!("pg{:x}", std::process::id() % 0x00ff_ffff);
    let (direct, phone_if, lan_if, host_if) = (
        format!("{id}d"),
        format!("{id}p"),
        format!("{id}l"),
        format!("{id}h"),
    );
    veth(
        &gateway_ns,
        &lan_if,
        "10.78.2.1",
        &lan,
        &host_if,
        "10.78.2.2",
    );
    ip(&[
        "-n",
        lan.name(),
        "route",
        "add",
        "10.78.1.0/24",
        "via",
        "10.78.2.1",
    ]);

    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.toml");
    let config = gateway_config(&cloud, dir.path(), "n1", 8443, "")
        .replace("listen = \"127.0.0.1:8443\"", "listen = \"0.0.0.0:8443\"");
    std::fs::write(
        &config_path,
        format!("{config}page_interfaces = [\"{direct}\"]\npage_port = 8080\n"),
    )
    .unwrap();
    register(&config_path);
    let wrapper = gateway_ns.wrapper(&iotd_binary(), &dir.path().join("iotd-in-netns"));
    let mut iotd =
        Iotd::start_with_config(&wrapper, &config_path, &dir.path().join("state"), &[]).await;
    iotd.wait_status("READY=1").await;

    // The installer plugs in: the direct link appears.
    veth(
        &gateway_ns,
        &direct,
        "10.78.1.1",
        &phone,
        &phone_if,
        "10.78.1.2",
    );
    let page = "http://10.78.1.1:8080/";
    let served = drive_in(Some(&phone), "opens", json!({"url": page, "retry": true})).await;
    assert_eq!(served["screen"], "form", "{served}");
    assert_eq!(served["warning"], false, "{served}");

    for url in ["http://10.78.2.1:8080/", page] {
        let refused = drive_in(Some(&lan), "refused", json!({"url": url})).await;
        assert!(
            refused["error"]
                .as_str()
                .unwrap()
                .contains("ERR_CONNECTION_REFUSED"),
            "{url} from the LAN: {refused}"
        );
    }
    // The route through the LAN port works: the HTTPS API (not bound to an interface) answers
    // there, with its self-signed certificate.
    let api = drive_in(
        Some(&lan),
        "refused",
        json!({"url": "https://10.78.1.1:8443/v1/status"}),
    )
    .await;
    assert!(
        api["error"]
            .as_str()
            .unwrap_or_default()
            .contains("ERR_CERT"),
        "the API through the LAN port: {api}"
    );

    // Unplugged and plugged again: a new interface with the same name.
    ip(&["-n", gateway_ns.name(), "link", "del", &direct]);
    veth(
        &gateway_ns,
        &direct,
        "10.78.1.1",
        &phone,
        &phone_if,
        "10.78.1.2",
    );
    let again = drive_in(Some(&phone), "opens", json!({"url": page, "retry": true})).await;
    assert_eq!(again["screen"], "form", "{again}");
    assert!(iotd.terminate().await.success());
}

/// With `IOTD_BLESS_SCREENSHOTS=1`, the main screens at phone size go to docs/screenshots/
/// (README shows them).
fn bless() {
    if std::env::var_os("IOTD_BLESS_SCREENSHOTS").is_none() {
        return;
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
    std::fs::create_dir_all(&docs).unwrap();
    // A scenario without screenshots may be the first to finish.
    std::fs::create_dir_all(shots()).unwrap();
    for entry in std::fs::read_dir(shots()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let main = !name.starts_with("failed") && !name.starts_with("scan-");
        if name.ends_with("-390x844.png") && main {
            std::fs::copy(&path, docs.join(&name)).unwrap();
        }
    }
}
