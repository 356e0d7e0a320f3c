//! `make bench`: how long iotd takes to provision. Each run is a new gateway (fresh state
//! directory, new serial, so a new thing and its own claim client id) against one fake-iot-core
//! in this process; the time is from just before iotd is spawned to its STATUS line
//! "Provisioned as …; certificate valid until …" (connected with the issued certificate).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use iotd_testkit::{Cloud, Iotd, WAIT, config, machine};

/// How long one run may take; shorter than the harness's own limit, so that a slow run is
/// reported here (with its STATUS lines) rather than by a panic in the harness.
const LIMIT: Duration = Duration::from_secs(20);
const _: () = assert!(LIMIT.as_secs() < WAIT.as_secs());

/// Reports the median/min/max time from iotd's start with a factory claim to "provisioned".
///
/// "Provisioned" is iotd connected with the certificate it was issued, against a local fake AWS
/// IoT Core in this process. Each run is a new gateway: fresh state directory, new serial.
///
/// The figures mean something only for a release build of iotd, which is looked for next to
/// this binary: run it as `make bench`, which builds both in release. iotd is started through a
/// two-line /bin/sh script that execs it with its log in a file (about 0.5 ms of each run).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Number of runs.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Key backends to measure: file, tpm (a fresh swtpm per run), or both.
    #[arg(long, default_value = "both", value_parser = ["file", "tpm", "both"])]
    key: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // The harness panics when it cannot set something up: a failed benchmark like any other.
    let cause = match tokio::spawn(bench(args.runs, args.key)).await {
        Ok(Ok(())) => return ExitCode::SUCCESS,
        Ok(Err(e)) => format!("{e:#}"),
        Err(panic) => panic.to_string(),
    };
    eprintln!("iotd-bench: {cause}");
    ExitCode::FAILURE
}

async fn bench(runs: u32, key: String) -> Result<()> {
    let exe = std::env::current_exe()?.with_file_name("iotd");
    if !exe.is_file() {
        bail!(
            "{} is missing: run `make bench`, which builds it (release)",
            exe.display()
        );
    }
    let cloud = Cloud::start().await;
    let mut rows = Vec::new();
    let mut failed = 0;
    for backend in ["file", "tpm"] {
        if key != "both" && key != backend {
            continue;
        }
        let mut times = Vec::new();
        let mut commands = (None, None);
        for run in 1..=runs {
            let serial = format!("bench-{backend}-{run:03}");
            match run_once(&cloud, &exe, &serial, backend == "tpm").await {
                Ok((t, provisioning, reconnect)) => {
                    println!(
                        "{backend} run {run:>3}: gw-{serial} provisioned in {:.1} ms",
                        ms(t)
                    );
                    times.push(t);
                    commands = (provisioning, reconnect);
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("{backend} run {run:>3}: gw-{serial} FAILED: {e:#}");
                }
            }
        }
        times.sort();
        let n = times.len();
        if let (Some(min), Some(max)) = (times.first(), times.last()) {
            let median = (times[(n - 1) / 2] + times[n / 2]) / 2;
            let tpm = match commands {
                (Some(p), Some(r)) => format!("{p} / {r}"),
                _ => "-".to_owned(),
            };
            rows.push(format!(
                "| {backend} | {n} | {:.1} ms | {:.1} ms | {:.1} ms | {tpm} |",
                ms(median),
                ms(*min),
                ms(*max)
            ));
        }
    }
    cloud.stop().await;
    println!();
    println!(
        "iotd: start with the factory claim -> provisioned (connected with the issued certificate), {}",
        machine()
    );
    println!();
    println!("| key | runs | median | min | max | TPM commands: provisioning / reconnect |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in rows {
        println!("{row}");
    }
    if failed > 0 {
        bail!("{failed} runs failed");
    }
    Ok(())
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One gateway provisioned from scratch: its time, and with a TPM the TPM commands iotd sent
/// to provision and then to reconnect after a restart; or why it failed.
async fn run_once(
    cloud: &Cloud,
    exe: &Path,
    serial: &str,
    tpm: bool,
) -> Result<(Duration, Option<u64>, Option<u64>)> {
    let dir = tempfile::tempdir()?;
    let (script, log) = quiet_iotd(exe, dir.path())?;
    let swtpm = tpm.then(iotd_testkit::swtpm::Swtpm::start);
    let mut conf = config(cloud, &dir.path().join("state"), serial);
    if let Some(t) = &swtpm {
        conf.push_str(&format!(
            "\n[key]\nbackend = \"tpm\"\ntcti = \"{}\"\n",
            t.tcti()
        ));
    }
    let done = format!("STATUS=Provisioned as gw-{serial}; certificate valid until");
    let started = Instant::now();
    let mut iotd = Iotd::start(&script, dir.path(), &conf).await;
    let elapsed = wait_provisioned(&mut iotd, &done, &log, started).await?;
    let exit = iotd.terminate().await;
    if exit.code() != Some(0) {
        bail!("iotd exited with {exit} on SIGTERM, not 0");
    }
    if swtpm.is_none() {
        return Ok((elapsed, None, None));
    }
    let provisioning = hardware_commands(&log, "provisioned: connected");
    // A restart: straight to the session, through the TPM once more.
    let mut again = Iotd::start(&script, dir.path(), &conf).await;
    wait_provisioned(&mut again, &done, &log, Instant::now()).await?;
    let reconnect = hardware_commands(&log, "connected");
    let exit = again.terminate().await;
    if exit.code() != Some(0) {
        bail!("iotd exited with {exit} on SIGTERM after the restart, not 0");
    }
    Ok((elapsed, provisioning, reconnect))
}

/// Waits for `done`; on failure says why, with the last STATUS lines and the end of the log.
async fn wait_provisioned(
    iotd: &mut Iotd,
    done: &str,
    log: &Path,
    started: Instant,
) -> Result<Duration> {
    let mut statuses = Vec::new();
    let why = loop {
        // `wait_status` answers from the lines already read (`seen`) first: emptied, the next.
        iotd.seen.clear();
        let next = tokio::time::timeout_at((started + LIMIT).into(), iotd.wait_status("")).await;
        let Ok(line) = next else {
            break format!("not provisioned within {} s", LIMIT.as_secs());
        };
        if line.starts_with(done) {
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

/// A script that runs `iotd` with its log (stderr) in a file of `dir`, so that 20 runs of
/// iotd's log do not bury the figures; `exec` keeps the pid, so SIGTERM reaches iotd.
fn quiet_iotd(iotd: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (script, log) = (dir.join("iotd.sh"), dir.join("iotd.log"));
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let text = format!("#!/bin/sh\nexec {} \"$@\" 2>{}\n", quote(iotd), quote(&log));
    std::fs::write(&script, text).with_context(|| format!("writing {}", script.display()))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((script, log))
}
