//! A software TPM per test: `swtpm` on loopback TCP with its state in a temporary directory,
//! and tpm2-tools pointed at it.
//!
//! Why TCP and not a unix socket: tss-esapi 7.7 parses a `swtpm:` TCTI string into host and
//! port only and hands the TCTI `host=…,port=…`, silently dropping `path=`, so a swtpm on a
//! unix socket cannot be reached through it. The TCTI's control channel is the next port, so
//! each swtpm takes two consecutive free ports on 127.0.0.1. Parallel tests do not clash: the
//! kernel picks the ports, the choice and start-up are serialised in this process, and a port
//! taken in between makes the start retry with others.
//!
//! swtpm serves one client at a time and has no resource manager: a test must close its own
//! TPM context (drop the backend and every key from it) before it runs a tpm2-tools command,
//! or the command waits for the connection. `tpm2_tools` gives up after `TOOL_DEADLINE` and
//! says so.
//!
//! Synchronous (std::process) on purpose, so plain and tokio tests can both use it.

use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// How long swtpm may take to listen.
const START_DEADLINE: Duration = Duration::from_secs(2);
/// How many times to start swtpm on other ports when the chosen ones were taken meanwhile.
const START_ATTEMPTS: usize = 5;
/// How long one tpm2-tools command may take before the test fails (it hangs when another
/// client still holds the swtpm connection).
const TOOL_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval while waiting for swtpm or a tool: short, and bounded by the deadlines.
const POLL: Duration = Duration::from_millis(5);

/// Serialises port choice and swtpm start-up within the test process, so that two tests never
/// pick the same free ports.
static STARTING: Mutex<()> = Mutex::new(());

/// A running swtpm, killed (by its PID) and reaped on drop, with its state in a temp dir.
pub struct Swtpm {
    child: Child,
    dir: tempfile::TempDir,
    /// The TCTI string for tss-esapi and tpm2-tools: `swtpm:host=127.0.0.1,port=<port>`.
    pub tcti: String,
    /// The TPM command port on 127.0.0.1; the control channel is `port + 1`, where the swtpm
    /// TCTI looks for it.
    pub port: u16,
}

impl std::fmt::Debug for Swtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swtpm")
            .field("pid", &self.child.id())
            .field("tcti", &self.tcti)
            .finish()
    }
}

impl Swtpm {
    /// Starts `swtpm socket --tpm2` with a fresh state, started up (TPM2_Startup done by swtpm
    /// itself), and returns once it accepts connections. Panics with swtpm's output when it is
    /// not installed or does not come up within 2 s: a TPM test without a TPM must fail, never
    /// skip.
    pub fn start() -> Swtpm {
        let dir = tempfile::tempdir().expect("creating the swtpm temp dir");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("creating the swtpm state dir");
        let log_path = dir.path().join("swtpm.log");
        let _starting = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port_pair();
            let log = File::create(&log_path).expect("creating the swtpm log file");
            let log_err = log.try_clone().expect("duplicating the swtpm log file");
            let spawned = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log_err))
                .spawn();
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                    "swtpm is not installed, and this test needs a TPM: install it \
                     (apt-get install swtpm swtpm-tools libtss2-tcti-swtpm0 tpm2-tools)"
                ),
                Err(e) => panic!("starting swtpm: {e}"),
            };
            match wait_until_listening(&mut child, port) {
                Ok(()) => {
                    return Swtpm {
                        child,
                        tcti: format!("swtpm:host=127.0.0.1,port={port}"),
                        port,
                        dir,
                    };
                }
                Err(failure) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = read_log(&log_path);
                    // Only a port taken since we chose it is worth another attempt.
                    let retry = log.contains("Address already in use");
                    failures.push(format!("{failure}: {log}"));
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("swtpm did not start: {}", failures.join("; "))
    }

    /// The TCTI string, `swtpm:host=127.0.0.1,port=<port>`.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// The temporary directory (tpm2-tools commands run in it, so relative paths land here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a tpm2-tools command (`args[0]` is the tool, e.g. `tpm2_getcap`) against this TPM
    /// with `TPM2TOOLS_TCTI` set, in `dir()`. Panics if the tool is missing or runs longer than
    /// 30 s (another client, e.g. an open backend, holds the swtpm connection).
    pub fn tpm2_tools(&self, args: &[&str]) -> Output {
        let (tool, rest) = args.split_first().expect("a tpm2-tools command");
        let mut child = match Command::new(tool)
            .args(rest)
            .current_dir(self.dir())
            .env("TPM2TOOLS_TCTI", &self.tcti)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                panic!("{tool} is not installed: apt-get install tpm2-tools")
            }
            Err(e) => panic!("running {tool}: {e}"),
        };
        // Readers on their own threads, so a chatty tool never blocks on a full pipe while we
        // wait for it to exit.
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let status = wait_with_deadline(&mut child, TOOL_DEADLINE).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} did not finish within {TOOL_DEADLINE:?}: is a TPM context still open? \
                 swtpm serves one client at a time",
                args.join(" ")
            )
        });
        Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        }
    }

    /// `tpm2_tools` that must succeed; returns its standard output. Panics with stderr if not.
    pub fn tpm2_ok(&self, args: &[&str]) -> String {
        let out = self.tpm2_tools(args);
        assert!(
            out.status.success(),
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `tpm2_clear` with the (empty) lockout authorization: a new owner seed, every owner
    /// persistent object (the SRK) gone. What a gateway sees after a firmware "clear TPM".
    pub fn clear(&self) {
        self.tpm2_ok(&["tpm2_clear", "-c", "l"]);
    }

    /// The persistent handles, from `tpm2_getcap handles-persistent`.
    pub fn persistent_handles(&self) -> Vec<u32> {
        parse_handles(&self.tpm2_ok(&["tpm2_getcap", "handles-persistent"]))
    }

    /// The transient handles, from `tpm2_getcap handles-transient`.
    pub fn transient_handles(&self) -> Vec<u32> {
        parse_handles(&self.tpm2_ok(&["tpm2_getcap", "handles-transient"]))
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        // Child::kill signals exactly this PID; wait reaps it so no zombie is left.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls (bounded, `START_DEADLINE`) until swtpm accepts connections on its command port. The
/// probe connection is closed at once; swtpm then serves the next client.
fn wait_until_listening(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_DEADLINE;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        if let Some(status) = child.try_wait().expect("checking on swtpm") {
            return Err(format!(
                "swtpm exited ({status}) before listening on {addr}"
            ));
        }
        if TcpStream::connect_timeout(&addr, POLL).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "swtpm did not accept connections on {addr} within {START_DEADLINE:?}"
            ));
        }
        thread::sleep(POLL);
    }
}

