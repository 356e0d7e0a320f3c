//! The tpm key backend against a real (software) TPM: each test starts its own swtpm on a unix
//! socket. Keys are made, reloaded through a new context, used for a CSR and for mutual TLS 1.2
//! and 1.3, and shared with tpm2-tools; a cleared TPM, stale objects, a lockout and the
//! persistent-handle mode are checked too.
//!
//! swtpm serves one client at a time: before a tpm2-tools command a test drops the backend and
//! every key from it (the TPM connection closes with the last of them).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iotd::csr::build_csr;
use iotd::keys::file::p256_point;
use iotd::keys::tpm::{SRK_HANDLE, TpmBackend};
use iotd::keys::{DeviceKey, KeyBackend, KeyError};
use iotd::tls::{ServerTrust, TlsIdentity, client_config};
use iotd_testkit::pki::{self, Pki};
use iotd_testkit::swtpm::Swtpm;
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ProtocolVersion, SupportedProtocolVersion};

/// Slot A of persistent-handle mode (the configured handle), and slot B, the one after it.
const SLOT_A: u32 = 0x8101_0001;
const SLOT_B: u32 = 0x8101_0002;

fn open(tpm: &Swtpm, state: &Path) -> TpmBackend {
    TpmBackend::open(tpm.tcti(), state, None).unwrap()
}

fn verify(key: &dyn DeviceKey, message: &[u8], signature: &[u8]) {
    let spki = key.public_key_spki();
    verify_spki(&spki, message, signature);
}

fn verify_spki(spki: &[u8], message: &[u8], signature: &[u8]) {
    let point = p256_point(spki).expect("a P-256 SPKI");
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
        .verify(message, signature)
        .expect("the signature verifies with the key's public key");
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn create_then_load_through_a_new_context_and_sign() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();

    let backend = open(&tpm, state.path());
    assert_eq!(backend.kind(), "tpm");
    assert!(backend.created_srk(), "a fresh TPM has no SRK");
    assert!(backend.load(1).unwrap().is_none(), "no key before create");
    let created = backend.create(1).unwrap();
    let gen_dir = backend.generation_dir(1);
    assert_eq!(
        created.location(),
        format!(
            "tpm {} parent 0x81000001, blobs {}/key.pub+key.priv",
            tpm.tcti(),
            gen_dir.display()
        )
    );
    let spki = created.public_key_spki();
    assert_eq!(spki.len(), 91);
    assert_eq!(
        created
            .tls_signing_key()
            .public_key()
            .unwrap()
            .as_ref()
            .to_vec(),
        spki,
        "rustls sees the same public key"
    );
    let signature = created.sign_ecdsa_p256_sha256(b"made here").unwrap();
    verify(created.as_ref(), b"made here", &signature);
    drop((created, backend));

    // A new process: new context, SRK found, blobs loaded.
    let backend = open(&tpm, state.path());
    assert!(!backend.created_srk(), "the persisted SRK is reused");
    let loaded = backend.load(1).unwrap().expect("the key after create");
    assert_eq!(loaded.public_key_spki(), spki);
    let signature = loaded.sign_ecdsa_p256_sha256(b"hello").unwrap();
    verify(loaded.as_ref(), b"hello", &signature);
    // Two signatures of the same message differ (ECDSA), both verify.
    let again = loaded.sign_ecdsa_p256_sha256(b"hello").unwrap();
    assert_ne!(signature, again);
    verify(loaded.as_ref(), b"hello", &again);
    assert!(backend.load(2).unwrap().is_none());
}

#[test]
fn fresh_tpm_gets_a_persistent_srk_from_the_tcg_template_once() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    assert!(tpm.persistent_handles().is_empty());

    let backend = open(&tpm, state.path());
    assert!(backend.created_srk());
    drop(backend);
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE]);
    let srk = tpm.tpm2_ok(&["tpm2_readpublic", "-c", "0x81000001"]);
    assert!(
        srk.contains(
            "value: fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt"
        ),
        "{srk}"
    );
    assert!(srk.contains("NIST p256"), "{srk}");
    assert!(srk.contains("aes"), "{srk}");

    let backend = open(&tpm, state.path());
    assert!(!backend.created_srk(), "found, not made again");
    drop(backend);
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE]);
    let again = tpm.tpm2_ok(&["tpm2_readpublic", "-c", "0x81000001"]);
    assert_eq!(srk, again, "the same SRK");
}

#[test]
fn an_srk_made_by_tpm2_tools_is_used_and_tpm2_load_accepts_our_blobs() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    tpm.tpm2_ok(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "ecc256:aes128cfb",
        "-c",
        "srk.ctx",
    ]);
    tpm.tpm2_ok(&[
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        "srk.ctx",
        "0x81000001",
    ]);
    tpm.tpm2_ok(&["tpm2_flushcontext", "-t"]);
    let srk = tpm.tpm2_ok(&["tpm2_readpublic", "-c", "0x81000001"]);

    let backend = open(&tpm, state.path());
    assert!(!backend.created_srk(), "the existing SRK is used");
    let key = backend.create(1).unwrap();
    let spki = key.public_key_spki();
    let gen_dir = backend.generation_dir(1);
    drop((key, backend));

    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE]);
    assert_eq!(
        tpm.tpm2_ok(&["tpm2_readpublic", "-c", "0x81000001"]),
        srk,
        "the SRK is untouched"
    );
    // The key is a child of that SRK: tpm2_load under it works and signs.
    let ctx = tpm.dir().join("key.ctx");
    tpm.tpm2_ok(&[
        "tpm2_load",
        "-C",
        "0x81000001",
        "-u",
        path_str(&gen_dir.join("key.pub")),
        "-r",
        path_str(&gen_dir.join("key.priv")),
        "-c",
        path_str(&ctx),
    ]);
    let message = tpm.dir().join("msg");
    fs::write(&message, b"from tpm2-tools").unwrap();
    let sig = tpm.dir().join("sig.der");
    tpm.tpm2_ok(&[
        "tpm2_sign",
        "-c",
        path_str(&ctx),
        "-g",
        "sha256",
        "-f",
        "plain",
        "-o",
        path_str(&sig),
        path_str(&message),
    ]);
    verify_spki(&spki, b"from tpm2-tools", &fs::read(&sig).unwrap());
}

