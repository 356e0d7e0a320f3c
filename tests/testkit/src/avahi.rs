//! mDNS without the machine's network: network namespaces the test creates, a veth pair between
//! two of them, and a private `avahi-daemon` in each, on a private system bus ([`DbusDaemon`]).
//!
//! - [`Netns`]: `ip netns add`, deleted on drop (also when the test panics). Names carry the
//!   test process's PID, and namespaces that an earlier, killed test process left behind are
//!   deleted when the next link is made.
//! - [`Link`]: a gateway namespace and an installer namespace joined by a veth pair, with an
//!   IPv4 address on each end: multicast goes across it as on a LAN.
//! - [`Avahi`]: `avahi-daemon` inside a namespace, on the interfaces given only, talking to the
//!   bus whose address is in its `DBUS_SYSTEM_BUS_ADDRESS`. avahi-daemon insists on
//!   `/run/avahi-daemon/` for its PID file and socket, so two of them (or one beside the host's)
//!   would clash: each runs in a mount namespace of its own (`unshare --mount`) with a fresh
//!   tmpfs on `/run`, which also hides the host's system bus socket from it. It runs as root
//!   (`--no-drop-root --no-chroot`), as the tests do.
//!
//! Synchronous (std::process), like `dbus_daemon`, so plain and tokio tests can both use it.
//! Needs root, iproute2, util-linux (unshare, mount) and avahi-daemon (scripts/setup.sh).

use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use crate::dbus_daemon::DbusDaemon;

/// Avahi's own D-Bus policy, as its package installs it: root (and user avahi) may own
/// `org.freedesktop.Avahi`, everybody may call it.
pub const AVAHI_POLICY: &str = "/usr/share/dbus-1/system.d/avahi-dbus.conf";

/// How long avahi-daemon may take to say its startup is complete.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// What test namespaces are called: the prefix, then `<pid>-<n>-<side>`.
const NETNS_PREFIX: &str = "iotd-test-";

/// Avahi's policy file; panics when avahi-daemon is not installed: an mDNS test without Avahi
/// must fail, never skip.
pub fn avahi_policy_file() -> PathBuf {
    let path = PathBuf::from(AVAHI_POLICY);
    assert!(
        path.is_file() && Path::new("/usr/sbin/avahi-daemon").is_file(),
        "avahi-daemon is not installed ({AVAHI_POLICY} or /usr/sbin/avahi-daemon is missing), \
         and this test needs it: run scripts/setup.sh (apt-get install avahi-daemon)"
    );
    path
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"))
}

