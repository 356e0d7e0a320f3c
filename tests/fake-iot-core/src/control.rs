//! AWS IoT's REST control plane: the operations test harnesses and installer apps call through
//! boto3's `iot` client (with `endpoint_url` pointed here; request signing is ignored). Paths,
//! member names, shapes, status codes and error names follow botocore's `iot` service model, so
//! that SDKs parse the answers unchanged: timestamps are epoch seconds, errors carry
//! `x-amzn-ErrorType` and `{"message": ...}`.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::registry::{
    CertStatus, Certificate, Hook, Job, JobExecution, NamedResource, Policy, ProvisioningTemplate,
    Registry, TemplateVersion, Thing, new_uuid,
};
use crate::server::{Settings, Shared};
use crate::template::Template;

/// A temporary provisioning claim is valid for five minutes (AWS docs, provision-wo-cert).
pub const CLAIM_LIFETIME_SECS: i64 = 300;
/// Issued claims start a minute in the past so that a device whose clock is slightly behind
/// does not see a not-yet-valid certificate.
const CLAIM_BACKDATE_SECS: i64 = 60;
/// Quotas from the service model and the AWS IoT quota page.
const TEMPLATE_BODY_MAX: usize = 10_240;
const TEMPLATE_VERSIONS_MAX: usize = 5;
const DESCRIPTION_MAX: usize = 500;
const POLICY_DOCUMENT_MAX: usize = 2048;
const POLICIES_PER_CERTIFICATE_MAX: usize = 10;
const JOB_DOCUMENT_MAX: usize = 32_768;
const JOB_TIMEOUT_MAX_MINUTES: i64 = 10_080;
/// AssociateTargetsWithJob: "The total number of targets associated with a job must not exceed
/// 100."
const JOB_TARGETS_MAX: usize = 100;
const HOOK_PAYLOAD_VERSION: &str = "2020-04-01";
/// Largest page the list operations return (AWS's maximum for most of them).
const PAGE_MAX: usize = 250;
const ENDPOINT_TYPES: [&str; 4] = [
    "iot:Data",
    "iot:Data-ATS",
    "iot:CredentialProvider",
    "iot:Jobs",
];

type AppState = State<Arc<Shared>>;
type Reply = Result<Json<Value>, ApiError>;
type Queried<T> = Result<Query<T>, QueryRejection>;

/// An AWS error: botocore takes the code from `x-amzn-ErrorType` and the text from `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidRequestException", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
    }
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "ResourceAlreadyExistsException",
            message,
        )
    }
    fn delete_conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "DeleteConflictException", message)
    }
    fn version_conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "VersionConflictException", message)
    }
    fn certificate_state(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_ACCEPTABLE,
            "CertificateStateException",
            message,
        )
    }
    fn malformed_policy(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "MalformedPolicyException", message)
    }
    fn versions_limit(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "VersionsLimitExceededException",
            message,
        )
    }
    fn limit_exceeded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, "LimitExceededException", message)
    }
    fn invalid_state_transition(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "InvalidStateTransitionException",
            message,
        )
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailureException",
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Header names are lowercase on the wire anyway; botocore looks them up case-insensitively.
        (
            self.status,
            [("x-amzn-errortype", self.kind)],
            Json(json!({"message": self.message})),
        )
            .into_response()
    }
}

/// AWS omits absent members rather than sending `null`.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

fn reply(v: Value) -> Reply {
    Ok(Json(strip_nulls(v)))
}

/// Parses a JSON body whatever its content type (SDKs differ); no body is an empty object.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(text)
        .map_err(|e| ApiError::invalid(format!("The request body is not valid: {e}")))
}

fn query<T>(q: Queried<T>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::invalid(format!("The query string is not valid: {}", e.body_text())))
}

fn required(value: Option<String>, name: &str) -> Result<String, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::invalid(format!("{name} is required")))
}

/// Checks a resource name against AWS's pattern: ASCII letters and digits plus `extra`.
fn check_name(what: &str, name: &str, max: usize, extra: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.chars().count() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{what} {name:?} must be 1 to {max} characters from A-Z, a-z, 0-9 and {extra:?}"
        )))
    }
}

fn check_description(description: Option<&str>) -> Result<(), ApiError> {
    match description {
        Some(d) if d.chars().count() > DESCRIPTION_MAX => Err(ApiError::invalid(format!(
            "description is longer than {DESCRIPTION_MAX} characters"
        ))),
        _ => Ok(()),
    }
}

/// The page size asked for, or the largest one.
fn page_size(requested: Option<i64>, max: usize) -> Result<usize, ApiError> {
    match requested {
        None => Ok(max),
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "the page size must be between 1 and {max}, not {n}"
                ))
            }),
    }
}

/// One page of `items` (already in order) after the item whose key is `after`; the token of
/// the next page is the key of the last item returned.
fn page<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> String,
    after: Option<&str>,
    size: usize,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let start = match after.filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => {
            items.iter().position(|i| key(i) == token).ok_or_else(|| {
                ApiError::invalid(format!("The pagination token {token} is not valid"))
            })? + 1
        }
    };
    let mut rest: Vec<T> = items.into_iter().skip(start).collect();
    let more = rest.len() > size;
    rest.truncate(size);
    let next = if more { rest.last().map(&key) } else { None };
    Ok((rest, next))
}

/// AWS changes a resource's generation id on every change; derived from its version so that it
/// needs no storage.
fn generation_id(seed: &str, version: u32) -> String {
    let h = hex::encode(Sha256::digest(format!("{seed}/{version}")));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn cert_arn(s: &Settings, id: &str) -> String {
    s.arn(&format!("cert/{id}"))
}

fn thing_arn(s: &Settings, name: &str) -> String {
    s.arn(&format!("thing/{name}"))
}

fn group_arn(s: &Settings, name: &str) -> String {
    s.arn(&format!("thinggroup/{name}"))
}

fn template_arn(s: &Settings, name: &str) -> String {
    s.arn(&format!("provisioningtemplate/{name}"))
}

fn policy_arn(s: &Settings, name: &str) -> String {
    s.arn(&format!("policy/{name}"))
}

fn check_certificate_id(id: &str) -> Result<(), ApiError> {
    if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{id:?} is not a certificate id (64 hexadecimal digits)"
        )))
    }
}

/// The certificate id of a principal or policy target given as a certificate ARN.
fn cert_id_from_arn(s: &Settings, arn: &str) -> Result<String, ApiError> {
    let prefix = cert_arn(s, "");
    let id = arn.strip_prefix(&prefix).ok_or_else(|| {
        ApiError::invalid(format!(
            "{arn} is not a certificate ARN of this account ({prefix}<certificateId>)"
        ))
    })?;
    check_certificate_id(id)?;
    Ok(id.to_ascii_lowercase())
}

/// A certificate of the account: temporary provisioning claims are not listed in the account
/// (AWS docs), so the control plane does not see them.
fn account_cert<'r>(reg: &'r Registry, id: &str) -> Result<&'r Certificate, ApiError> {
    reg.certificates
        .get(id)
        .filter(|c| c.temporary_claim_for.is_none())
        .ok_or_else(|| ApiError::not_found(format!("Certificate {id} not found")))
}

fn account_cert_mut<'r>(reg: &'r mut Registry, id: &str) -> Result<&'r mut Certificate, ApiError> {
    reg.certificates
        .get_mut(id)
        .filter(|c| c.temporary_claim_for.is_none())
        .ok_or_else(|| ApiError::not_found(format!("Certificate {id} not found")))
}

fn thing_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("Thing {name} not found"))
}

fn template_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("Template {name} not found"))
}

/// All routes of the control plane.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/provisioning-templates",
            post(create_template).get(list_templates),
        )
        .route(
            "/provisioning-templates/{name}",
            get(describe_template)
                .patch(update_template)
                .delete(delete_template),
        )
        .route(
            "/provisioning-templates/{name}/versions",
            post(create_template_version).get(list_template_versions),
        )
        .route(
            "/provisioning-templates/{name}/versions/{version}",
            get(describe_template_version).delete(delete_template_version),
        )
        .route(
            "/provisioning-templates/{name}/provisioning-claim",
            post(create_provisioning_claim),
        )
        .route("/policies", get(list_policies))
        .route(
            "/policies/{name}",
            post(create_policy).get(get_policy).delete(delete_policy),
        )
        .route(
            "/target-policies/{name}",
            put(attach_policy).post(detach_policy),
        )
        .route("/attached-policies/{target}", post(list_attached_policies))
        .route("/policy-targets/{name}", post(list_targets_for_policy))
        .route("/things", get(list_things))
        .route(
            "/things/{name}",
            post(create_thing)
                .get(describe_thing)
                .patch(update_thing)
                .delete(delete_thing),
        )
        .route(
            "/things/{name}/principals",
            get(list_thing_principals)
                .put(attach_thing_principal)
                .delete(detach_thing_principal),
        )
        .route("/principals/things", get(list_principal_things))
        .route("/things/{name}/jobs", get(list_executions_for_thing))
        .route("/things/{name}/jobs/{job}", get(describe_job_execution))
        .route("/certificates", get(list_certificates))
        .route(
            "/certificates/{id}",
            get(describe_certificate)
                .put(update_certificate)
                .delete(delete_certificate),
        )
        .route("/thing-types", get(list_thing_types))
        .route(
            "/thing-types/{name}",
            post(create_thing_type).get(describe_thing_type),
        )
        .route("/thing-groups", get(list_thing_groups))
        .route(
            "/thing-groups/addThingToThingGroup",
            put(add_thing_to_group),
        )
        .route(
            "/thing-groups/removeThingFromThingGroup",
            put(remove_thing_from_group),
        )
        .route(
            "/thing-groups/{name}",
            post(create_thing_group).get(describe_thing_group),
        )
        .route("/thing-groups/{name}/things", get(list_things_in_group))
        .route(
            "/jobs/{id}",
            put(create_job).get(describe_job).delete(delete_job),
        )
        .route("/jobs/{id}/cancel", put(cancel_job))
        .route("/jobs/{id}/targets", post(associate_targets_with_job))
        .route("/jobs/{id}/job-document", get(get_job_document))
        .route("/jobs/{id}/things", get(list_executions_for_job))
        .route("/endpoint", get(describe_endpoint))
}

