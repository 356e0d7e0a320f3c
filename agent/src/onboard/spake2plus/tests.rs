#![allow(clippy::unwrap_used)]

use std::num::NonZeroU32;

use base64::Engine as _;
use p256::U256;
use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::onboard::vectors::{array, bytes, draft, rfc, text};

fn info(context: &[u8], id_prover: &str, id_verifier: &str) -> SessionInfo {
    SessionInfo {
        context: context.to_vec(),
        id_prover: id_prover.as_bytes().to_vec(),
        id_verifier: id_verifier.as_bytes().to_vec(),
    }
}

fn rfc_info(v: &Value) -> SessionInfo {
    info(
        text(v, "context_ascii").as_bytes(),
        &text(v, "idProver_ascii"),
        &text(v, "idVerifier_ascii"),
    )
}

fn draft_info(v: &Value) -> SessionInfo {
    info(
        &bytes(v, "context"),
        &text(v, "idProver_ascii"),
        &text(v, "idVerifier_ascii"),
    )
}

fn scalar(v: &Value, key: &str) -> Scalar {
    scalar_from_bytes(&array(v, key)).unwrap()
}

/// A prover secret and its record from random PBKDF output.
fn random_secret() -> (ProverSecret, VerifierRecord) {
    let mut output = [0; PBKDF_OUTPUT_LEN];
    SystemRandom::new().fill(&mut output).unwrap();
    let secret = ProverSecret::from_pbkdf_output(&output).unwrap();
    let record = secret.record();
    (secret, record)
}

/// Every value of one vector, from both roles: shares, confirmations, the shared key, and the
/// intermediates (Z, V, TT, K_main, K_confirmP/V) through the functions the roles use.
fn check_full_run(v: &Value, info: SessionInfo, secret: &ProverSecret) {
    let record = secret.record();
    // The RFC's vector gives L; the profile's gives the record w0 ‖ L.
    let expected_l = match v.get("L") {
        Some(_) => bytes(v, "L"),
        None => bytes(v, "record_w0_L")[SCALAR_LEN..].to_vec(),
    };
    assert_eq!(
        record.to_bytes().unwrap()[SCALAR_LEN..],
        expected_l[..],
        "L"
    );

    let prover = Prover::start_with_fixed(info.clone(), secret, &array(v, "x")).unwrap();
    assert_eq!(prover.share()[..], bytes(v, "shareP")[..], "shareP");

    let verifier = Verifier::new(info.clone(), &record);
    let (confirming, response) = verifier
        .respond_with_fixed(prover.share(), &array(v, "y"))
        .unwrap();
    assert_eq!(response.share_v[..], bytes(v, "shareV")[..], "shareV");
    assert_eq!(response.confirm_v[..], bytes(v, "confirmV")[..], "confirmV");

    let confirmed = prover
        .finish(&response.share_v, &response.confirm_v)
        .unwrap();
    assert_eq!(
        confirmed.confirm_p[..],
        bytes(v, "confirmP")[..],
        "confirmP"
    );
    assert_eq!(confirmed.shared.as_bytes()[..], bytes(v, "K_shared")[..]);

    let shared = confirming.finish(&confirmed.confirm_p).unwrap();
    assert_eq!(shared.as_bytes()[..], bytes(v, "K_shared")[..], "K_shared");

    // The intermediates, by RFC 9383 §3.3's formulas on the vector's values.
    let (w0, w1) = (scalar(v, "w0"), scalar(v, "w1"));
    let (x, y) = (scalar(v, "x"), scalar(v, "y"));
    let share_x = decode_point(&bytes(v, "shareP")).unwrap();
    let share_y = decode_point(&bytes(v, "shareV")).unwrap();
    let m = constant_point(&M, "M").unwrap();
    let n = constant_point(&N, "N").unwrap();
    let l = decode_point(&expected_l).unwrap();
    let z_verifier = encode(&((share_x - m * w0) * y), "Z").unwrap();
    let v_verifier = encode(&(l * y), "V").unwrap();
    let z_prover = encode(&((share_y - n * w0) * x), "Z").unwrap();
    let v_prover = encode(&((share_y - n * w0) * w1), "V").unwrap();
    assert_eq!(z_verifier[..], bytes(v, "Z")[..], "Z (verifier)");
    assert_eq!(z_prover[..], bytes(v, "Z")[..], "Z (prover)");
    assert_eq!(v_verifier[..], bytes(v, "V")[..], "V (verifier)");
    assert_eq!(v_prover[..], bytes(v, "V")[..], "V (prover)");

    let tt = transcript(
        &info,
        &array(v, "shareP"),
        &array(v, "shareV"),
        &z_verifier,
        &v_verifier,
        &w0,
    );
    assert_eq!(tt[..], bytes(v, "TT")[..], "TT");
    let keys = key_schedule(&tt).unwrap();
    assert_eq!(keys.k_main[..], bytes(v, "K_main")[..], "K_main");
    assert_eq!(
        keys.k_confirm_p[..],
        bytes(v, "K_confirmP")[..],
        "K_confirmP"
    );
    assert_eq!(
        keys.k_confirm_v[..],
        bytes(v, "K_confirmV")[..],
        "K_confirmV"
    );
    assert_eq!(keys.k_shared[..], bytes(v, "K_shared")[..], "K_shared");
}

