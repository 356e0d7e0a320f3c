//! Runs iotd against fake-iot-core: fake-iot-core in this process (its library, on random ports, with the
//! gateway template and a factory claim), and the real `iotd` binary as a child process with a
//! private NOTIFY_SOCKET whose STATUS= lines tell the test what the agent is doing. Everything
//! waits on events (STATUS lines, the fake's message log), never on a fixed time.
// A test harness: a failure to set up is a failed test, and panicking with the cause is the
// clearest way to say so.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod avahi;
pub mod dbus_daemon;
pub mod onboarding;
pub mod pki;
pub mod swtpm;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use fake_iot_core::faults::FaultRule;
use fake_iot_core::run::{Options, Running};
use fake_iot_core::server::{LogEntry, Shared, lock};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(30);

pub fn gateway_template() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fake-iot-core/templates/gateway.json")
}

/// A release binary of this workspace (`iotd`, `iotctl`) for the demo and the benchmarks: in
/// `target/release/` (the program itself is in `target/tools/`), else next to the program. The
/// release one first: a `tools` build of iotd beside the program would be measured as release.
pub fn release_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let here = exe.with_file_name(name);
    let release = exe
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("release").join(name));
    [release, Some(here)]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no release {name} next to {} or in its target/release/: build it with \
                 `cargo build --release -p {name}` (make demo and make bench do)",
                exe.display()
            )
        })
}

/// The `iotd` binary of the build running this test: `target/<profile>/iotd`, beside the test
/// executable's `deps/` directory (cargo builds it for every test of the workspace).
pub fn iotd_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join("iotd");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p iotd, or run cargo test --workspace)",
        path.display()
    );
    path
}

/// iotctl, built beside iotd (`cargo test --workspace` builds both).
pub fn iotctl_binary() -> PathBuf {
    let path = iotd_binary().with_file_name("iotctl");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p iotctl, or run cargo test --workspace)",
        path.display()
    );
    path
}

/// Runs iotctl with `args` on the system bus at `bus_address`; its output, whatever its exit.
pub async fn run_iotctl(bus_address: &str, args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(iotctl_binary())
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT * 2, out)
        .await
        .unwrap_or_else(|_| panic!("iotctl {args:?} did not finish"))
        .unwrap()
}

/// The D-Bus policy the package ships (`/usr/share/dbus-1/system.d/io.iotd.Agent1.conf`).
pub fn dbus_policy_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../packaging/dbus/io.iotd.Agent1.conf")
}

/// Test-only D-Bus policy: the test process (root) may own iotd's name. Never in the shipped
/// file, which lets only user `iotd` own it.
pub const ROOT_MAY_OWN: &str = r#"<policy user="root"><allow own="io.iotd.Agent1"/></policy>"#;

/// `nproc` × the CPU's model name, for benchmark reports.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown CPU");
    format!("{cpus} × {model}")
}

/// The cloud side: fake-iot-core running in this test's runtime.
pub struct Cloud {
    running: Option<Running>,
    pub ready: Value,
    pub dir: tempfile::TempDir,
}

