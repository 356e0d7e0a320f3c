//! Registration (profile §5.2): from the setup code to the verifier record, and the record's
//! file in the state directory.
//!
//! `pbkdf_in = lp(code) ‖ lp("") ‖ lp(serial)` (RFC 9383's recommended PBKDF input, with the
//! prover's identity unknown at registration), `w0s ‖ w1s = PBKDF2-HMAC-SHA256(pbkdf_in, salt,
//! iterations, 80)`, each half reduced mod n, and the record `w0 ‖ w1·G`. The client runs the
//! same derivation from the label to get `w0` and `w1`.
//!
//! The file, `onboarding.json` in the state directory, holds
//! `{"v":1,"serial","salt","iterations","record"}` with `salt` and `record` (`w0 ‖ L`, 97
//! bytes) in unpadded base64url. It is mode 0600 and written atomically and durably. It never
//! holds the code: whoever reads it can pose as this gateway to an installer, or search for the
//! code offline, which is what the 50-bit code and 100 000 iterations are for.

use std::fs;
use std::io;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

use super::code::{CodeError, SetupCode, check_serial};
use super::spake2plus::{PBKDF_OUTPUT_LEN, ProverSecret, Spake2PlusError, VerifierRecord};
use crate::store::{Durability, StoreError, write_atomic};

/// The record's file name in the state directory.
pub const RECORD_FILE: &str = "onboarding.json";
/// The file format's version (`"v"`).
pub const RECORD_VERSION: u32 = 1;
/// PBKDF2 iterations of a new registration. The gateway never runs the PBKDF after
/// registration; the client pays about 50 ms in Rust and up to a few seconds in a browser.
pub const ITERATIONS: u32 = 100_000;
/// The iteration counts a record may have, and clients accept from a gateway: Matter's floor
/// (tests use it to stay fast) and a ceiling that stops a fake gateway from making a phone spin.
pub const ITERATIONS_RANGE: std::ops::RangeInclusive<u32> = 1_000..=1_000_000;
/// Salt bytes of a new registration.
pub const SALT_LEN: usize = 32;
/// The salt lengths a record may have (Matter's 16 to 32, and room above).
pub const SALT_LEN_RANGE: std::ops::RangeInclusive<usize> = 16..=64;

/// Why a registration could not be made, written or read.
///
/// The message carries the cause itself, and no variant has a `source`, so that a chain of
/// causes (anyhow's `{:#}`) does not print it twice.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{0}")]
    Code(CodeError),
    #[error("deriving the onboarding verifier: {0}")]
    Derive(Spake2PlusError),
    #[error("deriving the onboarding verifier: {0}")]
    Parameters(String),
    #[error("generating the onboarding salt: the system's random number generator failed")]
    Random,
    #[error("writing onboarding record: {0}")]
    Write(StoreError),
    #[error("{action} {}: {error}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    /// No record: this gateway was never registered for onboarding.
    #[error(
        "there is no onboarding record at {}: this gateway has no setup code yet; run \
         `iotctl onboarding register` on it as root",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("reading onboarding record {}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
}

/// A gateway's onboarding registration: what the gateway keeps in place of the code.
#[derive(Debug, Clone)]
pub struct OnboardingRecord {
    pub serial: String,
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub verifier: VerifierRecord,
}

/// The file's JSON, field for field.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    v: u32,
    serial: String,
    salt: String,
    iterations: u32,
    record: String,
}

impl Drop for RecordFile {
    fn drop(&mut self) {
        // `record` holds w0 in base64.
        self.record.zeroize();
    }
}

/// Where the record lives in a state directory.
pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join(RECORD_FILE)
}

/// `lp(code) ‖ lp("") ‖ lp(serial)`, with `lp` an 8-byte little-endian length and the bytes.
pub fn pbkdf_input(code: &SetupCode, serial: &str) -> Zeroizing<Vec<u8>> {
    let parts = [code.digits().as_bytes(), b"", serial.as_bytes()];
    let mut out = Zeroizing::new(Vec::with_capacity(parts.iter().map(|p| 8 + p.len()).sum()));
    for part in parts {
        super::spake2plus::push_length_prefixed(&mut out, part);
    }
    out
}

