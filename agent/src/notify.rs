//! systemd notifications: READY=1 once the agent is up, a one-line STATUS= on every
//! transition, STOPPING=1 on shutdown. A no-op when not started by systemd (no NOTIFY_SOCKET).

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    // Failing to notify is not worth stopping for; systemd's own timeouts will say so.
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("notifying systemd: {e}");
    }
}

/// READY=1: the agent is up (bus name owned, listeners bound).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("Stopping")]);
}

/// The watchdog period: half of `WATCHDOG_USEC`, as systemd recommends; `None` without one.
pub fn watchdog_interval() -> Option<tokio::time::Interval> {
    let period = sd_notify::watchdog_enabled().filter(|d| !d.is_zero())?;
    let mut interval = tokio::time::interval(period / 2);
    // After a stall, don't fire a burst of catch-up pings: one ping per period of progress.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(interval)
}

/// Waits for the next watchdog tick (forever without a watchdog).
pub async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Test hook (feature `test-hooks`, never in release builds): blocks the state-owning task's
/// thread once for `IOTD_TEST_STALL_SECS` seconds, so that a test can see the watchdog pings stop.
#[cfg(feature = "test-hooks")]
pub fn test_stall_once() {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    if let Some(secs) = std::env::var("IOTD_TEST_STALL_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        tracing::warn!(secs, "test hook: stalling the core loop");
        std::thread::sleep(std::time::Duration::from_secs(secs));
    }
}
