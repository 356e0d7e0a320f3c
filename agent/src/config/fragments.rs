//! Stage 1: one file's TOML into structs that mirror it.
//!
//! Every field is optional (any file may set any subset) and every value keeps its byte span,
//! so that stage 2 can name `file:line:column` for a value it refuses. Unknown keys are refused
//! here; enumerations and numbers are read as plain strings and integers and checked in stage
//! 2, which gives clearer messages.
//!
//! The structs are filled by hand from the parser's spanned tree (`DeTable`), not by serde's
//! derive: derived, each struct and each `Option<Spanned<T>>` became its own copy of toml's
//! deserializer, about 100 KB of a binary whose budget is 5 MB. The messages are serde's
//! wording, which the configuration's users and tests know ("invalid type: integer `5`,
//! expected a string").

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use super::{ConfigError, Location};

/// A file's name and text; turns byte offsets into locations.
#[derive(Debug, Clone, Copy)]
pub(super) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    pub fn locate(&self, offset: usize) -> Location {
        let mut offset = offset.min(self.text.len());
        // Spans from the parser are on character boundaries; this only guards the slicing.
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            file: self.path.to_path_buf(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Fragment {
    pub cloud: Option<CloudFragment>,
    pub provisioning: Option<ProvisioningFragment>,
    pub key: Option<KeyFragment>,
    pub state: Option<StateFragment>,
    pub onboarding: Option<OnboardingFragment>,
    pub rotation: Option<RotationFragment>,
}

#[derive(Debug)]
pub(super) struct CloudFragment {
    pub endpoint: Option<Spanned<String>>,
    pub port: Option<Spanned<i64>>,
    pub alpn: Option<Spanned<bool>>,
    pub ca_bundle: Option<Spanned<String>>,
    pub keep_alive_secs: Option<Spanned<i64>>,
    pub reply_timeout_secs: Option<Spanned<i64>>,
    pub throttle_retry_max_secs: Option<Spanned<i64>>,
    pub report_topic: Option<Spanned<String>>,
}

#[derive(Debug)]
pub(super) struct ProvisioningFragment {
    pub template: Option<Spanned<String>>,
    pub certificate_source: Option<Spanned<String>>,
    pub claim_certificate: Option<Spanned<String>>,
    pub claim_key: Option<Spanned<String>>,
    pub claim_client_id: Option<Spanned<String>>,
    pub delete_claim: Option<Spanned<bool>>,
    pub reprovision_when_key_lost: Option<Spanned<bool>>,
    pub format: Option<Spanned<String>>,
    pub parameters: Option<BTreeMap<Spanned<String>, Spanned<ParameterFragment>>>,
}

/// A template parameter: `"value"`, `{ file = "path" }` or `{ command = ["prog", "arg"] }`.
#[derive(Debug)]
pub(super) enum ParameterFragment {
    Literal(String),
    Table(ParameterTable),
}

#[derive(Debug)]
pub(super) struct ParameterTable {
    pub file: Option<Spanned<String>>,
    pub command: Option<Spanned<Vec<String>>>,
}

const PARAMETER_EXPECTING: &str =
    "a string, { file = \"path\" } or { command = [\"program\", \"argument\"] }";

#[derive(Debug)]
pub(super) struct KeyFragment {
    pub backend: Option<Spanned<String>>,
    pub tcti: Option<Spanned<String>>,
    /// A string (`"0x81010001"`) or an integer (`0x81010001`): both read naturally in TOML.
    pub persistent_handle: Option<Spanned<toml::Value>>,
}

#[derive(Debug)]
pub(super) struct StateFragment {
    pub dir: Option<Spanned<String>>,
}

#[derive(Debug)]
pub(super) struct OnboardingFragment {
    /// Written like a template parameter: a string, `{ file = … }` or `{ command = […] }`.
    pub serial: Option<Spanned<ParameterFragment>>,
    /// Like `serial`; announced in the DNS-SD TXT record (`model=`).
    pub model: Option<Spanned<ParameterFragment>>,
    pub listen: Option<Spanned<String>>,
    pub allowed_templates: Option<Spanned<Vec<String>>>,
    pub allowed_endpoints: Option<Spanned<Vec<String>>>,
    pub installer_parameters: Option<Spanned<Vec<String>>>,
    pub page_interfaces: Option<Spanned<Vec<String>>>,
    pub page_shared_interfaces: Option<Spanned<Vec<String>>>,
    pub page_port: Option<Spanned<i64>>,
}

#[derive(Debug)]
pub(super) struct RotationFragment {
    /// Lengths of time are a string (`"30d"`, `"20%"`) or an integer (seconds); both are read
    /// as TOML values and told apart in stage 2, which names the forms accepted.
    pub renew_before: Option<Spanned<toml::Value>>,
    pub max_age: Option<Spanned<toml::Value>>,
    pub jitter: Option<Spanned<toml::Value>>,
    pub retry_interval: Option<Spanned<toml::Value>>,
    pub template: Option<Spanned<String>>,
    pub report_topic: Option<Spanned<String>>,
    pub grace_period: Option<Spanned<toml::Value>>,
    pub trust_clock: Option<Spanned<bool>>,
}

/// Parses one file. Errors carry the location and, where it can be found, the dotted key.
pub(super) fn parse(source: &Source<'_>) -> Result<Fragment, ConfigError> {
    let (table, errors) = DeTable::parse_recoverable(source.text);
    if let Some(error) = errors.first() {
        let offset = error.span().map_or(0, |span| span.start);
        // The recovered table holds what parsed before and around the error, often enough to
        // name the key the broken value belongs to.
        let entries = entries(table.get_ref());
        let key = key_at(&entries, offset).or_else(|| {
            let span = error.span()?;
            duplicate_key_path(&entries, source.text.get(span)?, offset)
        });
        return Err(ConfigError::Syntax {
            at: source.locate(offset),
            key,
            message: error.message().to_owned(),
        });
    }
    refuse_arrays_as_tables(table.get_ref(), source)?;
    read_fragment(table.get_ref()).map_err(|Refused { offset, message }| {
        let index = entries(table.get_ref());
        ConfigError::Invalid {
            at: source.locate(offset),
            key: key_at(&index, offset).unwrap_or_else(|| "(top level)".to_owned()),
            message,
        }
    })
}

/// A value refused while filling the structs: where, and why.
struct Refused {
    offset: usize,
    message: String,
}

type Read<T> = Result<T, Refused>;
type Value<'t, 'a> = &'t Spanned<DeValue<'a>>;

fn read_fragment(root: &DeTable<'_>) -> Read<Fragment> {
    let [cloud, provisioning, key, state, onboarding, rotation] = keys(
        root,
        &[
            "cloud",
            "provisioning",
            "key",
            "state",
            "onboarding",
            "rotation",
        ],
    )?;
    Ok(Fragment {
        cloud: opt(cloud, |v| {
            let t = table(v, "a [cloud] table")?;
            let [
                endpoint,
                port,
                alpn,
                ca_bundle,
                keep_alive,
                reply_timeout,
                throttle,
                topic,
            ] = keys(
                t,
                &[
                    "endpoint",
                    "port",
                    "alpn",
                    "ca_bundle",
                    "keep_alive_secs",
                    "reply_timeout_secs",
                    "throttle_retry_max_secs",
                    "report_topic",
                ],
            )?;
            Ok(CloudFragment {
                endpoint: opt(endpoint, string)?,
                port: opt(port, integer)?,
                alpn: opt(alpn, boolean)?,
                ca_bundle: opt(ca_bundle, string)?,
                keep_alive_secs: opt(keep_alive, integer)?,
                reply_timeout_secs: opt(reply_timeout, integer)?,
                throttle_retry_max_secs: opt(throttle, integer)?,
                report_topic: opt(topic, string)?,
            })
        })?,
        provisioning: opt(provisioning, |v| {
            let t = table(v, "a [provisioning] table")?;
            let [
                template,
                source,
                cert,
                key,
                client_id,
                delete,
                reprovision,
                format,
                params,
            ] = keys(
                t,
                &[
                    "template",
                    "certificate_source",
                    "claim_certificate",
                    "claim_key",
                    "claim_client_id",
                    "delete_claim",
                    "reprovision_when_key_lost",
                    "format",
                    "parameters",
                ],
            )?;
            Ok(ProvisioningFragment {
                template: opt(template, string)?,
                certificate_source: opt(source, string)?,
                claim_certificate: opt(cert, string)?,
                claim_key: opt(key, string)?,
                claim_client_id: opt(client_id, string)?,
                delete_claim: opt(delete, boolean)?,
                reprovision_when_key_lost: opt(reprovision, boolean)?,
                format: opt(format, string)?,
                parameters: opt(params, |v| {
                    table(v, "a [provisioning.parameters] table")?
                        .iter()
                        .map(|(name, value)| {
                            let name = Spanned::new(name.span(), name.get_ref().to_string());
                            Ok((name, parameter(value)?))
                        })
                        .collect()
                })?,
            })
        })?,
        key: opt(key, |v| {
            let t = table(v, "a [key] table")?;
            let [backend, tcti, handle] = keys(t, &["backend", "tcti", "persistent_handle"])?;
            Ok(KeyFragment {
                backend: opt(backend, string)?,
                tcti: opt(tcti, string)?,
                persistent_handle: opt(handle, any)?,
            })
        })?,
        state: opt(state, |v| {
            let [dir] = keys(table(v, "a [state] table")?, &["dir"])?;
            Ok(StateFragment {
                dir: opt(dir, string)?,
            })
        })?,
        onboarding: opt(onboarding, |v| {
            let t = table(v, "a [onboarding] table")?;
            let [
                serial,
                model,
                listen,
                templates,
                endpoints,
                installer,
                page,
                shared,
                port,
            ] = keys(
                t,
                &[
                    "serial",
                    "model",
                    "listen",
                    "allowed_templates",
                    "allowed_endpoints",
                    "installer_parameters",
                    "page_interfaces",
                    "page_shared_interfaces",
                    "page_port",
                ],
            )?;
            Ok(OnboardingFragment {
                serial: opt(serial, parameter)?,
                model: opt(model, parameter)?,
                listen: opt(listen, string)?,
                allowed_templates: opt(templates, strings)?,
                allowed_endpoints: opt(endpoints, strings)?,
                installer_parameters: opt(installer, strings)?,
                page_interfaces: opt(page, strings)?,
                page_shared_interfaces: opt(shared, strings)?,
                page_port: opt(port, integer)?,
            })
        })?,
        rotation: opt(rotation, |v| {
            let t = table(v, "a [rotation] table")?;
            let [renew, max_age, jitter, retry, template, topic, grace, trust] = keys(
                t,
                &[
                    "renew_before",
                    "max_age",
                    "jitter",
                    "retry_interval",
                    "template",
                    "report_topic",
                    "grace_period",
                    "trust_clock",
                ],
            )?;
            Ok(RotationFragment {
                renew_before: opt(renew, any)?,
                max_age: opt(max_age, any)?,
                jitter: opt(jitter, any)?,
                retry_interval: opt(retry, any)?,
                template: opt(template, string)?,
                report_topic: opt(topic, string)?,
                grace_period: opt(grace, any)?,
                trust_clock: opt(trust, boolean)?,
            })
        })?,
    })
}

/// The values of `names` in `table`, in that order; any other key is refused (at the key, with
/// the names expected and the nearest one).
fn keys<'t, 'a, const N: usize>(
    table: &'t DeTable<'a>,
    names: &[&str; N],
) -> Read<[Option<Value<'t, 'a>>; N]> {
    let mut found = [None; N];
    for (key, value) in table {
        let name: &str = key.get_ref();
        match names.iter().position(|n| *n == name) {
            Some(i) => found[i] = Some(value),
            None => {
                return Err(Refused {
                    offset: key.span().start,
                    message: unknown_key(name, names),
                });
            }
        }
    }
    Ok(found)
}

fn unknown_key(unknown: &str, expected: &[&str]) -> String {
    let mut text = format!("unknown key (expected one of: {})", expected.join(", "));
    if let Some(near) = expected
        .iter()
        .filter(|name| edit_distance(unknown, name) <= 2)
        .min_by_key(|name| edit_distance(unknown, name))
    {
        text = format!("{text}; did you mean {near}?");
    }
    text
}

fn opt<'t, 'a, T>(
    value: Option<Value<'t, 'a>>,
    read: impl FnOnce(Value<'t, 'a>) -> Read<T>,
) -> Read<Option<T>> {
    value.map(read).transpose()
}

/// "invalid type: integer `5`, expected a string", at the value.
fn invalid<T>(value: Value<'_, '_>, expected: &str) -> Read<T> {
    let found = match value.get_ref() {
        DeValue::String(s) => format!("string {s:?}"),
        DeValue::Integer(i) => format!("integer `{i}`"),
        DeValue::Float(f) => format!("floating point `{f}`"),
        DeValue::Boolean(b) => format!("boolean `{b}`"),
        DeValue::Datetime(d) => format!("datetime `{d}`"),
        DeValue::Array(_) => "array".to_owned(),
        DeValue::Table(_) => "table".to_owned(),
    };
    Err(Refused {
        offset: value.span().start,
        message: format!("invalid type: {found}, expected {expected}"),
    })
}

fn table<'t, 'a>(value: Value<'t, 'a>, expected: &str) -> Read<&'t DeTable<'a>> {
    match value.get_ref() {
        DeValue::Table(table) => Ok(table),
        _ => invalid(value, expected),
    }
}

fn string(value: Value<'_, '_>) -> Read<Spanned<String>> {
    match value.get_ref() {
        DeValue::String(s) => Ok(Spanned::new(value.span(), s.to_string())),
        _ => invalid(value, "a string"),
    }
}

fn boolean(value: Value<'_, '_>) -> Read<Spanned<bool>> {
    match value.get_ref() {
        DeValue::Boolean(b) => Ok(Spanned::new(value.span(), *b)),
        _ => invalid(value, "a boolean"),
    }
}

fn integer(value: Value<'_, '_>) -> Read<Spanned<i64>> {
    match value.get_ref() {
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Ok(Spanned::new(value.span(), n)),
            Err(_) => Err(Refused {
                offset: value.span().start,
                message: format!(
                    "invalid value: integer `{i}`, expected an integer that fits in 64 bits"
                ),
            }),
        },
        _ => invalid(value, "an integer"),
    }
}

fn strings(value: Value<'_, '_>) -> Read<Spanned<Vec<String>>> {
    match value.get_ref() {
        DeValue::Array(array) => {
            let items = array
                .iter()
                .map(|item| string(item).map(Spanned::into_inner))
                .collect::<Read<_>>()?;
            Ok(Spanned::new(value.span(), items))
        }
        _ => invalid(value, "a sequence"),
    }
}

/// A template parameter: `"value"`, `{ file = "path" }` or `{ command = ["prog", "arg"] }`.
fn parameter(value: Value<'_, '_>) -> Read<Spanned<ParameterFragment>> {
    let fragment = match value.get_ref() {
        DeValue::String(s) => ParameterFragment::Literal(s.to_string()),
        DeValue::Table(table) => {
            let [file, command] = keys(table, &["file", "command"])?;
            ParameterFragment::Table(ParameterTable {
                file: opt(file, string)?,
                command: opt(command, strings)?,
            })
        }
        _ => return invalid(value, PARAMETER_EXPECTING),
    };
    Ok(Spanned::new(value.span(), fragment))
}

/// Any value, for keys whose forms stage 2 tells apart (durations, the persistent handle).
fn any(value: Value<'_, '_>) -> Read<Spanned<toml::Value>> {
    Ok(Spanned::new(value.span(), to_value(value)?))
}

fn to_value(value: Value<'_, '_>) -> Read<toml::Value> {
    Ok(match value.get_ref() {
        DeValue::String(s) => toml::Value::String(s.to_string()),
        DeValue::Integer(_) => toml::Value::Integer(integer(value)?.into_inner()),
        DeValue::Float(f) => match f.as_str().parse::<f64>() {
            Ok(f) => toml::Value::Float(f),
            Err(_) => return invalid(value, "a number"),
        },
        DeValue::Boolean(b) => toml::Value::Boolean(*b),
        DeValue::Datetime(d) => toml::Value::Datetime(*d),
        DeValue::Array(array) => {
            toml::Value::Array(array.iter().map(to_value).collect::<Read<_>>()?)
        }
        DeValue::Table(table) => toml::Value::Table(
            table
                .iter()
                .map(|(k, v)| Ok((k.get_ref().to_string(), to_value(v)?)))
                .collect::<Read<_>>()?,
        ),
    })
}

/// Tables written as arrays (`cloud = ["host"]`, `[[state]]`) are refused here, at the key, so
/// that the message points where the table is named (the reader would point at the array).
fn refuse_arrays_as_tables(root: &DeTable<'_>, source: &Source<'_>) -> Result<(), ConfigError> {
    let refuse = |path: &str, key: &Spanned<DeString<'_>>, value: &Spanned<DeValue<'_>>| {
        if matches!(value.get_ref(), DeValue::Array(_)) {
            return Err(ConfigError::Invalid {
                at: source.locate(key.span().start),
                key: path.to_owned(),
                message: format!("invalid type: array, expected a [{path}] table"),
            });
        }
        Ok(())
    };
    for (key, value) in root {
        let name: &str = key.get_ref();
        if matches!(
            name,
            "cloud" | "provisioning" | "key" | "state" | "onboarding" | "rotation"
        ) {
            refuse(name, key, value)?;
        }
        if let (DeValue::Table(table), "provisioning") = (value.get_ref(), name) {
            for (key, value) in table {
                if key.get_ref() == "parameters" {
                    refuse("provisioning.parameters", key, value)?;
                }
            }
        }
    }
    Ok(())
}

/// The dotted path of a key in messages; names that are not bare TOML keys are quoted.
pub(super) fn key_segment(name: &str) -> Cow<'_, str> {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("{name:?}"))
    }
}

