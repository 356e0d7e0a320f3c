//! The few fields iotd reads from an X.509 certificate (RFC 5280 §4.1): the validity and the
//! SubjectPublicKeyInfo, by walking the DER structure. Certificates are verified by rustls and
//! webpki when they are used; this reader only has to find two fields and refuse anything that
//! is not the shape of a certificate. A general X.509 parser (x509-parser, with its nom, BER
//! and OID-registry stack) was about 100 KB of a binary that has to fit a gateway's flash.

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT Version`.
const VERSION: u8 = 0xa0;

/// What iotd reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields<'a> {
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// The SubjectPublicKeyInfo, DER, whole (tag and length included).
    pub spki: &'a [u8],
}

/// Reads `der` as a certificate: `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm,
/// signatureValue }` with nothing after it. The error says what was not as expected.
pub fn parse(der: &[u8]) -> Result<Fields<'_>, String> {
    let mut outer = Reader::new(der);
    let certificate = outer.expect(SEQUENCE, "the certificate")?;
    outer.end("the certificate")?;
    let mut certificate = Reader::new(certificate.content);
    let tbs = certificate.expect(SEQUENCE, "tbsCertificate")?;
    certificate.expect(SEQUENCE, "signatureAlgorithm")?;
    certificate.expect(BIT_STRING, "signatureValue")?;
    certificate.end("the certificate's fields")?;

    let mut tbs = Reader::new(tbs.content);
    if tbs.peek() == Some(VERSION) {
        tbs.next("version")?;
    }
    tbs.expect(INTEGER, "serialNumber")?;
    tbs.expect(SEQUENCE, "signature")?;
    tbs.expect(SEQUENCE, "issuer")?;
    let validity = tbs.expect(SEQUENCE, "validity")?;
    tbs.expect(SEQUENCE, "subject")?;
    let spki = tbs.expect(SEQUENCE, "subjectPublicKeyInfo")?;
    // issuerUniqueID, subjectUniqueID and extensions may follow; they are not read.

    let mut spki_fields = Reader::new(spki.content);
    spki_fields.expect(SEQUENCE, "the public key's algorithm")?;
    spki_fields.expect(BIT_STRING, "subjectPublicKey")?;
    spki_fields.end("subjectPublicKeyInfo")?;

    let mut validity = Reader::new(validity.content);
    let not_before = time(&mut validity, "notBefore")?;
    let not_after = time(&mut validity, "notAfter")?;
    validity.end("validity")?;
    Ok(Fields {
        not_before,
        not_after,
        spki: spki.whole,
    })
}

/// One element: its tag, its content, and the whole encoding.
struct Element<'a> {
    tag: u8,
    content: &'a [u8],
    whole: &'a [u8],
}

/// Reads the elements of one level of DER in turn.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(der: &'a [u8]) -> Self {
        Self { rest: der }
    }

    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next element. Only single-byte tags and definite lengths (DER has no other kind
    /// in a certificate's fields read here).
    fn next(&mut self, what: &str) -> Result<Element<'a>, String> {
        let data = self.rest;
        let (&tag, after_tag) = data
            .split_first()
            .ok_or_else(|| format!("{what} is missing"))?;
        if tag & 0x1f == 0x1f {
            return Err(format!(
                "{what} has a multi-byte tag, which DER certificates do not use"
            ));
        }
        let (&first, mut after_length) = after_tag
            .split_first()
            .ok_or_else(|| format!("{what} is cut short (no length)"))?;
        let length = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 {
                return Err(format!("{what} has a length DER does not allow"));
            }
            if after_length.len() < count {
                return Err(format!("{what} is cut short (in its length)"));
            }
            let (bytes, rest) = after_length.split_at(count);
            after_length = rest;
            let length = bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
            // DER: the shortest form, so a long form is for 128 or more, without leading zeros.
            if length < 0x80 || bytes[0] == 0 {
                return Err(format!(
                    "{what} has a length that is not in DER's shortest form"
                ));
            }
            length
        };
        if after_length.len() < length {
            return Err(format!(
                "{what} is cut short ({length} bytes announced, {} there)",
                after_length.len()
            ));
        }
        let header = data.len() - after_length.len();
        let (whole, rest) = data.split_at(header + length);
        self.rest = rest;
        Ok(Element {
            tag,
            content: &whole[header..],
            whole,
        })
    }

    /// The next element, which must have `tag`.
    fn expect(&mut self, tag: u8, what: &str) -> Result<Element<'a>, String> {
        let element = self.next(what)?;
        if element.tag != tag {
            return Err(format!(
                "{what} has tag {:#04x} where {tag:#04x} belongs",
                element.tag
            ));
        }
        Ok(element)
    }

    /// Nothing may follow.
    fn end(&self, what: &str) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes follow {what}", self.rest.len()))
        }
    }
}

