//! SPAKE2+ (RFC 9383), suite P256-SHA256-HKDF-SHA256-HMAC-SHA256, in both roles.
//!
//! The prover (the installer's client) knows the setup code and so `w0` and `w1`; the verifier
//! (the gateway) holds only the record `w0 ‖ L` with `L = w1·P`. The message order is the RFC's:
//! the prover sends `shareP`; the verifier answers `shareV` and `confirmV`; the prover checks
//! `confirmV` before it reveals `confirmP`; the verifier checks `confirmP` before either side
//! uses the shared key. Each session type consumes itself at each step, so a step cannot be run
//! twice with the same secrets.
//!
//! The group arithmetic is RustCrypto's `p256` (constant-time scalars and points); HKDF and HMAC
//! are ring's. What this module adds is what the RFC leaves to implementations and what the
//! libraries do not check for us:
//! - a peer's share is exactly 65 bytes, uncompressed (`0x04`), on the curve, not the identity,
//!   and not the mask (`X − w0·M`, `Y − w0·N` not the identity), all before any math with our
//!   secrets;
//! - the 40-byte PBKDF halves are reduced mod n whole (p256 0.13 reduces only 32 bytes);
//! - confirmations are compared in constant time (`ring::hmac::verify`);
//! - scalars, `Z`, `V`, the transcript and every key are wiped when dropped. Ring's own HMAC
//!   and HKDF states are not (ring offers no way to), nor are short-lived stack copies.

use std::fmt;

use p256::elliptic_curve::ff::{Field as _, PrimeField as _};
use p256::elliptic_curve::group::Group as _;
use p256::elliptic_curve::sec1::{FromEncodedPoint as _, ToEncodedPoint as _};
use p256::{AffinePoint, EncodedPoint, FieldBytes, ProjectivePoint, Scalar};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use sha2::Digest as _;
use zeroize::Zeroizing;

/// A share (`shareP`, `shareV`): an uncompressed SEC1 point.
pub const SHARE_LEN: usize = 65;
/// A confirmation (`confirmP`, `confirmV`): an HMAC-SHA256 tag.
pub const CONFIRM_LEN: usize = 32;
/// A scalar (`w0`, `w1`), big-endian.
pub const SCALAR_LEN: usize = 32;
/// The PBKDF output `w0s ‖ w1s`: two halves of ⌈log2 n⌉ + 64 bits, 40 bytes each.
pub const PBKDF_OUTPUT_LEN: usize = 80;
/// The verifier record `w0 ‖ L`.
pub const RECORD_LEN: usize = SCALAR_LEN + SHARE_LEN;
/// The shared key `K_shared`.
pub const SHARED_KEY_LEN: usize = 32;

/// RFC 9383 §4's M for P-256, uncompressed (as it goes into the transcript).
const M: [u8; SHARE_LEN] = [
    0x04, 0x88, 0x6e, 0x2f, 0x97, 0xac, 0xe4, 0x6e, 0x55, 0xba, 0x9d, 0xd7, 0x24, 0x25, 0x79, 0xf2,
    0x99, 0x3b, 0x64, 0xe1, 0x6e, 0xf3, 0xdc, 0xab, 0x95, 0xaf, 0xd4, 0x97, 0x33, 0x3d, 0x8f, 0xa1,
    0x2f, 0x5f, 0xf3, 0x55, 0x16, 0x3e, 0x43, 0xce, 0x22, 0x4e, 0x0b, 0x0e, 0x65, 0xff, 0x02, 0xac,
    0x8e, 0x5c, 0x7b, 0xe0, 0x94, 0x19, 0xc7, 0x85, 0xe0, 0xca, 0x54, 0x7d, 0x55, 0xa1, 0x2e, 0x2d,
    0x20,
];
/// RFC 9383 §4's N for P-256, uncompressed.
const N: [u8; SHARE_LEN] = [
    0x04, 0xd8, 0xbb, 0xd6, 0xc6, 0x39, 0xc6, 0x29, 0x37, 0xb0, 0x4d, 0x99, 0x7f, 0x38, 0xc3, 0x77,
    0x07, 0x19, 0xc6, 0x29, 0xd7, 0x01, 0x4d, 0x49, 0xa2, 0x4b, 0x4f, 0x98, 0xba, 0xa1, 0x29, 0x2b,
    0x49, 0x07, 0xd6, 0x0a, 0xa6, 0xbf, 0xad, 0xe4, 0x50, 0x08, 0xa6, 0x36, 0x33, 0x7f, 0x51, 0x68,
    0xc6, 0x4d, 0x9b, 0xd3, 0x60, 0x34, 0x80, 0x8c, 0xd5, 0x64, 0x49, 0x0b, 0x1e, 0x65, 0x6e, 0xdb,
    0xe7,
];

