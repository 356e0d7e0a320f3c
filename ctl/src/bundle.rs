//! `iotctl support-bundle`: one text file with what support asks for first, secrets removed
//! (see `redact`). One plain file rather than an archive: it attaches to a ticket as is, is
//! read with any pager, and the person sending it can check what it holds.
//!
//! Sections: versions; status (from iotd over D-Bus, or why not); the checks; the config files
//! (redacted) and whether they load; state.json (redacted) and a listing of the state directory
//! (names, modes and sizes, never contents); the last 200 journal lines of iotd. Every section
//! that carries text iotd, a command or a person wrote (the config, iotd's last error, the
//! checks' findings, the journal) goes through `redact`, and the whole bundle is scrubbed of the
//! secret values found on the way. The environment is not collected.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use iotd::config::ConfigPaths;
use time::OffsetDateTime;

use crate::check::{self, Context, render_outcomes};
use crate::redact;
use crate::status::{StatusView, rfc3339, status_json};

const JOURNAL_LINES: &str = "200";
const JOURNAL_TIMEOUT: Duration = Duration::from_secs(20);

fn section(out: &mut String, title: &str) {
    let _ = write!(out, "\n===== {title} =====\n\n");
}

/// The config files that exist, main first: those `iotd::config::load` would read, and masked
/// or broken ones too (support wants to see them).
fn config_files(paths: &ConfigPaths) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if paths.main.exists() {
        files.push(paths.main.clone());
    }
    for dir in &paths.dropin_dirs {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        names.sort();
        files.extend(names);
    }
    files
}

/// `ls -lR`-like listing of the state directory: relative path, mode, size.
fn list_dir(root: &Path, dir: &Path, out: &mut String) {
    let Ok(entries) = fs::read_dir(dir) else {
        let _ = writeln!(out, "{}: cannot be read", dir.display());
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let _ = writeln!(
            out,
            "{:04o} {:>8} {}{}",
            meta.mode() & 0o7777,
            meta.len(),
            rel.display(),
            if meta.is_dir() { "/" } else { "" }
        );
        if meta.is_dir() {
            list_dir(root, &path, out);
        }
    }
}

/// iotd's status as JSON, redacted (its last error quotes commands and their stderr), and its
/// version; or why there is none. Secrets found are added to `secrets`.
async fn status_section(secrets: &mut Vec<String>) -> (String, Option<String>) {
    let proxy = match crate::bus::connect().await {
        Ok(p) => p,
        Err(e) => return (redact::redact_text(&format!("{e:#}\n")), None),
    };
    match StatusView::fetch(&proxy).await {
        Ok(view) => {
            let mut value = status_json(&view);
            redact::redact_json(&mut value, secrets);
            let text = serde_json::to_string_pretty(&value)
                .unwrap_or_else(|e| format!("serialising the status: {e}"));
            (format!("{text}\n"), view.version)
        }
        Err(e) => (
            redact::redact_text(&format!(
                "{:#}\n",
                crate::bus::call_error("reading iotd's properties", e)
            )),
            None,
        ),
    }
}

/// The base64 lines of the file backend's device keys (`gen/<n>/key.pem`), for scrubbing: the
/// bundle never reads a key in, but a log line might quote one. TPM keys are not text.
fn device_key_lines(state_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(state_dir.join("gen")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| fs::read_to_string(entry.path().join("key.pem")).ok())
        .flat_map(|pem| redact::pem_secret_lines(&pem))
        .collect()
}

fn first_line(path: &str) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .and_then(|t| t.lines().next().map(str::to_owned))
}

