//! `iotctl`, the field-operations tool for iotd. `status`, `rotate` and `reprovision` talk to
//! the running agent over the system bus (`io.iotd.Agent1`, through `iotd_api::Agent1Proxy`);
//! `check`, `config check` and `support-bundle` read the configuration (with iotd's own parser)
//! and the state directory, so they also work while iotd is down.
//!
//! `onboard` is the installer's client of trusted-user onboarding: it talks to a gateway's
//! onboarding endpoint over HTTPS, not to iotd on this machine.
//!
//! Exit codes (also in `--help` and the man page): 0 success; 1 failure (including a failed
//! check); 2 usage error (clap's); 3 iotd not reachable on the system bus (for `onboard`: the
//! gateway not reachable).

pub mod bundle;
pub mod bus;
pub mod check;
pub mod cli;
pub mod clock;
pub mod onboard;
pub mod onboarding;
pub mod redact;
pub mod status;

use std::io::Write as _;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use iotd::config::ConfigPaths;
use time::OffsetDateTime;

use crate::cli::{Cli, Command, ConfigCommand, OnboardingCommand};

/// The exit codes; see `cli::EXIT_CODES_HELP`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    /// clap exits with 2 on its own for usage errors; iotctl uses it for the ones it finds.
    pub const USAGE: u8 = 2;
    pub const NOT_REACHABLE: u8 = 3;
}

fn config_paths(cli_config: Option<&std::path::Path>) -> ConfigPaths {
    match cli_config {
        Some(path) => ConfigPaths::for_main(path),
        None => ConfigPaths::system(),
    }
}

/// Parses the command line, runs the command, and turns the outcome into the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Current-thread: iotctl does one thing at a time; the few concurrent waits (property
    // reads, a watch's streams) are I/O, not work.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("iotctl: starting the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match run(cli, &runtime) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("iotctl: {e:#}");
            if e.downcast_ref::<bus::NotReachable>().is_some() {
                ExitCode::from(exit::NOT_REACHABLE)
            } else {
                ExitCode::from(exit::FAILURE)
            }
        }
    }
}

fn run(cli: Cli, runtime: &tokio::runtime::Runtime) -> anyhow::Result<u8> {
    let paths = config_paths(cli.config.as_deref());
    match cli.command {
        Command::Status(args) if args.watch => runtime.block_on(bus::watch(args.json))?,
        Command::Status(args) => runtime
            .block_on(bus::status(args.json))
            .map_err(|e| why_not_running(e, &paths))?,
        Command::Rotate(args) => runtime.block_on(bus::rotate(
            args.wait,
            std::time::Duration::from_secs(args.timeout),
        ))?,
        Command::Reprovision => runtime.block_on(bus::reprovision())?,
        Command::Check(args) => return run_check(args, paths, runtime),
        Command::Config(ConfigCommand::Check { file }) => {
            let paths = match &file {
                Some(f) => config_paths(Some(f)),
                None => paths,
            };
            return config_check(&paths);
        }
        Command::SupportBundle(args) => {
            if let Some(path) = bundle::write(&paths, args.output.as_deref(), runtime)? {
                println!(
                    "wrote {} (secrets removed; read it before sending it on)",
                    path.display()
                );
            }
        }
        Command::Onboarding(OnboardingCommand::Register(args)) => {
            return onboarding::register(&paths, args.replace);
        }
        Command::Onboarding(OnboardingCommand::Open(args)) => {
            runtime.block_on(bus::open_onboarding(args.duration))?;
        }
        Command::Onboarding(OnboardingCommand::Close) => {
            runtime.block_on(bus::close_onboarding())?
        }
        Command::Onboarding(OnboardingCommand::Status(args)) => {
            runtime.block_on(bus::onboarding_status(args.json))?;
        }
        Command::Onboard(args) => return Ok(runtime.block_on(onboard::run(args))),
        Command::Completions(args) => {
            let mut command = Cli::command();
            let mut out = std::io::stdout().lock();
            clap_complete::generate(args.shell, &mut command, "iotctl", &mut out);
            out.flush()?;
        }
    }
    Ok(exit::OK)
}

