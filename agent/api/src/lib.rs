//! The contract between `iotd` and `iotctl` (and any other program on the gateway): the D-Bus
//! names, the `io.iotd.Agent1` interface as a proxy, the values of its properties, the names of
//! its errors, and the default file paths. Changing anything here is an API change: add, never
//! rename; a new incompatible interface gets a new number (`Agent2`).

/// The well-known bus name iotd owns on the system bus.
pub const BUS_NAME: &str = "io.iotd.Agent1";
/// The object path of the agent.
pub const OBJECT_PATH: &str = "/io/iotd/Agent1";
/// The interface name.
pub const INTERFACE: &str = "io.iotd.Agent1";
/// Prefix of the D-Bus error names iotd returns (`io.iotd.Error.NotProvisioned`, …).
pub const ERROR_PREFIX: &str = "io.iotd.Error";

/// Default paths.
pub mod paths {
    pub const CONFIG_FILE: &str = "/etc/iotd/config.toml";
    pub const CONFIG_DROPIN_DIRS: [&str; 3] = [
        "/usr/lib/iotd/config.d",
        "/etc/iotd/config.d",
        "/run/iotd/config.d",
    ];
    pub const STATE_DIR: &str = "/var/lib/iotd";
}

/// Values of the `State` property: the one word a person needs.
pub mod state {
    /// No identity and not trying (no claim yet).
    pub const UNPROVISIONED: &str = "unprovisioned";
    /// Working towards an identity (see `Step`).
    pub const PROVISIONING: &str = "provisioning";
    /// Has an identity that connected at least once.
    pub const PROVISIONED: &str = "provisioned";
    /// Stopped on a permanent error (see `LastError`).
    pub const FAILED: &str = "failed";
}

/// Names of the D-Bus errors (after `ERROR_PREFIX.`).
pub mod errors {
    pub const NOT_PROVISIONED: &str = "io.iotd.Error.NotProvisioned";
    pub const BUSY: &str = "io.iotd.Error.Busy";
    pub const NOT_SUPPORTED: &str = "io.iotd.Error.NotSupported";
    pub const INVALID_ARGUMENT: &str = "io.iotd.Error.InvalidArgument";
    pub const FAILED: &str = "io.iotd.Error.Failed";
    pub const ACCESS_DENIED: &str = "io.iotd.Error.AccessDenied";
}

/// The stable codes of iotd's errors: the first field of `LastError`, the `code` of the `Failed`
/// and `SessionDown` signals, `lastError.code` in `iotctl status --json`. Scripts match on the
/// strings (`as_str`), so a code is added, never renamed or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The configuration is invalid or incomplete.
    Config,
    /// No claim certificate or key where the configuration says.
    ClaimMissing,
    /// The claim certificate has expired.
    ClaimExpired,
    /// AWS IoT refused the claim certificate (not registered, not active, revoked).
    ClaimRejected,
    /// The claim's IoT policy does not allow the fleet provisioning topics.
    PolicyDenied,
    /// The provisioning template refused the request (missing or wrong parameters).
    TemplateRejected,
    /// The pre-provisioning hook refused this gateway.
    HookDenied,
    /// AWS IoT asked the device to slow down.
    Throttled,
    /// A request got no reply in time.
    NoReply,
    /// AWS IoT rejected a request for another reason (the message has AWS's words).
    Rejected,
    /// The server's certificate is not trusted, not for the endpoint, or outside its validity.
    ServerUntrusted,
    /// The network, DNS or the endpoint can't be reached.
    Network,
    /// AWS IoT refused the MQTT CONNECT of the device's identity (policy, or not yet active).
    ConnectRefused,
    /// The certificate does not certify the device key.
    CertificateMismatch,
    /// The device's own certificate has expired.
    CertificateExpired,
    /// The device's own certificate has been revoked.
    CertificateRevoked,
    /// AWS IoT refused the device's own certificate in the TLS handshake: not ACTIVE (inactive,
    /// pending transfer, deleted) or not registered.
    CertificateInactive,
    /// The device key can't be used (TPM or file error).
    Key,
    /// The state directory can't be read or written.
    Store,
    /// The operation needs an identity and the gateway has none yet.
    NotProvisioned,
    /// The operation does not exist in this build.
    NotSupported,
    /// The device key is gone for good; only a new identity helps.
    KeyLost,
    /// The request can't run now (work in progress); try again when it has finished.
    Busy,
    /// A template parameter's file or command failed (retried a few times, then given up).
    Parameter,
}

