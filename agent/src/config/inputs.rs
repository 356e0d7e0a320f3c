//! Stage 2: each file's values checked where they are written, then merged in file order.
//!
//! Checking per file rather than after the merge means a bad value is reported in the file that
//! holds it, even when a later file overrides it: a typo should not lie in wait until the
//! override is removed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::fragments::{
    CloudFragment, Fragment, KeyFragment, OnboardingFragment, ParameterFragment, ParameterTable,
    ProvisioningFragment, RotationFragment, Source, StateFragment, key_segment,
};
use super::{CertificateSource, ConfigError, Location, ParameterSource, PayloadFormat, Span};

/// A checked value and where it was written.
#[derive(Debug, Clone)]
pub(super) struct Located<T> {
    pub value: T,
    pub at: Location,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backend {
    File,
    Tpm,
}

/// Every key, flattened; `None` where no file so far set it.
#[derive(Debug, Default)]
pub(super) struct Layer {
    pub endpoint: Option<Located<String>>,
    pub port: Option<Located<u16>>,
    pub alpn: Option<Located<bool>>,
    pub ca_bundle: Option<Located<PathBuf>>,
    pub keep_alive: Option<Located<Duration>>,
    pub reply_timeout: Option<Located<Duration>>,
    pub throttle_retry_max: Option<Located<Duration>>,
    pub report_topic: Option<Located<String>>,
    pub template: Option<Located<String>>,
    pub certificate_source: Option<Located<CertificateSource>>,
    pub claim_certificate: Option<Located<PathBuf>>,
    pub claim_key: Option<Located<PathBuf>>,
    pub claim_client_id: Option<Located<String>>,
    pub delete_claim: Option<Located<bool>>,
    pub reprovision_when_key_lost: Option<Located<bool>>,
    pub format: Option<Located<PayloadFormat>>,
    pub parameters: BTreeMap<String, Located<ParameterSource>>,
    pub backend: Option<Located<Backend>>,
    pub tcti: Option<Located<String>>,
    pub persistent_handle: Option<Located<u32>>,
    pub state_dir: Option<Located<PathBuf>>,
    pub onboarding_serial: Option<Located<ParameterSource>>,
    pub onboarding_model: Option<Located<ParameterSource>>,
    pub onboarding_listen: Option<Located<std::net::SocketAddr>>,
    pub allowed_templates: Option<Located<Vec<String>>>,
    pub allowed_endpoints: Option<Located<Vec<String>>>,
    pub installer_parameters: Option<Located<Vec<String>>>,
    pub page_interfaces: Option<Located<Vec<String>>>,
    pub page_shared_interfaces: Option<Located<Vec<String>>>,
    pub page_port: Option<Located<u16>>,
    pub rotation_renew_before: Option<Located<Span>>,
    /// `Some(None)`: written as `"off"`, which undoes an earlier file's age limit.
    pub rotation_max_age: Option<Located<Option<Duration>>>,
    pub rotation_jitter: Option<Located<Span>>,
    pub rotation_retry_interval: Option<Located<Duration>>,
    pub rotation_template: Option<Located<String>>,
    pub rotation_report_topic: Option<Located<String>>,
    pub rotation_grace_period: Option<Located<Duration>>,
    pub rotation_trust_clock: Option<Located<bool>>,
}

impl Layer {
    /// Applies `later` on top: the keys it sets replace ours; parameters merge per name.
    pub fn merge(&mut self, later: Layer) {
        // Destructured so that a key added to `Layer` but forgotten here does not compile.
        let Layer {
            endpoint,
            port,
            alpn,
            ca_bundle,
            keep_alive,
            reply_timeout,
            throttle_retry_max,
            report_topic,
            template,
            certificate_source,
            claim_certificate,
            claim_key,
            claim_client_id,
            delete_claim,
            reprovision_when_key_lost,
            format,
            parameters,
            backend,
            tcti,
            persistent_handle,
            state_dir,
            onboarding_serial,
            onboarding_model,
            onboarding_listen,
            allowed_templates,
            allowed_endpoints,
            installer_parameters,
            page_interfaces,
            page_shared_interfaces,
            page_port,
            rotation_renew_before,
            rotation_max_age,
            rotation_jitter,
            rotation_retry_interval,
            rotation_template,
            rotation_report_topic,
            rotation_grace_period,
            rotation_trust_clock,
        } = later;
        over(&mut self.endpoint, endpoint);
        over(&mut self.port, port);
        over(&mut self.alpn, alpn);
        over(&mut self.ca_bundle, ca_bundle);
        over(&mut self.keep_alive, keep_alive);
        over(&mut self.reply_timeout, reply_timeout);
        over(&mut self.throttle_retry_max, throttle_retry_max);
        over(&mut self.report_topic, report_topic);
        over(&mut self.template, template);
        over(&mut self.certificate_source, certificate_source);
        over(&mut self.claim_certificate, claim_certificate);
        over(&mut self.claim_key, claim_key);
        over(&mut self.claim_client_id, claim_client_id);
        over(&mut self.delete_claim, delete_claim);
        over(
            &mut self.reprovision_when_key_lost,
            reprovision_when_key_lost,
        );
        over(&mut self.format, format);
        self.parameters.extend(parameters);
        over(&mut self.backend, backend);
        over(&mut self.tcti, tcti);
        over(&mut self.persistent_handle, persistent_handle);
        over(&mut self.state_dir, state_dir);
        over(&mut self.onboarding_serial, onboarding_serial);
        over(&mut self.onboarding_model, onboarding_model);
        over(&mut self.onboarding_listen, onboarding_listen);
        over(&mut self.allowed_templates, allowed_templates);
        over(&mut self.allowed_endpoints, allowed_endpoints);
        over(&mut self.installer_parameters, installer_parameters);
        over(&mut self.page_interfaces, page_interfaces);
        over(&mut self.page_shared_interfaces, page_shared_interfaces);
        over(&mut self.page_port, page_port);
        over(&mut self.rotation_renew_before, rotation_renew_before);
        over(&mut self.rotation_max_age, rotation_max_age);
        over(&mut self.rotation_jitter, rotation_jitter);
        over(&mut self.rotation_retry_interval, rotation_retry_interval);
        over(&mut self.rotation_template, rotation_template);
        over(&mut self.rotation_report_topic, rotation_report_topic);
        over(&mut self.rotation_grace_period, rotation_grace_period);
        over(&mut self.rotation_trust_clock, rotation_trust_clock);
    }

