//! Trusted-user onboarding as an installer does it, for the demo, the benchmark and tests: a
//! gateway configured with `[onboarding]` and no claim of its own, its record and label made by
//! `iotctl onboarding register`, a 5-minute claim from fake-iot-core's CreateProvisioningClaim
//! over AWS's REST path, and `iotctl onboard --json` run with each line it prints timestamped on
//! arrival. Starting iotd is left to the caller (each keeps iotd's log its own way); `wait_open`
//! waits for the gateway to be ready for the installer.
//!
//! Errors, not panics: the demo and the benchmark report a failed step and clean up.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::swtpm::Swtpm;
use crate::{Cloud, Iotd};

/// The fake's provisioning template the gateway registers with.
pub const TEMPLATE: &str = "gateway";

/// The template parameter the installer supplies (`--param Site=…`); the gateway's
/// configuration lets an installer set it and no other.
pub const INSTALLER_PARAMETER: &str = "Site";

/// A gateway set up for onboarding: its configuration written, nothing started.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The provisioning parameter SerialNumber; the thing is `gw-<serial>`.
    pub serial: String,
    /// The serial on the label (`onboarding.serial`): `GW-<serial>`.
    pub label_serial: String,
    pub thing: String,
    /// Where the onboarding server listens (127.0.0.1, a port free when chosen).
    pub listen: SocketAddr,
    /// `<dir>/config.toml`, where `Iotd::start` would write it too.
    pub config_path: PathBuf,
    /// `<dir>/state`.
    pub state_dir: PathBuf,
}

/// The label `iotctl onboarding register` printed.
#[derive(Debug, Clone)]
pub struct Label {
    pub serial: String,
    /// XXXX-XXXX-XXXX-XXXX.
    pub code: String,
    /// `IOTD1:<serial>:<16 digits>`, what `iotctl onboard --qr` takes.
    pub qr: String,
}

impl Gateway {
    /// Writes the configuration of gateway `serial` into `dir`: the cloud, no claim files, the
    /// key in `tpm` (else a file), onboarding on 127.0.0.1 with Site as the installer's
    /// parameter.
    pub fn new(cloud: &Cloud, dir: &Path, serial: &str, tpm: Option<&Swtpm>) -> Result<Gateway> {
        let listen = free_port().context("choosing the onboarding port")?;
        let gateway = Gateway {
            serial: serial.to_owned(),
            label_serial: format!("GW-{serial}"),
            thing: format!("gw-{serial}"),
            listen,
            config_path: dir.join("config.toml"),
            state_dir: dir.join("state"),
        };
        let config = gateway.config(cloud, tpm);
        std::fs::write(&gateway.config_path, config)
            .with_context(|| format!("writing {}", gateway.config_path.display()))?;
        Ok(gateway)
    }

    /// iotd's configuration: `crate::config`'s, without `claim_certificate` and `claim_key`.
    fn config(&self, cloud: &Cloud, tpm: Option<&Swtpm>) -> String {
        let key = tpm.map_or_else(
            || "backend = \"file\"".to_owned(),
            |t| format!("backend = \"tpm\"\ntcti = \"{}\"", t.tcti()),
        );
        format!(
            r#"[cloud]
endpoint = "localhost"
port = {port}
ca_bundle = "{ca}"
reply_timeout_secs = 5

[provisioning]
template = "{TEMPLATE}"
claim_client_id = "claim-{serial}"

[provisioning.parameters]
SerialNumber = "{serial}"

[state]
dir = "{state}"

[key]
{key}

[onboarding]
serial = "{label_serial}"
listen = "{listen}"
installer_parameters = ["{INSTALLER_PARAMETER}"]
"#,
            port = cloud.mqtt_port(),
            ca = cloud.root_ca(),
            serial = self.serial,
            state = self.state_dir.display(),
            label_serial = self.label_serial,
            listen = self.listen,
        )
    }

    /// `iotctl --config … onboarding register`, as on the production line (as root: it writes
    /// the record into the state directory); returns the label it printed.
    pub fn register(&self, iotctl: &Path) -> Result<Label> {
        let out = std::process::Command::new(iotctl)
            .arg("--config")
            .arg(&self.config_path)
            .args(["onboarding", "register"])
            .output()
            .with_context(|| format!("running {} onboarding register", iotctl.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "iotctl onboarding register for {} exited with {}: {}{stdout}",
                self.label_serial,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let field = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .ok_or_else(|| {
                    anyhow!("no {name:?} in iotctl onboarding register's label: {stdout}")
                })
        };
        Ok(Label {
            serial: field("Serial:")?,
            code: field("Setup code:")?,
            qr: field("QR payload:")?,
        })
    }

    /// The PBKDF2 iterations of the registered record (`onboarding.json`), which the installer's
    /// client runs.
    pub fn pbkdf_iterations(&self) -> Result<u64> {
        let path = self.state_dir.join("onboarding.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let record: Value = serde_json::from_str(&text)
            .with_context(|| format!("reading {} as JSON", path.display()))?;
        record["iterations"]
            .as_u64()
            .ok_or_else(|| anyhow!("{} has no iterations", path.display()))
    }

    /// `HOST:PORT` for `iotctl onboard`.
    pub fn address(&self) -> String {
        self.listen.to_string()
    }
}

/// A port on 127.0.0.1 nothing listens on now.
pub fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?)
}