/// Item 5 of the issue: what the module documentation tells other programs to run works, and
/// iotd keeps working afterwards (tpm2_load left the key loaded; iotd flushes it at start).
#[test]
fn tpm2_tools_load_sign_and_read_the_key_as_documented() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    let key = backend.create(1).unwrap();
    let spki = key.public_key_spki();
    let gen_dir = backend.generation_dir(1);
    drop((key, backend));

    // The files are tpm2-tools' TPM2B framing.
    let printed = tpm.tpm2_ok(&[
        "tpm2_print",
        "-t",
        "TPM2B_PUBLIC",
        path_str(&gen_dir.join("key.pub")),
    ]);
    assert!(printed.contains("sign"), "{printed}");
    assert!(printed.contains("noda"), "{printed}");

    let ctx = tpm.dir().join("key.ctx");
    let message = tpm.dir().join("message.bin");
    let sig = tpm.dir().join("sig.der");
    let pem = tpm.dir().join("key.pem");
    fs::write(&message, b"signed by another program").unwrap();
    tpm.tpm2_ok(&[
        "tpm2_load",
        "-C",
        "0x81000001",
        "-u",
        path_str(&gen_dir.join("key.pub")),
        "-r",
        path_str(&gen_dir.join("key.priv")),
        "-c",
        path_str(&ctx),
    ]);
    tpm.tpm2_ok(&[
        "tpm2_sign",
        "-c",
        path_str(&ctx),
        "-g",
        "sha256",
        "-f",
        "plain",
        "-o",
        path_str(&sig),
        path_str(&message),
    ]);
    verify_spki(
        &spki,
        b"signed by another program",
        &fs::read(&sig).unwrap(),
    );
    tpm.tpm2_ok(&[
        "tpm2_readpublic",
        "-c",
        path_str(&ctx),
        "-f",
        "pem",
        "-o",
        path_str(&pem),
    ]);
    let pem = fs::read_to_string(&pem).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body).unwrap();
    assert_eq!(der, spki, "tpm2_readpublic gives our SubjectPublicKeyInfo");
    // Without a resource manager each command that used key.ctx left a copy loaded.
    let stale = tpm.transient_handles();
    assert_eq!(
        stale.len(),
        3,
        "tpm2_load, tpm2_sign and tpm2_readpublic each left one"
    );

    let backend = open(&tpm, state.path());
    assert_eq!(backend.flushed_at_open(), stale.as_slice());
    let key = backend.load(1).unwrap().unwrap();
    verify(
        key.as_ref(),
        b"x",
        &key.sign_ecdsa_p256_sha256(b"x").unwrap(),
    );
}

#[test]
fn csr_is_signed_in_the_tpm_and_verifies() {
    use x509_parser::prelude::{FromDer, X509CertificationRequest};

    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    let key = backend.create(1).unwrap();
    let pem = build_csr(key.as_ref()).unwrap();
    let der = match rustls_pemfile::read_one(&mut pem.as_bytes())
        .unwrap()
        .unwrap()
    {
        rustls_pemfile::Item::Csr(der) => der.as_ref().to_vec(),
        other => panic!("expected a CSR, got {other:?}"),
    };
    let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
    let info = &csr.certification_request_info;
    assert_eq!(info.subject_pki.raw, key.public_key_spki().as_slice());
    assert_eq!(
        csr.signature_algorithm.algorithm.to_id_string(),
        "1.2.840.10045.4.3.2"
    );
    verify(key.as_ref(), info.raw, &csr.signature_value.data);
    csr.verify_signature().expect("x509-parser verifies it too");
}

// ---- mutual TLS against an in-process rustls server (testkit's PKI, as in tls.rs's tests) ----

/// A client configuration for the TPM key, with a certificate the test CA issued for its
/// public key (the TPM only provides the public key here, the CA signs).
fn tls_client(pki: &Pki, key: Arc<dyn DeviceKey>) -> (Arc<ClientConfig>, CertificateDer<'static>) {
    let cert = pki.client_cert(&key.public_key_spki());
    let trust = ServerTrust::from_pem(&pki.ca_pem(), "test CA").unwrap();
    let identity = TlsIdentity {
        chain: vec![cert.clone()],
        key,
    };
    (client_config(&trust, identity, false).unwrap(), cert)
}

/// One mutual-TLS connection over loopback (see `pki::handshake`); the client chain the server
/// saw and the negotiated version.
fn handshake(
    pki: &Pki,
    version: &'static SupportedProtocolVersion,
    client: Arc<ClientConfig>,
) -> (Vec<CertificateDer<'static>>, Option<ProtocolVersion>) {
    let seen = pki::handshake(pki.server_config(version, &[]), client).unwrap();
    (seen.client_chain, seen.version)
}

fn mutual_tls(
    backend: &TpmBackend,
    key: Arc<dyn DeviceKey>,
    version: &'static SupportedProtocolVersion,
) {
    let pki = Pki::new();
    let (client, cert) = tls_client(&pki, key);
    let before = backend.commands_issued();
    let (seen, negotiated) = handshake(&pki, version, client);
    assert_eq!(seen, vec![cert], "the server saw the TPM key's certificate");
    assert_eq!(negotiated, Some(version.version));
    assert_eq!(
        backend.commands_issued() - before,
        3,
        "one client signature: TPM2_Load, TPM2_Sign, TPM2_FlushContext"
    );
}

