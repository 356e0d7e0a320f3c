//! `iotctl onboard HOST[:PORT]`: the installer's client of trusted-user onboarding (profile
//! `iotd-onboard/1`, §5.4–5.5 of the onboarding protocol note). It hands the gateway a
//! provisioning claim from AWS CreateProvisioningClaim, sealed for the gateway whose label the
//! installer holds, and follows the gateway until it is connected with its own identity.
//!
//! 1. Before any network call: the setup code's Verhoeff digit and the serial (from `--code`
//!    and `--serial`, or `--qr`), the claim files (the key must be the certificate's: the
//!    gateway's own check), `--param` and the bundle's size. Any problem is exit 2.
//! 2. `POST /v1/pair/params` (a fresh `client_random`, `client_id` `iotctl/<version>`, the
//!    binding): the serial the gateway answers must be the label's, else iotctl stops ("this is
//!    not the gateway on the label").
//! 3. The prover's secret from the code, the serial and the gateway's PBKDF parameters; SPAKE2+
//!    as the prover over the context of everything step 2 exchanged, bound (by default) to the
//!    TLS certificate iotctl saw: `POST /v1/pair/start`. If the gateway's `confirm_v` does not
//!    check out (a wrong code, or someone in between: a relay that re-terminates TLS changes
//!    the binding), iotctl ends the session with a `/v1/pair/finish` carrying random bytes,
//!    which tell the gateway nothing but free it at once for the next try (else it would keep
//!    the unfinished session, and answer `busy`, for up to 30 s), and stops.
//! 4. `POST /v1/pair/finish`, then the claim bundle sealed with the session's client-to-gateway
//!    key (`POST /v1/claim`), and the gateway's sealed ack, which must say `accepted`.
//! 5. The gateway's progress from `GET /v1/events` (Server-Sent Events of the `/v1/status`
//!    object), each phase printed as it comes, until `connected` (exit 0), `failed` (exit 1,
//!    with the gateway's reason) or `--timeout` (exit 1).
//!
//! Every refusal of the gateway is printed with its message and the attempts left. The exit
//! codes are in `cli::ONBOARD_EXIT_CODES_HELP`.
//!
//! Secrets: the setup code, the prover's secret, the session keys, the key PEM and the bundle's
//! plaintext are wiped when dropped (`Zeroizing`; the library's types wipe themselves). What
//! cannot be wiped: the code as clap read it from the command line (it is also in the process's
//! arguments while iotctl runs), and the decoded key inside ring while the claim files are
//! checked.

mod discover;
mod http;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use iotd::onboard::bundle::MAX_BUNDLE_LEN;
use iotd::onboard::code::{SetupCode, check_serial, parse_qr};
use iotd::onboard::register::derive_secret;
use iotd::onboard::session::{
    self, Binding, Channel, ContextParams, MessageType, RANDOM_LEN, Role, SESSION_ID_LEN, SUITE,
};
use iotd::onboard::spake2plus::{Prover, Spake2PlusError};
use serde::Serialize;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use self::http::{Answer, Gateway, NetError, Target};
use crate::cli::{OnboardArgs, OnboardBinding};
use crate::exit;

/// The onboarding port when HOST has none.
pub const DEFAULT_PORT: u16 = 8443;

const PARAMS: &str = "/v1/pair/params";
const START: &str = "/v1/pair/start";
const FINISH: &str = "/v1/pair/finish";
const CLAIM: &str = "/v1/claim";
const STATUS: &str = "/v1/status";
const EVENTS: &str = "/v1/events";

/// How often `/v1/status` is asked when the events are not available.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// `idProver`: who we say we are.
fn client_id() -> String {
    format!("iotctl/{}", env!("CARGO_PKG_VERSION"))
}