impl Cloud {
    pub async fn start() -> Cloud {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut fake_iot_core::Settings)) -> Cloud {
        Self::start_on("127.0.0.1:0".parse().unwrap(), adjust).await
    }

    /// The fake with its MQTT listener on `mqtt` (the others on random ports of 127.0.0.1):
    /// a second fake on another loopback address, same port, stands for another account's or
    /// region's endpoint (`adjust` names that address in its certificate, `server_names`).
    pub async fn start_on(
        mqtt: std::net::SocketAddr,
        adjust: impl FnOnce(&mut fake_iot_core::Settings),
    ) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = fake_iot_core::Settings::new(dir.path().join("cloud"));
        adjust(&mut settings);
        Self::start_at(dir, settings, mqtt).await
    }

    /// The fake with the state (CA, registry) of an earlier run, copied from `state` (a test
    /// fixture) into a temp dir, so that certificates it issued then are still known.
    pub async fn start_from(state: &Path) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(state, &dir.path().join("cloud"));
        let settings = fake_iot_core::Settings::new(dir.path().join("cloud"));
        Self::start_at(dir, settings, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_at(
        dir: tempfile::TempDir,
        settings: fake_iot_core::Settings,
        mqtt: std::net::SocketAddr,
    ) -> Cloud {
        let any = "127.0.0.1:0".parse().unwrap();
        let options = Options {
            settings,
            mqtt,
            mqtt_alpn: any,
            http: any,
            templates: vec![("gateway".into(), gateway_template().display().to_string())],
            claims: vec![("factory".into(), "gateway".into())],
        };
        let running = fake_iot_core::run::start(options).await.unwrap();
        let ready = running.ready.clone();
        Cloud {
            running: Some(running),
            ready,
            dir,
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.running.as_ref().unwrap().shared
    }

    pub fn mqtt_port(&self) -> u16 {
        self.ready["mqtt"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn root_ca(&self) -> &str {
        self.ready["rootCa"].as_str().unwrap()
    }

    pub fn claim(&self) -> (String, String) {
        let c = &self.ready["claims"]["factory"];
        (
            c["cert"].as_str().unwrap().to_owned(),
            c["key"].as_str().unwrap().to_owned(),
        )
    }

    pub fn add_fault(&self, rule: Value) -> u64 {
        let rule: FaultRule = serde_json::from_value(rule).unwrap();
        lock(&self.shared().faults).add(rule)
    }

    pub fn clear_faults(&self) {
        lock(&self.shared().faults).clear();
    }

    pub fn registry(&self) -> Value {
        self.shared().read(|reg| serde_json::to_value(reg).unwrap())
    }

    pub fn log(&self) -> Vec<LogEntry> {
        self.shared().log_entries()
    }

    /// Waits for a log entry; panics with the log when none comes.
    pub async fn wait_log(&self, what: &str, matches: impl Fn(&LogEntry) -> bool) -> LogEntry {
        match self.shared().wait_for_log(WAIT, matches).await {
            Some(e) => e,
            None => panic!("no {what} in the fake's log: {:#?}", self.log()),
        }
    }

    /// A request to the fake's HTTP API (control plane, `/_fake/`): the status and the JSON
    /// answer (`Null` when the body is not JSON).
    pub async fn http(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        use http_body_util::{BodyExt as _, Full};
        let client: hyper_util::client::legacy::Client<_, Full<hyper::body::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let url = format!("{}{path}", self.ready["http"].as_str().unwrap());
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(Full::new(hyper::body::Bytes::from(bytes)))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Certificate `id` is ACTIVE and attached to `thing` (`what` says when, for the message).
    pub fn assert_active_and_attached(&self, thing: &str, id: &str, what: &str) {
        let registry = self.registry();
        assert_eq!(
            registry["certificates"][id]["status"], "ACTIVE",
            "{what}: {registry:#}"
        );
        assert!(
            self.principals(thing).iter().any(|p| p.contains(id)),
            "{what}: {id} is not attached to {thing}: {registry:#}"
        );
    }

    /// The principals of a thing.
    pub fn principals(&self, thing: &str) -> Vec<String> {
        self.registry()["things"][thing]["principals"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

/// Copies the directory tree `from` to `to` (files and directories; modes kept).
/// The generation and certificate id of the identity in a `state.json` (0 and "" without one).
pub fn identity_of(state: &Value) -> (u64, String) {
    (
        state["identity"]["generation"].as_u64().unwrap_or(0),
        state["identity"]["certificateId"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Waits until `dir` is gone: iotd removes a generation's key and files in the background after
/// state.json is written, and says so nowhere a test could wait on, so it is looked at every
/// 50 ms until `WAIT`.
pub async fn wait_gone(dir: &Path) {
    let deadline = std::time::Instant::now() + WAIT;
    while dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} is still there after {WAIT:?}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The iotd config for `cloud` and gateway `serial`, with a short reply timeout for tests. Append
/// new sections to it; keys of `[cloud]` go through `config_with_cloud`.
pub fn config(cloud: &Cloud, state_dir: &Path, serial: &str) -> String {
    config_with_cloud(cloud, state_dir, serial, "reply_timeout_secs = 5\n")
}

/// The iotd config for `cloud` and gateway `serial`: iotd's defaults but for where the cloud, the
/// claim and the state are, plus `cloud_keys` (TOML lines) in `[cloud]`.
pub fn config_with_cloud(
    cloud: &Cloud,
    state_dir: &Path,
    serial: &str,
    cloud_keys: &str,
) -> String {
    let (cert, key) = cloud.claim();
    format!(
        r#"[cloud]
endpoint = "localhost"
port = {port}
ca_bundle = "{ca}"
{cloud_keys}
[provisioning]
template = "gateway"
claim_certificate = "{cert}"
claim_key = "{key}"
claim_client_id = "claim-{serial}"

[provisioning.parameters]
SerialNumber = "{serial}"

[state]
dir = "{state}"
"#,
        port = cloud.mqtt_port(),
        ca = cloud.root_ca(),
        state = state_dir.display(),
    )
}

/// A running iotd.
pub struct Iotd {
    child: Child,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    notify: mpsc::UnboundedReceiver<String>,
    notify_task: tokio::task::JoinHandle<()>,
    pub seen: Vec<String>,
    _socket_dir: tempfile::TempDir,
}

impl Drop for Iotd {
    fn drop(&mut self) {
        self.notify_task.abort();
    }
}

impl Iotd {
    /// Writes `config` to a file in `dir` and starts the iotd binary `exe` with it.
    pub async fn start(exe: &Path, dir: &Path, config: &str) -> Iotd {
        Self::start_env(exe, dir, config, &[]).await
    }

    /// Like `start`, with extra environment variables for iotd (e.g. WATCHDOG_USEC).
    pub async fn start_env(exe: &Path, dir: &Path, config: &str, env: &[(&str, &str)]) -> Iotd {
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let state_dir = dir.join("state");
        Self::start_with_config(exe, &config_path, &state_dir, env).await
    }

    pub async fn start_with_config(
        exe: &Path,
        config_path: &Path,
        state_dir: &Path,
        env: &[(&str, &str)],
    ) -> Iotd {
        let socket_dir = tempfile::tempdir().unwrap();
        let socket_path = socket_dir.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
        let (tx, notify) = mpsc::unbounded_channel();
        let notify_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    if tx.send(line.to_owned()).is_err() {
                        return;
                    }
                }
            }
        });
        let child = Command::new(exe)
            .arg("--config")
            .arg(config_path)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("IOTD_LOG", "info,iotd=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting iotd");
        Iotd {
            child,
            state_dir: state_dir.to_owned(),
            config_path: config_path.to_owned(),
            notify,
            notify_task,
            seen: Vec::new(),
            _socket_dir: socket_dir,
        }
    }

    /// Waits for a notification line containing `text`; returns it.
    pub async fn wait_status(&mut self, text: &str) -> String {
        if let Some(found) = self.seen.iter().find(|l| l.contains(text)) {
            return found.clone();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.notify.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Ok(None) => panic!("iotd's notifications ended; seen: {:#?}", self.seen),
                Err(_) => panic!(
                    "no notification with {text:?} in time; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// The next notification line and when it arrived (None when none comes within `within`).
    pub async fn next_line(&mut self, within: Duration) -> Option<(tokio::time::Instant, String)> {
        let line = tokio::time::timeout(within, self.notify.recv())
            .await
            .ok()
            .flatten()?;
        self.seen.push(line.clone());
        Some((tokio::time::Instant::now(), line))
    }

    /// The process id, while iotd runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: the power-loss case.
    pub async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// Waits for iotd to exit by itself (within `WAIT`).
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("iotd exits in time")
            .unwrap()
    }

    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap();
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .expect("iotd exits within 5 s of SIGTERM")
            .unwrap()
    }

    pub fn state(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.state_dir.join("state.json")).unwrap())
            .unwrap()
    }
}

// Crash injection: iotd killed with SIGKILL at random instants of a provisioning, then started
// again until it is provisioned (agent/tests/crash.rs, a short run; `iotd-bench --only crash`,
// the long one).

/// A small seedable random source (SplitMix64) for the kill instants: a printed seed gives the
/// same delays again.
#[derive(Debug, Clone)]
pub struct CrashRng(u64);

impl CrashRng {
    pub fn new(seed: u64) -> CrashRng {
        CrashRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A delay drawn uniformly from [0, `max`] (nanosecond steps).
    pub fn up_to(&mut self, max: Duration) -> Duration {
        let span = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.next_u64() % span.saturating_add(1))
    }
}

/// The seed in the environment variable `var` (decimal, or hex with 0x), else a new one from the
/// clock and the pid. Panics on a value that is not a number.
pub fn crash_seed(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(text) => parse_seed(&text).unwrap_or_else(|e| panic!("{var}: {e}")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            CrashRng::new(nanos ^ u64::from(std::process::id()).rotate_left(32)).next_u64()
        }
    }
}

/// A seed as printed (decimal) or in hex with 0x.
pub fn parse_seed(text: &str) -> Result<u64, String> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("{text:?} is not a seed (a u64, decimal or 0x-hex): {e}"))
}

/// A fake for crash runs: `Cloud::start` without the one-CONNECT-per-second-per-client-id rule.
/// The shipped unit restarts a crashed iotd after 5 s (RestartSec=5s), long after that second;
/// the harness restarts it at once, and the rule would send nearly every restarted iotd into a
/// 1–2 s backoff (with most second kills landing in that sleep) where a gateway sees none.
pub async fn crash_cloud() -> Cloud {
    Cloud::start_with(|s| s.connect_gap = None).await
}

/// A script that runs `exe` with its log (stderr) appended to a file in `dir`, so that many
/// runs do not flood the terminal and a failed one's log is at hand. `exec` keeps the pid:
/// SIGKILL and SIGTERM reach iotd. Returns the script and the log.
pub fn iotd_with_log(exe: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let (script, log) = (dir.join("iotd.sh"), dir.join("iotd.log"));
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let text = format!("#!/bin/sh\nexec {} \"$@\" 2>>{}\n", quote(exe), quote(&log));
    std::fs::write(&script, text).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, log)
}

/// How long one crash run waits for the restarted iotd to say it is provisioned.
pub const CRASH_LIMIT: Duration = Duration::from_secs(20);

/// Waits until iotd says it is provisioned and connected as `thing` ("Provisioned as THING;
/// certificate valid until …", sent once connected with the certificate); an error when it
/// gives up ("Failed at …") or does not get there within `limit`.
pub async fn wait_provisioned(iotd: &mut Iotd, thing: &str, limit: Duration) -> Result<(), String> {
    let done = format!("STATUS=Provisioned as {thing}; certificate valid until");
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match iotd.next_line(left).await {
            Some((_, line)) if line.starts_with(&done) => return Ok(()),
            Some((_, line)) if line.starts_with("STATUS=Failed at ") => {
                return Err(format!("iotd gave up: {line}"));
            }
            Some(_) => {}
            None => {
                let statuses: Vec<&String> = iotd
                    .seen
                    .iter()
                    .filter(|l| l.starts_with("STATUS="))
                    .collect();
                let last = &statuses[statuses.len().saturating_sub(5)..];
                return Err(format!(
                    "no {done:?} within {} s; last STATUS lines: {last:#?}",
                    limit.as_secs()
                ));
            }
        }
    }
}