#[test]
fn mutual_tls13_and_tls12_sign_in_the_tpm() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    let key = backend.create(1).unwrap();
    mutual_tls(&backend, key.clone(), &rustls::version::TLS13);
    mutual_tls(&backend, key, &rustls::version::TLS12);
}

#[test]
fn tls_signing_key_offers_only_ecdsa_p256_sha256() {
    use rustls::SignatureScheme;
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    let key = backend.create(1).unwrap();
    let signing = key.tls_signing_key();
    assert_eq!(signing.algorithm(), rustls::SignatureAlgorithm::ECDSA);
    assert!(
        signing
            .choose_scheme(&[
                SignatureScheme::ECDSA_NISTP384_SHA384,
                SignatureScheme::RSA_PSS_SHA256
            ])
            .is_none()
    );
    let signer = signing
        .choose_scheme(&[
            SignatureScheme::ED25519,
            SignatureScheme::ECDSA_NISTP256_SHA256,
        ])
        .unwrap();
    assert_eq!(signer.scheme(), SignatureScheme::ECDSA_NISTP256_SHA256);
    let signature = signer.sign(b"transcript").unwrap();
    verify(key.as_ref(), b"transcript", &signature);
    assert!(format!("{signing:?} {signer:?} {key:?}").contains("parent 0x81000001"));
}

/// The rustls signer is synchronous and runs inside the MQTT client's tokio task: on a
/// multi-thread runtime the wait goes through block_in_place (the worker's other tasks keep
/// running), on a current-thread runtime it just blocks (block_in_place would panic there).
#[test]
fn handshakes_inside_tokio_runtimes() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = Arc::new(open(&tpm, state.path()));
    let key = backend.create(1).unwrap();
    let pki = Arc::new(Pki::new());

    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    multi.block_on(async {
        // A task that must keep ticking while the handshake task waits for the TPM.
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let (pki2, key2) = (pki.clone(), key.clone());
        let seen = tokio::spawn(async move {
            let (client, cert) = tls_client(&pki2, key2);
            let (seen, _) = handshake(&pki2, &rustls::version::TLS13, client);
            (seen, cert)
        })
        .await
        .unwrap();
        assert_eq!(seen.0, vec![seen.1]);
        // And a CSR from a worker thread.
        let key3 = key.clone();
        tokio::spawn(async move { build_csr(key3.as_ref()).unwrap() })
            .await
            .unwrap();
        ticker.abort();
        assert!(ticks.load(std::sync::atomic::Ordering::Relaxed) > 0);
    });

    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    current.block_on(async {
        let signature = key.sign_ecdsa_p256_sha256(b"current thread").unwrap();
        verify(key.as_ref(), b"current thread", &signature);
        let (client, cert) = tls_client(&pki, key.clone());
        let (seen, _) = handshake(&pki, &rustls::version::TLS12, client);
        assert_eq!(seen, vec![cert]);
    });
}

#[test]
fn a_cleared_tpm_makes_the_key_lost_with_the_reason() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    drop(backend.create(1).unwrap());
    drop(backend);

    tpm.clear();
    assert!(
        tpm.persistent_handles().is_empty(),
        "the SRK went with the clear"
    );

    let backend = open(&tpm, state.path());
    assert!(backend.created_srk(), "a new SRK for the new owner");
    let err = backend.load(1).unwrap_err();
    let KeyError::Lost {
        action,
        key,
        reason,
    } = &err
    else {
        panic!("expected Lost, got {err:?}");
    };
    assert_eq!(*action, "loading TPM key");
    assert!(key.contains("parent 0x81000001"), "{key}");
    assert!(
        reason.starts_with(
            "the TPM no longer holds the parent key 0x81000001 this key was made under (it was \
             cleared or its owner changed); iotd found no key there when it started and made a \
             new one; this identity cannot be used again ("
        ),
        "{reason}"
    );
    assert!(reason.contains("TPM2_Load"), "{reason}");
    assert!(
        err.to_string()
            .starts_with("loading TPM key tpm swtpm:host=127.0.0.1,port="),
        "{err}"
    );

    // The agent re-provisions: a new key under the new SRK works.
    let key = backend.create(2).unwrap();
    verify(
        key.as_ref(),
        b"new",
        &key.sign_ecdsa_p256_sha256(b"new").unwrap(),
    );
}

#[test]
fn stale_transient_objects_are_flushed_at_open() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    // tpm2-tools without a resource manager leaves what it loads: fill swtpm's object slots.
    for ctx in ["a.ctx", "b.ctx", "c.ctx"] {
        tpm.tpm2_ok(&["tpm2_createprimary", "-C", "o", "-c", ctx]);
    }
    assert_eq!(tpm.transient_handles().len(), 3);
    let out = tpm.tpm2_tools(&["tpm2_createprimary", "-C", "o", "-c", "d.ctx"]);
    assert!(!out.status.success(), "the TPM is full");

    let backend = open(&tpm, state.path());
    assert_eq!(
        backend.flushed_at_open(),
        &[0x8000_0000, 0x8000_0001, 0x8000_0002]
    );
    // With the slots free again the SRK could be made, and a key made and used.
    assert!(backend.created_srk());
    let key = backend.create(1).unwrap();
    verify(
        key.as_ref(),
        b"m",
        &key.sign_ecdsa_p256_sha256(b"m").unwrap(),
    );
    drop((key, backend));
    assert!(
        tpm.transient_handles().is_empty(),
        "iotd leaves nothing loaded"
    );
}

fn open_persistent(tpm: &Swtpm, state: &Path) -> TpmBackend {
    TpmBackend::open(tpm.tcti(), state, Some(SLOT_A)).unwrap()
}

/// Signs with `key` and checks the signature against `spki` (the key's public key as made).
fn signs_as(key: &dyn DeviceKey, spki: &[u8]) {
    assert_eq!(key.public_key_spki(), spki);
    let signature = key.sign_ecdsa_p256_sha256(b"still mine").unwrap();
    verify_spki(spki, b"still mine", &signature);
}

