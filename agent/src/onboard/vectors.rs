//! The published test vectors, read from `agent/tests/fixtures/onboarding/` (copies of the
//! protocol note's files, so that a fresh clone has them): RFC 9383 App. C (P256-SHA256) and the
//! `iotd-onboard/1` draft vectors (one case with TLS binding, one without).
#![allow(clippy::unwrap_used)]

use serde_json::Value;

const RFC: &str = include_str!("../../tests/fixtures/onboarding/rfc9383-p256-sha256.json");
const DRAFT: &str = include_str!("../../tests/fixtures/onboarding/iotd-onboard-v1-draft.json");

/// RFC 9383's P256-SHA256-HKDF-SHA256-HMAC-SHA256 vector.
pub(crate) fn rfc() -> Value {
    serde_json::from_str(RFC).unwrap()
}

/// The profile's draft cases.
pub(crate) fn draft() -> Vec<Value> {
    let cases: Vec<Value> = serde_json::from_str(DRAFT).unwrap();
    assert_eq!(cases.len(), 2, "both draft cases are there");
    cases
}

/// The value at `path` (keys joined by dots).
fn at<'a>(vector: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(vector, |value, key| {
        value
            .get(key)
            .unwrap_or_else(|| panic!("no {path} in the vector"))
    })
}

/// The hex value at `path`, decoded.
pub(crate) fn bytes(vector: &Value, path: &str) -> Vec<u8> {
    hex::decode(text(vector, path)).unwrap()
}

/// The hex value at `path` as an array of exactly `N` bytes.
pub(crate) fn array<const N: usize>(vector: &Value, path: &str) -> [u8; N] {
    <[u8; N]>::try_from(bytes(vector, path)).unwrap_or_else(|v| panic!("{path}: {} bytes", v.len()))
}

/// The string at `path`.
pub(crate) fn text(vector: &Value, path: &str) -> String {
    at(vector, path).as_str().unwrap().to_owned()
}

/// The integer at `path`.
pub(crate) fn number(vector: &Value, path: &str) -> u64 {
    at(vector, path).as_u64().unwrap()
}
