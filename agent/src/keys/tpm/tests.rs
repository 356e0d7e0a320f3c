//! In-module tests: the pieces that need private access. The backend end to end (swtpm,
//! tpm2-tools, TLS, CSR) is in `agent/tests/tpm_backend.rs`.

use iotd_testkit::swtpm::Swtpm;
use tss_esapi::structures::{EccParameter, EccPoint, PublicBuilder};

use super::worker::key_template;
use super::*;

#[test]
fn spki_pads_short_coordinates_and_refuses_other_keys() {
    // A point whose x has a leading zero byte, as a TPM may send it (31 bytes).
    let x = vec![0x11; 31];
    let y = vec![0x22; 32];
    let template = key_template().unwrap();
    let public = PublicBuilder::new()
        .with_public_algorithm(tss_esapi::interface_types::algorithm::PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(template.name_hashing_algorithm())
        .with_object_attributes(template.object_attributes())
        .with_ecc_parameters(match &template {
            Public::Ecc { parameters, .. } => *parameters,
            _ => unreachable!(),
        })
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(x).unwrap(),
            EccParameter::try_from(y).unwrap(),
        ))
        .build()
        .unwrap();
    let spki = spki_of(&public).unwrap();
    let point = crate::keys::file::p256_point(&spki).unwrap();
    assert_eq!(point[0], 0x04);
    assert_eq!(point[1], 0x00, "padded");
    assert_eq!(&point[2..33], &[0x11; 31]);
    assert_eq!(&point[33..], &[0x22; 32]);

    // A P-384 key is not what this backend makes or signs with.
    let p384 = PublicBuilder::new()
        .with_public_algorithm(tss_esapi::interface_types::algorithm::PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(template.name_hashing_algorithm())
        .with_object_attributes(template.object_attributes())
        .with_ecc_parameters(
            tss_esapi::structures::PublicEccParametersBuilder::new_unrestricted_signing_key(
                tss_esapi::structures::EccScheme::EcDsa(tss_esapi::structures::HashScheme::new(
                    tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha384,
                )),
                EccCurve::NistP384,
            )
            .build()
            .unwrap(),
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .unwrap();
    assert!(spki_of(&p384).unwrap_err().starts_with("not a P-256 key"));
}

#[test]
fn lost_keys_and_other_failures_map_to_their_errors() {
    let lost = key_error(
        "loading TPM key",
        "tpm x parent 0x81000001, blobs /s/gen/1/key.pub+key.priv",
        TpmError::Lost {
            reason: "the TPM no longer holds the parent key".into(),
        },
    );
    assert_eq!(
        lost.to_string(),
        "loading TPM key tpm x parent 0x81000001, blobs /s/gen/1/key.pub+key.priv: the TPM no \
         longer holds the parent key"
    );
    assert!(matches!(lost, KeyError::Lost { .. }));
    let other = key_error(
        "signing with TPM key",
        "tpm x persistent 0x81010001",
        TpmError::Command {
            command: "TPM2_Sign",
            rc: Some(0x902),
            message: rc::describe(0x902),
        },
    );
    assert!(matches!(other, KeyError::Crypto { .. }));
    assert!(
        other
            .to_string()
            .starts_with("signing with TPM key tpm x persistent 0x81010001: TPM2_Sign: the TPM has no free object slot"),
        "{other}"
    );
}

/// What tss-esapi gives for a real TPM failure decodes to the TPM's code (the raw value is only
/// reachable through the bitfield's Display/Debug).
#[test]
fn raw_codes_come_out_of_real_tss_errors() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let backend = TpmBackend::open(tpm.tcti(), dir.path(), None).unwrap();
    // Loading a key under a parent it was not made under: TPM_RC_INTEGRITY from TPM2_Load.
    let (public, private) = backend.tpm.call(|t| t.create_key()).unwrap();
    drop(backend);
    tpm.clear();
    let backend = TpmBackend::open(tpm.tcti(), dir.path(), None).unwrap();
    let err = backend
        .tpm
        .call(move |t| t.check_blobs(public, private))
        .unwrap_err();
    let TpmError::Lost { reason } = err else {
        panic!("{err:?}");
    };
    assert!(
        reason.contains("(TPM_RC_INTEGRITY, parameter 1, 0x1df)"),
        "{reason}"
    );
}

#[test]
fn dropping_the_last_handle_closes_the_connection() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let backend = TpmBackend::open(tpm.tcti(), dir.path(), None).unwrap();
    let key = backend.create(1).unwrap();
    drop(backend);
    // The key keeps the TPM thread: it still signs after the backend is gone.
    key.sign_ecdsa_p256_sha256(b"still here").unwrap();
    drop(key);
    // Connection closed at once (joined on drop): tpm2-tools is served right away.
    let t = std::time::Instant::now();
    tpm.tpm2_ok(&["tpm2_getrandom", "4"]);
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

