//! What the black-box tests of iotctl share: running the binary, fake commands on PATH, a
//! config in a temporary directory, a device identity in a state directory.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use iotd::store::{Durability, Identity, State, Store};
use time::{Duration, OffsetDateTime};

/// The iotctl binary Cargo built for these tests.
pub fn iotctl() -> &'static str {
    env!("CARGO_BIN_EXE_iotctl")
}

/// A bus address where no bus is, so nothing in a test reaches the machine's own bus.
pub const NO_BUS: &str = "unix:path=/nonexistent/iotctl-test-bus";

/// A test's directory: config, state, and a `bin/` put first on PATH for fake commands.
pub struct Dir {
    pub dir: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        let dir = Dir {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(dir.bin()).unwrap();
        dir
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn bin(&self) -> PathBuf {
        self.path().join("bin")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("config.toml")
    }

    /// A config for `endpoint:port` with the state in this directory, plus `extra` TOML
    /// (inserted into [provisioning] when it starts without a header).
    pub fn write_config(&self, endpoint: &str, port: u16, provisioning_extra: &str, extra: &str) {
        let text = format!(
            "[cloud]\nendpoint = \"{endpoint}\"\nport = {port}\n{extra}\n\n[provisioning]\ntemplate = \"gateway\"\n{provisioning_extra}\n\n[state]\ndir = \"{}\"\n",
            self.state_dir().display()
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// A `program` on this test's PATH that prints `stdout` and exits with `code`.
    pub fn fake_command(&self, program: &str, stdout: &str, code: i32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.bin().join(program);
        std::fs::write(
            &path,
            format!("#!/bin/sh\nprintf '%s\\n' '{stdout}'\nexit {code}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The clock as `timedatectl` reports it to iotctl: "yes" or "no".
    pub fn clock(&self, synchronised: bool) {
        self.fake_command("timedatectl", if synchronised { "yes" } else { "no" }, 0);
    }

    /// PATH with this test's bin/ first.
    pub fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.bin().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// `iotctl --config <this config> args…`, with the fake commands and no bus.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(iotctl());
        command
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env("PATH", self.path_env())
            .env("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)
            .env("NO_COLOR", "1");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// A device identity of generation 1 in the state directory at step provisioned: a P-256
    /// key as the file backend keeps it, and a self-signed certificate for `cert_key` (the
    /// device key itself, or another to make a mismatch) valid until `not_after`.
    pub fn provision(&self, not_after: OffsetDateTime, mismatched: bool) {
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert_key = if mismatched { &other } else { &key };
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.not_before = OffsetDateTime::now_utc() - Duration::days(300);
        params.not_after = not_after;
        let cert = params.self_signed(cert_key).unwrap();

        let store = Store::open(&self.state_dir()).unwrap();
        let gen_dir = self.state_dir().join("gen/1");
        std::fs::create_dir_all(&gen_dir).unwrap();
        std::fs::write(gen_dir.join("key.pem"), key.serialize_pem()).unwrap();
        store.write_certificate(1, &cert.pem()).unwrap();
        save_provisioned(&store, "gw-test", not_after.unix_timestamp());
    }
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A listener whose port accepts TCP connections (the kernel completes them from the backlog
/// while the listener lives).
pub fn open_port() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything about a run, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        stdout(out),
        stderr(out)
    )
}

/// The line of check `id` in the text report.
pub fn check_line<'a>(report: &'a str, id: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(id))
        .unwrap_or_else(|| panic!("no line for {id} in:\n{report}"))
}

/// Writes a state.json with the identity of generation 1 (certificate "c0ffee", whose PEM is
/// the `gen/1/cert.pem` already written).
pub fn save_provisioned(store: &Store, thing: &str, not_after: i64) {
    store
        .save(
            &State {
                identity: Some(Identity {
                    endpoint: None,
                    generation: 1,
                    certificate_id: "c0ffee".into(),
                    certificate_pem: store.read_certificate(1).unwrap(),
                    thing_name: thing.into(),
                    key: None,
                    not_before: 1_700_000_000,
                    not_after,
                    device_configuration: BTreeMap::new(),
                    committed_at: 1_700_000_000,
                    installer_parameters: BTreeMap::new(),
                }),
                last_generation: 1,
                ..State::default()
            },
            Durability::Durable,
        )
        .unwrap();
}