/// Why a step of the exchange, or reading a secret or record, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Spake2PlusError {
    /// The peer's share is not a point we may compute with.
    #[error("refusing the peer's share: {0}")]
    BadShare(ShareProblem),
    #[error("refusing the peer's confirmation: it is {len} bytes, not {CONFIRM_LEN}")]
    ConfirmationLength { len: usize },
    /// The peer's confirmation is not the one our keys give: a wrong setup code (or serial, or
    /// context), or tampering on the way.
    #[error(
        "the peer's confirmation does not match ours: a wrong setup code, or the exchange was \
         tampered with"
    )]
    ConfirmationMismatch,
    #[error("reading the SPAKE2+ verifier record: {0}")]
    BadRecord(&'static str),
    #[error("reading the SPAKE2+ secret w0/w1: {0}")]
    BadSecret(&'static str),
    #[error("drawing a random SPAKE2+ scalar: the system's random number generator failed")]
    Random,
    /// A point we computed is the identity, which has no encoding, or the constant M or N did
    /// not decode. Only an astronomically unlikely random scalar (or a bug) gets here.
    #[error("computing the SPAKE2+ point {0}: it is the identity, or not a valid point")]
    Identity(&'static str),
    /// ring refused an HKDF expansion; only a length over 255 blocks can cause it.
    #[error("deriving the SPAKE2+ {0} with HKDF-SHA256 failed")]
    Kdf(&'static str),
}

/// What is wrong with a peer's share (`400 bad_share` at the gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareProblem {
    /// Not 65 bytes: compressed (33), the identity's one byte, or garbage.
    Length(usize),
    /// 65 bytes that do not start with `0x04` (uncompressed).
    NotUncompressed(u8),
    NotOnCurve,
    Identity,
    /// The share equals the mask (`w0·M` or `w0·N`): it would make `Z` and `V` the identity.
    Mask,
}

impl fmt::Display for ShareProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShareProblem::Length(len) => write!(
                f,
                "it is {len} bytes, not the {SHARE_LEN} of an uncompressed P-256 point"
            ),
            ShareProblem::NotUncompressed(prefix) => write!(
                f,
                "it starts with {prefix:#04x}, not 0x04 (an uncompressed P-256 point)"
            ),
            ShareProblem::NotOnCurve => f.write_str("it is not a point on the P-256 curve"),
            ShareProblem::Identity => f.write_str("it is the identity point"),
            ShareProblem::Mask => f.write_str("it equals the mask w0·M or w0·N"),
        }
    }
}

/// What goes into the transcript besides the points: the application's context and the two
/// identities (empty when implicit).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub context: Vec<u8>,
    pub id_prover: Vec<u8>,
    pub id_verifier: Vec<u8>,
}

impl fmt::Debug for SessionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionInfo")
            .field("context", &hex::encode(&self.context))
            .field("id_prover", &String::from_utf8_lossy(&self.id_prover))
            .field("id_verifier", &String::from_utf8_lossy(&self.id_verifier))
            .finish()
    }
}

/// The prover's secret `w0`, `w1`, derived from the setup code.
pub struct ProverSecret {
    w0: Zeroizing<Scalar>,
    w1: Zeroizing<Scalar>,
}