    /// Checks every value of one file.
    pub fn from_fragment(fragment: Fragment, source: &Source<'_>) -> Result<Self, ConfigError> {
        let mut layer = Layer::default();
        let check = Checker { source };
        if let Some(cloud) = fragment.cloud {
            layer.cloud(cloud, &check)?;
        }
        if let Some(provisioning) = fragment.provisioning {
            layer.provisioning(provisioning, &check)?;
        }
        if let Some(key) = fragment.key {
            layer.key(key, &check)?;
        }
        if let Some(StateFragment { dir }) = fragment.state {
            layer.state_dir = check.opt("state.dir", dir, absolute_path)?;
        }
        if let Some(onboarding) = fragment.onboarding {
            layer.onboarding(onboarding, &check)?;
        }
        if let Some(rotation) = fragment.rotation {
            layer.rotation(rotation, &check)?;
        }
        Ok(layer)
    }

    fn cloud(&mut self, cloud: CloudFragment, check: &Checker<'_>) -> Result<(), ConfigError> {
        let CloudFragment {
            endpoint,
            port,
            alpn,
            ca_bundle,
            keep_alive_secs,
            reply_timeout_secs,
            throttle_retry_max_secs,
            report_topic,
        } = cloud;
        self.endpoint = check.opt("cloud.endpoint", endpoint, host_name)?;
        self.port = check.opt("cloud.port", port, tcp_port)?;
        self.alpn = check.opt("cloud.alpn", alpn, Ok)?;
        self.ca_bundle = check.opt("cloud.ca_bundle", ca_bundle, absolute_path)?;
        // AWS IoT refuses keep-alives outside 30..=1200 s; better to say so here than to be
        // disconnected by the broker.
        self.keep_alive = check.opt("cloud.keep_alive_secs", keep_alive_secs, |s| {
            seconds(s, 30, 1200)
        })?;
        self.reply_timeout = check.opt("cloud.reply_timeout_secs", reply_timeout_secs, |s| {
            seconds(s, 5, 300)
        })?;
        self.throttle_retry_max = check.opt(
            "cloud.throttle_retry_max_secs",
            throttle_retry_max_secs,
            |s| seconds(s, 1, 300),
        )?;
        self.report_topic = check.opt("cloud.report_topic", report_topic, report_topic_value)?;
        Ok(())
    }

