//! Removing secrets from what `support-bundle` collects. Three layers, because one can miss:
//! 1. config files are redacted line by line, keeping their comments and line numbers (what
//!    support needs to read an error "file:line"): the value of every key whose name says it is
//!    secret (`claim_key`, `…token…`, `…password…`, `…secret…`, `key`, `pin`) is replaced;
//! 2. all text, config lines included, is redacted by what secrets look like in it, since a
//!    parameter command's arguments and iotd's last error (which quotes the command and its
//!    stderr) are free-form: the values of flags and `NAME=VALUE` words whose name says secret
//!    (`--password=…`, `--token VALUE`, `DB_PASSWORD=…`), the userinfo of URLs, `Bearer`
//!    tokens, and PEM private key blocks;
//! 3. every secret value found (by parsing the config files, secret command arguments
//!    included, walking state.json, and the lines of the claim and device key files) is then
//!    scrubbed from the whole bundle, wherever it is quoted (a command's stderr in a journal
//!    line, say), and so is every PEM private key block.

use std::ops::Range;

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

/// Whether a command-line flag (its dashes are ignored) or the name of a `NAME=VALUE` word says
/// its value is secret. Broader than `is_secret_key`, because command lines and messages are
/// free-form: a value redacted without need costs support one detail, a missed one leaks.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.trim_start_matches('-').to_ascii_lowercase();
    if name.is_empty() || name.contains("public") {
        return false;
    }
    is_secret_key(&name)
        || name.ends_with("key")
        || name.ends_with("-pin")
        || [
            "token",
            "secret",
            "passwd",
            "pass",
            "apikey",
            "auth",
            "credential",
        ]
        .iter()
        .any(|s| name.contains(s))
}

/// What one word (a command argument, or a word of free text without its quotes) says about
/// secrets.
#[derive(Debug, Default)]
struct WordSecrets {
    /// The byte ranges of the word that are secret.
    ranges: Vec<Range<usize>>,
    /// The word names a secret without holding it (`--password`, `Bearer`): the next word is
    /// the secret.
    value_follows: bool,
}

/// A name as environment variables and `key=value` log fields have them.
fn is_variable_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

fn word_secrets(word: &str) -> WordSecrets {
    let mut found = WordSecrets::default();
    // `Bearer TOKEN`, `Basic CREDENTIALS`, and header-like `Authorization: …`,
    // `X-Vault-Token: …`: the next word is the secret.
    if word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic") {
        found.value_follows = true;
        return found;
    }
    if let Some(name) = word.strip_suffix(':')
        && !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && is_secret_name(name)
    {
        found.value_follows = true;
        return found;
    }
    let (name, value_at) = match word.find('=') {
        Some(eq) => (&word[..eq], Some(eq + 1)),
        None => (word, None),
    };
    let is_flag = name.starts_with('-') && !name.trim_start_matches('-').is_empty();
    let is_variable = value_at.is_some() && is_variable_name(name);
    if (is_flag || is_variable) && is_secret_name(name) {
        match value_at {
            Some(at) if at < word.len() => found.ranges.push(at..word.len()),
            Some(_) => {}
            None => found.value_follows = true,
        }
        return found;
    }
    found.ranges = userinfo_ranges(word);
    found.ranges.extend(query_ranges(word));
    found
}

/// The values of URL query parameters whose names say secret (`?token=…&user=x`).
fn query_ranges(word: &str) -> Vec<Range<usize>> {
    let Some(query_at) = word.find('?') else {
        return Vec::new();
    };
    let mut ranges = Vec::new();
    let mut at = query_at + 1;
    let end = word[at..].find('#').map_or(word.len(), |h| at + h);
    while at < end {
        let pair_end = word[at..end].find('&').map_or(end, |a| at + a);
        let pair = &word[at..pair_end];
        if let Some(eq) = pair.find('=')
            && is_secret_name(&pair[..eq])
            && eq + 1 < pair.len()
        {
            ranges.push(at + eq + 1..pair_end);
        }
        at = pair_end + 1;
    }
    ranges
}

/// The userinfo of every URL in `word`: the password of `user:password@`, or all of a
/// userinfo without one (which is then often a token, as in `https://TOKEN@host`).
fn userinfo_ranges(word: &str) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(found) = word[from..].find("://") {
        let authority_start = from + found + "://".len();
        let rest = &word[authority_start..];
        let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_len].rfind('@') {
            let secret_from = rest[..at].find(':').map_or(0, |colon| colon + 1);
            if secret_from < at {
                ranges.push(authority_start + secret_from..authority_start + at);
            }
        }
        from = authority_start + authority_len;
    }
    ranges
}

