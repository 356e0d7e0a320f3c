//! `iotd`: the gateway identity daemon. See the library docs for what it does and which files
//! it uses. Exit codes (`iotd::exit`): 0 after SIGTERM/SIGINT; 1 when a restart may help (one
//! of its tasks died, the TPM did not answer, another iotd holds the state directory); 2 for a
//! configuration error; 3 for a state directory or state it cannot use as they are. The unit
//! does not restart iotd after 2 or 3.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use iotd::config::{self, ConfigPaths, KeySettings};
use iotd::error::ErrorCode;
use iotd::exit;

/// Says why iotd stops (stderr, and `exit.json` for `iotctl status`) and exits with `status`.
fn stop(status: u8, code: ErrorCode, message: &str) -> ExitCode {
    eprintln!("iotd: {message}");
    exit::write(status, code.as_str(), message);
    ExitCode::from(status)
}

const USAGE: &str = "\
Owns this gateway's AWS IoT identity: device key, fleet provisioning, MQTT session.

Usage: iotd [--config FILE]

Options:
  --config FILE  Main configuration file; drop-ins are read from config.d/ beside it.
                 Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d,
                 /etc/iotd/config.d, /run/iotd/config.d.
  -h, --help     Print this help.
  -V, --version  Print the version.
";

/// What the command line asks for. One option does not justify an argument-parsing library
/// in a daemon that must fit in a gateway's flash (clap was 0.3 MB of the binary).
#[derive(Debug, PartialEq, Eq)]
enum Invocation {
    Run { config: Option<PathBuf> },
    Help,
    Version,
}

fn parse_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Invocation, String> {
    let mut config = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        let value = match text.as_ref() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "-V" | "--version" => return Ok(Invocation::Version),
            "--config" => args
                .next()
                .ok_or("--config needs a FILE: iotd --config /etc/iotd/config.toml")?,
            other => match arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
                Some(path) => std::ffi::OsString::from(path),
                // A path that is not UTF-8 still works as the argument after --config.
                None => return Err(format!("unexpected argument {other:?}; see iotd --help")),
            },
        };
        if value.is_empty() {
            return Err("--config needs a FILE, not an empty string".to_owned());
        }
        if config.replace(PathBuf::from(value)).is_some() {
            return Err("--config is given twice".to_owned());
        }
    }
    Ok(Invocation::Run { config })
}

/// "info, iotd=debug," as "info,iotd=debug": `Targets` would read an empty piece as "error"
/// and keep the space in a target's name.
fn tidy_filter(text: &str) -> String {
    text.split(',')
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// What iotd logs when IOTD_LOG does not say: its own info, the libraries' warnings.
const DEFAULT_LOG: &str = "info,rumqttc=warn,rustls=warn";

/// Logs to stderr, filtered by IOTD_LOG (`level` or `target=level`, comma-separated). A plain
/// target filter rather than `EnvFilter`: the latter's regex engine was 0.7 MB of the binary.
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let mut invalid = None;
    let filter = match std::env::var("IOTD_LOG") {
        Ok(text) => tidy_filter(&text).parse::<Targets>().unwrap_or_else(|e| {
            invalid = Some(format!(
                "ignoring IOTD_LOG={text:?} ({e}); logging {DEFAULT_LOG}"
            ));
            DEFAULT_LOG.parse().unwrap_or_default()
        }),
        Err(_) => DEFAULT_LOG.parse().unwrap_or_default(),
    };
    // Under systemd the journal stamps every line itself; elsewhere each line starts with the
    // time. One formatter type for both, rather than tracing-subscriber's two (with and without
    // a timer): each is a separate copy of its formatting code, and the binary has a size budget.
    let line = LogLine {
        time: std::env::var_os("JOURNAL_STREAM").is_none(),
    };
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(std::io::stderr)
        .event_format(line)
        .finish()
        .with(filter)
        .init();
    if let Some(warning) = invalid {
        tracing::warn!("{warning}");
    }
}

