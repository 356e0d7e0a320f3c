//! The setup code on the gateway's label, and the QR payload that carries it with the serial.
//!
//! A code is 15 random digits and a Verhoeff check digit, printed `XXXX-XXXX-XXXX-XXXX`: about
//! 50 bits, enough that a stolen verifier record does not fall to an offline search (the
//! protocol note's §4 has the arithmetic), and still a numeric keypad's worth to type. The
//! check digit lets a client refuse a typo before any network call, so a typo never costs one
//! of the window's 20 attempts: Verhoeff catches every single wrong digit and every swap of two
//! neighbours. The QR payload is `IOTD1:<SERIAL>:<16 digits>`, never Matter's `MT:`, which
//! Matter apps would try to commission.

use std::fmt;

use ring::rand::{SecureRandom as _, SystemRandom};
use zeroize::Zeroizing;

/// Digits in a setup code, the check digit included.
pub const CODE_DIGITS: usize = 16;
/// The start of a QR payload.
pub const QR_PREFIX: &str = "IOTD1:";
/// The longest serial: it is SPAKE2+'s idVerifier and goes on a label and into a QR code.
pub const MAX_SERIAL_LEN: usize = 64;

/// Random digits drawn before the check digit.
const RANDOM_DIGITS: usize = CODE_DIGITS - 1;
/// Random bytes at or above this are redrawn: 250 is the largest multiple of 10 that fits a
/// byte, so `byte % 10` of the rest is uniform.
const BYTE_LIMIT: u8 = 250;
/// How many batches of random bytes may be drawn before the generator is judged broken: each
/// byte is kept with probability 250/256, so a working one never needs more than one or two.
const MAX_BATCHES: usize = 16;

/// Why a setup code, serial or QR payload was refused, or a code not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// Counted from 1 over the text as given; the character itself is not shown, as it is part
    /// of a secret.
    #[error(
        "reading the setup code: character {position} is not a digit (a setup code is 16 \
         digits, XXXX-XXXX-XXXX-XXXX; spaces and hyphens are ignored)"
    )]
    NotADigit { position: usize },
    #[error("reading the setup code: it has {digits} digits, not 16")]
    Length { digits: usize },
    #[error(
        "reading the setup code: its check digit does not match; a digit is mistyped, or two \
         are swapped"
    )]
    CheckDigit,
    #[error("generating a setup code: the system's random number generator failed")]
    Random,
    #[error("serial {serial:?}: {problem}")]
    Serial {
        serial: String,
        problem: &'static str,
    },
    #[error("reading the QR payload: {0}")]
    Qr(&'static str),
}

/// A setup code: 16 ASCII digits, the last a valid Verhoeff check digit. Wiped when dropped;
/// `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SetupCode {
    digits: Zeroizing<[u8; CODE_DIGITS]>,
}

impl fmt::Debug for SetupCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SetupCode { .. }")
    }
}

impl SetupCode {
    /// A new code from the system's random number generator.
    pub fn generate() -> Result<Self, CodeError> {
        let rng = SystemRandom::new();
        Self::from_random(&mut |buffer| rng.fill(buffer).map_err(|_| ()))
    }

    /// A new code from `fill`, which fills a buffer with random bytes: 15 digits by rejection
    /// sampling (bytes of 250 and above are redrawn), then the check digit.
    fn from_random(fill: &mut dyn FnMut(&mut [u8]) -> Result<(), ()>) -> Result<Self, CodeError> {
        let mut digits = Zeroizing::new([0; CODE_DIGITS]);
        let mut drawn = 0;
        for _ in 0..MAX_BATCHES {
            let mut batch = Zeroizing::new([0; 2 * RANDOM_DIGITS]);
            fill(&mut *batch).map_err(|()| CodeError::Random)?;
            for byte in batch.iter().filter(|b| **b < BYTE_LIMIT) {
                if drawn < RANDOM_DIGITS {
                    digits[drawn] = byte % 10;
                    drawn += 1;
                }
            }
            if drawn == RANDOM_DIGITS {
                digits[RANDOM_DIGITS] = check_digit(&digits[..RANDOM_DIGITS]);
                for digit in digits.iter_mut() {
                    *digit += b'0';
                }
                return Ok(Self { digits });
            }
        }
        Err(CodeError::Random)
    }

