//! The fleet provisioning MQTT API: CreateKeysAndCertificate, CreateCertificateFromCsr and
//! RegisterThing, in JSON and CBOR, with the pre-provisioning hook and injected faults.

use std::collections::BTreeMap;

use base64::Engine;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::faults::Api;
use crate::registry::{CertStatus, Certificate, OwnershipToken, Policy, Thing, new_uuid};
use crate::server::{ApiRequest, Gate, Session, Shared, lock};
use crate::template::{Override, PolicyPlan};

/// Payload encoding, chosen by the topic's last level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Cbor,
}

/// A parsed request topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub api: Api,
    pub format: Format,
    pub template: Option<String>,
}

/// Parses a provisioning request topic (not its /accepted or /rejected replies).
pub fn parse_topic(topic: &str) -> Option<Route> {
    let levels: Vec<&str> = topic.split('/').collect();
    let format = |s: &str| match s {
        "json" => Some(Format::Json),
        "cbor" => Some(Format::Cbor),
        _ => None,
    };
    match levels.as_slice() {
        ["$aws", "certificates", "create", f] => Some(Route {
            api: Api::CreateKeysAndCertificate,
            format: format(f)?,
            template: None,
        }),
        ["$aws", "certificates", "create-from-csr", f] => Some(Route {
            api: Api::CreateCertificateFromCsr,
            format: format(f)?,
            template: None,
        }),
        ["$aws", "provisioning-templates", name, "provision", f] => Some(Route {
            api: Api::RegisterThing,
            format: format(f)?,
            template: Some((*name).to_owned()),
        }),
        _ => None,
    }
}

pub fn is_api_topic(topic: &str) -> bool {
    parse_topic(topic).is_some()
}

/// A rejected reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Rejection {
    fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }
    fn to_value(&self) -> Value {
        json!({"statusCode": self.status, "errorCode": self.code, "errorMessage": self.message})
    }
}

/// Decodes a request body; an empty payload is an empty object (CreateKeysAndCertificate is
/// documented with an empty payload, while AWS's SDK sends `{}`).
pub fn decode(format: Format, payload: &[u8]) -> Result<Value, Rejection> {
    if payload.is_empty() {
        return Ok(json!({}));
    }
    match format {
        Format::Json => serde_json::from_slice(payload).map_err(|e| {
            Rejection::new(
                400,
                "InvalidPayload",
                format!("the payload is not valid JSON: {e}"),
            )
        }),
        Format::Cbor => {
            let v: ciborium::Value = ciborium::de::from_reader(payload).map_err(|e| {
                Rejection::new(
                    400,
                    "InvalidPayload",
                    format!("the payload is not valid CBOR: {e}"),
                )
            })?;
            cbor_to_json(v).map_err(|m| Rejection::new(400, "InvalidPayload", m))
        }
    }
}

fn cbor_to_json(v: ciborium::Value) -> Result<Value, String> {
    use ciborium::Value as C;
    Ok(match v {
        C::Null => Value::Null,
        C::Bool(b) => Value::Bool(b),
        C::Integer(i) => {
            let n = i128::from(i);
            i64::try_from(n)
                .map(Value::from)
                .map_err(|_| "CBOR integer out of range".to_owned())?
        }
        C::Float(f) => json!(f),
        C::Text(s) => Value::String(s),
        C::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        C::Tag(_, inner) => cbor_to_json(*inner)?,
        C::Array(items) => Value::Array(
            items
                .into_iter()
                .map(cbor_to_json)
                .collect::<Result<_, _>>()?,
        ),
        C::Map(entries) => {
            let mut map = serde_json::Map::new();
            for (k, v) in entries {
                let C::Text(k) = k else {
                    return Err("CBOR map keys must be text strings".to_owned());
                };
                map.insert(k, cbor_to_json(v)?);
            }
            Value::Object(map)
        }
        _ => return Err("unsupported CBOR item".to_owned()),
    })
}

