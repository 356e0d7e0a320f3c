//! `make demo`: fake-iot-core runs in this process with the gateway template and a factory
//! claim, and the release `iotd` and `iotctl` (target/release/) show both ways a gateway gets
//! its identity:
//!
//! 1. Gateway 0042 has the factory claim and provisions itself (key in a swtpm).
//! 2. Gateway 0043 has no claim: registered for onboarding (`iotctl onboarding register`), it
//!    waits; an installer gets a 5-minute claim from the fake's CreateProvisioningClaim (AWS's
//!    REST path) and hands it over with `iotctl onboard`; the gateway provisions with its own
//!    swtpm key, and the demo says how long the claim had left then.
//!
//! Each step is printed as iotd reports it (STATUS= lines on its notify socket) or as iotctl
//! does (its `--json` lines), then what the cloud holds; each iotd is stopped with SIGTERM.
//! iotd's own log goes to a file, shown on failure.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use iotd_testkit::onboarding::{self, Gateway, OnboardLine};
use iotd_testkit::swtpm::Swtpm;
use iotd_testkit::{Cloud, Iotd, WAIT, config};
use serde_json::Value;

/// The gateway with the factory claim.
const SERIAL: &str = "0042";
/// The gateway an installer onboards.
const ONBOARDED_SERIAL: &str = "0043";
/// What the installer sets for the template's Site parameter.
const SITE: &str = "hall-9";
/// How long iotd gets to provision; shorter than the harness's own limit, so that a slow iotd
/// is reported here (with its STATUS lines) rather than by a panic in the harness.
const LIMIT: Duration = Duration::from_secs(20);
const _: () = assert!(LIMIT.as_secs() < WAIT.as_secs());

/// Provisions gateway 0042 with its factory claim, then onboards gateway 0043 with a claim an
/// installer hands over, with iotd and iotctl against a local fake AWS IoT Core, and shows what
/// happened. Run it as `make demo`, which builds iotd and iotctl (release) and this program
/// (`tools` profile).
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
    let iotctl = iotd_testkit::release_binary("iotctl").map_err(anyhow::Error::msg)?;
    let cloud = Cloud::start().await;
    println!(
        "fake-iot-core: MQTT on {} (mutual TLS), control plane at {}",
        cloud.ready["mqtt"].as_str().unwrap_or("?"),
        cloud.ready["http"].as_str().unwrap_or("?"),
    );
    println!();
    println!("== 1. Gateway {SERIAL}: provisioning with the factory claim ==");
    let mut outcome = factory_claim(&cloud, &exe).await;
    if outcome.is_ok() {
        println!();
        println!(
            "== 2. Gateway {ONBOARDED_SERIAL}: no claim of its own; an installer hands one over =="
        );
        outcome = installer_claim(&cloud, &exe, &iotctl).await;
    }
    cloud.stop().await;
    outcome
}

async fn factory_claim(cloud: &Cloud, exe: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (script, log) = quiet_iotd(exe, dir.path())?;
    // The embedded default: the device key lives in a TPM (a private swtpm here).
    let tpm = Swtpm::start();
    let mut conf = config(cloud, &dir.path().join("state"), SERIAL);
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
    let mut watch = Watch {
        iotd,
        started,
        lines: Vec::new(),
    };
    let outcome = provision(cloud, &mut watch).await;
    if outcome.is_err() {
        watch.report(&log);
    }
    drop(watch); // kills iotd if it still runs
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

    /// On failure: the last STATUS lines and the end of iotd's log.
    fn report(&self, log: &Path) {
        eprintln!("last STATUS lines from iotd (seconds since its start):");
        let statuses: Vec<_> = self
            .lines
            .iter()
            .filter(|(_, l)| l.starts_with("STATUS="))
            .collect();
        for (at, line) in &statuses[statuses.len().saturating_sub(6)..] {
            eprintln!("  +{:.2} s  {line}", at.as_secs_f64());
        }
        log_tail(log);
    }
}

fn log_tail(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<_> = text.lines().rev().take(20).collect();
    eprintln!("end of iotd's log:");
    tail.iter().rev().for_each(|l| eprintln!("  {l}"));
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
    let cert = check_identity(cloud, &watch.iotd.state_dir, &thing)?;
    let blobs = tpm_blobs(&watch.iotd.state_dir)?;
    println!("thing name:      {thing}");
    println!("certificate id:  {cert}  (ACTIVE, the only one attached to {thing})");
    println!(
        "device key:      inside the TPM; {}/key.pub + key.priv are TPM-wrapped blobs (tpm2-tools framing)",
        blobs.display()
    );
    println!(
        "time taken:      {taken:.2} s from iotd start to connected with the issued certificate"
    );
    stop(&mut watch.iotd).await
}

