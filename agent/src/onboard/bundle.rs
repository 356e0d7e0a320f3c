//! The claim bundle: what the installer's client seals into `POST /v1/claim` and the gateway
//! opens (the plaintext JSON after the AEAD), checked against the gateway's configuration.
//!
//! ```json
//! {"v": 1,
//!  "certificate_pem": "-----BEGIN CERTIFICATE-----\n…",
//!  "private_key_pem": "-----BEGIN RSA PRIVATE KEY-----\n…",
//!  "not_after": "2026-01-01T00:05:00Z",
//!  "template": "gw-template",
//!  "endpoint": "abc-ats.iot.eu-west-1.amazonaws.com",
//!  "parameters": {"Site": "Hamburg-3"}}
//! ```
//!
//! - `v`: 1. Any other whole number is `unsupported_version`; anything else, or no `v`, is
//!   `malformed`. The version is read before anything else, so a newer client's bundle with
//!   fields this gateway does not know gets `unsupported_version`, not `malformed`.
//! - `certificate_pem`: the claim certificate, optionally followed by its chain.
//!   `private_key_pem`: its key, PKCS#1 RSA (what CreateProvisioningClaim returns, RSA 2048),
//!   PKCS#8, or SEC1 EC, unencrypted. Both are read by [`Claim::from_pem`], which also checks
//!   that the key is the certificate's.
//! - `not_after`: when the claim expires, as CreateProvisioningClaim's `expiration` gives it:
//!   Unix seconds (AWS's REST JSON sends a number such as `1735689600.0`; fractions are cut
//!   off), or an RFC 3339 text (what the profile's vectors use), or `null` when the client
//!   does not know (a claim read from files). The field must be there. It is recorded for
//!   status only and never compared with the gateway's clock, which may be wrong before NTP:
//!   a network claim is used at once, and AWS's answer says whether it had expired.
//! - `template`: optional; the configured template when absent or `null`. Otherwise one of
//!   `onboarding.allowed_templates`, or the configured template itself (naming it is the same
//!   as leaving it out).
//! - `endpoint`: optional; the configured endpoint when absent or `null`. Otherwise one of
//!   `onboarding.allowed_endpoints` or the configured endpoint (host names compare without
//!   regard to case or a final dot).
//! - `parameters`: optional object of strings: template parameters the installer supplies,
//!   only names in `onboarding.installer_parameters`, never one the gateway sources itself
//!   (`provisioning.parameters`, e.g. the serial number); each value 1 to 1 024 bytes without
//!   control characters.
//!
//! The bundle is strict: a field it does not define is refused (`malformed`), so a typo such as
//! `"paramters"` is reported instead of silently ignored; so is a field given twice. The
//! bundle is ours, unlike the ack, which the profile allows to grow.
//!
//! Refusals ([`BundleRefusal`]) carry the profile's code (§5.4.1), its HTTP status and one
//! sentence for the installer. No message ever holds key material: values the client sent
//! are echoed only when they look like the names they should be, and any quoted text in a
//! parser message is cut out.
//!
//! The PEM texts are kept in [`Zeroizing`] strings and wiped once the claim is built. What
//! this module cannot wipe: serde_json's internal buffer for strings with escapes (every PEM
//! text in JSON has `\n` escapes), and the decoded key inside the key parser and ring.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use zeroize::Zeroizing;

use crate::claim::Claim;
use crate::config::Settings;

/// The largest plaintext bundle (12 KiB); sealed and base64-encoded it fits the 20 KiB body
/// limit of `/v1/claim`.
pub const MAX_BUNDLE_LEN: usize = 12_288;

/// The only bundle version there is.
pub const BUNDLE_VERSION: u64 = 1;

/// The longest value of an installer-supplied template parameter, in bytes.
pub const MAX_PARAMETER_VALUE_LEN: usize = 1024;

/// The claim's description in messages, after "claim certificate".
pub const CLAIM_DESCRIPTION: &str = "handed over by the installer";

/// The latest `not_after` taken: 9999-12-31T23:59:59Z, the last second RFC 3339 can write.
const MAX_NOT_AFTER: i64 = 253_402_300_799;