fn json_to_cbor(v: &Value) -> ciborium::Value {
    use ciborium::Value as C;
    match v {
        Value::Null => C::Null,
        Value::Bool(b) => C::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => C::Integer(u.into()),
            (None, Some(i), _) => C::Integer(i.into()),
            (_, _, f) => C::Float(f.unwrap_or(0.0)),
        },
        Value::String(s) => C::Text(s.clone()),
        Value::Array(a) => C::Array(a.iter().map(json_to_cbor).collect()),
        Value::Object(m) => C::Map(
            m.iter()
                .map(|(k, v)| (C::Text(k.clone()), json_to_cbor(v)))
                .collect(),
        ),
    }
}

/// Encodes a reply in the request's format (definite-length CBOR).
pub fn encode(format: Format, value: &Value) -> Bytes {
    match format {
        Format::Json => Bytes::from(value.to_string()),
        Format::Cbor => {
            let mut out = Vec::new();
            // Writing to a Vec cannot fail for a ciborium::Value.
            let _ = ciborium::ser::into_writer(&json_to_cbor(value), &mut out);
            Bytes::from(out)
        }
    }
}

/// Serves one request: faults and throttles first, then the API itself.
pub async fn serve(shared: &Shared, session: &Session, req: &ApiRequest) {
    let Some(route) = parse_topic(&req.topic) else {
        return;
    };
    let (result, drop_reply) = match crate::server::fault_gate(shared, session, route.api).await {
        Gate::Closed => return,
        Gate::Throttled => (
            Err(Rejection::new(429, "Throttling", "Rate exceeded")),
            false,
        ),
        Gate::Reject {
            status_code,
            error_code,
            error_message,
        } => (
            Err(Rejection::new(status_code, &error_code, error_message)),
            false,
        ),
        Gate::Serve { drop_reply } => {
            let result = match decode(route.format, &req.payload) {
                Ok(body) => match route.api {
                    Api::CreateKeysAndCertificate => {
                        create_keys_and_certificate(shared, session).await
                    }
                    Api::CreateCertificateFromCsr => create_from_csr(shared, session, &body),
                    Api::RegisterThing => {
                        let template = route.template.as_deref().unwrap_or_default();
                        register_thing(shared, session, template, &body).await
                    }
                    Api::Connect | Api::Jobs => return,
                },
                Err(rejection) => Err(rejection),
            };
            (result, drop_reply)
        }
    };
    if drop_reply {
        let who = (session.client_id.as_str(), session.conn_id);
        let detail = Some("injected fault: reply dropped".to_owned());
        shared.log_event("dropped", who, Some(&req.topic), None, detail);
        return;
    }
    let (suffix, value) = match result {
        Ok(v) => ("accepted", v),
        Err(r) => ("rejected", r.to_value()),
    };
    let topic = format!("{}/{suffix}", req.topic);
    shared.reply(session, &topic, encode(route.format, &value), true);
}

