//! Removing secrets from what `support-bundle` collects. Two layers, because one can miss:
//! 1. config files are redacted line by line, keeping their comments and line numbers (what
//!    support needs to read an error "file:line"): the value of every key whose name says it is
//!    secret (`claim_key`, `…token…`, `…password…`, `…secret…`, `key`, `pin`) is replaced;
//! 2. every secret value found (by parsing the same files, walking state.json, and the lines of
//!    the claim key file) is then scrubbed from the whole bundle, journal lines included, and so
//!    is every PEM private key block.

use serde_json::Value;

pub const REDACTED: &str = "<redacted>";

/// Whether a config or JSON key names a secret (or, for `claim_key`, where one is kept).
pub fn is_secret_key(name: &str) -> bool {
    let name = name.trim().trim_matches(['"', '\'']).to_ascii_lowercase();
    name == "key"
        || name == "pin"
        || name.ends_with("_key")
        || name.ends_with("_pin")
        || (name.ends_with("key") && name.len() > 3 && !name.contains('_') && name != "publickey")
        || [
            "token",
            "password",
            "passwd",
            "secret",
            "passphrase",
            "credential",
        ]
        .iter()
        .any(|s| name.contains(s))
}

/// The byte offset of the first `=` outside quotes, if the line is `key = value`.
fn assignment(line: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '=') => return Some(i),
            (None, '#') => return None,
            _ => {}
        }
    }
    None
}

/// A TOML file with the values of secret keys replaced; comments, layout and line numbers kept.
pub fn redact_toml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // Inside a multi-line string that is being redacted: its closing delimiter.
    let mut skipping: Option<&str> = None;
    for line in text.lines() {
        if let Some(delimiter) = skipping {
            if line.contains(delimiter) {
                skipping = None;
            }
            out.push_str(REDACTED);
            out.push('\n');
            continue;
        }
        let trimmed = line.trim_start();
        let redacted = match assignment(line) {
            Some(eq) if !trimmed.starts_with('#') && !trimmed.starts_with('[') => {
                let key = &line[..eq];
                let last = key.rsplit('.').next().unwrap_or(key);
                if is_secret_key(last) {
                    let value = line[eq + 1..].trim_start();
                    for delimiter in ["\"\"\"", "'''"] {
                        if let Some(rest) = value.strip_prefix(delimiter)
                            && !rest.contains(delimiter)
                        {
                            skipping = Some(delimiter);
                        }
                    }
                    Some(format!("{key}= \"{REDACTED}\""))
                } else {
                    None
                }
            }
            _ => None,
        };
        out.push_str(redacted.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The string values under secret keys of a TOML text (when it parses), for scrubbing.
pub fn toml_secrets(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(table) = toml::from_str::<toml::Table>(text) {
        walk_toml(&toml::Value::Table(table), false, &mut found);
    }
    found
}

fn walk_toml(value: &toml::Value, secret: bool, found: &mut Vec<String>) {
    match value {
        toml::Value::String(s) if secret => found.push(s.clone()),
        toml::Value::Array(items) => items.iter().for_each(|v| walk_toml(v, secret, found)),
        toml::Value::Table(table) => {
            for (k, v) in table {
                walk_toml(v, secret || is_secret_key(k), found);
            }
        }
        _ => {}
    }
}

/// `value` with every string under a secret key replaced; the replaced strings are added to
/// `found`.
pub fn redact_json(value: &mut Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if is_secret_key(k) {
                    collect_json_strings(v, found);
                    *v = Value::String(REDACTED.into());
                } else {
                    redact_json(v, found);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact_json(v, found)),
        _ => {}
    }
}

fn collect_json_strings(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::String(s) => found.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| collect_json_strings(v, found)),
        Value::Object(map) => map.values().for_each(|v| collect_json_strings(v, found)),
        _ => {}
    }
}

/// The lines of a PEM key file worth scrubbing: its base64 body (not the armour lines).
pub fn pem_secret_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .map(str::to_owned)
        .collect()
}

/// Scrubs `secrets` (short ones are skipped: replacing "a" everywhere helps nobody) and PEM
/// private key blocks from `text`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut secrets: Vec<&str> = secrets
        .iter()
        .map(|s| s.trim())
        .filter(|s| s.len() >= 4)
        .collect();
    // Longest first, so a secret containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut text = strip_private_keys(text);
    for secret in secrets {
        text = text.replace(secret, REDACTED);
    }
    text
}

fn strip_private_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.lines() {
        let is_begin = line.contains("-----BEGIN") && line.contains("PRIVATE KEY-----");
        let is_end = line.contains("-----END") && line.contains("PRIVATE KEY-----");
        if is_begin {
            inside = true;
            out.push_str("[private key removed]\n");
        }
        if !inside {
            out.push_str(line);
            out.push('\n');
        }
        if is_end {
            inside = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_key_names() {
        for name in [
            "claim_key",
            "key",
            "ownershipToken",
            "api_token",
            "password",
            "\"Secret\"",
            "pin",
            "ApiKey",
        ] {
            assert!(is_secret_key(name), "{name}");
        }
        for name in [
            "backend",
            "claim_certificate",
            "keep_alive_secs",
            "endpoint",
            "certificateId",
            "SerialNumber",
            "tcti",
            "persistent_handle",
        ] {
            assert!(!is_secret_key(name), "{name}");
        }
    }

    #[test]
    fn toml_lines_keep_their_place() {
        let text = "# claim_key = \"/x\"\n[provisioning]\nclaim_key = \"/etc/iotd/claim.key\" # the key\nclaim_certificate = \"/etc/iotd/claim.pem\"\n[provisioning.parameters]\nToken = \"\"\"\nabc\n\"\"\"\nSite = \"berlin\"\n";
        let out = redact_toml(text);
        assert_eq!(
            out,
            "# claim_key = \"/x\"\n[provisioning]\nclaim_key = \"<redacted>\"\nclaim_certificate = \"/etc/iotd/claim.pem\"\n[provisioning.parameters]\nToken = \"<redacted>\"\n<redacted>\n<redacted>\nSite = \"berlin\"\n"
        );
    }

    #[test]
    fn nested_secrets_are_found_for_scrubbing() {
        let text = "[provisioning]\nparameters = { Token = \"t-123456\", Site = \"x\" }\n";
        assert_eq!(toml_secrets(text), vec!["t-123456".to_owned()]);
        assert_eq!(
            scrub(&redact_toml(text), &toml_secrets(text)),
            "[provisioning]\nparameters = { Token = \"<redacted>\", Site = \"x\" }\n"
        );
    }

    #[test]
    fn json_secrets_are_replaced_and_collected() {
        let mut v = serde_json::json!({"step": "certificate-issued", "ownershipToken": "tok-1", "deviceConfiguration": {"apiPassword": "pw-1"}});
        let mut found = Vec::new();
        redact_json(&mut v, &mut found);
        found.sort();
        assert_eq!(v["ownershipToken"], REDACTED);
        assert_eq!(v["deviceConfiguration"]["apiPassword"], REDACTED);
        assert_eq!(found, vec!["pw-1".to_owned(), "tok-1".to_owned()]);
    }

    #[test]
    fn private_key_blocks_go() {
        let text = "a\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\nb\n";
        assert_eq!(scrub(text, &[]), "a\n[private key removed]\nb\n");
    }
}