/// Waits until iotd says it waits for a claim and is ready (READY=1: its listeners, the
/// onboarding server's among them, are bound), then checks that the onboarding server takes a
/// connection on `listen` (iotd runs on without it when it cannot start, and says why only in
/// its log); an error when it gives up or `limit` passes. Returns the "Waiting for …" status
/// line.
pub async fn wait_open(iotd: &mut Iotd, listen: SocketAddr, limit: Duration) -> Result<String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut waiting = iotd
        .seen
        .iter()
        .find(|l| l.starts_with("STATUS=Waiting for"))
        .cloned();
    let mut ready = iotd.seen.iter().any(|l| l == "READY=1");
    while !(ready && waiting.is_some()) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some((_, line)) = iotd.next_line(left).await else {
            bail!(
                "iotd did not say READY=1 and \"Waiting for a claim\" within {} s; its lines: \
                 {:?}",
                limit.as_secs(),
                iotd.seen
            );
        };
        if line.starts_with("STATUS=Failed at ") {
            bail!("iotd gave up before a claim was handed over: {line}");
        }
        if line.starts_with("STATUS=Waiting for") {
            waiting = Some(line);
        } else if line == "READY=1" {
            ready = true;
        }
    }
    tokio::net::TcpStream::connect(listen)
        .await
        .with_context(|| {
            format!(
                "iotd is ready, but its onboarding server does not take a connection on \
                 {listen} (iotd's log says why)"
            )
        })?;
    Ok(waiting.unwrap_or_default())
}

/// A claim from CreateProvisioningClaim, its certificate and key in files.
#[derive(Debug, Clone)]
pub struct ProvisioningClaim {
    pub certificate_id: String,
    pub certificate: PathBuf,
    /// Mode 0600.
    pub key: PathBuf,
    /// When the claim expires (Unix seconds, the fake's `expiration`).
    pub expiration: i64,
}

/// How long a claim from the fake's CreateProvisioningClaim lives, as in AWS (5 minutes).
pub const CLAIM_LIFETIME_SECS: i64 = fake_iot_core::control::CLAIM_LIFETIME_SECS;

/// CreateProvisioningClaim as the installer's app calls it: `POST
/// /provisioning-templates/<template>/provisioning-claim` on the fake's control plane (AWS's
/// REST path). The certificate and key go into `dir` (`claim.pem`, `claim.key`).
pub async fn create_provisioning_claim(
    cloud: &Cloud,
    template: &str,
    dir: &Path,
) -> Result<ProvisioningClaim> {
    let path = format!("/provisioning-templates/{template}/provisioning-claim");
    let answer = post(cloud, &path)
        .await
        .with_context(|| format!("CreateProvisioningClaim (POST {path})"))?;
    let text = |pointer: &str| {
        answer
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("CreateProvisioningClaim's answer has no {pointer}: {answer}"))
    };
    let certificate = dir.join("claim.pem");
    let key = dir.join("claim.key");
    std::fs::write(&certificate, text("/certificatePem")?)
        .with_context(|| format!("writing {}", certificate.display()))?;
    write_secret(&key, &text("/keyPair/PrivateKey")?)?;
    Ok(ProvisioningClaim {
        certificate_id: text("/certificateId")?,
        certificate,
        key,
        expiration: answer["expiration"].as_i64().ok_or_else(|| {
            anyhow!("CreateProvisioningClaim's answer has no expiration: {answer}")
        })?,
    })
}

/// A file only its owner may read, as a private key should be.
fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// An HTTP POST with an empty body to the fake's control plane; its JSON answer.
async fn post(cloud: &Cloud, path: &str) -> Result<Value> {
    use http_body_util::{BodyExt as _, Empty};
    let base = cloud.ready["http"]
        .as_str()
        .ok_or_else(|| anyhow!("the fake's ready line has no http address: {}", cloud.ready))?;
    let client: hyper_util::client::legacy::Client<_, Empty<hyper::body::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let request = hyper::Request::post(format!("{base}{path}")).body(Empty::new())?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).context("reading the answer as JSON")
}

/// One line `iotctl onboard --json` printed, and when it arrived.
#[derive(Debug, Clone)]
pub struct OnboardLine {
    /// Since just before iotctl was spawned.
    pub at: Duration,
    pub json: Value,
}

impl OnboardLine {
    /// `event` (`tls`, `params`, `paired`, `claim-accepted`, `phase`), or `result` for the
    /// last line.
    pub fn kind(&self) -> &str {
        if self.json.get("result").is_some() {
            return "result";
        }
        self.json["event"].as_str().unwrap_or("?")
    }

