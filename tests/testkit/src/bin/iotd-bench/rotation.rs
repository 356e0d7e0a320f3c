//! The rotation part of `iotd-bench` (`--only rotation`): certificate rotation as a gateway
//! lives it, over and over (issue 14).
//!
//! Soak: one provisioned gateway per key backend (a file key; a key in its own swtpm) on a fresh
//! fake with AWS's CONNECT rule (one per second per client id), and a private system bus with
//! the shipped D-Bus policy. `--rotations` rotations are asked back to back with `iotctl rotate
//! --wait` (on demand, so no certificate validity or schedule is involved: AWS's default
//! certificates, `trust_clock = true`). A rotation's time is iotd's own, from its log stamps
//! (microseconds, in the process that does the work): from "rotation started" (the
//! RotationStarted event) to "rotation committed: connected with the new certificate" (the
//! commit, CredentialsRotated); iotctl's spawn → exit 0 is given beside it. Each rotation must
//! be committed (iotctl exits 0, state.json holds the next generation with the certificate
//! iotctl named and no operation); any other outcome is a failure, counted.
//!
//! Most of a rotation is a wait: the new certificate's CONNECT comes at least a second after the
//! previous CONNECT of the same client id (iotd paces them, as AWS IoT requires), and back to
//! back that is the previous rotation's (not for the first, asked after `SETTLE` at rest: the
//! minimum is what an unpaced rotation takes; the kill part times more of those). iotd paces
//! from a CONNECT's start, the fake (as AWS) counts from its arrival: the CONNECTs the fake
//! refused are counted too (each costs a rotation iotd's reconnect backoff). iotd's VmRSS and
//! open descriptors (/proc/PID/status, /proc/PID/fd) are read at rest before the first
//! rotation and after the last (`settled_footprint`), and right after each rotation (the first,
//! and the highest).
//!
//! Kills: a gateway per backend on a fake without the CONNECT rule (the harness restarts iotd
//! at once, where systemd waits RestartSec=5s, see `iotd_testkit::crash_cloud`). Every rotation
//! here is asked `UNPACED` after the gateway's last CONNECT, as a scheduled rotation on a
//! gateway connected for a while: nothing holds its CONNECT back, so a kill lands in its work
//! (key, CSR, RegisterThing, CONNECT, commit, report) rather than in a second of waiting at
//! thing-registered. `CRASH_WINDOW_RUNS` unkilled rotations of that gateway (after one not
//! counted) give the kill window [L, D] after `iotctl rotate`'s spawn: L the earliest
//! RotationStarted in iotd's log (iotctl's own start and D-Bus call come first), D the median of
//! iotctl's exit (`--wait`: the commit announced); their RotationStarted → committed is
//! reported too. Then, over and over: `iotctl rotate` (without --wait), iotd killed with
//! SIGKILL at an instant drawn uniformly from [L, D] after iotctl's spawn, state.json read
//! (where the kill left the rotation), iotd started again. It must be back within `LIMIT`
//! connected (READY=1 and "Provisioned as …") with an identity whose certificate is ACTIVE and
//! attached to its thing in the fake's registry, the fake having logged its CONNECT with that
//! certificate since the restart, `gen/<n>/cert.pem` there, and no operation left in
//! state.json: otherwise the gateway is bricked (its directory is kept, and a new gateway takes
//! its place for the kills left). Killed before the commit, it must be back with the
//! certificate it had (the rotation rolled back); killed after, with the new one. A kill that
//! lands before iotd started the rotation (state.json unchanged: the call late, or the
//! rotation not yet written) is checked the same way but not counted: the kills go on until
//! `count` landed in a rotation.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::swtpm::Swtpm;
use iotd_testkit::{Cloud, CrashRng, Iotd, WAIT, config};
use serde_json::Value;

use super::{
    Args, JOURNAL_LOG, LIMIT, Row, Spread, WATCHDOG_USEC, fail, median, mib, ms, procfs, repo,
    verdict,
};

/// Unkilled rotations timed for the kill window (after one not counted).
const CRASH_WINDOW_RUNS: u32 = 10;

/// How long the kill part waits after a CONNECT before it asks for a rotation: more than iotd's
/// one CONNECT per second per client id, so that the rotation's CONNECT is not held back and
/// the rotation is all work, as a scheduled one on a gateway connected for a while; the kills
/// then spread over its steps rather than over that wait.
const UNPACED: Duration = Duration::from_millis(1100);

/// How long iotd is left alone before its memory and descriptors are read at rest (the start
/// and the end of the soak): the work after a commit (the report, removals) is over by then.
const SETTLE: Duration = Duration::from_secs(2);

/// How long `iotctl rotate --wait` follows one rotation (its `--timeout`); the soak gives up on
/// iotctl a little after that.
const ROTATE_TIMEOUT_SECS: u64 = 60;

/// iotd's log lines at a rotation's start and at its commit (`core.rs`).
const LOG_STARTED: &str = "rotation started";
const LOG_COMMITTED: &str = "rotation committed: connected with the new certificate";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    File,
    Tpm,
}

impl Key {
    fn label(self) -> &'static str {
        match self {
            Key::File => "file key",
            Key::Tpm => "key in swtpm",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Key::File => "file",
            Key::Tpm => "tpm",
        }
    }
}

