//! `iotctl onboard` against iotd's real onboarding server, run in this test process on
//! 127.0.0.1 with a certificate of its own, and a test core behind its port that answers the
//! server's requests and publishes the phases an installer sees. Each test starts its own
//! gateway and runs the iotctl binary against it.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iotd::onboard::code::SetupCode;
use iotd::onboard::port::{Phase, Port, Refusal, Request, View};
use iotd::onboard::register::OnboardingRecord;
use iotd::onboard::server::{Limits, Server};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

const SERIAL: &str = "IOTGW-0001234";
const THING: &str = "gw-0001234";
/// The fewest PBKDF2 iterations a record may have: fast.
const ITERATIONS: u32 = 1000;
const TEMPLATE: &str = "GatewayTemplate";

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A CA, so that the relay (below) can verify the gateway as a client that pins would.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = params.self_signed(&key).unwrap().der().clone();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            der,
        }
    }

    /// A server configuration for `name`, with a leaf this CA signed; and the leaf.
    fn server(&self, name: &str) -> (Arc<rustls::ServerConfig>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let leaf = params.signed_by(&key, &self.issuer).unwrap().der().to_vec();
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf.clone())],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        (Arc::new(config), leaf)
    }
}

/// Claim files as CreateProvisioningClaim's would be saved (an EC key here: rcgen makes no
/// RSA keys), valid for 5 minutes from now.
struct ClaimFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    cert_pem: String,
    key_pem: String,
    not_after: i64,
}

