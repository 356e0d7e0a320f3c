//! Trusted-user onboarding end to end, with the real iotd and iotctl binaries against
//! fake-iot-core, everything on 127.0.0.1.
//!
//! The way it should go: a gateway registered with `iotctl onboarding register`, with no claim
//! of its own and its key in a TPM (a private swtpm), waits; an installer gets a 5-minute claim
//! from fake-iot-core's CreateProvisioningClaim (AWS's REST path) and hands it over with
//! `iotctl onboard`, which exits 0 once the gateway is connected with its own identity.
//!
//! Then the rows of the profile's attack table (§5.6, issue 13) that the real binaries can
//! reproduce, each with its refusal (these gateways keep their key in a file):
//! - wrong codes: 20, then the window is closed, also after a restart, until a local
//!   `iotctl onboarding open` (D-Bus: a private dbus-daemon with the shipped policy);
//! - a relay that terminates the CLI's TLS and opens its own to the gateway: the binding makes
//!   the confirmation fail, the attempt is counted and no claim is handed over;
//! - an expired claim: AWS refuses it and iotctl reports that; one that only the gateway's
//!   (wrong) clock thinks expired is still used;
//! - a template or a parameter the gateway does not allow, a key that is not the
//!   certificate's (iotctl refuses it before the network);
//! - a window closed by hand; a second client while one is pairing;
//! - an endpoint the gateway does not allow; one it allows (a second fake on 127.0.0.2 stands
//!   for another account's endpoint): the identity is made there and stays there across
//!   restarts and a rebuilt state.json; and a certificate issued there is not registered with a
//!   later claim for the configured endpoint.
//!
//! What iotctl cannot send is covered at the server's level (agent/src/onboard/server/tests.rs,
//! bundle/tests.rs): a mismatched key reaching the gateway, replays, reflection, bad shares,
//! oversized bodies.
//!
//! The relay is in this file: rustls on both sides, the plaintext copied both ways. Through it,
//! iotctl with `--binding none` (as a browser pairs) works, which lets the wrong-code test end
//! each abandoned session at once: iotctl never sends `/v1/pair/finish` after a confirmation
//! that does not check out, and the gateway would otherwise keep the session (and refuse the
//! next client as busy) until its 30 s step deadline. The gateway's `/v1/pair/params` takes 10
//! requests in a burst, then one a second: a `rate_limited` refusal is run again.
#![allow(clippy::unwrap_used)]

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use iotd::keys::KeyBackend as _;
use iotd::onboard::code::{SetupCode, parse_qr};
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::swtpm::Swtpm;
use iotd_testkit::*;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The installer's page in headless Chromium (issue 15).
#[path = "onboarding/page.rs"]
mod page;

fn iotctl() -> PathBuf {
    let path = iotd_binary().with_file_name("iotctl");
    assert!(
        path.exists(),
        "build iotctl first (cargo test --workspace does)"
    );
    path
}

/// A port on 127.0.0.1 nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The gateway's configuration: no claim files, `key` (a `[key]` section, or nothing for the
/// file backend), onboarding on 127.0.0.1.
fn gateway_config(cloud: &Cloud, dir: &Path, serial: &str, port: u16, key: &str) -> String {
    let (cert, claim_key) = cloud.claim();
    let conf = config(cloud, &dir.join("state"), serial)
        .replace(&format!("claim_certificate = \"{cert}\"\n"), "")
        .replace(&format!("claim_key = \"{claim_key}\"\n"), "");
    format!(
        "{conf}\n{key}\n[onboarding]\nserial = \"GW-{serial}\"\n\
         listen = \"127.0.0.1:{port}\"\ninstaller_parameters = [\"Site\"]\n"
    )
}

