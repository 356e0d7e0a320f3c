//! Trusted-user onboarding (profile `iotd-onboard/1`): an installer's client hands the gateway
//! an AWS claim over HTTPS, authenticated by SPAKE2+ with the 16-digit setup code on the
//! gateway's label.
//!
//! - `spake2plus`: RFC 9383 SPAKE2+ (P256-SHA256-HKDF-SHA256-HMAC-SHA256), prover and verifier.
//! - `code`: the setup code (15 random digits and a Verhoeff check digit) and the QR payload.
//! - `register`: the code → PBKDF2 → `w0 ‖ L` derivation and the verifier record file
//!   (`onboarding.json` in the state directory), which never holds the code.
//! - `session`: the profile's context hash, application keys and sealed messages.
//! - `bundle`: the claim bundle the installer hands over (its JSON, limits and the gateway's
//!   policy on templates, endpoints and parameters), opened into a claim.
//! - `port`: what the onboarding server and the core say to each other.
//! - `server`: the HTTPS API of §5.4 (axum over rustls): sessions, SPAKE2+ as the verifier, the
//!   sealed claim, status and events; it talks to the core through the port.
//! - `window`: when pairing is allowed, and the attempt counter.
//! - `certificate`: the server's self-signed certificate for the backend's onboarding key.
//! - `run`: starting the server as a supervised task.
//! - `discovery`: announcing the gateway (DNS-SD `_iotd-onboard._tcp` through Avahi) while the
//!   window is open, and the Avahi D-Bus API that `iotctl onboard --discover` browses with.
//!
//! The reference is the protocol note's §5 (`onboarding-protocol.md`); its vectors are in
//! `agent/tests/fixtures/onboarding/`.

pub mod bundle;
pub mod certificate;
pub mod code;
pub mod discovery;
pub mod page;
pub mod port;
pub mod register;
pub mod run;
pub mod server;
pub mod session;
pub mod spake2plus;
#[cfg(test)]
mod vectors;
pub mod window;