    /// Reads a code as a person types it: spaces and hyphens anywhere are ignored; then it
    /// must be 16 digits whose check digit matches.
    pub fn parse(text: &str) -> Result<Self, CodeError> {
        let mut digits = Zeroizing::new([0; CODE_DIGITS]);
        let mut count = 0;
        for (index, c) in text.chars().enumerate() {
            if c == '-' || c.is_whitespace() {
                continue;
            }
            if !c.is_ascii_digit() {
                return Err(CodeError::NotADigit {
                    position: index + 1,
                });
            }
            if let Some(slot) = digits.get_mut(count) {
                // An ASCII digit is one byte.
                *slot = c as u8;
            }
            count += 1;
        }
        if count != CODE_DIGITS {
            return Err(CodeError::Length { digits: count });
        }
        let values = Zeroizing::new(digits.map(|d| d - b'0'));
        if !verhoeff_valid(&*values) {
            return Err(CodeError::CheckDigit);
        }
        Ok(Self { digits })
    }

    /// The 16 digits without separators: what the PBKDF takes.
    pub fn digits(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&*self.digits).unwrap_or_default()
    }

    /// `XXXX-XXXX-XXXX-XXXX`, as printed on the label.
    pub fn formatted(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(CODE_DIGITS + 3));
        for (index, digit) in self.digits().chars().enumerate() {
            if index > 0 && index % 4 == 0 {
                out.push('-');
            }
            out.push(digit);
        }
        out
    }
}