fn claim_files() -> ClaimFiles {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["AWS IoT Certificate".to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::minutes(5);
    let cert_pem = params.self_signed(&key).unwrap().pem();
    let key_pem = key.serialize_pem();
    let (cert, key) = (dir.path().join("claim.pem"), dir.path().join("claim.key"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    ClaimFiles {
        _dir: dir,
        cert,
        key,
        cert_pem,
        key_pem,
        not_after: (now + time::Duration::minutes(5)).unix_timestamp(),
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway: iotd's onboarding server and a test core.

/// What the core does once it has the claim.
#[derive(Debug, Clone)]
enum Script {
    /// Every phase up to connected as THING.
    Connect,
    /// Connecting with the claim, then failed with this code and message.
    Fail(&'static str, &'static str),
    /// Connecting with the claim, and no further.
    Stall,
}

/// What the test core saw.
#[derive(Debug, Default)]
struct CoreLog {
    counted: u32,
    paired: u32,
    bundles: Vec<Value>,
}

struct Gateway {
    addr: SocketAddr,
    code: SetupCode,
    log: Arc<Mutex<CoreLog>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn open_view() -> View {
    View {
        open: true,
        closes_at: Some(unix_now() + 900),
        attempts_left: 20,
        ..View::default()
    }
}

/// Publishes the phases of `script`, a little apart, as the core would.
async fn play(script: Script, view: watch::Sender<View>) {
    let step = Duration::from_millis(30);
    let set = |phase, thing: Option<&str>, error: Option<(&str, &str)>| {
        view.send_modify(|v| {
            v.phase = phase;
            v.thing_name = thing.map(str::to_owned);
            v.error = error.map(|(c, m)| (c.to_owned(), m.to_owned()));
        });
    };
    tokio::time::sleep(step).await;
    set(Phase::ConnectingWithClaim, None, None);
    tokio::time::sleep(step).await;
    match script {
        Script::Connect => {
            set(Phase::CertificateIssued, None, None);
            tokio::time::sleep(step).await;
            set(Phase::ThingRegistered, Some(THING), None);
            tokio::time::sleep(step).await;
            set(Phase::Connected, Some(THING), None);
        }
        Script::Fail(code, message) => set(Phase::Failed, None, Some((code, message))),
        Script::Stall => {}
    }
}

/// The test core: counts attempts while the window is open, notes the pairing, takes any
/// bundle that is JSON and plays `script`.
async fn core(
    mut requests: tokio::sync::mpsc::Receiver<Request>,
    view: watch::Sender<View>,
    log: Arc<Mutex<CoreLog>>,
    script: Script,
) {
    while let Some(request) = requests.recv().await {
        match request {
            Request::CountAttempt { reply, .. } => {
                let current = view.borrow().clone();
                if !current.open || current.attempts_left == 0 {
                    let _ = reply.send(Err(Refusal {
                        code: "window_closed",
                        status: 403,
                        message: "The onboarding window is closed.".to_owned(),
                    }));
                    continue;
                }
                log.lock().unwrap().counted += 1;
                let left = current.attempts_left - 1;
                view.send_modify(|v| v.attempts_left = left);
                let _ = reply.send(Ok(left));
            }
            Request::Paired { .. } => {
                log.lock().unwrap().paired += 1;
                view.send_modify(|v| v.phase = Phase::Paired);
            }
            Request::HandOver { plaintext, reply } => {
                let bundle: Value = serde_json::from_slice(&plaintext).unwrap();
                log.lock().unwrap().bundles.push(bundle);
                view.send_modify(|v| {
                    v.phase = Phase::ClaimReceived;
                    v.open = false;
                });
                let _ = reply.send(Ok(()));
                tokio::spawn(play(script.clone(), view.clone()));
            }
            // Only iotd's discovery task sends it; this gateway has none.
            Request::Discovery { .. } | Request::Unpaired => {}
        }
    }
}

impl Gateway {
    async fn start(script: Script) -> Self {
        Self::with(script, open_view()).await
    }

    async fn with(script: Script, view: View) -> Self {
        let (tls, leaf) = Ca::new().server("gateway.local");
        Self::with_tls(script, view, tls, leaf).await
    }

    async fn with_tls(
        script: Script,
        view: View,
        tls: Arc<rustls::ServerConfig>,
        leaf: Vec<u8>,
    ) -> Self {
        let code = SetupCode::generate().unwrap();
        let salt: Vec<u8> = (0..32).collect();
        let record = OnboardingRecord::create(&code, SERIAL, &salt, ITERATIONS).unwrap();
        let (port, core_end) = Port::pair();
        core_end.view.send_replace(view);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Server::new(listener, tls, &leaf, record, port, Limits::default());
        let addr = server.local_addr().unwrap();
        let log = Arc::new(Mutex::new(CoreLog::default()));
        let core = tokio::spawn(core(core_end.requests, core_end.view, log.clone(), script));
        let server = tokio::spawn(async move {
            server.run().await.unwrap();
        });
        Self {
            addr,
            code,
            log,
            tasks: vec![server, core],
        }
    }

    fn counted(&self) -> u32 {
        self.log.lock().unwrap().counted
    }

    fn paired(&self) -> u32 {
        self.log.lock().unwrap().paired
    }

    fn bundles(&self) -> Vec<Value> {
        self.log.lock().unwrap().bundles.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Running iotctl.

/// `iotctl onboard ADDR ARGS… --claim-cert … --claim-key …`.
async fn onboard(addr: &str, args: &[&str], claim: &ClaimFiles) -> Output {
    onboard_with_input(addr, args, claim, "").await
}

/// The same, with `input` on its standard input.
async fn onboard_with_input(addr: &str, args: &[&str], claim: &ClaimFiles, input: &str) -> Output {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_iotctl"))
        .arg("onboard")
        .arg(addr)
        .args(args)
        .arg("--claim-cert")
        .arg(&claim.cert)
        .arg("--claim-key")
        .arg(&claim.key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("iotctl finishes")
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        stdout(out),
        stderr(out)
    )
}

/// `--json`'s lines.
fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

/// A code whose check digit is wrong: the last digit of a valid one, changed.
fn with_wrong_check_digit(code: &SetupCode) -> String {
    let mut digits = code.digits().to_owned();
    let last = digits.pop().unwrap();
    digits.push(if last == '9' {
        '0'
    } else {
        char::from(last as u8 + 1)
    });
    digits
}

/// Another valid code: a wrong one for this gateway.
fn other_code(code: &SetupCode) -> SetupCode {
    loop {
        let other = SetupCode::generate().unwrap();
        if other != *code {
            return other;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_handed_over_and_each_phase_shown_until_connected() {
    let gateway = Gateway::start(Script::Connect).await;
    let claim = claim_files();
    let code = gateway.code.formatted();
    let out = onboard(
        &gateway.addr.to_string(),
        &[
            "--code",
            &code,
            "--serial",
            SERIAL,
            "--template",
            TEMPLATE,
            "--param",
            "Site=Hamburg-3",
            "--param",
            "Location=Dock 2",
        ],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    let mut at = 0;
    for step in [
        "connected to",
        &format!("gateway {SERIAL} matches the label; 20 attempts left"),
        "paired: the gateway proved it holds this label's code (19 attempts left)",
        "claim handed over: the gateway accepted it",
        "claim received",
        "connecting with the claim",
        "certificate issued",
        &format!("thing registered as {THING}"),
        &format!("connected as {THING}: onboarding done"),
        "onboarding took",
        "; the claim had ",
    ] {
        let found = text[at..]
            .find(step)
            .unwrap_or_else(|| panic!("{step:?} (in order): {}", describe(&out)));
        at += found + step.len();
    }

    assert_eq!((gateway.counted(), gateway.paired()), (1, 1));
    let bundles = gateway.bundles();
    assert_eq!(bundles.len(), 1);
    assert_eq!(
        bundles[0],
        serde_json::json!({
            "v": 1,
            "certificate_pem": claim.cert_pem,
            "private_key_pem": claim.key_pem,
            "not_after": claim.not_after,
            "template": TEMPLATE,
            "parameters": {"Site": "Hamburg-3", "Location": "Dock 2"},
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qr_payload_works_and_json_reports_each_event_and_the_result() {
    let gateway = Gateway::start(Script::Connect).await;
    let claim = claim_files();
    let qr = format!("IOTD1:{SERIAL}:{}", gateway.code.digits());
    let out = onboard(
        &format!("localhost:{}", gateway.addr.port()),
        &["--qr", &qr, "--json", "--binding", "none"],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let lines = json_lines(&out);
    let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(
        &events[..4],
        ["tls", "params", "paired", "claim-accepted"],
        "{}",
        describe(&out)
    );
    let phases: Vec<&str> = lines
        .iter()
        .filter(|l| l["event"] == "phase")
        .map(|l| l["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "claim-received",
            "connecting-with-claim",
            "certificate-issued",
            "thing-registered",
            "connected"
        ],
        "{}",
        describe(&out)
    );
    assert_eq!(lines[2]["binding"], "none");
    let result = lines.last().unwrap();
    assert_eq!(result["result"], "connected", "{result}");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["serial"], SERIAL);
    assert_eq!(result["thing_name"], THING);
    assert!(
        result["claim_seconds_left"].as_i64().unwrap() > 200,
        "{result}"
    );

    // Neither a template nor parameters: the bundle leaves them out.
    let bundle = &gateway.bundles()[0];
    assert!(bundle.get("template").is_none(), "{bundle}");
    assert!(bundle.get("parameters").is_none(), "{bundle}");
    assert_eq!(bundle["not_after"], claim.not_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_stops_before_finish_and_hands_nothing_over() {
    let gateway = Gateway::start(Script::Connect).await;
    let claim = claim_files();
    let wrong = other_code(&gateway.code);
    let out = onboard(
        &gateway.addr.to_string(),
        &["--code", &wrong.formatted(), "--serial", SERIAL],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("wrong code, or someone in between"), "{err}");
    assert!(err.contains("(19 attempts left)"), "{err}");
    // The attempt was counted (confirm_v went out), but finish never came.
    assert_eq!((gateway.counted(), gateway.paired()), (1, 0));
    assert!(gateway.bundles().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_exit_2_before_any_connection() {
    // A listener that nobody should connect to.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let claim = claim_files();
    let code = SetupCode::generate().unwrap();
    let bad_digit = with_wrong_check_digit(&code);
    let good = code.formatted();
    let qr_bad_digit = format!("IOTD1:{SERIAL}:{bad_digit}");

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--code", &bad_digit, "--serial", SERIAL],
            "check digit does not match",
        ),
        (
            vec!["--code", "1234-5678", "--serial", SERIAL],
            "it has 8 digits, not 16",
        ),
        (
            vec!["--code", &good, "--serial", "has:colon"],
            "--serial: serial \"has:colon\"",
        ),
        (vec!["--qr", &qr_bad_digit], "check digit does not match"),
        (
            vec!["--qr", "MT:Y.K9042C00KA0648G00"],
            "does not start with IOTD1:",
        ),
        (
            vec!["--code", &good, "--serial", SERIAL, "--param", "Site"],
            "write NAME=VALUE",
        ),
    ];
    for (args, expected) in &cases {
        let out = onboard(&addr, args, &claim).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {expected:?}: {}",
            describe(&out)
        );
    }

    // A key that is not the certificate's.
    let other = claim_files();
    let mismatched = ClaimFiles {
        _dir: tempfile::tempdir().unwrap(),
        cert: claim.cert.clone(),
        key: other.key.clone(),
        cert_pem: String::new(),
        key_pem: String::new(),
        not_after: 0,
    };
    let out = onboard(&addr, &["--code", &good, "--serial", SERIAL], &mismatched).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("does not belong to claim certificate"),
        "{}",
        describe(&out)
    );
    // A claim file that is not there.
    let missing = ClaimFiles {
        _dir: tempfile::tempdir().unwrap(),
        cert: claim.cert.with_file_name("nothing.pem"),
        key: claim.key.clone(),
        cert_pem: String::new(),
        key_pem: String::new(),
        not_after: 0,
    };
    let out = onboard(&addr, &["--code", &good, "--serial", SERIAL], &missing).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("nothing.pem"), "{}", describe(&out));
    // clap's own: both --qr and --code, or no code at all.
    for args in [
        &["--qr", "IOTD1:X:1", "--code", &good, "--serial", SERIAL][..],
        &["--serial", SERIAL],
    ] {
        let out = onboard(&addr, args, &claim).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }

    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "iotctl connected despite bad input"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_serial_is_not_the_gateway_on_the_label() {
    let gateway = Gateway::start(Script::Connect).await;
    let claim = claim_files();
    let out = onboard(
        &gateway.addr.to_string(),
        &[
            "--code",
            &gateway.code.formatted(),
            "--serial",
            "IOTGW-9999999",
        ],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("this is not the gateway on the label"),
        "{err}"
    );
    assert!(err.contains(SERIAL), "{err}");
    assert_eq!(gateway.counted(), 0, "no /pair/start was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_prints_the_gateways_message_and_attempts_left() {
    let closed = View {
        open: false,
        attempts_left: 0,
        ..View::default()
    };
    let gateway = Gateway::with(Script::Connect, closed).await;
    let claim = claim_files();
    let out = onboard(
        &gateway.addr.to_string(),
        &[
            "--code",
            &gateway.code.formatted(),
            "--serial",
            SERIAL,
            "--json",
        ],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("the gateway refused /v1/pair/params (window_closed, HTTP 403)"),
        "{err}"
    );
    assert!(
        err.contains("The gateway is not accepting onboarding now"),
        "{err}"
    );
    assert!(err.contains("[attempts left: 0]"), "{err}");
    let result = json_lines(&out).pop().unwrap();
    assert_eq!(result["result"], "refused", "{result}");
    assert_eq!(result["exit_code"], 1);
    assert_eq!(result["error"]["code"], "window_closed");
    assert_eq!(result["error"]["attempts_left"], 0);
    assert!(result["error"]["message"].as_str().unwrap().len() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_phase_is_exit_1_with_the_gateways_reason() {
    let reason = "the claim expired before the gateway could use it — request a new one and pair \
                  again";
    let gateway = Gateway::start(Script::Fail("claim_expired", reason)).await;
    let claim = claim_files();
    // The code from standard input, this time.
    let out = onboard_with_input(
        &gateway.addr.to_string(),
        &["--code", "-", "--serial", SERIAL],
        &claim,
        &format!("{}\n", gateway.code.formatted().as_str()),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).contains("connecting with the claim"),
        "{}",
        describe(&out)
    );
    assert!(
        stdout(&out).contains(&format!("failed: {reason}")),
        "{}",
        describe(&out)
    );
    assert!(
        stderr(&out).contains(&format!(
            "onboarding failed on the gateway (claim_expired): {reason}"
        )),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_never_connects_times_out() {
    let gateway = Gateway::start(Script::Stall).await;
    let claim = claim_files();
    let out = onboard(
        &gateway.addr.to_string(),
        &[
            "--code",
            &gateway.code.formatted(),
            "--serial",
            SERIAL,
            "--timeout",
            "1",
        ],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains(
            "the gateway was not connected within 1 s (last phase: connecting-with-claim)"
        ),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gateway_at_the_address_is_exit_3() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let claim = claim_files();
    let code = SetupCode::generate().unwrap();
    let out = onboard(
        &addr.to_string(),
        &["--code", &code.formatted(), "--serial", SERIAL],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        stderr(&out).contains("the gateway is not reachable: cannot connect to 127.0.0.1:"),
        "{}",
        describe(&out)
    );
}

/// A relay that terminates TLS with its own certificate and opens its own TLS connection to
/// the gateway (verified against the gateway's CA), passing the bytes between them. With
/// `cut_events`, it drops a connection that asks for `/v1/events`.
async fn relay(gateway: SocketAddr, ca: &Ca, cut_events: bool) -> SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (own, _) = Ca::new().server("gateway.local");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let mut server = (*own).clone();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                let Ok(inside) = acceptor.accept(tcp).await else {
                    return;
                };
                let upstream = tokio::net::TcpStream::connect(gateway).await.unwrap();
                let name = ServerName::try_from("gateway.local").unwrap();
                let outside = connector.connect(name, upstream).await.unwrap();
                let (mut in_read, mut in_write) = tokio::io::split(inside);
                let (mut out_read, mut out_write) = tokio::io::split(outside);
                let up = async {
                    let mut buffer = vec![0; 16 * 1024];
                    loop {
                        let n = in_read.read(&mut buffer).await.unwrap_or(0);
                        let cut =
                            cut_events && buffer[..n].windows(14).any(|w| w == b"GET /v1/events");
                        if n == 0 || cut || out_write.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = tokio::io::copy(&mut out_read, &mut in_write);
                tokio::select! {
                    () = up => {}
                    _ = down => {}
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_terminating_relay_fails_the_pairing_with_the_binding() {
    let ca = Ca::new();
    let (tls, leaf) = ca.server("gateway.local");
    let gateway = Gateway::with_tls(Script::Connect, open_view(), tls, leaf).await;
    let through = relay(gateway.addr, &ca, false).await;
    let claim = claim_files();
    let code = gateway.code.formatted();
    let out = onboard(
        &through.to_string(),
        &["--code", &code, "--serial", SERIAL],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("wrong code, or someone in between (a relay that re-terminates TLS)"),
        "{}",
        describe(&out)
    );
    assert_eq!((gateway.counted(), gateway.paired()), (1, 0));
    assert!(gateway.bundles().is_empty());

    // The relay itself passes everything on: without the binding (as a browser must pair),
    // the same code pairs through it. (A new gateway: the first keeps its session a while.)
    let ca = Ca::new();
    let (tls, leaf) = ca.server("gateway.local");
    let gateway = Gateway::with_tls(Script::Connect, open_view(), tls, leaf).await;
    let through = relay(gateway.addr, &ca, false).await;
    let code = gateway.code.formatted();
    let out = onboard(
        &through.to_string(),
        &["--code", &code, "--serial", SERIAL, "--binding", "none"],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(gateway.paired(), 1);
}

#[test]
fn help_documents_the_exit_codes() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iotctl"))
        .args(["onboard", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let help = stdout(&out);
    for text in [
        "0  the gateway is connected to AWS IoT with its own identity",
        "1  failure",
        "2  usage error",
        "3  the gateway is not reachable",
        "tls-server-end-point",
        "default 8443",
    ] {
        assert!(help.contains(text), "{text}: {help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_events_the_progress_is_polled() {
    // Through a relay that cuts /v1/events (so without the binding, which the relay breaks).
    let ca = Ca::new();
    let (tls, leaf) = ca.server("gateway.local");
    let gateway = Gateway::with_tls(Script::Connect, open_view(), tls, leaf).await;
    let through = relay(gateway.addr, &ca, true).await;
    let claim = claim_files();
    let code = gateway.code.formatted();
    let out = onboard(
        &through.to_string(),
        &["--code", &code, "--serial", SERIAL, "--binding", "none"],
        &claim,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stderr(&out).contains("following the gateway's progress by asking /v1/status every second"),
        "{}",
        describe(&out)
    );
    assert!(
        stdout(&out).contains(&format!("connected as {THING}: onboarding done")),
        "{}",
        describe(&out)
    );
}
