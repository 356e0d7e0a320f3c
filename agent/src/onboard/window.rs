//! The onboarding window and its attempt counter (profile §5.3, issue 13 item 2).
//!
//! Pairing is possible only while the window is open. It opens by itself while the gateway has
//! no identity and no usable claim (it stays open as long as that lasts), after provisioning
//! with the image's claim failed for good (an installer can rescue the gateway), and on a
//! local root request (`iotctl onboarding open`, at most 900 s). It closes on success, on its
//! timeout, on request, and after 20 counted attempts. An attempt is a `/v1/pair/start` that is
//! about to return a `confirm_v` (the reply that lets a client test a guess): it is counted and
//! the count persisted before that reply. The count survives restarts; after the cap only a
//! local root request opens the window again (and starts a new count).
//!
//! Pure: the core owns it, persists `Persisted` in state.json, and feeds it the time.

use serde::{Deserialize, Serialize};

/// Counted attempts per window.
pub const ATTEMPT_CAP: u32 = 20;
/// The longest window a request may open (seconds).
pub const MAX_OPEN_SECS: i64 = 900;

/// What survives a restart (state.json's `onboarding`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Persisted {
    /// Attempts counted since the window was last opened by a person (or since success).
    pub attempts_used: u32,
    /// A person closed the window (`iotctl onboarding close`) while the gateway needed a
    /// claim: it stays closed, across restarts, until a person opens it again or the gateway
    /// no longer needs a claim.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed_by_request: bool,
}

/// Why the window is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    /// The gateway waits for a claim, or its own claim failed for good: open while that lasts.
    Automatic,
    /// A local root request, until the given time.
    Requested,
}

/// Why the window closed, for the log and the D-Bus signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    Timeout,
    Requested,
    Cap,
    Success,
    /// The gateway no longer needs a claim (it has an identity, or a claim of its own).
    NotNeeded,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Timeout => "timeout",
            Closed::Requested => "requested",
            Closed::Cap => "attempts",
            Closed::Success => "success",
            Closed::NotNeeded => "not-needed",
        }
    }
}

/// Why a request to open was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("an onboarding window lasts 1 to {MAX_OPEN_SECS} seconds; {0} is not allowed")]
    Duration(i64),
}

/// Why an attempt was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    #[error("the onboarding window is closed")]
    Closed,
    #[error(
        "the onboarding window closed after {ATTEMPT_CAP} attempts; a person at the gateway must open it again (iotctl onboarding open)"
    )]
    Capped,
}

/// The window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub persisted: Persisted,
    open: Option<Opener>,
    /// When a requested window closes (Unix seconds).
    closes_at: Option<i64>,
}

/// What changed, for the caller to persist, log and announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Opened(Opener),
    Closed(Closed),
}

impl Window {
    pub fn new(persisted: Persisted) -> Self {
        Self {
            persisted,
            open: None,
            closes_at: None,
        }
    }

