//! Errors a person can act on. Every failure the agent meets — a rejected reply, a TLS alert,
//! a refused CONNECT, a missing file — becomes an `AgentError` whose message names the cause
//! and the remedy, with a stable code (for D-Bus and `iotctl --json`) and a retry class that
//! decides what the state machine does next.

use std::time::Duration;

/// Stable error codes; `as_str` is what scripts and D-Bus see. They are part of the contract
/// with iotctl, so they live in `iotd-api`.
pub use iotd_api::ErrorCode;

/// What the state machine does after the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retry the step after a jittered, growing delay; drop the connection first.
    Reconnect,
    /// Retry the request on the same connection after a jittered, growing delay.
    SameConnection,
    /// The ownership token is gone: go back to the CSR (same key) at once.
    RestartFromCsr,
    /// The device key is gone for good: provision a new identity with a new key.
    NewIdentity,
    /// Retrying cannot help: stop, keep the state, show the cause.
    Permanent,
}

/// An error with its cause and remedy in one message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub code: ErrorCode,
    pub message: String,
    pub retry: Retry,
}

impl AgentError {
    pub fn new(code: ErrorCode, retry: Retry, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry,
        }
    }
    pub fn permanent(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(code, Retry::Permanent, message)
    }
    pub fn is_permanent(&self) -> bool {
        self.retry == Retry::Permanent
    }
}

/// Full-jitter exponential backoff (AWS architecture blog's "full jitter") above a floor: each
/// delay is `floor` plus a uniform share of `min(cap, base * 2^attempt)`, so that a fleet that
/// failed together does not retry together, not even the first time (a broker restart drops
/// every gateway at once). The floor keeps CONNECTs of one client id at most one per second.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
    floor: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            attempt: 0,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            floor: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    /// The next delay; grows with each call until `reset`.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_within(self.cap)
    }

    /// The next delay with its random part at most `cap` (and the backoff's own cap): for
    /// throttling, where the service is busy rather than broken, a short cap keeps a fleet's
    /// last gateways from sleeping through the capacity that frees up as the others finish.
    pub fn next_delay_within(&mut self, cap: Duration) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap)
            .min(cap);
        self.attempt = self.attempt.saturating_add(1);
        let span = ceiling.as_millis();
        let jitter = if span == 0 {
            0
        } else {
            rand::random::<u64>() % u64::try_from(span + 1).unwrap_or(u64::MAX)
        };
        self.floor + Duration::from_millis(jitter)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds_and_resets() {
        let mut b = Backoff::default();
        let mut longest = Duration::ZERO;
        for attempt in 0..30u32 {
            let d = b.next_delay();
            let span = Duration::from_secs(1u64 << attempt.min(20)).min(Duration::from_secs(300));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(1) + span,
                "{attempt}: {d:?}"
            );
            longest = longest.max(d);
        }
        assert!(longest > Duration::from_secs(30), "it grows: {longest:?}");
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert!(b.next_delay() <= Duration::from_secs(2));
    }

    #[test]
    fn first_retries_are_spread_over_a_second() {
        let firsts: std::collections::BTreeSet<u128> = (0..50)
            .map(|_| Backoff::default().next_delay().as_millis())
            .collect();
        assert!(firsts.iter().all(|ms| (1000..=2000).contains(ms)));
        assert!(firsts.len() > 10, "first delays should differ: {firsts:?}");
    }

    #[test]
    fn throttle_cap_bounds_the_random_part() {
        let mut b = Backoff::default();
        for _ in 0..30 {
            let d = b.next_delay_within(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
        // The attempts still count, so a later non-throttle error backs off from there.
        assert_eq!(b.attempts(), 30);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::default();
            b.next_delay();
            b.next_delay();
            seen.insert(b.next_delay().as_millis());
        }
        assert!(seen.len() > 10, "delays should differ: {seen:?}");
    }
}
