//! `iotctl status`: iotd's D-Bus properties as one screen a person reads in five seconds, or as
//! JSON with stable keys. Rendering is a pure function of the properties and the time, so the
//! golden tests need no bus.

use std::fmt::Write as _;

use iotd_api::{Agent1Proxy, ErrorCode};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The agent's properties, with "none" (empty strings, time 0) made `None`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusView {
    /// One of `iotd_api::state::*`.
    pub state: String,
    /// The provisioning step ("key-ready", …).
    pub step: String,
    /// What iotd waits for, in its words ("a claim: …"), when it waits.
    pub waiting_for: Option<String>,
    pub thing_name: Option<String>,
    pub certificate_id: Option<String>,
    /// Unix seconds.
    pub certificate_not_after: Option<i64>,
    pub certificate_path: Option<String>,
    /// Unix seconds.
    pub next_rotation: Option<i64>,
    /// The certificate the last rotation replaced, kept as a fallback until
    /// `previous_delete_after` (Unix seconds).
    pub previous_certificate_id: Option<String>,
    pub previous_delete_after: Option<i64>,
    /// "file" or "tpm".
    pub key_backend: String,
    /// Where the key is ("file /var/lib/iotd/gen/1/key.pem").
    pub key_reference: Option<String>,
    pub connected: bool,
    /// "host:port".
    pub endpoint: Option<String>,
    pub last_error: Option<LastErrorView>,
    pub onboarding_open: bool,
    /// Unix seconds.
    pub onboarding_closes_at: Option<i64>,
    /// iotd's version.
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastErrorView {
    /// A stable code ("network", "claim-expired", …).
    pub code: String,
    /// The cause, as iotd words it.
    pub message: String,
    /// Unix seconds.
    pub time: Option<i64>,
}