/// A port P on 127.0.0.1 such that P and P + 1 are both free now (swtpm's command and control
/// ports). Picked at random below Linux's ephemeral range (32768+), where outgoing connections
/// take their ports, so that a busy test run does not keep taking P + 1.
fn free_port_pair() -> u16 {
    for _ in 0..500 {
        let port = 10_000 + (rand_u16() % 22_000);
        let Ok(_first) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free ports on 127.0.0.1")
}

/// A random u16 from the OS's hasher seed (no extra dependency for a test helper).
fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() & 0xffff) as u16
}

/// "- 0x81000001" lines.
fn parse_handles(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- 0x"))
        .filter_map(|hex| u32::from_str_radix(hex.trim(), 16).ok())
        .collect()
}

fn read_log(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => "(swtpm printed nothing)".into(),
        Ok(text) => text,
        Err(e) => format!("(reading {}: {e})", path.display()),
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a tpm2-tools command") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_tpm2_tools_and_is_killed_on_drop() {
        let tpm = Swtpm::start();
        assert_eq!(
            tpm.tcti(),
            format!("swtpm:host=127.0.0.1,port={}", tpm.port)
        );
        let random = tpm.tpm2_ok(&["tpm2_getrandom", "--hex", "8"]);
        assert_eq!(random.trim().len(), 16, "{random}");
        assert!(tpm.persistent_handles().is_empty());

        // A transient object left loaded by tpm2-tools (no resource manager) shows up.
        tpm.tpm2_ok(&["tpm2_createprimary", "-C", "o", "-c", "p.ctx"]);
        assert_eq!(tpm.transient_handles(), vec![0x8000_0000]);
        tpm.clear();

        let pid = tpm.child.id();
        let dir = tpm.dir().to_path_buf();
        drop(tpm);
        assert!(!dir.exists(), "the temp dir goes with it");
        // Killed and reaped: no process, not even a zombie.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "swtpm {pid} is gone"
        );
    }

    #[test]
    fn two_at_once_get_their_own_ports() {
        let (a, b) = (Swtpm::start(), Swtpm::start());
        assert_ne!(a.port, b.port);
        a.tpm2_ok(&["tpm2_createprimary", "-C", "o", "-c", "p.ctx"]);
        assert_eq!(a.transient_handles().len(), 1);
        assert!(b.transient_handles().is_empty(), "separate TPMs");
    }

    #[test]
    fn parses_getcap_handle_lists() {
        assert_eq!(
            parse_handles("- 0x81000001\n- 0x81010001\n"),
            vec![0x8100_0001, 0x8101_0001]
        );
        assert!(parse_handles("").is_empty());
    }
}