/// `iotctl onboard`: runs it and returns the exit code (the outcome is printed).
pub async fn run(args: OnboardArgs) -> u8 {
    if args.discover {
        return discover::run(Duration::from_secs(args.discover_for.into()), args.json).await;
    }
    let out = Output::new(args.json);
    match onboard(args, &out).await {
        Ok(done) => {
            out.done(&done);
            exit::OK
        }
        Err(stop) => {
            out.stopped(&stop);
            stop.exit
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outcomes.

/// The gateway is connected with its own identity.
#[derive(Debug)]
struct Done {
    serial: String,
    thing_name: Option<String>,
    /// Seconds the claim had left then, by this computer's clock.
    claim_left: Option<i64>,
}

/// Why iotctl stopped, and with which exit code.
#[derive(Debug)]
struct Stop {
    exit: u8,
    /// A stable word for `--json`'s result.
    result: &'static str,
    message: String,
    /// The gateway's refusal, when it refused.
    refusal: Option<Box<Refusal>>,
}

/// A refusal of the gateway (§5.4.1): `{"v":1,"error","message","attempts_left"}`.
#[derive(Debug)]
struct Refusal {
    endpoint: &'static str,
    status: u16,
    code: String,
    message: String,
    attempts_left: Option<u64>,
}

impl Stop {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            exit: exit::USAGE,
            result: "usage",
            message: message.into(),
            refusal: None,
        }
    }

    fn unreachable(error: NetError) -> Self {
        Self {
            exit: exit::NOT_REACHABLE,
            result: "unreachable",
            message: format!(
                "the gateway is not reachable: {error}; nothing was handed over (check the \
                 address and that its onboarding window is open, then run this again)"
            ),
            refusal: None,
        }
    }

    fn failed(result: &'static str, message: impl Into<String>) -> Self {
        Self {
            exit: exit::FAILURE,
            result,
            message: message.into(),
            refusal: None,
        }
    }

    fn refused(refusal: Refusal) -> Self {
        let mut message = format!(
            "the gateway refused {} ({}, HTTP {}): {}",
            refusal.endpoint, refusal.code, refusal.status, refusal.message
        );
        if let Some(left) = refusal.attempts_left {
            let _ = write!(message, " [attempts left: {left}]");
        }
        Self {
            exit: exit::FAILURE,
            result: "refused",
            message,
            refusal: Some(Box::new(refusal)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output: text for people, or one JSON object per line.

struct Output {
    json: bool,
    start: Instant,
}

impl Output {
    fn new(json: bool) -> Self {
        Self {
            json,
            start: Instant::now(),
        }
    }

    fn elapsed(&self) -> f64 {
        (self.start.elapsed().as_secs_f64() * 10.0).round() / 10.0
    }

    /// A step: `text` for people, `{"event", "elapsed_seconds", ...fields}` in JSON.
    fn step(&self, event: &str, text: &str, fields: Value) {
        if self.json {
            let mut line = json!({ "event": event, "elapsed_seconds": self.elapsed() });
            if let (Value::Object(line), Value::Object(fields)) = (&mut line, fields) {
                line.extend(fields);
            }
            println!("{line}");
        } else {
            println!("{:>6.1}s  {text}", self.elapsed());
        }
    }

    /// A remark that is not a step (a fallback, a warning): standard error in both modes.
    fn note(&self, text: &str) {
        eprintln!("iotctl: {text}");
    }

    fn done(&self, done: &Done) {
        if self.json {
            println!(
                "{}",
                json!({
                    "result": "connected",
                    "exit_code": exit::OK,
                    "serial": done.serial,
                    "thing_name": done.thing_name,
                    "elapsed_seconds": self.elapsed(),
                    "claim_seconds_left": done.claim_left,
                })
            );
        } else {
            let mut line = format!("onboarding took {:.1} s", self.elapsed());
            if let Some(left) = done.claim_left {
                let _ = write!(
                    line,
                    "; the claim had {} left (by this computer's clock)",
                    duration_text(left)
                );
            }
            println!("{line}");
        }
    }

    fn stopped(&self, stop: &Stop) {
        eprintln!("iotctl: {}", stop.message);
        if self.json {
            let mut result = json!({
                "result": stop.result,
                "exit_code": stop.exit,
                "message": stop.message,
                "elapsed_seconds": self.elapsed(),
            });
            if let Some(r) = &stop.refusal {
                result["error"] = json!({
                    "endpoint": r.endpoint,
                    "status": r.status,
                    "code": r.code,
                    "message": r.message,
                    "attempts_left": r.attempts_left,
                });
            }
            println!("{result}");
        }
    }
}

/// "4 min 47 s", "12 s", "expired 3 s ago".
fn duration_text(seconds: i64) -> String {
    let text = |s: i64| match (s / 60, s % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    };
    if seconds < 0 {
        format!("none (it expired {} ago)", text(-seconds))
    } else {
        text(seconds)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

// ---------------------------------------------------------------------------------------------
// What the installer gave, checked before any network call.

/// The label: the serial and the setup code.
struct Label {
    serial: String,
    code: SetupCode,
}

/// `--code` and `--serial`, or `--qr`. The texts are wiped once read.
fn label(args: &mut OnboardArgs) -> Result<Label, Stop> {
    if let Some(qr) = args.qr.take().map(Zeroizing::new) {
        let qr = from_stdin_if_dash(qr, "--qr")?;
        let (serial, code) = parse_qr(qr.trim()).map_err(|e| Stop::usage(format!("--qr: {e}")))?;
        return Ok(Label { serial, code });
    }
    let (Some(code), Some(serial)) = (args.code.take().map(Zeroizing::new), args.serial.take())
    else {
        return Err(Stop::usage(
            "give the label's code and serial (--code and --serial), or its QR payload (--qr)",
        ));
    };
    let code = from_stdin_if_dash(code, "--code")?;
    let code = SetupCode::parse(&code).map_err(|e| Stop::usage(format!("--code: {e}")))?;
    let serial = serial.trim().to_owned();
    check_serial(&serial).map_err(|e| Stop::usage(format!("--serial: {e}")))?;
    Ok(Label { serial, code })
}

/// `-` for a secret: its first line from standard input instead, so that it is not in the
/// process's arguments (which other users of the computer can read).
fn from_stdin_if_dash(text: Zeroizing<String>, option: &str) -> Result<Zeroizing<String>, Stop> {
    if text.as_str() != "-" {
        return Ok(text);
    }
    // Unbuffered (std's stdin keeps a buffer that is never wiped), into buffers that never
    // move.
    let fail = |e: std::io::Error| Stop::usage(format!("{option} -: reading standard input: {e}"));
    let mut input = std::fs::File::open("/dev/stdin").map_err(fail)?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(1024));
    let mut chunk = Zeroizing::new([0; 64]);
    while bytes.len() < 1000 && !bytes.contains(&b'\n') {
        let n = input.read(&mut *chunk).map_err(fail)?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let mut line = Zeroizing::new(String::with_capacity(end));
    line.push_str(
        std::str::from_utf8(&bytes[..end])
            .map_err(|_| Stop::usage(format!("{option} -: standard input is not text")))?,
    );
    Ok(line)
}

/// `--param NAME=VALUE`s: names unique, neither part empty.
fn parameters(params: &[String]) -> Result<BTreeMap<String, String>, Stop> {
    let mut out = BTreeMap::new();
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            return Err(Stop::usage(format!(
                "--param {param:?}: write NAME=VALUE (e.g. Site=Hamburg-3)"
            )));
        };
        if name.is_empty() || value.is_empty() {
            return Err(Stop::usage(format!(
                "--param {param:?}: the name and the value must not be empty"
            )));
        }
        if out.insert(name.to_owned(), value.to_owned()).is_some() {
            return Err(Stop::usage(format!("--param: {name} is given twice")));
        }
    }
    Ok(out)
}

/// The claim as read from its files, and when it expires.
struct ClaimFiles {
    certificate_pem: Zeroizing<String>,
    private_key_pem: Zeroizing<String>,
    /// The certificate's notAfter (Unix seconds); `None` if it could not be read.
    not_after: Option<i64>,
}

fn read_pem(path: &std::path::Path, what: &str) -> Result<Zeroizing<String>, Stop> {
    let bytes = Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| Stop::usage(format!("reading the {what} {}: {e}", path.display())))?,
    );
    match std::str::from_utf8(&bytes) {
        Ok(text) => Ok(Zeroizing::new(text.to_owned())),
        Err(_) => Err(Stop::usage(format!(
            "the {what} {} is not PEM text",
            path.display()
        ))),
    }
}

/// Reads the claim files and checks them as the gateway will: the certificate parses and the
/// key is its key (RSA as AWS issues it, or EC). The dates are not checked against this
/// computer's clock (a warning says if it thinks the claim expired): the gateway uses the claim
/// at once and reports AWS's answer.
fn claim_files(args: &OnboardArgs) -> Result<ClaimFiles, Stop> {
    let (Some(claim_cert), Some(claim_key)) = (&args.claim_cert, &args.claim_key) else {
        return Err(Stop::usage(
            "give the claim's files: --claim-cert and --claim-key",
        ));
    };
    let certificate_pem = read_pem(claim_cert, "claim certificate")?;
    let private_key_pem = read_pem(claim_key, "claim key")?;
    iotd::claim::Claim::from_pem(
        &certificate_pem,
        &private_key_pem,
        claim_cert.display().to_string(),
    )
    .map_err(|e| {
        Stop::usage(format!(
            "the claim files (--claim-cert {}, --claim-key {}): {e}; the gateway would refuse them",
            claim_cert.display(),
            claim_key.display()
        ))
    })?;
    Ok(ClaimFiles {
        not_after: not_after(&certificate_pem),
        certificate_pem,
        private_key_pem,
    })
}

/// The first certificate's notAfter as Unix seconds.
fn not_after(pem: &str) -> Option<i64> {
    let pem = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")?;
    let certificate = pem.parse_x509().ok()?;
    Some(certificate.validity().not_after.timestamp())
}

/// The claim bundle's plaintext (§5.4 of the profile).
#[derive(Serialize)]
struct Bundle<'a> {
    v: u32,
    certificate_pem: &'a str,
    private_key_pem: &'a str,
    /// Always present: `null` when unknown.
    not_after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    parameters: &'a BTreeMap<String, String>,
}

/// The bundle's JSON, in a buffer that is wiped. It is reserved large enough up front (JSON
/// escapes at most 6 bytes per input byte) that it never moves, leaving no unwiped copy.
fn bundle_json(bundle: &Bundle<'_>) -> Result<Zeroizing<Vec<u8>>, Stop> {
    let extra: usize = bundle
        .parameters
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        + bundle.template.map_or(0, str::len)
        + bundle.endpoint.map_or(0, str::len);
    let capacity = 6 * (bundle.certificate_pem.len() + bundle.private_key_pem.len() + extra) + 512;
    let mut out = Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer(&mut *out, bundle)
        .map_err(|e| Stop::failed("internal", format!("writing the claim bundle: {e}")))?;
    if out.len() > MAX_BUNDLE_LEN {
        return Err(Stop::usage(format!(
            "the claim bundle (certificate, key, template and parameters) is {} bytes, and the \
             gateway takes at most {MAX_BUNDLE_LEN}",
            out.len()
        )));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The flow.

async fn onboard(mut args: OnboardArgs, out: &Output) -> Result<Done, Stop> {
    let Some(gateway) = args.gateway.as_deref() else {
        return Err(Stop::usage(
            "give the gateway's HOST[:PORT] (iotctl onboard --discover lists those waiting)",
        ));
    };
    let target = Target::parse(gateway, DEFAULT_PORT).map_err(Stop::usage)?;
    let Label { serial, code } = label(&mut args)?;
    let parameters = parameters(&args.params)?;
    if args
        .template
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
    {
        return Err(Stop::usage("--template: the template name is empty"));
    }
    if let Some(endpoint) = args.endpoint.as_deref()
        && (endpoint.is_empty() || endpoint.contains([':', '/', ' ']) || endpoint.len() > 253)
    {
        return Err(Stop::usage(format!(
            "--endpoint: {endpoint:?} is not a host name (give the endpoint's host only, \
             without scheme or port)"
        )));
    }
    let claim = claim_files(&args)?;
    let bundle = bundle_json(&Bundle {
        v: 1,
        certificate_pem: &claim.certificate_pem,
        private_key_pem: &claim.private_key_pem,
        not_after: claim.not_after,
        template: args.template.as_deref(),
        endpoint: args.endpoint.as_deref(),
        parameters: &parameters,
    })?;
    drop(claim.private_key_pem);
    if let Some(at) = claim.not_after.filter(|at| *at <= unix_now()) {
        out.note(&format!(
            "warning: by this computer's clock the claim certificate expired {} ago; handing it \
             over anyway (the gateway reports AWS's answer)",
            duration_text(unix_now() - at)
        ));
    }
    let timeout = Duration::from_secs(args.timeout);

    // Nothing went to the network before this point.
    let mut gateway = Gateway::connect(&target).await.map_err(Stop::unreachable)?;
    let binding = match args.binding {
        OnboardBinding::TlsServerEndPoint => Binding::tls_server_end_point(gateway.leaf()),
        OnboardBinding::None => Binding::None,
    };
    let address = gateway.address().to_string();
    let via = if address == target.authority() {
        String::new()
    } else {
        format!(" ({address})")
    };
    out.step(
        "tls",
        &format!(
            "connected to {}{via}; gateway certificate sha256:{}",
            target.authority(),
            short_hash(gateway.leaf())
        ),
        json!({
            "address": address,
            "certificate_sha256": hex(&sha256(gateway.leaf())),
        }),
    );

    let paired = pair(&mut gateway, &serial, code, &binding, out).await?;
    let mut channel = paired.channel;

    // The claim, sealed for this session alone.
    let sealed = channel
        .seal(MessageType::Claim, &bundle)
        .map_err(|e| Stop::failed("internal", format!("sealing the claim: {e}")))?;
    drop(bundle);
    let answer = post(
        &mut gateway,
        CLAIM,
        &json!({
            "v": 1,
            "session_id": b64(&paired.session_id),
            "seq": sealed.seq,
            "ct": b64(&sealed.ciphertext),
        }),
        false,
    )
    .await?;
    let seq = answer.body["seq"]
        .as_u64()
        .ok_or_else(|| protocol(CLAIM, "its answer has no \"seq\""))?;
    let ct = bytes_field(&answer.body, "ct").map_err(|e| protocol(CLAIM, &e))?;
    let ack = channel.open(MessageType::ClaimAck, seq, &ct).map_err(|e| {
        Stop::failed(
            "protocol",
            format!(
                "the gateway's answer to the claim did not open ({e}); the claim was sent \
                 sealed for the paired gateway, but whether it took it is unknown: ask the \
                 gateway's status (iotctl status on it)"
            ),
        )
    })?;
    let ack: Value = serde_json::from_slice(&ack).unwrap_or(Value::Null);
    if ack["v"] != 1 || ack["status"] != "accepted" {
        return Err(Stop::failed(
            "protocol",
            format!(
                "the gateway answered the claim with {ack}, not {{\"v\":1,\"status\":\"accepted\"}}"
            ),
        ));
    }
    out.step(
        "claim-accepted",
        "claim handed over: the gateway accepted it",
        json!({}),
    );

    let thing_name = follow(&mut gateway, &serial, timeout, claim.not_after, out).await?;
    Ok(Done {
        serial,
        thing_name,
        claim_left: claim.not_after.map(|at| at - unix_now()),
    })
}

/// What a successful pairing leaves.
struct Paired {
    session_id: [u8; SESSION_ID_LEN],
    channel: Channel,
}

/// `/v1/pair/params`, `/start` and `/finish`: the gateway on the label proves it knows the
/// code, and we prove it back.
async fn pair(
    gateway: &mut Gateway,
    serial: &str,
    code: SetupCode,
    binding: &Binding,
    out: &Output,
) -> Result<Paired, Stop> {
    let client_id = client_id();
    let mut client_random = [0; RANDOM_LEN];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut client_random)
        .map_err(|_| Stop::failed("internal", "the system's random number generator failed"))?;
    let params = post(
        gateway,
        PARAMS,
        &json!({
            "v": 1,
            "client_random": b64(&client_random),
            "client_id": client_id,
            "binding": binding.name(),
        }),
        true,
    )
    .await?;
    let body = &params.body;
    let their_serial = body["serial"]
        .as_str()
        .ok_or_else(|| protocol(PARAMS, "its answer has no \"serial\""))?;
    if their_serial != serial {
        return Err(Stop::failed(
            "not-this-gateway",
            format!(
                "this is not the gateway on the label: it says its serial is {their_serial:?}, \
                 and the label says {serial:?}; nothing was sent (check the address)"
            ),
        ));
    }
    if body["suite"] != SUITE {
        return Err(protocol(
            PARAMS,
            &format!("it offers suite {}, not {SUITE}", body["suite"]),
        ));
    }
    if body["pbkdf"]["alg"] != "PBKDF2-HMAC-SHA256" {
        return Err(protocol(
            PARAMS,
            &format!(
                "it uses PBKDF {}, not PBKDF2-HMAC-SHA256",
                body["pbkdf"]["alg"]
            ),
        ));
    }
    let session_id: [u8; SESSION_ID_LEN] =
        array_field(body, "session_id").map_err(|e| protocol(PARAMS, &e))?;
    let gateway_random: [u8; RANDOM_LEN] =
        array_field(body, "gateway_random").map_err(|e| protocol(PARAMS, &e))?;
    let salt = bytes_field(&body["pbkdf"], "salt").map_err(|e| protocol(PARAMS, &e))?;
    let iterations = body["pbkdf"]["iterations"]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| protocol(PARAMS, "its \"pbkdf.iterations\" is not a count"))?;
    let attempts = body["attempts_left"].as_u64();
    let closes_in = body["window_closes_in"].as_i64();
    out.step(
        "params",
        &format!(
            "gateway {serial} matches the label{}{}",
            attempts.map_or(String::new(), |n| format!("; {n} attempts left")),
            // 0: the window opened by itself and stays open while the gateway needs a claim.
            closes_in.map_or(String::new(), |s| if s > 0 {
                format!(", window closes in {}", duration_text(s))
            } else {
                ", window open while the gateway needs a claim".to_owned()
            }),
        ),
        json!({ "serial": serial, "attempts_left": attempts, "window_closes_in": closes_in }),
    );

    let secret = derive_secret(&code, serial, &salt, iterations)
        .map_err(|e| protocol(PARAMS, &format!("its PBKDF parameters are refused: {e}")))?;
    drop(code);
    let info = session::session_info(
        &ContextParams {
            client_random: &client_random,
            gateway_random: &gateway_random,
            session_id: &session_id,
            salt: &salt,
            iterations,
            binding,
        },
        &client_id,
        serial,
    )
    .map_err(|e| Stop::failed("internal", e.to_string()))?;
    let prover = Prover::start(info, &secret)
        .map_err(|e| Stop::failed("internal", format!("starting SPAKE2+: {e}")))?;
    drop(secret);

    let started = post(
        gateway,
        START,
        &json!({ "v": 1, "session_id": b64(&session_id), "share_p": b64(prover.share()) }),
        true,
    )
    .await?;
    let attempts_left = started.body["attempts_left"].as_u64();
    let share_v = bytes_field(&started.body, "share_v").map_err(|e| protocol(START, &e))?;
    let confirm_v = bytes_field(&started.body, "confirm_v").map_err(|e| protocol(START, &e))?;
    let left = attempts_left.map_or(String::new(), |n| format!(" ({n} attempts left)"));
    let confirmed = match prover.finish(&share_v, &confirm_v) {
        Ok(confirmed) => confirmed,
        Err(Spake2PlusError::ConfirmationMismatch) => {
            abandon(gateway, &session_id).await;
            return Err(Stop::failed(
                "wrong-code",
                format!(
                    "the gateway did not prove it knows this code: wrong code, or someone in \
                     between (a relay that re-terminates TLS). Nothing was sent that depends \
                     on the code. Check the code and serial on the label and try again{left}"
                ),
            ));
        }
        Err(e) => {
            return Err(Stop::failed(
                "protocol",
                format!(
                    "the gateway's answer to {START} is refused ({e}): not an iotd gateway, or \
                     someone in between. Nothing more was sent{left}"
                ),
            ));
        }
    };
    let finished = post(
        gateway,
        FINISH,
        &json!({ "v": 1, "session_id": b64(&session_id), "confirm_p": b64(&confirmed.confirm_p) }),
        true,
    )
    .await?;
    if finished.body["status"] != "paired" {
        return Err(protocol(
            FINISH,
            &format!("it answered {}, not \"paired\"", finished.body),
        ));
    }
    let channel = Channel::new(Role::Client, confirmed.shared, &session_id)
        .map_err(|e| Stop::failed("internal", format!("deriving the session keys: {e}")))?;
    out.step(
        "paired",
        &format!("paired: the gateway proved it holds this label's code{left}"),
        json!({ "attempts_left": attempts_left, "binding": binding.name() }),
    );
    Ok(Paired {
        session_id,
        channel,
    })
}

/// A POST whose refusal stops iotctl. `before_hand_over`: a broken connection means nothing
/// was handed over (exit 3), else it is a failure (exit 1).
async fn post(
    gateway: &mut Gateway,
    endpoint: &'static str,
    body: &Value,
    before_hand_over: bool,
) -> Result<Answer, Stop> {
    let answer = gateway.post(endpoint, body).await.map_err(|e| {
        if before_hand_over {
            Stop::unreachable(e)
        } else {
            Stop::failed(
                "lost",
                format!(
                    "{e}; the claim may or may not have reached the gateway: ask the gateway's \
                     status (GET {STATUS}, or iotctl status on it)"
                ),
            )
        }
    })?;
    if answer.status != 200 {
        return Err(refusal(endpoint, &answer));
    }
    if answer.body["v"] != 1 {
        return Err(protocol(endpoint, "its answer is not version 1 (\"v\": 1)"));
    }
    Ok(answer)
}

/// Ends a session whose `confirm_v` did not check out: a `/v1/pair/finish` with random bytes
/// for `confirm_p` (the gateway refuses it and ends the session; random bytes reveal nothing
/// about the code), so the gateway is free for the next try at once. Best effort: the answer
/// is not needed, and a gateway that does not answer drops the session at its step deadline.
async fn abandon(gateway: &mut Gateway, session_id: &[u8]) {
    let mut noise = [0u8; 32];
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut noise)
        .is_err()
    {
        return;
    }
    let body = json!({ "v": 1, "session_id": b64(session_id), "confirm_p": b64(&noise) });
    let _ = gateway.post(FINISH, &body).await;
}

/// A refusal, from the profile's error body (or what there is of it).
fn refusal(endpoint: &'static str, answer: &Answer) -> Stop {
    let body = &answer.body;
    let code = body["error"].as_str().unwrap_or("unknown").to_owned();
    let message = body["message"]
        .as_str()
        .map_or_else(|| format!("no message (answer: {body})"), str::to_owned);
    Stop::refused(Refusal {
        endpoint,
        status: answer.status,
        code,
        message,
        attempts_left: body["attempts_left"].as_u64(),
    })
}

fn protocol(endpoint: &str, problem: &str) -> Stop {
    Stop::failed(
        "protocol",
        format!("the gateway's answer to {endpoint} is not what iotd-onboard/1 says: {problem}"),
    )
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn bytes_field(object: &Value, name: &str) -> Result<Vec<u8>, String> {
    let text = object[name]
        .as_str()
        .ok_or_else(|| format!("its answer has no \"{name}\""))?;
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| format!("its \"{name}\" is not unpadded base64url"))
}

fn array_field<const N: usize>(object: &Value, name: &str) -> Result<[u8; N], String> {
    let bytes = bytes_field(object, name)?;
    <[u8; N]>::try_from(bytes.as_slice())
        .map_err(|_| format!("its \"{name}\" is {} bytes, not {N}", bytes.len()))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    match Binding::tls_server_end_point(bytes) {
        Binding::TlsServerEndPoint(hash) => hash,
        Binding::None => [0; 32],
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The first 8 bytes of the SHA-256, as `ab:cd:…`, enough to compare by eye.
fn short_hash(der: &[u8]) -> String {
    let hash = sha256(der);
    let parts: Vec<String> = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

// ---------------------------------------------------------------------------------------------
// Progress.

/// Where the gateway is, from `/v1/status` or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    phase: String,
    thing_name: Option<String>,
    error: Option<(String, String)>,
}

impl Progress {
    fn from_status(status: &Value) -> Result<Self, String> {
        let phase = status["phase"]
            .as_str()
            .ok_or_else(|| format!("a status without \"phase\": {status}"))?
            .to_owned();
        let error = status["error"].as_object().map(|e| {
            (
                e.get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_owned(),
                e.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_owned(),
            )
        });
        Ok(Self {
            phase,
            thing_name: status["thing_name"].as_str().map(str::to_owned),
            error,
        })
    }

    /// The phase's order: a later phase is further along; `failed` is outside.
    fn rank(&self) -> Option<u8> {
        Some(match self.phase.as_str() {
            "waiting" => 0,
            "paired" => 1,
            "claim-received" => 2,
            "connecting-with-claim" => 3,
            "certificate-issued" => 4,
            "thing-registered" => 5,
            "connected" => 6,
            _ => return None,
        })
    }

    fn text(&self) -> String {
        let thing = self.thing_name.as_deref().unwrap_or("(unnamed thing)");
        match self.phase.as_str() {
            "waiting" => "waiting for a claim".to_owned(),
            "paired" => "paired".to_owned(),
            "claim-received" => "claim received".to_owned(),
            "connecting-with-claim" => "connecting with the claim".to_owned(),
            "certificate-issued" => "certificate issued".to_owned(),
            "thing-registered" => format!("thing registered as {thing}"),
            "connected" => format!("connected as {thing}: onboarding done"),
            "failed" => format!(
                "failed: {}",
                self.error.as_ref().map_or("(no reason given)", |e| &e.1)
            ),
            other => format!("phase {other}"),
        }
    }
}

/// Follows the gateway's progress after the hand-over until it is connected (its thing's
/// name), it fails, or `timeout` passes.
///
/// Events first: the gateway pushes every change as it happens, so no short phase is missed
/// and nothing is asked in vain. The connection that carried the pairing carries them (the
/// same certificate, so the progress comes from the gateway iotctl paired with). If the events
/// are not available (an answer other than an event stream, e.g. from a proxy or an older
/// gateway) or their stream breaks (the gateway closed the connection), iotctl asks
/// `/v1/status` every second instead, on a new connection that must show the same certificate.
async fn follow(
    gateway: &mut Gateway,
    serial: &str,
    timeout: Duration,
    not_after: Option<i64>,
    out: &Output,
) -> Result<Option<String>, Stop> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tracker = Tracker {
        last: Progress {
            phase: "paired".to_owned(),
            thing_name: None,
            error: None,
        },
        furthest: 1,
        serial: serial.to_owned(),
    };
    let why_polling = match tokio::time::timeout_at(deadline, gateway.events(EVENTS)).await {
        Err(_) => return Err(tracker.timed_out(timeout, not_after, None)),
        Ok(Err(e)) => e,
        Ok(Ok(mut events)) => loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Err(_) => return Err(tracker.timed_out(timeout, not_after, None)),
                Ok(Some(Ok(status))) => {
                    if let Some(end) = tracker.see(&status, out)? {
                        return Ok(end);
                    }
                }
                Ok(Some(Err(e))) => break e,
                Ok(None) => break NetError("the gateway ended the event stream".to_owned()),
            }
        },
    };
    out.note(&format!(
        "following the gateway's progress by asking {STATUS} every second (events: {why_polling})"
    ));
    let mut last_error = None;
    loop {
        match tokio::time::timeout_at(deadline, gateway.get(STATUS)).await {
            Err(_) => return Err(tracker.timed_out(timeout, not_after, last_error)),
            Ok(Ok(answer)) if answer.status == 200 => {
                last_error = None;
                if let Some(end) = tracker.see(&answer.body, out)? {
                    return Ok(end);
                }
            }
            Ok(Ok(answer)) => {
                last_error = Some(format!("{STATUS} answered HTTP {}", answer.status));
            }
            Ok(Err(e)) => last_error = Some(e.0),
        }
        if tokio::time::timeout_at(deadline, tokio::time::sleep(POLL_INTERVAL))
            .await
            .is_err()
        {
            return Err(tracker.timed_out(timeout, not_after, last_error));
        }
    }
}