fn text(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn when(t: i64) -> Option<i64> {
    (t != 0).then_some(t)
}

impl StatusView {
    /// Reads every property (concurrently: one round trip on a busy bus, not fifteen).
    pub async fn fetch(proxy: &Agent1Proxy<'_>) -> zbus::Result<Self> {
        let (state, step, thing_name, certificate_id, certificate_not_after, certificate_path) = tokio::try_join!(
            proxy.state(),
            proxy.step(),
            proxy.thing_name(),
            proxy.certificate_id(),
            proxy.certificate_not_after(),
            proxy.certificate_path(),
        )?;
        let (next_rotation, key_backend, key_reference, connected, endpoint) = tokio::try_join!(
            proxy.next_rotation(),
            proxy.key_backend(),
            proxy.key_reference(),
            proxy.connected(),
            proxy.endpoint(),
        )?;
        let (last_error, onboarding_open, onboarding_closes_at, version, waiting_for) = tokio::try_join!(
            proxy.last_error(),
            proxy.onboarding_open(),
            proxy.onboarding_closes_at(),
            proxy.version(),
            proxy.waiting_for(),
        )?;
        let (previous_certificate_id, previous_delete_after) = tokio::try_join!(
            proxy.previous_certificate_id(),
            proxy.previous_delete_after(),
        )?;
        let (code, message, time) = last_error;
        Ok(Self {
            state,
            step,
            waiting_for: text(waiting_for),
            thing_name: text(thing_name),
            certificate_id: text(certificate_id),
            certificate_not_after: when(certificate_not_after),
            certificate_path: text(certificate_path),
            next_rotation: when(next_rotation),
            previous_certificate_id: text(previous_certificate_id),
            previous_delete_after: when(previous_delete_after),
            key_backend,
            key_reference: text(key_reference),
            connected,
            endpoint: text(endpoint),
            last_error: (!code.is_empty()).then(|| LastErrorView {
                code,
                message,
                time: when(time),
            }),
            onboarding_open,
            onboarding_closes_at: when(onboarding_closes_at),
            version: text(version),
        })
    }
}

/// RFC 3339 in UTC ("2026-09-01T00:00:00Z"); a time outside the calendar shows as "@secs".
pub fn rfc3339(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{secs}"))
}

/// "45 s", "12 min", "5 h", "3 days": the coarsest unit that still says something.
fn span(secs: i64) -> String {
    let secs = secs.abs();
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

/// "in 12 min" / "3 h ago".
fn relative(t: i64, now: i64) -> String {
    if t >= now {
        format!("in {}", span(t - now))
    } else {
        format!("{} ago", span(now - t))
    }
}

/// Under this many days left, the certificate line is a warning (same as `iotctl check`).
pub const CERTIFICATE_WARNING_DAYS: i64 = 30;

#[derive(Clone, Copy)]
enum Paint {
    Bold,
    Green,
    Yellow,
    Red,
}

struct Painter(bool);

impl Painter {
    fn paint(&self, paint: Paint, s: &str) -> String {
        if !self.0 {
            return s.to_owned();
        }
        let code = match paint {
            Paint::Bold => "1",
            Paint::Green => "1;32",
            Paint::Yellow => "1;33",
            Paint::Red => "1;31",
        };
        format!("\x1b[{code}m{s}\x1b[0m")
    }
}

/// What `remedy_for` says about a code this iotctl does not know (a newer iotd's).
pub const UNKNOWN_CODE_REMEDY: &str = "see journalctl -u iotd";

/// What a person should do about an error, by its stable code. iotd's message already names
/// the cause (and often the fix); this adds where to act and what happens next. No `_` arm: a
/// new code does not compile until it has its text.
pub fn remedy(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Config => "fix the configuration (iotctl config check)",
        ErrorCode::ClaimMissing => {
            "install the claim certificate and key named by provisioning.claim_certificate and provisioning.claim_key"
        }
        ErrorCode::ClaimExpired => "install a new claim certificate and key",
        ErrorCode::ClaimRejected => {
            "register and activate the claim certificate in AWS IoT, or install another claim"
        }
        ErrorCode::PolicyDenied => {
            "let the claim's IoT policy publish and subscribe to the fleet provisioning topics"
        }
        ErrorCode::TemplateRejected => {
            "check provisioning.template and the template's parameters in AWS IoT"
        }
        ErrorCode::HookDenied => {
            "the pre-provisioning hook refused this gateway; see the hook's logs"
        }
        ErrorCode::Throttled => "AWS IoT is throttling requests; nothing to do",
        ErrorCode::NoReply => {
            "check that the claim's IoT policy allows the fleet provisioning reply topics"
        }
        ErrorCode::Rejected => "AWS IoT rejected the request; see the message",
        ErrorCode::ServerUntrusted => "check cloud.endpoint and cloud.ca_bundle (iotctl check)",
        ErrorCode::Network => "check the network, DNS and firewall (iotctl check)",
        ErrorCode::ConnectRefused => {
            "let the device policy allow iot:Connect with the thing name as client id"
        }
        ErrorCode::CertificateMismatch | ErrorCode::Key => {
            "the device identity is unusable: iotctl reprovision makes a new one"
        }
        ErrorCode::CertificateExpired => {
            "the device certificate has expired, and AWS IoT no longer takes it even for a rotation: iotctl reprovision makes a new identity with the claim"
        }
        ErrorCode::CertificateRevoked => {
            "the device certificate is revoked for good: iotctl reprovision makes a new identity with the claim"
        }
        ErrorCode::CertificateInactive => {
            "activate the device certificate in AWS IoT (is it in this account and region?), or iotctl reprovision makes a new identity"
        }
        ErrorCode::KeyLost => {
            "the device key is gone: iotctl reprovision makes a new identity (with provisioning.reprovision_when_key_lost and a claim, iotd does so by itself)"
        }
        ErrorCode::Store => "check the state directory: permissions, free space (iotctl check)",
        ErrorCode::NotProvisioned => {
            "the gateway has no identity yet: let provisioning finish, or give it a claim (provisioning.claim_certificate, provisioning.claim_key)"
        }
        ErrorCode::NotSupported => "this iotd can't do that; a newer iotd may",
        ErrorCode::Busy => "iotd is busy with another operation; try again when it has finished",
        ErrorCode::Parameter => {
            "a template parameter's file or command failed (the message says which); iotctl check runs them all. Fix it, then iotctl reprovision"
        }
    }
}

/// `remedy` for a code as it arrives over D-Bus: a code this iotctl does not know (a newer
/// iotd's) points at the journal.
pub fn remedy_for(code: &str) -> &'static str {
    ErrorCode::parse(code).map_or(UNKNOWN_CODE_REMEDY, remedy)
}

/// Width of the label column.
const LABEL_WIDTH: usize = 15;
/// Long values (iotd's error messages) wrap here, so the screen reads in an 80-column terminal.
const SCREEN_WIDTH: usize = 80;

/// `text` in lines of at most `width` characters, broken at spaces (a longer word stays whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// A property line: the label in a 15-column field, like `systemctl status`.
fn line(out: &mut String, label: &str, value: &str) {
    let label = if label.is_empty() {
        String::new()
    } else {
        format!("{label}:")
    };
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{label:<LABEL_WIDTH$}{value}");
}