/// One gateway (`serial`, file key) provisioned without a kill: spawn → connected with its
/// certificate. What a crash run's kill window is taken from.
pub async fn time_provisioning(
    cloud: &Cloud,
    exe: &Path,
    serial: &str,
) -> Result<Duration, String> {
    let dir = tempfile::tempdir().unwrap();
    let (script, log) = iotd_with_log(exe, dir.path());
    let conf = config(cloud, &dir.path().join("state"), serial);
    let started = std::time::Instant::now();
    let mut iotd = Iotd::start(&script, dir.path(), &conf).await;
    let waited = wait_provisioned(&mut iotd, &format!("gw-{serial}"), CRASH_LIMIT).await;
    let elapsed = started.elapsed();
    if let Err(e) = waited {
        return Err(format!("{e}\n{}", log_tail(&log, 20)));
    }
    let exit = iotd.terminate().await;
    if !exit.success() {
        return Err(format!("iotd exited with {exit} on SIGTERM"));
    }
    Ok(elapsed)
}

/// The crash window: the median of `runs` unkilled provisionings (`time_provisioning`) after
/// one more that is not counted (the first of a fresh fake and iotd binary is the slowest: cold
/// caches, the fake's first certificate). Returns the median and the times counted.
pub async fn crash_window(
    cloud: &Cloud,
    exe: &Path,
    runs: u32,
) -> Result<(Duration, Vec<Duration>), String> {
    let mut times = Vec::new();
    for i in 0..=runs {
        let elapsed = time_provisioning(cloud, exe, &format!("crash-unkilled-{i}")).await?;
        if i > 0 {
            times.push(elapsed);
        }
    }
    let mut sorted = times.clone();
    sorted.sort();
    let n = sorted.len();
    let median = match n {
        0 => Duration::ZERO,
        _ => (sorted[(n - 1) / 2] + sorted[n / 2]) / 2,
    };
    Ok((median, times))
}