fn new_token() -> String {
    // Opaque and long, like AWS's (~300-500 characters).
    let bytes: Vec<u8> = (0..240).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// notAfter of a certificate issued now at the request of `session`: its template's validity
/// if one is set (`/_fake/certificate-validity`), else the account's.
fn not_after_for(shared: &Shared, session: &Session, now: i64) -> i64 {
    let template = shared.caller_template(&session.cert_id);
    shared.issued_not_after_for(now, template.as_deref())
}

/// Registers a freshly issued certificate as PENDING_ACTIVATION with its ownership token, and
/// binds the fault rules waiting for the next certificate (`"certificateId": "$next"`).
fn register_pending(shared: &Shared, issued: &crate::ca::IssuedCert, now: i64) -> String {
    lock(&shared.faults).bind_next_certificate(&issued.id);
    let token = new_token();
    let ttl = shared.settings.token_ttl_secs;
    shared.write(|reg| {
        reg.certificates.insert(
            issued.id.clone(),
            Certificate {
                id: issued.id.clone(),
                pem: issued.pem.clone(),
                status: CertStatus::PendingActivation,
                created_at: now,
                last_modified_at: now,
                not_before: issued.not_before,
                not_after: issued.not_after,
                policies: Default::default(),
                things: Default::default(),
                temporary_claim_for: None,
                customer_version: 1,
                template: None,
            },
        );
        reg.tokens.insert(
            token.clone(),
            OwnershipToken {
                certificate_id: issued.id.clone(),
                issued_at: now,
                expires_at: now + ttl,
                used: false,
            },
        );
    });
    token
}

async fn create_keys_and_certificate(
    shared: &Shared,
    session: &Session,
) -> Result<Value, Rejection> {
    let key = tokio::task::spawn_blocking(crate::ca::new_rsa_key)
        .await
        .map_err(|e| Rejection::new(500, "InternalFailure", e.to_string()))?
        .map_err(|e| Rejection::new(500, "InternalFailure", e.to_string()))?;
    let (private_pem, _public_pem, spki) = key;
    let now = shared.clock.now();
    let issued = shared
        .ca
        .issue(&spki, now, not_after_for(shared, session, now))
        .map_err(|e| Rejection::new(500, "InternalFailure", e.to_string()))?;
    let token = register_pending(shared, &issued, now);
    Ok(json!({
        "certificateId": issued.id,
        "certificatePem": issued.pem,
        "privateKey": private_pem,
        "certificateOwnershipToken": token,
    }))
}

fn create_from_csr(shared: &Shared, session: &Session, body: &Value) -> Result<Value, Rejection> {
    let csr = body
        .get("certificateSigningRequest")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Rejection::new(
                400,
                "InvalidPayload",
                "certificateSigningRequest is required and must be a string",
            )
        })?;
    let now = shared.clock.now();
    let issued = shared
        .ca
        .issue_from_csr(csr, now, not_after_for(shared, session, now))
        .map_err(|e| Rejection::new(400, "InvalidCsr", e.0))?;
    let token = register_pending(shared, &issued, now);
    Ok(json!({
        "certificateId": issued.id,
        "certificatePem": issued.pem,
        "certificateOwnershipToken": token,
    }))
}

fn string_map(v: Option<&Value>, what: &str) -> Result<BTreeMap<String, String>, Rejection> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    let obj = v.as_object().ok_or_else(|| {
        Rejection::new(
            400,
            "InvalidPayload",
            format!("{what} must be an object of strings"),
        )
    })?;
    obj.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(Rejection::new(
                400,
                "InvalidPayload",
                format!("{what}.{k} must be a string"),
            )),
        })
        .collect()
}

