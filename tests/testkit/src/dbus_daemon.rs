//! A private, system-bus-like D-Bus per test: `dbus-daemon` with `<type>system</type>`, EXTERNAL
//! authentication on a unix socket in a temporary directory, the default-deny policy of Debian's
//! `/usr/share/dbus-1/system.conf`, and the policy files under test included as they would be
//! from `/usr/share/dbus-1/system.d/`. Clients reach it through `DBUS_SYSTEM_BUS_ADDRESS`.
//!
//! The daemon runs as the test's user (root in CI), without `<user>`: dropping to `messagebus`
//! would only add a user the tests don't need. Unprivileged clients run under `setpriv`, so the
//! temporary directory is world-traversable (the socket itself is created mode 0777).
//!
//! Synchronous (std::process) on purpose, so plain and tokio tests can both use it.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long dbus-daemon may take to print its address (it does so once it listens).
const START_DEADLINE: Duration = Duration::from_secs(10);

/// The `<policy context="default">` of Debian bookworm's system.conf (dbus 1.14): every user may
/// connect; nobody may own a name or send a method call unless a policy file punches a hole;
/// signals and requested replies flow; the bus driver itself is reachable.
const DEFAULT_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
"#;

/// A running dbus-daemon, killed (by its PID) and reaped on drop, with its config, socket and
/// log in a temp dir.
pub struct DbusDaemon {
    child: Child,
    address: String,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for DbusDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbusDaemon")
            .field("pid", &self.child.id())
            .field("address", &self.address)
            .finish()
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl DbusDaemon {
    /// Starts dbus-daemon with the default-deny policy, `policy_files` included in order, then
    /// `extra_policy` (one or more `<policy>` elements, for what only the test needs, such as
    /// letting root own a name the shipped policy gives to another user). Returns once the
    /// daemon listens. Panics with the daemon's log when it is not installed, rejects the
    /// config or does not come up within 10 s: a D-Bus test without a bus must fail, never
    /// skip.
    pub fn start(policy_files: &[&Path], extra_policy: Option<&str>) -> DbusDaemon {
        let dir = tempfile::tempdir().expect("creating the dbus-daemon temp dir");
        // setpriv'd clients (nobody, …) must reach the socket inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("making the dbus-daemon temp dir traversable");
        let socket = dir.path().join("system_bus_socket");
        let config_path = dir.path().join("system.conf");

        let mut config = String::from(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig>\n  \
             <type>system</type>\n  <auth>EXTERNAL</auth>\n",
        );
        writeln!(
            config,
            "  <listen>unix:path={}</listen>",
            xml_escape(&socket.display().to_string())
        )
        .expect("writing to a String");
        config.push_str(DEFAULT_POLICY);
        for file in policy_files {
            let file = std::fs::canonicalize(file)
                .unwrap_or_else(|e| panic!("resolving policy file {}: {e}", file.display()));
            writeln!(
                config,
                "  <include>{}</include>",
                xml_escape(&file.display().to_string())
            )
            .expect("writing to a String");
        }
        if let Some(extra) = extra_policy {
            config.push_str(extra);
            config.push('\n');
        }
        config.push_str("</busconfig>\n");
        std::fs::write(&config_path, &config).expect("writing the dbus-daemon config");

        let log_path = dir.path().join("dbus-daemon.log");
        let log = File::create(&log_path).expect("creating the dbus-daemon log file");
        let spawned = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config_path.display()))
            .arg("--nofork")
            .arg("--nopidfile")
            .arg("--print-address=1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "dbus-daemon is not installed, and this test needs a bus: install it \
                 (apt-get install dbus-daemon)"
            ),
            Err(e) => panic!("starting dbus-daemon: {e}"),
        };

        // The address line comes once the daemon listens; EOF means it exited. A thread reads
        // it so that a daemon that neither prints nor exits still fails the test in time.
        let stdout = child.stdout.take().expect("dbus-daemon's stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        let address = match rx.recv_timeout(START_DEADLINE) {
            Ok(Ok(line)) if !line.trim().is_empty() => line.trim().to_owned(),
            outcome => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "dbus-daemon did not print its address ({outcome:?}, exit {status:?});\n\
                     config:\n{config}\nlog:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
        };
        DbusDaemon {
            child,
            address,
            dir,
        }
    }

    /// The address to put in `DBUS_SYSTEM_BUS_ADDRESS` (`unix:path=…,guid=…`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("system_bus_socket")
    }

    /// What dbus-daemon wrote to stderr so far (policy warnings, such as an unknown user or
    /// group, land here): for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dbus-daemon.log")).unwrap_or_default()
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