/// A key or array element of the document with its spans.
struct Entry {
    path: String,
    /// The path of the table the key is in, with a trailing dot (empty at the top level).
    parent: String,
    /// A `[table]` header: keys after it belong to it.
    header: bool,
    key: Range<usize>,
    value: Range<usize>,
}

fn entries(table: &DeTable<'_>) -> Vec<Entry> {
    let mut out = Vec::new();
    collect_table(table, "", &mut out);
    out
}

fn collect_table(table: &DeTable<'_>, prefix: &str, out: &mut Vec<Entry>) {
    for (key, value) in table {
        let path = format!("{prefix}{}", key_segment(key.get_ref()));
        out.push(Entry {
            path: path.clone(),
            parent: prefix.to_owned(),
            header: value.span().start < key.span().start,
            key: key.span(),
            value: value.span(),
        });
        collect_value(value.get_ref(), &path, out);
    }
}

fn collect_value(value: &DeValue<'_>, path: &str, out: &mut Vec<Entry>) {
    match value {
        DeValue::Table(table) => collect_table(table, &format!("{path}."), out),
        DeValue::Array(array) => {
            for (i, element) in array.iter().enumerate() {
                let path = format!("{path}[{i}]");
                out.push(Entry {
                    path: path.clone(),
                    parent: format!("{path}."),
                    header: false,
                    key: element.span(),
                    value: element.span(),
                });
                collect_value(element.get_ref(), &path, out);
            }
        }
        _ => {}
    }
}