/// What every run needs: the release binaries, and the private system bus iotctl reaches iotd
/// on (one iotd at a time: they would all own the same name).
#[derive(Clone, Copy)]
struct Tools<'a> {
    exe: &'a Path,
    iotctl: &'a Path,
    bus: &'a DbusDaemon,
}

/// A gateway on the private bus: its directory, config, log, and swtpm (one per gateway).
struct Gateway {
    dir: tempfile::TempDir,
    script: PathBuf,
    log: PathBuf,
    config_path: PathBuf,
    state_dir: PathBuf,
    thing: String,
    /// Its swtpm (a key in a file: none), stopped when the gateway goes: after its iotd, which
    /// every caller declares after the gateway (locals drop in reverse order).
    _tpm: Option<Swtpm>,
}

impl Gateway {
    fn new(cloud: &Cloud, exe: &Path, serial: &str, key: Key) -> Result<Gateway> {
        let dir = tempfile::tempdir()?;
        let (script, log) = stamped_iotd(exe, dir.path())?;
        let state_dir = dir.path().join("state");
        let tpm = (key == Key::Tpm).then(Swtpm::start);
        let mut conf = config(cloud, &state_dir, serial);
        // On-demand rotations run whatever the clock says; trusted anyway, so that a schedule
        // decision never waits for systemd-timesyncd here.
        conf.push_str("\n[rotation]\ntrust_clock = true\n");
        if let Some(t) = &tpm {
            conf.push_str(&format!(
                "\n[key]\nbackend = \"tpm\"\ntcti = \"{}\"\n",
                t.tcti()
            ));
        }
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, conf)
            .with_context(|| format!("writing {}", config_path.display()))?;
        Ok(Gateway {
            script,
            log,
            config_path,
            state_dir,
            thing: format!("gw-{serial}"),
            _tpm: tpm,
            dir,
        })
    }

    /// Started as in production (bus, watchdog, the journal's log level).
    async fn start(&self, bus: &DbusDaemon) -> Iotd {
        Iotd::start_with_config(
            &self.script,
            &self.config_path,
            &self.state_dir,
            &[
                ("DBUS_SYSTEM_BUS_ADDRESS", bus.address()),
                ("WATCHDOG_USEC", WATCHDOG_USEC),
                ("IOTD_LOG", JOURNAL_LOG),
            ],
        )
        .await
    }

    /// Waits until iotd owns its bus name (READY=1) and is connected with its identity
    /// ("Provisioned as …", sent once connected), within `LIMIT` of `started`.
    async fn connected(&self, iotd: &mut Iotd, started: Instant) -> Result<Duration> {
        let done = format!(
            "STATUS=Provisioned as {}; certificate valid until",
            self.thing
        );
        let (mut ready, mut up) = (false, false);
        let mut statuses = Vec::new();
        let why = loop {
            let left = (started + LIMIT).saturating_duration_since(Instant::now());
            let Some((_, line)) = iotd.next_line(left).await else {
                break format!(
                    "not {} within {} s",
                    match (ready, up) {
                        (false, false) => "ready nor connected",
                        (false, true) => "ready (READY=1)",
                        _ => "connected",
                    },
                    LIMIT.as_secs()
                );
            };
            ready |= line == "READY=1";
            up |= line.starts_with(&done);
            if ready && up {
                iotd.seen.clear();
                return Ok(started.elapsed());
            }
            if line.starts_with("STATUS=Failed at ") {
                break format!("iotd gave up: {line}");
            }
            if line.starts_with("STATUS=") {
                statuses.push(line);
            }
        };
        let last = &statuses[statuses.len().saturating_sub(5)..];
        bail!(
            "{why}; last STATUS lines: {last:?}\n{}",
            iotd_testkit::log_tail(&self.log, 15)
        )
    }

    fn state(&self) -> Result<Value> {
        let path = self.state_dir.join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// A script that runs iotd with its log (stderr) appended to a file of `dir`, stamped by iotd
/// (JOURNAL_STREAM, were the bench run under systemd, would make it leave the times out);
/// `exec` keeps the pid, so signals reach iotd and /proc/PID is iotd's.
fn stamped_iotd(exe: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let (script, log) = (dir.join("iotd.sh"), dir.join("iotd.log"));
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let text = format!(
        "#!/bin/sh\nunset JOURNAL_STREAM\nexec {} \"$@\" 2>>{}\n",
        quote(exe),
        quote(&log)
    );
    std::fs::write(&script, text).with_context(|| format!("writing {}", script.display()))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((script, log))
}

/// Reads the notification lines iotd sent meanwhile and forgets them, so that a long run does
/// not keep them.
async fn drain(iotd: &mut Iotd) {
    while iotd.next_line(Duration::ZERO).await.is_some() {}
    iotd.seen.clear();
}

/// iotctl with `args` on `bus`, its output; an error when it does not end within `limit`.
async fn iotctl_run(iotctl: &Path, bus: &str, args: &[&str], limit: Duration) -> Result<Output> {
    let out = tokio::process::Command::new(iotctl)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(limit, out)
        .await
        .map_err(|_| anyhow!("iotctl {args:?} did not end within {} s", limit.as_secs()))?
        .with_context(|| format!("running iotctl {args:?}"))
}

/// `iotctl rotate --wait`: the time from its spawn to its exit, and the rotation's id and new
/// certificate from its lines ("rotation-N started: …", "rotation-N committed: connected with
/// certificate ID, valid until …"); an error when it did not exit 0.
async fn rotate_wait(iotctl: &Path, bus: &str) -> Result<(Duration, String, String)> {
    let timeout = ROTATE_TIMEOUT_SECS.to_string();
    let started = Instant::now();
    let out = iotctl_run(
        iotctl,
        bus,
        &["rotate", "--wait", "--timeout", &timeout],
        Duration::from_secs(ROTATE_TIMEOUT_SECS + 10),
    )
    .await?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "iotctl rotate --wait exited with {}: {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let id = stdout
        .split_whitespace()
        .next()
        .filter(|w| w.starts_with("rotation-"))
        .ok_or_else(|| anyhow!("iotctl rotate --wait named no rotation: {stdout}"))?
        .to_owned();
    let certificate = stdout
        .split("connected with certificate ")
        .nth(1)
        .and_then(|rest| rest.split([',', ' ']).next())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| anyhow!("iotctl rotate --wait named no new certificate: {stdout}"))?
        .to_owned();
    Ok((elapsed, id, certificate))
}