/// What iotctl has seen of the progress.
struct Tracker {
    /// The last phase printed.
    last: Progress,
    /// The furthest phase seen (its rank).
    furthest: u8,
    serial: String,
}

impl Tracker {
    /// Prints a change; the end when the gateway is connected (its thing) or failed.
    fn see(&mut self, status: &Value, out: &Output) -> Result<Option<Option<String>>, Stop> {
        let progress = Progress::from_status(status)
            .map_err(|e| Stop::failed("protocol", format!("following the gateway: {e}")))?;
        if let Some(theirs) = status["serial"].as_str()
            && theirs != self.serial
        {
            return Err(Stop::failed(
                "not-this-gateway",
                format!(
                    "the gateway's status names serial {theirs:?}, not the label's {:?}",
                    self.serial
                ),
            ));
        }
        if progress == self.last {
            return Ok(None);
        }
        let rank = progress.rank();
        // Before the gateway shows the claim, its status may still say where it was.
        if rank.is_some_and(|r| r <= 1) && self.furthest <= 1 && progress.error.is_none() {
            return Ok(None);
        }
        out.step(
            "phase",
            &progress.text(),
            json!({ "phase": progress.phase, "status": status }),
        );
        self.last = progress.clone();
        if let Some(rank) = rank {
            self.furthest = self.furthest.max(rank);
        }
        match progress.phase.as_str() {
            "connected" => Ok(Some(progress.thing_name)),
            "failed" => {
                let (code, message) = progress
                    .error
                    .unwrap_or_else(|| ("unknown".to_owned(), "no reason given".to_owned()));
                Err(Stop::failed(
                    "failed",
                    format!("onboarding failed on the gateway ({code}): {message}"),
                ))
            }
            "waiting" => {
                let why = progress.error.map_or_else(
                    || "it has lost the claim (did it restart?)".to_owned(),
                    |(code, message)| format!("{message} ({code})"),
                );
                Err(Stop::failed(
                    "failed",
                    format!(
                        "the gateway is waiting for a claim again: {why}; request a new claim \
                         and run this again"
                    ),
                ))
            }
            _ => Ok(None),
        }
    }