/// A `Time` (UTCTime or GeneralizedTime, in RFC 5280's form: seconds, "Z") as Unix seconds.
fn time(reader: &mut Reader<'_>, what: &str) -> Result<i64, String> {
    let element = reader.next(what)?;
    let text = std::str::from_utf8(element.content).map_err(|_| format!("{what} is not ASCII"))?;
    let digits = |s: &str| -> Result<u32, String> {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse()
                .map_err(|_| format!("{what} {text:?} is not a time"))
        } else {
            Err(format!("{what} {text:?} is not a time"))
        }
    };
    let (year, rest) = match (element.tag, text.len()) {
        // RFC 5280 §4.1.2.5.1: YY of 50 or more is 19YY, below 50 is 20YY.
        (UTC_TIME, 13) => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&text[..4])?, &text[4..]),
        (UTC_TIME | GENERALIZED_TIME, _) => {
            return Err(format!(
                "{what} {text:?} is not in RFC 5280's form (seconds, then Z)"
            ));
        }
        (tag, _) => return Err(format!("{what} has tag {tag:#04x}, not a time")),
    };
    if !rest.ends_with('Z') {
        return Err(format!("{what} {text:?} is not in UTC (Z)"));
    }
    let field = |range: std::ops::Range<usize>| digits(&rest[range]);
    let (month, day, hour, minute, second) = (
        field(0..2)?,
        field(2..4)?,
        field(4..6)?,
        field(6..8)?,
        field(8..10)?,
    );
    let invalid = || format!("{what} {text:?} is not a valid date and time");
    let month = u8::try_from(month)
        .ok()
        .and_then(|m| time::Month::try_from(m).ok())
        .ok_or_else(invalid)?;
    let year = i32::try_from(year).map_err(|_| invalid())?;
    let narrow = |n: u32| u8::try_from(n).map_err(|_| invalid());
    let date = time::Date::from_calendar_date(year, month, narrow(day)?).map_err(|_| invalid())?;
    let clock = time::Time::from_hms(narrow(hour)?, narrow(minute)?, narrow(second)?)
        .map_err(|_| invalid())?;
    Ok(time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .unix_timestamp())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn certificate(not_before: time::OffsetDateTime, not_after: time::OffsetDateTime) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["gw".into()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// What x509-parser, a general parser, reads from the same certificate.
    fn reference(der: &[u8]) -> (i64, i64, Vec<u8>) {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        (
            cert.validity().not_before.timestamp(),
            cert.validity().not_after.timestamp(),
            cert.public_key().raw.to_vec(),
        )
    }

    #[test]
    fn the_fields_are_what_a_general_parser_reads() {
        use time::macros::datetime;
        // UTCTime before 2050 (both centuries' rule), GeneralizedTime from 2050 on.
        let cases = [
            (
                datetime!(1999-12-31 23:59:59 UTC),
                datetime!(2049-12-31 23:59:59 UTC),
            ),
            (
                datetime!(2024-02-29 12:00:00 UTC),
                datetime!(2050-01-01 00:00:00 UTC),
            ),
            (
                datetime!(1970-01-01 00:00:00 UTC),
                datetime!(9999-12-31 23:59:59 UTC),
            ),
        ];
        for (before, after) in cases {
            let der = certificate(before, after);
            let fields = parse(&der).unwrap();
            assert_eq!(
                (fields.not_before, fields.not_after, fields.spki.to_vec()),
                reference(&der)
            );
            assert_eq!(fields.not_before, before.unix_timestamp());
            assert_eq!(fields.not_after, after.unix_timestamp());
        }
    }

    #[test]
    fn an_rsa_certificate_reads() {
        // An RSA 2048 key, as AWS IoT issues (rcgen on ring cannot make RSA keys: the file
        // backend's openssl-made test key, certified by the test CA).
        use crate::keys::DeviceKey as _;
        let key = crate::keys::file::FileKey::from_pem(
            crate::keys::file::testdata::RSA_PKCS1_PEM,
            std::path::Path::new("test key"),
        )
        .unwrap();
        let der = iotd_testkit::pki::Pki::new().client_cert(&key.public_key_spki());
        let fields = parse(&der).unwrap();
        let (before, after, spki) = reference(&der);
        assert_eq!((fields.not_before, fields.not_after), (before, after));
        assert_eq!(fields.spki, spki.as_slice());
        assert_eq!(fields.spki, key.public_key_spki().as_slice());
    }

    #[test]
    fn anything_else_is_refused_and_nothing_panics() {
        use time::macros::datetime;
        let der = certificate(
            datetime!(2024-01-01 00:00:00 UTC),
            datetime!(2025-01-01 00:00:00 UTC),
        );
        // Every truncation and every single changed byte either reads or is refused.
        for end in 0..der.len() {
            assert!(parse(&der[..end]).is_err(), "cut at {end}");
        }
        for i in 0..der.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut changed = der.clone();
                changed[i] ^= flip;
                let _ = parse(&changed);
            }
        }
        let mut trailing = der.clone();
        trailing.push(0);
        assert_eq!(
            parse(&trailing).unwrap_err(),
            "1 bytes follow the certificate"
        );
        assert_eq!(parse(b"").unwrap_err(), "the certificate is missing");
        assert!(parse(b"\x30\x80\x00\x00").is_err(), "indefinite length");
        assert!(
            parse(b"\x30\x81\x05\x00\x00\x00\x00\x00")
                .unwrap_err()
                .contains("shortest form")
        );
    }

    #[test]
    fn times_follow_rfc_5280() {
        let read = |tag: u8, text: &str| {
            let mut der = vec![tag, u8::try_from(text.len()).unwrap()];
            der.extend_from_slice(text.as_bytes());
            time(&mut Reader::new(&der), "notAfter")
        };
        assert_eq!(read(UTC_TIME, "491231235959Z"), Ok(2_524_607_999));
        assert_eq!(read(UTC_TIME, "500101000000Z"), Ok(-631_152_000));
        assert_eq!(read(GENERALIZED_TIME, "20500101000000Z"), Ok(2_524_608_000));
        for bad in [
            "4912312359Z",
            "491231235959+0100",
            "491331235959Z",
            "490230000000Z",
            "4912312359 9Z",
        ] {
            assert!(read(UTC_TIME, bad).is_err(), "{bad}");
        }
        assert!(read(GENERALIZED_TIME, "20500101000000.5Z").is_err());
        assert!(read(INTEGER, "20500101000000Z").is_err());
    }
}
