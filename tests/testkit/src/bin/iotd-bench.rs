//! `make bench`: iotd side by side with a client written with AWS's own device SDK, and what
//! iotd costs a gateway. One fake-iot-core in this process serves every run; iotd and the SDK
//! client are child processes. Prints one table.
//!
//! Provisioning: each run is a new gateway (fresh state directory, new serial, so a new thing
//! and its own claim client id); the time is from just before the process is spawned to the
//! moment it is connected with the certificate it was issued (iotd's STATUS "Provisioned as …;
//! certificate valid until …", the SDK client's "connected" line).
//!
//! Disk flushes: iotd (file key) provisions under strace, which counts its fsync-family calls and
//! renames from spawn to connected; then the same provisioning with every fsync/fdatasync
//! delayed (strace's fault injection), as on a gateway's eMMC, beside the same run without the
//! delay (what strace itself costs) and without strace.
//!
//! Crashes: a new gateway's iotd (file key) is killed with SIGKILL at an instant drawn uniformly
//! from [0, D] after its spawn, D being the median time of an unkilled provisioning; half of
//! the runs once, half twice (the second iotd killed the same way); then started again, it must
//! end provisioned with the certificate it uses ACTIVE and attached to its thing. Certificates
//! issued in a run besides that one are its duplicates.
//!
//! Onboarding: each run is a new gateway with no claim, registered with `iotctl onboarding
//! register` and started waiting; a claim from the fake's CreateProvisioningClaim (AWS's REST
//! path) is handed over with `iotctl onboard --json`, whose lines are timestamped as they
//! arrive. The CLI's time is from its spawn to its "claim-accepted" line; the gateway's CPU is
//! iotd's (every thread's run time, /proc/PID/task/*/schedstat) from just before that spawn to
//! that line; claim received → connected is from iotd's own log stamps (microseconds, in the
//! process that does the work), from "received the installer's claim" to "provisioned:
//! connected".
//!
//! Rotation (rotation.rs): back-to-back rotations (`iotctl rotate --wait` over a private system
//! bus) of one gateway with a file key and one with its key in a swtpm, timed by iotd's log
//! stamps from "rotation started" (RotationStarted) to the commit, with iotd's RSS and open
//! descriptors from the first rotation to the last; then iotd killed with SIGKILL at random
//! instants of a rotation and started again: bricked gateways, and where state.json stood at
//! each kill.

#[path = "iotd-bench/rotation.rs"]
mod rotation;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::onboarding::{self, Gateway};
use iotd_testkit::{Cloud, CrashRng, CrashRun, Iotd, WAIT, config, machine};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long one run may take; shorter than the harness's own limit, so that a slow run is
/// reported here (with its STATUS lines) rather than by a panic in the harness.
const LIMIT: Duration = Duration::from_secs(20);
const _: () = assert!(LIMIT.as_secs() < WAIT.as_secs());

/// The shipped unit's WatchdogSec=30s: iotd pings every 15 s, as it would in production.
const WATCHDOG_USEC: &str = "30000000";

/// iotd's log filter by default, what the journal gets (the harness's is debug).
const JOURNAL_LOG: &str = "info,rumqttc=warn,rustls=warn";

/// tokio's idle blocking threads (DNS lookups, file I/O) exit after 10 s; the idle window starts
/// after that, so that it measures the steady state and no thread's wake-ups vanish with it.
const SETTLE: Duration = Duration::from_secs(15);

/// The fsync family: every call that asks the kernel to put data or metadata on the disk.
const SYNC_CALLS: &str = "fsync,fdatasync,syncfs,sync_file_range,msync";
/// The calls the simulated slow disk delays.
const DELAYED_CALLS: &str = "fsync,fdatasync";
const RENAME_CALLS: &str = "rename,renameat,renameat2";
/// How iotd's STATUS lines reach the notify socket (sd-notify's `send` on a connected socket is a
/// write; sendto and sendmsg in case a libc makes it one of those): traced too, so that the calls
/// are counted up to the moment iotd says it is connected.
const NOTIFY_CALLS: &str = "write,sendto,sendmsg";
/// The release before the reshaped core (commit bbde86d, the iotd of issue 7), file key, counted
/// by this program (`--only fsync --iotd` with that commit's release build; a full strace of it
/// agrees: 14 fsync, 6 rename, no other sync call). With its key in a TPM it made 16 and 7.
const PREVIOUS_SYNCS: u32 = 14;
const PREVIOUS_RENAMES: u32 = 6;

/// Measures iotd against AWS's Python device SDK on the same local fake AWS IoT Core, and
/// iotd's footprint: memory, binary size, start-up, idle CPU and wake-ups, reconnects, and its
/// fsyncs per provisioning, with the time a slow disk adds; and that a provisioning killed with
/// SIGKILL once or twice at random instants always ends provisioned, with how many duplicate
/// certificates the kills cost; certificate rotation back to back (time, failures, RSS and
/// fds), and killed with SIGKILL at random instants (bricked gateways, kills by step).
///
/// The figures mean something only for release builds of iotd and iotctl, which are looked for
/// next to this program or in target/release/: run it as `make bench`, which builds them.
/// The fsync figures need strace (6.x: `-e inject=…:delay_exit=`); without it this fails.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Only these parts (comma-separated or repeated); all of them by default. `--only fsync`
    /// takes a few seconds.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// The iotd binary to measure instead of the release build (e.g. an older release's, to
    /// count its fsyncs with `--only fsync`).
    #[arg(long)]
    iotd: Option<PathBuf>,
    /// Runs of each provisioning client, and of start-up to READY=1.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Runs of each of the three provisionings of the fsync part (no strace, strace, strace
    /// with the slow disk).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    fsync_runs: u32,
    /// Milliseconds the simulated slow disk adds to every fsync and fdatasync (a gateway's eMMC:
    /// 5–20 ms).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    fsync_delay_ms: u32,
    /// Seconds of idle (connected, nothing to do) over which CPU time and wake-ups are counted.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    idle_secs: u64,
    /// Disconnects forced by the fake on a provisioned iotd, to show that nothing grows.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    reconnects: u32,
    /// Crash runs: a new gateway's iotd killed with SIGKILL at random instants of its
    /// provisioning (every other run once, the others twice), then started again.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    crash_runs: u32,
    /// The seed of the crash runs' kill instants, and of the rotation part's (each part prints
    /// the one it used; decimal or 0x-hex), to draw the same instants again. A new one by
    /// default (or IOTD_CRASH_SEED's).
    #[arg(long, value_parser = iotd_testkit::parse_seed)]
    crash_seed: Option<u64>,
    /// Rotations back to back, with each key backend (file, swtpm), for the rotation part's
    /// times and footprint. About a second each: iotd's new CONNECT waits for the second since
    /// the previous one.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    rotations: u32,
    /// SIGKILLs at random instants of a rotation, half with a file key, half with swtpm; iotd is
    /// started again after each and must come back with a working identity. Only kills that
    /// landed in a rotation count: one before iotd started it is sent again.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    rotation_kills: u32,
}

/// A part of the benchmark, for `--only`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// claim → connected: iotd (file key, swtpm) against AWS's SDK client; memory while
    /// provisioning.
    Provisioning,
    /// fsyncs and renames per provisioning (strace), and the time with a slow disk.
    Fsync,
    /// one provisioned iotd: start → READY=1, idle RSS, CPU and wake-ups, forced reconnects.
    Resident,
    /// stripped sizes of iotd and iotctl.
    Size,
    /// SIGKILL once or twice at random instants of a provisioning: runs recovered, duplicate
    /// certificates.
    Crash,
    /// trusted-user onboarding: iotctl's pairing + hand-over, the gateway's CPU per pairing,
    /// claim received → connected (file key, swtpm), idle RSS of an onboarded gateway.
    Onboarding,
    /// certificate rotation, back to back (file key, swtpm): RotationStarted → committed,
    /// failures, iotd's RSS and open fds from the first to the last; SIGKILL at random instants
    /// of a rotation: bricked gateways, kills by step.
    Rotation,
}

impl Args {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // The harness panics when it cannot set something up: a failed benchmark like any other.
    let cause = match tokio::spawn(bench(args)).await {
        Ok(Ok(())) => return ExitCode::SUCCESS,
        Ok(Err(e)) => format!("{e:#}"),
        Err(panic) => panic.to_string(),
    };
    eprintln!("iotd-bench: {cause}");
    ExitCode::FAILURE
}

/// One line of the table: a measure with its runs, or a single figure.
struct Row {
    measure: String,
    median: String,
    min: String,
    max: String,
    runs: String,
    target: String,
}

impl Row {
    fn one(measure: impl Into<String>, value: String, target: &str) -> Row {
        Row {
            measure: measure.into(),
            median: value,
            min: "".into(),
            max: "".into(),
            runs: "1".into(),
            target: target.into(),
        }
    }

