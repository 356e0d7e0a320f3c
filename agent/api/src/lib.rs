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

/// `LastError` as it travels: (code, message, unix time); an empty code means none.
pub type LastErrorWire = (String, String, i64);

/// The `io.iotd.Agent1` interface, as clients see it. Times are Unix seconds, 0 meaning "none".
#[zbus::proxy(
    interface = "io.iotd.Agent1",
    default_service = "io.iotd.Agent1",
    default_path = "/io/iotd/Agent1"
)]
pub trait Agent1 {
    /// Replaces the certificate now; answers what it did.
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
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;

    /// The gateway connected with a new identity for the first time.
    #[zbus(signal)]
    fn provisioned(&self, thing_name: &str, certificate_id: &str) -> zbus::Result<()>;
    /// The certificate was replaced.
    #[zbus(signal)]
    fn credentials_rotated(&self, certificate_id: &str, not_after: i64) -> zbus::Result<()>;
    /// An operation stopped on a permanent error.
    #[zbus(signal)]
    fn failed(&self, code: &str, message: &str) -> zbus::Result<()>;
    /// The MQTT session with the device's identity is up.
    #[zbus(signal)]
    fn session_up(&self, certificate_id: &str) -> zbus::Result<()>;
    /// The MQTT session went down; iotd reconnects by itself.
    #[zbus(signal)]
    fn session_down(&self, code: &str, message: &str) -> zbus::Result<()>;
}