fn handle_file(backend: &TpmBackend, generation: u32) -> String {
    fs::read_to_string(backend.generation_dir(generation).join("key.handle")).unwrap()
}

#[test]
fn persistent_handle_mode() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open_persistent(&tpm, state.path());
    let key = backend.create(1).unwrap();
    assert_eq!(
        key.location(),
        format!("tpm {} persistent 0x81010001", tpm.tcti())
    );
    let spki = key.public_key_spki();
    verify(
        key.as_ref(),
        b"p",
        &key.sign_ecdsa_p256_sha256(b"p").unwrap(),
    );
    let gen_dir = backend.generation_dir(1);
    let mut files: Vec<_> = fs::read_dir(&gen_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["key.handle", "key.pub"], "no private blob");
    assert_eq!(handle_file(&backend, 1), "0x81010001\n");
    drop((key, backend));

    // Other programs sign with the handle directly.
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE, SLOT_A]);
    fs::write(tpm.dir().join("msg"), b"persistent").unwrap();
    tpm.tpm2_ok(&[
        "tpm2_sign",
        "-c",
        "0x81010001",
        "-g",
        "sha256",
        "-f",
        "plain",
        "-o",
        "sig",
        "msg",
    ]);
    verify_spki(
        &spki,
        b"persistent",
        &fs::read(tpm.dir().join("sig")).unwrap(),
    );

    let backend = open_persistent(&tpm, state.path());
    let loaded = backend.load(1).unwrap().unwrap();
    signs_as(loaded.as_ref(), &spki);

    // Generation 2's key goes beside it, to slot B: generation 1's stays usable.
    let newer = backend.create(2).unwrap();
    assert_eq!(
        newer.location(),
        format!("tpm {} persistent 0x81010002", tpm.tcti())
    );
    assert_eq!(handle_file(&backend, 2), "0x81010002\n");
    assert_ne!(newer.public_key_spki(), spki);
    signs_as(loaded.as_ref(), &spki);
    signs_as(backend.load(1).unwrap().unwrap().as_ref(), &spki);

    // Removing generation 1 evicts its key only.
    backend.remove(1).unwrap();
    assert!(!backend.generation_dir(1).exists());
    let err = loaded.sign_ecdsa_p256_sha256(b"old").unwrap_err();
    assert!(matches!(err, KeyError::Lost { .. }), "{err}");
    signs_as(newer.as_ref(), &newer.public_key_spki());
    backend.remove(2).unwrap();
    assert!(backend.load(2).unwrap().is_none());
    drop((newer, loaded, backend));
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE], "evicted");
}

/// THE point of the two slots: a new generation's key is made beside the live one, which still
/// loads and signs (from a new process too) until it is removed; its slot is then reused.
#[test]
fn persistent_handle_mode_keeps_the_live_key_beside_the_new_one() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open_persistent(&tpm, state.path());
    let one = backend.create(1).unwrap().public_key_spki();
    let two = backend.create(2).unwrap().public_key_spki();
    assert_eq!(handle_file(&backend, 1), "0x81010001\n");
    assert_eq!(handle_file(&backend, 2), "0x81010002\n");
    drop(backend);
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE, SLOT_A, SLOT_B]);

    let backend = open_persistent(&tpm, state.path());
    let key1 = backend.load(1).unwrap().unwrap();
    let key2 = backend.load(2).unwrap().unwrap();
    assert!(key1.location().ends_with("persistent 0x81010001"));
    assert!(key2.location().ends_with("persistent 0x81010002"));
    signs_as(key1.as_ref(), &one);
    signs_as(key2.as_ref(), &two);

    // Generation 1 retired: generation 3 takes its slot, A; generation 2 is untouched.
    backend.remove(1).unwrap();
    let key3 = backend.create(3).unwrap();
    assert_eq!(
        key3.location(),
        format!("tpm {} persistent 0x81010001", tpm.tcti())
    );
    assert_eq!(handle_file(&backend, 3), "0x81010001\n");
    let three = key3.public_key_spki();
    signs_as(key2.as_ref(), &two);
    signs_as(key3.as_ref(), &three);
    drop((key1, key2, key3, backend));

    let backend = open_persistent(&tpm, state.path());
    assert!(backend.load(1).unwrap().is_none());
    signs_as(backend.load(2).unwrap().unwrap().as_ref(), &two);
    signs_as(backend.load(3).unwrap().unwrap().as_ref(), &three);
    drop(backend);
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE, SLOT_A, SLOT_B]);
}

#[test]
fn persistent_handle_mode_refuses_a_third_live_generation() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open_persistent(&tpm, state.path());
    let one = backend.create(1).unwrap().public_key_spki();
    let two = backend.create(2).unwrap().public_key_spki();
    let files = |generation: u32| {
        let dir = backend.generation_dir(generation);
        (
            fs::read(dir.join("key.handle")).unwrap(),
            fs::read(dir.join("key.pub")).unwrap(),
        )
    };
    let before = (files(1), files(2));
    let commands = backend.commands_issued();

    let err = backend.create(3).unwrap_err();
    assert!(matches!(err, KeyError::Unsupported { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "creating TPM key: generation 3: both persistent handles are in use, 0x81010001 by \
         generation 1 and 0x81010002 by generation 2; iotd never evicts another generation's \
         key, so an older generation's key must be removed first"
    );
    assert_eq!(backend.commands_issued(), commands, "the TPM was not asked");
    assert!(!backend.generation_dir(3).exists(), "nothing written");
    assert_eq!((files(1), files(2)), before);
    signs_as(backend.load(1).unwrap().unwrap().as_ref(), &one);
    signs_as(backend.load(2).unwrap().unwrap().as_ref(), &two);
    drop(backend);
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE, SLOT_A, SLOT_B]);
}