/// One log line: `[time ]LEVEL target: message fields`, as tracing-subscriber's full format
/// prints it without colour (iotd opens no spans).
struct LogLine {
    time: bool,
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for LogLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::FormatFields as _;
        use tracing_subscriber::fmt::time::FormatTime as _;
        if self.time {
            if tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut writer)
                .is_err()
            {
                writer.write_str("<unknown time>")?;
            }
            writer.write_char(' ')?;
        }
        // A log-crate record arrives with the target "log"; its own is in its fields.
        let normalized = tracing_log::NormalizeEvent::normalized_metadata(event);
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write!(writer, "{:>5} {}: ", meta.level(), meta.target())?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn main() -> ExitCode {
    // A panic anywhere, in any task, stops iotd with SIGABRT so that systemd restarts it from its
    // persisted state: unwinding would leave the panicked task dead inside a process that looks
    // alive (say, the D-Bus server gone while provisioning carries on).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let config = match parse_args(std::env::args_os().skip(1)) {
        Ok(Invocation::Run { config }) => config,
        Ok(Invocation::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            println!("iotd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => return stop(exit::CONFIG, ErrorCode::Config, &e),
    };
    init_logging();
    let paths = match &config {
        Some(path) => ConfigPaths::for_main(path),
        None => ConfigPaths::system(),
    };
    let settings = match config::load(&paths) {
        Ok(s) => s,
        Err(e) => return stop(exit::CONFIG, ErrorCode::Config, &e.to_string()),
    };
    // Before anything touches the state directory: one agent per directory.
    let _lock = match iotd::store::Store::open(&settings.state_dir).and_then(|s| s.lock()) {
        Ok(lock) => lock,
        Err(e) => {
            let status = if e.fixed_by_restart() {
                exit::FAILURE
            } else {
                exit::STATE
            };
            return stop(status, ErrorCode::Store, &e.to_string());
        }
    };
    let backend: Arc<dyn iotd::keys::KeyBackend> = match &settings.key {
        KeySettings::File => Arc::new(iotd::keys::file::FileBackend::new(&settings.state_dir)),
        KeySettings::Tpm {
            tcti,
            persistent_handle,
        } => {
            // Opening talks to the TPM (blocking); done once, before the runtime starts.
            match iotd::keys::tpm::TpmBackend::open(tcti, &settings.state_dir, *persistent_handle) {
                Ok(b) => Arc::new(b),
                Err(e) => return stop(exit::FAILURE, ErrorCode::Key, &e.to_string()),
            }
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return stop(
                exit::FAILURE,
                ErrorCode::Store,
                &format!("starting the async runtime: {e}"),
            );
        }
    };
    runtime.block_on(serve(settings, backend))
}

/// Runs the supervised tasks: the core, the D-Bus server and the onboarding server.
/// A task that dies is logged and makes iotd exit non-zero, for systemd to restart it from its
/// persisted state: never a half-alive agent.
async fn serve(settings: config::Settings, backend: Arc<dyn iotd::keys::KeyBackend>) -> ExitCode {
    let state_dir = settings.state_dir.clone();
    let onboarding_settings = settings.onboarding.clone();
    let onboarding_backend = backend.clone();
    let (mut core, handle) = match iotd::core::Core::new(settings, backend) {
        Ok(c) => c,
        Err(e) => {
            let status = match (e.restart_helps, e.code) {
                (true, _) => exit::FAILURE,
                (false, ErrorCode::Config) => exit::CONFIG,
                (false, _) => exit::STATE,
            };
            return stop(status, e.code, &e.message);
        }
    };
    // The onboarding server, for an installer to hand over a claim. Without it (the gateway was
    // not registered for onboarding, or its address is taken) iotd still provisions with its
    // image's claim: keep going, say so.
    let onboarding = match iotd::onboard::run::start(
        &state_dir,
        &onboarding_settings,
        onboarding_backend,
        handle.onboarding.clone(),
    )
    .await
    {
        Ok(running) => {
            core.onboarding_served();
            Some(running.task)
        }
        Err(e @ iotd::onboard::run::StartError::NotRegistered(_)) => {
            tracing::info!("{e}");
            None
        }
        Err(e) => {
            tracing::error!("{e}");
            None
        }
    };
    // READY=1 only once the bus name is owned: systemd then knows that iotctl can talk to us.
    // Without a bus the identity still matters more than the API: keep going, say so.
    let dbus = match iotd::dbus::serve(handle, None).await {
        Ok(server) => Some(server),
        // Another iotd owns the name: two agents on one state directory would fight.
        Err(e @ iotd::dbus::ServeError::NameTaken { .. }) => {
            return stop(exit::FAILURE, ErrorCode::Store, &e.to_string());
        }
        Err(e) => {
            tracing::error!("{e}; running without the D-Bus API (iotctl cannot reach this agent)");
            None
        }
    };
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            return stop(
                exit::FAILURE,
                ErrorCode::Store,
                &format!("installing signal handlers: {e}"),
            );
        }
    };
    iotd::notify::ready(&core.status());
    exit::clear();
    let mut core_task = tokio::spawn(core.run());
    let (_bus, mut dbus_task) = match dbus {
        Some(server) => (Some(server.connection), Some(server.task)),
        None => (None, None),
    };
    let dbus_ended = async {
        match &mut dbus_task {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    let mut onboarding_task = onboarding;
    let onboarding_ended = async {
        match &mut onboarding_task {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = &mut core_task => {
            let why = match ended {
                Ok(Ok(())) => "the core task stopped".to_owned(),
                Ok(Err(e)) => format!("the core task stopped: {e}"),
                Err(e) => format!("the core task failed: {e}"),
            };
            tracing::error!("{why}; exiting for systemd to restart iotd");
            exit::write(exit::FAILURE, ErrorCode::Store.as_str(), &why);
            return ExitCode::from(exit::FAILURE);
        }
        ended = onboarding_ended => {
            let why = match ended {
                Ok(Ok(())) => "the onboarding server stopped (it ended)".to_owned(),
                Ok(Err(e)) => format!("the onboarding server stopped ({e})"),
                Err(e) => format!("the onboarding server task stopped ({e})"),
            };
            tracing::error!("{why}; exiting for systemd to restart iotd");
            exit::write(exit::FAILURE, ErrorCode::Store.as_str(), &why);
            return ExitCode::from(exit::FAILURE);
        }
        ended = dbus_ended => {
            let why = match ended {
                Ok(()) => "the D-Bus server task stopped (it ended)".to_owned(),
                Err(e) => format!("the D-Bus server task stopped ({e})"),
            };
            tracing::error!("{why}; exiting for systemd to restart iotd");
            exit::write(exit::FAILURE, ErrorCode::Store.as_str(), &why);
            return ExitCode::from(exit::FAILURE);
        }
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    core_task.abort();
    iotd::notify::stopping();
    tracing::info!("stopping");
    ExitCode::SUCCESS
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation, String> {
        parse_args(args.iter().map(std::ffi::OsString::from))
    }

    /// A line as the journal gets it (no time), for tracing's own events and for a log-crate
    /// record (tss-esapi's, rumqttc's), which keeps its own target rather than "log".
    #[test]
    fn log_lines_name_the_level_the_target_and_the_fields() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || out.clone())
            .event_format(LogLine { time: false })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "iotd::core", attempts = 3, "rotation rolled back");
            let record = tracing_log::log::Record::builder()
                .level(tracing_log::log::Level::Error)
                .target("tss_esapi::context")
                .args(format_args!("Error in creating derived key"))
                .build();
            tracing_log::format_trace(&record).unwrap();
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            " WARN iotd::core: rotation rolled back attempts=3\n\
             ERROR tss_esapi::context: Error in creating derived key\n"
        );
    }

    #[test]
    fn log_filters_are_tidied_before_parsing() {
        use tracing::Level;
        use tracing_subscriber::filter::Targets;
        assert_eq!(tidy_filter(" info, iotd=debug ,,"), "info,iotd=debug");
        let t: Targets = tidy_filter("info, iotd=debug,").parse().unwrap();
        assert!(t.would_enable("iotd::agent", &Level::DEBUG));
        assert!(t.would_enable("rumqttc::state", &Level::INFO));
        assert!(!t.would_enable("rumqttc::state", &Level::DEBUG));
        let t: Targets = DEFAULT_LOG.parse().unwrap();
        assert!(t.would_enable("iotd::agent", &Level::INFO));
        assert!(!t.would_enable("rustls::client", &Level::INFO));
        assert!(t.would_enable("rustls::client", &Level::WARN));
    }

    #[test]
    fn arguments() {
        assert_eq!(parse(&[]), Ok(Invocation::Run { config: None }));
        let at = Some(PathBuf::from("/x/c.toml"));
        assert_eq!(
            parse(&["--config", "/x/c.toml"]),
            Ok(Invocation::Run { config: at.clone() })
        );
        assert_eq!(
            parse(&["--config=/x/c.toml"]),
            Ok(Invocation::Run { config: at })
        );
        assert_eq!(parse(&["--config", "/x", "--help"]), Ok(Invocation::Help));
        assert_eq!(parse(&["-V"]), Ok(Invocation::Version));
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let odd = std::ffi::OsString::from_vec(b"/x/\xff.toml".to_vec());
            let args = [std::ffi::OsString::from("--config"), odd.clone()];
            assert_eq!(
                parse_args(args),
                Ok(Invocation::Run {
                    config: Some(PathBuf::from(odd))
                })
            );
        }
        for (args, says) in [
            (&["--config"][..], "--config needs a FILE"),
            (&["--config="][..], "not an empty string"),
            (&["--config", "a", "--config", "b"][..], "given twice"),
            (&["--confg", "a"][..], "unexpected argument \"--confg\""),
            (&["run"][..], "unexpected argument \"run\""),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }
}