impl fmt::Debug for ProverSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProverSecret { .. }")
    }
}

impl ProverSecret {
    /// From the PBKDF output `w0s ‖ w1s`: each 40-byte half read big-endian and reduced mod n
    /// (RFC 9383 §3.2). A zero scalar is refused.
    pub fn from_pbkdf_output(output: &[u8; PBKDF_OUTPUT_LEN]) -> Result<Self, Spake2PlusError> {
        let (w0s, w1s) = output.split_at(PBKDF_OUTPUT_LEN / 2);
        Self::from_parts(reduce_wide(w0s), reduce_wide(w1s))
    }

    /// From `w0` and `w1` themselves, big-endian (RFC 9383's test vectors give them so); each
    /// must be below n and not zero.
    pub fn from_scalars(
        w0: &[u8; SCALAR_LEN],
        w1: &[u8; SCALAR_LEN],
    ) -> Result<Self, Spake2PlusError> {
        let w0 = scalar_from_bytes(w0).ok_or(Spake2PlusError::BadSecret("w0 is not below n"))?;
        let w1 = scalar_from_bytes(w1).ok_or(Spake2PlusError::BadSecret("w1 is not below n"))?;
        Self::from_parts(w0, w1)
    }

    fn from_parts(w0: Scalar, w1: Scalar) -> Result<Self, Spake2PlusError> {
        let (w0, w1) = (Zeroizing::new(w0), Zeroizing::new(w1));
        if bool::from(w0.is_zero()) || bool::from(w1.is_zero()) {
            return Err(Spake2PlusError::BadSecret("w0 or w1 is zero"));
        }
        Ok(Self { w0, w1 })
    }

    /// The verifier's record: `w0` and `L = w1·P`.
    pub fn record(&self) -> VerifierRecord {
        VerifierRecord {
            w0: self.w0.clone(),
            l: ProjectivePoint::GENERATOR * *self.w1,
        }
    }

    /// `w0` and `w1`, big-endian, for comparing with test vectors.
    #[cfg(test)]
    pub(crate) fn scalars(&self) -> ([u8; SCALAR_LEN], [u8; SCALAR_LEN]) {
        (self.w0.to_bytes().into(), self.w1.to_bytes().into())
    }
}

/// What the verifier stores: `w0` and `L = w1·P`, never `w1`. Whoever holds it can pose as the
/// verifier (the gateway), so it is kept like a key.
#[derive(Clone)]
pub struct VerifierRecord {
    w0: Zeroizing<Scalar>,
    l: ProjectivePoint,
}

impl fmt::Debug for VerifierRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerifierRecord { .. }")
    }
}

impl VerifierRecord {
    /// From `w0 (32 bytes, big-endian) ‖ L (65 bytes, uncompressed)`. `w0` must be below n and
    /// not zero; `L` must be a valid point other than the identity.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Spake2PlusError> {
        if bytes.len() != RECORD_LEN {
            return Err(Spake2PlusError::BadRecord(
                "it is not 97 bytes (w0: 32 bytes, L: 65 bytes)",
            ));
        }
        let (w0, l) = bytes.split_at(SCALAR_LEN);
        let w0 = <&[u8; SCALAR_LEN]>::try_from(w0)
            .ok()
            .and_then(scalar_from_bytes)
            .filter(|w0| !bool::from(w0.is_zero()))
            .ok_or(Spake2PlusError::BadRecord("w0 is zero or not below n"))?;
        let l = decode_point(l).map_err(|_| {
            Spake2PlusError::BadRecord(
                "L is not an uncompressed P-256 point other than the identity",
            )
        })?;
        Ok(Self {
            w0: Zeroizing::new(w0),
            l,
        })
    }

    /// `w0 ‖ L`, 97 bytes.
    pub fn to_bytes(&self) -> Result<Zeroizing<[u8; RECORD_LEN]>, Spake2PlusError> {
        let mut out = Zeroizing::new([0; RECORD_LEN]);
        let (w0, l) = out.split_at_mut(SCALAR_LEN);
        w0.copy_from_slice(&self.w0.to_bytes());
        l.copy_from_slice(&encode(&self.l, "L")?);
        Ok(out)
    }
}