/// Checks a serial for use as SPAKE2+'s idVerifier, on a label and in the QR payload: 1 to 64
/// printable ASCII characters, no spaces, no `:` (the payload's separator). Upper-case
/// letters, digits and `-` `.` `/` keep the QR code in its compact alphanumeric mode.
pub fn check_serial(serial: &str) -> Result<(), CodeError> {
    let problem = if serial.is_empty() {
        Some("it is empty")
    } else if serial.len() > MAX_SERIAL_LEN {
        Some("it is longer than 64 characters")
    } else if !serial.bytes().all(|b| b.is_ascii_graphic()) {
        Some("it has characters other than printable ASCII (or spaces)")
    } else if serial.contains(':') {
        Some("it contains ':', which separates the QR payload's fields")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(CodeError::Serial {
            serial: serial.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

/// `IOTD1:<SERIAL>:<16 digits>`, the text of the label's QR code.
pub fn qr_payload(serial: &str, code: &SetupCode) -> Result<Zeroizing<String>, CodeError> {
    check_serial(serial)?;
    Ok(Zeroizing::new(format!(
        "{QR_PREFIX}{serial}:{}",
        code.digits()
    )))
}

/// Reads a QR payload: the serial and the code (16 digits, no separators, check digit valid).
pub fn parse_qr(payload: &str) -> Result<(String, SetupCode), CodeError> {
    let rest = payload.strip_prefix(QR_PREFIX).ok_or(CodeError::Qr(
        "it does not start with IOTD1: (not an iotd label)",
    ))?;
    let (serial, digits) = rest
        .rsplit_once(':')
        .ok_or(CodeError::Qr("it has no setup code after the serial"))?;
    check_serial(serial)?;
    if digits.len() != CODE_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CodeError::Qr("the setup code is not 16 digits"));
    }
    Ok((serial.to_owned(), SetupCode::parse(digits)?))
}

/// Verhoeff's dihedral group D5 multiplication table.
const VERHOEFF_D: [[u8; 10]; 10] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
];
/// Verhoeff's position permutations; row i applies to the digit i places from the right.
const VERHOEFF_P: [[u8; 10]; 8] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
    [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
    [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
];
const VERHOEFF_INVERSE: [u8; 10] = [0, 4, 3, 2, 1, 5, 6, 7, 8, 9];

/// Verhoeff's checksum of digit values (0 to 9), the rightmost at `offset` places from the
/// right.
fn verhoeff_checksum(digits: &[u8], offset: usize) -> u8 {
    digits.iter().rev().enumerate().fold(0, |check, (i, d)| {
        let permuted = VERHOEFF_P[(i + offset) % 8][usize::from(*d % 10)];
        VERHOEFF_D[usize::from(check)][usize::from(permuted)]
    })
}

/// The Verhoeff check digit (0 to 9) to append to `digits` (values 0 to 9).
pub fn check_digit(digits: &[u8]) -> u8 {
    VERHOEFF_INVERSE[usize::from(verhoeff_checksum(digits, 1))]
}

/// Whether `digits` (values 0 to 9) end in their valid Verhoeff check digit.
pub fn verhoeff_valid(digits: &[u8]) -> bool {
    !digits.is_empty() && digits.iter().all(|d| *d < 10) && verhoeff_checksum(digits, 0) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;
    use crate::onboard::vectors::{draft, text};

    fn values(code: &str) -> Vec<u8> {
        code.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn verhoeff_matches_the_published_examples() {
        assert_eq!(check_digit(&[2, 3, 6]), 3);
        assert_eq!(check_digit(&[1, 2, 3, 4, 5]), 1);
        assert!(verhoeff_valid(&[2, 3, 6, 3]));
        assert!(!verhoeff_valid(&[2, 3, 6, 4]));
        assert!(!verhoeff_valid(&[]));
        assert!(!verhoeff_valid(&[2, 3, 6, 13]), "not digits");
    }

    /// Every single-digit substitution and every swap of two different neighbours of one valid
    /// code is refused: all 144 and 15 of them.
    #[test]
    fn every_substitution_and_adjacent_transposition_is_refused() {
        let code = "8271936405182740";
        assert!(SetupCode::parse(code).is_ok());
        let digits = values(code);
        let mut tried = 0;
        for position in 0..CODE_DIGITS {
            for digit in 0..10 {
                if digit == digits[position] {
                    continue;
                }
                let mut changed = digits.clone();
                changed[position] = digit;
                assert!(!verhoeff_valid(&changed), "{changed:?}");
                let text: String = changed.iter().map(|d| char::from(b'0' + d)).collect();
                assert_eq!(SetupCode::parse(&text), Err(CodeError::CheckDigit));
                tried += 1;
            }
        }
        assert_eq!(tried, 16 * 9);
        for position in 0..CODE_DIGITS - 1 {
            let mut swapped = digits.clone();
            swapped.swap(position, position + 1);
            if swapped != digits {
                assert!(!verhoeff_valid(&swapped), "swap at {position}");
            }
        }
    }

    #[test]
    fn the_draft_vector_code_is_valid_and_normalises() {
        for v in draft() {
            let code = SetupCode::parse(&text(&v, "setup_code")).unwrap();
            assert_eq!(code.digits(), text(&v, "setup_code_normalized"));
            assert_eq!(*code.formatted(), text(&v, "setup_code"));
        }
    }

    #[test]
    fn parsing_ignores_spaces_and_hyphens_only() {
        for written in [
            "8271-9364-0518-2740",
            "8271 9364 0518 2740",
            " 82719364-05182740 ",
            "8-2-7-1-9-3-6-4-0-5-1-8-2-7-4-0",
            "8271\t9364 0518\n2740",
        ] {
            assert_eq!(
                SetupCode::parse(written).unwrap().digits(),
                "8271936405182740"
            );
        }
        assert_eq!(
            SetupCode::parse("8271_9364_0518_2740"),
            Err(CodeError::NotADigit { position: 5 })
        );
        assert_eq!(
            SetupCode::parse("８２７１"),
            Err(CodeError::NotADigit { position: 1 }),
            "only ASCII digits"
        );
    }

    #[test]
    fn a_wrong_length_is_refused() {
        for (text, digits) in [
            ("", 0),
            ("8271-9364-0518-274", 15),
            ("8271-9364-0518-27400", 17),
            ("82719364051827408271936405182740", 32),
        ] {
            assert_eq!(SetupCode::parse(text), Err(CodeError::Length { digits }));
        }
    }

    #[test]
    fn generated_codes_are_valid_and_differ() {
        let a = SetupCode::generate().unwrap();
        let b = SetupCode::generate().unwrap();
        assert_ne!(a.digits(), b.digits());
        for code in [&a, &b] {
            assert_eq!(SetupCode::parse(code.digits()).unwrap(), *code);
            assert_eq!(code.formatted().len(), 19);
        }
    }

    #[test]
    fn generation_redraws_bytes_that_would_bias_the_digits() {
        // 250..=255 are skipped; the others give byte % 10.
        let mut source = [
            250u8, 255, 3, 251, 14, 249, 100, 7, 8, 19, 200, 31, 42, 53, 64, 75, 86,
        ]
        .into_iter()
        .chain(std::iter::repeat(0));
        let code = SetupCode::from_random(&mut |buffer| {
            buffer
                .iter_mut()
                .for_each(|b| *b = source.next().unwrap_or(0));
            Ok(())
        })
        .unwrap();
        let expected: Vec<u8> = [3, 4, 9, 0, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 0].to_vec();
        assert_eq!(values(&code.digits()[..15]), expected);
        assert!(verhoeff_valid(&values(code.digits())));
    }

    #[test]
    fn a_failing_or_stuck_generator_is_an_error() {
        assert_eq!(
            SetupCode::from_random(&mut |_| Err(())),
            Err(CodeError::Random)
        );
        assert_eq!(
            SetupCode::from_random(&mut |buffer| {
                buffer.fill(0xff);
                Ok(())
            }),
            Err(CodeError::Random)
        );
    }

    #[test]
    fn digits_are_uniform_enough() {
        // 1000 codes, 15 000 digits: each digit value 1500 ± 5 standard deviations (≈ 37).
        let mut counts = [0usize; 10];
        for _ in 0..1000 {
            let code = SetupCode::generate().unwrap();
            for d in values(&code.digits()[..15]) {
                counts[usize::from(d)] += 1;
            }
        }
        assert!(
            counts.iter().all(|c| (1300..=1700).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn the_qr_payload_round_trips() {
        let code = SetupCode::parse("8271-9364-0518-2740").unwrap();
        let payload = qr_payload("IOTGW-0001234", &code).unwrap();
        assert_eq!(*payload, "IOTD1:IOTGW-0001234:8271936405182740");
        let (serial, parsed) = parse_qr(&payload).unwrap();
        assert_eq!(serial, "IOTGW-0001234");
        assert_eq!(parsed, code);
    }

    #[test]
    fn a_bad_qr_payload_is_refused() {
        for (payload, says) in [
            ("MT:Y.K9042C00KA0648G00", "IOTD1:"),
            ("IOTD1:IOTGW-1", "no setup code"),
            ("IOTD1:IOTGW-1:8271-9364-0518-2740", "not 16 digits"),
            ("IOTD1:IOTGW-1:827193640518274", "not 16 digits"),
            ("IOTD1::8271936405182740", "empty"),
            ("IOTD1:A:B:8271936405182740", "':'"),
            ("IOTD1:IOTGW-1:8271936405182741", "check digit"),
        ] {
            let error = parse_qr(payload).unwrap_err().to_string();
            assert!(error.contains(says), "{payload}: {error}");
        }
    }

    #[test]
    fn serials_are_checked() {
        check_serial("IOTGW-0001234").unwrap();
        check_serial(&"A".repeat(64)).unwrap();
        for (serial, says) in [
            ("", "empty"),
            (&*"A".repeat(65), "longer than 64"),
            ("GW 1", "printable ASCII"),
            ("GW-é", "printable ASCII"),
            ("GW:1", "':'"),
        ] {
            let error = check_serial(serial).unwrap_err().to_string();
            assert!(error.contains(says), "{serial}: {error}");
        }
        let code = SetupCode::generate().unwrap();
        assert!(qr_payload("GW:1", &code).is_err());
    }

    #[test]
    fn the_code_is_not_shown_by_debug() {
        let code = SetupCode::generate().unwrap();
        assert_eq!(format!("{code:?}"), "SetupCode { .. }");
    }

    proptest! {
        /// Any text is read or refused, never a panic; whatever is read is a valid code that
        /// reads the same again.
        #[test]
        fn any_text_is_parsed_or_refused(text in "\\PC{0,40}") {
            if let Ok(code) = SetupCode::parse(&text) {
                prop_assert_eq!(SetupCode::parse(&code.formatted()).unwrap(), code);
            }
            let _ = parse_qr(&text);
        }

        /// Any 15 digits with their check digit are a code, in every written form.
        #[test]
        fn any_code_with_its_check_digit_parses(digits in proptest::collection::vec(0u8..10, 15)) {
            let mut all = digits.clone();
            all.push(check_digit(&digits));
            let text: String = all.iter().map(|d| char::from(b'0' + d)).collect();
            let code = SetupCode::parse(&text).unwrap();
            prop_assert_eq!(code.digits(), text.as_str());
            prop_assert_eq!(&SetupCode::parse(&code.formatted()).unwrap(), &code);
            let (serial, from_qr) = parse_qr(&qr_payload("GW-1", &code).unwrap()).unwrap();
            prop_assert_eq!(serial, "GW-1");
            prop_assert_eq!(from_qr, code);
        }
    }
}
