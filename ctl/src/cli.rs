//! The command line, as clap sees it. This file depends on clap alone because `build.rs`
//! includes it to render the man pages: whatever `--help` says, `man iotctl` says too.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The exit codes, in `--help` and in the man page. Scripts rely on them: keep the numbers.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (for `check`: no check failed; for `onboard`: the gateway is connected to AWS IoT
     with its own identity)
  1  failure: the operation failed, a check failed (or warned, with --warnings-as-errors),
     the configuration is invalid, or iotd refused the request (for `onboard`: the gateway
     refused, the code did not match, onboarding failed or timed out)
  2  usage error: unknown command or option, bad argument (for `onboard`: also a setup code,
     serial, QR payload or claim file found wrong before contacting the gateway)
  3  iotd is not reachable: the system bus is not there or nothing owns io.iotd.Agent1 on it
     (for `onboard`: the gateway is not reachable at HOST[:PORT])

Environment:
  DBUS_SYSTEM_BUS_ADDRESS  the system bus to talk to iotd on (default: the standard socket)
  NO_COLOR                 when set, no colour even on a terminal";

/// The exit codes of `iotctl onboard`, in its `--help` and man page: the same numbers as
/// [`EXIT_CODES_HELP`], said for the installer.
pub const ONBOARD_EXIT_CODES_HELP: &str = "\
Exit codes:
  0  the gateway is connected to AWS IoT with its own identity: onboarding is done
  1  failure: the gateway refused a step (its message and the attempts left are printed); the
     gateway could not prove it knows the code (a wrong code, or someone in between, e.g. a
     relay that re-terminates TLS); the gateway is not the one on the label (another serial);
     the gateway reported that onboarding failed (its reason is printed); it was not connected
     within --timeout; or contact was lost after the claim was handed over
  2  usage error: unknown option, bad argument, or found before contacting the gateway: a
     setup code whose check digit does not match, a bad serial or QR payload, claim files that
     cannot be read, or whose key is not the certificate's
  3  the gateway is not reachable: HOST does not resolve, no TCP connection or TLS handshake
     at HOST:PORT, or the connection broke before the claim was handed over (nothing was
     handed over: run the command again)

With --discover:
  0  at least one gateway is waiting (they are listed)
  1  no gateway announced itself within --for, or Avahi's browsing failed
  3  Avahi is not reachable: no system bus, or nothing owns org.freedesktop.Avahi on it";

