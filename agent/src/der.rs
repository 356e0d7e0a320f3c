//! The little DER (X.690) and PEM writing iotd needs: the CSR, the onboarding certificate and
//! PKCS#8 wrapping. Reading is left to rustls-pemfile, webpki and `tls::x509`.

use base64::Engine as _;

/// One tag-length-value with a definite length.
pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => out.push(short),
        _ => {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            // At most size_of::<usize>() length bytes, so the count always fits.
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }
    out.extend_from_slice(content);
    out
}

/// A SEQUENCE of already encoded parts.
pub fn sequence(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// A BIT STRING of whole bytes (no unused bits).
pub fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(bytes.len() + 1);
    content.push(0);
    content.extend_from_slice(bytes);
    tlv(0x03, &content)
}

/// An X.501 Name holding only a common name (UTF8String).
pub fn common_name(name: &str) -> Vec<u8> {
    // id-at-commonName, 2.5.4.3
    const OID: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
    let attribute = sequence(&[OID, &tlv(0x0c, name.as_bytes())]);
    sequence(&[&tlv(0x31, &attribute)])
}

/// An X.509 Time: UTCTime up to 2049, GeneralizedTime after, as RFC 5280 §4.1.2.5 requires;
/// whole seconds, UTC.
pub fn time(at: time::OffsetDateTime) -> Vec<u8> {
    let at = at.to_offset(time::UtcOffset::UTC);
    let rest = format!(
        "{:02}{:02}{:02}{:02}{:02}Z",
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    );
    let year = at.year();
    if (1950..2050).contains(&year) {
        tlv(0x17, format!("{:02}{rest}", year % 100).as_bytes())
    } else {
        tlv(0x18, format!("{year:04}{rest}").as_bytes())
    }
}

/// `der` armoured as PEM with `label` ("CERTIFICATE"), 64 characters a line.
pub fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    // base64 is ASCII, so cutting it into 64-byte lines never splits a character.
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lengths_take_the_short_form_below_128_and_the_long_form_from_it() {
        assert_eq!(tlv(0x04, &[]), [0x04, 0x00]);
        assert_eq!(tlv(0x04, &[7; 127])[..2], [0x04, 0x7f]);
        assert_eq!(tlv(0x04, &[7; 128])[..3], [0x04, 0x81, 0x80]);
        assert_eq!(tlv(0x04, &[7; 256])[..4], [0x04, 0x82, 0x01, 0x00]);
        assert_eq!(tlv(0x04, &[7; 70_000])[..5], [0x04, 0x83, 0x01, 0x11, 0x70]);
    }

    #[test]
    fn times_switch_from_utctime_to_generalizedtime_in_2050() {
        use time::macros::datetime;
        assert_eq!(
            time(datetime!(2049-12-31 23:59:59.9 UTC)),
            tlv(0x17, b"491231235959Z")
        );
        assert_eq!(
            time(datetime!(2050-01-01 00:00 UTC)),
            tlv(0x18, b"20500101000000Z")
        );
        // Another offset is the same instant in UTC.
        assert_eq!(
            time(datetime!(2026-12-05 01:30 +02:00)),
            tlv(0x17, b"261204233000Z")
        );
    }

    #[test]
    fn pem_lines_are_64_characters() {
        let pem = pem("CERTIFICATE", &[0xab; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert!(pem.ends_with("-----\n"));
    }
}
