//! Runs iotd against fake-iot-core: fake-iot-core in this process (its library, on random ports, with the
//! gateway template and a factory claim), and the real `iotd` binary as a child process with a
//! private NOTIFY_SOCKET whose STATUS= lines tell the test what the agent is doing. Everything
//! waits on events (STATUS lines, the fake's message log), never on a fixed time.
// A test harness: a failure to set up is a failed test, and panicking with the cause is the
// clearest way to say so.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod dbus_daemon;
pub mod pki;
pub mod swtpm;

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
        let dir = tempfile::tempdir().unwrap();
        let mut settings = fake_iot_core::Settings::new(dir.path().join("cloud"));
        adjust(&mut settings);
        Self::start_settings(dir, settings).await
    }

    /// The fake with the state (CA, registry) of an earlier run, copied from `state` (a test
    /// fixture) into a temp dir, so that certificates it issued then are still known.
    pub async fn start_from(state: &Path) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(state, &dir.path().join("cloud"));
        let settings = fake_iot_core::Settings::new(dir.path().join("cloud"));
        Self::start_settings(dir, settings).await
    }

    async fn start_settings(dir: tempfile::TempDir, settings: fake_iot_core::Settings) -> Cloud {
        let any = "127.0.0.1:0".parse().unwrap();
        let options = Options {
            settings,
            mqtt: any,
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