/// The fields of a bundle, in the order messages list them.
const FIELDS: &str = "v, certificate_pem, private_key_pem, not_after, template, endpoint and \
                      parameters";

/// What the gateway accepts in a bundle, from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundlePolicy {
    /// `provisioning.template`: used when the bundle names none, and always allowed.
    pub template: String,
    /// `cloud.endpoint`: used when the bundle names none, and always allowed.
    pub endpoint: String,
    /// `onboarding.allowed_templates` (by default the configured template).
    pub allowed_templates: Vec<String>,
    /// `onboarding.allowed_endpoints` (by default the configured endpoint).
    pub allowed_endpoints: Vec<String>,
    /// `onboarding.installer_parameters`: the template parameters an installer may supply.
    pub installer_parameters: BTreeSet<String>,
    /// The names in `provisioning.parameters`: sourced by the gateway, never by the installer.
    pub device_parameters: BTreeSet<String>,
}

impl BundlePolicy {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            template: settings.provisioning.template.clone(),
            endpoint: settings.cloud.endpoint.clone(),
            allowed_templates: settings.onboarding.allowed_templates.clone(),
            allowed_endpoints: settings.onboarding.allowed_endpoints.clone(),
            installer_parameters: settings
                .onboarding
                .installer_parameters
                .iter()
                .cloned()
                .collect(),
            device_parameters: settings.provisioning.parameters.keys().cloned().collect(),
        }
    }

    /// Every template a bundle may name: the configured one first, then the allowed ones.
    fn templates(&self) -> Vec<&str> {
        let mut all = vec![self.template.as_str()];
        for t in &self.allowed_templates {
            if !all.contains(&t.as_str()) {
                all.push(t);
            }
        }
        all
    }

    /// Every endpoint a bundle may name: the configured one first, then the allowed ones.
    fn endpoints(&self) -> Vec<&str> {
        let mut all = vec![self.endpoint.as_str()];
        for e in &self.allowed_endpoints {
            if !all.iter().any(|a| same_host(a, e)) {
                all.push(e);
            }
        }
        all
    }

    /// The installer's parameters the gateway takes: allowed and not sourced by the gateway.
    fn installer_names(&self) -> Vec<&str> {
        self.installer_parameters
            .iter()
            .filter(|n| !self.device_parameters.contains(*n))
            .map(String::as_str)
            .collect()
    }
}

/// A claim bundle that passed every check: the claim to provision with at once, and the
/// settings for that run.
#[derive(Debug, Clone)]
pub struct HandedOverClaim {
    /// Origin [`crate::store::ClaimOrigin::Network`], described as [`CLAIM_DESCRIPTION`]. Its
    /// `not_after` is the certificate's.
    pub claim: Claim,
    /// The template to provision with (the configured one when the bundle named none).
    pub template: String,
    /// The endpoint the bundle named, in the configuration's spelling; `None`: the configured
    /// endpoint.
    pub endpoint: Option<String>,
    /// Installer-supplied template parameters, added to the gateway's own.
    pub parameters: BTreeMap<String, String>,
    /// The bundle's `not_after` (Unix seconds), for status only; `None` when the client sent
    /// `null`.
    pub not_after: Option<i64>,
}

/// Why a bundle was refused: the profile's error code, HTTP status and a sentence for the
/// installer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleRefusal {
    /// The bundle is over [`MAX_BUNDLE_LEN`] (not read any further).
    TooLarge { len: usize },
    /// Not JSON, not an object, a field missing, unknown, repeated or of the wrong type.
    Malformed { reason: String },
    /// `v` is a whole number other than 1 (as text).
    UnsupportedVersion { version: String },
    /// `certificate_pem` holds no usable certificate.
    Certificate { reason: String },
    /// `private_key_pem` holds no usable private key.
    PrivateKey { reason: String },
    /// The key is not the claim certificate's.
    KeyMismatch,
    /// `template` is not one the gateway allows (`template` as shown in messages).
    TemplateNotAllowed {
        template: String,
        allowed: Vec<String>,
    },
    /// `endpoint` is not one the gateway allows.
    EndpointNotAllowed {
        endpoint: String,
        allowed: Vec<String>,
    },
    /// A parameter the installer may not supply.
    ParameterNotAllowed { name: String, allowed: Vec<String> },
    /// A parameter the gateway sources itself (`provisioning.parameters`).
    ParameterFromDevice { name: String },
    /// A parameter value that is empty, too long or has control characters (`problem` says
    /// which, after "the value of template parameter NAME").
    ParameterValue { name: String, problem: String },
}

