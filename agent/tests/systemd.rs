//! systemd integration through a private NOTIFY_SOCKET: READY=1, STATUS= per transition,
//! WATCHDOG=1 only while the state-owning loop makes progress (a test hook stalls it), and
//! STOPPING=1 with a clean exit within 5 s of SIGTERM.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use iotd_testkit::*;

#[tokio::test]
async fn ready_status_watchdog_and_stopping() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "0060");
    // A 200 ms watchdog: iotd pings every 100 ms while its loop runs.
    let mut iotd = Iotd::start_env(
        &iotd_binary(),
        dir.path(),
        &conf,
        &[("WATCHDOG_USEC", "200000")],
    )
    .await;
    iotd.wait_status("READY=1").await;
    iotd.wait_status("Provisioned as gw-0060; certificate")
        .await;
    let mut pings = 0;
    while pings < 5 {
        let (_, line) = iotd
            .next_line(Duration::from_secs(2))
            .await
            .expect("watchdog pings keep coming");
        if line == "WATCHDOG=1" {
            pings += 1;
        }
    }
    let status = iotd.terminate().await;
    assert!(status.success(), "{status:?}");
    iotd.wait_status("STOPPING=1").await;
}

#[tokio::test]
async fn watchdog_pings_stop_while_the_core_loop_is_stalled() {
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = config(&cloud, &dir.path().join("state"), "0061");
    let env = [("WATCHDOG_USEC", "200000"), ("IOTD_TEST_STALL_SECS", "2")];
    let mut iotd = Iotd::start_env(&iotd_binary(), dir.path(), &conf, &env).await;
    // Follow the pings until provisioning is done; the stall comes right after the first step,
    // so READY=1 (sent before the loop starts) is where the measurement begins.
    let mut last_ping: Option<tokio::time::Instant> = None;
    let mut longest_gap = Duration::ZERO;
    let mut pings_after_gap = 0;
    let mut provisioned = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(provisioned && pings_after_gap >= 3) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "longest gap {longest_gap:?}, seen {:?}",
            iotd.seen
        );
        let (at, line) = iotd
            .next_line(Duration::from_secs(10))
            .await
            .expect("notifications keep coming");
        if line == "READY=1" || line == "WATCHDOG=1" {
            if let Some(prev) = last_ping {
                longest_gap = longest_gap.max(at - prev);
            }
            if line == "WATCHDOG=1" && longest_gap >= Duration::from_millis(1500) {
                pings_after_gap += 1;
            }
            last_ping = Some(at);
        }
        provisioned |= line.contains("Provisioned as gw-0061; certificate");
    }
    assert!(
        longest_gap >= Duration::from_millis(1500),
        "no ping while stalled for 2 s: longest gap {longest_gap:?}"
    );
    assert!(
        longest_gap < Duration::from_secs(4),
        "pings resumed after the stall: gap {longest_gap:?}"
    );
}