#[test]
fn m_and_n_are_the_rfc_points() {
    let v = rfc();
    assert_eq!(M[..], bytes(&v, "M")[..]);
    assert_eq!(N[..], bytes(&v, "N")[..]);
    // RFC 9383 §4 lists them compressed.
    for (point, compressed) in [
        (
            &M,
            "02886e2f97ace46e55ba9dd7242579f2993b64e16ef3dcab95afd497333d8fa12f",
        ),
        (
            &N,
            "03d8bbd6c639c62937b04d997f38c3770719c629d7014d49a24b4f98baa1292b49",
        ),
    ] {
        let point = constant_point(point, "M or N").unwrap();
        assert_eq!(
            hex::encode(point.to_affine().to_encoded_point(true).as_bytes()),
            compressed
        );
    }
}

#[test]
fn the_rfc_9383_vector_passes_in_both_roles() {
    let v = rfc();
    let secret = ProverSecret::from_scalars(&array(&v, "w0"), &array(&v, "w1")).unwrap();
    assert_eq!(secret.scalars(), (array(&v, "w0"), array(&v, "w1")));
    check_full_run(&v, rfc_info(&v), &secret);
}

#[test]
fn the_profile_draft_vectors_pass_from_the_pbkdf_output_in_both_roles() {
    for v in draft() {
        let secret = ProverSecret::from_pbkdf_output(&array(&v, "pbkdf.output")).unwrap();
        assert_eq!(secret.scalars(), (array(&v, "w0"), array(&v, "w1")));
        assert_eq!(
            secret.record().to_bytes().unwrap()[..],
            bytes(&v, "record_w0_L")[..]
        );
        check_full_run(&v, draft_info(&v), &secret);
    }
}

/// Matter's published test verifier: its 40-byte halves are far above n, so only a whole
/// reduction (not a truncation to 32 bytes) gives it.
#[test]
fn matters_test_verifier_checks_the_wide_reduction() {
    let passcode = 20_202_021u32.to_le_bytes();
    let mut output = [0; PBKDF_OUTPUT_LEN];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(1000).unwrap(),
        b"SPAKE2P Key Salt",
        &passcode,
        &mut output,
    );
    let record = ProverSecret::from_pbkdf_output(&output)
        .unwrap()
        .record()
        .to_bytes()
        .unwrap();
    let expected = base64::engine::general_purpose::STANDARD
        .decode(
            "uWFwqugDNGiEck/po7KHwwMwwqZgN10XuyBajPGuyzUEV/iree4lOrao5GuwnlQ65CJzbeUB49s31EH+\
             NEkg0JVI5MGCQGMMT/SRPFNRODm3wH/MBiehuFc6FJ/NH6Rmzw==",
        )
        .unwrap();
    assert_eq!(record[..], expected[..]);
}

#[test]
fn reduce_wide_reduces_the_whole_input_mod_n() {
    let n =
        hex::decode("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551").unwrap();
    assert_eq!(reduce_wide(&n), Scalar::ZERO);
    let mut n_plus_one = n.clone();
    n_plus_one[31] += 1;
    assert_eq!(reduce_wide(&n_plus_one), Scalar::ONE);
    // Leading zeros change nothing.
    let mut padded = vec![0; 8];
    padded.extend_from_slice(&n_plus_one);
    assert_eq!(reduce_wide(&padded), Scalar::ONE);
    // 32 bytes: the same as p256's own reduction.
    let big = [0xab; 32];
    assert_eq!(
        reduce_wide(&big),
        <Scalar as p256::elliptic_curve::ops::Reduce<U256>>::reduce_bytes(&FieldBytes::from(big))
    );
    // (2^320 − 1) mod n, computed with Python integers.
    assert_eq!(
        hex::encode(reduce_wide(&[0xff; 40]).to_bytes()),
        "fffffffe00000001431905529c0166cd22159165b6faae70f756a571fc632550"
    );
    assert_eq!(reduce_wide(&[]), Scalar::ZERO);
}