/// The prover's `w0` and `w1` for a code, serial and PBKDF parameters: what a client derives
/// from the label, and registration from the code it made.
pub fn derive_secret(
    code: &SetupCode,
    serial: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<ProverSecret, RegisterError> {
    check_serial(serial)?;
    check_parameters(salt.len(), iterations).map_err(RegisterError::Parameters)?;
    let iterations = NonZeroU32::new(iterations)
        .ok_or_else(|| RegisterError::Parameters("iterations must not be 0".to_owned()))?;
    let mut output = Zeroizing::new([0; PBKDF_OUTPUT_LEN]);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        &pbkdf_input(code, serial),
        &mut *output,
    );
    Ok(ProverSecret::from_pbkdf_output(&output)?)
}

/// The salt length and iteration count a record may have.
fn check_parameters(salt_len: usize, iterations: u32) -> Result<(), String> {
    if !SALT_LEN_RANGE.contains(&salt_len) {
        return Err(format!(
            "the salt is {salt_len} bytes, not {} to {}",
            SALT_LEN_RANGE.start(),
            SALT_LEN_RANGE.end()
        ));
    }
    if !ITERATIONS_RANGE.contains(&iterations) {
        return Err(format!(
            "{iterations} PBKDF2 iterations are outside {} to {}",
            ITERATIONS_RANGE.start(),
            ITERATIONS_RANGE.end()
        ));
    }
    Ok(())
}

impl From<CodeError> for RegisterError {
    fn from(error: CodeError) -> Self {
        RegisterError::Code(error)
    }
}

impl From<Spake2PlusError> for RegisterError {
    fn from(error: Spake2PlusError) -> Self {
        RegisterError::Derive(error)
    }
}

impl From<StoreError> for RegisterError {
    fn from(error: StoreError) -> Self {
        RegisterError::Write(error)
    }
}

impl OnboardingRecord {
    /// The record for `code` on the gateway `serial`.
    pub fn create(
        code: &SetupCode,
        serial: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<Self, RegisterError> {
        let verifier = derive_secret(code, serial, salt, iterations)?.record();
        Ok(Self {
            serial: serial.to_owned(),
            salt: salt.to_vec(),
            iterations,
            verifier,
        })
    }

    /// A new code with a new 32-byte salt and 100 000 iterations: what `iotctl onboarding
    /// register` makes. The code is returned for the label, and is not in the record.
    pub fn generate(serial: &str) -> Result<(SetupCode, Self), RegisterError> {
        check_serial(serial)?;
        let code = SetupCode::generate()?;
        let mut salt = [0; SALT_LEN];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| RegisterError::Random)?;
        let record = Self::create(&code, serial, &salt, ITERATIONS)?;
        Ok((code, record))
    }

    /// The file's contents.
    pub fn to_json(&self) -> Result<Zeroizing<Vec<u8>>, RegisterError> {
        let record = self.verifier.to_bytes()?;
        let file = RecordFile {
            v: RECORD_VERSION,
            serial: self.serial.clone(),
            salt: URL_SAFE_NO_PAD.encode(&self.salt),
            iterations: self.iterations,
            record: URL_SAFE_NO_PAD.encode(record.as_slice()),
        };
        let mut json = serde_json::to_vec_pretty(&file)
            .map_err(|e| RegisterError::Parameters(format!("encoding the record as JSON: {e}")))?;
        json.push(b'\n');
        Ok(Zeroizing::new(json))
    }