/// The values in a command's arguments that look secret (see `redact_text`), for scrubbing
/// wherever they are quoted: `["get-serial", "--password", "hunter2"]` gives `hunter2`.
pub fn argument_secrets<S: AsRef<str>>(argv: &[S]) -> Vec<String> {
    let mut found = Vec::new();
    let mut value_follows = false;
    for arg in argv {
        let arg = arg.as_ref();
        if value_follows && !arg.starts_with("--") {
            found.push(arg.to_owned());
        }
        let secrets = word_secrets(arg);
        found.extend(secrets.ranges.into_iter().map(|r| arg[r].to_owned()));
        value_follows = secrets.value_follows;
    }
    found
}

/// What may surround a word of free text without being part of it: shell and TOML quotes,
/// brackets, list punctuation.
const OPENERS: &[char] = &['`', '\'', '"', '(', '[', '{'];
const CLOSERS: &[char] = &['`', '\'', '"', ')', ']', '}', ',', ';'];

/// A whitespace-separated word of a text, by byte offsets.
#[derive(Debug)]
struct Word {
    start: usize,
    end: usize,
    /// The word without what surrounds it.
    core: Range<usize>,
    /// The quote it opens, if it starts with one.
    quote: Option<char>,
    /// Whether it closes that quote too.
    closed: bool,
}

impl Word {
    fn new(text: &str, start: usize, end: usize) -> Word {
        let raw = &text[start..end];
        let inner = raw.trim_start_matches(OPENERS);
        let core_start = end - inner.len();
        let core_end = core_start + inner.trim_end_matches(CLOSERS).len();
        let quote = text[start..core_start]
            .chars()
            .rev()
            .find(|c| matches!(c, '\'' | '"'));
        Word {
            start,
            end,
            core: core_start..core_end,
            quote,
            closed: quote.is_some_and(|q| text[core_end..end].contains(q)),
        }
    }
}

fn words(text: &str) -> Vec<Word> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        match (start, c.is_whitespace()) {
            (None, false) => start = Some(i),
            (Some(s), true) => {
                words.push(Word::new(text, s, i));
                start = None;
            }
            _ => {}
        }
    }
    words
}

/// When `words[i]` opens a quote it does not close (a shell-quoted argument with spaces, as
/// iotd prints commands: `'--password=two words'`), where on its line that quote closes.
fn closing_quote(text: &str, words: &[Word], i: usize) -> Option<usize> {
    let word = &words[i];
    let quote = word.quote.filter(|_| !word.closed)?;
    let mut previous_end = word.end;
    for later in &words[i + 1..] {
        if text[previous_end..later.start].contains('\n') {
            return None;
        }
        if let Some(at) = text[later.start..later.end].find(quote) {
            return Some(later.start + at);
        }
        previous_end = later.end;
    }
    None
}

/// `text` with the secrets its words show by their look replaced (see the module's layer 2).
/// A flag's value is the next word on the same line; with `quoted_across_lines`, also on a
/// later line when both are quoted (a TOML array written one argument per line).
fn redact_words(text: &str, quoted_across_lines: bool) -> String {
    let words = words(text);
    let mut cuts: Vec<Range<usize>> = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let found = word_secrets(&text[word.core.clone()]);
        for range in found.ranges {
            let end = if range.end == word.core.len() {
                closing_quote(text, &words, i).unwrap_or(word.core.end)
            } else {
                word.core.start + range.end
            };
            cuts.push(word.core.start + range.start..end);
        }
        let Some(value) = words.get(i + 1).filter(|_| found.value_follows) else {
            continue;
        };
        let same_line = !text[word.end..value.start].contains('\n');
        let quoted = word.quote.is_some() && value.quote.is_some();
        let core = &text[value.core.clone()];
        // `Authorization: Bearer TOKEN`: the scheme is not the secret; the word after it is
        // (the scheme's own `value_follows` cuts it).
        let scheme = core.eq_ignore_ascii_case("bearer") || core.eq_ignore_ascii_case("basic");
        if (same_line || (quoted_across_lines && quoted)) && !core.starts_with("--") && !scheme {
            let end = closing_quote(text, &words, i + 1).unwrap_or(value.core.end);
            cuts.push(value.core.start..end);
        }
    }
    replace_ranges(text, cuts)
}

