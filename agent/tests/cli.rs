//! iotd's command line and its log filter, on the real binary.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

fn iotd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iotd"))
}

#[test]
fn version_help_and_bad_arguments() {
    let out = iotd().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("iotd {}\n", env!("CARGO_PKG_VERSION"))
    );
    let out = iotd().arg("-h").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: iotd [--config FILE]"));
    let out = iotd().args(["--confg", "/x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "iotd: unexpected argument \"--confg\"; see iotd --help\n"
    );
}

/// IOTD_LOG=debug really shows debug lines (the log builder has its own INFO ceiling, which the
/// filter must lift). The first STATUS notification to a socket that is not there is logged
/// at debug, so a debug line comes without any cloud.
#[tokio::test]
async fn iotd_log_debug_shows_debug_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[cloud]\nendpoint = \"localhost\"\nport = 1\n[provisioning]\ntemplate = \"t\"\n[state]\ndir = \"{}\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_iotd"))
        .arg("--config")
        .arg(&config)
        .env("IOTD_LOG", "info, iotd=debug")
        .env("NOTIFY_SOCKET", dir.path().join("nobody-listens"))
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let hit = line.contains("DEBUG") && line.contains("notifying systemd");
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    child.start_kill().unwrap();
    assert_eq!(found, Ok(true), "no debug line; iotd's log: {seen:#?}");
}
