//! Is the system clock synchronised? Certificates are judged by the clock, so a gateway whose
//! clock is off sees valid certificates as expired (and the other way round).
//!
//! The kernel knows (adjtimex's STA_UNSYNC flag, cleared by an NTP daemon that disciplines the
//! clock), but reading it takes a system call the workspace's `forbid(unsafe_code)` rules out
//! without another crate. So the answer comes from what the system offers, in this order:
//! 1. `timedatectl show -p NTPSynchronized --value`: systemd-timedated reads STA_UNSYNC for us
//!    (whatever NTP daemon runs). Authoritative when it answers "yes" or "no".
//! 2. `/run/systemd/timesync/synchronized`: systemd-timesyncd creates it once it synchronised
//!    the clock (present: synchronised; absent says nothing, another daemon may run).
//! 3. `chronyc -n tracking`: chrony's "Leap status" ("Not synchronised" or a synchronised one).
//!
//! When none answers, the result is "unknown" (a warning in `iotctl check`). Commands are found
//! through PATH, which is also how the tests give iotctl a `timedatectl` that says "no".

use std::path::Path;

/// systemd-timesyncd's marker file.
pub const TIMESYNC_MARKER: &str = "/run/systemd/timesync/synchronized";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClockState {
    /// Synchronised, and how we know.
    Synchronized(String),
    /// Not synchronised, and how we know.
    Unsynchronized(String),
    /// No source could tell; what was tried.
    Unknown(String),
}

/// What running one command gave: its exit success and standard output, or why it could not
/// run ("not found", "timed out").
pub type Probe = Result<(bool, String), String>;

/// The verdict from what the sources said; pure, so every combination is unit-tested.
/// `chronyc` is only consulted (and so only run) when the first two did not decide.
pub fn judge(
    timedatectl: &Probe,
    timesync_marker: bool,
    chronyc: impl FnOnce() -> Probe,
) -> ClockState {
    let timedatectl_said = match timedatectl {
        Ok((true, out)) => match out.trim() {
            "yes" => {
                return ClockState::Synchronized(
                    "timedatectl: NTPSynchronized=yes (the kernel's clock is disciplined by NTP)"
                        .into(),
                );
            }
            "no" => {
                return ClockState::Unsynchronized(
                    "timedatectl: NTPSynchronized=no (the kernel marks the clock unsynchronised; \
                     check the NTP service: timedatectl timesync-status)"
                        .into(),
                );
            }
            other => format!("timedatectl answered {other:?}"),
        },
        Ok((false, _)) => "timedatectl failed (no systemd-timedated?)".to_owned(),
        Err(e) => format!("timedatectl: {e}"),
    };
    if timesync_marker {
        return ClockState::Synchronized(format!(
            "systemd-timesyncd synchronised the clock ({TIMESYNC_MARKER} exists)"
        ));
    }
    let chronyc_said = match chronyc() {
        Ok((true, out)) => {
            let leap = out.lines().find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == "Leap status").then(|| value.trim().to_owned())
            });
            match leap.as_deref() {
                Some("Not synchronised") => {
                    return ClockState::Unsynchronized(
                        "chronyc tracking: Leap status: Not synchronised (check chronyc sources)"
                            .into(),
                    );
                }
                Some(status) => {
                    return ClockState::Synchronized(format!(
                        "chronyc tracking: Leap status: {status}"
                    ));
                }
                None => "chronyc tracking printed no leap status".to_owned(),
            }
        }
        Ok((false, _)) => "chronyc tracking failed (chronyd not running?)".to_owned(),
        Err(e) => format!("chronyc: {e}"),
    };
    ClockState::Unknown(format!(
        "cannot tell whether the clock is synchronised: {timedatectl_said}; no {TIMESYNC_MARKER}; {chronyc_said}"
    ))
}

/// Asks the system, running commands through `run`.
pub fn probe(run: &dyn Fn(&str, &[&str]) -> Probe) -> ClockState {
    let timedatectl = run("timedatectl", &["show", "-p", "NTPSynchronized", "--value"]);
    let marker = Path::new(TIMESYNC_MARKER).exists();
    judge(&timedatectl, marker, || run("chronyc", &["-n", "tracking"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> Probe {
        panic!("chronyc must not run once the answer is known")
    }

    #[test]
    fn timedatectl_decides_when_it_answers() {
        assert!(matches!(
            judge(&Ok((true, "yes\n".into())), false, never),
            ClockState::Synchronized(_)
        ));
        // "no" wins over the marker: timedated reads the kernel's flag, which is the truth now.
        assert!(matches!(
            judge(&Ok((true, "no\n".into())), true, never),
            ClockState::Unsynchronized(m) if m.contains("NTPSynchronized=no")
        ));
    }

    #[test]
    fn the_timesyncd_marker_is_next() {
        let failed: Probe = Ok((false, String::new()));
        assert!(matches!(
            judge(&failed, true, never),
            ClockState::Synchronized(m) if m.contains(TIMESYNC_MARKER)
        ));
    }

    #[test]
    fn chrony_is_last() {
        let missing: Probe = Err("not found".into());
        let chrony = |leap: &str| -> Probe {
            Ok((
                true,
                format!("Reference ID    : 00000000 ()\nLeap status     : {leap}\n"),
            ))
        };
        assert!(matches!(
            judge(&missing, false, || chrony("Normal")),
            ClockState::Synchronized(m) if m.contains("Normal")
        ));
        assert!(matches!(
            judge(&missing, false, || chrony("Not synchronised")),
            ClockState::Unsynchronized(_)
        ));
    }

    #[test]
    fn unknown_says_what_was_tried() {
        let missing: Probe = Err("not found".into());
        let ClockState::Unknown(m) = judge(&missing, false, || Err("not found".into())) else {
            panic!("expected unknown");
        };
        assert!(
            m.contains("timedatectl: not found") && m.contains("chronyc: not found"),
            "{m}"
        );
    }
}
