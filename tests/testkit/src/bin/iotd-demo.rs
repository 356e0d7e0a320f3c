//! `make demo`: fake-iot-core runs in this process with the gateway template and a factory
//! claim; the release `iotd` (target/release/) provisions gateway 0042 against it; this
//! prints each step as iotd reports it (STATUS= lines on its notify socket) and what the cloud
//! now holds, then stops iotd with SIGTERM. iotd's own log goes to a file, shown on failure.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use iotd_testkit::{Cloud, Iotd, WAIT, config};

const SERIAL: &str = "0042";
/// How long iotd gets to provision; shorter than the harness's own limit, so that a slow iotd
/// is reported here (with its STATUS lines) rather than by a panic in the harness.
const LIMIT: Duration = Duration::from_secs(20);
const _: () = assert!(LIMIT.as_secs() < WAIT.as_secs());

/// Provisions gateway 0042 with iotd against a local fake AWS IoT Core and shows what happened.
/// Run it as `make demo`, which builds iotd (release) and this program (`tools` profile).
#[derive(Parser)]
#[command(version)]
struct Args {}

#[tokio::main]
async fn main() -> ExitCode {
    Args::parse();
    // The harness panics when it cannot set something up: a failed demo like any other.
    let cause = match tokio::spawn(demo()).await {
        Ok(Ok(())) => return ExitCode::SUCCESS,
        Ok(Err(e)) => format!("{e:#}"),
        Err(panic) => panic.to_string(),
    };
    eprintln!("iotd-demo: {cause}");
    ExitCode::FAILURE
}

