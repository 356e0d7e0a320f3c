//! When a certificate is due for rotation: pure arithmetic on its validity and the
//! `[rotation]` policy, so that the core, `iotctl status` and the tests agree on one time.
//!
//! Times are Unix seconds (`i64`). Certificates read from the outside can hold any validity —
//! AWS's default certificates end in 2049, a broken one may end before it begins — so every
//! step saturates instead of overflowing, and the result always lies within the validity.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::{RotationSettings, Span};

/// The longest spread a percentage jitter gives: beyond a week, spreading a fleet's rotations
/// further only leaves gateways closer to expiry without easing the load on AWS any more.
const MAX_PERCENT_SPREAD_SECS: i64 = 7 * 86_400;

/// When the certificate (validity not_before..not_after, Unix seconds) of `thing_name` is due
/// for rotation under `policy`: the earlier of notAfter − renew_before and notBefore + max_age,
/// moved earlier by a per-device spread (jitter) derived stably from the thing name (SHA-256 of
/// it; the same gateway always gets the same offset, different gateways spread evenly), never
/// before not_before.
pub fn due(not_before: i64, not_after: i64, thing_name: &str, policy: &RotationSettings) -> i64 {
    let undelayed = undelayed_due(not_before, not_after, policy);
    // Never negative: `undelayed_due` is never before not_before.
    let room = undelayed.saturating_sub(not_before);
    let spread = match policy.jitter {
        Span::Percent(percent) => share(room, percent).min(MAX_PERCENT_SPREAD_SECS),
        Span::Duration(duration) => seconds(duration).min(room),
    };
    // spread + 1 fits: spread is at most i64::MAX.
    let modulus = spread.unsigned_abs() + 1;
    let offset = i64::try_from(name_hash(thing_name) % modulus).unwrap_or(spread);
    undelayed.saturating_sub(offset).max(not_before)
}

/// What the schedule is due to, for messages: `"expiry"` when the time before notAfter comes
/// first ("20% of the certificate's lifetime before it expires"), `"age"` when `max_age` does
/// ("the certificate is older than 365 days").
pub fn reason(not_before: i64, not_after: i64, policy: &RotationSettings) -> &'static str {
    match by_age(not_before, policy) {
        Some(age) if age < by_expiry(not_before, not_after, policy) => "age",
        _ => "expiry",
    }
}

/// The due time before the jitter: the earlier of the two rules, within the validity.
fn undelayed_due(not_before: i64, not_after: i64, policy: &RotationSettings) -> i64 {
    let expiry = by_expiry(not_before, not_after, policy);
    by_age(not_before, policy).map_or(expiry, |age| age.min(expiry))
}

/// notAfter − renew_before, but not before notBefore (a renew_before longer than the lifetime,
/// or a certificate that ends before it begins).
fn by_expiry(not_before: i64, not_after: i64, policy: &RotationSettings) -> i64 {
    let lifetime = not_after.saturating_sub(not_before).max(0);
    let before = match policy.renew_before {
        Span::Percent(percent) => share(lifetime, percent),
        Span::Duration(duration) => seconds(duration),
    };
    not_after.saturating_sub(before).max(not_before)
}

/// notBefore + max_age, when there is an age limit.
fn by_age(not_before: i64, policy: &RotationSettings) -> Option<i64> {
    policy
        .max_age
        .map(|age| not_before.saturating_add(seconds(age)))
}

/// `percent` of a non-negative `length`, rounded down; in i128 so that the product cannot
/// overflow, and never more than `length` because percentages are at most 100.
fn share(length: i64, percent: u8) -> i64 {
    let part = i128::from(length.max(0)) * i128::from(percent.min(100)) / 100;
    i64::try_from(part).unwrap_or(length)
}