    fn spread(
        measure: impl Into<String>,
        values: &[f64],
        show: impl Fn(f64) -> String,
        target: &str,
    ) -> Row {
        let s = Spread::of(values);
        Row {
            measure: measure.into(),
            median: show(s.median),
            min: show(s.min),
            max: show(s.max),
            runs: values.len().to_string(),
            target: target.into(),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Spread::default();
        }
        Spread {
            median: (v[(n - 1) / 2] + v[n / 2]) / 2.0,
            min: v[0],
            max: v[n - 1],
        }
    }
}

fn ms(v: f64) -> String {
    format!("{v:.1} ms")
}

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

/// MiB, and MB as the targets count them.
fn mib_mb(kib: f64) -> String {
    format!("{:.1} MiB ({:.1} MB)", kib / 1024.0, kib * 1024.0 / 1e6)
}

fn verdict(met: bool, text: &str) -> String {
    format!("{text}: {}", if met { "met" } else { "MISSED" })
}

async fn bench(args: Args) -> Result<()> {
    let exe = match &args.iotd {
        Some(p) => p
            .canonicalize()
            .with_context(|| format!("--iotd {}", p.display()))?,
        None => iotd_testkit::release_binary("iotd").map_err(anyhow::Error::msg)?,
    };
    // What the parts need is checked before any runs: a missing tool fails now, not after
    // minutes of other figures.
    let python = args.runs(Part::Provisioning).then(python).transpose()?;
    let iotctl =
        (args.runs(Part::Size) || args.runs(Part::Onboarding) || args.runs(Part::Rotation))
            .then(|| iotd_testkit::release_binary("iotctl"))
            .transpose()
            .map_err(anyhow::Error::msg)?;
    if args.runs(Part::Fsync) {
        strace_works()?;
    }
    let cloud = Cloud::start().await;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut failed = 0;

    if let Some(python) = &python {
        // 1. Claim -> connected with the issued certificate, three clients in turn.
        let mut file = Vec::new();
        let mut file_peak = Vec::new();
        let mut file_pss = Vec::new();
        let mut tpm = Vec::new();
        let mut tpm_peak = Vec::new();
        let mut commands = None;
        let mut sdk = Vec::new();
        let mut sdk_own = Vec::new();
        for run in 1..=args.runs {
            // Interleaved, so that a slow spell of the machine hits every client alike.
            let serial = format!("bench-file-{run:03}");
            match provision_iotd(&cloud, &exe, &serial, None).await {
                Ok(r) => {
                    file.push(r.elapsed);
                    file_peak.push(r.peak_rss_kib);
                    file_pss.push(r.pss_kib);
                }
                Err(e) => fail(&mut failed, &serial, &e),
            }
            let serial = format!("bench-tpm-{run:03}");
            let swtpm = iotd_testkit::swtpm::Swtpm::start();
            match provision_iotd(&cloud, &exe, &serial, Some(&swtpm)).await {
                Ok(r) => {
                    tpm.push(r.elapsed);
                    tpm_peak.push(r.peak_rss_kib);
                    commands = r.tpm_commands;
                }
                Err(e) => fail(&mut failed, &serial, &e),
            }
            let serial = format!("bench-sdk-{run:03}");
            match provision_sdk(&cloud, python, &serial).await {
                Ok((elapsed, own)) => {
                    sdk.push(elapsed);
                    sdk_own.push(own);
                }
                Err(e) => fail(&mut failed, &serial, &e),
            }
            eprintln!(
                "provisioning run {run:>3}/{}: iotd file {}, iotd swtpm {}, SDK {}",
                args.runs,
                last_ms(&file),
                last_ms(&tpm),
                last_ms(&sdk)
            );
        }
        let to_ms = |v: &[Duration]| v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
        let (file_ms, tpm_ms, sdk_ms) = (to_ms(&file), to_ms(&tpm), to_ms(&sdk));
        let sdk_median = Spread::of(&sdk_ms).median;
        // Without runs on either side there is no ratio (NaN: the verdict says MISSED).
        let ratio_of = |v: &[f64]| {
            if v.is_empty() || sdk_ms.is_empty() {
                f64::NAN
            } else {
                Spread::of(v).median / sdk_median
            }
        };
        rows.push(Row::spread(
            "claim → connected with the issued certificate, process start included: iotd, file key",
            &file_ms,
            ms,
            &verdict(ratio_of(&file_ms) <= 0.5, "≤ 0.5× SDK"),
        ));
        rows.push(Row::spread(
            "… iotd, key in swtpm (a fresh swtpm per run)",
            &tpm_ms,
            ms,
            &verdict(ratio_of(&tpm_ms) <= 0.5, "≤ 0.5× SDK"),
        ));
        rows.push(Row::spread(
            format!(
                "… AWS IoT Device SDK for Python (awsiotsdk {}, iotidentity, CSR, MQTT 3.1.1)",
                sdk_version(python)
            ),
            &sdk_ms,
            ms,
            "",
        ));
        rows.push(Row::spread(
            "… the same SDK client by its own clock (after Python's start and imports)",
            &sdk_own,
            ms,
            "",
        ));
        rows.push(Row::one(
            "ratio iotd file key / SDK (medians)",
            format!("{:.3}×", ratio_of(&file_ms)),
            "",
        ));
        rows.push(Row::one(
            "ratio iotd swtpm / SDK (medians)",
            format!("{:.3}×", ratio_of(&tpm_ms)),
            "",
        ));
        if let Some((p, r)) = commands {
            // A count iotd did not log reads "n/a" rather than hiding the other.
            let show = |n: Option<u64>| n.map_or_else(|| "n/a".to_owned(), |n| n.to_string());
            rows.push(Row::one(
                "TPM commands: provisioning on a fresh TPM / a restart until connected",
                format!("{} / {}", show(p), show(r)),
                "",
            ));
        }
        rows.push(Row::spread(
            "RSS peak (VmHWM) of a provisioning iotd, file key",
            &file_peak,
            mib,
            "",
        ));
        rows.push(Row::spread(
            "RSS peak (VmHWM) of a provisioning iotd, key in swtpm",
            &tpm_peak,
            mib,
            "",
        ));
        rows.push(Row::spread(
            "PSS of iotd just provisioned, file key",
            &file_pss,
            mib,
            "",
        ));
    }
    if args.runs(Part::Fsync) {
        notes = fsyncs(&args, &cloud, &exe, &mut rows, &mut failed).await;
    }
    if args.runs(Part::Resident) {
        // 2. One resident gateway: start-up, idle, reconnects.
        let resident = Resident::provision(&cloud, &exe).await?;
        let bus = DbusDaemon::start(
            &[&repo().join("packaging/dbus/io.iotd.Agent1.conf")],
            Some(r#"<policy user="root"><allow own="io.iotd.Agent1"/></policy>"#),
        );
        let mut ready = Vec::new();
        for _ in 0..args.runs {
            ready.push(resident.time_to_ready(bus.address()).await?);
        }
        rows.push(Row::spread(
            "start → READY=1 (provisioned, file key, bus name owned)",
            &ready,
            ms,
            "",
        ));
        let idle = resident.idle(&cloud, bus.address(), &args).await?;
        rows.push(Row::one(
            format!(
                "RSS idle, connected, after {} s + {} s idle",
                SETTLE.as_secs(),
                args.idle_secs
            ),
            mib_mb(idle.rss_kib),
            // 8 MB as the target says it: 8,000,000 bytes.
            &verdict(idle.rss_kib * 1024.0 <= 8e6, "≤ 8 MB"),
        ));
        rows.push(Row::one("PSS idle, same moment", mib(idle.pss_kib), ""));
        rows.push(Row::one(
            format!("CPU time over {} s idle", args.idle_secs),
            if idle.cpu_ms == 0.0 {
                format!("< {:.0} ms", idle.tick_ms)
            } else {
                format!("{:.0} ms", idle.cpu_ms)
            },
            "",
        ));
        rows.push(Row::one(
            format!(
                "wake-ups over {} s idle (voluntary context switches, all threads; watchdog on)",
                args.idle_secs
            ),
            idle.wakeups.map_or_else(
                || "n/a (threads changed)".to_owned(),
                |w| {
                    format!(
                        "{:.2}/s ({w} in {} s)",
                        w as f64 / args.idle_secs as f64,
                        args.idle_secs
                    )
                },
            ),
            &idle.wakeups.map_or_else(
                || "≤ 1/s: n/a".to_owned(),
                |w| verdict(w <= args.idle_secs, "≤ 1/s"),
            ),
        ));
        let growth = idle.reconnects;
        rows.push(Row::one(
            format!(
                "{} forced reconnects: RSS after the 1st → after the last (highest)",
                args.reconnects
            ),
            format!(
                "{} → {} ({})",
                mib(growth.rss_first),
                mib(growth.rss_last),
                mib(growth.rss_max)
            ),
            "",
        ));
        rows.push(Row::one(
            format!(
                "{} forced reconnects: open fds after the 1st → after the last (highest)",
                args.reconnects
            ),
            format!(
                "{} → {} ({})",
                growth.fds_first, growth.fds_last, growth.fds_max
            ),
            &verdict(growth.fds_last <= growth.fds_first, "no growth"),
        ));
        rows.push(Row::one(
            format!(
                "{} forced reconnects: disconnect → connected again",
                args.reconnects
            ),
            format!(
                "median {}, max {}",
                ms(Spread::of(&growth.gaps_ms).median),
                ms(Spread::of(&growth.gaps_ms).max)
            ),
            "",
        ));
    }
    if let Some(iotctl) = iotctl.as_deref().filter(|_| args.runs(Part::Onboarding)) {
        onboardings(&args, &exe, iotctl, &mut rows, &mut failed).await?;
    }
    cloud.stop().await;
    if args.runs(Part::Crash) {
        notes.extend(crashes(&args, &exe, &mut rows, &mut failed).await?);
    }
    if let Some(iotctl) = iotctl.as_deref().filter(|_| args.runs(Part::Rotation)) {
        notes.extend(rotation::rotations(&args, &exe, iotctl, &mut rows, &mut failed).await?);
    }

    if let Some(iotctl) = iotctl.filter(|_| args.runs(Part::Size)) {
        // 3. Binary sizes. iotd has no build without onboarding: its server and the installer's
        // page are always in.
        let binaries = [
            (
                "iotd",
                ", onboarding server and installer's page included",
                &exe,
                Some(5.0),
            ),
            ("iotctl", "", &iotctl, None),
        ];
        for (name, note, binary, target) in binaries {
            let size = stripped_size(binary)? as f64 / 1e6;
            rows.push(Row::one(
                format!(
                    "stripped {name} ({}, release profile: opt-level z, fat LTO{note})",
                    std::env::consts::ARCH
                ),
                format!("{size:.2} MB"),
                &target.map_or_else(String::new, |t| verdict(size <= t, "≤ 5 MB")),
            ));
        }
    }
    println!();
    println!(
        "iotd-bench: {} (fake-iot-core in the harness, iotd and the SDK client as processes)",
        machine()
    );
    println!();
    println!("| measure | median | min | max | runs | target |");
    println!("|---|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.measure, r.median, r.min, r.max, r.runs, r.target
        );
    }
    if !notes.is_empty() {
        println!();
    }
    for note in notes {
        println!("{note}");
    }
    if failed > 0 {
        bail!("{failed} runs failed (FAILED above)");
    }
    Ok(())
}