/// `K_shared`: what the application derives its keys from once both confirmations passed.
pub struct SharedKey(Zeroizing<[u8; SHARED_KEY_LEN]>);

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedKey { .. }")
    }
}

impl SharedKey {
    pub(crate) fn as_bytes(&self) -> &[u8; SHARED_KEY_LEN] {
        &self.0
    }
}

/// The verifier (gateway) before the prover's share arrived.
pub struct Verifier {
    info: SessionInfo,
    record: VerifierRecord,
}

/// What the verifier sends back: `shareV` and `confirmV`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierResponse {
    pub share_v: [u8; SHARE_LEN],
    pub confirm_v: [u8; CONFIRM_LEN],
}

/// The verifier after it answered, waiting for `confirmP`.
pub struct VerifierConfirming {
    k_confirm_p: Zeroizing<[u8; 32]>,
    share_v: [u8; SHARE_LEN],
    shared: SharedKey,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for VerifierConfirming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerifierConfirming { .. }")
    }
}

impl Verifier {
    pub fn new(info: SessionInfo, record: &VerifierRecord) -> Self {
        Self {
            info,
            record: record.clone(),
        }
    }

    /// Checks the prover's share `X`, picks a random `y`, and returns `shareV` and `confirmV`.
    /// A refused share ends the session (it is consumed) and reveals nothing.
    pub fn respond(
        self,
        share_p: &[u8],
    ) -> Result<(VerifierConfirming, VerifierResponse), Spake2PlusError> {
        // Checked before drawing y, so a malformed share costs no randomness or math.
        decode_point(share_p).map_err(Spake2PlusError::BadShare)?;
        let y = random_scalar(&SystemRandom::new())?;
        self.respond_with(share_p, &y)
    }

    /// [`Verifier::respond`] with a fixed `y`, for test vectors.
    #[cfg(test)]
    pub(crate) fn respond_with_fixed(
        self,
        share_p: &[u8],
        y: &[u8; SCALAR_LEN],
    ) -> Result<(VerifierConfirming, VerifierResponse), Spake2PlusError> {
        let y = scalar_from_bytes(y).ok_or(Spake2PlusError::BadSecret("y is not below n"))?;
        self.respond_with(share_p, &Zeroizing::new(y))
    }

    fn respond_with(
        self,
        share_p: &[u8],
        y: &Zeroizing<Scalar>,
    ) -> Result<(VerifierConfirming, VerifierResponse), Spake2PlusError> {
        let x_point = decode_point(share_p).map_err(Spake2PlusError::BadShare)?;
        let share_p = <[u8; SHARE_LEN]>::try_from(share_p)
            .map_err(|_| Spake2PlusError::BadShare(ShareProblem::Length(share_p.len())))?;
        let w0 = &self.record.w0;
        // X − w0·M is the identity exactly when X is the mask w0·M.
        let unmasked = x_point - constant_point(&M, "M")? * **w0;
        if bool::from(unmasked.is_identity()) {
            return Err(Spake2PlusError::BadShare(ShareProblem::Mask));
        }
        let y_point = ProjectivePoint::GENERATOR * **y + constant_point(&N, "N")? * **w0;
        let share_v = encode(&y_point, "share Y")?;
        let z = Zeroizing::new(encode(&(unmasked * **y), "Z")?);
        let v = Zeroizing::new(encode(&(self.record.l * **y), "V")?);
        let keys = key_schedule(&transcript(&self.info, &share_p, &share_v, &z, &v, w0))?;
        let confirm_v = hmac_sha256(&*keys.k_confirm_v, &share_p);
        Ok((
            VerifierConfirming {
                k_confirm_p: keys.k_confirm_p,
                share_v,
                shared: SharedKey(keys.k_shared),
            },
            VerifierResponse { share_v, confirm_v },
        ))
    }
}

