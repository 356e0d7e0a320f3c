//! The fleet provisioning MQTT API, device side: CreateCertificateFromCsr,
//! CreateKeysAndCertificate and RegisterThing in JSON or CBOR, with replies read leniently
//! (unknown fields ignored, `deviceConfiguration` optional) and rejections turned into errors
//! that say what to fix. Branches on `statusCode` classes, never on AWS's `errorCode` strings,
//! except `InvalidCertificateOwnershipToken`, which sends the agent back to the CSR.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::cloud::Session;
use crate::config::PayloadFormat;
use crate::error::{AgentError, ErrorCode, Retry};

/// CreateCertificateFromCsr's or CreateKeysAndCertificate's answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    pub certificate_id: String,
    pub certificate_pem: String,
    pub certificate_ownership_token: String,
    /// Only CreateKeysAndCertificate sends a key.
    #[serde(default)]
    pub private_key: Option<String>,
}

/// RegisterThing's answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registered {
    #[serde(default)]
    pub thing_name: Option<String>,
    #[serde(default)]
    pub device_configuration: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rejected {
    #[serde(default)]
    status_code: Option<u16>,
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    error_message: Option<String>,
}

fn fmt_name(format: PayloadFormat) -> &'static str {
    match format {
        PayloadFormat::Json => "json",
        PayloadFormat::Cbor => "cbor",
    }
}