/// The status screen. `now` decides "days left" and "ago" (a parameter, so tests are stable);
/// `colour` adds ANSI colours (the caller decides: a terminal, and no NO_COLOR).
pub fn render_status(view: &StatusView, now: OffsetDateTime, colour: bool) -> String {
    let now = now.unix_timestamp();
    let p = Painter(colour);
    let mut out = String::new();
    let failed = view.state == iotd_api::state::FAILED;

    let state = match view.state.as_str() {
        iotd_api::state::PROVISIONED => p.paint(Paint::Green, &view.state),
        iotd_api::state::PROVISIONING => {
            format!(
                "{} (step {})",
                p.paint(Paint::Yellow, &view.state),
                view.step
            )
        }
        iotd_api::state::FAILED => {
            format!(
                "{} (at step {})",
                p.paint(Paint::Red, &view.state),
                view.step
            )
        }
        _ => p.paint(Paint::Bold, &view.state),
    };
    line(&mut out, "State", &state);

    let thing = view.thing_name.as_deref().unwrap_or("none yet");
    line(&mut out, "Thing", thing);

    match (&view.certificate_id, view.certificate_not_after) {
        (None, _) => line(&mut out, "Certificate", "none yet"),
        (Some(id), not_after) => {
            let validity = match not_after {
                None => "issued, not in use yet".to_owned(),
                Some(t) if t <= now => p.paint(
                    Paint::Red,
                    &format!("expired {} ({} ago)", rfc3339(t), span(now - t)),
                ),
                Some(t) => {
                    let days = (t - now) / 86_400;
                    let left = if days >= 1 {
                        format!("{days} days left")
                    } else {
                        format!("{} left", span(t - now))
                    };
                    let left = if days < CERTIFICATE_WARNING_DAYS {
                        p.paint(Paint::Yellow, &left)
                    } else {
                        left
                    };
                    format!("valid until {} ({left})", rfc3339(t))
                }
            };
            line(&mut out, "Certificate", &validity);
            line(&mut out, "", &format!("id {id}"));
            if let Some(path) = &view.certificate_path {
                line(&mut out, "", path);
            }
        }
    }

    let rotation = match view.next_rotation {
        Some(t) => format!("{} ({})", rfc3339(t), relative(t, now)),
        None => "none scheduled".to_owned(),
    };
    line(&mut out, "Next rotation", &rotation);
    if let Some(previous) = &view.previous_certificate_id {
        let kept = view.previous_delete_after.map_or_else(String::new, |t| {
            format!(", kept as a fallback until {}", rfc3339(t))
        });
        line(
            &mut out,
            "Previous",
            &format!("certificate {previous}{kept}"),
        );
    }

    let key = match &view.key_reference {
        // DeviceKey::location starts with the backend ("file /var/…"); don't say it twice.
        Some(r) if r.starts_with(&format!("{} ", view.key_backend)) => r.clone(),
        Some(r) => format!("{}, {r}", view.key_backend),
        None => format!("{} (no key yet)", view.key_backend),
    };
    line(&mut out, "Key", &key);

    let endpoint = view.endpoint.as_deref().unwrap_or("no endpoint");
    let connection = if view.connected {
        format!("{} to {endpoint}", p.paint(Paint::Green, "connected"))
    } else if view.state == iotd_api::state::PROVISIONED {
        format!("{} ({endpoint})", p.paint(Paint::Yellow, "not connected"))
    } else {
        format!("not connected ({endpoint})")
    };
    line(&mut out, "Connection", &connection);

    if view.onboarding_open || view.state == iotd_api::state::UNPROVISIONED {
        let onboarding = match (view.onboarding_open, view.onboarding_closes_at) {
            (true, Some(t)) => format!("open until {} ({})", rfc3339(t), relative(t, now)),
            (true, None) => "open".to_owned(),
            (false, _) => "closed".to_owned(),
        };
        line(&mut out, "Onboarding", &onboarding);
    }

    match &view.last_error {
        None => line(&mut out, "Last error", "none"),
        Some(e) => {
            let colour = if failed { Paint::Red } else { Paint::Yellow };
            let at = match e.time {
                Some(t) => format!(", {} ({})", rfc3339(t), relative(t, now)),
                None => String::new(),
            };
            line(
                &mut out,
                "Last error",
                &format!("{}{at}", p.paint(colour, &e.code)),
            );
            for message_line in e.message.lines() {
                for wrapped in wrap(message_line, SCREEN_WIDTH - LABEL_WIDTH) {
                    line(&mut out, "", &wrapped);
                }
            }
            for (i, wrapped) in wrap(remedy_for(&e.code), SCREEN_WIDTH - LABEL_WIDTH)
                .iter()
                .enumerate()
            {
                line(&mut out, if i == 0 { "Remedy" } else { "" }, wrapped);
            }
            let next = if failed {
                "iotd stopped trying; after the fix: systemctl restart iotd"
            } else {
                "iotd retries by itself"
            };
            line(&mut out, "", next);
        }
    }

    if let Some(waiting) = &view.waiting_for {
        // iotd's words say what it waits for and how to give it that.
        for (i, wrapped) in wrap(waiting, SCREEN_WIDTH - LABEL_WIDTH).iter().enumerate() {
            line(&mut out, if i == 0 { "Waiting for" } else { "" }, wrapped);
        }
    } else if view.state == iotd_api::state::UNPROVISIONED && view.last_error.is_none() {
        line(
            &mut out,
            "Next",
            "configure a claim (provisioning.claim_certificate, provisioning.claim_key)",
        );
        line(&mut out, "", "or open onboarding for an installer's phone");
    }
    out
}