fn run_check(
    args: cli::CheckArgs,
    paths: ConfigPaths,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<u8> {
    if args.list {
        print!("{}", check::render_list());
        return Ok(exit::OK);
    }
    let unknown = check::unknown_ids(&args.dont_run);
    if !unknown.is_empty() {
        eprintln!(
            "iotctl: --dont-run: no check is called {}; see iotctl check --list",
            unknown.join(", ")
        );
        return Ok(exit::USAGE);
    }
    let mut ctx = check::Context::new(paths, OffsetDateTime::now_utc(), runtime);
    let outcomes = check::run_checks(&mut ctx, &args.dont_run);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&check::outcomes_json(&outcomes))?
        );
    } else {
        print!("{}", check::render_outcomes(&outcomes, bus::use_colour()));
    }
    Ok(if check::failed(&outcomes, args.warnings_as_errors) {
        exit::FAILURE
    } else {
        exit::OK
    })
}

/// `iotctl config check [FILE]`: loads the configuration as iotd does (a FILE named on the
/// command line must exist; iotd accepts a missing main file only when it is the system default),
/// then runs the template parameter sources, as iotd does before its first request.
fn config_check(paths: &ConfigPaths) -> anyhow::Result<u8> {
    match iotd::config::load(paths) {
        Ok(settings) => {
            println!("read, in order:");
            for source in &settings.sources {
                println!("  {}", source.display());
            }
            match check::resolve_parameters(&settings) {
                Ok(summary) => println!("{summary}"),
                Err(e) => {
                    eprintln!("iotctl: {e}");
                    return Ok(exit::FAILURE);
                }
            }
            println!("config ok");
            Ok(exit::OK)
        }
        Err(e) => {
            eprintln!("iotctl: {}", check::error_chain(&e));
            Ok(exit::FAILURE)
        }
    }
}

/// When iotd is not running, what it left behind says why: the reason it gave when it last
/// stopped (`exit.json`), else the last error in state.json.
fn why_not_running(error: anyhow::Error, paths: &ConfigPaths) -> anyhow::Error {
    let Some(not_reachable) = error.downcast_ref::<bus::NotReachable>() else {
        return error;
    };
    let mut lines: Vec<String> = not_reachable.detail.iter().cloned().collect();
    if let Some(record) = iotd::exit::read() {
        lines.push(format!(
            "it stopped at {} (exit status {}, PID {}): {}",
            status::rfc3339(record.at),
            record.status,
            record.pid,
            record.message
        ));
        lines.push(if record.restarted_by_systemd() {
            "systemd restarts it after this error (unless its start limit was hit: systemctl \
             status iotd); journalctl -u iotd shows how it goes"
                .to_owned()
        } else {
            "systemd does not restart it after this error: fix the cause, then run \
             systemctl restart iotd"
                .to_owned()
        });
    } else if let Some(last) = last_error_on_disk(paths) {
        lines.push(format!(
            "its last recorded error ({}, at {}): {}",
            last.code,
            status::rfc3339(last.at),
            last.message
        ));
        lines.push("journalctl -u iotd says why it stopped".to_owned());
    } else {
        lines.push("journalctl -u iotd says why it stopped".to_owned());
    }
    bus::NotReachable {
        detail: Some(lines.join("\n  ")),
    }
    .into()
}

/// state.json's last error, read without writing anything (no migration, no directory made).
fn last_error_on_disk(paths: &ConfigPaths) -> Option<iotd::store::LastError> {
    let settings = iotd::config::load(paths).ok()?;
    let bytes = std::fs::read(settings.state_dir.join("state.json")).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    serde_json::from_value(value.get("lastError")?.clone()).ok()
}