impl VerifierConfirming {
    /// Checks `confirmP` (constant time); only then is the shared key released.
    pub fn finish(self, confirm_p: &[u8]) -> Result<SharedKey, Spake2PlusError> {
        if confirm_p.len() != CONFIRM_LEN {
            return Err(Spake2PlusError::ConfirmationLength {
                len: confirm_p.len(),
            });
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, &*self.k_confirm_p);
        hmac::verify(&key, &self.share_v, confirm_p)
            .map_err(|_| Spake2PlusError::ConfirmationMismatch)?;
        Ok(self.shared)
    }
}

/// The prover (client) after it sent `shareP`, waiting for `shareV` and `confirmV`.
pub struct Prover {
    info: SessionInfo,
    w0: Zeroizing<Scalar>,
    w1: Zeroizing<Scalar>,
    x: Zeroizing<Scalar>,
    share_p: [u8; SHARE_LEN],
}

impl fmt::Debug for Prover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prover")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// What the prover has once `confirmV` checked out: `confirmP` to send, and the shared key.
pub struct ProverConfirmed {
    pub confirm_p: [u8; CONFIRM_LEN],
    pub shared: SharedKey,
}

impl fmt::Debug for ProverConfirmed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProverConfirmed { .. }")
    }
}

impl Prover {
    /// Picks a random `x` and computes `shareP = x·P + w0·M` ([`Prover::share`]).
    pub fn start(info: SessionInfo, secret: &ProverSecret) -> Result<Self, Spake2PlusError> {
        let x = random_scalar(&SystemRandom::new())?;
        Self::start_with(info, secret, x)
    }

    /// [`Prover::start`] with a fixed `x`, for test vectors.
    #[cfg(test)]
    pub(crate) fn start_with_fixed(
        info: SessionInfo,
        secret: &ProverSecret,
        x: &[u8; SCALAR_LEN],
    ) -> Result<Self, Spake2PlusError> {
        let x = scalar_from_bytes(x).ok_or(Spake2PlusError::BadSecret("x is not below n"))?;
        Self::start_with(info, secret, Zeroizing::new(x))
    }

    fn start_with(
        info: SessionInfo,
        secret: &ProverSecret,
        x: Zeroizing<Scalar>,
    ) -> Result<Self, Spake2PlusError> {
        let x_point = ProjectivePoint::GENERATOR * *x + constant_point(&M, "M")? * *secret.w0;
        Ok(Self {
            info,
            w0: secret.w0.clone(),
            w1: secret.w1.clone(),
            share_p: encode(&x_point, "share X")?,
            x,
        })
    }

    /// `shareP`, to send to the verifier.
    pub fn share(&self) -> &[u8; SHARE_LEN] {
        &self.share_p
    }

    /// Checks the verifier's `shareV` and `confirmV` (constant time) and returns `confirmP` and
    /// the shared key. A refusal means the verifier does not hold the record for this code (a
    /// wrong code, or someone posing as the gateway): send nothing more.
    pub fn finish(
        self,
        share_v: &[u8],
        confirm_v: &[u8],
    ) -> Result<ProverConfirmed, Spake2PlusError> {
        let y_point = decode_point(share_v).map_err(Spake2PlusError::BadShare)?;
        if confirm_v.len() != CONFIRM_LEN {
            return Err(Spake2PlusError::ConfirmationLength {
                len: confirm_v.len(),
            });
        }
        let share_v = <[u8; SHARE_LEN]>::try_from(share_v)
            .map_err(|_| Spake2PlusError::BadShare(ShareProblem::Length(share_v.len())))?;
        // Y − w0·N is the identity exactly when Y is the mask w0·N.
        let unmasked = y_point - constant_point(&N, "N")? * *self.w0;
        if bool::from(unmasked.is_identity()) {
            return Err(Spake2PlusError::BadShare(ShareProblem::Mask));
        }
        let z = Zeroizing::new(encode(&(unmasked * *self.x), "Z")?);
        let v = Zeroizing::new(encode(&(unmasked * *self.w1), "V")?);
        let keys = key_schedule(&transcript(
            &self.info,
            &self.share_p,
            &share_v,
            &z,
            &v,
            &self.w0,
        ))?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &*keys.k_confirm_v);
        hmac::verify(&key, &self.share_p, confirm_v)
            .map_err(|_| Spake2PlusError::ConfirmationMismatch)?;
        Ok(ProverConfirmed {
            confirm_p: hmac_sha256(&*keys.k_confirm_p, &share_v),
            shared: SharedKey(keys.k_shared),
        })
    }
}