// ---------------------------------------------------------------------------------------------
// Provisioning templates

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HookInput {
    target_arn: Option<String>,
    payload_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateTemplateInput {
    template_name: Option<String>,
    description: Option<String>,
    template_body: Option<String>,
    enabled: Option<bool>,
    provisioning_role_arn: Option<String>,
    pre_provisioning_hook: Option<HookInput>,
    #[serde(rename = "type")]
    template_type: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateTemplateInput {
    description: Option<String>,
    enabled: Option<bool>,
    default_version_id: Option<u32>,
    provisioning_role_arn: Option<String>,
    pre_provisioning_hook: Option<HookInput>,
    remove_pre_provisioning_hook: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateVersionInput {
    template_body: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SetAsDefault {
    set_as_default: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenPage {
    max_results: Option<i64>,
    next_token: Option<String>,
}

fn parse_template_body(body: &str) -> Result<Template, ApiError> {
    if body.chars().count() > TEMPLATE_BODY_MAX {
        return Err(ApiError::invalid(format!(
            "templateBody is longer than {TEMPLATE_BODY_MAX} characters"
        )));
    }
    Template::parse(body).map_err(|e| ApiError::invalid(format!("Invalid templateBody: {e}")))
}

fn check_role_arn(arn: &str) -> Result<(), ApiError> {
    if arn.starts_with("arn:") && arn.contains(":role/") {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "provisioningRoleArn {arn} is not an IAM role ARN"
        )))
    }
}

fn check_template_type(t: &str) -> Result<(), ApiError> {
    match t {
        "FLEET_PROVISIONING" | "JITP" => Ok(()),
        _ => Err(ApiError::invalid(format!(
            "type {t} is not FLEET_PROVISIONING or JITP"
        ))),
    }
}

/// AWS invokes a Lambda; the fake POSTs the same event to an HTTP URL given as `targetArn`, so
/// a Lambda ARN is refused here rather than failing every RegisterThing later.
fn check_hook(h: HookInput, template_type: &str) -> Result<Hook, ApiError> {
    if template_type != "FLEET_PROVISIONING" {
        return Err(ApiError::invalid(
            "preProvisioningHook is only allowed for FLEET_PROVISIONING templates",
        ));
    }
    let target = required(h.target_arn, "preProvisioningHook.targetArn")?;
    if !target.starts_with("http://") {
        return Err(ApiError::invalid(format!(
            "preProvisioningHook.targetArn {target}: the fake calls the hook over HTTP; give an http:// URL instead of a Lambda ARN"
        )));
    }
    let version = h
        .payload_version
        .unwrap_or_else(|| HOOK_PAYLOAD_VERSION.to_owned());
    if version != HOOK_PAYLOAD_VERSION {
        return Err(ApiError::invalid(format!(
            "preProvisioningHook.payloadVersion {version} is not supported; the only version is {HOOK_PAYLOAD_VERSION}"
        )));
    }
    Ok(Hook {
        target_arn: target,
        payload_version: Some(version),
    })
}

fn hook_json(h: &Hook) -> Value {
    json!({"targetArn": h.target_arn, "payloadVersion": h.payload_version})
}

fn template_json(s: &Settings, t: &ProvisioningTemplate) -> Value {
    json!({
        "templateArn": template_arn(s, &t.name),
        "templateName": t.name,
        "description": t.description,
        "creationDate": t.created_at,
        "lastModifiedDate": t.last_modified_at,
        "defaultVersionId": t.default_version_id,
        "templateBody": t.body,
        "enabled": t.enabled,
        "provisioningRoleArn": t.role_arn,
        "preProvisioningHook": t.hook.as_ref().map(hook_json),
        "type": t.template_type,
    })
}

fn template_listing(s: &Settings, t: &ProvisioningTemplate) -> Value {
    json!({
        "templateArn": template_arn(s, &t.name),
        "templateName": t.name,
        "description": t.description,
        "creationDate": t.created_at,
        "lastModifiedDate": t.last_modified_at,
        "enabled": t.enabled,
        "type": t.template_type,
    })
}

async fn create_template(State(shared): AppState, body: Bytes) -> Reply {
    let input: CreateTemplateInput = parse_body(&body)?;
    let name = required(input.template_name, "templateName")?;
    check_name("templateName", &name, 36, "_-")?;
    let template_body = required(input.template_body, "templateBody")?;
    let parsed = parse_template_body(&template_body)?;
    let role = required(input.provisioning_role_arn, "provisioningRoleArn")?;
    check_role_arn(&role)?;
    check_description(input.description.as_deref())?;
    let template_type = input
        .template_type
        .unwrap_or_else(|| "FLEET_PROVISIONING".to_owned());
    check_template_type(&template_type)?;
    let hook = input
        .pre_provisioning_hook
        .map(|h| check_hook(h, &template_type))
        .transpose()?;
    let now = shared.clock.now();
    let s = &shared.settings;
    shared.write(|reg| {
        if reg.templates.contains_key(&name) {
            return Err(ApiError::already_exists(format!(
                "Template {name} already exists"
            )));
        }
        let t = ProvisioningTemplate {
            name: name.clone(),
            body: template_body.clone(),
            // AWS creates templates disabled unless asked otherwise.
            enabled: input.enabled.unwrap_or(false),
            description: input.description,
            role_arn: Some(role),
            hook,
            created_at: now,
            last_modified_at: now,
            default_version_id: 1,
            template_type,
            versions: BTreeMap::from([(
                1,
                TemplateVersion {
                    body: template_body.clone(),
                    created_at: now,
                },
            )]),
            parsed: Some(parsed),
        };
        reg.templates.insert(name.clone(), t);
        Ok(())
    })?;
    reply(
        json!({"templateArn": template_arn(s, &name), "templateName": name, "defaultVersionId": 1}),
    )
}

async fn describe_template(State(shared): AppState, Path(name): Path<String>) -> Reply {
    let s = &shared.settings;
    let v = shared.read(|reg| reg.templates.get(&name).map(|t| template_json(s, t)));
    reply(v.ok_or_else(|| template_not_found(&name))?)
}

async fn list_templates(State(shared): AppState, q: Queried<TokenPage>) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let s = &shared.settings;
    let all: Vec<(String, Value)> = shared.read(|reg| {
        reg.templates
            .values()
            .map(|t| (t.name.clone(), template_listing(s, t)))
            .collect()
    });
    let (items, next) = page(all, |(k, _)| k.clone(), q.next_token.as_deref(), size)?;
    reply(
        json!({"templates": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "nextToken": next}),
    )
}

async fn update_template(State(shared): AppState, Path(name): Path<String>, body: Bytes) -> Reply {
    let input: UpdateTemplateInput = parse_body(&body)?;
    check_description(input.description.as_deref())?;
    if let Some(role) = &input.provisioning_role_arn {
        check_role_arn(role)?;
    }
    let remove_hook = input.remove_pre_provisioning_hook.unwrap_or(false);
    if remove_hook && input.pre_provisioning_hook.is_some() {
        return Err(ApiError::invalid(
            "preProvisioningHook and removePreProvisioningHook cannot be given together",
        ));
    }
    let now = shared.clock.now();
    shared.write(|reg| {
        let t = reg
            .templates
            .get_mut(&name)
            .ok_or_else(|| template_not_found(&name))?;
        let hook = input
            .pre_provisioning_hook
            .map(|h| check_hook(h, &t.template_type))
            .transpose()?;
        if let Some(id) = input.default_version_id {
            let body = t.versions.get(&id).map(|v| v.body.clone()).ok_or_else(|| {
                ApiError::not_found(format!("Version {id} of template {name} not found"))
            })?;
            // Stored versions were parsed when created; a failure here is the fake's own bug.
            let parsed = Template::parse(&body)
                .map_err(|e| ApiError::internal(format!("version {id}: {e}")))?;
            t.body = body;
            t.parsed = Some(parsed);
            t.default_version_id = id;
        }
        if let Some(d) = input.description {
            t.description = Some(d);
        }
        if let Some(e) = input.enabled {
            t.enabled = e;
        }
        if let Some(r) = input.provisioning_role_arn {
            t.role_arn = Some(r);
        }
        if hook.is_some() {
            t.hook = hook;
        }
        if remove_hook {
            t.hook = None;
        }
        t.last_modified_at = now;
        Ok(())
    })?;
    reply(json!({}))
}

async fn delete_template(State(shared): AppState, Path(name): Path<String>) -> Reply {
    shared.write(|reg| {
        reg.templates
            .remove(&name)
            .ok_or_else(|| template_not_found(&name))?;
        Ok(())
    })?;
    reply(json!({}))
}

async fn create_template_version(
    State(shared): AppState,
    Path(name): Path<String>,
    q: Queried<SetAsDefault>,
    body: Bytes,
) -> Reply {
    let set_default = query(q)?.set_as_default.unwrap_or(false);
    let input: CreateVersionInput = parse_body(&body)?;
    let template_body = required(input.template_body, "templateBody")?;
    let parsed = parse_template_body(&template_body)?;
    let now = shared.clock.now();
    let s = &shared.settings;
    let id = shared.write(|reg| {
        let t = reg
            .templates
            .get_mut(&name)
            .ok_or_else(|| template_not_found(&name))?;
        if t.versions.len() >= TEMPLATE_VERSIONS_MAX {
            return Err(ApiError::versions_limit(format!(
                "Template {name} already has {TEMPLATE_VERSIONS_MAX} versions; delete one first"
            )));
        }
        let id = t.versions.keys().next_back().copied().unwrap_or(0) + 1;
        let version = TemplateVersion {
            body: template_body.clone(),
            created_at: now,
        };
        t.versions.insert(id, version);
        if set_default {
            t.body = template_body;
            t.parsed = Some(parsed);
            t.default_version_id = id;
        }
        t.last_modified_at = now;
        Ok(id)
    })?;
    reply(json!({
        "templateArn": template_arn(s, &name),
        "templateName": name,
        "versionId": id,
        "isDefaultVersion": set_default,
    }))
}

async fn list_template_versions(
    State(shared): AppState,
    Path(name): Path<String>,
    q: Queried<TokenPage>,
) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let all = shared.read(|reg| {
        let t = reg.templates.get(&name).ok_or_else(|| template_not_found(&name))?;
        Ok::<_, ApiError>(
            t.versions
                .iter()
                .map(|(id, v)| {
                    let item = json!({"versionId": id, "creationDate": v.created_at, "isDefaultVersion": *id == t.default_version_id});
                    (id.to_string(), item)
                })
                .collect::<Vec<_>>(),
        )
    })?;
    let (items, next) = page(all, |(k, _)| k.clone(), q.next_token.as_deref(), size)?;
    reply(
        json!({"versions": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "nextToken": next}),
    )
}

