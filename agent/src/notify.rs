//! systemd notifications: READY=1 once the agent is up, a one-line STATUS= on every
//! transition, STOPPING=1 on shutdown. A no-op when not started by systemd (no NOTIFY_SOCKET).

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    // Failing to notify is not worth stopping for; systemd's own timeouts will say so.
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("notifying systemd: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("Stopping")]);
}