/// state.json's identity is `thing`'s, and the cloud has its certificate ACTIVE and the only
/// one attached to `thing`; returns the certificate's id.
fn check_identity(cloud: &Cloud, state_dir: &Path, thing: &str) -> Result<String> {
    let state_path = state_dir.join("state.json");
    let text = std::fs::read_to_string(&state_path);
    let text = text.with_context(|| format!("reading {}", state_path.display()))?;
    let state: Value = serde_json::from_str(&text)
        .with_context(|| format!("reading {} as JSON", state_path.display()))?;
    let identity = &state["identity"];
    let cert = identity["certificateId"].as_str().unwrap_or_default();
    if !state["operation"].is_null() || identity["thingName"] != thing {
        bail!("iotd's state.json has no identity as {thing}: {state}");
    }
    let status = cloud.registry()["certificates"][cert]["status"].clone();
    let principals = cloud.principals(thing);
    if status != "ACTIVE" || principals != [cert] {
        bail!("the cloud has certificate {cert} {status} and {thing} attached to {principals:?}");
    }
    Ok(cert.to_owned())
}

/// The directory of the identity's TPM-wrapped key blobs, checked to hold no private key.
fn tpm_blobs(state_dir: &Path) -> Result<PathBuf> {
    let state_path = state_dir.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("reading {}", state_path.display()))?;
    let state: Value = serde_json::from_str(&text)?;
    let generation = &state["identity"]["generation"];
    let blobs = state_dir.join(format!("gen/{generation}"));
    for blob in ["key.pub", "key.priv"] {
        let path = blobs.join(blob);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if String::from_utf8_lossy(&text).contains("PRIVATE KEY") {
            bail!("{} holds private key material", path.display());
        }
    }
    Ok(blobs)
}

/// SIGTERM, and iotd must exit 0.
async fn stop(iotd: &mut Iotd) -> Result<()> {
    let exit = iotd.terminate().await;
    if exit.code() != Some(0) {
        bail!("iotd exited with {exit} on SIGTERM, not 0");
    }
    println!("iotd: stopped on SIGTERM (exit 0)");
    Ok(())
}

/// The second flow: a gateway without a claim, onboarded by an installer.
async fn installer_claim(cloud: &Cloud, exe: &Path, iotctl: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tpm = Swtpm::start();
    println!("swtpm: a software TPM 2.0 at {}", tpm.tcti());
    let gateway = Gateway::new(cloud, dir.path(), ONBOARDED_SERIAL, Some(&tpm))?;
    let label = gateway.register(iotctl)?;
    println!(
        "iotctl onboarding register (on the production line): the record in {}; the label",
        gateway.state_dir.join("onboarding.json").display()
    );
    println!("  serial {}, setup code {}", label.serial, label.code);
    println!("  QR payload {}", label.qr);

    let (script, log) = quiet_iotd(exe, dir.path())?;
    let mut iotd =
        Iotd::start_with_config(&script, &gateway.config_path, &gateway.state_dir, &[]).await;
    let outcome = onboard(cloud, iotctl, &gateway, &label.qr, &mut iotd, dir.path()).await;
    if outcome.is_err() {
        eprintln!("iotd's notifications: {:#?}", iotd.seen);
        log_tail(&log);
    }
    outcome
}