    fn provisioning(
        &mut self,
        provisioning: ProvisioningFragment,
        check: &Checker<'_>,
    ) -> Result<(), ConfigError> {
        let ProvisioningFragment {
            template,
            certificate_source,
            claim_certificate,
            claim_key,
            claim_client_id,
            delete_claim,
            reprovision_when_key_lost,
            format,
            parameters,
        } = provisioning;
        self.template = check.opt("provisioning.template", template, template_name)?;
        self.certificate_source = check.opt(
            "provisioning.certificate_source",
            certificate_source,
            |s| match s.as_str() {
                "csr" => Ok(CertificateSource::Csr),
                "cloud-generated" => Ok(CertificateSource::CloudGenerated),
                _ => Err(one_of(&s, &["csr", "cloud-generated"])),
            },
        )?;
        self.claim_certificate = check.opt(
            "provisioning.claim_certificate",
            claim_certificate,
            absolute_path,
        )?;
        self.claim_key = check.opt("provisioning.claim_key", claim_key, absolute_path)?;
        self.claim_client_id =
            check.opt("provisioning.claim_client_id", claim_client_id, client_id)?;
        self.delete_claim = check.opt("provisioning.delete_claim", delete_claim, Ok)?;
        self.reprovision_when_key_lost = check.opt(
            "provisioning.reprovision_when_key_lost",
            reprovision_when_key_lost,
            Ok,
        )?;
        self.format = check.opt("provisioning.format", format, |s| match s.as_str() {
            "json" => Ok(PayloadFormat::Json),
            "cbor" => Ok(PayloadFormat::Cbor),
            _ => Err(one_of(&s, &["json", "cbor"])),
        })?;
        for (name, value) in parameters.unwrap_or_default() {
            let key = format!("provisioning.parameters.{}", key_segment(name.get_ref()));
            if name.get_ref().is_empty() {
                return Err(check.invalid(&key, name.span(), "a parameter name cannot be empty"));
            }
            let at = check.source.locate(value.span().start);
            let value = parameter(&key, value, check)?;
            self.parameters
                .insert(name.into_inner(), Located { value, at });
        }
        Ok(())
    }

    fn key(&mut self, key: KeyFragment, check: &Checker<'_>) -> Result<(), ConfigError> {
        let KeyFragment {
            backend,
            tcti,
            persistent_handle,
        } = key;
        self.backend = check.opt("key.backend", backend, |s| match s.as_str() {
            "file" => Ok(Backend::File),
            "tpm" => Ok(Backend::Tpm),
            _ => Err(one_of(&s, &["file", "tpm"])),
        })?;
        self.tcti = check.opt("key.tcti", tcti, tcti_conf)?;
        self.persistent_handle =
            check.opt("key.persistent_handle", persistent_handle, tpm_handle)?;
        Ok(())
    }

    fn onboarding(
        &mut self,
        onboarding: OnboardingFragment,
        check: &Checker<'_>,
    ) -> Result<(), ConfigError> {
        let OnboardingFragment {
            serial,
            model,
            listen,
            allowed_templates,
            allowed_endpoints,
            installer_parameters,
            page_interfaces,
            page_shared_interfaces,
            page_port,
        } = onboarding;
        self.onboarding_listen = check.opt("onboarding.listen", listen, listen_address)?;
        self.allowed_templates =
            check.opt("onboarding.allowed_templates", allowed_templates, |names| {
                names.into_iter().map(template_name).collect()
            })?;
        self.allowed_endpoints =
            check.opt("onboarding.allowed_endpoints", allowed_endpoints, |hosts| {
                hosts.into_iter().map(host_name).collect()
            })?;
        self.installer_parameters = check.opt(
            "onboarding.installer_parameters",
            installer_parameters,
            |names| {
                names
                    .into_iter()
                    .map(|n| {
                        if n.is_empty() {
                            Err("a parameter name cannot be empty".to_owned())
                        } else {
                            Ok(n)
                        }
                    })
                    .collect()
            },
        )?;
        self.page_interfaces =
            check.opt("onboarding.page_interfaces", page_interfaces, |names| {
                names.into_iter().map(interface_name).collect()
            })?;
        self.page_shared_interfaces = check.opt(
            "onboarding.page_shared_interfaces",
            page_shared_interfaces,
            |names| names.into_iter().map(interface_name).collect(),
        )?;
        self.page_port = check.opt("onboarding.page_port", page_port, tcp_port)?;
        if let Some(serial) = serial {
            let key = "onboarding.serial";
            let span = serial.span();
            let value = parameter(key, serial, check)?;
            // A literal is checked here, where it is written; what a file or command gives is
            // checked when it is read (`iotctl onboarding register`).
            if let ParameterSource::Literal(literal) = &value
                && let Err(error) = crate::onboard::code::check_serial(literal)
            {
                let message = match error {
                    crate::onboard::code::CodeError::Serial { problem, .. } => {
                        format!("{literal:?} cannot be a serial: {problem}")
                    }
                    other => other.to_string(),
                };
                return Err(check.invalid(key, span, &message));
            }
            self.onboarding_serial = Some(Located {
                value,
                at: check.source.locate(span.start),
            });
        }
        if let Some(model) = model {
            let span = model.span();
            let value = parameter("onboarding.model", model, check)?;
            self.onboarding_model = Some(Located {
                value,
                at: check.source.locate(span.start),
            });
        }
        Ok(())
    }