async fn describe_template_version(
    State(shared): AppState,
    Path((name, id)): Path<(String, String)>,
) -> Reply {
    let id: u32 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("versionId {id} is not a number")))?;
    let v = shared.read(|reg| {
        let t = reg
            .templates
            .get(&name)
            .ok_or_else(|| template_not_found(&name))?;
        let v = t.versions.get(&id).cloned().ok_or_else(|| {
            ApiError::not_found(format!("Version {id} of template {name} not found"))
        })?;
        Ok::<_, ApiError>(json!({
            "versionId": id,
            "creationDate": v.created_at,
            "templateBody": v.body,
            "isDefaultVersion": id == t.default_version_id,
        }))
    })?;
    reply(v)
}

async fn delete_template_version(
    State(shared): AppState,
    Path((name, id)): Path<(String, String)>,
) -> Reply {
    let id: u32 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("versionId {id} is not a number")))?;
    shared.write(|reg| {
        let t = reg.templates.get_mut(&name).ok_or_else(|| template_not_found(&name))?;
        if id == t.default_version_id {
            return Err(ApiError::delete_conflict(format!(
                "Version {id} is the default version of template {name}; make another version the default first"
            )));
        }
        t.versions
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| ApiError::not_found(format!("Version {id} of template {name} not found")))
    })?;
    reply(json!({}))
}