fn encode(format: PayloadFormat, value: &Value) -> Vec<u8> {
    match format {
        PayloadFormat::Json => value.to_string().into_bytes(),
        PayloadFormat::Cbor => {
            let mut out = Vec::new();
            // Serialising a JSON value into a Vec cannot fail.
            let _ = ciborium::ser::into_writer(value, &mut out);
            out
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    format: PayloadFormat,
    payload: &[u8],
    what: &str,
) -> Result<T, AgentError> {
    let parsed = match format {
        PayloadFormat::Json => serde_json::from_slice(payload).map_err(|e| e.to_string()),
        PayloadFormat::Cbor => ciborium::de::from_reader(payload).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| {
        AgentError::new(
            ErrorCode::Rejected,
            Retry::SameConnection,
            format!("AWS IoT's reply to {what} could not be read ({e}); retrying"),
        )
    })
}

/// Maps a /rejected reply to an error with a remedy.
fn rejection(api: &str, template: Option<&str>, r: &Rejected) -> AgentError {
    let status = r.status_code.unwrap_or(0);
    let code = r.error_code.as_deref().unwrap_or("unknown");
    let said = r.error_message.as_deref().unwrap_or("no message");
    let aws = format!("AWS IoT rejected {api} ({status} {code}: {said})");
    if code == "InvalidCertificateOwnershipToken" {
        return AgentError::new(
            ErrorCode::Rejected,
            Retry::RestartFromCsr,
            format!("{aws}; the ownership token is no longer valid, requesting a new certificate"),
        );
    }
    match (status, template) {
        (429, _) => AgentError::new(
            ErrorCode::Throttled,
            Retry::SameConnection,
            format!("throttled by AWS IoT ({api}: {said}); retrying with backoff"),
        ),
        (500..=599, _) => AgentError::new(
            ErrorCode::Rejected,
            Retry::SameConnection,
            format!("{aws}; a fault on AWS's side, retrying"),
        ),
        (403, Some(t)) => AgentError::permanent(
            ErrorCode::HookDenied,
            format!(
                "{aws}; template {t} is disabled, or the pre-provisioning hook refused this device — check the template and the hook's logs"
            ),
        ),
        (404, Some(t)) => AgentError::permanent(
            ErrorCode::TemplateRejected,
            format!("{aws}; template {t} is unknown — check provisioning.template"),
        ),
        (409, Some(t)) => AgentError::permanent(
            ErrorCode::TemplateRejected,
            format!("{aws}; template {t} conflicts with an existing thing (OverrideSettings FAIL)"),
        ),
        (400, Some(t)) => AgentError::permanent(
            ErrorCode::TemplateRejected,
            format!(
                "{aws}; check template {t} and the parameters this gateway sends (provisioning.parameters)"
            ),
        ),
        (400, None) => AgentError::permanent(
            ErrorCode::Rejected,
            format!("{aws}; the certificate request was refused"),
        ),
        _ => AgentError::permanent(ErrorCode::Rejected, aws),
    }
}

async fn call<T: for<'de> Deserialize<'de>>(
    session: &mut Session,
    format: PayloadFormat,
    timeout: Duration,
    topic: &str,
    api: &str,
    template: Option<&str>,
    body: &Value,
) -> Result<T, AgentError> {
    let reply = session
        .request(topic, encode(format, body), timeout)
        .await?;
    if reply.accepted {
        decode(format, &reply.payload, api)
    } else {
        let r: Rejected = decode(format, &reply.payload, api).unwrap_or_default();
        Err(rejection(api, template, &r))
    }
}

/// CreateCertificateFromCsr.
pub async fn create_certificate_from_csr(
    session: &mut Session,
    format: PayloadFormat,
    timeout: Duration,
    csr_pem: &str,
) -> Result<Issued, AgentError> {
    let topic = format!("$aws/certificates/create-from-csr/{}", fmt_name(format));
    call(
        session,
        format,
        timeout,
        &topic,
        "CreateCertificateFromCsr",
        None,
        &json!({"certificateSigningRequest": csr_pem}),
    )
    .await
}

/// CreateKeysAndCertificate (the key comes from AWS: file backend only).
pub async fn create_keys_and_certificate(
    session: &mut Session,
    format: PayloadFormat,
    timeout: Duration,
) -> Result<Issued, AgentError> {
    let topic = format!("$aws/certificates/create/{}", fmt_name(format));
    let issued: Issued = call(
        session,
        format,
        timeout,
        &topic,
        "CreateKeysAndCertificate",
        None,
        &json!({}),
    )
    .await?;
    if issued.private_key.as_deref().is_none_or(str::is_empty) {
        return Err(AgentError::new(
            ErrorCode::Rejected,
            Retry::SameConnection,
            "CreateKeysAndCertificate's reply has no privateKey; retrying",
        ));
    }
    Ok(issued)
}

/// RegisterThing.
pub async fn register_thing(
    session: &mut Session,
    format: PayloadFormat,
    timeout: Duration,
    template: &str,
    token: &str,
    parameters: &BTreeMap<String, String>,
) -> Result<Registered, AgentError> {
    let topic = format!(
        "$aws/provisioning-templates/{template}/provision/{}",
        fmt_name(format)
    );
    let mut body = json!({"certificateOwnershipToken": token});
    if !parameters.is_empty() {
        body["parameters"] = json!(parameters);
    }
    call(
        session,
        format,
        timeout,
        &topic,
        "RegisterThing",
        Some(template),
        &body,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(status: u16, code: &str) -> Rejected {
        Rejected {
            status_code: Some(status),
            error_code: Some(code.into()),
            error_message: Some("m".into()),
        }
    }

    #[test]
    fn rejections_map_to_retry_classes_and_remedies() {
        let cases = [
            (
                r(429, "Throttling"),
                Some("t"),
                Retry::SameConnection,
                ErrorCode::Throttled,
                "throttled by AWS IoT",
            ),
            (
                r(503, "ServiceUnavailable"),
                None,
                Retry::SameConnection,
                ErrorCode::Rejected,
                "retrying",
            ),
            (
                r(400, "InvalidCertificateOwnershipToken"),
                Some("t"),
                Retry::RestartFromCsr,
                ErrorCode::Rejected,
                "new certificate",
            ),
            (
                r(403, "AccessDenied"),
                Some("gw"),
                Retry::Permanent,
                ErrorCode::HookDenied,
                "template gw is disabled, or the pre-provisioning hook refused",
            ),
            (
                r(404, "ResourceNotFound"),
                Some("gw"),
                Retry::Permanent,
                ErrorCode::TemplateRejected,
                "template gw is unknown",
            ),
            (
                r(400, "InvalidRequest"),
                Some("gw"),
                Retry::Permanent,
                ErrorCode::TemplateRejected,
                "provisioning.parameters",
            ),
            (
                r(400, "InvalidCsr"),
                None,
                Retry::Permanent,
                ErrorCode::Rejected,
                "certificate request was refused",
            ),
        ];
        for (rej, template, retry, code, text) in cases {
            let e = rejection("RegisterThing", template, &rej);
            assert_eq!((e.retry, e.code), (retry, code), "{e}");
            assert!(e.message.contains(text), "{e}");
        }
    }

    #[test]
    fn replies_are_read_leniently_in_both_formats() {
        let v = json!({"thingName": "gw-1", "extra": 1});
        for format in [PayloadFormat::Json, PayloadFormat::Cbor] {
            let reg: Registered = decode(format, &encode(format, &v), "RegisterThing")
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(reg.thing_name.as_deref(), Some("gw-1"));
            assert!(reg.device_configuration.is_empty());
        }
    }
}