    fn rotation(
        &mut self,
        rotation: RotationFragment,
        check: &Checker<'_>,
    ) -> Result<(), ConfigError> {
        let RotationFragment {
            renew_before,
            max_age,
            jitter,
            retry_interval,
            template,
            report_topic,
            grace_period,
            trust_clock,
        } = rotation;
        self.rotation_renew_before =
            check.opt("rotation.renew_before", renew_before, renew_before_value)?;
        self.rotation_max_age = check.opt("rotation.max_age", max_age, max_age_value)?;
        self.rotation_jitter = check.opt("rotation.jitter", jitter, span_value)?;
        self.rotation_retry_interval =
            check.opt("rotation.retry_interval", retry_interval, |value| {
                let shown = shown(&value);
                let interval = duration_value(value)?;
                if (RETRY_INTERVAL_MIN..=RETRY_INTERVAL_MAX).contains(&interval) {
                    Ok(interval)
                } else {
                    Err(format!("{shown} is out of range (10s to 30d)"))
                }
            })?;
        self.rotation_template = check.opt("rotation.template", template, template_name)?;
        self.rotation_report_topic =
            check.opt("rotation.report_topic", report_topic, report_topic_value)?;
        // Zero is allowed: the previous key and certificate are deleted as soon as the rotation
        // committed.
        self.rotation_grace_period =
            check.opt("rotation.grace_period", grace_period, duration_value)?;
        self.rotation_trust_clock = check.opt("rotation.trust_clock", trust_clock, Ok)?;
        Ok(())
    }
}

/// Replaces `mine` with `later` if `later` is set.
fn over<T>(mine: &mut Option<T>, later: Option<T>) {
    if later.is_some() {
        *mine = later;
    }
}

/// Turns a refused value into an error at its location.
struct Checker<'a> {
    source: &'a Source<'a>,
}

impl Checker<'_> {
    fn invalid(&self, key: &str, span: std::ops::Range<usize>, message: &str) -> ConfigError {
        ConfigError::Invalid {
            at: self.source.locate(span.start),
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }

    fn one<T, U>(
        &self,
        key: &str,
        value: Spanned<T>,
        convert: impl FnOnce(T) -> Result<U, String>,
    ) -> Result<Located<U>, ConfigError> {
        let span = value.span();
        match convert(value.into_inner()) {
            Ok(value) => Ok(Located {
                value,
                at: self.source.locate(span.start),
            }),
            Err(message) => Err(self.invalid(key, span, &message)),
        }
    }

    fn opt<T, U>(
        &self,
        key: &str,
        value: Option<Spanned<T>>,
        convert: impl FnOnce(T) -> Result<U, String>,
    ) -> Result<Option<Located<U>>, ConfigError> {
        value.map(|v| self.one(key, v, convert)).transpose()
    }
}