/// The outcome of one crash run.
#[derive(Debug, Clone)]
pub struct CrashRun {
    pub serial: String,
    /// SIGKILLs sent (each to a new iotd).
    pub kills: u32,
    /// When each kill was sent, counted from the spawn of the iotd it killed.
    pub kill_instants: Vec<Duration>,
    /// Where state.json stood after each kill: "none" (no state.json yet), the step of the
    /// operation ("starting" before the key, "key-ready", "certificate-issued",
    /// "thing-registered"), or "provisioned".
    pub killed_at: Vec<String>,
    /// Provisioned in the end: the thing exists, the certificate of state.json's identity is
    /// ACTIVE and attached to it, iotd connected as the thing with it, and every other
    /// certificate attached to the thing is one iotd reports as abandoned.
    pub recovered: bool,
    /// Certificates issued during this run other than the one in use (a CreateCertificateFromCsr
    /// or a RegisterThing whose reply a kill lost).
    pub duplicates: u32,
    /// Of those, the ones ACTIVE and attached to the thing (RegisterThing done, its reply lost);
    /// the others are PENDING_ACTIVATION and expire with their ownership token.
    pub attached_duplicates: u32,
    /// From the last start to "Provisioned as …".
    pub recovery: Duration,
    /// Why the run did not recover, with the kills, state.json and the end of iotd's log (and
    /// where the run's directory was kept, if it was).
    pub failure: Option<String>,
}