#[test]
fn scalars_at_or_above_n_or_zero_are_refused() {
    let n = <[u8; 32]>::try_from(
        hex::decode("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551").unwrap(),
    )
    .unwrap();
    let one = {
        let mut one = [0; 32];
        one[31] = 1;
        one
    };
    assert!(scalar_from_bytes(&n).is_none());
    assert!(matches!(
        ProverSecret::from_scalars(&n, &one),
        Err(Spake2PlusError::BadSecret(_))
    ));
    assert!(matches!(
        ProverSecret::from_scalars(&one, &[0; 32]),
        Err(Spake2PlusError::BadSecret(_))
    ));
    assert!(matches!(
        ProverSecret::from_pbkdf_output(&[0; PBKDF_OUTPUT_LEN]),
        Err(Spake2PlusError::BadSecret(_))
    ));
    assert!(ProverSecret::from_scalars(&one, &one).is_ok());
}

#[test]
fn the_record_round_trips_and_a_bad_one_is_refused() {
    let (_, record) = random_secret();
    let bytes = record.to_bytes().unwrap();
    let again = VerifierRecord::from_bytes(&*bytes).unwrap();
    assert_eq!(again.to_bytes().unwrap()[..], bytes[..]);

    assert!(VerifierRecord::from_bytes(&bytes[..96]).is_err(), "short");
    let mut zero_w0 = *bytes;
    zero_w0[..32].fill(0);
    assert!(VerifierRecord::from_bytes(&zero_w0).is_err(), "w0 = 0");
    let mut big_w0 = *bytes;
    big_w0[..32].fill(0xff);
    assert!(VerifierRecord::from_bytes(&big_w0).is_err(), "w0 >= n");
    let mut off_curve = *bytes;
    off_curve[96] ^= 1;
    let error = VerifierRecord::from_bytes(&off_curve).unwrap_err();
    assert!(error.to_string().contains("L is not"), "{error}");
}

#[test]
fn a_random_run_agrees_on_the_key_and_uses_fresh_randomness() {
    let (secret, record) = random_secret();
    let info = info(b"iotd test", "iotctl/0.1", "IOTGW-1");
    let mut shares = Vec::new();
    for _ in 0..2 {
        let prover = Prover::start(info.clone(), &secret).unwrap();
        let (confirming, response) = Verifier::new(info.clone(), &record)
            .respond(prover.share())
            .unwrap();
        shares.push((*prover.share(), response.share_v));
        let confirmed = prover
            .finish(&response.share_v, &response.confirm_v)
            .unwrap();
        let shared = confirming.finish(&confirmed.confirm_p).unwrap();
        assert_eq!(shared.as_bytes(), confirmed.shared.as_bytes());
    }
    assert_ne!(shares[0].0, shares[1].0, "x is fresh");
    assert_ne!(shares[0].1, shares[1].1, "y is fresh");
}

#[test]
fn random_scalars_are_non_zero_and_differ() {
    let rng = SystemRandom::new();
    let a = random_scalar(&rng).unwrap();
    let b = random_scalar(&rng).unwrap();
    assert!(!bool::from(a.is_zero()));
    assert_ne!(*a, *b);
}

#[test]
fn a_wrong_code_is_refused_by_the_prover_before_it_confirms() {
    let (_, record) = random_secret();
    let (wrong, _) = random_secret();
    let info = info(b"ctx", "p", "v");
    let prover = Prover::start(info.clone(), &wrong).unwrap();
    let (_, response) = Verifier::new(info, &record)
        .respond(prover.share())
        .unwrap();
    assert_eq!(
        prover
            .finish(&response.share_v, &response.confirm_v)
            .unwrap_err(),
        Spake2PlusError::ConfirmationMismatch
    );
}

#[test]
fn a_different_context_or_identity_fails_confirmation() {
    let (secret, record) = random_secret();
    let base = info(b"ctx", "p", "v");
    for other in [
        info(b"ctx2", "p", "v"),
        info(b"ctx", "q", "v"),
        info(b"ctx", "p", "w"),
    ] {
        let prover = Prover::start(base.clone(), &secret).unwrap();
        let (_, response) = Verifier::new(other, &record)
            .respond(prover.share())
            .unwrap();
        assert_eq!(
            prover
                .finish(&response.share_v, &response.confirm_v)
                .unwrap_err(),
            Spake2PlusError::ConfirmationMismatch
        );
    }
}