/// A key made again for the same generation (after a crash, or a key that failed its check)
/// replaces that generation's own key in its own slot, and nothing else.
#[test]
fn persistent_handle_mode_reuses_a_generations_own_slot() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open_persistent(&tpm, state.path());
    let one = backend.create(1).unwrap().public_key_spki();
    let two = backend.create(2).unwrap().public_key_spki();

    let again = backend.create(2).unwrap();
    assert!(again.location().ends_with("persistent 0x81010002"));
    assert_eq!(handle_file(&backend, 2), "0x81010002\n");
    let two_again = again.public_key_spki();
    assert_ne!(two_again, two, "a new key");
    signs_as(again.as_ref(), &two_again);
    signs_as(backend.load(2).unwrap().unwrap().as_ref(), &two_again);
    signs_as(backend.load(1).unwrap().unwrap().as_ref(), &one);

    let again = backend.create(1).unwrap();
    assert!(again.location().ends_with("persistent 0x81010001"));
    assert_eq!(handle_file(&backend, 1), "0x81010001\n");
    let one_again = again.public_key_spki();
    assert_ne!(one_again, one);
    signs_as(backend.load(1).unwrap().unwrap().as_ref(), &one_again);
    signs_as(backend.load(2).unwrap().unwrap().as_ref(), &two_again);

    // Interrupted after the key was persisted, before key.handle said so: the key made again
    // goes to the same (free) slot and replaces the orphan.
    fs::remove_file(backend.generation_dir(2).join("key.handle")).unwrap();
    assert!(backend.load(2).unwrap().is_none(), "no complete key");
    let again = backend.create(2).unwrap();
    assert!(again.location().ends_with("persistent 0x81010002"));
    signs_as(
        backend.load(2).unwrap().unwrap().as_ref(),
        &again.public_key_spki(),
    );
    signs_as(backend.load(1).unwrap().unwrap().as_ref(), &one_again);
    drop((again, backend));
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE, SLOT_A, SLOT_B]);
}

#[test]
fn persistent_handle_mode_leaves_other_objects_alone() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let refused = |handle: u32| {
        let err = TpmBackend::open(tpm.tcti(), state.path(), Some(handle)).unwrap_err();
        assert!(matches!(err, KeyError::Unsupported { .. }), "{err}");
        err.to_string()
    };
    let err = refused(SRK_HANDLE);
    assert!(err.contains("storage root key"), "{err}");
    let err = refused(0x8180_0000);
    assert!(err.contains("not an owner persistent handle"), "{err}");
    // Slot B, the handle after the configured one, must be usable too.
    assert_eq!(
        refused(0x817f_ffff),
        "opening the TPM: key.persistent_handle 0x817fffff cannot be used: iotd keeps its keys \
         at two handles, 0x817fffff (A, the configured one) and 0x81800000 (B, the one after \
         it), and 0x81800000 is not an owner persistent handle (0x81000000 to 0x817fffff)"
    );
    assert_eq!(
        refused(0x8100_0000),
        "opening the TPM: key.persistent_handle 0x81000000 cannot be used: iotd keeps its keys \
         at two handles, 0x81000000 (A, the configured one) and 0x81000001 (B, the one after \
         it), and 0x81000001 is the storage root key's handle, the parent of every iotd key"
    );

    // Someone else's storage key at slot A.
    tpm.tpm2_ok(&["tpm2_createprimary", "-C", "o", "-c", "other.ctx"]);
    tpm.tpm2_ok(&[
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        "other.ctx",
        "0x81010001",
    ]);
    tpm.tpm2_ok(&["tpm2_flushcontext", "-t"]);
    let backend = open_persistent(&tpm, state.path());
    let err = backend.create(1).unwrap_err();
    assert!(
        err.to_string()
            .contains("holds an object iotd did not make"),
        "{err}"
    );
    drop(backend);
    assert!(tpm.persistent_handles().contains(&SLOT_A), "still there");

    // ... and at slot B, while generation 1 is at A: generation 2 is refused, 1 is untouched.
    tpm.tpm2_ok(&["tpm2_evictcontrol", "-C", "o", "-c", "0x81010001"]);
    tpm.tpm2_ok(&["tpm2_createprimary", "-C", "o", "-c", "other.ctx"]);
    tpm.tpm2_ok(&[
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        "other.ctx",
        "0x81010002",
    ]);
    tpm.tpm2_ok(&["tpm2_flushcontext", "-t"]);
    let backend = open_persistent(&tpm, state.path());
    let one = backend.create(1).unwrap().public_key_spki();
    let err = backend.create(2).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("the persistent handle 0x81010002 holds an object iotd did not make"),
        "{text}"
    );
    signs_as(backend.load(1).unwrap().unwrap().as_ref(), &one);
    drop(backend);
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE, SLOT_A, SLOT_B]);
}

#[test]
fn a_lockout_says_how_long_it_lasts() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    // An SRK made with tpm2-tools' defaults is DA-protected (iotd's own is noDA).
    tpm.tpm2_ok(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "ecc256:aes128cfb",
        "-c",
        "srk.ctx",
    ]);
    tpm.tpm2_ok(&[
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        "srk.ctx",
        "0x81000001",
    ]);
    tpm.tpm2_ok(&["tpm2_flushcontext", "-t"]);
    let backend = open(&tpm, state.path());
    drop(backend.create(1).unwrap());
    drop(backend);

    // Lock out after one failure, for 30 s per failure; then fail once.
    tpm.tpm2_ok(&[
        "tpm2_dictionarylockout",
        "-s",
        "-n",
        "1",
        "-t",
        "30",
        "-l",
        "30",
    ]);
    tpm.tpm2_ok(&[
        "tpm2_create",
        "-C",
        "0x81000001",
        "-p",
        "secret",
        "-u",
        "d.pub",
        "-r",
        "d.priv",
    ]);
    tpm.tpm2_ok(&[
        "tpm2_load",
        "-C",
        "0x81000001",
        "-u",
        "d.pub",
        "-r",
        "d.priv",
        "-c",
        "d.ctx",
    ]);
    fs::write(tpm.dir().join("msg"), b"x").unwrap();
    let out = tpm.tpm2_tools(&[
        "tpm2_sign",
        "-c",
        "d.ctx",
        "-p",
        "wrong",
        "-o",
        "sig",
        "msg",
    ]);
    assert!(!out.status.success());

    let backend = open(&tpm, state.path());
    let err = backend.load(1).unwrap_err();
    assert!(
        matches!(err, KeyError::Crypto { .. }),
        "not lost, only locked: {err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(
            "TPM2_Load: the TPM is in dictionary-attack lockout; it will accept commands again in 30 s"
        ),
        "{text}"
    );
    assert!(text.contains("TPM_RC_LOCKOUT, 0x921"), "{text}");
}