/// Field-operations tool for iotd, the gateway's AWS IoT identity agent.
///
/// `status`, `rotate` and `reprovision` talk to the running iotd over the system bus;
/// `check`, `config check` and most of `support-bundle` read the configuration and the state
/// directory directly and work while iotd is stopped.
#[derive(Debug, Parser)]
#[command(name = "iotctl", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/`
    /// beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d,
    /// /etc/iotd/config.d and /run/iotd/config.d.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what iotd is doing: state, thing, certificate, next rotation, key, connection,
    /// last error and what to do about it.
    #[command(after_help = EXIT_CODES_HELP)]
    Status(StatusArgs),
    /// Diagnose the gateway: configuration, TPM, key and certificate, clock, endpoint (DNS,
    /// TCP, TLS with the device identity), claim. Works while iotd is stopped.
    ///
    /// The checks, by id (for --dont-run): config-valid (the configuration loads, as iotd
    /// would load it, and the template parameters resolve: their files are read and their
    /// commands run, as iotd does before it provisions; the values are not shown);
    /// tpm-reachable (the TPM opens through key.tcti; skipped for the file
    /// backend); key-certificate-match (the device certificate certifies the device key);
    /// certificate-validity (warning under 30 days left, failure when expired or not yet
    /// valid); clock-synchronised; endpoint-resolves; endpoint-tcp; endpoint-tls (a TLS
    /// handshake with the device identity, once the gateway has one); claim-validity (the
    /// claim's dates and key, and a TLS handshake with it, while the gateway still needs it).
    ///
    /// The clock counts as synchronised when `timedatectl show -p NTPSynchronized --value`
    /// says yes (the kernel's flag, whatever NTP daemon sets it); when timedatectl cannot tell,
    /// when /run/systemd/timesync/synchronized exists or `chronyc tracking` reports a leap
    /// status other than "Not synchronised". If none can tell, it is a warning.
    ///
    /// Each check prints √ (ok), ‼ (warning), × (failed) or - (skipped), then what it found.
    #[command(after_help = EXIT_CODES_HELP)]
    Check(CheckArgs),
    /// Ask iotd to replace the device certificate now: a new key, a new certificate over the
    /// production connection, committed once it connected (rolled back otherwise). Runs
    /// whatever the schedule and the clock say.
    #[command(after_help = EXIT_CODES_HELP)]
    Rotate(RotateArgs),
    /// Ask iotd to abandon the identity and provision a new one, with a new key.
    #[command(after_help = EXIT_CODES_HELP)]
    Reprovision,
    /// Work with the configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Collect what support needs into one text file, with secrets removed: configuration,
    /// status, checks, state, recent journal lines, versions.
    #[command(after_help = EXIT_CODES_HELP)]
    SupportBundle(SupportBundleArgs),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
    /// Trusted-user onboarding: the setup code on this gateway's label, with which an
    /// installer hands it a claim.
    #[command(subcommand)]
    Onboarding(OnboardingCommand),
    /// Onboard a gateway as its installer: hand it an AWS provisioning claim over its local
    /// onboarding endpoint, authenticated by the setup code on its label.
    ///
    /// Give the code and serial from the label (--code and --serial), or the label's QR payload
    /// (--qr IOTD1:<serial>:<code>), and the claim certificate and key that AWS
    /// CreateProvisioningClaim returned (certificatePem and keyPair.PrivateKey, saved as PEM
    /// files). The code's check digit, the serial and the claim files are checked before the
    /// gateway is contacted.
    ///
    /// iotctl connects to HOST:PORT over HTTPS. The gateway's certificate is self-signed and is
    /// not verified; instead, the pairing (SPAKE2+ with the setup code, profile iotd-onboard/1)
    /// authenticates the gateway, and with --binding tls-server-end-point (the default) it is
    /// bound to the TLS certificate iotctl saw, so a relay that re-terminates TLS makes the
    /// pairing fail. iotctl checks that the gateway answers with the label's serial and proves
    /// it knows the code before anything secret is sent; then it seals the claim for that
    /// gateway alone, and follows its progress (paired, claim received, connecting with the
    /// claim, certificate issued, thing registered, connected) until the gateway is connected
    /// with its own identity, it fails, or --timeout passes. The claim lives 5 minutes: run
    /// this soon after CreateProvisioningClaim.
    ///
    /// Each wrong code costs one of the gateway's attempts (20 per onboarding window).
    ///
    /// With --discover, iotctl instead lists the gateways on the local network whose
    /// onboarding window is open: they announce themselves over DNS-SD (_iotd-onboard._tcp,
    /// with their serial and model), which iotctl browses through Avahi's D-Bus API, so
    /// avahi-daemon must run on this computer. It prints one line per gateway: its serial,
    /// model, host name and port, and address. The serial to onboard with is still the one on
    /// the label: compare it with the list, never take it from the network.
    #[command(after_help = ONBOARD_EXIT_CODES_HELP)]
    Onboard(OnboardArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON with stable keys instead of text.
    #[arg(long)]
    pub json: bool,
    /// Keep running and print the status again whenever iotd's properties change (one JSON
    /// object per line with --json). Ends on Ctrl-C or when iotd stops.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print a JSON array of {id, description, result, message} instead of text.
    #[arg(long)]
    pub json: bool,
    /// Do not run the check with this id (repeatable; see --list for the ids).
    #[arg(long = "dont-run", value_name = "ID")]
    pub dont_run: Vec<String>,
    /// Treat warnings as failures for the exit code.
    #[arg(long)]
    pub warnings_as_errors: bool,
    /// List the checks' ids and descriptions and exit.
    #[arg(long)]
    pub list: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Read, merge and validate the configuration iotd would use, list the files it is made
    /// of, and run the template parameter sources (files read, commands run; values are not
    /// shown). With FILE, check FILE and the `config.d/` beside it, as `iotd --config FILE`
    /// would read them.
    #[command(after_help = EXIT_CODES_HELP)]
    Check {
        /// The main configuration file to check instead of the system's.
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct SupportBundleArgs {
    /// Where to write the bundle ("-" for standard output). Default:
    /// ./iotd-support-<UTC time>.txt.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Subcommand)]
pub enum OnboardingCommand {
    /// Make this gateway's setup code and store its verifier record; print the label once.
    ///
    /// Run it as root on the gateway itself, once per device (on the production line, never in
    /// an image that several gateways share). It reads the serial from onboarding.serial,
    /// makes a 16-digit code (15 random digits and a Verhoeff check digit), derives the SPAKE2+
    /// verifier from it (PBKDF2-HMAC-SHA256, 100 000 iterations, a random 32-byte salt), and
    /// writes only the verifier to onboarding.json in the state directory (mode 0600, owned by
    /// user iotd). Then it prints the label: the serial, the code as XXXX-XXXX-XXXX-XXXX and
    /// the QR payload IOTD1:<serial>:<code>. The code is stored nowhere: print the label from
    /// this output, or run it again with --replace.
    #[command(after_help = EXIT_CODES_HELP)]
    Register(RegisterArgs),
    /// Open the onboarding window, so that an installer can pair (root or iotd-admin).
    ///
    /// The window also opens by itself while the gateway has no identity and no usable claim.
    /// Opening it by hand starts a new count of attempts: after 20 wrong codes the window
    /// closes, and only this command opens it again.
    #[command(after_help = EXIT_CODES_HELP)]
    Open(OpenArgs),
    /// Close the onboarding window now (root or iotd-admin).
    #[command(after_help = EXIT_CODES_HELP)]
    Close,
    /// Show whether the onboarding window is open, and until when.
    #[command(after_help = EXIT_CODES_HELP)]
    Status(OnboardingStatusArgs),
}

#[derive(Debug, Args)]
pub struct OpenArgs {
    /// How long: seconds, or with a unit (90s, 10m); 1 s to 15 min.
    #[arg(long = "for", value_name = "DURATION", default_value = "10m", value_parser = window_duration)]
    pub duration: u32,
}

#[derive(Debug, Args)]
pub struct OnboardingStatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// An onboarding window's length: "300", "90s", "10m"; 1 s to 15 min.
pub fn window_duration(text: &str) -> Result<u32, String> {
    let (number, unit) = match text.strip_suffix('m') {
        Some(n) => (n, 60),
        None => (text.strip_suffix('s').unwrap_or(text), 1),
    };
    let seconds = number
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{text:?} is not a duration (like 300, 90s or 10m)"))?;
    if !(1..=900).contains(&seconds) {
        return Err(format!(
            "an onboarding window lasts 1 s to 15 min (900 s); {text} is {seconds} s"
        ));
    }
    Ok(seconds)
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Follow the rotation to its end: exit 0 when it committed, 1 when it failed (rolled
    /// back) or did not end in time.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long to follow it, in seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300,
        requires = "wait",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Replace the existing registration with a new code; the old label's code stops working.
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Args)]
pub struct OnboardArgs {
    /// The gateway: a host name or an IP address (an IPv6 one in brackets when a port
    /// follows), and the port of its onboarding endpoint (default 8443).
    #[arg(value_name = "HOST[:PORT]", required_unless_present = "discover")]
    pub gateway: Option<String>,
    /// The setup code on the gateway's label: 16 digits (XXXX-XXXX-XXXX-XXXX; spaces and
    /// hyphens are ignored). "-" reads it from the first line of standard input, which keeps it
    /// out of the process list.
    #[arg(
        long,
        value_name = "CODE",
        required_unless_present_any = ["qr", "discover"],
        requires = "serial",
        conflicts_with = "qr"
    )]
    pub code: Option<String>,
    /// The serial on the gateway's label.
    #[arg(
        long,
        value_name = "SERIAL",
        required_unless_present_any = ["qr", "discover"],
        requires = "code",
        conflicts_with = "qr"
    )]
    pub serial: Option<String>,
    /// The text of the label's QR code, IOTD1:<SERIAL>:<16 digits>, instead of --code and
    /// --serial ("-": the first line of standard input).
    #[arg(long, value_name = "PAYLOAD")]
    pub qr: Option<String>,
    /// The claim certificate, PEM (CreateProvisioningClaim's certificatePem).
    #[arg(long, value_name = "FILE", required_unless_present = "discover")]
    pub claim_cert: Option<PathBuf>,
    /// The claim's private key, PEM (CreateProvisioningClaim's keyPair.PrivateKey).
    #[arg(long, value_name = "FILE", required_unless_present = "discover")]
    pub claim_key: Option<PathBuf>,
    /// The provisioning template the gateway registers with (one its configuration allows;
    /// default: the gateway's configured template).
    #[arg(long, value_name = "TEMPLATE")]
    pub template: Option<String>,
    /// The AWS IoT endpoint the claim was made for (its account's and region's data endpoint,
    /// aws iot describe-endpoint --endpoint-type iot:Data-ATS), when it is not the gateway's
    /// configured one; the gateway's configuration must allow it
    /// (onboarding.allowed_endpoints), and its identity then belongs there.
    #[arg(long, value_name = "HOST")]
    pub endpoint: Option<String>,
    /// A template parameter for the gateway's registration (repeatable), e.g. Site=Hamburg-3;
    /// only names the gateway's configuration lets an installer supply.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// What the pairing binds besides the code: the TLS certificate iotctl saw
    /// (tls-server-end-point), or nothing (none, as a browser must).
    #[arg(long, value_enum, value_name = "BINDING", default_value_t = OnboardBinding::TlsServerEndPoint)]
    pub binding: OnboardBinding,
    /// How long to wait, once the claim is handed over, for the gateway to be connected with
    /// its own identity, in seconds (the claim itself lives 5 minutes).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 180,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout: u64,
    /// Print one JSON object per line for each step and event, and a final result object
    /// ({"result", "exit_code", ...}) instead of text. With --discover: one object,
    /// {"result", "exit_code", "gateways": [{"serial", "model", "host", "port", "address",
    /// "interface", "name", "txt"}]}.
    #[arg(long)]
    pub json: bool,
    /// Instead of onboarding a gateway, list the gateways on the local network whose
    /// onboarding window is open (DNS-SD _iotd-onboard._tcp, browsed through Avahi).
    #[arg(
        long,
        conflicts_with_all = [
            "gateway", "code", "serial", "qr", "claim_cert", "claim_key", "template", "endpoint",
            "params", "binding", "timeout",
        ]
    )]
    pub discover: bool,
    /// With --discover: how long to listen for announcements, in seconds or with a unit (3s,
    /// 1m); 1 s to 5 min. Gateways answer within a second on a quiet network.
    #[arg(
        long = "for",
        value_name = "DURATION",
        default_value = "3s",
        value_parser = discover_duration,
        requires = "discover"
    )]
    pub discover_for: u32,
}