impl ErrorCode {
    /// Every code, once each, in declaration order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::Config,
        ErrorCode::ClaimMissing,
        ErrorCode::ClaimExpired,
        ErrorCode::ClaimRejected,
        ErrorCode::PolicyDenied,
        ErrorCode::TemplateRejected,
        ErrorCode::HookDenied,
        ErrorCode::Throttled,
        ErrorCode::NoReply,
        ErrorCode::Rejected,
        ErrorCode::ServerUntrusted,
        ErrorCode::Network,
        ErrorCode::ConnectRefused,
        ErrorCode::CertificateMismatch,
        ErrorCode::CertificateExpired,
        ErrorCode::CertificateRevoked,
        ErrorCode::CertificateInactive,
        ErrorCode::Key,
        ErrorCode::Store,
        ErrorCode::NotProvisioned,
        ErrorCode::NotSupported,
        ErrorCode::KeyLost,
        ErrorCode::Busy,
        ErrorCode::Parameter,
    ];

    /// The code as scripts and D-Bus see it ("claim-expired").
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Config => "config",
            ErrorCode::ClaimMissing => "claim-missing",
            ErrorCode::ClaimExpired => "claim-expired",
            ErrorCode::ClaimRejected => "claim-rejected",
            ErrorCode::PolicyDenied => "policy-denied",
            ErrorCode::TemplateRejected => "template-rejected",
            ErrorCode::HookDenied => "hook-denied",
            ErrorCode::Throttled => "throttled",
            ErrorCode::NoReply => "no-reply",
            ErrorCode::Rejected => "rejected",
            ErrorCode::ServerUntrusted => "server-untrusted",
            ErrorCode::Network => "network",
            ErrorCode::ConnectRefused => "connect-refused",
            ErrorCode::CertificateMismatch => "certificate-mismatch",
            ErrorCode::CertificateExpired => "certificate-expired",
            ErrorCode::CertificateRevoked => "certificate-revoked",
            ErrorCode::CertificateInactive => "certificate-inactive",
            ErrorCode::Key => "key",
            ErrorCode::Store => "store",
            ErrorCode::NotProvisioned => "not-provisioned",
            ErrorCode::NotSupported => "not-supported",
            ErrorCode::KeyLost => "key-lost",
            ErrorCode::Busy => "busy",
            ErrorCode::Parameter => "parameter",
        }
    }

    /// The code named by `s` (what `as_str` gives); `None` for a code this build does not know,
    /// such as one a newer iotd sent.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|code| code.as_str() == s)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not one of the `ErrorCode`s this build knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownErrorCode(pub String);

impl std::fmt::Display for UnknownErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown error code {:?}", self.0)
    }
}

impl std::error::Error for UnknownErrorCode {}

impl std::str::FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::parse(s).ok_or_else(|| UnknownErrorCode(s.to_owned()))
    }
}

/// `LastError` as it travels: (code, message, unix time); an empty code means none.
pub type LastErrorWire = (String, String, i64);

