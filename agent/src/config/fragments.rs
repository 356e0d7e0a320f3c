//! Stage 1: one file's TOML into serde structs that mirror it.
//!
//! Every field is optional (any file may set any subset) and every value keeps its byte span,
//! so that stage 2 can name `file:line:column` for a value it refuses. Unknown keys are refused
//! here by `deny_unknown_fields`; enumerations and numbers are read as plain strings and
//! integers and checked in stage 2, which gives clearer messages than serde's.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Fragment {
    pub cloud: Option<CloudFragment>,
    pub provisioning: Option<ProvisioningFragment>,
    pub key: Option<KeyFragment>,
    pub state: Option<StateFragment>,
    pub onboarding: Option<OnboardingFragment>,
    pub rotation: Option<RotationFragment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [cloud] table")]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [provisioning] table")]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ParameterTable {
    pub file: Option<Spanned<String>>,
    pub command: Option<Spanned<Vec<String>>>,
}

const PARAMETER_EXPECTING: &str =
    "a string, { file = \"path\" } or { command = [\"program\", \"argument\"] }";

// By hand rather than `#[serde(untagged)]`: untagged enums lose the inner error and its span
// ("data did not match any variant"), and the expected forms belong in the message.
impl<'de> Deserialize<'de> for ParameterFragment {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ParameterVisitor;

        impl<'de> Visitor<'de> for ParameterVisitor {
            type Value = ParameterFragment;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(PARAMETER_EXPECTING)
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(ParameterFragment::Literal(value.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                ParameterTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ParameterFragment::Table)
            }
        }

        deserializer.deserialize_any(ParameterVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [key] table")]
pub(super) struct KeyFragment {
    pub backend: Option<Spanned<String>>,
    pub tcti: Option<Spanned<String>>,
    /// A string (`"0x81010001"`) or an integer (`0x81010001`): both read naturally in TOML.
    pub persistent_handle: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [state] table")]
pub(super) struct StateFragment {
    pub dir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [onboarding] table")]
pub(super) struct OnboardingFragment {
    /// Written like a template parameter: a string, `{ file = … }` or `{ command = […] }`.
    pub serial: Option<Spanned<ParameterFragment>>,
    /// Like `serial`; announced in the DNS-SD TXT record (`model=`).
    pub model: Option<Spanned<ParameterFragment>>,
    pub listen: Option<Spanned<String>>,
    pub allowed_templates: Option<Spanned<Vec<String>>>,
    pub allowed_endpoints: Option<Spanned<Vec<String>>>,
    pub installer_parameters: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [rotation] table")]
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
    Fragment::deserialize(toml::de::Deserializer::from(table)).map_err(|error| {
        let offset = error.span().map_or(0, |span| span.start);
        // The document parsed once already, so parsing again for the key index cannot fail;
        // this is the error path only.
        let index = DeTable::parse(source.text)
            .map(|table| entries(table.get_ref()))
            .unwrap_or_default();
        ConfigError::Invalid {
            at: source.locate(offset),
            key: key_at(&index, offset).unwrap_or_else(|| "(top level)".to_owned()),
            message: clean_message(error.message()),
        }
    })
}

/// Serde's derived structs also accept arrays, filling fields by position: `cloud = ["host"]`
/// would set the endpoint. Tables written as arrays are refused before serde sees them.
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

/// Rewrites serde's wording into the config's: keys, not fields; TOML types, not Rust types.
fn clean_message(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (unknown, expected) = rest.split_once('`').unwrap_or((rest, ""));
        // Serde lists the expected names in backticks: "expected `a`", "expected `a` or `b`",
        // "expected one of `a`, `b`, `c`"; every other segment is punctuation.
        let expected: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        if expected.is_empty() {
            return "unknown key (this table has no keys)".to_owned();
        }
        let mut text = format!("unknown key (expected one of: {})", expected.join(", "));
        if let Some(near) = expected
            .iter()
            .filter(|name| edit_distance(unknown, name) <= 2)
            .min_by_key(|name| edit_distance(unknown, name))
        {
            text = format!("{text}; did you mean {near}?");
        }
        return text;
    }
    message
        .replace("expected i64", "expected an integer")
        .replace(" as i128", "")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("invalid type: map", "invalid type: table")
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
