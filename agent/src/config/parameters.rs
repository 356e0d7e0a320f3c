//! Resolving template parameter values: literals as they are, files read, commands run.
//!
//! Values are trimmed of whitespace and NUL bytes at both ends: `/sys` files end in a newline,
//! DMI strings are padded with spaces, and device-tree strings such as
//! `/proc/device-tree/serial-number` end in a NUL. An empty result is an error, because
//! provisioning a gateway with an empty serial number is never what was meant.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{ConfigError, PARAMETER_COMMAND_TIMEOUT, ParameterSource, ProvisioningSettings};

/// More than this from a file or command is not a parameter value but a wrong path.
const MAX_VALUE_BYTES: u64 = 64 * 1024;

impl ProvisioningSettings {
    /// Resolves parameter values now (files read, commands run with a 5 s timeout — blocking; the
    /// caller runs it on a blocking thread). Errors name the parameter and the file/command.
    pub fn resolve_parameters(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        resolve_all(&self.parameters, PARAMETER_COMMAND_TIMEOUT)
    }
}

/// [`ProvisioningSettings::resolve_parameters`] with the command timeout as a parameter, so
/// tests need not wait 5 s.
pub(super) fn resolve_all(
    parameters: &BTreeMap<String, ParameterSource>,
    timeout: Duration,
) -> Result<BTreeMap<String, String>, ConfigError> {
    parameters
        .iter()
        .map(|(name, source)| {
            let value = match source {
                ParameterSource::Literal(value) => value.clone(),
                ParameterSource::File(path) => read_file(name, path)?,
                ParameterSource::Command(argv) => run(name, argv, timeout)?,
            };
            Ok((name.clone(), value))
        })
        .collect()
}

fn read_file(name: &str, path: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::ParameterFile {
        name: name.to_owned(),
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|file| file.take(MAX_VALUE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    value(name, &format!("file {}", path.display()), &bytes)
}

/// Runs `argv` with no stdin and returns its trimmed stdout, killing it after `timeout`.
fn run(name: &str, argv: &[String], timeout: Duration) -> Result<String, ConfigError> {
    let command = display_command(argv);
    let io_error = |source| ConfigError::ParameterCommand {
        name: name.to_owned(),
        command: command.clone(),
        source,
    };
    let timed_out = || ConfigError::ParameterCommandTimeout {
        name: name.to_owned(),
        command: command.clone(),
        timeout,
    };
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io_error(io::Error::new(io::ErrorKind::InvalidInput, "empty command")))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_error)?;

    // Both pipes are drained on threads: a command that fills one pipe while we wait on the
    // other would otherwise never exit. Results come back over channels so that a grandchild
    // that keeps a pipe open cannot block us past the deadline.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());

    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io_error)? {
            break status;
        }
        let now = Instant::now();
        if now >= deadline {
            // Killing may race with a normal exit; either way the child is reaped by `wait`.
            let _ = child.kill();
            let _ = child.wait();
            return Err(timed_out());
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    };

    let remaining = deadline.saturating_duration_since(Instant::now());
    let stdout = stdout
        .recv_timeout(remaining)
        .map_err(|_| timed_out())?
        .map_err(io_error)?;
    if !status.success() {
        // Stderr explains the failure; give it what time is left, but a missing stderr must not
        // hide the exit status.
        let remaining = deadline.saturating_duration_since(Instant::now());
        let stderr = stderr
            .recv_timeout(remaining)
            .ok()
            .and_then(Result::ok)
            .and_then(|bytes| first_line(&bytes));
        return Err(ConfigError::ParameterCommandFailed {
            name: name.to_owned(),
            command,
            status,
            stderr,
        });
    }
    value(name, &format!("command {command}"), &stdout)
}

/// Reads a pipe to its end (at most one byte past the limit) on its own thread.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<io::Result<Vec<u8>>> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let result = match pipe {
            Some(pipe) => pipe
                .take(MAX_VALUE_BYTES + 1)
                .read_to_end(&mut bytes)
                .map(|_| bytes),
            None => Ok(bytes),
        };
        // The receiver is gone only if we gave up on the command; nothing is left to tell.
        let _ = sender.send(result);
    });
    receiver
}

/// Checks and trims what a file or command gave.
fn value(name: &str, origin: &str, bytes: &[u8]) -> Result<String, ConfigError> {
    let problem = |problem: &str| ConfigError::ParameterValue {
        name: name.to_owned(),
        origin: origin.to_owned(),
        problem: problem.to_owned(),
    };
    if bytes.len() as u64 > MAX_VALUE_BYTES {
        return Err(problem(&format!(
            "gave more than {} KiB",
            MAX_VALUE_BYTES / 1024
        )));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| problem("gave text that is not UTF-8"))?;
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if text.is_empty() {
        return Err(problem("gave an empty value"));
    }
    Ok(text.to_owned())
}

fn first_line(bytes: &[u8]) -> Option<String> {
    const MAX_CHARS: usize = 200;
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(|line| line.chars().take(MAX_CHARS).collect())
}

/// The command as a shell would read it, in backticks, for messages.
pub(super) fn display_command(argv: &[String]) -> String {
    let words: Vec<String> = argv
        .iter()
        .map(|word| {
            let plain = !word.is_empty()
                && word
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
            if plain {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect();
    format!("`{}`", words.join(" "))
}