/// The key an error at `offset` is about: the key written there, else the innermost value
/// around it. Table headers (`[cloud]`) span only the header, so containment alone would not
/// find nested keys; the smallest containing value is the innermost one.
fn key_at(entries: &[Entry], offset: usize) -> Option<String> {
    let contains =
        |span: &Range<usize>| span.start <= offset && (offset < span.end || span.start == span.end);
    if let Some(entry) = entries.iter().find(|e| contains(&e.key)) {
        return Some(entry.path.clone());
    }
    entries
        .iter()
        .filter(|e| contains(&e.value))
        .min_by_key(|e| e.value.end - e.value.start)
        .map(|e| e.path.clone())
}

/// The parser reports a duplicate key at the second occurrence, which is not in the recovered
/// table; its table is that of the key written last before it.
fn duplicate_key_path(entries: &[Entry], text: &str, offset: usize) -> Option<String> {
    let bare = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !bare {
        return None;
    }
    let previous = entries
        .iter()
        .filter(|e| e.key.start < offset)
        .max_by_key(|e| e.key.start);
    let parent = match previous {
        Some(e) if e.header => format!("{}.", e.path),
        Some(e) => e.parent.clone(),
        None => String::new(),
    };
    Some(format!("{parent}{text}"))
}

/// Levenshtein distance, for "did you mean" on short key names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}
