//! iotd's exit statuses, and the record of why it last stopped.
//!
//! systemd restarts iotd after a failure (`Restart=on-failure`), which is right when a restart
//! can help (a task died, the TPM did not answer) and wrong when only a person can (a
//! configuration mistake, a state directory iotd may not use): the unit names those statuses in
//! `RestartPreventExitStatus=` so that the journal is not filled every 5 s.
//!
//! While iotd is not running nobody answers on D-Bus, so the reason is also written to
//! `exit.json` in iotd's runtime directory (`$RUNTIME_DIRECTORY`, which systemd sets to
//! `/run/iotd`; without it, nowhere), for `iotctl status` to show. It is removed once iotd is
//! ready again.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Stopped on SIGTERM/SIGINT.
pub const OK: u8 = 0;
/// Failed in a way a restart may fix (a task died, the TPM or a disk failed for a moment).
pub const FAILURE: u8 = 1;
/// The configuration (or the command line) is wrong: fix it, then restart.
pub const CONFIG: u8 = 2;
/// The state directory or its state can't be used as it is: fix it, then restart.
pub const STATE: u8 = 3;

/// The runtime directory when systemd does not name one.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/iotd";

/// Why iotd last stopped, as `exit.json` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The exit status.
    pub status: u8,
    /// The error code (`iotd_api::ErrorCode`'s name).
    pub code: String,
    pub message: String,
    /// Unix seconds.
    pub at: i64,
    pub pid: u32,
}

impl Record {
    /// Whether systemd restarts iotd after this status (see the unit's
    /// `RestartPreventExitStatus=`).
    pub fn restarted_by_systemd(&self) -> bool {
        !matches!(self.status, OK | CONFIG | STATE)
    }
}

/// `$RUNTIME_DIRECTORY` (its first entry: systemd separates several with `:`), which systemd
/// sets for the unit.
fn runtime_directory() -> Option<PathBuf> {
    std::env::var_os("RUNTIME_DIRECTORY").and_then(|v| {
        v.to_str()
            .and_then(|s| s.split(':').next())
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
}

/// Where iotctl looks for `exit.json`: in `$RUNTIME_DIRECTORY` when set, else in `/run/iotd`.
pub fn record_path() -> PathBuf {
    runtime_directory()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR))
        .join("exit.json")
}

/// Records why iotd stops. Best effort: a runtime directory that can't be written (iotd run by
/// hand, without one) only costs `iotctl status` the reason; the journal still has it.
pub fn write(status: u8, code: &str, message: &str) {
    let record = Record {
        status,
        code: code.to_owned(),
        message: message.to_owned(),
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0),
        pid: std::process::id(),
    };
    // Only under a service manager that gave iotd a runtime directory: an iotd run by hand
    // has none, and must not write into the system's.
    let Some(path) = runtime_directory().map(|d| d.join("exit.json")) else {
        return;
    };
    let Ok(text) = serde_json::to_vec_pretty(&record) else {
        return;
    };
    // Atomic, without the directory sync: /run is a tmpfs.
    if let Err(e) =
        crate::store::write_atomic(&path, &text, 0o644, crate::store::Durability::Atomic)
    {
        tracing::debug!("not recording why iotd stopped: {e}");
    }
}

/// Removes the record: iotd runs again.
pub fn clear() {
    let Some(path) = runtime_directory().map(|d| d.join("exit.json")) else {
        return;
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::debug!("removing {}: {e}", path.display()),
    }
}

/// The record, if iotd left one.
pub fn read() -> Option<Record> {
    let bytes = std::fs::read(record_path()).ok()?;
    serde_json::from_slice(&bytes).ok()
}
