//! `fleet-sim`: N gateways power on at once against AWS-like quotas; then the power is cut and
//! they all come back together. Prints one table; exits 1 if any gateway gave up or was not done
//! in time, or if the cloud's registry is not one thing with one certificate per gateway.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use fleet_sim::{Fleet, Quotas, Report};

/// How long the power stays off between the two scenarios: longer than AWS's one CONNECT per
/// second per client id, as any real outage is.
const OUTAGE: Duration = Duration::from_secs(2);

/// Simulates a fleet of gateways, each running iotd's agent (file key), powering on at once
/// against fake-iot-core with AWS-like quotas; then a power cut and every gateway reconnecting
/// at once. Reports completion time against the quota-bound ideal, throttled requests, retries
/// and gateways that gave up.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Number of gateways.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    gateways: u32,
    /// RegisterThing requests per second the cloud allows.
    #[arg(long, default_value_t = Quotas::default().register_thing)]
    register_thing: u32,
    /// CreateCertificateFromCsr requests per second the cloud allows.
    #[arg(long, default_value_t = Quotas::default().create_certificate_from_csr)]
    create_certificate_from_csr: u32,
    /// CONNECTs per second the cloud allows for the whole account.
    #[arg(long, default_value_t = Quotas::default().connect)]
    connect: u32,
    /// The gateways' cloud.throttle_retry_max_secs (default: iotd's default); 300 shows what
    /// the same fleet does when throttling backs off like any other error.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=300))]
    throttle_retry_max_secs: Option<u32>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fleet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    let quotas = Quotas {
        register_thing: args.register_thing,
        create_certificate_from_csr: args.create_certificate_from_csr,
        connect: args.connect,
    };
    let n = args.gateways as usize;
    let extra = args
        .throttle_retry_max_secs
        .map_or_else(String::new, |s| format!("throttle_retry_max_secs = {s}\n"));
    let fleet = Fleet::new(n, quotas, &extra).await?;
    // Far beyond any sane result, so that a slow run is measured rather than cut short.
    let limit = |ideal: Duration| ideal * 5 + Duration::from_secs(120);

    eprintln!("fleet-sim: {n} gateways power on at once …");
    let ideal = quotas.provisioning_ideal(n);
    let first = fleet
        .power_on("power-on, provisioning", ideal, limit(ideal))
        .await?;
    let registry = fleet.check_registry();
    eprintln!(
        "fleet-sim: power cut; {} s later all come back …",
        OUTAGE.as_secs()
    );
    tokio::time::sleep(OUTAGE).await;
    let ideal = quotas.reconnect_ideal(n);
    let second = fleet
        .power_on("power cut, reconnect", ideal, limit(ideal))
        .await?;
    fleet.stop().await;

    println!();
    println!(
        "fleet-sim: {n} gateways (iotd's agent, file key{}) at once against fake-iot-core; quotas \
         RegisterThing {}/s, CreateCertificateFromCsr {}/s, CONNECT {}/s per account and 1/s per \
         client id; {}",
        args.throttle_retry_max_secs
            .map_or_else(String::new, |s| format!(", throttle_retry_max_secs = {s}")),
        quotas.register_thing,
        quotas.create_certificate_from_csr,
        quotas.connect,
        iotd_testkit::machine()
    );
    println!();
    println!(
        "| scenario | gateways | connected | gave up | completion | ideal | ratio | p50 | p90 | throttled | retries |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut ok = true;
    for r in [&first, &second] {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {} |",
            r.scenario,
            r.gateways,
            r.times.len(),
            r.gave_up.len(),
            secs(Some(r.completion)),
            secs(Some(r.ideal)),
            r.ratio(),
            secs(r.percentile(0.5)),
            secs(r.percentile(0.9)),
            r.total_throttled(),
            r.total_retries(),
        );
    }
    println!();
    for r in [&first, &second] {
        details(r);
        ok &= r.gave_up.is_empty() && r.not_done.is_empty();
    }
    if let Err(e) = registry {
        println!("{e:#}");
        ok = false;
    }
    Ok(ok)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn details(r: &Report) {
    let list = |m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!(
        "{}: throttled by the cloud: {}; errors met (each retried): {}",
        r.scenario,
        list(&r.throttled),
        list(&r.retries)
    );
    for (serial, why) in r.gave_up.iter().take(10) {
        println!("  gave up: gw-{serial}: {why}");
    }
    for (serial, status) in r.not_done.iter().take(10) {
        println!("  not done in time: gw-{serial}: {status}");
    }
}