/// Bad forms of a valid share: compressed, wrong prefix, off the curve, the identity's
/// encodings, empty.
fn malformed_shares(valid: &[u8; SHARE_LEN]) -> Vec<(Vec<u8>, ShareProblem)> {
    let point = decode_point(valid).unwrap();
    let compressed = point.to_affine().to_encoded_point(true).as_bytes().to_vec();
    let mut wrong_prefix = valid.to_vec();
    wrong_prefix[0] = 0x03;
    let mut off_curve = valid.to_vec();
    off_curve[64] ^= 1;
    let mut zeros = vec![0; SHARE_LEN];
    zeros[0] = 0x04;
    vec![
        (compressed, ShareProblem::Length(33)),
        (wrong_prefix, ShareProblem::NotUncompressed(0x03)),
        (off_curve, ShareProblem::NotOnCurve),
        (vec![0x00], ShareProblem::Length(1)),
        (zeros, ShareProblem::NotOnCurve),
        (vec![], ShareProblem::Length(0)),
        ([valid.as_slice(), &[0]].concat(), ShareProblem::Length(66)),
    ]
}

#[test]
fn the_verifier_refuses_malformed_and_mask_shares() {
    let (secret, record) = random_secret();
    let info = info(b"ctx", "p", "v");
    let prover = Prover::start(info.clone(), &secret).unwrap();
    for (share, problem) in malformed_shares(prover.share()) {
        assert_eq!(
            Verifier::new(info.clone(), &record)
                .respond(&share)
                .unwrap_err(),
            Spake2PlusError::BadShare(problem),
            "{}",
            hex::encode(&share)
        );
    }
    // X = w0·M makes X − w0·M the identity.
    let mask = encode(&(constant_point(&M, "M").unwrap() * *record.w0), "mask").unwrap();
    let error = Verifier::new(info, &record).respond(&mask).unwrap_err();
    assert_eq!(error, Spake2PlusError::BadShare(ShareProblem::Mask));
    assert_eq!(
        error.to_string(),
        "refusing the peer's share: it equals the mask w0·M or w0·N"
    );
}

#[test]
fn the_prover_refuses_malformed_and_mask_shares() {
    let (secret, record) = random_secret();
    let info = info(b"ctx", "p", "v");
    let prover = Prover::start(info.clone(), &secret).unwrap();
    let (_, response) = Verifier::new(info.clone(), &record)
        .respond(prover.share())
        .unwrap();
    for (share, problem) in malformed_shares(&response.share_v) {
        let prover = Prover::start(info.clone(), &secret).unwrap();
        assert_eq!(
            prover.finish(&share, &response.confirm_v).unwrap_err(),
            Spake2PlusError::BadShare(problem)
        );
    }
    let mask = encode(&(constant_point(&N, "N").unwrap() * *secret.w0), "mask").unwrap();
    let prover = Prover::start(info, &secret).unwrap();
    assert_eq!(
        prover.finish(&mask, &response.confirm_v).unwrap_err(),
        Spake2PlusError::BadShare(ShareProblem::Mask)
    );
}

#[test]
fn a_flipped_bit_or_wrong_length_in_a_confirmation_is_refused_by_both_roles() {
    let (secret, record) = random_secret();
    let info = info(b"ctx", "p", "v");
    let run = || {
        let prover = Prover::start(info.clone(), &secret).unwrap();
        let (confirming, response) = Verifier::new(info.clone(), &record)
            .respond(prover.share())
            .unwrap();
        (prover, confirming, response)
    };
    for bit in [0, 7, 100, 255] {
        let (prover, _, response) = run();
        let mut confirm_v = response.confirm_v;
        confirm_v[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            prover.finish(&response.share_v, &confirm_v).unwrap_err(),
            Spake2PlusError::ConfirmationMismatch
        );

        let (prover, confirming, response) = run();
        let mut confirm_p = prover
            .finish(&response.share_v, &response.confirm_v)
            .unwrap()
            .confirm_p;
        confirm_p[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            confirming.finish(&confirm_p).unwrap_err(),
            Spake2PlusError::ConfirmationMismatch
        );
    }
    let (prover, confirming, response) = run();
    assert_eq!(
        prover
            .finish(&response.share_v, &response.confirm_v[..31])
            .unwrap_err(),
        Spake2PlusError::ConfirmationLength { len: 31 }
    );
    assert_eq!(
        confirming.finish(&[0; 33]).unwrap_err(),
        Spake2PlusError::ConfirmationLength { len: 33 }
    );
}