impl BundleRefusal {
    /// The profile's error code: `malformed`, `unsupported_version` or `claim_invalid`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            _ => "claim_invalid",
        }
    }

    /// The HTTP status of the refusal: 422 for `claim_invalid`, 400 for the others.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            "claim_invalid" => 422,
            _ => 400,
        }
    }

    /// One sentence for the installer: what is wrong and what to do.
    pub fn message(&self) -> String {
        match self {
            Self::TooLarge { len } => format!(
                "the claim bundle is {} bytes, more than {}; send only the claim certificate \
                 (with its chain), its key and the settings",
                thousands(*len),
                thousands(MAX_BUNDLE_LEN)
            ),
            Self::Malformed { reason } => format!(
                "the claim bundle is not valid: {reason}; send a JSON object with {FIELDS} as \
                 the onboarding API describes"
            ),
            Self::UnsupportedVersion { version } => format!(
                "the claim bundle has version {version}, but this gateway understands only \
                 version {BUNDLE_VERSION}; use an installer app that sends version \
                 {BUNDLE_VERSION}"
            ),
            Self::Certificate { reason } => format!(
                "the claim certificate cannot be used: {reason}; send the certificate PEM that \
                 CreateProvisioningClaim returned"
            ),
            Self::PrivateKey { reason } => format!(
                "the private key cannot be used: {reason}; send the private key PEM that \
                 CreateProvisioningClaim returned with the certificate"
            ),
            Self::KeyMismatch => "the private key does not match the claim certificate; send \
                                  the certificate and key from the same CreateProvisioningClaim \
                                  answer"
                .to_owned(),
            Self::TemplateNotAllowed { template, allowed } => format!(
                "the claim's template {template} is not allowed on this gateway (allowed: {}); \
                 request a claim for {}",
                allowed.join(", "),
                one_of(allowed)
            ),
            Self::EndpointNotAllowed { endpoint, allowed } => format!(
                "the claim's endpoint {endpoint} is not allowed on this gateway (allowed: {}); \
                 leave the endpoint out to use {}{}",
                allowed.join(", "),
                allowed.first().map_or("the configured one", String::as_str),
                if allowed.len() > 1 {
                    ", or name one of the others"
                } else {
                    ""
                }
            ),
            Self::ParameterNotAllowed { name, allowed } if allowed.is_empty() => format!(
                "the template parameter {name} cannot be set by the installer: this gateway \
                 takes no parameters from the installer; leave parameters out"
            ),
            Self::ParameterNotAllowed { name, allowed } => format!(
                "the template parameter {name} cannot be set by the installer on this gateway \
                 (allowed: {}); leave it out",
                allowed.join(", ")
            ),
            Self::ParameterFromDevice { name } => format!(
                "the template parameter {name} comes from the gateway itself and cannot be set \
                 by the installer; leave it out"
            ),
            Self::ParameterValue { name, problem } => {
                format!("the value of template parameter {name} {problem}")
            }
        }
    }
}

impl fmt::Display for BundleRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for BundleRefusal {}

