//! Trusted-user onboarding (profile `iotd-onboard/1`): an installer's client hands the gateway
//! an AWS claim over HTTPS, authenticated by SPAKE2+ with the 16-digit setup code on the
//! gateway's label.
//!
//! - `spake2plus`: RFC 9383 SPAKE2+ (P256-SHA256-HKDF-SHA256-HMAC-SHA256), prover and verifier.
//! - `code`: the setup code (15 random digits and a Verhoeff check digit) and the QR payload.
//! - `register`: the code → PBKDF2 → `w0 ‖ L` derivation and the verifier record file
//!   (`onboarding.json` in the state directory), which never holds the code.
//! - `session`: the profile's context hash, application keys and sealed messages.
//!
//! The reference is the protocol note's §5 (`onboarding-protocol.md`); its vectors are in
//! `agent/tests/fixtures/onboarding/`.

pub mod code;
pub mod register;
pub mod session;
pub mod spake2plus;
#[cfg(test)]
mod vectors;
