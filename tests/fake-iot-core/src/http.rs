//! The HTTP side: AWS IoT's REST control plane (in `control`) and the fake's own `/_fake/`
//! API for inspection and fault injection.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

use crate::faults::{Api, FaultRule};
use crate::server::{Shared, lock};

type AppState = State<Arc<Shared>>;

/// All HTTP routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_fake/health", get(|| async { Json(json!({"ok": true})) }))
        .route("/_fake/connections", get(connections))
        .route("/_fake/messages", get(messages).delete(clear_messages))
        .route("/_fake/registry", get(registry))
        .route(
            "/_fake/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/_fake/faults/{id}", delete(remove_fault))
        .route("/_fake/throttle", post(set_throttle))
        .route("/_fake/disconnect", post(disconnect))
        .route("/_fake/tokens/expire", post(expire_tokens))
        .route("/_fake/clock", get(clock).post(advance_clock))
        .route(
            "/_fake/certificate-validity",
            get(get_validity).put(set_validity).delete(reset_validity),
        )
        .merge(crate::control::routes())
        .with_state(shared)
}

fn bad_request(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"message": message.into()})),
    )
        .into_response()
}

async fn connections(State(shared): AppState) -> Json<Value> {
    let sessions: Vec<_> = lock(&shared.sessions).values().cloned().collect();
    let list: Vec<Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "clientId": s.client_id,
                "connId": s.conn_id,
                "certificateId": s.cert_id,
                "protocol": s.version.as_str(),
                "alpn": s.alpn,
                "remote": s.remote.to_string(),
                "connectedAt": s.connected_at,
                "subscriptions": lock(&s.subscriptions).iter().map(|(f, q)| json!({"filter": f, "qos": q})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({"connections": list}))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageQuery {
    client_id: Option<String>,
    topic: Option<String>,
    kind: Option<String>,
    since: Option<u64>,
    /// Long poll: when nothing matches yet, wait up to this many milliseconds (at most a
    /// minute) for a matching entry instead of answering an empty list at once.
    wait_ms: Option<u64>,
}

/// Longest long poll of `/_fake/messages?waitMs=`.
const MESSAGES_WAIT_MAX_MS: u64 = 60_000;

fn message_matches(q: &MessageQuery, e: &crate::server::LogEntry) -> bool {
    q.client_id.as_ref().is_none_or(|c| *c == e.client_id)
        && q.topic.as_ref().is_none_or(|t| {
            e.topic
                .as_deref()
                .is_some_and(|et| crate::mqtt::topic_matches(et, t))
        })
        && q.kind.as_ref().is_none_or(|k| k == e.kind)
        && q.since.is_none_or(|s| e.seq > s)
}

async fn messages(State(shared): AppState, Query(q): Query<MessageQuery>) -> Json<Value> {
    let select = || -> Vec<_> {
        shared
            .log_entries()
            .into_iter()
            .filter(|e| message_matches(&q, e))
            .collect()
    };
    let mut entries = select();
    if entries.is_empty()
        && let Some(ms) = q.wait_ms
    {
        let wait = Duration::from_millis(ms.min(MESSAGES_WAIT_MAX_MS));
        if shared
            .wait_for_log(wait, |e| message_matches(&q, e))
            .await
            .is_some()
        {
            entries = select();
        }
    }
    Json(json!({"messages": entries}))
}

async fn clear_messages(State(shared): AppState) -> StatusCode {
    shared.clear_log();
    StatusCode::NO_CONTENT
}

async fn registry(State(shared): AppState) -> Response {
    match shared.read(|reg| serde_json::to_value(reg)) {
        Ok(v) => Json(v).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"message": e.to_string()})),
        )
            .into_response(),
    }
}

async fn list_faults(State(shared): AppState) -> Json<Value> {
    let faults = lock(&shared.faults);
    Json(json!({
        "rules": faults.rules(),
        "throttles": faults.throttles().into_iter().map(|(k, v)| (format!("{k:?}"), v)).collect::<std::collections::BTreeMap<_, _>>(),
        "stats": faults.stats,
    }))
}

async fn add_fault(
    State(shared): AppState,
    body: Result<Json<FaultRule>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(rule)) => {
            let id = lock(&shared.faults).add(rule);
            (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
        }
        Err(e) => bad_request(format!("fault rule: {e}")),
    }
}

async fn clear_faults(State(shared): AppState) -> StatusCode {
    lock(&shared.faults).clear();
    StatusCode::NO_CONTENT
}