#[test]
fn refusals_say_what_was_refused_and_why() {
    for (error, message) in [
        (
            Spake2PlusError::BadShare(ShareProblem::Length(33)),
            "refusing the peer's share: it is 33 bytes, not the 65 of an uncompressed P-256 point",
        ),
        (
            Spake2PlusError::BadShare(ShareProblem::NotUncompressed(2)),
            "refusing the peer's share: it starts with 0x02, not 0x04 (an uncompressed P-256 \
             point)",
        ),
        (
            Spake2PlusError::BadShare(ShareProblem::NotOnCurve),
            "refusing the peer's share: it is not a point on the P-256 curve",
        ),
        (
            Spake2PlusError::BadShare(ShareProblem::Identity),
            "refusing the peer's share: it is the identity point",
        ),
        (
            Spake2PlusError::ConfirmationLength { len: 31 },
            "refusing the peer's confirmation: it is 31 bytes, not 32",
        ),
        (
            Spake2PlusError::ConfirmationMismatch,
            "the peer's confirmation does not match ours: a wrong setup code, or the exchange was \
             tampered with",
        ),
        (
            Spake2PlusError::BadRecord("x"),
            "reading the SPAKE2+ verifier record: x",
        ),
        (
            Spake2PlusError::Random,
            "drawing a random SPAKE2+ scalar: the system's random number generator failed",
        ),
        (
            Spake2PlusError::Identity("Z"),
            "computing the SPAKE2+ point Z: it is the identity, or not a valid point",
        ),
        (
            Spake2PlusError::Kdf("shared key"),
            "deriving the SPAKE2+ shared key with HKDF-SHA256 failed",
        ),
    ] {
        assert_eq!(error.to_string(), message);
    }
}

#[test]
fn the_session_types_can_wait_between_requests_in_a_server() {
    fn movable<T: Send + Sync + 'static>() {}
    movable::<Verifier>();
    movable::<VerifierConfirming>();
    movable::<Prover>();
    movable::<ProverConfirmed>();
    movable::<VerifierRecord>();
    movable::<SharedKey>();
}

#[test]
fn secrets_are_not_shown_by_debug() {
    let (secret, record) = random_secret();
    assert_eq!(format!("{secret:?}"), "ProverSecret { .. }");
    assert_eq!(format!("{record:?}"), "VerifierRecord { .. }");
    let verifier = Verifier::new(info(b"\x01", "p", "v"), &record);
    let shown = format!("{verifier:?}");
    assert!(
        shown.starts_with("Verifier { info: SessionInfo { context: \"01\""),
        "{shown}"
    );
    assert!(shown.ends_with(".. }"), "{shown}");
}

/// RFC 5869's first test case, for the HKDF that the key schedule and the profile's app keys use.
#[test]
fn hkdf_sha256_matches_rfc_5869() {
    let salt: Vec<u8> = (0..=0x0c).collect();
    let info: Vec<u8> = (0xf0..=0xf9).collect();
    let mut okm = [0; 42];
    hkdf_sha256(&salt, &[0x0b; 22], &info, &mut okm).unwrap();
    assert_eq!(
        hex::encode(okm),
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    );
    let mut too_long = vec![0; 255 * 32 + 1];
    assert!(hkdf_sha256(&[], b"k", b"i", &mut too_long).is_err());
}

#[test]
fn length_prefixes_are_eight_bytes_little_endian() {
    let mut out = Vec::new();
    push_length_prefixed(&mut out, b"abc");
    push_length_prefixed(&mut out, b"");
    assert_eq!(out, b"\x03\0\0\0\0\0\0\0abc\0\0\0\0\0\0\0\0");
}

proptest! {
    // Each case of the second runs a whole exchange; 64 cases keep the suite quick.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever a peer sends as a share, decoding refuses it or gives a valid point: never a
    /// panic; and a verifier session fed it answers or refuses.
    #[test]
    fn any_share_is_decoded_or_refused(share in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = decode_point(&share);
        let mut uncompressed = share.clone();
        uncompressed.resize(SHARE_LEN, 0);
        uncompressed[0] = 0x04;
        prop_assert_eq!(decode_point(&uncompressed).is_ok(), {
            let ok: Option<AffinePoint> =
                AffinePoint::from_encoded_point(&EncodedPoint::from_bytes(&uncompressed).unwrap())
                    .into();
            ok.is_some()
        });
    }

    #[test]
    fn any_confirmation_is_refused_without_a_panic(confirm in proptest::collection::vec(any::<u8>(), 0..40)) {
        let (secret, record) = random_secret();
        let info = info(b"ctx", "p", "v");
        let prover = Prover::start(info.clone(), &secret).unwrap();
        let (confirming, _) = Verifier::new(info, &record).respond(prover.share()).unwrap();
        prop_assert!(confirming.finish(&confirm).is_err());
    }
}