/// The keys of RFC 9383 §3.4.
struct Keys {
    #[cfg(test)]
    k_main: Zeroizing<[u8; 32]>,
    k_confirm_p: Zeroizing<[u8; 32]>,
    k_confirm_v: Zeroizing<[u8; 32]>,
    k_shared: Zeroizing<[u8; SHARED_KEY_LEN]>,
}

/// `K_main = SHA-256(TT)`; `K_confirmP ‖ K_confirmV = HKDF(nil, K_main, "ConfirmationKeys")`;
/// `K_shared = HKDF(nil, K_main, "SharedKey")`.
fn key_schedule(tt: &[u8]) -> Result<Keys, Spake2PlusError> {
    let mut k_main = Zeroizing::new([0; 32]);
    sha2::Sha256::new()
        .chain_update(tt)
        .finalize_into((&mut *k_main).into());
    let mut confirmation = Zeroizing::new([0; 64]);
    // RFC 9383's nil salt: HKDF then uses HashLen zero bytes, and HMAC pads a short key with
    // zeros, so the empty salt ring takes is the same key.
    hkdf_sha256(&[], &*k_main, b"ConfirmationKeys", &mut *confirmation)
        .map_err(|()| Spake2PlusError::Kdf("confirmation keys"))?;
    let mut k_shared = Zeroizing::new([0; SHARED_KEY_LEN]);
    hkdf_sha256(&[], &*k_main, b"SharedKey", &mut *k_shared)
        .map_err(|()| Spake2PlusError::Kdf("shared key"))?;
    let (p, v) = confirmation.split_at(32);
    let mut k_confirm_p = Zeroizing::new([0; 32]);
    let mut k_confirm_v = Zeroizing::new([0; 32]);
    k_confirm_p.copy_from_slice(p);
    k_confirm_v.copy_from_slice(v);
    Ok(Keys {
        #[cfg(test)]
        k_main,
        k_confirm_p,
        k_confirm_v,
        k_shared,
    })
}