async fn onboard(
    cloud: &Cloud,
    iotctl: &Path,
    gateway: &Gateway,
    qr: &str,
    iotd: &mut Iotd,
    dir: &Path,
) -> Result<()> {
    let waiting = onboarding::wait_open(iotd, gateway.listen, LIMIT).await?;
    println!(
        "iotd: started without a claim, key in the TPM, onboarding server on {}",
        gateway.listen
    );
    println!("  {}", waiting.trim_start_matches("STATUS="));

    let path = format!(
        "/provisioning-templates/{}/provisioning-claim",
        onboarding::TEMPLATE
    );
    let claim = onboarding::create_provisioning_claim(cloud, onboarding::TEMPLATE, dir).await?;
    let lifetime = onboarding::CLAIM_LIFETIME_SECS;
    println!(
        "installer: CreateProvisioningClaim (POST {path} on the fake's control plane): claim \
         certificate {}…, valid for {lifetime} s",
        claim
            .certificate_id
            .get(..12)
            .unwrap_or(&claim.certificate_id)
    );
    let site = format!("{}={SITE}", onboarding::INSTALLER_PARAMETER);
    println!(
        "installer: iotctl onboard {} --qr <label> --claim-cert claim.pem --claim-key claim.key \
         --param {site}",
        gateway.address()
    );
    let mut run = onboarding::Onboard::spawn(iotctl, &gateway.address(), qr, &claim, &[&site])?;
    let deadline = Instant::now() + LIMIT;
    while let Some(line) = run.next(deadline).await? {
        if line.kind() != "result" {
            println!(
                "  {:<22} +{:.3} s  {}",
                line.phase().unwrap_or(line.kind()),
                line.at.as_secs_f64(),
                describe(&line)
            );
        }
    }
    let result = run.finish(deadline).await?;

    iotd_testkit::wait_provisioned(iotd, &gateway.thing, LIMIT)
        .await
        .map_err(anyhow::Error::msg)?;
    let connected = format!("STATUS=Provisioned as {}; certificate", gateway.thing);
    if let Some(line) = iotd.seen.iter().rev().find(|l| l.starts_with(&connected)) {
        println!("iotd: {}", line.trim_start_matches("STATUS="));
    }
    let cert = check_identity(cloud, &gateway.state_dir, &gateway.thing)?;
    let blobs = tpm_blobs(&gateway.state_dir)?;
    let site_attribute = &cloud.registry()["things"][&gateway.thing]["attributes"]["site"];
    if site_attribute != SITE {
        bail!(
            "the thing {} has site {site_attribute}, not the installer's {SITE}",
            gateway.thing
        );
    }
    println!(
        "thing name:      {}  (site = {SITE}, from the installer)",
        gateway.thing
    );
    println!(
        "certificate id:  {cert}  (ACTIVE, the only one attached to {})",
        gateway.thing
    );
    println!(
        "device key:      inside the TPM; {}/key.pub + key.priv are TPM-wrapped blobs",
        blobs.display()
    );
    let took = result["elapsed_seconds"].as_f64().unwrap_or(f64::NAN);
    println!(
        "time taken:      {took:.1} s from iotctl's start to the gateway connected (by iotctl)"
    );
    let left = result["claim_seconds_left"]
        .as_i64()
        .ok_or_else(|| anyhow!("iotctl's result has no claim_seconds_left: {result}"))?;
    println!(
        "the claim had {left} s of its {lifetime} s left when the gateway connected as {}",
        result["thing_name"].as_str().unwrap_or(&gateway.thing)
    );
    stop(iotd).await
}

/// What one of iotctl's lines says, for people.
fn describe(line: &OnboardLine) -> String {
    let j = &line.json;
    let thing = j["status"]["thing_name"].as_str().unwrap_or("?");
    match (line.kind(), line.phase()) {
        ("tls", _) => {
            let hash = j["certificate_sha256"].as_str().unwrap_or("?");
            format!(
                "TLS to {}; gateway certificate sha256:{}…",
                j["address"].as_str().unwrap_or("?"),
                hash.get(..16).unwrap_or(hash)
            )
        }
        ("params", _) => {
            // 0: the window opened by itself and stays open while the gateway needs a claim.
            let window = match j["window_closes_in"].as_i64() {
                Some(0) => "the window open while it needs a claim".to_owned(),
                Some(s) => format!("the window closes in {s} s"),
                None => "the window open".to_owned(),
            };
            format!(
                "gateway {} matches the label; {} attempts left, {window}",
                j["serial"].as_str().unwrap_or("?"),
                j["attempts_left"],
            )
        }
        ("paired", _) => format!(
            "PBKDF2 + SPAKE2+ ({} binding): the gateway proved it holds the label's code",
            j["binding"].as_str().unwrap_or("?")
        ),
        ("claim-accepted", _) => "the claim, sealed for this session, accepted".to_owned(),
        (_, Some("claim-received")) => "the gateway took the claim".to_owned(),
        (_, Some("connecting-with-claim")) => "connecting to AWS IoT with the claim".to_owned(),
        (_, Some("certificate-issued")) => {
            "CreateCertificateFromCsr: certificate for the TPM key".to_owned()
        }
        (_, Some("thing-registered")) => format!("RegisterThing: {thing}"),
        (_, Some("connected")) => format!("connected as {thing} with its own certificate"),
        (_, Some(other)) => other.to_owned(),
        (kind, None) => kind.to_owned(),
    }
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