    pub fn capped(&self) -> bool {
        self.persisted.attempts_used >= ATTEMPT_CAP
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    pub fn closes_at(&self) -> Option<i64> {
        self.closes_at
    }

    pub fn attempts_left(&self) -> u32 {
        ATTEMPT_CAP.saturating_sub(self.persisted.attempts_used)
    }

    /// The gateway needs a claim (`needed`) or not: opens an automatic window (unless the cap
    /// was reached or a person closed it) or closes one. A requested window is left alone.
    pub fn need_claim(&mut self, needed: bool) -> Option<Change> {
        if !needed {
            // The next time a claim is needed is a new occasion for an installer.
            self.persisted.closed_by_request = false;
        }
        match (needed, self.open) {
            (true, None) if !self.capped() && !self.persisted.closed_by_request => {
                self.open = Some(Opener::Automatic);
                self.closes_at = None;
                Some(Change::Opened(Opener::Automatic))
            }
            (false, Some(Opener::Automatic)) => Some(self.close(Closed::NotNeeded)),
            _ => None,
        }
    }

    /// A local root request: opens (or extends) the window for `secs`, with a new count.
    pub fn open_for(&mut self, secs: i64, now: i64) -> Result<Change, OpenError> {
        if !(1..=MAX_OPEN_SECS).contains(&secs) {
            return Err(OpenError::Duration(secs));
        }
        self.persisted.attempts_used = 0;
        self.persisted.closed_by_request = false;
        self.open = Some(Opener::Requested);
        self.closes_at = Some(now.saturating_add(secs));
        Ok(Change::Opened(Opener::Requested))
    }

    /// Closes the window; says so even when it was closed (a request is answered either way).
    pub fn close(&mut self, why: Closed) -> Change {
        self.open = None;
        self.closes_at = None;
        match why {
            Closed::Success => self.persisted.attempts_used = 0,
            Closed::Requested => self.persisted.closed_by_request = true,
            Closed::Timeout | Closed::Cap | Closed::NotNeeded => {}
        }
        Change::Closed(why)
    }

    /// Closes a requested window whose time is up.
    pub fn tick(&mut self, now: i64) -> Option<Change> {
        match self.closes_at {
            Some(at) if now >= at => Some(self.close(Closed::Timeout)),
            _ => None,
        }
    }

    /// Counts an attempt (the caller persists `persisted` before replying); returns the
    /// attempts left, and whether the window closed on the cap (the session that used the last
    /// attempt may still finish).
    pub fn count_attempt(&mut self, now: i64) -> Result<(u32, Option<Change>), AttemptError> {
        self.tick(now);
        if self.open.is_none() {
            return Err(if self.capped() {
                AttemptError::Capped
            } else {
                AttemptError::Closed
            });
        }
        self.persisted.attempts_used = self.persisted.attempts_used.saturating_add(1);
        let closed = self.capped().then(|| self.close(Closed::Cap));
        Ok((self.attempts_left(), closed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_automatic_window_opens_while_a_claim_is_needed_and_closes_after_the_cap() {
        let mut w = Window::new(Persisted::default());
        assert_eq!(w.need_claim(true), Some(Change::Opened(Opener::Automatic)));
        assert_eq!(w.need_claim(true), None, "already open");
        for left in (1..ATTEMPT_CAP).rev() {
            assert_eq!(w.count_attempt(0), Ok((left, None)));
        }
        assert_eq!(
            w.count_attempt(0),
            Ok((0, Some(Change::Closed(Closed::Cap)))),
            "the 20th attempt is still answered"
        );
        assert_eq!(w.count_attempt(0), Err(AttemptError::Capped));
        // Capped: only a person opens it again, and the count starts over.
        assert_eq!(w.need_claim(true), None);
        assert!(!w.is_open());
        assert_eq!(w.open_for(300, 0), Ok(Change::Opened(Opener::Requested)));
        assert_eq!(w.attempts_left(), ATTEMPT_CAP);
    }

    #[test]
    fn the_count_survives_a_restart() {
        let mut w = Window::new(Persisted::default());
        w.need_claim(true);
        for _ in 0..ATTEMPT_CAP {
            w.count_attempt(0).unwrap();
        }
        let mut restarted = Window::new(w.persisted.clone());
        assert_eq!(
            restarted.need_claim(true),
            None,
            "stays closed after a restart"
        );
        assert_eq!(restarted.count_attempt(0), Err(AttemptError::Capped));

        let mut w = Window::new(Persisted::default());
        w.need_claim(true);
        w.count_attempt(0).unwrap();
        let mut restarted = Window::new(w.persisted.clone());
        restarted.need_claim(true);
        assert_eq!(restarted.attempts_left(), ATTEMPT_CAP - 1);
    }

    #[test]
    fn a_requested_window_is_bounded_and_times_out() {
        let mut w = Window::new(Persisted::default());
        for secs in [0, -5, MAX_OPEN_SECS + 1] {
            assert_eq!(w.open_for(secs, 100), Err(OpenError::Duration(secs)));
        }
        assert!(
            OpenError::Duration(0)
                .to_string()
                .contains("1 to 900 seconds")
        );
        w.open_for(MAX_OPEN_SECS, 100).unwrap();
        assert_eq!(w.closes_at(), Some(1000));
        assert_eq!(w.tick(999), None);
        assert_eq!(
            w.need_claim(false),
            None,
            "a requested window is left alone"
        );
        assert_eq!(w.tick(1000), Some(Change::Closed(Closed::Timeout)));
        assert_eq!(w.count_attempt(1000), Err(AttemptError::Closed));
    }

    #[test]
    fn success_closes_and_starts_a_new_count() {
        let mut w = Window::new(Persisted::default());
        w.need_claim(true);
        w.count_attempt(0).unwrap();
        assert_eq!(w.close(Closed::Success), Change::Closed(Closed::Success));
        assert_eq!(w.persisted.attempts_used, 0);
        assert_eq!(w.need_claim(false), None);
        // A provisioned gateway closes an automatic window.
        w.need_claim(true);
        assert_eq!(w.need_claim(false), Some(Change::Closed(Closed::NotNeeded)));
    }

    #[test]
    fn a_window_a_person_closed_stays_closed_until_opened_or_no_longer_needed() {
        let mut w = Window::new(Persisted::default());
        w.need_claim(true);
        assert_eq!(
            w.close(Closed::Requested),
            Change::Closed(Closed::Requested)
        );
        assert_eq!(w.need_claim(true), None, "not reopened by itself");
        let mut restarted = Window::new(w.persisted.clone());
        assert_eq!(restarted.need_claim(true), None, "nor after a restart");
        assert_eq!(
            restarted.count_attempt(0),
            Err(AttemptError::Closed),
            "pairing is refused"
        );
        // A person opens it again.
        restarted.open_for(60, 0).unwrap();
        assert!(!restarted.persisted.closed_by_request);
        // Or the gateway stops needing a claim: the next need opens a window again.
        w.need_claim(false);
        assert_eq!(w.need_claim(true), Some(Change::Opened(Opener::Automatic)));
        // The flag is not written when unset, so older state files read the same.
        let json = serde_json::to_string(&Persisted::default()).unwrap();
        assert_eq!(json, r#"{"attemptsUsed":0}"#);
    }
}
