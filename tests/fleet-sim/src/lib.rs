//! A fleet powering on at once. Each simulated gateway is iotd's own core (`iotd::core::Core`
//! with the file key backend, its own state directory, claim client id and serial), configured
//! from a config file read by iotd's config loader, running in this process; the cloud is
//! fake-iot-core in this process with AWS-like quotas (429 `Throttling` above the APIs' rates,
//! CONNECTs refused above the account's rate and above one per second per client id).
//!
//! What is measured is iotd's retry behaviour under the quotas, so nothing here helps it: no
//! gateway knows about another, and every figure comes from the agents' published snapshots
//! (what `iotctl status` shows) and the fake's counters.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fake_iot_core::faults::{Api, FaultStats};
use fake_iot_core::server::lock;
use iotd::config::{self, ConfigPaths};
use iotd::core::Core;
use iotd::keys::file::FileBackend;
use iotd::snapshot::Snapshot;
use iotd_testkit::Cloud;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Requests per second the cloud allows; AWS's published defaults by default.
#[derive(Debug, Clone, Copy)]
pub struct Quotas {
    pub register_thing: u32,
    pub create_certificate_from_csr: u32,
    /// CONNECTs per second for the whole account.
    pub connect: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        let of = |api| {
            fake_iot_core::server::AWS_QUOTAS
                .iter()
                .find(|(a, _)| *a == api)
                .map_or(u32::MAX, |(_, n)| *n)
        };
        Self {
            register_thing: of(Api::RegisterThing),
            create_certificate_from_csr: of(Api::CreateCertificateFromCsr),
            connect: of(Api::Connect),
        }
    }
}

impl Quotas {
    /// As the fake's throttles.
    pub fn throttles(&self) -> [(Api, u32); 3] {
        [
            (Api::RegisterThing, self.register_thing),
            (
                Api::CreateCertificateFromCsr,
                self.create_certificate_from_csr,
            ),
            (Api::Connect, self.connect),
        ]
    }

    /// The fastest a fleet of `n` can be provisioned: every gateway calls each API once and
    /// connects twice (with the claim, then as itself), so the slowest quota sets the pace.
    pub fn provisioning_ideal(&self, n: usize) -> Duration {
        per_second(n, self.register_thing)
            .max(per_second(n, self.create_certificate_from_csr))
            .max(per_second(2 * n, self.connect))
    }

    /// The fastest `n` gateways can all connect again: one CONNECT each.
    pub fn reconnect_ideal(&self, n: usize) -> Duration {
        per_second(n, self.connect)
    }
}

fn per_second(n: usize, rate: u32) -> Duration {
    Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)))
}

/// How one gateway's power-on ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Provisioned and connected with its own certificate, `after` power-on.
    Connected { after: Duration },
    /// Stopped on a permanent error: it would wait for a person.
    GaveUp { message: String },
    /// Still trying when the run's time limit came.
    NotDone { status: String },
}

/// What one scenario measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: &'static str,
    pub gateways: usize,
    /// The quota-bound ideal for this scenario.
    pub ideal: Duration,
    /// Power-on to the last gateway connected (or to the time limit).
    pub completion: Duration,
    /// Each connected gateway's time, sorted.
    pub times: Vec<Duration>,
    /// Serial and cause of each gateway that gave up.
    pub gave_up: Vec<(String, String)>,
    /// Serial and last status of each gateway still trying at the time limit.
    pub not_done: Vec<(String, String)>,
    /// Errors the gateways met (each followed by a retry), by iotd's error code.
    pub retries: BTreeMap<String, u64>,
    /// Requests the cloud refused for a quota, by API ("Connect" is the account's CONNECT
    /// rate, "Connect per client id" the one-per-second rule).
    pub throttled: BTreeMap<String, u64>,
}