/// How long `onboard --discover` browses: "5", "3s", "1m"; 1 s to 5 min.
pub fn discover_duration(text: &str) -> Result<u32, String> {
    let (number, unit) = match text.strip_suffix('m') {
        Some(n) => (n, 60),
        None => (text.strip_suffix('s').unwrap_or(text), 1),
    };
    let seconds = number
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{text:?} is not a duration (like 3, 3s or 1m)"))?;
    if !(1..=300).contains(&seconds) {
        return Err(format!(
            "discovery lasts 1 s to 5 min (300 s); {text} is {seconds} s"
        ));
    }
    Ok(seconds)
}

/// `--binding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnboardBinding {
    /// The SHA-256 of the gateway's TLS certificate, as iotctl saw it.
    TlsServerEndPoint,
    /// Nothing.
    None,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod window_tests {
    use super::window_duration;

    #[test]
    fn window_durations_are_seconds_or_minutes_up_to_15_min() {
        assert_eq!(window_duration("300"), Ok(300));
        assert_eq!(window_duration("90s"), Ok(90));
        assert_eq!(window_duration("15m"), Ok(900));
        for bad in ["0", "16m", "901", "ten", "-5", "5h", ""] {
            assert!(window_duration(bad).is_err(), "{bad}");
        }
        assert!(window_duration("0").unwrap_err().contains("1 s to 15 min"));
    }
}