const A: u32 = 0x8101_0001;
const B: u32 = 0x8101_0002;

#[test]
fn slot_choice_takes_a_slot_no_other_generation_names() {
    // Nothing made yet: A.
    assert_eq!(choose_slot([A, B], 1, &[]), Ok(A));
    // The live generation is at A: the next goes beside it, to B, and back to A after.
    assert_eq!(choose_slot([A, B], 2, &[(1, A)]), Ok(B));
    assert_eq!(choose_slot([A, B], 3, &[(2, B)]), Ok(A));
    // Generations that name no slot (blob mode, another configured handle) block nothing.
    assert_eq!(choose_slot([A, B], 3, &[(1, 0x8102_0000), (2, B)]), Ok(A));
    // Several generations at one handle (the single-handle mode before A/B): the other slot.
    assert_eq!(choose_slot([A, B], 3, &[(1, A), (2, A)]), Ok(B));
}

#[test]
fn slot_choice_reuses_the_generations_own_slot() {
    assert_eq!(choose_slot([A, B], 2, &[(2, B)]), Ok(B));
    assert_eq!(choose_slot([A, B], 2, &[(1, A), (2, B)]), Ok(B));
    assert_eq!(choose_slot([A, B], 1, &[(1, A), (2, B)]), Ok(A));
    // ... but never one another generation names too: its key may be the one there.
    assert_eq!(choose_slot([A, B], 2, &[(1, A), (2, A)]), Ok(B));
    // Its own key at a handle that is no slot (the configuration changed): a free slot.
    assert_eq!(choose_slot([A, B], 2, &[(1, A), (2, 0x8102_0000)]), Ok(B));
}

#[test]
fn slot_choice_refuses_when_other_generations_hold_both() {
    let err = choose_slot([A, B], 3, &[(1, A), (2, B)]).unwrap_err();
    assert_eq!(
        err,
        "both persistent handles are in use, 0x81010001 by generation 1 and 0x81010002 by \
         generation 2; iotd never evicts another generation's key, so an older generation's key \
         must be removed first"
    );
    let err = choose_slot([A, B], 4, &[(1, A), (2, B), (3, A), (4, A)]).unwrap_err();
    assert!(
        err.starts_with(
            "both persistent handles are in use, 0x81010001 by generations 1, 3 and 0x81010002 \
             by generation 2;"
        ),
        "{err}"
    );
}

#[test]
fn both_slots_must_be_owner_handles_other_than_the_srk() {
    assert_eq!(slots(A), [A, B]);
    check_slots(A).unwrap();
    check_slots(0x8100_0002).unwrap();
    check_slots(0x817f_fffe).unwrap();
    for (a, bad, why) in [
        (
            0x817f_ffff,
            0x8180_0000,
            "is not an owner persistent handle",
        ),
        (0x8100_0000, SRK_HANDLE, "is the storage root key's handle"),
        (SRK_HANDLE, SRK_HANDLE, "is the storage root key's handle"),
        (
            0x8180_0000,
            0x8180_0000,
            "is not an owner persistent handle",
        ),
        (
            0x8000_0001,
            0x8000_0001,
            "is not an owner persistent handle",
        ),
        (u32::MAX, u32::MAX, "is not an owner persistent handle"),
    ] {
        let err = check_slots(a).unwrap_err();
        let b = a.wrapping_add(1);
        assert!(
            err.starts_with(&format!(
                "key.persistent_handle {a:#010x} cannot be used: iotd keeps its keys at two \
                 handles, {a:#010x} (A, the configured one) and {b:#010x} (B, the one after it), \
                 and {bad:#010x} {why}"
            )),
            "{err}"
        );
    }
}

#[test]
fn a_lost_onboarding_key_is_said_to_be_made_anew() {
    let lost = key_error(
        "loading the onboarding key",
        "tpm x parent 0x81000001, blobs /s/onboarding/key.pub+key.priv",
        TpmError::Lost {
            reason: format!(
                "the TPM no longer holds the parent key 0x81000001; {IDENTITY_LOST} (TPM2_Load)"
            ),
        },
    );
    let err = onboarding_lost(lost);
    assert!(matches!(err, KeyError::Lost { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "loading the onboarding key tpm x parent 0x81000001, blobs \
         /s/onboarding/key.pub+key.priv: the TPM no longer holds the parent key 0x81000001; this \
         onboarding key cannot be used again and must be made anew (the setup code on the \
         gateway's label stays valid) (TPM2_Load)"
    );
    // Other failures are left as they are.
    let busy = onboarding_lost(key_error(
        "signing with TPM key",
        "k",
        TpmError::Other("stuck".into()),
    ));
    assert_eq!(busy.to_string(), "signing with TPM key k: stuck");
}