/// The `io.iotd.Agent1` interface, as clients see it. Times are Unix seconds, 0 meaning "none".
#[zbus::proxy(
    interface = "io.iotd.Agent1",
    default_service = "io.iotd.Agent1",
    default_path = "/io/iotd/Agent1"
)]
pub trait Agent1 {
    /// Starts a rotation now (whatever the schedule and the clock say); answers at once with
    /// its id ("rotation-<generation>"), the same id while it runs. Its end is a
    /// `CredentialsRotated` or a `RotationFailed` signal.
    fn rotate(&self) -> zbus::Result<String>;
    /// Abandons the identity and provisions a new one with a new key; answers what it did.
    fn reprovision(&self) -> zbus::Result<String>;
    /// Opens the local onboarding endpoint for `seconds`; answers when it closes.
    fn open_onboarding(&self, seconds: u32) -> zbus::Result<i64>;
    /// Closes the onboarding endpoint; answers whether it was open.
    fn close_onboarding(&self) -> zbus::Result<bool>;

    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn step(&self) -> zbus::Result<String>;
    /// What the agent waits for, in words ("a claim: …"); "" when it is not waiting.
    #[zbus(property)]
    fn waiting_for(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn thing_name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn certificate_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn certificate_not_after(&self) -> zbus::Result<i64>;
    #[zbus(property)]
    fn next_rotation(&self) -> zbus::Result<i64>;
    #[zbus(property)]
    fn certificate_not_before(&self) -> zbus::Result<i64>;
    /// The certificate the last rotation replaced (kept as a fallback); "" when none.
    #[zbus(property)]
    fn previous_certificate_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn previous_delete_after(&self) -> zbus::Result<i64>;
    #[zbus(property)]
    fn key_backend(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn key_reference(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn certificate_path(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn connected(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn endpoint(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<LastErrorWire>;
    #[zbus(property)]
    fn onboarding_open(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn onboarding_closes_at(&self) -> zbus::Result<i64>;
    /// Pairing attempts left in the open window; 0 when it is closed.
    #[zbus(property)]
    fn onboarding_attempts_left(&self) -> zbus::Result<u32>;
    /// Whether the gateway is announced for discovery (DNS-SD), in words; "" without an
    /// onboarding server.
    #[zbus(property)]
    fn onboarding_discovery(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;

    /// The gateway connected with a new identity for the first time.
    #[zbus(signal)]
    fn provisioned(&self, thing_name: &str, certificate_id: &str) -> zbus::Result<()>;
    /// The certificate was replaced.
    #[zbus(signal)]
    fn credentials_rotated(&self, certificate_id: &str, not_after: i64) -> zbus::Result<()>;
    /// A rotation started (`trigger`: schedule, on-demand, job).
    #[zbus(signal)]
    fn rotation_started(&self, id: &str, trigger: &str) -> zbus::Result<()>;
    /// A rotation failed before its commit and was rolled back (the certificate is unchanged).
    #[zbus(signal)]
    fn rotation_failed(&self, id: &str, code: &str, message: &str) -> zbus::Result<()>;
    /// The certificate a rotation committed was refused; iotd went back to the previous one.
    #[zbus(signal)]
    fn fell_back(&self, certificate_id: &str, message: &str) -> zbus::Result<()>;
    /// An operation stopped on a permanent error.
    #[zbus(signal)]
    fn failed(&self, code: &str, message: &str) -> zbus::Result<()>;
    /// The MQTT session with the device's identity is up.
    #[zbus(signal)]
    fn session_up(&self, certificate_id: &str) -> zbus::Result<()>;
    /// The MQTT session went down: on an error (its code; iotd reconnects by itself), or
    /// because iotd stopped it ("" code: its identity was abandoned).
    #[zbus(signal)]
    fn session_down(&self, code: &str, message: &str) -> zbus::Result<()>;
    /// The onboarding window opened until `closes_at`, with `attempts_left` pairing attempts.
    #[zbus(signal)]
    fn onboarding_opened(&self, closes_at: i64, attempts_left: u32) -> zbus::Result<()>;
    /// The onboarding window closed: `timeout`, `requested`, `attempts`, `success` or
    /// `not-needed`.
    #[zbus(signal)]
    fn onboarding_closed(&self, reason: &str) -> zbus::Result<()>;
    /// An installer's client proved it knows the setup code.
    #[zbus(signal)]
    fn onboarding_paired(&self) -> zbus::Result<()>;
    /// The installer's claim was accepted; the gateway provisions with it now.
    #[zbus(signal)]
    fn onboarding_claim_received(&self) -> zbus::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;
    use std::collections::HashSet;

    /// Every code and its string, written out a second time. The match has no `_` arm, so a new
    /// variant does not compile until it gets a line here; `WRITTEN_HERE` counts the lines, and
    /// the test fails until `ErrorCode::ALL` lists the new code too. The strings are a public
    /// interface: a changed one fails here.
    fn written_here(code: ErrorCode) -> &'static str {
        match code {
            ErrorCode::Config => "config",
            ErrorCode::ClaimMissing => "claim-missing",
            ErrorCode::ClaimExpired => "claim-expired",
            ErrorCode::ClaimRejected => "claim-rejected",
            ErrorCode::PolicyDenied => "policy-denied",
            ErrorCode::TemplateRejected => "template-rejected",
            ErrorCode::HookDenied => "hook-denied",
            ErrorCode::Throttled => "throttled",
            ErrorCode::NoReply => "no-reply",
            ErrorCode::Rejected => "rejected",
            ErrorCode::ServerUntrusted => "server-untrusted",
            ErrorCode::Network => "network",
            ErrorCode::ConnectRefused => "connect-refused",
            ErrorCode::CertificateMismatch => "certificate-mismatch",
            ErrorCode::CertificateExpired => "certificate-expired",
            ErrorCode::CertificateRevoked => "certificate-revoked",
            ErrorCode::CertificateInactive => "certificate-inactive",
            ErrorCode::Key => "key",
            ErrorCode::Store => "store",
            ErrorCode::NotProvisioned => "not-provisioned",
            ErrorCode::NotSupported => "not-supported",
            ErrorCode::KeyLost => "key-lost",
            ErrorCode::Busy => "busy",
            ErrorCode::Parameter => "parameter",
        }
    }
    const WRITTEN_HERE: usize = 24;

    #[test]
    fn all_has_every_code_exactly_once() {
        let distinct: HashSet<ErrorCode> = ErrorCode::ALL.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            ErrorCode::ALL.len(),
            "a code is listed twice"
        );
        assert_eq!(ErrorCode::ALL.len(), WRITTEN_HERE, "ALL misses a code");
        for &code in ErrorCode::ALL {
            assert_eq!(code.as_str(), written_here(code), "{code:?}");
        }
    }

    #[test]
    fn strings_are_unique_kebab_case_and_parse_back() {
        let mut seen = HashSet::new();
        for &code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} is used twice");
            assert!(
                !s.is_empty()
                    && !s.starts_with('-')
                    && !s.ends_with('-')
                    && !s.contains("--")
                    && s.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
                "{s} is not kebab-case"
            );
            assert_eq!(ErrorCode::parse(s), Some(code));
            assert_eq!(s.parse::<ErrorCode>(), Ok(code));
            assert_eq!(code.to_string(), s);
        }
        assert_eq!(ErrorCode::parse("waiting-for-claim"), None);
        assert_eq!(ErrorCode::parse("Config"), None);
        assert_eq!(ErrorCode::parse(""), None);
        assert!("nope".parse::<ErrorCode>().is_err());
    }
}