async fn create_provisioning_claim(State(shared): AppState, Path(name): Path<String>) -> Reply {
    let template_type =
        shared.read(|reg| reg.templates.get(&name).map(|t| t.template_type.clone()));
    let template_type = template_type.ok_or_else(|| template_not_found(&name))?;
    if template_type != "FLEET_PROVISIONING" {
        return Err(ApiError::invalid(format!(
            "Template {name} is a {template_type} template, not FLEET_PROVISIONING"
        )));
    }
    // RSA-2048 generation takes tens of milliseconds: keep it off the async workers.
    let (private_pem, public_pem, spki) = tokio::task::spawn_blocking(crate::ca::new_rsa_key)
        .await
        .map_err(|e| ApiError::internal(format!("generating the claim key: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let now = shared.clock.now();
    let expiration = now + CLAIM_LIFETIME_SECS;
    let issued = shared
        .ca
        .issue(&spki, now - CLAIM_BACKDATE_SECS, expiration)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    shared.write(|reg| {
        reg.certificates.insert(
            issued.id.clone(),
            Certificate {
                id: issued.id.clone(),
                pem: issued.pem.clone(),
                status: CertStatus::Active,
                created_at: now,
                last_modified_at: now,
                not_before: issued.not_before,
                not_after: issued.not_after,
                policies: BTreeSet::new(),
                things: BTreeSet::new(),
                temporary_claim_for: Some(name.clone()),
                customer_version: 1,
                template: None,
            },
        );
    });
    reply(json!({
        "certificateId": issued.id,
        "certificatePem": issued.pem,
        "keyPair": {"PublicKey": public_pem, "PrivateKey": private_pem},
        "expiration": expiration,
    }))
}

// ---------------------------------------------------------------------------------------------
// Policies

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyInput {
    policy_document: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TargetInput {
    target: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MarkerPage {
    marker: Option<String>,
    page_size: Option<i64>,
    #[serde(rename = "isAscendingOrder")]
    ascending_order: Option<bool>,
}

fn policy_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("Policy {name} not found"))
}

fn policy_json(s: &Settings, p: &Policy) -> Value {
    json!({
        "policyName": p.name,
        "policyArn": policy_arn(s, &p.name),
        "policyDocument": p.document,
        "defaultVersionId": p.version_id.to_string(),
        "creationDate": p.created_at,
        "lastModifiedDate": p.created_at,
        "generationId": generation_id(&p.name, p.version_id),
    })
}

fn policy_listing(s: &Settings, name: &str) -> Value {
    json!({"policyName": name, "policyArn": policy_arn(s, name)})
}

async fn create_policy(State(shared): AppState, Path(name): Path<String>, body: Bytes) -> Reply {
    check_name("policyName", &name, 128, "_+=,.@-")?;
    let input: PolicyInput = parse_body(&body)?;
    let document = required(input.policy_document, "policyDocument")?;
    // AWS's limit counts characters other than white space.
    if document.chars().filter(|c| !c.is_whitespace()).count() > POLICY_DOCUMENT_MAX {
        return Err(ApiError::malformed_policy(format!(
            "The policy document is longer than {POLICY_DOCUMENT_MAX} characters (white space excluded)"
        )));
    }
    let parsed = crate::policy::PolicyDocument::parse(&document)
        .map_err(|e| ApiError::malformed_policy(e.to_string()))?;
    let now = shared.clock.now();
    shared.write(|reg| {
        if reg.policies.contains_key(&name) {
            return Err(ApiError::already_exists(format!(
                "Policy {name} already exists"
            )));
        }
        reg.policies.insert(
            name.clone(),
            Policy {
                name: name.clone(),
                document: document.clone(),
                version_id: 1,
                created_at: now,
                parsed: Some(parsed),
            },
        );
        Ok(())
    })?;
    let s = &shared.settings;
    reply(json!({
        "policyName": name,
        "policyArn": policy_arn(s, &name),
        "policyDocument": document,
        "policyVersionId": "1",
    }))
}

async fn get_policy(State(shared): AppState, Path(name): Path<String>) -> Reply {
    let s = &shared.settings;
    let v = shared.read(|reg| reg.policies.get(&name).map(|p| policy_json(s, p)));
    reply(v.ok_or_else(|| policy_not_found(&name))?)
}

async fn delete_policy(State(shared): AppState, Path(name): Path<String>) -> Reply {
    shared.write(|reg| {
        if !reg.policies.contains_key(&name) {
            return Err(policy_not_found(&name));
        }
        if let Some(c) = reg
            .certificates
            .values()
            .find(|c| c.policies.contains(&name))
        {
            return Err(ApiError::delete_conflict(format!(
                "Policy {name} is attached to certificate {}; detach it first",
                c.id
            )));
        }
        reg.policies.remove(&name);
        Ok(())
    })?;
    reply(json!({}))
}

async fn list_policies(State(shared): AppState, q: Queried<MarkerPage>) -> Reply {
    let q = query(q)?;
    let size = page_size(q.page_size, PAGE_MAX)?;
    let mut names: Vec<String> = shared.read(|reg| reg.policies.keys().cloned().collect());
    if q.ascending_order == Some(false) {
        names.reverse();
    }
    let (items, next) = page(names, Clone::clone, q.marker.as_deref(), size)?;
    let s = &shared.settings;
    reply(json!({
        "policies": items.iter().map(|n| policy_listing(s, n)).collect::<Vec<_>>(),
        "nextMarker": next,
    }))
}

fn policy_target(shared: &Shared, body: &[u8]) -> Result<String, ApiError> {
    let input: TargetInput = parse_body(body)?;
    let target = required(input.target, "target")?;
    cert_id_from_arn(&shared.settings, &target).map_err(|e| {
        ApiError::invalid(format!(
            "{}; the fake attaches policies to certificates only",
            e.message
        ))
    })
}

async fn attach_policy(State(shared): AppState, Path(name): Path<String>, body: Bytes) -> Reply {
    let cert_id = policy_target(&shared, &body)?;
    shared.write(|reg| {
        if !reg.policies.contains_key(&name) {
            return Err(policy_not_found(&name));
        }
        let cert = account_cert_mut(reg, &cert_id)?;
        if !cert.policies.contains(&name) && cert.policies.len() >= POLICIES_PER_CERTIFICATE_MAX {
            return Err(ApiError::limit_exceeded(format!(
                "Certificate {cert_id} already has {POLICIES_PER_CERTIFICATE_MAX} policies attached"
            )));
        }
        cert.policies.insert(name.clone());
        Ok(())
    })?;
    reply(json!({}))
}

async fn detach_policy(State(shared): AppState, Path(name): Path<String>, body: Bytes) -> Reply {
    let cert_id = policy_target(&shared, &body)?;
    shared.write(|reg| {
        if !reg.policies.contains_key(&name) {
            return Err(policy_not_found(&name));
        }
        account_cert_mut(reg, &cert_id)?.policies.remove(&name);
        Ok(())
    })?;
    reply(json!({}))
}

async fn list_attached_policies(
    State(shared): AppState,
    Path(target): Path<String>,
    q: Queried<MarkerPage>,
) -> Reply {
    let q = query(q)?;
    let size = page_size(q.page_size, PAGE_MAX)?;
    let s = &shared.settings;
    let cert_id = cert_id_from_arn(s, &target)?;
    let names: Vec<String> = shared.read(|reg| {
        Ok::<_, ApiError>(
            account_cert(reg, &cert_id)?
                .policies
                .iter()
                .cloned()
                .collect(),
        )
    })?;
    let (items, next) = page(names, Clone::clone, q.marker.as_deref(), size)?;
    reply(json!({
        "policies": items.iter().map(|n| policy_listing(s, n)).collect::<Vec<_>>(),
        "nextMarker": next,
    }))
}

async fn list_targets_for_policy(
    State(shared): AppState,
    Path(name): Path<String>,
    q: Queried<MarkerPage>,
) -> Reply {
    let q = query(q)?;
    let size = page_size(q.page_size, PAGE_MAX)?;
    let s = &shared.settings;
    let targets: Vec<String> = shared.read(|reg| {
        if !reg.policies.contains_key(&name) {
            return Err(policy_not_found(&name));
        }
        Ok(reg
            .certificates
            .values()
            .filter(|c| c.temporary_claim_for.is_none() && c.policies.contains(&name))
            .map(|c| cert_arn(s, &c.id))
            .collect())
    })?;
    let (items, next) = page(targets, Clone::clone, q.marker.as_deref(), size)?;
    reply(json!({"targets": items, "nextMarker": next}))
}

// ---------------------------------------------------------------------------------------------
// Things and principals

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttributePayload {
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    merge: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateThingInput {
    thing_type_name: Option<String>,
    attribute_payload: Option<AttributePayload>,
    billing_group_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateThingInput {
    thing_type_name: Option<String>,
    attribute_payload: Option<AttributePayload>,
    expected_version: Option<u64>,
    remove_thing_type: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListThingsQuery {
    max_results: Option<i64>,
    next_token: Option<String>,
    attribute_name: Option<String>,
    attribute_value: Option<String>,
    thing_type_name: Option<String>,
    use_prefix_attribute_value: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExpectedVersion {
    expected_version: Option<u64>,
}

fn thing_json(s: &Settings, t: &Thing) -> Value {
    json!({
        "defaultClientId": t.name,
        "thingName": t.name,
        "thingId": t.id,
        "thingArn": thing_arn(s, &t.name),
        "thingTypeName": t.thing_type,
        "attributes": t.attributes,
        "version": t.version,
        "billingGroupName": t.billing_group,
    })
}

fn thing_listing(s: &Settings, t: &Thing) -> Value {
    json!({
        "thingName": t.name,
        "thingTypeName": t.thing_type,
        "thingArn": thing_arn(s, &t.name),
        "attributes": t.attributes,
        "version": t.version,
    })
}

/// Applies an attribute payload: merging adds and replaces, and an empty value removes the
/// attribute; otherwise the attributes are replaced.
fn apply_attributes(current: &mut BTreeMap<String, String>, payload: &AttributePayload) {
    if !payload.merge {
        current.clear();
    }
    for (k, v) in &payload.attributes {
        if v.is_empty() {
            current.remove(k);
        } else {
            current.insert(k.clone(), v.clone());
        }
    }
}

fn check_thing_type_exists(reg: &Registry, name: &str) -> Result<(), ApiError> {
    if reg.thing_types.contains_key(name) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("Thing type {name} not found")))
    }
}

async fn create_thing(State(shared): AppState, Path(name): Path<String>, body: Bytes) -> Reply {
    check_name("thingName", &name, 128, ":_-")?;
    let input: CreateThingInput = parse_body(&body)?;
    let mut attributes = BTreeMap::new();
    if let Some(p) = &input.attribute_payload {
        apply_attributes(&mut attributes, p);
    }
    let thing = shared.write(|reg| {
        if let Some(tt) = &input.thing_type_name {
            check_thing_type_exists(reg, tt)?;
        }
        if let Some(existing) = reg.things.get(&name) {
            // AWS: the same name and configuration succeeds; a different one is a conflict.
            let same = existing.thing_type == input.thing_type_name
                && existing.attributes == attributes
                && existing.billing_group == input.billing_group_name;
            return if same {
                Ok(existing.clone())
            } else {
                Err(ApiError::already_exists(format!(
                    "Thing {name} already exists with a different configuration"
                )))
            };
        }
        let thing = Thing {
            name: name.clone(),
            id: new_uuid(),
            thing_type: input.thing_type_name.clone(),
            attributes,
            groups: BTreeSet::new(),
            billing_group: input.billing_group_name.clone(),
            version: 1,
            principals: BTreeSet::new(),
        };
        reg.things.insert(name.clone(), thing.clone());
        Ok(thing)
    })?;
    let s = &shared.settings;
    reply(
        json!({"thingName": thing.name, "thingArn": thing_arn(s, &thing.name), "thingId": thing.id}),
    )
}

async fn describe_thing(State(shared): AppState, Path(name): Path<String>) -> Reply {
    let s = &shared.settings;
    let v = shared.read(|reg| reg.things.get(&name).map(|t| thing_json(s, t)));
    reply(v.ok_or_else(|| thing_not_found(&name))?)
}

async fn update_thing(State(shared): AppState, Path(name): Path<String>, body: Bytes) -> Reply {
    let input: UpdateThingInput = parse_body(&body)?;
    let remove_type = input.remove_thing_type.unwrap_or(false);
    if remove_type && input.thing_type_name.is_some() {
        return Err(ApiError::invalid(
            "thingTypeName and removeThingType cannot be given together",
        ));
    }
    shared.write(|reg| {
        if let Some(tt) = &input.thing_type_name {
            check_thing_type_exists(reg, tt)?;
        }
        let t = reg
            .things
            .get_mut(&name)
            .ok_or_else(|| thing_not_found(&name))?;
        if let Some(v) = input.expected_version
            && v != t.version
        {
            return Err(ApiError::version_conflict(format!(
                "Thing {name} is at version {}, not the expected version {v}",
                t.version
            )));
        }
        if let Some(p) = &input.attribute_payload {
            apply_attributes(&mut t.attributes, p);
        }
        if input.thing_type_name.is_some() {
            t.thing_type = input.thing_type_name;
        }
        if remove_type {
            t.thing_type = None;
        }
        t.version += 1;
        Ok(())
    })?;
    reply(json!({}))
}

async fn delete_thing(
    State(shared): AppState,
    Path(name): Path<String>,
    q: Queried<ExpectedVersion>,
) -> Reply {
    let q = query(q)?;
    shared.write(|reg| {
        // AWS: deleting a thing that does not exist succeeds.
        let Some(t) = reg.things.get(&name) else {
            return Ok(());
        };
        if let Some(v) = q.expected_version
            && v != t.version
        {
            return Err(ApiError::version_conflict(format!(
                "Thing {name} is at version {}, not the expected version {v}",
                t.version
            )));
        }
        if !t.principals.is_empty() {
            return Err(ApiError::invalid(format!(
                "Cannot delete thing {name}: detach its {} principal(s) first",
                t.principals.len()
            )));
        }
        reg.things.remove(&name);
        Ok(())
    })?;
    reply(json!({}))
}

async fn list_things(State(shared): AppState, q: Queried<ListThingsQuery>) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let prefix = q.use_prefix_attribute_value.unwrap_or(false);
    let matches = |t: &Thing| {
        let type_ok = q
            .thing_type_name
            .as_ref()
            .is_none_or(|tt| t.thing_type.as_ref() == Some(tt));
        let attr_ok = match (&q.attribute_name, &q.attribute_value) {
            (Some(n), Some(v)) => t.attributes.get(n).is_some_and(|a| {
                if prefix {
                    a.starts_with(v.as_str())
                } else {
                    a == v
                }
            }),
            (Some(n), None) => t.attributes.contains_key(n),
            _ => true,
        };
        type_ok && attr_ok
    };
    let s = &shared.settings;
    let all: Vec<(String, Value)> = shared.read(|reg| {
        reg.things
            .values()
            .filter(|t| matches(t))
            .map(|t| (t.name.clone(), thing_listing(s, t)))
            .collect()
    });
    let (items, next) = page(all, |(k, _)| k.clone(), q.next_token.as_deref(), size)?;
    reply(
        json!({"things": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "nextToken": next}),
    )
}

fn principal_header(shared: &Shared, headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers
        .get("x-amzn-principal")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::invalid("principal (header x-amzn-principal) is required"))?;
    cert_id_from_arn(&shared.settings, value)
}

async fn attach_thing_principal(
    State(shared): AppState,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Reply {
    let cert_id = principal_header(&shared, &headers)?;
    shared.write(|reg| {
        if !reg.things.contains_key(&name) {
            return Err(thing_not_found(&name));
        }
        account_cert(reg, &cert_id)?;
        reg.attach_principal(&name, &cert_id);
        Ok(())
    })?;
    reply(json!({}))
}

async fn detach_thing_principal(
    State(shared): AppState,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Reply {
    let cert_id = principal_header(&shared, &headers)?;
    shared.write(|reg| {
        if !reg.things.contains_key(&name) {
            return Err(thing_not_found(&name));
        }
        account_cert(reg, &cert_id)?;
        reg.detach_principal(&name, &cert_id);
        Ok(())
    })?;
    reply(json!({}))
}

async fn list_thing_principals(
    State(shared): AppState,
    Path(name): Path<String>,
    q: Queried<TokenPage>,
) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let s = &shared.settings;
    let arns: Vec<String> = shared.read(|reg| {
        let t = reg
            .things
            .get(&name)
            .ok_or_else(|| thing_not_found(&name))?;
        Ok::<_, ApiError>(t.principals.iter().map(|id| cert_arn(s, id)).collect())
    })?;
    let (items, next) = page(arns, Clone::clone, q.next_token.as_deref(), size)?;
    reply(json!({"principals": items, "nextToken": next}))
}

async fn list_principal_things(
    State(shared): AppState,
    headers: HeaderMap,
    q: Queried<TokenPage>,
) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let cert_id = principal_header(&shared, &headers)?;
    let names: Vec<String> = shared.read(|reg| {
        Ok::<_, ApiError>(
            account_cert(reg, &cert_id)?
                .things
                .iter()
                .cloned()
                .collect(),
        )
    })?;
    let (items, next) = page(names, Clone::clone, q.next_token.as_deref(), size)?;
    reply(json!({"things": items, "nextToken": next}))
}

// ---------------------------------------------------------------------------------------------
// Certificates

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewStatus {
    new_status: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ForceDelete {
    force_delete: Option<bool>,
}

fn certificate_json(s: &Settings, c: &Certificate) -> Value {
    json!({
        "certificateArn": cert_arn(s, &c.id),
        "certificateId": c.id,
        "status": c.status.as_str(),
        "certificatePem": c.pem,
        "ownedBy": s.account,
        "creationDate": c.created_at,
        "lastModifiedDate": c.last_modified_at,
        "customerVersion": c.customer_version,
        "generationId": generation_id(&c.id, c.customer_version),
        "validity": {"notBefore": c.not_before, "notAfter": c.not_after},
        "certificateMode": "DEFAULT",
    })
}

fn certificate_listing(s: &Settings, c: &Certificate) -> Value {
    json!({
        "certificateArn": cert_arn(s, &c.id),
        "certificateId": c.id,
        "status": c.status.as_str(),
        "certificateMode": "DEFAULT",
        "creationDate": c.created_at,
    })
}

async fn describe_certificate(State(shared): AppState, Path(id): Path<String>) -> Reply {
    check_certificate_id(&id)?;
    let s = &shared.settings;
    let v = shared.read(|reg| account_cert(reg, &id).map(|c| certificate_json(s, c)))?;
    reply(json!({"certificateDescription": v}))
}

/// Whether UpdateCertificate may move a certificate from `from` to `to`: a revoked certificate
/// stays revoked, and only ACTIVE, INACTIVE and REVOKED can be set.
fn check_status_change(id: &str, from: CertStatus, to: CertStatus) -> Result<(), ApiError> {
    if !matches!(
        to,
        CertStatus::Active | CertStatus::Inactive | CertStatus::Revoked
    ) {
        return Err(ApiError::invalid(format!(
            "newStatus {} cannot be set with UpdateCertificate",
            to.as_str()
        )));
    }
    match from {
        CertStatus::Revoked if to != CertStatus::Revoked => Err(ApiError::certificate_state(
            format!("Certificate {id} is revoked and cannot change status"),
        )),
        CertStatus::PendingTransfer => Err(ApiError::certificate_state(format!(
            "Certificate {id} is pending transfer and cannot change status"
        ))),
        _ => Ok(()),
    }
}

async fn update_certificate(
    State(shared): AppState,
    Path(id): Path<String>,
    q: Queried<NewStatus>,
) -> Reply {
    check_certificate_id(&id)?;
    let requested = required(query(q)?.new_status, "newStatus")?;
    let status = CertStatus::parse(&requested).ok_or_else(|| {
        ApiError::invalid(format!("newStatus {requested} is not a certificate status"))
    })?;
    set_certificate_status(&shared, &id, status)?;
    reply(json!({}))
}

/// UpdateCertificate for in-process callers (tests of the agent): the same checks and effects
/// as `PUT /certificates/{id}?newStatus=…`.
pub fn set_certificate_status(
    shared: &Shared,
    id: &str,
    status: CertStatus,
) -> Result<(), ApiError> {
    check_certificate_id(id)?;
    let now = shared.clock.now();
    shared.write(|reg| {
        let c = account_cert_mut(reg, id)?;
        check_status_change(id, c.status, status)?;
        if c.status != status {
            c.status = status;
            c.last_modified_at = now;
            c.customer_version += 1;
        }
        Ok(())
    })?;
    // AWS: "Within a few minutes of updating a certificate from the ACTIVE state to any other
    // state, AWS IoT disconnects all devices that used that certificate to connect" (done at
    // once here, or not at all with --keep-connection-on-certificate-deactivation).
    if status != CertStatus::Active && shared.settings.disconnect_on_certificate_deactivation {
        shared.disconnect_certificate(
            id,
            &format!("certificate {id} was made {}", status.as_str()),
        );
    }
    Ok(())
}

async fn delete_certificate(
    State(shared): AppState,
    Path(id): Path<String>,
    q: Queried<ForceDelete>,
) -> Reply {
    check_certificate_id(&id)?;
    let force = query(q)?.force_delete.unwrap_or(false);
    shared.write(|reg| {
        let c = account_cert(reg, &id)?;
        if c.status == CertStatus::Active {
            return Err(ApiError::certificate_state(format!(
                "Certificate {id} is ACTIVE; deactivate it before deleting it"
            )));
        }
        if !c.things.is_empty() {
            return Err(ApiError::delete_conflict(format!(
                "Certificate {id} is attached to thing(s) {}; detach them first",
                c.things.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if !c.policies.is_empty() && !force {
            return Err(ApiError::delete_conflict(format!(
                "Certificate {id} has policies attached; detach them first or use forceDelete"
            )));
        }
        reg.certificates.remove(&id);
        reg.tokens.retain(|_, t| t.certificate_id != id);
        Ok(())
    })?;
    shared.disconnect_certificate(&id, &format!("certificate {id} was deleted"));
    reply(json!({}))
}

async fn list_certificates(State(shared): AppState, q: Queried<MarkerPage>) -> Reply {
    let q = query(q)?;
    let size = page_size(q.page_size, PAGE_MAX)?;
    let s = &shared.settings;
    let mut all: Vec<(i64, String, Value)> = shared.read(|reg| {
        reg.certificates
            .values()
            .filter(|c| c.temporary_claim_for.is_none())
            .map(|c| (c.created_at, c.id.clone(), certificate_listing(s, c)))
            .collect()
    });
    // By creation date, newest first unless isAscendingOrder is true.
    all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    if !q.ascending_order.unwrap_or(false) {
        all.reverse();
    }
    let (items, next) = page(all, |(_, id, _)| id.clone(), q.marker.as_deref(), size)?;
    reply(
        json!({"certificates": items.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(), "nextMarker": next}),
    )
}

// ---------------------------------------------------------------------------------------------
// Thing types and thing groups

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateThingTypeInput {
    #[serde(default)]
    thing_type_properties: Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateThingGroupInput {
    parent_group_name: Option<String>,
    #[serde(default)]
    thing_group_properties: Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupMembershipInput {
    thing_group_name: Option<String>,
    thing_group_arn: Option<String>,
    thing_name: Option<String>,
    thing_arn: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListThingTypesQuery {
    max_results: Option<i64>,
    next_token: Option<String>,
    thing_type_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListGroupsQuery {
    max_results: Option<i64>,
    next_token: Option<String>,
    parent_group: Option<String>,
    name_prefix_filter: Option<String>,
    recursive: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListGroupThingsQuery {
    max_results: Option<i64>,
    next_token: Option<String>,
    recursive: Option<bool>,
}

/// A missing or `null` properties object, as an object (the shape AWS returns).
fn object_or_empty(v: &Value) -> Value {
    if v.is_object() { v.clone() } else { json!({}) }
}

fn thing_type_properties(t: &NamedResource) -> Value {
    object_or_empty(&t.properties["thingTypeProperties"])
}

fn thing_type_json(s: &Settings, t: &NamedResource) -> Value {
    json!({
        "thingTypeName": t.name,
        "thingTypeId": t.id,
        "thingTypeArn": s.arn(&format!("thingtype/{}", t.name)),
        "thingTypeProperties": thing_type_properties(t),
        "thingTypeMetadata": {"deprecated": false, "creationDate": t.created_at},
    })
}

fn parent_of(g: &NamedResource) -> Option<&str> {
    g.properties["parentGroupName"].as_str()
}

/// A group and all its descendants.
fn group_tree(reg: &Registry, root: &str) -> BTreeSet<String> {
    let mut tree = BTreeSet::from([root.to_owned()]);
    loop {
        let before = tree.len();
        let children: Vec<String> = reg
            .thing_groups
            .values()
            .filter(|g| parent_of(g).is_some_and(|p| tree.contains(p)))
            .map(|g| g.name.clone())
            .collect();
        tree.extend(children);
        if tree.len() == before {
            return tree;
        }
    }
}

/// Things in a group, or in it and its descendants.
fn group_members(reg: &Registry, group: &str, recursive: bool) -> BTreeSet<String> {
    let groups = if recursive {
        group_tree(reg, group)
    } else {
        BTreeSet::from([group.to_owned()])
    };
    reg.things
        .values()
        .filter(|t| !t.groups.is_disjoint(&groups))
        .map(|t| t.name.clone())
        .collect()
}

/// The ancestors of a group, root first.
fn ancestors<'r>(reg: &'r Registry, g: &'r NamedResource) -> Vec<&'r NamedResource> {
    let mut chain = Vec::new();
    let mut current = parent_of(g);
    while let Some(name) = current {
        let Some(parent) = reg.thing_groups.get(name) else {
            break;
        };
        // A cycle cannot be created through the API; stop rather than loop if one appears.
        if chain.iter().any(|c: &&NamedResource| c.name == parent.name) {
            break;
        }
        chain.push(parent);
        current = parent_of(parent);
    }
    chain.reverse();
    chain
}

fn thing_group_json(s: &Settings, reg: &Registry, g: &NamedResource) -> Value {
    let path: Vec<Value> = ancestors(reg, g)
        .iter()
        .map(|a| json!({"groupName": a.name, "groupArn": group_arn(s, &a.name)}))
        .collect();
    json!({
        "thingGroupName": g.name,
        "thingGroupId": g.id,
        "thingGroupArn": group_arn(s, &g.name),
        "version": 1,
        "thingGroupProperties": object_or_empty(&g.properties["thingGroupProperties"]),
        "thingGroupMetadata": {
            "parentGroupName": parent_of(g),
            "rootToParentThingGroups": path,
            "creationDate": g.created_at,
        },
    })
}

async fn create_thing_type(
    State(shared): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> Reply {
    check_name("thingTypeName", &name, 128, ":_-")?;
    let input: CreateThingTypeInput = parse_body(&body)?;
    let properties = json!({"thingTypeProperties": object_or_empty(&input.thing_type_properties)});
    let now = shared.clock.now();
    let t = shared.write(|reg| {
        if let Some(existing) = reg.thing_types.get(&name) {
            return if thing_type_properties(existing) == properties["thingTypeProperties"] {
                Ok(existing.clone())
            } else {
                Err(ApiError::already_exists(format!(
                    "Thing type {name} already exists with different properties"
                )))
            };
        }
        let t = NamedResource {
            name: name.clone(),
            id: new_uuid(),
            properties,
            created_at: now,
        };
        reg.thing_types.insert(name.clone(), t.clone());
        Ok(t)
    })?;
    let s = &shared.settings;
    reply(json!({
        "thingTypeName": t.name,
        "thingTypeArn": s.arn(&format!("thingtype/{}", t.name)),
        "thingTypeId": t.id,
    }))
}

async fn describe_thing_type(State(shared): AppState, Path(name): Path<String>) -> Reply {
    let s = &shared.settings;
    let v = shared.read(|reg| reg.thing_types.get(&name).map(|t| thing_type_json(s, t)));
    reply(v.ok_or_else(|| ApiError::not_found(format!("Thing type {name} not found")))?)
}

async fn list_thing_types(State(shared): AppState, q: Queried<ListThingTypesQuery>) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let s = &shared.settings;
    let all: Vec<(String, Value)> = shared.read(|reg| {
        reg.thing_types
            .values()
            .filter(|t| q.thing_type_name.as_ref().is_none_or(|n| *n == t.name))
            .map(|t| {
                let mut v = thing_type_json(s, t);
                if let Some(m) = v.as_object_mut() {
                    m.remove("thingTypeId");
                }
                (t.name.clone(), v)
            })
            .collect()
    });
    let (items, next) = page(all, |(k, _)| k.clone(), q.next_token.as_deref(), size)?;
    reply(
        json!({"thingTypes": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "nextToken": next}),
    )
}

async fn create_thing_group(
    State(shared): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> Reply {
    check_name("thingGroupName", &name, 128, ":_-")?;
    let input: CreateThingGroupInput = parse_body(&body)?;
    let properties = json!({
        "thingGroupProperties": object_or_empty(&input.thing_group_properties),
        "parentGroupName": input.parent_group_name,
    });
    let now = shared.clock.now();
    let g = shared.write(|reg| {
        if let Some(parent) = &input.parent_group_name
            && !reg.thing_groups.contains_key(parent)
        {
            return Err(ApiError::invalid(format!(
                "Parent thing group {parent} not found"
            )));
        }
        if let Some(existing) = reg.thing_groups.get(&name) {
            // AWS: creating a group again with the same configuration succeeds.
            let same = parent_of(existing) == input.parent_group_name.as_deref()
                && object_or_empty(&existing.properties["thingGroupProperties"])
                    == properties["thingGroupProperties"];
            return if same {
                Ok(existing.clone())
            } else {
                Err(ApiError::already_exists(format!(
                    "Thing group {name} already exists with a different configuration"
                )))
            };
        }
        let g = NamedResource {
            name: name.clone(),
            id: new_uuid(),
            properties,
            created_at: now,
        };
        reg.thing_groups.insert(name.clone(), g.clone());
        Ok(g)
    })?;
    let s = &shared.settings;
    reply(
        json!({"thingGroupName": g.name, "thingGroupArn": group_arn(s, &g.name), "thingGroupId": g.id}),
    )
}

async fn describe_thing_group(State(shared): AppState, Path(name): Path<String>) -> Reply {
    let s = &shared.settings;
    let v = shared.read(|reg| {
        reg.thing_groups
            .get(&name)
            .map(|g| thing_group_json(s, reg, g))
    });
    reply(v.ok_or_else(|| ApiError::not_found(format!("Thing group {name} not found")))?)
}

async fn list_thing_groups(State(shared): AppState, q: Queried<ListGroupsQuery>) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let s = &shared.settings;
    let all: Vec<(String, Value)> = shared.read(|reg| {
        let under = match &q.parent_group {
            Some(p) if q.recursive.unwrap_or(false) => {
                let mut tree = group_tree(reg, p);
                tree.remove(p);
                Some(tree)
            }
            Some(p) => Some(
                reg.thing_groups
                    .values()
                    .filter(|g| parent_of(g) == Some(p))
                    .map(|g| g.name.clone())
                    .collect(),
            ),
            None => None,
        };
        reg.thing_groups
            .values()
            .filter(|g| under.as_ref().is_none_or(|u| u.contains(&g.name)))
            .filter(|g| {
                q.name_prefix_filter
                    .as_ref()
                    .is_none_or(|p| g.name.starts_with(p.as_str()))
            })
            .map(|g| {
                (
                    g.name.clone(),
                    json!({"groupName": g.name, "groupArn": group_arn(s, &g.name)}),
                )
            })
            .collect()
    });
    let (items, next) = page(all, |(k, _)| k.clone(), q.next_token.as_deref(), size)?;
    reply(
        json!({"thingGroups": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "nextToken": next}),
    )
}

/// The group and thing of Add/RemoveThingToThingGroup, given by name or ARN.
fn membership(s: &Settings, input: GroupMembershipInput) -> Result<(String, String), ApiError> {
    let from_arn = |arn: Option<String>, kind: &str| -> Result<Option<String>, ApiError> {
        arn.map(|a| {
            a.strip_prefix(&s.arn(&format!("{kind}/")))
                .map(str::to_owned)
                .ok_or_else(|| {
                    ApiError::invalid(format!("{a} is not a {kind} ARN of this account"))
                })
        })
        .transpose()
    };
    let group = input
        .thing_group_name
        .or(from_arn(input.thing_group_arn, "thinggroup")?)
        .ok_or_else(|| ApiError::invalid("thingGroupName or thingGroupArn is required"))?;
    let thing = input
        .thing_name
        .or(from_arn(input.thing_arn, "thing")?)
        .ok_or_else(|| ApiError::invalid("thingName or thingArn is required"))?;
    Ok((group, thing))
}

async fn change_membership(shared: &Shared, body: &[u8], add: bool) -> Reply {
    let (group, thing) = membership(&shared.settings, parse_body(body)?)?;
    let arn_prefix = shared.settings.arn("");
    let now = shared.clock.now();
    let queued = shared.write(|reg| {
        if !reg.thing_groups.contains_key(&group) {
            return Err(ApiError::not_found(format!(
                "Thing group {group} not found"
            )));
        }
        let t = reg
            .things
            .get_mut(&thing)
            .ok_or_else(|| thing_not_found(&thing))?;
        if add {
            t.groups.insert(group);
            // A thing that joins a target group of a continuous job gets its execution. One
            // that leaves keeps what it has (what AWS does to it then is not documented).
            Ok(reg.apply_continuous_jobs(&arn_prefix, &thing, now))
        } else {
            t.groups.remove(&group);
            Ok(false)
        }
    })?;
    if queued {
        crate::jobs::notify_thing(shared, &thing);
    }
    reply(json!({}))
}

async fn add_thing_to_group(State(shared): AppState, body: Bytes) -> Reply {
    change_membership(&shared, &body, true).await
}

async fn remove_thing_from_group(State(shared): AppState, body: Bytes) -> Reply {
    change_membership(&shared, &body, false).await
}

async fn list_things_in_group(
    State(shared): AppState,
    Path(name): Path<String>,
    q: Queried<ListGroupThingsQuery>,
) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let names: Vec<String> = shared.read(|reg| {
        if !reg.thing_groups.contains_key(&name) {
            return Err(ApiError::not_found(format!("Thing group {name} not found")));
        }
        Ok(group_members(reg, &name, q.recursive.unwrap_or(false))
            .into_iter()
            .collect())
    })?;
    let (items, next) = page(names, Clone::clone, q.next_token.as_deref(), size)?;
    reply(json!({"things": items, "nextToken": next}))
}

// ---------------------------------------------------------------------------------------------
// Jobs

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeoutConfig {
    in_progress_timeout_in_minutes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateJobInput {
    #[serde(default)]
    targets: Vec<String>,
    document: Option<String>,
    document_source: Option<String>,
    description: Option<String>,
    target_selection: Option<String>,
    timeout_config: Option<TimeoutConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssociateTargetsInput {
    #[serde(default)]
    targets: Vec<String>,
    comment: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Force {
    force: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecutionNumber {
    execution_number: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecutionsQuery {
    status: Option<String>,
    job_id: Option<String>,
    max_results: Option<i64>,
    next_token: Option<String>,
}

fn job_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Job {id} not found"))
}

fn execution_key(thing: &str, job_id: &str) -> String {
    format!("{thing}/{job_id}")
}

fn executions_of<'r>(reg: &'r Registry, job_id: &str) -> Vec<&'r JobExecution> {
    reg.executions
        .values()
        .filter(|e| e.job_id == job_id)
        .collect()
}

/// The job's status as DescribeJob reports it: a snapshot job whose executions have all
/// finished is COMPLETED even if nothing recorded that yet; a continuous job (without a
/// schedule, which the fake does not have) never completes (AWS docs, job states).
fn job_status(job: &Job, execs: &[&JobExecution]) -> String {
    if job.status == "IN_PROGRESS" && !job.is_continuous() && execs.iter().all(|e| e.is_terminal())
    {
        "COMPLETED".to_owned()
    } else {
        job.status.clone()
    }
}

fn job_json(s: &Settings, job: &Job, execs: &[&JobExecution]) -> Value {
    let count = |status: &str| execs.iter().filter(|e| e.status == status).count();
    let status = job_status(job, execs);
    let last = execs
        .iter()
        .map(|e| e.last_updated_at)
        .fold(job.created_at, i64::max);
    json!({
        "jobArn": s.arn(&format!("job/{}", job.id)),
        "jobId": job.id,
        "targetSelection": job.target_selection,
        "status": status,
        "targets": job.targets,
        "description": job.description,
        "createdAt": job.created_at,
        "lastUpdatedAt": last,
        "completedAt": matches!(status.as_str(), "COMPLETED" | "CANCELED").then_some(last),
        "jobProcessDetails": {
            "numberOfCanceledThings": count("CANCELED"),
            "numberOfSucceededThings": count("SUCCEEDED"),
            "numberOfFailedThings": count("FAILED"),
            "numberOfRejectedThings": count("REJECTED"),
            "numberOfQueuedThings": count("QUEUED"),
            "numberOfInProgressThings": count("IN_PROGRESS"),
            "numberOfRemovedThings": count("REMOVED"),
            "numberOfTimedOutThings": count("TIMED_OUT"),
        },
        "timeoutConfig": job.step_timeout_minutes.map(|m| json!({"inProgressTimeoutInMinutes": m})),
        "isConcurrent": false,
    })
}

fn execution_summary(e: &JobExecution) -> Value {
    json!({
        "status": e.status,
        "queuedAt": e.queued_at,
        "startedAt": e.started_at,
        "lastUpdatedAt": e.last_updated_at,
        "executionNumber": e.execution_number,
    })
}

fn execution_json(s: &Settings, e: &JobExecution, now: i64) -> Value {
    json!({
        "jobId": e.job_id,
        "status": e.status,
        "statusDetails": {"detailsMap": e.status_details},
        "thingArn": thing_arn(s, &e.thing_name),
        "queuedAt": e.queued_at,
        "startedAt": e.started_at,
        "lastUpdatedAt": e.last_updated_at,
        "executionNumber": e.execution_number,
        "versionNumber": e.version_number,
        "approximateSecondsBeforeTimedOut": e.step_timeout_at.map(|t| (t - now).max(0)),
    })
}

/// A job target: a thing or a thing group of this account.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Thing(String),
    Group(String),
}

fn parse_target(s: &Settings, arn: &str) -> Result<Target, ApiError> {
    if let Some(name) = arn.strip_prefix(&s.arn("thing/")) {
        Ok(Target::Thing(name.to_owned()))
    } else if let Some(name) = arn.strip_prefix(&s.arn("thinggroup/")) {
        Ok(Target::Group(name.to_owned()))
    } else {
        Err(ApiError::invalid(format!(
            "target {arn} is not a thing or thing group ARN of this account"
        )))
    }
}

/// The things a job runs on: the things named, and the members of the groups named and of
/// their descendants.
fn target_things(reg: &Registry, targets: &[Target]) -> Result<BTreeSet<String>, ApiError> {
    let mut things = BTreeSet::new();
    for t in targets {
        match t {
            Target::Thing(name) => {
                if !reg.things.contains_key(name) {
                    return Err(thing_not_found(name));
                }
                things.insert(name.clone());
            }
            Target::Group(name) => {
                if !reg.thing_groups.contains_key(name) {
                    return Err(ApiError::not_found(format!("Thing group {name} not found")));
                }
                things.extend(group_members(reg, name, true));
            }
        }
    }
    Ok(things)
}

/// Fetches a job document from `documentSource`. AWS reads S3; the fake reads plain HTTP.
async fn fetch_document(url: &str) -> Result<String, ApiError> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| ApiError::invalid(format!("documentSource {url}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(ApiError::invalid(format!(
            "documentSource {url}: the fake fetches job documents over http:// only; pass the document inline instead"
        )));
    }
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let fetch = async {
        let response = client
            .get(uri)
            .await
            .map_err(|e| ApiError::invalid(format!("documentSource {url}: {e}")))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ApiError::invalid(format!("documentSource {url}: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(ApiError::invalid(format!(
                "documentSource {url} answered HTTP {status}"
            )));
        }
        String::from_utf8(body.to_vec())
            .map_err(|_| ApiError::invalid(format!("documentSource {url} is not UTF-8")))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| ApiError::invalid(format!("documentSource {url} did not answer within 5 s")))?
}

fn parse_job_document(text: &str) -> Result<Value, ApiError> {
    if text.len() > JOB_DOCUMENT_MAX {
        return Err(ApiError::invalid(format!(
            "The job document is larger than {JOB_DOCUMENT_MAX} bytes"
        )));
    }
    serde_json::from_str(text)
        .map_err(|e| ApiError::invalid(format!("The job document is not valid JSON: {e}")))
}

async fn create_job(State(shared): AppState, Path(id): Path<String>, body: Bytes) -> Reply {
    check_name("jobId", &id, 64, "_-")?;
    let input: CreateJobInput = parse_body(&body)?;
    let s = &shared.settings;
    if input.targets.is_empty() {
        return Err(ApiError::invalid(
            "targets must name at least one thing or thing group",
        ));
    }
    let targets = input
        .targets
        .iter()
        .map(|t| parse_target(s, t))
        .collect::<Result<Vec<_>, _>>()?;
    let target_selection = match input.target_selection.as_deref() {
        None | Some("SNAPSHOT") => "SNAPSHOT",
        // Things that become targets later (added to a target group, directly or through a
        // descendant group, or by AssociateTargetsWithJob) get an execution then.
        Some("CONTINUOUS") => "CONTINUOUS",
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "targetSelection {other} is not SNAPSHOT or CONTINUOUS"
            )));
        }
    };
    check_description(input.description.as_deref())?;
    let timeout = input
        .timeout_config
        .and_then(|t| t.in_progress_timeout_in_minutes);
    if let Some(m) = timeout
        && !(1..=JOB_TIMEOUT_MAX_MINUTES).contains(&m)
    {
        return Err(ApiError::invalid(format!(
            "timeoutConfig.inProgressTimeoutInMinutes must be between 1 and {JOB_TIMEOUT_MAX_MINUTES}, not {m}"
        )));
    }
    let text = match (input.document, input.document_source) {
        (Some(d), None) => d,
        (None, Some(url)) => fetch_document(&url).await?,
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "document and documentSource cannot be given together",
            ));
        }
        (None, None) => return Err(ApiError::invalid("document or documentSource is required")),
    };
    let document = parse_job_document(&text)?;
    let now = shared.clock.now();
    let things = shared.write(|reg| {
        if reg.jobs.contains_key(&id) {
            return Err(ApiError::already_exists(format!("Job {id} already exists")));
        }
        let things = target_things(reg, &targets)?;
        reg.jobs.insert(
            id.clone(),
            Job {
                id: id.clone(),
                document,
                description: input.description.clone(),
                targets: input.targets.clone(),
                created_at: now,
                status: "IN_PROGRESS".to_owned(),
                step_timeout_minutes: timeout,
                target_selection: target_selection.to_owned(),
            },
        );
        for thing in &things {
            reg.executions.insert(
                execution_key(thing, &id),
                JobExecution::queued(&id, thing, now),
            );
        }
        Ok(things)
    })?;
    for thing in &things {
        crate::jobs::notify_thing(&shared, thing);
    }
    reply(
        json!({"jobArn": s.arn(&format!("job/{id}")), "jobId": id, "description": input.description}),
    )
}

