//! The pre-provisioning hook. AWS invokes a Lambda; the fake POSTs the same JSON event to an
//! HTTP URL given as the template's `preProvisioningHook.targetArn`, with AWS's 5 s limit.

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Calls the hook; `Ok` carries the parameter overrides when it allowed provisioning.
pub async fn invoke(
    url: &str,
    event: &Value,
    timeout: Duration,
) -> Result<BTreeMap<String, String>, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("hook target {url} is not an http URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "hook target {url}: only http:// URLs are supported by the fake"
        ));
    }
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = hyper::Request::post(uri)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(event.to_string())))
        .map_err(|e| format!("building the hook request: {e}"))?;
    let call = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("calling hook {url}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the hook's response: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("hook {url} answered HTTP {status}"));
        }
        serde_json::from_slice::<Value>(&body)
            .map_err(|e| format!("hook response is not JSON: {e}"))
    };
    let reply = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("hook {url} did not answer within {} s", timeout.as_secs()))??;
    // AWS's docs show a boolean; their prose also mentions the string "true".
    let allowed = match reply.get("allowProvisioning") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    };
    if !allowed {
        return Err("allowProvisioning is not true".to_owned());
    }
    let mut overrides = BTreeMap::new();
    if let Some(Value::Object(map)) = reply.get("parameterOverrides") {
        for (k, v) in map {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            overrides.insert(k.clone(), v);
        }
    }
    Ok(overrides)
}