#[test]
fn import_pem_is_refused() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    let err = backend
        .import_pem(
            1,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap_err();
    assert!(matches!(err, KeyError::Unsupported { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "importing device key: a key that came over the network cannot be put into the TPM: use \
         certificate_source = \"csr\""
    );
    assert!(!backend.generation_dir(1).exists(), "nothing written");
}

#[test]
fn commands_issued_counts_every_tpm_command() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    // GetCapability (transients), GetCapability (is 0x81000001 there), CreatePrimary,
    // EvictControl, FlushContext.
    assert_eq!(backend.commands_issued(), 5);
    let key = backend.create(1).unwrap();
    assert_eq!(backend.commands_issued(), 6, "TPM2_Create");
    build_csr(key.as_ref()).unwrap();
    assert_eq!(
        backend.commands_issued(),
        9,
        "TPM2_Load, TPM2_Sign, TPM2_FlushContext"
    );
    let pki = Pki::new();
    let (client, _) = tls_client(&pki, key.clone());
    handshake(&pki, &rustls::version::TLS13, client);
    assert_eq!(backend.commands_issued(), 12, "one more signature");
    drop((key, backend));

    // A restart: SRK found (GetCapability x2, ReadPublic x2), key loaded and flushed.
    let backend = open(&tpm, state.path());
    assert_eq!(backend.commands_issued(), 4);
    backend.load(1).unwrap().unwrap();
    assert_eq!(backend.commands_issued(), 6);
}

#[test]
fn no_private_key_material_in_the_state_dir() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    let key = backend.create(1).unwrap();
    build_csr(key.as_ref()).unwrap();
    let gen_dir = backend.generation_dir(1);

    let mut files = Vec::new();
    let mut dirs = vec![state.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    assert_eq!(
        files,
        vec![gen_dir.join("key.priv"), gen_dir.join("key.pub")]
    );
    for file in &files {
        let bytes = fs::read(file).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
            "{}",
            file.display()
        );
        assert_eq!(fs::metadata(file).unwrap().mode() & 0o777, 0o644);
    }
    assert_eq!(fs::metadata(&gen_dir).unwrap().mode() & 0o777, 0o700);
    // key.priv is the wrapped TPM2B_PRIVATE, not a key in the clear: its size field frames it.
    let private = fs::read(gen_dir.join("key.priv")).unwrap();
    assert_eq!(
        usize::from(u16::from_be_bytes([private[0], private[1]])),
        private.len() - 2
    );
}

#[test]
fn damaged_and_half_made_key_files() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    backend.create(1).unwrap();
    let gen_dir = backend.generation_dir(1);

    // Only key.priv (a create interrupted before key.pub): no key, and create replaces it.
    let public = fs::read(gen_dir.join("key.pub")).unwrap();
    fs::remove_file(gen_dir.join("key.pub")).unwrap();
    assert!(backend.load(1).unwrap().is_none());

    fs::write(gen_dir.join("key.pub"), b"\x00\x04junk").unwrap();
    let err = backend.load(1).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "loading TPM key blob {}: not a TPM2B_PUBLIC",
            gen_dir.join("key.pub").display()
        )),
        "{err}"
    );

    // The other generation's public part with this private part: the TPM refuses the pair.
    let other = backend.create(2).unwrap();
    drop(other);
    fs::write(
        gen_dir.join("key.pub"),
        fs::read(backend.generation_dir(2).join("key.pub")).unwrap(),
    )
    .unwrap();
    let err = backend.load(1).unwrap_err();
    assert!(matches!(err, KeyError::Lost { .. }), "{err}");

    // create replaces whatever was there, and remove leaves other files (cert.pem).
    fs::write(gen_dir.join("key.pub"), public).unwrap();
    let key = backend.create(1).unwrap();
    assert_eq!(
        backend.load(1).unwrap().unwrap().public_key_spki(),
        key.public_key_spki()
    );
    fs::write(gen_dir.join("cert.pem"), "cert").unwrap();
    backend.remove(1).unwrap();
    assert!(!gen_dir.join("key.pub").exists() && !gen_dir.join("key.priv").exists());
    assert!(gen_dir.join("cert.pem").exists());
    backend.remove(2).unwrap();
    assert!(!backend.generation_dir(2).exists());
    backend.remove(9).unwrap();
}

#[test]
fn an_unreachable_tpm_is_reported_with_the_tcti() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on (bound, then released).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let err = TpmBackend::open(&tcti, dir.path(), None).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("opening the TPM {tcti}: ")),
        "{text}"
    );
    assert!(text.contains("TCTI"), "{text}");
}

