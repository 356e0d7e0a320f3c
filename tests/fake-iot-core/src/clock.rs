//! The fake's notion of "now": wall time plus an offset that tests move forward through
//! `/_fake/clock`, so that token expiry and certificate validity can be exercised without waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The latest time the clock may show: 9999-12-31T23:59:59Z. Certificates carry times with
/// four-digit years (X.509 GeneralizedTime), and the `time` crate formats no later ones; the
/// earliest is the Unix epoch, since certificate validity and token expiry are Unix seconds.
pub const MAX_TIME: i64 = 253_402_300_799;

/// Why the clock was not moved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error("advancing the clock by {advance} s: the offset from wall time overflows")]
    Overflow { advance: i64 },
    #[error(
        "advancing the clock by {advance} s: {target} s since 1970 is outside the range the clock can show (0..={MAX_TIME}, 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z)"
    )]
    OutOfRange { advance: i64, target: i64 },
}

/// Wall clock with an adjustable forward offset.
#[derive(Debug)]
pub struct Clock {
    offset_secs: AtomicI64,
    /// Bumped whenever the offset moves, so that timers on the fake's time (a certificate's
    /// notAfter, a claim's expiry) can wake and look again.
    moved: tokio::sync::watch::Sender<u64>,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            offset_secs: AtomicI64::new(0),
            moved: tokio::sync::watch::Sender::new(0),
        }
    }
}

fn wall_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Clock {
    /// Seconds since the Unix epoch, offset included.
    pub fn now(&self) -> i64 {
        wall_secs().saturating_add(self.offset_secs.load(Ordering::Relaxed))
    }

    /// Moves the clock forward (or back, with a negative value) and returns the new time.
    /// Refuses, leaving the clock as it was, a move that would overflow or take it outside
    /// 1970..=9999 (`MAX_TIME`).
    pub fn try_advance(&self, secs: i64) -> Result<i64, ClockError> {
        let mut current = self.offset_secs.load(Ordering::Relaxed);
        loop {
            let offset = current
                .checked_add(secs)
                .ok_or(ClockError::Overflow { advance: secs })?;
            let target = wall_secs()
                .checked_add(offset)
                .ok_or(ClockError::Overflow { advance: secs })?;
            if !(0..=MAX_TIME).contains(&target) {
                return Err(ClockError::OutOfRange {
                    advance: secs,
                    target,
                });
            }
            // A concurrent move in between: apply ours on top of it.
            match self.offset_secs.compare_exchange(
                current,
                offset,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.bump();
                    return Ok(target);
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// `try_advance` for in-process callers (tests of the agent) that move the clock by sane
    /// amounts: a move outside the clock's range stops at its end instead of being refused.
    pub fn advance(&self, secs: i64) -> i64 {
        self.try_advance(secs).unwrap_or_else(|_| {
            let target = self.now().saturating_add(secs).clamp(0, MAX_TIME);
            self.offset_secs
                .store(target.saturating_sub(wall_secs()), Ordering::Relaxed);
            self.bump();
            self.now()
        })
    }

    /// The current offset from wall time, in seconds.
    pub fn offset(&self) -> i64 {
        self.offset_secs.load(Ordering::Relaxed)
    }

    /// Restores an offset (after a restart, so that persisted expiry times stay meaningful).
    pub fn set_offset(&self, secs: i64) {
        self.offset_secs.store(secs, Ordering::Relaxed);
        self.bump();
    }

    fn bump(&self) {
        self.moved.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes whenever the clock is moved (not as time passes).
    pub fn moves(&self) -> tokio::sync::watch::Receiver<u64> {
        self.moved.subscribe()
    }

    /// Returns once the fake's time is `at` or later: sleeps on the wall clock, and looks again
    /// whenever the clock is moved, so that `/_fake/clock` reaches timers at once.
    pub async fn reached(&self, at: i64) {
        let mut moves = self.moves();
        loop {
            moves.borrow_and_update();
            let left = at.saturating_sub(self.now());
            if left <= 0 {
                return;
            }
            let wait = std::time::Duration::from_secs(u64::try_from(left).unwrap_or(u64::MAX));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = moves.changed() => {
                    if changed.is_err() {
                        // The clock is gone (shutdown): time no longer moves by hand.
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    }
}

/// Formats epoch seconds as RFC 3339 for log lines and error messages.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_within_range_are_applied() {
        let clock = Clock::default();
        let start = clock.now();
        let later = clock.try_advance(3600).unwrap_or_default();
        // Wall time goes on meanwhile.
        assert!((start + 3600..start + 3660).contains(&later), "{later}");
        assert_eq!(clock.offset(), 3600);
        // Back, but not before 1970.
        assert!(clock.try_advance(-7200).is_ok());
        assert_eq!(clock.offset(), -3600);
    }

    #[test]
    fn moves_out_of_range_are_refused_and_change_nothing() {
        let clock = Clock::default();
        clock.set_offset(60);
        for secs in [i64::MAX, i64::MIN, MAX_TIME, -clock.now() - 10] {
            let refused = clock.try_advance(secs);
            assert!(
                matches!(
                    refused,
                    Err(ClockError::Overflow { .. } | ClockError::OutOfRange { .. })
                ),
                "{secs}: {refused:?}"
            );
            assert_eq!(clock.offset(), 60, "{secs}");
        }
        // The offset itself overflows, though the time would not (a huge negative offset).
        clock.set_offset(i64::MIN + 1);
        assert_eq!(
            clock.try_advance(-2),
            Err(ClockError::Overflow { advance: -2 })
        );
    }

    #[test]
    fn the_last_second_of_9999_is_the_limit() {
        let clock = Clock::default();
        let to_limit = MAX_TIME - clock.now();
        // Wall time goes on between reading the time and moving it: stop short of the limit.
        assert!(clock.try_advance(to_limit - 10).is_ok());
        assert!(rfc3339(clock.now()).starts_with("9999-12-31T23:59:"));
        assert!(matches!(
            clock.try_advance(20),
            Err(ClockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn in_process_moves_stop_at_the_ends() {
        let clock = Clock::default();
        // Wall time goes on after the move.
        let latest = clock.advance(i64::MAX);
        assert!((MAX_TIME..MAX_TIME + 60).contains(&latest), "{latest}");
        let earliest = clock.advance(i64::MIN);
        assert!((0..60).contains(&earliest), "{earliest}");
    }
}