/// Opens a claim bundle: checks its size, JSON, version, settings against `policy`, then its
/// certificate and key, and builds the claim. The PEM texts are wiped before this returns.
/// Never refuses on the gateway's clock (see the module documentation).
pub fn open_bundle(
    plaintext: &[u8],
    policy: &BundlePolicy,
) -> Result<HandedOverClaim, BundleRefusal> {
    if plaintext.len() > MAX_BUNDLE_LEN {
        return Err(BundleRefusal::TooLarge {
            len: plaintext.len(),
        });
    }
    match parse(plaintext, Pass::Version).map_err(malformed)? {
        Parsed::Version(Some(Version::One)) => {}
        Parsed::Version(Some(Version::Other(version))) => {
            return Err(BundleRefusal::UnsupportedVersion { version });
        }
        Parsed::Version(None) => return Err(malformed_because("the field v is missing")),
        Parsed::Bundle(_) => return Err(malformed_because("the bundle could not be read")),
    }
    let wire = match parse(plaintext, Pass::Bundle).map_err(malformed)? {
        Parsed::Bundle(wire) => wire,
        Parsed::Version(_) => return Err(malformed_because("the bundle could not be read")),
    };

    let template = check_template(wire.template.as_deref(), policy)?;
    let endpoint = check_endpoint(wire.endpoint.as_deref(), policy)?;
    let parameters = check_parameters(wire.parameters.unwrap_or_default(), policy)?;
    let claim = build_claim(&wire.certificate_pem, &wire.private_key_pem)?;
    // The PEM texts are zeroised when they go out of scope, here.
    drop(wire.certificate_pem);
    drop(wire.private_key_pem);
    Ok(HandedOverClaim {
        claim,
        template,
        endpoint,
        parameters,
        not_after: wire.not_after,
    })
}

// ---- policy ---------------------------------------------------------------------------------

fn check_template(named: Option<&str>, policy: &BundlePolicy) -> Result<String, BundleRefusal> {
    let Some(named) = named else {
        return Ok(policy.template.clone());
    };
    let allowed = policy.templates();
    if allowed.contains(&named) {
        return Ok(named.to_owned());
    }
    Err(BundleRefusal::TemplateNotAllowed {
        template: shown(named, 64),
        allowed: allowed.into_iter().map(str::to_owned).collect(),
    })
}

fn check_endpoint(
    named: Option<&str>,
    policy: &BundlePolicy,
) -> Result<Option<String>, BundleRefusal> {
    let Some(named) = named else {
        return Ok(None);
    };
    let allowed = policy.endpoints();
    if let Some(configured) = allowed.iter().find(|a| same_host(a, named)) {
        return Ok(Some((*configured).to_owned()));
    }
    Err(BundleRefusal::EndpointNotAllowed {
        endpoint: shown(named, 253),
        allowed: allowed.into_iter().map(str::to_owned).collect(),
    })
}

/// Host names compare without regard to ASCII case or a final dot.
fn same_host(a: &str, b: &str) -> bool {
    let bare = |h: &str| h.strip_suffix('.').unwrap_or(h).to_owned();
    bare(a).eq_ignore_ascii_case(&bare(b))
}

fn check_parameters(
    parameters: BTreeMap<String, String>,
    policy: &BundlePolicy,
) -> Result<BTreeMap<String, String>, BundleRefusal> {
    for (name, value) in &parameters {
        if policy.device_parameters.contains(name) {
            return Err(BundleRefusal::ParameterFromDevice {
                name: shown(name, 128),
            });
        }
        if !policy.installer_parameters.contains(name) {
            return Err(BundleRefusal::ParameterNotAllowed {
                name: shown(name, 128),
                allowed: policy
                    .installer_names()
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            });
        }
        let problem = if value.is_empty() {
            Some(format!(
                "is empty; give a value of 1 to {} bytes",
                thousands(MAX_PARAMETER_VALUE_LEN)
            ))
        } else if value.len() > MAX_PARAMETER_VALUE_LEN {
            Some(format!(
                "is {} bytes, more than {}; shorten it",
                thousands(value.len()),
                thousands(MAX_PARAMETER_VALUE_LEN)
            ))
        } else if value.chars().any(char::is_control) {
            Some("contains control characters (such as line breaks); remove them".to_owned())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(BundleRefusal::ParameterValue {
                name: name.clone(),
                problem,
            });
        }
    }
    Ok(parameters)
}

// ---- certificate and key --------------------------------------------------------------------