/// The `--json` object. Its keys are a stable interface for scripts: add, never rename.
pub fn status_json(view: &StatusView) -> Value {
    json!({
        "state": view.state,
        "step": view.step,
        "waitingFor": view.waiting_for,
        "thingName": view.thing_name,
        "certificateId": view.certificate_id,
        "certificateNotAfter": view.certificate_not_after.map(rfc3339),
        "certificatePath": view.certificate_path,
        "nextRotation": view.next_rotation.map(rfc3339),
        "previousCertificateId": view.previous_certificate_id,
        "previousDeleteAfter": view.previous_delete_after.map(rfc3339),
        "keyBackend": view.key_backend,
        "keyReference": view.key_reference,
        "connected": view.connected,
        "endpoint": view.endpoint,
        "lastError": view.last_error.as_ref().map(|e| json!({
            "code": e.code,
            "message": e.message,
            "time": e.time.map(rfc3339),
        })),
        "onboarding": {
            "open": view.onboarding_open,
            "closesAt": view.onboarding_closes_at.map(rfc3339),
        },
        "version": view.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_pick_a_readable_unit() {
        assert_eq!(span(59), "59 s");
        assert_eq!(span(60), "1 min");
        assert_eq!(span(3599), "59 min");
        assert_eq!(span(7200), "2 h");
        assert_eq!(span(3 * 86_400), "3 days");
        assert_eq!(relative(100, 40), "in 1 min");
        assert_eq!(relative(40, 100), "1 min ago");
    }

    #[test]
    fn long_text_wraps_at_spaces() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(wrap("a verylongword b", 4), vec!["a", "verylongword", "b"]);
        assert!(wrap("", 4).is_empty());
    }

    #[test]
    fn colour_only_when_asked() {
        let view = StatusView {
            state: "failed".into(),
            step: "unprovisioned".into(),
            key_backend: "file".into(),
            ..StatusView::default()
        };
        let now = OffsetDateTime::UNIX_EPOCH;
        assert!(!render_status(&view, now, false).contains('\x1b'));
        assert!(render_status(&view, now, true).contains("\x1b[1;31mfailed\x1b[0m"));
    }

    #[test]
    fn every_code_has_its_own_remedy() {
        // Codes that deliberately share a text: both mean "this identity can't be used".
        let shared = [ErrorCode::CertificateMismatch, ErrorCode::Key];
        let mut by_text = std::collections::HashMap::new();
        for &code in ErrorCode::ALL {
            let text = remedy(code);
            assert!(!text.trim().is_empty(), "{code}");
            assert_ne!(text, UNKNOWN_CODE_REMEDY, "{code}");
            assert_eq!(remedy_for(code.as_str()), text, "{code}");
            by_text.entry(text).or_insert_with(Vec::new).push(code);
        }
        for (text, codes) in by_text {
            assert!(
                codes.len() == 1 || codes == shared,
                "{codes:?} share the remedy {text:?}"
            );
        }
    }

    #[test]
    fn an_unknown_code_points_at_the_journal() {
        assert_eq!(remedy_for("something-new"), UNKNOWN_CODE_REMEDY);
        assert_eq!(remedy_for(""), UNKNOWN_CODE_REMEDY);
    }
}