/// One crash run on `cloud` with the iotd binary `exe`: a new gateway (fresh state directory,
/// serial `serial`, file key) is started and killed with SIGKILL `kills` times, each kill a delay
/// drawn uniformly from [0, `window`] after that iotd was spawned (`window`: about an unkilled
/// provisioning's duration, see `time_provisioning`); then iotd is started once more and must
/// end provisioned and connected within `CRASH_LIMIT`. Certificates are attributed to the run by
/// a diff of the registry before and after it: runs on one cloud must not overlap. A run that
/// does not recover keeps its directory (state, keys, iotd's log) when `keep_failed`.
pub async fn crash_run(
    cloud: &Cloud,
    exe: &Path,
    serial: &str,
    kills: u32,
    window: Duration,
    rng: &mut CrashRng,
    keep_failed: bool,
) -> CrashRun {
    let dir = tempfile::tempdir().unwrap();
    let (script, log) = iotd_with_log(exe, dir.path());
    let conf = config(cloud, &dir.path().join("state"), serial);
    let thing = format!("gw-{serial}");
    let certificates = || -> std::collections::BTreeSet<String> {
        cloud
            .shared()
            .read(|reg| reg.certificates.keys().cloned().collect())
    };
    let before = certificates();
    let mut run = CrashRun {
        serial: serial.to_owned(),
        kills,
        kill_instants: Vec::new(),
        killed_at: Vec::new(),
        recovered: false,
        duplicates: 0,
        attached_duplicates: 0,
        recovery: Duration::ZERO,
        failure: None,
    };
    for _ in 0..kills {
        let delay = rng.up_to(window);
        let started = std::time::Instant::now();
        let mut iotd = Iotd::start(&script, dir.path(), &conf).await;
        // A thread's sleep, not the runtime's timer (1 ms steps): a release iotd provisions in
        // about 10 ms.
        tokio::task::spawn_blocking(move || {
            let left = delay.saturating_sub(started.elapsed());
            std::thread::sleep(left);
        })
        .await
        .unwrap();
        run.kill_instants.push(started.elapsed());
        iotd.kill().await;
        run.killed_at.push(persisted_step(&iotd.state_dir));
    }
    let started = std::time::Instant::now();
    let mut iotd = Iotd::start(&script, dir.path(), &conf).await;
    let waited = wait_provisioned(&mut iotd, &thing, CRASH_LIMIT).await;
    run.recovery = started.elapsed();
    let state = waited.and_then(|()| {
        std::fs::read_to_string(iotd.state_dir.join("state.json"))
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
            .map_err(|e| format!("reading state.json: {e}"))
    });
    if let Ok(cert) = state
        .as_ref()
        .map(|s| s["identity"]["certificateId"].clone())
    {
        // The fake logs a connection just after its CONNACK, which iotd may have acted on
        // first: wait for the entry (found at once, nearly always).
        let cert = cert.as_str().unwrap_or_default().to_owned();
        let is_ours = |e: &LogEntry| {
            e.kind == "connect"
                && e.client_id == thing
                && e.detail.as_deref().is_some_and(|d| d.contains(&cert))
        };
        cloud
            .shared()
            .wait_for_log(Duration::from_secs(5), is_ours)
            .await;
    }
    let checked = state.and_then(|state| {
        check_recovered(cloud, &state, &thing, &before, &certificates(), &mut run)
    });
    let exit = iotd.terminate().await;
    let checked = checked.and_then(|()| {
        exit.success()
            .then_some(())
            .ok_or_else(|| format!("iotd exited with {exit} on SIGTERM, not 0"))
    });
    match checked {
        Ok(()) => run.recovered = true,
        Err(why) => {
            let state = std::fs::read_to_string(iotd.state_dir.join("state.json"))
                .unwrap_or_else(|e| format!("(none: {e})"));
            let log_tail = log_tail(&log, 30);
            let kept = if keep_failed {
                format!("the run's directory is kept: {}", dir.keep().display())
            } else {
                "the run's directory is removed".to_owned()
            };
            run.failure = Some(format!(
                "{why}\n  kills at {:?} (state after each: {:?})\n  state.json: {state}\n  \
                 {kept}\n{log_tail}",
                run.kill_instants, run.killed_at,
            ));
        }
    }
    run
}