async fn remove_fault(State(shared): AppState, Path(id): Path<u64>) -> StatusCode {
    if lock(&shared.faults).remove(id) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Throttle {
    api: Api,
    per_second: Option<u32>,
}

async fn set_throttle(
    State(shared): AppState,
    body: Result<Json<Throttle>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(t)) => {
            lock(&shared.faults).set_throttle(t.api, t.per_second);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_request(format!("throttle: {e}")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Disconnect {
    client_id: String,
}

async fn disconnect(
    State(shared): AppState,
    body: Result<Json<Disconnect>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(d)) => {
            if shared.disconnect(&d.client_id) {
                StatusCode::NO_CONTENT.into_response()
            } else {
                (
                    StatusCode::NOT_FOUND,
                    Json(
                        json!({"message": format!("no connection with client id {}", d.client_id)}),
                    ),
                )
                    .into_response()
            }
        }
        Err(e) => bad_request(format!("disconnect: {e}")),
    }
}

async fn expire_tokens(State(shared): AppState) -> Json<Value> {
    let now = shared.clock.now();
    let n = shared.write(|reg| {
        for t in reg.tokens.values_mut() {
            t.expires_at = now;
        }
        reg.tokens.len()
    });
    // Expiry is swept on the next access; make it now, so the registry dump shows it at once.
    shared.write(|_| ());
    Json(json!({"expired": n}))
}

async fn clock(State(shared): AppState) -> Json<Value> {
    Json(json!({"now": shared.clock.now(), "offsetSeconds": shared.clock.offset()}))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Advance {
    advance_seconds: i64,
}

async fn advance_clock(
    State(shared): AppState,
    body: Result<Json<Advance>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(a)) => match shared.clock.try_advance(a.advance_seconds) {
            Ok(now) => {
                // Expiry is lazy; touch the registry so that it is swept and persisted now.
                shared.write(|_| ());
                Json(json!({"now": now, "offsetSeconds": shared.clock.offset()})).into_response()
            }
            Err(e) => bad_request(e.to_string()),
        },
        Err(e) => bad_request(format!("clock: {e}")),
    }
}

/// Longest validity the control takes: a hundred years (X.509 times end in 9999 anyway).
const VALIDITY_MAX_SECS: u64 = 100 * 365 * 86_400;

fn validity_json(v: Option<Duration>) -> Value {
    v.map_or(Value::Null, |d| json!(d.as_secs()))
}

async fn get_validity(State(shared): AppState) -> Json<Value> {
    let v = lock(&shared.validity).clone();
    let templates: serde_json::Map<String, Value> = v
        .templates
        .iter()
        .map(|(k, d)| (k.clone(), validity_json(*d)))
        .collect();
    Json(json!({
        "seconds": validity_json(v.account),
        "templates": templates,
        "awsDefaultNotAfter": crate::ca::AWS_DEFAULT_NOT_AFTER,
    }))
}

/// `{"seconds": N | null}` for the account, `{"template": "T", "seconds": N | null}` for the
/// certificates issued to connections of template T; `null` is AWS's 2049-12-31T23:59:59Z.
async fn set_validity(
    State(shared): AppState,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(Value::Object(m))) => m,
        Ok(_) => return bad_request("certificate validity: expected a JSON object"),
        Err(e) => return bad_request(format!("certificate validity: {e}")),
    };
    if let Some(k) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "seconds" | "template"))
    {
        return bad_request(format!(
            "certificate validity: unknown field {k:?} (expected seconds and template)"
        ));
    }
    let validity = match body.get("seconds") {
        None => {
            return bad_request(
                "certificate validity: seconds is required (a number, or null for AWS's 2049-12-31T23:59:59Z)",
            );
        }
        Some(Value::Null) => None,
        Some(v) => match v.as_u64().filter(|n| (1..=VALIDITY_MAX_SECS).contains(n)) {
            Some(n) => Some(Duration::from_secs(n)),
            None => {
                return bad_request(format!(
                    "certificate validity: seconds must be a whole number from 1 to {VALIDITY_MAX_SECS}, or null; got {v}"
                ));
            }
        },
    };
    match body.get("template") {
        None | Some(Value::Null) => shared.set_cert_validity(validity),
        Some(Value::String(t)) => {
            if !shared.read(|reg| reg.templates.contains_key(t)) {
                return (
                    StatusCode::NOT_FOUND,
                    Json(json!({"message": format!("no provisioning template {t}")})),
                )
                    .into_response();
            }
            shared.set_template_cert_validity(t, Some(validity));
        }
        Some(other) => {
            return bad_request(format!(
                "certificate validity: template must be a template name, got {other}"
            ));
        }
    }
    get_validity(State(shared)).await.into_response()
}

#[derive(Debug, Deserialize)]
struct ResetValidity {
    template: Option<String>,
}

/// Without `?template=`: back to the start-up validity (`--cert-validity`), no template's.
/// With it: that template's certificates follow the account's validity again.
async fn reset_validity(State(shared): AppState, Query(q): Query<ResetValidity>) -> Response {
    match q.template {
        Some(t) => shared.set_template_cert_validity(&t, None),
        None => {
            *lock(&shared.validity) = crate::server::Validity {
                account: shared.settings.cert_validity,
                templates: Default::default(),
            };
        }
    }
    get_validity(State(shared)).await.into_response()
}