    /// A `phase` event's phase (`claim-received`, …, `connected`).
    pub fn phase(&self) -> Option<&str> {
        self.json["phase"].as_str()
    }
}

/// `iotctl onboard … --json` running, its lines read as they come.
pub struct Onboard {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
    started: Instant,
    /// Every line so far.
    pub seen: Vec<OnboardLine>,
}

impl Onboard {
    /// Spawns `iotctl onboard <gateway> --qr <qr> --claim-cert … --claim-key … --param … --json`
    /// (`params`: NAME=VALUE). The time of each line counts from just before the spawn.
    pub fn spawn(
        iotctl: &Path,
        gateway: &str,
        qr: &str,
        claim: &ProvisioningClaim,
        params: &[&str],
    ) -> Result<Onboard> {
        let mut command = Command::new(iotctl);
        command
            .args(["onboard", gateway, "--qr", qr, "--json"])
            .arg("--claim-cert")
            .arg(&claim.certificate)
            .arg("--claim-key")
            .arg(&claim.key);
        for param in params {
            command.args(["--param", param]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} onboard", iotctl.display()))?;
        let stdout = child.stdout.take().context("iotctl's stdout")?;
        let mut stderr = child.stderr.take().context("iotctl's stderr")?;
        // Read apart from stdout, so that a chatty stderr never blocks iotctl.
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        Ok(Onboard {
            child,
            lines: BufReader::new(stdout).lines(),
            stderr,
            started,
            seen: Vec::new(),
        })
    }

    /// The next line (None once iotctl closed its stdout); an error when none comes before
    /// `deadline` or a line is not JSON.
    pub async fn next(&mut self, deadline: Instant) -> Result<Option<OnboardLine>> {
        let line = tokio::time::timeout_at(deadline.into(), self.lines.next_line())
            .await
            .map_err(|_| {
                anyhow!(
                    "iotctl onboard printed nothing more in time; its lines so far: {:?}",
                    self.seen.iter().map(|l| &l.json).collect::<Vec<_>>()
                )
            })?
            .context("reading iotctl onboard's output")?;
        let Some(line) = line else {
            return Ok(None);
        };
        let at = self.started.elapsed();
        let json = serde_json::from_str(&line).with_context(|| {
            format!("iotctl onboard --json printed a line that is not JSON: {line}")
        })?;
        let line = OnboardLine { at, json };
        self.seen.push(line.clone());
        Ok(Some(line))
    }

    /// Reads the remaining lines and waits for iotctl to exit (until `deadline`, then it is
    /// killed); its result line (`{"result", …}`) when it exited 0 with `"result":
    /// "connected"`, else an error with what it printed.
    pub async fn finish(mut self, deadline: Instant) -> Result<Value> {
        let read = async {
            while self.next(deadline).await?.is_some() {}
            let status = tokio::time::timeout_at(deadline.into(), self.child.wait())
                .await
                .map_err(|_| anyhow!("iotctl onboard did not exit in time"))?
                .context("waiting for iotctl onboard")?;
            Ok::<ExitStatus, anyhow::Error>(status)
        };
        let status = match read.await {
            Ok(status) => status,
            Err(e) => {
                // kill_on_drop would too; now, so that its stderr ends and can be shown.
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                let stderr = self.stderr.await.unwrap_or_default();
                return Err(e.context(format!("iotctl onboard's stderr: {}", stderr.trim())));
            }
        };
        let stderr = self.stderr.await.unwrap_or_default();
        let result = self
            .seen
            .last()
            .filter(|l| l.kind() == "result")
            .map(|l| l.json.clone());
        match result {
            Some(result) if status.success() && result["result"] == "connected" => Ok(result),
            _ => bail!(
                "iotctl onboard exited with {status}: {result:?}; stderr: {}",
                stderr.trim()
            ),
        }
    }
}

/// The instant of the first line of iotd's log (tracing's default format: an RFC 3339 UTC
/// time, microseconds, then the level) that contains `marker`, as Unix seconds. iotd stamps
/// its lines itself when it does not run under the journal, as in the harness.
pub fn log_instant(log: &Path, marker: &str) -> Result<f64> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let line = text
        .lines()
        .find(|l| l.contains(marker))
        .ok_or_else(|| anyhow!("no {marker:?} in {}", log.display()))?;
    let stamp = line.split_whitespace().next().unwrap_or_default();
    let time = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("reading the time of iotd's log line {line:?}"))?;
    Ok(time.unix_timestamp_nanos() as f64 / 1e9)
}

/// iotd's log line when it takes the installer's claim (the bundle opened and checked).
pub const LOG_CLAIM_RECEIVED: &str = "onboarding: received the installer's claim";
/// iotd's log line when it is connected with the certificate it was issued.
pub const LOG_CONNECTED: &str = "provisioned: connected with the issued certificate";