    /// Reads the file's contents; the error says what is wrong, for [`RegisterError::Invalid`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let file: RecordFile =
            serde_json::from_slice(bytes).map_err(|e| format!("it is not a record: {e}"))?;
        if file.v != RECORD_VERSION {
            return Err(format!(
                "it has version {}, and this iotd reads version {RECORD_VERSION}",
                file.v
            ));
        }
        check_serial(&file.serial).map_err(|e| e.to_string())?;
        let salt = URL_SAFE_NO_PAD
            .decode(&file.salt)
            .map_err(|e| format!("salt is not unpadded base64url: {e}"))?;
        check_parameters(salt.len(), file.iterations)?;
        let record = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(&file.record)
                .map_err(|e| format!("record is not unpadded base64url: {e}"))?,
        );
        let verifier = VerifierRecord::from_bytes(&record).map_err(|e| e.to_string())?;
        Ok(Self {
            serial: file.serial.clone(),
            salt,
            iterations: file.iterations,
            verifier,
        })
    }

    /// Reads the record file; a missing one is [`RegisterError::Missing`].
    pub fn read(path: &Path) -> Result<Self, RegisterError> {
        let bytes = Zeroizing::new(fs::read(path).map_err(|error| {
            if error.kind() == io::ErrorKind::NotFound {
                RegisterError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                RegisterError::Io {
                    action: "reading onboarding record",
                    path: path.to_path_buf(),
                    error,
                }
            }
        })?);
        Self::from_json(&bytes).map_err(|problem| RegisterError::Invalid {
            path: path.to_path_buf(),
            problem,
        })
    }

    /// Writes the record file, mode 0600, atomically and durably (temp file, fsync, rename,
    /// fsync of the directory), then gives it to `owner` (uid, gid) when one is named. The
    /// directory must exist.
    pub fn write(&self, path: &Path, owner: Option<(u32, u32)>) -> Result<(), RegisterError> {
        write_atomic(path, &self.to_json()?, 0o600, Durability::Durable)?;
        if let Some((uid, gid)) = owner {
            let io_error = |action| {
                move |error| RegisterError::Io {
                    action,
                    path: path.to_path_buf(),
                    error,
                }
            };
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(io_error("giving to its owner onboarding record"))?;
            // The new owner is metadata of the file, which the rename's sync did not cover.
            fs::File::open(path)
                .and_then(|file| file.sync_all())
                .map_err(io_error("syncing onboarding record"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;
    use crate::onboard::vectors::{bytes, draft, number, text};

    #[test]
    fn the_draft_registration_vector_passes() {
        for v in draft() {
            let code = SetupCode::parse(&text(&v, "setup_code")).unwrap();
            let serial = text(&v, "serial_ascii");
            assert_eq!(
                pbkdf_input(&code, &serial)[..],
                bytes(&v, "pbkdf.input")[..]
            );
            let salt = bytes(&v, "pbkdf.salt");
            let iterations = u32::try_from(number(&v, "pbkdf.iterations")).unwrap();
            assert_eq!(iterations, 1000);
            let secret = derive_secret(&code, &serial, &salt, iterations).unwrap();
            assert_eq!(
                secret.scalars(),
                (
                    <[u8; 32]>::try_from(bytes(&v, "w0")).unwrap(),
                    <[u8; 32]>::try_from(bytes(&v, "w1")).unwrap()
                )
            );
            let record = OnboardingRecord::create(&code, &serial, &salt, iterations).unwrap();
            assert_eq!(
                record.verifier.to_bytes().unwrap()[..],
                bytes(&v, "record_w0_L")[..]
            );
            assert_eq!(record.serial, serial);
        }
    }

    #[test]
    fn the_record_file_round_trips_with_mode_0600_and_no_code() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path());
        assert_eq!(path, dir.path().join("onboarding.json"));
        let v = &draft()[0];
        let code = SetupCode::parse(&text(v, "setup_code")).unwrap();
        let record =
            OnboardingRecord::create(&code, "IOTGW-0001234", &bytes(v, "pbkdf.salt"), 1000)
                .unwrap();
        record.write(&path, None).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "v": 1,
                "serial": "IOTGW-0001234",
                "salt": URL_SAFE_NO_PAD.encode(bytes(v, "pbkdf.salt")),
                "iterations": 1000,
                "record": URL_SAFE_NO_PAD.encode(bytes(v, "record_w0_L")),
            })
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(code.digits()), "{text}");

        let read = OnboardingRecord::read(&path).unwrap();
        assert_eq!(read.serial, record.serial);
        assert_eq!(read.salt, record.salt);
        assert_eq!(read.iterations, 1000);
        assert_eq!(
            read.verifier.to_bytes().unwrap()[..],
            record.verifier.to_bytes().unwrap()[..]
        );
    }

    #[test]
    fn writing_gives_the_file_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path());
        let (_, record) = OnboardingRecord::generate("GW-1").unwrap();
        // To ourselves, which any user may do.
        let me = fs::metadata(dir.path()).unwrap();
        record.write(&path, Some((me.uid(), me.gid()))).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (me.uid(), me.gid()));
        // Replacing an existing record.
        let (_, other) = OnboardingRecord::generate("GW-2").unwrap();
        other.write(&path, None).unwrap();
        assert_eq!(OnboardingRecord::read(&path).unwrap().serial, "GW-2");
        // A directory that is not there.
        let error = record
            .write(&dir.path().join("missing/onboarding.json"), None)
            .unwrap_err();
        assert!(
            error.to_string().starts_with("writing onboarding record: "),
            "{error}"
        );
    }

    #[test]
    fn a_generated_registration_verifies_against_its_code() {
        let (code, record) = OnboardingRecord::generate("IOTGW-0001234").unwrap();
        assert_eq!(record.iterations, ITERATIONS);
        assert_eq!(record.salt.len(), SALT_LEN);
        let again = derive_secret(&code, &record.serial, &record.salt, record.iterations)
            .unwrap()
            .record();
        assert_eq!(
            again.to_bytes().unwrap()[..],
            record.verifier.to_bytes().unwrap()[..]
        );
        let (other_code, other) = OnboardingRecord::generate("IOTGW-0001234").unwrap();
        assert_ne!(other_code, code);
        assert_ne!(other.salt, record.salt);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let code = SetupCode::generate().unwrap();
        for (serial, salt, iterations, says) in [
            ("GW:1", 32, 1000, "':'"),
            ("GW-1", 8, 1000, "salt is 8 bytes"),
            ("GW-1", 32, 999, "999 PBKDF2 iterations"),
            ("GW-1", 32, 1_000_001, "outside 1000 to 1000000"),
        ] {
            let error = OnboardingRecord::create(&code, serial, &vec![7; salt], iterations)
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{error}");
        }
        assert!(OnboardingRecord::generate("").is_err());
    }

    #[test]
    fn reading_a_missing_or_damaged_record_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path());
        let error = OnboardingRecord::read(&path).unwrap_err();
        assert!(matches!(error, RegisterError::Missing { .. }));
        assert!(
            error
                .to_string()
                .contains("run `iotctl onboarding register`"),
            "{error}"
        );

        let (_, record) = OnboardingRecord::generate("GW-1").unwrap();
        let good: serde_json::Value = serde_json::from_slice(&record.to_json().unwrap()).unwrap();
        let with = |key: &str, value: serde_json::Value| {
            let mut json = good.clone();
            json[key] = value;
            json.to_string()
        };
        for (contents, says) in [
            ("".to_owned(), "it is not a record"),
            ("{}".to_owned(), "missing field"),
            (with("extra", 1.into()), "unknown field"),
            (with("v", 2.into()), "version 2"),
            (with("serial", "".into()), "empty"),
            (with("salt", "!!".into()), "salt is not unpadded base64url"),
            (with("salt", "AAAA".into()), "salt is 3 bytes"),
            (with("iterations", 10.into()), "10 PBKDF2 iterations"),
            (with("record", "AAAA".into()), "not 97 bytes"),
            (
                with("record", "==".into()),
                "record is not unpadded base64url",
            ),
        ] {
            fs::write(&path, &contents).unwrap();
            let error = OnboardingRecord::read(&path).unwrap_err();
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("reading onboarding record {}: ", path.display())),
                "{message}"
            );
            assert!(message.contains(says), "{says}: {message}");
        }

        let error = OnboardingRecord::read(dir.path()).unwrap_err();
        assert!(matches!(error, RegisterError::Io { .. }), "{error}");
        assert!(error.to_string().contains("Is a directory"), "{error}");
        // The cause is in the message, so no chain of causes repeats it.
        assert!(std::error::Error::source(&error).is_none());
    }

    #[test]
    fn the_json_form_round_trips() {
        let (_, record) = OnboardingRecord::generate("GW-1").unwrap();
        let json = record.to_json().unwrap();
        assert!(json.ends_with(b"}\n"));
        let back = OnboardingRecord::from_json(&json).unwrap();
        assert_eq!(back.serial, "GW-1");
        assert_eq!(back.salt, record.salt);
    }
}