/// A template parameter's source; errors point at the part of the value that is wrong.
fn parameter(
    key: &str,
    value: Spanned<ParameterFragment>,
    check: &Checker<'_>,
) -> Result<ParameterSource, ConfigError> {
    let span = value.span();
    match value.into_inner() {
        ParameterFragment::Literal(value) => Ok(ParameterSource::Literal(value)),
        ParameterFragment::Table(ParameterTable {
            file: Some(_),
            command: Some(_),
        }) => Err(check.invalid(key, span, "set either file or command, not both")),
        ParameterFragment::Table(ParameterTable {
            file: None,
            command: None,
        }) => Err(check.invalid(
            key,
            span,
            "expected { file = \"path\" } or { command = [\"program\", \"argument\"] }",
        )),
        ParameterFragment::Table(ParameterTable {
            file: Some(file),
            command: None,
        }) => Ok(ParameterSource::File(
            check
                .one(&format!("{key}.file"), file, absolute_path)?
                .value,
        )),
        ParameterFragment::Table(ParameterTable {
            file: None,
            command: Some(command),
        }) => Ok(ParameterSource::Command(
            check.one(&format!("{key}.command"), command, argv)?.value,
        )),
    }
}

fn argv(argv: Vec<String>) -> Result<Vec<String>, String> {
    match argv.first() {
        None => Err("an empty command names no program".to_owned()),
        Some(program) if program.is_empty() => {
            Err("the program (the first element) is empty".to_owned())
        }
        Some(_) if argv.iter().any(|a| a.contains('\0')) => {
            Err("an argument contains a NUL byte".to_owned())
        }
        Some(_) => Ok(argv),
    }
}

fn one_of(value: &str, allowed: &[&str]) -> String {
    let allowed: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
    format!("{value:?} is not one of: {}", allowed.join(", "))
}

fn seconds(value: i64, min: u64, max: u64) -> Result<Duration, String> {
    u64::try_from(value)
        .ok()
        .filter(|s| (min..=max).contains(s))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{value} is out of range ({min} to {max} seconds)"))
}

/// Paths must be absolute: the daemon's working directory is `/`, and a relative path would
/// silently mean something else under `iotctl config check` run from a shell.
fn absolute_path(value: String) -> Result<PathBuf, String> {
    if value.contains('\0') {
        return Err(format!("{value:?} contains a NUL byte"));
    }
    if !value.starts_with('/') {
        return Err(format!("{value:?} is not an absolute path"));
    }
    Ok(PathBuf::from(value))
}

/// A DNS name or an IP address; URLs and `host:port` get a message saying what to drop.
fn host_name(value: String) -> Result<String, String> {
    if let Some((scheme, _)) = value.split_once("://") {
        return Err(format!(
            "{value:?} is a URL; give only the host name, without \"{scheme}://\""
        ));
    }
    if value.parse::<IpAddr>().is_ok() {
        return Ok(value);
    }
    if value.contains(':') {
        return Err(format!(
            "{value:?} is not a host name; give the port in cloud.port"
        ));
    }
    let name = value.strip_suffix('.').unwrap_or(&value);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("{value:?} is not a host name or IP address"));
    }
    Ok(value)
}

/// AWS's rule for provisioning template names.
fn template_name(value: String) -> Result<String, String> {
    let ok = (1..=36).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(value)
    } else {
        Err(format!(
            "{value:?} is not a provisioning template name (1 to 36 of A-Z a-z 0-9 _ -)"
        ))
    }
}

/// AWS IoT accepts client ids of up to 128 bytes; whitespace and control characters are refused
/// because they cannot be matched in an IoT policy's `iot:Connect` resource.
fn client_id(value: String) -> Result<String, String> {
    if value.is_empty() || value.len() > 128 {
        return Err(format!(
            "{value:?} is not an MQTT client id (1 to 128 bytes)"
        ));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{value:?} contains whitespace or control characters"
        ));
    }
    Ok(value)
}

/// The TCTIs tss-esapi knows; checked here so a typo is a config error, not a TPM error later.
fn tcti_conf(value: String) -> Result<String, String> {
    let name = value
        .split_once(':')
        .map_or(value.as_str(), |(name, _)| name);
    if matches!(name, "device" | "mssim" | "swtpm" | "tabrmd") && !value.contains('\0') {
        Ok(value)
    } else {
        Err(format!(
            "{value:?} is not a TCTI (expected device:PATH, swtpm:…, mssim:… or tabrmd:…)"
        ))
    }
}

/// Persistent handles are 0x81000000..=0x81FFFFFF (TPM_HT_PERSISTENT).
fn tpm_handle(value: toml::Value) -> Result<u32, String> {
    const RANGE: std::ops::RangeInclusive<u32> = 0x8100_0000..=0x81FF_FFFF;
    let handle = match &value {
        toml::Value::Integer(i) => u32::try_from(*i).ok(),
        toml::Value::String(s) => match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        },
        other => {
            return Err(format!(
                "expected a handle like \"0x81010001\", found a {}",
                other.type_str()
            ));
        }
    };
    match handle {
        Some(handle) if RANGE.contains(&handle) => Ok(handle),
        Some(handle) => Err(format!(
            "{handle:#x} is not a TPM persistent handle (0x81000000 to 0x81ffffff)"
        )),
        None => Err(format!("{value} is not a TPM handle")),
    }
}

