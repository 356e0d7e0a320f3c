//! Fault injection: rules that make an API reject, drop, delay or disconnect, per API, per
//! client id and per certificate (the one the connection authenticated with); AWS-like throttles (429 on the provisioning APIs, one CONNECT per second per
//! client id).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The APIs a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Api {
    Connect,
    CreateKeysAndCertificate,
    CreateCertificateFromCsr,
    RegisterThing,
    Jobs,
}

/// The `certificateId` of a rule for the next certificate the fake issues.
pub const NEXT_CERTIFICATE: &str = "$next";

/// What happens to a matching request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum FaultAction {
    /// Answer on /rejected with this error (for Connect: refuse the CONNECT).
    #[serde(rename_all = "camelCase")]
    Reject {
        status_code: u16,
        error_code: String,
        error_message: String,
    },
    /// Do the work but never send the reply.
    Drop,
    /// Answer after a delay.
    #[serde(rename_all = "camelCase")]
    Delay { delay_ms: u64 },
    /// Close the requesting connection instead of answering.
    Disconnect,
}

/// A fault rule as posted to `/_fake/faults`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultRule {
    #[serde(default)]
    pub id: u64,
    pub api: Api,
    #[serde(default)]
    pub client_id: Option<String>,
    /// Only requests on connections authenticated with this certificate (64 hex characters).
    /// `"$next"` stands for the next certificate the fake issues (CreateCertificateFromCsr or
    /// CreateKeysAndCertificate) and is replaced by its id when it is issued; until then the
    /// rule matches nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
    #[serde(flatten)]
    pub action: FaultAction,
    /// How many requests it applies to; `None` is every request until removed.
    #[serde(default)]
    pub count: Option<u32>,
}

/// A sliding one-second window limiter: at most `per_second` requests in any second.
#[derive(Debug)]
struct Window {
    per_second: u32,
    recent: VecDeque<Instant>,
}

