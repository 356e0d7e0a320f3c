//! Resolving template parameter values: literals as they are, files read, commands run.
//!
//! Values are trimmed of whitespace and NUL bytes at both ends: `/sys` files end in a newline,
//! DMI strings are padded with spaces, and device-tree strings such as
//! `/proc/device-tree/serial-number` end in a NUL. An empty result is an error, because
//! provisioning a gateway with an empty serial number is never what was meant.
//!
//! A command runs in a process group of its own, and the group is killed as soon as the command
//! exits, times out or prints too much. Background processes it started would otherwise linger,
//! and one that inherited its standard output would hold the pipe open, so that its end, and the
//! value printed before it, never came.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    ConfigError, MAX_PARAMETER_BYTES, PARAMETER_COMMAND_TIMEOUT, ParameterSource,
    ProvisioningSettings, ValueOrigin, ValueProblem,
};

/// How much of a command's stderr is kept: its first line explains a failure.
const MAX_STDERR_BYTES: usize = 4096;

impl ProvisioningSettings {
    /// Resolves parameter values now: files read, commands run with a 5 s timeout each. It
    /// blocks, so async callers run it on a blocking thread. Errors name the parameter and the
    /// file or command; [`ConfigError::is_transient`] tells whether trying again may help.
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
    let read_error = |error| ConfigError::ParameterFile {
        name: name.to_owned(),
        path: path.to_path_buf(),
        error,
    };
    let mut bytes = Vec::new();
    // One byte past the limit tells a file at the limit from one over it.
    fs::File::open(path)
        .and_then(|file| {
            file.take(MAX_PARAMETER_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(read_error)?;
    value(name, ValueOrigin::File(path.to_path_buf()), &bytes)
}

/// What the threads watching a command report.
enum Event {
    /// The command (the group's leader) exited.
    Exited(io::Result<ExitStatus>),
    /// Bytes read from one of its pipes.
    Read(Pipe, Vec<u8>),
    /// The pipe's end, or the error that ended reading it.
    Closed(Pipe, io::Result<()>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pipe {
    Stdout,
    Stderr,
}

/// Runs `argv` with no stdin and returns its trimmed stdout, killing it after `timeout`.
fn run(name: &str, argv: &[String], timeout: Duration) -> Result<String, ConfigError> {
    let command = display_command(argv);
    let io_error = |error| ConfigError::ParameterCommand {
        name: name.to_owned(),
        command: command.clone(),
        error,
    };
    let timed_out = || ConfigError::ParameterCommandTimeout {
        name: name.to_owned(),
        command: command.clone(),
        timeout,
    };
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io_error(io::Error::new(io::ErrorKind::InvalidInput, "empty command")))?;
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(io_error)?;
    let group = ProcessGroup(child.id());

    // The command is waited for and both pipes are read on threads that report over one
    // channel, so that a single wait with a deadline covers all three, and a command that
    // fills one pipe while nobody reads it cannot stall.
    let (events, receiver) = mpsc::channel();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let started = read_on_thread(stdout, Pipe::Stdout, events.clone())
        .and_then(|()| read_on_thread(stderr, Pipe::Stderr, events.clone()));
    if let Err(error) = started {
        group.kill();
        // Dead by now (or as good as): reaped, not left as a zombie.
        let _ = child.wait();
        return Err(io_error(error));
    }
    on_thread(move || {
        // The receiver is gone only if we gave up on the command; nothing is left to tell
        // then, and the wait has still reaped it.
        let _ = events.send(Event::Exited(child.wait()));
    })
    .map_err(|error| {
        group.kill();
        io_error(error)
    })?;

    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut status = None;
    let mut open_pipes = 2;
    while status.is_none() || open_pipes > 0 {
        let event = match receiver.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) if status.is_none() => {
                group.kill();
                return Err(timed_out());
            }
            // The command exited and its group is gone, but a process that left the group
            // still holds a pipe open: what the command printed is all there is.
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        };
        match event {
            Event::Exited(Ok(exit)) => {
                status = Some(exit);
                // Its background processes go too, which also closes their copies of the
                // pipes, so that the ends of both come now.
                group.kill();
            }
            Event::Exited(Err(error)) => {
                group.kill();
                return Err(io_error(error));
            }
            Event::Read(Pipe::Stdout, bytes) => {
                stdout.extend_from_slice(&bytes);
                // Decided on what was read, not on the exit status: a command stopped by a
                // full pipe or killed here must not be reported as a failure of its own.
                if stdout.len() > MAX_PARAMETER_BYTES {
                    group.kill();
                    return Err(ConfigError::ParameterValue {
                        name: name.to_owned(),
                        origin: ValueOrigin::Command(command),
                        problem: ValueProblem::TooLong,
                    });
                }
            }
            Event::Read(Pipe::Stderr, bytes) => {
                let room = MAX_STDERR_BYTES.saturating_sub(stderr.len());
                stderr.extend_from_slice(&bytes[..room.min(bytes.len())]);
            }
            Event::Closed(Pipe::Stdout, Err(error)) => {
                group.kill();
                return Err(io_error(error));
            }
            // Stderr only explains a failure; an error reading it is not one of the command.
            Event::Closed(_, _) => open_pipes -= 1,
        }
    }

    let Some(status) = status else {
        // Every thread has reported without the exit status; only a thread that ended without
        // reporting (which they do not) gets here.
        return Err(io_error(io::Error::other("its exit status was lost")));
    };
    if !status.success() {
        return Err(ConfigError::ParameterCommandFailed {
            name: name.to_owned(),
            command,
            status,
            stderr: first_line(&stderr),
        });
    }
    value(name, ValueOrigin::Command(command), &stdout)
}

/// Reads `pipe` to its end on a thread of its own, sending what it reads as it reads it.
fn read_on_thread<R: Read + Send + 'static>(
    pipe: Option<R>,
    which: Pipe,
    events: Sender<Event>,
) -> io::Result<()> {
    let Some(mut pipe) = pipe else {
        // Not piped: there is nothing to read (every pipe is, in `run`).
        let _ = events.send(Event::Closed(which, Ok(())));
        return Ok(());
    };
    on_thread(move || {
        let mut buffer = [0; 8192];
        let end = loop {
            match pipe.read(&mut buffer) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if events
                        .send(Event::Read(which, buffer[..n].to_vec()))
                        .is_err()
                    {
                        // Nobody listens any more: stop reading, which closes the pipe.
                        return;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => break Err(error),
            }
        };
        let _ = events.send(Event::Closed(which, end));
    })
}

fn on_thread(work: impl FnOnce() + Send + 'static) -> io::Result<()> {
    thread::Builder::new()
        .name("iotd-parameter".to_owned())
        .spawn(work)
        .map(drop)
}

/// The process group a command runs in; its id is the command's process id.
#[derive(Debug, Clone, Copy)]
struct ProcessGroup(u32);

impl ProcessGroup {
    /// Sends SIGKILL to every process left in the group. The group's id stays taken while any
    /// member is left; once the group is empty and the leader reaped, it could only name
    /// another group if the kernel handed out the leader's pid again (it wraps around only
    /// after pid_max) and that process made itself a group leader, in the moment between the
    /// reaping and this.
    fn kill(self) {
        let Some(pid) = i32::try_from(self.0)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return;
        };
        match rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
            // ESRCH: the group is already empty, the usual case after a command that started
            // nothing in the background.
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(error) => tracing::warn!(
                group = self.0,
                %error,
                "could not stop a template parameter command's process group; its processes \
                 may keep running"
            ),
        }
    }
}

/// Checks and trims what a file or command gave.
fn value(name: &str, origin: ValueOrigin, bytes: &[u8]) -> Result<String, ConfigError> {
    let problem = |problem| ConfigError::ParameterValue {
        name: name.to_owned(),
        origin: origin.clone(),
        problem,
    };
    if bytes.len() > MAX_PARAMETER_BYTES {
        return Err(problem(ValueProblem::TooLong));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| problem(ValueProblem::NotUtf8))?;
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if text.is_empty() {
        return Err(problem(ValueProblem::Empty));
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