/// The claim, by [`Claim::from_pem`]; when that fails, the certificate and the key are read
/// one by one to say which of them is wrong.
fn build_claim(certificate_pem: &str, key_pem: &str) -> Result<Claim, BundleRefusal> {
    match Claim::from_pem(certificate_pem, key_pem, CLAIM_DESCRIPTION) {
        Ok(claim) => Ok(claim),
        Err(_) => Err(diagnose(certificate_pem, key_pem)),
    }
}

fn diagnose(certificate_pem: &str, key_pem: &str) -> BundleRefusal {
    let chain = match crate::tls::parse_chain_pem(certificate_pem, "claim certificate") {
        Ok(chain) => chain,
        Err(crate::tls::TlsError::Pem { message, .. }) => {
            return BundleRefusal::Certificate {
                reason: redact_quoted(&message),
            };
        }
        Err(_) => {
            return BundleRefusal::Certificate {
                reason: "it is not a valid X.509 certificate".to_owned(),
            };
        }
    };
    let key = match crate::keys::file::FileKey::from_pem(key_pem, std::path::Path::new("claim key"))
    {
        Ok(key) => key,
        Err(_) => {
            return BundleRefusal::PrivateKey {
                reason: key_problem(key_pem).to_owned(),
            };
        }
    };
    let certified = chain
        .first()
        .and_then(|leaf| crate::tls::certificate_spki(leaf).ok());
    if certified.as_deref() != Some(crate::keys::DeviceKey::public_key_spki(&key).as_slice()) {
        return BundleRefusal::KeyMismatch;
    }
    BundleRefusal::Certificate {
        reason: "its public key or validity cannot be read".to_owned(),
    }
}

/// Why a private key PEM the key parser refused is no good, from its armour only (the key
/// itself is not decoded again, nor shown).
fn key_problem(key_pem: &str) -> &'static str {
    const KEY_LABELS: [&str; 3] = [
        "-----BEGIN PRIVATE KEY-----",
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----BEGIN EC PRIVATE KEY-----",
    ];
    if key_pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        && !KEY_LABELS.iter().any(|l| key_pem.contains(l))
    {
        "it is encrypted (the onboarding channel already protects it); send it unencrypted"
    } else if !KEY_LABELS.iter().any(|l| key_pem.contains(l)) {
        if key_pem.contains("-----BEGIN CERTIFICATE-----") {
            "it holds a certificate, not a private key"
        } else {
            "it holds no PEM private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
        }
    } else {
        "it is not a well-formed RSA or ECDSA private key usable for TLS"
    }
}

// ---- JSON -----------------------------------------------------------------------------------

/// The bundle's fields as read, before the policy.
struct Wire {
    certificate_pem: Zeroizing<String>,
    private_key_pem: Zeroizing<String>,
    not_after: Option<i64>,
    template: Option<String>,
    endpoint: Option<String>,
    parameters: Option<BTreeMap<String, String>>,
}

/// The two reads of a bundle: its version first, skipping every other value, so that a newer
/// version is told apart from a malformed bundle; then every field, strictly.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Version,
    Bundle,
}

enum Parsed {
    Version(Option<Version>),
    Bundle(Box<Wire>),
}

enum Version {
    One,
    /// A whole number other than 1, as text.
    Other(String),
}

fn parse(plaintext: &[u8], pass: Pass) -> Result<Parsed, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(plaintext);
    let parsed = TopLevel(pass).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(parsed)
}

fn malformed_because(reason: &str) -> BundleRefusal {
    BundleRefusal::Malformed {
        reason: reason.to_owned(),
    }
}

/// A parser error as the reason of a `malformed` refusal: syntax errors keep their position;
/// the messages of this module's visitors do not need it. Quoted text is cut out, in case a
/// parser message quotes a value.
fn malformed(error: serde_json::Error) -> BundleRefusal {
    let text = error.to_string();
    let reason = match error.classify() {
        serde_json::error::Category::Data => {
            let position = format!(" at line {} column {}", error.line(), error.column());
            text.strip_suffix(&position).unwrap_or(&text).to_owned()
        }
        serde_json::error::Category::Eof => format!("it is not complete JSON ({text})"),
        _ => format!("it is not JSON ({text})"),
    };
    BundleRefusal::Malformed {
        reason: redact_quoted(&reason),
    }
}