/// The checks of a recovered run (see `CrashRun::recovered`); counts the run's duplicates.
fn check_recovered(
    cloud: &Cloud,
    state: &Value,
    thing: &str,
    before: &std::collections::BTreeSet<String>,
    after: &std::collections::BTreeSet<String>,
    run: &mut CrashRun,
) -> Result<(), String> {
    if !state["operation"].is_null() {
        return Err(format!(
            "an operation is still in state.json: {}",
            state["operation"]
        ));
    }
    if state["identity"]["thingName"] != thing {
        return Err(format!(
            "state.json's identity is not {thing}: {}",
            state["identity"]
        ));
    }
    let cert = state["identity"]["certificateId"]
        .as_str()
        .ok_or("state.json's identity has no certificateId")?
        .to_owned();
    let registry = cloud.registry();
    if registry["things"][thing].is_null() {
        return Err(format!("the fake has no thing {thing}"));
    }
    let status = &registry["certificates"][&cert]["status"];
    if status != "ACTIVE" {
        return Err(format!(
            "certificate {cert} is {status} in the fake, not ACTIVE"
        ));
    }
    let principals = cloud.principals(thing);
    if !principals.contains(&cert) {
        return Err(format!(
            "certificate {cert} is not attached to {thing} (principals {principals:?})"
        ));
    }
    let on_cert = &registry["certificates"][&cert]["things"];
    if !on_cert
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t == thing))
    {
        return Err(format!(
            "certificate {cert} does not list {thing}: {on_cert}"
        ));
    }
    let last_connect = cloud
        .log()
        .into_iter()
        .rev()
        .find(|e| e.kind == "connect" && e.client_id == thing);
    if !last_connect
        .as_ref()
        .and_then(|e| e.detail.as_deref())
        .is_some_and(|d| d.contains(&cert))
    {
        return Err(format!(
            "iotd's last connection as {thing} was not with {cert}: {last_connect:?}"
        ));
    }
    let created: Vec<&String> = after.difference(before).collect();
    if !created.contains(&&cert) {
        return Err(format!("certificate {cert} was not issued in this run"));
    }
    let abandoned = state["abandonedCertificates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let unreported: Vec<&String> = principals
        .iter()
        .filter(|p| **p != cert && !abandoned.iter().any(|a| a == p.as_str()))
        .collect();
    if !unreported.is_empty() {
        return Err(format!(
            "certificates attached to {thing} that iotd does not report as abandoned: \
             {unreported:?}"
        ));
    }
    run.duplicates = created.iter().filter(|c| ***c != cert).count() as u32;
    run.attached_duplicates = created
        .iter()
        .filter(|c| ***c != cert && principals.contains(c))
        .count() as u32;
    Ok(())
}

/// Where state.json stands (see `CrashRun::killed_at`).
pub fn persisted_step(state_dir: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(state_dir.join("state.json")) else {
        return "none".to_owned();
    };
    let Ok(state) = serde_json::from_str::<Value>(&text) else {
        return "unreadable".to_owned();
    };
    if !state["identity"].is_null() && state["operation"].is_null() {
        return "provisioned".to_owned();
    }
    match state["operation"]["step"]["name"].as_str() {
        Some(step) => step.to_owned(),
        None if state["operation"].is_null() => "unprovisioned".to_owned(),
        None => "starting".to_owned(),
    }
}

/// The last `lines` lines of iotd's log, indented, for a failure's report.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    format!(
        "  end of iotd's log ({}):\n{}",
        log.display(),
        tail.iter()
            .fold(String::new(), |s, l| s + "    " + l + "\n")
    )
}