    fn timed_out(&self, timeout: Duration, not_after: Option<i64>, error: Option<String>) -> Stop {
        let mut message = format!(
            "the gateway was not connected within {} (last phase: {})",
            duration_text(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX)),
            self.last.phase
        );
        if let Some(error) = error {
            let _ = write!(message, "; the last try to reach it: {error}");
        }
        if let Some(at) = not_after {
            let left = at - unix_now();
            let _ = write!(message, "; the claim has {} left", duration_text(left));
        }
        message.push_str("; iotctl status on the gateway says how it goes");
        Stop::failed("timeout", message)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parameters_are_name_value_pairs() {
        let got = parameters(&["Site=Hamburg-3".to_owned(), "Location=a=b".to_owned()]).unwrap();
        assert_eq!(got["Site"], "Hamburg-3");
        assert_eq!(got["Location"], "a=b");
        for bad in [&["Site"][..], &["=x"], &["Site="], &["A=1", "A=2"]] {
            let bad: Vec<String> = bad.iter().map(|s| (*s).to_owned()).collect();
            let stop = parameters(&bad).unwrap_err();
            assert_eq!(stop.exit, exit::USAGE, "{bad:?}");
        }
    }

    #[test]
    fn the_bundle_has_not_after_always_and_the_rest_when_given() {
        let none = BTreeMap::new();
        let json = bundle_json(&Bundle {
            v: 1,
            certificate_pem: "C\n",
            private_key_pem: "K\n",
            not_after: None,
            template: None,
            endpoint: None,
            parameters: &none,
        })
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"v":1,"certificate_pem":"C\n","private_key_pem":"K\n","not_after":null}"#
        );
        let some = BTreeMap::from([("Site".to_owned(), "H".to_owned())]);
        let json = bundle_json(&Bundle {
            v: 1,
            certificate_pem: "C",
            private_key_pem: "K",
            not_after: Some(1_700_000_000),
            template: Some("T"),
            endpoint: Some("b-ats.iot.eu-west-1.amazonaws.com"),
            parameters: &some,
        })
        .unwrap();
        let value: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            value,
            json!({"v": 1, "certificate_pem": "C", "private_key_pem": "K",
                   "not_after": 1_700_000_000, "template": "T",
                   "endpoint": "b-ats.iot.eu-west-1.amazonaws.com", "parameters": {"Site": "H"}})
        );
        let big = "x".repeat(MAX_BUNDLE_LEN);
        let stop = bundle_json(&Bundle {
            v: 1,
            certificate_pem: &big,
            private_key_pem: "K",
            not_after: None,
            template: None,
            endpoint: None,
            parameters: &none,
        })
        .unwrap_err();
        assert_eq!(stop.exit, exit::USAGE);
    }

    #[test]
    fn durations_read_as_minutes_and_seconds() {
        assert_eq!(duration_text(12), "12 s");
        assert_eq!(duration_text(120), "2 min");
        assert_eq!(duration_text(287), "4 min 47 s");
        assert_eq!(duration_text(-3), "none (it expired 3 s ago)");
    }
}