async fn demo() -> Result<()> {
    let exe = iotd_testkit::release_binary("iotd").map_err(anyhow::Error::msg)?;
    let cloud = Cloud::start().await;
    println!(
        "fake-iot-core: MQTT on {} (mutual TLS), control plane at {}",
        cloud.ready["mqtt"].as_str().unwrap_or("?"),
        cloud.ready["http"].as_str().unwrap_or("?"),
    );
    let dir = tempfile::tempdir()?;
    let (script, log) = quiet_iotd(&exe, dir.path())?;
    // The embedded default: the device key lives in a TPM (a private swtpm here).
    let tpm = iotd_testkit::swtpm::Swtpm::start();
    let mut conf = config(&cloud, &dir.path().join("state"), SERIAL);
    conf.push_str(&format!(
        "\n[key]\nbackend = \"tpm\"\ntcti = \"{}\"\n",
        tpm.tcti()
    ));
    println!("swtpm: a software TPM 2.0 at {}", tpm.tcti());
    println!(
        "iotd: provisioning with the factory claim (key in the TPM, CreateCertificateFromCsr + RegisterThing)..."
    );
    let started = Instant::now();
    let iotd = Iotd::start(&script, dir.path(), &conf).await;
    let lines = Vec::new();
    let mut watch = Watch {
        iotd,
        started,
        lines,
    };
    let outcome = provision(&cloud, &mut watch).await;
    if outcome.is_err() {
        eprintln!("last STATUS lines from iotd (seconds since its start):");
        let statuses: Vec<_> = watch
            .lines
            .iter()
            .filter(|(_, l)| l.starts_with("STATUS="))
            .collect();
        for (at, line) in &statuses[statuses.len().saturating_sub(6)..] {
            eprintln!("  +{:.2} s  {line}", at.as_secs_f64());
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<_> = text.lines().rev().take(20).collect();
        eprintln!("end of iotd's log:");
        tail.iter().rev().for_each(|l| eprintln!("  {l}"));
    }
    drop(watch); // kills iotd if it still runs
    cloud.stop().await;
    outcome
}

/// iotd with the lines it sent, each with when it arrived.
struct Watch {
    iotd: Iotd,
    started: Instant,
    lines: Vec<(Duration, String)>,
}

impl Watch {
    /// The next line iotd sends. The harness answers `wait_status` from the lines it has
    /// already read (`seen`) first, so with `seen` emptied, `wait_status("")` is the next line.
    async fn next(&mut self) -> Result<(Duration, String)> {
        self.iotd.seen.clear();
        let wait = self.iotd.wait_status("");
        let line = tokio::time::timeout_at((self.started + LIMIT).into(), wait)
            .await
            .map_err(|_| anyhow!("iotd did not provision within {} s", LIMIT.as_secs()))?;
        let at = self.started.elapsed();
        self.lines.push((at, line.clone()));
        Ok((at, line))
    }
}

async fn provision(cloud: &Cloud, watch: &mut Watch) -> Result<()> {
    let thing = format!("gw-{SERIAL}");
    let done = format!("STATUS=Provisioned as {thing}; certificate valid until");
    let taken = loop {
        let (at, line) = watch.next().await?;
        let secs = at.as_secs_f64();
        if line.starts_with(&done) {
            let note = format!("(connected as {thing} with its own certificate)");
            println!("  {:<20} +{secs:.2} s  {note}", "provisioned");
            break secs;
        } else if let Some(failed) = line.strip_prefix("STATUS=Failed at ") {
            bail!("iotd gave up at {failed}");
        } else if let Some(rest) = line.strip_prefix("STATUS=Provisioning (") {
            match rest.split_once("); retrying: ") {
                Some((step, why)) => println!("  {step:<20} +{secs:.2} s  retrying: {why}"),
                None if rest != "unprovisioned)" => {
                    println!("  {:<20} +{secs:.2} s", rest.trim_end_matches(')'));
                }
                None => {}
            }
        }
    };

    let state_dir = &watch.iotd.state_dir;
    let state_path = state_dir.join("state.json");
    let text = std::fs::read_to_string(&state_path);
    let text = text.with_context(|| format!("reading {}", state_path.display()))?;
    let state: serde_json::Value = serde_json::from_str(&text)?;
    let identity = &state["identity"];
    let cert = identity["certificateId"].as_str().unwrap_or_default();
    if !state["operation"].is_null() || identity["thingName"] != thing.as_str() {
        bail!("iotd's state.json has no identity as {thing}: {state}");
    }
    let status = cloud.registry()["certificates"][cert]["status"].clone();
    let principals = cloud.principals(&thing);
    if status != "ACTIVE" || principals != [cert] {
        bail!("the cloud has certificate {cert} {status} and {thing} attached to {principals:?}");
    }
    let generation = &identity["generation"];
    let blobs = state_dir.join(format!("gen/{generation}"));
    for blob in ["key.pub", "key.priv"] {
        let path = blobs.join(blob);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if String::from_utf8_lossy(&text).contains("PRIVATE KEY") {
            bail!("{} holds private key material", path.display());
        }
    }
    println!("thing name:      {thing}");
    println!("certificate id:  {cert}  (ACTIVE, the only one attached to {thing})");
    println!(
        "device key:      inside the TPM; {}/key.pub + key.priv are TPM-wrapped blobs (tpm2-tools framing)",
        blobs.display()
    );
    println!(
        "time taken:      {taken:.2} s from iotd start to connected with the issued certificate"
    );

    let exit = watch.iotd.terminate().await;
    if exit.code() != Some(0) {
        bail!("iotd exited with {exit} on SIGTERM, not 0");
    }
    println!("iotd: stopped on SIGTERM (exit 0)");
    Ok(())
}

/// A script that runs `iotd` with its log (stderr) in a file of `dir`, so that iotd's log does
/// not interleave with what the demo prints; `exec` keeps the pid, so SIGTERM reaches iotd.
fn quiet_iotd(iotd: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (script, log) = (dir.join("iotd.sh"), dir.join("iotd.log"));
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let text = format!("#!/bin/sh\nexec {} \"$@\" 2>{}\n", quote(iotd), quote(&log));
    std::fs::write(&script, text)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((script, log))
}
