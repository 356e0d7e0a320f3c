//! `iotctl support-bundle`: what it collects, and what it must never contain.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Dir, closed_port, describe};
use iotd::store::{ClaimOrigin, Durability, Operation, State, Step, Store};

const TOKEN: &str = "ownership-token-3b1f9c0d7e6a5b4c";
const CLAIM_KEY_BODY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSECRETSECRETSECRET";
const PARAMETER_TOKEN: &str = "param-token-9f8e7d6c";

#[test]
fn bundle_holds_the_facts_and_no_secrets() {
    let dir = Dir::new();
    dir.clock(true);
    // A claim key whose contents must never appear, at a path that must be redacted too.
    let claim_key = dir.path().join("claim-secret-name.key");
    std::fs::write(
        &claim_key,
        format!("-----BEGIN PRIVATE KEY-----\n{CLAIM_KEY_BODY}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    let claim_cert = dir.path().join("claim.pem");
    std::fs::write(&claim_cert, "not a certificate\n").unwrap();
    dir.write_config(
        "127.0.0.1",
        closed_port(),
        &format!(
            "claim_certificate = \"{}\"\nclaim_key = \"{}\"\n\n[provisioning.parameters]\nSerialNumber = \"SN-0001\"\nApiToken = \"{PARAMETER_TOKEN}\"",
            claim_cert.display(),
            claim_key.display()
        ),
        "",
    );
    // A state that holds an ownership token.
    let store = Store::open(&dir.state_dir()).unwrap();
    store
        .save(
            &State {
                operation: Some(Operation::Provisioning {
                    claim: ClaimOrigin::File,
                    step: Some(Step::CertificateIssued {
                        endpoint: None,
                        generation: 1,
                        certificate_id: "c0ffee".into(),
                        certificate_pem: String::new(),
                        ownership_token: TOKEN.into(),
                        issued_at: 1_700_000_000,
                    }),
                }),
                last_generation: 1,
                ..State::default()
            },
            Durability::Durable,
        )
        .unwrap();

    let output = dir.path().join("bundle.txt");
    let out = dir.run(&["support-bundle", "--output", output.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let bundle = std::fs::read_to_string(&output).unwrap();

    for secret in [TOKEN, CLAIM_KEY_BODY, PARAMETER_TOKEN, "claim-secret-name"] {
        assert!(
            !bundle.contains(secret),
            "{secret} is in the bundle:\n{bundle}"
        );
    }
    for fact in [
        "===== versions =====",
        &format!("iotctl {}", env!("CARGO_PKG_VERSION")),
        "iotd is not running",
        "SerialNumber = \"SN-0001\"",
        "claim_key = \"<redacted>\"",
        "\"ownershipToken\": \"<redacted>\"",
        "\"name\": \"certificate-issued\"",
        "× endpoint-tcp",
        "===== journal",
    ] {
        assert!(bundle.contains(fact), "{fact} is missing:\n{bundle}");
    }
    let mode = std::fs::metadata(&output).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn bundle_to_standard_output() {
    let dir = Dir::new();
    dir.clock(true);
    dir.write_config("127.0.0.1", closed_port(), "", "");
    let out = dir.run(&["support-bundle", "--output", "-"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(common::stdout(&out).starts_with("iotd support bundle"));
}