/// iotd's log read as it grows: the lines appended since the last read.
struct LogCursor {
    path: PathBuf,
    offset: usize,
}

impl LogCursor {
    /// From the log's current end.
    fn at_end(path: &Path) -> LogCursor {
        let offset = std::fs::metadata(path).map_or(0, |m| m.len() as usize);
        LogCursor {
            path: path.to_owned(),
            offset,
        }
    }

    /// The whole lines appended since the last call.
    fn new_lines(&mut self) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut text = Vec::new();
        let read = std::fs::File::open(&self.path).and_then(|mut f| {
            f.seek(SeekFrom::Start(self.offset as u64))?;
            f.read_to_end(&mut text)
        });
        if read.is_err() {
            return Vec::new();
        }
        // A line still being written waits for the next call.
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.offset += whole;
        String::from_utf8_lossy(&text[..whole])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// The time of an iotd log line (tracing's default format: RFC 3339 UTC with microseconds
/// first), as Unix seconds.
fn stamp(line: &str) -> Option<f64> {
    let first = line.split_whitespace().next()?;
    let time =
        time::OffsetDateTime::parse(first, &time::format_description::well_known::Rfc3339).ok()?;
    Some(time.unix_timestamp_nanos() as f64 / 1e9)
}

/// From iotd's log: the instants (Unix seconds) of rotation `id`'s "rotation started" and of
/// the commit of `certificate`. The lines are logged before the signals iotctl waits for, so
/// they are there when it exits; a short wait covers a slow write.
async fn logged(cursor: &mut LogCursor, id: &str, certificate: &str) -> Result<(f64, f64)> {
    let (mut started, mut committed) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        for line in cursor.new_lines() {
            let named = |w: &str| w.strip_prefix("id=") == Some(id);
            if line.contains(LOG_STARTED) && line.split_whitespace().any(named) {
                started = stamp(&line);
            } else if line.contains(LOG_COMMITTED) && line.contains(certificate) {
                committed = stamp(&line);
            }
        }
        if let (Some(s), Some(c)) = (started, committed) {
            return Ok((s, c));
        }
        if Instant::now() >= deadline {
            bail!(
                "iotd's log has no stamped {:?} line for {id} or no {:?} line for {certificate}",
                LOG_STARTED,
                LOG_COMMITTED
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn generation(state: &Value) -> u64 {
    state["identity"]["generation"].as_u64().unwrap_or(0)
}

fn certificate(state: &Value) -> String {
    state["identity"]["certificateId"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A rotation's outcome in state.json: the next generation with `certificate`, no operation.
/// iotd writes state.json before it announces the commit, so this holds when iotctl exits.
fn check_committed(gateway: &Gateway, before: u64, certificate_id: &str) -> Result<()> {
    let state = gateway.state()?;
    if !state["operation"].is_null() {
        bail!(
            "state.json still holds an operation after the commit: {}",
            state["operation"]
        );
    }
    if generation(&state) != before + 1 || certificate(&state) != certificate_id {
        bail!(
            "state.json's identity is generation {} with {}, not {} with {certificate_id}",
            generation(&state),
            certificate(&state),
            before + 1
        );
    }
    Ok(())
}

/// The identity in state.json is whole: no operation left, its certificate ACTIVE and attached
/// to the thing in the fake's registry, the fake logged a CONNECT with it as the thing after
/// log entry `since`, its `gen/<n>/cert.pem` there. Returns the state.
async fn check_whole(cloud: &Cloud, gateway: &Gateway, since: u64) -> Result<Value, String> {
    // A rotation not committed is rolled back at start, before iotd connects: the state is
    // read a few times only to allow for the write after the connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    let state = loop {
        let state = gateway.state().map_err(|e| format!("{e:#}"))?;
        if state["operation"].is_null() {
            break state;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "an operation is left in state.json: {}",
                state["operation"]
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let thing = &gateway.thing;
    if state["identity"]["thingName"] != thing.as_str() {
        return Err(format!(
            "state.json's identity is not {thing}: {}",
            state["identity"]
        ));
    }
    let cert = certificate(&state);
    if cert.is_empty() {
        return Err("state.json's identity has no certificateId".into());
    }
    let registered = cloud.shared().read(|reg| {
        let c = reg.certificates.get(&cert)?;
        let attached = reg
            .things
            .get(thing)
            .is_some_and(|t| t.principals.contains(&cert));
        Some((c.status.as_str(), c.things.contains(thing) && attached))
    });
    match registered {
        None => return Err(format!("the fake has no certificate {cert}")),
        Some((status, _)) if status != "ACTIVE" => {
            return Err(format!("certificate {cert} is {status}, not ACTIVE"));
        }
        Some((_, false)) => return Err(format!("certificate {cert} is not attached to {thing}")),
        Some(_) => {}
    }
    let cert_pem = gateway
        .state_dir
        .join(format!("gen/{}/cert.pem", generation(&state)));
    if !cert_pem.exists() {
        return Err(format!("{} is missing", cert_pem.display()));
    }
    // The fake logs a connection just after its CONNACK, which iotd may have acted on first.
    let connected = cloud
        .shared()
        .wait_for_log(Duration::from_secs(5), |e| {
            e.seq >= since
                && e.kind == "connect"
                && e.client_id == *thing
                && e.detail.as_deref().is_some_and(|d| d.contains(&cert))
        })
        .await;
    if connected.is_none() {
        return Err(format!(
            "the fake logged no CONNECT as {thing} with {cert} since the restart"
        ));
    }
    Ok(state)
}

/// CONNECTs the fake refused so far for its one per second per client id.
fn throttled_connects(cloud: &Cloud) -> u64 {
    fake_iot_core::server::lock(&cloud.shared().faults)
        .stats
        .connects_throttled
}

/// The next sequence number of the fake's log (its entries from now on have this or more).
fn log_next(cloud: &Cloud) -> u64 {
    cloud.log().last().map_or(0, |e| e.seq + 1)
}

/// VmRSS (KiB) and open descriptors of `pid`, right after a rotation: a descriptor iotd holds
/// for a moment (a state write, a removal in the background) may be counted.
fn footprint(pid: u32) -> (f64, usize) {
    (
        procfs::status_kib(pid, "VmRSS").unwrap_or(0.0),
        procfs::fds(pid),
    )
}

/// VmRSS (KiB) and open descriptors of `pid` at rest: `SETTLE` later, and the fewest
/// descriptors of five reads 100 ms apart (a leaked one is in all of them).
async fn settled_footprint(pid: u32) -> (f64, usize) {
    tokio::time::sleep(SETTLE).await;
    let mut fds = usize::MAX;
    for _ in 0..5 {
        fds = fds.min(procfs::fds(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (procfs::status_kib(pid, "VmRSS").unwrap_or(0.0), fds)
}

/// A figure at rest before the first rotation (connected), right after the first rotation, at
/// rest after the last, and the highest right after any rotation.
#[derive(Clone, Copy, Default)]
struct Growth<T> {
    start: T,
    first: T,
    end: T,
    max: T,
}

impl<T: Copy + PartialOrd> Growth<T> {
    fn after(&mut self, rotation: u32, value: T) {
        if rotation == 1 || value > self.max {
            self.max = value;
        }
        if rotation == 1 {
            self.first = value;
        }
    }
}

/// One backend's soak.
struct Soak {
    key: Key,
    asked: u32,
    /// iotd's log: "rotation started" → "rotation committed", ms, committed rotations.
    logged_ms: Vec<f64>,
    /// `iotctl rotate --wait`: spawn → exit 0, ms.
    iotctl_ms: Vec<f64>,
    failures: u32,
    rss: Growth<f64>,
    fds: Growth<usize>,
    /// The generation before the first rotation and after the last.
    generations: (u64, u64),
    /// CONNECTs the fake refused for AWS's one per second per client id, during the rotations
    /// (each costs the rotation iotd's reconnect backoff).
    throttled: u64,
}

/// `count` rotations back to back on a new gateway with `key` (see the module's comment).
async fn soak(tools: &Tools<'_>, key: Key, count: u32, failed: &mut u32) -> Result<Soak> {
    let cloud = Cloud::start().await;
    let measured = soak_on(&cloud, tools, key, count, failed).await;
    cloud.stop().await;
    measured
}

async fn soak_on(
    cloud: &Cloud,
    tools: &Tools<'_>,
    key: Key,
    count: u32,
    failed: &mut u32,
) -> Result<Soak> {
    let Tools { exe, iotctl, bus } = *tools;
    let gateway = Gateway::new(cloud, exe, &format!("rotation-soak-{}", key.short()), key)?;
    let mut iotd = gateway.start(bus).await;
    gateway.connected(&mut iotd, Instant::now()).await?;
    let pid = iotd.pid().context("iotd's pid")?;
    let first = gateway.state()?;
    let mut soak = Soak {
        key,
        asked: count,
        logged_ms: Vec::new(),
        iotctl_ms: Vec::new(),
        failures: 0,
        rss: Growth::default(),
        fds: Growth::default(),
        generations: (generation(&first), generation(&first)),
        throttled: 0,
    };
    let throttled = throttled_connects(cloud);
    (soak.rss.start, soak.fds.start) = settled_footprint(pid).await;
    let mut cursor = LogCursor::at_end(&gateway.log);
    for i in 1..=count {
        drain(&mut iotd).await;
        let before = generation(&gateway.state()?);
        let rotated = async {
            let (elapsed, id, certificate) = rotate_wait(iotctl, bus.address()).await?;
            check_committed(&gateway, before, &certificate)?;
            let (started, committed) = logged(&mut cursor, &id, &certificate).await?;
            anyhow::Ok((elapsed, (committed - started) * 1e3))
        }
        .await;
        match rotated {
            Ok((elapsed, logged)) => {
                soak.iotctl_ms.push(elapsed.as_secs_f64() * 1e3);
                soak.logged_ms.push(logged);
            }
            Err(e) => {
                soak.failures += 1;
                let what = format!("rotation {i}/{count}, {}", key.label());
                let tail = iotd_testkit::log_tail(&gateway.log, 10);
                fail(failed, &what, &anyhow!("{e:#}\n{}", tail.trim_end()));
                // Whatever the log says, the lines of a failed rotation are not another's.
                cursor = LogCursor::at_end(&gateway.log);
            }
        }
        if !procfs::exists(pid) {
            bail!(
                "iotd ({}) is gone after rotation {i}\n{}",
                key.label(),
                iotd_testkit::log_tail(&gateway.log, 20)
            );
        }
        let (rss, fds) = footprint(pid);
        soak.rss.after(i, rss);
        soak.fds.after(i, fds);
        if i % 50 == 0 || i == count {
            eprintln!(
                "rotation soak, {}: {i:>4}/{count}, started → committed median {} (last {}), \
                 {} failed; RSS {}, {fds} fds",
                key.label(),
                ms(median(&soak.logged_ms)),
                soak.logged_ms
                    .last()
                    .map_or_else(|| "-".to_owned(), |v| ms(*v)),
                soak.failures,
                mib(rss)
            );
        }
    }
    soak.throttled = throttled_connects(cloud) - throttled;
    if !procfs::exists(pid) {
        bail!("iotd ({}) is gone after the soak", key.label());
    }
    (soak.rss.end, soak.fds.end) = settled_footprint(pid).await;
    let last = gateway.state()?;
    soak.generations.1 = generation(&last);
    // The identity the soak ends with is a working one.
    if let Err(why) = check_whole(cloud, &gateway, 0).await {
        soak.failures += 1;
        fail(
            failed,
            &format!("rotation soak, {}: the last identity", key.label()),
            &anyhow!("{why}"),
        );
    }
    let exit = iotd.terminate().await;
    if exit.code() != Some(0) {
        bail!("iotd exited with {exit} on SIGTERM after the soak, not 0");
    }
    Ok(soak)
}

/// Where a kill left the rotation, from state.json (`before`: the generation when iotctl was
/// run). In the order a rotation goes through them.
const STEPS: [&str; 6] = [
    "not started",
    "started",
    "key-ready",
    "certificate-issued",
    "thing-registered",
    "committed",
];

fn step_at_kill(gateway: &Gateway, before: u64) -> String {
    let Ok(state) = gateway.state() else {
        return "unreadable".to_owned();
    };
    match &state["operation"] {
        Value::Null if generation(&state) > before => "committed".to_owned(),
        Value::Null => "not started".to_owned(),
        op if op["kind"] != "rotation" => format!("{} (not a rotation)", op["kind"]),
        op => op["step"]["name"].as_str().unwrap_or("started").to_owned(),
    }
}

/// One kill.
struct Kill {
    /// Where state.json stood right after it.
    step: String,
    /// Not back with a whole identity within `LIMIT` of the restart: why.
    bricked: Option<String>,
    /// Back with a whole identity, but not the expected one (the old one before the commit, the
    /// new one after): why.
    unexpected: Option<String>,
    /// The restart → ready and connected.
    recovery: Duration,
}

/// One backend's kills.
struct Killed {
    key: Key,
    /// Unkilled rotations asked `UNPACED` after the last CONNECT: `iotctl rotate --wait` spawn
    /// → iotd's "rotation started" (L is the lowest), → iotctl's exit (D is their median), and
    /// iotd's log, "rotation started" → "rotation committed"; ms.
    lead_ms: Vec<f64>,
    window_ms: Vec<f64>,
    work_ms: Vec<f64>,
    /// Every kill, those that landed before the rotation started included.
    kills: Vec<Kill>,
}

/// A gateway with `key` for the kills, started and connected.
async fn kill_gateway(
    cloud: &Cloud,
    tools: &Tools<'_>,
    key: Key,
    n: u32,
) -> Result<(Gateway, Iotd)> {
    let serial = format!("rotation-kill-{}-{n}", key.short());
    let gateway = Gateway::new(cloud, tools.exe, &serial, key)?;
    let mut iotd = gateway.start(tools.bus).await;
    gateway.connected(&mut iotd, Instant::now()).await?;
    Ok((gateway, iotd))
}

/// Kills of a rotation on a gateway with `key` until `count` of them landed in a rotation
/// (state.json showed it started, or committed), within `3 × count` kills (see the module's
/// comment).
async fn kills(
    cloud: &Cloud,
    tools: &Tools<'_>,
    key: Key,
    count: u32,
    rng: &mut CrashRng,
    failed: &mut u32,
) -> Result<Killed> {
    let Tools { iotctl, bus, .. } = *tools;
    let mut replaced = 1;
    let (mut gateway, mut iotd) = kill_gateway(cloud, tools, key, replaced).await?;
    let mut cursor = LogCursor::at_end(&gateway.log);
    let (mut lead_ms, mut window_ms, mut work_ms) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=CRASH_WINDOW_RUNS {
        tokio::time::sleep(UNPACED).await;
        drain(&mut iotd).await;
        let before = generation(&gateway.state()?);
        let unkilled = async {
            // The wall clock, as iotd's log stamps are.
            let spawned = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs_f64();
            let (elapsed, id, certificate) = rotate_wait(iotctl, bus.address()).await?;
            check_committed(&gateway, before, &certificate)?;
            let (started, committed) = logged(&mut cursor, &id, &certificate).await?;
            anyhow::Ok((started - spawned, elapsed, committed - started))
        };
        let (lead, elapsed, work) = unkilled
            .await
            .with_context(|| format!("an unkilled rotation ({}), to time D", key.label()))?;
        if i > 0 {
            lead_ms.push(lead * 1e3);
            window_ms.push(elapsed.as_secs_f64() * 1e3);
            work_ms.push(work * 1e3);
        }
    }
    let window = Duration::from_secs_f64(median(&window_ms) / 1e3);
    // The earliest start seen, within the window.
    let lead = Duration::from_secs_f64(Spread::of(&lead_ms).min.max(0.0) / 1e3).min(window);
    eprintln!(
        "rotation kills, {}: kills in [L, D] = [{}, {}] after iotctl's spawn (the earliest \
         RotationStarted, the median exit of {CRASH_WINDOW_RUNS} unkilled rotations); \
         RotationStarted → committed {}",
        key.label(),
        ms(lead.as_secs_f64() * 1e3),
        ms(window.as_secs_f64() * 1e3),
        ms(median(&work_ms))
    );
    let mut done = Killed {
        key,
        lead_ms,
        window_ms,
        work_ms,
        kills: Vec::new(),
    };
    let mut landed = 0;
    while landed < count {
        if done.kills.len() >= 3 * count as usize {
            bail!(
                "{} kills, only {landed} of them in a rotation ({}): D = {} is too short?",
                done.kills.len(),
                key.label(),
                ms(window.as_secs_f64() * 1e3)
            );
        }
        // Since the last CONNECT (the restart's, or the last rotation's).
        tokio::time::sleep(UNPACED).await;
        drain(&mut iotd).await;
        let before = generation(&gateway.state()?);
        let delay = lead + rng.up_to(window - lead);
        let bus_address = bus.address().to_owned();
        let ctl = iotctl.to_owned();
        let started = Instant::now();
        // Without --wait: it says the rotation started, or that iotd went away.
        let ask = tokio::spawn(async move {
            let _ = iotctl_run(&ctl, &bus_address, &["rotate"], WAIT).await;
        });
        // A thread's sleep, not the runtime's timer (1 ms steps).
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(delay.saturating_sub(started.elapsed()));
        })
        .await?;
        iotd.kill().await;
        let step = step_at_kill(&gateway, before);
        let _ = ask.await;
        let since = log_next(cloud);
        let restarted = Instant::now();
        iotd = gateway.start(bus).await;
        let back = gateway
            .connected(&mut iotd, restarted)
            .await
            .map_err(|e| format!("{e:#}"));
        let recovery = restarted.elapsed();
        let whole = match back {
            Ok(_) => check_whole(cloud, &gateway, since).await,
            Err(e) => Err(e),
        };
        let mut kill = Kill {
            step,
            bricked: None,
            unexpected: None,
            recovery,
        };
        match whole {
            Ok(state) => {
                let after = generation(&state);
                let committed = kill.step == "committed";
                if committed != (after > before) || after < before {
                    kill.unexpected = Some(format!(
                        "killed at {} (generation {before}), back at generation {after}",
                        kill.step
                    ));
                }
            }
            Err(why) => kill.bricked = Some(why),
        }
        if kill.step != "not started" {
            landed += 1;
        }
        let what = format!(
            "rotation kill {}, {}, {} after iotctl rotate (state.json: {})",
            done.kills.len() + 1,
            key.label(),
            ms(delay.as_secs_f64() * 1e3),
            kill.step
        );
        if let Some(why) = &kill.unexpected {
            fail(failed, &what, &anyhow!("{why}"));
        }
        if let Some(why) = kill.bricked.clone() {
            // As it is: a bricked iotd may not answer SIGTERM, and its state stays as it was.
            iotd.kill().await;
            let kept = gateway.keep();
            fail(
                failed,
                &what,
                &anyhow!("bricked: {why}\n  the gateway's directory is kept: {kept}"),
            );
            replaced += 1;
            (gateway, iotd) = kill_gateway(cloud, tools, key, replaced)
                .await
                .context("a new gateway after a bricked one")?;
        }
        done.kills.push(kill);
        if kill_counted(&done, landed) && (landed % 50 == 0 || landed == count) {
            let bricked = done.kills.iter().filter(|k| k.bricked.is_some()).count();
            eprintln!(
                "rotation kills, {}: {landed:>4}/{count} in a rotation ({} kills), {bricked} \
                 bricked",
                key.label(),
                done.kills.len()
            );
        }
    }
    let exit = iotd.terminate().await;
    if exit.code() != Some(0) {
        bail!("iotd exited with {exit} on SIGTERM after the kills, not 0");
    }
    Ok(done)
}

/// Whether the last kill was one in a rotation (for the progress lines).
fn kill_counted(done: &Killed, landed: u32) -> bool {
    landed > 0 && done.kills.last().is_some_and(|k| k.step != "not started")
}

impl Gateway {
    /// Keeps the gateway's directory (state, keys, iotd's log, a copy of its swtpm's state) for
    /// a look after the run; says where.
    fn keep(self) -> String {
        let path = self.dir.keep();
        if let Some(tpm) = &self._tpm {
            iotd_testkit::copy_tree(tpm.dir(), &path.join("swtpm"));
        }
        path.display().to_string()
    }
}

/// The rotation part: the soak on both backends, then the kills. Rows go to the table; the
/// returned lines are printed under it.
pub async fn rotations(
    args: &Args,
    exe: &Path,
    iotctl: &Path,
    rows: &mut Vec<Row>,
    failed: &mut u32,
) -> Result<Vec<String>> {
    let bus = DbusDaemon::start(
        &[&repo().join("packaging/dbus/io.iotd.Agent1.conf")],
        Some(r#"<policy user="root"><allow own="io.iotd.Agent1"/></policy>"#),
    );
    let tools = Tools {
        exe,
        iotctl,
        bus: &bus,
    };
    let mut soaks = Vec::new();
    for key in [Key::File, Key::Tpm] {
        soaks.push(soak(&tools, key, args.rotations, failed).await?);
    }
    for s in &soaks {
        soak_rows(s, rows);
    }

    let seed = args
        .crash_seed
        .unwrap_or_else(|| iotd_testkit::crash_seed("IOTD_CRASH_SEED"));
    eprintln!("rotation kills: seed {seed} (--crash-seed {seed} draws the same kill instants)");
    let mut rng = CrashRng::new(seed);
    let cloud = iotd_testkit::crash_cloud().await;
    // Half on each backend (the file key gets the odd one).
    let file_kills = args.rotation_kills.div_ceil(2);
    let mut killed = Vec::new();
    for (key, count) in [
        (Key::File, file_kills),
        (Key::Tpm, args.rotation_kills - file_kills),
    ] {
        if count == 0 {
            continue;
        }
        let done = kills(&cloud, &tools, key, count, &mut rng, failed).await;
        match done {
            Ok(k) => killed.push(k),
            Err(e) => {
                cloud.stop().await;
                return Err(e);
            }
        }
    }
    cloud.stop().await;
    Ok(kill_rows(seed, &killed, rows))
}

fn soak_rows(s: &Soak, rows: &mut Vec<Row>) {
    let key = s.key.label();
    let committed = s.logged_ms.len();
    rows.push(Row::spread(
        format!(
            "rotation, {key}: RotationStarted → committed (iotd's log stamps, \"{LOG_STARTED}\" → \
             \"rotation committed\"; back to back, `iotctl rotate --wait` over D-Bus; the new \
             CONNECT waits for the 1 s per client id since the previous one)"
        ),
        &s.logged_ms,
        ms,
        "",
    ));
    rows.push(Row {
        measure: format!("… p99, {key}"),
        median: ms(p99(&s.logged_ms)),
        min: String::new(),
        max: String::new(),
        runs: committed.to_string(),
        target: String::new(),
    });
    rows.push(Row::spread(
        format!(
            "… `iotctl rotate --wait` spawn → exit 0 (process start, D-Bus, the rotation, \
             CredentialsRotated), {key}"
        ),
        &s.iotctl_ms,
        ms,
        "",
    ));
    rows.push(Row {
        measure: format!(
            "… rotations failed (not committed, or state.json not at the next generation with \
             the new certificate), {key}; generation {} → {}",
            s.generations.0, s.generations.1
        ),
        median: format!("{} of {}", s.failures, s.asked),
        min: String::new(),
        max: String::new(),
        runs: s.asked.to_string(),
        target: verdict(s.failures == 0, "0"),
    });
    rows.push(Row::one(
        format!(
            "… CONNECTs the fake refused for AWS's 1 per second per client id (iotd paces its \
             CONNECTs from their start, the fake counts from their arrival), {key}"
        ),
        s.throttled.to_string(),
        "",
    ));
    let settle = SETTLE.as_secs();
    rows.push(Row::one(
        format!(
            "… RSS (VmRSS, /proc/PID/status) of iotd, {key}: at rest before the 1st rotation \
             (connected, {settle} s) → right after the 1st → at rest after the {} ({settle} s) \
             (highest right after a rotation)",
            ordinal(s.asked)
        ),
        format!(
            "{} → {} → {} ({})",
            mib(s.rss.start),
            mib(s.rss.first),
            mib(s.rss.end),
            mib(s.rss.max)
        ),
        "",
    ));
    rows.push(Row::one(
        format!(
            "… open fds of iotd (/proc/PID/fd; at rest: the fewest of 5 reads), {key}: at rest \
             before the 1st rotation → right after the 1st → at rest after the {} (highest \
             right after a rotation)",
            ordinal(s.asked)
        ),
        format!(
            "{} → {} → {} ({})",
            s.fds.start, s.fds.first, s.fds.end, s.fds.max
        ),
        &verdict(s.fds.end <= s.fds.start, "no growth"),
    ));
}

/// "1st", "2nd", "3rd", "500th", "111th".
fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// The nearest-rank 99th percentile; NaN without values.
fn p99(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n => v[(n * 99).div_ceil(100) - 1],
    }
}

fn kill_rows(seed: u64, killed: &[Killed], rows: &mut Vec<Row>) -> Vec<String> {
    let count = |n: usize| n.to_string();
    let in_rotation = |k: &Kill| k.step != "not started";
    let mut notes = Vec::new();
    for k in killed {
        let key = k.key.label();
        let n = k.kills.len();
        let landed = k.kills.iter().filter(|k| in_rotation(k)).count();
        let bricked = k.kills.iter().filter(|k| k.bricked.is_some()).count();
        let unexpected = k.kills.iter().filter(|k| k.unexpected.is_some()).count();
        rows.push(Row::spread(
            format!(
                "rotation not held back by the CONNECT pacing (asked {} s after the last \
                 CONNECT, as a scheduled one), {key}: RotationStarted → committed (iotd's log \
                 stamps), unkilled",
                UNPACED.as_secs_f64()
            ),
            &k.work_ms,
            ms,
            "",
        ));
        rows.push(Row::spread(
            format!(
                "… `iotctl rotate` spawn → RotationStarted (iotd's log), the same rotations: L, \
                 the kill window's start (the lowest), {key}"
            ),
            &k.lead_ms,
            ms,
            "",
        ));
        rows.push(Row::spread(
            format!(
                "… `iotctl rotate --wait` spawn → exit 0, the same rotations: D, the kill \
                 window's end (the median), {key}"
            ),
            &k.window_ms,
            ms,
            "",
        ));
        rows.push(Row {
            measure: format!(
                "SIGKILL at an instant drawn uniformly from [L, D] after `iotctl rotate`, {key}, \
                 started again: bricked gateways (not back within {} s ready and connected with \
                 an identity whose certificate is ACTIVE and attached to its thing, no operation \
                 left), of the kills that landed in a rotation (+ before it started)",
                LIMIT.as_secs()
            ),
            median: format!("{bricked} of {landed} (+ {})", n - landed),
            min: String::new(),
            max: String::new(),
            runs: count(n),
            target: verdict(bricked == 0, "0"),
        });
        rows.push(Row {
            measure: format!(
                "… back with the expected identity (killed before the commit: the certificate \
                 it had, the rotation rolled back; after: the new one), {key}"
            ),
            median: format!("{} of {}", n - bricked - unexpected, n - bricked),
            min: String::new(),
            max: String::new(),
            runs: count(n - bricked),
            target: verdict(unexpected == 0, "all"),
        });
        let recovery: Vec<f64> = k
            .kills
            .iter()
            .filter(|k| k.bricked.is_none())
            .map(|k| k.recovery.as_secs_f64() * 1e3)
            .collect();
        rows.push(Row::spread(
            format!("… restart → ready and connected again, {key}"),
            &recovery,
            ms,
            "",
        ));
    }
    let all: Vec<&Kill> = killed.iter().flat_map(|k| &k.kills).collect();
    let by_step = |kills: &[&Kill]| {
        let mut steps: Vec<&str> = STEPS.to_vec();
        for k in kills {
            if !steps.contains(&k.step.as_str()) {
                steps.push(&k.step);
            }
        }
        steps
            .iter()
            .map(|s| format!("{s} {}", kills.iter().filter(|k| k.step == *s).count()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let windows = killed
        .iter()
        .map(|k| {
            format!(
                "{} [{}, {}]",
                k.key.label(),
                ms(Spread::of(&k.lead_ms).min.max(0.0)),
                ms(median(&k.window_ms))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    notes.push(format!(
        "rotation kills: {} in a rotation, {} before it started (seed {seed}); [L, D] = {windows}; \
         bricked gateways: {}",
        all.iter().filter(|k| in_rotation(k)).count(),
        all.iter().filter(|k| !in_rotation(k)).count(),
        all.iter().filter(|k| k.bricked.is_some()).count()
    ));
    for k in killed {
        let these: Vec<&Kill> = k.kills.iter().collect();
        notes.push(format!(
            "rotation kills, {}: state.json at the kill: {}",
            k.key.label(),
            by_step(&these)
        ));
    }
    notes.push(format!(
        "rotation kills, both: state.json at the kill: {}",
        by_step(&all)
    ));
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals() {
        let o: Vec<String> = [1, 2, 3, 4, 10, 11, 12, 13, 21, 112, 500]
            .map(ordinal)
            .into();
        assert_eq!(
            o,
            [
                "1st", "2nd", "3rd", "4th", "10th", "11th", "12th", "13th", "21st", "112th",
                "500th"
            ]
        );
    }

    #[test]
    fn p99_is_the_nearest_rank() {
        let v: Vec<f64> = (1..=500).map(f64::from).collect();
        assert_eq!(p99(&v), 495.0);
        assert_eq!(p99(&[3.0, 1.0, 2.0]), 3.0);
        assert!(p99(&[]).is_nan());
    }

    #[test]
    fn a_log_line_is_stamped() {
        let line = "2026-12-04T20:49:20.123456Z  INFO iotd::core: rotation started \
                    id=rotation-2 trigger=\"on-demand\"";
        let s = stamp(line).unwrap_or_default();
        assert!((s - 1_796_417_360.123_456).abs() < 1e-5, "{s}");
    }
}
