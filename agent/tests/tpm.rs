//! iotd with its key in a TPM (a private swtpm per test) against fake-iot-core: provisioning
//! with the TPM key, no private key material on disk or in iotd's open files, a TPM cleared
//! between runs, and SIGKILL mid-provisioning.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use iotd_testkit::swtpm::Swtpm;
use iotd_testkit::*;
use serde_json::json;

fn tpm_config(cloud: &Cloud, dir: &Path, serial: &str, tpm: &Swtpm) -> String {
    format!(
        "{}\n[key]\nbackend = \"tpm\"\ntcti = \"{}\"\n",
        config(cloud, &dir.join("state"), serial),
        tpm.tcti()
    )
}

fn provisioned_certificate(iotd: &Iotd) -> String {
    let state = iotd.state();
    assert_eq!(state["operation"], json!(null), "{state}");
    state["identity"]["certificateId"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The DER SubjectPublicKeyInfo of a PEM certificate.
fn certificate_spki(pem: &str) -> Vec<u8> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = block.parse_x509().unwrap();
    cert.public_key().raw.to_vec()
}

/// Every regular file below `dir`.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn provisions_with_a_key_that_never_leaves_the_tpm() {
    let tpm = Swtpm::start();
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut iotd = Iotd::start(
        &iotd_binary(),
        dir.path(),
        &tpm_config(&cloud, dir.path(), "t1", &tpm),
    )
    .await;
    iotd.wait_status("Provisioned as gw-t1; certificate").await;
    let cert_id = provisioned_certificate(&iotd);
    assert_eq!(cloud.principals("gw-t1"), vec![cert_id.clone()]);

    // No private key material in the state directory...
    let state_files = files(&iotd.state_dir);
    assert!(
        state_files.iter().any(|p| p.ends_with("gen/1/key.priv")),
        "{state_files:?}"
    );
    for path in &state_files {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
            "{}",
            path.display()
        );
    }
    // ...nor the claim key copied anywhere by iotd...
    let claim_key = std::fs::read_to_string(cloud.claim().1).unwrap();
    let claim_body: String = claim_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for path in &state_files {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap()).replace('\n', "");
        assert!(
            !text.contains(&claim_body[..40]),
            "claim key material in {}",
            path.display()
        );
    }
    // ...nor in the files iotd holds open.
    let pid = iotd_pid(&iotd);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        if target.is_file() {
            let text =
                String::from_utf8_lossy(&std::fs::read(&target).unwrap_or_default()).into_owned();
            assert!(
                !text.contains("PRIVATE KEY"),
                "iotd holds {} open",
                target.display()
            );
        }
    }

    // The issued certificate certifies the key that the TPM holds (read back with tpm2-tools).
    assert!(iotd.terminate().await.success());
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("key.ctx");
    let pem = work.path().join("key.pem");
    let gen_dir = iotd.state_dir.join("gen/1");
    tpm.tpm2_ok(&[
        "tpm2_load",
        "-C",
        "0x81000001",
        "-u",
        gen_dir.join("key.pub").to_str().unwrap(),
        "-r",
        gen_dir.join("key.priv").to_str().unwrap(),
        "-c",
        ctx.to_str().unwrap(),
    ]);
    tpm.tpm2_ok(&[
        "tpm2_readpublic",
        "-c",
        ctx.to_str().unwrap(),
        "-f",
        "pem",
        "-o",
        pem.to_str().unwrap(),
    ]);
    let public_pem = std::fs::read_to_string(&pem).unwrap();
    let (_, block) = x509_parser::pem::parse_x509_pem(public_pem.as_bytes()).unwrap();
    let cert_pem = std::fs::read_to_string(gen_dir.join("cert.pem")).unwrap();
    assert_eq!(
        certificate_spki(&cert_pem),
        block.contents,
        "the certificate's key is the TPM key"
    );
}

fn iotd_pid(iotd: &Iotd) -> u32 {
    iotd.pid().expect("iotd is running")
}

#[tokio::test]
async fn a_cleared_tpm_is_named_and_a_new_identity_is_provisioned() {
    let tpm = Swtpm::start();
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = tpm_config(&cloud, dir.path(), "t2", &tpm);
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-t2; certificate").await;
    let first = provisioned_certificate(&iotd);
    assert!(iotd.terminate().await.success());

    tpm.clear();
    let mut again = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    let status = again
        .wait_status("provisioning a new identity with a new key")
        .await;
    assert!(status.contains("cleared"), "{status}");
    again.wait_status("Provisioned as gw-t2; certificate").await;
    let second = provisioned_certificate(&again);
    assert_ne!(first, second);
    let state = again.state();
    assert_eq!(state["abandonedCertificates"], json!([first]));
    assert!(
        again.state_dir.join("gen/2/key.priv").exists(),
        "a new key generation"
    );
}

#[tokio::test]
async fn a_cleared_tpm_without_permission_to_reprovision_stops_with_the_cause() {
    let tpm = Swtpm::start();
    let cloud = Cloud::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = tpm_config(&cloud, dir.path(), "t3", &tpm).replace(
        "claim_client_id = \"claim-t3\"",
        "claim_client_id = \"claim-t3\"\nreprovision_when_key_lost = false",
    );
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    iotd.wait_status("Provisioned as gw-t3; certificate").await;
    assert!(iotd.terminate().await.success());
    tpm.clear();
    let mut again = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    let status = again.wait_status("Failed at provisioned").await;
    assert!(status.contains("reprovision_when_key_lost"), "{status}");
    assert_eq!(again.state()["lastError"]["code"], "key-lost");
}

#[tokio::test]
async fn sigkill_mid_provisioning_with_the_tpm_resumes() {
    let tpm = Swtpm::start();
    let cloud = Cloud::start().await;
    cloud.add_fault(json!({"api": "RegisterThing", "action": "delay", "delayMs": 60000}));
    let dir = tempfile::tempdir().unwrap();
    let conf = tpm_config(&cloud, dir.path(), "t4", &tpm);
    let mut iotd = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    cloud
        .wait_log("RegisterThing request", |e| {
            e.kind == "in"
                && e.topic
                    .as_deref()
                    .is_some_and(|t| t.contains("/provision/"))
        })
        .await;
    iotd.kill().await;
    assert_eq!(
        iotd.state()["operation"]["step"]["name"],
        "certificate-issued"
    );
    cloud.clear_faults();
    let mut again = Iotd::start(&iotd_binary(), dir.path(), &conf).await;
    again.wait_status("Provisioned as gw-t4; certificate").await;
    let cert = provisioned_certificate(&again);
    assert_eq!(cloud.principals("gw-t4"), vec![cert]);
}