/// `cloud.report_topic`: empty (reports off), or an MQTT topic the device may publish to, with
/// `{thing}` for the thing name. AWS IoT allows at most 7 slashes and 256 bytes, no wildcards,
/// and reserves topics starting with `$`.
fn report_topic_value(topic: String) -> Result<String, String> {
    if topic.is_empty() {
        return Ok(topic);
    }
    let without = topic.replace("{thing}", "");
    if topic.starts_with('$') {
        return Err(format!("{topic:?} starts with $, which AWS IoT reserves"));
    }
    if without.contains(['+', '#']) {
        return Err(format!(
            "{topic:?} has a wildcard (+ or #); a report goes to one topic"
        ));
    }
    if without.contains(['{', '}']) {
        return Err(format!("{topic:?}: the only placeholder is {{thing}}"));
    }
    if topic.matches('/').count() > 7 {
        return Err(format!(
            "{topic:?} has more than 7 slashes, more than AWS IoT allows"
        ));
    }
    // A thing name is at most 128 bytes.
    if without.len() + 128 * (topic.len() - without.len()) / "{thing}".len() > 256 {
        return Err(format!(
            "{topic:?} can be longer than the 256 bytes AWS IoT allows"
        ));
    }
    Ok(topic)
}

/// A TCP port, 1 to 65535.
fn tcp_port(port: i64) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port} is not a TCP port (1 to 65535)"))
}

/// A network interface's name as Linux allows it: 1 to 15 bytes, no `/`, `:` or white space,
/// not `.` or `..`.
fn interface_name(name: String) -> Result<String, String> {
    if name.is_empty() || name.len() > 15 {
        Err(format!(
            "{name:?} is not a network interface's name (1 to 15 characters, like \"usb0\")"
        ))
    } else if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        Err(format!(
            "{name:?} is not a network interface's name (no '/', ':' or spaces)"
        ))
    } else {
        Ok(name)
    }
}

/// `onboarding.listen`: an IP address and a port of 1024 or more (the unit has no capability
/// to bind below).
fn listen_address(value: String) -> Result<std::net::SocketAddr, String> {
    let address: std::net::SocketAddr = value.parse().map_err(|_| {
        format!("{value:?} is not an address and port, like \"0.0.0.0:8443\" or \"[::]:8443\"")
    })?;
    if address.port() < 1024 {
        return Err(format!(
            "port {} is below 1024, which iotd (no capabilities) cannot listen on",
            address.port()
        ));
    }
    Ok(address)
}

/// The shortest and longest `rotation.retry_interval`: below 10 s a rotation AWS keeps refusing
/// would hammer its quotas; beyond 30 days a failed rotation might not be tried again before
/// the certificate expires.
const RETRY_INTERVAL_MIN: Duration = Duration::from_secs(10);
const RETRY_INTERVAL_MAX: Duration = Duration::from_secs(30 * 86_400);

/// A `rotation.max_age` below this would have every new certificate renewed again within the
/// hour: a loop of rotations, not a policy. Also catches `max_age = 365` meant as days.
const MAX_AGE_MIN: Duration = Duration::from_secs(3600);

/// The longest length of time accepted: beyond any certificate's life, and short enough that
/// adding it to a Unix time in seconds cannot overflow.
const MAX_DURATION_SECS: u64 = 100 * 365 * 86_400;

/// A length of time: a number with a unit (`d`, `h`, `m`, `s`), several combined
/// (`"1d12h"`), or digits alone meaning seconds (`"0"`, `"3600"`).
pub(super) fn duration_text(value: &str) -> Result<Duration, String> {
    match seconds_in(value) {
        None => Err(format!(
            "{value:?} is not a duration (like \"30d\", \"12h\", \"90m\", \"45s\" or \"1d12h\")"
        )),
        Some(seconds) => bounded(seconds, &format!("{value:?}")),
    }
}

