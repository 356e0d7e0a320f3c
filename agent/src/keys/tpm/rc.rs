//! TPM and TSS response codes in plain words.
//!
//! tss-esapi's own descriptions ignore the TSS layer (an ESAPI or TCTI error is described as
//! if the TPM had returned it) and quote the specification; here the layer is decoded first and
//! the codes a gateway operator can meet are said in words, with the code name and value kept
//! for searching.

/// The TSS layer of a TSS2_RC (bits 16..24).
const LAYER_SHIFT: u32 = 16;
const LAYER_TPM: u32 = 0;
const LAYER_ESAPI: u32 = 7;
const LAYER_SYS: u32 = 8;
const LAYER_MU: u32 = 9;
const LAYER_TCTI: u32 = 10;
const LAYER_RESMGR: u32 = 11;
/// A TPM response code passed on by a resource manager (tabrmd): a TPM code all the same.
const LAYER_RESMGR_TPM: u32 = 12;

/// TPM_RC_FMT1: bit 7 marks a format-one code (error number in bits 0..6 plus the parameter,
/// handle or session it concerns in bits 6..12).
const FMT1: u32 = 0x080;
const FMT1_PARAMETER: u32 = 0x040;

/// TPM response codes this module names or that callers test for.
pub(crate) const TPM_RC_HANDLE: u32 = 0x08B;
pub(crate) const TPM_RC_INTEGRITY: u32 = 0x09F;
pub(crate) const TPM_RC_BINDING: u32 = 0x0A5;
pub(crate) const TPM_RC_NV_DEFINED: u32 = 0x14C;
pub(crate) const TPM_RC_LOCKOUT: u32 = 0x921;