/// AssociateTargetsWithJob: adds thing groups to an IN_PROGRESS continuous job; their members
/// without an execution of it get one.
async fn associate_targets_with_job(
    State(shared): AppState,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply {
    let input: AssociateTargetsInput = parse_body(&body)?;
    check_description(input.comment.as_deref())?;
    let s = &shared.settings;
    if input.targets.is_empty() {
        return Err(ApiError::invalid(
            "targets must name at least one thing group",
        ));
    }
    for t in &input.targets {
        if !matches!(parse_target(s, t)?, Target::Group(_)) {
            return Err(ApiError::invalid(format!(
                "target {t} is not a thing group ARN (AssociateTargetsWithJob takes thing groups)"
            )));
        }
    }
    let now = shared.clock.now();
    let arn_prefix = s.arn("");
    let (description, queued) = shared.write(|reg| {
        let job = reg.jobs.get(&id).ok_or_else(|| job_not_found(&id))?;
        if !job.is_continuous() {
            return Err(ApiError::invalid(format!(
                "Job {id} was not created with targetSelection CONTINUOUS"
            )));
        }
        if job_status(job, &executions_of(reg, &id)) != "IN_PROGRESS" {
            return Err(ApiError::invalid(format!("Job {id} is not IN_PROGRESS")));
        }
        let groups = input
            .targets
            .iter()
            .map(|t| parse_target(s, t))
            .collect::<Result<Vec<_>, _>>()?;
        // Checks that the groups exist.
        target_things(reg, &groups)?;
        let mut targets = job.targets.clone();
        for t in &input.targets {
            if !targets.contains(t) {
                targets.push(t.clone());
            }
        }
        if targets.len() > JOB_TARGETS_MAX {
            return Err(ApiError::limit_exceeded(format!(
                "A job may have at most {JOB_TARGETS_MAX} targets"
            )));
        }
        let description = job.description.clone();
        if let Some(job) = reg.jobs.get_mut(&id) {
            job.targets = targets;
        }
        let things: Vec<String> = reg.things.keys().cloned().collect();
        let queued: Vec<String> = things
            .into_iter()
            .filter(|t| reg.apply_continuous_jobs(&arn_prefix, t, now))
            .collect();
        Ok((description, queued))
    })?;
    for thing in &queued {
        crate::jobs::notify_thing(&shared, thing);
    }
    reply(json!({"jobArn": s.arn(&format!("job/{id}")), "jobId": id, "description": description}))
}

async fn describe_job(State(shared): AppState, Path(id): Path<String>) -> Reply {
    let s = &shared.settings;
    let v = shared.read(|reg| {
        reg.jobs
            .get(&id)
            .map(|job| job_json(s, job, &executions_of(reg, &id)))
    });
    reply(json!({"job": v.ok_or_else(|| job_not_found(&id))?}))
}

async fn get_job_document(State(shared): AppState, Path(id): Path<String>) -> Reply {
    let doc = shared.read(|reg| reg.jobs.get(&id).map(|job| job.document.clone()));
    let doc = doc.ok_or_else(|| job_not_found(&id))?;
    // Stored parsed; a document that somehow stayed a string goes back as it is.
    let text = match doc {
        Value::String(s) => s,
        other => other.to_string(),
    };
    reply(json!({"document": text}))
}

async fn cancel_job(State(shared): AppState, Path(id): Path<String>, q: Queried<Force>) -> Reply {
    let force = query(q)?.force.unwrap_or(false);
    let now = shared.clock.now();
    let (description, affected) = shared.write(|reg| {
        let job = reg.jobs.get(&id).ok_or_else(|| job_not_found(&id))?;
        if job_status(job, &executions_of(reg, &id)) == "COMPLETED" {
            return Err(ApiError::invalid(format!("Job {id} is already completed")));
        }
        let description = job.description.clone();
        let mut affected = Vec::new();
        for e in reg.executions.values_mut().filter(|e| e.job_id == id) {
            // Without force, executions already IN_PROGRESS may finish (AWS CancelJob).
            if e.status == "QUEUED" || (force && e.status == "IN_PROGRESS") {
                e.status = "CANCELED".to_owned();
                e.last_updated_at = now;
                e.version_number += 1;
                e.step_timeout_at = None;
                affected.push(e.thing_name.clone());
            }
        }
        if let Some(job) = reg.jobs.get_mut(&id) {
            job.status = "CANCELED".to_owned();
        }
        Ok((description, affected))
    })?;
    for thing in &affected {
        crate::jobs::notify_thing(&shared, thing);
    }
    let s = &shared.settings;
    reply(json!({"jobArn": s.arn(&format!("job/{id}")), "jobId": id, "description": description}))
}

async fn delete_job(State(shared): AppState, Path(id): Path<String>, q: Queried<Force>) -> Reply {
    let force = query(q)?.force.unwrap_or(false);
    let affected = shared.write(|reg| {
        let job = reg.jobs.get(&id).ok_or_else(|| job_not_found(&id))?;
        let execs = executions_of(reg, &id);
        if job_status(job, &execs) == "IN_PROGRESS" && !force {
            return Err(ApiError::invalid_state_transition(format!(
                "Job {id} is in progress; cancel it first or delete it with force"
            )));
        }
        let affected: Vec<String> = execs
            .iter()
            .filter(|e| !e.is_terminal())
            .map(|e| e.thing_name.clone())
            .collect();
        reg.executions.retain(|_, e| e.job_id != id);
        reg.jobs.remove(&id);
        Ok(affected)
    })?;
    for thing in &affected {
        crate::jobs::notify_thing(&shared, thing);
    }
    reply(json!({}))
}

async fn describe_job_execution(
    State(shared): AppState,
    Path((thing, job)): Path<(String, String)>,
    q: Queried<ExecutionNumber>,
) -> Reply {
    let number = query(q)?.execution_number;
    let s = &shared.settings;
    let now = shared.clock.now();
    let v = shared.read(|reg| {
        reg.executions
            .get(&execution_key(&thing, &job))
            .filter(|e| number.is_none_or(|n| n == e.execution_number))
            .map(|e| execution_json(s, e, now))
    });
    let v = v.ok_or_else(|| {
        ApiError::not_found(format!("Job execution {job} of thing {thing} not found"))
    })?;
    reply(json!({"execution": v}))
}

async fn list_executions_for_job(
    State(shared): AppState,
    Path(id): Path<String>,
    q: Queried<ExecutionsQuery>,
) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let s = &shared.settings;
    let all: Vec<(String, Value)> = shared.read(|reg| {
        if !reg.jobs.contains_key(&id) {
            return Err(job_not_found(&id));
        }
        Ok(executions_of(reg, &id)
            .into_iter()
            .filter(|e| q.status.as_ref().is_none_or(|st| *st == e.status))
            .map(|e| {
                let item = json!({"thingArn": thing_arn(s, &e.thing_name), "jobExecutionSummary": execution_summary(e)});
                (e.thing_name.clone(), item)
            })
            .collect())
    })?;
    let (items, next) = page(all, |(k, _)| k.clone(), q.next_token.as_deref(), size)?;
    reply(
        json!({"executionSummaries": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "nextToken": next}),
    )
}