async fn register_thing(
    shared: &Shared,
    session: &Session,
    template_name: &str,
    body: &Value,
) -> Result<Value, Rejection> {
    let token = body
        .get("certificateOwnershipToken")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if token.is_empty() {
        return Err(Rejection::new(
            400,
            "InvalidCertificateOwnershipToken",
            "Certificate ownership token cannot be empty.",
        ));
    }
    let parameters = string_map(body.get("parameters"), "parameters")?;
    let now = shared.clock.now();

    let (template, hook, cert_id, cert_pem) = shared.read(|reg| {
        let t = reg.templates.get(template_name).ok_or_else(|| {
            Rejection::new(
                404,
                "ResourceNotFound",
                format!("Template {template_name} not found"),
            )
        })?;
        if !t.enabled {
            return Err(Rejection::new(
                403,
                "AccessDenied",
                format!("Template {template_name} is disabled"),
            ));
        }
        let tok = reg
            .tokens
            .get(token)
            .filter(|tok| tok.expires_at > now && !(tok.used && shared.settings.single_use_tokens))
            .ok_or_else(|| {
                Rejection::new(
                    400,
                    "InvalidCertificateOwnershipToken",
                    "Invalid certificate ownership token.",
                )
            })?;
        let cert = reg.certificates.get(&tok.certificate_id).ok_or_else(|| {
            Rejection::new(
                400,
                "InvalidCertificateOwnershipToken",
                "The certificate of this ownership token no longer exists.",
            )
        })?;
        let parsed = t
            .parsed
            .clone()
            .ok_or_else(|| Rejection::new(500, "InternalFailure", "template not parsed"))?;
        Ok((parsed, t.hook.clone(), cert.id.clone(), cert.pem.clone()))
    })?;

    let mut params = parameters.clone();
    if let Some(hook) = hook {
        let event = json!({
            "claimCertificateId": session.cert_id,
            "certificateId": cert_id,
            "certificatePem": cert_pem,
            "templateArn": shared.settings.arn(&format!("provisioningtemplate/{template_name}")),
            "clientId": session.client_id,
            "parameters": parameters,
        });
        let overrides = crate::hook::invoke(&hook.target_arn, &event, shared.settings.hook_timeout)
            .await
            .map_err(|why| {
                Rejection::new(
                    403,
                    "AccessDenied",
                    format!("Pre-provisioning hook denied the request: {why}"),
                )
            })?;
        params.extend(overrides);
    }

    let plan = template.evaluate(&params, &cert_id).map_err(|e| {
        Rejection::new(
            400,
            "InvalidRequest",
            format!("Template evaluation failed: {e}"),
        )
    })?;
    let default_override = shared.settings.default_override;
    let arn_prefix = shared.settings.arn("");
    let jobs_queued = shared.write(|reg| {
        // Validate and apply on a copy so that a refused request changes nothing.
        let mut next = reg.clone();
        let cert_for_token = next.tokens.get(token).map(|t| t.certificate_id.clone());
        if cert_for_token.as_deref() != Some(cert_id.as_str()) {
            return Err(Rejection::new(
                400,
                "InvalidCertificateOwnershipToken",
                "Invalid certificate ownership token.",
            ));
        }
        let mut thing_name = None;
        if let Some(tp) = &plan.thing {
            if let Some(tt) = &tp.thing_type
                && !next.thing_types.contains_key(tt)
            {
                return Err(Rejection::new(
                    400,
                    "InvalidRequest",
                    format!("Thing type {tt} not found"),
                ));
            }
            for g in tp.groups.iter().flatten() {
                if !next.thing_groups.contains_key(g) {
                    return Err(Rejection::new(
                        400,
                        "InvalidRequest",
                        format!("Thing group {g} not found"),
                    ));
                }
            }
            let existing = next.things.get(&tp.name).cloned();
            let thing = match existing {
                None => Thing {
                    name: tp.name.clone(),
                    id: new_uuid(),
                    thing_type: tp.thing_type.clone(),
                    attributes: tp.attributes.clone().unwrap_or_default(),
                    groups: tp.groups.clone().unwrap_or_default().into_iter().collect(),
                    billing_group: tp.billing_group.clone(),
                    version: 1,
                    principals: Default::default(),
                },
                Some(mut t) => {
                    let conflict = |what: &str| {
                        Rejection::new(
                            409,
                            "ResourceConflict",
                            format!(
                                "Thing {} already exists and OverrideSettings.{what} is FAIL",
                                tp.name
                            ),
                        )
                    };
                    let mut changed = false;
                    if let Some(attrs) = &tp.attributes {
                        match tp.attributes_override.unwrap_or(default_override) {
                            Override::DoNothing => {}
                            Override::Replace => {
                                changed |= t.attributes != *attrs;
                                t.attributes = attrs.clone();
                            }
                            Override::Merge => {
                                for (k, v) in attrs {
                                    changed |= t.attributes.insert(k.clone(), v.clone()).as_ref()
                                        != Some(v);
                                }
                            }
                            Override::Fail => {
                                if t.attributes != *attrs {
                                    return Err(conflict("AttributePayload"));
                                }
                            }
                        }
                    }
                    if let Some(tt) = &tp.thing_type {
                        match tp.thing_type_override.unwrap_or(default_override) {
                            Override::DoNothing => {}
                            Override::Replace | Override::Merge => {
                                changed |= t.thing_type.as_ref() != Some(tt);
                                t.thing_type = Some(tt.clone());
                            }
                            Override::Fail => {
                                if t.thing_type.as_ref() != Some(tt) {
                                    return Err(conflict("ThingTypeName"));
                                }
                            }
                        }
                    }
                    if let Some(groups) = &tp.groups {
                        let wanted: std::collections::BTreeSet<String> =
                            groups.iter().cloned().collect();
                        match tp.groups_override.unwrap_or(default_override) {
                            Override::DoNothing => {}
                            Override::Replace => {
                                changed |= t.groups != wanted;
                                t.groups = wanted;
                            }
                            Override::Merge => {
                                let before = t.groups.len();
                                t.groups.extend(wanted);
                                changed |= before != t.groups.len();
                            }
                            Override::Fail => {
                                if t.groups != wanted {
                                    return Err(conflict("ThingGroups"));
                                }
                            }
                        }
                    }
                    if changed {
                        t.version += 1;
                    }
                    t
                }
            };
            thing_name = Some(thing.name.clone());
            next.things.insert(thing.name.clone(), thing);
        }
        let mut policy_names = Vec::new();
        for p in &plan.policies {
            match p {
                PolicyPlan::Existing { name } => {
                    if !next.policies.contains_key(name) {
                        return Err(Rejection::new(
                            400,
                            "InvalidRequest",
                            format!("Policy {name} not found"),
                        ));
                    }
                    policy_names.push(name.clone());
                }
                PolicyPlan::Inline { name, document } => {
                    if !next.policies.contains_key(name) {
                        let parsed =
                            crate::policy::PolicyDocument::parse(document).map_err(|e| {
                                Rejection::new(
                                    400,
                                    "InvalidRequest",
                                    format!("Inline policy document: {e}"),
                                )
                            })?;
                        next.policies.insert(
                            name.clone(),
                            Policy {
                                name: name.clone(),
                                document: document.clone(),
                                version_id: 1,
                                created_at: now,
                                parsed: Some(parsed),
                            },
                        );
                    }
                    policy_names.push(name.clone());
                }
            }
        }
        let cert = next.certificates.get_mut(&cert_id).ok_or_else(|| {
            Rejection::new(
                400,
                "InvalidCertificateOwnershipToken",
                "The certificate of this ownership token no longer exists.",
            )
        })?;
        cert.policies.extend(policy_names);
        let active = match &plan.certificate {
            Some(cp) => {
                if cp.status_override == Some(Override::Fail)
                    && cert.status != CertStatus::PendingActivation
                {
                    return Err(Rejection::new(
                        409,
                        "ResourceConflict",
                        "Certificate status is set and OverrideSettings.Status is FAIL",
                    ));
                }
                cp.active
            }
            None => true,
        };
        cert.status = if active {
            CertStatus::Active
        } else {
            CertStatus::Inactive
        };
        cert.last_modified_at = now;
        cert.template = Some(template_name.to_owned());
        let mut jobs_queued = false;
        if let Some(name) = &thing_name {
            next.attach_principal(name, &cert_id);
            // A thing that joins a target group of a continuous job gets its execution.
            jobs_queued = next.apply_continuous_jobs(&arn_prefix, name, now);
        }
        if let Some(tok) = next.tokens.get_mut(token) {
            tok.used = true;
        }
        *reg = next;
        Ok(jobs_queued)
    })?;
    if jobs_queued && let Some(t) = &plan.thing {
        crate::jobs::notify_thing(shared, &t.name);
    }
    let mut reply = serde_json::Map::new();
    if let Some(t) = &plan.thing {
        reply.insert("thingName".to_owned(), Value::String(t.name.clone()));
    }
    reply.insert(
        "deviceConfiguration".to_owned(),
        json!(plan.device_configuration),
    );
    Ok(Value::Object(reply))
}