/// The bundle's fields, by name.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    V,
    CertificatePem,
    PrivateKeyPem,
    NotAfter,
    Template,
    Endpoint,
    Parameters,
}

impl Key {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "v" => Key::V,
            "certificate_pem" => Key::CertificatePem,
            "private_key_pem" => Key::PrivateKeyPem,
            "not_after" => Key::NotAfter,
            "template" => Key::Template,
            "endpoint" => Key::Endpoint,
            "parameters" => Key::Parameters,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Key::V => "v",
            Key::CertificatePem => "certificate_pem",
            Key::PrivateKeyPem => "private_key_pem",
            Key::NotAfter => "not_after",
            Key::Template => "template",
            Key::Endpoint => "endpoint",
            Key::Parameters => "parameters",
        }
    }
}

/// A field name: known, or unknown (as shown in messages).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Result<Key, String>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Result<Key, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(Key::from_name(name).ok_or_else(|| shown(name, 40)))
    }
}

/// The JSON kind of a value the visitor did not want, for messages.
fn kind_error<E: de::Error>(what: &str, wanted: &str, got: &str) -> E {
    E::custom(format!("{what} must be {wanted}, not {got}"))
}

/// The whole bundle: a JSON object.
struct TopLevel(Pass);

impl TopLevel {
    fn refuse<E: de::Error>(got: &str) -> E {
        kind_error("it", "a JSON object", got)
    }
}

