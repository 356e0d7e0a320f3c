//! `fake-iot-core` binary: see the library docs and README for the contract.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fake_iot_core::faults::Api;
use fake_iot_core::run::{self, Options};
use fake_iot_core::template::Override;

/// A local stand-in for AWS IoT Core (MQTT over mutual TLS, fleet provisioning, Jobs, control
/// plane). Prints one JSON line with its addresses when ready; SIGTERM stops it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory for the CA, the registry and claim files (created if missing; kept across runs).
    #[arg(long)]
    state_dir: PathBuf,
    /// MQTT over TLS without ALPN, like AWS's port 8883. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    mqtt: SocketAddr,
    /// MQTT over TLS requiring ALPN x-amzn-mqtt-ca, like AWS's port 443.
    #[arg(long, default_value = "127.0.0.1:0")]
    mqtt_alpn: SocketAddr,
    /// HTTP control plane (AWS IoT REST paths) and the /_fake/ API.
    #[arg(long, default_value = "127.0.0.1:0")]
    http: SocketAddr,
    /// Creates or updates an enabled provisioning template from a file holding its body.
    #[arg(long = "template", value_name = "NAME=FILE", value_parser = name_value)]
    templates: Vec<(String, String)>,
    /// Writes a claim certificate and key allowed to provision with TEMPLATE.
    #[arg(long = "claim", value_name = "NAME=TEMPLATE", value_parser = name_value)]
    claims: Vec<(String, String)>,
    /// Validity of issued certificates, e.g. 10m, 12h, 30d (default: until 2049-12-31, as AWS).
    /// Changed at run time with PUT /_fake/certificate-validity (also per template).
    #[arg(long, value_parser = parse_duration)]
    cert_validity: Option<Duration>,
    /// Keep the live connections of a certificate made INACTIVE or REVOKED (AWS closes them
    /// "within a few minutes"; the fake at once unless this is given).
    #[arg(long)]
    keep_connection_on_certificate_deactivation: bool,
    /// Close a live connection when its certificate's notAfter passes on the fake's clock (AWS
    /// is not known to; by default the session stays and the next CONNECT fails).
    #[arg(long)]
    disconnect_on_certificate_expiry: bool,
    /// Accept ClientHellos without SNI (AWS refuses them).
    #[arg(long)]
    no_require_sni: bool,
    /// Allow CONNECTs of one client id more often than once per second (AWS does not).
    #[arg(long)]
    no_connect_throttle: bool,
    /// Answers 429 above N requests per second of API (RegisterThing, CreateCertificateFromCsr,
    /// CreateKeysAndCertificate, Jobs) or refuses CONNECTs above N per second account-wide
    /// (Connect). `--throttle aws` sets AWS's published defaults: RegisterThing=10,
    /// CreateCertificateFromCsr=15, Connect=500.
    #[arg(long = "throttle", value_name = "API=N|aws", value_parser = parse_throttle)]
    throttles: Vec<Vec<(Api, u32)>>,
    /// Let an ownership token be used for more than one RegisterThing.
    #[arg(long)]
    reusable_tokens: bool,
    /// On MQTT 3.1.1, drop a denied PUBLISH without closing the connection.
    #[arg(long)]
    keep_connection_on_denied_publish: bool,
    /// What RegisterThing does with a thing property OverrideSettings leaves out.
    #[arg(long, default_value = "replace", value_parser = parse_override)]
    default_override: Override,
    /// A name the server certificate is also for (repeatable; a DNS name or an IP address),
    /// besides localhost, 127.0.0.1 and ::1: for a fake listening on another address.
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Region in ARNs.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Account id in ARNs.
    #[arg(long, default_value = "123456789012")]
    account: String,
}

fn name_value(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    if name.is_empty() || value.is_empty() {
        return Err(format!("expected NAME=VALUE, got {s:?}"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

fn parse_throttle(s: &str) -> Result<Vec<(Api, u32)>, String> {
    if s == "aws" {
        return Ok(fake_iot_core::server::AWS_QUOTAS.to_vec());
    }
    let (api, n) = name_value(s)?;
    let api: Api =
        serde_json::from_value(serde_json::Value::String(api.clone())).map_err(|_| {
            format!(
                "unknown API {api:?} (expected Connect, CreateKeysAndCertificate, \
             CreateCertificateFromCsr, RegisterThing or Jobs)"
            )
        })?;
    let n = n
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{n:?} is not a positive number of requests per second"))?;
    Ok(vec![(api, n)])
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 10m, 12h or 30d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?} is not a duration like 90s, 10m, 12h or 30d")),
    };
    if secs == 0 {
        return Err("the certificate validity must be positive".to_owned());
    }
    Ok(Duration::from_secs(secs))
}

fn parse_override(s: &str) -> Result<Override, String> {
    match s {
        "replace" => Ok(Override::Replace),
        "do-nothing" => Ok(Override::DoNothing),
        "merge" => Ok(Override::Merge),
        "fail" => Ok(Override::Fail),
        _ => Err(format!(
            "{s:?} is not one of replace, do-nothing, merge, fail"
        )),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // A fleet simulation holds thousands of connections: use the hard file limit, not 1024.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    {
        use tracing_subscriber::filter::Targets;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = std::env::var("FAKE_IOT_CORE_LOG")
            .ok()
            .and_then(|text| text.parse::<Targets>().ok())
            .or_else(|| "warn,rustls=error".parse().ok())
            .unwrap_or_default();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::stderr)
            .finish()
            .with(filter)
            .init();
    }
    let mut settings = fake_iot_core::Settings::new(args.state_dir.clone());
    settings.region = args.region;
    settings.account = args.account;
    settings.cert_validity = args.cert_validity;
    settings.require_sni = !args.no_require_sni;
    settings.connect_gap = (!args.no_connect_throttle).then_some(Duration::from_secs(1));
    settings.single_use_tokens = !args.reusable_tokens;
    settings.disconnect_on_denied_publish = !args.keep_connection_on_denied_publish;
    settings.disconnect_on_certificate_deactivation =
        !args.keep_connection_on_certificate_deactivation;
    settings.disconnect_on_certificate_expiry = args.disconnect_on_certificate_expiry;
    settings.default_override = args.default_override;
    settings.throttles = args.throttles.into_iter().flatten().collect();
    settings.server_names = args.server_names;
    let options = Options {
        settings,
        mqtt: args.mqtt,
        mqtt_alpn: args.mqtt_alpn,
        http: args.http,
        templates: args.templates,
        claims: args.claims,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake-iot-core: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-iot-core: {e}");
            ExitCode::from(2)
        }
    }
}