/// tss-esapi 7.7 would turn `swtpm:path=…` into `swtpm:host=localhost,port=2321`: refused,
/// rather than talk to whichever TPM listens there.
#[test]
fn a_tcti_tss_esapi_would_rewrite_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = TpmBackend::open("swtpm:path=/run/swtpm/sock", dir.path(), None).unwrap_err();
    assert!(matches!(err, KeyError::Unsupported { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("path= would be ignored and the connection go to localhost:2321"),
        "{err}"
    );
    let err = TpmBackend::open("pkcs11:x", dir.path(), None).unwrap_err();
    assert!(matches!(err, KeyError::Unsupported { .. }), "{err}");
}

/// Timings on swtpm, printed for the record (`--nocapture`); the bounds only catch a hang.
#[test]
fn timings_on_swtpm() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let backend = open(&tpm, state.path());
    let open_fresh = t.elapsed();
    let t = Instant::now();
    let key = backend.create(1).unwrap();
    let create = t.elapsed();
    drop((key, backend));
    let t = Instant::now();
    let backend = open(&tpm, state.path());
    let open_again = t.elapsed();
    let t = Instant::now();
    let key = backend.load(1).unwrap().unwrap();
    let load = t.elapsed();
    let t = Instant::now();
    const N: u32 = 20;
    for i in 0..N {
        key.sign_ecdsa_p256_sha256(&i.to_be_bytes()).unwrap();
    }
    let sign = t.elapsed() / N;
    eprintln!(
        "swtpm timings: open (fresh TPM, SRK made) {open_fresh:?}, create {create:?}, open (SRK \
         found) {open_again:?}, load {load:?}, sign (load+sign+flush, mean of {N}) {sign:?}"
    );
    for d in [open_fresh, create, open_again, load, sign] {
        assert!(d < Duration::from_secs(5), "{d:?}");
    }
}

// ---- the onboarding server's key ----

/// The files in `<state>/onboarding`, sorted.
fn onboarding_files(state: &Path) -> Vec<String> {
    let mut files: Vec<_> = fs::read_dir(state.join("onboarding"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    files
}

#[test]
fn onboarding_key_is_a_blob_made_once_and_loaded_by_a_new_backend() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("onboarding");
    let backend = open(&tpm, state.path());
    assert_eq!(backend.onboarding_dir(), dir);
    let made = backend.onboarding_key().unwrap();
    assert_eq!(
        made.location(),
        format!(
            "tpm {} parent 0x81000001, blobs {}/key.pub+key.priv",
            tpm.tcti(),
            dir.display()
        )
    );
    assert_eq!(onboarding_files(state.path()), ["key.priv", "key.pub"]);
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    for name in ["key.pub", "key.priv"] {
        assert_eq!(fs::metadata(dir.join(name)).unwrap().mode() & 0o777, 0o644);
    }
    assert!(!state.path().join("gen").exists(), "not a generation");
    let spki = made.public_key_spki();
    assert_eq!(spki.len(), 91);
    assert_eq!(
        made.tls_signing_key().public_key().unwrap().as_ref(),
        spki.as_slice()
    );
    assert_eq!(
        backend.onboarding_key().unwrap().public_key_spki(),
        spki,
        "loaded, not made again"
    );
    signs_as(made.as_ref(), &spki);
    drop((made, backend));
    assert_eq!(
        tpm.persistent_handles(),
        vec![SRK_HANDLE],
        "the onboarding key takes no persistent handle"
    );
    assert!(tpm.transient_handles().is_empty(), "nor a slot");

    // A new process: the same key, loaded through a new context.
    let backend = open(&tpm, state.path());
    let loaded = backend.onboarding_key().unwrap();
    assert_eq!(loaded.public_key_spki(), spki);
    let signature = loaded.sign_ecdsa_p256_sha256(b"onboarding").unwrap();
    verify_spki(&spki, b"onboarding", &signature);
    assert!(backend.load(1).unwrap().is_none());
    assert_eq!(onboarding_files(state.path()), ["key.priv", "key.pub"]);
}

/// The two persistent slots are the identity generations': the onboarding key is a blob pair
/// in persistent-handle mode too, and both slots still take a generation's key after it.
#[test]
fn onboarding_key_leaves_the_persistent_slots_to_the_generations() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open_persistent(&tpm, state.path());
    let onboarding = backend.onboarding_key().unwrap();
    assert_eq!(
        onboarding.location(),
        format!(
            "tpm {} parent 0x81000001, blobs {}/key.pub+key.priv",
            tpm.tcti(),
            backend.onboarding_dir().display()
        )
    );
    assert_eq!(
        onboarding_files(state.path()),
        ["key.priv", "key.pub"],
        "a blob pair, no key.handle"
    );
    let spki = onboarding.public_key_spki();
    drop(onboarding);

    let one = backend.create(1).unwrap();
    let two = backend.create(2).unwrap();
    assert!(one.location().ends_with("persistent 0x81010001"));
    assert!(two.location().ends_with("persistent 0x81010002"));
    let (spki1, spki2) = (one.public_key_spki(), two.public_key_spki());
    signs_as(one.as_ref(), &spki1);
    signs_as(two.as_ref(), &spki2);
    signs_as(backend.onboarding_key().unwrap().as_ref(), &spki);
    drop((one, two, backend));
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE, SLOT_A, SLOT_B]);

    let backend = open_persistent(&tpm, state.path());
    signs_as(backend.onboarding_key().unwrap().as_ref(), &spki);
    signs_as(backend.load(1).unwrap().unwrap().as_ref(), &spki1);
    signs_as(backend.load(2).unwrap().unwrap().as_ref(), &spki2);
    // Removing it and making a new one touches neither slot.
    backend.remove_onboarding_key().unwrap();
    let new = backend.onboarding_key().unwrap();
    assert_ne!(new.public_key_spki(), spki);
    signs_as(backend.load(1).unwrap().unwrap().as_ref(), &spki1);
    signs_as(backend.load(2).unwrap().unwrap().as_ref(), &spki2);
    drop((new, backend));
    assert_eq!(tpm.persistent_handles(), vec![SRK_HANDLE, SLOT_A, SLOT_B]);
}

/// The onboarding key as rcgen sees it (as `iotd::csr` does for CSRs).
struct RcgenKey<'a> {
    key: &'a dyn DeviceKey,
    point: Vec<u8>,
}