fn seconds(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// The first 8 bytes of SHA-256(thing name): the same for a gateway every time, and uniform
/// across a fleet whatever its naming scheme (serials differ only in their last digits).
fn name_hash(thing_name: &str) -> u64 {
    let digest = Sha256::digest(thing_name.as_bytes());
    let mut first = [0_u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const DAY: i64 = 86_400;
    /// AWS IoT's default device certificates: from issue to 2049-12-31T23:59:59Z.
    const AWS_NOT_AFTER: i64 = 2_524_607_999;
    /// 2026-01-01T00:00:00Z.
    const ISSUED: i64 = 1_767_225_600;

    fn policy() -> RotationSettings {
        RotationSettings {
            renew_before: Span::Percent(20),
            max_age: None,
            jitter: Span::Percent(10),
            retry_interval: Duration::from_secs(3600),
            template: None,
            report_topic: crate::config::DEFAULT_ROTATION_REPORT_TOPIC.to_owned(),
            grace_period: Duration::from_secs(7 * 86_400),
            trust_clock: false,
        }
    }

    fn no_jitter() -> RotationSettings {
        RotationSettings {
            jitter: Span::Duration(Duration::ZERO),
            ..policy()
        }
    }

    fn days(n: u64) -> Duration {
        Duration::from_secs(n * 86_400)
    }

    #[test]
    fn the_aws_default_certificate_is_renewed_at_80_percent_of_its_lifetime_less_the_jitter() {
        let lifetime = AWS_NOT_AFTER - ISSUED;
        let undelayed = AWS_NOT_AFTER - lifetime / 5;
        assert_eq!(due(ISSUED, AWS_NOT_AFTER, "gw-1", &no_jitter()), undelayed);
        // 10% of 19 years is far more than a week: the spread is capped at 7 days.
        let at = due(ISSUED, AWS_NOT_AFTER, "gw-1", &policy());
        assert!(
            (undelayed - 7 * DAY..=undelayed).contains(&at),
            "{at} vs {undelayed}"
        );
        assert_eq!(reason(ISSUED, AWS_NOT_AFTER, &policy()), "expiry");
    }

    #[test]
    fn a_two_minute_certificate_at_50_percent_without_jitter_is_due_at_its_midpoint() {
        let policy = RotationSettings {
            renew_before: Span::Percent(50),
            ..no_jitter()
        };
        assert_eq!(due(ISSUED, ISSUED + 120, "gw-1", &policy), ISSUED + 60);
        let policy = RotationSettings {
            jitter: Span::Percent(0),
            ..policy
        };
        assert_eq!(due(ISSUED, ISSUED + 120, "gw-1", &policy), ISSUED + 60);
    }

    #[test]
    fn the_jitter_stays_within_its_spread_and_is_the_same_for_the_same_name() {
        let not_after = ISSUED + 365 * DAY;
        let undelayed = not_after - 73 * DAY;
        let ten_percent = RotationSettings {
            renew_before: Span::Percent(20),
            jitter: Span::Percent(10),
            ..policy()
        };
        let six_hours = RotationSettings {
            jitter: Span::Duration(Duration::from_secs(6 * 3600)),
            ..policy()
        };
        // 10% of the 292 days before the due time is capped at a week.
        for (policy, spread) in [(&ten_percent, 7 * DAY), (&six_hours, 6 * 3600)] {
            let mut seen = BTreeSet::new();
            for n in 0..1000 {
                let name = format!("gw-{n:05}");
                let at = due(ISSUED, not_after, &name, policy);
                assert!(
                    (undelayed - spread..=undelayed).contains(&at),
                    "{name}: {at}"
                );
                assert_eq!(at, due(ISSUED, not_after, &name, policy), "{name}");
                seen.insert(at);
            }
            // Names that differ in one digit land at different times...
            assert!(seen.len() > 950, "only {} different times", seen.len());
            // ...spread over the whole window, not bunched at one end.
            let (first, last) = (seen.first().unwrap(), seen.last().unwrap());
            assert!(first - (undelayed - spread) < spread / 50, "{first}");
            assert!(undelayed - last < spread / 50, "{last}");
            let below_middle = seen.iter().filter(|t| **t < undelayed - spread / 2).count();
            assert!((400..600).contains(&below_middle), "{below_middle}");
        }
    }

    #[test]
    fn different_names_get_different_offsets() {
        let not_after = ISSUED + 365 * DAY;
        let a = due(ISSUED, not_after, "gw-a", &policy());
        let b = due(ISSUED, not_after, "gw-b", &policy());
        assert_ne!(a, b);
    }

    #[test]
    fn a_jitter_duration_longer_than_the_time_to_the_due_time_is_cut_to_it() {
        let policy = RotationSettings {
            renew_before: Span::Percent(50),
            jitter: Span::Duration(days(365)),
            ..policy()
        };
        for n in 0..100 {
            let at = due(ISSUED, ISSUED + 120, &format!("gw-{n}"), &policy);
            assert!((ISSUED..=ISSUED + 60).contains(&at), "{at}");
        }
    }

    #[test]
    fn an_age_limit_earlier_than_the_expiry_rule_wins() {
        let aged = RotationSettings {
            max_age: Some(days(365)),
            ..no_jitter()
        };
        assert_eq!(
            due(ISSUED, AWS_NOT_AFTER, "gw-1", &aged),
            ISSUED + 365 * DAY
        );
        assert_eq!(reason(ISSUED, AWS_NOT_AFTER, &aged), "age");
        // A one-year certificate reaches 80% of its life before it is a year old.
        let not_after = ISSUED + 365 * DAY;
        assert_eq!(due(ISSUED, not_after, "gw-1", &aged), not_after - 73 * DAY);
        assert_eq!(reason(ISSUED, not_after, &aged), "expiry");
        // The jitter applies to whichever rule comes first.
        let at = due(
            ISSUED,
            AWS_NOT_AFTER,
            "gw-1",
            &RotationSettings {
                jitter: Span::Duration(days(1)),
                ..aged
            },
        );
        assert!((ISSUED + 364 * DAY..=ISSUED + 365 * DAY).contains(&at));
    }

    #[test]
    fn a_renew_before_duration_longer_than_the_lifetime_makes_it_due_at_once() {
        let policy = RotationSettings {
            renew_before: Span::Duration(days(30)),
            ..policy()
        };
        assert_eq!(due(ISSUED, ISSUED + 7 * DAY, "gw-1", &policy), ISSUED);
        assert_eq!(due(ISSUED, ISSUED + 30 * DAY, "gw-1", &policy), ISSUED);
        let policy = RotationSettings {
            jitter: Span::Duration(Duration::ZERO),
            ..policy
        };
        assert_eq!(
            due(ISSUED, ISSUED + 31 * DAY, "gw-1", &policy),
            ISSUED + DAY
        );
    }

    #[test]
    fn extreme_validities_do_not_overflow() {
        let long = RotationSettings {
            renew_before: Span::Duration(Duration::from_secs(u64::MAX)),
            max_age: Some(Duration::from_secs(u64::MAX)),
            jitter: Span::Duration(Duration::from_secs(u64::MAX)),
            ..policy()
        };
        for policy in [policy(), no_jitter(), long] {
            // From the epoch to 2049.
            let at = due(0, AWS_NOT_AFTER, "gw-1", &policy);
            assert!((0..=AWS_NOT_AFTER).contains(&at), "{at}");
            // The whole range of i64.
            // Tests are built with overflow checks: an overflowing step would panic.
            let _ = due(i64::MIN, i64::MAX, "gw-1", &policy);
            // notAfter before notBefore.
            assert_eq!(due(ISSUED, ISSUED - DAY, "gw-1", &policy), ISSUED);
            assert_eq!(due(i64::MAX, i64::MIN, "gw-1", &policy), i64::MAX);
            // No lifetime at all.
            assert_eq!(due(ISSUED, ISSUED, "gw-1", &policy), ISSUED);
        }
        assert_eq!(
            due(i64::MIN, i64::MAX, "gw-1", &no_jitter()),
            i64::MAX - share(i64::MAX, 20)
        );
    }

    #[test]
    fn the_hash_is_the_first_eight_bytes_of_sha256() {
        // SHA-256("") = e3b0c442 98fc1c14 …
        assert_eq!(name_hash(""), 0xe3b0_c442_98fc_1c14);
    }

    fn span() -> impl Strategy<Value = Span> {
        prop_oneof![
            (0_u8..=100).prop_map(Span::Percent),
            any::<u64>().prop_map(|s| Span::Duration(Duration::from_secs(s))),
            (0_u64..=400 * 86_400).prop_map(|s| Span::Duration(Duration::from_secs(s))),
        ]
    }

    proptest! {
        #[test]
        fn due_lies_within_the_validity(
            not_before in any::<i64>(),
            not_after in prop_oneof![any::<i64>(), (0_i64..=4_102_444_800)],
            name in ".{0,40}",
            renew_before in span(),
            jitter in span(),
            max_age in proptest::option::of(any::<u64>().prop_map(Duration::from_secs)),
        ) {
            let policy = RotationSettings { renew_before, jitter, max_age, ..policy() };
            let at = due(not_before, not_after, &name, &policy);
            prop_assert!(at >= not_before, "{} < {}", at, not_before);
            prop_assert!(at <= not_before.max(not_after), "{} > {}", at, not_after);
            prop_assert_eq!(at, due(not_before, not_after, &name, &policy));
        }
    }
}