/// Builds the bundle's text.
pub fn build(paths: &ConfigPaths, runtime: &tokio::runtime::Runtime) -> String {
    let now = OffsetDateTime::now_utc();
    let mut secrets: Vec<String> = Vec::new();
    let mut out = format!(
        "iotd support bundle, made {} by iotctl {}\nSecrets (keys, tokens, passwords, claim_key, secret command arguments, URL passwords) are replaced by {}.\n",
        rfc3339(now.unix_timestamp()),
        env!("CARGO_PKG_VERSION"),
        redact::REDACTED
    );

    let (status, iotd_version) = runtime.block_on(status_section(&mut secrets));

    section(&mut out, "versions");
    let _ = writeln!(out, "iotctl {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        out,
        "iotd   {}",
        iotd_version.as_deref().unwrap_or("unknown (not running)")
    );
    let _ = writeln!(
        out,
        "kernel {}",
        first_line("/proc/version").unwrap_or_else(|| "unknown".into())
    );
    let os = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(out, "os     {os}");

    section(&mut out, "status (iotctl status --json)");
    out.push_str(&status);

    // Why iotd last stopped, when it did so on an error (iotd removes it once running again).
    let record = iotd::exit::record_path();
    if let Ok(text) = std::fs::read_to_string(&record) {
        section(&mut out, &format!("last exit ({})", record.display()));
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(mut value) => {
                redact::redact_json(&mut value, &mut secrets);
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
            }
            Err(e) => {
                let _ = writeln!(out, "unreadable ({e})");
            }
        }
    }

    section(&mut out, "configuration (iotctl config check)");
    let settings = iotd::config::load(paths);
    match &settings {
        Ok(s) => {
            let _ = writeln!(out, "config ok; read:");
            for source in &s.sources {
                let _ = writeln!(out, "  {}", source.display());
            }
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "config invalid: {}",
                redact::redact_text(&e.to_string())
            );
        }
    }
    for file in config_files(paths) {
        let _ = write!(out, "\n--- {} ---\n", file.display());
        match fs::read_to_string(&file) {
            Ok(text) => {
                secrets.extend(redact::toml_secrets(&text));
                out.push_str(&redact::redact_config(&text));
            }
            Err(e) => {
                let _ = writeln!(out, "(cannot be read: {e})");
            }
        }
    }
    // The claim key's contents are never read into the bundle; its lines are scrubbed in case
    // something (a log line, a misplaced file) carries them.
    if let Ok(s) = &settings
        && let Some(claim) = &s.provisioning.claim
    {
        secrets.push(claim.key.display().to_string());
        if let Ok(pem) = fs::read_to_string(&claim.key) {
            secrets.extend(redact::pem_secret_lines(&pem));
        }
    }

    section(&mut out, "checks (iotctl check)");
    let mut ctx = Context::new(paths.clone(), now, runtime);
    let outcomes = check::run_checks(&mut ctx, &[]);
    out.push_str(&redact::redact_text(&render_outcomes(&outcomes, false)));

    if let Ok(s) = &settings {
        secrets.extend(device_key_lines(&s.state_dir));
        let state_path = s.state_dir.join("state.json");
        section(&mut out, &format!("state ({})", state_path.display()));
        match fs::read_to_string(&state_path) {
            Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(mut value) => {
                    redact::redact_json(&mut value, &mut secrets);
                    let text = serde_json::to_string_pretty(&value)
                        .unwrap_or_else(|e| format!("serialising: {e}"));
                    let _ = writeln!(out, "{text}");
                }
                Err(e) => {
                    // Not JSON: show nothing of it, since it might hold a token.
                    let _ = writeln!(out, "(not valid JSON: {e}; contents left out)");
                }
            },
            Err(e) => {
                let _ = writeln!(out, "(cannot be read: {e})");
            }
        }
        section(&mut out, &format!("files in {}", s.state_dir.display()));
        list_dir(&s.state_dir, &s.state_dir, &mut out);
    }

    section(&mut out, "journal (journalctl -u iotd -n 200)");
    match check::run_command(
        runtime,
        "journalctl",
        &[
            "-u",
            "iotd",
            "-n",
            JOURNAL_LINES,
            "--no-pager",
            "-o",
            "short-iso",
        ],
        JOURNAL_TIMEOUT,
    ) {
        Ok((_, text)) if !text.trim().is_empty() => out.push_str(&redact::redact_text(&text)),
        Ok((_, _)) => {
            out.push_str("(journalctl printed nothing: no journal access, or no entries)\n")
        }
        Err(e) => {
            let _ = writeln!(out, "(no journal: journalctl {e})");
        }
    }

    redact::scrub(&out, &secrets)
}

/// `iotctl support-bundle [--output FILE]`; answers where it went.
pub fn write(
    paths: &ConfigPaths,
    output: Option<&Path>,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Option<PathBuf>> {
    let text = build(paths, runtime);
    if output == Some(Path::new("-")) {
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .context("writing the support bundle to standard output")?;
        return Ok(None);
    }
    let path = match output {
        Some(p) => p.to_path_buf(),
        None => {
            let stamp = OffsetDateTime::now_utc();
            PathBuf::from(format!(
                "iotd-support-{:04}{:02}{:02}T{:02}{:02}{:02}Z.txt",
                stamp.year(),
                u8::from(stamp.month()),
                stamp.day(),
                stamp.hour(),
                stamp.minute(),
                stamp.second()
            ))
        }
    };
    // 0600: redacted, but still a description of the gateway's set-up.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating the support bundle {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing the support bundle {}", path.display()))?;
    Ok(Some(path))
}
