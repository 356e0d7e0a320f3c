//! `iotctl check` with `key.backend = "tpm"`, against swtpm: the TPM is opened through the
//! configured TCTI, and the device key is checked against its certificate inside the TPM.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Dir, check_line, closed_port, describe, save_provisioned, stdout};
use iotd::keys::KeyBackend as _;
use iotd::keys::tpm::TpmBackend;
use iotd::store::Store;
use iotd_testkit::swtpm::Swtpm;

/// A P-256 public key as rcgen needs it to certify a key it does not hold.
struct Point(Vec<u8>);

impl rcgen::PublicKeyData for Point {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn tpm_config(dir: &Dir, tcti: &str) {
    let text = format!(
        "[cloud]\nendpoint = \"127.0.0.1\"\nport = {}\n\n[provisioning]\ntemplate = \"gateway\"\n\n[key]\nbackend = \"tpm\"\ntcti = \"{tcti}\"\n\n[state]\ndir = \"{}\"\n",
        closed_port(),
        dir.state_dir().display()
    );
    std::fs::write(dir.config_path(), text).unwrap();
}

#[test]
fn tpm_key_is_checked_against_its_certificate() {
    let tpm = Swtpm::start();
    let dir = Dir::new();
    dir.clock(true);
    tpm_config(&dir, tpm.tcti());
    let spki = {
        // Dropped before iotctl runs: swtpm serves one client at a time.
        let backend = TpmBackend::open(tpm.tcti(), &dir.state_dir(), None).unwrap();
        backend.create(1).unwrap().public_key_spki()
    };
    let point = iotd::keys::file::p256_point(&spki).unwrap().to_vec();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let cert = params.signed_by(&Point(point), &issuer).unwrap();
    let store = Store::open(&dir.state_dir()).unwrap();
    store.write_certificate(1, &cert.pem()).unwrap();
    save_provisioned(&store, "gw-tpm", 4_000_000_000);

    let out = dir.run(&[
        "check",
        "--dont-run",
        "endpoint-tcp",
        "--dont-run",
        "endpoint-tls",
    ]);
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        check_line(&report, "tpm-reachable").starts_with('√'),
        "{report}"
    );
    assert!(
        report.contains(&format!("opened the TPM through {}", tpm.tcti())),
        "{report}"
    );
    assert!(
        check_line(&report, "key-certificate-match").starts_with('√'),
        "{report}"
    );
    assert!(report.contains("certifies the key (tpm "), "{report}");
}

#[test]
fn unreachable_tpm_fails() {
    let dir = Dir::new();
    dir.clock(true);
    let port = closed_port();
    tpm_config(&dir, &format!("swtpm:host=127.0.0.1,port={port}"));
    let out = dir.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report = stdout(&out);
    assert!(
        check_line(&report, "tpm-reachable").starts_with('×'),
        "{report}"
    );
}