/// The raw TSS2_RC of a tss-esapi error; `None` for the wrapper's own errors (bad parameters
/// caught before anything reached the TPM).
pub(crate) fn raw_code(error: &tss_esapi::Error) -> Option<u32> {
    use tss_esapi::constants::response_code::Tss2ResponseCode;
    let tss_esapi::Error::Tss2Error(code) = error else {
        return None;
    };
    // The bitfield structs keep the raw value and its accessors private, but print it: Display
    // as "Response code value: 0x921", Debug as "{ .0: 2337, ... }".
    let printed = match code {
        Tss2ResponseCode::Success => return Some(0),
        Tss2ResponseCode::FormatZero(rc) => rc.to_string(),
        Tss2ResponseCode::FormatOne(rc) => rc.to_string(),
    };
    let from_display = printed
        .rsplit_once("0x")
        .and_then(|(_, hex)| u32::from_str_radix(hex.trim(), 16).ok());
    from_display.or_else(|| {
        let debug = format!("{code:?}");
        let (_, rest) = debug.split_once(".0: ")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// The TPM's response code without the TSS layer and without the parameter/handle/session
/// number of format-one codes (`TPM_RC_INTEGRITY` for 0x1df as for 0x9f); `None` when the
/// code did not come from the TPM.
pub(crate) fn tpm_base(rc: u32) -> Option<u32> {
    let layer = rc >> LAYER_SHIFT;
    if layer != LAYER_TPM && layer != LAYER_RESMGR_TPM {
        return None;
    }
    let code = rc & 0xFFFF;
    Some(if code & FMT1 != 0 { code & 0xBF } else { code })
}

/// For a format-one code: "parameter 2", "handle 1" or "session 1" (what the TPM objected to).
fn fmt1_subject(code: u32) -> Option<String> {
    if code & FMT1 == 0 {
        return None;
    }
    let number = (code >> 8) & 0xF;
    if code & FMT1_PARAMETER != 0 {
        Some(format!("parameter {number}"))
    } else if number == 0 {
        None
    } else if number < 8 {
        Some(format!("handle {number}"))
    } else {
        Some(format!("session {}", number - 8))
    }
}

/// "what happened in words (TPM_RC_NAME, 0x…)" for any TSS2_RC.
pub(crate) fn describe(rc: u32) -> String {
    let layer = rc >> LAYER_SHIFT;
    match layer {
        LAYER_TPM | LAYER_RESMGR_TPM => {
            let code = rc & 0xFFFF;
            let base = if code & FMT1 != 0 { code & 0xBF } else { code };
            let (name, words) = tpm_code(base);
            let about = fmt1_subject(code)
                .map(|s| format!(", {s}"))
                .unwrap_or_default();
            format!("{words} ({name}{about}, {rc:#x})")
        }
        LAYER_ESAPI | LAYER_SYS | LAYER_MU | LAYER_TCTI | LAYER_RESMGR => {
            let (name, words) = tss_base(rc & 0xFFFF);
            let (layer_name, context) = match layer {
                LAYER_ESAPI => ("ESAPI", "the TSS library (ESAPI) refused"),
                LAYER_SYS => ("SYS", "the TSS library (SAPI) refused"),
                LAYER_MU => (
                    "MU",
                    "the TSS library could not encode or decode a structure",
                ),
                LAYER_TCTI => ("TCTI", "the connection to the TPM (TCTI) failed"),
                _ => ("RESMGR", "the TPM resource manager refused"),
            };
            format!("{context}: {words} (TSS2_{layer_name}_RC_{name}, {rc:#x})")
        }
        _ => format!("TSS error {rc:#x} (layer {layer})"),
    }
}

/// The name and plain words of a TPM 2.0 response code (TPM 2.0 Part 2, 6.6).
fn tpm_code(base: u32) -> (&'static str, &'static str) {
    match base {
        0x100 => (
            "TPM_RC_INITIALIZE",
            "the TPM has not been started (TPM2_Startup was not sent)",
        ),
        0x101 => (
            "TPM_RC_FAILURE",
            "the TPM is in failure mode and accepts no commands until it is reset",
        ),
        0x103 => ("TPM_RC_SEQUENCE", "improper use of a sequence handle"),
        0x10B => (
            "TPM_RC_PRIVATE",
            "the TPM refused the private part of the object",
        ),
        0x119 => ("TPM_RC_HMAC", "the TPM refused the HMAC"),
        0x120 => ("TPM_RC_DISABLED", "the command is disabled on this TPM"),
        0x121 => (
            "TPM_RC_EXCLUSIVE",
            "the command needs an exclusive audit session",
        ),
        0x124 => (
            "TPM_RC_AUTH_TYPE",
            "the authorization handle is not of the right type",
        ),
        0x125 => (
            "TPM_RC_AUTH_MISSING",
            "the command needs an authorization session",
        ),
        0x126 => ("TPM_RC_POLICY", "the policy is not satisfied"),
        0x127 => ("TPM_RC_PCR", "the PCR check failed"),
        0x128 => ("TPM_RC_PCR_CHANGED", "the PCRs changed during the command"),
        0x12D => ("TPM_RC_UPGRADE", "the TPM is in field-upgrade mode"),
        0x12E => (
            "TPM_RC_TOO_MANY_CONTEXTS",
            "the TPM has no room for another saved context",
        ),
        0x12F => (
            "TPM_RC_AUTH_UNAVAILABLE",
            "the object's authorization value cannot be used (userWithAuth is clear)",
        ),
        0x130 => (
            "TPM_RC_REBOOT",
            "the TPM must be restarted (TPM2_Startup) before it accepts more commands",
        ),
        0x131 => (
            "TPM_RC_UNBALANCED",
            "the encryption and hash strengths do not match",
        ),
        0x142 => ("TPM_RC_COMMAND_SIZE", "the command size is wrong"),
        0x143 => (
            "TPM_RC_COMMAND_CODE",
            "this TPM does not implement the command",
        ),
        0x144 => ("TPM_RC_AUTHSIZE", "the authorization size is wrong"),
        0x145 => (
            "TPM_RC_AUTH_CONTEXT",
            "the command cannot take an authorization session",
        ),
        0x146 => ("TPM_RC_NV_RANGE", "the NV offset is out of range"),
        0x147 => ("TPM_RC_NV_SIZE", "the NV size is out of range"),
        0x148 => ("TPM_RC_NV_LOCKED", "the NV index is locked"),
        0x149 => ("TPM_RC_NV_AUTHORIZATION", "the NV access is not authorized"),
        0x14A => (
            "TPM_RC_NV_UNINITIALIZED",
            "the NV index has not been written",
        ),
        0x14B => (
            "TPM_RC_NV_SPACE",
            "the TPM has no room left for another persistent object",
        ),
        0x14C => (
            "TPM_RC_NV_DEFINED",
            "the persistent handle is already in use",
        ),
        0x150 => ("TPM_RC_BAD_CONTEXT", "the saved context cannot be loaded"),
        0x151 => ("TPM_RC_CPHASH", "the cpHash is wrong"),
        0x152 => ("TPM_RC_PARENT", "the parent is not a storage key"),
        0x153 => ("TPM_RC_NEEDS_TEST", "the TPM must run a self-test first"),
        0x154 => ("TPM_RC_NO_RESULT", "the TPM could not process the request"),
        0x155 => (
            "TPM_RC_SENSITIVE",
            "the private part of the object did not decode (it was made under another parent, or damaged)",
        ),
        0x901 => (
            "TPM_RC_CONTEXT_GAP",
            "the TPM's context counter gap is too large",
        ),
        0x902 => (
            "TPM_RC_OBJECT_MEMORY",
            "the TPM has no free object slot (too many objects loaded: without a resource manager, stale objects must be flushed)",
        ),
        0x903 => ("TPM_RC_SESSION_MEMORY", "the TPM has no free session slot"),
        0x904 => ("TPM_RC_MEMORY", "the TPM is out of memory"),
        0x905 => (
            "TPM_RC_SESSION_HANDLES",
            "the TPM is out of session handles",
        ),
        0x906 => ("TPM_RC_OBJECT_HANDLES", "the TPM is out of object handles"),
        0x907 => (
            "TPM_RC_LOCALITY",
            "the command is not allowed from this locality",
        ),
        0x908 => (
            "TPM_RC_YIELDED",
            "the TPM suspended the command; it may be retried",
        ),
        0x909 => ("TPM_RC_CANCELED", "the command was cancelled"),
        0x90A => (
            "TPM_RC_TESTING",
            "the TPM is running its self-test; retry shortly",
        ),
        0x910..=0x916 => (
            "TPM_RC_REFERENCE_H",
            "the command names an object that is not loaded",
        ),
        0x918..=0x91E => (
            "TPM_RC_REFERENCE_S",
            "the command names a session that is not loaded",
        ),
        0x920 => (
            "TPM_RC_NV_RATE",
            "the TPM is limiting NV writes to prevent wear; retry later",
        ),
        0x921 => ("TPM_RC_LOCKOUT", "the TPM is in dictionary-attack lockout"),
        0x922 => ("TPM_RC_RETRY", "the TPM was busy; retry"),
        0x923 => (
            "TPM_RC_NV_UNAVAILABLE",
            "the TPM's NV memory is not available right now",
        ),
        0x081 => (
            "TPM_RC_ASYMMETRIC",
            "the asymmetric algorithm is not supported or not right",
        ),
        0x082 => (
            "TPM_RC_ATTRIBUTES",
            "the object attributes are inconsistent",
        ),
        0x083 => (
            "TPM_RC_HASH",
            "the hash algorithm is not supported or not right",
        ),
        0x084 => ("TPM_RC_VALUE", "a value is out of range"),
        0x085 => (
            "TPM_RC_HIERARCHY",
            "the hierarchy is disabled, or the object belongs to another hierarchy",
        ),
        0x087 => ("TPM_RC_KEY_SIZE", "the key size is not supported"),
        0x088 => (
            "TPM_RC_MGF",
            "the mask generation function is not supported",
        ),
        0x089 => ("TPM_RC_MODE", "the symmetric mode is not supported"),
        0x08A => (
            "TPM_RC_TYPE",
            "the object is of the wrong type for this command",
        ),
        0x08B => (
            "TPM_RC_HANDLE",
            "the handle does not name an object the TPM holds",
        ),
        0x08C => ("TPM_RC_KDF", "the key derivation function is not supported"),
        0x08D => ("TPM_RC_RANGE", "a value is out of range"),
        0x08E => (
            "TPM_RC_AUTH_FAIL",
            "the authorization failed (wrong password; the dictionary-attack counter went up)",
        ),
        0x08F => ("TPM_RC_NONCE", "the session nonce is wrong"),
        0x090 => ("TPM_RC_PP", "the command needs physical presence"),
        0x092 => (
            "TPM_RC_SCHEME",
            "the signing or encryption scheme is not supported or not right for the key",
        ),
        0x095 => ("TPM_RC_SIZE", "a structure has the wrong size"),
        0x096 => (
            "TPM_RC_SYMMETRIC",
            "the symmetric algorithm is not supported or not right",
        ),
        0x097 => ("TPM_RC_TAG", "the structure tag is wrong"),
        0x098 => ("TPM_RC_SELECTOR", "the union selector is wrong"),
        0x09A => ("TPM_RC_INSUFFICIENT", "the input is too short"),
        0x09B => ("TPM_RC_SIGNATURE", "the signature is not valid"),
        0x09C => ("TPM_RC_KEY", "the key is not right for the command"),
        0x09D => ("TPM_RC_POLICY_FAIL", "the policy check failed"),
        0x09F => (
            "TPM_RC_INTEGRITY",
            "the integrity check of the key blob failed (it was not made under this parent, or it was damaged)",
        ),
        0x0A0 => ("TPM_RC_TICKET", "the ticket is not valid"),
        0x0A1 => ("TPM_RC_RESERVED_BITS", "reserved bits are set"),
        0x0A2 => ("TPM_RC_BAD_AUTH", "the authorization failed"),
        0x0A3 => ("TPM_RC_EXPIRED", "the policy has expired"),
        0x0A4 => ("TPM_RC_POLICY_CC", "the policy is for another command"),
        0x0A5 => (
            "TPM_RC_BINDING",
            "the public and private parts of the key do not belong together",
        ),
        0x0A6 => ("TPM_RC_CURVE", "the curve is not supported"),
        0x0A7 => ("TPM_RC_ECC_POINT", "the point is not on the curve"),
        _ => ("TPM_RC_?", "the TPM refused the command"),
    }
}

/// The name and words of a TSS base code (tss2_common.h, TSS2_BASE_RC_*).
fn tss_base(code: u32) -> (&'static str, &'static str) {
    match code {
        1 => ("GENERAL_FAILURE", "general failure"),
        2 => ("NOT_IMPLEMENTED", "not implemented"),
        3 => ("BAD_CONTEXT", "bad context"),
        4 => ("ABI_MISMATCH", "library version mismatch"),
        5 => ("BAD_REFERENCE", "a required pointer was missing"),
        6 => ("INSUFFICIENT_BUFFER", "a buffer is too small"),
        7 => ("BAD_SEQUENCE", "calls out of order"),
        8 => (
            "NO_CONNECTION",
            "no connection to the TPM (is the device present, or swtpm running?)",
        ),
        9 => ("TRY_AGAIN", "the operation timed out; try again"),
        10 => (
            "IO_ERROR",
            "I/O error talking to the TPM (is the device present, or swtpm running?)",
        ),
        11 => ("BAD_VALUE", "a value is not valid"),
        12 => (
            "NOT_PERMITTED",
            "not permitted (check the permissions of the TPM device)",
        ),
        13 => (
            "INVALID_SESSIONS",
            "the sessions are not valid for this command",
        ),
        14 => ("NO_DECRYPT_PARAM", "no parameter to encrypt"),
        15 => ("NO_ENCRYPT_PARAM", "no parameter to decrypt"),
        16 => ("BAD_SIZE", "a size is not valid"),
        17 => ("MALFORMED_RESPONSE", "the TPM's response is malformed"),
        18 => ("INSUFFICIENT_CONTEXT", "the context buffer is too small"),
        19 => ("INSUFFICIENT_RESPONSE", "the TPM's response is too short"),
        20 => ("INCOMPATIBLE_TCTI", "the TCTI is not compatible"),
        21 => ("NOT_SUPPORTED", "not supported"),
        22 => ("BAD_TCTI_STRUCTURE", "the TCTI structure is not valid"),
        23 => ("MEMORY", "out of memory"),
        24 => ("BAD_TR", "the object handle is not valid"),
        25 => ("MULTIPLE_DECRYPT_SESSIONS", "more than one decrypt session"),
        26 => ("MULTIPLE_ENCRYPT_SESSIONS", "more than one encrypt session"),
        27 => ("RSP_AUTH_FAILED", "the TPM's response failed authorization"),
        _ => ("?", "unknown error"),
    }
}

/// When a TPM in dictionary-attack lockout accepts DA-protected authorizations again, in
/// words: "it will accept commands again in N s" or why it will not by itself.
///
/// The TPM counts failed authorizations (TPM_PT_LOCKOUT_COUNTER) and is in lockout while the
/// count is at least TPM_PT_MAX_AUTH_FAIL; the count drops by one every
/// TPM_PT_LOCKOUT_INTERVAL seconds (of powered time). So lockout ends after at most
/// (counter - max + 1) intervals.
pub(crate) fn lockout_wait(counter: u32, max_auth_fail: u32, interval_s: u32) -> String {
    const RESET: &str = "or reset it with `tpm2_dictionarylockout --clear-lockout` (needs the lockout authorization)";
    if interval_s == 0 {
        return format!(
            "it will not leave lockout by itself (TPM_PT_LOCKOUT_INTERVAL is 0): {}",
            RESET.trim_start_matches("or ")
        );
    }
    if max_auth_fail == 0 {
        return format!(
            "its dictionary-attack protection is set to lock out on every use \
             (TPM_PT_MAX_AUTH_FAIL is 0): change it with `tpm2_dictionarylockout --setup-parameters` \
             {RESET}"
        );
    }
    let steps = u64::from(counter.saturating_sub(max_auth_fail)) + 1;
    let seconds = steps * u64::from(interval_s);
    format!("it will accept commands again in {seconds} s, {RESET}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tpm_codes_are_named_with_their_subject() {
        // TPM2_Load of a blob made under another parent: integrity, parameter 1.
        assert_eq!(
            describe(0x1df),
            "the integrity check of the key blob failed (it was not made under this parent, or \
             it was damaged) (TPM_RC_INTEGRITY, parameter 1, 0x1df)"
        );
        assert_eq!(tpm_base(0x1df), Some(TPM_RC_INTEGRITY));
        assert_eq!(tpm_base(0x9f), Some(TPM_RC_INTEGRITY));
        // Bad authorization in session 1.
        assert!(describe(0x9a2).contains("TPM_RC_BAD_AUTH, session 1, 0x9a2"));
        // A handle error about handle 1.
        assert_eq!(tpm_base(0x18b), Some(TPM_RC_HANDLE));
        assert!(describe(0x18b).contains("TPM_RC_HANDLE, handle 1, 0x18b"));
        // Format zero: lockout is a warning.
        assert_eq!(tpm_base(0x921), Some(TPM_RC_LOCKOUT));
        assert!(
            describe(0x921)
                .starts_with("the TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT, 0x921)")
        );
        assert_eq!(tpm_base(0x14c), Some(TPM_RC_NV_DEFINED));
        assert!(describe(0x902).contains("no free object slot"));
        // A session-numbered auth failure (what tpm2_sign -p wrong gets).
        assert!(describe(0x98e).contains("TPM_RC_AUTH_FAIL, session 1, 0x98e"));
        // A TPM code passed through tabrmd keeps its meaning.
        assert_eq!(tpm_base(0x000c_0921), Some(TPM_RC_LOCKOUT));
    }

    #[test]
    fn tss_layers_are_not_mistaken_for_tpm_codes() {
        // TSS2_TCTI_RC_IO_ERROR: a missing swtpm or device, not a TPM "private" error.
        assert_eq!(tpm_base(0x000a_000a), None);
        let text = describe(0x000a_000a);
        assert!(
            text.starts_with("the connection to the TPM (TCTI) failed: I/O error"),
            "{text}"
        );
        assert!(text.ends_with("(TSS2_TCTI_RC_IO_ERROR, 0xa000a)"), "{text}");
        assert!(describe(0x0007_0018).contains("TSS2_ESAPI_RC_BAD_TR"));
        assert!(describe(0x0033_0001).starts_with("TSS error 0x330001"));
    }

    #[test]
    fn lockout_wait_counts_the_intervals_left() {
        assert_eq!(
            lockout_wait(1, 1, 30),
            "it will accept commands again in 30 s, or reset it with `tpm2_dictionarylockout \
             --clear-lockout` (needs the lockout authorization)"
        );
        assert!(lockout_wait(5, 3, 1000).contains("in 3000 s"));
        // Counter below max (lockout from the lockout hierarchy): one interval at most.
        assert!(lockout_wait(0, 3, 7).contains("in 7 s"));
        assert!(lockout_wait(3, 3, 0).starts_with("it will not leave lockout by itself"));
        assert!(lockout_wait(0, 0, 10).contains("TPM_PT_MAX_AUTH_FAIL is 0"));
    }
}