impl<'de> DeserializeSeed<'de> for TopLevel {
    type Value = Parsed;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel {
    type Value = Parsed;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Parsed, E> {
        Err(Self::refuse("true or false"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Parsed, E> {
        Err(Self::refuse("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Parsed, E> {
        Err(Self::refuse("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Parsed, E> {
        Err(Self::refuse("a number"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Parsed, E> {
        Err(Self::refuse("a string"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Parsed, E> {
        Err(Self::refuse("null"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Parsed, A::Error> {
        Err(Self::refuse("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let mut seen = BTreeSet::new();
        let mut version = None;
        let mut certificate_pem = None;
        let mut private_key_pem = None;
        let mut not_after = None;
        let mut template = None;
        let mut endpoint = None;
        let mut parameters = None;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let key = match key {
                Ok(key) => key,
                // The first read skips what it does not know: a newer version may have more.
                Err(_) if self.0 == Pass::Version => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                Err(unknown) => {
                    return Err(de::Error::custom(format!(
                        "it has a field {unknown}, which a version {BUNDLE_VERSION} bundle does \
                         not have"
                    )));
                }
            };
            if !seen.insert(key) {
                return Err(de::Error::custom(format!(
                    "the field {} is given twice",
                    key.name()
                )));
            }
            let value = |want| Value {
                name: key.name(),
                want,
            };
            match (self.0, key) {
                (Pass::Version, Key::V) => {
                    version = map.next_value_seed(value(Want::Version))?.version();
                }
                (Pass::Version, _) | (Pass::Bundle, Key::V) => {
                    map.next_value::<IgnoredAny>()?;
                }
                (Pass::Bundle, Key::CertificatePem) => {
                    certificate_pem = map.next_value_seed(value(Want::Secret))?.secret();
                }
                (Pass::Bundle, Key::PrivateKeyPem) => {
                    private_key_pem = map.next_value_seed(value(Want::Secret))?.secret();
                }
                (Pass::Bundle, Key::NotAfter) => {
                    not_after = Some(map.next_value_seed(value(Want::NotAfter))?.not_after());
                }
                (Pass::Bundle, Key::Template) => {
                    template = map.next_value_seed(value(Want::Name))?.text();
                }
                (Pass::Bundle, Key::Endpoint) => {
                    endpoint = map.next_value_seed(value(Want::Name))?.text();
                }
                (Pass::Bundle, Key::Parameters) => {
                    parameters = map.next_value_seed(value(Want::Parameters))?.parameters();
                }
            }
        }
        if self.0 == Pass::Version {
            return Ok(Parsed::Version(version));
        }
        let missing = |key: Key| de::Error::custom(format!("the field {} is missing", key.name()));
        Ok(Parsed::Bundle(Box::new(Wire {
            certificate_pem: certificate_pem.ok_or_else(|| missing(Key::CertificatePem))?,
            private_key_pem: private_key_pem.ok_or_else(|| missing(Key::PrivateKeyPem))?,
            not_after: not_after.ok_or_else(|| missing(Key::NotAfter))?,
            template,
            endpoint,
            parameters,
        })))
    }
}

/// What a field's value must be.
#[derive(Clone, Copy)]
enum Want {
    /// `v`: a whole number.
    Version,
    /// A PEM text: a string, kept in a zeroised buffer.
    Secret,
    /// `not_after`: Unix seconds, an RFC 3339 text, or null.
    NotAfter,
    /// `template`, `endpoint`: a string or null.
    Name,
    /// `parameters`: an object of strings, or null.
    Parameters,
    /// A parameter's value: a string.
    ParameterValue,
}

impl Want {
    fn describe(self) -> &'static str {
        match self {
            Want::Version => "the number 1",
            Want::Secret | Want::ParameterValue => "a string",
            Want::NotAfter => {
                "Unix seconds or an RFC 3339 time such as 2026-01-01T00:05:00Z (or null)"
            }
            Want::Name => "a string (or null, or left out)",
            Want::Parameters => "an object of strings (or null, or left out)",
        }
    }
}

/// A value read for a field.
enum Got {
    Version(Version),
    Secret(Zeroizing<String>),
    NotAfter(Option<i64>),
    Text(Option<String>),
    Parameters(Option<BTreeMap<String, String>>),
}

impl Got {
    fn version(self) -> Option<Version> {
        match self {
            Got::Version(v) => Some(v),
            _ => None,
        }
    }
    fn secret(self) -> Option<Zeroizing<String>> {
        match self {
            Got::Secret(s) => Some(s),
            _ => None,
        }
    }
    fn not_after(self) -> Option<i64> {
        match self {
            Got::NotAfter(t) => t,
            _ => None,
        }
    }
    fn text(self) -> Option<String> {
        match self {
            Got::Text(t) => t,
            _ => None,
        }
    }
    fn parameters(self) -> Option<BTreeMap<String, String>> {
        match self {
            Got::Parameters(p) => p,
            _ => None,
        }
    }
}

/// One field's value; `name` names it in messages.
struct Value<'a> {
    name: &'a str,
    want: Want,
}

impl Value<'_> {
    fn refuse<E: de::Error>(&self, got: &str) -> E {
        kind_error(
            &format!("the field {}", self.name),
            self.want.describe(),
            got,
        )
    }

    fn not_after_seconds<E: de::Error>(&self, seconds: f64) -> Result<Got, E> {
        // Whole seconds: AWS's expiration is a number of seconds, possibly with a fraction.
        if seconds.is_finite() && (0.0..=MAX_NOT_AFTER as f64).contains(&seconds) {
            // In range, so the conversion is exact for whole numbers and cuts a fraction off.
            Ok(Got::NotAfter(Some(seconds.floor() as i64)))
        } else {
            Err(E::custom(format!(
                "the field {} is not a time between 1970 and 9999",
                self.name
            )))
        }
    }

    fn whole_version<E: de::Error>(&self, one: bool, text: String) -> Result<Got, E> {
        Ok(Got::Version(if one {
            Version::One
        } else if text.len() <= 20 {
            Version::Other(text)
        } else {
            Version::Other(format!("{}…", &text[..20]))
        }))
    }
}

impl<'de> DeserializeSeed<'de> for Value<'_> {
    type Value = Got;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Got, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Value<'_> {
    type Value = Got;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the field {} as {}", self.name, self.want.describe())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Got, E> {
        Err(self.refuse("true or false"))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Got, E> {
        match self.want {
            Want::Version => self.whole_version(v == 1, v.to_string()),
            Want::NotAfter if v < 0 => self.not_after_seconds(-1.0),
            Want::NotAfter => self.visit_u64(v.unsigned_abs()),
            _ => Err(self.refuse("a number")),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Got, E> {
        match self.want {
            Want::Version => self.whole_version(v == BUNDLE_VERSION, v.to_string()),
            Want::NotAfter => match i64::try_from(v) {
                Ok(seconds) if seconds <= MAX_NOT_AFTER => Ok(Got::NotAfter(Some(seconds))),
                _ => self.not_after_seconds(f64::INFINITY),
            },
            _ => Err(self.refuse("a number")),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Got, E> {
        match self.want {
            // 1.0 is the whole number 1: JSON does not tell integers from other numbers.
            Want::Version if v.is_finite() && v.fract() == 0.0 => {
                self.whole_version(v == 1.0, format!("{v}"))
            }
            Want::Version => Err(E::custom("the field v must be a whole number")),
            Want::NotAfter => self.not_after_seconds(v),
            _ => Err(self.refuse("a number")),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Got, E> {
        match self.want {
            // Copied once into a buffer of exactly its size (no reallocation leaves a copy
            // behind), wiped on drop.
            Want::Secret => Ok(Got::Secret(Zeroizing::new(v.to_owned()))),
            Want::Name | Want::ParameterValue => Ok(Got::Text(Some(v.to_owned()))),
            Want::NotAfter => {
                let rfc3339 = &time::format_description::well_known::Rfc3339;
                match time::OffsetDateTime::parse(v, rfc3339) {
                    Ok(t) if (0..=MAX_NOT_AFTER).contains(&t.unix_timestamp()) => {
                        Ok(Got::NotAfter(Some(t.unix_timestamp())))
                    }
                    Ok(_) => self.not_after_seconds(-1.0),
                    Err(_) => Err(E::custom(format!(
                        "the field {} is not an RFC 3339 time such as 2026-01-01T00:05:00Z",
                        self.name
                    ))),
                }
            }
            _ => Err(self.refuse("a string")),
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Got, E> {
        match self.want {
            Want::NotAfter => Ok(Got::NotAfter(None)),
            Want::Name => Ok(Got::Text(None)),
            Want::Parameters => Ok(Got::Parameters(None)),
            _ => Err(self.refuse("null")),
        }
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Got, A::Error> {
        Err(self.refuse("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Got, A::Error> {
        let Want::Parameters = self.want else {
            return Err(self.refuse("an object"));
        };
        let mut parameters = BTreeMap::new();
        while let Some(name) = map.next_key::<String>()? {
            let what = format!("parameters.{}", shown(&name, 64));
            let value = map.next_value_seed(Value {
                name: &what,
                want: Want::ParameterValue,
            })?;
            if parameters.contains_key(&name) {
                return Err(de::Error::custom(format!(
                    "the template parameter {} is given twice",
                    shown(&name, 64)
                )));
            }
            parameters.insert(name, value.text().unwrap_or_default());
        }
        Ok(Got::Parameters(Some(parameters)))
    }
}

// ---- messages -------------------------------------------------------------------------------

/// A name the client sent, for a message: itself when it is a plausible name (1 to `max`
/// printable ASCII characters, no quotes), else only its length, so that a key pasted into the
/// wrong field is never echoed.
fn shown(text: &str, max: usize) -> String {
    let plain = |c: char| c.is_ascii_graphic() && !matches!(c, '"' | '`' | '\\');
    if !text.is_empty() && text.len() <= max && text.chars().all(plain) {
        text.to_owned()
    } else {
        format!("(a text of {} characters)", text.chars().count())
    }
}

/// `text` with every double-quoted part (as Rust's `{:?}` writes strings) replaced by `"…"`.
fn redact_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '"' {
            continue;
        }
        out.push_str("…\"");
        let mut escaped = false;
        for c in chars.by_ref() {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => break,
                _ => escaped = false,
            }
        }
    }
    out
}

/// `n` with a space between groups of three digits: "12 288".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(d);
    }
    out
}

/// "gw-template", or "one of them" when there are several.
fn one_of(allowed: &[String]) -> &str {
    match allowed {
        [only] => only,
        _ => "one of them",
    }
}

#[cfg(test)]
mod tests;
