//! A small fleet under quotas tight enough to bite: every gateway must end up provisioned with
//! exactly one certificate, none may give up, and the quotas must really have refused requests
//! (otherwise the run proves nothing about retrying). Timings are `make bench`'s business.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fleet_sim::{Fleet, Quotas};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_fleet_is_provisioned_and_reconnects_after_a_power_cut() {
    let n = 40;
    // Every claim CONNECT passes, so that the 40 CSRs arrive together; quotas low enough that
    // even a slow machine sends more than 5 CSRs in a second.
    let quotas = Quotas {
        register_thing: 4,
        create_certificate_from_csr: 5,
        connect: 1000,
    };
    let mut fleet = Fleet::new(n, quotas, "").await.unwrap();
    let limit = Duration::from_secs(90);

    let first = fleet
        .power_on("provisioning", quotas.provisioning_ideal(n), limit)
        .await
        .unwrap();
    assert_eq!(first.gave_up, Vec::<(String, String)>::new());
    assert_eq!(first.not_done, Vec::<(String, String)>::new());
    assert_eq!(first.times.len(), n);
    fleet.check_registry().unwrap();
    // 40 CSRs at once against 5/s.
    assert!(
        first
            .throttled
            .get("CreateCertificateFromCsr")
            .is_some_and(|c| *c > 0),
        "{first:?}"
    );
    assert!(
        first.retries.get("throttled").is_some_and(|c| *c > 0),
        "{first:?}"
    );

    // The power comes back at once: a gateway that connected less than a second ago is refused
    // by the one-CONNECT-per-second rule too, which the agents must ride out like the rest.
    // 40 CONNECTs at once against 10/s.
    let quotas = Quotas {
        connect: 10,
        ..quotas
    };
    fleet.set_quotas(quotas);
    let second = fleet
        .power_on("reconnect", quotas.reconnect_ideal(n), limit)
        .await
        .unwrap();
    assert_eq!(second.gave_up, Vec::<(String, String)>::new());
    assert_eq!(second.not_done, Vec::<(String, String)>::new());
    assert_eq!(second.times.len(), n);
    assert!(
        second.throttled.get("Connect").is_some_and(|c| *c > 0),
        "{second:?}"
    );
    // Reconnecting provisions nothing new.
    assert!(
        !second.throttled.contains_key("RegisterThing"),
        "{second:?}"
    );
    fleet.check_registry().unwrap();
    fleet.stop().await;
}