async fn list_executions_for_thing(
    State(shared): AppState,
    Path(thing): Path<String>,
    q: Queried<ExecutionsQuery>,
) -> Reply {
    let q = query(q)?;
    let size = page_size(q.max_results, PAGE_MAX)?;
    let all: Vec<(String, Value)> = shared.read(|reg| {
        if !reg.things.contains_key(&thing) {
            return Err(thing_not_found(&thing));
        }
        Ok(reg
            .executions
            .values()
            .filter(|e| e.thing_name == thing)
            .filter(|e| q.status.as_ref().is_none_or(|st| *st == e.status))
            .filter(|e| q.job_id.as_ref().is_none_or(|j| *j == e.job_id))
            .map(|e| {
                (
                    e.job_id.clone(),
                    json!({"jobId": e.job_id, "jobExecutionSummary": execution_summary(e)}),
                )
            })
            .collect())
    })?;
    let (items, next) = page(all, |(k, _)| k.clone(), q.next_token.as_deref(), size)?;
    reply(
        json!({"executionSummaries": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "nextToken": next}),
    )
}

// ---------------------------------------------------------------------------------------------
// Endpoint

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointQuery {
    endpoint_type: Option<String>,
}

/// Every endpoint type is this host: the certificate the fake serves is for `localhost`.
async fn describe_endpoint(q: Queried<EndpointQuery>) -> Reply {
    let q = query(q)?;
    if let Some(t) = &q.endpoint_type
        && !ENDPOINT_TYPES.contains(&t.as_str())
    {
        return Err(ApiError::invalid(format!(
            "endpointType {t} is not one of {}",
            ENDPOINT_TYPES.join(", ")
        )));
    }
    reply(json!({"endpointAddress": "localhost"}))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::new(std::path::PathBuf::from("/nonexistent"))
    }

    #[test]
    fn errors_carry_the_aws_error_type_header_and_a_message() {
        let response = ApiError::not_found("Template gw-template not found").into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            response
                .headers()
                .get("x-amzn-ErrorType")
                .and_then(|v| v.to_str().ok()),
            Some("ResourceNotFoundException")
        );
        assert_eq!(ApiError::certificate_state("x").status.as_u16(), 406);
        assert_eq!(ApiError::limit_exceeded("x").status.as_u16(), 410);
        assert_eq!(ApiError::already_exists("x").status.as_u16(), 409);
    }

    #[test]
    fn names_are_checked_against_aws_patterns() {
        assert!(check_name("templateName", "gw-template_1", 36, "_-").is_ok());
        assert!(check_name("templateName", "", 36, "_-").is_err());
        assert!(check_name("templateName", &"a".repeat(37), 36, "_-").is_err());
        assert!(check_name("templateName", "gw template", 36, "_-").is_err());
        assert!(check_name("thingName", "gw:1", 128, ":_-").is_ok());
        let e = check_name("templateName", "a/b", 36, "_-").unwrap_err();
        assert!(e.message.contains("a/b"), "{}", e.message);
    }

    #[test]
    fn pages_follow_tokens_and_reject_unknown_ones() {
        let items: Vec<String> = (1..=5).map(|i| format!("t{i}")).collect();
        let (p, next) = page(items.clone(), Clone::clone, None, 2).unwrap();
        assert_eq!(
            (p, next.as_deref()),
            (vec!["t1".to_owned(), "t2".to_owned()], Some("t2"))
        );
        let (p, next) = page(items.clone(), Clone::clone, Some("t4"), 2).unwrap();
        assert_eq!((p, next), (vec!["t5".to_owned()], None));
        let (p, next) = page(items.clone(), Clone::clone, Some("t3"), 2).unwrap();
        assert_eq!((p, next), (vec!["t4".to_owned(), "t5".to_owned()], None));
        assert!(page(items, Clone::clone, Some("zz"), 2).is_err());
        assert_eq!(page_size(None, 250).unwrap(), 250);
        assert!(page_size(Some(0), 250).is_err());
        assert!(page_size(Some(251), 250).is_err());
    }

    #[test]
    fn nulls_are_omitted_recursively() {
        let v = strip_nulls(json!({"a": null, "b": {"c": null, "d": 1}, "e": [{"f": null}]}));
        assert_eq!(v, json!({"b": {"d": 1}, "e": [{}]}));
    }

    #[test]
    fn certificate_arns_of_this_account_only() {
        let s = settings();
        let id = "ab".repeat(32);
        assert_eq!(
            cert_id_from_arn(&s, &format!("arn:aws:iot:us-east-1:123456789012:cert/{id}")).unwrap(),
            id
        );
        assert!(
            cert_id_from_arn(&s, &format!("arn:aws:iot:eu-west-1:123456789012:cert/{id}")).is_err()
        );
        assert!(cert_id_from_arn(&s, "arn:aws:iot:us-east-1:123456789012:cert/xyz").is_err());
        assert_eq!(
            parse_target(&s, "arn:aws:iot:us-east-1:123456789012:thing/gw-1").unwrap(),
            Target::Thing("gw-1".into())
        );
        assert_eq!(
            parse_target(&s, "arn:aws:iot:us-east-1:123456789012:thinggroup/fleet").unwrap(),
            Target::Group("fleet".into())
        );
        assert!(parse_target(&s, "arn:aws:iot:us-east-1:123456789012:job/x").is_err());
    }

    #[test]
    fn status_changes_follow_aws_rules() {
        assert!(check_status_change("c", CertStatus::Active, CertStatus::Inactive).is_ok());
        assert!(
            check_status_change("c", CertStatus::PendingActivation, CertStatus::Active).is_ok()
        );
        assert_eq!(
            check_status_change("c", CertStatus::Revoked, CertStatus::Active)
                .unwrap_err()
                .status
                .as_u16(),
            406
        );
        assert_eq!(
            check_status_change("c", CertStatus::Active, CertStatus::PendingTransfer)
                .unwrap_err()
                .kind,
            "InvalidRequestException"
        );
    }

    #[test]
    fn attributes_merge_or_replace() {
        let mut current = BTreeMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]);
        let merge = AttributePayload {
            attributes: BTreeMap::from([
                ("b".to_owned(), String::new()),
                ("c".to_owned(), "3".to_owned()),
            ]),
            merge: true,
        };
        apply_attributes(&mut current, &merge);
        assert_eq!(
            current,
            BTreeMap::from([
                ("a".to_owned(), "1".to_owned()),
                ("c".to_owned(), "3".to_owned())
            ])
        );
        let replace = AttributePayload {
            attributes: BTreeMap::from([("d".to_owned(), "4".to_owned())]),
            merge: false,
        };
        apply_attributes(&mut current, &replace);
        assert_eq!(current, BTreeMap::from([("d".to_owned(), "4".to_owned())]));
    }

    fn group(name: &str, parent: Option<&str>) -> NamedResource {
        NamedResource {
            name: name.to_owned(),
            id: new_uuid(),
            properties: json!({"thingGroupProperties": {}, "parentGroupName": parent}),
            created_at: 0,
        }
    }

    fn thing(name: &str, groups: &[&str]) -> Thing {
        Thing {
            name: name.to_owned(),
            id: new_uuid(),
            thing_type: None,
            attributes: BTreeMap::new(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            billing_group: None,
            version: 1,
            principals: BTreeSet::new(),
        }
    }

    #[test]
    fn group_targets_expand_to_members_of_descendant_groups() {
        let mut reg = Registry::default();
        for g in [
            group("fleet", None),
            group("eu", Some("fleet")),
            group("eu-lab", Some("eu")),
            group("us", None),
        ] {
            reg.thing_groups.insert(g.name.clone(), g);
        }
        for t in [
            thing("a", &["fleet"]),
            thing("b", &["eu-lab"]),
            thing("c", &["us"]),
            thing("d", &[]),
        ] {
            reg.things.insert(t.name.clone(), t);
        }
        let names = |set: BTreeSet<String>| set.into_iter().collect::<Vec<_>>();
        assert_eq!(names(group_members(&reg, "fleet", true)), ["a", "b"]);
        assert_eq!(names(group_members(&reg, "fleet", false)), ["a"]);
        let targets = [Target::Group("eu".into()), Target::Thing("d".into())];
        assert_eq!(names(target_things(&reg, &targets).unwrap()), ["b", "d"]);
        assert_eq!(
            target_things(&reg, &[Target::Thing("zz".into())])
                .unwrap_err()
                .status
                .as_u16(),
            404
        );
        let eu_lab = &reg.thing_groups["eu-lab"];
        let path: Vec<&str> = ancestors(&reg, eu_lab)
            .iter()
            .map(|g| g.name.as_str())
            .collect();
        assert_eq!(path, ["fleet", "eu"]);
    }

    #[test]
    fn generation_ids_are_stable_per_version() {
        assert_eq!(generation_id("c", 1), generation_id("c", 1));
        assert_ne!(generation_id("c", 1), generation_id("c", 2));
        assert_eq!(generation_id("c", 1).len(), 36);
    }

    #[test]
    fn hooks_must_be_http_urls_with_the_one_payload_version() {
        let hook = |t: &str, v: Option<&str>| HookInput {
            target_arn: Some(t.to_owned()),
            payload_version: v.map(str::to_owned),
        };
        let ok = check_hook(hook("http://127.0.0.1:9/hook", None), "FLEET_PROVISIONING").unwrap();
        assert_eq!(ok.payload_version.as_deref(), Some(HOOK_PAYLOAD_VERSION));
        assert!(
            check_hook(
                hook("arn:aws:lambda:us-east-1:123456789012:function:f", None),
                "FLEET_PROVISIONING"
            )
            .is_err()
        );
        assert!(check_hook(hook("http://h/", Some("2019-01-01")), "FLEET_PROVISIONING").is_err());
        assert!(check_hook(hook("http://h/", None), "JITP").is_err());
    }

    #[test]
    fn job_documents_must_be_json() {
        assert_eq!(
            parse_job_document(r#"{"operation":"ROTATE_CERTIFICATE"}"#).unwrap()["operation"],
            "ROTATE_CERTIFICATE"
        );
        assert!(parse_job_document("{nope").is_err());
        assert!(parse_job_document(&format!("\"{}\"", "x".repeat(JOB_DOCUMENT_MAX))).is_err());
    }
}