impl Report {
    pub fn ratio(&self) -> f64 {
        self.completion.as_secs_f64() / self.ideal.as_secs_f64().max(f64::EPSILON)
    }

    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.times.len();
        let index = ((n as f64 * p).ceil() as usize).clamp(1, n.max(1)) - 1;
        self.times.get(index).copied()
    }

    pub fn total_retries(&self) -> u64 {
        self.retries.values().sum()
    }

    pub fn total_throttled(&self) -> u64 {
        self.throttled.values().sum()
    }
}

struct Gateway {
    serial: String,
    config: PathBuf,
}

/// The cloud and the gateways' files; the gateways themselves run only during `power_on`.
pub struct Fleet {
    cloud: Cloud,
    gateways: Vec<Gateway>,
    pub quotas: Quotas,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts the fake with `quotas` and writes a config for each of `n` gateways: iotd's
    /// defaults, plus `extra` TOML in the `[cloud]` table (e.g. another retry setting).
    pub async fn new(n: usize, quotas: Quotas, extra_cloud: &str) -> Result<Fleet> {
        // Each gateway holds a socket and the fake its other end, in this process.
        if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
            let _ = rlimit::Resource::NOFILE.set(hard, hard);
        }
        let cloud = Cloud::start_with(|s| s.throttles = quotas.throttles().to_vec()).await;
        let dir = tempfile::tempdir().context("creating the fleet's temporary directory")?;
        let mut gateways = Vec::with_capacity(n);
        for i in 1..=n {
            let serial = format!("sim-{i:05}");
            let home = dir.path().join(&serial);
            std::fs::create_dir_all(&home)
                .with_context(|| format!("creating {}", home.display()))?;
            let text =
                iotd_testkit::config_with_cloud(&cloud, &home.join("state"), &serial, extra_cloud);
            let config = home.join("config.toml");
            std::fs::write(&config, text)
                .with_context(|| format!("writing {}", config.display()))?;
            gateways.push(Gateway { serial, config });
        }
        Ok(Fleet {
            cloud,
            gateways,
            quotas,
            _dir: dir,
        })
    }

    /// Changes the quotas for the next scenario.
    pub fn set_quotas(&mut self, quotas: Quotas) {
        let mut faults = lock(&self.cloud.shared().faults);
        for (api, per_second) in quotas.throttles() {
            faults.set_throttle(api, Some(per_second));
        }
        self.quotas = quotas;
    }

    pub fn len(&self) -> usize {
        self.gateways.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gateways.is_empty()
    }

    /// Powers every gateway on at once and waits until each is connected with its own
    /// certificate, has given up, or `limit` has passed; then cuts the power (drops every agent,
    /// as SIGKILL would: iotd's writes are atomic, so the state on disk is what survives).
    pub async fn power_on(
        &self,
        scenario: &'static str,
        ideal: Duration,
        limit: Duration,
    ) -> Result<Report> {
        let before = self.stats();
        let started = Instant::now();
        let deadline = started + limit;
        let mut starts = Vec::with_capacity(self.gateways.len());
        for gw in &self.gateways {
            let config = gw.config.clone();
            starts.push(tokio::spawn(async move {
                let (run, snapshots) = start_agent(&config)?;
                Ok::<_, anyhow::Error>((run, watch_agent(snapshots, started, deadline).await))
            }));
        }
        let mut runs = Vec::with_capacity(starts.len());
        let mut report = Report {
            scenario,
            gateways: self.gateways.len(),
            ideal,
            completion: Duration::ZERO,
            times: Vec::new(),
            gave_up: Vec::new(),
            not_done: Vec::new(),
            retries: BTreeMap::new(),
            throttled: BTreeMap::new(),
        };
        let mut failed_to_start = Vec::new();
        for (gw, start) in self.gateways.iter().zip(starts) {
            match start.await {
                Ok(Ok((run, (outcome, errors)))) => {
                    runs.push(run);
                    for code in errors {
                        *report.retries.entry(code).or_default() += 1;
                    }
                    match outcome {
                        Outcome::Connected { after } => report.times.push(after),
                        Outcome::GaveUp { message } => {
                            report.gave_up.push((gw.serial.clone(), message));
                        }
                        Outcome::NotDone { status } => {
                            report.not_done.push((gw.serial.clone(), status));
                        }
                    }
                }
                Ok(Err(e)) => failed_to_start.push(format!("{}: {e:#}", gw.serial)),
                Err(e) => failed_to_start.push(format!("{}: {e}", gw.serial)),
            }
        }
        report.times.sort();
        report.completion = if report.gave_up.is_empty() && report.not_done.is_empty() {
            report.times.last().copied().unwrap_or_default()
        } else {
            limit
        };
        // The power cut.
        for run in &runs {
            run.abort();
        }
        for run in runs {
            let _ = run.await;
        }
        report.throttled = throttled_since(&before, &self.stats());
        if !failed_to_start.is_empty() {
            bail!(
                "{} gateways did not start: {}",
                failed_to_start.len(),
                failed_to_start.join("; ")
            );
        }
        Ok(report)
    }

    fn stats(&self) -> FaultStats {
        lock(&self.cloud.shared().faults).stats.clone()
    }

    /// What the cloud holds must be what a fleet of this size should have: one thing per
    /// gateway, each with exactly one certificate (a retried request must not register twice).
    pub fn check_registry(&self) -> Result<()> {
        let registry = self.cloud.registry();
        let mut problems = Vec::new();
        for gw in &self.gateways {
            let thing = format!("gw-{}", gw.serial);
            let principals = registry["things"][&thing]["principals"]
                .as_array()
                .map_or(0, Vec::len);
            if principals != 1 {
                problems.push(format!("{thing} has {principals} certificates attached"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!(
                "the registry is wrong for {} gateways: {}",
                problems.len(),
                problems.join("; ")
            )
        }
    }

    pub async fn stop(self) {
        self.cloud.stop().await;
    }
}

/// Starts one gateway's agent the way iotd's main does (minus D-Bus and signals).
fn start_agent(config: &std::path::Path) -> Result<(JoinHandle<()>, watch::Receiver<Snapshot>)> {
    let settings = config::load(&ConfigPaths::for_main(config))?;
    let backend = Arc::new(FileBackend::new(&settings.state_dir));
    let (core, handle) = Core::new(settings, backend)?;
    let run = tokio::spawn(async move {
        if let Err(e) = core.run().await {
            eprintln!("fleet-sim: a gateway's core stopped: {e}");
        }
    });
    Ok((run, handle.snapshot))
}

/// Follows one agent's snapshots until it is connected with its own identity, gives up, or the
/// deadline; also returns the code of each error it met. Each error is recorded before a wait
/// of at least a second, so none is missed between two looks.
async fn watch_agent(
    mut snapshots: watch::Receiver<Snapshot>,
    started: Instant,
    deadline: Instant,
) -> (Outcome, Vec<String>) {
    let mut errors = Vec::new();
    let mut last_error = None;
    loop {
        {
            let s = snapshots.borrow_and_update();
            if let Some(e) = &s.last_error
                && last_error.as_ref() != Some(e)
            {
                if e.permanent {
                    let message = e.message.clone();
                    return (Outcome::GaveUp { message }, errors);
                }
                errors.push(e.code.clone());
                last_error = Some(e.clone());
            }
            if s.state == iotd_api::state::PROVISIONED && s.connected {
                let after = started.elapsed();
                return (Outcome::Connected { after }, errors);
            }
        }
        match tokio::time::timeout_at(deadline, snapshots.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => {
                let status = snapshots.borrow().status_line.clone();
                return (Outcome::NotDone { status }, errors);
            }
        }
    }
}

fn throttled_since(before: &FaultStats, after: &FaultStats) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (api, n) in &after.throttled {
        let d = n - before.throttled.get(api).copied().unwrap_or(0);
        if d > 0 {
            out.insert(api.clone(), d);
        }
    }
    let d = after.connects_throttled - before.connects_throttled;
    if d > 0 {
        out.insert("Connect per client id".to_owned(), d);
    }
    out
}