/// Runs a command that must succeed (setting up the network).
fn must(program: &str, args: &[&str]) {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {} (these tests need root and iproute2)",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A number unique within this process, for names.
fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A network namespace of this test process; `ip netns del` on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace whose name ends in `side`, with its loopback up.
    pub fn new(side: &str) -> Netns {
        remove_stale_namespaces();
        let name = format!("{NETNS_PREFIX}{}-{}-{side}", std::process::id(), next_id());
        must("ip", &["netns", "add", &name]);
        let netns = Netns { name };
        must("ip", &["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` to be run inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// A shell script at `path` that runs `program` with its arguments inside the namespace:
    /// for harnesses that start a program by its path (`Iotd::start_with_config`). `ip netns
    /// exec` and the script `exec`, so the process started is the program itself.
    pub fn wrapper(&self, program: &Path, path: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let script = format!(
            "#!/bin/sh\nexec ip netns exec '{}' '{}' \"$@\"\n",
            self.name,
            program.display()
        );
        std::fs::write(path, script).expect("writing the namespace wrapper script");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .expect("making the namespace wrapper script executable");
        path.to_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Its veth end goes with it, and the peer with that.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Deletes the test namespaces of processes that are gone (a test killed before its drops
/// ran), once per process.
fn remove_stale_namespaces() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *done {
        return;
    }
    *done = true;
    let listing = run("ip", &["netns", "list"]);
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// Two namespaces joined by a veth pair, like two hosts on one LAN.
#[derive(Debug)]
pub struct Link {
    pub gateway: Netns,
    pub installer: Netns,
    /// The interface names inside each namespace.
    pub gateway_if: String,
    pub installer_if: String,
    pub gateway_ip: Ipv4Addr,
    pub installer_ip: Ipv4Addr,
}

impl Link {
    pub fn new() -> Link {
        let gateway = Netns::new("gw");
        let installer = Netns::new("inst");
        // Interface names have at most 15 characters; unique on the machine while they are
        // created in the host's namespace.
        let id = format!("iv{:x}x{:x}", std::process::id(), next_id());
        let (gateway_if, installer_if) = (format!("{id}g"), format!("{id}i"));
        must(
            "ip",
            &[
                "link",
                "add",
                &gateway_if,
                "netns",
                gateway.name(),
                "type",
                "veth",
                "peer",
                "name",
                &installer_if,
                "netns",
                installer.name(),
            ],
        );
        // Private to the two namespaces: the same addresses in every test do not meet.
        let (gateway_ip, installer_ip) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2));
        for (netns, interface, ip) in [
            (&gateway, &gateway_if, gateway_ip),
            (&installer, &installer_if, installer_ip),
        ] {
            must(
                "ip",
                &[
                    "-n",
                    netns.name(),
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    interface,
                ],
            );
            must("ip", &["-n", netns.name(), "link", "set", interface, "up"]);
        }
        Link {
            gateway,
            installer,
            gateway_if,
            installer_if,
            gateway_ip,
            installer_ip,
        }
    }
}

impl Default for Link {
    fn default() -> Self {
        Self::new()
    }
}

/// A private avahi-daemon; killed (by its PID) on drop.
pub struct Avahi {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Avahi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Avahi")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Avahi {
    /// Starts avahi-daemon in `netns` on `interface` (IPv4 only), as `host_name`.local, on
    /// `bus`; returns once it says its startup is complete (its host name is registered and
    /// `org.freedesktop.Avahi` is on the bus). Panics with its log when it does not come up.
    pub fn start(netns: &Netns, interface: &str, host_name: &str, bus: &DbusDaemon) -> Avahi {
        avahi_policy_file();
        let dir = tempfile::tempdir().expect("creating the avahi-daemon temp dir");
        let config = dir.path().join("avahi-daemon.conf");
        // IPv4 only: a veth's IPv6 link-local address is "tentative" for a while, which would
        // only add waiting. No wide-area DNS-SD, no workstation or HINFO records.
        std::fs::write(
            &config,
            format!(
                "[server]\nhost-name={host_name}\ndomain-name=local\nuse-ipv4=yes\nuse-ipv6=no\n\
                 allow-interfaces={interface}\nenable-dbus=yes\n\
                 ratelimit-interval-usec=1000000\nratelimit-burst=1000\n\
                 [wide-area]\nenable-wide-area=no\n\
                 [publish]\npublish-hinfo=no\npublish-workstation=no\n"
            ),
        )
        .expect("writing the avahi-daemon config");
        let log = dir.path().join("avahi-daemon.log");
        let mut command = netns.command("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t tmpfs -o mode=0755 tmpfs /run && exec avahi-daemon --no-drop-root \
                 --no-chroot --no-rlimits --no-proc-title -f \"$0\"",
            )
            .arg(&config)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting avahi-daemon in {}: {e}", netns.name()));

        // Its log, line by line, to the file; "startup complete" (or its end) to us.
        let stderr = child.stderr.take().expect("avahi-daemon's stderr is piped");
        let mut file = File::create(&log).expect("creating the avahi-daemon log");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if line.contains("Server startup complete")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(true);
                }
            }
            if let Some(tx) = tx {
                let _ = tx.send(false);
            }
        });
        let avahi = Avahi {
            child,
            log,
            _dir: dir,
        };
        match rx.recv_timeout(START_DEADLINE) {
            Ok(true) => avahi,
            outcome => {
                let log = avahi.log();
                drop(avahi);
                panic!(
                    "avahi-daemon in {} did not start ({outcome:?});\nbus log:\n{}\nits log:\n{log}",
                    netns.name(),
                    bus.log()
                );
            }
        }
    }

    /// SIGTERM, and waits for it to exit: it withdraws what it announced (goodbye packets)
    /// and leaves the bus, as when its service is stopped.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = run("kill", &["-TERM", &pid]);
        let _ = self.child.wait();
    }

    /// What it logged so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Avahi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