/// HKDF-SHA256 (RFC 5869) of `ikm` into `out` (up to 255·32 bytes).
pub(crate) fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> Result<(), ()> {
    /// ring wants the output length as a key type.
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let info = [info];
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| ())
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; CONFIRM_LEN] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), message);
    let mut out = [0; CONFIRM_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// TT (RFC 9383 §3.3): Context, idProver, idVerifier, M, N, shareP, shareV, Z, V, w0, each
/// length-prefixed.
fn transcript(
    info: &SessionInfo,
    share_p: &[u8; SHARE_LEN],
    share_v: &[u8; SHARE_LEN],
    z: &[u8; SHARE_LEN],
    v: &[u8; SHARE_LEN],
    w0: &Scalar,
) -> Zeroizing<Vec<u8>> {
    let w0 = Zeroizing::new(<[u8; SCALAR_LEN]>::from(w0.to_bytes()));
    let parts: [&[u8]; 10] = [
        &info.context,
        &info.id_prover,
        &info.id_verifier,
        &M,
        &N,
        share_p,
        share_v,
        z,
        v,
        &*w0,
    ];
    // Sized up front: a vector that grew would leave copies of Z and V behind unwiped.
    let mut tt = Zeroizing::new(Vec::with_capacity(parts.iter().map(|p| 8 + p.len()).sum()));
    for part in parts {
        push_length_prefixed(&mut tt, part);
    }
    tt
}

/// Appends `lp(part)`: its length as 8 bytes little-endian, then the bytes (RFC 9383's framing,
/// also used by the onboarding profile).
pub(crate) fn push_length_prefixed(out: &mut Vec<u8>, part: &[u8]) {
    // usize is at most 64 bits on every target Rust supports, so this never truncates.
    out.extend_from_slice(&(part.len() as u64).to_le_bytes());
    out.extend_from_slice(part);
}

/// A big-endian integer of any length, reduced mod n. Horner's rule in scalar arithmetic:
/// p256 0.13 reduces only 32-byte inputs, and truncating the 40-byte PBKDF halves would give
/// a different (and biased) w0/w1 than every other implementation. Constant time: the steps
/// depend on the length only.
fn reduce_wide(bytes: &[u8]) -> Scalar {
    let radix = Scalar::from(256u64);
    bytes.iter().fold(Scalar::ZERO, |acc, byte| {
        acc * radix + Scalar::from(u64::from(*byte))
    })
}

/// A 32-byte big-endian scalar, `None` when it is not below n.
fn scalar_from_bytes(bytes: &[u8; SCALAR_LEN]) -> Option<Scalar> {
    Option::from(Scalar::from_repr(FieldBytes::from(*bytes)))
}

/// A uniformly random non-zero scalar: 40 random bytes reduced mod n (bias below 2^-64, as for
/// w0 and w1).
fn random_scalar(rng: &dyn SecureRandom) -> Result<Zeroizing<Scalar>, Spake2PlusError> {
    // Zero comes up with probability 2^-256; a generator that keeps giving it is broken.
    for _ in 0..4 {
        let mut bytes = Zeroizing::new([0; PBKDF_OUTPUT_LEN / 2]);
        rng.fill(&mut *bytes).map_err(|_| Spake2PlusError::Random)?;
        let scalar = Zeroizing::new(reduce_wide(&*bytes));
        if !bool::from(scalar.is_zero()) {
            return Ok(scalar);
        }
    }
    Err(Spake2PlusError::Random)
}

/// A peer's point, checked before anything is computed with it: 65 bytes, `0x04`, on the curve,
/// not the identity. (The identity has no 65-byte encoding, so the last check is a guard.)
fn decode_point(bytes: &[u8]) -> Result<ProjectivePoint, ShareProblem> {
    if bytes.len() != SHARE_LEN {
        return Err(ShareProblem::Length(bytes.len()));
    }
    match bytes.first() {
        Some(0x04) => {}
        Some(prefix) => return Err(ShareProblem::NotUncompressed(*prefix)),
        None => return Err(ShareProblem::Length(0)),
    }
    let encoded = EncodedPoint::from_bytes(bytes).map_err(|_| ShareProblem::NotOnCurve)?;
    let affine: Option<AffinePoint> = AffinePoint::from_encoded_point(&encoded).into();
    let point = ProjectivePoint::from(affine.ok_or(ShareProblem::NotOnCurve)?);
    if bool::from(point.is_identity()) {
        return Err(ShareProblem::Identity);
    }
    Ok(point)
}

/// M or N. They are valid points (a test decodes both), so the error is only for form's sake.
fn constant_point(
    bytes: &[u8; SHARE_LEN],
    name: &'static str,
) -> Result<ProjectivePoint, Spake2PlusError> {
    decode_point(bytes).map_err(|_| Spake2PlusError::Identity(name))
}

/// A point as 65 uncompressed bytes; the identity (one byte, `0x00`) is refused.
fn encode(point: &ProjectivePoint, name: &'static str) -> Result<[u8; SHARE_LEN], Spake2PlusError> {
    <[u8; SHARE_LEN]>::try_from(point.to_affine().to_encoded_point(false).as_bytes())
        .map_err(|_| Spake2PlusError::Identity(name))
}

#[cfg(test)]
mod tests;