/// Crash runs per fake: each run leaves a thing and its certificates in the fake's registry,
/// which the fake serialises whole for every write; a fresh fake now and then keeps the last
/// runs like the first.
const CRASH_RUNS_PER_CLOUD: u32 = 100;

/// Unkilled provisionings timed for the crash window (after one not counted).
const CRASH_WINDOW_RUNS: u32 = 10;

/// The crash part: `--crash-runs` new gateways, every other one killed once, the others twice,
/// each at an instant drawn uniformly from [0, D] after that iotd's spawn (D: the median of
/// `CRASH_WINDOW_RUNS` unkilled provisionings, after a warm-up), then started again until
/// provisioned. Returns
/// the lines printed under the table (the distribution of the kills).
async fn crashes(
    args: &Args,
    exe: &Path,
    rows: &mut Vec<Row>,
    failed: &mut u32,
) -> Result<Vec<String>> {
    let seed = args
        .crash_seed
        .unwrap_or_else(|| iotd_testkit::crash_seed("IOTD_CRASH_SEED"));
    eprintln!("crash: seed {seed} (--crash-seed {seed} draws the same kill instants)");
    let mut rng = CrashRng::new(seed);
    // Each run with the window it was drawn from; the windows, one per fake, in ms.
    let mut runs: Vec<(CrashRun, Duration)> = Vec::new();
    let mut windows_ms = Vec::new();
    let mut cloud: Option<(Cloud, Duration)> = None;
    for i in 0..args.crash_runs {
        if i % CRASH_RUNS_PER_CLOUD == 0 {
            if let Some((old, _)) = cloud.take() {
                old.stop().await;
            }
            // D anew with each fake: the machine's load changes (others share it), and a D
            // that no longer matches a provisioning's duration would move the kills.
            let fresh = iotd_testkit::crash_cloud().await;
            let (window, _) = iotd_testkit::crash_window(&fresh, exe, CRASH_WINDOW_RUNS)
                .await
                .map_err(anyhow::Error::msg)
                .context("unkilled provisionings, to time the crash window")?;
            windows_ms.push(window.as_secs_f64() * 1e3);
            cloud = Some((fresh, window));
        }
        let Some((cloud, window)) = &cloud else {
            unreachable!("a fake was started for run 0")
        };
        let serial = format!("crash-{:04}", i + 1);
        let run =
            iotd_testkit::crash_run(cloud, exe, &serial, 1 + i % 2, *window, &mut rng, true).await;
        if let Some(why) = &run.failure {
            fail(failed, &serial, &anyhow::anyhow!("{why}"));
        }
        runs.push((run, *window));
        if (i + 1) % 100 == 0 || i + 1 == args.crash_runs {
            eprintln!(
                "crash run {:>4}/{}: D = {}, {} recovered, {} duplicate certificates",
                i + 1,
                args.crash_runs,
                ms(window.as_secs_f64() * 1e3),
                runs.iter().filter(|(r, _)| r.recovered).count(),
                runs.iter().map(|(r, _)| r.duplicates).sum::<u32>()
            );
        }
    }
    if let Some((cloud, _)) = cloud {
        cloud.stop().await;
    }
    let kills: Vec<(Duration, Duration, &str)> = runs
        .iter()
        .flat_map(|(r, window)| {
            r.kill_instants
                .iter()
                .zip(&r.killed_at)
                .map(move |(at, state)| (*at, *window, state.as_str()))
        })
        .collect();
    let runs: Vec<&CrashRun> = runs.iter().map(|(r, _)| r).collect();

    let count = |n: usize| n.to_string();
    rows.push(Row::spread(
        format!(
            "crash window D: median of {CRASH_WINDOW_RUNS} unkilled provisionings, spawn → \
             connected, file key (anew every {CRASH_RUNS_PER_CLOUD} runs; kills are drawn \
             uniformly from [0, D] after each spawn)"
        ),
        &windows_ms,
        ms,
        "",
    ));
    for kills in [1, 2] {
        let these: Vec<&CrashRun> = runs.iter().copied().filter(|r| r.kills == kills).collect();
        if these.is_empty() {
            continue;
        }
        let recovered = these.iter().filter(|r| r.recovered).count();
        let duplicates: u32 = these.iter().map(|r| r.duplicates).sum();
        let attached: u32 = these.iter().map(|r| r.attached_duplicates).sum();
        let per_100 = |n: u32| f64::from(n) * 100.0 / these.len() as f64;
        let times = if kills == 1 { "once" } else { "twice" };
        rows.push(Row {
            measure: format!(
                "SIGKILL {times}, then started again: runs ending provisioned (certificate in \
                 use ACTIVE, attached to the thing, connected with it)"
            ),
            median: format!("{recovered} of {}", these.len()),
            min: String::new(),
            max: String::new(),
            runs: count(these.len()),
            target: verdict(recovered == these.len(), "all"),
        });
        rows.push(Row {
            measure: format!(
                "… duplicate certificates (issued in the run, not in use), SIGKILL {times}: \
                 total (per 100 runs); ACTIVE and attached to the thing; PENDING_ACTIVATION"
            ),
            median: format!(
                "{duplicates} ({:.1}); {attached} ({:.1}); {} ({:.1})",
                per_100(duplicates),
                per_100(attached),
                duplicates - attached,
                per_100(duplicates - attached)
            ),
            min: String::new(),
            max: String::new(),
            runs: count(these.len()),
            target: String::new(),
        });
    }
    let total: u32 = runs.iter().map(|r| r.duplicates).sum();
    let with_duplicate = runs.iter().filter(|r| r.duplicates > 0).count();
    rows.push(Row {
        measure: "… duplicate certificates, all runs: total (per 100 runs); runs with one or more"
            .into(),
        median: format!(
            "{total} ({:.1}); {with_duplicate}",
            f64::from(total) * 100.0 / runs.len() as f64
        ),
        min: String::new(),
        max: String::new(),
        runs: count(runs.len()),
        target: String::new(),
    });
    let recovery: Vec<f64> = runs
        .iter()
        .filter(|r| r.recovered)
        .map(|r| r.recovery.as_secs_f64() * 1e3)
        .collect();
    rows.push(Row::spread(
        "… the last start → provisioned and connected (recovered runs)",
        &recovery,
        ms,
        "",
    ));

    // Where the kills landed: by time (tenths of D), and by what state.json held after them.
    let mut tenths = [0usize; 11];
    for (at, window, _) in &kills {
        let tenth = (at.as_secs_f64() / window.as_secs_f64() * 10.0).floor() as usize;
        tenths[tenth.min(10)] += 1;
    }
    let tenths = tenths
        .iter()
        .enumerate()
        .map(|(i, n)| match i {
            10 => format!("> D {n}"),
            _ => format!("{}–{}% {n}", i * 10, (i + 1) * 10),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let order = [
        "none",
        "unprovisioned",
        "starting",
        "key-ready",
        "certificate-issued",
        "thing-registered",
        "provisioned",
    ];
    let rank = |s: &str| order.iter().position(|o| *o == s).unwrap_or(order.len());
    let mut states: Vec<&str> = kills.iter().map(|(_, _, s)| *s).collect();
    states.sort_by_key(|s| (rank(s), *s));
    states.dedup();
    let by_state = states
        .iter()
        .map(|s| format!("{s} {}", kills.iter().filter(|(_, _, k)| k == s).count()))
        .collect::<Vec<_>>()
        .join(", ");
    // Runs killed once, by where that kill left state.json: which kills cost a certificate.
    let once = states
        .iter()
        .filter_map(|s| {
            let these: Vec<&CrashRun> = runs
                .iter()
                .copied()
                .filter(|r| r.kills == 1 && r.killed_at[0] == *s)
                .collect();
            (!these.is_empty()).then(|| {
                format!(
                    "{s} {} runs → {} duplicates ({} attached)",
                    these.len(),
                    these.iter().map(|r| r.duplicates).sum::<u32>(),
                    these.iter().map(|r| r.attached_duplicates).sum::<u32>()
                )
            })
        })
        .collect::<Vec<_>>()
        .join("; ");
    Ok(vec![
        format!(
            "crash: {} runs (seed {seed}), D = {} (median; {}–{}); {} kills at (share of the \
             run's D after the spawn): {tenths}",
            runs.len(),
            ms(median(&windows_ms)),
            ms(Spread::of(&windows_ms).min),
            ms(Spread::of(&windows_ms).max),
            kills.len()
        ),
        format!("crash: state.json right after a kill: {by_state}"),
        format!("crash: runs killed once, by state.json after the kill: {once}"),
    ])
}

/// One onboarding, measured (see the module's comment).
struct Onboarded {
    /// iotctl's spawn → its "claim-accepted" line.
    accepted_ms: f64,
    /// iotd's run time over that span; None when one of its threads exited meanwhile (its time
    /// went with it).
    cpu_ms: Option<f64>,
    /// utime + stime over that span, in clock ticks.
    cpu_ticks: u64,
    /// iotd's log: "received the installer's claim" → "provisioned: connected".
    received_to_connected_ms: f64,
    /// iotctl's lines: "claim-accepted" → the "connected" phase.
    accepted_to_connected_ms: f64,
    /// What the claim had left when iotctl saw the gateway connected, in seconds.
    claim_left: f64,
    /// The PBKDF2 iterations iotctl ran (the record's).
    iterations: u64,
}

/// The onboarding part: `--runs` gateways onboarded with their key in a file, as many with it
/// in a fresh swtpm each, interleaved; then the last file-key gateway, restarted, idle.
///
/// On a fake of its own: after the resident part (500 reconnects) the shared one answers
/// slower, which made claim received → connected about three times as long (median 39 ms
/// instead of 13 ms, file key).
async fn onboardings(
    args: &Args,
    exe: &Path,
    iotctl: &Path,
    rows: &mut Vec<Row>,
    failed: &mut u32,
) -> Result<()> {
    let cloud = Cloud::start().await;
    let measured = onboarding_runs(args, &cloud, exe, iotctl, rows, failed).await;
    cloud.stop().await;
    measured
}

async fn onboarding_runs(
    args: &Args,
    cloud: &Cloud,
    exe: &Path,
    iotctl: &Path,
    rows: &mut Vec<Row>,
    failed: &mut u32,
) -> Result<()> {
    let (mut file, mut tpm) = (Vec::new(), Vec::new());
    let mut kept = None;
    for run in 1..=args.runs {
        // Interleaved, so that a slow spell of the machine hits both alike.
        let serial = format!("onboard-file-{run:03}");
        match onboard_once(cloud, exe, iotctl, &serial, None).await {
            Ok((o, gateway)) => {
                file.push(o);
                kept = Some(gateway);
            }
            Err(e) => fail(failed, &serial, &e),
        }
        let serial = format!("onboard-tpm-{run:03}");
        let swtpm = iotd_testkit::swtpm::Swtpm::start();
        match onboard_once(cloud, exe, iotctl, &serial, Some(&swtpm)).await {
            Ok((o, _)) => tpm.push(o),
            Err(e) => fail(failed, &serial, &e),
        }
        let last = |v: &[Onboarded], f: fn(&Onboarded) -> f64| {
            v.last().map_or_else(|| "-".to_owned(), |o| ms(f(o)))
        };
        eprintln!(
            "onboarding run {run:>3}/{}: iotctl to claim accepted: file {}, swtpm {}; claim \
             received → connected: file {}, swtpm {}",
            args.runs,
            last(&file, |o| o.accepted_ms),
            last(&tpm, |o| o.accepted_ms),
            last(&file, |o| o.received_to_connected_ms),
            last(&tpm, |o| o.received_to_connected_ms),
        );
    }
    let of = |v: &[Onboarded], f: fn(&Onboarded) -> f64| v.iter().map(f).collect::<Vec<_>>();
    let cpu = |v: &[Onboarded]| v.iter().filter_map(|o| o.cpu_ms).collect::<Vec<_>>();
    let ms2 = |v: f64| format!("{v:.2} ms");
    let iterations = file.iter().chain(&tpm).map(|o| o.iterations).max();
    rows.push(Row::spread(
        format!(
            "iotctl onboard: start → claim accepted (client side: process start, TLS, \
             PBKDF2-HMAC-SHA256 × {}, SPAKE2+, the sealed claim), gateway with file key",
            iterations.map_or_else(|| "?".to_owned(), |n| n.to_string())
        ),
        &of(&file, |o| o.accepted_ms),
        ms,
        "",
    ));
    rows.push(Row::spread(
        "… gateway with its keys in swtpm (its TLS key too)",
        &of(&tpm, |o| o.accepted_ms),
        ms,
        "",
    ));
    rows.push(Row::spread(
        "gateway CPU per pairing + hand-over (iotd, all threads' run time from \
         /proc/PID/task/*/schedstat, iotctl's start → its claim-accepted line), file key",
        &cpu(&file),
        ms2,
        "",
    ));
    rows.push(Row::spread(
        "… key in swtpm (iotd's own CPU: the TLS signature is swtpm's)",
        &cpu(&tpm),
        ms2,
        "",
    ));
    if !file.is_empty() {
        let tick_ms = procfs::clock_tick_ms();
        let ticks: u64 = file.iter().map(|o| o.cpu_ticks).sum();
        rows.push(Row::one(
            format!(
                "… file key, by utime + stime (/proc/PID/stat, {tick_ms:.0} ms ticks): total of \
                 {} runs / {}",
                file.len(),
                file.len()
            ),
            ms(ticks as f64 * tick_ms / file.len() as f64),
            "",
        ));
    }
    rows.push(Row::spread(
        "claim received → connected with its own identity (iotd's log stamps), file key",
        &of(&file, |o| o.received_to_connected_ms),
        ms,
        "",
    ));
    rows.push(Row::spread(
        "… key in swtpm",
        &of(&tpm, |o| o.received_to_connected_ms),
        ms,
        "",
    ));
    rows.push(Row::spread(
        "… as iotctl sees it (claim-accepted line → connected event), file key",
        &of(&file, |o| o.accepted_to_connected_ms),
        ms,
        "",
    ));
    rows.push(Row::spread(
        "… as iotctl sees it, key in swtpm",
        &of(&tpm, |o| o.accepted_to_connected_ms),
        ms,
        "",
    ));
    let mut left = of(&file, |o| o.claim_left);
    left.extend(of(&tpm, |o| o.claim_left));
    rows.push(Row::spread(
        format!(
            "time the claim had left when connected (of its {} s, by iotctl)",
            onboarding::CLAIM_LIFETIME_SECS
        ),
        &left,
        |v| format!("{v:.0} s"),
        "",
    ));
    if let Some((gateway, listen)) = kept {
        let idle = gateway.idle_onboarded(listen, args.idle_secs).await?;
        rows.push(Row::one(
            format!(
                "RSS idle of an onboarded gateway (file key; onboarding server running, window \
                 closed), restarted, connected, after {} s + {} s idle",
                SETTLE.as_secs(),
                args.idle_secs
            ),
            mib_mb(idle.0),
            &verdict(idle.0 * 1024.0 <= 8e6, "≤ 8 MB"),
        ));
        rows.push(Row::one("PSS idle, same moment", mib(idle.1), ""));
    }
    Ok(())
}

/// A new gateway (`serial`, its key in `tpm` or a file) onboarded: registered, started waiting,
/// a claim created and handed over with iotctl, provisioned; iotd stopped. The gateway is
/// returned for a restart, with the onboarding server's address.
async fn onboard_once(
    cloud: &Cloud,
    exe: &Path,
    iotctl: &Path,
    serial: &str,
    tpm: Option<&iotd_testkit::swtpm::Swtpm>,
) -> Result<(Onboarded, (Resident, std::net::SocketAddr))> {
    let dir = tempfile::tempdir()?;
    let gateway = Gateway::new(cloud, dir.path(), serial, tpm)?;
    let label = gateway.register(iotctl)?;
    let (script, log) = quiet_iotd(exe, dir.path())?;
    let mut iotd =
        Iotd::start_with_config(&script, &gateway.config_path, &gateway.state_dir, &[]).await;
    let measured = measure_onboarding(cloud, iotctl, &gateway, &label.qr, &mut iotd, &log).await;
    let measured =
        measured.map_err(|e| e.context(iotd_testkit::log_tail(&log, 10).trim_end().to_owned()));
    let exit = iotd.terminate().await;
    let measured = measured?;
    if exit.code() != Some(0) {
        bail!("iotd exited with {exit} on SIGTERM, not 0");
    }
    let config = std::fs::read_to_string(&gateway.config_path)
        .with_context(|| format!("reading {}", gateway.config_path.display()))?;
    let resident = Resident {
        dir,
        script,
        log,
        config,
        thing: gateway.thing,
    };
    Ok((measured, (resident, gateway.listen)))
}

async fn measure_onboarding(
    cloud: &Cloud,
    iotctl: &Path,
    gateway: &Gateway,
    qr: &str,
    iotd: &mut Iotd,
    log: &Path,
) -> Result<Onboarded> {
    onboarding::wait_open(iotd, gateway.listen, LIMIT).await?;
    let pid = iotd.pid().context("iotd's pid")?;
    let claim_dir = tempfile::tempdir()?;
    let claim =
        onboarding::create_provisioning_claim(cloud, onboarding::TEMPLATE, claim_dir.path())
            .await?;
    let site = format!("{}=bench", onboarding::INSTALLER_PARAMETER);
    let cpu_now = || {
        let run_time = procfs::run_time_ns(pid)
            .with_context(|| format!("reading /proc/{pid}/task/*/schedstat"))?;
        let ticks = procfs::cpu_ticks(pid)
            .with_context(|| format!("reading iotd's CPU time from /proc/{pid}/stat"))?;
        Ok::<_, anyhow::Error>((run_time, ticks))
    };
    let before = cpu_now()?;
    let mut cli = onboarding::Onboard::spawn(iotctl, &gateway.address(), qr, &claim, &[&site])?;
    let deadline = Instant::now() + LIMIT;
    let (mut accepted, mut connected) = (None, None);
    while let Some(line) = cli.next(deadline).await? {
        match (line.kind(), line.phase()) {
            // Read first: the gateway goes on provisioning meanwhile.
            ("claim-accepted", _) => accepted = Some((line.at, cpu_now()?)),
            (_, Some("connected")) => connected = Some(line.at),
            _ => {}
        }
    }
    let result = cli.finish(deadline).await?;
    let (accepted_at, after) =
        accepted.ok_or_else(|| anyhow!("iotctl printed no claim-accepted line: {result}"))?;
    let connected_at =
        connected.ok_or_else(|| anyhow!("iotctl printed no connected phase: {result}"))?;
    let done = format!(
        "STATUS=Provisioned as {}; certificate valid until",
        gateway.thing
    );
    wait_for(iotd, &done, log, Instant::now()).await?;
    let received = onboarding::log_instant(log, onboarding::LOG_CLAIM_RECEIVED)?;
    let connected = onboarding::log_instant(log, onboarding::LOG_CONNECTED)?;
    let ((ns_before, threads_before), ticks_before) = before;
    let ((ns_after, threads_after), ticks_after) = after;
    // A thread that came is counted from its start; one that went took its time with it.
    let kept = threads_before.iter().all(|t| threads_after.contains(t));
    Ok(Onboarded {
        accepted_ms: accepted_at.as_secs_f64() * 1e3,
        cpu_ms: kept.then(|| ns_after.saturating_sub(ns_before) as f64 / 1e6),
        cpu_ticks: ticks_after.saturating_sub(ticks_before),
        received_to_connected_ms: (connected - received) * 1e3,
        accepted_to_connected_ms: (connected_at - accepted_at).as_secs_f64() * 1e3,
        claim_left: result["claim_seconds_left"]
            .as_f64()
            .ok_or_else(|| anyhow!("iotctl's result has no claim_seconds_left: {result}"))?,
        iterations: gateway.pbkdf_iterations()?,
    })
}

fn fail(failed: &mut u32, serial: &str, e: &anyhow::Error) {
    *failed += 1;
    eprintln!("{serial} FAILED: {e:#}");
}

fn last_ms(v: &[Duration]) -> String {
    v.last()
        .map_or_else(|| "-".to_owned(), |d| ms(d.as_secs_f64() * 1e3))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv `make setup` made (IOTD_VENV, as the Makefile exports it, or target/venv).
fn python() -> Result<PathBuf> {
    let venv =
        std::env::var_os("IOTD_VENV").map_or_else(|| repo().join("target/venv"), PathBuf::from);
    let python = venv.join("bin/python");
    if !python.exists() {
        bail!(
            "{} is missing: run `make bench` (or scripts/python-venv.sh)",
            python.display()
        );
    }
    Ok(python)
}

fn sdk_version(python: &Path) -> String {
    std::process::Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('awsiotsdk'))",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "?".to_owned())
}

/// A process's memory and descriptors, from /proc.
mod procfs {
    use std::path::Path;

    fn field_kib(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    pub fn status_kib(pid: u32, name: &str) -> Option<f64> {
        field_kib(
            &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
            name,
        )
    }

    pub fn pss_kib(pid: u32) -> Option<f64> {
        field_kib(
            &std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?,
            "Pss",
        )
    }

    pub fn fds(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
    }

    /// utime + stime in clock ticks (of every thread, dead ones included).
    pub fn cpu_ticks(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces: fields are counted after its closing parenthesis.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5), so 11 and 12 after the name.
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    }

    /// Voluntary context switches of every live thread: each is a thread going to sleep, so
    /// each wake-up is one (pre-emptions, the involuntary ones, depend on the machine's load).
    /// By thread id.
    pub fn wakeups(pid: u32) -> std::collections::BTreeMap<String, u64> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Default::default();
        };
        tasks
            .flatten()
            .filter_map(|t| {
                let status = std::fs::read_to_string(t.path().join("status")).ok()?;
                let n = field_kib(&status, "voluntary_ctxt_switches")? as u64;
                Some((t.file_name().to_string_lossy().into_owned(), n))
            })
            .collect()
    }

    /// The run time of every live thread (schedstat's first field), in nanoseconds, and their
    /// ids: exact where utime + stime count in clock ticks (10 ms at CLK_TCK 100).
    pub fn run_time_ns(pid: u32) -> Option<(u64, Vec<String>)> {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        let mut total = 0;
        let mut tids = Vec::new();
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
            tids.push(task.file_name().to_string_lossy().into_owned());
        }
        tids.sort();
        Some((total, tids))
    }

    pub fn clock_tick_ms() -> f64 {
        let hz = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(100.0);
        1000.0 / hz
    }

    pub fn exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }
}