impl rcgen::PublicKeyData for RcgenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for RcgenKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key
            .sign_ecdsa_p256_sha256(msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// The server's one certificate, whatever the client asks for.
#[derive(Debug)]
struct OneCertificate(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCertificate {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A client that accepts exactly one (self-signed) certificate and checks the server's
/// handshake signature with its public key.
#[derive(Debug)]
struct Pinned {
    certificate: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.certificate.as_ref() && intermediates.is_empty() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the pinned certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What the onboarding server does with the key: self-sign its certificate with rcgen, then
/// authenticate TLS 1.3 and 1.2 handshakes as a server, every signature made in the TPM.
#[test]
fn onboarding_key_self_signs_its_certificate_and_serves_tls() {
    use x509_parser::prelude::{FromDer, X509Certificate};

    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    let key = backend.onboarding_key().unwrap();
    let spki = key.public_key_spki();
    let signer = RcgenKey {
        key: key.as_ref(),
        point: p256_point(&spki).unwrap().to_vec(),
    };
    let params = rcgen::CertificateParams::new(vec!["iotd-onboarding.local".into()]).unwrap();
    let certificate = params.self_signed(&signer).unwrap().der().clone();
    let (_, parsed) = X509Certificate::from_der(&certificate).unwrap();
    assert_eq!(parsed.public_key().raw, spki.as_slice());
    verify_spki(
        &spki,
        parsed.tbs_certificate.as_ref(),
        &parsed.signature_value.data,
    );
    parsed
        .verify_signature(None)
        .expect("x509-parser verifies it");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = Arc::new(rustls::sign::CertifiedKey::new(
        vec![certificate.clone()],
        key.tls_signing_key(),
    ));
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneCertificate(certified.clone())));
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                certificate: certificate.clone(),
                provider: provider.clone(),
            }))
            .with_no_client_auth();
        let before = backend.commands_issued();
        let seen = pki::handshake(Arc::new(server), Arc::new(client)).unwrap();
        assert_eq!(seen.version, Some(version.version));
        assert_eq!(
            backend.commands_issued() - before,
            3,
            "one server signature: TPM2_Load, TPM2_Sign, TPM2_FlushContext"
        );
    }
}

#[test]
fn a_cleared_tpm_loses_the_onboarding_key_until_it_is_made_again() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let backend = open(&tpm, state.path());
    let spki = backend.onboarding_key().unwrap().public_key_spki();
    drop(backend);
    tpm.clear();

    let backend = open(&tpm, state.path());
    let err = backend.onboarding_key().unwrap_err();
    let KeyError::Lost {
        action,
        key,
        reason,
    } = &err
    else {
        panic!("expected Lost, got {err:?}");
    };
    assert_eq!(*action, "loading the onboarding key");
    assert!(key.ends_with("/onboarding/key.pub+key.priv"), "{key}");
    assert!(
        reason.starts_with(
            "the TPM no longer holds the parent key 0x81000001 this key was made under (it was \
             cleared or its owner changed); iotd found no key there when it started and made a \
             new one; this onboarding key cannot be used again and must be made anew (the setup \
             code on the gateway's label stays valid) ("
        ),
        "{reason}"
    );
    // Not replaced behind the caller's back: lost until removed.
    assert!(matches!(
        backend.onboarding_key().unwrap_err(),
        KeyError::Lost { .. }
    ));
    assert_eq!(onboarding_files(state.path()), ["key.priv", "key.pub"]);

    backend.remove_onboarding_key().unwrap();
    assert!(!state.path().join("onboarding").exists());
    let new = backend.onboarding_key().unwrap();
    assert_ne!(new.public_key_spki(), spki);
    signs_as(new.as_ref(), &new.public_key_spki());
}

#[test]
fn onboarding_key_files_removed_half_made_or_damaged() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("onboarding");
    let backend = open(&tpm, state.path());
    let first = backend.onboarding_key().unwrap().public_key_spki();

    // Removed: its files go, the certificate beside them stays; the next key is new.
    fs::write(dir.join("cert.pem"), "cert").unwrap();
    backend.remove_onboarding_key().unwrap();
    assert_eq!(onboarding_files(state.path()), ["cert.pem"]);
    backend.remove_onboarding_key().unwrap();
    let second = backend.onboarding_key().unwrap().public_key_spki();
    assert_ne!(second, first);

    // key.priv without key.pub (a create interrupted before its last file): made again.
    fs::remove_file(dir.join("key.pub")).unwrap();
    let third = backend.onboarding_key().unwrap().public_key_spki();
    assert_ne!(third, second);
    assert_eq!(
        onboarding_files(state.path()),
        ["cert.pem", "key.priv", "key.pub"]
    );

    // A damaged file is named, with the way out, and left as it is.
    fs::write(dir.join("key.pub"), b"\x00\x04junk").unwrap();
    let err = backend.onboarding_key().unwrap_err();
    assert!(matches!(err, KeyError::Crypto { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "loading the onboarding key {}: not a TPM2B_PUBLIC",
            dir.join("key.pub").display()
        )),
        "{text}"
    );
    assert!(
        text.ends_with(
            "; remove this file and restart iotd: a new onboarding key and certificate are made, \
             and the setup code on the gateway's label stays valid"
        ),
        "{text}"
    );
    assert_eq!(fs::read(dir.join("key.pub")).unwrap(), b"\x00\x04junk");
    fs::remove_file(dir.join("key.pub")).unwrap();
    let fourth = backend.onboarding_key().unwrap();
    assert_ne!(fourth.public_key_spki(), third);

    // Generations come and go without touching it.
    backend.create(1).unwrap();
    backend.remove(1).unwrap();
    signs_as(
        backend.onboarding_key().unwrap().as_ref(),
        &fourth.public_key_spki(),
    );
}