impl Window {
    fn admit(&mut self, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.per_second as usize {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

/// Counters of what the faults did, for `/_fake/faults` and benchmarks.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultStats {
    pub throttled: HashMap<String, u64>,
    pub connects_throttled: u64,
    pub injected: u64,
}

#[derive(Debug)]
pub struct Faults {
    rules: Vec<FaultRule>,
    next_id: u64,
    throttles: HashMap<Api, Window>,
    /// Minimum gap between CONNECTs of one client id (AWS: 1 per second, not adjustable).
    pub connect_gap: Option<Duration>,
    last_connect: HashMap<String, Instant>,
    pub stats: FaultStats,
}

impl Faults {
    pub fn new(connect_gap: Option<Duration>) -> Self {
        Self {
            rules: Vec::new(),
            next_id: 1,
            throttles: HashMap::new(),
            connect_gap,
            last_connect: HashMap::new(),
            stats: FaultStats::default(),
        }
    }

    pub fn add(&mut self, mut rule: FaultRule) -> u64 {
        rule.id = self.next_id;
        self.next_id += 1;
        let id = rule.id;
        self.rules.push(rule);
        id
    }

    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }

    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.id != id);
        before != self.rules.len()
    }

    /// Removes every rule and throttle (the connect gap stays: it is AWS behaviour).
    pub fn clear(&mut self) {
        self.rules.clear();
        self.throttles.clear();
    }

    pub fn set_throttle(&mut self, api: Api, per_second: Option<u32>) {
        match per_second {
            Some(n) => {
                self.throttles.insert(
                    api,
                    Window {
                        per_second: n,
                        recent: VecDeque::new(),
                    },
                );
            }
            None => {
                self.throttles.remove(&api);
            }
        }
    }

    pub fn throttles(&self) -> HashMap<Api, u32> {
        self.throttles
            .iter()
            .map(|(k, w)| (*k, w.per_second))
            .collect()
    }

    /// The first rule for this API and client that names no certificate, consuming one use of
    /// it.
    pub fn take(&mut self, api: Api, client_id: &str) -> Option<FaultAction> {
        self.take_for(api, client_id, None)
    }

    /// The first rule for this API, client and certificate (`cert_id`: the one the request's
    /// connection authenticated with), consuming one use of it.
    pub fn take_for(
        &mut self,
        api: Api,
        client_id: &str,
        cert_id: Option<&str>,
    ) -> Option<FaultAction> {
        let idx = self.rules.iter().position(|r| {
            r.api == api
                && r.client_id.as_deref().is_none_or(|c| c == client_id)
                && r.certificate_id
                    .as_deref()
                    .is_none_or(|c| c != NEXT_CERTIFICATE && Some(c) == cert_id)
        })?;
        let rule = &mut self.rules[idx];
        let action = rule.action.clone();
        if let Some(n) = rule.count.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.rules.remove(idx);
            }
        }
        self.stats.injected += 1;
        Some(action)
    }

    /// Binds the rules waiting for the next certificate (`"$next"`) to `cert_id`, just issued;
    /// returns how many.
    pub fn bind_next_certificate(&mut self, cert_id: &str) -> usize {
        let mut n = 0;
        for r in &mut self.rules {
            if r.certificate_id.as_deref() == Some(NEXT_CERTIFICATE) {
                r.certificate_id = Some(cert_id.to_owned());
                n += 1;
            }
        }
        n
    }

    /// Whether a request to `api` passes its throttle.
    pub fn admit(&mut self, api: Api) -> bool {
        let Some(w) = self.throttles.get_mut(&api) else {
            return true;
        };
        let ok = w.admit(Instant::now());
        if !ok {
            *self.stats.throttled.entry(format!("{api:?}")).or_default() += 1;
        }
        ok
    }

    /// Whether a CONNECT by `client_id` respects the per-client-id rate.
    pub fn admit_connect(&mut self, client_id: &str) -> bool {
        let Some(gap) = self.connect_gap else {
            return true;
        };
        let now = Instant::now();
        if let Some(last) = self.last_connect.get(client_id)
            && now.duration_since(*last) < gap
        {
            self.stats.connects_throttled += 1;
            return false;
        }
        // Forget old entries now and then so that a fleet simulation doesn't grow this forever.
        if self.last_connect.len() > 10_000 {
            self.last_connect
                .retain(|_, t| now.duration_since(*t) < gap);
        }
        self.last_connect.insert(client_id.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_by_api_and_client_and_count_down() {
        let mut f = Faults::new(None);
        f.add(FaultRule {
            id: 0,
            api: Api::RegisterThing,
            client_id: Some("a".into()),
            certificate_id: None,
            action: FaultAction::Drop,
            count: Some(2),
        });
        assert_eq!(f.take(Api::RegisterThing, "b"), None);
        assert_eq!(f.take(Api::CreateCertificateFromCsr, "a"), None);
        assert_eq!(f.take(Api::RegisterThing, "a"), Some(FaultAction::Drop));
        assert_eq!(f.take(Api::RegisterThing, "a"), Some(FaultAction::Drop));
        assert_eq!(f.take(Api::RegisterThing, "a"), None);
    }

    #[test]
    fn rules_by_certificate_and_for_the_next_certificate() {
        let mut f = Faults::new(None);
        let rule = |cert: &str| -> FaultRule {
            serde_json::from_value(serde_json::json!({
                "api": "Connect", "certificateId": cert, "action": "drop", "count": 1
            }))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        f.add(rule("aa"));
        f.add(rule(NEXT_CERTIFICATE));
        assert_eq!(f.take(Api::Connect, "c"), None, "no certificate given");
        assert_eq!(f.take_for(Api::Connect, "c", Some("bb")), None);
        assert_eq!(
            f.take_for(Api::Connect, "c", Some("aa")),
            Some(FaultAction::Drop)
        );
        // "$next" matches nothing until a certificate is issued, then that one only.
        assert_eq!(f.take_for(Api::Connect, "c", Some(NEXT_CERTIFICATE)), None);
        assert_eq!(f.bind_next_certificate("cc"), 1);
        assert_eq!(f.bind_next_certificate("dd"), 0);
        assert_eq!(f.rules()[0].certificate_id.as_deref(), Some("cc"));
        assert_eq!(f.take_for(Api::Connect, "c", Some("dd")), None);
        assert_eq!(
            f.take_for(Api::Connect, "c", Some("cc")),
            Some(FaultAction::Drop)
        );
        assert!(f.rules().is_empty());
    }

    #[test]
    fn throttle_admits_n_per_second() {
        let mut f = Faults::new(None);
        f.set_throttle(Api::RegisterThing, Some(3));
        let admitted = (0..10).filter(|_| f.admit(Api::RegisterThing)).count();
        assert_eq!(admitted, 3);
        assert!(f.admit(Api::CreateCertificateFromCsr));
    }

    #[test]
    fn connect_gap_per_client_id() {
        let mut f = Faults::new(Some(Duration::from_secs(1)));
        assert!(f.admit_connect("a"));
        assert!(!f.admit_connect("a"));
        assert!(f.admit_connect("b"));
    }

    #[test]
    fn rule_json_shape() {
        let rule: FaultRule = serde_json::from_str(
            r#"{"api":"RegisterThing","action":"reject","statusCode":400,"errorCode":"X","errorMessage":"m","count":1}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            rule.action,
            FaultAction::Reject {
                status_code: 400,
                error_code: "X".into(),
                error_message: "m".into()
            }
        );
    }
}