/// `text` with each of `cuts` (overlapping ones merged) replaced by `REDACTED`.
fn replace_ranges(text: &str, mut cuts: Vec<Range<usize>>) -> String {
    cuts.retain(|r| !r.is_empty());
    cuts.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::new();
    for cut in cuts {
        match merged.last_mut() {
            Some(last) if cut.start <= last.end => last.end = last.end.max(cut.end),
            _ => merged.push(cut),
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for cut in merged {
        out.push_str(&text[at..cut.start]);
        out.push_str(REDACTED);
        at = cut.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Free text (iotd's last error, the checks' findings, journal lines) without the secrets it
/// shows by their look: flag and `NAME=VALUE` values whose name says secret, URL userinfo,
/// `Bearer` tokens, private key blocks. Command names, flag names and other values stay.
pub fn redact_text(text: &str) -> String {
    redact_words(&strip_private_keys(text), false)
}

/// A config file as the bundle shows it: `redact_toml`, then `redact_text`'s redaction, which
/// catches the secret arguments of `{ command = [...] }` parameters (written on one line or
/// one argument per line).
pub fn redact_config(text: &str) -> String {
    redact_words(&strip_private_keys(&redact_toml(text)), true)
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

/// The values a TOML text holds that are secret (when it parses), for scrubbing: strings under
/// secret keys, and the secret-looking parts of other strings and of string arrays (the
/// arguments of parameter commands).
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
        toml::Value::String(s) => found.extend(argument_secrets(&[s])),
        toml::Value::Array(items) => {
            let argv: Option<Vec<&str>> = items.iter().map(toml::Value::as_str).collect();
            match argv {
                // A flag's value is the next argument: the array is looked at as a whole.
                Some(argv) if !secret => found.extend(argument_secrets(&argv)),
                _ => items.iter().for_each(|v| walk_toml(v, secret, found)),
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table {
                walk_toml(v, secret || is_secret_key(k), found);
            }
        }
        _ => {}
    }
}

/// `value` with every string under a secret key replaced, and every other string redacted as
/// free text (`redact_text`); the replaced strings are added to `found`.
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
        Value::String(text) => *text = redact_text(text),
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

/// What a private key block is replaced by.
const KEY_REMOVED: &str = "[private key removed]";

/// `text` without PEM private key blocks, wherever they are (inside a line too, as in a JSON
/// string); a block without its END line is removed to the end of the text.
fn strip_private_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(begin) = private_key_armour(rest, "-----BEGIN ") {
        out.push_str(&rest[..begin.start]);
        out.push_str(KEY_REMOVED);
        let after = &rest[begin.end..];
        rest = private_key_armour(after, "-----END ").map_or("", |end| &after[end.end..]);
    }
    out.push_str(rest);
    out
}

/// Where the first armour line `<marker>… PRIVATE KEY-----` of `text` is.
fn private_key_armour(text: &str, marker: &str) -> Option<Range<usize>> {
    let mut from = 0;
    while let Some(found) = text[from..].find(marker) {
        let label_start = from + found + marker.len();
        let label_len = text[label_start..].find("-----")?;
        let label = &text[label_start..label_start + label_len];
        if label.ends_with("PRIVATE KEY") && !label.contains('\n') {
            return Some(from + found..label_start + label_len + "-----".len());
        }
        from = label_start;
    }
    None
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
    fn secret_flag_and_variable_names() {
        for name in [
            "--password",
            "-passwd",
            "--pass",
            "--api-token",
            "--client-secret",
            "--apikey",
            "--api-key",
            "--key",
            "--signing_key",
            "--auth",
            "--authorization",
            "--credential-file",
            "--pin",
            "--sim-pin",
            "DB_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "GITHUB_TOKEN",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "--device",
            "--verbose",
            "--url",
            "--public-key",
            "--keyfile",
            "-",
            "--",
            "SERIAL",
            "step",
            "generation",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
    }

    #[test]
    fn command_argument_secrets() {
        let argv = [
            "/usr/bin/get-serial",
            "--password=hunter2",
            "--device",
            "/dev/ttyS0",
            "--token",
            "tok-1",
            "--auth",
            "--verbose",
            "DB_PASSWORD=pw-2",
            "SITE=berlin",
            "--url=https://user:pw-3@example.com/x",
            "https://tok-4@example.com",
            "--key=",
        ];
        assert_eq!(
            argument_secrets(&argv),
            vec!["hunter2", "tok-1", "pw-2", "pw-3", "tok-4"]
        );
    }

    #[test]
    fn free_text_keeps_context_and_loses_secrets() {
        let cases = [
            (
                "command `/usr/bin/get-serial --password=hunter2 --device /dev/ttyS0` failed (exit status: 1)",
                "command `/usr/bin/get-serial --password=<redacted> --device /dev/ttyS0` failed (exit status: 1)",
            ),
            (
                "command `get-model --token tok-1 --verbose` failed",
                "command `get-model --token <redacted> --verbose` failed",
            ),
            // iotd quotes an argument with spaces as a shell would.
            (
                "command `get-serial '--password=two words' -v` failed",
                "command `get-serial '--password=<redacted>' -v` failed",
            ),
            (
                "command `get-serial --passwd 'two words'` failed",
                "command `get-serial --passwd '<redacted>'` failed",
            ),
            (
                "run: env DB_PASSWORD=pw-2 SITE=berlin get-region",
                "run: env DB_PASSWORD=<redacted> SITE=berlin get-region",
            ),
            (
                "curl: (22) https://svc:pw-3@api.example.com/serial: 401, see http://example.com",
                "curl: (22) https://svc:<redacted>@api.example.com/serial: 401, see http://example.com",
            ),
            (
                "fetching https://tok-4@example.com/x",
                "fetching https://<redacted>@example.com/x",
            ),
            (
                "sent Authorization: Bearer tok-5",
                "sent Authorization: Bearer <redacted>",
            ),
            // The value of a flag is on its own line only in a config array.
            (
                "hint: try --token\n2026-06-07T10:00:00+0000 next",
                "hint: try --token\n2026-06-07T10:00:00+0000 next",
            ),
            (
                "connecting to example-ats.iot.eu-west-1.amazonaws.com:8883: connection refused",
                "connecting to example-ats.iot.eu-west-1.amazonaws.com:8883: connection refused",
            ),
            (
                "key provisioning.claim_key: must be an absolute path",
                "key provisioning.claim_key: must be an absolute path",
            ),
        ];
        for (text, redacted) in cases {
            assert_eq!(redact_text(text), redacted, "{text}");
        }
    }

    #[test]
    fn parameter_commands_in_config_are_redacted() {
        let text = "[provisioning.parameters]\nSerial = { command = [\"/usr/bin/get-serial\", \"--password=hunter2\", \"--device\", \"/dev/ttyS0\"] }\n[provisioning.parameters.Region]\ncommand = [\n  \"get-region\",\n  \"--client-secret\",\n  \"s-1 s-2\",\n  \"--verbose\",\n]\n# try --token\n[state]\n";
        assert_eq!(
            redact_config(text),
            "[provisioning.parameters]\nSerial = { command = [\"/usr/bin/get-serial\", \"--password=<redacted>\", \"--device\", \"/dev/ttyS0\"] }\n[provisioning.parameters.Region]\ncommand = [\n  \"get-region\",\n  \"--client-secret\",\n  \"<redacted>\",\n  \"--verbose\",\n]\n# try --token\n[state]\n"
        );
        let mut found = toml_secrets(text);
        found.sort();
        assert_eq!(found, vec!["hunter2".to_owned(), "s-1 s-2".to_owned()]);
    }

    #[test]
    fn json_free_text_is_redacted() {
        let mut v = serde_json::json!({"lastError": {"code": "config", "message": "command `x --password=pw-1` failed"}});
        let mut found = Vec::new();
        redact_json(&mut v, &mut found);
        assert_eq!(
            v["lastError"]["message"],
            "command `x --password=<redacted>` failed"
        );
    }

    #[test]
    fn private_key_blocks_inside_a_line_go() {
        let text = "stderr: -----BEGIN RSA PRIVATE KEY-----\\nMIIE\\n-----END RSA PRIVATE KEY----- done\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            redact_text(text),
            "stderr: [private key removed] done\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
        );
        assert_eq!(
            redact_text("a -----BEGIN PRIVATE KEY-----\nMIIE"),
            "a [private key removed]"
        );
    }

    #[test]
    fn private_key_blocks_go() {
        let text = "a\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\nb\n";
        assert_eq!(scrub(text, &[]), "a\n[private key removed]\nb\n");
    }

    #[test]
    fn headers_basic_credentials_and_query_tokens_go() {
        for (text, secret, kept) in [
            (
                "curl https://api/serial?token=s3cr3t&id=7",
                "s3cr3t",
                "id=7",
            ),
            ("X-Vault-Token: hvs.ABC and more", "hvs.ABC", "and more"),
            (
                "Authorization: Basic dXNlcjpwYXNz",
                "dXNlcjpwYXNz",
                "Authorization:",
            ),
            ("header Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "header"),
        ] {
            let out = redact_text(text);
            assert!(!out.contains(secret), "{text} -> {out}");
            assert!(out.contains(kept), "{text} -> {out}");
        }
        assert_eq!(
            argument_secrets(&["curl", "https://api/serial?apikey=k1&x=2"]),
            ["k1"]
        );
        // Words that only end with a colon and name nothing secret stay.
        assert_eq!(
            redact_text("key provisioning.claim_key: must be"),
            "key provisioning.claim_key: must be"
        );
    }
}