/// The `[key]` section for `tpm`.
fn tpm_key(tpm: &Swtpm) -> String {
    format!("[key]\nbackend = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti())
}

/// An HTTP POST with an empty body to the fake's control plane; returns the JSON answer.
async fn post(cloud: &Cloud, path: &str) -> Value {
    use http_body_util::Empty;
    let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url = format!("{}{path}", cloud.ready["http"].as_str().unwrap());
    let resp = client
        .request(hyper::Request::post(url).body(Empty::new()).unwrap())
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// A claim's files, as the installer's phone would have them.
struct ClaimFiles {
    cert: PathBuf,
    key: PathBuf,
}

/// A new 5-minute claim from CreateProvisioningClaim, written to `<name>.pem` and `<name>.key`
/// in `dir`.
async fn new_claim(cloud: &Cloud, dir: &Path, name: &str) -> ClaimFiles {
    use std::os::unix::fs::PermissionsExt as _;
    let claim = post(cloud, "/provisioning-templates/gateway/provisioning-claim").await;
    let files = ClaimFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, claim["certificatePem"].as_str().unwrap()).unwrap();
    std::fs::write(&files.key, claim["keyPair"]["PrivateKey"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    files
}

/// The label `iotctl onboarding register` printed.
struct Label {
    qr: String,
    serial: String,
    /// The 16 digits.
    code: String,
}

impl Label {
    /// Another code with a valid check digit: iotctl takes it and goes to the network.
    fn wrong_code(&self) -> String {
        loop {
            let code = SetupCode::generate().unwrap();
            if code.digits() != self.code {
                return code.formatted().to_string();
            }
        }
    }
}

/// `iotctl onboarding register` for the gateway of `config_path`: the label.
fn register(config_path: &Path) -> Label {
    let out = std::process::Command::new(iotctl())
        .args(["--config", config_path.to_str().unwrap()])
        .args(["onboarding", "register"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let label = String::from_utf8_lossy(&out.stdout).into_owned();
    let qr = label
        .lines()
        .find_map(|l| l.trim().strip_prefix("QR payload: "))
        .unwrap_or_else(|| panic!("no QR payload in {label}"))
        .to_owned();
    let (serial, code) = parse_qr(&qr).unwrap();
    Label {
        code: code.digits().to_owned(),
        qr,
        serial,
    }
}

/// A registered gateway and its running iotd (on a private system bus when it has one).
struct Gateway {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    port: u16,
    label: Label,
    bus: Option<DbusDaemon>,
    iotd: Iotd,
}

impl Gateway {
    /// Registers gateway `serial` (config key section `key`), starts iotd, and waits until it
    /// waits for a claim with its servers up.
    async fn start(cloud: &Cloud, serial: &str, key: &str, with_bus: bool) -> Gateway {
        Self::start_adjusted(cloud, serial, key, with_bus, |_, config| config).await
    }

    /// `start`, with the configuration as `adjust` (given the gateway's directory) makes it.
    async fn start_adjusted(
        cloud: &Cloud,
        serial: &str,
        key: &str,
        with_bus: bool,
        adjust: impl FnOnce(&Path, String) -> String,
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config_path = dir.path().join("config.toml");
        let config = adjust(
            dir.path(),
            gateway_config(cloud, dir.path(), serial, port, key),
        );
        std::fs::write(&config_path, config).unwrap();
        // On the production line: the record, and the label.
        let label = register(&config_path);
        let bus = with_bus.then(|| DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN)));
        let iotd = Self::spawn(&config_path, dir.path(), bus.as_ref()).await;
        Gateway {
            dir,
            config_path,
            port,
            label,
            bus,
            iotd,
        }
    }

    async fn spawn(config_path: &Path, dir: &Path, bus: Option<&DbusDaemon>) -> Iotd {
        let env: Vec<(&str, &str)> = bus
            .map(|b| vec![("DBUS_SYSTEM_BUS_ADDRESS", b.address())])
            .unwrap_or_default();
        let mut iotd =
            Iotd::start_with_config(&iotd_binary(), config_path, &dir.join("state"), &env).await;
        iotd.wait_status("Waiting for a claim").await;
        iotd.wait_status("READY=1").await;
        iotd
    }

    /// SIGTERM, wait for the exit, start again with the same state directory.
    async fn restart(&mut self) {
        assert!(self.iotd.terminate().await.success());
        self.iotd = Self::spawn(&self.config_path, self.dir.path(), self.bus.as_ref()).await;
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn target(&self) -> String {
        self.addr().to_string()
    }

    /// `GET /v1/status` of the onboarding server.
    async fn status(&self) -> Value {
        let (status, body) = https(self.addr(), "GET", "/v1/status", None).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls `/v1/status` until `done` holds for it (the core publishes what a request changed
    /// just after it answered); returns it.
    async fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway's onboarding status does not show {what}: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the window is open with `attempts_left` and no error shown.
    async fn wait_open(&self, attempts_left: u64) -> Value {
        self.wait_for(
            &format!("an open window with {attempts_left} attempts left and no error"),
            |s| {
                s["window"] == "open"
                    && s["attempts_left"] == attempts_left
                    && s.get("error").is_none()
            },
        )
        .await
    }

    /// iotctl with this gateway's configuration and bus: its output, checked for success.
    async fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut command = tokio::process::Command::new(iotctl());
        command
            .args(["--config", self.config_path.to_str().unwrap()])
            .args(args)
            .kill_on_drop(true);
        if let Some(bus) = &self.bus {
            command.env("DBUS_SYSTEM_BUS_ADDRESS", bus.address());
        }
        let out = tokio::time::timeout(WAIT, command.output())
            .await
            .unwrap_or_else(|_| panic!("iotctl {args:?} did not finish in time"))
            .unwrap();
        assert!(
            out.status.success(),
            "iotctl {args:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `iotctl onboarding status --json`.
    async fn window(&self) -> Value {
        let out = self.ctl(&["onboarding", "status", "--json"]).await;
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `iotctl onboard` to this gateway's label, with `code`.
    fn onboard(&self, target: &str, code: &str, claim: &ClaimFiles) -> Onboard {
        Onboard::new(target, &self.label.serial, code, claim)
    }

    /// `iotctl onboard` with the right code, `claim` and `args`, which the gateway refuses with
    /// `422 claim_invalid`, the message naming each of `named` (the session had paired).
    async fn claim_refused(&self, claim: &ClaimFiles, args: &[&str], named: &[&str]) {
        let run = self
            .onboard(&self.target(), &self.label.code, claim)
            .arg(args)
            .run()
            .await;
        let message = run.assert_refused("/v1/claim", 422, "claim_invalid");
        assert!(named.iter().all(|n| message.contains(n)), "{run}");
        assert_eq!(run.events("paired").len(), 1, "{run}");
    }

    /// Nothing reached the cloud, and the gateway has started no provisioning.
    fn assert_untouched(&self, cloud: &Cloud) {
        let connects: Vec<_> = cloud
            .log()
            .into_iter()
            .filter(|e| e.kind == "connect")
            .collect();
        assert!(connects.is_empty(), "{connects:#?}");
        let step = persisted_step(&self.iotd.state_dir);
        assert!(["none", "unprovisioned"].contains(&step.as_str()), "{step}");
    }
}

/// One `iotctl onboard … --json`, to be run.
struct Onboard {
    args: Vec<String>,
}

impl Onboard {
    fn new(target: &str, serial: &str, code: &str, claim: &ClaimFiles) -> Onboard {
        let args = [
            "onboard",
            target,
            "--serial",
            serial,
            "--code",
            code,
            "--claim-cert",
            claim.cert.to_str().unwrap(),
            "--claim-key",
            claim.key.to_str().unwrap(),
            "--json",
        ];
        Onboard {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn arg(mut self, args: &[&str]) -> Onboard {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    fn spawn(&self) -> (tokio::process::Child, Instant) {
        let started = Instant::now();
        let child = tokio::process::Command::new(iotctl())
            .args(&self.args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        (child, started)
    }

    /// Runs it once.
    async fn once(&self) -> Run {
        let (child, started) = self.spawn();
        Run::of(child, started).await
    }

    /// Runs it, again after a `rate_limited` refusal (the gateway takes 10 pairings in a burst,
    /// then one a second).
    async fn run(&self) -> Run {
        for _ in 0..60 {
            let run = self.once().await;
            if run.refusal() != "rate_limited" {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("iotctl {:?} was rate-limited for 15 s", self.args);
    }
}

/// How one `iotctl onboard --json` ended.
struct Run {
    exit: Option<i32>,
    /// From the spawn to the exit.
    took: Duration,
    stdout: String,
    stderr: String,
    /// The last line: `{"result", "exit_code", "message", "error"?, …}`.
    result: Value,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "iotctl onboard: exit {:?}\nstdout:\n{}stderr:\n{}",
            self.exit, self.stdout, self.stderr
        )
    }
}

impl Run {
    /// The end of `child`, spawned at `started`.
    async fn of(child: tokio::process::Child, started: Instant) -> Run {
        let out = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .expect("iotctl onboard finishes in time")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let result = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        Run {
            exit: out.status.code(),
            took: started.elapsed(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            stdout,
            result,
        }
    }

    fn message(&self) -> &str {
        self.result["message"].as_str().unwrap_or_default()
    }

    /// The gateway's refusal code, "" when it did not refuse.
    fn refusal(&self) -> &str {
        self.result["error"]["code"].as_str().unwrap_or_default()
    }

    /// The step lines (`{"event", …}`) named `event`.
    fn events(&self, event: &str) -> Vec<Value> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    fn assert_connected(&self) {
        assert_eq!(self.exit, Some(0), "{self}");
        assert_eq!(self.result["result"], "connected", "{self}");
    }

    /// Exit 1: the gateway's confirmation did not check out (iotctl ended the session), with
    /// `left` attempts left after this one.
    fn assert_wrong_code(&self, left: u32) {
        assert_eq!(self.exit, Some(1), "{self}");
        assert_eq!(self.result["result"], "wrong-code", "{self}");
        let message = self.message();
        assert!(
            message.contains("the gateway did not prove it knows this code: wrong code")
                && message.contains("Nothing was sent that depends on the code")
                && message.contains(&format!("({left} attempts left)")),
            "{self}"
        );
        assert!(self.stderr.contains(message), "{self}");
        assert!(self.events("paired").is_empty(), "{self}");
    }

    /// Exit 1: the gateway refused `endpoint` with HTTP `status` and `code`; returns its
    /// message.
    fn assert_refused(&self, endpoint: &str, status: u16, code: &str) -> &str {
        assert_eq!(self.exit, Some(1), "{self}");
        assert_eq!(self.result["result"], "refused", "{self}");
        let error = &self.result["error"];
        assert_eq!(error["endpoint"], endpoint, "{self}");
        assert_eq!(error["status"], status, "{self}");
        assert_eq!(error["code"], code, "{self}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{self}");
        assert!(
            self.stderr.contains(&format!(
                "the gateway refused {endpoint} ({code}, HTTP {status}): {message}"
            )),
            "{self}"
        );
        message
    }
}

// ---------------------------------------------------------------------------------------------
// HTTPS to the gateway and the relay: any certificate accepted (as iotctl does), its leaf kept.

/// A TLS connection to `addr` that accepts any certificate; also returns the leaf it showed.
async fn tls_connect(
    addr: SocketAddr,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let (config, seen) = iotd_testkit::tls::accept_any();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("gateway.local").unwrap(), tcp)
        .await
        .unwrap();
    let leaf = seen.lock().unwrap().clone().unwrap();
    (tls, leaf)
}

/// One HTTPS request on a new connection: the status and the JSON body (`Null` if none).
async fn https(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let (tls, _) = tls_connect(addr).await;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "gateway.local")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            body.map(Value::to_string).unwrap_or_default(),
        )))
        .unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("the gateway answers in time")
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The relay.

/// Holds the client's plaintext that contains `marker` until released.
struct Gate {
    marker: &'static [u8],
    reached: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

/// A relay that terminates TLS with its own self-signed certificate and opens its own TLS
/// connection to the gateway, copying the plaintext both ways. It notes the session ids the
/// gateway hands out, and can hold a request (a `Gate`).
struct Relay {
    addr: SocketAddr,
    upstream: SocketAddr,
    /// Its certificate (DER).
    leaf: Vec<u8>,
    /// Session ids the gateway sent back through the relay, and whether each was ended.
    sessions: Arc<Mutex<Vec<String>>>,
    gate: Option<Arc<Gate>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        Self::with_gate(upstream, None).await
    }

    async fn with_gate(upstream: SocketAddr, gate: Option<Arc<Gate>>) -> Relay {
        // A self-signed certificate for a key of its own: iotd's file backend makes both.
        let dir = tempfile::tempdir().unwrap();
        let key = iotd::keys::file::FileBackend::new(dir.path())
            .onboarding_key()
            .unwrap();
        let tls = iotd::onboard::certificate::server_tls(dir.path(), key, "RELAY").unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let sessions = sessions.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let acceptor = acceptor.clone();
                    let sessions = sessions.clone();
                    let gate = gate.clone();
                    tokio::spawn(async move {
                        let Ok(downstream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let (upstream, _) = tls_connect(upstream).await;
                        relay(downstream, upstream, &sessions, gate.as_deref()).await;
                    });
                }
            })
        };
        Relay {
            addr,
            upstream,
            leaf: tls.leaf_der,
            sessions,
            gate,
            task,
            _dir: dir,
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Asks the gateway about each session handed out through the relay: a `/v1/pair/finish`
    /// with a confirmation that cannot be right answers `401 confirmation_failed` (and ends it)
    /// for a live session, `404 no_session` for one already gone. Returns the statuses.
    async fn probe_sessions(&self) -> Vec<u16> {
        let ids: Vec<String> = self.sessions.lock().unwrap().clone();
        let mut statuses = Vec::new();
        for id in &ids {
            let body = json!({"v": 1, "session_id": id, "confirm_p": "A".repeat(43)});
            let (status, answer) =
                https(self.upstream, "POST", "/v1/pair/finish", Some(&body)).await;
            assert!(
                (status == 401 && answer["error"] == "confirmation_failed")
                    || (status == 404 && answer["error"] == "no_session"),
                "probing session {id}: {status} {answer}"
            );
            statuses.push(status);
        }
        statuses
    }

    /// Waits until the gate holds the client's request.
    async fn held(&self) {
        let gate = self.gate.as_ref().unwrap();
        tokio::time::timeout(WAIT, gate.reached.notified())
            .await
            .expect("the relay holds the request in time");
    }

    fn release(&self) {
        self.gate.as_ref().unwrap().release.add_permits(1);
    }
}

/// Copies one connection's plaintext both ways until either side ends.
async fn relay(
    downstream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    upstream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    sessions: &Mutex<Vec<String>>,
    gate: Option<&Gate>,
) {
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let to_gateway = async {
        let mut seen = Vec::new();
        let mut passed = false;
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = down_read.read(&mut buf).await {
            seen.extend_from_slice(&buf[..n]);
            if let Some(gate) = gate
                && !passed
                && find(&seen, gate.marker).is_some()
            {
                passed = true;
                gate.reached.notify_one();
                gate.release.acquire().await.unwrap().forget();
            }
            if up_write.write_all(&buf[..n]).await.is_err() || up_write.flush().await.is_err() {
                break;
            }
        }
        let _ = up_write.shutdown().await;
    };
    let to_client = async {
        let mut seen = Vec::new();
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = up_read.read(&mut buf).await {
            seen.extend_from_slice(&buf[..n]);
            note_sessions(&seen, sessions);
            if down_write.write_all(&buf[..n]).await.is_err() || down_write.flush().await.is_err() {
                break;
            }
        }
        let _ = down_write.shutdown().await;
    };
    tokio::join!(to_gateway, to_client);
}

/// Adds the session ids in the gateway's answers `seen` so far to `sessions`.
fn note_sessions(seen: &[u8], sessions: &Mutex<Vec<String>>) {
    const FIELD: &[u8] = b"\"session_id\":\"";
    let mut rest = seen;
    while let Some(at) = find(rest, FIELD) {
        rest = &rest[at + FIELD.len()..];
        let Some(end) = rest.iter().position(|&b| b == b'"') else {
            return;
        };
        let id = String::from_utf8_lossy(&rest[..end]).into_owned();
        let mut sessions = sessions.lock().unwrap();
        if !sessions.contains(&id) {
            sessions.push(id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn an_installer_hands_over_a_claim_and_the_gateway_provisions_with_its_tpm_key() {
    let cloud = Cloud::start().await;
    let tpm = Swtpm::start();
    let mut gateway = Gateway::start(&cloud, "e1", &tpm_key(&tpm), false).await;
    let port = gateway.port;
    let qr = gateway.label.qr.clone();

    // The installer's phone (here: the test) gets a claim valid for 5 minutes.
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;
    let (cert, key) = (&claim.cert, &claim.key);

    let started = Instant::now();
    let out = tokio::process::Command::new(iotctl())
        .args(["onboard", &format!("127.0.0.1:{port}"), "--qr", &qr])
        .args(["--claim-cert", cert.to_str().unwrap()])
        .args(["--claim-key", key.to_str().unwrap()])
        .args(["--param", "Site=hall-9", "--json"])
        .output()
        .await
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iotctl onboard: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(result["result"], "connected", "{result}");
    println!(
        "pairing + hand-over + provisioning with the TPM key: {:.0} ms; the claim had {} s left",
        took.as_secs_f64() * 1000.0,
        result["claim_seconds_left"]
    );
    assert!(
        took.as_secs() < 60,
        "well inside the claim's 5 minutes: {took:?}"
    );

    let iotd = &mut gateway.iotd;
    iotd.wait_status("Provisioned as gw-e1; certificate").await;
    let state = iotd.state();
    assert_eq!(state["identity"]["thingName"], "gw-e1", "{state}");
    assert!(
        state["identity"]["key"]
            .as_str()
            .unwrap()
            .starts_with("tpm "),
        "{state}"
    );
    let thing = &cloud.registry()["things"]["gw-e1"];
    assert_eq!(thing["attributes"]["site"], "hall-9", "{thing}");
    // The window closed on success: a second pairing is refused.
    let again = std::process::Command::new(iotctl())
        .args(["onboard", &format!("127.0.0.1:{port}"), "--qr", &qr])
        .args(["--claim-cert", cert.to_str().unwrap()])
        .args(["--claim-key", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("window"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(gateway.iotd.terminate().await.success());
}

/// What the installer supplied (Site) lives only in the thing's attributes and in iotd's
/// identity: a rotation's RegisterThing sends it again, so that the template (Site has a
/// default, "lab", and merges attributes) does not overwrite the installer's site. It is kept
/// in state.json and in the generation's identity.json, across a restart.
#[tokio::test]
async fn the_installers_parameters_are_sent_again_when_the_certificate_rotates() {
    let cloud = Cloud::start().await;
    let mut gateway = Gateway::start(&cloud, "p1", "", true).await;
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;
    let out = tokio::process::Command::new(iotctl())
        .args(["onboard", &gateway.target(), "--qr", &gateway.label.qr])
        .args(["--claim-cert", claim.cert.to_str().unwrap()])
        .args(["--claim-key", claim.key.to_str().unwrap()])
        .args(["--param", "Site=hall-9"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "iotctl onboard: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    gateway
        .iotd
        .wait_status("Provisioned as gw-p1; certificate")
        .await;
    let first = gateway.iotd.state()["identity"].clone();
    assert_eq!(first["installerParameters"]["Site"], "hall-9", "{first}");
    assert!(gateway.iotd.terminate().await.success());
    let bus = gateway.bus.as_ref().unwrap().address().to_owned();
    gateway.iotd = Iotd::start_with_config(
        &iotd_binary(),
        &gateway.config_path,
        &gateway.dir.path().join("state"),
        &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)],
    )
    .await;
    gateway.iotd.wait_status("READY=1").await;
    let out = run_iotctl(&bus, &["rotate", "--wait"]).await;
    assert!(
        out.status.success(),
        "iotctl rotate --wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = gateway.iotd.state()["identity"].clone();
    assert_ne!(rotated["certificateId"], first["certificateId"]);
    assert_eq!(
        rotated["installerParameters"]["Site"], "hall-9",
        "{rotated}"
    );
    let thing = &cloud.registry()["things"]["gw-p1"];
    assert_eq!(thing["attributes"]["site"], "hall-9", "{thing}");
    cloud.assert_active_and_attached(
        "gw-p1",
        rotated["certificateId"].as_str().unwrap(),
        "the rotated certificate",
    );
    // The generation's record keeps them too, for a state.json rebuilt from gen/.
    let record_path = gateway
        .dir
        .path()
        .join(format!("state/gen/{}/identity.json", rotated["generation"]));
    let record: Value = serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    assert_eq!(record["installerParameters"]["Site"], "hall-9", "{record}");
    assert!(gateway.iotd.terminate().await.success());
}

/// Twenty wrong codes (each a real `iotctl onboard`, the code's check digit valid so that it
/// reaches the gateway): each exits 1 saying the gateway did not prove it knows the code, with
/// the attempts left. Then the window is closed: a 21st, with the right code, is refused. It
/// stays closed across a restart (the count is in state.json) until a local `iotctl onboarding
/// open` (D-Bus), after which the right code onboards the gateway.
///
/// The first 19 go through the relay with `--binding none`, which lets the test end each
/// abandoned session at once (see the module's comment); the 20th goes straight to the gateway
/// with the default binding.
#[tokio::test]
async fn twenty_wrong_codes_close_the_window_until_a_person_opens_it_again() {
    let cloud = Cloud::start().await;
    let mut gateway = Gateway::start(&cloud, "w1", "", true).await;
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;
    let wrong = gateway.label.wrong_code();
    let window = gateway.window().await;
    assert_eq!(window["open"], true, "{window}");
    assert_eq!(window["attemptsLeft"], 20, "{window}");

    // Back to back: iotctl ends each session it cannot confirm, so the gateway is free for
    // the next try at once (no `busy`).
    let started = Instant::now();
    let mut times = Vec::new();
    for attempt in 1..=20 {
        let run = gateway
            .onboard(&gateway.target(), &wrong, &claim)
            .run()
            .await;
        times.push(run.took);
        run.assert_wrong_code(20 - attempt);
    }
    let twenty = started.elapsed();

    // The 21st, with the right code: the window is closed.
    let right = gateway.label.code.clone();
    let run = gateway
        .onboard(&gateway.target(), &right, &claim)
        .run()
        .await;
    let message = run.assert_refused("/v1/pair/params", 403, "window_closed");
    assert!(message.contains("window"), "{run}");
    assert_eq!(run.result["error"]["attempts_left"], 0, "{run}");
    times.sort();
    println!(
        "20 wrong codes with iotctl: {:.1} s, the gateway taking 10 pairings in a burst, then one \
         a second; one iotctl run (spawn to exit) took {} to {} ms, median {} ms",
        twenty.as_secs_f64(),
        times[0].as_millis(),
        times[times.len() - 1].as_millis(),
        times[times.len() / 2].as_millis()
    );

    let closed = |status: &Value| {
        assert_eq!(status["window"], "closed", "{status}");
        assert_eq!(status["attempts_left"], 0, "{status}");
        assert_eq!(status["phase"], "waiting", "{status}");
    };
    closed(&gateway.status().await);
    let window = gateway.window().await;
    assert_eq!(window["open"], false, "{window}");
    assert_eq!(window["attemptsLeft"], 0, "{window}");
    assert_eq!(
        gateway.iotd.state()["onboarding"]["attemptsUsed"],
        20,
        "the count is on disk"
    );
    gateway.assert_untouched(&cloud);

    // A restart does not open it.
    gateway.restart().await;
    closed(&gateway.status().await);
    let window = gateway.window().await;
    assert_eq!(window["open"], false, "{window}");
    let run = gateway
        .onboard(&gateway.target(), &right, &claim)
        .run()
        .await;
    run.assert_refused("/v1/pair/params", 403, "window_closed");

    // A person at the gateway opens it: a new count, and the right code onboards it.
    let out = gateway.ctl(&["onboarding", "open", "--for", "1m"]).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("onboarding window open until"), "{said}");
    let window = gateway.window().await;
    assert_eq!(window["open"], true, "{window}");
    assert_eq!(window["attemptsLeft"], 20, "{window}");
    let status = gateway.status().await;
    assert_eq!(status["window"], "open", "{status}");
    assert_eq!(status["attempts_left"], 20, "{status}");
    let run = gateway
        .onboard(&gateway.target(), &right, &claim)
        .run()
        .await;
    run.assert_connected();
    gateway
        .iotd
        .wait_status("Provisioned as gw-w1; certificate")
        .await;
    assert!(gateway.iotd.terminate().await.success());
}

/// A relay that terminates the CLI's TLS and opens its own connection to the gateway: with the
/// right code, the confirmation fails (the binding is the relay's certificate, not the
/// gateway's), iotctl stops before `/v1/pair/finish` with exit 1, the attempt is counted, and
/// no claim reaches the gateway. The same relay with a client that binds nothing (as a browser
/// must) pairs and onboards: the relay only relays, and the binding alone made the difference.
#[tokio::test]
async fn a_relay_that_re_terminates_tls_makes_the_cli_stop_before_the_claim() {
    let cloud = Cloud::start().await;
    let mut gateway = Gateway::start(&cloud, "r1", "", false).await;
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;
    let relay = Relay::start(gateway.addr()).await;
    let certificates = || {
        cloud
            .shared()
            .read(|reg| reg.certificates.keys().cloned().collect::<Vec<_>>())
    };
    let before = certificates();

    let right = gateway.label.code.clone();
    let run = gateway.onboard(&relay.target(), &right, &claim).run().await;
    run.assert_wrong_code(19);
    assert!(
        run.message()
            .contains("or someone in between (a relay that re-terminates TLS)"),
        "{run}"
    );
    let tls = run.events("tls");
    assert_eq!(
        tls[0]["certificate_sha256"],
        sha256_hex(&relay.leaf),
        "iotctl saw the relay's certificate: {run}"
    );
    // Counted, and nothing handed over.
    let status = gateway.wait_open(19).await;
    assert_eq!(status["phase"], "waiting", "{status}");
    assert_eq!(certificates(), before, "no certificate was issued");
    gateway.assert_untouched(&cloud);

    // iotctl ended the session it could not confirm: the gateway no longer holds it (and is
    // free for the next client at once).
    assert_eq!(relay.probe_sessions().await, [404]);
    // The same relay, no binding: the relay only relays.
    let run = gateway
        .onboard(&relay.target(), &right, &claim)
        .arg(&["--binding", "none"])
        .run()
        .await;
    run.assert_connected();
    gateway
        .iotd
        .wait_status("Provisioned as gw-r1; certificate")
        .await;
    assert!(gateway.iotd.terminate().await.success());
}

/// A claim that expires before the gateway uses it (the installer took more than its 5
/// minutes: the fake's clock moves on after CreateProvisioningClaim): iotctl hands it over
/// (nothing warns, by its clock it is valid), the gateway connects with it, AWS refuses the
/// expired certificate, and iotctl exits 1 with the gateway's reason. The gateway waits for
/// another claim with its window open again and a new count, and a fresh claim onboards it.
#[tokio::test]
async fn an_expired_claim_is_refused_by_aws_and_the_refusal_is_reported() {
    let cloud = Cloud::start().await;
    let mut gateway = Gateway::start(&cloud, "x1", "", false).await;
    let expired = new_claim(&cloud, gateway.dir.path(), "expired").await;
    cloud.shared().clock.advance(301);

    let right = gateway.label.code.clone();
    let run = gateway
        .onboard(&gateway.target(), &right, &expired)
        .run()
        .await;
    assert_eq!(run.exit, Some(1), "{run}");
    assert!(!run.stderr.contains("warning"), "{run}");
    assert_eq!(run.events("claim-accepted").len(), 1, "handed over: {run}");
    assert_eq!(run.result["result"], "failed", "{run}");
    let message = run.message();
    assert!(
        message.contains(
            "onboarding failed on the gateway (claim-expired): claim certificate handed over by \
             the installer expired at"
        ) && message.contains("(AWS IoT refused it)"),
        "{run}"
    );

    let status = gateway
        .wait_for("the claim's failure", |s| s["phase"] == "failed")
        .await;
    assert_eq!(status["error"]["code"], "claim-expired", "{status}");
    assert_eq!(status["window"], "open", "{status}");
    assert_eq!(status["attempts_left"], 20, "a new count: {status}");
    let state = gateway.iotd.state();
    assert_eq!(state["lastError"]["code"], "claim-expired", "{state}");
    assert!(state["identity"].is_null(), "{state}");

    // Another installer, a fresh claim. iotctl reads /v1/events right after the gateway's ack:
    // the first event must be this claim's progress, not the previous claim's failure.
    cloud.shared().clock.advance(-301);
    let fresh = new_claim(&cloud, gateway.dir.path(), "fresh").await;
    let run = gateway
        .onboard(&gateway.target(), &right, &fresh)
        .run()
        .await;
    run.assert_connected();
    gateway
        .iotd
        .wait_status("Provisioned as gw-x1; certificate")
        .await;
    assert!(gateway.iotd.terminate().await.success());
}

/// The gateway's clock is 10 minutes ahead (no NTP yet): a claim AWS has just issued, valid 5
/// minutes by AWS's clock, looks 5 minutes expired to it, and to iotctl on the same wrong time,
/// which warns and hands it over. The
/// gateway must not refuse it by its own clock (profile §5.6, "Expired claim"): it uses the
/// claim at once, and AWS, whose clock is right, takes it.
#[tokio::test]
async fn a_claim_that_only_the_gateways_clock_thinks_expired_is_used() {
    let cloud = Cloud::start().await;
    let mut gateway = Gateway::start(&cloud, "k1", "", false).await;
    // AWS's time is 10 minutes behind the gateway's (and this computer's).
    cloud.shared().clock.advance(-600);
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;

    let right = gateway.label.code.clone();
    let run = gateway
        .onboard(&gateway.target(), &right, &claim)
        .run()
        .await;
    assert!(
        run.stderr
            .contains("warning: by this computer's clock the claim certificate expired"),
        "{run}"
    );
    assert_eq!(run.events("claim-accepted").len(), 1, "handed over: {run}");
    run.assert_connected();
    gateway
        .iotd
        .wait_status("Provisioned as gw-k1; certificate")
        .await;
    assert!(gateway.iotd.terminate().await.success());
}

/// A claim naming a template the gateway does not allow, or a parameter its configuration
/// does not let an installer supply: paired (an attempt each), the bundle opened and refused
/// (`422 claim_invalid` with the reason), and the gateway keeps waiting with its window open.
/// A key that is not the claim certificate's is refused by iotctl before the network (exit 2),
/// which leaves the attempts as they were. Then an allowed claim onboards the gateway.
#[tokio::test]
async fn claims_the_gateway_does_not_allow_are_refused_and_it_keeps_waiting() {
    let cloud = Cloud::start().await;
    let mut gateway = Gateway::start(&cloud, "n1", "", false).await;
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;
    let right = gateway.label.code.clone();
    let target = gateway.target();
    // The phase /v1/status shows after each refusal; checked last, so that the rest runs.
    let mut phases = Vec::new();

    gateway
        .claim_refused(&claim, &["--template", "other"], &["template", "other"])
        .await;
    phases.push(gateway.wait_open(19).await["phase"].clone());

    gateway
        .claim_refused(&claim, &["--param", "Nope=x"], &["Nope"])
        .await;
    phases.push(gateway.wait_open(18).await["phase"].clone());

    let other = new_claim(&cloud, gateway.dir.path(), "other").await;
    let mixed = ClaimFiles {
        cert: claim.cert.clone(),
        key: other.key.clone(),
    };
    let run = gateway.onboard(&target, &right, &mixed).run().await;
    assert_eq!(run.exit, Some(2), "{run}");
    assert_eq!(run.result["result"], "usage", "{run}");
    assert!(
        run.message().contains("the gateway would refuse them"),
        "{run}"
    );
    assert!(
        run.events("tls").is_empty(),
        "nothing went to the network: {run}"
    );
    phases.push(gateway.wait_open(18).await["phase"].clone());
    gateway.assert_untouched(&cloud);

    let run = gateway
        .onboard(&target, &right, &claim)
        .arg(&["--param", "Site=dock-2"])
        .run()
        .await;
    run.assert_connected();
    gateway
        .iotd
        .wait_status("Provisioned as gw-n1; certificate")
        .await;
    assert_eq!(
        cloud.registry()["things"]["gw-n1"]["attributes"]["site"],
        "dock-2"
    );
    assert!(gateway.iotd.terminate().await.success());
    assert!(
        phases.iter().all(|p| p == "waiting"),
        "after each refused claim the gateway waits, and /v1/status must say so: {phases:?}"
    );
}

/// `iotctl onboarding close` on a gateway waiting for a claim: the window is closed, and
/// `iotctl onboard` with the right code is refused (`403 window_closed`, exit 1) without an
/// attempt being counted.
#[tokio::test]
async fn a_window_closed_by_hand_refuses_pairing() {
    let cloud = Cloud::start().await;
    let mut gateway = Gateway::start(&cloud, "c1", "", true).await;
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;
    let out = gateway.ctl(&["onboarding", "close"]).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("onboarding window closed"), "{said}");

    let window = gateway.window().await;
    assert_eq!(window["open"], false, "{window}");
    let status = gateway.status().await;
    assert_eq!(status["window"], "closed", "{status}");
    let right = gateway.label.code.clone();
    let run = gateway
        .onboard(&gateway.target(), &right, &claim)
        .run()
        .await;
    run.assert_refused("/v1/pair/params", 403, "window_closed");
    gateway.assert_untouched(&cloud);
    assert!(gateway.iotd.terminate().await.success());
}

/// While one installer is paired (the relay holds its `/v1/claim`), a second `iotctl onboard`
/// with the right code is refused as busy (exit 1, `409 busy`) and costs no attempt; the first
/// then hands over its claim and the gateway is onboarded.
#[tokio::test]
async fn a_second_client_is_busy_while_one_is_pairing() {
    let cloud = Cloud::start().await;
    let mut gateway = Gateway::start(&cloud, "b1", "", false).await;
    let claim = new_claim(&cloud, gateway.dir.path(), "claim").await;
    let gate = Arc::new(Gate {
        marker: b"POST /v1/claim ",
        reached: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    });
    let relay = Relay::with_gate(gateway.addr(), Some(gate)).await;
    let right = gateway.label.code.clone();

    let first = gateway
        .onboard(&relay.target(), &right, &claim)
        .arg(&["--binding", "none"])
        .spawn();
    relay.held().await;
    let status = gateway
        .wait_for("the first client paired", |s| s["phase"] == "paired")
        .await;
    assert_eq!(status["attempts_left"], 19, "{status}");

    let second = gateway
        .onboard(&gateway.target(), &right, &claim)
        .run()
        .await;
    let message = second.assert_refused("/v1/pair/params", 409, "busy");
    assert!(message.contains("Another installer is pairing"), "{second}");
    assert_eq!(second.result["error"]["attempts_left"], 19, "{second}");

    relay.release();
    let first = Run::of(first.0, first.1).await;
    first.assert_connected();
    gateway
        .iotd
        .wait_status("Provisioned as gw-b1; certificate")
        .await;
    assert!(gateway.iotd.terminate().await.success());
}

/// Two fakes on the same port: `home`, the gateway's configured endpoint (`localhost`, on
/// 127.0.0.1), and `other` on 127.0.0.2, standing for another account's or region's endpoint
/// that the gateway's configuration allows (`onboarding.allowed_endpoints`). The gateway trusts
/// both fakes' root CAs (one bundle, as Amazon's roots serve every region). `other` takes
/// ClientHellos without SNI: it is addressed by IP, for which TLS sends none.
async fn two_endpoints(serial: &str) -> (Cloud, Cloud, Gateway) {
    let home = Cloud::start().await;
    let at = SocketAddr::from(([127, 0, 0, 2], home.mqtt_port()));
    // rustls sends no SNI for an IP address, which AWS (and the fake, by default) refuses.
    let other = Cloud::start_on(at, |s| {
        s.server_names = vec!["127.0.0.2".to_owned()];
        s.require_sni = false;
    })
    .await;
    let gateway = Gateway::start_adjusted(&home, serial, "", false, |dir, config| {
        let roots = dir.join("roots.pem");
        let both = [home.root_ca(), other.root_ca()]
            .map(|path| std::fs::read_to_string(path).unwrap())
            .concat();
        std::fs::write(&roots, both).unwrap();
        let config = config.replace(home.root_ca(), roots.to_str().unwrap());
        format!("{config}allowed_endpoints = [\"127.0.0.2\"]\n")
    })
    .await;
    (home, other, gateway)
}

/// The fake's CONNECTs (client ids), in order.
fn connects(cloud: &Cloud) -> Vec<String> {
    cloud
        .log()
        .into_iter()
        .filter(|e| e.kind == "connect")
        .map(|e| e.client_id)
        .collect()
}

/// A claim the installer made for another endpoint the gateway allows (`iotctl onboard
/// --endpoint`): the thing and its certificate are made there, and the identity remembers it.
/// After a restart, and after a restart that finds state.json gone (rebuilt from `gen/`), the
/// gateway connects to that endpoint again, never to its configured one. An endpoint the
/// gateway does not allow is refused first.
#[tokio::test]
async fn a_claim_for_another_allowed_endpoint_makes_the_identity_there_and_it_stays() {
    let (home, other, mut gateway) = two_endpoints("x1").await;
    let claim = new_claim(&other, gateway.dir.path(), "claim").await;
    let (target, code) = (gateway.target(), gateway.label.code.clone());

    gateway
        .claim_refused(
            &claim,
            &["--endpoint", "127.0.0.9"],
            &["127.0.0.9", "127.0.0.2"],
        )
        .await;
    gateway.wait_open(19).await;

    let run = gateway
        .onboard(&target, &code, &claim)
        .arg(&["--endpoint", "127.0.0.2"])
        .run()
        .await;
    run.assert_connected();
    gateway
        .iotd
        .wait_status("Provisioned as gw-x1; certificate")
        .await;
    let state = gateway.iotd.state();
    assert_eq!(state["identity"]["endpoint"], "127.0.0.2", "{state}");
    let generation = state["identity"]["generation"].as_u64().unwrap();
    let record: Value = serde_json::from_slice(
        &std::fs::read(
            gateway
                .iotd
                .state_dir
                .join(format!("gen/{generation}/identity.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(record["endpoint"], "127.0.0.2", "{record}");
    assert!(other.registry()["things"]["gw-x1"].is_object());
    assert!(home.registry()["things"].get("gw-x1").is_none());

    // A restart, then one without state.json: both connect to where the identity is.
    for lose_state in [false, true] {
        let before = connects(&other).len();
        assert!(gateway.iotd.terminate().await.success());
        if lose_state {
            std::fs::remove_file(gateway.iotd.state_dir.join("state.json")).unwrap();
        }
        gateway.iotd = Iotd::start_with_config(
            &iotd_binary(),
            &gateway.config_path,
            &gateway.dir.path().join("state"),
            &[],
        )
        .await;
        gateway
            .iotd
            .wait_status("Provisioned as gw-x1; certificate valid until")
            .await;
        let after = connects(&other);
        assert_eq!(after[before..], ["gw-x1"], "{after:?}");
        assert_eq!(gateway.iotd.state()["identity"]["endpoint"], "127.0.0.2");
    }
    assert_eq!(connects(&home), Vec::<String>::new());
    assert!(gateway.iotd.terminate().await.success());
}

/// The installer's first claim was for another endpoint, where the certificate was issued but
/// RegisterThing kept failing; iotd restarted (the claim is lost with it) and a second
/// installer's claim is for the configured endpoint. The certificate of the first endpoint is
/// not offered there: the gateway asks its configured endpoint for a new one, registers it,
/// and records the first as abandoned.
#[tokio::test]
async fn a_certificate_from_one_endpoint_is_not_registered_with_a_claim_for_another() {
    let (home, other, mut gateway) = two_endpoints("x2").await;
    other.add_fault(
        json!({"api": "RegisterThing", "action": "reject", "statusCode": 503,
        "errorCode": "ServiceUnavailable", "errorMessage": "held", "count": 1000}),
    );
    let (target, code) = (gateway.target(), gateway.label.code.clone());
    let first = new_claim(&other, gateway.dir.path(), "first").await;
    let (child, _) = gateway
        .onboard(&target, &code, &first)
        .arg(&["--endpoint", "127.0.0.2", "--timeout", "60"])
        .spawn();
    gateway
        .iotd
        .wait_status("Provisioning (certificate-issued); retrying")
        .await;
    let state = gateway.iotd.state();
    let step = &state["operation"]["step"];
    assert_eq!(step["endpoint"], "127.0.0.2", "{state}");
    assert_eq!(state["operation"]["claim"], "network", "{state}");
    let abandoned = step["certificateId"].as_str().unwrap().to_owned();
    drop(child);

    gateway.restart().await;
    assert!(
        gateway
            .iotd
            .seen
            .iter()
            .any(|l| l.contains("lost in a restart")),
        "{:?}",
        gateway.iotd.seen
    );
    gateway
        .wait_for("an open window", |s| s["window"] == "open")
        .await;
    let second = new_claim(&home, gateway.dir.path(), "second").await;
    gateway
        .onboard(&target, &code, &second)
        .run()
        .await
        .assert_connected();
    gateway
        .iotd
        .wait_status("Provisioned as gw-x2; certificate")
        .await;
    let state = gateway.iotd.state();
    assert!(state["identity"].get("endpoint").is_none(), "{state}");
    assert_ne!(state["identity"]["certificateId"], abandoned.as_str());
    assert!(
        state["abandonedCertificates"]
            .as_array()
            .unwrap()
            .contains(&json!(abandoned)),
        "{state}"
    );
    assert!(home.registry()["things"]["gw-x2"].is_object());
    assert!(other.registry()["things"].get("gw-x2").is_none());
    assert!(gateway.iotd.terminate().await.success());
}