struct Provisioned {
    elapsed: Duration,
    peak_rss_kib: f64,
    pss_kib: f64,
    /// With a TPM: commands to provision, and to reconnect after a restart.
    tpm_commands: Option<(Option<u64>, Option<u64>)>,
}

/// One gateway provisioned from scratch by iotd.
async fn provision_iotd(
    cloud: &Cloud,
    exe: &Path,
    serial: &str,
    swtpm: Option<&iotd_testkit::swtpm::Swtpm>,
) -> Result<Provisioned> {
    let dir = tempfile::tempdir()?;
    let (script, log) = quiet_iotd(exe, dir.path())?;
    let mut conf = config(cloud, &dir.path().join("state"), serial);
    if let Some(t) = swtpm {
        conf.push_str(&format!(
            "\n[key]\nbackend = \"tpm\"\ntcti = \"{}\"\n",
            t.tcti()
        ));
    }
    let done = format!("STATUS=Provisioned as gw-{serial}; certificate valid until");
    let started = Instant::now();
    let mut iotd = Iotd::start(&script, dir.path(), &conf).await;
    let elapsed = wait_for(&mut iotd, &done, &log, started).await?;
    let pid = iotd.pid().context("iotd's pid")?;
    let peak_rss_kib = procfs::status_kib(pid, "VmHWM")
        .with_context(|| format!("reading VmHWM from /proc/{pid}/status"))?;
    let pss_kib = procfs::pss_kib(pid)
        .with_context(|| format!("reading Pss from /proc/{pid}/smaps_rollup"))?;
    let exit = iotd.terminate().await;
    if exit.code() != Some(0) {
        bail!("iotd exited with {exit} on SIGTERM, not 0");
    }
    let mut result = Provisioned {
        elapsed,
        peak_rss_kib,
        pss_kib,
        tpm_commands: None,
    };
    if swtpm.is_some() {
        let provisioning = hardware_commands(&log, "provisioned: connected");
        // A restart: straight to the session, through the TPM once more.
        let mut again = Iotd::start(&script, dir.path(), &conf).await;
        wait_for(&mut again, &done, &log, Instant::now()).await?;
        let reconnect = hardware_commands(&log, "connected");
        let exit = again.terminate().await;
        if exit.code() != Some(0) {
            bail!("iotd exited with {exit} on SIGTERM after the restart, not 0");
        }
        result.tpm_commands = Some((provisioning, reconnect));
    }
    Ok(result)
}