/// The seconds `text` stands for, `None` when it is not written as a duration. Digits alone
/// are seconds. u128 so that no sum a user can write overflows before the bound is checked.
fn seconds_in(text: &str) -> Option<u128> {
    if text.is_empty() {
        return None;
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok();
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let (number, tail) = rest.split_at(digits);
        let mut chars = tail.chars();
        let unit: u128 = match chars.next()? {
            'd' => 86_400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        let number: u128 = number.parse().ok()?;
        total = total.checked_add(number.checked_mul(unit)?)?;
        rest = chars.as_str();
    }
    Some(total)
}

fn bounded(seconds: u128, shown: &str) -> Result<Duration, String> {
    u64::try_from(seconds)
        .ok()
        .filter(|s| *s <= MAX_DURATION_SECS)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{shown} is longer than the 100 years iotd accepts"))
}

/// A duration written as a string (see [`duration_text`]) or as an integer of seconds.
fn duration_value(value: toml::Value) -> Result<Duration, String> {
    match value {
        toml::Value::String(text) => duration_text(&text),
        toml::Value::Integer(seconds) => match u64::try_from(seconds) {
            Ok(seconds) => bounded(u128::from(seconds), &seconds.to_string()),
            Err(_) => Err(format!("{seconds} is not a duration (it is negative)")),
        },
        other => Err(format!(
            "expected a duration like \"30d\", found {}",
            a_type(&other)
        )),
    }
}

/// A share of a certificate's lifetime (`"20%"`, 0 to 100) or a duration. A number alone other
/// than 0 is refused: `20` may mean 20% as well as 20 seconds.
fn span_value(value: toml::Value) -> Result<Span, String> {
    let shown = shown(&value);
    let neither =
        || format!("{shown} is neither a percentage (\"20%\") nor a duration (\"30d\", \"12h\")");
    let text = match value {
        toml::Value::String(text) => text,
        toml::Value::Integer(0) => return Ok(Span::Duration(Duration::ZERO)),
        toml::Value::Integer(_) => return Err(neither()),
        other => {
            return Err(format!(
                "expected a percentage like \"20%\" or a duration like \"30d\", found {}",
                a_type(&other)
            ));
        }
    };
    if let Some(number) = text.strip_suffix('%') {
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{shown} is not a whole percentage (like \"20%\")"));
        }
        return match number.parse::<u8>() {
            Ok(percent) if percent <= 100 => Ok(Span::Percent(percent)),
            _ => Err(format!("{shown} is more than 100%")),
        };
    }
    let unitless = text.bytes().all(|b| b.is_ascii_digit());
    match seconds_in(&text) {
        Some(0) => Ok(Span::Duration(Duration::ZERO)),
        Some(_) if unitless => Err(neither()),
        Some(seconds) => bounded(seconds, &shown).map(Span::Duration),
        None => Err(neither()),
    }
}

/// `rotation.renew_before`: a span that leaves the certificate some life and the rotation
/// some time.
fn renew_before_value(value: toml::Value) -> Result<Span, String> {
    let shown = shown(&value);
    match span_value(value)? {
        Span::Percent(0) | Span::Duration(Duration::ZERO) => Err(format!(
            "{shown} would renew the certificate only once it has expired, when it can no longer \
             connect; give 1% to 99% or a duration"
        )),
        Span::Percent(100) => Err(format!(
            "{shown} would renew every certificate as soon as it is issued; give 1% to 99% or a \
             duration"
        )),
        span => Ok(span),
    }
}

/// `rotation.max_age`: a duration of at least an hour, or `"off"`.
fn max_age_value(value: toml::Value) -> Result<Option<Duration>, String> {
    let shown = shown(&value);
    match &value {
        toml::Value::String(text) if text == "off" => return Ok(None),
        toml::Value::String(text) if text.ends_with('%') => {
            return Err(format!(
                "{shown} is a percentage, but max_age is an age (since the certificate's \
                 notBefore); give a duration like \"365d\", or \"off\""
            ));
        }
        _ => {}
    }
    let age = duration_value(value)?;
    if age < MAX_AGE_MIN {
        return Err(format!(
            "{shown} is shorter than an hour, which would renew every certificate again and \
             again; give a duration like \"365d\", or \"off\""
        ));
    }
    Ok(Some(age))
}

/// A value as the user wrote it, for messages: strings quoted as the other messages quote them.
fn shown(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("{text:?}"),
        other => other.to_string(),
    }
}

/// "a boolean", "an array": the type of a value that is not accepted at all.
fn a_type(value: &toml::Value) -> String {
    let name = value.type_str();
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}