/// One gateway provisioned from scratch by tests/interop/fleet_provision.py, a client written
/// with AWS's device SDK the way AWS's samples do (CSR flow, P-256 key, MQTT 3.1.1): its time
/// from spawn, and by its own clock.
async fn provision_sdk(cloud: &Cloud, python: &Path, serial: &str) -> Result<(Duration, f64)> {
    let out = tempfile::tempdir()?;
    let (cert, key) = cloud.claim();
    let script = repo().join("tests/interop/fleet_provision.py");
    let port = cloud.mqtt_port().to_string();
    let client_id = format!("claim-{serial}");
    let param = format!("SerialNumber={serial}");
    let mut command = tokio::process::Command::new(python);
    command
        .arg(&script)
        .args(["--endpoint", "localhost", "--port", &port, "--ca"])
        .arg(cloud.root_ca())
        .args(["--cert", &cert, "--key", &key, "--template", "gateway"])
        .args([
            "--flow",
            "csr",
            "--protocol",
            "mqtt3",
            "--client-id",
            &client_id,
        ])
        .args(["--param", &param, "--out-dir"])
        .arg(out.path())
        .args(["--quiet", "--mark-connected"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = command.spawn().context("starting the SDK client")?;
    let stdout = child.stdout.take().context("the SDK client's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut connected = None;
    let mut result = None;
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if line == "connected" && connected.is_none() {
                connected = Some(started.elapsed());
            } else if line.starts_with('{') {
                result = Some(line);
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(LIMIT, read)
        .await
        .context("the SDK client took too long")??;
    let output = child.wait_with_output().await?;
    if !output.status.success() {
        bail!(
            "the SDK client failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let connected = connected.context("the SDK client never said it was connected")?;
    let json: serde_json::Value = serde_json::from_str(&result.context("no result line")?)?;
    let own = json["connectedSeconds"]
        .as_f64()
        .context("no connectedSeconds in the result")?;
    if json["thingName"] != format!("gw-{serial}") {
        bail!("the SDK client registered {}", json["thingName"]);
    }
    Ok((connected, own * 1e3))
}

/// Disk flushes and renames per provisioning (iotd with a file key under strace), and the time
/// a slow disk adds (strace delays every fsync and fdatasync). Three provisionings take turns:
/// without strace, under strace, under strace with the delay; the second is what strace alone
/// costs. Returns the summary lines printed under the table.
async fn fsyncs(
    args: &Args,
    cloud: &Cloud,
    exe: &Path,
    rows: &mut Vec<Row>,
    failed: &mut u32,
) -> Vec<String> {
    let delay = args.fsync_delay_ms;
    let (mut plain, mut traced, mut slow) = (Vec::new(), Vec::new(), Vec::new());
    let mut calls = Vec::new();
    for run in 1..=args.fsync_runs {
        let mut seen = Vec::new();
        for (name, times, tracing) in [
            ("plain", &mut plain, Tracing::Off),
            ("strace", &mut traced, Tracing::Strace),
            ("slow", &mut slow, Tracing::SlowDisk(delay)),
        ] {
            let serial = format!("bench-{name}-{run:03}");
            match provision_traced(cloud, exe, &serial, tracing).await {
                Ok((elapsed, c)) => {
                    times.push(elapsed);
                    seen.push(c.as_ref().map_or_else(String::new, Calls::describe));
                    calls.extend(c);
                }
                Err(e) => {
                    fail(failed, &serial, &e);
                    seen.push("failed".to_owned());
                }
            }
        }
        eprintln!(
            "fsync run {run:>3}/{}: no strace {}, strace {} ({}), slow disk {} ({})",
            args.fsync_runs,
            last_ms(&plain),
            last_ms(&traced),
            seen[1],
            last_ms(&slow),
            seen[2]
        );
    }
    let to_ms = |v: &[Duration]| v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
    let (plain, traced, slow) = (to_ms(&plain), to_ms(&traced), to_ms(&slow));
    let figure = |f: fn(&Calls) -> u32| calls.iter().map(|c| f(c) as f64).collect::<Vec<_>>();
    let (syncs, renames, after, delayed) = (
        figure(Calls::syncs),
        figure(|c| c.renames),
        figure(|c| c.after),
        figure(Calls::delayed),
    );
    let count = |v: f64| v.to_string();
    let half = PREVIOUS_SYNCS / 2;
    // Every traced run must meet it (none: MISSED).
    let met = !syncs.is_empty() && Spread::of(&syncs).max <= f64::from(half);
    let target = format!("≤ {half} (half of {PREVIOUS_SYNCS})");
    rows.push(Row::spread(
        format!(
            "fsync-family calls per provisioning, spawn → connected, file key (strace: \
             {SYNC_CALLS}); previous release {PREVIOUS_SYNCS}"
        ),
        &syncs,
        count,
        &verdict(met, &target),
    ));
    rows.push(Row::spread(
        format!("… renames, same runs ({RENAME_CALLS}); previous release {PREVIOUS_RENAMES}"),
        &renames,
        count,
        "",
    ));
    rows.push(Row::spread(
        "… fsync-family calls and renames after connected, until iotd exits on SIGTERM",
        &after,
        count,
        "",
    ));
    rows.push(Row::spread(
        "claim → connected, file key, without strace (taking turns with the two below)",
        &plain,
        ms,
        "",
    ));
    rows.push(Row::spread(
        "… under strace, nothing injected (what strace itself costs)",
        &traced,
        ms,
        "",
    ));
    rows.push(Row::spread(
        format!(
            "… under strace, every fsync and fdatasync delayed {delay} ms (a slow disk; a \
             gateway's eMMC takes 5–20 ms)"
        ),
        &slow,
        ms,
        "",
    ));
    let added = median(&slow) - median(&traced);
    // What the delay would add if every delayed call held up the provisioning; one that
    // overlaps a request (the key's, with the claim connection) adds less.
    let expected = median(&delayed) * f64::from(delay);
    rows.push(Row::one(
        format!(
            "slow disk − strace alone (medians); expected with every delayed call in series: \
             fsync + fdatasync calls × {delay} ms"
        ),
        format!("{} (expected {})", ms(added), ms(expected)),
        "",
    ));
    let range = |v: &[f64]| {
        let s = Spread::of(v);
        if v.is_empty() {
            "n/a".to_owned()
        } else if s.min == s.max {
            count(s.min)
        } else {
            format!("{}–{} (median {})", s.min, s.max, s.median)
        }
    };
    let mut notes = vec![
        format!(
            "fsyncs per provisioning: {} (renames {}); previous release {PREVIOUS_SYNCS} fsyncs, \
             {PREVIOUS_RENAMES} renames (strace, file key)",
            range(&syncs),
            range(&renames)
        ),
        format!("target {}", verdict(met, &target)),
        format!(
            "slow disk (+{delay} ms per fsync/fdatasync, strace fault injection): claim → \
             connected {} (median of {}), against {} without strace; strace alone makes it {}, \
             so the delay added {} ({} × {delay} ms = {} if every delayed call were in series)",
            ms(median(&slow)),
            slow.len(),
            ms(median(&plain)),
            ms(median(&traced)),
            ms(added),
            range(&delayed),
            ms(expected)
        ),
    ];
    if Spread::of(&after).max > 0.0 {
        notes.push(format!(
            "note: iotd flushed or renamed after it said connected ({} per run): not counted above",
            range(&after)
        ));
    }
    notes
}

/// The median; NaN without values (so that a figure of no runs reads as such).
fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        Spread::of(values).median
    }
}

/// Fails unless strace is there and can trace, with the options the fsync part uses.
fn strace_works() -> Result<()> {
    let out = std::process::Command::new("strace")
        .args(strace_args(Tracing::SlowDisk(1), Path::new("/dev/null")))
        .arg("true")
        .output();
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "strace is missing, and the fsync figures need it: install it (apt-get install \
             strace; scripts/setup.sh does), or leave them out (--only provisioning,resident,size)"
        ),
        Err(e) => bail!("running strace: {e}"),
        Ok(o) if !o.status.success() => bail!(
            "strace cannot trace here ({}), and the fsync figures need it: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => Ok(()),
    }
}

/// strace's arguments: follow every thread (-f), stop only at the calls counted (seccomp-bpf),
/// as the tracee's grandchild (-D: iotd keeps the pid the harness started and signals), the
/// notify datagram in full (-s), and for the slow disk, the delay.
fn strace_args(tracing: Tracing, output: &Path) -> Vec<String> {
    let mut args: Vec<String> = ["-D", "-f", "--seccomp-bpf", "-s", "256", "-e"]
        .map(String::from)
        .into();
    args.push(format!("trace={SYNC_CALLS},{RENAME_CALLS},{NOTIFY_CALLS}"));
    if let Tracing::SlowDisk(ms) = tracing {
        args.push("-e".into());
        args.push(format!(
            "inject={DELAYED_CALLS}:delay_exit={}",
            u64::from(ms) * 1000
        ));
    }
    args.push("-o".into());
    args.push(output.display().to_string());
    args
}

/// What strace saw of one provisioning.
#[derive(Default)]
struct Calls {
    /// Calls of SYNC_CALLS by name, from spawn to the STATUS line that says connected.
    syncs: std::collections::BTreeMap<String, u32>,
    /// Calls of RENAME_CALLS, same span.
    renames: u32,
    /// Calls of either after that line, until iotd exited.
    after: u32,
}

impl Calls {
    fn syncs(&self) -> u32 {
        self.syncs.values().sum()
    }

    /// The calls the slow disk delays.
    fn delayed(&self) -> u32 {
        DELAYED_CALLS
            .split(',')
            .map(|c| self.syncs.get(c).copied().unwrap_or(0))
            .sum()
    }

    /// "7 fsync-family (fsync 7), 5 renames", and what came after connected, if anything.
    fn describe(&self) -> String {
        let names = self
            .syncs
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut text = format!(
            "{} fsync-family ({names}), {} renames",
            self.syncs(),
            self.renames
        );
        if self.after > 0 {
            text += &format!(", {} after connected", self.after);
        }
        text
    }
}

/// Counts the calls in a trace of `strace -f -o`: lines "PID name(args…) = …"; a call that
/// another thread's interrupts is "PID name(args <unfinished ...>", later "PID <... name
/// resumed>…", and is counted once, where it started. `connected` is the start of the STATUS
/// line iotd sends once connected.
fn count_calls(trace: &str, connected: &str) -> Result<Calls> {
    let is = |set: &str, name: &str| set.split(',').any(|c| c == name);
    let mut calls = Calls::default();
    let mut seen = false;
    for line in trace.lines() {
        let rest = line
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if is(NOTIFY_CALLS, name) {
            seen |= args.contains(connected);
        } else if !is(SYNC_CALLS, name) && !is(RENAME_CALLS, name) {
            continue;
        } else if seen {
            calls.after += 1;
        } else if is(RENAME_CALLS, name) {
            calls.renames += 1;
        } else {
            *calls.syncs.entry(name.to_owned()).or_default() += 1;
        }
    }
    if !seen {
        bail!("strace's trace has no {connected:?} sent to the notify socket");
    }
    Ok(calls)
}

#[derive(Clone, Copy)]
enum Tracing {
    Off,
    Strace,
    /// Under strace, every fsync and fdatasync delayed this many ms.
    SlowDisk(u32),
}

/// One gateway provisioned from scratch by iotd (file key, the journal's log level), under
/// strace unless `Off`: the time from spawn to connected, and the calls it made until then.
async fn provision_traced(
    cloud: &Cloud,
    exe: &Path,
    serial: &str,
    tracing: Tracing,
) -> Result<(Duration, Option<Calls>)> {
    let dir = tempfile::tempdir()?;
    let trace = dir.path().join("strace.out");
    let wrapper = match tracing {
        Tracing::Off => Vec::new(),
        _ => [vec!["strace".to_owned()], strace_args(tracing, &trace)].concat(),
    };
    let (script, log) = wrapped_iotd(&wrapper, exe, dir.path())?;
    // strace writes into a FIFO that a reader drains until strace closes it on exit: the
    // trace is whole when the read ends, with nothing to poll for.
    let reader = match tracing {
        Tracing::Off => None,
        _ => {
            let made = std::process::Command::new("mkfifo").arg(&trace).status();
            if !made.is_ok_and(|s| s.success()) {
                bail!(
                    "making the FIFO {} for strace's trace (mkfifo)",
                    trace.display()
                );
            }
            let path = trace.clone();
            Some(tokio::task::spawn_blocking(move || {
                std::fs::read_to_string(path)
            }))
        }
    };
    let conf = config(cloud, &dir.path().join("state"), serial);
    let done = format!("STATUS=Provisioned as gw-{serial}; certificate valid until");
    let started = Instant::now();
    let mut iotd = Iotd::start_env(&script, dir.path(), &conf, &[("IOTD_LOG", JOURNAL_LOG)]).await;
    let elapsed = wait_for(&mut iotd, &done, &log, started).await?;
    let pid = iotd.pid().context("iotd's pid")?;
    let exit = iotd.terminate().await;
    if exit.code() != Some(0) {
        bail!("iotd exited with {exit} on SIGTERM, not 0");
    }
    let Some(reader) = reader else {
        return Ok((elapsed, None));
    };
    // strace (-D: not our child) closes the FIFO when iotd, its only tracee, has exited.
    let text = match tokio::time::timeout(Duration::from_secs(5), reader).await {
        Ok(read) => read
            .context("the reader of strace's trace stopped")?
            .with_context(|| format!("reading strace's trace {}", trace.display()))?,
        Err(_) => {
            // Unblock the reader (its open waits for a writer) before giving up.
            let _ = std::fs::OpenOptions::new().write(true).open(&trace);
            bail!(
                "strace did not finish its trace {} within 5 s of iotd's exit (pid {pid}); the \
                 end of its log (strace's messages too):\n{}",
                trace.display(),
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    };
    let calls = count_calls(&text, &done)?;
    Ok((elapsed, Some(calls)))
}

struct Reconnects {
    rss_first: f64,
    rss_last: f64,
    rss_max: f64,
    fds_first: usize,
    fds_last: usize,
    fds_max: usize,
    gaps_ms: Vec<f64>,
}

struct Idle {
    rss_kib: f64,
    pss_kib: f64,
    cpu_ms: f64,
    tick_ms: f64,
    /// None when a thread came or went during the window.
    wakeups: Option<u64>,
    reconnects: Reconnects,
}

/// A provisioned gateway kept for the start-up, idle and reconnect measures.
struct Resident {
    dir: tempfile::TempDir,
    script: PathBuf,
    log: PathBuf,
    config: String,
    thing: String,
}

impl Resident {
    async fn provision(cloud: &Cloud, exe: &Path) -> Result<Resident> {
        let dir = tempfile::tempdir()?;
        let (script, log) = quiet_iotd(exe, dir.path())?;
        let serial = "bench-resident";
        let config = config(cloud, &dir.path().join("state"), serial);
        let resident = Resident {
            script,
            log,
            config,
            thing: format!("gw-{serial}"),
            dir,
        };
        let mut iotd = resident.start(&[]).await;
        wait_for(
            &mut iotd,
            &resident.connected(),
            &resident.log,
            Instant::now(),
        )
        .await?;
        iotd.terminate().await;
        Ok(resident)
    }

    fn connected(&self) -> String {
        format!(
            "STATUS=Provisioned as {}; certificate valid until",
            self.thing
        )
    }

    async fn start(&self, env: &[(&str, &str)]) -> Iotd {
        Iotd::start_env(&self.script, self.dir.path(), &self.config, env).await
    }

    /// Start to READY=1, which iotd sends once its D-Bus name is owned.
    async fn time_to_ready(&self, bus: &str) -> Result<f64> {
        let started = Instant::now();
        let mut iotd = self.start(&[("DBUS_SYSTEM_BUS_ADDRESS", bus)]).await;
        wait_for(&mut iotd, "READY=1", &self.log, started).await?;
        let elapsed = started.elapsed();
        iotd.terminate().await;
        Ok(elapsed.as_secs_f64() * 1e3)
    }

    /// Started as in production (bus, watchdog, the journal's log level) and connected; its
    /// pid.
    async fn start_connected(&self, bus: &str) -> Result<(Iotd, u32)> {
        let mut iotd = self
            .start(&[
                ("DBUS_SYSTEM_BUS_ADDRESS", bus),
                ("WATCHDOG_USEC", WATCHDOG_USEC),
                // What the journal gets (iotd's default), not the harness's debug.
                ("IOTD_LOG", JOURNAL_LOG),
            ])
            .await;
        wait_for(&mut iotd, &self.connected(), &self.log, Instant::now()).await?;
        let pid = iotd.pid().context("iotd's pid")?;
        Ok((iotd, pid))
    }

    /// An onboarded gateway restarted as in production: its onboarding server runs (it must
    /// accept a connection), its window closed; VmRSS and PSS in KiB after `SETTLE` and
    /// `idle_secs` connected and idle.
    async fn idle_onboarded(
        &self,
        listen: std::net::SocketAddr,
        idle_secs: u64,
    ) -> Result<(f64, f64)> {
        let bus = DbusDaemon::start(
            &[&repo().join("packaging/dbus/io.iotd.Agent1.conf")],
            Some(r#"<policy user="root"><allow own="io.iotd.Agent1"/></policy>"#),
        );
        let (mut iotd, pid) = self.start_connected(bus.address()).await?;
        tokio::net::TcpStream::connect(listen)
            .await
            .with_context(|| format!("connecting to the onboarding server on {listen}"))?;
        eprintln!(
            "onboarded gateway idle: settling {} s, then {idle_secs} s …",
            SETTLE.as_secs()
        );
        tokio::time::sleep(SETTLE + Duration::from_secs(idle_secs)).await;
        let rss_kib = procfs::status_kib(pid, "VmRSS")
            .with_context(|| format!("reading VmRSS from /proc/{pid}/status"))?;
        let pss_kib = procfs::pss_kib(pid)
            .with_context(|| format!("reading Pss from /proc/{pid}/smaps_rollup"))?;
        let exit = iotd.terminate().await;
        if exit.code() != Some(0) {
            bail!("iotd exited with {exit} on SIGTERM, not 0");
        }
        Ok((rss_kib, pss_kib))
    }

    /// Connected and idle as in production (bus, watchdog); then forced reconnects.
    async fn idle(&self, cloud: &Cloud, bus: &str, args: &Args) -> Result<Idle> {
        let (mut iotd, pid) = self.start_connected(bus).await?;
        eprintln!(
            "idle: settling {} s, then counting for {} s …",
            SETTLE.as_secs(),
            args.idle_secs
        );
        tokio::time::sleep(SETTLE).await;
        let cpu_time = || {
            procfs::cpu_ticks(pid)
                .with_context(|| format!("reading iotd's CPU time from /proc/{pid}/stat"))
        };
        let ticks = cpu_time()?;
        let before = procfs::wakeups(pid);
        tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
        let tick_ms = procfs::clock_tick_ms();
        let cpu_ms = cpu_time()?.saturating_sub(ticks) as f64 * tick_ms;
        let after = procfs::wakeups(pid);
        // A thread that exits takes its count with it: the figure stands only if every thread
        // was there from start to end.
        let wakeups = if before.keys().eq(after.keys()) {
            Some(
                after
                    .iter()
                    .map(|(tid, n)| n.saturating_sub(before[tid]))
                    .sum(),
            )
        } else {
            eprintln!(
                "idle: iotd's threads changed during the window ({:?} → {:?}); no wake-up figure",
                before.keys().collect::<Vec<_>>(),
                after.keys().collect::<Vec<_>>()
            );
            None
        };
        let rss_kib = procfs::status_kib(pid, "VmRSS")
            .with_context(|| format!("reading VmRSS from /proc/{pid}/status"))?;
        let pss_kib = procfs::pss_kib(pid)
            .with_context(|| format!("reading Pss from /proc/{pid}/smaps_rollup"))?;
        let reconnects = self
            .reconnect(cloud, &mut iotd, pid, args.reconnects)
            .await?;
        let exit = iotd.terminate().await;
        if exit.code() != Some(0) {
            bail!("iotd exited with {exit} on SIGTERM, not 0");
        }
        Ok(Idle {
            rss_kib,
            pss_kib,
            cpu_ms,
            tick_ms,
            wakeups,
            reconnects,
        })
    }

    /// The fake drops the session `count` times; iotd reconnects each time (at least a second
    /// later: one CONNECT per second per client id).
    async fn reconnect(
        &self,
        cloud: &Cloud,
        iotd: &mut Iotd,
        pid: u32,
        count: u32,
    ) -> Result<Reconnects> {
        let mut r = Reconnects {
            rss_first: 0.0,
            rss_last: 0.0,
            rss_max: 0.0,
            fds_first: 0,
            fds_last: 0,
            fds_max: 0,
            gaps_ms: Vec::new(),
        };
        let connected = self.connected();
        for i in 1..=count {
            iotd.seen.clear();
            if !cloud.shared().disconnect(&self.thing) {
                bail!("reconnect {i}: the fake has no session of {}", self.thing);
            }
            let cut = Instant::now();
            // First the "disconnected, retrying" status, then connected again.
            wait_for(iotd, "disconnected, retrying", &self.log, cut).await?;
            iotd.seen.clear();
            wait_for(iotd, &connected, &self.log, cut).await?;
            r.gaps_ms.push(cut.elapsed().as_secs_f64() * 1e3);
            if !procfs::exists(pid) {
                bail!("iotd is gone after reconnect {i}");
            }
            let rss = procfs::status_kib(pid, "VmRSS").unwrap_or(0.0);
            let fds = procfs::fds(pid);
            if i == 1 {
                (r.rss_first, r.fds_first) = (rss, fds);
            }
            (r.rss_last, r.fds_last) = (rss, fds);
            r.rss_max = r.rss_max.max(rss);
            r.fds_max = r.fds_max.max(fds);
            if i % 50 == 0 || i == count {
                eprintln!("reconnect {i:>4}/{count}: RSS {}, {fds} fds", mib(rss));
            }
        }
        Ok(r)
    }
}

fn stripped_size(binary: &Path) -> Result<u64> {
    let out = tempfile::tempdir()?;
    let copy = out.path().join("stripped");
    let status = std::process::Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(binary)
        .status()
        .context("running strip (binutils)")?;
    if !status.success() {
        bail!("strip {} failed: {status}", binary.display());
    }
    Ok(std::fs::metadata(&copy)?.len())
}

/// The `hardware_commands=N` of the last log line containing `marker` (iotd logs it with the TPM
/// backend).
fn hardware_commands(log: &Path, marker: &str) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains(marker))?;
    let after = &line[line.find("hardware_commands=")? + "hardware_commands=".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Waits for a notification starting with `done`; on failure says why, with the last STATUS
/// lines and the end of the log.
async fn wait_for(iotd: &mut Iotd, done: &str, log: &Path, started: Instant) -> Result<Duration> {
    let mut statuses = Vec::new();
    let why = loop {
        // `wait_status` answers from the lines already read (`seen`) first: emptied, the next.
        iotd.seen.clear();
        let next = tokio::time::timeout_at((started + LIMIT).into(), iotd.wait_status("")).await;
        let Ok(line) = next else {
            break format!("no {done:?} within {} s", LIMIT.as_secs());
        };
        if line.starts_with(done) || (!done.starts_with("STATUS=") && line.contains(done)) {
            return Ok(started.elapsed());
        } else if line.starts_with("STATUS=Failed at ") {
            break format!("iotd gave up: {line}");
        } else if line.starts_with("STATUS=") {
            statuses.push(line);
        }
    };
    let indent = |lines: Vec<&str>| lines.iter().fold(String::new(), |s, l| s + "\n    " + l);
    let statuses = indent(
        statuses
            .iter()
            .rev()
            .take(5)
            .rev()
            .map(String::as_str)
            .collect(),
    );
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail = indent(
        text.lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect(),
    );
    bail!("{why}\n  last STATUS lines:{statuses}\n  end of iotd's log:{tail}")
}

/// A script that runs `iotd` with its log (stderr) in a file of `dir`, so that the runs' logs do
/// not bury the figures; `exec` keeps the pid, so SIGTERM reaches iotd and /proc/PID is iotd's.
fn quiet_iotd(iotd: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    wrapped_iotd(&[], iotd, dir)
}

/// `quiet_iotd` with iotd run by `wrapper` (a command and its arguments, e.g. strace's, which
/// must exec iotd in the same process for the pid to stay iotd's).
fn wrapped_iotd(wrapper: &[String], iotd: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (script, log) = (dir.join("iotd.sh"), dir.join("iotd.log"));
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let command = wrapper
        .iter()
        .map(|a| quote(a))
        .chain([quote(&iotd.display().to_string())])
        .collect::<Vec<_>>()
        .join(" ");
    let text = format!(
        "#!/bin/sh\nexec {command} \"$@\" 2>>{}\n",
        quote(&log.display().to_string())
    );
    std::fs::write(&script, text).with_context(|| format!("writing {}", script.display()))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((script, log))
}
